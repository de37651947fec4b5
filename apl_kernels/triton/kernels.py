"""Triton kernels of the fused loss, and the launch heuristics.

Two regimes of one kernel family, specialised (constexpr) by active term,
passive term, gradient mode, reduction and compute_grad:

* row-resident (K <= RESIDENT_MAX_K): a [BLOCK_R, BLOCK_K] tile of whole rows
  sits in registers; logits are read once and the gradient written once.  When
  the whole batch is a few tiles (e.g. [128, 10]) one program does every row,
  counts the kept rows itself and writes the reduced loss: one launch.
* chunked (large K): one program per row at a time, persistent over rows; pass 1
  is an online max / log-sum-exp over chunks, pass 2 (nfl, ngce, rce, nrce, ...)
  the sums that need the final lse, pass 3 the gradient.  A chunk is held as
  [groups, VEC]: the VEC logits of one 16-byte load form a group in one thread,
  so pass 1 takes each group's max first and then costs one FFMA and one MUFU
  per exp (2^(z log2e - c), c the max's shift), and passes 1 and 2 keep per-group
  partial sums (one cross-thread reduction per row, not per chunk).  Passes 1
  and 3 prefetch the next chunk (pass 3 not for the focal terms, whose
  registers it would spill).  The full chunks are read without masks, the tail
  in one masked step.  No per-element label compare: pass 2 leaves the label's
  group out of its loop and sums that group after it, pass 3 treats every column
  as a non-label one and writes the label's entry on its own after the loop,
  with evict_first stores; the rows of ignored or out-of-range labels are
  written (0, NaN) by a flat loop after the row loop.  A 131072-wide bf16
  row (256 KB) does not fit one program's registers, and splitting a row over
  programs would need a second HBM read (or a grid-wide sync).  Instead the grid
  is sized so that the rows in flight fit in L2 (about #SM rows of 256 KB =
  33 MB < 50 MB on H200): pass 1 reads HBM, passes 2 and 3 mostly hit L2, so HBM
  sees one read and one write per element.

Bad labels: a kept row whose label is outside [0, K) stops the launch with a
device-side assert (as F.cross_entropy does), with no host sync.  The check runs
where it costs the hot loops nothing: in the one-program regime after the tile
loop, in the others in a pre-pass kernel over the labels (_labels_kernel), so
the main kernels carry no assert (a device assert is a call, which changes the
register allocation of the loops of its kernel).  Those launches are compiled
with debug=True (asserts kept) and sanitize_overflow=False (debug would
otherwise check every int32 add and multiply for overflow).  On the GPU the CUDA
error surfaces at the next sync and the assert's message (BAD_LABEL) is printed
on stderr; under the interpreter the launch raises a ValueError naming the
label.  Where the asserts are compiled out (a launch traced by torch.compile) the
row's loss and gradient are NaN instead; no label is ever read out of bounds.

Mean and sum with several programs (row-resident tiles, chunked): the pre-pass
(at most COUNT_PROGRAMS programs) also writes partial counts of the kept rows and
zeroes a ticket; every main program reads the counts (the gradient needs 1/count
before it is written), adds up its own rows' losses and takes the ticket, and the
last one sums the programs' partials in a fixed order.  Two launches, no serial
one-program pass, deterministic, no float atomics, no host sync.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import struct

import torch
import triton
import triton.language as tl

from .. import ops
from ..spec import REDUCTIONS
from . import loss_math as lm

BAD_LABEL: tl.constexpr = tl.constexpr("apl_kernels: a target label is outside [0, K) and is not ignore_index")
R_NONE: tl.constexpr = tl.constexpr(REDUCTIONS["none"])
R_MEAN: tl.constexpr = tl.constexpr(REDUCTIONS["mean"])


# ------------------------------------------------------------------ helpers
@triton.jit
def _param(hi, lo, zero):
    # Python floats reach a kernel as fp32: a double is passed as hi + lo.
    return (zero + hi) + lo


@triton.jit
def _spec_params(al_hi, al_lo, be_hi, be_lo, ga_hi, ga_lo, q_hi, q_lo, A_hi, A_lo, a_hi, a_lo, m_hi, m_lo,
                 mp_hi, mp_lo, zero):
    """alpha, beta, gamma, q, A, a, m, min_prob of the LossSpec, in the accumulation type of `zero`."""
    return (_param(al_hi, al_lo, zero), _param(be_hi, be_lo, zero), _param(ga_hi, ga_lo, zero),
            _param(q_hi, q_lo, zero), _param(A_hi, A_lo, zero), _param(a_hi, a_lo, zero),
            _param(m_hi, m_lo, zero), _param(mp_hi, mp_lo, zero))


LABEL_BLOCK: tl.constexpr = tl.constexpr(1024)   # labels per step of the label loops
COUNT_PROGRAMS: tl.constexpr = tl.constexpr(128)  # most programs of _count_kernel (partial counts)


@triton.jit
def _check_and_count(y_ptr, first, stop, step, K, ignore_index, CHECK: tl.constexpr):
    """Rows first, first + step, ... < stop: the kept ones counted, their labels checked (CHECK, see BAD_LABEL).

    The label assert lives here, after the hot loops (one-program regime: the rows
    of a bad label are NaN by then, and the launch fails) or in a kernel of its own
    (the other regimes): a device assert is a call, which costs the loops before it
    registers and instructions.
    """
    acc = tl.zeros([LABEL_BLOCK], dtype=tl.int32)
    lanes = tl.arange(0, LABEL_BLOCK).to(tl.int64) * step
    for start in range(first, stop, step * LABEL_BLOCK):   # int64 (first is): may pass 2^31
        rows = start + lanes
        y = tl.load(y_ptr + rows, mask=rows < stop, other=ignore_index)
        kept = y != ignore_index
        if CHECK:
            tl.device_assert(~kept | ((y >= 0) & (y < K)), BAD_LABEL)
        acc += kept.to(tl.int32)
    return tl.sum(acc.to(tl.int64), axis=0)


@triton.jit
def _labels_kernel(y_ptr, work_ptr, N, K, ignore_index, rows_per_program, REDUCTION: tl.constexpr):
    """The pre-pass over the labels of the multi-program regimes: checks them (the main kernel then
    carries no assert, see _check_and_count), zeroes the ticket of _finish_reduction and, for mean,
    writes each program's count of kept rows to work[1 + program] (COUNT_PROGRAMS at most)."""
    pid = tl.program_id(0)
    first = pid.to(tl.int64) * rows_per_program
    count = _check_and_count(y_ptr, first, tl.minimum(first + rows_per_program, N), 1, K, ignore_index, True)
    if REDUCTION != R_NONE:
        if pid == 0:
            tl.store(work_ptr.to(tl.pointer_type(tl.int32), bitcast=True), 0)
        if REDUCTION == R_MEAN:
            tl.store(work_ptr + 1 + pid, count.to(work_ptr.dtype.element_ty))


