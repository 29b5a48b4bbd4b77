"""Write data/docstrings/docstrings.txt: the docstrings of Python's standard library.

    python tools/make_docstrings.py            # rewrites the file from this Python

train.ipynb fine-tunes its model, trained on Python's reference documentation, on this
second text: the same subject in another voice (terse, imperative: "Return the number of
items in a container."), so that fine-tuning has something to learn that the first text
did not teach. The text is CPython's own (PSF License Version 2, which allows copying with
its notice; data/README.md says so), gathered from the modules below as this Python ships
them: each public function, class and method as its name, signature and docstring. The
committed file came from CPython 3.11; another version gives a slightly different text.
"""

import argparse
import importlib
import inspect
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "data" / "docstrings" / "docstrings.txt"
MODULES = ("builtins", "os.path", "pathlib", "shutil", "math", "statistics", "random",
           "string", "textwrap", "re", "json", "csv", "itertools", "functools", "operator",
           "collections", "heapq", "bisect", "copy", "datetime", "fractions", "contextlib",
           "enum", "dataclasses", "inspect", "tempfile", "glob", "fnmatch", "difflib",
           "pprint", "warnings")


def _signature(obj):
    try:
        return str(inspect.signature(obj))
    except (TypeError, ValueError):
        return "(...)"


def _entry(name, obj):
    doc = inspect.getdoc(obj)
    if not doc or len(doc) < 60:
        return None
    head = f"{name}{_signature(obj)}" if callable(obj) else name
    return f"{head}\n\n{doc.strip()}\n"


def docstrings(modules=MODULES):
    """One entry per public function, class and method, module by module, in name order."""
    entries, seen = [], set()
    for module_name in modules:
        module = importlib.import_module(module_name)
        for name in sorted(getattr(module, "__all__", None) or dir(module)):
            obj = getattr(module, name, None)
            if name.startswith("_") or inspect.ismodule(obj) or id(obj) in seen:
                continue
            if not (inspect.isroutine(obj) or inspect.isclass(obj)) or (
                    inspect.isclass(obj) and issubclass(obj, BaseException)):
                continue        # the exceptions' one-line docstrings say little
            seen.add(id(obj))
            qualified = name if module_name == "builtins" else f"{module_name}.{name}"
            if (entry := _entry(qualified, obj)) is not None:
                entries.append(entry)
            if inspect.isclass(obj):
                for attr in sorted(vars(obj)):
                    method = getattr(obj, attr, None)
                    if attr.startswith("_") or not inspect.isroutine(method) or id(method) in seen:
                        continue
                    seen.add(id(method))
                    if (entry := _entry(f"{qualified}.{attr}", method)) is not None:
                        entries.append(entry)
    return "\n".join(entries)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(OUT))
    args = p.parse_args(argv)
    text = docstrings()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    print(f"{out}: {len(text):,} characters, {text.count(chr(10)):,} lines")


if __name__ == "__main__":
    main()
