"""Advantage estimators against hand-computed numbers on 2 prompts x 3 samples (rows of the two
prompts interleaved, so grouping must follow prompt_index, not position)."""

import math

import pytest
import torch

from gil_megatron.algo import advantages as adv
from gil_megatron.algo.ppo import compute_gae

# prompt A: returns 1, 2, 3; prompt B: returns 0, 0, 3; rows interleaved A B A B A B
INDEX = torch.tensor([7, 4, 7, 4, 7, 4])
RETURNS = torch.tensor([1.0, 0.0, 2.0, 0.0, 3.0, 3.0])
MASK = torch.tensor([[1.0, 1.0, 0.0]] * 6)


def token_rewards():
    """Score at the last response token (index 1) minus a 0.1 KL penalty on each token."""
    r = torch.zeros(6, 3)
    r[:, 0] = -0.1
    r[:, 1] = RETURNS + 0.2 - 0.1  # so that the sequence return is exactly RETURNS
    return r


def run(name):
    return adv.get_advantage_estimator(name)(token_rewards(), torch.zeros(6, 3), MASK, INDEX, 1.0, 1.0)


def test_grpo():
    a, _ = run("grpo")
    s3 = math.sqrt(3.0)
    expected = torch.tensor([-1.0, -1 / s3, 0.0, -1 / s3, 1.0, 2 / s3])
    assert torch.allclose(a[:, 0], expected, atol=1e-5) and torch.equal(a[:, 0], a[:, 1]) and (a[:, 2] == 0).all()


def test_rloo():
    a, _ = run("rloo")
    assert torch.allclose(a[:, 0], torch.tensor([-1.5, -1.5, 0.0, -1.5, 1.5, 3.0]))
    single, _ = adv.rloo(token_rewards(), None, MASK, torch.arange(6), 1.0, 1.0)
    assert not single.any()  # one sample per prompt: no baseline, no signal


def test_reinforce_pp_whitens_discounted_returns_over_the_batch():
    a, returns = run("reinforce_pp")
    g1 = RETURNS + 0.1  # return-to-go at token 1 (score - 0.1 + 0.2); at token 0 it is the whole return
    assert torch.allclose(returns[:, 0], RETURNS) and torch.allclose(returns[:, 1], g1)
    tokens = torch.cat([RETURNS, g1])
    assert torch.allclose(a[:, :2].T.reshape(-1), (tokens - tokens.mean()) / tokens.std(), atol=1e-5)
    _, discounted = adv.reinforce_pp(token_rewards(), None, MASK, INDEX, 0.5, 1.0)
    assert torch.allclose(discounted[:, 0], -0.1 + 0.5 * g1)


def test_gae_is_the_critic_estimator():
    values = torch.rand(6, 3)
    assert all(torch.equal(x, y) for x, y in zip(adv.gae(token_rewards(), values, MASK, INDEX, 1.0, 0.9),
                                                   compute_gae(token_rewards(), values, MASK, 1.0, 0.9)))


def test_unknown_estimator_lists_the_valid_ones():
    with pytest.raises(ValueError, match="valid: gae, grpo, rloo, reinforce_pp"):
        adv.get_advantage_estimator("ppo")
