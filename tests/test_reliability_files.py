"""Issue 23, files: a checkpoint, token cache or export is what it says it is, or is refused
with one line naming it."""

import hashlib
import json
import struct
import zipfile

import numpy as np
import pytest
import torch

import evaluate
import generate
import train
from conftest import TINY_CFG, read_only
from dataset import default_corpus_text, load_tokens, prepare_splits
from download_weights_hf import export_to_hf, load_gpt2_hf
from engine import fileio
from engine.checkpoints import DamagedFileError, first_non_finite
from engine.token_cache import token_cache_paths
from model import GPTModel, load_checkpoint, save_checkpoint
from model_sources import load_model


def _text(tmp_path, n=3000):
    path = tmp_path / "text.txt"
    path.write_text(default_corpus_text()[:n])
    return path


def _overwrite_weights(path, n=4000, value=0.5):
    """Overwrite ``n`` float32s of the checkpoint's largest tensor with other finite numbers,
    in place, keeping the file's size: what a bad disk, a cut and patched copy or a sync
    tool can do."""
    with zipfile.ZipFile(path) as archive:
        info = max((i for i in archive.infolist() if "/data/" in i.filename),
                   key=lambda i: i.file_size)
    with open(path, "r+b") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = struct.unpack("<HH", f.read(4))
        f.seek(info.header_offset + 30 + name_len + extra_len + 1024)
        f.write(np.full(n, value, dtype=np.float32).tobytes())


