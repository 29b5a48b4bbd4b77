"""Loading a save_pretrained folder: download_weights_hf.load_gpt2_hf vs from_pretrained.

    python bench/load_speed.py                       # 124M and 774M shapes, 3 rounds
    python bench/load_speed.py --sizes 124M --rounds 5
    python bench/load_speed.py --quick               # tiny shape: a smoke run

For each shape a random GPT2LMHeadModel is written with save_pretrained (safetensors,
fp32) into a temporary folder (774M: ~3.1 GB; free disk is checked first), and the
folders are deleted at the end. Every measurement runs in a fresh Python process, the
two contenders alternating, on the same folder (read once beforehand so both find it in
the page cache):
  ours       download_weights_hf.load_gpt2_hf(folder)
  ours-copy  load_gpt2_hf(folder, mmap=False), when load_gpt2_hf has that option
  HF         transformers.GPT2LMHeadModel.from_pretrained(folder)
The targets apply to "ours" (the default call); ours-copy is reported beside it.
"load s" times just that call; "+read s" adds reading every weight once (sum), because
transformers returns tensors that still map the file and reads them on first use;
"process s" is the whole child (start-up, imports, load and read).
Peak RSS is the child's maximum resident set size (os.wait4 rusage). "before" is the RSS
after the imports, right before the call; "load peak" = peak - before is what loading
itself costs, compared with the fp32 weight bytes (target <= 1.3x).
"""

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (puts the repository root on sys.path)

RSS_TARGET = 1.3         # (peak RSS - RSS before the call) / fp32 weight bytes, ours
TIME_TARGET = 1.0        # ours load seconds / HF load seconds


def weight_bytes(shape):
    """fp32 bytes of a GPT-2 of ``shape`` (tied head counted once)."""
    n_layer, C, _, n_pos = common.SHAPES[shape]
    V = common.GPT2_VOCAB
    per_block = 4 * C + (3 * C * C + 3 * C) + (C * C + C) + (4 * C * C + 4 * C) + (4 * C * C + C)
    return 4 * (V * C + n_pos * C + n_layer * per_block + 2 * C)


def child_build(shape, path, seed):
    import torch
    from transformers import GPT2LMHeadModel
    common.quiet_transformers()
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(common.hf_config(shape))
    model.save_pretrained(path)
    common.child_report(ok=True)


def child_load(kind, path):
    import torch
    if kind.startswith("ours"):
        from download_weights_hf import load_gpt2_hf
        kwargs = {"mmap": False} if kind == "ours-copy" else {}
        before = common.rss_bytes()
        t0 = time.perf_counter()
        model = load_gpt2_hf(path, **kwargs)
        seconds = time.perf_counter() - t0
        wte = model.tok_emb.weight
    else:
        from transformers import GPT2LMHeadModel
        common.quiet_transformers()
        before = common.rss_bytes()
        t0 = time.perf_counter()
        model = GPT2LMHeadModel.from_pretrained(path)
        seconds = time.perf_counter() - t0
        wte = model.transformer.wte.weight
    # A loader may hand back tensors that still view the file (memory-mapped, read on
    # first use). Reading every weight once makes both pay for having them in memory.
    t1 = time.perf_counter()
    with torch.no_grad():
        total = sum(float(p.sum()) for p in model.parameters())
    touch = time.perf_counter() - t1
    params = {p.dtype for p in model.parameters()}
    n = sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        check = float(wte[:64].double().sum())
    common.child_report(seconds=seconds, touch_s=touch, rss_before=before, n_params=n,
                        dtypes=sorted(map(str, params)), check=check, total=total)


def has_mmap_option():
    """Whether load_gpt2_hf has mmap= (then mmap=False, copying into memory, is timed too)."""
    import inspect

    from download_weights_hf import load_gpt2_hf
    return "mmap" in inspect.signature(load_gpt2_hf).parameters


