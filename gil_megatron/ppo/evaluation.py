"""Evaluation of trained policies: generate on prompt sets, score, summarise per group, compare two.

The paper's claims (arXiv 2310.11971) are about groups and generalisation: the inferred groups
separate easy from hard data, GIL narrows the gap between groups, resists reward hacking and does
better out of distribution, judged in win/tie/lose tables. This module measures exactly those
things on any policy checkpoint, in the order of the pipeline:

    generate_responses   prompts -> responses (greedy by default) on every TP/PP layout, DP-sharded
    score_responses      reward model, reward function, gold function; KL(policy || reference)
                         along each response; the critic's inferred group (argmax of its group head)
    evaluate_policy      both of the above over named prompt sets -> per-sample records (every rank)
    summarize_set        per set: mean, std, per known group, per inferred group, worst group, gap,
                         proxy-minus-gold, KL to the reference, response length, group agreement
    win_tie_lose         pairwise comparison of two policies on the same prompts with a tie margin

gil_megatron/ppo/report.py turns summaries into report.json, report.md and samples.jsonl;
``tools/evaluate.py`` is the command line around both; ``benchmarks/compare/runner.py`` calls
``evaluate_policy`` on the models a finished training run still holds.

Conventions. Score names: ``reward_model`` (a reward-model checkpoint), ``reward_fn`` (a Python
``module:function``), ``gold`` (the true reward, when known). The *primary* score (worst group,
gaps, the default judge) is gold when present, else reward_fn, else reward_model.
``kl_to_ref`` of a response is sum_t KL(pi(.|x, y_<t) || pi_ref(.|x, y_<t)) over its tokens, in
nats: the exact KL of the two next-token distributions at every response position (computed from
vocab-parallel logits without gathering them), not a single-sample estimate, so it is meaningful
for greedy responses too. Summaries are plain floats; a group with no samples is left out.
"""

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from gil_megatron import seeds
from gil_megatron.algo.gil import assignment_agreement
from gil_megatron.data import PromptDataset, eval_batches
from gil_megatron.models.pipeline import broadcast_from_last_stage, run_microbatches
from gil_megatron.ops.logprob import vocab_parallel_kl
from gil_megatron.parallel import collectives, distributed
from gil_megatron.ppo.rewards import RewardFunction
from gil_megatron.ppo.rollout import RolloutBatch, SamplingSettings, decode_rollout, generate
from gil_megatron.ppo.scoring import microbatches_of, score_critic, score_reward_model

SCORE_NAMES = ("gold", "reward_fn", "reward_model")  # in order of preference for the primary score


@dataclass
class Scorers:
    """What judges a policy's responses; every field but the tokenizer is optional.

    Models are built on this rank for the current layout (``models.build.model_from_checkpoint``);
    reward functions take decoded (prompts, responses) and return one float each."""

    tokenizer: object
    pad_token_id: int
    reward_model: Optional[torch.nn.Module] = None
    reward_fn: Optional[RewardFunction] = None
    gold_fn: Optional[RewardFunction] = None
    reference: Optional[torch.nn.Module] = None
    """Frozen reference policy: enables ``kl_to_ref``."""
    critic: Optional[torch.nn.Module] = None
    """GIL critic with a group head: enables the inferred groups (argmax_g q_g)."""
    group_level: str = "prompt"
    """Where the group head reads the critic (gil.group_level of the run that trained it): the last
    prompt token (prompt) or the last token (response)."""

    @property
    def score_names(self) -> List[str]:
        present = {"gold": self.gold_fn, "reward_fn": self.reward_fn, "reward_model": self.reward_model}
        return [name for name in SCORE_NAMES if present[name] is not None]


# ---------------------------------------------------------------------------------------------
# KL to the reference
# ---------------------------------------------------------------------------------------------


