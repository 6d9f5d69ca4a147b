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
 * Instead of interleaving the decoded nibbles, the activations are stored permuted within each
 * block (the 16 even elements, then the 16 odd ones), so the low nibbles decode straight into the
 * first 16 lanes and the high nibbles into the last 16. The permutation is done once per row, at
 * quantisation, and costs nothing per weight.
 *
 * Code paths: AVX2 (maddubs/madd with the sign trick: |w| times q carrying w's sign), AVX-512 VNNI
 * (dpbusd on 256-bit lanes, same data flow), and portable C. Parallel work items are (expert group,
 * output tile), so a step with a few rows per expert still keeps every core busy.
 */
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <math.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

#define QK 32      /* values per block, for the weights and the activations alike */
#define NR 8       /* activation rows that share one decode of a weight block (a chunk) */
#define TILE_O 16  /* output rows per work item of a plain projection */
#define TILE_1 64  /* mlp1 rows per work item: 64 interleaved glu/linear rows = 32 SwiGLU outputs = one block */

static const int8_t E2M1_X2[16] = {0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12};
static float POW2[256]; /* POW2[s] = 2^(s-128) */

__attribute__((constructor)) static void init_pow2(void) {
    for (int s = 0; s < 256; s++) POW2[s] = ldexpf(1.0f, s - 128);
}

/* One activation row as the kernels see it: K int8 (blocks permuted), K/32 scales and K/32 block sums Σq
 * (the row-group kernel takes its +12 weight offset back as 12·Σq). */
typedef struct {
    const int8_t *q;
    const float *d;
    const int32_t *s;
} Row;

/* Up to NR rows that go through the same weight rows together. dx4 [NR/4][nb][4]: the scales of each
 * full group of 4 rows side by side, so the 4-row kernel scales 4 rows' sums with one vector multiply. */
typedef struct {
    Row rows[NR];
    int n;
    float *dx4;
} Chunk;

/* ---------------------------------------------------------------- activation quantisation */

/* Round to nearest, ties to even (as torch.round), in every build: the tests compare bit for bit. */
static inline void quantize_block(const float *x, int8_t *q, float *d, int32_t *s) {
    float amax = 0.0f;
    for (int j = 0; j < QK; j++) amax = fmaxf(amax, fabsf(x[j]));
    float id = amax > 0.0f ? 127.0f / amax : 0.0f;
    *d = amax / 127.0f;
    for (int j = 0; j < QK / 2; j++) {
        q[j] = (int8_t)nearbyintf(x[2 * j] * id);
        q[QK / 2 + j] = (int8_t)nearbyintf(x[2 * j + 1] * id);
    }
    int32_t sum = 0;
    for (int j = 0; j < QK; j++) sum += q[j];
    *s = sum;
}

static void quantize_row(const float *x, int K, int8_t *q, float *d, int32_t *s) {
    for (int b = 0; b < K / QK; b++) quantize_block(x + b * QK, q + b * QK, d + b, s + b);
}

/* ---------------------------------------------------------------- one output row, up to NR activation rows */

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

/* Σ w*q in 8 int32 lanes: |w| (unsigned) times q with w's sign moved onto it. |w| ≤ 12, |q| ≤ 127, so
 * the int16 pair sums of maddubs (≤ 2*12*127) never saturate. */
static inline __m256i dot_block(__m256i w_abs, __m256i w, __m256i q) {
    __m256i q_signed = _mm256_sign_epi8(q, w);
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), w_abs, q_signed);
#else
    return _mm256_madd_epi16(_mm256_maddubs_epi16(w_abs, q_signed), _mm256_set1_epi16(1));
#endif
}

