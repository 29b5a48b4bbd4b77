"""Our GGUF export in llama.cpp: its greedy tokens against ours, and its speed on the file.

    python bench/gguf_check.py            # GPT-2 124M's shape + a model with its own tokenizer
    python bench/gguf_check.py --quick    # two tiny models: a smoke run (the tests run it)

Two models, each exported with ``download_weights_hf.py --export SOURCE --out X.gguf
--gguf-type T`` for every ``--types`` (f32, q8_0):
  gpt2-124M    GPT-2 124M, OpenAI's shape (MODEL_CONFIGS["gpt2-small (124M)"]), random weights
               (seed 0), GPT-2's tokenizer
  own-tok      a small GPT-2 trained for a few steps by train.py --tokenizer train:N on the
               built-in corpus: its own BPE vocabulary, carried into the GGUF
For each file:
  1. ours: load_model(X.gguf) gives the model's logits (f32: exactly) and greedy tokens
  2. llama.cpp (where ../shared/peers/llamacpp_setup.sh built it; --llamacpp-root): its
     tokens for the prompt text equal ours, and its greedy continuation (its own sampler at
     temperature 0, through the llama-cpp-python bindings of the build's venv) equals ours
     (generate_text, temperature 0): f32 token for token; for q8_0 the tokens before the
     first difference are counted (llama.cpp's q8_0 products also round the activations).
     Its logits along our greedy sequence against ours: the largest difference.
  3. llama-bench's decoding speed on the file (batch 1: -p 0 -d 16 -n 128, tokens/s), for
     the 124M shape alternating with llama.cpp's converter's file of that shape and type
and once: the README's command (llama-completion ... --temp 0) prints our greedy text, and
GGUF files of llama.cpp's own converter (llamacpp_setup.sh's, of a random HF GPT-2) load
through load_model with the Hugging Face model's logits. Without llama.cpp it says so, does 1
and skips the rest.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402, I001  (puts the repository root on sys.path)
import generate_speed  # noqa: E402
import peers_speed  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

import download_weights_hf  # noqa: E402
import train  # noqa: E402
from dataset import default_corpus_text  # noqa: E402
from generate import generate_text  # noqa: E402
from model import MODEL_CONFIGS, GPTModel, save_checkpoint  # noqa: E402
from model_sources import load_model, load_model_and_tokenizer  # noqa: E402
from tokenizer import BPETokenizer  # noqa: E402

PROMPT = "The for statement is used to iterate over the elements of a sequence"

# Run with the llama.cpp build's venv python: the bindings, pointed at the build's libllama.
# Besides its greedy tokens, llama.cpp's logits along our greedy sequence (prompt, then our
# tokens one at a time) go to a .npy file, to be set beside ours.
_LLAMA_CHILD = r"""
import json, sys
import llama_cpp, numpy as np
a = json.loads(sys.stdin.read())
llm = llama_cpp.Llama(model_path=a["model"], n_ctx=a["n_ctx"], n_batch=a["n_ctx"],
                      n_threads=a["threads"], n_threads_batch=a["threads"], verbose=False,
                      logits_all=True)
out = {"text_ids": llm.tokenize(a["text"].encode(), add_bos=False, special=False),
       "bindings": llama_cpp.__version__, "greedy": []}
for t in llm.generate(a["ids"], temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0,
                      reset=True):
    out["greedy"].append(int(t))
    if len(out["greedy"]) == a["n_new"]:
        break
llm.reset()
llm.eval(a["ids"])
logits = [np.array(llm.eval_logits[-1], np.float32)]
for t in a["ours"][:-1]:
    llm.eval([t])
    logits.append(np.array(llm.eval_logits[-1], np.float32))
