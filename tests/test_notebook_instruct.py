"""instruct.ipynb run headless on a tiny model, and look_inside's loss-mask picture.

The notebook tunes a random 2-layer, 32-wide GPT-2 (saved here as its INIT_FROM) for a few
steps on the shipped data/instructions.jsonl. Its printed figures are compared with
references computed here from the records themselves: the template written out by hand,
the batches padded by hand, the losses as plain log-softmax sums, the answers by a greedy
loop over full forward passes (no KV cache, no batching).
"""

import contextlib
import json
import math

import pytest
import torch

nbclient = pytest.importorskip("nbclient")

from test_notebooks import numbers, png_count, run_from_tiny_model, stdout  # noqa: E402

from conftest import ROOT  # noqa: E402
from dataset import get_tokenizer, read_records, split_records  # noqa: E402
from look_inside import (  # noqa: E402
    PADDING,
    PROMPT,
    SCORED,
    plot_token_mask,
    token_label,
    token_roles,
)
from model import load_checkpoint, read_checkpoint  # noqa: E402

DATA = ROOT / "data" / "instructions.jsonl"
EOT = 50256
RUN = dict(NUM_EPOCHS=1, MAX_STEPS=4, BATCH_SIZE=4, LEARNING_RATE=1e-2, EVAL_FREQ=2,
           EVAL_ITER=2, N_ANSWERS=3, MAX_NEW_TOKENS=6, DEVICE="cpu", SEED=123)


# ---------------------------------------------------------------------------------------
# References, written out here rather than taken from dataset.py

def prompt_text(record):
    """The template up to the answer, for an Alpaca record."""
    user = record["instruction"]
    if record.get("input", "").strip():
        user += "\n\n" + record["input"]
    return f"### User:\n{user}\n\n### Assistant:\n"


def pieces(record):
    """(prompt ids, answer ids + <|endoftext|>) of a record."""
    enc = get_tokenizer()
    return enc.encode_ordinary(prompt_text(record)), enc.encode_ordinary(record["output"]) + [EOT]


def batch_by_hand(records):
    """Right-padded (inputs, response targets, whole-sequence targets), each (B, L)."""
    rows = []
    for record in records:
        prompt, answer = pieces(record)
        ids = prompt + answer
        rows.append((ids[:-1], [-100] * (len(prompt) - 1) + answer, ids[1:]))
    width = max(len(x) for x, _, _ in rows)
    inputs = torch.full((len(rows), width), EOT)
    response = torch.full((len(rows), width), -100)
    whole = torch.full((len(rows), width), -100)
    for b, (x, y, w) in enumerate(rows):
        inputs[b, :len(x)] = torch.tensor(x)
        response[b, :len(y)] = torch.tensor(y)
        whole[b, :len(w)] = torch.tensor(w)
    return inputs, response, whole


def mean_nll(model, inputs, targets):
    """Mean of -log p(target) over the positions whose target is not -100, and their count."""
    with torch.no_grad():
        log_probs = torch.log_softmax(model(inputs).double(), dim=-1)       # (B, L, V)
    keep = targets != -100
    picked = log_probs.gather(-1, targets.clamp(min=0)[..., None])[..., 0]  # (B, L)
    return float(-picked[keep].mean()), int(keep.sum())


