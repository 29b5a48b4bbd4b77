"""engine/attention.py: training attention in blocks of queries, its softmax and dropout in C,
against the plain math in float64 under the same dropout mask, and the mask itself."""

import math

import pytest
import torch

from conftest import answered_clock, flag_in_a_fresh_process
from engine import attention, cpu_kernels, native

needs_kernel = pytest.mark.skipif(attention.kernel() is None,
                                  reason="attention_kernel.c cannot be built here")
M32 = 0xFFFFFFFF


def _mix32(x):
    """attention_kernel.c's mixer, written again in int64 arithmetic (the reference)."""
    x = x & M32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & M32
    return x ^ (x >> 16)


def reference_keep(seed, mats, rows, cols, row0=0, mat_rows=None, p=0.1):
    """(mats, rows, cols) bool: which attention weights the kernel keeps, by its definition
    (hash of seed, row, column >= p * 2^32), in plain PyTorch."""
    mat_rows = rows if mat_rows is None else mat_rows
    row = (torch.arange(mats)[:, None] * mat_rows + row0 + torch.arange(rows)[None, :])
    key = _mix32((seed & M32) ^ _mix32((row & M32) ^ _mix32((row >> 32) ^ (seed >> 32))))
    h = _mix32(key[..., None] + torch.arange(cols) * 0x9E3779B9)
    return h >= min(round(p * 2**32), M32)


def reference_attention(q, k, v, keep, p):
    """softmax(q k^T / sqrt(D), causal) v in float64, the weights times keep / (1 - p)."""
    B, H, T, D = q.shape
    scores = q.double() @ k.double().transpose(-2, -1) / math.sqrt(D)
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    weights = torch.softmax(scores, dim=-1) * keep.view(B, H, T, T) / (1 - p)
    return weights @ v.double()


def _qkv(B=2, H=3, T=21, D=16, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, T, D, generator=g).to(dtype).requires_grad_() for _ in range(3)]


@needs_kernel
@pytest.mark.parametrize("dtype", ["fp32", "bf16", "autocast"])
@pytest.mark.parametrize("p", [0.0, 0.1, 0.5])
@pytest.mark.parametrize("bf16_in_fp32", [False, True])
def test_blocked_attention_equals_the_plain_math_under_the_same_mask(monkeypatch, dtype, p,
                                                                     bf16_in_fp32, kernel_build):
    # 21 queries in blocks of 8 (the last one short): every block's causal edge, the mask
    # of each row by its number in the whole matrix, the gradients of q, k and v; with the
    # kernel built for this CPU and (on an AVX-512 one) as for an AVX2 CPU; bf16 products
    # by PyTorch's bf16 matmul or, as where the CPU has none, in fp32 (cpu_kernels)
    monkeypatch.setattr(attention, "BLOCK", 8)
    monkeypatch.setattr(cpu_kernels, "BF16_IN_FP32", bf16_in_fp32)
    taken = []
    in_fp32 = cpu_kernels.matmul_in_fp32
    monkeypatch.setattr(cpu_kernels, "matmul_in_fp32", lambda *a: taken.append(1) or in_fp32(*a))
    tensors = _qkv(dtype=torch.bfloat16 if dtype == "bf16" else torch.float32)
    grad = torch.randn(2, 3, 21, 16, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(5)
    seed = attention.draw_seed() if p > 0 else 0
    torch.manual_seed(5)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "autocast"):
        y = attention.causal(*tensors, p)
    assert y is not None and y.shape == (2, 3, 21, 16)
    assert y.dtype == (torch.float32 if dtype == "fp32" else torch.bfloat16)
    y.backward(grad.to(y.dtype))
    # the reference takes the inputs as the products saw them (bf16 under autocast)
    exact = [t.detach().to(y.dtype).double().requires_grad_() for t in tensors]
    keep = reference_keep(seed, 6, 21, 21, p=p)
    ref = reference_attention(*exact, keep, p)
    ref.backward(grad.double())
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == "fp32" else dict(rtol=0.03, atol=0.03)
    torch.testing.assert_close(y.double(), ref, **tol)
    for t, r in zip(tensors, exact):
        torch.testing.assert_close(t.grad.double(), r.grad, **tol)
    # 2 products a block forward, 5 backward (the scores again, then the gradients)
    assert len(taken) == (21 if bf16_in_fp32 and dtype != "fp32" else 0)
    if p == 0.5:            # a wrong mask is far off: the comparison can tell
        other = reference_attention(*exact, reference_keep(seed + 1, 6, 21, 21, p=p), p)
        assert (other - y.double()).abs().max() > 0.2


