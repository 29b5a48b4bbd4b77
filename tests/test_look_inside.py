"""Issue 16: the attention weights and the other views of look_inside.py are the model's."""

import math

import pytest
import torch

from conftest import cfg_from_hf, make_hf_model
from download_weights_hf import load_weights_into_gpt
from look_inside import (
    attention_weights,
    forward_shapes,
    parameter_counts,
    plot_attention,
    queries_keys_values,
)
from model import GPTModel


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
    assert len(fig.axes) == 2


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
