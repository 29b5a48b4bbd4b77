"""Issue 13: the last good checkpoint is always good, and every bad input gets its message."""

import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import dataset
from conftest import TINY_FLAGS, signal_at_first_save
from dataset import (
    create_dataloader,
    default_corpus_text,
    get_tokenizer,
    load_tokens,
    prepare_splits,
    split_paths,
)
from engine import fileio
from model import GPTModel, load_checkpoint, read_checkpoint, save_checkpoint
from train import main, parse_args
from train_utils import make_optimizer, train_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = TINY_FLAGS
TINY_CFG = {"vocab_size": 50257, "context_length": 32, "emb_dim": 32, "n_heads": 2,
            "n_layers": 2, "drop_rate": 0.0, "qkv_bias": False}


@pytest.fixture(scope="module")
def corpus_tokens():
    return get_tokenizer().encode(default_corpus_text()[:20_000])


def _text(tmp_path, n=20_000):
    path = tmp_path / "input.txt"
    path.write_text(default_corpus_text()[:n])
    return path


def _run(tmp_path, *extra):
    return main(["--data", str(tmp_path / "input.txt"), "--out", str(tmp_path / "run.pth"),
                 *TINY, *extra])


def _finite(path):
    model = load_checkpoint(path)
    with torch.no_grad():
        logits = model(torch.tensor([[464, 318, 257]]))
    return all(torch.isfinite(p).all() for p in model.parameters()) and bool(
        torch.isfinite(logits).all())


# ---- must fix 1 and 2: a diverged model is never saved -------------------------------------

@pytest.mark.parametrize("breakage", ["nan", "huge"])
def test_a_diverging_update_never_replaces_the_last_good_checkpoint(tmp_path, corpus_tokens,
                                                                      breakage):
    # The update of step 3 breaks the weights: NaN, or finite but so large that the loss is
    # not finite any more. Its own loss (computed before the update) is fine, so only a
    # look at the weights about to be saved can keep them out of the checkpoint.
    torch.manual_seed(0)
    model = GPTModel(TINY_CFG)
    opt = make_optimizer(model, 1e-3)
    real_step, steps = opt.step, []

    def step(*args, **kwargs):
        out = real_step(*args, **kwargs)
        steps.append(1)
        if len(steps) == 3:
            with torch.no_grad():
                for p in model.parameters():
                    p.fill_(float("nan")) if breakage == "nan" else p.mul_(1e30)
        return out

    opt.step = step
    train = create_dataloader(corpus_tokens[:2000], batch_size=4, max_length=32, stride=32)
    ckpt = tmp_path / "run.pth"
    with pytest.raises(FloatingPointError, match=rf"with the weights after optimizer step 3; "
                                                 rf"training stopped and the last good "
                                                 rf"checkpoint is {ckpt} \(step 2\)"):
        train_model(model, train, train, opt, device="cpu", num_epochs=1, eval_freq=100,
                    checkpoint_path=ckpt, checkpoint_every=1, progress=False)
    assert read_checkpoint(ckpt)["step"] == 2
    assert _finite(ckpt)


