"""Every knob as a typed dataclass: YAML file + dotted CLI overrides, validated up front.

    cfg = load_config(PPOConfig, "examples/configs/miniature.yaml", ["ppo.kl_coef=0.05"])

OmegaConf structured configs do the merging and type checks (unknown keys and wrong types are
errors); each dataclass's ``validate()`` then checks values after merging and names the field
and the fix. All errors surface as ``ConfigError`` with one line.
"""

import dataclasses
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Type, TypeVar

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

T = TypeVar("T")

# Config keys that were renamed: old dotted key -> new one (a one-line error names the new key).
RENAMED_KEYS = {
    "train.iterations": "train.steps",
    "gil.adaptive_kl_normalize": "gil.group_kl_normalize",
}


@dataclass
class OptimSettings:
    SECTION = "optim"  # messages name fields as optim.x; config.validate_tree puts the real path
    lr: float = 1e-5
    """Peak learning rate."""
    min_lr: float = 0.0
    """Floor of the decay schedule."""
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    """Global gradient-norm clip (across TP/PP/DP); 0 disables."""
    warmup_steps: int = 0
    """Linear warmup over this many optimizer steps."""
    decay_steps: int = 0
    """Optimizer steps over which LR decays to min_lr (0 = constant after warmup)."""
    decay_style: str = "cosine"
    """constant | linear | cosine"""
    distributed_optimizer: Optional[bool] = None
    """Shard fp32 main weights and Adam moments over data-parallel ranks (megatron's
    DistributedOptimizer). null = on for bf16 models, off for fp32 ones."""

    def validate(self):
        if self.lr <= 0:
            raise ValueError(f"optim.lr={self.lr} must be > 0")
        if self.decay_style not in ("constant", "linear", "cosine"):
            raise ValueError(f"optim.decay_style={self.decay_style!r}; valid: constant, linear, cosine")
        if self.warmup_steps < 0 or self.decay_steps < 0:
            raise ValueError("optim.warmup_steps and optim.decay_steps must be >= 0")


RECOMPUTE = ("none", "selective", "full")


class ConfigError(ValueError):
    pass


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


@dataclass
class ParallelConfig:
    tp: int = 1
    """Tensor-parallel size: divides attention heads, KV heads and the FFN size."""
    pp: int = 1
    """Pipeline-parallel size: divides the number of layers. dp = world / (tp * pp)."""
    virtual_pp: int = 1
    """Model chunks per pipeline rank (megatron's interleaved 1F1B schedule): chunk v of pipeline
    rank r holds virtual stage v * pp + r, so the pipeline bubble shrinks by this factor for more
    point-to-point traffic. Needs pp > 1 and num_layers divisible by pp * virtual_pp."""

    def validate(self):
        _require(self.tp >= 1, f"parallel.tp={self.tp} must be >= 1")
        _require(self.pp >= 1, f"parallel.pp={self.pp} must be >= 1")
        _require(self.virtual_pp >= 1, f"parallel.virtual_pp={self.virtual_pp} must be >= 1 (1 = no interleaving)")
        _require(self.virtual_pp == 1 or self.pp > 1,
                 f"parallel.virtual_pp={self.virtual_pp} interleaves pipeline stages and needs parallel.pp > 1; "
                 f"set parallel.pp >= 2 or parallel.virtual_pp=1")


@dataclass
class ModelsConfig:
    actor: str = "???"
    """Our sharded checkpoint of the SFT policy (tools/convert_hf_checkpoint.py makes one)."""
    reference: Optional[str] = None
    """Frozen reference policy for the KL; defaults to ``actor``."""
    critic: Optional[str] = None
    """Critic initialisation (a reward model, or an LM); defaults to ``reward_model`` then ``actor``."""
    reward_model: Optional[str] = None
    """Reward-model checkpoint; exactly one of reward_model / reward_fn."""
    reward_fn: Optional[str] = None
    """``module:function`` taking (prompts, responses) lists of str and returning a list of floats."""
    gold_reward_fn: Optional[str] = None
    """Optional ``module:function`` true reward, logged beside the trained-on reward (never optimised):
    the gap between the two is reward hacking."""
    tokenizer: Optional[str] = None
    """Directory with tokenizer.json; defaults to the actor checkpoint directory."""
    dtype: str = "auto"
    """auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16"""

    def validate(self):
        _require((self.reward_model is None) != (self.reward_fn is None),
                 "models: set exactly one of models.reward_model (a checkpoint) or models.reward_fn (module:function)")
        for name in ("reward_fn", "gold_reward_fn"):
            spec = getattr(self, name)
            _require(spec is None or ":" in spec, f"models.{name}={spec!r} must look like 'package.module:function'")
        _require(self.dtype in ("auto", "fp32", "bf16"), f"models.dtype={self.dtype!r}; valid: auto, fp32, bf16")