/* Two accumulators per row (even and odd blocks) break the fma latency chain when n is 1. */
static inline __attribute__((always_inline)) void dot_rows(const uint8_t *blk, const uint8_t *sc, int nb,
                                                           const Row *rows, const int n, float *out) {
    const __m256i lut = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)E2M1_X2));
    const __m256i mask = _mm256_set1_epi8(0x0F);
    __m256 acc0[4], acc1[4];
    for (int t = 0; t < n; t++) acc0[t] = acc1[t] = _mm256_setzero_ps();
    int b = 0;
    for (; b + 1 < nb; b += 2) {
        __m256i w0 = decode_block(blk + 16 * b, lut, mask), w1 = decode_block(blk + 16 * b + 16, lut, mask);
        __m256i a0 = _mm256_abs_epi8(w0), a1 = _mm256_abs_epi8(w1);
        float p0 = POW2[sc[b]], p1 = POW2[sc[b + 1]];
        for (int t = 0; t < n; t++) {
            __m256i q0 = _mm256_loadu_si256((const __m256i *)(rows[t].q + QK * b));
            __m256i q1 = _mm256_loadu_si256((const __m256i *)(rows[t].q + QK * b + QK));
            acc0[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_block(a0, w0, q0)), _mm256_set1_ps(rows[t].d[b] * p0), acc0[t]);
            acc1[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_block(a1, w1, q1)), _mm256_set1_ps(rows[t].d[b + 1] * p1), acc1[t]);
        }
    }
    if (b < nb) {
        __m256i w0 = decode_block(blk + 16 * b, lut, mask), a0 = _mm256_abs_epi8(w0);
        float p0 = POW2[sc[b]];
        for (int t = 0; t < n; t++) {
            __m256i q0 = _mm256_loadu_si256((const __m256i *)(rows[t].q + QK * b));
            acc0[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_block(a0, w0, q0)), _mm256_set1_ps(rows[t].d[b] * p0), acc0[t]);
        }
    }
    for (int t = 0; t < n; t++) out[t] = hsum(_mm256_add_ps(acc0[t], acc1[t]));
}

/* Prefill: one weight row against `groups` groups of 4 rows, each block decoded once for all of them.
 * The 4 rows' 16-bit pair sums are folded by two horizontal adds into one vector (rows 0-3 in each
 * 128-bit half), so the int32 widening, the conversion and the scaling happen once per 4 rows.
 * |maddubs lanes| ≤ 2*12*127 = 3048, so the 4-lane sums of the two hadds (≤ 12192) stay in int16. */
static inline __attribute__((always_inline)) void dot4x(const uint8_t *blk, const uint8_t *sc, int nb, const Row *rows,
                                                        const float *dx4, const int groups, float *out) {
    const __m256i lut = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)E2M1_X2));
    const __m256i mask = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
    __m256 acc[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int b = 0; b < nb; b++) {
        __m256i w = decode_block(blk + 16 * b, lut, mask), a = _mm256_abs_epi8(w);
        __m256 pw = _mm256_set1_ps(POW2[sc[b]]);
        for (int g = 0; g < groups; g++) {
            const Row *r = rows + 4 * g;
            __m256i m[4];
            for (int t = 0; t < 4; t++)
                m[t] = _mm256_maddubs_epi16(a, _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)(r[t].q + QK * b)), w));
            __m256i h = _mm256_hadd_epi16(_mm256_hadd_epi16(m[0], m[1]), _mm256_hadd_epi16(m[2], m[3]));
            __m256 scale = _mm256_mul_ps(_mm256_broadcast_ps((const __m128 *)(dx4 + ((size_t)g * nb + b) * 4)), pw);
            acc[g] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(h, ones)), scale, acc[g]);
        }
    }
    for (int g = 0; g < groups; g++)
        _mm_storeu_ps(out + 4 * g, _mm_add_ps(_mm256_castps256_ps128(acc[g]), _mm256_extractf128_ps(acc[g], 1)));
}

static void decode_blocks(const uint8_t *blocks, int64_t n, int8_t *out) {
    const __m256i lut = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)E2M1_X2));
    const __m256i mask = _mm256_set1_epi8(0x0F);
    for (int64_t b = 0; b < n; b++)
        _mm256_storeu_si256((__m256i *)(out + QK * b), decode_block(blocks + 16 * b, lut, mask));
}
#else
static inline void decode_block(const uint8_t *p, int8_t *w) {
    for (int j = 0; j < QK / 2; j++) {
        w[j] = E2M1_X2[p[j] & 0x0F];
        w[QK / 2 + j] = E2M1_X2[p[j] >> 4];
    }
}

static inline __attribute__((always_inline)) void dot_rows(const uint8_t *blk, const uint8_t *sc, int nb,
                                                           const Row *rows, const int n, float *out) {
    float acc[NR] = {0};
    int8_t w[QK];
    for (int b = 0; b < nb; b++) {
        decode_block(blk + 16 * b, w);
        float p = POW2[sc[b]];
        for (int t = 0; t < n; t++) {
            const int8_t *q = rows[t].q + QK * b;
            int32_t s = 0;
            for (int j = 0; j < QK; j++) s += (int32_t)w[j] * q[j];
            acc[t] += (float)s * (rows[t].d[b] * p);
        }
    }
    for (int t = 0; t < n; t++) out[t] = acc[t];
}

