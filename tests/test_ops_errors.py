"""Bad input gets a ValueError/TypeError that names the problem, on every backend."""
import pytest
import torch

from roga_cuda import ops

from conftest import backend_cases

CASES = backend_cases()


def lists(n=3, dtype=torch.float32, device="cpu"):
    return [[torch.randn(4, 3, dtype=dtype, device=device) for _ in range(n)] for _ in range(4)]


@pytest.mark.parametrize("backend,device", CASES)
def test_length_mismatch(backend, device):
    p, g, b, _ = lists(device=device)
    with pytest.raises(ValueError, match=r"perturb_: `grads` has 2 tensors but `params` has 3"):
        ops.perturb_(p, g[:2], b, 1.0, backend=backend)
    with pytest.raises(ValueError, match=r"gram: `lists\[1\]` has 2 tensors but `lists\[0\]` has 3"):
        ops.gram([p, g[:2]], backend=backend)
    with pytest.raises(ValueError, match=r"combine_: `lists\[1\]` has 1 tensors but `out` has 3"):
        ops.combine_(p, [g, b[:1]], [1.0, 1.0], backend=backend)
    with pytest.raises(ValueError, match="`backup` has 0"):
        ops.restore_(p, [], backend=backend)


@pytest.mark.parametrize("backend,device", CASES)
def test_shape_mismatch(backend, device):
    p, g, b, _ = lists(device=device)
    g[1] = torch.randn(3, 4, device=device)
    with pytest.raises(ValueError, match=r"grads\[1\] has shape \[3, 4\]"):
        ops.perturb_(p, g, b, 1.0, backend=backend)
    with pytest.raises(ValueError, match="shape"):
        ops.norm(p, params=g, backend=backend)


@pytest.mark.parametrize("backend,device", CASES)
def test_dtype_problems(backend, device):
    p, g, b, _ = lists(device=device)
    g[2] = g[2].double()
    with pytest.raises(TypeError, match=r"perturb_: grads\[2\] has dtype Double but params\[2\] has Float"):
        ops.perturb_(p, g, b, 1.0, backend=backend)
    with pytest.raises(TypeError, match=r"norm: ts\[0\] has dtype Long; supported: float16"):
        ops.norm([torch.arange(5, device=device)], backend=backend)
    with pytest.raises(TypeError, match="dtype"):
        ops.norm([torch.randn(3, dtype=torch.complex64, device=device)], backend=backend)
    with pytest.raises(TypeError, match="dtype"):
        ops.gram([[torch.ones(3, dtype=torch.bool, device=device)]], backend=backend)


@pytest.mark.parametrize("backend,device", CASES)
def test_sparse(backend, device):
    s = torch.randn(4, 3, device=device).to_sparse()
    with pytest.raises(TypeError, match=r"norm: ts\[0\] is a Sparse tensor; only dense"):
        ops.norm([s], backend=backend)


@pytest.mark.parametrize("backend,device", CASES)
def test_mixed_devices(backend, device):
    a = torch.randn(3, device=device)
    m = torch.empty(3, device="meta")
    with pytest.raises(ValueError, match="device"):
        ops.norm([a, m], backend=backend)
    with pytest.raises(ValueError, match="device"):
        ops.restore_([a], [m], backend=backend)


@pytest.mark.parametrize("backend,device", CASES)
def test_not_lists(backend, device):
    t = torch.randn(3, device=device)
    with pytest.raises(TypeError, match="list"):
        ops.norm(t, backend=backend)
    with pytest.raises(TypeError, match="list"):
        ops.norm(3.0, backend=backend)
    with pytest.raises(TypeError, match=r"ts\[1\] is a float"):
        ops.norm([t, 1.0], backend=backend)
    with pytest.raises(TypeError):
        ops.gram(t, backend=backend)


@pytest.mark.parametrize("backend,device", CASES)
def test_overlapping_outputs(backend, device):
    p, g, _, _ = lists(device=device)
    with pytest.raises(ValueError, match="shares memory"):
        ops.perturb_(p, g, p, 1.0, backend=backend)  # backup is params
    base = torch.randn(13, device=device)
    with pytest.raises(ValueError, match="shares memory"):
        ops.combine_([base[1:13]], [[base[0:12]]], [1.0], backend=backend)  # out overlaps, is not the input


