"""The training loss without the whole logits tensor: the output head and cross-entropy in one.

GPTModel.loss computes, in plain PyTorch,

    loss = F.cross_entropy((h @ W.T).float(), targets)     h (N, C), W (vocab, C)

and asks ``head_cross_entropy`` first. That call gives the same number (up to the rounding
in which any two kernels differ) while holding far less memory. The plain computation keeps
the (N, vocab) logits, their log-softmax for the backward pass, and in backward two more
tensors of that size: at GPT-2's vocabulary of 50257 that is 49 MB a copy for one window of
256 tokens, 1.6 GB for a batch of 8 x 1024. Then the head's weight gradient arrives in
autograd as a view, so for a tied head (OpenAI's models) adding the embedding's gradient to
it makes a third (vocab, C) matrix (147 MB at 124M) instead of adding in place.

Here the rows go through the head a chunk at a time (at most CHUNK_ELEMENTS logits at once)
and, when a gradient will be asked for, each chunk's gradient is worked out right away,
while its logits exist, using the cross-entropy's closed-form derivative:

    d loss / d logits = (softmax(logits) - onehot(targets)) / N
    d loss / d h      = that @ W           d loss / d W = that.T @ h

Backward then only scales what forward kept (``grad_h`` (N, C), ``grad_W``). The matrix
products are the ones the plain backward would do, so a step costs no extra compute.
Fine-tuning the 124M model (context 256, batch 1), this took the peak memory of a step from
5.2-5.4x to 4.7x the fp32 weights (full), from 2.2x to 1.8x (LoRA) and from 1.8x to 1.5x
(LoRA with activation checkpointing); bench/finetune_memory.py, GPT2_FUSED_LOSS=0 vs 1.

Each chunk's softmax, loss and gradient take PyTorch 8 element-wise passes over its logits
(widen to fp32, max, subtract, exp, sum, divide, scale, round back), each through memory:
for 1024 rows of 50257 logits 200 MB a pass. On the CPU engine/loss_kernel.c does them in one
pass a row, the row held in the core's cache (``loss_rows``); the clock (engine/tuning.py)
takes it where it beats PyTorch's ops (``C_ROWS``: None, or True / False to force it). On a
Zen 4: 2.3-3.6x on the rows; the 124M head and loss, forward and backward at context 1024,
bf16 736 -> 674 ms (PyTorch's plain code 725 ms), fp32 1286 -> 1259 ms (plain 1465 ms).
In bf16 the head's weight gradient g.T @ h (vocab, C) can be made in blocks of SPLIT_ROWS
of its rows (``SPLIT``: the clock, or True / False; where oneDNN has bf16 products): oneDNN
multiplies a tall g.T (50257 rows) 1.2-1.3x faster in blocks on a Zen 4 (124M at context
1024: 257 -> 213 ms).

One switch: ``fused_loss.ENABLED = False`` (or ``GPT2_FUSED_LOSS=0`` before Python starts),
or ``with fused_loss.disabled():``; the tests compare both paths. Off under torch.compile
(which fuses the plain code itself) and for a weight that is a sharded DTensor.
"""

import os
import sys

import torch
import torch.nn as nn
from torch.autograd.function import once_differentiable

from engine import cpu_kernels, devices, native, tuning, turned_off

ENABLED = os.environ.get("GPT2_FUSED_LOSS", "1") != "0"   # the one switch
# the rows' softmax, loss and gradient by loss_kernel.c (True), PyTorch's ops (False), or
# where the kernel beats those here (None: the clock, engine/tuning.py)
C_ROWS = None
# the head's weight gradient g.T @ h (vocab, C) made in blocks of SPLIT_ROWS of its rows
# (True), in one product (False), or where the blocks are faster here (None: the clock).
# oneDNN's bf16 product of a tall g.T (vocab x rows) ran 1.2-1.3x faster in blocks on a Zen 4
SPLIT = None
SPLIT_ROWS = 8192
CHUNK_ELEMENTS = 2**23      # logits held at once: 32 MB in fp32 (166 rows of GPT-2's vocab),
                            # 8x that when the head's weight gets a gradient too
