"""bench/choice_speed.py's bookkeeping: the old vendor table it compares with, whether a pick
agrees with a re-timing, every decision met, and its SUMMARY (the timings need a quiet
machine: the script, not the tests)."""

import sys

import pytest
import transformers.models.gpt2.modeling_gpt2  # noqa: F401  (before bench/ is on sys.path)

from conftest import CLOCK_FLAGS, ROOT, set_clock_flags
from engine import attention, cpu_kernels, decoder, devices, fused_loss, gelu, int8, pages, tuning

_path = list(sys.path)
sys.path.insert(0, str(ROOT / "bench"))
import choice_speed  # noqa: E402

sys.path[:] = _path


def test_the_vendor_table_it_compares_with():
    amd = choice_speed.vendor_table("AuthenticAMD")
    intel = choice_speed.vendor_table("GenuineIntel")
    other = choice_speed.vendor_table("")
    # the table had every path on for AMD, but weights in 4 KiB pages, fp32 int8 prompts
    # on dequantized weights, PyTorch's training attention, loss rows, head weight gradient,
    # GELU and greedy argmax everywhere
    assert {k for k, v in amd.items() if not v} == {("pages", "HUGE_PAGES"),
                                                    ("int8", "BF16_ROWS"),
                                                    ("attention", "BLOCKED"),
                                                    ("fused_loss", "C_ROWS"),
                                                    ("fused_loss", "SPLIT"),
                                                    ("gelu", "C_PASS"),
                                                    ("cpu_kernels", "OWN_ARGMAX")}
    assert {k for k, v in intel.items() if v} == {("cpu_kernels", "PACKING"),
                                                  ("cpu_kernels", "SCREENED_HEAD")}
    assert other[("cpu_kernels", "ONEDNN_FP32")] and not other[("decoder", "ONE_CALL")]
    # it sets every flag the clock chooses, each of which exists
    assert sorted(amd) == sorted(CLOCK_FLAGS)
    modules = {"cpu_kernels": cpu_kernels, "int8": int8, "decoder": decoder, "pages": pages,
               "attention": attention, "fused_loss": fused_loss, "gelu": gelu}
    for module, flag in amd:
        assert hasattr(modules[module], flag)


def test_a_pick_agrees_when_it_is_the_fastest_within_the_margin():
    row = choice_speed.decision_row("d", "fast", {"plain": 1.0, "fast": 0.5})
    assert row["agrees"] and row["fastest"] == "fast" and row["pick_vs_plain"] == 2.0
    assert choice_speed.decision_row("d", "plain", {"plain": 1.0, "fast": 0.98})["agrees"]
    assert not choice_speed.decision_row("d", "plain", {"plain": 1.0, "fast": 0.9})["agrees"]


