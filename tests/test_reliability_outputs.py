"""Issue 34: no output ever replaces an input, an output that cannot be written is refused
before any work, an evaluation is never lost, and every unclear case of the probe is one line
that names the flag or file and the fix."""

import io
import json
import os
import subprocess
import sys

import pytest
import torch
from test_reliability_files import _cli_error

import chat
import download_weights_hf
import evaluate
import generate
import tokenizer
import train
from conftest import ROOT, TINY_CFG, TINY_FLAGS, make_hf_model, read_only
from dataset import default_corpus_text, get_tokenizer
from engine import download, eval_data, fileio
from engine.fileio import check_output
from model import GPTModel, save_checkpoint
from test_evaluate import write_jsonl

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _text(path, n=20_000):
    path.write_text(default_corpus_text()[:n])
    return path


def _tiny(path, **cfg):
    return save_checkpoint(path, GPTModel({**TINY_CFG, "tie_embeddings": True, **cfg}))


def _no_scoring(monkeypatch):
    """Make loading a model an error: what is refused must be refused before that work."""
    def load(*args, **kwargs):
        raise AssertionError("the model was loaded: the output was not checked first")
    monkeypatch.setattr(evaluate, "load_model_and_tokenizer", load)


# ---- the one helper -----------------------------------------------------------------------

def test_check_output_refuses_every_way_an_output_can_be_an_input(tmp_path):
    source = tmp_path / "w.pth"
    source.write_bytes(b"weights")
    (tmp_path / "link.pth").symlink_to(source)
    os.link(source, tmp_path / "hard.pth")
    reads = [("--weights", source), ("--data", None)]
    for out, how in ((source, ""), (tmp_path / "link.pth", ""),
                     (tmp_path / "sub" / ".." / "w.pth", ""),
                     (tmp_path / "hard.pth", " under another name \\(a hard link\\)")):
        with pytest.raises(ValueError, match=(
                rf"^--json {out} is the file it reads as --weights \({source}\){how}, and "
                rf"writing would replace it; choose another --json$")):
            check_output(out, reads, "--json")
    with pytest.raises(ValueError, match=rf"^--out {tmp_path / 'r.pth'} would make it write "
                                         rf"{source}, which is the file it reads as --weights"):
        check_output(tmp_path / "r.pth", reads, "--out", also=[source])
    folder = tmp_path / "hf"
    folder.mkdir()
    for name in ("model.safetensors", "config.json", "model-00001-of-00002.safetensors"):
        with pytest.raises(ValueError, match=(
                rf"^--save {folder / name} would write {name} into {folder}, the model folder "
                rf"it reads as --load, where {name} is one of the folder's own files; choose "
                rf"another --save \(outside {folder}\)$")):
            check_output(folder / name, [("--load", folder)], "--save")
    # a file of one's own beside a model folder's files, and a new name elsewhere, are fine
    assert check_output(folder / "results.json", [("--weights", folder)], "--json")
    assert check_output(tmp_path / "new" / "deep" / "r.json", reads, "--json")
    assert not (tmp_path / "new").exists()          # nothing is created by the check
    assert source.read_bytes() == b"weights"


def test_check_output_refuses_places_that_cannot_be_written(tmp_path, monkeypatch):
    afile = tmp_path / "afile"
    afile.write_text("x")
    cases = [
        (tmp_path, {}, IsADirectoryError, rf"cannot write --json {tmp_path}: it is a folder; "
                                          rf"give the path of a file \(in it, or elsewhere\)"),
        (afile / "r.json", {}, NotADirectoryError,
         rf"cannot write --json {afile / 'r.json'}: {afile} is a file, not a folder; choose "
         rf"another --json"),
        (afile, {"folder": True}, NotADirectoryError,
         rf"cannot write --json {afile}: it is a file, not a folder; choose another --json"),
        ("/proc/r.json", {}, OSError, r"cannot write --json /proc/r.json: nothing can be "
                                      r"created in /proc \(No such file or directory\)"),
    ]
    for path, options, error, message in cases:
        with pytest.raises(error, match="^" + message):
            check_output(path, [], "--json", **options)
    ro = tmp_path / "ro"
    ro.mkdir()
    read_only(monkeypatch, ro)
    for path, options in ((ro / "r.json", {}), (ro, {"folder": True}),
                          (ro / "new" / "r.json", {})):
        with pytest.raises(fileio.NotWritableError, match=(
                rf"^cannot write --json {path}: nothing can be created in {ro} \(Read-only file "
                rf"system\); choose a place you can write to, or make {ro} writable$")):
            check_output(path, [], "--json", **options)


