"""engine/decoder.py: one token of one row through every block in one C call, against
model.py's plain code (hidden states, the KV cache, generated tokens), and where it stands
aside."""

import contextlib
import copy
import subprocess

import pytest
import torch

from conftest import flag_in_a_fresh_process
from engine import cpu_kernels, decoder, int8, native
from generate import generate_text
from model import GPTModel

try:
    native.decode_kernels()
except (OSError, RuntimeError, subprocess.SubprocessError) as e:
    pytest.skip(f"decode_kernel.c cannot be built here: {e}", allow_module_level=True)


CONFIGS = {
    # 48 wide, 4 heads of 12 (attention in plain loops); untied, biases on q/k/v
    "48": {"vocab_size": 211, "context_length": 40, "emb_dim": 48, "n_heads": 4,
           "n_layers": 2, "drop_rate": 0.0, "qkv_bias": True},
    # 64 wide, 2 heads of 32 (attention 16 numbers at a time), untied, 4 layers
    "64": {"vocab_size": 150, "context_length": 48, "emb_dim": 64, "n_heads": 2,
           "n_layers": 4, "drop_rate": 0.0, "qkv_bias": True},
    # 40 wide (not a whole number of the kernels' 16- and 64-wide pieces), 5 heads of 8,
    # tied, no q/k/v biases
    "40": {"vocab_size": 97, "context_length": 24, "emb_dim": 40, "n_heads": 5,
           "n_layers": 3, "drop_rate": 0.0, "qkv_bias": False, "tie_embeddings": True},
}


def _model(name, seed=0, scale=3.0):
    """A random model; its matrices scaled up from GPT-2's init (std 0.02) so that
    attention and the GELU see numbers of all sizes, not only ones near zero."""
    torch.manual_seed(seed)
    model = GPTModel(CONFIGS[name]).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(scale)
            else:
                p.add_(torch.randn_like(p) * 0.1)      # LayerNorms and biases away from 1, 0
    return model


@pytest.fixture
def calls(monkeypatch):
    """A list that gets the cache position of every one-call step."""
    seen, step = [], decoder._OneToken.__call__

    def counted(self, model, token, cache):
        seen.append(cache.pos)
        return step(self, model, token, cache)
    monkeypatch.setattr(decoder._OneToken, "__call__", counted)
    return seen


def _steps(model, prompt, tokens, plain):
    """Hidden states (one per token, each (1, 1, C)) and the cache, after the prompt and then
    ``tokens`` one at a time, inside decoding() as generate.py runs; ``plain``: with the
    one-call steps off."""
    with torch.inference_mode(), decoder.decoding(model, 1, greedy=True):
        cache = model.new_cache(1, max_len=prompt.shape[1] + len(tokens))
        model.hidden_states(prompt, cache)
        with decoder.disabled() if plain else contextlib.nullcontext():
            out = [model.hidden_states(torch.tensor([[t]]), cache) for t in tokens]
        return torch.cat(out, dim=1), cache


