"""The operators on DTensor lists (FSDP2 ``fully_shard`` parameters and gradients, tensor
parallelism): registered with ``torch.library.register_torch_dispatch``, so both
``roga_cuda.ops.*`` and ``torch.ops.roga_cuda.*`` accept DTensors.

* Element-wise ops (``perturb_``, ``restore_``, ``restore_accumulate_``, ``combine_``, the
  fused updates ``sgd_``/``adam_``) run on the local shards: tensors at one position of the
  lists must share their mesh and placements, so their shards line up. The updates' step
  counts and the tensor scalars (scale, weights, lr, found_inf) are plain tensors or
  replicated DTensors (the same value on every rank).
* Reductions (``norm``, ``gram``) are a local result plus one all-reduce over the mesh
  dimensions some tensor is sharded on. A tensor replicated over a reduced dimension counts
  once: only ranks at coordinate 0 of that dimension contribute it. The result is a
  replicated DTensor.
* A list mixing DTensors and plain tensors, and Partial placements (a pending reduction,
  whose local values are not the tensor's), are refused with a clear error.
"""
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Partial, Replicate

_ELEMENTWISE = ("perturb_", "asam_perturb_", "restore_", "restore_accumulate_", "combine_", "sgd_", "adam_")
# Arguments that are K tensor lists of one length, concatenated (the schema's Tensor[]).
_STACKED = {"gram": "lists", "combine_": "lists", "sgd_": "grads", "adam_": "grads"}
# Per-parameter lists that are not sharded like the parameters: the updates' step counts.
_COUNTS = ("steps",)


# Placements already found free of Partial, by id (the tuples are kept alive so that ids stay
# unique). FSDP gives a parameter and its gradients one spec, so a step checks nothing twice.
_CHECKED = {}


def _check_placements(op, name, placements):
    if id(placements) in _CHECKED:
        return
    if any(isinstance(p, Partial) for p in placements):
        raise ValueError(f"{op}: {name} has a Partial placement (a pending reduction: its local values "
                         "are not the tensor's); redistribute it to Shard or Replicate first")
    if len(_CHECKED) > 4096:
        _CHECKED.clear()
    _CHECKED[id(placements)] = placements


def _unwrap_list(op, name, lst, ref=None):
    """Local shards of a DTensor list, and their specs. ``ref`` (the first list's specs) fixes
    mesh and placements per position; the first list itself is checked for Partial."""
    out, specs = [], []
    for i, t in enumerate(lst):
        if not isinstance(t, DTensor):
            raise TypeError(f"{op}: {name}[{i}] is a plain tensor but other tensors of the call are DTensors; "
                            "give DTensors everywhere (e.g. the parameters and gradients of one fully_shard model) "
                            "or plain tensors everywhere")
        spec = t._spec
        if ref is None:
            _check_placements(op, f"{name}[{i}]", spec.placements)
        else:
            r = ref[i]
            if spec is not r and (spec.placements != r.placements or (spec.mesh is not r.mesh and spec.mesh != r.mesh)):
                raise ValueError(f"{op}: {name}[{i}] is placed {spec.placements} on {spec.mesh} but the tensor at its "
                                 f"position in the first list is placed {r.placements} on {r.mesh}; tensors at one "
                                 "position must share their sharding")
        out.append(t._local_tensor)
        specs.append(spec)
    return out, specs


def _replicated_value(op, name, x):
    """A value every rank holds whole: a plain tensor as is, a replicated DTensor's local
    tensor; a sharded DTensor is refused (each rank would read a different part)."""
    if not isinstance(x, DTensor):
        return x
    _check_placements(op, name, x.placements)
    if not all(isinstance(p, Replicate) for p in x.placements):
        raise ValueError(f"{op}: {name} is a DTensor placed {x.placements}; a scalar or per-parameter count "
                         "must be a plain tensor or a replicated DTensor")
    return x._local_tensor


