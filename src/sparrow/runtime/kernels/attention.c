/* Grouped-query attention over a long fp32 KV cache, for CPUs: `decode_attention` for the one
 * new token of an AR decode step, `tree_attention` for the q new tokens of a tree verification
 * (or of a prompt appended to a cached video).
 *
 * decode_attention. Why: torch's CPU SDPA runs a decode step's attention as small-M matrix
 * products (M = the query heads that share a KV head, 6 for the benchmark shape), which use a
 * fraction of the memory bandwidth that reading K and V needs. Here each thread takes a chunk of
 * the cache of one KV head, reads every key and value once (scores for all of the head's queries
 * from one load of a key), and the chunks are merged with their softmax maxima and sums (split-K,
 * "flash decoding"), so a decode step's attention costs about a plain read of its K and V
 * (measurements: docs/runtime.md).
 *
 * Layout: q and out (kv_heads, groups, dim) contiguous; k and v rows of `dim` contiguous floats,
 * row r of head h at base + h * head_stride + r * row_stride (a view of a preallocated cache).
 * fp32 throughout; differs from SDPA by summation order and exp rounding only.
 *
 * Built for AVX-512, and decode_attention also for AVX2 with FMA, whose 16 registers take
 * its own blocking (below); elsewhere the functions return -1 and the caller keeps SDPA
 * (`decode_attention_available`, `tree_attention_available`; measurements: docs/runtime.md). */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "vector.h"

#define MAX_GROUPS 64

/* Combines the per-chunk partial results of `rows` query rows per KV head: state holds, per
 * work item (head h, chunk c) at (h * chunks + c) * rows * (dim + 2), the rows' maxima, their
 * sums of exponentials and their unnormalized outputs (rows, dim). A chunk whose maximum is
 * -inf (every key of it masked for that row) contributes nothing. */
static __attribute__((unused)) void merge(const float *state, float *out, int64_t kv_heads, int64_t chunks, int64_t rows,
                  int64_t dim) {
    for (int64_t h = 0; h < kv_heads; h++) {
        for (int64_t g = 0; g < rows; g++) {
            float m = -INFINITY, total = 0.0f;
            for (int64_t c = 0; c < chunks; c++) {
                float mc = state[(h * chunks + c) * rows * (dim + 2) + g];
                if (mc > m) m = mc;
            }
            float *o = out + (h * rows + g) * dim;
            memset(o, 0, sizeof(float) * dim);
            for (int64_t c = 0; c < chunks; c++) {
                const float *base = state + (h * chunks + c) * rows * (dim + 2);
                if (base[g] == -INFINITY) continue;
                float w = expf(base[g] - m);
                total += w * base[rows + g];
                const float *a = base + 2 * rows + g * dim;
                for (int64_t d = 0; d < dim; d++) o[d] += w * a[d];
            }
            for (int64_t d = 0; d < dim; d++) o[d] /= total;
        }
    }
}

#if defined(__AVX512F__)
#define HAVE_DECODE 1
#define HAVE_TREE 1

/* exp(x) for x <= 0 (scores minus their maximum), on 16 lanes: libm's expf is a scalar call,
 * and one call per score costs more than SDPA's whole attention over a long cache
 * (docs/runtime.md). Cephes' expf: x = n ln2 + r, |r| <= ln2 / 2, exp(r) by a degree-6
 * polynomial, 2^n through the exponent bits; within ~2 ulp of expf. Inputs below -87 (masked
 * keys: -inf) give 0, as expf's result there is below 2^-125 (a denormal) or zero. */
static inline __m512 exp_nonpositive16(__m512 input) {
    __m512 x = _mm512_max_ps(input, _mm512_set1_ps(-87.0f));
    __m512 n = _mm512_roundscale_ps(
        _mm512_add_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)), _mm512_set1_ps(0.5f)),
        _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_add_ps(_mm512_sub_ps(x, _mm512_mul_ps(n, _mm512_set1_ps(0.693359375f))),
                             _mm512_mul_ps(n, _mm512_set1_ps(2.12194440e-4f)));
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_add_ps(_mm512_add_ps(_mm512_mul_ps(_mm512_mul_ps(p, r), r), r), _mm512_set1_ps(1.0f));
    __m512i bits = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
    __m512 e = _mm512_mul_ps(p, _mm512_castsi512_ps(bits));
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(input, _mm512_set1_ps(-87.0f), _CMP_LT_OQ), e,
                                _mm512_setzero_ps());
}

/* scores[g][0..n) <- exp(score - maxima[g]); sums[g] <- their sum. */
static void exponentiate(float *scores, int64_t n, int64_t groups, const float *maxima, float *sums) {
    for (int64_t g = 0; g < groups; g++) {
        float *row = scores + g * n;
        /* explicit vectors: left to the compiler (omp simd over the scalar function) this loop
         * stays scalar, a large part of the decode kernel's time (docs/runtime.md) */
        const __m512 m = _mm512_set1_ps(maxima[g]);
        __m512 total = _mm512_setzero_ps();
        for (int64_t t = 0; t < n; t += VECTOR) {
            __mmask16 live = n - t >= VECTOR ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - t)) - 1u);
            __m512 e = exp_nonpositive16(_mm512_sub_ps(_mm512_maskz_loadu_ps(live, row + t), m));
            e = _mm512_maskz_mov_ps(live, e);
            _mm512_mask_storeu_ps(row + t, live, e);
            total = _mm512_add_ps(total, e);
        }
        sums[g] = _mm512_reduce_add_ps(total);
    }
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
            __m512 r = _mm512_mul_ps(vsums(part[g]), factor);
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

