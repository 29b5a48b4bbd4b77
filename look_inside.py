"""Look inside a GPTModel: attention weights, the shapes of a forward pass, where the
parameters are (``parameter_counts``, and ``print_model_params``, which train.py prints),
what a training step costs (``flops_per_token``, as bench/train_speed.py counts MFU),
how a run went (``plot_losses``, the PNG every run leaves). The notebooks' pictures come
from here: ``plot_attention``, ``plot_next_token`` (what the sampling filters leave),
``plot_token_mask`` (which tokens an instruction-tuning loss scores), and ``token_label``,
how a token reads on an axis.

Nothing here changes model.py: the helpers watch the model's own modules with forward
hooks and recompute what they need from the layers' own weights.
"""

import math

import torch

from engine.devices import unwrap_model
from engine.fileio import atomic_write


def attention_weights(model, idx, layers=None):
    """{layer: weights (B, n_heads, T, T)} of the attention in ``layers`` (default: all).

    Row i of a head's matrix is how query position i spreads its attention over the key
    positions 0..i: softmax(q k^T / sqrt(head_dim)) with the causal mask, recomputed from
    the layer's own qkv projection applied to the input the layer received in a forward
    pass of ``idx`` (B, T). (scaled_dot_product_attention, which the model calls, never
    materialises these weights: it may fuse the softmax into the product with v.)
    """
    was_training = model.training
    model.eval()
    layers = range(len(model.trf_blocks)) if layers is None else layers
    inputs, hooks = {}, []
    for i in layers:
        att = model.trf_blocks[i].att
        hooks.append(att.register_forward_hook(
            lambda m, args, out, i=i: inputs.__setitem__(i, args[0].detach())))
    try:
        with torch.no_grad():
            model.hidden_states(idx)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return {i: _weights(model.trf_blocks[i].att, x) for i, x in inputs.items()}


def queries_keys_values(att, x):
    """The layer's q, k, v for its input x (B, T, C): three (B, n_heads, T, head_dim)."""
    B, T, C = x.shape
    q, k, v = att.qkv(x).split(C, dim=2)                                 # 3 x (B, T, C)
    return [t.view(B, T, att.n_heads, att.head_dim).transpose(1, 2)      # (B, n_heads, T, hd)
            for t in (q, k, v)]


def _weights(att, x):
    with torch.no_grad():
        q, k, _ = queries_keys_values(att, x)
        T = x.shape[1]
        scores = q @ k.transpose(-2, -1) / math.sqrt(att.head_dim)       # (B, n_heads, T, T)
        causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        return scores.masked_fill(~causal, float("-inf")).softmax(dim=-1)


def forward_shapes(model, idx):
    """[(stage, shape)] of one forward pass of ``idx``: embeddings, each block, the head."""
    shapes = [("token ids", tuple(idx.shape))]
    hooks = [model.tok_emb.register_forward_hook(
        lambda m, a, out: shapes.append(("token embedding", tuple(out.shape))))]
    hooks.append(model.pos_emb.register_forward_hook(
        lambda m, a, out: shapes.append(("position embedding (added)", tuple(out.shape)))))
    for i, block in enumerate(model.trf_blocks):
        att, ff = block.att, block.ff
        hooks.append(att.qkv.register_forward_hook(
            lambda m, a, out, i=i: shapes.append((f"block {i}: q, k, v together",
                                                  tuple(out.shape)))))
        hooks.append(ff.fc.register_forward_hook(
            lambda m, a, out, i=i: shapes.append((f"block {i}: MLP hidden (4C)",
                                                  tuple(out.shape)))))
        hooks.append(block.register_forward_hook(
            lambda m, a, out, i=i: shapes.append((f"block {i}: out", tuple(out.shape)))))
    hooks.append(model.final_norm.register_forward_hook(
        lambda m, a, out: shapes.append(("final LayerNorm", tuple(out.shape)))))
    try:
        with torch.no_grad():
            logits = model(idx)
    finally:
        for h in hooks:
            h.remove()
    return shapes + [("logits", tuple(logits.shape))]


