/* Batch-1 decoding on x86-64 and 64-bit Arm CPUs: one token through every block of GPT-2 in
   one call.

   engine/native.py compiles this file once per machine (gcc -O3 -march=native -fopenmp);
   engine/decoder.py, engine/cpu_kernels.py and engine/int8.py call it through ctypes. It is
   written in simd.h's vector operations, so it runs on AVX-512 CPUs (16 floats a vector),
   on AVX2 ones (8) and on Arm's NEON (8, as two vectors of 4), with AVX512-BF16,
   AVX512-VNNI and Arm's dotprod instructions where the CPU has them (isa() says which it
   was built with).

   Five pieces, all but decode_token also exported on their own:
   gemv_f32     y = x @ W.T + bias for one fp32 row x and an fp32 W (N, K) row-major (each
                output's weights one contiguous run).
   gemv_bf16    the same for a bf16 W: x rounded to bf16, products exact in fp32, fp32 sums
                (vdpbf16ps, AVX512-BF16, where the CPU has it).
   gemm_q8      the same for up to 16 rows x and int8 weights q (N, K) with one bf16 scale
                per output (engine/int8.py's layers). x is rounded to int8 on the fly in
                blocks of 32 (one fp32 scale each, as llama.cpp's q8_0 does), and the int8 x
                int8 products are summed in int32 (AVX512-VNNI's vpdpbusd: 64 products per
                instruction; without it AVX2's vpmaddubsw, 32; on Arm sdot, 16), each
                32-block's sum scaled back to fp32; each row of q is read once for all rows
                of x.
   decode_token every block of the model for one new token (LayerNorm, the qkv product,
                attention over the KV cache, the projection, the MLP with its tanh GELU,
                both residual adds) and the final LayerNorm, in one OpenMP parallel region:
                PyTorch would make ~25 calls a block, each with its own overhead and thread
                wake-up, which cost more than the arithmetic at this size.
   argmax_rows  greedy decoding's next token: each row's largest logit (the plain argmax,
                torch.argmax, took 75 us a token).

   In every product the outputs are split among the threads in contiguous ranges of rows,
   and a thread reads its rows one after another: one run of memory front to back, which
   the hardware prefetcher follows. Reading eight rows side by side instead (eight short
   runs of 768 bytes for an int8 row of the 124M model) one core read the int8 weights at
   8-9 GB/s; one run at a time, 17-23 GB/s, about what it reads memory at (Zen 4). */

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"
#include "simd.h"

static int padded(int K, int step) { return (K + step - 1) / step * step; }

#define MAX_ROWS 16                            /* rows of x a Q8 product takes at once */

#if defined(__AVX512BF16__) && VW == 16
#define BF16_DOT 1                             /* vdpbf16ps: bf16 pairs summed into fp32 */
#else
#define BF16_DOT 0
#endif

/* A product's input x as each kind of matrix reads it (Kp: K rounded up to 64, zeros after
   K), one row for F32 and BF16, up to MAX_ROWS for Q8:
   f32   x (fp32, Kp)
   bf    x rounded to bf16 (Kp)
   q     row r of x rounded to int8 at q + r Kp; lane + r Kp / 4: the scale of each group
         of 4 of its inputs, which is its 32-block's; corr[r]: see quantize */
typedef struct {
    float *f32;
    uint16_t *bf;
    int8_t *q;
    float *lane;
    float corr[MAX_ROWS];
} Act;

/* ---- one row of each kind ---------------------------------------------------------------- */

/* sum_k x[k] w[k] for an fp32 row w of K numbers */
static float row_f32(const float *x, const float *w, int K) {
    vf a0 = vf_zero(), a1 = vf_zero();          /* two sums, so that two FMAs overlap */
    int k = 0;
    for (; k + 2 * VW <= K; k += 2 * VW) {
        a0 = vf_fma(vf_load(x + k), vf_load(w + k), a0);
        a1 = vf_fma(vf_load(x + k + VW), vf_load(w + k + VW), a1);
    }
    for (; k < K; k += VW)                      /* x has zeros after K; w ends at K */
        a0 = vf_fma(vf_load(x + k), vf_load_n(w + k, K - k), a0);
    return vf_sum(vf_add(a0, a1));
}