def test_a_run_that_diverges_on_its_last_step_fails_and_keeps_the_old_file(tmp_path):
    _text(tmp_path)
    _run(tmp_path, "--max-steps", "2")
    before = (tmp_path / "run.pth").read_bytes()
    done = subprocess.run(
        [sys.executable, os.path.join(ROOT, "train.py"), "--data", str(tmp_path / "input.txt"),
         "--out", str(tmp_path / "run.pth"), *TINY, "--learning-rate", "1e6", "--max-steps",
         "1"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert "final:" not in done.stdout and "Traceback" not in done.stderr
    assert "error: loss became nan with the weights after optimizer step 1; training " \
           "stopped and nothing of this run was saved" in done.stderr
    assert (tmp_path / "run.pth").read_bytes() == before


# ---- must fix 3: --config never replaces a checkpoint's own -----------------------------

def test_a_config_that_contradicts_the_saved_one_is_refused(tmp_path):
    import download_weights_hf
    path = save_checkpoint(tmp_path / "m.pth", GPTModel(TINY_CFG))
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({**TINY_CFG, "n_heads": 4}))
    with pytest.raises(ValueError, match=r"carries its own config, and the one given differs "
                                         r"\(n_heads: saved 2, given 4\)"):
        download_weights_hf.main(["--export", str(path), "--config", str(cfg),
                                  "--out", str(tmp_path / "hf")])
    assert not (tmp_path / "hf").exists()
    load_checkpoint(path, cfg=dict(TINY_CFG))        # the same config is fine


# ---- must fix 4: split files this program did not write are never overwritten ----------

def _hand_split(tmp_path):
    inp = tmp_path / "input.txt"
    inp.write_text("a line\n" * 100)
    time.sleep(0.01)
    for p, text in zip(split_paths(inp), ("mine train\n" * 50, "mine valid\n" * 10,
                                          "mine test\n" * 5)):
        p.write_text(text)
    return inp


def test_split_files_of_ones_own_survive_a_touch_of_the_input(tmp_path, capsys):
    inp = _hand_split(tmp_path)
    before = [p.read_text() for p in split_paths(inp)]
    os.utime(inp, ns=(time.time_ns() + 10**9,) * 2)          # `touch input.txt`
    with pytest.raises(FileExistsError, match=r"is newer than its split files, but train.txt, "
                                              r"valid.txt, test.txt beside it were not written"
                                              r" by this program .* delete them or pass "
                                              r"--resplit"):
        prepare_splits(inp)
    assert [p.read_text() for p in split_paths(inp)] == before
    paths = prepare_splits(inp, resplit=True)                 # asked for: split again
    assert "".join(p.read_text() for p in paths) == inp.read_text()


def test_a_split_file_edited_by_hand_is_not_overwritten(tmp_path):
    inp = tmp_path / "input.txt"
    inp.write_text("".join(f"line {i}\n" for i in range(200)))
    train, _, _ = prepare_splits(inp)
    train.write_text("my own edits\n" * 20)                  # edited after the split
    inp.write_text("".join(f"new line {i}\n" for i in range(200)))
    with pytest.raises(FileExistsError, match="changed since it was split, but train.txt"):
        prepare_splits(inp)
    assert train.read_text() == "my own edits\n" * 20
    with pytest.raises(FileExistsError, match="--resplit"):
        _run(tmp_path)
    _run(tmp_path, "--resplit", "--max-steps", "1")          # the flag splits again
    assert train.read_text().startswith("new line 0\n")


def test_half_a_split_set_of_ones_own_is_not_overwritten(tmp_path):
    inp = tmp_path / "input.txt"
    inp.write_text("a line\n" * 100)
    mine = split_paths(inp)[0]
    mine.write_text("mine\n" * 80)
    with pytest.raises(FileExistsError, match="has no complete set of split files, but "
                                              "train.txt"):
        prepare_splits(inp)
    assert mine.read_text() == "mine\n" * 80


# ---- should fix ----------------------------------------------------------------------------

@pytest.mark.parametrize("change, match", [
    (("--stride", "16"), r"stride: saved 32, now 16"),
    (("--data", "OTHER"), r"data: saved '.*input.txt', now '.*other.txt'"),
])
def test_resume_refuses_another_data_or_stride(tmp_path, change, match):
    _text(tmp_path)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "other.txt").write_text(default_corpus_text()[:20_000])
    _run(tmp_path, "--max-steps", "2")
    change = [str(tmp_path / "other" / "other.txt") if c == "OTHER" else c for c in change]
    with pytest.raises(ValueError, match=rf"cannot resume .*{match}"):
        _run(tmp_path, "--max-steps", "4", "--resume", *change)


class _FullDisk:
    """A file whose writes fail with ENOSPC after ``room`` bytes, as on a full disk."""

    def __init__(self, f, room):
        self.f, self.room = f, room

    def write(self, data):
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(data)
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def _fill_disk_after(monkeypatch, room):
    real = os.fdopen
    monkeypatch.setattr(fileio.os, "fdopen", lambda fd, mode: _FullDisk(real(fd, mode), room))


def test_a_full_disk_while_saving_a_checkpoint_keeps_the_old_one(tmp_path, monkeypatch):
    path = save_checkpoint(tmp_path / "m.pth", GPTModel(TINY_CFG))
    before = path.read_bytes()
    _fill_disk_after(monkeypatch, 100_000)
    with pytest.raises(fileio.DiskFullError, match=rf"^No space left on the disk for {path}: "
                                                   rf"writing it needs about 12.\d MB, and "
                                                   rf"[\d,.]+ [KM]B are free there\. Nothing was "
                                                   rf"changed"):
        save_checkpoint(path, GPTModel(TINY_CFG))
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pth"]       # no temp file


