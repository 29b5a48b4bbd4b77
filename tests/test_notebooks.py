"""The three notebooks, executed headless with nbclient on tiny models, offline.

Each run copies a notebook, appends overrides to the end of its "parameters" cell (so they
win over the defaults, as papermill would inject them) and runs it with the python3 kernel in
a temporary folder. A probe cell appended to the copy reports a few variables as JSON. The
assertions compare what the notebook printed, displayed and wrote with references computed
here: our own loss and generation calls, and transformers' GPT2LMHeadModel.generate.
"""

import ast
import json
import math
import os
import re
import threading
from collections import Counter

import nbformat
import pytest
import torch

nbclient = pytest.importorskip("nbclient")

from conftest import ROOT, make_hf_model  # noqa: E402
from dataset import (  # noqa: E402
    GPTDataset,
    create_dataloader,
    default_corpus_text,
    get_tokenizer,
    load_tokens,
)
from engine.fileio import file_sha256  # noqa: E402
from generate import filtered_probs, generate_text, text_to_token_ids, token_ids_to_text  # noqa: E402
from look_inside import attention_weights, token_label  # noqa: E402
from model import GPTModel, load_checkpoint, read_checkpoint, save_checkpoint  # noqa: E402
from test_evaluate import hellaswag_records, write_jsonl  # noqa: E402
from train_utils import calc_loss_batch, calc_loss_loader  # noqa: E402

NOTEBOOKS = ("build.ipynb", "train.ipynb", "inference.ipynb", "inference_hf.ipynb",
             "instruct.ipynb", "tokenizer.ipynb", "classify.ipynb", "dpo.ipynb")
PROMPT = "The for statement"
ATTENTION_PROMPT = "The for statement is used to iterate over the elements of a sequence"
NEW_TOKENS = 8
SAMPLING = {"temperature": 0.8, "top_k": 50, "top_p": 0.95}    # the inference defaults
SEED = 123
# Variables every inference notebook run reports through the probe cell.
PROBE = """
import json, sys
print(json.dumps({"sampled": sampled[0].tolist(), "greedy": greedy[0].tolist(),
                  "tensorflow_imported": "tensorflow" in sys.modules,
                  "dtype": str(gpt.tok_emb.weight.dtype)}))
"""


def parameters_cell(nb):
    cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(cells) == 1, "a notebook needs exactly one cell tagged 'parameters'"
    return cells[0]


def run_notebook(name, cwd, probe=None, threads=None, **params):
    """Execute a copy of ``name`` in ``cwd`` with ``params`` injected; {cell id: cell}.

    ``threads``: the kernel's torch threads (OMP_NUM_THREADS, which the kernel inherits): a
    tiny model runs many times faster on one (its matmuls are too small to share), and on a
    busy machine threads wait for each other."""
    nb = nbformat.read(ROOT / name, as_version=4)
    cell = parameters_cell(nb)
    overrides = {"REPO_ROOT": str(ROOT), **params}
    cell.source += "\n\n# injected by tests/test_notebooks.py\n" + "".join(
        f"{key} = {value!r}\n" for key, value in overrides.items())
    if probe:
        probe_cell = nbformat.v4.new_code_cell(probe)
        probe_cell.id = "probe"
        nb.cells.append(probe_cell)
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(cwd)}})
    before = os.environ.get("OMP_NUM_THREADS")
    if threads is not None:
        os.environ["OMP_NUM_THREADS"] = str(threads)
    try:
        client.execute()
    finally:
        if threads is not None and before is None:
            del os.environ["OMP_NUM_THREADS"]
        elif threads is not None:
            os.environ["OMP_NUM_THREADS"] = before
        nbformat.write(nb, cwd / f"executed-{name}")      # outputs kept for a failing run
    return {c.id: c for c in nb.cells}


# The random model the tuning notebooks (instruct, classify, dpo) start from in their tests.
TINY_START = {"vocab_size": 50257, "context_length": 64, "emb_dim": 32, "n_heads": 2,
              "n_layers": 2, "drop_rate": 0.0, "qkv_bias": True}


