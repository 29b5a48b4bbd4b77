"""The benchmark scripts start on a fresh install: none of their names hides an installed
package, and each one's imports, and transformers' GPT-2 they compare against, load with the
script's folder first on sys.path, as `python bench/<script>.py` has it.

(Their --quick runs take 25-90 s each on two cores: too long for every test run. A script's
folder leading sys.path is what broke them: transformers 5 imports the `kernels` package when
one is installed, and a bench/kernels.py was found first.)"""

import importlib.machinery
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

SCRIPTS = sorted(p.stem for p in (ROOT / "bench").glob("*.py"))


@pytest.mark.parametrize("name", SCRIPTS)
def test_no_bench_script_is_named_like_an_installed_package(name):
    # found on sys.path without bench/ (other tests put it there to import the scripts):
    # some installed package has this name, and any library that imports it would import
    # the script instead when a script runs
    bench = (ROOT / "bench").resolve()
    elsewhere = [p for p in sys.path if Path(p or ".").resolve() != bench]
    assert name not in sys.builtin_module_names and importlib.machinery.PathFinder.find_spec(
        name, elsewhere) is None, (
        f"bench/{name}.py hides the installed package {name!r}; rename the script")


def test_every_bench_script_imports_and_builds_its_reference_model():
    """In one process with bench/ first on sys.path: every script's top level (its imports),
    then the tiny pair the scripts compare (transformers' GPT2LMHeadModel and ours with the
    same weights), whose logits must agree."""
    code = "\n".join([
        "import runpy, sys, torch",
        "sys.path.insert(0, 'bench')",
        *(f"runpy.run_path('bench/{name}.py', run_name='bench_import')" for name in SCRIPTS),
        "import common",
        "ours, hf = common.build_pair('tiny')",
        "ids = torch.randint(0, 50257, (2, 16), generator=torch.Generator().manual_seed(0))",
        "with torch.no_grad():",
        "    torch.testing.assert_close(ours(ids), hf(ids).logits, atol=1e-4, rtol=1e-4)",
        "print('ok')",
    ])
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]
