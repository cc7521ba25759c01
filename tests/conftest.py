import os
import random

# Triton kernels run on CPU tensors only through its interpreter, which must be chosen
# before triton is first imported. Without an NVIDIA device node, use the interpreter.
if not os.path.exists("/dev/nvidiactl"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from roga_cuda import ops  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def backend_cases(include_unavailable=False):
    """(backend, device) pairs to test: every available backend on every device it runs on."""
    cases = []
    info = ops.backends()
    for name in ops.BACKENDS:
        for dev in DEVICES:
            be = ops._registry[name]
            runs_here = not be.device_types or dev in be.device_types
            if be.available and runs_here:
                cases.append(pytest.param(name, dev, id=f"{name}-{dev}"))
            elif include_unavailable and runs_here:
                cases.append(pytest.param(name, dev, id=f"{name}-{dev}",
                                          marks=pytest.mark.skip(reason=info[name]["reason"])))
    return cases


def pytest_report_header(config):
    lines = [f"torch {torch.__version__}, devices {DEVICES}"]
    for name, info in ops.backends().items():
        lines.append(f"  backend {name:9s}: " + ("available" if info["available"] else f"unavailable ({info['reason']})"))
    return lines


@pytest.fixture
def rng(request):
    """A torch.Generator with a fresh seed per test; the seed is printed on failure."""
    seed = random.SystemRandom().randrange(2**31)
    print(f"[rng seed {seed}]")
    g = torch.Generator().manual_seed(seed)
    return g
