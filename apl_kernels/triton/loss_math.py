"""The loss math of every term, once, as Triton jit helpers.

Mirrors csrc/apl_loss_math.h step for step: per row,

  1. softmax stats    max, sum exp(z - max), sum (max - z)   (``block_stats``; chunks: ``group_update``,
                      ``merge_groups``, ``offset_free``); ece also the first index of the max
  2. normaliser sums  the sums over k that need log p_k       (``normalizer_terms``/``_sums``)
  3. ``finish_row``   loss and gradient coefficients; ``grad_block`` d loss / d z.

The terms are compile-time (constexpr ACTIVE, PASSIVE): a kernel holds the code
of its two terms only.  Each side owns two sum slots and its per-class gradient
coefficients, whose meaning is its term's (see ``normalizer_terms`` and
``grad_block``); a new term is one more case in each of the three steps.

Gradients: with l = log p, d loss / d z_j = g_j - p_j sum_k g_k, g_j = d loss / d l_j.
``finish_row`` gives g as c_target [j = y] plus the sides' coefficients, and sum_k g_k.

Every helper is elementwise or reduces along ``AXIS``, so the same code serves
a [rows, K] tile held in registers (AXIS=1) and a 1-D chunk of one row (AXIS=0).
Only core tl math is used (exp/log), no libdevice: the same code then runs in
the interpreter (which has no extern calls) and on the GPU.  The per-element
exps and powers of fp32 go through ``fast_exp``/``fast_pow`` (one MUFU
instruction each on the GPU, FAST_MATH; the interpreter, which cannot run
inline PTX, takes tl.exp/tl.log).
All math is in the accumulation dtype of the caller (fp32, or fp64 for fp64).
"""
import math
import os

import triton
import triton.language as tl

from ..spec import ACTIVE_TERMS, ECE_EPS as _ECE_EPS, GRAD_MODES, P_MIN as _P_MIN, PASSIVE_TERMS

CE: tl.constexpr = tl.constexpr(ACTIVE_TERMS["ce"])
FL: tl.constexpr = tl.constexpr(ACTIVE_TERMS["fl"])
NCE: tl.constexpr = tl.constexpr(ACTIVE_TERMS["nce"])
NFL: tl.constexpr = tl.constexpr(ACTIVE_TERMS["nfl"])
GCE: tl.constexpr = tl.constexpr(ACTIVE_TERMS["gce"])
NGCE: tl.constexpr = tl.constexpr(ACTIVE_TERMS["ngce"])
ECE: tl.constexpr = tl.constexpr(ACTIVE_TERMS["ece"])
TAYLOR: tl.constexpr = tl.constexpr(ACTIVE_TERMS["taylor"])
MAE: tl.constexpr = tl.constexpr(PASSIVE_TERMS["mae"])
RCE: tl.constexpr = tl.constexpr(PASSIVE_TERMS["rce"])
NMAE: tl.constexpr = tl.constexpr(PASSIVE_TERMS["nmae"])
NRCE: tl.constexpr = tl.constexpr(PASSIVE_TERMS["nrce"])
AGCE: tl.constexpr = tl.constexpr(PASSIVE_TERMS["agce"])
AUL: tl.constexpr = tl.constexpr(PASSIVE_TERMS["aul"])
AEL: tl.constexpr = tl.constexpr(PASSIVE_TERMS["ael"])
NNCE: tl.constexpr = tl.constexpr(PASSIVE_TERMS["nnce"])
NNFL: tl.constexpr = tl.constexpr(PASSIVE_TERMS["nnfl"])
AMSE: tl.constexpr = tl.constexpr(PASSIVE_TERMS["amse"])
OFFICIAL: tl.constexpr = tl.constexpr(GRAD_MODES["official"])
P_MIN: tl.constexpr = tl.constexpr(_P_MIN)
LOG_P_MIN: tl.constexpr = tl.constexpr(math.log(_P_MIN))
ECE_EPS: tl.constexpr = tl.constexpr(_ECE_EPS)

# Terms with normaliser sums, which need the final lse (a second pass over a chunked row).
_PASS2_ACTIVE = {ACTIVE_TERMS[t] for t in ("nfl", "ngce")}
_PASS2_PASSIVE = {PASSIVE_TERMS[t] for t in ("rce", "nrce", "nnce", "nnfl", "amse")}


