"""FSDP2 (``train.fsdp=true``) in the apps: sharding the model, BatchNorm statistics,
whole-model state dicts for the model files, and evaluation on a sharded model.

* :func:`shard_model` — ``fully_shard`` on each block (:func:`shard_units`), then on the root.
* :func:`sync_buffers` — FSDP2 shards parameters only: buffers (BatchNorm's running
  statistics) stay plain tensors that every rank updates from its own batches. The apps
  broadcast rank 0's before every validation, checkpoint and model file, which gives the
  statistics DDP has (it broadcasts rank 0's buffers at every forward): rank 0's running
  averages over rank 0's batches.
* :func:`full_state_dict` / :func:`load_full_state_dict` — the whole model, gathered on
  rank 0 (for ``best.pt``, ``final.pt``, ``model_avg.pt``, which load in one process), and
  back into a sharded model on every rank.
* :func:`forward_count` — every rank of a sharded model must run the same number of
  forward passes (each one all-gathers the parameters), so evaluation pads the ranks with
  fewer batches with throw-away ones.
"""
import math

import torch
import torch.distributed as dist
from torch import nn

from .runtime import world_size

__all__ = ["is_sharded", "shard_units", "shard_model", "sync_buffers", "full_state_dict", "load_full_state_dict",
           "forward_count"]


def _dtensor():
    from torch.distributed.tensor import DTensor
    return DTensor


def is_sharded(model):
    """Are ``model``'s parameters DTensors (an FSDP2 model)?"""
    DTensor = _dtensor()
    return any(isinstance(p, DTensor) for p in model.parameters())


def _has_params(m):
    return any(True for _ in m.parameters())


def shard_units(model):
    """The blocks to shard one by one: the root's children with parameters, and each element
    of a child ``nn.Sequential`` (ResNet stages, encoder stacks). Containers without a
    forward of their own (``ModuleList``, ``ModuleDict``, ``ParameterList``) stay with the
    root, whose forward reads them directly."""
    units = []
    for child in model.children():
        if isinstance(child, nn.Sequential):
            units += [m for m in child if _has_params(m)]
        elif isinstance(child, (nn.ModuleList, nn.ModuleDict, nn.ParameterList, nn.ParameterDict)):
            continue
        elif _has_params(child):
            units.append(child)
    return units


def shard_model(model, units=None, mesh=None):
    """``fully_shard`` each of ``units`` (default :func:`shard_units`), then ``model``: one
    all-gather per block in the forward pass, so only one block's whole parameters are live
    at a time. Needs a process group (one process is fine)."""
    from torch.distributed.fsdp import fully_shard
    for m in (shard_units(model) if units is None else units):
        fully_shard(m, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


@torch.no_grad()
def sync_buffers(model, src=0):
    """Copy rank ``src``'s buffers (BatchNorm statistics) to every rank: one broadcast per
    dtype and device. No-op in one process."""
    if world_size() <= 1:
        return
    DTensor = _dtensor()
    groups = {}
    for b in model.buffers():
        if not isinstance(b, DTensor) and b.numel():
            groups.setdefault((b.dtype, b.device), []).append(b)
    for bufs in groups.values():
        flat = torch.cat([b.reshape(-1) for b in bufs])
        dist.broadcast(flat, src)
        for b, v in zip(bufs, flat.split([b.numel() for b in bufs])):
            b.copy_(v.view_as(b))


def full_state_dict(model):
    """The whole model's state_dict: under FSDP gathered to CPU on rank 0 (an empty dict on
    the other ranks; every rank must call it), else ``model.state_dict()``."""
    from .training import unwrap_model
    if not is_sharded(model):
        return unwrap_model(model).state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state_dict(model, state):
    """Load a whole-model state_dict (e.g. ``best.pt``'s) into ``model``; under FSDP every
    rank passes the whole dict and keeps its shards."""
    from .training import unwrap_model
    if not is_sharded(model):
        unwrap_model(model).load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    # a copy: torch swaps the dict's tensors for the DTensor shards it makes of them
    set_model_state_dict(model, dict(state), options=StateDictOptions(full_state_dict=True))


def forward_count(n, batch_size, sharded):
    """Forward passes this rank runs to score ``n`` items split ``[rank::world]`` in batches
    of ``batch_size``: its own batch count, or under FSDP the largest over the ranks
    (rank 0's), so that every rank joins every parameter all-gather."""
    from .runtime import rank
    w, r = world_size(), rank()
    mine = len(range(r, n, w))
    if not sharded or n == 0:
        return math.ceil(mine / batch_size)
    return math.ceil(math.ceil(n / w) / batch_size)
