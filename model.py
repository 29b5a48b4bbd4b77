"""GPT-2 written out block by block (Radford et al. 2019, "Language Models are Unsupervised
Multitask Learners", section 2.3; the block is the Transformer decoder of Vaswani et al. 2017).

    token ids (B, T)
      -> token embedding + position embedding -> dropout            (B, T, C)
      -> n_layers x [ x + Attention(LayerNorm(x)) ; x + MLP(LayerNorm(x)) ]
      -> final LayerNorm -> output head                             (B, T, vocab_size)

B is the batch size, T the number of tokens, C the embedding width (``emb_dim``). The same
code runs our own training runs and OpenAI's pretrained weights (engine/gpt2_params.py maps
the names). Each speed or memory trick is one call into the engine (engine/cpu_kernels.py,
attention.py, fused_loss.py), marked "fast path", with the plain PyTorch computation right
after it. A first read can skip the checkpoint functions at the end.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from engine import attention, checkpoints, cpu_kernels, decoder, fused_loss, gelu
from engine.checkpoints import misfit, read_checkpoint, state_and_config, write_checkpoint
from engine.devices import DTYPES, resolve_dtype, unwrap_model  # noqa: F401  (model.<name> too)
from engine.int8 import is_quantized, quantize_

# The default for training from scratch (the values of Raschka's book). A 256-token context
# keeps attention cheap; qkv_bias=False because biases on Q/K/V add little when training anew.
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
    """OpenAI's released models: 1024 positions, biases, no dropout, the head tied."""
    return {"vocab_size": 50257, "context_length": 1024, "emb_dim": emb_dim,
            "n_heads": n_heads, "n_layers": n_layers, "drop_rate": 0.0,
            "qkv_bias": True, "tie_embeddings": True}


MODEL_CONFIGS = {
    "gpt2-small (124M)": _pretrained(768, 12, 12),
    "gpt2-medium (355M)": _pretrained(1024, 24, 16),
    "gpt2-large (774M)": _pretrained(1280, 36, 20),
    "gpt2-xl (1558M)": _pretrained(1600, 48, 25),
}

# OpenAI's short names for the sizes, also the folders of their downloads: "124M" -> key above
OPENAI_SIZES = {key[key.index("(") + 1:-1]: key for key in MODEL_CONFIGS}


def size_key(name):
    """One of OpenAI's sizes, "124M" or "gpt2-small (124M)" -> its MODEL_CONFIGS key."""
    key = OPENAI_SIZES.get(name, name)
    if key not in MODEL_CONFIGS:
        raise ValueError(f"unknown model size {name!r}; choose one of {list(OPENAI_SIZES)} "
                         f"or {list(MODEL_CONFIGS)}")
    return key


_INT_KEYS = ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers")
_BOOL_KEYS = ("qkv_bias", "tie_embeddings")
_OPTIONAL_DEFAULTS = {"tie_embeddings": False}


def validate_config(cfg):
    """A checked copy of ``cfg`` with optional keys filled in; ValueError names the first key
    that is missing, unknown or out of range."""
    if not isinstance(cfg, dict):
        raise ValueError(f"cfg must be a dict like GPT_CONFIG_124M, got {type(cfg).__name__}")
    allowed = set(_INT_KEYS) | set(_BOOL_KEYS) | {"drop_rate", "labels"}
    if unknown := [key for key in cfg if key not in allowed]:
        raise ValueError(f"unknown config key {unknown[0]!r}; allowed keys: {sorted(allowed)}")
    out = {**_OPTIONAL_DEFAULTS, **cfg}
    names = out.get("labels")           # a classifier's class names (classify.py)
    if names is not None and not (isinstance(names, list) and len(names) >= 2 and all(
            isinstance(n, str) and n for n in names) and len(set(names)) == len(names)):
        raise ValueError(f"config key 'labels' must be a list of at least 2 distinct, "
                         f"non-empty class names, got {names!r}")
    if names is not None and out["tie_embeddings"]:
        raise ValueError("config key 'labels' needs tie_embeddings=False: a classifier's head "
                         "scores its classes, so it cannot be the token embedding")
    if missing := [key for key in (*_INT_KEYS, "drop_rate", *_BOOL_KEYS) if key not in out]:
        raise ValueError(f"config key {missing[0]!r} is missing; see GPT_CONFIG_124M for one")
    for key in _INT_KEYS:
        value = out[key]
        # bool is a subclass of int in Python, so True would otherwise pass as 1
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"config key {key!r} must be a positive int, got {value!r}")
    if bad := [key for key in _BOOL_KEYS if not isinstance(out[key], bool)]:
        raise ValueError(f"config key {bad[0]!r} must be True or False, got {out[bad[0]]!r}")
    rate = out["drop_rate"]
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate < 1.0:
        raise ValueError(f"config key 'drop_rate' must be a number in [0, 1), got {rate!r}")
    if out["emb_dim"] % out["n_heads"]:
        raise ValueError(f"config key 'emb_dim' ({out['emb_dim']}) must be divisible by "
                         f"'n_heads' ({out['n_heads']}) so that every head gets the same width")
    return out


