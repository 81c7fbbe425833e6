"""HF <-> sharded conversion: round trip bit-identical, heads, verify tool, one-line errors."""

import os
import subprocess
import sys

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

from dist_utils import spawn
from hf_files import read_all

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tools"))

import convert_hf_checkpoint  # noqa: E402
import verify_checkpoint  # noqa: E402


def tiny_config(**kw):
    base = dict(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64, rope_theta=10000.0, pad_token_id=0)
    base.update(kw)
    return LlamaConfig(**base)


def save(model, path, dtype=torch.float32):
    model.to(dtype).save_pretrained(path)
    return str(path)


def convert(*argv):
    convert_hf_checkpoint.main(list(argv))


@pytest.mark.parametrize("tied,dtype,tp,pp", [(False, torch.float32, 2, 2), (True, torch.bfloat16, 2, 1),
                                              (False, torch.bfloat16, 1, 2)])
def test_round_trip_is_bit_identical(tmp_path, tied, dtype, tp, pp):
    torch.manual_seed(0)
    hf_dir = save(LlamaForCausalLM(tiny_config(tie_word_embeddings=tied)), tmp_path / "hf", dtype)
    convert("--load-dir", hf_dir, "--save-dir", str(tmp_path / "mg"), "--target-tensor-parallel-size", str(tp),
            "--target-pipeline-parallel-size", str(pp))
    convert("--to-hf", "--load-dir", str(tmp_path / "mg"), "--save-dir", str(tmp_path / "back"))
    original, back = read_all(hf_dir), read_all(str(tmp_path / "back"))
    assert original.keys() == back.keys()
    for name, tensor in original.items():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor), name
    reloaded = LlamaForCausalLM.from_pretrained(str(tmp_path / "back"))  # transformers accepts it
    assert reloaded.config.num_key_value_heads == 2


def _verify(argv):
    return verify_checkpoint.main(argv)


def test_verify_pp2_odd_vocab(tmp_path):
    """vocab 1001 (not a multiple of 128) at PP2: the last stage's logits[..., :vocab] is a
    non-contiguous view that raw gloo broadcast as garbage (max_abs_diff inf)."""
    torch.manual_seed(4)
    hf_dir = save(LlamaForCausalLM(tiny_config(vocab_size=1001)), tmp_path / "hf")
    convert("--load-dir", hf_dir, "--save-dir", str(tmp_path / "mg"), "--target-pipeline-parallel-size", "2")
    diffs = spawn(_verify, 2, ["--load-dir", str(tmp_path / "mg"), "--hf-dir", hf_dir, "--seq-length", "8"])
    print(f"verify pp=2 vocab=1001 max_abs_diff={diffs[0]:.2e}")
    assert diffs[0] < 1e-4 and diffs[1] is None


def test_reward_and_critic_heads_match_transformers(tmp_path, capsys):
    torch.manual_seed(1)
    hf_rm = save(LlamaForSequenceClassification(tiny_config(num_labels=1)), tmp_path / "rm")
    convert("--load-dir", hf_rm, "--save-dir", str(tmp_path / "rm_tp2"), "--target-tensor-parallel-size", "2",
            "--model-type", "reward")
    assert "trunk and score head loaded" in capsys.readouterr().out
    convert("--load-dir", hf_rm, "--save-dir", str(tmp_path / "critic"), "--target-pipeline-parallel-size", "2",
            "--model-type", "critic")
    assert ("value and task-value rows loaded from a reward model; the group head is freshly initialised"
            in capsys.readouterr().out)
    # reward model at TP2 and the critic (value row = RM score) at PP2 against transformers
    spawn(_verify, 2, ["--load-dir", str(tmp_path / "rm_tp2"), "--hf-dir", hf_rm])
    convert("--to-hf", "--load-dir", str(tmp_path / "critic"), "--save-dir", str(tmp_path / "critic_hf"))
    spawn(_verify, 2, ["--load-dir", str(tmp_path / "critic"), "--hf-dir", str(tmp_path / "critic_hf")])
    critic_score = read_all(str(tmp_path / "critic_hf"))["score.weight"]
    assert critic_score.shape == (4, 64)  # value, task value, 2 group logits
    for row in (0, 1):  # both value rows start from the RM's score row
        assert torch.equal(critic_score[row], read_all(hf_rm)["score.weight"][0])
    assert critic_score[2:].abs().sum() > 0  # group rows not all equal -> assignments not uniform


