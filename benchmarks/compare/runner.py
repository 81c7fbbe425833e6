"""Runs: plan them, reuse the finished ones, train and evaluate the rest one at a time.

A run is (arm, seed): the engine's PPO trainer started from the task's SFT policy with the task's
reward, then a greedy evaluation of the final policy on the task's eval (and OOD) prompts. Every
sample is written (runs/NAME/samples.jsonl.gz: prompt, group, response, reward, gold, hack, kl, ...);
eval.json, written last, marks the run finished and holds its fingerprint. The run directory keeps
the engine's config.json, metrics.jsonl and final model (model/); its training checkpoint is
deleted. A fixed-policy arm (the SFT start) is evaluated only.

Fingerprint (a run is reused iff it matches): sha256 over the run's engine overrides (without
run_dir), the base config's content, the task's files (prompt files' content; the policy and
reward-model directories' file names, sizes and mtimes), the source of every module the task's
functions live in, the evaluation settings (prompts per group, lengths, batch size), and the
engine: the content of gil_megatron/**/*.py, csrc/** and this file. Editing the report, plots or
statistics reuses every run; editing the engine or the task re-runs them.

Launch: the pending runs go to ONE ``torchrun`` (task.nproc ranks, one thread each; default one
rank at TP=1, which the old harness measured fastest for the miniature: 261 against 152
iterations/min at TP=2 on 2 ranks) that runs them one after another (``main`` below).
"""

import dataclasses
import glob
import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

from benchmarks.compare.spec import Arm, Protocol, Task

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENGINE_PATTERNS = ("gil_megatron/**/*.py", "csrc/**/*")
STEPS_KEY = "train.steps"  # the engine's key for the number of PPO iterations


@dataclass
class Run:
    """One planned run."""

    name: str
    arm: str
    seed: Optional[int]
    kind: str  # train | policy
    run_dir: str
    overrides: List[str]
    """Engine config overrides (train runs), applied on top of the task's base config."""
    policy: Optional[str] = None
    """Fixed-policy runs: the model directory evaluated."""
    eval_reward_model: bool = False
    """Train runs on gold: the task's reward model must be loaded to score the evaluation."""
    fingerprint: str = ""


# ---------------------------------------------------------------------------------------------
# Planning
# ---------------------------------------------------------------------------------------------


def engine_overrides(task: Task, protocol: Protocol, arm: Arm, seed: int, run_dir: str, iterations: int) -> List[str]:
    """The engine config of one training run, as dotted overrides in the order they apply: what the
    task fixes (policy, reward, prompts, lengths), the harness' run settings, then the task's,
    the protocol's and the arm's own overrides (later ones win). Every engine key the harness sets
    is here."""
    if arm.reward == "gold":
        if task.gold is None:
            raise ValueError(f"arm {arm.name} trains on gold, but the task has no gold function")
        reward = ["models.reward_model=null", f"models.reward_fn={task.gold}"]
    elif task.reward_is_function:
        reward = ["models.reward_model=null", f"models.reward_fn={task.reward}"]
    else:
        reward = [f"models.reward_model={task.reward}", "models.reward_fn=null"]
    known = []
    if arm.known_groups:
        if not task.easy_groups or not task.hard_groups:
            raise ValueError(f"arm {arm.name} uses known groups, but the task names no easy_groups / hard_groups")
        known = ["gil.inference=known", *(f"gil.known_groups.{g}=0" for g in task.easy_groups),
                 *(f"gil.known_groups.{g}=1" for g in task.hard_groups)]
    return [f"algo={arm.algo}", f"seed={seed}", f"run_dir={run_dir}", f"parallel.tp={task.tp}",
            f"models.actor={task.policy}", *reward,
            f"models.gold_reward_fn={task.gold}" if task.gold else "models.gold_reward_fn=null",
            f"data.train_prompts={task.prompts['train']}", f"data.max_prompt_length={task.max_prompt_length}",
            f"rollout.max_new_tokens={task.max_new_tokens}", f"{STEPS_KEY}={iterations}",
            "train.eval_every=0", "train.save_every=0", "checkpoint.resume=none", "checkpoint.keep_last=1",
            "logging.progress=false", *known, *task.overrides, *protocol.overrides, *arm.overrides]


