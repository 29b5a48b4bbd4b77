"""GPT-2 as a classifier (classify.py, issue 36): against transformers'
GPT2ForSequenceClassification, through the one training loop, and its files.

The reference is a random GPT2ForSequenceClassification built from a config (never
downloaded, conftest.make_hf_model); its logits on the same weights are compared with ours,
with padding on either side. A tiny model learns a task whose label is one word of the
text; what trains is checked weight by weight after a step; a killed run resumes to the
same numbers; bad files say so in one line.
"""

import csv
import functools
import http.server
import io
import json
import random
import subprocess
import sys
import threading
import zipfile
from functools import partial

import pytest
import torch

from classify import (
    ClassificationDataset,
    class_probabilities,
    classification_loss,
    classify_logits,
    create_classification_dataloader,
    label_names,
    last_token_index,
    load_classifier,
    make_classifier,
    pad_texts,
    read_labelled,
    set_trainable,
    split_labelled,
)
from classify import (
    main as classify_main,
)
from conftest import ROOT, TINY_CFG, TINY_FLAGS, make_hf_model
from dataset import get_tokenizer
from download_weights_hf import load_weights_into_gpt
from download_weights_hf import main as hf_main
from engine.records import SMS_SPAM_COUNTS, fetch_sms_spam
from evaluate import classification_scores
from evaluate import main as evaluate_main
from lora import add_lora
from model import GPTModel, load_checkpoint, read_checkpoint, save_checkpoint
from model_sources import load_model, load_model_and_tokenizer
from train import main as train_main
from train_utils import Objective, train_model

PAD = 210           # the reference's padding token: the last id of its vocabulary
EOT = 50256
LABELS = ["neg", "neu", "pos"]


def ours_from(hf, labels=LABELS):
    cfg = {"vocab_size": PAD + 1, "context_length": 40, "emb_dim": 48, "n_heads": 4,
           "n_layers": 3, "drop_rate": 0.0, "qkv_bias": True, "tie_embeddings": False,
           "labels": labels}
    return load_weights_into_gpt(GPTModel(cfg), hf).eval()


def padded(rows, width, left=False, pad=PAD):
    """(ids (B, width), attention mask (B, width)) with ``pad`` on the right or the left."""
    ids = torch.full((len(rows), width), pad)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for b, row in enumerate(rows):
        span = slice(width - len(row), width) if left else slice(0, len(row))
        ids[b, span], mask[b, span] = torch.tensor(row), 1
    return ids, mask


# ---------------------------------------------------------------------------------------
# The classifier against transformers

def test_logits_equal_transformers_with_padding_on_either_side():
    hf = make_hf_model(vocab_size=PAD + 1, num_labels=3)
    ours = ours_from(hf)
    g = torch.Generator().manual_seed(1)
    rows = [torch.randint(0, PAD, (n,), generator=g).tolist() for n in (7, 12, 3, 12)]
    right, _ = padded(rows, 12)
    left, mask = padded(rows, 12, left=True)
    with torch.no_grad():
        # right padding: transformers' own rule, the last token that is not pad_token_id
        want = hf(right).logits                                               # (4, 3)
        assert torch.allclose(classify_logits(ours, right, PAD), want, atol=1e-5, rtol=0)
        # left padding: the mask keeps the padding out; positions count from each text's start
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        left_hf = hf(left, attention_mask=mask, position_ids=positions).logits
        assert torch.allclose(classify_logits(ours, left, PAD, mask), left_hf, atol=1e-5, rtol=0)
        # and each row is what the text alone gives (no padding at all)
        alone = torch.cat([hf(torch.tensor([row])).logits for row in rows])
        assert torch.allclose(left_hf, alone, atol=1e-5, rtol=0)
        assert torch.allclose(want, alone, atol=1e-5, rtol=0)
    assert ours.out_head.weight.shape == (3, 48) and ours.out_head.bias is None


def test_last_token_index_under_padding():
    ids = torch.tensor([[5, 6, 7, 0, 0],        # right padding with pad_id 0
                        [0, 0, 5, 6, 7],        # left padding
                        [5, 6, 7, 8, 9],        # none
                        [0, 0, 0, 0, 0]])       # nothing but padding: 0, as transformers says
    assert last_token_index(ids, pad_id=0).tolist() == [2, 4, 4, 0]
    mask = (ids != 0).long()
    mask[3, 1] = 1                              # the mask decides when given, not pad_id
    assert last_token_index(ids, pad_id=0, attention_mask=mask).tolist() == [2, 4, 4, 1]
    assert last_token_index(ids).tolist() == [4, 4, 4, 4]   # no padding rule: the last position
    # a pad id inside a text is read as a token when a real token follows it
    assert last_token_index(torch.tensor([[5, 0, 6, 0]]), pad_id=0).tolist() == [2]


