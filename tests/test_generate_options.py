"""Issue 15: transformers' generate() options, batches of prompts, stop strings."""

import io

import pytest
import torch

import generate
from dataset import get_tokenizer
from generate import (
    TextStreamer,
    batch_to_token_ids,
    filtered_probs,
    generate_text,
    generate_tokens,
    text_to_token_ids,
    token_ids_to_text,
)

PROMPTS = torch.tensor([[5, 17, 42, 99, 3, 7], [8, 8, 150, 2, 61, 9], [1, 2, 3, 4, 5, 6]])


def _hf_greedy(hf, prompt, n, **kwargs):
    with torch.no_grad():
        return hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                           max_new_tokens=n, min_new_tokens=n, pad_token_id=0, **kwargs)


@pytest.mark.parametrize("options, changes", [({"repetition_penalty": 2.0}, True),
                                              ({"repetition_penalty": 0.7}, False),
                                              ({"no_repeat_ngram_size": 2}, True),
                                              ({"no_repeat_ngram_size": 3,
                                                "repetition_penalty": 1.5}, True)])
@pytest.mark.parametrize("batch", [1, 3])
def test_greedy_with_penalties_equals_hugging_face(hf_pair, options, changes, batch):
    hf, ours = hf_pair
    prompt = PROMPTS[:batch]
    theirs = _hf_greedy(hf, prompt, 30, **options)
    mine = generate_text(ours, prompt, 30, context_size=40, **options)
    assert mine.tolist() == theirs.tolist()
    plain = generate_text(ours, prompt, 30, context_size=40)
    # the random model loops ("131 131 131 ..."): a penalty > 1 or an n-gram ban breaks it
    assert (mine.tolist() != plain.tolist()) == changes


def test_no_repeat_ngram_never_repeats(hf_pair):
    _, ours = hf_pair
    out = generate_text(ours, PROMPTS[:1], 30, context_size=40, no_repeat_ngram_size=2)
    row = out[0].tolist()
    pairs = list(zip(row, row[1:]))
    assert len(pairs) == len(set(pairs))


def _left_padded(prompts, pad=0):
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


@pytest.mark.parametrize("use_cache", [True, False])
def test_a_left_padded_batch_past_the_context_equals_each_prompt_alone(use_cache):
    # 8 + 20 tokens through a 16-position model: the window slides, and a padded row's
    # window then holds padding and its last real tokens, exactly those it holds alone
    from conftest import cfg_from_hf, make_hf_model
    from download_weights_hf import load_weights_into_gpt
    from model import GPTModel
    hf = make_hf_model(n_positions=16, seed=1)
    with torch.no_grad():       # larger weights: greedy tokens that do not just repeat
        for p in hf.parameters():
            p.mul_(3.0)
    model = load_weights_into_gpt(GPTModel(cfg_from_hf(hf)), hf).eval()
    prompts = [[5, 17, 42], [8, 8, 150, 2, 61, 9, 33, 4]]
    ids, mask = _left_padded(prompts)
    batch = generate_text(model, ids, 20, attention_mask=mask, use_cache=use_cache,
                          repetition_penalty=1.5)[:, ids.shape[1]:]
    for row, prompt in zip(batch.tolist(), prompts):
        alone = generate_text(model, torch.tensor([prompt]), 20, use_cache=use_cache,
                              repetition_penalty=1.5)[0, len(prompt):].tolist()
        assert row == alone
        assert len(set(alone)) >= 5


@pytest.mark.parametrize("use_cache", [True, False])
def test_a_left_padded_batch_equals_each_prompt_alone_and_hugging_face(hf_pair, use_cache):
    hf, ours = hf_pair
    prompts = [[5, 17, 42, 99, 3, 7, 11, 12], [8, 150], [1, 2, 3, 4, 5]]
    ids, mask = _left_padded(prompts)
    mine = generate_text(ours, ids, 20, context_size=40, attention_mask=mask,
                         use_cache=use_cache)
    with torch.no_grad():
        theirs = hf.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=20,
                             min_new_tokens=20, pad_token_id=0)
    width = ids.shape[1]
    for row, prompt in enumerate(prompts):
        alone = generate_text(ours, torch.tensor([prompt]), 20, context_size=40)
        assert mine[row, width:].tolist() == alone[0, len(prompt):].tolist()
        assert mine[row, width:].tolist() == theirs[row, width:].tolist()


