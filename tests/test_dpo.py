"""Preference tuning with DPO (train_utils.dpo_loss, issue 36): the loss against an independent
computation with transformers' GPT2LMHeadModel, the frozen reference, a synthetic preference
learned, train.py --task dpo resumed exactly, and bad records in one line.

The reference computation renders each record's prompt by hand in the template, scores each
answer alone (no batch, no padding) with GPT2LMHeadModel's log-softmax, and writes DPO's
formula out: nothing of dataset.py or train_utils.py is used for it.
"""

import json
import math

import pytest
import torch

from conftest import ROOT, TINY_FLAGS, cfg_from_hf, make_hf_model
from dataset import (
    create_instruction_dataloader,
    get_tokenizer,
    read_preferences,
    split_records,
)
from download_weights_hf import export_to_hf, load_weights_into_gpt
from model import GPTModel, load_checkpoint, read_checkpoint, save_checkpoint
from model_sources import load_model_and_tokenizer
from train import main as train_main
from train_utils import dpo_batch_loss, dpo_loss, dpo_objective, sequence_logprobs, train_model

EOT = 50256
PAIRS = [
    {"prompt": "Name a primary colour.", "chosen": "Red.", "rejected": "Go away."},
    {"instruction": "Add the numbers.", "input": "2, 3", "chosen": "Happy to help! 5.",
     "rejected": "Whatever. The sum is 5, obviously, as anyone can see."},
    {"instruction": "Spell 'cat' backwards.", "chosen": "tac", "rejected": "No."},
]


def prompt_ids(record):
    """The template up to the answer, written out here: ### User: ... ### Assistant:."""
    user = record.get("prompt") or record["instruction"]
    if record.get("input"):
        user += "\n\n" + record["input"]
    return get_tokenizer().encode_ordinary(f"### User:\n{user}\n\n### Assistant:\n")


def answer_logprob(model, record, side):
    """log p(answer + <|endoftext|> | prompt) under a GPT2LMHeadModel (or a GPTModel), the
    text alone."""
    enc = get_tokenizer()
    prompt, answer = prompt_ids(record), enc.encode_ordinary(record[side]) + [EOT]
    with torch.no_grad():
        out = model(torch.tensor([prompt + answer]))
        logits = getattr(out, "logits", out)[0].double()                   # (T, vocab)
    logp = torch.log_softmax(logits, dim=-1)
    return sum(float(logp[len(prompt) - 1 + i, token]) for i, token in enumerate(answer))


@pytest.fixture(scope="module")
def pair_of_models():
    """(HF policy, HF reference, ours of each): random GPT-2s with the real vocabulary."""
    hfs = [make_hf_model(vocab_size=50257, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                         seed=s) for s in (1, 2)]
    ours = [load_weights_into_gpt(GPTModel(cfg_from_hf(h)), h).eval() for h in hfs]
    return (*hfs, *ours)


def test_dpo_loss_equals_an_independent_computation(pair_of_models):
    hf_policy, hf_reference, policy, reference = pair_of_models
    beta = 0.2
    batch = next(iter(create_instruction_dataloader(PAIRS, 3, 64, shuffle=False,
                                                    preferences=True)))
    inputs, targets = batch
    assert inputs.shape[0] == 6 and (inputs[:, -1] == EOT).any()       # padded, chosen first
    with torch.no_grad():
        loss, metrics = dpo_batch_loss(policy, batch, "cpu", reference=reference, beta=beta)
        rows = sequence_logprobs(policy, inputs, targets)
    # each answer's log-probability, the prompt and the padding left out
    want_rows = [answer_logprob(hf_policy, r, side) for side in ("chosen", "rejected")
                 for r in PAIRS]
    assert rows.tolist() == pytest.approx(want_rows, abs=1e-4)
    rewards = {side: [beta * (answer_logprob(hf_policy, r, side) -
                              answer_logprob(hf_reference, r, side)) for r in PAIRS]
               for side in ("chosen", "rejected")}
    margins = [c - r for c, r in zip(rewards["chosen"], rewards["rejected"])]
    want = sum(-math.log(1 / (1 + math.exp(-m))) for m in margins) / len(margins)
    assert float(loss) == pytest.approx(want, abs=1e-5)
    assert metrics["reward_margin"] == pytest.approx(sum(margins), abs=1e-5)
    assert metrics["reward_accuracy"] == sum(m > 0 for m in margins)
    assert metrics["chosen_reward"] == pytest.approx(sum(rewards["chosen"]), abs=1e-5)
    assert metrics["rejected_reward"] == pytest.approx(sum(rewards["rejected"]), abs=1e-5)
    # the formula itself, on numbers: equal rewards give log 2; the loss falls with the margin
    same = dpo_loss(*(torch.tensor([-3.0]),) * 4, beta=0.1)[0]
    assert float(same) == pytest.approx(math.log(2))
    assert float(dpo_loss(torch.tensor([-1.0]), torch.tensor([-5.0]), torch.tensor([-3.0]),
                          torch.tensor([-3.0]), beta=0.5)[0]) == pytest.approx(
        math.log1p(math.exp(-2.0)))