/* the same for a bf16 row, with x in bf16 */
static float row_bf16(const uint16_t *x, const uint16_t *w, int K) {
#if BF16_DOT
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    for (int k = 0; k < K; k += 32) {
        __m512i xv = _mm512_loadu_si512(x + k);         /* zeros after K */
        __m512i wv = K - k >= 32 ? _mm512_loadu_si512(w + k)
                                 : _mm512_maskz_loadu_epi16((__mmask32)((1ull << (K - k)) - 1), w + k);
        /* vdpbf16ps: each fp32 lane += the two products of its pair of bf16 numbers */
        if ((k / 32) & 1) a1 = _mm512_dpbf16_ps(a1, (__m512bh)wv, (__m512bh)xv);
        else a0 = _mm512_dpbf16_ps(a0, (__m512bh)wv, (__m512bh)xv);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
#else
    /* both widened to fp32 (exact), VW numbers at a time */
    vf a0 = vf_zero(), a1 = vf_zero();
    int k = 0;
    for (; k + 2 * VW <= K; k += 2 * VW) {
        a0 = vf_fma(vf_bf16(x + k), vf_bf16(w + k), a0);
        a1 = vf_fma(vf_bf16(x + k + VW), vf_bf16(w + k + VW), a1);
    }
    for (; k < K; k += VW)
        a0 = vf_fma(vf_bf16(x + k), vf_bf16_n(w + k, K - k), a0);
    return vf_sum(vf_add(a0, a1));
#endif
}

#if defined(__AVX512VNNI__) && VW == 16
/* rows r0 .. r0+R-1 of the quantized x times one int8 row w, into out[0..R-1], before corr
   and the row's scale: over 64-input pieces, lane scale * int32 sum of 4 products. vpdpbusd
   multiplies unsigned by signed bytes, so the weights enter as q_w + 128 (top bit flipped,
   Q8_FLIP: quantize's corr takes the extra 128 sum(q_x) off), loaded once for the R rows */
#define Q8_FLIP 1
#define DEFINE_ROWS_Q8(R)                                                               \
static void rows_q8_##R(const Act *a, int r0, const int8_t *w, int K, float *out) {    \
    const __m512i flip = _mm512_set1_epi8((char)0x80);                                  \
    size_t Kp = (size_t)padded(K, 64);                                                  \
    __m512 acc[R];              /* in registers: the loops over r are unrolled */       \
    _Pragma("GCC unroll 4")                                                             \
    for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();                           \
    for (int k = 0; k < K; k += 64) {                                                   \
        __m512i wv = K - k >= 64 ? _mm512_loadu_si512(w + k)                            \
                                 : _mm512_maskz_loadu_epi8((1ull << (K - k)) - 1, w + k); \
        wv = _mm512_xor_si512(wv, flip);                                                \
        _Pragma("GCC unroll 4")                                                         \
        for (int r = 0; r < R; r++) {                                                   \
            size_t row = (size_t)(r0 + r);                                              \
            __m512i d = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wv,                 \
                                            _mm512_loadu_si512(a->q + row * Kp + k));   \
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d),                             \
                                     _mm512_loadu_ps(a->lane + row * Kp / 4 + k / 4), acc[r]); \
        }                                                                               \
    }                                                                                   \
    _Pragma("GCC unroll 4")                                                             \
    for (int r = 0; r < R; r++) out[r] = _mm512_reduce_add_ps(acc[r]);                  \
}
#elif defined(__ARM_NEON) && defined(__aarch64__)
/* The same with NEON, 16 inputs at a time: int8 times int8 directly (no flip, no corr),
   each group of 4 products summed in an int32 lane, the lanes vpdpbusd gives: sdot where the
   CPU has it (Armv8.2 dotprod: Graviton 2 and later, Raspberry Pi 5), else the 16 products
   in int16 (each at most 127 * 127) added pairwise twice */