@dataclass
class DataKeys:
    """Column names of the records (every stage reads the ones it needs)."""

    prompt: str = "prompt"
    """The prompt: a string, or a conversation (list of {role, content} messages)."""
    response: str = "response"
    """The SFT demonstration's reply (string or messages)."""
    chosen: str = "chosen"
    """The preferred reply, or a whole preferred dialogue when there is no prompt column."""
    rejected: str = "rejected"
    """The dispreferred reply (or dialogue)."""
    group: str = "group"
    """Optional known group of a record (a string; per-group metrics only, never the algorithm)."""

    def validate(self):
        for name in ("prompt", "response", "chosen", "rejected", "group"):
            _require(bool(getattr(self, name)), f"data.keys.{name} is empty; give the column name")


@dataclass
class DataSourceOptions:
    """How every data source of a stage is read and tokenized (gil_megatron/data/)."""

    split: Optional[str] = None
    """Split of a saved DatasetDict (a source may also say PATH:SPLIT); null: its only split."""
    keys: DataKeys = field(default_factory=DataKeys)
    chat_template: str = "auto"
    """Conversations are formatted by: auto (the tokenizer's chat template) | none (refuse
    conversations) | a path to a Jinja template file. Plain strings are used as they are."""
    num_proc: Optional[int] = None
    """Worker processes for tokenization (datasets.map); null: in-process."""
    cache_dir: Optional[str] = None
    """Tokenized-data cache; null: $GIL_MEGATRON_DATA_CACHE or ~/.cache/gil_megatron/tokenized."""

    def _check_sources(self) -> None:
        import os

        _require(self.chat_template in ("auto", "none") or os.path.isfile(self.chat_template),
                 f"data.chat_template={self.chat_template!r}: not a file; valid: auto, none, or a Jinja file path")
        _require(self.num_proc is None or self.num_proc >= 1, f"data.num_proc={self.num_proc} must be >= 1")
        from gil_megatron.data.datasets import TOO_LONG_POLICIES

        too_long = getattr(self, "too_long", None)
        _require(too_long in TOO_LONG_POLICIES, f"data.too_long={too_long!r}; valid: {', '.join(TOO_LONG_POLICIES)}")


@dataclass
class DataConfig(DataSourceOptions):
    train_prompts: str = "???"
    """Prompts: jsonl/json/parquet/csv (optionally .gz) or a saved HF dataset; records {prompt, group?}
    or chosen/rejected dialogues (gil_megatron/data/records.py; sources: data/sources.py)."""
    eval_prompts: Dict[str, str] = field(default_factory=dict)
    """Named held-out prompt sets evaluated every train.eval_every iterations (e.g. eval, ood)."""
    max_prompt_length: int = 64
    """Prompts longer than this (tokens, incl. BOS or chat template) are an error unless too_long=drop."""
    too_long: str = "error"
    """error | drop"""

    def validate(self):
        _require(self.max_prompt_length > 0, f"data.max_prompt_length={self.max_prompt_length} must be > 0")
        self._check_sources()

    def sources(self) -> Dict[str, str]:
        """config key -> data source (what the launcher checks before starting workers)."""
        return {"train_prompts": self.train_prompts, **{f"eval_prompts.{k}": v for k, v in self.eval_prompts.items()}}