def plan_runs(task: Task, protocol: Protocol, arms: Sequence[Arm], workdir: str, *, iterations: int,
              eval_per_group: int, quick: bool = False) -> List[Run]:
    """Every run of the selected arms (with --quick: the first seed of each), fingerprinted."""
    common = {"task": task_signature(task), "eval_per_group": eval_per_group, "engine": engine_signature()}
    runs = []
    for arm in arms:
        if not arm.trains:
            policy = task.policy if arm.policy == "sft" else arm.policy
            run_dir = os.path.join(workdir, "runs", arm.name)
            fp = {**common, "kind": "policy", "policy": dir_signature(policy)}
            runs.append(Run(arm.name, arm.name, None, "policy", run_dir, [], policy, fingerprint=_sha(fp)))
            continue
        for seed in arm.seeds[:1] if quick else arm.seeds:
            name = f"{arm.name}_s{seed}"
            run_dir = os.path.join(workdir, "runs", name)
            ov = engine_overrides(task, protocol, arm, seed, run_dir, iterations)
            fp = {**common, "kind": "train", "overrides": [o for o in ov if not o.startswith("run_dir=")]}
            runs.append(Run(name, arm.name, seed, "train", run_dir, ov,
                            eval_reward_model=arm.reward == "gold" and not task.reward_is_function,
                            fingerprint=_sha(fp)))
    return runs


def check_runs(task: Task, runs: Sequence[Run]) -> None:
    """Every training run's config loads and every fixed policy exists (an arm whose algo or key
    this checkout lacks fails here, in one line, before any run starts)."""
    from gil_megatron.config import ConfigError, PPOConfig, load_config

    seen = set()
    for run in runs:
        if run.kind == "policy" and not os.path.isfile(os.path.join(run.policy, "gil_megatron.json")):
            raise ValueError(f"arm {run.arm}: policy {run.policy} is not a model directory (no gil_megatron.json)")
        if run.kind != "train" or run.arm in seen:
            continue
        seen.add(run.arm)
        try:
            load_config(PPOConfig, task.config, run.overrides)
        except (ConfigError, ValueError) as exc:
            raise ValueError(f"arm {run.arm}: {str(exc).splitlines()[0]}") from None


def finished(run: Run) -> bool:
    path = os.path.join(run.run_dir, "eval.json")
    if not os.path.isfile(path):
        return False
    with open(path) as f:
        return json.load(f).get("fingerprint") == run.fingerprint


# ---- signatures --------------------------------------------------------------------------------


def _sha(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def file_sha(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def dir_signature(path: str) -> str:
    """Names, sizes and mtimes of a model directory's files (cheap for any model size)."""
    entries = []
    for f in sorted(glob.glob(os.path.join(path, "**", "*"), recursive=True)):
        if os.path.isfile(f):
            st = os.stat(f)
            entries.append((os.path.relpath(f, path), st.st_size, st.st_mtime_ns))
    return _sha(entries)


def engine_signature() -> str:
    files = sorted({f for pat in ENGINE_PATTERNS for f in glob.glob(os.path.join(ROOT, pat), recursive=True)
                    if os.path.isfile(f) and "__pycache__" not in f})
    return _sha([(os.path.relpath(f, ROOT), file_sha(f)) for f in [*files, os.path.abspath(__file__)]])


def function_sources(task: Task) -> Dict[str, str]:
    """spec -> sha256 of the source file of its module (imported with the task's pythonpath)."""
    import importlib

    for p in reversed(task.pythonpath):
        if p not in sys.path:
            sys.path.insert(0, p)
    out = {}
    specs = [task.gold, task.hack, *task.scores.values(), task.reward if task.reward_is_function else None]
    for spec in filter(None, specs):
        module = importlib.import_module(spec.partition(":")[0])
        out[spec] = file_sha(module.__file__) if getattr(module, "__file__", None) else spec
    return out


def task_signature(task: Task) -> str:
    files = {k: (file_sha(p) if os.path.isfile(p) else dir_signature(p)) for k, p in task.prompts.items()}
    return _sha({"prompts": files, "policy": dir_signature(task.policy),
                 "reward": task.reward if task.reward_is_function else dir_signature(task.reward),
                 "functions": function_sources(task), "scores": task.scores, "gold": task.gold, "hack": task.hack,
                 "config": file_sha(task.config) if task.config else None, "layout": [task.nproc, task.tp],
                 "lengths": [task.max_prompt_length, task.max_new_tokens], "eval_batch_size": task.eval_batch_size})


def git_state() -> dict:
    """The checkout's commit and whether it has uncommitted changes."""
    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return None

    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(status) if status is not None else None}


def file_provenance(path: str) -> dict:
    """A committed file's git blob hash, the last commit that changed it and whether the working
    copy differs from that commit (then it was not pre-registered as run)."""
    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=os.path.dirname(path), capture_output=True, text=True,
                                  check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return None

    rel = os.path.relpath(path, ROOT) if path.startswith(ROOT + os.sep) else path
    committed = git("ls-files", "--error-unmatch", path) is not None
    return {"path": rel, "blob": git("hash-object", path),
            "commit": git("log", "-1", "--format=%H", "--", path) if committed else None,
            "committed": committed and git("diff", "--quiet", "HEAD", "--", path) is not None}


# ---------------------------------------------------------------------------------------------
# Launch (driver side)
# ---------------------------------------------------------------------------------------------


def python() -> str:
    return os.environ.get("PYTHON") or sys.executable


def launch(task: Task, runs: Sequence[Run], workdir: str, eval_per_group: int, provenance: dict,
           log=print) -> int:
    """Train and evaluate the runs in one torchrun launch; returns how many ran. ``provenance``
    (the task and protocol files' git blobs) goes into every run's eval.json."""
    if not runs:
        return 0
    for run in runs:
        if os.path.isdir(run.run_dir):
            shutil.rmtree(run.run_dir)  # a stale or half-finished run: its fingerprint does not match
    os.makedirs(workdir, exist_ok=True)
    tag = hashlib.sha1(" ".join(r.name for r in runs).encode()).hexdigest()[:8]
    plan_path = os.path.join(workdir, f"plan_{tag}.json")
    with open(plan_path, "w") as f:
        json.dump({"task": dataclasses.asdict(task), "eval_per_group": eval_per_group, "git": git_state(),
                   "provenance": provenance, "runs": [dataclasses.asdict(r) for r in runs]}, f, indent=1)
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([*task.pythonpath, ROOT, *filter(None, [os.environ.get("PYTHONPATH")])])}
    cmd = [python(), "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(task.nproc),
           "-m", "benchmarks.compare.runner", plan_path]
    log(f"{len(runs)} run(s) to train/evaluate: {', '.join(r.name for r in runs)} "
        f"(TP={task.tp} on {task.nproc} rank(s))")
    proc = subprocess.run(cmd, cwd=ROOT, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"the runs' launch failed with status {proc.returncode}: {' '.join(cmd)}")
    return len(runs)


