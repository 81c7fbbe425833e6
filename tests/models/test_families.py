"""Llama-3 rope_scaling, linear RoPE scaling, Qwen2 (q/k/v bias, tied and untied), Mistral and Qwen3
(per-head q/k RMSNorm, head_dim != hidden / heads, tied and untied): converted checkpoints give
transformers' logits at TP2, PP2 and TP2xPP2, and convert back bit-identically. Unsupported
variants are refused with one line that names the field."""

import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config, Qwen3MoeConfig

from dist_utils import spawn
from hf_files import read_all

TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5)
# name -> (config class, overrides). Small original contexts make every RoPE band matter at 12 tokens.
FAMILIES = {
    "llama3": (LlamaConfig, dict(vocab_size=100, rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16})),
    "llama_linear": (LlamaConfig, dict(vocab_size=100, rope_scaling={"rope_type": "linear", "factor": 4.0})),
    "qwen2": (Qwen2Config, dict(vocab_size=100, rope_theta=1000000.0)),
    "qwen2_tied_odd_vocab": (Qwen2Config, dict(vocab_size=1001, tie_word_embeddings=True)),
    "mistral": (MistralConfig, dict(vocab_size=100, sliding_window=None)),
    # head_dim 32 != hidden / heads = 16, so q/k/o shapes differ from a Llama's
    "qwen3": (Qwen3Config, dict(vocab_size=100, head_dim=32, rope_theta=1000000.0)),
    "qwen3_tied_odd_vocab": (Qwen3Config, dict(vocab_size=1001, head_dim=16, tie_word_embeddings=True)),
}
# scaled RoPE and Qwen3's q/k norms through the KV cache (positions offset step by step): greedy
# tokens at TP2xPP2
GENERATE = ("llama3", "llama_linear", "qwen3")
PROMPT_LENGTHS = (7, 4)
MAX_NEW = 6


