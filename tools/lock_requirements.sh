#!/usr/bin/env bash
# Regenerate requirements.lock from requirements.txt: every transitive dependency pinned with its
# hashes, for CPython 3.12 on x86_64 Linux (the project's only target). The tool (uv) lives in a
# throwaway venv under .lock-tools/ (git-ignored), never in the project's .venv. Versions already
# in requirements.lock are kept where requirements.txt still allows them (uv reads the old lock as
# preferences), so a run after editing one pin moves only what that pin forces.
#   bash tools/lock_requirements.sh            # then review `git diff requirements.lock`
set -euo pipefail
cd "$(dirname "$0")/.."
UV_VERSION=0.13.8
PY=${PYTHON:-python3}
if [ ! -x .lock-tools/bin/uv ] || [ "$(.lock-tools/bin/uv --version | cut -d' ' -f2)" != "$UV_VERSION" ]; then
  "$PY" -m venv .lock-tools
  .lock-tools/bin/python -m pip install -q "uv==$UV_VERSION"
fi
.lock-tools/bin/uv pip compile requirements.txt -o requirements.lock --generate-hashes \
  --python-version 3.12 --python-platform x86_64-manylinux_2_28 \
  --custom-compile-command "bash tools/lock_requirements.sh"
