/* One-query (AR decode) grouped-query attention over a long fp32 KV cache, for CPUs.
 *
 * Why: torch's CPU SDPA runs a decode step's attention as small-M matrix products (M = the
 * query heads that share a KV head, 6 for the benchmark shape) at ~50 GFLOP/s, ~2.5 ms per layer
 * over a 25k-token cache, about a third of the memory bandwidth that reading K and V needs.
 * Here each thread takes a chunk of the cache of one KV head, reads every key and value once
 * (scores for all of the head's queries from one load of a key), and the chunks are merged
 * with their softmax maxima and sums (split-K, "flash decoding").
 *
 * Layout: q and out (kv_heads, groups, dim) contiguous; k and v rows of `dim` contiguous floats,
 * row r of head h at base + h * head_stride + r * row_stride (a view of a preallocated cache).
 * fp32 throughout; differs from SDPA by summation order and exp rounding (~1e-7 relative).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_GROUPS 64

/* exp(x) for x <= 0 (scores minus their maximum), vectorizable: libm's expf is a scalar call
 * (~20 ns; 150k of them per layer at a 25k cache made the first version of this kernel slower
 * than SDPA). Cephes' expf: x = n ln2 + r, |r| <= ln2 / 2, exp(r) by a degree-6 polynomial,
 * 2^n through the exponent bits; within ~2 ulp of expf. Inputs below -87 give ~1e-38, not 0. */
static inline float exp_nonpositive(float x) {
    x = x < -87.0f ? -87.0f : x;
    float n = floorf(x * 1.44269504088896341f + 0.5f);
    float r = x - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    union { int32_t i; float f; } scale = {.i = ((int32_t)n + 127) << 23};
    return p * scale.f;
}

/* scores[g][0..n) <- exp(score - maxima[g]); sums[g] <- their sum. */
static void exponentiate(float *scores, int64_t n, int64_t groups, const float *maxima, float *sums) {
    for (int64_t g = 0; g < groups; g++) {
        float total = 0.0f, m = maxima[g];
        float *row = scores + g * n;
#pragma omp simd reduction(+ : total)
        for (int64_t t = 0; t < n; t++) {
            row[t] = exp_nonpositive(row[t] - m);
            total += row[t];
        }
        sums[g] = total;
    }
}

#if defined(__AVX512F__)
#include <immintrin.h>
#define VECTOR 16
#endif

#if defined(__AVX512F__)
/* The 16 sums of 16 vectors, in order, in 45 instructions instead of 16 full reductions. */
static inline __m512 reduce16(const __m512 *v) {
    __m512 t[8], u[4], w[2];
    for (int i = 0; i < 8; i++)
        t[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]),
                             _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 4; i++)
        u[i] = _mm512_add_ps(_mm512_shuffle_ps(t[2 * i], t[2 * i + 1], 0x44),
                             _mm512_shuffle_ps(t[2 * i], t[2 * i + 1], 0xEE));
    for (int i = 0; i < 2; i++)
        w[i] = _mm512_add_ps(_mm512_shuffle_f32x4(u[2 * i], u[2 * i + 1], 0x88),
                             _mm512_shuffle_f32x4(u[2 * i], u[2 * i + 1], 0xDD));
    return _mm512_add_ps(_mm512_shuffle_f32x4(w[0], w[1], 0x88), _mm512_shuffle_f32x4(w[0], w[1], 0xDD));
}

/* `chunk` for head dim 64 and G query heads per KV head (a constant after inlining, so the
 * queries and the G x 64 accumulators live in registers): scores 16 keys at a time, each key
 * loaded once for all G queries. */
