"""What a training run records as it goes: a benchmark score at every evaluation
(--eval-task), every step's health in <out>_metrics.jsonl, the same numbers in TensorBoard,
and all of it continued, not duplicated, by --resume."""

import json

import pytest

import evaluate
from conftest import TINY_FLAGS
from dataset import default_corpus_text
from model import load_checkpoint, read_checkpoint
from test_evaluate import hellaswag_records, write_jsonl
from train import main

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture
def run_flags(tmp_path):
    data = tmp_path / "input.txt"
    data.write_text(default_corpus_text()[:30_000])
    hs = write_jsonl(tmp_path / "hs.jsonl", hellaswag_records(6, seed=3))
    return ["--data", str(data), "--eval-freq", "3", "--eval-task", "hellaswag:5",
            "--eval-data", str(hs), "--max-steps", "6", *TINY_FLAGS]


def read_lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_the_eval_task_is_scored_logged_and_kept(tmp_path, run_flags, capsys):
    out = tmp_path / "run.pth"
    history = main([*run_flags, "--out", str(out), "--tensorboard", str(tmp_path / "tb")])
    printed = capsys.readouterr().out
    scores = history["task_scores"]
    assert [s["step"] for s in scores] == history["step"] == [3, 6]
    # the score at the end is what evaluate.py's scorer gives the saved model
    model = load_checkpoint(out)
    examples = evaluate.load_examples("hellaswag", tmp_path / "hs.jsonl", limit=5)
    final = evaluate.hellaswag_score(model, examples, progress=False)
    assert scores[-1]["acc_norm"] == final["acc_norm"] and scores[-1]["n"] == 5
    last_eval = [ln for ln in printed.splitlines() if "(Step 000006)" in ln][-1]
    assert last_eval.endswith(f", hellaswag acc_norm {final['acc_norm']:.4f}")
    assert read_checkpoint(out)["history"]["task_scores"] == scores

    lines = read_lines(tmp_path / "run_metrics.jsonl")
    steps = [r for r in lines if r["kind"] == "step"]
    evals = [r for r in lines if r["kind"] == "eval"]
    assert [r["step"] for r in steps] == list(range(1, 7))
    assert [r["loss"] for r in steps] == history["step_loss"]
    assert [r["val_loss"] for r in evals] == history["val_loss"]
    assert [r["hellaswag"]["acc_norm"] for r in evals] == [s["acc_norm"] for s in scores]
    for r in steps:         # the run's health: clipping at 1.0 (TINY_FLAGS keep the default)
        assert r["grad_norm"] > 0 and r["clipped"] == (r["grad_norm"] > 1.0)
        assert r["lr"] > 0 and r["tokens_per_s"] > 0
    # the update-to-weight ratio of each part, on the steps that end at an evaluation
    ratios = {r["step"]: r["update_to_weight"] for r in steps if "update_to_weight" in r}
    assert sorted(ratios) == [3, 6]
    assert set(ratios[3]) == {"embeddings", "attention", "mlp", "norms"}
    assert all(0 < v < 1 for v in ratios[3].values())

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    board = EventAccumulator(str(tmp_path / "tb"))
    board.Reload()
    logged = [(e.step, e.value) for e in board.Scalars("step/loss")]
    assert logged == [(r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in steps]
    acc = [(e.step, e.value) for e in board.Scalars("eval/hellaswag/acc_norm")]
    assert acc == [(s["step"], pytest.approx(s["acc_norm"])) for s in scores]


def test_a_resumed_run_keeps_its_history_and_continues_its_log(tmp_path, run_flags):
    whole = main([*run_flags, "--out", str(tmp_path / "whole.pth"), "--checkpoint-every", "3"])
    # a run that saved at step 3 and was killed after logging step 4: the log holds step 4,
    # which --resume trains again and must not log twice
    cut = tmp_path / "cut.pth"
    cut.write_bytes((tmp_path / "whole.pth.prev").read_bytes())
    lines = (tmp_path / "whole_metrics.jsonl").read_text().splitlines()
    upto4 = [ln for ln in lines if json.loads(ln)["step"] <= 4]
    (tmp_path / "cut_metrics.jsonl").write_text("\n".join(upto4) + "\n{\"kind\": \"st")
    resumed = main([*run_flags, "--out", str(cut), "--checkpoint-every", "3", "--resume"])
    assert resumed["task_scores"] == whole["task_scores"]
    assert resumed["step_loss"] == whole["step_loss"]
    again = read_lines(tmp_path / "cut_metrics.jsonl")
    first = read_lines(tmp_path / "whole_metrics.jsonl")
    assert [(r["kind"], r["step"]) for r in again] == [(r["kind"], r["step"]) for r in first]
    assert [r.get("loss") for r in again] == [r.get("loss") for r in first]


def test_bad_eval_task_values_are_one_line(tmp_path, run_flags):
    flags = [*run_flags, "--out", str(tmp_path / "m.pth")]
    i = flags.index("hellaswag:5")
    for value, message in (("mmlu", "give a task of hellaswag, lambada, wikitext"),
                           ("hellaswag:0", "give a task of")):
        with pytest.raises(ValueError, match=message):
            main(flags[:i] + [value] + flags[i + 1:])
    lambada = write_jsonl(tmp_path / "l.jsonl", [{"text": "a b c"}])
    j = flags.index(str(tmp_path / "hs.jsonl"))
    with pytest.raises(ValueError, match="hellaswag"):
        main(flags[:j] + [str(lambada)] + flags[j + 1:])
    assert not (tmp_path / "m.pth").exists()


@pytest.mark.parametrize("case", ["above", "below", "just under", "nan", "inf", "off"])
def test_clip_gradients_scales_and_reports_as_clip_grad_norm_(case):
    """engine.runs.clip_gradients skips PyTorch's multiply by 1: the gradients and the norm
    must still be clip_grad_norm_'s, bit for bit, at the edge where the norm is under
    max_norm but the + 1e-6 still scales, and with a non-finite norm."""
    import copy

    import torch

    from engine.runs import clip_gradients
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 3))
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    grads = [p.grad for p in model.parameters()]
    norm = float(torch.nn.utils.get_total_norm(grads))
    factor = {"above": 10.0, "below": 0.01, "just under": (1.0 - 0.5e-6) / norm}.get(case, 1.0)
    for g in grads:
        g *= factor
    if case in ("nan", "inf"):
        grads[0][0, 0] = float(case)
    other = copy.deepcopy(model)
    for p, q in zip(model.parameters(), other.parameters()):
        q.grad = p.grad.clone()
    max_norm = 0.0 if case == "off" else 1.0
    if max_norm:
        expected = float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm))
    else:
        expected = float(torch.nn.utils.get_total_norm(grads))
    got = clip_gradients(other, max_norm)
    assert got == expected or (got != got and expected != expected)
    for p, q in zip(model.parameters(), other.parameters()):
        assert torch.equal(p.grad.nan_to_num(7.0), q.grad.nan_to_num(7.0))