np.save(a["logits"], np.stack(logits))
print(json.dumps(out))
"""


def build_models(workdir, quick, log):
    """[(label, source .pth)]: GPT-2's vocabulary, and a vocabulary of the model's own."""
    workdir = Path(workdir)
    torch.manual_seed(0)
    if quick:
        cfg = {"vocab_size": 50257, "context_length": 64, "emb_dim": 64, "n_heads": 4,
               "n_layers": 2, "drop_rate": 0.0, "qkv_bias": True, "tie_embeddings": True}
        gpt2 = save_checkpoint(workdir / "gpt2-tiny.pth", GPTModel(cfg))
        own = BPETokenizer.train(default_corpus_text()[:20_000], 400, name="quick-400")
        model = GPTModel({**cfg, "vocab_size": own.n_vocab, "tie_embeddings": False})
        mine = save_checkpoint(workdir / "own-tok-tiny.pth", model,
                               tokenizer={"json": own.dumps(), "sha256": own.fingerprint()})
        return [("gpt2-tiny", gpt2), ("own-tok-tiny", mine)]
    gpt2, mine = workdir / "gpt2-124M.pth", workdir / "own-tok.pth"
    if not gpt2.exists():       # a --workdir of an earlier run keeps its models
        log("GPT-2 124M's shape, random weights (seed 0)")
        save_checkpoint(gpt2, GPTModel(MODEL_CONFIGS["gpt2-small (124M)"]).eval())
    if not mine.exists():
        log("training a small GPT-2 with its own tokenizer (train.py --tokenizer train:2048)")
        data = workdir / "corpus" / "input.txt"
        data.parent.mkdir(exist_ok=True)
        data.write_text(default_corpus_text())
        train.main(["--data", str(data), "--tokenizer", "train:2048", "--emb-dim", "256",
                    "--n-layers", "4", "--n-heads", "4", "--context-length", "128",
                    "--max-steps", "60", "--batch-size", "8", "--eval-freq", "60",
                    "--no-progress", "--device", "cpu", "--dtype", "fp32", "--out", str(mine)])
    return [("gpt2-124M", gpt2), ("own-tok", mine)]


def greedy(model, ids, n_new):
    out = generate_text(model, torch.tensor([ids]), max_new_tokens=n_new, temperature=0.0)
    return out[0, len(ids):].tolist()


def agreement(ours, theirs):
    """How many tokens agree before the first difference."""
    return next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), len(ours))


def run_llama(paths, gguf, text, ids, ours, n_ctx, threads):
    """llama.cpp on ``gguf`` through the bindings: its ids for ``text``, its greedy
    continuation of ``ids`` (as many tokens as ``ours``), and its logits (numpy) at each step
    of ``ids + ours``."""
    env = {**os.environ, "LLAMA_CPP_LIB_PATH": str(Path(paths["bench"]).parent)}
    logits = Path(gguf).with_suffix(".logits.npy")
    proc = subprocess.run([str(paths["python"]), "-c", _LLAMA_CHILD], env=env, text=True,
                          capture_output=True, input=json.dumps({
                              "model": str(gguf), "text": text, "ids": ids, "ours": ours,
                              "n_new": len(ours), "n_ctx": n_ctx, "threads": threads,
                              "logits": str(logits)}))
    if proc.returncode != 0:
        raise RuntimeError(f"llama.cpp's bindings failed on {gguf}:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["logits"] = np.load(logits)
    logits.unlink()
    return result


def readme_command(paths, gguf, n_new, threads):
    """What the README's command prints: llama-completion ... --temp 0 (the text alone)."""
    argv = [str(paths["completion"]), "-m", str(gguf), "-no-cnv", "-p", PROMPT, "-n",
            str(n_new), "--temp", "0", "-t", str(threads), "--no-display-prompt"]
    proc = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed:\n{proc.stderr[-3000:]}")
    return proc.stdout


def reference(source, n_new):
    """What every file exported from ``source`` is compared with, computed once: the model,
    the prompt's ids, our greedy continuation, its text, and our logits along it."""
    model, tokenizer = load_model_and_tokenizer(source)
    ids = tokenizer.encode_ordinary(PROMPT)
    ours = greedy(model, ids, n_new)
    with torch.no_grad():       # ours at each step of the greedy sequence
        logits = model(torch.tensor([ids + ours]))[0, len(ids) - 1:-1].numpy()
    return {"model": model, "ids": ids, "greedy": ours, "text": tokenizer.decode(ours),
            "logits": logits}


