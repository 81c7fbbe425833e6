"""Evaluation: summaries and win/tie/lose against direct computations, the exact KL, TP=2 equals TP=1,
tools/evaluate.py end to end (files, keys, self-comparison = all ties, one-line errors)."""

import itertools
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from dist_utils import spawn

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tools"))

import evaluate as evaluate_cli  # noqa: E402  (tools/evaluate.py)

from gil_megatron.ppo import evaluation as ev  # noqa: E402

GOLD = "gil_megatron.miniature.task:gold_reward"
PROXY = "gil_megatron.miniature.task:proxy_reward"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    """Small miniature data; fresh tiny actor (with tokenizer), a second actor saved at TP=2 (no
    tokenizer, like a training checkpoint), a reward model and a GIL critic."""
    import glob
    import shutil

    from gil_megatron.miniature.prepare import prepare
    from gil_megatron.models.config import LlamaArchConfig
    from gil_megatron.models.convert import save_fresh_model

    root = tmp_path_factory.mktemp("eval_mini")
    prepare(str(root / "data"), seed=0, n_sft=16, n_prompts_train=128, n_prompts_eval=20, n_prompts_ood=10,
            n_rm_train=16, n_rm_eval=8)
    arch = LlamaArchConfig(vocab_size=24, hidden_size=32, intermediate_size=64, num_layers=2,
                           num_attention_heads=4, num_kv_heads=2, max_position_embeddings=32)
    for name, role, tp, seed in (("actor", "actor", 1, 3), ("actor2", "actor", 2, 7), ("reward", "reward", 1, 4),
                                 ("critic", "critic", 1, 5)):
        save_fresh_model(arch, role, str(root / name), tp, 1, seed=seed)
    for f in glob.glob(str(root / "data" / "tokenizer" / "*")):
        shutil.copy(f, root / "actor")
    return root


# ---- pure summaries ------------------------------------------------------------------------------


def _records():
    gen = torch.Generator().manual_seed(0)
    groups = ["copy", "copy", "sort", None, "reverse", "sort", "copy", "reverse"]
    out = []
    for i, g in enumerate(groups):
        gold = float(torch.rand((), generator=gen))
        out.append({"index": i, "group": g, "gold": gold, "reward_fn": gold + 0.1 * i,
                    "response_length": float(i % 3 + 1), "kl_to_ref": 0.5 * i, "inferred_group": i % 2,
                    "group_probs": [0.3, 0.7] if i % 2 else [0.8, 0.2]})
    return out


def test_summary_matches_direct_computation():
    recs = _records()
    s = ev.summarize_set(recs, known_group_map={"copy": "easy", "sort": "hard", "reverse": "hard"})
    assert s["primary"] == "gold" and s["n"] == len(recs)
    gold = s["scores"]["gold"]
    for g in ("copy", "sort", "reverse"):
        direct = [r["gold"] for r in recs if r["group"] == g]
        assert gold["known_groups"][g] == pytest.approx(sum(direct) / len(direct))
    for g in (0, 1):
        direct = [r["gold"] for r in recs if r["inferred_group"] == g]
        assert gold["inferred_groups"][str(g)] == pytest.approx(sum(direct) / len(direct))
    worst = min(gold["known_groups"], key=gold["known_groups"].get)
    assert gold["worst_known_group"] == worst and gold["worst_known"] == gold["known_groups"][worst]
    assert gold["known_gap"] == pytest.approx(max(gold["known_groups"].values()) - gold["worst_known"])
    xs = [r["gold"] for r in recs]
    m = sum(xs) / len(xs)
    assert gold["mean"] == pytest.approx(m)
    assert gold["std"] == pytest.approx(math.sqrt(sum((x - m) ** 2 for x in xs) / len(xs)))
    assert s["reward_fn_minus_gold"] == pytest.approx(sum(0.1 * i for i in range(len(recs))) / len(recs))
    assert s["kl_to_ref"]["mean"] == pytest.approx(sum(0.5 * i for i in range(len(recs))) / len(recs))
    ig = s["inferred_groups"]
    assert ig["crosstab"]["copy"] == {"0": 2, "1": 1} and sum(ig["mass"].values()) == pytest.approx(1.0)
    # agreement under the best one-to-one relabelling, by brute force over (label of 0, label of 1)
    labels = {i: r["group"] for i, r in enumerate(recs) if r["group"]}
    best = max(sum((a, b)[recs[i]["inferred_group"]] == g for i, g in labels.items())
               for a, b in itertools.permutations(("copy", "sort", "reverse"), 2))
    assert ig["agreement"] == pytest.approx(best / len(labels))
    hard = {i for i, g in labels.items() if g != "copy"}
    mapped = max(sum((recs[i]["inferred_group"] == k) == (i in hard) for i in labels) for k in (0, 1))
    assert ig["agreement_mapped"] == pytest.approx(mapped / len(labels))
    assert ig["agreement_one_group"] == pytest.approx(3 / 7) and ig["agreement_mapped_one_group"] == pytest.approx(4 / 7)


