"""Causal self-attention while training on the CPU, in blocks of queries, with its softmax and
dropout in one C pass.

model.py's attention is one call, ``F.scaled_dot_product_attention(q, k, v, is_causal=True,
dropout_p=p)``. With p = 0 PyTorch runs it through its fused CPU kernel (flash attention).
With dropout, which GPT-2 trains with (``drop_rate`` 0.1), PyTorch's CPU has no fused kernel:
it falls back to the plain math, which builds every (T, T) score matrix whole, draws the
dropout mask with its CPU generator one element at a time (7-8 ns each: 12.6 million
elements a layer at 12 heads x 1024 tokens) and keeps the mask for the backward pass. At
GPT-2 124M's shape (context 1024) that made attention 370 ms a layer, 6x the fused kernel,
and a bf16 training step 2.4x slower with dropout than without (bench/README.md).

Here the same computation,

    y = dropout(softmax(q k^T / sqrt(head_dim) + causal mask)) v

runs a block of BLOCK query rows at a time: a block needs only the keys up to its last row
(the others are masked), so about half of the score matrix is computed, as the fused kernel
does. Its two products are PyTorch's (bf16 under bf16 autocast); between them
engine/attention_kernel.c takes each row's softmax over the keys it may see, in fp32 (the
1 / sqrt(head_dim) applied as it reads q k^T, not in a pass over q), and the dropout in one
pass. Whether an element is dropped is a hash of (a seed, its row, its column): the mask
costs a few vector instructions an element instead of a draw, and the backward pass computes
it again instead of keeping it. The seed is drawn from PyTorch's generator once per call, so
a seeded run (and a resumed one, which restores the generator) gets the same masks again.
For the backward pass it keeps what flash attention keeps: q, k, v, the output and each
row's log-sum-exp, O(T) numbers a head, not the (T, T) scores or weights. The backward pass
goes a block of BLOCK keys at a time, against the queries that see them (flash attention
2's order): a block's scores computed again (one product more, of the five it takes), from
them, the lse and the seed its weights and their gradient in one C pass a row, with each
row's sum of p * dp over all its keys taken beforehand as dO . O. Then k's and v's gradients
come whole out of one product each; only q's gathers over the blocks (in fp32). Against
blocks of queries, which left k's and v's to gather: a layer's forward and backward
1.01-1.06x in bf16 (with dropout 1.04-1.05x), 1.05-1.07x in fp32 (Zen 4, 124M's shape), for
one more (T, head_dim) a head kept, the output (T x C a layer: 19 MB at 124M in bf16).

Where it can run: on the CPU, for training (gradients on) or dropout, without an explicit
mask or a cache, in fp32 or bf16. Whether it does is the clock's (engine/tuning.py), once per
dtype, shape, and with or without dropout, one layer's forward and backward timed alone. On a
Zen 4, at 124M's shape (one layer, forward and backward, PyTorch's / this): with dropout
bf16 261 / 47 ms, fp32 282 / 68 ms; without, bf16 49 / 33 ms (taken: whole steps 3-5%
faster), fp32 61 / 64 ms (PyTorch's stays); seen as an AVX2 CPU (no bf16 matmul kernel) it
won in bf16 without dropout too (288 / 81 ms).
The model's other dropouts (``Dropout``, below) draw their masks by the same hash.

Switches: ``attention.ENABLED = False`` (or ``GPT2_FAST_ATTENTION=0`` before Python
starts), or ``with attention.disabled():``, turn it off; ``BLOCKED`` True takes it wherever
it can run (as ``GPT2_FAST_ATTENTION=1`` does; False: never; None: the clock). The tests
compare it with the plain math under the same mask. Off under torch.compile, and where the
kernel cannot be built.
"""

import contextlib
import math
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from engine import cpu_kernels, native, tuning, turned_off

ENABLED = os.environ.get("GPT2_FAST_ATTENTION", "1") != "0"   # the switch
# None: where it beats PyTorch's attention, timed where it runs
BLOCKED = True if os.environ.get("GPT2_FAST_ATTENTION") == "1" else None
BLOCK = 256         # query rows a block
PLAIN, OURS = "PyTorch's attention", "blocks, C softmax"


