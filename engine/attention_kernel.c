/* Attention's softmax and dropout while training on the CPU (engine/attention.py), for one
 * block of query rows at a time, in one pass over the scores forward and one backward.
 *
 * softmax_dropout(s, lse, pd, bf16, mats, rows, cols, row0, mat_rows, t, seed, threshold,
 *                 scale)
 *     s, pd (mats, rows, cols): bf16 where `bf16`, else fp32; lse (mats, rows) fp32.
 *     Row r of every matrix is query row0 + r (of mat_rows in all) against keys 0..cols-1;
 *     causal, it sees keys 0..row0 + r, so for those, with the scores x = t * s (t = 1 /
 *     sqrt(head_dim): s is q k^T, scaled here as it is read rather than in a pass of its own)
 *         p   = softmax(x row) = exp(x - lse)       (the rest of the row: 0)
 *         lse = log(sum(exp(x row)))                (kept for the backward pass)
 *         pd  = p * keep * scale                    (scale = 1 / (1 - dropout))
 * softmax_dropout_backward(dpd, s, lse, ds, pd, bf16, ...the same...) is its gradient, with p
 * computed again from the scores (the backward pass computes them again too) and the lse:
 *         dp = dpd * keep * scale,   ds = t * p * (dp - sum(p * dp))   (d/ds, not d/dx)
 * and, where pd is not NULL, pd again (the product with v needs it for v's gradient).
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

/* backward, one row: ds into out, pd = p * keep * scale into pd_out unless NULL */
static void backward_row(float *x, float *prob, const float *factor, const void *dpd,
                         const void *s, float lse, long n, long cols, int bf16, float t,
                         float scale, void *out, void *pd_out) {
    vf dots = vf_zero();
    for (long c = 0; c < n; c += VW) {
        vf p = vf_exp(vf_sub(vf_mul(vf_row_n(s, c, n, bf16), vf_set(t)), vf_set(lse)));
        vf f = factor ? vf_load_n(factor + c, n - c) : vf_set(scale);
        vf dp = vf_mul(vf_row_n(dpd, c, n, bf16), f);
        vf_store_n(prob + c, p, n - c);
        vf_store_n(x + c, dp, n - c);
        dots = vf_fma(vf_keep_n(p, n - c), dp, dots);
    }
    float dot = vf_sum(dots);
    if (bf16) {
        uint16_t *ds = out, *pd = pd_out;
        for (long c = 0; c < n; c++) ds[c] = f32_to_bf16(prob[c] * (x[c] - dot) * t);
        for (long c = n; c < cols; c++) ds[c] = 0;
        if (pd) {
            if (factor) for (long c = 0; c < n; c++) pd[c] = f32_to_bf16(prob[c] * factor[c]);
            else for (long c = 0; c < n; c++) pd[c] = f32_to_bf16(prob[c] * scale);
            for (long c = n; c < cols; c++) pd[c] = 0;
        }
    } else {
        float *ds = out, *pd = pd_out;
        for (long c = 0; c < n; c++) ds[c] = prob[c] * (x[c] - dot) * t;
        for (long c = n; c < cols; c++) ds[c] = 0.0f;
        if (pd) {
            if (factor) for (long c = 0; c < n; c++) pd[c] = prob[c] * factor[c];
            else for (long c = 0; c < n; c++) pd[c] = prob[c] * scale;
            for (long c = n; c < cols; c++) pd[c] = 0.0f;
        }
    }
}

/* every row of a block, each by one thread, forward (dpd NULL: lse written) or backward
   (lse read), the result (pd or ds) into out; backward, pd also into pd_out unless NULL */
static int each_row(const void *s, const void *dpd, float *lse, void *out, void *pd_out,
                    int bf16, long mats, long rows, long cols, long row0, long mat_rows,
                    float t, uint64_t seed, uint32_t threshold, float scale) {
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
            long r = mr % rows, n = row0 + r + 1 < cols ? row0 + r + 1 : cols;
            size_t at = (size_t)mr * cols * width;
            /* without dropout every factor is `scale`: none made */
            float *factor = threshold ? x + cols : NULL;
            if (factor)
                keep_factors(factor, seed, (uint64_t)(mr / rows) * mat_rows + row0 + r, 0, n,
                             threshold, scale);
            if (dpd) {
                backward_row(x, x + 2 * cols, factor, (const char *)dpd + at,
                             (const char *)s + at, lse[mr], n, cols, bf16, t, scale,
                             (char *)out + at, pd_out ? (char *)pd_out + at : NULL);
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
                    long cols, long row0, long mat_rows, float t, uint64_t seed,
                    uint32_t threshold, float scale) {
    return each_row(s, NULL, lse, pd, NULL, bf16, mats, rows, cols, row0, mat_rows, t, seed,
                    threshold, scale);
}

int softmax_dropout_backward(const void *dpd, const void *s, const float *lse, void *ds,
                             void *pd, int bf16, long mats, long rows, long cols, long row0,
                             long mat_rows, float t, uint64_t seed, uint32_t threshold,
                             float scale) {
    return each_row(s, dpd, (float *)lse, ds, pd, bf16, mats, rows, cols, row0, mat_rows,
                    t, seed, threshold, scale);
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
