"""train.py --tokenizer: a run with its own vocabulary, end to end. The checkpoint carries the
tokenizer, so generate.py, evaluate.py, chat.py and the Hugging Face export use it with no flag;
resume keeps it; another one is refused."""

import json

import pytest
import torch

import evaluate
import generate
from conftest import TINY_FLAGS
from dataset import default_corpus_text, get_tokenizer, load_tokens
from download_weights_hf import main as hf_main
from engine.checkpoints import saved_tokenizer
from generate import generate_text, text_to_token_ids, token_ids_to_text
from model import load_checkpoint, read_checkpoint, save_checkpoint
from model_sources import load_model_and_tokenizer
from tokenizer import BPETokenizer
from train import main

PROMPT = "The for statement"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny model trained with --tokenizer train:512, saved at step 3 (.prev) and 6."""
    folder = tmp_path_factory.mktemp("own_tokenizer")
    (folder / "input.txt").write_text(default_corpus_text()[:40_000])
    flags = ["--data", str(folder / "input.txt"), "--tokenizer", "train:512", "--max-steps",
             "6", "--checkpoint-every", "3", "--eval-freq", "3", *TINY_FLAGS]
    history = main([*flags, "--out", str(folder / "run.pth")])
    return folder, flags, history


def test_the_run_trains_its_own_vocabulary_and_carries_it(run):
    folder, _, _ = run
    ckpt = read_checkpoint(folder / "run.pth")
    own = BPETokenizer.loads(ckpt["tokenizer"]["json"])
    assert ckpt["config"]["vocab_size"] == own.n_vocab == 512
    assert ckpt["settings"]["tokenizer"] == own.fingerprint()
    # trained on the training split only, and saved beside the checkpoint
    train_text = (folder / "train.txt").read_text()
    assert own.merges == BPETokenizer.train(train_text, 512).merges
    assert BPETokenizer.load(folder / "run_tokenizer.json").merges == own.merges
    # the token cache was made with it
    meta = json.loads((folder / "train.txt.tokens.json").read_text())
    assert meta["tokenizer"] == get_tokenizer(folder / "run.pth").name != "gpt2"
    ids = load_tokens(folder / "train.txt", get_tokenizer(folder / "run.pth"))
    assert ids.tolist() == own.encode(train_text)


def test_generate_and_evaluate_use_it_with_no_flag(run, capsys):
    folder, _, _ = run
    model = load_checkpoint(folder / "run.pth")
    tok = get_tokenizer(folder / "run.pth")
    out = generate.main(["--weights", str(folder / "run.pth"), "--prompt", PROMPT,
                         "--temperature", "0", "--max-new-tokens", "8", "--device", "cpu"])
    ids = generate_text(model, text_to_token_ids(PROMPT, tok), 8, eos_id=tok.eot_token)
    assert out == token_ids_to_text(ids, tok).split("<|endoftext|>")[0]
    result = evaluate.main(["--weights", str(folder / "run.pth"), "--data",
                            str(folder / "valid.txt"), "--no-progress", "--device", "cpu"])
    expected = evaluate.evaluate_perplexity(model, load_tokens(folder / "valid.txt", tok),
                                            tokenizer=tok, progress=False)
    assert result["bits_per_byte"] == pytest.approx(expected["bits_per_byte"])
    capsys.readouterr()


def test_resume_is_exact_and_refuses_another_tokenizer(run, tmp_path):
    folder, flags, whole = run
    cut = tmp_path / "cut.pth"
    cut.write_bytes((folder / "run.pth.prev").read_bytes())
    resumed = main([*flags, "--out", str(cut), "--resume"])
    assert resumed["step_loss"] == whole["step_loss"]
    gpt2 = [a if a != "train:512" else "gpt2" for a in flags]
    with pytest.raises(ValueError, match=r"trained with its own tokenizer \(input-512, 512 "
                                         r"tokens\), not with --tokenizer gpt2"):
        main([*gpt2, "--out", str(cut), "--resume", "--max-steps", "8"])
    other = BPETokenizer.train(default_corpus_text()[:20_000], 400).save(tmp_path / "o.json")
    with pytest.raises(ValueError, match="not with --tokenizer"):
        main([*[a if a != "train:512" else str(other) for a in flags], "--out", str(cut),
              "--resume", "--max-steps", "8"])


def test_resume_with_another_size_is_refused_before_it_writes_a_thing(run):
    """Issue 34: --resume --tokenizer train:300 on a train:512 run first wrote a new tokenizer
    over <out>_tokenizer.json, then refused: the run could no longer resume."""
    folder, flags, _ = run
    own = [folder / name for name in ("run.pth", "run.pth.prev", "run_tokenizer.json",
                                      "run_metrics.jsonl", "run_history.json")]
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in own}
    with pytest.raises(ValueError, match=(
            rf"^--resume: the run at {folder / 'run.pth'} was trained with its own tokenizer "
            rf"\(input-512, 512 tokens\), not with --tokenizer train:300; resume with the same "
            rf"tokenizer \(leave --tokenizer out\), or train into a new --out$")):
        main([*[a if a != "train:512" else "train:300" for a in flags], "--out",
              str(folder / "run.pth"), "--resume", "--max-steps", "8"])
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in own} == before


def test_the_hugging_face_export_carries_it(run, tmp_path):
    from transformers import AutoTokenizer, GPT2LMHeadModel

    folder, _, _ = run
    out = hf_main(["--export", str(folder / "run.pth"), "--out", str(tmp_path / "hf")])
    ours, theirs = get_tokenizer(folder / "run.pth"), AutoTokenizer.from_pretrained(out)
    text = (folder / "test.txt").read_text()[:2000] + " Äpfel 🍎 <|endoftext|> x"
    assert theirs(text)["input_ids"] == ours.encode(text, allowed_special="all")
    assert get_tokenizer(out).encode(text, allowed_special="all") == theirs(text)["input_ids"]
    model = load_checkpoint(folder / "run.pth")
    ids = torch.tensor([ours.encode_ordinary(text)[:32]])
    with torch.no_grad():
        torch.testing.assert_close(GPT2LMHeadModel.from_pretrained(out).eval()(ids).logits,
                                   model(ids), atol=1e-5, rtol=1e-5)


def test_bad_tokenizer_flags_and_files_are_one_line(run, tmp_path):
    folder, flags, _ = run
    out = ["--out", str(tmp_path / "m.pth")]
    with pytest.raises(ValueError, match="give a vocabulary size in 257..65536"):
        main([*[a if a != "train:512" else "train:100" for a in flags], *out])
    with pytest.raises(ValueError, match=(
            rf"^--tokenizer train:512 with --init-from {folder / 'run.pth'}: the weights come "
            rf"with its own tokenizer \(input-512, 512 tokens\) \(their embeddings are rows of "
            rf"its tokens\); leave --tokenizer out, and it comes along$")):
        main(["--data", str(folder / "input.txt"), "--init-from", str(folder / "run.pth"),
              "--tokenizer", "train:512", *out])
    bad = tmp_path / "bad.json"
    bad.write_text((folder / "run_tokenizer.json").read_text().replace('"version": 1',
                                                                        '"version": 7'))
    with pytest.raises(ValueError, match="bad.json: version 7"):
        main([*[a if a != "train:512" else str(bad) for a in flags], *out])
    # a checkpoint whose embedding does not fit the tokenizer it carries
    model = load_checkpoint(folder / "run.pth")
    other = BPETokenizer.train(default_corpus_text()[:20_000], 400)
    save_checkpoint(tmp_path / "mixed.pth", model, tokenizer={"json": other.dumps()})
    assert saved_tokenizer(tmp_path / "mixed.pth") == other.dumps()
    with pytest.raises(ValueError, match="512 token embeddings but its tokenizer .* has 400"):
        load_model_and_tokenizer(tmp_path / "mixed.pth")
