/* Attention's softmax and dropout while training on the CPU (engine/attention.py), a block
 * of the score matrix at a time, in one pass over the scores forward and one backward.
 *
 * softmax_dropout(s, lse, pd, bf16, mats, rows, cols, row0, col0, mat_rows, t, seed,
 *                 threshold, scale)
 *     s, pd (mats, rows, cols): bf16 where `bf16`, else fp32; lse (mats, rows) fp32.
 *     Row r of every matrix is query row0 + r (of mat_rows in all), column c key col0 + c;
 *     causal, the query sees keys up to itself, so for those, with the scores x = t * s (t =
 *     1 / sqrt(head_dim): s is q k^T, scaled here as it is read rather than in a pass of its
 *     own), and a block that holds every key a row sees (col0 = 0: the forward pass)
 *         p   = softmax(x row) = exp(x - lse)       (the rest of the row: 0)
 *         lse = log(sum(exp(x row)))                (kept for the backward pass)
 *         pd  = p * keep * scale                    (scale = 1 / (1 - dropout))
 * softmax_dropout_backward(dpd, s, lse, dot, ds, pd, bf16, ...the same...) is its gradient,
 * for any block of keys, with p computed again from the scores (the backward pass computes
 * them again too) and the lse:
 *         dp = dpd * keep * scale,   ds = t * p * (dp - dot)   (d/ds, not d/dx)
 * where dot (mats, rows) fp32 is each row's sum of p * dp over all its keys (the caller's
 * dO . O, as flash attention takes it: a block of keys holds only part of a row), and pd
 * again (the product with dO needs it for v's gradient).
 *
 * keep(row, column) hashes (seed, row, column) to 32 bits h and keeps the element where
 * h >= threshold: with threshold = dropout * 2^32 an element is dropped with probability
 * `dropout`. The mask is a function of the element's coordinates, not a stream of draws, so
 * the backward pass computes it again from the seed and nothing of the size of the attention
 * matrix is kept for it; the rows are independent work for the threads; and the same seed
 * gives the same mask whatever the block size or the number of threads. (GPU flash
 * attention does the same with the Philox counter-based generator.) PyTorch's CPU generator
 * draws 7-8 ns an element, one at a time; a hash is a few vector instructions.
 *
 * row_dots(a, b, dots, bf16, rows, d) makes those dots: dots[r] = a[r] . b[r] (fp32 sums).
 *
 * dropout_rows(x, y, bf16, rows, cols, seed, threshold, scale) is the same mask on its own,
 * for the model's other dropouts (embeddings, residual branches): y = x * keep * scale for x
 * and y (rows, cols), row r being row r of the mask. It is its own gradient.
 *
 * The mixer is an invertible 32-bit hash (xor-shift, multiply, xor-shift, multiply, xor-shift,
 * with the constants of C. Wellons' "lowbias32", chosen by his hash-prospector search for
 * low bias), applied to the row, then to each column (times 0x9e3779b9) added to that row's
 * key.
 * The softmax functions return 0, or -1 where a thread's row buffers could not be allocated.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "bf16.h"
#include "simd.h"

static inline uint32_t mix32(uint32_t x) {
    x ^= x >> 16;
    x *= 0x7feb352du;
    x ^= x >> 15;
    x *= 0x846ca68bu;
    x ^= x >> 16;
    return x;
}

/* factor[c] = scale where (row, c0 + c) is kept, else 0, for n columns from c0 */
static void keep_factors(float *factor, uint64_t seed, uint64_t row, long c0, long n,
                         uint32_t threshold, float scale) {
    if (threshold == 0) {                   /* no dropout: every element kept */
        for (long c = 0; c < n; c++) factor[c] = scale;
        return;
    }
    /* every 64-bit (seed, row) pair its own 32-bit key */
    uint32_t key = mix32((uint32_t)seed ^ mix32((uint32_t)row
                         ^ mix32((uint32_t)(row >> 32) ^ (uint32_t)(seed >> 32))));
    for (long c = 0; c < n; c++) {          /* the compiler vectorizes this loop */
        uint32_t h = mix32(key + (uint32_t)(c0 + c) * 0x9e3779b9u);
        factor[c] = h >= threshold ? scale : 0.0f;
    }
}

