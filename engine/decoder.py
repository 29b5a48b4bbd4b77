"""Batch-1 decoding in one call: a new token through every block of GPT-2 at once, on CPU.

Generating one token at batch 1 is a small amount of arithmetic spread over many calls:
each block of model.py makes ~25 PyTorch calls (LayerNorm, the qkv product, the split and
transposes, the cache write, attention, the projection, the MLP, the adds), ~300 a token at
124M, each with a few microseconds of Python and dispatch and a wake-up of the threads. On
the 2-core AMD EPYC (Zen 4) these figures come from, that was ~40% of an int8 decoding
step once the weights streamed at full speed. decode_kernel.c's ``decode_token`` does the
same arithmetic for one token, every block and the final LayerNorm, in one C call, the
threads kept inside one parallel region; the output head stays in PyTorch (generate.py's
greedy or sampling head, itself through the one-row kernels).

model.py's ``hidden_states`` asks ``one_token(model, idx, cache, mask)`` first; it answers
None (and the plain code runs) unless all of these hold: inside ``decoding()`` (which
generate.py decodes in), one token of one row, a KV cache in the embeddings' dtype with
room left, no padding mask, no gradients, the fast path on (ENABLED, ONE_CALL,
cpu_kernels.ENABLED), every block multiplying either with a one-row copy for our kernels
(cpu_kernels.OneRow: fp32 and bf16 models where cpu_kernels.copy_kind picks them) or with
int8 weights (engine/int8.py's Int8Linear, where int8.DYNAMIC_Q8 is not off), no hooks on
any module, GPT-2's GELU; and the one-call steps faster than model.py's code on this
machine for this kind of model (fp32, bf16, int8, under autocast) and shape: timed once,
on the model itself, when ``decoding()`` first meets it (engine/tuning.py), unless
ONE_CALL says.

What it computes, against the plain path (the tests compare them):
    fp32 model   the same, up to the order of the fp32 sums (and e^x by a polynomial)
    bf16 model   the same bf16 weights, embeddings and KV cache, but every activation in
                 fp32 where the plain path rounds each to bf16: closer to the fp32 model
    autocast     (an fp32 model under bf16 autocast, whose copies are bf16) the products
                 in bf16 as autocast makes them, everything else in fp32
    int8 model   each product's input row rounded to int8 in blocks of 32 (llama.cpp's q8_0
                 does the same), so that the CPU sums int8 products in int32 (64 at a
                 time with AVX512-VNNI, 32 with AVX2)

Switch: ``ENABLED = False`` (or ``GPT2_ONE_CALL_DECODING=0`` before Python starts), or a
``disabled()`` block; ``cpu_kernels.ENABLED = False`` turns it off with the other fast paths.
``ONE_CALL``: None (the default), chosen by the clock; True (or ``GPT2_ONE_CALL_DECODING=1``),
on wherever it applies; False, off.
"""

import contextlib
import ctypes
import os
import sys

import torch
import torch.nn as nn

from engine import cpu_kernels, int8, native, tuning, turned_off

ENABLED = os.environ.get("GPT2_ONE_CALL_DECODING", "1") != "0"     # the switch
# None: on where it beats model.py's code, timed where it runs (bench/README.md has figures)
ONE_CALL = True if os.environ.get("GPT2_ONE_CALL_DECODING") == "1" else None

_F32, _Q8, _BF16 = 0, 1, 2  # decode_kernel.c's kinds of matrix
_STEPS = {}                 # id(model) -> its _OneToken, while inside decoding()


def _on():
    return ENABLED and ONE_CALL is not False and cpu_kernels.ENABLED


def disabled():
    """Within this block one-token steps take model.py's plain code."""
    return turned_off(sys.modules[__name__])


class _Mat(ctypes.Structure):
    _fields_ = [("kind", ctypes.c_int), ("n", ctypes.c_int), ("k", ctypes.c_int),
                ("w", ctypes.c_void_p), ("scale", ctypes.c_void_p), ("bias", ctypes.c_void_p)]


class _Block(ctypes.Structure):
    _fields_ = [("ln1_w", ctypes.c_void_p), ("ln1_b", ctypes.c_void_p),
                ("ln2_w", ctypes.c_void_p), ("ln2_b", ctypes.c_void_p),
                ("eps1", ctypes.c_float), ("eps2", ctypes.c_float),
                ("qkv", _Mat), ("proj", _Mat), ("fc", _Mat), ("fc2", _Mat)]


