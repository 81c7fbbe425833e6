"""ObjectiveParams for tests that set a few settings by name (tests/ppo, tests/models)."""

import dataclasses

from gil_megatron.config import GILSettings, PPOSettings
from gil_megatron.ppo.objectives import ObjectiveParams

_PPO = {f.name for f in dataclasses.fields(PPOSettings)}
_GIL = {f.name for f in dataclasses.fields(GILSettings)}


def make_params(**settings) -> ObjectiveParams:
    """``make_params(kl_in="loss", beta_policy=0.5)``: each name goes to the config section that has
    it (ppo.* or gil.*); gil's entropy bonus is ``group_entropy_coef`` (ppo has its own entropy_coef)."""
    ppo, gil = {}, {}
    for name, value in settings.items():
        if name == "group_entropy_coef":
            gil["entropy_coef"] = value
        elif name in _PPO:
            ppo[name] = value
        elif name in _GIL:
            gil[name] = value
        else:
            raise TypeError(f"no ppo.{name} or gil.{name} setting")
    return ObjectiveParams(ppo=PPOSettings(**ppo), gil=GILSettings(**gil))