def parameter_counts(model):
    """{part: parameters}: embeddings, attention, MLP, LayerNorms, output head.

    A tied head is the token embedding itself, so it adds nothing ("output head (tied)": 0).
    """
    tied = model.out_head.weight is model.tok_emb.weight
    counts = {"token embedding": model.tok_emb.weight.numel(),
              "position embedding": model.pos_emb.weight.numel(),
              "attention (qkv, out_proj)": 0, "MLP (fc, proj)": 0, "LayerNorms": 0}
    for block in model.trf_blocks:
        counts["attention (qkv, out_proj)"] += sum(p.numel() for p in block.att.parameters())
        counts["MLP (fc, proj)"] += sum(p.numel() for p in block.ff.parameters())
        counts["LayerNorms"] += sum(p.numel() for m in (block.norm1, block.norm2)
                                    for p in m.parameters())
    counts["LayerNorms"] += sum(p.numel() for p in model.final_norm.parameters())
    counts["output head (tied)" if tied else "output head"] = (
        0 if tied else model.out_head.weight.numel())
    return counts


def flops_per_token(model, context):
    """Training FLOPs per token of a GPTModel at ``context`` tokens: (total, N_nonemb).

    A weight does one multiply-add (2 FLOPs) per token forward and two backward (the
    gradients of the input and of the weight): 6 per weight, for the N_nonemb weights of the
    blocks and the final norm. Attention adds products that have no weights: q.k and the
    weighted sum of values, 2 x 2 x context x C per layer forward, halved by the causal mask
    (position t reads t + 1 keys), times 3 with backward: 6 x n_layers x context x C. The
    head is a C x vocab product, 6 C V (counted once even when tied to the embedding, whose
    lookup costs nothing). MFU divides (this x tokens per second) by the hardware's peak.
    """
    cfg = unwrap_model(model).cfg
    n_all = sum(p.numel() for p in model.parameters())   # a tied head is counted once
    n_emb = model.tok_emb.weight.numel() + model.pos_emb.weight.numel()
    if not cfg["tie_embeddings"]:
        n_emb += model.out_head.weight.numel()           # the head has its own term
    n_nonemb = n_all - n_emb
    C, L, V = cfg["emb_dim"], cfg["n_layers"], cfg["vocab_size"]
    return 6 * n_nonemb + 6 * L * context * C + 6 * C * V, n_nonemb


def print_model_params(model):
    """Print and return the parameter count (a tied head is counted once) and fp32 size."""
    model = unwrap_model(model)
    total = sum(p.numel() for p in model.parameters())      # parameters() skips shared ones
    head = model.out_head.weight
    tied = head is model.tok_emb.weight
    print(f"Total parameters: {total:,}" + (" (output head tied to token embedding)" if tied
                                            else f"; without the output head: "
                                                 f"{total - head.numel():,}"))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if trainable < total:       # some are frozen (LoRA: only the adapters train)
        print(f"Trainable parameters: {trainable:,} ({100 * trainable / total:.2f}%); frozen: "
              f"{total - trainable:,}")
    print(f"Size in fp32: {total * 4 / 1024**2:.1f} MB")
    return total


