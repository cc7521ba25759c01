"""Helpers shared by the tests: random tensor lists carved out of guarded buffers,
float64 expectations and per-dtype error bounds; the optimizer tests' small CNN data and
model comparisons; the 2-process gloo harness; the apps' stand-in SSL encoder and
simulated interruption."""
import os
import socket
import sys
import tempfile
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

# Unit of least precision relative to 1.0 (twice the unit roundoff) per storage dtype.
EPS = {torch.float64: 2.0**-52, torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}
EPS32 = 2.0**-23
SENTINEL = 12345.0

MIXED = [torch.float32, torch.float16, torch.bfloat16, torch.float64]

SHAPES = {
    # 0-d, 0-element, odd sizes around the CPU block (512) and chunk (32768) boundaries
    "mixed": [(), (0,), (1,), (7,), (3, 5), (2, 0, 3), (64, 3, 3, 3), (513,), (1023,), (33, 65), (32769,), (70001,)],
    "one": [(17,)],
    "many": [((i * 7) % 40 + 1,) if i % 3 else (2, (i * 5) % 9 + 1) for i in range(3000)],
}


def dtypes_for(dtype, n):
    return [MIXED[i % len(MIXED)] for i in range(n)] if dtype == "mixed" else [dtype] * n


class Lists:
    """K random tensor lists whose tensors are views into one flat buffer per dtype, with
    guard gaps of odd length between them (filled with SENTINEL) so that out-of-bounds
    writes are caught and data pointers are not all 16-byte aligned."""

    def __init__(self, shapes, dtype, k, rng, device, gap=3, scale=1.0):
        self.dtypes = dtypes_for(dtype, len(shapes))
        self.lists = []
        self._bufs = []
        for _ in range(k):
            total = sum(_numel(s) + gap for s in shapes) + gap
            bufs = {dt: torch.full((total,), SENTINEL, dtype=dt) for dt in set(self.dtypes)}
            views, off = [], gap
            for s, dt in zip(shapes, self.dtypes):
                n = _numel(s)
                v = bufs[dt][off:off + n].view(s)
                v.copy_((torch.randn(s, generator=rng, dtype=torch.float64) * scale).to(dt))
                views.append(v)
                off += n + gap
            dev_bufs = {dt: b.to(device) for dt, b in bufs.items()}
            # re-create the views on the device buffers, same offsets
            dviews, off = [], gap
            for s, dt in zip(shapes, self.dtypes):
                n = _numel(s)
                dviews.append(dev_bufs[dt][off:off + n].view(s))
                off += n + gap
            self.lists.append(dviews)
            self._bufs.append((dev_bufs, shapes, gap))

    def __getitem__(self, k):
        return self.lists[k]

    def check_guards(self):
        for dev_bufs, shapes, gap in self._bufs:
            for dt, b in dev_bufs.items():
                mask = torch.ones(b.numel(), dtype=torch.bool, device=b.device)
                off = gap
                for s, d in zip(shapes, self.dtypes):
                    n = _numel(s)
                    if d == dt:
                        mask[off:off + n] = False
                    off += n + gap
                guard = b[mask]
                assert torch.all(guard == SENTINEL), f"a kernel wrote outside its tensors ({dt})"


def _numel(shape):
    n = 1
    for s in shape:
        n *= s
    return n


def f64(ts):
    return [t.detach().to("cpu", torch.float64, copy=True) for t in ts]


def bits(t):
    return t.detach().reshape(-1).contiguous().view(torch.uint8).cpu()


def assert_bits_equal(a, b, what=""):
    for i, (x, y) in enumerate(zip(a, b)):
        assert torch.equal(bits(x), bits(y)), f"{what}[{i}] is not bit-exact"


def assert_elementwise(out, exact, mag, what="", backend=None):
    """out (storage dtype) vs exact float64 values: one rounding to the storage dtype plus
    float32 math errors proportional to the magnitude of the terms (mag).

    backend="foreach": torch's own kernels round Python-scalar factors to a 16-bit storage
    dtype before multiplying and round between ops, so allow one more 16-bit rounding
    of each term."""
    for i, (o, e, m) in enumerate(zip(out, exact, mag)):
        o64 = o.detach().double().cpu()
        tol = EPS[o.dtype] * e.abs() + 8 * EPS32 * m + (6e-8 if o.dtype == torch.float16 else 0.0)
        if backend == "foreach" and o.dtype in (torch.float16, torch.bfloat16):
            tol = tol + 2 * EPS[o.dtype] * m
        bad = ~((o64 - e).abs() <= tol)
        if bad.any():
            j = bad.reshape(-1).nonzero()[0].item()
            raise AssertionError(f"{what}[{i}] ({o.dtype}) element {j}: got {o64.reshape(-1)[j].item()!r}, "
                                 f"expected {e.reshape(-1)[j].item()!r} (tol {tol.reshape(-1)[j].item():.3g})")


def reduction_rtol(dtypes):
    return 1e-12 if all(d == torch.float64 for d in dtypes) else 2e-5


