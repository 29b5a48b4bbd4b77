"""Which fast path runs on this machine: what the CPU can do says whether one can run, the
clock says whether it does.

A fast path that wins on one CPU can lose on another: oneDNN's fp32 products ran at 2.2x
MKL's speed on an AMD EPYC and at 0.43-0.95x on an Intel Xeon; bf16 products of one row were
fast on one and slow on the other. So each path that can lose somewhere is timed against the
code it replaces, the first time it is needed on a machine, on the shapes that matter (GPT-2
124M's matrices, in more bytes than the CPU's last-level cache holds, or the model being
decoded), and the answer is kept:

    pick(name, setup, allowed)   -> the label of the candidate that runs here

``setup()`` returns {label: fn} for every candidate that can run here, the plain code first
(each fn runs one repeat of its candidate), or a context manager giving it (what it holds is
let go after the timing); ``allowed`` the labels the switches leave (a
forced flag leaves one: then nothing is timed). Each candidate is called once to warm up,
then REPEATS times, interleaved (a, b, b, a, ...: a machine that gets busier part-way slows
both alike), and the median of each is kept. The first allowed label is the baseline: another
is picked only where it is MARGIN (3%) faster, so that noise cannot switch a path on.

The times are kept in ``choices-<key>.json`` in the cache folder (native.cache_folder():
``$GPT2_KERNEL_CACHE`` or ~/.cache/gpt2-from-scratch, beside the compiled kernels), where
the key hashes the CPU's model name and flags, the torch version and the engine's C sources:
a change of any of them measures anew. Each decision is kept per thread count, and only
when the machine was not busy (load average above the CPU count) and the repeats agreed (no
candidate's slowest over 1.5x its fastest): else it is used by this process and timed again
by the next. The file is written atomically, under a lock file, so that the processes of a
torchrun job measure once (the others wait, then read); a file that cannot be read is
measured anew, never trusted.
When a decision is measured one line says so, on stderr:

    batch-1 decoding (fp32, 12 x 768): one-call C kernel, 1.80x plain on this CPU

Switch: ``GPT2_FAST_PATHS`` before Python starts (or ``MODE``): "measure" (the default),
"on" (every candidate that can run is taken without timing: the most specialised one, the
last; the tests run so), "off" (the plain code wherever a choice is made). Each path's own
flag (cpu_kernels.ONEDNN_FP32, decoder.ONE_CALL, ...) wins over all of this: True or False
is used as it is, None (the default) means "choose here".
"""

import contextlib
import hashlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from engine import devices, native
from engine.devices import cpu_model
from engine.fileio import atomic_write

MODE = os.environ.get("GPT2_FAST_PATHS", "measure")
MODES = ("measure", "on", "off")
MARGIN = 1.03           # a fast path must be at least 3% faster than the baseline
REPEATS = 5
BUDGET = 0.5            # seconds a decision may take: past it, 3 repeats are enough
FORMAT = 1              # of the file; a new one measures anew
CLOCK = time.perf_counter
# Bytes the decoding measurements stream through (None: twice the last-level cache, at
# least 64 MiB): weights that fit in the cache would time the arithmetic, not the memory
# reads that decoding is bound by.
WORKING_SET = None

SEEN = {}               # name -> (setup, keep_autocast) of each decision met (bench scripts)
_PICKED = {}            # (name, threads, allowed) -> label, this process
_TIMES = {}             # file entry -> {label: seconds} measured on a busy machine, this process
_NOTED = set()          # notes printed once


def pick(name, setup, allowed, keep_autocast=False):
    """The label among ``allowed`` (a sequence, the baseline first) that runs here; see the
    module. ``setup`` is called only when a measurement is needed; ``keep_autocast``: the
    candidates run under the caller's autocast (else with autocast off)."""
    allowed = tuple(allowed)
    SEEN[name] = (setup, keep_autocast)
    if len(allowed) == 1:
        return allowed[0]
    if MODE not in MODES:
        raise ValueError(f"GPT2_FAST_PATHS={MODE!r}: use one of {', '.join(MODES)}")
    if MODE != "measure":
        return allowed[-1] if MODE == "on" else allowed[0]
    key = (name, torch.get_num_threads(), allowed)
    if key not in _PICKED:
        times, measured = timings(name, setup, keep_autocast)
        _PICKED[key] = _fastest(times, allowed)
        if measured:
            timed = {a: times[a] for a in allowed if a in times}
            print(f"{name}: {describe(timed, _PICKED[key])}", file=sys.stderr, flush=True)
    return _PICKED[key]


def switch(flag, name, setup, plain, fast):
    """Whether the fast path of one of the engine's flags runs here: ``flag`` itself where it
    is set (True or False), else (None) the clock's pick between the labels ``plain`` and
    ``fast`` (``setup`` as pick's)."""
    if flag is not None:
        return bool(flag)
    return pick(name, setup, (plain, fast)) == fast


