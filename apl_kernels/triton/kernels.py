"""Triton kernels of the fused loss, and the launch heuristics.

Two regimes of one kernel family, specialised (constexpr) by active term,
passive term, gradient mode, reduction and compute_grad:

* row-resident (K <= RESIDENT_MAX_K): a [BLOCK_R, BLOCK_K] tile of whole rows
  sits in registers; logits are read once and the gradient written once.  When
  the whole batch is a few tiles (e.g. [128, 10]) one program does every row,
  counts the kept rows itself and writes the reduced loss: one launch.
* chunked (large K): one program per row at a time, persistent over rows; pass 1
  is an online max / log-sum-exp over chunks, pass 2 (nfl, ngce, rce, nrce)
  the sums that need the final lse, pass 3 the gradient.  Passes 1 and 2 keep
  per-lane partial sums (one cross-thread reduction per row, not per chunk), and
  passes 1 and 3 prefetch the next chunk.  A 131072-wide bf16
  row (256 KB) does not fit one program's registers, and splitting a row over
  programs would need a second HBM read (or a grid-wide sync).  Instead the grid
  is sized so that the rows in flight fit in L2 (about #SM rows of 256 KB =
  33 MB < 50 MB on H200): pass 1 reads HBM, passes 2 and 3 mostly hit L2, so HBM
  sees one read and one write per element.

Mean reduction with several programs: a one-program pre-pass counts the kept
rows on device (the gradient needs 1/count before it is written), the main
kernel writes per-row losses, and a one-program pass sums them in a fixed
order (deterministic, no atomics, no host sync).
"""
from __future__ import annotations

import contextlib
import struct

import torch
import triton
import triton.language as tl

from ..spec import REDUCTIONS
from . import loss_math as lm

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


