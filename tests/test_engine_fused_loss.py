"""fused_loss: the head and cross-entropy a chunk of rows at a time, against the plain code
(logits, then F.cross_entropy) and against GPT2LMHeadModel's loss and gradients."""

import pytest
import torch
import torch.nn.functional as F

from conftest import answered_clock, cfg_from_hf, make_hf_model
from engine import cpu_kernels, devices, fused_loss, native, tuning
from engine.gpt2_params import gpt2_param_names
from model import GPTModel
from train_utils import calc_loss_batch


def _batch(vocab, B=3, T=20, seed=5):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, vocab, (B, T), generator=g),
            torch.randint(0, vocab, (B, T), generator=g))


def _loss_and_grads(model, idx, targets, fused, scale=1.0, dtype=None):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
        if fused:
            loss = model(idx, targets=targets)
        else:
            with fused_loss.disabled():
                loss = model(idx, targets=targets)
    (loss * scale).backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("kernels", [True, False])
@pytest.mark.parametrize("chunk_rows", [8, 1000])
def test_loss_and_gradients_match_hugging_face(monkeypatch, kernels, chunk_rows):
    # The training step's loss (GPTModel.forward with targets) and every gradient, tied
    # head included, as GPT2LMHeadModel's: in one chunk and in chunks of 8 rows (60 rows
    # here: 8 chunks, the last one short); with cpu_kernels on, the chunks' products go
    # through oneDNN where it applies
    from download_weights_hf import load_weights_into_gpt

    monkeypatch.setattr(cpu_kernels, "ENABLED", kernels)
    # with the weight's gradient a chunk is 4x CHUNK_ELEMENTS // vocab rows
    monkeypatch.setattr(fused_loss, "CHUNK_ELEMENTS", 211 * chunk_rows // 4)
    hf = make_hf_model()
    ours = GPTModel(cfg_from_hf(hf))
    load_weights_into_gpt(ours, hf)
    idx, targets = _batch(211)
    loss, grads = _loss_and_grads(ours, idx, targets, fused=True)
    ref = hf(input_ids=idx, labels=None).logits
    ref_loss = F.cross_entropy(ref.flatten(0, 1), targets.flatten())
    ref_loss.backward()
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-6)
    hf_params = dict(hf.transformer.named_parameters())
    for row in gpt2_param_names(3):
        torch.testing.assert_close(grads[row.ours], hf_params[row.hf].grad, atol=1e-6,
                                   rtol=1e-4, msg=row.ours)


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_fused_equals_plain_loss_and_gradients(tiny_cfg, monkeypatch, tie, dtype):
    # several chunks (40 rows of 50257 logits, 9 rows a chunk without the weight gradient,
    # 72 with it), a loss scaled as gradient accumulation scales it; untied, the head's own
    # weight gets its gradient. bf16 autocast multiplies in bf16 as the plain head does: both
    # then stand as far from the fp32 gradients, ~1% of each one's largest entry
    monkeypatch.setattr(fused_loss, "CHUNK_ELEMENTS", 50257 * 9)
    torch.manual_seed(0)
    model = GPTModel({**tiny_cfg, "tie_embeddings": tie}).train()
    idx, targets = _batch(50257, B=2, T=20)
    loss, grads = _loss_and_grads(model, idx, targets, fused=True, scale=0.3, dtype=dtype)
    ref_loss, ref_grads = _loss_and_grads(model, idx, targets, fused=False, scale=0.3)
    assert set(grads) == set(ref_grads)
    if dtype == "fp32":
        torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-5)
        for name in grads:
            torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-6, rtol=1e-4,
                                       msg=name)
        return
    plain_loss, plain_grads = _loss_and_grads(model, idx, targets, fused=False, scale=0.3,
                                              dtype="bf16")
    torch.testing.assert_close(loss, ref_loss, atol=0, rtol=1e-3)
    torch.testing.assert_close(loss, plain_loss, atol=0, rtol=1e-3)
    for name in grads:
        scale = ref_grads[name].abs().max()
        for got in (grads[name], plain_grads[name]):
            assert (got - ref_grads[name]).abs().max() <= 0.02 * scale, name


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_the_heads_weight_gradient_in_blocks_equals_one_product(tiny_cfg, monkeypatch, dtype):
    # SPLIT True (the tests' default: conftest) makes the head's weight gradient in blocks of
    # SPLIT_ROWS of its rows in bf16 where oneDNN has bf16 products (here 11, the last short,
    # in each of 3 chunks of rows that add into it), never in fp32; the gradients as from
    # one product (SPLIT False)
    monkeypatch.setattr(fused_loss, "CHUNK_ELEMENTS", 50257 * 2)       # 16 rows a chunk
    monkeypatch.setattr(fused_loss, "SPLIT_ROWS", 5000)
    firsts, real = [], fused_loss._mm
    monkeypatch.setattr(fused_loss, "_mm", lambda a, b: firsts.append(a.shape[0]) or real(a, b))
    torch.manual_seed(0)
    model = GPTModel(tiny_cfg).train()
    idx, targets = _batch(50257, B=2, T=20)
    loss, grads = _loss_and_grads(model, idx, targets, fused=True, dtype=dtype)
    blocks = [n for n in firsts if n in (5000, 50257 % 5000)]
    split = dtype == "bf16" and devices.onednn_bf16()       # bf16 products in oneDNN
    assert len(blocks) == (33 if split else 0)
    assert (50257 in firsts) == (not split)                        # one whole product
    monkeypatch.setattr(fused_loss, "SPLIT", False)
    ref_loss, ref_grads = _loss_and_grads(model, idx, targets, fused=True, dtype=dtype)
    assert torch.equal(loss, ref_loss)
    head = next(n for n, p in model.named_parameters() if p is model.out_head.weight)
    for name in grads:
        if name != head:
            assert torch.equal(grads[name], ref_grads[name]), name
    # each block's entries are the same sums, rounded to bf16 as one product rounds them (up
    # to the order of the sums: Arm's bf16 products round partial sums too)
    ref_head = ref_grads[head]
    torch.testing.assert_close(grads[head], ref_head, rtol=2**-7,
                               atol=2**-7 * ref_head.abs().max())


