/* Paged attention with sinks for the CPU: one call per layer for every sequence of the step.
 *
 * Keys and values are read straight from the paged cache through each sequence's block table (no
 * gathered copy, no mask tensor, no score matrix). Work is split into jobs of (sequence, KV head,
 * query tile); a job keeps one online-softmax state per (query, query head of that KV head) row, so
 * the query heads of a KV head (GQA) share every K/V block read, and walks only the blocks that
 * some row of its tile can see: causal, inside the window on sliding layers, inside the context.
 *
 * Each chunk of keys is converted to fp32 once per job (K transposed to [D, keys]) and the rows then
 * go through it MR at a time as small register-blocked matrix products: a K or V vector loaded feeds
 * MR rows' FMAs, so at depth, where attention is arithmetic and not memory, the FMA units stay busy. With
 * AVX-512 the score and value products take 32 keys (or dimensions) in two 512-bit registers a row: each lane's
 * sum is the same chain of FMAs in the same order as the 256-bit path's, so the results are the same bits. On Arm
 * (the dotprod variant) the same loops run on NEON's 4-lane registers: 16 keys (or dimensions) in four a row.
 *
 * With AVX512-BF16 (the avx512bf16 variant: Zen 4 and later, Sapphire Rapids) and a bf16 cache, both products run
 * on vdpbf16ps instead (see "bf16 pairs" below): twice the multiply-adds an instruction, for a query and softmax
 * weights rounded to bf16.
 *
 * The sink is one extra logit per query head with no value: the running max starts at the sink
 * and the running sum at exp(sink - max) = 1, so it joins the softmax exactly as a column of the
 * score matrix would. Accumulation is fp32 whatever the cache holds (bf16 or fp32).
 *
 * Shapes: q [T, Hq, D] fp32 (scale not applied), out [T, Hq, D] fp32, caches [blocks, bs, Hkv, D],
 * query_starts/query_lens/first_block/context_lens [B], positions [T], block_tables [B, W] (table
 * entry i of sequence b is its logical block first_block[b] + i), sinks [Hq] fp32, window 0 = full.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif
#include "vec_math.h"

#define TILE_ROWS 256   /* query rows (tokens x heads of one KV head) per job: each job reads its KV head's keys once, so a
                        * long prompt reads the cache a quarter as often as with 64 (a 20b layer, 512 queries at depth 4096:
                        * 242 -> 211 ms with AVX-512) */
#define CHUNK_BYTES 16384 /* fp32 K (and V) converted together: many keys per softmax update, both still in L1 */

static inline float bf16_to_f32(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* n rows of D values, from the cache (bf16 or fp32, rows `stride` elements apart) into dst [n, D] fp32. */
static void load_rows(const void *src, int bf16, size_t stride, int n, int D, float *dst) {
    for (int j = 0; j < n; j++) {
        float *d = dst + (size_t)j * D;
        if (!bf16) {
            memcpy(d, (const float *)src + (size_t)j * stride, sizeof(float) * D);
            continue;
        }
        const uint16_t *s = (const uint16_t *)src + (size_t)j * stride;
        int i = 0;
#ifdef __AVX2__
        for (; i + 8 <= D; i += 8) {
            __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(s + i)));
            _mm256_storeu_ps(d + i, _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16)));
        }
#endif
#if defined(__ARM_FEATURE_DOTPROD)
        for (; i + 8 <= D; i += 8) {
            const uint16x8_t h = vld1q_u16(s + i);
            vst1q_f32(d + i, vreinterpretq_f32_u32(vshll_n_u16(vget_low_u16(h), 16)));
            vst1q_f32(d + i + 4, vreinterpretq_f32_u32(vshll_high_n_u16(h, 16)));
        }
#endif
        for (; i < D; i++) d[i] = bf16_to_f32(s[i]);
    }
}


/* Query rows per micro-tile: each K/V vector loaded feeds MR rows' FMAs (a register-blocked GEMM at small M), so
 * the dot products run on the FMA units instead of waiting on loads. 4 rows x 16 keys = 8 accumulators. */
#define MR 4

#ifdef __AVX2__
/* 8 fp32 values of a cache row (bf16 widened by a shift). */
static inline __m256 load8(const void *src, int bf16, size_t at) {
    if (!bf16) return _mm256_loadu_ps((const float *)src + at);
    __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)((const uint16_t *)src + at)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}

/* In-register 8x8 transpose: r[u] holds row u on entry, column u on return. */
static inline void transpose8(__m256 r[8]) {
    __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
    __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
    __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
    __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
    __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xEE);
    __m256 s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xEE);
    __m256 s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xEE);
    __m256 s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xEE);
    r[0] = _mm256_permute2f128_ps(s0, s4, 0x20), r[1] = _mm256_permute2f128_ps(s1, s5, 0x20);
    r[2] = _mm256_permute2f128_ps(s2, s6, 0x20), r[3] = _mm256_permute2f128_ps(s3, s7, 0x20);
    r[4] = _mm256_permute2f128_ps(s0, s4, 0x31), r[5] = _mm256_permute2f128_ps(s1, s5, 0x31);
    r[6] = _mm256_permute2f128_ps(s2, s6, 0x31), r[7] = _mm256_permute2f128_ps(s3, s7, 0x31);
}
#endif

#if defined(__ARM_FEATURE_DOTPROD)
/* 4 fp32 values of a cache row (bf16 widened by a shift). */
static inline float32x4_t load4(const void *src, int bf16, size_t at) {
    if (!bf16) return vld1q_f32((const float *)src + at);
    return vreinterpretq_f32_u32(vshll_n_u16(vld1_u16((const uint16_t *)src + at), 16));
}

/* In-register 4x4 transpose: r[u] holds row u on entry, column u on return. */
static inline void transpose4(float32x4_t r[4]) {
    const float32x4x2_t a = vtrnq_f32(r[0], r[1]), b = vtrnq_f32(r[2], r[3]);
    r[0] = vcombine_f32(vget_low_f32(a.val[0]), vget_low_f32(b.val[0]));
    r[1] = vcombine_f32(vget_low_f32(a.val[1]), vget_low_f32(b.val[1]));
    r[2] = vcombine_f32(vget_high_f32(a.val[0]), vget_high_f32(b.val[0]));
    r[3] = vcombine_f32(vget_high_f32(a.val[1]), vget_high_f32(b.val[1]));
}
#endif