@needs_kernel
def test_the_mask_drops_each_weight_with_probability_p_and_repeats_from_its_seed(
        kernel_build):
    # the kernel's mask (weights of 1 / n in a row of n keys: kept ones become
    # 1 / (n (1 - p))) against its definition, then its rates
    lib = attention.kernel()
    mats, rows, cols, p = 12, 256, 1024, 0.1
    scores = torch.zeros(mats, rows, cols)
    seed = 2**40 + 12345                     # both halves of the 64-bit seed matter
    out, lse = torch.empty_like(scores), torch.empty(mats, rows)
    row0 = cols - rows                       # the last block: every row sees 769..1024 keys
    args = attention._geometry(scores, p, seed, row0, 0, cols, 1.0)
    assert lib.softmax_dropout(scores.data_ptr(), lse.data_ptr(), out.data_ptr(), *args) == 0
    seen = torch.arange(cols)[None, :] <= (row0 + torch.arange(rows))[:, None]
    keep = out > 0
    assert torch.equal(keep, reference_keep(seed, mats, rows, cols, row0, cols, p) & seen)
    n = seen.sum(-1).double()
    torch.testing.assert_close(out.sum(-1).double(), keep.sum(-1) / (n * (1 - p)), rtol=1e-5,
                               atol=0)
    torch.testing.assert_close(lse.double(), n.log().expand(mats, rows), rtol=0, atol=1e-6)
    # rates: overall within 5 standard deviations; no row or key position far off
    total = seen.sum().item() * mats
    dropped = 1 - keep.sum().item() / total
    assert abs(dropped - p) < 5 * math.sqrt(p * (1 - p) / total)
    per_row = 1 - keep.sum(-1).double() / n
    assert per_row.mean().sub(p).abs() < 0.002 and per_row.std() < 0.02
    per_column = 1 - keep[:, :, :row0 + 1].double().mean(dim=(0, 1))
    assert per_column.sub(p).abs().max() < 0.05
    # another seed: another mask; neighbouring rows and matrices: unrelated masks
    other = reference_keep(seed + 1, mats, rows, cols, row0, cols, p)
    assert (other != reference_keep(seed, mats, rows, cols, row0, cols, p)).double().mean() > 0.15
    assert (keep[:, 1:] != keep[:, :-1])[:, :, :row0].double().mean() > 0.15
    assert (keep[1:] != keep[:-1])[:, :, :row0].double().mean() > 0.15


@needs_kernel
def test_seeded_runs_repeat_their_masks_whatever_the_blocks(monkeypatch):
    q, k, v = _qkv(T=40)
    outs = []
    for block in (256, 7, 40):
        monkeypatch.setattr(attention, "BLOCK", block)
        torch.manual_seed(3)
        outs.append(attention.causal(q, k, v, 0.2))
    torch.manual_seed(3)
    attention.causal(q, k, v, 0.2)
    assert not torch.equal(attention.causal(q, k, v, 0.2), outs[0])   # the next draw
    for y in outs[1:]:
        torch.testing.assert_close(y, outs[0], rtol=1e-6, atol=1e-6)