@contextlib.contextmanager
def decoding(model, batch_size=8, greedy=False):
    """cpu_kernels.packed_for_cpu(model, batch_size, greedy) (its PackedSession is yielded),
    plus, for batch 1, one-token steps in one call where they apply (see the module)."""
    kind = _one_call_copies(model, greedy) if batch_size == 1 else None
    with cpu_kernels.packed_for_cpu(model, batch_size, greedy, kind=kind) as session:
        step = (_OneToken.make(model, session, decided=kind is not None) if batch_size == 1
                else None)
        if step is not None:
            _STEPS[id(model)] = step
        try:
            yield session
        finally:
            if step is not None and _STEPS.get(id(model)) is step:
                del _STEPS[id(model)]


def _one_call_copies(model, greedy):
    """cpu_kernels.OWN where batch-1 decoding of this fp32 or bf16 model takes the one-call
    steps although cpu_kernels.copy_kind would pick other copies for model.py's code (the
    steps need OneRow copies): then whole steps are timed, the one-call ones with OneRow
    copies against model.py's code with copy_kind's; else None (copy_kind's copies, and
    _OneToken.make decides)."""
    w = model.tok_emb.weight
    dtype = cpu_kernels.cpu_matmul_dtype(w)
    if (not _on() or int8.is_quantized(model) or w.device.type != "cpu"
            or dtype not in (torch.float32, torch.bfloat16) or torch.is_grad_enabled()
            or cpu_kernels.OWN not in cpu_kernels.copy_kinds(dtype, 1)):
        return None
    best = cpu_kernels.copy_kind(dtype, 1)
    if best == cpu_kernels.OWN:
        return None
    if ONE_CALL:
        return cpu_kernels.OWN
    return cpu_kernels.OWN if _one_call_wins(model, lambda: _against(model, greedy, best)) \
        else None


def _one_call_wins(model, setup):
    """Whether one-token steps run faster in one call than through model.py's code here, for
    this kind of model (int8, or the dtype its products run in: an fp32 model under bf16
    autocast counts as bf16) and shape: engine/tuning.py times ``setup``'s candidates once."""
    cfg = model.cfg
    kind = ("int8" if int8.is_quantized(model) else
            cpu_kernels._dtype_name(cpu_kernels.cpu_matmul_dtype(model.tok_emb.weight)))
    return tuning.pick(f"batch-1 decoding ({kind}, {cfg['n_layers']} x {cfg['emb_dim']})",
                       setup, ("plain", "one-call C kernel"), keep_autocast=True) != "plain"


@contextlib.contextmanager
def _against(model, greedy, best):
    # two sessions at once: model.py's code reads copy_kind's copies (``best``), put back
    # in place before each of its runs, the one-call steps their OneRow copies
    with cpu_kernels.packed_for_cpu(model, 1, greedy, kind=best) as plain_session:
        theirs = {k: v for k, v in cpu_kernels._IN_USE.items() if v[1] is plain_session}
        with cpu_kernels.packed_for_cpu(model, 1, greedy, kind=cpu_kernels.OWN) as session:
            try:
                step = _OneToken(model, session, native.decode_kernels())
            except _DoesNotApply:
                yield {"plain": lambda: None}
                return
            yield step.candidates(model, lambda: cpu_kernels._IN_USE.update(theirs))


def one_token(model, idx, cache, mask):
    """The final-normed vectors (1, 1, C) of token ids ``idx`` (1, 1) after the ``cache.pos``
    tokens in ``cache`` (whose keys and values get this token's, and whose pos advances),
    computed in one call; or None where that does not apply (then: model.py's code)."""
    step = _STEPS.get(id(model))
    if (step is None or not step.session.active or cache is None or mask is not None
            or idx.shape != (1, 1) or not _on()
            or cache.pos >= cache.max_len or torch.is_grad_enabled() or model.training
            or cache.k.dtype != step.dtype or cache.k.shape != step.cache_shape(cache)
            or not (cache.k.is_contiguous() and cache.v.is_contiguous())
            or cache.k.device.type != "cpu"
            or not 0 <= (token := int(idx[0, 0])) < model.tok_emb.weight.shape[0]):
        return None
    return step(model, token, cache)