def test_make_classifier_replaces_the_head_and_keeps_the_rest():
    torch.manual_seed(0)
    gpt = GPTModel({**TINY_CFG, "tie_embeddings": True})
    before = {k: v.clone() for k, v in gpt.state_dict().items() if k != "out_head.weight"}
    make_classifier(gpt, ["ham", "spam"])
    assert gpt.cfg["labels"] == ["ham", "spam"] and not gpt.cfg["tie_embeddings"]
    assert gpt.out_head.weight.shape == (2, 32)
    assert gpt.out_head.weight is not gpt.tok_emb.weight
    assert all(torch.equal(gpt.state_dict()[k], v) for k, v in before.items())
    ids = torch.tensor([[1, 2, 3, EOT, EOT]])
    assert classify_logits(gpt, ids, EOT).shape == (1, 2)
    # model.validate_config refuses labels it cannot build a head for
    for bad in (["one"], ["a", "a"], ["a", ""], "ab", ["a", 2]):
        with pytest.raises(ValueError, match="config key 'labels'"):
            GPTModel({**TINY_CFG, "labels": bad})
    with pytest.raises(ValueError, match="needs tie_embeddings=False"):
        GPTModel({**TINY_CFG, "labels": ["a", "b"], "tie_embeddings": True})


# ---------------------------------------------------------------------------------------
# Export to Hugging Face and back

def test_export_and_import_round_trip(tmp_path, capsys):
    from transformers import GPT2ForSequenceClassification

    torch.manual_seed(3)
    gpt = make_classifier(GPTModel(TINY_CFG), ["ham", "spam"]).eval()
    save_checkpoint(tmp_path / "clf.pth", gpt)
    hf_main(["--export", str(tmp_path / "clf.pth"), "--out", str(tmp_path / "hf")])
    assert "GPT2ForSequenceClassification.from_pretrained" in capsys.readouterr().out
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == ["GPT2ForSequenceClassification"]
    assert config["id2label"] == {"0": "ham", "1": "spam"}
    assert config["label2id"] == {"ham": 0, "spam": 1} and config["pad_token_id"] == EOT
    assert all((tmp_path / "hf" / f).is_file() for f in ("vocab.json", "merges.txt",
                                                          "tokenizer_config.json"))
    hf = GPT2ForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
    assert hf.config.id2label == {0: "ham", 1: "spam"}
    enc = get_tokenizer()
    texts = ["You have won a prize, call now", "see you at the pub", "ok"]
    ids, _ = padded([enc.encode_ordinary(t) for t in texts], 8, pad=EOT)
    back, tokenizer = load_classifier(tmp_path / "hf")           # --weights / --init-from
    assert back.cfg["labels"] == ["ham", "spam"] and tokenizer.name == "gpt2"
    with torch.no_grad():
        want = classify_logits(gpt, ids, EOT)
        assert torch.allclose(hf(ids).logits, want, atol=1e-5, rtol=0)
        assert torch.allclose(classify_logits(back, ids, EOT), want, atol=1e-6, rtol=0)
    # transformers' pipeline pads its batches with the tokenizer written beside the weights
    from transformers import pipeline
    out = pipeline("text-classification", model=str(tmp_path / "hf"), device="cpu")(
        texts, batch_size=3)
    probs = class_probabilities(gpt, texts)
    assert [o["label"] for o in out] == [["ham", "spam"][i] for i in probs.argmax(-1)]
    assert [o["score"] for o in out] == pytest.approx(probs.max(-1).values.tolist(), abs=1e-5)


