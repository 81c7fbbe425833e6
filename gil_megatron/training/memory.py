"""Will the configured models and batch fit? An estimate printed with the layout, checked up front
by every job (``check_run``: PPO and the stages), instead of an out-of-memory error an hour into the run.

Per rank: parameters of every model held (actor, reference, critic, reward model; each split
tp * pp ways; models offloaded to the host between uses (offload.py) count only as the largest of
them, since they are on the device one at a time), gradients + Adam states for the two trained
models, and the larger of two phases that never overlap: the training activations of one
micro-batch (a standard transformer estimate: ~34 * s * b * h bytes per layer in 16 bit, Korthikanti
et al. 2022, scaled to the dtype; plus the vocab-parallel logits) and the rollout's KV cache (keys
and values of every layer of this stage for the rows decoded at once, at full length, plus one
step's full-vocabulary logits for sampling).
"""

import os
from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Sequence, Tuple

import torch

from gil_megatron.models.config import LlamaArchConfig
from gil_megatron.models.weights import arch_of
from gil_megatron.parallel import distributed
from gil_megatron.parallel.distributed import ParallelLayout


def param_count(arch: LlamaArchConfig, role: str) -> int:
    h, f, d = arch.hidden_size, arch.intermediate_size, arch.head_dim
    attn = h * d * (arch.num_attention_heads * 2 + arch.num_kv_heads * 2)
    mlp = 3 * h * f
    per_layer = attn + mlp + 2 * h
    emb = arch.vocab_size * h
    head = (emb if not arch.tie_word_embeddings else 0) if role == "actor" else h * arch.score_rows(role)
    return emb + arch.num_layers * per_layer + h + head


@dataclass
class MemoryEstimate:
    per_rank_bytes: Dict[str, float]
    available_bytes: float
    device: str

    @property
    def total(self) -> float:
        b = self.per_rank_bytes
        return b["weights"] + b["grads+optimizer"] + max(b["activations"], b["rollout KV cache"])

    def describe(self) -> str:
        b = {k: f"{v / 2**30:.2f}" for k, v in self.per_rank_bytes.items()}
        return (f"estimated {self.total / 2**30:.2f} GiB per rank (weights {b['weights']}, grads+optimizer "
                f"{b['grads+optimizer']}, the larger of activations {b['activations']} and rollout KV cache "
                f"{b['rollout KV cache']} GiB) vs {self.available_bytes / 2**30:.2f} GiB available on {self.device}")


def available_bytes(ranks_per_node: int) -> tuple:
    if torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info()
        return float(free), "this GPU"
    with open("/proc/meminfo") as f:
        info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
    return info.get("MemAvailable", info["MemTotal"]) / max(ranks_per_node, 1), f"this node / {ranks_per_node} ranks"


def estimate(archs: Dict[str, LlamaArchConfig], trained: tuple, tp: int, pp: int, micro_batch: int,
             seq_len: int, dtype_bytes: int, ranks_per_node: int, offloaded: tuple = (),
             decode_rows: int = 0, roles: Optional[Mapping[str, str]] = None) -> MemoryEstimate:
    """``decode_rows``: rows the rollout decodes at once on this rank (its KV cache). ``roles``:
    name -> actor | critic | reward (default: actor and reference are LMs, the rest scalar heads).
    The activations are those of the first trained model (the actor for PPO)."""
    split = tp * pp
    roles = roles or {n: "actor" if n in ("actor", "reference") else "critic" for n in archs}
    est = {"weights": 0.0, "grads+optimizer": 0.0, "activations": 0.0, "rollout KV cache": 0.0}
    largest_offloaded = 0.0
    for name, arch in archs.items():
        n = param_count(arch, roles[name]) / split
        if name in offloaded:
            largest_offloaded = max(largest_offloaded, n * dtype_bytes)
        else:
            est["weights"] += n * dtype_bytes
        if name in trained:
            # fp32 main grads + Adam m, v (+ fp32 master weights when training in 16 bit)
            est["grads+optimizer"] += n * (4 + 8 + (4 if dtype_bytes < 4 else 0))
    est["weights"] += largest_offloaded
    actor = archs[trained[0]]
    layers = actor.num_layers / pp
    est["activations"] = (34 * seq_len * micro_batch * actor.hidden_size * layers * dtype_bytes / 2 / tp
                          + 2 * seq_len * micro_batch * actor.padded_vocab_size(tp) / tp * 4)
    kv_heads = max(actor.num_kv_heads // tp, 1)
    est["rollout KV cache"] = (2 * layers * decode_rows * kv_heads * seq_len * actor.head_dim * dtype_bytes
                               # sampling: gathered fp32 logits, probabilities, float64 cumulative mass
                               + decode_rows * actor.padded_vocab_size(tp) * (4 + 4 + 8))
    avail, device = available_bytes(ranks_per_node)
    return MemoryEstimate(est, avail, device)


def check_fits(estimate_: MemoryEstimate, headroom: float = 0.9, micro_batch_key: str = "ppo.micro_batch_size") -> None:
    if os.environ.get("GIL_MEGATRON_SKIP_MEMORY_CHECK") == "1":
        return
    if estimate_.total > headroom * estimate_.available_bytes:
        raise MemoryError(
            f"the configured models and batch do not fit: {estimate_.describe()}; use more tensor/pipeline "
            f"parallelism (parallel.tp/pp), a smaller {micro_batch_key}, or more devices "
            f"(GIL_MEGATRON_SKIP_MEMORY_CHECK=1 skips this check)")


def check_run(models: Mapping[str, Tuple[str, str, str]], trained: Sequence[str], layout: ParallelLayout,
              micro_batch: int, seq_len: int, dtype: torch.dtype, *, micro_batch_key: str, decode_rows: int = 0,
              offloaded: Sequence[str] = ()) -> MemoryEstimate:
    """Before any model is built: estimate a run's per-rank memory from its models' checkpoints
    (``models``: name -> (model directory, role, the config key that named it)), print it with the
    layout on rank 0 and refuse a configuration that cannot fit (MemoryError naming
    ``micro_batch_key`` among the fixes). A directory of neither format fails here, in one line
    naming its key."""
    archs = {name: arch_of(path, key)[0] for name, (path, _, key) in models.items()}
    est = estimate(archs, tuple(trained), layout.tp, layout.pp, micro_batch, seq_len, torch.finfo(dtype).bits // 8,
                   int(os.environ.get("LOCAL_WORLD_SIZE", "1")), offloaded=tuple(offloaded), decode_rows=decode_rows,
                   roles={name: role for name, (_, role, _) in models.items()})
    if distributed.is_rank0():
        print(f"[gil_megatron] layout tp={layout.tp} pp={layout.pp} dp={layout.dp}; {est.describe()}", flush=True)
    check_fits(est, micro_batch_key=micro_batch_key)
    return est
