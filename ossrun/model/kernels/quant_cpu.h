/* What the two activation quantisers (q8_cpu.c's dense one, moe_q8_cpu.c's) share, in every variant: how a block's
 * scale and its inverse treat the values a plain amax/127 gets wrong. */
#ifndef OSSRUN_QUANT_CPU_H
#define OSSRUN_QUANT_CPU_H

#include <float.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

/* The block's scale, or NaN where one of its 32 values is NaN or ±inf. The max ignores NaN and the int8 conversion
 * saturates inf, so such a block became plausible numbers: a broken row's q/k/v went finite into the KV cache and every
 * later row with them, where an unquantised product is NaN and the engine ends the request. A NaN scale makes every
 * product of the row NaN as well. Largest |x| by its bits (NaN and inf have all exponent bits set): one integer max
 * the compiler vectorises, cheap next to the row's products. */
static inline float scale_or_nan(const float *x, float scale) {
    uint32_t top = 0;
    for (int j = 0; j < 32; j++) {
        uint32_t bits;
        memcpy(&bits, x + j, sizeof bits);
        bits &= 0x7fffffffu;
        top = bits > top ? bits : top;
    }
    return top >= 0x7f800000u ? NAN : scale;
}

/* An inverse scale that is not finite (an all-zero block; a block whose largest |x| is below ~3.7e-37, whose
 * inverse overflows; a NaN or inf block) becomes 0, so the block quantises to 0 on every variant: x·inf converted
 * to int8 gave -128, outside the documented [-127, 127], where the portable build gave 0. */
static inline float finite_or_zero(float inverse) { return inverse <= FLT_MAX ? inverse : 0.0f; }

#endif