@dataclass
class RolloutConfig:
    batch_size: int = 64
    """Prompts per PPO iteration (global, across data-parallel ranks)."""
    n_samples_per_prompt: int = 1
    """Responses generated per prompt; they stay together through mini-batching (GRPO / RLOO need > 1).
    Sequences per iteration = batch_size * n_samples_per_prompt."""
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    """0 = off."""
    greedy: bool = False
    micro_batch_size: int = 16
    """Sequences per forward in no-grad scoring (per data-parallel rank)."""
    decode_batch_size: int = 0
    """Rows decoded at once per data-parallel rank (0 = the whole local batch at once). The rollout's
    KV cache holds this many rows (the memory check counts it); smaller trades speed for memory.
    The draws depend on it."""
    logprobs_from_decode: bool = False
    """Take the PPO old log-probs from the decode step's logits (as TRL does) instead of a scoring
    forward of the actor: one forward fewer per iteration. In fp32 both paths agree to ~1e-6; in
    bf16 the decode path's attention rounds differently, so the first ratio is not exactly 1."""

    def validate(self):
        _require(self.batch_size > 0, f"rollout.batch_size={self.batch_size} must be > 0")
        _require(self.n_samples_per_prompt >= 1, f"rollout.n_samples_per_prompt={self.n_samples_per_prompt} must be >= 1")
        _require(self.max_new_tokens > 0, f"rollout.max_new_tokens={self.max_new_tokens} must be > 0")
        _require(self.temperature > 0, f"rollout.temperature={self.temperature} must be > 0 (use rollout.greedy=true)")
        _require(0 < self.top_p <= 1, f"rollout.top_p={self.top_p} must be in (0, 1]")
        _require(self.top_k >= 0, f"rollout.top_k={self.top_k} must be >= 0")
        _require(self.micro_batch_size > 0, f"rollout.micro_batch_size={self.micro_batch_size} must be > 0")
        _require(self.decode_batch_size >= 0, f"rollout.decode_batch_size={self.decode_batch_size} must be >= 0 "
                 "(0 decodes the whole local batch at once)")


@dataclass
class OffloadConfig:
    """Frozen models kept in host memory between uses (gil_megatron/ppo/offload.py). They score once
    per iteration; offloading trades a host-to-device copy of their weights per iteration for
    their weights' accelerator memory. On the CPU the host is the device and nothing changes."""

    reference: bool = False
    """Offload the reference model (pinned host memory on GPU; on the device only while it scores)."""
    reward_model: bool = False
    """Offload the reward model (needs models.reward_model; a reward_fn has no weights)."""


@dataclass
class PPOSettings:
    epochs: int = 1
    """Passes over each rollout batch."""
    mini_batch_size: int = 64
    """Sequences per optimizer step (global); divides rollout.batch_size * rollout.n_samples_per_prompt."""
    micro_batch_size: int = 16
    """Sequences per forward/backward (per data-parallel rank); gradient accumulation fills the mini-batch."""
    clip_eps: float = 0.2
    clip_ratio_c: Optional[float] = None
    """Dual-clip constant (> 1) for negative advantages; null = off."""
    value_clip: Optional[float] = 0.2
    vf_coef: float = 1.0
    gamma: float = 1.0
    lam: float = 0.95
    kl_coef: float = 0.05
    """eta, the KL coefficient (the paper's eta): fixed, or the starting value of the adaptive
    controller when ppo.target_kl is set. Logged as kl/coef; GIL scales it per sample (kl/sample_coef_mean)."""
    kl_estimator: str = "k1"
    kl_in: str = "reward"
    """reward (per-token penalty, the paper's) | loss (GRPO-style KL loss term)"""
    target_kl: Optional[float] = None
    """Target of the adaptive KL controller (Ziegler et al. 2019: eta follows the batch's kl/mean
    toward this many nats per sequence); null = eta stays ppo.kl_coef."""
    kl_horizon: int = 10000
    """The adaptive controller's horizon in samples: eta moves by at most a factor
    exp(0.2 * batch / horizon) per iteration."""
    entropy_coef: float = 0.0
    whiten_advantages: bool = True
    normalize_reward: bool = False
    """Running mean/std normalisation of reward-model scores."""
    reward_clip: Optional[float] = None
    loss_agg_mode: str = "seq_mean_token_mean"

    def validate(self):
        _require(self.epochs >= 1, f"ppo.epochs={self.epochs} must be >= 1")
        _require(self.clip_eps > 0, f"ppo.clip_eps={self.clip_eps} must be > 0")
        _require(self.clip_ratio_c is None or self.clip_ratio_c > 1, f"ppo.clip_ratio_c={self.clip_ratio_c} must be > 1")
        _require(0 <= self.gamma <= 1 and 0 <= self.lam <= 1, f"ppo.gamma={self.gamma}, ppo.lam={self.lam} must be in [0, 1]")
        from gil_megatron.algo.kl import KL_ESTIMATORS
        from gil_megatron.algo.ppo import KL_PLACEMENTS, LOSS_AGG_MODES

        _require(self.kl_estimator in KL_ESTIMATORS,
                 f"ppo.kl_estimator={self.kl_estimator!r}; valid: {', '.join(KL_ESTIMATORS)}")
        _require(self.kl_in in KL_PLACEMENTS, f"ppo.kl_in={self.kl_in!r}; valid: {', '.join(KL_PLACEMENTS)}")
        _require(self.kl_coef >= 0, f"ppo.kl_coef={self.kl_coef} must be >= 0")
        _require(self.target_kl is None or self.target_kl > 0, f"ppo.target_kl={self.target_kl} must be > 0 (or null)")
        _require(self.kl_horizon > 0, f"ppo.kl_horizon={self.kl_horizon} must be > 0")
        _require(self.loss_agg_mode in LOSS_AGG_MODES,
                 f"ppo.loss_agg_mode={self.loss_agg_mode!r}; valid: {', '.join(LOSS_AGG_MODES)}")


