/* 8-bit dense matrix product for the CPU: y[m, n] = sum_k x[m, k] * W[n, k] + bias[n].
 *
 * W is quantised once at load, per block of 32 weights along k: int8 values q in [-127, 127] and
 * one fp16 scale per block (times one power-of-two `wscale` per tensor, so small scales never fall
 * into fp16's subnormals). Activations are quantised the same way on the fly (int8 + fp32 scale per
 * 32), so each block's dot product is exact integer arithmetic, scaled once by both scales. Only
 * int8 weights and their scales are read: half of bf16's bytes, which is what decode waits on.
 *
 * x86 paths (chosen by the compiler's macros, one per build variant):
 *   AVX2: sign trick (|w| unsigned times x carrying w's sign) with maddubs, then madd to int32, four
 *         blocks reduced together so the scaling is vectorised too;
 *   AVX-512 BW: the same, two blocks per 512-bit register, sign applied with a mask;
 *   AVX-512 VNNI: dpbusd does the multiply and the int32 sums in one instruction;
 *   both VNNI builds (AVX-512 VNNI, and AVX-VNNI: AVX2 with dpbusd): from 8 activation rows (a prompt, a batch of
 *         decodes) a register-blocked product instead (`grouped_product`, below).
 * maddubs cannot saturate: |w|, |x| <= 127, so a pair sums to at most 2 * 127 * 127 = 32258.
 * Arm (the dotprod variant): sdot multiplies signed bytes and sums four products into each int32 lane, so a block is
 * two instructions; four blocks reduced together, as on AVX2.
 * The portable path computes the same integers in plain C.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif
#if defined(__ARM_FEATURE_DOTPROD)
#include <arm_neon.h>
#endif
#include "amx_cpu.h"
#include "mmla_cpu.h"
#include "quant_cpu.h"

#define QK 32     /* weights per block */
#define MR 4      /* activation rows per micro-kernel call */
#define MCHUNK 64 /* activation rows whose int8 copy stays in cache while every weight row passes */
#define PREFETCH 2048 /* bytes of weights fetched ahead (one core alone cannot keep enough DRAM reads in flight) */

