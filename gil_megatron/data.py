"""Prompt, SFT and preference data: reading, tokenization, resumable sharded batching.

Sources (one record per JSON line, or one row of a Hugging Face dataset saved with
`save_to_disk`; pass `split=` for a DatasetDict). Extra fields are ignored.

    stage             accepted records                                   -> what is used
    PPO prompts       {"prompt"}                                          prompt
                      {"chosen", ...} HH-RLHF dialogue, no "prompt"       the dialogue up to the last "\\n\\nAssistant:"
    SFT               {"prompt", "response"}                              prompt, response
                      {"prompt", "chosen", ...}                           prompt, chosen
                      {"chosen", ...} HH-RLHF dialogue, no "prompt"       split at the last "\\n\\nAssistant:"
    reward model/DPO  {"prompt", "chosen", "rejected"}                    prompt, chosen, rejected
                      {"chosen", "rejected"} HH-RLHF dialogues            split both; their prompts must agree

Every record may carry "group" (a string, or null): a known group used only for per-group
metrics, never by the algorithm.

Token conventions (the same for every tokenizer, whatever its own post-processor does):
- Text is encoded with `add_special_tokens=False`; the loader then prepends the tokenizer's BOS
  to the prompt (`add_bos=True`, unless the encoded prompt already starts with it, or the
  tokenizer has none) and appends EOS to responses (`add_eos=True`). Prompt and response are
  encoded separately and concatenated, so the prompt's ids are identical in SFT, reward-model
  and PPO batches.
- `max_prompt_length` counts the BOS; `max_length` (SFT, pairs) counts prompt + response + EOS.
- A sequence over its limit is an error naming the file, line and length (`too_long="error"`,
  the default), or is dropped with one warning giving the count (`too_long="drop"`).

Batching: `DataLoader` draws global batches from a `DistributedBatchSampler` (a per-epoch
permutation from (seed, epoch), with an (epoch, position) cursor in `state_dict()` for resume)
and gives each data-parallel rank its contiguous slice. Tensors are right-padded with lengths.
Every problem with the data raises `DataError`, whose message is one line: where, what, the fix.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Literal, Optional, Sequence, Tuple

import torch

logger = logging.getLogger(__name__)

HH_ASSISTANT = "\n\nAssistant:"
TooLong = Literal["error", "drop"]


class DataError(ValueError):
    """A problem with a data file; the message is one line naming the file, the place and the fix."""


# --- reading records ------------------------------------------------------------------------


@dataclass(frozen=True)
class Record:
    """One raw record and where it came from (for error messages)."""

    fields: Dict[str, Any]
    source: str  # the path as given
    line: int  # 1-based line of a jsonl file, or 0-based row of a saved dataset
    is_row: bool = False  # True for a row of a saved dataset

    @property
    def where(self) -> str:
        return f"{self.source}: {'row' if self.is_row else 'line'} {self.line}"


def _is_saved_dataset(path: str) -> bool:
    return any(
        os.path.exists(os.path.join(path, name)) for name in ("dataset_info.json", "state.json", "dataset_dict.json")
    )


def read_records(path: str, *, split: Optional[str] = None) -> List[Record]:
    """All records of a .jsonl file or of a dataset saved with `datasets.save_to_disk`.

    Blank lines of a jsonl file are skipped (line numbers still count them).
    Raises DataError for a missing or empty source and for a line that is not a JSON object.
    """
    if not os.path.exists(path):
        raise DataError(
            f"{path}: no such file or directory; fix: pass a .jsonl file or a directory written by "
            "datasets' save_to_disk"
        )
    if os.path.isdir(path):
        if not _is_saved_dataset(path):
            raise DataError(
                f"{path}: directory is not a saved Hugging Face dataset (no dataset_info.json, state.json or "
                "dataset_dict.json); fix: pass a .jsonl file or a directory written by save_to_disk"
            )
        records = _read_saved_dataset(path, split)
    else:
        records = _read_jsonl(path)
    if not records:
        raise DataError(f"{path}: no records (the file is empty); fix: pass a file with at least one record")
    return records


def _read_jsonl(path: str) -> List[Record]:
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                raise DataError(
                    f"{path}: line {lineno}: not valid JSON ({e.msg} at column {e.colno}); "
                    "fix: each line must be one JSON object"
                ) from None
            if not isinstance(obj, dict):
                raise DataError(
                    f"{path}: line {lineno}: expected a JSON object, got {type(obj).__name__}; "
                    'fix: write one object per line, e.g. {"prompt": "..."}'
                )
            records.append(Record(obj, path, lineno))
    return records


def _read_saved_dataset(path: str, split: Optional[str]) -> List[Record]:
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is in requirements.txt
        raise DataError(f"{path}: reading a saved dataset needs the 'datasets' package; fix: pip install datasets") from None
    ds = datasets.load_from_disk(path)
    if isinstance(ds, datasets.DatasetDict):
        if split is None or split not in ds:
            what = "no split given" if split is None else f"no split {split!r}"
            raise DataError(f"{path}: a DatasetDict with splits {sorted(ds)} and {what}; fix: pass split=<one of them>")
        ds = ds[split]
        source = f"{path}[{split}]"
    else:
        source = path
    return [Record(dict(row), source, i, is_row=True) for i, row in enumerate(ds)]


# --- validating fields ----------------------------------------------------------------------


def _text(record: Record, name: str, fix: str) -> str:
    if name not in record.fields:
        raise DataError(
            f"{record.where}: missing field {name!r} (fields present: {sorted(record.fields)}); fix: {fix}"
        )
    value = record.fields[name]
    if not isinstance(value, str):
        raise DataError(
            f"{record.where}: field {name!r} must be a string, got {type(value).__name__}; fix: {fix}"
        )
    if not value.strip():
        raise DataError(f"{record.where}: field {name!r} is empty; fix: {fix}")
    return value


def _group(record: Record) -> Optional[str]:
    value = record.fields.get("group")
    if value is not None and not isinstance(value, str):
        raise DataError(
            f"{record.where}: field 'group' must be a string or null, got {type(value).__name__}; "
            "fix: write the group name as a string, or leave the field out"
        )
    return value


def split_hh_dialogue(text: str, *, where: str = "<text>") -> Tuple[str, str]:
    """Split an HH-RLHF dialogue into (prompt, response) at its last "\\n\\nAssistant:" turn.

    The prompt keeps that turn marker ("...\\n\\nAssistant:"); the response is the rest (usually
    starting with a space). Raises DataError when there is no assistant turn.
    """
    cut = text.rfind(HH_ASSISTANT)
    if cut < 0:
        raise DataError(
            f"{where}: no '\\n\\nAssistant:' turn in the dialogue; fix: give HH-RLHF dialogues "
            "('\\n\\nHuman: ...\\n\\nAssistant: ...') or separate 'prompt' and 'response' fields"
        )
    cut += len(HH_ASSISTANT)
    return text[:cut], text[cut:]


_PROMPT_FIX = 'give each record a "prompt" string (or an HH-RLHF "chosen" dialogue)'
_SFT_FIX = 'give "prompt" and "response" strings (or an HH-RLHF "chosen" dialogue)'
_PAIR_FIX = 'give "prompt", "chosen" and "rejected" strings (or HH-RLHF "chosen"/"rejected" dialogues)'


def _prompt_of(record: Record) -> str:
    if "prompt" in record.fields or "chosen" not in record.fields:
        return _text(record, "prompt", _PROMPT_FIX)
    return split_hh_dialogue(_text(record, "chosen", _PROMPT_FIX), where=f"{record.where}: field 'chosen'")[0]


def _sft_pair_of(record: Record) -> Tuple[str, str]:
    if "prompt" in record.fields:
        prompt = _text(record, "prompt", _SFT_FIX)
        if "response" in record.fields or "chosen" not in record.fields:
            return prompt, _text(record, "response", _SFT_FIX)
        return prompt, _text(record, "chosen", _SFT_FIX)
    if "chosen" in record.fields and "response" not in record.fields:
        return split_hh_dialogue(_text(record, "chosen", _SFT_FIX), where=f"{record.where}: field 'chosen'")
    return _text(record, "prompt", _SFT_FIX), ""  # raises: missing 'prompt'


def _preference_of(record: Record) -> Tuple[str, str, str]:
    if "prompt" in record.fields:
        prompt = _text(record, "prompt", _PAIR_FIX)
        return prompt, _text(record, "chosen", _PAIR_FIX), _text(record, "rejected", _PAIR_FIX)
    chosen_dialogue = _text(record, "chosen", _PAIR_FIX)
    rejected_dialogue = _text(record, "rejected", _PAIR_FIX)
    prompt, chosen = split_hh_dialogue(chosen_dialogue, where=f"{record.where}: field 'chosen'")
    prompt_r, rejected = split_hh_dialogue(rejected_dialogue, where=f"{record.where}: field 'rejected'")
    if prompt != prompt_r:
        raise DataError(
            f"{record.where}: 'chosen' and 'rejected' dialogues differ before their last '\\n\\nAssistant:' turn; "
            "fix: both must continue the same conversation (or give an explicit 'prompt')"
        )
    return prompt, chosen, rejected


# --- tokenization ---------------------------------------------------------------------------


def _encode(tokenizer, texts: List[str]) -> List[List[int]]:
    if not texts:
        return []
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def _with_bos(ids: List[int], bos: Optional[int]) -> List[int]:
    return ids if bos is None or (ids and ids[0] == bos) else [bos] + ids


def _special_ids(tokenizer, add_bos: bool, add_eos: bool) -> Tuple[Optional[int], Optional[int]]:
    bos = tokenizer.bos_token_id if add_bos else None
    eos = tokenizer.eos_token_id if add_eos else None
    if add_eos and eos is None:
        raise DataError("tokenizer has no eos_token; fix: set tokenizer.eos_token or pass add_eos=False")
    return bos, eos


def pad_token_id(tokenizer) -> int:
    """The id used for right padding: the tokenizer's pad token, else its EOS (Llama has no pad)."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    raise DataError("tokenizer has neither pad_token nor eos_token; fix: set tokenizer.pad_token")


