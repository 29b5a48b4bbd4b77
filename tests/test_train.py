import json
import math
import os
import re
import signal
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import default_collate

import train_utils
from conftest import TINY_FLAGS, signal_at_first_save
from dataset import create_dataloader, default_corpus_text, get_tokenizer
from model import GPTModel, load_checkpoint, read_checkpoint
from train import main, parse_args
from train_utils import (
    accumulate_gradients,
    calc_loss_loader,
    epoch_batches,
    evaluate_model,
    get_device,
    lr_at,
    make_optimizer,
    train_model,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def corpus_tokens():
    return get_tokenizer().encode(default_corpus_text()[:40_000])


def tiny_model(seed=0, drop=0.0):
    torch.manual_seed(seed)
    return GPTModel({"vocab_size": 50257, "context_length": 32, "emb_dim": 32, "n_heads": 2,
                     "n_layers": 2, "drop_rate": drop, "qkv_bias": False})


def test_loss_falls_on_a_tiny_corpus(corpus_tokens):
    train = create_dataloader(corpus_tokens[:4000], batch_size=8, max_length=32, stride=32)
    val = create_dataloader(corpus_tokens[8000:9000], batch_size=8, max_length=32, stride=32,
                            shuffle=False, drop_last=False)
    model = tiny_model()
    history = train_model(model, train, val, device="cpu", num_epochs=2, eval_freq=5,
                          eval_iter=3, learning_rate=5e-3, warmup_steps=3, progress=False)
    assert history["step"][-1] == history["final_step"] == 2 * (125 // 8)
    assert history["train_loss"][0] > history["train_loss"][-1] + 1.0
    assert history["val_loss"][0] > history["val_loss"][-1] + 0.5
    assert history["tokens_seen"][-1] == history["final_step"] * 8 * 32


def test_grad_accumulation_equals_one_big_batch(corpus_tokens):
    ds = create_dataloader(corpus_tokens[:2000], batch_size=1, max_length=32, stride=32).dataset
    samples = [ds[i] for i in range(5)]
    big = default_collate(samples)
    a, b = tiny_model(), tiny_model()
    loss_a, n_a = accumulate_gradients(a, [big], torch.device("cpu"))
    # 4 x 1 plus a short 1-sample group split unevenly (2 + 1 + 1 + 1): still exact
    micro = [default_collate(samples[:2])] + [default_collate([s]) for s in samples[2:]]
    loss_b, n_b = accumulate_gradients(b, micro, torch.device("cpu"))
    assert n_a == n_b == 5 * 32
    assert loss_a == pytest.approx(loss_b, rel=1e-6)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, atol=1e-6, rtol=1e-5, msg=name)


def test_epoch_batches_are_seeded_and_disjoint_across_ranks():
    one = epoch_batches(10, 2, True, True, seed=1, epoch=0)
    assert one == epoch_batches(10, 2, True, True, seed=1, epoch=0)
    assert one != epoch_batches(10, 2, True, True, seed=1, epoch=1)
    assert sorted(i for b in one for i in b) == list(range(10))
    r0 = epoch_batches(10, 2, True, False, 1, 0, rank=0, world_size=2)
    r1 = epoch_batches(10, 2, True, False, 1, 0, rank=1, world_size=2)
    assert sorted(i for b in r0 + r1 for i in b) == list(range(10))
    assert epoch_batches(7, 3, False, False, 0, 0) == [[0, 1, 2], [3, 4, 5], [6]]


def test_lr_schedule_warms_up_then_decays():
    lrs = [lr_at(s, 1.0, 100, warmup_steps=10, min_lr_ratio=0.1) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(x > y for x, y in zip(lrs[10:], lrs[11:]))
    assert lrs[-1] == pytest.approx(0.1, abs=1e-3)


def test_no_weight_decay_on_biases_norms_embeddings():
    model = tiny_model()
    decay, no_decay = make_optimizer(model, weight_decay=0.1).param_groups
    decayed = {id(p) for p in decay["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in decayed}
    assert names and all(n.endswith("weight") and "norm" not in n and "emb" not in n
                         for n in names)
    assert "out_head.weight" in names and no_decay["weight_decay"] == 0.0
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_get_device():
    assert get_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="sees no CUDA GPU; use --device cpu"):
            get_device("cuda")
    for bad in ("tpu", "xla"):
        with pytest.raises(ValueError, match=f"unknown device '{bad}'; choose cuda, mps or cpu"):
            get_device(bad)


def test_nan_loss_stops_and_keeps_last_checkpoint(tmp_path, corpus_tokens, monkeypatch):
    train = create_dataloader(corpus_tokens[:4000], batch_size=4, max_length=32, stride=32)
    ckpt = tmp_path / "run.pth"
    real = train_utils.calc_loss_batch
    calls = {"n": 0}

    def poisoned(*args):
        # count training steps' losses only: before each save one batch is scored in eval
        # mode to check the weights about to be written
        calls["n"] += args[2].training
        loss = real(*args)
        return loss * float("nan") if calls["n"] == 7 and args[2].training else loss

    monkeypatch.setattr(train_utils, "calc_loss_batch", poisoned)
    with pytest.raises(FloatingPointError, match=f"loss became nan at optimizer step 6; .*"
                                                 f"last good checkpoint is {ckpt}"):
        train_model(tiny_model(), train, train, device="cpu", num_epochs=1, eval_freq=100,
                    checkpoint_path=ckpt, checkpoint_every=3, progress=False)
    assert read_checkpoint(ckpt)["step"] == 6
    load_checkpoint(ckpt)


def _final_line(out):
    return [line for line in out.splitlines() if line.startswith("final:")][-1]


@pytest.mark.device
def test_train_py_end_to_end(tmp_path, capsys):
    data = tmp_path / "input.txt"
    data.write_text(default_corpus_text()[:30_000])
    out = tmp_path / "w" / "m.pth"
    history = main(["--data", str(data), "--out", str(out), "--max-steps", "6",
                    "--eval-freq", "3", *TINY_FLAGS])
    printed = capsys.readouterr().out
    final = _final_line(printed)
    assert final == (f"final: step=6 train_loss={history['final_train_loss']:.4f} "
                     f"val_loss={history['final_val_loss']:.4f}")
    saved = json.loads((tmp_path / "w" / "m_history.json").read_text())
    assert saved["step"] == [3, 6] and len(saved["tokens_seen"]) == 2
    assert (tmp_path / "w" / "m_loss.png").read_bytes()[:4] == b"\x89PNG"
    assert {p.name for p in tmp_path.iterdir()} >= {"train.txt", "valid.txt", "test.txt"}
    model = load_checkpoint(out)
    assert model.cfg["emb_dim"] == 32 and "(train.py's small preset" in printed


@pytest.mark.parametrize("content, error, match", [
    (None, FileNotFoundError, "no text file at .*Put a UTF-8 .txt file there"),
    (b"", ValueError, "is empty"),
    (b"a\n" * 15, ValueError, "need at least max_length\\+1=33. Add text or lower"),
    (b"a\n" * 25, ValueError, "--batch-size 4 needs at least 4 training windows.*lower "
                             "--batch-size or --stride"),
    (b"tiny text\nonly\n", ValueError, "too short to split.*Add more text"),
    (b"caf\xe9 au lait\n" * 200, ValueError, "not UTF-8"),
])
def test_train_py_bad_input(tmp_path, content, error, match):
    data = tmp_path / "input.txt"
    if content is not None:
        data.write_bytes(content)
    with pytest.raises(error, match=match):
        main(["--data", str(data), "--out", str(tmp_path / "m.pth"), *TINY_FLAGS])


def test_bad_config_flag_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="'emb_dim' \\(31\\) must be divisible by 'n_heads'"):
        main(["--data", str(tmp_path / "x.txt"), *TINY_FLAGS, "--emb-dim", "31"])


def _train_cmd(tmp_path, *extra):
    return [sys.executable, os.path.join(ROOT, "train.py"), "--data", str(tmp_path / "input.txt"),
            "--out", str(tmp_path / "run.pth"), "--max-steps", "80", "--eval-freq", "20",
            "--checkpoint-every", "5", "--drop-rate", "0.1", *TINY_FLAGS, *extra]


@pytest.mark.device
def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path):
    (tmp_path / "input.txt").write_text(default_corpus_text()[:60_000])
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # The uninterrupted reference run, in its own folder with the same data.
    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    (ref_dir / "input.txt").write_text(default_corpus_text()[:60_000])
    ref = subprocess.run(_train_cmd(ref_dir), capture_output=True, text=True, env=env,
                         timeout=300)
    assert ref.returncode == 0, ref.stderr

    # Kill -9 as soon as the first periodic checkpoint exists (mid-run, maybe mid-write).
    code, out, _ = signal_at_first_save(_train_cmd(tmp_path), tmp_path / "run.pth",
                                        signal.SIGKILL)
    assert code == -signal.SIGKILL, "the run finished before it could be killed"
    killed_at = read_checkpoint(tmp_path / "run.pth")["step"]
    assert 5 <= killed_at < 80 and "final:" not in out

    resumed = subprocess.run(_train_cmd(tmp_path, "--resume"), capture_output=True, text=True,
                             env=env, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"Resumed from {tmp_path / 'run.pth'} at step {killed_at}" in resumed.stdout
    assert _final_line(resumed.stdout) == _final_line(ref.stdout)
    ref_hist = json.loads((ref_dir / "run_history.json").read_text())
    hist = json.loads((tmp_path / "run_history.json").read_text())
    assert hist["val_loss"] == ref_hist["val_loss"] and hist["step"] == ref_hist["step"]
    assert math.isfinite(hist["final_val_loss"])


def _loader(tokens, batch_size=4, shuffle=True, drop_last=True):
    return create_dataloader(tokens, batch_size=batch_size, max_length=32, stride=32,
                             shuffle=shuffle, drop_last=drop_last)


@pytest.mark.parametrize("flags, message", [
    (["--num-epochs", "0"], "--num-epochs must be >= 1, got 0"),
    (["--num-epochs", "-3"], "--num-epochs must be >= 1, got -3"),
    (["--max-steps", "0"], "--max-steps must be >= 1, got 0"),
    (["--stride", "0"], "--stride must be >= 1, got 0"),
    (["--grad-accum-steps", "0"], "--grad-accum-steps must be >= 1, got 0"),
    (["--warmup-steps", "-1"], "--warmup-steps must be >= 0, got -1"),
    (["--checkpoint-every", "-5"], "--checkpoint-every must be >= 0, got -5"),
    (["--grad-clip", "-1"], "--grad-clip must be >= 0, got -1.0 \\(0 = no clipping"),
])
def test_out_of_range_flags_are_usage_errors(flags, message, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args([*TINY_FLAGS, *flags])
    assert exc.value.code == 2
    assert re.search(message, capsys.readouterr().err)


def test_zero_means_zero_not_unset_and_limits_are_allowed():
    args = parse_args(["--max-steps", "1", "--stride", "1", "--warmup-steps", "0",
                       "--checkpoint-every", "0", "--grad-clip", "0"])
    assert (args.max_steps, args.stride, args.warmup_steps, args.checkpoint_every,
            args.grad_clip) == (1, 1, 0, 0, 0.0)


def test_preset_124M_keeps_flags_given_in_any_spelling():
    args = parse_args(["--preset", "124M", "--context", "64", "--drop-rate=0.0"])
    assert args.context_length == 64 and args.drop_rate == 0.0     # given: kept
    assert args.emb_dim == 768 and args.n_layers == 12              # not given: the preset's
    assert parse_args(["--context", "64"]).context_length == 64


@pytest.mark.parametrize("kwargs, message", [
    ({"num_epochs": 0}, "num_epochs and max_steps \\(when given\\) must be >= 1, got 0, 2"),
    ({"num_epochs": -3}, "must be >= 1, got -3, 2"),
    ({"max_steps": 0}, "must be >= 1, got 1, 0"),
    ({"grad_clip": -1.0}, "grad_clip must be >= 0 \\(0 or None = no clipping\\), got -1.0"),
    ({"warmup_steps": -1}, "warmup_steps and checkpoint_every must be >= 0, got -1, 1"),
    ({"checkpoint_every": -1}, "warmup_steps and checkpoint_every must be >= 0, got 0, -1"),
])
def test_train_model_rejects_out_of_range_arguments(tmp_path, corpus_tokens, kwargs, message):
    ckpt = tmp_path / "run.pth"
    ckpt.write_bytes(b"a trained model")
    train = _loader(corpus_tokens[:2000])
    kwargs = {"max_steps": 2, "checkpoint_every": 1, **kwargs}
    with pytest.raises(ValueError, match=message):
        train_model(tiny_model(), train, train, device="cpu", checkpoint_path=ckpt,
                    progress=False, **kwargs)
    assert ckpt.read_bytes() == b"a trained model"      # nothing trained, nothing overwritten


def test_evaluation_draws_no_global_randomness(corpus_tokens):
    train, val = _loader(corpus_tokens[:2000]), _loader(corpus_tokens[2000:3000], shuffle=False,
                                                        drop_last=False)
    model = tiny_model(drop=0.1)
    before = torch.get_rng_state()
    evaluate_model(model, train, val, torch.device("cpu"), eval_iter=2)
    assert torch.equal(torch.get_rng_state(), before)


def test_eval_freq_does_not_change_training_with_dropout(corpus_tokens):
    train, val = _loader(corpus_tokens[:2000]), _loader(corpus_tokens[2000:3000], shuffle=False,
                                                        drop_last=False)
    runs = [train_model(tiny_model(drop=0.1), train, val, device="cpu", max_steps=4,
                        eval_freq=freq, eval_iter=1, progress=False)["step_loss"]
            for freq in (1, 100)]
    assert runs[0] == runs[1]


def test_loader_loss_is_the_mean_over_all_target_tokens(corpus_tokens):
    loader = _loader(corpus_tokens[:5 * 32 + 1], shuffle=False, drop_last=False)  # 4 + 1
    assert [len(x) for x, _ in loader] == [4, 1]
    model = tiny_model().eval()
    inputs = torch.stack([x for x, _ in loader.dataset])
    targets = torch.stack([y for _, y in loader.dataset])
    with torch.no_grad():
        logits = model(inputs)
        per_token = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
        got = calc_loss_loader(loader, model, "cpu")
        first = calc_loss_loader(loader, model, "cpu", num_batches=1)
    assert got == pytest.approx(per_token.mean().item(), rel=1e-6)
    assert first == pytest.approx(per_token[:4 * 32].mean().item(), rel=1e-6)
    # ... which is not the mean of the two batch means (the 1-window batch would count 4x).
    batch_means = (per_token[:4 * 32].mean() + per_token[4 * 32:].mean()) / 2
    assert abs(got - batch_means.item()) > 1e-4


def _train_tiny(tokens, ckpt, batch_size=4, resume=False, **kwargs):
    kwargs = {"max_steps": 2, "warmup_steps": 1, **kwargs}
    return train_model(tiny_model(), _loader(tokens, batch_size), _loader(tokens, 4), device="cpu",
                       eval_freq=100, eval_iter=1, checkpoint_path=ckpt, resume=resume,
                       progress=False, **kwargs)


@pytest.mark.parametrize("changed, message", [
    ({"seed": 7}, "seed: saved 123, now 7"),
    ({"learning_rate": 1e-3, "warmup_steps": 2},
     "learning_rate: saved 0.0004, now 0.001; warmup_steps: saved 1, now 2"),
    ({"weight_decay": 0.0, "min_lr_ratio": 0.5},
     "min_lr_ratio: saved 0.1, now 0.5; weight_decay: saved 0.1, now 0.0"),
    ({"grad_accum_steps": 2}, "global batch \\(batch_size x grad_accum_steps x processes\\): "
                              "saved 4 x 1 x 1 = 4, now 4 x 2 x 1 = 8"),
    ({"batch_size": 8}, "saved 4 x 1 x 1 = 4, now 8 x 1 x 1 = 8"),
])
def test_resume_rejects_changed_training_settings(tmp_path, corpus_tokens, changed, message):
    ckpt = tmp_path / "run.pth"
    _train_tiny(corpus_tokens[:2000], ckpt)
    saved = ckpt.read_bytes()
    with pytest.raises(ValueError, match=f"cannot resume {ckpt}: .*{message}.*"
                                         f"Resume with the saved values, or train into a new "
                                         f"--out without --resume"):
        _train_tiny(corpus_tokens[:2000], ckpt, resume=True, max_steps=4, **changed)
    assert ckpt.read_bytes() == saved


def test_resume_config_mismatch_names_the_keys(tmp_path, corpus_tokens):
    ckpt = tmp_path / "run.pth"
    _train_tiny(corpus_tokens[:2000], ckpt)
    model = GPTModel({**tiny_model().cfg, "n_layers": 3})
    with pytest.raises(ValueError) as exc:
        train_model(model, _loader(corpus_tokens[:2000]), _loader(corpus_tokens[:2000]),
                    device="cpu", checkpoint_path=ckpt, resume=True, progress=False)
    assert "another model config: n_layers: saved 2, now 3. Resume with" in str(exc.value)
    assert "vocab_size" not in str(exc.value)


def test_resume_with_another_split_of_the_global_batch_continues_in_place(tmp_path,
                                                                          corpus_tokens):
    """Saved at batch 4 x 2 micro-batches, resumed as 8 x 1: the same windows per step,
    the same place in the epoch (not the epoch's first batches again)."""
    tokens = corpus_tokens[:4000]
    first, second = tmp_path / "a.pth", tmp_path / "b.pth"
    _train_tiny(tokens, first, grad_accum_steps=2, max_steps=3)
    second.write_bytes(first.read_bytes())
    same = _train_tiny(tokens, first, grad_accum_steps=2, resume=True, max_steps=6)
    other = _train_tiny(tokens, second, batch_size=8, resume=True, max_steps=6)
    torch.testing.assert_close(torch.tensor(other["step_loss"]), torch.tensor(same["step_loss"]),
                               atol=1e-5, rtol=0)
    assert other["tokens_seen"] == same["tokens_seen"]


def test_train_py_resume_extends_a_run_and_rejects_a_new_seed(tmp_path, capsys):
    data = tmp_path / "input.txt"
    data.write_text(default_corpus_text()[:30_000])
    run = ["--data", str(data), "--out", str(tmp_path / "m.pth"), "--eval-freq", "100",
           "--checkpoint-every", "0", *TINY_FLAGS]
    main([*run, "--max-steps", "20"])            # default warmup: 5% of 20 steps = 1
    # More steps would make the default warmup 2; on resume it stays the saved run's.
    assert main([*run, "--max-steps", "40", "--resume"])["final_step"] == 40
    assert read_checkpoint(tmp_path / "m.pth")["settings"]["warmup_steps"] == 1
    with pytest.raises(ValueError, match="seed: saved 123, now 9"):
        main([*run, "--max-steps", "60", "--resume", "--seed", "9"])


def test_resuming_a_finished_run_says_so(tmp_path, corpus_tokens, capsys):
    ckpt = tmp_path / "run.pth"
    first = _train_tiny(corpus_tokens, ckpt)
    capsys.readouterr()
    again = _train_tiny(corpus_tokens, ckpt, resume=True)
    assert (f"{ckpt} is a finished run (step 2 of 2): nothing left to train"
            in capsys.readouterr().out)
    assert again["final_step"] == first["final_step"] == 2


def test_train_py_command_line_errors_are_one_line(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--data",
                           str(tmp_path / "missing.txt"), "--out", str(tmp_path / "m.pth")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: no text file at") and "Traceback" not in proc.stderr


def test_loss_plot_can_show_every_step(tmp_path):
    from train_utils import plot_losses
    args = ([0.5, 1.0], [1024, 2048], [6.0, 5.0], [6.2, 5.4])
    with pytest.raises(ValueError, match="step_losses needs tokens_per_step"):
        plot_losses(*args, tmp_path / "a.png", step_losses=[10.8, 9.0, 7.0, 5.0])
    plain = plot_losses(*args, tmp_path / "plain.png").read_bytes()
    steps = plot_losses(*args, tmp_path / "steps.png", step_losses=[10.8, 9.0, 7.0, 5.0],
                        tokens_per_step=512).read_bytes()
    assert plain[:4] == steps[:4] == b"\x89PNG" and plain != steps


@pytest.mark.parametrize("flags, want", [
    ("fpu avx2 avx512f avx512_bf16 amx_bf16", ("bf16", "auto: AMX")),
    ("fpu avx2 avx512f avx512_bf16", ("bf16", "auto: AVX512-BF16")),
    ("fpu avx2 avx512f", ("fp32", "auto: no native bf16 here")),
    ("", ("fp32", "auto: no native bf16 here")),
    # the flags, but oneDNN held back to AVX2 (ONEDNN_MAX_CPU_ISA): bf16 would be emulated
    ("fpu avx2 avx512f avx512_bf16 amx_bf16 (oneDNN without bf16)",
     ("fp32", "auto: no native bf16 here"))])
def test_dtype_auto_trains_in_bf16_where_bf16_is_native(monkeypatch, flags, want):
    from engine import devices
    monkeypatch.setattr(devices, "cpu_info", lambda key: flags if key == "flags" else "")
    monkeypatch.setattr(devices, "onednn_bf16", lambda: "oneDNN without bf16" not in flags)
    cpu = torch.device("cpu")
    assert devices.training_precision(cpu) == want
    assert devices.training_precision(cpu, "fp32") == ("fp32", "as asked")
    with devices.autocast(cpu, "auto"):
        assert torch.is_autocast_enabled("cpu") == (want[0] == "bf16")
    with pytest.raises(ValueError, match="dtype must be 'fp32', 'bf16' or 'auto', got 'fp16'"):
        devices.training_precision(cpu, "fp16")
