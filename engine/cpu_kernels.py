"""The CPU fast paths behind model.py: the same arithmetic, computed faster on the CPU.

model.py computes GPT-2 in plain PyTorch and asks this module at three places whether a
faster kernel applies; each seam returns None where none does, and the plain code runs:

    Linear.forward      -> linear(x, layer)        oneDNN fp32 product (training, evaluation),
                                                   or a packed weight copy (decoding), or
                                                   bf16 multiplied in fp32 (matmul_in_fp32)
                                                   where PyTorch has no bf16 kernel here
    GPTModel.logits     -> head_logits(h, weight)  the output head: oneDNN, or rows aligned to
                                                   64, or bf16 in fp32 as above
    GPTModel.train      -> forget_packed(params)   packed copies are dropped for training

generate.py decodes inside ``packed_for_cpu(model, batch_size, greedy)`` (through
engine/decoder.py's ``decoding``): weight copies for decoding (oneDNN-packed, or for one-row
fp32 and bf16 steps ``OneRow`` copies that our own kernels, decode_kernel.c, stream:
``copy_kind`` says which), and a greedy head that reads half the bytes (``screened_argmax``);
its greedy_tokens takes the argmax over the logits through ``greedy_ids`` (one vector pass in
decode_kernel.c).
train_utils calls ``tune_malloc``. None of them changes what is computed, only how fast (up
to the last-bit rounding in which any two matmul kernels differ); the tests compare each with
the plain path.
An int8 model (engine/int8.py) brings its own layers and kernels: head_logits and
packed_for_cpu stand aside for its int8 matrices.

One switch turns all of them off: ``cpu_kernels.ENABLED = False`` (or the environment
variable ``GPT2_CPU_KERNELS=0`` before Python starts). The flags below it say which path is
on: None (the default), chosen by the clock on the machine where it runs, the first time it
is needed (engine/tuning.py: each timed against the code it replaces, the answer kept per
CPU); True, on wherever it can run; False, off. bench/choice_speed.py shows each choice.
"""

import contextlib
import ctypes
import os
import platform
import sys
import weakref

import torch
import torch.nn as nn
from torch.autograd.function import once_differentiable
from torch.utils.weak import WeakIdKeyDictionary

from engine import devices, native, pages, tuning, turned_off

ENABLED = os.environ.get("GPT2_CPU_KERNELS", "1") != "0"   # the one switch


# Each path can lose somewhere, so the clock decides (None; engine/tuning.py). PyTorch's
# fp32 matmuls are Intel's MKL, which runs its best code on Intel CPUs only: on an AMD EPYC
# (Zen 5) it ran at 184-214 GFLOP/s, oneDNN at 315-488; on a 2-core Intel Xeon (AVX-512,
# AMX) oneDNN ran at 0.43-0.95x of MKL, and there padded logit rows lost 10% of a bf16 step.
ONEDNN_FP32 = None          # fp32 products through oneDNN (training and evaluation)
ALIGNED_LOGITS = None       # the head's logits in rows padded to 64 (where oneDNN is not used)
PACKING = None              # weight copies for decoding (one more copy of the weights)
PACK_FP32_BATCH_1 = None    # ... for one-row fp32 decoding (None: as PACKING's choice)
# One-row fp32 and bf16 copies for our own kernels (decode_kernel.c) rather than oneDNN's
# packed layout: on an AMD EPYC (Zen 4) the 124M model's 48 block matrices took 15.0-15.7 ms
# a token in fp32 against oneDNN's 20.0-20.1 (interleaved, 2 threads)
OWN_GEMV = None
# Greedy fp32 decoding's argmax through a bf16 copy of the output head (screened_argmax)
SCREENED_HEAD = None
# Greedy decoding's argmax over the logits by decode_kernel.c's argmax_rows (greedy_ids)
OWN_ARGMAX = None

# bf16 products computed in fp32 (matmul_in_fp32): None, where PyTorch has no bf16 matmul
# kernel here (oneDNN without bf16 products: AVX2 x86 CPUs); True, everywhere (the tests
# compare it with the plain bf16 product on any CPU); False, never. Not for the clock: the
# fallback it replaces multiplies at ~0.2 GFLOP/s (a 256-token prompt of the bf16 124M model
# took 30 s), and no fp32 product is that slow.
BF16_IN_FP32 = None

# the candidates' names, as engine/tuning.py prints them
PLAIN, PACKED, OWN = "x @ W", "oneDNN-packed copy", "own C kernel (decode_kernel.c)"


def disabled():
    """Within this block every fast path is off: the plain PyTorch code of model.py runs."""
    return turned_off(sys.modules[__name__])


def available():
    """True where these kernels can run: PyTorch with oneDNN, on x86."""
    return (torch.backends.mkldnn.is_available()
            and platform.machine().lower() in ("x86_64", "amd64"))


def onednn_packs(dtype):
    """Whether oneDNN can keep packed copies in ``dtype`` here: fp32 wherever it runs, bf16
    only where oneDNN has bf16 products (AVX-512 BW/VL/DQ, AVX-NE-CONVERT or AMX; not on an
    AVX2 CPU, where packing one raises)."""
    return available() and (dtype != torch.bfloat16 or devices.onednn_bf16())