@dataclass
class GILSettings:
    """Group Invariant Learning (docs/design.md, "The method as built"). Defaults are v2;
    ``algo: gil_v1`` fixes the v1 values (response groups, whitened score, unweighted variance,
    beta_policy 1, weights only clamped at 0, min_group_mass 0.1)."""

    num_groups: int = 2
    """M, the number of latent groups (the critic's group head has M outputs)."""
    group_level: str = "prompt"
    """prompt (the head reads the critic trunk at the last prompt token: every response to one
    prompt shares q) | response (v1: the last response token)."""
    performance: str = "prompt_value"
    """G_i, always a function of the task reward only (never the KL penalty): prompt_value (the
    critic's task value at the last prompt token, fitted to task-reward returns; whitened) |
    whitened_score (the reward, whitened; v1) | mc_return (task-reward return, whitened) |
    surrogate (sum_t log pi_old * R_t with Monte-Carlo task returns)."""
    variance: str = "mass_weighted"
    """mass_weighted (sum_g pi_g (R_g - Rbar)^2: no tiny-group optimum) | unweighted (v1, paper-literal)."""
    inference: str = "head"
    """head (the critic's group head ascends the variance) | exact (each batch's variance-maximising
    hard split is the head's cross-entropy target) | known (the data's `group` field: a diagnostic
    oracle, never a default)."""
    known_groups: Dict[str, int] = field(default_factory=dict)
    """For inference=known: the data's `group` value -> group id in [0, num_groups) (e.g. {copy: 0,
    sort: 1}); empty = the data's group names in sorted order (their count must be num_groups)."""
    beta_policy: float = 0.25
    """Weight of the group-invariant term in the policy loss. 0.25 by rule: weights {0.6, 1.4} at a
    median split of a standard-normal G."""
    beta_critic: float = 1.0
    """Weight of -V(phi) (or of the label cross-entropy) in the critic loss (1 in the paper)."""
    weight_min: Optional[float] = 0.0
    """Lower clip of the invariance weights (null = none). Below 0 a weight un-learns good responses."""
    weight_max: Optional[float] = 2.0
    """Upper clip of the invariance weights (null = none): no sample gets more than this share."""
    min_group_mass: Optional[float] = None
    """Anti-collapse hinge on a group's batch-mean mass; null = 0 under mass_weighted (not needed),
    0.1 under unweighted (group_mass_floor())."""
    mass_penalty_coef: float = 1.0
    entropy_coef: float = 0.0
    """Anti-collapse: bonus on the entropy of the batch-mean assignment."""
    group_kl_normalize: bool = False
    """GIL's group-scaled KL (the paper's "adaptive KL penalty": sample i's KL coefficient is
    eta * p_high,i) divided by mean_i(p_high,i), so that the batch's mean coefficient equals eta
    (for comparisons at equal mean coefficient)."""
    detach_trunk: bool = False
    """Stop the group head's gradient at the critic trunk."""

    def group_mass_floor(self) -> float:
        """min_group_mass, or its default for the variance (null: 0 mass_weighted, 0.1 unweighted)."""
        if self.min_group_mass is not None:
            return self.min_group_mass
        return 0.0 if self.variance == "mass_weighted" else 0.1

    def validate(self):
        from gil_megatron.algo.gil import GROUP_LEVELS, INFERENCE_MODES, PERFORMANCE_MODES, VARIANCES

        _require(self.num_groups >= 2, f"gil.num_groups={self.num_groups} must be >= 2")
        _require(self.group_level in GROUP_LEVELS,
                 f"gil.group_level={self.group_level!r}; valid: {', '.join(GROUP_LEVELS)}")
        _require(self.performance in PERFORMANCE_MODES,
                 f"gil.performance={self.performance!r}; valid: {', '.join(PERFORMANCE_MODES)}")
        _require(self.variance in VARIANCES, f"gil.variance={self.variance!r}; valid: {', '.join(VARIANCES)}")
        _require(self.inference in INFERENCE_MODES,
                 f"gil.inference={self.inference!r}; valid: {', '.join(INFERENCE_MODES)}")
        _require(not (self.inference == "exact" and self.variance == "unweighted" and self.num_groups > 2),
                 "gil.inference=exact with gil.variance=unweighted supports gil.num_groups=2 only; "
                 "use gil.variance=mass_weighted")
        _require(all(0 <= g < self.num_groups for g in self.known_groups.values()),
                 f"gil.known_groups={dict(self.known_groups)}: every id must be in [0, gil.num_groups={self.num_groups})")
        _require(self.beta_policy >= 0 and self.beta_critic >= 0,
                 f"gil.beta_policy={self.beta_policy} and gil.beta_critic={self.beta_critic} must be >= 0")
        _require(self.weight_min is None or self.weight_max is None or self.weight_min <= 1 <= self.weight_max,
                 f"gil.weight_min={self.weight_min}, gil.weight_max={self.weight_max}: the range must contain 1 "
                 "(the PPO weight)")
        _require(self.min_group_mass is None or 0 <= self.min_group_mass < 1.0 / self.num_groups,
                 f"gil.min_group_mass={self.min_group_mass} must be in [0, 1/num_groups)")


