"""The operators on DTensor lists (FSDP2 ``fully_shard`` parameters and gradients, tensor
parallelism): registered with ``torch.library.register_torch_dispatch``, so both
``roga_cuda.ops.*`` and ``torch.ops.roga_cuda.*`` accept DTensors.

* Element-wise ops (``perturb_``, ``restore_``, ``restore_accumulate_``, ``combine_``, the
  fused updates) run on the local shards: tensors at one position must share their mesh and
  placements, so their shards line up.
* Reductions (``norm``, ``gram``) are a local result plus one all-reduce over the mesh. A
  tensor replicated over a mesh dimension counts once: only ranks at coordinate 0 of its
  replicated dimensions contribute it. The result is a replicated DTensor.
* A list mixing DTensors and plain tensors, and Partial placements (a pending reduction,
  whose local values are not the tensor's), are refused with a clear error.
"""
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Partial, Replicate

_ELEMENTWISE = ("perturb_", "asam_perturb_", "restore_", "restore_accumulate_", "combine_")
_REDUCTIONS = ("norm", "asam_norm", "gram")


def _unwrap_list(op, name, lst, ref=None):
    """Local shards of a DTensor list; ``ref`` (a list of DTensors) fixes mesh/placements per position."""
    out = []
    for i, t in enumerate(lst):
        if not isinstance(t, DTensor):
            raise TypeError(f"{op}: {name}[{i}] is a plain tensor but other tensors of the call are DTensors; "
                            "give DTensors everywhere (e.g. the parameters and gradients of one fully_shard model) "
                            "or plain tensors everywhere")
        if any(isinstance(p, Partial) for p in t.placements):
            raise ValueError(f"{op}: {name}[{i}] has a Partial placement (a pending reduction: its local values "
                             "are not the tensor's); redistribute it to Shard or Replicate first")
        if ref is not None and (t.device_mesh != ref[i].device_mesh or t.placements != ref[i].placements):
            raise ValueError(f"{op}: {name}[{i}] is placed {t.placements} on {t.device_mesh} but the tensor at its "
                             f"position in the first list is placed {ref[i].placements} on {ref[i].device_mesh}; "
                             "tensors at one position must share their sharding")
        out.append(t._local_tensor)
    return out


def _local(x):
    return x._local_tensor if isinstance(x, DTensor) else x


def _unwrap_args(func, args, kwargs):
    """Local shards for every tensor-list argument (checked against the first list), local
    values for tensor scalars, everything else as is."""
    op = func._schema.name.split("::")[-1]
    schema_args = func._schema.arguments
    bound = list(args) + [kwargs[a.name] for a in schema_args[len(args):] if a.name in kwargs]
    ref, out = None, []
    for a, v in zip(schema_args, bound):
        if isinstance(v, (list, tuple)) and v and isinstance(v[0], torch.Tensor):
            if op in ("gram", "combine_") and a.name == "lists":
                n = len(ref) if ref is not None else len(v) // args[1]  # combine_: len(out); gram: n = total / k
                out.append([t for k in range(len(v) // n)
                            for t in _unwrap_list(op, f"lists[{k}]", v[k * n:(k + 1) * n], ref or v[:n])])
                ref = ref or list(v[:n])
            else:
                out.append(_unwrap_list(op, a.name, v, ref))
                ref = ref or list(v)
        else:
            out.append(_local(v))
    return op, out, ref


def _mesh_groups(mesh):
    """Process groups whose all-reduces, in turn, sum over the whole mesh."""
    if mesh.ndim == 1:
        return [mesh.get_group()]
    return [mesh.get_group(d) for d in range(mesh.ndim)]


def _contributes(t):
    """Does this rank count DTensor ``t`` in a sum over the mesh? Only at coordinate 0 of
    the mesh dimensions over which ``t`` is replicated (it counts once per shard)."""
    coord = t.device_mesh.get_coordinate()
    return all(c == 0 for c, p in zip(coord, t.placements) if isinstance(p, Replicate))


def _replicated(local, mesh):
    return DTensor.from_local(local, mesh, [Replicate()] * mesh.ndim, run_check=False)


def _all_reduce(x, mesh):
    for g in _mesh_groups(mesh):
        dist.all_reduce(x, group=g)
    return x


def _elementwise_rule(cls, func, types, args, kwargs):
    _, local_args, _ = _unwrap_args(func, args, kwargs or {})
    return func(*local_args)


def _norm_rule(cls, func, types, args, kwargs):
    op, local_args, ref = _unwrap_args(func, args, kwargs or {})
    asam = op == "asam_norm"
    ts = local_args[0]
    per_tensor = bool(local_args[-1])
    # Local per-tensor norms (one kernel call), then one all-reduce of their masked squares.
    call = list(local_args)
    call[-1] = True
    _, per = func(*call) if asam else func(ts, True)
    mask = torch.tensor([1.0 if _contributes(t) else 0.0 for t in ref], dtype=per.dtype, device=per.device)
    sq = per.double().square() * mask.double()
    mesh = ref[0].device_mesh
    sq = _all_reduce(torch.cat([sq, sq.sum().reshape(1)]), mesh)
    total = sq[-1].sqrt().to(per.dtype)
    per = sq[:-1].sqrt().to(per.dtype) if per_tensor else per.new_empty(0)
    return _replicated(total, mesh), _replicated(per, mesh)


def _gram_rule(cls, func, types, args, kwargs):
    _, (flat, k), _ = _unwrap_args(func, args, kwargs or {})
    n = len(flat) // k
    keep = [i for i, t in enumerate(args[0][:n]) if _contributes(t)]
    mesh = args[0][0].device_mesh
    if keep:
        G = func([flat[j * n + i] for j in range(k) for i in keep], k)
    else:  # nothing of this rank's counts: zeros of the result dtype
        dt = torch.float64 if any(t.dtype == torch.float64 for t in flat[:n]) else torch.float32
        G = torch.zeros(k, k, dtype=dt, device=flat[0].device)
    return _replicated(_all_reduce(G.contiguous(), mesh), mesh)


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
