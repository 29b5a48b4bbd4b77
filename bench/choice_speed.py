"""Each fast path with the clock's choice on, off and forced: does it pick the faster here?

    python bench/choice_speed.py                  # the decisions, then batch-1 decoding (124M)
    python bench/choice_speed.py --only decisions # only the first part
    python bench/choice_speed.py --quick          # a smoke run: tiny shapes, few tokens
    python bench/choice_speed.py --as-avx2        # this machine seen as an AVX2 CPU

Part 1, the decisions. engine/tuning.py times each fast path that can lose somewhere against
the code it replaces, once per machine (see its docstring). Here every decision this machine
makes is made as a user's first run makes it (the fast paths' own functions, their flags left
to the clock, the timings from the user's cache folder or measured now), and then each
decision's candidates are timed again, with ``--repeats`` interleaved repeats (more than the
engine's 5), by the same candidates the engine timed. "agrees": the engine's pick is the
fastest here, or within the 3% margin the engine asks of a fast path. One-call decoding is
timed on the 124M model itself in fp32, bf16 and int8, inside ``decoder.decoding`` as
generate.py runs it.

Part 2, batch-1 decoding of GPT-2 124M: random weights saved once (``save_pretrained``),
loaded by ``load_gpt2_hf``, bf16 by ``.to``, int8 by ``quantize_``; a 16-token prompt, then
``--new-tokens`` tokens greedily, the decode phase timed (as bench/peers_speed.py, whose child
runs it); every measurement a fresh process, the variants alternating in order round to round:

    plain      GPT2_FAST_PATHS=off: every choice the clock would make takes the plain code
    measured   GPT2_FAST_PATHS=measure (the default): the clock's choices
    forced     GPT2_FAST_PATHS=on: every fast path that can run here
    before     the vendor table of the flags before the clock chose them (AMD: every path on;
               Intel: oneDNN fp32, padded logits, one-row fp32 copies, our own decoding and
               int8 kernels, one-call decoding and gemm_q8 off; other CPUs: the kernels
               measured only on AMD off; weights in 4 KiB pages, int8 prompts of fp32
               rows on dequantized weights and PyTorch's greedy argmax everywhere)

``--as-avx2`` runs all of it as on an x86 CPU without AVX-512 (Zen 2 and 3, Intel's desktop
and laptop CPUs): the script starts again with bench/common.AVX2_ENV set, which limits
PyTorch's kernels, oneDNN's (no bf16 products then) and ours to AVX2, for itself and its
children; the clock keeps those timings apart. Its variants default to plain, measured and
forced ("before" is the old vendor table, whose kernels needed AVX-512), and its summary
compares measured with plain.

The machine's load (1-minute average) and read bandwidth are taken at the start of every
round. On a busy machine (load above the CPU count) the engine keeps its timings for the
process only, so each "measured" process times its choices again (outside the timed decode).
"""

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402, I001  (puts the repository root on sys.path)
import generate_speed  # noqa: E402
import peers_speed  # noqa: E402

VARIANTS = {"plain": {"GPT2_FAST_PATHS": "off"}, "measured": {"GPT2_FAST_PATHS": "measure"},
            "forced": {"GPT2_FAST_PATHS": "on"}, "before": {"GPT2_FAST_PATHS": "on"}}
DTYPES = ("fp32", "bf16", "int8")
# measured / before must reach this: the choice is not slower than the vendor table, within
# the margin the choice itself asks of a fast path
NOT_SLOWER = 1 / 1.03


def vendor_table(vendor):
    """{(module, flag): value} as the flags were set by CPU vendor before the clock chose
    (training attention, the loss's rows, the head's weight gradient in blocks, GELU and
    greedy's argmax, newer than that table, were PyTorch's code everywhere)."""
    amd, intel = vendor == "AuthenticAMD", vendor == "GenuineIntel"
    return {("cpu_kernels", "ONEDNN_FP32"): not intel,
            ("cpu_kernels", "ALIGNED_LOGITS"): not intel, ("cpu_kernels", "PACKING"): True,
            ("cpu_kernels", "PACK_FP32_BATCH_1"): not intel,
            ("cpu_kernels", "SCREENED_HEAD"): True, ("cpu_kernels", "OWN_GEMV"): amd,
            ("decoder", "ONE_CALL"): amd, ("int8", "OWN_KERNEL"): amd,
            ("int8", "DYNAMIC_Q8"): amd, ("pages", "HUGE_PAGES"): False,
            ("int8", "BF16_ROWS"): False, ("attention", "BLOCKED"): False,
            ("fused_loss", "C_ROWS"): False, ("fused_loss", "SPLIT"): False,
            ("gelu", "C_PASS"): False, ("cpu_kernels", "OWN_ARGMAX"): False}


