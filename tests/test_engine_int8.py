"""engine/int8.py: weight-only int8 layers against the plain dequantized product, and an int8
model against its fp32 original (logits, greedy tokens, perplexity of a trained model)."""

import copy

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from conftest import cfg_from_hf, flag_in_a_fresh_process, make_hf_model
from engine import cpu_kernels, int8
from generate import generate_text
from model import GPTModel


def _pair(tie=True):
    from download_weights_hf import load_weights_into_gpt
    hf = make_hf_model(tie=tie)
    return load_weights_into_gpt(GPTModel(cfg_from_hf(hf)), hf).eval()


@pytest.fixture(autouse=True)
def own_kernel_on_where_it_builds(monkeypatch):
    """Our compiled kernel on wherever it can be built, whatever this CPU's default: it is
    tested against the plain product on every machine that has what it needs."""
    monkeypatch.setattr(int8, "OWN_KERNEL", int8.own_kernel() is not None)
    monkeypatch.setattr(int8, "DYNAMIC_Q8", int8.q8_kernel() is not None)


def _spy(monkeypatch):
    """A list that gets ("own" | "int8pack" | "q8", rows) for every call of a fast int8
    kernel."""
    calls, op, own, q8 = [], int8._int8mm_op(), int8._own_linear, int8.q8_kernel()

    def counted_q8(x, q, scale, bias, y, rows, *args):
        calls.append(("q8", rows))
        return q8(x, q, scale, bias, y, rows, *args)
    monkeypatch.setattr(int8, "q8_kernel", lambda: None if q8 is None else counted_q8)

    def counted_op(*args):
        calls.append(("int8pack", args[0].shape[0]))
        return op(*args)

    def counted_own(fn, x2, *args):
        calls.append(("own", x2.shape[0]))
        return own(fn, x2, *args)
    monkeypatch.setattr(int8, "_int8mm_op", lambda: None if op is None else counted_op)
    monkeypatch.setattr(int8, "_own_linear", counted_own)
    return calls


def _use(monkeypatch, kernel):
    """Route every product (any number of rows) through ``kernel``, or skip where it is
    missing: "own" (int8_kernel.c), "int8pack" (_weight_int8pack_mm), "bf16mm"."""
    if kernel == "own" and int8.own_kernel() is None:
        pytest.skip(f"our int8 kernel cannot be built here: {int8.KERNEL_STATUS}")
    if kernel == "int8pack" and int8._int8mm_op() is None:
        pytest.skip("this PyTorch has no _weight_int8pack_mm")
    monkeypatch.setattr(int8, "OWN_KERNEL", kernel == "own")
    monkeypatch.setattr(int8, "DYNAMIC_Q8", False)      # (tested on its own below)
    monkeypatch.setattr(int8, "OWN_KERNEL_MAX_ROWS", 10**9)
    monkeypatch.setattr(int8, "INT8MM_MAX_ROWS", 10**9 if kernel == "int8pack" else 0)


# ---------------------------------------------------------------------------------------
# One matrix

def test_quantize_weight_by_hand():
    w = torch.tensor([[0.5, -1.0, 0.25],
                      [0.0, 0.0, 0.0],
                      [2.0, -0.01, 1.0]])
    q, scale = int8.quantize_weight(w)
    # row 0: max 1.0; 1/127 = 2^-7 * 1.00787.. lies between the bf16 numbers 2^-7 * 1.0078125
    # and 2^-7 * 1.015625, and is rounded up to the latter: 0.0079345703125.
    # 0.5 / s = 63.015, -1.0 / s = -126.03, 0.25 / s = 31.508
    # row 2: 2/127 = 2^-6 * 1.00787.. -> 2^-6 * 1.015625 = 0.015869140625;
    # 2 / s = 126.03, -0.01 / s = -0.63, 1 / s = 63.015
    assert scale.tolist() == [0.0079345703125, 1.0, 0.015869140625]
    assert q.dtype == torch.int8 and q.tolist() == [[63, -126, 32], [0, 0, 0], [126, -1, 63]]