def run_from_tiny_model(name, cwd, **params):
    """``name`` run with a random TINY_START model saved in ``cwd`` as its INIT_FROM, on one
    thread: {cell id: cell}."""
    torch.manual_seed(0)
    save_checkpoint(cwd / "tiny.pth", GPTModel(TINY_START))
    return run_notebook(name, cwd, threads=1, INIT_FROM=str(cwd / "tiny.pth"), **params)


def stdout(cell):
    return "".join(o.text for o in cell.outputs
                   if o.output_type == "stream" and o.name == "stdout")


def numbers(pattern, text):
    """The numbers ``pattern``'s groups capture in ``text`` (which must match), as floats."""
    match = re.search(pattern, text)
    assert match, (pattern, text)
    return [float(g) for g in match.groups()]


def result_text(cell):
    return "".join(o.data.get("text/plain", "") for o in cell.outputs
                   if o.output_type == "execute_result")


def png_count(cell):
    return sum("image/png" in o.get("data", {}) for o in cell.outputs
               if o.output_type == "display_data")


@pytest.fixture(autouse=True)
def inline_plots(monkeypatch):
    # The kernel inherits our environment; a backend set there would hide inline figures.
    monkeypatch.delenv("MPLBACKEND", raising=False)


# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebooks_are_committed_with_clean_outputs(name):
    # committed as tools/execute_notebooks.py leaves them: every code cell run, figures in,
    # no machine paths, no progress-bar debris, no errors, small enough to browse
    path = ROOT / name
    assert path.stat().st_size < 1_500_000
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.kernelspec.name == "python3"
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# ")
    # the first cell says what the notebook teaches and where it sits in the learning path
    assert "**Read before:**" in nb.cells[0].source, f"{name}: say what to read before it"
    assert nb.cells[1] is parameters_cell(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1)), "not run in order"
    for cell in code:
        assert "input(" not in cell.source and "import tensorflow" not in cell.source
        assert not re.search(r"^\s*(class\b|for .* in .*loader)", cell.source, re.M), cell.id
        for out in cell.outputs:
            assert out.output_type != "error", (cell.id, out.get("evalue"))
            text = out.get("text", "") + str(out.get("data", {}).get("text/plain", ""))
            assert "\r" not in text, f"{cell.id}: progress-bar debris"
            assert not re.search(r"(/root/|/home/|/tmp/|/Users/|[A-Z]:\\)", text), cell.id
        if "plt.show()" in cell.source or "display(Image" in cell.source:
            assert any("image/png" in o.get("data", {}) for o in cell.outputs), cell.id
    # the parameters are plain `NAME = literal` lines, so anything can override them
    params = ast.parse(parameters_cell(nb).source).body
    assert params and all(isinstance(s, ast.Assign) and isinstance(s.targets[0], ast.Name)
                          for s in params)
    for statement in params:
        ast.literal_eval(statement.value)
    names = {s.targets[0].id for s in params}
    assert {"REPO_ROOT", "DEVICE", "SEED"} <= names


# ---------------------------------------------------------------------------------------
# train.ipynb

TINY_TRAIN = dict(CONTEXT_LENGTH=32, EMB_DIM=32, N_HEADS=2, N_LAYERS=2, DROP_RATE=0.0)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """train.ipynb run on 6 kB of text with a 2-layer, 32-wide model, scoring 3 HellaSwag
    examples at each evaluation: (folder, cells)."""
    cwd = tmp_path_factory.mktemp("train")
    data = cwd / "corpus" / "my_text.txt"
    data.parent.mkdir()
    data.write_text(default_corpus_text()[:6_000])
    hellaswag = write_jsonl(cwd / "hs.jsonl", hellaswag_records(4, seed=5))
    cells = run_notebook(
        "train.ipynb", cwd, DATA_PATH=str(data), **TINY_TRAIN, NUM_EPOCHS=1, BATCH_SIZE=4,
        EVAL_FREQ=5, EVAL_ITER=2, MAX_STEPS=20, START_CONTEXT=PROMPT, MAX_NEW_TOKENS=NEW_TOKENS,
        EVAL_TASK="hellaswag:3", EVAL_DATA=str(hellaswag), **tiny_finetune(cwd))
    return cwd, cells