@triton.jit
def _kept_rows(work_ptr, count_programs):
    """Kept rows of the batch: the sum of _count_kernel's partial counts, in a fixed order."""
    offs = tl.arange(0, COUNT_PROGRAMS)
    return tl.sum(tl.load(work_ptr + 1 + offs, mask=offs < count_programs, other=0.0), axis=0)


@triton.jit
def _finish_reduction(work_ptr, loss_ptr, count_programs, partial, weight):
    """The reduced loss without another launch: each program stores its partial sum, then takes a
    ticket; the last one sums the partials in a fixed order (deterministic, no float atomics)."""
    P = tl.num_programs(0)
    partials = work_ptr + 1 + count_programs
    tl.store(partials + tl.program_id(0), partial)
    tl.debug_barrier()   # the partial is stored before the ticket is taken (release below)
    done = tl.atomic_add(work_ptr.to(tl.pointer_type(tl.int32), bitcast=True), 1, sem="acq_rel", scope="gpu")
    if done == P - 1:
        acc = tl.zeros([LABEL_BLOCK], dtype=loss_ptr.dtype.element_ty)
        for start in range(0, P, LABEL_BLOCK):
            offs = start + tl.arange(0, LABEL_BLOCK)
            acc += tl.load(partials + offs, mask=offs < P, other=0.0, cache_modifier=".cg")
        tl.store(loss_ptr, tl.sum(acc, axis=0) * weight)