def sequence_kl(actor: torch.nn.Module, reference: torch.nn.Module, sequences: torch.Tensor,
                response_mask: torch.Tensor, micro_batch_size: int) -> torch.Tensor:
    """Per-sequence KL(actor || reference) summed over response tokens: sequences [b, s] -> [b].

    Action t (token t+1) is predicted at position t, so the KL at positions 0..s-2 is weighted by
    response_mask[:, 1:]. The exact KL of the two next-token distributions from vocab-parallel
    logits (``ops.vocab_parallel_kl``), on the last pipeline stage, then given to every stage."""
    tp_group = parallel_state.get_tensor_model_parallel_group()
    action_mask = response_mask[:, 1:].float()
    per_mb = []
    for mb in microbatches_of(sequences, micro_batch_size, action_mask=action_mask):
        with torch.no_grad():
            actor_out = run_microbatches(actor, [mb], forward_only=True)
            ref_out = run_microbatches(reference, [mb], forward_only=True)
        if actor_out:  # last pipeline stage: vocab-parallel logits [b, s, V/tp]
            kl = vocab_parallel_kl(actor_out[0]["output"][:, :-1], ref_out[0]["output"][:, :-1], tp_group)
            per_mb.append((kl * mb["action_mask"]).sum(-1))
    (out,) = broadcast_from_last_stage([torch.cat(per_mb)] if per_mb else None)
    return out


# ---------------------------------------------------------------------------------------------
# Generation and scoring
# ---------------------------------------------------------------------------------------------


def score_responses(actor: torch.nn.Module, rollout: RolloutBatch, prompts: List[str], responses: List[str],
                    scorers: Scorers, micro_batch_size: int) -> Dict[str, torch.Tensor]:
    """Every per-sample quantity of one generated batch (``prompts`` / ``responses``: its decoded
    text), as [b] tensors equal on every rank of the model replica: scores by name,
    ``response_length`` (tokens, EOS included), ``kl_to_ref`` and ``inferred_group`` /
    ``group_probs`` [b, M] when the reference / critic are given."""
    seqs, lengths = rollout.sequences, rollout.lengths
    out: Dict[str, torch.Tensor] = {"response_length": rollout.response_lengths.float()}
    if scorers.gold_fn is not None:
        out["gold"] = scorers.gold_fn.shared(prompts, responses)
    if scorers.reward_fn is not None:
        out["reward_fn"] = scorers.reward_fn.shared(prompts, responses)
    if scorers.reward_model is not None:
        out["reward_model"] = score_reward_model(scorers.reward_model, seqs, lengths, micro_batch_size)
    if scorers.reference is not None:
        out["kl_to_ref"] = sequence_kl(actor, scorers.reference, seqs, rollout.response_mask, micro_batch_size)
    if scorers.critic is not None:
        head_lengths = rollout.prompt_lengths if scorers.group_level == "prompt" else lengths
        *_, group_logits = score_critic(scorers.critic, seqs, head_lengths, rollout.prompt_lengths, micro_batch_size)
        probs = torch.softmax(group_logits.float(), dim=-1)
        out["group_probs"] = probs
        out["inferred_group"] = probs.argmax(dim=-1)
    return out


def generate_and_score(actor: torch.nn.Module, dataset: PromptDataset, scorers: Scorers, sampling: SamplingSettings,
                       *, batch_size: int, micro_batch_size: int, seed: int = 0) -> List[dict]:
    """All of one prompt set's samples as records (dicts of plain values), ordered by prompt index,
    on every rank. ``batch_size`` is global (divided over data-parallel ranks)."""
    dp_group = parallel_state.get_data_parallel_group()
    dp, dp_rank = dist.get_world_size(dp_group), dist.get_rank(dp_group)
    if batch_size % dp:
        raise ValueError(f"--batch-size {batch_size} must be divisible by the data-parallel size {dp}")
    # the same stream on every TP/PP rank of a replica (sampling must agree), different across DP
    generator = seeds.generator(seed, "eval_sampling", dp_rank)
    device = distributed.device()
    records: List[dict] = []
    for batch in eval_batches(dataset, batch_size, pad_token_id=scorers.pad_token_id, dp_rank=dp_rank, dp_size=dp):
        rollout = generate(actor, batch.input_ids.to(device), batch.lengths.to(device), sampling, generator)
        prompts, responses = decode_rollout(scorers.tokenizer, rollout)
        scored = score_responses(actor, rollout, prompts, responses, scorers, micro_batch_size)
        columns = {k: v.tolist() for k, v in scored.items()}  # one host sync per batch
        for row, valid in enumerate(batch.valid.tolist()):
            if not valid:
                continue
            rec = {"index": batch.indices[row], "prompt": prompts[row], "response": responses[row],
                   "group": batch.groups[row]}
            rec.update({k: col[row] for k, col in columns.items()})
            records.append(rec)
    if dp > 1:
        records = [r for part in collectives.all_gather_object(records, dp_group) for r in part]
    return sorted(records, key=lambda r: r["index"])


