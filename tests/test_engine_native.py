"""engine/native.py's choice of vectors for the C kernels (kernel_isa, GPT2_KERNEL_ISA), and
the library on an x86 CPU without AVX-512: a child process that sees this CPU as an AVX2 one
(PyTorch's kernels, oneDNN's and ours all limited to AVX2, so oneDNN has no bf16 products)
generates with every fast path on, in every precision."""

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT
from engine import devices, int8, native, tuning

AVX512 = {"avx2", "fma", "avx512f", "avx512bw", "avx512vl"}
X86_LINUX = sys.platform.startswith("linux") and platform.machine() == "x86_64"


@pytest.mark.skipif(not X86_LINUX, reason="the kernels are built on Linux on x86-64 only")
def test_the_vectors_follow_the_cpu_and_the_switch(monkeypatch):
    monkeypatch.delenv("GPT2_KERNEL_ISA", raising=False)
    monkeypatch.setattr(native, "cpu_flags", lambda: AVX512)
    assert native.kernel_isa() == "avx512"
    monkeypatch.setenv("GPT2_KERNEL_ISA", "avx2")            # as an AVX2 CPU
    assert native.kernel_isa() == "avx2"
    monkeypatch.setenv("GPT2_KERNEL_ISA", "AVX512")
    assert native.kernel_isa() == "avx512"
    monkeypatch.setattr(native, "cpu_flags", lambda: {"avx2", "fma"})
    assert native.kernel_isa() == "avx2"                     # not more than the CPU has
    monkeypatch.setattr(native, "cpu_flags", lambda: {"avx", "sse4_2"})
    assert native.kernel_isa() is None
    monkeypatch.setenv("GPT2_KERNEL_ISA", "avx3")
    with pytest.raises(ValueError, match="GPT2_KERNEL_ISA='avx3': use avx2, avx512 or leave it"):
        native.kernel_isa()


def test_64_bit_arm_gets_the_neon_build_and_its_cpuinfo_is_read(monkeypatch):
    # Arm's /proc/cpuinfo has "Features" for x86's "flags" and no "model name"
    arm = {"Features": "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics asimddp",
           "CPU implementer": "0x41", "CPU part": "0xd0c"}
    monkeypatch.setattr(devices, "cpu_info", lambda key: arm.get(key, ""))
    monkeypatch.setattr(native, "cpu_info", devices.cpu_info)
    monkeypatch.setattr(native.sys, "platform", "linux")
    monkeypatch.setattr(native.platform, "machine", lambda: "aarch64")
    monkeypatch.delenv("GPT2_KERNEL_ISA", raising=False)
    assert native.kernel_isa() == "neon"
    assert {"asimd", "asimddp"} <= native.cpu_flags()
    assert devices.cpu_model() == "Arm 0x41 part 0xd0c"
    monkeypatch.setenv("GPT2_KERNEL_ISA", "avx2")           # an x86 switch: no change here
    assert native.kernel_isa() == "neon"
    monkeypatch.setattr(native.platform, "machine", lambda: "armv7l")     # 32-bit Arm
    assert native.kernel_isa() is None
    monkeypatch.setattr(native.sys, "platform", "darwin")
    monkeypatch.setattr(native.platform, "machine", lambda: "arm64")      # Apple silicon
    assert native.kernel_isa() is None
    with pytest.raises(RuntimeError, match="needs Linux on an x86-64 CPU with AVX2 and FMA, "
                                           "or on 64-bit Arm"):
        native.build(Path(native.__file__).with_name("decode_kernel.c"))


def test_the_int8_kernel_needs_avx512_and_the_clock_keeps_apart(monkeypatch, tmp_path):
    if native.kernel_isa() != "avx512":
        pytest.skip("needs an AVX-512 CPU (to be built as an AVX2 one)")
    monkeypatch.setenv("GPT2_KERNEL_CACHE", str(tmp_path))
    key = tuning.machine_key()
    monkeypatch.setenv("GPT2_KERNEL_ISA", "avx2")
    with pytest.raises(RuntimeError, match=r"with AVX-512 \(F, BW, VL\) \(GPT2_KERNEL_ISA=avx2"):
        native.build(int8._SOURCE, needs="avx512")
    # the clock's timings of one build are not taken for the other
    assert tuning.machine_key() != key


CHILD = """
import json, torch
from conftest import small_gpt
from engine import cpu_kernels, decoder, int8, native
from generate import generate_text
steps, call = [], decoder._OneToken.__call__
decoder._OneToken.__call__ = lambda self, *a: steps.append(1) or call(self, *a)
out = {"isa": [native.kernel_isa(), native.decode_kernels().isa().decode(),
               torch.backends.cpu.get_cpu_capability(),
               torch.ops.mkldnn._is_mkldnn_bf16_supported()]}
prompt = torch.randint(0, 97, (3, 5), generator=torch.Generator().manual_seed(1))
for kind in ("fp32", "bf16", "autocast", "int8"):
    model = small_gpt()
    if kind == "bf16":
        model = model.to(torch.bfloat16)
    if kind == "int8":
        model = int8.quantize_(model)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=kind == "autocast"):
        for rows in (1, 3):
            steps.clear()
            fast = generate_text(model, prompt[:rows], 8, eos_id=None)
            one_call = len(steps)
            with cpu_kernels.disabled(), int8.disabled():
                plain = generate_text(model, prompt[:rows], 8, eos_id=None)
            out[f"{kind} {rows}"] = [fast.tolist(), plain.tolist(), one_call]
print(json.dumps(out))
"""


@pytest.mark.skipif(not X86_LINUX, reason="an x86 CPU to limit")
def test_generation_on_a_cpu_seen_as_avx2():
    # Before the kernels had an AVX2 build and the oneDNN copies asked for bf16 support,
    # greedy fp32 decoding raised here (packing the screened head's bf16 copy)
    if not {"avx2", "fma"} <= native.cpu_flags():
        pytest.skip("this CPU has no AVX2")
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2",
           "GPT2_KERNEL_ISA": "avx2", "GPT2_FAST_PATHS": "on",
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    proc = subprocess.run([sys.executable, "-c", CHILD], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out.pop("isa") == ["avx2", "avx2", "AVX2", False]
    for case, (fast, plain, one_call) in out.items():
        kind, rows = case.split()
        assert len(fast) == int(rows) and all(len(row) == 13 for row in fast), case
        # batch 1 through the one-call steps (all but the prompt's own token); fp32 tokens
        # as the plain code picks them (bf16 and int8 steps keep fp32 activations: other
        # roundings, which tests/test_engine_decoder.py bounds)
        assert one_call == (7 if rows == "1" else 0), case
        if kind == "fp32":
            assert fast == plain, case