static inline __attribute__((always_inline)) void chunk64(
    const int G, const float *q, const float *k, const float *v, int64_t begin, int64_t n,
    int64_t k_row, int64_t v_row, float scale, float *scores, float *maxima, float *sums, float *acc) {
    __m512 qv[G][4], mx[G], part[G][16];
    for (int g = 0; g < G; g++) {
        for (int j = 0; j < 4; j++) qv[g][j] = _mm512_loadu_ps(q + g * 64 + 16 * j);
        mx[g] = _mm512_set1_ps(-INFINITY);
        maxima[g] = -INFINITY;
    }
    const __m512 factor = _mm512_set1_ps(scale);
    int64_t t = 0;
    for (; t + 16 <= n; t += 16) {
        for (int jj = 0; jj < 16; jj++) {
            const float *key = k + (begin + t + jj) * k_row;
            __m512 k0 = _mm512_loadu_ps(key), k1 = _mm512_loadu_ps(key + 16);
            __m512 k2 = _mm512_loadu_ps(key + 32), k3 = _mm512_loadu_ps(key + 48);
            for (int g = 0; g < G; g++)
                part[g][jj] = _mm512_fmadd_ps(qv[g][3], k3, _mm512_fmadd_ps(qv[g][2], k2,
                              _mm512_fmadd_ps(qv[g][1], k1, _mm512_mul_ps(qv[g][0], k0))));
        }
        for (int g = 0; g < G; g++) {
            __m512 r = _mm512_mul_ps(reduce16(part[g]), factor);
            _mm512_storeu_ps(scores + g * n + t, r);
            mx[g] = _mm512_max_ps(mx[g], r);
        }
    }
    for (int g = 0; g < G; g++) maxima[g] = _mm512_reduce_max_ps(mx[g]);
    for (; t < n; t++) {  /* the last n % 16 keys */
        const float *key = k + (begin + t) * k_row;
        for (int g = 0; g < G; g++) {
            __m512 sum = _mm512_setzero_ps();
            for (int j = 0; j < 4; j++) sum = _mm512_fmadd_ps(qv[g][j], _mm512_loadu_ps(key + 16 * j), sum);
            float s = _mm512_reduce_add_ps(sum) * scale;
            scores[g * n + t] = s;
            if (s > maxima[g]) maxima[g] = s;
        }
    }
    exponentiate(scores, n, G, maxima, sums);
    __m512 av[G][4];
    for (int g = 0; g < G; g++)
        for (int j = 0; j < 4; j++) av[g][j] = _mm512_setzero_ps();
    for (int64_t i = 0; i < n; i++) {
        const float *value = v + (begin + i) * v_row;
        __m512 v0 = _mm512_loadu_ps(value), v1 = _mm512_loadu_ps(value + 16);
        __m512 v2 = _mm512_loadu_ps(value + 32), v3 = _mm512_loadu_ps(value + 48);
        for (int g = 0; g < G; g++) {
            __m512 p = _mm512_set1_ps(scores[g * n + i]);
            av[g][0] = _mm512_fmadd_ps(p, v0, av[g][0]);
            av[g][1] = _mm512_fmadd_ps(p, v1, av[g][1]);
            av[g][2] = _mm512_fmadd_ps(p, v2, av[g][2]);
            av[g][3] = _mm512_fmadd_ps(p, v3, av[g][3]);
        }
    }
    for (int g = 0; g < G; g++)
        for (int j = 0; j < 4; j++) _mm512_storeu_ps(acc + g * 64 + 16 * j, av[g][j]);
}
#endif

/* Scores of every query of one KV head against keys [begin, end), then their exponentials
 * (minus each query's maximum) and sums, then the exponential-weighted sum of the values. */
