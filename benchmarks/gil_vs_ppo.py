"""GIL-PPO against PPO on the embedded miniature: pre-registered arms, seeds, one budget, honest numbers.

What it measures (the paper's claims, arXiv 2310.11971, on the miniature of docs/design.md): a
*protocol* is a fixed table of arms; an arm is (name, algo, dotted config overrides, seeds). Every
trained arm starts from the same SFT policy, trains for the same iterations and rollout batch
(examples/configs/miniature.yaml plus the arm's overrides) against the same reward model (or, for
reference rows, against the TRUE reward through `models.reward_fn`), and its final policy is
evaluated greedily on the held-out in-distribution prompts (eval) and held-out-symbol prompts (ood):

    gold / worst family   true reward mean on eval and OOD, and the lowest of the five families' means
    family gap            best - worst family gold (eval)
    proxy - gold          the flawed labeller's score minus gold on eval (reward hacking)
    evasion               share of hard-family prompts answered "idk" (gold 0, paid by the proxy)
    KL to SFT             exact KL to the SFT policy summed over response tokens (nats)
    groups                agreement of the critic's inferred groups with easy/hard families on eval,
                          beside the majority-share baseline (one group for everything)
    minority mass         min over groups g of group/{g}/mass (last 20% of iterations)
    weights               gil/weight_min, _max, _mean, _clip_frac (last 20% of iterations)
    win/tie/lose          paired per prompt and seed against PPO at the same KL coefficient
and, for protocols with a KL grid, the pre-registered win rule (WIN_RULE below), computed with a
paired bootstrap, and a gold-vs-KL frontier plot. Nothing is tuned on the results.

Protocols (--protocol; `--list` prints every arm):
    gil_v2    the pre-registered comparison: ppo and gil at ppo.kl_coef in {0.02, 0.05, 0.1}, seeds
              101-105; controls at the config's kl_coef, seeds 101-103 (gil_v1, gil_no_invariance,
              gil_no_adaptive_kl, gil_known, gil_shuffled_weights, gil_response_whitened); reference
              rows ppo_gold (PPO on the true reward, seeds 101-103) and the SFT start: 51 training
              runs and one evaluation.
    v1        the first table: ppo, ppo_no_kl, gil, gil_no_adaptive_kl, gil_no_invariance x seeds 1-3,
              SFT and DPO.
    headroom  PPO on the true reward, seeds 1-3, and the SFT start (benchmarks/results/headroom.md).
    smoke     ppo, gil, ppo_gold (seed 1) and SFT: what --quick runs unless --protocol is given.

Hardware: a 2-core CPU. Runs are sequential (one training job at a time) inside ONE torchrun launch
(one thread per rank); finished runs are skipped on a re-launch. Default layout TP=1 on 1 rank:
measured 261 iterations/min against 152 for TP=2 on 2 ranks (`--measure-layouts`), since at this
size the per-layer gloo all-reduces cost more than the halved matmuls save.
Command:   python benchmarks/gil_vs_ppo.py --protocol gil_v2   (51 runs x 300 iterations, see below)
           python benchmarks/gil_vs_ppo.py --quick             (smoke: 4 jobs, 3 iterations, 40 prompts)
Time: the v1 table ran 17 jobs in 20.9 min (1.2 min per run, load average 1.4), so gil_v2 needs
about 51 x 1.2 = 65 min on an otherwise idle 2-core VM; PPO runs of the frozen miniature took
2.4-4.6 min each (train + eval) at load average 10-21, i.e. ~3.5 h for gil_v2 on a busy machine.
--quick used 39 s of CPU (3.4 min wall at load average 21).
           python benchmarks/gil_vs_ppo.py --protocol v1       (the first table)
           python benchmarks/gil_vs_ppo.py --measure-layouts   (iterations/min at TP1xNPROC1 vs TP2xNPROC2)
It reuses the embedded default's data, SFT policy and reward model (runs/miniature/...), running
examples/run_gil_ppo.sh's stages first when they are missing. Results: the table (table.md), one
JSON with every run's numbers (runs.json, so mean ± std can be re-derived) and the plots, in the
work directory and copied to benchmarks/results/<protocol>/.
Batch arithmetic: the miniature config's 64 prompts per iteration, 2 mini-batches of 32, 1 epoch.
"""

import argparse
import gc
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("OMP_NUM_THREADS", "1")

CONFIG = os.path.join("examples", "configs", "miniature.yaml")
MINI = os.path.join("runs", "miniature")
GOLD_FN = "gil_megatron.miniature.task:gold_reward"
PROXY_FN = "gil_megatron.miniature.task:proxy_reward"
# Measured with --measure-layouts on the 2-core development VM (see the report in the README):
# TP=1 on one rank gives more iterations per minute than TP=2 on two ranks at this model size.
DEFAULT_NPROC, DEFAULT_TP = 1, 1
DEFAULT_ITERATIONS = 300
LAST_FRACTION = 0.2  # training diagnostics: the last 20% of iterations
COLLAPSE_FRACTION = 0.1
BOOTSTRAP_SAMPLES = 4000
BOOTSTRAP_SEED = 0


# =============================================================================================
# Arms and protocols (pre-registered: change them only before a protocol's first run)
# =============================================================================================


@dataclass(frozen=True)
class Arm:
    """One row of a protocol's table."""

    name: str
    """Row name; runs are named {name}_s{seed}."""
    algo: str
    """Trainer algo (config key `algo`), or "policy" for a fixed policy that is only evaluated."""
    overrides: Tuple[str, ...] = ()
    """Dotted config overrides on top of the protocol's config (e.g. "ppo.kl_coef=0.02")."""
    seeds: Tuple[int, ...] = ()
    """Training seeds; empty for a fixed policy."""
    reward: str = "reward_model"
    """What the arm trains on: "reward_model" (the flawed proxy RM) or "gold" (the true reward)."""
    kl_coef: Optional[float] = None
    """ppo.kl_coef of a KL-grid arm (the frontier's x grouping); None off the grid."""
    policy: str = ""
    """For algo="policy": which fixed policy ("sft" or "dpo")."""
    note: str = ""

    @property
    def trains(self) -> bool:
        return self.algo != "policy"


def _grid_arm(algo: str, kl: float, seeds: Tuple[int, ...]) -> Arm:
    return Arm(f"{algo}_kl{kl:g}", algo, (f"ppo.kl_coef={kl:g}",), seeds, kl_coef=kl,
               note=f"primary: {algo} at ppo.kl_coef={kl:g}")


SFT_ARM = Arm("sft", "policy", policy="sft", note="reference: the SFT start (KL 0)")
DPO_ARM = Arm("dpo", "policy", policy="dpo", note="baseline: DPO on the same preference pairs")
KL_GRID = (0.02, 0.05, 0.1)
SEEDS_5, SEEDS_3 = (101, 102, 103, 104, 105), (101, 102, 103)  # fresh: earlier tables used 1-3