/* n keys of D values from the cache (rows `stride` elements apart) into columns col0 … col0+n-1 of kT [D, ld]:
 * transposed, so a score micro-tile loads 8 or 16 keys' values of one dimension in one vector. */
static void load_keys_transposed(const void *src, int bf16, size_t stride, int n, int D, float *kT, int ld, int col0) {
    int j = 0;
#ifdef __AVX2__
    if (D % 8 == 0) {
        for (; j + 8 <= n; j += 8) {
            for (int i = 0; i < D; i += 8) {
                __m256 r[8];
                for (int u = 0; u < 8; u++) r[u] = load8(src, bf16, (size_t)(j + u) * stride + i);
                transpose8(r);
                for (int u = 0; u < 8; u++) _mm256_storeu_ps(kT + (size_t)(i + u) * ld + col0 + j, r[u]);
            }
        }
    }
#endif
#if defined(__ARM_FEATURE_DOTPROD)
    if (D % 4 == 0) {
        for (; j + 4 <= n; j += 4) {
            for (int i = 0; i < D; i += 4) {
                float32x4_t r[4];
                for (int u = 0; u < 4; u++) r[u] = load4(src, bf16, (size_t)(j + u) * stride + i);
                transpose4(r);
                for (int u = 0; u < 4; u++) vst1q_f32(kT + (size_t)(i + u) * ld + col0 + j, r[u]);
            }
        }
    }
#endif
    for (; j < n; j++) {
        for (int i = 0; i < D; i++) {
            size_t at = (size_t)j * stride + i;
            kT[(size_t)i * ld + col0 + j] = bf16 ? bf16_to_f32(((const uint16_t *)src)[at]) : ((const float *)src)[at];
        }
    }
}

/* s[r * ls + j] = q[r] · k_j for the MR rows and keys j0 ≤ j < j1 (multiples of 8), from kT [D, ld]. */
static void score_tile(const float *const q[MR], const float *kT, int ld, int D, int j0, int j1, float *s, int ls) {
    int j = j0;
#ifdef __AVX512F__
    for (; j + 32 <= j1; j += 32) { /* 32 keys in two 512-bit registers a row: each key vector feeds MR rows */
        __m512 a[MR][2];
        for (int r = 0; r < MR; r++) a[r][0] = a[r][1] = _mm512_setzero_ps();
        for (int i = 0; i < D; i++) {
            const float *k = kT + (size_t)i * ld + j;
            __m512 k0 = _mm512_loadu_ps(k), k1 = _mm512_loadu_ps(k + 16);
            for (int r = 0; r < MR; r++) {
                __m512 qr = _mm512_set1_ps(q[r][i]);
                a[r][0] = _mm512_fmadd_ps(qr, k0, a[r][0]);
                a[r][1] = _mm512_fmadd_ps(qr, k1, a[r][1]);
            }
        }
        for (int r = 0; r < MR; r++) {
            _mm512_storeu_ps(s + (size_t)r * ls + j, a[r][0]);
            _mm512_storeu_ps(s + (size_t)r * ls + j + 16, a[r][1]);
        }
    }
#endif
#ifdef __AVX2__
    for (; j + 16 <= j1; j += 16) {
        __m256 a[MR][2];
        for (int r = 0; r < MR; r++) a[r][0] = a[r][1] = _mm256_setzero_ps();
        for (int i = 0; i < D; i++) {
            const float *k = kT + (size_t)i * ld + j;
            __m256 k0 = _mm256_loadu_ps(k), k1 = _mm256_loadu_ps(k + 8);
            for (int r = 0; r < MR; r++) {
                __m256 qr = _mm256_broadcast_ss(q[r] + i);
                a[r][0] = _mm256_fmadd_ps(qr, k0, a[r][0]);
                a[r][1] = _mm256_fmadd_ps(qr, k1, a[r][1]);
            }
        }
        for (int r = 0; r < MR; r++) {
            _mm256_storeu_ps(s + (size_t)r * ls + j, a[r][0]);
            _mm256_storeu_ps(s + (size_t)r * ls + j + 8, a[r][1]);
        }
    }
    for (; j < j1; j += 8) {
        __m256 a[MR];
        for (int r = 0; r < MR; r++) a[r] = _mm256_setzero_ps();
        for (int i = 0; i < D; i++) {
            __m256 k0 = _mm256_loadu_ps(kT + (size_t)i * ld + j);
            for (int r = 0; r < MR; r++) a[r] = _mm256_fmadd_ps(_mm256_broadcast_ss(q[r] + i), k0, a[r]);
        }
        for (int r = 0; r < MR; r++) _mm256_storeu_ps(s + (size_t)r * ls + j, a[r]);
    }
#endif
#if defined(__ARM_FEATURE_DOTPROD)
    for (; j + 16 <= j1; j += 16) { /* 16 keys in four registers a row: each key vector feeds MR rows */
        float32x4_t a[MR][4];
        for (int r = 0; r < MR; r++)
            for (int u = 0; u < 4; u++) a[r][u] = vdupq_n_f32(0.0f);
        for (int i = 0; i < D; i++) {
            const float *k = kT + (size_t)i * ld + j;
            const float32x4_t k0 = vld1q_f32(k), k1 = vld1q_f32(k + 4), k2 = vld1q_f32(k + 8), k3 = vld1q_f32(k + 12);
            for (int r = 0; r < MR; r++) {
                const float32x4_t qr = vdupq_n_f32(q[r][i]);
                a[r][0] = vfmaq_f32(a[r][0], qr, k0);
                a[r][1] = vfmaq_f32(a[r][1], qr, k1);
                a[r][2] = vfmaq_f32(a[r][2], qr, k2);
                a[r][3] = vfmaq_f32(a[r][3], qr, k3);
            }
        }
        for (int r = 0; r < MR; r++)
            for (int u = 0; u < 4; u++) vst1q_f32(s + (size_t)r * ls + j + 4 * u, a[r][u]);
    }
    for (; j + 4 <= j1; j += 4) {
        float32x4_t a[MR];
        for (int r = 0; r < MR; r++) a[r] = vdupq_n_f32(0.0f);
        for (int i = 0; i < D; i++) {
            const float32x4_t k0 = vld1q_f32(kT + (size_t)i * ld + j);
            for (int r = 0; r < MR; r++) a[r] = vfmaq_f32(a[r], vdupq_n_f32(q[r][i]), k0);
        }
        for (int r = 0; r < MR; r++) vst1q_f32(s + (size_t)r * ls + j, a[r]);
    }
#endif
    for (; j < j1; j++) {
        for (int r = 0; r < MR; r++) {
            float d = 0.0f;
            for (int i = 0; i < D; i++) d += q[r][i] * kT[(size_t)i * ld + j];
            s[(size_t)r * ls + j] = d;
        }
    }
}

