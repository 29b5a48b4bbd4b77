"""Run the notebooks with their default parameters and commit-ready outputs, in place.

    python tools/execute_notebooks.py                    # all of them, in the learning path's order
    python tools/execute_notebooks.py inference.ipynb    # one (it needs the trained model)

Run it whenever code the notebooks show changes: they are committed with their outputs and
figures, so that they read on a code-hosting page without being run. The notebooks run in
a fresh copy of the repository (its own data/ with the default corpus and the files
committed there, its own
model_weights/: yours are not touched), on the CPU unless --device says otherwise, with
progress bars off, and that copy's path is replaced by "." in every output, so the
committed files hold no machine paths. tests/test_notebooks.py checks that they stay so.

inference.ipynb, inference_hf.ipynb and instruct.ipynb show the model train.ipynb trains, so
they must run against the checkpoint whose training train.ipynb's committed outputs show:
each records that checkpoint's sha256 in its metadata, and a notebook of theirs run alone
(without train.ipynb) is refused unless model_weights/trained_gpt2.pth is that checkpoint.
Run them all in one pass after a change to training.
"""

import argparse
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from engine.fileio import file_sha256  # noqa: E402

# the learning path's order; train.ipynb before the notebooks that load the model it trains,
# instruct.ipynb before dpo.ipynb, which tunes the model instruct.ipynb tunes
NOTEBOOKS = ("build.ipynb", "train.ipynb", "inference.ipynb", "inference_hf.ipynb",
             "instruct.ipynb", "tokenizer.ipynb", "classify.ipynb", "dpo.ipynb")
CHECKPOINT = "model_weights/trained_gpt2.pth"      # what train.ipynb saves
SHOWS_TRAINED = ("inference.ipynb", "inference_hf.ipynb", "instruct.ipynb", "classify.ipynb",
                 "dpo.ipynb")
AFTER = {"dpo.ipynb": "instruct.ipynb"}            # starts from what that one saves
METADATA_KEY = "trained_checkpoint_sha256"
# data/'s committed files, which the notebooks read (the rest of data/ is made by them)
COMMITTED_DATA = ("README.md", "instructions.jsonl", "docstrings/docstrings.txt",
                  "sms_demo.tsv", "preferences.jsonl")
MAX_BYTES = 1_000_000


def stale_checkpoint(names, root):
    """Why running ``names`` from ``root`` would show another model than train.ipynb's
    committed outputs do (a message), or None."""
    if missing := [f"{n} starts from what {AFTER[n]} saves: run them together"
                   for n in names if n in AFTER and AFTER[n] not in names]:
        return "; ".join(missing)
    if "train.ipynb" in names or not set(names) & set(SHOWS_TRAINED):
        return None
    import nbformat

    trained = nbformat.read(root / "train.ipynb", as_version=4).metadata.get(METADATA_KEY)
    checkpoint = root / CHECKPOINT
    if checkpoint.is_file() and trained == file_sha256(checkpoint):
        return None
    shown = [n for n in names if n in SHOWS_TRAINED]
    state = ("is missing" if not checkpoint.is_file() else
             "is not the one train.ipynb's committed outputs were made with")
    return (f"{', '.join(shown)} {'shows' if len(shown) == 1 else 'show'} the model "
            f"train.ipynb trains, but {CHECKPOINT} {state}: run them with train.ipynb "
            f"(python tools/execute_notebooks.py runs all, in one pass)")


def scrub(text, workdir):
    """Machine-specific paths out of an output: the run's folder, home, site-packages."""
    text = text.replace(str(workdir) + os.sep, "").replace(str(workdir), ".")
    text = re.sub(r"/[^\s'\"]*/site-packages/", "<site-packages>/", text)
    return text.replace(str(Path.home()), "~")


def _merge_streams(outputs):
    """Consecutive pieces of one stream as one output (a streamed text is one per token)."""
    merged = []
    for out in outputs:
        if (merged and out.get("output_type") == "stream" == merged[-1].get("output_type")
                and out["name"] == merged[-1]["name"]):
            merged[-1]["text"] += out["text"]
        else:
            merged.append(out)
    return merged


def execute(name, workdir, device):
    import nbclient
    import nbformat

    nb = nbformat.read(ROOT / name, as_version=4)
    params = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    original = params.source
    if device:
        params.source += f"\nDEVICE = {device!r}"
    client = nbclient.NotebookClient(nb, timeout=3600, kernel_name="python3",
                                     resources={"metadata": {"path": str(workdir)}})
    client.execute()
    params.source = original
    if name == "train.ipynb" or name in SHOWS_TRAINED:     # the model they showed
        nb.metadata[METADATA_KEY] = file_sha256(workdir / CHECKPOINT)
    for cell in nb.cells:
        cell.metadata.pop("execution", None)
        if cell.cell_type != "code":
            cell.pop("outputs", None)
            continue
        cell["outputs"] = _merge_streams(cell["outputs"])
        for out in cell["outputs"]:
            if "text" in out:
                out["text"] = scrub(out["text"], workdir)
            for key in ("text/plain", "text/html"):
                if key in out.get("data", {}):
                    out["data"][key] = scrub(out["data"][key], workdir)
    nbformat.write(nb, ROOT / name)
    size = (ROOT / name).stat().st_size
    print(f"{name}: executed, {size / 1e6:.2f} MB" + (" (over 1 MB: shrink its figures)"
                                                      if size > MAX_BYTES else ""))
    return size


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("notebooks", nargs="*", default=list(NOTEBOOKS))
    p.add_argument("--device", default="cpu", help="the notebooks' DEVICE (default cpu)")
    args = p.parse_args(argv)
    args.notebooks = sorted(args.notebooks, key=lambda n: NOTEBOOKS.index(n)
                            if n in NOTEBOOKS else len(NOTEBOOKS))      # train.ipynb first
    if problem := stale_checkpoint(args.notebooks, ROOT):
        p.error(problem)
    os.environ["TQDM_DISABLE"] = "1"            # no progress-bar debris in the outputs
    os.environ.pop("MPLBACKEND", None)          # inline figures
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp) / "repo"
        shutil.copytree(ROOT, workdir, ignore=shutil.ignore_patterns(
            ".git", "data", "model_weights", "__pycache__", ".pytest_cache", ".ruff_cache"))
        for name in COMMITTED_DATA:
            (workdir / "data" / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / "data" / name, workdir / "data" / name)
        if "train.ipynb" not in args.notebooks and (ROOT / "model_weights").is_dir():
            shutil.copytree(ROOT / "model_weights", workdir / "model_weights")
        sizes = [execute(name, workdir, args.device) for name in args.notebooks]
    return 0 if all(s <= MAX_BYTES for s in sizes) else 1


if __name__ == "__main__":
    sys.exit(main())
