/* exp on 8 lanes (AVX2), 16 lanes (AVX-512) and 4 lanes (Arm NEON, in the dotprod variant): the kernels' one vector exp (attention's softmax, the MoE's SwiGLU).
 *
 * Cephes' expf: x = n ln2 + r (|r| <= ln2/2, ln2 split in two so n ln2 is exact), e^r by a degree-5 polynomial in r
 * plus 1 + r, times 2^n built in the exponent field; ~1 ulp on [-88, 88], inputs clamped there (so e^x is finite
 * and never subnormal: a caller that needs 0 or inf past the range gets 2^±127.5 instead, which it divides by).
 */
#ifndef OSSRUN_VEC_MATH_H
#define OSSRUN_VEC_MATH_H

#define VEC_EXP_HI 88.3762626647949f
#define VEC_EXP_C1 0.693359375f
#define VEC_EXP_C2 -2.12194440e-4f
#define VEC_EXP_P0 1.9875691500e-4f
#define VEC_EXP_P1 1.3981999507e-3f
#define VEC_EXP_P2 8.3334519073e-3f
#define VEC_EXP_P3 4.1665795894e-2f
#define VEC_EXP_P4 1.6666665459e-1f
#define VEC_EXP_P5 5.0000001201e-1f

#ifdef __AVX2__
#include <immintrin.h>

static inline __m256 exp8(__m256 x) {
    x = _mm256_min_ps(x, _mm256_set1_ps(VEC_EXP_HI));
    x = _mm256_max_ps(x, _mm256_set1_ps(-VEC_EXP_HI));
    __m256 n = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
    x = _mm256_fnmadd_ps(n, _mm256_set1_ps(VEC_EXP_C1), x);
    x = _mm256_fnmadd_ps(n, _mm256_set1_ps(VEC_EXP_C2), x);
    __m256 y = _mm256_set1_ps(VEC_EXP_P0);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(VEC_EXP_P1));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(VEC_EXP_P2));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(VEC_EXP_P3));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(VEC_EXP_P4));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(VEC_EXP_P5));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
    __m256i pow2 = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(pow2));
}
#endif

#ifdef __AVX512F__
/* exp8's arithmetic on 16 lanes, the same constants (the same value in every lane as exp8 gives). */
static inline __m512 exp16(__m512 x) {
    x = _mm512_min_ps(x, _mm512_set1_ps(VEC_EXP_HI));
    x = _mm512_max_ps(x, _mm512_set1_ps(-VEC_EXP_HI));
    __m512 n = _mm512_roundscale_ps(_mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341f), _mm512_set1_ps(0.5f)),
                                    _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    x = _mm512_fnmadd_ps(n, _mm512_set1_ps(VEC_EXP_C1), x);
    x = _mm512_fnmadd_ps(n, _mm512_set1_ps(VEC_EXP_C2), x);
    __m512 y = _mm512_set1_ps(VEC_EXP_P0);
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(VEC_EXP_P1));
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(VEC_EXP_P2));
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(VEC_EXP_P3));
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(VEC_EXP_P4));
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(VEC_EXP_P5));
    y = _mm512_fmadd_ps(y, _mm512_mul_ps(x, x), _mm512_add_ps(x, _mm512_set1_ps(1.0f)));
    __m512i pow2 = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
    return _mm512_mul_ps(y, _mm512_castsi512_ps(pow2));
}
#endif

#if defined(__ARM_FEATURE_DOTPROD)
#include <arm_neon.h>

/* exp8's arithmetic on 4 lanes (vrndm is floor; n is integral, so vcvt's truncation is exact). */
static inline float32x4_t exp4(float32x4_t x) {
    x = vminq_f32(x, vdupq_n_f32(VEC_EXP_HI));
    x = vmaxq_f32(x, vdupq_n_f32(-VEC_EXP_HI));
    const float32x4_t n = vrndmq_f32(vfmaq_f32(vdupq_n_f32(0.5f), x, vdupq_n_f32(1.44269504088896341f)));
    x = vfmsq_f32(x, n, vdupq_n_f32(VEC_EXP_C1));
    x = vfmsq_f32(x, n, vdupq_n_f32(VEC_EXP_C2));
    float32x4_t y = vdupq_n_f32(VEC_EXP_P0);
    y = vfmaq_f32(vdupq_n_f32(VEC_EXP_P1), y, x);
    y = vfmaq_f32(vdupq_n_f32(VEC_EXP_P2), y, x);
    y = vfmaq_f32(vdupq_n_f32(VEC_EXP_P3), y, x);
    y = vfmaq_f32(vdupq_n_f32(VEC_EXP_P4), y, x);
    y = vfmaq_f32(vdupq_n_f32(VEC_EXP_P5), y, x);
    y = vfmaq_f32(vaddq_f32(x, vdupq_n_f32(1.0f)), y, vmulq_f32(x, x));
    const int32x4_t pow2 = vshlq_n_s32(vaddq_s32(vcvtq_s32_f32(n), vdupq_n_s32(127)), 23);
    return vmulq_f32(y, vreinterpretq_f32_s32(pow2));
}
#endif

#endif
