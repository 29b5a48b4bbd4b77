"""The engine's C kernels: compiled once per machine, called through ctypes.

``build(source)`` compiles one C file of this folder with the machine's C compiler
(``$CC``, cc or gcc; ``-O3 -march=native -fopenmp``) into ``$GPT2_KERNEL_CACHE`` (default
~/.cache/gpt2-from-scratch), named by a hash of the source and the headers beside it
(bf16.h, simd.h), the compiler and the CPU, so that a change of any of them builds it anew, and
loads it. Where that cannot be done it raises OSError, RuntimeError or SubprocessError
saying why; the callers then keep PyTorch's kernels. Six files use it: int8_kernel.c
(engine/int8.py), decode_kernel.c (``decode_kernels()``: engine/decoder.py,
engine/cpu_kernels.py and engine/int8.py), attention_kernel.c (``attention_kernels()``:
engine/attention.py), loss_kernel.c (``loss_kernels()``: engine/fused_loss.py),
gelu_kernel.c (``gelu_kernels()``: engine/gelu.py) and transpose_kernel.c
(``transpose_kernels()``: engine/cpu_kernels.py).

The kernels need Linux and PyTorch's OpenMP (libgomp), whose thread pool they share;
decode_kernel.c needs x86-64 with AVX2 and FMA, using AVX-512 where the CPU has it, or 64-bit
Arm, using NEON (engine/simd.h), and so do attention_kernel.c, loss_kernel.c and
gelu_kernel.c (transpose_kernel.c builds on any of them: 8 x 8 blocks in AVX registers
on x86, element by element elsewhere); int8_kernel.c needs AVX-512 (F, BW).
``GPT2_KERNEL_ISA=avx2`` builds them as for a CPU without AVX-512 (so int8_kernel.c is not
built): to measure or test on an AVX-512 machine what an AVX2 one runs.
"""

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from engine.devices import cpu_info, cpu_model
from engine.fileio import atomic_write


def cpu_flags():
    """The CPU's features as Linux lists them: x86's "flags", Arm's "Features"."""
    return set((cpu_info("flags") or cpu_info("Features")).split())


def kernel_isa():
    """The widest vectors the kernels are built for here: "avx512" (F, BW, VL), "avx2" (with
    FMA; also where ``GPT2_KERNEL_ISA=avx2`` asks for it), "neon" (64-bit Arm, where NEON is
    always there), or None (none of them, or not Linux)."""
    flags = cpu_flags()
    asked = os.environ.get("GPT2_KERNEL_ISA", "").lower()
    if asked not in ("", "avx2", "avx512"):
        raise ValueError(f"GPT2_KERNEL_ISA={asked!r}: use avx2, avx512 or leave it unset")
    if not sys.platform.startswith("linux"):
        return None
    if platform.machine() == "aarch64":
        return "neon"
    if platform.machine() != "x86_64":
        return None
    if asked != "avx2" and {"avx512f", "avx512bw", "avx512vl"} <= flags:
        return "avx512"
    return "avx2" if {"avx2", "fma"} <= flags else None


def cache_folder():
    """Where the compiled kernels (and engine/tuning.py's timings) are kept:
    ``$GPT2_KERNEL_CACHE``, default ~/.cache/gpt2-from-scratch."""
    return Path(os.environ.get("GPT2_KERNEL_CACHE")
                or Path.home() / ".cache" / "gpt2-from-scratch")


def build(source, options=(), needs=None):
    """The compiled ``source`` (a Path to a .c file) as a ctypes.CDLL; see the module.
    ``options``: more compiler options (the tests build without some CPU features); ``needs``:
    None (built for kernel_isa(), whichever it is) or "avx512" (refused elsewhere)."""
    flags = cpu_flags()
    isa = kernel_isa()
    if isa is None or (needs == "avx512" and isa != "avx512"):
        raise RuntimeError("needs Linux on an x86-64 CPU with "
                           + ("AVX-512 (F, BW, VL)" if needs == "avx512"
                              else "AVX2 and FMA, or on 64-bit Arm")
                           + (" (GPT2_KERNEL_ISA=avx2 is set)"
                              if isa == "avx2" and needs == "avx512" else ""))
    if isa == "avx2" and "avx512f" in flags:
        options = ("-mno-avx512f", *options)           # as an AVX2 CPU: no AVX-512 at all
    if "libgomp" not in Path("/proc/self/maps").read_text():
        # with another OpenMP (Intel's, in conda builds) the kernel would bring a second
        # thread pool, and the two would fight over the cores
        raise RuntimeError("this PyTorch does not run on GNU OpenMP (libgomp)")
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise RuntimeError("no C compiler (cc, gcc or $CC)")
    version = subprocess.run([cc, "--version"], capture_output=True, text=True,
                             timeout=30).stdout
    headers = [h.read_bytes() for h in sorted(source.parent.glob("*.h"))]
    key = hashlib.sha256(b"\0".join([source.read_bytes(), *headers, version.encode(),
                                      *map(str.encode, options), cpu_model().encode(),
                                      " ".join(sorted(flags)).encode()])).hexdigest()[:16]
    lib_path = cache_folder() / f"{source.stem}-{key}.so"
    if not lib_path.exists():
        with tempfile.TemporaryDirectory() as tmp:
            built = Path(tmp) / f"{source.stem}.so"
            proc = subprocess.run([cc, "-O3", "-march=native", *options, "-fopenmp", "-shared",
                                   "-fPIC", str(source), "-o", str(built)],
                                  capture_output=True, text=True, timeout=300)
            if proc.returncode != 0:
                raise RuntimeError(f"{cc} failed: {proc.stderr.strip()[-500:]}")
            atomic_write(lib_path, lambda f: f.write(built.read_bytes()))
    return ctypes.CDLL(str(lib_path))


