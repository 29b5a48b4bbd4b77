"""evaluate.py's benchmark tasks against an independent computation with transformers.

The reference for every log-likelihood is lm-evaluation-harness's recipe written out here
with Hugging Face's own pieces: GPT2Tokenizer (from GPT-2's BPE files, offline) and one
GPT2LMHeadModel forward per (context, continuation), over the last max_length + 1 tokens.
Our model holds the same random weights. The files are written by the tests in the official
formats, and downloads come from a local http.server.
"""

import copy
import hashlib
import json
import math
import random
import re
import signal
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

import evaluate
from conftest import ROOT, cfg_from_hf, make_hf_model
from dataset import default_corpus_text, get_tokenizer
from download_weights_hf import load_weights_into_gpt
from engine import eval_data, scoring
from engine.bpe_files import gpt2_bpe_files
from model import GPTModel
from model_sources import load_model

MAX = 48        # the test model's context: long inputs are easy to make


@pytest.fixture(scope="module")
def pair():
    """(HF model, our model with its weights): GPT-2's vocabulary, 48 positions."""
    hf = make_hf_model(vocab_size=50257, n_positions=MAX, n_embd=32, n_layer=2, n_head=2,
                       seed=5)
    return hf, load_weights_into_gpt(GPTModel(cfg_from_hf(hf)), hf).eval()


@pytest.fixture(scope="module")
def hf_tok():
    """Hugging Face's GPT-2 tokenizer from the same BPE files (no download)."""
    import transformers
    from transformers import GPT2Tokenizer
    encoder_json, vocab_bpe = gpt2_bpe_files()
    if int(transformers.__version__.split(".")[0]) >= 5:
        return GPT2Tokenizer(vocab=str(encoder_json), merges=str(vocab_bpe))
    return GPT2Tokenizer(vocab_file=str(encoder_json), merges_file=str(vocab_bpe))


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory, pair):
    folder = tmp_path_factory.mktemp("hf") / "tiny-gpt2"
    pair[0].save_pretrained(folder)
    return folder


def harness_ids(hf_tok, context, continuation):
    """lm-eval's HFLM: trailing spaces of the context go to the continuation; the
    continuation's ids are the whole text's after the context's; "" is <|endoftext|>."""
    if not context:
        return [hf_tok.eos_token_id], hf_tok.encode(continuation)
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    ctx = hf_tok.encode(context)
    return ctx, hf_tok.encode(context + continuation)[len(ctx):]


def hf_score_ids(hf, ctx, cont, max_length=MAX):
    """(log-likelihood, greedy) of token ids ``cont`` after ``ctx``: one HF forward."""
    ids = (ctx + cont)[-(max_length + 1):][:-1]
    with torch.no_grad():
        logits = hf(torch.tensor([ids])).logits[0, -len(cont):].double()       # (n, vocab)
    target = torch.tensor(cont)
    ll = logits.log_softmax(-1).gather(1, target[:, None]).sum().item()
    return ll, bool((logits.argmax(-1) == target).all())


def hf_score(hf, hf_tok, context, continuation, max_length=MAX):
    return hf_score_ids(hf, *harness_ids(hf_tok, context, continuation), max_length)


VOCAB = [w for w in default_corpus_text().split() if w.isalpha()]


def words(rng, lo, hi):
    return " ".join(rng.choice(VOCAB) for _ in range(rng.randint(lo, hi)))


# ---- HellaSwag ---------------------------------------------------------------------------

BAKING = {"ind": 7, "activity_label": "Baking cookies",
          "ctx_a": "[header] How to bake cookies [title] Preheat the oven.  [step] Set it to "
                   "180 degrees.",
          "ctx_b": "tHEN mix",
          "ctx": "(not read)",
          "endings": ["[substeps] the  flour [title] and sugar.", " Eat them all. ",
                      "[step] Wash the bowl [header]  first.", "Go to sleep."],
          "label": 2, "split": "val", "split_type": "indomain", "source_id": "wikihow~1"}


def test_hellaswag_preprocessing_by_hand():
    (ex,) = evaluate.hellaswag_examples([BAKING])
    # " [title]" -> ". ", other tags removed, then ONE pass of "  " -> " ": a run of three
    # spaces (". " + tag + " ") keeps two, as in the harness; ctx_b.capitalize() lowers the rest
    assert ex == {"index": 0, "label": 2,
                  "query": "Baking cookies: How to bake cookies. Preheat the oven.  Set it to "
                           "180 degrees. Then mix",
                  "choices": [" the flour. and sugar.", "Eat them all.", " Wash the bowl  first.",
                              "Go to sleep."]}