def test_quantize_weight_error_is_at_most_half_a_step():
    torch.manual_seed(0)
    w = torch.randn(300, 70) * torch.logspace(-3, 2, 300)[:, None]       # rows of all sizes
    q, scale = int8.quantize_weight(w)
    assert torch.equal(scale.to(torch.bfloat16).float(), scale)          # exact in bf16
    assert int(q.abs().max()) <= 127 and int(q.abs().amax(1).min()) >= 126
    err = (int8.dequantize(q, scale) - w).abs()
    assert bool((err <= scale[:, None] / 2 * (1 + 1e-6)).all())


# ---------------------------------------------------------------------------------------
# One layer: the kernels against the plain product

@pytest.mark.parametrize("kernel", ["own", "own-fp32", "int8pack", "bf16mm", "bf16mm-fp32"])
@pytest.mark.parametrize("shape", [(1, 96), (3, 96), (4, 96), (2, 1, 96), (5, 96),
                                   (2, 17, 96), (300, 96), (2, 40)])
@pytest.mark.parametrize("bias", [True, False])
def test_kernels_equal_the_plain_product(monkeypatch, kernel, shape, bias):
    # each kernel against the fp32 product of the dequantized weights (rounded to bf16 for
    # bf16 activations); 130 outputs (not a multiple of the kernels' blocks), 96 and 40
    # inputs (40: not a multiple of 16, the own kernel's step); "-fp32": with fp32
    # activations (the bf16 matmul rounds them to bf16)
    dtype = torch.float32 if kernel.endswith("-fp32") else torch.bfloat16
    kernel = kernel.removesuffix("-fp32")
    _use(monkeypatch, kernel)
    monkeypatch.setattr(int8, "BF16_ROWS", kernel == "bf16mm")
    torch.manual_seed(1)
    k = shape[-1]
    layer = nn.Linear(k, 130, bias=bias)
    q8 = int8.Int8Linear.from_float(layer, in_out=False, dtype=dtype)
    x = torch.randn(shape).to(dtype)
    calls = _spy(monkeypatch)
    with torch.no_grad():
        fast = q8(x)
        with int8.disabled():
            plain = q8(x)
    rows = x.numel() // k
    # _weight_int8pack_mm reads 16 inputs at a time: rows of 40 go to the bf16 matmul
    skips = kernel == "bf16mm" or (kernel == "int8pack" and k % 16)
    assert calls == ([] if skips else [(kernel, rows)])
    assert fast.shape == plain.shape == (*shape[:-1], 130)
    assert fast.dtype == plain.dtype == dtype
    exact = x.float() @ int8.dequantize(q8.weight, q8.scale).t()
    if bias:
        exact += layer.bias.detach().to(dtype).float()
    assert torch.equal(plain, exact.to(dtype))
    if dtype == torch.float32 and kernel != "bf16mm":   # the same sums in another order
        torch.testing.assert_close(fast, exact, rtol=1e-5, atol=1e-5)
        return
    # bf16 keeps 8 significant bits: a rounding moves a number by at most 2^-9 of it; the
    # kernels round the sums (and the scaled sums) once or twice more (fp32 rows through
    # the bf16 matmul: the rows, and the sums)
    torch.testing.assert_close(fast.float(), exact, rtol=2 ** -7, atol=1e-2)
    if kernel == "own":      # one rounding of the same fp32 sum: equal but for a few last bits
        assert int((fast != plain).sum()) <= max(1, fast.numel() // 50)


def _q8_reference(x, q, scale, bias):
    """What gemm_q8 computes, in plain PyTorch: each row of x (..., K) rounded to int8 in
    blocks of 32 (scale max |x| / 127 each, to nearest, ties to even), times the int8
    weights, in float64."""
    K = x.shape[-1]
    blocks = torch.nn.functional.pad(x.reshape(-1, K), (0, -K % 32)).view(-1, 32)
    amax = blocks.abs().amax(dim=1, keepdim=True)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))       # fp32, as in C
    xq = (blocks * inv).round().clamp(-127, 127)
    x8 = (xq * (amax / 127.0)).view(-1, K - K % -32)[:, :K].double()        # (rows, K)
    y = (x8 @ q.double().t()) * scale.double()
    return (y if bias is None else y + bias.double()).view(*x.shape[:-1], -1)