def test_win_tie_lose():
    a, b = [0.5, 0.2, 0.9, 0.4], [0.5, 0.3, 0.1, 0.38]
    assert ev.win_tie_lose(a, a) == {"n": 4, "win": 0.0, "tie": 1.0, "lose": 0.0}
    w = ev.win_tie_lose(a, b, tie_margin=0.05, groups=["x", "x", "y", None])
    assert (w["win"], w["tie"], w["lose"]) == (0.25, 0.5, 0.25)
    assert w["known_groups"]["x"] == {"n": 2, "win": 0.0, "tie": 0.5, "lose": 0.5}
    recs = _records()
    self_wtl = ev.compare_policies(recs, list(reversed(recs)), "gold", tie_margin=0.0)
    assert self_wtl["tie"] == 1.0 and all(g["tie"] == 1.0 for g in self_wtl["known_groups"].values())
    with pytest.raises(ValueError, match="same prompts"):
        ev.win_tie_lose([1.0], [1.0, 2.0])


# ---- generation + scoring on model layouts ---------------------------------------------------------


def _evaluate_on(layout, mini):
    from gil_megatron.data import load_prompts, pad_token_id
    from gil_megatron.models.build import load_tokenizer, model_from_checkpoint
    from gil_megatron.ppo.rewards import RewardFunction
    from gil_megatron.ppo.rollout import SamplingSettings

    tok = load_tokenizer(str(mini / "actor"))
    models = {name: model_from_checkpoint(str(mini / name), role, layout, trainable=False)
              for name, role in (("actor", "actor"), ("actor2", "actor"), ("reward", "reward"), ("critic", "critic"))}
    scorers = ev.Scorers(tok, pad_token_id(tok), reward_model=models["reward"], reward_fn=RewardFunction(PROXY),
                         gold_fn=RewardFunction(GOLD), reference=models["actor2"], critic=models["critic"])
    data = {"eval": load_prompts(str(mini / "data" / "prompts_eval.jsonl"), tok, max_prompt_length=12)}
    sampling = SamplingSettings(max_new_tokens=6, greedy=True, eos_token_id=tok.eos_token_id,
                                pad_token_id=scorers.pad_token_id)
    recs = ev.evaluate_policy(models["actor"], data, scorers, sampling, batch_size=8, micro_batch_size=4)["eval"]
    return recs, models, data, sampling


def _two_layouts(mini):
    """On 2 ranks: TP=1 x DP=2 (prompts split, records gathered), then TP=2 x DP=1; plus the KL of
    sequence_kl against the textbook formula on full logits (TP=1, each rank its own replica)."""
    from gil_megatron.models.pipeline import run_microbatches
    from gil_megatron.parallel import distributed
    from gil_megatron.ppo.rollout import generate

    dp2, models, data, sampling = _evaluate_on(distributed.initialize(1, 1, seed=0), mini)
    actor, ref = models["actor"], models["actor2"]
    batch = data["eval"].collate([0, 1, 2, 3], 0)
    rollout = generate(actor, batch.input_ids, batch.lengths, sampling)
    ours = ev.sequence_kl(actor, ref, rollout.sequences, rollout.response_mask, micro_batch_size=3)
    with torch.no_grad():
        la = run_microbatches(actor, [{"input_ids": rollout.sequences}], forward_only=True)[0]["output"][..., :24]
        lr = run_microbatches(ref, [{"input_ids": rollout.sequences}], forward_only=True)[0]["output"][..., :24]
    kl = (la.softmax(-1) * (la.log_softmax(-1) - lr.log_softmax(-1))).sum(-1)[:, :-1]  # position t -> token t+1
    textbook = (kl * rollout.response_mask[:, 1:]).sum(-1)
    tp2, _, _, _ = _evaluate_on(distributed.initialize(2, 1, seed=0), mini)
    return dp2, tp2, ours, textbook


def test_generation_and_scores_equal_across_layouts(mini):
    ranks = spawn(_two_layouts, 2, mini)
    dp2, tp2, ours, textbook = ranks[0]
    assert ranks[1][0] == dp2 and ranks[1][1] == tp2  # every rank holds every record
    assert [r["index"] for r in dp2] == list(range(20))
    assert [r["response"] for r in dp2] == [r["response"] for r in tp2]
    for a, b in zip(dp2, tp2):
        for key in ("gold", "reward_fn", "reward_model", "kl_to_ref", "response_length"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), key
        assert a["inferred_group"] == b["inferred_group"]
    assert all(r["kl_to_ref"] > 0 for r in dp2)
    assert torch.allclose(ours, textbook, rtol=1e-4, atol=1e-6) and (ours > 0).all()