def disabled():
    """Within this block model.py's attention runs the plain PyTorch call."""
    return turned_off(sys.modules[__name__])


def kernel():
    """attention_kernel.c loaded, or None where it cannot be built here."""
    return native.optional(native.attention_kernels)


def draw_seed():
    """The seed of one call's dropout mask: one draw from PyTorch's generator, so that
    seeded runs repeat their masks."""
    return int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64))


def causal(q, k, v, p, mask=None):
    """softmax(q k^T / sqrt(head_dim), causal) v with dropout ``p`` on the attention weights,
    (B, H, T, D) like q, where this path runs (see the module); else None: then the caller
    runs F.scaled_dot_product_attention."""
    if (not ENABLED or BLOCKED is False or mask is not None or q.device.type != "cpu"
            or not (p > 0 or torch.is_grad_enabled() and q.requires_grad) or p >= 1
            or q.shape != k.shape or q.shape != v.shape or q.shape[-2] < 2
            or torch.compiler.is_compiling()):
        return None
    dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else q.dtype
    if (dtype not in (torch.float32, torch.bfloat16) or q.dtype != v.dtype
            or kernel() is None or not blocked_wins(q.shape, dtype, p)):
        return None
    return blocked(q, k, v, p)


def blocked_wins(shape, dtype, p):
    """Whether blocked() beats PyTorch's attention here for q (B, H, T, D) ``shape`` in
    ``dtype`` with (p > 0) or without dropout: BLOCKED where set, else the clock's pick."""
    B, H, T, D = shape
    kind = "bf16" if dtype == torch.bfloat16 else "fp32"
    name = (f"training attention ({kind}, {'dropout' if p > 0 else 'no dropout'}, "
            f"{H} heads x {T} x {D}, batch {B})")
    return tuning.switch(BLOCKED, name, lambda: _candidates(shape, dtype, p), PLAIN, OURS)


@contextlib.contextmanager
def _candidates(shape, dtype, p):
    """{label: one forward and backward pass} of both ways on random q, k, v (tuning.py,
    which times under inference_mode: gradients are turned back on here), with PyTorch's
    generator put back afterwards: measuring draws no masks from a run's."""
    with torch.inference_mode(False), torch.random.fork_rng(devices=[]):
        q, k, v = (tuning.filled(shape, dtype).requires_grad_() for _ in range(3))
        grad = tuning.filled(shape, dtype)

        def plain():
            with torch.inference_mode(False), torch.enable_grad():
                F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                               dropout_p=p).backward(grad)

        def ours():
            with torch.inference_mode(False), torch.enable_grad():
                blocked(q, k, v, p).backward(grad)
        yield {PLAIN: plain, OURS: ours}


def blocked(q, k, v, p):
    """causal()'s computation, taken: q, k, v (B, H, T, D) fp32 or bf16 (or under autocast:
    its dtype), dropout ``p``."""
    seed = draw_seed() if p > 0 else 0
    if torch.is_autocast_enabled("cpu"):             # the products' dtype, as autocast's
        dtype = torch.get_autocast_dtype("cpu")
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    with torch.autocast("cpu", enabled=False):
        return BlockedAttention.apply(q, k, v, p, seed)


def _products(x):
    """The block products' matmul for tensors like ``x``: PyTorch's, or where the CPU has no
    bf16 matmul kernel, in fp32 (cpu_kernels)."""
    return cpu_kernels.matmul_in_fp32 if cpu_kernels.bf16_in_fp32(x, x) else torch.matmul


def _dense(x):
    """x, a block's rows of q, k, v or their gradient (B, H, rows, D), ready for the products.
    PyTorch's CPU matmul in bf16 (oneDNN) takes a batch of matrices only when dense (or the
    transpose of a dense one) and otherwise copies it first, for a slice of keys taken as k^T
    by gathering the transpose; copying the rows here instead made a layer's attention 6-8%
    faster in bf16 (Zen 4, 124M's shape). fp32 products (MKL) take any strides: no copy."""
    return x if x.dtype == torch.float32 else x.contiguous()


