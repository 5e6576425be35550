/* Fused CPU kernels for task-vector merges (TIES, DARE-TIES, task arithmetic).
 *
 * Compiled at first use by evomerge_core/merge/native.py (system C compiler, -O3
 * -march=native -ffp-contract=off) and called through ctypes on ranges [s, e) of flat
 * tensors, so the caller's threads can run chunks in parallel (ctypes releases the GIL).
 * Every function works in blocks of BLOCK entries: the sources (bf16, fp16 or fp32) are
 * converted into small float32 arrays that stay in L1, and each step is a simple loop the
 * compiler vectorises. The arithmetic is, operation by operation and in the same order, that
 * of the torch path in kernels.py (no contraction into fused multiply-adds), so results are
 * bit-identical to it; only the DARE L1 rescale sums are accumulated differently (double).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#define BLOCK 512
#define LANES 16 /* independent partial sums, so the reductions vectorise */
#define MAX_MODELS 8
#define KEYS 32768 /* non-negative bf16 bit patterns */

enum { DT_F32 = 0, DT_BF16 = 1, DT_F16 = 2 };
enum { SPARSE_NONE = 0, SPARSE_TIES = 1, SPARSE_DARE = 2 };

int evomerge_abi(void) { return 1; }
int evomerge_max_models(void) { return MAX_MODELS; }

#ifdef __FLT16_MAX__
int evomerge_has_f16(void) { return 1; }
#else
int evomerge_has_f16(void) { return 0; }
#endif

static inline uint32_t f2u(float x) { uint32_t u; memcpy(&u, &x, 4); return u; }
static inline float u2f(uint32_t u) { float x; memcpy(&x, &u, 4); return x; }

static void load(const void *src, int dt, int64_t off, int n, float *dst) {
    if (dt == DT_BF16) {
        const uint16_t *p = (const uint16_t *)src + off;
        uint32_t *d = (uint32_t *)dst;
        for (int i = 0; i < n; i++) d[i] = (uint32_t)p[i] << 16;
    } else if (dt == DT_F32) {
        memcpy(dst, (const float *)src + off, (size_t)n * 4);
    } else {
#ifdef __FLT16_MAX__
        const _Float16 *p = (const _Float16 *)src + off;
        for (int i = 0; i < n; i++) dst[i] = (float)p[i];
#endif
    }
}