def test_a_full_disk_while_caching_tokens_is_one_clear_line(tmp_path, monkeypatch):
    text = _text(tmp_path, 200_000)
    _fill_disk_after(monkeypatch, 1000)
    with pytest.raises(fileio.DiskFullError, match=r"^No space left on the disk for .*input"
                                                   r"\.txt\.tokens\.u16: writing it needs "
                                                   r"about \d+\.\d KB"):
        load_tokens(text)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["input.txt"]


def test_an_unwritable_out_is_found_before_training(tmp_path, capsys):
    _text(tmp_path)
    (tmp_path / "afile").write_text("not a folder")
    with pytest.raises(OSError, match=r"cannot write .*afile/run\.pth: .*afile is a file, "
                                      r"not a folder"):
        main(["--data", str(tmp_path / "input.txt"), "--out",
              str(tmp_path / "afile" / "run.pth"), *TINY])
    assert "Ep " not in capsys.readouterr().out
    assert not (tmp_path / "train.txt").exists()            # stopped before any work


def test_a_vocabulary_smaller_than_the_tokenizer_is_a_config_error(tmp_path):
    _text(tmp_path)
    with pytest.raises(ValueError, match=r"--vocab-size 1000 is smaller than the tokenizer's "
                                         r"50257 token ids"):
        _run(tmp_path, "--vocab-size", "1000")


@pytest.mark.parametrize("flag", ["--learning-rate", "--weight-decay", "--grad-clip"])
@pytest.mark.parametrize("value", ["nan", "inf"])
def test_non_finite_float_flags_are_refused_at_parse_time(flag, value, capsys):
    with pytest.raises(SystemExit) as e:
        parse_args([*TINY, flag, value])
    assert e.value.code == 2
    assert f"{flag} must be a finite number, got {value}" in capsys.readouterr().err


def test_a_file_that_is_no_checkpoint_says_so_without_torchs_advice(tmp_path):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(os.urandom(4096).replace(b"PK", b"QQ").replace(b"\x80", b"\x81"))
    with pytest.raises(ValueError, match=r"is not a PyTorch checkpoint \(it starts with bytes"):
        load_checkpoint(junk)

    class Code:
        def __reduce__(self):
            return (os.system, ("true",))

    torch.save({"model_state_dict": {}, "x": Code()}, tmp_path / "code.pth")
    with pytest.raises(ValueError) as e:
        load_checkpoint(tmp_path / "code.pth")
    assert "holds Python objects other than tensors" in str(e.value)
    assert "weights_only=False" not in str(e.value) and "posix.system" in str(e.value)


def test_generate_cli_names_its_config_option_and_nanogpt_files(tmp_path, capsys):
    import generate
    model = GPTModel(TINY_CFG)
    torch.save(model.state_dict(), tmp_path / "bare.pth")
    with pytest.raises(SystemExit):
        generate.main(["--weights", str(tmp_path / "bare.pth"), "--max-new-tokens", "2"])
    assert "--config NAME_OR_JSON on the command line" in capsys.readouterr().err
    (tmp_path / "cfg.json").write_text(json.dumps(TINY_CFG))
    generate.main(["--weights", str(tmp_path / "bare.pth"), "--config",
                   str(tmp_path / "cfg.json"), "--max-new-tokens", "2", "--device", "cpu"])
    torch.save({"model": model.state_dict(), "model_args": {"n_layer": 2}, "iter_num": 5},
               tmp_path / "nano.pth")
    with pytest.raises(SystemExit):
        generate.main(["--weights", str(tmp_path / "nano.pth")])
    assert "is a nanoGPT checkpoint (it has 'model' and 'model_args')" in \
        capsys.readouterr().err


