"""The Triton kernels of the fused merge path (`triton_merge` drives them); imports triton."""

import triton
import triton.language as tl
from triton.language.extra import libdevice


@triton.jit
def _abs_bits(x_ptr, b_ptr, offs, m):
    x = tl.load(x_ptr + offs, mask=m, other=0).to(tl.float32)
    b = tl.load(b_ptr + offs, mask=m, other=0).to(tl.float32)
    d = x - b
    return d, tl.abs(d).to(tl.int32, bitcast=True)


@triton.jit
def _dare_keep(offs, mul, add, thr):
    """Entry j is kept iff half j % 2 of hash(j // 2), as int16, is below thr."""
    w = (offs >> 1).to(tl.uint32) * mul.to(tl.uint32, bitcast=True) + add.to(tl.uint32, bitcast=True)
    w = w ^ (w >> 16)
    w = w * 0x45D9F3B
    w = w ^ (w >> 16)
    w = w * 0x45D9F3B
    w = w ^ (w >> 16)
    half = tl.where((offs & 1) == 0, w & 0xFFFF, w >> 16).to(tl.int32)
    val = tl.where(half >= 32768, half - 65536, half)
    return val < thr


@triton.jit
def _keep(offs, bits, thr_bits, cut, mul, add, dthr, SPARS: tl.constexpr):
    if SPARS == 1:  # magnitude: |d| > T, or |d| == T and index < cut
        k = (bits > thr_bits) | ((bits == thr_bits) & (offs < cut))
    elif SPARS == 2:
        k = _dare_keep(offs, mul, add, dthr)
    else:
        k = bits >= 0
    return k