def test_the_clock_times_the_heads_weight_gradient_both_ways(measuring, monkeypatch):
    # SPLIT None: the clock's pick, by the decision's name; its two candidates make the same
    # gradient (124M's head, 256 rows); fp32, another device: one product, nothing timed
    monkeypatch.setattr(fused_loss, "SPLIT", None)
    asked = answered_clock(monkeypatch, {fused_loss.WHOLE_LABEL: 1.0,
                                         fused_loss.SPLIT_LABEL: 0.8})
    if not devices.onednn_bf16():
        assert not fused_loss.split_products(torch.empty(0, dtype=torch.bfloat16))
        pytest.skip("no bf16 products in oneDNN here: one product, nothing timed")
    assert fused_loss.split_products(torch.empty(0, dtype=torch.bfloat16))
    (name,) = asked
    assert name == "training head's weight gradient (bf16, 256 x 50257 x 768)"
    made = tuning.SEEN[name][0]()                                  # its candidates
    whole, split = made[fused_loss.WHOLE_LABEL](), made[fused_loss.SPLIT_LABEL]()
    assert whole.dtype == split.dtype == torch.float32 and whole.shape == (50257, 768)
    torch.testing.assert_close(split, whole, rtol=2**-7, atol=2**-7 * whole.abs().max())
    assert not fused_loss.split_products(torch.empty(0))
    assert not fused_loss.split_products(torch.empty(0, dtype=torch.bfloat16, device="meta"))
    assert len(asked) == 1


def test_frozen_head_gets_no_gradient_and_hidden_states_do(tiny_cfg):
    # LoRA's case: the head (tied embedding) frozen; the loss still trains what is below it
    torch.manual_seed(0)
    model = GPTModel({**tiny_cfg, "tie_embeddings": True}).train()
    model.tok_emb.weight.requires_grad_(False)
    idx, targets = _batch(50257, B=2, T=16)
    model(idx, targets=targets).backward()
    assert model.tok_emb.weight.grad is None
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    with fused_loss.disabled():
        loss = model(idx, targets=targets)
    loss.backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(grads[name], p.grad, atol=1e-6, rtol=1e-4, msg=name)


