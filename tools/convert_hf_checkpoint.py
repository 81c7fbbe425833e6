#!/usr/bin/env python
"""Convert a Hugging Face Llama / Mistral / Qwen2 / Qwen3 checkpoint to gil_megatron's TP/PP shards, or back.

    python tools/convert_hf_checkpoint.py --load-dir HF_DIR --save-dir OUT \\
        --target-tensor-parallel-size 4 --target-pipeline-parallel-size 2 [--model-type actor|critic|reward]
    python tools/convert_hf_checkpoint.py --to-hf --load-dir RUN/checkpoints/iter_0000040/actor \\
        --save-dir HF_OUT [--tokenizer-dir TOKENIZER_DIR]

Families: Llama (plain RoPE or rope_scaling llama3 / linear), Mistral (full attention), Qwen2 and
Qwen2.5 (q/k/v bias, tied or untied embeddings), Qwen3 dense (per-head q/k RMSNorm, tied or untied);
anything else is refused with one line. Runs and stages also take a HF directory directly
(models.actor / reference / critic / reward_model, init): it is converted in memory at the run's
layout, each rank reading only its shard; converting first saves that work at every start.
Reads config.json and safetensors (single file or sharded index) one tensor at a time, so peak
memory stays near one output shard. A critic or reward model can start from a
...ForSequenceClassification checkpoint or from a causal LM (fresh heads; the output says which).
The output directory appears atomically when conversion has fully succeeded.

--to-hf writes a directory that AutoModelForCausalLM and AutoTokenizer load: the checkpoint's
tokenizer files and chat template (or --tokenizer-dir's when the checkpoint has none) and the
bos/eos/pad ids in config.json and generation_config.json.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gil_megatron.cli import run_cli  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load-dir", required=True, help="HF directory (or ours with --to-hf)")
    p.add_argument("--save-dir", required=True, help="output directory (replaced atomically)")
    p.add_argument("--target-tensor-parallel-size", type=int, default=1)
    p.add_argument("--target-pipeline-parallel-size", type=int, default=1)
    p.add_argument("--model-type", default="actor", help="actor | critic | reward")
    p.add_argument("--num-groups", type=int, default=2, help="critic: GIL group-head outputs")
    p.add_argument("--seed", type=int, default=0, help="seed for freshly initialised heads")
    p.add_argument("--to-hf", action="store_true", help="convert our checkpoint back to HF")
    p.add_argument("--tokenizer-dir", default=None,
                   help="--to-hf: tokenizer to ship when the checkpoint carries none")
    return p.parse_args(argv)


def main(argv=None):
    from gil_megatron.models.convert import hf_to_megatron, megatron_to_hf

    args = parse_args(argv)
    start = time.time()
    progress = lambda msg: print(f"[convert {time.time() - start:6.1f}s] {msg}", file=sys.stderr, flush=True)
    if args.to_hf:
        print(megatron_to_hf(args.load_dir, args.save_dir, progress=progress, tokenizer_dir=args.tokenizer_dir))
        print(f"saved HF checkpoint to {args.save_dir}")
        return
    note = hf_to_megatron(
        args.load_dir, args.save_dir, args.target_tensor_parallel_size, args.target_pipeline_parallel_size,
        role=args.model_type, num_groups=args.num_groups, seed=args.seed, progress=progress,
    )
    print(note)
    print(f"saved tp={args.target_tensor_parallel_size} pp={args.target_pipeline_parallel_size} "
          f"{args.model_type} checkpoint to {args.save_dir}")


if __name__ == "__main__":
    run_cli(main)
