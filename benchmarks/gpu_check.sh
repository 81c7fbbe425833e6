#!/usr/bin/env bash
# One-GPU verification of the GPU path, in under 8 minutes, printing one table:
#   build of the CUDA extension, the CUDA kernel tests (tests/ops), transformer-engine layer spec
#   when TE imports, and 5 GIL-PPO iterations of a ~100M-parameter Llama in bf16 with megatron's
#   distributed optimizer, save -> resume equal to the uninterrupted run, tokens/s, peak memory
#   (benchmarks/gpu_check.py).
# Hardware: one NVIDIA GPU (developed for an H200); TP/PP > 1 need more GPUs and are covered on CPU.
#
# Usage, from the repository root:
#   bash benchmarks/gpu_check.sh --download-wheels   # on a machine with PyPI: fills .whl/ (~10 MB)
#   bash benchmarks/gpu_check.sh                      # on the GPU machine (no registry needed)
# The GPU machine needs torch with CUDA and nvcc; Python packages it lacks are installed from .whl/
# (add `.whl/` to .git/info/exclude so the wheels travel without being committed).
# Expected: every row filled, "resume == straight | metrics yes, weights yes", exit status 0.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=(megatron-core==0.19.2 omegaconf==2.4.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 psutil==7.2.2)

if [[ "${1:-}" == "--download-wheels" ]]; then
    mkdir -p .whl
    "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
        -d .whl "${WHEELS[@]}" || exit 1
    ls -la .whl
    exit 0
fi

START=$(date +%s)
OUT_DIR=${GPU_CHECK_DIR:-/tmp/gil_gpu_check}
rm -rf "$OUT_DIR" && mkdir -p "$OUT_DIR"
declare -a ROWS
row() { ROWS+=("$(printf '| %-22s | %s |' "$1" "$2")"); }
elapsed() { echo "$(( $(date +%s) - START )) s"; }

# 1. missing packages from the carried wheels (never the registry: the GPU machine may not reach one)
missing=()
for mod in megatron.core omegaconf datasets psutil; do
    "$PY" -c "import $mod" 2>/dev/null || missing+=("$mod")
done
if (( ${#missing[@]} )); then
    if ! ls .whl/*.whl >/dev/null 2>&1; then
        echo "error: python lacks ${missing[*]} and .whl/ has no wheels; run 'bash benchmarks/gpu_check.sh --download-wheels' where PyPI answers" >&2
        exit 2
    fi
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gil_site .whl/*.whl \
        || { echo "error: installing .whl/ failed" >&2; exit 2; }
    export PYTHONPATH=/tmp/gil_site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
row "packages" "installed from .whl: ${missing[*]:-none needed}"
"$PY" -c "import transformer_engine" 2>/dev/null && row "transformer-engine" "importable" \
    || row "transformer-engine" "not importable: local layer spec"

# 2. the extension, for this GPU's architecture only (a full arch list compiles for minutes)
ARCH=$("$PY" -c "import torch; m, n = torch.cuda.get_device_capability(); print(f'{m}.{n}')")
if TORCH_CUDA_ARCH_LIST="$ARCH" MAX_JOBS=${MAX_JOBS:-16} "$PY" setup.py build_ext --inplace >"$OUT_DIR/build.log" 2>&1; then
    row "extension build" "ok (sm_${ARCH/./}), $(elapsed)"
else
    row "extension build" "FAILED (see $OUT_DIR/build.log)"; tail -20 "$OUT_DIR/build.log"
fi

# 3. CUDA kernel tests (the CPU ones run too; CUDA ones skip without a GPU, run here)
if "$PY" -m pytest -q -x tests/ops -p no:cacheprovider >"$OUT_DIR/ops.log" 2>&1; then
    row "kernel tests" "$(tail -1 "$OUT_DIR/ops.log"), $(elapsed)"
else
    row "kernel tests" "FAILED: $(tail -1 "$OUT_DIR/ops.log")"; tail -30 "$OUT_DIR/ops.log"
fi

# 4. GIL-PPO in bf16 with the distributed optimizer; save -> resume equality; speed and memory
timeout 360 "$PY" benchmarks/gpu_check.py --out "$OUT_DIR/ppo" --iterations 5 >"$OUT_DIR/ppo.log" 2>&1
ppo_status=$?
row "GIL-PPO check" "exit $ppo_status, $(elapsed)"

echo
printf '%s\n' "${ROWS[@]}"
grep '^| ' "$OUT_DIR/ppo.log" || tail -30 "$OUT_DIR/ppo.log"
echo "total $(elapsed); logs in $OUT_DIR"
exit $ppo_status
