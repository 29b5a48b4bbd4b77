"""train.py on instruction records: the loop counts only the answers, batches of whole records
resume exactly, the split and the flags behave as for text."""

import json

import pytest
import torch

from conftest import TINY_FLAGS
from dataset import create_instruction_dataloader, pad_batch
from model import GPTModel, read_checkpoint
from train import main
from train_utils import accumulate_gradients, calc_loss_batch, calc_loss_loader

RECORDS = [{"instruction": f"Reverse: {' '.join(w)}", "output": " ".join(reversed(w))}
           for w in ("abc", "bca", "cab", "acb", "bac", "cba", "aab", "abb", "bba", "cca",
                     "acca", "bbca", "ab", "ca", "abcab", "ccb", "bab", "aca", "cbc", "bcb")]


def write_records(tmp_path, records=RECORDS, name="tasks.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return GPTModel({"vocab_size": 50257, "context_length": 64, "emb_dim": 32, "n_heads": 2,
                     "n_layers": 2, "drop_rate": 0.0, "qkv_bias": True})


def test_a_step_over_padded_records_equals_one_batch_of_them_all():
    # Records score different numbers of tokens: micro-batches weighted by scored tokens
    # give the gradient of one batch holding every record (padding and prompts weigh nothing)
    loader = create_instruction_dataloader(RECORDS[:6], batch_size=6, max_length=64,
                                           shuffle=False)
    samples = [loader.dataset[i] for i in range(6)]
    a, b = tiny_model(), tiny_model()
    loss_a, n_a = accumulate_gradients(a, [pad_batch(samples)], torch.device("cpu"))
    micro = [pad_batch(samples[:1]), pad_batch(samples[1:4]), pad_batch(samples[4:])]
    loss_b, n_b = accumulate_gradients(b, micro, torch.device("cpu"))
    assert n_a == n_b == sum(int((y != -100).sum()) for _, y in samples)
    assert loss_a == pytest.approx(loss_b, rel=1e-5)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, atol=1e-6, rtol=1e-4, msg=name)


def test_the_loader_loss_is_the_mean_over_answer_tokens_only():
    model = tiny_model().eval()
    loader = create_instruction_dataloader(RECORDS[:5], batch_size=2, max_length=64,
                                           shuffle=False)
    total = count = 0
    with torch.no_grad():
        for x, y in loader:
            n = int((y != -100).sum())
            total += calc_loss_batch(x, y, model, "cpu").item() * n
            count += n
        assert calc_loss_loader(loader, model, "cpu") == pytest.approx(total / count)


def test_train_py_tunes_on_records_and_resumes_exactly(tmp_path, capsys):
    data = write_records(tmp_path)
    flags = ["--data", str(data), "--valid-fraction", "0.2", "--eval-freq", "2",
             "--group-by-length", "--max-steps", "6", "--checkpoint-every", "3", *TINY_FLAGS]
    whole = main([*flags, "--out", str(tmp_path / "run.pth")])
    out = capsys.readouterr().out
    assert "16 training records, 4 held out for validation" in out
    ckpt = read_checkpoint(tmp_path / "run.pth")
    assert ckpt["settings"]["valid_fraction"] == 0.2 and ckpt["settings"]["group_by_length"]
    # the step-3 checkpoint (kept as run.pth.prev) resumed ends exactly as the whole run
    (tmp_path / "cut.pth").write_bytes((tmp_path / "run.pth.prev").read_bytes())
    assert read_checkpoint(tmp_path / "cut.pth")["step"] == 3
    resumed = main([*flags, "--out", str(tmp_path / "cut.pth"), "--resume"])
    assert resumed["step_loss"] == whole["step_loss"]
    assert resumed["val_loss"] == whole["val_loss"]
    with pytest.raises(ValueError, match="valid_fraction: saved 0.2, now 0.3"):
        main([*[a if a != "0.2" else "0.3" for a in flags], "--out", str(tmp_path / "cut.pth"),
              "--resume"])


def test_records_flags_and_errors(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--data", str(tmp_path / "input.txt"), "--group-by-length", *TINY_FLAGS])
    assert "go with instruction records" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "x", "output": "y"}\n{"prompt": "x"}\n')
    with pytest.raises(ValueError, match="line 2"):
        main(["--data", str(bad), "--out", str(tmp_path / "m.pth"), *TINY_FLAGS])
    few = write_records(tmp_path, RECORDS[:3], "few.jsonl")
    with pytest.raises(ValueError, match="training records"):
        main(["--data", str(few), "--out", str(tmp_path / "m.pth"), *TINY_FLAGS])
