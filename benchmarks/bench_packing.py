"""Sequence packing: the PPO scoring + training step padded vs packed, side by side in one run.

What it measures: on one batch with skewed lengths, the wall time of one scoring pass (actor and
reference log-probs, critic values and group logits, reward-model score: trainer.score's forwards)
plus one training step (critic then actor forward + backward + optimizer step on 2 mini-batches:
trainer._train_minibatch's work), run padded (train.sequence_packing=false) and packed (true),
alternating, after one warm-up each; medians over --repeats. Also printed: the fraction of the
padded token slots that packing removes, and the largest log-prob difference between the modes.

The work: the tiny model of benchmarks/bench_vs_trl.py (vocab 1000, hidden 256, intermediate 512,
4 layers, 4 heads / 2 kv heads; random weights), fp32, TP1 in one process; 64 sequences of prompt
8-24 tokens + a response of 1-32 tokens drawn long-tailed (1 + exponential, mean 6: most short, as
when most responses stop at eos early; one row at the full 56; --mean-response changes the skew). Micro-batches as bench_vs_trl.py: 64 rows for scoring, mini-
batches of 32 with micro-batches of 32 for training.

Hardware: any CPU; the numbers in the report came from a 2-core shared VM (noisy: other processes
ran beside it). Not part of CI.
Command:  python benchmarks/bench_packing.py [--threads 2 --repeats 5]
Batch arithmetic: 64 rows x 56 slots = 3584 padded token slots per forward; packed runs the real ones.
The last line is the step-time ratio padded / packed (> 1: packing is faster).
"""

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

BATCH, VOCAB, MAX_PROMPT, MAX_NEW = 64, 1000, 24, 32


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5, help="timed steps per mode (after one warm-up each)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mean-response", type=float, default=6.0,
                   help="mean of the exponential response-length draw (large: nearly every response at 32)")
    return p.parse_args()


def skewed_batch(seed: int, mean_response: float):
    """64 right-padded rows: prompt 8-24 tokens, response 1 + Exponential(mean_response) capped at
    32, one row at the full 56; (sequences [64, 56], lengths [64], prompt lengths [64])."""
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(8, MAX_PROMPT + 1, (BATCH,), generator=g)
    response = (1 + torch.empty(BATCH).exponential_(1 / mean_response, generator=g).long()).clamp(max=MAX_NEW)
    prompt[0], response[0] = MAX_PROMPT, MAX_NEW
    lengths = prompt + response
    seqs = torch.randint(3, VOCAB, (BATCH, int(lengths.max())), generator=g)
    seqs[torch.arange(seqs.shape[1])[None] >= lengths[:, None]] = 0
    return seqs, lengths, prompt


def random_model(role: str, generator: torch.Generator, vocab: int = VOCAB):
    """The benchmark model (hidden 256, intermediate 512, 4 layers, 4 heads / 2 kv heads) in ``role``,
    random weights drawn from ``generator`` (norm weights around 1)."""
    from gil_megatron.models.config import LlamaArchConfig
    from gil_megatron.models.llama import LlamaModel

    arch = LlamaArchConfig(vocab_size=vocab, hidden_size=256, intermediate_size=512, num_layers=4,
                           num_attention_heads=4, num_kv_heads=2, max_position_embeddings=64, num_groups=2)
    model = LlamaModel(arch, role)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.02 + (1.0 if p.dim() == 1 else 0.0))
    return model


def build(seed: int):
    g = torch.Generator().manual_seed(seed)
    models = {name: random_model(role, g) for name, role in
              (("actor", "actor"), ("reference", "actor"), ("critic", "critic"), ("reward", "reward"))}
    for name in ("reference", "reward"):
        models[name].eval().requires_grad_(False)
    return models


