/* MXFP4 experts times 8-bit activations on the CPU: the MoE of the "fast" precision.
 *
 * Activations are quantised per 32-value block to int8 with one fp32 scale d = amax/127 (like
 * llama.cpp's Q8_0). The packed weights are never expanded to float: a block's 16 bytes of E2M1
 * nibbles become 32 int8 by one byte shuffle (E2M1 x 2 = the integers 0,1,2,3,4,6,8,12 with a
 * sign), the block's dot product is exact integer arithmetic, and one float multiply-add per block
 * applies both scales: x scale * 2^(e-128) (the E8M0 exponent, bias 127, times the 1/2 that the
 * doubled E2M1 integers carry). So the packed weights (17 bytes per 32) are the only big bytes read.
 *
 * Element order: byte j of a block holds element 2j in its low nibble and 2j+1 in its high one.
 * Instead of interleaving the decoded nibbles, the activations are stored in a "pair layout" (see
 * below): two blocks' even elements, then their odd ones, so one 32-byte load of two packed blocks
 * decodes by two shuffles straight into the lanes of the activations it meets. The permutation is
 * done once per row, at quantisation, and costs nothing per weight.
 *
 * Code paths: AVX2 (decoded weights + 12 as maddubs' unsigned operand, the +12 taken back per block
 * from Σq; a one-row kernel for decode that reduces eight blocks at a time, and a row-group kernel
 * for prefill that puts eight weight rows in the lanes), AVX-512 VNNI (dpbusd; decode decodes four blocks a 512-bit
 * load into the lanes of the activations laid out to meet them, prefill puts sixteen
 * weight rows in a 512-bit register's lanes and passes four activation rows over each block's weights
 * while they sit in registers), AMX tiles for a prompt's layer where the CPU has them (moe_layer_tiled), Arm's
 * dot products (sdot is signed times signed: the nibbles decode by one table lookup straight to E2M1 x 2, no
 * offset; up to four activation rows meet each decoded block), and portable C. Parallel work items are (expert group,
 * output tile), so a step with a few rows per expert still keeps every core busy.
 */
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <math.h>
#include <stdlib.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif
#if defined(__ARM_FEATURE_DOTPROD)
#include <arm_neon.h>
#endif
#include "amx_cpu.h"
#include "mmla_cpu.h"
#include "quant_cpu.h"
#include "vec_math.h"

#define QK 32      /* values per block, for the weights and the activations alike */
#define TILE_O 64  /* output rows per work item of a plain projection */
#define TILE_1 64  /* mlp1 rows per work item: 64 interleaved glu/linear rows = 32 SwiGLU outputs = one block */
#define PREFETCH 2048 /* bytes of packed weights fetched ahead by the one-row kernel (DRAM latency at one core) */

static const int8_t E2M1_X2[16] = {0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12};
/* E2M1 x 2 + 12: unsigned, so it can be the unsigned operand of maddubs/dpbusd; the +12 is taken back
 * once per block as 12 * (sum of the block's activations). */
static const uint8_t E2M1_X2_PLUS12[16] = {12, 13, 14, 15, 16, 18, 20, 24, 12, 11, 10, 9, 8, 6, 4, 0};
static float POW2[256]; /* POW2[s] = 2^(s-128) */

__attribute__((constructor)) static void init_pow2(void) {
    for (int s = 0; s < 256; s++) POW2[s] = ldexpf(1.0f, s - 128);
}

/* One activation row as the kernels see it: K int8 in the pair layout (below), K/32 scales and K/32
 * block sums Σq (the kernels take their +12 weight offset back as 12·Σq). */
typedef struct {
    const int8_t *q;
    const float *d;
    const int32_t *s;
} Row;

/* ---------------------------------------------------------------- the pair layout of quantised activations
 *
 * A packed block holds element 2j in the low nibble of byte j and 2j+1 in the high one. Two blocks
 * side by side are 32 bytes: one 256-bit load whose low nibbles are both blocks' even elements and
 * whose high nibbles are their odd ones. The activations of blocks b, b+1 (b even) are stored to meet
 * them: [b evens | b+1 evens | b odds | b+1 odds], 16 bytes each. A last block without a partner (K/32
 * odd) is [evens | odds]. So the kernels decode two blocks with one load and two shuffles, and the
 * permutation costs nothing per weight: it is done once per activation row, at quantisation. */

/* Offsets in a row of block b's 16 even and 16 odd activations. */
static inline int evens_at(int b) { return (b & 1) ? QK * b - 16 : QK * b; }
static inline int odds_at(int b, int nb) { return (b & 1) ? QK * b + 16 : (b + 1 < nb ? QK * b + QK : QK * b + 16); }

/* ---------------------------------------------------------------- activation quantisation */

/* Round to nearest, ties to even (as torch.round), in every build: the tests compare bit for bit.
 * Block b of a row with nb blocks: q is the row's start. */
static inline void quantize_block(const float *x, int8_t *q, int b, int nb, float *d, int32_t *s) {
#if defined(__AVX512F__) && defined(__AVX512BW__)
    /* The same arithmetic on 16 lanes (max of |x|, one product each, conversion rounding to nearest even as
     * nearbyintf does in the default mode): the same bits, without a prompt's millions of scalar roundings. */
    const __m512 lo = _mm512_loadu_ps(x), hi = _mm512_loadu_ps(x + 16);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
    const float id = finite_or_zero(127.0f / amax);
    *d = scale_or_nan(x, amax / 127.0f);
    const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
    const __m512 vid = _mm512_set1_ps(id);
    const __m512i qe = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_permutex2var_ps(lo, even, hi), vid));
    const __m512i qo = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_permutex2var_ps(lo, odd, hi), vid));
    _mm_storeu_si128((__m128i *)(q + evens_at(b)), _mm512_cvtsepi32_epi8(qe));
    _mm_storeu_si128((__m128i *)(q + odds_at(b, nb)), _mm512_cvtsepi32_epi8(qo));
    *s = _mm512_reduce_add_epi32(_mm512_add_epi32(qe, qo));
#elif defined(__AVX2__)
    /* The same on 8 lanes. */
    __m256 x4[4], vmax = _mm256_setzero_ps();
    for (int i = 0; i < 4; i++) {
        x4[i] = _mm256_loadu_ps(x + 8 * i);
        vmax = _mm256_max_ps(_mm256_andnot_ps(_mm256_set1_ps(-0.0f), x4[i]), vmax);
    }
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(vmax), _mm256_extractf128_ps(vmax, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    const float amax = _mm_cvtss_f32(_mm_max_ss(m4, _mm_shuffle_ps(m4, m4, 1)));
    const float id = finite_or_zero(127.0f / amax);
    *d = scale_or_nan(x, amax / 127.0f);
    const __m256 vid = _mm256_set1_ps(id);
    __m256i sum = _mm256_setzero_si256();
    for (int parity = 0; parity < 2; parity++) { /* evens, then odds */
        __m256i qv[2];
        for (int i = 0; i < 2; i++) {
            const __m256 pick = parity ? _mm256_shuffle_ps(x4[2 * i], x4[2 * i + 1], 0xDD) /* constants: clang requires them */
                                       : _mm256_shuffle_ps(x4[2 * i], x4[2 * i + 1], 0x88);
            qv[i] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(pick), 0xD8)), vid));
            sum = _mm256_add_epi32(sum, qv[i]);
        }
        const __m256i words = _mm256_permute4x64_epi64(_mm256_packs_epi32(qv[0], qv[1]), 0xD8);
        _mm_storeu_si128((__m128i *)(q + (parity ? odds_at(b, nb) : evens_at(b))),
                         _mm_packs_epi16(_mm256_castsi256_si128(words), _mm256_extracti128_si256(words, 1)));
    }
    __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
    *s = _mm_cvtsi128_si32(_mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1)));
#elif defined(__ARM_FEATURE_DOTPROD)
    /* The same on 4 lanes: vld2 splits even and odd elements; vcvtn rounds to nearest even as nearbyintf does. */
    float32x4x2_t v[4];
    float32x4_t vmax = vdupq_n_f32(0.0f);
    for (int i = 0; i < 4; i++) {
        v[i] = vld2q_f32(x + 8 * i);
        vmax = vmaxq_f32(vmax, vmaxq_f32(vabsq_f32(v[i].val[0]), vabsq_f32(v[i].val[1])));
    }
    const float amax = vmaxvq_f32(vmax);
    const float id = finite_or_zero(127.0f / amax);
    *d = scale_or_nan(x, amax / 127.0f);
    int32x4_t sum = vdupq_n_s32(0);
    for (int parity = 0; parity < 2; parity++) { /* evens, then odds */
        int32x4_t qi[4];
        for (int i = 0; i < 4; i++) {
            qi[i] = vcvtnq_s32_f32(vmulq_n_f32(v[i].val[parity], id));
            sum = vaddq_s32(sum, qi[i]);
        }
        const int16x8_t lo = vcombine_s16(vqmovn_s32(qi[0]), vqmovn_s32(qi[1]));
        const int16x8_t hi = vcombine_s16(vqmovn_s32(qi[2]), vqmovn_s32(qi[3]));
        vst1q_s8(q + (parity ? odds_at(b, nb) : evens_at(b)), vcombine_s8(vqmovn_s16(lo), vqmovn_s16(hi)));
    }
    *s = vaddvq_s32(sum);
#else
    float amax = 0.0f;
    for (int j = 0; j < QK; j++) amax = fmaxf(amax, fabsf(x[j]));
    float id = finite_or_zero(127.0f / amax);
    *d = scale_or_nan(x, amax / 127.0f);
    int8_t *evens = q + evens_at(b), *odds = q + odds_at(b, nb);
    int32_t sum = 0;
    for (int j = 0; j < QK / 2; j++) {
        evens[j] = (int8_t)nearbyintf(x[2 * j] * id);
        odds[j] = (int8_t)nearbyintf(x[2 * j + 1] * id);
        sum += evens[j] + odds[j];
    }
    *s = sum;
#endif
}

