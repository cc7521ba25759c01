"""Input checks. Each check lives in one place:

* Python-level types and structure (is it a list of tensors, a list of lists of one length,
  a number or a tensor): here, for every backend, before anything else.
* Tensor-level checks (dtype, device, shape, layout, overlapping outputs, scalar tensors):
  csrc/checks.cpp, for every backend. The compiled kernels run them themselves; the Python
  backends (reference, foreach, triton) call them through ``roga_cuda._C.check_*``.
  ``_fallback_*`` below re-states them only for when the compiled module cannot be loaded
  (tests/test_ops_errors.py checks that both give the same messages).
"""
import numbers

import torch

try:
    from .. import _C as _C_mod
except Exception:  # missing, or built against another torch: native.py explains why
    _C_mod = None

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def compiled_checks():
    """The C++ check functions when the compiled module is usable, else None."""
    from . import native
    return _C_mod if native._C is not None else None


def _compiling():
    return torch.compiler.is_compiling()


# ---------------------------------------------------------------- Python-level structure

def tensor_list(op, name, x):
    """``x`` as a list of tensors (lists and tuples pass through; no per-element work)."""
    if type(x) is list or type(x) is tuple:
        return x
    if isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: `{name}` must be a list or tuple of tensors, not a single Tensor")
    try:
        return list(x)
    except TypeError:
        raise TypeError(f"{op}: `{name}` must be a list or tuple of tensors, got {type(x).__name__}") from None


def element_types(op, named):
    """Names the first element that is not a tensor (after a fast path failed on one)."""
    for name, lst in named:
        for i, t in enumerate(lst):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{op}: {name}[{i}] is a {type(t).__name__}, not a Tensor")


def list_of_lists(op, lists, n=None, ref="lists[0]", name="lists"):
    """K >= 1 tensor lists of one length (``n``, the length of ``ref``, when given)."""
    if isinstance(lists, torch.Tensor):
        raise TypeError(f"{op}: `{name}` must be a sequence of tensor lists, not a Tensor")
    try:
        lists = list(lists)
    except TypeError:
        raise TypeError(f"{op}: `{name}` must be a sequence of tensor lists, got {type(lists).__name__}") from None
    if not lists:
        raise ValueError(f"{op}: `{name}` is empty; give at least one tensor list")
    lists = [tensor_list(op, f"{name}[{k}]", l) for k, l in enumerate(lists)]
    if n is None:
        n = len(lists[0])
    for k, l in enumerate(lists):
        if len(l) != n:
            raise ValueError(f"{op}: `{name}[{k}]` has {len(l)} tensors but `{ref}` has {n}")
    return lists


def scalar(op, name, s):
    """A scalar argument as (float, None) or (0.0, tensor): the tensor's checks are the ops'."""
    if isinstance(s, torch.Tensor):
        if (type(s) is torch.Tensor and s.device.type == "cpu" and s.dim() == 0 and s.dtype.is_floating_point
                and not _compiling()):
            return float(s), None  # free: no device to synchronise with
        return 0.0, s.detach()
    if isinstance(s, numbers.Real) and not isinstance(s, bool):
        return float(s), None
    raise TypeError(f"{op}: `{name}` must be a number or a 0-d tensor, got {type(s).__name__}")


def weights(op, w, k, name="weights"):
    """combine_'s weights as (list of floats, None) or ([], 1-d tensor)."""
    if isinstance(w, torch.Tensor):
        if w.dim() != 1 or w.shape[0] != k:
            raise ValueError(f"{op}: `{name}` must hold {k} values (one per list), got shape {list(w.shape)}")
        return [], w.detach()
    try:
        ws = list(w)
    except TypeError:
        raise TypeError(f"{op}: `{name}` must be a sequence of {k} numbers or a 1-d tensor") from None
    if len(ws) != k:
        raise ValueError(f"{op}: got {len(ws)} {name} for {k} lists")
    pairs = [scalar(op, f"{name}[{j}]", x) for j, x in enumerate(ws)]
    if all(t is None for _, t in pairs):
        return [v for v, _ in pairs], None
    dev = next(t.device for _, t in pairs if t is not None)
    return [], torch.stack([t.reshape(()).float() if t is not None else torch.tensor(v, device=dev)
                            for v, t in pairs])