#define Q8_FLIP 0
#define Q8_HALF 16                             /* inputs a step, in each of two sums */
typedef int8x16_t q8_wv;
typedef float32x4_t q8_acc;
static inline q8_acc q8_zero(void) { return vdupq_n_f32(0.0f); }
/* Q8_HALF weights from w, of which ``left`` are the row's (its end: zeros after) */
static inline q8_wv q8_load(const int8_t *w, int left) {
    if (left >= 16) return vld1q_s8(w);
    int8_t part[16] = {0};
    memcpy(part, w, (size_t)(left > 0 ? left : 0));
    return vld1q_s8(part);
}
/* acc + lane scales * the int32 sums of each 4 products of wv and the inputs at xq */
static inline q8_acc q8_fma(q8_acc acc, q8_wv wv, const int8_t *xq, const float *lane) {
    int8x16_t x = vld1q_s8(xq);
#if defined(__ARM_FEATURE_DOTPROD)
    int32x4_t sums = vdotq_s32(vdupq_n_s32(0), wv, x);
#else
    int32x4_t sums = vpaddq_s32(vpaddlq_s16(vmull_s8(vget_low_s8(wv), vget_low_s8(x))),
                                vpaddlq_s16(vmull_high_s8(wv, x)));
#endif
    return vfmaq_f32(acc, vcvtq_f32_s32(sums), vld1q_f32(lane));
}
static inline float q8_total(q8_acc a, q8_acc b) { return vaddvq_f32(vaddq_f32(a, b)); }
#else
/* The same with AVX2 (also where AVX-512 has no VNNI), 32 inputs at a time. vpmaddubsw
   multiplies unsigned by signed bytes and adds neighbouring pairs in int16, saturating: with
   q_w + 128 a pair could reach 2 * 255 * 127, so it takes |q_x| times q_w with q_x's sign
   (each pair then at most 2 * 127 * 127 < 2^15, exact); vpmaddwd adds pairs of those into
   the int32 sum of 4 products, the lanes vpdpbusd gives. No flip, no corr. */
#define Q8_FLIP 0
#define Q8_HALF 32
typedef __m256i q8_wv;
typedef __m256 q8_acc;
static inline q8_acc q8_zero(void) { return _mm256_setzero_ps(); }
static inline q8_wv q8_load(const int8_t *w, int left) {
    if (left >= 32) return _mm256_loadu_si256((const __m256i *)w);
    int8_t part[32] = {0};
    memcpy(part, w, (size_t)(left > 0 ? left : 0));
    return _mm256_loadu_si256((const __m256i *)part);
}
static inline q8_acc q8_fma(q8_acc acc, q8_wv wv, const int8_t *xq, const float *lane) {
    __m256i x = _mm256_loadu_si256((const __m256i *)xq);
    __m256i pairs = _mm256_maddubs_epi16(_mm256_abs_epi8(x), _mm256_sign_epi8(wv, x));
    __m256 sums = _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
    return _mm256_fmadd_ps(sums, _mm256_loadu_ps(lane), acc);
}
static inline float q8_total(q8_acc a, q8_acc b) { return sum8(_mm256_add_ps(a, b)); }
#endif
#if !Q8_FLIP
/* AVX2 and NEON: over pieces of 2 Q8_HALF inputs, as two halves with a sum each (two chains
   of FMAs, not one), the weights loaded once for the R rows */