/* The largest of s[lo … hi]. */
static float range_max(const float *s, int lo, int hi) {
    float best = -INFINITY;
    int j = lo;
#ifdef __AVX2__
    if (hi - lo + 1 >= 8) {
        __m256 vbest = _mm256_set1_ps(-INFINITY);
        for (; j + 8 <= hi + 1; j += 8) vbest = _mm256_max_ps(vbest, _mm256_loadu_ps(s + j));
        float lanes[8];
        _mm256_storeu_ps(lanes, vbest);
        for (int i = 0; i < 8; i++) best = lanes[i] > best ? lanes[i] : best;
    }
#endif
#if defined(__ARM_FEATURE_DOTPROD)
    if (hi - lo + 1 >= 4) {
        float32x4_t vbest = vdupq_n_f32(-INFINITY);
        for (; j + 4 <= hi + 1; j += 4) vbest = vmaxq_f32(vbest, vld1q_f32(s + j));
        const float lanes = vmaxvq_f32(vbest);
        best = lanes > best ? lanes : best;
    }
#endif
    for (; j <= hi; j++) best = s[j] > best ? s[j] : best;
    return best;
}

/* p[j] = exp(s[j] - m) in place for j in [lo, hi] (the range is what `scores` wrote); → their sum. */
static float exponentiate(float *s, int lo, int hi, float m) {
    float sum = 0.0f;
    int j = lo;
#ifdef __AVX2__
    __m256 vm = _mm256_set1_ps(m), vsum = _mm256_setzero_ps();
#ifdef __AVX512F__
    /* 16 keys a step; the sum still goes into 8 lanes, low half first, so each lane adds the same keys in the same
     * order as the 8-lane loop (the same bits) */
    const __m512 vm16 = _mm512_set1_ps(m);
    for (; j + 16 <= hi + 1; j += 16) {
        __m512 p = exp16(_mm512_sub_ps(_mm512_loadu_ps(s + j), vm16));
        _mm512_storeu_ps(s + j, p);
        vsum = _mm256_add_ps(vsum, _mm512_castps512_ps256(p));
        vsum = _mm256_add_ps(vsum, _mm512_extractf32x8_ps(p, 1));
    }
#endif
    for (; j + 8 <= hi + 1; j += 8) {
        __m256 p = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + j), vm));
        _mm256_storeu_ps(s + j, p);
        vsum = _mm256_add_ps(vsum, p);
    }
    float part[8];
    _mm256_storeu_ps(part, vsum);
    for (int i = 0; i < 8; i++) sum += part[i];
#endif
#if defined(__ARM_FEATURE_DOTPROD)
    const float32x4_t vm = vdupq_n_f32(m);
    float32x4_t vsum = vdupq_n_f32(0.0f);
    for (; j + 4 <= hi + 1; j += 4) {
        const float32x4_t p = exp4(vsubq_f32(vld1q_f32(s + j), vm));
        vst1q_f32(s + j, p);
        vsum = vaddq_f32(vsum, p);
    }
    sum += vaddvq_f32(vsum);
#endif
    for (; j <= hi; j++) {
        s[j] = expf(s[j] - m);
        sum += s[j];
    }
    return sum;
}

/* acc = acc * c + sum_{j in [lo, hi]} p[j] v_j, v [n, D] fp32. */
static void accumulate(float *acc, float c, const float *p, const float *v, int lo, int hi, int D) {
    int i = 0;
#ifdef __AVX2__
    for (; i + 64 <= D; i += 64) { /* 64 outputs in 8 registers: one broadcast of p[j] feeds 8 FMAs */
        __m256 a[8];
        for (int u = 0; u < 8; u++) a[u] = _mm256_mul_ps(_mm256_loadu_ps(acc + i + 8 * u), _mm256_set1_ps(c));
        for (int j = lo; j <= hi; j++) {
            __m256 pj = _mm256_set1_ps(p[j]);
            const float *vj = v + (size_t)j * D + i;
            for (int u = 0; u < 8; u++) a[u] = _mm256_fmadd_ps(pj, _mm256_loadu_ps(vj + 8 * u), a[u]);
        }
        for (int u = 0; u < 8; u++) _mm256_storeu_ps(acc + i + 8 * u, a[u]);
    }
    for (; i + 8 <= D; i += 8) {
        __m256 a = _mm256_mul_ps(_mm256_loadu_ps(acc + i), _mm256_set1_ps(c));
        for (int j = lo; j <= hi; j++) a = _mm256_fmadd_ps(_mm256_set1_ps(p[j]), _mm256_loadu_ps(v + (size_t)j * D + i), a);
        _mm256_storeu_ps(acc + i, a);
    }
#endif
#if defined(__ARM_FEATURE_DOTPROD)
    for (; i + 16 <= D; i += 16) { /* 16 outputs in 4 registers: one broadcast of p[j] feeds 4 FMAs */
        float32x4_t a[4];
        for (int u = 0; u < 4; u++) a[u] = vmulq_n_f32(vld1q_f32(acc + i + 4 * u), c);
        for (int j = lo; j <= hi; j++) {
            const float32x4_t pj = vdupq_n_f32(p[j]);
            const float *vj = v + (size_t)j * D + i;
            for (int u = 0; u < 4; u++) a[u] = vfmaq_f32(a[u], pj, vld1q_f32(vj + 4 * u));
        }
        for (int u = 0; u < 4; u++) vst1q_f32(acc + i + 4 * u, a[u]);
    }
    for (; i + 4 <= D; i += 4) {
        float32x4_t a = vmulq_n_f32(vld1q_f32(acc + i), c);
        for (int j = lo; j <= hi; j++) a = vfmaq_f32(a, vdupq_n_f32(p[j]), vld1q_f32(v + (size_t)j * D + i));
        vst1q_f32(acc + i, a);
    }
#endif
    for (; i < D; i++) {
        float a = acc[i] * c;
        for (int j = lo; j <= hi; j++) a += p[j] * v[(size_t)j * D + i];
        acc[i] = a;
    }
}