def _unwrap_args(func, args, kwargs):
    """Local shards for every tensor-list argument (checked against the first list), local
    values for tensor scalars and step counts, everything else as is; all of the schema's
    arguments, defaults filled in."""
    op = func._schema.name.split("::")[-1]
    schema_args = func._schema.arguments
    # every argument, in schema order: the dispatcher leaves trailing defaults out of args
    bound = list(args) + [kwargs[a.name] if a.name in kwargs else a.default_value if a.has_default_value() else None
                          for a in schema_args[len(args):]]
    ref, out = None, []  # ref: the first list's specs
    for a, v in zip(schema_args, bound):
        if isinstance(v, (list, tuple)) and v and isinstance(v[0], torch.Tensor):
            if a.name in _COUNTS:
                out.append([_replicated_value(op, f"{a.name}[{i}]", t) for i, t in enumerate(v)])
            elif _STACKED.get(op) == a.name:
                n = len(ref) if ref is not None else len(v) // args[1]  # gram: n = total / k
                local = []
                for k in range(len(v) // n):
                    shards, specs = _unwrap_list(op, f"{a.name}[{k}]", v[k * n:(k + 1) * n], ref)
                    local += shards
                    ref = ref or specs
                out.append(local)
            else:
                shards, specs = _unwrap_list(op, a.name, v, ref)
                out.append(shards)
                ref = ref or specs
        else:
            out.append(_replicated_value(op, a.name, v))
    return op, out, ref


# ---------------------------------------------------------------- reductions

def _reduction_plan(specs):
    """(mesh, dims, mask): the mesh dimensions to sum over (those some tensor is not
    replicated on; over the others every rank holds the whole result already), and per tensor
    whether this rank counts it: a tensor replicated over a summed dimension counts only at
    coordinate 0 of that dimension, so once."""
    mesh = specs[0].mesh
    by_placements = {}  # the few distinct placements, by id
    for sp in specs:
        if sp.mesh is not mesh and sp.mesh != mesh:
            raise ValueError("roga_cuda reductions need every DTensor of one call on one device mesh, got "
                             f"{mesh} and {sp.mesh}")
        by_placements.setdefault(id(sp.placements), sp.placements)
    kinds = list(by_placements.values())
    dims = [d for d in range(mesh.ndim) if any(not isinstance(pl[d], Replicate) for pl in kinds)]
    coord = mesh.get_coordinate()
    counts = {key: all(coord[d] == 0 for d in dims if isinstance(pl[d], Replicate))
              for key, pl in by_placements.items()}
    return mesh, dims, [counts[id(sp.placements)] for sp in specs]


def _all_reduce(x, mesh, dims):
    """Sums x over mesh dimensions ``dims``: one collective when they span the mesh (the
    mesh's own group, or the default group when the mesh is the whole world) or are one
    dimension; otherwise one per dimension."""
    if not dims:
        return x
    if len(dims) == 1:
        group = mesh.get_group(dims[0])
    elif len(dims) == mesh.ndim and mesh.size() == dist.get_world_size():
        group = None  # the default group spans the mesh
    else:
        for d in dims:
            dist.all_reduce(x, group=mesh.get_group(d))
        return x
    dist.all_reduce(x, group=group)
    return x


def _replicated(local, mesh):
    return DTensor.from_local(local, mesh, [Replicate()] * mesh.ndim, run_check=False)


def _elementwise_rule(cls, func, types, args, kwargs):
    _, local_args, _ = _unwrap_args(func, args, kwargs or {})
    return func(*local_args)


def _norm_rule(cls, func, types, args, kwargs):
    op, local_args, specs = _unwrap_args(func, args, kwargs or {})
    asam = op == "asam_norm"
    per_tensor = bool(local_args[-1])
    mesh, dims, counted = _reduction_plan(specs)
    # Local per-tensor norms (one kernel call), then one all-reduce of their masked squares.
    call = list(local_args)
    call[-1] = True
    _, per = func(*call) if asam else func(local_args[0], True)
    mask = torch.tensor(counted, dtype=torch.float64, device=per.device)
    sq = per.double().square() * mask
    sq = _all_reduce(torch.cat([sq, sq.sum().reshape(1)]), mesh, dims)
    total = sq[-1].sqrt().to(per.dtype)
    per = sq[:-1].sqrt().to(per.dtype) if per_tensor else per.new_empty(0)
    return _replicated(total, mesh), _replicated(per, mesh)


def _gram_rule(cls, func, types, args, kwargs):
    _, (flat, k), specs = _unwrap_args(func, args, kwargs or {})
    n = len(flat) // k
    mesh, dims, counted = _reduction_plan(specs)
    keep = [i for i in range(n) if counted[i]]
    if keep:
        G = func(flat if len(keep) == n else [flat[j * n + i] for j in range(k) for i in keep], k)
    else:  # nothing of this rank's counts: zeros of the result dtype
        dt = torch.float64 if any(t.dtype == torch.float64 for t in flat[:n]) else torch.float32
        G = torch.zeros(k, k, dtype=dt, device=flat[0].device)
    return _replicated(_all_reduce(G.contiguous(), mesh, dims), mesh)


_registered = False


def register():
    """Teaches the roga_cuda operators DTensor (once). roga_cuda.ops calls it the first time
    it meets a DTensor; call it yourself before using torch.ops.roga_cuda on DTensors if
    torch.distributed.tensor was imported after roga_cuda (importing it costs seconds, so
    roga_cuda does not import it up front)."""
    global _registered
    if _registered:
        return
    _registered = True
    for name in _ELEMENTWISE:
        torch.library.register_torch_dispatch(f"roga_cuda::{name}", DTensor, _elementwise_rule)
    for name in ("norm", "asam_norm"):
        torch.library.register_torch_dispatch(f"roga_cuda::{name}", DTensor, _norm_rule)
    torch.library.register_torch_dispatch("roga_cuda::gram", DTensor, _gram_rule)
