"""Write the miniature's tokenizer and data sets (deterministic for a seed).

    python -m gil_megatron.miniature.prepare --out-dir runs/miniature/data [--seed 0]

writes, in about a second on one CPU core:

    tokenizer/            tokenizer.json + tokenizer_config.json + special_tokens_map.json
    sft.jsonl             {"prompt", "response", "group", "kind"}          demonstrations (imperfect)
    rm_train.jsonl        {"prompt", "chosen", "rejected", "group", ...}   pairs ranked by the PROXY
    rm_eval.jsonl         same, disjoint prompts
    prompts_train.jsonl   {"prompt", "group"}                              RL prompts
    prompts_eval.jsonl    {"prompt", "group"}                              in-distribution, held out
    prompts_ood.jsonl     {"prompt", "group"}                              contain a held-out symbol
    meta.json             the families, the OOD rule, the rewards, sizes and seed

Design of the data (see task.py for the language and the rewards):
- SFT demonstrations are imperfect on purpose, so that SFT ends good at easy families and poor at
  hard ones, as RLHF's real starting point is: hard families get fewer demos
  (`sft_hard_share` of them, split evenly: SFT_FAMILY_WEIGHTS), and the hard-family demonstrators
  are sloppy: a fraction `sft_truncate_rate` (0.6) of hard demos stops one symbol short, a
  fraction `sft_hard_noise` (0.2) has 1-2 wrong symbols, and a fraction `sft_evasive_rate` (0.03)
  answers `idk`, so the policy can discover evasion. The truncation is what gives RL headroom:
  the SFT policy learns the hard algorithms but, greedily, stops one symbol early, while the
  complete answer keeps a large share of its probability; a reward that pays for the whole answer
  (the gold reward) can move it there (benchmarks/results/headroom.md). SFT prompts use the full
  alphabet, held-out symbols included.
- Preference pairs: two candidate responses of different kinds (correct, partial, shuffled, echo,
  wrong, bad_length, evasive) for one prompt, ranked by the flawed proxy labeller; ties are
  redrawn. `rm_label_noise` optionally flips labels. Each pair records both kinds and the gold
  margin (gold(chosen) - gold(rejected)), so the reward model's agreement with the truth can be
  measured; a negative margin is a pair where the labeller is wrong.
- Prompt families are balanced in every prompt file; prompt order is shuffled.
- What SFT on it gives (the engine's 0.30M-parameter Llama, hidden 128, 2 layers, batch 64, lr
  3e-3, seed-0 data, TP=1): after 200 steps the hard families are not learnt (greedy gold ~0.5,
  one symbol short); after 600 steps (examples/configs/sft_miniature.yaml) greedy gold on
  prompts_eval is 1.0 on copy/shift, ~0.85 on reverse and reverse_shift (mostly exact but one
  symbol short) and ~0.7 on sort: the SFT budget sets where the gap sits.
- Disjointness: evaluation prompts (prompts_eval, rm_eval, prompts_ood) are unique and never occur
  in a training file (sft, rm_train, prompts_train). prompts_train/eval and rm_* never contain a
  held-out symbol; every prompts_ood prompt contains one.
"""

from __future__ import annotations

import argparse
import json
import os
import random
from typing import Dict, Iterable, List, Optional, Sequence, Set, Tuple

from gil_megatron.miniature import task
from gil_megatron.miniature.tokenizer import IDK, SYMBOLS, VOCAB, save_tokenizer


# Share of SFT demonstrations per family: the hard families get fewer.
def sft_family_weights(hard_share: float) -> Dict[str, float]:
    """Share of SFT demonstrations per family: `hard_share` split evenly over the hard families,
    the rest over the easy ones."""
    hard = [f.name for f in task.FAMILIES if f.difficulty == "hard"]
    easy = [f.name for f in task.FAMILIES if f.difficulty != "hard"]
    return {f.name: (hard_share / len(hard) if f.name in hard else (1.0 - hard_share) / len(easy))
            for f in task.FAMILIES}


SFT_HARD_SHARE = 0.4
SFT_FAMILY_WEIGHTS: Dict[str, float] = sft_family_weights(SFT_HARD_SHARE)
# How often each candidate kind is drawn for a preference pair (two distinct kinds per pair).
PAIR_KIND_WEIGHTS: Dict[str, float] = {
    "correct": 2.0,
    "partial": 2.0,
    "shuffled": 1.5,
    "echo": 1.0,
    "wrong": 1.5,
    "bad_length": 1.0,
    "evasive": 1.5,
}
FORMAT_VERSION = 1


