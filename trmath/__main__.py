"""Command line: ``trmath demo`` (end-to-end RL fine-tuning demo) and ``trmath selfcheck`` (the default).

``trmath demo`` runs policy-gradient fine-tuning of a small causal LM with several trust-region
objectives side by side (see :mod:`trmath.demo`).

Verifies the installed kernels against 50-digit mpmath references on built-in adversarial
rows (every function, every dtype) and prints a speed table against PyTorch, measured in this
process. Exits with status 1 if any check fails.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time


def _timeit(fn, reps: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _cases(torch):
    g = torch.Generator().manual_seed(2024)
    V = 257
    z = torch.randn(V, generator=g, dtype=torch.float64) * 3
    yield "random", z, torch.randn(V, generator=g, dtype=torch.float64) * 3
    yield "near-identical (KL~1e-12)", z, z + 1e-6 * torch.randn(V, generator=g, dtype=torch.float64)
    yield "constant offset + 1e-5 noise", z, z + 7.25 + 1e-5 * torch.randn(V, generator=g, dtype=torch.float64)
    peak = z.clone()
    peak[3] += 1e4
    yield "peaked (spread 1e4)", peak, peak + 0.01 * torch.randn(V, generator=g, dtype=torch.float64)
    masked_z, masked_w = z.clone(), z + 0.1 * torch.randn(V, generator=g, dtype=torch.float64)
    idx = torch.arange(0, V, 3)
    masked_z[idx] = -float("inf")
    masked_w[idx] = -float("inf")
    yield "masked -inf tokens", masked_z, masked_w


def selfcheck(args) -> int:
    import torch

    import trmath
    from trmath import _backend
    from trmath.testing import oracles as O

    print(f"trmath {trmath.__version__}  torch {torch.__version__}  python {platform.python_version()}")
    print(f"CPU kernels: {_backend.isa()}, {trmath.num_threads()} threads, machine {platform.machine()}")
    print()
    print("Accuracy against 50-digit mpmath references (worst relative error per function and dtype)")
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-5, torch.float16: 1e-5}
    funcs = [
        ("kl", trmath.kl, O.mp_kl),
        ("tv", trmath.tv, O.mp_tv),
        ("js", trmath.js, O.mp_js),
    ]
    failures = 0
    header = f"{'function':<16}" + "".join(f"{str(d).replace('torch.', ''):>12}" for d in tol)
    print(header)
    rows = {}
    for name, fn, ref in funcs:
        for dt in tol:
            worst = 0.0
            for _, z, w in _cases(torch):
                zz, ww = z.to(dt), w.to(dt)
                got = float(fn(zz, ww))
                exact = float(ref(zz, ww))
                err = abs(got - exact) / max(abs(exact), 1e-300) if got != exact else 0.0
                worst = max(worst, err)
            rows.setdefault(name, []).append((dt, worst))
    for name, fn, ref in [("logsumexp", trmath.logsumexp, O.mp_logsumexp), ("entropy", trmath.entropy, O.mp_entropy)]:
        for dt in tol:
            worst = 0.0
            for _, z, _w in _cases(torch):
                zz = z.to(dt)
                got, exact = float(fn(zz)), float(ref(zz))
                err = abs(got - exact) / max(abs(exact), 1e-300) if got != exact else 0.0
                worst = max(worst, err)
            rows.setdefault(name, []).append((dt, worst))
    for name, vals in rows.items():
        line = f"{name:<16}"
        for dt, worst in vals:
            ok = worst <= tol[dt]
            failures += not ok
            line += f"{worst:>11.1e}{' ' if ok else '!'}"
        print(line)
    print(f"targets: 1e-12 (float64), 1e-5 (16/32-bit); '!' marks a failure")
    print()

    if not args.no_speed:
        N, V = args.rows, args.vocab
        print(f"Speed, N={N} rows x V={V}, float32 (best of 5, this process)")
        torch.manual_seed(0)
        z = torch.randn(N, V)
        w = z + 0.1 * torch.randn(N, V)
        t_read = _timeit(lambda: (z.sum(), w.sum()))

        def eager_kl():
            lp, lq = z.log_softmax(-1), w.log_softmax(-1)
            return (lp.exp() * (lp - lq)).sum(-1)

        t_eager = _timeit(eager_kl, 3)
        print(f"{'operation':<22}{'ms':>9}{'x read-once':>13}{'x faster than eager':>22}")
        print(f"{'read-once (floor)':<22}{t_read * 1e3:>9.1f}{1.0:>13.2f}")
        print(f"{'eager textbook KL':<22}{t_eager * 1e3:>9.1f}{t_eager / t_read:>13.2f}")
        for name, fn in [("trmath.kl", trmath.kl), ("trmath.tv", trmath.tv), ("trmath.js", trmath.js)]:
            t = _timeit(lambda: fn(z, w))
            print(f"{name:<22}{t * 1e3:>9.1f}{t / t_read:>13.2f}{t_eager / t:>22.1f}")
        tok = torch.zeros(N, dtype=torch.long)
        t_lp = _timeit(lambda: trmath.token_logprobs(z, tok))
        t_r1 = _timeit(lambda: z.sum())
        print(f"{'trmath.token_logprobs':<22}{t_lp * 1e3:>9.1f}{t_lp / t_r1:>13.2f}   (vs read-once of the logits)")
        print("full benchmarks: python benchmarks/bench_exact.py")
    print()
    print("selfcheck:", "PASSED" if failures == 0 else f"FAILED ({failures} checks)")
    return 0 if failures == 0 else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="trmath", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd")
    sc = sub.add_parser("selfcheck", help="verify the installed kernels and print a speed table")
    for p in (parser, sc):
        p.add_argument("--rows", type=int, default=64, help="rows for the speed table (default 64)")
        p.add_argument("--vocab", type=int, default=151936, help="vocabulary size (default 151936)")
        p.add_argument("--no-speed", action="store_true", help="skip the speed table")
    dm = sub.add_parser("demo", help="end-to-end RL fine-tuning of a small causal LM, objectives side by side")
    from .demo import add_arguments

    add_arguments(dm)
    args = parser.parse_args(argv)
    if args.cmd == "demo":
        from .demo import config_from_args, run

        try:
            run(config_from_args(args, dm))
        except ImportError as e:
            print(f"trmath demo needs the 'demo' extra: pip install 'trmath[demo]' ({e})", file=sys.stderr)
            return 2
        return 0
    return selfcheck(args)


if __name__ == "__main__":
    sys.exit(main())
