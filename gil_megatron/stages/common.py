"""What SFT, reward-model and DPO training share (one engine, three objectives); the loop and the run
setup around it (config.json, memory check, final model directory) are training/loop.py and
training/run.py, the ones PPO runs too.

A stage (sft.py, reward_model.py, dpo.py) subclasses ``Stage`` and says only what differs: the
dataset it reads, how a batch becomes micro-batches, what one micro-batch counts for the loss's
denominator, and the loss of one micro-batch. Everything else is here, in the order it runs:

    config + tokenizer + datasets      (data errors surface before any process group exists)
    distributed.initialize(tp, pp)     dp = world / (tp * pp)
    memory.check_run(...)              the per-rank estimate, before any model is built
    model_from_checkpoint(init, role)  -> Trainable (megatron DDP + optimizer + LR schedule)
    resume (checkpoint.resume=auto)    weights, optimizer, scheduler, RNG, data cursor (any layout)
    gil_megatron/training/loop.py runs the steps; one optimizer step (``StageRun.train_step``):
        batch = loader.next_batch()                  this rank's global_batch_size / dp examples
        mbs = stage.microbatches(batch)              micro_batch_size examples each, on the device
        normalizer = loss_normalizer(sum count)      N_global / dp (gil_megatron/training/metrics.py)
        stage.before_forward(mbs)                    DPO: reference log-probs, no grad
        trainable.forward_backward(mbs, loss)        megatron's pipeline schedule; DDP grad all-reduce
        trainable.step()                             clip, Adam, LR schedule
        reduce_sums(...)                             ONE all-reduce + ONE host sync for all metrics
    eval every train.eval_every steps and at the end; checkpoint every train.save_every and at the end
    final model directory (our format, loadable by any layout) -> ``output`` (default run_dir/model)

Loss normalisation and metrics follow gil_megatron/training/metrics.py, as PPO does: the loss of a
micro-batch is sum_(its units) l / (N_global / dp), with units = response tokens for SFT and pairs
for the reward model and DPO, so the gradient is the global batch's mean for any layout
(tests/stages/test_stages.py checks TP2 and DP2 against TP1). A loss function returns (loss, sums):
each metric as (mean * count, count), and in eval per-known-group pairs ``group/<metric>`` [2, G];
they give train/<metric>, eval/<metric>, eval/group/<name>/<metric> and train/<count_name>.
"""

import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from megatron.core import parallel_state

from gil_megatron.config import ConfigError, StageConfig, load_config, overrides_from_argv
from gil_megatron.data import (
    DataLoader,
    PreferenceBatch,
    SequenceBatch,
    eval_batches,
    load_preferences,
    options_from_config,
    pad_token_id,
)
from gil_megatron.models.build import load_tokenizer, model_from_checkpoint, resolve_dtype
from gil_megatron.models.pipeline import run_microbatches
from gil_megatron.models.weights import CheckpointError, checkpoint_format
from gil_megatron.parallel import distributed
from gil_megatron.parallel.distributed import ParallelLayout
from gil_megatron.training import memory
from gil_megatron.training import run as run_setup
from gil_megatron.training.checkpoint import load_checkpoint, resolve_resume, save_checkpoint
from gil_megatron.training.metrics import Sums, Totals, loss_normalizer, metric_sum, ratio, reduce_sums
from gil_megatron.training.optim import Trainable

MODEL_KEY = "model"  # the trained model's name inside training checkpoints


# ---------------------------------------------------------------------------------------------
# What a stage provides
# ---------------------------------------------------------------------------------------------