def sft_then_dpo_records(n):
    """Prompts asking for a colour. Supervised tuning first teaches both answers, "red." to
    two prompts in three and "blue." to the third (the model can say either, and says "red."
    when unsure); then DPO prefers "blue." to "red." everywhere."""
    prompts = [f"Pick a colour for thing number {i}." for i in range(n)]
    sft = [{"instruction": p, "output": "blue." if i % 3 == 0 else "red."}
           for i, p in enumerate(prompts)]
    prefs = [{"prompt": p, "chosen": "blue.", "rejected": "red."} for p in prompts]
    return sft, prefs


def greedy(model, record, n=3):
    enc = get_tokenizer()
    ids = prompt_ids(record)
    out = []
    with torch.no_grad():
        for _ in range(n):
            token = int(model(torch.tensor([ids + out]))[0, -1].argmax())
            if token == EOT:
                break
            out.append(token)
    return enc.decode(out)


def test_the_margin_rises_the_reference_stays_and_the_greedy_answer_moves():
    torch.manual_seed(0)
    cfg = {"vocab_size": 50257, "context_length": 32, "emb_dim": 32, "n_heads": 2,
           "n_layers": 2, "drop_rate": 0.0, "qkv_bias": True}
    model = GPTModel(cfg)
    sft, prefs = sft_then_dpo_records(24)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        loader = create_instruction_dataloader(sft, 8, 32, generator=torch.Generator()
                                               .manual_seed(0))
        train_model(model, loader, loader, device="cpu", max_steps=80, num_epochs=40,
                    learning_rate=6e-3, eval_freq=80, eval_iter=1, start_context="",
                    progress=False)
        assert [greedy(model.eval(), r) for r in prefs] == ["red."] * len(prefs)
        reference = GPTModel(cfg)
        reference.load_state_dict(model.state_dict())
        reference.requires_grad_(False).eval()
        frozen = {k: v.clone() for k, v in reference.state_dict().items()}
        train = create_instruction_dataloader(prefs[:16], 4, 32, preferences=True,
                                              generator=torch.Generator().manual_seed(0))
        valid = create_instruction_dataloader(prefs[16:], 4, 32, shuffle=False,
                                              preferences=True)
        history = train_model(model, train, valid, device="cpu", max_steps=30, num_epochs=20,
                              learning_rate=3e-4, eval_freq=10, eval_iter=2, eval_at_start=True,
                              start_context="", progress=False,
                              objective=dpo_objective(reference, beta=0.5))
    finally:
        torch.set_num_threads(threads)
    # before any step the policy is the reference: every reward is 0, the loss log 2
    assert history["val_reward_margin"][0] == 0.0
    assert history["val_loss"][0] == pytest.approx(math.log(2), abs=1e-6)
    margins = history["val_reward_margin"]
    assert margins[-1] > margins[0] and margins == sorted(margins)     # it rises, step by step
    assert history["val_reward_accuracy"][-1] == 1.0
    assert all(torch.equal(v, frozen[k]) for k, v in reference.state_dict().items())
    # held-out prompts too: the greedy answer is now the chosen one
    assert [greedy(model.eval(), r) for r in prefs] == ["blue."] * len(prefs)


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


DPO = ["--task", "dpo", "--max-steps", "6", "--checkpoint-every", "3", "--eval-freq", "2",
       "--valid-fraction", "0.25", "--learning-rate", "1e-3", *TINY_FLAGS]


def tiny_source(tmp_path):
    torch.manual_seed(0)
    cfg = {"vocab_size": 50257, "context_length": 32, "emb_dim": 32, "n_heads": 2,
           "n_layers": 2, "drop_rate": 0.0, "qkv_bias": True}
    save_checkpoint(tmp_path / "sft.pth", GPTModel(cfg))
    return tmp_path / "sft.pth"