/* IEEE half -> float (portable; the x86 builds use F16C). */
static inline float half_to_float(uint16_t h) {
#if defined(__F16C__)
    return _cvtsh_ss(h);
#else
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1F, mant = h & 0x3FF, bits;
    if (exp == 0) {
        if (mant == 0) {
            bits = sign;
        } else { /* subnormal: normalise */
            exp = 127 - 15 + 1;
            while (!(mant & 0x400)) { mant <<= 1; exp--; }
            bits = sign | (exp << 23) | ((mant & 0x3FF) << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7F800000 | (mant << 13);
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
#endif
}

/* One row of activations to int8 per block of 32: d = max|x| / 127, q = round_half_even(x / d).
 * The same arithmetic as the PyTorch reference (x * (1/d), rounded to nearest even), so the
 * quantised activations are bit-identical to it. */
static void quantize_row(const float *x, int64_t K, int8_t *q, float *d) {
    for (int64_t b = 0; b < K / QK; b++) {
        const float *xb = x + b * QK;
        float amax = 0.0f;
        for (int j = 0; j < QK; j++) amax = fmaxf(amax, fabsf(xb[j]));
        const float scale = amax / 127.0f, inv = finite_or_zero(1.0f / scale);
        d[b] = scale_or_nan(xb, scale);
#if defined(__AVX2__)
        const __m256 vinv = _mm256_set1_ps(inv);
        __m256i i0 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(xb), vinv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        __m256i i1 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(xb + 8), vinv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        __m256i i2 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(xb + 16), vinv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        __m256i i3 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(xb + 24), vinv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        /* packs interleave 128-bit lanes; the permute puts the 32 bytes back in order */
        __m256i packed = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));
        packed = _mm256_permutevar8x32_epi32(packed, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256((__m256i *)(q + b * QK), packed);
#elif defined(__ARM_FEATURE_DOTPROD)
        int32x4_t qi[8]; /* vcvtn rounds to nearest even, as nearbyintf does */
        for (int i = 0; i < 8; i++) qi[i] = vcvtnq_s32_f32(vmulq_n_f32(vld1q_f32(xb + 4 * i), inv));
        for (int h = 0; h < 2; h++) {
            const int16x8_t lo = vcombine_s16(vqmovn_s32(qi[4 * h]), vqmovn_s32(qi[4 * h + 1]));
            const int16x8_t hi = vcombine_s16(vqmovn_s32(qi[4 * h + 2]), vqmovn_s32(qi[4 * h + 3]));
            vst1q_s8(q + b * QK + 16 * h, vcombine_s8(vqmovn_s16(lo), vqmovn_s16(hi)));
        }
#else
        for (int j = 0; j < QK; j++) q[b * QK + j] = (int8_t)nearbyintf(xb[j] * inv);
#endif
    }
}

#if defined(__AVX2__)
static inline float hsum8(__m256 v) {
    __m128 lo = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
    return _mm_cvtss_f32(lo);
}

/* int32 sums of 4 products each, 8 lanes, for one 32-byte block of w (|w| given) and x. */
static inline __m256i block_dot_avx2(__m256i w, __m256i aw, __m256i x) {
    __m256i p16 = _mm256_maddubs_epi16(aw, _mm256_sign_epi8(x, w));
    return _mm256_madd_epi16(p16, _mm256_set1_epi16(1));
}
#endif

/* Dots of one weight row (nb blocks) with `rows` (<= MR) activation rows; out[r] gets the sum.
 * Inlined with a constant `rows` so each case gets its own unrolled code. */
static inline __attribute__((always_inline)) void dot_row(const int8_t *w, const uint16_t *wd, int64_t nb,
                                                          const int8_t *xq, const float *xd, int64_t K, int rows,
                                                          float *out) {
    int64_t b = 0;
#if defined(__AVX512BW__)
    __m512 acc512[MR];
    for (int r = 0; r < rows; r++) acc512[r] = _mm512_setzero_ps();
    for (; b + 2 <= nb; b += 2) {
        __m512i wv = _mm512_loadu_si512((const void *)(w + b * QK));
        __m512i aw = _mm512_abs_epi8(wv);
        __mmask64 neg = _mm512_movepi8_mask(wv);
        __m512 dw = _mm512_insertf32x8(_mm512_set1_ps(half_to_float(wd[b])), _mm256_set1_ps(half_to_float(wd[b + 1])), 1);
        for (int r = 0; r < rows; r++) {
            __m512i xv = _mm512_loadu_si512((const void *)(xq + r * K + b * QK));
            __m512i sx = _mm512_mask_sub_epi8(xv, neg, _mm512_setzero_si512(), xv);
#if defined(__AVX512VNNI__)
            __m512i p32 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), aw, sx);
#else
            __m512i p32 = _mm512_madd_epi16(_mm512_maddubs_epi16(aw, sx), _mm512_set1_epi16(1));
#endif
            const float *xs = xd + r * (K / QK) + b;
            __m512 dx = _mm512_insertf32x8(_mm512_set1_ps(xs[0]), _mm256_set1_ps(xs[1]), 1);
            acc512[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p32), _mm512_mul_ps(dw, dx), acc512[r]);
        }
    }
    float tail[MR] = {0};
    for (; b < nb; b++) { /* an odd last block: the AVX2 step */
        __m256i wv = _mm256_loadu_si256((const __m256i *)(w + b * QK));
        __m256i aw = _mm256_sign_epi8(wv, wv);
        float dw = half_to_float(wd[b]);
        for (int r = 0; r < rows; r++) {
            __m256i p32 = block_dot_avx2(wv, aw, _mm256_loadu_si256((const __m256i *)(xq + r * K + b * QK)));
            tail[r] += hsum8(_mm256_cvtepi32_ps(p32)) * dw * xd[r * (K / QK) + b];
        }
    }
    for (int r = 0; r < rows; r++) out[r] = _mm512_reduce_add_ps(acc512[r]) + tail[r];
#elif defined(__AVX2__)
    /* Four blocks a step: their int32 sums reduced by horizontal adds to one lane per block (the two
     * 128-bit halves hold halves of the same four sums), so the int→float conversion, both scales and
     * the accumulation are one vector operation per four blocks and rows, not one per block. */
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 acc[MR];
    for (int r = 0; r < rows; r++) acc[r] = _mm256_setzero_ps();
    for (; b + 4 <= nb; b += 4) {
        _mm_prefetch((const char *)(w + b * QK + PREFETCH), _MM_HINT_T0);
        _mm_prefetch((const char *)(w + b * QK + PREFETCH + 64), _MM_HINT_T0);
        __m256i wv[4], aw[4];
        for (int i = 0; i < 4; i++) {
            wv[i] = _mm256_loadu_si256((const __m256i *)(w + (b + i) * QK));
            aw[i] = _mm256_sign_epi8(wv[i], wv[i]);
        }
        const __m128 dw = _mm_cvtph_ps(_mm_loadl_epi64((const __m128i *)(wd + b)));
        for (int r = 0; r < rows; r++) {
            const int8_t *xb = xq + r * K + b * QK;
            __m256i p[4];
            for (int i = 0; i < 4; i++)
                p[i] = _mm256_madd_epi16(_mm256_maddubs_epi16(aw[i], _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)(xb + i * QK)), wv[i])), ones);
            const __m256i sums = _mm256_hadd_epi32(_mm256_hadd_epi32(p[0], p[1]), _mm256_hadd_epi32(p[2], p[3]));
            const __m128 scale = _mm_mul_ps(dw, _mm_loadu_ps(xd + r * (K / QK) + b));
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), _mm256_set_m128(scale, scale), acc[r]);
        }
    }
    float tail[MR] = {0};
    for (; b < nb; b++) {
        __m256i wv = _mm256_loadu_si256((const __m256i *)(w + b * QK));
        __m256i aw = _mm256_sign_epi8(wv, wv);
        float dw = half_to_float(wd[b]);
        for (int r = 0; r < rows; r++) {
            __m256i p32 = block_dot_avx2(wv, aw, _mm256_loadu_si256((const __m256i *)(xq + r * K + b * QK)));
            tail[r] += hsum8(_mm256_cvtepi32_ps(p32)) * (dw * xd[r * (K / QK) + b]);
        }
    }
    for (int r = 0; r < rows; r++) out[r] = hsum8(acc[r]) + tail[r];
