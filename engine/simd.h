/* The vector operations decode_kernel.c, attention_kernel.c, loss_kernel.c and gelu_kernel.c
   are written in, for two kinds of x86-64 CPU and for 64-bit Arm:

   AVX-512 (F, BW, VL)   a vector holds VW = 16 floats
   AVX2 with FMA         VW = 8 (Zen 2 and 3, Intel's desktop and laptop CPUs since Haswell,
                         and every AVX-512 CPU too)
   NEON (AArch64)        VW = 8, as two of NEON's 4-float vectors (Arm servers: Graviton,
                         Ampere; Raspberry Pi 4 and 5)

   engine/native.py compiles the kernel with -march=native, so the widest the CPU has is
   chosen here; GPT2_KERNEL_ISA=avx2 compiles it with -mno-avx512f, as for an AVX2 CPU (the
   tests run both). Each operation is a line or two of intrinsics; the kernel's arithmetic
   reads the same for both widths. */

#ifndef GPT2_SIMD_H
#define GPT2_SIMD_H

#include <stdint.h>
#include <string.h>

#include "bf16.h"
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#elif defined(__ARM_NEON)
#include <arm_neon.h>
#endif

#ifdef __AVX2__
/* the sum of 8 floats (AVX2's vf_sum; also the int8 sums', which use AVX2 in every build) */
static inline float sum8(__m256 a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
#endif

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)

#define VW 16
#define SIMD_ISA "avx512"
typedef __m512 vf;

/* lanes 0..n-1 on (any n: n >= VW is every lane, n <= 0 none) */
static inline __mmask16 lanes(int n) {
    return n >= 16 ? (__mmask16)0xffff : n <= 0 ? 0 : (__mmask16)((1u << n) - 1u);
}
static inline vf vf_zero(void) { return _mm512_setzero_ps(); }
static inline vf vf_set(float a) { return _mm512_set1_ps(a); }
static inline vf vf_load(const float *p) { return _mm512_loadu_ps(p); }
/* p[0..n-1], zeros after, nothing read past p + n */
static inline vf vf_load_n(const float *p, int n) { return _mm512_maskz_loadu_ps(lanes(n), p); }
static inline void vf_store(float *p, vf v) { _mm512_storeu_ps(p, v); }
static inline void vf_store_n(float *p, vf v, int n) { _mm512_mask_storeu_ps(p, lanes(n), v); }
/* v with lanes n.. zeroed */
static inline vf vf_keep_n(vf v, int n) { return _mm512_maskz_mov_ps(lanes(n), v); }
static inline vf vf_add(vf a, vf b) { return _mm512_add_ps(a, b); }
static inline vf vf_sub(vf a, vf b) { return _mm512_sub_ps(a, b); }
static inline vf vf_mul(vf a, vf b) { return _mm512_mul_ps(a, b); }
static inline vf vf_div(vf a, vf b) { return _mm512_div_ps(a, b); }
static inline vf vf_max(vf a, vf b) { return _mm512_max_ps(a, b); }
static inline vf vf_min(vf a, vf b) { return _mm512_min_ps(a, b); }
static inline vf vf_abs(vf a) { return _mm512_abs_ps(a); }
static inline vf vf_fma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }     /* ab + c */
static inline vf vf_fnma(vf a, vf b, vf c) { return _mm512_fnmadd_ps(a, b, c); }   /* c - ab */
/* to the nearest integer, ties to even */
static inline vf vf_round(vf a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT); }
static inline float vf_sum(vf a) { return _mm512_reduce_add_ps(a); }
static inline float vf_hmax(vf a) { return _mm512_reduce_max_ps(a); }
/* p * 2^n for integral n: 0 or inf out of range */
static inline vf vf_scale2(vf p, vf n) { return _mm512_scalef_ps(p, n); }
/* VW bf16 numbers widened to fp32 (bf16 is the top half of an fp32 number); _n: the first n */
static inline vf vf_bf16(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(
        _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}
static inline vf vf_bf16_n(const uint16_t *p, int n) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(
        _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(lanes(n), p)), 16));
}
/* VW integral numbers in [-127, 127] stored as int8 */
static inline void vf_store_i8(int8_t *q, vf v) {
    _mm_storeu_si128((__m128i *)q, _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(v)));
}

#elif defined(__AVX2__) && defined(__FMA__)

