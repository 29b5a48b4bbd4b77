"""tokenizer.ipynb, executed headless on 50 kB of text with small vocabularies.

The notebook prints the merges it learned, a sentence and a word in pieces and ids,
compression figures and the files it wrote. Each is checked here against a reference
computed independently: the tokenizers trained again here (each size on its own, not cut
from a larger one), pair counts done by hand, bytes per token by the plain-Python encoder
and tiktoken's GPT-2, parameter counts by formula.
"""

import importlib
import inspect
import json
import re
from collections import Counter

import pytest
import regex
from test_notebooks import png_count, run_notebook, stdout

from dataset import default_corpus_text, get_tokenizer, read_text
from look_inside import token_label
from tokenizer import GPT2_PATTERN, BPETokenizer
from train import DEFAULT_CONFIG

VOCAB = 512
SIZES = (300, 400, 512)
SENTENCE = "The for statement iterates over the items of a sequence; coroutines await."
WORD = " statement"
CODE_MODULES = ("textwrap", "shlex")
CODE_HELD_OUT = "csv"
PROBE = 'import json\nprint(json.dumps({"samples": samples}))'


@pytest.fixture(autouse=True)
def inline_plots(monkeypatch):
    # the kernel inherits our environment; a backend set there would hide inline figures
    monkeypatch.delenv("MPLBACKEND", raising=False)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(folder, cells, the probe's JSON, the training text, the held-out text, the trained
    reference tokenizer)."""
    cwd = tmp_path_factory.mktemp("tokenizer")
    data = cwd / "corpus" / "my_text.txt"
    data.parent.mkdir()
    data.write_text(default_corpus_text()[:50_000], encoding="utf-8")
    cells = run_notebook(
        "tokenizer.ipynb", cwd, probe=PROBE, DATA_PATH=str(data), VOCAB_SIZE=VOCAB,
        VOCAB_SIZES=SIZES, SENTENCE=SENTENCE, WORD=WORD,
        TOKENIZER_PATH=str(cwd / "out" / "tok.json"), CODE_MODULES=CODE_MODULES,
        CODE_HELD_OUT=CODE_HELD_OUT)
    train_text = read_text(data.parent / "train.txt")
    held_out = read_text(data.parent / "valid.txt")
    assert train_text + held_out + read_text(data.parent / "test.txt") == data.read_text()
    probe = json.loads(stdout(cells["probe"]).strip().splitlines()[-1])
    return cwd, cells, probe, train_text, held_out, BPETokenizer.train(train_text, VOCAB)


def labels(tok, ids):
    return [token_label(tok, i, quote=True) for i in ids]


def plain_bytes_per_token(tok, text):
    """Bytes per token by the plain-Python encoder (the notebook measures with tiktoken)."""
    return len(text.encode("utf-8")) / len(tok.encode(text))


def test_data_and_first_merges(run):
    _, cells, _, train_text, held_out, ref = run
    data = stdout(cells["data"])
    assert f"learn from train.txt: {len(train_text.encode('utf-8')):,} bytes" in data
    assert f"measure on valid.txt: {len(held_out.encode('utf-8')):,} bytes" in data

    out = stdout(cells["train"])
    assert f"trained-{VOCAB}: {VOCAB - 257:,} merges learned in " in out
    assert f"<|endoftext|> = {VOCAB - 1}" in out
    rows = re.findall(r"^ *(\d+) +(\d+)  +(.+?) \+ (.+?) +-> (.+)$", out, re.M)
    assert len(rows) == 20 + 5                      # the first 20, the last 5
    shown = list(range(20)) + list(range(len(ref.merges) - 5, len(ref.merges)))
    for (rank, new_id, left, right, new), r in zip(rows, shown):
        assert (int(rank), int(new_id)) == (r, 256 + r)
        assert [left.strip(), right.strip()] == labels(ref, ref.merges[r])
        assert new == token_label(ref, 256 + r, quote=True)

    # merge 0, by hand: the most frequent pair of adjacent bytes within the regex's chunks
    pairs = Counter()
    for chunk in regex.findall(GPT2_PATTERN, train_text):
        data = chunk.encode("utf-8")
        pairs.update(zip(data, data[1:]))
    top = max(pairs.values())
    first = min(pair for pair, n in pairs.items() if n == top)      # ties: the smallest pair
    assert rows[0][2:4] == (repr(chr(first[0])), repr(chr(first[1])))


def test_sentence_and_word(run):
    _, cells, _, train_text, _, ref = run
    out = stdout(cells["sentence"])
    blocks = re.split(r"^(.+) \(([\d,]+) tokens\): (\d+) tokens$", out, flags=re.M)[1:]
    gpt2 = get_tokenizer()                          # tiktoken's GPT-2, not our from_gpt2
    want = {"bytes only": (257, list(SENTENCE.encode("utf-8")), BPETokenizer([])),
            f"trained-{VOCAB}": (VOCAB, ref.encode(SENTENCE), ref),
            "gpt2": (50257, gpt2.encode(SENTENCE), gpt2)}
    found = [blocks[i:i + 4] for i in range(0, len(blocks), 4)]    # name, vocab, count, rows
    assert [name for name, *_ in found] == list(want)
    for (_, n_vocab, n_ids, body), (want_vocab, ids, tok) in zip(found, want.values()):
        assert (int(n_vocab.replace(",", "")), int(n_ids)) == (want_vocab, len(ids))
        rows = [row for row in body.splitlines() if row.strip()]
        # each piece above its id: rows alternate pieces, ids (padding aside)
        assert " ".join(rows[0::2]).split() == " ".join(labels(tok, ids)).split()
        assert [int(x) for x in " ".join(rows[1::2]).split()] == ids

    out = stdout(cells["word"])
    assert out.startswith(f"{WORD!r}, {len(WORD.encode('utf-8'))} bytes")
    lines = dict(re.findall(r"^ *([\d,]+) tokens: (.+)$", out, re.M))
    assert list(lines) == [f"{n:,}" for n in (257, 300, 400)] + [f"{VOCAB:,}"]
    for n in (257, 300, 400, VOCAB):
        tok = BPETokenizer.train(train_text, n)     # trained on its own, not cut short
        assert lines[f"{n:,}"] == " | ".join(labels(tok, tok.encode(WORD)))
    assert f"50,257 tokens (GPT-2): {' | '.join(labels(gpt2, gpt2.encode(WORD)))}" in out


def test_compression_sweep(run):
    _, cells, _, train_text, held_out, _ = run
    out = stdout(cells["sweep"])
    rows = re.findall(r"^ *([\d,]+) +([\d.]+) +([\d.]+)$", out, re.M)
    assert [int(n.replace(",", "")) for n, _, _ in rows] == list(SIZES)
    for n, held, seen in rows:
        tok = BPETokenizer.train(train_text, int(n.replace(",", "")))
        assert float(held) == pytest.approx(plain_bytes_per_token(tok, held_out), abs=6e-4)
        assert float(seen) == pytest.approx(plain_bytes_per_token(tok, train_text), abs=6e-4)
    gpt2 = re.search(r"50,257 +([\d.]+) +\(GPT-2's", out)
    assert gpt2, out
    want = len(held_out.encode("utf-8")) / len(get_tokenizer().encode(held_out))
    assert float(gpt2[1]) == pytest.approx(want, abs=6e-4)
    assert png_count(cells["sweep"]) == 1


def test_other_languages(run):
    _, cells, probe, _, _, ref = run
    samples, gpt2 = probe["samples"], get_tokenizer()
    out = stdout(cells["foreign"])
    assert {"German", "Chinese", "emoji"} <= set(samples)
    for name, text in samples.items():
        n_bytes = len(text.encode("utf-8"))
        row = re.search(rf"^{re.escape(name)} +([\d,]+) +([\d.]+) +([\d.]+) +([\d.]+)$", out,
                        re.M)
        assert row, (name, out)
        assert int(row[1].replace(",", "")) == n_bytes and row[2] == "1.00"
        assert float(row[3]) == pytest.approx(plain_bytes_per_token(ref, text), abs=0.006)
        assert float(row[4]) == pytest.approx(n_bytes / len(gpt2.encode(text)), abs=0.006)
    # Chinese: the trained tokenizer has no merge for its 3-byte characters
    assert len(ref.encode(samples["Chinese"])) == len(samples["Chinese"].encode("utf-8"))
    for name in ("German", "Chinese", "emoji"):
        text = samples[name].split(". ")[0]
        for label, tok in (("trained here", ref), ("GPT-2", gpt2)):
            ids = tok.encode(text)
            assert f"  {label} ({len(ids)} tokens): {' | '.join(labels(tok, ids))}\n" in out


def test_tiktoken_and_file(run):
    cwd, cells, _, _, held_out, ref = run
    out = stdout(cells["tiktoken"])
    assert f"held-out text: {len(ref.encode(held_out)):,} tokens, equal ids" in out
    saved = BPETokenizer.load(cwd / "out" / "tok.json")
    assert saved.merges == ref.merges and saved.fingerprint() == ref.fingerprint()
    assert f"fingerprint {ref.fingerprint()[:16]}..." in out
    assert json.dumps([*ref.merges[0], ref.token_bytes(256).decode()]) in out   # the file


def test_exercises(run):
    _, cells, _, train_text, held_out, ref = run
    out = stdout(cells["answer-merges"])
    assert f"{VOCAB:,} tokens = 256 bytes + {VOCAB - 257:,} merges + 1; " \
           f"<|endoftext|> = {VOCAB - 1}" in out
    assert f"a {SIZES[0]:,}-token vocabulary: {SIZES[0] - 257:,} merges, the same as the " \
           f"first {SIZES[0] - 257:,}" in out

    # exercise 2: a tokenizer trained on code, measured on prose and on other code
    code = "".join(inspect.getsource(importlib.import_module(m)) for m in CODE_MODULES)
    code_held_out = inspect.getsource(importlib.import_module(CODE_HELD_OUT))
    code_tok = BPETokenizer.train(code, VOCAB)
    out = stdout(cells["answer-code"])
    assert f"trained on {len(code.encode('utf-8')):,} bytes of textwrap, shlex" in out
    assert f"its first 12 merges: {' '.join(labels(code_tok, range(256, 268)))}\n" in out
    gpt2 = get_tokenizer()
    for name, tok in (("code-trained", code_tok), ("prose-trained", ref), ("GPT-2", gpt2)):
        row = re.search(rf"^{name} +([\d.]+) +([\d.]+)$", out, re.M)
        assert row, (name, out)
        for figure, text in zip(row.groups(), (held_out, code_held_out)):
            want = len(text.encode("utf-8")) / len(tok.encode(text))
            assert float(figure) == pytest.approx(want, abs=0.006)

    # exercise 3: context in bytes, parameters by formula
    cfg = DEFAULT_CONFIG
    P, C, L = cfg["context_length"], cfg["emb_dim"], cfg["n_layers"]
    assert not cfg["qkv_bias"] and not cfg["tie_embeddings"]
    out = stdout(cells["answer-context"])
    for name, tok, V in (("GPT-2", gpt2, 50257), ("trained here", ref, VOCAB)):
        bpt = len(held_out.encode("utf-8")) / len(tok.encode(held_out))
        total = (V + P) * C + L * (12 * C * C + 10 * C) + 2 * C + V * C
        row = re.search(rf"^{name} +{V:,} +([\d,]+) +([\d,]+) +([\d,]+)$", out, re.M)
        assert row, (name, out)
        assert abs(int(row[1].replace(",", "")) - P * bpt) <= 0.5 + 1e-9
        assert [int(x.replace(",", "")) for x in row.groups()[1:]] == [2 * V * C, total]
