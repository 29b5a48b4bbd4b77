"""engine/tuning.py: each fast path chosen by the clock where it runs. The measurement with a
clock of the test's own (it picks the faster, by a margin, from interleaved medians), the file
that keeps the timings (per CPU, torch and C sources; a broken file measured anew; processes
that race measure once), the switches, and each fast path's wiring and candidates."""

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, answered_clock, flag_in_a_fresh_process, set_clock_flags, small_gpt
from engine import cpu_kernels, decoder, int8, native, pages, tuning


class FakeClock:
    """A clock that moves only when a candidate runs: by the seconds that candidate is given
    (a list: one per call, the last one repeated)."""

    def __init__(self, monkeypatch, **seconds):
        self.now, self.seconds, self.calls = 0.0, seconds, []
        monkeypatch.setattr(tuning, "CLOCK", lambda: self.now)

    def candidates(self):
        def run(label):
            def fn():
                times = self.seconds[label]
                self.now += times[min(sum(c == label for c in self.calls), len(times) - 1)]
                self.calls.append(label)
            return fn
        return {label: run(label) for label in self.seconds}


def _fresh_process(monkeypatch):
    """What a new process starts with: nothing picked, nothing measured in memory."""
    monkeypatch.setattr(tuning, "_PICKED", {})
    monkeypatch.setattr(tuning, "_TIMES", {})


def test_picks_the_faster_and_keeps_it_for_the_next_process(measuring, monkeypatch, capsys):
    clock = FakeClock(monkeypatch, plain=[1.0], fast=[0.8])
    setups = []

    def setup():
        setups.append(1)
        return clock.candidates()
    assert tuning.pick("a choice", setup, ("plain", "fast")) == "fast"
    # one warm-up each, then 5 rounds, the order reversed every other round
    assert clock.calls == ["plain", "fast"] + ["plain", "fast", "fast", "plain"] * 2 + \
        ["plain", "fast"]
    assert capsys.readouterr().err == "a choice: fast, 1.25x plain on this CPU\n"
    (path,) = measuring.glob("choices-*.json")
    assert path == tuning.choices_path()
    saved = json.loads(path.read_text())
    threads = torch.get_num_threads()
    assert saved["choices"] == {f"a choice [{threads} threads]": {"plain": 1.0,
                                                                  "fast": pytest.approx(0.8)}}
    assert saved["torch"] == torch.__version__
    # the same process asks again, then another process: nothing is timed, nothing printed
    assert tuning.pick("a choice", setup, ("plain", "fast")) == "fast"
    _fresh_process(monkeypatch)
    assert tuning.pick("a choice", setup, ("plain", "fast")) == "fast"
    assert setups == [1] and capsys.readouterr().err == ""
    # other allowed candidates (a switch set) use the same timings
    assert tuning.pick("a choice", setup, ("fast", "plain")) == "fast"
    # another thread count is another decision
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads + 1)
    assert tuning.pick("a choice", setup, ("plain", "fast")) == "fast"
    assert setups == [1, 1]


@pytest.mark.parametrize("fast, picked", [(0.98, "plain"), (0.97, "fast"), (1.2, "plain")])
def test_the_fast_path_must_win_by_the_margin(measuring, monkeypatch, fast, picked):
    clock = FakeClock(monkeypatch, plain=[1.0], fast=[fast])
    assert tuning.pick("a choice", clock.candidates, ("plain", "fast")) == picked


def test_three_candidates_and_the_message_for_the_baseline(measuring, monkeypatch, capsys):
    clock = FakeClock(monkeypatch, plain=[1.0], packed=[0.5], own=[0.4])
    assert tuning.pick("three", clock.candidates, ("plain", "packed", "own")) == "own"
    assert capsys.readouterr().err == "three: own, 2.50x plain on this CPU (packed 2.00x)\n"
    # copies forced (plain not allowed): own against packed, from the same timings
    assert tuning.pick("three", clock.candidates, ("packed", "own")) == "own"
    clock = FakeClock(monkeypatch, plain=[1.0], fast=[1.01])
    assert tuning.pick("lost", clock.candidates, ("plain", "fast")) == "plain"
    assert capsys.readouterr().err == \
        "lost: plain (the others: fast 0.99x of its speed; need 1.03x)\n"


