"""Training-loop building blocks shared by the apps: LR schedules, early stopping,
resumable data order, the CSV/TensorBoard log, and exact resume.

Exact resume
------------
A checkpoint (``capture_state``) holds the model, the optimizer (wrappers included,
through their ``state_dict``), the LR scheduler, the GradScaler, early stopping, every
global RNG state and the loop's counters. The data order is a pure function of
``(seed, stream key, epoch)`` (:class:`BatchStream`, :class:`EpochSampler`), so the step
counter is the whole data position and per-sample randomness (augmentation) should be
derived from ``(seed, epoch, index)`` rather than drawn from a global RNG. Restored with
:func:`restore_state`, a run continues bit-identically on CPU (on GPU up to the usual
non-determinism of some kernels).
"""
import csv
import math
import os

import numpy as np
import torch

from .checkpoint import (SHARDED_META, checkpoint_path, is_sharded_checkpoint, latest_checkpoint, load_checkpoint,
                         prune_checkpoints, save_checkpoint, save_sharded_checkpoint)
from .runtime import barrier, derive_seed, get_rng_state, is_main, set_rng_state

__all__ = ["build_scheduler", "lr_factor", "EarlyStopping", "BatchStream", "EpochSampler", "MetricLogger",
           "capture_state", "restore_state", "Checkpointer", "unwrap_model"]


# ------------------------------------------------------------------------------ schedules
def lr_factor(step, total_steps, name="cosine", warmup_steps=0, min_lr_ratio=0.0, step_size=None, gamma=0.1):
    """Multiplier of the base LR at ``step`` (0-based): linear warmup from 1/(warmup+1)
    over ``warmup_steps``, then 'constant', 'cosine' (to ``min_lr_ratio`` at
    ``total_steps``) or 'step' (times ``gamma`` every ``step_size`` steps)."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    t = step - warmup_steps
    if name == "constant":
        return 1.0
    if name == "cosine":
        span = max(1, total_steps - warmup_steps)
        frac = min(1.0, t / span)
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * frac))
    if name == "step":
        if not step_size or step_size <= 0:
            raise ValueError("the 'step' LR schedule needs step_size > 0")
        return gamma ** (t // step_size)
    raise ValueError(f"unknown LR schedule {name!r}; use constant, cosine or step")


def build_scheduler(optimizer, name="cosine", total_steps=1, warmup_steps=0, min_lr_ratio=0.0, step_size=None,
                    gamma=0.1):
    """A per-step ``LambdaLR`` (call ``scheduler.step()`` after every optimizer step)."""
    lr_factor(0, total_steps, name, warmup_steps, min_lr_ratio, step_size, gamma)  # validate now
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, name, warmup_steps, min_lr_ratio, step_size, gamma))


# ------------------------------------------------------------------------- early stopping
class EarlyStopping:
    """Stop when the monitored metric has not improved by ``min_delta`` for ``patience``
    evaluations (patience <= 0: never stop). mode 'max' (AUC) or 'min' (EER, loss).

    ``update(value, step, tiebreak)``: with a ``tiebreak`` (lower is better, e.g. the dev
    loss), a value equal to the best improves when its tiebreak is lower."""

    def __init__(self, patience=0, mode="max", min_delta=0.0):
        if mode not in ("max", "min"):
            raise ValueError(f"early stopping mode must be 'max' or 'min', got {mode!r}")
        if int(patience) < 0:
            raise ValueError(f"early stopping patience must be >= 0 (0: never stop), got {patience}")
        self.patience, self.mode, self.min_delta = int(patience), mode, float(min_delta)
        self.best = None
        self.best_tiebreak = None
        self.best_step = None
        self.bad = 0

    def update(self, value, step=None, tiebreak=None):
        """Record a validation value; True when it is a new best. NaN never improves."""
        value = float(value)
        if math.isnan(value):
            better = False
        elif self.best is None:
            better = True
        elif value == self.best and tiebreak is not None and self.best_tiebreak is not None:
            better = float(tiebreak) < self.best_tiebreak
        else:
            better = value > self.best + self.min_delta if self.mode == "max" else value < self.best - self.min_delta
        if better:
            self.best, self.best_step, self.bad = value, step, 0
            self.best_tiebreak = None if tiebreak is None else float(tiebreak)
        else:
            self.bad += 1
        return better

    @property
    def should_stop(self):
        return self.patience > 0 and self.bad >= self.patience

    def state_dict(self):
        return {"best": self.best, "best_step": self.best_step, "bad": self.bad, "best_tiebreak": self.best_tiebreak}

    def load_state_dict(self, s):
        self.best, self.best_step, self.bad = s["best"], s["best_step"], s["bad"]
        self.best_tiebreak = s.get("best_tiebreak")


# ----------------------------------------------------------------------------- data order
class BatchStream:
    """Endless, resumable batches of indices into a dataset of ``n`` items.

    Batch ``step`` comes from epoch ``step // steps_per_epoch`` of a permutation seeded by
    ``(seed, key, epoch)``, so any step's batch is known without replaying the others (the
    step counter is the data position). With DDP each rank takes its slice of the global
    batch (``global_batch = batch_size * world_size``), so N processes see exactly the
    samples one process would with the global batch."""

    def __init__(self, n, batch_size, seed=0, key="", *, shuffle=True, rank=0, world_size=1):
        self.n, self.batch_size, self.seed, self.key = int(n), int(batch_size), int(seed), str(key)
        self.shuffle, self.rank, self.world = bool(shuffle), int(rank), int(world_size)
        if not 0 <= self.rank < self.world:
            raise ValueError(f"stream {key!r}: rank {rank} outside world of {world_size}")
        self.global_batch = self.batch_size * self.world
        if self.n < self.global_batch:
            raise ValueError(f"stream {key!r}: {n} items cannot fill one batch of {self.batch_size} x "
                             f"{self.world} process(es); lower the batch size")
        self.steps_per_epoch = self.n // self.global_batch  # drop the ragged tail of each epoch
        self._cache = (None, None)

    def epoch_of(self, step):
        return step // self.steps_per_epoch

    def _perm(self, epoch):
        if self._cache[0] != epoch:
            if self.shuffle:
                g = torch.Generator().manual_seed(derive_seed(self.seed, self.key, epoch))
                perm = torch.randperm(self.n, generator=g).numpy()
            else:
                perm = np.arange(self.n)
            self._cache = (epoch, perm)
        return self._cache[1]

    def indices(self, step):
        """This rank's indices for global step ``step``."""
        epoch, j = divmod(int(step), self.steps_per_epoch)
        glob = self._perm(epoch)[j * self.global_batch:(j + 1) * self.global_batch]
        return glob[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]