def hellaswag_records(n, seed):
    """BAKING, then ``n`` records in the file's format; several longer than 48 tokens."""
    rng = random.Random(seed)
    records = [BAKING]
    for i in range(n):
        story = words(rng, 30, 40) if i % 3 == 0 else words(rng, 3, 12)
        records.append({
            "ind": i, "activity_label": words(rng, 1, 3).title(),
            "ctx_a": f"[header] {words(rng, 2, 4)} [title] {story}.",
            "ctx_b": words(rng, 0, 3).upper(),
            "ctx": "", "endings": [f"{words(rng, 1, 9 if i % 4 else 45)}. [step] "
                                   f"{words(rng, 0, 3)}" for _ in range(4)],
            "label": rng.randrange(4), "split": "val", "split_type": "zeroshot",
            "source_id": f"x~{i}"})
    return records


def test_hellaswag_loglikelihoods_equal_hf_at_any_batch_size(pair, hf_tok):
    hf, ours = pair
    examples = evaluate.hellaswag_examples(hellaswag_records(9, seed=1))
    tok = get_tokenizer()
    lengths = [len(sum(harness_ids(hf_tok, ex["query"], " " + c), [])) for ex in examples
               for c in ex["choices"]]
    assert max(lengths) > MAX + 20 and min(lengths) < MAX      # truncation, and none needed
    one = evaluate.hellaswag_score(ours, examples, tok, batch_size=1, progress=False)
    seven = evaluate.hellaswag_score(ours, examples, tok, batch_size=7, progress=False)
    for ex, a, b in zip(examples, one["examples"], seven["examples"]):
        want = [hf_score(hf, hf_tok, ex["query"], " " + c)[0] for c in ex["choices"]]
        assert a["loglikelihoods"] == pytest.approx(want, abs=1e-4)
        assert b["loglikelihoods"] == pytest.approx(a["loglikelihoods"], abs=1e-5)
        # acc and acc_norm follow from the four sums (per character of the ending)
        norm = [ll / len(c) for ll, c in zip(a["loglikelihoods"], ex["choices"])]
        assert a["pred"] == want.index(max(want)) and a["pred_norm"] == norm.index(max(norm))
        assert (a["index"], a["label"]) == (ex["index"], ex["label"])
    rows = one["examples"]
    assert one["n"] == 10
    assert one["acc"] == sum(r["pred"] == r["label"] for r in rows) / 10
    assert one["acc_norm"] == sum(r["pred_norm"] == r["label"] for r in rows) / 10
    assert [r["pred"] for r in rows] == [r["pred"] for r in seven["examples"]]


def test_loglikelihoods_of_mixed_lengths_split_batches_that_would_not_fit(pair):
    hf, ours = pair
    g = torch.Generator().manual_seed(2)
    ids = lambda n: torch.randint(0, 50257, (n,), generator=g).tolist()
    requests = [(ids(45), [ids(2), ids(1)]),     # a long context, short continuations
                (ids(3), [ids(40)]),             # a short context, a long continuation
                (ids(1), [ids(48)]),             # a continuation as long as the context
                (ids(60), [ids(5), ids(30)]),    # too long: each keeps what fits
                (ids(7), [ids(1), ids(2), ids(3)])]
    got = evaluate.loglikelihoods(ours, requests, batch_size=5)
    with scoring.disabled():                 # the plain loop: one forward per continuation
        plain = evaluate.loglikelihoods(ours, requests, batch_size=5)
    for (ctx, conts), scores, plain_scores in zip(requests, got, plain):
        for cont, (ll, greedy), (plain_ll, plain_greedy) in zip(conts, scores, plain_scores):
            want_ll, want_greedy = hf_score_ids(hf, ctx, cont)
            assert ll == pytest.approx(want_ll, abs=1e-4) and greedy == want_greedy
            assert plain_ll == pytest.approx(want_ll, abs=1e-4) and plain_greedy == want_greedy
    with pytest.raises(ValueError, match="a continuation of 49 tokens does not fit in the "
                                         r"context \(48 tokens\)"):
        evaluate.loglikelihoods(ours, [(ids(2), [ids(49)])])


