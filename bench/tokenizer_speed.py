"""Training and encoding speed of tokenizer.BPETokenizer vs Hugging Face tokenizers.

    python bench/tokenizer_speed.py                 # vocab 4096 on the default corpus
    python bench/tokenizer_speed.py --big           # vocab 32768 on ~10 MB of offline text
    python bench/tokenizer_speed.py --text FILE --vocab-size 32768
    python bench/tokenizer_speed.py --quick         # vocab 1024, 1 round: a smoke run

The text is cut at a line break into 90% for training and 10% held out. ``--big`` builds
~``--big-mb`` MB from what every Python has offline: the default corpus (pydoc_data's topics
as prose), the raw pydoc topic pages, then the standard library's own .py files (docstrings,
comments and code), sorted by path so the text is the same on every run of one Python.

Training, interleaved rounds, median:
  ours        BPETokenizer.train(train_text, V): pure Python, one core
  tokenizers  models.BPE + pre_tokenizers.ByteLevel (the same GPT-2 regex) + BpeTrainer(V,
              ByteLevel alphabet, <|endoftext|>), fed train_text in ~64 KB pieces; Rust, all cores
Compression: bytes per token (UTF-8 bytes / tokens) on the held-out text; GPT-2's own for
reference. Encoding (MB/s, one call on the whole text; ``--encode-mb`` caps it): ours in pure
Python with its chunk cache cleared each round, ours through to_tiktoken() (one thread), and
tokenizers' encode (one string) and encode_batch (~64 KB pieces, all cores). Our two encoders must
give the same ids (the script fails otherwise).
"""

import argparse
import sys
import sysconfig
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (puts the repository root on sys.path)
from tokenizer import EOT, BPETokenizer  # noqa: E402

TRAIN_TARGET_S = {"default": 10.0, "big": 300.0}  # ours, median seconds
COMPRESSION_TARGET = 0.98                         # ours bytes/token / tokenizers'


def default_text():
    try:
        from dataset import default_corpus_text
        return default_corpus_text()
    except ImportError:             # dataset.py being reworked: the raw pages instead
        from pydoc_data.topics import topics
        return "\n\n".join(topics[k] for k in sorted(topics))


