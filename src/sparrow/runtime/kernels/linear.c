/* y = W x + b for one input row (the linears of an AR decode step), for CPUs.
 *
 * Why: a decode step reads every weight once, so its linears are a stream of the weights, and
 * on one row oneDNN's packed kernel and MKL stream them more slowly than this plain pass over
 * VECTOR rows at a time, reduced together (measurements: docs/runtime.md).
 *
 * W: (out, in) rows of `in` contiguous floats, `row` floats apart (nn.Linear's weight); x:
 * `in` floats; b: `out` floats or NULL; y: `out` floats. Threads take blocks of VECTOR output
 * rows (16 with AVX-512, 8 with AVX2). fp32; differs from torch's kernels by summation order
 * only, with an error against float64 of the same size as theirs (docs/runtime.md).
 *
 * The 8-lane AVX2 pass also streams the weights faster than oneDNN's packed kernel
 * (docs/runtime.md). Without AVX-512 or AVX2 (`linear_row_available`) the caller keeps torch's
 * kernels: a scalar pass streams far slower and, summing serially, is less exact. */
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
