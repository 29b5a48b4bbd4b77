"""Helpers the bench scripts share: paths, timing, tables, targets, memory of child processes.

Every script does ``sys.path.insert(0, <bench folder>)`` and ``import common`` itself; importing
this module puts the repository root on sys.path, so ``import model`` etc. work afterwards.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def median(values):
    return statistics.median(values) if values else float("nan")


def ratio(ours, theirs):
    return ours / theirs if theirs else float("nan")


def timed(fn, *args, **kwargs):
    """(seconds, result) of one call, by the wall clock (perf_counter)."""
    t0 = time.perf_counter()
    result = fn(*args, **kwargs)
    return time.perf_counter() - t0, result


def interleaved(contenders, rounds, warmup=0, label=None):
    """Run every contender once per round, alternating the order from round to round.

    ``contenders``: {name: fn()} where fn returns the seconds it measured (or a dict with a
    "seconds" key and anything else). Returns {name: [result per round]}. Alternating the
    order (A B, B A, A B, ...) keeps a slow drift of the machine (other jobs, heat) from
    landing on one side only. With a ``label``, each run is reported on stderr as it ends.
    """
    names = list(contenders)

    def run(name, what):
        t0 = time.perf_counter()
        result = contenders[name]()
        if label:
            print(f"  [{label}] {what} {name}: {time.perf_counter() - t0:.2f} s",
                  file=sys.stderr, flush=True)
        return result

    for w in range(warmup):
        for name in names:
            run(name, f"warmup {w + 1}/{warmup}")
    results = {name: [] for name in names}
    for r in range(rounds):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            results[name].append(run(name, f"round {r + 1}/{rounds}"))
    return results


def table(headers, rows, aligns=None):
    """A plain-text table (str) with a header rule; numbers right-aligned, text left."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in cells)) if cells else len(str(h))
              for i, h in enumerate(headers)]
    if aligns is None:
        aligns = ["<"] + [">"] * (len(headers) - 1)

    def line(row):
        return "  ".join(f"{c:{a}{w}}" for c, a, w in zip(row, aligns, widths)).rstrip()

    out = [line([str(h) for h in headers]), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in cells]
    return "\n".join(out)


def verdict(ok):
    return "PASS" if ok else "MISS"


def target(label, value, goal, higher_is_better=True, fmt="{:.2f}x"):
    """'label 1.93x (>= 1.80x PASS)'; returns (text, ok)."""
    ok = value >= goal if higher_is_better else value <= goal
    op = ">=" if higher_is_better else "<="
    return f"{label} {fmt.format(value)} ({op} {fmt.format(goal)} {verdict(ok)})", ok


class Summary:
    """A bench script's SUMMARY line: ``target`` adds a target (target()'s text, and whether
    it was met), ``say`` a figure without one; ``line()`` joins them with "; " and counts the
    targets met: "SUMMARY name: a 1.93x (>= 1.80x PASS); b 3.1 GB/s; 1/1 targets met"."""

    def __init__(self, name):
        self.name, self.parts, self.oks = name, [], []

    def target(self, label, value, goal, *, after="", **options):
        """target(label, value, goal, **options) counted, its text followed by ``after``."""
        text, ok = target(label, value, goal, **options)
        self.met(text + after, ok)

    def met(self, text, ok):
        """A target the script judged itself: ``text``, and whether it was met."""
        self.parts.append(text)
        self.oks.append(bool(ok))

    def say(self, text):
        self.parts.append(text)

    def line(self, before_count="", note=""):
        return (f"SUMMARY {self.name}: {'; '.join(self.parts)}; {before_count}"
                f"{sum(self.oks)}/{len(self.oks)} targets met{note}")


def setup_malloc(enabled):
    """Call cpu_kernels.tune_malloc() if asked and available; return a line saying so."""
    if not enabled:
        return "glibc malloc tuning: off (--tune-malloc turns it on)"
    from engine import cpu_kernels
    fn = getattr(cpu_kernels, "tune_malloc", None)
    if fn is None:
        return "glibc malloc tuning: unavailable (cpu_kernels has no tune_malloc)"
    took = fn()
    return ("glibc malloc tuning: on (cpu_kernels.tune_malloc: M_MMAP_MAX=0, large "
            "M_TRIM_THRESHOLD; affects both contenders, they share the process)" if took else
            "glibc malloc tuning: requested but had no effect (not glibc)")


def add_run_flags(parser, quick_help, tune_malloc):
    """The flags generate_speed.py and train_speed.py share (rounds, threads, seed, malloc).

    ``tune_malloc`` is the default for cpu_kernels.tune_malloc(): on where the measured
    code path applies it for users (train_model does), off where it does not (generation).
    """
    parser.add_argument("--rounds", type=int, default=None, help="default 5 (2 with --quick)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tune-malloc", action=argparse.BooleanOptionalAction,
                        default=tune_malloc,
                        help=f"call cpu_kernels.tune_malloc() (default: {tune_malloc})")
    parser.add_argument("--quick", action="store_true", help=quick_help)


def set_threads(n):
    import torch
    if n:
        torch.set_num_threads(n)
    return torch.get_num_threads()


def machine_line():
    import torch
    cap = torch.backends.cpu.get_cpu_capability()
    try:
        load = "load avg {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
    except OSError:
        load = "load avg n/a"
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch "
            f"{torch.__version__} ({cap}), {torch.get_num_threads()} threads, {load}; "
            f"code {git_version()}")