def _dtype_name(dtype):
    return {torch.float32: "fp32", torch.bfloat16: "bf16"}.get(dtype, str(dtype))


# ---------------------------------------------------------------------------------------
# Which path runs: the flag where it is set, else the clock (engine/tuning.py)

def onednn_fp32():
    """Whether fp32 products (training, evaluation, prompts) go through oneDNN here."""
    return ENABLED and available() and tuning.switch(
        ONEDNN_FP32, "fp32 products (training)", _time_fp32_products, "torch.mm", "oneDNN")


def aligned_logits(dtype):
    """Whether the output head writes its ``dtype`` logits into rows padded to 64 here."""
    return ENABLED and tuning.switch(
        ALIGNED_LOGITS, f"output head logits ({_dtype_name(dtype)}, training)",
        lambda: _time_head_rows(dtype), "rows of 50257", "rows padded to 64")


def copy_kind(dtype, rows, need_copy=False):
    """How decoding's products of ``rows`` rows (1, or 8: any batch) in ``dtype`` multiply:
    PLAIN (the model's own weights), PACKED (oneDNN-packed copies) or OWN (OneRow copies for
    decode_kernel.c, one row of fp32 or bf16), the fastest of copy_kinds' here. ``need_copy``:
    a copy is wanted whatever (the screened head's bf16 copy): PACKED or OWN."""
    return tuning.pick(f"decoding products ({_dtype_name(dtype)}, {rows} row"
                       f"{'s' if rows > 1 else ''})", lambda: _time_copies(dtype, rows),
                       copy_kinds(dtype, rows, need_copy))


def copy_kinds(dtype, rows, need_copy=False):
    """The kinds copy_kind may pick from, as the switches and this machine allow (the
    baseline first)."""
    copies = PACKING
    if dtype == torch.float32 and rows == 1 and PACKING is not False \
            and PACK_FP32_BATCH_1 is not None:
        copies = PACK_FP32_BATCH_1
    if not ENABLED or (copies is False and not need_copy):
        return [PLAIN]
    kinds = [PACKED] if onednn_packs(dtype) else []
    if (rows == 1 and dtype in (torch.float32, torch.bfloat16) and OWN_GEMV is not False
            and own_gemv() is not None):
        kinds = [OWN] if OWN_GEMV else [*kinds, OWN]
    if not kinds:                                       # no copy can be made here
        return [PLAIN]
    return kinds if copies or need_copy else [PLAIN, *kinds]


def screened_head(rows):
    """Whether greedy fp32 decoding of ``rows`` rows takes its argmax through screened_argmax
    (a bf16 copy of the head read, a few rows in fp32) rather than all fp32 logits; never
    where no bf16 copy can be made here."""
    return ENABLED and copy_kinds(torch.bfloat16, rows, need_copy=True) != [PLAIN] \
        and tuning.switch(
        SCREENED_HEAD, f"greedy head (fp32, {rows} row{'s' if rows > 1 else ''})",
        lambda: _time_screened_head(rows), "fp32 logits", "bf16-screened")


# ---------------------------------------------------------------------------------------
# The seams model.py calls

def linear(x, layer):
    """x @ layer.weight + layer.bias through a faster kernel, or None (then: the plain code).

    Inside packed_for_cpu: the layer's packed copy. Elsewhere, fp32 on an x86 CPU: oneDNN.
    """
    copy = packed_copy(layer)
    if copy is not None:
        return packed_linear(x, copy, layer.bias)                           # (..., out)
    if onednn_fp32_applies(x, layer.weight) and onednn_fp32():
        y = _OneDNNLinear.apply(x.reshape(-1, x.shape[-1]), layer.weight, layer.bias)
        return y.view(*x.shape[:-1], y.shape[-1])                           # (..., out)
    if bf16_in_fp32(x, layer.weight):
        y = matmul_in_fp32(x.reshape(-1, x.shape[-1]), layer.weight, layer.bias)
        return y.view(*x.shape[:-1], y.shape[-1])                           # (..., out)
    return None


def head_logits(h, weight):
    """h (..., C) @ weight (vocab, C).T on the CPU through a faster kernel, or None.

    fp32 on x86: oneDNN (which writes the logits' odd-length rows as fast as padded ones).
    Otherwise on CPU (bf16 autocast, other CPUs): _AlignedLogits, rows padded to 64 entries.
    """
    if (not ENABLED or h.device.type != "cpu" or torch.compiler.is_compiling()
            or not weight.is_floating_point()):     # an int8 head (engine/int8.py) has its own
        return None
    if onednn_fp32_applies(h, weight) and onednn_fp32():
        out = _OneDNNLinear.apply(h.reshape(-1, h.shape[-1]), weight.t(), None)
        return out.view(*h.shape[:-1], weight.shape[0])                     # (..., vocab)
    if bf16_in_fp32(h, weight):
        out = matmul_in_fp32(h.reshape(-1, h.shape[-1]), weight.t())
        return out.view(*h.shape[:-1], weight.shape[0])                     # (..., vocab)
    # what autocast would do for the head: multiply in its low-precision dtype (the casts
    # do nothing outside autocast)
    dtype = cpu_matmul_dtype(weight)
    if weight.shape[0] % 64 == 0 or not aligned_logits(dtype):
        return None
    h, weight = h.to(dtype), weight.to(dtype)
    out = _AlignedLogits.apply(h.reshape(-1, h.shape[-1]), weight)           # (N, vocab)
    return out.view(*h.shape[:-1], weight.shape[0])


