"""Weights that decoding streams, kept in 2 MiB pages (Linux's transparent huge pages).

A batch-1 decoding step reads every weight once, front to back: 85 MB for the 124M model in
int8, 170 MB in bf16, 340 MB in fp32. In ordinary 4 KiB pages that is 20,000 to 83,000
pages a token, and each new page needs its address translated (a TLB miss, a walk of the
page tables) while the hardware prefetcher stops at every page boundary. In 2 MiB pages the
same bytes are 40 to 170 pages. Measured on a 2-core AMD EPYC (Zen 4), the same 48 block
products of the 124M model, the same kernels, one copy in each kind of page, alternating in
one process: int8 1.26x, bf16 1.19-1.23x, fp32 1.30x; whole greedy decoding, two models
alternating: int8 1.10x, bf16 1.19x, fp32 1.22x (bench/README.md).

``streamed(t, dtype)`` gives a contiguous copy of ``t`` (in ``dtype``) for the kernels to
stream: in anonymous memory started on a 2 MiB boundary and advised MADV_HUGEPAGE, where
the clock picks 2 MiB pages on this machine (engine/tuning.py times passes over the 124M
model's block matrices each way); else an ordinary copy (``t`` itself where it already is
one). Copies under CHUNK bytes share mappings of that size, one after another (the int8
qkv matrix, 1.8 MB, would not fill a 2 MiB page of its own); a larger one gets a mapping
of its own. A mapping ends at its last 4 KiB page, so its tail lies in small pages and no
2 MiB page is filled past the data; it is unmapped when the last copy in it is freed.
Where the kernel gives no huge pages (not Linux, transparent huge pages "never", a
memory cgroup out of them) the mapping still works, in small pages, and the clock sees no
gain: then 4 KiB pages are picked. Which pages hold a number changes no result.

Used by cpu_kernels.OneRow (the one-row copies of fp32 and bf16 decoding) and
int8.Int8Linear.from_float (an int8 model's matrices). Switch: ``ENABLED = False`` (or
``GPT2_HUGE_PAGES=0`` before Python starts); ``HUGE_PAGES``: None (the default), chosen by the
clock; True, 2 MiB pages wherever they can be asked for; False, never.
"""

import ctypes
import mmap
import os
import subprocess
import sys
import threading
import weakref
from pathlib import Path

import torch

from engine import native, tuning

ENABLED = os.environ.get("GPT2_HUGE_PAGES", "1") != "0"    # the switch
HUGE_PAGES = None           # None: the clock decides; True / False: forced

SMALL, HUGE = 4096, 2 << 20
CHUNK = 64 << 20            # bytes of the mappings that small copies share
MADV_HUGEPAGE = getattr(mmap, "MADV_HUGEPAGE", 14)
SMALL_LABEL, HUGE_LABEL = "4 KiB pages", "2 MiB pages"     # as the clock prints them

_LIBC = None        # libc's mmap, munmap and madvise once looked up; False: not here
_LOCK = threading.Lock()
_FILLING = (lambda: None, 0)    # (weak reference to the mapping being filled, bytes used)


def available():
    """Whether 2 MiB pages can be asked for here: Linux, with transparent huge pages not
    switched off ("never"), libc's mmap reachable through ctypes."""
    global _LIBC
    if _LIBC is None:
        _LIBC = False
        if not sys.platform.startswith("linux"):
            return False
        try:
            modes = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
        except OSError:
            return False
        if "[never]" in modes:
            return False
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.mmap.restype = ctypes.c_void_p
            libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int,
                                  ctypes.c_int, ctypes.c_int, ctypes.c_long]
            libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
            libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        except (OSError, AttributeError):
            return False
        _LIBC = libc
    return bool(_LIBC)


def chosen():
    """Whether copies for decoding go into 2 MiB pages here (the switches, then the clock)."""
    if not (ENABLED and HUGE_PAGES is not False and available()):
        return False
    return tuning.switch(HUGE_PAGES, "weights for decoding", _time_pages, SMALL_LABEL,
                         HUGE_LABEL)