/* Scores of every query of one KV head against keys [begin, end), then their exponentials
 * (minus each query's maximum) and sums, then the exponential-weighted sum of the values. */
static void chunk(const float *q, const float *k, const float *v, int64_t groups, int64_t dim,
                  int64_t begin, int64_t end, int64_t k_row, int64_t v_row, float scale,
                  float *scores, float *maxima, float *sums, float *acc) {
    int64_t n = end - begin;
    if (dim == 64) {
        switch (groups) {  /* the shapes of real GQA models: 1-8 query heads per KV head */
#define CASE(G) case G: chunk64(G, q, k, v, begin, n, k_row, v_row, scale, scores, maxima, sums, acc); return;
            CASE(1) CASE(2) CASE(3) CASE(4) CASE(5) CASE(6) CASE(7) CASE(8)
#undef CASE
        }
    }
    for (int64_t g = 0; g < groups; g++) maxima[g] = -INFINITY;
    int vectorized = dim % VECTOR == 0;
    for (int64_t t = 0; t < n; t++) {
        const float *key = k + (begin + t) * k_row;
        for (int64_t g = 0; g < groups; g++) {
            const float *query = q + g * dim;
            float s = 0.0f;
            if (vectorized) {
                __m512 sum = _mm512_setzero_ps();
                for (int64_t d = 0; d < dim; d += VECTOR)
                    sum = _mm512_fmadd_ps(_mm512_loadu_ps(query + d), _mm512_loadu_ps(key + d), sum);
                s = _mm512_reduce_add_ps(sum);
            } else
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
            if (vectorized) {
                __m512 weight = _mm512_set1_ps(p);
                for (int64_t d = 0; d < dim; d += VECTOR)
                    _mm512_storeu_ps(a + d, _mm512_fmadd_ps(weight, _mm512_loadu_ps(value + d),
                                                            _mm512_loadu_ps(a + d)));
                continue;
            }
            for (int64_t d = 0; d < dim; d++) a[d] += p * value[d];
        }
    }
}

/* tree_attention. q new tokens over a cached prefix: every prefix key is visible to all of
 * them, and among the last `masked` keys (the tree, or the drafted levels) `visible` says which
 * ones each new token sees. Why: torch's CPU SDPA runs this (the query heads of a KV head packed
 * into the query axis, an additive (G*q, T) mask) below the machine's matrix-product rate over a
 * long cache (docs/runtime.md).
 *
 * Work items are (KV head, chunk of keys) as in decode_attention. Within an item, query rows go
 * in blocks of 48 (3 vectors of 16) and the arithmetic runs with rows along the vector lanes, so
 * neither keys nor values are ever transposed: scores (key, row) = sum_d k[key][d] * qt[d][row]
 * with k[key][d] broadcast (8 keys x 48 rows = 24 accumulators), then the softmax down each
 * column (vectorized over rows), then outputs (d, row) = sum_key v[key][d] * p[key][row] (8 dims
 * x 48 rows). The queries are transposed once per call (rows x dim, small). */
#define ROW_BLOCK 48

static inline __attribute__((always_inline)) void scores_kernel(
    const int KB, const int RV, const float *qt, int64_t stride, const float *k, int64_t k_row,
    int64_t dim, float *st) {
    __m512 acc[8][3];  /* fixed sizes (not [KB][RV]): a variable-length array stays in memory */
    _Pragma("GCC unroll 8") for (int kb = 0; kb < KB; kb++)
        _Pragma("GCC unroll 4") for (int j = 0; j < RV; j++) acc[kb][j] = _mm512_setzero_ps();
    for (int64_t d = 0; d < dim; d++) {
        __m512 qv[3];
        _Pragma("GCC unroll 4") for (int j = 0; j < RV; j++) qv[j] = _mm512_loadu_ps(qt + d * stride + 16 * j);
        _Pragma("GCC unroll 8") for (int kb = 0; kb < KB; kb++) {
            __m512 key = _mm512_set1_ps(k[kb * k_row + d]);
            _Pragma("GCC unroll 4") for (int j = 0; j < RV; j++) acc[kb][j] = _mm512_fmadd_ps(key, qv[j], acc[kb][j]);
        }
    }
    _Pragma("GCC unroll 8") for (int kb = 0; kb < KB; kb++)
        _Pragma("GCC unroll 4") for (int j = 0; j < RV; j++) _mm512_storeu_ps(st + kb * ROW_BLOCK + 16 * j, acc[kb][j]);
}

