"""benchmarks/gil_vs_ppo.py without training: protocols, plans, aggregation of runs that trained on a
reward function, the paired bootstrap, the frontier and the win rule, on synthetic run directories."""

import importlib.util
import json
import os

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def h():
    spec = importlib.util.spec_from_file_location("gil_vs_ppo", os.path.join(ROOT, "benchmarks", "gil_vs_ppo.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_gil_v2_protocol_is_the_pre_registered_one(h):
    arms = {a.name: a for a in h.PROTOCOLS["gil_v2"]}
    # the oracle arm: the miniature's easy families are group 0, the hard ones group 1
    KNOWN = ("gil.known_groups.copy=0", "gil.known_groups.shift=0", "gil.known_groups.reverse=1",
             "gil.known_groups.sort=1", "gil.known_groups.reverse_shift=1")
    for kl in (0.02, 0.05, 0.1):
        for algo in ("ppo", "gil"):
            arm = arms[f"{algo}_kl{kl:g}"]
            assert arm.algo == algo and arm.seeds == (101, 102, 103, 104, 105)
            assert arm.overrides == (f"ppo.kl_coef={kl:g}",) and arm.reward == "reward_model"
    controls = {"gil_v1": ("gil_v1", ()), "gil_no_invariance": ("gil_no_invariance", ()),
                "gil_no_adaptive_kl": ("gil_no_group_kl", ()), "gil_known": ("gil", ("gil.inference=known", *KNOWN)),
                "gil_shuffled_weights": ("gil_shuffled_weights", ()),
                "gil_response_whitened": ("gil", ("gil.group_level=response", "gil.performance=whitened_score"))}
    for name, (algo, overrides) in controls.items():
        arm = arms[name]
        assert (arm.algo, arm.overrides, arm.seeds, arm.kl_coef) == (algo, overrides, (101, 102, 103), None)
    assert arms["ppo_gold"].reward == "gold" and arms["ppo_gold"].seeds == (101, 102, 103)
    assert not arms["sft"].trains
    assert len(arms) == 6 + 6 + 2
    # fresh seeds: no earlier table's seed (1-3) in any arm
    assert all(s > 100 for a in arms.values() for s in a.seeds)


def test_quick_takes_the_first_seed_and_the_smoke_protocol(h):
    args = h.parse_args(["--quick"])
    assert args.protocol == "smoke" and args.iterations == 3 and args.eval_limit == 40 and args.results is None
    assert [a.name for a in args.arm_list] == ["ppo", "gil", "ppo_gold", "sft"]
    args = h.parse_args(["--quick", "--protocol", "gil_v2", "--arms", "ppo_kl0.1", "sft"])
    assert [(a.name, a.seeds) for a in args.arm_list] == [("ppo_kl0.1", (101,)), ("sft", ())]
    with pytest.raises(SystemExit):
        h.parse_args(["--protocol", "gil_v2", "--arms", "nope"])


def test_plan_trains_gold_arms_on_the_reward_function(h, tmp_path):
    args = h.parse_args(["--protocol", "headroom", "--workdir", str(tmp_path)])
    plan = h.make_plan(args, {"data": "d", "sft": "s"})  # no reward model: the gold arm does not need one
    train = [j for j in plan["jobs"] if j["kind"] == "train"]
    assert [j["name"] for j in train] == ["ppo_gold_s1", "ppo_gold_s2", "ppo_gold_s3"]
    assert "models.reward_model=null" in train[0]["overrides"]
    assert f"models.reward_fn={h.GOLD_FN}" in train[0]["overrides"]
    assert plan["reward_model"] is None


def _write_run(run_dir, golds, families, *, rm=True, metrics=None, kl=0.5):
    """A finished run: eval.json in evaluation.summarize_set's format and samples.jsonl."""
    from gil_megatron.ppo.evaluation import summarize_set

    os.makedirs(run_dir, exist_ok=True)
    sets = {}
    with open(os.path.join(run_dir, "samples.jsonl"), "w") as f:
        for set_name in ("eval", "ood"):
            recs = []
            for i, (g, fam) in enumerate(zip(golds, families)):
                r = {"index": i, "prompt": f"p{i}", "response": "a b", "group": fam, "gold": g, "reward_fn": g + 0.1,
                     "response_length": 3.0, "kl_to_ref": kl}
                if rm:
                    r["reward_model"] = 1.0
                recs.append(r)
                f.write(json.dumps({"set": set_name, **r}) + "\n")
            sets[set_name] = summarize_set(recs)
    with open(os.path.join(run_dir, "eval.json"), "w") as f:
        json.dump({"sets": sets, "job": {"fingerprint": {}}, "train_s": 60.0, "eval_s": 6.0, "iterations": 3}, f)
    if metrics is not None:
        with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
            for m in metrics:
                f.write(json.dumps(m) + "\n")


def test_run_metrics_of_a_reward_function_run(h, tmp_path):
    fams = ["copy", "reverse"] * 5
    lines = [{"iteration": i, "reward/mean": 0.5, "reward/gold_mean": 0.5, "time/step_s": 0.2,
              "group/0/mass": 0.7, "group/1/mass": 0.3, "gil/weight_clip_frac": 0.1} for i in range(10)]
    _write_run(str(tmp_path), [1.0, 0.0] * 5, fams, rm=False, metrics=lines)
    m = h.run_metrics(str(tmp_path))  # used to raise KeyError: 'reward_model'
    assert m["rm_score"] is None and m["gold"] == pytest.approx(0.5)
    assert m["worst_group"] == pytest.approx(0.0) and m["worst_group_name"] == "reverse"
    assert m["proxy_minus_gold"] == pytest.approx(0.1)
    assert m["minority_mass"] == pytest.approx(0.3) and m["weight_clip_frac"] == pytest.approx(0.1)
    assert m["evasion"] == 0.0 and m["collapsed"] == 0.0


def test_paired_bootstrap_sees_a_real_gain_and_no_gain(h):
    rng = np.random.default_rng(0)
    fams = ["easy", "hard"] * 60
    b = rng.random((5, 120))
    a = b.copy()
    a[:, 1::2] = np.minimum(1.0, a[:, 1::2] + 0.2)  # the hard family improves
    b[:, 1::2] *= 0.5  # and is the worst family of b
    r = h.paired_bootstrap(a, b, fams, n=500)
    diff, lo, hi = r["worst"]
    assert lo > 0 and lo <= diff <= hi
    same = h.paired_bootstrap(b, b, fams, n=200)
    assert same["worst"] == (0.0, 0.0, 0.0) and same["mean"] == (0.0, 0.0, 0.0)


def test_frontier_through_the_sft_start(h):
    ppo = [(2.0, 0.7), (1.0, 0.6)]
    assert h.frontier_gold(ppo, 0.5, 0.0) == pytest.approx(0.5)
    assert h.frontier_gold(ppo, 0.5, 0.5) == pytest.approx(0.55)
    assert h.frontier_gold(ppo, 0.5, 1.5) == pytest.approx(0.65)
    assert h.frontier_gold(ppo, 0.5, 9.0) == pytest.approx(0.7)


def test_win_rule_on_synthetic_runs(h, tmp_path, monkeypatch):
    """gil better on the hard family at every kl_coef, at lower KL: a win; reversed: not a win."""
    monkeypatch.setattr(h, "BOOTSTRAP_SAMPLES", 300)
    fams = ["copy", "reverse"] * 20

    def build(workdir, gil_hard):
        args = h.parse_args(["--protocol", "gil_v2", "--workdir", str(workdir), "--arms",
                             "ppo_kl0.02", "gil_kl0.02", "ppo_kl0.05", "gil_kl0.05", "ppo_kl0.1", "gil_kl0.1", "sft"])
        plan = h.make_plan(args, {"data": "d", "sft": "s", "reward_model": "r"})
        for job in plan["jobs"]:
            gil = job["arm"].startswith("gil")
            golds = [0.9 if f == "copy" else (gil_hard if gil else 0.5) for f in fams]
            _write_run(job["run_dir"], golds, fams, kl=0.0 if job["kind"] == "policy" else (0.5 if gil else 1.0))
            job["fingerprint"] = {}
        return args, plan

    for gil_hard, expect in ((0.6, True), (0.4, False)):
        args, plan = build(tmp_path / str(gil_hard), gil_hard)
        agg = h.aggregate(args, plan)
        wr = agg["win_rule"]
        assert wr["win"] is expect
        assert all(e["seeds_paired"] == 5 for e in wr["per_kl"].values())
        assert "gil_kl0.05 vs ppo_kl0.05" in agg["wtl"]
        text = h.markdown_table(args, agg)
        assert ("Verdict: GIL WINS" in text) is expect
