"""make_experience wired right: KL sign and per-sample coefficients, p_high on the HIGH group,
whitening, the GIL weights and the group head's targets. Each test is built so that a realistic
wiring bug (penalty on the wrong group, KL as a bonus, whitening dropped, weights not passed on)
fails it."""

import pytest
import torch

from gil_megatron.algo import gil, ppo
from gil_megatron.algo.registry import get_algorithm
from gil_megatron.ppo.experience import make_experience

from objective_params import make_params


def rollout_batch(N=8, T=6, M=2, seed=0):
    """A scored rollout batch with two clear groups: rows 0..N/2-1 high value, the rest low; the
    group head puts them in group 1 and group 0 respectively."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(N, T)
    for i in range(N):
        mask[i, 1 + i % 2: T - (i % 3)] = 1.0  # prompt ends at a varying position, ragged responses
    old = -torch.rand(N, T, generator=g) * mask
    ref = old - (0.05 + 0.2 * torch.rand(N, T, generator=g)) * mask  # old > ref: k1 KL > 0 everywhere
    high = torch.arange(N) < N // 2
    values = (torch.where(high, 1.0, -1.0)[:, None] + 0.1 * torch.randn(N, T, generator=g)) * mask
    logits = torch.stack([torch.where(high, -2.0, 2.0), torch.where(high, 2.0, -2.0)], 1)
    logits = logits + 0.3 * torch.randn(N, M, generator=g)
    scores = torch.randn(N, generator=g) + torch.where(high, 1.0, -1.0)
    # the critic's task value of each prompt: high rows high, on another scale than the value head's
    task_values = torch.where(high, 0.8, -0.6) + 0.1 * torch.randn(N, generator=g)
    return {"scores": scores, "raw_scores": scores, "old_logprobs": old, "ref_logprobs": ref, "values": values,
            "task_values": task_values, "action_mask": mask, "group_logits": logits, "oracle_group": high.long(),
            "known_group": high.long()}, high


def test_kl_is_a_penalty_on_every_response_token():
    batch, _ = rollout_batch()
    exp = make_experience(batch, get_algorithm("ppo"), make_params(), eta=0.1)
    mask = batch["action_mask"]
    assert torch.allclose(exp["kl"], (batch["old_logprobs"] - batch["ref_logprobs"]) * mask)
    last = ppo.last_token_index(mask)
    not_last = mask.clone()
    not_last[torch.arange(len(last)), last] = 0
    # r_t = -eta * KL_t < 0 before the end; the score is added at the last response token
    assert (exp["rewards"][not_last.bool()] < 0).all()
    assert torch.allclose(exp["rewards"].sum(-1), batch["scores"] - 0.1 * exp["kl"].sum(-1), atol=1e-6)
    assert torch.equal(exp["sample_kl_coef"], torch.full((8,), 0.1))
    no_kl = make_experience(batch, get_algorithm("ppo_no_kl"), make_params(), eta=0.1)
    assert torch.allclose(no_kl["rewards"].sum(-1), batch["scores"]) and (no_kl["sample_kl_coef"] == 0).all()


def test_group_scaled_kl_penalises_the_high_group_more():
    batch, high = rollout_batch()
    exp = make_experience(batch, get_algorithm("gil"), make_params(), eta=0.1)
    q = torch.softmax(batch["group_logits"], 1)
    assert torch.allclose(exp["p_high"], q[:, 1])  # group 1 holds the high-value prompts
    assert torch.allclose(exp["sample_kl_coef"], 0.1 * q[:, 1])
    assert exp["sample_kl_coef"][high].min() > exp["sample_kl_coef"][~high].max()
    normalised = make_experience(batch, get_algorithm("gil"), make_params(group_kl_normalize=True), eta=0.1)
    assert float(normalised["sample_kl_coef"].mean()) == pytest.approx(0.1)
    fixed = make_experience(batch, get_algorithm("gil_no_group_kl"), make_params(), eta=0.1)
    assert torch.equal(fixed["sample_kl_coef"], torch.full((8,), 0.1))


def test_kl_in_loss_moves_the_coefficient_out_of_the_reward():
    batch, high = rollout_batch()
    exp = make_experience(batch, get_algorithm("gil"), make_params(kl_in="loss"), eta=0.1)
    assert torch.allclose(exp["rewards"].sum(-1), batch["scores"])
    assert torch.allclose(exp["kl_loss_coef"], 0.1 * exp["p_high"]) and torch.equal(exp["kl_loss_coef"], exp["sample_kl_coef"])


def test_advantages_are_whitened_over_response_tokens():
    batch, _ = rollout_batch()
    mask = batch["action_mask"]
    exp = make_experience(batch, get_algorithm("ppo"), make_params(), eta=0.05)
    assert float(ppo.masked_mean(exp["advantages"], mask)) == pytest.approx(0.0, abs=1e-5)
    assert float(ppo.masked_var(exp["advantages"], mask)) == pytest.approx(1.0, abs=1e-3)
    raw = make_experience(batch, get_algorithm("ppo"), make_params(whiten_advantages=False), eta=0.05)
    rewards = ppo.compute_token_rewards(batch["scores"], raw["kl"], 0.05, mask)
    expected, returns = ppo.compute_gae(rewards, batch["values"], mask, 1.0, 0.95)
    assert torch.allclose(raw["advantages"], expected) and torch.allclose(raw["returns"], returns)


def test_performance_is_the_whitened_task_value_not_the_value_head():
    batch, high = rollout_batch()
    exp = make_experience(batch, get_algorithm("gil"), make_params(), eta=0.1)
    task = batch["task_values"]
    assert torch.allclose(exp["perf"], (task - task.mean()) / task.std(), atol=1e-5)
    assert exp["perf"][high].min() > exp["perf"][~high].max()
    first = batch["action_mask"].argmax(1)
    v_prompt = batch["values"][torch.arange(8), first]  # the value head's V(x): returns with the KL penalty in them
    assert not torch.allclose(exp["perf"], (v_prompt - v_prompt.mean()) / v_prompt.std(), atol=1e-2)


def test_oracle_g_and_the_groups_do_not_depend_on_the_kl_penalty():
    """G is a function of the task reward only: the same rollout batch made into experience with
    two different eta, and with the group-scaled KL normalised or not, gives identical G, group
    means, high group, p_high, group-head targets and task-value targets; the value head's returns
    (which carry -eta_i KL_t) do change, so the penalty is really there."""
    from gil_megatron.algo.gil import PERFORMANCE_MODES

    batch, _ = rollout_batch()
    q = torch.softmax(batch["group_logits"], 1)
    for mode in PERFORMANCE_MODES:
        for inference in ("head", "exact"):
            a = make_experience(batch, get_algorithm("gil"), make_params(performance=mode, inference=inference),
                                eta=0.01)
            b = make_experience(batch, get_algorithm("gil"), make_params(performance=mode, inference=inference,
                                                                         group_kl_normalize=True), eta=1.0)
            for key in ("perf", "group_coeffs", "p_high", "task_returns"):
                assert torch.equal(a[key], b[key]), (mode, inference, key)
            means_a = gil.centred_group_means(q, a["perf"])[1]
            assert torch.equal(means_a, gil.centred_group_means(q, b["perf"])[1])
            assert int(gil.high_group(means_a)) == int(gil.high_group(gil.centred_group_means(q, b["perf"])[1]))
            assert not torch.allclose(a["returns"], b["returns"]), mode


def test_task_returns_are_the_discounted_task_reward_without_kl():
    batch, _ = rollout_batch()
    mask, gamma = batch["action_mask"], 0.9
    exp = make_experience(batch, get_algorithm("gil"), make_params(gamma=gamma), eta=0.5)
    assert torch.allclose(exp["task_returns"], gamma ** (mask.sum(1) - 1) * batch["scores"], atol=1e-6)


def test_invariance_weights_damp_the_high_group_and_are_bounded():
    batch, high = rollout_batch()
    params = make_params(beta_policy=0.25)
    exp = make_experience(batch, get_algorithm("gil"), params, eta=0.1)
    q = torch.softmax(batch["group_logits"], 1)
    raw = gil.group_invariant_weights(q, exp["perf"], 0.25)
    assert torch.allclose(exp["sample_weights"], raw.clamp(0.0, 2.0))
    assert exp["sample_weights"][high].max() < 1.0 < exp["sample_weights"][~high].min()
    big = make_experience(batch, get_algorithm("gil"), make_params(beta_policy=2.0), eta=0.1)
    assert big["sample_weights"].min() >= 0.0 and big["sample_weights"].max() <= 2.0
    assert float(big["weight_clip_frac"]) > 0
    for name in ("ppo", "gil_no_invariance"):
        assert torch.equal(make_experience(batch, get_algorithm(name), params, eta=0.1)["sample_weights"],
                           torch.ones(8))


def test_shuffled_weights_are_a_permutation_of_the_real_ones():
    batch, _ = rollout_batch()
    real = make_experience(batch, get_algorithm("gil"), make_params(), eta=0.1)["sample_weights"]
    shuffled = make_experience(batch, get_algorithm("gil_shuffled_weights"), make_params(), eta=0.1,
                               generator=torch.Generator().manual_seed(3))["sample_weights"]
    assert torch.equal(real.sort().values, shuffled.sort().values) and not torch.equal(real, shuffled)


def test_group_head_targets_ascend_the_variance():
    """One descent step of the critic's group term (q <- q - lr * c, c = dL_group/dq) raises V."""
    batch, _ = rollout_batch()
    for inference in ("head", "exact", "known"):
        exp = make_experience(batch, get_algorithm("gil"), make_params(inference=inference), eta=0.1)
        logits = batch["group_logits"].clone().requires_grad_(True)
        q = torch.softmax(logits, 1)
        (exp["group_coeffs"] * q).sum().backward()
        with torch.no_grad():
            before = gil.between_group_variance(torch.softmax(batch["group_logits"], 1), exp["perf"])
            after = gil.between_group_variance(torch.softmax(logits - 0.5 * logits.grad, 1), exp["perf"])
        assert after > before, inference


