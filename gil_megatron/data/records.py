"""Reading data sources with Hugging Face `datasets`, and the fields a stage takes from a record.

Sources (`read_table`):

    a file      .jsonl / .json (JSON lines or one JSON array), .parquet, .csv, .tsv; any of them
                compressed (.gz, .bz2, .xz, .zst), read by `datasets.load_dataset`
    a directory written by `Dataset.save_to_disk` or `DatasetDict.save_to_disk` (`load_from_disk`)
    PATH:SPLIT  a split of a saved DatasetDict (overrides `split=`)

A DatasetDict needs a split (`data.split`, or the `:SPLIT` suffix) unless it has only one.

Records (one row each; extra columns are ignored). The column names are configurable (`keys`:
data.keys.prompt / response / chosen / rejected / group in the config):

    stage             accepted records                                   -> what is used
    PPO prompts       {prompt}                                            prompt
                      {chosen, ...} dialogue, no prompt                   the dialogue without its last reply
    SFT               {prompt, response}                                  prompt, response
                      {prompt, chosen, ...}                               prompt, chosen
                      {chosen, ...} dialogue, no prompt                   split before the last reply
    reward model/DPO  {prompt, chosen, rejected}                          prompt, chosen, rejected
                      {chosen, rejected} dialogues                        split both; their prompts must agree

A text field is either a string or a conversation: a list of {"role", "content"} messages (then
the tokenizer's chat template formats it: gil_megatron/data/chat.py). A string dialogue is split
at its last "\\n\\nAssistant:" turn (HH-RLHF); a conversation before its last message, which must
be the assistant's. Every record may carry a group (a string, or null): a known group used only
for per-group metrics, never by the algorithm.

Every problem raises `DataError` with one line: the file and line (or row), what is wrong, the fix.
"""

from __future__ import annotations

import gzip
import json
import os
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

HH_ASSISTANT = "\n\nAssistant:"
KEY_ROLES = ("prompt", "response", "chosen", "rejected", "group")
DEFAULT_KEYS: Dict[str, str] = {role: role for role in KEY_ROLES}

Messages = List[Dict[str, str]]
Text = Union[str, Messages]  # raw text, or a conversation for the chat template

# extension (after any compression suffix is removed) -> the `datasets` builder that reads it
_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".tsv": "csv"}
_COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")
_LINE_FORMATS = (".jsonl",)  # formats whose records are lines (errors say "line N")


class DataError(ValueError):
    """A problem with a data file; the message is one line naming the file, the place and the fix."""


def resolve_keys(keys: Optional[Mapping[str, str]]) -> Dict[str, str]:
    """Role -> column name, defaults filled in; unknown roles are an error."""
    out = dict(DEFAULT_KEYS)
    for role, name in (keys or {}).items():
        if role not in DEFAULT_KEYS:
            raise DataError(f"data.keys.{role}: unknown key role; valid: {', '.join(KEY_ROLES)}")
        if name:
            out[role] = name
    return out


# --- sources ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """Where records come from: the path as given, the split, and how rows map to lines."""

    path: str
    split: Optional[str] = None
    kind: str = "file"  # file | saved
    line_based: bool = False  # rows are the non-blank lines of the file

    @property
    def name(self) -> str:
        return f"{self.path}[{self.split}]" if self.kind == "saved" and self.split else self.path

    def where(self, row: int) -> str:
        """'PATH: line N' (1-based, blank lines counted) for line files, else 'PATH: row N' (0-based)."""
        if self.line_based:
            return f"{self.name}: line {_line_of_row(self.path, row)}"
        return f"{self.name}: row {row}"


def _is_saved_dataset(path: str) -> bool:
    return any(os.path.exists(os.path.join(path, n)) for n in ("dataset_info.json", "state.json", "dataset_dict.json"))


def _strip_compression(path: str) -> Tuple[str, Optional[str]]:
    for ext in _COMPRESSIONS:
        if path.endswith(ext):
            return path[: -len(ext)], ext
    return path, None


def _open_text(path: str):
    base, comp = _strip_compression(path)
    if comp == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    if comp == ".bz2":
        import bz2

        return bz2.open(path, "rt", encoding="utf-8")
    if comp == ".xz":
        import lzma

        return lzma.open(path, "rt", encoding="utf-8")
    if comp == ".zst":  # pragma: no cover - needs the optional zstandard package
        import io

        import zstandard

        return io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(open(path, "rb")), encoding="utf-8")
    return open(path, encoding="utf-8")