# ---- evaluate.py --json: checked before the scoring, and the result never lost -------------

def test_evaluate_json_over_an_input_is_refused_and_the_input_survives(tmp_path, monkeypatch,
                                                                         capsys):
    weights = _tiny(tmp_path / "w.pth")
    text = _text(tmp_path / "t.txt", 3000)
    hs = write_jsonl(tmp_path / "hs.jsonl", [{"activity_label": "A", "ctx_a": "b", "ctx_b": "c",
                                              "endings": ["d"] * 4, "label": 0}])
    before = {p: p.read_bytes() for p in (weights, text, hs)}
    _no_scoring(monkeypatch)
    for args, flag, value in (
            (["--data", str(text), "--json", str(weights)], "--weights", weights),
            (["--data", str(text), "--json", str(text)], "--data", text),
            (["--task", "hellaswag", "--data", str(hs), "--json", str(hs)], "--data", hs)):
        err = _cli_error(evaluate.main, ["--weights", str(weights), *args], capsys)
        assert err == (f"error: --json {args[-1]} is the file it reads as {flag} ({value}), and "
                       f"writing would replace it; choose another --json")
    # the benchmark file downloaded once into data/eval/ is an input too
    monkeypatch.chdir(tmp_path)
    err = _cli_error(evaluate.main, ["--weights", str(weights), "--task", "lambada", "--json",
                                     "data/eval/lambada_test.jsonl"], capsys)
    assert "reads as --task lambada (data/eval/lambada_test.jsonl)" in err
    assert {p: p.read_bytes() for p in before} == before


def test_evaluate_json_that_cannot_be_written_is_refused_before_scoring(tmp_path, monkeypatch,
                                                                       capsys):
    weights = _tiny(tmp_path / "w.pth")
    text = _text(tmp_path / "t.txt", 3000)
    (tmp_path / "afile").write_text("x")
    ro = tmp_path / "ro"
    ro.mkdir()
    read_only(monkeypatch, ro)
    _no_scoring(monkeypatch)
    for out, why in ((ro / "r.json", f"nothing can be created in {ro} (Read-only file system)"),
                     (tmp_path / "afile" / "r.json", f"{tmp_path / 'afile'} is a file"),
                     (tmp_path, "it is a folder"),
                     ("/proc/r.json", "nothing can be created in /proc")):
        err = _cli_error(evaluate.main, ["--weights", str(weights), "--data", str(text),
                                         "--json", str(out)], capsys)
        assert err.startswith(f"error: cannot write --json {out}: {why}"), err


def test_evaluate_prints_its_result_even_when_writing_the_json_fails(tmp_path, monkeypatch,
                                                                    capsys):
    weights = _tiny(tmp_path / "w.pth")
    text = _text(tmp_path / "t.txt", 3000)

    def disk_full(result, path):
        raise fileio.DiskFullError(f"No space left on the disk for {path}")
    monkeypatch.setattr(evaluate, "write_json", disk_full)
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--weights", str(weights), "--data", str(text), "--json",
                       str(tmp_path / "r.json"), "--no-progress", "--device", "cpu"])
    out, err = capsys.readouterr()
    assert e.value.code == 2
    assert out.splitlines()[-1].startswith("loss=") and "perplexity=" in out
    assert err == (f"error: --json {tmp_path / 'r.json'}: the results above were not written "
                   f"(No space left on the disk for {tmp_path / 'r.json'})\n")


# ---- the other commands that write ----------------------------------------------------------

def test_tokenizer_train_never_writes_over_its_text(tmp_path, capsys):
    text = _text(tmp_path / "t.txt", 5000)
    before = text.read_bytes()
    err = _cli_error(tokenizer.main, ["train", "--data", str(text), "--vocab-size", "300",
                                      "--out", str(text)], capsys)
    assert err == (f"error: --out {text} is the file it reads as --data ({text}), and writing "
                   f"would replace it; choose another --out")
    err = _cli_error(tokenizer.main, ["train", "--data", str(text), "--vocab-size", "300",
                                      "--out", str(tmp_path)], capsys)
    assert err == (f"error: cannot write --out {tmp_path}: it is a folder; give the path of a "
                   f"file (in it, or elsewhere)")
    assert text.read_bytes() == before and "training a" not in capsys.readouterr().out


