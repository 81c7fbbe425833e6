"""The KL coefficient of every sample: decided here and nowhere else.

Two mechanisms with two names (docs/design.md, "KL"):

    eta                the KL coefficient: ppo.kl_coef, fixed, or moved by the adaptive KL
                       controller of Ziegler et al. (2019) toward ppo.target_kl nats per sequence
                       (algo/ppo.py AdaptiveKLController). Logged as kl/coef.
    group-scaled KL    GIL's per-sample scale (the paper's "adaptive KL penalty"):
                       eta_i = eta * p_high,i, optionally divided by mean_i p_high,i
                       (gil.group_kl_normalize; algo/gil.py group_kl_coef). Logged as kl/sample_coef_mean.

A GIL run with ppo.target_kl set has both: the controller moves eta, the group scale spreads it
over the samples. ``ppo.kl_in`` puts each eta_i either in the per-token reward (-eta_i KL_t) or in
the policy loss; an algorithm without a KL term (ppo_no_kl) has eta_i = 0 and no controller.

The KL metrics of an iteration:
    kl/mean              mean over sequences of sum_t KL_t (ppo.kl_estimator) between the rollout
                         policy and the reference: what the controller steers
    kl/coef              the eta this iteration's batch used (only with a KL term)
    kl/sample_coef_mean  mean_i eta_i of this iteration's batch
"""

from typing import Dict, Tuple

import torch

from gil_megatron.algo import gil, ppo
from gil_megatron.algo.registry import Algorithm
from gil_megatron.config import PPOSettings


def sample_kl_coefficients(algo: Algorithm, kl_in: str, eta: float, p_high: torch.Tensor, normalize: bool = False
                           ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(in-reward coefficients [N], in-loss coefficients [N]) of a batch: eta_i in the place
    ``kl_in`` names (ppo.kl_in), zeros in the other; both zero without a KL term. ``p_high`` [N]
    is GIL's p_high,i (used only by algorithms with group-scaled KL)."""
    n = p_high.shape[0]
    zeros = torch.zeros(n)
    if not algo.kl_penalty:
        return zeros, zeros
    if algo.group_kl:
        coef = gil.group_kl_coef(eta, p_high, normalize=normalize)
    else:
        coef = torch.full((n,), float(eta))
    return (coef, zeros) if kl_in == "reward" else (zeros, coef)


class KLPenalty:
    """eta across iterations: the fixed value or the adaptive controller, updated once per
    iteration from the batch's kl/mean; its state travels with the checkpoint."""

    def __init__(self, algo: Algorithm, settings: PPOSettings):
        self.algo = algo
        self.controller = None
        if algo.kl_penalty:
            if settings.target_kl is not None:
                self.controller = ppo.AdaptiveKLController(settings.kl_coef, settings.target_kl, settings.kl_horizon)
            else:
                self.controller = ppo.FixedKLController(settings.kl_coef)

    @property
    def eta(self) -> float:
        """The current KL coefficient (0 without a KL term)."""
        return self.controller.value if self.controller is not None else 0.0

    def metrics(self) -> Dict[str, float]:
        """kl/coef: the eta of the current batch (nothing without a KL term)."""
        return {"kl/coef": self.eta} if self.controller is not None else {}

    def update(self, kl_mean: float, n_samples: int) -> None:
        """After an iteration: the adaptive controller moves eta toward ppo.target_kl."""
        if self.controller is not None:
            self.controller.update(kl_mean, n_samples)

    def state_dict(self) -> Dict[str, float]:
        return self.controller.state_dict() if self.controller is not None else {}

    def load_state_dict(self, state: Dict[str, float]) -> None:
        if self.controller is not None:
            self.controller.load_state_dict(state)
