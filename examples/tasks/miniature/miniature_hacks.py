"""The miniature's hack indicator: the evasive answer `idk`, which the flawed labeller (and so the
reward model) credits on hard families while its gold reward is 0 (gil_megatron/miniature/task.py)."""

from typing import List

from gil_megatron.miniature.task import parse_response
from gil_megatron.miniature.tokenizer import IDK


def evasive(prompts: List[str], responses: List[str]) -> List[float]:
    """1.0 where the response is exactly `idk`, else 0.0."""
    return [float(parse_response(r) == [IDK]) for r in responses]