@pytest.mark.parametrize("backend,device", CASES)
def test_bad_scalars(backend, device):
    p, g, b, _ = lists(device=device)
    with pytest.raises(ValueError, match="0-d"):
        ops.perturb_(p, g, b, torch.ones(2, device=device), backend=backend)
    with pytest.raises(TypeError, match="scale"):
        ops.perturb_(p, g, b, "0.1", backend=backend)
    with pytest.raises(ValueError, match="weights"):
        ops.combine_(p, [g, b], [1.0], backend=backend)
    with pytest.raises(ValueError, match="weights"):
        ops.combine_(p, [g, b], torch.ones(3, device=device), backend=backend)
    with pytest.raises(ValueError, match="`scale` is on meta but the tensors are on"):
        ops.perturb_(p, g, b, torch.ones((), device="meta"), backend=backend)


def test_unknown_backend():
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        ops.norm([torch.randn(3)], backend="fast")


def test_backend_on_wrong_device():
    if not ops.backends()["cpu"]["available"]:
        pytest.skip(ops.backends()["cpu"]["reason"])
    with pytest.raises(ValueError, match="runs on cpu tensors"):
        ops.norm([torch.empty(3, device="meta")], backend="cpu")


def test_unavailable_backend_names_reason():
    info = ops.backends()
    missing = [n for n, i in info.items() if not i["available"]]
    if not missing:
        pytest.skip("every backend is available here")
    name = missing[0]
    with pytest.raises(RuntimeError, match="unavailable"):
        ops.norm([torch.randn(3)], backend=name)


@pytest.mark.parametrize("backend,device", CASES)
def test_overlap_across_positions(backend, device):
    """A written tensor may not overlap any other tensor of the call at *any* position: a
    parameter listed twice would otherwise be written twice (by racing threads on cpu)."""
    x = torch.randn(5, device=device)
    b1, b2 = torch.randn(5, device=device), torch.randn(5, device=device)
    before = x.clone()
    with pytest.raises(ValueError, match=r"restore_: params\[0\] shares memory with params\[1\] \(a written"):
        ops.restore_([x, x], [b1, b2], backend=backend)
    assert torch.equal(x, before)
    base = torch.randn(20, device=device)
    with pytest.raises(ValueError, match=r"perturb_: params\[0\] shares memory with params\[1\]"):
        ops.perturb_([base[:12], base[8:]], [b1.new_ones(12), b1.new_ones(12)], [b1.new_empty(12), b1.new_empty(12)],
                     1.0, backend=backend)
    with pytest.raises(ValueError, match=r"perturb_: backup\[1\] shares memory with grads\[0\] \(a written"):
        g = torch.randn(5, device=device)
        ops.perturb_([b1, b2], [g, g.clone()], [torch.empty(5, device=device), g], 1.0, backend=backend)
    with pytest.raises(ValueError, match=r"combine_: out\[\d\] shares memory with lists\[0\]\[\d\] \(a written"):
        ops.combine_([b1, b2], [[b2, b1]], [1.0], backend=backend)
    # read-only lists may share memory freely; out may be the input at its own position
    g = torch.randn(5, device=device)
    ops.perturb_([b1, b2], [g, g], [torch.empty(5, device=device), torch.empty(5, device=device)], 1.0,
                 backend=backend)
    ops.combine_([b1, b2], [[b1, b2], [g, g]], [1.0, 0.5], backend=backend)


@pytest.mark.parametrize("backend,device", CASES)
def test_overlap_verdicts_do_not_carry_over(backend, device):
    """The compiled backends reuse the sorted written ranges of a recent call that wrote the
    same tensors (an optimizer writes the same ones every step): a call that writes the same
    tensors but reads others, or writes one of them at another place, is checked again, and
    a refused call stays refused."""
    base = torch.randn(12, device=device)
    p = [base[0:4], base[4:8]]
    b = [torch.randn(4, device=device) for _ in range(2)]
    for _ in range(3):
        ops.restore_(p, b, backend=backend)
        with pytest.raises(ValueError, match=r"restore_: params\[\d\] shares memory with backup\[1\]"):
            ops.restore_(p, [b[0], base[1:5]], backend=backend)  # reads across two written tensors
        ops.combine_(p, [p, b], [1.0, 0.0], backend=backend)  # out may be its own input
        with pytest.raises(ValueError, match=r"combine_: out\[\d\] shares memory with lists\[0\]"):
            ops.combine_(p, [[p[1], p[0]], b], [1.0, 0.0], backend=backend)
        with pytest.raises(ValueError, match=r"combine_: out\[0\] shares memory with lists\[0\]\[0\] without"):
            ops.combine_(p, [[base[1:5], p[1]], b], [1.0, 0.0], backend=backend)
        ops.sgd_(p, [b], lr=0.0, backend=backend)
        with pytest.raises(ValueError, match=r"sgd_: params\[1\] shares memory with grads\[0\]\[0\]"):
            ops.sgd_(p, [[base[4:8], b[1]]], lr=0.0, backend=backend)
        # the same non-empty written range at another position (an empty tensor moved): the
        # exact alias at its own position is allowed in both calls
        e = base[:0]
        ops.combine_([e, p[0]], [[e, p[0]], [e, b[0]]], [1.0, 0.0], backend=backend)
        ops.combine_([p[0], e], [[p[0], e], [b[0], e]], [1.0, 0.0], backend=backend)


