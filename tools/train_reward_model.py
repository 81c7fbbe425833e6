#!/usr/bin/env python
"""Reward-model training: the same as `python -m gil_megatron.stages.reward_model` (whose docstring and --help say everything).

    OMP_NUM_THREADS=1 torchrun --nproc-per-node 2 tools/train_reward_model.py CONFIG.yaml [key=value ...]
    python tools/train_reward_model.py --help
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None):
    from gil_megatron.stages import reward_model

    return reward_model.main(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    from gil_megatron.cli import stage_main

    stage_main("gil_megatron.stages.reward_model")
