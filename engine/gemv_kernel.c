/* y = x @ W + bias for one row x, fp32, AVX-512 CPUs: the product of batch-1 decoding.

   engine/native.py compiles this file once per machine (gcc -O3 -march=native -fopenmp);
   engine/cpu_kernels.py calls it through ctypes (see its gemv docstring for why).

   x (K,), wt (N, K) row-major: W transposed, so that each output's weights are one
   contiguous run; bias (N,) or NULL; y (N,). The outputs are split among the threads in
   blocks of 8 rows of wt, each row's 16-wide products summed in a register of its own, the
   next block's rows prefetched (a row is K floats, too short a run for the hardware
   prefetcher to learn), so that the weights stream from memory at close to its speed. */

#include <immintrin.h>
#include <stddef.h>

#define ROWS 8

/* C rows of wt times x, sums into out[c] */
#define DEFINE_BLOCK(C)                                                                 \
static void block_##C(const float *x, const float *w, int K, float *out,               \
                      const float *next, int next_rows) {                               \
    __m512 acc[C];                                                                      \
    _Pragma("GCC unroll 8")                                                             \
    for (int c = 0; c < C; c++) acc[c] = _mm512_setzero_ps();                           \
    for (int k = 0; k < K; k += 16) {                                                   \
        __mmask16 mask = K - k >= 16 ? (__mmask16)0xffff                                \
                                     : (__mmask16)((1u << (K - k)) - 1u);               \
        for (int c = 0; c < next_rows; c++)          /* one 64-byte line of each row */ \
            _mm_prefetch((const char *)(next + (size_t)c * K + k), _MM_HINT_T0);        \
        __m512 xv = _mm512_maskz_loadu_ps(mask, x + k);                                 \
        _Pragma("GCC unroll 8")                                                         \
        for (int c = 0; c < C; c++)                                                     \
            acc[c] = _mm512_fmadd_ps(xv, _mm512_maskz_loadu_ps(mask, w + (size_t)c * K + k), \
                                     acc[c]);                                           \
    }                                                                                   \
    _Pragma("GCC unroll 8")                                                             \
    for (int c = 0; c < C; c++) out[c] = _mm512_reduce_add_ps(acc[c]);                  \
}
DEFINE_BLOCK(8) DEFINE_BLOCK(1)

void gemv_f32(const float *x, const float *wt, const float *bias, float *y, int N, int K,
              int threads) {
    int blocks = (N + ROWS - 1) / ROWS;
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int b = 0; b < blocks; b++) {
        int n0 = b * ROWS, n1 = n0 + ROWS < N ? n0 + ROWS : N;
        float out[ROWS];
        if (n1 - n0 == ROWS) {
            int ahead = N - n1 < ROWS ? N - n1 : ROWS;          /* the next block's rows */
            block_8(x, wt + (size_t)n0 * K, K, out, wt + (size_t)n1 * K, ahead);
        } else {
            for (int n = n0; n < n1; n++) block_1(x, wt + (size_t)n * K, K, out + n - n0, wt, 0);
        }
        for (int n = n0; n < n1; n++) y[n] = out[n - n0] + (bias ? bias[n] : 0.0f);
    }
}
