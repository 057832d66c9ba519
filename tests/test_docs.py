"""The documentation is tested: every docstring example of the public modules, the examples of
the quickstart guide, and (when Sphinx is installed) the nitpicky, warnings-as-errors build.
"""

from __future__ import annotations

import doctest
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"

#: Public modules whose docstring examples must all pass.
PUBLIC_MODULES = (
    "trmath",
    "trmath.exact",
    "trmath.coarse",
    "trmath.estimators",
    "trmath.objectives",
    "trmath.projections",
    "trmath.adapter",
    "trmath.integrations",
    "trmath.integrations.trl",
    "trmath.integrations.verl",
    "trmath.testing",
    "trmath.testing.expectation",
    "trmath.testing.oracles_coarse",
    "trmath.testing.oracles_projection",
    "trmath.testing.pitfalls",
    "trmath.testing.oracles",
    "trmath.testing.strategies",
    "trmath.testing.assertions",
)

#: Modules that must carry runnable examples (numpydoc house style: every public function).
MUST_HAVE_EXAMPLES = (
    "trmath.exact",
    "trmath.coarse",
    "trmath.estimators",
    "trmath.objectives",
    "trmath.projections",
    "trmath.testing",
    "trmath.testing.expectation",
)

FLAGS = doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS


def _run(tests: list[doctest.DocTest]) -> tuple[int, int, str]:
    out: list[str] = []
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    for t in tests:
        runner.run(t, out=out.append)
    res = runner.summarize(verbose=False)
    return res.failed, res.attempted, "".join(out)


@pytest.mark.parametrize("name", PUBLIC_MODULES)
def test_docstring_examples(name: str) -> None:
    mod = importlib.import_module(name)
    tests = doctest.DocTestFinder().find(mod, name)
    failed, attempted, report = _run(tests)
    assert failed == 0, f"{failed} of {attempted} docstring examples of {name} fail:\n{report}"
    if name in MUST_HAVE_EXAMPLES:
        assert attempted > 0, f"{name} has no docstring examples"


def test_quickstart_examples() -> None:
    path = DOCS / "guides" / "quickstart.rst"
    text = path.read_text()
    test = doctest.DocTestParser().get_doctest(text, {}, "quickstart", str(path), 0)
    failed, attempted, report = _run([test])
    assert attempted > 0
    assert failed == 0, f"{failed} of {attempted} examples of {path.name} fail:\n{report}"


@pytest.mark.slow
def test_sphinx_build_nitpicky(tmp_path: Path) -> None:
    """``sphinx-build -n -W --keep-going``: any warning (an unresolved reference, a malformed
    docstring) fails. Generates the accuracy table if it is missing (about 20 s of CPU)."""
    pytest.importorskip("sphinx")
    pytest.importorskip("numpydoc")
    cmd = [sys.executable, "-m", "sphinx", "-n", "-W", "--keep-going", "-q", "-b", "html",
           "-d", str(tmp_path / "doctrees"), str(DOCS), str(tmp_path / "html")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"docs build failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