#define VW 8
#define SIMD_ISA "avx2"
typedef __m256 vf;

/* lanes 0..n-1 as the mask AVX2's masked loads and stores take (a lane's top bit) */
static inline __m256i lanes(int n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
static inline vf vf_zero(void) { return _mm256_setzero_ps(); }
static inline vf vf_set(float a) { return _mm256_set1_ps(a); }
static inline vf vf_load(const float *p) { return _mm256_loadu_ps(p); }
/* _n with n >= 8 (a loop's whole vectors): the plain load and store; masked stores are slow
   on AMD's Zen (microcoded) */
static inline vf vf_load_n(const float *p, int n) {
    return n >= 8 ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, lanes(n));
}
static inline void vf_store(float *p, vf v) { _mm256_storeu_ps(p, v); }
static inline void vf_store_n(float *p, vf v, int n) {
    if (n >= 8) _mm256_storeu_ps(p, v);
    else _mm256_maskstore_ps(p, lanes(n), v);
}
static inline vf vf_keep_n(vf v, int n) { return _mm256_and_ps(v, _mm256_castsi256_ps(lanes(n))); }
static inline vf vf_add(vf a, vf b) { return _mm256_add_ps(a, b); }
static inline vf vf_sub(vf a, vf b) { return _mm256_sub_ps(a, b); }
static inline vf vf_mul(vf a, vf b) { return _mm256_mul_ps(a, b); }
static inline vf vf_div(vf a, vf b) { return _mm256_div_ps(a, b); }
static inline vf vf_max(vf a, vf b) { return _mm256_max_ps(a, b); }
static inline vf vf_min(vf a, vf b) { return _mm256_min_ps(a, b); }
static inline vf vf_abs(vf a) {
    return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), a);         /* the sign bit cleared */
}
static inline vf vf_fma(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
static inline vf vf_fnma(vf a, vf b, vf c) { return _mm256_fnmadd_ps(a, b, c); }
static inline vf vf_round(vf a) {
    return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}
static inline float vf_sum(vf a) { return sum8(a); }
static inline float vf_hmax(vf a) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}
/* 2^n built in the exponent bits: n kept to [-127, 128], where -127 gives 0 and 128 inf */
static inline vf vf_scale2(vf p, vf n) {
    n = vf_min(vf_max(n, vf_set(-127.0f)), vf_set(128.0f));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}