@needs_kernel
def test_where_the_blocked_path_stands_aside(monkeypatch):
    q, k, v = _qkv()
    assert attention.causal(q, k, v, 0.1) is not None
    with torch.no_grad():
        assert attention.causal(q, k, v, 0.0) is None             # evaluation, prompts
        assert attention.causal(q, k, v, 0.1) is not None         # dropout asked for
    frozen = [t.detach() for t in (q, k, v)]
    assert attention.causal(*frozen, 0.0) is None                 # nothing to train
    mask = torch.ones(21, 21, dtype=torch.bool).tril()
    assert attention.causal(q, k, v, 0.1, mask) is None           # padding masks: PyTorch
    longer = torch.randn(2, 3, 30, 16)                            # keys from a cache
    assert attention.causal(q, longer, longer, 0.1) is None
    assert attention.causal(*(t[:, :, :1] for t in (q, k, v)), 0.1) is None
    half = [t.detach().half().requires_grad_() for t in (q, k, v)]
    assert attention.causal(*half, 0.1) is None
    with attention.disabled():
        assert attention.causal(q, k, v, 0.1) is None
    monkeypatch.setattr(attention, "BLOCKED", False)
    assert attention.causal(q, k, v, 0.1) is None
    monkeypatch.setattr(attention, "BLOCKED", True)
    monkeypatch.setattr(native, "_ATTENTION", RuntimeError("no C compiler"))
    assert attention.kernel() is None and attention.causal(q, k, v, 0.1) is None


@needs_kernel
def test_training_steps_of_the_model_take_it_and_match_the_plain_attention(monkeypatch):
    # no dropout: a training step's loss and every gradient as with PyTorch's attention;
    # with dropout: model.py calls it in every layer, and the run repeats from its seed
    from model import GPTModel
    cfg = {"vocab_size": 97, "context_length": 24, "emb_dim": 32, "n_heads": 4,
           "n_layers": 2, "drop_rate": 0.0, "qkv_bias": True}
    torch.manual_seed(0)
    model = GPTModel(cfg).train()
    x = torch.randint(0, 97, (3, 24), generator=torch.Generator().manual_seed(2))
    calls = []
    blocked = attention.blocked
    monkeypatch.setattr(attention, "blocked", lambda *a: calls.append(a[3]) or blocked(*a))

    def step():
        model.zero_grad()
        loss = model(x[:, :-1], targets=x[:, 1:])
        loss.backward()
        return loss.item(), [p.grad.clone() for p in model.parameters()]
    loss, grads = step()
    assert calls == [0.0, 0.0]
    with attention.disabled():
        plain_loss, plain_grads = step()
    assert calls == [0.0, 0.0]
    assert loss == pytest.approx(plain_loss, rel=1e-6)
    for g, r in zip(grads, plain_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)
    for block in model.trf_blocks:
        block.att.dropout = 0.1
    torch.manual_seed(7)
    first, _ = step()
    torch.manual_seed(7)
    again, _ = step()
    assert calls[2:] == [0.1] * 4 and first == again != loss


def test_the_clock_decides_per_dtype_shape_and_dropout_and_leaves_the_generator_alone(
        measuring, monkeypatch, capsys):
    # the decision's name, its two candidates really running (gradients on, under tuning's
    # inference mode), and PyTorch's generator as it was: measuring draws no run's masks;
    # with or without dropout the blocks are taken where they win by tuning's margin
    monkeypatch.setattr(attention, "BLOCKED", None)
    times = {attention.PLAIN: 1.0, attention.OURS: 0.6}
    asked = answered_clock(monkeypatch, times, run=True)
    state = torch.get_rng_state()
    assert attention.blocked_wins((2, 3, 21, 16), torch.bfloat16, 0.1)      # 1.67x
    assert attention.blocked_wins((2, 3, 21, 16), torch.float32, 0.0)
    assert torch.equal(torch.get_rng_state(), state)
    assert asked == ["training attention (bf16, dropout, 3 heads x 21 x 16, batch 2)",
                     "training attention (fp32, no dropout, 3 heads x 21 x 16, batch 2)"]
    said = capsys.readouterr().err
    assert "(bf16, dropout, 3 heads x 21 x 16, batch 2): blocks, C softmax, 1.67x" in said
    assert "(fp32, no dropout, 3 heads x 21 x 16, batch 2): blocks, C softmax, 1.67x" in said
    times[attention.OURS] = 0.99                               # within the margin: PyTorch's
    assert not attention.blocked_wins((2, 3, 21, 16), torch.bfloat16, 0.0)
    assert "blocks, C softmax 1.01x of its speed; need 1.03x" in capsys.readouterr().err
    monkeypatch.setattr(attention, "BLOCKED", True)           # a flag wins over the clock
    assert attention.blocked_wins((2, 3, 21, 16), torch.float32, 0.0)


