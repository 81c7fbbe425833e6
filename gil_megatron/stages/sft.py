"""Supervised fine-tuning: next-token NLL on the response tokens (prompt tokens and padding masked).

    torchrun --nproc-per-node 2 -m gil_megatron.stages.sft examples/configs/sft_miniature.yaml [key=value ...]
    (tools/train_sft.py is the same entry point)

Data: {"prompt", "response"} jsonl, {"prompt", "chosen"}, or HH-RLHF "chosen" dialogues
(gil_megatron/data/records.py; conversations use the chat template). The objective of a step is the mean NLL over all response tokens of the
global batch (``token_mean``); eval reports eval/loss per token and per known group.
"""

from typing import Dict, List, Optional, Tuple

import torch

from gil_megatron.algo.ppo import masked_sum
from gil_megatron.algo.preference import sft_loss
from gil_megatron.config import SFTConfig
from gil_megatron.data import SequenceBatch, load_sft, options_from_config
from gil_megatron.models.logprobs import action_logprobs
from gil_megatron.stages.common import Stage, add_group_sums, chunks, run, sequence_microbatch
from gil_megatron.training.metrics import Sums, sums_from_means

LOSS_AGG_MODE = "token_mean"  # every response token of the global batch weighs the same


class SFTStage(Stage):
    name = "sft"
    schema = SFTConfig
    role = "actor"
    count_name = "tokens"
    show = ("train/loss", "eval/loss")
    summary = ("eval/loss", "train/loss")

    def load_dataset(self, path: str):
        d = self.cfg.data
        return load_sft(path, self.tokenizer, max_length=d.max_length, max_prompt_length=d.max_prompt_length,
                        too_long=d.too_long, **options_from_config(d))

    def microbatches(self, batch: SequenceBatch) -> List[Dict[str, torch.Tensor]]:
        return [sequence_microbatch(self, batch, sl) for sl in chunks(len(batch), self.cfg.train.micro_batch_size)]

    @staticmethod
    def _target_mask(mb) -> torch.Tensor:
        # position t predicts token t+1: it counts when token t+1 is a real response token
        return mb["response_mask"][:, 1:] * mb["weight"][:, None]

    def count(self, mb) -> torch.Tensor:
        return self._target_mask(mb).sum()

    def loss(self, mb, logits, normalizer: Optional[torch.Tensor], with_groups: bool) -> Tuple[torch.Tensor, Sums]:
        logprobs, _ = action_logprobs(logits, mb["input_ids"])  # [b, s-1]
        mask = self._target_mask(mb)
        loss, metrics = sft_loss(logprobs, mask, LOSS_AGG_MODE, normalizer)
        sums = sums_from_means({"loss": metrics["loss"]}, metrics["tokens"])
        if with_groups:
            tokens = mask.sum(-1)  # [b]
            row_loss = masked_sum(-logprobs.detach(), mask, dim=-1) / tokens.clamp_min(1.0)
            add_group_sums(sums, self, {"loss": row_loss}, tokens, mb["group_ids"])
        return loss, sums


def main(argv) -> Dict[str, float]:
    return run(SFTStage, argv)


if __name__ == "__main__":
    from gil_megatron.cli import stage_main

    stage_main("gil_megatron.stages.sft")