def test_padding_changes_nothing_for_sampling_either(hf_pair):
    _, ours = hf_pair
    prompts = [[5, 17, 42, 99], [8, 150]]
    ids, mask = _left_padded(prompts)
    options = dict(temperature=1.0, top_k=50, top_p=0.9, min_p=0.05, repetition_penalty=1.2,
                   no_repeat_ngram_size=3)
    batch = generate_text(ours, ids, 15, 40, attention_mask=mask,
                          generator=torch.Generator().manual_seed(3), **options)
    again = generate_text(ours, ids, 15, 40, attention_mask=mask,
                          generator=torch.Generator().manual_seed(3), **options)
    assert batch.tolist() == again.tolist()                      # reproducible at a seed
    other = generate_text(ours, ids, 15, 40, attention_mask=mask,
                          generator=torch.Generator().manual_seed(4), **options)
    assert other.tolist() != batch.tolist()
    # no drawn token repeats a 3-gram of its own row (the padding is no part of it)
    for prompt, row in zip(prompts, batch.tolist()):
        real = row[ids.shape[1] - len(prompt):]
        grams = list(zip(real, real[1:], real[2:]))
        assert len(grams) == len(set(grams))


@pytest.mark.parametrize("min_p, temperature", [(0.1, 1.0), (0.05, 0.7), (0.3, 1.5), (0.0, 1.0),
                                                (1.0, 1.0)])
def test_min_p_equals_transformers_warper(min_p, temperature):
    from transformers.generation.logits_process import MinPLogitsWarper, TemperatureLogitsWarper
    logits = torch.randn(4, 1000, generator=torch.Generator().manual_seed(0)) * 3
    ids = torch.zeros(4, 1, dtype=torch.long)
    scores = TemperatureLogitsWarper(temperature)(ids, logits.clone())
    want = torch.softmax(MinPLogitsWarper(min_p)(ids, scores), dim=-1)
    got = filtered_probs(logits, temperature, min_p=min_p)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    assert ((got > 0).sum(-1) >= 1).all()


@pytest.fixture(scope="module")
def gpt2_vocab_model():
    """A random GPTModel with GPT-2's vocabulary: its tokens decode to real text pieces."""
    from conftest import cfg_from_hf, make_hf_model
    from download_weights_hf import load_weights_into_gpt
    from model import GPTModel
    hf = make_hf_model(vocab_size=50257, n_positions=64, n_embd=32, n_layer=2, n_head=2,
                       seed=5)
    return load_weights_into_gpt(GPTModel(cfg_from_hf(hf)), hf).eval()


def test_stop_strings_end_the_text_right_after_the_string(gpt2_vocab_model):
    model, tok = gpt2_vocab_model, get_tokenizer()
    prompt = text_to_token_ids("The for statement", tok)
    sample = dict(temperature=1.0, generator=torch.Generator().manual_seed(0))
    free = generate_text(model, prompt, 40, **sample)[0, prompt.shape[1]:].tolist()
    pieces = [tok.decode_single_token_bytes(t) for t in free]
    # a stop string made of the last character of one token and the first of the next, a
    # token of several characters: the string spans two tokens, and the token that
    # completes it reaches past it
    k = next(i for i in range(5, 39) if all(p.isascii() and len(p) > 1 and p.strip()
                                              for p in pieces[i:i + 2]))
    stop = pieces[k][-1:].decode() + pieces[k + 1][:1].decode()
    text = tok.decode(free)
    cut = text[:text.find(stop) + len(stop)]
    out = generate_text(model, prompt, 40, stop_strings=[stop], tokenizer=tok,
                        **{**sample, "generator": torch.Generator().manual_seed(0)})
    assert token_ids_to_text(out, tok) == "The for statement" + cut
    assert token_ids_to_text(out, tok).endswith(stop)
    # in a batch, a row that stopped is padded with eos while the others go on
    rows = token_ids_to_text(generate_text(
        model, prompt.repeat(4, 1), 40, stop_strings=["e"], tokenizer=tok, eos_id=50256,
        temperature=1.0, generator=torch.Generator().manual_seed(1)), tok)
    stopped = [row for row in rows if "e" in row[len("The for statement"):]]
    assert len(stopped) >= 2
    for row in stopped:
        generated = row[len("The for statement"):]
        assert generated.split("e", 1)[1].replace("<|endoftext|>", "") == ""