def test_bf16_weights_score_close_to_fp32(pair):
    _, ours = pair
    examples = evaluate.hellaswag_examples(hellaswag_records(3, seed=6))
    fp32 = evaluate.hellaswag_score(ours, examples, progress=False)
    bf16 = evaluate.hellaswag_score(copy.deepcopy(ours).to(torch.bfloat16), examples,
                                    progress=False)
    for a, b in zip(fp32["examples"], bf16["examples"]):
        assert b["loglikelihoods"] == pytest.approx(a["loglikelihoods"], abs=0.05)


# ---- LAMBADA ----------------------------------------------------------------------------

def lambada_texts(hf, tok, seed):
    """Passages: short, longer than the context, a rare multi-token last word, and some
    whose last word is the model's own greedy choice (so that acc is not trivially 0)."""
    rng = random.Random(seed)
    texts = [words(rng, 4, 10), words(rng, 60, 80), words(rng, 5, 9) + " Zyxomaticals"]
    for _ in range(40):
        context = words(rng, 3, 12)
        ctx = tok.encode(context)
        with torch.no_grad():
            best = int(hf(torch.tensor([ctx])).logits[0, -1].argmax())
        word = tok.decode([best])
        if re.fullmatch(r" [A-Za-z]+", word) and tok.encode(context + word) == ctx + [best]:
            texts.append(context + word)
    assert len(texts) > 4, "no greedy passage found; change the seed"
    return texts


def test_lambada_equals_hf(pair, hf_tok):
    hf, ours = pair
    tok = get_tokenizer()
    texts = lambada_texts(hf, tok, seed=3)
    examples = evaluate.lambada_examples(texts)
    assert examples[2]["target"] == " Zyxomaticals" and len(tok.encode(" Zyxomaticals")) > 1
    assert examples[2]["context"] == texts[2][:texts[2].rindex(" ")]
    result = evaluate.lambada_score(ours, examples, tok, batch_size=3, progress=False)
    want = [hf_score(hf, hf_tok, ex["context"], ex["target"]) for ex in examples]
    got = result["examples"]
    assert [r["loglikelihood"] for r in got] == pytest.approx([w[0] for w in want], abs=1e-4)
    assert [r["greedy"] for r in got] == [w[1] for w in want]
    assert [r["index"] for r in got] == list(range(len(texts)))
    assert sum(w[1] for w in want) == len(texts) - 3            # the constructed ones
    assert result["acc"] == pytest.approx((len(texts) - 3) / len(texts))
    assert result["perplexity"] == pytest.approx(
        math.exp(-sum(w[0] for w in want) / len(texts)), rel=1e-6)


# ---- WikiText ---------------------------------------------------------------------------

def test_wikitext_detokenizer_by_hand():
    raw = (' Alpha was a 19th @-@ century ship , built in 1 @,@ 200 days . \n = = History = = '
           '\n It sailed ( in 1850 ) to " the north " . It \'s 3 @.@ 5 m \n')
    assert evaluate.wikitext_detokenize(raw) == (
        ' Alpha was a 19th-century ship, built in 1,200 days.\n== History ==\nIt sailed (in '
        '1850) to "the north". It\'s 3.5 m\n')


def test_wikitext_articles_split_at_titles_not_sections():
    text = " \n = A = \n x \n = = S = = \n y \n \n = B = \n z \n"
    assert eval_data.split_wikitext(text) == [" = A = \n x \n = = S = = \n y \n ",
                                              " = B = \n z \n"]


def test_rolling_windows_are_the_harness_s():
    # lm-eval's own example (tests/test_utils.py): 34 tokens, windows of 10, prefix -100,
    # made disjoint: each window predicts new tokens, the last one with more context
    assert evaluate.rolling_windows(list(range(34)), 10, -100) == [
        ([-100], list(range(10))), ([9], list(range(10, 20))), ([19], list(range(20, 30))),
        (list(range(23, 30)), list(range(30, 34)))]
    assert evaluate.rolling_windows(list(range(5)), 10, -1) == [([-1], [0, 1, 2, 3, 4])]
    assert evaluate.rolling_windows([], 10, -1) == []


