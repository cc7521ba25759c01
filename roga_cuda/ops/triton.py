"""The triton backend: every primitive as Triton kernels that walk a whole tensor list per launch.

How a launch finds its data
---------------------------
A *plan* (cached, keyed on the op, the list count, the device, every tensor's numel and
dtype, and the table size) splits the list by dtype (the dtype is a compile-time constant
of the kernel) and into slices of at most ``MAX_TENSORS`` tensors; each slice is one
launch. Each launch owns a block table: program ``pid`` reads ``meta[pid] = (tensor slot,
element offset, length)`` (int64, so offsets past 2**31 elements are fine) and processes
``length <= CHUNK`` elements of that tensor. The data pointers live in a separate int64
table ``ptrs[list, slot]`` (read in the kernel and cast with ``.to(tl.pointer_type(dt))``),
cached and keyed on every data pointer of every list (plus the numels and dtypes), so a
reallocated gradient gives a new table, never a stale one; when only pointers moved, the
plan is reused and the new table costs one small asynchronous host-to-device copy. Dense
tensors in any layout (channels_last, ...) are walked in storage order; tensors at one
position must share their layout. A cache miss copies from pinned host memory, so warm the
tables up before capturing a CUDA graph.

Reductions (``norm``, ``gram``) are deterministic and use no atomics: stage 1 writes one
partial per program into a buffer (global partial index = launch base + pid); stage 2 is
one small kernel that sums the partials in a fixed order (per tensor for the per-tensor
norms). Math is float32 (float64 for float64 storage); reduction results are float32
(float64 when any input is float64); ``restore_`` copies bits as integers.

Block sizes: on a GPU fixed tiles (``GPU_BLOCK`` elements per step, ``GPU_CHUNK`` per
program). Under the interpreter (``TRITON_INTERPRET=1``, CPU tensors) each program costs
about a millisecond whatever its size, so chunks are huge (``INTERP_CHUNK``) and the tile
fits the largest block of the launch.

Import safety: ``import roga_cuda`` never fails because of Triton. Nothing here touches a
GPU driver at import time (no autotune, no driver query); ``backend()`` says why the
backend is unavailable.

``bench()`` times this backend against ``cuda`` and ``foreach`` on a GPU (wall time per
call and CUDA-graph device time, against a copy of the same bytes): the measurement that
``auto``'s order between ``cuda`` and ``triton`` is to be set from.
"""
import contextlib
import math
import struct
import sys
import time
from collections import OrderedDict
from itertools import chain
from operator import attrgetter

import torch

from .registry import Backend

try:
    import triton
    import triton.language as tl
except Exception as e:  # not installed, or a broken install: the backend is unavailable
    triton = tl = None
    _IMPORT_ERROR = f"{type(e).__name__}: {e}"
else:
    _IMPORT_ERROR = None

# Tensors per pointer/block table, i.e. per launch; longer lists are split into several
# launches (a test lowers it to exercise the split).
MAX_TENSORS = 4096
GPU_BLOCK = 2048  # elements per tile step on a GPU
GPU_CHUNK = 16384  # elements per program on a GPU (a multiple of GPU_BLOCK)
GPU_WARPS = 4
INTERP_CHUNK = 1 << 20  # the interpreter pays per program: few, large programs
INTERP_BLOCK_MAX = 1 << 16
STAGE2_BLOCK = 1024  # partials per step of the second reduction stage (GPU)
PER_TENSOR_TILE = (256, 16)  # (partials, tensors) per step of the per-tensor norms (GPU)
PLAN_CACHE_SIZE = 64  # plans (structure) kept
PTR_CACHE_SIZE = 32  # pointer tables kept (a few per list set: grads may move every step)

_numel = torch.Tensor.numel
_data_ptr = torch.Tensor.data_ptr
_is_contiguous = torch.Tensor.is_contiguous
_dtype_of = attrgetter("dtype")
_pack_f64 = struct.Struct("<d").pack
_unpack_i64 = struct.Struct("<q").unpack


def _f64_bits(x):
    """A Python float as the signed int64 of its IEEE bits: passed to a kernel as an integer
    and bitcast back there, so float64 lists get the exact double (Triton passes Python
    floats as float32)."""
    return _unpack_i64(_pack_f64(float(x)))[0]


def _next_pow2(n):
    return 1 << max(0, int(n) - 1).bit_length()


# ------------------------------------------------------------------------------- kernels

