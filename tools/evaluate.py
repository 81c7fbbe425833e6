#!/usr/bin/env python
"""Evaluate one or two policy checkpoints on prompt sets: scores per known and inferred group, worst
group, KL to the reference, and win/tie/lose of the first policy against the second.

    # one policy, everything named explicitly (single process, or under torchrun at any TP/PP)
    python tools/evaluate.py --actor runs/miniature/gil_ppo/checkpoints/iter_0000100/actor \
        --prompts eval=runs/miniature/data/prompts_eval.jsonl ood=runs/miniature/data/prompts_ood.jsonl \
        --reward-model runs/miniature/reward_model/model \
        --gold-reward-fn gil_megatron.miniature.task:gold_reward \
        --reference runs/miniature/sft/model --critic runs/miniature/gil_ppo/checkpoints/iter_0000100/critic \
        --tokenizer runs/miniature/sft/model --out runs/miniature/eval

    # GIL against PPO, models / prompts / lengths / layout taken from the training config
    OMP_NUM_THREADS=1 torchrun --nproc-per-node 2 tools/evaluate.py --config examples/configs/miniature.yaml \
        --actor runs/gil/checkpoints/iter_0000100/actor runs/ppo/checkpoints/iter_0000100/actor \
        --names gil ppo --tie-margin 0.05 --out runs/eval_gil_vs_ppo

Writes OUT/report.json (every number), OUT/report.md (the tables) and OUT/samples.jsonl (each
prompt, response and score). Responses are greedy unless --temperature is given. Checkpoints of any
layout load into the evaluation layout (--layout-tp/--layout-pp; the world size must be a multiple
of tp*pp, extra ranks split the prompts). With --config, explicit flags override the config:
models.reward_model / reward_fn / gold_reward_fn, models.reference (default models.actor, the SFT
policy) as the KL reference, data.eval_prompts, data.max_prompt_length, rollout.max_new_tokens,
rollout.micro_batch_size and parallel.tp/pp. User errors print one line and exit with status 2.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gil_megatron.cli import run_cli  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--actor", nargs="+", required=True, metavar="DIR",
                   help="one or two actor model directories (a checkpoint's actor/ or a converted model)")
    p.add_argument("--names", nargs="+", default=None, help="report names of the actors (default: from the paths)")
    p.add_argument("--prompts", nargs="+", default=None, metavar="NAME=PATH",
                   help="prompt sets (jsonl / saved dataset with 'prompt' and optional 'group')")
    p.add_argument("--config", default=None, help="a PPO config YAML to take models, prompts and lengths from")
    p.add_argument("--reward-model", default=None, help="reward-model directory (score: reward_model)")
    p.add_argument("--reward-fn", default=None, help="module:function reward (score: reward_fn)")
    p.add_argument("--gold-reward-fn", default=None, help="module:function true reward (score: gold)")
    p.add_argument("--reference", default=None, help="reference policy directory: adds KL to the reference")
    p.add_argument("--critic", default=None,
                   help="GIL critic directory: adds inferred groups (argmax of its group head)")
    p.add_argument("--tokenizer", default=None,
                   help="directory with tokenizer.json (default: the first model directory that has one)")
    p.add_argument("--layout-tp", type=int, default=None, help="tensor-parallel size to evaluate with (default 1)")
    p.add_argument("--layout-pp", type=int, default=None, help="pipeline-parallel size to evaluate with (default 1)")
    p.add_argument("--temperature", type=float, default=None, help="sample at this temperature (default: greedy)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=None, help="(default 32)")
    p.add_argument("--max-prompt-length", type=int, default=None, help="(default 64)")
    p.add_argument("--too-long", choices=("error", "drop"), default=None, help="prompts over the limit (default error)")
    p.add_argument("--batch-size", type=int, default=64, help="prompts generated at once (global)")
    p.add_argument("--micro-batch-size", type=int, default=None, help="sequences per scoring forward (default 16)")
    p.add_argument("--tie-margin", type=float, default=0.0,
                   help="win/tie/lose: |score_a - score_b| <= margin is a tie")
    p.add_argument("--judge", default="auto", choices=("auto", "gold", "reward_fn", "reward_model"),
                   help="win/tie/lose judge (auto: gold, else reward_fn, else reward_model)")
    p.add_argument("--known-group-map", nargs="+", default=None, metavar="GROUP=LABEL",
                   help="coarser labels of the known groups (e.g. copy=easy sort=hard) for the inferred-group "
                        "agreement")
    p.add_argument("--dtype", default=None, choices=("auto", "fp32", "bf16"), help="(default auto)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (with --temperature)")
    p.add_argument("--out", required=True, help="output directory for report.json, report.md and samples.jsonl")
    return p.parse_args(argv)


def _pairs(items, flag):
    out = {}
    for item in items or ():
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            raise ValueError(f"{flag} {item!r} must look like NAME=VALUE (e.g. eval=data/prompts_eval.jsonl)")
        if name in out:
            raise ValueError(f"{flag}: {name!r} given twice")
        out[name] = value
    return out


def resolve(args) -> dict:
    """Flags over --config over defaults, checked before any process group starts."""
    s = {"reward_model": args.reward_model, "reward_fn": args.reward_fn, "gold_reward_fn": args.gold_reward_fn,
         "reference": args.reference, "critic": args.critic, "tokenizer": args.tokenizer,
         "prompts": _pairs(args.prompts, "--prompts"), "tp": args.layout_tp, "pp": args.layout_pp,
         "max_new_tokens": args.max_new_tokens, "max_prompt_length": args.max_prompt_length,
         "too_long": args.too_long, "micro_batch_size": args.micro_batch_size, "dtype": args.dtype}
    if args.config:
        from gil_megatron.config import PPOConfig, load_config

        cfg = load_config(PPOConfig, args.config)
        m = cfg.models
        from_cfg = {"reward_model": m.reward_model, "reward_fn": m.reward_fn, "gold_reward_fn": m.gold_reward_fn,
                    "reference": m.reference or m.actor, "tokenizer": m.tokenizer,
                    "prompts": dict(cfg.data.eval_prompts), "tp": cfg.parallel.tp, "pp": cfg.parallel.pp,
                    "max_new_tokens": cfg.rollout.max_new_tokens, "max_prompt_length": cfg.data.max_prompt_length,
                    "too_long": cfg.data.too_long, "micro_batch_size": cfg.rollout.micro_batch_size, "dtype": m.dtype}
        s = {k: (v if v not in (None, {}) else from_cfg.get(k)) for k, v in s.items()}
    defaults = {"tp": 1, "pp": 1, "max_new_tokens": 32, "max_prompt_length": 64, "too_long": "error",
                "micro_batch_size": 16, "dtype": "auto"}
    s = {k: (defaults[k] if v is None and k in defaults else v) for k, v in s.items()}

    if len(args.actor) > 2:
        raise ValueError(f"--actor takes one or two model directories, got {len(args.actor)}")
    names = args.names or _default_names(args.actor)
    if len(names) != len(args.actor) or len(set(names)) != len(names):
        raise ValueError(f"--names {names} must give one distinct name per --actor ({len(args.actor)})")
    s["actors"] = dict(zip(names, args.actor))
    if not s["prompts"]:
        raise ValueError("no prompt sets: pass --prompts NAME=PATH ... (or --config with data.eval_prompts)")
    if not (s["reward_model"] or s["reward_fn"] or s["gold_reward_fn"]):
        raise ValueError("nothing to score with: pass --reward-model, --reward-fn and/or --gold-reward-fn")
    for flag in ("reward_fn", "gold_reward_fn"):
        if s[flag] and ":" not in s[flag]:
            raise ValueError(f"--{flag.replace('_', '-')} {s[flag]!r} must look like 'package.module:function'")
    if args.judge != "auto":
        have = {"gold": s["gold_reward_fn"], "reward_fn": s["reward_fn"], "reward_model": s["reward_model"]}
        if not have[args.judge]:
            raise ValueError(f"--judge {args.judge} needs its scorer; pass --{args.judge.replace('_', '-')}"
                             f"{'-fn' if args.judge == 'gold' else ''}")
    if args.tie_margin < 0:
        raise ValueError(f"--tie-margin {args.tie_margin} must be >= 0")
    if args.temperature is not None and not args.temperature > 0:
        raise ValueError(f"--temperature {args.temperature} must be > 0 (leave it out for greedy decoding)")
    for key in ("max_new_tokens", "max_prompt_length", "micro_batch_size", "tp", "pp"):
        if s[key] < 1:
            raise ValueError(f"{key}={s[key]} must be >= 1")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size {args.batch_size} must be >= 1")
    roles = {**{f"--actor {p}": (p, "actor") for p in args.actor}, "--reward-model": (s["reward_model"], "reward"),
             "--reference": (s["reference"], "actor"), "--critic": (s["critic"], "critic")}
    for flag, (path, role) in roles.items():
        if path:
            _check_model_dir(flag, path, role)
    for name, path in s["prompts"].items():
        if not os.path.exists(path):
            raise FileNotFoundError(f"--prompts {name}={path}: no such file or directory")
    s["tokenizer"] = s["tokenizer"] or _find_tokenizer([*args.actor, s["reference"], s["reward_model"], s["critic"]])
    s["known_group_map"] = _pairs(args.known_group_map, "--known-group-map") or None
    return s


def _default_names(paths):
    names = []
    for p in paths:
        p = os.path.normpath(p)
        base = os.path.basename(p)
        if base in ("actor", "model"):  # RUN/checkpoints/iter_N/actor, RUN/model
            parent = os.path.dirname(p)
            base = os.path.basename(parent)
            if base.startswith("iter_"):
                base = f"{os.path.basename(os.path.dirname(os.path.dirname(parent)))}@{base[5:].lstrip('0') or '0'}"
        names.append(base)
    return names if len(set(names)) == len(names) else [f"policy{i}" for i in range(len(paths))]


def _check_model_dir(flag, path, role):
    from gil_megatron.models.weights import arch_of

    if not os.path.isdir(path):
        raise FileNotFoundError(f"{flag} {path}: no such model directory")
    _, found, _, _ = arch_of(path, flag)
    if found != role:
        raise ValueError(f"{flag} {path} is a {found} checkpoint; this option needs a {role}")


def _find_tokenizer(dirs):
    for d in dirs:
        if d and os.path.isfile(os.path.join(d, "tokenizer.json")):
            return d
    raise FileNotFoundError("no tokenizer.json in any model directory (training checkpoints do not copy it); "
                            "pass --tokenizer DIR (e.g. the SFT model directory)")


def main(argv=None):
    args = parse_args(argv)
    s = resolve(args)  # every input checked before the heavy imports and the process group

    import torch

    from gil_megatron.data import load_prompts, pad_token_id
    from gil_megatron.models.build import load_tokenizer, model_from_checkpoint, resolve_dtype
    from gil_megatron.parallel import distributed
    from gil_megatron.ppo.evaluation import Scorers, evaluate_policy
    from gil_megatron.ppo.report import PolicyResult, build_report, write_report
    from gil_megatron.ppo.rewards import RewardFunction
    from gil_megatron.ppo.rollout import SamplingSettings

    if "WORLD_SIZE" not in os.environ and "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(distributed.free_port())  # single process: never collide with another job
    layout = distributed.initialize(s["tp"], s["pp"], seed=args.seed)
    dtype = resolve_dtype(s["dtype"])
    tokenizer = load_tokenizer(s["tokenizer"])
    pad_id = pad_token_id(tokenizer)

    def load(path, role, **kw):
        return model_from_checkpoint(path, role, layout, dtype, trainable=False, **kw) if path else None

    scorers = Scorers(
        tokenizer=tokenizer, pad_token_id=pad_id, reward_model=load(s["reward_model"], "reward"),
        reward_fn=RewardFunction(s["reward_fn"]) if s["reward_fn"] else None,
        gold_fn=RewardFunction(s["gold_reward_fn"]) if s["gold_reward_fn"] else None,
        reference=load(s["reference"], "actor"), critic=load(s["critic"], "critic"))
    datasets = {name: load_prompts(path, tokenizer, max_prompt_length=s["max_prompt_length"], too_long=s["too_long"])
                for name, path in s["prompts"].items()}
    greedy = args.temperature is None
    sampling = SamplingSettings(max_new_tokens=s["max_new_tokens"], temperature=args.temperature or 1.0,
                                top_p=args.top_p, greedy=greedy, eos_token_id=tokenizer.eos_token_id,
                                pad_token_id=pad_id)
    policies = []
    for name, path in s["actors"].items():
        actor = load(path, "actor")
        samples = evaluate_policy(actor, datasets, scorers, sampling, batch_size=args.batch_size,
                                  micro_batch_size=s["micro_batch_size"], seed=args.seed)
        policies.append(PolicyResult(name, os.path.abspath(path), samples))
        del actor
    report = None
    if distributed.is_rank0():
        settings = {"actors": s["actors"], "prompts": s["prompts"], "reward_model": s["reward_model"],
                    "reward_fn": s["reward_fn"], "gold_reward_fn": s["gold_reward_fn"], "reference": s["reference"],
                    "critic": s["critic"], "greedy": greedy, "temperature": args.temperature, "top_p": args.top_p,
                    "max_new_tokens": s["max_new_tokens"],
                    "layout": {"tp": layout.tp, "pp": layout.pp, "dp": layout.dp},
                    "seed": args.seed}
        report = build_report(policies, settings, judge=None if args.judge == "auto" else args.judge,
                              tie_margin=args.tie_margin, known_group_map=s["known_group_map"])
        paths = write_report(args.out, report, policies)
        for name, pol in report["policies"].items():
            for set_name, sm in pol["sets"].items():
                primary = sm["primary"]
                sc = sm["scores"][primary]
                extra = f" kl_to_ref {sm['kl_to_ref']['mean']:.3f}" if "kl_to_ref" in sm else ""
                print(f"{name} {set_name}: {primary} {sc['mean']:.4f} ± {sc['std']:.4f} worst group "
                      f"{sc.get('worst_known_group', '-')} {sc.get('worst_known', float('nan')):.4f}{extra}")
        comp = report.get("comparison")
        if comp:
            for set_name, w in comp["sets"].items():
                print(f"{comp['a']} vs {comp['b']} {set_name} ({comp['judge']}): win {w['win']:.3f} "
                      f"tie {w['tie']:.3f} lose {w['lose']:.3f}")
        print(f"wrote {paths['markdown']}, {paths['json']}, {paths['samples']}", flush=True)
    torch.distributed.barrier()
    return report


if __name__ == "__main__":
    try:
        run_cli(main)
    finally:
        if "gil_megatron.parallel.distributed" in sys.modules:  # only when main got as far as starting it
            sys.modules["gil_megatron.parallel.distributed"].destroy()