static inline __attribute__((always_inline)) void values_kernel(
    const int RV, const float *st, int64_t n, const float *v, int64_t v_row, float *ot) {
    __m512 acc[8][3];
    _Pragma("GCC unroll 8") for (int db = 0; db < 8; db++)
        _Pragma("GCC unroll 4") for (int j = 0; j < RV; j++) acc[db][j] = _mm512_setzero_ps();
    for (int64_t t = 0; t < n; t++) {
        __m512 p[3];
        _Pragma("GCC unroll 4") for (int j = 0; j < RV; j++) p[j] = _mm512_loadu_ps(st + t * ROW_BLOCK + 16 * j);
        const float *value = v + t * v_row;
        _Pragma("GCC unroll 8") for (int db = 0; db < 8; db++) {
            __m512 x = _mm512_set1_ps(value[db]);
            _Pragma("GCC unroll 4") for (int j = 0; j < RV; j++) acc[db][j] = _mm512_fmadd_ps(x, p[j], acc[db][j]);
        }
    }
    _Pragma("GCC unroll 8") for (int db = 0; db < 8; db++)
        _Pragma("GCC unroll 4") for (int j = 0; j < RV; j++) _mm512_storeu_ps(ot + db * ROW_BLOCK + 16 * j, acc[db][j]);
}

/* One block of up to 48 query rows (RV vectors) of one KV head against keys [begin, begin + n):
 * their maxima, sums and unnormalized outputs into maxima[r], sums[r], acc[r * dim ...). */
static inline __attribute__((always_inline)) void tree_block(
    const int RV, const float *qt, int64_t stride, int64_t live, int64_t row0, int64_t queries,
    const float *k, int64_t k_row, const float *v, int64_t v_row, int64_t dim, int64_t begin,
    int64_t n, int64_t length, int64_t masked, const uint8_t *visible, float scale, float *st,
    float *ot, float *maxima, float *sums, float *acc) {
    int64_t t = 0;
    for (; t + 8 <= n; t += 8)
        scores_kernel(8, RV, qt, stride, k + (begin + t) * k_row, k_row, dim, st + t * ROW_BLOCK);
    for (; t < n; t++)
        scores_kernel(1, RV, qt, stride, k + (begin + t) * k_row, k_row, dim, st + t * ROW_BLOCK);
    int64_t first = length - masked;  /* keys at or after it follow `visible` */
    for (t = first > begin ? first - begin : 0; t < n; t++) {
        const uint8_t *column = visible + (begin + t - first);
        for (int64_t r = 0; r < live; r++)
            if (!column[((row0 + r) % queries) * masked]) st[t * ROW_BLOCK + r] = -INFINITY;
    }
    /* the softmax down each column: scale, maxima, exponentials and their sums, RV vectors of
     * rows at a time (a column whose keys are all masked keeps maximum -inf and sum 0) */
    const __m512 factor = _mm512_set1_ps(scale);
    __m512 mx[3], shift[3], total[3];
    _Pragma("GCC unroll 4") for (int j = 0; j < RV; j++)
        mx[j] = _mm512_set1_ps(-INFINITY), total[j] = _mm512_setzero_ps();
    for (t = 0; t < n; t++) {
        _Pragma("GCC unroll 4") for (int j = 0; j < RV; j++) {
            __m512 x = _mm512_mul_ps(_mm512_loadu_ps(st + t * ROW_BLOCK + 16 * j), factor);
            _mm512_storeu_ps(st + t * ROW_BLOCK + 16 * j, x);
            mx[j] = _mm512_max_ps(mx[j], x);
        }
    }
    _Pragma("GCC unroll 4") for (int j = 0; j < RV; j++)  /* -inf maxima: shift by 0 instead */
        shift[j] = _mm512_mask_blend_ps(
            _mm512_cmp_ps_mask(mx[j], _mm512_set1_ps(-INFINITY), _CMP_EQ_OQ), mx[j], _mm512_setzero_ps());
    for (t = 0; t < n; t++) {
        _Pragma("GCC unroll 4") for (int j = 0; j < RV; j++) {
            float *s = st + t * ROW_BLOCK + 16 * j;
            __m512 e = exp_nonpositive16(_mm512_sub_ps(_mm512_loadu_ps(s), shift[j]));
            _mm512_storeu_ps(s, e);
            total[j] = _mm512_add_ps(total[j], e);
        }
    }
    float maxima_block[ROW_BLOCK], totals_block[ROW_BLOCK];
    _Pragma("GCC unroll 4") for (int j = 0; j < RV; j++) {
        _mm512_storeu_ps(maxima_block + 16 * j, mx[j]);
        _mm512_storeu_ps(totals_block + 16 * j, total[j]);
    }
    for (int64_t d0 = 0; d0 < dim; d0 += 8)
        values_kernel(RV, st, n, v + begin * v_row + d0, v_row, ot + d0 * ROW_BLOCK);
    for (int64_t r = 0; r < live; r++) {
        maxima[r] = maxima_block[r];
        sums[r] = totals_block[r];
        for (int64_t d = 0; d < dim; d++) acc[r * dim + d] = ot[d * ROW_BLOCK + r];
    }
}