/* y[c] = row[c] * (inv * factor[c]) for c < n (factor NULL: every factor `scale`), then zeros
   to `cols` */
static inline void store_scaled(void *y, const float *row, const float *factor, float inv,
                                float scale, long n, long cols, int bf16) {
    float k = inv * scale;
    if (bf16) {
        uint16_t *out = y;
        if (factor) for (long c = 0; c < n; c++) out[c] = f32_to_bf16(row[c] * (inv * factor[c]));
        else for (long c = 0; c < n; c++) out[c] = f32_to_bf16(row[c] * k);
        for (long c = n; c < cols; c++) out[c] = 0;
    } else {
        float *out = y;
        if (factor) for (long c = 0; c < n; c++) out[c] = row[c] * (inv * factor[c]);
        else for (long c = 0; c < n; c++) out[c] = row[c] * k;
        for (long c = n; c < cols; c++) out[c] = 0.0f;
    }
}

/* forward, one row of n scores into x as e^(t (s - max)): returns 1 / the sum (lse: *lse) */
static float forward_row(float *x, float *lse, const void *s, long n, int bf16, float t) {
    float best = load_row_max(x, s, n, bf16);       /* t > 0: the max of t * s is t * best */
    vf total = vf_zero();
    for (long c = 0; c < n; c += VW) {
        vf e = vf_keep_n(vf_exp(vf_mul(vf_sub(vf_load_n(x + c, n - c), vf_set(best)),
                                       vf_set(t))), n - c);
        vf_store_n(x + c, e, n - c);
        total = vf_add(total, e);
    }
    float sum = vf_sum(total);
    *lse = t * best + logf(sum);
    return 1.0f / sum;
}

/* backward, one row whose first n columns it sees: ds = t p (dp - dot) into out, pd = p * keep
   * scale into pd_out (fp32 rows straight, bf16 through the buffers x and prob) */
static void backward_row(float *x, float *prob, const float *factor, const void *dpd,
                         const void *s, float lse, float dot, long n, long cols, int bf16,
                         float t, float scale, void *out, void *pd_out) {
    float *ds = bf16 ? x : out, *pd = bf16 ? prob : pd_out;
    for (long c = 0; c < n; c += VW) {
        vf p = vf_exp(vf_sub(vf_mul(vf_row_n(s, c, n, bf16), vf_set(t)), vf_set(lse)));
        vf f = factor ? vf_load_n(factor + c, n - c) : vf_set(scale);
        vf dp = vf_mul(vf_row_n(dpd, c, n, bf16), f);
        vf_store_n(ds + c, vf_mul(vf_mul(p, vf_sub(dp, vf_set(dot))), vf_set(t)), n - c);
        vf_store_n(pd + c, vf_mul(p, f), n - c);
    }
    if (bf16) {                             /* rounded to bf16, then zeros to `cols` */
        store_row(out, x, n, cols, 1);
        store_row(pd_out, prob, n, cols, 1);
    } else {
        for (long c = n; c < cols; c++) ds[c] = pd[c] = 0.0f;
    }
}

/* every row of a block, each by one thread, forward (dpd NULL: lse written) or backward
   (lse and dot read), the result (pd or ds) into out; backward, pd also into pd_out */