# ---------------------------------------------------------------------------------------
# Part 1: the decisions

ATTENTION_SHAPE = (1, 12, 1024, 64)     # training attention's q: 124M, context 1024, batch 1


def meet_every_decision():
    """Call every fast path's choice with its flags left to the clock; returns {decision:
    label} as picked (from the cache folder's timings, or measured now)."""
    import torch

    from engine import attention, cpu_kernels, fused_loss, gelu, int8, pages, tuning
    pages.chosen()
    for dtype in (torch.float32, torch.bfloat16):
        cpu_kernels.onednn_fp32()
        cpu_kernels.aligned_logits(dtype)
        for rows in (1, 8):
            cpu_kernels.copy_kind(dtype, rows)
    for rows in (1, 8):
        cpu_kernels.screened_head(rows)
    cpu_kernels.own_argmax()
    int8.own_kernel_on()
    int8.bf16_rows_on()
    for rows in (1, 8):
        int8.dynamic_q8_on(rows)
    if attention.kernel() is not None:
        for dtype in (torch.float32, torch.bfloat16):
            for p in (0.0, 0.1):            # without dropout, and GPT-2's
                attention.blocked_wins(ATTENTION_SHAPE, dtype, p)
    if fused_loss.kernel() is not None:
        for dtype in (torch.float32, torch.bfloat16):
            fused_loss.c_rows(dtype, torch.device("cpu"))
    fused_loss.split_products(torch.empty(0, dtype=torch.bfloat16))
    if gelu.kernel() is not None:
        for dtype in (torch.float32, torch.bfloat16):
            gelu.c_pass(torch.empty(0, dtype=dtype))
    return tuning.picked()


def retime(name, repeats):
    """{label: median seconds} of decision ``name``'s candidates, timed again here."""
    from engine import tuning
    setup, keep_autocast = tuning.SEEN[name]
    return tuning.measure_setup(setup, keep_autocast, repeats)


def decision_row(name, picked, times):
    from engine import tuning
    labels = list(times)
    fastest = min(labels, key=times.get)
    base = labels[0]
    agrees = picked in times and times[picked] <= times[fastest] * tuning.MARGIN
    return {"decision": name, "picked": picked, "fastest": fastest, "agrees": agrees,
            "times": times, "pick_vs_plain": times[base] / times[picked] if picked in times
            else float("nan")}


def decoding_decisions(shape, repeats, log=print):
    """Rows for one-call decoding on the ``shape`` model in fp32, bf16 and int8."""
    import copy

    import torch

    from engine import decoder, int8, tuning
    ours, _ = common.build_pair(shape)
    models = {"fp32": ours, "bf16": copy.deepcopy(ours).to(torch.bfloat16),
              "int8": int8.quantize_(copy.deepcopy(ours))}
    rows = []
    for kind, model in models.items():
        with torch.inference_mode(), decoder.decoding(model, 1, greedy=True):
            names = [n for n in tuning.SEEN if n.startswith(f"batch-1 decoding ({kind},")]
            if not names:
                log(f"batch-1 decoding ({kind}): one-call steps cannot run here")
                continue
            picked = tuning.picked().get(names[0])
            if picked is None:          # a flag decided: not a choice of the clock
                continue
            rows.append(decision_row(names[0], picked, retime(names[0], repeats)))
    return rows


def bench_decisions(repeats=15, shape="124M", log=print):
    picked = meet_every_decision()
    rows = [decision_row(name, label, retime(name, repeats)) for name, label in picked.items()]
    return rows + decoding_decisions(shape, repeats, log)


def print_decisions(rows):
    table = []
    for r in rows:
        base = next(iter(r["times"]))
        times = ", ".join(f"{label} {t * 1e3:.2f}" for label, t in r["times"].items())
        table.append([r["decision"], r["picked"], f"{r['pick_vs_plain']:.2f}x {base}",
                      r["fastest"], "yes" if r["agrees"] else "NO", times])
    print(common.table(["decision", "picked (engine)", "pick vs baseline", "fastest here",
                        "agrees", "medians here, ms"], table,
                       ["<", "<", ">", "<", "<", "<"]))


