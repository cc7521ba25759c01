"""Atomic checkpoints.

``save_checkpoint`` writes to a temporary file in the destination folder, flushes and
fsyncs it, then ``os.replace``s it over the destination (atomic on POSIX and Windows) and
fsyncs the folder: a reader sees either the previous complete file or the new complete
file, never a half-written one, and a failure while writing leaves the previous
checkpoint untouched (the temporary file is removed).

Checkpoints hold only what ``torch.load(weights_only=True)`` accepts (tensors, dicts,
lists, tuples, numbers, strings), so loading one never runs pickled code.

Integrity: torch's zip reader does not check its records' CRCs, so a file with flipped
bytes can load silently with wrong numbers. ``save_checkpoint`` therefore stores a SHA-256
of the file in the zip archive's comment field (part of the zip format: ``torch.load`` and
``zipfile`` read the file as usual), written before the atomic rename, so the checksum
and the bytes it covers always arrive together. ``load_checkpoint`` verifies it and raises
:class:`CheckpointError` on a mismatch; files without it (torchvision weights, other tools)
load unverified.

Sharded checkpoints (``train.fsdp=true``): ``step_<N>/`` folders written by
:func:`save_sharded_checkpoint` with ``torch.distributed.checkpoint`` (every rank its own
shards; loadable on another number of ranks) plus ``trainer.pt``, the run's unsharded
state, written by rank 0 with :func:`save_checkpoint`. The folder is written under a
hidden temporary name and renamed into place by rank 0 once every rank's shards, DCP's
metadata and ``trainer.pt`` are on disk: a checkpoint interrupted halfway is never taken
for one (and the previous one stays).
"""
import glob
import hashlib
import os
import re
import shutil
import tempfile

import torch

__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint", "verify_checkpoint", "latest_checkpoint", "checkpoint_path",
           "prune_checkpoints", "average_checkpoints", "save_sharded_checkpoint", "is_sharded_checkpoint",
           "SHARDED_META"]

CKPT_PATTERN = re.compile(r"^step_(\d+)(\.pt)?$")  # step_<N>.pt: one file; step_<N>: a sharded folder
SHARDED_META = "trainer.pt"  # a sharded checkpoint's unsharded part (rank 0's file)


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, unreadable or not what was expected."""


# The zip end-of-central-directory record: signature, ..., comment length (last 2 bytes).
_EOCD, _EOCD_LEN = b"PK\x05\x06", 22
_SIG = b"roga_cuda-sha256:"
_SIG_LEN = len(_SIG) + 64  # + hex digest


def _sha256(f, n):
    """SHA-256 of the first ``n`` bytes of the open file ``f``."""
    h = hashlib.sha256()
    f.seek(0)
    left = n
    while left > 0:
        chunk = f.read(min(left, 1 << 22))
        if not chunk:
            break
        h.update(chunk)
        left -= len(chunk)
    return h.hexdigest().encode("ascii")


def _sign(f):
    """Put the SHA-256 of the zip just written to ``f`` into its (empty) archive comment."""
    size = f.seek(0, os.SEEK_END)
    f.seek(size - _EOCD_LEN)
    eocd = f.read(_EOCD_LEN)
    if size < _EOCD_LEN or eocd[:4] != _EOCD or eocd[-2:] != b"\0\0":
        raise CheckpointError("torch.save did not write a zip archive without a comment; cannot sign it")
    f.seek(size - 2)
    f.write(_SIG_LEN.to_bytes(2, "little"))  # the comment length is covered by the checksum
    digest = _sha256(f, size)
    f.seek(size)
    f.write(_SIG + digest)


def verify_checkpoint(path):
    """Check the SHA-256 that :func:`save_checkpoint` stored in ``path``; True when it
    matches, False for a file without one, :class:`CheckpointError` when it differs."""
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        tail = _EOCD_LEN + _SIG_LEN
        if size < tail:
            return False
        f.seek(size - tail)
        t = f.read(tail)
        if not t[_EOCD_LEN:].startswith(_SIG):  # found by its own marker: damage to the zip fields is caught too
            return False
        if _sha256(f, size - len(_SIG) - 64) != t[-64:]:
            raise CheckpointError(f"checkpoint {path} is corrupt: its SHA-256 differs from the one stored when it was "
                                  "written (damaged on disk or in transfer); use another checkpoint")
    return True


def _fsync_dir(folder):
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows: directories cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(path, state):
    """Atomically write ``state`` (anything ``torch.save`` takes) to ``path``."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w+b") as f:
            torch.save(state, f)
            _sign(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(folder)
    return path


def load_checkpoint(path, map_location="cpu", weights_only=True):
    """Load a checkpoint; a missing or corrupt file raises :class:`CheckpointError` naming it.

    weights_only=False is needed only for files from elsewhere that pickle arbitrary
    objects (never load such files from untrusted sources)."""
    path = os.fspath(path)
    if is_sharded_checkpoint(path):
        raise CheckpointError(f"{path} is a sharded checkpoint folder (train.fsdp=true): it resumes a run (--resume); "
                              "to evaluate, use the run's whole-model files (best.pt, final.pt, model_avg.pt)")
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    verify_checkpoint(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=weights_only)
    except Exception as e:  # truncated zip, wrong format, disallowed pickle global, ...
        raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}".rstrip()) from e


