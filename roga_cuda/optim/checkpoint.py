"""Sharded checkpoints of a wrapper optimizer with ``torch.distributed.checkpoint`` (DCP).

Under FSDP2 the parameters and the base optimizer's state (momentum, Adam moments) are
DTensors, so a checkpoint is written by every rank, its own shards only, and can be loaded
on another number of ranks. These two functions are torch's
``torch.distributed.checkpoint.state_dict.get_state_dict`` / ``set_state_dict`` applied to
the model and the *base* optimizer (parameter names as keys, state as DTensors), plus the
wrapper's own small state (PCGrad's GradVac targets, projection order and conflict
counters), which is the same on every rank and stored as one serialised object::

    from roga_cuda.optim.checkpoint import get_state_dict, set_state_dict
    import torch.distributed.checkpoint as dcp

    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)

    # resume: a fresh model (fully_shard as before) and optimizer
    load(model, opt, path)

which is ``get_state_dict`` (the template DCP fills), ``dcp.load`` and ``set_state_dict``,
with the template cut to the parameters that have optimizer state in the checkpoint (one
that never had a gradient before the save has none).

``get_state_dict`` on an optimizer that has not stepped yet creates its state the way torch
does (one base step with zero gradients and lr 0), so that the template has every key.

A plain ``torch.optim`` optimizer (no wrapper) is passed straight to torch's functions, so
one code path checkpoints every optimizer of a run.
"""
import io

import torch
from torch.distributed.checkpoint import state_dict as _dcp_sd

from .base import _AGGREGATORS

_WRAPPER = "roga_cuda_wrapper"


def get_state_dict(model, optimizer, *, options=None):
    """``(model_state_dict, optimizer_state_dict)`` for ``torch.distributed.checkpoint``.

    optimizer: a roga_cuda wrapper (SAM, RoGA, PCGrad, ...) of ``model``'s parameters.
    options: ``torch.distributed.checkpoint.state_dict.StateDictOptions`` (e.g. full state
    dicts instead of shards)."""
    if _plain(optimizer):
        return _dcp_sd.get_state_dict(model, optimizer, options=options)
    wrapper = optimizer.state_dict()["wrapper"]  # first: RoGA refuses mid-step, before anything changes
    model_sd, base_sd = _dcp_sd.get_state_dict(model, optimizer.base_optimizer, options=options)
    buf = io.BytesIO()
    torch.save({"type": type(optimizer).__name__, "wrapper": wrapper}, buf)
    base_sd[_WRAPPER] = buf.getvalue()
    return model_sd, base_sd


def set_state_dict(model, optimizer, model_state_dict, optim_state_dict, *, options=None):
    """Loads what :func:`get_state_dict` returned (after ``dcp.load`` filled it) into the
    model and the wrapper optimizer."""
    optim_state_dict = dict(optim_state_dict)
    if _plain(optimizer):
        if _WRAPPER in optim_state_dict:
            raise ValueError("set_state_dict: this checkpoint was saved by a roga_cuda wrapper optimizer, not a plain "
                             f"{type(optimizer).__name__}")
        _dcp_sd.set_state_dict(model, optimizer, model_state_dict=model_state_dict,
                               optim_state_dict=optim_state_dict, options=options)
        return
    blob = optim_state_dict.pop(_WRAPPER, None)
    if blob is None:
        raise ValueError(f"set_state_dict: the optimizer state has no {_WRAPPER!r} entry; it was not written by "
                         "roga_cuda.optim.checkpoint.get_state_dict")
    extra = torch.load(io.BytesIO(blob), weights_only=False)
    name = type(optimizer).__name__
    if extra["type"] != name and not (name in _AGGREGATORS and extra["type"] in _AGGREGATORS):
        raise ValueError(f"set_state_dict: this checkpoint was saved by a {extra['type']}, not a {name}")
    optimizer._check_extra_state(extra["wrapper"])
    _dcp_sd.set_state_dict(model, optimizer.base_optimizer, model_state_dict=model_state_dict,
                           optim_state_dict=optim_state_dict, options=options)
    optimizer._base_loaded(extra["wrapper"])


def load(model, optimizer, checkpoint_id, *, model_key="model", optim_key="optim"):
    """Load ``{model_key: ..., optim_key: ...}`` saved with ``dcp.save`` from
    :func:`get_state_dict` into ``model`` and ``optimizer`` (any number of ranks: DCP reshards).
    Every rank calls it."""
    import torch.distributed.checkpoint as dcp
    model_sd, optim_sd = get_state_dict(model, optimizer)
    saved = dcp.FileSystemReader(checkpoint_id).read_metadata().state_dict_metadata
    # the template holds state for every parameter; the checkpoint only for those that had a
    # gradient before it was saved (the others have none in the saved run either)
    kept = {fqn: st for fqn, st in optim_sd["state"].items()
            if all(f"{optim_key}.state.{fqn}.{k}" in saved for k in st)}
    # torch refuses missing optimizer state unless strict=False (which for the model would
    # also allow missing keys: none here, the template has them all and dcp.load filled them)
    options = _dcp_sd.StateDictOptions(strict=False) if len(kept) < len(optim_sd["state"]) else None
    optim_sd["state"] = kept
    state = {model_key: model_sd, optim_key: optim_sd}
    dcp.load(state, checkpoint_id=checkpoint_id)
    set_state_dict(model, optimizer, state[model_key], state[optim_key], options=options)


def _plain(optimizer):
    """A torch.optim optimizer rather than a roga_cuda wrapper of one?"""
    return not hasattr(optimizer, "base_optimizer")