def bench_shape(shape, rounds, tmp_root, seed=0, log=print):
    """Write the folder, time both loaders; returns rows (deletes the folder)."""
    need = weight_bytes(shape) * 1.1 + 2**30
    free = shutil.disk_usage(tmp_root).free
    if free < need:
        log(f"{shape}: skipped, needs ~{common.fmt_bytes(need)} of disk in {tmp_root}, "
            f"{common.fmt_bytes(free)} free")
        return []
    folder = Path(tempfile.mkdtemp(prefix=f"bench_load_{shape}_", dir=tmp_root))
    try:
        t0 = time.perf_counter()
        common.run_child([__file__, "--child", "build", "--shape", shape, "--path", str(folder),
                          "--seed", str(seed)])
        on_disk = sum(f.stat().st_size for f in folder.iterdir())
        log(f"{shape}: wrote {common.fmt_bytes(on_disk)} to {folder} in "
            f"{time.perf_counter() - t0:.0f} s")
        for f in folder.iterdir():             # into the page cache for both contenders
            with open(f, "rb") as fh:
                while fh.read(1 << 24):
                    pass

        def contender(kind):
            def run():
                res, peak, wall = common.run_child([__file__, "--child", kind, "--path",
                                                    str(folder)])
                return {**res, "peak": peak, "wall": wall}
            return run

        contenders = {"ours": contender("ours"), "HF": contender("HF")}
        if has_mmap_option():
            contenders["ours-copy"] = contender("ours-copy")
        runs = common.interleaved(contenders, rounds, label=shape)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    checks = {k: {(r["check"], round(r["total"], 3), r["n_params"], tuple(r["dtypes"]))
                  for r in v}
              for k, v in runs.items()}
    if len(set.union(*checks.values())) != 1:
        raise AssertionError(f"{shape}: the loaders disagree on the weights: {checks}")
    wbytes = 4 * runs["ours"][0]["n_params"]
    hf_s = common.median([r["seconds"] for r in runs["HF"]])
    hf_used = common.median([r["seconds"] + r["touch_s"] for r in runs["HF"]])
    rows = []
    for kind, rs in runs.items():
        secs = [r["seconds"] for r in rs]
        peak = max(r["peak"] for r in rs)
        before = common.median([r["rss_before"] for r in rs])
        used = [r["seconds"] + r["touch_s"] for r in rs]
        rows.append({"shape": shape, "contender": kind, "median_s": common.median(secs),
                     "min_s": min(secs), "max_s": max(secs), "used_s": common.median(used),
                     "process_s": common.median([r["wall"] for r in rs]),
                     "vs_hf_time": common.median(secs) / hf_s,
                     "vs_hf_used": common.median(used) / hf_used, "weight_bytes": wbytes,
                     "peak_rss": peak, "rss_before": before,
                     "peak_ratio": peak / wbytes, "load_ratio": (peak - before) / wbytes})
    return rows


def summarize(rows, quick):
    summary = common.Summary("load_speed")
    for shape in dict.fromkeys(r["shape"] for r in rows):
        by = {r["contender"]: r for r in rows if r["shape"] == shape}
        o = by["ours"]
        summary.target(f"{shape} load peak/weights", o["load_ratio"], RSS_TARGET,
                       higher_is_better=False, after=f" [whole process {o['peak_ratio']:.2f}x, "
                                                     f"HF {by['HF']['load_ratio']:.2f}x]")
        summary.target(f"{shape} time ours/HF", o["vs_hf_time"], TIME_TARGET,
                       higher_is_better=False,
                       after=f" [load+read every weight {o['vs_hf_used']:.2f}x]")
    return summary.line(note=" [--quick: tiny shape, targets are for 124M and 774M]" if quick
                        else "")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default=None,
                   help=f"comma list of {', '.join(common.SHAPES)} (default 124M,774M)")
    p.add_argument("--rounds", type=int, default=None, help="default 3 (2 with --quick)")
    p.add_argument("--tmp", default=None, help="folder for the model folders (default TMPDIR)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="tiny shape, 2 rounds")
    p.add_argument("--child", choices=("build", "ours", "ours-copy", "HF"),
                   help=argparse.SUPPRESS)
    p.add_argument("--path", help=argparse.SUPPRESS)
    p.add_argument("--shape", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child == "build":
        return child_build(args.shape, args.path, args.seed)
    if args.child:
        return child_load(args.child, args.path)
    sizes = (args.sizes or ("tiny" if args.quick else "124M,774M")).split(",")
    rounds = args.rounds or (2 if args.quick else 3)
    tmp_root = args.tmp or tempfile.gettempdir()

    print(f"load_speed: load a save_pretrained folder (fp32 safetensors); fresh process per "
          f"measurement, {rounds} alternating rounds, median time, max peak RSS")
    print(common.machine_line())
    rows = []
    for shape in sizes:
        rows += bench_shape(shape, rounds, tmp_root, args.seed)
    table_rows = [[r["shape"], r["contender"], f"{r['median_s']:.2f}",
                   f"{r['min_s']:.2f}-{r['max_s']:.2f}", f"{r['vs_hf_time']:.2f}x",
                   f"{r['used_s']:.2f}", f"{r['vs_hf_used']:.2f}x", f"{r['process_s']:.1f}",
                   common.fmt_bytes(r["weight_bytes"]),
                   common.fmt_bytes(r["rss_before"]), common.fmt_bytes(r["peak_rss"]),
                   f"{r['load_ratio']:.2f}x", f"{r['peak_ratio']:.2f}x"] for r in rows]
    print()
    print(common.table(["shape", "contender", "load s", "range s", "vs HF", "+read s",
                        "vs HF", "process s", "fp32 weights", "RSS before", "peak RSS",
                        "load peak/w", "peak RSS/w"], table_rows))
    print("(load s: the call alone; +read s: the call, then summing every weight once, so a "
          "loader that returns file-backed (mmap) tensors pays for reading them; load "
          "peak/w = (peak RSS - RSS before the call) / fp32 weight bytes, the read included; "
          "peak RSS/w counts the whole process, imports included)")
    print()
    print(summarize(rows, args.quick) if rows else "SUMMARY load_speed: nothing measured")
    return rows


if __name__ == "__main__":
    main()
