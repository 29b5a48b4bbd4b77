"""Text files on disk: reading them, splitting one into train / valid / test, the default corpus.

    read_text(path)                   UTF-8 text exactly as stored, or an error saying how to fix it
    prepare_splits("data/input.txt")  -> train.txt, valid.txt, test.txt beside it (85/10/5%),
                                         made again when the input changes, never over files
                                         this program did not write
    default_corpus_text()             the prose of Python's own docs: text every Python ships

dataset.py re-exports these; train.py and train.ipynb call prepare_splits.
"""

import errno
import hashlib
import json
import re
from pathlib import Path

# the one atomic file writer (temp file + fsync + rename), and its error for a read-only folder
from engine.fileio import NotWritableError, atomic_write, file_sha256

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
    try:
        stamp_path.unlink(missing_ok=True)
        for p, part in zip(paths, parts):
            _atomic_write(p, part)
            print(f"{p}: {len(part):,} characters, {_count_lines(part):,} lines")
    except OSError as e:
        if not (isinstance(e, PermissionError) or e.errno == errno.EROFS):   # read-only
            raise
        error = NotWritableError(
            f"cannot write the split files train.txt, valid.txt and test.txt beside "
            f"{file_path}: {file_path.parent} is not writable ({e.strerror}); copy the text into "
            f"a folder you can write to and pass that (--data), or make the folder writable")
        error.strerror = e.strerror
        raise error from None
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
    if file_sha256(path) != record.get(sha256):
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