def needs_second_pass(active: int, passive: int) -> bool:
    """Host-side twin of ``NEEDS_PASS2``."""
    return active in _PASS2_ACTIVE or passive in _PASS2_PASSIVE


# MUFU ex2/lg2 through inline PTX on the GPU; the interpreter cannot run inline asm.
FAST_MATH: tl.constexpr = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") != "1")
LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)
LN2: tl.constexpr = tl.constexpr(0.6931471805599453)


# ------------------------------------------------------------------ scalar math
@triton.jit
def exp2_ftz(x):
    """2^x.  fp32 on the GPU: one MUFU.EX2 (ex2.approx.ftz, results below 2^-126 flush to 0);
    tl.exp's non-ftz ex2.approx takes 5 instructions."""
    if FAST_MATH and x.dtype == tl.float32:
        r = tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True,
                                      pack=1)
    else:
        r = tl.exp2(x)
    return r


@triton.jit
def log2_ftz(x):
    """log2(x), x >= 0.  fp32 on the GPU: one MUFU.LG2 (lg2.approx.ftz; absolute error ~2^-22,
    so not for logs whose relative precision matters near x = 1)."""
    if FAST_MATH and x.dtype == tl.float32:
        r = tl.inline_asm_elementwise("lg2.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True,
                                      pack=1)
    else:
        r = tl.log2(x)
    return r


@triton.jit
def widen(x, ACC: tl.constexpr):
    """x in the accumulation dtype.  bf16 on the GPU: a shift for the low and a mask for the high
    half of each 32-bit pair (the compiler extracts the high one with two instructions)."""
    if FAST_MATH and x.dtype == tl.bfloat16 and ACC == tl.float32:
        r = tl.inline_asm_elementwise("{ shl.b32 $0, $2, 16; and.b32 $1, $2, 0xffff0000; }", "=r,=r,r", [x],
                                      dtype=tl.float32, is_pure=True, pack=2)
    else:
        r = x.to(ACC)
    return r


@triton.jit
def fma(x, y, z):
    """x y + z rounded once (FFMA on the GPU).  The interpreter's tl.fma rounds x y first (and
    takes a Python float y as fp32), so there the fp32 case runs through fp64, where the
    product of two fp32 numbers is exact: what the GPU computes, to an ulp."""
    y = tl.full([], y, x.dtype)
    if FAST_MATH or x.dtype == tl.float64:
        r = tl.fma(x, y, z)
    else:
        r = (x.to(tl.float64) * y.to(tl.float64) + z.to(tl.float64)).to(x.dtype)
    return r


@triton.jit
def fast_exp(x):
    """e^x per element: one multiply and one MUFU.EX2 on the GPU (fp32)."""
    if FAST_MATH and x.dtype == tl.float32:
        r = exp2_ftz(x * LOG2E)
    else:
        r = tl.exp(x)
    return r


@triton.jit
def expm1(x):
    # Kahan's trick: (u - 1) * x / log(u) cancels the rounding error of u = e^x,
    # so 1 - p stays accurate for p near 1 (focal factors) without libdevice.
    u = fast_exp(x)
    um1 = u - 1.0
    r = um1 * (x / tl.log(u))
    r = tl.where(u == 1.0, x, r)
    r = tl.where(um1 == -1.0, um1, r)
    return tl.where(u == float("inf"), u, r)


@triton.jit
def log1p(x):
    # Kahan's trick again: log(u) x / (u - 1) cancels the rounding of u = 1 + x.
    u = 1.0 + x
    return tl.where(u == 1.0, x, tl.log(u) * (x / (u - 1.0)))


@triton.jit
def pow_nonneg(b, e):
    # b >= 0 always (1 - p, or a clamped p); 0^0 = 1 as in C pow.  fp32 on the GPU: MUFU lg2 and ex2.
    if FAST_MATH and b.dtype == tl.float32:
        r = exp2_ftz(e * log2_ftz(b))
    else:
        r = tl.exp(e * tl.log(b))
    return tl.where(e == 0.0, 1.0, r)