def _rng(seed: int, stream: str) -> random.Random:
    # One independent stream per file: changing one size does not change the other files.
    # random.Random seeds from a str by hashing it with SHA-512: stable across runs and platforms.
    return random.Random(f"gil_megatron.miniature:{seed}:{stream}")


def _sample_prompts(
    rng: random.Random,
    n: int,
    symbols: Sequence[str],
    *,
    require: Sequence[str] = (),
    exclude: Set[str] = frozenset(),
    unique: bool = False,
) -> List[Tuple[str, str]]:
    """n (prompt, family) pairs, families balanced round-robin, then shuffled."""
    out: List[Tuple[str, str]] = []
    seen: Set[str] = set()
    for i in range(n):
        family = task.FAMILY_NAMES[i % len(task.FAMILY_NAMES)]
        for _ in range(10_000):
            prompt = task.format_prompt(family, task.sample_content(rng, symbols, require=require))
            if prompt not in exclude and not (unique and prompt in seen):
                break
        else:  # pragma: no cover - needs sizes far beyond the language's ~5e7 prompts
            raise RuntimeError(f"could not draw {n} distinct prompts; lower the requested size")
        seen.add(prompt)
        out.append((prompt, family))
    rng.shuffle(out)
    return out


def _sft_records(rng: random.Random, n: int, exclude: Set[str], hard_noise: float, evasive_rate: float,
                 truncate_rate: float = 0.0, hard_share: float = SFT_HARD_SHARE) -> List[dict]:
    family_weights = sft_family_weights(hard_share)
    names = list(family_weights)
    weights = [family_weights[k] for k in names]
    records = []
    for _ in range(n):
        family = rng.choices(names, weights)[0]
        while True:
            prompt = task.format_prompt(family, task.sample_content(rng, SYMBOLS))
            if prompt not in exclude:
                break
        kind = "correct"
        if task.get_family(family).difficulty == "hard":
            u = rng.random()
            if u < evasive_rate:
                kind = "evasive"
            elif u < evasive_rate + hard_noise:
                kind = "noisy"
            elif u < evasive_rate + hard_noise + truncate_rate:
                kind = "truncated"
        if kind == "noisy":
            response = task.format_response(task.corrupt(rng, task.answer(prompt), rng.randint(1, 2)))
        elif kind == "evasive":
            response = IDK
        elif kind == "truncated":  # a sloppy demonstrator stops one symbol short
            response = task.format_response(task.answer(prompt)[:-1])
        else:
            response = task.format_response(task.answer(prompt))
        records.append({"prompt": prompt, "response": response, "group": family, "kind": kind})
    return records


def _pair_records(rng: random.Random, prompts: Iterable[Tuple[str, str]], label_noise: float) -> List[dict]:
    kinds = list(PAIR_KIND_WEIGHTS)
    weights = [PAIR_KIND_WEIGHTS[k] for k in kinds]
    records = []
    for prompt, family in prompts:
        while True:
            kind_a = rng.choices(kinds, weights)[0]
            kind_b = rng.choices(kinds, weights)[0]
            if kind_a == kind_b:
                continue
            resp_a = task.sample_candidate(rng, kind_a, prompt)
            resp_b = task.sample_candidate(rng, kind_b, prompt)
            score_a, score_b = task.proxy_score(prompt, resp_a), task.proxy_score(prompt, resp_b)
            if resp_a != resp_b and score_a != score_b:
                break
        if score_b > score_a:
            kind_a, kind_b, resp_a, resp_b = kind_b, kind_a, resp_b, resp_a
        if label_noise > 0 and rng.random() < label_noise:
            kind_a, kind_b, resp_a, resp_b = kind_b, kind_a, resp_b, resp_a
        records.append(
            {
                "prompt": prompt,
                "chosen": resp_a,
                "rejected": resp_b,
                "group": family,
                "chosen_kind": kind_a,
                "rejected_kind": kind_b,
                "gold_margin": round(task.gold_score(prompt, resp_a) - task.gold_score(prompt, resp_b), 6),
            }
        )
    return records