@triton.jit
def _count_kept(y_ptr, N, ignore_index, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """Number of rows whose label is not ignore_index (one program, fixed order)."""
    acc = tl.zeros([BLOCK], dtype=tl.int64)
    for start in range(tl.zeros([], tl.int64), N, BLOCK):   # int64: start + BLOCK may pass 2^31
        offs = start + tl.arange(0, BLOCK)
        y = tl.load(y_ptr + offs, mask=offs < N, other=ignore_index)
        acc += (y != ignore_index).to(tl.int64)
    return tl.sum(acc, axis=0).to(ACC)


@triton.jit
def _count_kernel(y_ptr, count_ptr, N, ignore_index, BLOCK: tl.constexpr):
    ACC: tl.constexpr = count_ptr.dtype.element_ty
    tl.store(count_ptr, _count_kept(y_ptr, N, ignore_index, ACC, BLOCK))


@triton.jit
def _sum_kernel(rows_ptr, count_ptr, out_ptr, N, MEAN: tl.constexpr, BLOCK: tl.constexpr):
    """out = sum(rows) (/ max(count, 1) for mean), in a fixed order."""
    acc = tl.zeros([BLOCK], dtype=out_ptr.dtype.element_ty)
    for start in range(tl.zeros([], tl.int64), N, BLOCK):   # int64: start + BLOCK may pass 2^31
        offs = start + tl.arange(0, BLOCK)
        acc += tl.load(rows_ptr + offs, mask=offs < N, other=0.0)
    total = tl.sum(acc, axis=0)
    if MEAN:
        total = total / tl.maximum(tl.load(count_ptr), 1.0)
    tl.store(out_ptr, total)


# ------------------------------------------------------------------ row-resident regime
@triton.jit
def _resident_tile(z_ptr, y_ptr, grad_ptr, row0, N, K, stride_row, grad_stride, ignore_index, weight,
                   alpha, beta, gamma, q, A, a, m_ece, t, min_prob,
                   ACTIVE: tl.constexpr, PASSIVE: tl.constexpr, GRAD_MODE: tl.constexpr,
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
    is_t = cols[None, :] == y[:, None]
    sa1, sa2, sp1, sp2 = lm.normalizer_sums(log_p, is_t, mask, gamma, q, min_prob, ACTIVE, PASSIVE, GRAD_MODE, 1)
    # The label's logit without an indexed load; an out-of-range label gives NaN.
    z_y = tl.sum(tl.where(is_t & mask, z, 0.0), axis=1)
    z_y = tl.where((y >= 0) & (y < K), z_y, float("nan"))
    y_is_max = kept & False
    if ACTIVE == lm.ECE:
        y_is_max = lm.first_max_index(z, m[:, None], cols[None, :], mask, BLOCK_K, 1) == y
    loss, c_act, c_pas, c_pas2, c_target, g_sum = lm.finish_row(
        log_s, lm.log_softmax(z_y, m, log_s), gap_sum, y_is_max, sa1, sa2, sp1, sp2, K.to(alpha.dtype), weight,
        alpha, beta, gamma, q, A, a, m_ece, t, min_prob, ACTIVE, PASSIVE, GRAD_MODE)
    if COMPUTE_GRAD:
        g = lm.grad_block(log_p, is_t, c_act[:, None], c_pas[:, None], c_pas2[:, None], c_target[:, None],
                          g_sum[:, None], gamma, q, min_prob, ACTIVE, PASSIVE, GRAD_MODE)
        g = tl.where(kept[:, None], g, 0.0)
        tl.store(grad_ptr + rows64[:, None] * grad_stride + cols[None, :], g.to(grad_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & col_ok)
    return tl.where(kept, loss, 0.0)


@triton.jit
def resident_kernel(z_ptr, y_ptr, loss_ptr, grad_ptr, count_ptr, N, K, stride_row, grad_stride, ignore_index,
                    al_hi, al_lo, be_hi, be_lo, ga_hi, ga_lo, q_hi, q_lo, A_hi, A_lo, a_hi, a_lo, m_hi, m_lo,
                    mp_hi, mp_lo, t,
                    ACTIVE: tl.constexpr, PASSIVE: tl.constexpr, GRAD_MODE: tl.constexpr,
                    REDUCTION: tl.constexpr, COMPUTE_GRAD: tl.constexpr, SINGLE: tl.constexpr,
                    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """SINGLE: one program, every tile, reduced loss in loss_ptr[0].  Else one tile
    per program, per-row losses in loss_ptr (the output, or a buffer for _sum_kernel)."""
    ACC: tl.constexpr = loss_ptr.dtype.element_ty
    zero = tl.zeros([], dtype=ACC)
    alpha, beta, gamma, q, A, a, m_ece, min_prob = _spec_params(al_hi, al_lo, be_hi, be_lo, ga_hi, ga_lo, q_hi, q_lo,
                                                                A_hi, A_lo, a_hi, a_lo, m_hi, m_lo, mp_hi, mp_lo,
                                                                zero)
    weight = zero + 1.0
    if REDUCTION == R_MEAN:
        if SINGLE:
            count = _count_kept(y_ptr, N, ignore_index, ACC, 1024)
        else:
            count = tl.load(count_ptr)
        weight = 1.0 / tl.maximum(count, 1.0)
    if SINGLE:
        total = tl.zeros([BLOCK_R], dtype=ACC)
        for row0 in range(0, N, BLOCK_R):
            loss = _resident_tile(z_ptr, y_ptr, grad_ptr, row0, N, K, stride_row, grad_stride, ignore_index,
                                  weight, alpha, beta, gamma, q, A, a, m_ece, t, min_prob, ACTIVE, PASSIVE, GRAD_MODE,
                                  COMPUTE_GRAD,
                                  BLOCK_R, BLOCK_K)
            if REDUCTION == R_NONE:
                rows = row0 + tl.arange(0, BLOCK_R)
                tl.store(loss_ptr + rows, loss, mask=rows < N)
            else:
                total += loss
        if REDUCTION != R_NONE:
            tl.store(loss_ptr, tl.sum(total, axis=0) * weight)
    else:
        row0 = tl.program_id(0).to(tl.int64) * BLOCK_R   # int32 would wrap at 2^31 rows
        loss = _resident_tile(z_ptr, y_ptr, grad_ptr, row0, N, K, stride_row, grad_stride, ignore_index,
                              weight, alpha, beta, gamma, q, A, a, m_ece, t, min_prob, ACTIVE, PASSIVE, GRAD_MODE,
                                  COMPUTE_GRAD,
                              BLOCK_R, BLOCK_K)
        rows = row0 + tl.arange(0, BLOCK_R)
        tl.store(loss_ptr + rows, loss, mask=rows < N)


# ------------------------------------------------------------------ chunked regime
@triton.jit
def _load_chunk(z_row, start, cols0, K, kept):
    # Raw chunk [start, start + BLOCK) of a row, -inf outside K; an ignored row reads nothing.
    cols = start + cols0
    return tl.load(z_row + cols, mask=(cols < K) & kept, other=float("-inf"))


@triton.jit
def chunked_kernel(z_ptr, y_ptr, loss_ptr, grad_ptr, count_ptr, N, K, stride_row, grad_stride, ignore_index,
                   al_hi, al_lo, be_hi, be_lo, ga_hi, ga_lo, q_hi, q_lo, A_hi, A_lo, a_hi, a_lo, m_hi, m_lo,
                   mp_hi, mp_lo, t,
                   ACTIVE: tl.constexpr, PASSIVE: tl.constexpr, GRAD_MODE: tl.constexpr,
                   REDUCTION: tl.constexpr, COMPUTE_GRAD: tl.constexpr, NEEDS_PASS2: tl.constexpr,
                   BLOCK_K: tl.constexpr):
    """Persistent over rows; per row: online lse, normaliser sums, gradient.  Per-row losses to loss_ptr."""
    ACC: tl.constexpr = loss_ptr.dtype.element_ty
    zero = tl.zeros([], dtype=ACC)
    alpha, beta, gamma, q, A, a, m_ece, min_prob = _spec_params(al_hi, al_lo, be_hi, be_lo, ga_hi, ga_lo, q_hi, q_lo,
                                                                A_hi, A_lo, a_hi, a_lo, m_hi, m_lo, mp_hi, mp_lo,
                                                                zero)
    weight = zero + 1.0
    if REDUCTION == R_MEAN:
        weight = 1.0 / tl.maximum(tl.load(count_ptr), 1.0)
    Kf = K.to(ACC)
    cols0 = tl.arange(0, BLOCK_K)
    # int64 rows: row + num_programs may pass 2^31 (and row * stride_row does).
    for row in range(tl.program_id(0).to(tl.int64), N, tl.num_programs(0)):
        y = tl.load(y_ptr + row)
        kept = y != ignore_index
        z_row = z_ptr + row * stride_row
        y_ok = kept & (y >= 0) & (y < K)   # an out-of-range label is never read: NaN row
        z_y = tl.load(z_row + tl.where(y_ok, y, 0), mask=y_ok, other=0.0).to(ACC)
        ref = lm.offset_free(z_y)
        # pass 1: per-lane online max / sumexp (/ sum (z - ref) for nce, / first index
        # of the lane max for ece), one cross-thread reduction per row (ignored rows:
        # every lane masked, nothing read)
        m_v = tl.full([BLOCK_K], float("-inf"), ACC)
        s_v = tl.zeros([BLOCK_K], ACC)
        sz_v = tl.zeros([BLOCK_K], ACC)
        first_v = tl.full([BLOCK_K], 0, tl.int32) + K
        nxt = _load_chunk(z_row, 0, cols0, K, kept)
        for start in range(0, K, BLOCK_K):
            z = nxt.to(ACC)
            nxt = _load_chunk(z_row, start + BLOCK_K, cols0, K, kept)   # two chunks in flight
            if ACTIVE == lm.ECE:
                first_v = tl.where(z > m_v, start + cols0, first_v)    # strictly greater: first occurrence
            m_v, s_v = lm.lane_update(m_v, s_v, z)
            if ACTIVE == lm.NCE:
                sz_v += tl.where((start + cols0 < K) & kept, z - ref, 0.0)
        m, s = lm.merge_lanes(m_v, s_v, 0)
        gap_sum = Kf * (m - ref) - tl.sum(sz_v, axis=0)   # sum_k (max - z_k): nce only
        y_is_max = kept & False
        if ACTIVE == lm.ECE:
            y_is_max = lm.first_max_index(m_v, m, first_v, m_v > float("-inf"), K, 0) == y
        log_s = tl.log(s)
        # pass 2: sums that need the final lse (re-read from L2), per lane
        sa1_v = tl.zeros([BLOCK_K], ACC)
        sa2_v = tl.zeros([BLOCK_K], ACC)
        sp1_v = tl.zeros([BLOCK_K], ACC)
        sp2_v = tl.zeros([BLOCK_K], ACC)
        if NEEDS_PASS2:   # no prefetch here: the nfl/ngce terms need the registers
            for start in range(0, K, BLOCK_K):
                z = _load_chunk(z_row, start, cols0, K, kept).to(ACC)
                cols = start + cols0
                mask = (cols < K) & kept
                t1, t2, t3, t4 = lm.normalizer_terms(lm.log_softmax(z, m, log_s), cols == y, mask, gamma, q,
                                                     min_prob, ACTIVE, PASSIVE, GRAD_MODE)
                sa1_v += t1   # unused slots add zeros: the compiler drops them
                sa2_v += t2
                sp1_v += t3
                sp2_v += t4
        z_y = tl.where(y_ok, z_y, float("nan"))
        loss, c_act, c_pas, c_pas2, c_target, g_sum = lm.finish_row(
            log_s, lm.log_softmax(z_y, m, log_s), gap_sum, y_is_max, tl.sum(sa1_v, axis=0), tl.sum(sa2_v, axis=0),
            tl.sum(sp1_v, axis=0), tl.sum(sp2_v, axis=0), Kf, weight,
            alpha, beta, gamma, q, A, a, m_ece, t, min_prob, ACTIVE, PASSIVE, GRAD_MODE)
        tl.store(loss_ptr + row, tl.where(kept, loss, 0.0))
        if COMPUTE_GRAD:
            # pass 3: the gradient (each chunk is read before it is written: in-place safe)
            g_row = grad_ptr + row * grad_stride
            nxt = _load_chunk(z_row, 0, cols0, K, kept)
            for start in range(0, K, BLOCK_K):
                z = nxt.to(ACC)
                nxt = _load_chunk(z_row, start + BLOCK_K, cols0, K, kept)
                cols = start + cols0
                g = lm.grad_block(lm.log_softmax(z, m, log_s), cols == y, c_act, c_pas, c_pas2, c_target, g_sum,
                                  gamma, q, min_prob, ACTIVE, PASSIVE, GRAD_MODE)
                g = tl.where(kept, g, 0.0)
                tl.store(g_row + cols, g.to(grad_ptr.dtype.element_ty), mask=cols < K)


# ------------------------------------------------------------------ heuristics
# Largest padded K kept whole in registers (per element size); beyond, chunked.
# (at sm_90: 16 warps x 16 elements per thread, no spills for any term).
RESIDENT_MAX_K = {1: 8192, 2: 8192, 4: 8192, 8: 4096}
TILE_ELEMS = 2048          # elements of a row-resident tile (8 per thread with 8 warps)
SINGLE_MAX_TILES = 4       # reduced losses this small run in one program (one launch)
# Chunk per loop step (16 warps: 16 elements per thread, no spills at sm_90; the
# next chunk is prefetched, so 32 KB (bf16) to 64 KB (fp32) are in flight per SM).
CHUNK = {2: 8192, 4: 8192, 8: 2048}
CHUNK_WARPS = 16           # warps of a chunked program (8 below 8192-element chunks)
# Column indices are int32 (int64 would double their registers): the last chunk's
# start + BLOCK_K must stay below 2^31.
MAX_K = 2 ** 31 - 2 ** 16
L2_BUDGET = 32 << 20       # bytes of rows in flight in the chunked regime (H200 L2 is 50 MB)
# Chunked grid: programs that can be resident at once (about 128 registers per
# thread: one 16-warp or two 8-warp programs per SM), fewer if their rows would
# overflow L2_BUDGET; each program then loops over rows.

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
    with guard:
        return _launch(logits, target, active, passive, alpha, beta, gamma, q, A, grad_mode, a, m, t, min_prob,
                       reduction, ignore_index, compute_grad, grad_out)


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
    params = (*_split(alpha), *_split(beta), *_split(gamma), *_split(q), *_split(A), *_split(a), *_split(m),
              *_split(min_prob), int(t))
    common = dict(ACTIVE=active, PASSIVE=passive, GRAD_MODE=grad_mode, REDUCTION=reduction,
                  COMPUTE_GRAD=write_grad)
    elem = logits.element_size()
    block_k = triton.next_power_of_2(K)
    mean = reduction == REDUCTIONS["mean"]

    if _forced_chunk is None and block_k <= RESIDENT_MAX_K[elem]:
        block_r = max(1, min(TILE_ELEMS // block_k, triton.next_power_of_2(N)))
        tiles = triton.cdiv(N, block_r)
        single = tiles == 1 or (reduction != REDUCTIONS["none"] and tiles <= SINGLE_MAX_TILES)
        num_warps = max(1, min(16, block_r * block_k // 256))
        last_plan = ("single" if single else "tiles", 1 if single else tiles, block_r, block_k)
        if single:
            wrap_triton(resident_kernel)[(1,)](
                logits, target, loss, grad_arg, loss, N, K, logits.stride(0), grad_stride, ignore_index, *params,
                SINGLE=True, BLOCK_R=block_r, BLOCK_K=block_k, num_warps=num_warps, **common)
            return loss, grad
        rows_out, count = _reduction_buffers(loss, N, reduction, acc_dtype, target, ignore_index)
        wrap_triton(resident_kernel)[(tiles,)](
            logits, target, rows_out, grad_arg, count, N, K, logits.stride(0), grad_stride, ignore_index, *params,
            SINGLE=False, BLOCK_R=block_r, BLOCK_K=block_k, num_warps=num_warps, **common)
    else:
        chunk = _forced_chunk or min(CHUNK[max(2, elem)], block_k)
        num_warps = CHUNK_WARPS if chunk >= 8192 else 8
        programs = _programs_in_flight(device, K * elem, N, num_warps)
        last_plan = ("chunked", programs, 1, chunk)
        rows_out, count = _reduction_buffers(loss, N, reduction, acc_dtype, target, ignore_index)
        wrap_triton(chunked_kernel)[(programs,)](
            logits, target, rows_out, grad_arg, count, N, K, logits.stride(0), grad_stride, ignore_index, *params,
            NEEDS_PASS2=lm.needs_second_pass(active, passive), BLOCK_K=chunk,
            num_warps=num_warps, **common)
    if reduction != REDUCTIONS["none"]:
        wrap_triton(_sum_kernel)[(1,)](rows_out, count, loss, N, MEAN=mean, BLOCK=1024, num_warps=4)
    return loss, grad


def _reduction_buffers(loss, N, reduction, acc_dtype, target, ignore_index):
    """Per-row loss destination and, for mean, the on-device kept-row count (pre-pass launch)."""
    if reduction == REDUCTIONS["none"]:
        return loss, loss
    rows_out = torch.empty((N,), dtype=acc_dtype, device=loss.device)
    if reduction != REDUCTIONS["mean"]:
        return rows_out, rows_out
    count = torch.empty((1,), dtype=acc_dtype, device=loss.device)
    from torch.library import wrap_triton
    wrap_triton(_count_kernel)[(1,)](target, count, N, ignore_index, BLOCK=1024, num_warps=4)
    return rows_out, count
