"""The one table of GPT-2 parameter names, and the converter loop both loaders share.

    ours (model.py)              tok_emb.weight      trf_blocks.0.att.qkv.weight
    Hugging Face (transformers)  wte.weight          h.0.attn.c_attn.weight
    OpenAI (TensorFlow)          model/wte           model/h0/attn/c_attn/w
    GGUF (llama.cpp's gpt2)      token_embd.weight   blk.0.attn_qkv.weight

download_weights.py (OpenAI's TF checkpoints) and download_weights_hf.py (HF and GGUF, both
ways) are each a loop over ``gpt2_param_names``; ``iter_gpt2_weights`` does the shape checks
and the tied-head rules once for all of them.
"""

import re
from typing import NamedTuple

import torch


class Param(NamedTuple):
    """One row of the table: a GPT-2 parameter's name in each format."""
    ours: str
    hf: str
    openai_tf: str
    is_conv1d: bool
    gguf: str


# OpenAI's code (and HF, which copied it) stores the block's linear layers as "Conv1D",
# weights laid out (in, out). Our Linear uses the same layout, so every tensor copies
# across as it is; is_conv1d marks the four whose TF variables carry an extra leading
# axis of size 1 ((1, in, out)), and which GGUF stores transposed: ggml multiplies by a
# matrix held one output row after another, (out, in) to numpy. The OpenAI names drop the
# "model/" prefix; the GGUF names are those of llama.cpp's "gpt2" architecture.
_GLOBAL_PARAMS = [
    Param("tok_emb.weight", "wte.weight", "wte", False, "token_embd.weight"),
    Param("pos_emb.weight", "wpe.weight", "wpe", False, "position_embd.weight"),
    Param("final_norm.weight", "ln_f.weight", "ln_f/g", False, "output_norm.weight"),
    Param("final_norm.bias", "ln_f.bias", "ln_f/b", False, "output_norm.bias"),
]
_BLOCK_PARAMS = [
    Param("norm1.weight", "ln_1.weight", "ln_1/g", False, "attn_norm.weight"),
    Param("norm1.bias", "ln_1.bias", "ln_1/b", False, "attn_norm.bias"),
    Param("att.qkv.weight", "attn.c_attn.weight", "attn/c_attn/w", True, "attn_qkv.weight"),
    Param("att.qkv.bias", "attn.c_attn.bias", "attn/c_attn/b", False, "attn_qkv.bias"),
    Param("att.out_proj.weight", "attn.c_proj.weight", "attn/c_proj/w", True,
          "attn_output.weight"),
    Param("att.out_proj.bias", "attn.c_proj.bias", "attn/c_proj/b", False, "attn_output.bias"),
    Param("norm2.weight", "ln_2.weight", "ln_2/g", False, "ffn_norm.weight"),
    Param("norm2.bias", "ln_2.bias", "ln_2/b", False, "ffn_norm.bias"),
    Param("ff.fc.weight", "mlp.c_fc.weight", "mlp/c_fc/w", True, "ffn_up.weight"),
    Param("ff.fc.bias", "mlp.c_fc.bias", "mlp/c_fc/b", False, "ffn_up.bias"),
    Param("ff.proj.weight", "mlp.c_proj.weight", "mlp/c_proj/w", True, "ffn_down.weight"),
    Param("ff.proj.bias", "mlp.c_proj.bias", "mlp/c_proj/b", False, "ffn_down.bias"),
]
# The untied output head, (vocab, C) in both: HF's lm_head, llama.cpp's output tensor.
HF_HEAD = "lm_head.weight"
GGUF_HEAD = "output.weight"


def gpt2_param_names(n_layers):
    """All rows (``Param``: ours, hf, openai_tf, is_conv1d, gguf) for a model with
    ``n_layers`` blocks.

    The output head is not listed: GPT-2 ties it to ``wte``. Converters handle
    ``out_head.weight`` (HF_HEAD, GGUF_HEAD) themselves.
    """
    rows = list(_GLOBAL_PARAMS)
    for i in range(n_layers):
        for p in _BLOCK_PARAMS:
            rows.append(Param(f"trf_blocks.{i}.{p.ours}", f"h.{i}.{p.hf}",
                              f"h{i}/{p.openai_tf}", p.is_conv1d, f"blk.{i}.{p.gguf}"))
    return rows