class Stage:
    """One training objective on the shared loop. Subclasses set the class attributes and
    implement ``load_dataset``, ``microbatches``, ``count`` and ``loss``."""

    name: str = "stage"
    """Prefix of the progress bar and the summary line."""
    schema = StageConfig
    """The config dataclass (gil_megatron/config.py)."""
    role: str = "actor"
    """Role of the trained model (what model_from_checkpoint builds and the output directory holds)."""
    count_name: str = "examples"
    """What ``count`` counts (reported as train/<count_name>)."""
    rows_per_example: int = 1
    """Sequences one example puts through the model (2 for a preference pair): the memory check's
    micro-batch is train.micro_batch_size times this."""
    show: Tuple[str, ...] = ("train/loss",)
    """Metrics shown on the progress bar."""
    summary: Tuple[str, ...] = ("eval/loss",)
    """Metrics of the one-line summary at the end (those present are printed)."""

    def __init__(self, cfg: StageConfig, tokenizer):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.pad_id = pad_token_id(tokenizer)
        self.group_names: List[str] = []
        self._group_index: Dict[str, int] = {}
        self.device = distributed.device()

    # -- data --------------------------------------------------------------------------------
    def load_dataset(self, path: str):
        raise NotImplementedError

    def set_groups(self, *datasets) -> None:
        """Known groups (for per-group eval metrics only), the same list on every rank."""
        names = set()
        for ds in datasets:
            if ds is not None:
                names.update(g for g in ds.groups if g is not None)
        self.group_names = sorted(names)
        self._group_index = {g: i for i, g in enumerate(self.group_names)}

    def group_ids(self, groups: Sequence[Optional[str]]) -> torch.Tensor:
        """[b] long: the index of each example's group in ``group_names``, -1 for none."""
        return torch.tensor([self._group_index.get(g, -1) if g is not None else -1 for g in groups],
                            dtype=torch.long, device=self.device)

    # -- models -------------------------------------------------------------------------------
    def frozen_models(self) -> Dict[str, Tuple[str, str, str]]:
        """Models held besides the trained one, {name: (model directory, role, config key)} (for the
        memory check; DPO: its reference)."""
        return {}

    def setup(self, layout: ParallelLayout, dtype: torch.dtype) -> None:
        """Build anything besides the trained model (DPO: the frozen reference)."""

    # -- one step -------------------------------------------------------------------------------
    def microbatches(self, batch) -> List[Dict[str, torch.Tensor]]:
        """This rank's batch -> micro-batches of train.micro_batch_size examples, on the device.
        Each dict holds ``input_ids`` [b, s] (what the model reads) and what ``loss`` needs."""
        raise NotImplementedError

    def count(self, mb: Dict[str, torch.Tensor]) -> torch.Tensor:
        """0-dim: this micro-batch's share of the objective's denominator (tokens or pairs)."""
        raise NotImplementedError

    def before_forward(self, mbs: List[Dict[str, torch.Tensor]]) -> None:
        """Runs on every rank before the forward (and backward) of a step or an eval batch."""

    def loss(self, mb: Dict[str, torch.Tensor], output: torch.Tensor, normalizer: Optional[torch.Tensor],
             with_groups: bool) -> Tuple[torch.Tensor, Sums]:
        """(loss of this micro-batch, additive sums for metrics); runs on the last pipeline stage."""
        raise NotImplementedError


# ---------------------------------------------------------------------------------------------
# Helpers the stages share
# ---------------------------------------------------------------------------------------------


def chunks(n: int, size: int) -> List[slice]:
    """[0, n) in consecutive slices of at most ``size``."""
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def sequence_microbatch(stage: Stage, seqs: SequenceBatch, sl: slice) -> Dict[str, torch.Tensor]:
    """Rows ``sl`` of a SequenceBatch, cut to their longest row: input_ids, lengths,
    response_mask [b, s]; weight [b] (0 on eval filler rows); group_ids [b]."""
    width = int(seqs.lengths[sl].max())  # CPU tensor: no device sync
    mb = {
        "input_ids": seqs.input_ids[sl, :width],
        "lengths": seqs.lengths[sl],
        "response_mask": seqs.response_mask[sl, :width],
        "weight": seqs.valid[sl].float(),
    }
    mb = {k: v.to(stage.device) for k, v in mb.items()}
    mb["group_ids"] = stage.group_ids(seqs.groups[sl])
    return mb


def pair_microbatch(stage: Stage, batch: PreferenceBatch, sl: slice) -> Dict[str, torch.Tensor]:
    """Pairs ``sl`` as one forward: chosen rows then rejected rows, [2m, s] (padded to the longer).
    weight and group_ids are per pair [m]."""
    chosen, rejected = batch.chosen, batch.rejected
    width = int(torch.maximum(chosen.lengths[sl].max(), rejected.lengths[sl].max()))

    def cut(x: torch.Tensor, fill) -> torch.Tensor:  # [m, s_x] -> [m, width]
        x = x[sl, :width]
        if x.shape[1] < width:
            x = torch.cat([x, x.new_full((x.shape[0], width - x.shape[1]), fill)], dim=1)
        return x

    mb = {
        "input_ids": torch.cat([cut(chosen.input_ids, stage.pad_id), cut(rejected.input_ids, stage.pad_id)]),
        "lengths": torch.cat([chosen.lengths[sl], rejected.lengths[sl]]),
        "response_mask": torch.cat([cut(chosen.response_mask, False), cut(rejected.response_mask, False)]),
        "weight": batch.valid[sl].float(),
    }
    mb = {k: v.to(stage.device) for k, v in mb.items()}
    mb["group_ids"] = stage.group_ids(batch.groups[sl])
    return mb