def test_a_busy_moment_does_not_decide(measuring, monkeypatch):
    # the median of interleaved repeats: a repeat slowed by another job (the 5.0) is outvoted
    clock = FakeClock(monkeypatch, plain=[1.0], fast=[0.9, 0.9, 5.0, 0.9, 0.9, 0.9])
    assert tuning.pick("noisy", clock.candidates, ("plain", "fast")) == "fast"
    # ... and, the repeats of a candidate 5.6x apart, the timings are used, not kept
    assert not list(measuring.glob("choices-*.json"))
    clock = FakeClock(monkeypatch, plain=[1.0, 1.0, 1.0, 1.4], fast=[0.9])    # 1.4x: kept
    tuning.pick("steady", clock.candidates, ("plain", "fast"))
    assert list(measuring.glob("choices-*.json"))
    # past the time budget, 3 rounds are enough
    monkeypatch.setattr(tuning, "BUDGET", 2.0)
    clock = FakeClock(monkeypatch, plain=[1.0], fast=[0.5])
    assert tuning.measure(clock.candidates()) == {"plain": 1.0, "fast": 0.5}
    assert len(clock.calls) == 2 + 3 * 2
    assert tuning.unsteady({"a": [1.0, 1.2], "b": [0.5, 1.1]}) == "a candidate's repeats 2.2x apart"
    assert tuning.unsteady({"a": [1.0, 1.2], "b": [0.5, 0.6]}) == ""


def test_a_busy_machine_measures_for_this_process_only(measuring, monkeypatch, capsys):
    monkeypatch.setattr(tuning, "busy", lambda: "load 9.0 on 2 CPUs")
    clock = FakeClock(monkeypatch, plain=[1.0], fast=[0.5])
    assert tuning.pick("a choice", clock.candidates, ("plain", "fast")) == "fast"
    assert "this machine is busy (load 9.0 on 2 CPUs)" in capsys.readouterr().err
    assert not list(measuring.glob("choices-*.json"))
    calls = len(clock.calls)
    monkeypatch.setattr(tuning, "_PICKED", {})
    assert tuning.pick("a choice", clock.candidates, ("fast", "plain")) == "fast"
    assert len(clock.calls) == calls                   # kept in this process
    _fresh_process(monkeypatch)
    tuning.pick("a choice", clock.candidates, ("plain", "fast"))
    assert len(clock.calls) == 2 * calls               # timed again: a new process


def test_another_cpu_or_torch_measures_anew(measuring, monkeypatch):
    clock = FakeClock(monkeypatch, plain=[1.0], fast=[0.5])
    tuning.pick("a choice", clock.candidates, ("plain", "fast"))
    first = tuning.choices_path()
    calls = len(clock.calls)
    _fresh_process(monkeypatch)
    monkeypatch.setattr(native, "cpu_flags", lambda: {"avx2", "fma"})     # another CPU
    tuning.pick("a choice", clock.candidates, ("plain", "fast"))
    assert tuning.choices_path() != first and len(clock.calls) == 2 * calls
    _fresh_process(monkeypatch)
    monkeypatch.setattr(torch, "__version__", "9.9.9")                   # another torch
    tuning.pick("a choice", clock.candidates, ("plain", "fast"))
    assert len(clock.calls) == 3 * calls and len(list(measuring.glob("choices-*.json"))) == 3


@pytest.mark.parametrize("damage", ["not json {", '{"format": 1, "choices": []}',
                                    '{"format": 0, "choices": {}}', "negative", ""])
