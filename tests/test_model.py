import math
import os

import pytest
import torch

from conftest import cfg_from_hf, make_hf_model
from engine import cpu_kernels
from engine.fileio import atomic_save
from engine.gpt2_params import gpt2_param_names
from model import (
    GPT_CONFIG_124M,
    MODEL_CONFIGS,
    GPTModel,
    Linear,
    load_checkpoint,
    save_checkpoint,
)


@pytest.mark.device
def test_logits_match_hugging_face(device_pair, device):
    hf, ours = device_pair
    idx = torch.randint(0, 211, (3, 25), generator=torch.Generator().manual_seed(1)).to(device)
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), hf(idx).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.device
def test_greedy_tokens_match_hugging_face(device_pair, device):
    from generate import generate_text

    hf, ours = device_pair
    prompt = torch.tensor([[5, 17, 42, 99, 3]], device=device)
    with torch.no_grad():
        theirs = hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                             max_new_tokens=20, pad_token_id=0)
    mine = generate_text(ours, prompt, max_new_tokens=20, context_size=40)
    assert mine.tolist() == theirs.tolist()


@pytest.mark.device
@pytest.mark.parametrize("batch", [1, 4])
def test_cached_decoding_equals_full_forward(device_pair, device, batch):
    _, ours = device_pair
    idx = torch.randint(0, 211, (batch, 30), generator=torch.Generator().manual_seed(batch))
    idx = idx.to(device)
    with torch.no_grad():
        full = ours(idx)
        cache = ours.new_cache(batch)
        steps = [ours(idx[:, :7], cache)] + [ours(idx[:, i:i + 1], cache) for i in range(7, 30)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)
    assert cache.pos == 30


