"""The PPO/GIL engine end to end on the miniature: layouts agree, resume is exact, every algo runs."""

import json
import os
import subprocess
import sys

import torch

from dist_utils import spawn
from miniature_runs import (
    ROOT,
    assert_metrics_close,
    comparable,
    hf_weights,
    latest_actor,
    launcher_overrides,
    overrides,
    train_run,
)


def _layouts_and_algos(mini, out):
    results = {}
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else int(os.environ["WORLD_SIZE"])
    if world == 1:
        # the registry's other entries are exercised without a trainer in tests/ppo/test_objectives.py
        for algo in ("gil", "ppo", "ppo_no_kl", "gil_v1"):
            results[algo] = train_run(None, overrides(mini, out / f"tp1_{algo}", algo=algo))
        # old log-probs rescored vs taken from the decode step: 2 iterations (the second with actor !=
        # reference) on the gold reward (the fresh reward model's head scores 0)
        gold = {"models.reward_model": "null", "models.reward_fn": "gil_megatron.miniature.task:gold_reward",
                "train.steps": 2}
        for name, from_decode in (("ppo_rescored", False), ("ppo_decode_logprobs", True)):
            results[name] = train_run(None, overrides(mini, out / f"tp1_{name}", algo="ppo", **gold,
                                                   **{"rollout.logprobs_from_decode": from_decode}))
        results["kl_in_loss"] = train_run(None, overrides(mini, out / "tp1_klloss", **{"ppo.kl_in": "loss", "ppo.target_kl": 0.1}))
        # critic-free, n samples per prompt kept together, KL in the loss
        results["grpo"] = train_run(None, overrides(mini, out / "tp1_grpo", algo="grpo",
                                                 **{"rollout.n_samples_per_prompt": 2, "ppo.kl_estimator": "k3"}))
    else:
        results["gil"] = train_run(None, overrides(mini, out / "tp2_gil", **{"parallel.tp": 2}))
        # resume: 4 iterations straight vs 2 + restart + 2
        results["straight"] = train_run(None, overrides(mini, out / "straight", **{"parallel.tp": 2, "train.steps": 4}))
        train_run(None, overrides(mini, out / "resumed", **{"parallel.tp": 2, "train.steps": 2}))
        results["resumed"] = train_run(None, overrides(mini, out / "resumed", **{"parallel.tp": 2, "train.steps": 4,
                                                                           "checkpoint.resume": "auto"}))
    return results


REQUIRED_KEYS = ("iteration", "reward/mean", "reward/std", "kl/mean", "kl/coef", "policy/loss", "policy/clipfrac",
                 "policy/entropy", "value/loss", "value/explained_var", "rollout/tokens_per_s", "time/step_s",
                 "gil/r_var", "gil/p_high_mean", "reward/worst_group", "group/0/reward", "group/1/mass",
                 "gil/weight_clip_frac", "gil/weight_max", "gil/minority_mass")


