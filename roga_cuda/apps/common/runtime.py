"""Process-level plumbing for the training apps: seeding and RNG state, device choice,
AMP, DDP via ``torchrun``, and rank-0-only printing and progress bars.

DDP: ``torchrun --nproc_per_node=N -m roga_cuda.apps.image ...`` sets RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT; :func:`init_distributed` reads them and starts
the process group (nccl on CUDA, gloo on CPU). Without them it is a no-op (one process).
"""
import contextlib
import os
import random
import sys

import numpy as np
import torch
import torch.distributed as dist

__all__ = ["seed_everything", "set_num_threads", "make_generator", "derive_seed", "get_rng_state", "set_rng_state", "select_device",
           "in_weight_layout",
           "Amp", "DistInfo", "init_distributed", "cleanup_distributed", "is_main", "rank", "world_size",
           "barrier", "print0", "progress", "all_gather_objects"]


# ---------------------------------------------------------------------------------- seeding
def seed_everything(seed, deterministic=False):
    """Seed python, numpy and torch (all devices). deterministic=True also asks torch for
    deterministic kernels (warn-only: ops without one still run)."""
    seed = int(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def derive_seed(*parts):
    """A 63-bit seed from integers/strings, stable across processes and Python runs (no
    ``hash()``: it is salted per process for strings)."""
    ss = np.random.SeedSequence([abs(hash_str(p)) if isinstance(p, str) else int(p) for p in parts])
    return int(ss.generate_state(1, np.uint64)[0]) & ((1 << 63) - 1)


def hash_str(s):
    h = 1469598103934665603  # FNV-1a, 64 bit
    for b in s.encode("utf-8"):
        h = ((h ^ b) * 1099511628211) & ((1 << 64) - 1)
    return h & ((1 << 62) - 1)


def make_generator(*seed_parts, device="cpu"):
    """A torch.Generator seeded from ``derive_seed(*seed_parts)``."""
    return torch.Generator(device=device).manual_seed(derive_seed(*seed_parts))


def get_rng_state():
    """Every global RNG state, in a form ``torch.load(weights_only=True)`` accepts."""
    np_state = np.random.get_state()
    state = {
        "python": _tuples_to_lists(random.getstate()),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]),
                  float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    random.setstate(_lists_to_tuples(state["python"]))
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), int(n[2]), int(n[3]), float(n[4])))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


def _tuples_to_lists(x):
    return [_tuples_to_lists(v) for v in x] if isinstance(x, (tuple, list)) else x


def _lists_to_tuples(x):
    return tuple(_lists_to_tuples(v) for v in x) if isinstance(x, (tuple, list)) else x


# ----------------------------------------------------------------------------------- device
def set_num_threads(n):
    """torch intra-op CPU threads (None/0: leave torch's default). On a shared machine one
    thread per process avoids oversubscription, which can slow small models many-fold."""
    if n:
        torch.set_num_threads(int(n))


def in_weight_layout(model, cfg):
    """``model`` with its 4-d weights channels-last when ``cfg.runtime.channels_last`` (faster
    convolutions, the same math up to rounding): where a run trains and is rescored alike."""
    if cfg.runtime.get("channels_last", False):
        model.to(memory_format=torch.channels_last)
    return model


def select_device(name="auto", local_rank=None):
    """'auto' -> cuda (this process's local GPU under torchrun) when available, else cpu.
    An explicit 'cuda' without a GPU is an error, not a silent fallback."""
    name = (name or "auto").lower()
    if local_rank is None:
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {name!r} requested but CUDA is not available (torch {torch.__version__}, "
                               f"cuda build: {torch.version.cuda})")
        dev = torch.device(name if ":" in name else f"cuda:{local_rank % torch.cuda.device_count()}")
        torch.cuda.set_device(dev)
        return dev
    if name != "cpu":
        raise ValueError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N")
    return torch.device("cpu")


