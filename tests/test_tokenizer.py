"""tokenizer.py against references: tiktoken's GPT-2 encoding (built offline from OpenAI's
files), a naive full-recount BPE trainer written here, and counts worked out by hand."""

import json
import os
import random
import re
import tempfile
from collections import Counter
from pathlib import Path

import pytest
import regex
import tiktoken
import tiktoken.load
from hypothesis import given, settings
from hypothesis import strategies as st
from tiktoken_ext.openai_public import r50k_pat_str

import tokenizer
from dataset import default_corpus_text
from engine.bpe_files import gpt2_bpe_files
from tokenizer import EOT, GPT2_PATTERN, BPETokenizer

# hypothesis keeps its example database and caches in ./.hypothesis unless told otherwise:
# keep them out of the repository (read at hypothesis' first use, after this import)
os.environ.setdefault("HYPOTHESIS_STORAGE_DIRECTORY",
                      str(Path(tempfile.gettempdir()) / "gpt2-course-hypothesis"))

ADVERSARIAL = [
    "",
    "Hello, world!",
    "👍🏽 👨‍👩‍👧‍👦 family, 🇫🇷🇯🇵 flags, 🏳️‍🌈",
    "漢字かな交じり文、中文标点。한국어 텍스트",
    "हिन्दी में लिखा गया पाठ, नमस्ते दुनिया",
    "e\u0301 a\u0308\u0323 Z\u0351\u0325\u0334a\u0362l\u0315g\u0337o",
    " " * 300 + "x" + "\t" * 50 + "\n" * 40 + " \t\n\r\x0b\x0c" * 20,
    "1234567890" * 30 + " 3.14159 -42 1e10 ٣٤٥ ⅫⅪ",
    "  \n\n  word\n  \n\tword  \n\n",
    "trailing spaces   ",
    "don't DON'T don’t it's you're I'M we'll they'd 'tis ''s '' 's",
    "<|endoftext|>",
    "a<|endoftext|>b<|endoftext|><|endoftext|> word<|endoftext|>\n",
    "word<|endoftext|>word <|endoftext|> word",
    "<|endoftext <|endoftext|>> <|endoftext|>|> endoftext|> <|endof<|endoftext|>text|>",
    "\x00\x01\x7f\x80\u00ad\u00a0 control and odd Latin-1 bytes ÿ Ā Ġ Ċ",
    "mixed\r\nline\rendings\u2028and\u2029separators\u0085",
    "ﬁ ﬀ ℌ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𐍈 \U0010fffd \ufeffBOM",
]


@pytest.fixture(scope="module")
def text():
    return default_corpus_text()     # the project's default corpus: pydoc's topics as prose


@pytest.fixture(scope="module")
def gpt2():
    return BPETokenizer.from_gpt2()


