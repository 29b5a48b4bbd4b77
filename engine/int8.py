"""int8 inference: every matrix of GPT-2 in 8 bits, the activations in fp32 or bf16.

Generating a token reads every weight once, so on a CPU decoding runs at the speed at which
the weights stream from memory: a quarter of fp32's bytes is up to four times the tokens/s
(and a quarter of the memory). ``quantize_(model)`` turns every matrix of the blocks and the
output head into an ``Int8Linear``:

    W[o, :]  ~=  q[o, :] * scale[o]      q int8 in [-127, 127], one scale per output

per output channel and symmetric: ``scale[o] = max |W[o, :]| / 127`` (rounded up to a
bfloat16 number, so that the kernels' bf16 scales are exactly the ones that made q), and
``q = round(W / scale)``. Each weight moves by at most half a step, scale / 2. Everything else
(embeddings, LayerNorms, biases) keeps one float dtype, the activations' (activation_dtype):
fp32 where our kernel runs, bf16 elsewhere. Where GPT-2 ties the head to the token
embedding, the lookup keeps its float matrix and the head gets the int8 copy (decoding
streams the head; the lookup reads one row per token).

The product ``y = x @ W.T + b`` runs, in this order of preference:

    CPU, 1-16 fp32 rows    decode_kernel.c's gemm_q8 (AVX2, AVX-512 or NEON; where
                           dynamic_q8_on(rows)): the rows rounded to int8 too, in blocks of 32
                           with a scale each (llama.cpp's q8_0 does the same), int8 products
                           summed in int32 (64 at a time with AVX512-VNNI, 32 with AVX2, 16
                           on Arm), each row of q read once for all the rows of x
    CPU, up to 16 rows     int8_kernel.c, ours (AVX-512, built once per machine with the C
                           compiler, engine/native.py; where own_kernel_on()): int8 -> fp32
                           in registers, fp32 sums,
                           the scale on the finished sum, the next rows of q prefetched
    CPU, bf16 x, <= 4 rows torch.ops.aten._weight_int8pack_mm (PyTorch's kernel)
    CPU, bf16 x, more      q converted to bf16 (exact: |q| <= 127) and one bf16 matmul,
                           the scales applied to its output (prompts are compute-bound)
    CPU, fp32 x, more      the same, x rounded to bf16 first, the output in fp32 (where
                           bf16_rows_on(): oneDNN's bf16 products, AMX tiles where there)
    anywhere else          the plain product: W = q * scale in fp32, y in fp32, cast to x's
                           dtype (CUDA, MPS, no kernel: slower, same result)

Measured on a 2-core AMD EPYC (Zen 4, AVX-512, AVX512-BF16, no AMX), the 124M model's 49
products of one decoding step, one thread: ours 14.6 ms, _weight_int8pack_mm 23.7 ms (1 row);
16.3 against 26.4 (4 rows), 29 against 45 (8 rows). Without prefetching ours was no faster:
a row of q is 768 bytes, too short a run for the hardware prefetcher. PyTorch's kernel
multiplies every weight by its scale and reads 4 rows of x per pass over q (8 rows: twice).
And a decoding step in bf16 spent 4x longer in attention on the KV cache than in fp32, so
with our kernel the activations stay fp32: 1.75x the tokens/s of bf16 activations there.

The kernels equal the plain product up to the order of the fp32 sums (and bf16 rounding of
the output, for bf16 x); gemm_q8 also rounds x (half a step of 1/127 of its block's largest
number: 0.5% of the outputs' spread on average), the bf16 matmul of fp32 rows rounds x and
its sums to bf16 (2^-9 of each, at most); the tests compare them. ``ENABLED = False`` (or
``GPT2_INT8_KERNELS=0`` before Python starts), or a ``disabled()`` block, makes every layer
take the plain product: the int8 model still runs, slowly. ``OWN_KERNEL``,
``DYNAMIC_Q8`` and ``BF16_ROWS`` are the fast paths' own flags: None (the default), each
chosen by the clock where it runs (engine/tuning.py, against the code it replaces); True on,
False off. The
engine finds the layers by their shape, not their
class: each module with a 2-D floating ``weight`` inside ``model.trf_blocks`` (model.Linear,
whose weight is stored (in, out); an nn.Linear's is (out, in)) and ``model.out_head`` (an
nn.Linear, (vocab, C)).
"""