def add_group_sums(sums: Sums, stage: Stage, per_example: Dict[str, torch.Tensor], weight: torch.Tensor,
                   group_ids: torch.Tensor) -> Sums:
    """Per-known-group sums of per-example values ([b] each, weighted by ``weight`` [b]):
    ``group/<name>`` [2, G] (weighted sums, group counts). Examples without a group are left out."""
    G = len(stage.group_names)
    if G == 0:
        return sums
    known = group_ids >= 0
    index = group_ids.clamp_min(0)
    w = (weight * known).double()
    count = torch.zeros(G, dtype=torch.float64, device=w.device).index_add_(0, index, w)
    for name, value in per_example.items():
        total = torch.zeros(G, dtype=torch.float64, device=w.device).index_add_(0, index, value.detach().double() * w)
        sums[f"group/{name}"] = metric_sum(total, count)
    return sums


class PairStage(Stage):
    """A stage trained on preference pairs (reward model, DPO): chosen and rejected responses of a
    pair go through the model in one forward; the objective is a mean over pairs."""

    count_name = "pairs"
    rows_per_example = 2

    def load_dataset(self, path: str):
        d = self.cfg.data
        return load_preferences(path, self.tokenizer, max_length=d.max_length,
                                max_prompt_length=d.max_prompt_length, too_long=d.too_long, **options_from_config(d))

    def microbatches(self, batch: PreferenceBatch) -> List[Dict[str, torch.Tensor]]:
        return [pair_microbatch(self, batch, sl) for sl in chunks(len(batch), self.cfg.train.micro_batch_size)]

    def count(self, mb) -> torch.Tensor:
        return mb["weight"].sum()


# ---------------------------------------------------------------------------------------------
# Metrics, step, eval, save
# ---------------------------------------------------------------------------------------------


def stage_metrics(per_microbatch: List[Sums], prefix: str, count_name: str,
                  group_names: Sequence[str]) -> Dict[str, float]:
    """A step's (or an eval pass's) sums -> ``prefix/<metric>``, ``prefix/group/<g>/<metric>`` and
    ``prefix/<count_name>`` (the loss's denominator: tokens or pairs), on every rank."""
    totals: Totals = reduce_sums(per_microbatch, parallel_state.get_data_parallel_group(),
                                 parallel_state.get_pipeline_model_parallel_group())
    out = {f"{prefix}/{count_name}": totals["loss"][1][0]}
    for key, (num, den) in totals.items():
        if key.startswith("group/"):
            metric = key[len("group/"):]
            for g, name in enumerate(group_names):
                if den[g] > 0:
                    out[f"{prefix}/group/{name}/{metric}"] = num[g] / den[g]
        else:
            out[f"{prefix}/{key}"] = ratio(num[0], den[0])
    return out


def train_step(stage: Stage, trainable: Trainable, loader: DataLoader) -> Tuple[Dict[str, float], bool]:
    """One optimizer step: (metrics, whether the update went through)."""
    mbs = stage.microbatches(loader.next_batch())
    count = torch.stack([stage.count(mb).double() for mb in mbs]).sum()
    normalizer = loss_normalizer(count, parallel_state.get_data_parallel_group())
    stage.before_forward(mbs)
    outs = trainable.forward_backward(mbs, lambda mb, out: stage.loss(mb, out, normalizer, False))
    updated, grad_norm = trainable.step()
    metrics = stage_metrics(outs, "train", stage.count_name, stage.group_names)
    metrics.update({"optim/lr": trainable.lr(), "optim/grad_norm": grad_norm, "optim/skipped": float(not updated),
                    "train/epoch": float(loader.epoch)})
    return metrics, updated


@torch.no_grad()
def evaluate(stage: Stage, model: torch.nn.Module, dataset, layout: ParallelLayout) -> Dict[str, float]:
    """One ordered pass over ``dataset``: metrics weighted by real (non-filler) examples."""
    sums: List[Sums] = []
    for batch in eval_batches(dataset, stage.cfg.train.eval_batch_size, pad_token_id=stage.pad_id,
                              dp_rank=layout.dp_rank, dp_size=layout.dp):
        mbs = stage.microbatches(batch)
        stage.before_forward(mbs)
        sums.extend(run_microbatches(model, mbs, lambda mb, out: stage.loss(mb, out, None, True), forward_only=True))
    return stage_metrics(sums, "eval", stage.count_name, stage.group_names)


# ---------------------------------------------------------------------------------------------
# One run: build, resume, the loop, the final model directory
# ---------------------------------------------------------------------------------------------


