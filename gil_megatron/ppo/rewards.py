"""Python reward functions: ``module:function`` scorers run once per tensor/pipeline replica."""

import importlib
from typing import List

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from gil_megatron.parallel import collectives


class RewardFunction:
    """A Python reward ``module:function(prompts: list[str], responses: list[str]) -> list[float]``.

    Call it through ``shared()``: the first rank of each tensor/pipeline replica runs it and the
    scores (or its error) reach every rank of the replica, so a slow or stateful function runs once
    per data-parallel replica and a bad return value stops all ranks with the same message."""

    def __init__(self, spec: str):
        module_name, _, func_name = spec.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise ImportError(f"models.reward_fn={spec!r}: cannot import module {module_name!r} ({exc})") from None
        if not hasattr(module, func_name):
            raise ImportError(f"models.reward_fn={spec!r}: module {module_name!r} has no function {func_name!r}")
        self.spec = spec
        self.fn = getattr(module, func_name)

    def __call__(self, prompts: List[str], responses: List[str]) -> torch.Tensor:
        scores = self.fn(prompts, responses)
        try:
            scores = torch.as_tensor(scores, dtype=torch.float32).reshape(-1)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise ValueError(f"models.reward_fn={self.spec!r} must return a list of floats ({exc})") from None
        if scores.numel() != len(prompts):
            raise ValueError(f"models.reward_fn={self.spec!r} returned {scores.numel()} scores for "
                             f"{len(prompts)} responses; it must return one float per response")
        return scores  # non-finite scores are caught by the trainer's guard (skip + count)

    def shared(self, prompts: List[str], responses: List[str]) -> torch.Tensor:
        result = [None]
        if is_model_parallel_src():
            try:
                result[0] = self(prompts, responses)
            except Exception as exc:  # re-raised on every rank below
                result[0] = exc
        group = parallel_state.get_model_parallel_group()
        result = collectives.broadcast_object(result[0], dist.get_global_rank(group, 0), group)
        if isinstance(result, Exception):
            raise result
        return result


def is_model_parallel_src() -> bool:
    return dist.get_rank(parallel_state.get_model_parallel_group()) == 0
