"""GPT-2's byte-level BPE tokenizer, written out: train one, encode, decode, save, load.

A language model reads integers, so text must become token ids. GPT-2 does it in 3 steps:

1. **Pre-tokenize.** A regular expression (GPT2_PATTERN) cuts the text into chunks: words with
   their leading space, numbers, runs of punctuation, runs of whitespace. Merges never cross
   a chunk boundary, so " dog." can become " dog" + "." but never "g." or "og.".
2. **Bytes.** Each chunk is encoded as UTF-8 and each byte is one token to start with: with
   256 base tokens any string at all can be encoded, there is no "unknown" token.
3. **Merges.** An ordered list of pairs (a, b) learned from a training text (``train``: merge
   the most frequent adjacent pair everywhere, repeat). Merge i fuses a, b into a new token
   with id 256 + i. Encoding applies the earliest-learned merge present until none is.

Token ids. A trained tokenizer uses the plain layout: id b < 256 is the byte b, id 256 + i is
merge i, and the special tokens (``<|endoftext|>``) come last. GPT-2's own files number the
256 bytes in another order (printable characters first, see ``_bytes_to_unicode``), so a
tokenizer also has a ``byte_order``: ``byte_order[i]`` is the byte that id i < 256 stands for.
With that one table, ``BPETokenizer.from_gpt2()`` gives exactly tiktoken's GPT-2 ids.

File format (``save`` / ``load``), UTF-8 JSON with one merge per line::

    {
      "format": "gpt2-course-bpe",
      "version": 1,
      "name": "trained-4096",
      "pattern": "'s|'t|'re|...",              the pre-tokenization regex
      "byte_order": [0, 1, 2, ..., 255],      the byte of each id 0..255
      "special_tokens": {"<|endoftext|>": 4095},
      "merges": [
        [32, 116, " t"],                      merge 0 = id 256: ids 32 and 116, reading " t"
        [104, 101, "he"],                     merge 1 = id 257
        ...
      ]
    }

The third item of a merge is only for the human reader (the bytes shown as UTF-8, with
``\\xNN`` for bytes that are not); ``load`` checks that it matches the ids, which catches a
hand-edited merge. Special tokens take the ids right after the last merge.

Command line::

    python tokenizer.py train --data input.txt --vocab-size 4096 --out tok.json
    python tokenizer.py compare --tokenizer tok.json --data valid.txt
"""

import argparse
import functools
import hashlib
import heapq
import json
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import regex  # the `regex` package, not `re`: it knows the Unicode classes \p{L} and \p{N}