static void quantize_row(const float *x, int K, int8_t *q, float *d, int32_t *s) {
    for (int b = 0; b < K / QK; b++) quantize_block(x + b * QK, q, b, K / QK, d + b, s + b);
}

/* ---------------------------------------------------------------- one weight row against one activation row */

#ifdef __AVX2__
static inline float hsum(__m256 v) {
    __m128 lo = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    lo = _mm_add_ss(lo, _mm_shuffle_ps(lo, lo, 1));
    return _mm_cvtss_f32(lo);
}

/* 16 packed bytes → 32 int8 weights times 2, even elements in the low lane, odd ones in the high lane. */
static inline __m256i decode_block(const uint8_t *p, __m256i lut, __m256i mask) {
    __m128i bytes = _mm_loadu_si128((const __m128i *)p);
    __m256i nibbles = _mm256_set_m128i(_mm_srli_epi16(bytes, 4), bytes);
    return _mm256_shuffle_epi8(lut, _mm256_and_si256(nibbles, mask));
}

static void decode_blocks(const uint8_t *blocks, int64_t n, int8_t *out) {
    const __m256i lut = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)E2M1_X2));
    const __m256i mask = _mm256_set1_epi8(0x0F);
    for (int64_t b = 0; b < n; b++)
        _mm256_storeu_si256((__m256i *)(out + QK * b), decode_block(blocks + 16 * b, lut, mask));
}

/* Blocks b, b+1 (32 packed bytes at w, activations at q in the pair layout): int16 lanes, the low 128
 * bits block b's and the high 128 bits block b+1's, each lane a sum of 4 products (w+12)·q. |lane| ≤
 * 4·24·127 = 12192: two of them still fit in int16. */
static inline __attribute__((always_inline)) __m256i pair_products(const uint8_t *w, const int8_t *q, __m256i lut, __m256i mask) {
    const __m256i v = _mm256_loadu_si256((const __m256i *)w);
    const __m256i evens = _mm256_shuffle_epi8(lut, _mm256_and_si256(v, mask));
    const __m256i odds = _mm256_shuffle_epi8(lut, _mm256_and_si256(_mm256_srli_epi16(v, 4), mask));
    return _mm256_add_epi16(_mm256_maddubs_epi16(evens, _mm256_loadu_si256((const __m256i *)q)),
                            _mm256_maddubs_epi16(odds, _mm256_loadu_si256((const __m256i *)(q + 32))));
}

/* 2^(e-127) for 8 E8M0 exponents, exact: e << 23 is the float's exponent field; e = 0 is the subnormal
 * 2^-127 (bits 1 << 22, below every e << 23 with e ≥ 1, so one max). */
static inline __m256 pow2_x8(const uint8_t *e) {
    const __m256i bits = _mm256_slli_epi32(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)e)), 23);
    return _mm256_castsi256_ps(_mm256_max_epi32(bits, _mm256_set1_epi32(1 << 22)));
}

/* Blocks b..nb-1 (b even) of one weight row against one activation row, per block with POW2 = 2^(e-128): the few
 * blocks past a kernel's last full step (pairs, then a lone last block when nb is odd). */
static float gemv_tail(const uint8_t *blk, const uint8_t *sc, int nb, int b, const Row *row) {
    const __m256i lut = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)E2M1_X2_PLUS12));
    const __m256i mask = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
    const int8_t *q = row->q;
    float tail = 0.0f;
    for (int c = b; c + 2 <= nb; c += 2) {
        const __m256i pr = _mm256_madd_epi16(pair_products(blk + 16 * c, q + QK * c, lut, mask), ones);
        __m128i h = _mm_hadd_epi32(_mm256_castsi256_si128(pr), _mm256_extracti128_si256(pr, 1));
        h = _mm_hadd_epi32(h, h); /* block c, block c+1, again */
        tail += (float)(_mm_cvtsi128_si32(h) - 12 * row->s[c]) * (row->d[c] * POW2[sc[c]]);
        tail += (float)(_mm_extract_epi32(h, 1) - 12 * row->s[c + 1]) * (row->d[c + 1] * POW2[sc[c + 1]]);
    }
    if ((nb - b) % 2) {
        const int c = nb - 1;
        int32_t dot = 0;
        for (int j = 0; j < QK / 2; j++)
            dot += E2M1_X2_PLUS12[blk[16 * c + j] & 0x0F] * q[QK * c + j] + E2M1_X2_PLUS12[blk[16 * c + j] >> 4] * q[QK * c + 16 + j];
        tail += (float)(dot - 12 * row->s[c]) * (row->d[c] * POW2[sc[c]]);
    }
    return tail;
}

/* Σ_k W[k]·x[k] for one packed weight row (nb blocks at blk, E8M0 scales at sc) and n (1 or 2, a constant
 * once inlined) activation rows: out[t]. Eight blocks a step: four 32-byte loads, decoded once for the n
 * rows, and each row's int16 products of the eight blocks reduced by horizontal adds to one int32 per
 * block (lanes b, b+2, b+4, b+6 | b+1, b+3, b+5, b+7, put back in order by one permute), so the +12
 * correction, the int→float conversion and the two scales are one vector operation each per eight
 * blocks instead of one per block. */
static inline __attribute__((always_inline)) void gemv_rows(const uint8_t *blk, const uint8_t *sc, int nb, const Row *rows,
                                                            const int n, float *out) {
    const __m256i lut = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)E2M1_X2_PLUS12));
    const __m256i mask = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1), twelve = _mm256_set1_epi32(12);
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    __m256 acc[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
    int b = 0;
    for (; b + 8 <= nb; b += 8) {
        _mm_prefetch((const char *)(blk + 16 * b + PREFETCH), _MM_HINT_T0);
        _mm_prefetch((const char *)(blk + 16 * b + PREFETCH + 64), _MM_HINT_T0);
        __m256i p[2][4];
        for (int i = 0; i < 4; i++) {
            const __m256i v = _mm256_loadu_si256((const __m256i *)(blk + 16 * b + 32 * i));
            const __m256i evens = _mm256_shuffle_epi8(lut, _mm256_and_si256(v, mask));
            const __m256i odds = _mm256_shuffle_epi8(lut, _mm256_and_si256(_mm256_srli_epi16(v, 4), mask));
            for (int t = 0; t < n; t++) {
                const int8_t *q = rows[t].q + QK * b + 64 * i;
                p[t][i] = _mm256_add_epi16(_mm256_maddubs_epi16(evens, _mm256_loadu_si256((const __m256i *)q)),
                                           _mm256_maddubs_epi16(odds, _mm256_loadu_si256((const __m256i *)(q + 32))));
            }
        }
        const __m256 pw = pow2_x8(sc + b);
        for (int t = 0; t < n; t++) {
            __m256i sums = _mm256_hadd_epi32(_mm256_madd_epi16(_mm256_hadd_epi16(p[t][0], p[t][1]), ones),
                                             _mm256_madd_epi16(_mm256_hadd_epi16(p[t][2], p[t][3]), ones));
            sums = _mm256_permutevar8x32_epi32(sums, order);
            sums = _mm256_sub_epi32(sums, _mm256_mullo_epi32(_mm256_loadu_si256((const __m256i *)(rows[t].s + b)), twelve));
            acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), _mm256_mul_ps(pw, _mm256_loadu_ps(rows[t].d + b)), acc[t]);
        }
    }
    for (int t = 0; t < n; t++) /* pow2_x8 is 2^(e-127): the 1/2 the doubled E2M1 integers carry, once */
        out[t] = hsum(acc[t]) * 0.5f + gemv_tail(blk, sc, nb, b, rows + t);
}

/* Rows two at a time, so each weight block is decoded once for both. */
static void gemv(const uint8_t *blk, const uint8_t *sc, int nb, const Row *rows, int n, float *out) {
    int t = 0;
    for (; t + 2 <= n; t += 2) gemv_rows(blk, sc, nb, rows + t, 2, out + t);
    if (t < n) gemv_rows(blk, sc, nb, rows + t, 1, out + t);
}
#else
static inline void decode_block(const uint8_t *p, int8_t *w) {
    for (int j = 0; j < QK / 2; j++) {
        w[j] = E2M1_X2[p[j] & 0x0F];
        w[QK / 2 + j] = E2M1_X2[p[j] >> 4];
    }
}

static void decode_blocks(const uint8_t *blocks, int64_t n, int8_t *out) {
    for (int64_t b = 0; b < n; b++) decode_block(blocks + 16 * b, out + QK * b);
}

#if defined(__ARM_FEATURE_DOTPROD)
/* 2^(e-127) for 4 E8M0 exponents, exact (as pow2_x8: e = 0 is the subnormal 2^-127). */
static inline float32x4_t pow2_x4(const uint8_t *e) {
    uint32_t word;
    memcpy(&word, e, 4);
    const uint32x4_t wide = vmovl_u16(vget_low_u16(vmovl_u8(vcreate_u8(word))));
    return vreinterpretq_f32_u32(vmaxq_u32(vshlq_n_u32(wide, 23), vdupq_n_u32(1u << 22)));
}

/* One block's products for one activation row, in 4 int32 lanes: the decoded even and odd weights meet the
 * row's even and odd activations (the pair layout keeps each 16 together). */
static inline int32x4_t block_dot(int8x16_t w_even, int8x16_t w_odd, const int8_t *evens, const int8_t *odds) {
    return vdotq_s32(vdotq_s32(vdupq_n_s32(0), w_even, vld1q_s8(evens)), w_odd, vld1q_s8(odds));
}

/* Σ_k W[k]·x[k] for one packed weight row and n (≤ 4, a constant once inlined) activation rows: out[t]. Four
 * blocks a step (two whole pairs of the pair layout: b is even), decoded once for the n rows by two table lookups
 * each; each row's four blocks' lanes summed pairwise to one lane a block, so the conversion and both scales are
 * one vector operation per four blocks. */
