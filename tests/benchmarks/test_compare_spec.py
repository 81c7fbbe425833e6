"""benchmarks/compare/spec.py: task and protocol files are validated up front with one-line errors
naming the key; matching expands arms; conditions parse and add the comparisons they read; every
committed task and protocol file loads."""

import glob
import os

import pytest
import yaml

from benchmarks.compare import __main__ as cli
from benchmarks.compare.spec import SpecError, load_protocol, load_task, parse_condition, select_arms

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TASK = {"name": "t", "policy": "sft", "prompts": {"train": "p/train.jsonl", "eval": "p/eval.jsonl"},
        "reward": "rm", "max_prompt_length": 12, "max_new_tokens": 8}
PROTOCOL = {"name": "p", "iterations": 10, "seeds": [1, 2],
            "arms": [{"name": "ppo", "algo": "ppo"}, {"name": "gil", "algo": "gil"},
                     {"name": "sft", "policy": "sft"}]}


def write(tmp_path, name, data):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return str(path)


def task_error(tmp_path, **changes):
    data = {**TASK, **changes}
    data = {k: v for k, v in data.items() if v is not None}
    with pytest.raises(SpecError) as exc:
        load_task(write(tmp_path, "task.yaml", data), check_paths=False)
    msg = str(exc.value)
    assert "\n" not in msg and msg.startswith(str(tmp_path / "task.yaml"))
    return msg


def protocol_error(tmp_path, **changes):
    data = {k: v for k, v in {**PROTOCOL, **changes}.items() if v is not None}
    with pytest.raises(SpecError) as exc:
        load_protocol(write(tmp_path, "protocol.yaml", data))
    msg = str(exc.value)
    assert "\n" not in msg and str(tmp_path / "protocol.yaml") in msg
    return msg


def test_task_paths_resolve_against_the_yaml(tmp_path):
    task = load_task(write(tmp_path, "task.yaml", {**TASK, "gold": "m:gold", "pythonpath": ["."],
                                                   "easy_groups": ["a"], "hard_groups": ["b", "c"],
                                                   "overrides": {"ppo.kl_coef": 0.1, "gil.known_groups": None}}),
                     check_paths=False)
    assert task.policy == str(tmp_path / "sft") and task.prompts["eval"] == str(tmp_path / "p" / "eval.jsonl")
    assert task.reward == str(tmp_path / "rm") and not task.reward_is_function
    assert task.pythonpath == (str(tmp_path),) and task.difficulty == {"a": "easy", "b": "hard", "c": "hard"}
    assert sorted(task.overrides) == ["gil.known_groups=null", "ppo.kl_coef=0.1"]
    assert (task.nproc, task.tp) == (1, 1)  # one rank at TP=1 unless the task says otherwise
    fn = load_task(write(tmp_path, "task2.yaml", {**TASK, "reward": "pkg.mod:reward"}), check_paths=False)
    assert fn.reward_is_function and fn.reward == "pkg.mod:reward"


def test_task_errors_name_the_key(tmp_path):
    assert "key 'reward' is required" in task_error(tmp_path, reward=None)
    assert "unknown key 'rewrad'" in task_error(tmp_path, rewrad="x")
    assert "gold='gold_reward' must look like 'package.module:function'" in task_error(tmp_path, gold="gold_reward")
    assert "prompts must be a mapping with 'train' and 'eval'" in task_error(tmp_path, prompts={"train": "x"})
    assert "prompts.test: unknown prompt set" in task_error(tmp_path, prompts={"train": "x", "eval": "y", "test": "z"})
    assert "max_new_tokens=0 must be a positive integer" in task_error(tmp_path, max_new_tokens=0)
    assert "max_prompt_length=True must be a positive integer" in task_error(tmp_path, max_prompt_length=True)
    assert "group 'a' is in both" in task_error(tmp_path, easy_groups=["a"], hard_groups=["a"])
    assert "layout: nproc=3 must be a positive multiple of tp=2" in task_error(tmp_path, layout={"nproc": 3, "tp": 2})
    assert "scores.gold: the name is taken" in task_error(tmp_path, scores={"gold": "m:f"})
    assert "overrides must be a mapping" in task_error(tmp_path, overrides="ppo.kl_coef=1")


def test_task_paths_are_checked(tmp_path):
    path = write(tmp_path, "task.yaml", TASK)
    with pytest.raises(SpecError, match=r"policy=.*sft: not a model directory"):
        load_task(path)


