"""The single operations behind generation and loading speed, timed one by one.

    python bench/op_speed.py           # 124M shapes
    python bench/op_speed.py --quick   # fewer repetitions

No targets: this is the evidence for the analysis in the README / issue. Sections:
  sgemm     every fp32 matrix product of a training step of configs S and M (forward,
            grad-input, grad-weight of each linear layer and the head) and a 2048^3 square,
            through torch.mm (PyTorch's default kernel, MKL on x86 builds) and through
            cpu_kernels.onednn_mm (oneDNN, what training uses on x86), in GFLOP/s. Runs with
            cpu_kernels.tune_malloc() on, as training does.
  headtrain the head's forward, grad-input and grad-weight matmuls at training sizes, for
            both weight layouts and vocab 50257 vs 50304.
  gemv      every block matrix of the 124M model in 12 copies (too big for the L3 cache,
            as in a real decode step), x @ W[in,out] vs F.linear(x, W[out,in]) vs the
            oneDNN-packed copy generation uses on x86, fp32 and bf16, 1 and 8 rows, in
            GB/s, beside the machine's streaming rate (sum, copy).
  head      the output-head matmul at decode (B = 1, 8) and prefill (16 rows): F.linear with
            the (vocab, emb) weight (our nn.Linear layout) vs x @ W where W is (emb, vocab)
            contiguous (HF's wte is (vocab, emb) too, so both are F.linear there), each with
            the vocabulary 50257 and padded to 50304 (a multiple of 64); GB/s = weight bytes
            read per call / time.
  attention one decode step of scaled_dot_product_attention on our KV cache (a view into a
            buffer of context_length positions) vs the same keys contiguous, vs matmul +
            softmax written out.
  cache     allocating (zeroing) a KV cache for the whole context at batch 1 / 8 vs one
            sized for prompt + new tokens (why generate_text sizes it so, with torch.empty).
  overhead  time per generated token on a model so small that the arithmetic is nothing:
            Python and dispatch overhead per step, ours vs HF generate.
  meta      building GPTModel(124M cfg) on the meta device in a fresh process (normal_ on a
            meta tensor imports torch._dynamo, ~1 s and ~75 MB; GPTModel avoids it there).
"""

import argparse
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (puts the repository root on sys.path)


def best_of(fn, reps, inner=1):
    """Median seconds of one call over ``reps`` samples (each averaging ``inner`` calls)."""
    fn()
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        samples.append((time.perf_counter() - t0) / inner)
    return common.median(samples)


def interleaved_medians(variants, rounds, reps):
    """{name: median seconds of one call} for {name: fn}, the variants interleaved, several
    rounds (so that the machine's drift falls on all of them alike)."""
    times = {k: [] for k in variants}
    for _ in range(rounds):
        for k, fn in variants.items():
            times[k].append(best_of(fn, reps))
    return {k: common.median(ts) for k, ts in times.items()}


def bench_head(reps=20, emb=768, vocab=50257, padded=50304):
    import torch
    import torch.nn.functional as F
    g = torch.Generator().manual_seed(0)
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        W = (torch.randn(vocab, emb, generator=g) * 0.02).to(dtype)      # (vocab, emb)
        Wt = W.t().contiguous()                                          # (emb, vocab)
        Wp = torch.cat([W, torch.zeros(padded - vocab, emb, dtype=dtype)])
        Wtp = Wp.t().contiguous()
        for rows_in in (1, 8, 16):
            x = torch.randn(rows_in, emb, generator=g).to(dtype)
            variants = {
                "F.linear(x, W[V,C])": partial(F.linear, x, W),
                "x @ Wt[C,V]": partial(torch.matmul, x, Wt),
                "F.linear(x, Wpad[Vp,C])": partial(F.linear, x, Wp),
                "x @ Wtpad[C,Vp]": partial(torch.matmul, x, Wtp),
            }
            for k, t in interleaved_medians(variants, 3, reps).items():
                nbytes = (padded if "pad" in k else vocab) * emb * W.element_size()
                rows.append([str(dtype).removeprefix("torch."), rows_in, k,
                             f"{t * 1e3:.3f}", f"{nbytes / t / 1e9:.1f}"])
    return rows


