"""models/build.py: a Hugging Face directory given straight to model_from_checkpoint (what
models.actor / reference / critic / reward_model and a stage's init accept) gives at TP2 and PP2 the
same weights, bit for bit, and the same outputs as the directory converted first with
tools/convert_hf_checkpoint.py, for every role (actor; critic from an LM or from a reward model;
reward model) and for Qwen3; each TP rank reads only its part of the tensors; the tokenizer comes
from the HF directory; a directory of neither format is refused in one line."""

import os
import sys

import pytest
import torch

from dist_utils import spawn

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tools"))

import convert_hf_checkpoint  # noqa: E402

TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, pad_token_id=0)
LAYOUTS = [(2, 1), (1, 2)]
# (HF directory, role to build): every way a run starts a model from a HF checkpoint
CASES = [("llama_lm", "actor"), ("llama_lm", "critic"), ("llama_rm", "critic"), ("llama_rm", "reward"),
         ("qwen3_tied", "actor"), ("qwen3_tied", "critic")]


def make_hf_dirs(tmp_path) -> dict:
    """A Llama LM (odd vocabulary: the padded rows fall on TP rank 1; sharded safetensors with an
    index), a Llama reward model saved in bf16, a tied Qwen3 LM with head_dim != hidden
    / heads. Every tensor random (norms and score heads too)."""
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        LlamaForSequenceClassification,
        Qwen3Config,
        Qwen3ForCausalLM,
    )

    specs = {
        "llama_lm": (LlamaForCausalLM(LlamaConfig(vocab_size=1001, **TINY)), torch.float32, "60KB"),
        "llama_rm": (LlamaForSequenceClassification(LlamaConfig(vocab_size=100, num_labels=1, **TINY)),
                     torch.bfloat16, None),
        "qwen3_tied": (Qwen3ForCausalLM(Qwen3Config(vocab_size=100, head_dim=32, tie_word_embeddings=True, **TINY)),
                       torch.float32, None),
    }
    dirs = {}
    for seed, (name, (model, dtype, shard)) in enumerate(specs.items()):
        torch.manual_seed(seed)
        with torch.no_grad():
            for pname, p in model.named_parameters():
                p.copy_(1.0 + 0.1 * torch.randn_like(p) if "norm" in pname else 0.05 * torch.randn_like(p))
        dirs[name] = str(tmp_path / name)
        model.to(dtype).save_pretrained(dirs[name], **({"max_shard_size": shard} if shard else {}))
    return dirs


def transformers_outputs(hf_dirs, ids) -> dict:
    """(name, role) -> transformers' logits [b, s, V] of the LMs, the reward model's score [b, 1]."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    with torch.no_grad():
        return {("llama_lm", "actor"): AutoModelForCausalLM.from_pretrained(hf_dirs["llama_lm"]).float()(ids).logits,
                ("qwen3_tied", "actor"): AutoModelForCausalLM.from_pretrained(hf_dirs["qwen3_tied"]).float()(ids).logits,
                ("llama_rm", "reward"): AutoModelForSequenceClassification.from_pretrained(
                    hf_dirs["llama_rm"]).float()(ids).logits[:, 0]}


def _models_agree(hf_dirs, converted, ids):
    """Per layout and case: weights bit-identical, outputs bit-identical, and the HF model's outputs."""
    from gil_megatron.models.build import model_from_checkpoint
    from gil_megatron.models.pipeline import broadcast_from_last_stage, gather_vocab_shards, run_microbatches
    from gil_megatron.parallel import distributed

    def outputs(model):
        with torch.no_grad():
            outs = run_microbatches(model, [{"input_ids": ids}], forward_only=True)
            out = outs[0]["output"] if outs else None
            if out is not None and model.role == "actor":  # vocab-parallel logits -> the real vocabulary
                out = gather_vocab_shards(out)[..., :model.arch.vocab_size].contiguous()
            (out,) = broadcast_from_last_stage([out] if out is not None else None)
        return out

    result = {}
    for tp, pp in LAYOUTS:
        layout = distributed.initialize(tp, pp, seed=1)
        for name, role in CASES:
            direct = model_from_checkpoint(hf_dirs[name], role, layout, torch.float32, trainable=False)
            first = model_from_checkpoint(converted[(name, role)], role, layout, torch.float32, trainable=False)
            a, b = direct.state_dict(), first.state_dict()
            same = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a if not k.endswith("_extra_state"))
            out_direct, out_first = outputs(direct), outputs(first)
            result[(tp, pp, name, role)] = {"weights": same, "outputs": torch.equal(out_direct, out_first),
                                            "finite": bool(torch.isfinite(out_direct).all()),
                                            "shape": tuple(out_direct.shape), "output": out_direct}
    return result