def test_classifiers_and_language_models_are_not_taken_for_each_other(tmp_path):
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "clf.pth", make_classifier(GPTModel(TINY_CFG), ["a", "b"]))
    save_checkpoint(tmp_path / "lm.pth", GPTModel(TINY_CFG))
    assert load_model(tmp_path / "clf.pth").cfg["labels"] == ["a", "b"]
    with pytest.raises(ValueError, match="is a classifier .* use it with classify.py"):
        load_model_and_tokenizer(tmp_path / "clf.pth")          # generate.py, chat.py
    with pytest.raises(ValueError, match="is a language model, not a classifier"):
        load_classifier(tmp_path / "lm.pth")
    with pytest.raises(ValueError, match="is a classifier .*--task classify"):
        train_main(["--data", str(ROOT / "data" / "instructions.jsonl"), "--init-from",
                    str(tmp_path / "clf.pth"), "--out", str(tmp_path / "x.pth"), *TINY_FLAGS])


# ---------------------------------------------------------------------------------------
# Learning, and what trains

FILLER = ("the a of to and in is it you that was for on are with as his they be at one have "
          "this from by hot word but what some we can out other were all there when up use")


def one_word_records(n, seed):
    """Texts of 3-8 common words and one key word inside: "apple" (label yes) or "stone"
    (no). The label is that one word; everything else is noise."""
    r, words = random.Random(seed), FILLER.split()
    rows = []
    for _ in range(n):
        label = r.choice(["yes", "no"])
        text = r.sample(words, r.randint(3, 8))
        text.insert(r.randint(1, len(text)), "apple" if label == "yes" else "stone")
        rows.append({"text": " ".join(text), "label": label})
    return rows


def objective():
    return Objective(partial(classification_loss, pad_id=EOT))


def test_a_tiny_model_learns_a_label_that_is_one_word():
    torch.manual_seed(0)
    model = make_classifier(GPTModel(TINY_CFG), ["no", "yes"])
    train = create_classification_dataloader(one_word_records(1000, 1), ["no", "yes"], 16, 32,
                                             generator=torch.Generator().manual_seed(1))
    held_out = one_word_records(200, 2)
    valid = create_classification_dataloader(held_out[:32], ["no", "yes"], 16, 32, shuffle=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)            # a model this small runs fastest on one thread
    try:
        history = train_model(model, train, valid, device="cpu", num_epochs=20, max_steps=150,
                              learning_rate=3e-3, warmup_steps=None, eval_freq=75, eval_iter=2,
                              eval_at_start=True, start_context="", progress=False,
                              objective=objective())
        scores = classification_scores(model.eval(), held_out)
    finally:
        torch.set_num_threads(threads)
    assert history["val_accuracy"][0] < 0.75            # a coin, before training
    assert scores["accuracy"] >= 0.97, scores["confusion"]
    # the history's accuracy is the loader's, counted here by hand
    with torch.no_grad():
        right = sum(int((classify_logits(model, x, EOT).argmax(-1) == y).sum())
                    for x, y in valid)
    assert history["val_accuracy"][-1] == right / 32


@pytest.mark.parametrize("what", ["head", "last:1", "all", "lora"])
def test_what_trains_is_what_was_asked(what):
    torch.manual_seed(0)
    model = GPTModel(TINY_CFG)
    if what == "lora":
        add_lora(model, rank=2, alpha=4.0)
    make_classifier(model, ["no", "yes"])
    n = set_trainable(model, what)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train = create_classification_dataloader(one_word_records(8, 1), ["no", "yes"], 8, 32,
                                             generator=torch.Generator().manual_seed(1))
    train_model(model, train, train, device="cpu", max_steps=1, eval_freq=1, eval_iter=1,
                start_context="", progress=False, objective=objective(), learning_rate=1e-2,
                warmup_steps=0)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    last = f"trf_blocks.{TINY_CFG['n_layers'] - 1}."
    want = {"head": lambda k: k == "out_head.weight",
            "last:1": lambda k: k == "out_head.weight" or k.startswith((last, "final_norm.")),
            "all": lambda k: True,
            "lora": lambda k: k == "out_head.weight" or k.endswith((".A", ".B"))}[what]
    # every weight asked for moved, and every other weight is bit for bit what it was
    assert changed == {k for k in before if want(k)}
    assert n == sum(p.numel() for name, p in model.named_parameters() if want(name))
    with pytest.raises(ValueError, match="what trains must be head, last:N"):
        set_trainable(model, "last:9")


# ---------------------------------------------------------------------------------------
# train.py --task classify: a run, its resume, its errors; classify.py and evaluate.py

def write_tsv(path, rows, header=("label", "text")):
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, delimiter="\t", lineterminator="\n")
        writer.writerows([header, *rows])
    return path