IGNORE_INDEX = -100         # targets with this id are not scored (as in F.cross_entropy)


def disabled():
    """Within this block GPTModel.loss runs the plain code: logits, then F.cross_entropy."""
    return turned_off(sys.modules[__name__])


def kernel():
    """loss_kernel.c loaded, or None where it cannot be built here."""
    return native.optional(native.loss_kernels)


def c_rows(dtype, device):
    """Whether the loss's rows of ``dtype`` logits go through loss_kernel.c here: on the CPU,
    fp32 or bf16, where it can be built and C_ROWS (or the clock) says so."""
    if (C_ROWS is False or device.type != "cpu" or kernel() is None
            or dtype not in (torch.float32, torch.bfloat16)):
        return False
    kind = "bf16" if dtype == torch.bfloat16 else "fp32"
    return tuning.switch(C_ROWS, f"training loss rows ({kind}, {ROWS_TIMED} x "
                         f"{tuning.HEAD_124M[0]} logits)", lambda: _candidates(dtype),
                         TORCH_ROWS, C_ROWS_LABEL)


TORCH_ROWS, C_ROWS_LABEL = "PyTorch's ops", "one C pass a row"
ROWS_TIMED = 256        # logits rows the clock times (50 MB in fp32 at GPT-2's vocabulary)


def _candidates(dtype):
    # the loss and gradient of ROWS_TIMED rows of GPT-2's vocabulary, each way. Both may
    # write their gradient into the logits, so a repeat works on the last one's gradient:
    # finite numbers too, and the passes' speed does not depend on which numbers they are
    g = torch.Generator().manual_seed(0)
    logits = tuning.filled((ROWS_TIMED, tuning.HEAD_124M[0]), dtype, g) * 40
    targets = torch.randint(0, tuning.HEAD_124M[0], (ROWS_TIMED,), generator=g)
    ok = torch.ones(ROWS_TIMED, dtype=torch.bool)
    return {TORCH_ROWS: lambda: _rows_in_torch(logits, targets, ok, ROWS_TIMED, True),
            C_ROWS_LABEL: lambda: _rows_in_c(logits, targets, ok, ROWS_TIMED, True)}


def head_cross_entropy(h, weight, targets):
    """Mean cross-entropy of the logits ``h @ weight.T`` against ``targets``, or None.

    h (..., C), weight (vocab, C), targets (...) token ids. None where this path does not
    apply (switched off, compiling, a DTensor weight): then the caller runs the plain code.
    """
    if not ENABLED or torch.compiler.is_compiling() or type(weight) not in (
            torch.Tensor, nn.Parameter) or not weight.is_floating_point():   # int8: its layer
        return None
    h2, t = h.reshape(-1, h.shape[-1]), targets.reshape(-1)
    if h2.shape[0] != t.shape[0]:
        raise ValueError(f"targets {tuple(targets.shape)} do not match the hidden states "
                         f"{tuple(h.shape)}: one target id per position")
    vocab = weight.shape[0]
    bad = t[(t != IGNORE_INDEX) & ((t < 0) | (t >= vocab))]
    if bad.numel():
        raise IndexError(f"target id {int(bad[0])} is out of range: the vocabulary has "
                         f"{vocab} ids (0..{vocab - 1}), and {IGNORE_INDEX} marks a position "
                         f"that is not scored")
    if torch.is_grad_enabled() and (h2.requires_grad or weight.requires_grad):
        return _HeadCrossEntropy.apply(h2, weight, t)
    return _chunked(h2, weight, t, False, False)[0]     # evaluation: no gradients to keep


def _compute_dtype(x):
    """The dtype the head multiplies in: autocast's where it is on, else the input's."""
    kind = x.device.type
    if torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return x.dtype


def _onednn(a, b):
    """True where cpu_kernels takes oneDNN for a @ b here (fp32, x86, where it is faster)."""
    return cpu_kernels.onednn_fp32_applies(a, b) and cpu_kernels.onednn_fp32()