def _blocks(T):
    """(start, end) of each block of queries: queries start..end see keys 0..end."""
    return [(start, min(start + BLOCK, T)) for start in range(0, T, BLOCK)]


class BlockedAttention(torch.autograd.Function):
    """Attention a block of queries at a time, keeping for backward what flash attention
    keeps: q, k, v, the output and each row's log-sum-exp (O(T) numbers a head). The
    backward pass goes a block of keys at a time, computing each block's scores again (one
    more product) and, from them and the lse, the probabilities and their dropout
    (attention_kernel.c)."""

    @staticmethod
    def forward(ctx, q, k, v, p, seed):              # q, k, v (B, H, T, D), one dtype
        B, H, T, D = q.shape
        matmul, scale = _products(q), 1.0 / math.sqrt(D)
        lse = torch.empty(B, H, T, dtype=torch.float32)
        out = []
        for start, end in _blocks(T):
            qb, kb = _dense(q[:, :, start:end]), _dense(k[:, :, :end])
            scores = matmul(qb, kb.transpose(-2, -1))       # q k^T, unscaled (B, H, R, end)
            # scaled by 1 / sqrt(D), softmax over each row's keys 0..its own position, then
            # dropout: one C pass (the scaling done as the scores are read, no pass of its own)
            weights, lse[:, :, start:end] = _softmax_dropout(scores, p, seed, start, T, scale)
            out.append(matmul(weights, _dense(v[:, :, :end])))          # (B, H, R, D)
        out = torch.cat(out, dim=2)                                     # (B, H, T, D)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (p, seed)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):                                        # grad (B, H, T, D)
        q, k, v, out, lse = ctx.saved_tensors
        p, seed = ctx.args
        B, H, T, D = q.shape
        matmul, scale = _products(q), 1.0 / math.sqrt(D)
        grad = grad.to(q.dtype).contiguous()
        # each query's sum of p * dp over all its keys, which the softmax's gradient needs:
        # dO . O (as flash attention takes it), since a block of keys holds part of a row
        dots = torch.empty(B, H, T, dtype=torch.float32)                # (B, H, T)
        kernel().row_dots(grad.data_ptr(), out.data_ptr(), dots.data_ptr(),
                          int(grad.dtype == torch.bfloat16), B * H * T, D)
        dq = None                   # q's gradient gathers over the blocks of keys, in fp32
        dk, dv = (torch.empty(B, H, T, D, dtype=x.dtype) for x in (k, v))
        for start, end in _blocks(T):
            # keys start..end, seen by queries start..T-1: their k and v gradients complete
            qs, gs = _dense(q[:, :, start:]), _dense(grad[:, :, start:])    # (B, H, Q, D)
            kb, vb = _dense(k[:, :, start:end]), _dense(v[:, :, start:end])  # (B, H, R, D)
            scores = matmul(qs, kb.transpose(-2, -1))                   # (B, H, Q, R)
            dweights = matmul(gs, vb.transpose(-2, -1))                 # (B, H, Q, R)
            # dscores: the gradient of the unscaled q k^T (the 1 / sqrt(D) is in it)
            dscores, weights = _softmax_dropout_backward(dweights, scores, lse, dots, p, seed,
                                                         start, T, scale)
            dv[:, :, start:end] = matmul(weights.transpose(-2, -1), gs)  # (B, H, R, D)
            dk[:, :, start:end] = matmul(dscores.transpose(-2, -1), qs)  # (B, H, R, D)
            part = matmul(dscores, kb)                                  # (B, H, Q, D)
            if dq is None:                                              # start 0: every row
                dq = part.float()
            else:
                dq[:, :, start:] += part
        return dq.to(q.dtype), dk, dv, None, None


