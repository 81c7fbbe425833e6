"""Resumable, data-parallel-sharded batching of a tokenized dataset.

`DataLoader` draws global batches from a `DistributedBatchSampler` (a per-epoch permutation from
(seed, epoch), with an (epoch, position) cursor in `state_dict()` for resume) and gives each
data-parallel rank its contiguous slice; `eval_batches` is one ordered pass for evaluation.
Tensors are right-padded with lengths (the dataset's `collate`).
"""

from __future__ import annotations

from typing import Dict, Iterator, List, Optional

import torch

from gil_megatron import seeds
from gil_megatron.data.sources import DataError


class DistributedBatchSampler:
    """Deterministic, resumable global batches of indices, sharded over data-parallel ranks.

    Epoch e visits the dataset in the order `torch.randperm(n)` of the seed stream
    (seed, "data_order", e) (gil_megatron/seeds.py) (or 0..n-1
    without shuffle), in global batches of `global_batch_size`; the last incomplete batch of an
    epoch is dropped so that every step has the same size. The cursor is (epoch, position), the
    index into that epoch's order: it is all `state_dict()` needs, so resume is exact.
    Rank r of dp_size gets the contiguous slice [r * b, (r + 1) * b) of each global batch,
    b = global_batch_size // dp_size.
    """

    def __init__(
        self,
        num_samples: int,
        global_batch_size: int,
        *,
        seed: int,
        dp_rank: int = 0,
        dp_size: int = 1,
        shuffle: bool = True,
    ):
        if dp_size <= 0 or global_batch_size <= 0 or global_batch_size % dp_size:
            raise ValueError(
                f"global_batch_size={global_batch_size} must be a positive multiple of dp_size={dp_size}"
            )
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} must be in [0, dp_size={dp_size})")
        if num_samples < global_batch_size:
            raise DataError(
                f"dataset has {num_samples} records, fewer than global_batch_size={global_batch_size}; "
                "fix: lower the global batch size or add data"
            )
        self.num_samples, self.global_batch_size = num_samples, global_batch_size
        self.seed, self.dp_rank, self.dp_size, self.shuffle = seed, dp_rank, dp_size, shuffle
        self.epoch, self.position = 0, 0
        self._order: Optional[torch.Tensor] = None
        self._order_epoch = -1

    @property
    def micro_size(self) -> int:
        """Samples per rank per global batch."""
        return self.global_batch_size // self.dp_size

    @property
    def batches_per_epoch(self) -> int:
        return self.num_samples // self.global_batch_size

    def _epoch_order(self) -> torch.Tensor:
        if self._order_epoch != self.epoch:
            if self.shuffle:
                g = seeds.generator(self.seed, "data_order", self.epoch)
                self._order = torch.randperm(self.num_samples, generator=g)
            else:
                self._order = torch.arange(self.num_samples)
            self._order_epoch = self.epoch
        return self._order

    def next_global_batch(self) -> List[int]:
        """All ranks' indices of the next global batch; advances the cursor."""
        if self.position + self.global_batch_size > self.num_samples:
            self.epoch, self.position = self.epoch + 1, 0
        order = self._epoch_order()
        batch = order[self.position : self.position + self.global_batch_size].tolist()
        self.position += self.global_batch_size
        return batch

    def next_indices(self) -> List[int]:
        """This rank's indices of the next global batch; advances the cursor."""
        batch = self.next_global_batch()
        start = self.dp_rank * self.micro_size
        return batch[start : start + self.micro_size]

    def state_dict(self) -> Dict[str, int]:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "num_samples": self.num_samples,
            "global_batch_size": self.global_batch_size,
            "shuffle": int(self.shuffle),
        }

    def load_state_dict(self, state: Dict[str, int]) -> None:
        for key in ("seed", "num_samples", "global_batch_size", "shuffle"):
            mine = int(getattr(self, key))
            if key in state and int(state[key]) != mine:
                raise DataError(
                    f"cannot resume the data cursor: checkpoint has {key}={state[key]}, this run has {key}={mine}; "
                    "fix: resume with the same data and batch settings, or start a new run"
                )
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


class DataLoader:
    """Endless, resumable batches of a dataset for one data-parallel rank.

    `next_batch()` (or iteration) returns the dataset's batch type (PromptBatch, SequenceBatch or
    PreferenceBatch) holding this rank's `global_batch_size // dp_size` samples.
    """

    def __init__(
        self,
        dataset,
        global_batch_size: int,
        *,
        seed: int,
        pad_token_id: int,
        dp_rank: int = 0,
        dp_size: int = 1,
        shuffle: bool = True,
    ):
        self.dataset, self.pad_token_id = dataset, pad_token_id
        self.sampler = DistributedBatchSampler(
            len(dataset), global_batch_size, seed=seed, dp_rank=dp_rank, dp_size=dp_size, shuffle=shuffle
        )

    def next_batch(self):
        return self.dataset.collate(self.sampler.next_indices(), self.pad_token_id)

    def __iter__(self) -> Iterator:
        while True:
            yield self.next_batch()

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    def state_dict(self) -> Dict[str, int]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: Dict[str, int]) -> None:
        self.sampler.load_state_dict(state)


def eval_batches(dataset, global_batch_size: int, *, pad_token_id: int, dp_rank: int = 0, dp_size: int = 1) -> Iterator:
    """One ordered pass over a dataset (evaluation), sharded like training batches.

    Every rank gets the same number of equally sized batches (so collectives line up): the last
    global batch is filled by repeating indices from the start, and those filler samples have
    `valid == False`; metrics must weight by `valid`.
    """
    if dp_size <= 0 or global_batch_size <= 0 or global_batch_size % dp_size:
        raise ValueError(f"global_batch_size={global_batch_size} must be a positive multiple of dp_size={dp_size}")
    n = len(dataset)
    micro = global_batch_size // dp_size
    for start in range(0, n, global_batch_size):
        flat = list(range(start, start + global_batch_size))
        mine = flat[dp_rank * micro : (dp_rank + 1) * micro]
        yield dataset.collate([i % n for i in mine], pad_token_id, valid=[i < n for i in mine])
