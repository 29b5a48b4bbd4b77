"""Training-step speed (forward + backward + clip + AdamW step): GPTModel vs GPT2LMHeadModel.

    python bench/train_speed.py             # configs S and M, fp32 and ours with bf16 autocast
    python bench/train_speed.py --quick     # tiny config: a smoke run

Config S: 6 layers, 6 heads, emb 384, context 256, batch 8. Config M: the 124M shape,
context 1024, batch 1. Both sides start from the same random weights, take the same
batch of token ids, and run the same code: train_utils.accumulate_gradients (forward,
cross-entropy on fp32 logits, backward), clip_grad_norm_(1.0), AdamW from
train_utils.make_optimizer (same groups, lr 4e-4, weight decay 0.1, betas 0.9/0.95),
zero_grad. HF's model is wrapped so that it returns logits like ours. Dropout is 0.
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (puts the repository root on sys.path)

# name: (shape, context, batch)
CONFIGS = {"S": ("S", 256, 8), "M": ("124M", 1024, 1), "tiny": ("tiny", 64, 2)}
FP32_TARGET = 1.25     # ours fp32 / HF fp32 tokens/s
BF16_TARGET = 2.0      # ours bf16 autocast / HF fp32 tokens/s
FLOPS_FORMULA = ("model FLOPs/token = 6*N_nonemb + 6*n_layers*context*emb (attention) + "
                 "6*emb*vocab (head); N_nonemb = parameters without wte and wpe")


def flops_per_token(model, context):
    """The formula above for a GPTModel (tied or untied head)."""
    cfg = model.cfg
    n_all = sum(p.numel() for p in model.parameters())   # a tied head is counted once
    n_emb = model.tok_emb.weight.numel() + model.pos_emb.weight.numel()
    if not cfg["tie_embeddings"]:
        n_emb += model.out_head.weight.numel()           # the head has its own term
    n_nonemb = n_all - n_emb
    C, L, V = cfg["emb_dim"], cfg["n_layers"], cfg["vocab_size"]
    return 6 * n_nonemb + 6 * L * context * C + 6 * C * V, n_nonemb


def matmul_peak(dtype_name, n=2048, reps=3):
    """Best FLOP/s of an n x n x n matmul in ``dtype_name`` ('fp32' or 'bf16').

    Both of PyTorch's CPU kernels are tried, torch.mm (MKL for fp32 on x86 builds, oneDNN
    for bf16) and oneDNN directly (cpu_kernels.onednn_mm, what our fp32 training uses on x86):
    the peak is the faster one's, so MFU never credits a kernel choice as efficiency.
    """
    import torch

    from engine import cpu_kernels
    dtype = torch.bfloat16 if dtype_name == "bf16" else torch.float32
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(dtype)
    b = torch.randn(n, n, generator=g).to(dtype)
    kernels = [torch.mm]
    if cpu_kernels.available():
        kernels.append(cpu_kernels.onednn_mm)
    best = float("inf")
    for mm in kernels:
        mm(a, b)
        for _ in range(reps):
            t0 = time.perf_counter()
            mm(a, b)
            best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def hf_logits_module(hf):
    """GPT2LMHeadModel -> a module whose forward(idx) returns logits, like GPTModel's."""
    import torch.nn as nn

    class HFLogits(nn.Module):
        def __init__(self, hf):
            super().__init__()
            self.hf = hf

        def forward(self, idx):
            return self.hf(input_ids=idx, use_cache=False).logits

    return HFLogits(hf)


def make_step(model, batch, dtype, plain=False):
    """A function doing one full optimizer step; returns (seconds, loss).

    ``plain``: with every fast path off (cpu_kernels.disabled, fused_loss.disabled), the
    plain PyTorch code.
    """
    import contextlib

    import torch

    from engine import cpu_kernels, fused_loss
    from train_utils import accumulate_gradients, make_optimizer
    opt = make_optimizer(model, learning_rate=4e-4, weight_decay=0.1)
    device = torch.device("cpu")

    def step():
        t0 = time.perf_counter()
        with contextlib.ExitStack() as off:
            if plain:
                off.enter_context(cpu_kernels.disabled())
                off.enter_context(fused_loss.disabled())
            loss, _ = accumulate_gradients(model, [batch], device, dtype)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0, loss

    return step


