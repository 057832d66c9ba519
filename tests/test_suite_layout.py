"""The test suite's own layout.

pytest imports the test files by path (``--import-mode=importlib`` in ``pyproject.toml``), so the
``tests`` folder is not on ``sys.path`` and one test file cannot ``import`` another or
``conftest``: such an import fails only when the line runs, which for a GPU test is never on a
machine without a GPU. Shared helpers are loaded from their file (see
``tests/test_cuda.py::test_confident_token_gradients_against_mpmath``) or live in
:mod:`trmath.testing`. Checked statically, over every statement of every test file.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent


def sibling_imports(source: str, siblings: set[str]) -> list[tuple[int, str]]:
    """(line, module) of every ``import`` / ``from ... import`` of a module in ``siblings``,
    at any depth (inside functions too)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found += [(node.lineno, n) for n in names if n.split(".")[0] in siblings]
    return found


def _siblings() -> set[str]:
    return {p.stem for p in TESTS.rglob("*.py")}


def test_the_check_finds_sibling_imports():
    src = ("import math\n"
           "def f():\n"
           "    from test_exact_grad import helper\n"
           "    import conftest, torch\n"
           "from trmath.testing import cast\n")
    assert sibling_imports(src, {"test_exact_grad", "conftest"}) == [(3, "test_exact_grad"), (4, "conftest")]


@pytest.mark.parametrize("path", sorted(TESTS.rglob("*.py")), ids=lambda p: str(p.relative_to(TESTS)))
def test_no_test_file_imports_another(path: Path):
    siblings = _siblings()
    assert "test_exact_grad" in siblings and "conftest" in siblings  # the walk sees the suite
    bad = sibling_imports(path.read_text(), siblings)
    assert not bad, f"{path.name} imports a sibling test module (fails under importlib mode): {bad}"
