"""Shared fixtures: tiny configs and a random Hugging Face reference model (never downloaded)."""

import importlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# No timing of fast paths inside the tests, here or in the programs they start (train.py,
# generate.py, notebooks): each path that can run is on, as the fixture below sets them, and
# tests/test_engine_tuning.py tests the measurement itself with a clock of its own.
os.environ["GPT2_FAST_PATHS"] = "on"
# A test run started in the background by a script (`pytest &`) inherits SIGINT ignored, and
# every program it starts would too: the Ctrl-C tests need it delivered. A handler (unlike
# "ignore") is not inherited across exec, so the programs start with the default again.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# The device of the tests marked "device" (and of TINY_FLAGS' runs): the CPU, or what
# GPT2_TEST_DEVICE names (bench/gpu_check.py runs them on "cuda")
TEST_DEVICE = os.environ.get("GPT2_TEST_DEVICE", "cpu")
# train.py flags for a 2-layer, 32-wide model: seconds per run on the CPU
TINY_FLAGS = ["--emb-dim", "32", "--n-layers", "2", "--n-heads", "2", "--context-length", "32",
              "--batch-size", "4", "--eval-iter", "2", "--no-progress", "--device",
              TEST_DEVICE, "--dtype", "fp32", "--start-context", "The"]
TINY_CFG = {"vocab_size": 50257, "context_length": 32, "emb_dim": 32, "n_heads": 4,
            "n_layers": 2, "drop_rate": 0.0, "qkv_bias": True}


# (engine module, flag) of every fast path the clock chooses where its flag is None
# (engine/tuning.py): True forces it on, False off
CLOCK_FLAGS = [*(("cpu_kernels", flag) for flag in (
    "ONEDNN_FP32", "ALIGNED_LOGITS", "PACKING", "PACK_FP32_BATCH_1", "OWN_GEMV",
    "SCREENED_HEAD", "OWN_ARGMAX")), ("decoder", "ONE_CALL"), ("int8", "OWN_KERNEL"),
    ("int8", "DYNAMIC_Q8"), ("int8", "BF16_ROWS"), ("pages", "HUGE_PAGES"),
    ("attention", "BLOCKED"), ("fused_loss", "C_ROWS"), ("fused_loss", "SPLIT"),
    ("gelu", "C_PASS")]


def set_clock_flags(monkeypatch, value, flags=CLOCK_FLAGS):
    """Set each of ``flags`` (CLOCK_FLAGS: all of them) to ``value`` for this test."""
    for module, flag in flags:
        monkeypatch.setattr(importlib.import_module(f"engine.{module}"), flag, value)