/* The block of `live` rows through tree_block with as many vectors as it needs. */
static void row_block(const float *qt, int64_t stride, int64_t live, int64_t row0, int64_t queries,
                      const float *k, int64_t k_row, const float *v, int64_t v_row, int64_t dim,
                      int64_t begin, int64_t n, int64_t length, int64_t masked, const uint8_t *visible,
                      float scale, float *st, float *ot, float *maxima, float *sums, float *acc) {
    switch ((live + 15) / 16) {
#define CASE(RV) case RV: tree_block(RV, qt, stride, live, row0, queries, k, k_row, v, v_row, dim, \
    begin, n, length, masked, visible, scale, st, ot, maxima, sums, acc); break;
        CASE(1) CASE(2) CASE(3)
#undef CASE
    }
}


#elif defined(__AVX2__) && defined(__FMA__)
/* AVX2 decode_attention. The AVX-512 blocking does not fit AVX2's 16 registers (G queries x 64
 * dims is 8 G vectors of 8), and a build of it spilled until it was slower than SDPA
 * (docs/runtime.md). Here: scores for 8 keys at a time and one query, two accumulators per key
 * to halve the FMA chain, the 8 partial vectors summed together (`vsums`); keys come from L1
 * for the second and later queries of the KV head (8 keys are 2 KB). Values in blocks of up to
 * 3 queries x 32 dims (12 accumulators), so each value row is loaded from memory once per
 * block and reused from L1. */
#define HAVE_DECODE 1

/* exp(x) for x <= 0 on 8 lanes: the AVX-512 version's Cephes polynomial, the same operations. */
static inline __m256 exp_nonpositive8(__m256 input) {
    __m256 x = _mm256_max_ps(input, _mm256_set1_ps(-87.0f));
    __m256 n = _mm256_floor_ps(
        _mm256_add_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)), _mm256_set1_ps(0.5f)));
    __m256 r = _mm256_add_ps(_mm256_sub_ps(x, _mm256_mul_ps(n, _mm256_set1_ps(0.693359375f))),
                             _mm256_mul_ps(n, _mm256_set1_ps(2.12194440e-4f)));
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_add_ps(_mm256_add_ps(_mm256_mul_ps(_mm256_mul_ps(p, r), r), r), _mm256_set1_ps(1.0f));
    __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    __m256 e = _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
    return _mm256_blendv_ps(e, _mm256_setzero_ps(), _mm256_cmp_ps(input, _mm256_set1_ps(-87.0f), _CMP_LT_OQ));
}

/* scores[g][0..n) <- exp(score - maxima[g]); sums[g] <- their sum. */
static void exponentiate(float *scores, int64_t n, int64_t groups, const float *maxima, float *sums) {
    for (int64_t g = 0; g < groups; g++) {
        float *row = scores + g * n;
        const __m256 m = _mm256_set1_ps(maxima[g]);
        __m256 total = _mm256_setzero_ps();
        int64_t t = 0;
        for (; t + 8 <= n; t += 8) {
            __m256 e = exp_nonpositive8(_mm256_sub_ps(_mm256_loadu_ps(row + t), m));
            _mm256_storeu_ps(row + t, e);
            total = _mm256_add_ps(total, e);
        }
        float sum = vsum(total);
        for (; t < n; t++) {  /* the last n % 8: through the same polynomial, one lane used */
            float e = _mm256_cvtss_f32(exp_nonpositive8(_mm256_set1_ps(row[t] - maxima[g])));
            row[t] = e;
            sum += e;
        }
        sums[g] = sum;
    }
}

static inline float dot(const float *a, const float *b, int64_t dim) {
    int64_t d = 0;
    float s = 0.0f;
    if (dim >= 8) {
        __m256 x = _mm256_mul_ps(_mm256_loadu_ps(a), _mm256_loadu_ps(b)), y = _mm256_setzero_ps();
        for (d = 8; d + 16 <= dim; d += 16) {
            x = _mm256_fmadd_ps(_mm256_loadu_ps(a + d), _mm256_loadu_ps(b + d), x);
            y = _mm256_fmadd_ps(_mm256_loadu_ps(a + d + 8), _mm256_loadu_ps(b + d + 8), y);
        }
        for (; d + 8 <= dim; d += 8) x = _mm256_fmadd_ps(_mm256_loadu_ps(a + d), _mm256_loadu_ps(b + d), x);
        s = vsum(_mm256_add_ps(x, y));
    }
    for (; d < dim; d++) s += a[d] * b[d];
    return s;
}

/* The partial dot products of one query with 8 keys (dim a multiple of 8), as 8 vectors. */
static inline void dots8(const float *query, const float *k, int64_t k_row, int64_t dim, __m256 *part) {
    for (int jj = 0; jj < 8; jj++) {
        const float *key = k + jj * k_row;
        __m256 x = _mm256_mul_ps(_mm256_loadu_ps(query), _mm256_loadu_ps(key)), y = _mm256_setzero_ps();
        int64_t d = 8;
        for (; d + 16 <= dim; d += 16) {
            x = _mm256_fmadd_ps(_mm256_loadu_ps(query + d), _mm256_loadu_ps(key + d), x);
            y = _mm256_fmadd_ps(_mm256_loadu_ps(query + d + 8), _mm256_loadu_ps(key + d + 8), y);
        }
        if (d < dim) x = _mm256_fmadd_ps(_mm256_loadu_ps(query + d), _mm256_loadu_ps(key + d), x);
        part[jj] = _mm256_add_ps(x, y);
    }
}