CLASSIFY = ["--task", "classify", "--eval-freq", "2", "--max-steps", "6",
            "--checkpoint-every", "3", "--trainable", "all", "--learning-rate", "3e-3",
            "--valid-fraction", "0.25", *TINY_FLAGS]


def test_train_py_classifies_and_resumes_exactly(tmp_path, capsys):
    data = tmp_path / "words.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in one_word_records(48, 5)))
    whole = train_main([*CLASSIFY, "--data", str(data), "--out", str(tmp_path / "run.pth")])
    out = capsys.readouterr().out
    train, valid = split_labelled(read_labelled(data), 0.25, 123)
    assert f"{len(train)} training texts, {len(valid)} held out for validation" in out
    assert "Classifier: classes ['no', 'yes']; what trains: all" in out
    assert f"val_accuracy={whole['val_accuracy'][-1]:.4f}" in out.splitlines()[-1]
    ckpt = read_checkpoint(tmp_path / "run.pth")
    assert ckpt["config"]["labels"] == ["no", "yes"]
    assert ckpt["settings"]["task"] == "classify" and ckpt["settings"]["trainable"] == "all"
    assert [json.loads(line)["val_accuracy"] for line in
            (tmp_path / "run_metrics.jsonl").read_text().splitlines()
            if json.loads(line)["kind"] == "eval"] == whole["val_accuracy"]
    # stratified: each class keeps its share on both sides
    for name in ("no", "yes"):
        share = sum(r["label"] == name for r in valid) / sum(r["label"] == name for r in
                                                              train + valid)
        assert 0.1 < share < 0.4
    # the step-3 checkpoint resumed ends exactly as the whole run, weights included
    (tmp_path / "cut.pth").write_bytes((tmp_path / "run.pth.prev").read_bytes())
    resumed = train_main([*CLASSIFY, "--data", str(data), "--out", str(tmp_path / "cut.pth"),
                          "--resume"])
    for key in ("step_loss", "val_loss", "val_accuracy", "train_accuracy"):
        assert resumed[key] == whole[key], key
    a, b = (read_checkpoint(tmp_path / n)["model_state_dict"] for n in ("run.pth", "cut.pth"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="trainable: saved 'all', now 'head'"):
        train_main([*[x if x != "all" else "head" for x in CLASSIFY], "--data", str(data),
                    "--out", str(tmp_path / "cut.pth"), "--resume"])

    # classify.py prints each text's class and probabilities, as class_probabilities has them
    model, _ = load_classifier(tmp_path / "run.pth")
    texts = ["the apple is on the table", "a stone in the road"]
    capsys.readouterr()
    classify_main(["--weights", str(tmp_path / "run.pth"), "--device", "cpu",
                   *[a for t in texts for a in ("--text", t)]])
    lines = capsys.readouterr().out.splitlines()
    for line, text, row in zip(lines, texts, class_probabilities(model, texts)):
        label = ["no", "yes"][int(row.argmax())]
        assert line == f"{label}\t(no {row[0]:.3f}, yes {row[1]:.3f})\t{text}"

    # evaluate.py: accuracy, per-class figures and the confusion matrix, counted here by hand
    test = tmp_path / "test.jsonl"
    records = one_word_records(30, 9)
    test.write_text("".join(json.dumps(r) + "\n" for r in records))
    result = evaluate_main(["--weights", str(tmp_path / "run.pth"), "--task", "classify",
                            "--data", str(test), "--device", "cpu", "--json",
                            str(tmp_path / "scores.json")])
    predicted = [["no", "yes"][i] for i in class_probabilities(
        model, [r["text"] for r in records]).argmax(-1).tolist()]
    truth = [r["label"] for r in records]
    confusion = [[sum(t == a and p == b for t, p in zip(truth, predicted)) for b in ("no", "yes")]
                 for a in ("no", "yes")]
    assert result["confusion"] == confusion
    right = sum(t == p for t, p in zip(truth, predicted))
    assert result["accuracy"] == right / 30
    said_yes = sum(p == "yes" for p in predicted)
    assert result["per_class"]["yes"]["precision"] == (confusion[1][1] / said_yes
                                                       if said_yes else 0.0)
    assert result["per_class"]["yes"]["recall"] == confusion[1][1] / truth.count("yes")
    out = capsys.readouterr().out
    assert out.splitlines()[-1] == (f"task=classify n=30 accuracy={right / 30:.4f} "
                                    f"macro_f1={result['macro_f1']:.4f}")
    assert "yes       " + "".join(f"{n:>10d}" for n in confusion[1]) + "\n" in out
    assert json.loads((tmp_path / "scores.json").read_text())["confusion"] == confusion


def test_train_py_classifier_from_a_folder_and_with_lora(tmp_path, capsys):
    # --init-from takes a transformers classifier folder: its head and classes stay
    data = write_tsv(tmp_path / "d.tsv", [(r["label"], r["text"])
                                         for r in one_word_records(24, 3)])
    torch.manual_seed(0)
    cfg = {**TINY_CFG, "n_heads": 2}               # TINY_FLAGS' shape
    save_checkpoint(tmp_path / "clf.pth", make_classifier(GPTModel(cfg), ["no", "yes"]))
    hf_main(["--export", str(tmp_path / "clf.pth"), "--out", str(tmp_path / "hf")])
    flags = ["--task", "classify", "--data", str(data), "--max-steps", "2", "--eval-freq", "2",
             "--valid-fraction", "0.25", *TINY_FLAGS]
    train_main([*flags, "--init-from", str(tmp_path / "hf"), "--out", str(tmp_path / "a.pth")])
    assert "what trains: last:1" in capsys.readouterr().out
    # LoRA: the adapters and the head train; the saved checkpoint is a plain classifier
    lm = tmp_path / "lm.pth"
    save_checkpoint(lm, GPTModel(cfg))
    history = train_main([*flags, "--init-from", str(lm), "--lora-rank", "2",
                          "--out", str(tmp_path / "b.pth")])
    assert "what trains: LoRA adapters and the head" in capsys.readouterr().out
    ckpt = read_checkpoint(tmp_path / "b.pth")
    assert "out_head.weight" in ckpt["lora"]["adapters"]        # resumes with its head
    assert load_checkpoint(tmp_path / "b.pth").cfg["labels"] == ["no", "yes"]
    assert len(history["val_accuracy"]) == len(history["val_loss"])


BAD_FILES = [
    ("nolabel.tsv", "text\tkind\nhello\tham\n", r"has no 'label' column \(its header: "
                                                r"\['text', 'kind'\]\)"),
    ("empty_text.jsonl", '{"text": "hi", "label": "a"}\n{"text": "  ", "label": "b"}\n',
     r"empty_text.jsonl line 2: the text is empty"),
    ("one_class.csv", "text,label\nhi,a\nho,a\n", r"one class only \(\['a'\]\)"),
    ("bad_label.jsonl", '{"text": "hi", "label": 1.5}\n', r"line 1: the label must be a name or"),
    ("lonely.jsonl", '{"text": "hi", "label": "a"}\n{"text": "ho", "label": "a"}\n'
                     '{"text": "x", "label": "b"}\n', r"class 'b' has 1 distinct record"),
]


@pytest.mark.parametrize("name, text, message", BAD_FILES)
def test_bad_labelled_files_get_one_line(tmp_path, name, text, message):
    (tmp_path / name).write_text(text)
    with pytest.raises(ValueError, match=message) as caught:
        train_main(["--task", "classify", "--data", str(tmp_path / name),
                    "--out", str(tmp_path / "m.pth"), *TINY_FLAGS])
    assert "\n" not in str(caught.value) and str(tmp_path / name) in str(caught.value)


def test_unknown_labels_and_flags_get_one_line(tmp_path, capsys):
    torch.manual_seed(0)
    cfg = {**TINY_CFG, "n_heads": 2}               # TINY_FLAGS' shape
    save_checkpoint(tmp_path / "clf.pth", make_classifier(GPTModel(cfg), ["ham", "spam"]))
    data = write_tsv(tmp_path / "t.tsv", [("ham", "hi"), ("phish", "click here")])
    with pytest.raises(ValueError, match=r"t.tsv line 3: label 'phish' is not one of the "
                                         r"classifier's classes \['ham', 'spam'\]"):
        read_labelled(data, ["ham", "spam"])
    proc = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), "--weights",
                           str(tmp_path / "clf.pth"), "--task", "classify", "--data", str(data),
                           "--device", "cpu"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: {data} line 3: label 'phish' is not one of the classifier's classes "
        f"['ham', 'spam']"]
    more = write_tsv(tmp_path / "m.tsv", [("ham", "a"), ("spam", "b"), ("ham", "c"),
                                         ("spam", "d"), ("phish", "e"), ("phish", "f")])
    with pytest.raises(ValueError, match=r"classes \['phish'\] that the classifier .* does not"):
        train_main(["--task", "classify", "--data", str(more), "--init-from",
                    str(tmp_path / "clf.pth"), "--valid-fraction", "0.5",
                    "--out", str(tmp_path / "m.pth"), *TINY_FLAGS, "--batch-size", "1"])
    with pytest.raises(ValueError, match="labels .* are not the classifier's classes"):
        ClassificationDataset([{"text": "x", "label": "phish"}], ["ham", "spam"])
    for flags, message in ((["--task", "classify"], "--task classify needs --data FILE"),
                           (["--trainable", "head"], "--trainable goes with --task classify"),
                           (["--task", "classify", "--data", "x.tsv", "--trainable", "last"],
                            "--trainable must be head, last:N"),
                           (["--task", "classify", "--data", "x.tsv", "--format", "alpaca"],
                            "go with instruction records")):
        with pytest.raises(SystemExit):
            train_main([*flags, "--out", str(tmp_path / "m.pth"), *TINY_FLAGS])
        assert message in capsys.readouterr().err


