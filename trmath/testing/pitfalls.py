r"""Where the common float32 formulas go wrong, computed live against mpmath.

:func:`evaluate_pitfalls` evaluates, on a handful of representative inputs, the formula that is common in
RL training code (written in float32, as it runs in a trainer) and trmath's function, and compares
both to a 50-digit reference on the exact values the inputs represent:

* **k3 for small log-ratios**: ``exp(lr) - 1 - lr`` subtracts numbers of size 1 to leave
  :math:`\ell^2/2`; for :math:`|\ell| < 10^{-3}` in float32 it returns rounding noise or 0 (and
  sometimes a negative "KL"). trmath evaluates :math:`\operatorname{expm1}(\ell) - \ell` with a
  series near 0.
* **Binary KL near probability 1**: ``log((1 - p + 1e-8) / (1 - q + 1e-8))`` is dominated by the
  ``1e-8`` and by the rounding of ``1 - p`` when the sampled token is nearly certain.
* **Top-K KL without the tail bucket**: :math:`\sum_{i \in S} \mu_i \log(\mu_i/\pi_i)` over the kept
  tokens alone is not a divergence and goes negative.
* **Full-vocabulary KL of near-identical rows**: ``sum(p * (log_softmax(z) - log_softmax(w)))``
  in float32 returns noise of either sign for a KL of ``1e-12``.
* **The gradient of a confident token's log-probability**: :math:`\partial \log p(a)/\partial z_a
  = 1 - p(a)`, which the backward of ``log_softmax`` forms as ``g - g p`` in float32: 0 once
  :math:`1 - p(a)` is below the rounding of :math:`p(a)` (:math:`6 \cdot 10^{-8}`), and a
  rounding-sized error above. trmath forms it as :math:`-\operatorname{expm1}(\log p(a))`.

The README and the documentation show the table this module produces; the tests assert that the
textbook formulas do fail on these cases and that trmath meets its accuracy target on them.

Examples
--------
>>> from trmath.testing.pitfalls import evaluate_pitfalls
>>> rows = evaluate_pitfalls()
>>> all(r.trmath_rel_err <= 1e-5 for r in rows)
True
>>> any(r.textbook_rel_err > 0.5 for r in rows)
True
"""

from __future__ import annotations

from dataclasses import dataclass

import mpmath
import numpy as np
import torch

__all__ = ["Pitfall", "evaluate_pitfalls", "format_pitfalls"]

_DPS = 60


@dataclass(frozen=True)
class Pitfall:
    """One case: the exact value, the common float32 formula's value and trmath's value."""

    quantity: str
    case: str
    exact: float
    textbook: float
    trmath: float

    @property
    def textbook_rel_err(self) -> float:
        return _rel(self.textbook, self.exact)

    @property
    def trmath_rel_err(self) -> float:
        return _rel(self.trmath, self.exact)


def _rel(got: float, exact: float) -> float:
    if got == exact:
        return 0.0
    if not np.isfinite(got):
        return float("inf")
    return abs(got - exact) / abs(exact) if exact != 0 else float("inf")


def _mp(x) -> mpmath.mpf:
    return mpmath.mpf(float(x))


def _k3_cases():
    import trmath

    for lr_target in (1e-2, 1e-4, 1e-6):
        s = torch.tensor([-1.25], dtype=torch.float32)
        o = (s.double() + lr_target).float()
        lr32 = o - s  # float32, as in a trainer
        textbook = float(torch.exp(lr32) - 1 - lr32)
        mine = float(trmath.k3(s, o))
        with mpmath.workdps(_DPS):
            lr = _mp(o) - _mp(s)
            exact = float(mpmath.expm1(lr) - lr)
        yield Pitfall("k3 = expm1(lr) - lr", f"lr = {float(lr):.0e}", exact, textbook, mine)


def _binary_cases():
    import trmath

    for lp_v, lq_v in ((-1e-3, -2e-3), (-1e-6, -3e-6), (-1e-7, -4e-7)):
        lp = torch.tensor([lp_v], dtype=torch.float32)
        lq = torch.tensor([lq_v], dtype=torch.float32)
        p, q = lp.exp(), lq.exp()
        textbook = float(p * torch.log(p / q) + (1 - p) * torch.log((1 - p + 1e-8) / (1 - q + 1e-8)))
        mine = float(trmath.binary_kl(lp, lq))
        with mpmath.workdps(_DPS):
            P, Q = mpmath.exp(_mp(lp)), mpmath.exp(_mp(lq))
            exact = float(P * mpmath.log(P / Q) + (1 - P) * mpmath.log((1 - P) / (1 - Q)))
        yield Pitfall("binary KL", f"mu(a) = 1 - {-lp_v:.0e}", exact, textbook, mine)