/* float32 -> bf16 bits, round to nearest even, NaN -> 0x7FC0 (as torch does). */
static inline uint16_t to_bf16(uint32_t u) {
    return (u & 0x7FFFFFFFu) > 0x7F800000u ? (uint16_t)0x7FC0 : (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

static void store(void *dst, int dt, int64_t off, int n, const float *src) {
    if (dt == DT_BF16) {
        uint16_t *p = (uint16_t *)dst + off;
        const uint32_t *s = (const uint32_t *)src;
        for (int i = 0; i < n; i++) p[i] = to_bf16(s[i]);
    } else if (dt == DT_F32) {
        memcpy((float *)dst + off, src, (size_t)n * 4);
    } else {
#ifdef __FLT16_MAX__
        _Float16 *p = (_Float16 *)dst + off;
        for (int i = 0; i < n; i++) p[i] = (_Float16)src[i];
#endif
    }
}

/* d = model - base on the block at p, in float32. */
static inline void delta(const void *m, int mdt, int64_t p, int n, float *c, float *d) {
    load(m, mdt, p, n, d);
    for (int i = 0; i < n; i++) d[i] = d[i] - c[i];
}

/* ------------------------------------------------------------------ TIES selection */

/* Adds, per model, the 32768-bin histogram of the bf16-rounded |model - base| over [s, e)
 * to hists[model * KEYS ...]. */
void evomerge_ties_hist(const void *base, int bdt, const void **ms, const int *mdts, int nm, int64_t s, int64_t e,
                        uint32_t *hists) {
    float c[BLOCK], d[BLOCK];
    uint16_t key[BLOCK];
    for (int64_t p = s; p < e; p += BLOCK) {
        int n = (int)(e - p < BLOCK ? e - p : BLOCK);
        load(base, bdt, p, n, c);
        for (int m = 0; m < nm; m++) {
            delta(ms[m], mdts[m], p, n, c, d);
            const uint32_t *du = (const uint32_t *)d;
            for (int i = 0; i < n; i++) key[i] = to_bf16(du[i] & 0x7FFFFFFFu);
            uint32_t *h = hists + (int64_t)m * KEYS;
            for (int i = 0; i < n; i++) h[key[i]]++;
        }
    }
}

/* Adds to hist[0 .. 65536] the histogram of the float32 bits of |model - base|, minus `low`,
 * of the entries of [s, e) whose bf16-rounded magnitude is `bucket`; low = (bucket << 16) -
 * 0x8000, so every such entry lands in the 65537 bins. */
void evomerge_ties_fine_hist(const void *base, int bdt, const void *m, int mdt, int64_t s, int64_t e, int bucket,
                             uint32_t *hist) {
    float c[BLOCK], d[BLOCK];
    uint8_t other[BLOCK];
    const int64_t low = ((int64_t)bucket << 16) - 0x8000;
    const uint32_t center = (uint32_t)bucket << 16; /* where exact bf16 differences land */
    int64_t at_center = 0;
    for (int64_t p = s; p < e; p += BLOCK) {
        int n = (int)(e - p < BLOCK ? e - p : BLOCK);
        load(base, bdt, p, n, c);
        delta(m, mdt, p, n, c, d);
        const uint32_t *du = (const uint32_t *)d;
        int any = 0;
        for (int i = 0; i < n; i++) {
            uint32_t a = du[i] & 0x7FFFFFFFu;
            at_center += a == center;
            other[i] = a != center && to_bf16(a) == bucket;
            any |= other[i];
        }
        if (any)
            for (int i = 0; i < n; i++)
                if (other[i]) hist[(int64_t)(du[i] & 0x7FFFFFFFu) - low]++;
    }
    hist[center - low] += (uint32_t)at_center;
}

/* The index of the nth (0-based) entry of [s, e) with float32 bits of |model - base| equal
 * to `bits`, ascending; -1 if there are not that many. */
int64_t evomerge_nth_equal(const void *base, int bdt, const void *m, int mdt, int64_t s, int64_t e, uint32_t bits,
                           int64_t nth) {
    float c[BLOCK], d[BLOCK];
    for (int64_t p = s; p < e; p += BLOCK) {
        int n = (int)(e - p < BLOCK ? e - p : BLOCK);
        load(base, bdt, p, n, c);
        delta(m, mdt, p, n, c, d);
        const uint32_t *du = (const uint32_t *)d;
        for (int i = 0; i < n; i++) {
            if ((du[i] & 0x7FFFFFFFu) == bits && nth-- == 0) return p + i;
        }
    }
    return -1;
}

/* ------------------------------------------------------------------ DARE masks */

/* -1.0 where the counter hash keeps entry p + i, +0.0 where it drops it (DareMasker). */
static void dare_neg_mask(uint32_t mul, uint32_t add, int32_t threshold, int64_t p, int n, float *nm) {
    /* entry j uses the 16-bit half j & 1 of the hash of word j >> 1: hash the words, then read
     * them as little-endian int16 pairs */
    uint32_t words[BLOCK / 2 + 1];
    int16_t halves[BLOCK + 2];
    const uint32_t w0 = (uint32_t)(p >> 1);
    const int nw = (int)(((p + n - 1) >> 1) - (p >> 1)) + 1;
    for (int i = 0; i < nw; i++) {
        uint32_t h = mul * (w0 + (uint32_t)i) + add;
        h ^= h >> 16;
        h *= 0x45D9F3Bu;
        h ^= h >> 16;
        h *= 0x45D9F3Bu;
        h ^= h >> 16;
        words[i] = h;
    }
    memcpy(halves, words, (size_t)nw * 4);
    const int16_t *u = halves + (p & 1);
    for (int i = 0; i < n; i++) nm[i] = (int32_t)u[i] < threshold ? -1.0f : 0.0f;
}

/* Per model: sum |model - base| over [s, e), and the same over the entries DARE keeps. */
void evomerge_dare_sums(const void *base, int bdt, const void **ms, const int *mdts, int nm, const uint32_t *muls,
                        const uint32_t *adds, const int32_t *thresholds, int64_t s, int64_t e, double *before,
                        double *after) {
    float c[BLOCK], d[BLOCK], mask[BLOCK];
    for (int m = 0; m < nm; m++) before[m] = after[m] = 0.0;
    for (int64_t p = s; p < e; p += BLOCK) {
        int n = (int)(e - p < BLOCK ? e - p : BLOCK);
        load(base, bdt, p, n, c);
        for (int m = 0; m < nm; m++) {
            delta(ms[m], mdts[m], p, n, c, d);
            dare_neg_mask(muls[m], adds[m], thresholds[m], p, n, mask);
            float all[LANES] = {0}, kept[LANES] = {0}; /* per block in float32 lanes, then double */
            int i = 0;
            for (; i + LANES <= n; i += LANES)
                for (int l = 0; l < LANES; l++) {
                    float a = fabsf(d[i + l]);
                    all[l] += a;
                    kept[l] -= a * mask[i + l];
                }
            for (; i < n; i++) {
                float a = fabsf(d[i]);
                all[0] += a;
                kept[0] -= a * mask[i];
            }
            for (int l = 0; l < LANES; l++) {
                before[m] += all[l];
                after[m] += kept[l];
            }
        }
    }
}

/* ------------------------------------------------------------------ combine */

/* out[s:e] = base + lam * combine_m(sparsify_m(model_m - base) * scale_m), as
 * _TaskVectorJob.combine: kinds[m] is SPARSE_*; TIES keeps |d| > cut_ge[m] below index
 * cuts[m] and |d| > cut_gt[m] from it on (hardshrink thresholds); DARE uses the hash
 * (muls, adds, thresholds); consensus elects signs (weights for `normalize`). */
void evomerge_tv_combine(const void *base, int bdt, const void **ms, const int *mdts, int nm, const int *kinds,
                         const float *scales, const float *weights, const float *cut_ge, const float *cut_gt,
                         const int64_t *cuts, const uint32_t *muls, const uint32_t *adds, const int32_t *thresholds,
                         int consensus, int normalize, int safe_div, float plain_div, int use_lam, float lam, int64_t s,
                         int64_t e, void *out, int odt) {
    float c[BLOCK], o[BLOCK], g[BLOCK], dv[BLOCK], tmp[BLOCK];
    float D[MAX_MODELS][BLOCK];
    for (int64_t p = s; p < e; p += BLOCK) {
        int n = (int)(e - p < BLOCK ? e - p : BLOCK);
        load(base, bdt, p, n, c);
        for (int m = 0; m < nm; m++) {
            float *d = D[m];
            float scale = scales[m];
            delta(ms[m], mdts[m], p, n, c, d);
            if (kinds[m] == SPARSE_TIES) {
                int split = cuts[m] <= p ? 0 : (cuts[m] >= p + n ? n : (int)(cuts[m] - p));
                float l = cut_ge[m];
                for (int i = 0; i < split; i++) d[i] = (d[i] >= -l && d[i] <= l) ? 0.0f : d[i];
                l = cut_gt[m];
                for (int i = split; i < n; i++) d[i] = (d[i] >= -l && d[i] <= l) ? 0.0f : d[i];
            } else if (kinds[m] == SPARSE_DARE) {
                dare_neg_mask(muls[m], adds[m], thresholds[m], p, n, tmp);
                for (int i = 0; i < n; i++) d[i] = d[i] * tmp[i];
                scale = -scale;
            }
            for (int i = 0; i < n; i++) d[i] = d[i] * scale;
        }
        if (nm == 0) {
            for (int i = 0; i < n; i++) o[i] = 0.0f;
        } else if (consensus) {
            for (int i = 0; i < n; i++) o[i] = D[0][i];
            for (int m = 1; m < nm; m++)
                for (int i = 0; i < n; i++) o[i] = o[i] + D[m][i];
            for (int i = 0; i < n; i++) g[i] = copysignf(1.0f, o[i]);
            for (int m = 0; m < nm; m++) {
                float *d = D[m];
                float w = weights[m];
                for (int i = 0; i < n; i++) {
                    float x = d[i] * g[i];
                    d[i] = 0.0f > x ? 0.0f : x;
                }
                if (normalize) {
                    for (int i = 0; i < n; i++) {
                        float t = (float)(0.0f < d[i]) - (float)(d[i] < 0.0f);
                        dv[i] = m == 0 ? t * w : dv[i] + t * w;
                    }
                }
                if (m == 0)
                    for (int i = 0; i < n; i++) o[i] = d[i];
                else
                    for (int i = 0; i < n; i++) o[i] = o[i] + d[i];
            }
            if (normalize) {
                if (safe_div)
                    for (int i = 0; i < n; i++) dv[i] = 1e-30f > dv[i] ? 1e-30f : dv[i];
                else
                    for (int i = 0; i < n; i++) dv[i] = dv[i] == 0.0f ? 1.0f : dv[i];
                for (int i = 0; i < n; i++) o[i] = o[i] / dv[i];
            }
            for (int i = 0; i < n; i++) o[i] = o[i] * g[i];
        } else {
            for (int i = 0; i < n; i++) o[i] = D[0][i];
            for (int m = 1; m < nm; m++)
                for (int i = 0; i < n; i++) o[i] = o[i] + D[m][i];
            if (normalize)
                for (int i = 0; i < n; i++) o[i] = o[i] / plain_div;
        }
        if (use_lam)
            for (int i = 0; i < n; i++) o[i] = o[i] * lam;
        for (int i = 0; i < n; i++) o[i] = o[i] + c[i];
        store(out, odt, p, n, o);
    }
}
