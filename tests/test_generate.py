import io
import math

import pytest
import torch

from conftest import small_gpt
from dataset import get_tokenizer
from engine import cpu_kernels, native
from generate import (
    TextStreamer,
    generate_and_print,
    generate_text,
    generate_tokens,
    main,
    sample_next_token,
    text_to_token_ids,
    token_ids_to_text,
)
from model import GPTModel, Linear, save_checkpoint


def test_text_round_trip_and_special_token():
    tok = get_tokenizer()
    ids = text_to_token_ids("Hello, world!<|endoftext|>", tok)
    assert ids.tolist() == [[15496, 11, 995, 0, 50256]]
    assert token_ids_to_text(ids, tok) == "Hello, world!<|endoftext|>"
    batch = torch.tensor([[15496, 11], [995, 0]])
    assert token_ids_to_text(batch, tok) == ["Hello,", " world!"]


@pytest.mark.device
@pytest.mark.parametrize("batch", [1, 4])
def test_kv_cache_generation_equals_full_recompute(device_pair, device, batch):
    _, ours = device_pair
    prompt = torch.randint(0, 211, (batch, 6), generator=torch.Generator().manual_seed(0))
    prompt = prompt.to(device)
    # 50 new tokens run past the 40-token context, so the sliding-window path is covered too.
    for kwargs in ({}, {"temperature": 1.3, "top_k": 20, "top_p": 0.9}):
        with_cache = generate_text(ours, prompt, 50, 40, use_cache=True,
                                   generator=torch.Generator(device).manual_seed(7), **kwargs)
        without = generate_text(ours, prompt, 50, 40, use_cache=False,
                                generator=torch.Generator(device).manual_seed(7), **kwargs)
        assert with_cache.shape == (batch, 56)
        assert with_cache.tolist() == without.tolist()


def test_sampling_matches_hugging_face_at_same_seed(hf_pair):
    hf, ours = hf_pair
    prompt = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    settings = {"temperature": 0.9, "top_k": 30, "top_p": 0.95}
    torch.manual_seed(42)
    with torch.no_grad():
        theirs = hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=True,
                             max_new_tokens=25, pad_token_id=0, **settings)
    torch.manual_seed(42)
    mine = generate_text(ours, prompt, 25, 40, **settings)
    assert mine.tolist() == theirs.tolist()


def test_golden_sampled_ids_at_fixed_seed():
    # Pins the whole sampling path (init, forward, temperature/top-k/top-p, RNG use): a
    # change here means users' seeded runs would change, so it must be deliberate.
    torch.manual_seed(123)
    model = GPTModel({"vocab_size": 100, "context_length": 16, "emb_dim": 16, "n_heads": 2,
                      "n_layers": 1, "drop_rate": 0.0, "qkv_bias": False})
    out = generate_text(model, torch.tensor([[1, 2, 3]]), 12, 16, temperature=1.0, top_k=10,
                        top_p=0.9, generator=torch.Generator().manual_seed(5))
    assert out.tolist() == [[1, 2, 3, 51, 3, 85, 51, 3, 81, 94, 24, 60, 89, 33, 92]]


def test_top_k_keeps_exactly_k_even_with_ties():
    logits = torch.zeros(1, 10)          # ten tied values: a threshold test would keep all
    g = torch.Generator().manual_seed(0)
    seen = {sample_next_token(logits, 1.0, top_k=3, generator=g).item() for _ in range(300)}
    assert len(seen) == 3


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    draw = lambda p: {sample_next_token(logits, 1.0, top_p=p, generator=g).item()
                      for _ in range(400)}
    assert draw(0.8) == {0, 1}
    assert draw(0.81) == {0, 1, 2}
    assert draw(0.4) == {0}


def test_greedy_ignores_filters():
    logits = torch.tensor([[0.1, 2.0, 0.3], [5.0, 0.0, 1.0]])
    assert sample_next_token(logits, 0.0, top_k=1, top_p=0.5).tolist() == [[1], [0]]


