#!/usr/bin/env python
"""Reward-model training (pairwise Bradley-Terry loss, scalar head at the last token).

    OMP_NUM_THREADS=1 torchrun --nproc-per-node 2 tools/train_reward_model.py \
        examples/configs/rm_miniature.yaml [key=value ...]

Any config key can be overridden with a dotted key=value (gil_megatron/config.py lists them all),
e.g. `train.steps=50 parallel.tp=2 checkpoint.resume=none`. Writes RUN_DIR/metrics.jsonl, training
checkpoints under RUN_DIR/checkpoints/ (resumed by checkpoint.resume=auto) and the final model
directory to `output` (default RUN_DIR/model). Ends with a one-line summary; user errors print one
line and exit with status 2.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gil_megatron.cli import run_cli  # noqa: E402


def main(argv=None):
    from gil_megatron.stages import reward_model

    return reward_model.main(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    from gil_megatron import distributed

    try:
        run_cli(main)
    finally:
        distributed.destroy()
