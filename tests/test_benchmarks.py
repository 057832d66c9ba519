"""The benchmark entry point and its correctness gate.

* ``benchmarks/run.py --quick --tiny`` (every suite, quick mode on the smallest shapes) runs in a
  subprocess, exits 0 and writes its CSVs, machine record and summary;
* the checks the benchmarks rely on can fail: :func:`_common.check_close` and the projection
  check reject wrong results, :class:`_common.Suite` records a wrong or crashing method as a
  failure and does not time it, a failure makes ``run.main`` return 1; ``bench_exact.main``
  returns 1 when one of its checks fails (a wrong result, a crash, results that depend on the
  thread count), and ``run.py`` takes the exact suite's verdict from that status;
* the float64 references that gate the timings are themselves right, against mpmath at 50 digits
  where they avoid a cancellation (``expm1(l) - l``, the binary KL tail).
"""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import mpmath
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH))

import _common as C  # noqa: E402

F64 = torch.float64


# ---------------------------------------------------------------------------------------------
# the entry point, end to end
# ---------------------------------------------------------------------------------------------
def test_run_tiny_writes_everything_and_exits_0(tmp_path):
    out = tmp_path / "bench"
    proc = subprocess.run(
        [sys.executable, str(BENCH / "run.py"), "--quick", "--tiny", "--out", str(out)],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    summary = (out / "summary.md").read_text()
    assert "**Correctness: all checks passed**" in summary
    machine = json.loads((out / "machine.json").read_text())
    for key in ("cpu_model", "logical_cpus", "torch", "trmath", "mode"):
        assert machine[key] not in (None, "")
    assert machine["mode"] == "tiny"
    assert machine["torch"] == torch.__version__
    for suite in ("coarse", "estimators", "objectives", "projections"):
        assert f"## Suite `{suite}`" in summary
        with open(out / suite / "timings.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        if suite == "projections" and not rows:  # allowed only as a reported skip
            assert "skipped" in summary
            continue
        assert rows, suite
        # every method was checked and passed, and was then timed
        assert all(r["check"] == "ok" for r in rows), [r for r in rows if r["check"] != "ok"]
        assert all(int(r["reps"]) >= 1 and float(r["median_s"]) > 0 for r in rows)
        assert any(r["method"].startswith("trmath") for r in rows)
    assert (out / "exact" / "timings.csv").is_file()
    assert (out / "exact" / "machine.json").is_file()


# ---------------------------------------------------------------------------------------------
# check_close: the gate must be able to fail
# ---------------------------------------------------------------------------------------------
def test_check_close_accepts_within_tolerance():
    ref = torch.tensor([1.0, -2.0, 1e-3], dtype=F64)
    got = (ref * (1 + 5e-6)).float()
    c = C.check_close(got, ref, 1e-5)
    assert c.ok and 0 < c.worst <= 1


@pytest.mark.parametrize("bad, why", [
    (torch.tensor([1.0, -2.0, 1.1e-3]), "element 2"),             # 10 % off
    (torch.tensor([1.0, float("nan"), 1e-3]), "element 1"),       # NaN never passes
    (torch.tensor([1.0, float("inf"), 1e-3]), "element 1"),       # inf where the ref is finite
    (torch.tensor([1.0, -2.0, 0.0]), "element 2"),                # a zero instead of a small value
])
def test_check_close_rejects_wrong_results(bad, why):
    ref = torch.tensor([1.0, -2.0, 1e-3], dtype=F64)
    c = C.check_close(bad, ref, 1e-5)
    assert not c.ok and c.worst > 1
    assert why in c.where and "outside" in c.where


def test_check_close_infinities_shapes_and_tuples():
    ref = torch.tensor([-math.inf, -1.0], dtype=F64)
    assert C.check_close(torch.tensor([-math.inf, -1.0]), ref, 1e-6).ok
    assert not C.check_close(torch.tensor([-80.0, -1.0]), ref, 1e-6).ok     # finite for -inf
    assert not C.check_close(torch.tensor([math.inf, -1.0]), ref, 1e-6).ok  # wrong infinity
    assert not C.check_close(torch.tensor([[-math.inf, -1.0]]), ref, 1e-6).ok  # shape
    assert not C.check_close((ref, ref), (ref,), 1e-6).ok                   # arity
    assert not C.check_close((ref, ref + 1), (ref, ref), 1e-6).ok           # second output
    # the absolute part of the tolerance, alone
    assert C.check_close(torch.tensor([1e-7]), torch.tensor([0.0], dtype=F64), 0.0, 1e-6).ok
    assert not C.check_close(torch.tensor([1e-5]), torch.tensor([0.0], dtype=F64), 0.0, 1e-6).ok
    with pytest.raises(ValueError):
        C.check_close(ref, ref, 0.0, 0.0)


def test_check_all_combines():
    good, bad = C.Check(True, 0.5, "a"), C.Check(False, 3.0, "b wrong")
    assert C.check_all(good, good).ok
    c = C.check_all(good, bad)
    assert not c.ok and c.worst == 3.0 and "b wrong" in c.where


# ---------------------------------------------------------------------------------------------
# Suite.compare: a wrong or crashing method is a failure and is not timed
# ---------------------------------------------------------------------------------------------
def _suite():
    return C.Suite("t", C.Config(mode="tiny"), log=lambda m: None)


def test_suite_records_a_wrong_result_as_failure():
    s = _suite()
    ref = torch.arange(5, dtype=F64)
    right = lambda: torch.arange(5, dtype=torch.float32)  # noqa: E731
    wrong = lambda: torch.arange(5, dtype=torch.float32) * 1.01  # noqa: E731
    chk = lambda o: C.check_close(o, ref, 1e-6, 1e-12)  # noqa: E731
    times = s.compare("c", "fwd", "[5]", {"base": (right, chk, "t"), "bad": (wrong, chk, "t")},
                      baseline="base")
    assert "base" in times and "bad" not in times
    assert len(s.failures) == 1 and "bad disagrees" in s.failures[0]
    rows = {r["method"]: r for r in s.rows}
    assert rows["base"]["check"] == "ok" and rows["base"]["reps"] >= 1
    assert rows["bad"]["check"] == "CHECK FAILED" and rows["bad"]["reps"] == 0
    assert "CHECK FAILED" in s.table()


def test_suite_crashes_are_failures_but_compile_errors_are_problems():
    s = _suite()
    zero = torch.zeros(2, dtype=F64)
    ok = (lambda: torch.zeros(2), lambda o: C.check_close(o, zero, 1e-6, 1e-9), "t")

    def boom():
        raise RuntimeError("kernel exploded")

    s.compare("c", "fwd", "[2]", {"base": ok, "trmath": (boom, ok[1], "t"),
                                  "compiled x": (boom, ok[1], "t")}, baseline="base")
    assert len(s.failures) == 1 and "kernel exploded" in s.failures[0]
    assert any("compiled x" in p for p in s.problems if p not in s.failures)
    s.guard("case", lambda: 1 / 0)
    assert len(s.failures) == 2 and "ZeroDivisionError" in s.failures[1]


def test_run_main_exits_1_on_a_failed_check(tmp_path, monkeypatch):
    import bench_coarse
    import run

    def broken(s):
        ref = torch.ones(3, dtype=F64)
        chk = lambda o: C.check_close(o, ref, 1e-6)  # noqa: E731
        s.compare("broken", "fwd", "[3]",
                  {"torch": (lambda: torch.ones(3), chk, "t"),
                   "trmath": (lambda: torch.full((3,), 1.5), chk, "t")},  # 50 % off
                  baseline="torch")

    monkeypatch.setattr(bench_coarse, "run", broken)
    # no memory probe in the test process (it would re-tune glibc's malloc for the session)
    monkeypatch.setattr(C.MemProbe, "create", classmethod(lambda cls: cls(reason="not in tests")))
    rc = run.main(["--tiny", "--suites", "coarse", "--out", str(tmp_path)])
    assert rc == 1
    summary = (tmp_path / "summary.md").read_text()
    assert "1 FAILED" in summary and "trmath disagrees" in summary


def _wrong_kl(z, w):
    import trmath

    return trmath.kl(z, w) * 1.01  # 1 % off: far outside the 1e-4 gate


def _crashing_kl(z, w):
    raise RuntimeError("kernel exploded")


def _thread_dependent_kl(z, w):
    import trmath

    # within the forward gate (1e-7 absolute on values ~4e-2), but not bitwise reproducible
    return trmath.kl(z, w) + 1e-7 * trmath.num_threads()


#: the exact suite on one tiny shape, kl only, float32, no torch.compile
_EXACT_TINY = ["--quick", "--vocab", "2048", "--rows", "8", "--no-scaling", "--reps", "3",
               "--no-compile", "--ops", "kl", "--dtypes", "float32"]


@pytest.mark.parametrize("broken, extra", [
    (_wrong_kl, ["--no-threads"]),                     # forward and backward checks fail
    (_crashing_kl, ["--no-threads", "--bwd-ops", ""]),  # the forward case crashes
    (_thread_dependent_kl, ["--bwd-ops", ""]),          # the determinism check fails
], ids=["wrong", "crash", "threads"])
def test_bench_exact_exits_1_on_a_failed_check(tmp_path, monkeypatch, broken, extra):
    import bench_exact

    monkeypatch.setattr(C.MemProbe, "create", classmethod(lambda cls: cls(reason="not in tests")))
    monkeypatch.setitem(bench_exact.TRMATH, "kl", broken)
    rc = bench_exact.main(_EXACT_TINY + extra + ["--out", str(tmp_path)])
    assert rc == 1
    machine = json.loads((tmp_path / "machine.json").read_text())
    assert machine["failures"], machine
    assert set(machine["failures"]) <= set(machine["problems"])
    with open(tmp_path / "timings.csv", newline="") as f:
        timed = {r["method"] for r in csv.DictReader(f) if r["section"] == "forward"}
    # a wrong or crashing method is not timed (a crash ends its case); a wrong method does not
    # stop the baselines from being timed
    assert ("trmath" in timed) == (broken is _thread_dependent_kl)
    assert ("eager" in timed) == (broken is not _crashing_kl)


def test_bench_exact_exits_0_when_every_check_passes(tmp_path, monkeypatch):
    import bench_exact

    monkeypatch.setattr(C.MemProbe, "create", classmethod(lambda cls: cls(reason="not in tests")))
    rc = bench_exact.main(_EXACT_TINY + ["--no-threads", "--bwd-ops", "", "--out", str(tmp_path)])
    assert rc == 0
    assert json.loads((tmp_path / "machine.json").read_text())["failures"] == []


def test_run_main_exits_1_when_the_exact_suite_fails(tmp_path, monkeypatch):
    import bench_exact
    import run

    monkeypatch.setattr(C.MemProbe, "create", classmethod(lambda cls: cls(reason="not in tests")))
    monkeypatch.setitem(bench_exact.TRMATH, "kl", _wrong_kl)
    rc = run.main(["--tiny", "--suites", "exact", "--out", str(tmp_path)])
    assert rc == 1
    failures = json.loads((tmp_path / "exact" / "machine.json").read_text())["failures"]
    assert failures
    summary = (tmp_path / "summary.md").read_text()
    assert f"{len(failures)} FAILED" in summary
    assert all(f in summary for f in failures)


def test_exact_suite_verdict_is_the_exit_status(tmp_path):
    import run

    (tmp_path / "machine.json").write_text(json.dumps({
        "problems": ["check A failed", "torch.compile failed for B"],
        "failures": ["check A failed"],
    }))
    (tmp_path / "ratios.csv").write_text("op,pass,dtype,N,V,ratio,median,min,max,bar,status\n")
    (tmp_path / "report.txt").write_text("table\n")
    failed = run.ExactSuite(tmp_path, 1)
    assert failed.failures == ["check A failed"]
    assert failed.problems == ["check A failed", "torch.compile failed for B"]
    # the status decides; the record only details it
    assert run.ExactSuite(tmp_path, 0).failures == []
    raised = run.ExactSuite(tmp_path, RuntimeError("boom"))
    assert len(raised.failures) == 1 and "RuntimeError" in raised.failures[0]
    (tmp_path / "machine.json").write_text(json.dumps({"problems": []}))
    assert len(run.ExactSuite(tmp_path, 1).failures) == 1  # a status without details still fails
    assert run.ExactSuite(tmp_path / "missing", 0).failures  # no files: a failure, not a pass


# ---------------------------------------------------------------------------------------------
# the projection check and the float64 references
# ---------------------------------------------------------------------------------------------
def test_projection_check_rejects_an_unprojected_row():
    import bench_projections as P

    g = torch.Generator().manual_seed(0)
    z = torch.randn(3, 50, generator=g, dtype=F64) * 2
    w = z + 0.5 * torch.randn(3, 50, generator=g, dtype=F64)
    lpn, lpo = torch.log_softmax(z, -1), torch.log_softmax(w, -1)
    ref_lq, ref_eta = P.bisect_project_kl(lpn, lpo, 0.01, P.BISECT_STEPS_F64)
    assert bool((ref_eta > 0).all())
    # the reference satisfies the constraint it is checked with
    kl = P._kl_rows(ref_lq, lpo)
    assert float((kl / 0.01 - 1).abs().max()) < 1e-12

    def check(out):
        return P.kl_projection_check(out, ref_lq, ref_eta, lpo, 0.01, P.LP_RTOL, P.LP_ATOL,
                                     P.ETA_RTOL)

    assert check((ref_lq.float(), ref_eta)).ok
    assert not check((lpn.float(), ref_eta)).ok                  # not projected at all
    assert not check((ref_lq.float(), ref_eta * 1.001)).ok       # wrong multiplier
    shifted, _ = P.bisect_project_kl(lpn, lpo, 0.0101, P.BISECT_STEPS_F64)
    assert not check((shifted.float(), ref_eta)).ok               # a 1 % wrong radius


def test_estimator_reference_matches_mpmath():
    import bench_estimators as E

    mpmath.mp.dps = 50
    ls = [-30.0, -1.5, -1e-3, -1.1e-3, -3e-7, 1e-12, 2e-4, 0.999e-3, 0.7, 20.0]
    got = E._g64(torch.tensor(ls, dtype=F64))
    eps = 2.0**-52
    for l, g in zip(ls, got.tolist()):
        exact = mpmath.expm1(mpmath.mpf(l)) - mpmath.mpf(l)
        # series (|l| < 1e-3): a few ulps; direct form: expm1's error eps |l| relative to
        # ~ l^2 / 2, i.e. 2 eps / |l|, plus a few ulps
        bound = 8 * eps if abs(l) < 1e-3 else eps * (8 + 4 / abs(l))
        assert abs(g - float(exact)) <= bound * abs(float(exact)), (l, g, exact)


def test_binary_kl_reference_matches_mpmath():
    import bench_coarse as B

    mpmath.mp.dps = 50
    # the fourth pair: d = 2.5e-7, where the textbook form loses 5 digits even in float64
    pairs = [(-0.5, -0.7), (-1e-6, -2e-6), (-20.0, -19.0),
             (-0.04143478721380234, -0.04143453389406204),
             (-3e-3, -3.1e-3), (-1e-7, -1.0000001e-7), (-5.0, -5.0)]
    lp = torch.tensor([a for a, _ in pairs], dtype=torch.float32)
    lq = torch.tensor([b for _, b in pairs], dtype=torch.float32)
    got = B.ref_binary_kl(lp, lq)
    for a, b, g in zip(lp.tolist(), lq.tolist(), got.tolist()):
        p, q = mpmath.exp(mpmath.mpf(a)), mpmath.exp(mpmath.mpf(b))
        exact = p * mpmath.log(p / q) + (1 - p) * mpmath.log((1 - p) / (1 - q))
        # two non-negative terms, every factor to a few ulps: a few ulps of the result
        assert abs(g - float(exact)) <= 1e-14 * abs(float(exact)), (a, b, g, exact)