def make_hf(path, name: str, seed: int = 0) -> str:
    """A tiny random model of the family; every tensor (biases and norms too) random, so a
    mapping mistake in any of them shows in the logits or the round trip."""
    cls, overrides = FAMILIES[name]
    config = cls(**{**TINY, **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).float()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            p.copy_(1.0 + 0.1 * torch.randn_like(p) if "norm" in pname else 0.05 * torch.randn_like(p))
    model.save_pretrained(str(path))
    return str(path)


def _logits_all_layouts(ckpts, ids, layouts):
    """4 ranks visit each layout (dp = 4 / (tp * pp)); every model of every family per layout."""
    from gil_megatron.models.build import model_from_checkpoint
    from gil_megatron.models.pipeline import broadcast_from_last_stage, gather_vocab_shards, run_microbatches
    from gil_megatron.models.weights import arch_of
    from gil_megatron.parallel import distributed
    from gil_megatron.ppo.rollout import SamplingSettings, generate

    out = {}
    for tp, pp in layouts:
        layout = distributed.initialize(tp, pp, seed=1)
        for name, by_layout in ckpts.items():
            ckpt = by_layout[(tp, pp)]
            arch = arch_of(ckpt)[0]
            model = model_from_checkpoint(ckpt, "actor", layout, torch.float32, trainable=False)
            with torch.no_grad():
                outs = run_microbatches(model, [{"input_ids": ids}], forward_only=True)
                logits = gather_vocab_shards(outs[0]["output"])[..., :arch.vocab_size] if outs else None
                (logits,) = broadcast_from_last_stage([logits] if logits is not None else None)
            out[(name, tp, pp)] = logits
            if (tp, pp) == (2, 2) and name in GENERATE:
                lengths = torch.tensor(PROMPT_LENGTHS)
                rollout = generate(model, ids[:, :max(PROMPT_LENGTHS)], lengths,
                                   SamplingSettings(max_new_tokens=MAX_NEW, greedy=True))
                out[(name, "greedy")] = [rollout.sequences[r][rollout.response_mask[r].bool()].tolist()
                                         for r in range(len(PROMPT_LENGTHS))]
    return out


def test_families_match_transformers_at_tp2_pp2(tmp_path):
    """TP2xPP2 (both splits at once), logits and greedy generation: the quick check."""
    _check_layouts(tmp_path, [(2, 2)])


@pytest.mark.slow
def test_families_match_transformers_at_tp2_and_pp2(tmp_path):
    _check_layouts(tmp_path, [(2, 1), (1, 2)])


def _check_layouts(tmp_path, layouts):
    from gil_megatron.models.convert import hf_to_megatron

    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    expected, ckpts, greedy = {}, {}, {}
    for name in FAMILIES:
        hf_dir = make_hf(tmp_path / name, name)
        with torch.no_grad():
            hf_model = AutoModelForCausalLM.from_pretrained(hf_dir).float().eval()
            expected[name] = hf_model(ids).logits
            if name in GENERATE and (2, 2) in layouts:
                greedy[name] = [hf_model.generate(ids[r:r + 1, :n], max_new_tokens=MAX_NEW, min_new_tokens=MAX_NEW,
                                                  do_sample=False)[0, n:].tolist()
                                for r, n in enumerate(PROMPT_LENGTHS)]
        ckpts[name] = {}
        for tp, pp in layouts:
            ckpts[name][(tp, pp)] = str(tmp_path / f"{name}_tp{tp}_pp{pp}")
            hf_to_megatron(hf_dir, ckpts[name][(tp, pp)], tp, pp)
    per_rank = spawn(_logits_all_layouts, 4, ckpts, ids, layouts)
    for name in FAMILIES:
        for tp, pp in layouts:
            for rank, result in enumerate(per_rank):
                err = (result[(name, tp, pp)] - expected[name]).abs().max().item()
                print(f"parity {name} tp={tp} pp={pp} rank={rank} max_abs_diff={err:.2e}")
                assert err < 1e-4, (name, tp, pp, rank, err)
    for name in greedy:
        assert all(r[(name, "greedy")] == greedy[name] for r in per_rank), (name, greedy[name], per_rank[0][(name, "greedy")])


@pytest.mark.parametrize("name", list(FAMILIES))
def test_round_trip_is_bit_identical(tmp_path, name):
    from gil_megatron.models.convert import hf_to_megatron, megatron_to_hf

    hf_dir = make_hf(tmp_path / "hf", name, seed=1)
    hf_to_megatron(hf_dir, str(tmp_path / "mg"), 2, 2)
    megatron_to_hf(str(tmp_path / "mg"), str(tmp_path / "back"))
    original, back = read_all(hf_dir), read_all(str(tmp_path / "back"))
    assert original.keys() == back.keys()
    for key, tensor in original.items():
        assert back[key].dtype == tensor.dtype and torch.equal(back[key], tensor), key
    source = json.load(open(os.path.join(hf_dir, "config.json")))
    exported = AutoModelForCausalLM.from_pretrained(str(tmp_path / "back")).config
    assert exported.model_type == source["model_type"]
    assert exported.rope_parameters == AutoModelForCausalLM.from_pretrained(hf_dir).config.rope_parameters


@pytest.mark.parametrize("cls,overrides,expected", [
    (LlamaConfig, dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0}),
     "rope_type='dynamic' is not supported by megatron-core's RotaryEmbedding; supported: default, linear, llama3"),
    (LlamaConfig, dict(rope_scaling={"rope_type": "yarn", "factor": 2.0}), "rope_type='yarn'"),
    (MistralConfig, dict(sliding_window=16), "sliding_window=16 < max_position_embeddings=64"),
    (Qwen2Config, dict(use_sliding_window=True, sliding_window=16, max_window_layers=0), "sliding_window=16"),
    (LlamaConfig, dict(attention_bias=True), "attention_bias=True"),
    (Qwen3Config, dict(use_sliding_window=True, sliding_window=16, max_window_layers=1),
     "config.json layer_types[1]='sliding_attention' with sliding_window=16 < max_position_embeddings=64"),
    (Qwen3Config, dict(layer_types=["sliding_attention", "full_attention"], use_sliding_window=True, sliding_window=32),
     "layer_types[0]='sliding_attention' with sliding_window=32"),
    (Qwen3Config, dict(attention_bias=True), "config.json attention_bias=True: only bias-free Qwen3"),
    (Qwen3Config, dict(rope_parameters={"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 32,
                                        "rope_theta": 1e6}), "rope_type='yarn'"),
    (Qwen3Config, dict(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e6}), "rope_type='dynamic'"),
    (Qwen3MoeConfig, dict(), "model_type='qwen3_moe' does not convert"),
])
def test_unsupported_variants_are_refused(cls, overrides, expected):
    from gil_megatron.models.config import LlamaArchConfig

    hf = cls(**{**TINY, "vocab_size": 100, **overrides}).to_dict()
    with pytest.raises(ValueError) as info:
        LlamaArchConfig.from_hf_dict(hf)
    assert expected in str(info.value) and "\n" not in str(info.value)


def test_qwen3_without_layer_types_refuses_use_sliding_window():
    """A config.json written before transformers listed layer_types: the sliding layers are those
    from max_window_layers on, as transformers derives them."""
    from gil_megatron.models.config import LlamaArchConfig

    hf = Qwen3Config(**{**TINY, "vocab_size": 100, "use_sliding_window": True, "sliding_window": 16,
                        "max_window_layers": 1}).to_dict()
    del hf["layer_types"]
    with pytest.raises(ValueError, match=r"use_sliding_window=True \(layers 1..1\) with sliding_window=16"):
        LlamaArchConfig.from_hf_dict(hf)
    hf["max_window_layers"] = 2  # no layer slides: full attention everywhere, converts
    assert LlamaArchConfig.from_hf_dict(hf).qk_norm


def test_mistral_window_longer_than_the_context_converts():
    from gil_megatron.models.config import LlamaArchConfig

    arch = LlamaArchConfig.from_hf_dict(MistralConfig(**{**TINY, "vocab_size": 100, "sliding_window": 64}).to_dict())
    assert arch.model_type == "mistral" and not arch.qkv_bias