def test_labels_and_batches():
    rows = [{"text": "b", "label": "10"}, {"text": "a", "label": "2"},
            {"text": "c", "label": "10"}]
    assert label_names(rows) == ["2", "10"]               # integers keep their order
    assert label_names([{"text": "x", "label": "spam"}, {"text": "y", "label": "ham"}]) == \
        ["ham", "spam"]
    dataset = ClassificationDataset(rows, ["2", "10"], max_length=3)
    assert [y for _, y in dataset.examples] == [1, 0, 1]
    long = ClassificationDataset([{"text": "one two three four five", "label": "2"}],
                                 ["2", "10"], max_length=3)
    assert long.truncated == 1 and long[0][0].tolist() == get_tokenizer().encode_ordinary(
        "one two three")
    with pytest.raises(ValueError, match="text 1 .* is empty; every text needs at least one"):
        ClassificationDataset([{"text": "a", "label": "2"}, {"text": "", "label": "2"}],
                              ["2", "10"])
    inputs, classes = pad_texts([(torch.tensor([1, 2, 3]), 1), (torch.tensor([4]), 0)], 9)
    assert inputs.tolist() == [[1, 2, 3], [4, 9, 9]] and classes.tolist() == [1, 0]


# ---------------------------------------------------------------------------------------
# The SMS Spam Collection, through engine/download.py, from a server on this machine

