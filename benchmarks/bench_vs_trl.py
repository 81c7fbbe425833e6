"""PPO throughput side by side: TRL 1.12.0's PPOTrainer (the last TRL release with PPO) vs ours, on
the same models, prompts and settings, the two alternating in one run.

The work (the same on both sides): policy and reference a random Llama (vocab 1000, hidden 256,
intermediate 512, 4 layers, 4 heads / 2 kv heads); reward model and critic a
LlamaForSequenceClassification on the same trunk; 64 prompts of 8-24 tokens per update, 32 new
tokens at temperature 0.7 (stop at eos); reference log-probs, values and reward scored (the old
log-probs come from the generation step's logits on both sides: TRL always does this, ours with
rollout.logprobs_from_decode=true; --old-logprobs rescore runs ours with a scoring forward instead;
ours packs sequences, train.sequence_packing=true, unless --packing off);
GAE; 1 epoch x 2 mini-batches of 32; fp32 on CPU; 2 threads (ours also as TP2: two 1-thread ranks). Every run
does 1 warm-up update plus --updates timed ones in a fresh process; the table gives medians over
all timed updates of all rounds.

TRL runs in its own virtual environment, made on first use with `python3.11 -m venv` and the pins
below (never the project's environment); without a Python 3.11 or a reachable package registry the
script prints one line saying so and exits 0. Not part of CI.

Hardware: any CPU; the numbers in benchmarks/results/throughput/ came from a 2-core shared VM
(noisy: other processes ran beside it).
Command:  python benchmarks/bench_vs_trl.py [--updates 5 --rounds 2]
Batch arithmetic: 64 prompts x 32 new tokens = 2048 generated tokens and 64 samples per update.
The last line is the ratio ours (TP1) / TRL in samples per second.
"""

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

TRL_PINS = ["trl==1.12.0", "transformers==5.23.0", "accelerate==1.15.0", "datasets==5.2.0", "tokenizers==0.23.3",
            "torch==2.13.0"]
BATCH, NEW_TOKENS, VOCAB = 64, 32, 1000
DEFAULT_VENV = os.path.join(os.path.expanduser("~"), ".cache", "gil_megatron", "bench_vs_trl", "venv-py311")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--updates", type=int, default=5, help="timed updates per run (after one warm-up)")
    p.add_argument("--rounds", type=int, default=2, help="runs per side, the sides alternating")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tp", default="1,2", help="our tensor-parallel sizes (TP>1 runs that many 1-thread ranks)")
    p.add_argument("--venv", default=DEFAULT_VENV, help="TRL's virtual environment (made on first use)")
    p.add_argument("--old-logprobs", choices=("decode", "rescore"), default="decode",
                   help="ours: PPO old log-probs from the decode step (what TRL does) or from a scoring forward")
    p.add_argument("--packing", choices=("on", "off"), default="on",
                   help="ours: train.sequence_packing (scoring and training forwards without padding)")
    return p.parse_args()


# ---- TRL's environment ---------------------------------------------------------------------------
def skip(reason: str) -> None:
    print(f"bench_vs_trl: skipped: {reason}")
    sys.exit(0)


def trl_python(venv: str) -> str:
    """The venv's interpreter with TRL_PINS installed; made (and the pins installed) on first use."""
    python = os.path.join(venv, "bin", "python")
    marker = os.path.join(venv, "gil_megatron_pins.txt")
    if os.path.isfile(marker) and open(marker).read().split() == TRL_PINS:
        return python
    base = shutil.which("python3.11") or shutil.which("python3")
    if base is None:
        skip("no python3.11 on PATH to make TRL's venv")
    version = subprocess.run([base, "-c", "import sys; print(sys.version_info[:2] == (3, 11))"],
                             capture_output=True, text=True).stdout.strip()
    if version != "True":
        skip(f"{base} is not Python 3.11, which TRL's venv is pinned to")
    print(f"making TRL's venv in {venv} ({' '.join(TRL_PINS)}); this downloads torch once", file=sys.stderr,
          flush=True)
    subprocess.run([base, "-m", "venv", venv], check=True)
    pip = subprocess.run([python, "-m", "pip", "install", "--disable-pip-version-check", "-q", *TRL_PINS],
                         capture_output=True, text=True)
    if pip.returncode != 0:
        last = (pip.stderr.strip().splitlines() or ["pip failed"])[-1]
        skip(f"cannot install {' '.join(TRL_PINS)} (package registry unreachable?): {last}")
    with open(marker, "w") as f:
        f.write("\n".join(TRL_PINS))
    return python


