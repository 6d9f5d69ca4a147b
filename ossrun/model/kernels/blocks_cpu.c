/* Every transformer block of one step in one native call: the fast precision's CPU forward.
 *
 * The Python forward spends a decode step's time between kernels: ~30 small torch ops a layer
 * (norms, RoPE, cache writes, router, residual adds, dtype conversions), each a few microseconds of
 * dispatch, and a ctypes call per kernel. Here a whole step's blocks run in C on fp32 activations,
 * calling the same kernels the modules call (q8_cpu.c, moe_q8_cpu.c and attention_cpu.c are
 * compiled into this library), so the arithmetic is theirs and the glue is what this file adds:
 *
 *   x += out_proj(attention(rope(qkv(rmsnorm(x)))))     (k, v written to the paged cache first)
 *   x += moe(rmsnorm(x), top-k of the router, softmax over the k chosen logits)
 *
 * Rows of a LoRA adapter get its low-rank additions on qkv and out_proj here too (model/lora.py's
 * LoraBatch.delta), so a step with adapter rows runs the same arithmetic for its base rows as a step
 * without: each row's numbers depend on that row alone, and a zero adapter adds exactly nothing.
 *
 * The residual stream stays fp32 for the whole step (the module path rounds it to the model dtype
 * after every block). Shapes follow the checkpoint: H hidden, Hq query heads, Hkv KV heads of D
 * values, E experts of which k are routed, I the experts' inner size.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

int q8_linear(const float *x, int64_t M, int64_t K, const int8_t *wq, const uint16_t *wd, float wscale, int64_t N,
              const float *bias, float *y, int nthreads);
int moe_q8_layer(const float *x, int64_t T, int H, int I, const int64_t *topk, const float *topw, int k, int E,
                 const uint8_t *blocks1, const uint8_t *scales1, const float *bias1,
                 const uint8_t *blocks2, const uint8_t *scales2, const float *bias2, float limit,
                 int8_t *xq, float *xd, int32_t *xs, int8_t *hq, float *hd, int32_t *hs, int64_t *route, float *out,
                 int threads);
int paged_attention(const float *q, float *out, const void *k_cache, const void *v_cache, int bf16, int block_size,
                    int n_kv, int group, int dim, int n_seqs, const int64_t *query_starts, const int64_t *query_lens,
                    const int64_t *positions, const int64_t *block_tables, int table_width, const int64_t *first_block,
                    const int64_t *context_lens, const float *sinks, int window, float scale, int threads);

/* A Q8 weight as dense_cpu.Q8Weight holds it: values [N, K] int8, scales [N, K/32] fp16 bits, times `scale`. */
typedef struct {
    const int8_t *values;
    const uint16_t *scales;
    float scale;
    const float *bias; /* [N] fp32 or NULL */
} Q8;

/* One block's weights (all fp32 except the quantised ones) and its KV pools. */
typedef struct {
    const float *attn_norm;              /* [H] */
    Q8 qkv;                              /* [(Hq + 2 Hkv) D, H] */
    const float *sinks;                  /* [Hq] */
    Q8 out;                              /* [H, Hq D] */
    const float *mlp_norm;               /* [H] */
    const float *gate_weight, *gate_bias; /* [E, H], [E] */
    const uint8_t *blocks1, *scales1;    /* [E, 2I, H/32, 16], [E, 2I, H/32] */
    const float *bias1;                  /* [E, 2I] */
    const uint8_t *blocks2, *scales2;    /* [E, H, I/32, 16], [E, H, I/32] */
    const float *bias2;                  /* [E, H] */
    void *k_cache, *v_cache;             /* [blocks, block_size, Hkv, D], bf16 or fp32 */
    int window;                          /* sliding window, 0 for full attention */
    int sliding;                         /* which Group the layer reads: 0 full, 1 sliding */
} Layer;

typedef struct {
    int H, Hq, Hkv, D, E, k, I, layers;
    float eps, limit, attn_scale;
    int cache_bf16, block_size;
} Dims;