@pytest.fixture
def measuring(monkeypatch, tmp_path):
    """tuning as a user's first run meets it: MODE "measure" (the tests run with "on"), an
    empty cache folder, nothing picked in this process yet, a machine that is not busy, and
    time for every repeat (the fake clocks of test_engine_tuning.py give each call seconds)."""
    from engine import tuning
    monkeypatch.setattr(tuning, "MODE", "measure")
    monkeypatch.setattr(tuning, "BUDGET", 1000.0)
    monkeypatch.setenv("GPT2_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setattr(tuning, "_PICKED", {})
    monkeypatch.setattr(tuning, "_TIMES", {})
    monkeypatch.setattr(tuning, "_NOTED", set())
    monkeypatch.setattr(tuning, "busy", lambda: "")
    return tmp_path


def answered_clock(monkeypatch, times, run=False):
    """Every decision met from now on answered from ``times`` {label: seconds} (the caller
    may change it between decisions); with ``run`` its candidates are made and each runs
    once first, and the answer counts as measured now (the pick's line is printed). Returns
    the list the decisions' names are added to, in the order met."""
    from engine import tuning
    asked = []

    def timings(name, setup, keep_autocast=False):
        asked.append(name)
        if run:
            tuning.measure_setup(setup, keep_autocast, repeats=1)
        return times, run
    monkeypatch.setattr(tuning, "timings", timings)
    return asked


@pytest.fixture(autouse=True)
def every_cpu_fast_path_on(monkeypatch):
    """Every CPU fast path on wherever it can run, whatever the clock would choose on this
    CPU: each is tested against the plain code (cpu_kernels.ENABLED = False, a flag set
    False, ...) on every machine the tests run on. (Batch-1 steps in one call; int8
    products of few fp32 rows through gemm_q8, of up to 16 through int8_kernel.c, then the
    activations are fp32: int8.activation_dtype.)"""
    set_clock_flags(monkeypatch, True)


@pytest.fixture(params=["native", "avx2"])
def kernel_build(request, monkeypatch):
    """Runs a test with the C kernels as built for this CPU ("native") and as built for an
    AVX2 CPU without AVX-512 (GPT2_KERNEL_ISA=avx2: engine/simd.h's 8-wide vectors, the int8
    products without VNNI, no int8_kernel.c); the kernels loaded so far are set aside."""
    from engine import cpu_kernels, int8, native
    if request.param == "avx2":
        if native.kernel_isa() != "avx512":
            pytest.skip("this CPU's own build is the AVX2 one (or none)")
        monkeypatch.setenv("GPT2_KERNEL_ISA", "avx2")
    for module, name in ((native, "_DECODE"), (native, "_ATTENTION"), (native, "_LOSS"),
                         (native, "_GELU"), (native, "_TRANSPOSE"), (cpu_kernels, "_GEMV"),
                         (int8, "_Q8"), (int8, "_KERNEL")):
        monkeypatch.setattr(module, name, None)
    for module, name in ((cpu_kernels, "GEMV_STATUS"), (int8, "KERNEL_STATUS")):
        monkeypatch.setattr(module, name, getattr(module, name))      # put back afterwards
    return request.param


def small_gpt():
    """A 2-layer GPTModel (97 tokens, 24 positions, width 32), seed 0, in eval mode: the
    decoding fast paths' tests."""
    from model import GPTModel
    torch.manual_seed(0)
    return GPTModel({"vocab_size": 97, "context_length": 24, "emb_dim": 32, "n_heads": 2,
                     "n_layers": 2, "drop_rate": 0.0, "qkv_bias": True}).eval()


@pytest.fixture
def tiny_cfg():
    return dict(TINY_CFG)


def make_hf_model(vocab_size=211, n_positions=40, n_embd=48, n_layer=3, n_head=4, seed=0,
                  tie=True, num_labels=None):
    """A random GPT2LMHeadModel with dropout off, built from a config (no download); with
    ``num_labels``, a GPT2ForSequenceClassification whose padding token is the last id."""
    from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab_size, n_positions=n_positions, n_embd=n_embd,
                        n_layer=n_layer, n_head=n_head, resid_pdrop=0.0, embd_pdrop=0.0,
                        attn_pdrop=0.0, bos_token_id=vocab_size - 1,
                        eos_token_id=vocab_size - 1, tie_word_embeddings=tie,
                        **({"num_labels": num_labels, "pad_token_id": vocab_size - 1}
                           if num_labels else {}))
    model = (GPT2ForSequenceClassification if num_labels else GPT2LMHeadModel)(config).eval()
    # GPT2's init leaves biases at zero and LayerNorm at (1, 0); randomise them so a
    # mapping mistake on any tensor shows up in the logits.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def randomize_(model, seed):
    """Give every weight a random value, LayerNorms and biases included.

    Fresh models have zero biases and unit LayerNorm weights, so a converter that dropped
    or swapped them would still pass; random values make every tensor count.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model.eval()


def read_only(monkeypatch, folder):
    """Make file creation in ``folder`` fail as on a read-only file system (the tests may
    run as root, whom permission bits do not stop)."""
    import errno

    from engine import fileio
    real = fileio._create_temp_file

    def create(path):
        if Path(path).parent == folder:
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real(path)

    monkeypatch.setattr(fileio, "_create_temp_file", create)


def cfg_from_hf(hf_model):
    c = hf_model.config
    return {"vocab_size": c.vocab_size, "context_length": c.n_positions, "emb_dim": c.n_embd,
            "n_heads": c.n_head, "n_layers": c.n_layer, "drop_rate": 0.0, "qkv_bias": True,
            "tie_embeddings": bool(c.tie_word_embeddings)}


@pytest.fixture
def device():
    """torch.device of the tests marked "device": TEST_DEVICE."""
    return torch.device(TEST_DEVICE)


@pytest.fixture
def device_pair(hf_pair, device):
    """hf_pair on ``device`` (copies where it is not the CPU)."""
    import copy
    hf, ours = hf_pair
    if device.type == "cpu":
        return hf, ours
    return copy.deepcopy(hf).to(device), copy.deepcopy(ours).to(device)


@pytest.fixture(scope="session")
def hf_pair():
    """(HF GPT2LMHeadModel, our GPTModel holding the same random weights)."""
    from download_weights_hf import load_weights_into_gpt
    from model import GPTModel

    hf = make_hf_model()
    ours = GPTModel(cfg_from_hf(hf))
    load_weights_into_gpt(ours, hf)
    return hf, ours.eval()


def flag_in_a_fresh_process(module, flag, **environment):
    """``engine.<module>.<flag>`` as printed by a new Python process started with
    ``environment`` added (the fast paths' switches are read when their module loads)."""
    code = f"from engine import {module}; print({module}.{flag})"
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, **environment},
                          capture_output=True, text=True, check=True).stdout.strip()


def signal_at_first_save(cmd, path, sig, timeout=240):
    """Run ``cmd`` and send it ``sig`` as soon as ``path`` exists (a run's first checkpoint,
    maybe mid-write); returns (return code, stdout, stderr)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    deadline = time.time() + timeout
    while not Path(path).exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    return proc.returncode, out, err