def evaluate_policy(actor: torch.nn.Module, datasets: Dict[str, PromptDataset], scorers: Scorers,
                    sampling: SamplingSettings, *, batch_size: int, micro_batch_size: int,
                    seed: int = 0) -> Dict[str, List[dict]]:
    """{set name: records} for every prompt set (see ``generate_and_score``)."""
    return {name: generate_and_score(actor, ds, scorers, sampling, batch_size=batch_size,
                                     micro_batch_size=micro_batch_size, seed=seed)
            for name, ds in datasets.items()}


# ---------------------------------------------------------------------------------------------
# Summaries (pure Python on records: testable without any model)
# ---------------------------------------------------------------------------------------------


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def _std(xs: Sequence[float]) -> float:
    """Population standard deviation (0 for a single value)."""
    if not xs:
        return float("nan")
    m = _mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / len(xs))


def _group_means(values: Sequence[float], labels: Sequence) -> Dict[str, float]:
    groups: Dict[str, List[float]] = {}
    for v, g in zip(values, labels):
        if g is not None:
            groups.setdefault(str(g), []).append(v)
    return {g: _mean(vs) for g, vs in sorted(groups.items())}


def summarize_scores(values: Sequence[float], known: Sequence[Optional[str]],
                     inferred: Optional[Sequence[int]] = None) -> dict:
    """mean, std, min, max; per known group (mean), the worst known group and the gap (best minus
    worst group mean); the same per inferred group when ``inferred`` is given."""
    out = {"mean": _mean(values), "std": _std(values), "min": min(values, default=float("nan")),
           "max": max(values, default=float("nan"))}
    for kind, labels in (("known", known), ("inferred", inferred)):
        if labels is None:
            continue
        means = _group_means(values, labels)
        if not means:
            continue
        worst = min(means, key=means.get)
        out[f"{kind}_groups"] = means
        out[f"worst_{kind}_group"] = worst
        out[f"worst_{kind}"] = means[worst]
        out[f"{kind}_gap"] = max(means.values()) - means[worst]
    return out


def primary_score(names: Sequence[str]) -> Optional[str]:
    for name in SCORE_NAMES:
        if name in names:
            return name
    return None


def summarize_set(records: Sequence[dict], known_group_map: Optional[Dict[str, str]] = None) -> dict:
    """One policy on one prompt set. ``known_group_map`` (known group -> coarser label, e.g.
    family -> easy/hard) adds the agreement of the inferred groups with those labels.

    Keys: n, response_length, scores {name: summarize_scores}, primary, {name}_minus_gold (the
    hacking gap of each non-gold score), kl_to_ref (mean, std, known_groups), known_groups
    {group: {n, response_length, kl_to_ref}}, inferred_groups {mass, crosstab, agreement,
    agreement_mapped} (with a critic)."""
    known = [r.get("group") for r in records]
    inferred = [r["inferred_group"] for r in records] if records and "inferred_group" in records[0] else None
    names = [n for n in SCORE_NAMES if records and n in records[0]]
    out: dict = {"n": len(records), "primary": primary_score(names),
                 "response_length": _mean([r["response_length"] for r in records]),
                 "scores": {n: summarize_scores([r[n] for r in records], known, inferred) for n in names}}
    if "gold" in names:
        for n in names:
            if n != "gold":
                out[f"{n}_minus_gold"] = _mean([r[n] - r["gold"] for r in records])
    if records and "kl_to_ref" in records[0]:
        kl = [r["kl_to_ref"] for r in records]
        out["kl_to_ref"] = {"mean": _mean(kl), "std": _std(kl), "known_groups": _group_means(kl, known)}
    per_known = {}
    for g in sorted({g for g in known if g is not None}):
        rows = [r for r in records if r.get("group") == g]
        entry = {"n": len(rows), "response_length": _mean([r["response_length"] for r in rows])}
        if "kl_to_ref" in rows[0]:
            entry["kl_to_ref"] = _mean([r["kl_to_ref"] for r in rows])
        per_known[g] = entry
    out["known_groups"] = per_known
    if inferred is not None:
        out["inferred_groups"] = inferred_group_summary(records, known_group_map)
    return out