def _ids(model, seed, prompt_len, n):
    """A random prompt (1, prompt_len) and n more token ids (a list) for ``model``."""
    g = torch.Generator().manual_seed(seed)
    vocab = model.cfg["vocab_size"]
    prompt = torch.randint(0, vocab, (1, prompt_len), generator=g)
    return prompt, torch.randint(0, vocab, (n,), generator=g).tolist()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_one_token_steps_equal_the_plain_forward(name, calls, kernel_build):
    model = _model(name)
    prompt, tokens = _ids(model, 1, 5, 12)
    fast, fast_cache = _steps(model, prompt, tokens, plain=False)
    assert calls == list(range(5, 17))               # every step went through the C call
    plain, plain_cache = _steps(model, prompt, tokens, plain=True)
    assert len(calls) == 12
    assert fast.shape == plain.shape == (1, 12, model.cfg["emb_dim"])
    assert fast.dtype == torch.float32 and fast_cache.pos == plain_cache.pos == 17
    # the same fp32 arithmetic, summed in another order (and exp, tanh by other formulas)
    # (measured: 8e-7 at most, on numbers of spread 1)
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast_cache.k, plain_cache.k, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast_cache.v, plain_cache.v, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_bf16_one_token_steps_are_the_bf16_forward_with_fp32_activations(name, calls,
                                                                          kernel_build):
    # A bf16 model: the same bf16 weights, KV cache and embeddings; the C steps keep every
    # activation in fp32 where the plain path rounds each to bf16 (8 significant bits), so
    # they land closer to the fp32 model's numbers than the plain bf16 path does
    model = _model(name)
    prompt, tokens = _ids(model, 8, 5, 10)
    exact, _ = _steps(model, prompt, tokens, plain=True)        # fp32 weights, plain code
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    fast, fast_cache = _steps(bf16, prompt, tokens, plain=False)
    assert len(calls) == 10 and fast.dtype == fast_cache.k.dtype == torch.bfloat16
    plain, plain_cache = _steps(bf16, prompt, tokens, plain=True)
    assert len(calls) == 10
    fast_err = (fast.float() - exact).abs().mean().item()
    plain_err = (plain.float() - exact).abs().mean().item()
    spread = exact.std().item()
    # measured: mean error 0.26-0.28% of the spread against 0.42-0.45% for the plain path;
    # fast and plain 1.5-2.2% apart at most (0.7% in the cache)
    assert fast_err < plain_err and fast_err < 0.005 * spread
    assert (fast.float() - plain.float()).abs().max().item() < 0.05 * spread
    assert (fast_cache.k.float() - plain_cache.k.float()).abs().max().item() < 0.03 * spread