def test_a_damaged_file_is_measured_anew(measuring, monkeypatch, damage):
    clock = FakeClock(monkeypatch, plain=[1.0], fast=[0.5])
    path = tuning.choices_path()
    entry = f"a choice [{torch.get_num_threads()} threads]"
    if damage == "negative":
        # a whole file with one bad entry: that entry is measured, the others kept
        damage = json.dumps({"format": 1, "choices": {
            entry: {"plain": -1.0, "fast": 0.5}, "other [1 threads]": {"a": 1.0, "b": 2.0}}})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(damage)
    assert tuning.pick("a choice", clock.candidates, ("plain", "fast")) == "fast"
    assert clock.calls
    saved = json.loads(path.read_text())["choices"]
    assert saved[entry] == {"plain": 1.0, "fast": pytest.approx(0.5)}
    if "other [1 threads]" in damage:
        assert saved["other [1 threads]"] == {"a": 1.0, "b": 2.0}


def test_a_folder_that_cannot_be_written(measuring, monkeypatch, capsys):
    blocker = measuring / "a file"
    blocker.write_text("")
    monkeypatch.setenv("GPT2_KERNEL_CACHE", str(blocker / "cache"))
    clock = FakeClock(monkeypatch, plain=[1.0], fast=[0.5])
    assert tuning.pick("a choice", clock.candidates, ("plain", "fast")) == "fast"
    err = capsys.readouterr().err
    assert "cannot be kept in" in err and "GPT2_KERNEL_CACHE" in err


def test_modes_and_single_candidates_time_nothing(measuring, monkeypatch):
    def setup():
        raise AssertionError("nothing should be timed")
    assert tuning.pick("forced", setup, ("fast",)) == "fast"
    monkeypatch.setattr(tuning, "MODE", "on")
    assert tuning.pick("a", setup, ("plain", "packed", "own")) == "own"
    monkeypatch.setattr(tuning, "MODE", "off")
    assert tuning.pick("a", setup, ("plain", "packed", "own")) == "plain"
    monkeypatch.setattr(tuning, "MODE", "fast")
    with pytest.raises(ValueError, match="GPT2_FAST_PATHS='fast': use one of measure, on, off"):
        tuning.pick("a", setup, ("plain", "fast"))


def test_the_switches_read_from_the_environment():
    code = ("from engine import cpu_kernels, decoder, int8, tuning; print(tuning.MODE, "
            "decoder.ONE_CALL, cpu_kernels.ONEDNN_FP32, cpu_kernels.OWN_GEMV, "
            "int8.DYNAMIC_Q8, int8.OWN_KERNEL)")

    def fresh(**environment):
        env = {**os.environ, **environment}
        return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, check=True,
                              capture_output=True, text=True).stdout.split()
    assert fresh(GPT2_FAST_PATHS="measure") == ["measure"] + ["None"] * 5
    assert fresh(GPT2_FAST_PATHS="off", GPT2_ONE_CALL_DECODING="1") == \
        ["off", "True"] + ["None"] * 4
    assert flag_in_a_fresh_process("decoder", "ENABLED", GPT2_ONE_CALL_DECODING="0") == "False"


def test_processes_that_race_measure_once(measuring):
    # two processes (torchrun's ranks) meet the same choice at once: one measures (slowly),
    # the other waits for the lock and reads its timings
    log = measuring / "measured.txt"
    code = f"""
import sys, time
from engine import tuning
tuning.MODE, tuning.busy, tuning.unsteady = "measure", lambda: "", lambda runs: ""
def setup():
    with open({str(log)!r}, "a") as f:
        f.write("measured\\n")
    time.sleep(0.5)
    return {{"plain": lambda: time.sleep(0.02), "fast": lambda: None}}
print(tuning.pick("raced", setup, ("plain", "fast")))
"""
    env = {**os.environ, "GPT2_KERNEL_CACHE": str(measuring)}
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert [out.strip() for out, _ in outs] == ["fast", "fast"]
    assert log.read_text() == "measured\n"
    assert sum("raced: fast" in err for _, err in outs) == 1


# ---------------------------------------------------------------------------------------
# Each fast path's wiring: the flag when set, else the pick, from its own candidates