/* acc[g][d0 .. d0 + 8 DN) for GN queries from `first`: the exponential-weighted sum of values. */
static inline __attribute__((always_inline)) void values_block(
    const int GN, const int DN, const float *scores, int64_t n, const float *v, int64_t begin,
    int64_t v_row, int64_t dim, int64_t first, int64_t d0, float *acc) {
    __m256 a[3][4];
    _Pragma("GCC unroll 3") for (int g = 0; g < GN; g++)
        _Pragma("GCC unroll 4") for (int j = 0; j < DN; j++) a[g][j] = _mm256_setzero_ps();
    for (int64_t i = 0; i < n; i++) {
        const float *value = v + (begin + i) * v_row + d0;
        _Pragma("GCC unroll 3") for (int g = 0; g < GN; g++) {
            __m256 p = _mm256_broadcast_ss(scores + (first + g) * n + i);
            _Pragma("GCC unroll 4") for (int j = 0; j < DN; j++)
                a[g][j] = _mm256_fmadd_ps(p, _mm256_loadu_ps(value + 8 * j), a[g][j]);
        }
    }
    _Pragma("GCC unroll 3") for (int g = 0; g < GN; g++)
        _Pragma("GCC unroll 4") for (int j = 0; j < DN; j++)
            _mm256_storeu_ps(acc + (first + g) * dim + d0 + 8 * j, a[g][j]);
}

static void chunk(const float *q, const float *k, const float *v, int64_t groups, int64_t dim,
                  int64_t begin, int64_t end, int64_t k_row, int64_t v_row, float scale,
                  float *scores, float *maxima, float *sums, float *acc) {
    int64_t n = end - begin;
    int vectorized = dim % 8 == 0;
    float mx[MAX_GROUPS];
    for (int64_t g = 0; g < groups; g++) mx[g] = -INFINITY;
    int64_t t = 0;
    if (vectorized)
        for (; t + 8 <= n; t += 8) {  /* 8 keys from memory, then from L1 for every query */
            const float *keys = k + (begin + t) * k_row;
            for (int jj = 0; jj < 8; jj++)  /* their values, on the way to L2 for the value pass */
                for (int64_t d = 0; d < dim; d += 16)
                    _mm_prefetch((const char *)(v + (begin + t + jj) * v_row + d), _MM_HINT_T1);
            for (int64_t g = 0; g < groups; g++) {
                __m256 part[8];
                dots8(q + g * dim, keys, k_row, dim, part);
                __m256 s = _mm256_mul_ps(vsums(part), _mm256_set1_ps(scale));
                _mm256_storeu_ps(scores + g * n + t, s);
                __m128 h = _mm_max_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
                h = _mm_max_ps(h, _mm_movehl_ps(h, h));
                float m = _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));
                if (m > mx[g]) mx[g] = m;
            }
        }
    for (; t < n; t++)
        for (int64_t g = 0; g < groups; g++) {
            float s = dot(q + g * dim, k + (begin + t) * k_row, dim) * scale;
            scores[g * n + t] = s;
            if (s > mx[g]) mx[g] = s;
        }
    for (int64_t g = 0; g < groups; g++) maxima[g] = mx[g];
    exponentiate(scores, n, groups, maxima, sums);
    if (!vectorized) {
        memset(acc, 0, sizeof(float) * groups * dim);
        for (int64_t i = 0; i < n; i++) {
            const float *value = v + (begin + i) * v_row;
            for (int64_t g = 0; g < groups; g++)
                for (int64_t d = 0; d < dim; d++) acc[g * dim + d] += scores[g * n + i] * value[d];
        }
        return;
    }
    for (int64_t first = 0; first < groups; first += 3) {
        int gn = groups - first < 3 ? (int)(groups - first) : 3;
        for (int64_t d0 = 0; d0 < dim; d0 += 32) {
            int dn = dim - d0 < 32 ? (int)((dim - d0) / 8) : 4;
            switch (gn * 4 + dn - 5) {  /* (gn, dn) in [1, 3] x [1, 4] */
#define CASE(G, D) case G * 4 + D - 5: values_block(G, D, scores, n, v, begin, v_row, dim, first, d0, acc); break;
                CASE(1, 1) CASE(1, 2) CASE(1, 3) CASE(1, 4) CASE(2, 1) CASE(2, 2) CASE(2, 3) CASE(2, 4)
                CASE(3, 1) CASE(3, 2) CASE(3, 3) CASE(3, 4)
#undef CASE
            }
        }
    }
}
/* AVX2 tree_attention: the AVX-512 kernel's scheme (rows along the lanes, keys and values never
 * transposed) in blocks that fit 16 registers: 16 query rows (2 vectors of 8) x 6 keys for the
 * scores (12 accumulators). Values: blocks of 9-16 rows turn to dims along the lanes (6 rows x
 * 16 dims, `values_rows`); blocks of up to 8 rows keep rows along the lanes (8 dims x 1 vector
 * of rows, `values_kernel`). */