static inline __attribute__((always_inline)) void gemv_rows(const uint8_t *blk, const uint8_t *sc, int nb, const Row *rows,
                                                            const int n, float *out) {
    const int8x16_t lut = vld1q_s8(E2M1_X2);
    const uint8x16_t mask = vdupq_n_u8(0x0F);
    float32x4_t acc[4];
    for (int t = 0; t < n; t++) acc[t] = vdupq_n_f32(0.0f);
    int b = 0;
    for (; b + 4 <= nb; b += 4) {
        int8x16_t w_even[4], w_odd[4];
        for (int i = 0; i < 4; i++) {
            const uint8x16_t v = vld1q_u8(blk + 16 * (b + i));
            w_even[i] = vqtbl1q_s8(lut, vandq_u8(v, mask));
            w_odd[i] = vqtbl1q_s8(lut, vshrq_n_u8(v, 4));
        }
        const float32x4_t pw = pow2_x4(sc + b);
        for (int t = 0; t < n; t++) {
            const int8_t *q = rows[t].q + QK * b; /* [b evens | b+1 evens | b odds | b+1 odds | b+2 evens | ...] */
            const int32x4_t p0 = block_dot(w_even[0], w_odd[0], q, q + 32), p1 = block_dot(w_even[1], w_odd[1], q + 16, q + 48);
            const int32x4_t p2 = block_dot(w_even[2], w_odd[2], q + 64, q + 96), p3 = block_dot(w_even[3], w_odd[3], q + 80, q + 112);
            const int32x4_t sums = vpaddq_s32(vpaddq_s32(p0, p1), vpaddq_s32(p2, p3)); /* block b+i in lane i */
            acc[t] = vfmaq_f32(acc[t], vcvtq_f32_s32(sums), vmulq_f32(pw, vld1q_f32(rows[t].d + b)));
        }
    }
    for (int t = 0; t < n; t++) {
        float tail = 0.0f; /* at most 3 blocks: per block, with POW2 = 2^(e-128) */
        for (int c = b; c < nb; c++) {
            const uint8x16_t v = vld1q_u8(blk + 16 * c);
            const int32x4_t p = block_dot(vqtbl1q_s8(lut, vandq_u8(v, mask)), vqtbl1q_s8(lut, vshrq_n_u8(v, 4)),
                                          rows[t].q + evens_at(c), rows[t].q + odds_at(c, nb));
            tail += (float)vaddvq_s32(p) * (rows[t].d[c] * POW2[sc[c]]);
        }
        out[t] = vaddvq_f32(acc[t]) * 0.5f + tail; /* pow2_x4 is 2^(e-127): the 1/2 the doubled E2M1 integers carry, once */
    }
}

/* Rows four at a time, so each weight block is decoded once for four. */
static void gemv(const uint8_t *blk, const uint8_t *sc, int nb, const Row *rows, int n, float *out) {
    int t = 0;
    for (; t + 4 <= n; t += 4) gemv_rows(blk, sc, nb, rows + t, 4, out + t);
    switch (n - t) {
    case 3: gemv_rows(blk, sc, nb, rows + t, 3, out + t); break;
    case 2: gemv_rows(blk, sc, nb, rows + t, 2, out + t); break;
    case 1: gemv_rows(blk, sc, nb, rows + t, 1, out + t); break;
    default: break;
    }
}
#else
static void gemv(const uint8_t *blk, const uint8_t *sc, int nb, const Row *rows, int n, float *out) {
    int8_t w[QK];
    for (int t = 0; t < n; t++) out[t] = 0.0f;
    for (int b = 0; b < nb; b++) {
        decode_block(blk + 16 * b, w);
        for (int t = 0; t < n; t++) {
            const int8_t *evens = rows[t].q + evens_at(b), *odds = rows[t].q + odds_at(b, nb);
            int32_t dot = 0;
            for (int j = 0; j < QK / 2; j++) dot += (int32_t)w[j] * evens[j] + (int32_t)w[QK / 2 + j] * odds[j];
            out[t] += (float)dot * (rows[t].d[b] * POW2[sc[b]]);
        }
    }
}
#endif
#endif

/* ---------------------------------------------------------------- exported entry points */

/* x [rows, K] fp32 → q [rows, K] int8 (the pair layout), d [rows, K/32], s [rows, K/32] = Σq. */
int moe_q8_quantize(const float *x, int64_t rows, int K, int8_t *q, float *d, int32_t *s) {
    if (K % QK) return -1;
    #pragma omp parallel for schedule(static) if (rows * K >= 65536)
    for (int64_t r = 0; r < rows; r++) quantize_row(x + r * K, K, q + r * K, d + r * (K / QK), s + r * (K / QK));
    return 0;
}

/* n packed blocks → n*32 int8 weights times 2, in the kernels' order (evens then odds per block). */
void moe_q8_decode(const uint8_t *blocks, int64_t n, int8_t *out) { decode_blocks(blocks, n, out); }

static inline Row row_at(const int8_t *q, const float *d, const int32_t *s, int K, int64_t r) {
    Row row = {q + r * K, d + r * (K / QK), s + r * (K / QK)};
    return row;
}

/* ---------------------------------------------------------------- prefill: 8 weight rows in the 8 lanes */

#define SPAN 64      /* activation rows handled together by one work item */
#define RG 8         /* weight rows of a row group: one per int32 lane */
#define RG_MIN_ROWS 5 /* a span this long takes the row-group kernel; shorter ones (decode) the per-row kernels */

#ifdef __AVX2__
/* Block b of rows 0..7 (row r at blk + r*stride) in the row-group layout: w[g] holds in int32 lane r row r's
 * four weights (+12) that meet the block's even activations 4g..4g+3 (g < 4) or odd ones 4(g-4)..4(g-4)+3.
 * A 4x4 dword transpose per 128-bit half puts the rows in the lanes; low nibbles are groups 0-3, high
 * nibbles groups 4-7. */
static inline __attribute__((always_inline)) void rowgroup_weights(const uint8_t *blk, size_t stride, int b, __m256i lut,
                                                                   __m256i mask, __m256i w[8]) {
    __m256i R[4];
    for (int r = 0; r < 4; r++)
        R[r] = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)(blk + r * stride + 16 * b))),
                                       _mm_loadu_si128((const __m128i *)(blk + (r + 4) * stride + 16 * b)), 1);
    const __m256i t0 = _mm256_unpacklo_epi32(R[0], R[1]), t1 = _mm256_unpacklo_epi32(R[2], R[3]);
    const __m256i t2 = _mm256_unpackhi_epi32(R[0], R[1]), t3 = _mm256_unpackhi_epi32(R[2], R[3]);
    const __m256i G[4] = {_mm256_unpacklo_epi64(t0, t1), _mm256_unpackhi_epi64(t0, t1),
                          _mm256_unpacklo_epi64(t2, t3), _mm256_unpackhi_epi64(t2, t3)};
    for (int g = 0; g < 4; g++) {
        w[g] = _mm256_shuffle_epi8(lut, _mm256_and_si256(G[g], mask));
        w[4 + g] = _mm256_shuffle_epi8(lut, _mm256_and_si256(_mm256_srli_epi16(G[g], 4), mask));
    }
}

/* pw[b*8 + r] = 2^(s-128) of row r's block b. */
static void rowgroup_scales(const uint8_t *sc, int nb, float *pw) {
    for (int b = 0; b < nb; b++)
        for (int r = 0; r < RG; r++) pw[b * 8 + r] = POW2[sc[r * nb + b]];
}

/* Every block of rows 0..7 in the row-group layout, stored: w + 256*b + 32*g (see rowgroup_weights). */
static void prepare_rowgroup(const uint8_t *blk, int nb, uint8_t *w) {
    const __m256i lut = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)E2M1_X2_PLUS12));
    const __m256i mask = _mm256_set1_epi8(0x0F);
    for (int b = 0; b < nb; b++) {
        __m256i v[8];
        rowgroup_weights(blk, (size_t)nb * 16, b, lut, mask, v);
        for (int g = 0; g < 8; g++) _mm256_storeu_si256((__m256i *)(w + 256 * b + 32 * g), v[g]);
    }
}

static inline __attribute__((always_inline)) __m256i broadcast4(const int8_t *q) {
    int32_t v;
    memcpy(&v, q, 4);
    return _mm256_set1_epi32(v);
}

/* Σ over one block of (w+12)·q for the 8 rows, minus 12·Σq: the exact integer dot products, one per lane.
 * maddubs lanes are ≤ 2*24*127 = 6096, so four groups summed in int16 (≤ 24384) never overflow. */
static inline __attribute__((always_inline)) __m256i rowgroup_block(const __m256i w[8], const int8_t *evens, const int8_t *odds, int32_t sq12) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    __m256i acc = _mm256_set1_epi32(-sq12);
    for (int g = 0; g < 8; g++) acc = _mm256_dpbusd_epi32(acc, w[g], broadcast4(g < 4 ? evens + 4 * g : odds + 4 * (g - 4)));
    return acc;
#elif defined(__AVXVNNI__)
    __m256i acc = _mm256_set1_epi32(-sq12);
    for (int g = 0; g < 8; g++) acc = _mm256_dpbusd_avx_epi32(acc, w[g], broadcast4(g < 4 ? evens + 4 * g : odds + 4 * (g - 4)));
    return acc;
#else
    __m256i half[2];
    for (int h = 0; h < 2; h++) {
        const __m256i *wh = w + 4 * h;
        const int8_t *qh = h ? odds : evens;
        __m256i s01 = _mm256_add_epi16(_mm256_maddubs_epi16(wh[0], broadcast4(qh)), _mm256_maddubs_epi16(wh[1], broadcast4(qh + 4)));
        __m256i s23 = _mm256_add_epi16(_mm256_maddubs_epi16(wh[2], broadcast4(qh + 8)), _mm256_maddubs_epi16(wh[3], broadcast4(qh + 12)));
        half[h] = _mm256_madd_epi16(_mm256_add_epi16(s01, s23), _mm256_set1_epi16(1));
    }
    return _mm256_sub_epi32(_mm256_add_epi32(half[0], half[1]), _mm256_set1_epi32(sq12));
