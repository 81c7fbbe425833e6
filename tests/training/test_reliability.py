"""Bad input fails fast with one line; determinism; rank failure and a crash during a save."""

import contextlib
import io
import json
import os
import subprocess
import sys

import torch

from dist_utils import spawn
from miniature_runs import launcher_overrides, overrides

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _fresh(arch_kw, role, path, tokenizer_dir):
    import glob
    import shutil

    from gil_megatron.models.config import LlamaArchConfig
    from gil_megatron.models.convert import save_fresh_model

    base = dict(vocab_size=24, hidden_size=64, intermediate_size=128, num_layers=2, num_attention_heads=4,
                num_kv_heads=2, max_position_embeddings=64)
    base.update(arch_kw)
    save_fresh_model(LlamaArchConfig(**base), role, str(path), 1, 1, seed=0)
    for f in glob.glob(str(tokenizer_dir / "*")):
        shutil.copy(f, path)
    return str(path)


def _run_cases(cases):
    from gil_megatron.cli import run_cli
    from gil_megatron.ppo.trainer import main

    results = {}
    for name, argv in cases.items():
        err = io.StringIO()
        code = 0
        with contextlib.redirect_stderr(err):
            try:
                run_cli(main, argv)
            except SystemExit as exc:
                code = exc.code
        results[name] = (code, err.getvalue())
    return results