def test_a_conversion_never_writes_into_the_folder_it_reads(tmp_path):
    folder = tmp_path / "hf"
    make_hf_model(vocab_size=50257, n_positions=32, n_embd=32, n_layer=2, n_head=2
                  ).save_pretrained(folder)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    for name in ("model.safetensors", "config.json"):
        with pytest.raises(ValueError, match=(
                rf"^--save {folder / name} would write {name} into {folder}, the model folder "
                rf"it reads as --load")):
            download_weights_hf.main(["--load", str(folder), "--save", str(folder / name)])
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    # a checkpoint of one's own in that folder is no clash, and loads back
    saved = download_weights_hf.main(["--load", str(folder), "--save", str(folder / "our.pth")])
    assert saved.is_file()
    # --export: --out must be a folder that can be written, checked before the export
    with pytest.raises(NotADirectoryError, match=rf"^cannot write --out {saved}: it is a file, "
                                                 rf"not a folder"):
        download_weights_hf.main(["--export", str(saved), "--out", str(saved)])
    with pytest.raises(OSError, match=r"^cannot write --out /proc/hf: nothing can be created"):
        download_weights_hf.main(["--export", str(saved), "--out", "/proc/hf"])


# ---- train.py: its outputs and flags, before any work -----------------------------------------

def _train_args(tmp_path, *more):
    return ["--data", str(_text(tmp_path / "input.txt")), "--out", str(tmp_path / "run.pth"),
            *TINY_FLAGS, *more]


def test_a_tensorboard_folder_that_cannot_be_written_is_refused_before_training(tmp_path,
                                                                              monkeypatch):
    afile = tmp_path / "afile"
    afile.write_text("x")
    ro = tmp_path / "ro"
    ro.mkdir()
    read_only(monkeypatch, ro)
    for board, error, why in ((ro, fileio.NotWritableError, "nothing can be created in"),
                              (afile, NotADirectoryError, "it is a file, not a folder"),
                              ("/proc/tb", OSError, "nothing can be created in /proc")):
        with pytest.raises(error, match=rf"^cannot write --tensorboard {board}: {why}"):
            train.main(_train_args(tmp_path, "--tensorboard", str(board)))
    assert not (tmp_path / "train.txt").exists()            # refused before any work


def test_a_missing_or_broken_tokenizer_file_is_one_line_before_any_work(tmp_path):
    with pytest.raises(ValueError, match=(
            r"^--tokenizer missing.json: No such file or directory; give gpt2, train:N or a "
            r"file written by `python tokenizer.py train`$")):
        train.main(_train_args(tmp_path, "--tokenizer", "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": "gpt2-course-bpe", "version": 1, "name": "x",
                               "pattern": "x", "byte_order": list(range(256)),
                               "special_tokens": {"<|endoftext|>": 256}}))
    with pytest.raises(ValueError, match=rf'^--tokenizer {bad}: no "merges" list; not a usable '
                                         rf"tokenizer file"):
        train.main(_train_args(tmp_path, "--tokenizer", str(bad)))
    assert not (tmp_path / "train.txt").exists()


def test_eval_data_without_eval_task_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--eval-data", "hs.jsonl"])
    assert ("--eval-data hs.jsonl is the file of an --eval-task; add --eval-task TASK[:N]"
            in capsys.readouterr().err)


