"""GPT-2's GELU while training on the CPU: the activation and its gradient in one C pass each.

model.py's MLP applies the tanh form of GELU that GPT-2 was trained with,

    gelu(x) = 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3))),

through ``GELU``: nn.GELU itself (the same module, no weights), whose forward pass takes
engine/gelu_kernel.c while a gradient is being recorded on the CPU (training, fine-tuning).
The kernel writes 1 + tanh(u) as 2 / (1 + e^(-2u)), so each number costs one e^x where
PyTorch's CPU kernel computes a tanh, and its backward pass one more; bf16 numbers are
widened, computed in fp32 and rounded once, as PyTorch does. On a Zen 4 (124M's MLP,
1024 x 3072 numbers, 2 threads): bf16 forward 2.9-3.4x, backward 2.1-2.5x (3.1-3.5 ms each
in PyTorch), ~40 ms of a 2.7 s training step; seen as an AVX2 CPU 3.1-4.1x and 2.6-2.8x
(bench/README.md). Inference (no gradient recorded) keeps PyTorch's kernel, so that
evaluation and generation give the numbers they always gave.

The clock (engine/tuning.py) takes the C pass where it beats PyTorch's kernel on 124M's
MLP (``C_PASS``: None, or True / False to force it). One switch: ``gelu.ENABLED = False``
(or ``GPT2_FAST_GELU=0`` before Python starts), or ``with gelu.disabled():``; the tests
compare both paths.
"""

import os
import sys

import torch
import torch.nn as nn
from torch.autograd.function import once_differentiable

from engine import native, tuning, turned_off

ENABLED = os.environ.get("GPT2_FAST_GELU", "1") != "0"   # the switch
# gelu_kernel.c (True), PyTorch's kernel (False), or where the kernel beats it here (None:
# the clock, engine/tuning.py)
C_PASS = None
TORCH_GELU, C_PASS_LABEL = "PyTorch's GELU", "one C pass"


def disabled():
    """Within this block GELU runs PyTorch's kernel."""
    return turned_off(sys.modules[__name__])


def kernel():
    """gelu_kernel.c loaded, or None where it cannot be built here."""
    return native.optional(native.gelu_kernels)


class GELU(nn.GELU):
    """nn.GELU; with approximate="tanh" and a gradient being recorded on the CPU (fp32 or
    bf16), computed by gelu_kernel.c where it runs faster here (see the module)."""

    def forward(self, x):
        if (self.approximate != "tanh" or not torch.is_grad_enabled()
                or torch.compiler.is_compiling() or not c_pass(x)):
            return super().forward(x)
        return _TanhGELU.apply(x)


def c_pass(x):
    """Whether GELU of ``x`` can and should go through gelu_kernel.c here."""
    if (not ENABLED or C_PASS is False or type(x) not in (torch.Tensor, nn.Parameter)
            or x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16)
            or kernel() is None):
        return False
    kind = "bf16" if x.dtype == torch.bfloat16 else "fp32"
    rows, hidden = TIMED
    return tuning.switch(C_PASS, f"training GELU ({kind}, {rows} x {hidden})",
                         lambda: _candidates(x.dtype), TORCH_GELU, C_PASS_LABEL)


TIMED = (1024, tuning.BLOCK_124M[2][1])     # the clock's shape: 124M's MLP at context 1024


def _candidates(dtype):
    # forward and backward of TIMED numbers, each way
    g = torch.Generator().manual_seed(0)
    x, grad = (tuning.filled(TIMED, dtype, g) * 40 for _ in range(2))

    def plain():
        torch.ops.aten.gelu_backward(grad, x, approximate="tanh")
        return torch.ops.aten.gelu(x, approximate="tanh")
    return {TORCH_GELU: plain, C_PASS_LABEL: lambda: (backward(grad, x), forward(x))}


def forward(x):
    """gelu(x) by gelu_kernel.c: x fp32 or bf16 on the CPU, any shape."""
    x = x.contiguous()
    y = torch.empty_like(x)
    kernel().gelu_tanh(x.data_ptr(), y.data_ptr(), int(x.dtype == torch.bfloat16), x.numel())
    return y


def backward(grad, x):
    """grad * gelu'(x) by gelu_kernel.c (grad in x's dtype and shape)."""
    grad, x = grad.contiguous(), x.contiguous()
    dx = torch.empty_like(x)
    kernel().gelu_tanh_backward(grad.data_ptr(), x.data_ptr(), dx.data_ptr(),
                                int(x.dtype == torch.bfloat16), x.numel())
    return dx


class _TanhGELU(torch.autograd.Function):
    """gelu(x) with its own gradient, both in C; keeps x for backward, as PyTorch's does."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return forward(x)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, = ctx.saved_tensors
        return backward(grad.to(x.dtype), x)
