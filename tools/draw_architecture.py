"""Draw GPT-2's architecture with the shapes of GPT-2 small: assets/gpt2_architecture.png.

    python tools/draw_architecture.py            # writes assets/gpt2_architecture.png

The figure follows model.py from the bottom up: token and position embeddings, n_layers
pre-LayerNorm blocks (LayerNorm -> masked multi-head attention -> residual add, LayerNorm ->
MLP with GELU -> residual add), the final LayerNorm and the output head tied to the token
embedding. The numbers come from MODEL_CONFIGS["gpt2-small (124M)"], so they stay right.
"""

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")   # no window: it runs headless
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from model import MODEL_CONFIGS  # noqa: E402

COLOURS = {"embed": "#cfe2f3", "norm": "#fff2cc", "attn": "#f4cccc", "mlp": "#d9ead3",
           "add": "#ffffff", "head": "#d9d2e9", "io": "#eeeeee"}


def box(ax, x, y, w, h, text, kind, size=9):
    ax.add_patch(FancyBboxPatch((x - w / 2, y - h / 2), w, h,
                                boxstyle="round,pad=0.02,rounding_size=0.08",
                                facecolor=COLOURS[kind], edgecolor="#444444", linewidth=1))
    ax.text(x, y, text, ha="center", va="center", fontsize=size)


def arrow(ax, x0, y0, x1, y1, color="#444444"):
    ax.add_patch(FancyArrowPatch((x0, y0), (x1, y1), arrowstyle="-|>", mutation_scale=10,
                                 color=color, linewidth=1, shrinkA=0, shrinkB=0))


def draw(path):
    cfg = MODEL_CONFIGS["gpt2-small (124M)"]
    V, T, C = cfg["vocab_size"], cfg["context_length"], cfg["emb_dim"]
    H, L = cfg["n_heads"], cfg["n_layers"]
    fig, ax = plt.subplots(figsize=(7.2, 10.5))
    ax.set_xlim(0, 10)
    ax.set_ylim(0, 15)
    ax.axis("off")
    x, w = 5.0, 5.6

    # from the bottom: the input and the two embeddings
    box(ax, 3.55, 0.6, 2.7, 0.55, "token ids  (B, T)", "io")
    box(ax, 6.45, 0.6, 2.7, 0.55, "positions 0 .. T-1", "io")
    arrow(ax, 3.55, 0.88, 3.55, 1.25)
    arrow(ax, 6.45, 0.88, 6.45, 1.25)
    box(ax, 3.55, 1.65, 2.7, 0.8, f"token embedding\nwte  ({V:,} x {C})", "embed", 8.5)
    box(ax, 6.45, 1.65, 2.7, 0.8, f"position embedding\nwpe  ({T:,} x {C})", "embed", 8.5)
    box(ax, x, 2.75, w, 0.55, f"add, dropout   ->   x  (B, T, {C})", "add")
    arrow(ax, 3.55, 2.05, 4.3, 2.47)
    arrow(ax, 6.45, 2.05, 5.7, 2.47)

    # one transformer block, drawn once, repeated n_layers times
    top, bottom = 10.75, 3.45
    ax.add_patch(FancyBboxPatch((1.2, bottom), 7.6, top - bottom,
                                boxstyle="round,pad=0.02,rounding_size=0.15",
                                facecolor="#fafafa", edgecolor="#888888", linestyle="--"))
    ax.text(8.65, top - 0.3, f"x {L} blocks", ha="right", va="center", fontsize=10,
            fontweight="bold")
    ax.text(1.4, top - 0.3, "transformer block (pre-LayerNorm)", ha="left", va="center",
            fontsize=9, style="italic")
    arrow(ax, x, 3.03, x, 3.9)
    steps = [  # (y, text, kind)
        (4.3, "LayerNorm", "norm"),
        (5.3, f"masked multi-head attention\n{H} heads x {C // H}: "
              f"softmax(q k^T / sqrt({C // H})) v\nqkv ({C} -> {3 * C}), out_proj ({C} -> {C})",
         "attn"),
        (6.35, "+   (residual)", "add"),
        (7.25, "LayerNorm", "norm"),
        (8.3, f"MLP\nfc ({C} -> {4 * C}), GELU (tanh), proj ({4 * C} -> {C})", "mlp"),
        (9.35, "+   (residual)", "add"),
    ]
    heights = {"norm": 0.5, "attn": 1.05, "add": 0.45, "mlp": 0.8}
    prev_top = 3.9
    for y, text, kind in steps:
        h = heights[kind]
        if prev_top < y - h / 2:
            arrow(ax, x, prev_top, x, y - h / 2)
        box(ax, x, y, w if kind != "add" else 2.4, h, text, kind, 8.5)
        prev_top = y + h / 2
    # the residual stream: around each sub-block, into its "+"
    for start, end in ((3.95, 6.35), (6.7, 9.35)):
        ax.plot([x, 1.75, 1.75], [start, start, end], color="#1f77b4", linewidth=1.4)
        arrow(ax, 1.75, end, x - 1.2, end, color="#1f77b4")
    ax.text(1.55, 5.15, "residual stream", rotation=90, ha="center", va="center",
            fontsize=8, color="#1f77b4")
    ax.text(x + 0.15, 10.3, f"x  (B, T, {C})", ha="left", va="center", fontsize=8)
    arrow(ax, x, 9.58, x, 11.1)

    # the end: final LayerNorm and the head tied to the token embedding
    box(ax, x, 11.4, w, 0.5, "final LayerNorm", "norm")
    arrow(ax, x, 11.65, x, 12.05)
    box(ax, x, 12.45, w, 0.8, f"output head  ({C} -> {V:,})\nweights tied to wte (the same "
                              f"matrix)", "head", 8.5)
    arrow(ax, x, 12.85, x, 13.25)
    box(ax, x, 13.55, w, 0.55, f"logits  (B, T, {V:,}) -> next-token probabilities", "io")
    ax.add_patch(FancyArrowPatch((2.2, 1.85), (2.2, 12.45), connectionstyle="arc3,rad=-0.25",
                                 arrowstyle="-", linestyle=":", color="#7f6aa6", linewidth=1.2))
    ax.text(0.45, 7.2, "one matrix", rotation=90, ha="center", va="center", fontsize=8,
            color="#7f6aa6")
    ax.text(x, 14.45, f"GPT-2 small: {L} layers, {H} heads, {C} wide, {T:,} positions, "
                      f"124M parameters", ha="center", fontsize=10, fontweight="bold")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(ROOT / "assets" / "gpt2_architecture.png"))
    print(draw(Path(parser.parse_args().out)))