_DECODE = None      # decode_kernel.c once loaded; an exception: it cannot be built here


def decode_signatures(lib):
    """``lib`` (a build of decode_kernel.c) with its functions' signatures set (gemv_f32,
    gemv_bf16, gemm_q8, decode_token, argmax_rows, isa)."""
    ptr, num = ctypes.c_void_p, ctypes.c_int
    for name in ("gemv_f32", "gemv_bf16"):
        getattr(lib, name).argtypes = [ptr] * 4 + [num] * 3
        getattr(lib, name).restype = num
    lib.gemm_q8.argtypes, lib.gemm_q8.restype = [ptr] * 5 + [num] * 4, num
    lib.isa.argtypes, lib.isa.restype = [], ctypes.c_char_p
    lib.decode_token.argtypes = [ptr, num, num, num, ptr, ptr, ctypes.c_long, num, ptr,
                                 ptr, ctypes.c_float, ptr, ptr, num, num, ptr, num]
    lib.decode_token.restype = num
    lib.argmax_rows.argtypes = [ptr, num, ctypes.c_long, ctypes.c_long, ptr]
    lib.argmax_rows.restype = None
    return lib


def decode_kernels():
    """decode_kernel.c built and loaded once per process, its functions' signatures set
    (decode_signatures); raises as build() does."""
    return _once("_DECODE", "decode_kernel.c", decode_signatures)


_ATTENTION = None   # attention_kernel.c, as _DECODE


def attention_signatures(lib):
    """``lib`` (a build of attention_kernel.c) with its functions' signatures set."""
    ptr, size = ctypes.c_void_p, ctypes.c_long
    # bf16, mats, rows, cols, row0, col0, mat_rows, the scores' scale, then the mask's seed,
    # threshold and scale
    geometry = [ctypes.c_int] + [size] * 6 + [ctypes.c_float, ctypes.c_uint64,
                                              ctypes.c_uint32, ctypes.c_float]
    lib.softmax_dropout.argtypes = [ptr] * 3 + geometry
    lib.softmax_dropout_backward.argtypes = [ptr] * 6 + geometry
    lib.softmax_dropout.restype = lib.softmax_dropout_backward.restype = ctypes.c_int
    lib.dropout_rows.argtypes = [ptr] * 2 + [ctypes.c_int] + [size] * 2 + geometry[-3:]
    lib.dropout_rows.restype = None
    lib.row_dots.argtypes = [ptr] * 3 + [ctypes.c_int, size, size]
    lib.row_dots.restype = None
    return lib


def attention_kernels():
    """attention_kernel.c built and loaded once per process (engine/attention.py); raises as
    build() does."""
    return _once("_ATTENTION", "attention_kernel.c", attention_signatures)


_LOSS = None        # loss_kernel.c, as _DECODE


def loss_signatures(lib):
    """``lib`` (a build of loss_kernel.c) with its function's signature set."""
    ptr, size = ctypes.c_void_p, ctypes.c_long
    lib.cross_entropy_rows.argtypes = [ptr, ctypes.c_int, size, size, ptr, ptr,
                                       ctypes.c_float, ctypes.c_int]
    lib.cross_entropy_rows.restype = ctypes.c_int
    return lib


def loss_kernels():
    """loss_kernel.c built and loaded once per process (engine/fused_loss.py); raises as
    build() does."""
    return _once("_LOSS", "loss_kernel.c", loss_signatures)


_GELU = None        # gelu_kernel.c, as _DECODE


def gelu_signatures(lib):
    """``lib`` (a build of gelu_kernel.c) with its functions' signatures set."""
    ptr, size = ctypes.c_void_p, ctypes.c_long
    lib.gelu_tanh.argtypes = [ptr, ptr, ctypes.c_int, size]
    lib.gelu_tanh_backward.argtypes = [ptr, ptr, ptr, ctypes.c_int, size]
    lib.gelu_tanh.restype = lib.gelu_tanh_backward.restype = None
    return lib


def gelu_kernels():
    """gelu_kernel.c built and loaded once per process (engine/gelu.py); raises as build()
    does."""
    return _once("_GELU", "gelu_kernel.c", gelu_signatures)


_TRANSPOSE = None   # transpose_kernel.c, as _DECODE


def transpose_signatures(lib):
    """``lib`` (a build of transpose_kernel.c) with its function's signature set."""
    lib.transpose_f32.argtypes = [ctypes.c_void_p] * 2 + [ctypes.c_long] * 2
    lib.transpose_f32.restype = None
    return lib


def transpose_kernels():
    """transpose_kernel.c built and loaded once per process (engine/cpu_kernels.py); raises
    as build() does."""
    return _once("_TRANSPOSE", "transpose_kernel.c", transpose_signatures)


BUILD_ERRORS = (OSError, RuntimeError, subprocess.SubprocessError)    # what build() raises


def optional(loader):
    """``loader()`` (decode_kernels, attention_kernels, loss_kernels, gelu_kernels,
    transpose_kernels), or None where its kernel cannot be built here: then the caller keeps
    PyTorch's code."""
    try:
        return loader()
    except BUILD_ERRORS:
        return None


def _once(name, source, signatures):
    """The library kept in the global ``name``: built from ``source`` the first time, its
    signatures set; where it cannot be built, the exception is kept and raised again."""
    lib = globals()[name]
    if lib is None:
        try:
            lib = signatures(build(Path(__file__).with_name(source)))
        except BUILD_ERRORS as e:
            lib = e
        globals()[name] = lib
    if isinstance(lib, Exception):
        raise lib
    return lib
