"""How good is a model? Its perplexity on a text, and its scores on GPT-2's benchmarks.

    python evaluate.py --weights model_weights/trained_gpt2.pth --data data/test.txt
    python evaluate.py --weights 124M --task hellaswag            # 10,042 examples; acc, acc_norm
    python evaluate.py --weights 124M --task lambada              # 5,153 passages; acc, perplexity
    python evaluate.py --weights 124M --task wikitext             # word_perplexity, bits_per_byte
    python evaluate.py --weights model_weights/classifier.pth --task classify --data test.tsv

Every benchmark here is one computation: the log-likelihood of a *continuation* after a
*context*, log p(continuation | context) = the sum of log p(token | everything before it) over
the continuation's tokens. The tasks differ only in what they ask of it, scored exactly as
EleutherAI's lm-evaluation-harness scores them, so that the numbers sit beside its tables:

    hellaswag   4 endings per context; acc: the most likely ending is the right one,
                acc_norm: the same with each log-likelihood divided by the ending's characters
    lambada     the last word of a passage; acc: every token of it is the model's first
                choice (greedy), perplexity: exp(-mean log-likelihood of the word)
    wikitext    whole articles, in windows of the context length; perplexity per word and
                per byte, bits per byte
    perplexity  (a text file) strided windows: loss, perplexity, bits per byte

A classifier (classify.py) is scored on labelled texts instead (--task classify): accuracy,
each class's precision, recall and F1, and the confusion matrix (classification_scores).

Texts longer than the context keep their last ``context_length`` tokens. ``loglikelihood``
is the plain computation, one forward pass per (context, continuation); engine/scoring.py
gets the same numbers in batches, a context once for all its continuations. The benchmark
files are downloaded once into data/eval/ and checked (engine/eval_data.py). The last line
printed is ``task=... n=... <metrics>`` (for a text: ``loss=... perplexity=... ...``);
``--json`` writes every number and each example's log-likelihoods. From Python:

    examples = load_examples("hellaswag", limit=500)
    hellaswag_score(model, examples)       # {"task", "n", "acc", "acc_norm", "examples"}

Perplexity of a text: a model sees at most ``context_length`` tokens at once, so a long text
is scored in windows (the strided evaluation of transformers' guide "Perplexity of
fixed-length models"). Windows of ``context_length`` tokens start every ``stride`` tokens, and
each scores only the targets the window before it did not: with ``stride < context_length``
every token after the first is predicted exactly once, each with at least ``context_length -
stride`` tokens before it. A smaller stride gives every prediction more context (a lower,
fairer perplexity) and costs more forward passes. Its last line:

    loss=X perplexity=Y bits_per_byte=Z tokens=N

loss is the mean negative log-likelihood per scored token (nats), perplexity exp(loss),
bits_per_byte the same total in bits over the UTF-8 bytes of the scored tokens (comparable
across tokenizers), N the number of tokens scored.
"""

import argparse
import json
import math
import re
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from classify import class_probabilities, load_classifier, read_labelled
from dataset import get_tokenizer, load_tokens
from engine import eval_data, scoring
from engine.devices import get_device
from engine.fileio import atomic_write, check_output
from model import DTYPES
from model_sources import SOURCES_HELP, load_model_and_tokenizer

TASKS = ("hellaswag", "lambada", "wikitext")


def strided_windows(n_tokens, context_length, stride):
    """[(begin, end, n_scored)]: window tokens[begin:end] scores its last n_scored targets.

    The first window scores every target it has (end - 1: the first token has nothing
    before it); each later one the targets after the previous window's end. The last
    window ends at the end of the text and may be shorter than context_length.
    """
    if n_tokens < 2:
        raise ValueError(f"the text has {n_tokens} token(s); perplexity needs at least 2")
    if stride > context_length:
        # windows would leave gaps: the tokens between two of them never scored
        raise ValueError(f"--stride {stride} is larger than the context ({context_length} "
                         f"tokens): {stride - context_length} tokens between windows would never "
                         f"be scored; use --stride {context_length} or less")
    windows, scored_until = [], 1          # tokens[:scored_until] need no (more) score
    for begin in range(0, n_tokens, stride):
        end = min(begin + context_length, n_tokens)
        first = max(scored_until, begin + 1)           # a window's first token has no target
        if end > first:
            windows.append((begin, end, end - first))
        scored_until = max(scored_until, end)
        if end == n_tokens:
            break
    return windows


