"""Generation with a KV cache under TP/PP: equal to HF's greedy generate, to a no-cache recompute,
and to itself across layouts; eos, lengths and masks; seeded sampling agrees on every rank."""

import dataclasses

import pytest
import torch

from dist_utils import spawn

# transformers is imported inside the functions that use it: the spawned ranks import this module,
# and on a 2-core machine four extra transformers imports cost seconds.

VOCAB = 100  # padded to 128 (tp1) / 256 (tp2): the -inf tail must never be sampled
LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2)]
MAX_NEW = 8
PAD = 0
HOT_ROWS, HOT_NEW = 64, 10  # 640 near-uniform draws: a padded id would show up ~140 times


def make_hf(tmp_path) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False, rope_theta=500.0, rms_norm_eps=1e-5)
    torch.manual_seed(0)
    out = str(tmp_path / "hf")
    LlamaForCausalLM(cfg).float().save_pretrained(out)
    return out


def prompts():
    g = torch.Generator().manual_seed(1)
    equal = torch.randint(1, VOCAB, (3, 6), generator=g)
    var_lengths = torch.tensor([9, 4, 6, 7])
    var = torch.randint(1, VOCAB, (4, 9), generator=g)
    var[torch.arange(9).unsqueeze(0) >= var_lengths.unsqueeze(1)] = PAD  # right padding
    return equal, var, var_lengths


def first_eos_expectation(seqs, prompt_lengths, eos):
    """From a run without eos: the lengths and sequences a run stopping at `eos` must give."""
    lengths, rows = [], []
    for row, lp in zip(seqs, prompt_lengths.tolist()):
        response = row[lp:lp + MAX_NEW].tolist()
        n = response.index(eos) + 1 if eos in response else MAX_NEW
        lengths.append(lp + n)
        rows.append(row[:lp + n])
    width = max(lengths)
    out = torch.full((len(rows), width), PAD, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return out, torch.tensor(lengths)


def _no_cache_greedy(model, ids, prompt_lengths):
    """Slow reference: each row alone, the full forward re-run every step, argmax appended."""
    from gil_megatron.models.pipeline import gather_vocab_shards

    rows = []
    for row, lp in zip(ids, prompt_lengths.tolist()):
        seq = row[:lp].unsqueeze(0)
        for _ in range(MAX_NEW):
            logits = gather_vocab_shards(model(seq)[:, -1])
            seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], dim=1)
        rows.append(seq[0])
    return rows


def _decoder_logits(model):
    """The decode path's last-position logits, step by step after an 8-column prefill, next to the
    training forward's logits at the same tokens: (forward [b, 5, V], decoded [b, 5, V], decoded
    padded-vocabulary tail). Rows 1 and 2 are left-padded by 3 and 5 columns (what rollout does
    with prompts of different lengths); the forward sees them unpadded."""
    from gil_megatron.models.inference import KVCacheDecoder
    from gil_megatron.models.pipeline import gather_vocab_shards

    ids = torch.randint(1, VOCAB, (3, 12), generator=torch.Generator().manual_seed(4))
    left_pad = torch.tensor([0, 3, 5])
    prefill = 8
    model.eval()
    with torch.inference_mode():
        decoder = KVCacheDecoder(model, batch_size=3, max_length=16, left_pad=left_pad)  # slots past 12 unused
        padded = ids.masked_fill(torch.arange(12) < left_pad.unsqueeze(1), PAD)
        steps = [gather_vocab_shards(decoder.step(padded[:, :prefill], 0))]
        for t in range(prefill, ids.shape[1]):
            steps.append(gather_vocab_shards(decoder.step(padded[:, t:t + 1], t)))
        forward = torch.stack([gather_vocab_shards(model(ids[i:i + 1, p:]))[0, prefill - 1 - p:]
                               for i, p in enumerate(left_pad.tolist())])  # [b, 5, V_pad]
    decoded = torch.stack(steps, dim=1)  # [b, 5, V_pad]
    return forward[..., :VOCAB], decoded[..., :VOCAB], decoded[..., VOCAB:]