def iter_gpt2_weights(gpt, fetch, source, head=None):
    """Yield ``(our_name, tensor)`` for every GPT-2 weight, in our layout, shape-checked.

    This is the one converter loop every loader uses. ``fetch(row)`` returns the source's
    tensor (torch or numpy), in our layout, for a row (``Param``) of
    ``gpt2_param_names``, or raises KeyError naming what is missing. ``gpt`` only supplies
    the expected shapes and dtype (it may live on the meta device). ``head`` is the
    source's untied output head ((vocab, C), e.g. HF's ``lm_head.weight``) or None when
    the head is the token embedding, as in GPT-2.

    ``out_head.weight`` is yielded only when ``gpt`` has an untied head; a tied model
    shares it with ``tok_emb.weight``. A classifier's head (classes, C) must come as
    ``head``. Source Q/K/V biases are dropped when ``gpt`` was built with qkv_bias=False,
    but only if they are all zero (then nothing changes).
    """
    expected = gpt.state_dict()
    n_layers = gpt.cfg["n_layers"]
    wte = None
    for row in gpt2_param_names(n_layers):
        ours = row.ours
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
        want = tuple(expected["out_head.weight"].shape)     # (vocab, C), or a classifier's
        if tuple(head.shape) != want:
            raise ValueError(f"shape mismatch for 'out_head.weight' (from {source}): the "
                             f"weights are {tuple(head.shape)}, the model expects {want}")
        head = head.to(wte.dtype).contiguous()
    if gpt.cfg["tie_embeddings"]:
        if head is not None and not torch.equal(head.to(wte.device), wte):
            raise ValueError(f"{source} has an output head different from its token embedding, "
                             f"but the model ties them; build it with tie_embeddings=False")
    else:
        if head is None and "labels" in gpt.cfg:
            raise ValueError(f"{source} has no classifier head (Hugging Face: score.weight) "
                             f"for the model's classes {gpt.cfg['labels']}")
        # An untied model starts its head from the embedding when the source has none:
        # that is exactly the function GPT-2 computes.
        yield "out_head.weight", wte if head is None else head


# ---------------------------------------------------------------------------------------
# Checking that the config and the weights agree on the number of blocks

HF_BLOCK = re.compile(r"(?:transformer\.)?h\.(\d+)\.")    # HF: "[transformer.]h.{n}."
TF_BLOCK = re.compile(r"(?:model/)?h(\d+)/")                # OpenAI: "[model/]h{n}/"
GGUF_BLOCK = re.compile(r"blk\.(\d+)\.")                    # GGUF: "blk.{n}."


def check_block_count(names, n_layers, pattern, source, config, fix):
    """Raise ValueError when the weight ``names`` hold blocks numbered ``n_layers`` or more.

    The converters fetch only the blocks the config asks for, so a config with fewer
    blocks than the weights (a stale or hand-edited n_layer) would otherwise load a
    shorter, different model without a word. Fewer blocks than the config is already an
    error (the missing weight is named). ``config`` names what says n_layer, ``fix`` says
    what to do.
    """
    blocks = [int(m.group(1)) for name in names if (m := pattern.match(name))]
    if blocks and max(blocks) >= n_layers:
        raise ValueError(f"{source} holds {max(blocks) + 1} transformer blocks but {config} "
                         f"says n_layer={n_layers}; {fix}")


def param_group(name):
    """The part of GPT-2 a parameter (by our name) belongs to, for the update-to-weight ratios
    of a training run (each step's update over the weights' norm: around 1e-3 is healthy for
    Adam; much higher and the learning rate is too high for that part, which shows there
    before the loss shows it)."""
    if "norm" in name:
        return "norms"
    if name.startswith(("tok_emb", "pos_emb", "out_head")):
        return "embeddings"
    return "attention" if ".att." in name else "mlp"