def test_each_flag_left_to_the_clock_follows_its_pick(measuring, monkeypatch):
    set_clock_flags(monkeypatch, None)
    fast = {"torch.mm": 1.0, "oneDNN": 0.5, "rows of 50257": 1.0, "rows padded to 64": 0.5,
            cpu_kernels.PLAIN: 1.0, cpu_kernels.PACKED: 0.6, cpu_kernels.OWN: 0.5,
            "fp32 logits": 1.0, "bf16-screened": 0.5, "PyTorch's int8 kernels": 1.0,
            "int8_kernel.c": 0.5, "weight-only int8": 1.0, "gemm_q8": 0.5,
            pages.SMALL_LABEL: 1.0, pages.HUGE_LABEL: 0.5, "dequantized fp32": 1.0,
            "bf16 matmul": 0.5}
    asked = answered_clock(monkeypatch, fast)
    own = cpu_kernels.own_gemv() is not None
    assert cpu_kernels.onednn_fp32() is cpu_kernels.available()
    assert cpu_kernels.aligned_logits(torch.bfloat16)
    assert cpu_kernels.copy_kind(torch.float32, 1) == (cpu_kernels.OWN if own else
                                                       cpu_kernels.PACKED)
    assert cpu_kernels.copy_kind(torch.bfloat16, 8) == (
        cpu_kernels.PACKED if cpu_kernels.onednn_packs(torch.bfloat16) else cpu_kernels.PLAIN)
    assert cpu_kernels.screened_head(1)
    assert int8.own_kernel_on() is (int8.own_kernel() is not None)
    assert int8.dynamic_q8_on() is int8.dynamic_q8_on(8) is (int8.q8_kernel() is not None)
    assert "int8 products (fp32 rows: 8)" in asked or int8.q8_kernel() is None
    assert pages.chosen() is pages.available()
    assert int8.bf16_rows_on()
    assert "decoding products (fp32, 1 row)" in asked and "greedy head (fp32, 1 row)" in asked
    # every one slower: the plain code everywhere
    _fresh_process(monkeypatch)
    answered_clock(monkeypatch, {k: (1.0 if k in ("torch.mm", "rows of 50257", cpu_kernels.PLAIN,
                                             "fp32 logits", "PyTorch's int8 kernels",
                                             "weight-only int8", pages.SMALL_LABEL,
                                             "dequantized fp32")
                                   else 2.0) for k in fast})
    assert not cpu_kernels.onednn_fp32() and not cpu_kernels.aligned_logits(torch.float32)
    assert cpu_kernels.copy_kind(torch.float32, 1) == cpu_kernels.PLAIN
    assert not cpu_kernels.screened_head(8)
    assert not int8.own_kernel_on() and not int8.dynamic_q8_on() and not int8.dynamic_q8_on(8)
    assert not pages.chosen() and not int8.bf16_rows_on()
    assert int8.activation_dtype() == torch.bfloat16
    # ... unless a flag says
    monkeypatch.setattr(cpu_kernels, "ONEDNN_FP32", True)
    monkeypatch.setattr(cpu_kernels, "PACK_FP32_BATCH_1", True)
    assert cpu_kernels.onednn_fp32() is cpu_kernels.available()
    assert cpu_kernels.copy_kind(torch.float32, 1) != cpu_kernels.PLAIN
    monkeypatch.setattr(cpu_kernels, "PACKING", False)          # off: PACK_FP32_BATCH_1 too
    assert cpu_kernels.copy_kind(torch.float32, 1) == cpu_kernels.PLAIN
    with cpu_kernels.disabled():
        assert not cpu_kernels.onednn_fp32()


@pytest.fixture
def counted_steps(monkeypatch):
    steps, call = [], decoder._OneToken.__call__
    monkeypatch.setattr(decoder._OneToken, "__call__",
                        lambda self, *args: steps.append(1) or call(self, *args))
    return steps


