/* y = W x + b for one input row (the linears of an AR decode step), for CPUs.
 *
 * Why: a decode step reads every weight once, so its linears are a stream of the weights. Over
 * the linears of a 120M Qwen2-shaped model, oneDNN's packed kernel streamed 14-41 GB/s per
 * shape (down to 14 GB/s for a 768 x 128 projection) and MKL ~13 GB/s, where a plain pass of 16
 * rows at a time, reduced together, streams 47-60 GB/s on the same machine (2 threads).
 *
 * W: (out, in) rows of `in` contiguous floats, `row` floats apart (nn.Linear's weight); x:
 * `in` floats; b: `out` floats or NULL; y: `out` floats. Threads take blocks of 16 output rows.
 * fp32; differs from torch's kernels by summation order only (~1e-7 relative).
 *
 * AVX-512 only (`linear_row_available`): the scalar pass a build without it would make streams
 * far slower than oneDNN and, summing serially, was up to 2.4x less exact than torch (measured
 * on an AVX2-only EPYC, 768 x 768), so there the caller keeps torch's kernels. */
#include <stdint.h>
#include <stddef.h>

#include "vector.h"

static float dot(const float *w, const float *x, int64_t in) {
    int64_t i = 0;
    float s = 0.0f;
#if defined(__AVX512F__)
    __m512 acc = _mm512_setzero_ps();
    for (; i + VECTOR <= in; i += VECTOR)
        acc = _mm512_fmadd_ps(_mm512_loadu_ps(w + i), _mm512_loadu_ps(x + i), acc);
    s = _mm512_reduce_add_ps(acc);
#endif
    for (; i < in; i++) s += w[i] * x[i];
    return s;
}

void linear_row(const float *x, const float *w, int64_t row, const float *b, float *y,
                int64_t out, int64_t in, int threads) {
    int64_t blocks = out / 16;
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static) nowait
        for (int64_t block = 0; block < blocks; block++) {
            const float *rows = w + block * 16 * row;
#if defined(__AVX512F__)
            __m512 acc[16];
            for (int r = 0; r < 16; r++) acc[r] = _mm512_setzero_ps();
            int64_t i = 0;
            for (; i + VECTOR <= in; i += VECTOR) {
                __m512 xv = _mm512_loadu_ps(x + i);
                for (int r = 0; r < 16; r++)
                    acc[r] = _mm512_fmadd_ps(_mm512_loadu_ps(rows + r * row + i), xv, acc[r]);
            }
            if (i < in) {  /* the last in % 16 columns, masked */
                __mmask16 tail = (__mmask16)((1u << (in - i)) - 1u);
                __m512 xv = _mm512_maskz_loadu_ps(tail, x + i);
                for (int r = 0; r < 16; r++)
                    acc[r] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(tail, rows + r * row + i), xv, acc[r]);
            }
            __m512 sums = reduce16(acc);
            if (b) sums = _mm512_add_ps(sums, _mm512_loadu_ps(b + block * 16));
            _mm512_storeu_ps(y + block * 16, sums);
#else
            for (int r = 0; r < 16; r++)
                y[block * 16 + r] = dot(rows + r * row, x, in) + (b ? b[block * 16 + r] : 0.0f);
#endif
        }
#pragma omp for schedule(static)
        for (int64_t o = blocks * 16; o < out; o++)  /* the last out % 16 rows */
            y[o] = dot(w + o * row, x, in) + (b ? b[o] : 0.0f);
    }
}

/* 1 when linear_row has its AVX-512 pass (else callers keep torch's kernels). */
int linear_row_available(void) {
#if defined(__AVX512F__)
    return 1;
#else
    return 0;
#endif
}
