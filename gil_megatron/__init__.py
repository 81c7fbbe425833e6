"""gil_megatron: model-parallel RLHF on megatron-core with Group Invariant Learning PPO."""

__version__ = "0.1.0"