@dataclass
class LoopConfig:
    """When the training loop (gil_megatron/training/loop.py) steps, evaluates, saves and gives up:
    the same knobs for every job. A PPO step is one iteration (rollout, scoring, update); a stage's
    step is one optimizer step."""

    steps: int = 100
    """Steps to train (a resumed run continues up to this many)."""
    eval_every: int = 0
    """Evaluate every N steps (0 = only at the end)."""
    save_every: int = 0
    """Checkpoint every N steps (0 = only at the end)."""
    max_bad_steps: int = 3
    """Stop after this many consecutive steps with non-finite values (each one is skipped)."""
    recompute: str = "none"
    """Activation recomputation of the trained models: none | selective (core attention) | full
    (whole layers); less activation memory for more compute, same math."""

    def validate(self):
        _require(self.steps >= 0, f"train.steps={self.steps} must be >= 0")
        _require(self.eval_every >= 0 and self.save_every >= 0,
                 f"train.eval_every={self.eval_every} and train.save_every={self.save_every} must be >= 0")
        _require(self.max_bad_steps >= 1, f"train.max_bad_steps={self.max_bad_steps} must be >= 1")
        _require(self.recompute in RECOMPUTE, f"train.recompute={self.recompute!r}; valid: {', '.join(RECOMPUTE)}")