def _bytes_read_at_tp2(hf_dir):
    """Bytes the HF reader hands this rank while building a TP2 actor."""
    from gil_megatron.models import weights
    from gil_megatron.models.build import model_from_checkpoint
    from gil_megatron.parallel import distributed

    read = [0]
    original = weights.HFReader.__call__

    def counting(self, name, index=None):
        tensor = original(self, name, index)
        read[0] += tensor.numel() * tensor.element_size()
        return tensor

    weights.HFReader.__call__ = counting
    layout = distributed.initialize(2, 1, seed=1)
    model_from_checkpoint(hf_dir, "actor", layout, torch.float32, trainable=False)
    return read[0]


def test_hf_directory_loads_like_its_conversion_at_tp2_and_pp2(tmp_path):
    hf_dirs = make_hf_dirs(tmp_path)
    converted = {}
    for name, role in CASES:
        converted[(name, role)] = str(tmp_path / f"{name}_{role}")
        convert_hf_checkpoint.main(["--load-dir", hf_dirs[name], "--save-dir", converted[(name, role)],
                                    "--model-type", role])
    ids = torch.randint(1, 100, (2, 10), generator=torch.Generator().manual_seed(0))  # no pad: scores at s-1
    expected = transformers_outputs(hf_dirs, ids)
    per_rank = spawn(_models_agree, 2, hf_dirs, converted, ids)
    for rank, result in enumerate(per_rank):
        for (tp, pp, name, role), r in result.items():
            assert r["weights"] and r["outputs"] and r["finite"], (rank, tp, pp, name, role, r)
            if (name, role) in expected:  # and both equal transformers' own forward
                out = r["output"][:, -1] if role == "reward" else r["output"]
                err = (out - expected[(name, role)]).abs().max().item()
                print(f"hf dir {name} as {role} tp={tp} pp={pp} rank={rank} max_abs_diff vs transformers={err:.2e}")
                assert err < 1e-4, (name, role, tp, pp, rank, err)
            b, s = ids.shape
            vocab = 1001 if name == "llama_lm" else 100
            assert r["shape"] == {"actor": (b, s, vocab), "critic": (b, s, 4), "reward": (b, s)}[role], (name, role)


def test_each_tp_rank_reads_only_its_shard(tmp_path):
    from hf_files import read_all

    hf_dir = make_hf_dirs(tmp_path)["llama_lm"]
    total = sum(t.numel() * t.element_size() for t in read_all(hf_dir).values())
    per_rank = spawn(_bytes_read_at_tp2, 2, hf_dir)
    print(f"bytes read per TP rank {per_rank} of {total}")
    # half of every matrix (+ the small norms, whole on each rank), never the whole checkpoint
    assert all(0.45 * total < n < 0.55 * total for n in per_rank), (per_rank, total)


def test_tokenizer_comes_from_the_hf_directory(tmp_path):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from gil_megatron.miniature.tokenizer import VOCAB_SIZE, save_tokenizer
    from gil_megatron.models.build import load_tokenizer
    from gil_megatron.models.weights import HF, checkpoint_format

    LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB_SIZE, **TINY)).save_pretrained(str(tmp_path))
    save_tokenizer(str(tmp_path))
    assert checkpoint_format(str(tmp_path)) == HF
    text = "<bos> a b"
    assert load_tokenizer(str(tmp_path))(text)["input_ids"] == AutoTokenizer.from_pretrained(str(tmp_path))(text)["input_ids"]


def test_a_directory_of_neither_format_is_refused_in_one_line(tmp_path):
    from gil_megatron.models.build import model_from_checkpoint
    from gil_megatron.models.weights import CheckpointError, arch_of

    bin_only = tmp_path / "bin_only"
    bin_only.mkdir()
    (bin_only / "config.json").write_text("{}")
    (bin_only / "pytorch_model.bin").write_text("")
    cases = {
        str(bin_only): f"models.critic={bin_only} is neither a gil_megatron model directory (gil_megatron.json) nor "
                       "a Hugging Face one (config.json with model.safetensors or model.safetensors.index.json): "
                       "it holds config.json, pytorch_model.bin",
        str(tmp_path / "nope"): f"models.critic={tmp_path / 'nope'}: model directory does not exist",
    }
    (tmp_path / "empty").mkdir()
    cases[str(tmp_path / "empty")] = "it is empty"
    for path, expected in cases.items():
        for load in (lambda: arch_of(path, key="models.critic"),
                     lambda: model_from_checkpoint(path, "critic", None, key="models.critic")):
            with pytest.raises(CheckpointError) as info:
                load()
            assert expected in str(info.value) and "\n" not in str(info.value), str(info.value)
