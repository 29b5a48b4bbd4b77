"""Run the notebooks with their default parameters and commit-ready outputs, in place.

    python tools/execute_notebooks.py                    # all of them, train.ipynb first
    python tools/execute_notebooks.py inference.ipynb    # one (it needs the trained model)

Run it whenever code the notebooks show changes: they are committed with their outputs and
figures, so that they read on a code-hosting page without being run. The notebooks run in
a fresh copy of the repository (its own data/ with the default corpus and the files
committed there, its own
model_weights/: yours are not touched), on the CPU unless --device says otherwise, with
progress bars off, and that copy's path is replaced by "." in every output, so the
committed files hold no machine paths. tests/test_notebooks.py checks that they stay so.
"""

import argparse
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# train first: the others start from the model it trains; dpo.ipynb from instruct.ipynb's
NOTEBOOKS = ("train.ipynb", "inference.ipynb", "inference_hf.ipynb", "instruct.ipynb",
             "tokenizer.ipynb", "classify.ipynb", "dpo.ipynb")
MAX_BYTES = 1_000_000


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
    os.environ["TQDM_DISABLE"] = "1"            # no progress-bar debris in the outputs
    os.environ.pop("MPLBACKEND", None)          # inline figures
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp) / "repo"
        shutil.copytree(ROOT, workdir, ignore=shutil.ignore_patterns(
            ".git", "data", "model_weights", "__pycache__", ".pytest_cache", ".ruff_cache"))
        (workdir / "data").mkdir()
        for name in ("README.md", "instructions.jsonl", "sms_demo.tsv",   # data/'s committed
                     "preferences.jsonl"):                                 # files
            shutil.copy2(ROOT / "data" / name, workdir / "data" / name)
        if "train.ipynb" not in args.notebooks and (ROOT / "model_weights").is_dir():
            shutil.copytree(ROOT / "model_weights", workdir / "model_weights")
        sizes = [execute(name, workdir, args.device) for name in args.notebooks]
    return 0 if all(s <= MAX_BYTES for s in sizes) else 1


if __name__ == "__main__":
    sys.exit(main())