class _LengthPolicy:
    """Applies `too_long` to each record and logs the dropped count once."""

    def __init__(self, too_long: TooLong, what: str, source: str):
        if too_long not in ("error", "drop"):
            raise ValueError(f"too_long must be 'error' or 'drop', got {too_long!r}")
        self.too_long, self.what, self.source, self.dropped = too_long, what, source, 0

    def keep(self, record: Record, length: int, limit: int, limit_name: str) -> bool:
        if length <= limit:
            return True
        if self.too_long == "error":
            raise DataError(
                f"{record.where}: {self.what} is {length} tokens, longer than {limit_name}={limit}; "
                f"fix: raise {limit_name} or pass too_long='drop' to skip such records"
            )
        self.dropped += 1
        return False

    def finish(self, kept: int) -> None:
        if self.dropped:
            logger.warning(
                "%s: dropped %d of %d records whose %s exceeded the length limit (too_long='drop')",
                self.source, self.dropped, self.dropped + kept, self.what,
            )
        if kept == 0:
            raise DataError(
                f"{self.source}: every record was dropped as too long; fix: raise the length limit"
            )


# --- datasets -------------------------------------------------------------------------------


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
    prompts: List[str]  # the raw prompt text (for reward functions on text)
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


@dataclass
class PromptDataset:
    """Tokenized prompts (BOS included)."""

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
    """Tokenized (prompt, response) pairs; prompt_ids with BOS, response_ids with EOS."""

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
    """Tokenized preference pairs; prompt_ids with BOS, chosen/rejected ids with EOS."""

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


