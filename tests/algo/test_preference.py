"""Tests for gil_megatron/algo/preference.py: each loss against hand numbers or its closed form."""

import math

import pytest
import torch

from gil_megatron.algo import preference

pytestmark = pytest.mark.usefixtures("float64_default")  # tests/algo/conftest.py


def softplus(x: float) -> float:  # -log sigmoid(-x)
    return math.log1p(math.exp(x))


# --------------------------------------------------------------------------------------------
# SFT
# --------------------------------------------------------------------------------------------

# Two sequences: position t holds log p(token t+1). Row 0: prompt predicts position 0, response
# positions 1-2, then padding; row 1: response position 1 only. NLLs on the response: 1, 2 | 3.
LOGPROBS = torch.tensor([[-9.0, -1.0, -2.0, -9.0],
                         [-9.0, -3.0, -9.0, -9.0]], dtype=torch.float64)
MASK = torch.tensor([[0, 1, 1, 0],
                     [0, 1, 0, 0]], dtype=torch.bool)


def test_sft_loss_is_the_response_token_nll():
    loss, metrics = preference.sft_loss(LOGPROBS, MASK)
    assert loss.item() == pytest.approx((1 + 2 + 3) / 3)
    assert metrics["loss"].item() == pytest.approx(2.0)
    assert metrics["tokens"].item() == 3
    loss, _ = preference.sft_loss(LOGPROBS, MASK, mode="seq_mean_token_mean")
    assert loss.item() == pytest.approx(((1 + 2) / 2 + 3) / 2)
    loss, _ = preference.sft_loss(LOGPROBS, MASK, normalizer=6.0)  # the data-parallel denominator
    assert loss.item() == pytest.approx(6 / 6)


def test_sft_loss_ignores_prompt_and_padding_tokens():
    logprobs = LOGPROBS.clone().requires_grad_(True)
    loss, _ = preference.sft_loss(logprobs, MASK)
    loss.backward()
    assert torch.all(logprobs.grad[~MASK] == 0)
    assert torch.allclose(logprobs.grad[MASK], torch.full((3,), -1 / 3))
    changed = torch.where(MASK, LOGPROBS, torch.full_like(LOGPROBS, float("-inf")))  # even -inf off the mask
    assert preference.sft_loss(changed, MASK)[0].item() == pytest.approx(2.0)


# --------------------------------------------------------------------------------------------
# Reward model
# --------------------------------------------------------------------------------------------


def test_bradley_terry_hand_numbers():
    chosen = torch.tensor([2.0, 0.0, 1.0])
    rejected = torch.tensor([0.0, 0.0, 3.0])  # diffs 2, 0 (a tie), -2
    loss, m = preference.bradley_terry_loss(chosen, rejected)
    per_pair = [softplus(-2.0), math.log(2.0), softplus(2.0)]
    assert loss.item() == pytest.approx(sum(per_pair) / 3)
    assert m["accuracy"].item() == pytest.approx(1 / 3)  # a tie is not a win
    assert m["margin_mean"].item() == pytest.approx(0.0)
    assert m["chosen_mean"].item() == pytest.approx(1.0)
    assert m["rejected_mean"].item() == pytest.approx(1.0)

    loss, _ = preference.bradley_terry_loss(chosen, rejected, margin=1.0)
    assert loss.item() == pytest.approx((softplus(-1.0) + softplus(1.0) + softplus(3.0)) / 3)

    weights = torch.tensor([1.0, 1.0, 0.0])  # the last pair is eval filler
    loss, m = preference.bradley_terry_loss(chosen, rejected, weights=weights)
    assert loss.item() == pytest.approx((softplus(-2.0) + math.log(2.0)) / 2)
    assert m["accuracy"].item() == pytest.approx(0.5)
    loss, _ = preference.bradley_terry_loss(chosen, rejected, normalizer=6.0)
    assert loss.item() == pytest.approx(sum(per_pair) / 6)


def test_bradley_terry_gradient_pushes_scores_apart():
    chosen = torch.tensor([0.5], requires_grad=True)
    rejected = torch.tensor([0.5], requires_grad=True)
    preference.bradley_terry_loss(chosen, rejected)[0].backward()
    assert chosen.grad.item() == pytest.approx(-0.5)  # -sigmoid(-(0)) = -1/2
    assert rejected.grad.item() == pytest.approx(0.5)


# --------------------------------------------------------------------------------------------
# DPO
# --------------------------------------------------------------------------------------------


def test_sequence_logprobs_sum_the_response_tokens():
    assert torch.equal(preference.sequence_logprobs(LOGPROBS, MASK), torch.tensor([-3.0, -3.0]))


def test_dpo_loss_hand_numbers():
    pc, pr = torch.tensor([-1.0]), torch.tensor([-3.0])
    rc, rr = torch.tensor([-2.0]), torch.tensor([-2.0])
    loss, m = preference.dpo_loss(pc, pr, rc, rr, beta=0.5)  # h = 0.5 * ((1) - (-1)) = 1
    assert loss.item() == pytest.approx(softplus(-1.0))
    assert m["rewards/chosen"].item() == pytest.approx(0.5)
    assert m["rewards/rejected"].item() == pytest.approx(-0.5)
    assert m["rewards/margin"].item() == pytest.approx(1.0)
    assert m["accuracy"].item() == 1.0
    assert m["logps/chosen"].item() == -1.0 and m["logps/rejected"].item() == -3.0


def test_dpo_loss_equals_its_closed_form_and_gradient():
    torch.manual_seed(0)
    pc, pr, rc, rr = (torch.randn(5) * 3 for _ in range(4))
    pc.requires_grad_(True)
    pr.requires_grad_(True)
    rc.requires_grad_(True)
    beta = 0.1
    loss, m = preference.dpo_loss(pc, pr, rc, rr, beta)
    h = beta * ((pc - rc) - (pr - rr))
    assert torch.allclose(loss, -torch.nn.functional.logsigmoid(h).mean())
    assert m["accuracy"].item() == pytest.approx((h > 0).double().mean().item())
    loss.backward()
    expected = -beta * torch.sigmoid(-h.detach()) / 5  # d/d log pi(y_c|x)
    assert torch.allclose(pc.grad, expected)
    assert torch.allclose(pr.grad, -expected)
    assert rc.grad is None  # the reference is a constant


def test_dpo_loss_at_the_reference_is_log2():
    x = torch.tensor([-4.0, -7.0])
    loss, m = preference.dpo_loss(x, x.flip(0), x, x.flip(0), beta=0.3)
    assert loss.item() == pytest.approx(math.log(2.0))
    assert m["accuracy"].item() == 0.0


def test_shape_and_value_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"\[B\]"):
        preference.bradley_terry_loss(torch.zeros(2), torch.zeros(3))
    with pytest.raises(ValueError, match="four"):
        preference.dpo_loss(torch.zeros(2), torch.zeros(2), torch.zeros(2), torch.zeros(1), 0.1)
    with pytest.raises(ValueError, match="beta"):
        preference.dpo_loss(torch.zeros(2), torch.zeros(2), torch.zeros(2), torch.zeros(2), 0.0)
    with pytest.raises(ValueError, match="weights"):
        preference.bradley_terry_loss(torch.zeros(2), torch.zeros(2), weights=torch.ones(3))