def test_cache_chunk_after_prefix_uses_causal_mask(hf_pair):
    _, ours = hf_pair
    idx = torch.randint(0, 211, (2, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        cache = ours.new_cache(2)
        first, second = ours(idx[:, :8], cache), ours(idx[:, 8:], cache)
        torch.testing.assert_close(torch.cat([first, second], 1), ours(idx), atol=1e-5, rtol=1e-5)


def test_sequence_longer_than_context_is_an_error(tiny_cfg):
    model = GPTModel(tiny_cfg)
    with pytest.raises(ValueError, match="longer than the model's context_length 32"):
        model(torch.zeros(1, 33, dtype=torch.long))


def test_no_mask_or_buffers_in_state_dict(tiny_cfg):
    model = GPTModel(tiny_cfg)
    assert list(model.buffers()) == []
    assert not [k for k in model.state_dict() if "mask" in k]


@pytest.mark.parametrize("bad, match", [
    ({"n_layerz": 2}, "unknown config key 'n_layerz'"),
    ({"emb_dim": 30}, "'emb_dim' \\(30\\) must be divisible by 'n_heads' \\(4\\)"),
    ({"n_heads": 0}, "'n_heads' must be a positive int"),
    ({"vocab_size": 2.5}, "'vocab_size' must be a positive int"),
    ({"drop_rate": 1.0}, "'drop_rate' must be a number in \\[0, 1\\)"),
    ({"qkv_bias": "yes"}, "'qkv_bias' must be True or False"),
    ({"n_layers": True}, "'n_layers' must be a positive int"),
])
def test_bad_config_names_the_key(tiny_cfg, bad, match):
    with pytest.raises(ValueError, match=match):
        GPTModel({**tiny_cfg, **bad})


def test_missing_config_key(tiny_cfg):
    del tiny_cfg["context_length"]
    with pytest.raises(ValueError, match="'context_length' is missing"):
        GPTModel(tiny_cfg)


def test_model_configs_are_gpt2_shapes():
    assert list(MODEL_CONFIGS) == ["gpt2-small (124M)", "gpt2-medium (355M)",
                                   "gpt2-large (774M)", "gpt2-xl (1558M)"]
    shapes = [(c["emb_dim"], c["n_layers"], c["n_heads"]) for c in MODEL_CONFIGS.values()]
    assert shapes == [(768, 12, 12), (1024, 24, 16), (1280, 36, 20), (1600, 48, 25)]
    with torch.device("meta"):
        small = GPTModel(MODEL_CONFIGS["gpt2-small (124M)"])
    # OpenAI's 124M model: 124,439,808 parameters with the head tied to the embedding.
    assert sum(p.numel() for p in small.parameters()) == 124_439_808
    assert GPT_CONFIG_124M == {"vocab_size": 50257, "context_length": 256, "emb_dim": 768,
                               "n_heads": 12, "n_layers": 12, "drop_rate": 0.1,
                               "qkv_bias": False}


def test_tied_head_shares_the_embedding_parameter(tiny_cfg):
    tied = GPTModel({**tiny_cfg, "tie_embeddings": True})
    assert tied.out_head.weight is tied.tok_emb.weight
    untied = GPTModel(tiny_cfg)
    assert untied.out_head.weight is not untied.tok_emb.weight


def test_gpt2_initialisation_scales_residual_projections():
    cfg = {**GPT_CONFIG_124M, "vocab_size": 1000, "n_layers": 8}
    model = GPTModel(cfg)
    proj = torch.cat([b.ff.proj.weight.flatten() for b in model.trf_blocks])
    fc = torch.cat([b.ff.fc.weight.flatten() for b in model.trf_blocks])
    assert proj.std().item() == pytest.approx(0.02 / math.sqrt(16), rel=0.02)
    assert fc.std().item() == pytest.approx(0.02, rel=0.02)
    assert all((b.att.out_proj.bias == 0).all() for b in model.trf_blocks)


def test_checkpoint_round_trip_carries_config(tmp_path, tiny_cfg):
    model = GPTModel({**tiny_cfg, "tie_embeddings": True}).eval()
    path = save_checkpoint(tmp_path / "m.pth", model, note="hello")
    loaded = load_checkpoint(path)
    assert loaded.cfg == model.cfg and not loaded.training
    assert loaded.out_head.weight is loaded.tok_emb.weight
    idx = torch.tensor([[1, 2, 3]])
    torch.testing.assert_close(loaded(idx), model(idx))
    assert torch.load(path, weights_only=True)["note"] == "hello"


@pytest.mark.parametrize("dtype", ["bf16", torch.bfloat16, "fp16"])
def test_checkpoint_loads_in_a_lower_precision(tmp_path, tiny_cfg, dtype):
    model = GPTModel({**tiny_cfg, "tie_embeddings": True}).eval()
    path = save_checkpoint(tmp_path / "m.pth", model)
    loaded = load_checkpoint(path, dtype=dtype)
    want = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(dtype, dtype)
    assert {p.dtype for p in loaded.parameters()} == {want}
    assert loaded.out_head.weight is loaded.tok_emb.weight and not loaded.training
    idx = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        assert torch.equal(loaded(idx), model.to(want)(idx))
    assert load_checkpoint(path, dtype="fp32").tok_emb.weight.dtype == torch.float32


@pytest.mark.parametrize("bad", ["int4", "float32", torch.int64, 16])
def test_unknown_dtype_is_refused_before_loading(tmp_path, bad):
    with pytest.raises(ValueError, match=r"dtype must be None, one of \['fp32', 'bf16', "
                                         r"'fp16'\] or the torch dtype of one"):
        load_checkpoint(tmp_path / "not-there.pth", dtype=bad)


def test_bare_state_dict_needs_cfg(tmp_path, tiny_cfg):
    model = GPTModel(tiny_cfg)
    torch.save(model.state_dict(), tmp_path / "bare.pth")
    with pytest.raises(ValueError, match="bare state dict with no config; pass cfg="):
        load_checkpoint(tmp_path / "bare.pth")
    loaded = load_checkpoint(tmp_path / "bare.pth", cfg=tiny_cfg)
    torch.testing.assert_close(loaded.tok_emb.weight, model.tok_emb.weight)


def test_missing_truncated_and_wrong_checkpoints(tmp_path, tiny_cfg):
    with pytest.raises(FileNotFoundError, match="not found; train one"):
        load_checkpoint(tmp_path / "nope.pth")
    path = save_checkpoint(tmp_path / "m.pth", GPTModel(tiny_cfg))
    data = path.read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or is not a PyTorch checkpoint"):
        load_checkpoint(tmp_path / "cut.pth")
    torch.save(GPTModel(tiny_cfg).state_dict(), tmp_path / "bare.pth")
    with pytest.raises(ValueError, match="do not fit config"):
        load_checkpoint(tmp_path / "bare.pth", cfg={**tiny_cfg, "emb_dim": 64})
    with pytest.raises(ValueError, match="carries its own config, and the one given differs"):
        load_checkpoint(path, cfg={**tiny_cfg, "emb_dim": 64})


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_pickled_code_is_refused(tmp_path):
    torch.save({"model_state_dict": {}, "evil": _RunsCode()}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match="holds Python objects other than tensors"):
        load_checkpoint(tmp_path / "evil.pth")


def test_interrupted_write_keeps_previous_checkpoint(tmp_path, tiny_cfg, monkeypatch):
    model = GPTModel(tiny_cfg)
    path = save_checkpoint(tmp_path / "m.pth", model)
    before = path.read_bytes()

    def crash(*args):
        raise KeyboardInterrupt("killed before the rename")

    monkeypatch.setattr(os, "replace", crash)
    with torch.no_grad():
        model.tok_emb.weight.add_(1.0)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, model)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pth"]    # no temp file left
    load_checkpoint(path)
    with pytest.raises(AttributeError, match="Can't pickle"):
        atomic_save(lambda: 0, tmp_path / "x.pth")    # unpicklable: nothing written
    assert not (tmp_path / "x.pth").exists()


@pytest.mark.parametrize("vocab, row", [(211, 256), (192, 192)])
@pytest.mark.parametrize("autocast", [False, True])
def test_aligned_logits_equal_the_plain_head_with_gradients(vocab, row, autocast, monkeypatch):
    # On CPU the logits live in rows padded to a multiple of 64 (cpu_kernels._AlignedLogits):
    # values, loss and every gradient must be those of the plain nn.Linear head. (fp32 on
    # x86 takes oneDNN instead, tested below: switched off here so that this path is run.)
    monkeypatch.setattr(cpu_kernels, "ONEDNN_FP32", False)
    # (and where oneDNN has no bf16, autocast's head multiplies in fp32 instead: off here too)
    monkeypatch.setattr(cpu_kernels, "BF16_IN_FP32", False)
    torch.manual_seed(0)
    model = GPTModel({"vocab_size": vocab, "context_length": 16, "emb_dim": 32, "n_heads": 4,
                      "n_layers": 2, "drop_rate": 0.0, "qkv_bias": True})
    idx = torch.randint(0, vocab, (3, 10))
    targets = torch.randint(0, vocab, (3, 10))

    def loss_and_grads(head):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits = head(model.hidden_states(idx))
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(),
                                                 targets.flatten())
        loss.backward()
        return logits, loss, {n: p.grad.clone() for n, p in model.named_parameters()}

    logits, loss, grads = loss_and_grads(model.logits)
    ref_logits, ref_loss, ref_grads = loss_and_grads(model.out_head)
    assert logits.shape == (3, 10, vocab) and logits.dtype == ref_logits.dtype
    assert logits.stride(1) == row            # the row length in memory
    assert torch.equal(logits, ref_logits) and torch.equal(loss, ref_loss)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, atol=1e-6, rtol=1e-5, msg=name)