@triton.jit
def clamped_prob_pow(log_p, q):
    """clamp(p, P_MIN, 1)^q of a class from its log p: one MUFU ex2 on the GPU (the power of a
    probability from its log, not as 2^(q lg2 p): no MUFU lg2, the scarcer unit's other half)."""
    return tl.where(q == 0.0, 1.0, fast_exp(q * tl.maximum(log_p, LOG_P_MIN)))


@triton.jit
def one_minus_p(p):
    """1 - p of a class in the per-element loops, without expm1 (an exp, a log, a divide).
    Only the row's top class can have p > 1/2 (two would sum past 1); below, 1 - p has no
    cancellation.  For the top class, p = 1/s with s = sumexp rounded near 1: 1 - p = (s - 1)/s
    is known to about an ulp of 1 whichever way it is computed (expm1 of log p keeps no more),
    and its focal factor and gradient terms are ~(1 - p)^gamma, small next to the row's others.
    finish_row (the label's loss) keeps expm1."""
    return 1.0 - p


@triton.jit
def sqrt_ftz(x):
    """sqrt(x), x >= 0.  fp32 on the GPU: one MUFU.SQRT (sqrt.approx.ftz; tl.sqrt is the IEEE one)."""
    if FAST_MATH and x.dtype == tl.float32:
        r = tl.inline_asm_elementwise("sqrt.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True,
                                      pack=1)
    else:
        r = tl.sqrt(x)
    return r


@triton.jit
def focal_weight(om, gamma, GAMMA_HALF: tl.constexpr):
    """(1 - p)^gamma from om = 1 - p.  GAMMA_HALF: the kernel was launched for gamma = 0.5 (the
    papers' default), a square root: one MUFU instruction instead of lg2, multiply, ex2."""
    if GAMMA_HALF:
        r = sqrt_ftz(om)
    else:
        r = pow_nonneg(om, gamma)
    return r


@triton.jit
def focal_value(log_p, om, gamma, GAMMA_HALF: tl.constexpr):
    # f(l) = -(1 - p)^gamma l;  om = 1 - p (one_minus_p in the loops, -expm1(l) per row)
    return -focal_weight(om, gamma, GAMMA_HALF) * log_p


@triton.jit
def focal_deriv(log_p, om, gamma, GRAD_MODE: tl.constexpr, GAMMA_HALF: tl.constexpr):
    # f'(l): -(1-p)^gamma (official), + gamma (1-p)^gamma p l / (1-p) (exact);
    # l / (1-p) -> -1 as p -> 1, and the extra part is 0 where p = 0 (l = -inf).  om = 1 - p.
    one_minus_p = om
    w = focal_weight(one_minus_p, gamma, GAMMA_HALF)
    if GRAD_MODE == OFFICIAL:
        return -w
    p = fast_exp(log_p)
    ratio = tl.where(one_minus_p > 0.0, log_p / one_minus_p, -1.0)
    return tl.where(p == 0.0, -w, -w + gamma * w * p * ratio)


# clamp(p, P_MIN, 1) of p = exp(log p): log p = (z - max) - log(sumexp) <= 0, so p <= 1 (to an ulp of
# ex2.approx) and only the lower bound is tested.  NaN stays NaN (and unclamped is False).
# rce's sums and gradient test e = p / unit against P_MIN / unit instead (``normalizer_terms``).
@triton.jit
def clamp_prob(p):
    return tl.where(p < P_MIN, P_MIN, p)


@triton.jit
def unclamped(p):
    return p >= P_MIN


@triton.jit
def live_e_min(unit):
    """unclamped(p) for p = e unit is e >= live_e_min(unit) (a row's scalar: no per-element multiply).
    (1 / unit first: a constexpr on the left of a tensor stays a constexpr in the interpreter.)"""
    return (1.0 / unit) * P_MIN


# ------------------------------------------------------------------ step 1
@triton.jit
def gap(m, z, mask):
    # max - z, +inf for a -inf logit (also while the max is -inf), 0 in masked lanes.
    return tl.where(mask, tl.where(z == float("-inf"), float("inf"), m - z), 0.0)