def test_bad_inputs_fail_with_one_line(mini, tmp_path):  # noqa: F811
    data, tok = mini / "data", mini / "data" / "tokenizer"
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "empty.jsonl").write_text("")
    (bad / "malformed.jsonl").write_text('{"prompt": "COPY a b c d ="}\n{"prompt": "COPY a b\n')
    (bad / "nofield.jsonl").write_text('{"text": "COPY a b c d ="}\n')
    (bad / "hf_like").mkdir()
    models = {
        "heads3": _fresh(dict(hidden_size=48, num_attention_heads=3, num_kv_heads=3), "actor", bad / "heads3", tok),
        "mqa": _fresh(dict(num_kv_heads=1), "actor", bad / "mqa", tok),
        "ffn": _fresh(dict(intermediate_size=129), "actor", bad / "ffn", tok),
        "layers3": _fresh(dict(num_layers=3), "actor", bad / "layers3", tok),
        "critic3": _fresh(dict(num_groups=3), "critic", bad / "critic3", tok),
    }
    # a checkpoint that claims a 70B architecture: the memory check must refuse it before loading
    huge = bad / "huge"
    huge.mkdir()
    meta = json.load(open(mini / "actor" / "gil_megatron.json"))
    meta["arch"].update(hidden_size=8192, intermediate_size=28672, num_layers=80, num_attention_heads=64,
                        num_kv_heads=8, head_dim=128)
    (huge / "gil_megatron.json").write_text(json.dumps(meta))
    other_layout = bad / "run_other" / "checkpoints" / "iter_0000001"
    other_layout.mkdir(parents=True)
    (other_layout / "trainer_state.json").write_text(json.dumps({"iteration": 1, "layout": {"tp": 1, "pp": 1, "dp": 2}}))
    (other_layout / "COMPLETE").write_text("1\n")

    def argv(**kw):
        return overrides(mini, tmp_path / "run", **{"parallel.tp": 2, **kw})

    cases = {  # name -> (argv, text the one-line error must contain)
        "unknown key": (argv(**{"ppo.kl_coeff": 1}), "unknown config key 'ppo.kl_coeff'"),
        "wrong type": (argv(**{"ppo.kl_coef": "abc"}), "ppo.kl_coef"),
        "bad value": (argv(**{"rollout.top_p": 1.5}), "rollout.top_p=1.5"),
        "unknown algo": (argv(algo="dapo"), "algo='dapo'"),
        "missing config file": (["/nonexistent/config.yaml"], "config file /nonexistent/config.yaml not found"),
        "missing required key": (["data.train_prompts=x", "models.reward_fn=a:b"], "models.actor has no value"),
        "two rewards": (argv(**{"models.reward_fn": "a:b"}), "exactly one of models.reward_model"),
        "tp*pp vs world": (argv(**{"parallel.tp": 4}), "not divisible by parallel.tp * parallel.pp = 4*1"),
        "tp vs heads": (argv(**{"models.actor": models["heads3"]}), "num_attention_heads=3"),
        "tp vs kv heads": (argv(**{"models.actor": models["mqa"]}), "num_kv_heads=1"),
        "tp vs ffn": (argv(**{"models.actor": models["ffn"]}), "intermediate_size=129"),
        "pp vs layers": (argv(**{"parallel.tp": 1, "parallel.pp": 2, "models.actor": models["layers3"]}), "num_layers=3"),
        "micro-batch": (argv(**{"ppo.micro_batch_size": 3}), "ppo.micro_batch_size=3"),
        "mini-batch": (argv(**{"ppo.mini_batch_size": 5}), "ppo.mini_batch_size=5"),
        "missing data": (argv(**{"data.train_prompts": str(bad / "nope.jsonl")}), "nope.jsonl"),
        "empty data": (argv(**{"data.train_prompts": str(bad / "empty.jsonl")}), "empty.jsonl"),
        "malformed line": (argv(**{"data.train_prompts": str(bad / "malformed.jsonl")}), "line 2"),
        "missing field": (argv(**{"data.train_prompts": str(bad / "nofield.jsonl")}), "prompt"),
        "prompt too long": (argv(**{"data.max_prompt_length": 3}), "max_prompt_length"),
        "missing checkpoint": (argv(**{"models.actor": str(bad / "nope")}), "does not exist"),
        "not our format": (argv(**{"models.actor": str(bad / "hf_like")}), "is neither a gil_megatron model directory"),
        "head shape": (argv(**{"models.critic": models["critic3"]}), "shape of 'output_layer.score.weight'"),
        "resume old format": (overrides(mini, bad / "run_other", **{"parallel.tp": 2, "checkpoint.resume": "auto"}),
                              "older checkpoint format"),
        "does not fit": (argv(**{"models.actor": str(huge)}), "do not fit: estimated"),
        "missing tokenizer": (argv(**{"models.tokenizer": str(bad / "nope_tok")}), "no tokenizer"),
        "reward fn import": (argv(**{"models.reward_model": "null", "models.reward_fn": "no_such_module:f"}),
                             "cannot import module 'no_such_module'"),
        "reward fn missing": (argv(**{"models.reward_model": "null", "models.reward_fn": "reward_fns:nope"}),
                              "has no function 'nope'"),
        "reward fn length": (argv(**{"models.reward_model": "null", "models.reward_fn": "reward_fns:wrong_length"}),
                             "returned 17 scores for 16 responses"),
        "reward fn type": (argv(**{"models.reward_model": "null", "models.reward_fn": "reward_fns:not_numbers"}),
                           "must return a list of floats"),
        "reward fn nan": (argv(**{"models.reward_model": "null", "models.reward_fn": "reward_fns:nan_scores",
                                  "train.steps": 5, "train.max_bad_steps": 2}),
                          "2 consecutive iterations with non-finite values (last: non-finite scores"),
    }
    results = spawn(_run_cases, 2, {k: v[0] for k, v in cases.items()})[0]
    for name, (_, expected) in cases.items():
        code, err = results[name]
        lines = [line for line in err.splitlines() if line.strip()]
        error_lines = [line for line in lines if line.startswith("error")]
        assert code == 2, (name, code, err[-500:])
        assert len(error_lines) == 1 and "Traceback" not in err, (name, err[-500:])
        assert expected in error_lines[0], (name, error_lines[0])
    assert len(cases) >= 20