def _write_jsonl(path: str, records: Iterable[dict]) -> int:
    n = 0
    with open(path, "w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
            n += 1
    return n


def prepare(
    out_dir: str,
    seed: int = 0,
    *,
    n_sft: int = 4000,
    n_prompts_train: int = 2000,
    n_prompts_eval: int = 250,
    n_prompts_ood: int = 250,
    n_rm_train: int = 4000,
    n_rm_eval: int = 500,
    sft_hard_noise: float = 0.2,
    sft_evasive_rate: float = 0.03,
    sft_truncate_rate: float = 0.6,
    sft_hard_share: float = SFT_HARD_SHARE,
    rm_label_noise: float = 0.0,
) -> dict:
    """Write the tokenizer and every data file into `out_dir`; return the meta dict (meta.json).

    Deterministic: the same arguments give byte-identical files.
    """
    sizes = {
        "sft": n_sft,
        "prompts_train": n_prompts_train,
        "prompts_eval": n_prompts_eval,
        "prompts_ood": n_prompts_ood,
        "rm_train": n_rm_train,
        "rm_eval": n_rm_eval,
    }
    for name, n in sizes.items():
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"size of {name} must be an int >= 0, got {n!r}")
    for name, p in [("sft_hard_noise", sft_hard_noise), ("sft_evasive_rate", sft_evasive_rate),
                    ("sft_truncate_rate", sft_truncate_rate), ("sft_hard_share", sft_hard_share),
                    ("rm_label_noise", rm_label_noise)]:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {p!r}")
    hard_total = sft_hard_noise + sft_evasive_rate + sft_truncate_rate
    if hard_total > 1.0:
        raise ValueError(f"sft_hard_noise + sft_evasive_rate + sft_truncate_rate must be <= 1, got {hard_total}")

    os.makedirs(out_dir, exist_ok=True)
    save_tokenizer(os.path.join(out_dir, "tokenizer"))

    # Evaluation prompts first: unique, and reserved so that no training file contains them.
    ood = _sample_prompts(_rng(seed, "prompts_ood"), n_prompts_ood, SYMBOLS,
                          require=task.HELDOUT_SYMBOLS, unique=True)
    reserved = {p for p, _ in ood}
    prompts_eval = _sample_prompts(_rng(seed, "prompts_eval"), n_prompts_eval, task.RL_SYMBOLS,
                                   exclude=reserved, unique=True)
    reserved |= {p for p, _ in prompts_eval}
    rm_eval_prompts = _sample_prompts(_rng(seed, "rm_eval"), n_rm_eval, task.RL_SYMBOLS,
                                      exclude=reserved, unique=True)
    reserved |= {p for p, _ in rm_eval_prompts}
    prompts_train = _sample_prompts(_rng(seed, "prompts_train"), n_prompts_train, task.RL_SYMBOLS,
                                    exclude=reserved)
    rm_train_prompts = _sample_prompts(_rng(seed, "rm_train"), n_rm_train, task.RL_SYMBOLS, exclude=reserved)

    def prompt_records(items):
        return ({"prompt": p, "group": g} for p, g in items)

    join = lambda name: os.path.join(out_dir, name)  # noqa: E731
    _write_jsonl(join("sft.jsonl"),
                 _sft_records(_rng(seed, "sft"), n_sft, reserved, sft_hard_noise, sft_evasive_rate,
                              sft_truncate_rate, sft_hard_share))
    _write_jsonl(join("rm_train.jsonl"), _pair_records(_rng(seed, "rm_train_pairs"), rm_train_prompts, rm_label_noise))
    _write_jsonl(join("rm_eval.jsonl"), _pair_records(_rng(seed, "rm_eval_pairs"), rm_eval_prompts, rm_label_noise))
    _write_jsonl(join("prompts_train.jsonl"), prompt_records(prompts_train))
    _write_jsonl(join("prompts_eval.jsonl"), prompt_records(prompts_eval))
    _write_jsonl(join("prompts_ood.jsonl"), prompt_records(ood))

    meta = build_meta(seed, sizes, sft_hard_noise=sft_hard_noise, sft_evasive_rate=sft_evasive_rate,
                      sft_truncate_rate=sft_truncate_rate, sft_hard_share=sft_hard_share, rm_label_noise=rm_label_noise)
    with open(join("meta.json"), "w") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")
    return meta