# ---- the command line ----------------------------------------------------------------------------


def _cli(mini, out, *extra):
    return [sys.executable, os.path.join(ROOT, "tools", "evaluate.py"),
            "--prompts", f"eval={mini / 'data' / 'prompts_eval.jsonl'}", f"ood={mini / 'data' / 'prompts_ood.jsonl'}",
            "--reward-model", str(mini / "reward"), "--reward-fn", PROXY, "--gold-reward-fn", GOLD,
            "--max-new-tokens", "6", "--max-prompt-length", "12", "--batch-size", "8", "--out", str(out), *extra]


def test_evaluate_cli_report(mini, tmp_path):
    out = tmp_path / "report"
    cmd = _cli(mini, out, "--actor", str(mini / "actor2"), str(mini / "actor2"), "--names", "a", "b",
               "--tokenizer", str(mini / "actor"), "--reference", str(mini / "actor"), "--critic", str(mini / "critic"),
               "--known-group-map", "copy=easy", "shift=easy", "reverse=hard", "sort=hard", "reverse_shift=hard")
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1].startswith("wrote ")
    report = json.load(open(out / "report.json"))
    assert (out / "report.md").read_text().count("| a |") >= 2
    samples = [json.loads(line) for line in open(out / "samples.jsonl")]
    for name in ("a", "b"):
        for set_name, n in (("eval", 20), ("ood", 10)):
            s = report["policies"][name]["sets"][set_name]
            assert s["n"] == n and s["primary"] == "gold"
            assert {"response_length", "scores", "kl_to_ref", "known_groups", "inferred_groups",
                    "reward_fn_minus_gold", "reward_model_minus_gold"} <= set(s)
            assert set(s["scores"]) == {"gold", "reward_fn", "reward_model"}
            assert {"mean", "std", "known_groups", "worst_known_group", "worst_known", "known_gap",
                    "inferred_groups", "worst_inferred"} <= set(s["scores"]["gold"])
            assert {"mass", "crosstab", "agreement", "agreement_mapped"} <= set(s["inferred_groups"])
            mine = [r for r in samples if r["policy"] == name and r["set"] == set_name]
            for g, mean in s["scores"]["gold"]["known_groups"].items():
                direct = [r["gold"] for r in mine if r["group"] == g]
                assert mean == pytest.approx(sum(direct) / len(direct))
    comp = report["comparison"]
    assert comp["judge"] == "gold" and (comp["a"], comp["b"]) == ("a", "b")
    for set_name in ("eval", "ood"):  # a checkpoint against itself: every prompt a tie
        wtl = comp["sets"][set_name]
        assert (wtl["win"], wtl["tie"], wtl["lose"]) == (0, 1, 0)


def test_evaluate_cli_errors(mini, tmp_path):
    def error(*argv):
        with pytest.raises((ValueError, FileNotFoundError)) as exc:
            evaluate_cli.resolve(evaluate_cli.parse_args(list(argv)))
        return str(exc.value)

    base = ["--out", str(tmp_path), "--actor", str(mini / "actor")]
    data = f"eval={mini / 'data' / 'prompts_eval.jsonl'}"
    assert "NAME=VALUE" in error(*base, "--prompts", "eval", "--gold-reward-fn", GOLD)
    assert "nothing to score with" in error(*base, "--prompts", data)
    assert "no such model directory" in error(*base, "--prompts", data, "--gold-reward-fn", GOLD,
                                              "--reference", "/nope")
    assert "is a reward checkpoint" in error(*base, "--prompts", data, "--gold-reward-fn", GOLD, "--critic",
                                             str(mini / "reward"))
    assert "--tie-margin" in error(*base, "--prompts", data, "--gold-reward-fn", GOLD, "--tie-margin", "-1")
    assert "no tokenizer.json" in error("--out", str(tmp_path), "--actor", str(mini / "actor2"), "--prompts", data,
                                        "--gold-reward-fn", GOLD)
    assert "--judge reward_model needs" in error(*base, "--prompts", data, "--gold-reward-fn", GOLD, "--judge",
                                                 "reward_model")
    # the real command: one line on stderr, exit status 2
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "evaluate.py"), *base, "--prompts",
                           f"eval={tmp_path / 'missing.jsonl'}", "--gold-reward-fn", GOLD],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"error: --prompts eval={tmp_path / 'missing.jsonl'}: no such file or directory"]
