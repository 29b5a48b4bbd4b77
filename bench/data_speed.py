"""Tokenizing a big text file into the token cache vs tiktoken's own batch encoder.

    python bench/data_speed.py                 # 100 MB file, 3 rounds
    python bench/data_speed.py --size-mb 20    # a smaller file
    python bench/data_speed.py --quick         # 5 MB, 2 rounds: a smoke run

The file repeats ../shared/data/tinyshakespeare.txt (or, if that is missing, Python's
pydoc_data.topics text) up to ``--size-mb`` MB, in a temporary folder deleted at the end.

Contenders, each in a fresh Python process per round, alternating order:
  ours      dataset.load_tokens(path, cache=True) with the cache files deleted first:
            read, tokenize, write <file>.tokens.u16 + .tokens.json, fsync.
  tiktoken  the ceiling: the same text (already in memory, not timed) cut at newlines into
            ~--chunk-kb pieces, then Encoding.encode_ordinary_batch(pieces,
            num_threads=os.cpu_count()) with the same GPT-2 Encoding (dataset.get_tokenizer()).
Both build the tokenizer before the clock starts. Peak memory: the child's maximum RSS
as the kernel accounts it (os.wait4 rusage), the Python + torch import included; the
"before" column is the RSS right before the timed call.
"""

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (puts the repository root on sys.path)

SPEED_TARGET = 0.80          # ours MB/s / tiktoken MB/s
MEMORY_TARGET = 2**30        # ours peak RSS, bytes
SHAKESPEARE = common.ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"


def source_text():
    """(text, where it came from)."""
    if SHAKESPEARE.is_file():
        return SHAKESPEARE.read_text(encoding="utf-8"), str(SHAKESPEARE)
    from dataset import default_corpus_text
    return default_corpus_text(), "pydoc_data.topics"


def build_file(folder, size_mb):
    """Write text.txt of about ``size_mb`` MB (10**6 bytes) into ``folder``; return its path."""
    text, origin = source_text()
    block = text if text.endswith("\n") else text + "\n"
    data = block.encode("utf-8")
    want = int(size_mb * 1e6)
    path = Path(folder) / "text.txt"
    with open(path, "wb") as f:
        written = 0
        while written < want:
            piece = data[:want - written]
            if len(piece) < len(data):       # end on a line boundary, valid UTF-8
                piece = piece[:piece.rfind(b"\n") + 1]
                if not piece:
                    break
            f.write(piece)
            written += len(piece)
    return path, origin


def chunks_at_newlines(text, chunk_chars):
    """Pieces of about ``chunk_chars`` characters, each ending just after a newline."""
    out, start, n = [], 0, len(text)
    while start < n:
        end = text.find("\n", min(start + chunk_chars, n - 1))
        end = n if end == -1 else end + 1
        out.append(text[start:end])
        start = end
    return out


def child_main(kind, path, chunk_kb):
    """Runs in the fresh process: time one contender, print one JSON line."""
    import dataset
    tok = dataset.get_tokenizer()
    path = Path(path)
    if kind == "ours":
        for p in dataset.token_cache_paths(path):
            p.unlink(missing_ok=True)
        before = common.rss_bytes()
        t0 = time.perf_counter()
        ids = dataset.load_tokens(path, cache=True)
        seconds = time.perf_counter() - t0
        n_tokens = len(ids)
        cached = all(p.is_file() for p in dataset.token_cache_paths(path))
        assert cached, "load_tokens did not write its cache"
        first = ids[:16].tolist()
    else:
        text = path.read_text(encoding="utf-8")
        pieces = chunks_at_newlines(text, chunk_kb * 1024)
        del text
        before = common.rss_bytes()
        t0 = time.perf_counter()
        out = tok.encode_ordinary_batch(pieces, num_threads=os.cpu_count() or 1)
        seconds = time.perf_counter() - t0
        n_tokens = sum(len(x) for x in out)
        first = out[0][:16]
    common.child_report(seconds=seconds, n_tokens=n_tokens, rss_before=before, first=first)


