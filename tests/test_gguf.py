"""GGUF export and import (llama.cpp's gpt2 architecture), checked without llama.cpp.

The references are independent of our code: gguf-py's own GGUFReader reads the files; what
llama.cpp's gpt2 loader needs (names, dimensions, keys) is written out here from its source
(src/models/gpt2.cpp, convert_hf_to_gguf.py); a forward pass in numpy, from the file's tensors
alone, must give our logits (a transposed matrix would not); q8_0 blocks are decoded here by
hand; tokens and merges go through transformers' GPT2Tokenizer.
"""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
from gguf import GGUFReader  # noqa: E402

import download_weights_hf  # noqa: E402
import generate  # noqa: E402
from classify import make_classifier  # noqa: E402
from conftest import ROOT, randomize_, read_only  # noqa: E402
from dataset import default_corpus_text, get_tokenizer  # noqa: E402
from download_weights_hf import export_to_gguf, load_gguf  # noqa: E402
from engine.int8 import quantize_  # noqa: E402
from model import GPTModel, save_checkpoint  # noqa: E402
from model_sources import load_model, load_model_and_tokenizer  # noqa: E402
from tokenizer import BPETokenizer  # noqa: E402

EMB, HEADS, LAYERS, CTX = 64, 4, 2, 40
TEXTS = ["Hello world, this is GPT-2.", "  two spaces\nand a newline\t tab", "Äpfel 🍎 1234567 "
         "don't I'll we've", "def f(x):\n    return x ** 2  # squares"]


@pytest.fixture(scope="module")
def own_tok():
    """A byte-level BPE of our own, trained here (tokenizer.py), 400 tokens."""
    return BPETokenizer.train(default_corpus_text()[:20_000], 400, name="test-400")


def random_model(vocab=50257, tie=True, qkv_bias=True, emb=EMB, heads=HEADS, ctx=CTX, seed=0):
    cfg = {"vocab_size": vocab, "context_length": ctx, "emb_dim": emb, "n_heads": heads,
           "n_layers": LAYERS, "drop_rate": 0.0, "qkv_bias": qkv_bias, "tie_embeddings": tie}
    return randomize_(GPTModel(cfg), seed)


def ids_for(model, n=12, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.cfg["vocab_size"], (2, n), generator=gen)


@torch.no_grad()
def logits(model, ids):
    return model(ids)


# ---------------------------------------------------------------------------------------
# What llama.cpp reads, written out from its source, not from engine/gpt2_params.py

def llama_cpp_tensors(model):
    """{GGUF name: numpy array as the file must hold it}: matrices (out, in), which ggml
    lists as {in, out}; a bias-free Q/K/V as zeros (the loader requires attn_qkv.bias)."""
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    cfg = model.cfg
    want = {"token_embd.weight": sd["tok_emb.weight"],
            "position_embd.weight": sd["pos_emb.weight"],
            "output_norm.weight": sd["final_norm.weight"],
            "output_norm.bias": sd["final_norm.bias"]}
    if not cfg["tie_embeddings"]:
        want["output.weight"] = sd["out_head.weight"]
    for i in range(cfg["n_layers"]):
        ours, blk = f"trf_blocks.{i}.", f"blk.{i}."
        for gguf_name, our_name, matrix in [
                ("attn_norm", "norm1", False), ("attn_qkv", "att.qkv", True),
                ("attn_output", "att.out_proj", True), ("ffn_norm", "norm2", False),
                ("ffn_up", "ff.fc", True), ("ffn_down", "ff.proj", True)]:
            weight = sd[ours + our_name + ".weight"]
            want[blk + gguf_name + ".weight"] = weight.T if matrix else weight
            bias = sd.get(ours + our_name + ".bias")
            want[blk + gguf_name + ".bias"] = (np.zeros(weight.shape[-1], np.float32)
                                               if bias is None else bias)
    return want


