"""Rollout throughput: our KV-cached generate (megatron-core layers, TP1, one process) vs Hugging Face
transformers' LlamaForCausalLM.generate with its KV cache, greedy, on the same weights.

What it measures: generated tokens per second (batch x new tokens / wall time, best of --repeats
after one warm-up each, the two sides alternating), for a tiny random Llama on CPU with one thread.
Both sides must produce the same tokens (checked and printed). On a shared machine wall time swings
with the other processes' load, so the CPU time of each call (this process only; one thread, so
the work itself) is printed too, with its own ratio. The last line is the wall-time ratio ours / HF
(goal >= 1).

Hardware: any CPU; the numbers in the report came from a 2-core shared VM.
Command:  OMP_NUM_THREADS=1 python benchmarks/bench_generate.py
Batch arithmetic (defaults): 32 prompts x 16 tokens -> 32 x 64 = 2048 generated tokens per run.
"""

import argparse
import os
import sys
import tempfile
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--prompt", type=int, default=16)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--profile", action="store_true", help="print torch.profiler's top ops for one run of ours")
    return p.parse_args()


def best_times(fns, repeats):
    """Best wall time and best CPU time of each fn over ``repeats`` rounds, the fns alternating
    within a round so that load from other processes hits both sides alike; one warm-up call each
    first."""
    outs = [fn() for fn in fns]
    best = [float("inf")] * len(fns)
    best_cpu = [float("inf")] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t, c = time.perf_counter(), time.process_time()
            fn()
            best[i] = min(best[i], time.perf_counter() - t)
            best_cpu[i] = min(best_cpu[i], time.process_time() - c)
    return best, best_cpu, outs


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    from transformers import LlamaConfig, LlamaForCausalLM

    from gil_megatron.parallel import distributed

    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(distributed.free_port()))
    from gil_megatron.models.convert import hf_to_megatron
    from gil_megatron.models.llama import LlamaModel
    from gil_megatron.models.weights import arch_of, load_model_weights
    from gil_megatron.ppo.rollout import SamplingSettings, generate

    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
                      num_hidden_layers=args.layers, num_attention_heads=args.heads,
                      num_key_value_heads=args.kv_heads, max_position_embeddings=args.prompt + args.new,
                      tie_word_embeddings=False, rope_theta=10000.0, rms_norm_eps=1e-5)
    torch.manual_seed(0)
    hf = LlamaForCausalLM(cfg).float().eval()
    ids = torch.randint(0, args.vocab, (args.batch, args.prompt), generator=torch.Generator().manual_seed(0))
    lengths = torch.full((args.batch,), args.prompt)
    n_tokens = args.batch * args.new

    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(os.path.join(tmp, "hf"))
        hf_to_megatron(os.path.join(tmp, "hf"), os.path.join(tmp, "ckpt"), 1, 1)
        distributed.initialize(1, 1, seed=0)
        model = LlamaModel(arch_of(os.path.join(tmp, "ckpt"))[0], "actor")
        load_model_weights(model, os.path.join(tmp, "ckpt"), 0, 1, 0, 1)
    settings = SamplingSettings(max_new_tokens=args.new, greedy=True)

    def ours():
        return generate(model, ids, lengths, settings, torch.Generator().manual_seed(0)).sequences

    def theirs():
        with torch.no_grad():
            return hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, use_cache=True,
                               max_new_tokens=args.new, min_new_tokens=args.new, eos_token_id=None,
                               pad_token_id=0)

    (t_hf, t_ours), (c_hf, c_ours), (out_hf, out_ours) = best_times([theirs, ours], args.repeats)
    if args.profile:
        from torch.profiler import profile

        with profile() as prof:
            ours()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    print(f"model: hidden {args.hidden}, {args.layers} layers, {args.heads} heads / {args.kv_heads} kv heads, "
          f"vocab {args.vocab}; batch {args.batch}, prompt {args.prompt}, {args.new} new tokens, "
          f"{torch.get_num_threads()} thread(s), best of {args.repeats}")
    print(f"same tokens as HF: {torch.equal(out_ours, out_hf)}")
    print(f"HF transformers generate (KV cache): {n_tokens / t_hf:9.1f} tokens/s  ({t_hf * 1e3:.0f} ms wall, "
          f"{c_hf * 1e3:.0f} ms CPU)")
    print(f"gil_megatron rollout.generate (TP1): {n_tokens / t_ours:9.1f} tokens/s  ({t_ours * 1e3:.0f} ms wall, "
          f"{c_ours * 1e3:.0f} ms CPU)")
    print(f"ratio ours/HF (CPU time): {c_hf / c_ours:.2f}x")
    print(f"ratio ours/HF: {t_hf / t_ours:.2f}x")
    distributed.destroy()


if __name__ == "__main__":
    main()
