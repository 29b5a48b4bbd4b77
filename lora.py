"""LoRA: fine-tune a pretrained GPT-2 by learning a low-rank change to some of its matrices.

Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models". Each adapted layer
keeps its pretrained weight W (in, out) and bias b frozen, and learns two small matrices:

    y = x W + b + (alpha / r) * (x A) B         A (in, r), B (r, out), r << in, out

B starts at zero, so training starts from exactly the pretrained model. With r = 8 the
adapters of the four matrices in each of GPT-2 124M's 12 blocks are 1.18M numbers
(12 x 98,304) against 124M: gradients and AdamW's two moments are needed for them alone,
which is where full fine-tuning spends most of its memory.
After training, W + (alpha / r) A B is an ordinary weight again (``merged_state``), so a
LoRA checkpoint loads, generates and exports like any other.
"""

import math

import torch
import torch.nn as nn

from model import GPTModel

# --lora-targets names -> the layer in every TransformerBlock of model.py
TARGETS = {"qkv": "att.qkv", "out_proj": "att.out_proj", "fc": "ff.fc", "proj": "ff.proj"}
DEFAULT_TARGETS = ("qkv", "out_proj", "fc", "proj")   # attention and MLP projections


class LoRALinear(nn.Module):
    """A frozen model.Linear plus the trainable low-rank change (alpha / r) * A B."""

    def __init__(self, base, rank, alpha):
        super().__init__()
        in_features, out_features = base.weight.shape                # (in, out) layout
        self.base = base
        self.rank, self.alpha = rank, alpha
        self.scale = alpha / rank
        like = {"device": base.weight.device, "dtype": base.weight.dtype}
        # A as nn.Linear initialises its weights (uniform, 1/sqrt(fan_in)), B as zeros: the
        # product starts at zero and A's gradient with it, but B's does not, so B moves first
        bound = 1 / math.sqrt(in_features)
        self.A = nn.Parameter(torch.empty(in_features, rank, **like).uniform_(-bound, bound))
        self.B = nn.Parameter(torch.zeros(rank, out_features, **like))

    def forward(self, x):                                                   # x (..., in)
        return self.base(x) + (x @ self.A) @ self.B * self.scale            # (..., out)


def add_lora(model, rank, alpha=16.0, targets=DEFAULT_TARGETS):
    """Freeze every weight of ``model`` and wrap the ``targets`` layers of every block in a
    LoRALinear; returns the model (changed in place). Only the adapters then train."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"LoRA rank must be a positive int, got {rank!r}")
    if not alpha > 0:
        raise ValueError(f"LoRA alpha must be > 0, got {alpha!r}")
    unknown = [t for t in targets if t not in TARGETS]
    if unknown or not targets:
        raise ValueError(f"unknown LoRA targets {unknown or targets!r}; choose from "
                         f"{list(TARGETS)}")
    if len(set(targets)) < len(targets):
        raise ValueError(f"LoRA targets {list(targets)!r} name a layer more than once; name "
                         f"each once")
    if lora_config(model) is not None:
        raise ValueError("the model has LoRA adapters already")
    if not model.tok_emb.weight.is_floating_point() or any(
            not b.weight.is_floating_point() for b in model.trf_blocks.modules()
            if isinstance(getattr(b, "weight", None), torch.Tensor)):
        raise ValueError("LoRA adapts float weights; load the model in fp32 or bf16, not int8")
    # A rank-r change A B of an (in, out) matrix reaches every matrix of that shape once r is
    # min(in, out); a larger r only adds weights (and memory) that change nothing.
    shapes = {t: model.trf_blocks[0].get_submodule(TARGETS[t]).weight.shape for t in targets}
    narrowest = min(shapes, key=lambda t: min(shapes[t]))
    if rank > min(shapes[narrowest]):
        n_in, n_out = shapes[narrowest]
        raise ValueError(f"LoRA rank {rank} is above {min(n_in, n_out)}, the smaller side of "
                         f"the {narrowest} matrices it adapts ({n_in} x {n_out}), so it would "
                         f"only add weights; use at most {min(n_in, n_out)} (4 to 16 is usual)")
    for p in model.parameters():
        p.requires_grad_(False)
    for block in model.trf_blocks:
        for target in targets:
            parent_name, attr = TARGETS[target].split(".")
            parent = getattr(block, parent_name)
            setattr(parent, attr, LoRALinear(getattr(parent, attr), rank, alpha))
    return model


def lora_config(model):
    """{"rank", "alpha", "targets"} of a model with adapters, None for a plain one."""
    adapted = {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}
    if not adapted:
        return None
    first = next(iter(adapted.values()))
    targets = [t for t, path in TARGETS.items() if any(n.endswith(path) for n in adapted)]
    return {"rank": first.rank, "alpha": first.alpha, "targets": targets}


def merged_state(state, config):
    """A state dict of a LoRA model -> (the plain GPTModel state dict with every adapter
    merged into its weight, {name: tensor} of the adapters alone)."""
    scale = config["alpha"] / config["rank"]
    plain, adapters = {}, {}
    for key, value in state.items():
        if key.endswith((".A", ".B")):
            adapters[key] = value
        elif ".base." in key:
            plain[key.replace(".base.", ".")] = value
        else:
            plain[key] = value
    for key_a in [k for k in adapters if k.endswith(".A")]:
        layer = key_a[:-len(".A")]
        a, b, w = adapters[key_a], adapters[f"{layer}.B"], plain[f"{layer}.weight"]
        plain[f"{layer}.weight"] = (w + scale * (a @ b)).to(w.dtype)    # W + (alpha / r) A B
    return plain, adapters


def merge(model):
    """A plain GPTModel computing what the LoRA ``model`` computes (adapters merged)."""
    config = lora_config(model)
    if config is None:
        return model
    plain, _ = merged_state(model.state_dict(), config)
    with torch.device("meta"):
        out = GPTModel(model.cfg)
    out.load_state_dict(plain, assign=True)
    if out.cfg["tie_embeddings"]:
        out.tie_weights()
    return out.train(model.training)