def bench_config(name, rounds=5, warmup=2, hf_bf16=False, seed=0, log=print):
    """Median step time of each contender on config ``name``; returns (rows, info)."""
    import torch
    shape, context, batch_size = CONFIGS[name]
    ours, hf = common.build_pair(shape, seed, context_length=context)
    ours.train()
    hf.train()
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, common.GPT2_VOCAB, (batch_size, context + 1), generator=g)
    batch = (tokens[:, :-1], tokens[:, 1:])
    hf_mod = hf_logits_module(hf)

    # Same function before any step: the first losses must agree.
    with torch.no_grad():
        from train_utils import calc_loss_batch
        l_ours = calc_loss_batch(*batch, ours, "cpu").item()
        l_hf = calc_loss_batch(*batch, hf_mod, "cpu").item()
    log(f"config {name}: initial loss ours {l_ours:.6f}, HF {l_hf:.6f} "
        f"(|diff| {abs(l_ours - l_hf):.1e})")
    if abs(l_ours - l_hf) > 1e-4:
        raise AssertionError(f"config {name}: initial losses differ ({l_ours} vs {l_hf}); "
                             f"the models do not compute the same function")

    # ours' contenders share one model (bf16 autocast keeps fp32 weights); "plain" runs with
    # the CPU fast paths off, to see what they are worth on this machine
    contenders = {"ours fp32": make_step(ours, batch, "fp32"),
                  "HF fp32": make_step(hf_mod, batch, "fp32"),
                  "ours bf16 autocast": make_step(ours, batch, "bf16"),
                  "ours fp32 plain": make_step(ours, batch, "fp32", plain=True),
                  "ours bf16 plain": make_step(ours, batch, "bf16", plain=True)}
    if hf_bf16:
        contenders["HF bf16 autocast"] = make_step(hf_mod, batch, "bf16")
    peaks = {"fp32": [], "bf16": []}
    for dt in peaks:
        contenders[f"peak {dt}"] = (lambda dt=dt: (peaks[dt].append(matmul_peak(dt)), 0.0))
    runs = common.interleaved(contenders, rounds, warmup=warmup, label=name)
    peak = {dt: max(v) for dt, v in peaks.items()}
    fpt, n_nonemb = flops_per_token(ours, context)
    n_tok = batch_size * context
    hf_s = common.median([t for t, _ in runs["HF fp32"]])
    rows = []
    for cname, r in runs.items():
        if cname.startswith("peak"):
            continue
        times = [t for t, _ in r]
        med = common.median(times)
        flops = fpt * n_tok / med
        dt = "bf16" if "bf16" in cname else "fp32"
        rows.append({"config": name, "contender": cname, "median_s": med, "min_s": min(times),
                     "max_s": max(times), "tok_per_s": n_tok / med, "vs_hf_fp32": hf_s / med,
                     "gflops": flops / 1e9, "mfu": flops / peak[dt], "peak_dtype": dt,
                     "last_loss": r[-1][1]})
    info = {"config": name, "shape": shape, "context": context, "batch": batch_size,
            "flops_per_token": fpt, "n_nonemb": n_nonemb,
            "peak_fp32": peak["fp32"], "peak_bf16": peak["bf16"],
            "attn": getattr(hf.config, "_attn_implementation", "?")}
    return rows, info


def summarize(rows, quick):
    parts, oks = [], []
    for cfg in dict.fromkeys(r["config"] for r in rows):
        by = {r["contender"]: r for r in rows if r["config"] == cfg}
        for label, cname, goal in (("fp32 ours/HF", "ours fp32", FP32_TARGET),
                                   ("bf16 ours/HF-fp32", "ours bf16 autocast", BF16_TARGET)):
            text, ok = common.target(f"{cfg} {label}", by[cname]["vs_hf_fp32"], goal)
            parts.append(text)
            oks.append(ok)
        for dt in ("fp32", "bf16"):     # the fast paths must not lose to the plain code
            fast = by["ours fp32" if dt == "fp32" else "ours bf16 autocast"]["tok_per_s"]
            text, ok = common.target(f"{cfg} {dt} fast/plain",
                                     fast / by[f"ours {dt} plain"]["tok_per_s"], 1.0)
            parts.append(text)
            oks.append(ok)
    note = " [--quick: tiny config, targets are for S and M]" if quick else ""
    return f"SUMMARY train_speed: {'; '.join(parts)}; {sum(oks)}/{len(oks)} targets met{note}"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--configs", default=None, help="comma list of S, M, tiny (default S,M)")
    p.add_argument("--warmup", type=int, default=None, help="steps per contender (default 2)")
    p.add_argument("--hf-bf16", action="store_true",
                   help="also time HF with bf16 autocast (for information)")
    common.add_run_flags(p, "tiny config, 2 rounds, 1 warmup step", tune_malloc=True)
    args = p.parse_args(argv)
    configs = (args.configs or ("tiny" if args.quick else "S,M")).split(",")
    rounds = args.rounds or (2 if args.quick else 5)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)

    common.set_threads(args.threads)
    malloc = common.setup_malloc(args.tune_malloc)
    common.quiet_transformers()
    print(f"train_speed: one optimizer step = forward + cross-entropy + backward + "
          f"clip_grad_norm_ + AdamW; {warmup} warmup steps, {rounds} interleaved rounds, "
          f"median")
    print(common.machine_line())
    print(malloc)
    print(FLOPS_FORMULA)
    rows, infos = [], []
    for name in configs:
        r, info = bench_config(name, rounds, warmup, args.hf_bf16, args.seed)
        rows += r
        infos.append(info)
    print()
    for info in infos:
        print(f"config {info['config']}: {info['shape']} shape, context {info['context']}, "
              f"batch {info['batch']}; N_nonemb {info['n_nonemb'] / 1e6:.2f}M; "
              f"{info['flops_per_token'] / 1e6:.1f} MFLOP/token; HF attention "
              f"{info['attn']}; matmul peak 2048^3 (best of torch.mm, oneDNN): "
              f"fp32 {info['peak_fp32'] / 1e9:.0f} "
              f"GFLOP/s, bf16 {info['peak_bf16'] / 1e9:.0f} GFLOP/s")
    table_rows = [[r["config"], r["contender"], f"{r['median_s']:.3f}",
                   f"{r['min_s']:.3f}-{r['max_s']:.3f}", f"{r['tok_per_s']:.0f}",
                   f"{r['vs_hf_fp32']:.2f}x", f"{r['gflops']:.1f}",
                   f"{100 * r['mfu']:.1f}% ({r['peak_dtype']})"] for r in rows]
    print()
    print(common.table(["config", "contender", "median s/step", "range s", "tokens/s",
                        "vs HF fp32", "GFLOP/s", "MFU (peak)"], table_rows,
                       ["<", "<", ">", ">", ">", ">", ">", ">"]))
    print()
    print(summarize(rows, args.quick))
    return rows, infos


if __name__ == "__main__":
    main()