def own_argmax():
    """Whether greedy decoding's argmax runs in decode_kernel.c here (greedy_ids): where it
    can be built and OWN_ARGMAX (or the clock) says so."""
    return ENABLED and OWN_ARGMAX is not False and own_gemv() is not None and tuning.switch(
        OWN_ARGMAX, "greedy argmax (fp32, 1 row of 50257)", _time_argmax, "torch.argmax", OWN)


def greedy_ids(logits):
    """Each row's most likely token from CPU ``logits`` (B, vocab), fp32 or bf16, as (B, 1)
    int64 ids, by decode_kernel.c's argmax_rows where OWN_ARGMAX (or the clock) says so; else
    None (then the plain argmax). The same ids as torch.argmax, ties (the lowest id) and NaNs
    (the first) included."""
    if (logits.device.type != "cpu" or logits.dim() != 2 or logits.shape[1] == 0
            or logits.dtype not in (torch.float32, torch.bfloat16)
            or torch.compiler.is_compiling() or not own_argmax()):
        return None
    x = logits.contiguous()
    ids = torch.empty(x.shape[0], 1, dtype=torch.int64)                     # (B, 1)
    native.decode_kernels().argmax_rows(x.data_ptr(), int(x.dtype == torch.bfloat16),
                                        x.shape[0], x.shape[1], ids.data_ptr())
    return ids


def forget_packed(params):
    """Drop the packed copies of ``params``: they only take memory while training."""
    for p in params:
        _PACKED.pop(p, None)


# ---------------------------------------------------------------------------------------
# Faster fp32 matrix products on x86 CPUs: oneDNN instead of MKL.
#
# PyTorch's CPU builds hand fp32 matmuls (torch.mm, addmm, F.linear) to Intel's MKL and
# bfloat16 ones to oneDNN, another kernel library inside PyTorch. On the AMD EPYC (Zen 5)
# these figures come from, MKL ran fp32 products at 184-214 GFLOP/s, the speed of 256-bit
# AVX2 code here, while oneDNN ran every fp32 product a training step of GPT-2 makes at
# 315-488 GFLOP/s, about 2.2x (bench/kernels.py --only sgemm). The two differ only in
# rounding (~1e-6 relative: the order in which each dot product is summed). oneDNN's linear
# op has no gradient formula in autograd, so _OneDNNLinear writes out the backward: the
# two matrix products of any linear layer, and the bias's sum. For toy sizes (under ~2M
# multiply-adds a product) oneDNN's fixed cost of ~15 us a call made it slower than MKL by
# up to 11 us; that is kept rather than a switch that depends on the shapes.

def onednn_fp32_applies(x, weight):
    """True when x @ weight should run through _OneDNNLinear: fp32 on an x86 CPU, no autocast."""
    return (x.dtype == weight.dtype == torch.float32 and x.device.type == "cpu"
            and x.numel() > 0 and not torch.is_autocast_enabled("cpu")
            and type(weight) in (torch.Tensor, nn.Parameter)       # not a sharded DTensor
            and not torch.compiler.is_compiling() and available())


def onednn_mm(a, b, bias=None):
    """a (M, K) @ b (K, N) + bias, in one oneDNN call (the op wants b as an (N, K) matrix)."""
    return torch.ops.mkldnn._linear_pointwise(in_rows(a), b.t(), bias, "none", [], "")


def in_rows(a):
    """``a`` (M, K) as oneDNN's linear op takes its input: contiguous. The op copies any other
    input itself, through PyTorch's strided copy; for a transposed matrix, the x.T of every
    weight's gradient x.T @ grad, that ran at ~2 GB/s on a Zen 4, where transpose_kernel.c
    copies 8 x 8 blocks at a time, 2.5-4.5x faster (GPT-2's shapes, up to the head's
    (50257, 1328) gradient rows: 86-89 -> 32 ms). The same numbers either way."""
    if (a.dtype != torch.float32 or a.dim() != 2 or a.is_contiguous()
            or not a.t().is_contiguous() or a.device.type != "cpu"):
        return a
    lib = native.optional(native.transpose_kernels)
    if lib is None:
        return a
    out = torch.empty(a.shape, dtype=a.dtype)                              # (M, K)
    lib.transpose_f32(a.data_ptr(), out.data_ptr(), a.shape[1], a.shape[0])   # of a.T (K, M)
    return out


