/* y = W x + b for one input row (the linears of an AR decode step), for CPUs.
 *
 * Why: a decode step reads every weight once, so its linears are a stream of the weights. Over
 * the linears of a 120M Qwen2-shaped model, oneDNN's packed kernel streamed 14-41 GB/s per
 * shape (down to 14 GB/s for a 768 x 128 projection) and MKL ~13 GB/s, where a plain pass of 16
 * rows at a time, reduced together, streams 47-60 GB/s on the same machine (2 threads).
 *
 * W: (out, in) rows of `in` contiguous floats, `row` floats apart (nn.Linear's weight); x:
 * `in` floats; b: `out` floats or NULL; y: `out` floats. Threads take blocks of VECTOR output
 * rows (16 with AVX-512, 8 with AVX2). fp32; differs from torch's kernels by summation order
 * only (AVX2, 768 x 768 to 32000 x 768, 3 draws each: max error against float64 1.2-5.1e-5,
 * torch's 2.3-10.3e-5, never above 1.2x torch's).
 *
 * On an AVX2-only EPYC (2 threads, 2026-11-26) the 8-lane pass streamed 30-53 GB/s over the
 * benchmark target's 768 x 768, 2048 x 768 and 768 x 2048 linears, against oneDNN's packed
 * kernel at 16-29 GB/s and MKL at 21-29; lm_head (32000 x 768) 34 GB/s, oneDNN 27, MKL 14; the
 * k / v projection (128 x 768) 12 GB/s, oneDNN 3, MKL 13. Without AVX-512 or AVX2
 * (`linear_row_available`) the caller keeps torch's kernels: a scalar pass streams far slower
 * and, summing serially, was up to 2.4x less exact. */
#include <stdint.h>
#include <stddef.h>

#include "vector.h"

static float dot(const float *w, const float *x, int64_t in) {
    int64_t i = 0;
    float s = 0.0f;
#if SPARROW_VECTORIZED
    vec acc = vzero();
    for (; i + VECTOR <= in; i += VECTOR) acc = vfmadd(vload(w + i), vload(x + i), acc);
    s = vsum(acc);
#endif
    for (; i < in; i++) s += w[i] * x[i];
    return s;
}

void linear_row(const float *x, const float *w, int64_t row, const float *b, float *y,
                int64_t out, int64_t in, int threads) {
    int64_t blocks = SPARROW_VECTORIZED ? out / VECTOR : 0;  /* of VECTOR output rows */
#pragma omp parallel num_threads(threads)
    {
#if SPARROW_VECTORIZED
#pragma omp for schedule(static) nowait
        for (int64_t block = 0; block < blocks; block++) {  /* VECTOR rows at a time */
            const float *rows = w + block * VECTOR * row;
            vec acc[VECTOR];
            for (int r = 0; r < VECTOR; r++) acc[r] = vzero();
            int64_t i = 0;
            for (; i + VECTOR <= in; i += VECTOR) {
                vec xv = vload(x + i);
                for (int r = 0; r < VECTOR; r++) acc[r] = vfmadd(vload(rows + r * row + i), xv, acc[r]);
            }
            if (i < in) {  /* the last in % VECTOR columns, masked */
                vmask tail = vtail((int)(in - i));
                vec xv = vload_masked(tail, x + i);
                for (int r = 0; r < VECTOR; r++)
                    acc[r] = vfmadd(vload_masked(tail, rows + r * row + i), xv, acc[r]);
            }
            vec sums = vsums(acc);
            if (b) sums = vadd(sums, vload(b + block * VECTOR));
            vstore(y + block * VECTOR, sums);
        }
#endif
#pragma omp for schedule(static)
        for (int64_t o = blocks * VECTOR; o < out; o++)  /* the last out % VECTOR rows */
            y[o] = dot(w + o * row, x, in) + (b ? b[o] : 0.0f);
    }
}

/* 1 when linear_row has its vector pass (else callers keep torch's kernels). */
int linear_row_available(void) { return SPARROW_VECTORIZED; }