import ctypes
import os
import sys
from pathlib import Path

import torch
import torch.nn as nn

from engine import native, pages, tuning, turned_off

ENABLED = os.environ.get("GPT2_INT8_KERNELS", "1") != "0"   # the switch

# Our own kernel (int8_kernel.c, built here once) for products of up to OWN_KERNEL_MAX_ROWS
# rows; on the AMD EPYC (Zen 4) it beat _weight_int8pack_mm at every row count up to 16.
# None: chosen by the clock (own_kernel_on).
OWN_KERNEL = None
OWN_KERNEL_MAX_ROWS = 16
# Without it, products of up to this many rows go through _weight_int8pack_mm (whose cost
# grows with every 4 rows), and larger ones through a bf16 matmul of the converted weights.
INT8MM_MAX_ROWS = 4
# fp32 products of up to DYNAMIC_Q8_MAX_ROWS rows (decoding, batches up to 16, short
# prompts) through decode_kernel.c's gemm_q8 instead: the rows rounded to int8 too (blocks
# of 32), int8 products summed in int32 (AVX512-VNNI, or AVX2), each row of q read once for
# all of them. On the AMD EPYC (Zen 4), the 124M model's 49 products of one decoding step,
# 2 threads: 1 row 5.2-5.5 ms
# against 8.7-9.0 with the kernel above, 2 rows 6.1-7.0 against 7.1-7.9; from 4 rows on the
# two were even (4: 9.4-10.4 against 8.5-8.7; 8: 15.5-16.4 against 15.3-15.8), the int8
# sums there being bound by the CPU's vector units; whole greedy decoding at batch 8 (2 MiB
# pages), 412 against 378 tok/s. Where int8_kernel.c cannot run (AVX2 CPUs) the product
# without gemm_q8 dequantizes the weights at every call: batch 8, 391 against 36 tok/s (the
# same Zen 4 seen as an AVX2 CPU). 1-2 rows and 3-16 are timed apart. None: chosen by the
# clock (dynamic_q8_on).
DYNAMIC_Q8 = None
DYNAMIC_Q8_MAX_ROWS = 16    # all gemm_q8 takes
# fp32 products of more rows than the kernels above take (a prompt) in one bf16 matmul of
# the converted weights (the rows rounded to bf16, as gemm_q8 rounds them to int8), rather
# than an fp32 matmul of weights dequantized at every call: oneDNN's bf16 products, on AMX
# tiles where the CPU has them. On the AMD EPYC (Zen 4), one block of the 124M model: 3.8
# against 22.8 ms at 32 rows, 11.3 against 27.0 at 128, 39 against 88 at 512. None: chosen
# by the clock (bf16_rows_on).
BF16_ROWS = None

QMAX = 127      # symmetric: -127..127, so that -q is always representable


def disabled():
    """Within this block every int8 layer takes the plain (dequantized, fp32) product."""
    return turned_off(sys.modules[__name__])


def _int8mm_op():
    return getattr(torch.ops.aten, "_weight_int8pack_mm", None)


def own_kernel_on():
    """Whether products of up to OWN_KERNEL_MAX_ROWS rows go through int8_kernel.c here."""
    return ENABLED and own_kernel() is not None and tuning.switch(
        OWN_KERNEL, "int8 products (bf16 rows: 1, 4)", _time_own_kernel,
        "PyTorch's int8 kernels", "int8_kernel.c")


# gemm_q8's two choices: (decision, rows timed) for 1-2 rows and for 3-16
_Q8_CHOICES = (("int8 products (fp32 rows: 1, 2)", (1, 2)), ("int8 products (fp32 rows: 8)", (8,)))


def dynamic_q8_on(rows=1):
    """Whether ``rows`` fp32 rows (1 to DYNAMIC_Q8_MAX_ROWS) go through gemm_q8 (rounded to
    int8) here: batch-1 and -2 decoding, and batches up to 16, each timed on its own."""
    name, timed = _Q8_CHOICES[rows > 2]
    return ENABLED and q8_kernel() is not None and tuning.switch(
        DYNAMIC_Q8, name, lambda: _time_dynamic_q8(timed), "weight-only int8", "gemm_q8")


def bf16_rows_on():
    """Whether fp32 products of many rows (beyond the kernels above) run as one bf16 matmul
    here, rather than in fp32 on dequantized weights."""
    return ENABLED and tuning.switch(
        BF16_ROWS, "int8 products (fp32 rows: 64)", _time_bf16_rows, "dequantized fp32",
        "bf16 matmul")


