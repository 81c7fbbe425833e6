"""collectives: non-contiguous views travel correctly over gloo (raw gloo corrupts them)."""

import pytest
import torch
import torch.distributed as dist

from dist_utils import spawn


def _exchange():
    dist.init_process_group("gloo")
    from gil_megatron.parallel import collectives

    rank, group = dist.get_rank(), dist.group.WORLD
    base = torch.arange(12.0).view(3, 4) * (rank + 1)  # rank r holds (r + 1) * arange
    out = {}

    # raw gloo on a column slice: the bug this module exists for (kept to show the test can fail)
    raw = base.clone()[:, :3]
    dist.broadcast(raw, src=1, group=group)
    out["raw_broadcast"] = raw.clone()

    view = base.clone()[:, :3]
    collectives.broadcast(view, src=1, group=group)
    out["broadcast"] = view.clone()

    holder = base.clone()
    collectives.all_reduce(holder[:, 1:3], group=group)  # in place into a view of holder
    out["all_reduce_holder"] = holder

    permuted = base.clone().t()  # dense but not contiguous: empty_like would keep its strides
    out["all_gather"] = collectives.all_gather_into(permuted, group=group, dim=0)
    out["object"] = collectives.broadcast_object({"rank": rank}, src=1, group=group)
    out["objects"] = collectives.all_gather_object(rank * 10, group=group)
    return out


def test_non_contiguous_views_are_exchanged_correctly():
    base = torch.arange(12.0).view(3, 4)
    r0, r1 = spawn(_exchange, 2)
    want = (2 * base)[:, :3]
    # raw gloo on rank 0 receives the wrong elements: the wrappers below must not
    assert not torch.equal(r0["raw_broadcast"], want)
    for r in (r0, r1):
        assert torch.equal(r["broadcast"], want)
        expect = base.clone()
        expect[:, 1:3] = 3 * base[:, 1:3]
        assert torch.equal(r["all_reduce_holder"][:, 1:3], expect[:, 1:3])
        assert torch.equal(r["all_gather"], torch.cat([base.t(), 2 * base.t()], dim=0))
        assert r["object"] == {"rank": 1} and r["objects"] == [0, 10]
    # the untouched columns of the holder keep each rank's own values
    assert torch.equal(r0["all_reduce_holder"][:, 0], base[:, 0])
    assert torch.equal(r1["all_reduce_holder"][:, 3], 2 * base[:, 3])


def test_group_none_is_refused():
    from gil_megatron.parallel import collectives

    with pytest.raises(ValueError, match="explicit process group"):
        collectives.all_reduce(torch.zeros(2), group=None)
