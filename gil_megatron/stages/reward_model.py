"""Reward-model training: pairwise Bradley-Terry loss on (chosen, rejected), scalar head at the
last real token.

    torchrun --nproc-per-node 2 -m gil_megatron.stages.reward_model examples/configs/rm_miniature.yaml [key=value ...]

``init`` is usually the SFT model (a causal LM: its trunk is loaded and the score head starts at
zero) or an existing reward model. Chosen and rejected responses go through the model in one
forward, concatenated along the batch. Eval reports pairwise accuracy on ``data.eval`` (overall and
per known group). The output directory (role reward) is what PPO's ``models.reward_model`` loads.
"""

from typing import Dict, Optional, Tuple

import torch

from gil_megatron.algo.preference import bradley_terry_loss
from gil_megatron.config import RewardModelConfig
from gil_megatron.models.llama import score_at_last
from gil_megatron.stages.common import PairStage, add_group_sums, run
from gil_megatron.training.metrics import Sums, sums_from_means


class RewardModelStage(PairStage):
    name = "reward_model"
    schema = RewardModelConfig
    role = "reward"
    show = ("train/loss", "train/accuracy", "eval/accuracy")
    summary = ("eval/accuracy", "eval/loss", "train/accuracy")

    def loss(self, mb, per_token, normalizer: Optional[torch.Tensor], with_groups: bool) -> Tuple[torch.Tensor, Sums]:
        scores = score_at_last(per_token, mb["lengths"]).float()  # [2m]: the head at the last real token
        chosen, rejected = scores.chunk(2)
        loss, metrics = bradley_terry_loss(chosen, rejected, self.cfg.margin, mb["weight"], normalizer)
        sums = sums_from_means(metrics, mb["weight"].sum())
        if with_groups:
            correct = (chosen > rejected).to(chosen.dtype)  # the accuracy of bradley_terry_loss, per pair
            add_group_sums(sums, self, {"accuracy": correct}, mb["weight"], mb["group_ids"])
        return loss, sums


def main(argv) -> Dict[str, float]:
    return run(RewardModelStage, argv)


if __name__ == "__main__":
    from gil_megatron.cli import stage_main

    stage_main("gil_megatron.stages.reward_model")
