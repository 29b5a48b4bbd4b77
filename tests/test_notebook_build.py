"""build.ipynb run headless, its figures recomputed here without the notebook's code.

The notebook builds GPT-2 from a dictionary of plain tensors and asserts each piece equal to
model.py's; those asserts run inside it. Here a probe cell saves its tensors, and the tests
check what it printed against independent references: Hugging Face's GPT2LMHeadModel with
the same numbers (the logits, one AdamW step by torch.optim.AdamW on its parameters, greedy
tokens), train_model run here on the same batches (the loop's losses), and the FLOP and
cache-size formulas evaluated on transformers' own parameter count.
"""

import math
import re

import pytest
import torch
import torch.nn.functional as F

nbclient = pytest.importorskip("nbclient")

from test_notebooks import png_count, run_notebook, stdout  # noqa: E402

from dataset import create_dataloader, default_corpus_text, get_tokenizer  # noqa: E402
from engine.gpt2_params import gpt2_param_names  # noqa: E402
from model import MODEL_CONFIGS, GPTModel  # noqa: E402
from train_utils import train_model  # noqa: E402

RUN = dict(LOOP_STEPS=4, CORPUS_CHARS=10_000, CACHE_SIZE=None, CACHE_LENGTHS=(4, 8, 16),
           CACHE_REPEATS=1)
TEXT = "The for statement is used to iterate over the elements of a sequence"
PROBE = """
import torch
torch.save({"W": W, "W1": {k: v.detach() for k, v in W1.items()}, "ids": ids,
            "logits": logits.detach(), "xb": xb, "yb": yb, "by_hand": by_hand,
            "cfg": cfg}, "probe.pt")
"""


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("build")
    cells = run_notebook("build.ipynb", cwd, probe=PROBE, **RUN)
    return cells, torch.load(cwd / "probe.pt", weights_only=True)


