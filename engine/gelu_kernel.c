/* GPT-2's GELU (its tanh form) and its gradient while training on the CPU, one pass each
 * (engine/gelu.py).
 *
 * gelu_tanh(x, y, bf16, n)                y[i] = gelu(x[i])
 * gelu_tanh_backward(g, x, dx, bf16, n)   dx[i] = g[i] * gelu'(x[i])
 *     n numbers each, bf16 where `bf16`, else fp32; the arithmetic in fp32.
 *
 *     gelu(x) = 0.5 x (1 + tanh(u)),   u = sqrt(2 / pi) (x + 0.044715 x^3)
 *
 * With 1 + tanh(u) = 2 / (1 + e^(-2u)) = 2 s, gelu(x) = x s: one e^x a number (simd.h's
 * polynomial), where PyTorch's kernel computes a tanh; and its derivative
 *
 *     gelu'(x) = s + 2 x s (1 - s) u'(x),   u'(x) = sqrt(2 / pi) (1 + 3 * 0.044715 x^2)
 *
 * with 1 - s taken as e^(-2u) s, not subtracted (no cancellation where s is near 1).
 * e^(-2u) is taken at most e^80 (the largest 2^n that AVX2's vf_exp makes is 2^127): for x
 * below about -9, gelu(x) and its gradient come out under 1e-20 in size where PyTorch's
 * give 0. The numbers are read as they are used and written through a buffer of the thread's
 * in pieces of PIECE (fp32, in the core's L1 cache): each is read and written once.
 */
#include <stdint.h>

#include "bf16.h"
#include "simd.h"

#define PIECE 2048
#define SQRT_2_OVER_PI 0.7978845608028654f
#define KAPPA 0.044715f

/* e^(-2u) for VW numbers x, at most e^80 (finite, and so is e^(-2u) s; a NaN stays NaN) */
static inline vf minus_2u_exp(vf x) {
    vf u = vf_mul(vf_set(SQRT_2_OVER_PI), vf_fma(vf_mul(vf_set(KAPPA), x), vf_mul(x, x), x));
    return vf_exp(vf_min(vf_set(80.0f), vf_mul(vf_set(-2.0f), u)));
}

/* piece p of the n numbers: its first index and length */
static inline long piece(long p, long n, long *m) {
    long at = p * PIECE;
    *m = n - at < PIECE ? n - at : PIECE;
    return at;
}

/* gelu(v) = v s, s = 1 / (1 + e^(-2u)) */
static inline vf gelu_v(vf v) {
    return vf_mul(v, vf_div(vf_set(1.0f), vf_add(vf_set(1.0f), minus_2u_exp(v))));
}

/* g gelu'(v) */
static inline vf gelu_grad_v(vf v, vf g) {
    vf e = minus_2u_exp(v);
    vf s = vf_div(vf_set(1.0f), vf_add(vf_set(1.0f), e));
    vf s_1_s = vf_mul(vf_mul(e, s), s);                                 /* s (1 - s) */
    vf du = vf_mul(vf_set(SQRT_2_OVER_PI),
                   vf_fma(vf_set(3.0f * KAPPA), vf_mul(v, v), vf_set(1.0f)));
    vf d = vf_fma(vf_mul(vf_add(v, v), s_1_s), du, s);
    return vf_mul(d, g);
}

/* y = gelu(x) (g NULL) or y = g gelu'(x), n numbers, a piece of PIECE at a time per thread */
static void each_piece(const void *g, const void *x, void *y, int bf16, long n) {
    size_t width = bf16 ? 2 : 4;
    long pieces = (n + PIECE - 1) / PIECE;
    #pragma omp parallel
    {
        float buf[PIECE] __attribute__((aligned(64)));
        #pragma omp for schedule(static)
        for (long p = 0; p < pieces; p++) {
            long m, at = piece(p, n, &m);
            const char *in = (const char *)x + at * width;
            const char *gin = g ? (const char *)g + at * width : NULL;
            for (long i = 0; i < m; i += VW) {
                vf v = vf_row_n(in, i, m, bf16);
                vf_store_n(buf + i, gin ? gelu_grad_v(v, vf_row_n(gin, i, m, bf16)) : gelu_v(v),
                           m - i);
            }
            store_row((char *)y + at * width, buf, m, m, bf16);
        }
    }
}

void gelu_tanh(const void *x, void *y, int bf16, long n) {
    each_piece(NULL, x, y, bf16, n);
}

void gelu_tanh_backward(const void *g, const void *x, void *dx, int bf16, long n) {
    each_piece(g, x, dx, bf16, n);
}