#endif
}

static inline __attribute__((always_inline)) __m256i rowgroup_block_at(const uint8_t *w, const int8_t *q, int b, int nb, int32_t sq12) {
    __m256i v[8];
    for (int g = 0; g < 8; g++) v[g] = _mm256_loadu_si256((const __m256i *)(w + 32 * g));
    return rowgroup_block(v, q + evens_at(b), q + odds_at(b, nb), sq12);
}

/* 8 prepared weight rows against n activation rows: res[t*ld + r]. Two rows at a time share the loads. */
static void rowgroup_rows(const uint8_t *w, const float *pw, int nb, const Row *rows, int n, float *res, int ld) {
    int t = 0;
#if defined(__AVXVNNI__) || (defined(__AVX512VNNI__) && defined(__AVX512VL__))
    /* With dpbusd, four rows sharing each block's weight loads pay (AVX-VNNI, a 20b layer at 512 tokens: 311 -> 294
     * ms); with maddubs they do not (378 -> 386 ms), so AVX2 keeps two. */
    for (; t + 3 < n; t += 4) {
        __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
        for (int b = 0; b < nb; b++) {
            const __m256 scale = _mm256_loadu_ps(pw + 8 * b);
            for (int u = 0; u < 4; u++) {
                const __m256i dot = rowgroup_block_at(w + 256 * b, rows[t + u].q, b, nb, 12 * rows[t + u].s[b]);
                acc[u] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_mul_ps(scale, _mm256_set1_ps(rows[t + u].d[b])), acc[u]);
            }
        }
        for (int u = 0; u < 4; u++) _mm256_storeu_ps(res + (t + u) * ld, acc[u]);
    }
#endif
    for (; t + 1 < n; t += 2) {
        __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
        for (int b = 0; b < nb; b++) {
            const __m256 scale = _mm256_loadu_ps(pw + 8 * b);
            const __m256i d0 = rowgroup_block_at(w + 256 * b, rows[t].q, b, nb, 12 * rows[t].s[b]);
            const __m256i d1 = rowgroup_block_at(w + 256 * b, rows[t + 1].q, b, nb, 12 * rows[t + 1].s[b]);
            acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d0), _mm256_mul_ps(scale, _mm256_set1_ps(rows[t].d[b])), acc0);
            acc1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d1), _mm256_mul_ps(scale, _mm256_set1_ps(rows[t + 1].d[b])), acc1);
        }
        _mm256_storeu_ps(res + t * ld, acc0);
        _mm256_storeu_ps(res + (t + 1) * ld, acc1);
    }
    if (t < n) {
        __m256 acc = _mm256_setzero_ps();
        for (int b = 0; b < nb; b++) {
            const __m256i d0 = rowgroup_block_at(w + 256 * b, rows[t].q, b, nb, 12 * rows[t].s[b]);
            acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d0), _mm256_mul_ps(_mm256_loadu_ps(pw + 8 * b), _mm256_set1_ps(rows[t].d[b])), acc);
        }
        _mm256_storeu_ps(res + t * ld, acc);
    }
}


#if defined(__AVX512VNNI__) && defined(__AVX512F__)
/* ---------------------------------------------------------------- prefill with AVX-512 VNNI: 16 weight rows in the 16 lanes
 *
 * The row-group idea on 512-bit registers: 16 weight rows a group, so each broadcast activation dword meets 64
 * weights in one dpbusd, and each block's eight weight vectors stay in registers while four activation rows pass
 * (two dpbusd chains a row, evens and odds, so eight chains hide the instruction's latency). */
#define RG16 16
#define R16 4 /* activation rows a pass */

/* Every block of rows 0..15 in the 16-lane layout: w + 512*b + 64*g holds lanes 0..7 as rowgroup_weights
 * lays out rows 0..7 and lanes 8..15 the same for rows 8..15. */
static void prepare_rowgroup16(const uint8_t *blk, int nb, uint8_t *w) {
    const __m256i lut = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)E2M1_X2_PLUS12));
    const __m256i mask = _mm256_set1_epi8(0x0F);
    const size_t stride = (size_t)nb * 16;
    for (int b = 0; b < nb; b++) {
        __m256i lo[8], hi[8];
        rowgroup_weights(blk, stride, b, lut, mask, lo);
        rowgroup_weights(blk + 8 * stride, stride, b, lut, mask, hi);
        for (int g = 0; g < 8; g++)
            _mm512_storeu_si512((void *)(w + 512 * b + 64 * g), _mm512_inserti64x4(_mm512_castsi256_si512(lo[g]), hi[g], 1));
    }
}

/* pw[b*16 + r] = 2^(s-128) of row r's block b. */
static void rowgroup16_scales(const uint8_t *sc, int nb, float *pw) {
    for (int b = 0; b < nb; b++)
        for (int r = 0; r < RG16; r++) pw[b * RG16 + r] = POW2[sc[r * nb + b]];
}

static inline __attribute__((always_inline)) __m512i bcast4_512(const int8_t *q) {
    int32_t v;
    memcpy(&v, q, 4);
    return _mm512_set1_epi32(v);
}

/* 16 prepared weight rows against activation rows rows[0..n-1] (n ≤ R16, a constant once inlined): res[t*ld + r]. */
static inline __attribute__((always_inline)) void rowgroup16_pass(const uint8_t *w, const float *pw, int nb, const Row *rows,
                                                                  const int n, float *res, int ld) {
    __m512 acc[R16];
    for (int t = 0; t < n; t++) acc[t] = _mm512_setzero_ps();
    for (int b = 0; b < nb; b++) {
        __m512i W[8];
        for (int g = 0; g < 8; g++) W[g] = _mm512_loadu_si512((const void *)(w + 512 * b + 64 * g));
        const __m512 scale = _mm512_loadu_ps(pw + RG16 * b);
        const int ev = evens_at(b), od = odds_at(b, nb);
        for (int t = 0; t < n; t++) {
            const int8_t *q = rows[t].q;
            __m512i even = _mm512_set1_epi32(-12 * rows[t].s[b]), odd = _mm512_setzero_si512();
            for (int g = 0; g < 4; g++) {
                even = _mm512_dpbusd_epi32(even, W[g], bcast4_512(q + ev + 4 * g));
                odd = _mm512_dpbusd_epi32(odd, W[4 + g], bcast4_512(q + od + 4 * g));
            }
            acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(even, odd)), _mm512_mul_ps(scale, _mm512_set1_ps(rows[t].d[b])), acc[t]);
        }
    }
    for (int t = 0; t < n; t++) _mm512_storeu_ps(res + t * ld, acc[t]);
}

static void rowgroup16_rows(const uint8_t *w, const float *pw, int nb, const Row *rows, int n, float *res, int ld) {
    int t = 0;
    for (; t + R16 <= n; t += R16) rowgroup16_pass(w, pw, nb, rows + t, R16, res + t * ld, ld);
    switch (n - t) {
    case 3: rowgroup16_pass(w, pw, nb, rows + t, 3, res + t * ld, ld); break;
    case 2: rowgroup16_pass(w, pw, nb, rows + t, 2, res + t * ld, ld); break;
    case 1: rowgroup16_pass(w, pw, nb, rows + t, 1, res + t * ld, ld); break;
    default: break;
    }
}
#endif
#endif

#if defined(__ARM_FEATURE_MATMUL_INT8)
/* ---------------------------------------------------------------- prefill on Arm's int8 matrix multiply (i8mm)
 *
 * smmla (mmla_cpu.h) on 2 x 2 tiles of (weight rows, activation rows); a block's four chunks in the pair layout's
 * order (evens 0-7, evens 8-15, odds 0-7, odds 8-15), the same for both sides. The kernel holds 2 x 2 tiles (4 weight
 * rows, 4 activation rows) in registers; the activation pairs are laid out once a span, the weight pairs once a group
 * of 4 rows. */
#define MM_MIN_ROWS 4 /* activation rows from which a span takes smmla (bench/arm_kernels.py, instructions a row-block:
                       * 8.1 vs 10.0 at 4 rows, 6.2 vs 9.8 at 8, 4.5 vs 9.6 at 64; at 2 the per-row kernel) */

/* Per-thread operand buffers, grown on demand and kept. */
static __thread int8_t *mm_x;
static __thread float *mm_dx;
static __thread size_t mm_x_bytes;

/* Weight rows o..o_end-1, four at a time, against the span's n activation rows (rows[t]) by smmla; → the first weight
 * row left (fewer than 4 remain) or -1 when the buffers cannot be had. res as span_dots. */