def plot_losses(epochs_seen, tokens_seen, train_losses, val_losses, path="loss_plot.png",
                step_losses=None, tokens_per_step=None, task_scores=None, reference_loss=None,
                reference_label="reference", seen="tokens"):
    """Save a PNG of training and validation loss against tokens seen (epochs on top).

    The losses of the evaluations make the two main curves. ``step_losses`` (the history's
    "step_loss": one per optimizer step, on that step's batch) adds a faint line that shows
    what happens between evaluations, the first steps' fall from ~10.8 included; it needs
    ``tokens_per_step`` (global batch x context length) to place the steps. ``task_scores``
    (the history's, with train.py --eval-task) draws the benchmark's headline score on a
    second axis, on the right. ``reference_loss`` draws a dotted horizontal line, labelled
    ``reference_label`` and its value: ln(vocab_size), say, the loss of a uniform guess,
    where an untrained model starts. ``seen`` names what "tokens_seen" counts (a classifier's
    texts, DPO's pairs) on the axis.
    """
    if step_losses is not None and not tokens_per_step:
        raise ValueError("step_losses needs tokens_per_step (batch_size x grad_accum_steps x "
                         "processes x context_length) to place each step on the tokens axis")
    # A Figure of its own, not pyplot's: no window and no backend to choose, so it works
    # headless, and a notebook's inline figures after it still show
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    if step_losses is not None:
        step_tokens = [tokens_per_step * (i + 1) for i in range(len(step_losses))]
        ax.plot(step_tokens, step_losses, color="tab:blue", alpha=0.3, linewidth=0.8,
                label="Training loss, each step's batch")
    ax.plot(tokens_seen, train_losses, color="tab:blue", label="Training loss")
    ax.plot(tokens_seen, val_losses, color="tab:orange", linestyle="-.", label="Validation loss")
    if reference_loss is not None:
        ax.axhline(reference_loss, color="gray", linestyle=":",
                   label=f"{reference_label}: {reference_loss:.2f}")
    ax.set_xlabel(f"{seen.capitalize()} seen")
    ax.set_ylabel("Loss")
    lines = ax.get_lines()
    if task_scores:
        task = task_scores[-1]["task"]
        metric = {"hellaswag": "acc_norm", "lambada": "acc"}.get(task, "word_perplexity")
        right = ax.twinx()
        right.plot([t["tokens_seen"] for t in task_scores], [t[metric] for t in task_scores],
                   color="tab:green", marker="o", markersize=3, label=f"{task} {metric}")
        right.set_ylabel(f"{task} {metric}", color="tab:green")
        lines += right.get_lines()
    ax.legend(lines, [ln.get_label() for ln in lines], loc="upper right")
    if len(epochs_seen) > 1 and epochs_seen[-1] > epochs_seen[0] and tokens_seen[-1] > 0:
        # a second x axis on top, in epochs: each epoch is the same number of tokens
        per_token = epochs_seen[-1] / tokens_seen[-1]
        top = ax.secondary_xaxis("top", functions=(lambda t: t * per_token,
                                                   lambda e: e / per_token))
        top.set_xlabel("Epochs")
    fig.tight_layout()
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"), by_path=True)


def token_label(tokenizer, token_id, quote=False):
    """How one token reads on a plot's axis: its text (``repr``-quoted with ``quote``, so
    that a leading space shows), or its bytes when they are not whole UTF-8 characters.

    Byte-level BPE works on bytes, so a token may hold part of a character: GPT-2's 447 is
    b'\\xe2\\x80', the first two of the three bytes of U+2019 (the curly apostrophe), and
    another token holds the third. Decoded alone, such a token is only U+FFFD, the
    replacement glyph, which says nothing; its bytes say what it is.
    """
    data = tokenizer.decode_bytes([int(token_id)])
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return repr(data)                               # b'\xe2\x80'
    return repr(text) if quote else text


