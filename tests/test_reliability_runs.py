"""Issue 23, runs: a run never overwrites what it reads, one run per --out, --resume of
exactly the run that was saved, and one line for every flag that does not fit."""

import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from test_reliability_files import _cli_error, _overwrite_weights

import generate
from conftest import TINY_CFG, TINY_FLAGS, make_hf_model
from dataset import default_corpus_text
from engine.checkpoints import DamagedFileError, read_checkpoint
from engine.runs import RunInProgressError
from lora import add_lora
from model import GPTModel, load_checkpoint, save_checkpoint
from train import main, parse_args

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FINETUNE = ["--batch-size", "4", "--eval-iter", "2", "--no-progress", "--device", "cpu",
            "--dtype", "fp32", "--start-context", "The", "--context-length", "32"]
HOST = socket.gethostname()


def _hf_tiny(folder, seed=3):
    """A random GPT-2 (GPT-2's vocabulary, 64 positions, 32 wide) saved with save_pretrained."""
    make_hf_model(vocab_size=50257, n_positions=64, n_embd=32, n_layer=2, n_head=2,
                  seed=seed).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    return _hf_tiny(tmp_path_factory.mktemp("hf") / "tiny-gpt2")


def _data(folder, n=20_000, out="run.pth"):
    folder.mkdir(parents=True, exist_ok=True)
    text = folder / "input.txt"
    if not text.exists():
        text.write_text(default_corpus_text()[:n])
    return ["--data", str(text), "--out", str(folder / out)]


def _dead_pid():
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    return int(done.stdout)


# ---- a run never overwrites what it reads ----------------------------------------------------