def _line_of_row(path: str, row: int) -> int:
    """The 1-based line of the row-th non-blank line (only computed for an error message)."""
    seen = -1
    with _open_text(path) as f:
        for lineno, text in enumerate(f, start=1):
            if text.strip():
                seen += 1
                if seen == row:
                    return lineno
    return row + 1


def parse_source(spec: str, split: Optional[str] = None) -> Source:
    """'PATH' or 'PATH:SPLIT' -> Source; checks that it exists and that its format is readable."""
    path = spec
    if not os.path.exists(spec) and ":" in spec:
        head, _, tail = spec.rpartition(":")
        if os.path.isdir(head) and tail:
            path, split = head, tail
    if not os.path.exists(path):
        raise DataError(
            f"{spec}: no such file or directory; fix: pass a .jsonl/.json/.parquet/.csv file (optionally .gz) "
            "or a directory written by datasets' save_to_disk"
        )
    if os.path.isdir(path):
        if not _is_saved_dataset(path):
            raise DataError(
                f"{path}: directory is not a saved Hugging Face dataset (no dataset_info.json, state.json or "
                "dataset_dict.json); fix: pass a data file or a directory written by save_to_disk"
            )
        return Source(path, split, "saved")
    base, _ = _strip_compression(path)
    ext = os.path.splitext(base)[1].lower()
    if ext not in _BUILDERS:
        raise DataError(
            f"{path}: unknown data format {ext or '(no extension)'!r}; fix: use one of "
            f"{', '.join(sorted(_BUILDERS))} (optionally compressed: {', '.join(_COMPRESSIONS)})"
        )
    return Source(path, split, "file", line_based=ext in _LINE_FORMATS or (ext == ".json" and _looks_like_lines(path)))


def _is_blank(path: str) -> bool:
    with _open_text(path) as f:
        while True:
            chunk = f.read(1 << 16)
            if not chunk:
                return True
            if chunk.strip():
                return False


def _looks_like_lines(path: str) -> bool:
    with _open_text(path) as f:
        for text in f:
            if text.strip():
                return text.lstrip().startswith("{")
    return False


def read_table(source: Source):
    """The source as a `datasets.Dataset` (no tokenization). One-line DataError on any failure."""
    import datasets

    if source.kind == "saved":
        ds = datasets.load_from_disk(source.path)
        if isinstance(ds, datasets.DatasetDict):
            splits = sorted(ds)
            if source.split is None and len(splits) == 1:
                return ds[splits[0]]
            if source.split is None or source.split not in ds:
                what = "no split given" if source.split is None else f"no split {source.split!r}"
                raise DataError(f"{source.path}: a DatasetDict with splits {splits} and {what}; "
                                f"fix: pass split=<one of them> (data.split, or PATH:SPLIT)")
            return ds[source.split]
        return ds
    base, _ = _strip_compression(source.path)
    builder = _BUILDERS[os.path.splitext(base)[1].lower()]
    if builder in ("json", "csv") and _is_blank(source.path):
        raise DataError(f"{source.path}: no records (the file is empty); fix: pass a file with at least one record")
    kwargs = {"delimiter": "\t"} if base.lower().endswith(".tsv") else {}
    try:
        dd = datasets.load_dataset(builder, data_files={"train": os.path.abspath(source.path)}, **kwargs)
    except Exception as exc:  # noqa: BLE001 - any reader failure becomes one line below
        if source.line_based or builder == "json":
            _diagnose_json(source)  # raises with the offending line when it can find it
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"{source.path}: cannot read it as {builder} ({first}); fix: check the file's format") from None
    ds = dd["train"]
    if source.split not in (None, "train"):
        raise DataError(f"{source.path}: a data file has one split, 'train', not {source.split!r}; "
                        "fix: unset data.split for files")
    return ds