class EpochSampler(torch.utils.data.Sampler):
    """An epoch-based sampler for ``DataLoader`` with a deterministic order per
    ``(seed, epoch)``, DDP sharding, and ``set_start(k)`` to skip this rank's first ``k``
    samples of the epoch (resuming mid-epoch without loading the skipped samples)."""

    def __init__(self, n, seed=0, *, shuffle=True, rank=0, world_size=1, drop_last=True):
        self.n, self.seed, self.shuffle = int(n), int(seed), bool(shuffle)
        self.rank, self.world, self.drop_last = int(rank), int(world_size), bool(drop_last)
        self.epoch, self.start = 0, 0
        if drop_last:
            self.per_rank = self.n // self.world
        else:
            self.per_rank = math.ceil(self.n / self.world)

    def set_epoch(self, epoch):
        self.epoch, self.start = int(epoch), 0

    def set_start(self, k):
        self.start = int(k)

    def order(self):
        if self.shuffle:
            g = torch.Generator().manual_seed(derive_seed(self.seed, "epoch", self.epoch))
            idx = torch.randperm(self.n, generator=g).tolist()
        else:
            idx = list(range(self.n))
        total = self.per_rank * self.world
        if total > len(idx):  # pad by wrapping (drop_last=False), as DistributedSampler does
            idx += idx[:total - len(idx)]
        return idx[self.rank:total:self.world]

    def __iter__(self):
        return iter(self.order()[self.start:])

    def __len__(self):
        return max(0, self.per_rank - self.start)


# ---------------------------------------------------------------------------------- logs
class MetricLogger:
    """Rows of scalars to ``<folder>/<name>`` (CSV, columns grow as new keys appear) and to
    TensorBoard when it is installed and ``tensorboard=True``. Rank 0 only.

    resume_step: keep the rows of an earlier run up to this step and drop the later ones
    (which the resumed run will write again)."""

    def __init__(self, folder, name="log.csv", tensorboard=True, resume_step=None):
        self.active = is_main()
        self.path = os.path.join(folder, name)
        self.rows, self.columns = [], ["step"]
        self.tb = None
        if not self.active:
            return
        os.makedirs(folder, exist_ok=True)
        if resume_step is not None and os.path.isfile(self.path):
            with open(self.path, newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f)
                self.columns = list(reader.fieldnames or ["step"])
                self.rows = [r for r in reader if r.get("step") not in (None, "") and int(float(r["step"])) <= resume_step]
        self._rewrite()
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except Exception:  # tensorboard not installed
                self.tb = None
            else:
                kw = {"purge_step": resume_step + 1} if resume_step is not None else {}
                self.tb = SummaryWriter(os.path.join(folder, "tb"), **kw)

    def _rewrite(self):
        tmp = self.path + ".tmp"
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=self.columns)
            w.writeheader()
            w.writerows(self.rows)
        os.replace(tmp, self.path)

    def log(self, step, **values):
        if not self.active:
            return
        row = {"step": int(step)}
        for k, v in values.items():
            if isinstance(v, torch.Tensor):
                v = v.item()
            row[k] = v
            if self.tb is not None and isinstance(v, (int, float)) and not isinstance(v, bool):
                self.tb.add_scalar(k, v, int(step))
        self.rows.append(row)
        new = [k for k in row if k not in self.columns]
        if new:
            self.columns += new
            self._rewrite()
        else:
            with open(self.path, "a", newline="", encoding="utf-8") as f:
                csv.DictWriter(f, fieldnames=self.columns).writerow(row)

    def close(self):
        if self.tb is not None:
            self.tb.close()
            self.tb = None


