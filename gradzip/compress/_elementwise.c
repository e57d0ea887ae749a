/* Passes of the element-wise compressors on CPU float32 (see elementwise_kernels.py for why and how they are
 * loaded; they are compiled into the same library as _fused.c).
 *
 * Each function is one sweep over a flat tensor, written so that GCC vectorises it: the torch path of the
 * same step makes several sweeps and intermediate tensors of the tensor's size (sign bits spread over a byte
 * per element, a float per random number). Work is split over OpenMP threads in contiguous chunks, and
 * partial sums are added in chunk order, so a result depends only on the thread count.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>
#ifdef __AVX__
#include <immintrin.h>
#endif

#define EW_PAR_MIN (1 << 16) /* elements below which threads cost more than they save */
#define EW_MAX_THREADS 256

typedef float f8 __attribute__((vector_size(32)));

/* x[i] = e[i] + g[i] over [0, m), eight at a time through explicit vectors: x may be e (in place), which
 * would keep GCC from vectorising the plain loop without a runtime alias check. */
static inline void ew_add(const float *e, const float *g, float *x, int64_t m) {
    int64_t i = 0;
    for (; i + 8 <= m; i += 8) {
        f8 a, b;
        memcpy(&a, e + i, sizeof a);
        memcpy(&b, g + i, sizeof b);
        a += b;
        memcpy(x + i, &a, sizeof a);
    }
    for (; i < m; i++) x[i] = e[i] + g[i];
}

static int ew_team(int threads, int64_t n) {
    if (threads < 1 || n < EW_PAR_MIN) return 1;
    return threads > EW_MAX_THREADS ? EW_MAX_THREADS : threads;
}

/* [lo, hi) of chunk t of nt over [0, n), chunk edges on multiples of `align`. */
static void ew_chunk(int64_t n, int64_t align, int t, int nt, int64_t *lo, int64_t *hi) {
    int64_t blocks = (n + align - 1) / align, per = blocks / nt, extra = blocks % nt;
    int64_t b0 = t * per + (t < extra ? t : extra), b1 = b0 + per + (t < extra ? 1 : 0);
    *lo = b0 * align < n ? b0 * align : n;
    *hi = b1 * align < n ? b1 * align : n;
}

/* ---------------------------------------------------------------------------------------------- sign */

/* The sign of each bit pattern of a byte, least significant bit first: +1 for a set bit, -1 otherwise. */
static float SIGNS[256][8] __attribute__((aligned(32)));

__attribute__((constructor)) static void ew_init(void) {
    for (int b = 0; b < 256; b++)
        for (int k = 0; k < 8; k++) SIGNS[b][k] = (b >> k) & 1 ? 1.0f : -1.0f;
}

static inline uint8_t ew_byte(const float *x) {
#ifdef __AVX__
    return (uint8_t)_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(x), _mm256_setzero_ps(), _CMP_GE_OQ));
#else
    uint8_t b = 0;
    for (int k = 0; k < 8; k++) b |= (uint8_t)(x[k] >= 0.0f) << k;
    return b;
#endif
}

/* sum |x| (squares: sum x^2) in double. Each float widens exactly, so the sum is as exact as torch's float64
 * one; sixteen lanes, so the adds' latency does not bound the sweep. */
#define EW_LANES 16
static double ew_sum(const float *x, int64_t n, int squares) {
    double acc[EW_LANES] = {0};
    int64_t j = 0;
    if (squares) {
        for (; j + EW_LANES <= n; j += EW_LANES)
            for (int k = 0; k < EW_LANES; k++) acc[k] += (double)x[j + k] * (double)x[j + k];
    } else {
        for (; j + EW_LANES <= n; j += EW_LANES)
            for (int k = 0; k < EW_LANES; k++) acc[k] += fabs((double)x[j + k]);
    }
    for (int k = EW_LANES / 2; k > 0; k /= 2)
        for (int i = 0; i < k; i++) acc[i] += acc[i + k];
    double s = acc[0];
    for (; j < n; j++) s += squares ? (double)x[j] * (double)x[j] : fabs((double)x[j]);
    return s;
}

