"""A check for the day a GPU is lent: the tests on it, training speed against its bf16 peak,
nanoGPT on the same shape, generation and evaluation; one table, in under 10 minutes.

    python bench/gpu_check.py                                        # on cuda
    python bench/gpu_check.py --nanogpt ../peers/nanogpt/model.py    # + nanoGPT's row
    python bench/gpu_check.py --device cpu --quick --no-compile      # the dry run the tests use

Rows, in this order (each says what it ran and what it found; a part that fails is a row
that says so, and the others still run):

  tests          ``pytest -m device`` with GPT2_TEST_DEVICE set to the device: the tests that
                 take a device (HF equivalence of logits and greedy tokens, the KV cache,
                 train.py end to end and kill -9 + --resume bit-exact); on the CPU they are
                 the suite's own, so the dry run skips them unless --tests
  train          one optimizer step of ours (bench/train_speed.py's make_step: forward,
                 cross-entropy, backward, clip, fused AdamW) on GPT-2 124M's shape (context
                 1024, --batch rows) under bf16 autocast and torch.compile: tokens/s (median
                 of --steps steps after the compiling one) and MFU, model FLOPs/token
                 (train_speed.flops_per_token: 6N + attention + head) x tokens/s over the
                 GPU's dense bf16 peak (BF16_PEAKS, or --peak-tflops)
  nanoGPT        its model.py (--nanogpt PATH, kept outside this repository: fetch
                 karpathy/nanoGPT), the same shape and weights, its configure_optimizers,
                 the same step, bf16 autocast and torch.compile; ours/nanoGPT
  train.py       the command line on the built-in corpus (copied to a temp folder): --dtype
                 bf16 --compile --max-steps N: tokens/s over the whole run, its final loss
  generate       greedy decoding of the 124M shape, fp32 batch 1 and 8, bf16 batch 1: new
                 tokens/s; fp32 greedy tokens against transformers' generate on the device
  evaluate       evaluate.evaluate_perplexity of the 124M shape on the built-in corpus: windows
                 per second, and the perplexity against the same evaluation on the CPU

--quick shrinks every shape (a 2-layer, 128-wide model, context 128) and every count.
"""

import argparse
import copy
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402, I001  (puts the repository root on sys.path)
import train_speed  # noqa: E402

# Dense bf16 tensor-core TFLOP/s (the datasheets' figures with sparsity, halved), by the
# words of torch.cuda.get_device_name(): the first entry whose words all appear
BF16_PEAKS = [
    (("H200", "NVL"), 835.5, "NVIDIA H200 datasheet: H200 NVL 1,671 TFLOPS BF16 with sparsity"),
    (("H200",), 989.5, "NVIDIA H200 datasheet: H200 SXM 1,979 TFLOPS BF16 with sparsity"),
    (("H100", "PCIe"), 756.5, "NVIDIA H100 datasheet: H100 PCIe 1,513 TFLOPS BF16 with sparsity"),
    (("H100", "NVL"), 835.5, "NVIDIA H100 datasheet: H100 NVL 1,671 TFLOPS BF16 with sparsity"),
    (("H100",), 989.5, "NVIDIA H100 datasheet: H100 SXM 1,979 TFLOPS BF16 with sparsity"),
    (("A100",), 312.0, "NVIDIA A100 datasheet: 312 TFLOPS BF16 (624 with sparsity)"),
    (("L40S",), 362.0, "NVIDIA L40S datasheet: 362.05 TFLOPS BF16 (733 with sparsity)"),
    (("L4",), 121.0, "NVIDIA L4 datasheet: 242 TFLOPS BF16 with sparsity"),
    (("A10",), 125.0, "NVIDIA A10 datasheet: 125 TFLOPS BF16 (250 with sparsity)"),
]
flops_per_token = train_speed.flops_per_token     # one formula for both scripts


def bf16_peak(device_name):
    """(dense bf16 FLOP/s, source) of the GPU named ``device_name``, or (None, why)."""
    words = set(device_name.replace("-", " ").split())
    for needed, tflops, source in BF16_PEAKS:
        if set(needed) <= words:
            return tflops * 1e12, source
    return None, f"no bf16 peak known for {device_name!r} (give --peak-tflops)"


