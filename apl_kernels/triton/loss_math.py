"""The loss math of every term, once, as Triton jit helpers.

Mirrors csrc/apl_loss_math.h step for step (the gradient derivation lives in
that header's comments): per row,

  1. softmax stats    max, sum exp(z - max), sum (max - z)   (``block_stats``; chunks: ``lane_update``,
                      ``merge_lanes``, ``offset_free``)
  2. normaliser sums  the sums over k that need log p_k       (``normalizer_terms``/``_sums``)
  3. ``finish_row``   loss and gradient coefficients; ``grad_block`` d loss / d z.

Every helper is elementwise or reduces along ``AXIS``, so the same code serves
a [rows, K] tile held in registers (AXIS=1) and a 1-D chunk of one row (AXIS=0).
Only core tl math is used (exp/log), no libdevice: the same code then runs in
the interpreter (which has no extern calls) and on the GPU.
All math is in the accumulation dtype of the caller (fp32, or fp64 for fp64).
"""
import triton
import triton.language as tl

from ..spec import ACTIVE_TERMS, GRAD_MODES, P_MIN as _P_MIN, PASSIVE_TERMS

CE: tl.constexpr = tl.constexpr(ACTIVE_TERMS["ce"])
FL: tl.constexpr = tl.constexpr(ACTIVE_TERMS["fl"])
NCE: tl.constexpr = tl.constexpr(ACTIVE_TERMS["nce"])
NFL: tl.constexpr = tl.constexpr(ACTIVE_TERMS["nfl"])
GCE: tl.constexpr = tl.constexpr(ACTIVE_TERMS["gce"])
NGCE: tl.constexpr = tl.constexpr(ACTIVE_TERMS["ngce"])
MAE: tl.constexpr = tl.constexpr(PASSIVE_TERMS["mae"])
RCE: tl.constexpr = tl.constexpr(PASSIVE_TERMS["rce"])
NMAE: tl.constexpr = tl.constexpr(PASSIVE_TERMS["nmae"])
NRCE: tl.constexpr = tl.constexpr(PASSIVE_TERMS["nrce"])
OFFICIAL: tl.constexpr = tl.constexpr(GRAD_MODES["official"])
P_MIN: tl.constexpr = tl.constexpr(_P_MIN)


def needs_second_pass(active: int, passive: int) -> bool:
    """Host-side twin of ``NEEDS_PASS2``: the terms whose sums need the final lse."""
    return active in (ACTIVE_TERMS["nfl"], ACTIVE_TERMS["ngce"]) or passive in (PASSIVE_TERMS["rce"],
                                                                                  PASSIVE_TERMS["nrce"])


# ------------------------------------------------------------------ scalar math
@triton.jit
def expm1(x):
    # Kahan's trick: (u - 1) * x / log(u) cancels the rounding error of u = e^x,
    # so 1 - p stays accurate for p near 1 (focal factors) without libdevice.
    u = tl.exp(x)
    um1 = u - 1.0
    r = um1 * (x / tl.log(u))
    r = tl.where(u == 1.0, x, r)
    r = tl.where(um1 == -1.0, um1, r)
    return tl.where(u == float("inf"), u, r)


@triton.jit
def pow_nonneg(b, e):
    # b >= 0 always (1 - p, or a clamped p); 0^0 = 1 as in C pow.
    return tl.where(e == 0.0, 1.0, tl.exp(e * tl.log(b)))


@triton.jit
def focal_value(log_p, gamma):
    # f(l) = -(1 - p)^gamma l
    return -pow_nonneg(-expm1(log_p), gamma) * log_p


@triton.jit
def focal_deriv(log_p, gamma, GRAD_MODE: tl.constexpr):
    # f'(l): -(1-p)^gamma (official), + gamma (1-p)^gamma p l / (1-p) (exact);
    # l / (1-p) -> -1 as p -> 1, and the extra part is 0 where p = 0 (l = -inf).
    one_minus_p = -expm1(log_p)
    w = pow_nonneg(one_minus_p, gamma)
    if GRAD_MODE == OFFICIAL:
        return -w
    p = tl.exp(log_p)
    ratio = tl.where(one_minus_p > 0.0, log_p / one_minus_p, -1.0)
    return tl.where(p == 0.0, -w, -w + gamma * w * p * ratio)


@triton.jit
def clamp_prob(p):
    return tl.where(p < P_MIN, P_MIN, tl.where(p > 1.0, 1.0, p))


@triton.jit
def unclamped(p):
    return (p >= P_MIN) & (p <= 1.0)


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
    s = tl.sum(tl.where(mask, tl.exp(z - m_b), 0.0), axis=AXIS)
    return m, s, tl.sum(gap(m_b, z, mask), axis=AXIS)


