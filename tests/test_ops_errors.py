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
    with pytest.raises(ValueError, match="grads.*2 tensors|tensors but"):
        ops.perturb_(p, g[:2], b, 1.0, backend=backend)
    with pytest.raises(ValueError, match="lists\\[1\\]"):
        ops.gram([p, g[:2]], backend=backend)
    with pytest.raises(ValueError):
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
    with pytest.raises(TypeError, match=r"grads\[2\] has dtype .*(float64|Double)"):
        ops.perturb_(p, g, b, 1.0, backend=backend)
    with pytest.raises(TypeError, match=r"ts\[0\] has dtype .*(int64|Long)"):
        ops.norm([torch.arange(5, device=device)], backend=backend)
    with pytest.raises(TypeError, match="dtype"):
        ops.norm([torch.randn(3, dtype=torch.complex64, device=device)], backend=backend)
    with pytest.raises(TypeError, match="dtype"):
        ops.gram([[torch.ones(3, dtype=torch.bool, device=device)]], backend=backend)


@pytest.mark.parametrize("backend,device", CASES)
def test_sparse(backend, device):
    s = torch.randn(4, 3, device=device).to_sparse()
    with pytest.raises(TypeError, match="Sparse|sparse"):
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