def _mask(p, seed):
    """attention_kernel.c's last three arguments: the seed, the threshold of the hash under
    which an element is dropped (p * 2^32), the kept elements' factor 1 / (1 - p)."""
    return seed, min(round(p * 2**32), 2**32 - 1), 1.0 / (1.0 - p)


def _geometry(x, p, seed, row0, col0, mat_rows, scale):
    """attention_kernel.c's arguments after the tensors, for blocks ``x`` (..., rows, cols)
    of q k^T (queries row0.., keys col0..), which the kernel multiplies by ``scale``."""
    rows, cols = x.shape[-2:]
    return (int(x.dtype == torch.bfloat16), x.numel() // (rows * cols), rows, cols, row0,
            col0, mat_rows, scale, *_mask(p, seed))


def _softmax_dropout(scores, p, seed, row0, mat_rows, scale):
    """(the weights p * keep / (1 - p), each row's lse (..., rows) fp32) of a block of q k^T
    (..., rows, cols) times ``scale``, whose first row is query ``row0`` of ``mat_rows``
    against keys 0..cols-1."""
    scores = scores.contiguous()
    lse = torch.empty(scores.shape[:-1], dtype=torch.float32)
    out = torch.empty_like(scores)
    if kernel().softmax_dropout(scores.data_ptr(), lse.data_ptr(), out.data_ptr(),
                                *_geometry(scores, p, seed, row0, 0, mat_rows, scale)):
        raise MemoryError("attention: out of memory for the softmax's row buffers")
    return out, lse


def _softmax_dropout_backward(grad, scores, lse, dots, p, seed, start, mat_rows, scale):
    """(the gradient of q k^T, the weights again) of the block of keys from ``start`` against
    queries start.. (grad, scores (..., queries, keys)), from the weights' gradient ``grad``,
    q k^T, and the (..., mat_rows) ``lse`` and ``dots`` (sums of p * dp) of every query."""
    grad, scores = grad.to(scores.dtype).contiguous(), scores.contiguous()
    lse, dots = lse[..., start:].contiguous(), dots[..., start:].contiguous()
    dscores, weights = torch.empty_like(scores), torch.empty_like(scores)
    if kernel().softmax_dropout_backward(grad.data_ptr(), scores.data_ptr(), lse.data_ptr(),
                                         dots.data_ptr(), dscores.data_ptr(),
                                         weights.data_ptr(),
                                         *_geometry(scores, p, seed, start, start, mat_rows,
                                                    scale)):
        raise MemoryError("attention: out of memory for the softmax's row buffers")
    return dscores, weights


class Dropout(nn.Dropout):
    """nn.Dropout (the same module: its ``p``, no weights) whose mask, while training on the
    CPU, is attention_kernel.c's hash of (a seed, the row, the column) instead of a draw per
    element from PyTorch's generator (7-8 ns each: at 124M's shape the model's 25 other
    dropouts took ~130 ms of a training step); its backward pass draws the mask again.
    model.py's embedding and residual dropouts; the switches are this module's."""

    def forward(self, x):
        if (not self.training or not 0 < self.p < 1 or not ENABLED or BLOCKED is False
                or x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16)
                or x.dim() == 0 or x.numel() == 0 or torch.compiler.is_compiling()
                or kernel() is None):
            return super().forward(x)
        return _HashDropout.apply(x, self.p, draw_seed())


def _dropout_rows(x, p, seed):
    """x (..., cols) times its mask, rows numbered in x's order (dropout_rows)."""
    x = x.contiguous()
    y = torch.empty_like(x)
    cols = x.shape[-1]
    kernel().dropout_rows(x.data_ptr(), y.data_ptr(), int(x.dtype == torch.bfloat16),
                          x.numel() // cols, cols, *_mask(p, seed))
    return y


class _HashDropout(torch.autograd.Function):
    """x * keep / (1 - p), keep a hash of (seed, row, column): its own gradient."""

    @staticmethod
    def forward(ctx, x, p, seed):
        ctx.args = (p, seed)
        return _dropout_rows(x, p, seed)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        return _dropout_rows(grad, *ctx.args), None, None