def test_known_inference_needs_mapped_groups():
    batch, _ = rollout_batch()
    batch["oracle_group"] = torch.full((8,), -1)
    with pytest.raises(ValueError, match="gil.known_groups"):
        make_experience(batch, get_algorithm("gil"), make_params(inference="known"), eta=0.1)


def test_mc_return_performance_is_the_whitened_discounted_task_return():
    """performance=mc_return: G_i = gamma^(L_i - 1) * raw_score_i (the Monte-Carlo return of the task
    reward at the first response token, no critic, no KL), whitened over the batch."""
    batch, _ = rollout_batch()
    mask = batch["action_mask"]
    gamma = 0.9
    exp = make_experience(batch, get_algorithm("gil"), make_params(performance="mc_return", gamma=gamma), eta=0.1)
    g = gamma ** (mask.sum(1) - 1) * batch["raw_scores"]
    assert torch.allclose(exp["perf"], (g - g.mean()) / g.std(), atol=1e-5)


def test_the_mass_hinge_reaches_the_group_head_targets():
    """With the unweighted variance the head is guarded by min_group_mass; a batch whose head puts
    almost no mass in group 0 gets targets that push mass back into it (and none without the hinge)."""
    batch, _ = rollout_batch()
    batch["group_logits"] = torch.tensor([[-6.0, 6.0]]).repeat(8, 1)
    hinge = make_params(variance="unweighted", min_group_mass=0.3, mass_penalty_coef=10.0)
    loose = make_params(variance="unweighted", min_group_mass=0.0)
    c_hinge = make_experience(batch, get_algorithm("gil"), hinge, eta=0.1)["group_coeffs"]
    c_loose = make_experience(batch, get_algorithm("gil"), loose, eta=0.1)["group_coeffs"]
    # a descent step q <- q - c raises group 0's batch mass only through the hinge
    assert (c_hinge[:, 0] - c_loose[:, 0]).max() < -0.5
    assert torch.allclose(c_hinge[:, 0] - c_loose[:, 0], torch.full((8,), -10.0 / 8), atol=1e-5)