WIKI = (" \n = Alpha Ship = \n \n Alpha was a 19th @-@ century ship , built in 1 @,@ 200 days . "
        "It sailed ( in 1850 ) to \" the north \" . \n \n = = History = = \n \n"
        + " The crew 's log says she carried 3 @.@ 5 tons of coal ; then ice . \n" * 8
        + " \n = Beta = \n \n Beta is short . \n \n = Gamma = \n \n Gamma : a river . \n")


def test_wikitext_equals_hf_rolling_loglikelihood(pair, hf_tok, tmp_path):
    hf, ours = pair
    (tmp_path / "wiki.test.raw").write_text(WIKI)
    docs = eval_data.read_wikitext(tmp_path / "wiki.test.raw")
    assert [d.split("\n")[0] for d in docs] == [" = Alpha Ship = ", " = Beta = ", " = Gamma = "]
    result = evaluate.wikitext_score(ours, docs, batch_size=2, progress=False)
    eot = hf_tok.eos_token_id
    lls = []
    for doc in docs:
        tokens = hf_tok.encode(evaluate.wikitext_detokenize(doc))
        ll = 0.0
        for start in range(0, len(tokens), MAX):    # each token predicted once, in chunks
            end = min(start + MAX, len(tokens))
            # the first chunk follows <|endoftext|>; a later one sees the MAX + 1 - n
            # tokens before it (one for a whole chunk, more for a short last one)
            context = [eot] if start == 0 else tokens[end - MAX - 1:start]
            ll += hf_score_ids(hf, context, tokens[start:end])[0]
        lls.append(ll)
    assert len(hf_tok.encode(evaluate.wikitext_detokenize(docs[0]))) > 2 * MAX
    got = result["examples"]
    assert [r["loglikelihood"] for r in got] == pytest.approx(lls, abs=1e-4)
    # words and bytes of the raw article, as lm-eval counts them
    assert (got[1]["words"], got[1]["bytes"]) == (9, len(docs[1]))
    assert docs[1] == " = Beta = \n \n Beta is short . \n "
    n_words = sum(len(re.split(r"\s+", d)) for d in docs)
    n_bytes = sum(len(d.encode()) for d in docs)
    assert result["word_perplexity"] == pytest.approx(math.exp(-sum(lls) / n_words), rel=1e-5)
    assert result["byte_perplexity"] == pytest.approx(math.exp(-sum(lls) / n_bytes), rel=1e-5)
    assert result["bits_per_byte"] == pytest.approx(-sum(lls) / n_bytes / math.log(2),
                                                    rel=1e-5)


# ---- files and the command line ---------------------------------------------------------

def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def run(args, capsys):
    """evaluate.main(args) -> (return value or exit code, stdout, stderr)."""
    try:
        value = evaluate.main([*args, "--no-progress", "--device", "cpu"])
    except SystemExit as e:
        value = e.code
    out, err = capsys.readouterr()
    return value, out, err


def test_cli_hellaswag_limit_and_json(tmp_path, hf_folder, capsys):
    data = write_jsonl(tmp_path / "hellaswag_val.jsonl", hellaswag_records(6, seed=4))
    out_json = tmp_path / "out" / "hellaswag.json"
    result, out, _ = run(["--weights", str(hf_folder), "--task", "hellaswag", "--data",
                          str(data), "--limit", "3", "--json", str(out_json)], capsys)
    assert out.splitlines()[-1] == (f"task=hellaswag n=3 acc={result['acc']:.4f} "
                                    f"acc_norm={result['acc_norm']:.4f}")
    saved = json.loads(out_json.read_text())
    assert list(saved) == ["task", "n", "acc", "acc_norm", "weights", "data", "examples"]
    assert (saved["task"], saved["n"], saved["acc"]) == ("hellaswag", 3, result["acc"])
    assert [e["index"] for e in saved["examples"]] == [0, 1, 2]
    assert set(saved["examples"][0]) == {"index", "loglikelihoods", "label", "pred",
                                         "pred_norm"}
    assert saved["examples"] == result["examples"]
    # the first three examples alone give the same numbers
    three = evaluate.hellaswag_examples(hellaswag_records(6, seed=4))[:3]
    again = evaluate.hellaswag_score(load_model(hf_folder), three, progress=False)
    for a, b in zip(again["examples"], saved["examples"]):
        assert a["loglikelihoods"] == pytest.approx(b["loglikelihoods"], abs=1e-5)


