#!/usr/bin/env python
"""Benchmark suite ``objectives``: ``trmath.policy_loss`` against a plain torch PPO-clip loss.

For ``ppo`` (also with ``validate=False``), ``cispo``, ``gspo`` and ``dppo`` with the
``binary_tv``, ``topk_kl`` (``K = 20``) and ``exact_kl`` divergences it times the loss alone
(``fwd``, with autograd recording) and the loss plus its gradient with respect to the
log-probabilities (``fwd+bwd``) on ``[B, T]`` tokens with a response mask, token-mean
aggregation, against the plain PPO-clip loss a trainer writes in five lines (eager and, in full
mode, compiled). What trmath adds over those five lines -- validation, masked selection instead of
multiplication, the metrics dictionary (clip fractions, ratio statistics, mismatch diagnostics),
and for DPPO the divergence -- is what the ratio measures; ``exact_kl`` also reads ``[B, T, V]``
logits, so it runs on a smaller ``[B, T]``.

Every loss and gradient is first checked against the objective's formula evaluated in float64
on the same inputs (autograd in float64 for the gradient). Run through ``run.py`` (``--suites
objectives``) or ``python benchmarks/bench_objectives.py [--quick] [--tiny] [--out DIR]``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
# run directly: the same OpenMP wait policy as run.py and bench_exact.py (set before torch loads)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import _common as C  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import trmath  # noqa: E402

NAME = "objectives"
K = 20
EPS_LOW, EPS_HIGH = 0.2, 0.28
SHAPES = {  # mode -> [B, T] for every objective, [B, T, V] for dppo exact_kl
    "tiny": ((4, 64), (2, 8, 512)),
    "quick": ((16, 512), (2, 16, 32768)),
    "full": ((64, 2048), (4, 256, 32768)),
}
# Tolerances against float64 on the same inputs.
#  * Loss (a scalar): |loss - ref| <= 1e-5 S (trmath) or 1e-3 S (torch), S = mean over valid
#    tokens of |l_t|. The token-mean is a float32 sum of up to 131072 terms of either sign:
#    pairwise summation errs by at most about log2(n) 2^-24 sum|l_t| ~ 1e-6 S; the loss itself
#    can be near 0 by cancellation, so a bound relative to |loss| would be meaningless.
#  * Gradient (per token, -A_t w_t / N, a product of a few float32 roundings): trmath
#    1e-5 |g| + 1e-7 max|g|; torch 1e-2 |g| + 1e-3 max|g| (the gate confirms it computes the
#    same quantity).
LOSS_TOL = {"trmath": 1e-5, "torch": 1e-3}
GRAD_TOL = {"trmath": (1e-5, 1e-7), "torch": (1e-2, 1e-3)}


# ---------------------------------------------------------------------------------------------
# the plain torch baseline, and the float64 references
# ---------------------------------------------------------------------------------------------
def torch_ppo(lp, mu, adv, mask):
    """The PPO-clip loss a trainer writes (clip-higher 0.2 / 0.28, token-mean)."""
    ratio = torch.exp(lp - mu)
    A = adv.unsqueeze(-1)
    loss = -torch.min(ratio * A, ratio.clamp(1 - EPS_LOW, 1 + EPS_HIGH) * A)
    m = mask.to(loss.dtype)
    return (loss * m).sum() / m.sum()


def ref_token_loss(name: str, lp, mu, adv, mask, D=None, delta=None):
    """Per-token loss of objective ``name`` in float64 from the formulas of its docstring
    (``lp`` carries the gradient), 0 at padding."""
    A = adv.unsqueeze(-1).expand_as(lp)
    if name == "ppo":
        r = torch.exp(lp - mu)
        ell = -torch.min(r * A, r.clamp(1 - EPS_LOW, 1 + EPS_HIGH) * A)
    elif name == "cispo":  # -sg(clip(r, max=1+eps_high)) A log pi (no lower clip)
        r = torch.exp(lp.detach() - mu).clamp(max=1 + EPS_HIGH)
        ell = -r * A * lp
    elif name == "gspo":  # PPO clip (3e-4 / 4e-4) on s_bt = sg(s_b) pi / sg(pi)
        m = mask.to(lp.dtype)
        n = m.sum(-1, keepdim=True).clamp_min(1)
        seq = ((lp.detach() - mu) * m).sum(-1, keepdim=True) / n
        s = torch.exp(seq + lp - lp.detach())
        ell = -torch.min(s * A, s.clamp(1 - 3e-4, 1 + 4e-4) * A)
    elif name == "dppo":  # -A sg(r) M log pi, M from the divergence D and the threshold
        r = torch.exp(lp.detach() - mu)
        drop = ((A > 0) & (r > 1) & (D > delta)) | ((A < 0) & (r < 1) & (D > delta))
        ell = torch.where(drop, torch.zeros_like(lp), -A * r * lp)
    else:
        raise ValueError(name)
    return torch.where(mask, ell, torch.zeros_like(ell))


def reference(name, lp, mu, adv, mask, **kw):
    """``(loss, scale S, d loss / d lp)`` in float64."""
    x = lp.detach().double().requires_grad_()
    ell = ref_token_loss(name, x, mu.double(), adv.double(), mask, **kw)
    n = mask.sum()
    loss = ell.sum() / n
    (g,) = torch.autograd.grad(loss, x)
    return loss.detach(), float(ell.detach().abs().sum() / n), g


# ---------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------
def token_inputs(B: int, T: int, seed: int):
    """Rollout log-probs log mu(a) (mu(a) = sigmoid(x), from ~1e-6 to 1 - 1e-6), the trained
    policy 0.1 away in logit space (1.0 on one token in ten: the ones the clips and DPPO's
    trust region act on), per-sequence advantages, responses of random length."""
    g = torch.Generator().manual_seed(seed + 31 + B * T)
    x = torch.randn(B, T, generator=g).mul_(3.0).add_(1.0)
    mu = F.logsigmoid(x)
    far = torch.rand(B, T, generator=g) < 0.1
    noise = torch.randn(B, T, generator=g) * torch.where(far, 1.0, 0.1)
    lp = F.logsigmoid(x + noise)
    adv = torch.randn(B, generator=g)
    lens = torch.randint(max(1, T // 4), T + 1, (B,), generator=g)
    mask = torch.arange(T).unsqueeze(0) < lens.unsqueeze(1)
    return lp, mu, adv, mask


def topk_inputs(B: int, T: int, seed: int):
    """``[B, T, K]`` log-probabilities of the same K tokens under mu and pi (tail bucket kept)."""
    g = torch.Generator().manual_seed(seed + 37)
    z = torch.randn(B, T, K + 1, generator=g).mul_(2.0)
    z[..., K] += 3.0
    far = (torch.rand(B, T, 1, generator=g) < 0.1).float()  # one position in ten moves far
    w = z + (0.1 + 0.9 * far) * torch.randn(B, T, K + 1, generator=g)
    return F.log_softmax(w, -1)[..., :K].contiguous(), F.log_softmax(z, -1)[..., :K].contiguous()


def ref_topk_kl(lmu, lpi):
    """KL(mu || pi) on the K tokens plus the tail bucket, float64, tails via expm1."""
    lmu, lpi = lmu.double(), lpi.double()
    rm = -torch.expm1(torch.logsumexp(lmu, -1))
    rp = -torch.expm1(torch.logsumexp(lpi, -1))
    return (lmu.exp() * (lmu - lpi)).sum(-1) + rm * (rm.log() - rp.log())


# ---------------------------------------------------------------------------------------------
# the suite
# ---------------------------------------------------------------------------------------------
def _case(s: C.Suite, case: str, shape: str, lp, mu, adv, mask, trm_calls: dict, refname: str,
          refkw: dict) -> None:
    ref_ppo = reference("ppo", lp, mu, adv, mask)
    ref_obj = reference(refname, lp, mu, adv, mask, **refkw)
    note = "trmath: loss + metrics; torch ppo: loss only"
    if "D" in refkw:  # how much of the batch DPPO's trust region masks (float64 reference)
        A = adv.unsqueeze(-1).expand_as(mu).double()
        r = (lp.double() - mu.double()).exp()
        D, dl = refkw["D"], refkw["delta"]
        drop = mask & (((A > 0) & (r > 1) & (D > dl)) | ((A < 0) & (r < 1) & (D > dl)))
        pct = 100.0 * float(drop.sum()) / float(mask.sum())
        note += f"; the trust region masks {pct:.1f}% of tokens"
    leaf = lp.detach().clone().requires_grad_()

    def loss_check(ref, who):
        return lambda o: C.check_close(o, ref[0], 1e-6 if who == "trmath" else 1e-3,
                                       LOSS_TOL[who] * ref[1], "loss")

    def grad_check(ref, who):
        rt, at = GRAD_TOL[who]
        return lambda g: C.check_close(g, ref[2], rt, at * float(ref[2].abs().max()), "grad")

    def tol_txt(who, pas):
        rt, at = GRAD_TOL[who]
        if pas == "fwd":
            return f"{LOSS_TOL[who]:g} S"
        return f"rtol {rt:g} + {at:g} max|g|"

    base = {"torch ppo": lambda x: torch_ppo(x, mu, adv, mask)}
    cf = s.compiled(torch_ppo, case)
    if cf is not None:
        base["torch ppo compiled"] = lambda x: cf(x, mu, adv, mask)
    for pas in ("fwd", "fwd+bwd"):
        methods = {}
        for name, f in list(base.items()) + list(trm_calls.items()):
            who = "torch" if name.startswith("torch") else "trmath"
            ref = ref_ppo if who == "torch" else ref_obj
            if pas == "fwd":
                methods[name] = ((lambda f=f: f(leaf)), loss_check(ref, who), tol_txt(who, pas))
            else:
                methods[name] = ((lambda f=f: torch.autograd.grad(f(leaf), leaf)[0]),
                                 grad_check(ref, who), tol_txt(who, pas))
        s.compare(case, pas, shape, methods, baseline="torch ppo", note=note)


def run(s: C.Suite) -> None:
    (B, T), (Bx, Tx, V) = SHAPES[s.cfg.mode]
    lp, mu, adv, mask = token_inputs(B, T, s.cfg.seed)
    shape = f"[{B}, {T}]"

    def pl(name, **kw):
        return lambda x: trmath.policy_loss(name, x, mu, adv, mask, **kw)[0]

    s.guard("ppo", lambda: _case(s, "ppo", shape, lp, mu, adv, mask, {
        "trmath ppo": pl("ppo", eps_low=EPS_LOW, eps_high=EPS_HIGH),
        "trmath ppo validate=False": pl("ppo", eps_low=EPS_LOW, eps_high=EPS_HIGH, validate=False),
    }, "ppo", {}))
    s.guard("cispo", lambda: _case(s, "cispo", shape, lp, mu, adv, mask,
                                   {"trmath cispo": pl("cispo", eps_high=EPS_HIGH)}, "cispo", {}))
    s.guard("gspo", lambda: _case(s, "gspo", shape, lp, mu, adv, mask,
                                  {"trmath gspo": pl("gspo")}, "gspo", {}))
    # DPPO: D = |mu(a) - pi(a)| (binary TV) and KL(mu || pi) on top-K + tail
    D_tv = (mu.double().exp() - lp.double().exp()).abs()
    s.guard("dppo binary_tv", lambda: _case(
        s, "dppo binary_tv", shape, lp, mu, adv, mask,
        {"trmath dppo": pl("dppo", divergence="binary_tv", delta=0.15)},
        "dppo", {"D": D_tv, "delta": 0.15}))
    tk_pi, tk_mu = topk_inputs(B, T, s.cfg.seed)
    D_tk = ref_topk_kl(tk_mu, tk_pi)
    s.guard("dppo topk_kl", lambda: _case(
        s, "dppo topk_kl", f"{shape} K={K}", lp, mu, adv, mask,
        {"trmath dppo": pl("dppo", divergence="topk_kl", delta=0.05, topk_logprobs=tk_pi,
                           rollout_topk_logprobs=tk_mu)},
        "dppo", {"D": D_tk, "delta": 0.05}))
    del lp, mu, adv, mask, tk_pi, tk_mu
    s.guard("dppo exact_kl", lambda: _exact_case(s, Bx, Tx, V))


def _exact_case(s: C.Suite, B: int, T: int, V: int) -> None:
    g = torch.Generator().manual_seed(s.cfg.seed + 41)
    z_mu = torch.randn(B, T, V, generator=g).mul_(3.0)
    far = (torch.rand(B, T, 1, generator=g) < 0.1).float()  # one position in ten moves far
    z_pi = z_mu + (0.1 + 0.9 * far) * torch.randn(B, T, V, generator=g)
    tok = torch.randint(0, V, (B, T), generator=g)
    lmu64, lpi64 = F.log_softmax(z_mu.double(), -1), F.log_softmax(z_pi.double(), -1)
    D = (lmu64.exp() * (lmu64 - lpi64)).sum(-1)  # KL(mu || pi) per position, float64
    lp = lpi64.gather(-1, tok.unsqueeze(-1)).squeeze(-1).float()
    mu = lmu64.gather(-1, tok.unsqueeze(-1)).squeeze(-1).float()
    del lmu64, lpi64
    adv = torch.randn(B, generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, T - max(1, T // 4):] = False

    def f(x):
        return trmath.policy_loss("dppo", x, mu, adv, mask, divergence="exact_kl", delta=0.05,
                                  logits=z_pi, rollout_logits=z_mu)[0]

    _case(s, "dppo exact_kl", f"[{B}, {T}] V={V}", lp, mu, adv, mask, {"trmath dppo": f},
          "dppo", {"D": D, "delta": 0.05})


if __name__ == "__main__":
    from run import main

    sys.exit(main(["--suites", NAME, *sys.argv[1:]]))
