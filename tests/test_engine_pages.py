"""engine/pages.py: the copies decoding streams, in 2 MiB pages. A copy holds the numbers
it was made from (in the asked dtype), small copies share a mapping and the mapping goes back
when the last of them is freed, the memory is advised for huge pages, the switches, and
decoding gives the same tokens with the weights in either kind of page."""

import gc
import weakref

import pytest
import torch

from conftest import flag_in_a_fresh_process, small_gpt
from engine import cpu_kernels, decoder, int8, pages

needs_pages = pytest.mark.skipif(not pages.available(),
                                 reason="no transparent huge pages to ask for here")


def _vma(address):
    """The /proc/self/smaps entry (its lines) of the mapping that holds ``address``."""
    entry, inside = [], False
    for line in open("/proc/self/smaps"):
        head = line.split()[0]
        if "-" in head and ":" not in head:
            start, end = (int(x, 16) for x in head.split("-"))
            inside = start <= address < end
            entry = [line] if inside else entry
        elif inside:
            entry.append(line)
    return entry


@needs_pages
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8])
def test_a_copy_holds_the_numbers_in_the_asked_dtype(dtype):
    torch.manual_seed(0)
    t = (torch.randn(300, 70) * 50).to(dtype)
    for source in (t, t.t()):                      # a transposed view is copied contiguous
        copy = pages.huge_page_copy(source)
        assert copy.dtype == dtype and copy.shape == source.shape and copy.is_contiguous()
        assert torch.equal(copy, source) and copy.data_ptr() != source.data_ptr()
        assert copy.data_ptr() % 64 == 0
    if dtype != torch.int8:
        assert torch.equal(pages.huge_page_copy(t, torch.bfloat16), t.to(torch.bfloat16))
    assert pages.huge_page_copy(torch.empty(0, 4)) is None


@needs_pages
def test_small_copies_share_a_mapping_that_goes_back_with_the_last_of_them(monkeypatch):
    gc.collect()
    # a pool of its own: copies an earlier test left alive may be filling one already
    monkeypatch.setattr(pages, "_FILLING", (lambda: None, 0))
    first = pages.huge_page_copy(torch.ones(1000, dtype=torch.int8))
    mapping = pages._FILLING[0]()
    assert mapping is not None and mapping.address % pages.HUGE == 0
    second = pages.huge_page_copy(torch.full((10,), 2.0))
    assert pages._FILLING[0]() is mapping                   # the same mapping, further on
    assert second.data_ptr() == mapping.address + 1024      # 1000 bytes, 64-byte aligned
    assert any(line.startswith("THPeligible:") and line.split()[1] == "1"
               for line in _vma(mapping.address))            # advised for huge pages
    big = pages.huge_page_copy(torch.zeros(pages.CHUNK // 4))  # one of its own
    assert pages._FILLING[0]() is mapping and big.data_ptr() % pages.HUGE == 0
    # the copies outlive the pool's reference; the mapping goes with the last one
    alive = weakref.ref(mapping)
    del mapping, first
    gc.collect()
    assert alive() is not None and second.tolist() == [2.0] * 10
    del second
    gc.collect()
    assert alive() is None


def test_streamed_copies_only_where_pages_are_chosen_or_a_copy_is_needed(monkeypatch):
    monkeypatch.setattr(pages, "HUGE_PAGES", False)
    t = torch.randn(8, 4)
    assert pages.streamed(t).data_ptr() == t.data_ptr()         # no copy made
    copy = pages.streamed(t.t(), torch.bfloat16)
    assert copy.is_contiguous() and torch.equal(copy, t.t().to(torch.bfloat16))
    monkeypatch.setattr(pages, "HUGE_PAGES", True)
    got = pages.streamed(t)
    assert torch.equal(got, t)
    assert (got.data_ptr() != t.data_ptr()) is pages.available()
    monkeypatch.setattr(pages, "ENABLED", False)
    assert pages.streamed(t).data_ptr() == t.data_ptr() and not pages.chosen()


def test_where_huge_pages_cannot_be_asked_for_nothing_changes(monkeypatch):
    # not Linux, THP "never", no libc: the copies are ordinary ones, and nothing is timed
    monkeypatch.setattr(pages, "_LIBC", False)
    monkeypatch.setattr(pages, "HUGE_PAGES", True)
    monkeypatch.setattr(pages.tuning, "pick", lambda *a, **k: pytest.fail("timed"))
    t = torch.randn(6, 5)
    assert not pages.available() and not pages.chosen()
    assert pages.huge_page_copy(t) is None
    assert pages.streamed(t).data_ptr() == t.data_ptr()
    assert torch.equal(pages.streamed(t.t(), torch.bfloat16), t.t().to(torch.bfloat16))


def test_the_switch_reads_the_environment():
    assert flag_in_a_fresh_process("pages", "ENABLED", GPT2_HUGE_PAGES="0") == "False"
    assert flag_in_a_fresh_process("pages", "ENABLED") == "True"


@needs_pages
@pytest.mark.parametrize("kind", ["fp32", "bf16", "int8"])
def test_decoding_gives_the_same_tokens_in_either_kind_of_page(monkeypatch, kind):
    from generate import generate_tokens
    prompt = torch.tensor([[5, 7, 11]])

    def tokens(huge):
        monkeypatch.setattr(pages, "HUGE_PAGES", huge)
        model = small_gpt()
        if kind == "bf16":
            model = model.to(torch.bfloat16)
        if kind == "int8":
            int8.quantize_(model)
        # which of the model's matrices (or their copies) the kernels read lie in huge pages
        with torch.inference_mode(), decoder.decoding(model, 1, greedy=True):
            if kind == "int8":
                read = [m.weight for m in model.modules() if isinstance(m, int8.Int8Linear)]
            else:
                read = [c.weight for c in (cpu_kernels.packed_copy(m)
                                           for m in model.trf_blocks.modules())
                        if isinstance(c, cpu_kernels.OneRow)]
            advised = [any(line.startswith("THPeligible:") and line.split()[1] == "1"
                           for line in _vma(w.data_ptr())) for w in read]
        with torch.inference_mode():
            out = torch.cat(list(generate_tokens(model, prompt, 12, eos_id=None)), dim=1)
        return out, read, advised
    plain, _, _ = tokens(False)
    huge, read, advised = tokens(True)
    assert torch.equal(huge, plain)
    if read:                                   # the copies exist where the kernels do
        assert all(advised)