static int each_row(const void *s, const void *dpd, float *lse, const float *dot, void *out,
                    void *pd_out, int bf16, long mats, long rows, long cols, long row0,
                    long col0, long mat_rows, float t, uint64_t seed, uint32_t threshold,
                    float scale) {
    int failed = 0;
    size_t width = bf16 ? 2 : 4;
    #pragma omp parallel
    {
        float *x = malloc(3 * (size_t)cols * sizeof(float));    /* a row, its factors, p */
        if (!x) {
            #pragma omp atomic write
            failed = 1;
        }
        #pragma omp for schedule(static)
        for (long mr = 0; mr < mats * rows; mr++) {
            if (!x) continue;
            /* query row0 + r sees keys up to itself: n of the columns col0, col0 + 1, ... */
            long r = mr % rows, n = row0 + r - col0 + 1;
            n = n < 0 ? 0 : n > cols ? cols : n;
            size_t at = (size_t)mr * cols * width;
            /* without dropout every factor is `scale`: none made */
            float *factor = threshold ? x + cols : NULL;
            if (factor)
                keep_factors(factor, seed, (uint64_t)(mr / rows) * mat_rows + row0 + r, col0,
                             n, threshold, scale);
            if (dpd) {
                backward_row(x, x + 2 * cols, factor, (const char *)dpd + at,
                             (const char *)s + at, lse[mr], dot[mr], n, cols, bf16, t, scale,
                             (char *)out + at, (char *)pd_out + at);
            } else {
                float inv = forward_row(x, lse + mr, (const char *)s + at, n, bf16, t);
                store_scaled((char *)out + at, x, factor, inv, scale, n, cols, bf16);
            }
        }
        free(x);
    }
    return failed ? -1 : 0;
}

int softmax_dropout(const void *s, float *lse, void *pd, int bf16, long mats, long rows,
                    long cols, long row0, long col0, long mat_rows, float t, uint64_t seed,
                    uint32_t threshold, float scale) {
    return each_row(s, NULL, lse, NULL, pd, NULL, bf16, mats, rows, cols, row0, col0,
                    mat_rows, t, seed, threshold, scale);
}

int softmax_dropout_backward(const void *dpd, const void *s, const float *lse,
                             const float *dot, void *ds, void *pd, int bf16, long mats,
                             long rows, long cols, long row0, long col0, long mat_rows,
                             float t, uint64_t seed, uint32_t threshold, float scale) {
    return each_row(s, dpd, (float *)lse, dot, ds, pd, bf16, mats, rows, cols, row0, col0,
                    mat_rows, t, seed, threshold, scale);
}

/* dots[r] = the sum of a[r, i] * b[r, i] over the d numbers of row r, for a and b (rows, d)
   bf16 or fp32: each query's dO . O, which the backward pass takes as its dot */
void row_dots(const void *a, const void *b, float *dots, int bf16, long rows, long d) {
    size_t width = bf16 ? 2 : 4;
    #pragma omp parallel for schedule(static)
    for (long r = 0; r < rows; r++) {
        const char *ar = (const char *)a + (size_t)r * d * width;
        const char *br = (const char *)b + (size_t)r * d * width;
        vf acc = vf_zero();
        for (long c = 0; c < d; c += VW)
            acc = vf_fma(vf_row_n(ar, c, d, bf16), vf_row_n(br, c, d, bf16), acc);
        dots[r] = vf_sum(acc);
    }
}

void dropout_rows(const void *x, void *y, int bf16, long rows, long cols, uint64_t seed,
                  uint32_t threshold, float scale) {
    size_t width = bf16 ? 2 : 4;
    #pragma omp parallel
    {
        float row[256], factor[256];            /* a row in pieces of 256 */
        #pragma omp for schedule(static)
        for (long r = 0; r < rows; r++) {
            for (long c0 = 0; c0 < cols; c0 += 256) {
                long n = cols - c0 < 256 ? cols - c0 : 256;
                const char *in = (const char *)x + (r * cols + c0) * width;
                load_row(row, in, n, bf16);
                keep_factors(factor, seed, (uint64_t)r, c0, n, threshold, scale);
                for (long c = 0; c < n; c++) row[c] *= factor[c];
                store_row((char *)y + (r * cols + c0) * width, row, n, n, bf16);
            }
        }
    }
}