def test_offline_eval_task_names_eval_data_before_training(tmp_path, monkeypatch):
    """The benchmark file is fetched before the training; offline, the advice names the flag
    train.py has (--eval-data), not evaluate.py's --data / --data-url."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(download, "_name_does_not_resolve", lambda e: True)   # as offline
    monkeypatch.setitem(eval_data.TASK_FILES, "hellaswag", eval_data.TaskFile(
        "hellaswag_val.jsonl", "http://127.0.0.1:9/hellaswag_val.jsonl", 1, "0" * 64, "test"))
    with pytest.raises(OSError) as e:
        train.main(_train_args(tmp_path, "--eval-task", "hellaswag:5"))
    message = str(e.value)
    assert "--data-url" not in message and "--data FILE" not in message
    assert message.endswith("pass it with --eval-data FILE, or put it at "
                            "data/eval/hellaswag_val.jsonl")
    assert "connect and run again." in message
    assert not (tmp_path / "train.txt").exists()


# ---- benchmark examples longer than the context ------------------------------------------------

def _hellaswag(path, endings_words):
    """One HellaSwag example per entry, its endings ``n`` words long."""
    return write_jsonl(path, [{"activity_label": "Cooking", "ctx_a": "A man cuts onions.",
                               "ctx_b": "he", "endings": [" ".join(["onions"] * n)] * 4,
                               "label": 0} for n in endings_words])


def test_eval_task_examples_that_do_not_fit_are_left_out_with_a_count(tmp_path, capsys):
    hs = _hellaswag(tmp_path / "hs.jsonl", [3, 60, 4, 70, 5])
    history = train.main(_train_args(tmp_path, "--eval-task", "hellaswag:5", "--eval-data",
                                     str(hs), "--max-steps", "2"))
    out = capsys.readouterr().out
    assert ("note: --eval-task hellaswag:5: 2 of its 5 examples do not fit the 32-token context "
            "(the first: example 1, with an ending of 60 tokens) and are left out: 3 are "
            "scored") in out
    assert out.index("note: --eval-task") < out.index("Ep 1")
    assert history["task_scores"][-1]["n"] == 3
    # none that fits: refused before the first step, and nothing is written
    hs = _hellaswag(tmp_path / "long.jsonl", [60, 70])
    with pytest.raises(ValueError, match=(
            r"^--eval-task hellaswag:2: 2 of its 2 examples do not fit the 32-token context "
            r"\(the first: example 0, with an ending of 60 tokens\), so none can be scored; "
            r"use a model with a longer context, or another task$")):
        train.main(_train_args(tmp_path, "--eval-task", "hellaswag:2", "--eval-data", str(hs),
                               "--out", str(tmp_path / "never.pth")))
    assert "Ep 1" not in capsys.readouterr().out
    assert not list(tmp_path.glob("never*"))


def test_evaluate_names_the_example_that_does_not_fit_and_the_fix(tmp_path, capsys):
    weights = _tiny(tmp_path / "w.pth")
    hs = _hellaswag(tmp_path / "hs.jsonl", [3, 4, 60])
    err = _cli_error(evaluate.main, ["--weights", str(weights), "--task", "hellaswag",
                                     "--data", str(hs), "--device", "cpu"], capsys)
    assert err == ("error: hellaswag example 2 (counting from 0) has an ending of 60 tokens, "
                   "more than the 32-token context holds, so it cannot be scored; use a model "
                   "with a longer context (or a larger --context-length, up to the model's), or "
                   "score only the examples before it (--limit 2)")


def test_a_model_of_a_one_token_context_is_told_what_evaluation_needs(tmp_path, capsys):
    weights = _tiny(tmp_path / "w.pth", context_length=1)
    err = _cli_error(evaluate.main, ["--weights", str(weights), "--data",
                                     str(_text(tmp_path / "t.txt", 3000)), "--device", "cpu",
                                     "--no-progress"],
                     capsys)
    assert err == ("error: the model has a 1-token context, and scoring needs at least 2 (a "
                   "token, and the one it predicts); train it with --context-length 2 or more")


# ---- instruction data ----------------------------------------------------------------------

def _records(tmp_path, records, name="d.jsonl"):
    return write_jsonl(tmp_path / name, records)


def _tune(tmp_path, data, *more):
    return train.main(["--data", str(data), "--out", str(tmp_path / "i.pth"), *TINY_FLAGS,
                       *more])


def test_instruction_data_that_cannot_teach_anything_is_one_line(tmp_path, capsys):
    one = _records(tmp_path, [{"instruction": "Say hi.", "output": "Hi."}])
    with pytest.raises(ValueError, match=(
            r"^1 record\(s\) cannot be split into training and validation: give at least 2 "
            r"\(some are held out to measure the validation loss on\)$")):
        _tune(tmp_path, one)
    empty = _records(tmp_path, [{"instruction": f"Say {i}.", "output": ""} for i in range(8)])
    with pytest.raises(ValueError, match=(
            rf"^{empty}: every record's answer \(\"output\", or the assistant's messages\) is "
            rf"empty, so a model tuned on it would only learn to stop at once; fill in the "
            rf"answers$")):
        _tune(tmp_path, empty)
    both = _records(tmp_path, [{"instruction": "Say hi.", "output": "Hi."},
                               {"instruction": "Say yo.", "output": "Yo.", "response": "Yo!"}])
    with pytest.raises(ValueError, match=(
            rf"^{both} line 2: it has both \"output\" and \"response\" \(Dolly's name for the "
            rf"same field\); keep one of them$")):
        _tune(tmp_path, both)
    assert not (tmp_path / "i.pth").exists()


def test_repeated_records_in_validation_are_said(tmp_path, capsys):
    same = _records(tmp_path, [{"instruction": "Say hi.", "output": "Hi there."}] * 20)
    _tune(tmp_path, same, "--max-steps", "1", "--batch-size", "1")
    assert (f"note: 19 of the 19 validation records are copies of a training record ({same} "
            f"repeats it), so the validation loss partly measures memory; remove the repeats "
            f"for a fair one") in capsys.readouterr().out


# ---- chat.py: a long --system is blamed on the system message ---------------------------------

def test_a_long_system_message_is_named_not_the_message():
    torch.manual_seed(0)
    model = GPTModel({**TINY_CFG, "context_length": 64}).eval()
    notes = io.StringIO()
    talk = chat.Chat(model, system="Answer politely. " * 40, max_new_tokens=8, notices=notes,
                     temperature=0.0)
    talk.reply("Hi")
    assert notes.getvalue() == ("(the system message is longer than the 56 tokens the context "
                                "leaves the prompt: the prompt's middle was left out; shorten "
                                "the system message (--system))\n")
    notes.truncate(0)
    notes.seek(0)
    chat.Chat(model, max_new_tokens=8, notices=notes, temperature=0.0).reply("Hi " * 80)
    assert notes.getvalue().startswith("(the message is longer than the 56 tokens")


# ---- checkpoints and runs ------------------------------------------------------------------

def test_an_empty_checkpoint_points_to_the_previous_one(tmp_path, capsys):
    args = _train_args(tmp_path, "--max-steps", "4", "--checkpoint-every", "2")
    train.main(args)
    out = tmp_path / "run.pth"
    out.write_bytes(b"")                # a copy or save cut before its first byte
    with pytest.raises(ValueError, match=(
            rf"^'{out}' is empty \(0 bytes\): a save or a copy of it was cut short; the last "
            rf"checkpoint that verifies is {out}.prev \(step 2\): `mv {out}.prev {out}` and "
            rf"--resume again")):
        train.main([*args, "--resume", "--max-steps", "6"])
    assert "is empty (0 bytes)" in _cli_error(generate.main, ["--weights", str(out)], capsys)


def test_max_steps_beyond_the_epochs_is_said_at_the_start(tmp_path, capsys):
    history = train.main(_train_args(tmp_path, "--max-steps", "400", "--num-epochs", "1",
                                     "--eval-freq", "100"))
    out = capsys.readouterr().out
    steps = history["final_step"]
    assert steps < 400
    assert (f"note: --max-steps 400 is more than the {steps} steps of --num-epochs 1 ({steps} "
            f"steps each): the run ends after its last epoch; for 400 steps, add --num-epochs "
            f"{-(-400 // steps)}") in out
    assert out.index("note: --max-steps") < out.index("Ep 1")


def test_no_progress_hides_the_tokenizing_bars(tmp_path, capsys):
    train.main(_train_args(tmp_path, "--max-steps", "1"))
    text = _text(tmp_path / "fresh.txt", 5000)
    evaluate.main(["--weights", str(tmp_path / "run.pth"), "--data", str(text),
                   "--no-progress", "--device", "cpu"])
    err = capsys.readouterr().err
    assert "tokenizing" not in err and "it/s" not in err and "B/s" not in err


def test_tqdm_disable_hides_the_tokenizing_bar_that_progress_leaves_on(tmp_path):
    # tools/execute_notebooks.py keeps bars out of the committed outputs with TQDM_DISABLE=1,
    # which tqdm reads when it is imported; progress=True must leave tqdm that decision
    text = _text(tmp_path / "t.txt", 3000)
    code = ("import sys; from dataset import get_tokenizer; from engine.token_cache import "
            "load_tokens; load_tokens(sys.argv[1], get_tokenizer(), cache=False)")
    plain = {k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"}
    plain["PYTHONPATH"] = str(ROOT)
    errs = [subprocess.run([sys.executable, "-c", code, str(text)], env=env, check=True,
                           capture_output=True, text=True).stderr
            for env in (plain, {**plain, "TQDM_DISABLE": "1"})]
    assert "tokenizing t.txt" in errs[0]
    assert "tokenizing" not in errs[1]


# ---- a tokenizer is checked whole wherever it comes from ----------------------------------------

def test_a_tokenizer_without_its_end_of_text_token_is_refused_everywhere(tmp_path, capsys):
    from tokenizer import BPETokenizer
    good = BPETokenizer.train(default_corpus_text()[:5000], 300)
    data = json.loads(good.dumps())
    data["special_tokens"] = {}
    bad = tmp_path / "no_eot.json"
    bad.write_text(json.dumps(data))
    line = (f"{bad}: its special tokens {{}} lack <|endoftext|>, which ends every document and "
            f"every answer (generation stops at it); not a usable tokenizer file")
    with pytest.raises(ValueError, match="^" + line.replace("(", r"\(").replace(")", r"\)")):
        BPETokenizer.load(bad)
    with pytest.raises(ValueError, match="^--tokenizer " + line[:40]):
        train.main(_train_args(tmp_path, "--tokenizer", str(bad)))
    text = _text(tmp_path / "t.txt", 3000)
    assert _cli_error(tokenizer.main, ["compare", "--tokenizer", str(bad), "--data", str(text)],
                      capsys).startswith("error: " + line[:40])
    # carried by a checkpoint: generate.py says so in one line (no KeyError)
    weights = save_checkpoint(tmp_path / "m.pth", GPTModel({**TINY_CFG, "vocab_size": 300}),
                              tokenizer={"json": bad.read_text()})
    assert "lack <|endoftext|>" in _cli_error(generate.main, ["--weights", str(weights)], capsys)
    with pytest.raises(ValueError, match="lack <|endoftext|>"):
        get_tokenizer(weights)


# ---- fine-tuning a model that has its own tokenizer -------------------------------------------

def test_a_model_with_its_own_tokenizer_brings_it_to_fine_tuning(tmp_path, capsys):
    text = _text(tmp_path / "input.txt")
    base = tmp_path / "base.pth"
    train.main(["--data", str(text), "--out", str(base), "--tokenizer", "train:400",
                "--max-steps", "2", *TINY_FLAGS])
    own = get_tokenizer(base)
    tuned = train.main(["--data", str(text), "--init-from", str(base), "--out",
                        str(tmp_path / "tuned.pth"), "--max-steps", "2", *TINY_FLAGS])
    assert tuned["final_step"] == 2
    assert get_tokenizer(tmp_path / "tuned.pth").name == own.name
    generate.main(["--weights", str(tmp_path / "tuned.pth"), "--prompt", "The",
                   "--max-new-tokens", "3", "--device", "cpu"])
    # instruction tuning, from its Hugging Face export
    export = download_weights_hf.main(["--export", str(base), "--out", str(tmp_path / "hf")])
    records = _records(tmp_path, [{"instruction": f"Say {w}.", "output": f"{w}."}
                                  for w in ("one", "two", "three", "four", "five", "six",
                                            "seven", "eight", "nine", "ten")])
    train.main(["--data", str(records), "--init-from", str(export), "--out",
                str(tmp_path / "chat.pth"), "--max-steps", "1", *TINY_FLAGS])
    assert get_tokenizer(tmp_path / "chat.pth").name == own.name
    # another tokenizer named explicitly is refused, naming the model's
    with pytest.raises(ValueError, match=(
            rf"^--tokenizer gpt2 with --init-from {base}: the weights come with its own "
            rf"tokenizer \(input-400, 400 tokens\) \(their embeddings are rows of its "
            rf"tokens\); leave --tokenizer out, and it comes along$")):
        train.main(["--data", str(text), "--init-from", str(base), "--tokenizer", "gpt2",
                    "--out", str(tmp_path / "x.pth"), *TINY_FLAGS])
    capsys.readouterr()
