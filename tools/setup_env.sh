#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in .venv and install everything into it:
# Python 3.12, pip pinned, then requirements.lock (torch 2.13.0 and every transitive dependency
# pinned with hashes; regenerate it with tools/lock_requirements.sh), then this package with its
# C++/CUDA extension built against that torch.
# Idempotent: a second run only checks and rebuilds what changed.
#   GIL_MEGATRON_CPU_TORCH=1   accept a CPU-only torch already in .venv (no CUDA kernels, no GPU runs)
set -euo pipefail
cd "$(dirname "$0")/.."
PIP_VERSION=26.3

find_python() {
  for cand in "${PYTHON:-}" python3.12 "$HOME/.pyenv/versions/3.12"*/bin/python3.12 /usr/local/bin/python3.12 /usr/bin/python3.12; do
    [ -n "$cand" ] || continue
    if command -v "$cand" >/dev/null 2>&1 && "$cand" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
      command -v "$cand"; return 0
    fi
  done
  if command -v pyenv >/dev/null 2>&1; then
    v=$(pyenv versions --bare | grep -E '^3\.12' | tail -n 1 || true)
    if [ -n "$v" ]; then echo "$(pyenv root)/versions/$v/bin/python3.12"; return 0; fi
  fi
  echo "error: Python 3.12 not found; install it (e.g. 'pyenv install 3.12') or set PYTHON=/path/to/python3.12" >&2
  return 1
}

# A C++ compiler with OpenMP: the kernels' CPU half is compiled with -fopenmp (setup.py). torch's
# build uses $CXX, else c++. Checked before anything is installed so the error comes first.
check_cxx_openmp() {
  local cxx=${CXX:-c++} dir
  dir=$(mktemp -d)
  printf '#include <omp.h>\nint main() { int n = 0;\n#pragma omp parallel reduction(+ : n)\n n += 1;\n return n > 0 ? 0 : 1; }\n' > "$dir/omp.cpp"
  if ! "$cxx" -fopenmp "$dir/omp.cpp" -o "$dir/omp" >/dev/null 2>&1 || ! "$dir/omp"; then
    rm -rf "$dir"
    echo "error: no C++ compiler with OpenMP: '$cxx -fopenmp' cannot build and run a test program; install one (Debian/Ubuntu: apt-get install g++) or set CXX to a compiler that supports -fopenmp" >&2
    return 1
  fi
  rm -rf "$dir"
}
check_cxx_openmp

if [ ! -x .venv/bin/python ]; then
  PY=$(find_python)
  echo "[setup_env] creating .venv with $PY" >&2
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
if [ "$($VPY -m pip --version 2>/dev/null | cut -d' ' -f2)" != "$PIP_VERSION" ]; then
  echo "[setup_env] installing pip $PIP_VERSION" >&2
  $VPY -m pip install -q "pip==$PIP_VERSION"
fi

# A CPU-only torch (e.g. 2.13.0+cpu from the CPU wheel index) satisfies torch==2.13.0 but cannot
# build or run the CUDA kernels: refuse it unless asked for.
cpu_torch=$($VPY -c 'import torch; print(torch.__version__ if torch.version.cuda is None else "")' 2>/dev/null || true)
if [ -n "$cpu_torch" ]; then
  if [ "${GIL_MEGATRON_CPU_TORCH:-0}" != "1" ]; then
    echo "error: .venv has a CPU-only torch ($cpu_torch): the CUDA kernels cannot be built and nothing can run on a GPU; remove .venv to get the CUDA torch of requirements.lock, or set GIL_MEGATRON_CPU_TORCH=1 to accept a CPU-only install" >&2
    exit 1
  fi
  echo "[setup_env] WARNING: CPU-only torch $cpu_torch (GIL_MEGATRON_CPU_TORCH=1): building the CPU kernels only; the CUDA kernels are DISABLED and GPU runs will fail" >&2
fi

stamp=.venv/.requirements.sha
want=$(cat requirements.lock | sha256sum | cut -d' ' -f1)
if [ "$(cat $stamp 2>/dev/null)" != "$want" ]; then
  echo "[setup_env] installing requirements.lock (hash-checked)" >&2
  $VPY -m pip install -q -r requirements.lock
  echo "$want" > $stamp
fi
# The extension: CUDA kernels too when this torch has CUDA and nvcc is there (it is on CI).
if ! $VPY -c 'import torch, gil_megatron._C' 2>/dev/null || [ -n "$(find csrc setup.py -newer .venv/.ext_built 2>/dev/null | head -n 1)" ] || [ ! -f .venv/.ext_built ]; then
  echo "[setup_env] building gil_megatron and its kernels (about 2 minutes on 2 cores)" >&2
  MAX_JOBS=${MAX_JOBS:-2} $VPY -m pip install -q --no-build-isolation --no-deps -e .
  touch .venv/.ext_built
fi
$VPY - <<'EOF' >&2
import torch
from gil_megatron import _C
if _C.cuda_compiled:
    kernels = "CPU + CUDA kernels built"
elif torch.version.cuda is None:
    kernels = "CPU kernels built; CUDA kernels DISABLED (CPU-only torch)"
else:
    kernels = ("CPU kernels built; CUDA kernels NOT built (no nvcc: set CUDA_HOME to a CUDA toolkit "
               "and rerun, or GIL_MEGATRON_NO_CUDA=1 was set)")
print(f"[setup_env] ready: torch {torch.__version__}, {kernels}")
EOF