def hf_model(cfg, W):
    """transformers' GPT-2 holding the tensors of the notebook's W (its own names, Conv1D
    weights (in, out) as ours, the head tied to wte)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=cfg["vocab_size"], n_positions=cfg["context_length"],
                        n_embd=cfg["emb_dim"], n_layer=cfg["n_layers"], n_head=cfg["n_heads"],
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        tie_word_embeddings=True)
    hf = GPT2LMHeadModel(config)
    state = {f"transformer.{row.hf}": W[row.ours] for row in gpt2_param_names(cfg["n_layers"])}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and all(k == "lm_head.weight" or k.endswith(".attn.bias")
                                  for k in missing), missing
    hf.tie_weights()
    return hf.eval()


def test_the_hand_built_model_is_hugging_faces_gpt2(built):
    cells, probe = built
    W, cfg, ids = probe["W"], probe["cfg"], probe["ids"]
    assert ids[0].tolist() == get_tokenizer().encode(TEXT)
    hf = hf_model(cfg, W)
    with torch.no_grad():
        reference = hf(ids).logits
    torch.testing.assert_close(probe["logits"], reference, rtol=1e-5, atol=1e-5)

    T, C, V = ids.shape[1], cfg["emb_dim"], cfg["vocab_size"]
    assert f"-> ids (1, {T}): {ids[0].tolist()}" in stdout(cells["embed"])
    assert f"-> x (1, {T}, {C})" in stdout(cells["embed"])
    hd, H = C // cfg["n_heads"], cfg["n_heads"]
    assert f"q, k, v of head 0: ({T}, {hd}) each; scores ({T}, {T})" in stdout(cells["one-head"])
    assert (f"q (1, {H}, {T}, {hd}) -> weights (1, {H}, {T}, {T}) -> heads (1, {H}, {T}, {hd})"
            f" -> side by side (1, {T}, {C})") in stdout(cells["heads"])
    assert f"-> hidden (B, T, 4C) = (1, {T}, {4 * C})" in stdout(cells["mlp"])
    assert f"ids (1, {T}) -> logits (1, {T}, {V}) = GPTModel's" in stdout(cells["model"])
    n = sum(p.numel() for p in hf.parameters())         # transformers counts a tied head once
    assert f"{n:,} parameters in GPTModel = {n:,} in W" in stdout(cells["model"])
    # the causal mask and the residual stream are drawn, GELU too
    assert [png_count(cells[c]) for c in ("gelu", "causal", "block")] == [1, 1, 1]


def test_the_adamw_step_by_hand_is_torch_adamw_on_hugging_faces_model(built):
    _, probe = built
    W, cfg = probe["W"], probe["cfg"]
    hf = hf_model(cfg, W).train()
    lr, wd = 1e-3, 0.1                                          # the notebook's defaults
    # weight decay on the four matrices of each block (Conv1D weights), nothing else
    decay = [p for name, p in hf.named_parameters() if name.endswith(
        ("c_attn.weight", "c_proj.weight", "c_fc.weight"))]
    rest = [p for name, p in hf.named_parameters() if all(p is not d for d in decay)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": wd},
                                   {"params": rest, "weight_decay": 0.0}], lr=lr,
                                  betas=(0.9, 0.95), eps=1e-8, foreach=False)
    logits = hf(probe["xb"]).logits                                 # (B, T, V)
    F.cross_entropy(logits.flatten(0, 1), probe["yb"].flatten()).backward()
    optimizer.step()
    hf_state = hf.state_dict()
    for row in gpt2_param_names(cfg["n_layers"]):
        ours, theirs = row.ours, row.hf
        after, by_hand = hf_state[f"transformer.{theirs}"], probe["W1"][ours]
        assert not torch.equal(after, W[ours]), ours                # the step moved it
        assert (after - by_hand).abs().max() < 0.01 * lr, ours      # rounding of the gradients


def test_the_loop_by_hand_has_train_models_losses(built):
    cells, probe = built
    tokens = get_tokenizer().encode(default_corpus_text()[:RUN["CORPUS_CHARS"]])
    cfg = probe["cfg"]
    model = GPTModel(cfg)
    model.load_state_dict({**probe["W"], "out_head.weight": probe["W"]["tok_emb.weight"]})
    loader = create_dataloader(tokens, 4, cfg["context_length"], cfg["context_length"],
                               shuffle=False)
    history = train_model(model, loader, loader, device="cpu", max_steps=RUN["LOOP_STEPS"],
                          learning_rate=1e-3, weight_decay=0.1, warmup_steps=2,
                          eval_freq=RUN["LOOP_STEPS"], eval_iter=1, start_context=None,
                          progress=False, seed=123)
    assert len(probe["by_hand"]) == RUN["LOOP_STEPS"]
    torch.testing.assert_close(torch.tensor(probe["by_hand"]),
                               torch.tensor(history["step_loss"]), rtol=1e-4, atol=1e-4)
    rows = re.findall(r"^\s*(\d+)\s+([\d.]+)\s+([\d.]+)$", stdout(cells["loop"]), re.M)
    assert [int(r[0]) for r in rows] == list(range(1, RUN["LOOP_STEPS"] + 1))
    for (_, hand, theirs), want in zip(rows, history["step_loss"]):
        assert float(hand) == pytest.approx(want, abs=2e-4)
        assert float(theirs) == pytest.approx(want, abs=2e-4)
    assert history["step_loss"][-1] < history["step_loss"][0]       # it learns


def test_flops_per_token_and_the_kv_cache(built):
    cells, probe = built
    from transformers import GPT2Config, GPT2LMHeadModel

    def formula(cfg, context):
        # N from transformers' own count: every parameter but the embeddings
        config = GPT2Config(vocab_size=cfg["vocab_size"], n_positions=cfg["context_length"],
                            n_embd=cfg["emb_dim"], n_layer=cfg["n_layers"],
                            n_head=cfg["n_heads"])
        with torch.device("meta"):
            hf = GPT2LMHeadModel(config)
        n = sum(p.numel() for name, p in hf.named_parameters()
                if not name.endswith(("wte.weight", "wpe.weight")))
        C, L, V = cfg["emb_dim"], cfg["n_layers"], cfg["vocab_size"]
        return 6 * n + 6 * L * context * C + 6 * C * V

    flops = stdout(cells["flops"])
    small = MODEL_CONFIGS["gpt2-small (124M)"]
    for name, cfg in (("this notebook's model", probe["cfg"]), ("GPT-2 small (124M)", small)):
        want = formula(cfg, cfg["context_length"]) / 1e6
        assert f"{name} at {cfg['context_length']} tokens: {want:,.1f} MFLOP per token" in flops
    assert re.search(r"tokens/s x [\d.]+ MFLOP = [\d.]+ GFLOP/s; .*; MFU [\d.]+%", flops)

    # greedy tokens with and without the cache: transformers' greedy continuation
    hf = hf_model(probe["cfg"], probe["W"])
    prompt = probe["ids"][:, :8]
    with torch.no_grad():
        greedy = hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                             max_new_tokens=16, pad_token_id=0)[0, 8:].tolist()
    assert f"the same with and without the cache: {greedy}" in stdout(cells["cache"])
    cfg = probe["cfg"]
    mib = 2 * cfg["n_layers"] * cfg["context_length"] * cfg["emb_dim"] * 4 / 2**20
    assert f"= {mib:.1f} MiB = the {mib:.1f} MiB new_cache allocates" in stdout(cells["cache"])
    timed = re.findall(r"^\s*(\d+) tokens: +[\d.]+ ms without, +[\d.]+ ms with the cache$",
                       stdout(cells["cache"]), re.M)
    assert [int(n) for n in timed] == list(RUN["CACHE_LENGTHS"])
    assert png_count(cells["cache"]) == 1


def test_the_exercises_answers(built):
    cells, probe = built
    T = probe["ids"].shape[1]
    mask = stdout(cells["answer-mask"])
    assert f"causal=True: positions whose logits change: [{T - 1}]" in mask
    assert f"causal=False: positions whose logits change: {list(range(T))}" in mask
    xl = MODEL_CONFIGS["gpt2-xl (1558M)"]
    cache = 2 * xl["n_layers"] * xl["context_length"] * xl["emb_dim"] * 2
    with torch.device("meta"):
        weights = 2 * sum(p.numel() for p in GPTModel(xl).parameters())
    assert (f"KV cache {cache / 2**20:.0f} MiB per 1,024-token sequence in bf16; weights "
            f"{weights / 2**30:.2f} GiB: {weights / cache:.1f} sequences") in stdout(
        cells["answer-cache"])
    spreads = re.findall(r"head_dim +(\d+): spread of q.k +([\d.]+) \(sqrt = +([\d.]+)\)",
                         stdout(cells["answer-scale"]))
    assert [int(d) for d, _, _ in spreads] == [16, 64, 256]
    for d, spread, root in spreads:
        assert float(root) == pytest.approx(math.sqrt(int(d)), abs=0.005)
        assert float(spread) == pytest.approx(float(root), rel=0.05)
