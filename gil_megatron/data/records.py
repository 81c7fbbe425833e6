"""The fields a stage takes from a record (read by gil_megatron/data/sources.py).

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

from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from gil_megatron.data.sources import DataError, Source

HH_ASSISTANT = "\n\nAssistant:"
KEY_ROLES = ("prompt", "response", "chosen", "rejected", "group")
DEFAULT_KEYS: Dict[str, str] = {role: role for role in KEY_ROLES}

Messages = List[Dict[str, str]]
Text = Union[str, Messages]  # raw text, or a conversation for the chat template


def resolve_keys(keys: Optional[Mapping[str, str]]) -> Dict[str, str]:
    """Role -> column name, defaults filled in; unknown roles are an error."""
    out = dict(DEFAULT_KEYS)
    for role, name in (keys or {}).items():
        if role not in DEFAULT_KEYS:
            raise DataError(f"data.keys.{role}: unknown key role; valid: {', '.join(KEY_ROLES)}")
        if name:
            out[role] = name
    return out


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