def test_cli_lambada_and_wikitext_last_lines(tmp_path, hf_folder, capsys):
    data = write_jsonl(tmp_path / "lambada_test.jsonl",
                       [{"text": "the man went to the park and saw a dog"},
                        {"text": "she opened the door and said hello"}])
    result, out, _ = run(["--weights", str(hf_folder), "--task", "lambada", "--data",
                          str(data)], capsys)
    assert out.splitlines() == ["lambada: 2 examples from " + str(data),
                                f"task=lambada n=2 acc={result['acc']:.4f} "
                                f"perplexity={result['perplexity']:.4f}"]
    (tmp_path / "wiki.test.raw").write_text(WIKI)
    result, out, _ = run(["--weights", str(hf_folder), "--task", "wikitext", "--data",
                          str(tmp_path / "wiki.test.raw"), "--limit", "2"], capsys)
    assert result["n"] == 2
    assert out.splitlines()[-1] == (
        f"task=wikitext n=2 word_perplexity={result['word_perplexity']:.4f} "
        f"byte_perplexity={result['byte_perplexity']:.4f} "
        f"bits_per_byte={result['bits_per_byte']:.6f}")


@pytest.mark.parametrize("args, message", [
    (["--task", "hellaswag", "--limit", "0"], "--limit must be >= 1, got 0"),
    (["--task", "lambada", "--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    ([], "give --task hellaswag|lambada|wikitext, or --data FILE (a text to score)"),
    (["--data", "x.jsonl"], "--data x.jsonl looks like a benchmark's file; say which with "
                            "--task hellaswag, --task lambada or --task wikitext (--task "
                            "perplexity scores it as plain text)"),
    (["--task", "wikitext", "--stride", "8"],
     "--stride is for the perplexity of a text; --task wikitext scores whole inputs"),
    (["--data", "x.txt", "--limit", "5"],
     "--limit counts a task's examples; to score less of a text, shorten the file"),
])
def test_bad_flags_are_one_line_errors(args, message, capsys):
    code, _, err = run(["--weights", "nowhere.pth", *args], capsys)
    assert code == 2 and err == f"error: {message}\n"


def test_wrong_or_empty_files_are_one_line_errors(tmp_path, hf_folder, capsys):
    lambada = write_jsonl(tmp_path / "lambada_test.jsonl", [{"text": "a b c"}])
    hellaswag = write_jsonl(tmp_path / "h.jsonl", hellaswag_records(1, seed=0))
    (tmp_path / "empty.jsonl").write_text("\n \n")
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"text": broken\n')
    (tmp_path / "story.txt").write_text("Once upon a time.\n")
    hs_format = ("--task hellaswag reads hellaswag_val.jsonl's format: one JSON object a line "
                 "with activity_label, ctx_a, ctx_b, endings (4) and label (0-3)")
    lb_format = ('--task lambada reads lambada_test.jsonl\'s format: one {"text": "..."} a '
                 'line, the passage whose last word is to be predicted')
    cases = [
        ("hellaswag", lambada, f"{lambada} line 1 is not a HellaSwag example: it has no "
                               f"'activity_label' (its fields: text); {hs_format}"),
        ("lambada", hellaswag, f"{hellaswag} line 1 is not a LAMBADA passage: it has no 'text' "
                               f"(its fields: {', '.join(BAKING)}); {lb_format}"),
        ("hellaswag", tmp_path / "empty.jsonl", f"{tmp_path / 'empty.jsonl'} is empty; "
                                                f"{hs_format}"),
        ("lambada", tmp_path / "bad.jsonl", f"{tmp_path / 'bad.jsonl'} line 2 is not JSON "
                                            f"(Expecting value); {lb_format}"),
        ("wikitext", tmp_path / "story.txt",
         f"{tmp_path / 'story.txt'} has no ' = Title = ' line, so no article; --task wikitext "
         f"reads wikitext-2-raw's wiki.test.raw (or the wikitext-2-raw-v1.zip holding it): "
         f"articles that start at ' = Title = ' lines"),
        ("hellaswag", tmp_path / "missing.jsonl",
         f"{tmp_path / 'missing.jsonl'} does not exist; {hs_format}"),
    ]
    for task, path, message in cases:
        code, out, err = run(["--weights", str(hf_folder), "--task", task, "--data",
                              str(path)], capsys)
        assert (code, err, out) == (2, f"error: {message}\n", ""), task


def test_a_stride_longer_than_the_context_is_refused(tmp_path, hf_folder, capsys):
    text = tmp_path / "t.txt"
    text.write_text(default_corpus_text()[:2000])
    code, _, err = run(["--weights", str(hf_folder), "--data", str(text), "--context-length",
                        "32", "--stride", "40"], capsys)
    # (the loaders' progress bars come first on stderr)
    assert (code, err.splitlines()[-1]) == (
        2, "error: --stride 40 is larger than the context (32 tokens): 8 tokens between "
           "windows would never be scored; use --stride 32 or less")
    # without --context-length the context is the model's: 48
    code, _, err = run(["--weights", str(hf_folder), "--data", str(text), "--stride", "49"],
                       capsys)
    assert code == 2 and "--stride 49 is larger than the context (48 tokens)" in err
    result, _, _ = run(["--weights", str(hf_folder), "--data", str(text), "--stride", "47"],
                       capsys)
    assert result["tokens"] == len(get_tokenizer().encode(text.read_text())) - 1


def test_ctrl_c_ends_with_one_line_and_exit_130(tmp_path, hf_folder):
    data = write_jsonl(tmp_path / "h.jsonl", hellaswag_records(3, seed=0) * 5000)
    proc = subprocess.Popen(
        [sys.executable, "-u", str(ROOT / "evaluate.py"), "--weights", str(hf_folder),
         "--task", "hellaswag", "--data", str(data), "--no-progress", "--device", "cpu",
         "--batch-size", "1", "--json", str(tmp_path / "out.json")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    first = proc.stdout.readline()          # printed once the model is loaded, before scoring
    assert first == f"hellaswag: 20000 examples from {data}\n"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert err.splitlines()[-1] == "interrupted: no results were written"
    assert "Traceback" not in err and out == ""
    assert not (tmp_path / "out.json").exists()


# ---- downloads ---------------------------------------------------------------------------

class Server(ThreadingHTTPServer):
    """Serves ``files`` ({path: bytes}) with Range support. Paths in ``cut_once`` close
    after half the body once; ``wrong_once`` send other bytes of the same length once;
    ``wrong_always`` every time. ``gets`` records (path, Range header)."""

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.files, self.gets = {}, []
        self.cut_once, self.wrong_once, self.wrong_always = set(), set(), set()

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        server, rng = self.server, self.headers.get("Range")
        server.gets.append((self.path, rng))
        body = server.files.get(self.path)
        if body is None or len(server.gets) > 40:
            self.send_error(404)
            return
        if self.path in server.wrong_once | server.wrong_always:
            server.wrong_once.discard(self.path)
            body = bytes(b ^ 0x20 for b in body)          # same length, other bytes
        start = int(rng.removeprefix("bytes=").split("-")[0]) if rng else 0
        self.send_response(206 if rng else 200)
        if rng:
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        if self.path in server.cut_once:
            server.cut_once.discard(self.path)
            self.wfile.write(body[start:start + (len(body) - start) // 2])
            self.close_connection = True
            return
        self.wfile.write(body[start:])


@pytest.fixture
def server():
    s = Server()
    threading.Thread(target=s.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield s
    s.shutdown()
    s.server_close()


LAMBADA_BYTES = b"".join(json.dumps({"text": f"passage {i} ends with word{i}"}).encode() + b"\n"
                         for i in range(20000))


@pytest.fixture
def lambada_source(server, monkeypatch):
    """The lambada task's file served locally; the table holds its size and sha256."""
    server.files["/gpt-2/lambada_test.jsonl"] = LAMBADA_BYTES
    monkeypatch.setitem(eval_data.TASK_FILES, "lambada", eval_data.TaskFile(
        "lambada_test.jsonl", f"{server.url}/gpt-2/lambada_test.jsonl", len(LAMBADA_BYTES),
        hashlib.sha256(LAMBADA_BYTES).hexdigest(), "this test"))
    return server


def test_task_file_downloads_once_and_checks_it(tmp_path, lambada_source):
    path = eval_data.task_file("lambada", tmp_path / "eval")
    assert path == tmp_path / "eval" / "lambada_test.jsonl"
    assert path.read_bytes() == LAMBADA_BYTES
    assert eval_data.read_lambada(path)[1] == "passage 1 ends with word1"
    lambada_source.gets.clear()
    assert eval_data.task_file("lambada", tmp_path / "eval") == path
    assert lambada_source.gets == []


def test_a_cut_download_resumes(tmp_path, lambada_source):
    lambada_source.cut_once.add("/gpt-2/lambada_test.jsonl")
    path = eval_data.task_file("lambada", tmp_path, backoff=0.01)
    (first, r1), (second, r2) = lambada_source.gets
    assert r1 is None and 0 < int(r2.removeprefix("bytes=").removesuffix("-")) < len(
        LAMBADA_BYTES)
    assert path.read_bytes() == LAMBADA_BYTES and not list(tmp_path.glob("*.part"))


def test_a_wrong_download_is_deleted_and_fetched_again(tmp_path, lambada_source, capsys):
    lambada_source.wrong_once.add("/gpt-2/lambada_test.jsonl")
    path = eval_data.task_file("lambada", tmp_path, backoff=0.01)
    assert path.read_bytes() == LAMBADA_BYTES
    assert len(lambada_source.gets) == 2 and lambada_source.gets[1][1] is None   # from zero
    assert "its sha256 is " in capsys.readouterr().err


def test_a_download_that_stays_wrong_leaves_nothing(tmp_path, lambada_source):
    lambada_source.wrong_always.add("/gpt-2/lambada_test.jsonl")
    with pytest.raises(OSError, match=r"^could not download lambada_test\.jsonl: .*start "
                                      r"again from zero 3 times \(last: its sha256 is [0-9a-f]+, "
                                      r"not the expected .*--data-url.*offline.*--data FILE") as e:
        eval_data.task_file("lambada", tmp_path, retries=2, backoff=0.01)
    assert "\n" not in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_a_wrong_size_is_refused_before_the_body(tmp_path, lambada_source, monkeypatch):
    spec = eval_data.TASK_FILES["lambada"]
    monkeypatch.setitem(eval_data.TASK_FILES, "lambada", eval_data.TaskFile(
        spec.name, spec.url, spec.size + 1, spec.sha256, "this test"))
    with pytest.raises(OSError, match=rf"announced {spec.size} bytes where the file has "
                                      rf"{spec.size + 1}"):
        eval_data.task_file("lambada", tmp_path, retries=1, backoff=0.01)
    assert list(tmp_path.iterdir()) == []


def test_offline_says_what_to_do(tmp_path, monkeypatch):
    with socket.socket() as s:           # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setitem(eval_data.TASK_FILES, "hellaswag", eval_data.TaskFile(
        "hellaswag_val.jsonl", f"http://127.0.0.1:{port}/h.jsonl", 10, "0" * 64, "test"))
    with pytest.raises(OSError) as e:
        eval_data.task_file("hellaswag", tmp_path / "eval", retries=1, backoff=0.01)
    message = str(e.value)
    assert message.startswith("could not download hellaswag_val.jsonl: downloading "
                              f"http://127.0.0.1:{port}/h.jsonl failed 2 times in a row")
    assert message.endswith(f"If this machine is offline, fetch http://127.0.0.1:{port}/h.jsonl "
                            f"on one that is not and pass it with --data FILE, or put it at "
                            f"{tmp_path / 'eval' / 'hellaswag_val.jsonl'}")
    assert "\n" not in message


def test_cli_downloads_into_data_eval_once(tmp_path, hf_folder, lambada_source, monkeypatch,
                                           capsys):
    monkeypatch.chdir(tmp_path)
    args = ["--weights", str(hf_folder), "--task", "lambada", "--limit", "2"]
    result, out, _ = run(args, capsys)
    assert (tmp_path / "data" / "eval" / "lambada_test.jsonl").read_bytes() == LAMBADA_BYTES
    assert result["n"] == 2 and out.splitlines()[-1].startswith("task=lambada n=2 acc=")
    lambada_source.gets.clear()
    again, _, _ = run(args, capsys)
    assert lambada_source.gets == [] and again["perplexity"] == result["perplexity"]
    # a mirror: the same checks, another host
    (tmp_path / "data" / "eval" / "lambada_test.jsonl").unlink()
    mirror = f"{lambada_source.url}/mirror/lambada_test.jsonl"
    lambada_source.files["/mirror/lambada_test.jsonl"] = LAMBADA_BYTES
    run([*args, "--data-url", mirror], capsys)
    assert lambada_source.gets == [("/mirror/lambada_test.jsonl", None)]