def mfu(tokens_per_s, flops_per_tok, peak):
    """Model FLOPs utilisation: the model's FLOP/s over the peak (None without a peak)."""
    return None if not peak else tokens_per_s * flops_per_tok / peak


def settings(quick):
    """The shapes and counts: 124M for the check, tiny for --quick."""
    if quick:
        return {"shape": "tiny", "context": 128, "batch": 2, "steps": 3, "cli_steps": 4,
                "new_tokens": 8, "windows": 2}
    return {"shape": "124M", "context": 1024, "batch": 8, "steps": 10, "cli_steps": 50,
            "new_tokens": 64, "windows": 8}


def _row(part, what, figure="", result="ok"):
    return {"part": part, "what": what, "figure": figure, "result": result}


def _failed(part, what, e):
    return _row(part, what, "", f"FAILED: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
                if str(e) else f"FAILED: {type(e).__name__}")


# ---------------------------------------------------------------------------------------
# The parts

def check_tests(device, timeout=420):
    """``pytest -m device`` on ``device`` in a fresh process: one row."""
    env = {**os.environ, "GPT2_TEST_DEVICE": str(device)}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "device", "-p",
                           "no:cacheprovider", "tests"], cwd=common.ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    last = lines[-1].strip("= ") if lines else "no output"
    failed = [ln for ln in lines if ln.startswith("FAILED")]
    result = "ok" if proc.returncode == 0 else "FAILED: " + "; ".join(failed[:3] or [last])
    return _row("tests", f"pytest -m device, GPT2_TEST_DEVICE={device}",
                f"{last} ({time.perf_counter() - t0:.0f} s)", result)


def _batch(cfg, device, seed=0):
    import torch
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, common.GPT2_VOCAB, (cfg["batch"], cfg["context"] + 1), generator=g)
    return tokens[:, :-1].contiguous().to(device), tokens[:, 1:].contiguous().to(device)


def _timed_steps(step, n):
    times = [step()[0] for _ in range(n)]
    return common.median(times)


def check_training(device, cfg, peak, compile=True, nanogpt=None, log=print):
    """Rows for ours (and nanoGPT's model) training under bf16 autocast (+ torch.compile)."""
    ours, hf = common.build_pair(cfg["shape"], context_length=cfg["context"])
    ours = ours.to(device).train()
    batch = _batch(cfg, device)
    n_tok = cfg["batch"] * cfg["context"]
    fpt, _ = flops_per_token(ours, cfg["context"])
    how = "bf16 autocast" + (" + torch.compile" if compile else "")
    shape = f"{cfg['shape']}, context {cfg['context']}, batch {cfg['batch']}"
    rows, speeds = [], {}
    contenders = [("ours", lambda: ours)]
    if nanogpt is not None:
        module = train_speed.load_nanogpt(nanogpt)
        contenders.append(("nanoGPT", lambda: train_speed.build_nanogpt(
            module, hf, cfg["context"]).to(device)))
    for name, build in contenders:
        try:
            model = build()
            t0 = time.perf_counter()
            if name == "ours":
                step = (train_speed.make_compiled_step(model, batch, device)[0] if compile
                        else train_speed.make_step(model, batch, "bf16", device=device))
            else:
                step, _ = train_speed.make_nanogpt_step(torch_compile(model, compile), batch,
                                                        "bf16", device)
                step()                                  # compiles
            first = time.perf_counter() - t0
            tok_s = n_tok / _timed_steps(step, cfg["steps"])
            speeds[name] = tok_s
            share = mfu(tok_s, fpt, peak)
            figure = f"{tok_s:,.0f} tok/s, MFU " + ("n/a" if share is None else f"{share:.1%}")
            if name == "nanoGPT" and "ours" in speeds:
                figure += f"; ours/nanoGPT {speeds['ours'] / tok_s:.2f}x"
            rows.append(_row("train" if name == "ours" else "nanoGPT",
                             f"{name} {shape}, {how} (first step {first:.0f} s)", figure))
        except Exception as e:          # a row that says so; the other parts still run
            rows.append(_failed("train" if name == "ours" else "nanoGPT",
                                f"{name} {shape}, {how}", e))
        log(f"  {rows[-1]['part']}: {rows[-1]['figure'] or rows[-1]['result']}")
    if nanogpt is None:
        rows.append(_row("nanoGPT", "nanoGPT's model.py", "", "skipped (--nanogpt PATH)"))
    return rows


