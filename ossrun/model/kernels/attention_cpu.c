/* Paged attention with sinks for the CPU: one call per layer for every sequence of the step.
 *
 * Keys and values are read straight from the paged cache through each sequence's block table (no
 * gathered copy, no mask tensor, no score matrix). Work is split into jobs of (sequence, KV head,
 * query tile); a job keeps one online-softmax state per (query, query head of that KV head) row, so
 * the query heads of a KV head (GQA) share every K/V block read, and walks only the blocks that
 * some row of its tile can see: causal, inside the window on sliding layers, inside the context.
 *
 * The sink is one extra logit per query head with no value: the running max starts at the sink
 * and the running sum at exp(sink - max) = 1, so it joins the softmax exactly as a column of the
 * score matrix would. Accumulation is fp32 whatever the cache holds (bf16 or fp32).
 *
 * Shapes: q [T, Hq, D] fp32 (scale not applied), out [T, Hq, D] fp32, caches [blocks, bs, Hkv, D],
 * query_starts/query_lens/first_block/context_lens [B], positions [T], block_tables [B, W] (table
 * entry i of sequence b is its logical block first_block[b] + i), sinks [Hq] fp32, window 0 = full.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

#define TILE_ROWS 64   /* query rows (tokens x heads of one KV head) per job: K/V conversions amortised over them */
#define CHUNK_BYTES 16384 /* fp32 K (and V) converted together: many keys per softmax update, both still in L1 */

static inline float bf16_to_f32(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* n rows of D values, from the cache (bf16 or fp32, rows `stride` elements apart) into dst [n, D] fp32. */
static void load_rows(const void *src, int bf16, size_t stride, int n, int D, float *dst) {
    for (int j = 0; j < n; j++) {
        float *d = dst + (size_t)j * D;
        if (!bf16) {
            memcpy(d, (const float *)src + (size_t)j * stride, sizeof(float) * D);
            continue;
        }
        const uint16_t *s = (const uint16_t *)src + (size_t)j * stride;
        int i = 0;
#ifdef __AVX2__
        for (; i + 8 <= D; i += 8) {
            __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(s + i)));
            _mm256_storeu_ps(d + i, _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16)));
        }
#endif
        for (; i < D; i++) d[i] = bf16_to_f32(s[i]);
    }
}

#ifdef __AVX2__
/* exp on 8 lanes (Cephes' expf: range reduction by ln 2, degree-5 polynomial; ~1 ulp on [-88, 88]). */
static inline __m256 exp8(__m256 x) {
    x = _mm256_min_ps(x, _mm256_set1_ps(88.3762626647949f));
    x = _mm256_max_ps(x, _mm256_set1_ps(-88.3762626647949f));
    __m256 n = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
    x = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    x = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), x);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
    __m256i pow2 = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(pow2));
}

/* Eight dot products q·k_j (k rows D apart) reduced into one vector without a horizontal sum per key. */
static inline __m256 dot8(const float *q, const float *k, int D) {
    __m256 a[8];
    for (int j = 0; j < 8; j++) a[j] = _mm256_setzero_ps();
    for (int i = 0; i < D; i += 8) {
        __m256 qv = _mm256_loadu_ps(q + i);
        for (int j = 0; j < 8; j++) a[j] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k + (size_t)j * D + i), a[j]);
    }
    __m256 t0 = _mm256_hadd_ps(a[0], a[1]), t1 = _mm256_hadd_ps(a[2], a[3]);
    __m256 t2 = _mm256_hadd_ps(a[4], a[5]), t3 = _mm256_hadd_ps(a[6], a[7]);
    __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
    return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}
#endif