def test_train_py_dpo_resumes_exactly_and_gives_an_instruction_model(tmp_path, capsys):
    source = tiny_source(tmp_path)
    data = write_jsonl(tmp_path / "prefs.jsonl", sft_then_dpo_records(16)[1])
    flags = [*DPO, "--data", str(data), "--init-from", str(source)]
    whole = train_main([*flags, "--out", str(tmp_path / "run.pth")])
    out = capsys.readouterr().out
    train, valid = split_records(read_preferences(data), 0.25, 123)
    assert f"{len(train)} training records, {len(valid)} held out for validation" in out
    assert "DPO scores each answer's tokens, given its prompt" in out
    assert ", val reward margin " in out and "val_reward_accuracy=" in out.splitlines()[-1]
    ckpt = read_checkpoint(tmp_path / "run.pth")
    assert ckpt["settings"]["task"] == "dpo" and ckpt["settings"]["beta"] == 0.1
    assert whole["val_reward_margin"][0] == 0.0          # step 0: the policy is the reference
    (tmp_path / "cut.pth").write_bytes((tmp_path / "run.pth.prev").read_bytes())
    resumed = train_main([*flags, "--out", str(tmp_path / "cut.pth"), "--resume"])
    for key in ("step_loss", "val_loss", "val_reward_margin", "train_reward_accuracy"):
        assert resumed[key] == whole[key], key
    a, b = (read_checkpoint(tmp_path / n)["model_state_dict"] for n in ("run.pth", "cut.pth"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="beta: saved 0.1, now 0.5"):
        train_main([*flags, "--beta", "0.5", "--out", str(tmp_path / "cut.pth"), "--resume"])
    # the result is an instruction model like any other: chat.py and the export take it
    model, _ = load_model_and_tokenizer(tmp_path / "run.pth")
    assert "labels" not in model.cfg
    export_to_hf(model, tmp_path / "hf")
    assert (tmp_path / "hf" / "model.safetensors").is_file()
    # LoRA: only the adapters train; the source stays the reference
    lora = train_main([*flags, "--lora-rank", "2", "--max-steps", "2",
                       "--out", str(tmp_path / "lora.pth")])
    assert lora["val_reward_margin"][0] == 0.0 and "lora" in read_checkpoint(tmp_path / "lora.pth")
    assert torch.equal(load_checkpoint(source).tok_emb.weight,
                       load_checkpoint(tmp_path / "lora.pth").tok_emb.weight)


BAD = [
    ({"prompt": "hi", "chosen": "a"}, r"line 2: it has no \"rejected\""),
    ({"prompt": "hi", "chosen": "same", "rejected": "same"}, r"line 2: \"chosen\" and "
                                                               r"\"rejected\" are the same"),
    ({"prompt": "hi", "chosen": " ", "rejected": "b"}, r"line 2: \"chosen\" must be a "
                                                       r"non-empty string"),
    ({"chosen": "a", "rejected": "b"}, r"line 2: it has no \"instruction\""),
    (["not", "an", "object"], r"line 2: a record must be a JSON object"),
]


@pytest.mark.parametrize("record, message", BAD)
def test_bad_preference_records_get_one_line(tmp_path, record, message):
    data = write_jsonl(tmp_path / "p.jsonl", [PAIRS[0], record])
    with pytest.raises(ValueError, match=message) as caught:
        train_main(["--task", "dpo", "--data", str(data), "--init-from", str(tiny_source(
            tmp_path)), "--out", str(tmp_path / "m.pth"), *TINY_FLAGS])
    assert "\n" not in str(caught.value) and str(data) in str(caught.value)


def test_dpo_flags(tmp_path, capsys):
    for flags, message in ((["--task", "dpo", "--data", "p.jsonl"], "--task dpo tunes the model "
                                                                      "given as --init-from"),
                           (["--beta", "0.2"], "--beta goes with --task dpo"),
                           (["--task", "dpo", "--data", "p.jsonl", "--init-from", "x.pth",
                             "--beta", "0"], "--beta must be a finite number > 0")):
        with pytest.raises(SystemExit):
            train_main([*flags, "--out", str(tmp_path / "m.pth"), *TINY_FLAGS])
        assert message in capsys.readouterr().err
    bad = write_jsonl(tmp_path / "bad.json", [])
    bad.write_text("{}")
    with pytest.raises(ValueError, match="holds a JSON dict, not a list of records"):
        read_preferences(bad)


def test_the_demo_preferences_are_the_tool_s():
    import sys
    sys.path.insert(0, str(ROOT / "tools"))
    import make_preferences

    records = read_preferences(ROOT / "data" / "preferences.jsonl")
    assert records == make_preferences.make()
    instructions = [json.loads(line) for line in
                    (ROOT / "data" / "instructions.jsonl").read_text().splitlines()]
    assert len(records) == len(instructions)
    for pair, record in zip(records, instructions):
        assert pair["chosen"].endswith(record["output"])
        assert pair["chosen"].startswith(make_preferences.POLITE)
        assert pair["rejected"].startswith(make_preferences.CURT)
