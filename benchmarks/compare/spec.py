"""Task and protocol files: what is compared, and how (read and validated before anything runs).

A *task* (TASK.yaml) is data: the SFT policy, grouped prompt files, the trained-on reward, the
optional gold / hack / extra score functions, lengths, easy/hard groups and config overrides. A
*protocol* (PROTOCOL.yaml) is data too: arms (algo, overrides, seeds), the training budget, the
matching grid, the comparisons, the win rule and the predictions. Both are committed before any
of their runs (the report records their git blob hashes). Every problem is a ``SpecError`` whose
message is one line naming the file and the key. The keys are listed in benchmarks/compare/__init__.py.

Conditions (win rule, predictions) are one line each, ``LEFT OP RIGHT``:

    frontier A vs B METRIC (gap | ci_low | ci_high)     mean vertical gap of A's frontier over B's
                                                        (stats.frontier_gap), its bootstrap CI
    paired A vs B METRIC (diff | ci_low | ci_high | win | tie | lose)
                                                        per-prompt difference at equal settings; A and
                                                        B may be matched methods: then it must hold at
                                                        every grid value
    arm A METRIC (mean | sd)                            a number of table.json (METRIC may be dotted:
                                                        per_group.copy.gold_eval, hard.hack_rate)

OP is one of < <= > >=; RIGHT is a number or another reference, optionally ``+ NUMBER`` / ``- NUMBER``.
"""

import os
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import yaml


class SpecError(ValueError):
    """A problem with a task or protocol file: one line, naming the file and the key."""


# metrics a comparison may be made on (computed per run from the evaluated samples; stats.py)
SAMPLE_METRICS = ("gold_eval", "worst_group_eval", "gold_ood", "worst_group_ood")
OPS = ("<=", ">=", "<", ">")
FRONTIER_STATS = ("gap", "ci_low", "ci_high")
PAIRED_STATS = ("diff", "ci_low", "ci_high", "win", "tie", "lose")
ARM_STATS = ("mean", "sd")
FIXED_POLICY = "policy"  # an arm's algo for a policy that is evaluated, never trained


def _fail(where: str, msg: str):
    raise SpecError(f"{where}: {msg}")


def _load_yaml(path: str) -> dict:
    if not os.path.isfile(path):
        raise SpecError(f"{path}: no such file")
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as exc:
        raise SpecError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        _fail(path, "must be a mapping of keys (see benchmarks/compare/__init__.py)")
    return data


def _check_keys(where: str, data: dict, required: Sequence[str], optional: Sequence[str]) -> None:
    unknown = sorted(set(data) - set(required) - set(optional))
    if unknown:
        _fail(where, f"unknown key {unknown[0]!r}; valid: {', '.join(list(required) + list(optional))}")
    for key in required:
        if data.get(key) is None:
            _fail(where, f"key {key!r} is required")


def _typed(where: str, key: str, value, types, what: str):
    if not isinstance(value, types) or (isinstance(value, bool) and types is int):  # YAML's true is an int
        _fail(where, f"{key}={value!r} must be {what}")
    return value


def _overrides(where: str, key: str, value) -> Tuple[str, ...]:
    """{dotted.key: value} or ["dotted.key=value", ...] -> ("dotted.key=value", ...)."""
    if value is None:
        return ()
    if isinstance(value, dict):
        return tuple(f"{k}={_override_value(v)}" for k, v in value.items())
    if isinstance(value, list) and all(isinstance(v, str) and "=" in v for v in value):
        return tuple(value)
    _fail(where, f"{key} must be a mapping {{dotted.key: value}} or a list of 'dotted.key=value'")


def _override_value(v) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (dict, list)):
        return yaml.safe_dump(v, default_flow_style=True).strip()
    return str(v)


def _function_spec(where: str, key: str, value) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", value):
        _fail(where, f"{key}={value!r} must look like 'package.module:function'")
    return value


