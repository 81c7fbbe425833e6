"""Sequence packing (gil_megatron/models/packing.py, train.sequence_packing).

The packed forward must give what the padded one gives: per-action log-probs and entropy, critic
values and group logits, reward scores, PPO and critic losses and every parameter's gradient, fp32,
within atol 1e-5 (float rounding of a different summation order, nothing more) at TP1, TP2 and PP2,
on length distributions the code never saw (several seeds, skewed, length-1 rows and responses, a
full-length row, uneven micro-batches; activation recomputation full at TP1, selective at PP2).
Then the pieces alone: the packing bookkeeping, and the packed attention against a per-sequence
softmax loop; and a few PPO iterations of the trainer with packing on and off (slow).
"""


import pytest
import torch

from dist_utils import spawn

VOCAB, BATCH, SEQ, MICRO = 100, 7, 12, 3  # vocab not a multiple of tp; micro-batches of 3, 3, 1 rows
ATOL = 1e-5
LAYOUTS = [(1, 1), (2, 1), (1, 2)]  # (tp, pp) on 2 ranks: TP1 runs as two data-parallel replicas


# ---- bookkeeping and attention, one process ------------------------------------------------------
def test_pack_bookkeeping_and_unpack():
    from gil_megatron.models.logprobs import action_logprobs
    from gil_megatron.models.packing import pack

    ids = torch.arange(4 * 6).reshape(4, 6) + 1
    lengths = torch.tensor([6, 1, 3, 2])
    p = pack(ids, lengths, multiple_of=4)  # 12 real tokens: T = 12, no filler
    assert p.input_ids.tolist() == [[1, 2, 3, 4, 5, 6, 7, 13, 14, 15, 19, 20]]
    assert p.params.cu_seqlens_q.tolist() == [0, 6, 7, 10, 12] and p.params.max_seqlen_q == 6
    assert p.position_ids.tolist() == [[0, 1, 2, 3, 4, 5, 0, 0, 1, 2, 0, 1]]
    p = pack(ids, torch.tensor([5, 1, 3, 2]), multiple_of=4)  # 11 real tokens: one filler token
    assert p.input_ids.shape == (1, 12) and p.params.cu_seqlens_q.tolist() == [0, 5, 6, 9, 11, 12]
    out = torch.randn(1, 12, 3)
    unpacked = p.unpack(out)
    assert unpacked.shape == (4, 6, 3)
    real = torch.arange(6)[None] < torch.tensor([5, 1, 3, 2])[:, None]
    assert torch.equal(unpacked[real], out[0, :11]) and torch.all(unpacked[~real] == 0)
    # next-token values of the packed row (position t scores token t+1) on the action axis [b, s-1]:
    # each row's own predictions only; the last token of a row and the filler predict nothing
    per_position = torch.arange(1.0, 12.0)  # packed positions 0..10 of T = 12
    actions = p.unpack_actions(per_position)
    assert actions.tolist() == [[1, 2, 3, 4, 0], [0, 0, 0, 0, 0], [7, 8, 0, 0, 0], [10, 0, 0, 0, 0]]
    with pytest.raises(ValueError, match=r"lengths must be \[b\] = \[4\] with values in \[1, 6\]"):
        pack(ids, torch.tensor([6, 0, 3, 2]))
    # packed logits given without their Packing: one clear line, not a wrong answer
    with pytest.raises(ValueError, match=r"logits \(1, 12, 7\) do not match input_ids \(4, 6\); packed logits"):
        action_logprobs(torch.randn(1, 12, 7), ids)


