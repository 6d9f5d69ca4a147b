/* Intel AMX (tile matrix multiply) for the kernels' many-row products, where the CPU has it and Linux lets us use it.
 *
 * A process must ask the kernel for the tile data state (arch_prctl ARCH_REQ_XCOMP_PERM) before its first tile
 * instruction; code that does not (llama.cpp's AMX kernels in some builds) dies of SIGILL on these VMs. So the
 * tile paths run only after `amx_on()` has asked and been granted; everywhere else the AVX-512 VNNI paths run.
 * OSSRUN_CPU_AMX=0 turns them off (read at every call, so tests can compare both paths in one process).
 *
 * Built into the avx512vnni and avx512bf16 variants with the compiler's AMX target enabled for the tile functions alone
 * (`AMX_BEGIN` .. `AMX_END`), so no other code of the variant can use an AMX instruction by accident.
 */
#ifndef OSSRUN_AMX_CPU_H
#define OSSRUN_AMX_CPU_H

#if defined(__AVX512VNNI__) && defined(__x86_64__) && defined(__linux__) && \
    ((defined(__clang__) && __clang_major__ >= 12) || (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 11))
#define OSSRUN_AMX 1
#include <cpuid.h>
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <unistd.h>

#define AMX_REQ_XCOMP_PERM 0x1023 /* arch_prctl: ask for an extended state component */
#define AMX_XTILEDATA 18          /* ... the tile data */

static int amx_permitted = -1; /* -1: not asked yet */

/* Whether the tile paths may run now: the CPU has AMX-TILE and AMX-INT8, the kernel granted the tile state, and
 * OSSRUN_CPU_AMX is not 0. The first call asks (call it outside parallel regions). */
static int amx_on(void) {
    const char *env = getenv("OSSRUN_CPU_AMX");
    if (env && env[0] == '0') return 0;
    if (amx_permitted < 0) {
        unsigned a, b, c, d;
        int ok = __get_cpuid_count(7, 0, &a, &b, &c, &d) && (d >> 24 & 1) && (d >> 25 & 1);
        amx_permitted = ok && syscall(SYS_arch_prctl, AMX_REQ_XCOMP_PERM, AMX_XTILEDATA) == 0;
    }
    return amx_permitted;
}

/* The 64-byte tile configuration (palette 1): rows and bytes a row of each tile register. */
typedef struct {
    uint8_t palette, start_row;
    uint8_t reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} TileConfig;

#if defined(__clang__)
#define AMX_BEGIN _Pragma("clang attribute push (__attribute__((target(\"amx-tile,amx-int8\"))), apply_to = function)")
#define AMX_END _Pragma("clang attribute pop")
#else
#define AMX_BEGIN _Pragma("GCC push_options") _Pragma("GCC target(\"amx-tile,amx-int8\")")
#define AMX_END _Pragma("GCC pop_options")
#endif

/* The tile registers' shapes, the same in every kernel: 0 and 3 int32 sums (16 x 16), 1 and 4 the first operand
 * (16 rows of one block's 32 int8), 2 and 5 the second (8 rows of 64 bytes: 4 bytes of each of 16 rows). */
static inline void amx_config_tiles(TileConfig *config) {
    *config = (TileConfig){0};
    config->palette = 1;
    for (int t = 0; t < 6; t++) {
        const int kind = t % 3;
        config->rows[t] = kind == 2 ? 8 : 16;
        config->colsb[t] = kind == 1 ? 32 : 64;
    }
}

/* The per-block scaling every tile product needs: acc[r] (lanes: the 16 rows of the second operand) += int32 sums
 * c (row r: the first operand's row r) times scale_x (lanes) times scale_w[r]. */
static inline __attribute__((always_inline)) void amx_scale_sums(const int32_t *c, __m512 scale_x, const float *scale_w, __m512 acc[16]) {
    for (int r = 0; r < 16; r++)
        acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_load_si512((const void *)(c + 16 * r))),
                                 _mm512_mul_ps(scale_x, _mm512_set1_ps(scale_w[r])), acc[r]);
}

AMX_BEGIN
/* acc[r] lane j = Σ_b (Σ_k A_b[r][k]·B_b[k][j]) · scale_x_b[j] · scale_w_b[r] over nb blocks of 32 k, signed int8 both:
 * A_b at a + b*a_step (16 rows, a_stride bytes apart), B_b at x + b*512 in the second operand's layout, scale_x_b at
 * sx + 16b, scale_w_b at sw + 16b. The tiles must be configured. A tile's sums can be read only once its product is
 * done (tens of cycles) and its register reused only once they are read, so two blocks alternate (tiles 0-2, 3-5):
 * each block's product is issued before the other block's sums are stored and scaled, and runs meanwhile. */
static inline void amx_dot_blocks(const int8_t *a, size_t a_step, size_t a_stride, const int8_t *x, const float *sx,
                                  const float *sw, int64_t nb, __m512 acc[16]) {
    int32_t sums[256] __attribute__((aligned(64)));
    for (int r = 0; r < 16; r++) acc[r] = _mm512_setzero_ps();
    if (nb <= 0) return;
#define AMX_PRODUCT(c, ta, tb, blk) \
    do { \
        _tile_zero(c); \
        _tile_loadd(ta, a + (blk) * a_step, a_stride); \
        _tile_loadd(tb, x + (blk) * 512, 64); \
        _tile_dpbssd(c, ta, tb); \
    } while (0)
#define AMX_SCALE(c, blk) \
    do { \
        _tile_stored(c, sums, 64); \
        amx_scale_sums(sums, _mm512_loadu_ps(sx + 16 * (blk)), sw + 16 * (blk), acc); \
    } while (0)
    AMX_PRODUCT(0, 1, 2, 0);
    int64_t b = 1;
    for (; b + 2 <= nb; b += 2) {
        AMX_PRODUCT(3, 4, 5, b);
        AMX_SCALE(0, b - 1);
        AMX_PRODUCT(0, 1, 2, b + 1);
        AMX_SCALE(3, b);
    }
    if (b < nb) {
        AMX_PRODUCT(3, 4, 5, b);
        AMX_SCALE(0, b - 1);
        AMX_SCALE(3, b);
    } else {
        AMX_SCALE(0, b - 1);
    }
#undef AMX_PRODUCT
#undef AMX_SCALE
}

/* Each thread that runs tile instructions configures its tiles first (the configuration is per thread) and releases
 * them after. Functions of their own, not inlined: clang outlines an OpenMP region's body into a function without
 * this region's target, where a tile instruction cannot be compiled (clang 14: "Cannot select ... ldtilecfg"). */
__attribute__((noinline)) static void amx_thread_begin(void) {
    TileConfig config;
    amx_config_tiles(&config);
    /* gcc does not count ldtilecfg as reading the whole 64 bytes: alone in a function it dropped the stores of the
     * tile shapes (every tile product then faulted). The empty asm reads all of it. */
    __asm__ volatile("" : : "m"(config));
    _tile_loadconfig(&config);
}

__attribute__((noinline)) static void amx_thread_end(void) { _tile_release(); }
AMX_END
#endif

#endif
