r"""Exact expectations of sampled KL estimators, by enumeration.

A sampled estimator is a random variable; whether it is unbiased, what its variance is and --
above all -- what its *gradient* estimates are questions about expectations. For a small
vocabulary (and small trees of sequences) those expectations are finite sums, computed here
exactly:

.. math::

    \mathbb E_{x\sim d}[\mathrm{est}(x)] = \sum_{x:\,d(x)>0} d(x)\,\mathrm{est}(x), \qquad
    \operatorname{Var} = \sum_x d(x)\,(\mathrm{est}(x) - \mathbb E)^2,

    \mathbb E[\nabla_\theta \mathrm{est}] =
    \nabla_\theta \sum_x \mathrm{sg}(d(x))\,\mathrm{est}_\theta(x),
    \qquad
    \mathbb E[\mathrm{sg}(\mathrm{est})\,\nabla_\theta \log d_\theta] =
    \nabla_\theta \sum_x d_\theta(x)\,\mathrm{sg}(\mathrm{est}(x)),

where :math:`d` is the distribution the tokens are drawn from (the sampler, or a behaviour
policy). They are reported next to the true divergences and their gradients, so that any
trainer can check its own KL term (:doc:`/guides/verify_kl`):

* :func:`exact_expectation` -- one categorical, float64, gradients by autograd;
* :func:`mp_expectation` -- the same mean and variance in :mod:`mpmath` for the built-in
  estimators or any estimator written on :class:`mpmath.mpf` numbers;
* :func:`mp_estimator` -- one estimator's value at ``>= 50`` digits on the exact values the
  float inputs represent (the accuracy oracle of :func:`trmath.k1`, :func:`trmath.k2`,
  :func:`trmath.k3`);
* :func:`exact_sequence_expectation` -- a tree of sequences of length ``T`` over ``V`` tokens
  (``V**T`` leaves), for sequence estimators such as :func:`trmath.rb_kl`.

This module does not import trmath's compiled extension; the estimator under test is the
caller's.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Union

import mpmath
import numpy as np
import torch

from .oracles import DEFAULT_DPS

__all__ = [
    "MP_ESTIMATORS",
    "Expectation",
    "SequenceExpectation",
    "exact_expectation",
    "exact_sequence_expectation",
    "mp_estimator",
    "mp_expectation",
]


# --------------------------------------------------------------------------------------------
# one categorical, float64


@dataclass(frozen=True)
class Expectation:
    r"""Exact moments of a token-level estimator and the true divergences (float64).

    Gradients are with respect to the logits named by ``wrt`` in :func:`exact_expectation`
    (the trained policy :math:`\pi_\theta`), as arrays of shape ``[V]``.
    """

    #: :math:`\mathbb E_{x\sim d}[\mathrm{est}]`.
    mean: float
    #: :math:`\operatorname{Var}_{x\sim d}[\mathrm{est}]`.
    variance: float
    #: :math:`\mathbb E[\nabla_\theta\mathrm{est}]`, draws held fixed (the estimator in a loss).
    loss_gradient: np.ndarray
    #: :math:`\mathbb E[\mathrm{sg}(\mathrm{est})\nabla_\theta\log d_\theta]` (the estimator as a
    #: detached reward penalty); zero when the draws do not depend on :math:`\theta`.
    reward_gradient: np.ndarray
    #: :math:`\nabla_\theta\,\mathbb E_{x\sim d_\theta}[\mathrm{est}]`, the sum of the two above.
    total_gradient: np.ndarray
    #: :math:`\mathrm{KL}(\pi\|o)`, ``pi`` the distribution of ``sampler_logits``.
    reverse_kl: float
    #: :math:`\mathrm{KL}(o\|\pi)`.
    forward_kl: float
    #: :math:`\nabla_\theta\mathrm{KL}(\pi\|o)`.
    reverse_kl_gradient: np.ndarray
    #: :math:`\nabla_\theta\mathrm{KL}(o\|\pi)`.
    forward_kl_gradient: np.ndarray


def _row64(x: Any, name: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().to(torch.float64).numpy()
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 1 or a.size == 0:
        raise ValueError(f"{name}: expected one row of logits, shape [V], got shape {a.shape}")
    if np.isnan(a).any() or (a == np.inf).any():
        i = int(np.flatnonzero(np.isnan(a) | (a == np.inf))[0])
        raise ValueError(f"{name}: contains NaN or +inf at index {i}")
    if (a == -np.inf).all():
        raise ValueError(f"{name}: is entirely -inf (no distribution)")
    return torch.tensor(a, dtype=torch.float64)


def _kl_rows(lp: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
    """``sum_{p>0} p (log p - log q)`` (``+inf`` if some ``q = 0 < p``), differentiable."""
    p = torch.exp(lp)
    on = p > 0
    diff = torch.where(on, lp - lq, torch.zeros_like(lp))
    return torch.where(on, p * diff, torch.zeros_like(lp)).sum(-1)


def _grad(y: torch.Tensor, x: torch.Tensor) -> np.ndarray:
    if not y.requires_grad:
        return np.zeros(tuple(x.shape))
    (g,) = torch.autograd.grad(y, x, retain_graph=True, allow_unused=True)
    return np.zeros(tuple(x.shape)) if g is None else g.numpy().copy()


def exact_expectation(
    estimator: Callable[..., Any],
    sampler_logits: Any,
    other_logits: Any,
    *,
    behaviour_logits: Any = None,
    wrt: str = "sampler",
) -> Expectation:
    r"""Mean, variance and expected gradients of a token-level estimator, by enumeration.

    Tokens are drawn from :math:`d = \operatorname{softmax}(\text{behaviour\_logits})` if given,
    else from :math:`\pi = \operatorname{softmax}(\text{sampler\_logits})`; the estimator is
    evaluated on every token of :math:`d`'s support (tokens with :math:`d(x) = 0` are never
    passed to it).

    Parameters
    ----------
    estimator : callable
        ``estimator(sampler_logprob, other_logprob)`` or, when ``behaviour_logits`` is given,
        ``estimator(sampler_logprob, other_logprob, behaviour_logprob)``: float64 torch tensors
        ``[n]`` (one entry per token of the support) in, a tensor ``[n]`` of estimates out,
        differentiable (e.g. :func:`trmath.k3`, or your own KL term).
    sampler_logits, other_logits : array_like, shape ``[V]``
        Logits of :math:`\pi` (the policy whose KL to :math:`o` is estimated) and of :math:`o`.
    behaviour_logits : array_like, shape ``[V]``, optional
        Logits of the distribution the tokens are drawn from (off-policy, or a truncated
        sampler), held fixed.
    wrt : {"sampler", "other"}, optional
        Which logits are trained (:math:`\theta`). Default: the sampler's.

    Returns
    -------
    Expectation

    Examples
    --------
    >>> import numpy as np, trmath
    >>> from trmath.testing import exact_expectation
    >>> pi, ref = np.array([0.5, -0.3, 1.2]), np.array([0.0, 0.4, 0.9])
    >>> e = exact_expectation(trmath.k3, pi, ref)
    >>> bool(np.isclose(e.mean, e.reverse_kl, rtol=1e-12))              # k3 is unbiased
    True
    >>> bool(np.allclose(e.loss_gradient, e.forward_kl_gradient, atol=1e-12))  # forward KL!
    True
    """
    if wrt not in ("sampler", "other"):
        raise ValueError(f"wrt: expected 'sampler' or 'other', got {wrt!r}")
    zs = _row64(sampler_logits, "sampler_logits")
    zo = _row64(other_logits, "other_logits")
    if zo.shape != zs.shape:
        raise ValueError("sampler_logits and other_logits: shapes differ "
                         f"({tuple(zs.shape)} vs {tuple(zo.shape)})")
    theta = zs if wrt == "sampler" else zo
    theta.requires_grad_(True)
    ls = torch.log_softmax(zs, -1)
    lo = torch.log_softmax(zo, -1)
    if behaviour_logits is not None:
        zb = _row64(behaviour_logits, "behaviour_logits")
        if zb.shape != zs.shape:
            raise ValueError(f"behaviour_logits: expected shape {tuple(zs.shape)}, "
                             f"got {tuple(zb.shape)}")
        lb = torch.log_softmax(zb, -1)
        ld = lb
    else:
        lb = None
        ld = ls
    supp = torch.nonzero(torch.exp(ld.detach()) > 0).reshape(-1)
    args = [ls[supp], lo[supp]] + ([lb[supp]] if lb is not None else [])
    v = estimator(*args)
    if not isinstance(v, torch.Tensor):
        raise TypeError(f"estimator: expected a torch.Tensor result, got {type(v).__name__}")
    v = v.to(torch.float64)
    if tuple(v.shape) != (supp.numel(),):
        raise ValueError(f"estimator: expected a result of shape ({supp.numel()},), "
                         f"got {tuple(v.shape)}")
    d = torch.exp(ld[supp])
    mean = (d.detach() * v).sum()
    var = (d.detach() * (v.detach() - mean.detach()) ** 2).sum()
    loss_g = _grad(mean, theta)
    reward_g = _grad((d * v.detach()).sum(), theta)
    rev = _kl_rows(ls, lo)
    fwd = _kl_rows(lo, ls)
    return Expectation(
        mean=float(mean.detach()), variance=float(var), loss_gradient=loss_g,
        reward_gradient=reward_g, total_gradient=loss_g + reward_g,
        reverse_kl=float(rev.detach()), forward_kl=float(fwd.detach()),
        reverse_kl_gradient=_grad(rev, theta), forward_kl_gradient=_grad(fwd, theta))


# --------------------------------------------------------------------------------------------
# multiple precision


def _mp_k3(lr: mpmath.mpf, dps: int) -> mpmath.mpf:
    """``expm1(lr) - lr`` with full relative precision (series for ``|lr| < 1/2``)."""
    if mpmath.isinf(lr):
        return mpmath.inf
    with mpmath.workdps(dps + 20):
        if abs(lr) < 0.5:
            term = lr * lr / 2
            total = term
            n = 2
            tiny = mpmath.mpf(10) ** (-(dps + 15))
            while abs(term) > tiny * abs(total):
                n += 1
                term = term * lr / n
                total += term
            return +total
        return mpmath.expm1(lr) - lr  # cancellation at most ~2 digits for |lr| >= 1/2


def _mp_base(name: str) -> Callable[[mpmath.mpf, int], mpmath.mpf]:
    if name.startswith("k1"):
        return lambda lr, dps: -lr
    if name.startswith("k2"):
        return lambda lr, dps: lr * lr / 2
    return _mp_k3


#: Names understood by :func:`mp_estimator` and :func:`mp_expectation` (the token-level
#: estimators of :data:`trmath.ESTIMATORS`; a straight-through variant has its base's value).
MP_ESTIMATORS: tuple[str, ...] = ("k1", "k2", "k3", "k1_st", "k3_st", "k1_is", "k2_is", "k3_is")


def _mp_value(name: str, s: mpmath.mpf, o: mpmath.mpf, b: Optional[mpmath.mpf],
              dps: int) -> mpmath.mpf:
    with mpmath.workdps(dps + 20):
        lr = o - s  # exact at this precision for float inputs of moderate exponent range
        val = _mp_base(name)(lr, dps)
        if name.endswith("_is"):
            if b is None:
                raise ValueError(f"behaviour_logprob: required by {name!r}")
            val = mpmath.exp(s - b) * val
        return val


def mp_estimator(
    name: str,
    sampler_logprob: float,
    other_logprob: float,
    behaviour_logprob: Optional[float] = None,
    *,
    dps: int = DEFAULT_DPS,
) -> mpmath.mpf:
    r"""Value of a built-in estimator at ``dps`` digits on the exact values of float inputs.

    .. math::

        \ell = o - s,\quad k_1 = -\ell,\quad k_2 = \ell^2/2,\quad
        k_3 = \sum_{n \ge 2} \ell^n / n!\ \ (|\ell| < \tfrac12),\ \operatorname{expm1}(\ell) - \ell
        \text{ otherwise};\qquad (\cdot)\text{\_is} = e^{s - b}\,(\cdot).

    Parameters
    ----------
    name : str
        One of :data:`MP_ESTIMATORS`.
    sampler_logprob, other_logprob, behaviour_logprob : float
        The inputs, taken at their exact binary values.
    dps : int, optional
        Decimal digits of the result.

    Returns
    -------
    mpmath.mpf

    Examples
    --------
    >>> from trmath.testing import mp_estimator
    >>> import mpmath
    >>> mpmath.nstr(mp_estimator("k3", 0.0, 1e-30), 25)   # 1e-30 is 1.0000000000000000083e-30
    '5.000000000000000833...e-61'
    """
    if name not in MP_ESTIMATORS:
        raise ValueError(f"name: unknown estimator {name!r}; "
                         f"valid names: {', '.join(MP_ESTIMATORS)}")
    s, o = mpmath.mpf(float(sampler_logprob)), mpmath.mpf(float(other_logprob))
    b = None if behaviour_logprob is None else mpmath.mpf(float(behaviour_logprob))
    with mpmath.workdps(dps + 30):
        val = _mp_value(name, s, o, b, dps)
    with mpmath.workdps(dps):
        return +val


def _mp_log_softmax(z: np.ndarray, dps: int) -> list:
    with mpmath.workdps(dps + 20):
        xs = [mpmath.mpf(float(v)) for v in z]
        m = max(x for x in xs if not mpmath.isinf(x))
        lse = m + mpmath.log(mpmath.fsum(mpmath.exp(x - m) for x in xs if not mpmath.isinf(x)))
        return [x - lse if not mpmath.isinf(x) else mpmath.ninf for x in xs]


def mp_expectation(
    estimator: Union[str, Callable[..., mpmath.mpf]],
    sampler_logits: Any,
    other_logits: Any,
    *,
    behaviour_logits: Any = None,
    dps: int = DEFAULT_DPS,
) -> tuple[mpmath.mpf, mpmath.mpf]:
    r"""Mean and variance of an estimator in multiple precision, by enumeration.

    As :func:`exact_expectation` (values only), with every log-probability and every sum at
    ``dps + 20`` digits.

    Parameters
    ----------
    estimator : str or callable
        A name of :data:`MP_ESTIMATORS`, or ``f(sampler_logprob, other_logprob[,
        behaviour_logprob])`` on :class:`mpmath.mpf` scalars returning an ``mpf``.
    sampler_logits, other_logits, behaviour_logits : array_like, shape ``[V]``
        As in :func:`exact_expectation`.
    dps : int, optional

    Returns
    -------
    (mean, variance) : tuple of mpmath.mpf

    Examples
    --------
    >>> import numpy as np
    >>> from trmath.testing import mp_expectation, mp_kl
    >>> pi, ref = np.array([0.5, -0.3, 1.2]), np.array([0.0, 0.4, 0.9])
    >>> mean, var = mp_expectation("k1", pi, ref)
    >>> abs(mean - mp_kl(pi, ref)) < 1e-45
    True
    """
    zs = _row64(sampler_logits, "sampler_logits").numpy()
    zo = _row64(other_logits, "other_logits").numpy()
    zb = None if behaviour_logits is None else _row64(behaviour_logits, "behaviour_logits").numpy()
    if isinstance(estimator, str):
        if estimator not in MP_ESTIMATORS:
            raise ValueError(f"estimator: unknown name {estimator!r}; "
                             f"valid names: {', '.join(MP_ESTIMATORS)}")
        name = estimator

        def f(s, o, b=None):
            return _mp_value(name, s, o, b, dps)
    else:
        f = estimator
    ls = _mp_log_softmax(zs, dps)
    lo = _mp_log_softmax(zo, dps)
    lb = None if zb is None else _mp_log_softmax(zb, dps)
    ld = ls if lb is None else lb
    with mpmath.workdps(dps + 20):
        pts = []
        for i in range(len(zs)):
            if mpmath.isinf(ld[i]):
                continue
            args = (ls[i], lo[i]) if lb is None else (ls[i], lo[i], lb[i])
            pts.append((mpmath.exp(ld[i]), f(*args)))
        mean = mpmath.fsum(d * v for d, v in pts)
        var = mpmath.fsum(d * (v - mean) ** 2 for d, v in pts)
    with mpmath.workdps(dps):
        return +mean, +var


# --------------------------------------------------------------------------------------------
# sequences


@dataclass(frozen=True)
class SequenceExpectation:
    r"""Exact moments of a sequence estimator over a tree, and the true sequence KL.

    Gradients are with respect to the policy's tree (a tuple of arrays shaped like it).
    """

    #: :math:`\mathbb E_{y\sim P}[\mathrm{value}(y)]`.
    mean: float
    #: :math:`\operatorname{Var}_{y\sim P}[\mathrm{value}(y)]`.
    variance: float
    #: Per-position means ``[T]`` (``None`` if the estimator gives no per-position terms).
    per_position_mean: Optional[np.ndarray]
    #: Per-position variances ``[T]`` (``None`` likewise).
    per_position_variance: Optional[np.ndarray]
    #: :math:`\mathbb E_{y\sim P}[\nabla_\theta\,\mathrm{loss}(y)]`, draws held fixed.
    loss_gradient: tuple[np.ndarray, ...]
    #: :math:`\mathrm{KL}(P\|Q) = \sum_y P(y)\log\frac{P(y)}{Q(y)}` over whole sequences.
    kl: float
    #: :math:`\nabla_\theta\mathrm{KL}(P\|Q)`.
    kl_gradient: tuple[np.ndarray, ...]


def _tree(tree: Sequence[Any], name: str, grad: bool) -> list[torch.Tensor]:
    if len(tree) == 0:
        raise ValueError(f"{name}: expected a list of T >= 1 arrays")
    out = []
    V = np.asarray(tree[0]).shape[-1]
    for n, level in enumerate(tree):
        a = level.detach().cpu().numpy() if isinstance(level, torch.Tensor) else level
        a = np.asarray(a, dtype=np.float64)
        if a.shape != (V**n, V):
            raise ValueError(f"{name}[{n}]: expected shape {(V ** n, V)} (one row per prefix "
                             f"of length {n}), got {a.shape}")
        if np.isnan(a).any() or (a == np.inf).any() or (a == -np.inf).all(-1).any():
            raise ValueError(f"{name}[{n}]: contains NaN, +inf or an entirely -inf row")
        out.append(torch.tensor(a, dtype=torch.float64, requires_grad=grad))
    return out


def exact_sequence_expectation(
    estimator: Callable[..., Any],
    p_tree: Sequence[Any],
    q_tree: Sequence[Any],
) -> SequenceExpectation:
    r"""Mean, variance and expected gradient of a sequence estimator over all ``V**T`` sequences.

    A *tree* is a list of ``T`` arrays; ``tree[n]`` has shape ``[V**n, V]`` and holds the logits
    of the next-token distribution after each prefix of length ``n`` (row index: the prefix
    read as a base-``V`` number, first token most significant). Sequences with
    :math:`P(y) = 0` are left out.

    Parameters
    ----------
    estimator : callable
        ``estimator(p_logits [N, T, V], q_logits [N, T, V], tokens [N, T])`` on float64 torch
        tensors, returning either a tensor ``[N]`` (value and loss), or a tuple ``(value [N],
        loss [N])`` or ``(value, loss, per_position [N, T])`` -- such as :func:`trmath.rb_kl`.
    p_tree, q_tree : list of array_like
        The sampling (trained) policy and the other policy.

    Returns
    -------
    SequenceExpectation

    Examples
    --------
    >>> import numpy as np, trmath
    >>> from trmath.testing import exact_sequence_expectation
    >>> rng = np.random.default_rng(0)
    >>> p = [rng.normal(size=(1, 2)), rng.normal(size=(2, 2))]
    >>> q = [rng.normal(size=(1, 2)), rng.normal(size=(2, 2))]
    >>> e = exact_sequence_expectation(trmath.rb_kl, p, q)
    >>> bool(np.isclose(e.mean, e.kl, rtol=1e-12))
    True
    """
    P = _tree(p_tree, "p_tree", True)
    Q = _tree(q_tree, "q_tree", False)
    if len(Q) != len(P) or Q[0].shape[-1] != P[0].shape[-1]:
        raise ValueError("p_tree and q_tree: different lengths or vocabulary sizes")
    T, V = len(P), P[0].shape[-1]
    seqs = torch.tensor(list(itertools.product(range(V), repeat=T)), dtype=torch.long)
    seqs = seqs.reshape(-1, T)
    prefix = torch.zeros_like(seqs)
    for n in range(1, T):
        prefix[:, n] = prefix[:, n - 1] * V + seqs[:, n - 1]
    pz = torch.stack([P[n][prefix[:, n]] for n in range(T)], 1)
    qz = torch.stack([Q[n][prefix[:, n]] for n in range(T)], 1)
    lp = torch.log_softmax(pz, -1).gather(-1, seqs[..., None])[..., 0]
    lq = torch.log_softmax(qz, -1).gather(-1, seqs[..., None])[..., 0]
    logP, logQ = lp.sum(1), lq.sum(1)
    prob = torch.exp(logP)
    on = torch.nonzero(prob.detach() > 0).reshape(-1)
    res = estimator(pz[on], qz[on], seqs[on])
    per = None
    if isinstance(res, torch.Tensor):
        value = loss = res
    else:
        value, loss = res[0], res[1]
        per = res[2] if len(res) > 2 else None
    value, loss = value.to(torch.float64), loss.to(torch.float64)
    w = prob[on].detach()
    mean = (w * value.detach()).sum()
    var = (w * (value.detach() - mean) ** 2).sum()
    pm = pv = None
    if per is not None:
        per = per.detach().to(torch.float64)
        pm_t = (w[:, None] * per).sum(0)
        pm, pv = pm_t.numpy(), (w[:, None] * (per - pm_t) ** 2).sum(0).numpy()
    exp_loss = (w * loss).sum()
    if exp_loss.requires_grad:
        gl = torch.autograd.grad(exp_loss, P, allow_unused=True, retain_graph=True)
        loss_g = tuple(np.zeros(tuple(x.shape)) if g is None else g.numpy() for g, x in zip(gl, P))
    else:
        loss_g = tuple(np.zeros(tuple(x.shape)) for x in P)
    kl = (prob[on] * (logP[on] - logQ[on])).sum()
    gk = torch.autograd.grad(kl, P, allow_unused=True)
    kl_g = tuple(np.zeros(tuple(x.shape)) if g is None else g.numpy() for g, x in zip(gk, P))
    return SequenceExpectation(
        mean=float(mean), variance=float(var), per_position_mean=pm, per_position_variance=pv,
        loss_gradient=loss_g, kl=float(kl.detach()), kl_gradient=kl_g)