# ---------------------------------------------------------------------------------------------
# The worker (under torchrun): train, evaluate, write, one run after another
# ---------------------------------------------------------------------------------------------


def _eval_sets(task: Task, tokenizer, per_group: int):
    from gil_megatron.data import PromptDataset, load_prompts

    out = {}
    for name, path in task.eval_sets.items():
        ds = load_prompts(path, tokenizer, max_prompt_length=task.max_prompt_length)
        if per_group:
            seen: Dict[Optional[str], int] = {}
            keep = []
            for i, g in enumerate(ds.groups):  # the first N prompts of each group, in file order
                if seen.get(g, 0) < per_group:
                    keep.append(i)
                    seen[g] = seen.get(g, 0) + 1
            ds = PromptDataset([ds.prompt_ids[i] for i in keep], [ds.prompts[i] for i in keep],
                               [ds.groups[i] for i in keep], ds.source)
        out[name] = ds
    return out


def _score_text(spec: str, prompts: List[str], responses: List[str]) -> List[float]:
    from gil_megatron.ppo.rewards import RewardFunction

    return RewardFunction(spec)(prompts, responses).tolist()


def evaluate(task: Task, actor, reference, tokenizer, datasets, *, reward_model=None, critic=None,
             group_level: str = "prompt") -> Dict[str, List[dict]]:
    """Greedy responses on every eval set, scored: the task's reward, gold (the reward when the
    task has none), hack, extra scores, the exact KL to the SFT policy summed over response tokens
    and, with a GIL critic, the inferred group. {set: [record]} on every rank."""
    from gil_megatron.data import pad_token_id
    from gil_megatron.ppo.evaluation import Scorers, evaluate_policy
    from gil_megatron.ppo.rewards import RewardFunction
    from gil_megatron.ppo.rollout import SamplingSettings

    pad = pad_token_id(tokenizer)
    scorers = Scorers(tokenizer=tokenizer, pad_token_id=pad, reward_model=reward_model,
                      reward_fn=RewardFunction(task.reward) if task.reward_is_function else None,
                      gold_fn=RewardFunction(task.gold) if task.gold else None, reference=reference, critic=critic,
                      group_level=group_level)
    greedy = SamplingSettings(max_new_tokens=task.max_new_tokens, greedy=True, eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=pad)
    samples = evaluate_policy(actor, datasets, scorers, greedy, batch_size=task.eval_batch_size,
                              micro_batch_size=task.eval_batch_size)
    out = {}
    for set_name, recs in samples.items():
        prompts, responses = [r["prompt"] for r in recs], [r["response"] for r in recs]
        extra = {name: _score_text(spec, prompts, responses) for name, spec in task.scores.items()}
        hack = _score_text(task.hack, prompts, responses) if task.hack else None
        rows = []
        for i, r in enumerate(recs):
            reward = r["reward_fn"] if task.reward_is_function else r["reward_model"]
            row = {"index": r["index"], "prompt": r["prompt"], "group": r["group"], "response": r["response"],
                   "reward": reward, "gold": r.get("gold", reward), "hack": hack[i] if hack else None,
                   "kl": r["kl_to_ref"], "response_length": r["response_length"],
                   **{name: vals[i] for name, vals in extra.items()}}
            if "inferred_group" in r:
                row["inferred_group"] = r["inferred_group"]
                row["group_probs"] = r["group_probs"]
            rows.append(row)
        out[set_name] = rows
    return out


