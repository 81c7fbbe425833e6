"""SFT, reward-model and DPO training through their real CLI entries (tools/train_*.py main(argv))
on a tiny model and the miniature data, in ONE 2-rank spawn (process start-up dominates):

- every stage at tp=2 (dp=1) gives the losses and the trained weights of tp=1 with dp=2 (and DPO
  also of pp=2): the loss normalisation makes the gradient that of the global batch;
- SFT interrupted after 2 steps and resumed (checkpoint.resume=auto) ends where a straight 3-step
  run ends: weights, optimizer, LR schedule and data cursor come back exactly;
- metrics.jsonl, the one-line summary and the final model directories (role, tokenizer) are there;
- bad input (a missing data file, an unknown config key) is one line on stderr and exit status 2.
"""

import contextlib
import importlib.util
import io
import json
import math
import os

import pytest
import torch

from dist_utils import spawn

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = ["--hidden-size", "32", "--intermediate-size", "64", "--num-layers", "2", "--num-attention-heads", "4",
        "--num-kv-heads", "2", "--max-position-embeddings", "64", "--seed", "0"]
COMMON = ["train.global_batch_size=8", "train.micro_batch_size=2", "train.eval_batch_size=8",
          "logging.progress=false", "optim.lr=1e-3"]


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(f"tool_{name}", os.path.join(REPO, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _one_line_error(tool, argv):
    from gil_megatron.cli import run_cli

    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exit_info:
        run_cli(tool.main, argv)
    return exit_info.value.code, err.getvalue()


def _all_stages(root: str, data: str):
    import torch.distributed as dist

    from gil_megatron.parallel import distributed

    distributed.initialize(1, 1)  # the process group, for the barrier; every run re-lays it out
    init, sft_model = os.path.join(root, "init"), os.path.join(root, "sft_tp1", "model")
    if dist.get_rank() == 0:
        _tool("init_model").main(["--save-dir", init, "--tokenizer", os.path.join(data, "tokenizer"), *TINY])
    dist.barrier()
    sft, rm, dpo = _tool("train_sft"), _tool("train_reward_model"), _tool("train_dpo")
    out = {}

    def run(tool, name, *args):
        out[name] = tool.main([f"run_dir={os.path.join(root, name)}", *COMMON, *args])

    sft_args = [f"init={init}", f"data.train={data}/sft.jsonl", f"data.eval={data}/sft.jsonl"]
    run(sft, "sft_tp1", *sft_args, "train.steps=3")
    run(sft, "sft_tp2", *sft_args, "train.steps=2", "parallel.tp=2")
    run(sft, "sft_tp2", *sft_args, "train.steps=3", "parallel.tp=2")  # resumes at step 2

    pair_args = [f"init={sft_model}", f"data.train={data}/rm_train.jsonl", f"data.eval={data}/rm_eval.jsonl",
                 "train.steps=2"]
    run(rm, "rm_tp1", *pair_args, "margin=0.5")
    run(rm, "rm_tp2", *pair_args, "margin=0.5", "parallel.tp=2")
    run(dpo, "dpo_tp1", *pair_args, "beta=0.5")
    run(dpo, "dpo_tp2", *pair_args, "beta=0.5", "parallel.tp=2")
    run(dpo, "dpo_pp2", *pair_args, "beta=0.5", "parallel.pp=2")

    out["missing_data"] = _one_line_error(sft, [f"init={init}", "data.train=/no/such/file.jsonl"])
    out["bad_key"] = _one_line_error(rm, [f"init={init}", f"data.train={data}/rm_train.jsonl", "train.stepz=3"])
    return out


def _metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _weights(model_dir):
    from gil_megatron.models.weights import hf_tensors_of_checkpoint

    return dict(hf_tensors_of_checkpoint(model_dir))


def _assert_same_training(a, b, keys):
    ma, mb = _metrics(a), _metrics(b)
    assert [r["iteration"] for r in ma] == [r["iteration"] for r in mb]
    for ra, rb in zip(ma, mb):
        for k in keys:
            if k not in ra and k not in rb:  # eval metrics: only on eval steps
                continue
            assert ra[k] == pytest.approx(rb[k], rel=1e-4, abs=1e-5), (a, b, ra["iteration"], k)
    wa, wb = _weights(os.path.join(a, "model")), _weights(os.path.join(b, "model"))
    assert sorted(wa) == sorted(wb)
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=1e-4, atol=1e-5, msg=f"{a} vs {b}: {name}")


def test_stages_end_to_end_and_parallel_parity(tmp_path):
    from gil_megatron.miniature.prepare import prepare

    data = str(tmp_path / "data")
    prepare(data, seed=0, n_sft=64, n_prompts_train=8, n_prompts_eval=8, n_prompts_ood=8, n_rm_train=64, n_rm_eval=12)
    results = spawn(_all_stages, 2, str(tmp_path), data)
    r0 = results[0]
    run = lambda name: str(tmp_path / name)  # noqa: E731

    # SFT: tp2 (stopped at 2, resumed to 3) == tp1/dp2 straight, losses and weights
    _assert_same_training(run("sft_tp1"), run("sft_tp2"), ["train/loss", "train/tokens", "optim/grad_norm"])
    sft_metrics = _metrics(run("sft_tp1"))
    assert [r["iteration"] for r in sft_metrics] == [1, 2, 3]
    assert "eval/loss" in sft_metrics[-1] and "eval/group/copy/loss" in sft_metrics[-1]
    assert sft_metrics[-1]["train/loss"] < sft_metrics[0]["train/loss"]
    assert os.path.isdir(tmp_path / "sft_tp2" / "checkpoints" / "iter_0000003")

    # reward model: tp2 == tp1/dp2; eval accuracy over the 12 real pairs (filler rows weigh 0)
    _assert_same_training(run("rm_tp1"), run("rm_tp2"),
                          ["train/loss", "train/accuracy", "optim/grad_norm", "eval/loss", "eval/accuracy"])
    assert r0["rm_tp1"]["eval/pairs"] == 12
    assert r0["rm_tp2"]["eval/accuracy"] == pytest.approx(r0["rm_tp1"]["eval/accuracy"])

    # DPO: tp2 and pp2 == tp1/dp2; at step 1 the policy is the reference, so the loss is log 2
    for other in ("dpo_tp2", "dpo_pp2"):
        _assert_same_training(run("dpo_tp1"), run(other),
                              ["train/loss", "train/rewards/margin", "optim/grad_norm", "eval/loss"])
    assert _metrics(run("dpo_tp1"))[0]["train/loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert results[1]["dpo_pp2"]["eval/accuracy"] == r0["dpo_pp2"]["eval/accuracy"]  # every rank returns it

    # final model directories: roles and tokenizer files for the next stage
    for name, role in (("sft_tp1", "actor"), ("rm_tp2", "reward"), ("dpo_pp2", "actor")):
        model = tmp_path / name / "model"
        with open(model / "gil_megatron.json") as f:
            assert json.load(f)["role"] == role
        assert (model / "tokenizer.json").is_file()
        assert not (tmp_path / name / ".tmp-model").exists()

    # bad input: one line, exit status 2
    for key, needle in (("missing_data", "/no/such/file.jsonl"), ("bad_key", "train.stepz")):
        code, err = r0[key]
        assert code == 2, err
        assert err.count("\n") == 1 and err.startswith("error: ") and needle in err, err