def test_ignored_targets_and_evaluation():
    torch.manual_seed(1)
    h = torch.randn(2, 5, 16)
    w = torch.randn(300, 16)
    targets = torch.randint(0, 300, (2, 5))
    targets[0, 1] = targets[1, 4] = fused_loss.IGNORE_INDEX
    with torch.no_grad():       # evaluation: no gradients worked out, same number
        got = fused_loss.head_cross_entropy(h, w, targets)
    want = F.cross_entropy((h @ w.t()).flatten(0, 1), targets.flatten())
    torch.testing.assert_close(got, want)
    nothing = torch.full((2, 5), fused_loss.IGNORE_INDEX)
    assert torch.isnan(fused_loss.head_cross_entropy(h, w, nothing))
    assert torch.isnan(F.cross_entropy((h @ w.t()).flatten(0, 1), nothing.flatten()))
    with pytest.raises(ValueError, match=r"targets \(2, 4\) do not match the hidden states "
                                         r"\(2, 5, 16\): one target id per position"):
        fused_loss.head_cross_entropy(h, w, targets[:, :4])


def test_backward_twice_and_double_backward_are_refused():
    h = torch.randn(4, 8, requires_grad=True)
    w = torch.randn(50, 8, requires_grad=True)
    t = torch.randint(0, 50, (4,))
    loss = fused_loss.head_cross_entropy(h, w, t)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice through the same loss"):
        loss.backward()
    # a second derivative is an error, not a silent zero (the gradients are constants here)
    loss = fused_loss.head_cross_entropy(h, w, t)
    (gh,) = torch.autograd.grad(loss, h, create_graph=True)
    with pytest.raises(RuntimeError, match="does not require grad"):
        gh.sum().backward()


def test_switched_off_and_compiling_run_the_plain_code(monkeypatch):
    h, w, t = torch.randn(3, 8), torch.randn(20, 8), torch.randint(0, 20, (3,))
    with fused_loss.disabled():
        assert fused_loss.head_cross_entropy(h, w, t) is None
    assert fused_loss.head_cross_entropy(h, w, t) is not None
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert fused_loss.head_cross_entropy(h, w, t) is None


def test_calc_loss_batch_takes_the_fused_path_only_for_our_model(tiny_cfg, monkeypatch):
    # our GPTModel: model(inputs, targets=...) (fused); any other model: logits, then the loss
    calls = []
    real = fused_loss._HeadCrossEntropy.apply
    monkeypatch.setattr(fused_loss._HeadCrossEntropy, "apply",
                        lambda *a: calls.append(a[0].shape) or real(*a))
    torch.manual_seed(0)
    model = GPTModel(tiny_cfg).train()
    idx, targets = _batch(50257, B=2, T=8)
    calc_loss_batch(idx, targets, model, "cpu")
    assert calls == [torch.Size([16, 32])]

    class Logits(torch.nn.Module):      # a model that only knows forward(idx)
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, idx):
            return self.inner(idx)

    other = calc_loss_batch(idx, targets, Logits(), "cpu")
    with fused_loss.disabled():
        plain = calc_loss_batch(idx, targets, model, "cpu")
    assert len(calls) == 1
    torch.testing.assert_close(other, plain)


def _rows_case(dtype, seed=3):
    # 37 rows of 1001 logits (no multiple of a vector's width), spreads from 0.1 to 8, one row
    # around 300 (the max must be taken out before exp), 5 rows not scored
    g = torch.Generator().manual_seed(seed)
    rows, vocab = 37, 1001
    logits = torch.randn(rows, vocab, generator=g) * torch.linspace(0.1, 8, rows)[:, None]
    logits[3] += 300
    targets = torch.randint(0, vocab, (rows,), generator=g)
    ok = torch.ones(rows, dtype=torch.bool)
    ok[[0, 7, 8, 20, 36]] = False
    return logits.to(dtype), targets, ok


