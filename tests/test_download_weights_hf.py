"""Hugging Face weights <-> GPTModel: same logits and greedy tokens as transformers.

Everything is offline: a tiny random GPT2LMHeadModel is written with save_pretrained and
read back through our loaders; our models are exported and read back by transformers.
"""

import json
import os
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

import download_weights_hf  # noqa: E402
from conftest import randomize_  # noqa: E402
from dataset import get_tokenizer  # noqa: E402
from download_weights_hf import (  # noqa: E402
    config_from_hf,
    export_to_hf,
    load_gpt2_hf,
    load_weights_into_gpt,
)
from model import GPTModel, load_checkpoint, save_checkpoint  # noqa: E402

VOCAB, CTX, EMB, LAYERS, HEADS = 97, 32, 48, 3, 4
PROMPT = torch.tensor([[5, 17, 42, 3, 88, 60], [1, 2, 3, 4, 5, 6]])


def random_hf_model(seed=0, tie=True, vocab=VOCAB, n_layer=LAYERS):
    config = GPT2Config(vocab_size=vocab, n_positions=CTX, n_embd=EMB, n_layer=n_layer,
                        n_head=HEADS, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        bos_token_id=vocab - 1, eos_token_id=vocab - 1,
                        pad_token_id=vocab - 1, tie_word_embeddings=tie)
    model = randomize_(GPT2LMHeadModel(config), seed)
    if not tie:
        assert model.lm_head.weight is not model.transformer.wte.weight
    return model


def our_cfg(tie=True, vocab=VOCAB, qkv_bias=True):
    return {"vocab_size": vocab, "context_length": CTX, "emb_dim": EMB, "n_heads": HEADS,
            "n_layers": LAYERS, "drop_rate": 0.0, "qkv_bias": qkv_bias, "tie_embeddings": tie}


@torch.no_grad()
def greedy_tokens(model, idx, steps):
    """Our own greedy loop (generate.py is someone else's module): argmax, append, repeat."""
    for _ in range(steps):
        next_id = model(idx)[:, -1].argmax(dim=-1, keepdim=True)
        idx = torch.cat([idx, next_id], dim=1)
    return idx


@torch.no_grad()
def assert_same_model(gpt, hf, prompt=PROMPT, steps=6):
    """Logits within 1e-5 and identical greedy continuations."""
    torch.testing.assert_close(gpt(prompt), hf(prompt).logits, atol=1e-5, rtol=1e-5)
    hf_ids = hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                         max_new_tokens=steps, pad_token_id=hf.config.eos_token_id)
    # HF stops a row at EOS; then both agree up to there, which is what we compare.
    ours = greedy_tokens(gpt, prompt, hf_ids.shape[1] - prompt.shape[1])
    assert hf_ids.shape[1] > prompt.shape[1]
    torch.testing.assert_close(ours, hf_ids, atol=0, rtol=0)


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    hf = random_hf_model()
    folder = tmp_path_factory.mktemp("hf") / "tiny-gpt2"
    hf.save_pretrained(folder)
    return hf, folder


# ---------------------------------------------------------------------------------------
# HF -> ours

def test_load_gpt2_hf_from_folder_matches_transformers(hf_folder):
    hf, folder = hf_folder
    gpt = load_gpt2_hf(folder)
    assert gpt.cfg == our_cfg()
    assert not gpt.training
    # one tied Parameter, as GPTModel(cfg) builds it, not two sharing memory
    assert gpt.out_head.weight is gpt.tok_emb.weight
    assert all(not t.is_meta and t.device.type == "cpu" for t in gpt.state_dict().values())
    assert_same_model(gpt, hf)


def test_mmap_and_copied_loads_agree_and_training_never_touches_the_file(hf_folder):
    hf, folder = hf_folder
    files = sorted(folder.glob("*.safetensors"))
    before = [f.read_bytes() for f in files]
    mapped, copied = load_gpt2_hf(folder, mmap=True), load_gpt2_hf(folder, mmap=False)
    for (name, a), b in zip(mapped.state_dict().items(), copied.state_dict().values()):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=name)
    # The mapping is private (copy-on-write): an optimizer step changes the model only.
    loss = mapped(torch.tensor([[1, 2, 3]])).logsumexp(-1).mean()
    loss.backward()
    torch.optim.SGD(mapped.parameters(), lr=0.1).step()
    assert not torch.equal(mapped.tok_emb.weight, copied.tok_emb.weight)
    assert [f.read_bytes() for f in files] == before
    assert_same_model(load_gpt2_hf(folder), hf)