def _cli_error(cli, argv, capsys):
    """The one line a command line prints for an error it refuses (exit status 2)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


# ---- silently wrong before: weights overwritten by other finite numbers ----------------------

def test_a_checkpoint_with_overwritten_weights_is_refused_by_every_reader(tmp_path, capsys):
    model = GPTModel(TINY_CFG)
    path = save_checkpoint(tmp_path / "m.pth", model)
    size = path.stat().st_size
    _overwrite_weights(path)
    assert path.stat().st_size == size
    # what torch.load alone gives: other weights, all finite, not a word said
    raw = torch.load(path, weights_only=True)["model_state_dict"]["tok_emb.weight"]
    assert not torch.equal(raw, model.tok_emb.weight) and bool(torch.isfinite(raw).all())
    line = (rf"'{path}' is damaged: its part '[^']*/data/\d+' no longer matches the checksum "
            rf"\(CRC-32\) written with it, so bytes changed on disk after it was saved")
    with pytest.raises(DamagedFileError, match=line):
        load_checkpoint(path)
    with pytest.raises(DamagedFileError, match=line):
        load_model(path)
    assert "is damaged: its part" in _cli_error(
        generate.main, ["--weights", str(path), "--device", "cpu"], capsys)
    text = _text(tmp_path, 20_000)
    assert "is damaged: its part" in _cli_error(
        evaluate.main, ["--weights", str(path), "--data", str(text), "--device", "cpu",
                        "--no-progress"], capsys)
    with pytest.raises(DamagedFileError, match=line):
        train.main(["--data", str(text), "--out", str(tmp_path / "run.pth"), "--init-from",
                    str(path), "--no-progress", "--device", "cpu"])


# ---- unclear before: what a file is, when it is not a GPTModel's checkpoint ------------------

@pytest.mark.parametrize("content, message", [
    (lambda: torch.zeros(3, 4), r"holds a single tensor of shape \(3, 4\), not a model's "
                                r"weights; pass a \.pth written by train\.py or save_checkpoint"),
    (lambda: [1, 2], r"holds a list, not a model's weights"),
    (lambda: torch.nn.Linear(2, 3).state_dict(),
     r"holds the weights of another kind of model \(2 tensors: 'weight', 'bias'\), not a "
     r"GPTModel's \('tok_emb.weight', \.\.\.\)"),
    (lambda: {"model_state_dict": GPTModel(TINY_CFG).state_dict(), "step": 3},
     r"has weights but no config; pass cfg=\.\.\. in Python or --config NAME_OR_JSON on the "
     r"command line"),
])
def test_files_that_are_not_a_gpt_checkpoint_say_what_they_are(tmp_path, content, message):
    torch.save(content(), tmp_path / "x.pth")
    with pytest.raises(ValueError, match=rf"^'{tmp_path / 'x.pth'}' {message}"):
        load_checkpoint(tmp_path / "x.pth")
    if "config" not in message:         # a config given does not make it a model
        with pytest.raises(ValueError, match=message):
            load_checkpoint(tmp_path / "x.pth", cfg=dict(TINY_CFG))


def test_a_config_that_does_not_fit_the_weights_is_one_short_line(tmp_path):
    torch.save(GPTModel({**TINY_CFG, "emb_dim": 64}).state_dict(), tmp_path / "bare.pth")
    with pytest.raises(ValueError) as e:
        load_checkpoint(tmp_path / "bare.pth", cfg="124M")
    message = str(e.value)
    # 2 blocks of 64 against 124M's 12 of 768: all 29 common tensors (4 outside the blocks,
    # 12 per block, the head) have other shapes, the 10 blocks more (12 tensors each) are missing
    assert message.endswith(
        "tok_emb.weight is (50257, 64) in the file and (50257, 768) for the config (28 more "
        "tensors differ in shape); 120 tensors missing from the file (first: "
        "'trf_blocks.2.norm1.weight'); pass the config they were trained with")
    assert "\n" not in message and len(message) < 600


def test_a_tied_checkpoint_with_nan_damage_is_called_damaged(tmp_path, capsys):
    tied = GPTModel({**TINY_CFG, "tie_embeddings": True})
    with torch.no_grad():
        tied.tok_emb.weight[7, :3] = float("nan")
    path = save_checkpoint(tmp_path / "nan.pth", tied)
    line = (r"holds NaN or infinite numbers in tok_emb.weight: the file is damaged or was "
            r"saved from a run that diverged; use an earlier checkpoint or another copy")
    with pytest.raises(ValueError, match=line):
        load_model(path)
    for cli, argv in ((generate.main, []),
                      (evaluate.main, ["--data", str(_text(tmp_path)), "--no-progress"])):
        err = _cli_error(cli, ["--weights", str(path), "--device", "cpu", *argv], capsys)
        assert "holds NaN or infinite numbers in tok_emb.weight" in err
        assert "output head different" not in err


def test_non_finite_numbers_are_found_wherever_they_are_and_only_there():
    huge = torch.full((8,), 3e38)               # finite, though their float32 sum is inf
    assert first_non_finite({"w": huge, "b": torch.zeros(2, dtype=torch.float16)}) is None
    state = {"state": {"h.0.w": {"step": torch.tensor(3.0), "exp_avg": huge.clone()}}}
    state["state"]["h.0.w"]["exp_avg"][5] = -float("inf")
    assert first_non_finite({"w": huge, "optimizer": state}) == "optimizer.state.h.0.w.exp_avg"


# ---- the disk-full estimate -----------------------------------------------------------------

def test_the_size_estimate_counts_a_tied_matrix_once(tmp_path):
    tied, untied = (GPTModel({**TINY_CFG, "tie_embeddings": tie}) for tie in (True, False))
    unique = sum(p.numel() * p.element_size() for p in tied.parameters())
    assert fileio._nbytes(tied.state_dict()) == unique
    assert fileio._nbytes(untied.state_dict()) == unique + 50257 * 32 * 4
    # and it is what torch.save writes, give or take the pickled names
    written = save_checkpoint(tmp_path / "tied.pth", tied).stat().st_size
    assert unique <= written < unique * 1.02


# ---- token cache -----------------------------------------------------------------------------

def test_a_damaged_token_cache_is_noticed_and_made_again(tmp_path, capsys):
    text = _text(tmp_path, 20_000)
    ids = np.array(load_tokens(text))
    u16, meta_path = token_cache_paths(text)
    meta = json.loads(meta_path.read_text())
    assert meta["ids_sha256"] == hashlib.sha256(u16.read_bytes()).hexdigest()
    data = bytearray(u16.read_bytes())
    data[200:208] = np.array([11, 22, 33, 44], dtype=np.uint16).tobytes()   # same size
    assert bytes(data) != u16.read_bytes()
    u16.write_bytes(bytes(data))
    capsys.readouterr()
    again = load_tokens(text)
    assert (f"note: the token cache {u16} does not match the checksum recorded with it (it "
            f"was damaged on disk); tokenizing the text again") in capsys.readouterr().out
    assert np.array_equal(np.array(again), ids)
    # a cache written before the checksum was recorded: trusted once, and recorded then
    del meta["ids_sha256"]
    meta_path.write_text(json.dumps(meta))
    assert np.array_equal(np.array(load_tokens(text)), ids)
    assert json.loads(meta_path.read_text())["ids_sha256"] == hashlib.sha256(
        u16.read_bytes()).hexdigest()
    assert "from the cache" in capsys.readouterr().out


# ---- our Hugging Face exports --------------------------------------------------------------

def test_a_damaged_export_is_refused_and_a_sound_one_loads(tmp_path, capsys):
    model = GPTModel({**TINY_CFG, "tie_embeddings": True}).eval()
    folder = export_to_hf(model, tmp_path / "export")
    weights = folder / "model.safetensors"
    loaded = load_gpt2_hf(folder)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())
    data = bytearray(weights.read_bytes())
    data[-400:-396] = np.float32(0.25).tobytes()            # a weight, changed in place
    weights.write_bytes(bytes(data))
    line = (rf"{weights} is damaged: its tensors no longer match the checksum the export "
            rf"recorded in it, so bytes changed on disk since; export the model again")
    for mmap in (True, False):
        with pytest.raises(ValueError, match=line):
            load_gpt2_hf(folder, mmap=mmap)
    assert "is damaged: its tensors" in _cli_error(
        generate.main, ["--weights", str(folder), "--device", "cpu"], capsys)


# ---- folders that cannot be written ---------------------------------------------------------

def test_a_read_only_data_or_export_folder_is_one_line_with_the_fix(tmp_path, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    text = data / "input.txt"
    text.write_text(default_corpus_text()[:20_000])
    read_only(monkeypatch, data)
    with pytest.raises(OSError) as e:
        prepare_splits(text)
    assert str(e.value) == (
        f"cannot write the split files train.txt, valid.txt and test.txt beside {text}: "
        f"{data} is not writable (Read-only file system); copy the text into a folder you can "
        f"write to and pass that (--data), or make the folder writable")
    out = tmp_path / "export"
    out.mkdir()
    read_only(monkeypatch, out)
    with pytest.raises(OSError) as e:
        export_to_hf(GPTModel(TINY_CFG), out)
    assert str(e.value) == (f"cannot write {out / 'config.json'}: the folder {out} is not "
                            f"writable (Read-only file system); make it writable, or choose a "
                            f"path in another folder")
