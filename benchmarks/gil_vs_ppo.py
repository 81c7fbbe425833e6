"""GIL-PPO against PPO and the ablations on the embedded miniature: seeds, one budget, honest numbers.

What it measures (the paper's claims, arXiv 2310.11971, checked on DESIGN.md section 7's task):
for algo in {ppo, ppo_no_kl, gil, gil_no_adaptive_kl, gil_no_invariance} x seeds, each trained
from the same SFT policy against the same flawed reward model for the same number of iterations
(examples/configs/miniature.yaml, only algo / seed / iterations changed), then evaluated greedily
on the held-out in-distribution prompts (eval) and the held-out-symbol prompts (ood):

    gold          true reward (gil_megatron.miniature.task:gold_reward) mean on eval
    worst group   the lowest of the five families' gold means on eval; gap = best - worst family
    ood gold      gold mean on ood (and its worst family)
    proxy - gold  the flawed labeller's score minus gold on eval: reward hacking (evasion, scrambling)
    evasion       share of hard-family eval prompts answered "idk" (gold 0, paid by the proxy)
    KL to SFT     exact KL to the SFT policy summed over response tokens (nats)
    stability     std of the trained-on reward over the last 20% of iterations; collapsed runs
                  (training gold in the last 10% below half of the first 10%, or a failed run)
    agreement     GIL's inferred groups (critic's group head, argmax) against easy/hard families
and win/tie/lose of GIL against every baseline (the SFT policy included), judged by gold per prompt.
One table with mean ± std over seeds (printed, and written to benchmarks/results/gil_vs_ppo.md), and
PNG plots in the work directory (per-family gold curves PPO vs GIL, reward distributions, proxy vs
gold curves), the main ones copied to benchmarks/results/. Nothing asserts who wins.

Hardware: a 2-core CPU. Runs are sequential (one training job at a time) inside ONE torchrun launch
(one thread per rank); finished runs are skipped on a re-launch. Default layout TP=1 on 1 rank:
measured 261 iterations/min against 152 for TP=2 on 2 ranks (`--measure-layouts`), since at this
size the per-layer gloo all-reduces cost more than the halved matmuls save.
Command:   python benchmarks/gil_vs_ppo.py                 (full: 5 algos x 3 seeds x 300 iterations, ~21 min)
           python benchmarks/gil_vs_ppo.py --quick         (CI: 1 seed, 3 iterations, 40 prompts: ~30 s)
           python benchmarks/gil_vs_ppo.py --measure-layouts   (iterations/min at TP1xNPROC1 vs TP2xNPROC2)
It reuses the embedded default's data, SFT policy and reward model (runs/miniature/...), running
examples/run_gil_ppo.sh's stages first when they are missing.
Batch arithmetic: the miniature config's 64 prompts per iteration, 2 mini-batches of 32, 1 epoch.
"""

import argparse
import gc
import json
import math
import os
import shutil
import subprocess
import sys
import time
from typing import Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("OMP_NUM_THREADS", "1")

ALGOS = ("ppo", "ppo_no_kl", "gil", "gil_no_adaptive_kl", "gil_no_invariance")
GIL_ALGOS = ("gil", "gil_no_adaptive_kl", "gil_no_invariance")
CONFIG = os.path.join("examples", "configs", "miniature.yaml")
MINI = os.path.join("runs", "miniature")
GOLD_FN = "gil_megatron.miniature.task:gold_reward"
PROXY_FN = "gil_megatron.miniature.task:proxy_reward"
# Measured with --measure-layouts on the 2-core development VM (see the report in the README):
# TP=1 on one rank gives more iterations per minute than TP=2 on two ranks at this model size.
DEFAULT_NPROC, DEFAULT_TP = 1, 1
LAST_FRACTION = 0.2  # stability window: the last 20% of iterations
COLLAPSE_FRACTION = 0.1


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="CI: 1 seed, few iterations, a subset of the eval prompts")
    p.add_argument("--algos", nargs="+", default=None, choices=ALGOS)
    p.add_argument("--seeds", type=int, default=None, help="seeds per algo (default 3; --quick 1)")
    p.add_argument("--iterations", type=int, default=None, help="PPO iterations per run (default 150; --quick 3)")
    p.add_argument("--eval-limit", type=int, default=None,
                   help="first N prompts of each eval set (default all; --quick 40)")
    p.add_argument("--nproc", type=int, default=DEFAULT_NPROC, help="ranks (one thread each)")
    p.add_argument("--tp", type=int, default=DEFAULT_TP, help="tensor-parallel size")
    p.add_argument("--config", default=CONFIG, help="the PPO config every run starts from")
    p.add_argument("--data", default=None, help="miniature data directory (default runs/miniature/data)")
    p.add_argument("--sft", default=None, help="SFT policy directory (default runs/miniature/sft/model)")
    p.add_argument("--reward-model", default=None,
                   help="reward model directory (default runs/miniature/reward_model/model)")
    p.add_argument("--dpo", default=None,
                   help="DPO policy directory, evaluated as a baseline (default runs/miniature/dpo/model, trained "
                        "with examples/configs/dpo_miniature.yaml when missing; --quick: only if present)")
    p.add_argument("--no-dpo", action="store_true", help="leave the DPO baseline out")
    p.add_argument("--workdir", default=None, help="runs, plots and the table (default runs/gil_vs_ppo[_quick])")
    p.add_argument("--results", default=None,
                   help="where the table and the main plots are copied (default benchmarks/results; --quick: none)")
    p.add_argument("--overrides", nargs="*", default=[], metavar="KEY=VALUE",
                   help="extra config overrides for every run (e.g. rollout.batch_size=32)")
    p.add_argument("--fresh", action="store_true", help="re-run finished runs instead of reusing them")
    p.add_argument("--measure-layouts", action="store_true",
                   help="time a few GIL iterations at TP1 x 1 rank and TP2 x 2 ranks, print iterations/min, exit")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: run a plan under torchrun
    args = p.parse_args(argv)
    q = args.quick
    args.algos = args.algos or list(ALGOS)
    args.seeds = args.seeds or (1 if q else 3)
    args.iterations = args.iterations if args.iterations is not None else (3 if q else 300)
    args.eval_limit = args.eval_limit if args.eval_limit is not None else (40 if q else 0)
    args.workdir = args.workdir or os.path.join("runs", "gil_vs_ppo_quick" if q else "gil_vs_ppo")
    if args.results is None and not q:
        args.results = os.path.join("benchmarks", "results")
    return args