static int mm_rows(const uint8_t *blocks, const uint8_t *scales, int nb, int o, int o_end, const Row *rows, int n, float *res,
                   int ld, int o_begin) {
    const int pairs = (n + 1) / 2; /* an odd last row is paired with itself; its twin's sums are not stored */
    const size_t bytes = (size_t)pairs * nb * 64;
    if (bytes > mm_x_bytes) {
        int8_t *x = realloc(mm_x, bytes);
        float *dx = x ? realloc(mm_dx, (size_t)pairs * nb * 4 * sizeof(float)) : NULL;
        if (!x || !dx) {
            if (x) mm_x = x;
            return -1;
        }
        mm_x = x, mm_dx = dx, mm_x_bytes = bytes;
    }
    for (int p = 0; p < pairs; p++) {
        const Row *r0 = rows + 2 * p, *r1 = rows + (2 * p + 1 < n ? 2 * p + 1 : 2 * p);
        for (int b = 0; b < nb; b++) {
            mm_interleave(vld1q_s8(r0->q + evens_at(b)), vld1q_s8(r0->q + odds_at(b, nb)), vld1q_s8(r1->q + evens_at(b)),
                          vld1q_s8(r1->q + odds_at(b, nb)), mm_x + ((size_t)p * nb + b) * 64);
            float *dx = mm_dx + ((size_t)p * nb + b) * 4; /* the tile's lanes: (w0,x0) (w0,x1) (w1,x0) (w1,x1) */
            dx[0] = dx[2] = r0->d[b], dx[1] = dx[3] = r1->d[b];
        }
    }
    const int8x16_t lut = vld1q_s8(E2M1_X2);
    const uint8x16_t mask = vdupq_n_u8(0x0F);
    int8_t w[2 * nb * 64];  /* two weight pairs' operands */
    float dw[2 * nb * 4];   /* their scales in the tile's lanes, times the 1/2 of the doubled E2M1 integers */
    for (; o + 4 <= o_end; o += 4) {
        for (int wp = 0; wp < 2; wp++) {
            const uint8_t *b0 = blocks + (size_t)(o + 2 * wp) * nb * 16, *b1 = b0 + (size_t)nb * 16;
            const uint8_t *s0 = scales + (size_t)(o + 2 * wp) * nb, *s1 = s0 + nb;
            for (int b = 0; b < nb; b++) {
                const uint8x16_t v0 = vld1q_u8(b0 + 16 * b), v1 = vld1q_u8(b1 + 16 * b);
                mm_interleave(vqtbl1q_s8(lut, vandq_u8(v0, mask)), vqtbl1q_s8(lut, vshrq_n_u8(v0, 4)),
                              vqtbl1q_s8(lut, vandq_u8(v1, mask)), vqtbl1q_s8(lut, vshrq_n_u8(v1, 4)), w + ((size_t)wp * nb + b) * 64);
                float *d = dw + ((size_t)wp * nb + b) * 4;
                d[0] = d[1] = POW2[s0[b]], d[2] = d[3] = POW2[s1[b]];
            }
        }
        for (int p = 0; p < pairs; p += 2) {
            const int both = p + 1 < pairs; /* two activation pairs, or the last one alone */
            float32x4_t acc[2][2] = {{vdupq_n_f32(0.0f), vdupq_n_f32(0.0f)}, {vdupq_n_f32(0.0f), vdupq_n_f32(0.0f)}};
            for (int b = 0; b < nb; b++) {
                for (int ap = 0; ap < 1 + both; ap++) {
                    const int8_t *x = mm_x + ((size_t)(p + ap) * nb + b) * 64;
                    const float32x4_t dx = vld1q_f32(mm_dx + ((size_t)(p + ap) * nb + b) * 4);
                    for (int wp = 0; wp < 2; wp++) {
                        const int32x4_t sums = mm_block(w + ((size_t)wp * nb + b) * 64, x);
                        const float32x4_t scale = vmulq_f32(vld1q_f32(dw + ((size_t)wp * nb + b) * 4), dx);
                        acc[wp][ap] = vfmaq_f32(acc[wp][ap], vcvtq_f32_s32(sums), scale);
                    }
                }
            }
            for (int ap = 0; ap < 1 + both; ap++)
                for (int wp = 0; wp < 2; wp++) {
                    float lanes[4];
                    vst1q_f32(lanes, acc[wp][ap]);
                    const int t = 2 * (p + ap), c = o + 2 * wp - o_begin;
                    res[t * ld + c] = lanes[0], res[t * ld + c + 1] = lanes[2];
                    if (t + 1 < n) res[(t + 1) * ld + c] = lanes[1], res[(t + 1) * ld + c + 1] = lanes[3];
                }
        }
    }
    return o;
}
#endif

#if defined(__AVX512VNNI__) && defined(__AVX512F__) && defined(__AVX512BW__)
/* ---------------------------------------------------------------- decode with AVX-512 VNNI: four blocks a register
 *
 * Decode reads each weight once (a few activation rows): the product must keep up with memory on one core, and the
 * AVX2 one-row kernel (maddubs, horizontal adds) reaches only ~21 GB/s from L2 on a Zen 4 core, about what one core
 * reads from memory: two cores then share the read but not the arithmetic. Here a 64-byte load is four packed
 * blocks; its low nibbles are their even elements and its high nibbles their odd ones, so two shuffles decode four
 * blocks and two dpbusd take their dot products, with no horizontal adds: lane l sums block b + l/4's evens and
 * odds 4(l%4)..4(l%4)+3. The activation side of that is laid out once per call, per row (QuadRow): the row's
 * evens and odds of four blocks in those lanes, the -12·Σq that takes back the weights' +12 offset (as the starting
 * value of the dpbusd chain), and each lane's activation scale. One float multiply-add per 16 lanes applies both
 * scales. */
#define QUAD_MAX_ROWS 6 /* spans of up to this many activation rows (decode, a batch of decodes) take this kernel: below 7 rows, rearranging
                         * 16 weight rows for the row-group kernel costs more than it saves (20b layer, 2 threads, medians
                         * of 30: 32 tokens 28.8 -> 24.5 ms, 64 tokens 45.8 -> 43.6 ms against spans of up to 4) */
#undef RG_MIN_ROWS
#define RG_MIN_ROWS (QUAD_MAX_ROWS + 1)

typedef struct {
    __m512i evens, odds; /* blocks 4j..4j+3: evens (16 each), then odds, as the weights' nibbles meet them */
    __m512i base;        /* int32 lanes: -12 · Σ of the eight activations the lane multiplies */
    __m512 scale;        /* the lane's block's activation scale */
} QuadRow;

static const int32_t QUAD_LANE_BLOCK[16] = {0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3};

/* Quads 0..nb/4-1 of one activation row (the pair layout: pairs 2j and 2j+1 hold blocks 4j..4j+3). */
static void quad_row(const Row *row, int nb, QuadRow *out) {
    const __m512i twelve = _mm512_set1_epi8(12), lane_block = _mm512_loadu_si512((const void *)QUAD_LANE_BLOCK);
    for (int j = 0; j < nb / 4; j++) {
        const __m512i p0 = _mm512_loadu_si512((const void *)(row->q + 128 * j)), p1 = _mm512_loadu_si512((const void *)(row->q + 128 * j + 64));
        const __m512i evens = _mm512_shuffle_i64x2(p0, p1, _MM_SHUFFLE(1, 0, 1, 0)), odds = _mm512_shuffle_i64x2(p0, p1, _MM_SHUFFLE(3, 2, 3, 2));
        const __m512i twelve_sums = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), twelve, evens), twelve, odds);
        out[j].evens = evens, out[j].odds = odds;
        out[j].base = _mm512_sub_epi32(_mm512_setzero_si512(), twelve_sums);
        out[j].scale = _mm512_permutexvar_ps(lane_block, _mm512_castps128_ps512(_mm_loadu_ps(row->d + 4 * j)));
    }
}

/* One quad of weights (64 packed bytes at w, its four scales as 2^(e-127) in `pw`'s lanes) against n rows' quads. */
static inline __attribute__((always_inline)) void quad_step(const uint8_t *w, __m512 pw, const QuadRow *const *quads, int j,
                                                            const int n, __m512i lut, __m512i mask, __m512 *acc) {
    const __m512i v = _mm512_loadu_si512((const void *)w);
    const __m512i evens = _mm512_shuffle_epi8(lut, _mm512_and_si512(v, mask));
    const __m512i odds = _mm512_shuffle_epi8(lut, _mm512_and_si512(_mm512_srli_epi16(v, 4), mask));
    for (int t = 0; t < n; t++) {
        const QuadRow *x = quads[t] + j;
        const __m512i dot = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(x->base, evens, x->evens), odds, x->odds);
        acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(pw, x->scale), acc[t]);
    }
}

/* Σ_k W[k]·x[k] for one packed weight row and n (1 or 2, a constant once inlined) activation rows: out[t]. Quads
 * two at a time (eight scales decoded at once), then the blocks past the last quad as the AVX2 kernel does them. */
static inline __attribute__((always_inline)) void gemv_quads_rows(const uint8_t *blk, const uint8_t *sc, int nb, const Row *rows,
                                                                  const QuadRow *const *quads, const int n, float *out) {
    const __m512i lut = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)E2M1_X2_PLUS12));
    const __m512i mask = _mm512_set1_epi8(0x0F), lane_block = _mm512_loadu_si512((const void *)QUAD_LANE_BLOCK);
    const __m512i next_four = _mm512_add_epi32(lane_block, _mm512_set1_epi32(4));
    __m512 acc[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
    const int nq = nb / 4;
    int j = 0;
    for (; j + 2 <= nq; j += 2) {
        _mm_prefetch((const char *)(blk + 64 * j + PREFETCH), _MM_HINT_T0);
        _mm_prefetch((const char *)(blk + 64 * j + PREFETCH + 64), _MM_HINT_T0);
        const __m512 pw8 = _mm512_castps256_ps512(pow2_x8(sc + 4 * j));
        quad_step(blk + 64 * j, _mm512_permutexvar_ps(lane_block, pw8), quads, j, n, lut, mask, acc);
        quad_step(blk + 64 * j + 64, _mm512_permutexvar_ps(next_four, pw8), quads, j + 1, n, lut, mask, acc);
    }
    if (j < nq) {
        uint8_t four[8] = {0};
        memcpy(four, sc + 4 * j, 4); /* not 8: the row's scales may end here */
        quad_step(blk + 64 * j, _mm512_permutexvar_ps(lane_block, _mm512_castps256_ps512(pow2_x8(four))), quads, j, n, lut, mask, acc);
    }
    for (int t = 0; t < n; t++) out[t] = _mm512_reduce_add_ps(acc[t]) * 0.5f + gemv_tail(blk, sc, nb, 4 * nq, rows + t);
}

/* The decode product: weight rows o..o_end-1 against n ≤ QUAD_MAX_ROWS activation rows, res as span_dots. */
static void gemv_quads(const uint8_t *blocks, const uint8_t *scales, int nb, int o, int o_end, const Row *rows, int n,
                       float *res, int ld, int o_begin) {
    QuadRow table[n][nb / 4 > 0 ? nb / 4 : 1];
    const QuadRow *quads[QUAD_MAX_ROWS];
    for (int t = 0; t < n; t++) quad_row(rows + t, nb, table[t]), quads[t] = table[t];
    for (; o < o_end; o++) {
        const uint8_t *blk = blocks + (size_t)o * nb * 16, *sc = scales + (size_t)o * nb;
        float out[QUAD_MAX_ROWS];
        int t = 0;
        for (; t + 2 <= n; t += 2) gemv_quads_rows(blk, sc, nb, rows + t, quads + t, 2, out + t);
        if (t < n) gemv_quads_rows(blk, sc, nb, rows + t, quads + t, 1, out + t);
        for (t = 0; t < n; t++) res[t * ld + o - o_begin] = out[t];
    }
}
#endif