#define DEFINE_ROWS_Q8(R)                                                               \
static void rows_q8_##R(const Act *a, int r0, const int8_t *w, int K, float *out) {    \
    size_t Kp = (size_t)padded(K, 64);                                                  \
    q8_acc acc0[R], acc1[R];                                                            \
    _Pragma("GCC unroll 4")                                                             \
    for (int r = 0; r < R; r++) acc0[r] = acc1[r] = q8_zero();                          \
    for (int k = 0; k < K; k += 2 * Q8_HALF) {                                          \
        q8_wv w0 = q8_load(w + k, K - k), w1 = q8_load(w + k + Q8_HALF, K - k - Q8_HALF); \
        _Pragma("GCC unroll 4")                                                         \
        for (int r = 0; r < R; r++) {                                                   \
            const int8_t *xq = a->q + (size_t)(r0 + r) * Kp + k;                        \
            const float *lane = a->lane + (size_t)(r0 + r) * Kp / 4 + k / 4;            \
            acc0[r] = q8_fma(acc0[r], w0, xq, lane);                                    \
            acc1[r] = q8_fma(acc1[r], w1, xq + Q8_HALF, lane + Q8_HALF / 4);            \
        }                                                                               \
    }                                                                                   \
    _Pragma("GCC unroll 4")                                                             \
    for (int r = 0; r < R; r++) out[r] = q8_total(acc0[r], acc1[r]);                   \
}
#endif
DEFINE_ROWS_Q8(1) DEFINE_ROWS_Q8(2) DEFINE_ROWS_Q8(3) DEFINE_ROWS_Q8(4)

/* what this build uses: "avx512", "avx2" or "neon", then " bf16" and " vnni" (x86) or
   " dotprod" (Arm) where it has them */
const char *isa(void) {
    return SIMD_ISA
#if BF16_DOT
        " bf16"
#endif
#if Q8_FLIP
        " vnni"
#endif
#if defined(__ARM_FEATURE_DOTPROD)
        " dotprod"
#endif
        ;
}
typedef void (*rows_q8_fn)(const Act *, int, const int8_t *, int, float *);
static const rows_q8_fn ROWS_Q8[5] = {0, rows_q8_1, rows_q8_2, rows_q8_3, rows_q8_4};

/* ---- the input of a product ---------------------------------------------------------- */

/* row r of x (K,) -> a's row r: in each block of 32, scale = max |x| / 127, q = round(x /
   scale) (to nearest, ties to even). With the weights entering as q_w + 128, each
   32-block's sum is sum(q_w q_x) + 128 sum(q_x) where Q8_FLIP; corr[r] = 128 * the sum over
   blocks of scale_b * sum(q_x in b), taken off the scaled total (0 without Q8_FLIP) */
static void quantize(const float *x, int K, Act *a, int r) {
    int Kp = padded(K, 64);
    int8_t *q = a->q + (size_t)r * Kp;
    float *lane = a->lane + (size_t)r * Kp / 4;
    double corr = 0.0;
    for (int b = 0; b < Kp; b += 32) {
        vf v[32 / VW];
        vf amax = vf_zero();
        for (int j = 0; j < 32 / VW; j++) {
            v[j] = vf_load_n(x + b + j * VW, K - b - j * VW);      /* zeros after K */
            amax = vf_max(amax, vf_abs(v[j]));
        }
        float top = vf_hmax(amax), scale = top / 127.0f, inv = top > 0.0f ? 127.0f / top : 0.0f;
        float sum = 0.0f;                           /* of the block's q: integers, exact */
        for (int j = 0; j < 32 / VW; j++) {
            vf qv = vf_round(vf_mul(v[j], vf_set(inv)));
            vf_store_i8(q + b + j * VW, qv);
            sum += vf_sum(qv);
        }
        for (int i = 0; i < 8; i++) lane[b / 4 + i] = scale;
        corr += (double)scale * sum;
    }
    a->corr[r] = Q8_FLIP ? (float)(128.0 * corr) : 0.0f;
}

enum { F32 = 0, Q8 = 1, BF16 = 2 };            /* a matrix's kind */
enum { STORE = 0, ADD = 1 };                   /* y = result, or y += result (residual) */