def experience(seqs, lengths, prompt, seed):
    """Stand-ins for the rollout-time tensors the losses read (their values do not change the cost)."""
    g = torch.Generator().manual_seed(seed)
    b, t = seqs.shape[0], seqs.shape[1] - 1
    pos = torch.arange(t)[None]
    return {"sequences": seqs, "lengths": lengths, "head_lengths": prompt,
            "action_mask": ((pos >= prompt[:, None] - 1) & (pos < lengths[:, None] - 1)).float(),
            "old_logprobs": -torch.rand(b, t, generator=g) * 7, "ref_logprobs": -torch.rand(b, t, generator=g) * 7,
            "advantages": torch.randn(b, t, generator=g), "values": torch.randn(b, t, generator=g),
            "returns": torch.randn(b, t, generator=g), "sample_weights": torch.ones(b),
            "kl_loss_coef": torch.zeros(b), "group_coeffs": torch.zeros(b, 2)}


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    from gil_megatron.parallel import distributed
    from gil_megatron.ppo import objectives

    os.environ.setdefault("MASTER_PORT", str(distributed.free_port()))
    from gil_megatron.config import PPOConfig
    from gil_megatron.models.llama import score_at_last, split_critic_output
    from gil_megatron.models.logprobs import action_logprobs
    from gil_megatron.models.packing import PACKING_KEY
    from gil_megatron.ppo.scoring import microbatches_of, score_critic, score_logprobs, score_reward_model
    from gil_megatron.training.optim import OptimSettings, Trainable

    distributed.initialize(seed=args.seed)
    models = build(args.seed)
    trainers = {n: Trainable(models[n], OptimSettings(lr=1e-5)) for n in ("actor", "critic")}
    params = objectives.ObjectiveParams.from_config(PPOConfig(algo="ppo"))
    seqs, lengths, prompt = skewed_batch(args.seed, args.mean_response)
    full = experience(seqs, lengths, prompt, args.seed)
    norm = full["action_mask"].sum() / 2

    def actor_loss(mb, logits):
        logprobs, entropy = action_logprobs(logits, mb["input_ids"], with_entropy=True, packing=mb.get(PACKING_KEY))
        return objectives.actor_loss(mb, logprobs, entropy, params, norm)

    def critic_loss(mb, out):
        values, _, group_logits = split_critic_output(out.float())
        q = torch.softmax(score_at_last(group_logits, mb["head_lengths"]), dim=-1)
        return objectives.critic_loss(mb, values[:, :-1], q, params, norm)

    def step(packing: bool):
        """(scoring seconds, training seconds) of one PPO step's model work."""
        packed = lengths if packing else None
        t0 = time.perf_counter()
        score_logprobs(models["actor"], seqs, BATCH, packed_lengths=packed)
        score_logprobs(models["reference"], seqs, BATCH, packed_lengths=packed)
        score_critic(models["critic"], seqs, prompt, prompt, BATCH, packed_lengths=packed)
        score_reward_model(models["reward"], seqs, lengths, BATCH, packed_lengths=packed)
        t1 = time.perf_counter()
        for half in (slice(0, BATCH // 2), slice(BATCH // 2, BATCH)):
            mini = {k: v[half] for k, v in full.items()}
            mbs = microbatches_of(mini["sequences"], BATCH // 2, mini["lengths"] if packing else None,
                                  **{k: v for k, v in mini.items() if k != "sequences"})
            trainers["critic"].forward_backward(mbs, critic_loss)
            trainers["critic"].step()
            trainers["actor"].forward_backward(mbs, actor_loss)
            trainers["actor"].step()
        return t1 - t0, time.perf_counter() - t1

    real, slots = int(lengths.sum()), seqs.numel()
    print(f"batch: {BATCH} rows, lengths {int(lengths.min())}-{int(lengths.max())} (mean {lengths.float().mean():.1f}, "
          f"median {int(lengths.median())}), {real} real tokens in {slots} padded slots; threads {args.threads}")
    print(f"padding fraction saved by packing: {1 - real / slots:.1%} of the token slots")
    lp_pad, _ = score_logprobs(models["actor"], seqs, BATCH)
    lp_pack, _ = score_logprobs(models["actor"], seqs, BATCH, packed_lengths=lengths)
    step(False), step(True)  # warm-up
    valid = torch.arange(seqs.shape[1] - 1)[None] < lengths[:, None] - 1
    print(f"max |log-prob padded - packed| at real tokens: "
          f"{(lp_pad - lp_pack)[valid].abs().max():.2e}")
    times = {False: [], True: []}
    for _ in range(args.repeats):
        for packing in (False, True):
            score_s, train_s = step(packing)
            times[packing].append((score_s, train_s))
    med = {k: (statistics.median(s for s, _ in v), statistics.median(t for _, t in v)) for k, v in times.items()}
    print(f"{'mode':<8} {'score s':>8} {'train s':>8} {'step s':>8}   (medians of {args.repeats})")
    for packing, name in ((False, "padded"), (True, "packed")):
        s, t = med[packing]
        print(f"{name:<8} {s:8.3f} {t:8.3f} {s + t:8.3f}")
    pad_step, pack_step = sum(med[False]), sum(med[True])
    print(f"step time padded / packed: {pad_step / pack_step:.2f}x "
          f"(score {med[False][0] / med[True][0]:.2f}x, train {med[False][1] / med[True][1]:.2f}x)")
    distributed.destroy()


if __name__ == "__main__":
    main()
