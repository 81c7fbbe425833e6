"""Reward-model training: pairwise Bradley-Terry loss on (chosen, rejected), scalar head at the
last real token.

    torchrun --nproc-per-node 2 -m gil_megatron.stages.reward_model examples/configs/rm_miniature.yaml [key=value ...]

``init`` is usually the SFT model (a causal LM: its trunk is loaded and the score head starts at
zero) or an existing reward model. Chosen and rejected responses go through the model in one
forward, concatenated along the batch. Eval reports pairwise accuracy on ``data.eval`` (overall and
per known group). The output directory (role reward) is what PPO's ``models.reward_model`` loads.
"""

from typing import Dict, List, Optional, Tuple

import torch

from gil_megatron.algo.preference import bradley_terry_loss
from gil_megatron.config import RewardModelConfig
from gil_megatron.data import PreferenceBatch, load_preferences, options_from_config
from gil_megatron.models.llama import score_at_last
from gil_megatron.metrics import Sums, sums_from_means
from gil_megatron.stages.common import Stage, add_group_sums, chunks, pair_microbatch, run


class RewardModelStage(Stage):
    name = "reward_model"
    schema = RewardModelConfig
    role = "reward"
    count_name = "pairs"
    show = ("train/loss", "train/accuracy", "eval/accuracy")
    summary = ("eval/accuracy", "eval/loss", "train/accuracy")

    def load_dataset(self, path: str):
        d = self.cfg.data
        return load_preferences(path, self.tokenizer, max_length=d.max_length,
                                max_prompt_length=d.max_prompt_length, too_long=d.too_long, **options_from_config(d))

    def microbatches(self, batch: PreferenceBatch) -> List[Dict[str, torch.Tensor]]:
        return [pair_microbatch(self, batch, sl) for sl in chunks(len(batch), self.cfg.train.micro_batch_size)]

    def count(self, mb) -> torch.Tensor:
        return mb["weight"].sum()

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
