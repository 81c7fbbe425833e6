"""Qwen3 (per-head q/k RMSNorm before RoPE) through our KV-cache decoder (models/inference.py) and the
packed forward (models/packing.py), the two paths that run attention outside megatron's own forward:
at TP1 and TP2 the decoder's logits equal the training forward's, greedy decoding equals
transformers' generate, and packed scoring equals padded scoring."""

import torch

from dist_utils import spawn

# transformers is imported inside the test: the spawned ranks import this module
VOCAB, PAD, MAX_NEW = 100, 0, 8
PROMPT_LENGTHS = (9, 4, 6)


def make_hf(path) -> str:
    """A tiny Qwen3 with head_dim != hidden / heads and every tensor random (the q/k norm weights
    too, so a decoder that skipped or misplaced them would give other logits)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=64,
                         rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(config).float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.3 * torch.randn_like(p) if "norm" in name else 0.1 * torch.randn_like(p))
    model.save_pretrained(str(path))
    return str(path)


def prompts():
    ids = torch.randint(1, VOCAB, (len(PROMPT_LENGTHS), max(PROMPT_LENGTHS)), generator=torch.Generator().manual_seed(1))
    lengths = torch.tensor(PROMPT_LENGTHS)
    ids[torch.arange(ids.shape[1]).unsqueeze(0) >= lengths.unsqueeze(1)] = PAD  # right padding
    return ids, lengths


def _decoder_vs_forward(model):
    """Last-position logits of an 8-column prefill then 4 single steps, rows left-padded by 0/3/5
    (what rollout does), next to the training forward's on the unpadded rows: [b, 5, V] each."""
    from gil_megatron.models.inference import KVCacheDecoder
    from gil_megatron.models.pipeline import gather_vocab_shards

    ids = torch.randint(1, VOCAB, (3, 12), generator=torch.Generator().manual_seed(4))
    left_pad, prefill = torch.tensor([0, 3, 5]), 8
    with torch.inference_mode():
        decoder = KVCacheDecoder(model, batch_size=3, max_length=12, left_pad=left_pad)
        padded = ids.masked_fill(torch.arange(12) < left_pad.unsqueeze(1), PAD)
        steps = [gather_vocab_shards(decoder.step(padded[:, :prefill], 0))]
        for t in range(prefill, 12):
            steps.append(gather_vocab_shards(decoder.step(padded[:, t:t + 1], t)))
        forward = torch.stack([gather_vocab_shards(model(ids[i:i + 1, p:]))[0, prefill - 1 - p:]
                               for i, p in enumerate(left_pad.tolist())])
    return forward[..., :VOCAB], torch.stack(steps, dim=1)[..., :VOCAB]


def _layouts(ckpt):
    from gil_megatron.models.build import model_from_checkpoint
    from gil_megatron.parallel import distributed
    from gil_megatron.ppo.rollout import SamplingSettings, generate
    from gil_megatron.ppo.scoring import score_logprobs

    out = {}
    for tp in (1, 2):
        layout = distributed.initialize(tp, 1, seed=1)
        model = model_from_checkpoint(ckpt, "actor", layout, torch.float32, trainable=False)
        ids, lengths = prompts()
        greedy = generate(model, ids, lengths, SamplingSettings(max_new_tokens=MAX_NEW, greedy=True, pad_token_id=PAD))
        with torch.no_grad():
            padded = score_logprobs(model, greedy.sequences, micro_batch_size=3)[0]
            packed = score_logprobs(model, greedy.sequences, micro_batch_size=3, packed_lengths=greedy.lengths)[0]
        out[tp] = {"greedy": [greedy.sequences[r][greedy.response_mask[r].bool()].tolist() for r in range(len(lengths))],
                   "decoder": _decoder_vs_forward(model), "padded": padded, "packed": packed,
                   "actions": greedy.response_mask[:, 1:].bool()}
    return out


def test_qwen3_decode_and_packing_match_the_forward_and_transformers(tmp_path):
    from transformers import Qwen3ForCausalLM

    from gil_megatron.models.convert import hf_to_megatron

    hf_dir = make_hf(tmp_path / "hf")
    hf = Qwen3ForCausalLM.from_pretrained(hf_dir).float().eval()
    ids, lengths = prompts()
    with torch.no_grad():
        expected = [hf.generate(ids[r:r + 1, :n], attention_mask=torch.ones(1, n, dtype=torch.long), do_sample=False,
                                max_new_tokens=MAX_NEW, min_new_tokens=MAX_NEW, pad_token_id=PAD)[0, n:].tolist()
                    for r, n in enumerate(PROMPT_LENGTHS)]
    ckpt = str(tmp_path / "ckpt")
    hf_to_megatron(hf_dir, ckpt, 1, 1)
    per_rank = spawn(_layouts, 2, ckpt)
    for rank, result in enumerate(per_rank):
        for tp, r in result.items():
            forward, decoded = r["decoder"]
            err = (decoded - forward).abs().max().item()
            print(f"qwen3 decoder vs forward tp={tp} rank={rank} max_abs_diff={err:.2e}")
            torch.testing.assert_close(decoded, forward, rtol=1e-5, atol=1e-5)
            assert r["greedy"] == expected, (tp, rank, r["greedy"], expected)
            actions = r["actions"]
            torch.testing.assert_close(r["packed"][actions], r["padded"][actions], rtol=1e-5, atol=1e-5)
            assert (r["padded"][actions] < 0).all()