@dataclass
class StageRun:
    """Everything one run holds, built by ``build_run`` from the command line."""

    cfg: StageConfig
    stage: Stage
    layout: ParallelLayout
    model: torch.nn.Module  # the trained LlamaModel (inside trainable's DDP wrapper)
    trainable: Trainable
    loader: DataLoader
    eval_set: object
    tokenizer_dir: str
    step: int = 0
    """Optimizer steps done."""
    bad_steps: int = 0
    """Consecutive steps skipped for non-finite gradients (saved with the checkpoint)."""
    resumed_from: Optional[str] = None
    """The checkpoint this run resumed from (checkpoint.resume), or None."""

    # training/run.py
    def final_model(self):
        return self.model

    # loop.Job
    def train_step(self) -> Tuple[Dict[str, float], bool]:
        return train_step(self.stage, self.trainable, self.loader)

    def advance(self, step: int, bad_steps: int) -> None:
        self.step, self.bad_steps = step, bad_steps

    def evaluate(self) -> Optional[Dict[str, float]]:
        if self.eval_set is None:
            return None
        return evaluate(self.stage, self.trainable.model, self.eval_set, self.layout)

    def save(self) -> None:
        save_checkpoint(self.cfg.run_dir, self.step, self.layout, {MODEL_KEY: self.model}, {MODEL_KEY: self.trainable},
                        {"stage": self.stage.name, "data": self.loader.state_dict(), "bad_steps": self.bad_steps},
                        self.cfg.checkpoint.keep_last, tokenizer_dir=self.tokenizer_dir)


def build_run(stage_cls, argv: Sequence[str]) -> StageRun:
    """Config, tokenizer and datasets first (user errors surface before any process group), then
    the parallel layout, the model, its optimizer and the training data loader."""
    yaml_path, overrides = overrides_from_argv(list(argv))
    cfg = load_config(stage_cls.schema, yaml_path, overrides)
    if not os.path.isdir(cfg.init):
        raise CheckpointError(f"init={cfg.init}: no such model directory (tools/init_model.py writes a fresh one)")
    checkpoint_format(cfg.init, key="init")  # ours or Hugging Face's, else one line naming the key
    tokenizer_dir = cfg.tokenizer or cfg.init
    stage = stage_cls(cfg, load_tokenizer(tokenizer_dir, "tokenizer" if cfg.tokenizer else "init"))
    train_set = stage.load_dataset(cfg.data.train)
    eval_set = stage.load_dataset(cfg.data.eval) if cfg.data.eval else None
    stage.set_groups(train_set, eval_set)

    layout = distributed.initialize(cfg.parallel.tp, cfg.parallel.pp, cfg.seed, virtual_pp=cfg.parallel.virtual_pp)
    cfg.train.check_world(layout.dp)
    if eval_set is not None and cfg.train.eval_batch_size % layout.dp:
        raise ConfigError(f"train.eval_batch_size={cfg.train.eval_batch_size} must be divisible by "
                          f"the data-parallel size {layout.dp}")
    dtype = resolve_dtype("auto")
    memory.check_run({MODEL_KEY: (cfg.init, stage.role, "init"), **stage.frozen_models()}, (MODEL_KEY,), layout,
                     cfg.train.micro_batch_size * stage.rows_per_example, cfg.data.max_length, dtype,
                     micro_batch_key="train.micro_batch_size")
    model = model_from_checkpoint(cfg.init, stage.role, layout, dtype, key="init")
    trainable = Trainable(model, cfg.optim, recompute=cfg.train.recompute)
    stage.setup(layout, dtype)
    loader = DataLoader(train_set, cfg.train.global_batch_size, seed=cfg.seed, pad_token_id=stage.pad_id,
                        dp_rank=layout.dp_rank, dp_size=layout.dp)
    return StageRun(cfg, stage, layout, model, trainable, loader, eval_set, tokenizer_dir)


def resume(r: StageRun) -> Optional[str]:
    """checkpoint.resume: restore weights, optimizer, LR schedule, RNG, the data cursor and the step
    counters into ``r``. Returns the checkpoint, or None for a fresh start."""
    path = resolve_resume(r.cfg.run_dir, r.cfg.checkpoint.resume)
    if path is None:
        return None
    state = load_checkpoint(path, r.layout, {MODEL_KEY: r.trainable})
    if state.get("stage") != r.stage.name:
        raise CheckpointError(f"{path} is a checkpoint of stage {state.get('stage')!r}, not "
                              f"{r.stage.name!r}; use another run_dir or checkpoint.resume=none")
    r.loader.load_state_dict(state["data"])
    r.advance(int(state["iteration"]), int(state.get("bad_steps", 0)))
    r.resumed_from = path
    return path


def run(stage_cls, argv: Sequence[str]) -> Dict[str, float]:
    """``[CONFIG.yaml] [key=value ...]`` -> train, evaluate, save (training/run.py). Returns the last
    logged metrics (plus ``step``) on every rank. Leaves the process group up (the CLI tears it down)."""
    r = build_run(stage_cls, argv)
    resume(r)
    stage = r.stage
    settings = run_setup.loop_settings(r.cfg.train, stage.name, "step", "Lower optim.lr or check the data", stage.show)
    return run_setup.train(r, r.cfg, settings, summary=stage.summary,
                           source=f"{stage.name} training, init {os.path.abspath(r.cfg.init)}")