def _topk_cases():
    import trmath

    g = torch.Generator().manual_seed(7)
    V, K = 1000, 20
    z = torch.randn(V, generator=g, dtype=torch.float64) * 2
    w = z.clone()
    top = torch.topk(z, K).indices
    w[top] += 0.3  # the trained policy moved mass onto the kept tokens
    lp = torch.log_softmax(z, -1)[top].float()
    lq = torch.log_softmax(w, -1)[top].float()
    textbook = float((lp.exp() * (lp - lq)).sum())
    mine = float(trmath.topk_kl(lp, lq))
    with mpmath.workdps(_DPS):
        P = [mpmath.exp(_mp(x)) for x in lp]
        Q = [mpmath.exp(_mp(x)) for x in lq]
        Rp, Rq = 1 - mpmath.fsum(P), 1 - mpmath.fsum(Q)
        exact = float(mpmath.fsum(a * mpmath.log(a / b) for a, b in zip(P, Q)) + Rp * mpmath.log(Rp / Rq))
    yield Pitfall("top-K KL (K = 20)", "no tail bucket", exact, textbook, mine)


def _exact_cases():
    import trmath
    from trmath.testing.oracles import mp_kl

    g = torch.Generator().manual_seed(3)
    V = 32768
    z = (torch.randn(V, generator=g, dtype=torch.float64) * 3).float()
    w = (z.double() + 1e-6 * torch.randn(V, generator=g, dtype=torch.float64)).float()
    lpz, lpw = torch.log_softmax(z, -1), torch.log_softmax(w, -1)
    textbook = float((lpz.exp() * (lpz - lpw)).sum())
    mine = float(trmath.kl(z, w))
    exact = float(mp_kl(z.numpy(), w.numpy()))
    yield Pitfall("full KL, V = 32768", f"near-identical (KL = {exact:.0e})", exact, textbook, mine)


def _token_grad_cases():
    import trmath

    for rest in (1e-4, 1e-6, 1e-9):
        # a confident sampled token: p(a) = 1 - rest, the others sharing the rest
        z = torch.zeros(1, 8, dtype=torch.float64)
        z[0, 3] = float(np.log((1 - rest) / rest * 7))
        z = z.float()
        mp_z = [_mp(v) for v in z[0].tolist()]
        with mpmath.workdps(_DPS):
            exps = [mpmath.exp(v - mp_z[3]) for v in mp_z]
            exact = float(mpmath.fsum(exps[:3] + exps[4:]) / mpmath.fsum(exps))  # 1 - p(a)
        zt = z.clone().requires_grad_(True)
        torch.log_softmax(zt, -1)[0, 3].backward()  # float32 autograd, as in trainers
        textbook = float(zt.grad[0, 3])
        zm = z.clone().requires_grad_(True)
        trmath.token_logprobs(zm, torch.tensor([3])).sum().backward()
        mine = float(zm.grad[0, 3])
        yield Pitfall("d log p(a) / d z_a", f"p(a) = 1 - {rest:.0e}", exact, textbook, mine)


def evaluate_pitfalls() -> list[Pitfall]:
    """Evaluate every case (about a second; needs :mod:`mpmath`)."""
    rows: list[Pitfall] = []
    for gen in (_k3_cases, _binary_cases, _topk_cases, _exact_cases, _token_grad_cases):
        rows.extend(gen())
    return rows


def format_pitfalls(rows: list[Pitfall] | None = None, markdown: bool = False) -> str:
    """The cases as a table (plain text, or Markdown for the README)."""
    rows = evaluate_pitfalls() if rows is None else rows
    head = ["quantity", "case", "exact", "float32 textbook", "rel. error", "trmath", "rel. error"]
    body = [[r.quantity, r.case, f"{r.exact:.6e}", f"{r.textbook:.6e}", f"{r.textbook_rel_err:.1e}",
             f"{r.trmath:.6e}", f"{r.trmath_rel_err:.1e}"] for r in rows]
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(b) + " |" for b in body]
        return "\n".join(lines)
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([fmt(head), fmt(["-" * w for w in widths])] + [fmt(b) for b in body])