#define HAVE_TREE 1
#define ROW_BLOCK 16

static inline __attribute__((always_inline)) void scores_kernel(
    const int KB, const int RV, const float *qt, int64_t stride, const float *k, int64_t k_row,
    int64_t dim, float *st) {
    __m256 acc[6][2];
    _Pragma("GCC unroll 6") for (int kb = 0; kb < KB; kb++)
        _Pragma("GCC unroll 2") for (int j = 0; j < RV; j++) acc[kb][j] = _mm256_setzero_ps();
    for (int64_t d = 0; d < dim; d++) {
        __m256 qv[2];
        _Pragma("GCC unroll 2") for (int j = 0; j < RV; j++) qv[j] = _mm256_loadu_ps(qt + d * stride + 8 * j);
        _Pragma("GCC unroll 6") for (int kb = 0; kb < KB; kb++) {
            __m256 key = _mm256_broadcast_ss(k + kb * k_row + d);
            _Pragma("GCC unroll 2") for (int j = 0; j < RV; j++) acc[kb][j] = _mm256_fmadd_ps(key, qv[j], acc[kb][j]);
        }
    }
    _Pragma("GCC unroll 6") for (int kb = 0; kb < KB; kb++)
        _Pragma("GCC unroll 2") for (int j = 0; j < RV; j++) _mm256_storeu_ps(st + kb * ROW_BLOCK + 8 * j, acc[kb][j]);
}

/* outputs (d0 + db, row) for 8 dims and up to 8 rows (one vector of rows): sum over the n keys
 * of v[key][d] * p[key][row]. Blocks of more rows take `values_rows`. */
static inline __attribute__((always_inline)) void values_kernel(
    const float *st, int64_t n, const float *v, int64_t v_row, float *ot) {
    __m256 acc[8];
    _Pragma("GCC unroll 8") for (int db = 0; db < 8; db++) acc[db] = _mm256_setzero_ps();
    for (int64_t t = 0; t < n; t++) {
        const __m256 p = _mm256_loadu_ps(st + t * ROW_BLOCK);
        const float *value = v + t * v_row;
        _Pragma("GCC unroll 8") for (int db = 0; db < 8; db++)
            acc[db] = _mm256_fmadd_ps(_mm256_broadcast_ss(value + db), p, acc[db]);
    }
    _Pragma("GCC unroll 8") for (int db = 0; db < 8; db++) _mm256_storeu_ps(ot + db * ROW_BLOCK, acc[db]);
}

/* out[r][d0 ..] for RB rows and DV vectors of dims: sum over the n keys of p[key][r] * v[key][d],
 * the dims along the lanes (a value row is contiguous) and a row's weight broadcast. From 9 rows
 * on it beats values_kernel, whose output needs a transpose besides; at 8 rows or fewer it loses
 * (docs/runtime.md). */
static inline __attribute__((always_inline)) void values_rows_kernel(
    const int RB, const int DV, const float *st, int64_t n, const float *v, int64_t v_row,
    float *out, int64_t out_row) {
    __m256 acc[6][2];
    _Pragma("GCC unroll 6") for (int r = 0; r < RB; r++)
        _Pragma("GCC unroll 2") for (int j = 0; j < DV; j++) acc[r][j] = _mm256_setzero_ps();
    for (int64_t t = 0; t < n; t++) {
        __m256 x[2];
        _Pragma("GCC unroll 2") for (int j = 0; j < DV; j++) x[j] = _mm256_loadu_ps(v + t * v_row + 8 * j);
        _Pragma("GCC unroll 6") for (int r = 0; r < RB; r++) {
            __m256 p = _mm256_broadcast_ss(st + t * ROW_BLOCK + r);
            _Pragma("GCC unroll 2") for (int j = 0; j < DV; j++) acc[r][j] = _mm256_fmadd_ps(p, x[j], acc[r][j]);
        }
    }
    _Pragma("GCC unroll 6") for (int r = 0; r < RB; r++)
        _Pragma("GCC unroll 2") for (int j = 0; j < DV; j++) _mm256_storeu_ps(out + r * out_row + 8 * j, acc[r][j]);
}

#define VALUES_ROWS_CASE(RB) case RB: \
    if (dv == 2) values_rows_kernel(RB, 2, st, n, v, v_row, out, out_row); \
    else values_rows_kernel(RB, 1, st, n, v, v_row, out, out_row); \
    break;
static void values_rows(int rb, int dv, const float *st, int64_t n, const float *v, int64_t v_row,
                        float *out, int64_t out_row) {
    switch (rb) {
        VALUES_ROWS_CASE(1) VALUES_ROWS_CASE(2) VALUES_ROWS_CASE(3)
        VALUES_ROWS_CASE(4) VALUES_ROWS_CASE(5) VALUES_ROWS_CASE(6)
        default: break;
    }
}

