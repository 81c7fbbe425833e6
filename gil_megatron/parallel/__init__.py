"""The parallel plumbing, like megatron-core's parallel_state: process groups and the layout
(distributed.py), every collective with an explicit group (collectives.py), and megatron-core's few
CUDA assumptions patched only when CUDA is absent (cpu_compat.py)."""