def bench_data(size_mb=100.0, rounds=3, chunk_kb=1024, folder=None, log=print):
    """Build the file, run both contenders ``rounds`` times; return (rows, info)."""
    tmp = Path(tempfile.mkdtemp(prefix="bench_data_", dir=folder))
    try:
        path, origin = build_file(tmp, size_mb)
        size = path.stat().st_size
        log(f"text: {size / 1e6:.1f} MB ({origin} repeated) in {tmp}")
        path.read_bytes()           # into the page cache, so no contender pays the disk read

        def contender(kind):
            def run():
                res, peak, wall = common.run_child(
                    [__file__, "--child", kind, "--path", str(path), "--chunk-kb",
                     str(chunk_kb)])
                return {**res, "peak": peak, "wall": wall}
            return run

        runs = common.interleaved({"ours": contender("ours"),
                                   "tiktoken": contender("tiktoken")}, rounds, label="data")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    counts = {k: {r["n_tokens"] for r in v} for k, v in runs.items()}
    first = {k: v[0]["first"] for k, v in runs.items()}
    rows = []
    base = common.median([r["seconds"] for r in runs["tiktoken"]])
    for kind, rs in runs.items():
        secs = [r["seconds"] for r in rs]
        med = common.median(secs)
        rows.append({"contender": kind, "median_s": med, "min_s": min(secs),
                     "max_s": max(secs), "mb_per_s": size / 1e6 / med,
                     "vs_tiktoken": base / med, "peak_rss": max(r["peak"] for r in rs),
                     "rss_before": common.median([r["rss_before"] for r in rs]),
                     "n_tokens": sorted(counts[kind])[0]})
    info = {"size": size, "origin": origin, "counts": counts, "first": first,
            "chunk_kb": chunk_kb}
    return rows, info


def summarize(rows, quick):
    by = {r["contender"]: r for r in rows}
    t1, ok1 = common.target("ours/tiktoken throughput", by["ours"]["vs_tiktoken"],
                            SPEED_TARGET, fmt="{:.1%}")
    peak = by["ours"]["peak_rss"]
    ok2 = peak < MEMORY_TARGET
    t2 = f"ours peak RSS {common.fmt_bytes(peak)} (< 1 GiB {common.verdict(ok2)})"
    note = " [--quick: small file, target is for 100 MB]" if quick else ""
    return (f"SUMMARY data_speed: {t1}; {t2}; {by['ours']['mb_per_s']:.1f} MB/s vs tiktoken "
            f"{by['tiktoken']['mb_per_s']:.1f} MB/s; {ok1 + ok2}/2 targets met{note}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size-mb", type=float, default=None, help="default 100 (5 with --quick)")
    p.add_argument("--rounds", type=int, default=None, help="default 3 (2 with --quick)")
    p.add_argument("--chunk-kb", type=int, default=1024,
                   help="piece size for the tiktoken ceiling (cut at newlines)")
    p.add_argument("--tmp", default=None, help="folder for the temporary file (default: TMPDIR)")
    p.add_argument("--quick", action="store_true", help="5 MB, 2 rounds")
    p.add_argument("--child", choices=("ours", "tiktoken"), help=argparse.SUPPRESS)
    p.add_argument("--path", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child_main(args.child, args.path, args.chunk_kb)
    size_mb = args.size_mb or (5.0 if args.quick else 100.0)
    rounds = args.rounds or (2 if args.quick else 3)

    print(f"data_speed: tokenize a {size_mb:g} MB text file; each contender in a fresh "
          f"process, {rounds} alternating rounds, median time, max peak RSS")
    print(common.machine_line())
    rows, info = bench_data(size_mb, rounds, args.chunk_kb, args.tmp)
    same = len(set.union(*info["counts"].values())) == 1
    print(f"token counts: ours {sorted(info['counts']['ours'])}, tiktoken "
          f"{sorted(info['counts']['tiktoken'])} (equal: {same}; pieces cut at newlines may "
          f"tokenize a few boundaries differently)")
    table_rows = [[r["contender"], f"{r['median_s']:.2f}", f"{r['min_s']:.2f}-{r['max_s']:.2f}",
                   f"{r['mb_per_s']:.2f}", f"{r['vs_tiktoken']:.0%}",
                   common.fmt_bytes(r["rss_before"]), common.fmt_bytes(r["peak_rss"]),
                   f"{r['n_tokens']:,}"] for r in rows]
    print()
    print(common.table(["contender", "median s", "range s", "MB/s", "vs tiktoken",
                        "RSS before", "peak RSS", "tokens"], table_rows))
    print(f"(MB = 10^6 bytes of text; ours includes reading the file, hashing it and writing "
          f"+ fsyncing the cache; tiktoken: encode_ordinary_batch over {info['chunk_kb']} KB "
          f"pieces, {os.cpu_count()} threads)")
    print()
    print(summarize(rows, args.quick))
    return rows, info


if __name__ == "__main__":
    main()