def test_the_switches_read_from_the_environment():
    assert flag_in_a_fresh_process("attention", "ENABLED", GPT2_FAST_ATTENTION="0") == "False"
    assert flag_in_a_fresh_process("attention", "BLOCKED", GPT2_FAST_ATTENTION="1") == "True"
    assert flag_in_a_fresh_process("attention", "BLOCKED") == "None"


@needs_kernel
def test_recomputed_activations_draw_the_same_masks():
    # activation checkpointing runs each block's forward again in backward: the seed drawn
    # again from the restored generator gives the same masks, so the same gradients
    import copy

    from engine.devices import recompute_activations
    from model import GPTModel
    torch.manual_seed(0)
    model = GPTModel({"vocab_size": 97, "context_length": 24, "emb_dim": 32, "n_heads": 4,
                      "n_layers": 2, "drop_rate": 0.2, "qkv_bias": True}).train()
    again = recompute_activations(copy.deepcopy(model))
    x = torch.randint(0, 97, (3, 24), generator=torch.Generator().manual_seed(2))
    grads = []
    for m in (model, again):
        torch.manual_seed(11)
        m(x[:, :-1], targets=x[:, 1:]).backward()
        grads.append([p.grad for p in m.parameters()])
    for g, r in zip(*grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-7)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_models_other_dropouts_keep_by_the_same_hash(dtype):
    # attention.Dropout (model.py's embedding and residual dropouts): rows of the last
    # dimension, each element kept by its definition, scaled by 1 / (1 - p); the gradient
    # through the same mask; an nn.Dropout in every other respect
    from model_sources import set_dropout
    drop = attention.Dropout(0.25).train()
    assert isinstance(drop, torch.nn.Dropout)
    x = torch.randn(3, 70, 300, generator=torch.Generator().manual_seed(4)).to(dtype)
    x.requires_grad_()
    torch.manual_seed(8)
    seed = attention.draw_seed()
    torch.manual_seed(8)
    y = drop(x)
    keep = reference_keep(seed, 1, 210, 300, p=0.25).view(3, 70, 300)
    factor = keep * torch.tensor(1 / 0.75)             # fp32, as the kernel multiplies
    torch.testing.assert_close(y, (x.detach().float() * factor).to(dtype), rtol=0, atol=0)
    y.backward(torch.ones_like(y))
    torch.testing.assert_close(x.grad, factor.to(dtype), rtol=0, atol=0)
    assert abs((~keep).double().mean().item() - 0.25) < 0.01
    assert torch.equal(drop.eval()(x), x)
    from model import GPTModel
    model = set_dropout(GPTModel({"vocab_size": 97, "context_length": 8, "emb_dim": 16,
                                  "n_heads": 2, "n_layers": 1, "drop_rate": 0.1,
                                  "qkv_bias": True}), 0.3)
    assert [m.p for m in model.modules() if isinstance(m, attention.Dropout)] == [0.3, 0.3]
    half = x.detach().half()                  # not fp32 or bf16: nn.Dropout's own draws
    assert drop.train()(half).eq(0).any()