# ------------------------------------------------------------------ optimizer tests (CNN)

def batch(seed, n=8, dtype=torch.float64):
    """n random 3x8x8 images and labels in 0..2, from their own seed."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 8, 8, generator=g, dtype=dtype), torch.randint(0, 3, (n,), generator=g)


def loss_of(model, x, y):
    return F.cross_entropy(model(x), y)


def params_equal(ref, got, rtol=1e-10, atol=1e-12):
    """got's state (parameters and buffers) equals ref's, the reference, within rtol/atol."""
    for (n, a), b in zip(ref.state_dict().items(), got.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=rtol, atol=atol, msg=lambda s: f"{n}: {s}")


class frozen_bn:
    """Reference BN freezing: save the running statistics, put them back afterwards."""

    def __init__(self, model):
        self.bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]

    def __enter__(self):
        self.saved = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()) for m in self.bns]

    def __exit__(self, *a):
        for m, (mu, var, n) in zip(self.bns, self.saved):
            m.running_mean.copy_(mu), m.running_var.copy_(var), m.num_batches_tracked.copy_(n)


# ------------------------------------------------------------ DDP: 2 gloo processes on CPU

WORLD = 2


def ddp_model():
    """The DDP tests' model (float64, seeded): every rank and the single-process reference
    start from the same parameters."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3)).double()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gloo_worker(rank, train, args, port, out_dir):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        state = train(rank, *args)
        torch.save({k: v.clone() for k, v in state.items()}, os.path.join(out_dir, f"{rank}.pt"))
        dist.barrier()  # both results are on disk
    except BaseException:
        dist.destroy_process_group()
        raise
    # Leave without tearing gloo down: its teardown at exit aborts a rank now and then
    # ("terminate called without an active exception", seen 2 in ~30 runs), after the
    # results are written; that is not what these tests check.
    sys.stdout.flush()
    os._exit(0)


def ddp_run(train, *args):
    """Runs train(rank, *args) (a module-level function, so that spawn can pickle it; it
    returns a state dict) on WORLD gloo processes with one thread each; asserts the ranks'
    states are identical and returns rank 0's. Skips without gloo."""
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_gloo_worker, args=(train, args, _free_port(), tmp), nprocs=WORLD, join=True)
        states = [torch.load(os.path.join(tmp, f"{r}.pt")) for r in range(WORLD)]
    for k in states[0]:
        assert torch.equal(states[0][k], states[1][k]), f"ranks differ in {k}"
    return states[0]


# ------------------------------------------------------------------------------------ apps

class _TinySSL(torch.nn.Module):
    """A stand-in SSL encoder: (B, T) -> (B, frames, 24), one conv of the given stride."""

    def __init__(self, stride):
        super().__init__()
        self.conv = torch.nn.Conv1d(1, 24, 400, stride=stride)

    def forward(self, x):
        return self.conv(x[:, None]).transpose(1, 2)


def tiny_ssl_checkpoint(tmp_path, stride):
    """A scripted _TinySSL saved under tmp_path (the local TorchScript file SSLFrontEnd
    loads); its path. Skips where TorchScript is unavailable."""
    path = str(tmp_path / "tiny_ssl.pt")
    try:
        torch.jit.save(torch.jit.script(_TinySSL(stride)), path)
    except Exception as e:  # pragma: no cover - TorchScript unavailable in this torch build
        pytest.skip(f"TorchScript unavailable: {e}")
    return path


def interrupt_after_checkpoint(monkeypatch, run, step=4):
    """Calls run() with the apps' Checkpointer.save patched to raise KeyboardInterrupt just
    after it saved step `step` (a run killed there), expects that interruption, and puts
    the real save back."""
    from roga_cuda.apps.common import training
    real_save = training.Checkpointer.save

    def save_then_die(self, s, state):
        path = real_save(self, s, state)
        if s == step:
            raise KeyboardInterrupt(f"simulated interruption after the step-{step} checkpoint")
        return path

    monkeypatch.setattr(training.Checkpointer, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run()
    monkeypatch.setattr(training.Checkpointer, "save", real_save)


def spawn_and_wait(fn, nprocs, args, deadline_s, what):
    """``fn(rank, *args)`` in ``nprocs`` spawned processes; one still running after
    ``deadline_s`` (a hung collective) is killed and fails the test, naming ``what``."""
    ctx = mp.start_processes(fn, args=args, nprocs=nprocs, join=False, start_method="spawn")
    deadline = time.monotonic() + deadline_s
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"{what} did not finish in {deadline_s} s (a collective hung?)")


def run_scenarios(scenarios, rank, tmp):
    """In a gloo worker: each named scenario's result (or its traceback) saved to
    ``tmp/<name>.<rank>.pt``, the ranks meeting after each one (a scenario that failed on one
    rank only must not desynchronise the next)."""
    import traceback
    for name, fn in scenarios:
        try:
            res = fn()
        except BaseException:
            res = {"error": traceback.format_exc()}
        torch.save(res, os.path.join(tmp, f"{name}.{rank}.pt"))
        dist.barrier()
