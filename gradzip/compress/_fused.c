/* Fused low-rank passes for PowerSGD and ACP-SGD on CPU float32 (see fused.py for why and how it is loaded).
 *
 * Matrices are row-major and contiguous: e, g, out are rows x cols. Right-hand factors arrive transposed
 * (r x cols, contiguous) so that the inner loops run over contiguous memory and vectorise; left-hand
 * factors are read one scalar per (row, k) through their strides. Every pass works a row at a time, so
 * the row stays in L1 between the sub-steps that would otherwise each stream the whole matrix from memory.
 * Rows are split over OpenMP threads with a static schedule, so a result depends only on the thread count.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

#define PAR_MIN_ELEMENTS (1 << 15) /* below this, threads cost more than they save */
#define MAX_RANK 32                 /* factors wider than this take the torch path (fused.py) */

/* Eight floats; GCC lowers it to one AVX register, or two SSE ones. Unaligned loads go through memcpy. */
typedef float v8 __attribute__((vector_size(32)));
static inline v8 ld(const float *p) { v8 v; memcpy(&v, p, sizeof v); return v; }
static inline void st(float *p, v8 v) { memcpy(p, &v, sizeof v); }
static inline float hsum(v8 v) { return ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7])); }

static int team(int threads, int64_t rows, int64_t cols) {
    if (threads < 1 || rows * cols < PAR_MIN_ELEMENTS) return 1;
    return rows < threads ? (int)rows : threads;
}

/* m = e + g (if g; m may be e); out[k*osk + i*osi] = sum_j m[i,j] * qt[k,j]   (P^T = Q^T (G + e)^T) */
void gz_compensate_project_right(const float *e, const float *g, float *m, const float *qt, float *out,
                                 int64_t osk, int64_t osi, int64_t rows, int64_t cols, int64_t r, int threads) {
#pragma omp parallel for schedule(static) num_threads(team(threads, rows, cols))
    for (int64_t i = 0; i < rows; i++) {
        const float *er = e + i * cols;
        float *mr = m + i * cols;
        const float *gr = g ? g + i * cols : NULL;
        v8 acc[MAX_RANK];
        float tail[MAX_RANK];
        for (int64_t k = 0; k < r; k++) acc[k] = (v8){0}, tail[k] = 0.0f;
        int64_t j = 0;
        for (; j + 8 <= cols; j += 8) {
            v8 x = ld(er + j);
            if (gr) x += ld(gr + j), st(mr + j, x);
            for (int64_t k = 0; k < r; k++) acc[k] += x * ld(qt + k * cols + j);
        }
        for (; j < cols; j++) {
            float x = er[j];
            if (gr) x += gr[j], mr[j] = x;
            for (int64_t k = 0; k < r; k++) tail[k] += x * qt[k * cols + j];
        }
        for (int64_t k = 0; k < r; k++) out[k * osk + i * osi] = hsum(acc[k]) + tail[k];
    }
}

/* m = e + g (if g; m may be e); out[k*osk + j*osj] = sum_i p[i*psi + k*psk] * m[i,j]   (Q^T = P^T (G + e)) */
int gz_compensate_project_left(const float *e, const float *g, float *m, const float *p, int64_t psi, int64_t psk,
                               float *out, int64_t osk, int64_t osj, int64_t rows, int64_t cols, int64_t r,
                               int threads) {
    int nt = team(threads, rows, cols);
    float *acc = calloc((size_t)nt * (size_t)(r * cols), sizeof(float)); /* one r x cols sum per thread */
    if (!acc) return 1;
#pragma omp parallel num_threads(nt)
    {
        float *mine = acc + (size_t)omp_get_thread_num() * (size_t)(r * cols);
#pragma omp for schedule(static)
        for (int64_t i = 0; i < rows; i++) {
            const float *er = e + i * cols;
            float *mr = m + i * cols;
            const float *gr = g ? g + i * cols : NULL;
            float pk[MAX_RANK];
            for (int64_t k = 0; k < r; k++) pk[k] = p[i * psi + k * psk];
            int64_t j = 0;
            for (; j + 8 <= cols; j += 8) {
                v8 x = ld(er + j);
                if (gr) x += ld(gr + j), st(mr + j, x);
                for (int64_t k = 0; k < r; k++) st(mine + k * cols + j, ld(mine + k * cols + j) + pk[k] * x);
            }
            for (; j < cols; j++) {
                float x = er[j];
                if (gr) x += gr[j], mr[j] = x;
                for (int64_t k = 0; k < r; k++) mine[k * cols + j] += pk[k] * x;
            }
        }
    }
    /* The threads' partial sums, added in thread order. */
    for (int64_t k = 0; k < r; k++)
        for (int64_t j = 0; j < cols; j++) {
            float s = 0.0f;
            for (int t = 0; t < nt; t++) s += acc[(size_t)t * (size_t)(r * cols) + k * cols + j];
            out[k * osk + j * osj] = s;
        }
    free(acc);
    return 0;
}

/* e -= A B^T; out = C D^T (if out). With same != 0, C D^T is A B^T: computed once, written to out, and
 * subtracted from e. A, C: rows x r through strides; bt, dt: r x cols contiguous. */
void gz_residual_expand(float *e, const float *a, int64_t asi, int64_t ask, const float *bt, float *out,
                        const float *c, int64_t csi, int64_t csk, const float *dt, int same, int64_t rows,
                        int64_t cols, int64_t r, int threads) {
#pragma omp parallel for schedule(static) num_threads(team(threads, rows, cols))
    for (int64_t i = 0; i < rows; i++) {
        float *er = e + i * cols, *orow = out ? out + i * cols : NULL;
        float ak[MAX_RANK], ck[MAX_RANK];
        for (int64_t k = 0; k < r; k++) ak[k] = a[i * asi + k * ask], ck[k] = same ? 0.0f : c[i * csi + k * csk];
        int64_t j = 0;
        for (; j + 8 <= cols; j += 8) {
            v8 u = ak[0] * ld(bt + j);
            for (int64_t k = 1; k < r; k++) u += ak[k] * ld(bt + k * cols + j);
            st(er + j, ld(er + j) - u);
            if (same) {
                st(orow + j, u);
            } else if (orow) {
                v8 w = ck[0] * ld(dt + j);
                for (int64_t k = 1; k < r; k++) w += ck[k] * ld(dt + k * cols + j);
                st(orow + j, w);
            }
        }
        for (; j < cols; j++) {
            float u = 0.0f, w = 0.0f;
            for (int64_t k = 0; k < r; k++) u += ak[k] * bt[k * cols + j];
            er[j] -= u;
            if (same) {
                orow[j] = u;
            } else if (orow) {
                for (int64_t k = 0; k < r; k++) w += ck[k] * dt[k * cols + j];
                orow[j] = w;
            }
        }
    }
}