def tiny_finetune(cwd):
    """Section 8's parameters for a few steps on the start of the shipped second text."""
    text = cwd / "second" / "docstrings.txt"
    text.parent.mkdir()
    text.write_text((ROOT / "data" / "docstrings" / "docstrings.txt").read_text()[:8_000])
    return dict(FT_DATA_PATH=str(text), FT_STEPS=4, FT_EVAL_FREQ=2, FT_LORA_RANK=4)


def test_train_notebook(trained):
    cwd, cells = trained
    corpus = cwd / "corpus"
    assert all((corpus / name).is_file() for name in ("train.txt", "valid.txt", "test.txt"))

    ckpt_path = cwd / "model_weights" / "trained_gpt2.pth"
    ckpt = read_checkpoint(ckpt_path)
    assert ckpt["settings"]["num_epochs"] == 1 and ckpt["settings"]["batch_size"] == 4
    assert 0 < ckpt["step"] <= 20
    gpt = load_checkpoint(ckpt_path)
    assert {k: gpt.cfg[k] for k in ("context_length", "emb_dim", "n_layers", "vocab_size")} \
        == {"context_length": 32, "emb_dim": 32, "n_layers": 2, "vocab_size": 50257}
    assert "'emb_dim': 32" in result_text(cells["config"])

    history = json.loads((cwd / "model_weights" / "trained_gpt2_history.json").read_text())
    assert history["final_step"] == ckpt["step"]
    assert history["train_loss"][-1] < history["train_loss"][0]       # it learned something
    train_out = stdout(cells["train"])
    assert "Train loss" in train_out and "Val loss" in train_out
    # train_model's sample after the epoch: its lines after "| ", newlines as newlines
    assert any(line.startswith("| " + PROMPT) for line in train_out.splitlines())
    assert "\\n" not in train_out
    # EVAL_TASK reached train_model: the benchmark scored at every evaluation
    assert [t["step"] for t in history["task_scores"]] == history["step"]
    assert {t["n"] for t in history["task_scores"]} == {3}
    assert ", hellaswag acc_norm " in train_out

    plot = cwd / "model_weights" / "trained_gpt2_loss.png"
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png_count(cells["plot"]) == 1

    # the printed test loss is the checkpoint's loss on test.txt
    match = re.search(r"Test loss ([\d.]+), perplexity ([\d.]+)", stdout(cells["test"]))
    assert match, stdout(cells["test"])
    test_loader = create_dataloader(load_tokens(corpus / "test.txt"), 4, 32, 32, shuffle=False,
                                    drop_last=False)
    with torch.no_grad():
        test_loss = calc_loss_loader(test_loader, gpt, "cpu")
    assert float(match[1]) == pytest.approx(test_loss, abs=1e-3)
    assert float(match[2]) == pytest.approx(math.exp(test_loss), rel=1e-3)

    assert stdout(cells["generate"]).startswith(PROMPT)
    assert len(stdout(cells["generate"])) > len(PROMPT) + 1


