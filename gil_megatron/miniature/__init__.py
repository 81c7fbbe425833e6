"""The embedded miniature of RLHF: a synthetic instruction language that a tiny Llama learns on a CPU.

Five prompt families of different difficulty (the known groups), a gold reward, a proxy reward
with planted flaws, held-out symbols for OOD evaluation, and a tokenizer the repo builds.
See task.py for the language and rewards and prepare.py for the data files; docs/design.md.

    python -m gil_megatron.miniature.prepare --out-dir runs/miniature/data --seed 0
    from gil_megatron.miniature.prepare import prepare   # the same, from Python

(`prepare` is not re-exported here: the package attribute of that name is the submodule.)
"""

from gil_megatron.miniature.task import (
    FAMILIES,
    FAMILY_NAMES,
    HELDOUT_SYMBOLS,
    answer,
    family_of,
    format_prompt,
    gold_reward,
    gold_score,
    proxy_reward,
    proxy_score,
)
from gil_megatron.miniature.tokenizer import VOCAB, VOCAB_SIZE, build_tokenizer, save_tokenizer

__all__ = [
    "FAMILIES",
    "FAMILY_NAMES",
    "HELDOUT_SYMBOLS",
    "VOCAB",
    "VOCAB_SIZE",
    "answer",
    "build_tokenizer",
    "family_of",
    "format_prompt",
    "gold_reward",
    "gold_score",
    "proxy_reward",
    "proxy_score",
    "save_tokenizer",
]

