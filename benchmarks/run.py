#!/usr/bin/env python
"""The single entry point of trmath's benchmarks.

Runs the suites -- ``exact`` (full-vocabulary reductions forward and backward,
``bench_exact.py``), ``coarse`` (Binary / Top-K divergences and the Top-K builder), ``estimators``
(k1/k2/k3, importance-weighted, Rao--Blackwellized KL), ``objectives`` (the policy losses, forward
and backward) and ``projections`` (TV / KL trust-region projections, full and sparse) -- prints
each suite's table, and writes to ``--out``:

* ``<suite>/timings.csv``, ``<suite>/bars.csv``, ``<suite>/speedup.png`` (the exact suite writes
  its own files in ``exact/``, see ``README.md``);
* ``machine.json``: CPU model and flags, cores, memory, torch and trmath versions, threads;
* ``summary.md``: the machine, every table, the bars, the problems and the verdict.

Every timed result is checked against a float64 reference first; the exit status is 1 if any
check failed or a case crashed, 0 otherwise (a skipped suite or a failed ``torch.compile`` is
reported, not fatal). ``--quick`` is for CI (small shapes, no ``torch.compile``); ``--tiny``
(alone or with ``--quick``) is quick mode on the smallest shapes, the test suite's smoke run: it
proves that everything runs and checks, its timings mean nothing.

    python benchmarks/run.py [--quick] [--tiny] [--suites exact,coarse,...] [--out DIR]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

# As in bench_exact.py: libgomp reads OMP_WAIT_POLICY when torch loads it. Spinning OpenMP
# threads stall torch's kernels for a scheduler slice when the 2 cores are shared; PASSIVE
# removes that, in the baselines' favour. An OMP_WAIT_POLICY in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import _common as C  # noqa: E402

SUITES = ("exact", "coarse", "estimators", "objectives", "projections")


class ExactSuite:
    """The exact suite's outcome: ``bench_exact.main``'s exit status ``rc`` (0: every check
    passed) or the exception it raised, and the files it wrote in ``outdir``.

    The verdict is ``rc`` alone; ``machine.json`` only details it (its ``failures`` list names the
    checks that failed, its ``problems`` list everything else worth reading). Missing files are
    failures too: a run that wrote nothing verified nothing.
    """

    name = "exact"

    def __init__(self, outdir: Path, rc: int | BaseException):
        self.outdir = outdir
        self.failures: list[str] = []
        self.problems: list[str] = []
        self.skipped: list[str] = []
        self.bars: list[dict[str, Any]] = []
        try:
            machine = json.loads((outdir / "machine.json").read_text())
        except (OSError, ValueError) as e:
            self.failures.append(f"no machine.json from the exact suite: {e}")
            machine = {}
        self.problems += machine.get("problems", [])
        if isinstance(rc, BaseException):
            self.failures.append(f"bench_exact.main raised {type(rc).__name__}: {rc}")
        elif rc != 0:
            self.failures += machine.get("failures") or [
                f"bench_exact.main returned {rc} (no failures recorded in machine.json)"]
        try:
            with open(outdir / "ratios.csv", newline="") as f:
                for r in csv.DictReader(f):
                    if r.get("bar"):
                        self.bars.append({
                            "suite": "exact", "case": f"{r['op']} {r['pass']} {r['dtype']} "
                            f"N={r['N']} V={r['V']}", "what": r["ratio"],
                            "ratio": float(r["median"] or "nan"), "min": float(r["min"] or "nan"),
                            "max": float(r["max"] or "nan"), "bar": r["bar"], "status": r["status"]})
        except OSError as e:
            self.failures.append(f"no ratios.csv from the exact suite: {e}")
        try:
            self._text = (outdir / "report.txt").read_text().rstrip()
        except OSError:
            self._text = "(no report)"

    def table(self) -> str:
        return self._text


def run_exact(cfg: C.Config, out: Path) -> ExactSuite:
    import bench_exact

    argv = ["--out", str(out / "exact"), "--seed", str(cfg.seed)]
    if cfg.mode == "tiny":
        argv += ["--quick", "--vocab", "2048", "--rows", "8", "--no-scaling", "--no-threads",
                 "--reps", "3"]
    elif cfg.mode == "quick":
        argv += ["--quick", "--no-scaling"]
    elif cfg.reps:
        argv += ["--reps", str(max(3, cfg.reps))]
    if not cfg.compile:
        argv.append("--no-compile")
    print(f"[exact] bench_exact.py {' '.join(argv)}", flush=True)
    rc: int | BaseException
    try:
        rc = bench_exact.main(argv)
    except Exception as e:  # noqa: BLE001 - recorded as a failure of the run
        import traceback

        traceback.print_exc()
        rc = e
    return ExactSuite(out / "exact", rc)


def run_suite(name: str, cfg: C.Config, out: Path, probe: C.MemProbe):
    if name == "exact":
        return run_exact(cfg, out)
    mod = __import__(f"bench_{name}")
    s = C.Suite(name, cfg, probe)
    t0 = time.perf_counter()
    s.log(f"start ({cfg.mode})")
    s.guard(name, lambda: mod.run(s))
    s.log(f"done in {time.perf_counter() - t0:.1f} s")
    s.made = s.write(out / name)
    return s


def summary(suites: list, machine: dict[str, Any], cfg: C.Config, argv: list[str]) -> str:
    failures = [f"{s.name}: {f}" for s in suites for f in s.failures]
    lines = ["# trmath benchmarks: summary", "",
             f"Command: `python benchmarks/run.py {' '.join(argv)}` (mode **{cfg.mode}**, "
             f"torch.compile baselines {'on' if cfg.compile else 'off'}).", "",
             "Ratios measured side by side in one process; absolute times depend on the machine "
             "and its load (see the load average below).", "",
             "**Correctness: " + ("all checks passed**" if not failures else
                                  f"{len(failures)} FAILED**") + "", "",
             "## Machine", "", "| key | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in machine.items() if k != "problems"]
    for s in suites:
        state = ("FAILED" if s.failures else
                 "skipped" if s.skipped and not getattr(s, "rows", [None]) else
                 "ok, parts skipped" if s.skipped else "ok")
        lines += ["", f"## Suite `{s.name}`: {state}", "", "```text", s.table(), "```"]
        for title, items in (("Failures", s.failures), ("Skipped", s.skipped),
                             ("Problems", [p for p in s.problems if p not in s.failures])):
            if items:
                lines += ["", f"{title}:", ""] + [f"* {x}" for x in items]
    if failures:
        lines += ["", "## Failed checks", ""] + [f"* {f}" for f in failures]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small shapes, few reps, no torch.compile")
    p.add_argument("--tiny", action="store_true",
                   help="quick mode on the smallest shapes (the test suite's smoke run: it shows "
                        "that everything runs and checks; its timings mean nothing)")
    p.add_argument("--suites", default=",".join(SUITES), help="comma-separated: " + ",".join(SUITES))
    p.add_argument("--out", default=str(HERE.parent / "bench-out"),
                   help="output folder (default: bench-out/ at the repository root, ignored by git, "
                        "where docs/_gen_performance.py reads)")
    p.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                   help="torch.compile baselines: auto = on in full mode only")
    p.add_argument("--reps", type=int, default=None, help="most timed rounds per method")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    a.suites_l = [x.strip() for x in a.suites.split(",") if x.strip()]
    for x in a.suites_l:
        if x not in SUITES:
            p.error(f"--suites: unknown suite {x!r}; valid: {', '.join(SUITES)}")
    if a.reps is not None and a.reps < 1:
        p.error("--reps: must be >= 1")
    return a


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = parse_args(argv)
    t0 = time.perf_counter()
    mode = "tiny" if a.tiny else "quick" if a.quick else "full"
    cfg = C.Config(mode=mode, compile=(a.compile == "on" or (a.compile == "auto" and mode == "full")),
                   seed=a.seed, reps=a.reps)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    probe = C.MemProbe.create()
    machine = C.machine_info(HERE.parent)
    machine["mode"] = mode
    machine["suites"] = ",".join(a.suites_l)
    machine["torch_compile_baselines"] = cfg.compile
    machine["OMP_WAIT_POLICY"] = os.environ.get("OMP_WAIT_POLICY", "(libgomp default)")
    machine["memory_probe"] = probe.self_test() if probe.available else f"unavailable: {probe.reason}"
    print("## machine")
    for k, v in machine.items():
        print(f"  {k:<26} {v}")
    suites = []
    for name in a.suites_l:
        suites.append(run_suite(name, cfg, out, probe))
        if name != "exact":
            print("\n" + suites[-1].table() + "\n", flush=True)
    machine["loadavg_end"] = C._loadavg()
    machine["runtime_s"] = round(time.perf_counter() - t0, 1)
    machine["problems"] = [f"{s.name}: {p}" for s in suites for p in s.problems]
    C.write_json(out / "machine.json", machine)
    C.write_csv(out / "bars.csv", [b for s in suites for b in s.bars], C.Suite.bar_fields)
    (out / "summary.md").write_text(summary(suites, machine, cfg, argv))
    failures = [f"{s.name}: {f}" for s in suites for f in s.failures]
    print(f"wrote {out}/summary.md, machine.json, bars.csv and one folder per suite; "
          f"runtime {machine['runtime_s']} s")
    if failures:
        print(f"\n## {len(failures)} correctness failure(s):")
        for f in failures:
            print(f"  - {f}")
        return 1
    print("\n## correctness: every timed result agreed with its float64 reference")
    return 0


if __name__ == "__main__":
    sys.exit(main())
