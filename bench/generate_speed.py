"""Greedy generation speed: generate.generate_text vs transformers' GPT2LMHeadModel.generate.

    python bench/generate_speed.py                 # 124M shape, fp32, batch 1 and 8
    python bench/generate_speed.py --dtype bf16    # also ours in bfloat16, vs HF fp32
    python bench/generate_speed.py --quick         # tiny shape, few tokens: a smoke run

Both models hold the same random weights (HF init, dropout 0, loaded into ours with
download_weights_hf.load_weights_into_gpt). Each measurement generates exactly
``--new-tokens`` tokens after a ``--prompt-len`` prompt with the KV cache, under
torch.inference_mode; contenders run interleaved in this process, the median of
``--rounds`` is reported. fp32 greedy tokens must be identical, or the script fails.
"""

import argparse
import contextlib
import copy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (puts the repository root on sys.path)

TARGETS = {1: 1.8, 8: 1.5}     # ours / HF fp32 tokens/s, per batch size
BF16_TARGET = 3.0              # best ours-bf16 / HF fp32


def make_prompt(batch, prompt_len, vocab, seed):
    import torch
    g = torch.Generator().manual_seed(seed + batch)
    return torch.randint(0, vocab, (batch, prompt_len), generator=g)


def run_ours(model, idx, new_tokens, autocast=False, plain=False):
    """(seconds, token ids (B, T + new)) for one generate_text call.

    ``plain``: with every CPU fast path off (cpu_kernels.disabled), the plain PyTorch code.
    """
    import torch

    from engine import cpu_kernels
    from generate import generate_text
    ctx = (torch.autocast("cpu", dtype=torch.bfloat16) if autocast
           else contextlib.nullcontext())
    off = cpu_kernels.disabled() if plain else contextlib.nullcontext()
    with torch.inference_mode(), ctx, off:
        return common.timed(generate_text, model, idx, new_tokens, eos_id=None)


def run_hf(hf, idx, new_tokens):
    """(seconds, token ids (B, T + new)) for one GPT2LMHeadModel.generate call."""
    import torch
    with torch.inference_mode():
        return common.timed(
            hf.generate, idx, attention_mask=torch.ones_like(idx), do_sample=False,
            num_beams=1, use_cache=True, max_new_tokens=new_tokens,
            min_new_tokens=new_tokens, pad_token_id=common.GPT2_EOS)


def bench_generation(shape="124M", batches=(1, 8), prompt_len=16, new_tokens=128, rounds=5,
                     bf16=False, hf_bf16=False, seed=0, log=print):
    """Measure every contender at every batch size; return a list of result dicts.

    Raises AssertionError if our fp32 greedy tokens differ from HF's.
    """
    import torch
    ours, hf = common.build_pair(shape, seed)
    # "plain": the same model with the CPU fast paths off, to see what they are worth here
    models = {"ours fp32": ours, "HF fp32": hf, "ours fp32 plain": ours}
    if bf16:
        models["ours bf16 (.to)"] = copy.deepcopy(ours).to(torch.bfloat16)
        # its own copy: a weight keeps one packed copy (fp32 here, bf16 under autocast),
        # so sharing ``ours`` would repack at every switch between the two contenders
        models["ours bf16 (autocast)"] = copy.deepcopy(ours)
        models["ours bf16 (.to) plain"] = models["ours bf16 (.to)"]
    if hf_bf16:
        models["HF bf16 (.to)"] = copy.deepcopy(hf).to(torch.bfloat16)

    def contender(name, idx, n):
        model = models[name]
        if name.startswith("HF"):
            return lambda: run_hf(model, idx, n)
        return lambda: run_ours(model, idx, n, autocast="autocast" in name,
                                plain="plain" in name)

    results = []
    for batch in batches:
        idx = make_prompt(batch, prompt_len, common.GPT2_VOCAB, seed)
        # Warm up every path once (thread pools, first-call allocations) on a short run.
        for name in models:
            contender(name, idx, min(8, new_tokens))()
        runs = common.interleaved({name: contender(name, idx, new_tokens) for name in models},
                                  rounds, label=f"batch {batch}")
        outputs = {name: r[-1][1] for name, r in runs.items()}
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
        hf_s = common.median([t for t, _ in runs["HF fp32"]])
        for name, r in runs.items():
            times = [t for t, _ in r]
            med = common.median(times)
            agree = float((outputs[name] == outputs["HF fp32"]).float().mean())
            results.append({"batch": batch, "contender": name, "median_s": med,
                            "min_s": min(times), "max_s": max(times),
                            "tok_per_s": batch * new_tokens / med,
                            "vs_hf_fp32": hf_s / med, "token_agreement": agree})
    return results


