"""gil_megatron: model-parallel RLHF on megatron-core with Group Invariant Learning PPO."""

__version__ = "0.1.0"

from gil_megatron import quiet as _quiet  # noqa: E402  known-harmless third-party warnings, before any import makes them

_quiet.apply()
