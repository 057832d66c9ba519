r"""Exact full-vocabulary reductions of policy rows.

Every function takes logits ``[..., V]`` (float16, bfloat16, float32 or float64; any strides;
torch tensors or numpy arrays) and returns one value per row ``[...]``: float32 for 16/32-bit
inputs, float64 for float64 inputs, of the first logits argument's kind (a numpy array for a
numpy array, a tensor for a tensor). Rows are read in place and reduced in fused passes; no
``[N, V]`` temporary is ever built, forward or backward.

Accuracy (against 50-digit references on the exact distributions the inputs represent):
``|err| <= 1e-5 |value| + 1e-30`` for 16/32-bit inputs and ``1e-12 |value| + 1e-300`` for
float64, on every row -- near-identical rows (KL down to 1e-12), peaked rows, masked tokens.
See :doc:`/theory/exact` for the cancellation-free formulations and their error analysis.
"""

from __future__ import annotations

from typing import Any

import torch

from . import _ops
from ._validation import as_tensor, check_logits, check_pair, check_temperature, check_tokens

__all__ = ["logsumexp", "entropy", "token_logprobs", "kl", "tv", "js"]


def _single(logits, tokens, temperature, op, validate):
    z, back = as_tensor(logits, "logits")
    check_logits(z, "logits")
    T = check_temperature(temperature)
    tok = check_tokens(tokens, z) if tokens is not None else None
    if _ops.direct_call(z, tok):
        out0, out1 = _ops.single_value(z, tok, T, op, bool(validate))
    else:
        out0, out1, _ = _ops.single_fwd(z, tok, T, op, bool(validate))
    return back(out0), (back(out1) if out1 is not None else None)


def _pair(p_logits, q_logits, temperature, op, validate):
    z, back = as_tensor(p_logits, "p_logits")
    w, _ = as_tensor(q_logits, "q_logits")
    z, w = check_pair(z, w, "p_logits", "q_logits")
    T = check_temperature(temperature)
    if _ops.direct_call(z, w):
        return back(_ops.pair_value(z, w, T, op, bool(validate)))
    out, _ = _ops.pair_fwd(z, w, T, op, bool(validate))
    return back(out)


def logsumexp(logits: Any, *, temperature: float = 1.0, validate: bool = True) -> Any:
    r"""Log-partition function of each row.

    .. math::

        \operatorname{lse}(z) = \log \sum_{i=1}^{V} e^{z_i / T}

    ``-inf`` logits contribute nothing.

    Parameters
    ----------
    logits : torch.Tensor or numpy.ndarray, shape ``[..., V]``
        Floating dtype (float16, bfloat16, float32, float64); any strides.
    temperature : float, optional
        :math:`T > 0`; the row is :math:`z / T`.
    validate : bool, optional
        If true (default), a row containing NaN or ``+inf``, or entirely ``-inf``, raises
        :class:`ValueError` naming the row. If false, such rows return NaN (the check costs
        nothing extra: it is part of the first pass).

    Returns
    -------
    torch.Tensor or numpy.ndarray, shape ``[...]``
        float32 for 16/32-bit inputs, float64 for float64 inputs. Differentiable:
        :math:`\partial\,\mathrm{lse}/\partial z_j = p_j / T`.

    Notes
    -----
    One pass finds the row maximum :math:`M`, a second sums :math:`e^{(z_i - M)/T}` with the
    range reduction of every exponential done in double. The result :math:`M/T + \log A`
    cancels when it is close to 0 (log-probabilities passed as logits); such rows are
    recomputed with double-precision exponentials, so the relative error bound holds even there.

    Examples
    --------
    >>> import torch, trmath
    >>> float(trmath.logsumexp(torch.zeros(4)))  # log 4
    1.3862943649291992
    """
    return _single(logits, None, temperature, "logsumexp", validate)[0]


def entropy(logits: Any, *, temperature: float = 1.0, validate: bool = True) -> Any:
    r"""Shannon entropy of each row, in nats.

    .. math::

        H(p) = -\sum_i p_i \log p_i, \qquad p = \operatorname{softmax}(z / T),
        \quad 0 \log 0 = 0.

    Computed as :math:`H = \log A + \sum_i \tilde p_i (M - z_i)/T \,/\, A` with
    :math:`\tilde p_i = e^{(z_i - M)/T}`, a sum of non-negative terms: no cancellation, so the
    relative error stays at a few float ulps even for nearly deterministic rows.
    Gradient: :math:`\partial H / \partial z_j = -p_j (\log p_j + H) / T`.

    Parameters and return value as in :func:`logsumexp`.

    Examples
    --------
    >>> import torch, trmath
    >>> round(float(trmath.entropy(torch.tensor([0.0, 0.0]))), 6)  # log 2
    0.693147
    """
    return _single(logits, None, temperature, "entropy", validate)[0]