@triton.jit
def block_stats(z, mask, AXIS: tl.constexpr):
    """(max, sum exp(z - max), sum (max - z)) of a block along AXIS; masked lanes never enter a sum.

    z holds -inf in masked lanes.  A block whose live lanes are all -inf has
    max = -inf and sumexp = 0 (not NaN), so that merging stays clean.  The last
    sum (nce's normaliser) has only terms >= 0: no cancellation when the logits
    share a large offset, as sum z - K max would have.
    """
    m = tl.max(z, axis=AXIS)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    if AXIS == 1:
        m_b = m_safe[:, None]
    else:
        m_b = m_safe
    s = tl.sum(tl.where(mask, fast_exp(z - m_b), 0.0), axis=AXIS)
    return m, s, tl.sum(gap(m_b, z, mask), axis=AXIS)


@triton.jit
def first_max_index(z, m, cols, mask, none, AXIS: tl.constexpr):
    """The first column holding the block's max m along AXIS (`none` where no lane does)."""
    return tl.min(tl.where(mask & (z == m), cols, none), axis=AXIS)


@triton.jit
def first_max_index_update(z, m, cols, first, none):
    """ece, per group of a [G, V] chunk: the first column of the group's max, moved where the
    chunk raises the max m (strictly: an equal later value keeps the first occurrence)."""
    chunk_m = tl.max(z, axis=1)
    at = tl.min(tl.where(z == chunk_m[:, None], cols, none), axis=1)
    return tl.where(chunk_m > m, at, first)


@triton.jit
def exp2_shift(m):
    """The base-2 shift of a max m: m log2(e) (rounded), 0 while m is -inf (then every exp is 0)."""
    return tl.where(m == float("-inf"), 0.0, m * LOG2E)


@triton.jit
def group_update(m, c, s, z):
    """Online max and sum of exps over the chunks of a row held as [G, V] blocks: V
    elements per group, all in one thread, so the group max is in-thread work.

    Per group: m its max so far, c = exp2_shift(m), s = sum 2^t, t = z log2e - c.  The
    chunk's max comes first, so that an element costs one FFMA and one MUFU (and its
    max and add); the old sum is rescaled once per group.  Also returns the chunk's
    sum of t per group (see ``gap_to_ref``).  A -inf logit adds 0; a NaN makes its
    group's s NaN (the max skips it); +inf makes c = inf and s NaN.
    """
    m_new = tl.maximum(m, tl.max(z, axis=1))
    c_new = exp2_shift(m_new)
    rescale = tl.where(m == float("-inf"), 0.0, exp2_ftz(c - c_new))
    t = fma(z, LOG2E, -c_new[:, None])
    return m_new, c_new, s * rescale + tl.sum(exp2_ftz(t), axis=1), tl.sum(t, axis=1)


@triton.jit
def gap_to_ref(t_sum, c, ref, V: tl.constexpr):
    """sum (z_k - ref) of V logits from the sum of their t_k = z_k log2e - c (group_update):
    (sum t - V (ref log2e - c)) / log2e, with ref log2e - c an exact FMA.  Each t_k is a
    small number rounded once, so the row's common offset cancels exactly, as in
    z_k - ref (``offset_free``), at one add per element instead of two."""
    return (t_sum - V * fma(ref, LOG2E, -c)) * LN2


@triton.jit
def merge_groups(m, c, s):
    """Row (max, its shift c, sum 2^(z log2e - c)) from the groups' (m, c, s) of group_update."""
    row_m = tl.max(m, axis=0)
    row_c = exp2_shift(row_m)
    return row_m, row_c, tl.sum(tl.where(m == float("-inf"), 0.0, s * exp2_ftz(c - row_c)), axis=0)


@triton.jit
def log_sum_rel_max(m, c, s):
    """log sum_k e^(z_k - m) from s = sum_k 2^(z_k log2e - c): c is m log2e rounded, and
    that rounding (m log2e - c, exact as an FMA) moves into the log."""
    r = tl.where(m == float("-inf"), 0.0, fma(m, LOG2E, -c))
    return tl.log(s) - r * LN2