def _head_train_variants(x, gy, W, Wt):
    """Forward, grad-input and grad-weight matmuls of the head for both weight layouts."""
    import torch.nn.functional as F
    return {"W[V,C] fwd F.linear(x, W)": partial(F.linear, x, W),
            "W[V,C] dx = gy @ W": partial(torch_mm, gy, W),
            "W[V,C] dW = gy.T @ x": partial(torch_mm, gy.t(), x),
            "Wt[C,V] fwd x @ Wt": partial(torch_mm, x, Wt),
            "Wt[C,V] dx = gy @ Wt.T": partial(torch_mm, gy, Wt.t()),
            "Wt[C,V] dWt = x.T @ gy": partial(torch_mm, x.t(), gy)}


def torch_mm(a, b):
    import torch
    return torch.mm(a, b)


def bench_head_train(rounds=3, reps=3, vocab=50257, padded=50304):
    """The head's three matmuls at training sizes (S: 2048 x 384, M: 1024 x 768)."""
    import torch
    g = torch.Generator().manual_seed(0)
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for n_rows, emb in ((2048, 384), (1024, 768)):
            x = torch.randn(n_rows, emb, generator=g).to(dtype)
            variants = {}
            for V in (vocab, padded):
                W = (torch.randn(V, emb, generator=g) * 0.02).to(dtype)
                gy = torch.randn(n_rows, V, generator=g).to(dtype)
                for k, fn in _head_train_variants(x, gy, W, W.t().contiguous()).items():
                    variants[(V, k)] = fn
            for (V, k), t in interleaved_medians(variants, rounds, reps).items():
                rows.append([str(dtype).removeprefix("torch."), f"{n_rows}x{emb}", V, k,
                             f"{t * 1e3:.0f}", f"{2 * n_rows * emb * V / t / 1e9:.0f}"])
    return rows


def bench_sgemm(rounds=3, reps=3):
    """fp32 products of training, torch.mm vs cpu_kernels.onednn_mm; rows of the table."""
    import torch

    from engine import cpu_kernels
    if not cpu_kernels.available():
        return [["-", "-", "oneDNN is not available here (not x86, or no oneDNN)", "", "", ""]]
    g = torch.Generator().manual_seed(0)
    # (rows, in, out) of every linear layer and the head: S (2048 x 384), M (1024 x 768)
    shapes = [("S", 2048, i, o) for i, o in ((384, 1152), (384, 384), (384, 1536),
                                             (1536, 384), (384, 50257))]
    shapes += [("M", 1024, i, o) for i, o in ((768, 2304), (768, 768), (768, 3072),
                                              (3072, 768), (768, 50257))]
    rows = []
    for cfg, n, i, o in [("square", 2048, 2048, 2048)] + shapes:
        x = torch.randn(n, i, generator=g)
        W = torch.randn(i, o, generator=g)
        gy = torch.randn(n, o, generator=g)
        for what, a, b in (("fwd x @ W", x, W), ("dx = gy @ W.T", gy, W.t()),
                           ("dW = x.T @ gy", x.t(), gy)):
            variants = {"torch.mm": partial(torch_mm, a, b),
                        "onednn_mm": partial(cpu_kernels.onednn_mm, a, b)}
            rate = {k: 2 * n * i * o / t / 1e9
                    for k, t in interleaved_medians(variants, rounds, reps).items()}
            rows.append([cfg, f"{n}x{i} @ {i}x{o}", what, f"{rate['torch.mm']:.0f}",
                         f"{rate['onednn_mm']:.0f}",
                         f"{rate['onednn_mm'] / rate['torch.mm']:.2f}x"])
            if cfg == "square":
                break
    return rows


def _sweep_in_out(xs, mats):
    for x, w in zip(xs, mats):
        x @ w


def _sweep_linear(xs, mats):
    import torch.nn.functional as F
    for x, w in zip(xs, mats):
        F.linear(x, w)


def _sweep_packed(xs, mats, linear):
    for x, w in zip(xs, mats):
        linear(x, w)