#elif defined(__ARM_FEATURE_DOTPROD)
    /* Four blocks a step: each block's two 16-byte halves by sdot into 4 int32 lanes, the four blocks' lanes summed
     * pairwise to one lane a block, so the int→float conversion, both scales and the accumulation are one vector
     * operation per four blocks and rows. */
    float32x4_t acc[MR];
    for (int r = 0; r < rows; r++) acc[r] = vdupq_n_f32(0.0f);
    for (; b + 4 <= nb; b += 4) {
        int8x16_t wv[8];
        for (int i = 0; i < 8; i++) wv[i] = vld1q_s8(w + b * QK + 16 * i);
        const float32x4_t dw = vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(wd + b)));
        for (int r = 0; r < rows; r++) {
            const int8_t *xb = xq + r * K + b * QK;
            int32x4_t p[4];
            for (int i = 0; i < 4; i++)
                p[i] = vdotq_s32(vdotq_s32(vdupq_n_s32(0), wv[2 * i], vld1q_s8(xb + QK * i)), wv[2 * i + 1], vld1q_s8(xb + QK * i + 16));
            const int32x4_t sums = vpaddq_s32(vpaddq_s32(p[0], p[1]), vpaddq_s32(p[2], p[3])); /* block b+i in lane i */
            acc[r] = vfmaq_f32(acc[r], vcvtq_f32_s32(sums), vmulq_f32(dw, vld1q_f32(xd + r * (K / QK) + b)));
        }
    }
    float tail[MR] = {0};
    for (; b < nb; b++) {
        const int8x16_t w0 = vld1q_s8(w + b * QK), w1 = vld1q_s8(w + b * QK + 16);
        const float dw = half_to_float(wd[b]);
        for (int r = 0; r < rows; r++) {
            const int8_t *xb = xq + r * K + b * QK;
            const int32x4_t p = vdotq_s32(vdotq_s32(vdupq_n_s32(0), w0, vld1q_s8(xb)), w1, vld1q_s8(xb + 16));
            tail[r] += (float)vaddvq_s32(p) * (dw * xd[r * (K / QK) + b]);
        }
    }
    for (int r = 0; r < rows; r++) out[r] = vaddvq_f32(acc[r]) + tail[r];
#else
    float acc[MR] = {0};
    for (; b < nb; b++) {
        const int8_t *wb = w + b * QK;
        float dw = half_to_float(wd[b]);
        for (int r = 0; r < rows; r++) {
            const int8_t *xb = xq + r * K + b * QK;
            int32_t s = 0;
            for (int j = 0; j < QK; j++) s += (int32_t)wb[j] * (int32_t)xb[j];
            acc[r] += (float)s * (dw * xd[r * (K / QK) + b]);
        }
    }
    for (int r = 0; r < rows; r++) out[r] = acc[r];
#endif
}

static void dot_rows(const int8_t *w, const uint16_t *wd, int64_t nb, const int8_t *xq, const float *xd, int64_t K,
                     int rows, float *out) {
    switch (rows) {
    case 4: dot_row(w, wd, nb, xq, xd, K, 4, out); break;
    case 3: dot_row(w, wd, nb, xq, xd, K, 3, out); break;
    case 2: dot_row(w, wd, nb, xq, xd, K, 2, out); break;
    default: dot_row(w, wd, nb, xq, xd, K, 1, out); break;
    }
}

/* Per-thread scratch for the quantised activations, grown on demand and kept: nothing is
 * allocated per call once the largest batch has been seen. */
static __thread int8_t *scratch_q;
static __thread float *scratch_d;
static __thread int64_t scratch_rows_k;

static int ensure_scratch(int64_t elements) {
    if (elements <= scratch_rows_k) return 0;
    int8_t *q = realloc(scratch_q, (size_t)elements);
    if (!q) return -1;
    scratch_q = q;
    float *d = realloc(scratch_d, (size_t)(elements / QK) * sizeof(float));
    if (!d) return -1;
    scratch_d = d;
    scratch_rows_k = elements;
    return 0;
}

/* Activations x [M, K] fp32 to int8 q [M, K] and scales d [M, K/32] (exported for the tests). */
int q8_quantize_rows(const float *x, int64_t M, int64_t K, int8_t *q, float *d, int nthreads) {
    if (K % QK) return -1;
    #pragma omp parallel for schedule(static) num_threads(nthreads) if (M > 1)
    for (int64_t m = 0; m < M; m++) quantize_row(x + m * K, K, q + m * K, d + m * (K / QK));
    return 0;
}

