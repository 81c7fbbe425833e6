"""--to-hf: the exported directory loads with AutoModelForCausalLM + AutoTokenizer (chat template
and bos/eos/pad ids included) and transformers' greedy generate gives our engine's tokens."""

import json
import os
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from dist_utils import run_single

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tools"))

import convert_hf_checkpoint  # noqa: E402

TEMPLATE = ("{% for m in messages %}<|bos|>{{ m['role'] }}: {{ m['content'] }}<|eos|>{% endfor %}"
            "{% if add_generation_prompt %}<|bos|>assistant:{% endif %}")


def build_tokenizer(path) -> str:
    """A real byte-level BPE tokenizer trained here (no hub), with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|eos|>", "<|pad|>", "<|bos|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog", "user: hello, how are you?",
                             "assistant: fine, thanks. and you?"] * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>",
                                   pad_token="<|pad|>")
    fast.chat_template = TEMPLATE
    fast.save_pretrained(str(path))
    return str(path)


def make_hf_model(path, vocab_size: int) -> str:
    """Random weights large enough that greedy choices are not near-ties; no special ids in the
    config (the tokenizer must supply them)."""
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      bos_token_id=None, eos_token_id=None, pad_token_id=None)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0, 0.1)
    model.save_pretrained(str(path))
    return str(path)


def _engine_greedy(ckpt_dir, prompts, eos_id, pad_id, max_new_tokens):
    from gil_megatron.models.build import model_from_checkpoint
    from gil_megatron.parallel import distributed
    from gil_megatron.ppo.rollout import SamplingSettings, generate

    layout = distributed.initialize(1, 1, seed=0)
    model = model_from_checkpoint(ckpt_dir, "actor", layout, torch.float32, trainable=False)
    lengths = torch.tensor([len(p) for p in prompts])
    ids = torch.full((len(prompts), int(lengths.max())), pad_id)
    for row, p in enumerate(prompts):
        ids[row, :len(p)] = torch.tensor(p)
    settings = SamplingSettings(max_new_tokens=max_new_tokens, greedy=True, eos_token_id=eos_id, pad_token_id=pad_id)
    out = generate(model, ids, lengths, settings)
    return [out.sequences[row][out.response_mask[row].bool()].tolist() for row in range(len(prompts))]


def test_export_loads_with_auto_classes_and_generates_our_tokens(tmp_path, capsys):
    tok_dir = build_tokenizer(tmp_path / "tok")
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    hf_dir = make_hf_model(tmp_path / "hf", len(tokenizer))  # 300: not a multiple of 128
    # a checkpoint without tokenizer files (like a model initialised or trained without one)
    convert_hf_checkpoint.main(["--load-dir", hf_dir, "--save-dir", str(tmp_path / "ckpt")])
    assert not os.path.exists(tmp_path / "ckpt" / "tokenizer.json")
    convert_hf_checkpoint.main(["--to-hf", "--load-dir", str(tmp_path / "ckpt"), "--save-dir", str(tmp_path / "out"),
                                "--tokenizer-dir", tok_dir])
    assert f"tokenizer and chat template from {tok_dir}" in capsys.readouterr().out
    out = str(tmp_path / "out")

    exported_tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert exported_tok.chat_template == TEMPLATE
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}
    assert ids == {"bos_token_id": 2, "eos_token_id": 0, "pad_token_id": 1}
    gen_config = json.load(open(os.path.join(out, "generation_config.json")))
    for name, value in ids.items():
        assert getattr(model.config, name) == value and gen_config[name] == value, name

    chat = exported_tok.apply_chat_template([{"role": "user", "content": "hello, how are you?"}],
                                            add_generation_prompt=True, tokenize=True)
    chat = chat["input_ids"] if isinstance(chat, dict) or hasattr(chat, "keys") else chat
    prompts = [list(chat), exported_tok("the quick brown fox")["input_ids"]]
    max_new = 10
    expected = []
    with torch.no_grad():
        for prompt in prompts:
            generated = model.generate(torch.tensor([prompt]), max_new_tokens=max_new, do_sample=False)[0, len(prompt):]
            tokens = generated.tolist()
            expected.append(tokens[: tokens.index(ids["eos_token_id"]) + 1] if ids["eos_token_id"] in tokens else tokens)
    ours = run_single(_engine_greedy, str(tmp_path / "ckpt"), prompts, ids["eos_token_id"], ids["pad_token_id"], max_new)
    print("greedy tokens hf", expected, "ours", ours)
    assert ours == expected
    assert any(len(t) > 1 for t in ours)  # real generations, not an immediate eos


def test_export_ships_the_checkpoints_own_tokenizer(tmp_path, capsys):
    """A checkpoint that carries a tokenizer (converted from a HF dir that had one) exports it."""
    tok_dir = build_tokenizer(tmp_path / "hf")
    hf_dir = make_hf_model(tmp_path / "hf", 300)
    convert_hf_checkpoint.main(["--load-dir", hf_dir, "--save-dir", str(tmp_path / "ckpt"),
                                "--target-pipeline-parallel-size", "2"])
    assert os.path.isfile(tmp_path / "ckpt" / "chat_template.jinja")
    convert_hf_checkpoint.main(["--to-hf", "--load-dir", str(tmp_path / "ckpt"), "--save-dir", str(tmp_path / "out")])
    assert "tokenizer and chat template from" in capsys.readouterr().out
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    assert tok.chat_template == TEMPLATE and tok("hello")["input_ids"] == AutoTokenizer.from_pretrained(tok_dir)("hello")["input_ids"]
    assert json.load(open(tmp_path / "out" / "config.json"))["eos_token_id"] == 0


def test_export_refuses_a_wrong_tokenizer_or_a_training_checkpoint(tmp_path):
    import pytest

    tok_dir = build_tokenizer(tmp_path / "tok")
    hf_dir = make_hf_model(tmp_path / "hf", 200)
    ckpt = str(tmp_path / "iter_0000010" / "actor")  # a training checkpoint's layout
    convert_hf_checkpoint.main(["--load-dir", hf_dir, "--save-dir", ckpt])
    with pytest.raises(ValueError, match="has 300 tokens but the model's vocab_size is 200"):
        convert_hf_checkpoint.main(["--to-hf", "--load-dir", ckpt, "--save-dir", str(tmp_path / "out"),
                                    "--tokenizer-dir", tok_dir])
    with pytest.raises(ValueError, match=f"holding actor: pass one model directory, e.g. {ckpt}"):
        convert_hf_checkpoint.main(["--to-hf", "--load-dir", str(tmp_path / "iter_0000010"), "--save-dir",
                                    str(tmp_path / "out")])
    assert not os.path.exists(tmp_path / "out")
