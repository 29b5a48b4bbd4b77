"""How the main job's sample reads: words, words of the corpus, word pairs, whitespace.

    python bench/first_run.py                       # the README's main job, then measure
    python bench/first_run.py --sample-only         # measure generate.py on the checkpoint

The main job is `python train.py && python generate.py --prompt "The for statement"`. A
new user's first impression is that sample, so it is measured: the words in its 100 new
tokens (runs of letters), the share of them that are words of the corpus, the share of
neighbouring word pairs that appear side by side somewhere in the corpus, and the share of
its characters that are whitespace. Targets: >= 30 words, >= 85% corpus words, > 50% of the
pairs, <= 30% whitespace. Also the per-epoch samples train.py printed: their share of
newlines. Runs in a temporary copy of data/ unless --in-place.
"""

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (puts the repository root on sys.path)

PROMPT = "The for statement"
WORD = re.compile(r"[A-Za-z]+")


def measure(sample, corpus):
    """The sample's figures against the corpus text (both str; the prompt excluded)."""
    words = WORD.findall(sample)
    corpus_words = WORD.findall(corpus)
    vocabulary = {w.lower() for w in corpus_words}
    pairs_seen = {(a.lower(), b.lower()) for a, b in zip(corpus_words, corpus_words[1:])}
    pairs = list(zip(words, words[1:]))
    return {"words": len(words),
            "corpus_words": sum(w.lower() in vocabulary for w in words) / max(1, len(words)),
            "pairs": sum((a.lower(), b.lower()) in pairs_seen for a, b in pairs)
            / max(1, len(pairs)),
            "whitespace": sum(c.isspace() for c in sample) / max(1, len(sample))}


def epoch_samples_of(train_out):
    """The per-epoch samples in train.py's output, less the prompt: each is printed as lines
    after "| " (generate_and_print), the first beginning with the prompt."""
    samples, inside = [], False
    for line in train_out.splitlines():
        if line.startswith("| " + PROMPT):
            samples.append(line[2 + len(PROMPT):])
            inside = True
        elif inside and (line == "|" or line.startswith("| ")):
            samples[-1] += "\n" + line[2:]
        else:
            inside = False                  # a line of the log: the sample has ended
    return samples


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sample-only", action="store_true",
                   help="no training: measure generate.py on model_weights/trained_gpt2.pth")
    p.add_argument("--seed", type=int, default=123, help="generate.py's --seed")
    args = p.parse_args(argv)
    from dataset import default_corpus_text

    root = Path(common.ROOT)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.sample_only:
            work = root
            train_out, seconds = "", 0.0
        else:
            shutil.copytree(root, work / "repo", ignore=shutil.ignore_patterns(
                ".git", "model_weights", "data", "__pycache__"))
            work = work / "repo"
            t0 = time.perf_counter()
            train = subprocess.run([sys.executable, "train.py", "--no-progress"], cwd=work,
                                   capture_output=True, text=True, env=env, check=True)
            seconds, train_out = time.perf_counter() - t0, train.stdout
        gen = subprocess.run([sys.executable, "generate.py", "--prompt", PROMPT, "--seed",
                              str(args.seed)], cwd=work, capture_output=True, text=True,
                             env=env, check=True)
    sample = gen.stdout.rstrip("\n")[len(PROMPT):]
    figures = measure(sample, default_corpus_text())
    epoch_samples = epoch_samples_of(train_out)
    print(common.machine_line())
    if train_out:
        print(f"main job: train.py took {seconds:.0f} s; "
              f"{[ln for ln in train_out.splitlines() if ln.startswith('final:')][-1]}")
        for text in epoch_samples:
            newlines = text.count("\n") / max(1, len(text))
            print(f"epoch sample ({newlines:.0%} of it newlines): {(PROMPT + text)[:160]!r}")
    print(f"sample: {PROMPT + sample!r}")
    parts = [common.target("words", figures["words"], 30, fmt="{:.0f}")[0],
             common.target("corpus words", figures["corpus_words"], 0.85, fmt="{:.0%}")[0],
             common.target("pairs in corpus", figures["pairs"], 0.5, fmt="{:.0%}")[0],
             common.target("whitespace", figures["whitespace"], 0.30, higher_is_better=False,
                           fmt="{:.0%}")[0]]
    oks = [figures["words"] >= 30, figures["corpus_words"] >= 0.85, figures["pairs"] > 0.5,
           figures["whitespace"] <= 0.30]
    print(f"SUMMARY first_run: {'; '.join(parts)}; {sum(oks)}/4 targets met")
    return figures, epoch_samples


if __name__ == "__main__":
    main()