def _resolve(base: str, path: str) -> str:
    return os.path.normpath(path if os.path.isabs(path) else os.path.join(base, path))


# ---------------------------------------------------------------------------------------------
# The task
# ---------------------------------------------------------------------------------------------


@dataclass
class Task:
    """A grouped task (TASK.yaml); every path absolute."""

    path: str
    name: str
    policy: str
    """SFT policy directory (our checkpoint format) that every run starts from and KL is measured to."""
    prompts: Dict[str, str]
    """train, eval and (optional) ood prompt files, each with a `group` column."""
    reward: str
    """Trained-on reward: a reward-model directory, or module:function."""
    reward_is_function: bool
    gold: Optional[str]
    hack: Optional[str]
    scores: Dict[str, str]
    """Extra diagnostic scores {name: module:function}; the report shows each one minus gold."""
    max_prompt_length: int
    max_new_tokens: int
    easy_groups: Tuple[str, ...]
    hard_groups: Tuple[str, ...]
    pythonpath: Tuple[str, ...]
    config: Optional[str]
    """Base PPO config every run starts from (null: the engine's defaults)."""
    overrides: Tuple[str, ...]
    nproc: int = 1
    tp: int = 1
    eval_batch_size: int = 64

    @property
    def eval_sets(self) -> Dict[str, str]:
        return {k: v for k, v in self.prompts.items() if k != "train"}

    @property
    def difficulty(self) -> Dict[str, str]:
        """group -> "easy" / "hard" for the groups the task names."""
        return {**{g: "easy" for g in self.easy_groups}, **{g: "hard" for g in self.hard_groups}}


TASK_REQUIRED = ("name", "policy", "prompts", "reward", "max_prompt_length", "max_new_tokens")
TASK_OPTIONAL = ("gold", "hack", "scores", "easy_groups", "hard_groups", "pythonpath", "config", "overrides",
                 "layout", "eval_batch_size", "description")