# GPT-2's pre-tokenization, as in OpenAI's encoder.py: English contractions; a letter run,
# digit run or punctuation run each with at most one leading space; whitespace. ``\s+(?!\S)``
# takes a whitespace run except its last space, which then starts the next word (" dog").
# tiktoken's r50k_pat_str is an equivalent, faster spelling (possessive quantifiers).
GPT2_PATTERN = (r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+"""
                r"""|\s+(?!\S)|\s+""")
EOT = "<|endoftext|>"
FORMAT = "gpt2-course-bpe"


class BPETokenizer:
    """Byte-level BPE: ``merges`` (pairs of ids, in the order they were learned), plus
    ``special_tokens`` (str -> id), ``pattern`` and ``byte_order`` (see the module docstring).

    Derived attributes: ``vocab`` (list, id -> bytes, special tokens included), ``n_vocab``,
    ``eot_token`` (id of ``<|endoftext|>``, or None).
    """

    def __init__(self, merges, special_tokens=None, pattern=GPT2_PATTERN, byte_order=None,
                 name="bpe"):
        self.merges = [(int(a), int(b)) for a, b in merges]
        self.special_tokens = dict(special_tokens or {})
        self.pattern = pattern
        self.byte_order = list(range(256)) if byte_order is None else list(byte_order)
        self.name = name
        if sorted(self.byte_order) != list(range(256)):
            raise ValueError("byte_order must list each byte value 0..255 exactly once")

        # vocab[id] = the bytes of that token; a merged token is its two parts joined.
        self.vocab = [bytes([b]) for b in self.byte_order]
        self._rank = {}                 # (a, b) -> id of the merged token = 256 + its rank
        for i, (a, b) in enumerate(self.merges):
            for part in (a, b):
                if not 0 <= part < len(self.vocab):
                    raise ValueError(f"merge {i} refers to token {part}, which does not exist "
                                     f"before it (ids 0..{len(self.vocab) - 1})")
            if (a, b) in self._rank:
                raise ValueError(f"merge {i} repeats merge {self._rank[a, b] - 256}: {a} {b}")
            self._rank[a, b] = len(self.vocab)
            self.vocab.append(self.vocab[a] + self.vocab[b])
        self._id_of = {tok: i for i, tok in enumerate(self.vocab)}
        if len(self._id_of) != len(self.vocab):
            # tiktoken, and any bytes -> id table, need each byte string to be one token
            raise ValueError("two merges make the same bytes; each token must be unique")

        n, specials = len(self.vocab), self.special_tokens
        if (not all(isinstance(t, str) and t for t in specials) or
                sorted(specials.values()) != list(range(n, n + len(specials)))):
            raise ValueError(f"special tokens must be non-empty strings with the ids right after "
                             f"the merges, {n} onwards, each once; got {self.special_tokens}")
        for text in sorted(self.special_tokens, key=self.special_tokens.get):
            self.vocab.append(text.encode("utf-8"))
        self.n_vocab = len(self.vocab)
        self.eot_token = self.special_tokens.get(EOT)

        try:
            self._chunks = regex.compile(pattern)
        except regex.error as e:
            raise ValueError(f"the pattern {pattern!r} is not a valid regex: {e}") from None
        # Longest first: if one special token is a prefix of another, the longer one wins.
        longest_first = sorted(self.special_tokens, key=len, reverse=True)
        self._specials = regex.compile("(" + "|".join(map(regex.escape, longest_first)) + ")"
                                       ) if longest_first else None
        # Real text repeats its words, so most chunks were seen before: cache their ids.
        self._encode_chunk = functools.lru_cache(maxsize=1 << 16)(self._bpe)

    def __len__(self):
        return self.n_vocab

    def __repr__(self):
        return (f"BPETokenizer(name={self.name!r}, n_vocab={self.n_vocab}, "
                f"merges={len(self.merges)}, special_tokens={self.special_tokens})")

    def token_bytes(self, token_id):
        return self.vocab[token_id]

    # -- encoding --------------------------------------------------------------------------

    def encode(self, text):
        """Token ids of ``text``. Special tokens written in the text (``<|endoftext|>``) become
        their ids, like tiktoken's ``encode(text, allowed_special="all")``: the text is split at
        them first and the pieces between them are encoded normally.

        A lone surrogate ("\\ud800", e.g. from a badly decoded file) is refused with ValueError.
        It is not a character and has no UTF-8 bytes; tiktoken silently turns it into U+FFFD,
        which changes the text without a word, and we would rather the caller decides.
        """
        _check_unicode(text)
        ids = []
        for i, piece in enumerate(self._split_specials(text)):
            if i % 2:
                ids.append(self.special_tokens[piece])
            else:
                for chunk in self._chunks.findall(piece):
                    ids.extend(self._encode_chunk(chunk))
        return ids

    def _split_specials(self, text):
        """[text, special, text, special, ..., text]: special tokens at the odd positions."""
        return self._specials.split(text) if self._specials else [text]

    def _bpe(self, chunk):
        ids = [self._id_of[bytes([b])] for b in chunk.encode("utf-8")]
        while len(ids) > 1:
            # Of the adjacent pairs, the one merged earliest in training goes first, because
            # that is the order training built the tokens in: its result may be a part of
            # later merges, never the other way round.
            new = min(self._rank.get(pair, _NEVER) for pair in zip(ids, ids[1:]))
            if new == _NEVER:
                break
            ids = _merge(ids, *self.merges[new - 256], new)
        return tuple(ids)

    def decode_bytes(self, ids):
        if hasattr(ids, "tolist"):          # a tensor or numpy array
            ids = ids.tolist()
        try:
            if min(ids, default=0) < 0:     # vocab[-1] would quietly be the last token
                raise IndexError
            return b"".join([self.vocab[i] for i in ids])
        except (IndexError, TypeError):
            bad = next(i for i in ids if not (isinstance(i, int) and 0 <= i < self.n_vocab))
            raise ValueError(f"token id {bad!r} is not in this tokenizer "
                             f"(ids 0..{self.n_vocab - 1})") from None

    def decode(self, ids):
        """Text of ``ids``. A token may hold part of a character's UTF-8 bytes, so a cut-off
        sequence decodes with U+FFFD in place of the broken character (as tiktoken does)."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    # -- training --------------------------------------------------------------------------

    @classmethod
    def train(cls, text, vocab_size, special_tokens=(EOT,), pattern=GPT2_PATTERN,
              progress=False, name=None):
        """A new tokenizer of ``vocab_size`` tokens (256 bytes + merges + special tokens),
        learned from ``text``. Special tokens in the text are cut out; nothing merges across
        them. ``progress=True`` prints a line on stderr every 10% of the merges.

        Pairs are counted within the chunks of the pre-tokenization, and a chunk that occurs
        n times is stored once with the count n: English has far fewer distinct words than
        words. Each step merges the most frequent pair; **ties go to the smallest pair
        (id_a, id_b)**, so training is deterministic. A pair's count is the number of places
        it occurs, overlaps included ("aaa" holds the pair (a, a) twice).

        The counts are kept up to date instead of recounted: ``where[pair]`` holds the chunks
        that contain the pair, so a merge revisits only those chunks and changes only the
        counts of their pairs. A heap finds the most frequent pair; when a count changes, the
        new count is pushed and the old entry stays until it surfaces and is seen to be stale.
        """
        specials = list(special_tokens)
        n_merges = vocab_size - 256 - len(specials)
        if n_merges < 0:
            raise ValueError(f"vocab_size must be at least 256 + {len(specials)} special "
                             f"token(s) = {256 + len(specials)}, got {vocab_size}")
        if not text:
            raise ValueError("cannot train on an empty text; give some text to learn from")
        _check_unicode(text)

        seen = Counter()
        # A tokenizer with no merges splits the text exactly as encode() will split it.
        splitter = cls([], {s: 256 + i for i, s in enumerate(specials)}, pattern)
        for piece in splitter._split_specials(text)[::2]:
            seen.update(splitter._chunks.findall(piece))
        chunks = [list(chunk.encode("utf-8")) for chunk in seen]     # ids = byte values
        counts = list(seen.values())
        del seen

        pair_count = defaultdict(int)
        where = defaultdict(set)
        for c, (chunk, n) in enumerate(zip(chunks, counts)):
            for pair in zip(chunk, chunk[1:]):
                pair_count[pair] += n
                where[pair].add(c)
        heap = [(-n, a, b) for (a, b), n in pair_count.items()]
        heapq.heapify(heap)             # smallest (-count, a, b) first: the tie rule

        merges, vocab, t0 = [], [bytes([b]) for b in range(256)], time.perf_counter()
        while len(merges) < n_merges:
            while heap:
                neg, a, b = heapq.heappop(heap)
                if pair_count.get((a, b)) == -neg:
                    break               # a current entry, not a stale one
            else:
                raise ValueError(f"the text supports at most {256 + len(merges) + len(specials)}"
                                 f" tokens ({len(merges)} merges), not {vocab_size}; give more "
                                 f"text or ask for fewer tokens")
            new = 256 + len(merges)
            merges.append((a, b))
            vocab.append(vocab[a] + vocab[b])
            # A chunk is a few tokens long: taking all its old pairs out and all its new pairs
            # in is simpler than patching the neighbours of each merge, and about as fast.
            # Summing the changes first pushes each changed pair on the heap once.
            delta = defaultdict(int)
            for c in where.pop((a, b)):
                chunk = chunks[c]
                merged = _merge(chunk, a, b, new)
                if len(merged) == len(chunk):
                    continue            # no longer holds the pair (``where`` is not pruned)
                n = counts[c]
                for pair in zip(chunk, chunk[1:]):
                    delta[pair] -= n
                for pair in zip(merged, merged[1:]):
                    delta[pair] += n
                    where[pair].add(c)
                chunks[c] = merged
            for pair, d in delta.items():
                if d:
                    n = pair_count[pair] = pair_count[pair] + d
                    if n:
                        heapq.heappush(heap, (-n, *pair))
                    else:
                        del pair_count[pair]
            if progress and len(merges) % max(1, n_merges // 10) == 0:
                print(f"  merge {len(merges)}/{n_merges}: {_show(vocab[new])!r} ({-neg} times), "
                      f"{time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)

        return cls(merges, {s: 256 + n_merges + i for i, s in enumerate(specials)}, pattern,
                   name=name or f"trained-{vocab_size}")

    # -- GPT-2's own files, and tiktoken ------------------------------------------------------

    @classmethod
    def from_gpt2(cls):
        """GPT-2's tokenizer: its 50,000 merges and ``<|endoftext|>`` = 50256, read from
        OpenAI's ``vocab.bpe`` (the merges, one "first second" per line, in order) and
        ``encoder.json`` (token string -> id), both written in ``_bytes_to_unicode`` form."""
        from engine.bpe_files import gpt2_vocab_and_merges
        ids, lines = gpt2_vocab_and_merges()
        to_byte = {c: b for b, c in _bytes_to_unicode().items()}
        encoder = {bytes(to_byte[c] for c in s) if s != EOT else s: i for s, i in ids.items()}
        byte_order = sorted(range(256), key=lambda b: encoder[bytes([b])])
        merges = [[encoder[bytes(to_byte[c] for c in part)] for part in line.split(" ")]
                  for line in lines]
        tok = cls(merges, {EOT: encoder[EOT]}, GPT2_PATTERN, byte_order, name="gpt2")
        # encoder.json is the authority on ids; our layout must agree with every entry.
        for token, i in encoder.items():
            if tok.vocab[i] != (token.encode() if isinstance(token, str) else token):
                raise RuntimeError(f"GPT-2's encoder.json gives id {i} to {token!r}, but its "
                                   f"vocab.bpe makes {tok.vocab[i]!r}")
        return tok

    def to_tiktoken(self):
        """The same tokenizer as a ``tiktoken.Encoding`` (encoding in Rust, many times faster).

        tiktoken ranks tokens by their bytes and uses the rank as the id; here a merged
        token's id is always above its parts' ids, which is the order tiktoken needs. Like
        ``encode``, call ``.encode(text, allowed_special="all")`` to read special tokens.
        """
        import tiktoken
        ranks = {tok: i for i, tok in enumerate(self.vocab[:256 + len(self.merges)])}
        # the name carries the fingerprint: caches of token ids (engine/token_cache.py) are
        # told apart by it, and two vocabularies of one name are not the same tokenizer
        name = f"{self.name}-{self.fingerprint()[:12]}"
        return tiktoken.Encoding(name=name, pat_str=self.pattern, mergeable_ranks=ranks,
                                 special_tokens=dict(self.special_tokens),
                                 explicit_n_vocab=self.n_vocab)

    def to_hf_files(self):
        """``(vocab, merges)``: the tokenizer as GPT-2's ``encoder.json`` (token string -> id)
        and ``vocab.bpe`` lines, the files Hugging Face's GPT2Tokenizer reads (as vocab.json
        and merges.txt), in ``_bytes_to_unicode`` form. For GPT-2's own merges they are
        OpenAI's files again."""
        show = _bytes_to_unicode()

        def text(token):
            return "".join(show[b] for b in token)

        vocab = {text(tok): i for i, tok in enumerate(self.vocab[:256 + len(self.merges)])}
        vocab.update(self.special_tokens)
        merges = [f"{text(self.vocab[a])} {text(self.vocab[b])}" for a, b in self.merges]
        return vocab, merges

    # -- the file ------------------------------------------------------------------------------

    def dumps(self):
        """The tokenizer as the text of its file (format: module docstring)."""
        def field(key, value):
            return f"  {json.dumps(key)}: {json.dumps(value, ensure_ascii=False)},"

        def block(lines):       # one item a line: a diff of two files shows what changed
            return ",\n".join("    " + line for line in lines)

        byte_rows = (", ".join(map(str, self.byte_order[i:i + 16])) for i in range(0, 256, 16))
        merges = (json.dumps([a, b, _show(self.vocab[new])], ensure_ascii=False)
                  for new, (a, b) in enumerate(self.merges, start=256))
        return "\n".join([
            "{", field("format", FORMAT), field("version", 1), field("name", self.name),
            field("pattern", self.pattern),
            '  "byte_order": [', block(byte_rows), "  ],",
            field("special_tokens", self.special_tokens),
            '  "merges": [', block(merges), "  ]", "}", ""])

    def fingerprint(self):
        """sha256 of what decides the ids (merges, byte order, specials, pattern), not the
        name: two tokenizers with the same fingerprint encode every text alike."""
        what = [self.merges, self.byte_order, sorted(self.special_tokens.items()), self.pattern]
        return hashlib.sha256(json.dumps(what).encode()).hexdigest()

    def save(self, path):
        """Write the tokenizer to ``path`` atomically: a temp file beside it, fsync, rename,
        so a crash never leaves half a file."""
        from engine.fileio import atomic_write
        atomic_write(path, lambda f: f.write(self.dumps().encode("utf-8")))
        return Path(path)

    @classmethod
    def load(cls, path):
        """Read a file written by ``save``. A damaged or hand-edited file raises ValueError
        naming the file and the problem."""
        try:
            text = Path(path).read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            raise _bad_file(path, f"not UTF-8 text (byte {e.start})") from None
        return cls.loads(text, source=path)

    @classmethod
    def loads(cls, text, source="the tokenizer"):
        """A tokenizer from the text of its file (``source`` names it in errors), checked
        whole before it is trusted: the format, every merge (well formed, each making the
        bytes it says), ``<|endoftext|>`` among the special tokens, and the ids contiguous
        (bytes, merges, then the special tokens). Wherever the text comes from (a file, a
        checkpoint, an export), this is the one way in."""
        def bad(problem):
            return _bad_file(source, problem)
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise bad(f"bad JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise bad(f'no "format": "{FORMAT}" tag')
        if data.get("version") != 1:
            raise bad(f"version {data.get('version')!r}, this code reads version 1")
        merges = data.get("merges")
        if not isinstance(merges, list):
            raise bad('no "merges" list' if merges is None else
                      f'"merges" is a {type(merges).__name__}, not a list of [id, id, text]')
        for i, m in enumerate(merges):
            if not (isinstance(m, list) and len(m) == 3 and all(type(x) is int for x in m[:2])
                    and isinstance(m[2], str)):
                raise bad(f"merge {i} is {m!r}, not [id, id, text]")
        specials = data.get("special_tokens")
        if isinstance(specials, dict) and EOT not in specials:
            # every model of this project ends a text and an answer with it
            raise bad(f"its special tokens {specials} lack {EOT}, which ends every document "
                      f"and every answer (generation stops at it)")
        try:
            tok = cls([m[:2] for m in merges], data["special_tokens"], data["pattern"],
                      data["byte_order"], data["name"])
        except KeyError as e:
            raise bad(f"no {e} field") from None
        except (ValueError, TypeError) as e:
            raise bad(str(e)) from None
        for i, m in enumerate(merges):
            if _show(tok.vocab[256 + i]) != m[2]:
                raise bad(f"merge {i} {m[:2]} makes {_show(tok.vocab[256 + i])!r}, but the "
                          f"file says {m[2]!r} (edited?)")
        return tok


def _bad_file(source, problem):
    return ValueError(f"{source}: {problem}; not a usable tokenizer file (write it again with "
                      f"save() or `python tokenizer.py train`)")


_NEVER = float("inf")       # the rank of a pair that is not a merge


def _merge(ids, a, b, new):
    """``ids`` with every occurrence of a followed by b replaced by ``new``, left to right
    ("aaa" with (a, a) gives [aa, a])."""
    out, i, n = [], 0, len(ids)
    while i < n:
        if ids[i] == a and i + 1 < n and ids[i + 1] == b:
            out.append(new)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def _show(token):
    """Bytes as readable text: UTF-8 where they are, ``\\xNN`` where not (a piece of a
    character)."""
    return token.decode("utf-8", errors="backslashreplace")


def _check_unicode(text):
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"the text has a lone surrogate {text[e.start]!r} at index {e.start}, "
                         f"which is not a character and has no UTF-8 form; clean the text "
                         f"first, e.g. text.encode('utf-8', 'replace').decode()") from None


@functools.cache
def _bytes_to_unicode():
    """OpenAI's byte -> character table, used in GPT-2's files.

    encoder.json and vocab.bpe are text files, and a space separates the two halves of a merge
    in vocab.bpe, so a token cannot be written with its raw bytes: a space, a newline or a
    control byte would be invisible or break the format. So each byte got a visible stand-in.
    The 188 bytes that are printable Latin-1 characters other than space (33..126, 161..172,
    174..255) stand for themselves; the 68 others, in order, become U+0100, U+0101, ...: byte
    32 (space) is "Ġ" (U+0120), byte 10 (newline) is "Ċ". GPT-2's ids 0..255 follow the same
    order, printable bytes first, which is why "!" is id 0.
    """
    visible = [b for b in range(256) if chr(b).isprintable() and b != ord(" ")]
    hidden = [b for b in range(256) if b not in visible]
    table = {b: chr(b) for b in visible}
    table.update({b: chr(256 + n) for n, b in enumerate(hidden)})
    return table


# -- command line ---------------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    """argparse, with every error one line "error: ..." and exit code 2 (no usage block)."""

    def error(self, message):       # argparse's own: a flag missing or malformed
        self.fail(f"{message} (see {self.prog} --help)")

    def fail(self, message):        # ours: the files or the values are wrong
        self.exit(2, f"error: {message}\n")


def bytes_per_token(encoding, text):
    """How much text one token carries on average (higher: shorter sequences)."""
    return len(text.encode("utf-8")) / max(1, len(encoding.encode(text, allowed_special="all")))


def _read_text(parser, path):
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        parser.fail(f"cannot read {path}: {e.strerror or e}")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        parser.fail(f"{path} is not UTF-8 text (invalid byte at offset {e.start}); convert it "
                     f"first, e.g. iconv -t utf-8")
    if not text:
        parser.fail(f"{path} is empty")
    return text


def cli_train(parser, args):
    from engine.fileio import check_output
    try:        # before the training, which may take minutes
        check_output(args.out, [("--data", args.data)], "--out")
    except (ValueError, OSError) as e:
        parser.fail(str(e))
    text = _read_text(parser, args.data)
    print(f"training a {args.vocab_size}-token BPE on {args.data} "
          f"({len(text.encode('utf-8')):,} bytes)", flush=True)
    t0 = time.perf_counter()
    try:
        tok = BPETokenizer.train(text, args.vocab_size, progress=True)
    except ValueError as e:
        parser.fail(str(e))
    took = time.perf_counter() - t0
    try:
        tok.save(args.out)
    except OSError as e:
        parser.fail(f"cannot write {args.out}: {e.strerror or e}")
    print(f"{len(tok.merges)} merges in {took:.1f} s; wrote {args.out}")
    print(f"bytes per token on the training text: {bytes_per_token(tok.to_tiktoken(), text):.2f}")
    return 0


def cli_compare(parser, args):
    try:
        trained = BPETokenizer.load(args.tokenizer)
    except OSError as e:
        parser.fail(f"cannot read {args.tokenizer}: {e.strerror or e}")
    except ValueError as e:
        parser.fail(str(e))
    text = _read_text(parser, args.data)
    print(f"{args.data}: {len(text.encode('utf-8')):,} bytes")
    figures = {}
    for label, tok in (("gpt2", BPETokenizer.from_gpt2()), ("trained", trained)):
        figures[label] = bytes_per_token(tok.to_tiktoken(), text)
        print(f"{label:8s} {tok.n_vocab:6d} tokens ({tok.name}): "
              f"{figures[label]:.2f} bytes per token")
    print(f"bytes_per_token: gpt2={figures['gpt2']:.2f} trained={figures['trained']:.2f}")
    return 0


def main(argv=None):
    parser = _Parser(prog="tokenizer.py", description="Train and compare byte-level BPE "
                     "tokenizers (GPT-2's algorithm).")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="learn merges from a UTF-8 text file")
    p.add_argument("--data", required=True, help="training text (UTF-8)")
    p.add_argument("--vocab-size", type=int, required=True,
                   help="tokens in all: 256 bytes + merges + 1 (<|endoftext|>)")
    p.add_argument("--out", required=True, help="tokenizer file to write (JSON)")
    p.set_defaults(run=cli_train)
    p = sub.add_parser("compare", help="bytes per token: GPT-2's tokenizer vs a trained one")
    p.add_argument("--tokenizer", required=True, help="a file written by `train`")
    p.add_argument("--data", required=True, help="text to measure on (UTF-8)")
    p.set_defaults(run=cli_compare)
    args = parser.parse_args(argv)
    return args.run(sub.choices[args.command], args)


if __name__ == "__main__":
    sys.exit(main())