/* With g: x = e + g first, in the same sweep (error feedback's compensation; x may be e). Then bits = (x >= 0)
 * packed eight per byte, least significant first (the last byte's high bits zero; -0.0 counts as >= 0, NaN as
 * < 0); returns sum |x| in double. Works in blocks that stay in L1 between the sub-steps. */
#define EW_BLOCK 2048
double gz_sign_pack(const float *e, const float *g, float *x, uint8_t *bits, int64_t n, int threads) {
    int nc = ew_team(threads, n);
    double part[EW_MAX_THREADS];
    /* A loop over chunks, not one chunk per thread: every chunk runs even if the runtime grants fewer threads
     * (OMP_DYNAMIC, OMP_THREAD_LIMIT), and the sum depends on the requested count only. */
#pragma omp parallel for schedule(static) num_threads(nc)
    for (int c = 0; c < nc; c++) {
        int64_t lo, hi;
        ew_chunk(n, 8, c, nc, &lo, &hi);
        double s = 0.0;
        for (int64_t b0 = lo; b0 < hi; b0 += EW_BLOCK) {
            int64_t b1 = b0 + EW_BLOCK < hi ? b0 + EW_BLOCK : hi, j = b0;
            if (g) ew_add(e + b0, g + b0, x + b0, b1 - b0);
            for (; j + 8 <= b1; j += 8) bits[j / 8] = ew_byte(x + j);
            if (j < b1) {
                uint8_t b = 0;
                for (int64_t i = j; i < b1; i++) b |= (uint8_t)(x[i] >= 0.0f) << (i - j);
                bits[j / 8] = b;
            }
            s += ew_sum(x + b0, b1 - b0, 0);
        }
        part[c] = s;
    }
    double s = 0.0;
    for (int c = 0; c < nc; c++) s += part[c];
    return s;
}

/* x -= scale * sign(x), with sign(x) = +1 where x >= 0: what EF-SignSGD leaves out. */
void gz_sign_residual(float *x, int64_t n, float scale, int threads) {
    int nt = ew_team(threads, n);
#pragma omp parallel for schedule(static) num_threads(nt)
    for (int64_t j = 0; j < n; j++) x[j] = x[j] >= 0.0f ? x[j] - scale : x[j] + scale;
}

/* out[j] = (sum_w sign_w[j] * s_w) * inv_world, in worker order (vote: sign(sum_w sign_w[j]) * s_0, where the
 * caller passes the mean scale as the only one). bits: world rows of ceil(n/8) bytes, `brow` bytes apart;
 * scales: one float per row, `srow` floats apart. */
void gz_sign_accumulate(float *out, const uint8_t *bits, int64_t brow, const float *scales, int64_t srow,
                        int64_t world, float inv_world, int64_t n, int vote, float vote_scale, int threads) {
    int64_t nbytes = (n + 7) / 8, full = n / 8;
    int nt = ew_team(threads, n);
#pragma omp parallel for schedule(static) num_threads(nt)
    for (int64_t b = 0; b < nbytes; b++) {
        f8 acc = {0};
        for (int64_t w = 0; w < world; w++) {
            f8 sg;
            memcpy(&sg, SIGNS[bits[w * brow + b]], sizeof sg);
            acc += vote ? sg : sg * scales[w * srow];
        }
        f8 r;
        if (vote) {
            for (int k = 0; k < 8; k++) r[k] = acc[k] > 0 ? vote_scale : acc[k] < 0 ? -vote_scale : 0.0f * vote_scale;
        } else {
            r = acc * inv_world;
        }
        if (b < full) {
            memcpy(out + 8 * b, &r, sizeof r);
        } else {
            for (int64_t k = 0; k < n - 8 * b; k++) out[8 * b + k] = r[k];
        }
    }
}

/* ---------------------------------------------------------------------------------------------- QSGD */

double gz_square_sum(const float *x, int64_t n, int threads) {
    int nc = ew_team(threads, n);
    double part[EW_MAX_THREADS];
#pragma omp parallel for schedule(static) num_threads(nc)
    for (int c = 0; c < nc; c++) {
        int64_t lo, hi;
        ew_chunk(n, 8, c, nc, &lo, &hi);
        part[c] = ew_sum(x + lo, hi - lo, 1);
    }
    double s = 0.0;
    for (int c = 0; c < nc; c++) s += part[c];
    return s;
}