@pytest.mark.parametrize("out_in", [(130, 96), (130, 40), (7, 200), (2304, 768)])
@pytest.mark.parametrize("rows", [1, 3, 16])
@pytest.mark.parametrize("bias", [True, False])
def test_q8_kernel_equals_its_reference(monkeypatch, out_in, rows, bias, kernel_build):
    # gemm_q8 (1 to 16 fp32 rows, through decode_kernel.c) against the same
    # arithmetic in float64; 130 and 7 outputs, 96, 40, 200 inputs (not whole 64-input
    # pieces), 3 rows (not a whole 4 a pass); x with an all-zero block and large and tiny
    # values
    if int8.q8_kernel() is None:
        pytest.skip("gemm_q8 needs decode_kernel.c, which cannot be built here")
    out, k = out_in
    torch.manual_seed(3)
    layer = nn.Linear(k, out, bias=bias)
    q8 = int8.Int8Linear.from_float(layer, in_out=False, dtype=torch.float32)
    x = torch.randn(rows, k) * torch.logspace(-3, 1, k)[torch.randperm(k)]
    x[:, 32:64] = 0.0
    x[0, 5] = 40.0                                    # an outlier, as GPT-2's activations have
    calls = _spy(monkeypatch)
    with torch.no_grad():
        fast = q8(x)
        with int8.disabled():
            plain = q8(x)
    assert calls == [("q8", rows)] and fast.shape == (rows, out)
    assert fast.dtype == torch.float32
    ref = _q8_reference(x, q8.weight, q8.scale.float(), q8.bias)
    torch.testing.assert_close(fast.double(), ref, rtol=1e-5,
                               atol=1e-5 * ref.abs().max().item())
    assert torch.equal(plain, int8.plain_int8_linear(x, q8.weight, q8.scale, q8.bias))
    # against the weight-only product, for rows of normal numbers: x's own rounding (half
    # a step of 1/127 of each block's largest number) is all that differs (measured: at
    # most 1.4-1.7% of the outputs' spread, 0.5% on average)
    x = torch.randn(rows, k)
    with torch.no_grad():
        fast = q8(x)
        with int8.disabled():
            plain = q8(x)
    spread = plain.std().item()
    assert (fast - plain).abs().max().item() < 0.04 * spread
    assert (fast - plain).abs().mean().item() < 0.01 * spread
    # 17 rows: the other kernels
    with torch.no_grad():
        q8(torch.randn(17, k))
    assert ("q8", 17) not in calls


def test_rows_pick_the_kernel(monkeypatch):
    # the defaults: our kernel up to OWN_KERNEL_MAX_ROWS rows where it is on, else
    # _weight_int8pack_mm up to INT8MM_MAX_ROWS; more rows: the bf16 matmul
    q8 = int8.Int8Linear.from_float(nn.Linear(64, 32), in_out=False)
    calls = _spy(monkeypatch)
    own = int8.OWN_KERNEL
    with torch.no_grad():
        for rows in (1, 4, 5, 16, 17):
            q8(torch.randn(rows, 64).to(torch.bfloat16))
    want = [("own", r) for r in (1, 4, 5, 16)] if own else [("int8pack", 1), ("int8pack", 4)]
    assert calls == want