class _OneDNNLinear(torch.autograd.Function):
    """y = x @ w + bias through oneDNN: x (N, in), w (in, out), bias (out,) or None."""

    @staticmethod
    def forward(ctx, x, w, bias):
        ctx.save_for_backward(x, w)
        return onednn_mm(x, w, bias)                                      # (N, out)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):                                              # grad (N, out)
        x, w = ctx.saved_tensors
        grad_x = grad_w = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = onednn_mm(grad, w.t())                               # (N, in)
        if ctx.needs_input_grad[1]:
            # made in w's own memory order so that it adds onto .grad without a copy: the
            # output head's (vocab, C) weight arrives here as its transpose (C, vocab)
            if w.is_contiguous():
                grad_w = onednn_mm(x.t(), grad)                           # (in, out)
            else:
                grad_w = onednn_mm(grad.t(), x).t()                       # (in, out) view
        if ctx.needs_input_grad[2]:
            grad_bias = grad.sum(dim=0)                                   # (out,)
        return grad_x, grad_w, grad_bias


# ---------------------------------------------------------------------------------------
# The output head in rows aligned to 64 entries (CPU, where oneDNN fp32 does not apply).

class _AlignedLogits(torch.autograd.Function):
    """logits = h @ weight.T, written into rows whose length is a multiple of 64.

    GPT-2's vocabulary has 50257 tokens, so each row of logits is 50257 floats long and
    every row after the first starts at an address the CPU's vector units handle badly.
    The matrix multiply that writes them ran at 121 GFLOP/s here against ~190 for the
    same product written into rows of 50304 (bench/kernels.py --only headtrain), and
    the head is most of a small model's work. So the product goes into a (N, 50304)
    buffer and we return the view of its first 50257 columns: the 47 extra entries per
    row are never computed, read, sampled or counted in the loss (nanoGPT pads the
    vocabulary itself to 50304 instead, which changes the weights' shapes; we keep
    GPT-2's). Autograd cannot follow ``torch.mm(..., out=)``, hence this small Function
    with its backward written out: the two matrix products of a linear layer.
    """

    @staticmethod
    def forward(ctx, h, weight):                      # h (N, C), weight (vocab, C)
        vocab = weight.shape[0]
        rows = torch.empty(h.shape[0], -(-vocab // 64) * 64, dtype=h.dtype, device=h.device)
        logits = rows[:, :vocab]                      # (N, vocab), row stride padded
        torch.mm(h, weight.t(), out=logits)
        ctx.save_for_backward(h, weight)
        return logits

    @staticmethod
    def backward(ctx, grad):                          # grad (N, vocab)
        h, weight = ctx.saved_tensors
        grad_h = grad @ weight if ctx.needs_input_grad[0] else None             # (N, C)
        grad_weight = grad.t() @ h if ctx.needs_input_grad[1] else None        # (vocab, C)
        return grad_h, grad_weight


# ---------------------------------------------------------------------------------------
# bf16 products where PyTorch has no bf16 matmul kernel
#
# PyTorch multiplies bf16 matrices on the CPU through oneDNN; where oneDNN has no bf16
# products (an AVX2 CPU: no AVX-512, no AVX-NE-CONVERT, no AMX) it falls back to a generic
# loop, and for our (in, out) weights that loop is slow: on the Zen 4 seen as an AVX2 CPU,
# 256 rows times a 768 x 3072 matrix took 2.7 s, the same in fp32 0.07 s (and 12 ms a row
# for one row). There the product is computed in fp32 from the bf16 operands, which is what
# a bf16 matmul computes (each product of two bf16 numbers is exact in fp32, the sums are
# fp32), rounded to bf16 at the end as it rounds: the same numbers up to the order of the
# sums, for the cost of widening the weight (a pass over it) at every call.

def bf16_in_fp32(x, weight):
    """Whether the CPU product of ``x`` and ``weight`` runs in bf16 (the tensors' own dtype,
    or autocast's) where BF16_IN_FP32 says to compute it in fp32 (matmul_in_fp32)."""
    if BF16_IN_FP32 is False or not ENABLED or x.device.type != "cpu" \
            or torch.compiler.is_compiling() or type(weight) not in (torch.Tensor, nn.Parameter):
        return False
    if torch.is_autocast_enabled("cpu"):
        bf16 = torch.get_autocast_dtype("cpu") == torch.bfloat16 and x.is_floating_point() \
            and weight.is_floating_point()
    else:
        bf16 = x.dtype == weight.dtype == torch.bfloat16
    return bf16 and (BF16_IN_FP32 or not devices.onednn_bf16())


def matmul_in_fp32(x, w, bias=None):
    """x (N, in) @ w (in, out) + bias as a bf16 matmul computes it (the operands rounded to
    bf16, products and sums in fp32, the result rounded to bf16), multiplied in fp32;
    differentiable (the gradients as autocast's or a bf16 model's, in their dtypes). Also
    batched, without bias: x (..., N, in) @ w (..., in, out) (engine/attention.py)."""
    with torch.autocast("cpu", enabled=False):
        xf = x.to(torch.bfloat16).float()                                  # (N, in)
        wf = w.to(torch.bfloat16).float()                                  # (in, out)
        bf = None if bias is None else bias.to(torch.bfloat16).float()     # (out,)
        if wf.dim() == 2 and onednn_fp32_applies(xf, wf) and onednn_fp32():
            y = _OneDNNLinear.apply(xf, wf, bf)
        else:
            y = xf @ wf if bf is None else torch.addmm(bf, xf, wf)
    return y.to(torch.bfloat16)                                            # (N, out)


# ---------------------------------------------------------------------------------------
# Faster decoding on x86 CPUs: oneDNN-packed weights.
#
# Generating one token multiplies a few rows by every weight matrix, so its speed is how
# fast the weights stream from memory. oneDNN can store a matrix in its own blocked layout,
# tiled the way its kernels read it; multiplying with such a "packed" copy read the 124M
# model's weights at 30-38 GB/s here, about what a plain sum over memory reaches, against
# 17-26 for ``x @ W`` and ~15 for F.linear (bench/kernels.py --only gemv). Packing costs a
# copy of the weights (0.4 s at 124M), so it pays only when they are reused for many tokens:
# the copies are cached per weight until the weight changes (an optimizer step,
# load_state_dict, .to()) and dropped when the model goes back to training mode. Training
# never uses them. The cache is keyed by the weight tensor itself, by identity (tensors
# compare element-wise with ==, so a plain WeakKeyDictionary cannot hold them); an entry
# goes when its weight does.
_PACKED = WeakIdKeyDictionary()     # weight Parameter -> (version key, its storage, packed copy)
_IN_USE = {}                        # id(layer) -> (its packed copy, the PackedSession using it)


def _version_key(weight):
    # Every in-place change bumps a tensor's _version; data_ptr changes when .to() or
    # load_state_dict(assign=True) swaps the storage. (Inference tensors keep no version.)
    version = None if weight.is_inference() else weight._version
    return (weight.data_ptr(), weight.dtype, version)


def cpu_matmul_dtype(weight):
    """The dtype a CPU matmul with ``weight`` runs in: autocast's when on, else the weight's."""
    return torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else weight.dtype


def packed_weight(weight, rows=8, in_out=False, dtype=None, kind=None):
    """The oneDNN-packed copy of ``weight`` (cached until the weight changes).

    ``weight`` is (out, in) like nn.Linear's, or (in, out) like our Linear's with
    ``in_out=True``. ``rows`` is how many rows the products will have: oneDNN picks its
    tiling for it. Packed for 1 row, one-token steps ran ~5% faster than with the 8-row
    packing, while 8-row steps ran 1.7x slower with the 1-row one; 8 served every batch
    from 2 to 16. ``dtype`` (default: the weight's) is the precision of the copy: bfloat16
    for fp32 weights under autocast. ``kind``: PACKED or OWN (a OneRow for our one-row
    kernels); default: copy_kind's pick. Raises ValueError where no copy in ``dtype`` can
    be made here (bf16 without oneDNN's bf16 products or our one-row kernel).
    """
    rows = 1 if rows == 1 else 8
    dtype = dtype or weight.dtype
    kind = kind or copy_kind(dtype, rows, need_copy=True)
    if kind == PLAIN:
        raise ValueError(f"no {_dtype_name(dtype)} copy for {rows}-row products can be made "
                         "here: oneDNN has no bf16 products on this CPU")
    if kind == OWN and rows == 1:
        rows = "gemv"           # the copy is a OneRow for our kernel (the cache key says so)
    key = (*_version_key(weight), rows, dtype)
    # The storage itself is compared too (through a weak reference, which dies with it):
    # after m.to(torch.bfloat16).to(torch.float32) the allocator may give the new storage
    # the old one's address, so data_ptr alone would vouch for a copy of other weights.
    storage = weight.untyped_storage()
    cached = _PACKED.get(weight)
    if cached is None or cached[0] != key or cached[1]() is not storage or key[2] is None:
        out_in = weight.detach().t() if in_out else weight.detach()
        # from a contiguous (out, in) matrix: packing the transposed view directly gave a
        # layout that streamed ~3% slower
        copy = (OneRow(out_in, dtype) if rows == "gemv"
                else torch.ops.mkldnn._reorder_linear_weight(out_in.to(dtype).contiguous(), rows))
        cached = (key, weakref.ref(storage), copy)
        _PACKED[weight] = cached
    return cached[2]


def packed_linear(x, packed, bias=None):
    """x (..., in) -> x @ W + bias (..., out), with W given as a packed_weight.

    ``x`` and ``bias`` are brought to the packed copy's dtype first, as autocast would do
    for a linear layer (autocast does not know this oneDNN op, so it converts nothing).
    """
    if isinstance(packed, OneRow):
        return packed(x, bias)
    if x.dtype != packed.dtype:
        x = x.to(packed.dtype)
    if bias is not None and bias.dtype != packed.dtype:
        bias = bias.to(packed.dtype)
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


# ---------------------------------------------------------------------------------------
# One-row fp32 and bf16 products through our own kernels

_GEMV = None                # {dtype: compiled product} once built; False: cannot be built here
GEMV_STATUS = "not built yet"


def own_gemv():
    """engine/decode_kernel.c's one-row products {torch.float32: gemv_f32, torch.bfloat16:
    gemv_bf16} (ctypes functions), built once per machine by engine/native.py, or None where
    they cannot be (the reason in GEMV_STATUS)."""
    global _GEMV, GEMV_STATUS
    if _GEMV is None:
        _GEMV = False
        try:
            lib = native.decode_kernels()
            _GEMV = {torch.float32: lib.gemv_f32, torch.bfloat16: lib.gemv_bf16}
            GEMV_STATUS = "on"
        except native.BUILD_ERRORS as e:
            GEMV_STATUS = f"unavailable: {e}"
    return _GEMV or None


class OneRow:
    """A matrix kept for one-row products through decode_kernel.c (packed_weight's copy of an
    fp32 or bf16 matrix where copy_kind picks OWN): the (out, in) matrix in ``dtype``, contiguous,
    each output's weights one run: engine/pages.py's ``streamed`` copy (in 2 MiB pages where
    they are chosen, else the matrix itself where it already is one: the output head in its
    own dtype).

    Called with x (..., in): one row through the kernel (x and bias taken in fp32; in bf16 x
    is rounded to bf16, as a bf16 matmul or autocast would, the sums in fp32), the result in
    ``dtype``; more rows (a prompt) multiply with ``plain``, the (out, in) view of the weight
    it was made from (no copy), through oneDNN where ONEDNN_FP32 applies.
    """

    def __init__(self, out_in, dtype=torch.float32):
        self.plain = out_in                                                  # (out, in)
        self.dtype = dtype
        self.out_features, self.in_features = out_in.shape
        # (out, in), in 2 MiB pages where the clock picks them (engine/pages.py)
        self.weight = pages.streamed(out_in, dtype)

    def __call__(self, x, bias=None):
        out, k = self.out_features, self.in_features
        fn = own_gemv()[self.dtype] if ENABLED and OWN_GEMV is not False and own_gemv() else None
        if fn is None or x.numel() != k or not x.is_floating_point():
            x = x.to(self.dtype)
            w = self.plain.to(self.dtype)
            bias = None if bias is None else bias.to(self.dtype)
            if bf16_in_fp32(x, w):
                y = matmul_in_fp32(x.reshape(-1, k), w.t(), bias)
                return y.view(*x.shape[:-1], out)
            if onednn_fp32_applies(x, w) and onednn_fp32():
                y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, k), w, bias,
                                                       "none", [], "")
                return y.view(*x.shape[:-1], out)
            return torch.nn.functional.linear(x, w, bias)
        x1 = x.float().contiguous()
        b = None if bias is None else bias.float().contiguous()
        y = torch.empty(*x.shape[:-1], out, dtype=torch.float32)
        if fn(x1.data_ptr(), self.weight.data_ptr(), None if b is None else b.data_ptr(),
              y.data_ptr(), out, k, torch.get_num_threads()) != 0:
            raise MemoryError("one-row product: out of memory for a copy of the row")
        return y.to(self.dtype)                                             # (..., out)


