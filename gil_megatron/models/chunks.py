"""A model on one pipeline rank as a list of chunks (megatron's virtual pipeline).

With parallel.virtual_pp = V > 1 every pipeline rank r holds V model chunks; chunk v holds the
layers of virtual stage v * pp + r (megatron's interleaved assignment, its
``get_transformer_layer_offset``), so a token passes rank 0 chunk 0, rank 1 chunk 0, ...,
rank pp-1 chunk 0, rank 0 chunk 1, ... Chunk 0 of rank 0 embeds; chunk V-1 of rank pp-1 holds the
final norm and the head. Without a virtual pipeline a model is one chunk (a plain LlamaModel).
"""

from typing import List, Tuple

import torch


class ModelChunks(torch.nn.ModuleList):
    """This rank's chunks of one model, in vp_stage order. Reads like one model where callers
    need that: ``arch``, ``role``, ``config`` (shared by the chunks), ``detach_group_trunk``;
    ``parameters()``, ``eval()``, ``train()``, ``to()`` cover every chunk."""

    @property
    def arch(self):
        return self[0].arch

    @property
    def role(self) -> str:
        return self[0].role

    @property
    def config(self):
        return self[0].config

    @property
    def detach_group_trunk(self) -> bool:
        return self[0].detach_group_trunk

    @detach_group_trunk.setter
    def detach_group_trunk(self, value: bool) -> None:
        for chunk in self:
            chunk.detach_group_trunk = value


def model_chunks(model: torch.nn.Module) -> List[torch.nn.Module]:
    """A model's chunks as a list: the members of a ModelChunks (or of a ModuleList of
    DDP-wrapped chunks), or ``[model]`` for a model that is one contiguous stage."""
    return list(model) if isinstance(model, torch.nn.ModuleList) else [model]


def stage_of_chunk(chunk: torch.nn.Module, pp_rank: int) -> Tuple[int, int]:
    """(stage, stages): the stage this chunk of pipeline rank ``pp_rank`` holds in a plain pipeline
    of pp * V equal stages, from megatron's own layer offset (V = 1: (pp_rank, pp))."""
    config = chunk.config
    pp = config.pipeline_model_parallel_size
    vp = config.virtual_pipeline_model_parallel_size or 1
    if vp == 1:
        return pp_rank, pp
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    offset = get_transformer_layer_offset(config, vp_stage=chunk.vp_stage, pp_rank=pp_rank)
    return offset // (config.num_layers // (pp * vp)), pp * vp
