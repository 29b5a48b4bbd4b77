"""dpo.ipynb run headless on a tiny model and the shipped preference pairs.

The notebook tunes a random 2-layer, 32-wide GPT-2 (saved here as its INIT_FROM) with DPO for
a few steps. Its printed figures are compared with references computed here: the template
written out by hand, each answer's log-probability as a plain log-softmax sum over a text
alone, DPO's formula, the answers by a greedy loop over full forward passes.
"""

import json
import math

import pytest
import torch

nbclient = pytest.importorskip("nbclient")

from test_dpo import answer_logprob, greedy  # noqa: E402
from test_notebooks import numbers, png_count, run_from_tiny_model, stdout  # noqa: E402

from conftest import ROOT  # noqa: E402
from dataset import get_tokenizer, read_preferences, split_records  # noqa: E402
from model import load_checkpoint, read_checkpoint  # noqa: E402

DATA = ROOT / "data" / "preferences.jsonl"
RUN = dict(NUM_EPOCHS=1, MAX_STEPS=4, BATCH_SIZE=4, LEARNING_RATE=1e-3, EVAL_FREQ=2,
           EVAL_ITER=2, N_ANSWERS=3, MAX_NEW_TOKENS=6, DEVICE="cpu", SEED=123, BETA=0.5,
           VALID_FRACTION=0.05)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(folder, cells, held-out pairs)."""
    cwd = tmp_path_factory.mktemp("dpo")
    cells = run_from_tiny_model("dpo.ipynb", cwd, DATA_PATH=str(DATA),
                                MODEL_PATH=str(cwd / "out" / "dpo.pth"), **RUN)
    return cwd, cells, split_records(read_preferences(DATA), RUN["VALID_FRACTION"], RUN["SEED"])


def prompt_text(record):
    user = record.get("prompt") or record["instruction"]
    if record.get("input"):
        user += "\n\n" + record["input"]
    return f"### User:\n{user}\n\n### Assistant:\n"


def dpo_by_formula(policy, reference, record, beta):
    rewards = [beta * (answer_logprob(policy, record, s) - answer_logprob(reference, record, s))
               for s in ("chosen", "rejected")]
    return math.log1p(math.exp(-(rewards[0] - rewards[1]))), *rewards


LOSS_LINE = (r"{}: +loss ([\d.]+), rewards chosen ([+-][\d.]+), rejected ([+-][\d.]+)")


def test_pairs_and_the_loss_by_hand(run):
    cwd, cells, (train, valid) = run
    out = stdout(cells["data"])
    assert f"300 pairs; {len(train)} for training, {len(valid)} held out" in out
    for side in ("chosen", "rejected"):
        assert prompt_text(valid[0]) + valid[0][side] + "<|endoftext|>\n" in out
    # at the start the policy is the reference: both rewards 0, the loss log 2
    out = stdout(cells["model"])
    for who in ("by hand", "dpo_batch_loss"):
        loss, chosen, rejected = numbers(LOSS_LINE.format(who), out)
        assert loss == pytest.approx(math.log(2), abs=1e-6) and chosen == rejected == 0.0
    # after tuning: the formula on the saved checkpoint against the starting weights
    tuned, base = (load_checkpoint(cwd / p).eval() for p in ("out/dpo.pth", "tiny.pth"))
    want = dpo_by_formula(tuned, base, valid[0], RUN["BETA"])
    assert want[1] != 0.0
    out = stdout(cells["again"])
    for who in ("by hand", "dpo_batch_loss"):
        assert numbers(LOSS_LINE.format(who), out) == pytest.approx(want, abs=2e-4)


def test_tuning_answers_and_exercises(run):
    cwd, cells, (train, valid) = run
    ckpt = read_checkpoint(cwd / "out" / "dpo.pth")
    assert ckpt["step"] == RUN["MAX_STEPS"] and ckpt["settings"]["task"] == "dpo"
    history = json.loads((cwd / "out" / "dpo_history.json").read_text())
    assert history["val_reward_margin"][0] == 0.0 and history["step"] == [0, 2, 4]
    # the first evaluation's held-out loss: log 2, as the formula says for any pair
    assert history["val_loss"][0] == pytest.approx(math.log(2), abs=1e-6)
    margin = numbers(r"held-out reward margin ([-\d.]+) -> ([-\d.]+)", stdout(cells["train"]))
    assert margin == pytest.approx([0.0, history["val_reward_margin"][-1]], abs=1e-3)
    assert png_count(cells["curves"]) == 1

    base, tuned = (load_checkpoint(cwd / p).eval() for p in ("tiny.pth", "out/dpo.pth"))
    answers = {name: [greedy(m, r, RUN["MAX_NEW_TOKENS"]) for r in valid]
               for name, m in (("before", base), ("after", tuned))}
    out = stdout(cells["answers"])
    for before, after in list(zip(answers["before"], answers["after"]))[:RUN["N_ANSWERS"]]:
        assert f"   before: {before!r}\n   after:  {after!r}\n" in out
    n = len(valid)
    for name in ("before", "after"):
        polite = sum(a.startswith(("Happy to help!", "Sure!", "Of course!"))
                     for a in answers[name])
        assert f"{name:6s}: {polite}/{n} open as the chosen answers do" in out

    # exercise 1: each held-out pair's log-probability gap under the reference
    gaps = [answer_logprob(base, r, "chosen") - answer_logprob(base, r, "rejected")
            for r in valid]
    mean, = numbers(r"mean log ref\(chosen\) - log ref\(rejected\): ([+-][\d.]+)",
                    stdout(cells["answer-reference"]))
    assert mean == pytest.approx(sum(gaps) / n, abs=0.006)
    out = stdout(cells["answer-sides"])
    for key in ("val_chosen_reward", "val_rejected_reward", "val_reward_margin"):
        assert f"{key:20s} {history[key][0]:+.3f} -> {history[key][-1]:+.3f}" in out
    # exercise 3: the first answer token's probability of being a polite or a curt opening
    enc = get_tokenizer()
    first = {name: [enc.encode_ordinary(o)[0] for o in openings] for name, openings in (
        ("polite", ("Happy to help!", "Sure!", "Of course!")),
        ("curt", ("Ugh, fine.", "Obviously,", "Whatever.", "Do it yourself next time.")))}
    out = stdout(cells["answer-tokens"])
    for who, model in (("before", base), ("after", tuned)):
        with torch.no_grad():
            probs = [torch.softmax(model(torch.tensor([enc.encode_ordinary(prompt_text(r))]))
                                   [0, -1].double(), -1) for r in valid]
        shown = ", ".join(f"{name} {sum(float(p[ids].sum()) for p in probs) / n:.2e}"
                          for name, ids in first.items())
        assert f"{who:6s}: mean probability of the first answer token being an opening: " \
               f"{shown}" in out
    # exercise 4: rank 8 on 32 wide, 2 blocks: 2 x 8 x (4C + 2C + 5C + 5C)
    assert f"by formula {2 * 8 * 16 * 32:,}" in stdout(cells["answer-lora"])