def test_under_autocast_the_products_are_bf16_and_the_rest_fp32(calls, kernel_build):
    # An fp32 model decoding under bf16 autocast multiplies with bf16 copies; the C steps do
    # too, and keep the rest in fp32 (autocast's products also round their outputs to bf16)
    model = _model("64")
    prompt, tokens = _ids(model, 10, 5, 10)
    exact, _ = _steps(model, prompt, tokens, plain=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast, fast_cache = _steps(model, prompt, tokens, plain=False)
        assert len(calls) == 10 and fast_cache.k.dtype == torch.float32
        plain, _ = _steps(model, prompt, tokens, plain=True)
    assert len(calls) == 10
    spread = exact.std().item()          # (measured: 0.18% and 0.26% of it; 1.2% apart)
    fast_err = (fast.float() - exact).abs().mean().item()
    plain_err = (plain.float() - exact).abs().mean().item()
    assert fast_err <= plain_err and fast_err < 0.005 * spread
    assert (fast.float() - plain.float()).abs().max().item() < 0.05 * spread


def _like_the_one_call_steps(model):
    """``model`` (an int8 one) for model.py's plain code to compute what the one-call steps
    compute, up to the order of fp32 sums.

    The C steps keep every activation in fp32, whatever the model's activation dtype, and
    store the keys and values in the cache's dtype. For fp32 activations that is the plain
    int8 forward itself: the model is returned as it is. For bf16 ones (int8.activation_dtype
    where none of our int8 kernels is taken) it is the plain forward of a copy with the same int8
    weights, its bf16 embeddings, LayerNorms and biases widened to fp32 (exactly), and each
    key and value rounded to bf16 before attention reads it (as the C steps store them)."""
    if model.tok_emb.weight.dtype == torch.float32:
        return model
    wide = copy.deepcopy(model)
    for module in wide.modules():
        for name, p in module.named_parameters(recurse=False):
            setattr(module, name, torch.nn.Parameter(p.detach().float(), requires_grad=False))
    C = model.cfg["emb_dim"]

    def keys_and_values_in_bf16(layer, inputs, out):                 # out (1, 1, 3C)
        return torch.cat([out[..., :C], out[..., C:].bfloat16().float()], dim=-1)
    for block in wide.trf_blocks:
        block.att.qkv.register_forward_hook(keys_and_values_in_bf16)
    return wide


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("activations", ["fp32", "bf16"])
def test_int8_one_token_steps_equal_their_plain_int8_forward(name, activations, calls,
                                                             kernel_build):
    # An int8 model's activations are fp32 where our int8 kernels run and bf16 where they do
    # not (int8.activation_dtype): both are made here, whatever this CPU would choose. Each
    # one-call step against one step of the plain code computing what the C steps compute
    # (_like_the_one_call_steps), from the same cache (the one the C steps wrote).
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[activations]
    model = int8.quantize_(_model(name), dtype)
    like_model = _like_the_one_call_steps(model)
    assert model.tok_emb.weight.dtype == dtype
    prompt, tokens = _ids(model, 2, 4, 10)
    fast, like, fast_k, like_k = [], [], [], []
    with torch.inference_mode(), decoder.decoding(model, 1, greedy=True):
        cache = model.new_cache(1, max_len=prompt.shape[1] + len(tokens))
        model.hidden_states(prompt, cache)
        ref = like_model.new_cache(1, max_len=cache.max_len)
        for t in tokens:
            ref.k.copy_(cache.k), ref.v.copy_(cache.v)
            ref.pos = pos = cache.pos
            with decoder.disabled():
                like.append(like_model.hidden_states(torch.tensor([[t]]), ref))
            fast.append(model.hidden_states(torch.tensor([[t]]), cache))
            like_k.append(ref.k[:, :, :, pos].to(dtype))
            fast_k.append(cache.k[:, :, :, pos])
    assert len(calls) == 10 and fast[0].dtype == cache.k.dtype == dtype
    like = torch.cat(like, dim=1).to(dtype).float()                          # (1, 10, C)
    spread = like.std().item()
    # Both round each one-row product's input to int8 (gemm_q8), the same way. LayerNorm and
    # attention round differently in C and PyTorch (~1e-6 of the spread), and in bf16 both
    # round the same fp32 numbers to bf16 (the output, the keys), which may put a number
    # next to a rounding boundary on its two sides, one step of 2^-8 of it apart.
    step = 2.0 ** -8 if dtype == torch.bfloat16 else 0.0

    def off(a, b):                              # max over each step's numbers, in spreads
        a, b = a.float().flatten(1), b.float().flatten(1)
        return ((a - b).abs() - step * b.abs()).amax(dim=1) / spread
    errors = [off(f.flatten(1), w[None]) for f, w in zip(fast, like[0])]
    errors = torch.cat([*errors, *(off(f[None], w[None]) for f, w in zip(fast_k, like_k))])
    # A number that close to a boundary of the int8 grid can also land on its other side
    # (measured: in 8 of 480 steps over 8 seeds, 9e-4 to 1.1e-2 of the spread off): one input
    # moved by one step of 1/127 of its block's largest number, the outputs by less than
    # gemm_q8's own rounding moves them (up to 1.7% of the spread, test_engine_int8.py's
    # test_q8_kernel_equals_its_reference). So: all but a few steps equal to fp32's
    # rounding, every one within 5% of the spread.
    assert int((errors > 1e-5).sum()) <= 2 and errors.max().item() < 0.05, errors
    if dtype == torch.bfloat16:
        # and the plain bf16 path, which rounds every activation to bf16, is further off
        plain, _ = _steps(model, prompt, tokens, plain=True)
        fast = torch.cat(fast, dim=1).float()
        assert (fast - like).abs().mean() < (plain.float() - like).abs().mean()


@pytest.mark.parametrize("dtype", ["fp32", "int8"])
def test_generation_through_one_call_steps_gives_the_plain_tokens(dtype, calls, kernel_build):
    model = _model("48", seed=3)
    if dtype == "int8":
        model = int8.quantize_(model)
    prompt = torch.randint(0, 211, (1, 6), generator=torch.Generator().manual_seed(4))
    sample = {"temperature": 1.0, "top_k": 50}
    greedy = generate_text(model, prompt, 20, eos_id=None)
    sampled = generate_text(model, prompt, 20, generator=torch.Generator().manual_seed(5),
                            **sample)
    assert len(calls) == 2 * 19                   # every token after the prompt's first
    with decoder.disabled():
        plain_greedy = generate_text(model, prompt, 20, eos_id=None)
        plain_sampled = generate_text(model, prompt, 20,
                                      generator=torch.Generator().manual_seed(5), **sample)
    assert len(calls) == 2 * 19
    assert greedy.tolist() == plain_greedy.tolist()
    assert sampled.tolist() == plain_sampled.tolist()


def test_a_nan_stays_a_nan(calls, kernel_build):
    # a model gone wrong (a NaN in a weight) shows NaN through the one-call steps rather than
    # numbers: e^x clamps its input, and a NaN must pass through the clamp. (PyTorch's CPU
    # attention, which the plain path takes, may give finite numbers here: not compared.)
    model = _model("64")
    prompt, tokens = _ids(model, 1, 5, 3)
    with torch.no_grad():
        model.trf_blocks[1].att.qkv.weight[0, 3] = float("nan")     # a query number of head 0
    fast, cache = _steps(model, prompt, tokens, plain=False)
    assert len(calls) == 3 and torch.isnan(fast).all()
    # keys (layers, batch, heads, positions, d): the query's NaN reaches the keys from the
    # next layer on, at the positions the one-call steps wrote
    assert not torch.isnan(cache.k[:2]).any() and torch.isnan(cache.k[2:, :, :, 5:]).all()


def test_where_one_call_steps_stand_aside(monkeypatch, calls):
    model = _model("48")
    prompt = torch.randint(0, 211, (2, 6), generator=torch.Generator().manual_seed(6))
    generate_text(model, prompt, 4)                                 # batch 2
    mask = torch.tensor([[0, 1, 1, 1, 1, 1]])
    generate_text(model, prompt[:1], 4, attention_mask=mask)        # left padding
    generate_text(model, prompt[:1], 4, use_cache=False)            # no cache
    handle = model.trf_blocks[0].register_forward_hook(lambda *args: None)
    generate_text(model, prompt[:1], 4)                             # a hook to honour
    handle.remove()
    with cpu_kernels.disabled():                                    # every fast path off
        generate_text(model, prompt[:1], 4)
    with decoder.disabled():                                        # this one off
        generate_text(model, prompt[:1], 4)
    monkeypatch.setattr(decoder, "ONE_CALL", False)                 # off for this CPU
    generate_text(model, prompt[:1], 4)
    assert calls == []
    monkeypatch.setattr(decoder, "ONE_CALL", True)
    generate_text(model, prompt[:1], 4)
    assert calls == [6, 7, 8]
    # outside decoding() (a plain forward with a cache) the model's own code runs
    with torch.no_grad():
        cache = model.new_cache(1)
        model(prompt[:1], cache)
        model(prompt[:1, :1], cache)
    assert calls == [6, 7, 8]


def test_a_cache_of_another_shape_goes_to_the_plain_code(calls):
    model = _model("48")
    other = _model("64")
    with torch.no_grad(), decoder.decoding(model, 1):
        cache = other.new_cache(1)                  # 4 layers of 2 heads of 32, not 2 of 4 x 12
        with pytest.raises(RuntimeError):
            model(torch.tensor([[3]]), cache)       # PyTorch's own shape error
    assert calls == []


def test_a_paused_generation_sees_weight_changes_through_the_plain_code(calls):
    # generate_tokens is a generator: while it waits at a yield the caller may change the
    # weights; the one-call table points at the old copies, so it must stand aside then
    model = _model("48")
    prompt = torch.randint(0, 211, (1, 4), generator=torch.Generator().manual_seed(7))
    from generate import generate_tokens
    steps = generate_tokens(model, prompt, 5)
    next(steps)
    next(steps)
    assert calls == [4]
    assert decoder.one_token(model, prompt[:, :1], model.new_cache(1), None) is None


def test_environment_variable_turns_it_off():
    assert flag_in_a_fresh_process("decoder", "ENABLED", GPT2_ONE_CALL_DECODING="0") == "False"


def test_a_token_outside_the_vocabulary_is_the_plain_codes_error(calls):
    model = _model("48")
    with torch.no_grad(), decoder.decoding(model, 1):
        cache = model.new_cache(1)
        model(torch.tensor([[3]]), cache)                           # a step in C
        with pytest.raises(IndexError):
            model(torch.tensor([[211]]), cache)                     # PyTorch's lookup
    assert calls == [0]


def test_the_int8_table_keeps_the_quantized_model_unchanged():
    model = int8.quantize_(_model("40"))
    before = copy.deepcopy(model.state_dict())
    generate_text(model, torch.tensor([[1, 2, 3]]), 5)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


BUILDS = {"native": (), "AVX-512 without BF16 and VNNI": ("-mno-avx512bf16", "-mno-avx512vnni"),
          "AVX2": ("-mno-avx512f",), "Arm without dotprod": ("-march=armv8-a",)}


@pytest.mark.parametrize("build", list(BUILDS))
def test_each_build_of_the_kernels_computes_the_same_products(tmp_path, monkeypatch, build):
    # decode_kernel.c built for this CPU, as for an AVX-512 CPU without AVX512-BF16 and
    # AVX512-VNNI (bf16 products widened to fp32, int8 sums with AVX2's instructions), and
    # as for an AVX2 CPU (8-wide vectors); on Arm, for this CPU (NEON, with dotprod where it
    # has it) and as for one without dotprod: each one-row product against its reference,
    # the int8 one against gemm_q8's arithmetic in float64 (the same integer sums either way)
    from pathlib import Path

    from test_engine_int8 import _q8_reference
    arm = native.kernel_isa() == "neon"
    if build != "native" and arm != build.startswith("Arm"):
        pytest.skip("a build for the other CPU architecture")
    if build != "native" and not arm and native.kernel_isa() != "avx512":
        pytest.skip("builds without AVX-512 features need an AVX-512 CPU to differ")
    monkeypatch.setenv("GPT2_KERNEL_CACHE", str(tmp_path))
    lib = native.decode_signatures(
        native.build(Path(native.__file__).with_name("decode_kernel.c"), BUILDS[build]))
    isa = lib.isa().decode()
    assert isa.split()[0] == ("avx2" if build == "AVX2" else native.kernel_isa())
    if build != "native":
        assert "bf16" not in isa and "vnni" not in isa and "dotprod" not in isa
    g = torch.Generator().manual_seed(9)
    for n, k in ((211, 48), (5, 37), (33, 100), (64, 768)):      # tails of every width
        x, b = torch.randn(k, generator=g), torch.randn(n, generator=g)
        w = torch.randn(n, k, generator=g)
        for fn, weights, exact in (
                (lib.gemv_f32, w, w.double() @ x.double() + b),
                (lib.gemv_bf16, w.bfloat16(), w.bfloat16().double() @ x.bfloat16().double() + b)):
            y = torch.empty(n)
            assert fn(x.data_ptr(), weights.data_ptr(), b.data_ptr(), y.data_ptr(), n, k, 2) == 0
            torch.testing.assert_close(y.double(), exact, rtol=1e-5, atol=1e-5)
        q = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
        scale = (torch.rand(n, generator=g) / 64).bfloat16()
        xs = torch.randn(3, k, generator=g) * 4
        y = torch.empty(3, n)
        assert lib.gemm_q8(xs.data_ptr(), q.data_ptr(), scale.data_ptr(), b.data_ptr(),
                           y.data_ptr(), 3, n, k, 2) == 0
        ref = _q8_reference(xs, q, scale.float(), b)
        torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
