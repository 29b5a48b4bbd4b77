"""Token ids of big text files, cached beside them as raw uint16 (2 bytes per token).

    load_tokens(path, tokenizer) -> np.memmap of the ids, from <file>.tokens.u16 when it still
                                    belongs to the text (<file>.tokens.json says) and still
                                    holds the ids written (their sha256, recorded beside them),
                                    else tokenized in ~1 MB chunks on a thread pool and
                                    written there

dataset.load_tokens calls this with GPT-2's tokenizer (or the run's own); as_token_array(ids)
checks ids handed in any other form (dataset.GPTDataset).

The ids' sha256 is checked on every load, all of them: a flipped byte in a cache would
otherwise train on other tokens without a word. It costs 0.46 s per 475 MB of ids (about
a GB of English text) on a 2-core EPYC, against minutes to tokenize that text; a cheaper
check (sizes, a few sampled blocks) would miss damage in the middle. A cache that fails
it is made again from the text (it is only a cache), with a note naming it.
"""

import codecs
import hashlib
import json
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from engine.fileio import atomic_write, file_sha256
from engine.text_files import (
    _atomic_write,
    _missing_file_error,
    _read_json,
    _same_text,
    _utf8_error,
)

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


def _encode_file(path, tokenizer, chunk_bytes, sink, progress=True):
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
    # progress=False hides the bar; otherwise tqdm decides, so TQDM_DISABLE=1 hides it too
    bar_off = {} if progress else {"disable": True}
    with (ThreadPoolExecutor(n_threads) as pool, open(path, "rb") as f,
          tqdm(total=size, unit="B", unit_scale=True, unit_divisor=1024,
               desc=f"tokenizing {path.name}", **bar_off) as bar):
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


def _tokenizer_id(tokenizer):
    return {"tokenizer": getattr(tokenizer, "name", type(tokenizer).__name__),
            "n_vocab": getattr(tokenizer, "n_vocab", None)}


def _ids_are_intact(u16_path, meta_path, meta):
    """Whether the ids file still has the sha256 recorded when it was written; a cache from
    before that was recorded is trusted once and gets it now (as it was trusted before)."""
    digest = file_sha256(u16_path)
    if "ids_sha256" not in meta:
        meta = _read_json(meta_path) or meta     # as _same_text may have just rewritten it
        try:
            _atomic_write(meta_path, json.dumps({**meta, "ids_sha256": digest}, indent=1))
        except OSError:
            pass            # read-only folder: checked again next time
        return True
    if digest == meta["ids_sha256"]:
        return True
    print(f"note: the token cache {u16_path} does not match the checksum recorded with it "
          f"(it was damaged on disk); tokenizing the text again")
    return False


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


def load_tokens(path, tokenizer, cache=True, *, chunk_bytes=_CHUNK_BYTES, progress=True):
    """The token ids ``tokenizer`` (a tiktoken Encoding) gives a UTF-8 text file, as a 1-D
    ``uint16`` array.

    Tokenizing a few hundred MB can take minutes, so with ``cache=True`` the ids are written
    beside the text as ``<file>.tokens.u16`` (2 bytes per token: GPT-2's 50257 ids fit in
    16 bits) plus ``<file>.tokens.json`` (the text's size, mtime, ctime, sha256, token
    count), and
    the next call opens them as an ``np.memmap`` instead: nothing is read into RAM until a
    window asks for it. The cache is rebuilt when the text changes. If the folder is
    read-only, the ids are kept in memory instead. ``<|endoftext|>`` in the file (the usual
    separator between documents) becomes token 50256, exactly as ``GPTDataset(text)`` does.
    ``progress=False``: no "tokenizing" bar (--no-progress).
    """
    path = Path(path)
    if not path.is_file():
        raise _missing_file_error(path)
    stat = path.stat()
    if stat.st_size == 0:
        raise ValueError(f"{path} is empty: put some text in it")
    n_vocab = getattr(tokenizer, "n_vocab", 0)
    if n_vocab > 1 << 16:
        raise ValueError(f"this tokenizer has {n_vocab} ids, more than uint16 holds (65536); "
                         f"load_tokens stores GPT-2's 50257-id vocabulary")

    def in_memory():
        parts = []
        _encode_file(path, tokenizer, chunk_bytes, parts.append, progress)
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint16)

    if not cache:
        return in_memory()

    u16_path, meta_path = token_cache_paths(path)
    meta = _read_json(meta_path)          # None (no cache) if missing or unreadable
    if (_cache_is_fresh(path, stat, tokenizer, u16_path, meta_path, meta)
            and _ids_are_intact(u16_path, meta_path, meta)):
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
        ids_hash = hashlib.sha256()

        def sink(ids):                                  # each chunk's uint16 ids, as bytes
            ids_hash.update(ids)
            f.write(ids)

        encoded["n_tokens"], encoded["sha256"] = _encode_file(path, tokenizer, chunk_bytes,
                                                              sink, progress)
        encoded["ids_sha256"] = ids_hash.hexdigest()

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
            "source_sha256": sha256, "ids_sha256": encoded["ids_sha256"]}
    _atomic_write(meta_path, json.dumps(meta, indent=1))
    if n_tokens == 0:       # np.memmap cannot map an empty file
        return np.zeros(0, dtype=np.uint16)
    return np.memmap(u16_path, dtype=np.uint16, mode="r", shape=(n_tokens,))


def as_token_array(ids):
    """One compact 1-D uint16 array of token ids (a tensor, an array or memmap, a list of
    ints), checked: integers within [0, 65535], one dimension. A uint16 array (a memmap of
    load_tokens) is kept as it is: no copy, no RAM."""
    if isinstance(ids, (bytes, os.PathLike)):
        raise TypeError(f"pass the text itself (str) or its token ids, not {type(ids).__name__}; "
                        f"for a file use load_tokens(path) or read_text(path)")
    if isinstance(ids, torch.Tensor):
        ids = ids.detach().cpu().numpy()
    if isinstance(ids, np.ndarray) and ids.dtype == np.uint16:
        tokens = ids
    else:
        arr = np.asarray(ids)
        if arr.size and not np.issubdtype(arr.dtype, np.integer):
            raise TypeError(f"token ids must be integers, got dtype {arr.dtype}")
        if arr.size and (arr.min() < 0 or arr.max() >= 1 << 16):
            raise ValueError(f"token ids must lie in [0, 65535] (GPT-2 uses 0..50256), got "
                             f"{arr.min()}..{arr.max()}")
        tokens = arr.astype(np.uint16)
    if tokens.ndim != 1:
        raise ValueError(f"token ids must be 1-D (one long sequence), got shape {tokens.shape}")
    return tokens