def test_engine_layouts_resume_and_algos(mini, tmp_path):
    tp1 = spawn(_layouts_and_algos, 1, mini, tmp_path)[0]
    tp2 = spawn(_layouts_and_algos, 2, mini, tmp_path)[0]
    rescored_runs, decode_runs = tp1.pop("ppo_rescored"), tp1.pop("ppo_decode_logprobs")

    # every algo ran and logged the required keys; GIL adds its own
    for algo, lines in tp1.items():
        assert len(lines) == 1 and all(torch.isfinite(torch.tensor(v)) for v in lines[0].values()
                                       if isinstance(v, float)), algo
    missing = [k for k in REQUIRED_KEYS if k not in tp1["gil"][0]]
    assert not missing, missing
    assert "gil/r_var" not in tp1["ppo"][0]
    assert tp1["gil"][0]["reward/std"] > 0.05  # the reward model really scores (see the fixture)
    assert tp1["ppo_no_kl"][0]["kl/sample_coef_mean"] == 0.0 and "kl/coef" not in tp1["ppo_no_kl"][0]

    # one GIL iteration at TP2 equals TP1: metrics and the updated weights
    assert_metrics_close(tp1["gil"][0], tp2["gil"][0])
    # old log-probs from the decode step instead of a scoring forward: the same iteration
    for rescored, from_decode in zip(rescored_runs, decode_runs, strict=True):
        assert rescored["kl/mean"] != 0 or rescored["iteration"] == 1
        assert_metrics_close(rescored, from_decode)
    w0 = hf_weights(mini / "actor")
    w1, w2 = hf_weights(latest_actor(tmp_path / "tp1_gil")), hf_weights(latest_actor(tmp_path / "tp2_gil"))
    for name in w1:
        # the same update up to fp32 rounding: Adam's first steps normalise each element's gradient,
        # so an element whose gradient is ~0 may move by a fraction of lr either way; compare the
        # update as a whole (1e-3 of its norm), not element by element
        update = (w1[name] - w0[name]).norm()
        assert update > 0 and (w1[name] - w2[name]).norm() < 1e-3 * update, name

    # stop after 2 iterations + resume 2 == 4 straight, bit for bit
    straight, resumed = tp2["straight"], tp2["resumed"]
    assert [comparable(m) for m in straight] == [comparable(m) for m in resumed]
    ws, wr = hf_weights(latest_actor(tmp_path / "straight")), hf_weights(latest_actor(tmp_path / "resumed"))
    assert all(torch.equal(ws[n], wr[n]) for n in ws)


def test_launch_script_end_to_end(mini, tmp_path):
    """The real launcher (torchrun, TP=2 under gloo) with a config file and dotted overrides."""
    run_dir = tmp_path / "e2e"
    argv = launcher_overrides(mini, run_dir, **{"parallel.tp": 2, "train.steps": 3})
    env = {**os.environ, "NPROC": "2", "PYTHON": sys.executable}
    proc = subprocess.run(["bash", os.path.join(ROOT, "examples", "run_gil_ppo.sh"),
                           os.path.join(ROOT, "examples", "configs", "miniature.yaml"), *argv],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    assert [m["iteration"] for m in lines] == [1, 2, 3]
    assert "eval/ood/gold" in lines[-1]  # the YAML's held-out sets are evaluated at the end
    assert "gil: iteration 3" in proc.stdout


def _critic_group_logits(ckpt):
    from gil_megatron.models.build import model_from_checkpoint
    from gil_megatron.parallel import distributed
    from gil_megatron.ppo.scoring import score_critic

    layout = distributed.initialize(1, 1, seed=0)
    critic = model_from_checkpoint(ckpt, "critic", layout, num_groups=2)
    # two rows with the same 4-token prompt and different responses, right-padded with 0
    seqs = torch.tensor([[1, 5, 6, 7, 9, 10, 11], [1, 5, 6, 7, 12, 0, 0]])
    prompt_lengths, lengths = torch.tensor([4, 4]), torch.tensor([7, 5])
    at_prompt = score_critic(critic, seqs, prompt_lengths, prompt_lengths, 2)[2]
    at_end = score_critic(critic, seqs, lengths, prompt_lengths, 2)[2]
    return at_prompt, at_end


def test_oracle11_prompt_level_groups_give_every_response_to_a_prompt_the_same_q(mini):
    """group_level=prompt: the trainer reads the group head at the last prompt token
    (rollout.prompt_lengths), so q depends on the prompt only; at the last token it does not."""
    at_prompt, at_end = spawn(_critic_group_logits, 1, str(mini / "actor"))[0]
    assert torch.equal(at_prompt[0], at_prompt[1])
    assert not torch.allclose(at_end[0], at_end[1])


def test_n_samples_per_prompt_stay_adjacent_and_together():
    from gil_megatron.ppo.trainer import shuffle_keeping_prompts_together

    rows = torch.arange(12)
    prompt_index = torch.arange(12) // 3
    order = shuffle_keeping_prompts_together(rows, prompt_index, torch.Generator().manual_seed(0))
    assert sorted(order.tolist()) == list(range(12)) and order.tolist() != list(range(12))
    blocks = prompt_index[order].reshape(4, 3)
    assert (blocks == blocks[:, :1]).all()  # each block of 3 is one prompt's samples
