#!/usr/bin/env bash
# GIL-PPO launcher (wraps torchrun).
#
#   bash examples/run_gil_ppo.sh                          the embedded default: the CPU miniature, end to end
#   bash examples/run_gil_ppo.sh CONFIG.yaml [key=value ...]   PPO/GIL with your config and overrides
#   bash examples/run_gil_ppo.sh train.steps=20 run_dir=runs/x   the default, with overrides
#   bash examples/run_gil_ppo.sh --verbose ...            also show known-harmless third-party warnings
#   bash examples/run_gil_ppo.sh --help                   this text
#
# Before torchrun starts any worker, `python -m gil_megatron.cli validate` checks the config (keys,
# types, values), the world size NPROC * NNODES against parallel.tp * parallel.pp and the batch
# sizes, and that data and model paths exist: a problem is one `error:` line and exit status 2.
# Config keys: `python -m gil_megatron.cli keys ppo`.
#
# Environment: NPROC (ranks per node, default 2), NNODES (default 1), NODE_RANK, MASTER_ADDR,
# MASTER_PORT (multi-node rendezvous; see examples/slurm_gil_ppo.sbatch), PYTHON (default .venv).
#
# The embedded default (docs/design.md, "the miniature") runs every stage of RLHF on a laptop CPU at TP=2 under
# gloo, reusing finished stages: miniature data + tokenizer -> a fresh ~0.5M-parameter Llama ->
# SFT -> reward model on flawed preference labels -> GIL-PPO against that reward model, with the
# true reward logged beside it. Outputs land in runs/miniature/.
set -euo pipefail
case "${1:-}" in
  -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
  --verbose) export GIL_MEGATRON_VERBOSE=1; shift ;;
esac
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
PY=${PYTHON:-$ROOT/.venv/bin/python}
[ -x "$PY" ] || { echo "error: $PY not found; run 'bash tools/setup_env.sh' first (or set PYTHON)" >&2; exit 2; }
NPROC=${NPROC:-2}
NNODES=${NNODES:-1}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}   # one thread per rank: oversubscribed CPUs run ~10x slower

validate() {  # JOB [--no-paths] [CONFIG] [key=value ...]: one error line and exit 2 before any worker starts
  local job=$1; shift
  "$PY" -m gil_megatron.cli validate --world-size $((NPROC * NNODES)) "$job" "$@" || exit 2
}

launch() {
  if [ "$NNODES" -gt 1 ]; then
    rdzv=(--nnodes "$NNODES" --node-rank "${NODE_RANK:-0}" --rdzv-backend c10d
          --rdzv-endpoint "${MASTER_ADDR:?set MASTER_ADDR}:${MASTER_PORT:-29500}" --rdzv-id "${RUN_ID:-gil_ppo}")
  else
    rdzv=(--standalone)
  fi
  "$PY" -m torch.distributed.run "${rdzv[@]}" --nproc-per-node "$NPROC" --max-restarts "${MAX_RESTARTS:-0}" "$@"
}

if [ $# -gt 0 ] && [[ "$1" != *=* ]]; then
  config=$1; shift
  validate ppo "$config" "$@"
  launch -m gil_megatron.ppo.trainer "$config" "$@"
  exit
fi

# ---- the embedded default -------------------------------------------------------------------
M=runs/miniature
step() { echo "[run_gil_ppo] $*" >&2; }
validate ppo --no-paths examples/configs/miniature.yaml "$@"   # the overrides, before minutes of earlier stages
if [ ! -f $M/data/meta.json ]; then
  step "1/5 writing the miniature task (data + tokenizer) to $M/data"
  "$PY" -m gil_megatron.miniature.prepare --out-dir $M/data
fi
if [ ! -f $M/init/gil_megatron.json ]; then
  step "2/5 initialising a tiny Llama in $M/init"
  "$PY" tools/init_model.py --save-dir $M/init --tokenizer $M/data/tokenizer --hidden-size 128 \
    --intermediate-size 256 --num-layers 2 --num-attention-heads 4 --num-kv-heads 2 \
    --max-position-embeddings 64 --seed 0
fi
if [ ! -f $M/sft/model/gil_megatron.json ]; then
  step "3/5 SFT on demonstrations -> $M/sft/model"
  validate sft examples/configs/sft_miniature.yaml
  launch -m gil_megatron.stages.sft examples/configs/sft_miniature.yaml
fi
if [ ! -f $M/reward_model/model/gil_megatron.json ]; then
  step "4/5 reward model on flawed preference pairs -> $M/reward_model/model"
  validate reward_model examples/configs/rm_miniature.yaml
  launch -m gil_megatron.stages.reward_model examples/configs/rm_miniature.yaml
fi
step "5/5 GIL-PPO against the reward model (examples/configs/miniature.yaml $*)"
validate ppo examples/configs/miniature.yaml "$@"
launch -m gil_megatron.ppo.trainer examples/configs/miniature.yaml "$@"
