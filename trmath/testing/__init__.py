r"""Verification tools for trmath and for code that computes the same quantities.

This package is public: use it to check trmath's kernels, a port of them, or your own
implementation of a policy divergence against exact values.

* :mod:`~trmath.testing.oracles` — multiple-precision (:mod:`mpmath`) reference values of the
  exact reductions and their gradients, on exactly the distributions the inputs represent:

  .. math::

      \operatorname{lse}_T(z) = \log \sum_i e^{z_i/T}, \quad H(p) = -\sum_i p_i \log p_i, \quad
      \mathrm{KL}(p \| q) = \sum_i p_i \log \frac{p_i}{q_i}, \\
      \mathrm{TV}(p, q) = \tfrac12 \sum_i |p_i - q_i|, \quad
      \mathrm{JS}(p, q) = \tfrac12 \mathrm{KL}(p \| m) + \tfrac12 \mathrm{KL}(q \| m),

  with :math:`p = \operatorname{softmax}(z / T)`, :math:`q = \operatorname{softmax}(w / T)`,
  :math:`m = (p + q)/2`, ``-inf`` logits as zero probabilities and :math:`0 \log 0 = 0`.
* :mod:`~trmath.testing.strategies` — Hypothesis strategies and deterministic adversarial
  generators of logit rows (near-identical, peaked, masked, shifted, ...), cast to the dtype
  under test *before* the oracle sees them.
* :mod:`~trmath.testing.assertions` — tolerance checks whose failure messages list the worst
  points and the input rows they came from.

The package does not import trmath's compiled extension. The oracles need ``mpmath`` and the
strategies need ``hypothesis`` (both in the ``test`` extra: ``pip install 'trmath[test]'``).

Examples
--------
>>> import numpy as np
>>> from trmath.testing import mp_batch, assert_close_to_reference
>>> z = np.array([[0.0, 1.0, -np.inf]])
>>> w = np.array([[0.5, 0.5, 0.0]])
>>> ref = mp_batch("kl", z, w)
>>> mine = np.array([0.37581697905881])  # an implementation under test
>>> assert_close_to_reference(mine, ref, rtol=1e-12, atol=0.0, inputs=(z, w), name="kl")
"""

from trmath.testing import expectation as _expectation
from trmath.testing import oracles_coarse as _oracles_coarse
from trmath.testing import oracles_projection as _oracles_projection
from trmath.testing.pitfalls import Pitfall, evaluate_pitfalls, format_pitfalls
from trmath.testing.expectation import *  # noqa: F401,F403  (names in expectation.__all__)
from trmath.testing.oracles_coarse import *  # noqa: F401,F403
from trmath.testing.oracles_projection import *  # noqa: F401,F403
from trmath.testing.assertions import (
    TARGET_TOLERANCES,
    assert_close_to_reference,
    max_relative_error,
    target_tolerance,
    ulps,
)
from trmath.testing.oracles import (
    DEFAULT_DPS,
    GRADIENT_ORACLES,
    ORACLES,
    as_float64,
    mp_batch,
    mp_entropy,
    mp_grad_batch,
    mp_grad_entropy,
    mp_grad_js,
    mp_grad_kl,
    mp_grad_logsumexp,
    mp_grad_token_logprob,
    mp_grad_tv,
    mp_js,
    mp_kl,
    mp_log_softmax,
    mp_logsumexp,
    mp_softmax,
    mp_token_logprob,
    mp_tv,
)
from trmath.testing.strategies import (
    DTYPES,
    ODD_SIZES,
    PAIR_FAMILIES,
    ROW_FAMILIES,
    LabeledPair,
    LabeledRow,
    StableRNG,
    adversarial_batch,
    adversarial_pairs,
    adversarial_rows,
    batches,
    cast,
    logit_rows,
    row_and_token,
    row_pairs,
    temperatures,
)

__all__ = [
    "DEFAULT_DPS",
    "DTYPES",
    "GRADIENT_ORACLES",
    "ODD_SIZES",
    "ORACLES",
    "PAIR_FAMILIES",
    "ROW_FAMILIES",
    "TARGET_TOLERANCES",
    "LabeledPair",
    "LabeledRow",
    "StableRNG",
    "adversarial_batch",
    "adversarial_pairs",
    "adversarial_rows",
    "as_float64",
    "assert_close_to_reference",
    "batches",
    "cast",
    "logit_rows",
    "max_relative_error",
    "mp_batch",
    "mp_entropy",
    "mp_grad_batch",
    "mp_grad_entropy",
    "mp_grad_js",
    "mp_grad_kl",
    "mp_grad_logsumexp",
    "mp_grad_token_logprob",
    "mp_grad_tv",
    "mp_js",
    "mp_kl",
    "mp_log_softmax",
    "mp_logsumexp",
    "mp_softmax",
    "mp_token_logprob",
    "mp_tv",
    "row_and_token",
    "row_pairs",
    "target_tolerance",
    "temperatures",
    "ulps",
    "Pitfall",
    "format_pitfalls",
    "evaluate_pitfalls",
    *_expectation.__all__,
    *_oracles_coarse.__all__,
    *_oracles_projection.__all__,
]