#if defined(__AVX512VNNI__) || defined(__AVXVNNI__)
/* ---------------------------------------------------------------- many rows with dpbusd: a register-blocked product
 *
 * The per-row kernel above reduces every weight row against each activation row horizontally, which suits decode
 * (each weight byte read once from memory) but leaves a prompt's product far below what dpbusd can do. With many
 * activation rows, GROUP weight rows are rearranged once into a register's lanes (lane r: row r's four bytes of a
 * block position, + 128 so they are dpbusd's unsigned operand; the 128·Σq it adds is taken back per block), and
 * every activation row passes over them PASS at a time: each broadcast dword of activations meets 4·GROUP weights
 * in one instruction, and a block's eight weight vectors stay in registers for the pass. One code for both widths:
 * AVX-512 VNNI (16 lanes) and AVX-VNNI (8 lanes: Alder Lake and later desktops, which have no AVX-512). */
#if defined(__AVX512VNNI__)
#define GROUP 16
typedef __m512i VecI;
typedef __m512 VecF;
#define VI_LOAD(p) _mm512_loadu_si512((const void *)(p))
#define VI_STORE(p, v) _mm512_storeu_si512((void *)(p), (v))
#define VI_SET1 _mm512_set1_epi32
#define VI_ZERO _mm512_setzero_si512
#define VI_ADD _mm512_add_epi32
#define VI_XOR _mm512_xor_si512
#define VI_DPBUSD _mm512_dpbusd_epi32
#define VF_LOAD _mm512_loadu_ps
#define VF_STORE _mm512_storeu_ps
#define VF_SET1 _mm512_set1_ps
#define VF_ZERO _mm512_setzero_ps
#define VF_FMADD _mm512_fmadd_ps
#define VF_MUL _mm512_mul_ps
#define VF_CVT _mm512_cvtepi32_ps
#else
#define GROUP 8
typedef __m256i VecI;
typedef __m256 VecF;
#define VI_LOAD(p) _mm256_loadu_si256((const __m256i *)(p))
#define VI_STORE(p, v) _mm256_storeu_si256((__m256i *)(p), (v))
#define VI_SET1 _mm256_set1_epi32
#define VI_ZERO _mm256_setzero_si256
#define VI_ADD _mm256_add_epi32
#define VI_XOR _mm256_xor_si256
#define VI_DPBUSD _mm256_dpbusd_avx_epi32
#define VF_LOAD _mm256_loadu_ps
#define VF_STORE _mm256_storeu_ps
#define VF_SET1 _mm256_set1_ps
#define VF_ZERO _mm256_setzero_ps
#define VF_FMADD _mm256_fmadd_ps
#define VF_MUL _mm256_mul_ps
#define VF_CVT _mm256_cvtepi32_ps
#endif
#define PASS 4 /* activation rows a pass; with AVX-VNNI's 16 registers too (measured on qkv at 512 rows: 37 ms at 4, 39
                  * at 3, 48 at 2) */
#define GROUP_BYTES (8 * 4 * GROUP) /* one block of a prepared group: eight vectors of GROUP dwords */
#define GROUPED_MIN_ROWS 8 /* below this many activation rows the per-row kernel (weights read once) stays */

/* Rows 0..GROUP-1 of w (row length K) as w_g + GROUP_BYTES*b + 4*GROUP*g: lane r holds row r's bytes
 * 32b+4g..32b+4g+3, plus 128. A dword transpose of each block's rows in registers (unpacks within 128-bit lanes,
 * then 128-bit lanes put in place), not a gather per vector: AMD's gathers (Zen 4) are slow enough that preparing
 * the group cost more than the products it serves (qkv at 8-16 rows: 2.3-2.5 ms against 0.5-0.7 without them). */
static void prepare_group(const int8_t *w, int64_t K, uint8_t *w_g) {
    const VecI flip = VI_SET1((int)0x80808080u);
    for (int64_t b = 0; b < K / QK; b++) {
        VecI r[8], t[8], u[8];
#if defined(__AVX512VNNI__)
        /* r[i]: rows a and a + 4 (a = i for i < 4, i + 4 after), so that after the unpacks, u[g] holds d_g of rows 0-3,
         * d_g+4 of rows 0-3, d_g of rows 4-7, d_g+4 of rows 4-7 (its four 128-bit lanes), and u[g+4] the same for
         * rows 8-15: one lane shuffle of the two gives each output vector. */
        for (int i = 0; i < 8; i++) {
            const int64_t a = i < 4 ? i : i + 4;
            r[i] = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)(w + a * K + b * QK))),
                                      _mm256_loadu_si256((const __m256i *)(w + (a + 4) * K + b * QK)), 1);
        }
#define UNPACK_LO32 _mm512_unpacklo_epi32
#define UNPACK_HI32 _mm512_unpackhi_epi32
#define UNPACK_LO64 _mm512_unpacklo_epi64
#define UNPACK_HI64 _mm512_unpackhi_epi64
#define LANES_LO(x, y) _mm512_shuffle_i32x4((x), (y), _MM_SHUFFLE(2, 0, 2, 0))
#define LANES_HI(x, y) _mm512_shuffle_i32x4((x), (y), _MM_SHUFFLE(3, 1, 3, 1))
#else
        /* r[i]: row i; u[g] holds d_g of rows 0-3 and d_g+4 of rows 0-3 (its two 128-bit lanes), u[g+4] rows 4-7. */
        for (int i = 0; i < 8; i++) r[i] = _mm256_loadu_si256((const __m256i *)(w + i * K + b * QK));