def check_file(label, source, ref, gguf_type, workdir, paths, n_new, threads, rounds, quick,
               log, peer=None):
    """Export ``source`` to GGUF and run checks 1-3 on it against ``ref`` (``reference``);
    returns one result row (dict). ``peer``: a GGUF of llama.cpp's own converter of the same
    shape and type, timed in the same rounds (alternating with ours) for a ratio that the
    machine's load cancels out of."""
    gguf = Path(workdir) / f"{label}-{gguf_type}.gguf"
    log(f"{label}: exporting {gguf_type}")
    download_weights_hf.main(["--export", str(source), "--out", str(gguf), "--gguf-type",
                              gguf_type])
    model, ids, ours, ours_logits = ref["model"], ref["ids"], ref["greedy"], ref["logits"]
    back = load_model(gguf)
    with torch.no_grad():
        diff = (back(torch.tensor([ids])) - model(torch.tensor([ids]))).abs().max().item()
    row = {"model": label, "type": gguf_type, "MB": gguf.stat().st_size / 1e6,
           "logit_diff": diff, "ours_back": agreement(ours, greedy(back, ids, n_new)),
           "n_new": n_new, "file": gguf, "text": ref["text"]}
    if paths is None:
        return row
    theirs = run_llama(paths, gguf, PROMPT, ids, ours, model.cfg["context_length"], threads)
    row.update(prompt_ids_equal=theirs["text_ids"] == ids, llama=agreement(ours, theirs["greedy"]),
               llama_diff=float(np.abs(theirs["logits"] - ours_logits).max()),
               bindings=theirs["bindings"])
    # GPT-2's positions end at its context: llama.cpp aborts past them
    steps = min(16 if quick else 128, model.cfg["context_length"] - 16)
    files = {"ours": gguf, **({"peer": peer} if peer is not None and peer.exists() else {})}
    runs = common.interleaved({name: lambda f=f: peers_speed.run_llamacpp(
        paths, f, threads, 16, steps, 1) for name, f in files.items()}, rounds)
    speed = {name: common.median([r["tok_s"][0] for r in rs]) for name, rs in runs.items()}
    row.update(tok_s=speed["ours"], peer_tok_s=speed.get("peer"), steps=steps,
               build=runs["ours"][0]["build"])
    return row