@triton.jit
def class_exps(z, c, log_s):
    """(log p, e) of a row's logits z from its shift c and s = sum 2^(z log2e - c) (log_s = log s):
    e = 2^(z log2e - c) = p s, one FFMA and one MUFU; log p one FFMA where a term reads it (dead
    code elsewhere).  The terms take e with unit = 1/s (``normalizer_terms``): p = e unit costs a
    multiply only where a term reads p itself."""
    t = fma(z, LOG2E, -c)
    return t * LN2 - log_s, exp2_ftz(t)


@triton.jit
def offset_free(z_ref):
    """The reference a chunked row's nce sum is taken against: sum_k (max - z_k) =
    K (max - ref) - sum_k (z_k - ref).  With ref = z_y, a logit of the row, the row's
    common offset cancels exactly in every z_k - ref (the max is not known until the
    row's end).  A non-finite z_y (its row's loss is NaN or inf anyway) gives 0."""
    return tl.where((z_ref > float("-inf")) & (z_ref < float("inf")), z_ref, 0.0)


@triton.jit
def log_softmax(z, m, log_s):
    # (z - max) - log(sumexp), not z - lse: lse rounds to the spacing of the
    # logits (1.5e-5 at 140 in fp32); this keeps log p as accurate as torch's.
    return (z - m) - log_s


# ------------------------------------------------------------------ step 2
@triton.jit
def normalizer_terms(log_p, e, unit, is_target, mask, gamma, q, min_prob, ACTIVE: tl.constexpr,
                     PASSIVE: tl.constexpr, GRAD_MODE: tl.constexpr, GAMMA_HALF: tl.constexpr):
    """Per class, 0 in masked lanes: the two active and the two passive summands.
    log_p and e = p / unit come from the caller (``class_exps``: unit = 1/s; 1 for callers
    holding p): a term that reads one of them only leaves the other's instructions to
    dead-code elimination.  rce's two summands are in units of e, classified by
    e >= P_MIN / unit (p itself is not formed for them): ``normalizer_sums`` scales their
    sums by unit, one multiply a sum instead of one an element.

      nfl        f = -(1-p)^gamma l,  f'                       (sum: the normaliser and its derivative)
      ngce       clamp(p)^q,  p^q where p is unclamped
      rce, nrce  clamp(p) [k != y],  p [k = y or clamped]
      amse       p^2 [k != y]
      nnce       h = A + log clamp(p, min_prob) [k != y],  [p >= min_prob]
      nnfl       A_f - f(max(l, log min_prob)) [k != y],  f' where l >= log min_prob

    rce's second sum is the softmax mass outside its live entries, summed directly:
    its gradient c p_j (1 - sum_{k!=y} m_k p_k) then has no cancellation.  nnce's
    and nnfl's first sums leave out k = y so that their loss 1 - N/D = sum_{k!=y}/D
    has no cancellation either.
    """
    zero = tl.zeros_like(log_p)
    a1 = zero
    a2 = zero
    p1 = zero
    p2 = zero
    p = e * unit
    if ACTIVE == NFL or PASSIVE == NNFL:
        om = one_minus_p(p)
    if ACTIVE == NFL:
        a1 = tl.where(mask, focal_value(log_p, om, gamma, GAMMA_HALF), 0.0)
        a2 = tl.where(mask, focal_deriv(log_p, om, gamma, GRAD_MODE, GAMMA_HALF), 0.0)
    if ACTIVE == NGCE or PASSIVE == RCE or PASSIVE == NRCE or PASSIVE == AMSE or PASSIVE == NNCE:
        if ACTIVE == NGCE:
            pq = clamped_prob_pow(log_p, q)
            a1 = tl.where(mask, pq, 0.0)
            a2 = tl.where(mask & unclamped(p), pq, 0.0)
        if PASSIVE == RCE or PASSIVE == NRCE:
            # e >= e_min: unclamped(p).  A NaN e (a NaN or inf logit) makes s, so unit, NaN too:
            # max and < may drop it, the sums are NaN through unit.
            e_min = live_e_min(unit)
            p1 = tl.where(mask & (~is_target), tl.maximum(e, e_min), 0.0)
            p2 = tl.where(mask & (is_target | (e < e_min)), e, 0.0)
        if PASSIVE == AMSE:
            p1 = tl.where(mask & (~is_target), p * p, 0.0)
        if PASSIVE == NNCE:
            live = mask & (p >= min_prob)
            p1 = tl.where(live & (~is_target), log_p - tl.log(min_prob), 0.0)
            p2 = tl.where(live, 1.0, 0.0)
    if PASSIVE == NNFL:
        log_min = tl.log(min_prob)
        om_min = -expm1(log_min)   # 1 - p is decreasing in l: the clamped class's is min(om, om_min)
        p1 = tl.where(mask & (~is_target), focal_value(log_min, om_min, gamma, GAMMA_HALF)
                      - focal_value(tl.maximum(log_p, log_min), tl.minimum(om, om_min), gamma, GAMMA_HALF), 0.0)
        p2 = tl.where(mask & (log_p >= log_min), focal_deriv(log_p, om, gamma, GRAD_MODE, GAMMA_HALF), 0.0)
    return a1, a2, p1, p2