def torch_compile(model, compile):
    import torch
    return torch.compile(model) if compile else model


def check_train_py(device, cfg, compile=True, quick=False):
    """train.py on the built-in corpus, bf16 (+ --compile): one row."""
    import train
    from dataset import default_corpus_text
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "input.txt"
        data.write_text(default_corpus_text())
        size = (["--emb-dim", "64", "--n-layers", "2", "--n-heads", "2", "--context-length",
                 "64", "--batch-size", "4", "--eval-iter", "1"] if quick else [])
        argv = ["--data", str(data), "--out", str(Path(tmp) / "run.pth"), "--device",
                str(device), "--dtype", "bf16", "--max-steps", str(cfg["cli_steps"]),
                "--eval-freq", str(cfg["cli_steps"]), "--no-progress", *size,
                *(["--compile"] if compile else [])]
        history = train.main(argv)
    tok_s = history["tokens_seen"][-1] / history["elapsed_s"]
    return _row("train.py", "train.py " + " ".join(a for a in argv[4:] if "/" not in a),
                f"{tok_s:,.0f} tok/s over the run, final val loss "
                f"{history['final_val_loss']:.3f}")


def check_generation(device, cfg):
    """Greedy decoding rows: fp32 batch 1 and 8 (tokens against HF's), bf16 batch 1."""
    import torch

    from generate import generate_text
    ours, hf = common.build_pair(cfg["shape"])
    ours, hf = ours.to(device), hf.to(device)
    rows = []
    for dtype, batch in (("fp32", 1), ("fp32", 8), ("bf16", 1)):
        model = ours if dtype == "fp32" else copy.deepcopy(ours).to(torch.bfloat16)
        g = torch.Generator().manual_seed(batch)
        prompt = torch.randint(0, common.GPT2_VOCAB, (batch, 16), generator=g).to(device)
        n = cfg["new_tokens"]
        generate_text(model, prompt, 4, eos_id=None)                    # warm-up
        train_speed.synchronize(device)
        t0 = time.perf_counter()
        out = generate_text(model, prompt, n, eos_id=None)
        train_speed.synchronize(device)
        figure = f"{batch * n / (time.perf_counter() - t0):,.1f} new tok/s"
        result = "ok"
        if dtype == "fp32":
            with torch.no_grad():
                theirs = hf.generate(prompt, attention_mask=torch.ones_like(prompt),
                                     do_sample=False, max_new_tokens=n, min_new_tokens=n,
                                     pad_token_id=common.GPT2_EOS)
            same = torch.equal(out, theirs)
            figure += f"; greedy tokens = HF's: {'yes' if same else 'no'}"
            result = "ok" if same else "FAILED: greedy tokens differ from HF's"
        rows.append(_row("generate", f"{cfg['shape']} {dtype}, batch {batch}, 16 + {n} tokens",
                         figure, result))
    return rows


def check_evaluation(device, cfg):
    """evaluate_perplexity on the device against the same on the CPU: one row."""
    import torch

    from dataset import default_corpus_text, get_tokenizer
    from evaluate import evaluate_perplexity
    ours, _ = common.build_pair(cfg["shape"], context_length=cfg["context"])
    tok = get_tokenizer()
    ids = tok.encode(default_corpus_text())[:cfg["context"] * cfg["windows"]]
    ref = evaluate_perplexity(ours, ids, stride=cfg["context"], progress=False)["perplexity"]
    model = copy.deepcopy(ours).to(device)
    t0 = time.perf_counter()
    got = evaluate_perplexity(model, ids, stride=cfg["context"], progress=False)["perplexity"]
    train_speed.synchronize(torch.device(device))
    seconds = time.perf_counter() - t0
    close = abs(got / ref - 1) < 1e-3
    return _row("evaluate", f"{cfg['shape']} perplexity, {len(ids)} tokens of the built-in "
                f"corpus, windows of {cfg['context']}",
                f"{cfg['windows'] / seconds:.1f} windows/s; perplexity {got:.2f} "
                f"(CPU {ref:.2f})", "ok" if close else "FAILED: differs from the CPU's by "
                f"{abs(got / ref - 1):.1e}")


