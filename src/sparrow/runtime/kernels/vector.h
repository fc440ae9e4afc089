/* Shared by the native kernels: the AVX-512 helpers, and for the row kernel (`linear.c`) one
 * float vector type with the few operations it uses, on AVX-512 (16 lanes) or AVX2 with FMA
 * (8 lanes), whichever the compiler targets (-march=native). With neither, SPARROW_VECTORIZED
 * is 0 and the row kernel says it is not available (the caller keeps torch's kernels).
 *
 * The AVX-512 operations are, one to one, the intrinsics the row kernel would use written
 * directly, so the header costs its AVX-512 build nothing (docs/runtime.md); each AVX2 one
 * computes the same lanes. */
#ifndef SPARROW_VECTOR_H
#define SPARROW_VECTOR_H

#if defined(__AVX512F__)
#include <immintrin.h>
#define SPARROW_VECTORIZED 1
#define VECTOR 16
typedef __m512 vec;
typedef __mmask16 vmask;

static inline vec vzero(void) { return _mm512_setzero_ps(); }
static inline vec vload(const float *p) { return _mm512_loadu_ps(p); }
static inline void vstore(float *p, vec v) { _mm512_storeu_ps(p, v); }
static inline vec vadd(vec a, vec b) { return _mm512_add_ps(a, b); }
static inline vec vfmadd(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
static inline float vsum(vec v) { return _mm512_reduce_add_ps(v); }
/* lanes [0, n), for 0 < n < VECTOR */
static inline vmask vtail(int n) { return (vmask)((1u << n) - 1u); }
/* lanes m of p, the others 0 (nothing outside them is read) */
static inline vec vload_masked(vmask m, const float *p) { return _mm512_maskz_loadu_ps(m, p); }

/* The 16 sums of 16 vectors, in order, in 45 instructions instead of 16 full reductions. */
static inline vec vsums(const vec *v) {
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

#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define SPARROW_VECTORIZED 1
#define VECTOR 8
typedef __m256 vec;
typedef __m256 vmask;  /* all-ones lanes where true */

static inline vec vzero(void) { return _mm256_setzero_ps(); }
static inline vec vload(const float *p) { return _mm256_loadu_ps(p); }
static inline void vstore(float *p, vec v) { _mm256_storeu_ps(p, v); }
static inline vec vadd(vec a, vec b) { return _mm256_add_ps(a, b); }
static inline vec vfmadd(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
static inline float vsum(vec v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
static inline vmask vtail(int n) {
    __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    return _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(n), lanes));
}
static inline vec vload_masked(vmask m, const float *p) { return _mm256_maskload_ps(p, _mm256_castps_si256(m)); }

/* The 8 sums of 8 vectors, in order. */
static inline vec vsums(const vec *v) {
    __m256 t[4], u[2];
    for (int i = 0; i < 4; i++) t[i] = _mm256_hadd_ps(v[2 * i], v[2 * i + 1]);
    for (int i = 0; i < 2; i++) u[i] = _mm256_hadd_ps(t[2 * i], t[2 * i + 1]);
    return _mm256_add_ps(_mm256_permute2f128_ps(u[0], u[1], 0x20), _mm256_permute2f128_ps(u[0], u[1], 0x31));
}

#else
#define SPARROW_VECTORIZED 0
#define VECTOR 1
#endif

#endif
