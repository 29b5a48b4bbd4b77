/* y = x @ (q * scale).T + bias for int8 weights and fp32 or bf16 activations, AVX-512 CPUs.

   engine/int8.py compiles this file once per machine (gcc -O3 -march=native -fopenmp) and
   calls it through ctypes; see the module's docstring for why and for the measurements.

   x (M, K), q (N, K) int8 row-major, scale (N,) bf16, bias (N,) or NULL, y (M, N); x, bias
   and y all fp32 (int8_linear_f32) or all bf16 (int8_linear_bf16). Sums in fp32;
   y = sum_k x[m,k] * q[n,k] * scale[n] + bias[n], rounded to bf16 for bf16 y.

   The outputs are split among the threads in blocks of 4 rows of q. A block's 4 rows are
   converted from int8 to fp32 16 at a time and multiplied with up to 4 rows of x (fp32,
   converted once per call into a buffer that stays in L1/L2); more rows of x go through
   the same block again while it is still in the cache, so q is read from memory once
   whatever M is. The scale multiplies the finished sum, not every weight. */

#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"

static inline __m512 load_q16(const int8_t *p, __mmask16 mask) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mask, p)));
}

/* C rows of q (n .. n+C-1) times R rows of xf (fp32, stride K), sums into out[r][c].
   One function per (R, C), written out by a macro, so that the R * C accumulators stay in
   registers (a loop over runtime-sized arrays of them spilled to the stack). */
#define DEFINE_BLOCK(R, C)                                                              \
static void block_##R##_##C(const float *xf, const int8_t *q, int K, float *out,      \
                            const int8_t *next, int next_rows) {                        \
    __m512 acc[R * C];                                                                  \
    _Pragma("GCC unroll 32")                                                            \
    for (int i = 0; i < R * C; i++) acc[i] = _mm512_setzero_ps();                       \
    for (int k = 0; k < K; k += 16) {                                                   \
        __mmask16 mask = K - k >= 16 ? (__mmask16)0xffff                                \
                                     : (__mmask16)((1u << (K - k)) - 1u);               \
        /* the rows of q come in short runs (one row = K bytes), too short for the      \
           hardware prefetcher to learn: fetch the next block's rows a line at a time */ \
        if ((k & 63) == 0)                                                              \
            for (int c = 0; c < next_rows; c++)                                         \
                _mm_prefetch((const char *)(next + (size_t)c * K + k), _MM_HINT_T0);    \
        __m512 w[C];                                                                    \
        _Pragma("GCC unroll 8")                                                         \
        for (int c = 0; c < C; c++) w[c] = load_q16(q + (size_t)c * K + k, mask);       \
        _Pragma("GCC unroll 4")                                                         \
        for (int r = 0; r < R; r++) {                                                   \
            __m512 xv = _mm512_maskz_loadu_ps(mask, xf + (size_t)r * K + k);            \
            _Pragma("GCC unroll 8")                                                     \
            for (int c = 0; c < C; c++)                                                 \
                acc[r * C + c] = _mm512_fmadd_ps(xv, w[c], acc[r * C + c]);             \
        }                                                                               \
    }                                                                                   \
    _Pragma("GCC unroll 32")                                                            \
    for (int i = 0; i < R * C; i++) out[i] = _mm512_reduce_add_ps(acc[i]);              \
}
DEFINE_BLOCK(1, 8) DEFINE_BLOCK(2, 4) DEFINE_BLOCK(3, 4) DEFINE_BLOCK(4, 4)
DEFINE_BLOCK(1, 1) DEFINE_BLOCK(2, 1) DEFINE_BLOCK(3, 1) DEFINE_BLOCK(4, 1)

typedef void (*block_fn)(const float *, const int8_t *, int, float *, const int8_t *, int);
static const block_fn FULL[5] = {0, block_1_8, block_2_4, block_3_4, block_4_4};
static const block_fn ONE[5] = {0, block_1_1, block_2_1, block_3_1, block_4_1};
static const int WIDTH[5] = {0, 8, 4, 4, 4};       /* rows of q per block, by rows of x */

/* rows m .. m+R-1 of y, outputs n .. n+cols-1; y and bias are bf16 (uint16_t) when
   bf16 is set, else fp32 */
static void finish(const float *out, int R, int cols, int stride, const uint16_t *scale,
                   const void *bias, void *y, int bf16, int N, int m, int n) {
    for (int r = 0; r < R; r++)
        for (int c = 0; c < cols; c++) {
            float v = out[r * stride + c] * bf16_to_f32(scale[n + c]);
            size_t at = (size_t)(m + r) * N + n + c;
            if (bf16) {
                if (bias) v += bf16_to_f32(((const uint16_t *)bias)[n + c]);
                ((uint16_t *)y)[at] = f32_to_bf16(v);
            } else {
                if (bias) v += ((const float *)bias)[n + c];
                ((float *)y)[at] = v;
            }
        }
}

static void run(const float *xf, const int8_t *q, const uint16_t *scale, const void *bias,
                void *y, int bf16, int M, int N, int K, int threads) {
    /* blocks of 8 rows of q (the widest kernel); each is split for the rows of x */
    int blocks = (N + 7) / 8;
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int b = 0; b < blocks; b++) {
        int n0 = b * 8, n1 = n0 + 8 < N ? n0 + 8 : N;
        float out[32];
        for (int m = 0; m < M; m += 4) {
            int R = M - m < 4 ? M - m : 4;
            const float *xr = xf + (size_t)m * K;
            int n = n0;
            for (; n + WIDTH[R] <= n1; n += WIDTH[R]) {
                int ahead = n + WIDTH[R];          /* rows to prefetch: the next block's */
                int count = N - ahead < WIDTH[R] ? N - ahead : WIDTH[R];
                FULL[R](xr, q + (size_t)n * K, K, out, q + (size_t)ahead * K, count);
                finish(out, R, WIDTH[R], WIDTH[R], scale, bias, y, bf16, N, m, n);
            }
            for (; n < n1; n++) {
                ONE[R](xr, q + (size_t)n * K, K, out, q, 0);
                finish(out, R, 1, 1, scale, bias, y, bf16, N, m, n);
            }
        }
    }
}

/* bf16 x, bias, y; returns 0, or -1 if the fp32 copy of x could not be allocated */
int int8_linear_bf16(const uint16_t *x, const int8_t *q, const uint16_t *scale,
                     const uint16_t *bias, uint16_t *y, int M, int N, int K, int threads) {
    float *xf = (float *)aligned_alloc(64, (((size_t)M * K * 4) + 63) / 64 * 64);
    if (!xf) return -1;
    for (size_t i = 0; i < (size_t)M * K; i++) xf[i] = bf16_to_f32(x[i]);
    run(xf, q, scale, bias, y, 1, M, N, K, threads);
    free(xf);
    return 0;
}

/* fp32 x, bias, y */
int int8_linear_f32(const float *x, const int8_t *q, const uint16_t *scale,
                    const float *bias, float *y, int M, int N, int K, int threads) {
    run(x, q, scale, bias, y, 0, M, N, K, threads);
    return 0;
}