#define UNPACK_LO32 _mm256_unpacklo_epi32
#define UNPACK_HI32 _mm256_unpackhi_epi32
#define UNPACK_LO64 _mm256_unpacklo_epi64
#define UNPACK_HI64 _mm256_unpackhi_epi64
#define LANES_LO(x, y) _mm256_permute2x128_si256((x), (y), 0x20)
#define LANES_HI(x, y) _mm256_permute2x128_si256((x), (y), 0x31)
#endif
        for (int h = 0; h < 8; h += 4) { /* rows of r[h..h+3]: a 4 x 4 dword transpose in every 128-bit lane */
            t[h] = UNPACK_LO32(r[h], r[h + 1]), t[h + 1] = UNPACK_HI32(r[h], r[h + 1]);
            t[h + 2] = UNPACK_LO32(r[h + 2], r[h + 3]), t[h + 3] = UNPACK_HI32(r[h + 2], r[h + 3]);
            u[h] = UNPACK_LO64(t[h], t[h + 2]), u[h + 1] = UNPACK_HI64(t[h], t[h + 2]);
            u[h + 2] = UNPACK_LO64(t[h + 1], t[h + 3]), u[h + 3] = UNPACK_HI64(t[h + 1], t[h + 3]);
        }
        for (int g = 0; g < 4; g++) {
            VI_STORE(w_g + GROUP_BYTES * b + 4 * GROUP * g, VI_XOR(LANES_LO(u[g], u[g + 4]), flip));
            VI_STORE(w_g + GROUP_BYTES * b + 4 * GROUP * (g + 4), VI_XOR(LANES_HI(u[g], u[g + 4]), flip));
        }
#undef UNPACK_LO32
#undef UNPACK_HI32
#undef UNPACK_LO64
#undef UNPACK_HI64
#undef LANES_LO
#undef LANES_HI
    }
}

static inline __attribute__((always_inline)) VecI bcast4(const int8_t *q) {
    int32_t v;
    memcpy(&v, q, 4);
    return VI_SET1(v);
}

/* The GROUP prepared rows (scales pw [nb, GROUP] as floats) against activation rows 0..n-1 of xq (n ≤ PASS, a
 * constant once inlined; corr [., nb] = 128·Σq per block): y[t*N + r] = dot · wscale + bias[r]. Two dpbusd chains a
 * row (a block's first and second 16 bytes) hide the instruction's latency. */
static inline __attribute__((always_inline)) void group_pass(const uint8_t *w_g, const float *pw, int64_t nb, const int8_t *xq,
                                                             const float *xd, const int32_t *corr, int64_t K, const int n,
                                                             float wscale, const float *bias, float *y, int64_t N) {
    VecF acc[PASS];
    for (int t = 0; t < n; t++) acc[t] = VF_ZERO();
    for (int64_t b = 0; b < nb; b++) {
        VecI W[8];
        for (int g = 0; g < 8; g++) W[g] = VI_LOAD(w_g + GROUP_BYTES * b + 4 * GROUP * g);
        const VecF scale = VF_LOAD(pw + GROUP * b);
        for (int t = 0; t < n; t++) {
            const int8_t *q = xq + t * K + b * QK;
            VecI lo = VI_SET1(-corr[t * nb + b]), hi = VI_ZERO();
            for (int g = 0; g < 4; g++) {
                lo = VI_DPBUSD(lo, W[g], bcast4(q + 4 * g));
                hi = VI_DPBUSD(hi, W[4 + g], bcast4(q + 16 + 4 * g));
            }
            acc[t] = VF_FMADD(VF_CVT(VI_ADD(lo, hi)), VF_MUL(scale, VF_SET1(xd[t * nb + b])), acc[t]);
        }
    }
    const VecF vbias = bias ? VF_LOAD(bias) : VF_ZERO(), vscale = VF_SET1(wscale);
    for (int t = 0; t < n; t++) VF_STORE(y + t * N, VF_FMADD(acc[t], vscale, vbias));
}

