/* bfloat16 <-> fp32 for the engine's C kernels (int8_kernel.c, decode_kernel.c,
   attention_kernel.c, loss_kernel.c, gelu_kernel.c).

   bf16 is the top half of an fp32 number: widening is a shift; narrowing rounds to nearest,
   ties to even, as torch does, and keeps a NaN a NaN. engine/native.py rebuilds a kernel
   when this file changes too. */

#ifndef GPT2_BF16_H
#define GPT2_BF16_H

#include <stdint.h>
#include <string.h>

static inline float bf16_to_f32(uint16_t v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);   /* NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

#endif