def write_run(run_dir: str, samples: Dict[str, List[dict]], info: dict) -> None:
    os.makedirs(run_dir, exist_ok=True)
    with gzip.open(os.path.join(run_dir, "samples.jsonl.gz"), "wt") as f:
        for set_name, recs in samples.items():
            for r in recs:
                f.write(json.dumps({"set": set_name, **r}) + "\n")
    tmp = os.path.join(run_dir, "eval.json.tmp")
    with open(tmp, "w") as f:
        json.dump(info, f, indent=1)
    os.replace(tmp, os.path.join(run_dir, "eval.json"))  # written last: marks the run finished


def read_samples(run_dir: str) -> Dict[str, List[dict]]:
    out: Dict[str, List[dict]] = {}
    path = os.path.join(run_dir, "samples.jsonl.gz")
    if os.path.isfile(path):
        with gzip.open(path, "rt") as f:
            for line in f:
                r = json.loads(line)
                out.setdefault(r.pop("set"), []).append(r)
    return out


def read_metrics(run_dir: str) -> List[dict]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def main(plan_path: str) -> None:
    import gc

    import torch

    from gil_megatron.config import PPOConfig, load_config
    from gil_megatron.models.build import load_tokenizer, model_from_checkpoint
    from gil_megatron.parallel import distributed
    from gil_megatron.ppo.trainer import PPOTrainer

    torch.set_num_threads(1)
    with open(plan_path) as f:
        plan = json.load(f)
    task = Task(**{k: tuple(v) if isinstance(v, list) else v for k, v in plan["task"].items()})
    tokenizer = load_tokenizer(task.policy)
    datasets = _eval_sets(task, tokenizer, plan["eval_per_group"])
    for r in plan["runs"]:
        run = Run(**r)
        t0 = time.perf_counter()
        info = {"fingerprint": run.fingerprint, "run": r, "git": plan["git"], "provenance": plan["provenance"]}
        if run.kind == "policy":
            layout = distributed.initialize(task.tp, 1, seed=0)
            sft = model_from_checkpoint(task.policy, "actor", layout, trainable=False)
            policy = sft if os.path.samefile(run.policy, task.policy) else model_from_checkpoint(
                run.policy, "actor", layout, trainable=False)
            rm = None if task.reward_is_function else model_from_checkpoint(task.reward, "reward", layout,
                                                                            trainable=False)
            samples = evaluate(task, policy, sft, tokenizer, datasets, reward_model=rm)
            info["eval_s"] = time.perf_counter() - t0
            del policy, sft, rm
        else:
            cfg = load_config(PPOConfig, task.config, run.overrides)
            cfg.data.eval_prompts = {}  # the harness evaluates the final policy itself (below)
            try:
                trainer = PPOTrainer(cfg)
                trainer.train()
            except FloatingPointError as exc:  # a diverged run is a result (collapse), not a crash
                if distributed.is_rank0():
                    write_run(run.run_dir, {}, {**info, "failed": str(exc)})
                    print(f"[compare] {run.name}: FAILED ({exc})", flush=True)
                gc.collect()
                continue
            info["train_s"] = time.perf_counter() - t0
            info["iterations"] = trainer.iteration
            rm = trainer.reward_model
            if run.eval_reward_model:
                rm = model_from_checkpoint(task.reward, "reward", trainer.layout, trainable=False)
            critic = trainer.critic if trainer.algo.group_inference else None
            samples = evaluate(task, trainer.actor, trainer.reference, tokenizer, datasets, reward_model=rm,
                               critic=critic, group_level=trainer.params.gil.group_level)
            info["eval_s"] = time.perf_counter() - t0 - info["train_s"]
            del trainer, rm, critic
        if distributed.is_rank0():
            write_run(run.run_dir, samples, info)
            # the final policy stays in RUN_DIR/model; the training checkpoint (optimizer state, ~8x
            # its size) is never resumed (checkpoint.resume=none)
            shutil.rmtree(os.path.join(run.run_dir, "checkpoints"), ignore_errors=True)
            gold = " ".join(f"{n} {sum(x['gold'] for x in recs) / len(recs):.3f}" for n, recs in samples.items())
            timing = f"train {info['train_s']:.0f} s, " if "train_s" in info else ""
            print(f"[compare] {run.name}: {timing}eval {info['eval_s']:.0f} s; gold {gold}", flush=True)
        gc.collect()
    distributed.destroy()


if __name__ == "__main__":
    main(sys.argv[1])