# ---------------------------------------------------------------------------------------

def run_check(device="cuda", quick=False, compile=True, nanogpt=None, tests=None,
              peak_tflops=None, log=print):
    """Every part on ``device``; returns (rows, the peak line)."""
    import torch
    device = torch.device(device)
    cfg = settings(quick)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak, source = bf16_peak(name)
    else:
        name, peak, source = "the CPU", None, "no GPU peak: MFU is not given on the CPU"
    if peak_tflops:
        peak, source = peak_tflops * 1e12, "--peak-tflops"
    peak_line = (f"device: {name}; bf16 peak "
                 + (f"{peak / 1e12:.1f} TFLOP/s ({source})" if peak else source))
    log(peak_line)
    rows = []
    parts = [("tests", lambda: [check_tests(device)] if (tests if tests is not None
                                                          else device.type != "cpu")
              else [_row("tests", "pytest -m device", "", "skipped (the CPU's are the "
                                                          "suite's own; --tests runs them)")]),
             ("train", lambda: check_training(device, cfg, peak, compile, nanogpt, log)),
             ("train.py", lambda: [check_train_py(device, cfg, compile, quick)]),
             ("generate", lambda: check_generation(device, cfg)),
             ("evaluate", lambda: [check_evaluation(device, cfg)])]
    for part, fn in parts:
        t0 = time.perf_counter()
        try:
            rows += fn()
        except Exception as e:          # one row saying what failed; the next part runs
            rows.append(_failed(part, part, e))
        log(f"{part}: {time.perf_counter() - t0:.0f} s")
    return rows, peak_line


def table(rows):
    return common.table(["part", "what", "figure", "result"],
                        [[r["part"], r["what"], r["figure"], r["result"]] for r in rows],
                        ["<", "<", "<", "<"])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu (a dry run)")
    p.add_argument("--nanogpt", metavar="PATH", default=None,
                   help="nanoGPT's model.py (outside this repository); without it no row")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="torch.compile in the training parts (default on)")
    p.add_argument("--tests", action=argparse.BooleanOptionalAction, default=None,
                   help="run pytest -m device (default: on a GPU, not on the CPU)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="the device's dense bf16 peak, where BF16_PEAKS does not know it")
    p.add_argument("--quick", action="store_true", help="tiny shapes and counts")
    args = p.parse_args(argv)
    import torch
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {args.device}: this PyTorch sees no CUDA GPU; run it where one is "
                f"lent, or --device cpu for the dry run")
    if args.device != "cpu" and not args.device.startswith("cuda"):
        p.error(f"--device {args.device}: use cuda, cuda:N or cpu")
    if args.nanogpt and not Path(args.nanogpt).is_file():
        p.error(f"--nanogpt {args.nanogpt}: no such file (nanoGPT's model.py)")
    if args.peak_tflops is not None and args.peak_tflops <= 0:
        p.error(f"--peak-tflops must be > 0, got {args.peak_tflops}")
    common.quiet_transformers()
    print(f"gpu_check: {common.machine_line()}")
    t0 = time.perf_counter()
    rows, peak_line = run_check(args.device, args.quick, args.compile, args.nanogpt,
                                args.tests, args.peak_tflops)
    print()
    print(peak_line)
    print(table(rows))
    count = {word: sum(r["result"].startswith(word) for r in rows)
             for word in ("ok", "skipped", "FAILED")}
    print(f"\nSUMMARY gpu_check: {count['ok']} rows ok, {count['skipped']} skipped, "
          f"{count['FAILED']} failed, {time.perf_counter() - t0:.0f} s"
          + (" [--quick]" if args.quick else ""))
    return rows


if __name__ == "__main__":
    main()
