"""HellaSwag scoring speed: evaluate.hellaswag_score vs a plain per-continuation loop with HF.

    python bench/eval_speed.py                  # 124M shape, fp32, 48 examples, batch 8
    python bench/eval_speed.py --dtype bf16     # also ours in bfloat16 (for information)
    python bench/eval_speed.py --quick          # tiny shape, few examples: a smoke run

Both models hold the same random weights (HF init, dropout 0, loaded into ours with
download_weights_hf.load_weights_into_gpt). The examples are synthetic, in HellaSwag's file
format (WikiHow-style ones with [header]/[title]/[step] tags, ActivityNet-style ones with a
ctx_b to capitalise), made from the words of the default corpus and tokenized with GPT-2's
real tokenizer; both sides tokenize them with evaluate.encode_pair. The reference is what a
harness does by default: one forward pass of GPT2LMHeadModel per (context, ending) pair,
log-softmax over every position, the ending's tokens gathered. Ours: evaluate.hellaswag_score
(a batch of examples, each context once for its four endings, the head only where an ending
is predicted: engine/scoring.py), and for information the same with engine/scoring.py off
("ours fp32 plain": our model in the per-pair loop). The log-likelihoods must agree within
1e-4 (fp32), or the script fails.
"""

import argparse
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (puts the repository root on sys.path)

TARGET = 3.0        # ours fp32 / HF plain loop fp32, examples per second
TOLERANCE = 1e-4    # largest allowed |ours - HF| of a log-likelihood (fp32)


def synthetic_hellaswag(n, seed=0):
    """``n`` records in hellaswag_val.jsonl's format, of about its lengths, from real words."""
    from dataset import default_corpus_text
    rng = random.Random(seed)
    words = [w for w in default_corpus_text().split() if w.isalpha()]

    def text(lo, hi):
        return " ".join(rng.choice(words) for _ in range(rng.randint(lo, hi)))

    records = []
    for i in range(n):
        if i % 2:   # WikiHow: tagged steps, an empty ctx_b, long endings
            ctx_a = (f"[header] How to {text(2, 5)} [title] {text(3, 8).capitalize()}. "
                     f"[step] {text(12, 40)}.")
            ctx_b = ""
            endings = [f"{text(10, 40)}. [substeps] {text(3, 10)}." for _ in range(4)]
            source = "wikihow"
        else:       # ActivityNet: a sentence or two, ctx_b starts the next one
            ctx_a = f"{text(8, 30).capitalize()}."
            ctx_b = f"{rng.choice(['the man', 'a woman', 'she', 'he', 'we'])} {text(0, 3)}"
            endings = [f"{text(6, 20)}." for _ in range(4)]
            source = "activitynet"
        label = rng.randrange(4)
        records.append({"ind": i, "activity_label": text(1, 3).title(), "ctx_a": ctx_a,
                        "ctx_b": ctx_b, "ctx": f"{ctx_a} {ctx_b}".strip(), "endings": endings,
                        "label": label, "split": "val", "split_type": "indomain",
                        "source_id": f"{source}~{i}"})
    return records


def plain_loop(hf, examples, tokenizer, max_length):
    """Log-likelihoods the way a harness scores by default: one forward per (context,
    ending), the whole logits tensor, log-softmax, the ending's tokens gathered."""
    import torch

    from evaluate import encode_pair
    out = []
    with torch.inference_mode():
        for ex in examples:
            lls = []
            for choice in ex["choices"]:
                context, cont = encode_pair(tokenizer, ex["query"], " " + choice)
                x = torch.tensor((context + cont)[-(max_length + 1):][:-1])[None]   # (1, T)
                logp = torch.log_softmax(hf(x).logits[0].float(), -1)             # (T, vocab)
                lls.append(float(logp[-len(cont):].gather(1, torch.tensor(cont)[:, None])
                                 .double().sum()))
            out.append(lls)
    return out