def packed_copy(layer):
    """The copy ``layer`` multiplies with right now (inside packed_for_cpu), or None."""
    entry = _IN_USE.get(id(layer))
    return entry[0] if entry is not None and entry[1].active else None


def is_packed(layer):
    """Whether ``layer`` multiplies with a packed copy right now (inside packed_for_cpu)."""
    entry = _IN_USE.get(id(layer))
    return entry is not None and entry[1].active


class PackedSession:
    """What packed_for_cpu yields: the output head for decoding, and the on/off state.

    ``logits(h)`` turns final vectors (..., C) into logits. ``greedy(h)``, where set, gives
    the index of each row's largest logit, (B, 1), which is all greedy decoding needs (the
    screened head); None: take the argmax of ``logits(h)``. ``active`` is read
    by every layer at every call: True, they multiply with their packed copies; False, with
    their own weights. generate_tokens is a generator, so the caller's code runs while it
    waits at a ``yield`` (inside the block): it sets ``active`` to False for that time, so
    that a training step or load_state_dict in between sees the real weights.
    """

    def __init__(self, logits, greedy=None):
        self.logits = logits
        self.greedy = greedy
        self.active = True


@contextlib.contextmanager
def packed_for_cpu(model, batch_size=8, greedy=False, kind=None):
    """Within this block the blocks' matmuls read oneDNN-packed weights (inference on CPU).

    ``model`` is a GPTModel; ``batch_size`` the rows each step will have (the packing is
    tuned for it). Yields a PackedSession. Under bf16 autocast the copies are packed in
    bfloat16 (cast once, not at every step as autocast would). ``greedy=True`` (only the
    argmax will be asked for) packs an fp32 head as a bfloat16 copy for screened_argmax:
    greedy tokens exactly as fp32 picks them, with half the head's bytes read (``logits``
    then is the model's own head), where screened_head picks it. Where copies are not
    available or not wanted (switched off, neither oneDNN (x86) nor our kernels here,
    copy_kind picks the plain product, weights not on the CPU, gradients on, weights over a
    quarter of the RAM) nothing changes and ``logits`` is ``model.logits``. ``kind``: the
    copies to make (PLAIN, PACKED, OWN) instead of copy_kind's pick (engine/decoder.py times
    one-call steps so).

    The copies are reused by later blocks until a weight changes (an in-place edit, an
    optimizer step, load_state_dict, .to()); an edit that autograd does not see (through
    ``.data`` or a numpy view) is not noticed: call ``model.train()`` after one, which drops
    the copies.
    """
    w = model.tok_emb.weight
    dtype = cpu_matmul_dtype(w)
    # the four (in, out) matrices of every block: each 2-D weight inside the blocks
    layers = [m for m in model.trf_blocks.modules()
              if isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.dim() == 2]
    head = model.out_head.weight                                             # (vocab, C)
    rows = 1 if batch_size == 1 else 8
    usable = (ENABLED and (available() or own_gemv() is not None) and w.device.type == "cpu"
              and {w.dtype, dtype} <= {torch.float32, torch.bfloat16}
              and type(w) in (torch.Tensor, nn.Parameter)     # not a sharded DTensor
              # int8 layers (engine/int8.py) read their own int8 matrices: nothing to pack
              and all(m.weight.is_floating_point() for m in layers)
              and head.is_floating_point()
              and not torch.is_grad_enabled() and _packed_copy_fits(model))
    kind = (kind or copy_kind(dtype, rows)) if usable else PLAIN
    if kind == PLAIN:
        yield PackedSession(model.logits)
        return
    if greedy and dtype == torch.float32 and screened_head(rows):
        head_bf16 = packed_weight(head, batch_size, dtype=torch.bfloat16)
        norms = head.detach().norm(dim=1)                                    # (vocab,)
        session = PackedSession(model.logits,
                                lambda h: screened_argmax(h, head, head_bf16, norms))
    else:
        packed_head = packed_weight(head, batch_size, dtype=dtype, kind=kind)
        session = PackedSession(lambda h: packed_linear(h, packed_head))
    try:
        for m in layers:
            _IN_USE[id(m)] = (packed_weight(m.weight, batch_size, in_out=True, dtype=dtype,
                                            kind=kind), session)
        yield session
    finally:
        for m in layers:
            if _IN_USE.get(id(m), (None, None))[1] is session:
                del _IN_USE[id(m)]