def _max_length(model, context_length):
    """The tokens one input may hold: ``context_length`` or the model's whole context."""
    have = model.cfg["context_length"]
    context_length = context_length or have
    if have < 2:
        raise ValueError(f"the model has a {have}-token context, and scoring needs at least 2 "
                         f"(a token, and the one it predicts); train it with --context-length "
                         f"2 or more")
    if not 1 < context_length <= have:
        raise ValueError(f"context_length must be in 2..{have} (the model's), "
                         f"got {context_length}")
    return context_length


@torch.no_grad()
def evaluate_perplexity(model, tokens, context_length=None, stride=None, batch_size=4,
                        tokenizer=None, progress=True):
    """Strided sliding-window loss of ``model`` on ``tokens`` (a 1-D sequence of ids).

    ``context_length`` defaults to the model's, ``stride`` to half of it. Returns
    ``{"loss", "perplexity", "bits_per_byte", "tokens"}`` (bits_per_byte needs the
    ``tokenizer``, default GPT-2's).
    """
    context_length = _max_length(model, context_length)
    stride = stride or max(1, context_length // 2)
    if not 1 <= stride:
        raise ValueError(f"stride must be >= 1, got {stride}")
    tokens = torch.as_tensor(np.asarray(tokens, dtype=np.int64))               # (N,)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    windows = strided_windows(len(tokens), context_length, stride)
    total_nll, scored = 0.0, []
    bar = tqdm(total=len(windows), desc="evaluating", unit="window", disable=not progress)
    # windows of the same length go through the model together
    for length in dict.fromkeys(end - begin for begin, end, _ in windows):
        same = [w for w in windows if w[1] - w[0] == length]
        for i in range(0, len(same), batch_size):
            group = same[i:i + batch_size]
            x = torch.stack([tokens[b:e] for b, e, _ in group]).to(device)     # (B, L)
            h = model.hidden_states(x)                                         # (B, L, C)
            for row, (_, end, n) in enumerate(group):
                # the logits at positions L-1-n .. L-2 predict the last n tokens
                logits = model.logits(h[row, length - 1 - n:length - 1])       # (n, vocab)
                targets = tokens[end - n:end]
                total_nll += F.cross_entropy(logits.float(), targets.to(device),
                                             reduction="sum").item()
                scored.append(targets)
            bar.update(len(group))
    bar.close()
    model.train(was_training)
    scored = torch.cat(scored)
    loss = total_nll / len(scored)
    tokenizer = tokenizer or get_tokenizer()
    token_bytes = torch.tensor([len(tokenizer.decode_single_token_bytes(i))    # (vocab,)
                                for i in range(tokenizer.n_vocab)])
    n_bytes = int(token_bytes[scored].sum())
    return {"loss": loss, "perplexity": math.exp(loss),
            "bits_per_byte": total_nll / math.log(2) / n_bytes, "tokens": len(scored)}


# ---------------------------------------------------------------------------------------
# The one computation: log p(continuation | context)

def encode_pair(tokenizer, context, continuation):
    """(context ids, continuation ids) as lm-evaluation-harness makes them.

    Spaces at the end of the context move to the front of the continuation (GPT-2's BPE
    glues a space to the word after it). The continuation's ids are those of the whole
    text after the context's own ids: tokenizing context + continuation together gives the
    tokens the model would have seen in running text. An empty context is ``<|endoftext|>``,
    so that the first token has something to be predicted from.
    """
    encode = lambda text: tokenizer.encode(text, allowed_special="all")
    if not context:
        return [tokenizer.eot_token], encode(continuation)
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    context_ids = encode(context)
    return context_ids, encode(context + continuation)[len(context_ids):]


@torch.no_grad()
def loglikelihood(model, context, continuation, max_length):
    """(log p(continuation | context), greedy) for token ids, the plain way: one forward pass
    (``model`` in eval mode).

    The input is the last ``max_length`` tokens of context + continuation without its last
    token (which is only predicted): a text longer than the context keeps its end. The
    logits at the last len(continuation) positions predict the continuation's tokens;
    greedy: each of them is the most likely token there.
    """
    device = next(model.parameters()).device
    x = torch.tensor((context + continuation)[-(max_length + 1):][:-1], device=device)[None]
    n = len(continuation)
    logits = model(x)[0, -n:].float()                                      # (n, vocab)
    target = torch.tensor(continuation, device=device)                     # (n,)
    logp = torch.log_softmax(logits, -1)[torch.arange(n, device=device), target]   # (n,)
    return float(logp.double().sum()), bool((logits.argmax(-1) == target).all())


@torch.no_grad()
def loglikelihoods(model, requests, batch_size=8, context_length=None, progress=False,
                   desc="scoring"):
    """log p(continuation | context) for token-id requests [(context, [continuation, ...])].

    Returns, per request, a list of (log-likelihood, greedy) per continuation (greedy: every
    continuation token is the model's most likely next token). The model's training mode is
    restored after.
    """
    max_length = _max_length(model, context_length)
    for r, (context, continuations) in enumerate(requests):
        if not context or not continuations or not all(continuations):
            raise ValueError(f"request {r}: the context and every continuation need a token")
        if max(map(len, continuations)) > max_length:
            raise ValueError(f"request {r}: a continuation of {max(map(len, continuations))} "
                             f"tokens does not fit in the context ({max_length} tokens)")
    was_training = model.training
    model.eval()
    bar = tqdm(total=sum(len(conts) for _, conts in requests), desc=desc, unit="continuation",
               disable=not progress)
    try:
        # fast path: batches, each context once for all its continuations (engine/scoring.py)
        results = scoring.batched_loglikelihoods(model, requests, batch_size, max_length, bar)
        if results is None:
            results = []
            for context, continuations in requests:
                results.append([loglikelihood(model, context, c, max_length)
                                for c in continuations])
                bar.update(len(continuations))
    finally:
        bar.close()
        model.train(was_training)
    return results


# What a task predicts after its context: it must fit the context to be scored at all
# (a longer context loses its start, as in lm-eval; a longer continuation cannot be cut).
CONTINUATION = {"hellaswag": "an ending", "lambada": "a last word"}


def check_fit(task, examples, requests, max_length):
    """Raise ValueError naming the first example whose continuation is longer than
    ``max_length`` tokens, and what to do, before any scoring."""
    for ex, (_, continuations) in zip(examples, requests):
        n = max(map(len, continuations))
        if n > max_length:
            i = ex["index"]
            before = f", or score only the examples before it (--limit {i})" if i else ""
            raise ValueError(
                f"{task} example {i} (counting from 0) has {CONTINUATION[task]} of {n} "
                f"tokens, more than the {max_length}-token context holds, so it cannot be "
                f"scored; use a model with a longer context (or a larger --context-length, "
                f"up to the model's){before}")


# ---------------------------------------------------------------------------------------
# HellaSwag: which of four endings continues the story?

def hellaswag_preprocess(text):
    """lm-evaluation-harness's cleaning of HellaSwag text (its WikiHow half carries tags)."""
    text = text.strip().replace(" [title]", ". ")    # a WikiHow title ends a sentence
    text = re.sub(r"\[.*?\]", "", text)              # other tags go: [header], [step], ...
    return text.replace("  ", " ")


def hellaswag_examples(records):
    """File records (engine.eval_data.read_hellaswag) -> {"index", "query", "choices",
    "label"}: the context is activity label, ctx_a and ctx_b (its first letter capitalised,
    the rest lower-cased, as str.capitalize does), and each ending is cleaned the same way."""
    return [{"index": i,
             "query": hellaswag_preprocess(f"{r['activity_label']}: {r['ctx_a']} "
                                           f"{r['ctx_b'].capitalize()}"),
             "choices": [hellaswag_preprocess(e) for e in r["endings"]],
             "label": int(r["label"])} for i, r in enumerate(records)]


def _argmax(values):
    return max(range(len(values)), key=values.__getitem__)     # the first of equal ones


def hellaswag_requests(examples, tokenizer):
    """(context ids, [the ids of each ending]) per example: " " + ending after the query."""
    requests = []
    for ex in examples:
        pairs = [encode_pair(tokenizer, ex["query"], " " + c) for c in ex["choices"]]
        requests.append((pairs[0][0], [cont for _, cont in pairs]))
    return requests


def hellaswag_score(model, examples, tokenizer=None, batch_size=8, progress=True,
                    context_length=None):
    """acc and acc_norm of ``model`` on HellaSwag ``examples`` (from hellaswag_examples).

    Each ending is the continuation " " + ending of the query; acc: the ending with the
    highest log-likelihood is the label; acc_norm: the highest log-likelihood per character
    of the ending (long endings are not punished for having more tokens).
    """
    requests = hellaswag_requests(examples, tokenizer or get_tokenizer())
    check_fit("hellaswag", examples, requests, _max_length(model, context_length))
    scores = loglikelihoods(model, requests, batch_size, context_length, progress, "hellaswag")
    rows = []
    for ex, score in zip(examples, scores):
        lls = [ll for ll, _ in score]
        per_char = [ll / len(c) if c else -math.inf for ll, c in zip(lls, ex["choices"])]
        rows.append({"index": ex["index"], "loglikelihoods": lls, "label": ex["label"],
                     "pred": _argmax(lls), "pred_norm": _argmax(per_char)})
    n = len(rows)
    return {"task": "hellaswag", "n": n,
            "acc": sum(r["pred"] == r["label"] for r in rows) / n,
            "acc_norm": sum(r["pred_norm"] == r["label"] for r in rows) / n,
            "examples": rows}


# ---------------------------------------------------------------------------------------
# LAMBADA: the last word of a passage

def lambada_examples(texts):
    """Passages -> {"index", "context", "target"}: the text up to its last space, and " " +
    the last word (split at single spaces, as lm-eval's lambada_openai does)."""
    out = []
    for i, text in enumerate(texts):
        words = text.split(" ")
        out.append({"index": i, "context": " ".join(words[:-1]), "target": " " + words[-1]})
    return out


def lambada_requests(examples, tokenizer):
    """(context ids, [the last word's ids]) per passage."""
    return [(context, [target]) for context, target in
            (encode_pair(tokenizer, ex["context"], ex["target"]) for ex in examples)]


def lambada_score(model, examples, tokenizer=None, batch_size=8, progress=True,
                  context_length=None):
    """acc (the whole word is the greedy prediction) and perplexity (exp of minus the mean
    log-likelihood of the word) of ``model`` on LAMBADA ``examples`` (lambada_examples)."""
    requests = lambada_requests(examples, tokenizer or get_tokenizer())
    check_fit("lambada", examples, requests, _max_length(model, context_length))
    scores = loglikelihoods(model, requests, batch_size, context_length, progress, "lambada")
    rows = [{"index": ex["index"], "loglikelihood": s[0][0], "greedy": s[0][1]}
            for ex, s in zip(examples, scores)]
    n = len(rows)
    return {"task": "lambada", "n": n, "acc": sum(r["greedy"] for r in rows) / n,
            "perplexity": math.exp(-sum(r["loglikelihood"] for r in rows) / n),
            "examples": rows}


# ---------------------------------------------------------------------------------------
# WikiText: whole articles, perplexity per word and per byte

def wikitext_detokenize(text):
    """Undo WikiText's tokenization (" @-@ ", " , ", spaced brackets and quotes, ...) as
    lm-eval's wikitext task does before scoring, so the model reads ordinary text."""
    text = text.replace("s '", "s'")
    text = re.sub(r"/' [0-9]/", r"/'[0-9]/", text)    # as lm-eval has it (matches ~nothing)
    for spaced, plain in ((" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."), (" : ", ": "),
                          (" ; ", "; "), (" . ", ". "), (" ! ", "! "), (" ? ", "? "),
                          (" , ", ", ")):
        text = text.replace(spaced, plain)
    # spaces just inside brackets and quotes
    text = re.sub(r"\(\s*([^\)]*?)\s*\)", r"(\1)", text)
    text = re.sub(r"\[\s*([^\]]*?)\s*\]", r"[\1]", text)
    text = re.sub(r"{\s*([^}]*?)\s*}", r"{\1}", text)
    text = re.sub(r"\"\s*([^\"]*?)\s*\"", r'"\1"', text)
    text = re.sub(r"'\s*([^']*?)\s*'", r"'\1'", text)
    for spaced, plain in (("= = = =", "===="), ("= = =", "==="), ("= =", "=="),
                          (" \N{DEGREE SIGN} ", "\N{DEGREE SIGN}"), (" \n", "\n"),
                          ("\n ", "\n"), (" N ", " 1 "), (" 's", "'s")):
        text = text.replace(spaced, plain)
    return text


def rolling_windows(tokens, max_length, prefix_token):
    """A text of any length as (context, continuation) requests that predict each token once.

    lm-eval's rolling windows (loglikelihood_rolling): the first predicts the first
    ``max_length`` tokens after ``prefix_token`` (<|endoftext|>), each next one the next
    ``max_length`` tokens after the one token before them; the last, shorter one takes as
    much earlier text as fits.
    """
    if not tokens:
        return []
    first = min(max_length, len(tokens))
    windows, done = [([prefix_token], tokens[:first])], first
    while done < len(tokens):
        n = min(len(tokens) - done, max_length)
        end = done + n
        windows.append((tokens[end - max_length - 1:end - n], tokens[end - n:end]))
        done = end
    return windows


def wikitext_score(model, documents, tokenizer=None, batch_size=8, progress=True,
                   context_length=None):
    """word_perplexity, byte_perplexity and bits_per_byte of ``model`` on WikiText articles
    (``documents``: their raw text). Each article is detokenized and scored whole in
    rolling windows; words and bytes are counted in the raw text, as lm-eval counts them."""
    tokenizer = tokenizer or get_tokenizer()
    max_length = _max_length(model, context_length)
    requests, owner, n_tokens = [], [], []
    for d, page in enumerate(documents):
        tokens = tokenizer.encode(wikitext_detokenize(page), allowed_special="all")
        n_tokens.append(len(tokens))
        for context, continuation in rolling_windows(tokens, max_length, tokenizer.eot_token):
            requests.append((context, [continuation]))
            owner.append(d)
    scores = loglikelihoods(model, requests, batch_size, max_length, progress, "wikitext")
    lls = [0.0] * len(documents)
    for d, s in zip(owner, scores):
        lls[d] += s[0][0]
    rows = [{"index": d, "loglikelihood": lls[d], "words": len(re.split(r"\s+", page)),
             "bytes": len(page.encode("utf-8")), "tokens": n_tokens[d]}
            for d, page in enumerate(documents)]
    nll = -sum(lls)
    words, n_bytes = sum(r["words"] for r in rows), sum(r["bytes"] for r in rows)
    return {"task": "wikitext", "n": len(rows), "word_perplexity": math.exp(nll / words),
            "byte_perplexity": math.exp(nll / n_bytes),
            "bits_per_byte": nll / n_bytes / math.log(2), "examples": rows}


# ---------------------------------------------------------------------------------------
# Files, the command line

SCORERS = {"hellaswag": hellaswag_score, "lambada": lambada_score, "wikitext": wikitext_score}
REQUESTS = {"hellaswag": hellaswag_requests, "lambada": lambada_requests}   # wikitext: any fits


def load_examples(task, path=None, limit=None, folder="data/eval", url=None):
    """The examples of ``task`` ("hellaswag", "lambada" or "wikitext": articles) from
    ``path``, or from the official file (downloaded once into ``folder``, from ``url`` if
    given: a mirror); the first ``limit`` of them if given."""
    if task not in SCORERS:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int)
                              or limit < 1):
        raise ValueError(f"--limit must be a whole number >= 1, got {limit!r}")
    path = Path(path) if path else eval_data.task_file(task, folder, url)
    if task == "hellaswag":
        examples = hellaswag_examples(eval_data.read_hellaswag(path))
    elif task == "lambada":
        examples = lambada_examples(eval_data.read_lambada(path))
    else:
        examples = eval_data.read_wikitext(path)
    return examples[:limit]