/* Weight rows o_begin..o_end-1 (blocks/scales point at the expert's row 0) against activation rows
 * start..start+n-1 (n ≤ SPAN; row p reads row_of[p], or p when NULL): res[t*(o_end-o_begin) + o-o_begin].
 * Long spans go 8 weight rows at a time through the row-group kernel; the rest (short spans, a tail of
 * fewer than 8 weight rows, the portable build) through the per-row kernels. */
static void span_dots(const uint8_t *blocks, const uint8_t *scales, int nb, int o_begin, int o_end, const int8_t *q,
                      const float *d, const int32_t *s, const int64_t *row_of, int64_t start, int n, float *res) {
    const int K = nb * QK, ld = o_end - o_begin;
    int o = o_begin;
#ifdef __AVX2__
    if (o_end - o_begin >= RG && n >= RG_MIN_ROWS) {
        Row rows[SPAN];
        float pw[8 * nb];
        for (int t = 0; t < n; t++) rows[t] = row_at(q, d, s, K, row_of ? row_of[start + t] : start + t);
#if defined(__AVX512VNNI__) && defined(__AVX512F__)
        {
            float pw16[RG16 * nb];
            uint8_t w16[512 * nb];
            for (; o + RG16 <= o_end; o += RG16) {
                rowgroup16_scales(scales + (size_t)o * nb, nb, pw16);
                prepare_rowgroup16(blocks + (size_t)o * nb * 16, nb, w16);
                rowgroup16_rows(w16, pw16, nb, rows, n, res + (o - o_begin), ld);
            }
        }
#endif
        uint8_t w[256 * nb];
        for (; o + RG <= o_end; o += RG) {
            rowgroup_scales(scales + (size_t)o * nb, nb, pw);
            prepare_rowgroup(blocks + (size_t)o * nb * 16, nb, w);
            rowgroup_rows(w, pw, nb, rows, n, res + (o - o_begin), ld);
        }
    }
#endif
    if (o == o_end) return;
    Row rows[SPAN];
    for (int t = 0; t < n; t++) rows[t] = row_at(q, d, s, K, row_of ? row_of[start + t] : start + t);
#if defined(__AVX512VNNI__) && defined(__AVX512F__) && defined(__AVX512BW__)
    if (n <= QUAD_MAX_ROWS) {
        gemv_quads(blocks, scales, nb, o, o_end, rows, n, res, ld, o_begin);
        return;
    }
#endif
#if defined(__ARM_FEATURE_MATMUL_INT8)
    if (n >= MM_MIN_ROWS && o_end - o >= 4) {
        const int left = mm_rows(blocks, scales, nb, o, o_end, rows, n, res, ld, o_begin);
        o = left < 0 ? o : left; /* no buffers: the per-row kernels do it all */
    }
#endif
    for (int oo = o; oo < o_end; oo++) {
        float out[SPAN];
        gemv(blocks + (size_t)oo * nb * 16, scales + (size_t)oo * nb, nb, rows, n, out);
        for (int t = 0; t < n; t++) res[t * ld + oo - o_begin] = out[t];
    }
}

/* One projection for rows grouped by expert: group g covers output rows offsets[g]..offsets[g+1]-1,
 * whose inputs are activation rows row_of[p] (p itself when row_of is NULL), and uses expert
 * experts[g]. Weights: blocks [E, O, K/32, 16], scales [E, O, K/32]; bias [E, O] fp32 or NULL.
 * Activations as moe_q8_quantize writes them (q, d, s). y [P, O] fp32. `threads`: the OpenMP team. */
int moe_q8_linear(const int8_t *q, const float *d, const int32_t *s, const int64_t *row_of, int K, const int64_t *offsets,
                  const int64_t *experts, int G, const uint8_t *blocks, const uint8_t *scales, int O,
                  const float *bias, float *y, int threads) {
    if (K % QK) return -1;
    const int nb = K / QK, tiles = (O + TILE_O - 1) / TILE_O;
    const size_t per_expert = (size_t)O * nb;
    #pragma omp parallel for collapse(2) schedule(dynamic, 1) num_threads(threads > 0 ? threads : 1)
    for (int g = 0; g < G; g++) {
        for (int tile = 0; tile < tiles; tile++) {
            const int64_t e = experts[g];
            const int o_end = (tile + 1) * TILE_O < O ? (tile + 1) * TILE_O : O;
            const int o_begin = tile * TILE_O;
            const size_t at = e * per_expert;
            float res[SPAN * TILE_O];
            for (int64_t start = offsets[g]; start < offsets[g + 1]; start += SPAN) {
                const int n = offsets[g + 1] - start < SPAN ? (int)(offsets[g + 1] - start) : SPAN;
                span_dots(blocks + 16 * at, scales + at, nb, o_begin, o_end, q, d, s, row_of, start, n, res);
                for (int t = 0; t < n; t++)
                    for (int o = o_begin; o < o_end; o++)
                        y[(start + t) * O + o] = res[t * (o_end - o_begin) + o - o_begin] + (bias ? bias[e * O + o] : 0.0f);
            }
        }
    }
    return 0;
}

/* ---------------------------------------------------------------- one whole MoE layer */

/* gpt-oss's clamped SwiGLU on one (glu, linear) pair, alpha 1.702 (gpt_oss.swiglu). */
static inline float swiglu(float glu, float lin, float limit) {
    glu = fminf(glu, limit);
    lin = fminf(fmaxf(lin, -limit), limit);
    return glu / (1.0f + expf(-1.702f * glu)) * (lin + 1.0f);
}

/* One block of SwiGLU outputs: act[i] = swiglu(h[2i] + bias[2i], h[2i+1] + bias[2i+1]) for i < 32 (h interleaves glu
 * and linear rows, as mlp1's rows are stored), on 16 or 8 lanes with vec_math.h's exp: a prompt computes millions.
 * Outputs within 5 ulps of the scalar expf path's for glu in [-51, 7] (measured; below, where exp's input passes its
 * clamp, both are under 1e-36), while the int8 quantisation that follows moves them by up to half a step. min/max return their second operand for a NaN, as
 * fminf/fmaxf return the number. */
static inline void swiglu_block(const float *h, const float *bias, float limit, float *act) {
#if defined(__AVX512F__)
    const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
    const __m512 vlimit = _mm512_set1_ps(limit), one = _mm512_set1_ps(1.0f);
    for (int half = 0; half < 2; half++) {
        const __m512 lo = _mm512_add_ps(_mm512_loadu_ps(h + 32 * half), _mm512_loadu_ps(bias + 32 * half));
        const __m512 hi = _mm512_add_ps(_mm512_loadu_ps(h + 32 * half + 16), _mm512_loadu_ps(bias + 32 * half + 16));
        const __m512 glu = _mm512_min_ps(_mm512_permutex2var_ps(lo, even, hi), vlimit);
        const __m512 lin = _mm512_min_ps(_mm512_max_ps(_mm512_permutex2var_ps(lo, odd, hi), _mm512_sub_ps(_mm512_setzero_ps(), vlimit)), vlimit);
        const __m512 e = exp16(_mm512_mul_ps(_mm512_set1_ps(-1.702f), glu));
        _mm512_storeu_ps(act + 16 * half, _mm512_mul_ps(_mm512_div_ps(glu, _mm512_add_ps(one, e)), _mm512_add_ps(lin, one)));
    }
#elif defined(__AVX2__)
    const __m256 vlimit = _mm256_set1_ps(limit), one = _mm256_set1_ps(1.0f);
    for (int quarter = 0; quarter < 4; quarter++) {
        const __m256 a = _mm256_add_ps(_mm256_loadu_ps(h + 16 * quarter), _mm256_loadu_ps(bias + 16 * quarter));
        const __m256 b = _mm256_add_ps(_mm256_loadu_ps(h + 16 * quarter + 8), _mm256_loadu_ps(bias + 16 * quarter + 8));
        /* shuffle takes lanes 0,2 (glu) or 1,3 (linear) of each 128-bit half; the 64-bit permute puts them in order */
        const __m256 g = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(a, b, 0x88)), 0xD8));
        const __m256 l = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(a, b, 0xDD)), 0xD8));
        const __m256 glu = _mm256_min_ps(g, vlimit);
        const __m256 lin = _mm256_min_ps(_mm256_max_ps(l, _mm256_sub_ps(_mm256_setzero_ps(), vlimit)), vlimit);
        const __m256 e = exp8(_mm256_mul_ps(_mm256_set1_ps(-1.702f), glu));
        _mm256_storeu_ps(act + 8 * quarter, _mm256_mul_ps(_mm256_div_ps(glu, _mm256_add_ps(one, e)), _mm256_add_ps(lin, one)));
    }
#elif defined(__ARM_FEATURE_DOTPROD)
    const float32x4_t vlimit = vdupq_n_f32(limit), one = vdupq_n_f32(1.0f);
    for (int quarter = 0; quarter < 8; quarter++) { /* vld2 splits the interleaved (glu, linear) pairs */
        const float32x4x2_t hv = vld2q_f32(h + 8 * quarter), bv = vld2q_f32(bias + 8 * quarter);
        const float32x4_t glu = vminq_f32(vaddq_f32(hv.val[0], bv.val[0]), vlimit);
        const float32x4_t lin = vminq_f32(vmaxq_f32(vaddq_f32(hv.val[1], bv.val[1]), vnegq_f32(vlimit)), vlimit);
        const float32x4_t e = exp4(vmulq_f32(vdupq_n_f32(-1.702f), glu));
        vst1q_f32(act + 4 * quarter, vmulq_f32(vdivq_f32(glu, vaddq_f32(one, e)), vaddq_f32(lin, one)));
    }