def _layout(ckpt, tp, pp, eq_eos):
    from gil_megatron.models.llama import LlamaModel
    from gil_megatron.models.weights import arch_of, load_model_weights
    from gil_megatron.parallel import distributed
    from gil_megatron.ppo.rollout import SamplingSettings, generate
    from gil_megatron.ppo.scoring import score_logprobs

    layout = distributed.initialize(tp, pp, seed=1)
    arch = arch_of(ckpt)[0]
    model = LlamaModel(arch, "actor")
    load_model_weights(model, ckpt, layout.tp_rank, tp, layout.pp_rank, pp)
    model.train()
    equal, var, var_lengths = prompts()
    eq_lengths = torch.full((equal.shape[0],), equal.shape[1])

    def run(ids, lengths, seed=0, **kw):
        settings = SamplingSettings(**{"max_new_tokens": MAX_NEW, "pad_token_id": PAD, **kw})
        g = torch.Generator().manual_seed(seed)
        out = generate(model, ids, lengths, settings, g)
        return out, g.get_state()

    r = {"layout": (layout.tp_rank, layout.pp_rank, layout.dp_rank)}
    r["greedy_eq"] = run(equal, eq_lengths, greedy=True)[0]
    r["greedy_eq_eos"] = run(equal, eq_lengths, greedy=True, eos_token_id=eq_eos)[0]
    r["greedy_var"] = greedy = run(var, var_lengths, greedy=True)[0]
    r["training_restored"] = model.training
    # eos: a token that greedy decoding produces at response position 2 of row 1
    eos = int(greedy.sequences[1, var_lengths[1] + 2])
    r["eos"] = eos
    r["greedy_var_eos"] = run(var, var_lengths, greedy=True, eos_token_id=eos)[0]
    r["top_k1"] = run(var, var_lengths, seed=3, top_k=1, temperature=0.7)[0]
    r["top_p_tiny"] = run(var, var_lengths, seed=3, top_p=1e-6)[0]
    r["sample_a"], r["gen_state"] = run(var, var_lengths, seed=5, temperature=0.9, top_k=40, top_p=0.9)
    r["sample_b"] = run(var, var_lengths, seed=5, temperature=0.9, top_k=40, top_p=0.9)[0]
    # the decode step's log-probs of the drawn tokens == a scoring forward's, same draws as without them
    drawn = run(var, var_lengths, seed=6, temperature=0.9)[0]
    drawn_eos = int(drawn.sequences[1, var_lengths[1] + 2])  # so that the same draws stop row 1 early
    settings = SamplingSettings(max_new_tokens=MAX_NEW, pad_token_id=PAD, temperature=0.9, eos_token_id=drawn_eos)
    with_lp = generate(model, var, var_lengths, settings, torch.Generator().manual_seed(6), return_logprobs=True)
    without = generate(model, var, var_lengths, settings, torch.Generator().manual_seed(6))
    r["decode_logprobs"] = (with_lp, without, score_logprobs(model, with_lp.sequences, micro_batch_size=3)[0])
    # decoding 3 rows at a time (a smaller KV cache): greedy tokens and log-probs unchanged
    greedy_lp = generate(model, var, var_lengths, dataclasses.replace(settings, greedy=True), return_logprobs=True)
    chunked = generate(model, var, var_lengths, dataclasses.replace(settings, greedy=True, decode_batch_size=3),
                       return_logprobs=True)
    r["chunked"] = (greedy_lp, chunked)
    # near-uniform over the real vocabulary: many draws, none may land in the padded tail
    wide = torch.randint(1, VOCAB, (HOT_ROWS, 4), generator=torch.Generator().manual_seed(2))
    r["hot"] = run(wide, torch.full((HOT_ROWS,), 4), seed=9, temperature=50.0, max_new_tokens=HOT_NEW)[0]
    if pp == 1:
        r["decoder_logits"] = _decoder_logits(model)
        with torch.no_grad():
            r["no_cache"] = _no_cache_greedy(model, var, var_lengths)
    return r


def _all_layouts(ckpts, eq_eos):
    return {key: _layout(ckpt, tp, pp, eq_eos) for key, (ckpt, tp, pp) in ckpts.items()}


def _assert_batch_equal(a, b, what):
    for field in ("sequences", "prompt_lengths", "lengths", "response_mask"):
        assert torch.equal(getattr(a, field), getattr(b, field)), (what, field, getattr(a, field), getattr(b, field))


def _check_masks(batch):
    s = batch.sequences.shape[1]
    pos = torch.arange(s).unsqueeze(0)
    expected = (pos >= batch.prompt_lengths.unsqueeze(1)) & (pos < batch.lengths.unsqueeze(1))
    assert torch.equal(batch.response_mask, expected.long())
    assert s == int(batch.lengths.max())
    assert (batch.sequences[pos >= batch.lengths.unsqueeze(1)] == PAD).all()