def test_plain_product_where_the_kernels_do_not_apply(monkeypatch):
    # fp32 activations without our kernel, no kernel in this PyTorch, the switch off: the
    # plain product
    torch.manual_seed(2)
    q8 = int8.Int8Linear.from_float(nn.Linear(40, 24), in_out=False)
    monkeypatch.setattr(int8, "OWN_KERNEL", False)
    monkeypatch.setattr(int8, "BF16_ROWS", False)
    calls = _spy(monkeypatch)
    x = torch.randn(2, 40)
    with torch.no_grad():
        y = q8(x)                                                           # fp32 in
        assert y.dtype == torch.float32 and calls == []
        exact = x @ int8.dequantize(q8.weight, q8.scale).t() + q8.bias.float()
        assert q8.scale.dtype == torch.bfloat16 and q8.bias.dtype == torch.bfloat16
        torch.testing.assert_close(y, exact, rtol=1e-6, atol=1e-6)
        # the same rows through the bf16 matmul where it is chosen: the rows and the sums
        # rounded to bf16, the output fp32
        monkeypatch.setattr(int8, "BF16_ROWS", True)
        y16 = q8(x)
        assert y16.dtype == torch.float32 and not torch.equal(y16, y)
        bf = x.to(torch.bfloat16).float() @ q8.weight.float().t()
        # (a kernel summing in another order may round a sum to the next bf16 number)
        torch.testing.assert_close(y16, bf.to(torch.bfloat16).float() * q8.scale.float()
                                   + q8.bias.float(), rtol=2 ** -8, atol=1e-6)
        monkeypatch.setattr(int8, "BF16_ROWS", False)
        xb = x.to(torch.bfloat16)
        with int8.disabled():
            assert torch.equal(q8(xb), int8.plain_int8_linear(xb, q8.weight, q8.scale, q8.bias))
        # neither our kernel nor _weight_int8pack_mm (an older PyTorch): the bf16 matmul
        monkeypatch.setattr(int8, "_int8mm_op", lambda: None)
        torch.testing.assert_close(q8(xb).float(), q8(xb.float()), rtol=2 ** -7, atol=1e-2)
    assert calls == []


def test_a_layer_made_from_an_in_out_weight_computes_the_same_product():
    # model.Linear stores (in, out): from_float(in_out=True) must transpose it
    torch.manual_seed(3)
    lin = nn.Linear(32, 48)
    blk = nn.Module()
    blk.weight = nn.Parameter(lin.weight.detach().t().clone())              # (in, out)
    blk.bias = lin.bias
    a = int8.Int8Linear.from_float(lin, in_out=False)
    b = int8.Int8Linear.from_float(blk, in_out=True)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.scale, b.scale)
    assert a.weight.is_contiguous() and b.weight.is_contiguous()