def _diagnose_json(source: Source) -> None:
    """Scan a JSON-lines file in Python to name the line that the fast reader choked on."""
    try:
        f = _open_text(source.path)
    except OSError:
        return
    with f:
        for lineno, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                if lineno == 1 and text.lstrip().startswith("["):
                    return  # a JSON array file: not line-based
                raise DataError(
                    f"{source.path}: line {lineno}: not valid JSON ({e.msg} at column {e.colno}); "
                    "fix: each line must be one JSON object"
                ) from None
            if not isinstance(obj, dict):
                raise DataError(
                    f"{source.path}: line {lineno}: expected a JSON object, got {type(obj).__name__}; "
                    'fix: write one object per line, e.g. {"prompt": "..."}'
                )
    # every line parses: the failure is a column whose type changes between rows
    _diagnose_types(source)


def _diagnose_types(source: Source) -> None:
    first_type: Dict[str, Tuple[str, int]] = {}
    with _open_text(source.path) as f:
        for lineno, text in enumerate(f, start=1):
            if not text.strip():
                continue
            for key, value in json.loads(text).items():
                if value is None:
                    continue
                kind = type(value).__name__
                if key not in first_type:
                    first_type[key] = (kind, lineno)
                elif first_type[key][0] != kind:
                    want, at = first_type[key]
                    raise DataError(
                        f"{source.path}: line {lineno}: field {key!r} must be a {want} (as on line {at}), got {kind}; "
                        f"fix: give {key!r} one type in every record (text fields: a string or a list of messages)"
                    )


def read_records(path: str, *, split: Optional[str] = None) -> List["Record"]:
    """All records of a source as plain dicts with their place (small data, tests, inspection).

    Raises DataError for a missing, unreadable or empty source."""
    source = parse_source(path, split)
    table = read_table(source)
    if len(table) == 0:
        raise DataError(f"{path}: no records (the file is empty); fix: pass a file with at least one record")
    return [Record(dict(row), source, i) for i, row in enumerate(table)]


@dataclass(frozen=True)
class Record:
    """One raw record and where it came from (for error messages)."""

    fields: Dict[str, Any]
    source: Source
    row: int

    @property
    def where(self) -> str:
        return self.source.where(self.row)


def iter_rows(batch: Mapping[str, Sequence[Any]]) -> Iterator[Dict[str, Any]]:
    """A `datasets` batch (column -> values) as rows, leaving out null fields (a column that a
    JSON-lines row did not have is null in that row)."""
    columns = list(batch)
    n = len(batch[columns[0]]) if columns else 0
    for i in range(n):
        yield {c: batch[c][i] for c in columns if batch[c][i] is not None}


# --- fields of one record ---------------------------------------------------------------------


class Fields:
    """Takes the stage's fields from one record (a dict without null values), with one-line errors."""

    def __init__(self, row: Dict[str, Any], where: str, keys: Mapping[str, str]):
        self.row, self.where, self.keys = row, where, keys

    def _fail(self, what: str, fix: str) -> DataError:
        return DataError(f"{self.where}: {what}; fix: {fix}")

    def has(self, role: str) -> bool:
        return self.keys[role] in self.row

    def text(self, role: str, fix: str) -> Text:
        name = self.keys[role]
        if name not in self.row:
            raise self._fail(f"missing field {name!r} (fields present: {sorted(self.row)})", fix)
        value = self.row[name]
        if isinstance(value, str):
            if not value.strip():
                raise self._fail(f"field {name!r} is empty", fix)
            return value
        if isinstance(value, list):
            return self._messages(name, value, fix)
        raise self._fail(f"field {name!r} must be a string, got {type(value).__name__}", fix)

    def _messages(self, name: str, value: list, fix: str) -> Messages:
        if not value:
            raise self._fail(f"field {name!r} is an empty conversation", fix)
        out = []
        for i, m in enumerate(value):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise self._fail(
                    f"field {name!r} message {i} must be {{'role': str, 'content': str}}, got {m!r:.80}",
                    "write conversations as lists of {\"role\": ..., \"content\": ...}")
            out.append({"role": m["role"], "content": m["content"]})
        return out

    def group(self) -> Optional[str]:
        name = self.keys["group"]
        value = self.row.get(name)
        if value is not None and not isinstance(value, str):
            raise self._fail(f"field {name!r} must be a string or null, got {type(value).__name__}",
                             "write the group name as a string, or leave the field out")
        return value

    def split_dialogue(self, role: str, fix: str) -> Tuple[Text, Text]:
        """A whole dialogue in one field -> (everything before the last reply, the last reply)."""
        value = self.text(role, fix)
        where = f"{self.where}: field {self.keys[role]!r}"
        if isinstance(value, str):
            return split_hh_dialogue(value, where=where)
        if len(value) < 2 or value[-1]["role"] != "assistant":
            raise DataError(f"{where}: a conversation must end with an assistant message after at least one "
                            f"other message to be split into prompt and response; fix: {fix}")
        return value[:-1], value[-1:]