@pytest.mark.parametrize("grad", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loss_rows_in_c_equal_float64_math_and_pytorchs_ops(dtype, grad, kernel_build):
    # loss_kernel.c's one pass a row against the element-wise ops it replaces and against
    # float64 math on the same logits, built for this CPU and as for an AVX2 one
    if fused_loss.kernel() is None:
        pytest.skip("loss_kernel.c cannot be built here")
    logits, targets, ok = _rows_case(dtype)
    count = int(ok.sum())
    x = logits.double()
    lse = torch.logsumexp(x, dim=1)
    want_loss = ((lse - x.gather(1, targets[:, None]).squeeze(1)) * ok).sum()
    want_grad = (torch.softmax(x, dim=1)
                 - F.one_hot(targets, x.shape[1]).double()) * (ok[:, None] / count)
    torch_loss, torch_grad = fused_loss._rows_in_torch(logits.clone(), targets, ok, count, grad)
    c_loss, c_grad = fused_loss._rows_in_c(logits.clone(), targets, ok, count, grad)
    for loss in (torch_loss, c_loss):
        assert loss.dtype == torch.float32
        assert loss.item() == pytest.approx(want_loss.item(), rel=2e-6)
    if not grad:
        assert torch_grad is None and c_grad is None
        return
    assert c_grad.dtype == torch_grad.dtype == dtype and c_grad.shape == logits.shape
    assert not c_grad[~ok].any()                            # rows not scored: zeros
    # fp32: a few ulps of the largest entry; bf16: each entry rounded once (2^-8 of itself)
    for got in (torch_grad, c_grad):
        err = (got.double() - want_grad).abs()
        if dtype == torch.float32:
            assert err.max() <= 1e-6 * want_grad.abs().max()
        else:
            assert (err <= want_grad.abs() * 2**-8 + 1e-9).all()
    torch.testing.assert_close(c_grad, torch_grad, rtol=2**-7 if dtype != torch.float32
                               else 1e-5, atol=1e-9)


def test_loss_rows_in_c_keep_a_nan(kernel_build):
    if fused_loss.kernel() is None:
        pytest.skip("loss_kernel.c cannot be built here")
    logits, targets, ok = _rows_case(torch.float32)
    logits[5, 17] = float("nan")
    loss, grad = fused_loss._rows_in_c(logits, targets, ok, int(ok.sum()), True)
    assert torch.isnan(loss) and torch.isnan(grad[5]).all() and not torch.isnan(grad[6]).any()


def test_the_loss_rows_take_the_c_pass_where_switched_on(tiny_cfg, monkeypatch):
    # C_ROWS True (the tests' default: conftest) takes loss_kernel.c in a training step, in
    # fp32 and under bf16 autocast; False takes PyTorch's ops; the same gradients either way
    if fused_loss.kernel() is None:
        pytest.skip("loss_kernel.c cannot be built here")
    calls = []
    real = fused_loss._rows_in_c
    monkeypatch.setattr(fused_loss, "_rows_in_c", lambda *a: calls.append(a[0].dtype) or real(*a))
    torch.manual_seed(0)
    model = GPTModel(tiny_cfg).train()
    idx, targets = _batch(50257, B=2, T=8)
    loss, grads = _loss_and_grads(model, idx, targets, fused=True)
    _loss_and_grads(model, idx, targets, fused=True, dtype="bf16")
    assert calls == [torch.float32, torch.bfloat16]
    monkeypatch.setattr(fused_loss, "C_ROWS", False)
    ref_loss, ref_grads = _loss_and_grads(model, idx, targets, fused=True)
    assert len(calls) == 2
    torch.testing.assert_close(loss, ref_loss, atol=0, rtol=2e-6)
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-7, rtol=1e-4,
                                   msg=name)
    # fp16 logits, another device or no kernel: PyTorch's ops
    assert not fused_loss.c_rows(torch.float16, torch.device("cpu"))
    monkeypatch.setattr(fused_loss, "C_ROWS", True)
    assert not fused_loss.c_rows(torch.float32, torch.device("meta"))
    monkeypatch.setattr(native, "_LOSS", RuntimeError("no C compiler"))
    assert fused_loss.kernel() is None
    assert not fused_loss.c_rows(torch.float32, torch.device("cpu"))


@pytest.mark.parametrize("bad", [300, -5])
def test_a_target_out_of_the_vocabulary_is_refused(bad):
    h, w = torch.randn(2, 4, 8), torch.randn(300, 8)
    targets = torch.randint(0, 300, (2, 4))
    targets[1, 2] = bad
    with pytest.raises(IndexError, match=rf"target id {bad} is out of range: the vocabulary "
                                         r"has 300 ids \(0..299\), and -100 marks a position "
                                         r"that is not scored"):
        fused_loss.head_cross_entropy(h, w, targets)