typedef struct {
    int kind, n, k;                 /* n outputs, k inputs */
    const void *w;                  /* (n, k) row-major: float, int8 or bf16 */
    const uint16_t *scale;          /* Q8: (n,) bf16 */
    const float *bias;              /* (n,) or NULL */
} Mat;

/* a's form of the rows of x (rows x K; one row but for Q8) for m's kind (single-threaded:
   call it in an omp single) */
static void prepare(const Mat *m, const float *x, int rows, Act *a) {
    int K = m->k, Kp = padded(K, 64);
    if (m->kind == Q8) {
        for (int r = 0; r < rows; r++) quantize(x + (size_t)r * K, K, a, r);
    } else if (m->kind == BF16) {
        for (int k = 0; k < Kp; k++) a->bf[k] = k < K ? f32_to_bf16(x[k]) : 0;
    } else {
        memcpy(a->f32, x, (size_t)K * 4);
        memset(a->f32 + K, 0, (size_t)(Kp - K) * 4);
    }
}

/* y (rows, n) = x @ W.T + bias from a's prepared rows of x, the rows of W shared among the
   threads of the enclosing parallel region in contiguous ranges (an orphaned omp for) */
static void product(const Mat *m, const Act *a, int rows, float *y, int mode) {
    int K = m->k, N = m->n;
    #pragma omp for schedule(static)
    for (int n = 0; n < N; n++) {
        float v[MAX_ROWS];
        if (m->kind == F32) {
            v[0] = row_f32(a->f32, (const float *)m->w + (size_t)n * K, K);
        } else if (m->kind == BF16) {
            v[0] = row_bf16(a->bf, (const uint16_t *)m->w + (size_t)n * K, K);
        } else {
            for (int r0 = 0; r0 < rows; r0 += 4) {
                int R = rows - r0 < 4 ? rows - r0 : 4;
                ROWS_Q8[R](a, r0, (const int8_t *)m->w + (size_t)n * K, K, v + r0);
            }
            for (int r = 0; r < rows; r++) v[r] = (v[r] - a->corr[r]) * bf16_to_f32(m->scale[n]);
        }
        for (int r = 0; r < rows; r++) {
            float out = v[r] + (m->bias ? m->bias[n] : 0.0f);
            size_t at = (size_t)r * N + n;
            y[at] = mode == ADD ? y[at] + out : out;
        }
    }
}

static int alloc_act(Act *a, int K, int rows) {
    size_t Kp = (size_t)padded(K, 64);
    a->f32 = (float *)aligned_alloc(64, Kp * 4);
    a->bf = (uint16_t *)aligned_alloc(64, Kp * 2);
    a->q = (int8_t *)aligned_alloc(64, Kp * rows);
    a->lane = (float *)aligned_alloc(64, Kp * rows);          /* Kp / 4 floats a row */
    return a->f32 && a->bf && a->q && a->lane ? 0 : -1;
}

static void free_act(Act *a) { free(a->f32); free(a->bf); free(a->q); free(a->lane); }

/* one product on its own (rows of x: 1, or up to MAX_ROWS for Q8); returns 0, or -1 when
   out of memory or asked for more rows */
static int gemm(int kind, const float *x, const void *w, const uint16_t *scale,
                const float *bias, float *y, int M, int N, int K, int threads) {
    if (M < 1 || M > (kind == Q8 ? MAX_ROWS : 1)) return -1;
    Act a = {NULL, NULL, NULL, NULL, {0}};
    if (alloc_act(&a, K, M)) { free_act(&a); return -1; }
    Mat m = {kind, N, K, w, scale, bias};
    prepare(&m, x, M, &a);
    #pragma omp parallel num_threads(threads)
    product(&m, &a, M, y, STORE);
    free_act(&a);
    return 0;
}