def test_train_notebook_by_hand_cells(trained):
    # The cells that work things out by hand assert their equalities inside the notebook;
    # here their printed figures are checked against references computed independently.
    cwd, cells = trained
    tokenizer = get_tokenizer()
    corpus = cwd / "corpus"
    tokens = stdout(cells["tokens"])
    assert "' for' -> [329]" in tokens and "'for' -> [1640]" in tokens
    assert "' coroutines' -> [\"' cor'\", \"'out'\", \"'ines'\"]" in tokens
    assert "'<|endoftext|>' -> [50256]" in tokens and "encode refuses" in tokens
    text = (corpus / "train.txt").read_text()
    n_tokens = len(load_tokens(corpus / "train.txt"))
    assert (f"{len(text):,} characters / {n_tokens:,} tokens = "
            f"{len(text) / n_tokens:.2f} characters per token") in tokens

    assert "equal to look_inside.attention_weights" in stdout(cells["head"])
    assert png_count(cells["architecture"]) == 1

    # the first training window, input and target side by side
    window = GPTDataset(load_tokens(corpus / "train.txt"), None, 32, 32)[0]
    rows = stdout(cells["window"]).splitlines()[1:11]
    for t, row in enumerate(rows):
        assert row == (f"{t:3d}  {token_label(tokenizer, window[0][t], quote=True):<18}"
                       f"{token_label(tokenizer, window[1][t], quote=True)}")

    # the loss by hand is the untrained model's: the same seed builds the same weights
    torch.manual_seed(SEED)
    untrained = GPTModel({**load_checkpoint(cwd / "model_weights" / "trained_gpt2.pth").cfg,
                          "drop_rate": 0.0}).eval()
    with torch.no_grad():
        want = calc_loss_batch(window[0][None], window[1][None], untrained, "cpu").item()
    match = re.search(r"loss by hand ([\d.]+) = calc_loss_batch ([\d.]+); ln\(50,257\) = "
                      r"10\.8249", stdout(cells["loss"]))
    assert match, stdout(cells["loss"])
    assert float(match[1]) == float(match[2]) == pytest.approx(want, abs=1e-4)
    assert abs(want - math.log(50257)) < 0.5

    # exercises: the stride's window count, the parameter counts, the loss's baselines
    count = len(GPTDataset(load_tokens(corpus / "train.txt"), None, 32, 8))
    assert f"stride 8: predicted {count:,}, GPTDataset has {count:,}" in stdout(cells[
        "answer-stride"])
    params = stdout(cells["answer-params"])
    assert re.search(r"GPT-2 small \(124M\), tied +124,439,808 ", params)
    assert re.search(r"GPT-2 small, untied +163,037,184 ", params)
    assert re.search(r"GPT_CONFIG_124M as it stands +162,419,712 ", params)
    # a unigram model with add-one counts, from the training split's tokens
    train_counts = Counter(load_tokens(corpus / "train.txt").tolist())
    n_train, vocab = sum(train_counts.values()), 50257
    val_tokens = load_tokens(corpus / "valid.txt").tolist()
    unigram = -sum(math.log((train_counts[t] + 1) / (n_train + vocab)) for t in val_tokens)
    trained_model = load_checkpoint(cwd / "model_weights" / "trained_gpt2.pth").eval()
    val_loader = create_dataloader(val_tokens, 4, 32, 32, shuffle=False, drop_last=False)
    with torch.no_grad():
        model_loss = calc_loss_loader(val_loader, trained_model, "cpu")
    assert (f"validation loss: uniform 10.825, unigram {unigram / len(val_tokens):.3f}, the "
            f"trained model {model_loss:.3f}") in stdout(cells["answer-baselines"])