def inferred_group_summary(records: Sequence[dict], known_group_map: Optional[Dict[str, str]] = None) -> dict:
    """How the critic's inferred groups relate to the known ones.

    mass {g: fraction of samples}; crosstab {known group: {g: count}}; agreement: accuracy of the
    inferred group against the known group under the best one-to-one relabelling (groups exist only
    up to permutation; with more known groups than inferred ones it is at most the share of the M
    largest known groups); agreement_mapped: the same against ``known_group_map`` labels.
    agreement_one_group / agreement_mapped_one_group: what putting every sample in one group scores
    (the largest label's share), the level below which the groups tell nothing."""
    M = len(records[0]["group_probs"]) if records else 0
    inferred = [int(r["inferred_group"]) for r in records]
    out: dict = {"num_groups": M,
                 "mass": {str(g): inferred.count(g) / len(records) for g in range(M)} if records else {}}
    known = [r.get("group") for r in records]
    crosstab: Dict[str, Dict[str, int]] = {}
    for k, g in zip(known, inferred):
        if k is not None:
            row = crosstab.setdefault(k, {str(i): 0 for i in range(M)})
            row[str(g)] += 1
    out["crosstab"] = dict(sorted(crosstab.items()))
    labelled = [(k, g) for k, g in zip(known, inferred) if k is not None]
    if labelled:
        labels = [k for k, _ in labelled]
        out["agreement"] = _agreement([g for _, g in labelled], labels, M)
        out["agreement_one_group"] = max(labels.count(k) for k in set(labels)) / len(labels)
        if known_group_map:
            mapped = [(known_group_map[k], g) for k, g in labelled if k in known_group_map]
            if mapped:
                labels = [k for k, _ in mapped]
                out["agreement_mapped"] = _agreement([g for _, g in mapped], labels, M)
                out["agreement_mapped_one_group"] = max(labels.count(k) for k in set(labels)) / len(labels)
    return out


def _agreement(inferred: Sequence[int], labels: Sequence[str], num_groups: int) -> float:
    names = sorted(set(labels))
    ids = torch.tensor([names.index(x) for x in labels])
    one_hot = torch.nn.functional.one_hot(torch.tensor(list(inferred)), num_groups).float()
    return float(assignment_agreement(one_hot, ids, max(len(names), num_groups)))


def win_tie_lose(a: Sequence[float], b: Sequence[float], tie_margin: float = 0.0,
                 groups: Optional[Sequence[Optional[str]]] = None) -> dict:
    """Pairwise judgement of two policies' responses to the same prompts (the paper's tables):
    a win when score_a - score_b > tie_margin, a loss when < -tie_margin, else a tie.

    Returns fractions {n, win, tie, lose} (and per known group under ``known_groups``)."""
    if len(a) != len(b):
        raise ValueError(f"win/tie/lose needs the same prompts for both policies; got {len(a)} and {len(b)} scores")
    if tie_margin < 0:
        raise ValueError(f"tie margin {tie_margin} must be >= 0")

    def count(pairs):
        n = len(pairs)
        win = sum(1 for x, y in pairs if x - y > tie_margin)
        lose = sum(1 for x, y in pairs if x - y < -tie_margin)
        return {"n": n, "win": win / n if n else float("nan"), "tie": (n - win - lose) / n if n else float("nan"),
                "lose": lose / n if n else float("nan")}

    out = count(list(zip(a, b)))
    if groups is not None:
        names = sorted({g for g in groups if g is not None})
        out["known_groups"] = {g: count([(x, y) for x, y, k in zip(a, b, groups) if k == g]) for g in names}
    return out


def compare_policies(records_a: Sequence[dict], records_b: Sequence[dict], judge: str,
                     tie_margin: float = 0.0) -> dict:
    """win/tie/lose of policy A against B on one prompt set, judged by score ``judge``."""
    by_index = {r["index"]: r for r in records_b}
    if sorted(by_index) != sorted(r["index"] for r in records_a):
        raise ValueError("the two policies were evaluated on different prompts; evaluate both on the same set")
    if records_a and judge not in records_a[0]:
        raise ValueError(f"judge {judge!r} is not among the scores of this evaluation")
    pairs = [(r, by_index[r["index"]]) for r in records_a]
    return win_tie_lose([ra[judge] for ra, _ in pairs], [rb[judge] for _, rb in pairs], tie_margin,
                        [ra.get("group") for ra, _ in pairs])


__all__ = [
    "Scorers", "compare_policies", "decode_rollout", "evaluate_policy", "generate_and_score",
    "inferred_group_summary", "primary_score", "score_responses", "sequence_kl", "summarize_scores",
    "summarize_set", "win_tie_lose",
]
