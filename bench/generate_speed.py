"""Greedy generation speed: ours in fp32, bf16 and int8 against the memory-bandwidth ceiling,
and against transformers' GPT2LMHeadModel.generate.

    python bench/generate_speed.py                   # 124M shape, fp32 + bf16 + int8, batch 1, 8
    python bench/generate_speed.py --dtypes fp32     # fp32 only (ours, plain, HF)
    python bench/generate_speed.py --quick           # tiny shape, few tokens: a smoke run
    python bench/generate_speed.py --as-avx2 --prompt-len 256 --dtypes bf16
                                                     # seen as an AVX2 CPU: bf16 prompts

All models hold the same random weights (HF init, dropout 0, loaded into ours with
download_weights_hf.load_weights_into_gpt); bf16 is that model ``.to(torch.bfloat16)`` (what
the loaders' ``dtype="bf16"`` does) and under ``torch.autocast``; int8 is that model through
``engine.int8.quantize_`` (what ``dtype="int8"`` does). Each measurement generates exactly
``--new-tokens`` tokens after a ``--prompt-len`` prompt with the KV cache, under
torch.inference_mode; contenders run interleaved in this process, the median of ``--rounds``
is reported. fp32 greedy tokens must be identical to HF's, or the script fails.

Decoding one token reads every weight once (the embedding tables aside: one row each), so
its speed is bounded by the memory's read bandwidth: the ceiling is ``batch x bandwidth /
bytes of the weights read per step``, with the bandwidth measured here, in the same run (the
best sum over a 512 MiB tensor, with the threads the models use; the median of measurements
before the runs and after each batch size), and the bytes from the weights' sizes in each
dtype. "decode tokens/s" counts from the first new token to the last
(the prompt's forward pass left out), as the ceiling assumes; "tokens/s" is the whole call,
"first token s" the time to the first new token (the prompt's forward pass). ``--as-avx2``:
the script starts again as on an x86 CPU without AVX-512 (bench/common.AVX2_ENV), where
oneDNN has no bf16 products.
"""

import argparse
import contextlib
import copy
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (puts the repository root on sys.path)

# share of the bandwidth ceiling at batch 1 (issue 27), per dtype
CEILING_TARGETS = {"fp32": 0.75, "bf16": 0.70, "int8": 0.50}
DTYPE_NAMES = ("fp32", "bf16", "int8")


def make_prompt(batch, prompt_len, vocab, seed):
    import torch
    g = torch.Generator().manual_seed(seed + batch)
    return torch.randint(0, vocab, (batch, prompt_len), generator=g)