# --as-avx2 (choice_speed.py, peers_speed.py): this machine seen as an x86 CPU without
# AVX-512 (Zen 2 and 3, Intel's desktop and laptop CPUs): PyTorch's own kernels, oneDNN's
# (which then has no bf16 products), ours (engine/native.py) and CTranslate2's limited to AVX2
AVX2_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
            "GPT2_KERNEL_ISA": "avx2", "CT2_FORCE_CPU_ISA": "AVX2"}


def seen_as_avx2():
    return all(os.environ.get(k) == v for k, v in AVX2_ENV.items())


def restart_as_avx2(script, argv):
    """Run ``script`` with ``argv`` again in this process's place, with AVX2_ENV set (PyTorch
    and oneDNN read it when they load; the children inherit it); returns where it is set."""
    if not seen_as_avx2():
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, [sys.executable, str(script), *argv],
                  {**os.environ, **AVX2_ENV})


def vectors_line():
    """The vectors each engine's kernels use here, and whether --as-avx2 limits them."""
    import torch

    from engine import devices, native
    try:
        ours = native.decode_kernels().isa().decode()
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        ours = f"not built ({e})"
    bf16 = "yes" if devices.onednn_bf16() else "no"
    return (f"vectors: decode_kernel.c {ours}; PyTorch {torch.backends.cpu.get_cpu_capability()}"
            f"; oneDNN bf16 products: {bf16}"
            + ("; seen as an AVX2 CPU (--as-avx2: " + " ".join(f"{k}={v}" for k, v in
                                                            AVX2_ENV.items()) + ")"
               if seen_as_avx2() else ""))


def git_version():
    """The repository's commit (short hash, '+dirty' with uncommitted changes to tracked
    files), so that numbers can be matched to the code they measured."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                              capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=ROOT, capture_output=True, text=True).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def rss_bytes():
    """Current resident set size of this process (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def maxrss_to_bytes(ru_maxrss):
    # Linux reports kilobytes, macOS bytes.
    return ru_maxrss if sys.platform == "darwin" else ru_maxrss * 1024


def run_child(argv, timeout=None, env=None):
    """Run ``python argv...`` in a fresh process; return (its JSON result, peak RSS bytes, wall s).
    ``env``: variables to add to this process's environment for the child.

    The child prints one JSON object as its last stdout line. The peak RSS comes from the
    kernel's accounting of exactly that child (os.wait4's rusage, the per-child form of
    getrusage(RUSAGE_CHILDREN)), so nothing the parent holds is counted.
    """
    with tempfile.TemporaryFile(mode="w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, *argv], stdout=subprocess.PIPE, stderr=err,
                                text=True, cwd=ROOT, env={**os.environ, **(env or {})})
        try:
            out = proc.stdout.read()
            _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:
            proc.kill()
            raise
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        proc.stdout.close()
        if proc.returncode != 0:
            err.seek(0)
            raise RuntimeError(f"child {argv} failed with exit code {proc.returncode}:\n"
                               f"{out[-2000:]}\n{err.read()[-4000:]}")
    lines = [ln for ln in out.splitlines() if ln.strip()]
    return json.loads(lines[-1]), maxrss_to_bytes(usage.ru_maxrss), wall


def child_report(**values):
    """What a child prints last: one JSON line (run_child reads it)."""
    print(json.dumps(values), flush=True)


def fmt_bytes(n):
    """Binary units: 1 MiB = 2**20 bytes."""
    if abs(n) >= 2**30:
        return f"{n / 2**30:.2f} GiB"
    return f"{n / 2**20:.0f} MiB"


# GPT-2 shapes by name: (n_layer, n_embd, n_head, n_positions). Vocabulary is always 50257.
SHAPES = {
    "tiny": (2, 128, 4, 256),
    "S": (6, 384, 6, 256),
    "124M": (12, 768, 12, 1024),
    "355M": (24, 1024, 16, 1024),
    "774M": (36, 1280, 20, 1024),
    "1558M": (48, 1600, 25, 1024),
}
GPT2_VOCAB = 50257
GPT2_EOS = 50256


def hf_config(shape, context_length=None):
    """A transformers GPT2Config of a named shape, dropout 0 (inference and timing)."""
    from transformers import GPT2Config
    n_layer, n_embd, n_head, n_pos = SHAPES[shape]
    return GPT2Config(vocab_size=GPT2_VOCAB, n_positions=context_length or n_pos,
                      n_embd=n_embd, n_layer=n_layer, n_head=n_head, resid_pdrop=0.0,
                      embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=GPT2_EOS,
                      eos_token_id=GPT2_EOS, pad_token_id=GPT2_EOS)


def quiet_transformers():
    import transformers
    transformers.logging.set_verbosity_error()
    try:
        transformers.logging.disable_progress_bar()
    except AttributeError:
        pass


def build_pair(shape, seed=0, context_length=None):
    """(ours, hf): a random GPT2LMHeadModel and a GPTModel holding the same weights.

    Our config comes from the HF config through download_weights_hf.config_from_hf, and the
    weights through download_weights_hf.load_weights_into_gpt, the project's own converter.
    """
    import torch
    from transformers import GPT2LMHeadModel

    from download_weights_hf import config_from_hf, load_weights_into_gpt
    from model import GPTModel

    torch.manual_seed(seed)
    hf = GPT2LMHeadModel(hf_config(shape, context_length)).eval()
    cfg = config_from_hf(hf.config.to_dict())
    ours = load_weights_into_gpt(GPTModel(cfg), hf).eval()
    return ours, hf