def test_train_notebook_fine_tunes_on_a_second_text(trained):
    # section 8: the trained model fine-tuned on the second text, every weight and LoRA
    cwd, cells = trained
    weights = cwd / "model_weights"
    second = cwd / "second"
    val = create_dataloader(load_tokens(second / "valid.txt"), 4, 32, 32, shuffle=False,
                            drop_last=False)
    base = load_checkpoint(weights / "trained_gpt2.pth")
    with torch.no_grad():
        before = calc_loss_loader(val, base, "cpu")
    assert f"the second text's validation split: loss {before:.3f}" in stdout(cells["ft-data"])

    table = stdout(cells["ft-runs"])
    total = sum(p.numel() for p in base.parameters())
    # LoRA of rank 4 on the 32-wide blocks: r (in + out) for qkv, out_proj, fc and proj
    lora_params = 2 * 4 * ((32 + 96) + (32 + 32) + (32 + 128) + (128 + 32))
    for name, trainable, path in (("full", total, "finetuned_full.pth"),
                                  ("LoRA", lora_params, "finetuned_lora.pth")):
        ckpt = read_checkpoint(weights / path)
        assert ckpt["step"] == 4 and ckpt["history"]["step"][0] == 0     # evaluated at step 0
        with torch.no_grad():
            after = calc_loss_loader(val, load_checkpoint(weights / path), "cpu")
        assert re.search(rf"^{name} +{trainable:,} +{100 * trainable / total:.2f}% +"
                         rf"{before:.3f} -> {after:.3f} ", table, re.M), table
    assert read_checkpoint(weights / "finetuned_lora.pth")["lora"]["rank"] == 4
    assert png_count(cells["ft-runs"]) == 1

    # the samples: the same seed and prompt, through the saved weights
    tokenizer = get_tokenizer()
    samples = stdout(cells["ft-samples"]).splitlines()
    for line, path in zip(samples[:2], ("trained_gpt2.pth", "finetuned_full.pth")):
        torch.manual_seed(SEED)
        out = generate_text(load_checkpoint(weights / path), text_to_token_ids(
            "Return the", tokenizer), 30, temperature=0.8, top_k=50, eos_id=tokenizer.eot_token)
        assert line.endswith(f": {token_ids_to_text(out, tokenizer)!r}")
    assert [line.split(":")[0] for line in samples] == ["before", "after, full", "after, LoRA"]
    assert "8 adapted matrices, rank 4, alpha 16: each merged weight = W + 4 A B" in stdout(
        cells["ft-merge"])


# ---------------------------------------------------------------------------------------
# inference.ipynb and inference_hf.ipynb

def check_generation(cells, gpt, reference_greedy=None):
    """The streamed sample and the greedy text are what generate.py gives for ``gpt``."""
    tokenizer = get_tokenizer()
    probe = json.loads(stdout(cells["probe"]))
    idx = text_to_token_ids(PROMPT, tokenizer)

    torch.manual_seed(SEED)
    sampled = generate_text(gpt, idx, NEW_TOKENS, eos_id=tokenizer.eot_token, **SAMPLING)
    assert probe["sampled"] == sampled[0].tolist()
    streamed = stdout(cells["sample"])
    assert streamed.startswith(PROMPT) and streamed.endswith("\n")
    expected = token_ids_to_text(sampled, tokenizer)
    if "\ufffd" not in expected:          # a split UTF-8 character decodes differently
        assert streamed == expected + "\n"

    greedy = generate_text(gpt, idx, NEW_TOKENS, eos_id=tokenizer.eot_token)
    assert probe["greedy"] == greedy[0].tolist()
    if reference_greedy is not None:
        assert probe["greedy"] == reference_greedy
    assert stdout(cells["greedy"]) == token_ids_to_text(greedy, tokenizer) + "\n"
    return probe


def hf_greedy(hf):
    """transformers' own greedy continuation of PROMPT: the reference for our tokens."""
    idx = text_to_token_ids(PROMPT, get_tokenizer())
    with torch.no_grad():
        out = hf.generate(idx, attention_mask=torch.ones_like(idx), do_sample=False,
                          max_new_tokens=NEW_TOKENS, pad_token_id=hf.config.eos_token_id)
    return out[0].tolist()


