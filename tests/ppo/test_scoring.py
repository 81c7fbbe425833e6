"""gil_megatron.ppo.scoring on a tiny Llama against a naive computation from a plain forward: per-action
log-probs and entropy (full-vocab log_softmax, gathered at the NEXT token), critic values at the
action positions and group logits at each row's last real token. TP=1 and TP=2 (vocab-parallel
logits, padded vocab), several uneven micro-batches."""

import pytest
import torch

from dist_utils import spawn

VOCAB = 200  # padded to 256: at TP=2 both vocab shards hold real ids, the second also the -inf tail
BATCH, SEQ, MICRO = 5, 9, 2  # micro-batches of 2, 2, 1 rows


def tiny_arch():
    from gil_megatron.models.config import LlamaArchConfig

    return LlamaArchConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_layers=2,
                           num_attention_heads=4, num_kv_heads=2, max_position_embeddings=64, num_groups=3)


def batch():
    g = torch.Generator().manual_seed(7)
    sequences = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    lengths = torch.tensor([9, 4, 6, 2, 7])  # right-padded rows
    return sequences, lengths


PROMPT_LENGTHS = torch.tensor([3, 2, 4, 1, 5])


def _score(tp):
    from gil_megatron.models.llama import LlamaModel
    from gil_megatron.models.pipeline import gather_vocab_shards
    from gil_megatron.parallel import distributed
    from gil_megatron.ppo.scoring import score_critic, score_logprobs

    distributed.initialize(tp=tp, seed=3)
    sequences, lengths = batch()
    actor, critic = LlamaModel(tiny_arch(), "actor").eval(), LlamaModel(tiny_arch(), "critic").eval()
    g = torch.Generator().manual_seed(11)  # the same stream on every rank: replicated weights agree
    with torch.no_grad():  # the models skip megatron's init (weights normally come from a checkpoint)
        for p in list(actor.parameters()) + list(critic.parameters()):
            p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (1.0 if p.dim() == 1 else 0.0))
    out = {}
    out["logprobs"], out["entropy"] = score_logprobs(actor, sequences, MICRO, with_entropy=True)
    out["logprobs_only"], _ = score_logprobs(actor, sequences, MICRO)
    out["values"], out["task_values"], out["group_logits"] = score_critic(critic, sequences, lengths, PROMPT_LENGTHS,
                                                                           MICRO)
    with torch.no_grad():  # the plain forwards of the whole batch at once
        out["full_logits"] = gather_vocab_shards(actor(sequences))  # [b, s, V_padded]
        out["critic_out"] = critic(sequences)  # [b, s, 2 + M]: value, task value, group logits
    return out


def naive_action_logprobs(full_logits, sequences, position_shift=0, token_shift=1):
    """log p(token t+1 | tokens <= t) for t = 0..s-2, from a full-vocab float64 log_softmax, and the
    entropy of the same distributions, one position at a time. The shifts give the misalignments
    (logits of position t + position_shift, gathered at token t + token_shift)."""
    b, s, _ = full_logits.shape
    logprobs = torch.zeros(b, s - 1, dtype=torch.float64)
    entropy = torch.zeros(b, s - 1, dtype=torch.float64)
    for i in range(b):
        for t in range(s - 1):
            logp = torch.log_softmax(full_logits[i, t + position_shift].double(), dim=-1)
            logprobs[i, t] = logp[sequences[i, t + token_shift]]
            p = logp.exp()
            entropy[i, t] = -(p * torch.where(p > 0, logp, torch.zeros_like(logp))).sum()
    return logprobs, entropy


@pytest.mark.parametrize("tp", [pytest.param(1, marks=pytest.mark.slow), 2])  # TP=2 covers TP=1's path
def test_scoring_matches_naive_forward(tp):
    sequences, lengths = batch()
    for rank, out in enumerate(spawn(_score, tp, tp)):
        what = f"tp={tp} rank {rank}"
        full = out["full_logits"]
        assert full.shape == (BATCH, SEQ, 256)
        assert torch.all(full[..., VOCAB:] == float("-inf")), f"{what}: padded vocab is not -inf"
        logprobs, entropy = naive_action_logprobs(full, sequences)
        assert out["logprobs"].shape == (BATCH, SEQ - 1)
        torch.testing.assert_close(out["logprobs"].double(), logprobs, atol=1e-5, rtol=1e-5,
                                   msg=lambda m: f"{what} logprobs vs naive: {m}")
        torch.testing.assert_close(out["entropy"].double(), entropy, atol=1e-5, rtol=1e-5,
                                   msg=lambda m: f"{what} entropy vs naive: {m}")
        assert torch.equal(out["logprobs_only"], out["logprobs"])
        # the off-by-one alignments must be far from it (else the comparison above could not tell):
        # logits[:, :-1] against tokens[:, :-1], and logits[:, 1:] against tokens[:, 1:]
        for position_shift, token_shift in ((0, 0), (1, 1)):
            wrong = naive_action_logprobs(full, sequences, position_shift, token_shift)[0]
            assert (wrong - logprobs).abs().max() > 0.5, (position_shift, token_shift)

        critic_out = out["critic_out"]
        assert out["values"].shape == (BATCH, SEQ - 1)
        torch.testing.assert_close(out["values"], critic_out[:, :-1, 0], atol=1e-6, rtol=1e-6,
                                   msg=lambda m: f"{what} values at positions 0..s-2: {m}")
        expected_task = torch.stack([critic_out[i, PROMPT_LENGTHS[i] - 1, 1] for i in range(BATCH)])
        torch.testing.assert_close(out["task_values"], expected_task, atol=1e-6, rtol=1e-6,
                                   msg=lambda m: f"{what} task values at the last prompt token: {m}")
        expected_groups = torch.stack([critic_out[i, lengths[i] - 1, 2:] for i in range(BATCH)])
        torch.testing.assert_close(out["group_logits"], expected_groups, atol=1e-6, rtol=1e-6,
                                   msg=lambda m: f"{what} group logits at the last real token: {m}")
