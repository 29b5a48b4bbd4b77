"""bench/gpu_check.py's CPU side: the peak table, the MFU arithmetic and the FLOP formula it
shares with bench/train_speed.py, its argument checks, and a dry run of every part on the CPU
on tiny shapes (the GPU figures need a GPU)."""

import sys

import pytest
import torch
import transformers.models.gpt2.modeling_gpt2  # noqa: F401  (before bench/ is on sys.path)

from conftest import ROOT

_path = list(sys.path)
sys.path.insert(0, str(ROOT / "bench"))
import gpu_check  # noqa: E402
import train_speed  # noqa: E402

sys.path[:] = _path


@pytest.mark.parametrize("name, tflops", [
    ("NVIDIA H100 80GB HBM3", 989.5), ("NVIDIA H100 PCIe", 756.5), ("NVIDIA H100 NVL", 835.5),
    ("NVIDIA H200", 989.5), ("NVIDIA H200 NVL", 835.5), ("NVIDIA A100-SXM4-80GB", 312.0),
    ("NVIDIA A100 80GB PCIe", 312.0), ("NVIDIA L40S", 362.0), ("NVIDIA L4", 121.0),
    ("NVIDIA A10", 125.0)])
def test_the_bf16_peak_of_each_gpu_by_its_name(name, tflops):
    peak, source = gpu_check.bf16_peak(name)
    assert peak == tflops * 1e12 and "datasheet" in source


def test_an_unknown_gpu_has_no_peak():
    for name in ("NVIDIA A10G", "NVIDIA GeForce RTX 4090", "Tesla V100-SXM2-16GB"):
        peak, why = gpu_check.bf16_peak(name)
        assert peak is None and "--peak-tflops" in why and name in why


def test_mfu_and_the_shared_flop_formula():
    from model import GPT_CONFIG_124M, GPTModel
    assert gpu_check.flops_per_token is train_speed.flops_per_token
    assert gpu_check.mfu(1000.0, 6e8, 1e12) == pytest.approx(0.6)
    assert gpu_check.mfu(1000.0, 6e8, None) is None
    with torch.device("meta"):
        model = GPTModel(dict(GPT_CONFIG_124M, context_length=1024, qkv_bias=True))
    C, L, V, T = 768, 12, 50257, 1024
    block = (C * 3 * C + 3 * C) + (C * C + C) + (C * 4 * C + 4 * C) + (4 * C * C + C) + 4 * C
    n_nonemb = L * block + 2 * C              # the blocks and the final LayerNorm
    fpt, n = gpu_check.flops_per_token(model, T)
    assert n == n_nonemb
    assert fpt == 6 * n_nonemb + 6 * L * T * C + 6 * C * V


@pytest.mark.parametrize("argv, message", [
    (["--device", "cuda"], "--device cuda: this PyTorch sees no CUDA GPU"),
    (["--device", "mps"], "--device mps: use cuda, cuda:N or cpu"),
    (["--device", "cpu", "--nanogpt", "/no/such/model.py"], "--nanogpt /no/such/model.py: no "
                                                             "such file"),
    (["--device", "cpu", "--peak-tflops", "0"], "--peak-tflops must be > 0, got 0.0")])
def test_bad_arguments_are_one_line_each(argv, message, capsys):
    if "cuda" in argv and torch.cuda.is_available():
        pytest.skip("a GPU is here")
    with pytest.raises(SystemExit):
        gpu_check.main(argv)
    assert message in capsys.readouterr().err


def test_a_dry_run_on_the_cpu_runs_every_part(capsys):
    rows = gpu_check.main(["--device", "cpu", "--quick", "--no-compile"])
    out = capsys.readouterr().out
    by_part = {}
    for r in rows:
        by_part.setdefault(r["part"], []).append(r)
    assert list(by_part) == ["tests", "train", "nanoGPT", "train.py", "generate", "evaluate"]
    assert by_part["tests"][0]["result"].startswith("skipped")
    assert by_part["nanoGPT"][0]["result"] == "skipped (--nanogpt PATH)"
    (train,) = by_part["train"]
    assert train["result"] == "ok" and train["figure"].endswith("tok/s, MFU n/a")
    assert by_part["train.py"][0]["result"] == "ok"
    assert "final val loss" in by_part["train.py"][0]["figure"]
    assert [r["what"] for r in by_part["generate"]] == [
        "tiny fp32, batch 1, 16 + 8 tokens", "tiny fp32, batch 8, 16 + 8 tokens",
        "tiny bf16, batch 1, 16 + 8 tokens"]
    assert all(r["result"] == "ok" for r in by_part["generate"] + by_part["evaluate"])
    assert "greedy tokens = HF's: yes" in by_part["generate"][0]["figure"]
    assert "device: the CPU; bf16 peak no GPU peak" in out
    assert "part      what" in out and "SUMMARY gpu_check: 6 rows ok, 2 skipped, 0 failed" in out
