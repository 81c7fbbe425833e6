"""The rollout-then-train loop (docs/design.md, section 2), one method per step of an iteration.

    rollout()     prompts -> actor generates (KV cache, TP/PP)
    score()       no-grad: reward, old / reference log-probs, critic values and group logits
    experience()  GIL bookkeeping, adaptive-KL rewards, GAE (experience.make_experience)
    update()      K epochs x mini-batches: critic step (value loss + group objective), policy step
    metrics, evaluation and checkpoints around them; gil_megatron/training/run.py runs the iterations
    (the same loop and run setup as the SFT / reward-model / DPO stages) with PPOTrainer as its job.

The algorithm lives in gil_megatron/algo and experience.py; this file moves tensors between ranks
and calls it. Data parallelism: each DP rank generates and trains on its own slice of the rollout
batch; the per-sample tensors are all-gathered for the batch statistics, so every algorithmic
quantity equals the single-rank one.
"""

import dataclasses
import os
import time
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from torch.profiler import record_function

from gil_megatron import seeds
from gil_megatron.algo import gil, ppo
from gil_megatron.algo.registry import get_algorithm
from gil_megatron.config import PPOConfig
from gil_megatron.data import DataLoader, load_prompts, options_from_config, pad_token_id
from gil_megatron.models.build import load_tokenizer, model_from_checkpoint, resolve_dtype
from gil_megatron.models.llama import score_at_last, split_critic_output
from gil_megatron.models.logprobs import action_logprobs
from gil_megatron.models.packing import PACKING_KEY
from gil_megatron.parallel import collectives, distributed
from gil_megatron.ppo import objectives
from gil_megatron.ppo.evaluation import Scorers, evaluate_policy, primary_score, summarize_scores
from gil_megatron.ppo.experience import make_experience
from gil_megatron.ppo.kl_penalty import KLPenalty
from gil_megatron.ppo.offload import FrozenOffload, device_offloaded
from gil_megatron.ppo.rewards import RewardFunction
from gil_megatron.ppo.rollout import SamplingSettings, decode_rollout, generate
from gil_megatron.ppo.scoring import microbatches_of, score_critic, score_logprobs, score_reward_model
from gil_megatron.training import checkpoint as ckpt
from gil_megatron.training import memory
from gil_megatron.training import run as run_setup
from gil_megatron.training.loop import NonFiniteError
from gil_megatron.training.metrics import loss_normalizer, means, metric_sum, reduce_sums
from gil_megatron.training.optim import Trainable

# micro-batch metrics that are shares of the mini-batch mean (divided by the loss normaliser)
NORMALIZED_ACTOR_METRICS = ("policy/loss", "policy/kl_loss", "policy/entropy")
NORMALIZED_CRITIC_METRICS = ("value/loss",)