@contextlib.contextmanager
def one_thread():
    """Torch on one thread: a model this small runs many times faster so (its matmuls are
    too small to share), and on a busy machine threads wait for each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def greedy(model, ids, n):
    """Up to ``n`` argmax tokens after ``ids``, a full forward pass each; stops after EOT.
    Returns (the answer's text, whether it ended with <|endoftext|>)."""
    out = []
    with torch.no_grad():
        for _ in range(n):
            token = int(model(torch.tensor([ids + out]))[0, -1].argmax())
            if token == EOT:
                return get_tokenizer().decode(out), True
            out.append(token)
    return get_tokenizer().decode(out), False


# ---------------------------------------------------------------------------------------
# The notebook

@pytest.fixture(scope="module")
def tuned_run(tmp_path_factory):
    """instruct.ipynb on the shipped records with a random tiny model: (folder, cells)."""
    cwd = tmp_path_factory.mktemp("instruct")
    cells = run_from_tiny_model("instruct.ipynb", cwd, DATA_PATH=str(DATA),
                                MODEL_PATH=str(cwd / "out" / "instruct.pth"), **RUN)
    return cwd, cells


@pytest.fixture(scope="module")
def split():
    records = [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()]
    train, valid = split_records(read_records(DATA), 0.1, RUN["SEED"])
    assert sorted(map(json.dumps, train + valid)) == sorted(map(json.dumps, records))
    return records, train, valid


def test_template_and_mask_cells(tuned_run, split):
    _, cells = tuned_run
    records, train, valid = split
    assert (f"{len(records)} records; {len(train)} for training, {len(valid)} held out"
            in stdout(cells["data"]))
    assert "2 layers, 32 wide, 64-token context" in stdout(cells["model"])

    # the template: the first held-out record with an input, written out by hand
    record = next(r for r in valid if r.get("input"))
    prompt, answer = pieces(record)
    out = stdout(cells["template"])
    assert prompt_text(record) + record["output"] + "<|endoftext|>\n" in out
    assert f"rendered, {len(prompt) + len(answer)} tokens, {len(answer)} of them scored" in out
    assert f"the scored tokens: {record['output'] + '<|endoftext|>'!r}" in out

    batches = math.ceil(len(train) / 4), math.ceil(len(valid) / 4)
    assert (f"{len(train)} training records in {batches[0]} batches of up to 4; {len(valid)} "
            f"held out in {batches[1]} batches; 0 shortened to fit the 64-token context"
            in stdout(cells["loaders"]))

    # the picture's batch: the first three held-out records
    lengths = [(len(p) - 1, len(a)) for p, a in map(pieces, valid[:3])]
    width = max(p + a for p, a in lengths)
    out = stdout(cells["mask"])
    assert f"inputs (3, {width}), targets (3, {width})" in out
    assert f"prompt   positions per record: {[p for p, _ in lengths]}" in out
    assert f"scored   positions per record: {[a for _, a in lengths]}" in out
    assert f"padding  positions per record: {[width - p - a for p, a in lengths]}" in out
    assert png_count(cells["mask"]) == 1


def test_loss_cells(tuned_run, split):
    cwd, cells = tuned_run
    _, _, valid = split
    base = load_checkpoint(cwd / "tiny.pth").eval()
    inputs, response, whole = batch_by_hand(valid[:4])
    prompt = torch.where((response == -100) & (whole != -100), whole, -100)
    want = {name: mean_nll(base, inputs, t)
            for name, t in (("response", response), ("whole", whole), ("prompt", prompt))}

    out = stdout(cells["loss"])
    assert f"batch: inputs {tuple(inputs.shape)}; {want['response'][1]} scored positions" in out
    library, = numbers(r"calc_loss_batch: ([\d.]+) over " + str(want["response"][1]), out)
    by_hand, = numbers(r"by hand: +([\d.]+)", out)
    whole_loss, = numbers(rf"whole sequence: +([\d.]+) over {want['whole'][1]} real tokens", out)
    prompt_loss, = numbers(rf"prompt part alone: +([\d.]+) over {want['prompt'][1]} prompt", out)
    assert library == by_hand == pytest.approx(want["response"][0], abs=2e-4)
    assert whole_loss == pytest.approx(want["whole"][0], abs=2e-4)
    assert prompt_loss == pytest.approx(want["prompt"][0], abs=2e-4)
    assert want["whole"][1] == want["response"][1] + want["prompt"][1]

    # exercise 1: the answers' tokens plus one <|endoftext|> each; the rest is padding
    scored = sum(len(pieces(r)[1]) for r in valid[:4])
    padding = inputs.numel() - sum(len(p) + len(a) - 1 for p, a in map(pieces, valid[:4]))
    assert (f"predicted {scored}, counted {scored} scored targets of {inputs.numel()} "
            f"positions" in stdout(cells["answer-scored"]))
    assert f"padding {padding} (" in stdout(cells["answer-scored"])

    # exercise 2: the same three losses, before and after tuning
    tuned = load_checkpoint(cwd / "out" / "instruct.pth").eval()
    after = {name: mean_nll(tuned, inputs, t)
             for name, t in (("response", response), ("whole", whole), ("prompt", prompt))}
    table = stdout(cells["answer-mask"])
    for name in ("response", "prompt", "whole"):
        got = numbers(rf"{name} loss +([\d.]+) +([\d.]+) +(\d+)", table)
        assert got == pytest.approx([want[name][0], after[name][0], want[name][1]], abs=2e-3)
    share = want["prompt"][1] / want["whole"][1]
    assert f"without the mask, {share:.0%} of the scored tokens" in table

    # exercise 3: record 0 alone and in its padded batch
    alone = mean_nll(tuned, *batch_by_hand(valid[:1])[:2])[0]
    got = numbers(r"positions: ([\d.]+); in the batch, padded to \d+: ([\d.]+)",
                 stdout(cells["answer-padding"]))
    assert got == pytest.approx([alone, alone], abs=2e-4)


def test_tuning_and_answers(tuned_run, split):
    cwd, cells = tuned_run
    _, train, valid = split
    ckpt = read_checkpoint(cwd / "out" / "instruct.pth")
    assert ckpt["step"] == RUN["MAX_STEPS"] and ckpt["config"]["emb_dim"] == 32
    history = json.loads((cwd / "out" / "instruct_history.json").read_text())
    assert history["step"][0] == 0 and history["final_step"] == RUN["MAX_STEPS"]
    assert (cwd / "out" / "instruct_loss.png").read_bytes()[:4] == b"\x89PNG"
    assert png_count(cells["plot"]) == 1

    # the first evaluation is the untuned model's answer loss on the first EVAL_ITER batches
    base = load_checkpoint(cwd / "tiny.pth").eval()
    inputs, response, _ = batch_by_hand(valid[:4 * RUN["EVAL_ITER"]])
    assert history["val_loss"][0] == pytest.approx(mean_nll(base, inputs, response)[0], abs=1e-4)
    got = numbers(r"held-out loss ([\d.]+) -> ([\d.]+)", stdout(cells["train"]))
    assert got == pytest.approx([history["val_loss"][0], history["final_val_loss"]], abs=1e-3)
    assert f"{RUN['MAX_STEPS']} steps on {len(train)} training records" in stdout(cells["train"])

    # the answers, before and after, by our own greedy loop
    tuned = load_checkpoint(cwd / "out" / "instruct.pth").eval()
    with one_thread():
        answers = {name: [greedy(model, pieces(r)[0], RUN["MAX_NEW_TOKENS"]) for r in valid]
                   for name, model in (("before", base), ("after", tuned))}
    out = stdout(cells["answers"])
    for i, record in enumerate(valid[:RUN["N_ANSWERS"]]):
        user = prompt_text(record)[len("### User:\n"):-len("\n\n### Assistant:\n")]
        block = f"{i + 1}. {user!r}\n   expected: {record['output']!r}\n"
        for name in ("before", "after"):
            text, ended = answers[name][i]
            block += f"   {name + ':':9s} {text!r}" + ("" if ended else "  (no end)") + "\n"
        assert block in out
    n = len(valid)
    ended = [sum(e for _, e in answers[name]) for name in ("before", "after")]
    exact = [sum(a == r["output"] for (a, _), r in zip(answers[name], valid))
             for name in ("before", "after")]
    assert (f"ended with <|endoftext|> within {RUN['MAX_NEW_TOKENS']} tokens: before "
            f"{ended[0]}/{n}, after {ended[1]}/{n}") in out
    assert f"exactly the expected answer: before {exact[0]}/{n}, after {exact[1]}/{n}" in out

    # chat.py's Chat answers a new question as the template asks it
    question = get_tokenizer().encode_ordinary(prompt_text({"instruction": "What is 12 plus 30?"}))
    with one_thread():
        reply, _ = greedy(tuned, question, RUN["MAX_NEW_TOKENS"])
    assert f"you> What is 12 plus 30?\ngpt> {reply}\n" in stdout(cells["chat"])


# ---------------------------------------------------------------------------------------
# look_inside.token_roles and plot_token_mask

def test_token_roles_token_by_token():
    inputs = torch.tensor([[10, 11, 12, 13, EOT, EOT],
                           [20, EOT, 21, 22, 23, 24],      # an <|endoftext|> inside: a prompt
                           [30, 31, 32, EOT, EOT, EOT]])
    targets = torch.tensor([[-100, -100, 13, EOT, -100, -100],
                            [-100, -100, -100, 23, 24, EOT],
                            [-100, 32, -100, EOT, -100, -100]])   # scored EOT input: not padding
    P, S, D = PROMPT, SCORED, PADDING
    assert token_roles(inputs, targets).tolist() == [[P, P, S, S, D, D],
                                                     [P, P, P, S, S, S],
                                                     [P, S, P, S, D, D]]
    assert token_roles(inputs[0], targets[0]).tolist() == [P, P, S, S, D, D]      # (L,)
    assert token_roles(inputs, targets, pad_id=99).tolist()[0] == [P, P, S, S, P, P]
    with pytest.raises(ValueError, match="same shape"):
        token_roles(inputs, targets[:, :-1])


def test_plot_token_mask_colours_and_labels():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    enc = get_tokenizer()
    # 447 is the first two bytes of a three-byte character: shown as its bytes
    inputs = torch.tensor([[464, 447, 198, 818, EOT], [464, 198, 11, EOT, EOT]])
    targets = torch.tensor([[-100, -100, 818, EOT, -100], [-100, 11, EOT, -100, -100]])
    fig = plot_token_mask(enc, inputs, targets)
    try:
        ax = fig.axes[0]
        grid = ax.images[0].get_array()
        roles = token_roles(inputs, targets)
        assert grid.tolist() == roles.repeat_interleave(2, dim=0).tolist()   # input, target rows
        texts = {(round(t.get_position()[1]), round(t.get_position()[0])): t.get_text()
                 for t in ax.texts}
        assert len(texts) == 2 * inputs.numel()
        for b in range(2):
            for t in range(5):
                role = int(roles[b, t])
                assert texts[2 * b, t] == ("pad" if role == PADDING else
                                           token_label(enc, inputs[b, t], quote=True))
                assert texts[2 * b + 1, t] == (token_label(enc, targets[b, t], quote=True)
                                               if role == SCORED else "-100")
        assert texts[0, 1] == repr(b"\xe2\x80")
        assert texts[0, 2] == "'\\n'" and texts[1, 3] == "'<|endoftext|>'"
        # the colour of each role is the legend's, and the title counts the scored positions
        cmap, norm = ax.images[0].get_cmap(), ax.images[0].norm
        legend = {t.get_text(): h.get_facecolor() for t, h in
                  zip(fig.legends[0].get_texts(), fig.legends[0].legend_handles)}
        for role, start in ((PROMPT, "prompt"), (SCORED, "answer"), (PADDING, "padding")):
            label = next(k for k in legend if k.startswith(start))
            assert tuple(legend[label]) == pytest.approx(cmap(norm(role)))
        assert ax.get_title() == "4 of 10 positions scored"
        assert [t.get_text() for t in ax.get_yticklabels()] == [
            "record 0: input", "record 0: target", "record 1: input", "record 1: target"]
        assert ax.get_xlabel().startswith("position")
    finally:
        plt.close(fig)