def _packed_copy_fits(model):
    # The packed copy doubles the weights' memory while it is kept: make it only when the
    # weights take at most a quarter of the machine's RAM (gpt2-xl's 6.2 GB fp32 would not
    # be copied on a 16 GB laptop). Where RAM cannot be read, assume it fits.
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):      # no sysconf (Windows)
        return True
    return weight_bytes <= ram // 4


# ---------------------------------------------------------------------------------------
# Greedy decoding's argmax, reading half of the output head

def screened_argmax(h, weight, head_bf16, row_norms):
    """argmax(h @ weight.T) of each row of h (B, C), as fp32 gives it, reading half the bytes.

    Greedy decoding needs only the largest logit, and the output head is the largest
    matrix (154 MB of the 124M model's 500 MB in fp32). So:
    1. multiply by ``head_bf16``, a bfloat16 copy of ``weight`` (packed_weight): half the
       bytes;
    2. bound how far each of those logits can be from the fp32 one. bfloat16 keeps 8
       significant bits, so rounding moves every weight and every entry of h by at most
       2^-9 of itself, and logit i by at most about 2^-8 * sum_j |h_j| |w_ij| (the fp32
       sums add far less), which Cauchy-Schwarz bounds by 2^-8 * ||h|| * ||w_i||
       (``row_norms``: the ||w_i||). We take 2^-7, twice that;
    3. token i can still be the largest only if its logit plus its bound reaches the best
       of (logit - bound); recompute just those candidates in fp32 (a handful of rows on
       GPT-2-sized random weights) and take their argmax.
    Ties go to the lowest index, as with torch.argmax over all logits. "As fp32 gives it"
    holds up to the last-bit rounding in which any two fp32 kernels differ (their order of
    summation), as between ours and Hugging Face's.
    """
    h_norm = h.norm(dim=-1, keepdim=True)                                   # (B, 1)
    if torch.isfinite(h_norm).all():        # NaN or inf (a diverged model): no bound holds
        approx = packed_linear(h, head_bf16).float()                        # (B, vocab)
        bound = 2.0 ** -7 * h_norm * row_norms                              # (B, vocab)
        floor = (approx - bound).amax(dim=-1, keepdim=True)                 # (B, 1)
        candidates = (approx + bound >= floor).any(dim=0).nonzero().squeeze(1)  # (K,) ascending
        if len(candidates) <= 4096:       # else the screen did not narrow it down
            # Each (row, candidate) dot product summed the same way, so equal weight rows
            # give equal logits and a tie goes to the lower index (a matmul may round
            # columns differently).
            exact = (h[:, None, :] * weight[candidates]).sum(dim=-1)        # (B, K) fp32
            return candidates[exact.argmax(dim=-1, keepdim=True)]           # (B, 1)
    return (h @ weight.T).argmax(dim=-1, keepdim=True)                      # all in fp32