/* A bijective mix of 32 bits (two xor-shift-multiply rounds). qsgd.py computes the same with int64 tensors
 * (the constant is below 2^31, so no product overflows 64 bits there). */
static inline uint32_t ew_mix(uint32_t x) {
    x = ((x >> 16) ^ x) * 0x45d9f3bu;
    x = ((x >> 16) ^ x) * 0x45d9f3bu;
    return (x >> 16) ^ x;
}

/* q[j] = sign(x[j]) * level[j] for j in [lo, hi): a = |x[j]| * scale (scale = levels / norm, a multiply where
 * a division per element would bound the sweep), level = floor(a) + (u_j < a - floor(a)). The caller passes
 * a finite norm, so 0 <= a <= levels (up to rounding). A plain function over a range with
 * restrict pointers and a 32-bit counter, so that GCC vectorises it (8 hashes per AVX2 instruction). */
static void ew_quantize_range(const float *restrict x, int8_t *restrict q, int64_t lo, int64_t hi, float scale,
                              uint32_t k1, uint32_t k2) {
    uint32_t hi32 = k2 ^ (uint32_t)((uint64_t)lo >> 32), base = (uint32_t)lo;
    for (int64_t j = lo, end = hi; j < end;) {
        /* Within a range the high half of the index is constant except across 2^32 boundaries. */
        int64_t room = ((int64_t)1 << 32) - (int64_t)base; /* indices before the next 2^32 boundary */
        int64_t stop = end - j < room ? end : j + room;
        int64_t m = stop - j;
        for (int64_t t = 0; t < m; t++) {
            float v = x[j + t];
            float a = fabsf(v) * scale;
            /* floor(a) for 0 <= a <= levels (|x| <= norm), as a conversion: GCC vectorises it, not floorf. */
            float f = (float)(int32_t)a;
            /* Element i's uniform under key (k1, k2): mix(mix(low32(i) ^ k1) + (k2 ^ high32(i))) >> 8, 24 bits. */
            uint32_t h = ew_mix(ew_mix((base + (uint32_t)t) ^ k1) + hi32);
            float u = (float)(h >> 8) * (1.0f / 16777216.0f);
            float level = f + (u < a - f ? 1.0f : 0.0f);
            float s = v > 0.0f ? level : v < 0.0f ? -level : 0.0f;
            q[j + t] = (int8_t)(int32_t)s;
        }
        j = stop;
        base = (uint32_t)j;
        hi32 = k2 ^ (uint32_t)((uint64_t)j >> 32);
    }
}

void gz_qsgd_quantize(const float *x, int8_t *q, int64_t n, float scale, uint32_t k1, uint32_t k2, int threads) {
    int nc = ew_team(threads, n);
#pragma omp parallel for schedule(static) num_threads(nc)
    for (int c = 0; c < nc; c++) {
        int64_t lo, hi;
        ew_chunk(n, 64, c, nc, &lo, &hi);
        ew_quantize_range(x, q, lo, hi, scale, k1, k2);
    }
}

/* out[j] = (sum_w q_w[j] * (norm_w / levels)) * inv_world, in worker order, a block at a time so the partial
 * sums stay in L1. q: world rows `qrow` bytes apart; norms: one float per row, `nrow` floats apart. */
void gz_qsgd_accumulate(float *out, const int8_t *q, int64_t qrow, const float *norms, int64_t nrow,
                        int64_t world, float inv_world, int64_t n, float levels, int threads) {
    int nc = ew_team(threads, n);
#pragma omp parallel for schedule(static) num_threads(nc)
    for (int c = 0; c < nc; c++) {
        int64_t lo, hi;
        ew_chunk(n, 64, c, nc, &lo, &hi);
        float acc[EW_BLOCK];
        for (int64_t b0 = lo; b0 < hi; b0 += EW_BLOCK) {
            int64_t m = hi - b0 < EW_BLOCK ? hi - b0 : EW_BLOCK;
            for (int64_t j = 0; j < m; j++) acc[j] = 0.0f;
            for (int64_t w = 0; w < world; w++) {
                const int8_t *qw = q + w * qrow + b0;
                float s = norms[w * nrow] / levels;
                for (int64_t j = 0; j < m; j++) acc[j] += (float)qw[j] * s;
            }
            for (int64_t j = 0; j < m; j++) out[b0 + j] = acc[j] * inv_world;
        }
    }
}