def test_an_out_that_is_a_file_the_run_reads_is_refused_up_front(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    source = save_checkpoint(tmp_path / "X.pth", GPTModel({**TINY_CFG, "tie_embeddings": True}))
    before = source.read_bytes()
    (tmp_path / "link.pth").symlink_to(source)
    (tmp_path / "input.txt").write_text(default_corpus_text()[:20_000])
    for out in ("X.pth", "./X.pth", str(source), "link.pth"):
        with pytest.raises(ValueError, match=(
                rf"^--out {out} is the file it reads as --init-from \(X.pth\), and writing "
                rf"would replace it; choose another --out, e.g. --out .*_tuned.pth$")):
            main(["--data", "input.txt", "--out", out, "--init-from", "X.pth", "--lora-rank", "4",
                  *FINETUNE])
    with pytest.raises(ValueError, match=r"^--out input.pth would make it write "
                                         r"input_history.json, which is the file it reads as "
                                         r"--data \(input_history.json\)"):
        main(["--data", "input_history.json", "--out", "input.pth", *TINY_FLAGS])
    assert source.read_bytes() == before
    assert not (tmp_path / "train.txt").exists()            # refused before any work


# ---- --resume of exactly the run that was saved -----------------------------------------------

def test_a_lora_run_resumes_only_on_the_base_it_was_trained_on(tmp_path):
    base = _hf_tiny(tmp_path / "base")
    args = [*_data(tmp_path), *FINETUNE, "--lora-rank", "4", "--max-steps", "2"]
    main([*args, "--init-from", str(base)])
    out = tmp_path / "run.pth"
    saved = out.read_bytes()
    with pytest.raises(ValueError, match=(
            rf"^--resume: {out} is a LoRA run on {base}; resume it with --init-from {base} \(its "
            rf"frozen weights\) and --lora-rank 4 --lora-targets qkv,out_proj,fc,proj$")):
        main([*_data(tmp_path), *FINETUNE, "--resume", "--max-steps", "4"])
    other = _hf_tiny(tmp_path / "other", seed=4)
    with pytest.raises(ValueError, match=(
            rf"^--resume: the run at {out} started from {base}, not from --init-from {other}; "
            rf"resume with --init-from {base}, or train into a new --out without --resume$")):
        main([*args, "--init-from", str(other), "--resume", "--max-steps", "4"])
    _hf_tiny(base, seed=5)              # the same folder, re-saved with other weights
    with pytest.raises(ValueError, match=(
            rf"^cannot resume {out}: its LoRA adapters were trained on other base weights than "
            rf"{base} holds now \(the frozen weights' fingerprint differs")):
        main([*args, "--init-from", str(base), "--resume", "--max-steps", "4"])
    assert out.read_bytes() == saved


def test_a_full_finetune_resumes_from_its_checkpoint_alone(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    _hf_tiny(tmp_path / "hf_tiny")
    args = [*FINETUNE, "--max-steps", "4", "--checkpoint-every", "3", "--eval-freq", "2"]
    ref = main([*_data(tmp_path / "ref"), "--init-from", "hf_tiny", *args])
    # the save at step 4 kept the one at step 3 as run.pth.prev: resume from a copy of it
    prev = tmp_path / "ref" / "run.pth.prev"
    assert read_checkpoint(prev)["step"] == 3 and read_checkpoint(prev)["settings"][
        "init_from"] == str(tmp_path / "hf_tiny")
    shutil.move(tmp_path / "hf_tiny", tmp_path / "elsewhere")     # the source is gone
    for name, given in (("a", ["--init-from", "./hf_tiny"]), ("b", [])):
        (tmp_path / name).mkdir()
        shutil.copy(prev, tmp_path / name / "run.pth")
        capsys.readouterr()
        resumed = main(["--data", "ref/input.txt", "--out", f"{name}/run.pth", *given, *args,
                        "--resume"])
        out = capsys.readouterr().out
        assert f"Resumed from {name}/run.pth at step 3" in out
        assert f"Model: fine-tuned from {tmp_path / 'hf_tiny'} (all weights train)" in out
        assert resumed["step_loss"] == ref["step_loss"] and resumed["val_loss"] == ref["val_loss"]
    with pytest.raises(ValueError, match=r"--context-length 16 \(it has 32\); leave them out"):
        main(["--data", "ref/input.txt", "--out", "a/run.pth", *args, "--resume",
              "--context-length", "16"])


def test_resume_names_the_last_checkpoint_that_verifies(tmp_path, capsys):
    args = [*_data(tmp_path), *TINY_FLAGS, "--checkpoint-every", "1"]
    main([*args, "--max-steps", "2"])
    out, prev = tmp_path / "run.pth", tmp_path / "run.pth.prev"
    assert read_checkpoint(out)["step"] == 2 and read_checkpoint(prev)["step"] == 1
    good = out.read_bytes()
    last_good = (rf"the last checkpoint that verifies is {prev} \(step 1\): `mv {prev} {out}` "
                 rf"and --resume again, or start afresh without --resume$")
    _overwrite_weights(out)
    with pytest.raises(DamagedFileError, match=rf"^'{out}' is damaged: its part .*; {last_good}"):
        main([*args, "--max-steps", "3", "--resume"])
    out.write_bytes(good[:len(good) // 2])                          # a copy cut short
    with pytest.raises(DamagedFileError, match=rf"^'{out}' is truncated or is not a PyTorch "
                                               rf"checkpoint .*; {last_good}"):
        main([*args, "--max-steps", "3", "--resume"])
    # the optimizer state of step 2 with a NaN (the weights are fine): not a checkpoint to
    # resume, nor one to call the last good one
    ckpt = torch.load(io.BytesIO(good), weights_only=True)
    state = ckpt["optimizer_state_dict"]["state"]
    next(iter(state.values()))["exp_avg"].view(-1)[0] = float("nan")
    torch.save(ckpt, out)
    with pytest.raises(ValueError, match=(
            rf"^cannot resume {out}: there are NaN or infinite numbers in its optimizer state "
            rf"\(state\.[^)]*\.exp_avg\), so it is not a good checkpoint .*; {last_good}")):
        main([*args, "--max-steps", "3", "--resume"])
    os.replace(prev, out)               # what the message says to do
    capsys.readouterr()
    assert main([*args, "--max-steps", "3", "--resume"])["final_step"] == 3
    assert f"Resumed from {out} at step 1" in capsys.readouterr().out
    assert read_checkpoint(prev)["step"] == 2       # kept by the save at step 3...
    _overwrite_weights(prev)                        # ...and damaged too, like out
    _overwrite_weights(out)
    with pytest.raises(DamagedFileError, match=rf"; {prev}, the checkpoint before it, does not "
                                               rf"verify either: start afresh without --resume"):
        main([*args, "--max-steps", "4", "--resume"])


# ---- one run per --out ---------------------------------------------------------------------

def test_a_second_run_on_one_out_is_refused_and_the_first_ones_checkpoint_survives(tmp_path):
    args = [*_data(tmp_path, 60_000), *TINY_FLAGS, "--checkpoint-every", "2"]
    out, lock = tmp_path / "run.pth", tmp_path / "run.pth.lock"
    first = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *args,
                              "--max-steps", "400"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.time() + 240
    while not out.exists() and first.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert lock.read_text() == f"process {first.pid} on {HOST}\n"
    with pytest.raises(RunInProgressError, match=(
            rf"^another run \(process {first.pid} on {HOST}\) is writing {out} right now "
            rf"\({lock} is held\): wait for it to end or stop it, or choose another --out$")):
        main([*args, "--max-steps", "3"])
    first.send_signal(signal.SIGINT)
    _, err = first.communicate(timeout=60)
    assert first.returncode == 130, err
    step = read_checkpoint(out)["step"]
    assert f"{out} holds step {step}: continue from there with --resume" in err
    load_checkpoint(out)
    assert not lock.exists()                                # Ctrl-C let go of it


def test_a_lock_left_by_a_dead_run_is_taken_over_and_every_way_out_lets_go(tmp_path, capsys):
    args = [*_data(tmp_path), *TINY_FLAGS]
    lock = tmp_path / "run.pth.lock"
    # kill -9 while holding it: the file stays, the operating system's lock goes
    killed = subprocess.run([sys.executable, "-c", (
        "import os, signal, sys; sys.path.insert(0, sys.argv[1]); from engine.runs import "
        "run_lock; held = run_lock(sys.argv[2]); held.__enter__(); "
        "os.kill(os.getpid(), signal.SIGKILL)"),
        ROOT, str(tmp_path / "run.pth")], capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL
    holder = lock.read_text().strip()
    assert holder.startswith("process ") and holder.endswith(f" on {HOST}")
    main([*args, "--max-steps", "1"])
    assert (f"note: {lock} was left by {holder}, which is no longer running (killed?); taking "
            f"it over") in capsys.readouterr().out
    assert not lock.exists()                                # a normal end lets go
    lock.write_text(f"process {_dead_pid()} on {HOST}\n")
    with pytest.raises(ValueError, match="--batch-size 5000 needs at least 5000"):
        main([*args, "--max-steps", "1", "--batch-size", "5000"])
    assert not lock.exists()                                # so does an error


# ---- LoRA flags --------------------------------------------------------------------------------

def test_lora_flags_are_checked_against_the_matrices_they_adapt(tmp_path, hf_folder, capsys):
    def usage_error(*flags):
        with pytest.raises(SystemExit):
            parse_args(["--init-from", str(hf_folder), *flags])
        return capsys.readouterr().err.strip().splitlines()[-1]

    assert usage_error("--lora-rank", "4", "--lora-targets", "qkv,fc,qkv").endswith(
        "--lora-targets names qkv more than once; name each layer once (e.g. qkv,fc)")
    for flags in (["--lora-targets", "fc"], ["--lora-alpha", "8"]):
        assert usage_error(*flags).endswith(
            "--lora-targets and --lora-alpha go with --lora-rank R: without a rank there are "
            "no adapters, and every weight trains")
    model = GPTModel({**TINY_CFG, "n_heads": 2})                    # 32 wide: qkv is 32 x 96
    with pytest.raises(ValueError, match=r"name a layer more than once"):
        add_lora(model, 4, targets=["qkv", "qkv"])
    with pytest.raises(ValueError, match=r"^LoRA rank 33 is above 32, the smaller side of the "
                                         r"qkv matrices it adapts \(32 x 96\), so it would only "
                                         r"add weights; use at most 32"):
        add_lora(model, 33, targets=["qkv"])
    add_lora(model, 32)                                             # the limit itself is fine
    start = time.time()
    with pytest.raises(ValueError, match=r"^--lora-rank 100000000 is above 32, the smaller side"):
        main([*_data(tmp_path), *FINETUNE, "--init-from", str(hf_folder), "--lora-rank",
              "100000000"])
    assert time.time() - start < 60                                 # refused, not allocated


# ---- --init-from sources that do not fit ------------------------------------------------------

def test_a_bare_state_dict_takes_config_and_tf_only_a_size(tmp_path, hf_folder):
    cfg = {**TINY_CFG, "tie_embeddings": True}
    torch.save(GPTModel(cfg).state_dict(), tmp_path / "bare.pth")
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    run = [*_data(tmp_path), *FINETUNE]
    with pytest.raises(ValueError, match=r"is a bare state dict with no config; pass cfg=\.\.\. "
                                         r"in Python or --config NAME_OR_JSON on the command"):
        main([*run, "--init-from", str(tmp_path / "bare.pth")])
    main([*run, "--init-from", str(tmp_path / "bare.pth"), "--config",
          str(tmp_path / "cfg.json"), "--max-steps", "1"])          # the flag it names exists
    assert read_checkpoint(tmp_path / "run.pth")["config"] == {**cfg, "context_length": 32}
    with pytest.raises(ValueError, match=(
            r"^--init-from-tf \(openai_tf=True\) takes one of OpenAI's sizes \['124M', '355M', "
            r"'774M', '1558M'\], not '.*tiny-gpt2': a \.pth, a folder or a Hub id loads as it is")):
        main([*run, "--init-from", str(hf_folder), "--init-from-tf"])


def test_init_from_tf_offline_is_one_line_and_leaves_no_empty_folder(tmp_path):
    (tmp_path / "input.txt").write_text(default_corpus_text()[:20_000])
    # this machine's network as seen offline: every request fails at once, no waiting
    offline = ("import requests, runpy, sys, time; sys.path.insert(0, sys.argv[1]); "
               "time.sleep = lambda s: None\n"
               "def get(*a, **k): raise requests.ConnectionError('Failed to resolve host')\n"
               "requests.get = get; sys.argv = ['train.py', *sys.argv[2:]]; "
               "runpy.run_path(sys.argv[0], run_name='__main__')")
    shutil.copy(os.path.join(ROOT, "train.py"), tmp_path / "train.py")
    done = subprocess.run([sys.executable, "-c", offline, ROOT, "--data", "input.txt", "--out",
                           "run.pth", "--init-from", "124M", "--init-from-tf", *FINETUNE],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: downloading ") and "/124M/checkpoint" in last
    assert not (tmp_path / "model_weights").exists()


# ---- generate.py's command line ---------------------------------------------------------------

@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_generate_on_cuda_without_cuda_is_one_line(tmp_path, capsys):
    path = save_checkpoint(tmp_path / "m.pth", GPTModel(TINY_CFG))
    assert _cli_error(generate.main, ["--weights", str(path), "--device", "cuda"], capsys) == (
        "error: device 'cuda' was asked for, but this PyTorch sees no CUDA GPU; use --device "
        "cpu or install a CUDA build of torch")


def test_ctrl_c_in_generate_is_one_line_and_exit_130(tmp_path):
    path = save_checkpoint(tmp_path / "m.pth", GPTModel(TINY_CFG))
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "generate.py"), "--weights",
                             str(path), "--device", "cpu", "--max-new-tokens", "1000000"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.stdout.read(len("Every effort moves you")) == "Every effort moves you"
    time.sleep(0.5)                                         # well into the generation
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert err.strip() == "interrupted"