def test_qwen3_reward_and_critic_convert_both_ways(tmp_path, capsys):
    """Qwen3ForSequenceClassification: a reward model at TP2 and a critic seeded from it at PP2 give
    transformers' scores; the reward model's round trip is bit-identical and exports as Qwen3."""
    from transformers import AutoConfig, Qwen3Config, Qwen3ForSequenceClassification

    torch.manual_seed(5)
    config = Qwen3Config(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=64,
                         num_labels=1, pad_token_id=0)
    model = Qwen3ForSequenceClassification(config)
    with torch.no_grad():  # q/k norms away from 1, so a dropped norm shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
    hf_rm = save(model, tmp_path / "rm")
    convert("--load-dir", hf_rm, "--save-dir", str(tmp_path / "rm_tp2"), "--target-tensor-parallel-size", "2",
            "--model-type", "reward")
    convert("--load-dir", hf_rm, "--save-dir", str(tmp_path / "critic"), "--target-pipeline-parallel-size", "2",
            "--model-type", "critic")
    assert "value and task-value rows loaded from a reward model" in capsys.readouterr().out
    diffs = spawn(_verify, 2, ["--load-dir", str(tmp_path / "rm_tp2"), "--hf-dir", hf_rm])
    print(f"verify qwen3 reward tp=2 max_abs_diff={diffs[0]:.2e}")
    assert diffs[0] < 1e-4
    convert("--to-hf", "--load-dir", str(tmp_path / "rm_tp2"), "--save-dir", str(tmp_path / "rm_back"))
    original, back = read_all(hf_rm), read_all(str(tmp_path / "rm_back"))
    assert original.keys() == back.keys() and all(torch.equal(back[k], t) for k, t in original.items())
    assert AutoConfig.from_pretrained(str(tmp_path / "rm_back")).architectures == ["Qwen3ForSequenceClassification"]
    convert("--to-hf", "--load-dir", str(tmp_path / "critic"), "--save-dir", str(tmp_path / "critic_hf"))
    spawn(_verify, 2, ["--load-dir", str(tmp_path / "critic"), "--hf-dir", str(tmp_path / "critic_hf")])
    assert torch.equal(read_all(str(tmp_path / "critic_hf"))["score.weight"][0], original["score.weight"][0])


def test_verify_tool_under_torchrun(tmp_path):
    """The user's command: convert at TP2, verify with torchrun; last line is the max difference."""
    torch.manual_seed(2)
    hf_dir = save(LlamaForCausalLM(tiny_config(vocab_size=101)), tmp_path / "hf")
    convert("--load-dir", hf_dir, "--save-dir", str(tmp_path / "mg"), "--target-tensor-parallel-size", "2")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           os.path.join(ROOT, "tools", "verify_checkpoint.py"), "--load-dir", str(tmp_path / "mg"),
                           "--hf-dir", hf_dir], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("max_abs_diff") and float(last.split()[1]) < 1e-4


def run_cli(argv):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "convert_hf_checkpoint.py"), *argv],
                          capture_output=True, text=True, timeout=120)
    return proc.returncode, proc.stderr


def test_bad_inputs_give_one_line_errors(tmp_path, capsys):
    torch.manual_seed(3)
    hf_dir = save(LlamaForCausalLM(tiny_config(num_attention_heads=6, num_key_value_heads=3, hidden_size=48,
                                               num_hidden_layers=3)), tmp_path / "hf")
    cases = {
        "missing dir": (["--load-dir", str(tmp_path / "nope"), "--save-dir", str(tmp_path / "o")], "config.json"),
        "tp vs heads": (["--load-dir", hf_dir, "--save-dir", str(tmp_path / "o"), "--target-tensor-parallel-size", "4"],
                        "num_attention_heads=6"),
        "tp vs kv heads": (["--load-dir", hf_dir, "--save-dir", str(tmp_path / "o"), "--target-tensor-parallel-size", "2"],
                           "num_kv_heads=3"),
        "pp vs layers": (["--load-dir", hf_dir, "--save-dir", str(tmp_path / "o"), "--target-pipeline-parallel-size", "2"],
                         "num_layers=3"),
        "model type": (["--load-dir", hf_dir, "--save-dir", str(tmp_path / "o"), "--model-type", "policy"],
                       "--model-type 'policy'"),
    }
    capsys.readouterr()  # drop save_pretrained's progress output
    for name, (argv, expected) in cases.items():
        with pytest.raises(SystemExit) as exit_info:
            convert_hf_checkpoint.run_cli(convert_hf_checkpoint.main, argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_info.value.code == 2 and len(err) == 1 and err[0].startswith("error:"), (name, err)
        assert expected in err[0], (name, err[0])
    assert not os.path.exists(tmp_path / "o")  # nothing half-written
    code, stderr = run_cli(["--load-dir", hf_dir, "--save-dir", str(tmp_path / "o"), "--target-tensor-parallel-size", "2"])
    assert code == 2 and "Traceback" not in stderr and stderr.strip().startswith("error:")
