#!/usr/bin/env bash
# GIL-PPO launcher (wraps torchrun).
#
#   bash examples/run_gil_ppo.sh                          the embedded default: the CPU miniature, end to end
#   bash examples/run_gil_ppo.sh CONFIG.yaml [key=value ...]   PPO/GIL with your config and overrides
#   bash examples/run_gil_ppo.sh train.iterations=20 run_dir=runs/x   the default, with overrides
#
# Environment: NPROC (ranks per node, default 2), NNODES (default 1), NODE_RANK, MASTER_ADDR,
# MASTER_PORT (multi-node rendezvous; see examples/slurm_gil_ppo.sbatch), PYTHON (default .venv).
#
# The embedded default (DESIGN.md section 7) runs every stage of RLHF on a laptop CPU at TP=2 under
# gloo, reusing finished stages: miniature data + tokenizer -> a fresh ~0.5M-parameter Llama ->
# SFT -> reward model on flawed preference labels -> GIL-PPO against that reward model, with the
# true reward logged beside it. Outputs land in runs/miniature/.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
PY=${PYTHON:-$ROOT/.venv/bin/python}
[ -x "$PY" ] || { echo "error: $PY not found; run 'bash tools/setup_env.sh' first (or set PYTHON)" >&2; exit 2; }
NPROC=${NPROC:-2}
NNODES=${NNODES:-1}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}   # one thread per rank: oversubscribed CPUs run ~10x slower

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
  launch -m gil_megatron.trainer "$config" "$@"
  exit
fi

# ---- the embedded default -------------------------------------------------------------------
M=runs/miniature
step() { echo "[run_gil_ppo] $*" >&2; }
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
  launch tools/train_sft.py examples/configs/sft_miniature.yaml
fi
if [ ! -f $M/reward_model/model/gil_megatron.json ]; then
  step "4/5 reward model on flawed preference pairs -> $M/reward_model/model"
  launch tools/train_reward_model.py examples/configs/rm_miniature.yaml
fi
step "5/5 GIL-PPO against the reward model (examples/configs/miniature.yaml $*)"
launch -m gil_megatron.trainer examples/configs/miniature.yaml "$@"
