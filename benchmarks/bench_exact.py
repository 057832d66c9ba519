#!/usr/bin/env python
"""Benchmark of trmath's exact full-vocabulary reductions on the CPU.

For each reference shape ``N x V`` (``N = round(4e7 / V)``) and dtype it times, side by side in
one process and round-robin (see ``_common.run_interleaved``):

* **read-once** -- ``x.sum()`` over every input (both logits for kl/tv/js), the bandwidth floor;
* **eager** -- the textbook PyTorch formula (``log_softmax``-based), upcast to float32 as
  training code does;
* **compiled** -- ``torch.compile`` of the same function (static shapes, compiled once per shape,
  warmed up, then timed);
* **trmath** -- the fused C++ kernels.

Every timed result is first checked against the same textbook formula evaluated in float64 on the
same inputs; a method whose check fails is not timed and the failure is reported. The exit
status (the return value of :func:`main`) is 1 if any check failed, a case crashed or results
depended on the thread count, 0 otherwise; the failures are also listed under ``failures`` in
``machine.json``.

It also measures the peak extra resident memory of each method (``_common.MemProbe``), a scaling
table of ``trmath.kl`` (time per element against ``V`` and ``N``), a threads table, and writes
CSV, a machine record and PNG plots to ``--out``.

Run ``python benchmarks/bench_exact.py --help``; ``benchmarks/README.md`` explains the output.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

# libgomp reads OMP_WAIT_POLICY when torch loads it, so it is set before ``import torch``. With the
# default (active spinning), a 2-thread OpenMP region of torch (eager and compiled kernels) stalls
# for a scheduler slice whenever another process holds one of the 2 cores: we measured compiled
# kernels 10-50x slower under such load. PASSIVE removes that pathology, in the baselines' favour.
# ``--omp-wait-policy ''`` (or an OMP_WAIT_POLICY already in the environment) overrides it.
_OMP_DEFAULT = "PASSIVE"
if "--omp-wait-policy" in sys.argv[:-1]:
    _OMP_DEFAULT = sys.argv[sys.argv.index("--omp-wait-policy") + 1]
if _OMP_DEFAULT and "OMP_WAIT_POLICY" not in os.environ:
    os.environ["OMP_WAIT_POLICY"] = _OMP_DEFAULT

import _common as C  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import trmath  # noqa: E402

SINGLE_OPS = ("logsumexp", "entropy", "token_logprobs", "token_logprobs_entropy")
PAIR_OPS = ("kl", "tv", "js")
ALL_OPS = SINGLE_OPS + PAIR_OPS
TOKEN_OPS = ("token_logprobs", "token_logprobs_entropy")
FULL_VOCABS = (32768, 131072, 151936, 262144)
QUICK_VOCAB, QUICK_ROWS = 151936, 32
ELEMENTS = 4e7
HEADLINE_V = 151936
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
METHODS = ("read-once", "trmath", "eager", "compiled")

# Correctness gates, relative to the float64 textbook value on the same inputs.
#  * trmath forward: 1e-4 for float32 *and* bfloat16. The reference upcasts the bf16 inputs
#    exactly, and trmath reads them exactly and returns float32, so bf16 inputs need no wider
#    tolerance for the forward (the library's own bound is 1e-5).
#  * trmath gradients: same dtype as the inputs. float32: 1e-4 |g| + 1e-6 max|g_row|;
#    bfloat16 gradients are rounded to bf16 on output: half an ulp is 2^-9 to 2^-8 relative
#    (2^-8 just above a power of 2), so the elementwise tolerance is (2^-8 + 1e-4) |g|
#    (correct rounding + float32 arithmetic) + 1e-6 max|g_row|.
#  * eager / compiled baselines: 1e-2 (and 1e-2 |g| + 1e-3 max|g_row| for gradients). The
#    textbook float32 formula loses digits to cancellation (sum p (log p - log q) with p ~ q);
#    the gate only confirms that the baseline computes the same quantity. Its measured error is
#    reported next to trmath's.
FWD_RTOL = {"trmath": 1e-4, "eager": 1e-2, "compiled": 1e-2}
GRAD_TOL = {  # (rtol, atol as a fraction of the row's max |g|)
    ("trmath", torch.float32): (1e-4, 1e-6),
    ("trmath", torch.bfloat16): (2.0**-8 + 1e-4, 1e-6),
}
GRAD_TOL_BASELINE = (1e-2, 1e-3)


# ---------------------------------------------------------------------------------------------
# the textbook formulas (eager baseline, torch.compile baseline, and -- in float64 -- reference)
# ---------------------------------------------------------------------------------------------
def _up(x: torch.Tensor) -> torch.Tensor:
    """Upcast 16-bit logits to float32 (what training code does); float32/64 stay as they are."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def tb_logsumexp(z):
    return torch.logsumexp(_up(z), -1)


def tb_entropy(z):
    lp = F.log_softmax(_up(z), -1)
    return -(lp.exp() * lp).sum(-1)


def tb_token_logprobs(z, t):
    return F.log_softmax(_up(z), -1).gather(-1, t.unsqueeze(-1)).squeeze(-1)


def tb_token_logprobs_entropy(z, t):
    lp = F.log_softmax(_up(z), -1)
    return lp.gather(-1, t.unsqueeze(-1)).squeeze(-1), -(lp.exp() * lp).sum(-1)


def tb_kl(z, w):
    lp, lq = F.log_softmax(_up(z), -1), F.log_softmax(_up(w), -1)
    return (lp.exp() * (lp - lq)).sum(-1)


def tb_tv(z, w):
    return 0.5 * (F.softmax(_up(z), -1) - F.softmax(_up(w), -1)).abs().sum(-1)


def tb_js(z, w):
    lp, lq = F.log_softmax(_up(z), -1), F.log_softmax(_up(w), -1)
    lm = torch.logaddexp(lp, lq) - math.log(2.0)
    return 0.5 * ((lp.exp() * (lp - lm)).sum(-1) + (lq.exp() * (lq - lm)).sum(-1))


TEXTBOOK: dict[str, Callable[..., Any]] = {
    "logsumexp": tb_logsumexp,
    "entropy": tb_entropy,
    "token_logprobs": tb_token_logprobs,
    "token_logprobs_entropy": tb_token_logprobs_entropy,
    "kl": tb_kl,
    "tv": tb_tv,
    "js": tb_js,
}

TRMATH: dict[str, Callable[..., Any]] = {
    "logsumexp": lambda z: trmath.logsumexp(z),
    "entropy": lambda z: trmath.entropy(z),
    "token_logprobs": lambda z, t: trmath.token_logprobs(z, t),
    "token_logprobs_entropy": lambda z, t: trmath.token_logprobs(z, t, return_entropy=True),
    "kl": lambda z, w: trmath.kl(z, w),
    "tv": lambda z, w: trmath.tv(z, w),
    "js": lambda z, w: trmath.js(z, w),
}