# ---------------------------------------------------------------------------------------
# Memory for training steps

def tune_malloc():
    """Ask glibc's malloc to keep freed memory for reuse; returns True if it took effect.

    Every training step allocates and frees the same large activation buffers. By default
    glibc serves big requests with fresh mmap()s and hands freed memory back to the OS, so
    each step page-faults all of it in again: about a quarter of a small CPU run's time
    went there (steps got 1.2-1.4x faster with this). Keeping the memory costs nothing
    new: the process's footprint stays at its peak, which it reaches every step anyway.
    Same effect as GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=...
    set before Python starts. Does nothing off Linux/glibc (macOS, Windows, musl), or when
    the fast paths are switched off.
    """
    if not ENABLED or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    if not hasattr(libc, "gnu_get_libc_version"):   # glibc only: musl has no such tunables
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4   # from glibc's <malloc.h>
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


# ---------------------------------------------------------------------------------------
# What engine/tuning.py times for each choice: {candidate: one repeat}, the plain code first,
# on GPT-2 124M's shapes

def _time_fp32_products():
    # a training step's products at 128 rows: the MLP's two forward and a weight gradient
    # (x.T @ grad), as linear() and _OneDNNLinear make them
    (C, hidden), g = tuning.BLOCK_124M[2], torch.Generator().manual_seed(0)
    x, hid, w1, w2 = (tuning.filled(shape, torch.float32, g)
                      for shape in ((128, C), (128, hidden), (C, hidden), (hidden, C)))
    return {"torch.mm": lambda: (torch.mm(x, w1), torch.mm(hid, w2), torch.mm(x.t(), hid)),
            "oneDNN": lambda: (onednn_mm(x, w1), onednn_mm(hid, w2), onednn_mm(x.t(), hid))}


