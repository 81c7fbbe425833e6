#!/usr/bin/env python
r"""Write a freshly initialised Llama model directory (our format), ready for tools/train_sft.py.

    python tools/init_model.py --save-dir runs/miniature/init --tokenizer runs/miniature/data/tokenizer \
        --hidden-size 128 --intermediate-size 256 --num-layers 2 --num-attention-heads 4 \
        --num-kv-heads 2 --max-position-embeddings 64 [--tie-word-embeddings] [--role actor] --seed 0

The vocabulary size is the tokenizer's; the tokenizer files are copied into the model directory
(so later stages find them there). The weights are the same numbers whatever layout reads them
(written at --tp/--pp, default 1/1; any other layout reshards on load). The directory appears
atomically once complete.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gil_megatron.cli import run_cli  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--save-dir", required=True, help="output model directory (replaced atomically)")
    p.add_argument("--tokenizer", required=True, help="directory with tokenizer.json (sets the vocab size)")
    p.add_argument("--hidden-size", type=int, required=True)
    p.add_argument("--intermediate-size", type=int, required=True)
    p.add_argument("--num-layers", type=int, required=True)
    p.add_argument("--num-attention-heads", type=int, required=True)
    p.add_argument("--num-kv-heads", type=int, default=None, help="GQA key/value heads (default: attention heads)")
    p.add_argument("--max-position-embeddings", type=int, default=2048)
    p.add_argument("--rope-theta", type=float, default=10000.0)
    p.add_argument("--tie-word-embeddings", action="store_true")
    p.add_argument("--make-vocab-size-divisible-by", type=int, default=128,
                   help="vocab padding multiple (times tp); padded logits are -inf")
    p.add_argument("--role", default="actor", help="actor | critic | reward")
    p.add_argument("--num-groups", type=int, default=2, help="critic: GIL group-head outputs")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel layout to write")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel layout to write")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def count_parameters(arch, role: str) -> int:
    """Parameters of the HF-shaped model (embedding, layers, final norm, LM head or score head)."""
    h, f, d = arch.hidden_size, arch.intermediate_size, arch.head_dim
    layer = h * d * (2 * arch.num_attention_heads + 2 * arch.num_kv_heads) + 3 * h * f + 2 * h
    head = (0 if arch.tie_word_embeddings else arch.vocab_size * h) if role == "actor" else \
        h * arch.score_rows(role)
    return arch.vocab_size * h + arch.num_layers * layer + h + head


def main(argv=None):
    args = parse_args(argv)  # first: --help and usage errors answer without importing megatron
    from gil_megatron.models.build import load_tokenizer
    from gil_megatron.models.config import ROLES, LlamaArchConfig
    from gil_megatron.models.convert import copy_tokenizer_files, save_fresh_model

    if args.role not in ROLES:
        raise ValueError(f"--role {args.role!r} is not one of {list(ROLES)}")
    tokenizer = load_tokenizer(args.tokenizer)
    arch = LlamaArchConfig(
        vocab_size=len(tokenizer), hidden_size=args.hidden_size, intermediate_size=args.intermediate_size,
        num_layers=args.num_layers, num_attention_heads=args.num_attention_heads,
        num_kv_heads=args.num_kv_heads or args.num_attention_heads,
        max_position_embeddings=args.max_position_embeddings, rope_theta=args.rope_theta,
        tie_word_embeddings=args.tie_word_embeddings, make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
        num_groups=args.num_groups,
    )
    save_fresh_model(arch, args.role, args.save_dir, args.tp, args.pp, args.seed)
    copy_tokenizer_files(args.tokenizer, args.save_dir)
    n_params = count_parameters(arch, args.role)
    print(f"saved a fresh {args.role} (vocab {arch.vocab_size}, hidden {arch.hidden_size}, {arch.num_layers} layers, "
          f"{n_params / 1e6:.2f}M parameters, seed {args.seed}) to {args.save_dir}")


if __name__ == "__main__":
    run_cli(main)