def test_generate_matches_hf_no_cache_and_every_layout(tmp_path):
    """Also: the decode path's logits (models/inference.py) equal the training forward's at TP1 and
    TP2 (fp32), on every rank; the decode step's log-probs of sampled tokens equal a scoring
    forward's on every layout."""
    from transformers import LlamaForCausalLM

    from gil_megatron.models.convert import hf_to_megatron

    hf_dir = make_hf(tmp_path)
    hf = LlamaForCausalLM.from_pretrained(hf_dir).float().eval()
    equal, var, var_lengths = prompts()

    def hf_greedy(ids, **kw):
        return hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=MAX_NEW,
                           pad_token_id=PAD, **kw)

    with torch.no_grad():
        hf_eq = hf_greedy(equal, eos_token_id=None)
        eq_eos = int(hf_eq[0, equal.shape[1] + 3])  # produced by row 0 at response position 3
        hf_eq_eos = hf_greedy(equal, eos_token_id=eq_eos)
        hf_var = [hf_greedy(var[i:i + 1, :lp], eos_token_id=None)[0] for i, lp in enumerate(var_lengths.tolist())]
    assert hf_eq_eos.shape[1] < hf_eq.shape[1] or (hf_eq_eos == PAD).any()  # eos really stops a row

    ckpts = {}
    for tp, pp in LAYOUTS:
        ckpt = str(tmp_path / f"ckpt_tp{tp}_pp{pp}")
        hf_to_megatron(hf_dir, ckpt, tp, pp)
        ckpts[(tp, pp)] = (ckpt, tp, pp)
    per_rank = spawn(_all_layouts, 4, ckpts, eq_eos)

    ref = per_rank[0][(1, 1)]
    # TP1 greedy == HF greedy (batched equal-length prompts, with and without eos; per row otherwise)
    assert torch.equal(ref["greedy_eq"].sequences, hf_eq)
    assert torch.equal(ref["greedy_eq_eos"].sequences, hf_eq_eos)
    for i, lp in enumerate(var_lengths.tolist()):
        assert torch.equal(ref["greedy_var"].sequences[i, :lp + MAX_NEW], hf_var[i]), i
        assert torch.equal(ref["greedy_var"].sequences[i, :lp + MAX_NEW], ref["no_cache"][i]), i
    assert torch.equal(ref["greedy_var"].lengths, var_lengths + MAX_NEW)
    # eos stops each row at its first eos; lengths and masks follow
    eos = ref["eos"]
    exp_seqs, exp_lengths = first_eos_expectation(ref["greedy_var"].sequences, var_lengths, eos)
    assert torch.equal(ref["greedy_var_eos"].sequences, exp_seqs)
    assert torch.equal(ref["greedy_var_eos"].lengths, exp_lengths)
    assert exp_lengths[1] == var_lengths[1] + 3
    # top-k=1 and a tiny nucleus are greedy; seeded sampling repeats itself
    _assert_batch_equal(ref["top_k1"], ref["greedy_var"], "top_k=1")
    _assert_batch_equal(ref["top_p_tiny"], ref["greedy_var"], "top_p=1e-6")
    _assert_batch_equal(ref["sample_a"], ref["sample_b"], "same seed")
    assert not torch.equal(ref["sample_a"].sequences, ref["greedy_var"].sequences)

    for (tp, pp) in LAYOUTS:
        results = [r[(tp, pp)] for r in per_rank]
        first = results[0]
        for key in ("greedy_eq", "greedy_eq_eos", "greedy_var", "greedy_var_eos", "top_k1", "top_p_tiny",
                    "sample_a", "sample_b", "hot"):
            _check_masks(first[key])
            # identical on every rank (all TP, PP and DP ranks)
            for other in results[1:]:
                _assert_batch_equal(other[key], first[key], (tp, pp, key, other["layout"]))
            # decoding is layout-independent (sampled too: the same uniforms, logits equal to ~1e-6;
            # PP decodes in pp row groups, which must not change a draw)
            if key.startswith("greedy") or key in ("top_k1", "top_p_tiny", "sample_a", "hot"):
                _assert_batch_equal(first[key], ref[key], (tp, pp, key))
        for other in results[1:]:
            assert torch.equal(other["gen_state"], first["gen_state"]), (tp, pp, "generator state")
        for r in results:
            with_lp, without, scored = r["decode_logprobs"]
            _assert_batch_equal(with_lp, without, (tp, pp, "return_logprobs changes no draw"))
            actions = with_lp.response_mask[:, 1:].bool()
            assert with_lp.logprobs.shape == scored.shape and (with_lp.lengths < var_lengths + MAX_NEW).any()
            torch.testing.assert_close(with_lp.logprobs[actions], scored[actions], rtol=1e-5, atol=1e-5)
            assert (with_lp.logprobs[~actions] == 0).all() and (with_lp.logprobs[actions] < 0).all()
            assert torch.equal(with_lp.logprobs, first["decode_logprobs"][0].logprobs)  # same on every rank
            whole, chunked = r["chunked"]
            _assert_batch_equal(chunked, whole, (tp, pp, "decode_batch_size=3"))
            assert (whole.lengths < var_lengths + MAX_NEW).any() and chunked.logprobs.shape == whole.logprobs.shape
            torch.testing.assert_close(chunked.logprobs, whole.logprobs, rtol=1e-5, atol=1e-5)
        assert all(r["training_restored"] for r in results)
        hot = first["hot"]
        assert hot.sequences.max() < VOCAB and hot.response_mask.sum() == HOT_ROWS * HOT_NEW
        assert len(torch.unique(hot.sequences[hot.response_mask.bool()])) > 90  # really near-uniform
        if pp == 1:
            for r in results:
                forward, decoded, padded = r["decoder_logits"]
                assert decoded.shape == forward.shape == (3, 5, VOCAB)
                torch.testing.assert_close(decoded, forward, rtol=1e-5, atol=1e-5)
                assert torch.isneginf(padded).all()  # the padded vocabulary stays -inf
                assert torch.equal(decoded.argmax(-1), forward.argmax(-1))
                assert torch.equal(decoded, first["decoder_logits"][1])  # identical on every rank
            for i, lp in enumerate(var_lengths.tolist()):
                assert torch.equal(first["greedy_var"].sequences[i, :lp + MAX_NEW], first["no_cache"][i])