def test_kernel_is_built_once_per_machine_and_missing_compiler_falls_back(monkeypatch, tmp_path):
    # Built into $GPT2_KERNEL_CACHE under a name that hashes source, compiler and CPU, and
    # found there the next time; without a compiler own_kernel() says why and gives None.
    if int8.own_kernel() is None:
        pytest.skip(f"our int8 kernel cannot be built here: {int8.KERNEL_STATUS}")
    monkeypatch.setenv("GPT2_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setattr(int8, "KERNEL_STATUS", int8.KERNEL_STATUS)    # back afterwards
    fns = int8._load_kernel()
    (lib,) = tmp_path.glob("int8_kernel-*.so")
    stamp = lib.stat().st_mtime_ns
    assert set(fns) == {torch.bfloat16, torch.float32}
    int8._load_kernel()
    assert lib.stat().st_mtime_ns == stamp and len(list(tmp_path.iterdir())) == 1
    monkeypatch.setattr(int8, "_KERNEL", None)
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    lib.unlink()
    assert int8.own_kernel() is None
    assert int8.KERNEL_STATUS.startswith("unavailable: ") and "no-such-compiler" in \
        int8.KERNEL_STATUS


def test_environment_variable_turns_the_fast_path_off():
    assert flag_in_a_fresh_process("int8", "ENABLED", GPT2_INT8_KERNELS="0") == "False"


# ---------------------------------------------------------------------------------------
# A model

@pytest.mark.parametrize("tie", [True, False])
def test_quantize_replaces_every_matrix_and_frees_the_float_copies(tie):
    model = _pair(tie)
    matrices = [p.numel() for p in model.trf_blocks.parameters() if p.dim() == 2]
    fp32_bytes = 4 * (sum(matrices) + model.out_head.weight.numel())
    assert int8.quantize_(model) is model and int8.is_quantized(model)
    layers = [m for m in model.modules() if isinstance(m, int8.Int8Linear)]
    assert len(layers) == 4 * 3 + 1 and model.out_head in layers
    # nothing float and 2-D is left in the blocks or the head; the rest is in the
    # activations' dtype, the scales in bf16
    dtype = int8.activation_dtype()
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        assert t.dtype in (dtype, torch.int8) or name.endswith(".scale"), name
        assert t.dim() != 2 or t.dtype == torch.int8 or name.startswith(("tok_emb", "pos_emb"))
    assert model.tok_emb.weight.dtype == dtype
    assert model.tok_emb.weight is not model.out_head.weight
    # the int8 matrices (+ their bf16 scales) take a quarter of the fp32 bytes and a bit
    int8_bytes = sum(m.weight.numel() + 2 * m.scale.numel() for m in layers)
    assert int8_bytes == fp32_bytes // 4 + 2 * sum(m.out_features for m in layers)
    state = copy.deepcopy(model.state_dict())
    int8.quantize_(model)                                                   # a no-op now
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_int8_logits_stay_close_to_fp32(tie, dtype):
    # Random weights (std 0.02, GPT-2's init): the int8 model's logits stay within 5% of the
    # spread (std) of the fp32 logits from them, 1% on average (measured with bf16
    # activations: 3.6% and 0.7%, of which bf16 alone, with fp32 weights: 2.5% and 0.4%;
    # with fp32 activations: 2.0% and 0.5%)
    model = _pair(tie)
    idx = torch.randint(0, 211, (3, 25), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(idx)                                                    # (3, 25, 211)
        q = int8.quantize_(copy.deepcopy(model), dtype)
        fast = q(idx).float()
        with int8.disabled():
            plain = q(idx).float()
    spread = ref.std().item()
    assert (fast - ref).abs().max().item() < 0.05 * spread
    assert (fast - ref).abs().mean().item() < 0.01 * spread
    # the kernels and the plain product differ in bf16 roundings, which the layers carry on
    assert (fast - plain).abs().max().item() < 0.05 * spread
    assert (fast - plain).abs().mean().item() < 0.005 * spread


def test_generation_runs_through_the_int8_layers(monkeypatch):
    # generate_text with the KV cache, batch 3: one fast kernel call per layer and decoding
    # step; the CPU decoding fast paths (packing) stand aside for int8 layers
    model = int8.quantize_(_pair())
    calls = _spy(monkeypatch)
    idx = torch.randint(0, 211, (3, 6), generator=torch.Generator().manual_seed(4))
    with cpu_kernels.packed_for_cpu(model, 3, greedy=True) as session:
        assert session.greedy is None and not cpu_kernels.is_packed(model.out_head)
    out = generate_text(model, idx, 5, eos_id=None)
    assert out.shape == (3, 11) and torch.equal(out[:, :6], idx)
    # the prompt (18 rows) goes through the bf16 matmul, then its last position's head,
    # then 4 decoding steps x (12 block matrices + the head), 3 rows each: through gemm_q8
    # where it is built (up to 16 rows), else int8_kernel.c
    kernel = "own" if int8.OWN_KERNEL else "int8pack"
    step = "q8" if int8.q8_kernel() else kernel
    assert calls == [(step, 3)] * (1 + 4 * 13)
    # two rows: the prompt (12 rows) too
    calls.clear()
    generate_text(model, idx[:2], 5, eos_id=None)
    prompt = [(step, 12)] * 12 if int8.q8_kernel() or int8.OWN_KERNEL else []
    assert calls == prompt + [(step, 2)] * (1 + 4 * 13)
    # gemm_q8 off for batches (its own choice): int8_kernel.c again
    if int8.OWN_KERNEL:
        monkeypatch.setattr(int8, "dynamic_q8_on", lambda rows=1: rows <= 2)
        calls.clear()
        generate_text(model, idx, 5, eos_id=None)
        assert calls == [("own", 3)] * (1 + 4 * 13)


# ---------------------------------------------------------------------------------------
# A trained model: perplexity on held-out text, greedy tokens

class _Bytes:
    """A tokenizer of UTF-8 bytes (what evaluate_perplexity asks of one)."""
    n_vocab = 256

    @staticmethod
    def decode_single_token_bytes(i):
        return bytes([i])


@pytest.fixture(scope="module")
def trained():
    """(model, held-out byte ids): a 2-layer GPT trained for a few seconds on 90% of the
    default corpus, read as bytes (vocabulary 256), and the other 10%."""
    from dataset import default_corpus_text
    from train_utils import train_model

    data = torch.tensor(list(default_corpus_text().encode()), dtype=torch.long)
    split = int(len(data) * 0.9)
    train, held_out = data[:split], data[split:]
    T = 64
    n = (len(train) - 1) // T
    x = train[:n * T].view(n, T)
    y = train[1:n * T + 1].view(n, T)
    loader = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True, drop_last=True)
    torch.manual_seed(0)
    cfg = {"vocab_size": 256, "context_length": T, "emb_dim": 96, "n_heads": 4,
           "n_layers": 2, "drop_rate": 0.0, "qkv_bias": True, "tie_embeddings": True}
    model = GPTModel(cfg)
    threads = torch.get_num_threads()           # one thread: see one_thread
    torch.set_num_threads(1)
    try:
        train_model(model, loader, loader, device="cpu", max_steps=150, learning_rate=3e-3,
                    warmup_steps=15, eval_freq=10**6, eval_iter=1, progress=False)
    finally:
        torch.set_num_threads(threads)
    return model.eval(), held_out[:6000]


@pytest.fixture
def one_thread():
    """A model this small gains nothing from two threads, and loses a lot when the machine
    is busy (two threads that wait for each other)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_int8_perplexity_within_2_percent_of_fp32(trained, one_thread):
    from evaluate import evaluate_perplexity

    model, held_out = trained

    def perplexity(m):
        return evaluate_perplexity(m, held_out, stride=32, batch_size=64, tokenizer=_Bytes,
                                   progress=False)["perplexity"]

    fp32 = perplexity(model)
    assert fp32 < 16.0                     # trained: far below the 256 of a uniform guess
    for dtype in (torch.float32, torch.bfloat16):      # the activations' precision
        q = int8.quantize_(copy.deepcopy(model), dtype)
        fast = perplexity(q)
        with int8.disabled():
            plain = perplexity(q)
        # measured: +0.02% (bf16), +0.01% (fp32)
        assert abs(fast / fp32 - 1) < 0.02, dtype
        assert abs(plain / fp32 - 1) < 0.02, dtype
        assert abs(fast / plain - 1) < 0.005, dtype


def test_int8_one_token_decoding_perplexity_within_2_percent_of_fp32(trained, one_thread,
                                                                    monkeypatch):
    # Batch-1 decoding quantizes each product's input row to int8 as well (gemm_q8, in the
    # one-call steps of engine/decoder.py): its perplexity, token by token through the KV
    # cache as generation computes it, against fp32's
    if int8.q8_kernel() is None:
        pytest.skip("gemm_q8 needs decode_kernel.c, which cannot be built here")
    from engine import decoder
    model, held_out = trained
    T = model.cfg["context_length"]
    steps, call = [], decoder._OneToken.__call__
    monkeypatch.setattr(decoder._OneToken, "__call__",
                        lambda self, *args: steps.append(1) or call(self, *args))

    def perplexity(m):
        total, n = 0.0, 0
        with torch.inference_mode(), decoder.decoding(m, 1, greedy=False):
            for start in range(0, 12 * T, T):
                ids = held_out[start:start + T + 1]
                cache = m.new_cache(1, max_len=T)
                for i in range(T):
                    logits = m(ids[i:i + 1][None], cache)[0, -1].float()
                    total -= torch.log_softmax(logits, -1)[ids[i + 1]].item()
                    n += 1
        return float(torch.exp(torch.tensor(total / n)))

    fp32 = perplexity(model)
    fp32_steps = len(steps)
    q = int8.quantize_(copy.deepcopy(model))
    assert q.tok_emb.weight.dtype == torch.float32       # fp32 activations: the one-row kernel
    int8_ppl = perplexity(q)
    assert fp32 < 16.0
    assert abs(int8_ppl / fp32 - 1) < 0.02          # measured: -0.008%
    # every token of both went through the one-call steps
    assert fp32_steps == 12 * T and len(steps) == 2 * 12 * T


def test_int8_greedy_tokens_mostly_equal_fp32(trained, one_thread):
    model, held_out = trained
    q = int8.quantize_(copy.deepcopy(model))
    prompts = torch.stack([held_out[i:i + 16] for i in range(0, 4000, 500)])   # (8, 16)
    ref = generate_text(model, prompts, 32, eos_id=None)[:, 16:]
    got = generate_text(q, prompts, 32, eos_id=None)[:, 16:]
    # the first token of each row comes from the same logits up to the quantization; the
    # later ones may follow a different token once a row has diverged
    assert float((got[:, 0] == ref[:, 0]).float().mean()) >= 7 / 8
    assert float((got == ref).float().mean()) >= 0.75


# ---------------------------------------------------------------------------------------
# Where users ask for it: dtype="int8" in the loaders, --dtype int8 on the command lines

def test_the_loaders_and_command_lines_take_int8(tmp_path, tiny_cfg, capsys):
    import generate
    from dataset import get_tokenizer
    from download_weights_hf import load_gpt2_hf
    from lora import add_lora
    from model import load_checkpoint, save_checkpoint

    hf = make_hf_model()
    hf.save_pretrained(tmp_path / "hf")
    ours = _pair(tie=True)
    x = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    with torch.no_grad():
        expected = int8.quantize_(copy.deepcopy(ours))(x)
    from_hf = load_gpt2_hf(tmp_path / "hf", dtype="int8")
    path = save_checkpoint(tmp_path / "m.pth", ours)
    from_pth = load_checkpoint(path, dtype="int8")
    for model in (from_hf, from_pth):
        assert int8.is_quantized(model)
        with torch.no_grad():
            torch.testing.assert_close(model(x), expected)
    with pytest.raises(ValueError, match="int8 model is for inference"):
        save_checkpoint(tmp_path / "again.pth", from_pth)
    with pytest.raises(ValueError, match="load the model in fp32 or bf16, not int8"):
        add_lora(from_pth, 2)
    # generate.py --dtype int8: the tokens generate_text gives the quantized model
    torch.manual_seed(0)
    tiny = GPTModel(tiny_cfg).eval()
    path = save_checkpoint(tmp_path / "tiny.pth", tiny)
    out = generate.main(["--weights", str(path), "--prompt", "Hello", "--dtype", "int8",
                         "--temperature", "0", "--max-new-tokens", "6", "--device", "cpu"])
    tok = get_tokenizer()
    ids = generate_text(int8.quantize_(copy.deepcopy(tiny)),
                        torch.tensor([tok.encode("Hello")]), 6, eos_id=tok.eot_token)
    assert out == tok.decode(ids[0].tolist()).split("<|endoftext|>")[0]
    capsys.readouterr()