/* Weight rows 0 .. N - N%GROUP - 1 in groups, split across threads, each group against every activation row. */
static int grouped_product(const int8_t *xq, const float *xd, int64_t M, int64_t K, const int8_t *wq, const uint16_t *wd,
                           float wscale, int64_t N, const float *bias, float *y, int nthreads) {
    const int64_t nb = K / QK, groups = N / GROUP;
    int32_t *corr = malloc((size_t)(M * nb) * sizeof(int32_t));
    if (!corr) return -2;
    int failed = 0;
    #pragma omp parallel num_threads(nthreads)
    {
        #pragma omp for schedule(static)
        for (int64_t i = 0; i < M * nb; i++) {
            int32_t sum = 0;
            for (int j = 0; j < QK; j++) sum += xq[i * QK + j];
            corr[i] = 128 * sum;
        }
        uint8_t *w_g = malloc((size_t)(GROUP_BYTES * nb));
        float *pw = malloc((size_t)(GROUP * nb) * sizeof(float));
        if (!w_g || !pw) {
            #pragma omp atomic write
            failed = 1;
        }
        #pragma omp for schedule(dynamic, 1)
        for (int64_t grp = 0; grp < groups; grp++) {
            if (!w_g || !pw) continue;
            const int64_t n0 = grp * GROUP;
            prepare_group(wq + n0 * K, K, w_g);
            for (int64_t b = 0; b < nb; b++)
                for (int r = 0; r < GROUP; r++) pw[b * GROUP + r] = half_to_float(wd[(n0 + r) * nb + b]);
            const float *gbias = bias ? bias + n0 : NULL;
            int64_t m = 0;
            for (; m + PASS <= M; m += PASS)
                group_pass(w_g, pw, nb, xq + m * K, xd + m * nb, corr + m * nb, K, PASS, wscale, gbias, y + m * N + n0, N);
            switch (M - m) { /* the last rows, fewer than PASS */
            case 3: group_pass(w_g, pw, nb, xq + m * K, xd + m * nb, corr + m * nb, K, 3, wscale, gbias, y + m * N + n0, N); break;
            case 2: group_pass(w_g, pw, nb, xq + m * K, xd + m * nb, corr + m * nb, K, 2, wscale, gbias, y + m * N + n0, N); break;
            case 1: group_pass(w_g, pw, nb, xq + m * K, xd + m * nb, corr + m * nb, K, 1, wscale, gbias, y + m * N + n0, N); break;
            default: break;
            }
        }
        free(w_g);
        free(pw);
    }
    free(corr);
    return failed ? -2 : 0;
}
#endif

#if defined(OSSRUN_AMX)
/* ---------------------------------------------------------------- many rows with AMX: 16 x 16 tiles, one block a product
 *
 * Where the CPU has AMX (Sapphire Rapids and later), one tile instruction multiplies 16 weight rows by 16 activation
 * rows over a block's 32 k (8,192 products) in a few cycles, so the product waits on the per-block scaling instead:
 * the 16 x 16 int32 sums go to memory and come back as 16 vectors, each converted and scaled by its weight row's
 * scale times the 16 activation rows' scales. The weights are the tile's first operand straight from memory (16
 * rows of 32 bytes); the activations are rearranged once into the second operand's layout (4 bytes of each of 16
 * rows a 64-byte row). Both signed: no offset to take back. */
#define TILE_ROWS 16
#define TILED_MIN_ROWS 16 /* fewer activation rows: the grouped VNNI product */

/* xv + (a*nb + b)*512 + 64*g + 4*j = bytes 32b+4g .. 32b+4g+3 of activation row 16a+j, dv + (a*nb + b)*16 + j = its
 * scale; rows past M are zeros (their products are computed and never stored). */
static void tile_activations(const int8_t *xq, const float *xd, int64_t M, int64_t K, int8_t *xv, float *dv, int nthreads) {
    const int64_t nb = K / QK, groups = (M + TILE_ROWS - 1) / TILE_ROWS;
    #pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t a = 0; a < groups; a++)
        for (int64_t b = 0; b < nb; b++) {
            int8_t *tile = xv + (a * nb + b) * 512;
            float *scales = dv + (a * nb + b) * TILE_ROWS;
            for (int j = 0; j < TILE_ROWS; j++) {
                const int64_t m = a * TILE_ROWS + j;
                scales[j] = m < M ? xd[m * nb + b] : 0.0f;
                for (int g = 0; g < 8; g++) {
                    if (m < M) memcpy(tile + 64 * g + 4 * j, xq + m * K + b * QK + 4 * g, 4);
                    else memset(tile + 64 * g + 4 * j, 0, 4);
                }
            }
        }
}

AMX_BEGIN
/* Weight rows 0 .. N - N%16 - 1 by tiles of 16 x 16, split across threads by weight group (each group's 16 rows
 * stay in cache while every activation group passes). */