# The number a training run's evaluation line and plot show for each task
MAIN_METRIC = {"hellaswag": "acc_norm", "lambada": "acc", "wikitext": "word_perplexity"}


def parse_task(spec):
    """``"hellaswag:200"`` -> ("hellaswag", 200): train.py's --eval-task (HellaSwag and
    LAMBADA: 200 examples when no count is given, WikiText: 4 articles)."""
    task, _, count = str(spec).partition(":")
    if task not in SCORERS or (count and not (count.isdigit() and int(count) > 0)):
        raise ValueError(f"--eval-task {spec!r}: give a task of {', '.join(TASKS)}, optionally "
                         f"with the number of examples to score, e.g. hellaswag:200")
    return task, int(count) if count else (4 if task == "wikitext" else 200)


def task_scorer(spec, tokenizer=None, path=None, batch_size=8, context_length=None):
    """``"hellaswag:200"`` -> score(model) -> {metric: value} on the task's first 200 examples
    (parse_task), loaded once here (downloaded on first use): what train.py --eval-task runs
    at every evaluation. ``score.task`` and ``score.main`` name the task and its headline
    metric. With ``context_length`` (the model's), examples that cannot be scored in it are
    left out here, before any training, with one line saying how many and which first;
    none left is a ValueError."""
    task, limit = parse_task(spec)
    examples = load_examples(task, path, limit)
    if context_length is not None and task in REQUESTS:
        requests = REQUESTS[task](examples, tokenizer or get_tokenizer())
        lengths = [max(map(len, continuations)) for _, continuations in requests]
        long = [i for i, n in enumerate(lengths) if n > context_length]
        if long:
            kept = [ex for ex, n in zip(examples, lengths) if n <= context_length]
            what = (f"{len(long)} of its {len(examples)} examples do not fit the "
                    f"{context_length}-token context (the first: example "
                    f"{examples[long[0]]['index']}, with {CONTINUATION[task]} of "
                    f"{lengths[long[0]]} tokens)")
            if not kept:
                raise ValueError(f"--eval-task {spec}: {what}, so none can be scored; use a "
                                 f"model with a longer context, or another task")
            print(f"note: --eval-task {spec}: {what} and are left out: {len(kept)} are scored")
            examples = kept

    def score(model):
        result = SCORERS[task](model, examples, tokenizer, batch_size, progress=False)
        return {k: v for k, v in result.items() if k not in ("task", "examples")}

    score.task, score.main = task, MAIN_METRIC[task]
    return score