# =============================================================================================
# The worker: under torchrun, runs every pending job of a plan one after another
# =============================================================================================


def _subset(dataset, limit: int):
    from gil_megatron.data import PromptDataset

    if not limit or limit >= len(dataset):
        return dataset
    return PromptDataset(dataset.prompt_ids[:limit], dataset.prompts[:limit], dataset.groups[:limit], dataset.source)


def _difficulty_map() -> Dict[str, str]:
    from gil_megatron.miniature.task import FAMILIES

    return {f.name: f.difficulty for f in FAMILIES}


def _evaluate(plan, actor, tokenizer, pad_id, reward_model, reference, critic, datasets):
    from gil_megatron.evaluation import Scorers, evaluate_policy
    from gil_megatron.rollout import SamplingSettings
    from gil_megatron.scoring import RewardFunction

    scorers = Scorers(tokenizer=tokenizer, pad_token_id=pad_id, reward_model=reward_model,
                      reward_fn=RewardFunction(PROXY_FN), gold_fn=RewardFunction(GOLD_FN),
                      reference=reference, critic=critic)
    greedy = SamplingSettings(max_new_tokens=plan["max_new_tokens"], greedy=True,
                              eos_token_id=tokenizer.eos_token_id, pad_token_id=pad_id)
    return evaluate_policy(actor, datasets, scorers, greedy, batch_size=plan["eval_batch_size"],
                           micro_batch_size=plan["eval_batch_size"])


def _write_eval(run_dir: str, samples, extra: dict) -> None:
    from gil_megatron.evaluation import summarize_set

    os.makedirs(run_dir, exist_ok=True)
    out = {"sets": {name: summarize_set(recs, _difficulty_map()) for name, recs in samples.items()}, **extra}
    with open(os.path.join(run_dir, "samples.jsonl"), "w") as f:
        for name, recs in samples.items():
            for r in recs:
                f.write(json.dumps({"set": name, **{k: v for k, v in r.items() if k != "group_probs"}}) + "\n")
    tmp = os.path.join(run_dir, "eval.json.tmp")
    with open(tmp, "w") as f:
        json.dump(out, f, indent=1, default=lambda x: None)
    os.replace(tmp, os.path.join(run_dir, "eval.json"))  # written last: marks the run finished


def run_worker(plan_path: str) -> None:
    import torch

    from gil_megatron import distributed
    from gil_megatron.config import PPOConfig, load_config
    from gil_megatron.data import load_prompts, pad_token_id
    from gil_megatron.models.build import load_tokenizer, model_from_checkpoint
    from gil_megatron.trainer import PPOTrainer

    torch.set_num_threads(1)
    with open(plan_path) as f:
        plan = json.load(f)
    tokenizer = load_tokenizer(plan["sft"])
    pad_id = pad_token_id(tokenizer)
    datasets = {name: _subset(load_prompts(path, tokenizer, max_prompt_length=plan["max_prompt_length"]),
                              plan["eval_limit"]) for name, path in plan["eval_sets"].items()}
    for job in plan["jobs"]:
        t0 = time.perf_counter()
        if job["kind"] == "policy":  # a fixed policy (SFT, DPO): evaluation only, KL to the SFT policy
            layout = distributed.initialize(plan["tp"], 1, seed=0)
            policy = model_from_checkpoint(job["policy"], "actor", layout, trainable=False)
            sft = model_from_checkpoint(plan["sft"], "actor", layout, trainable=False)
            rm = model_from_checkpoint(plan["reward_model"], "reward", layout, trainable=False)
            samples = _evaluate(plan, policy, tokenizer, pad_id, rm, sft, None, datasets)
            extra = {"job": job, "eval_s": time.perf_counter() - t0}
            del policy, sft, rm
        else:
            cfg = load_config(PPOConfig, plan["config"], job["overrides"])
            try:
                trainer = PPOTrainer(cfg)
                trainer.train()
            except FloatingPointError as exc:  # a diverged run is a result (collapse), not a crash
                if distributed.is_rank0():
                    os.makedirs(job["run_dir"], exist_ok=True)
                    with open(os.path.join(job["run_dir"], "eval.json"), "w") as f:
                        json.dump({"job": job, "failed": str(exc)}, f)
                    print(f"[gil_vs_ppo] {job['name']}: FAILED ({exc})", flush=True)
                gc.collect()
                continue
            train_s = time.perf_counter() - t0
            critic = trainer.critic if cfg.uses_group_head else None
            samples = _evaluate(plan, trainer.actor, tokenizer, pad_id, trainer.reward_model, trainer.reference,
                                critic, datasets)
            extra = {"job": job, "train_s": train_s, "eval_s": time.perf_counter() - t0 - train_s,
                     "iterations": trainer.iteration}
            del trainer
        if distributed.is_rank0():
            _write_eval(job["run_dir"], samples, extra)
            gold = {n: sum(r["gold"] for r in recs) / len(recs) for n, recs in samples.items()}
            timing = f"train {extra['train_s']:.0f} s, " if "train_s" in extra else ""
            print(f"[gil_vs_ppo] {job['name']}: {timing}eval {extra['eval_s']:.0f} s; gold "
                  + " ".join(f"{n} {v:.3f}" for n, v in gold.items()), flush=True)
        gc.collect()
    distributed.destroy()