@triton.jit
def normalizer_sums(log_p, e, unit, is_target, mask, gamma, q, min_prob, ACTIVE: tl.constexpr,
                    PASSIVE: tl.constexpr, GRAD_MODE: tl.constexpr, GAMMA_HALF: tl.constexpr, AXIS: tl.constexpr):
    """The four sums of ``normalizer_terms`` along AXIS (unused ones: 0, no reduction), in units of p."""
    t1, t2, t3, t4 = normalizer_terms(log_p, e, unit, is_target, mask, gamma, q, min_prob, ACTIVE, PASSIVE,
                                      GRAD_MODE, GAMMA_HALF)
    zero = tl.sum(tl.zeros_like(log_p), axis=AXIS)
    s1 = zero
    s2 = zero
    s3 = zero
    s4 = zero
    if ACTIVE == NFL or ACTIVE == NGCE:
        s1 = tl.sum(t1, axis=AXIS)
        s2 = tl.sum(t2, axis=AXIS)
    if PASSIVE == RCE or PASSIVE == NRCE or PASSIVE == AMSE or PASSIVE == NNCE or PASSIVE == NNFL:
        s3 = tl.sum(t3, axis=AXIS)
        if PASSIVE != AMSE:
            s4 = tl.sum(t4, axis=AXIS)
        if PASSIVE == RCE or PASSIVE == NRCE:
            s3 = s3 * unit
            s4 = s4 * unit
    return s1, s2, s3, s4