def load_task(path: str, check_paths: bool = True) -> Task:
    """TASK.yaml -> Task. Relative paths resolve against the YAML's directory; with ``check_paths``
    the policy, reward model and prompt files must exist."""
    path = os.path.abspath(path)
    d = _load_yaml(path)
    _check_keys(path, d, TASK_REQUIRED, TASK_OPTIONAL)
    base = os.path.dirname(path)
    name = _typed(path, "name", d["name"], str, "a string")
    prompts = d["prompts"]
    if not isinstance(prompts, dict) or "train" not in prompts or "eval" not in prompts:
        _fail(path, "prompts must be a mapping with 'train' and 'eval' files (and optionally 'ood')")
    bad = sorted(set(prompts) - {"train", "eval", "ood"})
    if bad:
        _fail(path, f"prompts.{bad[0]}: unknown prompt set; valid: train, eval, ood")
    prompts = {k: _resolve(base, _typed(path, f"prompts.{k}", v, str, "a file path")) for k, v in prompts.items()}
    reward = _typed(path, "reward", d["reward"], str, "a reward-model directory or 'module:function'")
    reward_is_function = ":" in reward and not os.path.isdir(_resolve(base, reward))
    if reward_is_function:
        _function_spec(path, "reward", reward)
    else:
        reward = _resolve(base, reward)
    gold = _function_spec(path, "gold", d["gold"]) if d.get("gold") is not None else None
    hack = _function_spec(path, "hack", d["hack"]) if d.get("hack") is not None else None
    scores = d.get("scores") or {}
    if not isinstance(scores, dict):
        _fail(path, "scores must be a mapping {name: 'module:function'}")
    scores = {str(k): _function_spec(path, f"scores.{k}", v) for k, v in scores.items()}
    clash = sorted(set(scores) & {"reward", "gold", "hack", "kl"})
    if clash:
        _fail(path, f"scores.{clash[0]}: the name is taken (reward, gold, hack, kl); pick another")
    lengths = {}
    for key in ("max_prompt_length", "max_new_tokens"):
        lengths[key] = _typed(path, key, d[key], int, "a positive integer")
        if lengths[key] < 1:
            _fail(path, f"{key}={lengths[key]} must be a positive integer")
    groups = {}
    for key in ("easy_groups", "hard_groups"):
        v = d.get(key) or []
        if not isinstance(v, list) or not all(isinstance(g, str) for g in v):
            _fail(path, f"{key} must be a list of group names")
        groups[key] = tuple(v)
    both = sorted(set(groups["easy_groups"]) & set(groups["hard_groups"]))
    if both:
        _fail(path, f"group {both[0]!r} is in both easy_groups and hard_groups")
    pythonpath = d.get("pythonpath") or []
    if isinstance(pythonpath, str):
        pythonpath = [pythonpath]
    if not isinstance(pythonpath, list) or not all(isinstance(p, str) for p in pythonpath):
        _fail(path, "pythonpath must be a list of directories")
    config = _resolve(base, _typed(path, "config", d["config"], str, "a YAML path")) if d.get("config") else None
    layout = d.get("layout") or {}
    if not isinstance(layout, dict) or sorted(set(layout) - {"nproc", "tp"}):
        _fail(path, "layout must be a mapping with nproc and/or tp")
    nproc, tp = layout.get("nproc", 1), layout.get("tp", 1)
    if not (isinstance(nproc, int) and isinstance(tp, int) and tp >= 1 and nproc >= 1 and nproc % tp == 0):
        _fail(path, f"layout: nproc={nproc} must be a positive multiple of tp={tp}")
    eval_bs = d.get("eval_batch_size", 64)
    if not isinstance(eval_bs, int) or eval_bs < 1:
        _fail(path, f"eval_batch_size={eval_bs!r} must be a positive integer")
    task = Task(path=path, name=name, policy=_resolve(base, _typed(path, "policy", d["policy"], str, "a directory")),
                prompts=prompts, reward=reward, reward_is_function=reward_is_function, gold=gold, hack=hack,
                scores=scores, max_prompt_length=lengths["max_prompt_length"], max_new_tokens=lengths["max_new_tokens"],
                easy_groups=groups["easy_groups"], hard_groups=groups["hard_groups"],
                pythonpath=tuple(_resolve(base, p) for p in pythonpath), config=config,
                overrides=_overrides(path, "overrides", d.get("overrides")), nproc=nproc, tp=tp,
                eval_batch_size=eval_bs)
    if check_paths:
        check_task_paths(task)
    return task


def check_task_paths(task: Task) -> None:
    """The files and directories a run needs exist (one line naming the key otherwise)."""
    where = task.path
    if not os.path.isfile(os.path.join(task.policy, "gil_megatron.json")):
        _fail(where, f"policy={task.policy}: not a model directory of ours (no gil_megatron.json); "
                     "make it with the task's stages (the miniature: bash examples/run_gil_ppo.sh train.steps=0)")
    if not task.reward_is_function and not os.path.isfile(os.path.join(task.reward, "gil_megatron.json")):
        _fail(where, f"reward={task.reward}: not a reward-model directory (no gil_megatron.json) and not "
                     "'module:function'")
    for k, p in task.prompts.items():
        if not os.path.exists(p):
            _fail(where, f"prompts.{k}={p}: no such file")
    if task.config and not os.path.isfile(task.config):
        _fail(where, f"config={task.config}: no such file")
    for p in task.pythonpath:
        if not os.path.isdir(p):
            _fail(where, f"pythonpath entry {p}: no such directory")


