/* Calls one exported function of a kernel library with arguments read from files, then writes every buffer back.
 *
 * The Arm kernel tests (tests/test_arm_kernels.py) run it under qemu-aarch64: the host makes the inputs and the
 * references in PyTorch, this program runs the aarch64 build of the kernels on them. Usage:
 *
 *     kernel_call LIBRARY FUNCTION DIR
 *
 * DIR/args holds one argument a line, in the function's order: `i N` (an integer), `f X` (a float), `p NAME` (a
 * buffer: the bytes of DIR/NAME, written back to DIR/NAME.out after the call) or `n` (a null pointer). The status the
 * function returns is printed. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_ARGS 32

typedef struct {
    char kind;
    int64_t i;
    double f;
    void *p;
    size_t bytes;
    char name[256];
} Arg;

static Arg args[MAX_ARGS];
static int n_args;

static void *read_buffer(const char *dir, Arg *a) {
    char path[600];
    snprintf(path, sizeof path, "%s/%s", dir, a->name);
    FILE *f = fopen(path, "rb");
    if (!f) { perror(path); exit(2); }
    fseek(f, 0, SEEK_END);
    a->bytes = (size_t)ftell(f);
    fseek(f, 0, SEEK_SET);
    void *p = aligned_alloc(64, (a->bytes + 63) / 64 * 64 + 64);
    if (!p || fread(p, 1, a->bytes, f) != a->bytes) { fprintf(stderr, "cannot read %s\n", path); exit(2); }
    fclose(f);
    return p;
}

static void write_back(const char *dir) {
    for (int k = 0; k < n_args; k++) {
        if (args[k].kind != 'p') continue;
        char path[600];
        snprintf(path, sizeof path, "%s/%s.out", dir, args[k].name);
        FILE *f = fopen(path, "wb");
        if (!f || fwrite(args[k].p, 1, args[k].bytes, f) != args[k].bytes) { perror(path); exit(2); }
        fclose(f);
    }
}

#define P(k) (args[k].p)
#define I(k) (args[k].i)
#define F(k) ((float)args[k].f)

int main(int argc, char **argv) {
    if (argc != 4) { fprintf(stderr, "usage: kernel_call LIBRARY FUNCTION DIR\n"); return 2; }
    void *lib = dlopen(argv[1], RTLD_NOW);
    if (!lib) { fprintf(stderr, "%s\n", dlerror()); return 2; }
    void *fn = dlsym(lib, argv[2]);
    if (!fn) { fprintf(stderr, "no function %s\n", argv[2]); return 2; }
    Dl_info where;
    if (dladdr(fn, &where)) fprintf(stderr, "library at %p\n", where.dli_fbase); /* bench/arm_kernels.py counts instructions there */
    char path[600];
    snprintf(path, sizeof path, "%s/args", argv[3]);
    FILE *f = fopen(path, "r");
    if (!f) { perror(path); return 2; }
    char line[400];
    while (fgets(line, sizeof line, f) && n_args < MAX_ARGS) {
        Arg *a = &args[n_args++];
        a->kind = line[0];
        if (a->kind == 'i') a->i = strtoll(line + 2, NULL, 10);
        else if (a->kind == 'f') a->f = strtod(line + 2, NULL);
        else if (a->kind == 'p') { sscanf(line + 2, "%255s", a->name); a->p = read_buffer(argv[3], a); }
        else if (a->kind == 'n') a->p = NULL;
        else { fprintf(stderr, "bad argument line: %s", line); return 2; }
    }
    fclose(f);
    const char *name = argv[2];
    int status;
    if (!strcmp(name, "q8_quantize_rows")) {
        status = ((int (*)(const float *, int64_t, int64_t, int8_t *, float *, int))fn)(P(0), I(1), I(2), P(3), P(4), (int)I(5));
    } else if (!strcmp(name, "q8_linear")) {
        status = ((int (*)(const float *, int64_t, int64_t, const int8_t *, const uint16_t *, float, int64_t, const float *,
                           float *, int))fn)(P(0), I(1), I(2), P(3), P(4), F(5), I(6), P(7), P(8), (int)I(9));
    } else if (!strcmp(name, "moe_q8_quantize")) {
        status = ((int (*)(const float *, int64_t, int, int8_t *, float *, int32_t *))fn)(P(0), I(1), (int)I(2), P(3), P(4), P(5));
    } else if (!strcmp(name, "moe_q8_swiglu")) {
        ((void (*)(const float *, const float *, int64_t, float, float *))fn)(P(0), P(1), I(2), F(3), P(4));
        status = 0;
    } else if (!strcmp(name, "moe_q8_linear")) {
        status = ((int (*)(const int8_t *, const float *, const int32_t *, const int64_t *, int, const int64_t *, const int64_t *,
                           int, const uint8_t *, const uint8_t *, int, const float *, float *, int))fn)(
            P(0), P(1), P(2), P(3), (int)I(4), P(5), P(6), (int)I(7), P(8), P(9), (int)I(10), P(11), P(12), (int)I(13));
    } else if (!strcmp(name, "moe_q8_layer")) {
        status = ((int (*)(const float *, int64_t, int, int, const int64_t *, const float *, int, int, const uint8_t *,
                           const uint8_t *, const float *, const uint8_t *, const uint8_t *, const float *, float, int8_t *,
                           float *, int32_t *, int8_t *, float *, int32_t *, int64_t *, float *, int))fn)(
            P(0), I(1), (int)I(2), (int)I(3), P(4), P(5), (int)I(6), (int)I(7), P(8), P(9), P(10), P(11), P(12), P(13), F(14),
            P(15), P(16), P(17), P(18), P(19), P(20), P(21), P(22), (int)I(23));
    } else if (!strcmp(name, "paged_attention")) {
        status = ((int (*)(const float *, float *, const void *, const void *, int, int, int, int, int, int, const int64_t *,
                           const int64_t *, const int64_t *, const int64_t *, int, const int64_t *, const int64_t *,
                           const float *, int, float, int))fn)(
            P(0), P(1), P(2), P(3), (int)I(4), (int)I(5), (int)I(6), (int)I(7), (int)I(8), (int)I(9), P(10), P(11), P(12), P(13),
            (int)I(14), P(15), P(16), P(17), (int)I(18), F(19), (int)I(20));
    } else {
        fprintf(stderr, "kernel_call does not know %s\n", name);
        return 2;
    }
    write_back(argv[3]);
    printf("%d\n", status);
    return 0;
}