static int tiled_product(const int8_t *xq, const float *xd, int64_t M, int64_t K, const int8_t *wq, const uint16_t *wd,
                         float wscale, int64_t N, const float *bias, float *y, int nthreads) {
    const int64_t nb = K / QK, groups = N / TILE_ROWS, act_groups = (M + TILE_ROWS - 1) / TILE_ROWS;
    int8_t *xv = aligned_alloc(64, (size_t)(act_groups * nb * 512));
    float *dv = aligned_alloc(64, (size_t)(act_groups * nb * TILE_ROWS) * sizeof(float));
    if (!xv || !dv) {
        free(xv);
        free(dv);
        return -2;
    }
    tile_activations(xq, xd, M, K, xv, dv, nthreads);
    int failed = 0;
    #pragma omp parallel num_threads(nthreads)
    {
        amx_thread_begin();
        float *pw = malloc((size_t)(TILE_ROWS * nb) * sizeof(float));
        float out[TILE_ROWS * TILE_ROWS] __attribute__((aligned(64)));
        if (!pw) {
            #pragma omp atomic write
            failed = 1;
        }
        #pragma omp for schedule(dynamic, 1)
        for (int64_t grp = 0; grp < groups; grp++) {
            if (!pw) continue;
            const int64_t n0 = grp * TILE_ROWS;
            for (int64_t b = 0; b < nb; b++)
                for (int r = 0; r < TILE_ROWS; r++) pw[b * TILE_ROWS + r] = half_to_float(wd[(n0 + r) * nb + b]);
            for (int64_t a = 0; a < act_groups; a++) {
                __m512 acc[TILE_ROWS];
                amx_dot_blocks(wq + n0 * K, QK, K, xv + a * nb * 512, dv + a * nb * TILE_ROWS, pw, nb, acc);
                for (int r = 0; r < TILE_ROWS; r++) _mm512_store_ps(out + TILE_ROWS * r, acc[r]);
                for (int j = 0; j < TILE_ROWS && a * TILE_ROWS + j < M; j++) {
                    float *row = y + (a * TILE_ROWS + j) * N + n0;
                    for (int r = 0; r < TILE_ROWS; r++) row[r] = out[TILE_ROWS * r + j] * wscale + (bias ? bias[n0 + r] : 0.0f);
                }
            }
        }
        free(pw);
        amx_thread_end();
    }
    free(xv);
    free(dv);
    return failed ? -2 : 0;
}
AMX_END
#endif

#if defined(__ARM_FEATURE_MATMUL_INT8)
#define MM_MIN_ROWS 6 /* activation rows from which the product takes smmla (mmla_cpu.h): below, laying out each group of
                       * weight rows costs more than it saves (bench/arm_kernels.py's count, instructions a row-block:
                       * 10.9 vs 9.5 at 4 rows, 9.2 vs 9.9 at 6, 8.0 vs 9.5 at 8, 6.5 vs 9.4 at 16) */

/* Weight rows 0 .. N - N%4 - 1 by smmla, 2 x 2 tiles of (weight pair, activation pair) held 2 x 2 in registers: the
 * activation pairs laid out once (an odd last row paired with itself, its twin's sums not stored), each group of 4
 * weight rows laid out by the thread that takes it, for every chunk of MCHUNK activation rows (which stay in cache). */
static int mm_product(const int8_t *xq, const float *xd, int64_t M, int64_t K, const int8_t *wq, const uint16_t *wd,
                      float wscale, int64_t N, const float *bias, float *y, int nthreads) {
    const int64_t nb = K / QK, pairs = (M + 1) / 2;
    int8_t *xm = malloc((size_t)(pairs * nb * 64));
    float *dxm = malloc((size_t)(pairs * nb * 4) * sizeof(float));
    if (!xm || !dxm) {
        free(xm);
        free(dxm);
        return -2;
    }
    for (int64_t p = 0; p < pairs; p++) {
        const int64_t m0 = 2 * p, m1 = 2 * p + 1 < M ? 2 * p + 1 : 2 * p;
        for (int64_t b = 0; b < nb; b++) {
            const int8_t *x0 = xq + m0 * K + b * QK, *x1 = xq + m1 * K + b * QK;
            mm_interleave(vld1q_s8(x0), vld1q_s8(x0 + 16), vld1q_s8(x1), vld1q_s8(x1 + 16), xm + (p * nb + b) * 64);
            float *d = dxm + (p * nb + b) * 4; /* the tile's lanes: (w0,x0) (w0,x1) (w1,x0) (w1,x1) */
            d[0] = d[2] = xd[m0 * nb + b], d[1] = d[3] = xd[m1 * nb + b];
        }
    }
    const int64_t groups = N / 4, chunk_pairs = MCHUNK / 2;
    int failed = 0;
    #pragma omp parallel num_threads(nthreads)
    {
        int8_t *w = malloc((size_t)(2 * nb * 64));
        float *dw = malloc((size_t)(2 * nb * 4) * sizeof(float));
        if (!w || !dw) {
            #pragma omp atomic write
            failed = 1;
        }
        for (int64_t p0 = 0; p0 < pairs; p0 += chunk_pairs) {
            const int64_t p1 = p0 + chunk_pairs < pairs ? p0 + chunk_pairs : pairs;
            #pragma omp for schedule(dynamic, 4)
            for (int64_t g = 0; g < groups; g++) {
                if (!w || !dw) continue;
                for (int wp = 0; wp < 2; wp++) {
                    const int64_t n0 = 4 * g + 2 * wp;
                    for (int64_t b = 0; b < nb; b++) {
                        const int8_t *w0 = wq + n0 * K + b * QK, *w1 = w0 + K;
                        mm_interleave(vld1q_s8(w0), vld1q_s8(w0 + 16), vld1q_s8(w1), vld1q_s8(w1 + 16), w + (wp * nb + b) * 64);
                        float *d = dw + (wp * nb + b) * 4;
                        d[0] = d[1] = half_to_float(wd[n0 * nb + b]), d[2] = d[3] = half_to_float(wd[(n0 + 1) * nb + b]);
                    }
                }
                for (int64_t p = p0; p < p1; p += 2) {
                    const int both = p + 1 < p1;
                    float32x4_t acc[2][2] = {{vdupq_n_f32(0.0f), vdupq_n_f32(0.0f)}, {vdupq_n_f32(0.0f), vdupq_n_f32(0.0f)}};
                    for (int64_t b = 0; b < nb; b++)
                        for (int ap = 0; ap < 1 + both; ap++) {
                            const int8_t *x = xm + ((p + ap) * nb + b) * 64;
                            const float32x4_t dx = vld1q_f32(dxm + ((p + ap) * nb + b) * 4);
                            for (int wp = 0; wp < 2; wp++)
                                acc[wp][ap] = vfmaq_f32(acc[wp][ap], vcvtq_f32_s32(mm_block(w + (wp * nb + b) * 64, x)),
                                                        vmulq_f32(vld1q_f32(dw + (wp * nb + b) * 4), dx));
                        }
                    for (int ap = 0; ap < 1 + both; ap++)
                        for (int wp = 0; wp < 2; wp++) {
                            float lanes[4];
                            vst1q_f32(lanes, acc[wp][ap]);
                            const int64_t m = 2 * (p + ap), n = 4 * g + 2 * wp;
                            const float b0 = bias ? bias[n] : 0.0f, b1 = bias ? bias[n + 1] : 0.0f;
                            y[m * N + n] = lanes[0] * wscale + b0, y[m * N + n + 1] = lanes[2] * wscale + b1;
                            if (m + 1 < M) y[(m + 1) * N + n] = lanes[1] * wscale + b0, y[(m + 1) * N + n + 1] = lanes[3] * wscale + b1;
                        }
                }
            }
        }
        free(w);
        free(dw);
    }
    free(xm);
    free(dxm);
    return failed ? -2 : 0;
}
#endif