def read_log(path):
    """The CSV log as {column: [floats or None]}."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    cols = {}
    for r in rows:
        for k, v in r.items():
            cols.setdefault(k, [])
    for r in rows:
        for k in cols:
            v = r.get(k)
            try:
                cols[k].append(float(v) if v not in (None, "") else None)
            except ValueError:
                cols[k].append(None)
    return cols


# --------------------------------------------------------------------------------- resume
def unwrap_model(model):
    """The module inside DistributedDataParallel / DataParallel wrappers."""
    return model.module if hasattr(model, "module") and isinstance(model.module, torch.nn.Module) else model


def capture_state(*, model, optimizer, scheduler=None, amp=None, early_stopping=None, counters=None, config=None,
                  extra=None):
    """Everything needed to continue a run exactly, as a dict of plain containers/tensors."""
    return {
        "format": "roga_cuda.train/1",
        "model": unwrap_model(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": amp.state_dict() if amp is not None else {},
        "early_stopping": early_stopping.state_dict() if early_stopping is not None else None,
        "rng": get_rng_state(),
        "counters": dict(counters or {}),
        "config": config.to_dict() if hasattr(config, "to_dict") else config,
        "extra": extra or {},
    }


def restore_state(ckpt, *, model, optimizer=None, scheduler=None, amp=None, early_stopping=None, rng=True):
    """Load what :func:`capture_state` saved into the live objects; returns the counters."""
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise ValueError("not a training checkpoint (no 'model' entry)")
    unwrap_model(model).load_state_dict(ckpt["model"])
    if optimizer is not None and ckpt.get("optimizer") is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
    if scheduler is not None and ckpt.get("scheduler") is not None:
        scheduler.load_state_dict(ckpt["scheduler"])
    if amp is not None:
        amp.load_state_dict(ckpt.get("scaler") or {})
    if early_stopping is not None and ckpt.get("early_stopping") is not None:
        early_stopping.load_state_dict(ckpt["early_stopping"])
    if rng and "rng" in ckpt:
        set_rng_state(ckpt["rng"])
    return dict(ckpt.get("counters", {}))


class Checkpointer:
    """Atomic ``step_<N>.pt`` checkpoints every ``every`` steps in ``folder`` (rank 0
    writes, all ranks wait), keeping the newest ``keep`` (0 = all). With ``sharded`` state
    (FSDP) a ``step_<N>`` folder instead, every rank writing its shards."""

    def __init__(self, folder, every=0, keep=2):
        self.folder, self.every, self.keep = folder, int(every or 0), int(keep or 0)

    def due(self, step):
        return self.every > 0 and step > 0 and step % self.every == 0

    def save(self, step, state, sharded=None):
        """``state``: what rank 0 writes; ``sharded``: the DCP state of every rank (FSDP)."""
        path = checkpoint_path(self.folder, step, sharded=sharded is not None)
        if sharded is not None:
            save_sharded_checkpoint(path, sharded, state)
        elif is_main():
            save_checkpoint(path, state)
        if is_main():
            prune_checkpoints(self.folder, self.keep, protect=[path])
        barrier()
        return path

    def find(self, resume):
        """``resume``: a file, a folder (its latest checkpoint), 'auto' (this folder's
        latest, None if there is none) or None/''/False."""
        if not resume:
            return None
        if resume in ("auto", True, "latest"):
            return latest_checkpoint(self.folder)
        if os.path.isdir(resume) and not is_sharded_checkpoint(resume):
            path = latest_checkpoint(resume)
            if path is None:
                raise FileNotFoundError(f"--resume {resume}: no step_<N>.pt checkpoint in that folder")
            return path
        return resume

    def load(self, resume, map_location="cpu"):
        """(state, path): a sharded checkpoint's state is its ``trainer.pt`` (the shards are
        read by the trainer, into its model and optimizer)."""
        path = self.find(resume)
        if path is None:
            return None, None
        if is_sharded_checkpoint(path):
            return load_checkpoint(os.path.join(path, SHARDED_META), map_location), path
        return load_checkpoint(path, map_location), path