# ---------------------------------------------------------------------------------------
# Our kernel: compiled on first use, cached per machine

_SOURCE = Path(__file__).with_name("int8_kernel.c")
_KERNEL = None              # {dtype: ctypes function} once built; False: cannot be built here
KERNEL_STATUS = "not built yet"     # why it is or is not used (bench scripts print it)


def own_kernel():
    """{activation dtype: the compiled product (a ctypes function)} for bf16 and fp32, or
    None where it cannot be had.

    engine/native.py builds it once per machine (it needs Linux on x86-64 with AVX-512,
    PyTorch's libgomp and a C compiler). Any failure: None, and the reason in
    KERNEL_STATUS; the layers then use PyTorch's kernels.
    """
    global _KERNEL, KERNEL_STATUS
    if _KERNEL is None:
        _KERNEL = False
        try:
            _KERNEL = _load_kernel()
            KERNEL_STATUS = "on"
        except native.BUILD_ERRORS as e:
            KERNEL_STATUS = f"unavailable: {e}"
    return _KERNEL or None


def _load_kernel():
    lib = native.build(_SOURCE, needs="avx512")
    fns = {torch.bfloat16: lib.int8_linear_bf16, torch.float32: lib.int8_linear_f32}
    for fn in fns.values():
        fn.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int] * 4
        fn.restype = ctypes.c_int
    return fns


_Q8 = None     # decode_kernel.c's gemm_q8 once looked up; False: not here


def q8_kernel():
    """decode_kernel.c's gemm_q8 (up to 16 fp32 rows, rounded to int8 in blocks of 32, times
    the int8 weights), or None where it cannot be built."""
    global _Q8
    if _Q8 is None:
        lib = native.optional(native.decode_kernels)
        _Q8 = lib.gemm_q8 if lib is not None else False
    return _Q8 or None


def _own_linear(fn, x2, q, scale, bias):
    """x2 (N, in) contiguous -> (N, out) in x2's dtype (bf16 or fp32; bias the same) through
    the compiled kernel."""
    rows, (out, k) = x2.shape[0], q.shape
    y = torch.empty(rows, out, dtype=x2.dtype)
    if fn(x2.data_ptr(), q.data_ptr(), scale.data_ptr(),
          None if bias is None else bias.data_ptr(), y.data_ptr(), rows, out, k,
          torch.get_num_threads()) != 0:
        raise MemoryError("int8 kernel: out of memory for the activations' fp32 copy")
    return y


# ---------------------------------------------------------------------------------------
# Quantizing a matrix

def quantize_weight(weight):
    """A float matrix (out, in) -> (q int8 (out, in), scale fp32 (out,)), W ~= q * scale[:, None].

    Symmetric, one scale per row (output channel): scale = max |row| / 127, rounded up to
    the nearest bfloat16 number (the fast kernel multiplies by bf16 scales: these are then
    exact, and rounding up keeps every |W / scale| <= 127). An all-zero row gets scale 1
    and q = 0.
    """
    # contiguous: the int8 kernel reads rows of q (an (in, out) layer arrives transposed)
    w = weight.detach().float().contiguous()                                # (out, in)
    amax = w.abs().amax(dim=1)                                              # (out,)
    scale = _round_up_to_bf16(amax / QMAX)
    scale = torch.where(amax > 0, scale, torch.ones_like(scale))            # (out,)
    q = torch.round(w / scale[:, None]).clamp_(-QMAX, QMAX).to(torch.int8)  # (out, in)
    return q, scale


def _round_up_to_bf16(x):
    """The smallest bfloat16 value >= x (x >= 0 fp32), as fp32."""
    b = x.to(torch.bfloat16).float()
    below = b < x
    # one bf16 step up: bf16 is the top half of fp32, so add 1 << 16 to the fp32 bits
    up = (b.view(torch.int32) + (1 << 16)).view(torch.float32)
    return torch.where(below, up, b)


def dequantize(q, scale):
    """The fp32 matrix q * scale[:, None] (out, in) that an int8 layer stands for."""
    return q.float() * scale.float()[:, None]


# ---------------------------------------------------------------------------------------
# The product