/* One block of up to 16 query rows (RV = 1 or 2 vectors of 8) of one KV head against keys
 * [begin, begin + n): their maxima, sums and unnormalized outputs into maxima[r], sums[r],
 * acc[r * dim ...). */
static inline __attribute__((always_inline)) void tree_block(
    const int RV, const float *qt, int64_t stride, int64_t live, int64_t row0, int64_t queries,
    const float *k, int64_t k_row, const float *v, int64_t v_row, int64_t dim, int64_t begin,
    int64_t n, int64_t length, int64_t masked, const uint8_t *visible, float scale, float *st,
    float *ot, float *maxima, float *sums, float *acc) {
    int64_t t = 0;
    for (; t + 6 <= n; t += 6)
        scores_kernel(6, RV, qt, stride, k + (begin + t) * k_row, k_row, dim, st + t * ROW_BLOCK);
    for (; t < n; t++)
        scores_kernel(1, RV, qt, stride, k + (begin + t) * k_row, k_row, dim, st + t * ROW_BLOCK);
    int64_t first = length - masked;  /* keys at or after it follow `visible` */
    for (t = first > begin ? first - begin : 0; t < n; t++) {
        const uint8_t *column = visible + (begin + t - first);
        for (int64_t r = 0; r < live; r++)
            if (!column[((row0 + r) % queries) * masked]) st[t * ROW_BLOCK + r] = -INFINITY;
    }
    const __m256 factor = _mm256_set1_ps(scale), minus_inf = _mm256_set1_ps(-INFINITY);
    __m256 mx[2], shift[2], total[2];
    _Pragma("GCC unroll 2") for (int j = 0; j < RV; j++) mx[j] = minus_inf, total[j] = _mm256_setzero_ps();
    for (t = 0; t < n; t++) {
        _Pragma("GCC unroll 2") for (int j = 0; j < RV; j++) {
            __m256 x = _mm256_mul_ps(_mm256_loadu_ps(st + t * ROW_BLOCK + 8 * j), factor);
            _mm256_storeu_ps(st + t * ROW_BLOCK + 8 * j, x);
            mx[j] = _mm256_max_ps(mx[j], x);
        }
    }
    _Pragma("GCC unroll 2") for (int j = 0; j < RV; j++)  /* -inf maxima: shift by 0 instead */
        shift[j] = _mm256_blendv_ps(mx[j], _mm256_setzero_ps(), _mm256_cmp_ps(mx[j], minus_inf, _CMP_EQ_OQ));
    for (t = 0; t < n; t++) {
        _Pragma("GCC unroll 2") for (int j = 0; j < RV; j++) {
            float *s = st + t * ROW_BLOCK + 8 * j;
            __m256 e = exp_nonpositive8(_mm256_sub_ps(_mm256_loadu_ps(s), shift[j]));
            _mm256_storeu_ps(s, e);
            total[j] = _mm256_add_ps(total[j], e);
        }
    }
    float maxima_block[ROW_BLOCK], totals_block[ROW_BLOCK];
    _Pragma("GCC unroll 2") for (int j = 0; j < RV; j++) {
        _mm256_storeu_ps(maxima_block + 8 * j, mx[j]);
        _mm256_storeu_ps(totals_block + 8 * j, total[j]);
    }
    if (RV == 2) {
        for (int64_t r0 = 0; r0 < live; r0 += 6)
            for (int64_t d0 = 0; d0 < dim; d0 += 16)
                values_rows(live - r0 < 6 ? (int)(live - r0) : 6, dim - d0 >= 16 ? 2 : 1, st + r0, n,
                            v + begin * v_row + d0, v_row, acc + r0 * dim + d0, dim);
    } else {
        for (int64_t d0 = 0; d0 < dim; d0 += 8)
            values_kernel(st, n, v + begin * v_row + d0, v_row, ot + d0 * ROW_BLOCK);
        for (int64_t r = 0; r < live; r++)
            for (int64_t d = 0; d < dim; d++) acc[r * dim + d] = ot[d * ROW_BLOCK + r];
    }
    for (int64_t r = 0; r < live; r++) {
        maxima[r] = maxima_block[r];
        sums[r] = totals_block[r];
    }
}

static void row_block(const float *qt, int64_t stride, int64_t live, int64_t row0, int64_t queries,
                      const float *k, int64_t k_row, const float *v, int64_t v_row, int64_t dim,
                      int64_t begin, int64_t n, int64_t length, int64_t masked, const uint8_t *visible,
                      float scale, float *st, float *ot, float *maxima, float *sums, float *acc) {
    if (live > 8)
        tree_block(2, qt, stride, live, row0, queries, k, k_row, v, v_row, dim, begin, n, length,
                   masked, visible, scale, st, ot, maxima, sums, acc);
    else
        tree_block(1, qt, stride, live, row0, queries, k, k_row, v, v_row, dim, begin, n, length,
                   masked, visible, scale, st, ot, maxima, sums, acc);
}
#endif

#if HAVE_DECODE
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
    if (!failed) merge(state, out, kv_heads, chunks, groups, dim);
    free(state);
    return failed ? -1 : 0;
}