def test_batch_to_token_ids_pads_on_the_left():
    tok = get_tokenizer()
    ids, mask = batch_to_token_ids(["Hello, world", "Hi"], tok)
    assert ids.tolist() == [[15496, 11, 995], [50256, 50256, 17250]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    with pytest.raises(ValueError, match="non-empty list of prompts"):
        batch_to_token_ids("Hello", tok)


@pytest.mark.parametrize("kwargs, match", [
    ({"repetition_penalty": 0}, "repetition_penalty must be a finite number > 0"),
    ({"repetition_penalty": -1.5}, "repetition_penalty must be a finite number > 0"),
    ({"no_repeat_ngram_size": -1}, "no_repeat_ngram_size must be an int >= 0"),
    ({"no_repeat_ngram_size": 2.5}, "no_repeat_ngram_size must be an int >= 0"),
    ({"min_p": 1.5}, r"min_p must be in \[0, 1\]"),
    ({"min_p": -0.1}, r"min_p must be in \[0, 1\]"),
    ({"attention_mask": torch.ones(2, 3)}, "attention_mask must be a tensor of the prompt's "
                                           "shape"),
    ({"attention_mask": torch.tensor([[1, 1, 0, 0, 1, 1]])}, "padding on the right"),
    ({"attention_mask": torch.tensor([[1, 1, 1, 1, 1, 0]])}, "padding on the right"),
    ({"attention_mask": torch.tensor([[2, 1, 1, 1, 1, 1]])}, "only 0 .padding. and 1"),
    ({"stop_strings": ["x"]}, "stop_strings must be a list of non-empty strings, with "
                              "tokenizer="),
])
def test_bad_generation_arguments_name_themselves(hf_pair, kwargs, match):
    _, ours = hf_pair
    with pytest.raises(ValueError, match=match):
        next(generate_tokens(ours, PROMPTS[:1], 5, **kwargs))


def test_cli_batches_prompts_and_samples(tmp_path, capsys):
    from conftest import make_hf_model
    folder = tmp_path / "hf"
    make_hf_model(vocab_size=50257, n_positions=64, n_embd=32, n_layer=2, n_head=2,
                  seed=1).save_pretrained(folder)
    texts = generate.main(["--weights", str(folder), "--prompt", "Hello there", "--prompt",
                           "Hi", "--num-samples", "2", "--max-new-tokens", "6",
                           "--repetition-penalty", "1.3", "--no-repeat-ngram-size", "2",
                           "--min-p", "0.05", "--device", "cpu"])
    out = capsys.readouterr().out
    assert len(texts) == 4 and "--- 4 of 4" in out
    assert texts[0].startswith("Hello there") and texts[2].startswith("Hi")
    assert texts[0] != texts[1]                              # two samples of one prompt
    assert len(get_tokenizer().encode(texts[2])) <= len(get_tokenizer().encode("Hi")) + 6
    with pytest.raises(SystemExit):
        generate.main(["--weights", str(folder), "--min-p", "2"])
    assert "--min-p must be in [0, 1]" in capsys.readouterr().err


def test_cli_streams_exactly_the_text_it_returns_with_a_stop_string(tmp_path, capsys):
    # the streamed line ends where the returned text does: right after a stop string that
    # spans two tokens (the completing token reaches past it), and never shows the
    # end-of-text token
    from conftest import make_hf_model
    folder = tmp_path / "hf"
    make_hf_model(vocab_size=50257, n_positions=64, n_embd=32, n_layer=2, n_head=2,
                  seed=5).save_pretrained(folder)
    tok = get_tokenizer()
    run = ["--weights", str(folder), "--prompt", "The for statement", "--max-new-tokens", "40",
           "--temperature", "1.0", "--top-k", "0", "--device", "cpu", "--seed", "3"]
    free = generate.main(run)
    assert capsys.readouterr().out == free + "\n"
    ids = tok.encode(free[len("The for statement"):], allowed_special="all")
    pieces = [tok.decode_single_token_bytes(t) for t in ids]
    k = next(i for i in range(3, len(pieces) - 1) if all(
        p.isascii() and len(p) > 1 and p.strip() for p in pieces[i:i + 2]))
    stop = pieces[k][-1:].decode() + pieces[k + 1][:1].decode()
    text = tok.decode(ids)
    cut = "The for statement" + text[:text.find(stop) + len(stop)]
    got = generate.main([*run, "--stop", stop])
    assert got == cut
    assert capsys.readouterr().out == cut + "\n"


def test_streamer_holds_back_a_possible_stop_string_and_drops_end_of_text():
    tok = get_tokenizer()
    out = io.StringIO()
    streamer = TextStreamer(tok, file=out, eos_id=tok.eot_token, stop_strings=["STOP"])
    for piece in ["Go", " ST", "ay"]:           # " ST" could begin STOP: held, then printed
        for t in tok.encode(piece):
            streamer(torch.tensor([[t]]))
    assert out.getvalue() == "Go STay"
    streamer(torch.tensor([[tok.eot_token]]))
    streamer(torch.tensor([[tok.encode(" more")[0]]]))
    streamer.finish()
    assert out.getvalue() == "Go STay"
    out = io.StringIO()
    streamer = TextStreamer(tok, file=out, stop_strings=["STOP"])
    for t in tok.encode("a ST"):
        streamer(torch.tensor([[t]]))
    assert out.getvalue() == "a "               # "ST" waits
    streamer.finish()                           # ... and is printed when nothing follows
    assert out.getvalue() == "a ST"


def test_streaming_of_a_masked_batch_matches_generate_text(hf_pair):
    _, ours = hf_pair
    ids, mask = _left_padded([[5, 17, 42], [8]])
    steps = list(generate_tokens(ours, ids, 10, 40, attention_mask=mask))
    assert torch.cat([ids, *steps], 1).tolist() == generate_text(
        ours, ids, 10, 40, attention_mask=mask).tolist()