# =============================================================================================
# The driver: stages, plan, one torchrun launch, aggregation, table, plots
# =============================================================================================


def _python() -> str:
    venv = os.path.join(ROOT, ".venv", "bin", "python")
    return os.environ.get("PYTHON") or (venv if os.path.exists(venv) else sys.executable)


def _run(cmd: List[str], env: Optional[dict] = None) -> None:
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    if proc.returncode != 0:
        raise SystemExit(f"error: command failed with status {proc.returncode}: {' '.join(cmd)}")


def ensure_stages(args) -> Dict[str, str]:
    """Data, SFT policy and reward model of the embedded default (and the DPO baseline); runs the
    missing stages: examples/run_gil_ppo.sh's steps 1-4 (then a 0-iteration PPO start as a smoke
    check) and tools/train_dpo.py with examples/configs/dpo_miniature.yaml, at their own layouts."""
    paths = {"data": args.data or os.path.join(MINI, "data"),
             "sft": args.sft or os.path.join(MINI, "sft", "model"),
             "reward_model": args.reward_model or os.path.join(MINI, "reward_model", "model")}
    defaults = not (args.data or args.sft or args.reward_model)
    markers = {"data": "meta.json", "sft": "gil_megatron.json", "reward_model": "gil_megatron.json"}
    missing = [k for k, rel in markers.items() if not os.path.isfile(os.path.join(ROOT, paths[k], rel))]
    if missing and not defaults:
        raise SystemExit("error: not found: " + ", ".join(f"--{m.replace('_', '-')} {paths[m]}" for m in missing))
    stage_env = {"NPROC": "2", "PYTHON": _python()}  # the stage configs are written for TP=2 on 2 ranks
    if missing:
        print(f"[gil_vs_ppo] missing {', '.join(missing)}: running the embedded default's stages "
              "(examples/run_gil_ppo.sh)", flush=True)
        _run(["bash", "examples/run_gil_ppo.sh", "train.iterations=0", "logging.progress=false",
              f"run_dir={os.path.join(args.workdir, 'stage_check')}"], env=stage_env)
    if not args.no_dpo:
        dpo = args.dpo or (os.path.join(MINI, "dpo", "model") if defaults else None)
        if dpo and not os.path.isfile(os.path.join(ROOT, dpo, "gil_megatron.json")):
            if args.dpo or not defaults:
                raise SystemExit(f"error: --dpo {dpo}: no such model directory")
            if args.quick:
                dpo = None
            else:
                print("[gil_vs_ppo] training the DPO baseline (examples/configs/dpo_miniature.yaml)", flush=True)
                _run([_python(), "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                      "tools/train_dpo.py", "examples/configs/dpo_miniature.yaml", "logging.progress=false"])
        if dpo:
            paths["dpo"] = dpo
    return paths


def make_plan(args, paths) -> dict:
    data = paths["data"]
    eval_sets = {"eval": os.path.join(data, "prompts_eval.jsonl"), "ood": os.path.join(data, "prompts_ood.jsonl")}
    fingerprint = {"iterations": args.iterations, "config": args.config, "sft": os.path.abspath(paths["sft"]),
                   "reward_model": os.path.abspath(paths["reward_model"]), "eval_limit": args.eval_limit,
                   "overrides": args.overrides, "tp": args.tp, "nproc": args.nproc}
    jobs = [{"kind": "policy", "name": "sft", "policy": paths["sft"], "run_dir": os.path.join(args.workdir, "sft"),
             "fingerprint": fingerprint}]
    if "dpo" in paths:
        jobs.append({"kind": "policy", "name": "dpo", "policy": paths["dpo"],
                     "run_dir": os.path.join(args.workdir, "dpo"),
                     "fingerprint": {**fingerprint, "dpo": os.path.abspath(paths["dpo"])}})
    for algo in args.algos:
        for seed in range(1, args.seeds + 1):
            run_dir = os.path.join(args.workdir, f"{algo}_s{seed}")
            overrides = [
                f"algo={algo}", f"seed={seed}", f"run_dir={run_dir}", f"parallel.tp={args.tp}",
                f"models.actor={paths['sft']}", f"models.reward_model={paths['reward_model']}",
                f"models.gold_reward_fn={GOLD_FN}", f"data.train_prompts={os.path.join(data, 'prompts_train.jsonl')}",
                f"train.iterations={args.iterations}", "train.eval_every=0",
                "train.save_every=0", "checkpoint.resume=none", "checkpoint.keep_last=1", "logging.progress=false",
                *args.overrides]
            jobs.append({"kind": "train", "name": f"{algo}_s{seed}", "algo": algo, "seed": seed, "run_dir": run_dir,
                         "overrides": overrides, "fingerprint": fingerprint})
    return {"config": _base_config(args), "sft": paths["sft"], "reward_model": paths["reward_model"], "tp": args.tp,
            "eval_sets": eval_sets, "eval_limit": args.eval_limit, "max_prompt_length": 12, "max_new_tokens": 10,
            "eval_batch_size": 64, "jobs": jobs}


def _base_config(args) -> str:
    """The config every run starts from, minus its periodic evaluation sets (the benchmark evaluates
    each final policy itself, on more than the trainer's eval covers); written into the workdir."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(args.config)
    if "data" in cfg:
        cfg.data.eval_prompts = {}
    os.makedirs(args.workdir, exist_ok=True)
    path = os.path.abspath(os.path.join(args.workdir, "base_config.yaml"))
    OmegaConf.save(cfg, path)
    return path


def _finished(job) -> bool:
    path = os.path.join(job["run_dir"], "eval.json")
    if not os.path.isfile(path):
        return False
    with open(path) as f:
        return json.load(f).get("job", {}).get("fingerprint") == job["fingerprint"]


def launch(args, plan: dict) -> None:
    pending = [j for j in plan["jobs"] if args.fresh or not _finished(j)]
    if not pending:
        print("[gil_vs_ppo] every run is finished already (use --fresh to redo them)", flush=True)
        return 0
    for job in pending:
        shutil.rmtree(job["run_dir"], ignore_errors=True)
    plan = {**plan, "jobs": pending}
    os.makedirs(args.workdir, exist_ok=True)
    plan_path = os.path.abspath(os.path.join(args.workdir, "plan.json"))
    with open(plan_path, "w") as f:
        json.dump(plan, f, indent=1)
    print(f"[gil_vs_ppo] {len(pending)} job(s): {', '.join(j['name'] for j in pending)} "
          f"(TP={args.tp}, {args.nproc} rank(s), {args.iterations} iterations each)", flush=True)
    _run([_python(), "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.nproc),
          os.path.abspath(__file__), "--worker", plan_path])
    return len(pending)


# ---- aggregation ------------------------------------------------------------------------------


def _read_metrics(run_dir: str) -> List[dict]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _window(lines: List[dict], key: str, fraction: float, last: bool = True) -> List[float]:
    vals = [m[key] for m in lines if isinstance(m.get(key), (int, float))]
    k = max(1, int(round(len(vals) * fraction)))
    return vals[-k:] if last else vals[:k]


def _mean(xs):
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return sum(xs) / len(xs) if xs else float("nan")


def _std(xs):
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    if len(xs) < 2:
        return 0.0 if xs else float("nan")
    m = _mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def _evasion(samples_path: str, set_name: str = "eval") -> float:
    """Share of hard-family prompts answered exactly 'idk' (the proxy pays for it, gold does not)."""
    hard = {k for k, v in _difficulty_map().items() if v == "hard"}
    n = idk = 0
    with open(samples_path) as f:
        for line in f:
            r = json.loads(line)
            if r["set"] == set_name and r.get("group") in hard:
                n += 1
                idk += r["response"].strip() == "idk"
    return idk / n if n else float("nan")


def run_metrics(run_dir: str) -> dict:
    """Every number of one run (see the module docstring); empty when the run is missing."""
    path = os.path.join(run_dir, "eval.json")
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        ev = json.load(f)
    lines = _read_metrics(run_dir)
    if "failed" in ev:
        return {"failed": True, "collapsed": 1.0}
    e, o = ev["sets"]["eval"], ev["sets"]["ood"]
    g, og = e["scores"]["gold"], o["scores"]["gold"]
    m = {"gold": g["mean"], "worst_group": g["worst_known"], "worst_group_name": g["worst_known_group"],
         "gap": g["known_gap"], "ood_gold": og["mean"], "ood_worst_group": og["worst_known"],
         "proxy_minus_gold": e.get("reward_fn_minus_gold"), "rm_score": e["scores"]["reward_model"]["mean"],
         "evasion": _evasion(os.path.join(run_dir, "samples.jsonl")),
         "kl_to_sft": e.get("kl_to_ref", {}).get("mean"), "families": g["known_groups"],
         "ood_families": og["known_groups"], "train_s": ev.get("train_s"), "iterations": ev.get("iterations")}
    ig = e.get("inferred_groups")
    if ig:
        m["agreement_easy_hard"] = ig.get("agreement_mapped")
    if lines:
        m["reward_std_last"] = _std(_window(lines, "reward/mean", LAST_FRACTION))
        m["train_gold_last"] = _mean(_window(lines, "reward/gold_mean", LAST_FRACTION))
        first = _mean(_window(lines, "reward/gold_mean", COLLAPSE_FRACTION, last=False))
        last = _mean(_window(lines, "reward/gold_mean", COLLAPSE_FRACTION))
        m["collapsed"] = float(last < 0.5 * first)
        for key, name in DIAGNOSTICS:
            vals = _window(lines, key, LAST_FRACTION)
            if vals:
                m[name] = _mean(vals)
        if "group/0/gold" in lines[-1]:
            m["inferred_gold_gap"] = _mean([abs(x["group/0/gold"] - x["group/1/gold"])
                                            for x in lines[-max(1, int(len(lines) * LAST_FRACTION)):]])
            m["minority_mass"] = _mean([min(x["group/0/mass"], x["group/1/mass"])
                                        for x in lines[-max(1, int(len(lines) * LAST_FRACTION)):]])
            m["high_group_flips"] = lines[-1].get("gil/high_group_flips")
        steps = [x["time/step_s"] for x in lines if "time/step_s" in x]
        m["iter_per_min"] = 60.0 / _mean(steps) if steps else float("nan")
    return m


DIAGNOSTICS = [  # training metrics averaged over the last 20% of iterations: (metrics.jsonl key, name)
    ("policy/entropy", "entropy"), ("rollout/response_length", "response_length"), ("kl/mean", "train_kl"),
    ("kl/coef_effective_mean", "kl_coef_effective"), ("gil/r_var", "r_var"),
    ("gil/known_agreement", "agreement_families"),
    ("gil/p_high_mean", "p_high_mean"), ("gil/weight_min", "weight_min"), ("gil/weight_max", "weight_max"),
    ("gil/weight_zero_frac", "weight_zero_frac"),
]
DIAG_COLUMNS = [  # (key, header, format) of the diagnostics table
    ("entropy", "entropy", "{:.3f}"), ("response_length", "resp. tokens", "{:.2f}"), ("train_kl", "KL (k1)", "{:.2f}"),
    ("kl_coef_effective", "eff. KL coef", "{:.4f}"), ("r_var", "R_var", "{:.3f}"),
    ("minority_mass", "minority group mass", "{:.2f}"),
    ("inferred_gold_gap", "gold gap between inferred groups", "{:.3f}"),
    ("agreement_families", "agreement (5 families)", "{:.2f}"), ("p_high_mean", "p_high mean", "{:.2f}"),
    ("weight_min", "GIL weight min", "{:.2f}"), ("weight_max", "GIL weight max", "{:.2f}"),
    ("weight_zero_frac", "share of w = 0", "{:.2f}"),
    ("high_group_flips", "g_high flips", "{:.0f}"),
]

COLUMNS = [  # (key, header, format)
    ("gold", "gold (eval)", "{:.3f}"),
    ("worst_group", "worst group", "{:.3f}"),
    ("gap", "gap", "{:.3f}"),
    ("ood_gold", "OOD gold", "{:.3f}"),
    ("ood_worst_group", "OOD worst group", "{:.3f}"),
    ("rm_score", "RM score (eval)", "{:.2f}"),
    ("proxy_minus_gold", "proxy − gold", "{:.3f}"),
    ("evasion", "evasion (hard)", "{:.2f}"),
    ("kl_to_sft", "KL to SFT", "{:.2f}"),
    ("reward_std_last", "RM reward std (last 20%)", "{:.3f}"),
    ("agreement_easy_hard", "groups vs easy/hard", "{:.2f}"),
]


def aggregate(args, plan) -> dict:
    per_run = {j["name"]: run_metrics(j["run_dir"]) for j in plan["jobs"]}
    table, diag = {}, {}
    for name in ("sft", "dpo"):
        if name in per_run:
            table[name] = {k: (per_run[name].get(k), None) for k, _, _ in COLUMNS}
            table[name]["collapsed"] = "–"
    for algo in args.algos:
        runs = [per_run[f"{algo}_s{s}"] for s in range(1, args.seeds + 1)]
        ok = [r for r in runs if r and not r.get("failed")]
        row = {k: (_mean([r.get(k) for r in ok]), _std([r.get(k) for r in ok])) for k, _, _ in COLUMNS}
        row["collapsed"] = f"{int(sum(r.get('collapsed', 0) for r in runs if r))}/{len(runs)}"
        table[algo] = row
        diag[algo] = {k: (_mean([r.get(k) for r in ok]), _std([r.get(k) for r in ok])) for k, _, _ in DIAG_COLUMNS}
    return {"per_run": per_run, "table": table, "diagnostics": diag, "wtl": win_tie_lose_tables(args, plan),
            "sft_run_dir": next(j["run_dir"] for j in plan["jobs"] if j["name"] == "sft")}


def _load_samples(run_dir: str) -> Dict[str, List[dict]]:
    out: Dict[str, List[dict]] = {}
    path = os.path.join(run_dir, "samples.jsonl")
    if os.path.isfile(path):
        with open(path) as f:
            for line in f:
                r = json.loads(line)
                out.setdefault(r["set"], []).append(r)
    return out


def win_tie_lose_tables(args, plan) -> dict:
    """GIL (seed s) against each baseline (seed s; the SFT policy for every s), judged by gold on
    each prompt, tie margin 0; fractions averaged over seeds."""
    from gil_megatron.evaluation import compare_policies

    if "gil" not in args.algos:
        return {}
    dirs = {j["name"]: j["run_dir"] for j in plan["jobs"]}
    fixed = [j["name"] for j in plan["jobs"] if j["kind"] == "policy"]
    out = {}
    for other in fixed + [a for a in args.algos if a != "gil"]:
        per_set: Dict[str, List[dict]] = {}
        for s in range(1, args.seeds + 1):
            a = _load_samples(dirs[f"gil_s{s}"])
            b = _load_samples(dirs[other if other in fixed else f"{other}_s{s}"])
            for set_name in a:
                if set_name in b:
                    per_set.setdefault(set_name, []).append(compare_policies(a[set_name], b[set_name], "gold"))
        out[other] = {k: {x: _mean([w[x] for w in v]) for x in ("win", "tie", "lose")} for k, v in per_set.items()}
    return out


def _one_group_level(sft_run_dir: str) -> float:
    """Easy/hard agreement of the trivial assignment (all samples in one group) on the eval set."""
    recs = _load_samples(sft_run_dir).get("eval", [])
    hard = sum(_difficulty_map().get(r["group"]) == "hard" for r in recs)
    return max(hard, len(recs) - hard) / len(recs) if recs else float("nan")


def group_objective_analysis(sft_run_dir: str) -> List[str]:
    """Why the inferred groups are (not) easy vs hard: on the SFT policy's greedy eval responses,
    the group-inference objective R_var = (R_1 - R_2)^2 / 4 of the reward-model score G (whitened,
    as the trainer's G_i) for a few hard 2-way splits, and the share of G's variance that the
    families explain. Pure arithmetic on samples.jsonl."""
    recs = _load_samples(sft_run_dir).get("eval", [])
    if not recs or "reward_model" not in recs[0]:
        return []
    hard = {k for k, v in _difficulty_map().items() if v == "hard"}
    lines = []
    for key, what in (("reward_model", "reward-model score (what GIL's G_i is made of)"), ("gold", "gold reward")):
        x = [r[key] for r in recs]
        m, sd = _mean(x), math.sqrt(sum((v - _mean(x)) ** 2 for v in x) / len(x)) or 1.0
        g = [(v - m) / sd for v in x]

        def r_var(in_one):
            a = [v for v, k in zip(g, in_one) if k]
            b = [v for v, k in zip(g, in_one) if not k]
            return (_mean(a) - _mean(b)) ** 2 / 4

        order = sorted(range(len(g)), key=g.__getitem__)
        bottom = {f: r_var([i in set(order[:max(1, int(round(f * len(g))))]) for i in range(len(g))])
                  for f in (1 / len(g), 0.1, 0.3)}
        fams = sorted({r["group"] for r in recs})
        within = _mean([_mean([(v - _mean([u for u, r in zip(g, recs) if r["group"] == f])) ** 2
                               for v, r in zip(g, recs) if r["group"] == f]) for f in fams])
        lines.append(f"| {what} | {r_var([r['group'] in hard for r in recs]):.3f} | {bottom[1 / len(g)]:.3f} | "
                     f"{bottom[0.1]:.3f} | {bottom[0.3]:.3f} | {100 * (1 - within):.0f}% |")
    return ["", "Why the inferred groups are not easy vs hard: R_var of 2-way splits of the SFT policy's greedy "
            "eval responses (G whitened over the set, as the trainer's G_i). GIL's head maximises R_var; the "
            "split it finds is the one with the largest R_var its guards allow.", "",
            "| G from | easy / hard families | lowest response alone | lowest 10% | lowest 30% | "
            "variance explained by family |", "|---|---|---|---|---|---|", *lines]


def _cell(value, fmt) -> str:
    mean, std = value if isinstance(value, tuple) else (value, None)
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "–"
    return fmt.format(mean) + (f" ± {fmt.format(std)}" if std is not None else "")


def markdown_table(args, agg: dict) -> str:
    t = agg["table"]
    head = ["algo"] + [h for _, h, _ in COLUMNS] + ["collapsed"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for algo, row in t.items():
        name = {"sft": "SFT (start)", "dpo": "DPO (1 run)"}.get(algo, algo)
        lines.append("| " + " | ".join([name] + [_cell(row[k], f) for k, _, f in COLUMNS] + [row["collapsed"]]) + " |")
    lines += ["", "Training diagnostics (last 20% of iterations; mean ± std over seeds):", "",
              "| algo | " + " | ".join(h for _, h, _ in DIAG_COLUMNS) + " |", "|" + "---|" * (len(DIAG_COLUMNS) + 1)]
    for algo, row in agg["diagnostics"].items():
        lines.append("| " + " | ".join([algo] + [_cell(row[k], f) for k, _, f in DIAG_COLUMNS]) + " |")
    if any(a in GIL_ALGOS for a in args.algos):
        lines += group_objective_analysis(agg.get("sft_run_dir", ""))
    wtl = agg["wtl"]
    if wtl:
        lines += ["", "GIL vs baseline, win / tie / lose judged by gold per prompt (mean over seeds):", "",
                  "| GIL vs | eval win | eval tie | eval lose | OOD win | OOD tie | OOD lose |",
                  "|---|---|---|---|---|---|---|"]
        for other, sets in wtl.items():
            cells = []
            for set_name in ("eval", "ood"):
                w = sets.get(set_name, {})
                cells += [f"{100 * w[x]:.1f}%" if x in w else "–" for x in ("win", "tie", "lose")]
            lines.append(f"| {other.upper() if other in ('sft', 'dpo') else other} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_results(args, plan, agg, timing: dict, layout_note: str) -> str:
    table = markdown_table(args, agg)
    its = [r.get("iter_per_min") for r in agg["per_run"].values() if r and r.get("iter_per_min")]
    header = [
        "# GIL-PPO vs PPO on the embedded miniature",
        "",
        f"Command: `python benchmarks/gil_vs_ppo.py{' --quick' if args.quick else ''}` "
        f"({len(args.algos)} algos x {args.seeds} seed(s), {args.iterations} iterations of 64 prompts each, "
        f"TP={args.tp} on {args.nproc} rank(s); {timing['elapsed_s'] / 60:.1f} min wall for the launch that ran "
        f"{timing['jobs']} job(s) on a shared 2-core CPU, load average {timing['load_average_at_start']:.1f} at its "
        f"start; {_mean(its):.0f} training iterations/min). {layout_note}",
        "",
        "Evaluation: greedy responses on the held-out eval prompts (and OOD prompts with held-out symbols), "
        f"{'first ' + str(args.eval_limit) + ' prompts of each set, ' if args.eval_limit else ''}"
        "mean ± std over seeds. gold = true reward; worst group / gap = lowest family mean / best − worst "
        "family; RM score = the trained-on reward model's mean score (it rising while gold falls is the hacking); "
        "proxy − gold = the flawed labeller's score minus gold (its planted flaws being exploited); "
        "evasion = share of hard "
        "prompts answered `idk`; KL to SFT = exact KL summed over response tokens; RM reward std = std of "
        "the trained-on reward over the last 20% of iterations; collapsed = training gold in the last 10% "
        "below half of the first 10% (or a diverged run); groups vs easy/hard = agreement of the critic's "
        "inferred groups with the easy/hard families on eval (GIL only; putting every sample in one group "
        f"scores {_one_group_level(agg['sft_run_dir']):.2f}, the share of the larger of the two).",
        "",
    ]
    text = "\n".join(header) + "\n" + table + "\n"
    os.makedirs(args.workdir, exist_ok=True)
    with open(os.path.join(args.workdir, "gil_vs_ppo.md"), "w") as f:
        f.write(text)
    with open(os.path.join(args.workdir, "gil_vs_ppo.json"), "w") as f:
        json.dump({"per_run": agg["per_run"], "wtl": agg["wtl"]}, f, indent=1, default=lambda x: None)
    return text


# ---- plots ------------------------------------------------------------------------------------

COLORS = {"ppo": "tab:red", "ppo_no_kl": "tab:orange", "gil": "tab:blue", "gil_no_adaptive_kl": "tab:cyan",
          "gil_no_invariance": "tab:purple", "sft": "black", "dpo": "tab:green"}


def _smooth(xs: List[float], w: int) -> List[float]:
    out, acc = [], []
    for x in xs:
        acc.append(x)
        if len(acc) > w:
            acc.pop(0)
        out.append(sum(acc) / len(acc))
    return out


def _curves(args, plan, algo: str, key: str):
    runs = [_read_metrics(j["run_dir"]) for j in plan["jobs"] if j.get("algo") == algo]
    series = [[m.get(key) for m in lines] for lines in runs if lines]
    series = [s for s in series if s and all(isinstance(v, (int, float)) for v in s)]
    if not series:
        return None
    n = min(len(s) for s in series)
    w = max(1, n // 15)
    sm = [_smooth(s[:n], w) for s in series]
    mean = [sum(col) / len(col) for col in zip(*sm)]
    return list(range(1, n + 1)), mean, [min(c) for c in zip(*sm)], [max(c) for c in zip(*sm)]


def make_plots(args, plan, agg) -> List[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from gil_megatron.miniature.task import FAMILY_NAMES

    out = []
    shown = [a for a in ("ppo", "gil", "ppo_no_kl", "gil_no_adaptive_kl", "gil_no_invariance") if a in args.algos]

    # 1. per-family training gold: PPO vs GIL (and the ablations, thin)
    keys = [(f"known/{f}/gold", f) for f in FAMILY_NAMES] + [("known/worst_gold", "worst family")]
    fig, axes = plt.subplots(2, 3, figsize=(12, 6.5), sharex=True)
    for ax, (key, title) in zip(axes.flat, keys):
        for algo in shown:
            c = _curves(args, plan, algo, key)
            if c is None:
                continue
            x, mean, lo, hi = c
            bold = algo in ("ppo", "gil")
            ax.plot(x, mean, color=COLORS[algo], lw=2 if bold else 0.9, alpha=1 if bold else 0.7, label=algo)
            if bold:
                ax.fill_between(x, lo, hi, color=COLORS[algo], alpha=0.15)
        ax.set_title(f"{title} ({_difficulty_map().get(title, 'min over families')})", fontsize=10)
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    for ax in axes[1]:
        ax.set_xlabel("iteration")
    for ax in axes[:, 0]:
        ax.set_ylabel("gold reward (training rollouts)")
    fig.suptitle(f"Per-family true reward during training (mean over {args.seeds} seed(s), band = min..max)")
    fig.tight_layout()
    out.append(_save(fig, args.workdir, "per_group_gold.png"))

    # 2. reward distributions of the final greedy responses
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    bins = [i / 10 for i in range(11)]
    for algo in [j["name"] for j in plan["jobs"] if j["kind"] == "policy"] + shown:
        recs = {"eval": [], "ood": []}
        for j in plan["jobs"]:
            if j["name"] == algo or j.get("algo") == algo:
                for set_name, rs in _load_samples(j["run_dir"]).items():
                    recs[set_name] += rs
        if not recs["eval"]:
            continue
        kw = dict(histtype="step", lw=2 if algo in ("ppo", "gil", "sft") else 1, color=COLORS[algo], label=algo,
                  density=True)
        axes[0].hist([r["gold"] for r in recs["eval"]], bins=bins, **kw)
        axes[1].hist([r["gold"] for r in recs["ood"]], bins=bins, **kw)
        axes[2].hist([r["reward_fn"] - r["gold"] for r in recs["eval"]], bins=[-0.5 + i / 10 for i in range(12)], **kw)
    for ax, title in zip(axes, ("gold, eval prompts", "gold, OOD prompts", "proxy − gold, eval prompts")):
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("Final policies, greedy responses (all seeds pooled)")
    fig.tight_layout()
    out.append(_save(fig, args.workdir, "reward_distributions.png"))

    # 3. hacking: trained-on reward vs gold vs KL during training
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, (key, title) in zip(axes, (("reward/mean", "reward-model score (trained on)"),
                                       ("reward/gold_mean", "gold reward"), ("kl/mean", "KL to SFT (k1, nats)"))):
        for algo in shown:
            c = _curves(args, plan, algo, key)
            if c is not None:
                x, mean, lo, hi = c
                ax.plot(x, mean, color=COLORS[algo], lw=2 if algo in ("ppo", "gil") else 0.9, label=algo)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    out.append(_save(fig, args.workdir, "hacking_curves.png"))

    # 4. GIL's group inference during training
    gil_algos = [a for a in GIL_ALGOS if a in args.algos]
    if gil_algos:
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
        for ax, (key, title) in zip(axes, (("gil/known_agreement", "agreement with the 5 families"),
                                           ("gil/r_var", "R_var (variance across inferred groups)"),
                                           ("group/0/mass", "mass of inferred group 0"))):
            for algo in gil_algos:
                c = _curves(args, plan, algo, key)
                if c is not None:
                    ax.plot(c[0], c[1], color=COLORS[algo], label=algo)
            ax.set_title(title, fontsize=10)
            ax.set_xlabel("iteration")
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=8)
        fig.tight_layout()
        out.append(_save(fig, args.workdir, "group_inference.png"))
    plt.close("all")
    return out


def _save(fig, workdir: str, name: str) -> str:
    path = os.path.join(workdir, name)
    fig.savefig(path, dpi=80)
    return path


# ---- layout measurement -----------------------------------------------------------------------


LAYOUTS = ((1, 1), (2, 2))  # (nproc, tp)


def _layout_dir(workdir: str, nproc: int, tp: int) -> str:
    return os.path.join(workdir, f"layout_tp{tp}_n{nproc}")


def layout_note(workdir: str) -> str:
    """Iterations/min of the last --measure-layouts in this workdir (warm-up iterations skipped)."""
    parts = []
    for nproc, tp in LAYOUTS:
        lines = _read_metrics(os.path.join(_layout_dir(workdir, nproc, tp), "gil_s1"))[2:]
        if lines:
            parts.append(f"TP={tp} x {nproc} rank(s): {60.0 / _mean([m['time/step_s'] for m in lines]):.0f}")
    return ("Measured with `--measure-layouts` (GIL, iterations/min): " + "; ".join(parts) + ".") if parts else ""


def measure_layouts(args, paths) -> str:
    """A few GIL iterations at TP1 x 1 rank and at TP2 x 2 ranks; iterations per minute of each."""
    for nproc, tp in LAYOUTS:
        sub = argparse.Namespace(**{**vars(args), "nproc": nproc, "tp": tp, "algos": ["gil"], "seeds": 1,
                                    "iterations": 12, "eval_limit": 8, "fresh": True,
                                    "workdir": _layout_dir(args.workdir, nproc, tp)})
        plan = make_plan(sub, paths)
        plan["jobs"] = [j for j in plan["jobs"] if j["kind"] == "train"]
        launch(sub, plan)
    note = layout_note(args.workdir)
    print(f"[gil_vs_ppo] {note}", flush=True)
    return note


# ---- main -------------------------------------------------------------------------------------


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        run_worker(args.worker)
        return 0
    os.chdir(ROOT)
    if args.tp < 1 or args.nproc % args.tp:
        raise SystemExit(f"error: --nproc {args.nproc} must be a multiple of --tp {args.tp}")
    load = os.getloadavg()[0]
    if load > 3:
        print(f"[gil_vs_ppo] warning: load average {load:.1f} > 3; timings will be slow and noisy", flush=True)
    t0 = time.time()
    paths = ensure_stages(args)
    if args.measure_layouts:
        measure_layouts(args, paths)
        return 0
    plan = make_plan(args, paths)
    ran = launch(args, plan)
    elapsed = time.time() - t0
    timing_path = os.path.join(args.workdir, "timing.json")
    if ran or not os.path.isfile(timing_path):
        with open(timing_path, "w") as f:
            json.dump({"elapsed_s": elapsed, "jobs": ran, "load_average_at_start": load}, f)
    with open(timing_path) as f:
        timing = json.load(f)
    agg = aggregate(args, plan)
    note = (f"Layout: TP={args.tp} x {args.nproc} rank(s). " + layout_note(args.workdir)).strip()
    text = write_results(args, plan, agg, timing, note)
    plots = make_plots(args, plan, agg)
    print(text, flush=True)
    if args.results:
        os.makedirs(args.results, exist_ok=True)
        shutil.copy(os.path.join(args.workdir, "gil_vs_ppo.md"), os.path.join(args.results, "gil_vs_ppo.md"))
        for p in plots:
            shutil.copy(p, os.path.join(args.results, os.path.basename(p)))
    print(f"[gil_vs_ppo] done in {elapsed / 60:.1f} min; table and plots in {args.workdir}"
          + (f" (copied to {args.results})" if args.results else ""), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