#else
    for (int i = 0; i < QK; i++) act[i] = swiglu(h[2 * i] + bias[2 * i], h[2 * i + 1] + bias[2 * i + 1], limit);
#endif
}

/* act [n, 32] = SwiGLU of h + bias (each [n, 64], glu and linear interleaved) by the layer's own block code: exported
 * for the tests, which hold every variant's vector exp and clamps to the reference. */
void moe_q8_swiglu(const float *h, const float *bias, int64_t n, float limit, float *act) {
    for (int64_t b = 0; b < n; b++) swiglu_block(h + 64 * b, bias + 64 * b, limit, act + 32 * b);
}

typedef struct {
    int64_t T;
    int H, I;
    const int64_t *pair_token; /* [P] the token of each (token, expert) pair, pairs grouped by expert */
    const int64_t *pair_slot;  /* [P] the pair's index into the router's [T, k] choices */
    const float *topw;         /* [T, k] routing weights */
    const int64_t *offsets, *experts;
    const uint8_t *blocks1, *scales1, *blocks2, *scales2;
    const float *bias1, *bias2;
    float limit;
    int8_t *xq, *hq; /* quantised inputs [T, H] and SwiGLU outputs [P, I] */
    float *xd, *hd;
    int32_t *xs, *hs; /* their block sums */
    float *out; /* [T, H], zeroed by the quantisation pass, then added to */
} Layer;

/* mlp1 rows tile*64 .. +63 of group g's expert for all its pairs, + bias, SwiGLU, quantised at once:
 * the 32 outputs are exactly activation block `tile` of mlp2's input. */
static void mlp1_tile(const Layer *L, int g, int tile) {
    const int nb = L->H / QK, O = 2 * L->I, o_begin = tile * TILE_1;
    const int64_t e = L->experts[g];
    const size_t at = (size_t)e * O * nb;
    float h[SPAN * TILE_1];
    for (int64_t start = L->offsets[g]; start < L->offsets[g + 1]; start += SPAN) {
        const int n = L->offsets[g + 1] - start < SPAN ? (int)(L->offsets[g + 1] - start) : SPAN;
        span_dots(L->blocks1 + 16 * at, L->scales1 + at, nb, o_begin, o_begin + TILE_1, L->xq, L->xd, L->xs, L->pair_token, start, n, h);
        const float *bias = L->bias1 + e * O + o_begin;
        for (int t = 0; t < n; t++) {
            const float *ht = h + t * TILE_1;
            float act[QK];
            swiglu_block(ht, bias, L->limit, act);
            const int64_t p = start + t;
            quantize_block(act, L->hq + p * L->I, tile, L->I / QK, L->hd + p * (L->I / QK) + tile, L->hs + p * (L->I / QK) + tile);
        }
    }
}

/* mlp2 rows of one output tile for every group, each added into its token's output times the pair's
 * routing weight. One thread owns the tile's columns of `out`, so the k experts of a token never race. */
static void mlp2_tile(const Layer *L, int G, int tile) {
    const int nb = L->I / QK, H = L->H, o_begin = tile * TILE_O;
    const int o_end = o_begin + TILE_O < H ? o_begin + TILE_O : H, cols = o_end - o_begin;
    float res[SPAN * TILE_O];
    for (int g = 0; g < G; g++) {
        const int64_t e = L->experts[g];
        const size_t at = (size_t)e * H * nb;
        const float *bias = L->bias2 + e * H;
        for (int64_t start = L->offsets[g]; start < L->offsets[g + 1]; start += SPAN) {
            const int n = L->offsets[g + 1] - start < SPAN ? (int)(L->offsets[g + 1] - start) : SPAN;
            span_dots(L->blocks2 + 16 * at, L->scales2 + at, nb, o_begin, o_end, L->hq, L->hd, L->hs, NULL, start, n, res);
            for (int t = 0; t < n; t++) {
                float *out = L->out + L->pair_token[start + t] * H;
                const float weight = L->topw[L->pair_slot[start + t]];
                for (int o = o_begin; o < o_end; o++) out[o] += weight * (res[t * cols + o - o_begin] + bias[o]);
            }
        }
    }
}

/* Pairs (token, slot) grouped by expert, as a stable counting sort of the router's choices: group g
 * is pairs offsets[g] .. offsets[g+1]-1 with expert experts[g], experts ascending, tokens ascending
 * within a group. Returns the number of groups, or -1 for an expert id outside 0..E-1. */
static int group_pairs(const int64_t *topk, int64_t T, int k, int E, int64_t *offsets, int64_t *experts,
                       int64_t *pair_token, int64_t *pair_slot) {
    int64_t *next = offsets; /* counts, then each group's next free position (offsets rebuilt below) */
    for (int e = 0; e <= E; e++) next[e] = 0;
    for (int64_t s = 0; s < T * k; s++) {
        if (topk[s] < 0 || topk[s] >= E) return -1;
        next[topk[s] + 1]++;
    }
    for (int e = 0; e < E; e++) next[e + 1] += next[e];
    for (int64_t s = 0; s < T * k; s++) {
        const int64_t at = next[topk[s]]++;
        pair_token[at] = s / k;
        pair_slot[at] = s;
    }
    /* next[e] is now the end of expert e's pairs: keep the non-empty ones as groups */
    int G = 0;
    int64_t begin = 0;
    for (int e = 0; e < E; e++) {
        const int64_t end = next[e];
        if (end > begin) {
            experts[G] = e;
            offsets[G] = begin; /* G ≤ e, so offsets[G] no longer holds a needed next[] */
            G++;
        }
        begin = end;
    }
    offsets[G] = begin;
    return G;
}

#if defined(OSSRUN_AMX)
/* ---------------------------------------------------------------- a prompt's MoE on AMX tiles
 *
 * With a prompt's many tokens, each expert sees tens of pairs: the projections become 16 x 16 tile products, one
 * block (32 k) a product, as in q8_cpu.c (amx_cpu.h). The experts' packed rows are decoded to signed int8 (E2M1 x 2)
 * sixteen rows at a time, each block [its 16 even elements | its 16 odd ones], the order in which the pair layout
 * keeps the activations; the activations of each expert's pairs are laid out once per projection as the second
 * operand, sixteen pairs a tile (the last one padded with zero pairs, computed and never stored). */
#define TILED_MIN_TOKENS 96 /* fewer tokens (decode, short prompts): the VNNI kernels, faster there (bench/moe_cpu.py: even at 64) */
#define TILE_PAIRS 16

/* The pair tiles of a layer: tile i holds pairs start[i] .. start[i]+count[i]-1 (one group's), first[g] is group g's
 * first tile; x [tiles, nb, 512] and d [tiles, nb, 16] the second operand and its scales, for one projection. */
typedef struct {
    int64_t tiles, *start, *first;
    int *count;
    int8_t *x;
    float *d;
} PairTiles;

/* Tile i of activations q (pair layout, K = 32*nb a row; pair p reads row row_of[p], or p when NULL). */
static void fill_pair_tile(const PairTiles *pt, int64_t i, const int8_t *q, const float *dq, const int64_t *row_of, int nb) {
    int8_t *x = pt->x + i * nb * 512;
    float *d = pt->d + i * nb * TILE_PAIRS;
    for (int j = 0; j < TILE_PAIRS; j++) {
        const int64_t p = pt->start[i] + j, r = j < pt->count[i] ? (row_of ? row_of[p] : p) : -1;
        const int8_t *row = r >= 0 ? q + r * (int64_t)nb * QK : NULL;
        for (int b = 0; b < nb; b++) {
            d[b * TILE_PAIRS + j] = row ? dq[r * nb + b] : 0.0f;
            for (int g = 0; g < 8; g++) {
                int8_t *to = x + b * 512 + 64 * g + 4 * j;
                if (row) memcpy(to, row + (g < 4 ? evens_at(b) + 4 * g : odds_at(b, nb) + 4 * (g - 4)), 4);
                else memset(to, 0, 4);
            }
        }
    }
}

/* Rows o..o+15 of one expert's packed projection (nb blocks a row): w [nb, 16, 32] signed int8 (E2M1 x 2, evens then
 * odds), sw [nb, 16] = 2^(s-128) (the 1/2 of the doubled values included). */
static void decode_rows16(const uint8_t *blocks, const uint8_t *scales, int nb, int8_t *w, float *sw) {
    const __m256i lut = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)E2M1_X2));
    const __m256i mask = _mm256_set1_epi8(0x0F);
    for (int r = 0; r < 16; r++)
        for (int b = 0; b < nb; b++) {
            _mm256_storeu_si256((__m256i *)(w + b * 512 + 32 * r), decode_block(blocks + ((size_t)r * nb + b) * 16, lut, mask));
            sw[b * 16 + r] = POW2[scales[(size_t)r * nb + b]];
        }
}

/* Per-thread buffers of the tiled layer, grown on demand. */
typedef struct {
    int8_t *w;
    float *sw, *h;
    int64_t h_pairs;
} TiledScratch;

static int tiled_scratch(TiledScratch *t, int nb_max, int64_t pairs) {
    if (!t->w) t->w = aligned_alloc(64, (size_t)nb_max * 512);
    if (!t->sw) t->sw = malloc((size_t)nb_max * 16 * sizeof(float));
    if (pairs > t->h_pairs) {
        free(t->h);
        t->h = malloc((size_t)pairs * TILE_1 * sizeof(float));
        t->h_pairs = t->h ? pairs : 0;
    }
    return t->w && t->sw && t->h;
}