@pytest.mark.parametrize("products", [cpu_kernels.OWN, cpu_kernels.PACKED])
@pytest.mark.parametrize("won", [True, False])
def test_one_call_decoding_is_timed_on_the_model_it_decodes(measuring, monkeypatch,
                                                            counted_steps, won, products):
    # the one-call steps need OneRow copies: where the products alone would take others,
    # whole steps are timed (one-call with OneRow copies against model.py's code with the
    # others), and the winner's copies are made
    from generate import generate_text
    try:
        native.decode_kernels()
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        pytest.skip(f"decode_kernel.c cannot be built here: {e}")
    if products == cpu_kernels.PACKED and not cpu_kernels.onednn_packs(torch.float32):
        pytest.skip("no oneDNN-packed copies here (oneDNN on x86 only)")
    for flag in ("PACKING", "PACK_FP32_BATCH_1", "OWN_GEMV", "SCREENED_HEAD"):
        monkeypatch.setattr(cpu_kernels, flag, None)
    monkeypatch.setattr(decoder, "ONE_CALL", None)
    times = {"plain": 1.0, "one-call C kernel": 0.5 if won else 0.99, "fp32 logits": 1.0,
             "bf16-screened": 2.0, cpu_kernels.PLAIN: 1.0, cpu_kernels.PACKED: 0.5,
             cpu_kernels.OWN: 0.4 if products == cpu_kernels.OWN else 0.6}
    asked = answered_clock(monkeypatch, times)
    model = small_gpt()
    prompt = torch.tensor([[1, 2, 3]])
    kinds = []
    packed_for_cpu = cpu_kernels.packed_for_cpu

    def spy(model, batch_size=8, greedy=False, kind=None):
        kinds.append(kind)
        return packed_for_cpu(model, batch_size, greedy, kind)
    monkeypatch.setattr(cpu_kernels, "packed_for_cpu", spy)
    out = generate_text(model, prompt, 5, eos_id=None)
    assert "batch-1 decoding (fp32, 2 x 32)" in asked
    assert len(counted_steps) == (4 if won else 0)
    # the copies made: copy_kind's, or OneRow ones for the one-call steps that won
    assert kinds == [cpu_kernels.OWN if won and products != cpu_kernels.OWN else None]
    monkeypatch.undo()
    with decoder.disabled():
        assert torch.equal(out, generate_text(model, prompt, 5, eos_id=None))


@pytest.mark.parametrize("products", [cpu_kernels.OWN, cpu_kernels.PACKED])
def test_one_call_timing_on_a_model_with_the_real_clock(measuring, monkeypatch, capsys,
                                                        products):
    # the candidates decoding() times run (on a scratch cache; for PACKED products in two
    # sessions at once), and the timings are kept
    from generate import generate_text
    try:
        native.decode_kernels()
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        pytest.skip(f"decode_kernel.c cannot be built here: {e}")
    for flag in ("PACKING", "PACK_FP32_BATCH_1", "OWN_GEMV"):
        monkeypatch.setattr(cpu_kernels, flag, None)
    monkeypatch.setattr(decoder, "ONE_CALL", None)
    monkeypatch.setattr(pages, "HUGE_PAGES", False)            # not this test's choice
    monkeypatch.setattr(tuning, "unsteady", lambda runs: "")   # a busy machine's timings kept
    real = tuning.timings

    def timings(name, setup, keep_autocast=False):     # the products' choice given
        if name.startswith("decoding products"):
            return {cpu_kernels.PLAIN: 1.0, cpu_kernels.PACKED: 0.5,
                    cpu_kernels.OWN: 0.4 if products == cpu_kernels.OWN else 0.6}, False
        return real(name, setup, keep_autocast)
    monkeypatch.setattr(tuning, "timings", timings)
    model = small_gpt()
    prompt = torch.tensor([[1, 2, 3]])
    out = generate_text(model, prompt, 5, eos_id=None)
    assert capsys.readouterr().err.startswith("batch-1 decoding (fp32, 2 x 32): ")
    (entry,) = tuning.summary()
    assert entry.startswith("batch-1 decoding (fp32, 2 x 32) [")
    assert set(tuning.summary()[entry]) == {"plain", "one-call C kernel"}
    assert not cpu_kernels._IN_USE                  # both sessions closed
    with decoder.disabled(), cpu_kernels.disabled():
        assert torch.equal(out, generate_text(model, prompt, 5, eos_id=None))