@triton.jit
def lane_update(m, s, z):
    """Per-lane online max / sumexp (no cross-thread reduction in the chunk loop), one exp.

    The smaller of (m, z) is exp'd relative to the larger.  A -inf logit (masked
    lane or class) adds nothing, also while m is -inf; a NaN logit makes the lane's
    s NaN; +inf becomes the lane max and turns NaN at the final lane merge.
    """
    d = z - m
    e = tl.exp(-tl.abs(d))
    s_new = tl.where(d > 0, s * e + 1.0, s + e)
    return tl.maximum(m, z), tl.where(z == float("-inf"), s, s_new)


@triton.jit
def offset_free(z_ref):
    """The reference a chunked row's nce sum is taken against: sum_k (max - z_k) =
    K (max - ref) - sum_k (z_k - ref).  With ref = z_y, a logit of the row, the row's
    common offset cancels exactly in every z_k - ref (the max is not known until the
    row's end).  A non-finite z_y (its row's loss is NaN or inf anyway) gives 0."""
    return tl.where((z_ref > float("-inf")) & (z_ref < float("inf")), z_ref, 0.0)


@triton.jit
def merge_lanes(m, s, AXIS: tl.constexpr):
    """Row (max, sumexp) from per-lane (max, sumexp)."""
    row_m = tl.max(m, axis=AXIS)
    row_safe = tl.where(row_m == float("-inf"), 0.0, row_m)
    return row_m, tl.sum(s * tl.exp(m - row_safe), axis=AXIS)


@triton.jit
def log_softmax(z, m, log_s):
    # (z - max) - log(sumexp), not z - lse: lse rounds to the spacing of the
    # logits (1.5e-5 at 140 in fp32); this keeps log p as accurate as torch's.
    return (z - m) - log_s


# ------------------------------------------------------------------ step 2
@triton.jit
def normalizer_terms(log_p, is_target, mask, gamma, q, ACTIVE: tl.constexpr, PASSIVE: tl.constexpr,
                     GRAD_MODE: tl.constexpr):
    """Per class: (f, f', clamp^q, live p^q, clamp p [k!=y], p [k=y or clamped]), 0 in masked lanes.

    The last is the softmax mass outside the rce sum's live entries, 1 - sum_{k!=y} m_k p_k,
    summed directly: the rce gradient c p_j (1 - that sum) then has no cancellation.

    Only the terms the loss uses are computed; callers sum only those
    (``NFL_SUMS``, ``NGCE_SUMS``, ``RCE_SUMS`` below), the rest are zeros.
    """
    zero = tl.zeros_like(log_p)
    focal = zero
    focal_d = zero
    clamp_pow = zero
    live_pow = zero
    clamp_other = zero
    dead_mass = zero
    if ACTIVE == NFL:
        focal = tl.where(mask, focal_value(log_p, gamma), 0.0)
        focal_d = tl.where(mask, focal_deriv(log_p, gamma, GRAD_MODE), 0.0)
    if ACTIVE == NGCE or PASSIVE == RCE or PASSIVE == NRCE:
        p = tl.exp(log_p)
        live = mask & unclamped(p)
        if ACTIVE == NGCE:
            pq = pow_nonneg(clamp_prob(p), q)
            clamp_pow = tl.where(mask, pq, 0.0)
            live_pow = tl.where(live, pq, 0.0)
        if PASSIVE == RCE or PASSIVE == NRCE:
            clamp_other = tl.where(mask & (~is_target), clamp_prob(p), 0.0)
            dead_mass = tl.where(mask & (is_target | (~live)), p, 0.0)
    return focal, focal_d, clamp_pow, live_pow, clamp_other, dead_mass


@triton.jit
def normalizer_sums(log_p, is_target, mask, gamma, q, ACTIVE: tl.constexpr, PASSIVE: tl.constexpr,
                    GRAD_MODE: tl.constexpr, AXIS: tl.constexpr):
    """The six sums of ``normalizer_terms`` along AXIS (unused ones: 0, no reduction)."""
    t1, t2, t3, t4, t5, t6 = normalizer_terms(log_p, is_target, mask, gamma, q, ACTIVE, PASSIVE, GRAD_MODE)
    zero = tl.sum(tl.zeros_like(log_p), axis=AXIS)
    s1 = zero
    s2 = zero
    s3 = zero
    s4 = zero
    s5 = zero
    s6 = zero
    if ACTIVE == NFL:
        s1 = tl.sum(t1, axis=AXIS)
        s2 = tl.sum(t2, axis=AXIS)
    if ACTIVE == NGCE:
        s3 = tl.sum(t3, axis=AXIS)
        s4 = tl.sum(t4, axis=AXIS)
    if PASSIVE == RCE or PASSIVE == NRCE:
        s5 = tl.sum(t5, axis=AXIS)
        s6 = tl.sum(t6, axis=AXIS)
    return s1, s2, s3, s4, s5, s6


