"""GPT-2 written out block by block.

    token ids (B, T)
      -> token embedding + position embedding -> dropout            (B, T, C)
      -> n_layers x [ x + Attention(LayerNorm(x)) ; x + MLP(LayerNorm(x)) ]
      -> final LayerNorm -> output head                             (B, T, vocab_size)

B is the batch size, T the number of tokens, C the embedding width (``emb_dim``).
The same module runs our own training runs and OpenAI's pretrained weights: the
converters in ``download_weights.py`` and ``download_weights_hf.py`` both go
through ``gpt2_param_names`` below.
"""

import contextlib
import glob
import math
import os
import pickle
import platform
import secrets
import socket
import weakref
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from torch.utils.weak import WeakIdKeyDictionary

# The default for training from scratch (the seed's values). A 256-token context keeps
# attention cheap; qkv_bias=False because biases on Q/K/V add little when training anew.
GPT_CONFIG_124M = {
    "vocab_size": 50257,     # GPT-2's BPE vocabulary
    "context_length": 256,   # longest sequence the model sees (positions 0..255)
    "emb_dim": 768,          # C, width of every token's vector
    "n_heads": 12,           # attention heads; head_dim = emb_dim / n_heads = 64
    "n_layers": 12,          # transformer blocks
    "drop_rate": 0.1,        # dropout on embeddings, attention weights and residual branches
    "qkv_bias": False,       # bias in the query/key/value projection
}


def _pretrained(emb_dim, n_layers, n_heads):
    # OpenAI's released models: 1024 positions, biases everywhere, no dropout at
    # inference, and the output head shares the token-embedding matrix.
    return {"vocab_size": 50257, "context_length": 1024, "emb_dim": emb_dim,
            "n_heads": n_heads, "n_layers": n_layers, "drop_rate": 0.0,
            "qkv_bias": True, "tie_embeddings": True}


MODEL_CONFIGS = {
    "gpt2-small (124M)": _pretrained(768, 12, 12),
    "gpt2-medium (355M)": _pretrained(1024, 24, 16),
    "gpt2-large (774M)": _pretrained(1280, 36, 20),
    "gpt2-xl (1558M)": _pretrained(1600, 48, 25),
}

_INT_KEYS = ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers")
_BOOL_KEYS = ("qkv_bias", "tie_embeddings")
_OPTIONAL_DEFAULTS = {"tie_embeddings": False}


def validate_config(cfg):
    """Return a checked copy of ``cfg`` with optional keys filled in.

    Raises ValueError naming the first key that is missing, unknown or out of range.
    """
    if not isinstance(cfg, dict):
        raise ValueError(f"cfg must be a dict like GPT_CONFIG_124M, got {type(cfg).__name__}")
    allowed = set(_INT_KEYS) | set(_BOOL_KEYS) | {"drop_rate"}
    for key in cfg:
        if key not in allowed:
            raise ValueError(f"unknown config key {key!r}; allowed keys: {sorted(allowed)}")
    out = {**_OPTIONAL_DEFAULTS, **cfg}
    for key in (*_INT_KEYS, "drop_rate", *_BOOL_KEYS):
        if key not in out:
            raise ValueError(f"config key {key!r} is missing; see GPT_CONFIG_124M for an example")
    for key in _INT_KEYS:
        value = out[key]
        # bool is a subclass of int in Python, so True would otherwise pass as 1
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"config key {key!r} must be a positive int, got {value!r}")
    for key in _BOOL_KEYS:
        if not isinstance(out[key], bool):
            raise ValueError(f"config key {key!r} must be True or False, got {out[key]!r}")
    rate = out["drop_rate"]
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate < 1.0:
        raise ValueError(f"config key 'drop_rate' must be a number in [0, 1), got {rate!r}")
    if out["emb_dim"] % out["n_heads"]:
        raise ValueError(
            f"config key 'emb_dim' ({out['emb_dim']}) must be divisible by "
            f"'n_heads' ({out['n_heads']}) so that every head gets the same width")
    return out