def _time_head_rows(dtype, rows=32):
    # GPT-2's head (50257 x 768) on 32 rows, its logits in rows of 50257 or padded to 64
    g = torch.Generator().manual_seed(0)
    h = tuning.filled((rows, tuning.HEAD_124M[1]), dtype, g)
    weight = tuning.filled(tuning.HEAD_124M, dtype, g)
    return {"rows of 50257": lambda: torch.mm(h, weight.t()),
            "rows padded to 64": lambda: _AlignedLogits.apply(h, weight)}


def _time_copies(dtype, rows):
    # one decoding step's block products (124M, working_set() bytes of weights), each way
    mats = tuning.block_matrices(dtype)                                     # (in, out) each
    out_in = [w.t().contiguous() for w in mats]          # the same matrices, as copies hold them
    g = torch.Generator().manual_seed(1)
    xs = {k: tuning.filled((rows, k), dtype, g) for k in {w.shape[0] for w in mats}}
    out = {PLAIN: lambda: [xs[w.shape[0]] @ w for w in mats]}
    if onednn_packs(dtype):
        packed = [torch.ops.mkldnn._reorder_linear_weight(w, rows) for w in out_in]
        out[PACKED] = lambda: [packed_linear(xs[w.shape[1]], p) for w, p in zip(out_in, packed)]
    if rows == 1 and dtype in (torch.float32, torch.bfloat16) and own_gemv() is not None:
        own = [OneRow(w, dtype) for w in out_in]                            # no copy made
        out[OWN] = lambda: [o(xs[o.in_features]) for o in own]
    return out


def _time_argmax():
    # greedy's argmax over one row of GPT-2's 50257 fp32 logits, each way
    x = tuning.filled((1, tuning.HEAD_124M[0]), torch.float32, torch.Generator().manual_seed(3))
    ids = torch.empty(1, 1, dtype=torch.int64)
    lib = native.decode_kernels()
    return {"torch.argmax": lambda: x.argmax(dim=-1, keepdim=True),
            OWN: lambda: lib.argmax_rows(x.data_ptr(), 0, 1, x.shape[1], ids.data_ptr())}


def _time_screened_head(rows):
    # greedy's argmax over GPT-2's head (50257 x 768, fp32) for ``rows`` rows: the logits in
    # fp32 (as the model's head computes them), or screened through a bf16 copy
    g = torch.Generator().manual_seed(2)
    weight = tuning.filled(tuning.HEAD_124M, torch.float32, g)
    h = tuning.filled((rows, tuning.HEAD_124M[1]), torch.float32, g) * 20   # final-normed size
    copy = packed_weight(weight, rows, dtype=torch.bfloat16)
    norms = weight.norm(dim=1)

    def plain():
        logits = head_logits(h, weight)
        return (h @ weight.t() if logits is None else logits).argmax(dim=-1, keepdim=True)
    return {"fp32 logits": plain,
            "bf16-screened": lambda: screened_argmax(h, weight, copy, norms)}