@pytest.mark.parametrize("mmap", [True, False])
def test_load_in_bf16(hf_folder, mmap):
    hf, folder = hf_folder
    gpt = load_gpt2_hf(folder, mmap=mmap, dtype="bf16")
    assert {p.dtype for p in gpt.parameters()} == {torch.bfloat16}
    assert gpt.out_head.weight is gpt.tok_emb.weight
    # exactly the fp32 weights rounded once to bf16
    reference = load_gpt2_hf(folder).to(torch.bfloat16)
    for (name, a), b in zip(gpt.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=name)
    with torch.no_grad():          # and close to transformers' fp32 logits
        torch.testing.assert_close(gpt(PROMPT).float(), hf(PROMPT).logits, atol=0.02, rtol=0.02)
    with pytest.raises(ValueError, match=r"dtype must be None, one of \['fp32', 'bf16', 'fp16'\]"):
        load_gpt2_hf(folder, dtype=torch.int8)


@pytest.mark.parametrize("source", ["GPT2LMHeadModel", "GPT2Model", "state dict with prefix",
                                    "state dict without prefix"])
def test_load_weights_into_gpt_accepts_models_and_state_dicts(hf_folder, source):
    hf, _ = hf_folder
    gpt_hf = {"GPT2LMHeadModel": hf, "GPT2Model": hf.transformer,
              "state dict with prefix": hf.state_dict(),
              "state dict without prefix": hf.transformer.state_dict()}[source]
    gpt = load_weights_into_gpt(GPTModel(our_cfg()), gpt_hf).eval()
    assert_same_model(gpt, hf)


def test_old_attention_buffers_are_ignored(hf_folder):
    hf, _ = hf_folder
    state = dict(hf.transformer.state_dict())
    for i in range(LAYERS):      # what older transformers versions kept in state dicts
        state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, CTX, CTX))
        state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    assert_same_model(load_weights_into_gpt(GPTModel(our_cfg()), state).eval(), hf)


def test_untied_head(tmp_path):
    hf = random_hf_model(seed=3, tie=False)
    hf.save_pretrained(tmp_path)
    gpt = load_gpt2_hf(tmp_path)
    assert gpt.cfg["tie_embeddings"] is False
    assert_same_model(gpt, hf)
    assert_same_model(load_weights_into_gpt(GPTModel(our_cfg(tie=False)), hf).eval(), hf)
    with pytest.raises(ValueError, match="tie_embeddings=False"):
        load_weights_into_gpt(GPTModel(our_cfg(tie=True)), hf)


def test_sharded_checkpoint(tmp_path, hf_folder):
    hf, _ = hf_folder
    hf.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert_same_model(load_gpt2_hf(tmp_path), hf)


@pytest.mark.parametrize("mmap", [True, False])
def test_missing_or_truncated_shard_is_named(tmp_path, hf_folder, mmap):
    hf, _ = hf_folder
    hf.save_pretrained(tmp_path, max_shard_size="100KB")
    shards = sorted(tmp_path.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2
    shards[-1].write_bytes(shards[-1].read_bytes()[:1000])
    with pytest.raises(ValueError, match=rf"could not open .*{shards[-1].name}.*truncated"):
        load_gpt2_hf(tmp_path, mmap=mmap)
    shards[1].unlink()                   # checked before anything is read
    with pytest.raises(FileNotFoundError, match=rf"lacks 1 of the weight files .*index"
                                                rf"\.json names: \['{shards[1].name}'\]"):
        load_gpt2_hf(tmp_path, mmap=mmap)


def test_more_blocks_than_n_layer_is_an_error(tmp_path, hf_folder):
    hf, _ = hf_folder                    # 3 blocks
    hf.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "n_layer": 2}))
    with pytest.raises(ValueError, match=r"holds 3 transformer blocks but .*config\.json says "
                                         r"n_layer=2"):
        load_gpt2_hf(tmp_path)
    with pytest.raises(ValueError, match=r"holds 3 transformer blocks.*n_layer=2"):
        load_weights_into_gpt(GPTModel({**our_cfg(), "n_layers": 2}), hf)