def sms_zip(counts):
    lines = [f"{label}\tmessage {i} from {label}" for label, n in counts.items()
             for i in range(n)]
    random.Random(0).shuffle(lines)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        z.writestr("SMSSpamCollection", "\n".join(lines) + "\n")
        z.writestr("readme", "the collection")
    return buffer.getvalue()


def test_fetch_sms_spam_checks_what_it_downloads(tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    (served / "good.zip").write_bytes(sms_zip(SMS_SPAM_COUNTS))
    (served / "short.zip").write_bytes(sms_zip({"ham": 4827, "spam": 746}))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=served)
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        with pytest.raises(ValueError, match=r"has 5573 lines, \{'ham': 4827, 'spam': 746\}"):
            fetch_sms_spam(tmp_path / "bad", f"{url}/short.zip")
        assert not (tmp_path / "bad" / "sms_spam_collection.zip").exists()   # deleted
        path = fetch_sms_spam(tmp_path / "data", f"{url}/good.zip")
    finally:
        server.shutdown()
        server.server_close()
    records = read_labelled(path)
    assert len(records) == 5574 and label_names(records) == ["ham", "spam"]
    assert sum(r["label"] == "spam" for r in records) == 747
    assert fetch_sms_spam(tmp_path / "data", f"{url}/good.zip") == path      # no request now


def test_the_demo_set_is_the_tool_s_and_balanced():
    sys.path.insert(0, str(ROOT / "tools"))
    import make_classify_data

    records = read_labelled(ROOT / "data" / "sms_demo.tsv")
    assert [(r["label"], r["text"]) for r in records] == make_classify_data.make()
    assert label_names(records) == ["ham", "spam"]
    assert sum(r["label"] == "spam" for r in records) == len(records) // 2 == 300
    assert len({r["text"] for r in records}) == len(records)