def _overlap_violation(named, alias_ok):
    """Brute force of the rule: a written tensor may share no byte with any other tensor of
    the call, except (alias_ok) a read tensor at its own position that is exactly it."""
    def span(t):
        lo = t.data_ptr()
        return lo, lo + t.numel() * t.element_size()
    flat = [(name, written, i, t) for name, written, ts in named for i, t in enumerate(ts) if t.numel() > 0]
    for a, (na, wa, ia, ta) in enumerate(flat):
        for b, (nb, wb, ib, tb) in enumerate(flat):
            if a == b or not wa:
                continue
            (la, ha), (lb, hb) = span(ta), span(tb)
            if la < hb and lb < ha:
                exact = ta.data_ptr() == tb.data_ptr() and ta.shape == tb.shape and ta.stride() == tb.stride()
                if not (alias_ok and not wb and ia == ib and exact):
                    return True
    return False


@pytest.fixture(params=[True, False], ids=["remembered", "always-checked"])
def overlap_memo(request):
    """The compiled backends' memo of checked written ranges, on (the default) and off."""
    from roga_cuda.ops import native
    if native._C is None:
        yield request.param
        return
    prev = native._C._remember_overlaps(request.param)
    try:
        yield request.param
    finally:
        native._C._remember_overlaps(prev)


@pytest.mark.parametrize("backend,device", CASES)
def test_overlap_rule_on_random_views(backend, device, overlap_memo):
    """Views of one buffer at random offsets and lengths, sometimes the very same view twice:
    perturb_ (no alias allowed), combine_ (out may be its own input) and sgd_ (grad_out,
    listed after the gradients, may be the gradient) refuse exactly the calls the
    brute-force rule refuses, in any address order of the lists."""
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(400, device=device)
    pool = [base[o:o + n] for o, n in torch.randint(0, 200, (60, 2), generator=gen).tolist()]

    def pick(n):
        return [pool[i] for i in torch.randint(0, len(pool), (n,), generator=gen).tolist()]

    refused = allowed = 0
    for trial in range(300):
        n = 1 + trial % 4
        p, g = pick(n), pick(n)
        g = [a if torch.rand((), generator=gen) < 0.5 else b[:a.numel()] if b.numel() >= a.numel()
             else torch.randn(a.numel(), device=device) for a, b in zip(p, g)]
        b = [torch.empty_like(a) if torch.rand((), generator=gen) < 0.7 else c[:a.numel()] if c.numel() >= a.numel()
             else torch.empty_like(a) for a, c in zip(p, pick(n))]
        for op, named, alias_ok, call in (
                ("perturb_", [("params", True, p), ("grads", False, g), ("backup", True, b)], False,
                 lambda: ops.perturb_(p, g, b, 0.0, backend=backend)),
                ("combine_", [("out", True, p), ("l0", False, g), ("l1", False, b)], True,
                 lambda: ops.combine_(p, [g, b], [1.0, 0.0], backend=backend)),
                # a written list after the read ones (grad_out may be the gradient at its position)
                ("sgd_", [("params", True, p), ("grads", False, g), ("grad_out", True, b)], True,
                 lambda: ops.sgd_(p, [g], lr=0.0, grad_out=b, backend=backend))):
            bad = _overlap_violation(named, alias_ok)
            for attempt in range(2):  # the second time, its written ranges may be reused
                try:
                    call()
                    ok = True
                except ValueError as e:
                    assert "shares memory" in str(e), str(e)
                    ok = False
                assert ok != bad, f"trial {trial} {op} (call {attempt + 1}): {'refused' if not ok else 'accepted'} " \
                                  f"a call the rule {'allows' if not bad else 'refuses'}"
            refused += bad
            allowed += not bad
    assert refused > 150 and allowed > 150  # both outcomes well covered


