/* Fused MXFP4 matrix product for the CPU: y[t, o] = sum_k x[t, k] * W[o, k] + bias[o].
 *
 * W stays packed (16 bytes of E2M1 pairs + one E8M0 scale per 32 weights); each block is decoded
 * in registers and used at once, so the 4.25-bit weights are the only weight bytes read. E2M1
 * values times 2 are the integers {0,1,2,3,4,6,8,12} (signed): a byte shuffle decodes 16 nibbles
 * at a time and the block's scale 2^(s-128) is applied once per block. Powers of two commute
 * exactly with the products, so this equals dequantise-then-multiply up to summation order.
 */
#include <stdint.h>
#include <string.h>
#include <math.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

#define MAX_T 16

static const int8_t E2M1_X2[16] = {0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12};

static inline float block_scale(uint8_t s) { return ldexpf(1.0f, (int)s - 128); }

#ifdef __AVX2__
static inline float hsum(__m256 v) {
    __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
    lo = _mm_add_ps(lo, hi);
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    lo = _mm_add_ss(lo, _mm_shuffle_ps(lo, lo, 1));
    return _mm_cvtss_f32(lo);
}

static void row(const float *x, int T, int K, const uint8_t *blocks, const uint8_t *scales, float *out) {
    const __m128i lut = _mm_loadu_si128((const __m128i *)E2M1_X2);
    const __m128i low_mask = _mm_set1_epi8(0x0F);
    __m256 acc[MAX_T];
    for (int t = 0; t < T; t++) acc[t] = _mm256_setzero_ps();
    int nb = K / 32;
    for (int b = 0; b < nb; b++) {
        __m128i bytes = _mm_loadu_si128((const __m128i *)(blocks + 16 * b));
        __m128i lo = _mm_and_si128(bytes, low_mask);
        __m128i hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), low_mask);
        __m128i v0 = _mm_shuffle_epi8(lut, _mm_unpacklo_epi8(lo, hi)); /* elements 0..15 */
        __m128i v1 = _mm_shuffle_epi8(lut, _mm_unpackhi_epi8(lo, hi)); /* elements 16..31 */
        __m256 w0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v0));
        __m256 w1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(v0, 8)));
        __m256 w2 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v1));
        __m256 w3 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(v1, 8)));
        __m256 scale = _mm256_set1_ps(block_scale(scales[b]));
        for (int t = 0; t < T; t++) {
            const float *xb = x + (size_t)t * K + 32 * b;
            __m256 s = _mm256_mul_ps(w0, _mm256_loadu_ps(xb));
            s = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xb + 8), s);
            s = _mm256_fmadd_ps(w2, _mm256_loadu_ps(xb + 16), s);
            s = _mm256_fmadd_ps(w3, _mm256_loadu_ps(xb + 24), s);
            acc[t] = _mm256_fmadd_ps(s, scale, acc[t]);
        }
    }
    for (int t = 0; t < T; t++) out[t] = hsum(acc[t]);
}
#else
static void row(const float *x, int T, int K, const uint8_t *blocks, const uint8_t *scales, float *out) {
    float acc[MAX_T] = {0};
    float w[32];
    int nb = K / 32;
    for (int b = 0; b < nb; b++) {
        for (int j = 0; j < 16; j++) {
            uint8_t byte = blocks[16 * b + j];
            w[2 * j] = E2M1_X2[byte & 0x0F];
            w[2 * j + 1] = E2M1_X2[byte >> 4];
        }
        float scale = block_scale(scales[b]);
        for (int t = 0; t < T; t++) {
            const float *xb = x + (size_t)t * K + 32 * b;
            float s = 0.0f;
            for (int j = 0; j < 32; j++) s += w[j] * xb[j];
            acc[t] += s * scale;
        }
    }
    for (int t = 0; t < T; t++) out[t] = acc[t];
}
#endif

/* Many experts in one call (one MoE layer's step): rows are grouped by expert, group g covers
 * x rows offsets[g] .. offsets[g+1]-1 and uses expert experts[g]. Weights of all experts:
 * blocks [E, O, K/32, 16], scales [E, O, K/32], bias [E, O] fp32 (or NULL). y [P, O] fp32.
 * Work is split over (group, output row) pairs, so a step with few rows per expert still uses every core. */
int mxfp4_grouped_linear(const float *x, int K, const int64_t *offsets, const int64_t *experts, int G,
                         const uint8_t *blocks, const uint8_t *scales, int O, const float *bias, float *y) {
    if (K % 32) return -1;
    int nb = K / 32;
    size_t expert_blocks = (size_t)O * nb;
    #pragma omp parallel for collapse(2) schedule(static)
    for (int g = 0; g < G; g++) {
        for (int o = 0; o < O; o++) {
            int64_t e = experts[g];
            const uint8_t *row_blocks = blocks + (e * expert_blocks + (size_t)o * nb) * 16;
            const uint8_t *row_scales = scales + e * expert_blocks + (size_t)o * nb;
            float b = bias ? bias[e * O + o] : 0.0f;
            float out[MAX_T];
            for (int64_t start = offsets[g]; start < offsets[g + 1]; start += MAX_T) {
                int T = (int)(offsets[g + 1] - start < MAX_T ? offsets[g + 1] - start : MAX_T);
                row(x + start * K, T, K, row_blocks, row_scales, out);
                for (int t = 0; t < T; t++) y[(start + t) * O + o] = out[t] + b;
            }
        }
    }
    return 0;
}
