"""torchrun on CPU with the gloo backend: 2 processes must train exactly like 1 with twice
the batch, checkpoints must move between modes and world sizes, and only rank 0 writes."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from dataset import default_corpus_text
from model import GPTModel, load_checkpoint, read_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = ["--emb-dim", "32", "--n-layers", "2", "--n-heads", "2", "--context-length", "32",
         "--eval-iter", "2", "--eval-freq", "4", "--no-progress", "--device", "cpu",
         "--dtype", "fp32", "--drop-rate", "0", "--start-context", "The",
         "--checkpoint-every", "4", "--warmup-steps", "2", "--learning-rate", "3e-3"]

# Runs train.py under an audit hook that records every file a non-zero rank opens for
# writing inside the test folder (torch.save, tempfile, open(..., "w") all pass here).
LAUNCHER = r'''
import os, runpy, sys
rank, watch, report = os.environ["RANK"], sys.argv[1], sys.argv[2]
written = []
def hook(event, args):
    if event != "open" or rank == "0" or not isinstance(args[0], str):
        return
    path, mode, flags = args
    writing = (any(c in mode for c in "wax+") if isinstance(mode, str)
               else bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)))
    if writing and os.path.abspath(path).startswith(watch):
        written.append(path)
sys.addaudithook(hook)
sys.argv = sys.argv[3:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
finally:
    if rank != "0":
        with open(report + rank, "w") as f:        # outside the watched folder
            f.write("\n".join(written))
'''


def _descendants(pid):
    """Child processes, grandchildren, ... (torchrun starts its workers in new sessions,
    so killing its process group would miss them)."""
    found = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            for child in map(int, f.read().split()):
                found += [child] + _descendants(child)
    return found


def _env():
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
            "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _torchrun(nproc, *args):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={nproc}", *args]


def _train_args(folder, *extra):
    return ["--data", str(folder / "input.txt"), "--out", str(folder / "run.pth"), *FLAGS,
            *extra]


def _run(cmd, timeout=240):
    done = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def _history(folder):
    return json.loads((folder / "run_history.json").read_text())


def _folder(tmp_path_factory, name):
    folder = tmp_path_factory.mktemp(name)
    (folder / "input.txt").write_text(default_corpus_text()[:40_000])
    return folder


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """One process, batch 4: the reference."""
    folder = _folder(tmp_path_factory, "single")
    _run([sys.executable, os.path.join(ROOT, "train.py"),
          *_train_args(folder, "--batch-size", "4", "--max-steps", "8")])
    return folder


def test_ddp_two_processes_match_one_with_double_batch(single, tmp_path_factory):
    folder = _folder(tmp_path_factory, "ddp")
    report = str(tmp_path_factory.mktemp("audit") / "rank")
    launcher = folder.parent / "launch.py"
    launcher.write_text(LAUNCHER)
    out = _run(_torchrun(2, str(launcher), str(folder), report, os.path.join(ROOT, "train.py"),
                         *_train_args(folder, "--batch-size", "2", "--max-steps", "8")))
    assert "2 (batch_size) x 1 (grad_accum_steps) x 2 (processes) = 4 sequences" in out
    assert out.count("final:") == 1                      # rank 1 prints nothing
    ref, got = _history(single), _history(folder)
    assert len(got["step_loss"]) == 8
    for key in ("step_loss", "train_loss", "val_loss"):
        torch.testing.assert_close(torch.tensor(got[key]), torch.tensor(ref[key]), atol=1e-5,
                                   rtol=0, msg=key)
    assert got["tokens_seen"] == ref["tokens_seen"]
    # Only one writer: rank 1 opened nothing for writing in the run's folder.
    assert open(report + "1").read() == ""


def test_fsdp_matches_and_its_checkpoint_loads_into_a_plain_model(single, tmp_path_factory):
    folder = _folder(tmp_path_factory, "fsdp")
    _run(_torchrun(2, os.path.join(ROOT, "train.py"),
                   *_train_args(folder, "--batch-size", "2", "--max-steps", "8",
                                "--parallel", "fsdp")))
    ref, got = _history(single), _history(folder)
    for key in ("step_loss", "train_loss", "val_loss"):
        torch.testing.assert_close(torch.tensor(got[key]), torch.tensor(ref[key]), atol=1e-5,
                                   rtol=0, msg=key)
    plain = load_checkpoint(folder / "run.pth")
    assert type(plain) is GPTModel
    idx = torch.randint(0, 50257, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(plain(idx), load_checkpoint(single / "run.pth")(idx),
                                   atol=1e-4, rtol=1e-4)
    # The same checkpoint resumes in a single process (another world size) and goes on.
    out = _run([sys.executable, os.path.join(ROOT, "train.py"),
                *_train_args(folder, "--batch-size", "4", "--max-steps", "10", "--resume")])
    assert "Resumed from" in out and "final: step=10 " in out


def test_kill_both_ranks_then_resume_reaches_the_same_loss(tmp_path_factory):
    ref = _folder(tmp_path_factory, "ref")
    # Enough steps that the kill lands mid-run; a checkpoint every 4 steps.
    args = ("--batch-size", "2", "--max-steps", "100", "--eval-freq", "50")
    ref_out = _run(_torchrun(2, os.path.join(ROOT, "train.py"), *_train_args(ref, *args)))

    folder = _folder(tmp_path_factory, "killed")
    proc = subprocess.Popen(_torchrun(2, os.path.join(ROOT, "train.py"),
                                      *_train_args(folder, *args)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env())
    deadline = time.time() + 180
    while not (folder / "run.pth").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    for pid in _descendants(proc.pid) + [proc.pid]:    # both ranks, then torchrun
        os.kill(pid, signal.SIGKILL)
    out, _ = proc.communicate()
    assert "final:" not in out, "the run finished before it could be killed"
    killed_at = read_checkpoint(folder / "run.pth")["step"]
    assert 4 <= killed_at < 100

    resumed = _run(_torchrun(2, os.path.join(ROOT, "train.py"),
                             *_train_args(folder, *args, "--resume")))
    assert f"at step {killed_at}" in resumed
    final = [line for line in resumed.splitlines() if line.startswith("final:")]
    assert final == [line for line in ref_out.splitlines() if line.startswith("final:")]
    assert _history(folder)["step_loss"] == _history(ref)["step_loss"]


@pytest.mark.parametrize("extra, match", [
    (("--parallel", "fsdp"), "needs one process per device, started by torchrun"),
])
def test_parallel_without_torchrun_is_a_clear_error(tmp_path, extra, match):
    from train import main

    (tmp_path / "input.txt").write_text(default_corpus_text()[:20_000])
    with pytest.raises(ValueError, match=match):
        main(_train_args(tmp_path, *extra))


@pytest.mark.parametrize("extra, match", [
    (("--backend", "nccl"), "backend 'nccl' needs CUDA GPUs but the device is cpu"),
    (("--parallel", "fsdp", "--compile"), "--compile is not supported with --parallel fsdp"),
    (("--batch-size", "100"), "2 processes x --batch-size 100 need at least 200 training windows"),
])
def test_bad_launches_are_clear_errors(tmp_path, extra, match):
    (tmp_path / "input.txt").write_text(default_corpus_text()[:20_000])
    done = subprocess.run(_torchrun(2, os.path.join(ROOT, "train.py"),
                                    *_train_args(tmp_path, *extra)),
                          capture_output=True, text=True, env=_env(), timeout=120)
    assert done.returncode != 0
    assert match in done.stderr
    assert not (tmp_path / "run.pth").exists()