class _Mapping:
    """``size`` bytes of fresh zeroed memory starting on a 2 MiB boundary, advised for huge
    pages, unmapped when this object is freed."""

    def __init__(self, size):
        libc = _LIBC
        size = -(-size // SMALL) * SMALL
        start = libc.mmap(None, size + HUGE, mmap.PROT_READ | mmap.PROT_WRITE,
                          mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
        if start is None or start == ctypes.c_void_p(-1).value:
            raise MemoryError(f"mmap of {size + HUGE} bytes failed "
                              f"(errno {ctypes.get_errno()})")
        aligned = -(-start // HUGE) * HUGE
        # keep [aligned, aligned + size): the slack before and after goes back
        if aligned > start:
            libc.munmap(start, aligned - start)
        if start + HUGE > aligned:
            libc.munmap(aligned + size, start + HUGE - aligned)
        self.address, self.size, self.libc = aligned, size, libc
        libc.madvise(aligned, size, MADV_HUGEPAGE)     # a refusal leaves small pages

    def __del__(self):
        if getattr(self, "address", None):
            self.libc.munmap(self.address, self.size)


def _place(nbytes):
    """(a _Mapping, the offset in it) for ``nbytes`` more bytes: the copies share mappings of
    CHUNK bytes, one after another (64-byte aligned), so that matrices smaller than 2 MiB
    (the 124M model's int8 qkv, 1.8 MB) lie in huge pages too; a copy of CHUNK bytes or more
    gets a mapping of its own. A mapping lives while a copy in it does (the pool keeps only
    a weak reference to the one it fills)."""
    global _FILLING
    with _LOCK:
        if nbytes >= CHUNK:
            return _Mapping(nbytes), 0
        mapping, used = _FILLING[0](), _FILLING[1]
        if mapping is None or used + nbytes > mapping.size:
            mapping, used = _Mapping(CHUNK), 0
        _FILLING = (weakref.ref(mapping), -(-(used + nbytes) // 64) * 64)
        return mapping, used


def huge_page_copy(t, dtype=None):
    """A contiguous copy of ``t`` (a CPU tensor) in ``dtype`` (default: its own) in memory
    advised for 2 MiB pages (see the module), or None where that cannot be asked for."""
    dtype = dtype or t.dtype
    if not available() or t.device.type != "cpu":
        return None
    nbytes = t.numel() * dtype.itemsize
    if nbytes == 0:
        return None
    mapping, offset = _place(nbytes)
    buffer = (ctypes.c_uint8 * nbytes).from_address(mapping.address + offset)
    buffer.mapping = mapping                 # the tensor holds the buffer, the buffer this
    out = torch.frombuffer(buffer, dtype=torch.uint8).view(dtype).view(t.shape)
    out.copy_(t.detach())                    # the first write: the pages are made now
    return out


def streamed(t, dtype=None):
    """``t`` in ``dtype`` (default: its own), contiguous, for a kernel that streams it at every
    decoding step: a copy in 2 MiB pages where they are chosen here, else t.to(dtype)
    .contiguous() (``t`` itself where it already is that)."""
    if t.device.type == "cpu" and chosen():
        copy = huge_page_copy(t, dtype)
        if copy is not None:
            return copy
    return t.detach().to(dtype or t.dtype).contiguous()


def _time_pages():
    # passes over GPT-2 124M's block matrices (fp32, (out, in), working_set() bytes) with the
    # one-row fp32 kernel (x @ W where it cannot be built), one copy in each kind of page
    mats = tuning.block_matrices(torch.float32, out_in=True)
    huge = [huge_page_copy(w) for w in mats]               # the same numbers
    x = {k: torch.rand(k) for k in {w.shape[1] for w in mats}}
    try:
        gemv = native.decode_kernels().gemv_f32
    except (OSError, RuntimeError, subprocess.SubprocessError):
        gemv = None

    def passes(ws):
        # three passes a repeat: one takes ~3 ms, short enough for a moment of another
        # process's work to make the repeats disagree
        threads, out = torch.get_num_threads(), []
        for w in ws * 3:
            n, k = w.shape
            if gemv is None:
                out.append(w @ x[k])
            else:
                out.append(torch.empty(n))
                gemv(x[k].data_ptr(), w.data_ptr(), None, out[-1].data_ptr(), n, k, threads)
        return out
    return {SMALL_LABEL: lambda: passes(mats), HUGE_LABEL: lambda: passes(huge)}
