"""Reading data sources with Hugging Face `datasets`.

Sources (`read_table`):

    a file      .jsonl / .json (JSON lines or one JSON array), .parquet, .csv, .tsv; any of them
                compressed (.gz, .bz2, .xz, .zst), read by `datasets.load_dataset`
    a directory written by `Dataset.save_to_disk` or `DatasetDict.save_to_disk` (`load_from_disk`)
    PATH:SPLIT  a split of a saved DatasetDict (overrides `split=`)

A DatasetDict needs a split (`data.split`, or the `:SPLIT` suffix) unless it has only one. What a
stage takes from each record is gil_megatron/data/records.py.

Every problem raises `DataError` with one line: the file and line (or row), what is wrong, the fix.
"""

from __future__ import annotations

import gzip
import json
import os
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

# extension (after any compression suffix is removed) -> the `datasets` builder that reads it
_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".tsv": "csv"}
_COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")
_LINE_FORMATS = (".jsonl",)  # formats whose records are lines (errors say "line N")


class DataError(ValueError):
    """A problem with a data file; the message is one line naming the file, the place and the fix."""


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