# ------------------------------------------------------------------ step 3
@triton.jit
def finish_row(log_s, l_y, gap_sum, focal, focal_d, clamp_pow, live_pow, clamp_other, dead_mass, Kf, weight,
               alpha, beta, gamma, q, A, ACTIVE: tl.constexpr, PASSIVE: tl.constexpr, GRAD_MODE: tl.constexpr):
    """Loss of a row (or a vector of rows) and its gradient coefficients.

    Returns (loss, c_const, c_focal, c_pow, c_prob, c_prob_dead, c_target, g_sum); the
    coefficients already carry the row's reduction weight (1, or 1/count).
    Each case is the one of finish_row in csrc/apl_loss_math.h.  l_y = log p_y
    comes from the caller as (z_y - max) - log(sumexp), accurate for large logits;
    log_s = log(sumexp), gap_sum = sum_k (max - z_k).  An all -inf row has l_y = NaN.
    """
    p_y = tl.exp(l_y)
    zero = tl.zeros_like(l_y)
    aw = alpha * weight
    bw = beta * weight
    live_y = unclamped(p_y)
    c_const = zero
    c_focal = zero
    c_pow = zero
    c_prob = zero
    c_prob_dead = zero
    c_target = zero
    g_sum = zero
    loss = zero
    if ACTIVE == CE:
        loss = alpha * -l_y
        c_target = zero - aw
        g_sum = zero - aw
    if ACTIVE == FL:
        loss = alpha * focal_value(l_y, gamma)
        d = focal_deriv(l_y, gamma, GRAD_MODE)
        c_target = aw * d
        g_sum = aw * d
    if ACTIVE == NCE:
        D = gap_sum + Kf * log_s    # sum_k -log p_k, a sum of terms >= 0
        act = -l_y / D
        loss = alpha * act
        c_const = aw * act / D
        c_target = -aw / D
        g_sum = aw * (Kf * act - 1.0) / D
    if ACTIVE == NFL:
        act = focal_value(l_y, gamma) / focal
        loss = alpha * act
        d_y = focal_deriv(l_y, gamma, GRAD_MODE)
        c_focal = -aw * act / focal
        c_target = aw * d_y / focal
        g_sum = aw * (d_y - act * focal_d) / focal
    if ACTIVE == GCE:
        pq = pow_nonneg(clamp_prob(p_y), q)
        loss = alpha * (1.0 - pq) / q
        d = tl.where(live_y, -pq, 0.0)
        c_target = aw * d
        g_sum = aw * d
    if ACTIVE == NGCE:
        D = Kf - clamp_pow
        pq = pow_nonneg(clamp_prob(p_y), q)
        act = (1.0 - pq) / D
        loss = alpha * act
        d_y = tl.where(live_y, -q * pq, 0.0)
        c_pow = aw * act * q / D
        c_target = aw * d_y / D
        g_sum = aw * (d_y + act * q * live_pow) / D
    if PASSIVE == MAE or PASSIVE == NMAE:
        if PASSIVE == MAE:
            scale = 1.0
        else:
            scale = 1.0 / (Kf - 1.0)
        loss += beta * scale * -expm1(l_y)
        c_target += -bw * scale * p_y
        g_sum += -bw * scale * p_y
    if PASSIVE == RCE or PASSIVE == NRCE:
        if PASSIVE == RCE:
            scale = -A
        else:
            scale = 1.0 / (Kf - 1.0)
        loss += beta * scale * clamp_other
        # g_j - p_j (its share of sum g) = c p_j ([j live, j != y] - sum_{k!=y} m_k p_k)
        #   = c p_j dead_mass (live j != y),  c p_j (dead_mass - 1) (otherwise; p_j tiny or j = y)
        c_prob = bw * scale * dead_mass
        c_prob_dead = bw * scale * (dead_mass - 1.0)
    return loss, c_const, c_focal, c_pow, c_prob, c_prob_dead, c_target, g_sum


@triton.jit
def grad_block(log_p, is_target, c_const, c_focal, c_pow, c_prob, c_prob_dead, c_target, g_sum, gamma, q,
               ACTIVE: tl.constexpr, PASSIVE: tl.constexpr, GRAD_MODE: tl.constexpr):
    """d loss / d z_j = g_j - p_j sum_k g_k (coefficients broadcast by the caller)."""
    p = tl.exp(log_p)
    g = tl.where(is_target, c_const + c_target, c_const)
    if ACTIVE == NFL:
        g += c_focal * focal_deriv(log_p, gamma, GRAD_MODE)
    if ACTIVE == NGCE:
        g += tl.where(unclamped(p), c_pow * pow_nonneg(p, q), 0.0)
    if PASSIVE == RCE or PASSIVE == NRCE:
        g += p * tl.where(unclamped(p) & (~is_target), c_prob, c_prob_dead)
    return g - p * g_sum