# ------------------------------------------------------------------ row-resident regime
@triton.jit
def _resident_tile(z_ptr, y_ptr, grad_ptr, row0, N, K, stride_row, grad_stride, ignore_index, weight,
                   alpha, beta, gamma, q, A, a, m_ece, t, min_prob,
                   ACTIVE: tl.constexpr, PASSIVE: tl.constexpr, GRAD_MODE: tl.constexpr, GAMMA_HALF: tl.constexpr,
                   COMPUTE_GRAD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """Loss of rows [row0, row0 + BLOCK_R) (0 for ignored / absent rows); writes their gradient."""
    rows = row0 + tl.arange(0, BLOCK_R)
    row_ok = rows < N
    y = tl.load(y_ptr + rows, mask=row_ok, other=ignore_index)
    kept = row_ok & (y != ignore_index)
    cols = tl.arange(0, BLOCK_K)
    col_ok = cols[None, :] < K
    mask = kept[:, None] & col_ok          # ignored rows are never read
    rows64 = rows.to(tl.int64)
    z = tl.load(z_ptr + rows64[:, None] * stride_row + cols[None, :], mask=mask,
                other=float("-inf")).to(alpha.dtype)
    m, s, gap_sum = lm.block_stats(z, mask, 1)
    log_s = tl.log(s)
    log_p = lm.log_softmax(z, m[:, None], log_s[:, None])
    p = lm.fast_exp(log_p)
    is_t = cols[None, :] == y[:, None]
    sa1, sa2, sp1, sp2 = lm.normalizer_sums(log_p, p, 1.0, is_t, mask, gamma, q, min_prob, ACTIVE, PASSIVE, GRAD_MODE,
                                            GAMMA_HALF, 1)
    # The label's logit without an indexed load; an out-of-range label gives NaN.
    z_y = tl.sum(tl.where(is_t & mask, z, 0.0), axis=1)
    z_y = tl.where((y >= 0) & (y < K), z_y, float("nan"))
    y_is_max = kept & False
    if ACTIVE == lm.ECE:
        y_is_max = lm.first_max_index(z, m[:, None], cols[None, :], mask, BLOCK_K, 1) == y
    loss, c_act, c_pas, c_pas2, c_target, g_sum = lm.finish_row(
        log_s, lm.log_softmax(z_y, m, log_s), gap_sum, y_is_max, sa1, sa2, sp1, sp2, K.to(alpha.dtype), weight,
        alpha, beta, gamma, q, A, a, m_ece, t, min_prob, ACTIVE, PASSIVE, GRAD_MODE, GAMMA_HALF)
    if COMPUTE_GRAD:
        g = lm.grad_block(log_p, p, 1.0, is_t, c_act[:, None], c_pas[:, None], c_pas2[:, None], c_target[:, None],
                          g_sum[:, None], gamma, q, min_prob, ACTIVE, PASSIVE, GRAD_MODE, GAMMA_HALF)
        g = tl.where(kept[:, None], g, 0.0)
        tl.store(grad_ptr + rows64[:, None] * grad_stride + cols[None, :], g.to(grad_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & col_ok)
    return tl.where(kept, loss, 0.0)


@triton.jit
def resident_kernel(z_ptr, y_ptr, loss_ptr, grad_ptr, work_ptr, N, K, stride_row, grad_stride, ignore_index,
                    al_hi, al_lo, be_hi, be_lo, ga_hi, ga_lo, q_hi, q_lo, A_hi, A_lo, a_hi, a_lo, m_hi, m_lo,
                    mp_hi, mp_lo, t, count_programs,
                    ACTIVE: tl.constexpr, PASSIVE: tl.constexpr, GRAD_MODE: tl.constexpr,
                    REDUCTION: tl.constexpr, COMPUTE_GRAD: tl.constexpr, SINGLE: tl.constexpr,
                    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, GAMMA_HALF: tl.constexpr = False):
    """SINGLE: one program, every tile, reduced loss in loss_ptr[0].  Else one tile per
    program: per-row losses in loss_ptr, or (mean, sum) the reduced loss by _finish_reduction."""
    ACC: tl.constexpr = loss_ptr.dtype.element_ty
    zero = tl.zeros([], dtype=ACC)
    alpha, beta, gamma, q, A, a, m_ece, min_prob = _spec_params(al_hi, al_lo, be_hi, be_lo, ga_hi, ga_lo, q_hi, q_lo,
                                                                A_hi, A_lo, a_hi, a_lo, m_hi, m_lo, mp_hi, mp_lo,
                                                                zero)
    weight = zero + 1.0
    if SINGLE:
        if REDUCTION == R_MEAN:
            count = _check_and_count(y_ptr, tl.zeros([], tl.int64), N, 1, K, ignore_index, False).to(ACC)
            weight = 1.0 / tl.maximum(count, 1.0)
        total = tl.zeros([BLOCK_R], dtype=ACC)
        for row0 in range(0, N, BLOCK_R):
            loss = _resident_tile(z_ptr, y_ptr, grad_ptr, row0, N, K, stride_row, grad_stride, ignore_index,
                                  weight, alpha, beta, gamma, q, A, a, m_ece, t, min_prob, ACTIVE, PASSIVE, GRAD_MODE,
                                  GAMMA_HALF, COMPUTE_GRAD, BLOCK_R, BLOCK_K)
            if REDUCTION == R_NONE:
                rows = row0 + tl.arange(0, BLOCK_R)
                tl.store(loss_ptr + rows, loss, mask=rows < N)
            else:
                total += loss
        if REDUCTION != R_NONE:
            tl.store(loss_ptr, tl.sum(total, axis=0) * weight)
        _check_and_count(y_ptr, tl.zeros([], tl.int64), N, 1, K, ignore_index, True)
    else:
        if REDUCTION == R_MEAN:
            weight = 1.0 / tl.maximum(_kept_rows(work_ptr, count_programs), 1.0)
        row0 = tl.program_id(0).to(tl.int64) * BLOCK_R   # int32 would wrap at 2^31 rows
        loss = _resident_tile(z_ptr, y_ptr, grad_ptr, row0, N, K, stride_row, grad_stride, ignore_index,
                              weight, alpha, beta, gamma, q, A, a, m_ece, t, min_prob, ACTIVE, PASSIVE, GRAD_MODE,
                              GAMMA_HALF, COMPUTE_GRAD, BLOCK_R, BLOCK_K)
        if REDUCTION == R_NONE:
            rows = row0 + tl.arange(0, BLOCK_R)
            tl.store(loss_ptr + rows, loss, mask=rows < N)
        else:
            _finish_reduction(work_ptr, loss_ptr, count_programs, tl.sum(loss, axis=0), weight)


# ------------------------------------------------------------------ chunked regime
@triton.jit
def _load_groups(z_row, start, offs, K):
    # Raw chunk [start, start + BLOCK_K) of a row as [groups, VEC], -inf outside [0, K).
    cols = start + offs
    return tl.load(z_row + cols, mask=cols < K, other=float("-inf"))


@triton.jit
def _group_sums(log_p, e, unit, mask, own, gamma, q, min_prob, ACTIVE: tl.constexpr, PASSIVE: tl.constexpr,
                GRAD_MODE: tl.constexpr, GAMMA_HALF: tl.constexpr):
    # normalizer_sums of a [groups, VEC] block per group (in-thread), no label flagged; 0 where not `own`.
    not_target = tl.full([], 0, tl.int1)   # (a tensor: ~ of a Python False is -1)
    s1, s2, s3, s4 = lm.normalizer_sums(log_p, e, unit, not_target, mask, gamma, q, min_prob, ACTIVE, PASSIVE,
                                        GRAD_MODE, GAMMA_HALF, 1)
    return tl.where(own, s1, 0.0), tl.where(own, s2, 0.0), tl.where(own, s3, 0.0), tl.where(own, s4, 0.0)


@triton.jit
def chunked_kernel(z_ptr, y_ptr, loss_ptr, grad_ptr, work_ptr, N, K, stride_row, grad_stride, ignore_index,
                   al_hi, al_lo, be_hi, be_lo, ga_hi, ga_lo, q_hi, q_lo, A_hi, A_lo, a_hi, a_lo, m_hi, m_lo,
                   mp_hi, mp_lo, t, count_programs,
                   ACTIVE: tl.constexpr, PASSIVE: tl.constexpr, GRAD_MODE: tl.constexpr,
                   REDUCTION: tl.constexpr, COMPUTE_GRAD: tl.constexpr, NEEDS_PASS2: tl.constexpr,
                   BLOCK_K: tl.constexpr, STAGES: tl.constexpr, GAMMA_HALF: tl.constexpr = False,
                   EVEN_K: tl.constexpr = False):
    """Persistent over rows; per row: online lse, normaliser sums, gradient.  Per-row losses to
    loss_ptr, or (mean, sum) the reduced loss by _finish_reduction.

    A chunk is held as [BLOCK_K / VEC, VEC]: one 16-byte load per group, each group in one
    thread, so per-group maxima and sums are in-thread work and the per-row partial sums
    are per group (one cross-thread reduction per row, of BLOCK_K / VEC lanes).
    EVEN_K (K a multiple of BLOCK_K) compiles the masked tail steps out."""
    ACC: tl.constexpr = loss_ptr.dtype.element_ty
    VEC: tl.constexpr = 128 // z_ptr.dtype.element_ty.primitive_bitwidth
    GROUPS: tl.constexpr = BLOCK_K // VEC
    zero = tl.zeros([], dtype=ACC)
    alpha, beta, gamma, q, A, a, m_ece, min_prob = _spec_params(al_hi, al_lo, be_hi, be_lo, ga_hi, ga_lo, q_hi, q_lo,
                                                                A_hi, A_lo, a_hi, a_lo, m_hi, m_lo, mp_hi, mp_lo,
                                                                zero)
    weight = zero + 1.0
    if REDUCTION == R_MEAN:
        weight = 1.0 / tl.maximum(_kept_rows(work_ptr, count_programs), 1.0)
    Kf = K.to(ACC)
    groups0 = tl.arange(0, GROUPS)
    lanes = tl.arange(0, VEC)
    offs = groups0[:, None] * VEC + lanes[None, :]   # the chunk's columns, [GROUPS, VEC]
    first_row = tl.program_id(0).to(tl.int64)   # int64 rows: row + num_programs may pass 2^31
    total = zero
    not_target = tl.full([], 0, tl.int1)   # grad_block's label flag for every column but the label's
    G_DTYPE: tl.constexpr = grad_ptr.dtype.element_ty
    for row in range(first_row, N, tl.num_programs(0)):
        y = tl.load(y_ptr + row)
        kept = y != ignore_index
        z_row = z_ptr + row * stride_row
        y_ok = kept & (y >= 0) & (y < K)   # an out-of-range label is never read: NaN row
        y32 = tl.where(y_ok, y, -1).to(tl.int32)   # an int32 compare in the loops (-1: no column)
        z_y = tl.load(z_row + tl.where(y_ok, y, 0), mask=y_ok, other=0.0).to(ACC)
        ref = lm.offset_free(z_y)
        # The chunks [0, full) are read without masks, the tail [full, K) with one masked step;
        # an ignored row reads nothing (K_row = 0).
        K_row = tl.where(kept, K, 0)
        # (a subtraction, not (K_row // BLOCK_K) * BLOCK_K: test_triton_compile flags int32 products
        # of row-derived values; the hints keep the unmasked loads vectorised)
        full = tl.multiple_of(K_row - K_row % BLOCK_K, BLOCK_K)
        # pass 1: per-group online max / sum of exps (/ sum (z - ref) for nce, / first index
        # of the group max for ece), one cross-thread reduction per row
        m_v = tl.full([GROUPS], float("-inf"), ACC)
        c_v = tl.zeros([GROUPS], ACC)
        s_v = tl.zeros([GROUPS], ACC)
        sz_v = tl.zeros([GROUPS], ACC)
        first_v = tl.full([GROUPS], 0, tl.int32) + K
        for start in tl.range(0, full, BLOCK_K, num_stages=STAGES):
            z = lm.widen(tl.load(z_row + start + offs), ACC)
            if ACTIVE == lm.ECE:
                first_v = lm.first_max_index_update(z, m_v, start + offs, first_v, K)
            m_v, c_v, s_v, t_sum = lm.group_update(m_v, c_v, s_v, z)
            if ACTIVE == lm.NCE:
                sz_v += lm.gap_to_ref(t_sum, c_v, ref, VEC)
        if (not EVEN_K) and full < K_row:
            z = lm.widen(_load_groups(z_row, full, offs, K_row), ACC)
            if ACTIVE == lm.ECE:
                first_v = lm.first_max_index_update(z, m_v, full + offs, first_v, K)
            m_v, c_v, s_v, _ = lm.group_update(m_v, c_v, s_v, z)
            if ACTIVE == lm.NCE:   # (t is -inf in the masked lanes)
                sz_v += tl.sum(tl.where(full + offs < K_row, z - ref, 0.0), axis=1)
        m, c, s = lm.merge_groups(m_v, c_v, s_v)
        gap_sum = Kf * (m - ref) - tl.sum(sz_v, axis=0)   # sum_k (max - z_k): nce only
        y_is_max = kept & False
        if ACTIVE == lm.ECE:
            y_is_max = lm.first_max_index(m_v, m, first_v, m_v > float("-inf"), K, 0) == y
        log_s = lm.log_sum_rel_max(m, c, s)   # log sum e^(z - max)
        log_s2 = tl.log(s)                    # log sum 2^(z log2e - c), for class_exps
        inv_s = 1.0 / s
        # pass 2: sums that need the final lse (re-read from L2), per group.  The label's
        # group is left out of the loops and summed after them with the label flagged:
        # no per-element label compare in the loops.
        sa1_v = tl.zeros([GROUPS], ACC)
        sa2_v = tl.zeros([GROUPS], ACC)
        sp1_v = tl.zeros([GROUPS], ACC)
        sp2_v = tl.zeros([GROUPS], ACC)
        if NEEDS_PASS2:
            label_group = tl.where(y_ok, y32 // VEC, -1)
            for start in tl.range(0, full, BLOCK_K, num_stages=STAGES):
                log_p, e = lm.class_exps(lm.widen(tl.load(z_row + start + offs), ACC), c, log_s2)
                t1, t2, t3, t4 = _group_sums(log_p, e, inv_s, True, start // VEC + groups0 != label_group,
                                             gamma, q, min_prob, ACTIVE, PASSIVE, GRAD_MODE, GAMMA_HALF)
                sa1_v += t1   # unused slots add zeros: the compiler drops them
                sa2_v += t2
                sp1_v += t3
                sp2_v += t4
            if (not EVEN_K) and full < K_row:
                mask = full + offs < K_row
                log_p, e = lm.class_exps(lm.widen(_load_groups(z_row, full, offs, K_row), ACC), c, log_s2)
                t1, t2, t3, t4 = _group_sums(log_p, e, inv_s, mask, full // VEC + groups0 != label_group,
                                             gamma, q, min_prob, ACTIVE, PASSIVE, GRAD_MODE, GAMMA_HALF)
                sa1_v += t1
                sa2_v += t2
                sp1_v += t3
                sp2_v += t4
            # the label's group, with the label flagged (nothing for a row without a valid label)
            cols_y = (y32 - y32 % VEC) + lanes   # (label_group * VEC: an int32 product the compile test flags)
            mask_y = (cols_y < K_row) & y_ok
            log_p_y, e_y = lm.class_exps(tl.load(z_row + cols_y, mask=mask_y, other=float("-inf")).to(ACC), c,
                                         log_s2)
            y1, y2, y3, y4 = lm.normalizer_sums(log_p_y, e_y, inv_s, cols_y == y32, mask_y, gamma, q, min_prob,
                                                ACTIVE, PASSIVE, GRAD_MODE, GAMMA_HALF, 0)
            sa1_v += tl.where(groups0 == 0, y1, 0.0)
            sa2_v += tl.where(groups0 == 0, y2, 0.0)
            sp1_v += tl.where(groups0 == 0, y3, 0.0)
            sp2_v += tl.where(groups0 == 0, y4, 0.0)
        z_y = tl.where(y_ok, z_y, float("nan"))
        l_y = lm.log_softmax(z_y, m, log_s)
        loss, c_act, c_pas, c_pas2, c_target, g_sum = lm.finish_row(
            log_s, l_y, gap_sum, y_is_max, tl.sum(sa1_v, axis=0), tl.sum(sa2_v, axis=0),
            tl.sum(sp1_v, axis=0), tl.sum(sp2_v, axis=0), Kf, weight,
            alpha, beta, gamma, q, A, a, m_ece, t, min_prob, ACTIVE, PASSIVE, GRAD_MODE, GAMMA_HALF)
        loss = tl.where(kept, loss, 0.0)
        if REDUCTION == R_NONE:
            tl.store(loss_ptr + row, loss)
        else:
            total += loss
        if COMPUTE_GRAD:
            # pass 3: the gradient, every column as a non-label one, then the label's entry on its
            # own (each chunk is read before it is written: in-place safe; the stores are the
            # last use of these lines: evict first); a kept row with a valid label only
            g_row = grad_ptr + row * grad_stride
            if y_ok:   # else the loop after this one writes the row
                for start in tl.range(0, full, BLOCK_K, num_stages=STAGES):
                    z = lm.widen(tl.load(z_row + start + offs), ACC)
                    log_p, e = lm.class_exps(z, c, log_s2)
                    g = lm.grad_block(log_p, e, inv_s, not_target, c_act, c_pas, c_pas2, c_target, g_sum, gamma, q,
                                      min_prob, ACTIVE, PASSIVE, GRAD_MODE, GAMMA_HALF)
                    tl.store(g_row + start + offs, g.to(G_DTYPE), eviction_policy="evict_first")
                if (not EVEN_K) and full < K:
                    cols = full + offs
                    log_p, e = lm.class_exps(lm.widen(_load_groups(z_row, full, offs, K), ACC), c, log_s2)
                    g = lm.grad_block(log_p, e, inv_s, not_target, c_act, c_pas, c_pas2, c_target, g_sum, gamma, q,
                                      min_prob, ACTIVE, PASSIVE, GRAD_MODE, GAMMA_HALF)
                    tl.store(g_row + cols, g.to(G_DTYPE), mask=cols < K, eviction_policy="evict_first")
                g_y = lm.grad_block(l_y, tl.exp(l_y), 1.0, ~not_target, c_act, c_pas, c_pas2, c_target, g_sum, gamma, q,
                                    min_prob, ACTIVE, PASSIVE, GRAD_MODE, GAMMA_HALF)
                tl.debug_barrier()   # after the loop's store of that column, by whichever thread made it
                tl.store(g_row + y, g_y.to(G_DTYPE))
    if COMPUTE_GRAD:
        # The gradient rows the row loop left: 0 for an ignored row, NaN for an out-of-range label.
        # One flat loop over (row, chunk) of this program, outside the hot row loop.
        cols0 = tl.arange(0, BLOCK_K)
        chunks = tl.cdiv(K, BLOCK_K).to(tl.int64)   # int64 index math: rows may pass 2^31
        programs = tl.num_programs(0).to(tl.int64)
        for i in range(tl.zeros([], tl.int64), tl.cdiv(N - first_row, programs) * chunks):
            row = first_row + (i // chunks) * programs
            y = tl.load(y_ptr + row)
            if (y == ignore_index) | (y < 0) | (y >= K):
                cols = (i % chunks) * BLOCK_K + cols0
                fill = tl.where(y == ignore_index, 0.0, float("nan"))
                tl.store(grad_ptr + row * grad_stride + cols, (tl.zeros([BLOCK_K], ACC) + fill).to(G_DTYPE),
                         mask=cols < K, eviction_policy="evict_first")
    if REDUCTION != R_NONE:
        _finish_reduction(work_ptr, loss_ptr, count_programs, total, weight)


# ------------------------------------------------------------------ heuristics
# Largest padded K kept whole in registers (per element size); beyond, chunked.
# (at sm_90: 16 warps x 16 elements per thread, no spills for any term).
RESIDENT_MAX_K = {1: 8192, 2: 8192, 4: 8192, 8: 4096}
TILE_ELEMS = 2048          # elements of a row-resident tile (8 per thread with 8 warps)
SINGLE_MAX_TILES = 4       # reduced losses this small run in one program (one launch)
# Chunk per loop step (16 warps: 16 elements per thread, no spills at sm_90).
CHUNK = {2: 8192, 4: 8192, 8: 2048}
# Software-pipelined chunk loops (tl.range num_stages): the compiler copies the next chunks into
# shared memory (cp.async) while one is worked on, so a program waits for its loads about once a
# pass, not once a chunk (the H200's 2026-11-30 run: one program a SM, latency-bound).  Shared
# memory: two chunks in flight, 33 KB (bf16) to 66 KB (fp32).  1: plain loads (bench.gpu_sweep).
CHUNK_STAGES = 3
CHUNK_WARPS = 16           # warps of a chunked program (8 below 8192-element chunks)
# Column indices are int32 (int64 would double their registers): the last chunk's
# start + BLOCK_K must stay below 2^31.
MAX_K = 2 ** 31 - 2 ** 16
L2_BUDGET = 32 << 20       # bytes of rows in flight in the chunked regime (H200 L2 is 50 MB)
# Chunked grid: programs that can be resident at once (about 128 registers per
# thread: one 16-warp or two 8-warp programs per SM), fewer if their rows would
# overflow L2_BUDGET; each program then loops over rows.

# The kernels' label assert (tests turn it off to see the NaN-row fallback of compiled-out asserts).
CHECK_LABELS = True

_forced_chunk = None
last_plan = None           # (regime, grid, block) of the latest launch, for tests and benchmarks


@contextlib.contextmanager
def force_chunked(block_k: int):
    """Run every shape in the chunked regime with chunks of block_k (tests, benchmarks)."""
    global _forced_chunk
    previous, _forced_chunk = _forced_chunk, int(block_k)
    try:
        yield
    finally:
        _forced_chunk = previous


def _split(x: float):
    # Plain Python (no tensor): launch() is also traced by torch.compile.
    if not abs(x) < 3.4e38:
        raise ValueError(f"the triton backend takes loss parameters within the float32 range, got {x}")
    hi = struct.unpack("f", struct.pack("f", x))[0]
    return hi, float(x - hi)


def _split_params(alpha, beta, gamma, q, A, a, m, min_prob, t) -> tuple:
    """The kernels' scalar arguments: each float as an fp32 (hi, lo) pair, then t."""
    return (*_split(alpha), *_split(beta), *_split(gamma), *_split(q), *_split(A), *_split(a), *_split(m),
            *_split(min_prob), int(t))


_split_params_cached = functools.lru_cache(maxsize=64)(_split_params)


def _cdiv(a: int, b: int) -> int:
    # Host integer helpers: triton.cdiv / next_power_of_2 are constexpr functions, ~10 us a call here.
    return -(-a // b)


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _programs_in_flight(device: torch.device, row_bytes: int, rows: int, num_warps: int) -> int:
    if device.type != "cuda":
        return max(1, min(rows, 4))   # the interpreter runs programs one after another
    props = torch.cuda.get_device_properties(device)
    sms = props.multi_processor_count
    l2 = getattr(props, "L2_cache_size", 0) or 50 << 20
    resident = max(1, 16 // num_warps)
    per_sm = max(1, min(resident, min(L2_BUDGET, l2 * 2 // 3) // max(1, sms * row_bytes)))
    return max(1, min(rows, sms * per_sm))


def launch(logits, target, active, passive, alpha, beta, gamma, q, A, grad_mode, a, m, t, min_prob, reduction,
           ignore_index, compute_grad, grad_out=None):
    """Allocate outputs and launch; grad_out (in-place mode) receives the gradient instead of a new tensor.

    The arguments after target are those of the fused op (``LossSpec.op_args()``, reduction, ...).

    Returns (loss, grad).  Runs under FakeTensor too (only shapes are used).
    """
    # Triton launches on the current device: make it the logits' one (cuda:1 while
    # cuda:0 is current would otherwise run with cuda:1 pointers on device 0).
    guard = torch.cuda.device(logits.device) if logits.device.type == "cuda" else contextlib.nullcontext()
    asserts = _interpreter_asserts() if logits.device.type == "cpu" and CHECK_LABELS else contextlib.nullcontext()
    try:
        with guard, asserts:
            return _launch(logits, target, active, passive, alpha, beta, gamma, q, A, grad_mode, a, m, t, min_prob,
                           reduction, ignore_index, compute_grad, grad_out)
    except Exception as error:   # the interpreter's AssertionError of a bad label
        if BAD_LABEL.value not in str(error):
            raise
        labels = target.long()
        bad = labels[(labels != ignore_index) & ((labels < 0) | (labels >= logits.shape[1]))]
        value = f"target value {int(bad[0])}" if bad.numel() else "a target value"
        raise ValueError(f"{value} is outside [0, {logits.shape[1]}) and is not ignore_index={ignore_index} "
                         f"(found by the triton kernel)") from error


@contextlib.contextmanager
def _interpreter_asserts():
    """Keep tl.device_assert under TRITON_INTERPRET=1 (its builder has debug off and no launch option for it)."""
    from triton.runtime import interpreter
    builder = interpreter.interpreter_builder
    saved = builder.options
    builder.options = dataclasses.replace(saved, debug=True, sanitize_overflow=False)
    try:
        yield
    finally:
        builder.options = saved


def _assert_options(tensor) -> dict:
    """Launch options of the kernels that check labels, which keep their assert (see the module
    docstring; the interpreter ignores them, _interpreter_asserts does its part)."""
    if not CHECK_LABELS or ops._tracing(tensor):
        return {}   # traced by torch.compile: the compiler picks its own options (NaN rows instead)
    return ASSERT_OPTIONS


ASSERT_OPTIONS = dict(debug=True, sanitize_overflow=False)


def _launch(logits, target, active, passive, alpha, beta, gamma, q, A, grad_mode, a, m, t, min_prob, reduction,
            ignore_index, compute_grad, grad_out):
    from torch.library import wrap_triton
    global last_plan

    N, K = logits.shape
    if K > MAX_K:
        raise ValueError(f"the triton backend takes at most {MAX_K} classes (int32 column indices), got K = {K}")
    acc_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    device = logits.device
    loss_shape = (N,) if reduction == REDUCTIONS["none"] else ()
    loss = torch.empty(loss_shape, dtype=acc_dtype, device=device)
    if grad_out is not None:
        grad, grad_stride = grad_out, grad_out.stride(0)
    elif compute_grad:
        grad = torch.empty((N, K), dtype=logits.dtype, device=device)
        grad_stride = K
    else:
        grad, grad_stride = torch.empty((0,), dtype=logits.dtype, device=device), 0
    write_grad = compute_grad or grad_out is not None
    grad_arg = grad if write_grad else logits   # never written when not computing the gradient
    if N == 0:
        if reduction != REDUCTIONS["none"]:
            loss.zero_()
        return loss, grad
    # The same spec every call of a training run: cached (16 struct round trips were ~20 us of host
    # time), except while torch.compile traces this function.
    split = _split_params if torch.compiler.is_compiling() else _split_params_cached
    params = split(alpha, beta, gamma, q, A, a, m, min_prob, t)
    # GAMMA_HALF: (1 - p)^gamma as a square root (lm.focal_weight); False by default for callers that
    # compile the kernels themselves (bench.roofline)
    common = dict(ACTIVE=active, PASSIVE=passive, GRAD_MODE=grad_mode, GAMMA_HALF=gamma == 0.5, REDUCTION=reduction,
                  COMPUTE_GRAD=write_grad)
    elem = logits.element_size()
    block_k = _next_pow2(K)

    if _forced_chunk is None and block_k <= RESIDENT_MAX_K[elem]:
        block_r = max(1, min(TILE_ELEMS // block_k, _next_pow2(N)))
        tiles = _cdiv(N, block_r)
        single = tiles == 1 or (reduction != REDUCTIONS["none"] and tiles <= SINGLE_MAX_TILES)
        num_warps = max(1, min(16, block_r * block_k // 256))
        last_plan = ("single" if single else "tiles", 1 if single else tiles, block_r, block_k)
        kernel, grid, consts = resident_kernel, (1 if single else tiles), dict(SINGLE=single, BLOCK_R=block_r)
    else:
        chunk = _forced_chunk or min(CHUNK[max(2, elem)], block_k)
        num_warps = CHUNK_WARPS if chunk >= 8192 else 8
        grid = _programs_in_flight(device, K * elem, N, num_warps)
        last_plan = ("chunked", grid, 1, chunk)
        kernel, consts = chunked_kernel, dict(NEEDS_PASS2=lm.needs_second_pass(active, passive), STAGES=CHUNK_STAGES,
                                              EVEN_K=K % chunk == 0)
        single, block_k = False, chunk
    work, count_programs = loss, 0
    if not single:   # labels checked (and counted, for mean) by a pre-pass: the main kernel has no assert
        work, count_programs = _labels_prepass(target, N, K, grid, reduction, acc_dtype, ignore_index)
    wrap_triton(kernel)[(grid,)](
        logits, target, loss, grad_arg, work, N, K, logits.stride(0), grad_stride, ignore_index, *params,
        count_programs, BLOCK_K=block_k, num_warps=num_warps, **consts, **common,
        **(_assert_options(logits) if single else {}))
    return loss, grad


def _labels_prepass(target, N, K, programs, reduction, acc_dtype, ignore_index):
    """The pre-pass launch of the multi-program regimes (_labels_kernel) and its workspace.

    work[0]: the ticket of _finish_reduction (int32 bits, zeroed by the pre-pass);
    work[1:1 + G]: the pre-pass's partial counts of kept rows (mean); then one partial
    loss sum per main-kernel program.  G <= COUNT_PROGRAMS programs of whole LABEL_BLOCKs.
    """
    from torch.library import wrap_triton
    block = LABEL_BLOCK.value
    rows_per_program = _cdiv(_cdiv(N, COUNT_PROGRAMS.value), block) * block
    count_programs = _cdiv(N, rows_per_program)
    size = 0 if reduction == REDUCTIONS["none"] else 1 + count_programs + programs
    work = torch.empty((size,), dtype=acc_dtype, device=target.device)
    wrap_triton(_labels_kernel)[(count_programs,)](target, work, N, K, ignore_index, rows_per_program,
                                                   REDUCTION=reduction, num_warps=4, **_assert_options(target))
    return work, count_programs