@pytest.fixture(scope="module")
def reference():
    """tiktoken's GPT-2 encoding, from the same offline files, as dataset.py builds it."""
    encoder_json, vocab_bpe = gpt2_bpe_files()
    ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=str(vocab_bpe), encoder_json_file=str(encoder_json))
    return tiktoken.Encoding(name="gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={EOT: 50256}, explicit_n_vocab=50257)


@pytest.fixture(scope="module")
def trained(text):
    """A 1,024-token tokenizer trained on the first half of the corpus."""
    return BPETokenizer.train(text[:len(text) // 2], 1024)


def ref_encode(enc, s):
    return enc.encode(s, allowed_special={EOT})


# -- GPT-2 ------------------------------------------------------------------------------------

def test_gpt2_layout(gpt2):
    assert (gpt2.n_vocab, len(gpt2), gpt2.eot_token, len(gpt2.merges)) == (50257, 50257, 50256,
                                                                           50000)
    assert gpt2.vocab[50256] == EOT.encode()
    encoder_json, _ = gpt2_bpe_files()
    encoder = json.loads(encoder_json.read_text("utf-8"))
    table = tokenizer._bytes_to_unicode()
    for s, i in encoder.items():                    # every id means the same string
        if s != EOT:
            assert "".join(table[b] for b in gpt2.token_bytes(i)) == s


def test_pattern_is_tiktokens_r50k(text):
    for s in [*ADVERSARIAL, text]:
        assert regex.findall(GPT2_PATTERN, s) == regex.findall(r50k_pat_str, s)


def test_gpt2_matches_tiktoken_on_the_corpus(gpt2, reference, text):
    assert gpt2.encode(text) == ref_encode(reference, text)


@pytest.mark.parametrize("s", ADVERSARIAL)
def test_gpt2_matches_tiktoken_on_adversarial_text(gpt2, reference, s):
    ids = gpt2.encode(s)
    assert ids == ref_encode(reference, s)
    assert gpt2.decode(ids) == s == reference.decode(ids)


def test_gpt2_decodes_every_token_like_tiktoken(gpt2, reference):
    for i in range(gpt2.n_vocab):      # incl. tokens holding part of a character's UTF-8
        assert gpt2.decode_bytes([i]) == reference.decode_single_token_bytes(i)
        assert gpt2.decode([i]) == reference.decode([i])


def test_gpt2_through_tiktoken(gpt2, reference, text):
    enc = gpt2.to_tiktoken()
    assert enc.n_vocab == 50257 and enc.eot_token == 50256
    for s in [text, *ADVERSARIAL]:
        assert ref_encode(enc, s) == ref_encode(reference, s)


@pytest.mark.parametrize("s", ["\ud800", "ab\udfffcd", "ok \ud83d then"])
def test_lone_surrogates_are_refused(gpt2, s):
    where = next(i for i, c in enumerate(s) if 0xD800 <= ord(c) <= 0xDFFF)
    with pytest.raises(ValueError, match=rf"lone surrogate '\\ud[89a-f]..' at index {where},"):
        gpt2.encode(s)
    with pytest.raises(ValueError, match="lone surrogate"):
        BPETokenizer.train("some text " + s, 300)


def test_bad_ids_are_refused(gpt2):
    for bad in (-1, 50257, 1.5):
        with pytest.raises(ValueError, match=f"token id {bad} is not in this tokenizer"):
            gpt2.decode([5, bad])


# -- round trips on any text -----------------------------------------------------------------

@settings(max_examples=300, deadline=None)
@given(st.text(max_size=80))     # any code point but surrogates
def test_decode_encode_round_trip(gpt2, trained, reference, s):
    for tok in (gpt2, trained):
        ids = tok.encode(s)
        assert tok.decode(ids) == s
        assert tok.decode_bytes(ids) == s.encode("utf-8")
    assert gpt2.encode(s) == ref_encode(reference, s)


@pytest.fixture(scope="module")
def trained_tiktoken(trained):
    return trained.to_tiktoken()


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=60))
def test_trained_matches_its_tiktoken(trained, trained_tiktoken, s):
    assert trained.encode(s) == ref_encode(trained_tiktoken, s)


# -- training ----------------------------------------------------------------------------------

def naive_train(text, n_merges):
    """The textbook loop, no cleverness: recount every pair of every chunk at each step, take
    the most frequent (ties: smallest pair), merge it everywhere."""
    chunks = Counter()
    for piece in text.split(EOT):
        chunks.update(regex.findall(GPT2_PATTERN, piece))
    words = {tuple(c.encode()): n for c, n in chunks.items()}
    merges = []
    for new in range(256, 256 + n_merges):
        counts = Counter()
        for word, n in words.items():
            for pair in zip(word, word[1:]):
                counts[pair] += n
        if not counts:
            break
        best = min(counts, key=lambda p: (-counts[p], p))
        merges.append(best)
        merged = Counter()
        for word, n in words.items():
            out, i = [], 0
            while i < len(word):
                if word[i:i + 2] == best:
                    out.append(new)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += n
        words = merged
    return merges


def test_first_merges_by_hand():
    # chunks "aaab" and " aaab". Counts: (a,a) 2+2 = 4 (overlapping), (a,b) 2, (" ",a) 1.
    # -> merge (a,a) = 256: [256,a,b] and [" ",256,a,b]: (256,a) 2, (a,b) 2, (" ",256) 1.
    # -> a tie at 2: the smaller pair (a,b) = (97,98) beats (256,97). Then (256,257) 2.
    a, b = ord("a"), ord("b")
    tok = BPETokenizer.train("aaab aaab", 256 + 3 + 1)
    assert tok.merges == [(a, a), (a, b), (256, 257)]
    assert tok.vocab[258] == b"aaab" and tok.encode(" aaab") == [32, 258]


def test_ties_go_to_the_smallest_pair():
    # chunks "ab" and " cd": pairs (a,b), (" ",c), (c,d) once each
    tok = BPETokenizer.train("ab cd", 256 + 3 + 1)
    assert tok.merges == [(32, 99), (97, 98), (256, 100)]


def test_incremental_training_equals_the_naive_trainer(text):
    sample = text[:6000] + EOT + text[-3000:]
    assert BPETokenizer.train(sample, 256 + 400 + 1).merges == naive_train(sample, 400)


def test_repeated_chunks_count_with_their_multiplicity(text):
    sample = text[:20000]
    once = BPETokenizer.train(sample, 700).merges
    assert BPETokenizer.train(EOT.join([sample] * 3), 700).merges == once


def test_vocab_size_is_exact(text):
    for size in (257, 258, 600):
        tok = BPETokenizer.train(text[:10000], size)
        assert (tok.n_vocab, len(tok.merges), tok.eot_token) == (size, size - 257, size - 1)
        assert max(tok.encode(text[:3000] + EOT)) == size - 1
    two = BPETokenizer.train(text[:10000], 600, special_tokens=(EOT, "<|pad|>"))
    assert two.special_tokens == {EOT: 598, "<|pad|>": 599}
    s = "x<|pad|>y" + EOT + "<|pad|"
    assert two.encode(s) == two.to_tiktoken().encode(s, allowed_special="all")


def test_without_special_tokens(text):
    tok = BPETokenizer.train(text[:5000], 300, special_tokens=())
    assert (tok.n_vocab, tok.eot_token, tok.special_tokens) == (300, None, {})
    by_hand = BPETokenizer(tok.merges)          # the constructor alone: same tokenizer
    s = text[-2000:] + EOT
    assert by_hand.encode(s) == tok.encode(s) == tok.to_tiktoken().encode(s)
    assert tok.decode(tok.encode(s)) == s


def test_decode_takes_tensors_and_arrays(gpt2, text):
    import numpy as np
    import torch
    ids = gpt2.encode(text[:1000])
    assert gpt2.decode(torch.tensor(ids)) == gpt2.decode(np.array(ids)) == text[:1000]


def test_small_alphabets_agree_with_tiktoken():
    """Runs of one letter stress the left-to-right merging; tiktoken's rank-by-bytes
    encoder must agree with our merge-list encoder on any trained tokenizer."""
    rng = random.Random(0)
    for _ in range(300):
        alphabet = rng.choice(["ab", "abc", "a b", "aab ", "ab\n "])
        sample = "".join(rng.choice(alphabet) for _ in range(rng.randint(5, 300)))
        most = len(naive_train(sample, 10**6))
        tok = BPETokenizer.train(sample, 256 + rng.randint(1, most) + 1)
        enc = tok.to_tiktoken()
        for _ in range(5):
            s = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60)))
            assert tok.encode(s) == enc.encode(s)


