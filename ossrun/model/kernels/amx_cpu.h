/* Intel AMX (tile matrix multiply) for the kernels' many-row products, where the CPU has it and Linux lets us use it.
 *
 * A process must ask the kernel for the tile data state (arch_prctl ARCH_REQ_XCOMP_PERM) before its first tile
 * instruction; code that does not (llama.cpp's AMX kernels in some builds) dies of SIGILL on these VMs. So the
 * tile paths run only after `amx_on()` has asked and been granted; everywhere else the AVX-512 VNNI paths run.
 * OSSRUN_CPU_AMX=0 turns them off (read at every call, so tests can compare both paths in one process).
 *
 * Built into the avx512vnni variant with the compiler's AMX target enabled for the tile functions alone
 * (`AMX_BEGIN` .. `AMX_END`), so no other code of the variant can use an AMX instruction by accident.
 */
#ifndef OSSRUN_AMX_CPU_H
#define OSSRUN_AMX_CPU_H

#if defined(__AVX512VNNI__) && defined(__x86_64__) && defined(__linux__) && \
    ((defined(__clang__) && __clang_major__ >= 12) || (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 11))
#define OSSRUN_AMX 1
#include <cpuid.h>
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
#endif

#endif