def naive_segment_attention(q, k, v, lengths, scale):
    """One sequence at a time: explicit scores, causal mask, softmax, GQA by repeating kv heads."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    outs, start = [], 0
    for n in lengths.tolist():
        qs, ks, vs = (x[start:start + n].transpose(0, 1) for x in (q, k, v))  # [heads, n, hn]
        scores = qs @ ks.transpose(1, 2) * scale
        scores = scores.masked_fill(torch.triu(torch.ones(n, n, dtype=torch.bool), 1), float("-inf"))
        outs.append((scores.softmax(-1) @ vs).transpose(0, 1))
        start += n
    return torch.cat(outs)


@pytest.mark.parametrize("ratio", [1.0, 2.0, 1e9])  # one bucket per length, the default, one bucket
def test_packed_attention_matches_per_sequence_softmax(ratio):
    from gil_megatron.models.packing import pack, packed_causal_attention

    g = torch.Generator().manual_seed(5)
    lengths = torch.tensor([1, 17, 3, 3, 40, 2, 9, 1, 25])
    T = int(lengths.sum())
    p = pack(torch.zeros(len(lengths), 40, dtype=torch.long), lengths, bucket_ratio=ratio)
    q = torch.randn(T, 4, 8, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(T, 2, 8, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(T, 2, 8, generator=g, dtype=torch.float64, requires_grad=True)
    got = packed_causal_attention(q, k, v, p.params, scale=8 ** -0.5)
    want = naive_segment_attention(q, k, v, lengths, 8 ** -0.5)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
    weight = torch.randn(got.shape, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad((got * weight).sum(), (q, k, v))
    want_grads = torch.autograd.grad((want * weight).sum(), (q, k, v))
    for a, b in zip(grads, want_grads):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
    # attention across a segment boundary would change the answer (the comparison can tell)
    merged = naive_segment_attention(q, k, v, torch.tensor([1, 20] + lengths[3:].tolist()), 8 ** -0.5)
    assert (merged - want).abs().max() > 1e-3


# ---- packed vs padded through the engine, 2 ranks --------------------------------------------------
def length_cases():
    """(seed, prompt lengths, response lengths) the code was not tuned on; every case has a
    full-length row, and the skewed ones rows of total length 1 (no response) and 1-token responses."""
    cases = []
    for seed in range(3):
        g = torch.Generator().manual_seed(100 + seed)
        prompt = torch.randint(1, 6, (BATCH,), generator=g)
        response = torch.randint(1, SEQ - 5, (BATCH,), generator=g)
        if seed == 1:  # skewed: mostly tiny rows, one long one
            prompt, response = torch.ones(BATCH, dtype=torch.long), torch.ones(BATCH, dtype=torch.long)
            response[2], prompt[4], response[4] = 0, 3, 2
        response[seed % BATCH] = SEQ - prompt[seed % BATCH]  # one full-length row
        cases.append((seed, prompt, response))
    return cases


def _randomize(model, seed):
    g = torch.Generator().manual_seed(seed)  # the same stream on every rank: replicated weights agree
    with torch.no_grad():  # the models skip megatron's init (weights normally come from a checkpoint)
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (1.0 if p.dim() == 1 else 0.0))
    return model


def _tensors(seed, prompt, response):
    g = torch.Generator().manual_seed(seed)
    lengths = prompt + response
    seqs = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    seqs[torch.arange(SEQ)[None] >= lengths[:, None]] = 0  # pad id
    pos = torch.arange(SEQ - 1)[None]
    action_mask = ((pos >= prompt[:, None] - 1) & (pos < lengths[:, None] - 1)).float()
    return {
        "sequences": seqs, "lengths": lengths, "head_lengths": prompt, "action_mask": action_mask,
        "old_logprobs": -torch.rand(BATCH, SEQ - 1, generator=g) * 5,
        "ref_logprobs": -torch.rand(BATCH, SEQ - 1, generator=g) * 5,
        "advantages": torch.randn(BATCH, SEQ - 1, generator=g),
        "values": torch.randn(BATCH, SEQ - 1, generator=g), "returns": torch.randn(BATCH, SEQ - 1, generator=g),
        "sample_weights": torch.rand(BATCH, generator=g) + 0.5, "kl_loss_coef": torch.rand(BATCH, generator=g),
        "group_coeffs": torch.randn(BATCH, 2, generator=g), "prompt_lengths": prompt,
        "task_returns": torch.randn(BATCH, generator=g),
    }


def _one_layout(tp, pp, cases):
    from gil_megatron.models.config import LlamaArchConfig
    from gil_megatron.models.llama import LlamaModel, score_at_last, split_critic_output
    from gil_megatron.models.logprobs import action_logprobs
    from gil_megatron.models.packing import PACKING_KEY
    from gil_megatron.models.pipeline import broadcast_from_last_stage
    from gil_megatron.parallel import distributed
    from gil_megatron.ppo import objectives
    from gil_megatron.ppo.scoring import microbatches_of, score_critic, score_logprobs, score_reward_model
    from gil_megatron.training.optim import OptimSettings, Trainable, main_grads

    from objective_params import make_params

    distributed.initialize(tp, pp, seed=1)
    arch = LlamaArchConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_layers=2,
                           num_attention_heads=4, num_kv_heads=2, max_position_embeddings=64, num_groups=2)
    actor, critic = _randomize(LlamaModel(arch, "actor"), 11), _randomize(LlamaModel(arch, "critic"), 12)
    reward = _randomize(LlamaModel(arch, "reward"), 13).eval()
    # activation recomputation replays the packed attention / layers in the backward pass
    recompute = {(1, 1): "full", (2, 1): "none", (1, 2): "selective"}[(tp, pp)]
    trainers = {name: Trainable(model, OptimSettings(lr=1e-3), recompute=recompute)
                for name, model in (("actor", actor), ("critic", critic))}
    params = make_params(kl_in="loss", entropy_coef=0.01)

    def actor_loss(mb, logits):
        logprobs, entropy = action_logprobs(logits, mb["input_ids"], with_entropy=True, packing=mb.get(PACKING_KEY))
        return objectives.actor_loss(mb, logprobs, entropy, params, normalizer=torch.tensor(20.0))

    def critic_loss(mb, out):
        values, task_values, group_logits = split_critic_output(out.float())
        q = torch.softmax(score_at_last(group_logits, mb["head_lengths"]), dim=-1)
        return objectives.critic_loss(mb, values[:, :-1], q, params, normalizer=torch.tensor(20.0),
                                      task_values=score_at_last(task_values, mb["prompt_lengths"]),
                                      sequence_normalizer=torch.tensor(float(BATCH)))

    results = []
    for seed, prompt, response in cases:
        t = _tensors(seed, prompt, response)
        seqs, lengths = t["sequences"], t["lengths"]
        per_mode = {}
        for packed in (None, lengths):
            out = {}
            actor.eval(), critic.eval()
            out["logprobs"], out["entropy"] = score_logprobs(actor, seqs, MICRO, with_entropy=True,
                                                             packed_lengths=packed)
            out["values"], out["task_values"], out["group_logits"] = score_critic(critic, seqs, prompt, prompt, MICRO,
                                                                                   packed_lengths=packed)
            out["scores"] = score_reward_model(reward, seqs, lengths, MICRO, packed_lengths=packed)
            actor.train(), critic.train()
            for name, loss_fn in (("actor", actor_loss), ("critic", critic_loss)):
                mbs = microbatches_of(seqs, MICRO, packed, **{k: v for k, v in t.items() if k != "sequences"})
                metrics = trainers[name].forward_backward(mbs, loss_fn)
                losses = torch.stack([m[f"{'policy' if name == 'actor' else 'value'}/loss"] for m in metrics]
                                     ) if metrics else None
                (out[f"{name}_loss"],) = broadcast_from_last_stage([losses] if losses is not None else None)
                out[f"{name}_grads"] = main_grads(trainers[name].model)
            per_mode["packed" if packed is not None else "padded"] = out
        results.append({"seed": seed, "prompt": prompt, "lengths": lengths, "action_mask": t["action_mask"],
                        **per_mode})
    return {"layout": (tp, pp), "results": results}


def _all_layouts(cases):
    return [_one_layout(tp, pp, cases) for tp, pp in LAYOUTS]


def test_packed_equals_padded_at_tp1_tp2_pp2():
    cases = length_cases()
    per_rank = spawn(_all_layouts, 2, cases)
    for rank, layouts in enumerate(per_rank):
        for layout in layouts:
            for r in layout["results"]:
                what = f"rank {rank} tp,pp={layout['layout']} seed {r['seed']}"
                padded, packed = r["padded"], r["packed"]
                lengths, mask = r["lengths"], r["action_mask"]
                pos = torch.arange(SEQ - 1)[None]
                real_actions = pos < lengths[:, None] - 1  # token t+1 real: every scored action
                for key in ("logprobs", "entropy"):
                    torch.testing.assert_close(packed[key][real_actions], padded[key][real_actions], atol=ATOL,
                                               rtol=0, msg=lambda m: f"{what} {key}: {m}")
                # the packed log-probs came from the packed logits: zero where a row has no action
                assert torch.all(packed["logprobs"][~real_actions] == 0), what
                real_positions = pos < lengths[:, None]
                torch.testing.assert_close(packed["values"][real_positions], padded["values"][real_positions],
                                           atol=ATOL, rtol=0, msg=lambda m: f"{what} values: {m}")
                # the packed run really ran packed: its pad positions are the unpacked zeros
                assert torch.all(packed["values"][~real_positions] == 0), what
                assert padded["values"][~real_positions].abs().min() > 0, what
                for key in ("task_values", "group_logits", "scores", "actor_loss", "critic_loss"):
                    torch.testing.assert_close(packed[key], padded[key], atol=ATOL, rtol=0,
                                               msg=lambda m: f"{what} {key}: {m}")
                for name in ("actor", "critic"):
                    g_pad, g_pack = padded[f"{name}_grads"], packed[f"{name}_grads"]
                    assert g_pad.keys() == g_pack.keys() and g_pad
                    assert max(g.abs().max() for g in g_pad.values()) > 1e-3, f"{what} {name}: no gradient"
                    for pname in g_pad:  # fp32 sums in another order: error relative to the tensor's scale
                        scale = max(1.0, float(g_pad[pname].abs().max()))
                        torch.testing.assert_close(g_pack[pname], g_pad[pname], atol=ATOL * scale, rtol=1e-5,
                                                   msg=lambda m: f"{what} {name} grad {pname}: {m}")


# ---- the trainer: a few PPO iterations with packing on and off -----------------------------------
def _ppo_with_and_without_packing(mini, out):
    from miniature_runs import overrides
    from miniature_runs import train_run as _train

    # the gold reward (not the fresh reward model, whose zero scores would leave every gradient 0)
    return {packing: _train(None, overrides(mini, out / f"packing_{packing}", **{
        "models.reward_model": "null", "models.reward_fn": "gil_megatron.miniature.task:gold_reward",
        "train.steps": 3, "train.sequence_packing": packing})) for packing in (False, True)}


@pytest.mark.slow  # ~20 s: two 3-iteration runs; the 2-rank test above covers every packed forward
def test_trainer_metrics_and_weights_same_with_packing(mini, tmp_path):
    from miniature_runs import comparable, hf_weights, latest_actor

    runs = spawn(_ppo_with_and_without_packing, 1, mini, tmp_path)[0]
    assert len(runs[False]) == len(runs[True]) == 3
    assert all(m["policy/grad_norm"] > 1e-3 and m["value/grad_norm"] > 1e-3 for m in runs[False])
    for it, (off, on) in enumerate(zip(runs[False], runs[True])):
        off, on = comparable(off), comparable(on)
        assert off.keys() == on.keys()
        mismatched = {k: (off[k], on[k]) for k in off if off[k] != on[k] and (
            not isinstance(off[k], float) or off[k] != pytest.approx(on[k], rel=1e-4, abs=1e-5))}
        assert not mismatched, (it, mismatched)
    w_off = hf_weights(latest_actor(tmp_path / "packing_False"))
    w_on = hf_weights(latest_actor(tmp_path / "packing_True"))
    w_init = hf_weights(str(mini / "actor"))
    assert max((w_off[n] - w_init[n]).abs().max() for n in w_off) > 1e-3  # training moved the weights
    for name in w_off:
        torch.testing.assert_close(w_on[name], w_off[name], atol=1e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")