def summary_line(result):
    """``task=hellaswag n=10042 acc=0.2892 acc_norm=0.3114``: the last line printed."""
    metrics = {k: v for k, v in result.items() if k not in ("task", "n", "examples")}
    return " ".join([f"task={result['task']}", f"n={result['n']}"]
                    + [f"{k}={v:.4f}" if k != "bits_per_byte" else f"{k}={v:.6f}"
                       for k, v in metrics.items()])


def classification_scores(model, records, tokenizer=None, batch_size=16):
    """A classifier's scores on labelled records ({"text", "label"}, classify.read_labelled):
    {"task": "classify", "n", "accuracy", "macro_f1", "labels", "per_class": {label:
    {"precision", "recall", "f1", "support"}}, "confusion": rows of true classes, columns of
    predicted ones, "examples": [{"text", "label", "predicted", "probabilities"}]}. A class
    never predicted has precision 0 (and never present, recall 0), as scikit-learn's do."""
    labels = model.cfg["labels"]
    unknown = sorted({r["label"] for r in records} - set(labels))
    if unknown:
        raise ValueError(f"labels {unknown} are not the classifier's classes {labels}")
    probs = class_probabilities(model, [r["text"] for r in records], tokenizer, batch_size)
    truth, predicted = [labels.index(r["label"]) for r in records], probs.argmax(-1).tolist()
    confusion = [[0] * len(labels) for _ in labels]
    for t, p in zip(truth, predicted):
        confusion[t][p] += 1
    per_class = {}
    for k, name in enumerate(labels):
        right, said, there = confusion[k][k], sum(row[k] for row in confusion), sum(confusion[k])
        precision, recall = right / said if said else 0.0, right / there if there else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[name] = {"precision": precision, "recall": recall, "f1": f1, "support": there}
    return {"task": "classify", "n": len(records),
            "accuracy": sum(confusion[k][k] for k in range(len(labels))) / max(1, len(records)),
            "macro_f1": sum(c["f1"] for c in per_class.values()) / len(labels), "labels": labels,
            "per_class": per_class, "confusion": confusion,
            "examples": [{"text": r["text"], "label": r["label"], "predicted": labels[p],
                          "probabilities": row} for r, p, row in zip(records, predicted,
                                                                     probs.tolist())]}