int decode_attention_available(void) { return 1; }
#else /* neither AVX-512 nor AVX2 with FMA: the caller keeps SDPA */
int decode_attention(const float *q, const float *k, const float *v, float *out, int64_t kv_heads,
                     int64_t groups, int64_t dim, int64_t length, int64_t k_head, int64_t k_row,
                     int64_t v_head, int64_t v_row, float scale, int64_t chunks, int threads) {
    (void)q, (void)k, (void)v, (void)out, (void)kv_heads, (void)groups, (void)dim, (void)length;
    (void)k_head, (void)k_row, (void)v_head, (void)v_row, (void)scale, (void)chunks, (void)threads;
    return -1;
}

int decode_attention_available(void) { return 0; }
#endif

#if HAVE_TREE
/* q, out: (kv_heads, rows, dim) contiguous, rows = groups * queries, row g * queries + i being
 * query head g (of the KV head) of new token i. k, v: as for decode_attention, `length` keys.
 * visible: (queries, masked) bytes over the keys [length - masked, length): nonzero where new
 * token i sees that key. dim must be a multiple of 8. Returns 0, or -1 (bad shape, out of
 * memory: the caller falls back). */
int tree_attention(const float *q, const float *k, const float *v, const uint8_t *visible,
                   float *out, int64_t kv_heads, int64_t rows, int64_t queries, int64_t dim,
                   int64_t length, int64_t masked, int64_t k_head, int64_t k_row, int64_t v_head,
                   int64_t v_row, float scale, int64_t chunks, int threads) {
    if (dim < 8 || dim % 8 || rows < 1 || queries < 1 || rows % queries || masked < 0
        || masked > length || chunks < 1 || length < 1)
        return -1;
    int64_t blocks = (rows + ROW_BLOCK - 1) / ROW_BLOCK, padded = blocks * ROW_BLOCK;
    int64_t items = kv_heads * chunks, per = (length + chunks - 1) / chunks;
    float *qt = calloc(kv_heads * dim * padded, sizeof(float));
    float *state = malloc(sizeof(float) * items * rows * (dim + 2));
    if (!qt || !state) {
        free(qt);
        free(state);
        return -1;
    }
    for (int64_t h = 0; h < kv_heads; h++)
        for (int64_t r = 0; r < rows; r++)
            for (int64_t d = 0; d < dim; d++)
                qt[(h * dim + d) * padded + r] = q[(h * rows + r) * dim + d];
    int failed = 0;
#pragma omp parallel for num_threads(threads) schedule(static) reduction(| : failed)
    for (int64_t item = 0; item < items; item++) {
        int64_t h = item / chunks, c = item % chunks;
        int64_t begin = c * per, end = begin + per < length ? begin + per : length;
        float *maxima = state + item * rows * (dim + 2), *sums = maxima + rows, *acc = sums + rows;
        if (begin >= end) {
            for (int64_t r = 0; r < rows; r++) maxima[r] = -INFINITY, sums[r] = 0.0f;
            memset(acc, 0, sizeof(float) * rows * dim);
            continue;
        }
        int64_t n = end - begin;
        float *st = malloc(sizeof(float) * n * ROW_BLOCK), *ot = malloc(sizeof(float) * dim * ROW_BLOCK);
        if (!st || !ot) {
            free(st);
            free(ot);
            failed = 1;
            continue;
        }
        for (int64_t b = 0; b < blocks; b++) {
            int64_t row0 = b * ROW_BLOCK, live = rows - row0 < ROW_BLOCK ? rows - row0 : ROW_BLOCK;
            const float *qb = qt + h * dim * padded + row0;
            const float *kh = k + h * k_head, *vh = v + h * v_head;
            row_block(qb, padded, live, row0, queries, kh, k_row, vh, v_row, dim, begin, n, length,
                      masked, visible, scale, st, ot, maxima + row0, sums + row0, acc + row0 * dim);
        }
        free(st);
        free(ot);
    }
    if (!failed) merge(state, out, kv_heads, chunks, rows, dim);
    free(qt);
    free(state);
    return failed ? -1 : 0;
}

int tree_attention_available(void) { return 1; }
#else /* neither AVX-512 nor AVX2 with FMA: the caller keeps SDPA */
int tree_attention(const float *q, const float *k, const float *v, const uint8_t *visible,
                   float *out, int64_t kv_heads, int64_t rows, int64_t queries, int64_t dim,
                   int64_t length, int64_t masked, int64_t k_head, int64_t k_row, int64_t v_head,
                   int64_t v_row, float scale, int64_t chunks, int threads) {
    (void)q, (void)k, (void)v, (void)visible, (void)out, (void)kv_heads, (void)rows, (void)queries;
    (void)dim, (void)length, (void)masked, (void)k_head, (void)k_row, (void)v_head, (void)v_row;
    (void)scale, (void)chunks, (void)threads;
    return -1;
}

int tree_attention_available(void) { return 0; }
#endif

/* The vector width the kernels were built with (16: AVX-512, 8: AVX2, 1: neither): the caller's
 * length thresholds depend on it. */
int attention_lanes(void) { return VECTOR; }