def test_inference_custom_checkpoint(trained, tmp_path):
    weights = trained[0] / "model_weights" / "trained_gpt2.pth"
    # in bf16 here (DTYPE); the other inference runs below keep the default fp32
    cells = run_notebook("inference.ipynb", tmp_path, probe=PROBE, MODEL_SELECTION="custom",
                         WEIGHTS_PATH=str(weights), PROMPT=PROMPT, MAX_NEW_TOKENS=NEW_TOKENS,
                         PLOT_TOKENS=10, DTYPE="bf16")
    probe = check_generation(cells, load_checkpoint(weights, dtype=torch.bfloat16))
    assert not probe["tensorflow_imported"] and probe["dtype"] == "torch.bfloat16"
    assert "'emb_dim': 32" in result_text(cells["load"])

    assert png_count(cells["dist"]) == 1
    counts = dict(re.findall(r"^\s*(.+?): +([\d,]+) tokens can be drawn", stdout(cells["dist"]),
                             re.M))
    assert counts["top-k = 5"] == "5"
    assert counts["no filter"] == "50,257"
    assert 1 <= int(counts["top-p = 0.5"].replace(",", "")) < 50_257
    # the "rest of the vocabulary" bar: the probability outside the 10 tokens plotted
    gpt = load_checkpoint(weights, dtype=torch.bfloat16)
    with torch.no_grad():
        logits = gpt(text_to_token_ids(PROMPT, get_tokenizer()))[:, -1]
    top = filtered_probs(logits)[0].topk(10).indices
    rests = dict(re.findall(r"^\s*(.+?): .*the rest of the vocabulary ([\d.]+)%$",
                            stdout(cells["dist"]), re.M))
    for name, temperature in (("T = 1", 1.0), ("T = 2", 2.0)):
        rest = 1 - float(filtered_probs(logits, temperature)[0, top].sum())
        assert float(rests[name]) == pytest.approx(100 * rest, abs=0.051)
    assert float(rests["top-k = 5"]) == 0.0

    # the previous-token head the text points at, and the BPE split of the word it shows
    assert png_count(cells["attention"]) == 2 and png_count(cells["previous"]) == 1
    ids = text_to_token_ids(ATTENTION_PROMPT, get_tokenizer())
    scores = {(layer, h): float(w[0, h].float().diagonal(-1).mean())
              for layer, w in attention_weights(gpt, ids).items() for h in range(w.shape[1])}
    layer, head = max(scores, key=scores.get)
    previous = stdout(cells["previous"])
    assert previous.startswith(f"layer {layer}, head {head} puts {scores[layer, head]:.0%} ")
    assert "' iterate' is 2 tokens: [\"' iter'\", \"'ate'\"] [11629, 378]" in previous
    for answer in ("answer-temperature", "answer-penalty", "answer-sink"):
        assert stdout(cells[answer])            # each answer ran, its asserts held
    assert "[2.6, -2.6, 0.0] -> [2.0, -3.38, 0.0]" in stdout(cells["answer-penalty"])


@pytest.fixture(scope="module")
def openai_server(tmp_path_factory):
    """A tiny random GPT-2 in OpenAI's TF layout on a local http.server: (hf model, url).

    Built by test_download_weights's helpers with the real 50257-token vocabulary, so GPT-2's
    tokenizer works on it; only hparams.json is rewritten to say so.
    """
    tw = pytest.importorskip("test_download_weights")       # skips when TensorFlow is missing
    hf = tw.random_hf_model(seed=2, vocab=50257)
    files = tw.write_openai_checkpoint(hf, tmp_path_factory.mktemp("openai"))
    files["hparams.json"] = json.dumps({**tw.HPARAMS, "n_vocab": 50257}).encode()
    server = tw.FileServer()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield hf, tw.publish(server, (hf, files), "notebook")
    server.shutdown()
    server.server_close()


def test_inference_openai_tf_weights(openai_server, tmp_path):
    hf, base_url = openai_server
    cells = run_notebook("inference.ipynb", tmp_path, probe=PROBE,
                         MODEL_SELECTION="gpt2-small (124M)", BASE_URL=base_url,
                         WEIGHTS_DIR="weights", PROMPT=PROMPT, MAX_NEW_TOKENS=NEW_TOKENS)
    pth = tmp_path / "weights" / "gpt2-124M.pth"
    assert (tmp_path / "weights" / "124M" / "model.ckpt.index").is_file()
    gpt = load_checkpoint(pth)
    assert gpt.cfg["n_layers"] == hf.config.n_layer and gpt.cfg["tie_embeddings"]
    probe = check_generation(cells, gpt, reference_greedy=hf_greedy(hf))
    assert probe["tensorflow_imported"] and probe["dtype"] == "torch.float32"
    assert png_count(cells["dist"]) == 1