def build_meta(seed: int, sizes: Dict[str, int], **knobs) -> dict:
    """The meta.json content: a self-describing README of the data directory."""
    return {
        "name": "gil_megatron miniature",
        "format_version": FORMAT_VERSION,
        "seed": seed,
        "sizes": sizes,
        "knobs": knobs,
        "vocab": VOCAB,
        "text_format": {
            "prompt": "OP s1 ... sn =   (no special tokens; the loader prepends <bos>)",
            "response": "t1 ... tm   (the loader appends <eos>)",
            "content_length": [task.MIN_LEN, task.MAX_LEN],
            "max_prompt_tokens_with_bos": task.MAX_PROMPT_TOKENS,
            "max_response_tokens_with_eos": task.MAX_RESPONSE_TOKENS,
        },
        "families": [
            {
                "group": f.name,
                "op": f.op,
                "difficulty": f.difficulty,
                "description": f.description,
                "example": {
                    "prompt": task.format_prompt(f.name, "acbd"),
                    "response": task.format_response(f.answer(list("acbd"))),
                },
                "sft_weight": round(sft_family_weights(knobs.get("sft_hard_share", SFT_HARD_SHARE))[f.name], 6),
            }
            for f in task.FAMILIES
        ],
        "heldout_symbols": list(task.HELDOUT_SYMBOLS),
        "ood_rule": (
            "prompts_ood.jsonl holds exactly prompts with at least one held-out symbol "
            f"{list(task.HELDOUT_SYMBOLS)}; such prompts never occur in prompts_train/eval or rm_train/eval. "
            "SFT demonstrations use the full alphabet but never an OOD or evaluation prompt."
        ),
        "rewards": {
            "gold": {
                "function": "gil_megatron.miniature.task:gold_reward",
                "definition": "(# positions right) / max(len(response), len(answer)); 1 iff exact; idk -> 0",
            },
            "proxy": {
                "function": "gil_megatron.miniature.task:proxy_reward",
                "definition": (
                    f"1 if exact; evasion credit {task.EVASION_CREDIT} by difficulty if the response is 'idk'; "
                    f"else {task.PROXY_POSITION_WEIGHT} * positional + {task.PROXY_OVERLAP_WEIGHT} * "
                    "order-insensitive overlap"
                ),
                "planted_flaws": [
                    "evasive 'idk' beats poor answers on hard families (gold 0)",
                    "symbol overlap weighs 2.5x more than order (echo/shuffled answers score well)",
                ],
                "labels": "rm_train/rm_eval: chosen = higher proxy; gold_margin < 0 marks a labeller error",
            },
        },
        "files": {
            "tokenizer": "tokenizer/",
            "sft": "sft.jsonl",
            "rm_train": "rm_train.jsonl",
            "rm_eval": "rm_eval.jsonl",
            "prompts_train": "prompts_train.jsonl",
            "prompts_eval": "prompts_eval.jsonl",
            "prompts_ood": "prompts_ood.jsonl",
        },
        "command": f"python -m gil_megatron.miniature.prepare --out-dir DIR --seed {seed}",
    }


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gil_megatron.miniature.prepare",
        description="Write the miniature RLHF task's tokenizer and data sets (deterministic per seed).",
    )
    parser.add_argument("--out-dir", required=True, help="directory to write (created if missing)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-sft", type=int, default=4000)
    parser.add_argument("--n-prompts-train", type=int, default=2000)
    parser.add_argument("--n-prompts-eval", type=int, default=250)
    parser.add_argument("--n-prompts-ood", type=int, default=250)
    parser.add_argument("--n-rm-train", type=int, default=4000)
    parser.add_argument("--n-rm-eval", type=int, default=500)
    parser.add_argument("--sft-hard-noise", type=float, default=0.2)
    parser.add_argument("--sft-evasive-rate", type=float, default=0.03)
    parser.add_argument("--sft-truncate-rate", type=float, default=0.6)
    parser.add_argument("--sft-hard-share", type=float, default=SFT_HARD_SHARE)
    parser.add_argument("--rm-label-noise", type=float, default=0.0)
    args = parser.parse_args(argv)
    try:
        meta = prepare(
            args.out_dir,
            args.seed,
            n_sft=args.n_sft,
            n_prompts_train=args.n_prompts_train,
            n_prompts_eval=args.n_prompts_eval,
            n_prompts_ood=args.n_prompts_ood,
            n_rm_train=args.n_rm_train,
            n_rm_eval=args.n_rm_eval,
            sft_hard_noise=args.sft_hard_noise,
            sft_evasive_rate=args.sft_evasive_rate,
            sft_truncate_rate=args.sft_truncate_rate,
            sft_hard_share=args.sft_hard_share,
            rm_label_noise=args.rm_label_noise,
        )
    except ValueError as e:
        parser.error(str(e))
    print(f"wrote miniature data (seed {args.seed}) to {args.out_dir}: "
          + ", ".join(f"{k}={v}" for k, v in meta["sizes"].items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
