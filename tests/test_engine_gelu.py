"""gelu: GPT-2's GELU and its gradient by gelu_kernel.c while training on the CPU, against
float64 math, PyTorch's kernel (the plain path) and a whole training step."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import TINY_CFG, answered_clock, flag_in_a_fresh_process
from engine import gelu, native
from model import GPTModel


def _case(dtype, shape=(3, 1001), seed=0):
    # 1001 numbers a row: every vector width's tail; sizes up to ~12, where GELU bends
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 4
    x.view(-1)[:8] = torch.tensor([0.0, -0.0, 1e-30, -1e-30, 8.0, -8.0, 40.0, -40.0])
    return x.to(dtype), torch.randn(shape, generator=g).to(dtype)


def _float64(x, grad):
    xd = x.double().requires_grad_()
    y = F.gelu(xd, approximate="tanh")
    y.backward(grad.double())
    return y.detach(), xd.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_c_pass_equals_float64_math_and_pytorchs_kernel(dtype, kernel_build):
    # built for this CPU and as for an AVX2 one: fp32 within a few ulps of the true values,
    # bf16 rounded once from fp32 math (whose error shows where the gradient crosses 0)
    if gelu.kernel() is None:
        pytest.skip("gelu_kernel.c cannot be built here")
    x, grad = _case(dtype)
    want_y, want_dx = _float64(x, grad)
    y, dx = gelu.forward(x), gelu.backward(grad, x)
    assert y.dtype == dx.dtype == dtype and y.shape == dx.shape == x.shape
    theirs = (F.gelu(x, approximate="tanh"),
              torch.ops.aten.gelu_backward(grad, x, approximate="tanh"))
    for got, want, torch_got in ((y, want_y, theirs[0]), (dx, want_dx, theirs[1])):
        err = (got.double() - want).abs()
        if dtype == torch.float32:
            assert (err <= 4e-7 * want.abs() + 1e-7).all()
        else:
            assert (err <= 2**-8 * want.abs() + 1e-6).all()
        # PyTorch's fp32 gradient is off by up to ~3e-6 (1 - tanh^2 cancels near x = -5)
        torch.testing.assert_close(got, torch_got, rtol=2**-7 if dtype != torch.float32
                                   else 1e-5, atol=3e-6)
    # far below zero both are 0 to within 1e-20 (PyTorch's exactly)
    assert y[0, 7].abs() < 1e-20 and dx[0, 7].abs() < 1e-20 and (y[0, :2] == 0).all()


def test_a_nan_stays_a_nan_and_shapes_and_strides_do_not_matter(kernel_build):
    if gelu.kernel() is None:
        pytest.skip("gelu_kernel.c cannot be built here")
    x, grad = _case(torch.float32, shape=(2, 5, 37))
    x[1, 2, 3] = float("nan")
    y, dx = gelu.forward(x), gelu.backward(grad, x)
    assert torch.isnan(y[1, 2, 3]) and torch.isnan(dx[1, 2, 3])
    assert torch.isnan(y).sum() == 1 and torch.isnan(dx).sum() == 1
    xt = x.transpose(1, 2)                                        # not contiguous
    torch.testing.assert_close(gelu.forward(xt), y.transpose(1, 2), equal_nan=True)


def _step(model, idx, dtype):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
        loss = model(idx, targets=idx.roll(-1, dims=1))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_a_training_step_takes_the_c_pass_with_pytorchs_gradients(monkeypatch, dtype):
    # C_PASS True (the tests' default: conftest) takes gelu_kernel.c forward and backward
    # in every block's MLP, in fp32 and under bf16 autocast (bf16 numbers); the step's loss
    # and gradients as with PyTorch's GELU (the one switch off)
    if gelu.kernel() is None:
        pytest.skip("gelu_kernel.c cannot be built here")
    calls = []
    for name in ("forward", "backward"):
        real = getattr(gelu, name)
        monkeypatch.setattr(gelu, name, lambda *a, real=real, name=name:
                            calls.append((name, a[-1].dtype)) or real(*a))
    torch.manual_seed(0)
    model = GPTModel({**TINY_CFG, "drop_rate": 0.0}).train()
    assert isinstance(model.trf_blocks[0].ff.gelu, nn.GELU)     # the decoder checks it so
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, TINY_CFG["vocab_size"], (2, 12), generator=g)
    loss, grads = _step(model, idx, dtype)
    want = torch.bfloat16 if dtype == "bf16" else torch.float32
    layers = TINY_CFG["n_layers"]
    assert calls == [("forward", want)] * layers + [("backward", want)] * layers
    with gelu.disabled():
        ref_loss, ref_grads = _step(model, idx, dtype)
    assert len(calls) == 2 * layers
    tol = dict(rtol=2e-2, atol=1e-4) if dtype == "bf16" else dict(rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(loss, ref_loss, **tol)
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], msg=name, **tol)


def test_without_a_gradient_or_off_the_cpu_pytorchs_kernel_runs(monkeypatch):
    # inference (evaluation, generation) keeps PyTorch's numbers exactly; fp16, another
    # device, C_PASS False or no kernel: PyTorch's too
    module = gelu.GELU(approximate="tanh")
    x = torch.randn(4, 300) * 3
    called = []
    monkeypatch.setattr(gelu, "forward", lambda t: called.append(t) or t)
    with torch.no_grad():
        assert torch.equal(module(x), F.gelu(x, approximate="tanh"))
    assert torch.equal(gelu.GELU()(x.requires_grad_()), F.gelu(x, approximate="none"))
    assert not called
    module(x)                                          # recording a gradient: the C pass
    assert len(called) == 1 or gelu.kernel() is None
    assert not gelu.c_pass(x.half())
    assert not gelu.c_pass(torch.empty(3, device="meta"))
    monkeypatch.setattr(gelu, "C_PASS", False)
    assert not gelu.c_pass(x)
    monkeypatch.setattr(gelu, "C_PASS", True)
    monkeypatch.setattr(native, "_GELU", RuntimeError("no C compiler"))
    assert gelu.kernel() is None and not gelu.c_pass(x)


def test_the_clock_decides_per_dtype(measuring, monkeypatch, capsys):
    # C_PASS None: the clock's pick, named by dtype and the shape it times, both candidates
    # running; PyTorch's kept where the C pass wins by less than tuning's margin
    if gelu.kernel() is None:
        pytest.skip("gelu_kernel.c cannot be built here")
    monkeypatch.setattr(gelu, "C_PASS", None)
    monkeypatch.setattr(gelu, "TIMED", (8, 96))               # small: the test stays quick
    times = {gelu.TORCH_GELU: 1.0, gelu.C_PASS_LABEL: 0.4}
    asked = answered_clock(monkeypatch, times, run=True)
    assert gelu.c_pass(torch.ones(2, dtype=torch.bfloat16))
    assert asked == ["training GELU (bf16, 8 x 96)"]
    said = capsys.readouterr().err
    assert "training GELU (bf16, 8 x 96): one C pass, 2.50x PyTorch's GELU" in said
    times[gelu.C_PASS_LABEL] = 0.99
    assert not gelu.c_pass(torch.ones(2))
    assert asked[-1] == "training GELU (fp32, 8 x 96)"
    assert "one C pass 1.01x of its speed; need 1.03x" in capsys.readouterr().err


def test_the_switch_is_read_when_python_starts():
    assert flag_in_a_fresh_process("gelu", "ENABLED", GPT2_FAST_GELU="0") == "False"
    assert flag_in_a_fresh_process("gelu", "ENABLED") == "True"