def bench_gemv(rounds=3, reps=5, layers=12):
    """Every block matrix of GPT-2 124M, ``layers`` copies each (so they do not stay in the
    32 MB L3 cache, as in a real decode step), x @ W[in, out] vs F.linear(x, W[out, in]) vs
    the oneDNN-packed weights generation uses on x86 (cpu_kernels.packed_weight, tuned for m
    rows); GB/s = bytes of all copies / time of one sweep. Plus the machine's streaming
    rate."""
    import torch

    from engine import cpu_kernels
    g = torch.Generator().manual_seed(0)
    rows = []
    big = torch.randn(128 * 2**20, generator=g)               # 512 MiB
    dst = torch.empty_like(big)
    for name, fn, nbytes in (("sum of 512 MiB", big.sum, big.numel() * 4),
                             ("copy 512 MiB -> 512 MiB", partial(dst.copy_, big),
                              2 * big.numel() * 4)):
        t = best_of(fn, reps)
        rows.append(["fp32", "-", name, "-", f"{t * 1e3:.1f}", f"{nbytes / t / 1e9:.1f}"])
    del big, dst
    shapes = (("qkv 768->2304", 768, 2304, layers), ("out 768->768", 768, 768, layers),
              ("fc 768->3072", 768, 3072, layers), ("proj 3072->768", 3072, 768, layers),
              ("head 768->50257", 768, 50257, 2))
    for dtype in (torch.float32, torch.bfloat16):
        for m in (1, 8):
            for name, k, n, copies in shapes:
                mats_in_out = [(torch.randn(k, n, generator=g) * 0.02).to(dtype)
                               for _ in range(copies)]
                mats_out_in = [w.t().contiguous() for w in mats_in_out]
                xs = [torch.randn(m, k, generator=g).to(dtype) for _ in range(copies)]
                variants = {"x @ W[in,out]": partial(_sweep_in_out, xs, mats_in_out),
                            "F.linear(x, W[out,in])": partial(_sweep_linear, xs, mats_out_in)}
                if cpu_kernels.available():
                    packed = [cpu_kernels.packed_weight(w, m) for w in mats_out_in]
                    variants["packed (oneDNN)"] = partial(_sweep_packed, xs, packed,
                                                          cpu_kernels.packed_linear)
                times = {v: [] for v in variants}
                with torch.inference_mode():
                    for _ in range(rounds):
                        for v, fn in variants.items():
                            times[v].append(best_of(fn, reps))
                nbytes = copies * k * n * mats_in_out[0].element_size()
                for v, ts in times.items():
                    t = common.median(ts)
                    rows.append([str(dtype).removeprefix("torch."), m, f"{name} x{copies}", v,
                                 f"{t / copies * 1e3:.3f}", f"{nbytes / t / 1e9:.1f}"])
                del mats_in_out, mats_out_in, variants
    return rows