def converter_files(root, log):
    """llama.cpp's own converter's GGUF files (llamacpp_setup.sh) through load_model, against
    the Hugging Face model they were made from: [(file, max |logit difference|)]."""
    folder, out = Path(root) / "gpt2-124m-random", []
    files = sorted((Path(root) / "gguf").glob("gpt2-124m-random-*.gguf"))
    if not (folder / "model.safetensors").exists() or not files:
        return out
    hf = download_weights_hf.load_gpt2_hf(folder)
    ids = torch.tensor([[464, 2068, 7586, 21831, 18045, 625, 262, 16931, 3290, 13]])
    with torch.no_grad():
        ref = hf(ids)
        for f in files:
            log(f"llama.cpp's converter: {f.name} through load_model")
            out.append((f.name, (load_model(f)(ids) - ref).abs().max().item()))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="two tiny models, 8 new tokens")
    p.add_argument("--types", default="f32,q8_0", help="--gguf-type values (default f32,q8_0)")
    p.add_argument("--new-tokens", type=int, default=None, help="default 32 (8 with --quick)")
    p.add_argument("--threads", type=int, default=None, help="llama.cpp's (default: every CPU)")
    p.add_argument("--rounds", type=int, default=None,
                   help="llama-bench processes per file (default 3, 1 with --quick)")
    p.add_argument("--llamacpp-root", default=None,
                   help="llamacpp_setup.sh's folder (default $LLAMAPEER_ROOT or /tmp/llamapeer)")
    p.add_argument("--workdir", default=None,
                   help="where the models and files go, and stay (default: a temporary "
                        "folder, deleted at the end)")
    args = p.parse_args(argv)
    n_new = args.new_tokens or (8 if args.quick else 32)
    rounds = args.rounds or (1 if args.quick else 3)
    threads = args.threads or os.cpu_count()
    root = args.llamacpp_root or os.environ.get("LLAMAPEER_ROOT", "/tmp/llamapeer")
    types = [t.strip() for t in args.types.split(",") if t.strip()]
    print(f"gguf_check: export to GGUF, then llama.cpp's greedy tokens against ours "
          f"({n_new} new tokens after {PROMPT!r}) and its decoding speed on the file")
    print(common.machine_line())
    print(generate_speed.cpu_line())
    paths, why = peers_speed.llamacpp_paths(root)
    if paths is None:
        print(f"llama.cpp: not found, so only our own reading of the files is checked ({why})")
    else:
        paths["completion"] = Path(paths["bench"]).parent / "llama-completion"
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="gguf_check_"))
    workdir.mkdir(parents=True, exist_ok=True)
    rows, converted, readme = [], [], None
    try:
        for label, source in build_models(workdir, args.quick, print):
            ref = reference(source, n_new)
            for t in types:
                (workdir / f"{label}-{t}.gguf").unlink(missing_ok=True)
                # the same shape from llama.cpp's converter (llamacpp_setup.sh), to time beside
                peer = Path(root) / "gguf" / f"gpt2-124m-random-{t}.gguf"
                rows.append(check_file(label, source, ref, t, workdir, paths, n_new, threads,
                                       rounds, args.quick, print,
                                       peer if label == "gpt2-124M" else None))
        if paths is not None:
            first = next(r for r in rows if r["type"] == "f32")
            if paths["completion"].exists():
                printed = readme_command(paths, first["file"], n_new, threads)
                readme = (first["model"], printed.startswith(first["text"]), printed,
                          first["text"])
            converted = converter_files(root, print)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    print()
    headers = ["model", "type", "MB", "ours: max|logit diff|", "ours: greedy"]
    if paths is not None:
        headers += ["llama.cpp: prompt ids", "llama.cpp: greedy", "max|logit diff|",
                    "llama.cpp tok/s", "converter's file tok/s"]
    table = []
    for r in rows:
        line = [r["model"], r["type"], f"{r['MB']:.1f}", f"{r['logit_diff']:.2e}",
                f"{r['ours_back']}/{r['n_new']}"]
        if paths is not None:
            peer = r["peer_tok_s"]
            line += ["equal" if r["prompt_ids_equal"] else "DIFFER", f"{r['llama']}/{r['n_new']}",
                     f"{r['llama_diff']:.2e}", f"{r['tok_s']:.1f}",
                     "" if peer is None else f"{peer:.1f} (ours {r['tok_s'] / peer:.2f}x)"]
        table.append(line)
    print(common.table(headers, table))
    steps = "/".join(dict.fromkeys(str(r["steps"]) for r in rows if "steps" in r))
    print(f"(greedy: tokens equal to the source model's before the first difference; ours: "
          f"the .gguf through load_model; llama.cpp's max|logit diff|: against the source "
          f"model's, along its greedy sequence; tok/s: llama-bench -p 0 -d 16 -n "
          f"{steps or '-'}, {threads} threads, the median of {rounds} processes; "
          f"converter's file: llamacpp_setup.sh's GGUF of the same shape and type from "
          f"convert_hf_to_gguf.py / llama-quantize, timed alternating with ours)")
    if paths is not None:
        print(f"llama.cpp build {rows[0]['build']}, llama-cpp-python {rows[0]['bindings']}")
    if readme is not None:
        label, same, printed, ours_text = readme
        print(f"README command (llama-completion -m {label}-f32.gguf -no-cnv -p ... --temp 0): "
              f"{'prints our greedy text' if same else 'DIFFERS'}: {printed[:80]!r}"
              + ("" if same else f" (ours {ours_text[:80]!r})"))
    for name, diff in converted:
        print(f"llama.cpp's converter's {name} through load_model: max|logit diff| vs the "
              f"Hugging Face model {diff:.2e}")
    exact = [r for r in rows if r["type"] == "f32"]
    ok = all(r["logit_diff"] == 0 and r["ours_back"] == n_new for r in exact)
    if paths is not None:
        ok = ok and all(r["prompt_ids_equal"] for r in rows) and all(
            r["llama"] == n_new for r in exact)
    q8 = [f"{r['model']} {r['llama']}/{n_new}" for r in rows
          if r["type"] == "q8_0" and paths is not None]
    print(f"SUMMARY gguf_check: f32 {'equal token for token' if ok else 'MISMATCH'}"
          f"{'' if paths is not None else ' (ours only: llama.cpp not built)'}"
          + (f"; q8_0 agreement before the first difference: {', '.join(q8)}" if q8 else ""))
    return {"rows": rows, "llama_cpp": paths is not None, "ok": ok, "converted": converted}


if __name__ == "__main__":
    sys.exit(0 if main()["ok"] else 1)