def int8_linear(x, q, scale, bias=None):
    """x (..., in) @ (q * scale[:, None]).T + bias -> (..., out), by the fastest kernel here.

    ``q`` (out, in) int8; ``scale`` (out,) bfloat16 (or any float dtype holding bf16
    values, as quantize_weight makes them); ``bias`` (out,) or None. The result has x's
    dtype.
    """
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if not (ENABLED and x.device.type == "cpu" and rows > 0
            and x.dtype in (torch.bfloat16, torch.float32)
            and not (x.requires_grad and torch.is_grad_enabled())):
        return plain_int8_linear(x, q, scale, bias)
    x2 = x.reshape(rows, x.shape[-1])                                        # (N, in)
    scale = scale.to(torch.bfloat16)               # a no-op for Int8Linear's own scales
    fns = own_kernel() if rows <= OWN_KERNEL_MAX_ROWS and own_kernel_on() else None
    op = _int8mm_op()
    if fns is not None:
        b = None if bias is None else bias.to(x.dtype).contiguous()
        y = _own_linear(fns[x.dtype], x2.contiguous(), q, scale.contiguous(), b)
    elif x.dtype != torch.bfloat16:
        # fp32 activations, many rows (a prompt) or no kernel of ours: the rows rounded to
        # bf16 and one bf16 matmul of the converted weights (exact: |q| <= 127), the scales
        # on its fp32 output; or, where that loses here, the dequantized weights in fp32
        if not bf16_rows_on():
            return plain_int8_linear(x, q, scale, bias)
        y = _bf16_product(x2, q, scale)
    elif op is not None and rows <= INT8MM_MAX_ROWS and q.shape[1] % 16 == 0:
        # Its AVX-512 loop reads 16 inputs at a time with aligned loads and no tail: the
        # row length must be a multiple of 16 and x aligned to 64 bytes (as every fresh
        # tensor is), or it reads past the rows (a crash, seen with 40 inputs).
        x2 = x2.contiguous()
        if x2.data_ptr() % 64:
            x2 = x2.clone()
        y = op(x2, q, scale)                                                 # (N, out) bf16
    else:
        # Converting q to bf16 is exact; the scales go onto the output, where there are
        # fewer numbers to multiply than in the weights for prompts shorter than the layer
        # is wide, and where they stay exact.
        y = _bf16_product(x2, q, scale)                                      # (N, out)
    if bias is not None and fns is None:
        y += bias.to(y.dtype)
    return y.view(*x.shape[:-1], q.shape[0])                                 # (..., out)


def _bf16_product(x2, q, scale):
    """x2 (N, in) bf16 or fp32 -> (N, out) in x2's dtype: x2 rounded to bf16 (fp32 rows), one
    bf16 matmul with q converted to bf16 (exact), the scales on its output."""
    y = torch.mm(x2.to(torch.bfloat16), q.to(torch.bfloat16).t())                 # bf16
    return y.mul_(scale) if x2.dtype == torch.bfloat16 else y.float().mul_(scale)


def plain_int8_linear(x, q, scale, bias=None):
    """The product an int8 layer stands for, in plain PyTorch on any device: the weights
    dequantized to fp32, the sums in fp32, the result in x's dtype."""
    y = x.float() @ dequantize(q, scale).t()                                 # (..., out)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


