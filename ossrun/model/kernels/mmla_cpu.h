/* Arm's int8 matrix multiply (i8mm's smmla) for the kernels' many-row products: the operand layout both use.
 *
 * smmla multiplies a 2 x 8 int8 matrix by the transpose of another: four int32 sums (row r of the first times row c
 * of the second, in lanes (0,0) (0,1) (1,0) (1,1)), 32 products an instruction, twice sdot's. A block's 32 values
 * are four chunks of 8, and two rows' chunk k side by side is one operand: a block of a pair of rows is 64 bytes, four
 * operands, laid out once so that every product's operands are plain loads. Built into the i8mm variant only.
 */
#ifndef OSSRUN_MMLA_CPU_H
#define OSSRUN_MMLA_CPU_H

#if defined(__ARM_FEATURE_MATMUL_INT8)
#include <arm_neon.h>
#include <stdint.h>

/* Two rows' block (each as two 16-value halves, a and b: chunks 0-1 and 2-3) as four smmla operands at dst. */
static inline void mm_interleave(int8x16_t a0, int8x16_t b0, int8x16_t a1, int8x16_t b1, int8_t *dst) {
    const int64x2_t la0 = vreinterpretq_s64_s8(a0), la1 = vreinterpretq_s64_s8(a1);
    const int64x2_t lb0 = vreinterpretq_s64_s8(b0), lb1 = vreinterpretq_s64_s8(b1);
    vst1q_s8(dst, vreinterpretq_s8_s64(vzip1q_s64(la0, la1)));
    vst1q_s8(dst + 16, vreinterpretq_s8_s64(vzip2q_s64(la0, la1)));
    vst1q_s8(dst + 32, vreinterpretq_s8_s64(vzip1q_s64(lb0, lb1)));
    vst1q_s8(dst + 48, vreinterpretq_s8_s64(vzip2q_s64(lb0, lb1)));
}

/* A 2 x 2 tile's sums over one block: four smmla over the four operands of each side. */
static inline int32x4_t mm_block(const int8_t *w, const int8_t *x) {
    int32x4_t acc = vmmlaq_s32(vdupq_n_s32(0), vld1q_s8(w), vld1q_s8(x));
    acc = vmmlaq_s32(acc, vld1q_s8(w + 16), vld1q_s8(x + 16));
    acc = vmmlaq_s32(acc, vld1q_s8(w + 32), vld1q_s8(x + 32));
    return vmmlaq_s32(acc, vld1q_s8(w + 48), vld1q_s8(x + 48));
}
#endif

#endif