# ---------------------------------------------------------------------------------------
# What each choice times: its candidates compute the same thing (on smaller shapes here)

@pytest.fixture
def small_shapes(monkeypatch):
    monkeypatch.setattr(tuning, "BLOCK_124M", ((64, 192), (64, 64), (64, 256), (256, 64)))
    monkeypatch.setattr(tuning, "HEAD_124M", (1000, 64))
    monkeypatch.setattr(tuning, "WORKING_SET", 1)              # one block


def _outputs(candidates):
    with torch.inference_mode():
        return {label: fn() for label, fn in candidates.items()}


def _flat(out):
    if isinstance(out, (list, tuple)):
        return torch.cat([o.float().flatten() for o in out])
    return out.float().flatten()


def test_the_float_candidates_compute_the_same(small_shapes):
    if not cpu_kernels.available():
        pytest.skip("oneDNN on x86 is not available here")
    out = _outputs(cpu_kernels._time_fp32_products())
    torch.testing.assert_close(_flat(out["oneDNN"]), _flat(out["torch.mm"]),
                               rtol=1e-5, atol=1e-5)
    for dtype in (torch.float32, torch.bfloat16):
        out = _outputs(cpu_kernels._time_head_rows(dtype))
        assert torch.equal(out["rows padded to 64"], out["rows of 50257"])
        for rows in (1, 8):
            out = _outputs(cpu_kernels._time_copies(dtype, rows))
            want = {cpu_kernels.PLAIN}
            if cpu_kernels.onednn_packs(dtype):
                want.add(cpu_kernels.PACKED)
            if rows == 1 and cpu_kernels.own_gemv() is not None:
                want.add(cpu_kernels.OWN)
            assert set(out) == want
            for label in want - {cpu_kernels.PLAIN}:
                tol = 1e-5 if dtype == torch.float32 else 2e-2
                torch.testing.assert_close(_flat(out[label]), _flat(out[cpu_kernels.PLAIN]),
                                           rtol=tol, atol=tol)
    for rows in (1, 8):
        if not cpu_kernels.screened_head(rows):          # no bf16 copy can be made here
            continue
        out = _outputs(cpu_kernels._time_screened_head(rows))
        assert out["bf16-screened"].tolist() == out["fp32 logits"].tolist()
    if pages.available():                 # the same products of the same numbers: equal
        out = _outputs(pages._time_pages())
        assert torch.equal(_flat(out[pages.HUGE_LABEL]), _flat(out[pages.SMALL_LABEL]))


def test_the_int8_candidates_compute_the_same(small_shapes):
    if int8.own_kernel() is None:
        pytest.skip(f"int8_kernel.c cannot be built here: {int8.KERNEL_STATUS}")
    out = _outputs(int8._time_own_kernel())
    torch.testing.assert_close(_flat(out["int8_kernel.c"]), _flat(out["PyTorch's int8 kernels"]),
                               rtol=2 ** -7, atol=1e-3)
    if int8.q8_kernel() is None:
        return
    out = _outputs(int8._time_bf16_rows())
    # the bf16 matmul rounds the rows and the sums to bf16: 2^-9 of each, at most
    torch.testing.assert_close(_flat(out["bf16 matmul"]), _flat(out["dequantized fp32"]),
                               rtol=2 ** -6, atol=1e-3)
    for rows in ((1, 2), (8,)):
        out = _outputs(int8._time_dynamic_q8(rows))
        plain, fast = _flat(out["weight-only int8"]), _flat(out["gemm_q8"])
        # gemm_q8 also rounds the rows to int8: within its rounding (test_engine_int8.py)
        assert (fast - plain).abs().max() < 0.04 * plain.std()