class PPOTrainer:
    def __init__(self, cfg: PPOConfig):
        self.cfg = cfg
        self.layout = distributed.initialize(cfg.parallel.tp, cfg.parallel.pp, seed=cfg.seed,
                                             virtual_pp=cfg.parallel.virtual_pp)
        # models and their inputs live on the device; the per-sample bookkeeping stays on the CPU
        self.device = distributed.device()
        self.dp = cfg.check_world(dist.get_world_size())
        self.algo = get_algorithm(cfg.algo)
        self.params = objectives.ObjectiveParams.from_config(cfg)
        m = cfg.models
        dtype = resolve_dtype(m.dtype)
        self._check_memory(dtype)
        self.tokenizer_dir = m.tokenizer or m.actor
        self.tokenizer = load_tokenizer(self.tokenizer_dir, "models.tokenizer" if m.tokenizer else "models.actor")
        self.pad_id = pad_token_id(self.tokenizer)
        sources = self._model_sources()

        def build(name: str, **kw):
            path, role, key = sources[name]
            return model_from_checkpoint(path, role, self.layout, dtype, key=key, **kw)

        self.actor = build("actor")
        self.reference = build("reference", trainable=False)
        self.critic = self.critic_train = None  # critic-free algorithms (grpo, rloo, reinforce_pp) have none
        # the critic's task-value output is fitted when GIL's performance G reads it (docs/design.md 4.1)
        self.fits_task_value = self.algo.group_inference and cfg.gil.performance == "prompt_value"
        if self.algo.uses_critic:
            self.critic = build("critic", num_groups=cfg.gil.num_groups)
            self.critic.detach_group_trunk = cfg.gil.detach_trunk
        if m.reward_model:
            self.reward_model = build("reward_model", trainable=False)
            self.reward_fn = None
        else:
            self.reward_model, self.reward_fn = None, RewardFunction(m.reward_fn)
        self.offload = FrozenOffload({"reference": self.reference, "reward_model": self.reward_model}, cfg.offload,
                                     self.device)
        self.gold_fn = RewardFunction(m.gold_reward_fn) if m.gold_reward_fn else None
        self.actor_train = Trainable(self.actor, cfg.actor_optim, recompute=cfg.train.recompute)
        if self.critic is not None:
            self.critic_train = Trainable(self.critic, cfg.critic_optim, recompute=cfg.train.recompute)

        prompts = load_prompts(cfg.data.train_prompts, self.tokenizer, max_prompt_length=cfg.data.max_prompt_length,
                               too_long=cfg.data.too_long, **options_from_config(cfg.data))
        self.loader = DataLoader(prompts, cfg.rollout.batch_size, seed=cfg.seed, pad_token_id=self.pad_id,
                                 dp_rank=self.layout.dp_rank, dp_size=self.dp)
        self.eval_sets = {name: load_prompts(path, self.tokenizer, max_prompt_length=cfg.data.max_prompt_length,
                                             too_long=cfg.data.too_long, **options_from_config(cfg.data))
                          for name, path in cfg.data.eval_prompts.items()}
        self.kl = KLPenalty(self.algo, cfg.ppo)
        self.reward_moments = ppo.RunningMoments()
        self.sampling = SamplingSettings(
            max_new_tokens=cfg.rollout.max_new_tokens, temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
            top_k=cfg.rollout.top_k, greedy=cfg.rollout.greedy, eos_token_id=self.tokenizer.eos_token_id,
            pad_token_id=self.pad_id, decode_batch_size=cfg.rollout.decode_batch_size)
        # identical on every TP/PP rank of a replica (sampling must agree), different across DP
        self.generator = seeds.generator(cfg.seed, "rollout", self.layout.dp_rank)
        self.iteration = 0
        self.bad_steps = 0
        self.resumed_from: Optional[str] = None
        self.prev_high_group: Optional[int] = None
        self.high_group_flips = 0
        self._resume()

    def _model_sources(self) -> Dict[str, Tuple[str, str, str]]:
        """name -> (model directory, role, the config key that named it) of every model the run
        holds: the one place that decides where each comes from (reference defaults to the actor,
        the critic to the reward model, then the actor)."""
        m = self.cfg.models

        def first(role: str, *keys: str) -> Tuple[str, str, str]:
            key = next(k for k in keys if getattr(m, k))
            return getattr(m, key), role, f"models.{key}"

        sources = {"actor": first("actor", "actor"), "reference": first("actor", "reference", "actor")}
        if self.algo.uses_critic:
            sources["critic"] = first("critic", "critic", "reward_model", "actor")
        if m.reward_model:
            sources["reward_model"] = first("reward", "reward_model")
        return sources

    def _check_memory(self, dtype: torch.dtype) -> None:
        cfg = self.cfg
        models = self._model_sources()
        memory.check_run(models, tuple(n for n in ("actor", "critic") if n in models), self.layout,
                         max(cfg.ppo.micro_batch_size, cfg.rollout.micro_batch_size),
                         cfg.data.max_prompt_length + cfg.rollout.max_new_tokens, dtype,
                         micro_batch_key="ppo.micro_batch_size", decode_rows=self._decode_rows(),
                         offloaded=device_offloaded(cfg.offload, {n: p for n, (p, _, _) in models.items()}))

    def _decode_rows(self) -> int:
        local = self.cfg.rollout.batch_size * self.cfg.rollout.n_samples_per_prompt // self.dp
        return min(local, self.cfg.rollout.decode_batch_size or local)

    # ---- one iteration ---------------------------------------------------------------------
    def rollout(self):
        batch = repeat_prompts(self.loader.next_batch(), self.cfg.rollout.n_samples_per_prompt)
        rollout = generate(self.actor, batch.input_ids.to(self.device), batch.lengths.to(self.device),
                           self.sampling, self.generator, return_logprobs=self.cfg.rollout.logprobs_from_decode)
        return batch, rollout

    def score(self, batch, rollout) -> Dict[str, torch.Tensor]:
        mbs = self.cfg.rollout.micro_batch_size
        seqs, lengths = rollout.sequences, rollout.lengths
        packed = lengths if self.cfg.train.sequence_packing else None
        old_logprobs = rollout.logprobs
        if old_logprobs is None:
            old_logprobs, _ = score_logprobs(self.actor, seqs, mbs, packed_lengths=packed)
        with self.offload.resident("reference"):
            ref_logprobs, _ = score_logprobs(self.reference, seqs, mbs, packed_lengths=packed)
        # the group head reads the critic at the last prompt token (prompt-level groups) or the last token
        head_lengths = rollout.prompt_lengths if self.params.gil.group_level == "prompt" else lengths
        if self.critic is not None:
            values, task_values, group_logits = score_critic(self.critic, seqs, head_lengths, rollout.prompt_lengths,
                                                             mbs, packed_lengths=packed)
        else:
            values, task_values = torch.zeros_like(old_logprobs), torch.zeros(len(seqs))
            group_logits = torch.zeros(len(seqs), self.params.gil.num_groups)
        prompts, responses = decode_rollout(self.tokenizer, rollout)
        if self.reward_model is not None:
            with self.offload.resident("reward_model"):
                scores = score_reward_model(self.reward_model, seqs, lengths, mbs, packed_lengths=packed)
        else:
            scores = self.reward_fn.shared(prompts, responses)
        out = {"scores": scores, "old_logprobs": old_logprobs, "ref_logprobs": ref_logprobs, "values": values,
               "task_values": task_values, "group_logits": group_logits,
               "action_mask": rollout.response_mask[:, 1:].float(), "sequences": seqs, "lengths": lengths,
               "prompt_lengths": rollout.prompt_lengths, "head_lengths": head_lengths}
        out = {k: v.cpu() for k, v in out.items()}
        if self.gold_fn is not None:
            out["gold"] = self.gold_fn.shared(prompts, responses)
        return out

    def experience(self, local: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        full = gather_across_dp(local, self.pad_id)
        raw = full["scores"]
        for name in ("scores", "old_logprobs", "ref_logprobs", "values"):
            if not torch.isfinite(full[name]).all():
                raise NonFiniteError(f"non-finite {name} in the rollout batch")
        scores = raw
        if self.cfg.ppo.normalize_reward:
            self.reward_moments.update_from_batch(raw)
            scores = ppo.normalize_and_clip_rewards(raw, self.reward_moments, self.cfg.ppo.reward_clip)
        elif self.cfg.ppo.reward_clip is not None:
            scores = raw.clamp(-self.cfg.ppo.reward_clip, self.cfg.ppo.reward_clip)
        full["raw_scores"], full["scores"] = raw, scores
        shuffle = seeds.generator(self.cfg.seed, "weight_shuffle", self.iteration)
        full.update(make_experience(full, self.algo, self.params, eta=self.kl.eta, generator=shuffle))
        return full

    def update(self, full: Dict[str, torch.Tensor]) -> List[Dict[str, float]]:
        """K epochs x mini-batches over this DP rank's rows of the rollout batch."""
        cfg = self.cfg
        n_global = full["sequences"].shape[0]
        rows = torch.arange(self.layout.dp_rank, n_global, self.dp)  # this rank's share
        local_mini = cfg.ppo.mini_batch_size // self.dp
        n_minibatches = n_global // cfg.ppo.mini_batch_size
        gen = seeds.generator(cfg.seed, "minibatch_order", self.iteration)
        step_metrics = []
        for _ in range(cfg.ppo.epochs):
            order = shuffle_keeping_prompts_together(rows, full["prompt_index"][rows], gen)
            for k in range(n_minibatches):
                idx = order[k * local_mini:(k + 1) * local_mini]
                mini = {name: t[idx] for name, t in full.items() if torch.is_tensor(t) and t.dim() > 0
                        and t.shape[0] == n_global}
                step_metrics.append(self._train_minibatch(mini, group_scale=n_minibatches))
        return step_metrics

    def _train_minibatch(self, mini: Dict[str, torch.Tensor], group_scale: float) -> Dict[str, float]:
        mbs = self.cfg.ppo.micro_batch_size
        on_device = {k: v.to(self.device) for k, v in mini.items()}
        packed = mini["lengths"] if self.cfg.train.sequence_packing else None  # CPU: packs without a host sync
        microbatches = microbatches_of(on_device["sequences"], mbs, packed,
                                       **{k: v for k, v in on_device.items() if k != "sequences"})
        mask, mode = mini["action_mask"], self.params.ppo.loss_agg_mode
        dp_group = parallel_state.get_data_parallel_group()
        normalizer = loss_normalizer(loss_units(mask, mode), dp_group)
        value_normalizer = loss_normalizer(loss_units(mask, "token_mean"), dp_group)
        sequence_normalizer = loss_normalizer(torch.tensor(float(mask.shape[0])), dp_group)
        params, infer_groups, fit_task_value = self.params, self.algo.group_inference, self.fits_task_value

        def critic_loss(mb, out):
            values, task_values, group_logits = split_critic_output(out.float())
            q = torch.softmax(score_at_last(group_logits, mb["head_lengths"]), dim=-1) if infer_groups else None
            task = score_at_last(task_values, mb["prompt_lengths"]) if fit_task_value else None
            # DDP averages gradients over DP ranks, and each step sees 1/group_scale of the batch
            loss, metrics = objectives.critic_loss(mb, values[:, :-1], q, params, value_normalizer,
                                                   group_scale=self.dp * group_scale, task_values=task,
                                                   sequence_normalizer=sequence_normalizer)
            task_loss = {k: metrics.pop(k) for k in ("value/task_loss",) if k in metrics}
            sums = step_sums(metrics, NORMALIZED_CRITIC_METRICS, value_normalizer,
                             loss_units(mb["action_mask"], "token_mean"))
            sums.update(step_sums(task_loss, tuple(task_loss), sequence_normalizer,
                                  torch.tensor(float(mb["action_mask"].shape[0]))))
            return loss, sums

        def actor_loss(mb, logits):
            logprobs, entropy = action_logprobs(logits, mb["input_ids"], with_entropy=True,
                                                packing=mb.get(PACKING_KEY))
            loss, metrics = objectives.actor_loss(mb, logprobs, entropy, params, normalizer)
            return loss, step_sums(metrics, NORMALIZED_ACTOR_METRICS, normalizer, loss_units(mb["action_mask"], mode))

        c_metrics, c_ok, c_norm = [], True, 0.0
        if self.critic_train is not None:
            c_metrics = self.critic_train.forward_backward(microbatches, critic_loss)
            c_ok, c_norm = self.critic_train.step()
        a_metrics = self.actor_train.forward_backward(microbatches, actor_loss)
        a_ok, a_norm = self.actor_train.step()
        totals = reduce_sums(c_metrics + a_metrics, dp_group, parallel_state.get_pipeline_model_parallel_group())
        metrics = means(totals)
        metrics.update({"value/grad_norm": c_norm, "policy/grad_norm": a_norm, "policy/lr": self.actor_train.lr(),
                        "skipped_updates": float((not c_ok) + (not a_ok))})
        return metrics

    def iterate(self) -> Dict[str, float]:
        # the named ranges show the phases in torch.profiler traces (benchmarks/profile_ppo_step.py)
        with record_function("gil_megatron/iteration"):
            return self._iterate()

    def _iterate(self) -> Dict[str, float]:
        cfg = self.cfg
        t0 = time.perf_counter()
        with record_function("gil_megatron/generate"):
            batch, rollout = self.rollout()
        t_gen = time.perf_counter()
        with record_function("gil_megatron/score"):
            local = self.score(batch, rollout)
            local["known_group"] = torch.tensor([self._known_group_id(g) for g in batch.groups])
            local["oracle_group"] = torch.tensor([self._oracle_group_id(g) for g in batch.groups])
            # a global id per prompt (unique across DP ranks): its n samples share it
            n = self.cfg.rollout.n_samples_per_prompt
            local["prompt_index"] = (torch.arange(len(batch)) // n) * self.dp + self.layout.dp_rank
        t_score = time.perf_counter()
        with record_function("gil_megatron/experience"):
            full = self.experience(local)
        with record_function("gil_megatron/update"):
            steps = self.update(full)
        t_train = time.perf_counter()
        metrics = self._iteration_metrics(full, steps)
        n_tokens = float(full["action_mask"].sum())
        metrics.update({
            "rollout/tokens_per_s": n_tokens / max(t_gen - t0, 1e-9),
            "rollout/response_length": n_tokens / full["action_mask"].shape[0],
            "time/generate_s": t_gen - t0, "time/score_s": t_score - t_gen, "time/train_s": t_train - t_score,
        })
        self.kl.update(metrics["kl/mean"], cfg.rollout.batch_size)
        return metrics

    # ---- metrics -------------------------------------------------------------------------------
    def _iteration_metrics(self, full, steps) -> Dict[str, float]:
        mask = full["action_mask"]
        kl_seq = (full["kl"] * mask).sum(-1)
        m = {
            "reward/mean": full["scores"].mean(), "reward/std": full["scores"].std(),
            "kl/mean": kl_seq.mean(), "kl/sample_coef_mean": full["sample_kl_coef"].mean(), **self.kl.metrics(),
            "value/explained_var": ppo.explained_variance(full["values"], full["returns"], mask),
            "value/task_explained_var": ppo.explained_variance(full["task_values"][:, None], full["task_returns"][:, None],
                                                               torch.ones(mask.shape[0], 1)),
            "advantages/mean": ppo.masked_mean(full["advantages"], mask),
        }
        if "gold" in full:
            m["reward/gold_mean"] = full["gold"].mean()
            m["reward/proxy_minus_gold"] = (full["scores"] - full["gold"]).mean()
        per_sample = {"reward": full["scores"], "kl": kl_seq,
                      "advantage": ppo.masked_mean(full["advantages"], mask, dim=-1),
                      "value_error": ppo.masked_mean((full["values"] - full["returns"]).square(), mask, dim=-1)}
        if "gold" in full:
            per_sample["gold"] = full["gold"]
        if "group_probs" in full:
            q = full["group_probs"]
            m.update(gil.group_metrics(q, per_sample, perf=full["perf"], variance=self.params.gil.variance))
            m["reward/worst_group"] = min(m[f"group/{g}/reward"] for g in range(q.shape[1]))
            w = full["sample_weights"]
            m.update({"gil/weight_min": w.min(), "gil/weight_max": w.max(), "gil/weight_mean": w.mean(),
                      "gil/weight_zero_frac": (w <= 0).float().mean()})
            if "weight_clip_frac" in full:
                m["gil/weight_clip_frac"] = full["weight_clip_frac"]
            high = int(m["gil/high_group"])
            if self.prev_high_group is not None and high != self.prev_high_group:
                self.high_group_flips += 1
            self.prev_high_group = high
            m["gil/high_group_flips"] = float(self.high_group_flips)
        known = full["known_group"]
        if (known >= 0).any():
            names = self.known_group_names
            for gid, name in enumerate(names):
                sel = known == gid
                if sel.any():
                    for key, x in per_sample.items():
                        m[f"known/{name}/{key}"] = x[sel].mean()
            if "group_probs" in full and (known >= 0).all():
                m["gil/known_agreement"] = gil.assignment_agreement(full["group_probs"], known, len(names))
                m["gil/known_majority_share"] = gil.majority_share(known, len(names))
            worst_key = "gold" if "gold" in per_sample else "reward"
            m[f"known/worst_{worst_key}"] = min(m[f"known/{n}/{worst_key}"] for n in names
                                                if f"known/{n}/{worst_key}" in m)
        out = {k: float(v) for k, v in m.items()}
        for key in steps[0] if steps else ():
            out[key] = sum(s[key] for s in steps) / len(steps)
        return out

    @property
    def known_group_names(self) -> List[str]:
        if not hasattr(self, "_known_names"):
            self._known_names = self.loader.dataset.group_names()
        return self._known_names

    def _oracle_group_id(self, group: Optional[str]) -> int:
        """gil.known_groups' id of a prompt's `group` (gil.inference=known), -1 when unmapped."""
        if not hasattr(self, "_oracle_map"):  # built once: this runs for every sample of every batch
            self._oracle_map = dict(self.cfg.gil.known_groups) or {
                name: i for i, name in enumerate(self.known_group_names)}
        return self._oracle_map.get(group, -1)

    def _known_group_id(self, group: Optional[str]) -> int:
        names = self.known_group_names
        return names.index(group) if group in names else -1

    # ---- evaluation ----------------------------------------------------------------------------
    def evaluate(self) -> Optional[Dict[str, float]]:
        """Greedy responses on each held-out set (evaluation.evaluate_policy, the one eval path): the
        trained-on reward, gold when known, per known group and the worst group of the primary score.
        None without held-out sets."""
        if not self.eval_sets:
            return None
        scorers = Scorers(self.tokenizer, self.pad_id, reward_model=self.reward_model, reward_fn=self.reward_fn,
                          gold_fn=self.gold_fn)
        greedy = dataclasses.replace(self.sampling, greedy=True)
        with self.offload.resident("reward_model"):
            records = evaluate_policy(self.actor, self.eval_sets, scorers, greedy,
                                      batch_size=self.cfg.rollout.batch_size,
                                      micro_batch_size=self.cfg.rollout.micro_batch_size)
        trained_on = "reward_model" if self.reward_model is not None else "reward_fn"
        primary = primary_score(scorers.score_names)
        out = {}
        for name, recs in records.items():
            out[f"eval/{name}/reward"] = sum(r[trained_on] for r in recs) / len(recs)
            if self.gold_fn is not None:
                out[f"eval/{name}/gold"] = sum(r["gold"] for r in recs) / len(recs)
            summary = summarize_scores([r[primary] for r in recs], [r["group"] for r in recs])
            for g, value in summary.get("known_groups", {}).items():
                out[f"eval/{name}/group/{g}"] = value
            if "worst_known" in summary:
                out[f"eval/{name}/worst_group"] = summary["worst_known"]
        return out

    # ---- checkpoints -------------------------------------------------------------------------------
    def _trainer_state(self) -> dict:
        return {"data": self.loader.state_dict(), "kl": self.kl.state_dict(),
                "reward_moments": {k: v.tolist() for k, v in self.reward_moments.state_dict().items()},
                "prev_high_group": self.prev_high_group,
                "high_group_flips": self.high_group_flips, "bad_steps": self.bad_steps}

    def _trained_models(self):
        """({name: model}, {name: Trainable}) of what this run trains (no critic for critic-free algos)."""
        names = ("actor", "critic") if self.critic is not None else ("actor",)
        return ({n: getattr(self, n) for n in names}, {n: getattr(self, f"{n}_train") for n in names})

    def save(self) -> str:
        return ckpt.save_checkpoint(self.cfg.run_dir, self.iteration, self.layout,
                                    *self._trained_models(), self._trainer_state(), self.cfg.checkpoint.keep_last,
                                    tokenizer_dir=self.cfg.models.tokenizer or self.cfg.models.actor,
                                    rank_state={"generator": self.generator.get_state().tolist()})

    def _resume(self) -> None:
        path = ckpt.resolve_resume(self.cfg.run_dir, self.cfg.checkpoint.resume)
        if path is None:
            return
        state = ckpt.load_checkpoint(path, self.layout, self._trained_models()[1])
        self.iteration = state["iteration"]
        self.loader.load_state_dict(state["data"])
        self.kl.load_state_dict(state["kl"])
        self.reward_moments.load_state_dict({k: torch.tensor(v) for k, v in state["reward_moments"].items()})
        if state["rank_state"] is not None:  # same layout: this rank's sampling stream continues exactly
            self.generator.set_state(torch.tensor(state["rank_state"]["generator"], dtype=torch.uint8))
        else:  # another layout: a fresh stream per data-parallel replica (same on its TP/PP ranks)
            self.generator = seeds.generator(self.cfg.seed, "rollout_resumed", self.layout.dp_rank, self.iteration)
        self.prev_high_group = state["prev_high_group"]
        self.high_group_flips = state["high_group_flips"]
        self.bad_steps = state["bad_steps"]
        self.resumed_from = path

    # ---- the run (gil_megatron/training/run.py) ----------------------------------------------------
    @property
    def step(self) -> int:
        """Iterations done (training/run.RunJob)."""
        return self.iteration

    def final_model(self):
        """The run's product: the policy."""
        return self.actor

    def train_step(self) -> Tuple[Dict[str, float], bool]:
        """loop.Job: one iteration; (metrics, whether every update went through)."""
        metrics = self.iterate()
        return metrics, metrics["skipped_updates"] == 0

    def advance(self, step: int, bad_steps: int) -> None:
        self.iteration, self.bad_steps = step, bad_steps

    def train(self) -> Dict[str, float]:
        cfg = self.cfg
        settings = run_setup.loop_settings(cfg.train, cfg.algo, "iteration", "Lower the learning rates or check the reward",
                                           show=("reward/mean", "kl/mean", "loss"))
        return run_setup.train(self, cfg, settings, summary=("reward/mean", "reward/gold_mean", "kl/mean", "reward/worst_group"),
                               source=f"{cfg.algo} training, actor {os.path.abspath(cfg.models.actor)}",
                               skipped={"skipped_updates": 2.0})


# ---- helpers: collectives kept out of the loop above --------------------------------------------
def repeat_prompts(batch, n: int):
    """Each prompt of a PromptBatch n times in a row (rollout.n_samples_per_prompt)."""
    if n == 1:
        return batch
    rep = lambda xs: [x for x in xs for _ in range(n)]  # noqa: E731
    return dataclasses.replace(batch, input_ids=batch.input_ids.repeat_interleave(n, 0),
                               lengths=batch.lengths.repeat_interleave(n), prompts=rep(batch.prompts),
                               groups=rep(batch.groups), indices=rep(batch.indices),
                               valid=batch.valid.repeat_interleave(n))


def shuffle_keeping_prompts_together(rows: torch.Tensor, prompt_index: torch.Tensor,
                                     generator: torch.Generator) -> torch.Tensor:
    """A random order of ``rows`` in which the samples of one prompt stay adjacent (so they land in
    the same mini-batch): prompts are shuffled, then their rows follow in order."""
    uids, inverse = torch.unique(prompt_index, return_inverse=True)
    rank_of_uid = torch.empty_like(uids)
    rank_of_uid[torch.randperm(len(uids), generator=generator)] = torch.arange(len(uids))
    return rows[torch.argsort(rank_of_uid[inverse], stable=True)]



def loss_units(mask: torch.Tensor, mode: str) -> torch.Tensor:
    """The units the loss averages over in ``mask`` [b, T] (gil_megatron/training/metrics.py): response
    tokens for token_mean, sequences with at least one response token otherwise."""
    if mode == "token_mean":
        return mask.sum()
    return (mask.sum(-1) > 0).sum().float()


def step_sums(metrics: Dict[str, torch.Tensor], normalized: Tuple[str, ...], normalizer: torch.Tensor,
              units: torch.Tensor) -> Dict[str, torch.Tensor]:
    """A PPO micro-batch's metrics as sums (gil_megatron/training/metrics.py). ``normalized`` metrics are
    this micro-batch's share of the mini-batch mean (divided by ``normalizer``): they become
    (sum over its ``units``, units), so the step reports the mean over the global mini-batch. The
    others are micro-batch means: (mean, 1), so the step reports their mean over micro-batches."""
    return {k: metric_sum(v * normalizer, units) if k in normalized else metric_sum(v, 1.0)
            for k, v in metrics.items()}


def gather_across_dp(local: Dict[str, torch.Tensor], pad_id: int) -> Dict[str, torch.Tensor]:
    """All-gather per-sample tensors over data-parallel ranks, interleaving rows so that global row
    r lives on DP rank r % dp (update() slices the same way). Sequence dims are padded to the
    longest rank first."""
    group = parallel_state.get_data_parallel_group()
    dp = dist.get_world_size(group)
    if dp == 1:
        return dict(local)
    device = distributed.device()  # nccl collectives need device tensors
    seq_len = collectives.all_reduce(torch.tensor([local["sequences"].shape[1]], device=device), group,
                                     op=dist.ReduceOp.MAX)
    s = int(seq_len)
    out = {}
    for name, t in local.items():
        if t.dim() >= 2 and name != "group_logits":
            width = s if name == "sequences" else s - 1
            fill = pad_id if name == "sequences" else 0
            t = torch.nn.functional.pad(t, (0, width - t.shape[1]), value=fill)
        parts = collectives.all_gather(t.to(device), group)
        out[name] = torch.stack(parts, dim=1).reshape(-1, *t.shape[1:]).cpu()  # interleave rows
    return out


def main(argv: Optional[List[str]] = None) -> Dict[str, float]:
    import sys

    from gil_megatron.config import load_config, overrides_from_argv

    yaml_path, overrides = overrides_from_argv(sys.argv[1:] if argv is None else argv)
    cfg = load_config(PPOConfig, yaml_path, overrides)
    metrics = PPOTrainer(cfg).train()
    distributed.destroy()
    return metrics


if __name__ == "__main__":
    from gil_megatron.cli import run_cli

    run_cli(main)
