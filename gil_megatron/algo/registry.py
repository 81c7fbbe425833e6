"""The algorithm registry: what each ``algo:`` of the config trains, as data.

An algorithm is an entry (not an ``if`` chain): its advantage estimator, whether a KL term exists,
which parts of GIL are on, and the options it fixes. The config validates ``algo`` against this
table; the PPO job (gil_megatron/ppo/) reads the entry. `python -m gil_megatron.algo.registry`
lists them.
"""

from dataclasses import dataclass, field
from typing import Dict, Mapping

from gil_megatron.algo.advantages import ADVANTAGE_ESTIMATORS


@dataclass(frozen=True)
class Algorithm:
    name: str
    summary: str
    advantage: str = "gae"
    """An estimator of algo/advantages.py (gae needs the critic; grpo, rloo, reinforce_pp do not)."""
    kl_penalty: bool = True
    """A KL term to the reference at all."""
    group_inference: bool = False
    """Infer groups on the critic (train its group head) and compute G, R_g, g_high, p_high."""
    group_kl: bool = False
    """GIL's group-scaled KL: sample i's KL coefficient is eta * p_high,i (the paper's "adaptive KL
    penalty"; independent of the adaptive KL controller, ppo.target_kl, which moves eta itself)."""
    invariance: str = "none"
    """none | weights (the group-invariant policy term as per-sample weights) | shuffled (the same
    weights randomly permuted within the batch: same step sizes, wrong samples; a control)."""
    fixed: Mapping[str, object] = field(default_factory=dict)
    """Config keys (dotted) this entry fixes: gil_v1's options, GRPO's KL in the loss, the
    critic-free estimators' own normalisation. config.load_config applies them; a user value that
    differs is a one-line error, never silently overridden."""

    def __post_init__(self):
        if self.advantage not in ADVANTAGE_ESTIMATORS:
            raise ValueError(f"algorithm {self.name!r}: unknown advantage estimator {self.advantage!r}")
        if self.group_inference and not self.uses_critic:
            raise ValueError(f"algorithm {self.name!r}: group inference needs the critic (advantage='gae')")
        if (self.group_kl or self.invariance != "none") and not self.group_inference:
            raise ValueError(f"algorithm {self.name!r}: group-scaled KL and the invariance term need group inference")
        unknown = [k for k in self.fixed if not k.startswith(("ppo.", "gil."))]
        if unknown:
            raise ValueError(f"algorithm {self.name!r} fixes {unknown}: only ppo.* and gil.* keys")

    @property
    def uses_critic(self) -> bool:
        return self.advantage == "gae"


ALGORITHMS: Dict[str, Algorithm] = {}


def register_algorithm(algo: Algorithm) -> Algorithm:
    if algo.name in ALGORITHMS:
        raise ValueError(f"algorithm {algo.name!r} is already registered")
    ALGORITHMS[algo.name] = algo
    return algo


def get_algorithm(name: str) -> Algorithm:
    if name not in ALGORITHMS:
        raise ValueError(f"unknown algo {name!r}; valid: {', '.join(ALGORITHMS)}")
    return ALGORITHMS[name]


GIL_V1 = {"gil.group_level": "response", "gil.performance": "whitened_score", "gil.variance": "unweighted",
          "gil.beta_policy": 1.0, "gil.weight_min": 0.0, "gil.weight_max": None, "gil.min_group_mass": 0.1}
# algorithms that were renamed: old name -> new (config validation names the new one)
RENAMED_ALGORITHMS = {"gil_no_adaptive_kl": "gil_no_group_kl"}

register_algorithm(Algorithm("ppo", "PPO with a KL penalty (fixed or adaptive controller)"))
register_algorithm(Algorithm("ppo_no_kl", "PPO without any KL term", kl_penalty=False))
register_algorithm(Algorithm("gil", "GIL-PPO (v2): group inference, invariance weights, group-scaled KL",
                             group_inference=True, group_kl=True, invariance="weights"))
register_algorithm(Algorithm("gil_v1", "GIL-PPO as first built: " + ", ".join(f"{k}={v}" for k, v in GIL_V1.items()),
                             group_inference=True, group_kl=True, invariance="weights", fixed=GIL_V1))
register_algorithm(Algorithm("gil_no_group_kl", "GIL without the group-scaled KL (every sample's coefficient is eta)",
                             group_inference=True, invariance="weights"))
register_algorithm(Algorithm("gil_no_invariance", "GIL without the invariance term (group-scaled KL only)",
                             group_inference=True, group_kl=True))
register_algorithm(Algorithm("gil_shuffled_weights", "GIL with its invariance weights permuted within the batch",
                             group_inference=True, group_kl=True, invariance="shuffled"))
# critic-free baselines (need rollout.n_samples_per_prompt > 1)
register_algorithm(Algorithm("grpo", "GRPO: group-normalised outcome advantages over n samples, KL in the loss",
                             advantage="grpo", fixed={"ppo.kl_in": "loss", "ppo.whiten_advantages": False}))
register_algorithm(Algorithm("rloo", "RLOO: leave-one-out baseline over n samples per prompt",
                             advantage="rloo", fixed={"ppo.whiten_advantages": False}))
register_algorithm(Algorithm("reinforce_pp", "REINFORCE++: per-token KL in the reward, batch-whitened returns",
                             advantage="reinforce_pp", fixed={"ppo.kl_in": "reward", "ppo.whiten_advantages": False}))


def main() -> None:
    width = max(len(n) for n in ALGORITHMS)
    for name, algo in ALGORITHMS.items():
        print(f"{name:<{width}}  {algo.summary}")


if __name__ == "__main__":
    main()