# ------------------------------------------------------------------ tensor-level checks

def validate(op, *args):
    """Runs op's tensor-level checks for a Python backend (see the module docstring):
    ``validate("perturb_", params, grads, backup, scale_tensor)`` and so on, with the
    arguments of ``roga_cuda._C.check_<op>``."""
    c = compiled_checks()
    if c is not None and not _compiling() and _plain(args):
        try:
            return getattr(c, f"check_{op}")(*args)
        except TypeError as e:  # pybind11 met a list element that is not a tensor: name it
            if "incompatible function arguments" in str(e):
                _name_non_tensors(op, args)
            raise
    _name_non_tensors(op, args)
    return _FALLBACK[op](*args, memory=not _compiling() and _plain(args))


_LIST_NAMES = {"norm": ("ts", "params"), "perturb_": ("params", "grads", "backup"), "restore_": ("params", "backup"),
               "restore_accumulate_": ("params", "backup", "acc", "grads"), "gram": ("lists",),
               "combine_": ("out", "lists"),
               "sgd_": ("params", "source", "grads", None, None, "grad_out", "momentum_buffers", "steps"),
               "adam_": ("params", "source", "grads", None, None, "grad_out", "exp_avgs", "exp_avg_sqs",
                         "max_exp_avg_sqs", "steps")}


def _name_non_tensors(op, args):
    named = []
    for name, a in zip(_LIST_NAMES[op], args):
        if name == "lists":
            named += [(f"lists[{k}]", l) for k, l in enumerate(a)]
        elif name is not None and isinstance(a, (list, tuple)):
            named.append((name, a))
    element_types(op, named)


def _plain(args):
    for a in args:
        for t in (a if isinstance(a, (list, tuple)) else [a]):
            for u in (t if isinstance(t, (list, tuple)) else [t]):
                if isinstance(u, torch.Tensor) and (type(u) is not torch.Tensor or u.device.type == "meta"):
                    return False
    return True


def _check_lists(op, named, written=(), alias_ok=False, allow_empty=True, memory=True, steps=()):
    """Python statement of csrc/checks.cpp check_lists (same order, same messages)."""
    (name0, first), *rest = named
    n = len(first)
    for name, lst in named:
        if len(lst) != n:
            raise ValueError(f"{op}: `{name}` has {len(lst)} tensors but `{name0}` has {n}")
    if n == 0:
        if not allow_empty:
            raise ValueError(f"{op}: `{name0}` is an empty list; there is nothing to reduce "
                             "(and no device to return a result on)")
        return None
    dev = first[0].device
    for name, lst in named:
        for i, t in enumerate(lst):
            if t.layout != torch.strided:
                raise TypeError(f"{op}: {name}[{i}] is a {_layout(t)} tensor; only dense (strided) tensors are supported")
            if t.dtype not in _FLOAT_DTYPES:
                raise TypeError(f"{op}: {name}[{i}] has dtype {_dtype(t.dtype)}; supported: float16, bfloat16, "
                                "float32, float64")
            if t.device != dev:
                raise ValueError(f"{op}: {name}[{i}] is on {t.device} but {name0}[0] is on {dev}; "
                                 "all tensors must be on one device")
            if memory and name in written:
                if t.is_inference() and not torch.is_inference_mode_enabled():
                    raise ValueError(f"{op}: {name}[{i}] is an inference tensor (made under torch.inference_mode()); "
                                     "it cannot be updated in place outside inference mode")
                if torch._debug_has_internal_overlap(t) == 1:
                    raise ValueError(f"{op}: {name}[{i}] has elements that share memory (e.g. an expanded view); "
                                     "it cannot be written")
            if name in steps:
                if t.numel() != 1 or t.dtype != torch.float32:
                    raise ValueError(f"{op}: {name}[{i}] must be a one-element float32 tensor (a step count), got "
                                     f"shape {list(t.shape)} and dtype {_dtype(t.dtype)}")
                continue
            if lst is first:
                continue
            r = first[i]
            if t.shape != r.shape:
                raise ValueError(f"{op}: {name}[{i}] has shape {list(t.shape)} but {name0}[{i}] has shape "
                                 f"{list(r.shape)}")
            if t.dtype != r.dtype:
                raise TypeError(f"{op}: {name}[{i}] has dtype {_dtype(t.dtype)} but {name0}[{i}] has "
                                f"{_dtype(r.dtype)}; tensors at one position must share a dtype")
    if memory:
        _check_overlaps(op, named, written, alias_ok)
    return dev