/* acc[r] = acc[r] * c[r] + sum_{j in [lo, hi]} p[r * lp + j] v_j for the MR rows (acc rows D apart), v [n, D]:
 * each V vector loaded feeds MR rows. */
static void accumulate_tile(float *acc, const float c[MR], const float *p, int lp, const float *v, int lo, int hi, int D) {
    int i = 0;
#ifdef __AVX512F__
    for (; i + 32 <= D; i += 32) { /* 32 dimensions in two 512-bit registers a row */
        __m512 a[MR][2];
        for (int r = 0; r < MR; r++) {
            __m512 cr = _mm512_set1_ps(c[r]);
            a[r][0] = _mm512_mul_ps(_mm512_loadu_ps(acc + (size_t)r * D + i), cr);
            a[r][1] = _mm512_mul_ps(_mm512_loadu_ps(acc + (size_t)r * D + i + 16), cr);
        }
        for (int j = lo; j <= hi; j++) {
            const float *vj = v + (size_t)j * D + i;
            __m512 v0 = _mm512_loadu_ps(vj), v1 = _mm512_loadu_ps(vj + 16);
            for (int r = 0; r < MR; r++) {
                __m512 pr = _mm512_set1_ps(p[(size_t)r * lp + j]);
                a[r][0] = _mm512_fmadd_ps(pr, v0, a[r][0]);
                a[r][1] = _mm512_fmadd_ps(pr, v1, a[r][1]);
            }
        }
        for (int r = 0; r < MR; r++) {
            _mm512_storeu_ps(acc + (size_t)r * D + i, a[r][0]);
            _mm512_storeu_ps(acc + (size_t)r * D + i + 16, a[r][1]);
        }
    }
#endif
#ifdef __AVX2__
    for (; i + 16 <= D; i += 16) {
        __m256 a[MR][2];
        for (int r = 0; r < MR; r++) {
            __m256 cr = _mm256_set1_ps(c[r]);
            a[r][0] = _mm256_mul_ps(_mm256_loadu_ps(acc + (size_t)r * D + i), cr);
            a[r][1] = _mm256_mul_ps(_mm256_loadu_ps(acc + (size_t)r * D + i + 8), cr);
        }
        for (int j = lo; j <= hi; j++) {
            const float *vj = v + (size_t)j * D + i;
            __m256 v0 = _mm256_loadu_ps(vj), v1 = _mm256_loadu_ps(vj + 8);
            for (int r = 0; r < MR; r++) {
                __m256 pr = _mm256_broadcast_ss(p + (size_t)r * lp + j);
                a[r][0] = _mm256_fmadd_ps(pr, v0, a[r][0]);
                a[r][1] = _mm256_fmadd_ps(pr, v1, a[r][1]);
            }
        }
        for (int r = 0; r < MR; r++) {
            _mm256_storeu_ps(acc + (size_t)r * D + i, a[r][0]);
            _mm256_storeu_ps(acc + (size_t)r * D + i + 8, a[r][1]);
        }
    }
    for (; i + 8 <= D; i += 8) {
        __m256 a[MR];
        for (int r = 0; r < MR; r++) a[r] = _mm256_mul_ps(_mm256_loadu_ps(acc + (size_t)r * D + i), _mm256_set1_ps(c[r]));
        for (int j = lo; j <= hi; j++) {
            __m256 vj = _mm256_loadu_ps(v + (size_t)j * D + i);
            for (int r = 0; r < MR; r++) a[r] = _mm256_fmadd_ps(_mm256_broadcast_ss(p + (size_t)r * lp + j), vj, a[r]);
        }
        for (int r = 0; r < MR; r++) _mm256_storeu_ps(acc + (size_t)r * D + i, a[r]);
    }
#endif
#if defined(__ARM_FEATURE_DOTPROD)
    for (; i + 16 <= D; i += 16) { /* 16 dimensions in four registers a row: each V vector loaded feeds MR rows */
        float32x4_t a[MR][4];
        for (int r = 0; r < MR; r++)
            for (int u = 0; u < 4; u++) a[r][u] = vmulq_n_f32(vld1q_f32(acc + (size_t)r * D + i + 4 * u), c[r]);
        for (int j = lo; j <= hi; j++) {
            const float *vj = v + (size_t)j * D + i;
            const float32x4_t v0 = vld1q_f32(vj), v1 = vld1q_f32(vj + 4), v2 = vld1q_f32(vj + 8), v3 = vld1q_f32(vj + 12);
            for (int r = 0; r < MR; r++) {
                const float32x4_t pr = vdupq_n_f32(p[(size_t)r * lp + j]);
                a[r][0] = vfmaq_f32(a[r][0], pr, v0);
                a[r][1] = vfmaq_f32(a[r][1], pr, v1);
                a[r][2] = vfmaq_f32(a[r][2], pr, v2);
                a[r][3] = vfmaq_f32(a[r][3], pr, v3);
            }
        }
        for (int r = 0; r < MR; r++)
            for (int u = 0; u < 4; u++) vst1q_f32(acc + (size_t)r * D + i + 4 * u, a[r][u]);
    }
    for (; i + 4 <= D; i += 4) {
        float32x4_t a[MR];
        for (int r = 0; r < MR; r++) a[r] = vmulq_n_f32(vld1q_f32(acc + (size_t)r * D + i), c[r]);
        for (int j = lo; j <= hi; j++) {
            const float32x4_t vj = vld1q_f32(v + (size_t)j * D + i);
            for (int r = 0; r < MR; r++) a[r] = vfmaq_f32(a[r], vdupq_n_f32(p[(size_t)r * lp + j]), vj);
        }
        for (int r = 0; r < MR; r++) vst1q_f32(acc + (size_t)r * D + i, a[r]);
    }
#endif
    for (; i < D; i++) {
        for (int r = 0; r < MR; r++) {
            float a = acc[(size_t)r * D + i] * c[r];
            for (int j = lo; j <= hi; j++) a += p[(size_t)r * lp + j] * v[(size_t)j * D + i];
            acc[(size_t)r * D + i] = a;
        }
    }
}