def _classify_cli(args):
    """evaluate.py --task classify --data FILE: the table, the confusion matrix, the line."""
    if args.data is None:
        raise ValueError("--task classify needs --data FILE: labelled texts (a .csv / .tsv with "
                         "text and label columns, or a .jsonl of {\"text\", \"label\"})")
    wrong = [f"--{k.replace('_', '-')}" for k in ("stride", "context_length", "data_url")
             if getattr(args, k) is not None] + (["--dtype int8"] if args.dtype == "int8" else [])
    if wrong:
        raise ValueError(f"{', '.join(wrong)} do not go with --task classify")
    read_labelled(args.data)         # the file first: a wrong one fails before a model loads
    model, tokenizer = load_classifier(args.weights, get_device(args.device), args.dtype)
    records = read_labelled(args.data, model.cfg["labels"])[:args.limit]
    result = classification_scores(model, records, tokenizer, args.batch_size or 16)
    labels, width = result["labels"], max(8, *map(len, result["labels"])) + 2
    print(f"classify: {len(records)} texts from {args.data}")
    print(f"{'class':{width}s}precision  recall  f1      support")
    for name, c in result["per_class"].items():
        print(f"{name:{width}s}{c['precision']:<11.4f}{c['recall']:<8.4f}{c['f1']:<8.4f}"
              f"{c['support']}")
    print("confusion matrix (rows: true class, columns: predicted):")
    print(" " * width + "".join(f"{name:>{width}s}" for name in labels))
    for name, row in zip(labels, result["confusion"]):
        print(f"{name:{width}s}" + "".join(f"{n:>{width}d}" for n in row))
    if args.json:
        write_json({**result, "weights": str(args.weights), "data": str(args.data)}, args.json)
    print(f"task=classify n={result['n']} accuracy={result['accuracy']:.4f} "
          f"macro_f1={result['macro_f1']:.4f}")
    return result