def big_text(size_mb):
    """About ``size_mb`` MB (10**6 bytes) of text found on every Python installation."""
    from pydoc_data.topics import topics
    parts = [default_text(), *(topics[k] for k in sorted(topics))]
    size = sum(len(p.encode("utf-8")) for p in parts)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.rglob("*.py")):
        if size >= size_mb * 1e6:
            break
        if {"site-packages", "test", "tests", "idlelib"} & set(path.parts):
            continue
        try:
            source = path.read_text("utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        parts.append(source)
        size += len(source.encode("utf-8"))
    return "\n\n".join(parts)


def split(text, held_out=0.1):
    """(train, held out): cut at the first line break after (1 - held_out) of the text."""
    cut = text.find("\n", int(len(text) * (1 - held_out)))
    cut = len(text) if cut < 0 else cut + 1
    return text[:cut], text[cut:]


def pieces(text, size=1 << 16):
    """``text`` cut at line breaks into pieces of about ``size`` characters: tokenizers works on
    a list of strings, one per thread. (Lines would be too fine: "\n" + indentation is one
    pre-token of GPT-2's regex, and it would never be seen whole.)"""
    out, start = [], 0
    while start < len(text):
        end = text.find("\n", start + size)
        end = len(text) if end < 0 else end + 1
        out.append(text[start:end])
        start = end
    return out


def train_hf(texts, vocab_size):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return tok


def bench_training(train_text, vocab_size, rounds):
    texts = pieces(train_text)
    made = {}

    def ours():
        seconds, made["ours"] = common.timed(BPETokenizer.train, train_text, vocab_size)
        return seconds

    def hf():
        seconds, made["tokenizers"] = common.timed(train_hf, texts, vocab_size)
        return seconds

    times = common.interleaved({"ours": ours, "tokenizers": hf}, rounds, label="train")
    return times, made


def bench_encoding(ours, hf, text, rounds):
    enc = ours.to_tiktoken()
    ids = {}

    def python():
        ours._encode_chunk.cache_clear()        # a cold cache, as on a new text
        seconds, ids["python"] = common.timed(ours.encode, text)
        return seconds

    def via_tiktoken():
        seconds, ids["tiktoken"] = common.timed(enc.encode, text, allowed_special="all")
        return seconds

    def tokenizers():
        seconds, ids["tokenizers"] = common.timed(hf.encode, text)
        return seconds

    batch = pieces(text)

    def tokenizers_batch():
        return common.timed(hf.encode_batch, batch)[0]

    times = common.interleaved({"ours python": python, "ours to_tiktoken": via_tiktoken,
                                "tokenizers": tokenizers,
                                "tokenizers batch": tokenizers_batch}, rounds, label="encode")
    if ids["python"] != ids["tiktoken"]:
        raise SystemExit("FAIL: BPETokenizer.encode and its to_tiktoken() gave different ids")
    return times


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--text", help="a UTF-8 text file (default: the default corpus)")
    p.add_argument("--big", action="store_true",
                   help="~--big-mb MB of offline text (corpus, pydoc pages, stdlib sources)")
    p.add_argument("--big-mb", type=float, default=10.0)
    p.add_argument("--vocab-size", type=int, default=None,
                   help="default 4096 (32768 with --big, 1024 with --quick)")
    p.add_argument("--rounds", type=int, default=None, help="default 3 (1 with --quick)")
    p.add_argument("--encode-mb", type=float, default=2.0,
                   help="encode at most this many MB of the text (default 2)")
    p.add_argument("--quick", action="store_true", help="vocab 1024, 1 round")
    args = p.parse_args(argv)
    rounds = args.rounds or (1 if args.quick else 3)
    vocab_size = args.vocab_size or (1024 if args.quick else 32768 if args.big else 4096)
    if args.text:
        text, origin = Path(args.text).read_text("utf-8"), args.text
    elif args.big:
        text, origin = big_text(args.big_mb), "corpus + pydoc pages + stdlib sources"
    else:
        text, origin = default_text(), "the default corpus"
    train_text, held_out = split(text)
    n_bytes = len(text.encode("utf-8"))

    print(f"tokenizer_speed: train a {vocab_size}-token byte-level BPE on {origin} "
          f"({n_bytes / 1e6:.2f} MB, 90% train / 10% held out); {rounds} interleaved rounds, "
          f"medians")
    print(common.machine_line())
    print(f"CPU: {cpu_model()}")
    times, made = bench_training(train_text, vocab_size, rounds)
    ours, hf = made["ours"], made["tokenizers"]

    gpt2 = BPETokenizer.from_gpt2().to_tiktoken()
    held_bytes = len(held_out.encode("utf-8"))
    bpt = {"ours": held_bytes / len(ours.to_tiktoken().encode(held_out, allowed_special="all")),
           "tokenizers": held_bytes / len(hf.encode(held_out).ids),
           "gpt2 (50257)": held_bytes / len(gpt2.encode(held_out, allowed_special="all"))}
    sample = text.encode("utf-8")[:int(args.encode_mb * 1e6)].decode("utf-8", "ignore")
    enc_times = bench_encoding(ours, hf, sample, rounds)
    sample_mb = len(sample.encode("utf-8")) / 1e6

    print()
    rows = [[name, f"{common.median(t):.2f}", f"{min(t):.2f}-{max(t):.2f}",
             f"{bpt[name]:.3f}"] for name, t in times.items()]
    rows.append(["gpt2 (50257)", "-", "-", f"{bpt['gpt2 (50257)']:.3f}"])
    print(common.table(["training", "median s", "range s", "bytes/token held out"], rows))
    print()
    rows = [[name, f"{common.median(t):.3f}", f"{sample_mb / common.median(t):.2f}"]
            for name, t in enc_times.items()]
    print(common.table([f"encoding {sample_mb:.2f} MB", "median s", "MB/s"], rows))
    print()

    goal = TRAIN_TARGET_S["big" if n_bytes > 2e6 else "default"]
    t1, ok1 = common.target("train", common.median(times["ours"]), goal, higher_is_better=False,
                            fmt="{:.1f} s")
    t2, ok2 = common.target("bytes/token vs tokenizers", common.ratio(bpt["ours"],
                            bpt["tokenizers"]), COMPRESSION_TARGET, fmt="{:.3f}x")
    speeds = ", ".join(f"{name} {sample_mb / common.median(t):.2f}"
                       for name, t in enc_times.items())
    print(f"SUMMARY tokenizer_speed: vocab {vocab_size} on {n_bytes / 1e6:.2f} MB: {t1}; "
          f"tokenizers {common.median(times['tokenizers']):.1f} s; {t2} "
          f"({bpt['ours']:.3f} vs {bpt['tokenizers']:.3f}); encode MB/s: {speeds}"
          + ("; --quick: not meaningful" if args.quick else ""))
    return ok1 and ok2


def cpu_model():
    """The CPU's name from /proc/cpuinfo (what lscpu shows as "Model name")."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor() or platform.machine()


if __name__ == "__main__":
    main()