def loader_dims(cfg):
    """The dimensions llama.cpp's gpt2 loader creates each tensor with ({ne0, ne1})."""
    C, V, T, F = cfg["emb_dim"], cfg["vocab_size"], cfg["context_length"], 4 * cfg["emb_dim"]
    dims = {"token_embd.weight": (C, V), "position_embd.weight": (C, T),
            "output_norm.weight": (C,), "output_norm.bias": (C,)}
    if not cfg["tie_embeddings"]:
        dims["output.weight"] = (C, V)
    for i in range(cfg["n_layers"]):
        b = f"blk.{i}."
        dims.update({b + "attn_norm.weight": (C,), b + "attn_norm.bias": (C,),
                     b + "attn_qkv.weight": (C, 3 * C), b + "attn_qkv.bias": (3 * C,),
                     b + "attn_output.weight": (C, C), b + "attn_output.bias": (C,),
                     b + "ffn_norm.weight": (C,), b + "ffn_norm.bias": (C,),
                     b + "ffn_down.weight": (F, C), b + "ffn_down.bias": (C,),
                     b + "ffn_up.weight": (C, F), b + "ffn_up.bias": (F,)})
    return dims


def read(path):
    """(gguf.GGUFReader, {name: value of each key}, {name: reader tensor})."""
    reader = GGUFReader(path)
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    return reader, fields, {t.name: t for t in reader.tensors}


def as_float(t):
    """A reader tensor's values, float32, numpy order."""
    shape = tuple(reversed([int(n) for n in t.shape]))
    return np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32).reshape(shape)


def q8_0_blocks(t):
    """A q8_0 tensor's blocks, decoded here: (scales (n,), int8 values (n, 32)). ggml's
    block_q8_0 is one f16 scale then 32 int8s, 34 bytes."""
    raw = np.ascontiguousarray(t.data).reshape(-1, 34)
    return raw[:, :2].copy().view(np.float16)[:, 0].astype(np.float32), raw[:, 2:].view(np.int8)


# ---------------------------------------------------------------------------------------
# The file llama.cpp reads

@pytest.mark.parametrize("gguf_type", ["f32", "f16", "bf16", "q8_0"])
@pytest.mark.parametrize("tie", [True, False])
def test_every_tensor_llama_cpp_needs_with_its_shape_and_values(tmp_path, own_tok, gguf_type,
                                                                 tie):
    model = random_model(vocab=own_tok.n_vocab, tie=tie)
    path = export_to_gguf(model, tmp_path / "m.gguf", own_tok, gguf_type=gguf_type)
    _, _, tensors = read(path)
    dims = loader_dims(model.cfg)
    assert set(tensors) == set(dims)
    arch_names = {gguf.TENSOR_NAMES[t] for t in gguf.MODEL_TENSORS[gguf.MODEL_ARCH.GPT2]}
    for name in tensors:        # every name is one of gguf-py's for the gpt2 architecture
        base = name.rsplit(".", 1)[0]
        assert base in arch_names or base.replace(name.split(".")[1], "{bid}", 1) in arch_names
    want = llama_cpp_tensors(model)
    stored_as = {"f32": "F32", "f16": "F16", "bf16": "BF16", "q8_0": "Q8_0"}[gguf_type]
    for name, t in tensors.items():
        assert tuple(int(n) for n in t.shape) == dims[name], name
        exact = want[name].ndim == 1 or name == "position_embd.weight"     # always f32
        assert t.tensor_type.name == ("F32" if exact else stored_as), name
        got, w = as_float(t), want[name]
        if exact or gguf_type == "f32":
            np.testing.assert_array_equal(got, w, err_msg=name)
        elif gguf_type == "f16":
            np.testing.assert_array_equal(got, w.astype(np.float16).astype(np.float32), name)
        elif gguf_type == "bf16":
            rounded = torch.from_numpy(w).to(torch.bfloat16).float().numpy()
            np.testing.assert_array_equal(got, rounded, err_msg=name)
        else:
            scales, q = q8_0_blocks(t)
            blocks = w.reshape(-1, 32)
            # one scale per 32 weights, max |w| / 127 in f16, and every weight within half a
            # step, plus what storing the step in f16 moves 127 of them (2^-11 relative)
            np.testing.assert_allclose(scales, np.abs(blocks).max(1) / 127, rtol=1e-3)
            step = np.abs(scales)[:, None]
            error = np.abs(blocks - q * scales[:, None])
            assert np.all(error <= step * (0.5 + 127 / 2048)), name
            np.testing.assert_array_equal(got.reshape(-1, 32), q * scales[:, None])


@pytest.mark.parametrize("gguf_type,file_type", [("f32", 0), ("f16", 1), ("bf16", 32),
                                                 ("q8_0", 7)])