def _known_group_overrides() -> Tuple[str, ...]:
    """gil.known_groups for the oracle arm: easy families -> group 0, hard -> group 1."""
    from gil_megatron.miniature.task import FAMILIES

    return tuple(f"gil.known_groups.{f.name}={int(f.difficulty == 'hard')}" for f in FAMILIES)


KNOWN_GROUPS = _known_group_overrides()
# critic-free baselines: 16 prompts x 4 samples = the same 64 sequences per iteration
N_SAMPLES = ("rollout.batch_size=16", "rollout.n_samples_per_prompt=4")

PROTOCOLS: Dict[str, Tuple[Arm, ...]] = {
    "gil_v2": (
        *(_grid_arm(a, kl, SEEDS_5) for kl in KL_GRID for a in ("ppo", "gil")),
        Arm("gil_v1", "gil_v1", (), SEEDS_3, note="control: GIL v1 (response-level, unweighted, beta_policy 1)"),
        Arm("gil_no_invariance", "gil_no_invariance", (), SEEDS_3, note="control: adaptive KL only"),
        Arm("gil_no_adaptive_kl", "gil_no_group_kl", (), SEEDS_3, note="control: invariance term only"),
        Arm("gil_known", "gil", ("gil.inference=known", *KNOWN_GROUPS), SEEDS_3,
            note="control: oracle groups (the known easy/hard families)"),
        Arm("gil_shuffled_weights", "gil_shuffled_weights", (), SEEDS_3,
            note="control: invariance weights randomly permuted within the batch"),
        Arm("gil_response_whitened", "gil", ("gil.group_level=response", "gil.performance=whitened_score"),
            SEEDS_3, note="control: paper-literal head p(g | x, y) on the whitened RM score"),
        Arm("ppo_gold", "ppo", (), SEEDS_3, reward="gold", note="reference: PPO on the TRUE reward (headroom)"),
        SFT_ARM,
    ),
    "v1": (
        *(Arm(a, a, (), (1, 2, 3)) for a in ("ppo", "ppo_no_kl", "gil", "gil_no_adaptive_kl", "gil_no_invariance")),
        SFT_ARM, DPO_ARM,
    ),
    "critic_free": (
        Arm("grpo", "grpo", N_SAMPLES, SEEDS_3, note="baseline: GRPO (n = 4, KL in the loss)"),
        Arm("rloo", "rloo", N_SAMPLES, SEEDS_3, note="baseline: RLOO (n = 4)"),
        Arm("reinforce_pp", "reinforce_pp", (), SEEDS_3, note="baseline: REINFORCE++"),
        SFT_ARM,
    ),
    "headroom": (
        Arm("ppo_gold", "ppo", (), (1, 2, 3), reward="gold", note="PPO on the TRUE reward"),
        SFT_ARM,
    ),
    "smoke": (
        Arm("ppo", "ppo", (), (1,)), Arm("gil", "gil", (), (1,)),
        Arm("ppo_gold", "ppo", (), (1,), reward="gold", note="PPO on the TRUE reward"),
        SFT_ARM,
    ),
}

WIN_RULE = (
    "Win rule (pre-registered in issue 11; computed, never tuned). At each ppo.kl_coef of the grid, pair "
    "gil and ppo by seed index and prompt (same eval/OOD prompts, same seed) and bootstrap the difference "
    "gil - ppo (seeds and prompts resampled with replacement, prompts within their family, "
    f"{BOOTSTRAP_SAMPLES} resamples): the kl_coef passes when the 95% CI of the worst-family gold difference "
    "is above 0 on eval AND on OOD, and the mean gold difference (point estimate) is >= -0.01 on eval and "
    "on OOD. Matched KL: every gil point (mean KL to SFT, mean eval gold) lies on or above PPO's frontier "
    "(the piecewise-linear curve through the SFT start at KL 0 and the ppo points sorted by KL, flat beyond "
    "the largest KL), within 0.005. GIL WINS when every kl_coef passes and the frontier condition holds."
)


# =============================================================================================
# Command line
# =============================================================================================


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Protocols: " + ", ".join(PROTOCOLS) + " (--list shows their arms).")
    p.add_argument("--protocol", default=None, choices=sorted(PROTOCOLS),
                   help="the pre-registered set of arms (default gil_v2; --quick: smoke)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: the first seed of each arm, 3 iterations, the first 40 prompts of each set")
    p.add_argument("--arms", nargs="+", default=None, metavar="NAME", help="only these arms of the protocol")
    p.add_argument("--list", action="store_true", help="print the protocol's arms and exit")
    p.add_argument("--iterations", type=int, default=None,
                   help=f"PPO iterations per run (default {DEFAULT_ITERATIONS}; --quick 3)")
    p.add_argument("--eval-limit", type=int, default=None,
                   help="first N prompts of each eval set (default all; --quick 40)")
    p.add_argument("--nproc", type=int, default=DEFAULT_NPROC, help="ranks (one thread each)")
    p.add_argument("--tp", type=int, default=DEFAULT_TP, help="tensor-parallel size")
    p.add_argument("--config", default=CONFIG, help="the PPO config every run starts from")
    p.add_argument("--data", default=None, help="miniature data directory (default runs/miniature/data)")
    p.add_argument("--sft", default=None, help="SFT policy directory (default runs/miniature/sft/model)")
    p.add_argument("--reward-model", default=None,
                   help="reward model directory (default runs/miniature/reward_model/model); optional when "
                        "no arm trains on it (then used for the RM-score column only if present)")
    p.add_argument("--dpo", default=None,
                   help="DPO policy directory for protocols with a dpo arm (default runs/miniature/dpo/model, "
                        "trained with examples/configs/dpo_miniature.yaml when missing)")
    p.add_argument("--workdir", default=None, help="runs, plots and the table (default runs/gil_vs_ppo/<protocol>)")
    p.add_argument("--results", default=None,
                   help="where the table, runs.json and the plots are copied (default "
                        "benchmarks/results/<protocol>; --quick: none)")
    p.add_argument("--overrides", nargs="*", default=[], metavar="KEY=VALUE",
                   help="extra config overrides for every run (e.g. rollout.batch_size=32)")
    p.add_argument("--fresh", action="store_true", help="re-run finished runs instead of reusing them")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: aggregate the runs that are finished (a partial table says which are missing)")
    p.add_argument("--measure-layouts", action="store_true",
                   help="time a few GIL iterations at TP1 x 1 rank and TP2 x 2 ranks, print iterations/min, exit")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: run a plan under torchrun
    args = p.parse_args(argv)
    q = args.quick
    args.protocol = args.protocol or ("smoke" if q else "gil_v2")
    arms = list(PROTOCOLS[args.protocol])
    if args.arms:
        unknown = sorted(set(args.arms) - {a.name for a in arms})
        if unknown:
            p.error(f"--arms {' '.join(unknown)}: not in protocol {args.protocol}; valid: "
                    + ", ".join(a.name for a in arms))
        arms = [a for a in arms if a.name in args.arms]
    if q:  # the first seed of each arm
        arms = [Arm(**{**a.__dict__, "seeds": a.seeds[:1]}) for a in arms]
    args.arm_list = arms
    args.iterations = args.iterations if args.iterations is not None else (3 if q else DEFAULT_ITERATIONS)
    args.eval_limit = args.eval_limit if args.eval_limit is not None else (40 if q else 0)
    args.workdir = args.workdir or os.path.join("runs", "gil_vs_ppo" + ("_quick" if q else ""), args.protocol)
    if args.results is None and not q:
        args.results = os.path.join("benchmarks", "results", args.protocol)
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