def _count_onednn_calls(monkeypatch):
    calls = []
    real = cpu_kernels.onednn_mm
    monkeypatch.setattr(cpu_kernels, "onednn_mm",
                        lambda *args: calls.append(args[0].shape) or real(*args))
    return calls


@pytest.mark.parametrize("onednn", [True, False])
def test_loss_and_gradients_match_hugging_face(monkeypatch, onednn):
    # One training step's arithmetic, tied head included: loss and every gradient as
    # GPT2LMHeadModel's. fp32 on x86 runs our matrix products through oneDNN with a
    # backward written out (cpu_kernels._OneDNNLinear); onednn=False switches every fast
    # path off (cpu_kernels.ENABLED): the plain PyTorch code of model.py.
    from download_weights_hf import load_weights_into_gpt

    monkeypatch.setattr(cpu_kernels, "ENABLED", onednn)
    calls = _count_onednn_calls(monkeypatch)
    hf = make_hf_model()
    ours = GPTModel(cfg_from_hf(hf))
    load_weights_into_gpt(ours, hf)
    g = torch.Generator().manual_seed(5)
    idx = torch.randint(0, 211, (3, 20), generator=g)
    targets = torch.randint(0, 211, (3, 20), generator=g)
    loss = torch.nn.functional.cross_entropy(ours(idx).flatten(0, 1), targets.flatten())
    ref = hf(input_ids=idx).logits
    ref_loss = torch.nn.functional.cross_entropy(ref.flatten(0, 1), targets.flatten())
    loss.backward()
    ref_loss.backward()
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-6)
    hf_params = dict(hf.transformer.named_parameters())
    ours_params = dict(ours.named_parameters())
    for row in gpt2_param_names(3):
        torch.testing.assert_close(ours_params[row.ours].grad, hf_params[row.hf].grad,
                                   atol=1e-6, rtol=1e-4, msg=row.ours)
    # forward: 4 products per block + the head; backward: 2 each (input and weight)
    n_products = 3 * (4 * 3 + 1)
    assert len(calls) == (n_products if onednn and cpu_kernels.available() else 0)