def split_hh_dialogue(text: str, *, where: str = "<text>") -> Tuple[str, str]:
    """Split an HH-RLHF dialogue into (prompt, response) at its last "\\n\\nAssistant:" turn.

    The prompt keeps that turn marker ("...\\n\\nAssistant:"); the response is the rest (usually
    starting with a space). Raises DataError when there is no assistant turn.
    """
    cut = text.rfind(HH_ASSISTANT)
    if cut < 0:
        raise DataError(
            f"{where}: no '\\n\\nAssistant:' turn in the dialogue; fix: give HH-RLHF dialogues "
            "('\\n\\nHuman: ...\\n\\nAssistant: ...') or separate prompt and response fields"
        )
    cut += len(HH_ASSISTANT)
    return text[:cut], text[cut:]


def _fixes(keys: Mapping[str, str]) -> Dict[str, str]:
    p, r, c, j = (keys[k] for k in ("prompt", "response", "chosen", "rejected"))
    return {
        "prompt": f"give each record a {p!r} string or conversation (or a {c!r} dialogue), or set data.keys.prompt",
        "sft": f"give {p!r} and {r!r} (or a {c!r} dialogue), or set data.keys.prompt / data.keys.response",
        "pair": f"give {p!r}, {c!r} and {j!r} (or {c!r}/{j!r} dialogues), or set data.keys.*",
    }


def prompt_of(f: Fields) -> Text:
    fix = _fixes(f.keys)["prompt"]
    if f.has("prompt") or not f.has("chosen"):
        return f.text("prompt", fix)
    return f.split_dialogue("chosen", fix)[0]


def sft_pair_of(f: Fields) -> Tuple[Text, Text]:
    fix = _fixes(f.keys)["sft"]
    if f.has("prompt"):
        prompt = f.text("prompt", fix)
        if f.has("response") or not f.has("chosen"):
            return prompt, f.text("response", fix)
        return prompt, f.text("chosen", fix)
    if f.has("chosen") and not f.has("response"):
        return f.split_dialogue("chosen", fix)
    f.text("prompt", fix)  # raises: missing prompt
    raise AssertionError("unreachable")


def preference_of(f: Fields) -> Tuple[Text, Text, Text]:
    fix = _fixes(f.keys)["pair"]
    if f.has("prompt"):
        return f.text("prompt", fix), f.text("chosen", fix), f.text("rejected", fix)
    f.text("chosen", fix), f.text("rejected", fix)  # both present and well-formed
    prompt, chosen = f.split_dialogue("chosen", fix)
    prompt_r, rejected = f.split_dialogue("rejected", fix)
    if prompt != prompt_r:
        c, j = f.keys["chosen"], f.keys["rejected"]
        raise DataError(
            f"{f.where}: {c!r} and {j!r} dialogues differ before their last reply; "
            f"fix: both must continue the same conversation (or give an explicit {f.keys['prompt']!r})"
        )
    return prompt, chosen, rejected


def check_columns(table, source: Source, keys: Mapping[str, str], needed: Sequence[Sequence[str]]) -> None:
    """Fail fast, before any row is read, when no accepted combination of columns is present.

    ``needed`` lists alternatives, each a list of roles (e.g. [["prompt"], ["chosen"]])."""
    columns = set(table.column_names)
    if any(all(keys[r] in columns for r in alt) for alt in needed):
        return
    options = " or ".join("+".join(repr(keys[r]) for r in alt) for alt in needed)
    missing = [r for r in needed[0] if keys[r] not in columns]
    spare = sorted(columns - set(keys.values()))
    example = (f"data.keys.{missing[0]}={spare[0]}" if missing and spare else "add the missing column")
    raise DataError(
        f"{source.name}: no column {options} (columns: {sorted(columns)}); "
        f"fix: rename the columns or set data.keys (e.g. {example})"
    )