def test_training_errors():
    most = 256 + len(naive_train("abcab", 100)) + 1
    with pytest.raises(ValueError, match=f"^the text supports at most {most} tokens"):
        BPETokenizer.train("abcab", 300)
    with pytest.raises(ValueError, match=r"^vocab_size must be at least 256 \+ 1 special "
                                         r"token\(s\) = 257, got 256$"):
        BPETokenizer.train("abcab", 256)
    with pytest.raises(ValueError, match="^cannot train on an empty text"):
        BPETokenizer.train("", 300)


# -- files -------------------------------------------------------------------------------------

def test_save_load_round_trip(tmp_path, gpt2, trained, text):
    held_out = text[len(text) // 2:]
    for tok in (trained, gpt2):
        path = tok.save(tmp_path / f"{tok.name}.json")
        back = BPETokenizer.load(path)
        for attr in ("merges", "special_tokens", "byte_order", "pattern", "name", "vocab"):
            assert getattr(back, attr) == getattr(tok, attr)
        assert back.encode(held_out[:50000]) == tok.encode(held_out[:50000])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpt2.json", "trained-1024.json"]
    data = json.loads((tmp_path / "trained-1024.json").read_text("utf-8"))
    assert data["format"] == "gpt2-course-bpe" and data["version"] == 1
    a, b = trained.merges[0]
    assert data["merges"][0] == [a, b, (trained.vocab[a] + trained.vocab[b]).decode()]


def test_tiktoken_export_matches_on_held_out_text(trained, text):
    held_out = text[len(text) // 2:]
    enc = trained.to_tiktoken()
    assert enc.n_vocab == trained.n_vocab == 1024
    assert trained.encode(held_out) == enc.encode(held_out, allowed_special="all")
    for s in ADVERSARIAL:
        assert trained.encode(s) == enc.encode(s, allowed_special="all")


def edits(path):
    """(what, new file text) for ways a tokenizer file goes bad."""
    raw = path.read_text("utf-8")
    data = json.loads(raw)
    m = data["merges"]

    def with_(**changes):
        return json.dumps({**data, **changes})

    yield "truncated", raw[:len(raw) // 2]
    yield "not JSON", "merges: 1 2"
    yield "wrong tag", with_(format="tiktoken")
    yield "newer version", with_(version=2)
    yield "edited merge", with_(merges=[m[0], [m[1][1], m[1][0], m[1][2]], *m[2:]])
    yield "unknown id", with_(merges=[m[0], [m[1][0], 999, m[1][2]], *m[2:]])
    yield "forward reference", with_(merges=[[300, 32, "x"], *m[1:]])
    yield "duplicate merge", with_(merges=[*m[:-1], m[0]])
    yield "special id on a merge", with_(special_tokens={EOT: 300})
    yield "special id beyond", with_(special_tokens={EOT: 5000})
    yield "not a merge", with_(merges=[m[0], "t h", *m[2:]])
    yield "byte order", with_(byte_order=[0] * 256)
    yield "bad pattern", with_(pattern="(")
    yield "no merges", json.dumps({k: v for k, v in data.items() if k != "merges"})
    yield "merges not a list", with_(merges={"0": m[0]})
    yield "no end of text", with_(special_tokens={})


def test_corrupt_files_are_refused(tmp_path, trained):
    path = trained.save(tmp_path / "tok.json")
    for what, content in edits(path):
        bad = tmp_path / f"{what}.json"
        bad.write_text(content, "utf-8")
        with pytest.raises(ValueError, match="^" + re.escape(str(bad)) + ": ") as e:
            BPETokenizer.load(bad)
        assert "\n" not in str(e.value), what
    bad.write_bytes(b"\xff\xfe{}")
    with pytest.raises(ValueError, match="not UTF-8"):
        BPETokenizer.load(bad)


# -- command line ------------------------------------------------------------------------------

def test_cli_train_and_compare(tmp_path, capsys, gpt2, reference, text):
    train_file, valid_file = tmp_path / "train.txt", tmp_path / "valid.txt"
    train_file.write_text(text[:60000], "utf-8")
    valid_file.write_text(text[-20000:], "utf-8")
    out = tmp_path / "tok.json"
    assert tokenizer.main(["train", "--data", str(train_file), "--vocab-size", "700",
                           "--out", str(out)]) == 0
    assert "bytes per token on the training text" in capsys.readouterr().out
    tok = BPETokenizer.load(out)
    assert tok.merges == BPETokenizer.train(text[:60000], 700).merges

    assert tokenizer.main(["compare", "--tokenizer", str(out), "--data", str(valid_file)]) == 0
    last = capsys.readouterr().out.rstrip("\n").split("\n")[-1]
    valid = text[-20000:]
    n_bytes = len(valid.encode())
    want = (f"bytes_per_token: gpt2={n_bytes / len(ref_encode(reference, valid)):.2f} "
            f"trained={n_bytes / len(tok.encode(valid)):.2f}")
    assert last == want


def test_cli_bad_input(tmp_path, capsys, trained):
    good = tmp_path / "good.txt"
    good.write_text("some text to train on, some text", "utf-8")
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("café".encode("latin-1"))
    broken = tmp_path / "broken.json"
    broken.write_text("{", "utf-8")
    out = str(tmp_path / "t.json")
    cases = [
        (["train", "--data", str(tmp_path / "missing.txt"), "--vocab-size", "300", "--out", out],
         "cannot read"),
        (["train", "--data", str(latin1), "--vocab-size", "300", "--out", out], "not UTF-8"),
        (["train", "--data", str(good), "--vocab-size", "100", "--out", out], "at least"),
        (["train", "--data", str(good), "--vocab-size", "5000", "--out", out],
         "supports at most"),
        (["train", "--data", str(good), "--vocab-size", "big", "--out", out], "invalid int"),
        (["compare", "--tokenizer", str(broken), "--data", str(good)], "bad JSON"),
        (["compare", "--tokenizer", str(tmp_path / "none.json"), "--data", str(good)],
         "cannot read"),
        ([], "required"),
    ]
    for argv, words in cases:
        with pytest.raises(SystemExit) as e:
            tokenizer.main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2, argv
        assert err.startswith("error: ") and err.count("\n") == 1 and words in err, err
