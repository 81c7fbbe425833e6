"""The miniature's vocabulary and its Hugging Face tokenizer.

Every token is a whitespace-separated word, so text and token ids correspond one to one:

    ids      <-> tokens          WordLevel model over the fixed vocabulary below
    tokens   <-> text            words joined by single spaces (WhitespaceSplit pre-tokenizer)

`decode(encode(text)) == text` holds exactly for any text that is a single-space-separated
sequence of vocabulary words (what the task writes); special tokens are dropped by
`decode(..., skip_special_tokens=True)`.

Conventions (the same as Llama tokenizers, so the engine treats the miniature like a real model):
- `tokenizer("COPY a b =")` (add_special_tokens=True) prepends `<bos>`; no `<eos>` is added.
  The data loader (gil_megatron/data/) encodes with add_special_tokens=False and adds `<bos>`
  itself, and appends `<eos>` to responses.
- `<pad>` has id 0 and is never produced by the task; `<unk>` maps words outside the vocabulary.

Layout of the 24 ids (ids are stable: the vocabulary is part of the task definition):

    0..3    <pad> <bos> <eos> <unk>          special tokens
    4..8    COPY SHIFT REV SORT REVSHIFT     one instruction token per prompt family (task.py)
    9       =                                ends the prompt; the answer follows
    10      idk                              the evasive answer ("I don't know")
    11..22  a b c d e f g h i j k l          content symbols (k, l are held out of RL: task.py)
    23      |                                reserved separator, unused by the task (keeps room for
                                             extensions without renumbering the symbols)
"""

from __future__ import annotations

import json
import os
from typing import Dict, List

from tokenizers import Tokenizer, models, pre_tokenizers, processors

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS: List[str] = [PAD, BOS, EOS, UNK]

# One instruction word per family, in the order of task.FAMILIES.
OP_TOKENS: List[str] = ["COPY", "SHIFT", "REV", "SORT", "REVSHIFT"]
SEP = "="
IDK = "idk"
SYMBOLS: List[str] = list("abcdefghijkl")
RESERVED: List[str] = ["|"]

VOCAB: List[str] = SPECIAL_TOKENS + OP_TOKENS + [SEP, IDK] + SYMBOLS + RESERVED
VOCAB_SIZE = len(VOCAB)  # 24


def vocab_dict() -> Dict[str, int]:
    """token -> id, in the fixed order of VOCAB."""
    return {tok: i for i, tok in enumerate(VOCAB)}


def build_tokenizer() -> Tokenizer:
    """The miniature's `tokenizers.Tokenizer`: WordLevel + whitespace split + `<bos>` template."""
    vocab = vocab_dict()
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(SPECIAL_TOKENS)  # ids already in the vocab: marks them special only
    # Llama convention: add_special_tokens=True prepends <bos>; pairs are not used by the task.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A",
        pair=f"{BOS} $A $B",
        special_tokens=[(BOS, vocab[BOS])],
    )
    # No decoder: tokenizers joins decoded tokens with single spaces, which is our text format.
    return tok


def save_tokenizer(out_dir: str) -> str:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json into `out_dir`.

    The directory loads with `transformers.AutoTokenizer.from_pretrained(out_dir)` or
    `PreTrainedTokenizerFast(tokenizer_file=os.path.join(out_dir, "tokenizer.json"))`.
    Returns `out_dir`.
    """
    os.makedirs(out_dir, exist_ok=True)
    build_tokenizer().save(os.path.join(out_dir, "tokenizer.json"))
    special = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "unk_token": UNK}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 32,
        "padding_side": "right",
    }
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)
        f.write("\n")
    with open(os.path.join(out_dir, "special_tokens_map.json"), "w") as f:
        json.dump(special, f, indent=2)
        f.write("\n")
    return out_dir