def test_the_keys_llama_cpp_reads(tmp_path, own_tok, gguf_type, file_type):
    model = random_model(vocab=own_tok.n_vocab, emb=96, heads=6, ctx=24)
    _, fields, _ = read(export_to_gguf(model, tmp_path / "my-model.gguf", own_tok,
                                       gguf_type=gguf_type))
    assert fields["general.architecture"] == "gpt2" and fields["general.type"] == "model"
    assert fields["general.name"] == "my-model"
    assert fields["general.file_type"] == file_type
    assert fields["general.quantization_version"] == 2
    assert {k: fields[f"gpt2.{k}"] for k in ["context_length", "embedding_length",
                                              "feed_forward_length", "block_count",
                                              "attention.head_count"]} == {
        "context_length": 24, "embedding_length": 96, "feed_forward_length": 384,
        "block_count": LAYERS, "attention.head_count": 6}
    assert fields["gpt2.attention.layer_norm_epsilon"] == np.float32(1e-5)
    assert fields["tokenizer.ggml.model"] == "gpt2"
    assert fields["tokenizer.ggml.pre"] == "gpt-2"
    assert fields["tokenizer.ggml.bos_token_id"] == fields["tokenizer.ggml.eos_token_id"] == \
        own_tok.eot_token
    assert fields["tokenizer.ggml.add_bos_token"] is False
    assert fields["tokenizer.ggml.add_eos_token"] is False


def test_the_general_metadata_says_where_openai_s_weights_come_from(tmp_path, own_tok):
    general = download_weights_hf._gguf_general
    assert general("124M") == general("openai-community/gpt2") == {
        "source.url": "https://huggingface.co/openai-community/gpt2", "license": "mit"}
    assert general("someone/gpt2-poems") == {"source.url": "https://huggingface.co/someone/"
                                                           "gpt2-poems"}
    assert general(tmp_path) == {}         # a local path stays private
    model = random_model(vocab=own_tok.n_vocab)
    _, fields, _ = read(export_to_gguf(model, tmp_path / "m.gguf", own_tok,
                                       general={"name": "gpt2", **general("124M")}))
    assert (fields["general.name"], fields["general.license"], fields["general.source.url"]) \
        == ("gpt2", "mit", "https://huggingface.co/openai-community/gpt2")


def gpt2_tokenizer_from(fields, folder):
    """transformers' GPT2Tokenizer built from a GGUF's tokens and merges alone."""
    from transformers import GPT2Tokenizer

    folder.mkdir()
    tokens = fields["tokenizer.ggml.tokens"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(
        fields["tokenizer.ggml.merges"]) + "\n")
    try:
        return GPT2Tokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"))
    except TypeError:         # transformers < 5 names them vocab_file, merges_file
        return GPT2Tokenizer(vocab_file=str(folder / "vocab.json"),
                             merges_file=str(folder / "merges.txt"))


@pytest.mark.parametrize("own", [False, True])
def test_tokens_and_merges_encode_as_the_model_tokenizer(tmp_path, own_tok, own):
    tokenizer = own_tok if own else None
    ours = own_tok.to_tiktoken() if own else get_tokenizer()
    model = random_model(vocab=ours.n_vocab)
    _, fields, _ = read(export_to_gguf(model, tmp_path / "m.gguf", tokenizer))
    theirs = gpt2_tokenizer_from(fields, tmp_path / "hf")
    text = default_corpus_text()[:3000] + "".join(TEXTS)
    assert theirs(text)["input_ids"] == ours.encode_ordinary(text)
    eot = ours.eot_token
    types = fields["tokenizer.ggml.token_type"]
    assert fields["tokenizer.ggml.tokens"][eot] == "<|endoftext|>" and types[eot] == 3  # control
    assert [i for i, kind in enumerate(types) if kind != 1] == [eot]                  # 1: normal
    assert fields["tokenizer.ggml.eos_token_id"] == eot
    assert len(fields["tokenizer.ggml.tokens"]) == model.cfg["vocab_size"]
    if own:       # our loader gets the very tokenizer back (GPT-2's: no file needed)
        assert BPETokenizer.loads(fields["tokenizer.gpt2_course_bpe.json"]).fingerprint() == \
            own_tok.fingerprint()
    else:
        assert "tokenizer.gpt2_course_bpe.json" not in fields
        assert fields["tokenizer.ggml.bos_token_id"] == 50256
    assert get_tokenizer(tmp_path / "m.gguf").name == ours.name