/* y = x @ W.T + bias for one fp32 row x: W fp32 (N, K) */
int gemv_f32(const float *x, const float *w, const float *bias, float *y, int N, int K,
             int threads) {
    return gemm(F32, x, w, NULL, bias, y, 1, N, K, threads);
}

/* W bf16 (N, K) */
int gemv_bf16(const float *x, const uint16_t *w, const float *bias, float *y, int N, int K,
              int threads) {
    return gemm(BF16, x, w, NULL, bias, y, 1, N, K, threads);
}

/* x (M, K) fp32, M <= 16; W int8 (N, K) with bf16 scales (N,); y (M, N) */
int gemm_q8(const float *x, const int8_t *q, const uint16_t *scale, const float *bias,
            float *y, int M, int N, int K, int threads) {
    return gemm(Q8, x, q, scale, bias, y, M, N, K, threads);
}

/* ---- one token through the model ------------------------------------------------------ */

typedef struct {
    const float *ln1_w, *ln1_b, *ln2_w, *ln2_b;
    float eps1, eps2;
    Mat qkv, proj, fc, fc2;
} Block;

/* y = (x - mean) / sqrt(var + eps) * w + b over C numbers (the variance biased, as torch) */
static void layer_norm(const float *x, const float *w, const float *b, float eps, int C,
                       float *y) {
    double sum = 0.0, sq = 0.0;
    for (int i = 0; i < C; i++) sum += x[i];
    float mean = (float)(sum / C);
    for (int i = 0; i < C; i++) { double d = x[i] - mean; sq += d * d; }
    float inv = 1.0f / sqrtf((float)(sq / C) + eps);
    for (int i = 0; i < C; i++) y[i] = (x[i] - mean) * inv * w[i] + b[i];
}

/* VW numbers of a cache row from number i on, as fp32 */
static inline vf kv_vec(const void *row, int bf16, size_t i) {
    return bf16 ? vf_bf16((const uint16_t *)row + i) : vf_load((const float *)row + i);
}

/* softmax(q k^T / sqrt(d)) v for one head and one query over keys 0..n-1 (rows of d, fp32
   or bf16) */
static void attend(const float *q, const void *k, const void *v, int bf16, int n, int d,
                   float *scores, float *out) {
    float scale = 1.0f / sqrtf((float)d), best = -INFINITY, total = 0.0f;
    if (d % VW || d > 256) {                        /* any width: plain loops */
        for (int p = 0; p < n; p++) {
            float s = 0.0f;
            for (int i = 0; i < d; i++) s += q[i] * row_at(k, (size_t)p * d + i, bf16);
            scores[p] = s * scale;
            best = fmaxf(best, scores[p]);
        }
        for (int p = 0; p < n; p++) { scores[p] = expf(scores[p] - best); total += scores[p]; }
        for (int i = 0; i < d; i++) out[i] = 0.0f;
        for (int p = 0; p < n; p++)
            for (int i = 0; i < d; i++)
                out[i] += scores[p] / total * row_at(v, (size_t)p * d + i, bf16);
        return;
    }
    for (int p = 0; p < n; p++) {                   /* scores, VW numbers of a row at a time */
        vf acc = vf_zero();
        for (int i = 0; i < d; i += VW)
            acc = vf_fma(vf_load(q + i), kv_vec(k, bf16, (size_t)p * d + i), acc);
        scores[p] = vf_sum(acc) * scale;
        best = fmaxf(best, scores[p]);
    }
    vf sum = vf_zero();
    for (int p = 0; p < n; p += VW) {               /* e^(score - best), VW at a time */
        vf e = vf_keep_n(vf_exp(vf_sub(vf_load_n(scores + p, n - p), vf_set(best))), n - p);
        vf_store_n(scores + p, e, n - p);
        sum = vf_add(sum, e);
    }
    total = vf_sum(sum);
    vf acc[256 / VW];                               /* out, d / VW registers */
    for (int j = 0; j < d / VW; j++) acc[j] = vf_zero();
    for (int p = 0; p < n; p++) {
        vf wgt = vf_set(scores[p]);
        for (int j = 0; j < d / VW; j++)
            acc[j] = vf_fma(wgt, kv_vec(v, bf16, (size_t)p * d + j * VW), acc[j]);
    }
    for (int j = 0; j < d / VW; j++)
        vf_store(out + j * VW, vf_div(acc[j], vf_set(total)));
}