def test_wrong_shape_names_the_parameter(hf_folder):
    hf, _ = hf_folder
    state = dict(hf.state_dict())
    state["transformer.h.1.mlp.c_fc.weight"] = state["transformer.h.1.mlp.c_fc.weight"][:, :-1]
    with pytest.raises(ValueError, match=r"trf_blocks\.1\.ff\.fc\.weight"):
        load_weights_into_gpt(GPTModel(our_cfg()), state)


def test_missing_key_is_named(hf_folder):
    hf, _ = hf_folder
    state = dict(hf.state_dict())
    del state["transformer.h.2.ln_2.bias"]
    with pytest.raises(ValueError, match=r"h\.2\.ln_2\.bias"):
        load_weights_into_gpt(GPTModel(our_cfg()), state)


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_damaged_safetensors_gives_clear_error(tmp_path, hf_folder, damage):
    hf, _ = hf_folder
    hf.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\x07" * 4096)
    with pytest.raises(ValueError, match="truncated"):
        load_gpt2_hf(tmp_path)


def test_config_gpt_model_cannot_compute_is_rejected():
    base = {"model_type": "gpt2", "vocab_size": 97, "n_positions": 32, "n_embd": 48,
            "n_layer": 2, "n_head": 4}
    assert config_from_hf(base)["tie_embeddings"] is True
    for bad in ({"activation_function": "relu"}, {"layer_norm_epsilon": 1e-6},
                {"scale_attn_by_inverse_layer_idx": True}, {"model_type": "llama"}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            config_from_hf({**base, **bad})


def test_hub_names_go_through_snapshot_download(hf_folder, monkeypatch, tmp_path):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    hf, folder = hf_folder
    calls = []

    def fake_snapshot_download(repo_id, **kwargs):     # the real one needs the internet
        calls.append((repo_id, kwargs))
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    assert_same_model(load_gpt2_hf("gpt2-small (124M)", cache_dir=tmp_path), hf)
    load_gpt2_hf("openai-community/gpt2-medium", cache_dir=tmp_path)
    load_gpt2_hf("1558M", cache_dir=tmp_path)      # download_weights.py's short names too
    assert [repo for repo, _ in calls] == ["openai-community/gpt2", "openai-community/gpt2-medium",
                                           "openai-community/gpt2-xl"]
    kwargs = calls[0][1]
    assert kwargs["cache_dir"] == tmp_path
    assert {"config.json", "*.safetensors"} <= set(kwargs["allow_patterns"])


def test_offline_hub_gives_clear_error(monkeypatch):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline(repo_id, **kwargs):
        raise LocalEntryNotFoundError("cannot reach the Hub and nothing is cached")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(OSError, match="internet connection"):
        load_gpt2_hf("gpt2-small (124M)")
    for missing in ("./no/such/folder", Path("no-such-folder")):
        with pytest.raises(FileNotFoundError, match="there is no folder"):
            load_gpt2_hf(missing)


def test_bad_names_say_what_is_wrong(monkeypatch, tmp_path):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    from huggingface_hub.errors import LocalEntryNotFoundError
    from huggingface_hub.utils import validate_repo_id

    def offline(repo_id, **kwargs):     # checks the id as the real one does, then no network
        validate_repo_id(repo_id)
        raise LocalEntryNotFoundError("cannot reach the Hub and nothing is cached")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    monkeypatch.chdir(tmp_path)
    # not a valid Hub id: the names that would work, not huggingface_hub's regex
    with pytest.raises(ValueError, match=r"'gpt2-medium \(345M\)' is not a folder.*"
                                         r"'gpt2-medium \(355M\)'.*'124M'"):
        load_gpt2_hf("gpt2-medium (345M)")
    # a relative folder that is not there could also be a Hub id: say both
    with pytest.raises(OSError, match=r"could not download 'model_weights/hf_export'.*there "
                                      r"is no folder '.*model_weights/hf_export'"):
        load_gpt2_hf("model_weights/hf_export")
    (tmp_path / "trained.pth").write_bytes(b"not a folder")
    with pytest.raises(NotADirectoryError, match="load_checkpoint"):
        load_gpt2_hf("trained.pth")


# ---------------------------------------------------------------------------------------
# ours -> HF

def random_gpt(tie, qkv_bias, seed=0):
    # vocab 50257 so GPT-2's real tokenizer fits; emb 48 keeps it at ~2.5M parameters
    return randomize_(GPTModel(our_cfg(tie=tie, vocab=50257, qkv_bias=qkv_bias)), seed)


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("qkv_bias", [True, False], ids=["qkv_bias", "no_qkv_bias"])
def test_export_round_trip(tmp_path, tie, qkv_bias):
    from safetensors import safe_open

    gpt = random_gpt(tie, qkv_bias)
    out = export_to_hf(gpt, tmp_path / "export")
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is tie
    with safe_open(out / "model.safetensors", framework="pt") as f:
        assert ("lm_head.weight" in f.keys()) is (not tie)
    hf = GPT2LMHeadModel.from_pretrained(out).eval()
    prompt = torch.tensor([[464, 2068, 7586, 21831, 18045, 625], [50256, 40, 716, 257, 1332, 13]])
    assert_same_model(gpt, hf, prompt)
    # and back into our format: same function, tie flag kept
    back = load_gpt2_hf(out)
    assert back.cfg["tie_embeddings"] is tie
    with torch.no_grad():
        torch.testing.assert_close(back(prompt), gpt(prompt), atol=1e-5, rtol=1e-5)


def test_exported_files_get_the_same_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        out = export_to_hf(random_gpt(True, True), tmp_path / "export")
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert set(modes.values()) == {0o644}, modes      # safetensors alone would make 0600


def test_export_runs_in_transformers_pipeline(tmp_path):
    out = export_to_hf(random_gpt(tie=True, qkv_bias=False), tmp_path / "export")
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    text = "Hello, world. GPT-2 says<|endoftext|> hi"
    assert tokenizer(text).input_ids == get_tokenizer().encode(text, allowed_special="all")
    generator = transformers.pipeline("text-generation", model=str(out))
    result = generator("Hello, my name is", max_new_tokens=5, do_sample=False)
    assert result[0]["generated_text"].startswith("Hello, my name is")
    assert len(result[0]["generated_text"]) > len("Hello, my name is")


def test_export_rejects_a_vocab_the_tokenizer_does_not_match(tmp_path):
    with pytest.raises(ValueError, match="50257"):
        export_to_hf(GPTModel(our_cfg(vocab=97)), tmp_path / "export")
    assert not (tmp_path / "export").exists()


EXPORTED = sorted(["config.json", "generation_config.json", "merges.txt", "model.safetensors",
                   "tokenizer_config.json", "vocab.json"])


@pytest.mark.parametrize("crash_in", ["save_file", "copyfile"])
def test_interrupted_export_is_never_trusted(tmp_path, monkeypatch, crash_in):
    gpt = random_gpt(tie=True, qkv_bias=True)
    out = export_to_hf(random_gpt(tie=False, qkv_bias=True, seed=1), tmp_path / "export")

    def crash(*args, **kwargs):
        raise RuntimeError("disk full")

    with monkeypatch.context() as m:       # dies while writing the weights / the tokenizer
        if crash_in == "save_file":
            m.setattr(download_weights_hf, "save_file", crash)
        else:
            m.setattr(download_weights_hf.shutil, "copyfile", crash)
        with pytest.raises(RuntimeError, match="disk full"):
            export_to_hf(gpt, out)
    # no temporary files left, and no weights (the old ones would not fit the new config,
    # which may already be written): neither loader takes the folder
    assert not list(out.glob(".*"))
    assert not list(out.glob("*.safetensors"))
    with pytest.raises(FileNotFoundError, match="interrupted, run the export again"):
        load_gpt2_hf(out)
    with pytest.raises(OSError, match="model.safetensors"):
        GPT2LMHeadModel.from_pretrained(out)

    assert export_to_hf(gpt, out) == out           # running it again completes it
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
    assert sorted(p.name for p in out.iterdir()) == EXPORTED
    assert_same_model(gpt, GPT2LMHeadModel.from_pretrained(out).eval(), PROMPT)


def test_export_into_a_clone_of_a_hub_repo_keeps_what_it_did_not_write(tmp_path):
    # `git clone` of one's Hub model repo: .git, a model card, and an older sharded model
    repo = tmp_path / "my-gpt2"
    (repo / ".git").mkdir(parents=True)
    (repo / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (repo / "README.md").write_text("model card")
    random_hf_model(vocab=50257).save_pretrained(repo, max_shard_size="2MB")
    assert (repo / "model.safetensors.index.json").is_file()
    (repo / ".model.safetensors.1234abcd.tmp").write_bytes(b"left by a killed export")

    gpt = random_gpt(tie=True, qkv_bias=True)
    assert export_to_hf(gpt, repo) == repo
    assert (repo / ".git" / "HEAD").read_text() == "ref: refs/heads/main\n"
    assert (repo / "README.md").read_text() == "model card"
    # the old shards and their index are gone (they would contradict the new weights), and
    # so is the temporary file
    assert sorted(p.name for p in repo.iterdir()) == sorted([".git", "README.md", *EXPORTED])
    assert_same_model(gpt, GPT2LMHeadModel.from_pretrained(repo).eval(), PROMPT)


def test_export_into_other_folders(tmp_path, monkeypatch):
    gpt = random_gpt(tie=True, qkv_bias=True)
    # "." (its name is "") works and leaves nothing else behind
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    assert export_to_hf(gpt, ".") == here
    assert sorted(p.name for p in here.iterdir()) == EXPORTED
    assert sorted(p.name for p in tmp_path.iterdir()) == ["here"]

    # a folder of other files gets the export beside them
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("keep me")
    export_to_hf(gpt, notes)
    assert sorted(p.name for p in notes.iterdir()) == sorted(["todo.txt", *EXPORTED])
    assert (notes / "todo.txt").read_text() == "keep me"

    # but files of the export's names that are not a model are not overwritten
    other = tmp_path / "other"
    other.mkdir()
    (other / "vocab.json").write_text("{}")
    (other / "model-00001-of-00002.safetensors").write_text("")
    with pytest.raises(FileExistsError, match=r"not a model folder but has "
                                              r"\['model-00001-of-00002\.safetensors', "
                                              r"'vocab\.json'\]"):
        export_to_hf(gpt, other)
    assert sorted(p.name for p in other.iterdir()) == ["model-00001-of-00002.safetensors",
                                                       "vocab.json"]
    with pytest.raises(FileExistsError, match="is a file"):
        export_to_hf(gpt, other / "vocab.json")


def test_command_line_export_of_a_bare_state_dict(tmp_path, capsys):
    gpt = random_gpt(tie=True, qkv_bias=True)
    torch.save(gpt.state_dict(), tmp_path / "bare.pth")
    argv = ["--export", str(tmp_path / "bare.pth"), "--out", str(tmp_path / "hf")]
    with pytest.raises(SystemExit):
        download_weights_hf.main(argv)
    err = capsys.readouterr().err
    assert "holds only weights, no config" in err and "--config" in err and "cfg=" not in err
    (tmp_path / "cfg.json").write_text(json.dumps(gpt.cfg))
    out = download_weights_hf.main([*argv, "--config", str(tmp_path / "cfg.json")])
    prompt = torch.tensor([[464, 2068, 7586]])
    with torch.no_grad():
        torch.testing.assert_close(load_gpt2_hf(out)(prompt), gpt(prompt), atol=1e-5, rtol=1e-5)


def test_command_line_export_and_load(tmp_path):
    gpt = random_gpt(tie=False, qkv_bias=False)
    save_checkpoint(tmp_path / "trained.pth", gpt)
    out = download_weights_hf.main(["--export", str(tmp_path / "trained.pth"),
                                    "--out", str(tmp_path / "hf")])
    saved = download_weights_hf.main(["--load", str(out), "--save", str(tmp_path / "back.pth")])
    back = load_checkpoint(saved)
    prompt = torch.tensor([[464, 2068, 7586]])
    with torch.no_grad():
        torch.testing.assert_close(back(prompt), gpt(prompt), atol=1e-5, rtol=1e-5)