def read_bandwidth(mib=512, reps=5):
    """GB/s (1e9 bytes) of the best of ``reps`` sums over a ``mib`` MiB fp32 tensor: how fast
    this machine reads memory with torch's threads (the tensor is far larger than any cache)."""
    import torch
    big = torch.ones(mib * 2**20 // 4)
    big.sum()                                                   # fault the pages in
    best = min(common.timed(big.sum)[0] for _ in range(reps))
    return big.numel() * 4 / best / 1e9


def bytes_per_step(model):
    """Bytes of the weights one decoding step reads: every parameter and buffer of ``model``
    once, except the embedding tables (a step reads one row of each), unless a table is
    also the output head (GPT-2's tied weights: then the head reads all of it)."""
    head = getattr(model.out_head, "weight", None)
    skip = {id(model.tok_emb.weight), id(model.pos_emb.weight)} - {id(head)}
    seen, total = set(skip), 0
    for t in (*model.parameters(), *model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def run_ours(model, idx, new_tokens, autocast=False, plain=False):
    """(seconds of the call, seconds from the first new token to the last, ids (B, T + new)).

    ``plain``: with every fast path off (cpu_kernels.disabled, int8.disabled), the plain
    PyTorch code.
    """
    import torch

    from engine import cpu_kernels, int8
    from generate import generate_tokens
    ctx = (torch.autocast("cpu", dtype=torch.bfloat16) if autocast
           else contextlib.nullcontext())
    with torch.inference_mode(), ctx, contextlib.ExitStack() as off:
        if plain:
            off.enter_context(cpu_kernels.disabled())
            off.enter_context(int8.disabled())
        t0 = time.perf_counter()
        steps = []
        for next_id in generate_tokens(model, idx, new_tokens, eos_id=None):  # (B, 1)
            if not steps:
                t1 = time.perf_counter()
            steps.append(next_id)
        t2 = time.perf_counter()
    return t2 - t0, t2 - t1, torch.cat([idx, *steps], dim=1)


class _Clock:
    """A transformers streamer that notes when the first and the last new tokens arrive."""

    def __init__(self):
        self.puts, self.first, self.last = 0, None, None

    def put(self, value):
        self.puts += 1
        if self.puts == 2:            # the first put is the prompt
            self.first = time.perf_counter()
        self.last = time.perf_counter()

    def end(self):
        pass


def run_hf(hf, idx, new_tokens):
    """(seconds of the call, seconds first to last new token, ids) for GPT2LMHeadModel.generate."""
    import torch
    clock = _Clock()
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = hf.generate(idx, attention_mask=torch.ones_like(idx), do_sample=False,
                          num_beams=1, use_cache=True, max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, pad_token_id=common.GPT2_EOS,
                          streamer=clock)
        t2 = time.perf_counter()
    return t2 - t0, clock.last - clock.first, out


def dtype_of(name):
    """"ours bf16 (.to) plain" -> "bf16"; HF's contenders -> "fp32"."""
    return next((d for d in DTYPE_NAMES if f" {d}" in name), "fp32")


def bench_generation(shape="124M", batches=(1, 8), prompt_len=16, new_tokens=128, rounds=5,
                     bf16=True, int8=True, hf_bf16=False, seed=0, log=print):
    """Measure every contender at every batch size; return (results, bandwidth GB/s).

    Raises AssertionError if our fp32 greedy tokens differ from HF's.
    """
    import torch

    from engine.int8 import quantize_
    # measured before and after the runs (this VM's varied by up to 2x from minute to
    # minute); the ceilings use the median of the measurements
    bandwidths = [read_bandwidth()]
    log(f"memory read bandwidth: {bandwidths[0]:.1f} GB/s (sum over 512 MiB, "
        f"{torch.get_num_threads()} threads)")
    ours, hf = common.build_pair(shape, seed)
    # "plain": the same model with the fast paths off, to see what they are worth here
    models = {"ours fp32": ours, "HF fp32": hf, "ours fp32 plain": ours}
    if bf16:
        models["ours bf16 (.to)"] = copy.deepcopy(ours).to(torch.bfloat16)
        # its own copy: a weight keeps one packed copy (fp32 here, bf16 under autocast),
        # so sharing ``ours`` would repack at every switch between the two contenders
        models["ours bf16 (autocast)"] = copy.deepcopy(ours)
        models["ours bf16 (.to) plain"] = models["ours bf16 (.to)"]
    if int8:
        models["ours int8"] = quantize_(copy.deepcopy(ours))
        models["ours int8 plain"] = models["ours int8"]
    if hf_bf16:
        models["HF bf16 (.to)"] = copy.deepcopy(hf).to(torch.bfloat16)
    step_bytes = {"fp32": bytes_per_step(ours)}
    if bf16:
        step_bytes["bf16"] = bytes_per_step(models["ours bf16 (.to)"])
    if int8:
        step_bytes["int8"] = bytes_per_step(models["ours int8"])
    for d, b in step_bytes.items():
        log(f"{d}: {b / 1e6:.1f} MB of weights read per decoding step")

    def contender(name, idx, n):
        model = models[name]
        if name.startswith("HF"):
            return lambda: run_hf(model, idx, n)
        return lambda: run_ours(model, idx, n, autocast="autocast" in name,
                                plain="plain" in name)

    results, measured = [], []
    for batch in batches:
        idx = make_prompt(batch, prompt_len, common.GPT2_VOCAB, seed)
        # Warm up every path once (thread pools, first-call allocations) on a short run.
        for name in models:
            contender(name, idx, min(8, new_tokens))()
        runs = common.interleaved({name: contender(name, idx, new_tokens) for name in models},
                                  rounds, label=f"batch {batch}")
        outputs = {name: r[-1][2] for name, r in runs.items()}
        for name, out in outputs.items():
            assert out.shape == (batch, prompt_len + new_tokens), (name, tuple(out.shape))
        same = torch.equal(outputs["ours fp32"], outputs["HF fp32"])
        n_diff = int((outputs["ours fp32"] != outputs["HF fp32"]).sum())
        log(f"batch {batch}: greedy tokens ours fp32 == HF fp32: {same}"
            + ("" if same else f" ({n_diff} of {outputs['HF fp32'].numel()} differ)"))
        if not same:
            raise AssertionError(
                f"batch {batch}: our greedy tokens differ from transformers' ({n_diff} "
                f"positions): the two models do not compute the same function")
        bandwidths.append(read_bandwidth())
        log(f"memory read bandwidth after batch {batch}: {bandwidths[-1]:.1f} GB/s")
        measured.append((batch, runs, outputs))
    bandwidth = common.median(bandwidths)
    for batch, runs, outputs in measured:
        hf_s = common.median([t for t, _, _ in runs["HF fp32"]])
        for name, r in runs.items():
            times = [t for t, _, _ in r]
            med = common.median(times)
            decode = common.median([d for _, d, _ in r])
            decode_tps = batch * (new_tokens - 1) / decode if decode > 0 else float("nan")
            dtype = dtype_of(name)
            ceiling = batch * bandwidth * 1e9 / step_bytes[dtype]
            agree = float((outputs[name] == outputs["HF fp32"]).float().mean())
            first = common.median([t - d for t, d, _ in r])
            results.append({"batch": batch, "contender": name, "dtype": dtype,
                            "median_s": med, "first_token_s": first,
                            "min_s": min(times), "max_s": max(times),
                            "tok_per_s": batch * new_tokens / med, "decode_tok_per_s": decode_tps,
                            "ceiling_tok_per_s": ceiling, "ceiling_share": decode_tps / ceiling,
                            "vs_hf_fp32": hf_s / med, "token_agreement": agree})
    return results, bandwidth


def summarize(results, quick):
    summary = common.Summary("generate_speed")
    for batch in sorted({r["batch"] for r in results}):
        rows = {r["contender"]: r for r in results if r["batch"] == batch}
        summary.say(f"b{batch} ours/HF fp32 {rows['ours fp32']['vs_hf_fp32']:.2f}x")
        for dtype in DTYPE_NAMES:
            mine = [r for n, r in rows.items()
                    if n.startswith(f"ours {dtype}") and "plain" not in n]
            if not mine:
                continue
            best = max(mine, key=lambda r: r["decode_tok_per_s"])
            label = f"b{batch} {dtype} {best['decode_tok_per_s']:.1f} tok/s ="
            if batch == 1:
                summary.target(f"{label} ceiling share", best["ceiling_share"],
                               CEILING_TARGETS[dtype], fmt="{:.0%}")
            else:
                summary.say(f"{label} {best['ceiling_share']:.0%} of ceiling")
            # the fast paths must not lose to the plain code they replace
            plain = next(r for n, r in rows.items() if n.startswith(f"ours {dtype}")
                         and n.endswith("plain"))
            summary.target(f"b{batch} {dtype} fast/plain",
                           best["tok_per_s"] / plain["tok_per_s"], 1.0)
    return summary.line("greedy tokens identical: yes; ",
                        " [--quick: tiny shape, targets are for 124M]" if quick else "")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default=None, choices=list(common.SHAPES),
                   help="model shape (default 124M; tiny with --quick)")
    p.add_argument("--batch-sizes", default=None, help="comma list (default 1,8)")
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=None, help="default 128 (16 with --quick)")
    p.add_argument("--dtypes", default="fp32,bf16,int8",
                   help="ours in which precisions, comma list of fp32,bf16,int8 (fp32 always "
                        "runs: it is checked against HF)")
    p.add_argument("--hf-bf16", action="store_true",
                   help="also time HF converted to bfloat16 (for information)")
    p.add_argument("--as-avx2", action="store_true", help="this machine seen as an x86 CPU "
                   "without AVX-512 (bench/common.AVX2_ENV)")
    common.add_run_flags(p, "tiny shape, 16 tokens, 2 rounds", tune_malloc=False)
    args = p.parse_args(argv)
    if args.as_avx2:
        common.restart_as_avx2(__file__, sys.argv[1:] if argv is None else argv)
    shape = args.shape or ("tiny" if args.quick else "124M")
    new_tokens = args.new_tokens or (16 if args.quick else 128)
    rounds = args.rounds or (2 if args.quick else 5)
    batches = tuple(int(b) for b in (args.batch_sizes or "1,8").split(","))
    dtypes = set(args.dtypes.split(","))
    if not dtypes <= set(DTYPE_NAMES):
        p.error(f"--dtypes takes a comma list of {','.join(DTYPE_NAMES)}, got {args.dtypes!r}")

    common.set_threads(args.threads)
    malloc = common.setup_malloc(args.tune_malloc)
    common.quiet_transformers()
    print(f"generate_speed: GPT-2 {shape} shape, greedy, prompt {args.prompt_len} + "
          f"{new_tokens} new tokens, KV cache, {rounds} interleaved rounds, median")
    print(common.machine_line())
    print(cpu_line())
    print(common.vectors_line())
    print(malloc)
    results, _ = bench_generation(shape, batches, args.prompt_len, new_tokens, rounds,
                                  bf16="bf16" in dtypes, int8="int8" in dtypes,
                                  hf_bf16=args.hf_bf16, seed=args.seed)
    rows = [[r["batch"], r["contender"], f"{r['median_s']:.3f}",
             f"{r['min_s']:.3f}-{r['max_s']:.3f}", f"{r['first_token_s']:.3f}",
             f"{r['tok_per_s']:.1f}",
             f"{r['decode_tok_per_s']:.1f}", f"{r['ceiling_tok_per_s']:.1f}",
             f"{r['ceiling_share']:.0%}", f"{r['vs_hf_fp32']:.2f}x",
             f"{r['token_agreement']:.3f}"] for r in results]
    print()
    print(common.table(["batch", "contender", "median s", "range s", "first token s",
                        "tokens/s", "decode tok/s", "ceiling", "share", "vs HF fp32",
                        "tokens = HF"], rows,
                       [">", "<", ">", ">", ">", ">", ">", ">", ">", ">", ">"]))
    print("(tokens/s = batch * new tokens / wall time of the whole call, prompt included "
          "(first token s: the time to the first new token); "
          "decode tok/s = batch * (new - 1) / time from the first new token to the last; "
          "ceiling = batch * read bandwidth / weight bytes read per step, in the contender's "
          "dtype; share = decode tok/s / ceiling; 'vs HF fp32' compares whole calls; "
          "'tokens = HF': share of ids equal to HF fp32's)")
    print()
    print(summarize(results, args.quick))
    return results


def cpu_line():
    """The CPU's name, family/model and the vector extensions that matter here (Linux)."""
    info = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break                          # the first processor's block is enough
                key, _, value = line.partition(":")
                info[key.strip()] = value.strip()
    except OSError:
        return "CPU: unknown (no /proc/cpuinfo)"
    flags = set(info.get("flags", "").split())
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8")
           if f in flags]
    return (f"CPU: {info.get('model name', '?')} ({info.get('vendor_id', '?')} family "
            f"{info.get('cpu family', '?')} model {info.get('model', '?')}), "
            f"{' '.join(isa) or 'no AVX2'}")


if __name__ == "__main__":
    main()
