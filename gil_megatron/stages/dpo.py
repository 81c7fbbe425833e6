"""Direct Preference Optimization (sigmoid loss) against a frozen reference policy.

    torchrun --nproc-per-node 2 -m gil_megatron.stages.dpo examples/configs/dpo_miniature.yaml [key=value ...]

``init`` is the SFT policy; ``reference`` (default: ``init``) is loaded frozen. Sequence log-probs
are sums of the response tokens' log-probs from the vocab-parallel logits
(``vocab_parallel_logprobs``: under TP only per-token scalars cross ranks). Each step first runs the
reference over the step's micro-batches without grad (forward only), then the policy forward and
backward. Metrics: loss, implicit rewards (chosen, rejected, margin), accuracy.
"""

from typing import Dict, List, Optional, Tuple

import torch

from gil_megatron.algo.preference import dpo_loss, sequence_logprobs
from gil_megatron.config import DPOConfig
from gil_megatron.models.build import model_from_checkpoint
from gil_megatron.models.logprobs import action_logprobs
from gil_megatron.models.pipeline import run_microbatches
from gil_megatron.parallel.distributed import ParallelLayout
from gil_megatron.stages.common import PairStage, add_group_sums, run
from gil_megatron.training.metrics import Sums, sums_from_means


def _sequence_logprobs(mb, logits) -> torch.Tensor:
    """[2m] log pi(y | x) of the micro-batch's chosen-then-rejected rows."""
    return sequence_logprobs(action_logprobs(logits, mb["input_ids"])[0], mb["response_mask"][:, 1:])


class DPOStage(PairStage):
    name = "dpo"
    schema = DPOConfig
    role = "actor"
    show = ("train/loss", "train/accuracy", "eval/accuracy")
    summary = ("eval/accuracy", "eval/loss", "eval/rewards/margin", "train/loss")

    def frozen_models(self):
        key = "reference" if self.cfg.reference else "init"
        return {"reference": (getattr(self.cfg, key), "actor", key)}

    def setup(self, layout: ParallelLayout, dtype: torch.dtype) -> None:
        path, role, key = self.frozen_models()["reference"]
        self.reference = model_from_checkpoint(path, role, layout, dtype, trainable=False, key=key)

    @torch.no_grad()
    def before_forward(self, mbs: List[Dict[str, torch.Tensor]]) -> None:
        """ref_logps [2m] into each micro-batch (on the last pipeline stage, where the loss runs)."""
        outs = run_microbatches(self.reference, mbs, lambda mb, out: (out.new_zeros(()), {
            "ref_logps": _sequence_logprobs(mb, out)}), forward_only=True)
        for mb, out in zip(mbs, outs):
            mb["ref_logps"] = out["ref_logps"]

    def loss(self, mb, logits, normalizer: Optional[torch.Tensor], with_groups: bool) -> Tuple[torch.Tensor, Sums]:
        policy_chosen, policy_rejected = _sequence_logprobs(mb, logits).chunk(2)
        ref_chosen, ref_rejected = mb["ref_logps"].chunk(2)
        loss, metrics = dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, self.cfg.beta,
                                 mb["weight"], normalizer)
        sums = sums_from_means(metrics, mb["weight"].sum())
        if with_groups:
            margin = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
            add_group_sums(sums, self, {"accuracy": (margin > 0).to(margin.dtype)}, mb["weight"], mb["group_ids"])
        return loss, sums


def main(argv) -> Dict[str, float]:
    return run(DPOStage, argv)


if __name__ == "__main__":
    from gil_megatron.cli import stage_main

    stage_main("gil_megatron.stages.dpo")