# ---- sampling math on one process ---------------------------------------------------------------
def test_settings_validation_names_the_field():
    from gil_megatron.ppo.rollout import SamplingSettings

    with pytest.raises(ValueError, match=r"rollout.top_p=1.5 must be in \(0, 1\]"):
        SamplingSettings(max_new_tokens=4, top_p=1.5)
    for kwargs, field in [({"max_new_tokens": 0}, "max_new_tokens"), ({"temperature": 0.0}, "temperature"),
                          ({"top_k": -1}, "top_k"), ({"eos_token_id": -2}, "eos_token_id"),
                          ({"pad_token_id": -1}, "pad_token_id"), ({"top_p": 0.0}, "top_p")]:
        with pytest.raises(ValueError, match=f"rollout.{field}="):
            SamplingSettings(**{"max_new_tokens": 4, **kwargs})


def test_filter_logits_top_k_top_p():
    from gil_megatron.ppo.rollout import SamplingSettings, filter_logits, sample_tokens

    logits = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05, 0.0]]))  # last = -inf (padded vocab)
    keep = lambda out: torch.isfinite(out[0]).nonzero().flatten().tolist()  # noqa: E731
    assert keep(filter_logits(logits, top_k=2)) == [0, 1]
    assert keep(filter_logits(logits, top_p=0.5)) == [0]
    assert keep(filter_logits(logits, top_p=0.69)) == [0, 1]
    assert keep(filter_logits(logits, top_p=0.71)) == [0, 1, 2]
    assert keep(filter_logits(logits, top_k=2, top_p=0.9)) == [0, 1]
    assert keep(filter_logits(logits)) == [0, 1, 2, 3, 4]
    g = torch.Generator().manual_seed(0)
    draws = sample_tokens(logits.expand(4000, -1), SamplingSettings(max_new_tokens=1), g)
    assert draws.max() < 5
    freq = torch.bincount(draws, minlength=6).float() / 4000
    assert torch.allclose(freq[:5], torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05]), atol=0.03)



def test_inverse_cdf_draw_hits_each_token_with_its_probability_and_never_a_zero():
    from gil_megatron.ppo.rollout import draw_by_inverse_cdf

    probs = torch.tensor([0.0, 0.5, 0.0, 0.2, 0.3, 0.0])  # zeros first, inside and last
    n = 10_000
    grid = ((torch.arange(n, dtype=torch.float64) + 0.5) / n).float().unsqueeze(1)  # evenly spaced u
    edges = torch.tensor([[0.0], [1.0 - 2 ** -24]])  # the smallest and largest float32 torch.rand gives
    draws = draw_by_inverse_cdf(probs.expand(n + 2, -1), torch.cat([grid, edges]))
    assert torch.equal(draws[-2:], torch.tensor([1, 4]))
    freq = torch.bincount(draws[:n], minlength=6).double() / n
    torch.testing.assert_close(freq, probs.double(), atol=1e-4, rtol=0)
    # unnormalised rows (what softmax in float32 gives) draw the same
    assert torch.equal(draw_by_inverse_cdf(3 * probs.expand(n, -1), grid), draws[:n])