# ---------------------------------------------------------------------------------------
# Part 2: batch-1 decoding, each variant in its own process

def child(workdir, dtype, variant, threads, prompt_len, new_tokens, repeats, seed):
    from engine import cpu_kernels, decoder, devices, int8, pages, tuning
    if variant == "before":
        modules = {"cpu_kernels": cpu_kernels, "decoder": decoder, "int8": int8, "pages": pages}
        for (module, flag), value in vendor_table(devices.cpu_info("vendor_id")).items():
            setattr(modules[module], flag, value)
    peers_speed.child_ours(workdir, dtype, threads, prompt_len, new_tokens, repeats, seed,
                           extra=lambda: {"picked": tuning.picked()})


def build(workdir, shape, seed):
    import torch
    from transformers import GPT2LMHeadModel
    common.quiet_transformers()
    torch.manual_seed(seed)
    GPT2LMHeadModel(common.hf_config(shape)).save_pretrained(Path(workdir) / "hf")


def bench_decoding(workdir, dtypes=DTYPES, variants=tuple(VARIANTS), rounds=3, repeats=2,
                   threads=None, prompt_len=16, new_tokens=128, seed=0, log=print):
    """{(dtype, variant): {"tok_s", "min", "max", "picked"}}, and the rounds' (load, GB/s)."""
    threads = threads or os.cpu_count()

    def run(key):
        dtype, variant = key
        return common.run_child(
            [__file__, "--child", "--workdir", workdir, "--dtype", dtype, "--variant", variant,
             "--threads", str(threads), "--prompt-len", str(prompt_len), "--new-tokens",
             str(new_tokens), "--repeats", str(repeats), "--seed", str(seed)],
            env=VARIANTS[variant])[0]

    runs, conditions = peers_speed.alternating_rounds(
        [(d, v) for d in dtypes for v in variants], run, rounds, threads, log)
    results = {key: {**peers_speed.tok_s_stats(rs), "picked": rs[-1].get("picked", {})}
               for key, rs in runs.items()}
    return results, conditions


def print_decoding(results, dtypes, variants):
    rows = []
    for dtype in dtypes:
        row = [dtype]
        for v in variants:
            r = results[dtype, v]
            row.append(f"{r['tok_s']:.1f} ({r['min']:.1f}-{r['max']:.1f})")
        for a, b in (("measured", "before"), ("measured", "forced"), ("measured", "plain")):
            if a in variants and b in variants:
                row.append(f"{results[dtype, a]['tok_s'] / results[dtype, b]['tok_s']:.2f}x")
        rows.append(row)
    ratios = [f"{a}/{b}" for a, b in (("measured", "before"), ("measured", "forced"),
                                      ("measured", "plain")) if a in variants and b in variants]
    print(common.table(["dtype", *(f"{v} tok/s" for v in variants), *ratios], rows))
    for dtype in dtypes:
        picked = results.get((dtype, "measured"), {}).get("picked") or {}
        if picked:
            print(f"{dtype}, measured, the clock's choices: "
                  + "; ".join(f"{n}: {label}" for n, label in picked.items()))