def _evaluate(plan, actor, tokenizer, pad_id, reward_model, reference, critic, datasets, group_level="prompt"):
    from gil_megatron.ppo.evaluation import Scorers, evaluate_policy
    from gil_megatron.ppo.rewards import RewardFunction
    from gil_megatron.ppo.rollout import SamplingSettings

    scorers = Scorers(tokenizer=tokenizer, pad_token_id=pad_id, reward_model=reward_model,
                      reward_fn=RewardFunction(PROXY_FN), gold_fn=RewardFunction(GOLD_FN),
                      reference=reference, critic=critic, group_level=group_level)
    greedy = SamplingSettings(max_new_tokens=plan["max_new_tokens"], greedy=True,
                              eos_token_id=tokenizer.eos_token_id, pad_token_id=pad_id)
    return evaluate_policy(actor, datasets, scorers, greedy, batch_size=plan["eval_batch_size"],
                           micro_batch_size=plan["eval_batch_size"])


def _write_eval(run_dir: str, samples, extra: dict) -> None:
    from gil_megatron.ppo.evaluation import summarize_set

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

    from gil_megatron.config import PPOConfig, load_config
    from gil_megatron.data import load_prompts, pad_token_id
    from gil_megatron.models.build import load_tokenizer, model_from_checkpoint
    from gil_megatron.parallel import distributed
    from gil_megatron.ppo.trainer import PPOTrainer

    torch.set_num_threads(1)
    with open(plan_path) as f:
        plan = json.load(f)
    tokenizer = load_tokenizer(plan["sft"])
    pad_id = pad_token_id(tokenizer)
    datasets = {name: _subset(load_prompts(path, tokenizer, max_prompt_length=plan["max_prompt_length"]),
                              plan["eval_limit"]) for name, path in plan["eval_sets"].items()}
    eval_rm = plan.get("reward_model")  # scores every policy's responses, also those trained on gold

    def load_rm(layout):
        return model_from_checkpoint(eval_rm, "reward", layout, trainable=False) if eval_rm else None

    for job in plan["jobs"]:
        t0 = time.perf_counter()
        if job["kind"] == "policy":  # a fixed policy (SFT, DPO): evaluation only, KL to the SFT policy
            layout = distributed.initialize(plan["tp"], 1, seed=0)
            policy = model_from_checkpoint(job["policy"], "actor", layout, trainable=False)
            sft = model_from_checkpoint(plan["sft"], "actor", layout, trainable=False)
            rm = load_rm(layout)
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
            critic = trainer.critic if trainer.algo.group_inference else None
            rm = trainer.reward_model if trainer.reward_model is not None else load_rm(trainer.layout)
            samples = _evaluate(plan, trainer.actor, tokenizer, pad_id, rm, trainer.reference, critic, datasets,
                                group_level=trainer.params.gil.group_level)
            extra = {"job": job, "train_s": train_s, "eval_s": time.perf_counter() - t0 - train_s,
                     "iterations": trainer.iteration}
            del trainer, rm
        if distributed.is_rank0():
            _write_eval(job["run_dir"], samples, extra)
            gold = {n: sum(r["gold"] for r in recs) / len(recs) for n, recs in samples.items()}
            timing = f"train {extra['train_s']:.0f} s, " if "train_s" in extra else ""
            print(f"[gil_vs_ppo] {job['name']}: {timing}eval {extra['eval_s']:.0f} s; gold "
                  + " ".join(f"{n} {v:.3f}" for n, v in gold.items()), flush=True)
        gc.collect()
    distributed.destroy()


# =============================================================================================
# The driver: stages, plan, one torchrun launch
# =============================================================================================


def _python() -> str:
    venv = os.path.join(ROOT, ".venv", "bin", "python")
    return os.environ.get("PYTHON") or (venv if os.path.exists(venv) else sys.executable)


def _run(cmd: List[str], env: Optional[dict] = None) -> None:
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    if proc.returncode != 0:
        raise SystemExit(f"error: command failed with status {proc.returncode}: {' '.join(cmd)}")


