"""Text and conversations -> token ids, the same way for every stage.

Two kinds of records (gil_megatron/data/records.py):

- Raw text (strings). Encoded with ``add_special_tokens=False``; the prompt gets the tokenizer's
  BOS in front (``add_bos``, unless it already starts with it or the tokenizer has none) and a
  response gets EOS appended (``add_eos``). The response ids are the tail of the whole text's
  encoding when the prompt's encoding is a prefix of it (so prompt + response == encode(prompt +
  response)); when a BPE merge crosses the join they cannot be both, and the prompt keeps its own
  encoding (it is what generation continues from) and the response is encoded on its own.
- Conversations (lists of {"role", "content"}). Formatted by the tokenizer's own chat template
  (``chat_template``: ``auto`` = the tokenizer's, ``none`` = refuse conversations, or a path to a
  Jinja file). The prompt is the template of the prompt messages with ``add_generation_prompt``;
  the response ids are what the template of the whole conversation adds after it, cut after its
  last EOS (the end-of-turn token generation stops at; EOS is appended when the template has
  none). So prompt + response is exactly the template's tokens of the whole conversation up to
  and including the end of the last turn. The template decides BOS (no extra one is added).

A string next to a conversation (a string response to a message-list prompt, or the reverse)
becomes one message: the prompt a "user" turn, a response an "assistant" turn.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import List, Optional, Sequence, Tuple

from gil_megatron.data.records import Messages, Text
from gil_megatron.data.sources import DataError

CHAT_TEMPLATE_CHOICES = ("auto", "none")


def prepare_tokenizer(tokenizer, chat_template: str = "auto"):
    """Apply ``chat_template`` (auto | none | PATH to a Jinja file) to the tokenizer; returns it."""
    if chat_template in ("auto", None):
        return tokenizer
    if chat_template == "none":
        tokenizer.chat_template = None
        return tokenizer
    if not os.path.isfile(chat_template):
        raise DataError(f"data.chat_template={chat_template}: no such file; fix: pass auto, none or a Jinja file")
    with open(chat_template, encoding="utf-8") as f:
        tokenizer.chat_template = f.read()
    return tokenizer


def tokenizer_fingerprint(tokenizer) -> str:
    """A short hash of everything that decides the ids we produce (vocabulary, merges, special
    tokens, chat template): part of the tokenization cache key."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update(backend.to_str().encode() if backend is not None else repr(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps([tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id,
                         getattr(tokenizer, "chat_template", None)], default=str).encode())
    return h.hexdigest()[:16]


class Encoder:
    """Encodes prompts and (prompt, response) pairs by the conventions above."""

    def __init__(self, tokenizer, *, add_bos: bool = True, add_eos: bool = True):
        self.tok = tokenizer
        self.bos = tokenizer.bos_token_id if add_bos else None
        self.eos = tokenizer.eos_token_id
        self.add_eos = add_eos
        if add_eos and self.eos is None:
            raise DataError("tokenizer has no eos_token; fix: set tokenizer.eos_token or pass add_eos=False")
        self.boundary_merges = 0  # raw-text pairs whose join a BPE merge crosses

    # -- raw text ---------------------------------------------------------------------------------
    def _encode(self, texts: List[str]) -> List[List[int]]:
        if not texts:
            return []
        return [list(ids) for ids in self.tok(texts, add_special_tokens=False)["input_ids"]]

    def _with_bos(self, ids: List[int]) -> List[int]:
        return ids if self.bos is None or (ids and ids[0] == self.bos) else [self.bos] + ids

    def _with_eos(self, ids: List[int]) -> List[int]:
        return ids + [self.eos] if self.add_eos else ids

    # -- conversations ----------------------------------------------------------------------------
    def _template(self, messages: Messages, *, generation_prompt: bool, where: str) -> List[int]:
        if not getattr(self.tok, "chat_template", None):
            raise DataError(f"{where}: a conversation (list of messages) but the tokenizer has no chat template; "
                            "fix: set data.chat_template to a Jinja file, or give plain strings")
        try:
            out = self.tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt)
        except Exception as exc:  # noqa: BLE001 - a template error names the record in one line
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise DataError(f"{where}: the chat template failed ({msg}); fix: check the messages' roles") from None
        if isinstance(out, dict) or hasattr(out, "keys"):  # BatchEncoding in some transformers versions
            out = out["input_ids"]
        return list(out)

    def _chat_pair(self, prompt: Messages, response: Messages, where: str) -> Tuple[List[int], List[int]]:
        p = self._template(prompt, generation_prompt=True, where=where)
        full = self._template(prompt + response, generation_prompt=False, where=where)
        if full[: len(p)] != p:
            raise DataError(
                f"{where}: the chat template of the prompt (with add_generation_prompt) is not a prefix of the "
                "template of the whole conversation; fix: use a template whose generation prompt opens the "
                "assistant turn exactly as the conversation does")
        r = full[len(p):]
        if self.eos is not None and self.eos in r:
            last = len(r) - 1 - r[::-1].index(self.eos)
            r = r[: last + 1]  # drop what a template writes after the end-of-turn token (e.g. "\n")
        elif self.add_eos:
            r = r + [self.eos]
        return p, r

    # -- public -----------------------------------------------------------------------------------
    def prompts(self, prompts: Sequence[Text], wheres: Sequence[str]) -> List[List[int]]:
        """Prompt ids for generation (BOS for text; the template's generation prompt for conversations)."""
        raw = [i for i, p in enumerate(prompts) if isinstance(p, str)]
        out: List[Optional[List[int]]] = [None] * len(prompts)
        for i, ids in zip(raw, self._encode([prompts[i] for i in raw])):
            out[i] = self._with_bos(ids)
        for i, p in enumerate(prompts):
            if not isinstance(p, str):
                out[i] = self._template(p, generation_prompt=True, where=wheres[i])
        return out  # type: ignore[return-value]

    def pairs(self, prompts: Sequence[Text], responses: Sequence[Text],
              wheres: Sequence[str]) -> Tuple[List[List[int]], List[List[int]]]:
        """(prompt ids, response ids) of each pair; response ids end with EOS."""
        n = len(prompts)
        p_out: List[Optional[List[int]]] = [None] * n
        r_out: List[Optional[List[int]]] = [None] * n
        raw = [i for i in range(n) if isinstance(prompts[i], str) and isinstance(responses[i], str)]
        if raw:
            p_ids = self._encode([prompts[i] for i in raw])
            full_ids = self._encode([prompts[i] + responses[i] for i in raw])  # type: ignore[operator]
            alone = None
            for k, i in enumerate(raw):
                p, full = p_ids[k], full_ids[k]
                if full[: len(p)] == p:
                    r = full[len(p):]
                else:  # a merge across the join: keep the prompt's own ids (generation's view)
                    self.boundary_merges += 1
                    if alone is None:
                        alone = dict(zip(raw, self._encode([responses[j] for j in raw])))  # type: ignore[misc]
                    r = alone[i]
                p_out[i], r_out[i] = self._with_bos(p), self._with_eos(r)
        for i in range(n):
            if p_out[i] is None:
                prompt, response = prompts[i], responses[i]
                if isinstance(prompt, str):
                    prompt = [{"role": "user", "content": prompt}]
                if isinstance(response, str):
                    response = [{"role": "assistant", "content": response}]
                p_out[i], r_out[i] = self._chat_pair(prompt, response, wheres[i])
        return p_out, r_out  # type: ignore[return-value]