/* 1 when products of many rows take the AMX tiles now (see amx_cpu.h), else 0. */
int q8_amx_active(void) {
#if defined(OSSRUN_AMX)
    return amx_on();
#else
    return 0;
#endif
}

/* y [M, N] fp32 = x [M, K] fp32 times W^T (wq [N, K] int8, wd [N, K/32] fp16 bits, times wscale)
 * plus bias [N] (or NULL). Output rows are split across threads; every thread sees all of x. */
int q8_linear(const float *x, int64_t M, int64_t K, const int8_t *wq, const uint16_t *wd, float wscale, int64_t N,
              const float *bias, float *y, int nthreads) {
    if (K % QK || M < 0 || N < 0) return -1;
    if (ensure_scratch(M * K)) return -2;
    int8_t *xq = scratch_q;
    float *xd = scratch_d;
    int64_t nb = K / QK, n_begin = 0;
    q8_quantize_rows(x, M, K, xq, xd, nthreads);
#if defined(__ARM_FEATURE_MATMUL_INT8)
    if (M >= MM_MIN_ROWS && N >= 4) {
        const int status = mm_product(xq, xd, M, K, wq, wd, wscale, N, bias, y, nthreads);
        if (status) return status;
        n_begin = N - N % 4; /* the last < 4 weight rows: the per-row kernel */
    }
#endif
#if defined(GROUP)
    if (M >= GROUPED_MIN_ROWS && N >= GROUP) {
#if defined(OSSRUN_AMX)
        const int status = M >= TILED_MIN_ROWS && amx_on() ? tiled_product(xq, xd, M, K, wq, wd, wscale, N, bias, y, nthreads)
                                                            : grouped_product(xq, xd, M, K, wq, wd, wscale, N, bias, y, nthreads);
#else
        const int status = grouped_product(xq, xd, M, K, wq, wd, wscale, N, bias, y, nthreads);
#endif
        if (status) return status;
        n_begin = N - N % GROUP; /* the last < GROUP weight rows: the per-row kernel */
    }
#endif
    #pragma omp parallel num_threads(nthreads)
    for (int64_t m0 = 0; m0 < M; m0 += MCHUNK) {
        int64_t m1 = m0 + MCHUNK < M ? m0 + MCHUNK : M;
        #pragma omp for schedule(dynamic, 64) /* 64 weight rows a grab: a core slowed by a neighbour no longer holds the other at the barrier */
        for (int64_t n = n_begin; n < N; n++) {
            const int8_t *w = wq + n * K;
            const uint16_t *d = wd + n * nb;
            float b = bias ? bias[n] : 0.0f, out[MR];
            for (int64_t m = m0; m < m1; m += MR) {
                int rows = (int)(m1 - m < MR ? m1 - m : MR);
                dot_rows(w, d, nb, xq + m * K, xd + m * nb, K, rows, out);
                for (int r = 0; r < rows; r++) y[(m + r) * N + n] = out[r] * wscale + b;
            }
        }
    }
    return 0;
}