class KVCache:
    """Keys and values of the tokens seen so far, one slot per layer.

    Buffers are allocated once for ``max_len`` positions and filled in place, so a
    decoding step costs no reallocation (torch.cat would copy the whole cache every
    token). ``pos`` is the number of positions already filled.
    """

    def __init__(self, n_layers, batch_size, n_heads, max_len, head_dim, device, dtype):
        shape = (n_layers, batch_size, n_heads, max_len, head_dim)
        # empty, not zeros: a slot is always written before attention reads it
        self.k = torch.empty(shape, device=device, dtype=dtype)
        self.v = torch.empty(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.pos = 0

    def reset(self):
        self.pos = 0


class Linear(nn.Module):
    """y = x @ weight + bias, with ``weight`` stored (in_features, out_features).

    This is nn.Linear with its matrix transposed. Why: generating text one token at a
    time multiplies a single row vector by every weight matrix, so the speed is how fast
    the weights stream from memory. On CPU, ``x @ W`` with W laid out (in, out) read them
    1.3-1.7x faster than nn.Linear's ``x @ W.T`` with (out, in). It is also the layout of
    OpenAI's GPT-2 ("Conv1D"), so their checkpoints copy in without transposes. For
    training (many rows at once) both layouts run the same matrix-multiply kernels.
    """

    def __init__(self, in_features, out_features, bias=True):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(in_features, out_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        # A oneDNN-packed copy of ``weight``, set only inside GPTModel.packed_for_cpu()
        # (fast CPU decoding), and the _Packing of that block, whose ``active`` says whether
        # the copy is in use right now; None everywhere else, and never saved.
        self.packed = None
        self.packing = None

    # fp32 products on x86 CPUs go through oneDNN (see _OneDNNLinear): set to False on the
    # class (Linear.onednn_fp32 = False, the output head included) or on one layer to use
    # PyTorch's default kernels instead.
    onednn_fp32 = True

    def forward(self, x):
        if self.packed is not None and self.packing.active:
            return packed_linear(x, self.packed, self.bias)                 # (..., out)
        if self.onednn_fp32 and onednn_fp32_applies(x, self.weight):
            y = _OneDNNLinear.apply(x.reshape(-1, x.shape[-1]), self.weight, self.bias)
            return y.view(*x.shape[:-1], y.shape[-1])                       # (..., out)
        if self.bias is None:
            return x @ self.weight                                          # (..., out)
        # addmm fuses the bias add into the matrix multiply (one pass over the output)
        y = torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight)
        return y.view(*x.shape[:-1], y.shape[-1])                           # (..., out)


# ---------------------------------------------------------------------------------------
# Faster fp32 matrix products on x86 CPUs: oneDNN instead of MKL.
#
# PyTorch's CPU builds hand fp32 matmuls (torch.mm, addmm, F.linear) to Intel's MKL and
# bfloat16 ones to oneDNN, another kernel library inside PyTorch. On the AMD EPYC (Zen 5)
# these figures come from, MKL ran fp32 products at 184-214 GFLOP/s, the speed of 256-bit
# AVX2 code here, while oneDNN ran every fp32 product a training step of GPT-2 makes at
# 315-488 GFLOP/s, about 2.2x (bench/kernels.py --only sgemm). The two differ only in
# rounding (~1e-6 relative: the order in which each dot product is summed). oneDNN's linear
# op has no gradient formula in autograd, so _OneDNNLinear writes out the backward: the
# two matrix products of any linear layer, and the bias's sum. For toy sizes (under ~2M
# multiply-adds a product) oneDNN's fixed cost of ~15 us a call made it slower than MKL by
# up to 11 us; that is kept rather than a switch that depends on the shapes.


def onednn_fp32_applies(x, weight):
    """True when x @ weight should run through _OneDNNLinear: fp32 on an x86 CPU, no autocast."""
    return (x.dtype == weight.dtype == torch.float32 and x.device.type == "cpu"
            and x.numel() > 0 and not torch.is_autocast_enabled("cpu")
            and type(weight) in (torch.Tensor, nn.Parameter)       # not a sharded DTensor
            and not torch.compiler.is_compiling() and cpu_packing_available())


def onednn_mm(a, b, bias=None):
    """a (M, K) @ b (K, N) + bias, in one oneDNN call (the op wants b as an (N, K) matrix)."""
    return torch.ops.mkldnn._linear_pointwise(a, b.t(), bias, "none", [], "")


class _OneDNNLinear(torch.autograd.Function):
    """y = x @ w + bias through oneDNN: x (N, in), w (in, out), bias (out,) or None."""

    @staticmethod
    def forward(ctx, x, w, bias):
        ctx.save_for_backward(x, w)
        return onednn_mm(x, w, bias)                                      # (N, out)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):                                              # grad (N, out)
        x, w = ctx.saved_tensors
        grad_x = grad_w = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = onednn_mm(grad, w.t())                               # (N, in)
        if ctx.needs_input_grad[1]:
            # made in w's own memory order so that it adds onto .grad without a copy: the
            # output head's (vocab, C) weight arrives here as its transpose (C, vocab)
            if w.is_contiguous():
                grad_w = onednn_mm(x.t(), grad)                           # (in, out)
            else:
                grad_w = onednn_mm(grad.t(), x).t()                       # (in, out) view
        if ctx.needs_input_grad[2]:
            grad_bias = grad.sum(dim=0)                                   # (out,)
        return grad_x, grad_w, grad_bias


# ---------------------------------------------------------------------------------------
# Faster decoding on x86 CPUs: oneDNN-packed weights.
#
# Generating one token multiplies a few rows by every weight matrix, so its speed is how
# fast the weights stream from memory. oneDNN (the CPU kernel library inside PyTorch) can
# store a matrix in its own blocked layout, tiled the way its kernels read it; multiplying
# with such a "packed" copy read the 124M model's weights at 30-38 GB/s here, about what
# a plain sum over memory reaches, against 17-26 for ``x @ W`` and ~15 for F.linear
# (bench/kernels.py --only gemv). Packing costs a copy of the weights (0.4 s at 124M), so
# it pays only when they are reused for many tokens: the copies are cached per weight
# until the weight changes (an optimizer step, load_state_dict, .to()) and dropped when
# the model goes back to training mode. Training never uses them.
# The cache is keyed by the weight tensor itself, by identity (tensors compare element-wise
# with ==, so a plain WeakKeyDictionary cannot hold them); an entry goes when its weight does.
_PACKED = WeakIdKeyDictionary()     # weight Parameter -> (version key, its storage, packed copy)


def cpu_packing_available():
    """True where oneDNN's packed matmul exists and pays off: PyTorch with oneDNN on x86."""
    return (torch.backends.mkldnn.is_available()
            and platform.machine().lower() in ("x86_64", "amd64"))


def _version_key(weight):
    # Every in-place change bumps a tensor's _version; data_ptr changes when .to() or
    # load_state_dict(assign=True) swaps the storage. (Inference tensors keep no version.)
    version = None if weight.is_inference() else weight._version
    return (weight.data_ptr(), weight.dtype, version)


def cpu_matmul_dtype(weight):
    """The dtype a CPU matmul with ``weight`` runs in: autocast's when on, else the weight's."""
    return torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else weight.dtype


def packed_weight(weight, rows=8, in_out=False, dtype=None):
    """The oneDNN-packed copy of ``weight`` (cached until the weight changes).

    ``weight`` is (out, in) like nn.Linear's, or (in, out) like our Linear's with
    ``in_out=True``. ``rows`` is how many rows the products will have: oneDNN picks its
    tiling for it. Packed for 1 row, one-token steps ran ~5% faster than with the 8-row
    packing, while 8-row steps ran 1.7x slower with the 1-row one; 8 served every batch
    from 2 to 16. ``dtype`` (default: the weight's) is the precision of the copy: bfloat16
    for fp32 weights under autocast.
    """
    rows = 1 if rows == 1 else 8
    dtype = dtype or weight.dtype
    key = (*_version_key(weight), rows, dtype)
    # The storage itself is compared too (through a weak reference, which dies with it):
    # after m.to(torch.bfloat16).to(torch.float32) the allocator may give the new storage
    # the old one's address, so data_ptr alone would vouch for a copy of other weights.
    storage = weight.untyped_storage()
    cached = _PACKED.get(weight)
    if cached is None or cached[0] != key or cached[1]() is not storage or key[2] is None:
        out_in = weight.detach().t() if in_out else weight.detach()
        # from a contiguous (out, in) matrix: packing the transposed view directly gave a
        # layout that streamed ~3% slower
        out_in = out_in.to(dtype).contiguous()
        cached = (key, weakref.ref(storage), torch.ops.mkldnn._reorder_linear_weight(out_in, rows))
        _PACKED[weight] = cached
    return cached[2]


def packed_linear(x, packed, bias=None):
    """x (..., in) -> x @ W + bias (..., out), with W given as a packed_weight.

    ``x`` and ``bias`` are brought to the packed copy's dtype first, as autocast would do
    for a linear layer (autocast does not know this oneDNN op, so it converts nothing).
    """
    if x.dtype != packed.dtype:
        x = x.to(packed.dtype)
    if bias is not None and bias.dtype != packed.dtype:
        bias = bias.to(packed.dtype)
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


class _Packing:
    """What a GPTModel.packed_for_cpu block yields.

    ``head(h)`` turns final vectors (..., C) into logits; ``argmax(h)`` gives the index of
    each row's largest logit, (B, 1), which is all greedy decoding needs. ``active`` is read
    by every Linear of the model at every call: True, they multiply with their packed
    copies; False, with their own weights. generate_tokens is a generator, so the caller's
    code runs while it waits at a ``yield`` (inside the block): it sets ``active`` to False
    for that time, so that a training step or load_state_dict in between sees the real
    weights.
    """

    def __init__(self, head, argmax=None):
        self.head = head
        self.argmax = argmax or (lambda h: greedy_tokens(head(h)))
        self.active = True


def greedy_tokens(logits):
    """logits (B, vocab) -> each row's largest, (B, 1); ties go to the lowest index.

    .float(): argmax over bfloat16 has no vectorized CPU kernel and took 180 us for one row
    of 50257 logits (3% of a bf16 decoding step); converting first (exact, so the same
    token, ties included) and taking the fp32 argmax took 60 us.
    """
    return logits.float().argmax(dim=-1, keepdim=True)


def screened_argmax(h, weight, screen, row_norms):
    """argmax(h @ weight.T) of each row of h (B, C), as fp32 gives it, reading half the bytes.

    Greedy decoding needs only the largest logit, and the output head is the largest
    matrix (154 MB of the 124M model's 500 MB in fp32). So:
    1. multiply by ``screen``, a bfloat16 copy of ``weight`` (packed_weight): half the bytes;
    2. bound how far each of those logits can be from the fp32 one. bfloat16 keeps 8
       significant bits, so rounding moves every weight and every entry of h by at most
       2^-9 of itself, and logit i by at most about 2^-8 * sum_j |h_j| |w_ij| (the fp32
       sums add far less), which Cauchy-Schwarz bounds by 2^-8 * ||h|| * ||w_i||
       (``row_norms``: the ||w_i||). We take 2^-7, twice that;
    3. token i can still be the largest only if its logit plus its bound reaches the best
       of (logit - bound); recompute just those candidates in fp32 (a handful of rows on
       GPT-2-sized random weights) and take their argmax.
    Ties go to the lowest index, as with torch.argmax over all logits. "As fp32 gives it"
    holds up to the last-bit rounding in which any two fp32 kernels differ (their order of
    summation), as between ours and Hugging Face's.
    """
    h_norm = h.norm(dim=-1, keepdim=True)                                   # (B, 1)
    if torch.isfinite(h_norm).all():        # NaN or inf (a diverged model): no bound holds
        approx = packed_linear(h, screen).float()                           # (B, vocab)
        bound = 2.0 ** -7 * h_norm * row_norms                              # (B, vocab)
        floor = (approx - bound).amax(dim=-1, keepdim=True)                 # (B, 1)
        candidates = (approx + bound >= floor).any(dim=0).nonzero().squeeze(1)  # (K,) ascending
        if len(candidates) <= 4096:       # else the screen did not narrow it down
            # Each (row, candidate) dot product summed the same way, so equal weight rows
            # give equal logits and a tie goes to the lower index (a matmul may round
            # columns differently).
            exact = (h[:, None, :] * weight[candidates]).sum(dim=-1)        # (B, K) fp32
            return candidates[exact.argmax(dim=-1, keepdim=True)]           # (B, 1)
    return (h @ weight.T).argmax(dim=-1, keepdim=True)                      # all in fp32


class MultiHeadAttention(nn.Module):
    """Causal self-attention: each position looks only at itself and earlier ones."""

    def __init__(self, cfg):
        super().__init__()
        C = cfg["emb_dim"]
        self.n_heads = cfg["n_heads"]
        self.head_dim = C // self.n_heads
        self.dropout = cfg["drop_rate"]
        # One matrix makes queries, keys and values together: a single (C -> 3C) matmul
        # is faster than three (C -> C) ones, and it is exactly GPT-2's c_attn.
        self.qkv = Linear(C, 3 * C, bias=cfg["qkv_bias"])
        self.out_proj = Linear(C, C)

    def forward(self, x, cache=None, layer=0):
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)                           # 3 x (B, T, C)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)   # (B, n_heads, T, head_dim)
        k = k.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)   # (B, n_heads, T, head_dim)
        v = v.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)   # (B, n_heads, T, head_dim)

        mask, causal = None, True
        if cache is not None:
            start = cache.pos
            cache.k[layer, :, :, start:start + T] = k
            cache.v[layer, :, :, start:start + T] = v
            k = cache.k[layer, :, :, :start + T]            # (B, n_heads, start+T, head_dim)
            v = cache.v[layer, :, :, :start + T]
            if start > 0:
                # New query i sits at position start+i and may see keys 0..start+i.
                # With a single new token that is every key, so no mask is needed.
                causal = False
                if T > 1:
                    q_pos = torch.arange(start, start + T, device=x.device)[:, None]
                    mask = torch.arange(start + T, device=x.device)[None, :] <= q_pos

        # scaled_dot_product_attention computes softmax(q k^T / sqrt(head_dim)) v and picks
        # the fastest kernel it has (flash attention on CUDA). is_causal builds the
        # triangular mask on the fly, so no (T, T) mask buffer lives in the state dict.
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal and mask is None,
            dropout_p=self.dropout if self.training else 0.0)           # (B, n_heads, T, head_dim)
        y = y.transpose(1, 2).contiguous().view(B, T, C)                # (B, T, C)
        return self.out_proj(y)


