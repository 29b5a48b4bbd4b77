/* The output head's cross-entropy while training on the CPU, a row of logits at a time
 * (engine/fused_loss.py).
 *
 * cross_entropy_rows(x, bf16, rows, vocab, targets, loss, scale, grad)
 *     x (rows, vocab): logits, bf16 where `bf16`, else fp32; targets (rows): int64 ids, a
 *     negative one marking a row that is not scored. For a scored row r with target t,
 *         loss[r] = log(sum_j exp(x[r, j])) - x[r, t]        (the row's max taken out first)
 *     and where `grad` the row becomes, in place, cross-entropy's derivative times `scale`,
 *         x[r, j] = (softmax(x[r])_j - [j == t]) * scale
 *     A row not scored: loss 0 and, where `grad`, zeros.
 *
 * PyTorch's element-wise ops take 8 passes over the (rows, vocab) matrix for this (widen to
 * fp32, max, subtract, exp, sum, divide, scale, round to bf16), each reading and writing all
 * of it: 200 MB a pass for 1024 rows of GPT-2's 50257 logits. Here each row is widened once
 * into a buffer of its thread's (200 KB: it stays in the core's cache) as its max is taken,
 * the exps and their sum are made there, and the gradient is written back once.
 * Returns 0, or -1 where a thread's row buffer could not be allocated.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "bf16.h"
#include "simd.h"

/* a scored row of n logits `x` (bf16 or fp32), target t, through the fp32 buffer `row`: its
   loss; where grad, x made (softmax - one-hot) * scale */
static float row_loss(float *row, void *x, long n, long t, float scale, int grad, int bf16) {
    float best = load_row_max(row, x, n, bf16), picked = row[t];
    vf total = vf_zero();
    for (long c = 0; c < n; c += VW) {
        vf e = vf_keep_n(vf_exp(vf_sub(vf_load_n(row + c, n - c), vf_set(best))), n - c);
        if (grad) vf_store_n(row + c, e, n - c);
        total = vf_add(total, e);
    }
    float sum = vf_sum(total);
    if (grad) {                                             /* softmax = e / sum */
        float factor = scale / sum;
        if (bf16) {
            uint16_t *out = x;
            for (long c = 0; c < n; c++) out[c] = f32_to_bf16(row[c] * factor);
            out[t] = f32_to_bf16(row[t] * factor - scale);
        } else {
            float *out = x;
            for (long c = 0; c < n; c++) out[c] = row[c] * factor;
            out[t] = row[t] * factor - scale;
        }
    }
    return best + logf(sum) - picked;
}

int cross_entropy_rows(void *x, int bf16, long rows, long vocab, const int64_t *targets,
                       float *loss, float scale, int grad) {
    int failed = 0;
    size_t width = bf16 ? 2 : 4;
    #pragma omp parallel
    {
        float *row = malloc((size_t)vocab * sizeof(float));
        if (!row) {
            #pragma omp atomic write
            failed = 1;
        }
        #pragma omp for schedule(static)
        for (long r = 0; r < rows; r++) {
            if (!row) continue;
            char *at = (char *)x + (size_t)r * vocab * width;
            if (targets[r] < 0) {
                loss[r] = 0.0f;
                if (grad) store_row(at, row, 0, vocab, bf16);          /* zeros */
                continue;
            }
            loss[r] = row_loss(row, at, vocab, (long)targets[r], scale, grad, bf16);
        }
        free(row);
    }
    return failed ? -1 : 0;
}