/* --------------------------------------------------------------------------------------------- top-k */

/* With g: x = e + g first, in the same sweep (x may be e). Indices and values of the entries with |x| >= thr
 * or NaN,
 * in order; writes at most `cap` of them into idx and val (which hold cap + 1: the last slot is scratch for
 * branch-free writes) and returns how many there are (more than `cap`: the threshold was too low). One
 * thread: the sweep is memory-bound. */
int64_t gz_select_abs_ge(const float *e, const float *g, float *x, int64_t n, float thr, int64_t *idx, float *val,
                         int64_t cap) {
    int64_t count = 0;
    for (int64_t b0 = 0; b0 < n; b0 += EW_BLOCK) {
        int64_t b1 = b0 + EW_BLOCK < n ? b0 + EW_BLOCK : n, j = b0;
        if (g) ew_add(e + b0, g + b0, x + b0, b1 - b0);
#ifdef __AVX__
        const __m256 sign = _mm256_set1_ps(-0.0f), t = _mm256_set1_ps(thr);
        for (; j + 8 <= b1; j += 8) {
            __m256 a = _mm256_andnot_ps(sign, _mm256_loadu_ps(x + j));
            /* "not less than": a NaN is a hit, and the caller hands the tensor to torch.topk (which ranks it
             * first), so the C and torch paths send the same entries whatever the NaN policy. */
            int m = _mm256_movemask_ps(_mm256_cmp_ps(a, t, _CMP_NLT_UQ));
            if (m) /* branch-free within the eight: a branch per hit would mispredict every loop exit */
                for (int k = 0; k < 8; k++) {
                    int64_t slot = count < cap ? count : cap;
                    idx[slot] = j + k, val[slot] = x[j + k];
                    count += (m >> k) & 1;
                }
        }
#endif
        for (; j < b1; j++)
            if (!(fabsf(x[j]) < thr)) {
                if (count < cap) idx[count] = j, val[count] = x[j];
                count++;
            }
    }
    return count;
}

/* The k-th largest of v[0..c) (1 <= k <= c), reordering v: quickselect with a median-of-three pivot. */
static float ew_kth_largest(float *v, int64_t c, int64_t k) {
    int64_t lo = 0, hi = c - 1, want = k - 1; /* position of the answer in descending order */
    while (lo < hi) {
        int64_t mid = lo + (hi - lo) / 2;
        float a = v[lo], b = v[mid], d = v[hi];
        float pivot = a > b ? (b > d ? b : (a > d ? d : a)) : (a > d ? a : (b > d ? d : b));
        int64_t i = lo, j = hi;
        while (i <= j) { /* descending: larger values to the left */
            while (v[i] > pivot) i++;
            while (v[j] < pivot) j--;
            if (i <= j) {
                float t = v[i];
                v[i] = v[j], v[j] = t;
                i++, j--;
            }
        }
        if (want <= j) hi = j;
        else if (want >= i) lo = i;
        else return v[want];
    }
    return v[want];
}

/* Of c candidates (indices increasing, with their values), keep in place, in increasing order of index, the k
 * of largest magnitude: every one above the k-th largest magnitude, then the first of those equal to it (ties
 * go to the lower index, so the choice is the same on every run). scratch holds c floats. Returns k. */
int64_t gz_keep_top(int64_t *idx, float *val, int64_t c, int64_t k, float *scratch) {
    if (k <= 0) return 0;
    for (int64_t i = 0; i < c; i++) scratch[i] = fabsf(val[i]);
    float kth = ew_kth_largest(scratch, c, k);
    int64_t above = 0;
    for (int64_t i = 0; i < c; i++) above += fabsf(val[i]) > kth;
    int64_t ties = k - above, kept = 0;
    for (int64_t i = 0; i < c; i++) {
        float a = fabsf(val[i]);
        if (a > kth || (a == kth && ties-- > 0)) idx[kept] = idx[i], val[kept] = val[i], kept++;
    }
    return kept;
}