class FeedForward(nn.Module):
    """Position-wise MLP: widen to 4C, GELU, project back to C."""

    def __init__(self, cfg):
        super().__init__()
        C = cfg["emb_dim"]
        self.fc = Linear(C, 4 * C)
        # GPT-2 was trained with the tanh approximation of GELU; the exact erf form gives
        # slightly different logits with OpenAI's weights.
        self.gelu = nn.GELU(approximate="tanh")
        self.proj = Linear(4 * C, C)

    def forward(self, x):
        return self.proj(self.gelu(self.fc(x)))                        # (B, T, C)


class TransformerBlock(nn.Module):
    """Pre-norm block: normalise, transform, add back onto the residual stream."""

    def __init__(self, cfg):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg["emb_dim"], eps=1e-5)
        self.att = MultiHeadAttention(cfg)
        self.norm2 = nn.LayerNorm(cfg["emb_dim"], eps=1e-5)
        self.ff = FeedForward(cfg)
        self.drop_shortcut = nn.Dropout(cfg["drop_rate"])

    def forward(self, x, cache=None, layer=0):
        x = x + self.drop_shortcut(self.att(self.norm1(x), cache, layer))   # (B, T, C)
        x = x + self.drop_shortcut(self.ff(self.norm2(x)))                  # (B, T, C)
        return x