# ---- the shared work -----------------------------------------------------------------------------
def make_work(root: str, updates: int, hidden: int = 256, intermediate: int = 512, layers: int = 4) -> None:
    """Tokenizer, HF policy and reward model (same trunk), our converted checkpoints, prompts."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification, PreTrainedTokenizerFast

    from gil_megatron.models.convert import hf_to_megatron

    words = ["<pad>", "<s>", "</s>"] + [f"w{i}" for i in range(VOCAB - 3)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                        unk_token="w0")
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    policy = LlamaForCausalLM(cfg).float()
    reward_cfg = {k: v for k, v in cfg.to_dict().items() if k not in ("id2label", "label2id")}
    reward = LlamaForSequenceClassification(LlamaConfig(**reward_cfg, num_labels=1)).float()
    reward.model.load_state_dict(policy.model.state_dict())  # the same trunk
    for name, model in (("policy", policy), ("reward", reward)):
        out = os.path.join(root, "hf", name)
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
    hf_to_megatron(os.path.join(root, "hf", "policy"), os.path.join(root, "ours", "policy"), 1, 1)
    hf_to_megatron(os.path.join(root, "hf", "reward"), os.path.join(root, "ours", "reward"), 1, 1, role="reward")
    rng = random.Random(0)
    with open(os.path.join(root, "prompts.jsonl"), "w") as f:
        for _ in range(BATCH * (updates + 2)):
            n = rng.randint(8, 24)
            f.write(json.dumps({"prompt": " ".join(f"w{rng.randrange(VOCAB - 3)}" for _ in range(n))}) + "\n")


# ---- one run of each side ------------------------------------------------------------------------
def run_trl(python: str, root: str, updates: int, threads: int) -> list:
    out = os.path.join(root, "trl.json")
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": "", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([python, os.path.join(ROOT, "benchmarks", "trl_ppo_runner.py"), root, str(updates),
                           str(threads), out], env=env, capture_output=True, text=True, cwd=root)
    if proc.returncode != 0:
        raise RuntimeError(f"TRL's PPO failed:\n{proc.stderr[-4000:]}")
    with open(out) as f:
        rows = json.load(f)
    return [{"step": r["step_s"], "generate": r.get("generate_s", 0.0), "score": r.get("score_s", 0.0),
             "gc": r.get("gc_s", 0.0)} for r in rows]


def ours_argv(root: str, run_dir: str, updates: int, tp: int = 1, old_logprobs: str = "decode",
              packing: bool = True) -> list:
    """Our trainer's overrides for the work (1 warm-up + ``updates`` iterations)."""
    return [f"run_dir={run_dir}", "algo=ppo", f"parallel.tp={tp}", f"models.actor={root}/ours/policy",
            f"models.reward_model={root}/ours/reward", f"data.train_prompts={root}/prompts.jsonl",
            "data.max_prompt_length=32", f"rollout.batch_size={BATCH}", f"rollout.max_new_tokens={NEW_TOKENS}",
            "rollout.temperature=0.7", f"rollout.micro_batch_size={BATCH // tp if tp > 1 else BATCH}",
            "ppo.epochs=1", f"ppo.mini_batch_size={BATCH // 2}", f"ppo.micro_batch_size={BATCH // 2}",
            "ppo.kl_coef=0.05", "models.dtype=fp32", f"train.steps={updates + 1}", "train.save_every=0",
            "checkpoint.resume=none", "logging.progress=false",
            f"rollout.logprobs_from_decode={str(old_logprobs == 'decode').lower()}",
            f"train.sequence_packing={str(packing).lower()}"]


def run_ours(root: str, updates: int, tp: int, threads: int, index: int, old_logprobs: str = "decode",
             packing: bool = True) -> list:
    run_dir = os.path.join(root, f"ours_tp{tp}_{index}")
    argv = ours_argv(root, run_dir, updates, tp, old_logprobs, packing)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads if tp == 1 else 1), "PYTHONPATH": ROOT}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(tp),
                           "-m", "gil_megatron.ppo.trainer", *argv], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"our trainer failed:\n{proc.stderr[-4000:]}")
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        lines = [json.loads(line) for line in f][1:updates + 1]  # drop the warm-up update
    shutil.rmtree(run_dir)  # its final checkpoint: GBs per run at bench_tp_scaling's larger sizes
    return [{"step": m["time/step_s"], "generate": m["time/generate_s"], "score": m["time/score_s"],
             "gc": 0.0} for m in lines]


def summary(rows: list) -> dict:
    med = {k: statistics.median(r[k] for r in rows) for k in ("step", "generate", "score", "gc")}
    med["train"] = med["step"] - med["generate"] - med["score"]  # the update, incl. GAE and bookkeeping
    med["samples_per_s"] = BATCH / med["step"]
    return med


def main():
    args = parse_args()
    python = trl_python(args.venv)
    tps = [int(t) for t in args.tp.split(",")]
    results = {"TRL 1.12.0 PPO": [], **{f"ours TP{tp}": [] for tp in tps}}
    with tempfile.TemporaryDirectory() as root:
        make_work(root, args.updates)
        for r in range(args.rounds):  # alternate, so machine load hits every side alike
            results["TRL 1.12.0 PPO"] += run_trl(python, root, args.updates, args.threads)
            for tp in tps:
                results[f"ours TP{tp}"] += run_ours(root, args.updates, tp, args.threads, r, args.old_logprobs,
                                                    args.packing == "on")
    print(f"work: Llama vocab {VOCAB}, hidden 256, inter 512, 4 layers, 4/2 heads; {BATCH} prompts x {NEW_TOKENS} "
          f"new tokens (T=0.7); ref + value + reward scoring; old log-probs: ours {args.old_logprobs}, TRL decode; "
          f"ours packing {args.packing}; "
          f"GAE; 1 epoch x 2 mini-batches; fp32; "
          f"{args.threads} threads (TP2: 2 ranks x 1); median of {args.rounds} x {args.updates} updates after warm-up")
    print(f"{'side':<16}{'s/update':>9}{'samples/s':>11}{'generate s':>12}{'score s':>9}{'train s':>9}{'(gc s)':>8}")
    table = {name: summary(rows) for name, rows in results.items()}
    for name, s in table.items():
        print(f"{name:<16}{s['step']:>9.3f}{s['samples_per_s']:>11.1f}{s['generate']:>12.3f}{s['score']:>9.3f}"
              f"{s['train']:>9.3f}{s['gc']:>8.3f}")
    trl = table["TRL 1.12.0 PPO"]
    for tp in tps[1:]:
        print(f"ours TP{tp} / TP1 samples/s: {table[f'ours TP{tp}']['samples_per_s'] / table['ours TP1']['samples_per_s']:.2f}x")
    print(f"ratio ours TP1 / TRL samples/s: {table['ours TP1']['samples_per_s'] / trl['samples_per_s']:.2f}x")


if __name__ == "__main__":
    main()