def test_protocol_errors_name_the_key(tmp_path):
    assert "iterations=0 must be a positive integer" in protocol_error(tmp_path, iterations=0)
    assert "arm x: set algo" in protocol_error(tmp_path, arms=[{"name": "x"}])
    assert "arm sft: seeds does not apply to a fixed policy" in protocol_error(
        tmp_path, arms=[{"name": "sft", "policy": "sft", "seeds": [1]}])
    assert "arm name 'ppo' is used twice" in protocol_error(tmp_path, arms=[{"name": "ppo", "algo": "ppo"}] * 2)
    assert "arm ppo: seeds: set them" in protocol_error(tmp_path, seeds=None)
    assert "seeds=[1, 1] repeats a seed" in protocol_error(tmp_path, seeds=[1, 1])
    assert "arm ppo: reward='proxy'; valid: task" in protocol_error(
        tmp_path, arms=[{"name": "ppo", "algo": "ppo", "reward": "proxy"}])
    assert "matching: arms: 'grpo' is not an arm" in protocol_error(
        tmp_path, matching={"arms": ["grpo"], "grid": {"ppo.kl_coef": [0.1]}})
    assert "matching: arms: 'sft' is a fixed policy" in protocol_error(
        tmp_path, matching={"arms": ["sft"], "grid": {"ppo.kl_coef": [0.1]}})
    assert "must contain {arm} and {value}" in protocol_error(
        tmp_path, matching={"arms": ["ppo"], "grid": {"ppo.kl_coef": [0.1]}, "name": "x"})
    assert "anchor='ppo' must name a fixed-policy arm" in protocol_error(tmp_path, anchor="ppo")
    assert "metric 'gold'; valid for paired" in protocol_error(
        tmp_path, win_rule={"text": "t", "all": ["paired gil vs ppo gold ci_low > 0"]})
    assert "expected an operator" in protocol_error(
        tmp_path, win_rule={"text": "t", "all": ["paired gil vs ppo gold_eval ci_low = 0"]})
    assert "arm 'dpo' is not in the protocol" in protocol_error(
        tmp_path, predictions=[{"text": "t", "all": ["arm dpo gold_eval mean > 0"]}])
    assert "'grpo' is not a method" in protocol_error(
        tmp_path, comparisons={"frontier": [{"a": "grpo", "b": "ppo"}]})
    assert "bootstrap.samples=10 must be an integer >= 100" in protocol_error(tmp_path, bootstrap={"samples": 10})


def test_matching_expands_arms_in_grid_order(tmp_path):
    p = load_protocol(write(tmp_path, "p.yaml", {
        **PROTOCOL, "arms": [*PROTOCOL["arms"], {"name": "known", "algo": "gil", "known_groups": True}],
        "matching": {"arms": ["ppo", "gil"], "grid": {"ppo.target_kl": [2, 8]},
                     "overrides": {"ppo.kl_horizon": 500}, "name": "{arm}_t{value}"},
        "anchor": "sft",
        "win_rule": {"text": "gil above", "all": ["frontier gil vs ppo worst_group_eval ci_low > 0",
                                                  "paired gil vs ppo gold_eval diff >= arm sft gold_eval mean - 0.01"]}}))
    assert [a.name for a in p.arms] == ["ppo_t2", "gil_t2", "ppo_t8", "gil_t8", "sft", "known"]
    gil8 = p.arm("gil_t8")
    assert gil8.method == "gil" and gil8.grid_value == 8 and gil8.seeds == (1, 2)
    assert gil8.overrides == ("ppo.kl_horizon=500", "ppo.target_kl=8")
    assert p.grid_arms("ppo") == {2: "ppo_t2", 8: "ppo_t8"} and p.anchor == "sft"
    # the conditions add what they read
    assert ("gil", "ppo", ("worst_group_eval",)) in p.frontiers and ("gil", "ppo") in p.paired
    cond = p.win_rule.conditions[1]
    assert cond.right.kind == "arm" and cond.right.offset == pytest.approx(-0.01)
    assert [a.name for a in select_arms(p, ["gil", "sft"])] == ["gil_t2", "gil_t8", "sft"]
    with pytest.raises(SpecError, match="--arms nope: not an arm or method"):
        select_arms(p, ["nope"])


def test_paired_methods_pair_at_each_grid_value_only(tmp_path):
    msg = protocol_error(tmp_path, matching={"arms": ["ppo"], "grid": {"ppo.kl_coef": [0.1]}},
                         comparisons={"paired": [{"a": "ppo", "b": "gil"}]})
    assert "pair two matched methods" in msg


def test_condition_grammar():
    c = parse_condition("arm ppo_t8 hard.hack_rate mean > 0.05", "w")
    assert (c.left.kind, c.left.a, c.left.metric, c.left.stat, c.op, c.right) == (
        "arm", "ppo_t8", "hard.hack_rate", "mean", ">", 0.05)
    with pytest.raises(SpecError, match="statistic 'gap'; valid for paired"):
        parse_condition("paired a vs b gold_eval gap > 0", "w")
    with pytest.raises(SpecError, match="unexpected"):
        parse_condition("arm a gold_eval mean > arm b gold_eval mean extra", "w")


def test_every_committed_task_and_protocol_loads():
    tasks = glob.glob(os.path.join(ROOT, "examples", "tasks", "*", "task.yaml"))
    protocols = glob.glob(os.path.join(ROOT, "examples", "tasks", "*", "protocols", "*.yaml"))
    assert len(tasks) >= 2 and len(protocols) >= 6
    for path in tasks:
        load_task(path, check_paths=False)
    for path in protocols:
        load_protocol(path)
    gil_v2 = load_protocol(os.path.join(ROOT, "examples", "tasks", "miniature", "protocols", "gil_v2.yaml"))
    assert [a.name for a in gil_v2.arms][:6] == ["ppo_kl0.02", "gil_kl0.02", "ppo_kl0.05", "gil_kl0.05",
                                                 "ppo_kl0.1", "gil_kl0.1"]
    assert len(gil_v2.arms) == 14 and sum(len(a.seeds) for a in gil_v2.arms) == 51


def test_the_command_prints_one_error_line(tmp_path, capsys):
    task = write(tmp_path, "task.yaml", {**TASK, "max_new_tokens": "ten"})
    protocol = write(tmp_path, "protocol.yaml", PROTOCOL)
    assert cli.main(["--task", task, "--protocol", protocol, "--workdir", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {task}: max_new_tokens='ten' must be a positive integer"]