/* s[j] = q·k_j for j in [lo, hi], -inf elsewhere in [0, n); → the largest s. k is [n, D] fp32. */
static float scores(const float *q, const float *k, int n, int D, int lo, int hi, float *s) {
    float best = -INFINITY;
    int j = 0;
    (void)n; /* the vector path needs the block's length; the scalar one stays inside [lo, hi] */
#ifdef __AVX2__
    if (D % 8 == 0) {
        __m256 vbest = _mm256_set1_ps(-INFINITY);
        const __m256 lanes = _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7);
        for (j = (lo / 8) * 8; j + 8 <= n && j <= hi; j += 8) {
            __m256 idx = _mm256_add_ps(lanes, _mm256_set1_ps((float)j));
            __m256 keep = _mm256_and_ps(_mm256_cmp_ps(idx, _mm256_set1_ps((float)lo), _CMP_GE_OQ),
                                        _mm256_cmp_ps(idx, _mm256_set1_ps((float)hi), _CMP_LE_OQ));
            __m256 v = _mm256_blendv_ps(_mm256_set1_ps(-INFINITY), dot8(q, k + (size_t)j * D, D), keep);
            _mm256_storeu_ps(s + j, v);
            vbest = _mm256_max_ps(vbest, v);
        }
        float lanes_best[8];
        _mm256_storeu_ps(lanes_best, vbest);
        for (int i = 0; i < 8; i++) best = lanes_best[i] > best ? lanes_best[i] : best;
        if (j > hi) return best; /* everything in range done; lanes past hi already hold -inf */
    }
    j = j > lo ? j : lo;
#else
    j = lo;
#endif
    for (; j <= hi; j++) {
        const float *kj = k + (size_t)j * D;
        float d = 0.0f;
        for (int i = 0; i < D; i++) d += q[i] * kj[i];
        s[j] = d;
        best = d > best ? d : best;
    }
    return best;
}

/* p[j] = exp(s[j] - m) in place for j in [lo, hi] (the range is what `scores` wrote); → their sum. */
static float exponentiate(float *s, int lo, int hi, float m) {
    float sum = 0.0f;
    int j = lo;
#ifdef __AVX2__
    __m256 vm = _mm256_set1_ps(m), vsum = _mm256_setzero_ps();
    for (; j + 8 <= hi + 1; j += 8) {
        __m256 p = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + j), vm));
        _mm256_storeu_ps(s + j, p);
        vsum = _mm256_add_ps(vsum, p);
    }
    float part[8];
    _mm256_storeu_ps(part, vsum);
    for (int i = 0; i < 8; i++) sum += part[i];
#endif
    for (; j <= hi; j++) {
        s[j] = expf(s[j] - m);
        sum += s[j];
    }
    return sum;
}

/* acc = acc * c + sum_{j in [lo, hi]} p[j] v_j, v [n, D] fp32. */
static void accumulate(float *acc, float c, const float *p, const float *v, int lo, int hi, int D) {
    int i = 0;
#ifdef __AVX2__
    for (; i + 64 <= D; i += 64) { /* 64 outputs in 8 registers: one broadcast of p[j] feeds 8 FMAs */
        __m256 a[8];
        for (int u = 0; u < 8; u++) a[u] = _mm256_mul_ps(_mm256_loadu_ps(acc + i + 8 * u), _mm256_set1_ps(c));
        for (int j = lo; j <= hi; j++) {
            __m256 pj = _mm256_set1_ps(p[j]);
            const float *vj = v + (size_t)j * D + i;
            for (int u = 0; u < 8; u++) a[u] = _mm256_fmadd_ps(pj, _mm256_loadu_ps(vj + 8 * u), a[u]);
        }
        for (int u = 0; u < 8; u++) _mm256_storeu_ps(acc + i + 8 * u, a[u]);
    }
    for (; i + 8 <= D; i += 8) {
        __m256 a = _mm256_mul_ps(_mm256_loadu_ps(acc + i), _mm256_set1_ps(c));
        for (int j = lo; j <= hi; j++) a = _mm256_fmadd_ps(_mm256_set1_ps(p[j]), _mm256_loadu_ps(v + (size_t)j * D + i), a);
        _mm256_storeu_ps(acc + i, a);
    }
#endif
    for (; i < D; i++) {
        float a = acc[i] * c;
        for (int j = lo; j <= hi; j++) a += p[j] * v[(size_t)j * D + i];
        acc[i] = a;
    }
}

