/* Y = X W^T + b for a few input rows (the linears of an AR decode step, one row, and of a
 * small tree verify, a few), for CPUs.
 *
 * Why: a decode step reads every weight once, so its linears are a stream of the weights, and
 * on one row oneDNN's packed kernel and MKL stream them more slowly than this plain pass over
 * VECTOR rows at a time, reduced together (measurements: docs/runtime.md). A verify of a few
 * tokens is still a stream of the weights, not a matrix product: each tile of VECTOR weight
 * rows x COLUMNS floats is read from memory once and then, from L1, by every input row, so
 * m rows cost about what one does until the FMAs, not the weight stream, set the pace.
 *
 * W: (out, in) rows of `in` contiguous floats, `row` floats apart (nn.Linear's weight); X: m
 * rows of `in` contiguous floats; b: `out` floats or NULL; Y: m rows of `out` floats.
 * Threads take blocks of VECTOR output rows (16 with AVX-512, 8 with AVX2). fp32; each output
 * is summed in the same order whatever m is (per lane along `in`, then across lanes), and
 * differs from torch's kernels by summation order only, with an error against float64 of the
 * same size as theirs (docs/runtime.md).
 *
 * The 8-lane AVX2 pass also streams the weights faster than oneDNN's packed kernel
 * (docs/runtime.md). Without AVX-512 or AVX2 (`linear_rows_available`) the caller keeps
 * torch's kernels: a scalar pass streams far slower and, summing serially, is less exact. */
#include <stdint.h>
#include <stddef.h>

#include "vector.h"

#define MAX_ROWS 64  /* input rows per call at most (the caller's LINEAR_MAX_ROWS is what is used) */
#define COLUMNS 512  /* floats of each weight row per tile: VECTOR x COLUMNS x 4 bytes (16 or 32 KiB) stay in L1 */

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

#if SPARROW_VECTORIZED
/* acc[r] += W[r, start:end] . x[start:end] for the VECTOR rows at `rows`; `end` is a multiple
 * of VECTOR past `start` except at the end of a row, whose last columns are masked. */
static inline void tile(const float *rows, int64_t row, const float *x, int64_t start, int64_t end,
                        vec *acc) {
    vec a[VECTOR];
    for (int r = 0; r < VECTOR; r++) a[r] = acc[r];
    int64_t i = start;
    for (; i + VECTOR <= end; i += VECTOR) {
        vec xv = vload(x + i);
        for (int r = 0; r < VECTOR; r++) a[r] = vfmadd(vload(rows + r * row + i), xv, a[r]);
    }
    if (i < end) {
        vmask tail = vtail((int)(end - i));
        vec xv = vload_masked(tail, x + i);
        for (int r = 0; r < VECTOR; r++) a[r] = vfmadd(vload_masked(tail, rows + r * row + i), xv, a[r]);
    }
    for (int r = 0; r < VECTOR; r++) acc[r] = a[r];
}
#endif

/* Returns 0, or -1 when m is outside [1, MAX_ROWS] (nothing is written). */
int linear_rows(const float *x, int64_t m, const float *w, int64_t row, const float *b, float *y,
                int64_t out, int64_t in, int threads) {
    if (m < 1 || m > MAX_ROWS) return -1;
    int64_t blocks = SPARROW_VECTORIZED ? out / VECTOR : 0;  /* of VECTOR output rows */
#pragma omp parallel num_threads(threads)
    {
#if SPARROW_VECTORIZED
#pragma omp for schedule(static) nowait
        for (int64_t block = 0; block < blocks; block++) {  /* VECTOR rows at a time */
            const float *rows = w + block * VECTOR * row;
            vec acc[MAX_ROWS][VECTOR];
            for (int64_t j = 0; j < m; j++)
                for (int r = 0; r < VECTOR; r++) acc[j][r] = vzero();
            for (int64_t start = 0; start < in; start += COLUMNS) {
                int64_t end = start + COLUMNS < in ? start + COLUMNS : in;
                for (int64_t j = 0; j < m; j++) tile(rows, row, x + j * in, start, end, acc[j]);
            }
            for (int64_t j = 0; j < m; j++) {
                vec sums = vsums(acc[j]);
                if (b) sums = vadd(sums, vload(b + block * VECTOR));
                vstore(y + j * out + block * VECTOR, sums);
            }
        }
#endif
#pragma omp for schedule(static)
        for (int64_t o = blocks * VECTOR; o < out; o++)  /* the last out % VECTOR rows */
            for (int64_t j = 0; j < m; j++)
                y[j * out + o] = dot(w + o * row, x + j * in, in) + (b ? b[o] : 0.0f);
    }
    return 0;
}

/* 1 when linear_rows has its vector pass (else callers keep torch's kernels). */
int linear_rows_available(void) { return SPARROW_VECTORIZED; }
