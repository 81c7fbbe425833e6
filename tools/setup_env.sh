#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in .venv and install everything into it:
# Python 3.12, torch 2.13.0 FIRST (so no dependency can drag in another torch), the pinned
# requirements, then this package with its C++/CUDA extension built against that torch.
# Idempotent: a second run only checks and rebuilds what changed.
set -euo pipefail
cd "$(dirname "$0")/.."

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

if [ ! -x .venv/bin/python ]; then
  PY=$(find_python)
  echo "[setup_env] creating .venv with $PY" >&2
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
if ! $VPY -c 'import torch, sys; sys.exit(torch.__version__.split("+")[0] != "2.13.0")' 2>/dev/null; then
  echo "[setup_env] installing torch 2.13.0" >&2
  $VPY -m pip install -q --upgrade pip
  $VPY -m pip install -q torch==2.13.0
fi
stamp=.venv/.requirements.sha
want=$(sha256sum requirements.txt | cut -d' ' -f1)
if [ "$(cat $stamp 2>/dev/null)" != "$want" ]; then
  echo "[setup_env] installing requirements.txt" >&2
  $VPY -m pip install -q -r requirements.txt
  echo "$want" > $stamp
fi
# The extension: CUDA kernels too when this torch has CUDA and nvcc is there (it is on CI).
if ! $VPY -c 'import torch, gil_megatron._C' 2>/dev/null || [ -n "$(find csrc setup.py -newer .venv/.ext_built 2>/dev/null | head -n 1)" ] || [ ! -f .venv/.ext_built ]; then
  echo "[setup_env] building gil_megatron and its kernels (about 2 minutes on 2 cores)" >&2
  MAX_JOBS=${MAX_JOBS:-2} $VPY -m pip install -q --no-build-isolation --no-deps -e .
  touch .venv/.ext_built
fi
$VPY -c 'import torch, gil_megatron._C; print("[setup_env] ready: torch", torch.__version__, "kernel built")' >&2