def test_text_files_that_cannot_be_split_or_read_say_why(tmp_path):
    one_line = tmp_path / "one" / "input.txt"
    one_line.parent.mkdir()
    one_line.write_text("word " * 400_000)                          # 2 MB, no newline
    with pytest.raises(ValueError, match=r"too short to split.*It has no line breaks at all, "
                                         r"so all 2,000,000 characters are one line"):
        prepare_splits(one_line)
    utf16 = tmp_path / "u16" / "input.txt"
    utf16.parent.mkdir()
    utf16.write_bytes("hello\nworld\n".encode("utf-16"))
    with pytest.raises(ValueError, match=r"is UTF-16 text .* `iconv -f UTF-16 -t UTF-8 "
                                         r"input.txt > fixed.txt`"):
        prepare_splits(utf16)
    with pytest.raises(ValueError, match=r"is UTF-16 text"):
        load_tokens(utf16)
    with pytest.raises(IsADirectoryError, match=rf"{tmp_path / 'one'} is a folder, not a text "
                                                rf"file; it holds input.txt: pass that "
                                                rf"\(--data {one_line}\)"):
        _run(tmp_path, "--data", str(one_line.parent))


def test_ctrl_c_says_what_is_saved_and_how_to_resume(tmp_path):
    _text(tmp_path, 60_000)
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--data", str(tmp_path / "input.txt"),
           "--out", str(tmp_path / "run.pth"), *TINY, "--checkpoint-every", "2",
           "--max-steps", "400"]
    code, out, err = signal_at_first_save(cmd, tmp_path / "run.pth", signal.SIGINT)
    assert code == 130, err
    assert "Traceback" not in err
    saved = read_checkpoint(tmp_path / "run.pth")["step"]
    assert f"{tmp_path / 'run.pth'} holds step {saved}: continue from there with --resume" \
        in err.strip().splitlines()[-1]
    assert err.strip().splitlines()[-1].startswith("interrupted at optimizer step ")


def test_messages_name_the_flags_the_cli_has(tmp_path, capsys):
    _text(tmp_path)
    with pytest.raises(ValueError, match=r"--batch-size 5000 needs at least 5000 training "
                                         r"windows, .* lower --batch-size or --stride"):
        _run(tmp_path, "--batch-size", "5000")
    import generate
    with pytest.raises(SystemExit):
        generate.main(["--top-k", "-3"])
    err = capsys.readouterr().err
    assert "--top-k must be a positive int, or 0 for all tokens" in err and "None" not in err


def test_a_fresh_run_says_it_replaces_another_runs_checkpoint(tmp_path, capsys):
    _text(tmp_path)
    _run(tmp_path, "--max-steps", "2")
    capsys.readouterr()
    _run(tmp_path, "--max-steps", "1")
    out = capsys.readouterr().out
    assert f"note: {tmp_path / 'run.pth'} holds a run saved at step 2; this run starts " \
           f"afresh and replaces it at its first checkpoint" in out


def test_the_stamp_records_what_it_wrote(tmp_path):
    inp = tmp_path / "input.txt"
    inp.write_text("x\n" * 100)
    paths = prepare_splits(inp)
    stamp = json.loads(dataset.split_stamp_path(inp).read_text())
    assert stamp["splits"] == {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in paths}


def test_eval_probe_draws_nothing_from_the_global_rng(corpus_tokens, tmp_path):
    # the check before a save (one forward in eval mode) must not change training: the same
    # run with checkpoints every step and without any gives the same losses
    def losses(every):
        torch.manual_seed(1)
        model = GPTModel({**TINY_CFG, "drop_rate": 0.1})
        train = create_dataloader(corpus_tokens[:2000], batch_size=4, max_length=32, stride=32)
        return train_model(model, train, train, device="cpu", num_epochs=1, eval_freq=100,
                           checkpoint_path=tmp_path / f"{every}.pth", checkpoint_every=every,
                           progress=False)["step_loss"]
    assert losses(1) == losses(0)


def test_ctrl_c_during_a_checkpoint_write_waits_until_it_is_recorded():
    # the race the test above can hit: SIGINT right after the file appears, before the
    # loop records the step it holds; inside the block the signal only takes note
    before = signal.getsignal(signal.SIGINT)
    done = []
    with pytest.raises(KeyboardInterrupt):
        with fileio.ctrl_c_after():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            done.append("recorded")
    assert done == ["recorded"]
    assert signal.getsignal(signal.SIGINT) is before
    with fileio.ctrl_c_after():         # no Ctrl-C: nothing raised
        done.append("again")
    assert done == ["recorded", "again"]