class _OneToken:
    """The table of one model's weights that decode_token reads, built once per decoding()
    (the weights do not change while the session is active)."""

    @classmethod
    def make(cls, model, session, decided=False):
        """An _OneToken for ``model``, or None where one-token steps do not apply to it or
        lose to model.py's code here (``decided``: already timed, they won)."""
        if not _on() or model.tok_emb.weight.device.type != "cpu":
            return None
        lib = native.optional(native.decode_kernels)
        if lib is None:
            return None
        try:
            step = cls(model, session, lib)
        except _DoesNotApply:
            return None
        return step if ONE_CALL or decided or step.wins(model) else None

    def __init__(self, model, session, lib):
        self.session, self.lib = session, lib
        # the embeddings and the KV cache: fp32, or bf16 (a bf16 model); all else is fp32
        self.dtype = model.tok_emb.weight.dtype
        if (any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
                or self.dtype not in (torch.float32, torch.bfloat16)
                or any(t.dtype != self.dtype or not t.is_contiguous()
                       for t in (model.tok_emb.weight, model.pos_emb.weight))):
            raise _DoesNotApply
        self.keep = []                        # every tensor the table points into
        blocks = (_Block * len(model.trf_blocks))()
        for entry, block in zip(blocks, model.trf_blocks):
            gelu = getattr(block.ff, "gelu", None)
            if not (isinstance(gelu, nn.GELU) and gelu.approximate == "tanh"):
                raise _DoesNotApply
            for name, norm in (("1", block.norm1), ("2", block.norm2)):
                if not isinstance(norm, nn.LayerNorm):
                    raise _DoesNotApply
                setattr(entry, "ln" + name + "_w", self._fp32(norm.weight))
                setattr(entry, "ln" + name + "_b", self._fp32(norm.bias))
                setattr(entry, "eps" + name, norm.eps)
            for name, layer in (("qkv", block.att.qkv), ("proj", block.att.out_proj),
                                ("fc", block.ff.fc), ("fc2", block.ff.proj)):
                setattr(entry, name, self._matrix(layer))
        self.blocks = blocks
        self.heads = model.cfg["n_heads"]
        self.head_dim = model.cfg["emb_dim"] // self.heads
        norm = model.final_norm
        self.final = (self._fp32(norm.weight), self._fp32(norm.bias), norm.eps)

    def _fp32(self, t):
        """A pointer to ``t`` in fp32 (a copy, kept, for a bf16 model's small vectors)."""
        if t is None or not t.is_floating_point():
            raise _DoesNotApply
        t = t.detach().float().contiguous()
        self.keep.append(t)
        return t.data_ptr()

    def _matrix(self, layer):
        bias = getattr(layer, "bias", None)
        bias = None if bias is None else self._fp32(bias)
        if isinstance(layer, int8.Int8Linear):
            if not (int8.ENABLED and int8.DYNAMIC_Q8 is not False):
                raise _DoesNotApply
            q = layer.weight                                             # (out, in) int8
            self.keep += [q, layer.scale]
            return _Mat(_Q8, layer.out_features, layer.in_features, q.data_ptr(),
                        layer.scale.data_ptr(), bias)
        copy = cpu_kernels.packed_copy(layer)
        if not isinstance(copy, cpu_kernels.OneRow):
            raise _DoesNotApply
        self.keep.append(copy.weight)                                    # (out, in)
        kind = _BF16 if copy.dtype == torch.bfloat16 else _F32
        return _Mat(kind, copy.out_features, copy.in_features, copy.weight.data_ptr(), None,
                    bias)

    def wins(self, model):
        """Whether this model's one-token steps run faster in one call than through model.py's
        code here (engine/tuning.py: timed once per kind of model and shape, kept)."""
        return _one_call_wins(model, lambda: self.candidates(model))

    def candidates(self, model, before_plain=None):
        """{"plain": fn, "one-call C kernel": fn} for engine/tuning.py: 2 steps each
        way after a cache of up to 32 positions (zeros), the plain ones through model.py
        (this step is not registered, so one_token stands aside), each after
        ``before_plain()`` where given."""
        tokens = 2
        max_len = min(model.cfg["context_length"], 32 + tokens)
        cache = model.new_cache(1, max_len=max_len)
        cache.k.zero_(), cache.v.zero_()
        start = max_len - tokens
        ids = torch.tensor([[1]])

        def plain():
            if before_plain is not None:
                before_plain()
            cache.pos = start
            for _ in range(tokens):
                model.hidden_states(ids, cache)

        def one_call():
            cache.pos = start
            for _ in range(tokens):
                self(model, 1, cache)
        return {"plain": plain, "one-call C kernel": one_call}

    def cache_shape(self, cache):
        """The shape a KV cache of one row for this model has (C reads it by that shape)."""
        return (len(self.blocks), 1, self.heads, cache.max_len, self.head_dim)

    def __call__(self, model, token, cache):
        C = model.cfg["emb_dim"]
        out = torch.empty(1, 1, C)
        if self.lib.decode_token(
                self.blocks, len(self.blocks), C, self.heads, model.tok_emb.weight.data_ptr(),
                model.pos_emb.weight.data_ptr(), token, cache.pos, *self.final,
                cache.k.data_ptr(), cache.v.data_ptr(), cache.max_len,
                int(self.dtype == torch.bfloat16), out.data_ptr(), torch.get_num_threads()) != 0:
            raise MemoryError("one-token decoding: out of memory for its buffers")
        cache.pos += 1
        return out.to(self.dtype)


class _DoesNotApply(Exception):
    pass