def op_args(op: str, z, w, t) -> tuple:
    if op in PAIR_OPS:
        return (z, w)
    if op in TOKEN_OPS:
        return (z, t)
    return (z,)


def read_once_fn(op: str, z, w) -> Callable[[], Any]:
    """Read every logits input once (tokens are negligible)."""
    if op in PAIR_OPS:
        return lambda: (z.sum(), w.sum())
    return lambda: z.sum()


def _tuple(x) -> tuple:
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


# ---------------------------------------------------------------------------------------------
# inputs, references and checks
# ---------------------------------------------------------------------------------------------
def make_inputs(N: int, V: int, dtype: torch.dtype, seed: int):
    """Policy-like rows: logits with spread 3 (a few hundred effective tokens out of V), and a
    second policy 0.3 away per logit (KL about 0.04, the trust-region regime)."""
    g = torch.Generator().manual_seed(seed + 7919 * N + V)
    z = torch.randn(N, V, generator=g).mul_(3.0)
    w = torch.randn(N, V, generator=g).mul_(0.3).add_(z)
    t = torch.randint(0, V, (N,), generator=g)
    if dtype != torch.float32:
        z, w = z.to(dtype), w.to(dtype)
    return z, w, t


def _row_chunks(N: int, V: int, budget: float = 4e6):
    step = max(1, int(budget // V))
    for i in range(0, N, step):
        yield slice(i, min(N, i + step))


def reference(op: str, args: tuple) -> tuple[torch.Tensor, ...]:
    """The textbook formula in float64 on the exact values of the inputs, by row chunks."""
    N, V = args[0].shape
    outs: list[list[torch.Tensor]] = []
    with torch.no_grad():
        for sl in _row_chunks(N, V):
            a = tuple(x[sl].double() if x.is_floating_point() else x[sl] for x in args)
            outs.append(list(_tuple(TEXTBOOK[op](*a))))
    return tuple(torch.cat([o[k] for o in outs]) for k in range(len(outs[0])))


def reference_grads(op: str, args: tuple, ndiff: int) -> tuple[torch.Tensor, ...]:
    """Gradient of the sum of the outputs, in float64: for kl the closed form
    ``dKL/dz = p (log p - log q - KL)``, ``dKL/dw = q - p`` (cheaper than autograd, and
    independent of it); otherwise float64 autograd of the textbook formula."""
    N, V = args[0].shape
    grads: list[list[torch.Tensor]] = [[] for _ in range(ndiff)]
    if op == "kl":
        with torch.no_grad():
            for sl in _row_chunks(N, V):
                lp = F.log_softmax(args[0][sl].double(), -1)
                lq = F.log_softmax(args[1][sl].double(), -1)
                p = lp.exp()
                d = lp.sub_(lq)  # log p - log q
                kl = (p * d).sum(-1, keepdim=True)
                grads[0].append(d.sub_(kl).mul_(p))
                grads[1].append(lq.exp_().sub_(p))
        return tuple(torch.cat(g) for g in grads)
    for sl in _row_chunks(N, V, 2e6):
        a = [x[sl].double().requires_grad_(i < ndiff) if x.is_floating_point() else x[sl]
             for i, x in enumerate(args)]
        outs = _tuple(TEXTBOOK[op](*a))
        gs = torch.autograd.grad(outs, a[:ndiff], [torch.ones_like(o) for o in outs])
        for k in range(ndiff):
            grads[k].append(gs[k].detach())
    return tuple(torch.cat(g) for g in grads)


def check_values(out, ref: tuple, rtol: float) -> tuple[bool, float, str]:
    """All finite and ``|out - ref| <= rtol |ref| + 1e-30`` on every row of every output."""
    outs = _tuple(out)
    worst, where, ok = 0.0, "", True
    for k, (o, r) in enumerate(zip(outs, ref)):
        o64 = o.detach().double().reshape(r.shape)
        err = (o64 - r).abs()
        bad = ~torch.isfinite(o64) | (err > rtol * r.abs() + 1e-30)
        rel = err / r.abs().clamp_min(1e-300)
        rel = torch.where(torch.isfinite(o64), rel, torch.full_like(rel, math.inf))
        i = int(rel.argmax())
        if float(rel[i]) > worst:
            worst = float(rel[i])
            where = f"output {k} row {i}: got {float(o64[i]):.9g}, float64 {float(r[i]):.9g}"
        if bool(bad.any()):
            ok = False
            where += f"; {int(bad.sum())} of {bad.numel()} rows outside tolerance"
    return ok, worst, where


class GradRef:
    """float64 reference gradients with their per-row scales, computed once, checked many times."""

    def __init__(self, refs: tuple):
        self.refs = refs
        self.chunks = []
        for r in refs:
            for sl in _row_chunks(r.shape[0], r.shape[1]):
                rabs = r[sl].abs()
                self.chunks.append((sl, rabs, rabs.amax(-1, keepdim=True).clamp_min_(1e-300)))

    def check(self, gs, rtol: float, atol_row: float) -> tuple[bool, float, str]:
        """Elementwise ``|g - g_ref| <= rtol |g_ref| + atol_row max_row |g_ref|``; the reported
        error is ``max |g - g_ref| / max_row |g_ref|``."""
        worst, where, nbad = -1.0, "", 0
        per = len(self.chunks) // len(self.refs)
        for c, (sl, rabs, rowmax) in enumerate(self.chunks):
            k = c // per
            rr = self.refs[k][sl]
            err = gs[k][sl].detach().double().sub_(rr).abs_()  # NaN stays NaN
            bad = ~(err <= torch.addcmul(rowmax * atol_row, rabs, torch.full_like(rowmax, rtol)))
            nbad += int(bad.sum())  # NaN compares false: counted as bad
            scaled = err.div_(rowmax).nan_to_num_(nan=math.inf)
            flat = int(scaled.argmax())
            m = float(scaled.view(-1)[flat])
            if m > worst:
                worst = m
                i, j = divmod(flat, rr.shape[1])
                where = (f"grad {k} row {sl.start + i} col {j}: got {float(gs[k][sl][i, j]):.6g}, "
                         f"float64 {float(rr[i, j]):.6g}")
        if nbad:
            where += f"; {nbad} elements outside tolerance"
        return nbad == 0, worst, where


# ---------------------------------------------------------------------------------------------
# the benchmark
# ---------------------------------------------------------------------------------------------
class Bench:
    def __init__(self, args: argparse.Namespace):
        self.a = args
        self.t0 = time.perf_counter()
        self.quick = args.quick
        self.rows: list[dict[str, Any]] = []  # timings.csv
        self.ratio_rows: list[dict[str, Any]] = []  # ratios.csv
        self.problems: list[str] = []  # everything worth reading (compile failures, ...)
        self.failures: list[str] = []  # failed checks and crashes: main() returns 1
        self.results: dict[tuple, dict[str, Any]] = {}
        self.scaling: list[dict[str, Any]] = []
        self.threads: list[dict[str, Any]] = []
        self.probe = C.MemProbe.create()
        # reps: between min_reps and max_reps, about budget_s of calls per method
        self.max_reps = args.reps or (7 if self.quick else 9)
        self.min_reps = min(3, self.max_reps)
        self.budget_s = 0.15 if self.quick else 5.0
        self.compile_ok = not args.no_compile
        self._setup_compile()

    # -- helpers --------------------------------------------------------------------------------
    def log(self, msg: str) -> None:
        print(f"[{time.perf_counter() - self.t0:6.1f}s] {msg}" if msg.strip() else msg, flush=True)

    def problem(self, msg: str) -> None:
        self.problems.append(msg)
        self.log(f"  !! {msg}")

    def fail(self, msg: str) -> None:
        """A failed correctness check or a crash: listed with the problems, and fails the run."""
        self.failures.append(msg)
        self.problem(msg)

    def first_call(self, fn: Callable[[], Any], measure_memory: bool):
        """``(result, seconds, peak extra bytes or None)`` of the first (checked) call."""
        if measure_memory and self.probe.available:
            box: list[float] = []

            def timed():
                t0 = time.perf_counter()
                r = fn()
                box.append(time.perf_counter() - t0)
                return r

            delta, out = self.probe.measure(timed)
            return out, box[0], delta
        t0 = time.perf_counter()
        out = fn()
        return out, time.perf_counter() - t0, None

    def reps_for(self, first_s: float) -> int:
        return max(self.min_reps, min(self.max_reps, int(self.budget_s / max(first_s, 1e-9))))

    def _setup_compile(self) -> None:
        if not self.compile_ok:
            return
        try:
            import torch._dynamo as dynamo

            for name in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit",
                         "accumulated_recompile_limit"):
                if hasattr(dynamo.config, name):
                    setattr(dynamo.config, name, 4096)
        except Exception as e:  # noqa: BLE001
            self.problem(f"torch._dynamo unavailable ({type(e).__name__}: {e}); compiled baseline skipped")
            self.compile_ok = False

    def compile_fn(self, op: str, args: tuple, grad: bool, key: str):
        """``torch.compile`` the textbook function for these static shapes; ``(fn, seconds)`` or
        ``(None, reason)``."""
        if not self.compile_ok:
            return None, "disabled (--no-compile)"
        try:
            cf = torch.compile(TEXTBOOK[op], dynamic=False)
            t0 = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if grad:
                    outs = _tuple(cf(*args))
                    torch.autograd.grad(outs, [x for x in args if x.requires_grad],
                                        [torch.ones_like(o) for o in outs])
                else:
                    with torch.no_grad():
                        cf(*args)
            return cf, time.perf_counter() - t0
        except Exception as e:  # noqa: BLE001
            msg = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
            reason = f"{type(e).__name__}: {msg}"
            self.problem(f"torch.compile failed for {key}: {reason}")
            return None, reason

    def add_time_row(self, section, op, pas, method, dtype, N, V, ts, check="", err=None, note="",
                     threads=None):
        self.rows.append({
            "section": section, "op": op, "pass": pas, "method": method, "dtype": dtype, "N": N,
            "V": V, "threads": threads or trmath.num_threads(), "metric": "time", "unit": "s",
            "median": C.median(ts), "min": min(ts), "max": max(ts), "reps": len(ts),
            "check": check, "max_rel_err": err, "note": note,
        })

    # -- forward and backward at one shape ------------------------------------------------------
    def run_shape(self, dname: str, N: int, V: int, ops: list[str], bwd_ops: list[str]) -> None:
        dtype = DTYPES[dname]
        self.log(f"\n== {dname}  N={N}  V={V}  (N*V = {N * V:.3g}) ==")
        z, w, t = make_inputs(N, V, dtype, self.a.seed)
        for op in ops:
            try:
                self.run_forward(op, dname, z, w, t)
            except Exception as e:  # noqa: BLE001
                self.fail(f"forward {op} {dname} N={N} V={V} crashed: {type(e).__name__}: {e}")
                traceback.print_exc()
        for op in bwd_ops:
            try:
                self.run_backward(op, dname, z, w, t)
            except Exception as e:  # noqa: BLE001
                self.fail(f"backward {op} {dname} N={N} V={V} crashed: {type(e).__name__}: {e}")
                traceback.print_exc()
        del z, w, t
        gc.collect(1)

    def run_forward(self, op: str, dname: str, z, w, t) -> None:
        N, V = z.shape
        args = op_args(op, z, w, t)
        in_bytes = sum(x.numel() * x.element_size() for x in args if x.is_floating_point())
        key = f"{op} fwd {dname} N={N} V={V}"
        ref = reference(op, args)
        res: dict[str, Any] = {"op": op, "pass": "fwd", "dtype": dname, "N": N, "V": V,
                               "in_bytes": in_bytes, "times": {}, "mem": {}, "err": {},
                               "status": {}}
        cands: dict[str, Callable[[], Any]] = {
            "trmath": lambda: TRMATH[op](*args),
            "eager": lambda: TEXTBOOK[op](*args),
        }
        cf, info = self.compile_fn(op, args, False, key)
        if cf is not None:
            cands["compiled"] = lambda: cf(*args)
            res["compile_s"] = info
            self.rows.append({"section": "forward", "op": op, "pass": "fwd", "method": "compiled",
                              "dtype": dname, "N": N, "V": V, "metric": "compile_time", "unit": "s",
                              "median": info, "min": info, "max": info, "reps": 1,
                              "note": "torch.compile + first call"})
        else:
            res["status"]["compiled"] = f"not timed: {info}"
        methods: dict[str, Callable[[], Any]] = {"read-once": read_once_fn(op, z, w)}
        reps: dict[str, int] = {}
        with torch.no_grad():
            t0 = time.perf_counter()
            methods["read-once"]()
            reps["read-once"] = self.reps_for(time.perf_counter() - t0)
            for name, fn in cands.items():
                out, first, delta = self.first_call(fn, name != "trmath")
                ok, err, where = check_values(out, ref, FWD_RTOL[name])
                if delta is not None:
                    res["mem"][name] = max(0, delta - C.nbytes(out))
                del out
                res["err"][name] = err
                if not ok:
                    res["status"][name] = f"CHECK FAILED (rtol {FWD_RTOL[name]:g}): {where}"
                    self.fail(f"{key}: {name} disagrees with float64: {where}; not timed")
                    res["mem"].pop(name, None)
                    continue
                res["status"][name] = "ok"
                methods[name] = fn
                reps[name] = self.reps_for(first)
            times = C.run_interleaved(methods, reps, warmup=0)  # the check call was the warm-up
        res["times"] = times
        for name, ts in times.items():
            self.add_time_row("forward", op, "fwd", name, dname, N, V, ts,
                              check=res["status"].get(name, "n/a"), err=res["err"].get(name))
        # memory: baselines were measured on their check call; trmath and read-once on one more
        # (steady-state) call, so that a one-time set-up (thread pool) is not counted per call
        with torch.no_grad():
            for name, fn in methods.items():
                if self.probe.available and name not in res["mem"]:
                    delta, out = self.probe.measure(fn)
                    res["mem"][name] = max(0, delta - C.nbytes(out))
                    del out
        for name in methods:
            if name in res["mem"]:
                self._mem_row("forward", op, "fwd", name, dname, N, V, res["mem"][name], in_bytes)
        self.results[(dname, V, op, "fwd")] = res
        self._forward_ratios(res)
        tr = C.median(times.get("trmath", []))
        self.log(f"  {op:<24} read {C.fmt_time(C.median(times['read-once'])):>9}  trmath "
                 f"{C.fmt_time(tr):>9}  eager {C.fmt_time(C.median(times.get('eager', []))):>9}  "
                 f"compiled {C.fmt_time(C.median(times.get('compiled', []))):>9}  "
                 f"err {res['err'].get('trmath', float('nan')):.2e}")

    def run_backward(self, op: str, dname: str, z, w, t) -> None:
        N, V = z.shape
        key = f"{op} bwd {dname} N={N} V={V}"
        ndiff = 2 if op in PAIR_OPS else 1
        zr = z.detach().clone().requires_grad_()
        wr = w.detach().clone().requires_grad_() if op in PAIR_OPS else None
        args = op_args(op, zr, wr, t)
        diff = args[:ndiff]
        in_bytes = sum(x.numel() * x.element_size() for x in diff)
        ref = GradRef(reference_grads(op, args, ndiff))

        def fwd(f):
            return lambda: f(*args)

        def fwdbwd(f):
            def run():
                outs = _tuple(f(*args))
                return torch.autograd.grad(outs, diff, [torch.ones_like(o) for o in outs])

            return run

        res: dict[str, Any] = {"op": op, "pass": "bwd", "dtype": dname, "N": N, "V": V,
                               "in_bytes": in_bytes, "times": {}, "mem": {}, "err": {},
                               "status": {}}
        impl: dict[str, Callable[..., Any]] = {"trmath": TRMATH[op], "eager": TEXTBOOK[op]}
        cf, info = self.compile_fn(op, args, True, key)
        if cf is not None:
            impl["compiled"] = cf
            res["compile_s"] = info
            self.rows.append({"section": "backward", "op": op, "pass": "fwd+bwd",
                              "method": "compiled", "dtype": dname, "N": N, "V": V,
                              "metric": "compile_time", "unit": "s", "median": info, "min": info,
                              "max": info, "reps": 1, "note": "torch.compile + first call"})
        else:
            res["status"]["compiled"] = f"not timed: {info}"
        methods: dict[str, Callable[[], Any]] = {"read-once": read_once_fn(op, z, w)}
        reps = {"read-once": self.max_reps}
        for name, f in impl.items():
            gs, first, delta = self.first_call(fwdbwd(f), name != "trmath")
            rtol, atol = GRAD_TOL.get((name, z.dtype), GRAD_TOL_BASELINE)
            ok, err, where = ref.check(gs, rtol, atol)
            if delta is not None:
                res["mem"][name] = max(0, delta - C.nbytes(gs))
            del gs
            res["err"][name] = err
            if not ok:
                res["status"][name] = f"CHECK FAILED (rtol {rtol:g}, atol {atol:g} max|g_row|): {where}"
                self.fail(f"{key}: {name} gradient disagrees with float64: {where}; not timed")
                res["mem"].pop(name, None)
                continue
            res["status"][name] = "ok"
            methods[f"{name}:fwd"] = fwd(f)
            methods[f"{name}:fwd+bwd"] = fwdbwd(f)
            reps[f"{name}:fwd"] = reps[f"{name}:fwd+bwd"] = self.reps_for(first)
        reps["read-once"] = max(v for v in reps.values())
        times = C.run_interleaved(methods, reps, warmup=0)  # the check call was the warm-up
        for name, ts in times.items():
            m, pas = (name.split(":") + ["read"])[:2]
            self.add_time_row("backward", op, pas, m, dname, N, V, ts,
                              check=res["status"].get(m, "n/a"), err=res["err"].get(m))
        # backward alone = (fwd+bwd) - fwd, paired by round
        for name in impl:
            tot, fw = times.get(f"{name}:fwd+bwd"), times.get(f"{name}:fwd")
            if tot and fw:
                n = min(len(tot), len(fw))
                bw = [tot[i] - fw[i] for i in range(n)]
                times[f"{name}:bwd"] = bw
                self.rows.append({
                    "section": "backward", "op": op, "pass": "bwd", "method": name,
                    "dtype": dname, "N": N, "V": V, "threads": trmath.num_threads(),
                    "metric": "time", "unit": "s", "median": C.median(tot) - C.median(fw),
                    "min": min(bw), "max": max(bw), "reps": n, "check": res["status"][name],
                    "max_rel_err": res["err"][name],
                    "note": "median(fwd+bwd) - median(fwd); min/max over paired rounds"})
        res["times"] = times
        for name in impl:
            if f"{name}:fwd+bwd" not in methods:
                continue
            if self.probe.available and name not in res["mem"]:
                delta, gs = self.probe.measure(methods[f"{name}:fwd+bwd"])
                res["mem"][name] = max(0, delta - C.nbytes(gs))
                del gs
            if name in res["mem"]:
                extra = res["mem"][name]
                self._mem_row("backward", op, "fwd+bwd", name, dname, N, V, extra, in_bytes,
                              note="peak beyond the returned gradients")
        self.results[(dname, V, op, "bwd")] = res
        self._backward_ratios(res)
        tb = lambda m: C.fmt_time(C.median(times[f"{m}:fwd+bwd"]) - C.median(times[f"{m}:fwd"])) \
            if f"{m}:fwd" in times else "-"  # noqa: E731
        self.log(f"  {op + ' backward':<24} read {C.fmt_time(C.median(times['read-once'])):>9}  "
                 f"trmath {tb('trmath'):>9}  eager {tb('eager'):>9}  compiled {tb('compiled'):>9}"
                 f"  err {res['err'].get('trmath', float('nan')):.2e}")
        del zr, wr

    def _mem_row(self, section, op, pas, method, dname, N, V, extra, in_bytes, note=""):
        self.rows.append({
            "section": section, "op": op, "pass": pas, "method": method, "dtype": dname, "N": N,
            "V": V, "threads": trmath.num_threads(), "metric": "extra_memory", "unit": "bytes",
            "median": extra, "min": extra, "max": extra, "reps": 1,
            "note": f"{100.0 * extra / in_bytes:.3f}% of input ({in_bytes} bytes) {note}".strip(),
        })

    # -- ratios and bars ------------------------------------------------------------------------
    def _ratio(self, res, name, num, den, bar: str | None = None, ok=None):
        ts = res["times"]
        if num not in ts or den not in ts:
            r = lo = hi = float("nan")
        else:
            r, lo, hi = C.paired_ratio(ts[num], ts[den])
        status = "" if ok is None or r != r else ("PASS" if ok(r) else "MISS")
        row = {"op": res["op"], "pass": res["pass"], "dtype": res["dtype"], "N": res["N"],
               "V": res["V"], "ratio": name, "median": r, "min": lo, "max": hi,
               "bar": bar or "", "status": status}
        self.ratio_rows.append(row)
        res.setdefault("ratios", {})[name] = row
        return row

    def _forward_ratios(self, res) -> None:
        op, bf16 = res["op"], res["dtype"] == "bfloat16"
        pair, tok = op in PAIR_OPS, op in TOKEN_OPS
        if pair:
            self._ratio(res, "trmath/read-once", "trmath", "read-once", "<= 2.5", lambda r: r <= 2.5)
        elif tok:
            self._ratio(res, "trmath/read-once", "trmath", "read-once", "<= 2", lambda r: r <= 2.0)
        else:
            self._ratio(res, "trmath/read-once", "trmath", "read-once")
        if pair:
            self._ratio(res, "eager/trmath", "eager", "trmath", ">= 20", lambda r: r >= 20)
        else:
            self._ratio(res, "eager/trmath", "eager", "trmath")
        if bf16:
            self._ratio(res, "compiled/trmath", "compiled", "trmath", ">= 3", lambda r: r >= 3)
        elif pair:
            self._ratio(res, "compiled/trmath", "compiled", "trmath", ">= 1.5", lambda r: r >= 1.5)
        else:
            self._ratio(res, "compiled/trmath", "compiled", "trmath")
        self._mem_ratio(res)

    def _backward_ratios(self, res) -> None:
        if res["op"] == "kl":
            self._ratio(res, "trmath/read-once", "trmath:bwd", "read-once", "<= 3", lambda r: r <= 3)
        else:
            self._ratio(res, "trmath/read-once", "trmath:bwd", "read-once")
        self._ratio(res, "eager/trmath", "eager:bwd", "trmath:bwd")
        self._ratio(res, "compiled/trmath", "compiled:bwd", "trmath:bwd")
        self._ratio(res, "trmath fwd+bwd/read-once", "trmath:fwd+bwd", "read-once")
        self._mem_ratio(res)

    def _mem_ratio(self, res) -> None:
        for m, extra in res["mem"].items():
            pct = 100.0 * extra / res["in_bytes"]
            bar = "<= 1%" if m == "trmath" else ""
            st = ("PASS" if pct <= 1.0 else "MISS") if m == "trmath" else ""
            row = {"op": res["op"], "pass": res["pass"], "dtype": res["dtype"], "N": res["N"],
                   "V": res["V"], "ratio": f"extra memory % ({m})", "median": pct, "min": pct,
                   "max": pct, "bar": bar, "status": st}
            self.ratio_rows.append(row)
            res.setdefault("ratios", {})[f"mem {m}"] = row

    # -- scaling and threads --------------------------------------------------------------------
    def run_scaling(self) -> None:
        if self.quick:
            E = QUICK_ROWS * QUICK_VOCAB
            v_sweep = [(max(1, round(E / V)), V) for V in (32768, 151936)]
            n_sweep = [(N, 32768) for N in (1, 16, 256)]
            reps, min_s = 3, 0.02
        else:
            v_sweep = [(max(1, round(ELEMENTS / V)), V) for V in (32768, 65536, 131072, 151936, 262144)]
            n_sweep = [(N, 32768) for N in (1, 16, 256, 8192)]
            reps, min_s = 7, 0.1
        self.log("\n== scaling: trmath.kl float32, time per element ==")
        # The points of a sweep are timed interleaved, round-robin (C.run_interleaved), so a
        # drift of the shared machine's speed hits all of them alike: flatness compares
        # absolute times of different shapes, which a sweep timed point after point confounds
        # with the drift.
        for sweep, shapes in (("V at fixed N*V", v_sweep), ("N at V=32768", n_sweep)):
            pts = []
            for N, V in shapes:
                z, w, t = make_inputs(N, V, torch.float32, self.a.seed)
                ref = reference("kl", (z, w))
                out = trmath.kl(z, w)
                ok, err, where = check_values(out, ref, FWD_RTOL["trmath"])
                row = {"sweep": sweep, "N": N, "V": V, "err": err, "ok": ok}
                del t, ref, out
                if not ok:
                    self.fail(f"scaling kl N={N} V={V}: trmath disagrees with float64: {where}; "
                              "not timed")
                    row["skip"] = True
                pts.append((row, z, w))
            methods, inner = {}, {}
            for i, (row, z, w) in enumerate(pts):
                if row.get("skip"):
                    continue
                for kind, fn in (("trmath", lambda z=z, w=w: trmath.kl(z, w)),
                                 ("read", lambda z=z, w=w: (z.sum(), w.sum()))):
                    fn()
                    t0 = time.perf_counter()
                    fn()
                    k = max(1, math.ceil(min_s / max(time.perf_counter() - t0, 1e-7)))
                    inner[(i, kind)] = k
                    methods[f"{i}:{kind}"] = lambda fn=fn, k=k: [fn() for _ in range(k)]
            times = C.run_interleaved(methods, {m: reps for m in methods})
            for i, (row, z, w) in enumerate(pts):
                row.pop("skip", None)
                if f"{i}:trmath" in times:
                    N, V = row["N"], row["V"]
                    tt = [x / inner[(i, "trmath")] for x in times[f"{i}:trmath"]]
                    tr = [x / inner[(i, "read")] for x in times[f"{i}:read"]]
                    row.update(trmath=tt, read=tr)
                    self.add_time_row("scaling", "kl", "fwd", "trmath", "float32", N, V, tt, "ok",
                                      row["err"], note=f"sweep: {sweep}; per call, interleaved")
                    self.add_time_row("scaling", "kl", "fwd", "read-once", "float32", N, V, tr, "ok",
                                      note=f"sweep: {sweep}")
                    self.log(f"  {sweep:<16} N={N:>6} V={V:>6}  trmath {1e9 * C.median(tt) / (N * V):.3f} ns/elem"
                             f"  read-once {1e9 * C.median(tr) / (N * V):.3f} ns/elem")
                self.scaling.append(row)
            del pts, methods
            gc.collect(1)

    def run_threads(self, dtypes: list[str]) -> None:
        N = QUICK_ROWS if self.quick else round(ELEMENTS / HEADLINE_V)
        V = HEADLINE_V
        reps = 3 if self.quick else 7
        n0 = trmath.num_threads()
        counts = sorted({1, 2} | ({n0} if n0 > 2 else set()))
        self.log(f"\n== threads: trmath at N={N} V={V} (torch keeps {torch.get_num_threads()} threads) ==")
        for dname in dtypes:
            z, w, t = make_inputs(N, V, DTYPES[dname], self.a.seed)
            for op in ("kl", "token_logprobs"):
                args = op_args(op, z, w, t)
                ts: dict[int, list[float]] = {n: [] for n in counts}
                outs = {}
                try:
                    for r in range(reps):
                        for n in counts:
                            trmath.set_num_threads(n)
                            outs[n] = TRMATH[op](*args)  # warm the pool at this size, untimed
                            t0 = time.perf_counter()
                            TRMATH[op](*args)
                            ts[n].append(time.perf_counter() - t0)
                finally:
                    trmath.set_num_threads(n0)
                same = all(torch.equal(outs[counts[0]], outs[n]) for n in counts)
                if not same:
                    self.fail(f"threads {op} {dname}: results differ between thread counts "
                                 "(determinism target: bitwise identical)")
                for n in counts:
                    self.add_time_row("threads", op, "fwd", "trmath", dname, N, V, ts[n], "ok",
                                      threads=n, note=f"bitwise identical across threads: {same}")
                self.threads.append({"op": op, "dtype": dname, "N": N, "V": V, "times": ts,
                                     "bitwise": same})
            del z, w, t
            gc.collect(1)


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------
def _mem_cell(res, m):
    if m not in res["mem"]:
        return "-"
    return f"{100.0 * res['mem'][m] / res['in_bytes']:.2f}%"


def report(b: Bench, dnames: list[str], vocabs: list[tuple[int, int]], ops, bwd_ops, machine) -> str:
    out: list[str] = []
    hdr = ["op", "pass", "N", "V", "read-once", "trmath", "eager", "compiled", "trmath/read",
           "eager/trmath", "compiled/trmath", "mem trmath", "mem eager", "mem compiled", "err trmath",
           "err eager"]
    for dname in dnames:
        rows = []
        for N, V in vocabs:
            for op, pas in [(o, "fwd") for o in ops] + [(o, "bwd") for o in bwd_ops]:
                res = b.results.get((dname, V, op, pas))
                if res is None:
                    continue
                ts = res["times"]
                sfx = ":bwd" if pas == "bwd" else ""
                med = lambda k: C.median(ts[k]) if k in ts else float("nan")  # noqa: E731
                rt = res.get("ratios", {})
                cell = lambda k: C.fmt_ratio(rt[k]["median"], rt[k]["min"], rt[k]["max"]) if k in rt else "-"  # noqa: E731
                rows.append([op, pas, N, V, C.fmt_time(med("read-once")), C.fmt_time(med("trmath" + sfx)),
                             C.fmt_time(med("eager" + sfx)), C.fmt_time(med("compiled" + sfx)),
                             cell("trmath/read-once"), cell("eager/trmath"), cell("compiled/trmath"),
                             _mem_cell(res, "trmath"), _mem_cell(res, "eager"), _mem_cell(res, "compiled"),
                             f"{res['err'].get('trmath', float('nan')):.1e}",
                             f"{res['err'].get('eager', float('nan')):.1e}"])
        if rows:
            out.append(C.table(
                f"\n### {dname}: median times; ratios = median [min-max] over paired rounds; "
                "mem = peak extra RSS, % of the input; bwd time = (fwd+bwd) - fwd; err = max "
                "relative error vs float64 (bwd: max |g - g64| / max_row |g64|)", hdr, rows))
    # bars: one row per (dtype, shape, op, pass), one column per ratio, "value (bar) STATUS"
    def bar_cell(res, key):
        r = res.get("ratios", {}).get(key)
        if r is None or r["median"] != r["median"]:
            return "-"
        v = f"{r['median']:.3g}"
        return f"{v} ({r['bar']}) {r['status']}" if r["bar"] else v

    def bar_rows(only_v=None):
        rows = []
        for dname in dnames:
            for N, V in vocabs:
                if only_v is not None and V != only_v:
                    continue
                for op, pas in [(o, "fwd") for o in ops] + [(o, "bwd") for o in bwd_ops]:
                    res = b.results.get((dname, V, op, pas))
                    if res:
                        rows.append([f"{op} {pas}", dname, N, V] + [bar_cell(res, k) for k in (
                            "trmath/read-once", "eager/trmath", "compiled/trmath", "mem trmath")])
        return rows

    bar_hdr = ["what", "dtype", "N", "V", "trmath/read-once", "eager/trmath", "compiled/trmath",
               "extra memory % (trmath)"]
    if len(vocabs) > 1:
        out.append(C.table("\n### bars, every shape (TARGETS.md first bars; measured, not asserted; "
                           "ratios = median of paired rounds)", bar_hdr, bar_rows()))
    Vh = HEADLINE_V if any(V == HEADLINE_V for _, V in vocabs) else vocabs[0][1]
    out.append(C.table(f"\n### headline, V = {Vh} (TARGETS.md first bars; measured, not asserted; "
                       "ratios = median of paired rounds)", bar_hdr, bar_rows(Vh)))
    # scaling
    if b.scaling:
        srows = []
        for s in b.scaling:
            if "trmath" in s:
                tt, tr = s["trmath"], s["read"]
                ne = s["N"] * s["V"]
                srows.append([s["sweep"], s["N"], s["V"], f"{1e9 * C.median(tt) / ne:.3f}",
                              f"{1e9 * min(tt) / ne:.3f}-{1e9 * max(tt) / ne:.3f}",
                              f"{1e9 * C.median(tr) / ne:.3f}", f"{C.median(tt) / C.median(tr):.2f}",
                              f"{s['err']:.1e}"])
            else:
                srows.append([s["sweep"], s["N"], s["V"], "CHECK FAILED", "", "", "", f"{s['err']:.1e}"])
        out.append(C.table("\n### scaling: trmath.kl float32 (ns per element of one input row pair)",
                           ["sweep", "N", "V", "trmath ns/elem", "min-max", "read-once ns/elem",
                            "trmath/read", "err"], srows))
        for sweep in ("V at fixed N*V", "N at V=32768"):
            per = [C.median(s["trmath"]) / (s["N"] * s["V"]) for s in b.scaling
                   if s["sweep"] == sweep and "trmath" in s]
            if len(per) > 1:
                flat = max(per) / min(per)
                st = "PASS" if flat <= 1.2 else "MISS"
                out.append(f"flatness over {sweep}: max/min time per element = {flat:.2f} "
                           f"(bar <= 1.2: {st})")
                b.ratio_rows.append({"op": "kl", "pass": "fwd", "dtype": "float32", "N": "", "V": "",
                                     "ratio": f"scaling flatness ({sweep})", "median": flat,
                                     "min": flat, "max": flat, "bar": "<= 1.2", "status": st})
    if b.threads:
        trows = []
        for th in b.threads:
            ts = th["times"]
            n_lo, n_hi = min(ts), max(ts)
            r, lo, hi = C.paired_ratio(ts[n_lo], ts[n_hi])
            trows.append([th["op"], th["dtype"], th["N"], th["V"]]
                         + [C.fmt_time(C.median(ts[n])) for n in sorted(ts)]
                         + [C.fmt_ratio(r, lo, hi), "yes" if th["bitwise"] else "NO"])
        counts = sorted(b.threads[0]["times"])
        out.append(C.table("\n### threads: trmath.set_num_threads",
                           ["op", "dtype", "N", "V"] + [f"{n} thread(s)" for n in counts]
                           + [f"speed-up {counts[0]}->{counts[-1]}", "bitwise equal"], trows))
    missed = sum(r["status"] == "MISS" for r in b.ratio_rows)
    passed = sum(r["status"] == "PASS" for r in b.ratio_rows)
    out.append(f"\nbars: {passed} PASS, {missed} MISS (every shape, dtype and the scaling table)")
    return "\n".join(out)


SHORT = {"logsumexp": "lse", "token_logprobs": "token_lp", "token_logprobs_entropy": "token_lp+H"}


def plots(b: Bench, outdir: Path, dnames, vocabs, ops, bwd_ops) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        b.problem("matplotlib not installed (pip install matplotlib): no plots")
        return []
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    # plain tick labels (no mathtext) and fixed margins: both save seconds on a loaded machine
    plain = FuncFormatter(lambda v, _: f"{v:g}")

    def adjust(fig):
        w = fig.get_figwidth()
        fig.subplots_adjust(left=0.8 / w, right=1 - 0.15 / w, top=0.92, bottom=0.2, wspace=0.25)

    made = []
    Vs = [V for _, V in vocabs]
    # 1) trmath / read-once vs V, one panel per dtype
    fig, axes = plt.subplots(1, len(dnames), figsize=(6 * len(dnames), 4.2), squeeze=False)
    for ax, dname in zip(axes[0], dnames):
        for op, pas in [(o, "fwd") for o in ops] + [(o, "bwd") for o in bwd_ops]:
            ys = [b.results.get((dname, V, op, pas), {}).get("ratios", {}).get("trmath/read-once", {}).get("median", math.nan)
                  for V in Vs]
            ax.plot(Vs, ys, marker="o", label=f"{op} {pas}")
        for y, lab, ls in ((3.0, "bar: kl bwd 3", ":"), (2.5, "bar: kl/tv/js 2.5", "--"),
                           (2.0, "bar: token_logprobs 2", "-.")):
            ax.axhline(y, ls=ls, lw=0.9, color="gray", label=lab)
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(plain)
        ax.set_xlabel("V")
        ax.set_ylabel("trmath time / read-once time")
        ax.set_title(f"{dname}: cost over the bandwidth floor")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    adjust(fig)
    fig.savefig(outdir / "ratio_read_once.png", dpi=110)
    plt.close(fig)
    made.append("ratio_read_once.png")
    # 2) speed-ups over eager and compiled at the headline V
    Vh = HEADLINE_V if HEADLINE_V in Vs else Vs[0]
    fig, axes = plt.subplots(1, len(dnames), figsize=(6 * len(dnames), 4.2), squeeze=False)
    for ax, dname in zip(axes[0], dnames):
        labels = [(o, "fwd") for o in ops] + [(o, "bwd") for o in bwd_ops]
        x = range(len(labels))
        for k, (rname, off) in enumerate((("eager/trmath", -0.2), ("compiled/trmath", 0.2))):
            ys = [b.results.get((dname, Vh, o, p), {}).get("ratios", {}).get(rname, {}).get("median", math.nan)
                  for o, p in labels]
            ax.bar([i + off for i in x], ys, width=0.4, label=rname)
        ax.axhline(1, color="k", lw=0.8)
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_xticks(list(x))
        ax.set_xticklabels([f"{SHORT.get(o, o)} {p}" for o, p in labels], fontsize=8, rotation=30, ha="right")
        ax.set_ylabel("speed-up of trmath (x)")
        ax.set_title(f"{dname}, V={Vh}")
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=8)
    adjust(fig)
    fig.savefig(outdir / "speedup.png", dpi=110)
    plt.close(fig)
    made.append("speedup.png")
    # 3) memory
    fig, axes = plt.subplots(1, len(dnames), figsize=(6 * len(dnames), 4.2), squeeze=False)
    for ax, dname in zip(axes[0], dnames):
        labels = [(o, "fwd") for o in ops] + [(o, "bwd") for o in bwd_ops]
        x = list(range(len(labels)))
        for k, (m, off) in enumerate((("trmath", -0.27), ("eager", 0.0), ("compiled", 0.27))):
            ys = []
            for o, p in labels:
                res = b.results.get((dname, Vh, o, p))
                ys.append(100.0 * res["mem"][m] / res["in_bytes"] if res and m in res["mem"] else math.nan)
            ax.bar([i + off for i in x], [max(y, 1e-3) for y in ys], width=0.27, label=m)
        ax.axhline(1.0, ls="--", color="gray", lw=0.8)
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_xticks(x)
        ax.set_xticklabels([f"{SHORT.get(o, o)} {p}" for o, p in labels], fontsize=8, rotation=30, ha="right")
        ax.set_ylabel("peak extra memory, % of input")
        ax.set_title(f"{dname}, V={Vh} (bar: 1 %; 0 drawn at 1e-3)")
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=8)
    adjust(fig)
    fig.savefig(outdir / "memory.png", dpi=110)
    plt.close(fig)
    made.append("memory.png")
    # 4) scaling
    if b.scaling:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for ax, sweep, key in ((axes[0], "V at fixed N*V", "V"), (axes[1], "N at V=32768", "N")):
            ss = [s for s in b.scaling if s["sweep"] == sweep and "trmath" in s]
            if not ss:
                continue
            xs = [s[key] for s in ss]
            for name, lab in (("trmath", "trmath.kl"), ("read", "read-once")):
                med = [1e9 * C.median(s[name]) / (s["N"] * s["V"]) for s in ss]
                lo = [m - 1e9 * min(s[name]) / (s["N"] * s["V"]) for m, s in zip(med, ss)]
                hi = [1e9 * max(s[name]) / (s["N"] * s["V"]) - m for m, s in zip(med, ss)]
                ax.errorbar(xs, med, yerr=[lo, hi], marker="o", capsize=3, label=lab)
            ax.set_xscale("log", base=2)
            ax.xaxis.set_major_formatter(plain)
            ax.set_ylim(bottom=0)
            ax.set_xlabel(key)
            ax.set_ylabel("ns per element (pair)")
            ax.set_title(f"float32, {sweep}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        adjust(fig)
        fig.savefig(outdir / "scaling.png", dpi=110)
        plt.close(fig)
        made.append("scaling.png")
    return made


# ---------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help=f"one shape (N={QUICK_ROWS}, V={QUICK_VOCAB}), fewer reps, reduced scaling")
    p.add_argument("--out", default="bench-out", help="output folder (CSV, JSON, PNG)")
    p.add_argument("--ops", default=",".join(ALL_OPS), help="forward ops, comma-separated")
    p.add_argument("--bwd-ops", default="kl", help="ops whose backward is timed ('' for none)")
    p.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated")
    p.add_argument("--vocab", default=None,
                   help=f"comma-separated V (default {','.join(map(str, FULL_VOCABS))}; quick: {QUICK_VOCAB})")
    p.add_argument("--rows", type=int, default=None,
                   help="fixed N for every V (default: round(4e7 / V); quick: 32)")
    p.add_argument("--reps", type=int, default=None, help="max timed reps per method (default 9; quick 15)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    p.add_argument("--no-scaling", action="store_true", help="skip the scaling table")
    p.add_argument("--no-threads", action="store_true", help="skip the threads table")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--omp-wait-policy", default="PASSIVE",
                   help="OMP_WAIT_POLICY for torch's OpenMP threads ('' keeps libgomp's default); "
                        "an OMP_WAIT_POLICY in the environment wins")
    a = p.parse_args(argv)

    def split(s):
        return [x.strip() for x in s.split(",") if x.strip()]

    a.ops_l = split(a.ops)
    a.bwd_l = split(a.bwd_ops)
    a.dtypes_l = split(a.dtypes)
    for o in a.ops_l + a.bwd_l:
        if o not in ALL_OPS:
            p.error(f"unknown op {o!r}; valid: {', '.join(ALL_OPS)}")
    for d in a.dtypes_l:
        if d not in DTYPES:
            p.error(f"unknown dtype {d!r}; valid: {', '.join(DTYPES)}")
    vs = [int(v) for v in split(a.vocab)] if a.vocab else ([QUICK_VOCAB] if a.quick else list(FULL_VOCABS))
    if a.rows:
        a.shapes = [(a.rows, V) for V in vs]
    elif a.quick:
        a.shapes = [(QUICK_ROWS, V) for V in vs]
    else:
        a.shapes = [(max(1, round(ELEMENTS / V)), V) for V in vs]
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    t_start = time.perf_counter()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    b = Bench(a)
    machine = C.machine_info(HERE.parent)
    machine["mode"] = "quick" if a.quick else "full"
    machine["OMP_WAIT_POLICY"] = os.environ.get("OMP_WAIT_POLICY", "(libgomp default)")
    machine["memory_probe"] = (b.probe.self_test() if b.probe.available else f"unavailable: {b.probe.reason}")
    machine["memory_probe_notes"] = "; ".join(b.probe.notes)
    if not b.probe.available:
        b.problem(f"memory not measured: {b.probe.reason}")
    print("## machine")
    for k, v in machine.items():
        print(f"  {k:<26} {v}")
    print(f"## shapes {a.shapes}, dtypes {a.dtypes_l}, ops {a.ops_l}, backward {a.bwd_l}")

    for dname in a.dtypes_l:
        for N, V in a.shapes:
            b.run_shape(dname, N, V, a.ops_l, a.bwd_l)
    if not a.no_scaling:
        b.run_scaling()
    if not a.no_threads:
        b.run_threads(a.dtypes_l)

    b.log("report")
    text = report(b, a.dtypes_l, a.shapes, a.ops_l, a.bwd_l, machine)
    print(text)
    machine["loadavg_end"] = C._loadavg()
    machine["runtime_s"] = round(time.perf_counter() - t_start, 1)
    machine["problems"] = b.problems
    machine["failures"] = b.failures
    fields = ["section", "op", "pass", "method", "dtype", "N", "V", "threads", "metric", "unit",
              "median", "min", "max", "reps", "check", "max_rel_err", "note"]
    C.write_csv(out / "timings.csv", b.rows, fields)
    C.write_csv(out / "ratios.csv", b.ratio_rows,
                ["op", "pass", "dtype", "N", "V", "ratio", "median", "min", "max", "bar", "status"])
    b.log("plots")
    try:
        made = plots(b, out, a.dtypes_l, a.shapes, a.ops_l, a.bwd_l)
    except Exception as e:  # noqa: BLE001 - the CSVs are written; a plotting failure is reported
        b.problem(f"plots failed: {type(e).__name__}: {e}")
        made = []
    b.log("done")
    machine["runtime_s"] = round(time.perf_counter() - t_start, 1)
    C.write_json(out / "machine.json", machine)
    (out / "report.txt").write_text(text + "\n")
    print("\n## problems" if b.problems else "\n## problems: none")
    for p in b.problems:
        print(f"  - {p}")
    print(f"\nwrote {out}/timings.csv, ratios.csv, machine.json, report.txt"
          + (", " + ", ".join(made) if made else ""))
    print(f"load average start {machine['loadavg_start']}, end {machine['loadavg_end']}; "
          f"runtime {machine['runtime_s']} s")
    if b.failures:
        print(f"\n## {len(b.failures)} correctness failure(s):")
        for f in b.failures:
            print(f"  - {f}")
        return 1
    print("\n## correctness: every timed result agreed with its float64 reference")
    return 0


if __name__ == "__main__":
    sys.exit(main())