def checkpoint_path(folder, step, sharded=False):
    """The file (``step_<N>.pt``) or, ``sharded``, the folder (``step_<N>``) the training
    loops use for the checkpoint after ``step`` steps."""
    return os.path.join(os.fspath(folder), f"step_{int(step):08d}" + ("" if sharded else ".pt"))


def is_sharded_checkpoint(path):
    """Is ``path`` a folder written by :func:`save_sharded_checkpoint`?"""
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, SHARDED_META))


def _step_files(folder):
    out = []
    for p in glob.glob(os.path.join(glob.escape(os.fspath(folder)), "step_*")):
        m = CKPT_PATTERN.match(os.path.basename(p))
        if m and (os.path.isfile(p) if m.group(2) else is_sharded_checkpoint(p)):
            out.append((int(m.group(1)), p))
    return sorted(out)


def latest_checkpoint(folder):
    """Path of the checkpoint with the highest step in ``folder`` (``step_<N>.pt`` or a
    sharded ``step_<N>`` folder), or None. Temporary files and folders of interrupted writes
    are ignored."""
    if folder is None or not os.path.isdir(folder):
        return None
    files = _step_files(folder)
    return files[-1][1] if files else None


def prune_checkpoints(folder, keep, protect=()):
    """Delete all but the ``keep`` newest ``step_<N>.pt`` files / ``step_<N>`` folders (never
    those in ``protect``)."""
    if keep is None or keep <= 0:
        return []
    protect = {os.path.abspath(p) for p in protect if p}
    files = _step_files(folder)
    removed = []
    for _, p in files[:-keep]:
        if os.path.abspath(p) not in protect:
            if os.path.isdir(p):
                shutil.rmtree(p)
            else:
                os.unlink(p)
            removed.append(p)
    return removed


def save_sharded_checkpoint(path, sharded, meta):
    """Write a sharded checkpoint folder ``path``; every rank calls it (collective).

    sharded: the DCP state (e.g. ``{"model": ..., "optim": ...}`` from
    ``roga_cuda.optim.checkpoint.get_state_dict``), each rank's own shards; meta: the
    unsharded rest (rank 0's value is written, to ``path/trainer.pt``). Written to
    ``.<name>.partial`` next to ``path`` and renamed by rank 0 when complete."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    path = os.path.abspath(os.fspath(path))
    folder = os.path.dirname(path)
    tmp = os.path.join(folder, "." + os.path.basename(path) + ".partial")
    main = not dist.is_initialized() or dist.get_rank() == 0
    if main:
        os.makedirs(folder, exist_ok=True)
        if os.path.isdir(tmp):  # left by an interrupted write
            shutil.rmtree(tmp)
    if dist.is_initialized():
        dist.barrier()
    dcp.save(sharded, checkpoint_id=tmp)  # ends once every rank's shards and rank 0's metadata are written
    if main:
        save_checkpoint(os.path.join(tmp, SHARDED_META), meta)
        _fsync_dir(tmp)
        if os.path.isdir(path):  # the same step written again (a rerun): replace it whole
            shutil.rmtree(path)
        os.replace(tmp, path)
        _fsync_dir(folder)
    if dist.is_initialized():
        dist.barrier()
    return path


def _model_state(ckpt, path):
    if isinstance(ckpt, dict) and "model" in ckpt and isinstance(ckpt["model"], dict):
        return ckpt["model"]
    if isinstance(ckpt, dict) and ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        return ckpt  # a bare state_dict
    raise CheckpointError(f"{path}: neither a training checkpoint (with a 'model' entry) nor a state_dict")


def average_checkpoints(paths, map_location="cpu"):
    """Parameter average of the models in ``paths`` (e.g. the best N): floating tensors are
    averaged in float64 and cast back; integer buffers (BatchNorm's num_batches_tracked)
    are taken from the last file. Returns a model state_dict."""
    paths = [os.fspath(p) for p in paths]
    if not paths:
        raise ValueError("average_checkpoints: no checkpoint paths given")
    avg, ref_path = None, paths[0]
    for path in paths:
        sd = _model_state(load_checkpoint(path, map_location), path)
        if avg is None:
            dtypes = {k: v.dtype for k, v in sd.items()}
            avg = {k: v.detach().to(torch.float64).clone() if v.is_floating_point() else v.clone()
                   for k, v in sd.items()}
            continue
        if sd.keys() != avg.keys():
            diff = sorted(set(sd) ^ set(avg))[:5]
            raise CheckpointError(f"{path}: parameter names differ from {ref_path} (e.g. {diff})")
        for k, v in sd.items():
            if v.shape != avg[k].shape:
                raise CheckpointError(f"{path}: {k} has shape {tuple(v.shape)}, {ref_path} has {tuple(avg[k].shape)}")
            if v.is_floating_point():
                avg[k] += v.to(torch.float64)
            else:
                avg[k] = v.clone()
    n = len(paths)
    return {k: (v / n).to(dtypes[k]) if dtypes[k].is_floating_point else v for k, v in avg.items()}