static inline vf vf_bf16(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(
        _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}
static inline vf vf_bf16_n(const uint16_t *p, int n) {
    uint16_t part[8] = {0};                         /* AVX2 has no 16-bit masked load */
    memcpy(part, p, (size_t)(n < 0 ? 0 : n > 8 ? 8 : n) * 2);
    return vf_bf16(part);
}
static inline void vf_store_i8(int8_t *q, vf v) {
    /* int32 -> int16 -> int8 within each 128-bit half: each half's 4 bytes at its start */
    __m256i b = _mm256_cvtps_epi32(v);
    b = _mm256_packs_epi16(_mm256_packs_epi32(b, b), _mm256_packs_epi32(b, b));
    int32_t lo = _mm_cvtsi128_si32(_mm256_castsi256_si128(b));
    int32_t hi = _mm_cvtsi128_si32(_mm256_extracti128_si256(b, 1));
    memcpy(q, &lo, 4);
    memcpy(q + 4, &hi, 4);
}

#elif defined(__ARM_NEON) && defined(__aarch64__)

/* 64-bit Arm: NEON's vectors hold 4 floats; a vf is two of them, so that the kernel's loops
   keep two independent chains of FMAs per accumulator, as with AVX2's 8 */
#define VW 8
#define SIMD_ISA "neon"
typedef struct { float32x4_t lo, hi; } vf;

static inline vf vf_make(float32x4_t lo, float32x4_t hi) { vf v = {lo, hi}; return v; }
static inline vf vf_zero(void) { return vf_make(vdupq_n_f32(0.0f), vdupq_n_f32(0.0f)); }
static inline vf vf_set(float a) { return vf_make(vdupq_n_f32(a), vdupq_n_f32(a)); }
static inline vf vf_load(const float *p) { return vf_make(vld1q_f32(p), vld1q_f32(p + 4)); }
static inline vf vf_load_n(const float *p, int n) {
    if (n >= 8) return vf_load(p);
    float part[8] = {0};                            /* NEON has no masked load */
    memcpy(part, p, (size_t)(n > 0 ? n : 0) * 4);
    return vf_load(part);
}
static inline void vf_store(float *p, vf v) { vst1q_f32(p, v.lo); vst1q_f32(p + 4, v.hi); }
static inline void vf_store_n(float *p, vf v, int n) {
    if (n >= 8) { vf_store(p, v); return; }
    float part[8];
    vf_store(part, v);
    memcpy(p, part, (size_t)(n > 0 ? n : 0) * 4);
}
static inline vf vf_keep_n(vf v, int n) {
    static const int32_t at[8] = {0, 1, 2, 3, 4, 5, 6, 7};
    int32x4_t nn = vdupq_n_s32(n);
    return vf_make(
        vreinterpretq_f32_u32(vandq_u32(vreinterpretq_u32_f32(v.lo), vcltq_s32(vld1q_s32(at), nn))),
        vreinterpretq_f32_u32(vandq_u32(vreinterpretq_u32_f32(v.hi), vcltq_s32(vld1q_s32(at + 4), nn))));
}
static inline vf vf_add(vf a, vf b) { return vf_make(vaddq_f32(a.lo, b.lo), vaddq_f32(a.hi, b.hi)); }
static inline vf vf_sub(vf a, vf b) { return vf_make(vsubq_f32(a.lo, b.lo), vsubq_f32(a.hi, b.hi)); }
static inline vf vf_mul(vf a, vf b) { return vf_make(vmulq_f32(a.lo, b.lo), vmulq_f32(a.hi, b.hi)); }
static inline vf vf_div(vf a, vf b) { return vf_make(vdivq_f32(a.lo, b.lo), vdivq_f32(a.hi, b.hi)); }
/* NEON's max and min give NaN where either operand is one */
static inline vf vf_max(vf a, vf b) { return vf_make(vmaxq_f32(a.lo, b.lo), vmaxq_f32(a.hi, b.hi)); }
static inline vf vf_min(vf a, vf b) { return vf_make(vminq_f32(a.lo, b.lo), vminq_f32(a.hi, b.hi)); }
static inline vf vf_abs(vf a) { return vf_make(vabsq_f32(a.lo), vabsq_f32(a.hi)); }
static inline vf vf_fma(vf a, vf b, vf c) {                                       /* ab + c */
    return vf_make(vfmaq_f32(c.lo, a.lo, b.lo), vfmaq_f32(c.hi, a.hi, b.hi));
}
static inline vf vf_fnma(vf a, vf b, vf c) {                                      /* c - ab */
    return vf_make(vfmsq_f32(c.lo, a.lo, b.lo), vfmsq_f32(c.hi, a.hi, b.hi));
}
static inline vf vf_round(vf a) { return vf_make(vrndnq_f32(a.lo), vrndnq_f32(a.hi)); }
static inline float vf_sum(vf a) { return vaddvq_f32(vaddq_f32(a.lo, a.hi)); }
static inline float vf_hmax(vf a) { return vmaxvq_f32(vmaxq_f32(a.lo, a.hi)); }
/* 2^n built in the exponent bits, as for AVX2 */
static inline vf vf_scale2(vf p, vf n) {
    n = vf_min(vf_max(n, vf_set(-127.0f)), vf_set(128.0f));
    int32x4_t bias = vdupq_n_s32(127);
    int32x4_t lo = vshlq_n_s32(vaddq_s32(vcvtnq_s32_f32(n.lo), bias), 23);
    int32x4_t hi = vshlq_n_s32(vaddq_s32(vcvtnq_s32_f32(n.hi), bias), 23);
    return vf_mul(p, vf_make(vreinterpretq_f32_s32(lo), vreinterpretq_f32_s32(hi)));
}
static inline vf vf_bf16(const uint16_t *p) {
    return vf_make(vreinterpretq_f32_u32(vshll_n_u16(vld1_u16(p), 16)),
                   vreinterpretq_f32_u32(vshll_n_u16(vld1_u16(p + 4), 16)));
}
static inline vf vf_bf16_n(const uint16_t *p, int n) {
    uint16_t part[8] = {0};
    memcpy(part, p, (size_t)(n < 0 ? 0 : n > 8 ? 8 : n) * 2);
    return vf_bf16(part);
}
static inline void vf_store_i8(int8_t *q, vf v) {
    int16x8_t h = vcombine_s16(vqmovn_s32(vcvtnq_s32_f32(v.lo)), vqmovn_s32(vcvtnq_s32_f32(v.hi)));
    vst1_s8(q, vqmovn_s16(h));
}

#else
#error "decode_kernel.c needs AVX-512 (F, BW, VL), AVX2 with FMA, or 64-bit Arm's NEON"
#endif

/* e^x for VW floats (about 1 ulp): 2^n e^r with n = round(x / ln 2), r = x - n ln 2 (ln 2 in
   two parts, so r is exact), e^r by its Taylor polynomial to r^7 (|r| <= ln 2 / 2); x kept
   to [-88, 88.7] first, so that r stays small where 2^n is out of range (x second: min and
   max return their second operand where one is NaN, so a NaN stays NaN) */
static inline vf vf_exp(vf x) {
    x = vf_min(vf_set(88.7f), vf_max(vf_set(-88.0f), x));
    vf n = vf_round(vf_mul(x, vf_set(1.44269504088896341f)));
    vf r = vf_fnma(n, vf_set(0.693359375f), x);
    r = vf_fnma(n, vf_set(-2.12194440e-4f), r);
    vf p = vf_set(1.0f / 5040);
    p = vf_fma(p, r, vf_set(1.0f / 720));
    p = vf_fma(p, r, vf_set(1.0f / 120));
    p = vf_fma(p, r, vf_set(1.0f / 24));
    p = vf_fma(p, r, vf_set(1.0f / 6));
    p = vf_fma(p, r, vf_set(0.5f));
    p = vf_fma(p, r, vf_set(1.0f));
    p = vf_fma(p, r, vf_set(1.0f));
    return vf_scale2(p, n);
}

/* Rows of numbers in fp32 buffers (attention_kernel.c, loss_kernel.c, gelu_kernel.c) */

/* number i of a bf16 or fp32 row, in fp32 */
static inline float row_at(const void *x, long i, int bf16) {
    return bf16 ? bf16_to_f32(((const uint16_t *)x)[i]) : ((const float *)x)[i];
}

/* the first n values (n >= 1) of a bf16 or fp32 row into out in fp32, and the largest of
   them, in one pass */
static inline float load_row_max(float *out, const void *x, long n, int bf16) {
    long c = 0;
    float best;
    if (n >= VW) {
        vf top = bf16 ? vf_bf16((const uint16_t *)x) : vf_load((const float *)x);
        vf_store(out, top);
        for (c = VW; c + VW <= n; c += VW) {
            vf v = bf16 ? vf_bf16((const uint16_t *)x + c) : vf_load((const float *)x + c);
            vf_store(out + c, v);
            top = vf_max(top, v);
        }
        best = vf_hmax(top);
    }
    for (long i = c; i < n; i++) out[i] = row_at(x, i, bf16);
    if (c == 0) best = out[0];
    for (; c < n; c++) best = out[c] > best ? out[c] : best;
    return best;
}

/* numbers c.. of a bf16 or fp32 row of n in fp32, VW of them (zeros from n on) */
static inline vf vf_row_n(const void *x, long c, long n, int bf16) {
    if (!bf16) return vf_load_n((const float *)x + c, n - c);
    const uint16_t *p = (const uint16_t *)x + c;
    return n - c >= VW ? vf_bf16(p) : vf_bf16_n(p, n - c);
}

/* the first n values of a bf16 or fp32 row, in fp32 */
static inline void load_row(float *out, const void *x, long n, int bf16) {
    if (bf16) {
        for (long c = 0; c < n; c++) out[c] = bf16_to_f32(((const uint16_t *)x)[c]);
    } else {
        for (long c = 0; c < n; c++) out[c] = ((const float *)x)[c];
    }
}

/* a row of n values stored, then zeros to `cols` */
static inline void store_row(void *y, const float *row, long n, long cols, int bf16) {
    if (bf16) {
        uint16_t *out = y;
        for (long c = 0; c < n; c++) out[c] = f32_to_bf16(row[c]);
        for (long c = n; c < cols; c++) out[c] = 0;
    } else {
        float *out = y;
        for (long c = 0; c < n; c++) out[c] = row[c];
        for (long c = n; c < cols; c++) out[c] = 0.0f;
    }
}

#endif
