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

/* y = x W^T + b for a few input rows at once (a tree verify's, a draft level's): the weights
 * are still one stream, read once for all rows. Each work item is a block of ROWS_OUT output
 * rows (in cache after their first pass) and takes the input rows ROWS_IN at a time:
 * ROWS_OUT x ROWS_IN accumulators, one weight load feeding ROWS_IN FMAs. x: m rows of `in`
 * floats, `xrow` apart; y: m rows of `out` floats. Each output is one vector accumulator
 * reduced at the end, as in linear_row (the final reduction differs in order). */
#if SPARROW_VECTORIZED
#define ROWS_OUT 4
#define ROWS_IN (VECTOR == 16 ? 6 : 3)

static void rows_block(const float *x, int64_t xrow, const float *w, int64_t row, const float *b,
                       float *y, int64_t out, int64_t in, int64_t o0, int no, int64_t m0, int nm) {
    vec acc[ROWS_OUT][ROWS_IN];
    for (int r = 0; r < ROWS_OUT; r++)
        for (int k = 0; k < ROWS_IN; k++) acc[r][k] = vzero();
    int64_t i = 0;
    if (no == ROWS_OUT && nm == ROWS_IN) {  /* the full block: fixed trip counts, all in registers */
        for (; i + VECTOR <= in; i += VECTOR) {
            vec xv[ROWS_IN];
            for (int k = 0; k < ROWS_IN; k++) xv[k] = vload(x + (m0 + k) * xrow + i);
            for (int r = 0; r < ROWS_OUT; r++) {
                vec wv = vload(w + (o0 + r) * row + i);
                for (int k = 0; k < ROWS_IN; k++) acc[r][k] = vfmadd(wv, xv[k], acc[r][k]);
            }
        }
    } else {
        for (; i + VECTOR <= in; i += VECTOR) {
            vec xv[ROWS_IN];
            for (int k = 0; k < nm; k++) xv[k] = vload(x + (m0 + k) * xrow + i);
            for (int r = 0; r < no; r++) {
                vec wv = vload(w + (o0 + r) * row + i);
                for (int k = 0; k < nm; k++) acc[r][k] = vfmadd(wv, xv[k], acc[r][k]);
            }
        }
    }
    if (i < in) {  /* the last in % VECTOR columns, masked */
        vmask tail = vtail((int)(in - i));
        for (int r = 0; r < no; r++) {
            vec wv = vload_masked(tail, w + (o0 + r) * row + i);
            for (int k = 0; k < nm; k++)
                acc[r][k] = vfmadd(wv, vload_masked(tail, x + (m0 + k) * xrow + i), acc[r][k]);
        }
    }
    for (int r = 0; r < no; r++)
        for (int k = 0; k < nm; k++)
            y[(m0 + k) * out + o0 + r] = vsum(acc[r][k]) + (b ? b[o0 + r] : 0.0f);
}
#endif

void linear_rows(const float *x, int64_t xrow, const float *w, int64_t row, const float *b,
                 float *y, int64_t m, int64_t out, int64_t in, int threads) {
#if SPARROW_VECTORIZED
    int64_t blocks = (out + ROWS_OUT - 1) / ROWS_OUT;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t block = 0; block < blocks; block++) {
        int64_t o0 = block * ROWS_OUT;
        int no = (int)(out - o0 < ROWS_OUT ? out - o0 : ROWS_OUT);
        for (int64_t m0 = 0; m0 < m; m0 += ROWS_IN)
            rows_block(x, xrow, w, row, b, y, out, in, o0, no, m0, (int)(m - m0 < ROWS_IN ? m - m0 : ROWS_IN));
    }
#else
    (void)x; (void)xrow; (void)w; (void)row; (void)b; (void)y; (void)m; (void)out; (void)in; (void)threads;
#endif
}

/* 1 when linear_row has its vector pass (else callers keep torch's kernels). */
int linear_row_available(void) { return SPARROW_VECTORIZED; }