static void decode_blocks(const uint8_t *blocks, int64_t n, int8_t *out) {
    for (int64_t b = 0; b < n; b++) decode_block(blocks + 16 * b, out + QK * b);
}
#endif

/* n is a compile-time constant in each case, so every loop over rows is unrolled into registers. */
static void dot_rows_n(const uint8_t *blk, const uint8_t *sc, int nb, const Row *rows, int n, float *out) {
    switch (n) {
    case 1: dot_rows(blk, sc, nb, rows, 1, out); break;
    case 2: dot_rows(blk, sc, nb, rows, 2, out); break;
    case 3: dot_rows(blk, sc, nb, rows, 3, out); break;
    default: dot_rows(blk, sc, nb, rows, 4, out); break;
    }
}

/* Gather the scales of each full group of 4 rows (see Chunk); nothing to do for the portable build. */
static void chunk_prepare(Chunk *c, int nb) {
#ifdef __AVX2__
    for (int g = 0; g < c->n / 4; g++)
        for (int b = 0; b < nb; b++)
            for (int t = 0; t < 4; t++) c->dx4[((size_t)g * nb + b) * 4 + t] = c->rows[4 * g + t].d[b];
#else
    (void)c, (void)nb;
#endif
}

/* One weight row against every row of a chunk: out[t] for t < c->n. */
static void dot_chunk(const uint8_t *blk, const uint8_t *sc, int nb, const Chunk *c, float *out) {
    int t = 0;
#ifdef __AVX2__
    if (c->n >= 8) dot4x(blk, sc, nb, c->rows, c->dx4, 2, out), t = 8;
    else if (c->n >= 4) dot4x(blk, sc, nb, c->rows, c->dx4, 1, out), t = 4;
#endif
    for (; t < c->n; t += 4) dot_rows_n(blk, sc, nb, c->rows + t, c->n - t < 4 ? c->n - t : 4, out + t);
}

/* ---------------------------------------------------------------- exported entry points */

/* x [rows, K] fp32 → q [rows, K] int8 (blocks permuted: evens then odds), d [rows, K/32], s [rows, K/32] = Σq. */
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

/* Rows start .. min(end, start+NR)-1 as a chunk; row p reads activation row row_of[p] (p when NULL). */
static void chunk_load(Chunk *c, const int8_t *q, const float *d, const int32_t *s, int K, const int64_t *row_of, int64_t start,
                       int64_t end) {
    c->n = end - start < NR ? (int)(end - start) : NR;
    for (int t = 0; t < c->n; t++) c->rows[t] = row_at(q, d, s, K, row_of ? row_of[start + t] : start + t);
    chunk_prepare(c, K / QK);
}

/* ---------------------------------------------------------------- prefill: 8 weight rows in the 8 lanes */

#define SPAN 32      /* activation rows handled together by one work item */
#define RG 8         /* weight rows of a row group: one per int32 lane */
#define RG_MIN_ROWS 5 /* a span this long takes the row-group kernel; shorter ones (decode) the per-row kernels */

#ifdef __AVX2__
/* E2M1 x 2 + 12: unsigned, so it can be the unsigned operand of maddubs/dpbusd; the +12 is taken back
 * once per block as 12 * (sum of the block's activations). */
static const uint8_t E2M1_X2_PLUS12[16] = {12, 13, 14, 15, 16, 18, 20, 24, 12, 11, 10, 9, 8, 6, 4, 0};

