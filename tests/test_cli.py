"""gil_megatron.cli and the launcher: one `error:` line and exit 2 before any worker, --help everywhere,
and the known-harmless warnings filtered in one place (gil_megatron/quiet.py)."""

import os
import subprocess
import sys

import pytest

from gil_megatron import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MINI = os.path.join(ROOT, "examples", "configs", "miniature.yaml")


def _validate(capsys, *argv):
    with pytest.raises(SystemExit) as e:
        cli.main(["validate", *argv])
    err = capsys.readouterr().err
    return e.value.code, err


@pytest.mark.parametrize("argv, message", [
    (["ppo", MINI, "no_such_key=3"], "error: unknown config key 'no_such_key'"),
    (["ppo", MINI, "rollout.batch_size=abc"], "error: config key rollout.batch_size: Value 'abc'"),
    (["ppo", MINI, "ppo.clip_eps=-1"], "error: ppo.clip_eps=-1.0 must be > 0"),
    (["--world-size", "3", "ppo", "--no-paths", MINI], "error: world size 3 is not divisible by parallel.tp*parallel.pp=2*1"),
    (["ppo", MINI, "data.train_prompts=/no/such.jsonl"], "error: data.train_prompts: /no/such.jsonl: no such file"),
    (["ppo", MINI, "data.chat_template=/no/such.jinja"], "error: data.chat_template='/no/such.jinja': not a file"),
    (["sft", "init=/no/such/dir", f"data.train={MINI}"], "error: data.train: "),
])
def test_validate_is_one_error_line_and_exit_2(capsys, argv, message):
    code, err = _validate(capsys, *argv)
    assert code == 2 and err.startswith(message) and err.count("\n") == 1, err


def test_validate_passes_silently_and_checks_model_dirs(capsys, tmp_path):
    data = tmp_path / "p.jsonl"
    data.write_text('{"prompt": "x"}\n')
    sets = [f"data.eval_prompts.eval={data}", f"data.eval_prompts.ood={data}"]  # (YAML dicts merge key by key)
    cli.main(["validate", "--world-size", "2", "ppo", MINI, f"data.train_prompts={data}", *sets,
              f"models.actor={tmp_path}", f"models.reward_model={tmp_path}"])
    assert capsys.readouterr().err == ""
    code, err = _validate(capsys, "ppo", MINI, f"data.train_prompts={data}", *sets,
                          "models.actor=/no/model", f"models.reward_model={tmp_path}")
    assert code == 2 and err.startswith("error: models.actor=/no/model: no such directory; fix: convert one")


def test_keys_lists_every_key_with_its_doc(capsys):
    cli.main(["keys", "sft"])
    out = capsys.readouterr().out
    assert "data.keys.prompt = 'prompt'    # The prompt: a string, or a conversation" in out
    assert "data.chat_template = 'auto'" in out and "train.steps = 100    # Steps to train" in out


def test_stage_entry_points_answer_help(capsys):
    with pytest.raises(SystemExit) as e:
        cli.stage_main("gil_megatron.stages.sft", ["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and out.startswith("Supervised fine-tuning") and "gil_megatron.cli keys sft" in out


def test_launcher_stops_a_bad_key_before_torchrun():
    env = {**os.environ, "PYTHON": sys.executable, "NPROC": "2"}
    proc = subprocess.run(["bash", os.path.join(ROOT, "examples", "run_gil_ppo.sh"), MINI, "no_such_key=3"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: unknown config key 'no_such_key'; check the spelling against gil_megatron/config.py"]
    assert proc.stdout == ""
    helped = subprocess.run(["bash", os.path.join(ROOT, "examples", "run_gil_ppo.sh"), "--help"],
                            capture_output=True, text=True, timeout=30)
    assert helped.returncode == 0 and helped.stdout.startswith("GIL-PPO launcher") and "NPROC" in helped.stdout


def test_known_harmless_warnings_are_filtered_unless_verbose():
    code = ("import gil_megatron, warnings, logging\n"
            "warnings.warn('Apex is not installed. Falling back to Torch Norm', UserWarning)\n"
            "logging.getLogger('torch.utils.cpp_extension').warning('No CUDA runtime is found, using X')\n"
            "warnings.warn('something new', UserWarning)\n")
    env = {k: v for k, v in os.environ.items() if k != "GIL_MEGATRON_VERBOSE"}
    env["PYTHONPATH"] = ROOT
    quiet = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert "Apex" not in quiet.stderr and "No CUDA runtime" not in quiet.stderr and "something new" in quiet.stderr
    loud = subprocess.run([sys.executable, "-c", code], env={**env, "GIL_MEGATRON_VERBOSE": "1"},
                          capture_output=True, text=True, timeout=60)
    assert "Apex is not installed" in loud.stderr and "No CUDA runtime" in loud.stderr