class KVCache:
    """Keys and values of the tokens seen so far, one slot per layer, for fast decoding.

    Buffers are allocated once for ``max_len`` positions and filled in place (torch.cat
    would copy the whole cache every token). ``pos`` is the number of positions filled.
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

    The weight layout, once for the whole project: the block matrices are (in, out), which
    is nn.Linear's matrix transposed. It is the layout of OpenAI's GPT-2 ("Conv1D", copied
    by Hugging Face), so pretrained weights copy in as they are, and when decoding (one row
    times every matrix) ``x @ W`` streams an (in, out) W faster on CPU than nn.Linear's
    ``x @ W.T`` (bench/README.md). The output head alone is an nn.Linear, (vocab, C): the
    shape of the token embedding, so that GPT-2 can tie the two into one matrix.
    """

    def __init__(self, in_features, out_features, bias=True):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(in_features, out_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def forward(self, x):                                                   # x (..., in)
        # fast path: oneDNN on x86 CPUs where it beats MKL's fp32; bf16 multiplied in fp32
        # where the CPU has no bf16 matmul kernel (cpu_kernels.linear)
        y = cpu_kernels.linear(x, self)
        if y is not None:
            return y                                                        # (..., out)
        if self.bias is None:
            return x @ self.weight                                          # (..., out)
        # addmm adds the bias inside the matrix multiply (one pass over the output)
        y = torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight)
        return y.view(*x.shape[:-1], y.shape[-1])                           # (..., out)


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

    def forward(self, x, cache=None, layer=0, mask=None):
        """``mask`` (.., T, S), True where a query may see a key; None: plain causal."""
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)                           # 3 x (B, T, C)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)   # (B, n_heads, T, head_dim)
        k = k.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)   # (B, n_heads, T, head_dim)
        v = v.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)   # (B, n_heads, T, head_dim)

        if cache is not None:   # the keys and values of the tokens before these ones, too
            start = cache.pos
            cache.k[layer, :, :, start:start + T] = k
            cache.v[layer, :, :, start:start + T] = v
            k = cache.k[layer, :, :, :start + T]            # (B, n_heads, start+T, head_dim)
            v = cache.v[layer, :, :, :start + T]

        dropout = self.dropout if self.training else 0.0
        # fast path: training on the CPU, softmax and dropout in C (engine/attention.py)
        if (y := attention.causal(q, k, v, dropout, mask)) is None:
            # scaled_dot_product_attention: softmax(q k^T / sqrt(head_dim)) v, by the fastest
            # kernel it has (flash attention on CUDA). is_causal masks on the fly (no (T, T)
            # buffer to keep); one new token after a cache (T = 1) sees every key: no mask.
            y = F.scaled_dot_product_attention(                 # (B, n_heads, T, head_dim)
                q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=mask is None and T > 1)
        y = y.transpose(1, 2).contiguous().view(B, T, C)                # (B, T, C)
        return self.out_proj(y)


class FeedForward(nn.Module):
    """Position-wise MLP: widen to 4C, GELU, project back to C."""

    def __init__(self, cfg):
        super().__init__()
        C = cfg["emb_dim"]
        self.fc = Linear(C, 4 * C)
        # GPT-2 was trained with the tanh approximation of GELU (the exact erf form gives
        # slightly different logits with OpenAI's weights). nn.GELU; fast path: engine/gelu.py
        self.gelu = gelu.GELU(approximate="tanh")
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
        # nn.Dropout; fast path: on the CPU its mask is drawn in C (engine/attention.py)
        self.drop_shortcut = attention.Dropout(cfg["drop_rate"])

    def forward(self, x, cache=None, layer=0, mask=None):
        x = x + self.drop_shortcut(self.att(self.norm1(x), cache, layer, mask))  # (B, T, C)
        x = x + self.drop_shortcut(self.ff(self.norm2(x)))                  # (B, T, C)
        return x