# ------------------------------------------------------------------ step 3
@triton.jit
def finish_row(log_s, l_y, gap_sum, y_is_max, sa1, sa2, sp1, sp2, Kf, weight,
               alpha, beta, gamma, q, A, a, m, t, min_prob,
               ACTIVE: tl.constexpr, PASSIVE: tl.constexpr, GRAD_MODE: tl.constexpr,
               GAMMA_HALF: tl.constexpr):
    """Loss of a row (or a vector of rows) and its gradient coefficients.

    Returns (loss, c_act, c_pas, c_pas2, c_target, g_sum); the coefficients already
    carry the row's reduction weight (1, or 1/count); ``grad_block`` says what each
    side's coefficients multiply.  Each case is the one of finish_row in
    csrc/apl_loss_math.h.  l_y = log p_y comes from the caller as
    (z_y - max) - log(sumexp), accurate for large logits; log_s = log(sumexp),
    gap_sum = sum_k (max - z_k) (nce); y_is_max: the label is the first index of
    the row's max (ece); sa*, sp*: the sums of ``normalizer_sums``.
    An all -inf row has l_y = NaN.
    """
    p_y = tl.exp(l_y)
    om_y = -expm1(l_y)   # 1 - p_y, accurate near p_y = 1
    zero = tl.zeros_like(l_y)
    aw = alpha * weight
    bw = beta * weight
    live_y = unclamped(p_y)
    c_act = zero
    c_pas = zero
    c_pas2 = zero
    c_target = zero
    g_sum = zero
    loss = zero
    # --- active term: d = d act / d l_y where the term depends on p_y only
    if ACTIVE == CE:
        loss = alpha * -l_y
        c_target = zero - aw
        g_sum = zero - aw
    if ACTIVE == FL:
        loss = alpha * focal_value(l_y, om_y, gamma, GAMMA_HALF)
        d = focal_deriv(l_y, om_y, gamma, GRAD_MODE, GAMMA_HALF)
        c_target = aw * d
        g_sum = aw * d
    if ACTIVE == NCE:
        D = gap_sum + Kf * log_s    # sum_k -log p_k, a sum of terms >= 0
        act = -l_y / D
        loss = alpha * act
        c_act = aw * act / D        # every class
        c_target = -aw / D
        g_sum = aw * (Kf * act - 1.0) / D
    if ACTIVE == NFL:
        act = focal_value(l_y, om_y, gamma, GAMMA_HALF) / sa1
        loss = alpha * act
        d_y = focal_deriv(l_y, om_y, gamma, GRAD_MODE, GAMMA_HALF)
        c_act = -aw * act / sa1     # times f'(l_j)
        c_target = aw * d_y / sa1
        g_sum = aw * (d_y - act * sa2) / sa1
    if ACTIVE == GCE:
        pq = pow_nonneg(clamp_prob(p_y), q)
        loss = alpha * (1.0 - pq) / q
        d = tl.where(live_y, -pq, 0.0)
        c_target = aw * d
        g_sum = aw * d
    if ACTIVE == NGCE:
        D = Kf - sa1
        pq = pow_nonneg(clamp_prob(p_y), q)
        act = (1.0 - pq) / D
        loss = alpha * act
        d_y = tl.where(live_y, -q * pq, 0.0)
        c_act = aw * act * q / D    # times p_j^q where unclamped
        c_target = aw * d_y / D
        g_sum = aw * (d_y + act * q * sa2) / D
    if ACTIVE == ECE:
        # p'_y = (p_y + m)/(m + 1) = 1 - (1 - p_y)/(m + 1) when y is the argmax, else p_y/(m + 1);
        # the argmax is an index: no gradient through it.  Clamped below at ECE_EPS.
        log_pp = tl.where(y_is_max, log1p(-om_y / (m + 1.0)), l_y - tl.log(m + 1.0))
        live = tl.exp(log_pp) >= ECE_EPS
        loss = alpha * tl.where(live, -log_pp, -tl.log(zero + ECE_EPS))
        d = tl.where(live, tl.where(y_is_max, -p_y / (p_y + m), -1.0), 0.0)
        c_target = aw * d
        g_sum = aw * d
    if ACTIVE == TAYLOR:
        # sum_{j=1..t} u^j / j, u = 1 - p_y; its derivative times p_y is -p_y sum_{j<t} u^j (no cancellation)
        power = zero + 1.0
        series = zero
        geometric = zero
        for j in range(1, t + 1):
            geometric += power
            power = power * om_y
            series += power / j
        loss = alpha * series
        c_target = -aw * p_y * geometric
        g_sum = c_target
    # --- passive term
    if PASSIVE == MAE or PASSIVE == NMAE:
        if PASSIVE == MAE:
            scale = 1.0
        else:
            scale = 1.0 / (Kf - 1.0)
        loss += beta * scale * om_y
        c_target += -bw * scale * p_y
        g_sum += -bw * scale * p_y
    if PASSIVE == RCE or PASSIVE == NRCE:
        if PASSIVE == RCE:
            scale = -A
        else:
            scale = 1.0 / (Kf - 1.0)
        loss += beta * scale * sp1
        # g_j - p_j (its share of sum g) = c p_j ([j live, j != y] - sum_{k!=y} m_k p_k)
        #   = c p_j dead_mass (live j != y),  c p_j (dead_mass - 1) (otherwise; p_j tiny or j = y)
        c_pas = bw * scale * sp2
        c_pas2 = bw * scale * (sp2 - 1.0)
    if PASSIVE == AGCE:
        # ((a+1)^q - (a+p_y)^q)/q = -(a+1)^q expm1(q log1p(-(1-p_y)/(a+1))) / q
        loss += beta * -pow_nonneg(a + 1.0, q) * expm1(q * log1p(-om_y / (a + 1.0))) / q
        d = -pow_nonneg(a + p_y, q - 1.0) * p_y
        c_target += bw * d
        g_sum += bw * d
    if PASSIVE == AUL:
        # ((a-p_y)^q - (a-1)^q)/q = (a-1)^q expm1(q log1p((1-p_y)/(a-1))) / q
        loss += beta * pow_nonneg(a - 1.0, q) * expm1(q * log1p(om_y / (a - 1.0))) / q
        d = -pow_nonneg(a - p_y, q - 1.0) * p_y
        c_target += bw * d
        g_sum += bw * d
    if PASSIVE == AEL:
        e = tl.exp(-p_y / a)
        loss += beta * e
        c_target += -bw * e * p_y / a
        g_sum += -bw * e * p_y / a
    if PASSIVE == AMSE:
        # (1/K) [sum_{k!=y} p_k^2 + (p_y - a)^2];  g_j = (2/K) (p_j^2 - a p_y [j = y])
        d = (1.0 - a) - om_y        # p_y - a, exact for a = 1
        loss += beta * (sp1 + d * d) / Kf
        c_pas = 2.0 * bw / Kf       # times p_j^2
        c_target += -c_pas * a * p_y
        g_sum += c_pas * (sp1 + p_y * d)
    if PASSIVE == NNCE:
        # 1 - h_y / S = sum_{k!=y} h_k / S, S = sum_k h_k;  g_j = (h_y/S^2) [j live] - [j = y, live] / S
        live = p_y >= min_prob
        h_y = tl.where(live, l_y - tl.log(min_prob), 0.0)
        S = sp1 + h_y
        loss += beta * sp1 / S
        c_pas = bw * h_y / (S * S)  # every live class
        c_target += tl.where(live, -bw / S, 0.0)
        g_sum += bw * (h_y * sp2 / S - tl.where(live, 1.0, 0.0)) / S
    if PASSIVE == NNFL:
        # 1 - N/D = sum_{k!=y} (A_f - f_k) / D, N = A_f - f_y;  g_j = [j = y] f'_y / D - (N/D^2) f'_j
        log_min = tl.log(min_prob)
        om_min = -expm1(log_min)
        N = (focal_value(log_min, om_min, gamma, GAMMA_HALF)
             - focal_value(tl.maximum(l_y, log_min), tl.minimum(om_y, om_min), gamma, GAMMA_HALF))
        D = sp1 + N
        loss += beta * sp1 / D
        d_y = tl.where(l_y >= log_min, focal_deriv(l_y, om_y, gamma, GRAD_MODE, GAMMA_HALF), 0.0)
        c_pas = -bw * N / (D * D)   # times f'(l_j) where l_j >= log min_prob
        c_target += bw * d_y / D
        g_sum += bw * (d_y - N * sp2 / D) / D
    return loss, c_act, c_pas, c_pas2, c_target, g_sum