def write_json(result, path):
    """The results (metrics first, then each example) as JSON, written atomically."""
    text = json.dumps(result, indent=1) + "\n"
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def _check_flags(args):
    """The task to run (--task, else perplexity of a text file), or ValueError naming the
    flag that does not fit."""
    for name in ("stride", "context_length", "batch_size", "limit"):
        value, least = getattr(args, name), 2 if name == "context_length" else 1
        if value is not None and value < least:
            raise ValueError(f"--{name.replace('_', '-')} must be >= {least}, got {value}")
    task = args.task
    if task is None and args.data is None:
        raise ValueError("give --task hellaswag|lambada|wikitext, or --data FILE (a text to "
                         "score)")
    if task is None and Path(args.data).suffix in (".jsonl", ".zip"):
        raise ValueError(f"--data {args.data} looks like a benchmark's file; say which with "
                         f"--task hellaswag, --task lambada or --task wikitext (--task "
                         f"perplexity scores it as plain text)")
    task = task or "perplexity"
    if task == "perplexity" and args.data is None:
        raise ValueError("--task perplexity needs --data FILE, the text to score")
    if task == "perplexity" and args.limit is not None:
        raise ValueError("--limit counts a task's examples; to score less of a text, "
                         "shorten the file")
    if task != "perplexity" and args.stride is not None:
        raise ValueError(f"--stride is for the perplexity of a text; --task {task} scores "
                         f"whole inputs")
    if args.data_url and (args.data or task == "perplexity"):
        raise ValueError("--data-url is where a task's missing file is downloaded from; it "
                         "does not go with --data")
    return task