AMX_BEGIN
/* mlp1 rows tile*64 .. +63 of group g's expert for all its pairs (tiles), + bias, SwiGLU, quantised: as mlp1_tile. */
static void mlp1_tiled(const Layer *L, const PairTiles *pt, int g, int tile, TiledScratch *t) {
    const int nb = L->H / QK, O = 2 * L->I, o_begin = tile * TILE_1;
    const int64_t e = L->experts[g], pairs = L->offsets[g + 1] - L->offsets[g];
    const size_t at = (size_t)e * O * nb;
    float out[256] __attribute__((aligned(64)));
    for (int sub = 0; sub < TILE_1 / 16; sub++) {
        const size_t row0 = at + (size_t)(o_begin + 16 * sub) * nb;
        decode_rows16(L->blocks1 + 16 * row0, L->scales1 + row0, nb, t->w, t->sw);
        for (int64_t i = pt->first[g]; i < pt->first[g + 1]; i++) {
            __m512 acc[16];
            amx_dot_blocks(t->w, 512, 32, pt->x + i * nb * 512, pt->d + i * nb * TILE_PAIRS, t->sw, nb, acc);
            for (int r = 0; r < 16; r++) _mm512_store_ps(out + 16 * r, acc[r]);
            const int64_t local = pt->start[i] - L->offsets[g];
            for (int j = 0; j < pt->count[i]; j++)
                for (int r = 0; r < 16; r++) t->h[(local + j) * TILE_1 + 16 * sub + r] = out[16 * r + j];
        }
    }
    const float *bias = L->bias1 + e * O + o_begin;
    for (int64_t local = 0; local < pairs; local++) {
        const float *ht = t->h + local * TILE_1;
        float act[QK];
        swiglu_block(ht, bias, L->limit, act);
        const int64_t p = L->offsets[g] + local;
        quantize_block(act, L->hq + p * L->I, tile, L->I / QK, L->hd + p * (L->I / QK) + tile, L->hs + p * (L->I / QK) + tile);
    }
}

/* mlp2 rows of one output tile for every group, added into the tokens' outputs: as mlp2_tile. */
static void mlp2_tiled(const Layer *L, const PairTiles *pt, int G, int tile, TiledScratch *t) {
    const int nb = L->I / QK, H = L->H, o_begin = tile * TILE_O;
    const int o_end = o_begin + TILE_O < H ? o_begin + TILE_O : H;
    float out[256] __attribute__((aligned(64)));
    for (int g = 0; g < G; g++) {
        const int64_t e = L->experts[g];
        const float *bias = L->bias2 + e * H;
        for (int o0 = o_begin; o0 < o_end; o0 += 16) {
            const size_t row0 = ((size_t)e * H + o0) * nb;
            decode_rows16(L->blocks2 + 16 * row0, L->scales2 + row0, nb, t->w, t->sw);
            for (int64_t i = pt->first[g]; i < pt->first[g + 1]; i++) {
                __m512 acc[16];
                amx_dot_blocks(t->w, 512, 32, pt->x + i * nb * 512, pt->d + i * nb * TILE_PAIRS, t->sw, nb, acc);
                for (int r = 0; r < 16; r++) _mm512_store_ps(out + 16 * r, acc[r]);
                for (int j = 0; j < pt->count[i]; j++) {
                    const int64_t p = pt->start[i] + j;
                    float *y = L->out + L->pair_token[p] * H + o0;
                    const float weight = L->topw[L->pair_slot[p]];
                    for (int r = 0; r < 16; r++) y[r] += weight * (out[16 * r + j] + bias[o0 + r]);
                }
            }
        }
    }
}

/* The layer of moe_q8_layer on tiles (pairs already grouped; x quantised into L->xq by the caller's region). */
static int moe_layer_tiled(const Layer *L, const float *x, int G, int threads) {
    const int nb1 = L->H / QK, nb2 = L->I / QK, nb_max = nb1 > nb2 ? nb1 : nb2;
    const int64_t P = L->offsets[G];
    PairTiles pt = {0};
    pt.first = malloc((size_t)(G + 1) * sizeof(int64_t));
    int64_t tiles = 0;
    for (int g = 0; g < G; g++) tiles += (L->offsets[g + 1] - L->offsets[g] + TILE_PAIRS - 1) / TILE_PAIRS;
    pt.tiles = tiles;
    pt.start = malloc((size_t)tiles * sizeof(int64_t));
    pt.count = malloc((size_t)tiles * sizeof(int));
    pt.x = aligned_alloc(64, (size_t)tiles * nb_max * 512);
    pt.d = malloc((size_t)tiles * nb_max * TILE_PAIRS * sizeof(float));
    int failed = !pt.first || !pt.start || !pt.count || !pt.x || !pt.d;
    if (!failed) {
        int64_t i = 0;
        for (int g = 0; g < G; g++) {
            pt.first[g] = i;
            for (int64_t p = L->offsets[g]; p < L->offsets[g + 1]; p += TILE_PAIRS, i++) {
                pt.start[i] = p;
                pt.count[i] = (int)(L->offsets[g + 1] - p < TILE_PAIRS ? L->offsets[g + 1] - p : TILE_PAIRS);
            }
        }
        pt.first[G] = i;
    }
    const int tiles1 = 2 * L->I / TILE_1, tiles2 = (L->H + TILE_O - 1) / TILE_O;
    if (!failed) {
        #pragma omp parallel num_threads(threads > 0 ? threads : 1)
        {
            amx_thread_begin();
            TiledScratch t = {0};
            int64_t most = 0;
            for (int g = 0; g < G; g++) most = L->offsets[g + 1] - L->offsets[g] > most ? L->offsets[g + 1] - L->offsets[g] : most;
            const int ok = tiled_scratch(&t, nb_max, most);
            if (!ok) {
                #pragma omp atomic write
                failed = 1;
            }
            #pragma omp for schedule(static)
            for (int64_t r = 0; r < L->T; r++) {
                quantize_row(x + r * L->H, L->H, L->xq + r * L->H, L->xd + r * nb1, L->xs + r * nb1);
                for (int o = 0; o < L->H; o++) L->out[r * L->H + o] = 0.0f;
            }
            #pragma omp for schedule(static)
            for (int64_t i = 0; i < pt.tiles; i++) fill_pair_tile(&pt, i, L->xq, L->xd, L->pair_token, nb1);
            #pragma omp for collapse(2) schedule(dynamic, 1)
            for (int g = 0; g < G; g++)
                for (int tile = 0; tile < tiles1; tile++)
                    if (ok) mlp1_tiled(L, &pt, g, tile, &t);
            #pragma omp for schedule(static)
            for (int64_t i = 0; i < pt.tiles; i++) fill_pair_tile(&pt, i, L->hq, L->hd, NULL, nb2);
            #pragma omp for schedule(dynamic, 1)
            for (int tile = 0; tile < tiles2; tile++)
                if (ok) mlp2_tiled(L, &pt, G, tile, &t);
            free(t.w);
            free(t.sw);
            free(t.h);
            amx_thread_end();
        }
    }
    (void)P;
    free(pt.first);
    free(pt.start);
    free(pt.count);
    free(pt.x);
    free(pt.d);
    return failed ? -3 : 0;
}
AMX_END
#endif

/* 1 when a prompt's layer takes the AMX tiles now (see amx_cpu.h), else 0. */
int moe_q8_amx_active(void) {
#if defined(OSSRUN_AMX)
    return amx_on();
#else
    return 0;
#endif
}

/* The routed experts of one MoE layer in one call: out[T, H] = Σ_j topw[t, j] * mlp2(swiglu(mlp1(x[t])))
 * over each token's k experts topk[t, j]. mlp1: blocks1 [E, 2I, H/32, 16], bias1 [E, 2I]; mlp2: blocks2
 * [E, H, I/32, 16], bias2 [E, H]. Scratch (the caller's, reused across steps): xq [T, H], xd and xs [T, H/32],
 * hq [T*k, I], hd and hs [T*k, I/32], route [2*T*k + 2*E + 1]. `threads`: the OpenMP team (the caller
 * passes torch's thread count: OpenMP's own default is per calling thread, and the engine runs on its own). Returns 0, -1 for sizes that are not blocks,
 * -2 for an expert id outside 0..E-1, -3 when the tiled path cannot allocate its buffers. */
int moe_q8_layer(const float *x, int64_t T, int H, int I, const int64_t *topk, const float *topw, int k, int E,
                 const uint8_t *blocks1, const uint8_t *scales1, const float *bias1,
                 const uint8_t *blocks2, const uint8_t *scales2, const float *bias2, float limit,
                 int8_t *xq, float *xd, int32_t *xs, int8_t *hq, float *hd, int32_t *hs, int64_t *route, float *out,
                 int threads) {
    if (H % QK || I % QK) return -1;
    int64_t *offsets = route, *experts = route + E + 1, *pair_token = route + 2 * E + 1, *pair_slot = pair_token + T * k;
    const int G = group_pairs(topk, T, k, E, offsets, experts, pair_token, pair_slot);
    if (G < 0) return -2;
    const Layer L = {T, H, I, pair_token, pair_slot, topw, offsets, experts, blocks1, scales1, blocks2, scales2,
                     bias1, bias2, limit, xq, hq, xd, hd, xs, hs, out};
#if defined(OSSRUN_AMX)
    if (T >= TILED_MIN_TOKENS && amx_on()) return moe_layer_tiled(&L, x, G, threads);
#endif
    const int tiles1 = 2 * I / TILE_1, tiles2 = (H + TILE_O - 1) / TILE_O;
    #pragma omp parallel num_threads(threads > 0 ? threads : 1)
    {
        #pragma omp for schedule(static)
        for (int64_t r = 0; r < T; r++) {
            quantize_row(x + r * H, H, xq + r * H, xd + r * (H / QK), xs + r * (H / QK));
            for (int o = 0; o < H; o++) out[r * H + o] = 0.0f;
        }
        #pragma omp for collapse(2) schedule(dynamic, 1)
        for (int g = 0; g < G; g++)
            for (int tile = 0; tile < tiles1; tile++) mlp1_tile(&L, g, tile);
        #pragma omp for schedule(dynamic, 1)
        for (int tile = 0; tile < tiles2; tile++) mlp2_tile(&L, G, tile);
    }
    return 0;
}