def test_greedy_in_bf16_takes_the_first_of_tied_maxima():
    # 1.0 and 1.001 are the same bfloat16 number: a tie, resolved to the lower index
    logits = torch.tensor([[0.5, 1.0, 1.001, -2.0], [3.0, 3.0, 1.0, 3.0]]).to(torch.bfloat16)
    assert sample_next_token(logits, 0.0).tolist() == [[1], [0]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_own_argmax_gives_torchs_ids_ties_nans_and_infinities_included(kernel_build, monkeypatch,
                                                                        dtype):
    # decode_kernel.c's argmax_rows (cpu_kernels.greedy_ids) against torch.argmax: rows of
    # lengths around its vectors (8 or 16 floats) and pieces (256), the largest in a piece,
    # in the tail or in both (a tie), NaNs, infinities and signed zeros anywhere
    try:
        native.decode_kernels()
    except native.BUILD_ERRORS as e:
        pytest.skip(f"decode_kernel.c cannot be built here: {e}")
    monkeypatch.setattr(cpu_kernels, "OWN_ARGMAX", True)
    g = torch.Generator().manual_seed(0)
    cases = []
    for n in (1, 7, 8, 15, 16, 17, 255, 256, 257, 511, 513, 1000, 1024, 50257):
        x = torch.randn(3, n, generator=g)
        cases += [x, x.round(), -x.abs(), torch.zeros(2, n), -torch.zeros(2, n),
                  torch.full((1, n), -math.inf), x.t().contiguous().t()]
        for at in sorted({0, n // 2, n - 1}):
            for value in (math.nan, math.inf, -math.inf, 100.0):
                y = x.clone()
                y[:, at] = value
                cases.append(y)
            y = x.clone()
            y[0, [at, n - 1]] = 100.0                       # tied: the first
            y[1, [at, 0]] = math.nan                        # NaNs: the first
            y[2, at] = -math.inf
            cases.append(y)
    for x in cases:
        x = x.to(dtype)
        got = cpu_kernels.greedy_ids(x)
        assert got is not None and torch.equal(got, x.float().argmax(dim=-1, keepdim=True)), x
    # generation takes it: the same tokens as with torch.argmax
    model, prompt = small_gpt().to(dtype), torch.tensor([[1, 2, 3]])
    own = generate_text(model, prompt, 10)
    monkeypatch.setattr(cpu_kernels, "OWN_ARGMAX", False)
    assert cpu_kernels.greedy_ids(cases[0].to(dtype)) is None
    assert torch.equal(generate_text(model, prompt, 10), own)


def test_eos_is_handled_per_row(hf_pair):
    _, ours = hf_pair
    prompt = torch.tensor([[10, 20, 30], [40, 50, 60]])
    run = lambda **kw: generate_text(ours, prompt, 12, 40, temperature=1.0,
                                     generator=torch.Generator().manual_seed(12), **kw)
    free = run()
    eos = free[0, 5].item()                      # row 0's third new token becomes "EOS"
    assert eos not in free[1, 3:].tolist(), "pick a seed whose row 1 never emits it"
    stopped = run(eos_id=eos)
    first_eos = free[0, 3:].tolist().index(eos) + 3
    assert stopped[0, :first_eos + 1].tolist() == free[0, :first_eos + 1].tolist()
    assert set(stopped[0, first_eos:].tolist()) == {eos}
    assert stopped[1].tolist() == free[1].tolist()      # row 1 runs on, unaffected


def test_generation_stops_when_all_rows_hit_eos(hf_pair):
    _, ours = hf_pair
    prompt = torch.tensor([[10, 20, 30]])
    free = generate_text(ours, prompt, 12, 40)
    stopped = generate_text(ours, prompt, 12, 40, eos_id=free[0, 4].item())
    assert stopped.shape[1] <= 5


def test_long_prompt_is_left_cropped(hf_pair):
    _, ours = hf_pair
    long_prompt = torch.randint(0, 211, (1, 70), generator=torch.Generator().manual_seed(2))
    out = generate_text(ours, long_prompt, 5, 40)
    cropped = generate_text(ours, long_prompt[:, -40:], 5, 40)
    assert out.shape == (1, 75)
    assert out[:, 70:].tolist() == cropped[:, 40:].tolist()


@pytest.mark.parametrize("kwargs, match", [
    ({"top_k": 0}, "top_k must be a positive int"),
    ({"top_p": 0.0}, "top_p must be in \\(0, 1\\]"),
    ({"top_p": 1.5}, "top_p must be in \\(0, 1\\]"),
    ({"temperature": -0.1}, "temperature must be 0 .greedy. or a finite number"),
])
def test_bad_sampling_arguments(hf_pair, kwargs, match):
    _, ours = hf_pair
    with pytest.raises(ValueError, match=match):
        generate_text(ours, torch.tensor([[1, 2]]), 5, 40, **kwargs)


def test_empty_prompt_is_an_error(hf_pair):
    _, ours = hf_pair
    with pytest.raises(ValueError, match="prompt must be a non-empty"):
        generate_text(ours, torch.zeros(1, 0, dtype=torch.long), 5, 40)


def test_streaming_yields_each_step_and_prints_split_utf8():
    tok = get_tokenizer()
    text = " naïve café 🙂 done 𝔘𝔫𝔦𝔠𝔬𝔡𝔢"
    ids = tok.encode(text)

    def is_partial(i):
        try:
            tok.decode_single_token_bytes(i).decode("utf-8")
            return False
        except UnicodeDecodeError:
            return True

    assert any(is_partial(i) for i in ids), "some token must end mid-character"
    buf = io.StringIO()
    streamer = TextStreamer(tok, file=buf)
    for i in ids:
        streamer(torch.tensor([[i]]))
    assert buf.getvalue() == text


def test_generate_tokens_is_an_iterator(hf_pair):
    _, ours = hf_pair
    steps = list(generate_tokens(ours, torch.tensor([[1, 2, 3]]), 7, 40))
    assert len(steps) == 7 and all(s.shape == (1, 1) for s in steps)
    assert torch.cat(steps, 1).tolist() == generate_text(ours, torch.tensor([[1, 2, 3]]), 7,
                                                         40)[:, 3:].tolist()


def test_generate_and_print_and_cli(tmp_path, tiny_cfg, capsys):
    torch.manual_seed(0)
    model = GPTModel(tiny_cfg)
    text = generate_and_print(model, get_tokenizer(), "cpu", "Every effort", max_new_tokens=5)
    assert text.startswith("Every effort") and capsys.readouterr().out.strip()
    path = save_checkpoint(tmp_path / "tiny.pth", model)
    out = main(["--weights", str(path), "--prompt", "Hello there", "--max-new-tokens", "6",
                "--seed", "1", "--device", "cpu", "--temperature", "0"])
    printed = capsys.readouterr().out
    assert printed.startswith("Hello there") and out.startswith("Hello there")
    ids = text_to_token_ids("Hello there", get_tokenizer())
    expected = token_ids_to_text(generate_text(model, ids, 6, 32, eos_id=50256), get_tokenizer())
    assert out == expected
    # --dtype bf16: the same as generating with the model converted to bfloat16
    out = main(["--weights", str(path), "--prompt", "Hello there", "--max-new-tokens", "6",
                "--device", "cpu", "--temperature", "0", "--dtype", "bf16"])
    bf16 = model.to(torch.bfloat16)
    assert out == token_ids_to_text(generate_text(bf16, ids, 6, 32, eos_id=50256),
                                    get_tokenizer())


# ---- oneDNN-packed weights (the CPU decoding path on x86) --------------------------------

needs_packing = pytest.mark.skipif(not cpu_kernels.available(),
                                   reason="oneDNN packing is used on x86 CPUs only")
# copies of some kind: oneDNN's (x86), or OneRow copies for our kernels (x86-64, 64-bit Arm)
needs_copies = pytest.mark.skipif(
    not (cpu_kernels.available() or native.kernel_isa()),
    reason="no weight copies for decoding here: no oneDNN (x86) and no kernel of ours")


def _small_model(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    model = GPTModel({"vocab_size": 211, "context_length": 40, "emb_dim": 48, "n_heads": 4,
                      "n_layers": 2, "drop_rate": 0.0, "qkv_bias": True})
    return model.to(dtype).eval()


def _packed_logits(model, idx):
    with torch.no_grad(), cpu_kernels.packed_for_cpu(model, idx.shape[0]) as session:
        assert all(cpu_kernels.is_packed(m) for m in model.modules()
                   if isinstance(m, Linear)), "packing was not applied"
        return session.logits(model.hidden_states(idx))


@needs_copies
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("batch", [1, 3])
def test_packed_weights_compute_the_plain_forward(dtype, tol, batch):
    if cpu_kernels.copy_kinds(dtype, batch) == [cpu_kernels.PLAIN]:
        pytest.skip("no bf16 copies for batches here: oneDNN has no bf16 products")
    model = _small_model(dtype=dtype)
    idx = torch.randint(0, 211, (batch, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), cpu_kernels.disabled():       # the plain PyTorch forward
        plain = model(idx)
    packed = _packed_logits(model, idx)
    assert packed.dtype == dtype
    torch.testing.assert_close(packed.float(), plain.float(), atol=tol, rtol=tol)
    # outside the block every layer is back to its own weights
    assert not any(cpu_kernels.is_packed(m) for m in model.modules() if isinstance(m, Linear))


@needs_packing
def test_packed_copies_follow_weight_changes_and_leave_with_training():
    model = _small_model()
    idx = torch.randint(0, 211, (2, 7), generator=torch.Generator().manual_seed(2))
    _packed_logits(model, idx)                              # fills the cache
    first = cpu_kernels._PACKED.get(model.trf_blocks[0].ff.fc.weight)[2]
    _packed_logits(model, idx)
    assert cpu_kernels._PACKED.get(model.trf_blocks[0].ff.fc.weight)[2] is first   # reused
    # an in-place edit, a load_state_dict and an optimizer step must all be seen
    with torch.no_grad():
        model.trf_blocks[0].ff.fc.weight.mul_(3.0)
    with torch.no_grad():
        expected = model(idx)
    torch.testing.assert_close(_packed_logits(model, idx), expected, atol=1e-5, rtol=1e-5)
    other = _small_model(seed=5)
    model.load_state_dict(other.state_dict())
    with torch.no_grad():
        expected = other(idx)
    torch.testing.assert_close(_packed_logits(model, idx), expected, atol=1e-5, rtol=1e-5)
    # greedy generation right after a training step uses the new weights
    model.train()
    assert not any(p in cpu_kernels._PACKED for p in model.parameters())   # dropped
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model(idx).logsumexp(-1).mean().backward()
    opt.step()
    model.eval()
    out = generate_text(model, idx, 5, 40)
    ref = idx
    with torch.no_grad():
        for _ in range(5):
            ref = torch.cat([ref, model(ref)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert out.tolist() == ref.tolist()


def test_packing_stays_out_of_training_and_can_be_turned_off(monkeypatch):
    model = _small_model()
    for switch in ("PACKING", "ENABLED"):       # the packing switch, and the one for all
        monkeypatch.setattr(cpu_kernels, switch, False)
        with torch.no_grad(), cpu_kernels.packed_for_cpu(model, 1) as session:
            assert session.logits == model.logits
            assert not any(cpu_kernels.is_packed(m) for m in model.modules()
                           if isinstance(m, Linear))
        monkeypatch.undo()
    monkeypatch.setattr(cpu_kernels, "PACK_FP32_BATCH_1", False)     # as on Intel CPUs
    with torch.no_grad(), cpu_kernels.packed_for_cpu(model, 1) as session:
        assert session.logits == model.logits
    if cpu_kernels.available():
        with torch.no_grad(), cpu_kernels.packed_for_cpu(model, 2):
            assert all(cpu_kernels.is_packed(m) for m in model.modules() if isinstance(m, Linear))
    monkeypatch.undo()
    with cpu_kernels.packed_for_cpu(model, 1) as session:   # gradients on: no packing
        assert session.logits == model.logits
        assert not any(cpu_kernels.is_packed(m) for m in model.modules()
                       if isinstance(m, Linear))


@needs_packing
@pytest.mark.parametrize("batch", [1, 3])
def test_autocast_decoding_packs_bfloat16_copies_once(batch):
    # Under bf16 autocast the fp32 weights are packed as bf16 copies (autocast would cast
    # every weight again at every step): the logits are autocast's, the weights stay fp32.
    if cpu_kernels.copy_kinds(torch.bfloat16, batch) == [cpu_kernels.PLAIN]:
        pytest.skip("no bf16 copies for batches here: oneDNN has no bf16 products")
    model = _small_model()
    idx = torch.randint(0, 211, (batch, 7), generator=torch.Generator().manual_seed(3))
    fc = model.trf_blocks[0].ff.fc
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        plain = model(idx)
        packed = _packed_logits(model, idx)
        assert cpu_kernels._PACKED.get(fc.weight)[2].dtype == torch.bfloat16
        out = generate_text(model, idx, 6, 40)
        ref = idx
        for _ in range(6):
            ref = torch.cat([ref, model(ref)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert packed.dtype == plain.dtype == torch.bfloat16
    torch.testing.assert_close(packed.float(), plain.float(), atol=2e-2, rtol=2e-2)
    assert out.tolist() == ref.tolist()
    assert fc.weight.dtype == torch.float32
    # out of autocast again, the copies are fp32 ones and give the fp32 logits
    with torch.no_grad():
        torch.testing.assert_close(_packed_logits(model, idx), model(idx), atol=1e-5, rtol=1e-5)
    assert cpu_kernels._PACKED.get(fc.weight)[2].dtype == torch.float32


@needs_packing
def test_packed_copies_are_not_reused_for_a_new_storage_at_the_old_address():
    # .to(bf16).to(fp32) gives every weight a new storage, which the allocator often puts
    # at the old address; the cached copy must not be taken for the new weights' one.
    idx = torch.randint(0, 211, (2, 7), generator=torch.Generator().manual_seed(2))
    for seed in range(8):               # the address is reused for some seeds, not all
        model = _small_model(seed=seed)
        _packed_logits(model, idx)
        model.to(torch.bfloat16).to(torch.float32)
        with torch.no_grad():
            expected = model(idx)
        torch.testing.assert_close(_packed_logits(model, idx), expected, atol=1e-5, rtol=1e-5)


@needs_packing
def test_a_paused_generator_leaves_the_model_its_own_weights():
    # Code that runs while generate_tokens waits at a yield (here: a training step and a
    # load_state_dict) must see the real weights, not the packed copies.
    model = _small_model()
    idx = torch.randint(0, 211, (1, 5), generator=torch.Generator().manual_seed(4))
    stream = generate_tokens(model, idx, 20)
    next(stream)                                        # suspended inside the packed block
    model.train()
    model(idx).logsumexp(-1).mean().backward()
    assert all(p.grad is not None for p in model.parameters())
    other = _small_model(seed=9)
    model.load_state_dict(other.state_dict())
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(idx), other(idx), atol=1e-6, rtol=1e-6)
    assert len(list(stream)) == 19                      # and the stream still finishes
    assert not any(cpu_kernels.is_packed(m) for m in model.modules() if isinstance(m, Linear))


def test_sampling_arguments_are_checked():
    import numpy as np
    logits = torch.tensor([[0.0, 3.0, 1.0]])
    assert sample_next_token(logits, 1.0, top_k=np.int64(1)).tolist() == [[1]]
    for bad in (float("nan"), float("inf"), 1e-45, -0.5):
        with pytest.raises(ValueError, match="temperature must be 0 .greedy. or a finite"):
            sample_next_token(logits, bad)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="top_k must be a positive int"):
            sample_next_token(logits, 1.0, top_k=bad)
    model = _small_model()
    with pytest.raises(ValueError, match="context_size must be a positive int"):
        generate_text(model, torch.tensor([[1, 2]]), 3, context_size=-5)


def test_streamer_prints_an_unfinished_character_at_the_end():
    tok = get_tokenizer()
    ids = tok.encode("a\U0001d518")             # 'a' + a 4-byte character, split over tokens
    cut = ids[:-1]                              # the last token would finish the character
    out = io.StringIO()
    streamer = TextStreamer(tok, file=out)
    for i in cut:
        streamer(torch.tensor([[i]]))
    streamer.finish()
    assert out.getvalue() == token_ids_to_text(torch.tensor(cut), tok)
    assert out.getvalue().endswith("\ufffd")


@pytest.mark.parametrize("argv, message", [
    (["--top-k", "-3"], "--top-k must be a positive int"),
    (["--temperature", "nan"], "--temperature must be 0"),
    (["--top-p", "1.5"], "--top-p must be in"),
    (["--prompt", ""], "--prompt is empty"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
])
def test_generate_cli_refuses_bad_arguments_before_loading(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--weights", "does-not-matter.pth", *argv])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_generate_cli_says_what_is_wrong_with_the_weights(tmp_path, capsys):
    # a folder is a Hugging Face model folder now (generate.py takes any model source)
    for weights, message in ((tmp_path, "has no config.json; is it a save_pretrained folder?"),
                             (tmp_path / "nope.pth", "not found; train one")):
        with pytest.raises(SystemExit) as e:
            main(["--weights", str(weights)])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err


@needs_copies
@pytest.mark.parametrize("batch", [1, 3])
def test_screened_argmax_is_the_fp32_argmax(batch):
    # The bfloat16 screen plus the fp32 recheck must pick exactly what argmax over all
    # fp32 logits picks, near-ties included: rows 7 and 8 differ in the last bits only, and
    # rows 20 and 30 are equal (the tie goes to the lower index).
    torch.manual_seed(0)
    weight = torch.randn(211, 48) * 0.02
    weight[8] = weight[7] * (1 + 2 ** -20)
    weight[30] = weight[20]
    if not cpu_kernels.screened_head(batch):
        pytest.skip("no bf16 copies for batches here: oneDNN has no bf16 products")
    screen = cpu_kernels.packed_weight(weight, batch, dtype=torch.bfloat16)
    norms = weight.norm(dim=1)
    for trial in range(200):
        h = torch.randn(batch, 48)
        if trial % 3 == 0:
            h[0] = weight[7] * 50          # row 0 then favours token 7 over its near-twin 8
        if trial % 3 == 1:
            h[0] = weight[20] * 50         # a real tie between 20 and 30
        got = cpu_kernels.screened_argmax(h, weight, screen, norms)
        assert got.tolist() == (h @ weight.T).argmax(dim=-1, keepdim=True).tolist()
    h[-1, 3] = float("nan")                # a diverged model: no bound holds, no crash
    got = cpu_kernels.screened_argmax(h, weight, screen, norms)
    assert got.tolist() == (h @ weight.T).argmax(dim=-1, keepdim=True).tolist()


@needs_packing
def test_greedy_generation_reads_a_bfloat16_head_and_sampling_an_fp32_one():
    model = _small_model()
    idx = torch.randint(0, 211, (2, 5), generator=torch.Generator().manual_seed(6))
    head = model.out_head.weight
    out = generate_text(model, idx, 6, 40)
    # (where no bf16 copy of 8 rows can be made, the greedy head is the fp32 one)
    screened = cpu_kernels.screened_head(2)
    assert cpu_kernels._PACKED.get(head)[2].dtype == (torch.bfloat16 if screened
                                                      else torch.float32)
    ref = idx
    with torch.no_grad(), cpu_kernels.disabled():       # the plain PyTorch forward
        for _ in range(6):
            ref = torch.cat([ref, model(ref)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert out.tolist() == ref.tolist()
    generate_text(model, idx, 3, 40, temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert cpu_kernels._PACKED.get(head)[2].dtype == torch.float32


@needs_packing
def test_without_onednn_bf16_no_bf16_copy_is_asked_for(monkeypatch):
    # On a CPU whose oneDNN has no bf16 products (AVX2), packing a bf16 copy raises; greedy
    # fp32 decoding once asked for one (the screened head) and failed there
    from engine import devices
    monkeypatch.setattr(devices, "onednn_bf16", lambda: False)
    own = cpu_kernels.own_gemv() is not None
    assert cpu_kernels.copy_kinds(torch.bfloat16, 8) == [cpu_kernels.PLAIN]
    assert cpu_kernels.copy_kinds(torch.bfloat16, 1, need_copy=True) == (
        [cpu_kernels.OWN] if own else [cpu_kernels.PLAIN])
    assert cpu_kernels.PACKED in cpu_kernels.copy_kinds(torch.float32, 8)
    assert not cpu_kernels.screened_head(8) and cpu_kernels.screened_head(1) is own
    assert cpu_kernels.PACKED not in cpu_kernels._time_copies(torch.bfloat16, 8)
    with pytest.raises(ValueError, match="no bf16 copy for 8-row products can be made here"):
        cpu_kernels.packed_weight(torch.randn(5, 4), 3, dtype=torch.bfloat16)
    model = _small_model()
    for batch in (1, 2):
        idx = torch.randint(0, 211, (batch, 5), generator=torch.Generator().manual_seed(6))
        out = generate_text(model, idx, 6, 40)
        with torch.no_grad(), cpu_kernels.disabled():
            ref = generate_text(model, idx, 6, 40)
        assert out.tolist() == ref.tolist()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            generate_text(model, idx, 3, 40)                 # bf16 products, no bf16 copies
        generate_text(model.to(torch.bfloat16), idx, 3, 40)
        model.float()


@needs_copies
def test_one_row_fp32_products_through_our_kernel_equal_the_plain_product():
    # engine/decode_kernel.c: the one-row fp32 products of batch-1 decoding (where it builds)
    if cpu_kernels.own_gemv() is None:
        pytest.skip(f"our gemv kernel cannot be built here: {cpu_kernels.GEMV_STATUS}")
    g = torch.Generator().manual_seed(0)
    for k, n in ((48, 211), (37, 5), (768, 2304), (100, 17)):   # tails of 8 rows, of 16 sums
        w, b = torch.randn(k, n, generator=g), torch.randn(n, generator=g)   # W (in, out)
        x = torch.randn(1, 1, k, generator=g)
        rows = cpu_kernels.OneRow(w.t())
        torch.testing.assert_close(rows(x, b), x @ w + b, atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(rows(x, None), x @ w, atol=1e-4, rtol=1e-5)
        more = torch.randn(3, k, generator=g)                       # a prompt: PyTorch's product
        torch.testing.assert_close(rows(more, b), more @ w + b, atol=1e-4, rtol=1e-5)
    # batch-1 decoding multiplies with these copies, and the tokens are the plain ones
    model = _small_model()
    idx = torch.randint(0, 211, (1, 5), generator=torch.Generator().manual_seed(3))
    out = generate_text(model, idx, 8, 40, temperature=1.0,
                        generator=torch.Generator().manual_seed(0))
    assert isinstance(cpu_kernels._PACKED.get(model.trf_blocks[0].att.qkv.weight)[2],
                      cpu_kernels.OneRow)
    with cpu_kernels.disabled():
        ref = generate_text(model, idx, 8, 40, temperature=1.0,
                            generator=torch.Generator().manual_seed(0))
    assert out.tolist() == ref.tolist()


@needs_copies
def test_one_row_bf16_products_through_our_kernel_equal_a_bf16_product():
    # gemv_bf16: x rounded to bf16, bf16 weights, fp32 sums, the result rounded to bf16, as
    # a bf16 matmul (or autocast) gives it; the copy made from fp32 or bf16 weights
    if cpu_kernels.own_gemv() is None:
        pytest.skip(f"our gemv kernel cannot be built here: {cpu_kernels.GEMV_STATUS}")
    g = torch.Generator().manual_seed(1)
    for k, n in ((48, 211), (37, 5), (768, 2304), (100, 17), (64, 33)):
        w, b = torch.randn(k, n, generator=g), torch.randn(n, generator=g)   # W (in, out)
        x = torch.randn(1, k, generator=g)
        exact = x.bfloat16().float() @ w.bfloat16().float() + b.bfloat16().float()
        for source in (w, w.bfloat16()):
            rows = cpu_kernels.OneRow(source.t(), torch.bfloat16)
            y = rows(x, b.bfloat16())
            assert y.dtype == torch.bfloat16 and y.shape == (1, n)
            # one rounding of (nearly) the same fp32 sum to bf16: 2^-8 relative at most
            torch.testing.assert_close(y.float(), exact, rtol=2 ** -8, atol=1e-3)
            more = torch.randn(3, k, generator=g).bfloat16()          # a prompt: PyTorch's
            torch.testing.assert_close(rows(more, b.bfloat16()).float(),
                                       (more @ w.bfloat16() + b.bfloat16()).float(),
                                       rtol=2 ** -7, atol=1e-2)