def _manual_attention(q, k, v):
    import torch
    return torch.softmax((q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5, -1) @ v


def _two_zeros(shape):
    import torch
    return torch.zeros(shape), torch.zeros(shape)


def bench_attention(reps=50, batch=(1, 8), n_heads=12, head_dim=64, ctx=1024, filled=80):
    import torch
    import torch.nn.functional as F
    g = torch.Generator().manual_seed(0)
    rows = []
    for B in batch:
        buf_k = torch.randn(B, n_heads, ctx, head_dim, generator=g)
        buf_v = torch.randn(B, n_heads, ctx, head_dim, generator=g)
        q = torch.randn(B, n_heads, 1, head_dim, generator=g)
        k_view, v_view = buf_k[:, :, :filled], buf_v[:, :, :filled]
        k_c, v_c = k_view.contiguous(), v_view.contiguous()
        sdpa = F.scaled_dot_product_attention
        variants = {"sdpa on cache view": partial(sdpa, q, k_view, v_view),
                    "sdpa contiguous k/v": partial(sdpa, q, k_c, v_c),
                    "matmul+softmax": partial(_manual_attention, q, k_c, v_c)}
        with torch.inference_mode():
            medians = interleaved_medians(variants, 3, reps)
        for k, t in medians.items():
            rows.append([B, filled, k, f"{t * 1e6:.0f}"])
    return rows


def bench_cache(reps=5, shape="124M", prompt=16, new=128):
    n_layer, C, H, ctx = common.SHAPES[shape]
    rows = []
    for B in (1, 8):
        for length in (ctx, prompt + new):
            shp = (n_layer, B, H, length, C // H)
            t = best_of(partial(_two_zeros, shp), reps)
            nbytes = 2 * n_layer * B * H * length * (C // H) * 4
            rows.append([B, length, common.fmt_bytes(nbytes), f"{t * 1e3:.1f}"])
    return rows


def bench_overhead(rounds=3, new_tokens=64, batch=1):
    """ms per generated token on a 1-layer, emb-32, vocab-64 model: pure overhead."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from download_weights_hf import config_from_hf, load_weights_into_gpt
    from generate import generate_text
    from model import GPTModel
    common.quiet_transformers()
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=256, n_embd=32, n_layer=1,
                                    n_head=2, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0,
                                    bos_token_id=63, eos_token_id=63)).eval()
    ours = load_weights_into_gpt(GPTModel(config_from_hf(hf.config.to_dict())), hf).eval()
    idx = torch.randint(0, 64, (batch, 16))

    def run_ours():
        with torch.inference_mode():
            generate_text(ours, idx, new_tokens)

    def run_hf():
        with torch.inference_mode():
            hf.generate(idx, attention_mask=torch.ones_like(idx), do_sample=False,
                        max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=63)

    res = common.interleaved({"ours generate_text": lambda: common.timed(run_ours)[0],
                              "HF generate": lambda: common.timed(run_hf)[0]}, rounds, 1)
    return [[k, f"{common.median(v) / new_tokens * 1e3:.2f}"] for k, v in res.items()]


def bench_meta():
    code = ("import time, sys; t=time.perf_counter(); import torch; from model import GPTModel,"
            " MODEL_CONFIGS; t1=time.perf_counter(); rss=lambda: int([l for l in "
            "open('/proc/self/status') if l.startswith('VmRSS')][0].split()[1])//1024; r0=rss();"
            " dev=torch.device('meta');\nwith dev: m=GPTModel(MODEL_CONFIGS['gpt2-small (124M)'])"
            "\nprint(f'{time.perf_counter()-t1:.2f} s, +{rss()-r0} MiB RSS, torch._dynamo "
            "imported: {\"torch._dynamo\" in sys.modules}')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=common.ROOT, check=True)
    return out.stdout.strip()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only",
                   default="sgemm,gemv,head,headtrain,attention,cache,overhead,meta")
    p.add_argument("--quick", action="store_true", help="fewer repetitions")
    args = p.parse_args(argv)
    only = set(args.only.split(","))
    q = args.quick
    print("kernels: single operations, 124M shapes, median of interleaved samples")
    print(common.machine_line())
    if "sgemm" in only:
        print()
        print(common.setup_malloc(True))
        print(common.table(["config", "product", "training matmul (fp32)", "torch.mm GFLOP/s",
                            "onednn_mm GFLOP/s", "ratio"],
                           bench_sgemm(rounds=2 if q else 3, reps=2 if q else 3),
                           ["<", "<", "<", ">", ">", ">"]))
    if "head" in only:
        print()
        print(common.table(["dtype", "rows", "output head", "ms", "GB/s of weight"],
                           bench_head(reps=5 if q else 20)))
    if "gemv" in only:
        print()
        print(common.table(["dtype", "rows", "matrix (copies)", "layout", "ms per matrix",
                            "GB/s"], bench_gemv(rounds=2 if q else 3, reps=3 if q else 5)))
    if "headtrain" in only:
        print()
        print(common.table(["dtype", "rows x emb", "vocab", "head matmul (training)", "ms",
                            "GFLOP/s"], bench_head_train(rounds=2 if q else 3,
                                                         reps=2 if q else 3)))
    if "attention" in only:
        print()
        print(common.table(["batch", "keys", "decode attention (12 heads x 64)", "us"],
                           bench_attention(reps=10 if q else 50)))
    if "cache" in only:
        print()
        print(common.table(["batch", "positions", "K+V bytes", "torch.zeros ms"],
                           bench_cache(reps=2 if q else 5)))
    if "overhead" in only:
        print()
        print(common.table(["tiny model (1 layer, emb 32, vocab 64)", "ms / token"],
                           bench_overhead(rounds=2 if q else 5, new_tokens=32 if q else 64)))
    if "meta" in only:
        print()
        print(f"GPTModel(124M) on the meta device, fresh process: {bench_meta()}")
    print()
    print("SUMMARY kernels: see the tables (no targets)")


if __name__ == "__main__":
    main()