def main(argv=None):
    p = argparse.ArgumentParser(description="Score a model: perplexity on a text file, or "
                                            "GPT-2's benchmarks as lm-evaluation-harness does.")
    p.add_argument("--weights", required=True, metavar="SOURCE", help=SOURCES_HELP)
    p.add_argument("--task", choices=[*TASKS, "perplexity", "classify"], default=None,
                   help="benchmark to run (default: perplexity of --data, a text file); "
                        "classify: a classifier's scores on --data, labelled texts")
    p.add_argument("--data", default=None, metavar="FILE",
                   help="the text to score, or the task's file in its official format "
                        "(default for a task: downloaded once into data/eval/)")
    p.add_argument("--data-url", default=None, metavar="URL",
                   help="download a task's missing file from this mirror instead (the same "
                        "size and sha256 are checked)")
    p.add_argument("--limit", type=int, default=None, metavar="N",
                   help="score only the first N examples (articles for wikitext)")
    p.add_argument("--stride", type=int, default=None,
                   help="perplexity: tokens between window starts (default: half the context; "
                        "at most the context, and below it every token is scored)")
    p.add_argument("--context-length", type=int, default=None,
                   help="tokens per input (default: the model's)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="inputs per forward pass (default: 4 windows for perplexity, 8 "
                        "examples for a task)")
    p.add_argument("--dtype", choices=[*DTYPES, "int8"], default="fp32",
                   help="weights' precision (bf16: half the memory, int8: a quarter; "
                        "slightly different scores)")
    p.add_argument("--device", default=None, help="cuda, mps or cpu (default: best there)")
    p.add_argument("--config", metavar="NAME_OR_JSON", default=None,
                   help="only for a .pth holding a bare state dict")
    p.add_argument("--json", default=None, metavar="PATH",
                   help="also write the results, with every example's scores, to PATH")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    progress = not args.no_progress
    try:
        if args.task == "classify":
            return _classify_cli(args)
        task = _check_flags(args)
        if args.json:       # before the scoring, which may take hours, not after it
            reads = [("--weights", args.weights), ("--data", args.data)]
            if task != "perplexity" and args.data is None:     # the file downloaded once
                reads.append((f"--task {task}", eval_data.task_path(task)))
            check_output(args.json, reads, "--json")
        if task != "perplexity":
            # the file first: a wrong file fails before a big model is loaded
            path = args.data or eval_data.task_file(task, url=args.data_url)
            examples = load_examples(task, path, args.limit)
        device = get_device(args.device)
        model, tokenizer = load_model_and_tokenizer(args.weights, device=device,
                                                    dtype=args.dtype, cfg=args.config)
        if task == "perplexity":
            tokens = load_tokens(args.data, tokenizer, progress=progress)
            result = evaluate_perplexity(model, tokens, args.context_length, args.stride,
                                         args.batch_size or 4, tokenizer, progress=progress)
            line = (f"loss={result['loss']:.6f} perplexity={result['perplexity']:.4f} "
                    f"bits_per_byte={result['bits_per_byte']:.6f} tokens={result['tokens']}")
            saved = {"task": "perplexity", "n": result["tokens"], **result}
        else:
            print(f"{task}: {len(examples)} {'articles' if task == 'wikitext' else 'examples'} "
                  f"from {path}", flush=True)
            result = SCORERS[task](model, examples, tokenizer, args.batch_size or 8,
                                   progress=progress, context_length=args.context_length)
            line, saved = summary_line(result), result
    except (ValueError, OSError) as e:
        p.exit(2, f"error: {e}\n")
    print(line, flush=True)         # the result stays on screen whatever happens to --json
    if args.json:
        rest = {k: v for k, v in saved.items() if k != "examples"}
        data = args.data if task == "perplexity" else str(path)
        try:
            write_json({**rest, "weights": str(args.weights), "data": data,
                        **({"examples": saved["examples"]} if "examples" in saved else {})},
                       args.json)
        except OSError as e:
            p.exit(2, f"error: --json {args.json}: the results above were not written ({e})\n")
    return result


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        # Ctrl-C: nothing half-written (--json is written whole or not at all)
        print("interrupted: no results were written", file=sys.stderr)
        sys.exit(130)