def _valid(indices: Sequence[int], valid: Optional[Sequence[bool]]) -> torch.Tensor:
    if valid is None:
        return torch.ones(len(indices), dtype=torch.bool)
    return torch.tensor(list(valid), dtype=torch.bool)


def load_prompts(
    path: str,
    tokenizer,
    *,
    max_prompt_length: int,
    too_long: TooLong = "error",
    add_bos: bool = True,
    split: Optional[str] = None,
) -> PromptDataset:
    """Read and tokenize PPO prompts ({"prompt"} or HH-RLHF dialogues; optional "group")."""
    records = read_records(path, split=split)
    prompts = [_prompt_of(r) for r in records]
    groups = [_group(r) for r in records]
    bos, _ = _special_ids(tokenizer, add_bos, False)
    ids = [_with_bos(x, bos) for x in _encode(tokenizer, prompts)]
    policy = _LengthPolicy(too_long, "prompt", path)
    keep = [i for i, r in enumerate(records) if policy.keep(r, len(ids[i]), max_prompt_length, "max_prompt_length")]
    policy.finish(len(keep))
    return PromptDataset(
        [ids[i] for i in keep], [prompts[i] for i in keep], [groups[i] for i in keep], path, policy.dropped
    )


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
) -> SFTDataset:
    """Read and tokenize SFT demonstrations ({"prompt","response"}, {"prompt","chosen"} or HH "chosen")."""
    records = read_records(path, split=split)
    pairs = [_sft_pair_of(r) for r in records]
    groups = [_group(r) for r in records]
    bos, eos = _special_ids(tokenizer, add_bos, add_eos)
    prompt_ids = [_with_bos(x, bos) for x in _encode(tokenizer, [p for p, _ in pairs])]
    response_ids = [x + ([eos] if eos is not None else []) for x in _encode(tokenizer, [r for _, r in pairs])]
    policy = _LengthPolicy(too_long, "prompt + response", path)
    keep = []
    for i, r in enumerate(records):
        if max_prompt_length is not None and not policy.keep(
            r, len(prompt_ids[i]), max_prompt_length, "max_prompt_length"
        ):
            continue
        if policy.keep(r, len(prompt_ids[i]) + len(response_ids[i]), max_length, "max_length"):
            keep.append(i)
    policy.finish(len(keep))
    return SFTDataset(
        [prompt_ids[i] for i in keep], [response_ids[i] for i in keep], [groups[i] for i in keep], path, policy.dropped
    )


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
) -> PreferenceDataset:
    """Read and tokenize preference pairs ({"prompt","chosen","rejected"} or HH-RLHF dialogues).

    `max_length` bounds prompt + the longer of the two responses (EOS included).
    """
    records = read_records(path, split=split)
    triples = [_preference_of(r) for r in records]
    groups = [_group(r) for r in records]
    bos, eos = _special_ids(tokenizer, add_bos, add_eos)
    tail = [eos] if eos is not None else []
    prompt_ids = [_with_bos(x, bos) for x in _encode(tokenizer, [t[0] for t in triples])]
    chosen_ids = [x + tail for x in _encode(tokenizer, [t[1] for t in triples])]
    rejected_ids = [x + tail for x in _encode(tokenizer, [t[2] for t in triples])]
    policy = _LengthPolicy(too_long, "prompt + response", path)
    keep = []
    for i, r in enumerate(records):
        if max_prompt_length is not None and not policy.keep(
            r, len(prompt_ids[i]), max_prompt_length, "max_prompt_length"
        ):
            continue
        longest = len(prompt_ids[i]) + max(len(chosen_ids[i]), len(rejected_ids[i]))
        if policy.keep(r, longest, max_length, "max_length"):
            keep.append(i)
    policy.finish(len(keep))
    return PreferenceDataset(
        [prompt_ids[i] for i in keep], [chosen_ids[i] for i in keep], [rejected_ids[i] for i in keep],
        [groups[i] for i in keep], path, policy.dropped,
    )


# --- sampling and batching -------------------------------------------------------------------


class DistributedBatchSampler:
    """Deterministic, resumable global batches of indices, sharded over data-parallel ranks.

    Epoch e visits the dataset in the order `torch.randperm(n, generator=seed + e)` (or 0..n-1
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
                g = torch.Generator().manual_seed(self.seed + self.epoch)
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