def numpy_logits(path, ids):
    """GPT-2's forward pass in numpy (float64) from the GGUF alone: its tensors as llama.cpp
    reads them and its keys; the head is output.weight, or token_embd.weight without one."""
    _, fields, tensors = read(path)
    W = {name: as_float(t).astype(np.float64) for name, t in tensors.items()}
    n_head, eps = fields["gpt2.attention.head_count"], fields["gpt2.attention.layer_norm_epsilon"]

    def norm(x, name):
        mean = x.mean(-1, keepdims=True)
        var = ((x - mean) ** 2).mean(-1, keepdims=True)
        return (x - mean) / np.sqrt(var + eps) * W[name + ".weight"] + W[name + ".bias"]

    def linear(x, name):                 # weights (out, in), as ggml multiplies them
        return x @ W[name + ".weight"].T + W[name + ".bias"]

    out = []
    for row in ids.tolist():
        T = len(row)
        x = W["token_embd.weight"][row] + W["position_embd.weight"][:T]
        for i in range(fields["gpt2.block_count"]):
            q, k, v = np.split(linear(norm(x, f"blk.{i}.attn_norm"), f"blk.{i}.attn_qkv"), 3, -1)
            q, k, v = (m.reshape(T, n_head, -1).transpose(1, 0, 2) for m in (q, k, v))
            scores = q @ k.transpose(0, 2, 1) / np.sqrt(q.shape[-1])
            scores[:, np.triu(np.ones((T, T), bool), 1)] = -np.inf
            p = np.exp(scores - scores.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            x = x + linear((p @ v).transpose(1, 0, 2).reshape(T, -1), f"blk.{i}.attn_output")
            u = linear(norm(x, f"blk.{i}.ffn_norm"), f"blk.{i}.ffn_up")
            gelu = 0.5 * u * (1 + np.tanh(np.sqrt(2 / np.pi) * (u + 0.044715 * u ** 3)))
            x = x + linear(gelu, f"blk.{i}.ffn_down")
        head = W.get("output.weight", W["token_embd.weight"])
        out.append(norm(x, "output_norm") @ head.T)
    return np.stack(out)


@pytest.mark.parametrize("tie,qkv_bias", [(True, True), (False, True), (True, False)])
def test_a_numpy_forward_pass_from_the_file_alone_gives_our_logits(tmp_path, own_tok, tie,
                                                                    qkv_bias):
    model = random_model(vocab=own_tok.n_vocab, tie=tie, qkv_bias=qkv_bias)
    path = export_to_gguf(model, tmp_path / "m.gguf", own_tok)
    ids = ids_for(model)
    np.testing.assert_allclose(numpy_logits(path, ids), logits(model, ids).numpy(), atol=1e-4,
                               rtol=0)


# ---------------------------------------------------------------------------------------
# GGUF -> GPTModel

@pytest.mark.parametrize("shape", [
    {"tie": True}, {"tie": False}, {"qkv_bias": False},
    {"tie": False, "emb": 48, "heads": 3, "ctx": 24},      # rows q8_0 cannot cut: f16 there
])
def test_the_round_trip_gives_equal_logits(tmp_path, own_tok, shape):
    model = random_model(vocab=own_tok.n_vocab, **shape)
    path = export_to_gguf(model, tmp_path / "m.gguf", own_tok)
    back = load_model(path)
    assert back.cfg == {**model.cfg, "qkv_bias": True}     # GGUF has Q/K/V biases: zeros
    ids = ids_for(model)
    torch.testing.assert_close(logits(back, ids), logits(model, ids), atol=0, rtol=0)
    back, tokenizer = load_model_and_tokenizer(path)
    assert tokenizer.name == own_tok.to_tiktoken().name
    assert tokenizer.encode_ordinary(TEXTS[2]) == own_tok.encode(TEXTS[2])


@pytest.mark.parametrize("gguf_type", ["f16", "bf16", "q8_0"])
def test_an_import_holds_the_numbers_of_the_file(tmp_path, own_tok, gguf_type):
    model = random_model(vocab=own_tok.n_vocab, tie=False)
    path = export_to_gguf(model, tmp_path / "m.gguf", own_tok, gguf_type=gguf_type)
    back = load_gguf(path)
    _, _, tensors = read(path)
    for name, values in llama_cpp_tensors(back).items():
        np.testing.assert_array_equal(values, as_float(tensors[name]), err_msg=name)
    ids = ids_for(model)
    assert (logits(back, ids) - logits(model, ids)).abs().max() < 0.05   # rounding, no more


def test_a_head_stored_twice_loads_tied(tmp_path, own_tok):
    # older llama.cpp converters wrote GPT-2's tied head as an output tensor of its own
    model = random_model(vocab=own_tok.n_vocab, tie=False)
    with torch.no_grad():
        model.out_head.weight.copy_(model.tok_emb.weight)
    path = export_to_gguf(model, tmp_path / "m.gguf", own_tok)
    assert "output.weight" in read(path)[2]
    back = load_model(path)
    assert back.cfg["tie_embeddings"] and back.out_head.weight is back.tok_emb.weight
    ids = ids_for(model)
    torch.testing.assert_close(logits(back, ids), logits(model, ids), atol=0, rtol=0)


def test_q8_0_falls_back_to_f16_for_rows_it_cannot_cut_as_llama_cpp_does(tmp_path, own_tok):
    model = random_model(vocab=own_tok.n_vocab, emb=48, heads=3)
    with pytest.warns(UserWarning, match=r"m.gguf: \d+ matrices have rows of a length that q8_0 "
                                         r"cannot cut into blocks of 32, so they are stored as "
                                         r"f16, as llama.cpp's converter does: \["):
        path = export_to_gguf(model, tmp_path / "m.gguf", own_tok, gguf_type="q8_0")
    kinds = {name: t.tensor_type.name for name, t in read(path)[2].items()}
    assert kinds["token_embd.weight"] == kinds["blk.0.attn_qkv.weight"] == "F16"   # rows of 48
    assert kinds["blk.0.ffn_down.weight"] == "Q8_0"                                # rows of 192


# ---------------------------------------------------------------------------------------
# The command line

def test_export_takes_any_source_and_generate_runs_the_file(tmp_path, own_tok, capsys):
    model = random_model(vocab=own_tok.n_vocab, tie=False)
    save_checkpoint(tmp_path / "run.pth", model,
                    tokenizer={"json": own_tok.dumps(), "sha256": own_tok.fingerprint()})
    hf = download_weights_hf.main(["--export", str(tmp_path / "run.pth"), "--out",
                                   str(tmp_path / "hf")])
    ids = ids_for(model)
    for source, out in [(tmp_path / "run.pth", "a.gguf"), (hf, "b.gguf"),
                        (tmp_path / "a.gguf", "c.gguf")]:      # a .pth, a folder, a .gguf
        path = download_weights_hf.main(["--export", str(source), "--out",
                                         str(tmp_path / out)])
        assert path == tmp_path / out
        printed = capsys.readouterr().out
        assert f"wrote {path}; run it with llama.cpp: llama-completion -m {path}" in printed
        torch.testing.assert_close(logits(load_model(path), ids), logits(model, ids), atol=0,
                                   rtol=0)
        assert get_tokenizer(path).name == own_tok.to_tiktoken().name
    argv = ["--prompt", "The for statement", "--max-new-tokens", "8", "--temperature", "0",
            "--device", "cpu"]
    generate.main(["--weights", str(tmp_path / "run.pth"), *argv])
    from_pth = capsys.readouterr().out
    generate.main(["--weights", str(tmp_path / "c.gguf"), *argv])
    assert capsys.readouterr().out == from_pth


def test_gpt2_s_own_tokenizer_comes_back_as_gpt2(tmp_path):
    model = random_model(tie=True)
    path = download_weights_hf.main(["--export", _pth(tmp_path, model), "--out",
                                     str(tmp_path / "m.gguf"), "--gguf-type", "q8_0"])
    back, tokenizer = load_model_and_tokenizer(path)
    assert tokenizer.name == "gpt2" and back.cfg["vocab_size"] == 50257


def _pth(tmp_path, model):
    save_checkpoint(tmp_path / "m.pth", model)
    return str(tmp_path / "m.pth")


def test_bad_flags_are_one_line(tmp_path, capsys):
    pth = _pth(tmp_path, random_model())
    with pytest.raises(SystemExit):
        download_weights_hf.main(["--export", pth, "--out", str(tmp_path / "m.gguf"),
                                  "--gguf-type", "q4_0"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert ": error: argument --gguf-type: invalid choice: 'q4_0' (choose from " in err
    assert all(t in err.split("choose from")[1] for t in ("f32", "f16", "bf16", "q8_0"))
    with pytest.raises(SystemExit):
        download_weights_hf.main(["--export", pth, "--out", str(tmp_path / "hf"),
                                  "--gguf-type", "q8_0"])
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(
        f"error: --gguf-type goes with an --out ending in .gguf, not {str(tmp_path / 'hf')!r}")
    assert not (tmp_path / "hf").exists() and not (tmp_path / "m.gguf").exists()


def test_an_existing_or_read_only_output_is_refused_before_any_work(tmp_path, monkeypatch):
    pth = _pth(tmp_path, random_model())
    out = tmp_path / "m.gguf"
    out.write_bytes(b"keep me")
    proc = subprocess.run([sys.executable, "download_weights_hf.py", "--export", "no-such.pth",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True)
    # refused before the source is even looked at
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr == (f"error: {out} exists; delete it or choose another --out (an export "
                           f"never overwrites a file)\n")
    assert out.read_bytes() == b"keep me"
    folder = tmp_path / "ro"
    folder.mkdir()
    read_only(monkeypatch, folder)
    with pytest.raises(OSError) as e:
        download_weights_hf.main(["--export", pth, "--out", str(folder / "m.gguf")])
    assert str(e.value) == (f"cannot write --out {folder / 'm.gguf'}: nothing can be created "
                            f"in {folder} (Read-only file system); choose a place you can write "
                            f"to, or make {folder} writable")
    assert list(folder.iterdir()) == []
    gguf_in = export_to_gguf(random_model(), tmp_path / "in.gguf")
    with pytest.raises(ValueError) as e:      # its own input: not "delete it"
        download_weights_hf.main(["--export", str(gguf_in), "--out", str(gguf_in)])
    assert str(e.value) == (f"--out {gguf_in} is the file it reads as --export ({gguf_in}), and "
                            f"writing would replace it; choose another --out")


def test_a_model_the_format_cannot_hold_is_refused_naming_the_field(tmp_path, own_tok):
    other = BPETokenizer(own_tok.merges, own_tok.special_tokens, pattern=r"\S+|\s+")
    for model, tokenizer, message in [
        (random_model(vocab=400), other,
         "the tokenizer's pattern (its pre-tokenization regex) is '\\\\S+|\\\\s+'; GGUF can "
         "name only GPT-2's ('gpt-2'), so llama.cpp would split text differently: train the "
         "tokenizer with tokenizer.GPT2_PATTERN"),
        (random_model(vocab=401), own_tok,
         "the model has vocab_size=401, but the export carries its tokenizer with 400 tokens; "
         "export it with the tokenizer it was trained with (tokenizer=, which a checkpoint of "
         "train.py --tokenizer carries)"),
        (quantize_(random_model(vocab=400)), own_tok,
         "export_to_gguf: the model's matrices are int8 (dtype='int8'); export it from its "
         "float weights (load the source without --dtype int8)"),
        (make_classifier(random_model(vocab=400), ["ham", "spam"]), own_tok,
         "the model is a classifier (its config's labels: ['ham', 'spam']); llama.cpp's gpt2 "
         "holds a language model's head over the vocabulary, not class scores: export it to "
         "Hugging Face instead (--out DIR, a GPT2ForSequenceClassification)"),
    ]:
        with pytest.raises(ValueError) as e:
            export_to_gguf(model, tmp_path / "m.gguf", tokenizer)
        assert str(e.value) == message
    assert list(tmp_path.iterdir()) == []


def test_a_file_that_is_not_a_gpt2_gguf_is_one_line_naming_it(tmp_path, own_tok):
    llama = tmp_path / "llama.gguf"
    w = gguf.GGUFWriter(llama, "llama")
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError) as e:
        load_model(llama)
    assert str(e.value) == (f"{llama} holds a 'llama' model (general.architecture); only "
                            f"'gpt2', GPT-2 as llama.cpp names it, loads as a GPTModel")
    with pytest.raises(ValueError, match=r"holds a 'llama' model \(general.architecture\)"):
        get_tokenizer(llama)
    good = export_to_gguf(random_model(vocab=400), tmp_path / "good.gguf", own_tok)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(good.read_bytes()[:-1000])
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"PK\x03\x04 not a gguf at all")
    header = tmp_path / "header.gguf"
    header.write_bytes(good.read_bytes()[:300])
    for path, why in [(cut, "tensor 'blk.1.ffn_down.weight' runs past the end of the file"),
                      (junk, "it starts with b'PK\\x03\\x04', not b'GGUF'"),
                      (header, "it ends at byte 300, inside its header")]:
        with pytest.raises(ValueError) as e:
            load_model(path)
        assert str(e.value) == (f"{path} is not a readable GGUF file ({why}); it is truncated, "
                                f"damaged or of another format: export or download it again")
    with pytest.raises(FileNotFoundError) as e:
        load_model(tmp_path / "none.gguf")
    assert str(e.value) == f"there is no GGUF file {str(tmp_path / 'none.gguf')!r}; check the path"
    with pytest.raises(ValueError) as e:
        load_model(good, cfg={"vocab_size": 400})
    assert str(e.value) == (f"a config (--config) goes only with a .pth holding a bare state "
                            f"dict; {str(good)!r} brings its own")


def rewrite(path, out, drop=(), change=None):
    """``path`` written again by gguf-py at ``out``, without the keys ``drop`` and with the
    values ``change`` ({key: value}, in the key's type): files another tool could write."""
    reader, w = GGUFReader(path), gguf.GGUFWriter(out, "gpt2")
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or key in drop:
            continue
        value = (change or {}).get(key, field.contents())
        kind = field.types[0]
        if kind == gguf.GGUFValueType.ARRAY:
            w.add_array(key, value)
        else:
            w.add_key_value(key, value, kind)
    for t in reader.tensors:
        w.add_tensor(t.name, as_float(t))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def test_a_foreign_vocabulary_without_our_tokenizer_is_refused(tmp_path, own_tok):
    path = export_to_gguf(random_model(vocab=400), tmp_path / "m.gguf", own_tok)
    foreign = rewrite(path, tmp_path / "foreign.gguf", drop=["tokenizer.gpt2_course_bpe.json"])
    ids = torch.tensor([[1, 2, 3]])
    torch.testing.assert_close(logits(load_model(foreign), ids), logits(load_model(path), ids))
    with pytest.raises(ValueError) as e:
        get_tokenizer(foreign)
    assert str(e.value) == (f"{foreign} carries a vocabulary of 400 tokens that is not GPT-2's, "
                            f"without this project's tokenizer file; this project reads only "
                            f"those two back: export the model from its checkpoint instead")


def test_settings_gpt_model_does_not_compute_are_refused_naming_the_key(tmp_path, own_tok):
    path = export_to_gguf(random_model(vocab=400), tmp_path / "m.gguf", own_tok)
    for i, (change, message) in enumerate([
        ({"gpt2.feed_forward_length": 300}, "sets gpt2.feed_forward_length=300; GPTModel "
                                            "computes only 256"),
        ({"gpt2.attention.layer_norm_epsilon": 1e-6},
         "sets gpt2.attention.layer_norm_epsilon=9.999999974752427e-07; GPTModel uses 1e-05"),
    ]):
        other = rewrite(path, tmp_path / f"other{i}.gguf", change=change)
        with pytest.raises(ValueError) as e:
            load_model(other)
        assert str(e.value) == f"{other} {message}"
    other = rewrite(path, tmp_path / "other.gguf", drop=["gpt2.block_count"])
    with pytest.raises(ValueError) as e:
        load_model(other)
    assert str(e.value) == (f"{other} has no 'gpt2.block_count'; it is not a complete GPT-2 "
                            f"GGUF (llama.cpp's gpt2 architecture): export it again")


def test_the_bench_check_without_llama_cpp_says_so_and_checks_our_side(tmp_path):
    proc = subprocess.run([sys.executable, "bench/gguf_check.py", "--quick", "--llamacpp-root",
                           str(tmp_path / "no-llama"), "--workdir", str(tmp_path / "work")],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert any(line.startswith("llama.cpp: not found, so only our own reading of the files is "
                               "checked (llama.cpp is not built under ") for line in lines)
    rows = [line.split() for line in lines if line.split()[:2] in (["gpt2-tiny", "f32"],
                                                                   ["own-tok-tiny", "f32"])]
    assert [row[3:] for row in rows] == [["0.00e+00", "8/8"]] * 2
    assert lines[-1] == ("SUMMARY gguf_check: f32 equal token for token (ours only: llama.cpp "
                         "not built)")
    assert sorted(p.name for p in (tmp_path / "work").glob("*.gguf")) == [
        "gpt2-tiny-f32.gguf", "gpt2-tiny-q8_0.gguf", "own-tok-tiny-f32.gguf",
        "own-tok-tiny-q8_0.gguf"]
