"""The KL coefficient of every sample is decided in ppo/kl_penalty.py: eta (fixed or the adaptive
controller), GIL's group scale, the place (reward or loss), and no KL at all for ppo_no_kl."""

import torch

from gil_megatron.algo.registry import get_algorithm
from gil_megatron.config import PPOSettings
from gil_megatron.ppo.kl_penalty import KLPenalty, sample_kl_coefficients


def test_sample_coefficients_per_algorithm_and_place():
    p_high = torch.tensor([1.0, 0.5, 0.0, 0.5])
    r, loss = sample_kl_coefficients(get_algorithm("ppo"), "reward", 0.1, p_high)
    assert torch.equal(r, torch.full((4,), 0.1)) and torch.equal(loss, torch.zeros(4))
    r, loss = sample_kl_coefficients(get_algorithm("gil"), "reward", 0.1, p_high)
    assert torch.allclose(r, 0.1 * p_high) and torch.equal(loss, torch.zeros(4))
    r, loss = sample_kl_coefficients(get_algorithm("gil"), "loss", 0.1, p_high, normalize=True)
    assert torch.equal(r, torch.zeros(4)) and torch.allclose(loss, 0.2 * p_high)  # mean p_high = 0.5
    r, loss = sample_kl_coefficients(get_algorithm("gil_no_group_kl"), "reward", 0.1, p_high)
    assert torch.equal(r, torch.full((4,), 0.1))
    r, loss = sample_kl_coefficients(get_algorithm("ppo_no_kl"), "reward", 0.1, p_high)
    assert not r.any() and not loss.any()


def test_eta_fixed_adaptive_and_absent():
    fixed = KLPenalty(get_algorithm("gil"), PPOSettings(kl_coef=0.05))
    fixed.update(kl_mean=100.0, n_samples=64)
    assert fixed.eta == 0.05 and fixed.metrics() == {"kl/coef": 0.05}

    # Ziegler's controller: KL above target raises eta by at most a factor 1 + 0.2 * n / horizon
    adaptive = KLPenalty(get_algorithm("ppo"), PPOSettings(kl_coef=0.05, target_kl=2.0, kl_horizon=640))
    adaptive.update(kl_mean=8.0, n_samples=64)
    assert adaptive.eta == 0.05 * (1 + 0.2 * 64 / 640)
    adaptive.update(kl_mean=1.0, n_samples=64)  # below target: eta falls (error -0.5 clipped to -0.2)
    assert adaptive.eta == 0.05 * (1 + 0.2 * 64 / 640) * (1 - 0.2 * 64 / 640)
    restored = KLPenalty(get_algorithm("ppo"), PPOSettings(kl_coef=0.05, target_kl=2.0, kl_horizon=640))
    restored.load_state_dict(adaptive.state_dict())
    assert restored.eta == adaptive.eta

    none = KLPenalty(get_algorithm("ppo_no_kl"), PPOSettings(kl_coef=0.05, target_kl=2.0))
    none.update(kl_mean=8.0, n_samples=64)
    assert none.eta == 0.0 and none.metrics() == {} and none.state_dict() == {}
