"""gil_megatron/training/metrics.py: (numerator, denominator) sums, their reduction over data-parallel ranks
and from the last pipeline stage (2 gloo ranks), and the loss normaliser N_global / dp."""

import math

import pytest
import torch

from gil_megatron.training.metrics import loss_normalizer, means, metric_sum, ratio, reduce_sums, sums_from_means


def test_sums_and_means_without_collectives():
    s = sums_from_means({"loss": torch.tensor(2.0), "acc": torch.tensor(0.5)}, torch.tensor(4.0))
    assert torch.equal(s["loss"], torch.tensor([8.0, 4.0], dtype=torch.float64))
    group = metric_sum(torch.tensor([1.0, 3.0]), torch.tensor([2.0, 0.0]))  # per-group sums and counts
    assert group.shape == (2, 2) and group.dtype == torch.float64
    assert metric_sum(torch.tensor(3.0), 1.0).tolist() == [3.0, 1.0]
    totals = {"loss": ([8.0], [4.0]), "group/acc": ([1.0, 3.0], [2.0, 0.0]), "empty": ([0.0], [0.0])}
    out = means(totals, "train/")
    assert out["train/loss"] == 2.0 and math.isnan(out["train/empty"]) and "train/group/acc" not in out
    assert ratio(1.0, 0.0) != ratio(1.0, 0.0)  # NaN: nothing contributed


def _reduce_on_two_ranks():
    import torch.distributed as dist
    from megatron.core import parallel_state

    from gil_megatron.parallel import distributed

    out = {}
    layout = distributed.initialize(1, 1, seed=0)  # dp = 2
    r = layout.dp_rank
    per_mb = [{"loss": metric_sum(torch.tensor(1.0 + r), 2.0), "group/acc": metric_sum(torch.tensor([r, 1.0]), 1.0)},
              {"loss": metric_sum(torch.tensor(3.0), 1.0 + r)}]  # a key missing from a micro-batch adds nothing
    out["dp"] = reduce_sums(per_mb, parallel_state.get_data_parallel_group(),
                            parallel_state.get_pipeline_model_parallel_group())
    out["normalizer"] = loss_normalizer(torch.tensor(3.0 + 4 * r), parallel_state.get_data_parallel_group())

    layout = distributed.initialize(1, 2, seed=0)  # pp = 2: only the last stage has loss outputs
    per_mb = [{"x": metric_sum(torch.tensor(6.0), 3.0)}] if layout.is_last_stage else []
    out["pp"] = reduce_sums(per_mb, parallel_state.get_data_parallel_group(),
                            parallel_state.get_pipeline_model_parallel_group())
    out["rank"] = dist.get_rank()
    return out


@pytest.mark.slow  # process start-up dominates; CI covers DP2 and PP2 reduction in tests/stages/test_stages.py
def test_reduce_over_dp_and_from_the_last_stage():
    from dist_utils import spawn

    results = spawn(_reduce_on_two_ranks, 2)
    for res in results:
        # loss: numerators rank0 1 + 3, rank1 2 + 3; denominators rank0 2 + 1, rank1 2 + 2
        assert res["dp"] == {"loss": ([9.0], [7.0]), "group/acc": ([1.0, 2.0], [2.0, 2.0])}
        assert res["normalizer"].item() == (3.0 + 7.0) / 2  # N_global / dp
        assert res["pp"] == {"x": ([6.0], [3.0])}