def bench_eval(shape="124M", n_examples=48, batch_size=8, rounds=3, bf16=False, seed=0,
               log=print):
    """Time every contender on the same examples; return (result dicts, token statistics).

    Raises AssertionError if our fp32 log-likelihoods differ from HF's by more than 1e-4.
    """
    import contextlib
    import copy

    import torch

    import evaluate
    from dataset import get_tokenizer
    from engine import scoring

    ours, hf = common.build_pair(shape, seed)
    tokenizer = get_tokenizer()
    examples = evaluate.hellaswag_examples(synthetic_hellaswag(n_examples, seed))
    max_length = ours.cfg["context_length"]
    # "plain": engine/scoring.py off, our model one forward per (context, ending) like HF
    models = {"ours fp32": ours, "ours fp32 plain": ours}
    if bf16:
        models["ours bf16"] = copy.deepcopy(ours).to(torch.bfloat16)

    def run_ours(model, plain):
        with scoring.disabled() if plain else contextlib.nullcontext():
            t, r = common.timed(evaluate.hellaswag_score, model, examples, tokenizer,
                                batch_size=batch_size, progress=False)
        return {"seconds": t, "lls": [e["loglikelihoods"] for e in r["examples"]]}

    def run_hf():
        t, lls = common.timed(plain_loop, hf, examples, tokenizer, max_length)
        return {"seconds": t, "lls": lls}

    contenders = {name: (lambda m=m, p="plain" in name: run_ours(m, p))
                  for name, m in models.items()}
    contenders["HF plain loop fp32"] = run_hf
    warm = examples[:2]
    evaluate.hellaswag_score(ours, warm, tokenizer, batch_size=batch_size, progress=False)
    plain_loop(hf, warm, tokenizer, max_length)
    runs = common.interleaved(contenders, rounds, label="hellaswag")

    ref = runs["HF plain loop fp32"][-1]["lls"]
    worst = max(abs(a - b) for x, y in zip(runs["ours fp32"][-1]["lls"], ref)
                for a, b in zip(x, y))
    log(f"largest |log-likelihood ours fp32 - HF| over {4 * len(examples)} endings: "
        f"{worst:.2e} (tolerance {TOLERANCE:g})")
    if worst > TOLERANCE:
        raise AssertionError(f"our log-likelihoods differ from transformers' by {worst:.2e} "
                             f"> {TOLERANCE:g}: the two do not compute the same thing")
    hf_times = [r["seconds"] for r in runs["HF plain loop fp32"]]
    results = []
    for name, r in runs.items():
        times = [x["seconds"] for x in r]
        med = common.median(times)
        # the ratio within each round (the contenders ran back to back) and its median: on a
        # machine whose load changes, steadier than the ratio of the two medians
        results.append({"contender": name, "median_s": med, "min_s": min(times),
                        "max_s": max(times), "examples_per_s": len(examples) / med,
                        "vs_hf": common.median([h / t for h, t in zip(hf_times, times)]),
                        "by_round": times})
    stats = _token_stats(examples, tokenizer)
    return results, stats


def _token_stats(examples, tokenizer):
    from evaluate import encode_pair
    contexts, endings = [], []
    for ex in examples:
        for choice in ex["choices"]:
            context, cont = encode_pair(tokenizer, ex["query"], " " + choice)
            endings.append(len(cont))
        contexts.append(len(context))
    return {"context_tokens": sum(contexts) / len(contexts),
            "ending_tokens": sum(endings) / len(endings),
            "max_tokens": max(contexts) + max(endings)}


def summarize(results, quick):
    rows = {r["contender"]: r for r in results}
    text, ok = common.target("ours/HF plain loop", rows["ours fp32"]["vs_hf"], TARGET)
    # the batched scoring (engine/scoring.py) must win over our own per-pair loop
    plain, fast = rows["ours fp32 plain"]["by_round"], rows["ours fp32"]["by_round"]
    text2, ok2 = common.target("batched/plain",
                               common.median([p / f for p, f in zip(plain, fast)]), 1.0)
    parts = [text, text2]
    if "ours bf16" in rows:
        parts.append(f"ours-bf16/HF-fp32 {rows['ours bf16']['vs_hf']:.2f}x (information)")
    note = " [--quick: tiny shape, the targets are for 124M]" if quick else ""
    return (f"SUMMARY eval_speed: {'; '.join(parts)}; log-likelihoods equal within "
            f"{TOLERANCE:g}: yes; {int(ok) + int(ok2)}/2 targets met{note}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default=None, choices=list(common.SHAPES),
                   help="model shape (default 124M; tiny with --quick)")
    p.add_argument("--examples", type=int, default=None, help="default 48 (8 with --quick)")
    p.add_argument("--batch-size", type=int, default=8, help="our examples per forward pass")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                   help="bf16: also time ours in bfloat16 (.to), vs HF fp32")
    common.add_run_flags(p, "tiny shape, 8 examples, 2 rounds", tune_malloc=False)
    args = p.parse_args(argv)
    shape = args.shape or ("tiny" if args.quick else "124M")
    n_examples = args.examples or (8 if args.quick else 48)
    rounds = args.rounds or (2 if args.quick else 3)

    common.set_threads(args.threads)
    malloc = common.setup_malloc(args.tune_malloc)
    common.quiet_transformers()
    print(f"eval_speed: HellaSwag scoring, GPT-2 {shape} shape (random weights), "
          f"{n_examples} synthetic examples x 4 endings, our batch {args.batch_size}, "
          f"{rounds} interleaved rounds, median")
    print(common.machine_line())
    print(malloc)
    results, stats = bench_eval(shape, n_examples, args.batch_size, rounds,
                                bf16=args.dtype == "bf16", seed=args.seed)
    print(f"tokens per example: context {stats['context_tokens']:.1f}, ending "
          f"{stats['ending_tokens']:.1f} (mean), longest context + ending {stats['max_tokens']}")
    rows = [[r["contender"], f"{r['median_s']:.2f}", f"{r['min_s']:.2f}-{r['max_s']:.2f}",
             f"{r['examples_per_s']:.2f}", f"{r['vs_hf']:.2f}x"] for r in results]
    print()
    print(common.table(["contender", "median s", "range s", "examples/s", "vs HF plain"],
                       rows, ["<", ">", ">", ">", ">"]))
    print("(examples/s: examples scored (4 endings each) per second of the whole call, "
          "tokenization included; vs HF plain: the median over rounds of HF's time / this "
          "one's in the same round)")
    print()
    print(summarize(results, args.quick))
    return results


if __name__ == "__main__":
    main()