def token_logprobs(
    logits: Any,
    tokens: Any,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
    validate: bool = True,
) -> Any:
    r"""Log-probability of the given token in each row (optionally also the entropy).

    .. math::

        \log p(t) = z_t / T - \log \sum_i e^{z_i / T}

    computed as :math:`(z_t - M)/T - \log A`, two non-positive terms (no cancellation).
    This is the most common operation of RL fine-tuning: the log-probability of the sampled
    token, read in one fused pass without a ``[N, V]`` log-softmax.

    Parameters
    ----------
    logits : torch.Tensor or numpy.ndarray, shape ``[..., V]``
    tokens : integer tensor or array, shape ``[...]``
        Token ids in ``[0, V)``; an id outside raises :class:`ValueError` naming the row. For a
        single row (``logits`` of shape ``[V]``) a Python or numpy integer is accepted too.
    temperature : float, optional
        Score at the temperature the tokens were sampled at.
    return_entropy : bool, optional
        Also return the entropy of each row, from the same pass.
    validate : bool, optional
        See :func:`logsumexp`; with ``validate=False`` invalid rows give NaN.

    Returns
    -------
    logprobs : shape ``[...]``
    entropy : shape ``[...]``, only if ``return_entropy``.

    Examples
    --------
    >>> import torch, trmath
    >>> lp = trmath.token_logprobs(torch.tensor([[0.0, 0.0]]), torch.tensor([1]))
    >>> round(float(lp[0]), 6)  # log 1/2
    -0.693147
    """
    op = "token_logprobs_entropy" if return_entropy else "token_logprobs"
    lp, h = _single(logits, tokens, temperature, op, validate)
    return (lp, h) if return_entropy else lp


def kl(p_logits: Any, q_logits: Any, *, temperature: float = 1.0, validate: bool = True) -> Any:
    r"""Kullback--Leibler divergence :math:`\mathrm{KL}(p \,\|\, q)` of each pair of rows.

    .. math::

        \mathrm{KL}(p\|q) = \sum_i p_i \log\frac{p_i}{q_i},\qquad
        p = \operatorname{softmax}(z/T),\; q = \operatorname{softmax}(w/T)

    with :math:`0 \log(0/q) = 0` and :math:`\mathrm{KL} = +\infty` exactly when some
    :math:`q_i = 0 < p_i`. The argument order is the direction: ``kl(mu, pi)`` is DPPO's
    :math:`\mathrm{KL}(\mu\|\pi)`.

    Parameters
    ----------
    p_logits, q_logits : shape ``[..., V]`` each
        Same shape and device. Mixed 16/32-bit dtypes are computed in the wider one.
    temperature : float, optional
    validate : bool, optional
        See :func:`logsumexp`.

    Returns
    -------
    shape ``[...]``, never negative. Differentiable in both arguments:
    :math:`\partial/\partial z_j = p_j(\log\tfrac{p_j}{q_j} - \mathrm{KL})/T`,
    :math:`\partial/\partial w_j = (q_j - p_j)/T`.

    Notes
    -----
    The textbook :math:`\sum p(\log p - \log q)` cancels catastrophically when
    :math:`p \approx q` -- the trust-region regime -- and returns noise of either sign in
    float32. Here, with :math:`x_i = (z_i - w_i)/T - m` about a centre :math:`m`,
    :math:`E = \sum q_i e^{x_i} = 1 + Z`,

    .. math::

        \mathrm{KL} = \frac{1}{E}\sum_i q_i\,\phi(x_i) - \psi(Z),\qquad
        \phi(x) = x e^x - e^x + 1 \ge 0,\quad \psi(u) = \log(1+u) - \frac{u}{1+u} \ge 0,

    both sums of non-negative terms; the row is re-centred (:math:`m \leftarrow m + \log E`)
    whenever the final subtraction, with the rounding it amplifies, could exceed the accuracy
    target (it may lose up to about three bits where the pass's other errors are small). See
    :doc:`/theory/exact`.

    Examples
    --------
    >>> import torch, trmath
    >>> z = torch.tensor([0.0, 1.0, 2.0]); w = z + 1e-4 * torch.tensor([1.0, -1.0, 0.5])
    >>> float(trmath.kl(z, w)) > 0
    True
    """
    return _pair(p_logits, q_logits, temperature, "kl", validate)


def tv(p_logits: Any, q_logits: Any, *, temperature: float = 1.0, validate: bool = True) -> Any:
    r"""Total-variation distance of each pair of rows.

    .. math::

        \mathrm{TV}(p, q) = \tfrac12 \sum_i |p_i - q_i| = \sum_i \max(p_i - q_i, 0)
        \in [0, 1]

    Each term is computed as :math:`q_i\,\operatorname{expm1}(\varepsilon_i)` with the exact
    log-ratio :math:`\varepsilon_i`, never as a difference of two rounded probabilities.
    Gradient (a subgradient, :math:`s_i = \operatorname{sign}(p_i - q_i)`):
    :math:`\partial/\partial z_j = \tfrac12 p_j (s_j - \sum_i p_i s_i)/T`.

    Parameters and return value as in :func:`kl`.

    Examples
    --------
    >>> import torch, trmath
    >>> float(trmath.tv(torch.tensor([0.0, -float("inf")]), torch.tensor([-float("inf"), 0.0])))
    1.0
    """
    return _pair(p_logits, q_logits, temperature, "tv", validate)


def js(p_logits: Any, q_logits: Any, *, temperature: float = 1.0, validate: bool = True) -> Any:
    r"""Jensen--Shannon divergence of each pair of rows, in nats.

    .. math::

        \mathrm{JS}(p, q) = \tfrac12 \mathrm{KL}(p\|m) + \tfrac12 \mathrm{KL}(q\|m),
        \qquad m = \tfrac12(p + q),\qquad 0 \le \mathrm{JS} \le \log 2.

    Each half is written as :math:`\sum_i m_i\,\phi(\log(p_i/m_i))`, a sum of non-negative
    terms, evaluated from the exact log-ratio. Finite even where one of the rows has zeros.

    Parameters and return value as in :func:`kl`.

    Examples
    --------
    >>> import torch, trmath
    >>> round(float(trmath.js(torch.tensor([0.0, -float("inf")]), torch.tensor([-float("inf"), 0.0]))), 6)
    0.693147
    """
    return _pair(p_logits, q_logits, temperature, "js", validate)