def test_rank_killed_mid_run_and_during_save_resumes_exactly(mini, tmp_path):  # noqa: F811
    """One torchrun launch with --max-restarts 2 of a TP=2 run: rank 1 is SIGKILLed at the start of
    iteration 3; torchrun restarts the workers, which resume from iteration 2; then rank 0 is
    SIGKILLed in the middle of writing the iteration-4 checkpoint; the third attempt resumes from
    iteration 2 again (the partial checkpoint is never picked). Metrics and weights equal an
    uninterrupted run's, bit for bit."""
    from gil_megatron.models.weights import hf_tensors_of_checkpoint
    from gil_megatron.training.checkpoint import complete_checkpoints

    def launch(run_dir, faults=None):
        argv = launcher_overrides(mini, run_dir, **{"parallel.tp": 2, "train.steps": 4, "train.save_every": 2,
                                           "checkpoint.resume": "auto", "checkpoint.keep_last": 1})
        env = {**os.environ, "NPROC": "2", "PYTHON": sys.executable, "MAX_RESTARTS": "2"}
        if faults:
            env["GIL_MEGATRON_FAULTS"] = faults
        proc = subprocess.run(["bash", os.path.join(ROOT, "examples", "run_gil_ppo.sh"),
                               os.path.join(ROOT, "examples", "configs", "miniature.yaml"), *argv],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout + proc.stderr

    def metrics(run_dir):
        lines = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
        return [{k: v for k, v in m.items() if not k.startswith("time/") and k != "rollout/tokens_per_s"}
                for m in lines]

    clean, faulty = tmp_path / "clean", tmp_path / "faulty"
    launch(clean)
    log = launch(faulty, "rank1:iter3:attempt0:before_iteration,rank0:iter4:attempt1:during_save")
    assert log.count("resumed from") == 2 and log.count("at iteration 2") == 2, log[-3000:]

    assert metrics(faulty) == metrics(clean)
    ckpts = complete_checkpoints(str(faulty))
    assert [os.path.basename(c) for c in ckpts] == ["iter_0000004"]  # keep_last=1 rotated iteration 2 away
    for model in ("actor", "critic"):  # every model directory carries the tokenizer (for --to-hf)
        assert os.path.isfile(os.path.join(ckpts[-1], model, "tokenizer.json")), model
    a = dict(hf_tensors_of_checkpoint(os.path.join(complete_checkpoints(str(clean))[-1], "actor")))
    b = dict(hf_tensors_of_checkpoint(os.path.join(ckpts[-1], "actor")))
    assert all(torch.equal(a[n], b[n]) for n in a)


def _nan_gradient_step(actor_dir):
    from gil_megatron.models.build import model_from_checkpoint
    from gil_megatron.parallel import distributed
    from gil_megatron.training.optim import OptimSettings, Trainable

    layout = distributed.initialize(2, 1, seed=0)
    model = model_from_checkpoint(actor_dir, "actor", layout)
    trainable = Trainable(model, OptimSettings(lr=1e-2))
    before = {k: v.clone() for k, v in model.state_dict().items() if v is not None}
    ids = torch.randint(0, 24, (2, 8))

    def loss_fn(batch, logits):
        return logits[..., :24].float().clamp(min=-1e4).mean(), {}  # rank 1's shard is all padding

    trainable.forward_backward([{"input_ids": ids}], loss_fn)
    if layout.tp_rank == 1:  # one rank's accumulated gradient goes bad
        next(p for p in model.parameters() if getattr(p, "main_grad", None) is not None).main_grad[0] = float("nan")
    updated, norm = trainable.step()
    unchanged = all(torch.equal(before[k], v) for k, v in model.state_dict().items() if k in before)
    trainable.forward_backward([{"input_ids": ids}], loss_fn)
    updated_after, _ = trainable.step()
    return updated, norm, unchanged, updated_after


def test_non_finite_gradient_on_one_rank_skips_the_update_everywhere(mini):  # noqa: F811
    results = spawn(_nan_gradient_step, 2, str(mini / "actor"))
    for updated, norm, unchanged, updated_after in results:
        assert not updated and norm != norm and unchanged  # skipped on both ranks, weights untouched
        assert updated_after  # the next finite step goes through
