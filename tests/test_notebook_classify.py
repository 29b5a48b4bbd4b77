"""classify.ipynb run headless on a tiny model and the shipped demo set.

The notebook turns a random 2-layer, 32-wide GPT-2 (saved here as its INIT_FROM) into a
spam classifier and tunes it for a few steps. Its printed figures are compared with
references computed here: class scores by a plain forward pass over each text alone (no
batch, no padding), accuracies and confusion matrices counted from those, parameter counts
by formula.
"""

import re

import pytest
import torch

nbclient = pytest.importorskip("nbclient")

from test_notebooks import png_count, run_from_tiny_model, stdout  # noqa: E402

from classify import label_names, make_classifier, read_labelled, split_labelled  # noqa: E402
from conftest import ROOT  # noqa: E402
from dataset import get_tokenizer  # noqa: E402
from model import load_checkpoint, read_checkpoint  # noqa: E402

DATA = ROOT / "data" / "sms_demo.tsv"
RUN = dict(NUM_EPOCHS=1, MAX_STEPS=6, BATCH_SIZE=16, LEARNING_RATE=3e-3, EVAL_FREQ=3,
           EVAL_ITER=2, N_MISTAKES=5, DEVICE="cpu", SEED=123, VALID_FRACTION=0.15,
           TRAINABLE="last:1")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(folder, cells, labels, training records, held-out records)."""
    cwd = tmp_path_factory.mktemp("classify")
    cells = run_from_tiny_model("classify.ipynb", cwd, DATA_PATH=str(DATA),
                                MODEL_PATH=str(cwd / "out" / "clf.pth"), **RUN)
    records = read_labelled(DATA)
    train, valid = split_labelled(records, RUN["VALID_FRACTION"], RUN["SEED"])
    return cwd, cells, label_names(records), train, valid


def scores_alone(model, records, labels, position=-1):
    """Each text's class index by a forward pass over it alone, at ``position``."""
    enc = get_tokenizer()
    with torch.no_grad():
        return [int(model(torch.tensor([enc.encode_ordinary(r["text"])]))[0, position].argmax())
                for r in records]


def confusion(records, predicted, labels):
    return [[sum(r["label"] == a and labels[p] == b for r, p in zip(records, predicted))
             for b in labels] for a in labels]


def test_data_model_and_head_cells(run):
    _, cells, labels, train, valid = run
    assert labels == ["ham", "spam"]
    out = stdout(cells["data"])
    # stratified: 15% of each class's 300, rounded
    for name in labels:
        assert f"  {name:5s}  255 for training,  45 held out" in out
    assert len(valid) == 90
    assert "as a classifier: head (2, 32), classes ['ham', 'spam']" in stdout(cells["model"])
    enc = get_tokenizer()
    lengths = [len(enc.encode_ordinary(r["text"])) for r in valid[:2]]
    out = stdout(cells["byhand"])
    assert f"lengths {lengths}" in out
    assert f"last real token: by hand {[n - 1 for n in lengths]}" in out
    assert "equal: the head reads each text's last real token" in out
    assert re.search(r"are the same: True; largest change of their vectors: 0\.0e\+00",
                     stdout(cells["why"]))
    # what trains, by formula: a block of width C has 12 C^2 + 13 C weights
    C = 32
    block, head, norm = 12 * C * C + 13 * C, 2 * C, 2 * C
    total = 50257 * C + 64 * C + 2 * block + norm + head
    out = stdout(cells["trainable"])
    for what, n in (("head", head), ("last:1", block + norm + head),
                    ("last:2", 2 * block + norm + head), ("all", total)):
        assert f"{what:7s} trains {n:>11,} of {total:,} weights" in out


def test_accuracy_before_and_after(run):
    cwd, cells, labels, train, valid = run
    # before: the same seed gives the same new head on the same weights
    torch.manual_seed(RUN["SEED"])
    base = make_classifier(load_checkpoint(cwd / "tiny.pth"), labels).eval()
    before = scores_alone(base, valid, labels)
    ckpt = read_checkpoint(cwd / "out" / "clf.pth")
    assert ckpt["step"] == RUN["MAX_STEPS"] and ckpt["config"]["labels"] == labels
    tuned = load_checkpoint(cwd / "out" / "clf.pth").eval()
    after = scores_alone(tuned, valid, labels)
    right = [sum(labels[p] == r["label"] for p, r in zip(pred, valid)) / len(valid)
             for pred in (before, after)]
    assert (f"before tuning: accuracy {right[0]:.3f} on 90 held-out texts; confusion (rows: "
            f"true, columns: predicted) {confusion(valid, before, labels)}"
            in stdout(cells["before"]))
    assert (f"held-out accuracy: before {right[0]:.3f}, after {right[1]:.3f} (90 texts)"
            in stdout(cells["after"]))
    assert png_count(cells["after"]) == 1 and png_count(cells["curves"]) == 1
    wrong = [r for p, r in zip(after, valid) if labels[p] != r["label"]]
    out = stdout(cells["mistakes"])
    assert out.startswith(f"{len(wrong)} of 90 held-out texts classified wrong after tuning "
                          f"({sum(labels[p] != r['label'] for p, r in zip(before, valid))} "
                          f"before)")
    for r in wrong[:RUN["N_MISTAKES"]]:
        assert f"true {r['label']:5s} said {[n for n in labels if n != r['label']][0]:5s}" in out
        assert repr(r["text"]) in out
    assert f"{RUN['MAX_STEPS']} steps in " in stdout(cells["train"])
    # exercise 1: the first position instead of the last
    first = scores_alone(tuned, valid, labels, position=0)
    first_right = sum(labels[p] == r["label"] for p, r in zip(first, valid)) / len(valid)
    assert (f"first token: {first_right:.3f} right; last token: {right[1]:.3f}"
            in stdout(cells["answer-first"]))
    assert "left-padded" in stdout(cells["answer-left"])         # its assert held
    # exercise 3: GPT-2 124M, untied as a classifier: 124,439,808 + a 2 x 768 head
    out = stdout(cells["answer-124m"])
    assert "head           1,536 of 124,441,344" in out
    assert "last:1     7,090,944 of 124,441,344" in out
    assert "all      124,441,344 of 124,441,344" in out
    assert stdout(cells["use"]).count("\n") == 3