@dataclass
class TrainConfig(LoopConfig):
    """The PPO job's loop (a step = one iteration) and its forwards."""

    sequence_packing: bool = False
    """Run the scoring and training forwards packed: each micro-batch's real tokens as one row, no
    padding (gil_megatron/models/packing.py; docs/design.md). Same results as padded within float
    rounding; faster the more the lengths in a batch differ (benchmarks/bench_packing.py). Off by
    default until the transformer-engine (GPU) attention path has been run with it."""


@dataclass
class CheckpointConfig:
    resume: str = "auto"
    """auto (latest complete checkpoint in run_dir, if any) | none | a checkpoint directory"""
    keep_last: int = 2
    """Older checkpoints are deleted once a newer one is complete."""

    def validate(self):
        _require(self.keep_last >= 1, f"checkpoint.keep_last={self.keep_last} must be >= 1")


@dataclass
class LoggingConfig:
    wandb: bool = False
    """Log to wandb (offline unless WANDB_MODE says otherwise)."""
    wandb_project: str = "gil_megatron"
    progress: bool = True
    """tqdm progress bar on rank 0."""


@dataclass
class RunConfig:
    """What every training run has (PPO and the stages; gil_megatron/training/run.py)."""

    run_dir: str = "runs/run"
    """metrics.jsonl, config.json, checkpoints/ and (by default) the final model go here."""
    seed: int = 1234
    """Every random stream of the run derives from it (gil_megatron/seeds.py)."""
    output: Optional[str] = None
    """Where the final trained model is written as a model directory (our format, any layout
    loads it); null: run_dir/model. PPO writes the policy (the actor)."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


@dataclass
class PPOConfig(RunConfig):
    """The rollout-then-train job of examples/run_gil_ppo.sh."""

    run_dir: str = "runs/gil_ppo"
    algo: str = "gil"
    """An entry of the algorithm registry (gil_megatron/algo/registry.py; `python -m
    gil_megatron.algo.registry` lists them): ppo, ppo_no_kl, gil, gil_v1, the GIL ablations, grpo, ..."""
    models: ModelsConfig = field(default_factory=ModelsConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    offload: OffloadConfig = field(default_factory=OffloadConfig)
    ppo: PPOSettings = field(default_factory=PPOSettings)
    gil: GILSettings = field(default_factory=GILSettings)
    actor_optim: OptimSettings = field(default_factory=lambda: OptimSettings(lr=1e-6))
    critic_optim: OptimSettings = field(default_factory=lambda: OptimSettings(lr=5e-6))
    train: TrainConfig = field(default_factory=TrainConfig)

    @staticmethod
    def presets(merged) -> Dict[str, tuple]:
        """The keys the chosen algorithm fixes: {dotted key: (value, why)} (load_config applies them)."""
        from gil_megatron.algo.registry import ALGORITHMS

        algo = ALGORITHMS.get(merged.algo)
        return {key: (value, f"algo={algo.name}") for key, value in algo.fixed.items()} if algo else {}

    def validate(self):
        from gil_megatron.algo.registry import ALGORITHMS, RENAMED_ALGORITHMS

        _require(self.algo not in RENAMED_ALGORITHMS, f"algo={self.algo} was renamed: use algo={RENAMED_ALGORITHMS.get(self.algo)}")
        _require(self.algo in ALGORITHMS, f"algo={self.algo!r}; valid: {', '.join(ALGORITHMS)}")
        n_seq = self.rollout.batch_size * self.rollout.n_samples_per_prompt
        _require(n_seq % self.ppo.mini_batch_size == 0,
                 f"ppo.mini_batch_size={self.ppo.mini_batch_size} must divide the sequences per iteration "
                 f"rollout.batch_size * rollout.n_samples_per_prompt = {n_seq}")
        _require(not (self.train.sequence_packing and self.parallel.virtual_pp > 1),
                 f"train.sequence_packing=true does not run with parallel.virtual_pp={self.parallel.virtual_pp}: "
                 "the interleaved schedule needs fixed micro-batch shapes; set one of them off")
        _require(not self.offload.reward_model or self.models.reward_model is not None,
                 "offload.reward_model=true but models.reward_model is not set (the reward comes from "
                 "models.reward_fn, which has no weights); set offload.reward_model=false")
        algo = ALGORITHMS[self.algo]
        _require(algo.advantage not in ("grpo", "rloo") or self.rollout.n_samples_per_prompt > 1,
                 f"algo={self.algo} compares the samples of a prompt: set rollout.n_samples_per_prompt >= 2")

    def check_world(self, world_size: int) -> int:
        """Validate batch arithmetic against the launched world; returns dp."""
        tp, pp = self.parallel.tp, self.parallel.pp
        _require(world_size % (tp * pp) == 0,
                 f"world size {world_size} is not divisible by parallel.tp*parallel.pp={tp}*{pp}; "
                 f"launch a multiple of {tp * pp} ranks (NPROC) or change parallel.tp/pp")
        dp = world_size // (tp * pp)
        _require(self.rollout.batch_size % dp == 0,
                 f"rollout.batch_size={self.rollout.batch_size} must be divisible by data-parallel size {dp}")
        per_rank = self.ppo.mini_batch_size // dp
        _require(self.ppo.mini_batch_size % dp == 0 and per_rank % self.ppo.micro_batch_size == 0,
                 f"ppo.micro_batch_size={self.ppo.micro_batch_size} must divide the per-rank mini-batch "
                 f"ppo.mini_batch_size/dp = {self.ppo.mini_batch_size}/{dp}")
        return dp


def load_config(schema: Type[T], yaml_path: Optional[str] = None, overrides: Sequence[str] = ()) -> T:
    """Structured schema <- YAML <- dotted overrides <- the schema's presets; returns the validated
    dataclass instance.

    Presets (``schema.presets(merged)``: dotted key -> value, e.g. what an algorithm fixes) replace
    the defaults of their keys; a key the user set (in the YAML or an override) to a different
    value is an error naming the key, the reason and the value it requires, never a silent override."""
    try:
        base = OmegaConf.structured(schema)
        user = OmegaConf.create()
        if yaml_path is not None:
            user = OmegaConf.load(_existing(yaml_path))
        for o in overrides:
            _require("=" in o, f"override {o!r} must look like key.path=value (e.g. ppo.kl_coef=0.05)")
        if overrides:
            user = OmegaConf.merge(user, OmegaConf.from_dotlist(list(overrides)))
        explicit = _dotted_keys(OmegaConf.to_container(user))
        for old in explicit:
            if old in RENAMED_KEYS:
                raise ConfigError(f"config key {old} was renamed: use {RENAMED_KEYS[old]}")
        base = OmegaConf.merge(base, user)
        if hasattr(schema, "presets"):
            for key, (value, why) in schema.presets(base).items():
                if key in explicit and explicit[key] != value:
                    raise ConfigError(f"{key}={explicit[key]!r} conflicts with {why}, which requires "
                                      f"{key}={value!r}; remove the key or choose another setting")
                OmegaConf.update(base, key, value, merge=False)
        for key in sorted(OmegaConf.missing_keys(base)):
            raise ConfigError(f"config key {key} has no value; set it in the YAML or as {key}=...")
        cfg = OmegaConf.to_object(base)
    except OmegaConfBaseException as exc:
        raise ConfigError(_one_line(exc)) from None
    validate_tree(cfg)
    return cfg


def _dotted_keys(tree, prefix: str = "") -> Dict[str, object]:
    """{"a": {"b": 1}} -> {"a.b": 1}: the keys a user set and their values."""
    out: Dict[str, object] = {}
    if isinstance(tree, dict):
        for k, v in tree.items():
            key = f"{prefix}.{k}" if prefix else str(k)
            out[key] = v
            out.update(_dotted_keys(v, key))
    return out


def validate_tree(cfg, path: str = "") -> None:
    """Run every ``validate()`` in the tree, innermost first (dataclass defaults are not checked
    at construction, so an incomplete default can be filled from YAML before it is judged).
    Sections used under several names (optimizer settings) get their real path in the message."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            validate_tree(value, f.name)
    if hasattr(cfg, "validate"):
        try:
            cfg.validate()
        except ValueError as exc:
            section = getattr(cfg, "SECTION", None)
            msg = str(exc)
            if section and path and msg.startswith(section + "."):
                msg = path + msg[len(section):]
            raise ConfigError(msg) from None


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def _existing(path: str) -> str:
    import os

    if not os.path.isfile(path):
        raise ConfigError(f"config file {path} not found")
    return path