def _mm(a, b):
    if _onednn(a, b):
        return cpu_kernels.onednn_mm(a, b)
    return cpu_kernels.matmul_in_fp32(a, b) if cpu_kernels.bf16_in_fp32(a, b) else a @ b


def _chunked(h, weight, targets, want_h, want_w):
    """(mean loss, d loss / d h or None, d loss / d weight or None), a chunk of rows at a time."""
    N, V = h.shape[0], weight.shape[0]
    dtype = _compute_dtype(h)
    scored = targets != IGNORE_INDEX                                            # (N,)
    count = max(int(scored.sum()), 1)
    total = torch.zeros((), dtype=torch.float32, device=h.device)
    grad_h = torch.empty_like(h) if want_h else None                            # (N, C)
    grad_w = None
    with torch.autocast(h.device.type, enabled=False):   # the dtypes are chosen here instead
        w = weight.to(dtype)                                                    # (V, C)
        # with the weight's gradient each chunk adds into all of it (V, C): fewer, larger
        rows = max(1, CHUNK_ELEMENTS // V * (8 if want_w else 1))
        for r0 in range(0, N, rows):
            hc = h[r0:r0 + rows].to(dtype)                                      # (R, C)
            logits = _mm(hc, w.t())                                             # (R, V)
            loss, g = loss_rows(logits, targets[r0:r0 + rows], scored[r0:r0 + rows],
                                count, want_h or want_w)
            total += loss
            if g is None:
                continue
            if want_h:
                grad_h[r0:r0 + rows] = _mm(g, w)                                # (R, C)
            if want_w:
                grad_w = _weight_grad(grad_w, g, hc, weight.dtype)              # (V, C)
    if not scored.any():        # nothing to score: NaN, as F.cross_entropy gives
        total = total * float("nan")
    return total / count, grad_h, grad_w


def _weight_grad(grad_w, g, hc, dtype, split=None):
    """grad_w + g.T @ hc (V, C) in ``dtype``; grad_w None: the product alone. ``split``: in
    blocks of SPLIT_ROWS rows (True) or not (False); None: as split_products says."""
    if grad_w is not None and g.dtype == grad_w.dtype and not _onednn(g, hc):
        return grad_w.addmm_(g.t(), hc)            # adds in the product: no (V, C) temporary
    if not (split_products(g) if split is None else split):
        part = _mm(g.t(), hc)                                                   # (V, C)
        return part.to(dtype) if grad_w is None else grad_w.add_(part)
    V = g.shape[1]
    out = torch.empty(V, hc.shape[1], dtype=dtype, device=g.device) if grad_w is None else grad_w
    for v0 in range(0, V, SPLIT_ROWS):
        part = _mm(g[:, v0:v0 + SPLIT_ROWS].t(), hc)                            # (S, C)
        if grad_w is None:
            out[v0:v0 + SPLIT_ROWS] = part
        else:
            out[v0:v0 + SPLIT_ROWS] += part
    return out


def split_products(g):
    """Whether the head's weight gradient from ``g`` (R, V) is made in blocks of SPLIT_ROWS
    of its rows here: bf16 on a CPU with oneDNN's bf16 products, where SPLIT (or the clock)
    says so. (Where bf16 is multiplied in fp32, cpu_kernels.matmul_in_fp32, blocks did not
    help: 0.97-1.02x seen as AVX2 on the Zen 4.)"""
    if (SPLIT is False or g.device.type != "cpu" or g.dtype != torch.bfloat16
            or not devices.onednn_bf16()):
        return False
    return tuning.switch(SPLIT, f"training head's weight gradient (bf16, {ROWS_TIMED} x "
                         f"{tuning.HEAD_124M[0]} x {tuning.HEAD_124M[1]})", _split_candidates,
                         WHOLE_LABEL, SPLIT_LABEL)


WHOLE_LABEL, SPLIT_LABEL = "one product", f"blocks of {SPLIT_ROWS} rows"


def _split_candidates():
    # g.T @ h for ROWS_TIMED rows of GPT-2's head, into a new fp32 gradient, each way
    gen = torch.Generator().manual_seed(0)
    g = tuning.filled((ROWS_TIMED, tuning.HEAD_124M[0]), torch.bfloat16, gen)
    h = tuning.filled((ROWS_TIMED, tuning.HEAD_124M[1]), torch.bfloat16, gen)
    return {WHOLE_LABEL: lambda: _weight_grad(None, g, h, torch.float32, split=False),
            SPLIT_LABEL: lambda: _weight_grad(None, g, h, torch.float32, split=True)}


def loss_rows(logits, targets, ok, count, grad):
    """(the summed cross-entropy of the rows of ``logits`` (R, V) that are ``ok``, d loss / d
    logits (R, V) in the logits' dtype or None) for a loss that is a mean over ``count`` rows;
    ``grad``: whether to work out the gradient. Overwrites ``logits``. By loss_kernel.c's
    one pass a row where C_ROWS (or the clock) says so, else by PyTorch's element-wise ops."""
    if c_rows(logits.dtype, logits.device):
        return _rows_in_c(logits, targets, ok, count, grad)
    return _rows_in_torch(logits, targets, ok, count, grad)


def _rows_in_torch(logits, targets, ok, count, grad):
    tc = torch.where(ok, targets, 0)[:, None]                                   # (R, 1)
    x = logits.float()                                                          # (R, V)
    picked = x.gather(1, tc).squeeze(1)                                         # (R,)
    # log-sum-exp with the row's max taken out (no overflow), in place: the buffer then
    # holds exp(logits - max), and after the division the softmax
    top = x.amax(dim=1, keepdim=True)                                           # (R, 1)
    sums = x.sub_(top).exp_().sum(dim=1, keepdim=True)                          # (R, 1)
    lse = (top + sums.log()).squeeze(1)                                         # (R,)
    loss = ((lse - picked) * ok).sum()
    if not grad:
        return loss, None
    # d loss / d logits = (softmax - one-hot target) / count
    probs = x.div_(sums)                                                        # (R, V)
    probs.scatter_add_(1, tc, -ok[:, None].float())
    return loss, probs.mul_(ok[:, None] / count).to(logits.dtype)


def _rows_in_c(logits, targets, ok, count, grad):
    logits = logits.contiguous()                                     # (R, V) fp32 or bf16
    rows, vocab = logits.shape
    ids = torch.where(ok, targets, -1).to(torch.int64).contiguous()             # (R,)
    losses = torch.empty(rows, dtype=torch.float32)                             # (R,)
    if kernel().cross_entropy_rows(logits.data_ptr(), int(logits.dtype == torch.bfloat16),
                                   rows, vocab, ids.data_ptr(), losses.data_ptr(),
                                   1.0 / count, int(grad)):
        raise MemoryError("fused_loss: out of memory for the loss's row buffers")
    return losses.sum(), logits if grad else None


class _HeadCrossEntropy(torch.autograd.Function):
    """The loss in forward, with its gradients; backward scales them by the upstream one."""

    @staticmethod
    def forward(ctx, h, weight, targets):                 # h (N, C), weight (V, C), targets (N,)
        loss, grad_h, grad_w = _chunked(h, weight, targets, h.requires_grad,
                                        weight.requires_grad)
        ctx.grads = (grad_h, grad_w)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        if ctx.grads is None:
            raise RuntimeError("fused_loss: backward ran twice through the same loss; "
                               "compute the loss again (retain_graph is not supported here)")
        grad_h, grad_w = ctx.grads
        ctx.grads = None        # autograd then holds the only reference: .grad adds in place
        if grad_loss.device.type == "cpu" and grad_loss.item() == 1.0:
            # loss.backward() of one micro-batch: times 1 changes no number, so no pass over
            # the head's (V, C) gradient (6 ms at 124M on a Zen 4). A GPU tensor is not read
            # (.item() would wait for it) and is multiplied as always.
            return grad_h, grad_w, None
        if grad_h is not None:
            grad_h.mul_(grad_loss.to(grad_h.dtype))
        if grad_w is not None:
            grad_w.mul_(grad_loss.to(grad_w.dtype))
        return grad_h, grad_w, None