#if defined(__AVX512BF16__) && defined(__AVX512VL__)
/* ---------------------------------------------------------------- bf16 pairs (the avx512bf16 variant, bf16 caches)
 *
 * vdpbf16ps adds to each fp32 lane the two products of a pair of bf16 values (32 multiply-adds a 512-bit register,
 * twice an fp32 FMA's), so both products keep their operands as pairs in dwords: a query row as its dimensions
 * (2i, 2i+1), a key chunk as kP [D/2, keys] (lane = key, as kT), a weight row as keys (2p, 2p+1), and a value chunk
 * as vP [keys/2, D] (lane = dimension). Keys and values are bf16 in the cache already; the query (times the scale)
 * and the softmax weights are rounded to bf16, to nearest even. Products of two bf16 are exact in fp32 and summed in
 * fp32, so the only new error is that rounding: a score moves by at most 2^-8 of sum |q_i k_i|, an output by at most
 * 2^-8 of the largest |v| for the weights (the bounds tests/test_attention_cpu_kernel.py holds this path to). */
#define BF16_PAIRS 1

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even, as vcvtneps2bf16 (finite values) */
    uint32_t bits;
    memcpy(&bits, &f, 4);
    return (uint16_t)((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
}

/* dst[0 … n-1] = x rounded to bf16. */
static void round_to_bf16(const float *x, int n, uint16_t *dst) {
    int i = 0;
    for (; i + 16 <= n; i += 16) _mm256_storeu_si256((__m256i *)(dst + i), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(x + i)));
    for (; i < n; i++) dst[i] = f32_to_bf16(x[i]);
}

/* n keys of a bf16 cache (rows `stride` elements apart) into columns col0 … col0+n-1 of kP [(D+1)/2, ld]: dword i of
 * a key is its dimensions 2i (low half) and 2i+1 (0 past D). A transpose of dwords: no conversion. */
static void load_key_pairs(const uint16_t *src, size_t stride, int n, int D, uint32_t *kP, int ld, int col0) {
    const int D2 = (D + 1) / 2;
    int j = 0;
    if (D % 16 == 0) {
        for (; j + 8 <= n; j += 8) {
            for (int i = 0; i < D2; i += 8) {
                __m256 r[8];
                for (int u = 0; u < 8; u++) r[u] = _mm256_castsi256_ps(_mm256_loadu_si256((const __m256i *)(src + (size_t)(j + u) * stride + 2 * i)));
                transpose8(r);
                for (int u = 0; u < 8; u++) _mm256_storeu_ps((float *)(kP + (size_t)(i + u) * ld + col0 + j), r[u]);
            }
        }
    }
    for (; j < n; j++) {
        const uint16_t *k = src + (size_t)j * stride;
        for (int i = 0; i < D2; i++) kP[(size_t)i * ld + col0 + j] = k[2 * i] | (2 * i + 1 < D ? (uint32_t)k[2 * i + 1] << 16 : 0u);
    }
}

/* vP [p, D] = keys (2p, 2p+1) of v [., D] (bf16 rows) for the pairs holding keys lo … hi; a key outside lo … hi is
 * 0 (a cache slot past the context may hold anything, and 0 x NaN would not be 0). */
static void pair_values(const uint16_t *v, int lo, int hi, int D, uint32_t *vP) {
    for (int p = lo / 2; p <= hi / 2; p++) {
        const uint16_t *a = v + (size_t)(2 * p) * D, *b = a + D;
        const int use_a = 2 * p >= lo, use_b = 2 * p + 1 <= hi;
        uint32_t *dst = vP + (size_t)p * D;
        int i = 0;
        for (; i + 16 <= D; i += 16) {
            __m512i lo16 = use_a ? _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(a + i))) : _mm512_setzero_si512();
            __m512i hi16 = use_b ? _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(b + i))) : _mm512_setzero_si512();
            _mm512_storeu_si512(dst + i, _mm512_or_si512(lo16, _mm512_slli_epi32(hi16, 16)));
        }
        for (; i < D; i++) dst[i] = (use_a ? a[i] : 0u) | (use_b ? (uint32_t)b[i] << 16 : 0u);
    }
}