/* Block b of rows 0..7 (row r at blk + r*stride) in the row-group layout: w[g] holds in int32 lane r row r's
 * four weights (+12) that meet activation bytes 4g..4g+3 of the block (the kernels' evens-then-odds order).
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
static inline __attribute__((always_inline)) __m256i rowgroup_block(const __m256i w[8], const int8_t *q, int32_t sq12) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    __m256i acc = _mm256_set1_epi32(-sq12);
    for (int g = 0; g < 8; g++) acc = _mm256_dpbusd_epi32(acc, w[g], broadcast4(q + 4 * g));
    return acc;
#else
    __m256i half[2];
    for (int h = 0; h < 2; h++) {
        const __m256i *wh = w + 4 * h;
        const int8_t *qh = q + 16 * h;
        __m256i s01 = _mm256_add_epi16(_mm256_maddubs_epi16(wh[0], broadcast4(qh)), _mm256_maddubs_epi16(wh[1], broadcast4(qh + 4)));
        __m256i s23 = _mm256_add_epi16(_mm256_maddubs_epi16(wh[2], broadcast4(qh + 8)), _mm256_maddubs_epi16(wh[3], broadcast4(qh + 12)));
        half[h] = _mm256_madd_epi16(_mm256_add_epi16(s01, s23), _mm256_set1_epi16(1));
    }
    return _mm256_sub_epi32(_mm256_add_epi32(half[0], half[1]), _mm256_set1_epi32(sq12));
#endif
}

static inline __attribute__((always_inline)) __m256i rowgroup_block_at(const uint8_t *w, const int8_t *q, int32_t sq12) {
    __m256i v[8];
    for (int g = 0; g < 8; g++) v[g] = _mm256_loadu_si256((const __m256i *)(w + 32 * g));
    return rowgroup_block(v, q, sq12);
}

/* 8 prepared weight rows against n activation rows: res[t*ld + r]. Two rows at a time share the loads. */
static void rowgroup_rows(const uint8_t *w, const float *pw, int nb, const Row *rows, int n, float *res, int ld) {
    int t = 0;
    for (; t + 1 < n; t += 2) {
        __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
        for (int b = 0; b < nb; b++) {
            const __m256 scale = _mm256_loadu_ps(pw + 8 * b);
            const __m256i d0 = rowgroup_block_at(w + 256 * b, rows[t].q + QK * b, 12 * rows[t].s[b]);
            const __m256i d1 = rowgroup_block_at(w + 256 * b, rows[t + 1].q + QK * b, 12 * rows[t + 1].s[b]);
            acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d0), _mm256_mul_ps(scale, _mm256_set1_ps(rows[t].d[b])), acc0);
            acc1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d1), _mm256_mul_ps(scale, _mm256_set1_ps(rows[t + 1].d[b])), acc1);
        }
        _mm256_storeu_ps(res + t * ld, acc0);
        _mm256_storeu_ps(res + (t + 1) * ld, acc1);
    }
    if (t < n) {
        __m256 acc = _mm256_setzero_ps();
        for (int b = 0; b < nb; b++) {
            const __m256i d0 = rowgroup_block_at(w + 256 * b, rows[t].q + QK * b, 12 * rows[t].s[b]);
            acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d0), _mm256_mul_ps(_mm256_loadu_ps(pw + 8 * b), _mm256_set1_ps(rows[t].d[b])), acc);
        }
        _mm256_storeu_ps(res + t * ld, acc);
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
        uint8_t w[256 * nb];
        for (; o + RG <= o_end; o += RG) {
            rowgroup_scales(scales + (size_t)o * nb, nb, pw);
            prepare_rowgroup(blocks + (size_t)o * nb * 16, nb, w);
            rowgroup_rows(w, pw, nb, rows, n, res + (o - o_begin), ld);
        }
    }
#endif
    if (o == o_end) return;
    float dx4[NR * nb];
    Chunk c = {.dx4 = dx4};
    for (int64_t at = start; at < start + n; at += NR) {
        chunk_load(&c, q, d, s, K, row_of, at, start + n);
        for (int oo = o; oo < o_end; oo++) {
            float out[NR];
            dot_chunk(blocks + (size_t)oo * nb * 16, scales + (size_t)oo * nb, nb, &c, out);
            for (int t = 0; t < c.n; t++) res[(at - start + t) * ld + oo - o_begin] = out[t];
        }
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
            for (int i = 0; i < QK; i++) act[i] = swiglu(ht[2 * i] + bias[2 * i], ht[2 * i + 1] + bias[2 * i + 1], L->limit);
            const int64_t p = start + t;
            quantize_block(act, L->hq + p * L->I + tile * QK, L->hd + p * (L->I / QK) + tile, L->hs + p * (L->I / QK) + tile);
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

/* The routed experts of one MoE layer in one call: out[T, H] = Σ_j topw[t, j] * mlp2(swiglu(mlp1(x[t])))
 * over each token's k experts topk[t, j]. mlp1: blocks1 [E, 2I, H/32, 16], bias1 [E, 2I]; mlp2: blocks2
 * [E, H, I/32, 16], bias2 [E, H]. Scratch (the caller's, reused across steps): xq [T, H], xd and xs [T, H/32],
 * hq [T*k, I], hd and hs [T*k, I/32], route [2*T*k + 2*E + 1]. `threads`: the OpenMP team (the caller
 * passes torch's thread count: OpenMP's own default is per calling thread, and the engine runs on its own). Returns 0, -1 for sizes that are not blocks,
 * -2 for an expert id outside 0..E-1. */
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