/* One layer type's view of the step's sequences (attention.PagedGroup). */
typedef struct {
    const int64_t *slot_mapping, *block_tables, *first_block, *context_lens;
    int table_width;
} Group;

/* One LoRA target of one layer: A [rank, in], B [out, rank] fp32, or both NULL where the adapter leaves it. */
typedef struct {
    const float *a, *b;
} LoraPair;

enum { LORA_Q, LORA_K, LORA_V, LORA_O, LORA_TARGETS, LORA_MAX_RANK = 32 }; /* model/lora.py's TARGETS, MAX_RANK */

/* One adapter's rows of the step. */
typedef struct {
    int64_t n_rows;
    const int64_t *rows;   /* [n_rows]: indices into the step's T rows */
    int rank;
    float scaling;
    const LoraPair *pairs; /* [layers][LORA_TARGETS] */
} Lora;

typedef struct {
    int64_t T;
    int n_seqs;
    const int64_t *query_starts, *query_lens, *positions; /* [B], [B], [T] */
    const float *cos, *sin;                                /* [T, D/2], YaRN concentration applied */
    Group groups[2];
    int n_lora;                                            /* adapters with rows in this step (0: all rows base) */
    const Lora *lora;                                      /* [n_lora] */
} Step;

/* Grow-only scratch per calling thread: nothing is allocated per step once the largest step has been seen. */
static __thread void *scratch;
static __thread size_t scratch_bytes;

static void *grow(size_t bytes) {
    if (bytes <= scratch_bytes) return scratch;
    void *p = realloc(scratch, bytes);
    if (!p) return NULL;
    scratch = p;
    scratch_bytes = bytes;
    return p;
}

/* a · b over n values, in 16 running partial sums: a single running sum is one FMA latency per value, and at one
 * token the router's 32 dot products and the norms run on one core while the other waits. */
static float dot(const float *a, const float *b, int n) {
    int i = 0;
    float sum = 0.0f;
#ifdef __AVX2__
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    for (; i + 16 <= n; i += 16) {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
    }
    float lanes[8];
    _mm256_storeu_ps(lanes, _mm256_add_ps(s0, s1));
    for (int u = 0; u < 8; u++) sum += lanes[u];
#endif
    for (; i < n; i++) sum += a[i] * b[i];
    return sum;
}

static void rms_norm(const float *x, int64_t T, int H, const float *scale, float eps, float *out) {
    #pragma omp parallel for schedule(static) if (T * H >= 65536)
    for (int64_t t = 0; t < T; t++) {
        const float *row = x + t * H;
        const float sum = dot(row, row, H);
        const float r = 1.0f / sqrtf(sum / H + eps);
        for (int i = 0; i < H; i++) out[t * H + i] = row[i] * r * scale[i];
    }
}

/* RoPE on the two halves of one head (as model.Rotary.apply): (a, b) → (a·cos − b·sin, b·cos + a·sin). */
static inline void rope_head(const float *src, float *dst, const float *cos, const float *sin, int half) {
    for (int i = 0; i < half; i++) {
        const float a = src[i], b = src[i + half];
        dst[i] = a * cos[i] - b * sin[i];
        dst[i + half] = b * cos[i] + a * sin[i];
    }
}