@pytest.mark.skipif(not cpu_kernels.available(), reason="oneDNN fp32 path: x86 CPUs only")
def test_onednn_linear_equals_addmm_with_gradients(monkeypatch):
    # _OneDNNLinear on its own: with and without bias, contiguous (in, out) weights and the
    # head's transposed view, inputs that need no gradient, a broadcast upstream gradient;
    # and autocast keeps it off.
    calls = _count_onednn_calls(monkeypatch)
    g = torch.Generator().manual_seed(0)
    for bias_on, transposed, x_grad in [(True, False, True), (False, True, True),
                                        (True, False, False)]:
        x = torch.randn(37, 24, generator=g).requires_grad_(x_grad)
        base = torch.randn(40, 24, generator=g) if transposed else torch.randn(24, 40, generator=g)
        base.requires_grad_(True)
        bias = torch.randn(40, generator=g).requires_grad_(True) if bias_on else None
        w = base.t() if transposed else base                             # (24, 40)
        y = cpu_kernels._OneDNNLinear.apply(x, w, bias)
        ref = x @ w + (bias if bias_on else 0)
        torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
        # a broadcast gradient (stride 0, as y.sum().backward() gives) for the plain cases
        upstream = (torch.randn(37, 40, generator=g) if transposed
                    else torch.randn(37, 1, generator=g).expand(37, 40))
        wanted = [t for t in (x, base, bias) if t is not None and t.requires_grad]
        grads = torch.autograd.grad(y, wanted, upstream)
        ref_grads = torch.autograd.grad(ref, wanted, upstream)
        for a, b in zip(grads, ref_grads):
            assert a.shape == b.shape and a.is_contiguous() == b.is_contiguous()
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert len(calls) == 3 + 2 + 2 + 1            # forwards, then one backward per grad asked
    calls.clear()
    layer = Linear(24, 40)
    # (where oneDNN has no bf16, autocast's products run in fp32, through this path: off here)
    monkeypatch.setattr(cpu_kernels, "BF16_IN_FP32", False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(torch.randn(5, 24)).dtype == torch.bfloat16
    assert calls == []


@pytest.mark.skipif(not cpu_kernels.available(), reason="oneDNN fp32 path: x86 CPUs only")
def test_transposed_inputs_reach_onednn_copied_by_the_kernel(monkeypatch, kernel_build):
    # in_rows: a transposed fp32 matrix (a weight gradient's x.T) copied by
    # transpose_kernel.c into exactly a.contiguous(), across every tail of its 64 x 64 tiles
    # and 8 x 8 blocks; anything else passes through untouched
    from engine import native
    assert native.optional(native.transpose_kernels) is not None
    g = torch.Generator().manual_seed(0)
    for rows, cols in [(1, 1), (1, 9), (7, 8), (8, 8), (9, 17), (63, 64), (64, 65),
                       (130, 200), (1001, 37)]:
        base = torch.randn(rows, cols, generator=g)                      # a.T, in rows
        got = cpu_kernels.in_rows(base.t())                              # (cols, rows)
        assert got.is_contiguous() and torch.equal(got, base.t())
    for other in (base, base.t().bfloat16(), base[:, ::2].t(), base.t()[None]):
        assert cpu_kernels.in_rows(other) is other
    # a layer's weight gradient through it is the one oneDNN's own copy gives
    x, up = torch.randn(300, 70, generator=g), torch.randn(300, 90, generator=g)
    w = torch.randn(70, 90, generator=g).requires_grad_()
    copied = torch.autograd.grad(cpu_kernels._OneDNNLinear.apply(x, w, None), w, up)[0]
    monkeypatch.setattr(cpu_kernels, "in_rows", lambda a: a)
    by_onednn = torch.autograd.grad(cpu_kernels._OneDNNLinear.apply(x, w, None), w, up)[0]
    assert torch.equal(copied, by_onednn)


def _count_fp32_products(monkeypatch):
    calls = []
    real = cpu_kernels.matmul_in_fp32
    monkeypatch.setattr(cpu_kernels, "matmul_in_fp32",
                        lambda x, *rest: calls.append(tuple(x.shape)) or real(x, *rest))
    return calls


def test_bf16_products_in_fp32_are_bf16_matmuls_with_gradients(monkeypatch):
    # Where PyTorch has no bf16 matmul kernel (oneDNN without bf16: AVX2 CPUs) bf16 products
    # run in fp32 (cpu_kernels.matmul_in_fp32): a bf16 matmul's numbers (exact products, the
    # sums rounded once to bf16), with and without bias, (in, out) weights and the head's
    # transposed view, and gradients as the plain bf16 product's. Forced on here, any CPU.
    monkeypatch.setattr(cpu_kernels, "BF16_IN_FP32", True)
    g = torch.Generator().manual_seed(0)
    for bias_on, transposed in [(True, False), (False, True)]:
        x = torch.randn(37, 64, generator=g).bfloat16().requires_grad_(True)
        base = torch.randn(40, 64, generator=g) if transposed else torch.randn(64, 40, generator=g)
        base = base.bfloat16().requires_grad_(True)
        bias = torch.randn(40, generator=g).bfloat16().requires_grad_(True) if bias_on else None
        w = base.t() if transposed else base                             # (64, 40)
        y = cpu_kernels.matmul_in_fp32(x, w, bias)
        exact = x.double() @ w.double() + (bias.double() if bias_on else 0)
        assert y.dtype == torch.bfloat16
        # the fp32 sums rounded to bf16 are the exact sums rounded, give or take one step
        torch.testing.assert_close(y.double(), exact.bfloat16().double(), atol=1e-6,
                                   rtol=2**-7)
        wanted = [t for t in (x, base, bias) if t is not None]
        upstream = torch.randn(37, 40, generator=g).bfloat16()
        grads = torch.autograd.grad(y, wanted, upstream)
        ref_grads = torch.autograd.grad(x @ w + (bias if bias_on else 0), wanted, upstream)
        for a, b in zip(grads, ref_grads):
            assert a.dtype == b.dtype == torch.bfloat16 and a.shape == b.shape
            torch.testing.assert_close(a.double(), b.double(), atol=1e-2, rtol=2**-6)

    # a bf16 model: every block product, the head and the fused loss take it, forward and
    # backward give the plain code's loss and gradients (to bf16's rounding)
    calls = _count_fp32_products(monkeypatch)
    torch.manual_seed(0)
    model = GPTModel({"vocab_size": 211, "context_length": 16, "emb_dim": 32, "n_heads": 4,
                      "n_layers": 2, "drop_rate": 0.0, "qkv_bias": True}).bfloat16()
    idx, targets = torch.randint(0, 211, (2, 9)), torch.randint(0, 211, (2, 9))

    def loss_and_grads():
        model.zero_grad()
        h = model.hidden_states(idx)
        loss = model.loss(h, targets)
        loss.backward()
        return model.logits(h.detach()), loss, {n: p.grad for n, p in model.named_parameters()}

    logits, loss, grads = loss_and_grads()
    # 4 products a block and attention's 7 (engine/attention.py, one block of queries: 2
    # forward, 5 backward); the fused loss's head: logits and both gradients; model.logits
    assert len(calls) == 2 * (4 + 7) + 3 + 1
    with cpu_kernels.disabled():
        ref_logits, ref_loss, ref_grads = loss_and_grads()
    assert logits.dtype == ref_logits.dtype == torch.bfloat16
    torch.testing.assert_close(logits.float(), ref_logits.float(), atol=0.05, rtol=0.02)
    assert loss.item() == pytest.approx(ref_loss.item(), rel=0.01)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name].float(), g.float(), atol=2e-3, rtol=0.05,
                                   msg=name)
    # autocast over fp32 weights: bf16 results, fp32 gradients
    layer = Linear(24, 40)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(torch.randn(5, 24))
    y.float().sum().backward()
    assert y.dtype == torch.bfloat16 and layer.weight.grad.dtype == torch.float32

    # left to the clock's None, it runs exactly where oneDNN has no bf16 products
    from engine import devices
    monkeypatch.setattr(cpu_kernels, "BF16_IN_FP32", None)
    for onednn_bf16 in (True, False):
        monkeypatch.setattr(devices, "onednn_bf16", lambda has=onednn_bf16: has)
        calls.clear()
        with torch.no_grad():
            model(idx)
        assert len(calls) == (0 if onednn_bf16 else 2 * 4 + 1)