/* Keys per chunk: whole cache blocks, about CHUNK_BYTES of fp32 keys, at least one block. */
static int chunk_keys(int block_size, int dim) {
    int keys = CHUNK_BYTES / (int)sizeof(float) / dim;
    return keys > block_size ? keys / block_size * block_size : block_size;
}

typedef struct {
    const float *q;
    float *out;
    const void *k_cache, *v_cache;
    int bf16, block_size, n_kv, group, dim;
    const int64_t *query_starts, *query_lens, *positions, *block_tables, *first_block, *context_lens;
    int table_width;
    const float *sinks;
    int window;
    float scale;
} Problem;

/* One job: sequence b, KV head h, query tokens t0 .. t0+nt-1 of that sequence's run. */
static void attend_tile(const Problem *P, int b, int h, int64_t t0, int nt, float *scratch) {
    const int D = P->dim, G = P->group, bs = P->block_size, rows = nt * G;
    float *q = scratch, *acc = q + (size_t)rows * D, *m = acc + (size_t)rows * D, *l = m + rows;
    int64_t *lo = (int64_t *)(l + rows), *hi = lo + rows;
    const int chunk = chunk_keys(bs, D);
    float *kb = (float *)(hi + rows), *vb = kb + (size_t)chunk * D, *s = vb + (size_t)chunk * D;
    const int64_t first = P->first_block[b] * bs, limit = (P->first_block[b] + P->table_width) * bs - 1;
    const int64_t last_key = P->context_lens[b] - 1;
    int64_t tile_lo = INT64_MAX, tile_hi = -1;
    for (int r = 0; r < rows; r++) {
        int64_t token = P->query_starts[b] + t0 + r / G;
        int head = h * G + r % G;
        int64_t pos = P->positions[token];
        const float *src = P->q + ((size_t)token * P->n_kv * G + head) * D;
        for (int i = 0; i < D; i++) q[(size_t)r * D + i] = src[i] * P->scale;
        memset(acc + (size_t)r * D, 0, sizeof(float) * D);
        m[r] = P->sinks[head]; /* the sink is the first logit seen: max = sink, sum = exp(0) = 1 */
        l[r] = 1.0f;
        lo[r] = P->window > 0 && pos - P->window + 1 > 0 ? pos - P->window + 1 : 0;
        lo[r] = lo[r] > first ? lo[r] : first;
        hi[r] = pos < last_key ? pos : last_key;
        hi[r] = hi[r] < limit ? hi[r] : limit;
        if (lo[r] <= hi[r]) {
            tile_lo = lo[r] < tile_lo ? lo[r] : tile_lo;
            tile_hi = hi[r] > tile_hi ? hi[r] : tile_hi;
        }
    }
    const size_t token_stride = (size_t)P->n_kv * D;
    const size_t elem = P->bf16 ? 2 : 4;
    const int n = chunk, chunk_blocks = chunk / bs;
    for (int64_t block = tile_lo / bs; tile_hi >= 0 && block <= tile_hi / bs; block += chunk_blocks) {
        /* A chunk of cache blocks converted to fp32 once, then every row of the tile runs over it. */
        int64_t base = block * bs, stop = base + n - 1 < tile_hi ? base + n - 1 : tile_hi;
        for (int64_t i = block; i <= stop / bs; i++) {
            int64_t physical = P->block_tables[(size_t)b * P->table_width + (i - P->first_block[b])];
            size_t offset = ((size_t)physical * bs * P->n_kv + h) * D * elem;
            size_t row = (size_t)(i - block) * bs * D;
            load_rows((const char *)P->k_cache + offset, P->bf16, token_stride, bs, D, kb + row);
            load_rows((const char *)P->v_cache + offset, P->bf16, token_stride, bs, D, vb + row);
        }
        for (int r = 0; r < rows; r++) {
            int64_t a = lo[r] > base ? lo[r] : base, z = hi[r] < stop ? hi[r] : stop;
            if (a > z) continue;
            int jlo = (int)(a - base), jhi = (int)(z - base);
            float best = scores(q + (size_t)r * D, kb, n, D, jlo, jhi, s);
            float m_new = best > m[r] ? best : m[r];
            float c = expf(m[r] - m_new);
            float sum = exponentiate(s, jlo, jhi, m_new);
            l[r] = l[r] * c + sum;
            m[r] = m_new;
            accumulate(acc + (size_t)r * D, c, s, vb, jlo, jhi, D);
        }
    }
    for (int r = 0; r < rows; r++) {
        int64_t token = P->query_starts[b] + t0 + r / G;
        float *dst = P->out + ((size_t)token * P->n_kv * G + h * G + r % G) * D;
        float inv = 1.0f / l[r];
        for (int i = 0; i < D; i++) dst[i] = acc[(size_t)r * D + i] * inv;
    }
}