/* the cache row of layer l, head h, position p (fp32 or bf16 numbers) */
static inline void *cache_row(void *c, int bf16, int l, int H, int h, int max_len, int p,
                              int d) {
    size_t at = (((size_t)l * H + h) * max_len + p) * d;
    return bf16 ? (void *)((uint16_t *)c + at) : (void *)((float *)c + at);
}

/* GPT-2's GELU (torch's approximate="tanh") of y[0..n-1] in place:
   0.5 x (1 + tanh(u)) with u = sqrt(2 / pi) (x + 0.044715 x^3), written x / (1 + e^(-2u)) */
static void gelu_tanh(float *y, int n) {
    const vf c = vf_set(-2.0f * 0.7978845608028654f), kappa = vf_set(0.044715f), one = vf_set(1.0f);
    for (int i = 0; i < n; i += VW) {
        vf x = vf_load_n(y + i, n - i);
        vf u = vf_mul(c, vf_fma(vf_mul(kappa, x), vf_mul(x, x), x));
        vf_store_n(y + i, vf_div(x, vf_add(one, vf_exp(u))), n - i);
    }
}

/* Token ``token`` at position ``pos``: x = tok_emb[token] + pos_emb[pos] through every
   block, keys and values written into the caches kc, vc (n_layers, n_heads, max_len, d)
   at ``pos``, the final LayerNorm into out (C,). The embeddings and the caches hold bf16
   numbers when bf16 is set, else fp32; everything else is fp32. Returns 0, or -1 when out
   of memory. */
int decode_token(const Block *blocks, int n_layers, int C, int H, const void *tok_emb,
                 const void *pos_emb, long token, int pos, const float *lnf_w,
                 const float *lnf_b, float lnf_eps, void *kc, void *vc, int max_len, int bf16,
                 float *out, int threads) {
    int d = C / H, n = pos + 1;
    /* x, xn, qkv, att, hid; then the attention scores of every head */
    size_t floats = (size_t)10 * C + (size_t)H * max_len;
    float *buf = (float *)aligned_alloc(64, (floats * 4 + 63) / 64 * 64);
    Act a = {NULL, NULL, NULL, NULL, {0}};
    if (!buf || alloc_act(&a, 4 * C, 1)) { free(buf); free_act(&a); return -1; }
    float *x = buf, *xn = x + C, *qkv = xn + C, *att = qkv + 3 * C, *hid = att + C,
          *scores = hid + 4 * C;
    for (int i = 0; i < C; i++)
        x[i] = row_at(tok_emb, (size_t)token * C + i, bf16)
               + row_at(pos_emb, (size_t)pos * C + i, bf16);
    #pragma omp parallel num_threads(threads)
    for (int l = 0; l < n_layers; l++) {
        const Block *bl = &blocks[l];
        #pragma omp single
        {
            layer_norm(x, bl->ln1_w, bl->ln1_b, bl->eps1, C, xn);
            prepare(&bl->qkv, xn, 1, &a);
        }
        product(&bl->qkv, &a, 1, qkv, STORE);
        #pragma omp for schedule(static)
        for (int h = 0; h < H; h++) {
            void *kr = cache_row(kc, bf16, l, H, h, max_len, pos, d);
            void *vr = cache_row(vc, bf16, l, H, h, max_len, pos, d);
            for (int i = 0; i < d; i++) {
                if (bf16) {
                    ((uint16_t *)kr)[i] = f32_to_bf16(qkv[C + h * d + i]);
                    ((uint16_t *)vr)[i] = f32_to_bf16(qkv[2 * C + h * d + i]);
                } else {
                    ((float *)kr)[i] = qkv[C + h * d + i];
                    ((float *)vr)[i] = qkv[2 * C + h * d + i];
                }
            }
            attend(qkv + h * d, cache_row(kc, bf16, l, H, h, max_len, 0, d),
                   cache_row(vc, bf16, l, H, h, max_len, 0, d), bf16, n, d,
                   scores + (size_t)h * max_len, att + h * d);
        }
        #pragma omp single
        prepare(&bl->proj, att, 1, &a);
        product(&bl->proj, &a, 1, x, ADD);
        #pragma omp single
        {
            layer_norm(x, bl->ln2_w, bl->ln2_b, bl->eps2, C, xn);
            prepare(&bl->fc, xn, 1, &a);
        }
        product(&bl->fc, &a, 1, hid, STORE);
        #pragma omp for schedule(static)
        for (int i = 0; i < 4 * C; i += 256) gelu_tanh(hid + i, 4 * C - i < 256 ? 4 * C - i : 256);
        #pragma omp single
        prepare(&bl->fc2, hid, 1, &a);
        product(&bl->fc2, &a, 1, x, ADD);
    }
    layer_norm(x, lnf_w, lnf_b, lnf_eps, C, out);
    free(buf);
    free_act(&a);
    return 0;
}