@triton.jit(do_not_specialize=["n", "prefix", "fixed", "shift"])
def radix_hist_kernel(x_ptr, b_ptr, hist_ptr, n, prefix, fixed, shift, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    _, bits = _abs_bits(x_ptr, b_ptr, offs, m)
    hit = m & ((bits & fixed) == prefix)
    digit = tl.where(hit, (bits >> shift) & 255, 256)
    h = tl.histogram(digit, 512)
    idx = tl.arange(0, 512)
    tl.atomic_add(hist_ptr + idx, h, mask=(idx < 256) & (h > 0))


@triton.jit(do_not_specialize=["n", "lo", "hi", "cap"])
def band_kernel(x_ptr, b_ptr, counts_ptr, vals_ptr, n, lo, hi, cap, BLOCK: tl.constexpr):
    """Counts of |d| > hi, == hi and == lo (lo < hi) into counts[0..2]; the bits of the
    |d| strictly between lo and hi appended to vals (any order), their count in counts[3]."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    _, bits = _abs_bits(x_ptr, b_ptr, offs, m)
    above = tl.sum((m & (bits > hi)).to(tl.int32), axis=0)
    tl.atomic_add(counts_ptr, above, mask=above > 0)
    at_hi = tl.sum((m & (bits == hi)).to(tl.int32), axis=0)
    tl.atomic_add(counts_ptr + 1, at_hi, mask=at_hi > 0)
    at_lo = tl.sum((m & (bits == lo) & (lo < hi)).to(tl.int32), axis=0)
    tl.atomic_add(counts_ptr + 2, at_lo, mask=at_lo > 0)
    band = (m & (bits > lo) & (bits < hi)).to(tl.int32)
    nb = tl.sum(band, axis=0)
    start = tl.atomic_add(counts_ptr + 3, nb, mask=nb > 0)
    pos = start + tl.cumsum(band, axis=0) - 1
    tl.store(vals_ptr + pos, bits, mask=(band > 0) & (pos < cap))


@triton.jit(do_not_specialize=["n", "value", "j"])
def kth_equal_kernel(x_ptr, b_ptr, blk_ptr, local_ptr, out_ptr, n, value, j, BLOCK: tl.constexpr):
    """out[j] = index of the local[j]-th entry (0-based) with |d| bits == value in block blk[j]."""
    blk = tl.load(blk_ptr + j).to(tl.int64)
    r = tl.load(local_ptr + j)
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    _, bits = _abs_bits(x_ptr, b_ptr, offs, m)
    eq = (m & (bits == value)).to(tl.int32)
    hit = (eq > 0) & (tl.cumsum(eq, axis=0) == r + 1)
    tl.store(out_ptr + j, tl.max(tl.where(hit, offs, -1), axis=0))


@triton.jit(do_not_specialize=["n"])
def linear_kernel(out_ptr, x0, x1, x2, x3, w0, w1, w2, w3, div, n, M: tl.constexpr, NORMALIZE: tl.constexpr,
                   BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    o = tl.load(x0 + offs, mask=m, other=0).to(tl.float32) * w0
    if M > 1:
        o = o + tl.load(x1 + offs, mask=m, other=0).to(tl.float32) * w1
    if M > 2:
        o = o + tl.load(x2 + offs, mask=m, other=0).to(tl.float32) * w2
    if M > 3:
        o = o + tl.load(x3 + offs, mask=m, other=0).to(tl.float32) * w3
    if NORMALIZE:
        o = tl.math.div_rn(o, div)
    tl.store(out_ptr + offs, o.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit(do_not_specialize=["n", "value"])
def count_equal_kernel(x_ptr, b_ptr, counts_ptr, n, value, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    _, bits = _abs_bits(x_ptr, b_ptr, offs, m)
    tl.store(counts_ptr + pid, tl.sum((m & (bits == value)).to(tl.int32), axis=0))


@triton.jit(do_not_specialize=["n", "thr_bits", "cut", "mul", "add", "dthr"])
def l1_kernel(x_ptr, b_ptr, sums_ptr, n, thr_bits, cut, mul, add, dthr, SPARS: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    d, bits = _abs_bits(x_ptr, b_ptr, offs, m)
    a = tl.abs(d)
    kept = tl.where(_keep(offs, bits, thr_bits, cut, mul, add, dthr, SPARS), a, 0.0)
    tl.store(sums_ptr + 2 * pid, tl.sum(a, axis=0))
    tl.store(sums_ptr + 2 * pid + 1, tl.sum(kept, axis=0))


@triton.jit
def _mul(a, b, EXACT: tl.constexpr):
    # a separately rounded product: no fused multiply-add, so sums (and the TIES sign
    # election, which flips on the sign of a sum near 0) round exactly like torch's ops
    if EXACT:
        r = libdevice.mul_rn(a, b)
    else:  # the interpreter runs op by op anyway (and has no libdevice)
        r = a * b
    return r


@triton.jit
def _term(x_ptr, b, offs, m, thr_bits, cut, scale, mul, add, dthr, SPARS: tl.constexpr, EXACT: tl.constexpr):
    d = tl.load(x_ptr + offs, mask=m, other=0).to(tl.float32) - b
    bits = tl.abs(d).to(tl.int32, bitcast=True)
    return _mul(tl.where(_keep(offs, bits, thr_bits, cut, mul, add, dthr, SPARS), d, 0.0), scale, EXACT)


@triton.jit
def _agree(o, wd, g, w, dv):
    c = tl.maximum(wd * g, 0.0)
    return o + c, dv + tl.where(c > 0, w, 0.0)


@triton.jit(do_not_specialize=["n", "t0", "t1", "t2", "t3", "c0", "c1", "c2", "c3", "m0", "m1", "m2", "m3",
                               "a0", "a1", "a2", "a3", "q0", "q1", "q2", "q3"])
def combine_kernel(out_ptr, b_ptr, x0, x1, x2, x3, n,
                    t0, t1, t2, t3, c0, c1, c2, c3,  # magnitude: threshold bits, cut index
                    m0, m1, m2, m3, a0, a1, a2, a3, q0, q1, q2, q3,  # DARE: hash mul, add, threshold
                    s0, s1, s2, s3, w0, w1, w2, w3,  # scales (weight x rescale), weights
                    lam, plain_div,
                    M: tl.constexpr, S0: tl.constexpr, S1: tl.constexpr, S2: tl.constexpr, S3: tl.constexpr,
                    CONSENSUS: tl.constexpr, NORMALIZE: tl.constexpr, SAFE_DIV: tl.constexpr, EXACT: tl.constexpr,
                    BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    b = tl.load(b_ptr + offs, mask=m, other=0).to(tl.float32)
    d0 = _term(x0, b, offs, m, t0, c0, s0, m0, a0, q0, S0, EXACT)
    o = d0
    d1 = d0
    d2 = d0
    d3 = d0
    if M > 1:
        d1 = _term(x1, b, offs, m, t1, c1, s1, m1, a1, q1, S1, EXACT)
        o = o + d1
    if M > 2:
        d2 = _term(x2, b, offs, m, t2, c2, s2, m2, a2, q2, S2, EXACT)
        o = o + d2
    if M > 3:
        d3 = _term(x3, b, offs, m, t3, c3, s3, m3, a3, q3, S3, EXACT)
        o = o + d3
    if CONSENSUS:
        g = tl.where((o > 0) | ((o == 0) & ((o.to(tl.int32, bitcast=True) >> 31) == 0)), 1.0, -1.0)
        acc = tl.zeros_like(o)
        dv = tl.zeros_like(o)
        acc, dv = _agree(acc, d0, g, w0, dv)
        if M > 1:
            acc, dv = _agree(acc, d1, g, w1, dv)
        if M > 2:
            acc, dv = _agree(acc, d2, g, w2, dv)
        if M > 3:
            acc, dv = _agree(acc, d3, g, w3, dv)
        if NORMALIZE:
            if SAFE_DIV:
                dv = tl.maximum(dv, 1e-30)
            else:
                dv = tl.where(dv == 0, 1.0, dv)
            acc = tl.math.div_rn(acc, dv)  # IEEE division, as torch (plain / is approximate)
        o = acc * g
    elif NORMALIZE:
        o = tl.math.div_rn(o, plain_div)
    o = _mul(o, lam, EXACT) + b
    tl.store(out_ptr + offs, o.to(out_ptr.dtype.element_ty), mask=m)