/* → 0, -1 for shapes outside what the kernel handles, -2 when out of memory. `threads`: the team size, passed
 * by the caller (torch's setting) because OpenMP's own default is per calling thread and the engine may run
 * on a thread that never set it. */
int paged_attention(const float *q, float *out, const void *k_cache, const void *v_cache, int bf16, int block_size,
                    int n_kv, int group, int dim, int n_seqs, const int64_t *query_starts, const int64_t *query_lens,
                    const int64_t *positions, const int64_t *block_tables, int table_width, const int64_t *first_block,
                    const int64_t *context_lens, const float *sinks, int window, float scale, int threads) {
    if (block_size <= 0 || dim <= 0 || n_kv <= 0 || group <= 0) return -1;
    Problem P = {q, out, k_cache, v_cache, bf16, block_size, n_kv, group, dim, query_starts, query_lens, positions,
                 block_tables, first_block, context_lens, table_width, sinks, window, scale};
    const int tile_tokens = group >= TILE_ROWS ? 1 : TILE_ROWS / group;
    /* Jobs in order (sequence, tile, head); tiles of one sequence are counted by a prefix sum. */
    int64_t *tile_start = malloc(sizeof(int64_t) * (n_seqs + 1));
    if (!tile_start) return -2;
    tile_start[0] = 0;
    for (int b = 0; b < n_seqs; b++) tile_start[b + 1] = tile_start[b] + (query_lens[b] + tile_tokens - 1) / tile_tokens;
    const int64_t jobs = tile_start[n_seqs] * n_kv;
    const int rows = tile_tokens * group;
    const int chunk = chunk_keys(block_size, dim);
    const size_t scratch_bytes = sizeof(float) * ((size_t)rows * (2 * dim + 2) + (size_t)chunk * (2 * dim + 1)) +
                                 sizeof(int64_t) * 2 * rows;
    int failed = 0;
    #pragma omp parallel num_threads(threads > 0 ? threads : 1)
    {
        float *scratch = malloc(scratch_bytes);
        if (!scratch) {
            #pragma omp atomic write
            failed = 1;
        }
        #pragma omp for schedule(dynamic, 1)
        for (int64_t job = 0; job < jobs; job++) {
            if (!scratch) continue;
            int64_t tile = job / n_kv;
            int h = (int)(job % n_kv);
            int b = 0;
            while (tile_start[b + 1] <= tile) b++; /* few sequences per step: a linear scan is cheap */
            int64_t t0 = (tile - tile_start[b]) * tile_tokens;
            int nt = (int)(query_lens[b] - t0 < tile_tokens ? query_lens[b] - t0 : tile_tokens);
            attend_tile(&P, b, h, t0, nt, scratch);
        }
        free(scratch);
    }
    free(tile_start);
    return failed ? -2 : 0;
}