static void chunk(const float *q, const float *k, const float *v, int64_t groups, int64_t dim,
                  int64_t begin, int64_t end, int64_t k_row, int64_t v_row, float scale,
                  float *scores, float *maxima, float *sums, float *acc) {
    int64_t n = end - begin;
#if defined(__AVX512F__)
    if (dim == 64) {
        switch (groups) {  /* the shapes of real GQA models: 1-8 query heads per KV head */
#define CASE(G) case G: chunk64(G, q, k, v, begin, n, k_row, v_row, scale, scores, maxima, sums, acc); return;
            CASE(1) CASE(2) CASE(3) CASE(4) CASE(5) CASE(6) CASE(7) CASE(8)
#undef CASE
        }
    }
#endif
    for (int64_t g = 0; g < groups; g++) maxima[g] = -INFINITY;
#if defined(__AVX512F__)
    int vectorized = dim % VECTOR == 0;
#endif
    for (int64_t t = 0; t < n; t++) {
        const float *key = k + (begin + t) * k_row;
        for (int64_t g = 0; g < groups; g++) {
            const float *query = q + g * dim;
            float s = 0.0f;
#if defined(__AVX512F__)
            if (vectorized) {
                __m512 sum = _mm512_setzero_ps();
                for (int64_t d = 0; d < dim; d += VECTOR)
                    sum = _mm512_fmadd_ps(_mm512_loadu_ps(query + d), _mm512_loadu_ps(key + d), sum);
                s = _mm512_reduce_add_ps(sum);
            } else
#endif
                for (int64_t d = 0; d < dim; d++) s += query[d] * key[d];
            s *= scale;
            scores[g * n + t] = s;
            if (s > maxima[g]) maxima[g] = s;
        }
    }
    exponentiate(scores, n, groups, maxima, sums);
    memset(acc, 0, sizeof(float) * groups * dim);
    for (int64_t t = 0; t < n; t++) {
        const float *value = v + (begin + t) * v_row;
        for (int64_t g = 0; g < groups; g++) {
            float p = scores[g * n + t];
            float *a = acc + g * dim;
#if defined(__AVX512F__)
            if (vectorized) {
                __m512 weight = _mm512_set1_ps(p);
                for (int64_t d = 0; d < dim; d += VECTOR)
                    _mm512_storeu_ps(a + d, _mm512_fmadd_ps(weight, _mm512_loadu_ps(value + d),
                                                            _mm512_loadu_ps(a + d)));
                continue;
            }
#endif
            for (int64_t d = 0; d < dim; d++) a[d] += p * value[d];
        }
    }
}

/* Returns 0, or -1 when `groups` exceeds MAX_GROUPS or memory runs out (the caller falls back). */
int decode_attention(const float *q, const float *k, const float *v, float *out, int64_t kv_heads,
                     int64_t groups, int64_t dim, int64_t length, int64_t k_head, int64_t k_row,
                     int64_t v_head, int64_t v_row, float scale, int64_t chunks, int threads) {
    if (groups > MAX_GROUPS || chunks < 1 || length < 1) return -1;
    int64_t items = kv_heads * chunks, per = (length + chunks - 1) / chunks;
    float *state = malloc(sizeof(float) * items * groups * (dim + 2));
    if (!state) return -1;
    int failed = 0;
#pragma omp parallel for num_threads(threads) schedule(static) reduction(| : failed)
    for (int64_t item = 0; item < items; item++) {
        int64_t h = item / chunks, c = item % chunks;
        int64_t begin = c * per, end = begin + per < length ? begin + per : length;
        float *maxima = state + item * groups * (dim + 2), *sums = maxima + groups;
        float *acc = sums + groups;
        if (begin >= end) {
            for (int64_t g = 0; g < groups; g++) maxima[g] = -INFINITY, sums[g] = 0.0f;
            memset(acc, 0, sizeof(float) * groups * dim);
            continue;
        }
        float *scores = malloc(sizeof(float) * groups * (end - begin));
        if (!scores) {
            failed = 1;
            continue;
        }
        chunk(q + h * groups * dim, k + h * k_head, v + h * v_head, groups, dim, begin, end, k_row,
              v_row, scale, scores, maxima, sums, acc);
        free(scores);
    }
    if (!failed) {
        for (int64_t h = 0; h < kv_heads; h++) {
            for (int64_t g = 0; g < groups; g++) {
                float m = -INFINITY, total = 0.0f;
                for (int64_t c = 0; c < chunks; c++) {
                    float mc = state[(h * chunks + c) * groups * (dim + 2) + g];
                    if (mc > m) m = mc;
                }
                float *o = out + (h * groups + g) * dim;
                memset(o, 0, sizeof(float) * dim);
                for (int64_t c = 0; c < chunks; c++) {
                    float *base = state + (h * chunks + c) * groups * (dim + 2);
                    if (base[g] == -INFINITY) continue;
                    float w = expf(base[g] - m);
                    total += w * base[groups + g];
                    const float *a = base + 2 * groups + g * dim;
                    for (int64_t d = 0; d < dim; d++) o[d] += w * a[d];
                }
                for (int64_t d = 0; d < dim; d++) o[d] /= total;
            }
        }
    }
    free(state);
    return failed ? -1 : 0;
}