def _fastest(times, allowed):
    """The fastest label of ``allowed`` by ``times``; the baseline unless beaten by MARGIN."""
    timed = [label for label in allowed if label in times]
    if not timed:
        return allowed[0]
    best = min(timed, key=lambda label: times[label])
    base = allowed[0]
    if base in times and best != base and times[best] * MARGIN > times[base]:
        return base
    return best


def timings(name, setup, keep_autocast=False):
    """({label: median seconds} of every candidate of ``name`` on this machine, whether they
    were measured now): from the file when it holds them, else measured (and written)."""
    entry = f"{name} [{torch.get_num_threads()} threads]"
    path = choices_path()
    found = _TIMES.get(entry) or _read(path).get(entry)
    if found is not None:
        return found, False
    with _locked(path):
        found = _read(path).get(entry)     # another process may have measured meanwhile
        if found is not None:
            return found, False
        load = busy()
        runs = measure_setup(setup, keep_autocast, whole=True)
        times = {label: statistics.median(s) for label, s in runs.items()}
        why = load or unsteady(runs)
        if why:
            # timings of a machine whose cores are shared out say little about the CPU
            # (threads that wait for each other lose most): used now, not kept
            _TIMES[entry] = times
            _note(f"note: this machine is busy ({why}): the fast paths are chosen by "
                  f"timings taken now, for this process only, and timed again next time",
                  key="busy")
        else:
            _write(path, entry, times)
    return times, True


def unsteady(runs):
    """'a candidate's repeats 2.1x apart' where one candidate's slowest repeat took over 1.5x
    its fastest (another job took the cores for part of the time), else ''."""
    worst = max(max(s) / min(s) if min(s) > 0 else float("inf") for s in runs.values())
    return f"a candidate's repeats {worst:.1f}x apart" if worst > 1.5 else ""


def busy():
    """'load 8.5 on 2 CPUs' where more threads were running than the machine has CPUs (the
    1-minute load average), else ''."""
    try:
        load, cpus = os.getloadavg()[0], os.cpu_count() or 1
    except (AttributeError, OSError):           # no load average (Windows)
        return ""
    return f"load {load:.1f} on {cpus} CPUs" if load > cpus else ""


def measure_setup(setup, keep_autocast=False, repeats=None, whole=False):
    """measure() of the candidates ``setup()`` makes (a dict, or a context manager giving
    one), as a decision is timed: no gradients, autocast off unless ``keep_autocast``.
    ``whole``: every repeat's seconds (repeats_of), not their medians."""
    with _as_measured(keep_autocast):
        made = setup()
        with made if hasattr(made, "__enter__") else contextlib.nullcontext(made) as fns:
            return (repeats_of if whole else measure)(fns, repeats)


@contextlib.contextmanager
def _as_measured(keep_autocast):
    # no gradients kept; the products timed in the dtypes they were made in, not as an
    # outer autocast block would change them
    with torch.inference_mode(), (contextlib.nullcontext() if keep_autocast
                                  else torch.autocast("cpu", enabled=False)):
        yield


def measure(candidates, repeats=None):
    """{label: median seconds of one call} of ``candidates`` {label: fn} (repeats_of)."""
    runs = repeats_of(candidates, repeats)
    return {label: statistics.median(s) for label, s in runs.items()}


def repeats_of(candidates, repeats=None):
    """{label: [seconds of each timed call]} of ``candidates`` {label: fn}: one warm-up call
    each, then ``repeats`` calls each (fewer, at least 3, once BUDGET seconds are spent),
    interleaved, the order reversed every other round."""
    repeats = repeats or REPEATS
    clock = CLOCK                   # read now: the tests replace it
    labels = list(candidates)
    seconds = {label: [] for label in labels}
    start = clock()
    for label in labels:
        candidates[label]()
    for r in range(repeats):
        for label in labels if r % 2 == 0 else labels[::-1]:
            t0 = clock()
            candidates[label]()
            seconds[label].append(clock() - t0)
        if r >= 2 and clock() - start > BUDGET:
            break
    return seconds


def describe(times, chosen=None):
    """'own C kernel, 1.80x plain on this CPU (oneDNN packed 1.20x)' for {label: seconds}:
    the fastest (or ``chosen``) against the first, the baseline."""
    labels = list(times)
    base = labels[0]
    chosen = chosen or _fastest(times, labels)
    if len(labels) == 1:
        return f"{base} (the only one that runs here)"
    others = [f"{label} {times[base] / times[label]:.2f}x" for label in labels[1:]
              if label != chosen]
    if chosen == base:
        text = f"{base} (the others: {', '.join(others)} of its speed; need {MARGIN:.2f}x)"
    else:
        text = f"{chosen}, {times[base] / times[chosen]:.2f}x {base} on this CPU"
        if others:
            text += f" ({', '.join(others)})"
    return text


def picked():
    """{decision: label} of the choices this process made by the clock."""
    return {name: label for (name, _, _), label in _PICKED.items()}


def summary():
    """{decision: {label: seconds}} as this machine's file holds them (bench scripts print
    them)."""
    return _read(choices_path())