def plot_attention(weights, labels, heads=(0,), title="", skip_first=True, per_row=False):
    """Heatmaps of one layer's ``weights`` (1, n_heads, T, T) for ``heads``, token labels
    on both axes (query position down, key position across), one colorbar. Returns the
    figure.

    ``skip_first`` leaves out row 0: query 0 sees only key 0, so its weight there is always
    1, and it would set the colour scale that every other row is read on. Keys after the
    query (the causal mask) are left blank: "cannot see" is not "sees little". The colour
    scale runs from 0 to the largest weight shown, the same for every head of the figure;
    ``per_row`` divides each row by its own largest weight instead, so where a row looks
    stands out even when that row spreads thinly over many keys (the colour is then
    relative to the row, not a weight).
    """
    import matplotlib
    import matplotlib.pyplot as plt
    import numpy as np

    T = weights.shape[-1]
    first = 1 if skip_first and T > 1 else 0
    w = weights[0, list(heads), first:].float().cpu()                  # (H, T - first, T)
    if per_row:
        w = w / w.amax(dim=-1, keepdim=True)
    queries = torch.arange(first, T)[:, None]                          # (T - first, 1)
    hidden = (torch.arange(T)[None, :] > queries).expand_as(w)         # after the query
    shown = np.ma.masked_array(w.numpy(), mask=hidden.numpy())
    vmax = 1.0 if per_row else float(shown.max())
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="white")

    fig, axes = plt.subplots(1, len(heads), figsize=(4.0 * len(heads) + 1.2, 4.4),
                             squeeze=False, layout="constrained")
    for j, (ax, h) in enumerate(zip(axes[0], heads)):
        image = ax.imshow(shown[j], cmap=cmap, vmin=0, vmax=vmax)
        ax.set_xticks(range(T), labels, rotation=90, fontsize=7)
        ax.set_yticks(range(T - first), labels[first:], fontsize=7)
        ax.set_title(f"{title} head {h}".strip(), fontsize=9)
        ax.set_xlabel("key (attended to)", fontsize=8)
    axes[0][0].set_ylabel("query (attending)" + (", row 0 left out" if first else ""),
                          fontsize=8)
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8,
                 label="weight / the row's largest" if per_row else "attention weight")
    return fig


def plot_next_token(probs, top, labels, panels, title=""):
    """Bar charts of next-token distributions, with the rest of the vocabulary as one bar.

    ``probs``: {name: probabilities (vocab_size,)}; ``top``: the token ids to show, one
    group of bars each, labelled ``labels``; ``panels``: {panel title: [names]}, one row
    of bars per panel. A last group, "rest of the vocabulary", holds each distribution's
    probability outside ``top``, printed on the bar: where a high temperature sends the
    probability (the long tail, invisible token by token) and what a filter cuts off (0).
    Returns the figure.
    """
    import matplotlib.pyplot as plt

    top = torch.as_tensor(top)
    n_rest = len(next(iter(probs.values()))) - len(top)
    fig, axes = plt.subplots(len(panels), 1, figsize=(11, 3.6 * len(panels)), sharex=True,
                             squeeze=False)
    for ax, (panel, names) in zip(axes[:, 0], panels.items()):
        width = 0.8 / len(names)
        for j, name in enumerate(names):
            p = probs[name].float().cpu()
            heights = torch.cat([p[top], (1 - p[top].sum()).clamp(min=0)[None]])
            x = torch.arange(len(top) + 1) + (j - (len(names) - 1) / 2) * width
            ax.bar(x, heights, width, label=name)
            ax.text(x[-1], heights[-1], f"{heights[-1]:.0%}", ha="center", va="bottom",
                    fontsize=7)
        ax.axvline(len(top) - 0.5, color="gray", linestyle=":", linewidth=1)
        ax.set_ylim(0, 1.08)
        ax.set_title(panel)
        ax.set_ylabel("probability")
        ax.legend(loc="upper center")
    axes[-1, 0].set_xticks(range(len(top) + 1),
                           [*labels, f"rest of the vocabulary\n({n_rest:,} tokens)"], rotation=60,
                           ha="right", rotation_mode="anchor")
    axes[-1, 0].set_xlabel("next token (the most likely first)")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------
# Instruction batches: which tokens the loss scores

PROMPT, SCORED, PADDING = 0, 1, 2       # token_roles' codes, plot_token_mask's colours