def _one_line(exc: OmegaConfBaseException) -> str:
    key = getattr(exc, "full_key", None)
    msg = str(exc).split("\n")[0].strip()
    if type(exc).__name__ == "ConfigKeyError" and key:
        return f"unknown config key {key!r}; check the spelling against gil_megatron/config.py"
    if key:
        return f"config key {key}: {msg}"
    return msg


def overrides_from_argv(argv: List[str]):
    """``[CONFIG.yaml] [key=value ...]`` -> (yaml_path or None, overrides)."""
    yaml_path = argv[0] if argv and "=" not in argv[0] else None
    return yaml_path, [a for a in argv[(1 if yaml_path else 0):]]


# ---- the stages before and beside PPO (tools/train_sft.py, train_reward_model.py, train_dpo.py) ----
@dataclass
class StageDataConfig(DataSourceOptions):
    train: str = "???"
    """jsonl/json/parquet/csv (optionally .gz) or a saved HF dataset (formats: gil_megatron/data/sources.py)."""
    eval: Optional[str] = None
    """Held-out set evaluated every train.eval_every steps and at the end (DIR:SPLIT for a DatasetDict split)."""
    max_length: int = 64
    """Tokens of prompt + response (the longer response for preference pairs)."""
    max_prompt_length: Optional[int] = None
    too_long: str = "error"
    """error | drop"""

    def validate(self):
        _require(self.max_length > 0, f"data.max_length={self.max_length} must be > 0")
        self._check_sources()

    def sources(self) -> Dict[str, str]:
        """config key -> data source (what the launcher checks before starting workers)."""
        return {"train": self.train, **({"eval": self.eval} if self.eval else {})}


