"""Step metrics and the loss normaliser: one convention for every training job (PPO and the stages).

Loss normalisation. The objective of an optimizer step is a mean over its GLOBAL batch: per
response token, per sequence or per pair, as the job's aggregation mode says. megatron's DDP
averages gradients over the dp ranks and gradient accumulation adds the micro-batches' gradients,
so the loss of one micro-batch is

    sum_(its units) l  /  (N_global / dp)                                   (``loss_normalizer``)

with N_global the number of units in the step's global batch (one all-reduce of one number over
data parallelism). The reduced gradient is then exactly the single-rank gradient of
sum_(global batch) l / N_global, for any tp / pp / dp and any micro-batch split
(tests/stages/test_stages.py and tests/ppo/test_trainer.py check TP2 and DP2 against TP1).

Metrics. A loss function returns, beside its loss, *sums*: for each metric a detached tensor
[2, ...] holding (numerator, denominator) that ADD over micro-batches and data-parallel ranks
(``metric_sum``, ``sums_from_means``); a per-group metric is [2, G] (per-group numerators and
counts). ``reduce_sums`` adds a step's sums up on the last pipeline stage, all-reduces them once
over data parallelism, syncs to the host once and gives every pipeline stage the totals;
``means`` divides. No ``.item()`` runs per micro-batch.
"""

import math
from typing import Dict, List, Sequence, Tuple

import torch
import torch.distributed as dist

from gil_megatron.parallel import collectives, distributed

Sums = Dict[str, torch.Tensor]
"""metric name -> [2, ...] (numerator, denominator); adds over micro-batches and ranks."""
Totals = Dict[str, Tuple[List[float], List[float]]]
"""metric name -> (numerators, denominators) over a whole step, as host floats (flattened)."""


def metric_sum(numerator: torch.Tensor, denominator) -> torch.Tensor:
    """(numerator, denominator) as one detached float64 tensor [2, ...] (shapes broadcast)."""
    numerator = numerator.detach().double()
    denominator = torch.as_tensor(denominator, device=numerator.device).detach().double()
    return torch.stack(torch.broadcast_tensors(numerator, denominator))


def sums_from_means(means: Dict[str, torch.Tensor], count: torch.Tensor) -> Sums:
    """Means over a micro-batch -> additive sums weighted by ``count`` (its tokens, pairs, ...)."""
    return {k: metric_sum(v.detach().double() * count.detach().double(), count) for k, v in means.items()}


def reduce_sums(per_microbatch: Sequence[Sums], dp_group, pp_group) -> Totals:
    """A step's sums -> totals on every rank: added over micro-batches on the last pipeline stage
    (the only one with loss outputs; keys missing from a micro-batch add nothing), ONE all-reduce
    over ``dp_group``, ONE host sync, then broadcast over ``pp_group`` from its last rank."""
    pp_size = dist.get_world_size(pp_group)
    totals = None
    if dist.get_rank(pp_group) == pp_size - 1:
        keys = sorted({k for sums in per_microbatch for k in sums})
        parts = [torch.stack([s[k] for s in per_microbatch if k in s]).sum(0) for k in keys]  # [2, ...] each
        flat = collectives.all_reduce(torch.cat([p.reshape(-1) for p in parts]), dp_group)
        values = flat.tolist()  # the one host sync of the step
        totals, i = {}, 0
        for key, part in zip(keys, parts):
            n = part.numel() // 2
            totals[key] = (values[i:i + n], values[i + n:i + 2 * n])
            i += 2 * n
    if pp_size > 1:
        totals = collectives.broadcast_object(totals, dist.get_global_rank(pp_group, pp_size - 1), pp_group)
    return totals


def ratio(numerator: float, denominator: float) -> float:
    """numerator / denominator; NaN for an empty denominator (a metric nothing contributed to)."""
    return numerator / denominator if denominator > 0 else math.nan


def means(totals: Totals, prefix: str = "") -> Dict[str, float]:
    """Scalar metrics of ``totals`` as ``prefix + name -> numerator / denominator``."""
    return {prefix + k: ratio(num[0], den[0]) for k, (num, den) in totals.items() if len(num) == 1}


def loss_normalizer(local_count: torch.Tensor, dp_group) -> torch.Tensor:
    """N_global / dp (at least 1): the denominator of every micro-batch loss of a step, from this
    rank's count of units (see the module docstring). Keeps ``local_count``'s dtype and device."""
    dp = dist.get_world_size(dp_group)
    total = local_count
    if dp > 1:  # nccl needs a device tensor: the count travels there and back
        total = collectives.all_reduce(local_count.to(distributed.device(), copy=True), dp_group)
        total = total.to(local_count.device)
    return (total / dp).clamp_min(1.0)


__all__ = ["Sums", "Totals", "loss_normalizer", "means", "metric_sum", "ratio", "reduce_sums", "sums_from_means"]