/* s[r * ls + j] = q[r] · k_j for the MR rows (pairs, D2 dwords) and keys j0 ≤ j < j1 (multiples of 8), kP [D2, ld]. */
static void score_pairs(const uint32_t *const q[MR], const uint32_t *kP, int ld, int D2, int j0, int j1, float *s, int ls) {
    int j = j0;
    for (; j + 32 <= j1; j += 32) {
        __m512 a[MR][2];
        for (int r = 0; r < MR; r++) a[r][0] = a[r][1] = _mm512_setzero_ps();
        for (int i = 0; i < D2; i++) {
            const uint32_t *k = kP + (size_t)i * ld + j;
            const __m512bh k0 = (__m512bh)_mm512_loadu_si512(k), k1 = (__m512bh)_mm512_loadu_si512(k + 16);
            for (int r = 0; r < MR; r++) {
                const __m512bh qr = (__m512bh)_mm512_set1_epi32((int)q[r][i]);
                a[r][0] = _mm512_dpbf16_ps(a[r][0], qr, k0);
                a[r][1] = _mm512_dpbf16_ps(a[r][1], qr, k1);
            }
        }
        for (int r = 0; r < MR; r++) {
            _mm512_storeu_ps(s + (size_t)r * ls + j, a[r][0]);
            _mm512_storeu_ps(s + (size_t)r * ls + j + 16, a[r][1]);
        }
    }
    for (; j < j1; j += 8) {
        __m256 a[MR];
        for (int r = 0; r < MR; r++) a[r] = _mm256_setzero_ps();
        for (int i = 0; i < D2; i++) {
            const __m256bh k0 = (__m256bh)_mm256_loadu_si256((const __m256i *)(kP + (size_t)i * ld + j));
            for (int r = 0; r < MR; r++) a[r] = _mm256_dpbf16_ps(a[r], (__m256bh)_mm256_set1_epi32((int)q[r][i]), k0);
        }
        for (int r = 0; r < MR; r++) _mm256_storeu_ps(s + (size_t)r * ls + j, a[r]);
    }
}

static inline float bf16_low(uint32_t pair) { return bf16_to_f32((uint16_t)pair); }
static inline float bf16_high(uint32_t pair) { return bf16_to_f32((uint16_t)(pair >> 16)); }

/* acc[r] = acc[r] * c[r] + sum over pairs p0 … p1 of row r's weight pairs (w [r * lw + p]) times vP's, for the first
 * n rows (a constant once inlined; acc rows D apart). */
static inline __attribute__((always_inline)) void accumulate_pairs(float *acc, const float *c, const uint32_t *w, int lw,
                                                                   const uint32_t *vP, int p0, int p1, int D, const int n) {
    int i = 0;
    for (; i + 32 <= D; i += 32) {
        __m512 a[MR][2];
        for (int r = 0; r < n; r++) {
            const __m512 cr = _mm512_set1_ps(c[r]);
            a[r][0] = _mm512_mul_ps(_mm512_loadu_ps(acc + (size_t)r * D + i), cr);
            a[r][1] = _mm512_mul_ps(_mm512_loadu_ps(acc + (size_t)r * D + i + 16), cr);
        }
        for (int p = p0; p <= p1; p++) {
            const uint32_t *vp = vP + (size_t)p * D + i;
            const __m512bh v0 = (__m512bh)_mm512_loadu_si512(vp), v1 = (__m512bh)_mm512_loadu_si512(vp + 16);
            for (int r = 0; r < n; r++) {
                const __m512bh wr = (__m512bh)_mm512_set1_epi32((int)w[(size_t)r * lw + p]);
                a[r][0] = _mm512_dpbf16_ps(a[r][0], wr, v0);
                a[r][1] = _mm512_dpbf16_ps(a[r][1], wr, v1);
            }
        }
        for (int r = 0; r < n; r++) {
            _mm512_storeu_ps(acc + (size_t)r * D + i, a[r][0]);
            _mm512_storeu_ps(acc + (size_t)r * D + i + 16, a[r][1]);
        }
    }
    for (; i + 16 <= D; i += 16) {
        __m512 a[MR];
        for (int r = 0; r < n; r++) a[r] = _mm512_mul_ps(_mm512_loadu_ps(acc + (size_t)r * D + i), _mm512_set1_ps(c[r]));
        for (int p = p0; p <= p1; p++) {
            const __m512bh v0 = (__m512bh)_mm512_loadu_si512(vP + (size_t)p * D + i);
            for (int r = 0; r < n; r++) a[r] = _mm512_dpbf16_ps(a[r], (__m512bh)_mm512_set1_epi32((int)w[(size_t)r * lw + p]), v0);
        }
        for (int r = 0; r < n; r++) _mm512_storeu_ps(acc + (size_t)r * D + i, a[r]);
    }
    for (; i < D; i++) {
        for (int r = 0; r < n; r++) {
            float a = acc[(size_t)r * D + i] * c[r];
            for (int p = p0; p <= p1; p++) {
                const uint32_t wp = w[(size_t)r * lw + p], vp = vP[(size_t)p * D + i];
                a += bf16_low(wp) * bf16_low(vp) + bf16_high(wp) * bf16_high(vp);
            }
            acc[(size_t)r * D + i] = a;
        }
    }
}

/* The n rows' weights s [r * ls + j] (keys ulo … uhi) rounded to bf16 pairs w [r * lw + p] for the pairs p holding
 * those keys; the key sharing a pair with ulo or uhi gets weight 0. */
static void pair_weights(const float *s, int ls, int n, int ulo, int uhi, uint32_t *w, int lw) {
    const int j0 = ulo & ~1, j1 = uhi | 1;
    for (int r = 0; r < n; r++) {
        uint16_t *row = (uint16_t *)(w + (size_t)r * lw);
        round_to_bf16(s + (size_t)r * ls + j0, j1 - j0 + 1, row + j0);
        if (ulo & 1) row[ulo - 1] = 0;
        if (!(uhi & 1)) row[uhi + 1] = 0;
    }
}
#endif

/* Keys per chunk: whole cache blocks, about CHUNK_BYTES of fp32 keys, at least one block. */
static int chunk_keys(int block_size, int dim) {
    int keys = CHUNK_BYTES / (int)sizeof(float) / dim;
    return keys > block_size ? keys / block_size * block_size : block_size;
}

/* n rounded up to a multiple of 8: the width of the transposed keys and of a score row, so score vectors never
 * run past them. */
static int padded(int n) { return (n + 7) / 8 * 8; }

typedef struct {
    const float *q;
    float *out;
    const void *k_cache, *v_cache;
    int bf16, block_size, n_kv, group, dim;
    const int64_t *query_starts, *query_lens, *positions, *block_tables, *first_block, *context_lens;
    int table_width;
    const float *sinks;
    int window;
    float scale;
} Problem;

/* Softmax update of one row over its keys [jlo, jhi] of a chunk, whose scores s hold for keys [ulo, uhi] of the
 * micro-tile (jlo > jhi: the row sees none of them): s becomes the row's weights there, 0 outside its own keys.
 * → the factor its accumulator is rescaled by. */