def test_inference_hf_load_and_export(tmp_path):
    hf = make_hf_model(vocab_size=50257, n_positions=64, n_embd=32, n_layer=2, n_head=4, seed=3)
    hf.save_pretrained(tmp_path / "hf_source")
    cells = run_notebook("inference_hf.ipynb", tmp_path, probe=PROBE,
                         MODEL_SELECTION="gpt2-small (124M)", HF_SOURCE=str(tmp_path / "hf_source"),
                         EXPORT_DIR="exported", PROMPT=PROMPT, MAX_NEW_TOKENS=NEW_TOKENS)
    from download_weights_hf import load_gpt2_hf

    probe = check_generation(cells, load_gpt2_hf(tmp_path / "hf_source"),
                             reference_greedy=hf_greedy(hf))
    assert probe["dtype"] == "torch.float32"
    assert "'emb_dim': 32" in result_text(cells["load"])

    assert (tmp_path / "exported" / "model.safetensors").is_file()
    out = stdout(cells["export"])
    assert "transformers loaded a GPT2LMHeadModel: n_layer=2, n_head=4, n_embd=32, " in out
    diff = float(re.search(r"logit difference\|, transformers vs\. ours: (\S+)", out)[1])
    assert diff < 1e-4
    assert "same tokens as our greedy decoding: True" in out
    # the first new tokens side by side, transformers' and ours: the same pieces
    tokenizer = get_tokenizer()
    n = len(text_to_token_ids(PROMPT, tokenizer)[0])
    for t, token in enumerate(hf_greedy(hf)[n:n + NEW_TOKENS]):
        label = token_label(tokenizer, token, quote=True)
        assert f"{t:9d}  {label:<20}{label}\n" in out
    assert "emb_dim = 32     -> n_embd = 32" in stdout(cells["hf-config"])
    assert "same tokens in transformers and ours: True" in stdout(cells["answer-penalty"])
    # GPT-2's format has q/k/v biases; this model has them too, and a tied head, stored once
    assert re.search(r"model.safetensors: ([\d,]+) numbers = \1 parameters \+ 0 zero",
                     stdout(cells["answer-file"]))
    assert "transformers [464, 329, 2643], ours [464, 329, 2643]" in stdout(
        cells["answer-tokenizer"])


def test_train_notebook_defaults_are_train_py_defaults():
    # train.ipynb spells its parameters out for the reader; they must stay train.py's small
    # preset (DEFAULT_CONFIG / DEFAULT_SETTINGS), so that the notebook and `python train.py`
    # train the same model the same way.
    import train

    nb = nbformat.read(str(ROOT / "train.ipynb"), as_version=4)
    params = next(c for c in nb.cells if c.cell_type == "code")
    values = {}
    for node in ast.parse(params.source).body:          # plain NAME = literal lines
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            values[node.targets[0].id] = ast.literal_eval(node.value)
    for key in ("context_length", "emb_dim", "n_heads", "n_layers", "drop_rate",
                "tie_embeddings"):
        assert values[key.upper()] == train.DEFAULT_CONFIG[key], key
    for key, value in train.DEFAULT_SETTINGS.items():
        assert values[key.upper()] == value, key


