"""Build gil_megatron and its compiled kernels (gil_megatron._C).

    pip install -e . --no-build-isolation      # always without build isolation: the extension must be
                                               # compiled against the torch already installed

The extension holds the fused vocab-parallel log-prob / masked-KL operators (csrc/logprob). The C++
CPU kernels are always built; the CUDA kernels are added when torch was built with CUDA
(torch.version.cuda is set) and a CUDA toolkit (nvcc) is found. Environment knobs:

    CUDA_HOME              toolkit root; default /usr/local/cuda if it has bin/nvcc, else torch's guess
    TORCH_CUDA_ARCH_LIST   GPU architectures; default "8.0;9.0" (A100, H100)
    GIL_MEGATRON_NO_CUDA=1 build the CPU kernels only, even where CUDA is available
    MAX_JOBS               parallel compile jobs (ninja)
    CC / CXX               the compilers; they must use the libstdc++ that torch loads. A GCC that
                           links its own libstdc++ statically (the lent GPU machines set
                           CXX=/opt/gcc/bin/g++) gives an extension that segfaults on its first
                           error message; there build with CC=/usr/bin/gcc CXX=/usr/bin/g++.
"""

import os
import re
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _resolve_cuda_home():
    """Pick the CUDA toolkit before torch.utils.cpp_extension guesses (its guess can be wrong here)."""
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    if os.path.exists("/usr/local/cuda/bin/nvcc"):
        return "/usr/local/cuda"
    return None  # let torch guess


_cuda_home = _resolve_cuda_home()
if _cuda_home is not None:
    os.environ["CUDA_HOME"] = _cuda_home
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")

import torch  # noqa: E402  (after CUDA_HOME is set)
from torch.utils import cpp_extension  # noqa: E402


def _version():
    with open(os.path.join(ROOT, "gil_megatron", "__init__.py")) as f:
        return re.search(r'^__version__ = "([^"]+)"', f.read(), re.M).group(1)


def _with_cuda():
    if os.environ.get("GIL_MEGATRON_NO_CUDA", "0") == "1":
        return False
    if torch.version.cuda is None:
        return False
    home = cpp_extension.CUDA_HOME
    return home is not None and os.path.exists(os.path.join(home, "bin", "nvcc"))


def _extensions():
    src = "csrc/logprob"
    sources = [f"{src}/logprob_cpu.cpp", f"{src}/bindings.cpp"]
    cxx = ["-O3", "-fopenmp"]  # the C++ standard is left to torch (c++17 or c++20 by version)
    with_cuda = _with_cuda()
    if with_cuda:
        sources.append(f"{src}/logprob_cuda.cu")
        cxx.append("-DGIL_WITH_CUDA=1")
        nvcc = ["-O3", "-lineinfo", "--expt-relaxed-constexpr", "-DGIL_WITH_CUDA=1"]
        ext = cpp_extension.CUDAExtension(
            "gil_megatron._C",
            sources,
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = cpp_extension.CppExtension(
            "gil_megatron._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"]
        )
    print(f"gil_megatron: building _C with {'CPU + CUDA' if with_cuda else 'CPU'} kernels", file=sys.stderr)
    return [ext]


setup(
    name="gil_megatron",
    version=_version(),
    description="Model-parallel RLHF on megatron-core with Group Invariant Learning PPO",
    packages=find_packages(include=["gil_megatron", "gil_megatron.*"]),
    python_requires=">=3.10",
    install_requires=[],
    ext_modules=_extensions(),
    cmdclass={"build_ext": cpp_extension.BuildExtension},
    zip_safe=False,
)