@dataclass
class StageTrainConfig(LoopConfig):
    """A stage's loop (a step = one optimizer step) and its batches."""

    global_batch_size: int = 32
    """Examples (or pairs) per optimizer step across data-parallel ranks."""
    micro_batch_size: int = 8
    """Examples per forward/backward per data-parallel rank (gradient accumulation fills the rest)."""
    eval_batch_size: int = 64
    """Examples per evaluation batch (global; a multiple of the data-parallel size)."""

    def validate(self):
        super().validate()
        _require(self.global_batch_size > 0 and self.micro_batch_size > 0,
                 "train.global_batch_size and train.micro_batch_size must be > 0")

    def check_world(self, dp: int) -> None:
        _require(self.global_batch_size % dp == 0 and (self.global_batch_size // dp) % self.micro_batch_size == 0,
                 f"train.micro_batch_size={self.micro_batch_size} must divide the per-rank batch "
                 f"train.global_batch_size/dp = {self.global_batch_size}/{dp}")


@dataclass
class StageConfig(RunConfig):
    """Shared by SFT, reward-model and DPO training."""

    run_dir: str = "runs/stage"
    init: str = "???"
    """Checkpoint (our sharded format) to start from."""
    tokenizer: Optional[str] = None
    """Directory with tokenizer.json; defaults to ``init``."""
    data: StageDataConfig = field(default_factory=StageDataConfig)
    train: StageTrainConfig = field(default_factory=StageTrainConfig)
    optim: OptimSettings = field(default_factory=lambda: OptimSettings(lr=1e-5))


@dataclass
class SFTConfig(StageConfig):
    run_dir: str = "runs/sft"


@dataclass
class RewardModelConfig(StageConfig):
    run_dir: str = "runs/reward_model"
    margin: float = 0.0
    """Bradley-Terry margin: loss = -log sigmoid(r_chosen - r_rejected - margin)."""


@dataclass
class DPOConfig(StageConfig):
    run_dir: str = "runs/dpo"
    beta: float = 0.1
    """DPO temperature on the log-ratio difference."""
    reference: Optional[str] = None
    """Frozen reference policy; defaults to ``init`` (the SFT model)."""

    def validate(self):
        _require(self.beta > 0, f"beta={self.beta} must be > 0")