def test_every_decision_is_met_with_the_flags_left_to_the_clock(monkeypatch):
    set_clock_flags(monkeypatch, None)
    monkeypatch.setattr(tuning, "MODE", "measure")
    monkeypatch.setattr(tuning, "_PICKED", {})
    monkeypatch.setattr(tuning, "timings", lambda name, setup, keep=False: (
        {label: 1.0 + i for i, label in enumerate(
            ["torch.mm", "oneDNN", "rows of 50257", "rows padded to 64", cpu_kernels.PLAIN,
             cpu_kernels.PACKED, cpu_kernels.OWN, "fp32 logits", "bf16-screened",
             "PyTorch's int8 kernels", "int8_kernel.c", "weight-only int8", "gemm_q8",
             pages.SMALL_LABEL, pages.HUGE_LABEL, "dequantized fp32", "bf16 matmul",
             attention.PLAIN, attention.OURS, fused_loss.TORCH_ROWS,
             fused_loss.C_ROWS_LABEL, fused_loss.WHOLE_LABEL, fused_loss.SPLIT_LABEL,
             gelu.TORCH_GELU, gelu.C_PASS_LABEL, "torch.argmax"])},
        False))
    picked = choice_speed.meet_every_decision()
    if not cpu_kernels.available():
        pytest.skip("oneDNN on x86 is not available here")
    assert {"fp32 products (training)", "output head logits (bf16, training)",
            "decoding products (fp32, 1 row)", "greedy head (fp32, 1 row)"} <= set(picked)
    # bf16 copies of 8 rows only where oneDNN has bf16 products (not on an AVX2 CPU)
    assert ({"decoding products (bf16, 8 rows)", "greedy head (fp32, 8 rows)"} <= set(picked)
            ) is devices.onednn_bf16()
    assert picked["fp32 products (training)"] == "torch.mm"      # the faster here
    if pages.available():
        assert picked["weights for decoding"] == pages.SMALL_LABEL
    assert picked["int8 products (fp32 rows: 64)"] == "dequantized fp32"
    if attention.kernel() is not None:
        assert picked["training attention (bf16, dropout, 12 heads x 1024 x 64, batch 1)"] \
            == attention.PLAIN
        assert sum(name.startswith("training attention (") for name in picked) == 4
    if fused_loss.kernel() is not None:
        assert picked["training loss rows (bf16, 256 x 50257 logits)"] == fused_loss.TORCH_ROWS
        assert sum(name.startswith("training loss rows (") for name in picked) == 2
    if devices.onednn_bf16():
        assert picked["training head's weight gradient (bf16, 256 x 50257 x 768)"] == \
            fused_loss.WHOLE_LABEL
    if cpu_kernels.own_gemv() is not None:      # decode_kernel.c, also the argmax's
        assert picked["greedy argmax (fp32, 1 row of 50257)"] == cpu_kernels.OWN
    if gelu.kernel() is not None:
        assert picked["training GELU (bf16, 1024 x 3072)"] == gelu.TORCH_GELU
        assert sum(name.startswith("training GELU (") for name in picked) == 2


def test_the_summary_line():
    rows = [{"agrees": True}, {"agrees": False}]
    results = {("fp32", "measured"): {"tok_s": 60.0}, ("fp32", "before"): {"tok_s": 60.5}}
    line = choice_speed.summarize(rows, results, ["fp32"], quick=False)
    assert line == ("SUMMARY choice_speed: decisions picking the faster 1/2; b1 fp32 60.0 tok/s "
                    "= measured/before 0.99x (>= 0.97x PASS); 1/2 targets met")
    # without the vendor table (--as-avx2's default): against the plain code
    results = {("int8", "plain"): {"tok_s": 50.0}, ("int8", "measured"): {"tok_s": 150.0}}
    assert choice_speed.summarize([], results, ["int8"], quick=False) == (
        "SUMMARY choice_speed: b1 int8 150.0 tok/s = measured/plain 3.00x (>= 0.97x PASS); "
        "1/1 targets met")


def test_as_avx2_starts_again_with_the_cpu_seen_as_an_avx2_one(monkeypatch):
    import common
    started = []
    monkeypatch.setattr(choice_speed.os, "execve", lambda *a: started.append(a) or sys.exit(0))
    for k in common.AVX2_ENV:
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(SystemExit):
        choice_speed.main(["--as-avx2", "--quick", "--only", "decoding"])
    (exe, argv, env), = started
    assert exe == sys.executable and argv[1:] == [choice_speed.__file__, "--as-avx2",
                                                  "--quick", "--only", "decoding"]
    assert {k: env[k] for k in common.AVX2_ENV} == common.AVX2_ENV
    assert env["ONEDNN_MAX_CPU_ISA"] == "AVX2" and env["GPT2_KERNEL_ISA"] == "avx2"
    for k, v in common.AVX2_ENV.items():                    # started so: it goes on
        monkeypatch.setenv(k, v)
    monkeypatch.setattr("engine.native._DECODE", None)      # built for AVX2 in this test only
    assert common.seen_as_avx2() and "seen as an AVX2 CPU" in common.vectors_line()