def test_train_notebook_fine_tunes_with_lora(tmp_path):
    # INIT_FROM: the source's weights (a save_pretrained folder here), cropped to the
    # notebook's context; LORA_RANK: only the adapters train; the run starts at step 0
    folder = tmp_path / "tiny-gpt2"
    make_hf_model(vocab_size=50257, n_positions=64, n_embd=32, n_layer=2, n_head=2,
                  seed=4).save_pretrained(folder)
    data = tmp_path / "corpus" / "text.txt"
    data.parent.mkdir()
    data.write_text(default_corpus_text()[:8_000])
    cells = run_notebook(
        "train.ipynb", tmp_path, DATA_PATH=str(data), INIT_FROM=str(folder), LORA_RANK=4,
        CONTEXT_LENGTH=32, NUM_EPOCHS=1, BATCH_SIZE=4, EVAL_FREQ=5, EVAL_ITER=2,
        MAX_STEPS=6, START_CONTEXT=PROMPT, MAX_NEW_TOKENS=NEW_TOKENS, LEARNING_RATE=1e-2,
        **tiny_finetune(tmp_path))
    assert "Trainable parameters: 4,096 (" in stdout(cells["build"])
    assert "Ep 0 (Step 000000): Train loss" in stdout(cells["train"])
    ckpt = read_checkpoint(tmp_path / "model_weights" / "trained_gpt2.pth")
    assert ckpt["lora"]["rank"] == 4 and ckpt["history"]["step"][0] == 0
    assert ckpt["config"]["context_length"] == 32 and ckpt["config"]["tie_embeddings"]


def _tools():
    import importlib.util

    spec = importlib.util.spec_from_file_location("execute_notebooks",
                                                  ROOT / "tools" / "execute_notebooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_notebooks_that_show_the_trained_model_show_the_same_one():
    # tools/execute_notebooks.py runs them in one pass: each records the sha256 of the
    # checkpoint it loaded, train.ipynb that of the one it saved
    tools = _tools()
    nbs = {n: nbformat.read(ROOT / n, as_version=4)
           for n in ("train.ipynb", *tools.SHOWS_TRAINED)}
    shas = {n: nb.metadata.get(tools.METADATA_KEY) for n, nb in nbs.items()}
    assert shas["train.ipynb"] and len(set(shas.values())) == 1, shas
    # so where two of them decode greedily from the same prompt, they print the same tokens
    shown = []
    for name in ("inference.ipynb", "inference_hf.ipynb"):
        cells = {c.id: c for c in nbs[name].cells}
        values = {node.targets[0].id: ast.literal_eval(node.value)
                  for node in ast.parse(cells["parameters"].source).body}
        shown.append(((values["PROMPT"], values["MAX_NEW_TOKENS"]), stdout(cells["greedy"])))
    assert shown[0][0] == shown[1][0] and shown[0][1] == shown[1][1] != ""


def test_execute_notebooks_refuses_a_checkpoint_the_outputs_did_not_come_from(tmp_path):
    tools = _tools()
    checkpoint = tmp_path / tools.CHECKPOINT
    checkpoint.parent.mkdir()
    checkpoint.write_bytes(b"the weights train.ipynb saved")
    nb = nbformat.v4.new_notebook()
    nb.metadata[tools.METADATA_KEY] = file_sha256(checkpoint)
    nbformat.write(nb, tmp_path / "train.ipynb")
    assert tools.stale_checkpoint(["inference.ipynb", "instruct.ipynb"], tmp_path) is None
    assert tools.stale_checkpoint(["tokenizer.ipynb"], tmp_path) is None    # needs no model
    checkpoint.write_bytes(b"weights trained since")
    assert tools.stale_checkpoint(["inference.ipynb"], tmp_path) == (
        "inference.ipynb shows the model train.ipynb trains, but model_weights/trained_gpt2.pth "
        "is not the one train.ipynb's committed outputs were made with: run them with "
        "train.ipynb (python tools/execute_notebooks.py runs all, in one pass)")
    assert tools.stale_checkpoint(["train.ipynb", "inference.ipynb"], tmp_path) is None
    checkpoint.unlink()
    assert "trained_gpt2.pth is missing" in tools.stale_checkpoint(["instruct.ipynb"], tmp_path)