static float row_update(float *s, int ulo, int uhi, int jlo, int jhi, float *m, float *l) {
    if (jlo > jhi) {
        memset(s + ulo, 0, sizeof(float) * (uhi - ulo + 1));
        return 1.0f;
    }
    float best = range_max(s, jlo, jhi);
    float m_new = best > *m ? best : *m;
    float c = expf(*m - m_new);
    float sum = exponentiate(s, jlo, jhi, m_new);
    *l = *l * c + sum;
    *m = m_new;
    if (jlo > ulo) memset(s + ulo, 0, sizeof(float) * (jlo - ulo));
    if (jhi < uhi) memset(s + jhi + 1, 0, sizeof(float) * (uhi - jhi));
    return c;
}

/* One job: sequence b, KV head h, query tokens t0 .. t0+nt-1 of that sequence's run. The tile's rows are taken
 * MR at a time against each chunk: scores over the union of their key ranges (a row's own range differs only at
 * the causal and window edges), each row's softmax over its own keys, then one weighted sum of V for all MR. */
static void attend_tile(const Problem *P, int b, int h, int64_t t0, int nt, float *scratch) {
    const int D = P->dim, G = P->group, bs = P->block_size, rows = nt * G;
    float *q = scratch, *acc = q + (size_t)rows * D, *m = acc + (size_t)rows * D, *l = m + rows;
    int64_t *lo = (int64_t *)(l + rows), *hi = lo + rows;
    const int chunk = chunk_keys(bs, D), width = padded(chunk);
    float *kT = (float *)(hi + rows), *vb = kT + (size_t)D * width, *s = vb + (size_t)chunk * D;
#ifdef BF16_PAIRS
    /* bf16 pairs: kP in kT, vP in vb; after s the rows' rounded queries, one micro-tile's weight pairs and the
     * chunk's V rows as the cache holds them. */
    const int pairs = P->bf16, D2 = (D + 1) / 2;
    uint32_t *kP = (uint32_t *)kT, *vP = (uint32_t *)vb, *qP = (uint32_t *)(s + (size_t)MR * width), *wP = qP + (size_t)rows * D2;
    uint16_t *v_raw = (uint16_t *)(wP + (size_t)MR * width / 2);
#endif
    const int64_t first = P->first_block[b] * bs, limit = (P->first_block[b] + P->table_width) * bs - 1;
    const int64_t last_key = P->context_lens[b] - 1;
    int64_t tile_lo = INT64_MAX, tile_hi = -1;
    for (int r = 0; r < rows; r++) {
        int64_t token = P->query_starts[b] + t0 + r / G;
        int head = h * G + r % G;
        int64_t pos = P->positions[token];
        const float *src = P->q + ((size_t)token * P->n_kv * G + head) * D;
        for (int i = 0; i < D; i++) q[(size_t)r * D + i] = src[i] * P->scale;
        memset(acc + (size_t)r * D, 0, sizeof(float) * D);
#ifdef BF16_PAIRS
        if (pairs) {
            uint16_t *row = (uint16_t *)(qP + (size_t)r * D2);
            round_to_bf16(q + (size_t)r * D, D, row);
            if (D & 1) row[D] = 0;
        }
#endif
        m[r] = P->sinks[head]; /* the sink is the first logit seen: max = sink, sum = exp(0) = 1 */
        l[r] = 1.0f;
        lo[r] = P->window > 0 && pos - P->window + 1 > 0 ? pos - P->window + 1 : 0;
        lo[r] = lo[r] > first ? lo[r] : first;
        hi[r] = pos < last_key ? pos : last_key;
        hi[r] = hi[r] < limit ? hi[r] : limit;
        if (lo[r] <= hi[r]) {
            tile_lo = lo[r] < tile_lo ? lo[r] : tile_lo;
            tile_hi = hi[r] > tile_hi ? hi[r] : tile_hi;
        }
    }
    const size_t token_stride = (size_t)P->n_kv * D;
    const size_t elem = P->bf16 ? 2 : 4;
    const int chunk_blocks = chunk / bs;
    for (int64_t block = tile_lo / bs; tile_hi >= 0 && block <= tile_hi / bs; block += chunk_blocks) {
        /* A chunk of cache blocks converted to fp32 once (K transposed), then every row of the tile runs over it. */
        int64_t base = block * bs, stop = base + chunk - 1 < tile_hi ? base + chunk - 1 : tile_hi;
        for (int64_t i = block; i <= stop / bs; i++) {
            int64_t physical = P->block_tables[(size_t)b * P->table_width + (i - P->first_block[b])];
            size_t offset = ((size_t)physical * bs * P->n_kv + h) * D * elem;
            int col = (int)(i - block) * bs;
#ifdef BF16_PAIRS
            if (pairs) {
                const uint16_t *v = (const uint16_t *)((const char *)P->v_cache + offset);
                load_key_pairs((const uint16_t *)((const char *)P->k_cache + offset), token_stride, bs, D, kP, width, col);
                for (int j = 0; j < bs; j++) memcpy(v_raw + (size_t)(col + j) * D, v + (size_t)j * token_stride, sizeof(uint16_t) * D);
                continue;
            }
#endif
            load_keys_transposed((const char *)P->k_cache + offset, P->bf16, token_stride, bs, D, kT, width, col);
            load_rows((const char *)P->v_cache + offset, P->bf16, token_stride, bs, D, vb + (size_t)col * D);
        }
#ifdef BF16_PAIRS
        if (pairs) pair_values(v_raw, (int)((tile_lo > base ? tile_lo : base) - base), (int)(stop - base), D, vP);
#endif
        for (int r0 = 0; r0 < rows; r0 += MR) {
            const int nr = rows - r0 < MR ? rows - r0 : MR;
            int jlo[MR], jhi[MR], ulo = INT32_MAX, uhi = -1;
            for (int u = 0; u < nr; u++) {
                int64_t a = lo[r0 + u] > base ? lo[r0 + u] : base, z = hi[r0 + u] < stop ? hi[r0 + u] : stop;
                jlo[u] = (int)(a - base), jhi[u] = (int)(z - base);
                if (a <= z) {
                    ulo = jlo[u] < ulo ? jlo[u] : ulo;
                    uhi = jhi[u] > uhi ? jhi[u] : uhi;
                }
            }
            if (ulo > uhi) continue;
#ifdef BF16_PAIRS
            if (pairs) {
                const uint32_t *rows_qp[MR];
                for (int u = 0; u < MR; u++) rows_qp[u] = qP + (size_t)(r0 + (u < nr ? u : nr - 1)) * D2;
                score_pairs(rows_qp, kP, width, D2, ulo / 8 * 8, padded(uhi + 1), s, width);
                float c[MR];
                for (int u = 0; u < nr; u++) c[u] = row_update(s + (size_t)u * width, ulo, uhi, jlo[u], jhi[u], m + r0 + u, l + r0 + u);
                pair_weights(s, width, nr, ulo, uhi, wP, width / 2);
                float *a = acc + (size_t)r0 * D;
                switch (nr) { /* the row count a constant in each: the accumulators stay in registers */
                case MR: accumulate_pairs(a, c, wP, width / 2, vP, ulo / 2, uhi / 2, D, MR); break;
                case 3: accumulate_pairs(a, c, wP, width / 2, vP, ulo / 2, uhi / 2, D, 3); break;
                case 2: accumulate_pairs(a, c, wP, width / 2, vP, ulo / 2, uhi / 2, D, 2); break;
                default: accumulate_pairs(a, c, wP, width / 2, vP, ulo / 2, uhi / 2, D, 1); break;
                }
                continue;
            }
#endif
            const float *rows_q[MR];
            for (int u = 0; u < MR; u++) rows_q[u] = q + (size_t)(r0 + (u < nr ? u : nr - 1)) * D; /* spare lanes repeat a row */
            score_tile(rows_q, kT, width, D, ulo / 8 * 8, padded(uhi + 1), s, width);
            float c[MR];
            for (int u = 0; u < nr; u++) c[u] = row_update(s + (size_t)u * width, ulo, uhi, jlo[u], jhi[u], m + r0 + u, l + r0 + u);
            if (nr == MR) {
                accumulate_tile(acc + (size_t)r0 * D, c, s, width, vb, ulo, uhi, D);
            } else {
                for (int u = 0; u < nr; u++) accumulate(acc + (size_t)(r0 + u) * D, c[u], s + (size_t)u * width, vb, ulo, uhi, D);
            }
        }
    }
    for (int r = 0; r < rows; r++) {
        int64_t token = P->query_starts[b] + t0 + r / G;
        float *dst = P->out + ((size_t)token * P->n_kv * G + h * G + r % G) * D;
        float inv = 1.0f / l[r];
        for (int i = 0; i < D; i++) dst[i] = acc[(size_t)r * D + i] * inv;
    }
}