class Amp:
    """Autocast + GradScaler, enabled only on CUDA (on CPU both are no-ops).

    dtype 'float16' uses the GradScaler; 'bfloat16' needs none (scaler disabled)."""

    def __init__(self, device, enabled=True, dtype="float16"):
        self.device = torch.device(device)
        self.enabled = bool(enabled) and self.device.type == "cuda"
        if dtype not in ("float16", "bfloat16"):
            raise ValueError(f"amp dtype must be float16 or bfloat16, got {dtype!r}")
        self.dtype = getattr(torch, dtype)
        use_scaler = self.enabled and self.dtype == torch.float16
        self.scaler = torch.amp.GradScaler("cuda", enabled=use_scaler) if self.enabled else None

    def autocast(self):
        if not self.enabled:
            return contextlib.nullcontext()
        return torch.autocast(device_type="cuda", dtype=self.dtype)

    def scale(self, loss):
        return self.scaler.scale(loss) if self.scaler is not None and self.scaler.is_enabled() else loss

    @property
    def active_scaler(self):
        return self.scaler if self.scaler is not None and self.scaler.is_enabled() else None

    def state_dict(self):
        return self.scaler.state_dict() if self.active_scaler is not None else {}

    def load_state_dict(self, state):
        if state and self.active_scaler is not None:
            self.scaler.load_state_dict(state)


# -------------------------------------------------------------------------------------- DDP
class DistInfo:
    """rank, world size, local rank and backend of this process; ``created``: this call started
    a one-process group (``init_distributed(single_group=True)``), which its caller ends."""

    def __init__(self, rank=0, world_size=1, local_rank=0, backend=None, created=False):
        self.rank, self.world_size, self.local_rank, self.backend = rank, world_size, local_rank, backend
        self.created = created

    @property
    def enabled(self):
        return self.world_size > 1

    @property
    def is_main(self):
        return self.rank == 0

    def __repr__(self):
        return f"DistInfo(rank={self.rank}, world_size={self.world_size}, backend={self.backend})"


def init_distributed(device_type=None, single_group=False):
    """Start the process group from torchrun's environment variables (no-op without them).

    single_group=True: without them (or with WORLD_SIZE=1) start a one-process group instead
    (an in-memory store, no port), for code that needs one, e.g. FSDP2's ``fully_shard``."""
    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    backend = "nccl" if device_type == "cuda" else "gloo"
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) <= 1:
        if not single_group:
            return DistInfo()
        if dist.is_initialized():
            if dist.get_world_size() != 1:
                raise RuntimeError(f"a process group of {dist.get_world_size()} processes is running but WORLD_SIZE "
                                   "is not set; launch with torchrun")
            return DistInfo(0, 1, 0, dist.get_backend())
        dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
        return DistInfo(0, 1, 0, backend, created=True)
    r, w = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    lr = int(os.environ.get("LOCAL_RANK", r))
    if not dist.is_initialized():
        if device_type == "cuda":
            torch.cuda.set_device(lr % torch.cuda.device_count())
        dist.init_process_group(backend=backend, rank=r, world_size=w)
    return DistInfo(r, w, lr, backend)


def cleanup_distributed():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def rank():
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size():
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main():
    return rank() == 0


def barrier():
    if world_size() > 1:
        dist.barrier()


def all_gather_objects(obj):
    """[obj of rank 0, obj of rank 1, ...] (just [obj] in one process)."""
    if world_size() <= 1:
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


# ------------------------------------------------------------------------------- printing
def print0(*args, **kwargs):
    """print() on rank 0 only (flushes, so logs interleave sanely)."""
    if is_main():
        kwargs.setdefault("flush", True)
        print(*args, **kwargs)


def progress(iterable=None, total=None, desc=None, enabled=True, **kwargs):
    """A tqdm bar on rank 0 (to stderr), a plain iterable elsewhere or when disabled."""
    if not enabled or not is_main():
        return _NoBar(iterable, total)
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _NoBar(iterable, total)
    kwargs.setdefault("dynamic_ncols", True)
    kwargs.setdefault("leave", False)
    kwargs.setdefault("file", sys.stderr)
    return tqdm(iterable, total=total, desc=desc, **kwargs)


class _NoBar:
    def __init__(self, iterable=None, total=None):
        self.iterable, self.total, self.n = iterable, total, 0

    def __iter__(self):
        return iter(self.iterable)

    def update(self, n=1):
        self.n += n

    def set_postfix(self, *a, **k):
        pass

    def set_description(self, *a, **k):
        pass

    def write(self, s):
        print0(s)

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
