"""The DPPO guide (docs/guides/dppo.rst) runs: every example in it is executed as a doctest."""

from __future__ import annotations

import doctest
from pathlib import Path

import pytest

import trmath

GUIDE = Path(__file__).resolve().parent.parent / "docs" / "guides" / "dppo.rst"


@pytest.mark.skipif(not all(hasattr(trmath, n) for n in ("binary_tv", "binary_kl", "topk_logprobs", "topk_tv")),
                    reason="coarse divergences not available")
def test_dppo_guide_examples() -> None:
    text = GUIDE.read_text()
    test = doctest.DocTestParser().get_doctest(text, {}, "dppo_guide", str(GUIDE), 0)
    out: list[str] = []
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS)
    runner.run(test, out=out.append)
    res = runner.summarize(verbose=False)
    assert res.attempted >= 20
    assert res.failed == 0, f"{res.failed} of {res.attempted} examples fail:\n{''.join(out)}"
