"""Tokenized prompt, SFT and preference datasets, and the batches they collate into.

    load_prompts / load_sft / load_preferences(path, tokenizer, ...)

read a source (gil_megatron/data/sources.py), take each record's fields (records.py), tokenize them
(gil_megatron/data/chat.py) with `datasets.map`, and apply the length policy:

- `max_prompt_length` counts the prompt's tokens (BOS or chat template included); `max_length`
  (SFT, pairs) counts prompt + response (EOS included; the longer response of a pair).
- A sequence over its limit is an error naming the file, line and length (`too_long="error"`,
  the default), or is dropped with one warning giving the count (`too_long="drop"`).

Tokenization runs once per node: local rank 0 (LOCAL_RANK, as torchrun sets it) reads and
tokenizes, writing an Arrow cache file named by a hash of the source (path, size, mtime), the
split, the keys, the tokenizer (vocabulary, merges, special tokens, chat template) and the token
options; the node's other ranks wait for it (a barrier when a process group is up, else the
file's appearance) and load it. A later run with the same inputs loads the cache directly.
Cache directory: `cache_dir`, else $GIL_MEGATRON_DATA_CACHE, else ~/.cache/gil_megatron/tokenized.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Literal, Mapping, Optional, Sequence, Tuple

import torch

from gil_megatron.data.chat import Encoder, prepare_tokenizer, tokenizer_fingerprint
from gil_megatron.data.records import Fields, check_columns, preference_of, prompt_of, resolve_keys, sft_pair_of
from gil_megatron.data.sources import DataError, Source, iter_rows, parse_source, read_table
from gil_megatron.parallel import collectives

logger = logging.getLogger("gil_megatron.data")

TOO_LONG_POLICIES = ("error", "drop")  # data.too_long
TooLong = Literal["error", "drop"]
CACHE_VERSION = 1  # bump when the tokenization conventions change


# --- batches ----------------------------------------------------------------------------------


def _pad(seqs: Sequence[Sequence[int]], pad_id: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to [b, s_max]; returns (ids [b, s], lengths [b])."""
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    out = torch.full((len(seqs), int(lengths.max()) if len(seqs) else 0), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return out, lengths


@dataclass
class PromptBatch:
    """Prompts for one rank. input_ids [b, s] right-padded with pad_token_id; lengths [b]."""

    input_ids: torch.Tensor
    lengths: torch.Tensor
    prompts: List[str]  # the raw prompt text (a conversation as JSON), for reports
    groups: List[Optional[str]]  # known groups, for per-group metrics only
    indices: List[int]  # dataset indices
    valid: torch.Tensor  # [b] bool; False marks padding repeats in the last eval batch

    def __len__(self) -> int:
        return len(self.indices)


@dataclass
class SequenceBatch:
    """Prompt + response sequences. input_ids [b, s] right-padded; lengths, prompt_lengths [b];
    response_mask [b, s] bool, True on the response tokens (EOS included)."""

    input_ids: torch.Tensor
    lengths: torch.Tensor
    prompt_lengths: torch.Tensor
    response_mask: torch.Tensor
    groups: List[Optional[str]]
    indices: List[int]
    valid: torch.Tensor

    def __len__(self) -> int:
        return len(self.indices)


@dataclass
class PreferenceBatch:
    """Chosen and rejected sequences of the same prompts, row i of each being one pair."""

    chosen: SequenceBatch
    rejected: SequenceBatch
    groups: List[Optional[str]]
    indices: List[int]
    valid: torch.Tensor

    def __len__(self) -> int:
        return len(self.indices)


def _sequences(prompts, responses, pad_id, groups, indices, valid) -> SequenceBatch:
    seqs = [p + r for p, r in zip(prompts, responses)]
    input_ids, lengths = _pad(seqs, pad_id)
    prompt_lengths = torch.tensor([len(p) for p in prompts], dtype=torch.long)
    pos = torch.arange(input_ids.shape[1])
    response_mask = (pos[None, :] >= prompt_lengths[:, None]) & (pos[None, :] < lengths[:, None])
    return SequenceBatch(input_ids, lengths, prompt_lengths, response_mask, groups, indices, valid)


def _valid(indices: Sequence[int], valid: Optional[Sequence[bool]]) -> torch.Tensor:
    if valid is None:
        return torch.ones(len(indices), dtype=torch.bool)
    return torch.tensor(list(valid), dtype=torch.bool)


# --- datasets ---------------------------------------------------------------------------------


@dataclass
class PromptDataset:
    """Tokenized prompts (BOS or chat template included)."""

    prompt_ids: List[List[int]]
    prompts: List[str]
    groups: List[Optional[str]]
    source: str
    dropped: int = 0

    def __len__(self) -> int:
        return len(self.prompt_ids)

    def group_names(self) -> List[str]:
        return sorted({g for g in self.groups if g is not None})

    def collate(self, indices: Sequence[int], pad_id: int, valid: Optional[Sequence[bool]] = None) -> PromptBatch:
        input_ids, lengths = _pad([self.prompt_ids[i] for i in indices], pad_id)
        return PromptBatch(
            input_ids, lengths, [self.prompts[i] for i in indices], [self.groups[i] for i in indices],
            list(indices), _valid(indices, valid),
        )


@dataclass
class SFTDataset:
    """Tokenized (prompt, response) pairs; response_ids end with EOS."""

    prompt_ids: List[List[int]]
    response_ids: List[List[int]]
    groups: List[Optional[str]]
    source: str
    dropped: int = 0

    def __len__(self) -> int:
        return len(self.prompt_ids)

    def collate(self, indices: Sequence[int], pad_id: int, valid: Optional[Sequence[bool]] = None) -> SequenceBatch:
        return _sequences(
            [self.prompt_ids[i] for i in indices], [self.response_ids[i] for i in indices], pad_id,
            [self.groups[i] for i in indices], list(indices), _valid(indices, valid),
        )


@dataclass
class PreferenceDataset:
    """Tokenized preference pairs; chosen/rejected ids end with EOS."""

    prompt_ids: List[List[int]]
    chosen_ids: List[List[int]]
    rejected_ids: List[List[int]]
    groups: List[Optional[str]]
    source: str
    dropped: int = 0

    def __len__(self) -> int:
        return len(self.prompt_ids)

    def collate(self, indices: Sequence[int], pad_id: int, valid: Optional[Sequence[bool]] = None) -> PreferenceBatch:
        prompts = [self.prompt_ids[i] for i in indices]
        groups = [self.groups[i] for i in indices]
        v = _valid(indices, valid)
        return PreferenceBatch(
            _sequences(prompts, [self.chosen_ids[i] for i in indices], pad_id, groups, list(indices), v),
            _sequences(prompts, [self.rejected_ids[i] for i in indices], pad_id, groups, list(indices), v),
            groups, list(indices), v,
        )


def pad_token_id(tokenizer) -> int:
    """The id used for right padding: the tokenizer's pad token, else its EOS (Llama has no pad)."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    raise DataError("tokenizer has neither pad_token nor eos_token; fix: set tokenizer.pad_token")


# --- tokenization with datasets.map (the functions run in map's workers: keep them picklable) ---


def _prompt_rows(batch, indices, source: Source, keys, encoder: Encoder):
    texts, groups, wheres = [], [], []
    for row, i in zip(iter_rows(batch), indices):
        f = Fields(row, source.where(i), keys)
        texts.append(prompt_of(f))
        groups.append(f.group())
        wheres.append(f.where)
    ids = encoder.prompts(texts, wheres)
    shown = [t if isinstance(t, str) else json.dumps(t, ensure_ascii=False) for t in texts]
    return {"prompt_ids": ids, "prompt": shown, "group": groups, "row": list(indices)}


def _sft_rows(batch, indices, source: Source, keys, encoder: Encoder):
    prompts, responses, groups, wheres = [], [], [], []
    for row, i in zip(iter_rows(batch), indices):
        f = Fields(row, source.where(i), keys)
        p, r = sft_pair_of(f)
        prompts.append(p), responses.append(r), groups.append(f.group()), wheres.append(f.where)
    p_ids, r_ids = encoder.pairs(prompts, responses, wheres)
    return {"prompt_ids": p_ids, "response_ids": r_ids, "group": groups, "row": list(indices)}


def _pair_rows(batch, indices, source: Source, keys, encoder: Encoder):
    prompts, chosen, rejected, groups, wheres = [], [], [], [], []
    for row, i in zip(iter_rows(batch), indices):
        f = Fields(row, source.where(i), keys)
        p, c, r = preference_of(f)
        prompts.append(p), chosen.append(c), rejected.append(r), groups.append(f.group()), wheres.append(f.where)
    p_ids, c_ids = encoder.pairs(prompts, chosen, wheres)
    p_ids_r, r_ids = encoder.pairs(prompts, rejected, wheres)
    for k, (a, b) in enumerate(zip(p_ids, p_ids_r)):
        if a != b:  # cannot happen with a deterministic template; guards a template that reads the reply
            raise DataError(f"{wheres[k]}: the prompt's tokens differ between chosen and rejected; "
                            "fix: use a chat template whose prompt part does not depend on the reply")
    return {"prompt_ids": p_ids, "chosen_ids": c_ids, "rejected_ids": r_ids, "group": groups, "row": list(indices)}


_KINDS = {
    # kind: (map function, accepted column combinations for the early check)
    "prompts": (_prompt_rows, [["prompt"], ["chosen"]]),
    "sft": (_sft_rows, [["prompt", "response"], ["prompt", "chosen"], ["chosen"]]),
    "pairs": (_pair_rows, [["prompt", "chosen", "rejected"], ["chosen", "rejected"]]),
}


def default_cache_dir() -> str:
    return os.environ.get("GIL_MEGATRON_DATA_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "gil_megatron", "tokenized")


def _source_identity(source: Source) -> Dict[str, Any]:
    if source.kind == "file":
        st = os.stat(source.path)
        return {"path": os.path.abspath(source.path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    # a saved dataset: its files' sizes and mtimes (a re-save changes them)
    files = []
    for root, _, names in sorted(os.walk(source.path)):
        for n in sorted(names):
            st = os.stat(os.path.join(root, n))
            files.append([os.path.relpath(os.path.join(root, n), source.path), st.st_size, st.st_mtime_ns])
    return {"path": os.path.abspath(source.path), "files": files}


def _local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def _wait_for(path: str, timeout_s: float = 4 * 3600.0) -> None:
    """Ranks other than the node's first: wait until local rank 0 has written the cache."""
    start = time.monotonic()
    while not os.path.exists(path):
        if time.monotonic() - start > timeout_s:
            raise DataError(f"{path}: local rank 0 did not write the tokenized data within {timeout_s:.0f} s; "
                            "fix: check rank 0's error, or set data.cache_dir to a directory every rank can read")
        time.sleep(0.2)


def tokenized_table(path: str, kind: str, tokenizer, *, keys: Optional[Mapping[str, str]] = None,
                    split: Optional[str] = None, add_bos: bool = True, add_eos: bool = True,
                    cache_dir: Optional[str] = None, num_proc: Optional[int] = None,
                    local_rank: Optional[int] = None):
    """The source tokenized for ``kind`` (prompts | sft | pairs) as a `datasets.Dataset`, once per node
    (see the module docstring). Columns: prompt_ids, [response_ids | chosen_ids, rejected_ids |
    prompt], group, row (the record's row in the source, for error messages)."""
    import datasets
    import torch.distributed as dist

    fn, needed = _KINDS[kind]
    add_eos = add_eos and kind != "prompts"  # prompts have no response: one cache entry either way
    keys = resolve_keys(keys)
    source = parse_source(path, split)
    encoder = Encoder(tokenizer, add_bos=add_bos, add_eos=add_eos)
    key = hashlib.sha256(json.dumps({
        "v": CACHE_VERSION, "kind": kind, "source": _source_identity(source), "split": source.split,
        "keys": keys, "tokenizer": tokenizer_fingerprint(tokenizer), "bos": add_bos, "eos": add_eos,
    }, sort_keys=True).encode()).hexdigest()[:24]
    cache_file = os.path.join(cache_dir or default_cache_dir(), f"{kind}-{key}.arrow")
    group_up = dist.is_available() and dist.is_initialized()
    builds = (_local_rank() if local_rank is None else local_rank) == 0
    table, error = None, None
    if builds:
        try:
            if os.path.exists(cache_file):
                table = datasets.Dataset.from_file(cache_file)
            else:
                table = _build(source, fn, needed, keys, encoder, cache_file, key, num_proc, path)
        except Exception as exc:  # the other ranks must hear of it, or they would wait here forever
            error = exc
    if group_up:  # releases the ranks that wait for the cache, and gives them rank 0's error if any
        errors = collectives.all_gather_object(None if error is None else str(error), collectives.world_group())
        first = next((e for e in errors if e is not None), None)
        if first is not None and error is None:
            raise DataError(first)
    if error is not None:
        raise error
    if builds:
        return table
    _wait_for(cache_file)  # without a process group (or a node-local cache): the file's appearance
    return datasets.Dataset.from_file(cache_file)


def _build(source: Source, fn, needed, keys, encoder: Encoder, cache_file: str, key: str,
           num_proc: Optional[int], path: str):
    table = read_table(source)
    if len(table) == 0:
        raise DataError(f"{path}: no records (the file is empty); fix: pass a file with at least one record")
    check_columns(table, source, keys, needed)
    os.makedirs(os.path.dirname(cache_file), exist_ok=True)
    return table.map(
        fn, batched=True, with_indices=True, remove_columns=table.column_names,
        fn_kwargs={"source": source, "keys": keys, "encoder": encoder},
        cache_file_name=cache_file, load_from_cache_file=True, new_fingerprint=key,
        num_proc=num_proc if num_proc and num_proc > 1 else None, desc=f"tokenizing {os.path.basename(path)}",
    )


# --- the length policy ------------------------------------------------------------------------


class _LengthPolicy:
    """Applies `too_long` to each record and logs the dropped count once."""

    def __init__(self, too_long: TooLong, what: str, source: Source):
        if too_long not in ("error", "drop"):
            raise ValueError(f"too_long must be 'error' or 'drop', got {too_long!r}")
        self.too_long, self.what, self.source, self.dropped = too_long, what, source, 0

    def keep(self, row: int, length: int, limit: int, limit_name: str) -> bool:
        if length <= limit:
            return True
        if self.too_long == "error":
            raise DataError(
                f"{self.source.where(row)}: {self.what} is {length} tokens, longer than {limit_name}={limit}; "
                f"fix: raise {limit_name} or pass too_long='drop' to skip such records"
            )
        self.dropped += 1
        return False

    def finish(self, kept: int) -> None:
        if self.dropped:
            logger.warning(
                "%s: dropped %d of %d records whose %s exceeded the length limit (too_long='drop')",
                self.source.name, self.dropped, self.dropped + kept, self.what,
            )
        if kept == 0:
            raise DataError(f"{self.source.name}: every record was dropped as too long; fix: raise the length limit")


def _common(path, tokenizer, kind, keys, split, chat_template, add_bos, add_eos, cache_dir, num_proc):
    prepare_tokenizer(tokenizer, chat_template)
    table = tokenized_table(path, kind, tokenizer, keys=keys, split=split, add_bos=add_bos, add_eos=add_eos,
                            cache_dir=cache_dir, num_proc=num_proc)
    return parse_source(path, split), table.to_dict()


def load_prompts(
    path: str,
    tokenizer,
    *,
    max_prompt_length: int,
    too_long: TooLong = "error",
    add_bos: bool = True,
    split: Optional[str] = None,
    keys: Optional[Mapping[str, str]] = None,
    chat_template: str = "auto",
    cache_dir: Optional[str] = None,
    num_proc: Optional[int] = None,
) -> PromptDataset:
    """Read and tokenize PPO prompts ({prompt} or dialogues; optional group)."""
    source, cols = _common(path, tokenizer, "prompts", keys, split, chat_template, add_bos, False, cache_dir, num_proc)
    policy = _LengthPolicy(too_long, "prompt", source)
    keep = [i for i, (ids, row) in enumerate(zip(cols["prompt_ids"], cols["row"]))
            if policy.keep(row, len(ids), max_prompt_length, "max_prompt_length")]
    policy.finish(len(keep))
    return PromptDataset([cols["prompt_ids"][i] for i in keep], [cols["prompt"][i] for i in keep],
                         [cols["group"][i] for i in keep], path, policy.dropped)


def _keep_pairs(cols, source, too_long, max_length, max_prompt_length, response_cols) -> Tuple[List[int], int]:
    policy = _LengthPolicy(too_long, "prompt + response", source)
    keep = []
    for i, (p, row) in enumerate(zip(cols["prompt_ids"], cols["row"])):
        if max_prompt_length is not None and not policy.keep(row, len(p), max_prompt_length, "max_prompt_length"):
            continue
        longest = len(p) + max(len(cols[c][i]) for c in response_cols)
        if policy.keep(row, longest, max_length, "max_length"):
            keep.append(i)
    policy.finish(len(keep))
    return keep, policy.dropped


def load_sft(
    path: str,
    tokenizer,
    *,
    max_length: int,
    max_prompt_length: Optional[int] = None,
    too_long: TooLong = "error",
    add_bos: bool = True,
    add_eos: bool = True,
    split: Optional[str] = None,
    keys: Optional[Mapping[str, str]] = None,
    chat_template: str = "auto",
    cache_dir: Optional[str] = None,
    num_proc: Optional[int] = None,
) -> SFTDataset:
    """Read and tokenize SFT demonstrations ({prompt, response}, {prompt, chosen} or a chosen dialogue)."""
    source, cols = _common(path, tokenizer, "sft", keys, split, chat_template, add_bos, add_eos, cache_dir, num_proc)
    keep, dropped = _keep_pairs(cols, source, too_long, max_length, max_prompt_length, ("response_ids",))
    return SFTDataset([cols["prompt_ids"][i] for i in keep], [cols["response_ids"][i] for i in keep],
                      [cols["group"][i] for i in keep], path, dropped)


def load_preferences(
    path: str,
    tokenizer,
    *,
    max_length: int,
    max_prompt_length: Optional[int] = None,
    too_long: TooLong = "error",
    add_bos: bool = True,
    add_eos: bool = True,
    split: Optional[str] = None,
    keys: Optional[Mapping[str, str]] = None,
    chat_template: str = "auto",
    cache_dir: Optional[str] = None,
    num_proc: Optional[int] = None,
) -> PreferenceDataset:
    """Read and tokenize preference pairs ({prompt, chosen, rejected} or chosen/rejected dialogues).

    `max_length` bounds prompt + the longer of the two responses (EOS included)."""
    source, cols = _common(path, tokenizer, "pairs", keys, split, chat_template, add_bos, add_eos, cache_dir,
                           num_proc)
    keep, dropped = _keep_pairs(cols, source, too_long, max_length, max_prompt_length, ("chosen_ids", "rejected_ids"))
    return PreferenceDataset([cols["prompt_ids"][i] for i in keep], [cols["chosen_ids"][i] for i in keep],
                             [cols["rejected_ids"][i] for i in keep], [cols["group"][i] for i in keep], path, dropped)


def options_from_config(data_cfg) -> Dict[str, Any]:
    """The loader keyword arguments that a config's data section sets (keys, split, chat template,
    cache, workers), so every stage passes them the same way."""
    keys = getattr(data_cfg, "keys", None)
    if keys is not None and not isinstance(keys, Mapping):
        keys = {f: getattr(keys, f) for f in ("prompt", "response", "chosen", "rejected", "group")}
    return {"keys": keys, "split": getattr(data_cfg, "split", None),
            "chat_template": getattr(data_cfg, "chat_template", "auto"),
            "cache_dir": getattr(data_cfg, "cache_dir", None), "num_proc": getattr(data_cfg, "num_proc", None)}