def _check_overlaps(op, named, written, alias_ok):
    spans = []  # (lo, hi, list name, position, written)
    for name, lst in named:
        for i, t in enumerate(lst):
            if t.numel():
                lo = t.data_ptr()
                span = 1 + sum((s - 1) * st for s, st in zip(t.shape, t.stride()))
                spans.append((lo, lo + span * t.element_size(), name, i, name in written, t))
    ws = sorted((s for s in spans if s[4]), key=lambda s: s[0])
    for a, b in zip(ws, ws[1:]):
        if b[0] < a[1]:
            _overlap_error(op, a, b, alias_ok)
    for r in spans:
        if r[4]:
            continue
        for w in ws:
            if w[0] < r[1] and r[0] < w[1]:
                exact = (w[3] == r[3] and w[0] == r[0] and w[5].shape == r[5].shape
                         and w[5].stride() == r[5].stride())
                if not (alias_ok and exact):
                    _overlap_error(op, w, r, alias_ok)


def _overlap_error(op, w, r, alias_ok):
    same_pos = w[3] == r[3]
    raise ValueError(f"{op}: {w[2]}[{w[3]}] shares memory with {r[2]}[{r[3]}]"
                     + (" without being the same tensor" if alias_ok and same_pos and not r[4] else "")
                     + ("" if same_pos else " (a written tensor may not overlap any other tensor of the call, "
                                            "e.g. a parameter listed twice)"))


def _check_scalar(op, name, t, dev):
    if t is None:
        return
    if t.dim() != 0:
        raise ValueError(f"{op}: `{name}` must be a Python number or a 0-d tensor, got shape {list(t.shape)}")
    if t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{op}: `{name}` has dtype {_dtype(t.dtype)}; use a real floating-point value")
    if dev is not None and t.device.type != "cpu" and t.device != dev:
        raise ValueError(f"{op}: `{name}` is on {t.device} but the tensors are on {dev}")


def _layout(t):
    return {torch.sparse_coo: "Sparse", torch.sparse_csr: "SparseCsr"}.get(t.layout, str(t.layout))


def _dtype(dt):
    # c10's names, as the C++ checks print them
    return {torch.float32: "Float", torch.float64: "Double", torch.float16: "Half", torch.bfloat16: "BFloat16",
            torch.int64: "Long", torch.int32: "Int", torch.bool: "Bool", torch.complex64: "ComplexFloat",
            torch.uint8: "Byte"}.get(dt, str(dt).replace("torch.", ""))


def _fb_norm(ts, params, *, memory):
    named = [("ts", ts)] + ([("params", params)] if params is not None else [])
    _check_lists("norm", named, allow_empty=False, memory=memory)


def _fb_perturb(p, g, b, s, *, memory):
    dev = _check_lists("perturb_", [("params", p), ("grads", g), ("backup", b)], ("params", "backup"), memory=memory)
    _check_scalar("perturb_", "scale", s, dev)


def _fb_restore(p, b, *, memory):
    _check_lists("restore_", [("params", p), ("backup", b)], ("params",), memory=memory)


def _fb_restore_acc(p, b, a, g, w, *, memory):
    dev = _check_lists("restore_accumulate_", [("params", p), ("backup", b), ("acc", a), ("grads", g)],
                       ("params", "acc"), memory=memory)
    _check_scalar("restore_accumulate_", "weight", w, dev)


def _fb_gram(lists, *, memory):
    _check_lists("gram", [(f"lists[{k}]", l) for k, l in enumerate(lists)], allow_empty=False, memory=memory)


def _fb_combine(out, lists, nweights, w, *, memory):
    named = [("out", out)] + [(f"lists[{k}]", l) for k, l in enumerate(lists)]
    dev = _check_lists("combine_", named, ("out",), alias_ok=True, memory=memory)
    _fb_weights("combine_", len(lists), nweights, w, dev)