def summarize(decisions, results, dtypes, quick):
    summary = common.Summary("choice_speed")
    if decisions:
        agree = sum(r["agrees"] for r in decisions)
        summary.met(f"decisions picking the faster {agree}/{len(decisions)}",
                    agree == len(decisions))
    for dtype in dtypes:
        # against the old vendor table where it was run, else against the plain code
        base = next((v for v in ("before", "plain") if (dtype, v) in results), None)
        if (dtype, "measured") in results and base:
            tok_s = results[dtype, "measured"]["tok_s"]
            summary.target(f"b1 {dtype} {tok_s:.1f} tok/s = measured/{base}",
                           tok_s / results[dtype, base]["tok_s"], NOT_SLOWER)
    return summary.line(note=" [--quick: tiny shape, few repeats]" if quick else "")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", choices=["decisions", "decoding"], default=None,
                   help="one part only (default: both)")
    p.add_argument("--dtypes", default=",".join(DTYPES), help="part 2: comma list of "
                   "fp32,bf16,int8")
    p.add_argument("--variants", default=None,
                   help="part 2: comma list of " + ",".join(VARIANTS) + " (default: all; "
                        "plain,measured,forced with --as-avx2)")
    p.add_argument("--repeats", type=int, default=None,
                   help="part 1: interleaved repeats a decision (default 15, 3 with --quick); "
                        "part 2: timed decodes a process (default 2)")
    p.add_argument("--rounds", type=int, default=None, help="part 2 (default 3, 1 with --quick)")
    p.add_argument("--threads", type=int, default=None, help="default: every CPU")
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=None, help="default 128 (16 with --quick)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default=None, help="part 2's model folder (default: a temp "
                   "folder, deleted)")
    p.add_argument("--quick", action="store_true", help="tiny shapes, 1 round, 16 tokens")
    p.add_argument("--as-avx2", action="store_true", help="this machine seen as an x86 CPU "
                   "without AVX-512 (see the module)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--dtype", help=argparse.SUPPRESS)
    p.add_argument("--variant", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.as_avx2 and not args.child:
        common.restart_as_avx2(__file__, sys.argv[1:] if argv is None else argv)
    threads = args.threads or os.cpu_count()
    new_tokens = args.new_tokens or (16 if args.quick else 128)
    if args.child:
        return child(args.workdir, args.dtype, args.variant, threads, args.prompt_len,
                     new_tokens, args.repeats or 2, args.seed)
    dtypes = [d for d in args.dtypes.split(",") if d]
    variants = [v for v in (args.variants or ("plain,measured,forced" if args.as_avx2
                                              else ",".join(VARIANTS))).split(",") if v]
    if bad := [d for d in dtypes if d not in DTYPES] + [v for v in variants if v not in VARIANTS]:
        p.error(f"unknown --dtypes/--variants entry {bad[0]!r}: choose from "
                f"{','.join(DTYPES)} and {','.join(VARIANTS)}")
    shape = "tiny" if args.quick else "124M"
    rounds = args.rounds or (1 if args.quick else 3)
    import torch

    from engine import tuning
    torch.set_num_threads(threads)
    if args.quick:              # the decisions on small shapes: a smoke run of the code
        tuning.BLOCK_124M = ((128, 384), (128, 128), (128, 512), (512, 128))
        tuning.HEAD_124M = (4096, 128)
        tuning.WORKING_SET = 1
        global ATTENTION_SHAPE
        ATTENTION_SHAPE = (1, 4, 64, 16)
    print(f"choice_speed: the clock's choices on this machine; GPT-2 {shape}, {threads} "
          f"threads")
    print(common.machine_line())
    print(generate_speed.cpu_line())
    print(common.vectors_line())
    print(f"engine timings kept in {tuning.choices_path()}; "
          f"GPT2_FAST_PATHS={tuning.MODE}" + (f"; busy: {tuning.busy()}" if tuning.busy()
                                              else ""))
    decisions, results = [], {}
    if args.only != "decoding":
        if tuning.MODE != "measure":
            p.error(f"part 1 shows the clock's choices: unset GPT2_FAST_PATHS (now "
                    f"{tuning.MODE})")
        decisions = bench_decisions(args.repeats or (3 if args.quick else 15), shape)
        print()
        print_decisions(decisions)
        print("(the engine's pick, from its timings; then every candidate timed again here, "
              "median of interleaved repeats; agrees: the pick is the fastest here or within "
              f"{tuning.MARGIN:.2f}x of it)")
    if args.only != "decisions":
        workdir = args.workdir or tempfile.mkdtemp(prefix="choice_speed_")
        try:
            if not (Path(workdir) / "hf").exists():
                build(workdir, shape, args.seed)
            results, conditions = bench_decoding(
                workdir, dtypes, variants, rounds, args.repeats or 2, threads,
                args.prompt_len, new_tokens, args.seed)
        finally:
            if not args.workdir:
                shutil.rmtree(workdir, ignore_errors=True)
        print()
        print(f"batch-1 decoding, GPT-2 {shape}, {args.prompt_len}-token prompt + "
              f"{new_tokens} tokens, decode phase, {rounds} rounds x {args.repeats or 2} "
              f"decodes, a process each; load at the rounds' starts "
              + ", ".join(f"{load:.2f}" for load, _ in conditions) + "; read bandwidth "
              + ", ".join(f"{gb:.1f}" for _, gb in conditions) + " GB/s")
        print_decoding(results, dtypes, variants)
    print()
    print(summarize(decisions, results, dtypes, args.quick))
    return decisions, results


if __name__ == "__main__":
    main()
