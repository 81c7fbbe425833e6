"""Named random streams: every random draw of a run comes from (run seed, stream name, indices).

A stream's seed is a hash of its name and indices, so streams never collide by arithmetic accident
(``seed * 1000 + rank`` and ``seed + 7919 * iteration`` can meet) and a new stream cannot shift an
old one. The streams of the engine:

    rollout          (dp_rank)            the replica's sampling draws; identical on its TP/PP ranks
    rollout_resumed  (dp_rank, step)      a fresh sampling stream when a resume cannot carry the old one
    weight_shuffle   (step)               the shuffled-weights control's permutation (GIL ablation)
    minibatch_order  (step)               the order of a PPO iteration's mini-batches
    eval_sampling    (dp_rank)            sampled (non-greedy) evaluation responses
    data_order       (epoch)              the data loader's shuffle of one epoch

Model initialisation keeps megatron-core's own seeding (parallel/distributed.py).
"""

import hashlib

import torch


def stream_seed(seed: int, stream: str, *indices: int) -> int:
    """A 63-bit seed for ``stream`` at ``indices`` of a run seeded with ``seed``."""
    key = "/".join([str(int(seed)), stream, *(str(int(i)) for i in indices)])
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") & ((1 << 63) - 1)


def generator(seed: int, stream: str, *indices: int) -> torch.Generator:
    """A CPU torch.Generator at the start of ``stream`` (see ``stream_seed``)."""
    return torch.Generator().manual_seed(stream_seed(seed, stream, *indices))