class GPTModel(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg = validate_config(cfg)
        V, T, C = cfg["vocab_size"], cfg["context_length"], cfg["emb_dim"]
        # On the "meta" device (loaders: shapes only) nn.Embedding's init would import
        # torch._dynamo (slow) for nothing; elsewhere it draws as always (same seeded runs).
        meta = torch.empty(0).is_meta
        self.tok_emb = nn.Embedding(V, C, _weight=torch.empty(V, C) if meta else None)
        self.pos_emb = nn.Embedding(T, C, _weight=torch.empty(T, C) if meta else None)
        self.drop_emb = attention.Dropout(cfg["drop_rate"])              # nn.Dropout, as above
        self.trf_blocks = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg["n_layers"]))
        self.final_norm = nn.LayerNorm(C, eps=1e-5)
        tied = cfg["tie_embeddings"]    # then the head has no matrix of its own to allocate
        # a classifier's head (classify.py) scores its classes instead of the vocabulary
        n = len(cfg["labels"]) if "labels" in cfg else V
        self.out_head = nn.Linear(C, n, bias=False, device="meta" if tied else None)  # (n, C)
        if tied:
            # Weight tying, as in OpenAI's GPT-2: the head that scores tokens *is* the embedding
            # that made their vectors (38.6M fewer weights at 124M). Off by default from
            # scratch, as in Raschka's book (GPT_CONFIG_124M).
            self.tie_weights()
        if self.tok_emb.weight.is_meta:
            return          # a loader fills in real weights next: nothing to initialise
        self.apply(self._init_weights)
        # GPT-2 scales the init of the projections that write into the residual stream,
        # since 2 * n_layers of them add up there: the sum's variance would grow otherwise.
        for name, p in self.named_parameters():
            if name.endswith(("att.out_proj.weight", "ff.proj.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg["n_layers"]))

    def train(self, mode=True):
        if mode:    # fast path's packed inference copies would only take memory now
            cpu_kernels.forget_packed(self.parameters())
        return super().train(mode)

    def tie_weights(self):      # the output head uses the token-embedding Parameter
        self.out_head.weight = self.tok_emb.weight

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (Linear, nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, (Linear, nn.Linear)) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def new_cache(self, batch_size, max_len=None, device=None, dtype=None):
        """An empty KVCache sized for this model (``max_len`` defaults to the context)."""
        cfg, ref = self.cfg, self.tok_emb.weight
        return KVCache(cfg["n_layers"], batch_size, cfg["n_heads"],
                       max_len or cfg["context_length"], cfg["emb_dim"] // cfg["n_heads"],
                       device or ref.device, dtype or ref.dtype)

    def forward(self, idx, cache=None, attention_mask=None, targets=None):
        """Token ids (B, T) -> logits (B, T, vocab_size); with ``targets`` (B, T), the loss.

        With a ``cache`` the tokens are taken to follow the ``cache.pos`` tokens already
        in it; their keys and values are appended and ``cache.pos`` advances by T.
        ``attention_mask`` (B, cache.pos + T), 1 for tokens and 0 for left padding: then no
        token attends to padding, and positions count from each row's first token.
        """
        h = self.hidden_states(idx, cache, attention_mask)                      # (B, T, C)
        return self.logits(h) if targets is None else self.loss(h, targets)

    def hidden_states(self, idx, cache=None, attention_mask=None):
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
        if (h := decoder.one_token(self, idx, cache, attention_mask)) is not None:
            return h    # fast path: one token of one row, all blocks in one C call (1, 1, C)
        pos = torch.arange(start, start + T, device=idx.device)                 # (T,)
        mask = None             # plain causal attention
        if attention_mask is not None or (start > 0 and T > 1):
            # query i (at start + i) sees keys 0..start + i: explicit, because the keys
            # before ``start`` come from the cache
            keys = torch.arange(start + T, device=idx.device)                   # (S,)
            mask = keys <= keys[start:, None]                                   # (T, S)
        if attention_mask is not None:
            # left padding: no query sees it (a padding query sees itself, so that no row
            # of attention is empty), and each row counts positions from its first token
            real = attention_mask.bool()                                        # (B, S)
            mask = (mask & (real[:, None, :] | (keys == keys[start:, None])))[:, None]
            pos = (real.cumsum(-1) - 1).clamp(min=0)[:, start:]                 # (B, T)
        x = self.drop_emb(self.tok_emb(idx) + self.pos_emb(pos))               # (B, T, C)
        for i, block in enumerate(self.trf_blocks):
            x = block(x, cache, i, mask)                                        # (B, T, C)
        if cache is not None:
            cache.pos += T
        return self.final_norm(x)                                               # (B, T, C)

    def logits(self, h):
        """The output head: final vectors (..., C) -> logits (..., vocab_size)."""
        # fast path on CPU: oneDNN, or logits in rows aligned to 64 (cpu_kernels.head_logits)
        out = cpu_kernels.head_logits(h, self.out_head.weight)
        return out if out is not None else self.out_head(h)                    # (..., vocab)

    def loss(self, h, targets):
        """The training objective: mean cross-entropy of next-token logits (..., vocab)."""
        # fast path: the same number without holding all logits (engine/fused_loss.py)
        out = fused_loss.head_cross_entropy(h, self.out_head.weight, targets)
        return out if out is not None else F.cross_entropy(
            self.logits(h).flatten(0, -2).float(), targets.flatten())          # (B*T, vocab)


# ---------------------------------------------------------------------------------------
# Checkpoints: one .pth file = {"config": cfg, "model_state_dict": ..., **extra}.

def save_checkpoint(path, model, **extra):
    """Write model weights plus their config (and anything in ``extra``) atomically."""
    model = unwrap_model(model)
    if is_quantized(model):
        raise ValueError("an int8 model is for inference: save the float model it came from")
    # A caller may pass model_state_dict= itself (the full state gathered from FSDP shards).
    if (state := extra.pop("model_state_dict", None)) is None:
        state = model.state_dict()
    return write_checkpoint(path, model.cfg, state, **extra)


def load_checkpoint(path, device=None, cfg=None, dtype=None):
    """Build a GPTModel from a .pth written by save_checkpoint (its checksums verified).

    A bare state-dict file (no config inside) needs ``cfg=``. The model is returned in
    eval mode on ``device`` (default CPU). ``dtype`` ("bf16", torch.bfloat16, ...) converts
    the weights for inference (bf16: half the memory; its tokens can differ from fp32's);
    "int8" stores every matrix in 8 bits (a quarter of the memory, engine/int8.py).
    """
    int8 = dtype == "int8"      # every matrix in 8 bits after loading (engine/int8.py)
    dtype = resolve_dtype(None if int8 else dtype)
    # the weights and their config (or cfg=, for a bare state dict), checked against each other
    state, cfg = state_and_config(read_checkpoint(path), path, config_from(cfg),
                                  normalize=validate_config)
    # Build on the "meta" device (shapes only, no memory, no random init) and let the
    # loaded tensors become the parameters: the weights then exist once, not twice.
    with torch.device("meta"):
        model = GPTModel(cfg)
    try:
        model.load_state_dict(state, assign=True)
    except RuntimeError:    # its message lists every key: say what differs, in one line
        raise ValueError(f"weights in {str(path)!r} do not fit config {cfg}: "
                         f"{misfit(state, model.state_dict())}; pass the config they were "
                         f"trained with") from None
    if model.cfg["tie_embeddings"]:
        # Tying keeps the embedding and drops the head: refuse when they differ (a config
        # that ties, given for weights trained untied), or the head would be lost silently.
        if not torch.equal(model.out_head.weight, model.tok_emb.weight):
            raise ValueError(
                f"{str(path)!r} has an output head different from its token embedding, but "
                f"the config ties them (tie_embeddings=True); load it with "
                f"tie_embeddings=False")
        model.tie_weights()       # assign=True gave the head a Parameter of its own
    del state                     # so that a dtype conversion frees the loaded copies
    model = model.to(device=device or "cpu", dtype=dtype).eval()
    return quantize_(model) if int8 else model


def config_from(value):
    """A config dict from a dict, one of OpenAI's sizes ("124M", ...), or a JSON file holding
    one: what ``cfg=`` and the command lines' ``--config`` take for a bare state dict."""
    if str(value) in OPENAI_SIZES or str(value) in MODEL_CONFIGS:
        return dict(MODEL_CONFIGS[size_key(str(value))])
    return checkpoints.config_file(value, list(OPENAI_SIZES))     # a dict (or None) as it is