def token_roles(input_ids, targets, pad_id=50256):
    """What the loss does at each position of an instruction batch (dataset.pad_batch's
    ``(input_ids, targets)``, (B, L) or (L,)): a tensor of the same shape holding

    * SCORED where the target counts (not -100): there the model learns to predict the
      answer's tokens and the ``<|endoftext|>`` that ends it;
    * PADDING in the run of ``pad_id`` inputs with ignored targets that ends a row: the
      right padding pad_batch adds to rows shorter than the longest;
    * PROMPT elsewhere: the record's own tokens whose next token is not scored (the
      headers, the system and user text), read by the model but never predicted.
    """
    from engine.fused_loss import IGNORE_INDEX

    input_ids, targets = torch.as_tensor(input_ids), torch.as_tensor(targets)
    if input_ids.shape != targets.shape:
        raise ValueError(f"input_ids {tuple(input_ids.shape)} and targets "
                         f"{tuple(targets.shape)} must have the same shape")
    ignored = targets == IGNORE_INDEX
    pad_like = (input_ids == pad_id) & ignored
    # a position is padding when it and every position after it in its row look like padding
    padding = pad_like.flip(-1).long().cumprod(dim=-1).flip(-1).bool()
    roles = torch.full_like(input_ids, PROMPT)
    roles[~ignored] = SCORED
    roles[padding] = PADDING
    return roles


def plot_token_mask(tokenizer, input_ids, targets, pad_id=None, title=""):
    """The loss mask of an instruction batch as a coloured grid of tokens. Returns the
    figure.

    Each record takes two rows: its input tokens, and under each one its target (the next
    token, or -100 where the loss skips it). A column's colour is token_roles' verdict on
    that position: prompt (read, not scored), answer (scored) or padding. ``pad_id``:
    the padding token (default: the tokenizer's ``<|endoftext|>``). Token texts are
    token_label's, quoted so that spaces and newlines show.
    """
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    input_ids, targets = torch.as_tensor(input_ids), torch.as_tensor(targets)
    if input_ids.dim() == 1:
        input_ids, targets = input_ids[None], targets[None]                 # (1, L)
    pad_id = tokenizer.eot_token if pad_id is None else pad_id
    roles = token_roles(input_ids, targets, pad_id)                          # (B, L)
    B, L = input_ids.shape
    colours = {PROMPT: ("#c6dbef", "prompt: read, not scored (target -100)"),
               SCORED: ("#fd8d3c", "answer: scored (target = the next token)"),
               PADDING: ("#eeeeee", "padding: <|endoftext|> ids, not scored (target -100)")}
    grid = roles.repeat_interleave(2, dim=0)                     # (2B, L): input, target rows
    height = 1.1 * B * 2 + 1.3
    fig, ax = plt.subplots(figsize=(0.4 * L + 2.2, height))
    ax.imshow(grid.numpy(), cmap=ListedColormap([colours[r][0] for r in sorted(colours)]),
              vmin=-0.5, vmax=len(colours) - 0.5, aspect="auto", interpolation="nearest")
    for b in range(B):
        for t in range(L):
            padded = roles[b, t] == PADDING
            shown = {2 * b: "pad" if padded else token_label(tokenizer, input_ids[b, t], True),
                     2 * b + 1: ("-100" if roles[b, t] != SCORED else
                                 token_label(tokenizer, targets[b, t], True))}
            for row, text in shown.items():
                ax.text(t, row, text, ha="center", va="center", rotation=90, fontsize=7.5,
                        color="#777777" if text in ("-100", "pad") else "black")
        if b:
            ax.axhline(2 * b - 0.5, color="black", linewidth=1.5)     # between records
    ax.set_xticks(range(0, L, 5))
    ax.set_xlabel("position t in the row (the target at t is the input's token t + 1)")
    ax.set_yticks(range(2 * B), [f"record {b}: {what}" for b in range(B)
                                 for what in ("input", "target")])
    fig.legend(handles=[Patch(facecolor=c, edgecolor="gray", label=label)
                        for c, label in colours.values()],
               loc="lower center", ncol=3, fontsize=9, frameon=False)
    ax.set_title(title or f"{int((roles == SCORED).sum())} of {B * L} positions scored")
    fig.tight_layout(rect=(0, 0.4 / height, 1, 1))       # room for the legend below
    return fig