def check_task_functions(task: Task) -> None:
    """Every module:function of the task imports (with the task's pythonpath on sys.path)."""
    import importlib
    import sys

    for p in reversed(task.pythonpath):
        if p not in sys.path:
            sys.path.insert(0, p)
    specs = {"reward": task.reward if task.reward_is_function else None, "gold": task.gold, "hack": task.hack,
             **{f"scores.{k}": v for k, v in task.scores.items()}}
    for key, spec in specs.items():
        if spec is None:
            continue
        module, _, fn = spec.partition(":")
        try:
            mod = importlib.import_module(module)
        except ImportError as exc:
            _fail(task.path, f"{key}={spec!r}: cannot import {module!r} ({exc}); add its directory to pythonpath")
        if not callable(getattr(mod, fn, None)):
            _fail(task.path, f"{key}={spec!r}: module {module!r} has no function {fn!r}")


# ---------------------------------------------------------------------------------------------
# The protocol
# ---------------------------------------------------------------------------------------------


@dataclass
class Arm:
    """One row of the table: an algo with overrides and seeds, or a fixed policy (algo "policy")."""

    name: str
    algo: str
    overrides: Tuple[str, ...] = ()
    seeds: Tuple[int, ...] = ()
    method: str = ""
    """The frontier this arm belongs to: the protocol arm it was expanded from (its own name when
    not matched)."""
    grid_value: Optional[object] = None
    """The matching grid's value of this arm (None when not matched)."""
    reward: str = "task"
    """task (the task's reward) | gold (the task's gold function: a headroom reference)."""
    known_groups: bool = False
    """Train with the task's easy groups as group 0 and hard ones as group 1 (an oracle control)."""
    policy: Optional[str] = None
    """For a fixed policy: "sft" (the task's policy) or a model directory."""
    note: str = ""

    @property
    def trains(self) -> bool:
        return self.algo != FIXED_POLICY


@dataclass(frozen=True)
class Ref:
    """One side of a condition: a statistic of a frontier, a paired comparison or an arm."""

    kind: str  # frontier | paired | arm
    a: str
    b: Optional[str]
    metric: str
    stat: str
    offset: float = 0.0

    def text(self) -> str:
        pair = f"{self.a} vs {self.b}" if self.b else self.a
        off = f" {'+' if self.offset >= 0 else '-'} {abs(self.offset):g}" if self.offset else ""
        return f"{self.kind} {pair} {self.metric} {self.stat}{off}"


@dataclass(frozen=True)
class Condition:
    text: str
    left: Ref
    op: str
    right: object  # float or Ref


@dataclass
class Rule:
    """The win rule or one prediction: text, and machine-checkable conditions that must all hold."""

    text: str
    conditions: Tuple[Condition, ...] = ()


@dataclass
class Protocol:
    path: str
    name: str
    description: str
    iterations: int
    arms: List[Arm]
    """Expanded: one arm per (matched arm, grid value), then the rest in file order."""
    overrides: Tuple[str, ...] = ()
    anchor: Optional[str] = None
    """A fixed-policy arm (e.g. the SFT start, KL 0) whose point every frontier includes."""
    grid_key: Optional[str] = None
    grid_values: Tuple = ()
    frontiers: List[Tuple[str, str, Tuple[str, ...]]] = field(default_factory=list)
    """(method A, method B, metrics) of every frontier comparison."""
    paired: List[Tuple[str, str]] = field(default_factory=list)
    """(arm or method A, arm or method B) of every paired comparison."""
    win_rule: Optional[Rule] = None
    predictions: List[Rule] = field(default_factory=list)
    diagnostics: Dict[str, str] = field(default_factory=dict)
    """{column name: training metric} averaged over the last 20% of iterations."""
    bootstrap_samples: int = 2000
    bootstrap_seed: int = 0

    def arm(self, name: str) -> Arm:
        return next(a for a in self.arms if a.name == name)

    @property
    def methods(self) -> Dict[str, List[str]]:
        """method -> its arms, in protocol order."""
        out: Dict[str, List[str]] = {}
        for a in self.arms:
            out.setdefault(a.method, []).append(a.name)
        return out

    def grid_arms(self, method: str) -> Dict[object, str]:
        """grid value -> arm of a matched method ({} for an unmatched one)."""
        return {a.grid_value: a.name for a in self.arms if a.method == method and a.grid_value is not None}