/* fp32 → bf16, round to nearest even (torch's conversion; NaN stays NaN). */
static inline uint16_t to_bf16(float f) {
    uint32_t bits;
    memcpy(&bits, &f, 4);
    if ((bits & 0x7FFFFFFF) > 0x7F800000) return (uint16_t)((bits >> 16) | 0x40);
    return (uint16_t)((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16);
}

static void store_row(void *cache, int bf16, int64_t at, const float *src, int n) {
    if (bf16) {
        uint16_t *dst = (uint16_t *)cache + at;
        for (int i = 0; i < n; i++) dst[i] = to_bf16(src[i]);
    } else {
        memcpy((float *)cache + at, src, sizeof(float) * n);
    }
}

/* qkv [T, (Hq + 2 Hkv) D] → q [T, Hq, D] with RoPE; k (with RoPE) and v written to the layer's cache slots. */
static void rope_and_cache(const Dims *d, const Layer *L, const Step *s, const float *qkv, float *q, float *k_tmp) {
    const int D = d->D, half = D / 2, width = (d->Hq + 2 * d->Hkv) * D, kv = d->Hkv * D;
    const Group *g = &s->groups[L->sliding];
    #pragma omp parallel for schedule(static) if (s->T >= 16)
    for (int64_t t = 0; t < s->T; t++) {
        const float *row = qkv + t * width, *cos = s->cos + t * half, *sin = s->sin + t * half;
        for (int h = 0; h < d->Hq; h++) rope_head(row + h * D, q + (t * d->Hq + h) * D, cos, sin, half);
        float *k = k_tmp + t * kv;
        for (int h = 0; h < d->Hkv; h++) rope_head(row + (d->Hq + h) * D, k + h * D, cos, sin, half);
        const int64_t slot = g->slot_mapping[t] * kv;
        store_row(L->k_cache, d->cache_bf16, slot, k, kv);
        store_row(L->v_cache, d->cache_bf16, slot, row + (d->Hq + d->Hkv) * D, kv);
    }
}

/* Router: logits = W t + b, the k largest (ties to the lower expert id), softmax over those k. */
static void route(const Dims *d, const Layer *L, const float *t, int64_t T, int64_t *topk, float *topw) {
    const int E = d->E, H = d->H, k = d->k;
    #pragma omp parallel for schedule(static) if (T >= 16)
    for (int64_t r = 0; r < T; r++) {
        float logits[E];
        for (int e = 0; e < E; e++) logits[e] = dot(L->gate_weight + (size_t)e * H, t + r * H, H) + L->gate_bias[e];
        int64_t *ids = topk + r * k;
        float *weights = topw + r * k;
        for (int j = 0; j < k; j++) {
            int best = -1;
            for (int e = 0; e < E; e++) {
                int taken = 0;
                for (int i = 0; i < j; i++) taken |= ids[i] == e;
                if (!taken && (best < 0 || logits[e] > logits[best])) best = e;
            }
            ids[j] = best;
            weights[j] = logits[best];
        }
        const float top = weights[0]; /* the largest */
        float total = 0.0f;
        for (int j = 0; j < k; j++) total += (weights[j] = expf(weights[j] - top));
        for (int j = 0; j < k; j++) weights[j] /= total;
    }
}

/* y[r, at … at + out) += ((A x[r]) · Bᵀ) · scaling for each row r of each adapter that has this (layer, target), in
 * LoraBatch.delta's order of operations; x [T, in], y rows `y_width` wide. Base rows are in no adapter: untouched. */
static void add_lora(const Step *s, int layer, int target, const float *x, int in, float *y, int y_width, int at, int out) {
    for (int i = 0; i < s->n_lora; i++) {
        const Lora *a = s->lora + i;
        const LoraPair *p = a->pairs + layer * LORA_TARGETS + target;
        if (!p->a) continue;
        #pragma omp parallel for schedule(static) if (a->n_rows >= 16)
        for (int64_t j = 0; j < a->n_rows; j++) {
            const int64_t r = a->rows[j];
            float u[LORA_MAX_RANK];
            for (int c = 0; c < a->rank; c++) u[c] = dot(p->a + (size_t)c * in, x + r * in, in);
            float *dst = y + r * y_width + at;
            for (int n = 0; n < out; n++) dst[n] += dot(p->b + (size_t)n * a->rank, u, a->rank) * a->scaling;
        }
    }
}

/* -2 when an adapter's rank or rows are out of range (checked once, before anything is computed). */
static int check_lora(const Step *s) {
    for (int i = 0; i < s->n_lora; i++) {
        const Lora *a = s->lora + i;
        if (a->rank < 1 || a->rank > LORA_MAX_RANK) return -2;
        for (int64_t j = 0; j < a->n_rows; j++)
            if (a->rows[j] < 0 || a->rows[j] >= s->T) return -2;
    }
    return 0;
}

static void add_into(float *x, const float *y, int64_t n) {
    #pragma omp parallel for schedule(static) if (n >= 65536)
    for (int64_t i = 0; i < n; i++) x[i] += y[i];
}

/* Every block on x [T, H] fp32 (updated in place). Returns 0, -1 when scratch cannot be allocated, -2 for a LoRA
 * adapter out of range (see check_lora), or the status of the first kernel that refused its shapes. */
int blocks_forward(const Dims *d, const Layer *layers, const Step *s, float *x, int threads) {
    if (check_lora(s)) return -2;
    const int64_t T = s->T;
    const int H = d->H, qd = d->Hq * d->D, kv = d->Hkv * d->D, width = qd + 2 * kv, k = d->k, I = d->I;
    const int64_t P = T * k;
    /* scratch, in floats (8-byte items counted twice) */
    const size_t n_t = T * H, n_qkv = T * width, n_q = T * qd, n_k = T * kv, n_o = T * qd, n_y = T * H, n_ids = 2 * P,
                 n_w = P, n_xq = (T * H + 3) / 4, n_xd = T * H / 32, n_hq = (P * I + 3) / 4, n_hd = P * I / 32,
                 n_route = 2 * (2 * P + 2 * d->E + 1);
    const size_t total = n_t + n_qkv + n_q + n_k + n_o + n_y + n_ids + n_w + n_xq + 2 * n_xd + n_hq + 2 * n_hd + n_route + 16;
    float *base = grow(sizeof(float) * total);
    if (!base) return -1;
    float *t = base, *qkv = t + n_t, *q = qkv + n_qkv, *k_tmp = q + n_q, *o = k_tmp + n_k, *y = o + n_o;
    int64_t *ids = (int64_t *)(((uintptr_t)(y + n_y) + 7) & ~(uintptr_t)7);
    float *weights = (float *)(ids + P);
    int8_t *xq = (int8_t *)(weights + n_w);
    float *xd = (float *)xq + n_xq;
    int32_t *xs = (int32_t *)(xd + n_xd);
    int8_t *hq = (int8_t *)(xs + n_xd);
    float *hd = (float *)hq + n_hq;
    int32_t *hs = (int32_t *)(hd + n_hd);
    int64_t *route_scratch = (int64_t *)(((uintptr_t)(hs + n_hd) + 7) & ~(uintptr_t)7);
    for (int l = 0; l < d->layers; l++) {
        const Layer *L = layers + l;
        const Group *g = &s->groups[L->sliding];
        int status;
        rms_norm(x, T, H, L->attn_norm, d->eps, t);
        if ((status = q8_linear(t, T, H, L->qkv.values, L->qkv.scales, L->qkv.scale, width, L->qkv.bias, qkv, threads))) return status;
        add_lora(s, l, LORA_Q, t, H, qkv, width, 0, qd);
        add_lora(s, l, LORA_K, t, H, qkv, width, qd, kv);
        add_lora(s, l, LORA_V, t, H, qkv, width, qd + kv, kv);
        rope_and_cache(d, L, s, qkv, q, k_tmp);
        status = paged_attention(q, o, L->k_cache, L->v_cache, d->cache_bf16, d->block_size, d->Hkv, d->Hq / d->Hkv, d->D, s->n_seqs,
                                 s->query_starts, s->query_lens, s->positions, g->block_tables, g->table_width, g->first_block,
                                 g->context_lens, L->sinks, L->window, d->attn_scale, threads);
        if (status) return status;
        if ((status = q8_linear(o, T, qd, L->out.values, L->out.scales, L->out.scale, H, L->out.bias, y, threads))) return status;
        add_lora(s, l, LORA_O, o, qd, y, H, 0, H);
        add_into(x, y, T * H);
        rms_norm(x, T, H, L->mlp_norm, d->eps, t);
        route(d, L, t, T, ids, weights);
        status = moe_q8_layer(t, T, H, I, ids, weights, k, d->E, L->blocks1, L->scales1, L->bias1, L->blocks2, L->scales2, L->bias2,
                              d->limit, xq, xd, xs, hq, hd, hs, route_scratch, y, threads);
        if (status) return status;
        add_into(x, y, T * H);
    }
    return 0;
}