@triton.jit
def grad_block(log_p, e, unit, is_target, c_act, c_pas, c_pas2, c_target, g_sum, gamma, q, min_prob,
               ACTIVE: tl.constexpr, PASSIVE: tl.constexpr, GRAD_MODE: tl.constexpr,
               GAMMA_HALF: tl.constexpr):
    """d loss / d z_j = g_j - p_j sum_k g_k (coefficients broadcast by the caller; log_p, e and unit
    as in ``normalizer_terms``)."""
    p = e * unit
    if ACTIVE == NFL or PASSIVE == NNFL:
        om = one_minus_p(p)
    g = tl.where(is_target, c_target, 0.0)
    if ACTIVE == NCE:
        g += c_act
    if ACTIVE == NFL:
        g += c_act * focal_deriv(log_p, om, gamma, GRAD_MODE, GAMMA_HALF)
    if ACTIVE == NGCE:
        g += tl.where(unclamped(p), c_act * clamped_prob_pow(log_p, q), 0.0)
    if PASSIVE == RCE or PASSIVE == NRCE:   # its own share of p_j sum g folded in: one FFMA, on e
        return g + e * tl.where((e >= live_e_min(unit)) & (~is_target), (c_pas - g_sum) * unit, (c_pas2 - g_sum) * unit)
    if PASSIVE == AMSE:
        g += c_pas * p * p
    if PASSIVE == NNCE:
        g += tl.where(p >= min_prob, c_pas, 0.0)
    if PASSIVE == NNFL:
        g += tl.where(log_p >= tl.log(min_prob), c_pas * focal_deriv(log_p, om, gamma, GRAD_MODE, GAMMA_HALF),
                      0.0)
    return g - p * g_sum