PROTOCOL_REQUIRED = ("name", "iterations", "arms")
PROTOCOL_OPTIONAL = ("description", "seeds", "overrides", "matching", "anchor", "comparisons", "win_rule",
                     "predictions", "diagnostics", "bootstrap")
ARM_KEYS = ("name", "algo", "overrides", "seeds", "reward", "known_groups", "policy", "note")


def _seeds(where: str, key: str, value) -> Tuple[int, ...]:
    if not isinstance(value, list) or not value or not all(isinstance(s, int) and not isinstance(s, bool)
                                                           for s in value):
        _fail(where, f"{key} must be a non-empty list of integers")
    if len(set(value)) != len(value):
        _fail(where, f"{key}={value} repeats a seed")
    return tuple(value)


def _parse_arms(path: str, d: dict, default_seeds) -> List[Arm]:
    arms = d["arms"]
    if not isinstance(arms, list) or not arms:
        _fail(path, "arms must be a non-empty list")
    out = []
    for i, a in enumerate(arms):
        where = f"{path}: arms[{i}]"
        if not isinstance(a, dict):
            _fail(where, "must be a mapping with name and algo")
        _check_keys(where, a, ("name",), ARM_KEYS[1:])
        name = _typed(where, "name", a["name"], str, "a string")
        if not re.fullmatch(r"[A-Za-z0-9_.\-]+", name):
            _fail(where, f"name={name!r} may only contain letters, digits, _ . -")
        where = f"{path}: arm {name}"
        policy = a.get("policy")
        algo = a.get("algo", FIXED_POLICY if policy else None)
        if algo is None:
            _fail(where, "set algo (an engine algorithm) or policy (a fixed policy: sft or a model directory)")
        if algo == FIXED_POLICY:
            if not policy:
                _fail(where, "a fixed-policy arm needs policy: sft or a model directory")
            bad = [k for k in ("overrides", "seeds", "reward", "known_groups") if k in a]
            if bad:
                _fail(where, f"{bad[0]} does not apply to a fixed policy (it is evaluated, never trained)")
            if policy != "sft":
                policy = _resolve(os.path.dirname(path), policy)
            out.append(Arm(name, algo, policy=policy, method=name, note=str(a.get("note", ""))))
            continue
        if policy:
            _fail(where, "policy is only for fixed-policy arms (algo: policy)")
        seeds = a.get("seeds", default_seeds)
        if seeds is None:
            _fail(where, "seeds: set them on the arm or protocol-wide (seeds: [...])")
        reward = a.get("reward", "task")
        if reward not in ("task", "gold"):
            _fail(where, f"reward={reward!r}; valid: task (the task's reward), gold (the task's gold function)")
        known = a.get("known_groups", False)
        if not isinstance(known, bool):
            _fail(where, f"known_groups={known!r} must be true or false")
        out.append(Arm(name, str(algo), _overrides(where, "overrides", a.get("overrides")),
                       _seeds(where, "seeds", list(seeds)), method=name, reward=reward, known_groups=known,
                       note=str(a.get("note", ""))))
    names = [a.name for a in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        _fail(path, f"arm name {dup[0]!r} is used twice")
    return out


def _expand_matching(path: str, m, arms: List[Arm]) -> Tuple[List[Arm], str, Tuple]:
    where = f"{path}: matching"
    if not isinstance(m, dict):
        _fail(where, "must be a mapping with arms and grid")
    _check_keys(where, m, ("arms", "grid"), ("overrides", "name"))
    grid = m["grid"]
    if not isinstance(grid, dict) or len(grid) != 1:
        _fail(where, "grid must be one {dotted.key: [values]} (e.g. ppo.target_kl: [1, 2, 4, 8])")
    (key, values), = grid.items()
    if not isinstance(values, list) or not values or len(set(map(str, values))) != len(values):
        _fail(where, f"grid.{key} must be a non-empty list of distinct values")
    matched = m["arms"]
    by_name = {a.name: a for a in arms}
    if not isinstance(matched, list) or not matched:
        _fail(where, "arms must be a non-empty list of arm names")
    for n in matched:
        if n not in by_name:
            _fail(where, f"arms: {n!r} is not an arm of this protocol; valid: {', '.join(by_name)}")
        if not by_name[n].trains:
            _fail(where, f"arms: {n!r} is a fixed policy; only trained arms are matched")
    template = m.get("name", "{arm}_{value}")
    if "{arm}" not in template or "{value" not in template:
        _fail(where, f"name={template!r} must contain {{arm}} and {{value}} (e.g. '{{arm}}_kl{{value}}')")
    extra = _overrides(where, "overrides", m.get("overrides"))
    expanded = []
    for v in values:
        for n in matched:
            a = by_name[n]
            expanded.append(Arm(template.format(arm=n, value=v), a.algo,
                                (*a.overrides, *extra, f"{key}={_override_value(v)}"), a.seeds, method=n,
                                grid_value=v, reward=a.reward, known_groups=a.known_groups, note=a.note))
    first = min(i for i, a in enumerate(arms) if a.name in matched)
    rest = [a for a in arms if a.name not in matched]
    out = rest[:first] + expanded + rest[first:]
    names = [a.name for a in out]
    dup = sorted({x for x in names if names.count(x) > 1})
    if dup:
        _fail(where, f"the expanded arm {dup[0]!r} clashes with another arm; change matching.name")
    return out, key, tuple(values)


_NUM = r"[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?"


def parse_ref(tokens: List[str], where: str) -> Tuple[Ref, List[str]]:
    """Consume one reference from the front of ``tokens`` (see the module docstring)."""
    if not tokens:
        _fail(where, "expected a reference (frontier / paired / arm)")
    kind = tokens[0]
    if kind in ("frontier", "paired"):
        if len(tokens) < 6 or tokens[2] != "vs":
            _fail(where, f"expected '{kind} A vs B METRIC STAT'")
        a, b, metric, stat, rest = tokens[1], tokens[3], tokens[4], tokens[5], tokens[6:]
        stats = FRONTIER_STATS if kind == "frontier" else PAIRED_STATS
        if metric not in SAMPLE_METRICS:
            _fail(where, f"metric {metric!r}; valid for {kind}: {', '.join(SAMPLE_METRICS)}")
    elif kind == "arm":
        if len(tokens) < 4:
            _fail(where, "expected 'arm A METRIC STAT'")
        a, b, metric, stat, rest = tokens[1], None, tokens[2], tokens[3], tokens[4:]
        stats = ARM_STATS
    else:
        _fail(where, f"{kind!r}: a reference starts with frontier, paired or arm")
    if stat not in stats:
        _fail(where, f"statistic {stat!r}; valid for {kind}: {', '.join(stats)}")
    offset = 0.0
    if len(rest) >= 2 and rest[0] in ("+", "-") and re.fullmatch(_NUM, rest[1]):
        offset = float(rest[1]) * (1 if rest[0] == "+" else -1)
        rest = rest[2:]
    return Ref(kind, a, b, metric, stat, offset), rest


def parse_condition(text: str, where: str) -> Condition:
    """'LEFT OP RIGHT' -> Condition (references are checked against the protocol later)."""
    if not isinstance(text, str):
        _fail(where, f"condition {text!r} must be a string")
    tokens = text.split()
    where = f"{where}: {text!r}"
    left, rest = parse_ref(tokens, where)
    if not rest or rest[0] not in OPS:
        _fail(where, f"expected an operator ({' '.join(OPS)}) after '{left.text()}'")
    op, rest = rest[0], rest[1:]
    if len(rest) == 1 and re.fullmatch(_NUM, rest[0]):
        return Condition(text, left, op, float(rest[0]))
    right, rest = parse_ref(rest, where)
    if rest:
        _fail(where, f"unexpected {' '.join(rest)!r} at the end")
    return Condition(text, left, op, right)


def _parse_rule(where: str, r) -> Rule:
    if isinstance(r, str):
        return Rule(r)
    if not isinstance(r, dict):
        _fail(where, "must be a text, or a mapping with text and all: [conditions]")
    _check_keys(where, r, ("text",), ("all",))
    conds = r.get("all") or []
    if not isinstance(conds, list):
        _fail(where, "all must be a list of conditions")
    return Rule(str(r["text"]).strip(), tuple(parse_condition(c, where) for c in conds))


def load_protocol(path: str) -> Protocol:
    """PROTOCOL.yaml -> Protocol (matched arms expanded, conditions parsed and checked)."""
    path = os.path.abspath(path)
    d = _load_yaml(path)
    _check_keys(path, d, PROTOCOL_REQUIRED, PROTOCOL_OPTIONAL)
    iterations = d["iterations"]
    if not isinstance(iterations, int) or isinstance(iterations, bool) or iterations < 1:
        _fail(path, f"iterations={iterations!r} must be a positive integer")
    default_seeds = d.get("seeds")
    if default_seeds is not None:
        default_seeds = _seeds(path, "seeds", default_seeds)
    arms = _parse_arms(path, d, list(default_seeds) if default_seeds else None)
    key, values = None, ()
    if d.get("matching") is not None:
        arms, key, values = _expand_matching(path, d["matching"], arms)
    anchor = d.get("anchor")
    if anchor is not None and not any(a.name == anchor and not a.trains for a in arms):
        _fail(path, f"anchor={anchor!r} must name a fixed-policy arm (e.g. the SFT start)")
    p = Protocol(path=path, name=_typed(path, "name", d["name"], str, "a string"),
                 description=str(d.get("description", "")).strip(), iterations=iterations, arms=arms,
                 overrides=_overrides(path, "overrides", d.get("overrides")), anchor=anchor, grid_key=key,
                 grid_values=values)
    _parse_comparisons(p, d.get("comparisons"))
    if d.get("win_rule") is not None:
        p.win_rule = _parse_rule(f"{path}: win_rule", d["win_rule"])
    preds = d.get("predictions") or []
    if not isinstance(preds, list):
        _fail(path, "predictions must be a list")
    p.predictions = [_parse_rule(f"{path}: predictions[{i}]", r) for i, r in enumerate(preds)]
    diag = d.get("diagnostics") or {}
    if not isinstance(diag, dict) or not all(isinstance(v, str) for v in diag.values()):
        _fail(path, "diagnostics must be a mapping {column name: training metric (e.g. policy/entropy)}")
    p.diagnostics = {str(k): v for k, v in diag.items()}
    boot = d.get("bootstrap") or {}
    if not isinstance(boot, dict) or sorted(set(boot) - {"samples", "seed"}):
        _fail(path, "bootstrap must be a mapping with samples and/or seed")
    p.bootstrap_samples = boot.get("samples", p.bootstrap_samples)
    p.bootstrap_seed = boot.get("seed", p.bootstrap_seed)
    if not isinstance(p.bootstrap_samples, int) or p.bootstrap_samples < 100:
        _fail(path, f"bootstrap.samples={p.bootstrap_samples!r} must be an integer >= 100")
    _check_references(p)
    return p


def _parse_comparisons(p: Protocol, c) -> None:
    where = f"{p.path}: comparisons"
    if c is None:
        return
    if not isinstance(c, dict):
        _fail(where, "must be a mapping with frontier and/or paired lists")
    _check_keys(where, c, (), ("frontier", "paired"))
    for i, f in enumerate(c.get("frontier") or []):
        w = f"{where}.frontier[{i}]"
        if not isinstance(f, dict):
            _fail(w, "must be a mapping {a, b, metrics}")
        _check_keys(w, f, ("a", "b"), ("metrics",))
        metrics = tuple(f.get("metrics") or ("gold_eval",))
        bad = [m for m in metrics if m not in SAMPLE_METRICS]
        if bad:
            _fail(w, f"metric {bad[0]!r}; valid: {', '.join(SAMPLE_METRICS)}")
        p.frontiers.append((str(f["a"]), str(f["b"]), metrics))
    for i, f in enumerate(c.get("paired") or []):
        w = f"{where}.paired[{i}]"
        if not isinstance(f, dict):
            _fail(w, "must be a mapping {a, b}")
        _check_keys(w, f, ("a", "b"), ())
        p.paired.append((str(f["a"]), str(f["b"])))


def _check_references(p: Protocol) -> None:
    """Every arm / method a comparison or condition names exists; paired methods share the grid;
    conditions add the comparisons they read."""
    methods = p.methods
    arm_names = [a.name for a in p.arms]

    def check_method(where, name):
        if name not in methods:
            _fail(where, f"{name!r} is not a method (a protocol arm); valid: {', '.join(methods)}")

    def check_pairable(where, a, b):
        for n in (a, b):
            if n not in methods and n not in arm_names:
                _fail(where, f"{n!r} is neither an arm nor a method; valid: {', '.join(arm_names)}")
        ga = p.grid_arms(a) if a in methods else {}
        gb = p.grid_arms(b) if b in methods else {}
        if bool(ga) != bool(gb):
            _fail(where, f"{a} vs {b}: pair two matched methods (compared at each grid value) or two arms")

    for a, b, _ in p.frontiers:
        for n in (a, b):
            check_method(f"{p.path}: comparisons.frontier", n)
    for a, b in p.paired:
        check_pairable(f"{p.path}: comparisons.paired", a, b)
    rules = ([("win_rule", p.win_rule)] if p.win_rule else []) + [(f"predictions[{i}]", r)
                                                                    for i, r in enumerate(p.predictions)]
    for where, rule in rules:
        for c in rule.conditions:
            w = f"{p.path}: {where}: {c.text!r}"
            for ref in (c.left, c.right):
                if not isinstance(ref, Ref):
                    continue
                if ref.kind == "frontier":
                    check_method(w, ref.a)
                    check_method(w, ref.b)
                    entry = next((f for f in p.frontiers if f[:2] == (ref.a, ref.b)), None)
                    if entry is None:
                        p.frontiers.append((ref.a, ref.b, (ref.metric,)))
                    elif ref.metric not in entry[2]:
                        p.frontiers[p.frontiers.index(entry)] = (*entry[:2], (*entry[2], ref.metric))
                elif ref.kind == "paired":
                    check_pairable(w, ref.a, ref.b)
                    if (ref.a, ref.b) not in p.paired:
                        p.paired.append((ref.a, ref.b))
                elif ref.a not in arm_names:
                    _fail(w, f"arm {ref.a!r} is not in the protocol; valid: {', '.join(arm_names)}")


def select_arms(p: Protocol, names: Optional[Sequence[str]]) -> List[Arm]:
    """The arms named (an expanded arm or a method, which selects all its arms); all without names."""
    if not names:
        return list(p.arms)
    methods = p.methods
    unknown = [n for n in names if n not in methods and n not in {a.name for a in p.arms}]
    if unknown:
        raise SpecError(f"--arms {unknown[0]}: not an arm or method of {p.name}; valid: "
                        + ", ".join(dict.fromkeys([*methods, *(a.name for a in p.arms)])))
    wanted = {x for n in names for x in methods.get(n, [n])}
    return [a for a in p.arms if a.name in wanted]
