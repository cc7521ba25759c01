"""pytest-benchmark suites: `pytest benchmarks/ --benchmark-group-by=param:op` (not part of
the CI test run, which asserts nothing about time). One RoGA cycle / PCGrad pair / primitive
per call on the ResNet-34 and AASIST parameter lists, for every available backend."""
import pytest
import torch

from benchmarks import bench_ops
from benchmarks import lists as L

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = bench_ops.available_backends(DEVICE)
_states = {}


def state(name):
    if name not in _states:
        _states.clear()
        _states[name] = bench_ops.State(L.LISTS[name](), DEVICE)
    return _states[name]


@pytest.mark.parametrize("lst", ["aasist", "resnet34"])
@pytest.mark.parametrize("backend", BACKENDS + ["loop"])
@pytest.mark.parametrize("op", ["norm", "perturb_", "restore_accumulate_", "gram2", "combine2", "roga_cycle", "pcgrad_pair"])
def test_primitive(benchmark, lst, backend, op):
    st = state(lst)
    fns = bench_ops.loop_variants(st) if backend == "loop" else bench_ops.primitive_variants(st, backend)
    if op not in fns:
        pytest.skip(f"no {backend} variant of {op}")
    def fn(f=fns[op]):
        f()
        if DEVICE == "cuda":
            torch.cuda.synchronize()
    benchmark.extra_info["bytes"] = bench_ops.op_bytes(op, st.numel)
    benchmark(fn)