if triton is not None:
    # Every kernel is one flat function on purpose: under the interpreter each call of a
    # nested jit function costs about a millisecond (it re-patches triton.language), which
    # would double the cost of a program. Each kernel starts the same way: its block
    # (tensor slot t, element offset `off`, length n) from the block table, then the typed
    # pointers of tensor t in each list from the pointer table. Tiles run in two phases
    # (a static loop): full tiles without a mask (the compiler may vectorise them; with
    # ALIGNED every address of the launch is 16-byte aligned), then the masked tail.

    @triton.jit(do_not_specialize=["T", "pbase", "eta_bits"])
    def _norm_kernel(ptrs, meta, T, part, pbase, eta_bits, DT: tl.constexpr, ACC: tl.constexpr,
                     ASAM: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
        pid = tl.program_id(0).to(tl.int64)
        t = tl.load(meta + 3 * pid)
        off = tl.multiple_of(tl.load(meta + 3 * pid + 1), 16)  # a multiple of CHUNK
        n = tl.load(meta + 3 * pid + 2)
        x = tl.load(ptrs + t).to(tl.pointer_type(DT)) + off
        w = x
        if ASAM:  # the params of the ASAM norm
            w = tl.load(ptrs + T + t).to(tl.pointer_type(DT)) + off
        if ALIGNED:
            x = tl.multiple_of(x, 16)
            w = tl.multiple_of(w, 16)
        # Python floats arrive as the int64 of their IEEE bits (exact for float64 lists).
        eta = eta_bits.to(tl.int64).to(tl.float64, bitcast=True).to(ACC)
        r = tl.arange(0, BLOCK)
        nfull = n // BLOCK * BLOCK
        acc = tl.zeros([BLOCK], ACC)
        for TAIL in tl.static_range(2):
            for i in range(nfull if TAIL else 0, n if TAIL else nfull, BLOCK):
                idx = i + r
                m = idx < n if TAIL else None
                z = 0.0 if TAIL else None
                v = tl.load(x + idx, mask=m, other=z).to(ACC)
                if ASAM:  # || (|p| + eta) * x ||
                    v = (tl.abs(tl.load(w + idx, mask=m, other=z).to(ACC)) + eta) * v
                acc += v * v
        tl.store(part + pbase + pid, tl.sum(acc, axis=0))

    @triton.jit(do_not_specialize=["NB", "N", "MAXC"])
    def _norm_final(part, NB, pt, N, MAXC, total, per, ACC: tl.constexpr, IS64: tl.constexpr,
                    RB: tl.constexpr, TB: tl.constexpr, CB: tl.constexpr):
        # Program 0: the global norm from all partials. Program 1 + g: the per-tensor norms
        # of tensors [g*TB, (g+1)*TB), a [TB, CB] tile of their partial ranges per step (a
        # tensor's partials are contiguous, at most MAXC of them). Fixed summation orders.
        # (The two branches share no variable names: compiled Triton would have to merge them.)
        pid = tl.program_id(0)
        if pid == 0:
            rr = tl.arange(0, RB)
            tot = tl.zeros([RB], ACC)
            for j in range(0, NB, RB):
                tot += tl.load(part + j + rr, mask=j + rr < NB, other=0.0)
            s = tl.sum(tot, axis=0)
            if IS64:
                s = tl.sqrt(s)
            else:
                s = tl.sqrt_rn(s)  # IEEE-rounded, not the fast approximation
            tl.store(total, s)
        else:
            i = (pid - 1).to(tl.int64) * TB + tl.arange(0, TB)
            m = i < N
            start = tl.load(pt + 2 * i, mask=m, other=0)
            cnt = tl.load(pt + 2 * i + 1, mask=m, other=0)
            c = tl.arange(0, CB)
            acc = tl.zeros([TB, CB], ACC)
            for c0 in range(0, MAXC, CB):
                cc = c0 + c
                acc += tl.load(part + start[:, None] + cc[None, :], mask=cc[None, :] < cnt[:, None], other=0.0)
            ps = tl.sum(acc, axis=1)
            if IS64:
                ps = tl.sqrt(ps)
            else:
                ps = tl.sqrt_rn(ps)
            tl.store(per + i, ps, mask=m)

    @triton.jit(do_not_specialize=["T", "s_bits", "eta_bits"])
    def _perturb_kernel(ptrs, meta, T, s_ptr, s_bits, eta_bits, DT: tl.constexpr, IT: tl.constexpr,
                        ACC: tl.constexpr, ADAPTIVE: tl.constexpr, S_PTR: tl.constexpr,
                        BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
        pid = tl.program_id(0).to(tl.int64)
        t = tl.load(meta + 3 * pid)
        off = tl.multiple_of(tl.load(meta + 3 * pid + 1), 16)
        n = tl.load(meta + 3 * pid + 2)
        # params and backup through integer pointers of the element width: a bit copy
        p = tl.load(ptrs + t).to(tl.pointer_type(IT)) + off
        g = tl.load(ptrs + T + t).to(tl.pointer_type(DT)) + off
        b = tl.load(ptrs + 2 * T + t).to(tl.pointer_type(IT)) + off
        if ALIGNED:
            p = tl.multiple_of(p, 16)
            g = tl.multiple_of(g, 16)
            b = tl.multiple_of(b, 16)
        if S_PTR:  # a 0-d device tensor, read here: no host synchronisation
            s = tl.load(s_ptr).to(ACC)
        else:
            s = s_bits.to(tl.int64).to(tl.float64, bitcast=True).to(ACC)
        eta = eta_bits.to(tl.int64).to(tl.float64, bitcast=True).to(ACC)
        r = tl.arange(0, BLOCK)
        nfull = n // BLOCK * BLOCK
        for TAIL in tl.static_range(2):
            for i in range(nfull if TAIL else 0, n if TAIL else nfull, BLOCK):
                idx = i + r
                m = idx < n if TAIL else None
                pbits = tl.load(p + idx, mask=m)
                gv = tl.load(g + idx, mask=m).to(ACC)
                pv = pbits.to(DT, bitcast=True).to(ACC)
                if ADAPTIVE:  # ASAM: scale * (|p| + eta)^2 * g
                    u = tl.abs(pv) + eta
                    gv = (u * u) * gv
                tl.store(b + idx, pbits, mask=m)
                tl.store(p + idx, (pv + s * gv).to(DT).to(IT, bitcast=True), mask=m)

    @triton.jit(do_not_specialize=["T"])
    def _restore_kernel(ptrs, meta, T, IT: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
        pid = tl.program_id(0).to(tl.int64)
        t = tl.load(meta + 3 * pid)
        off = tl.multiple_of(tl.load(meta + 3 * pid + 1), 16)
        n = tl.load(meta + 3 * pid + 2)
        p = tl.load(ptrs + t).to(tl.pointer_type(IT)) + off  # integers: bit-exact
        b = tl.load(ptrs + T + t).to(tl.pointer_type(IT)) + off
        if ALIGNED:
            p = tl.multiple_of(p, 16)
            b = tl.multiple_of(b, 16)
        r = tl.arange(0, BLOCK)
        nfull = n // BLOCK * BLOCK
        for TAIL in tl.static_range(2):
            for i in range(nfull if TAIL else 0, n if TAIL else nfull, BLOCK):
                idx = i + r
                m = idx < n if TAIL else None
                tl.store(p + idx, tl.load(b + idx, mask=m), mask=m)

    @triton.jit(do_not_specialize=["T", "w_bits"])
    def _restore_acc_kernel(ptrs, meta, T, w_ptr, w_bits, DT: tl.constexpr, IT: tl.constexpr,
                            ACC: tl.constexpr, W_PTR: tl.constexpr, BLOCK: tl.constexpr,
                            ALIGNED: tl.constexpr):
        pid = tl.program_id(0).to(tl.int64)
        t = tl.load(meta + 3 * pid)
        off = tl.multiple_of(tl.load(meta + 3 * pid + 1), 16)
        n = tl.load(meta + 3 * pid + 2)
        p = tl.load(ptrs + t).to(tl.pointer_type(IT)) + off  # params <- backup as integers
        b = tl.load(ptrs + T + t).to(tl.pointer_type(IT)) + off
        a = tl.load(ptrs + 2 * T + t).to(tl.pointer_type(DT)) + off
        g = tl.load(ptrs + 3 * T + t).to(tl.pointer_type(DT)) + off
        if ALIGNED:
            p = tl.multiple_of(p, 16)
            b = tl.multiple_of(b, 16)
            a = tl.multiple_of(a, 16)
            g = tl.multiple_of(g, 16)
        if W_PTR:
            w = tl.load(w_ptr).to(ACC)
        else:
            w = w_bits.to(tl.int64).to(tl.float64, bitcast=True).to(ACC)
        r = tl.arange(0, BLOCK)
        nfull = n // BLOCK * BLOCK
        for TAIL in tl.static_range(2):
            for i in range(nfull if TAIL else 0, n if TAIL else nfull, BLOCK):
                idx = i + r
                m = idx < n if TAIL else None
                tl.store(p + idx, tl.load(b + idx, mask=m), mask=m)
                av = tl.load(a + idx, mask=m).to(ACC)
                gv = tl.load(g + idx, mask=m).to(ACC)
                tl.store(a + idx, (av + w * gv).to(DT), mask=m)

    @triton.jit(do_not_specialize=["T", "pbase"])
    def _gram_kernel(ptrs, meta, T, part, pbase, K: tl.constexpr, KP: tl.constexpr, DT: tl.constexpr,
                     ACC: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
        # One pass over the K lists: a [KP, BLOCK] tile (row k from list k; rows >= K are
        # masked) per step, all K*K products at once.
        pid = tl.program_id(0).to(tl.int64)
        t = tl.load(meta + 3 * pid)
        off = tl.multiple_of(tl.load(meta + 3 * pid + 1), 16)
        n = tl.load(meta + 3 * pid + 2)
        k = tl.arange(0, KP)
        rows = k < K
        base = tl.load(ptrs + k * T + t, mask=rows, other=0).to(tl.pointer_type(DT)) + off
        if ALIGNED:
            base = tl.multiple_of(base, [16])
        r = tl.arange(0, BLOCK)
        nfull = n // BLOCK * BLOCK
        acc = tl.zeros([KP, KP, BLOCK], ACC)
        for TAIL in tl.static_range(2):
            for i in range(nfull if TAIL else 0, n if TAIL else nfull, BLOCK):
                idx = i + r
                if TAIL:
                    x = tl.load(base[:, None] + idx[None, :], mask=rows[:, None] & (idx < n)[None, :], other=0.0)
                elif KP != K:
                    x = tl.load(base[:, None] + idx[None, :], mask=rows[:, None], other=0.0)
                else:
                    x = tl.load(base[:, None] + idx[None, :])
                x = x.to(ACC)
                acc += x[:, None, :] * x[None, :, :]
        a = k[:, None]
        b = k[None, :]
        tl.store(part + (pbase + pid) * (K * K) + a * K + b, tl.sum(acc, axis=2), mask=(a < K) & (b < K))

    @triton.jit(do_not_specialize=["NB"])
    def _gram_final(part, NB, out, K: tl.constexpr, KP: tl.constexpr, ACC: tl.constexpr,
                    RB: tl.constexpr):
        # G[a, b] and G[b, a] both sum the partials of the pair (min, max) in one fixed
        # order, so G is exactly symmetric.
        q = tl.arange(0, KP * KP)
        a = q // KP
        b = q % KP
        valid = (a < K) & (b < K)
        src = tl.minimum(a, b) * K + tl.maximum(a, b)
        r = tl.arange(0, RB)
        acc = tl.zeros([RB, KP * KP], ACC)
        for j in range(0, NB, RB):
            blk = (j + r).to(tl.int64)
            acc += tl.load(part + blk[:, None] * (K * K) + src[None, :],
                           mask=(blk < NB)[:, None] & valid[None, :], other=0.0)
        tl.store(out + a * K + b, tl.sum(acc, axis=0), mask=valid)

    @triton.jit(do_not_specialize=["T"])
    def _combine_kernel(ptrs, meta, T, w_ptr, K: tl.constexpr, DT: tl.constexpr, ACC: tl.constexpr,
                        BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
        # Row 0 of the pointer table is `out`, rows 1..K the inputs. A tile reads all K
        # inputs before writing `out`, so `out` may be one of them. The K terms are added
        # in list order (an unrolled loop; the table entries it re-reads per tile are cached).
        pid = tl.program_id(0).to(tl.int64)
        t = tl.load(meta + 3 * pid)
        off = tl.multiple_of(tl.load(meta + 3 * pid + 1), 16)
        n = tl.load(meta + 3 * pid + 2)
        o = tl.load(ptrs + t).to(tl.pointer_type(DT)) + off
        if ALIGNED:
            o = tl.multiple_of(o, 16)
        r = tl.arange(0, BLOCK)
        nfull = n // BLOCK * BLOCK
        for TAIL in tl.static_range(2):
            for i in range(nfull if TAIL else 0, n if TAIL else nfull, BLOCK):
                idx = i + r
                m = idx < n if TAIL else None
                y = tl.zeros([BLOCK], ACC)
                for k in tl.static_range(K):
                    x = tl.load(ptrs + (k + 1) * T + t).to(tl.pointer_type(DT)) + off
                    if ALIGNED:
                        x = tl.multiple_of(x, 16)
                    y += tl.load(w_ptr + k).to(ACC) * tl.load(x + idx, mask=m).to(ACC)
                tl.store(o + idx, y.to(DT), mask=m)

    # The fused updates. Pointer-table rows: 0 params, 1 source (= params without one),
    # 2 grad_out, 3..5 optimizer state, 6 the step count (one float per tensor, not offset),
    # 7.. the K gradients. Rows a flag leaves unused hold the params' pointers. All tiles
    # are masked (found_inf folds into the mask: a skipped update only copies the source).
    # _update_tile and _update_block are what the sgd and adam kernels share.
    @triton.jit
    def _update_tile(ptrs, meta, T, found_ptr, DT: tl.constexpr, FOUND: tl.constexpr, BLOCK: tl.constexpr):
        # This program's tensor t, its tile (offset, length), the params, source and grad_out
        # pointers, and `live`: a block of True, or found_inf == 0 broadcast over the tile.
        pid = tl.program_id(0).to(tl.int64)
        t = tl.load(meta + 3 * pid)
        off = tl.load(meta + 3 * pid + 1)
        n = tl.load(meta + 3 * pid + 2)
        p = tl.load(ptrs + t).to(tl.pointer_type(DT)) + off
        src = tl.load(ptrs + T + t).to(tl.pointer_type(DT)) + off
        gout = tl.load(ptrs + 2 * T + t).to(tl.pointer_type(DT)) + off
        live = tl.full([BLOCK], 1, tl.int1)
        if FOUND:
            live = (tl.zeros([BLOCK], tl.float32) + tl.load(found_ptr).to(tl.float32)) == 0.0
        return t, off, n, p, src, gout, live

    @triton.jit
    def _update_block(ptrs, T, t, off, n, i, live, w_ptr, src, gout, K: tl.constexpr, DT: tl.constexpr,
                      ACC: tl.constexpr, HAS_GOUT: tl.constexpr, MAXIMIZE: tl.constexpr, DIRECT: tl.constexpr,
                      BLOCK: tl.constexpr):
        # The block of the tile at i: its indices, masks (m: in the tile; mu: and updated), the
        # combined gradient (stored to grad_out before `maximize` negates it), the direct row's
        # combination (zeros without DIRECT: the weights then hold K values) and the source.
        idx = i + tl.arange(0, BLOCK)
        m = idx < n
        mu = m & live
        g = tl.zeros([BLOCK], ACC)
        d = tl.zeros([BLOCK], ACC)
        for k in tl.static_range(K):
            x = tl.load(ptrs + (7 + k) * T + t).to(tl.pointer_type(DT)) + off
            xk = tl.load(x + idx, mask=mu, other=0.0).to(ACC)
            g += tl.load(w_ptr + k).to(ACC) * xk
            if DIRECT:
                d += tl.load(w_ptr + K + k).to(ACC) * xk
        if HAS_GOUT:
            tl.store(gout + idx, g.to(DT), mask=mu)
        if MAXIMIZE:
            g = -g
        xv = tl.load(src + idx, mask=m, other=0.0)
        return idx, m, mu, g, d, xv

    @triton.jit(do_not_specialize=["T", "lr_bits", "mom_bits", "damp_bits", "wd_bits"])
    def _sgd_kernel(ptrs, meta, T, w_ptr, lr_ptr, lr_bits, found_ptr, mom_bits, damp_bits, wd_bits,
                    K: tl.constexpr, DT: tl.constexpr, ACC: tl.constexpr, HAS_SRC: tl.constexpr,
                    HAS_GOUT: tl.constexpr, MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr, WD: tl.constexpr,
                    MAXIMIZE: tl.constexpr, LR_PTR: tl.constexpr, FOUND: tl.constexpr, DIRECT: tl.constexpr,
                    BLOCK: tl.constexpr):
        t, off, n, p, src, gout, live = _update_tile(ptrs, meta, T, found_ptr, DT, FOUND, BLOCK)
        buf = tl.load(ptrs + 3 * T + t).to(tl.pointer_type(DT)) + off
        step = tl.load(tl.load(ptrs + 6 * T + t).to(tl.pointer_type(tl.float32)))
        if LR_PTR:
            lr = tl.load(lr_ptr).to(ACC)
        else:
            lr = lr_bits.to(tl.int64).to(tl.float64, bitcast=True).to(ACC)
        mom = mom_bits.to(tl.int64).to(tl.float64, bitcast=True).to(ACC)
        damp = (1.0 - damp_bits.to(tl.int64).to(tl.float64, bitcast=True)).to(ACC)  # 1 - dampening
        wd = wd_bits.to(tl.int64).to(tl.float64, bitcast=True).to(ACC)
        dead = live == 0
        for i in range(0, n, BLOCK):
            idx, m, mu, g, d, xv = _update_block(ptrs, T, t, off, n, i, live, w_ptr, src, gout, K, DT, ACC,
                                                 HAS_GOUT, MAXIMIZE, DIRECT, BLOCK)
            xa = xv.to(ACC)
            if WD:
                g = g + wd * xa
            if MOMENTUM:
                b = mom * tl.load(buf + idx, mask=mu, other=0.0).to(ACC) + damp * g
                b = tl.where(step == 0.0, g, b)
                tl.store(buf + idx, b.to(DT), mask=mu)
                if NESTEROV:
                    g = g + mom * b
                else:
                    g = b
            y = xa - lr * g
            if DIRECT:
                y = y - lr * d
            tl.store(p + idx, y.to(DT), mask=mu)
            if HAS_SRC and FOUND:  # a skipped update still restores
                tl.store(p + idx, xv, mask=m & dead)

    @triton.jit(do_not_specialize=["T", "lr_bits", "b1_bits", "b2_bits", "lb1_bits", "lb2_bits", "eps_bits",
                                   "wd_bits"])
    def _adam_kernel(ptrs, meta, T, w_ptr, lr_ptr, lr_bits, found_ptr, b1_bits, b2_bits, lb1_bits, lb2_bits,
                     eps_bits, wd_bits, K: tl.constexpr, DT: tl.constexpr, ACC: tl.constexpr, HAS_SRC: tl.constexpr,
                     HAS_GOUT: tl.constexpr, WD: tl.constexpr, DECOUPLED: tl.constexpr, AMSGRAD: tl.constexpr,
                     MAXIMIZE: tl.constexpr, LR_PTR: tl.constexpr, FOUND: tl.constexpr, DIRECT: tl.constexpr,
                     BLOCK: tl.constexpr):
        t, off, n, p, src, gout, live = _update_tile(ptrs, meta, T, found_ptr, DT, FOUND, BLOCK)
        mp = tl.load(ptrs + 3 * T + t).to(tl.pointer_type(DT)) + off
        vp = tl.load(ptrs + 4 * T + t).to(tl.pointer_type(DT)) + off
        qp = tl.load(ptrs + 5 * T + t).to(tl.pointer_type(DT)) + off
        step = tl.load(tl.load(ptrs + 6 * T + t).to(tl.pointer_type(tl.float32))).to(tl.float64) + 1.0
        if LR_PTR:
            lr = tl.load(lr_ptr).to(tl.float64)
        else:
            lr = lr_bits.to(tl.int64).to(tl.float64, bitcast=True)
        b1 = b1_bits.to(tl.int64).to(tl.float64, bitcast=True)
        b2 = b2_bits.to(tl.int64).to(tl.float64, bitcast=True)
        # beta^step as exp(step * log(beta)), in float64, as torch's host-side bias corrections
        bc1 = 1.0 - tl.exp(step * lb1_bits.to(tl.int64).to(tl.float64, bitcast=True))
        bc2 = 1.0 - tl.exp(step * lb2_bits.to(tl.int64).to(tl.float64, bitcast=True))
        step_size = (lr / bc1).to(ACC)
        bc2s = tl.sqrt(bc2).to(ACC)
        eps = eps_bits.to(tl.int64).to(tl.float64, bitcast=True).to(ACC)
        wdd = wd_bits.to(tl.int64).to(tl.float64, bitcast=True)
        wd = wdd.to(ACC)
        decay = (1.0 - lr * wdd).to(ACC)
        a1 = (1.0 - b1).to(ACC)
        b2a = b2.to(ACC)
        a2 = (1.0 - b2).to(ACC)
        dead = live == 0
        for i in range(0, n, BLOCK):
            idx, m, mu, g, d, xv = _update_block(ptrs, T, t, off, n, i, live, w_ptr, src, gout, K, DT, ACC,
                                                 HAS_GOUT, MAXIMIZE, DIRECT, BLOCK)
            xa = xv.to(ACC)
            if WD:
                if DECOUPLED:
                    xa = xa * decay
                else:
                    g = g + wd * xa
            m0 = tl.load(mp + idx, mask=mu, other=0.0).to(ACC)
            mv = m0 + a1 * (g - m0)
            vv = b2a * tl.load(vp + idx, mask=mu, other=0.0).to(ACC) + a2 * g * g
            tl.store(mp + idx, mv.to(DT), mask=mu)
            tl.store(vp + idx, vv.to(DT), mask=mu)
            q = vv
            if AMSGRAD:
                q = tl.maximum(tl.load(qp + idx, mask=mu, other=0.0).to(ACC), vv)
                tl.store(qp + idx, q.to(DT), mask=mu)
            y = xa - step_size * (mv / (tl.sqrt(q) / bc2s + eps))
            if DIRECT:
                y = y - lr.to(ACC) * d
            tl.store(p + idx, y.to(DT), mask=mu)
            if HAS_SRC and FOUND:
                tl.store(p + idx, xv, mask=m & dead)

    # The interpreter swaps triton.jit for its own class; CPU tensors work only then (the
    # kernels dereference raw host addresses from the pointer table).
    INTERPRET = type(_norm_kernel).__name__ == "InterpretedFunction"
    _DT = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32,
           torch.float64: tl.float64}
    _IT = {2: tl.int16, 4: tl.int32, 8: tl.int64}
else:
    INTERPRET = False


# ------------------------------------------------------------------------ availability

def _unavailable_reason():
    if triton is None:
        return f"triton is not importable ({_IMPORT_ERROR}); install it with `pip install triton`"
    if INTERPRET:
        return None
    if not torch.cuda.is_available():
        return ("no GPU: torch.cuda.is_available() is False (Triton kernels need a CUDA/ROCm device; "
                "set TRITON_INTERPRET=1 before importing roga_cuda to run them on CPU tensors through "
                "Triton's interpreter)")
    try:  # which GPU backends this triton ships (no driver is touched here)
        from triton.backends import backends as _tb
        kinds = set(_tb)
    except Exception as e:
        return f"triton has no usable GPU backend ({type(e).__name__}: {e})"
    want = "amd" if getattr(torch.version, "hip", None) else "nvidia"
    if want not in kinds:
        return f"triton {triton.__version__} has no {want} backend (has: {sorted(kinds)})"
    return None


def backend():
    mod = sys.modules[__name__]
    reason = _unavailable_reason()
    devices = ("cpu",) if INTERPRET else ("cuda",)
    extra = {"interpret": INTERPRET, "triton_version": getattr(triton, "__version__", None)}
    return Backend("triton", mod, reason is None, reason, devices, extra=extra)


# -------------------------------------------------------------------- plans and tables

class _LRU(OrderedDict):
    def __init__(self, maxsize):
        super().__init__()
        self.maxsize = maxsize

    def lookup(self, key):
        v = self.get(key)
        if v is not None:
            self.move_to_end(key)
        return v

    def put(self, key, value):
        self[key] = value
        if len(self) > self.maxsize:
            self.popitem(last=False)
        return value


_plans = _LRU(PLAN_CACHE_SIZE)  # structure, keyed on numels and dtypes
_tables_cache = _LRU(PTR_CACHE_SIZE)  # pointer tables, keyed on data pointers
_weights_cache = _LRU(16)
stats = {"plans_built": 0, "ptr_tables_built": 0, "launches": 0}


def clear_cache():
    """Drop every cached plan, pointer table and weight vector."""
    _plans.clear()
    _tables_cache.clear()
    _weights_cache.clear()


class _Launch:
    __slots__ = ("dtype", "tdt", "it", "acc", "t", "nb", "block", "pbase", "meta", "prow")

    def __init__(self, dtype, t, nb, block, pbase, prow):
        self.dtype, self.t, self.nb, self.block, self.pbase, self.prow = dtype, t, nb, block, pbase, prow
        self.tdt = _DT[dtype]
        self.it = _IT[torch.empty((), dtype=dtype).element_size()]
        self.acc = tl.float64 if dtype == torch.float64 else tl.float32
        self.meta = None


class _Plan:
    """The structure of one (op, list count, numels, dtypes) on one device: launches with
    their block tables on the device, the per-tensor partial ranges, and the gather order
    that lays a pointer tuple out as the launches' pointer tables."""

    def __init__(self, nlists, numels, dtypes, device, block_for):
        chunk = INTERP_CHUNK if INTERPRET else GPU_CHUNK
        self.nlists = nlists
        self.n = n = len(numels)
        self.device = device
        self.out_dtype = torch.float64 if torch.float64 in dtypes else torch.float32
        groups = {}
        for i, (ne, dt) in enumerate(zip(numels, dtypes)):
            if ne:  # 0-element tensors need no program (and may have any data pointer)
                groups.setdefault(dt, []).append(i)
        self.launches = []
        metas, perm = [], []
        pt = torch.zeros(n, 2, dtype=torch.int64)  # per tensor: first partial, partial count
        pbase = prow = 0
        for dt, idx in groups.items():
            for s in range(0, len(idx), MAX_TENSORS):
                sl = torch.tensor(idx[s:s + MAX_TENSORS], dtype=torch.int64)
                ns = torch.tensor(numels, dtype=torch.int64)[sl]
                nbt = (ns + chunk - 1) // chunk  # blocks per tensor
                tslot = torch.repeat_interleave(torch.arange(len(sl)), nbt)
                first = torch.cumsum(nbt, 0) - nbt
                off = (torch.arange(len(tslot)) - first[tslot]) * chunk
                length = torch.minimum(ns[tslot] - off, torch.tensor(chunk))
                metas.append(torch.stack([tslot, off, length], 1).reshape(-1))
                pt[sl, 0] = pbase + first
                pt[sl, 1] = nbt
                la = _Launch(dt, len(sl), len(tslot), block_for(int(length.max())), pbase, prow)
                self.launches.append(la)
                # pointer table of this launch: row l holds list l's tensors of the slice
                perm.append((torch.arange(nlists)[:, None] * n + sl[None, :]).reshape(-1))
                pbase += la.nb
                prow += nlists * la.t
        self.nparts = pbase
        self.maxc = int(pt[:, 1].max()) if n else 0
        self.perm = torch.cat(perm) if perm else torch.zeros(0, dtype=torch.int64)
        host = torch.cat(metas + [pt.reshape(-1)])
        dev = _to_device(host, device)
        o = 0
        for la, m in zip(self.launches, metas):
            la.meta = dev[o:o + m.numel()]
            o += m.numel()
        self.pt = dev[o:]
        stats["plans_built"] += 1

    def pointer_tables(self, pkey):
        """The launches' pointer tables (device) and alignment flags for these data pointers."""
        host = torch.tensor(pkey, dtype=torch.int64)[self.perm]
        dev = _to_device(host, self.device)
        tables, aligned = [], []
        for la in self.launches:
            seg = slice(la.prow, la.prow + self.nlists * la.t)
            tables.append(dev[seg])
            aligned.append(not bool(torch.any(host[seg] & 15)))
        stats["ptr_tables_built"] += 1
        return tables, aligned


def _to_device(host, device):
    if device.type == "cpu":
        return host
    # pinned + non_blocking: the copy is queued on the current stream, no host sync
    return host.pin_memory().to(device, non_blocking=True)


def _dense(t):
    # Non-overlapping and dense: ordered by stride, the dims longer than 1 tile storage exactly.
    expect = 1
    for st, sz in sorted((st, sz) for sz, st in zip(t.shape, t.stride()) if sz > 1):
        if st != expect:
            return False
        expect *= sz
    return True


def _check_layout(op, lists):
    """Walking storage needs dense tensors with one element order at each position."""
    if all(all(map(_is_contiguous, lst)) for lst in lists):
        return  # the common case, cheap
    for i, ref in enumerate(lists[0]):
        for j, lst in enumerate(lists):
            t = lst[i]
            if t.numel() == 0:
                continue
            if not _dense(t):
                raise ValueError(f"{op}: tensor {i} of argument {j} is not contiguous (sizes {list(t.shape)}, "
                                 f"strides {list(t.stride())}); the Triton kernels walk raw storage: pass dense "
                                 "tensors (e.g. .contiguous())")
            if j and any(s > 1 and a != b for s, a, b in zip(t.shape, t.stride(), ref.stride())):
                raise ValueError(f"{op}: tensor {i} of argument {j} has strides {list(t.stride())} but argument 0 "
                                 f"has {list(ref.stride())}; tensors at one position need one memory layout "
                                 "(make both .contiguous())")


def _config():
    return MAX_TENSORS, GPU_BLOCK, GPU_CHUNK, INTERP_CHUNK, INTERP_BLOCK_MAX


def _tables(op, kind, lists, block_for):
    """(plan, pointer tables, alignment flags) for these lists; cached, never stale.

    The hit path is one dict lookup on every data pointer of every list, then a check that
    the numels and dtypes are those the entry was built for (a new tensor may reuse an old
    address). A miss reuses the plan when only pointers moved (one small host-to-device
    copy) and builds a plan only for a new structure."""
    _check_layout(op, lists)
    l0 = lists[0]
    device = l0[0].device
    sig = (tuple(map(_numel, l0)), tuple(map(_dtype_of, l0)))
    pkey = tuple(map(_data_ptr, chain.from_iterable(lists)))
    key = (kind, len(lists), device, _config(), pkey)
    ent = _tables_cache.lookup(key)
    if ent is not None and ent[0] == sig:
        return ent[1], ent[2], ent[3]
    skey = (kind, len(lists), device, _config(), sig)
    plan = _plans.lookup(skey)
    if plan is None:
        if device.type != ("cpu" if INTERPRET else "cuda"):
            # The tables hold raw addresses: host memory for the interpreter, device memory
            # for compiled kernels. Anything else would crash, not raise.
            raise ValueError(f"{op}: backend 'triton' runs on {'cpu' if INTERPRET else 'cuda'} tensors here "
                             f"(TRITON_INTERPRET={'1' if INTERPRET else 'unset'}), but the tensors are on {device}")
        plan = _plans.put(skey, _Plan(len(lists), sig[0], sig[1], device, block_for))
    tables, aligned = plan.pointer_tables(pkey)
    _tables_cache.put(key, (sig, plan, tables, aligned))
    return plan, tables, aligned


def _device_ctx(device):
    # Triton launches on the current CUDA device: switch when the tensors live elsewhere.
    if device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device():
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def _elementwise_block(maxlen):
    return max(16, min(_next_pow2(maxlen), INTERP_BLOCK_MAX)) if INTERPRET else GPU_BLOCK


def _gram_block(kp):
    # The [KP, KP, BLOCK] accumulator lives in registers on a GPU: shrink the tile with K.
    cap = max(16, (1 << 18) // (kp * kp)) if INTERPRET else max(32, min(GPU_BLOCK, 4096 // (kp * kp)))
    return (lambda maxlen: max(16, min(_next_pow2(maxlen), cap))) if INTERPRET else (lambda maxlen: cap)


def _combine_block(kp):
    cap = max(16, (1 << 18) // kp) if INTERPRET else max(128, min(GPU_BLOCK, 8192 // kp))
    return (lambda maxlen: max(16, min(_next_pow2(maxlen), cap))) if INTERPRET else (lambda maxlen: cap)


def _stage2_block(n):
    return max(16, min(_next_pow2(n), 1 << 16)) if INTERPRET else STAGE2_BLOCK


def _warps():
    return GPU_WARPS


# --------------------------------------------------------------------------- primitives

def _norm_impl(ts, per_tensor, params, eta):
    lists = [ts] if params is None else [ts, params]
    plan, tables, aligned = _tables("norm", "norm", lists, _elementwise_block)
    dev = plan.device
    out_dt = plan.out_dtype
    part = torch.empty(max(plan.nparts, 1), dtype=out_dt, device=dev)
    total = torch.empty((), dtype=out_dt, device=dev)
    per = torch.empty(plan.n, dtype=out_dt, device=dev) if per_tensor else total
    eta_bits = _f64_bits(eta)
    with _device_ctx(dev):
        for la, ptrs, al in zip(plan.launches, tables, aligned):
            _norm_kernel[(la.nb,)](ptrs, la.meta, la.t, part, la.pbase, eta_bits, DT=la.tdt, ACC=la.acc,
                                   ASAM=params is not None, BLOCK=la.block, ALIGNED=al, num_warps=_warps())
        if INTERPRET:  # one program for the per-tensor norms when it fits
            cb = max(1, min(_next_pow2(plan.maxc), 1024))
            tb = max(1, min(_next_pow2(plan.n), (1 << 16) // cb))
        else:
            cb, tb = PER_TENSOR_TILE
        grid = 1 + (triton.cdiv(plan.n, tb) if per_tensor else 0)
        is64 = out_dt == torch.float64
        _norm_final[(grid,)](part, plan.nparts, plan.pt, plan.n, plan.maxc, total, per,
                             ACC=tl.float64 if is64 else tl.float32, IS64=is64,
                             RB=_stage2_block(plan.nparts), TB=tb, CB=cb, num_warps=_warps())
    stats["launches"] += len(plan.launches) + 1
    return total, (per if per_tensor else None)


def _scalar_args(s, anchor):
    """(pointer, bits, from_pointer) for a Python float or a 0-d device tensor."""
    if isinstance(s, torch.Tensor):
        return s, 0, True
    return anchor, _f64_bits(s), False


def _perturb__impl(params, grads, backup, scale, adaptive, eta):
    plan, tables, aligned = _tables("perturb_", "perturb", [params, grads, backup], _elementwise_block)
    eta_bits = _f64_bits(eta)
    with _device_ctx(plan.device):
        for la, ptrs, al in zip(plan.launches, tables, aligned):
            s_ptr, s_bits, s_is_ptr = _scalar_args(scale, la.meta)
            _perturb_kernel[(la.nb,)](ptrs, la.meta, la.t, s_ptr, s_bits, eta_bits, DT=la.tdt, IT=la.it,
                                      ACC=la.acc, ADAPTIVE=bool(adaptive), S_PTR=s_is_ptr, BLOCK=la.block,
                                      ALIGNED=al, num_warps=_warps())
    stats["launches"] += len(plan.launches)
    torch.autograd.graph.increment_version(params)
    torch.autograd.graph.increment_version(backup)


def _restore__impl(params, backup):
    plan, tables, aligned = _tables("restore_", "restore", [params, backup], _elementwise_block)
    with _device_ctx(plan.device):
        for la, ptrs, al in zip(plan.launches, tables, aligned):
            _restore_kernel[(la.nb,)](ptrs, la.meta, la.t, IT=la.it, BLOCK=la.block, ALIGNED=al,
                                      num_warps=_warps())
    stats["launches"] += len(plan.launches)
    torch.autograd.graph.increment_version(params)


def _restore_accumulate__impl(params, backup, acc, grads, weight):
    plan, tables, aligned = _tables("restore_accumulate_", "restore_acc", [params, backup, acc, grads],
                                    _elementwise_block)
    with _device_ctx(plan.device):
        for la, ptrs, al in zip(plan.launches, tables, aligned):
            w_ptr, w_bits, w_is_ptr = _scalar_args(weight, la.meta)
            _restore_acc_kernel[(la.nb,)](ptrs, la.meta, la.t, w_ptr, w_bits, DT=la.tdt, IT=la.it, ACC=la.acc,
                                          W_PTR=w_is_ptr, BLOCK=la.block, ALIGNED=al, num_warps=_warps())
    stats["launches"] += len(plan.launches)
    torch.autograd.graph.increment_version(params)
    torch.autograd.graph.increment_version(acc)


def _gram_impl(lists):
    k = len(lists)
    kp = _next_pow2(k)
    plan, tables, aligned = _tables("gram", "gram", lists, _gram_block(kp))
    dev = plan.device
    out_dt = plan.out_dtype
    acc_t = tl.float64 if out_dt == torch.float64 else tl.float32
    part = torch.empty(max(plan.nparts, 1) * k * k, dtype=out_dt, device=dev)
    out = torch.empty(k, k, dtype=out_dt, device=dev)
    with _device_ctx(dev):
        for la, ptrs, al in zip(plan.launches, tables, aligned):
            _gram_kernel[(la.nb,)](ptrs, la.meta, la.t, part, la.pbase, K=k, KP=kp, DT=la.tdt, ACC=la.acc,
                                   BLOCK=la.block, ALIGNED=al, num_warps=_warps())
        rb = max(1, _stage2_block(plan.nparts) // (kp * kp)) if INTERPRET else max(16, STAGE2_BLOCK // (kp * kp))
        _gram_final[(1,)](part, plan.nparts, out, K=k, KP=kp, ACC=acc_t, RB=_next_pow2(rb), num_warps=_warps())
    stats["launches"] += len(plan.launches) + 1
    return out


def _combine__impl(out, lists, weights):
    k = len(lists)
    kp = _next_pow2(k)
    plan, tables, aligned = _tables("combine_", "combine", [out] + list(lists), _combine_block(kp))
    dev = plan.device
    w = weights if isinstance(weights, torch.Tensor) else _weights_tensor(weights, dev)
    with _device_ctx(dev):
        for la, ptrs, al in zip(plan.launches, tables, aligned):
            _combine_kernel[(la.nb,)](ptrs, la.meta, la.t, w, K=k, DT=la.tdt, ACC=la.acc, BLOCK=la.block,
                                      ALIGNED=al, num_warps=_warps())
    stats["launches"] += len(plan.launches)
    torch.autograd.graph.increment_version(out)


def _weights_tensor(weights, device):
    # Python-float weights travel as one float64 vector, cached by value (RoGA's fixed
    # [1, 1/K] never copies again; changing PCGrad weights cost one async copy).
    key = (device, tuple(weights))
    w = _weights_cache.lookup(key)
    if w is None:
        w = _weights_cache.put(key, _to_device(torch.tensor(key[1], dtype=torch.float64), device))
    return w


# ------------------------------------------------------------------ fused base updates

def _update_lists(params, source, grad_out, states, steps, grads):
    """The pointer-table rows of the update kernels (see _sgd_kernel), the params' pointers
    where a flag leaves a row unused."""
    st = list(states) + [params] * (3 - len(states))
    return [params, source if source is not None else params, grad_out if grad_out is not None else params,
            *st, steps if steps else params, *grads]


def _run_update(kernel, kind, params, source, grads, weights, grad_out, states, steps, lr, found_inf, **flags):
    lists = _update_lists(params, source, grad_out, states, steps, grads)
    plan, tables, _ = _tables(kind, kind, lists, _elementwise_block)
    dev = plan.device
    w = weights if isinstance(weights, torch.Tensor) else _weights_tensor(weights, dev)
    lr_ptr, lr_bits, lr_is_ptr = _scalar_args(lr, w)
    found = found_inf if found_inf is not None else w
    with _device_ctx(dev):
        for la, ptrs in zip(plan.launches, tables):
            kernel[(la.nb,)](ptrs, la.meta, la.t, w, lr_ptr, lr_bits, found, K=len(grads), DT=la.tdt, ACC=la.acc,
                             HAS_SRC=source is not None, HAS_GOUT=grad_out is not None, LR_PTR=lr_is_ptr,
                             FOUND=found_inf is not None, DIRECT=w.numel() == 2 * len(grads), BLOCK=la.block,
                             num_warps=_warps(), **flags)
    stats["launches"] += len(plan.launches)
    if steps:  # after the update read them; a skipped update leaves them
        torch._foreach_add_(steps, 1 if found_inf is None else (1 - found_inf.reshape(())).float())
    for lst in (params, grad_out, steps, *states):
        if lst:
            torch.autograd.graph.increment_version(lst)


def _sgd__impl(params, source, grads, weights, grad_out, momentum_buffers, steps, lr, momentum, dampening, nesterov,
         weight_decay, maximize, found_inf):
    _run_update(_sgd_kernel, "sgd", params, source, grads, weights, grad_out,
                [momentum_buffers] if momentum else [], steps, lr, found_inf,
                mom_bits=_f64_bits(momentum), damp_bits=_f64_bits(dampening), wd_bits=_f64_bits(weight_decay),
                MOMENTUM=momentum != 0, NESTEROV=bool(nesterov), WD=weight_decay != 0, MAXIMIZE=bool(maximize))


def _adam__impl(params, source, grads, weights, grad_out, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, lr, beta1, beta2,
          eps, weight_decay, decoupled, amsgrad, maximize, found_inf):
    states = [exp_avgs, exp_avg_sqs] + ([max_exp_avg_sqs] if amsgrad else [])
    _run_update(_adam_kernel, "adam", params, source, grads, weights, grad_out, states, steps, lr, found_inf,
                b1_bits=_f64_bits(beta1), b2_bits=_f64_bits(beta2), lb1_bits=_f64_bits(math.log(beta1) if beta1 > 0
                                                                                       else -math.inf),
                lb2_bits=_f64_bits(math.log(beta2) if beta2 > 0 else -math.inf), eps_bits=_f64_bits(eps),
                wd_bits=_f64_bits(weight_decay), WD=weight_decay != 0, DECOUPLED=bool(decoupled),
                AMSGRAD=bool(amsgrad), MAXIMIZE=bool(maximize))


# ------------------------------------------------- as operators (torch.compile, export)
# The kernels reach tensors through device tables of raw pointers (one launch for hundreds
# of tensors), which tracing cannot follow: under torch.compile / FakeTensor / tensor
# subclasses the backend's calls are custom operators (roga_cuda::triton_*) with fake
# kernels, opaque to Inductor; eager calls on plain tensors skip that wrapper. Not
# torch.library.triton_op: Inductor would trace the kernels with only the pointer tables as
# arguments and could not see which tensors they write (docs/kernels.md).

def _traced(*lists):
    if torch.compiler.is_compiling():
        return True
    for lst in lists:
        if lst and type(lst[0]) is not torch.Tensor:
            return True
    return False


def _split(s):
    return (0.0, s) if isinstance(s, torch.Tensor) else (float(s), None)


def _weights_split(w):
    return ([], w) if isinstance(w, torch.Tensor) else (list(w), None)


if triton is not None:
    from typing import Optional

    _lib_ns = "roga_cuda::triton_"

    @torch.library.custom_op(_lib_ns + "norm", mutates_args=())
    def _norm_op(ts: list[torch.Tensor], per_tensor: bool, params: list[torch.Tensor], eta: float) \
            -> tuple[torch.Tensor, torch.Tensor]:
        total, per = _norm_impl(ts, True, params or None, eta)
        return total, per

    @_norm_op.register_fake
    def _(ts, per_tensor, params, eta):
        dt = torch.float64 if any(t.dtype == torch.float64 for t in ts) else torch.float32
        return ts[0].new_empty((), dtype=dt), ts[0].new_empty((len(ts),), dtype=dt)

    @torch.library.custom_op(_lib_ns + "perturb_", mutates_args=("params", "backup"))
    def _perturb_op(params: list[torch.Tensor], grads: list[torch.Tensor], backup: list[torch.Tensor], scale: float,
                    scale_t: Optional[torch.Tensor], adaptive: bool, eta: float) -> None:
        _perturb__impl(params, grads, backup, scale if scale_t is None else scale_t, adaptive, eta)

    @torch.library.custom_op(_lib_ns + "restore_", mutates_args=("params",))
    def _restore_op(params: list[torch.Tensor], backup: list[torch.Tensor]) -> None:
        _restore__impl(params, backup)

    @torch.library.custom_op(_lib_ns + "restore_accumulate_", mutates_args=("params", "acc"))
    def _restore_acc_op(params: list[torch.Tensor], backup: list[torch.Tensor], acc: list[torch.Tensor],
                        grads: list[torch.Tensor], weight: float, weight_t: Optional[torch.Tensor]) -> None:
        _restore_accumulate__impl(params, backup, acc, grads, weight if weight_t is None else weight_t)

    @torch.library.custom_op(_lib_ns + "gram", mutates_args=())
    def _gram_op(flat: list[torch.Tensor], k: int) -> torch.Tensor:
        n = len(flat) // k
        return _gram_impl([flat[j * n:(j + 1) * n] for j in range(k)])

    @_gram_op.register_fake
    def _(flat, k):
        n = len(flat) // k
        dt = torch.float64 if any(t.dtype == torch.float64 for t in flat[:n]) else torch.float32
        return flat[0].new_empty((k, k), dtype=dt)

    @torch.library.custom_op(_lib_ns + "combine_", mutates_args=("out",))
    def _combine_op(out: list[torch.Tensor], flat: list[torch.Tensor], weights: list[float],
                    weights_t: Optional[torch.Tensor]) -> None:
        n = len(out)
        _combine__impl(out, [flat[j * n:(j + 1) * n] for j in range(len(flat) // n)],
                       weights if weights_t is None else weights_t)

    @torch.library.custom_op(_lib_ns + "sgd_", mutates_args=("params", "grad_out", "momentum_buffers", "steps"))
    def _sgd_op(params: list[torch.Tensor], source: list[torch.Tensor], flat: list[torch.Tensor],
                weights: list[float], weights_t: Optional[torch.Tensor], grad_out: list[torch.Tensor],
                momentum_buffers: list[torch.Tensor], steps: list[torch.Tensor], lr: float,
                lr_t: Optional[torch.Tensor], momentum: float, dampening: float, nesterov: bool, weight_decay: float,
                maximize: bool, found_inf: Optional[torch.Tensor]) -> None:
        n = len(params)
        _sgd__impl(params, source or None, [flat[j * n:(j + 1) * n] for j in range(len(flat) // n)],
                   weights if weights_t is None else weights_t, grad_out or None, momentum_buffers, steps,
                   lr if lr_t is None else lr_t, momentum, dampening, nesterov, weight_decay, maximize, found_inf)

    @torch.library.custom_op(_lib_ns + "adam_", mutates_args=("params", "grad_out", "exp_avgs", "exp_avg_sqs",
                                                               "max_exp_avg_sqs", "steps"))
    def _adam_op(params: list[torch.Tensor], source: list[torch.Tensor], flat: list[torch.Tensor],
                 weights: list[float], weights_t: Optional[torch.Tensor], grad_out: list[torch.Tensor],
                 exp_avgs: list[torch.Tensor], exp_avg_sqs: list[torch.Tensor], max_exp_avg_sqs: list[torch.Tensor],
                 steps: list[torch.Tensor], lr: float, lr_t: Optional[torch.Tensor], beta1: float, beta2: float,
                 eps: float, weight_decay: float, decoupled: bool, amsgrad: bool, maximize: bool,
                 found_inf: Optional[torch.Tensor]) -> None:
        n = len(params)
        _adam__impl(params, source or None, [flat[j * n:(j + 1) * n] for j in range(len(flat) // n)],
                    weights if weights_t is None else weights_t, grad_out or None, exp_avgs, exp_avg_sqs,
                    max_exp_avg_sqs, steps, lr if lr_t is None else lr_t, beta1, beta2, eps, weight_decay, decoupled,
                    amsgrad, maximize, found_inf)


def norm(ts, per_tensor, params, eta):
    if _traced(ts):
        total, per = _norm_op(ts, per_tensor, params or [], eta)
        return total, (per if per_tensor else None)
    return _norm_impl(ts, per_tensor, params, eta)


def perturb_(params, grads, backup, scale, adaptive, eta):
    if _traced(params):
        return _perturb_op(params, grads, backup, *_split(scale), adaptive, eta)
    _perturb__impl(params, grads, backup, scale, adaptive, eta)


def restore_(params, backup):
    if _traced(params):
        return _restore_op(params, backup)
    _restore__impl(params, backup)


def restore_accumulate_(params, backup, acc, grads, weight):
    if _traced(params):
        return _restore_acc_op(params, backup, acc, grads, *_split(weight))
    _restore_accumulate__impl(params, backup, acc, grads, weight)


def gram(lists):
    if _traced(lists[0]):
        return _gram_op(list(chain.from_iterable(lists)), len(lists))
    return _gram_impl(lists)


def combine_(out, lists, weights):
    if _traced(out):
        return _combine_op(out, list(chain.from_iterable(lists)), *_weights_split(weights))
    _combine__impl(out, lists, weights)


def sgd_(params, source, grads, weights, grad_out, momentum_buffers, steps, lr, momentum, dampening, nesterov,
         weight_decay, maximize, found_inf):
    if _traced(params):
        return _sgd_op(params, source or [], list(chain.from_iterable(grads)), *_weights_split(weights),
                       grad_out or [], momentum_buffers, steps, *_split(lr), momentum, dampening, nesterov,
                       weight_decay, maximize, found_inf)
    _sgd__impl(params, source, grads, weights, grad_out, momentum_buffers, steps, lr, momentum, dampening, nesterov,
               weight_decay, maximize, found_inf)


def adam_(params, source, grads, weights, grad_out, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, lr, beta1, beta2,
          eps, weight_decay, decoupled, amsgrad, maximize, found_inf):
    if _traced(params):
        return _adam_op(params, source or [], list(chain.from_iterable(grads)), *_weights_split(weights),
                        grad_out or [], exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, *_split(lr), beta1, beta2,
                        eps, weight_decay, decoupled, amsgrad, maximize, found_inf)
    _adam__impl(params, source, grads, weights, grad_out, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, lr, beta1,
                beta2, eps, weight_decay, decoupled, amsgrad, maximize, found_inf)


# ------------------------------------------------------------------------------ timing

def bench(numels=None, dtype=torch.float32, backends=("triton", "cuda", "foreach"), iters=50, device="cuda"):
    """Time each primitive and one RoGA domain step (norm, perturb_, restore_accumulate_)
    per backend on one list (default: ResNet-34-like, ~21.8M params in 90 tensors), next to
    a plain copy of the same bytes (the bandwidth ceiling). Prints, per backend, the wall
    time per call (host overhead included: launches are asynchronous, so a host-bound op
    shows its Python cost) and, on CUDA, the device time from replaying the calls as a
    CUDA graph, with its GB/s and fraction of the copy ceiling.
    Returns {(case, backend): (wall_ms, device_ms or None)}. ``ops._cuda_preference()`` is
    meant to be set from these numbers."""
    from roga_cuda import ops
    if numels is None:  # ResNet-34-ish: conv weights plus BN/bias vectors
        numels = ([9408, 64, 64] + [36864] * 6 + [64] * 12 + [73728] + [147456] * 7 + [8192] + [128] * 18
                  + [294912] + [589824] * 11 + [32768] + [256] * 26 + [1179648] + [2359296] * 5 + [131072]
                  + [512] * 14 + [512000, 1000])
    dev = torch.device(device)
    mk = lambda: [torch.randn(n, device=dev, dtype=dtype) for n in numels]  # noqa: E731
    p, g, b, a, h = mk(), mk(), mk(), mk(), mk()
    esz = torch.empty((), dtype=dtype).element_size()
    total = sum(numels)
    cuda = dev.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def wall(fn):
        fn()
        sync()
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        sync()
        return (time.perf_counter() - t0) / iters * 1e3

    def device_time(fn):
        if not cuda:
            return None
        try:
            side = torch.cuda.Stream(dev)
            side.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(side):
                fn()
            torch.cuda.current_stream(dev).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for _ in range(iters):
                    fn()
            graph.replay()
            sync()
            t0 = time.perf_counter()
            graph.replay()
            sync()
            return (time.perf_counter() - t0) / iters * 1e3
        except Exception:  # a backend that cannot be captured: wall time only
            torch.cuda.synchronize()
            return None

    def roga_step(be):  # one RoGA domain: s = rho / ||g|| - alpha on the device, no host sync
        s = 0.05 / (ops.norm(g, backend=be) + 1e-12) - 0.01
        ops.perturb_(p, g, b, s, backend=be)
        ops.restore_accumulate_(p, b, a, g, 0.5, backend=be)

    cases = {  # name: (fn, element accesses per element)
        "norm": (lambda be: ops.norm(g, backend=be), 1),
        "perturb_": (lambda be: ops.perturb_(p, g, b, 0.01, backend=be), 4),
        "restore_": (lambda be: ops.restore_(p, b, backend=be), 2),
        "restore_accumulate_": (lambda be: ops.restore_accumulate_(p, b, a, g, 0.5, backend=be), 5),
        "gram(K=2)": (lambda be: ops.gram([g, h], backend=be), 2),
        "combine_(K=2)": (lambda be: ops.combine_(a, [a, h], [1.0, 0.5], backend=be), 3),
        "roga domain step": (roga_step, 10),
    }
    flat_src = torch.empty(total, device=dev, dtype=dtype)
    flat_dst = torch.empty_like(flat_src)
    copy = lambda: flat_dst.copy_(flat_src)  # noqa: E731
    copy_ms = device_time(copy) or wall(copy)
    copy_gbs = 2 * esz * total / copy_ms / 1e6
    info = ops.backends()
    res = {("copy", "torch"): (copy_ms, copy_ms)}
    print(f"{len(numels)} tensors, {total / 1e6:.1f}M elements of {dtype}, "
          f"{torch.cuda.get_device_name(dev) if cuda else 'cpu'}, triton {getattr(triton, '__version__', None)}, "
          f"torch {torch.__version__}; copy ceiling {copy_gbs:.0f} GB/s")
    for name, (fn, accesses) in cases.items():
        row = []
        for be in backends:
            devices = info[be]["devices"]
            if not info[be]["available"] or (devices != ["any"] and dev.type not in devices):
                continue
            w = wall(lambda: fn(be))
            d = device_time(lambda: fn(be))
            res[(name, be)] = (w, d)
            cell = f"{be} wall {w:.3f} ms"
            if d is not None:
                gbs = accesses * esz * total / d / 1e6
                cell += f", device {d:.3f} ms {gbs:.0f} GB/s ({100 * gbs / copy_gbs:.0f}%)"
            row.append(cell)
        print(f"  {name:20s} " + " | ".join(row))
    return res