class Int8Linear(nn.Module):
    """A linear layer whose matrix is stored in int8: y = x @ (weight * scale[:, None]).T + bias.

    ``weight`` (out, in) int8 and ``scale`` (out,) bfloat16 (exact: see quantize_weight)
    are buffers, nothing to train; ``bias`` (out,), in the activations' dtype, stays a
    Parameter (frozen). Built by ``from_float``.
    """

    def __init__(self, weight, scale, bias=None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight)                               # (out, in) int8
        self.register_buffer("scale", scale.to(torch.bfloat16))              # (out,)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @classmethod
    def from_float(cls, layer, in_out, dtype=torch.bfloat16):
        """An Int8Linear for ``layer`` (a module with ``weight`` and ``bias``): its weight is
        (in, out) with ``in_out=True`` (model.Linear), else (out, in) (nn.Linear)."""
        w = layer.weight.detach()
        q, scale = quantize_weight(w.t() if in_out else w)
        q = pages.streamed(q)          # in 2 MiB pages where they are chosen (engine/pages.py)
        bias = getattr(layer, "bias", None)
        return cls(q, scale, None if bias is None else bias.detach().to(dtype).clone())

    def forward(self, x):                                                   # x (..., in)
        if self.dynamic_q8(x):
            # up to 16 fp32 rows (decoding): x in int8 too, through gemm_q8
            rows = x.numel() // self.in_features
            y = torch.empty(*x.shape[:-1], self.out_features)
            b = None if self.bias is None else self.bias.data_ptr()
            if q8_kernel()(x.contiguous().data_ptr(), self.weight.data_ptr(),
                           self.scale.data_ptr(), b, y.data_ptr(), rows, self.out_features,
                           self.in_features, torch.get_num_threads()) != 0:
                raise MemoryError("int8 kernel: out of memory for the rows' int8 copy")
            return y                                                        # (..., out)
        return int8_linear(x, self.weight, self.scale, self.bias)

    def dynamic_q8(self, x):
        """Whether x @ W goes through gemm_q8: 1 to DYNAMIC_Q8_MAX_ROWS fp32 rows on the CPU,
        fp32 bias, the kernel built and chosen here (dynamic_q8_on)."""
        k = self.in_features
        return (x.device.type == "cpu" and x.dtype == torch.float32
                and k > 0 and 0 < x.numel() <= DYNAMIC_Q8_MAX_ROWS * k
                and (self.bias is None or self.bias.dtype == torch.float32)
                and not (x.requires_grad and torch.is_grad_enabled())
                and dynamic_q8_on(x.numel() // k))

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, int8 weights, one scale per output")


# ---------------------------------------------------------------------------------------
# Quantizing a model

def activation_dtype(device="cpu"):
    """The precision of an int8 model's activations on ``device``, the faster one measured.

    fp32 where one of our kernels runs (int8_kernel.c, or gemm_q8 for decoding): they read
    fp32 inputs as fast as bf16 ones, and on the CPU the rest of a decoding step is faster
    in fp32 (attention on the KV cache over 80 positions: 34 us a layer against 147 in bf16,
    Zen 4) and more exact. On a CPU without native bf16 products (AVX2) bf16 activations
    would also send every prompt through emulated bf16 matmuls: the 124M model's 256-token
    prompt took 1.29 s in bf16, 0.43 s in fp32 (Zen 4 built and run as an AVX2 CPU). bf16
    elsewhere, as PyTorch's int8 kernel wants it.
    """
    own = torch.device(device).type == "cpu" and (own_kernel_on() or dynamic_q8_on())
    return torch.float32 if own else torch.bfloat16


def quantize_(model, dtype=None):
    """Make ``model`` (a GPTModel) an int8 one, in place; returns it.

    Every block matrix and the output head become Int8Linear layers (their float matrices
    are freed); every other parameter and buffer becomes ``dtype``, the activations'
    precision (default: activation_dtype for the model's device). Quantize from the fp32
    weights (the scales are computed from them), on the device the model will run on. A
    second call changes nothing.
    """
    dtype = dtype or activation_dtype(model.tok_emb.weight.device)
    if not dtype.is_floating_point:
        raise ValueError(f"quantize_: the activations' dtype must be a float dtype, got {dtype}")
    if not all(hasattr(model, name) for name in ("trf_blocks", "out_head", "tok_emb")):
        raise ValueError("quantize_ expects a GPTModel (trf_blocks, out_head, tok_emb); got "
                         f"{type(model).__name__}")
    # (parent module, attribute name, layer, weight stored (in, out)?)
    targets = []
    for parent in model.trf_blocks.modules():
        for name, child in parent.named_children():
            w = getattr(child, "weight", None)
            if isinstance(w, torch.Tensor) and w.dim() == 2 and w.is_floating_point():
                targets.append((parent, name, child, not isinstance(child, nn.Linear)))
    head = model.out_head
    if not isinstance(head, Int8Linear):
        targets.append((model, "out_head", head, False))
    if getattr(head, "weight", None) is model.tok_emb.weight:
        # tied: the lookup keeps the matrix (as ``dtype``), the head gets an int8 copy
        model.tok_emb.weight = nn.Parameter(model.tok_emb.weight.detach().to(dtype),
                                            requires_grad=model.tok_emb.weight.requires_grad)
    for parent, name, layer, in_out in targets:
        setattr(parent, name, Int8Linear.from_float(layer, in_out, dtype))
    del targets, head          # the float matrices go with the last references to them
    for module in model.modules():
        if isinstance(module, Int8Linear):
            continue
        for name, p in module.named_parameters(recurse=False):
            if p.is_floating_point() and p.dtype != dtype:
                setattr(module, name, nn.Parameter(p.detach().to(dtype),
                                                   requires_grad=p.requires_grad))
        for name, b in module.named_buffers(recurse=False):
            if b is not None and b.is_floating_point() and b.dtype != dtype:
                setattr(module, name, b.to(dtype))
    return model


def is_quantized(model):
    """Whether ``model`` has int8 layers (quantize_ ran on it)."""
    return any(isinstance(m, Int8Linear) for m in model.modules())


def weight_bytes(model):
    """Bytes of the model's parameters and buffers, as stored (int8 matrices at 1 byte)."""
    seen, total = set(), 0
    for t in (*model.parameters(), *model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


# ---------------------------------------------------------------------------------------
# What engine/tuning.py times for the two choices: {candidate: one repeat}, the kernels
# replaced first, on GPT-2 124M's block matrices (working_set() bytes of int8 weights)

def _int8_block(rows, dtype):
    q = tuning.block_matrices(torch.int8, out_in=True)                      # (out, in) each
    scales = [torch.full((w.shape[0],), 2 ** -10, dtype=torch.bfloat16) for w in q]
    g = torch.Generator().manual_seed(3)
    xs = {r: {k: tuning.filled((r, k), dtype, g) for k in {w.shape[1] for w in q}}
          for r in rows}
    return q, scales, xs


def _time_own_kernel():
    # bf16 rows, 1 and 4 (decoding a batch): ours against what int8_linear takes without
    # it, _weight_int8pack_mm (or, where that cannot run, the bf16 matmul of the converted
    # weights)
    q, scales, xs = _int8_block((1, 4), torch.bfloat16)
    fn, op = own_kernel()[torch.bfloat16], _int8mm_op()

    def theirs(x, w, s):
        if op is not None and w.shape[1] % 16 == 0:
            return op(x, w, s)
        return _bf16_product(x, w, s)
    return {"PyTorch's int8 kernels": lambda: [theirs(xs[r][w.shape[1]], w, s)
                                               for w, s in zip(q, scales) for r in (1, 4)],
            "int8_kernel.c": lambda: [_own_linear(fn, xs[r][w.shape[1]], w, s, None)
                                      for w, s in zip(q, scales) for r in (1, 4)]}


def _time_bf16_rows():
    # 64 fp32 rows (a prompt) through one block of the 124M model: the dequantized fp32
    # product against the bf16 matmul (bound by the arithmetic, not the memory: one block)
    g = torch.Generator().manual_seed(4)
    q = [tuning.filled((o, i), torch.int8, g) for i, o in tuning.BLOCK_124M]   # (out, in)
    scales = [torch.full((w.shape[0],), 2 ** -10, dtype=torch.bfloat16) for w in q]
    xs = {k: tuning.filled((64, k), torch.float32, g) for k in {w.shape[1] for w in q}}
    return {"dequantized fp32": lambda: [plain_int8_linear(xs[w.shape[1]], w, s)
                                         for w, s in zip(q, scales)],
            "bf16 matmul": lambda: [_bf16_product(xs[w.shape[1]], w, s)
                                    for w, s in zip(q, scales)]}


def _time_dynamic_q8(rows=(1, 2)):
    # fp32 rows, 1 and 2 (decoding) or 8 (a batch): gemm_q8 against the weight-only product
    # int8_linear takes without it (int8_kernel.c where own_kernel_on, else the bf16 matmul
    # where bf16_rows_on, else the plain dequantized one)
    q, scales, xs = _int8_block(rows, torch.float32)
    q8 = q8_kernel()
    own_kernel_on(), bf16_rows_on()            # those choices made first, outside the timing

    def dynamic(x, w, s):
        y = torch.empty(x.shape[0], w.shape[0])
        q8(x.data_ptr(), w.data_ptr(), s.data_ptr(), None, y.data_ptr(), x.shape[0],
           w.shape[0], w.shape[1], torch.get_num_threads())
        return y
    return {"weight-only int8": lambda: [int8_linear(xs[r][w.shape[1]], w, s)
                                         for w, s in zip(q, scales) for r in rows],
            "gemm_q8": lambda: [dynamic(xs[r][w.shape[1]], w, s)
                                for w, s in zip(q, scales) for r in rows]}