@pytest.mark.parametrize("backend,device", CASES)
def test_inference_tensors_refused_alike(backend, device):
    """Outside inference mode an inference tensor cannot be updated in place (as in torch):
    every backend says so the same way; inside inference mode it is fine."""
    with torch.inference_mode():
        p = torch.randn(4, device=device)
    g, b = torch.randn(4, device=device), torch.empty(4, device=device)
    with pytest.raises(ValueError, match=r"perturb_: params\[0\] is an inference tensor"):
        ops.perturb_([p], [g], [b], 1.0, backend=backend)
    with torch.inference_mode():
        ops.perturb_([p], [g], [b], 1.0, backend=backend)
        assert ops.norm([p], backend=backend).item() > 0


@pytest.mark.parametrize("backend", ["auto", "reference", "foreach"])
def test_meta_tensors_are_shapes_only(backend):
    """Meta tensors carry no data: ops on them check shapes and do nothing (no aliasing
    complaint about their all-zero data pointers)."""
    p = [torch.empty(3, 4, device="meta") for _ in range(2)]
    g = [torch.empty(3, 4, device="meta") for _ in range(2)]
    b = [torch.empty(3, 4, device="meta") for _ in range(2)]
    ops.perturb_(p, g, b, 0.1, backend=backend)
    ops.restore_(p, b, backend=backend)
    assert ops.norm(g, backend=backend).device.type == "meta"
    assert ops.gram([g, p], backend=backend).shape == (2, 2)
    with pytest.raises(ValueError, match=r"grads\[1\] has shape \[4\] but params\[1\] has shape \[3, 4\]"):
        ops.perturb_(p, [g[0], torch.empty(4, device="meta")], b, 0.1, backend=backend)


def _bad_calls():
    """(op, args for roga_cuda._C.check_<op>) with one problem each."""
    t = lambda *s, **k: torch.randn(*s, **k)  # noqa: E731
    x = t(6)
    return [
        ("norm", ([t(3), t(3, dtype=torch.float64).to(torch.int64)], None)),
        ("norm", ([], None)),
        ("norm", ([t(3)], [t(4)])),
        ("norm", ([t(3).to_sparse()], None)),
        ("perturb_", ([t(3)], [t(3)], [t(3)], torch.ones(2))),
        ("perturb_", ([t(3)], [t(3)], [t(3)], torch.ones((), dtype=torch.complex64))),
        ("perturb_", ([t(3)], [t(3, dtype=torch.float64)], [t(3)], None)),
        ("perturb_", ([x, x], [t(6), t(6)], [t(6), t(6)], None)),
        ("perturb_", ([x[:4]], [t(4)], [x[2:]], None)),
        ("restore_", ([t(3), t(3)], [t(3)])),
        ("restore_", ([t(3)], [t(3, device="meta")])),
        ("restore_", ([t(1).expand(3)], [t(3)])),
        ("restore_accumulate_", ([t(3)], [t(3)], [t(3)], [t(3)], torch.ones(3))),
        ("gram", ([[t(3)], [t(3, dtype=torch.float16)]],)),
        ("combine_", ([t(3)], [[t(4)]], 1, None)),
        ("combine_", ([x[:5]], [[x[1:]]], 1, None)),
        ("combine_", ([t(3)], [[t(3)], [t(3)]], 1, None)),
        ("combine_", ([t(3)], [[t(3)], [t(3)]], 0, torch.ones(3))),
        ("combine_", ([t(3)], [[t(3)]], 0, torch.ones(1, dtype=torch.int64))),
    ]


@pytest.mark.parametrize("case", range(len(_bad_calls())))
def test_fallback_checks_match_compiled(case):
    """The Python statement of the checks (used only when roga_cuda._C cannot be loaded)
    raises the same error type with the same message as the C++ checks."""
    from roga_cuda.ops import checks
    if checks.compiled_checks() is None:
        pytest.skip("compiled module not built")
    op, args = _bad_calls()[case]
    with pytest.raises((ValueError, TypeError)) as compiled:
        getattr(checks.compiled_checks(), f"check_{op}")(*args)
    with pytest.raises((ValueError, TypeError)) as fallback:
        checks._FALLBACK[op](*args, memory=True)
    assert type(compiled.value) is type(fallback.value)
    assert str(fallback.value) == str(compiled.value).split("\n")[0]