def summarize(results, bf16, quick):
    parts, oks = [], []
    for batch in sorted({r["batch"] for r in results}):
        rows = {r["contender"]: r for r in results if r["batch"] == batch}
        goal = TARGETS.get(batch)
        if goal:
            text, ok = common.target(f"b{batch} ours/HF", rows["ours fp32"]["vs_hf_fp32"], goal)
        else:
            text, ok = f"b{batch} ours/HF {rows['ours fp32']['vs_hf_fp32']:.2f}x", True
        parts.append(text)
        oks.append(ok)
        # the fast paths must not lose to the plain code they replace
        text, ok = common.target(f"b{batch} fast/plain", rows["ours fp32"]["tok_per_s"]
                                 / rows["ours fp32 plain"]["tok_per_s"], 1.0)
        parts.append(text)
        oks.append(ok)
        if bf16:
            best = max((r for n, r in rows.items() if n.startswith("ours bf16")),
                       key=lambda r: r["vs_hf_fp32"])
            text, ok = common.target(f"b{batch} ours-bf16/HF-fp32", best["vs_hf_fp32"],
                                     BF16_TARGET)
            parts.append(text + f" [{best['contender'].split('(')[1].rstrip(')')}]")
            oks.append(ok)
    note = " [--quick: tiny shape, targets are for 124M]" if quick else ""
    return (f"SUMMARY generate_speed: {'; '.join(parts)}; greedy tokens identical: yes; "
            f"{sum(oks)}/{len(oks)} targets met{note}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default=None, choices=list(common.SHAPES),
                   help="model shape (default 124M; tiny with --quick)")
    p.add_argument("--batch-sizes", default=None, help="comma list (default 1,8)")
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=None, help="default 128 (16 with --quick)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                   help="bf16: also run ours in bfloat16 (.to and autocast), vs HF fp32")
    p.add_argument("--hf-bf16", action="store_true",
                   help="also time HF converted to bfloat16 (for information)")
    common.add_run_flags(p, "tiny shape, 16 tokens, 2 rounds", tune_malloc=False)
    args = p.parse_args(argv)
    shape = args.shape or ("tiny" if args.quick else "124M")
    new_tokens = args.new_tokens or (16 if args.quick else 128)
    rounds = args.rounds or (2 if args.quick else 5)
    batches = tuple(int(b) for b in (args.batch_sizes or "1,8").split(","))

    common.set_threads(args.threads)
    malloc = common.setup_malloc(args.tune_malloc)
    common.quiet_transformers()
    print(f"generate_speed: GPT-2 {shape} shape, greedy, prompt {args.prompt_len} + "
          f"{new_tokens} new tokens, KV cache, {rounds} interleaved rounds, median")
    print(common.machine_line())
    print(malloc)
    results = bench_generation(shape, batches, args.prompt_len, new_tokens, rounds,
                               bf16=args.dtype == "bf16", hf_bf16=args.hf_bf16, seed=args.seed)
    rows = [[r["batch"], r["contender"], f"{r['median_s']:.3f}",
             f"{r['min_s']:.3f}-{r['max_s']:.3f}", f"{r['tok_per_s']:.1f}",
             f"{r['vs_hf_fp32']:.2f}x", f"{r['token_agreement']:.3f}"] for r in results]
    print()
    print(common.table(["batch", "contender", "median s", "range s", "tokens/s",
                        "vs HF fp32", "tokens = HF"], rows,
                       [">", "<", ">", ">", ">", ">", ">"]))
    print("(tokens/s = batch * new tokens / wall time of the whole call, prompt included; "
          "'tokens = HF': share of ids equal to HF fp32's)")
    print()
    print(summarize(results, args.dtype == "bf16", args.quick))
    return results


if __name__ == "__main__":
    main()
