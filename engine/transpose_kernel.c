/* A transposed copy of an fp32 matrix (engine/cpu_kernels.py), for oneDNN's fp32 products.
 *
 * transpose_f32(x, y, rows, cols)     y (cols, rows) = x (rows, cols) transposed
 *
 * A weight's gradient is x^T @ grad; oneDNN's linear op takes its input in rows, so x^T is
 * copied first. PyTorch's strided copy did that at ~2 GB/s on a Zen 4 (each element read
 * from another row, one at a time). Here the matrix goes in tiles of TILE x TILE, which a
 * thread reads and writes while they stay in its core's cache, and within a tile, on x86,
 * 8 x 8 blocks are transposed in eight vector registers (unpack and shuffle); the rest of a
 * tile, and every tile on Arm, element by element.
 */
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#define TILE 64

#ifdef __AVX__
/* the 8 x 8 block at x (rows ldx apart) into y (rows ldy apart), transposed */
static inline void block8(const float *x, long ldx, float *y, long ldy) {
    __m256 r[8], t[8], s[8];
    for (int i = 0; i < 8; i++) r[i] = _mm256_loadu_ps(x + i * ldx);
    for (int i = 0; i < 8; i += 2) {             /* pairs of rows interleaved */
        t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int i = 0; i < 8; i += 4) {             /* then fours: columns within each half */
        s[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
        s[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
        s[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
        s[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
    }
    for (int i = 0; i < 4; i++) {                /* the halves of rows 0-3 and 4-7 joined */
        _mm256_storeu_ps(y + i * ldy, _mm256_permute2f128_ps(s[i], s[i + 4], 0x20));
        _mm256_storeu_ps(y + (i + 4) * ldy, _mm256_permute2f128_ps(s[i], s[i + 4], 0x31));
    }
}
#endif

void transpose_f32(const float *x, float *y, long rows, long cols) {
    long row_tiles = (rows + TILE - 1) / TILE, col_tiles = (cols + TILE - 1) / TILE;
    #pragma omp parallel for schedule(static) collapse(2)
    for (long rt = 0; rt < row_tiles; rt++) {
        for (long ct = 0; ct < col_tiles; ct++) {
            long r0 = rt * TILE, c0 = ct * TILE;
            long r1 = r0 + TILE < rows ? r0 + TILE : rows;
            long c1 = c0 + TILE < cols ? c0 + TILE : cols;
            long r8 = r0, c8 = c0;                /* how far the 8 x 8 blocks reach */
#ifdef __AVX__
            r8 = r0 + (r1 - r0) / 8 * 8;
            c8 = c0 + (c1 - c0) / 8 * 8;
            for (long r = r0; r < r8; r += 8)
                for (long c = c0; c < c8; c += 8)
                    block8(x + r * cols + c, cols, y + c * rows + r, rows);
#endif
            for (long c = c0; c < c1; c++)        /* what the blocks left: element by element */
                for (long r = (c < c8 ? r8 : r0); r < r1; r++)
                    y[c * rows + r] = x[r * cols + c];
        }
    }
}
