"""Timing helpers: interleaved repetitions, medians, the machine's bandwidth ceiling, the
bytes each primitive must move (DESIGN.md "Performance method"), and the resident-set
readings of the peak-memory children."""
import ctypes
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time

import torch

# Bytes each op must move per element of float32 storage: every input read once, every
# output written once. Scale by element_size / 4 for other dtypes.
BYTES_PER_ELEMENT = {
    "norm": 4,                    # read ts
    "norm_asam": 8,               # read ts, params
    "perturb_": 16,               # read p, g; write p, backup
    "restore_": 8,                # read backup; write p
    "restore_accumulate_": 20,    # read backup, acc, g; write p, acc
    "gram2": 8, "gram3": 12,      # read K lists
    "combine2": 12,               # read 2 lists, write out
    "combine3": 16,
    "roga_cycle": 40,             # norm + perturb_ + restore_accumulate_
    "roga_cycle_swap": 28,        # norm + combine_(spare, [p, g]) + combine_(acc, [acc, h]); swapping .data is free
    "pcgrad_pair": 20,            # gram of 2 + combine_ of 2 into one of them
}


def op_bytes(op, numel, element_size=4):
    return BYTES_PER_ELEMENT[op] * numel * element_size // 4


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def machine(device):
    info = {"date": time.strftime("%Y-%m-%d %H:%M %Z"), "torch": torch.__version__, "python": platform.python_version(),
            "device": str(device), "threads": torch.get_num_threads(), "cpu": _cpu_name(), "cores": os.cpu_count()}
    if torch.device(device).type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(gpu=p.name, sms=p.multi_processor_count, gpu_mem_gb=round(p.total_memory / 2**30, 1))
    try:
        info["load_avg"] = os.getloadavg()
    except OSError:
        pass
    return info


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def interleaved(variants, reps=20, warmup=3, device="cpu"):
    """Run every variant once per round, ``reps`` rounds, in a shuffled order (seeded) so that
    slow drifts (thermal, other load) hit all variants alike and no variant always runs right
    after the same other one (a rotation keeps the cyclic order: a variant that always
    followed a cache-trashing one timed 1.5x its twin in bench_host). Returns {name: [seconds]}.

    A variant is a callable, or a (setup, callable) pair whose setup runs untimed first."""
    setups = {n: (v[0] if isinstance(v, tuple) else None) for n, v in variants.items()}
    variants = {n: (v[1] if isinstance(v, tuple) else v) for n, v in variants.items()}
    names = list(variants)
    for _ in range(warmup):
        for n in names:
            if setups[n]:
                setups[n]()
            variants[n]()
    sync(device)
    times = {n: [] for n in names}
    cuda = torch.device(device).type == "cuda"
    shuffle = random.Random(0).shuffle
    for r in range(reps):
        order = list(names)
        shuffle(order)
        for n in order:
            if setups[n]:
                setups[n]()
                sync(device)
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                variants[n]()
                end.record()
                end.synchronize()
                times[n].append(start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                variants[n]()
                times[n].append(time.perf_counter() - t0)
    return times


def median(xs):
    return statistics.median(xs)


def in_child(code):
    """Run ``python -c code`` in a fresh process (its own heap and allocator state) and return
    the JSON object its last stdout line prints; a failure raises with the child's last error
    line."""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if r.returncode != 0:
        err = r.stderr.strip().splitlines()
        raise RuntimeError(err[-1] if err else f"exit status {r.returncode}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def stream_bandwidth(device="cpu", numel=None, reps=15):
    """The streaming ceiling measured now: a.add_(b, alpha=s) moves 12 bytes per float32
    element (on this 2-core CPU it beats copy_). On CUDA also a device-to-device copy
    (8 bytes per element: read + write). Returns {name: GB/s}."""
    dev = torch.device(device)
    if numel is None:
        numel = 64 * 2**20 if dev.type == "cpu" else 256 * 2**20
    a = torch.randn(numel, device=dev)
    b = torch.randn(numel, device=dev)
    c = torch.empty_like(a)
    t = interleaved({"axpy": lambda: a.add_(b, alpha=1e-3), "copy": lambda: c.copy_(a)}, reps=reps, device=dev)
    return {"axpy": 12 * numel / median(t["axpy"]) / 1e9, "copy": 8 * numel / median(t["copy"]) / 1e9}


def proc_status_kb(field):
    """A field of /proc/self/status (VmRSS, VmHWM, ...) in KiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def rss_follows_use():
    """glibc only: every allocation of 64 KiB or more gets its own mapping, returned to the OS
    when freed (mallopt M_MMAP_THRESHOLD, which also stops glibc raising it), and the heap's
    free memory goes back now (malloc_trim). The resident set then follows the memory in use,
    not what the allocator keeps for reuse (which would hide new buffers). A no-op elsewhere."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 64 << 10)  # M_MMAP_THRESHOLD
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_bytes_over(device, run):
    """Peak memory while ``run()`` runs, above what is in use when it starts: CUDA's
    max_memory_allocated; on the CPU the resident set's high-water mark (VmHWM, restarted
    through /proc/self/clear_refs), with glibc's free memory returned first
    (rss_follows_use; call it before building the inputs too, so their buffers are mapped
    the same way)."""
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    rss_follows_use()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = proc_status_kb("VmRSS") * 1024
    run()
    return proc_status_kb("VmHWM") * 1024 - base