/* Greedy decoding's next token ----------------------------------------------------------- */

/* index of the largest of n logits (n >= 1), the first of equal ones, or of the first NaN,
   as torch.argmax; by plain comparisons, for a row that holds a NaN or an infinity */
static long argmax_plain(const void *row, int bf16, long n) {
    long at = 0;
    for (long i = 0; i < n; i++) {
        float v = row_at(row, i, bf16);
        if (v != v) return i;
        if (v > row_at(row, at, bf16)) at = i;
    }
    return at;
}

/* argmax_rows(x, bf16, rows, n, out): out[r] = the index of row r's largest logit, the first
   of equal ones, or of its first NaN (as torch.argmax), for x (rows, n) fp32 or bf16.
   torch.argmax went through GPT-2's 50257 logits at ~1.5 ns a logit (75 us a token, more
   than 1% of an int8 token). Here one vector pass keeps the largest of each piece of 256
   and which piece first reached the row's largest, then that piece alone is searched. */
void argmax_rows(const void *x, int bf16, long rows, long n, int64_t *out) {
    enum { PIECE = 256 };
    for (long r = 0; r < rows; r++) {
        const void *row = (const char *)x + (size_t)r * n * (bf16 ? 2 : 4);
        float best = -INFINITY;
        long piece = -1, full = n / VW * VW;
        vf odd = vf_zero();                 /* v - v: NaN wherever v is a NaN or infinite */
        for (long p0 = 0; p0 < full; p0 += PIECE) {
            long end = p0 + PIECE < full ? p0 + PIECE : full;
            vf top = vf_set(-INFINITY);
            for (long c = p0; c < end; c += VW) {
                vf v = vf_row_n(row, c, n, bf16);
                top = vf_max(top, v);
                odd = vf_add(odd, vf_sub(v, v));
            }
            float m = vf_hmax(top);
            if (m > best) best = m, piece = p0;
        }
        float tail_best = -INFINITY, check = vf_sum(odd);
        long tail_at = -1;
        for (long i = full; i < n; i++) {
            float v = row_at(row, i, bf16);
            check += v - v;
            if (v > tail_best) tail_best = v, tail_at = i;
        }
        if (check != check) {               /* a NaN or an infinity: compare one by one */
            out[r] = argmax_plain(row, bf16, n);
            continue;
        }
        long at = tail_at;                  /* an equal one in the pieces comes first */
        if (piece >= 0 && !(tail_at >= 0 && tail_best > best)) {
            at = piece;
            while (row_at(row, at, bf16) != best) at++;
        }
        out[r] = at;
    }
}