class _AlignedLogits(torch.autograd.Function):
    """logits = h @ weight.T, written into rows whose length is a multiple of 64.

    GPT-2's vocabulary has 50257 tokens, so each row of logits is 50257 floats long and
    every row after the first starts at an address the CPU's vector units handle badly.
    The matrix multiply that writes them ran at 121 GFLOP/s here against ~190 for the
    same product written into rows of 50304 (bench/kernels.py --only headtrain), and
    the head is most of a small model's work. So the product goes into a (N, 50304)
    buffer and we return the view of its first 50257 columns: the 47 extra entries per
    row are never computed, read, sampled or counted in the loss (nanoGPT pads the
    vocabulary itself to 50304 instead, which changes the weights' shapes; we keep
    GPT-2's). Autograd cannot follow ``torch.mm(..., out=)``, hence this small Function
    with its backward written out: the two matrix products of a linear layer.
    """

    @staticmethod
    def forward(ctx, h, weight):                      # h (N, C), weight (vocab, C)
        vocab = weight.shape[0]
        rows = torch.empty(h.shape[0], -(-vocab // 64) * 64, dtype=h.dtype, device=h.device)
        logits = rows[:, :vocab]                      # (N, vocab), row stride padded
        torch.mm(h, weight.t(), out=logits)
        ctx.save_for_backward(h, weight)
        return logits

    @staticmethod
    def backward(ctx, grad):                          # grad (N, vocab)
        h, weight = ctx.saved_tensors
        grad_h = grad @ weight if ctx.needs_input_grad[0] else None             # (N, C)
        grad_weight = grad.t() @ h if ctx.needs_input_grad[1] else None        # (vocab, C)
        return grad_h, grad_weight


class GPTModel(nn.Module):
    # Set to False on a model (model.cpu_packing = False) to keep generation on CPU from
    # making oneDNN-packed weight copies (see packed_for_cpu); they cost one more copy of
    # the weights in memory.
    cpu_packing = True

    def __init__(self, cfg):
        super().__init__()
        self.cfg = validate_config(cfg)
        cfg = self.cfg
        V, T, C = cfg["vocab_size"], cfg["context_length"], cfg["emb_dim"]
        # Loaders build on the "meta" device (shapes only, see load_checkpoint), where a
        # random init is pointless and nn.Embedding's normal_() imports torch._dynamo
        # (~1 s): there we hand it an empty matrix instead. Elsewhere it draws its init as
        # it always did, so seeded runs stay the same (_init_weights redraws it below).
        meta = torch.empty(0).is_meta
        self.tok_emb = nn.Embedding(V, C, _weight=torch.empty(V, C) if meta else None)
        self.pos_emb = nn.Embedding(T, C, _weight=torch.empty(T, C) if meta else None)
        self.drop_emb = nn.Dropout(cfg["drop_rate"])
        self.trf_blocks = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg["n_layers"]))
        self.final_norm = nn.LayerNorm(cfg["emb_dim"], eps=1e-5)
        self.out_head = nn.Linear(cfg["emb_dim"], cfg["vocab_size"], bias=False)
        if cfg["tie_embeddings"]:
            # Weight tying: the head that turns vectors into token scores *is* the
            # embedding that turned tokens into vectors (one Parameter, 38.6M fewer weights
            # at 124M). OpenAI's GPT-2 does this. Training from scratch we leave it off by
            # default, as the seed did: separate matrices are easier to inspect.
            self.tie_weights()
        if self.tok_emb.weight.is_meta:
            # Built on the "meta" device (shapes only) by a loader that fills in real
            # weights next: there is nothing to initialise.
            return
        self.apply(self._init_weights)
        # GPT-2 scales the init of the projections that write into the residual stream,
        # since 2 * n_layers of them add up there: the sum's variance would grow otherwise.
        for name, p in self.named_parameters():
            if name.endswith(("att.out_proj.weight", "ff.proj.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg["n_layers"]))

    def train(self, mode=True):
        # Back to training: the packed inference copies (see packed_for_cpu) would only
        # take memory now, and every optimizer step would make them stale anyway.
        if mode:
            for p in self.parameters():
                _PACKED.pop(p, None)
        return super().train(mode)

    @contextlib.contextmanager
    def packed_for_cpu(self, batch_size=8, greedy=False):
        """Within this block every matmul reads oneDNN-packed weights (inference on CPU).

        ``batch_size``: the rows each step will have (the packing is tuned for it).
        Yields a _Packing: ``packing.head(h)`` makes the logits, ``packing.argmax(h)`` the
        greedy tokens; setting ``packing.active`` to False puts every layer back on its own
        weights until it is set True again (generate_tokens does so while it waits at a
        ``yield``). Under bf16 autocast the copies are packed in bfloat16 (cast once, not at
        every step as autocast would). ``greedy=True`` (only the argmax will be asked for)
        packs an fp32 head as a bfloat16 copy for screened_argmax: greedy tokens exactly as
        fp32 picks them, with half the head's bytes read (``head`` then multiplies with the
        plain weight).
        Where packing is not available or not wanted (not x86, no oneDNN, weights not on the
        CPU, gradients on, ``cpu_packing`` False, weights over a quarter of the RAM) nothing
        changes and the head is the plain ``out_head``.

        The copies are reused by later blocks until a weight changes (an in-place edit, an
        optimizer step, load_state_dict, .to()); an edit that autograd does not see (through
        ``.data`` or a numpy view) is not noticed: call ``model.train()`` after one, which
        drops the copies.
        """
        w = self.tok_emb.weight
        dtype = cpu_matmul_dtype(w)
        usable = (self.cpu_packing and cpu_packing_available() and w.device.type == "cpu"
                  and {w.dtype, dtype} <= {torch.float32, torch.bfloat16}
                  and type(w) in (torch.Tensor, nn.Parameter)     # not a sharded DTensor
                  and not torch.is_grad_enabled() and self._packed_copy_fits())
        if not usable:
            yield _Packing(self.out_head)
            return
        linears = [m for m in self.modules() if isinstance(m, Linear)]
        weight = self.out_head.weight                                            # (vocab, C)
        if greedy and dtype == torch.float32:
            screen = packed_weight(weight, batch_size, dtype=torch.bfloat16)
            norms = weight.detach().norm(dim=1)                                  # (vocab,)
            packing = _Packing(self.out_head,
                               lambda h: screened_argmax(h, weight, screen, norms))
        else:
            head = packed_weight(weight, batch_size, dtype=dtype)
            packing = _Packing(lambda h: packed_linear(h, head))
        try:
            for m in linears:
                m.packed = packed_weight(m.weight, batch_size, in_out=True, dtype=dtype)
                m.packing = packing
            yield packing
        finally:
            for m in linears:
                m.packed = m.packing = None

    def _packed_copy_fits(self):
        # The packed copy doubles the weights' memory while it is kept: make it only when
        # the weights take at most a quarter of the machine's RAM (gpt2-xl's 6.2 GB fp32
        # would not be copied on a 16 GB laptop). Where RAM cannot be read, assume it fits.
        weight_bytes = sum(p.numel() * p.element_size() for p in self.parameters())
        try:
            ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (AttributeError, ValueError, OSError):      # no sysconf (Windows)
            return True
        return weight_bytes <= ram // 4

    def tie_weights(self):
        """Make the output head use the token-embedding Parameter (one tensor, not two)."""
        self.out_head.weight = self.tok_emb.weight

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (Linear, nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, (Linear, nn.Linear)) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def new_cache(self, batch_size, max_len=None, device=None, dtype=None):
        """An empty KVCache sized for this model (``max_len`` defaults to the context)."""
        cfg = self.cfg
        ref = self.tok_emb.weight
        return KVCache(cfg["n_layers"], batch_size, cfg["n_heads"],
                       max_len or cfg["context_length"], cfg["emb_dim"] // cfg["n_heads"],
                       device or ref.device, dtype or ref.dtype)

    def forward(self, idx, cache=None):
        """Token ids (B, T) -> logits (B, T, vocab_size).

        With a ``cache`` the tokens are taken to follow the ``cache.pos`` tokens already
        in it; their keys and values are appended and ``cache.pos`` advances by T.
        """
        return self.logits(self.hidden_states(idx, cache))                      # (B, T, vocab)

    def logits(self, h):
        """The output head: final vectors (..., C) -> logits (..., vocab_size).

        fp32 on an x86 CPU: through oneDNN (_OneDNNLinear). Otherwise on CPU (bf16
        autocast, other CPUs) the logits are written into rows padded to a multiple of 64
        entries and handed out as a view of the first vocab_size columns (see
        _AlignedLogits): the values are exactly out_head's, only the memory between rows
        differs.
        """
        weight = self.out_head.weight                                          # (vocab, C)
        if Linear.onednn_fp32 and onednn_fp32_applies(h, weight):
            # oneDNN wrote the unpadded rows as fast as padded ones (at its ~2x speed)
            out = _OneDNNLinear.apply(h.reshape(-1, h.shape[-1]), weight.t(), None)
            return out.view(*h.shape[:-1], weight.shape[0])                    # (..., vocab)
        if (h.device.type != "cpu" or weight.shape[0] % 64 == 0
                or torch.compiler.is_compiling()):
            return self.out_head(h)
        # what autocast would do for out_head: multiply in its low-precision dtype (the
        # casts do nothing outside autocast)
        dtype = cpu_matmul_dtype(weight)
        h, weight = h.to(dtype), weight.to(dtype)
        out = _AlignedLogits.apply(h.reshape(-1, h.shape[-1]), weight)           # (N, vocab)
        return out.view(*h.shape[:-1], weight.shape[0])

    def hidden_states(self, idx, cache=None):
        """Everything but the output head: token ids (B, T) -> final-normed vectors (B, T, C)."""
        B, T = idx.shape
        start = cache.pos if cache is not None else 0
        limit = cache.max_len if cache is not None else self.cfg["context_length"]
        if start + T > self.cfg["context_length"]:
            raise ValueError(
                f"sequence of {start + T} tokens is longer than the model's context_length "
                f"{self.cfg['context_length']}; crop the input to its last "
                f"{self.cfg['context_length']} tokens (generate_text does this for you)")
        if start + T > limit:
            raise ValueError(
                f"the KV cache holds {limit} positions (its max_len), and {start} are filled: "
                f"{T} more do not fit; make the cache with a larger max_len, or reset() it")
        pos = torch.arange(start, start + T, device=idx.device)                 # (T,)
        x = self.drop_emb(self.tok_emb(idx) + self.pos_emb(pos))               # (B, T, C)
        for i, block in enumerate(self.trf_blocks):
            x = block(x, cache, i)                                              # (B, T, C)
        if cache is not None:
            cache.pos += T
        return self.final_norm(x)                                               # (B, T, C)


# ---------------------------------------------------------------------------------------
# The one table of GPT-2 parameter names.
#
# Each row: (our name, Hugging Face name, OpenAI TensorFlow name, is_conv1d).
# OpenAI's code (and HF, which copied it) stores the block's linear layers as "Conv1D",
# weights laid out (in, out). Our Linear uses the same layout, so every tensor copies
# across as it is; is_conv1d marks the four whose TF variables carry an extra leading
# axis of size 1 ((1, in, out)). The OpenAI names drop the "model/" prefix.
_GLOBAL_PARAMS = [
    ("tok_emb.weight", "wte.weight", "wte", False),
    ("pos_emb.weight", "wpe.weight", "wpe", False),
    ("final_norm.weight", "ln_f.weight", "ln_f/g", False),
    ("final_norm.bias", "ln_f.bias", "ln_f/b", False),
]
_BLOCK_PARAMS = [
    ("norm1.weight", "ln_1.weight", "ln_1/g", False),
    ("norm1.bias", "ln_1.bias", "ln_1/b", False),
    ("att.qkv.weight", "attn.c_attn.weight", "attn/c_attn/w", True),
    ("att.qkv.bias", "attn.c_attn.bias", "attn/c_attn/b", False),
    ("att.out_proj.weight", "attn.c_proj.weight", "attn/c_proj/w", True),
    ("att.out_proj.bias", "attn.c_proj.bias", "attn/c_proj/b", False),
    ("norm2.weight", "ln_2.weight", "ln_2/g", False),
    ("norm2.bias", "ln_2.bias", "ln_2/b", False),
    ("ff.fc.weight", "mlp.c_fc.weight", "mlp/c_fc/w", True),
    ("ff.fc.bias", "mlp.c_fc.bias", "mlp/c_fc/b", False),
    ("ff.proj.weight", "mlp.c_proj.weight", "mlp/c_proj/w", True),
    ("ff.proj.bias", "mlp.c_proj.bias", "mlp/c_proj/b", False),
]


def gpt2_param_names(n_layers):
    """All (ours, hf, openai_tf, is_conv1d) rows for a model with ``n_layers`` blocks.

    The output head is not listed: GPT-2 ties it to ``wte``. Converters handle
    ``out_head.weight`` (HF: ``lm_head.weight``) themselves.
    """
    rows = list(_GLOBAL_PARAMS)
    for i in range(n_layers):
        for ours, hf, tf, conv in _BLOCK_PARAMS:
            rows.append((f"trf_blocks.{i}.{ours}", f"h.{i}.{hf}", f"h{i}/{tf}", conv))
    return rows


def iter_gpt2_weights(gpt, fetch, source, head=None):
    """Yield ``(our_name, tensor)`` for every GPT-2 weight, in our layout, shape-checked.

    This is the one converter loop both loaders use. ``fetch(row)`` returns the source's
    tensor (torch or numpy) for a row ``(ours, hf, openai_tf, is_conv1d)`` of
    ``gpt2_param_names``, or raises KeyError naming what is missing. ``gpt`` only supplies
    the expected shapes and dtype (it may live on the meta device). ``head`` is the
    source's untied output head ((vocab, C), e.g. HF's ``lm_head.weight``) or None when
    the head is the token embedding, as in GPT-2.

    ``out_head.weight`` is yielded only when ``gpt`` has an untied head; a tied model
    shares it with ``tok_emb.weight``. Source Q/K/V biases are dropped when ``gpt`` was
    built with qkv_bias=False, but only if they are all zero (then nothing changes).
    """
    expected = gpt.state_dict()
    n_layers = gpt.cfg["n_layers"]
    wte = None
    for row in gpt2_param_names(n_layers):
        ours = row[0]
        try:
            tensor = torch.as_tensor(fetch(row))
        except KeyError as e:
            raise ValueError(f"{source} has no weight {e.args[0]!r} (needed for {ours!r}); is it "
                             f"a GPT-2 model with at least n_layers={n_layers} blocks?") from None
        if ours not in expected:
            if not torch.any(tensor):
                continue                        # zero biases a bias-free layer already has
            raise ValueError(f"{source} has a non-zero {ours!r} but the model has no such "
                             f"parameter; build it with qkv_bias=True, as GPT-2 was trained")
        want = expected[ours]
        if tuple(tensor.shape) != tuple(want.shape):
            raise ValueError(f"shape mismatch for {ours!r} (from {source}): the weights are "
                             f"{tuple(tensor.shape)}, the model expects {tuple(want.shape)}; "
                             f"build the model with the config these weights came with")
        tensor = tensor.to(want.dtype).contiguous()
        if ours == "tok_emb.weight":
            wte = tensor
        yield ours, tensor
    if head is not None:
        head = torch.as_tensor(head)
        if tuple(head.shape) != tuple(wte.shape):
            raise ValueError(f"shape mismatch for 'out_head.weight' (from {source}): the "
                             f"weights are {tuple(head.shape)}, the model expects "
                             f"{tuple(wte.shape)}")
        head = head.to(wte.dtype).contiguous()
    if gpt.cfg["tie_embeddings"]:
        if head is not None and not torch.equal(head.to(wte.device), wte):
            raise ValueError(f"{source} has an output head different from its token embedding, "
                             f"but the model ties them; build it with tie_embeddings=False")
    else:
        # An untied model starts its head from the embedding when the source has none:
        # that is exactly the function GPT-2 computes.
        yield "out_head.weight", wte if head is None else head


# ---------------------------------------------------------------------------------------
# Inference in a lower precision: the loaders' ``dtype=`` argument.

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_dtype(dtype):
    """``None``, a floating torch dtype, or a name in DTYPES ("bf16") -> torch dtype or None."""
    if dtype is None or dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(f"dtype must be None, one of {list(DTYPES)} or the torch dtype of one "
                     f"(e.g. torch.bfloat16), got {dtype!r}")


# ---------------------------------------------------------------------------------------
# Checkpoints: one .pth file = {"config": cfg, "model_state_dict": ..., **extra}.

def unwrap_model(model):
    """The plain GPTModel inside torch.compile / DistributedDataParallel wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):      # torch.compile
            model = model._orig_mod
        elif hasattr(model, "module") and isinstance(model.module, nn.Module):   # DDP
            model = model.module
        else:
            return model


def atomic_write(path, write, by_path=False):
    """Call ``write(f)`` on a temp file in ``path``'s folder, fsync, then rename over ``path``.

    ``os.replace`` within one folder is atomic: a crash or Ctrl-C at any moment leaves
    either the old file or the complete new one, never half of one that a later run
    would trust. Every file this project writes goes through here. ``by_path=True`` hands
    ``write`` the temp file's path instead of an open file, for writers that open the file
    themselves (safetensors' save_file; a file object would make it build the whole file
    in memory first); the file keeps the permissions it was created with.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temp_files(path)
    tmp, fd = _create_temp_file(path)
    try:
        if by_path:
            mode = os.fstat(fd).st_mode & 0o777
            os.close(fd)
            write(Path(tmp))
            os.chmod(tmp, mode)         # save_file, for one, makes its file private (0600)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        else:
            with os.fdopen(fd, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_folder(path.parent)      # so that the rename itself survives a power cut
    return path


def _temp_prefix(path, pid=""):
    # ".train.txt.tokens.u16.<host>-<pid>.": whose temp file it is, so that a later run
    # can tell the leftovers of a killed process from a file another one is still writing
    return f".{path.name}.{socket.gethostname()}-{pid}"


def _create_temp_file(path):
    """A new empty file beside ``path``: (its path, an fd open for writing).

    Not tempfile.mkstemp, which makes the file private (mode 0600): with os.open and mode
    0666 the system applies the umask, so the file ends up with the permissions a plain
    open() would give it (others can read the token cache on a shared disk, for example).
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    while True:
        tmp = path.parent / f"{_temp_prefix(path, os.getpid())}.{secrets.token_hex(4)}.tmp"
        try:
            return str(tmp), os.open(tmp, flags, 0o666)
        except FileExistsError:         # the same 32 random bits twice: draw again
            continue


def _remove_stale_temp_files(path):
    """Delete temp files of ``path`` left by processes of this machine that are gone.

    A process killed while writing (kill -9, out of memory, power loss) cannot clean up, and
    its temp file can be as large as a checkpoint. Only files whose process is known to have
    ended are removed; on Windows, where that cannot be checked the same way, none are.
    """
    if os.name == "nt":
        return
    prefix = _temp_prefix(path)
    for tmp in path.parent.glob(glob.escape(prefix) + "*.tmp"):
        pid = tmp.name[len(prefix):].split(".", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)        # signal 0: only asks whether the process exists
        except ProcessLookupError:
            try:
                tmp.unlink(missing_ok=True)
            except OSError:             # a read-only folder, say: leave it
                pass
        except OSError:                 # exists, owned by someone else
            pass


def _fsync_folder(folder):
    if os.name == "nt":                 # folders cannot be opened for fsync there
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass                            # some file systems do not support it; not fatal
    finally:
        os.close(fd)


def atomic_save(obj, path):
    """torch.save ``obj`` to ``path`` atomically (see atomic_write)."""
    return atomic_write(path, lambda f: torch.save(obj, f))


def save_checkpoint(path, model, **extra):
    """Write model weights plus their config (and anything in ``extra``) atomically."""
    model = unwrap_model(model)
    # A caller may pass model_state_dict= itself (the full state gathered from FSDP shards).
    state = extra.pop("model_state_dict", None)
    if state is None:
        state = model.state_dict()
    return atomic_save({"config": dict(model.cfg), "model_state_dict": state, **extra}, path)


def read_checkpoint(path, map_location="cpu"):
    """torch.load with weights_only=True and errors that say what went wrong."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(
            f"{str(path)!r} is a folder, not a .pth checkpoint; for a Hugging Face model "
            f"folder use download_weights_hf.load_gpt2_hf(folder), or convert it with "
            f"`python download_weights_hf.py --load FOLDER --save model.pth`")
    if not path.is_file():
        raise FileNotFoundError(
            f"checkpoint {str(path)!r} not found; train one with `python train.py` or "
            f"download one with download_weights.py")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(
            f"{str(path)!r} holds Python objects other than tensors and plain data, so it "
            f"was not loaded (loading it could run arbitrary code). Only load .pth files "
            f"you trust; re-save them as plain state dicts. Detail: {e}") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise ValueError(
            f"{str(path)!r} is truncated or is not a PyTorch checkpoint ({e}); "
            f"delete it and save or download it again") from None


def load_checkpoint(path, device=None, cfg=None, dtype=None):
    """Build a GPTModel from a .pth written by save_checkpoint.

    A bare state-dict file (no config inside) needs ``cfg=``. The model is returned in
    eval mode on ``device`` (default CPU). ``dtype`` ("bf16", torch.bfloat16, ...) converts
    the weights for inference: bf16 takes half the memory and generated 1.4-1.5x faster on a
    CPU with AVX512-BF16 (README, Performance); its tokens can differ from fp32's. None
    keeps the dtype the weights were saved in.
    """
    dtype = resolve_dtype(dtype)
    ckpt = read_checkpoint(path)
    if isinstance(ckpt, dict) and "model_state_dict" in ckpt:
        state = ckpt["model_state_dict"]
        cfg = cfg or ckpt.get("config")
    else:
        state = ckpt
    if cfg is None:
        raise ValueError(
            f"{str(path)!r} is a bare state dict with no config; pass cfg=... "
            f"(for example MODEL_CONFIGS['gpt2-small (124M)'] or GPT_CONFIG_124M)")
    if not isinstance(state, dict):
        raise ValueError(f"{str(path)!r} does not hold a state dict")
    # Build on the "meta" device (shapes only, no memory, no random init) and let the
    # loaded tensors become the parameters: the weights then exist once, not twice.
    with torch.device("meta"):
        model = GPTModel(cfg)
    try:
        model.load_state_dict(state, assign=True)
    except RuntimeError as e:
        raise ValueError(f"weights in {str(path)!r} do not fit config {cfg}: {e}") from None
    if model.cfg["tie_embeddings"]:
        # Tying keeps the embedding and drops the head: refuse when they differ (a config
        # that ties, given for weights trained untied), or the head would be lost silently.
        if not torch.equal(model.out_head.weight, model.tok_emb.weight):
            raise ValueError(
                f"{str(path)!r} has an output head different from its token embedding, but "
                f"the config ties them (tie_embeddings=True); load it with "
                f"tie_embeddings=False")
        model.tie_weights()       # assign=True gave the head a Parameter of its own
    del ckpt, state               # so that a dtype conversion frees the loaded copies
    return model.to(device=device or "cpu", dtype=dtype).eval()