def test_a_tying_config_does_not_drop_a_different_head(tmp_path, tiny_cfg):
    untied = GPTModel({**tiny_cfg, "tie_embeddings": False})
    torch.save(untied.state_dict(), tmp_path / "bare.pth")
    with pytest.raises(ValueError, match="output head different from its token embedding"):
        load_checkpoint(tmp_path / "bare.pth", cfg={**tiny_cfg, "tie_embeddings": True})
    loaded = load_checkpoint(tmp_path / "bare.pth", cfg={**tiny_cfg, "tie_embeddings": False})
    torch.testing.assert_close(loaded.out_head.weight, untied.out_head.weight)
    tied = GPTModel({**tiny_cfg, "tie_embeddings": True})
    save_checkpoint(tmp_path / "tied.pth", tied)
    assert load_checkpoint(tmp_path / "tied.pth").out_head.weight is not None


def test_a_full_cache_names_its_max_len(tiny_cfg):
    model = GPTModel(tiny_cfg).eval()
    cache = model.new_cache(1, max_len=10)
    with torch.no_grad():
        model(torch.zeros(1, 8, dtype=torch.long), cache)
        with pytest.raises(ValueError, match=r"KV cache holds 10 positions .its max_len., and "
                                             r"8 are filled: 3 more do not fit"):
            model(torch.zeros(1, 3, dtype=torch.long), cache)


def test_written_files_get_the_umask_mode_and_leftovers_of_dead_processes_go(tmp_path):
    import subprocess
    import sys

    from engine.fileio import _temp_prefix, atomic_write
    old = os.umask(0o022)
    try:
        path = atomic_write(tmp_path / "a.txt", lambda f: f.write(b"x"))
    finally:
        os.umask(old)
    assert (path.stat().st_mode & 0o777) == 0o644          # not mkstemp's private 0600
    # a temp file of a process that has ended (as after kill -9) is removed by the next
    # write; one of a live process (this one's parent, say) stays
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    stale = tmp_path / f"{_temp_prefix(path, dead)}.abcd1234.tmp"
    live = tmp_path / f"{_temp_prefix(path, os.getppid())}.abcd1234.tmp"
    stale.write_bytes(b"half")
    live.write_bytes(b"half")
    atomic_write(path, lambda f: f.write(b"y"))
    assert path.read_bytes() == b"y"
    assert not stale.exists() and live.exists()