# ---------------------------------------------------------------------------------------
# The file

def machine_key():
    """What a measurement holds for: the CPU (model name, flags), torch (its version, the
    vectors its kernels use, whether oneDNN has bf16 products: ATEN_CPU_CAPABILITY and
    ONEDNN_MAX_CPU_ISA change them), the C kernels (their sources and the vectors they are
    built for, native.kernel_isa())."""
    parts = [f"format {FORMAT}", cpu_model(), " ".join(sorted(native.cpu_flags())),
             torch.__version__, torch.backends.cpu.get_cpu_capability(),
             str(devices.onednn_bf16()), str(native.kernel_isa())]
    engine = Path(__file__).parent
    for source in sorted([*engine.glob("*.c"), *engine.glob("*.h")]):
        parts.append(hashlib.sha256(source.read_bytes()).hexdigest())
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def choices_path():
    return native.cache_folder() / f"choices-{machine_key()}.json"


def _read(path):
    """{decision: {label: seconds}} from ``path``; {} where it is missing or not whole."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        return {}
    choices = data.get("choices")
    if not isinstance(choices, dict):
        return {}
    good = {}
    for entry, times in choices.items():
        if (isinstance(times, dict) and len(times) >= 2
                and all(isinstance(t, (int, float)) and 0 < t < float("inf")
                        for t in times.values())):
            good[entry] = {label: float(t) for label, t in times.items()}
    return good


def _write(path, entry, times):
    data = {**_read(path), entry: times}
    text = json.dumps({"format": FORMAT, "cpu": cpu_model(),
                       "torch": torch.__version__, "choices": data}, indent=1)
    try:
        atomic_write(path, lambda f: f.write(text.encode()))
    except OSError as e:
        _note(f"note: the fast paths' timings cannot be kept in {path.parent} ({e}); they "
              f"will be measured again next time (set GPT2_KERNEL_CACHE to a writable folder)")


_HELD = []       # the lock's descriptor while this process holds it


@contextlib.contextmanager
def _locked(path):
    """Hold ``<path>.lock`` (an flock, which ends with its process however that ends; a
    measurement inside another's setup does not take it twice). Without one (no fcntl, a
    folder that cannot be written) the block runs unlocked: two processes may then both
    measure, and the file stays whole either way."""
    if _HELD:
        yield
        return
    try:
        import fcntl
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path.with_suffix(".lock"), os.O_RDWR | os.O_CREAT, 0o666)
    except (ImportError, OSError):
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        _HELD.append(fd)
        yield
    finally:
        _HELD.clear()
        os.close(fd)


def _note(text, key=None):
    """Print ``text`` once a process (once per ``key``, where given)."""
    if (key or text) not in _NOTED:
        _NOTED.add(key or text)
        print(text, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------
# The shapes that matter

# The four matrices of a block of GPT-2 124M, (in, out): qkv, the projection, the MLP's
# two; and its output head, (vocab, C)
BLOCK_124M = ((768, 2304), (768, 768), (768, 3072), (3072, 768))
HEAD_124M = (50257, 768)


def working_set():
    """Bytes a decoding measurement streams: WORKING_SET, else twice the last-level cache
    (at least 64 MiB)."""
    if WORKING_SET:
        return WORKING_SET
    size = 32 << 20
    try:
        text = Path("/sys/devices/system/cpu/cpu0/cache/index3/size").read_text().strip()
        size = int(text[:-1]) << {"K": 10, "M": 20}[text[-1]]
    except (OSError, ValueError, KeyError, IndexError):
        pass
    return max(2 * size, 64 << 20)


def filled(shape, dtype, generator=None):
    """A tensor of ``shape`` holding small random numbers (int8: -127..127), made by
    repeating one random MiB: speed does not depend on which numbers they are, and random
    fills of hundreds of MB would cost more than the measurement."""
    g = generator or torch.Generator().manual_seed(0)
    n = 1
    for s in shape:
        n *= s
    piece = min(n, 1 << 18)
    if dtype == torch.int8:
        small = torch.randint(-127, 128, (piece,), generator=g, dtype=torch.int8)
    else:
        small = ((torch.rand(piece, generator=g) - 0.5) * 0.1).to(dtype)
    out = torch.empty(n, dtype=dtype)
    whole = n // piece * piece
    out[:whole].view(-1, piece).copy_(small)
    out[whole:] = small[:n - whole]
    return out.view(shape)


def block_matrices(dtype, out_in=False):
    """GPT-2 124M's block matrices in ``dtype``, (in, out) (or (out, in)), repeated until
    they take working_set() bytes: what one decoding step streams."""
    per_block = sum(i * o for i, o in BLOCK_124M) * torch.empty((), dtype=dtype).element_size()
    copies = max(1, -(-working_set() // per_block))
    g = torch.Generator().manual_seed(0)
    return [filled((o, i) if out_in else (i, o), dtype, g)
            for _ in range(copies) for i, o in BLOCK_124M]
