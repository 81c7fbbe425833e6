#!/usr/bin/env bash
# Mutation testing (mutmut) of given source paths against given fast tests; prints the kill rate
# and every surviving mutant's diff. Not part of CI (minutes to hours). mutmut lives in its own venv
# (.mutation/venv, git-ignored) that sees the project's packages through a .pth line, so nothing is
# added to the project's requirements. Examples:
#   bash tools/mutation_test.sh --source gil_megatron/algo/ --tests tests/algo
#   bash tools/mutation_test.sh --source gil_megatron/algo/ --source gil_megatron/ops/ \
#       --tests tests/algo --tests tests/ops --pytest-args "-m 'not slow' -k 'not tp2'" \
#       --sample 80 --out benchmarks/results/mutation_$(date +%F).txt
# PROJECT_VENV (default .venv) is the environment the tests run in; the tool venv uses its Python.
set -euo pipefail
cd "$(dirname "$0")/.."
MUTMUT_VERSION=3.8.1
PROJECT_VENV=${PROJECT_VENV:-.venv}
site=$("$PROJECT_VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') || {
  echo "error: no project environment at $PROJECT_VENV (run tools/setup_env.sh or set PROJECT_VENV)" >&2; exit 1; }
if ! .mutation/venv/bin/python -c "import importlib.metadata as m, sys; sys.exit(m.version('mutmut') != '$MUTMUT_VERSION')" 2>/dev/null; then
  base=$("$PROJECT_VENV/bin/python" -c 'import sys; print(sys._base_executable)')  # the project's Python
  "${PYTHON:-$base}" -m venv .mutation/venv
  .mutation/venv/bin/python -m pip install -q "mutmut==$MUTMUT_VERSION"
fi
echo "$site" > "$(.mutation/venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/project_venv.pth"
exec .mutation/venv/bin/python tools/mutation_test.py "$@"
