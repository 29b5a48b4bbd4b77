"""Issue 16: the attention weights and the other views of look_inside.py are the model's;
issue 28: the figures show what their text says (colour scales, the tail, odd tokens)."""

import math

import pytest
import torch

from conftest import cfg_from_hf, make_hf_model
from dataset import get_tokenizer
from download_weights_hf import load_weights_into_gpt
from look_inside import (
    attention_weights,
    forward_shapes,
    parameter_counts,
    plot_attention,
    plot_losses,
    plot_next_token,
    queries_keys_values,
    token_label,
)
from model import GPTModel

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")


@pytest.fixture(scope="module")
def eager_pair():
    hf = make_hf_model(seed=2)
    hf.config._attn_implementation = "eager"      # the implementation that returns weights
    ours = load_weights_into_gpt(GPTModel(cfg_from_hf(hf)), hf).eval()
    return hf, ours


def test_attention_weights_are_softmax_qk_and_give_the_layers_output(eager_pair):
    hf, ours = eager_pair
    idx = torch.randint(0, 211, (2, 17), generator=torch.Generator().manual_seed(0))
    weights = attention_weights(ours, idx)
    with torch.no_grad():
        theirs = hf(idx, output_attentions=True).attentions
    assert sorted(weights) == [0, 1, 2]
    for layer, w in weights.items():
        assert w.shape == (2, 4, 17, 17)
        torch.testing.assert_close(w, theirs[layer], atol=1e-5, rtol=1e-4)
        assert torch.all(w.triu(diagonal=1) == 0)              # the causal triangle
        torch.testing.assert_close(w.sum(-1), torch.ones(2, 4, 17))
    # and the layer's own output is those weights times v, heads merged, projected
    att = ours.trf_blocks[1].att
    seen = {}
    hook = att.register_forward_hook(lambda m, a, out: seen.update(x=a[0], out=out))
    with torch.no_grad():
        ours(idx)
        hook.remove()
        q, k, v = queries_keys_values(att, seen["x"])
        by_hand = (q @ k.transpose(-2, -1) / math.sqrt(att.head_dim)).masked_fill(
            torch.ones(17, 17, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
        torch.testing.assert_close(weights[1], by_hand)
        mixed = (weights[1] @ v).transpose(1, 2).reshape(2, 17, -1)   # (B, T, C)
        torch.testing.assert_close(att.out_proj(mixed), seen["out"], atol=1e-5, rtol=1e-5)


def test_attention_weights_leave_the_model_as_it_was(eager_pair):
    _, ours = eager_pair
    ours.train()
    attention_weights(ours, torch.tensor([[1, 2, 3]]), layers=[0])
    assert ours.training and not ours.trf_blocks[0].att._forward_hooks
    ours.eval()
    fig = plot_attention(attention_weights(ours, torch.tensor([[1, 2, 3]]))[2], ["a", "b", "c"],
                         heads=(0, 3), title="layer 2")
    assert len(fig.axes) == 3                       # two heads and their colorbar


def test_forward_shapes_follow_the_data(eager_pair):
    _, ours = eager_pair
    shapes = dict(forward_shapes(ours, torch.zeros(2, 5, dtype=torch.long)))
    assert shapes["token ids"] == (2, 5)
    assert shapes["token embedding"] == (2, 5, 48)
    assert shapes["position embedding (added)"] == (5, 48)      # one row per position
    assert shapes["block 0: q, k, v together"] == (2, 5, 144)
    assert shapes["block 2: MLP hidden (4C)"] == (2, 5, 192)
    assert shapes["final LayerNorm"] == (2, 5, 48) and shapes["logits"] == (2, 5, 211)


@pytest.mark.parametrize("tie", [True, False])
def test_parameter_counts_add_up(tie):
    model = GPTModel({"vocab_size": 100, "context_length": 16, "emb_dim": 32, "n_heads": 4,
                      "n_layers": 2, "drop_rate": 0.0, "qkv_bias": True,
                      "tie_embeddings": tie})
    counts = parameter_counts(model)
    assert sum(counts.values()) == sum(p.numel() for p in model.parameters())
    assert counts["attention (qkv, out_proj)"] == 2 * (32 * 96 + 96 + 32 * 32 + 32)
    assert counts["MLP (fc, proj)"] == 2 * (32 * 128 + 128 + 128 * 32 + 32)
    assert counts.get("output head (tied)", counts.get("output head")) == (0 if tie else 3200)


def _image(ax):
    (image,) = ax.get_images()
    return image


def test_plot_attention_leaves_out_row_0_blanks_the_mask_and_has_a_colorbar(eager_pair):
    _, ours = eager_pair
    idx = torch.tensor([[5, 9, 2, 7, 1]])
    w = attention_weights(ours, idx, layers=[1])[1]                   # (1, 4, 5, 5)
    fig = plot_attention(w, list("abcde"), heads=(1, 2), title="layer 1")
    heads, colorbar = fig.axes[:2], fig.axes[2]
    assert colorbar.get_ylabel() == "attention weight"
    for ax, h in zip(heads, (1, 2)):
        shown = _image(ax).get_array()                                # rows 1..4, keys 0..4
        assert shown.shape == (4, 5)
        assert [t.get_text() for t in ax.get_yticklabels()] == list("bcde")
        # the masked cells are exactly the keys after each query, blank rather than 0
        assert shown.mask.tolist() == [[k > q for k in range(5)] for q in range(1, 5)]
        torch.testing.assert_close(torch.tensor(shown.filled(0)), w[0, h, 1:])
    # one colour scale for both heads: 0 to the largest weight shown (not row 0's 1.0)
    largest = float(w[0, [1, 2], 1:].max())
    assert all(_image(ax).get_clim() == (0, pytest.approx(largest)) for ax in heads)
    assert largest < 1.0

    # per_row: every row divided by its largest weight
    fig = plot_attention(w, list("abcde"), heads=(0,), skip_first=False, per_row=True)
    shown = _image(fig.axes[0]).get_array()
    assert shown.shape == (5, 5) and fig.axes[1].get_ylabel() == "weight / the row's largest"
    torch.testing.assert_close(torch.tensor(shown.max(axis=1).filled(0)), torch.ones(5))
    torch.testing.assert_close(torch.tensor(shown[3, :4].filled(0)),
                               w[0, 0, 3, :4] / w[0, 0, 3].max())


def test_token_label_shows_a_partial_character_as_its_bytes():
    tokenizer = get_tokenizer()
    assert tokenizer.encode(" don\u2019t") == [836, 447, 247, 83]    # U+2019 cut in two
    assert token_label(tokenizer, 447) == "b'\\xe2\\x80'"
    assert token_label(tokenizer, 247) == "b'\\x99'"
    assert tokenizer.decode([447]) == "\ufffd"                         # what decode shows
    assert token_label(tokenizer, 836) == " don"
    assert token_label(tokenizer, 836, quote=True) == "' don'"
    assert token_label(tokenizer, 447, quote=True) == "b'\\xe2\\x80'"


def test_plot_next_token_puts_the_tail_in_one_bar():
    logits = torch.randn(1, 300, generator=torch.Generator().manual_seed(0))
    probs = {"T = 1": logits[0].softmax(-1), "T = 2": (logits[0] / 2).softmax(-1)}
    kept = logits[0].topk(5).indices
    probs["top-k = 5"] = torch.zeros(300).index_put((kept,), logits[0, kept].softmax(-1))
    top = logits[0].topk(8).indices
    fig = plot_next_token(probs, top, [f"t{i}" for i in range(8)],
                          {"temperature": ["T = 1", "T = 2"], "filters": ["top-k = 5"]},
                          title="next token")
    upper, lower = fig.axes
    bars = [[b.get_height() for b in c] for c in upper.containers]
    for heights, name in zip(bars, ("T = 1", "T = 2")):
        assert len(heights) == 9
        assert heights[:8] == pytest.approx(probs[name][top].tolist())
        assert heights[8] == pytest.approx(1 - float(probs[name][top].sum()), abs=1e-6)
    assert bars[1][8] > bars[0][8]           # a higher temperature moves mass into the tail
    (cut,) = [[b.get_height() for b in c] for c in lower.containers]
    assert cut[8] == pytest.approx(0, abs=1e-6)       # top-k leaves no tail
    assert [t.get_text() for t in upper.texts] == [f"{bars[0][8]:.0%}", f"{bars[1][8]:.0%}"]
    labels = [t.get_text() for t in lower.get_xticklabels()]
    assert labels[:8] == [f"t{i}" for i in range(8)]
    assert labels[8] == "rest of the vocabulary\n(292 tokens)"


def test_plot_losses_draws_a_reference_line(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    seen = {}
    save = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: (seen.update(fig=fig),
                                                                 save(fig, *a, **k)))
    path = plot_losses([0.5, 1.0], [100, 200], [6.0, 5.0], [6.5, 5.5], tmp_path / "loss.png",
                       reference_loss=math.log(50257), reference_label="ln(50257)")
    assert path.read_bytes()[:4] == b"\x89PNG"
    ax = seen["fig"].axes[0]
    (line,) = [ln for ln in ax.get_lines() if ln.get_label().startswith("ln(50257)")]
    assert line.get_label() == "ln(50257): 10.82"
    assert list(line.get_ydata()) == [math.log(50257)] * 2
    assert "ln(50257): 10.82" in [t.get_text() for t in ax.get_legend().get_texts()]
