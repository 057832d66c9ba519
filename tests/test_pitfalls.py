"""The pitfalls table (trmath.testing.pitfalls) shown in the README: the common float32 formulas
fail on these inputs, trmath meets its accuracy target on them."""

from __future__ import annotations

from collections import defaultdict

import pytest

pytest.importorskip("mpmath")

from trmath.testing.pitfalls import evaluate_pitfalls, format_pitfalls  # noqa: E402


@pytest.fixture(scope="module")
def rows():
    return evaluate_pitfalls()


def test_trmath_meets_the_target_on_every_case(rows):
    for r in rows:
        assert r.trmath_rel_err <= 1e-5, (r.quantity, r.case, r.trmath, r.exact)
        assert r.trmath >= 0.0


def test_each_textbook_formula_fails_somewhere(rows):
    worst = defaultdict(float)
    for r in rows:
        worst[r.quantity] = max(worst[r.quantity], r.textbook_rel_err)
    assert len(worst) == 5
    for q, err in worst.items():
        # Far outside the 1e-5 target: the failures are structural, not rounding at the margin.
        assert err > 1e-2, (q, err)
    # Top-K KL without the tail is negative here: not a divergence at all.
    assert any(r.textbook < 0 for r in rows if r.quantity.startswith("top-K"))


def test_tables_render(rows):
    md = format_pitfalls(rows, markdown=True)
    assert md.count("\n") == len(rows) + 1
    assert "k3" in format_pitfalls(rows)