def _fb_update(op, params, source, grads, nweights, wt, grad_out, states, steps, need_steps, lr_t, found_inf, memory):
    n = len(params)
    if (len(grads) % n != 0 or not grads) if n else grads:
        raise ValueError(f"{op}: `grads` holds {len(grads)} tensors, not K >= 1 lists of {n} tensors "
                         "(the length of `params`)")
    for name, ts, required in [("source", source, False), ("grad_out", grad_out, False),
                               ("steps", steps, need_steps)] + states:
        if not (len(ts) == 0 and (not required or n == 0) or len(ts) == n):
            raise ValueError(f"{op}: `{name}` has {len(ts)} tensors but `params` has {n}"
                             + ("" if required else " (give it empty to leave it out)"))
    for name, ts, required in states:
        if not required and len(ts):
            raise ValueError(f"{op}: `{name}` must be empty with these hyper-parameters, got {len(ts)} tensors")
    k = len(grads) // n if n else (wt.numel() if wt is not None else nweights)
    named = [("params", params)] + ([("source", source)] if len(source) else [])
    named += [(f"grads[{j}]", grads[j * n:(j + 1) * n]) for j in range(k)] if n else []
    named += [("grad_out", grad_out)] if len(grad_out) else []
    named += [(name, ts) for name, ts, _ in states if len(ts)]
    named += [("steps", steps)] if len(steps) else []
    written = {"params", "grad_out", "steps"} | {name for name, _, _ in states}
    dev = _check_lists(op, named, written, alias_ok=True, memory=memory, steps=("steps",))
    _fb_weights(op, k, nweights, wt, dev, direct_ok=True)
    _check_scalar(op, "lr", lr_t, dev)
    if found_inf is not None:
        if found_inf.numel() != 1 or not found_inf.is_floating_point():
            raise ValueError(f"{op}: `found_inf` must be a one-element floating-point tensor, got shape "
                             f"{list(found_inf.shape)} and dtype {_dtype(found_inf.dtype)}")
        if dev is not None and found_inf.device != dev and found_inf.device.type != "cpu":
            raise ValueError(f"{op}: `found_inf` is on {found_inf.device} but the tensors are on {dev}")


def _fb_weights(op, k, nweights, w, dev, direct_ok=False):
    # direct_ok (the updates): 2K weights too, the combination's row and then the direct row
    sizes = (k, 2 * k) if direct_ok else (k,)
    if w is None:
        if nweights not in sizes:
            raise ValueError(f"{op}: got {nweights} weights for {k} lists"
                             + (" (give K, or 2K with the direct row)" if direct_ok else ""))
        return
    if w.dim() != 1 or w.numel() not in sizes:
        raise ValueError(f"{op}: `weights` must hold {k}{' or 2K' if direct_ok else ''} values (one per list"
                         f"{', then the direct row' if direct_ok else ''}), got shape {list(w.shape)}")
    if not w.is_floating_point():
        raise TypeError(f"{op}: `weights` has dtype {_dtype(w.dtype)}; use a floating-point tensor")
    if dev is not None and w.device.type != "cpu" and w.device != dev:
        raise ValueError(f"{op}: `weights` is on {w.device} but the tensors are on {dev}")


def _fb_sgd(params, source, grads, nweights, wt, grad_out, bufs, steps, momentum, lr_t, found_inf, *, memory):
    _fb_update("sgd_", params, source, grads, nweights, wt, grad_out, [("momentum_buffers", bufs, momentum != 0)],
               steps, momentum != 0, lr_t, found_inf, memory)


def _fb_adam(params, source, grads, nweights, wt, grad_out, m, v, vmax, steps, amsgrad, lr_t, found_inf, *, memory):
    _fb_update("adam_", params, source, grads, nweights, wt, grad_out,
               [("exp_avgs", m, True), ("exp_avg_sqs", v, True), ("max_exp_avg_sqs", vmax, bool(amsgrad))],
               steps, True, lr_t, found_inf, memory)


_FALLBACK = {"norm": _fb_norm, "perturb_": _fb_perturb, "restore_": _fb_restore,
             "restore_accumulate_": _fb_restore_acc, "gram": _fb_gram, "combine_": _fb_combine,
             "sgd_": _fb_sgd, "adam_": _fb_adam}