def ensure_stages(args) -> Dict[str, str]:
    """Data, SFT policy and reward model of the embedded default (and the DPO baseline when an arm
    needs it); runs the missing stages: examples/run_gil_ppo.sh's steps 1-4 (then a 0-iteration PPO
    start as a smoke check) and tools/train_dpo.py with examples/configs/dpo_miniature.yaml."""
    needs_rm = any(a.trains and a.reward == "reward_model" for a in args.arm_list)
    paths = {"data": args.data or os.path.join(MINI, "data"),
             "sft": args.sft or os.path.join(MINI, "sft", "model"),
             "reward_model": args.reward_model or os.path.join(MINI, "reward_model", "model")}
    defaults = not (args.data or args.sft or args.reward_model)
    markers = {"data": "meta.json", "sft": "gil_megatron.json", "reward_model": "gil_megatron.json"}
    missing = [k for k, rel in markers.items() if not os.path.isfile(os.path.join(ROOT, paths[k], rel))]
    if not needs_rm and "reward_model" in missing and not args.reward_model:
        missing.remove("reward_model")  # only the RM-score column needs it: leave it out
        paths.pop("reward_model")
    if missing and not defaults:
        raise SystemExit("error: not found: " + ", ".join(f"--{m.replace('_', '-')} {paths[m]}" for m in missing))
    stage_env = {"NPROC": "2", "PYTHON": _python()}  # the stage configs are written for TP=2 on 2 ranks
    if missing:
        print(f"[gil_vs_ppo] missing {', '.join(missing)}: running the embedded default's stages "
              "(examples/run_gil_ppo.sh)", flush=True)
        _run(["bash", "examples/run_gil_ppo.sh", "train.steps=0", "logging.progress=false",
              f"run_dir={os.path.join(args.workdir, 'stage_check')}"], env=stage_env)
    if any(a.policy == "dpo" for a in args.arm_list):
        dpo = args.dpo or os.path.join(MINI, "dpo", "model")
        if not os.path.isfile(os.path.join(ROOT, dpo, "gil_megatron.json")):
            if args.dpo:
                raise SystemExit(f"error: --dpo {dpo}: no such model directory")
            print("[gil_vs_ppo] training the DPO baseline (examples/configs/dpo_miniature.yaml)", flush=True)
            _run([_python(), "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                  "tools/train_dpo.py", "examples/configs/dpo_miniature.yaml", "logging.progress=false"])
        paths["dpo"] = dpo
    return paths


def _run_name(arm: Arm, seed: Optional[int]) -> str:
    return arm.name if seed is None else f"{arm.name}_s{seed}"


def make_plan(args, paths) -> dict:
    data = paths["data"]
    eval_sets = {"eval": os.path.join(data, "prompts_eval.jsonl"), "ood": os.path.join(data, "prompts_ood.jsonl")}
    rm = paths.get("reward_model")
    fingerprint = {"iterations": args.iterations, "config": args.config, "sft": os.path.abspath(paths["sft"]),
                   "reward_model": os.path.abspath(rm) if rm else None, "eval_limit": args.eval_limit,
                   "overrides": args.overrides, "tp": args.tp, "nproc": args.nproc}
    jobs = []
    for arm in args.arm_list:
        if not arm.trains:
            jobs.append({"kind": "policy", "name": arm.name, "arm": arm.name, "policy": paths[arm.policy],
                         "run_dir": os.path.join(args.workdir, arm.name),
                         "fingerprint": {**fingerprint, "policy": os.path.abspath(paths[arm.policy])}})
            continue
        reward = ([f"models.reward_model={rm}"] if arm.reward == "reward_model"
                  else ["models.reward_model=null", f"models.reward_fn={GOLD_FN}"])
        for seed in arm.seeds:
            name = _run_name(arm, seed)
            run_dir = os.path.join(args.workdir, name)
            overrides = [
                f"algo={arm.algo}", f"seed={seed}", f"run_dir={run_dir}", f"parallel.tp={args.tp}",
                f"models.actor={paths['sft']}", *reward, f"models.gold_reward_fn={GOLD_FN}",
                f"data.train_prompts={os.path.join(data, 'prompts_train.jsonl')}",
                f"train.steps={args.iterations}", "train.eval_every=0",
                "train.save_every=0", "checkpoint.resume=none", "checkpoint.keep_last=1", "logging.progress=false",
                *arm.overrides, *args.overrides]
            jobs.append({"kind": "train", "name": name, "arm": arm.name, "algo": arm.algo, "seed": seed,
                         "run_dir": run_dir, "overrides": overrides,
                         "fingerprint": {**fingerprint, "job_overrides": overrides}})
    return {"config": _base_config(args), "sft": paths["sft"], "reward_model": rm, "tp": args.tp,
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


def check_plan(plan: dict) -> None:
    """Every training job's config must load before anything runs (an arm whose algo or key this
    checkout lacks fails here, in one line, instead of after an hour of other runs)."""
    from gil_megatron.config import ConfigError, PPOConfig, load_config

    bad = {}
    for job in plan["jobs"]:
        if job["kind"] == "train" and job["arm"] not in bad:
            try:
                load_config(PPOConfig, plan["config"], job["overrides"])
            except (ConfigError, ValueError) as exc:
                bad[job["arm"]] = str(exc).splitlines()[0]
    if bad:
        raise SystemExit("error: these arms do not load in this checkout (pick others with --arms): "
                         + "; ".join(f"{a}: {e}" for a, e in bad.items()))


def _finished(job) -> bool:
    path = os.path.join(job["run_dir"], "eval.json")
    if not os.path.isfile(path):
        return False
    with open(path) as f:
        return json.load(f).get("job", {}).get("fingerprint") == job["fingerprint"]


def launch(args, plan: dict) -> int:
    pending = [j for j in plan["jobs"] if args.fresh or not _finished(j)]
    if not pending:
        print("[gil_vs_ppo] every run is finished already (use --fresh to redo them)", flush=True)
        return 0
    for job in pending:
        shutil.rmtree(job["run_dir"], ignore_errors=True)
    plan = {**plan, "jobs": pending}
    os.makedirs(args.workdir, exist_ok=True)
    # one plan file per set of jobs: several launches on disjoint --arms may share a workdir
    tag = hashlib.sha1(" ".join(j["name"] for j in pending).encode()).hexdigest()[:8]
    plan_path = os.path.abspath(os.path.join(args.workdir, f"plan_{tag}.json"))
    with open(plan_path, "w") as f:
        json.dump(plan, f, indent=1)
    print(f"[gil_vs_ppo] {len(pending)} job(s): {', '.join(j['name'] for j in pending)} "
          f"(TP={args.tp}, {args.nproc} rank(s), {args.iterations} iterations each)", flush=True)
    _run([_python(), "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.nproc),
          os.path.abspath(__file__), "--worker", plan_path])
    return len(pending)


# =============================================================================================
# Aggregation: per run, per arm (mean ± std over seeds), paired comparisons, the win rule
# =============================================================================================


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


def _finite(xs):
    return [x for x in xs if isinstance(x, (int, float)) and not (isinstance(x, float) and math.isnan(x))]


def _mean(xs):
    xs = _finite(xs)
    return sum(xs) / len(xs) if xs else float("nan")


def _std(xs):
    """Sample standard deviation over seeds (0 for one seed)."""
    xs = _finite(xs)
    if len(xs) < 2:
        return 0.0 if xs else float("nan")
    m = _mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def _load_samples(run_dir: str) -> Dict[str, List[dict]]:
    out: Dict[str, List[dict]] = {}
    path = os.path.join(run_dir, "samples.jsonl")
    if os.path.isfile(path):
        with open(path) as f:
            for line in f:
                r = json.loads(line)
                out.setdefault(r["set"], []).append(r)
    return out


def evasion_rate(records: Sequence[dict]) -> float:
    """Share of hard-family prompts answered exactly 'idk' (the proxy pays for it, gold does not)."""
    hard = {k for k, v in _difficulty_map().items() if v == "hard"}
    rows = [r for r in records if r.get("group") in hard]
    return sum(r["response"].strip() == "idk" for r in rows) / len(rows) if rows else float("nan")


def run_metrics(run_dir: str) -> dict:
    """Every number of one run (see the module docstring); empty when the run is missing. Runs that
    trained on a reward function have no trained-on reward model: their RM score comes from the
    protocol's reward model when one was given (else it is absent)."""
    path = os.path.join(run_dir, "eval.json")
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        ev = json.load(f)
    if "failed" in ev:
        return {"failed": True, "collapsed": 1.0}
    lines = _read_metrics(run_dir)
    samples = _load_samples(run_dir)
    e, o = ev["sets"]["eval"], ev["sets"]["ood"]
    g, og = e["scores"]["gold"], o["scores"]["gold"]
    m = {"gold": g["mean"], "worst_group": g["worst_known"], "worst_group_name": g["worst_known_group"],
         "gap": g["known_gap"], "ood_gold": og["mean"], "ood_worst_group": og["worst_known"],
         "ood_worst_group_name": og["worst_known_group"], "proxy_minus_gold": e.get("reward_fn_minus_gold"),
         "rm_score": e["scores"].get("reward_model", {}).get("mean"),
         "evasion": evasion_rate(samples.get("eval", [])), "ood_evasion": evasion_rate(samples.get("ood", [])),
         "kl_to_sft": e.get("kl_to_ref", {}).get("mean"), "ood_kl_to_sft": o.get("kl_to_ref", {}).get("mean"),
         "families": g["known_groups"], "ood_families": og["known_groups"], "train_s": ev.get("train_s"),
         "eval_s": ev.get("eval_s"), "iterations": ev.get("iterations")}
    ig = e.get("inferred_groups")
    if ig:  # evaluation.inferred_group_summary: easy/hard agreement and its one-group baseline
        m["agreement_easy_hard"] = ig.get("agreement_mapped")
        m["agreement_baseline"] = ig.get("agreement_mapped_one_group")
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
        tail = lines[-max(1, int(round(len(lines) * LAST_FRACTION))):]
        masses = [[v for k, v in x.items() if k.startswith("group/") and k.endswith("/mass")] for x in tail]
        if any(masses):
            m["minority_mass"] = _mean([min(ms) for ms in masses if ms])
        steps = [x["time/step_s"] for x in lines if "time/step_s" in x]
        m["iter_per_min"] = 60.0 / _mean(steps) if steps else float("nan")
    return m


DIAGNOSTICS = [  # training metrics averaged over the last 20% of iterations: (metrics.jsonl key, name)
    ("policy/entropy", "entropy"), ("rollout/response_length", "response_length"), ("kl/mean", "train_kl"),
    ("kl/sample_coef_mean", "kl_coef_effective"), ("gil/known_agreement", "agreement_families"),
    ("gil/weight_min", "weight_min"), ("gil/weight_max", "weight_max"), ("gil/weight_mean", "weight_mean"),
    ("gil/weight_clip_frac", "weight_clip_frac"),
]

COLUMNS = [  # (key, header, format) of the main table
    ("gold", "gold eval", "{:.3f}"),
    ("worst_group", "worst family eval", "{:.3f}"),
    ("ood_gold", "gold OOD", "{:.3f}"),
    ("ood_worst_group", "worst family OOD", "{:.3f}"),
    ("gap", "family gap", "{:.3f}"),
    ("proxy_minus_gold", "proxy − gold", "{:.3f}"),
    ("rm_score", "RM score", "{:.2f}"),
    ("evasion", "idk rate (hard)", "{:.3f}"),
    ("kl_to_sft", "KL to SFT", "{:.2f}"),
]
DIAG_COLUMNS = [  # (key, header, format) of the diagnostics table
    ("agreement_easy_hard", "groups vs easy/hard (eval)", "{:.2f}"),
    ("agreement_baseline", "majority share", "{:.2f}"),
    ("agreement_families", "gil/known_agreement", "{:.2f}"),
    ("minority_mass", "minority mass", "{:.2f}"),
    ("weight_min", "w min", "{:.2f}"), ("weight_max", "w max", "{:.2f}"), ("weight_mean", "w mean", "{:.2f}"),
    ("weight_clip_frac", "w clip frac", "{:.2f}"),
    ("entropy", "entropy", "{:.3f}"), ("train_kl", "KL (k1, train)", "{:.2f}"),
    ("kl_coef_effective", "eff. KL coef", "{:.4f}"), ("reward_std_last", "reward std", "{:.3f}"),
]


def _arm_runs(plan: dict, arm: str) -> List[dict]:
    return [j for j in plan["jobs"] if j["arm"] == arm]


def aggregate(args, plan) -> dict:
    per_run = {j["name"]: run_metrics(j["run_dir"]) for j in plan["jobs"]}
    rows = {}
    for arm in args.arm_list:
        runs = [per_run[j["name"]] for j in _arm_runs(plan, arm.name)]
        ok = [r for r in runs if r and not r.get("failed")]
        row = {k: (_mean([r.get(k) for r in ok]), _std([r.get(k) for r in ok]) if arm.trains else None)
               for k, _, _ in COLUMNS + DIAG_COLUMNS}
        row["runs"] = f"{len(ok)}/{len(runs)}"
        row["collapsed"] = int(sum(r.get("collapsed", 0) for r in runs if r)) if arm.trains else None
        row["families"] = {s: {f: _mean([r[key].get(f) for r in ok]) for f in (ok[0][key] if ok else {})}
                           for s, key in (("eval", "families"), ("ood", "ood_families"))}
        row["minutes_per_run"] = _mean([((r.get("train_s") or 0) + (r.get("eval_s") or 0)) / 60 for r in ok])
        rows[arm.name] = row
    return {"per_run": per_run, "rows": rows, "wtl": win_tie_lose_tables(args, plan),
            "win_rule": win_rule(args, plan, rows)}


def _pairs(args, plan, a: str, b: str) -> List[Tuple[dict, dict]]:
    """(job of arm a, job of arm b) paired by seed index; a fixed policy pairs with every seed."""
    ja, jb = _arm_runs(plan, a), _arm_runs(plan, b)
    if len(jb) == 1 and jb[0]["kind"] == "policy":
        jb = jb * len(ja)
    return [(x, y) for x, y in zip(ja, jb) if _finished(x) and _finished(y)]


def win_tie_lose_tables(args, plan) -> dict:
    """Each GIL-like arm against PPO at the same kl_coef (or the default-kl PPO arm), against PPO on
    gold and the SFT start; judged by gold per prompt (evaluation.compare_policies), tie margin 0,
    pooled over the paired seeds."""
    from omegaconf import OmegaConf

    from gil_megatron.ppo.evaluation import compare_policies

    names = [a.name for a in args.arm_list]
    default_kl = OmegaConf.load(plan["config"]).get("ppo", {}).get("kl_coef")  # the controls' kl_coef
    default_ppo = next((n for n in (f"ppo_kl{default_kl:g}" if default_kl is not None else "", "ppo")
                        if n in names), None)
    out = {}
    for arm in args.arm_list:
        if not arm.trains or arm.algo == "ppo" or arm.algo == "ppo_no_kl":
            continue
        ppo = f"ppo_kl{arm.kl_coef:g}" if arm.kl_coef is not None else default_ppo
        for other in [x for x in (ppo, "ppo_gold", "sft") if x in names]:
            per_set: Dict[str, Dict[str, int]] = {}
            for ja, jb in _pairs(args, plan, arm.name, other):
                sa, sb = _load_samples(ja["run_dir"]), _load_samples(jb["run_dir"])
                for set_name in sa:
                    if set_name in sb:
                        w = compare_policies(sa[set_name], sb[set_name], "gold")
                        acc = per_set.setdefault(set_name, {"n": 0, "win": 0.0, "tie": 0.0, "lose": 0.0})
                        for k in ("win", "tie", "lose"):
                            acc[k] += w[k] * w["n"]
                        acc["n"] += w["n"]
            if per_set:
                out[f"{arm.name} vs {other}"] = {s: {k: v / acc["n"] for k, v in acc.items() if k != "n"}
                                                 for s, acc in per_set.items()}
    return out


def _gold_matrix(jobs: Sequence[dict], set_name: str):
    """[seeds, prompts] gold of each job's greedy responses (rows ordered by prompt index) and the
    prompts' families."""
    import numpy as np

    rows, families = [], None
    for job in jobs:
        recs = sorted(_load_samples(job["run_dir"])[set_name], key=lambda r: r["index"])
        rows.append([r["gold"] for r in recs])
        families = [r["group"] for r in recs] if families is None else families
    return np.asarray(rows, dtype=np.float64), families


def paired_bootstrap(a, b, families: Sequence[str], n: Optional[int] = None, seed: int = BOOTSTRAP_SEED) -> dict:
    """Paired bootstrap of (A - B) for mean gold and worst-family gold.

    a, b: [S, P] per-(seed index, prompt) gold of two arms on the same prompts, row s of a paired
    with row s of b. Each of the n resamples draws S seed indices with replacement and, within each
    family, that family's prompts with replacement (the same draw for both arms); a statistic is
    computed on the resampled block of each arm and the difference taken. Returns the point
    estimates and 95% percentile intervals: {mean: (diff, lo, hi), worst: (diff, lo, hi)}."""
    import numpy as np

    n = n or BOOTSTRAP_SAMPLES
    rng = np.random.default_rng(seed)
    fam_idx = [np.flatnonzero(np.asarray(families) == f) for f in sorted(set(families))]
    counts = np.array([len(idx) for idx in fam_idx], dtype=np.float64)
    S = a.shape[0]

    def stats(x, seed_idx, prompt_idx):  # x [S, P]; seed_idx [n, S]; prompt_idx[f] [n, P_f] -> [n], [n]
        fam_means = np.stack([x[seed_idx[:, :, None], idx[:, None, :]].mean(axis=(1, 2)) for idx in prompt_idx], 1)
        return fam_means @ counts / counts.sum(), fam_means.min(axis=1)

    ident = (np.arange(S)[None, :], [idx[None, :] for idx in fam_idx])
    (ma, wa), (mb, wb) = stats(a, *ident), stats(b, *ident)
    seed_idx = rng.integers(0, S, (n, S))
    prompt_idx = [idx[rng.integers(0, len(idx), (n, len(idx)))] for idx in fam_idx]
    (xa, ya), (xb, yb) = stats(a, seed_idx, prompt_idx), stats(b, seed_idx, prompt_idx)
    out = {}
    for key, point, diffs in (("mean", ma[0] - mb[0], xa - xb), ("worst", wa[0] - wb[0], ya - yb)):
        lo, hi = np.percentile(diffs, [2.5, 97.5])
        out[key] = (float(point), float(lo), float(hi))
    return out


def frontier_gold(ppo_points: Sequence[Tuple[float, float]], sft_gold: float, kl: float) -> float:
    """PPO's gold at a given KL to SFT: piecewise-linear through (0, SFT gold) and the ppo points
    sorted by KL, flat beyond the largest KL."""
    pts = [(0.0, sft_gold)] + sorted(ppo_points)
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= kl <= x1:
            return y0 + (y1 - y0) * ((kl - x0) / (x1 - x0) if x1 > x0 else 1.0)
    return pts[-1][1]


FRONTIER_TOLERANCE = 0.005


def win_rule(args, plan, rows) -> Optional[dict]:
    """The pre-registered decision (WIN_RULE) for protocols with a ppo/gil kl_coef grid."""
    grid = sorted({a.kl_coef for a in args.arm_list if a.kl_coef is not None})
    names = {a.name for a in args.arm_list}
    if not grid or "sft" not in rows or not all(f"{x}_kl{k:g}" in names for k in grid for x in ("ppo", "gil")):
        return None
    per_kl = {}
    for k in grid:
        pairs = _pairs(args, plan, f"gil_kl{k:g}", f"ppo_kl{k:g}")
        if not pairs:
            return None
        entry = {"seeds_paired": len(pairs)}
        for set_name in ("eval", "ood"):
            a, fams = _gold_matrix([x for x, _ in pairs], set_name)
            b, _ = _gold_matrix([y for _, y in pairs], set_name)
            entry[set_name] = paired_bootstrap(a, b, fams)
        entry["passes"] = bool(entry["eval"]["worst"][1] > 0 and entry["ood"]["worst"][1] > 0
                               and entry["eval"]["mean"][0] >= -0.01 and entry["ood"]["mean"][0] >= -0.01)
        per_kl[f"{k:g}"] = entry
    ppo_pts = [(rows[f"ppo_kl{k:g}"]["kl_to_sft"][0], rows[f"ppo_kl{k:g}"]["gold"][0]) for k in grid]
    sft_gold = rows["sft"]["gold"][0]
    margins = {f"{k:g}": rows[f"gil_kl{k:g}"]["gold"][0]
               - frontier_gold(ppo_pts, sft_gold, rows[f"gil_kl{k:g}"]["kl_to_sft"][0]) for k in grid}
    frontier_ok = all(m >= -FRONTIER_TOLERANCE for m in margins.values())
    win = frontier_ok and all(e["passes"] for e in per_kl.values())
    return {"per_kl": per_kl, "frontier_margin": margins, "frontier_ok": frontier_ok, "win": win}


# =============================================================================================
# Output: table, JSON, plots
# =============================================================================================


def _cell(value, fmt) -> str:
    mean, std = value if isinstance(value, tuple) else (value, None)
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "–"
    return fmt.format(mean) + (f" ± {fmt.format(std)}" if std is not None else "")


def markdown_table(args, agg: dict) -> str:
    rows = agg["rows"]
    arms = {a.name: a for a in args.arm_list}
    head = ["arm", "runs"] + [h for _, h, _ in COLUMNS] + ["collapsed"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, row in rows.items():
        coll = "–" if row["collapsed"] is None else str(row["collapsed"])
        lines.append("| " + " | ".join([name, row["runs"]] + [_cell(row[k], f) for k, _, f in COLUMNS] + [coll]) + " |")
    lines += ["", "Groups and weights (GIL arms; training metrics over the last 20% of iterations), mean ± std:", "",
              "| arm | " + " | ".join(h for _, h, _ in DIAG_COLUMNS) + " |", "|" + "---|" * (len(DIAG_COLUMNS) + 1)]
    for name, row in rows.items():
        if arms[name].trains:
            lines.append("| " + " | ".join([name] + [_cell(row[k], f) for k, _, f in DIAG_COLUMNS]) + " |")
    fams = sorted({f for row in rows.values() for f in row["families"]["eval"]})
    if fams:
        lines += ["", "Gold per family (eval | OOD), mean over seeds:", "",
                  "| arm | " + " | ".join(fams) + " |", "|" + "---|" * (len(fams) + 1)]
        for name, row in rows.items():
            cells = [f"{_cell(row['families']['eval'].get(f), '{:.3f}')} \\| "
                     f"{_cell(row['families']['ood'].get(f), '{:.3f}')}" for f in fams]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if agg["wtl"]:
        lines += ["", "Win / tie / lose by gold per prompt, paired by seed and prompt (pooled over seeds):", "",
                  "| comparison | eval win | eval tie | eval lose | OOD win | OOD tie | OOD lose |",
                  "|---|---|---|---|---|---|---|"]
        for comp, sets in agg["wtl"].items():
            cells = []
            for set_name in ("eval", "ood"):
                w = sets.get(set_name, {})
                cells += [f"{100 * w[x]:.1f}%" if x in w else "–" for x in ("win", "tie", "lose")]
            lines.append(f"| {comp} | " + " | ".join(cells) + " |")
    wr = agg["win_rule"]
    if wr:
        lines += ["", WIN_RULE, "", "| kl_coef | seeds | Δ worst eval [95% CI] | Δ worst OOD [95% CI] | "
                  "Δ mean eval | Δ mean OOD | gil − PPO frontier | passes |", "|---|---|---|---|---|---|---|---|"]
        for k, e in wr["per_kl"].items():
            ci = lambda t: f"{t[0]:+.3f} [{t[1]:+.3f}, {t[2]:+.3f}]"  # noqa: E731
            lines.append(f"| {k} | {e['seeds_paired']} | {ci(e['eval']['worst'])} | {ci(e['ood']['worst'])} | "
                         f"{e['eval']['mean'][0]:+.3f} | {e['ood']['mean'][0]:+.3f} | "
                         f"{wr['frontier_margin'][k]:+.3f} | {'yes' if e['passes'] else 'no'} |")
        lines += ["", f"**Verdict: {'GIL WINS' if wr['win'] else 'GIL does not win'}** (frontier condition "
                  f"{'holds' if wr['frontier_ok'] else 'fails'}; kl_coefs passing: "
                  f"{sum(e['passes'] for e in wr['per_kl'].values())}/{len(wr['per_kl'])})."]
    return "\n".join(lines)


def write_results(args, plan, agg, timing: dict, layout_note: str) -> str:
    n_train = sum(j["kind"] == "train" for j in plan["jobs"])
    mins = _mean([r.get("minutes_per_run") for r in agg["rows"].values()])
    cmd = "python benchmarks/gil_vs_ppo.py" + (" --quick" if args.quick else "") + f" --protocol {args.protocol}"
    header = [
        f"# GIL-PPO vs PPO on the embedded miniature: protocol `{args.protocol}`",
        "",
        f"Command: `{cmd}` ({len(args.arm_list)} arms, {n_train} training runs of {args.iterations} iterations "
        f"of 64 prompts each, TP={args.tp} on {args.nproc} rank(s); {timing['elapsed_s'] / 60:.1f} min wall for the "
        f"launch that ran {timing['jobs']} job(s) on a shared 2-core CPU, load average "
        f"{timing['load_average_at_start']:.1f} at its start; {mins:.1f} min per training run incl. evaluation). "
        f"{layout_note}",
        "",
        "Arms: " + "; ".join(f"`{a.name}` = algo {a.algo}" + (f" {' '.join(a.overrides)}" if a.overrides else "")
                             + (" on the TRUE reward" if a.reward == "gold" and a.trains else "")
                             + (f", seeds {a.seeds[0]}-{a.seeds[-1]}" if len(a.seeds) > 1 else f", seed {a.seeds[0]}" if a.seeds else "") for a in args.arm_list) + ".",
        "",
        "Evaluation: greedy responses on the held-out eval prompts and the OOD prompts (held-out symbols), "
        f"{'first ' + str(args.eval_limit) + ' prompts of each set, ' if args.eval_limit else ''}"
        "mean ± std over seeds. gold = true reward; worst family = lowest family mean; family gap = best − worst "
        "family (eval); proxy − gold = the flawed labeller's score minus gold (hacking); RM score = the "
        "protocol's reward model on the responses; idk rate = share of hard-family eval prompts answered `idk`; "
        "KL to SFT = exact KL summed over response tokens (eval); collapsed = runs whose training gold in the "
        "last 10% fell below half of the first 10% (or diverged). Groups: agreement of the critic's inferred "
        "groups (argmax) with easy/hard on eval, next to the majority share (one group for everything); "
        "minority mass = min over g of group/{g}/mass.",
        "",
    ]
    text = "\n".join(header) + "\n" + markdown_table(args, agg) + "\n"
    os.makedirs(args.workdir, exist_ok=True)
    with open(os.path.join(args.workdir, "table.md"), "w") as f:
        f.write(text)
    arms = {a.name: {**a.__dict__, "runs": [j["name"] for j in _arm_runs(plan, a.name)]} for a in args.arm_list}
    with open(os.path.join(args.workdir, "runs.json"), "w") as f:
        json.dump({"protocol": args.protocol, "iterations": args.iterations, "eval_limit": args.eval_limit,
                   "arms": arms, "per_run": agg["per_run"], "win_tie_lose": agg["wtl"], "win_rule": agg["win_rule"],
                   "win_rule_text": WIN_RULE if agg["win_rule"] else None, "timing": timing},
                  f, indent=1, default=lambda x: None)
    return text


# ---- plots ------------------------------------------------------------------------------------


def _arm_color(arm: Arm) -> str:
    base = {"ppo": "tab:red", "gil": "tab:blue", "policy": "black"}
    if arm.reward == "gold" and arm.trains:
        return "tab:green"
    return base.get(arm.algo, "tab:gray")


def _curves(plan, arm: str, key: str):
    runs = [_read_metrics(j["run_dir"]) for j in _arm_runs(plan, arm)]
    series = [[m.get(key) for m in lines] for lines in runs if lines]
    series = [s for s in series if s and all(isinstance(v, (int, float)) for v in s)]
    if not series:
        return None
    n = min(len(s) for s in series)
    w = max(1, n // 15)
    sm = []
    for s in series:  # running mean over a window of n/15 iterations
        sm.append([sum(s[max(0, i - w + 1):i + 1]) / len(s[max(0, i - w + 1):i + 1]) for i in range(n)])
    mean = [sum(col) / len(col) for col in zip(*sm)]
    return list(range(1, n + 1)), mean


def make_plots(args, plan, agg) -> List[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, out = agg["rows"], []
    arms = args.arm_list

    # 1. frontier: gold vs KL to SFT (mean ± std over seeds) for every trained arm and the SFT start
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for ax, (key, title) in zip(axes, (("gold", "mean gold, eval"), ("worst_group", "worst-family gold, eval"),
                                       ("ood_gold", "mean gold, OOD"))):
        for algo in ("ppo", "gil"):
            line = sorted((rows[a.name]["kl_to_sft"][0], rows[a.name][key][0]) for a in arms
                          if a.kl_coef is not None and a.algo == algo and not math.isnan(rows[a.name][key][0]))
            if line and "sft" in rows:
                line = [(0.0, rows["sft"][key][0])] + line
                ax.plot(*zip(*line), color={"ppo": "tab:red", "gil": "tab:blue"}[algo], lw=1, alpha=0.6)
        for a in arms:
            x, y = rows[a.name]["kl_to_sft"], rows[a.name][key]
            if math.isnan(y[0]):
                continue
            marker = "o" if a.kl_coef is not None else ("*" if not a.trains else "s")
            ax.errorbar(x[0] if not math.isnan(x[0]) else 0.0, y[0], xerr=x[1] or None, yerr=y[1] or None,
                        fmt=marker, color=_arm_color(a), ms=7 if a.kl_coef is not None else 6, capsize=2)
            ax.annotate(a.name, (x[0] if not math.isnan(x[0]) else 0.0, y[0]), fontsize=6,
                        xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel("KL to SFT (nats, eval)")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("gold (greedy)")
    fig.suptitle("Gold vs KL to SFT: ppo (red) and gil (blue) across kl_coef; controls grey; "
                 "PPO on the true reward green; SFT start = black star")
    fig.tight_layout()
    out.append(_save(fig, args.workdir, "frontier.png"))

    # 2. per-family gold of the final greedy responses, eval and OOD
    fams = sorted({f for r in rows.values() for f in r["families"]["eval"]})
    if fams:
        fig, axes = plt.subplots(1, 2, figsize=(15, 4.5), sharey=True)
        width = 0.8 / max(1, len(arms))
        for ax, set_name in zip(axes, ("eval", "ood")):
            for i, a in enumerate(arms):
                vals = [rows[a.name]["families"][set_name].get(f, float("nan")) for f in fams]
                ax.bar([j + i * width for j in range(len(fams))], vals, width, color=_arm_color(a),
                       alpha=0.4 + 0.6 * (i + 1) / len(arms), label=a.name)
            ax.set_xticks([j + 0.4 - width / 2 for j in range(len(fams))])
            ax.set_xticklabels([f"{f}\n({_difficulty_map().get(f, '')})" for f in fams], fontsize=8)
            ax.set_title(f"gold per family, {set_name} (mean over seeds)", fontsize=10)
            ax.grid(alpha=0.3, axis="y")
        axes[0].set_ylabel("gold (greedy)")
        axes[1].legend(fontsize=6, ncol=2)
        fig.tight_layout()
        out.append(_save(fig, args.workdir, "per_family_gold.png"))

    # 3. group inference during training: agreement with the families, minority mass
    group_arms = [a for a in arms if a.trains and _curves(plan, a.name, "gil/known_agreement") is not None]
    if group_arms:
        fig, axes = plt.subplots(1, 2, figsize=(12, 4))
        for a in group_arms:
            c = _curves(plan, a.name, "gil/known_agreement")
            axes[0].plot(c[0], c[1], label=a.name, lw=1.2)
            c = _curves(plan, a.name, "group/0/mass")
            if c is not None:
                axes[1].plot(c[0], [min(v, 1 - v) for v in c[1]], label=a.name, lw=1.2)
        axes[0].set_title("gil/known_agreement (inferred groups vs the 5 families)", fontsize=10)
        axes[1].set_title("minority mass (min(group 0 mass, 1 - it); M = 2)", fontsize=10)
        for ax in axes:
            ax.set_xlabel("iteration")
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=6)
        fig.tight_layout()
        out.append(_save(fig, args.workdir, "group_agreement.png"))

    # 4. training curves: trained-on reward, gold, KL (hacking shows as reward up, gold down)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, (key, title) in zip(axes, (("reward/mean", "trained-on reward"), ("reward/gold_mean", "gold reward"),
                                       ("kl/mean", "KL to SFT (k1, nats)"))):
        for a in arms:
            c = _curves(plan, a.name, key) if a.trains else None
            if c is not None:
                ax.plot(c[0], c[1], color=_arm_color(a), lw=1.5 if a.kl_coef or a.reward == "gold" else 0.8,
                        label=a.name)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=6)
    fig.tight_layout()
    out.append(_save(fig, args.workdir, "training_curves.png"))
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
        sub = argparse.Namespace(**{**vars(args), "nproc": nproc, "tp": tp, "arm_list": [Arm("gil", "gil", (), (1,))],
                                    "iterations": 12, "eval_limit": 8, "fresh": True,
                                    "workdir": _layout_dir(args.workdir, nproc, tp)})
        plan = make_plan(sub, paths)
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
    if args.list:
        for a in args.arm_list:
            print(f"{a.name:24s} algo={a.algo:22s} {' '.join(a.overrides):55s} seeds={list(a.seeds)} "
                  f"reward={a.reward if a.trains else '-'}  {a.note}")
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
    check_plan(plan)
    if args.report_only:
        missing = [j["name"] for j in plan["jobs"] if not _finished(j)]
        plan = {**plan, "jobs": [j for j in plan["jobs"] if _finished(j)]}
        if missing:
            print(f"[gil_vs_ppo] report only: {len(missing)} run(s) not finished and left out: {', '.join(missing)}",
                  flush=True)
        ran = 0
    else:
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
        for p in [os.path.join(args.workdir, n) for n in ("table.md", "runs.json")] + plots:
            shutil.copy(p, os.path.join(args.results, os.path.basename(p)))
    print(f"[gil_vs_ppo] done in {elapsed / 60:.1f} min; table, runs.json and plots in {args.workdir}"
          + (f" (copied to {args.results})" if args.results else ""), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