/* → 0, -1 for shapes outside what the kernel handles, -2 when out of memory. `threads`: the team size, passed
 * by the caller (torch's setting) because OpenMP's own default is per calling thread and the engine may run
 * on a thread that never set it. */
int paged_attention(const float *q, float *out, const void *k_cache, const void *v_cache, int bf16, int block_size,
                    int n_kv, int group, int dim, int n_seqs, const int64_t *query_starts, const int64_t *query_lens,
                    const int64_t *positions, const int64_t *block_tables, int table_width, const int64_t *first_block,
                    const int64_t *context_lens, const float *sinks, int window, float scale, int threads) {
    if (block_size <= 0 || dim <= 0 || n_kv <= 0 || group <= 0) return -1;
    Problem P = {q, out, k_cache, v_cache, bf16, block_size, n_kv, group, dim, query_starts, query_lens, positions,
                 block_tables, first_block, context_lens, table_width, sinks, window, scale};
    const int tile_tokens = group >= TILE_ROWS ? 1 : TILE_ROWS / group;
    /* Jobs in order (sequence, tile, head); tiles of one sequence are counted by a prefix sum. */
    int64_t *tile_start = malloc(sizeof(int64_t) * (n_seqs + 1));
    if (!tile_start) return -2;
    tile_start[0] = 0;
    for (int b = 0; b < n_seqs; b++) tile_start[b + 1] = tile_start[b] + (query_lens[b] + tile_tokens - 1) / tile_tokens;
    const int64_t jobs = tile_start[n_seqs] * n_kv;
    const int rows = tile_tokens * group;
    const int chunk = chunk_keys(block_size, dim);
    const size_t scratch_bytes = sizeof(float) * ((size_t)rows * (2 * dim + 2) + (size_t)padded(chunk) * (dim + MR) +
                                                  (size_t)chunk * dim) + sizeof(int64_t) * 2 * rows
                                + sizeof(uint32_t) * ((size_t)rows * ((dim + 1) / 2) + (size_t)MR * padded(chunk) / 2) /* bf16 pairs */
                                + sizeof(uint16_t) * (size_t)chunk * dim;
    int failed = 0;
    #pragma omp parallel num_threads(threads > 0 ? threads : 1)
    {
        float *scratch = calloc(1, scratch_bytes); /* zeroed: padding lanes of kT are read, never used */
        if (!scratch) {
            #pragma omp atomic write
            failed = 1;
        }
        #pragma omp for schedule(dynamic, 1)
        for (int64_t job = 0; job < jobs; job++) {
            if (!scratch) continue;
            int64_t tile = job / n_kv;
            int h = (int)(job % n_kv);
            int b = 0;
            while (tile_start[b + 1] <= tile) b++; /* few sequences per step: a linear scan is cheap */
            int64_t t0 = (tile - tile_start[b]) * tile_tokens;
            int nt = (int)(query_lens[b] - t0 < tile_tokens ? query_lens[b] - t0 : tile_tokens);
            attend_tile(&P, b, h, t0, nt, scratch);
        }
        free(scratch);
    }
    free(tile_start);
    return failed ? -2 : 0;
}
