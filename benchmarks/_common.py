"""Shared helpers of the trmath benchmarks: machine record, interleaved timing, peak-memory probe,
aligned tables and CSV output.

Nothing here imports trmath; the benchmark scripts do.
"""

from __future__ import annotations

import contextlib
import csv
import ctypes
import ctypes.util
import gc
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# ---------------------------------------------------------------------------------------------
# machine record
# ---------------------------------------------------------------------------------------------


def _cpuinfo() -> dict[str, str]:
    info: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if ":" in line:
                    k, v = (s.strip() for s in line.split(":", 1))
                    info.setdefault(k, v)
    except OSError:
        pass
    return info


def _meminfo_total() -> str:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "?"


def _loadavg() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "?"


def machine_info(repo: Path) -> dict[str, Any]:
    """Everything needed to interpret the numbers: CPU, cores, library versions, threads."""
    import torch

    import trmath
    from trmath import _backend

    cpu = _cpuinfo()
    flags = set(cpu.get("flags", "").split())
    simd = [f for f in ("avx512f", "avx512bw", "avx512_bf16", "avx2", "fma", "f16c") if f in flags]
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        affinity = os.cpu_count() or 0
    commit = "?"
    try:  # read-only: rev-parse never touches the index or the work tree
        commit = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, timeout=10, check=False,
        ).stdout.strip() or "?"
    except (OSError, subprocess.SubprocessError):
        pass
    core_file = getattr(getattr(_backend, "_core", None), "__file__", "?")
    core_mtime = "?"
    try:
        core_mtime = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(os.path.getmtime(core_file)))
    except (OSError, TypeError):
        pass
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "cpu_model": cpu.get("model name", platform.processor() or "?"),
        "cpu_simd_flags": " ".join(simd) or "none of avx2/avx512",
        "logical_cpus": os.cpu_count(),
        "cpus_usable_by_process": affinity,
        "mem_total": _meminfo_total(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_num_threads": torch.get_num_threads(),
        "torch_num_interop_threads": torch.get_num_interop_threads(),
        "trmath": trmath.__version__,
        "trmath_isa": _backend.isa(),
        "trmath_num_threads": trmath.num_threads(),
        "trmath_core": str(core_file),
        "trmath_core_mtime": core_mtime,
        "repo_commit": commit,
        "loadavg_start": _loadavg(),
    }


# ---------------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------------


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def run_interleaved(
    methods: dict[str, Callable[[], Any]],
    reps: dict[str, int],
    warmup: int = 1,
) -> dict[str, list[float]]:
    """Time several callables side by side, round-robin.

    Round ``r`` runs every method that still has reps left, one after the other, so slow drifts
    of the shared machine's load hit all methods alike and the ``r``-th samples of two methods
    form a *paired* measurement (their ratio is taken per round for the spread). The result of
    each call is released outside the timed region; the order rotates from round to round.
    """
    for fn in methods.values():
        for _ in range(warmup):
            out = fn()
            del out
    times: dict[str, list[float]] = {k: [] for k in methods}
    names = list(methods)
    for r in range(max(reps.values(), default=0)):
        # rotate the order each round so no method always follows the same one
        for name in names[r % len(names):] + names[:r % len(names)]:
            fn = methods[name]
            if r >= reps[name]:
                continue
            t0 = time.perf_counter()
            out = fn()
            t1 = time.perf_counter()
            del out
            times[name].append(t1 - t0)
    return times


def time_adaptive(fn: Callable[[], Any], reps: int, min_sample_s: float, warmup: int = 1) -> list[float]:
    """Per-call times for calls too short to time one by one: each sample runs ``fn`` ``k``
    times (``k`` chosen so a sample lasts at least ``min_sample_s``) and reports the mean."""
    for _ in range(warmup):
        fn()
    t0 = time.perf_counter()
    fn()
    one = max(time.perf_counter() - t0, 1e-7)
    k = max(1, int(min_sample_s / one + 0.999))
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(k):
            fn()
        out.append((time.perf_counter() - t0) / k)
    return out


def paired_ratio(num: Sequence[float], den: Sequence[float]) -> tuple[float, float, float]:
    """Median, min and max of the per-round ratios ``num[r] / den[r]`` (rounds paired by index,
    over the rounds both have). On a shared machine the paired ratio is steadier than a ratio
    of medians taken at different moments."""
    n = min(len(num), len(den))
    if n == 0:
        nan = float("nan")
        return nan, nan, nan
    per = [num[i] / den[i] for i in range(n)]
    return median(per), min(per), max(per)


# ---------------------------------------------------------------------------------------------
# peak memory: the process's resident-set high-water mark, reset before each measured call
# ---------------------------------------------------------------------------------------------


@dataclass
class MemProbe:
    """Peak extra resident memory of one call, from ``/proc/self/status``.

    Method: ``malloc_trim(0)`` hands freed heap pages back to the kernel, ``echo 5 >
    /proc/self/clear_refs`` resets ``VmHWM`` (the resident high-water mark) to the current
    ``VmRSS``; the call runs; ``VmHWM - VmRSS_before`` is the peak of memory *touched* during the
    call, by any thread. glibc's mmap threshold is pinned at 128 KiB (``mallopt``), so every
    buffer larger than that is a fresh mapping that counts in full when written and leaves when
    freed -- a reused, already-resident heap block cannot hide an allocation. For the same
    reason trmath's cache of large outputs (``trmath.empty_buffer_cache``) is emptied before the
    call, so a gradient taken from it counts as the fresh allocation it would otherwise be. The page
    granularity (4 KiB) is far below the 1 % bar on the benchmark's inputs (>= 100 MB).
    ``tracemalloc`` is useless here: torch allocates outside Python's allocator.
    """

    available: bool = False
    reason: str = ""
    libc: Any = None
    notes: list[str] = field(default_factory=list)

    @classmethod
    def create(cls) -> MemProbe:
        p = cls()
        try:
            p.libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
            ok1 = p.libc.mallopt(M_MMAP_THRESHOLD, 128 * 1024)
            ok2 = p.libc.mallopt(M_TRIM_THRESHOLD, 256 * 1024)
            if not (ok1 and ok2):
                p.notes.append("mallopt refused; heap reuse may hide small allocations")
        except OSError as e:
            p.notes.append(f"no libc via ctypes ({e}); heap reuse may hide small allocations")
            p.libc = None
        try:
            p._reset()
            p._read("VmHWM")
            p.available = True
        except OSError as e:
            p.reason = f"cannot reset VmHWM via /proc/self/clear_refs: {e}"
        return p

    @staticmethod
    def _read(key: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
        raise OSError(f"{key} not in /proc/self/status")

    def _reset(self) -> None:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")

    def measure(self, fn: Callable[[], Any]) -> tuple[int, Any]:
        """Return ``(peak_bytes_above_start, result_of_fn)``."""
        # Tensors are freed by reference counting; a young-generation pass catches recent cycles
        # without the ~0.4 s of a full collection once torch.compile's objects are alive.
        gc.collect(1)
        try:
            import trmath

            trmath.empty_buffer_cache()
        except (ImportError, AttributeError):
            pass
        if self.libc is not None:
            self.libc.malloc_trim(0)
        self._reset()
        before = self._read("VmRSS")
        out = fn()
        peak = self._read("VmHWM")
        return peak - before, out

    def self_test(self) -> str:
        """Measure a known allocation (64 MiB written, then freed); returns a one-line verdict."""
        import torch

        n = 16 * 1024 * 1024

        def alloc():
            t = torch.empty(n, dtype=torch.float32)
            t.fill_(1.0)
            s = float(t[::4096].sum())
            del t
            return s

        alloc()
        got, _ = self.measure(alloc)
        nothing, _ = self.measure(lambda: None)
        want = 4 * n
        ok = abs(got - want) <= 0.02 * want and nothing <= 1 << 20
        return (f"{'ok' if ok else 'SUSPECT'}: a 64 MiB temporary measured {got / 2**20:.2f} MiB, "
                f"an empty call {nothing / 2**10:.0f} KiB")


def nbytes(obj: Any) -> int:
    """Total bytes of the tensors in ``obj`` (a tensor, or a tuple/list of them, or None)."""
    import torch

    if obj is None:
        return 0
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (tuple, list)):
        return sum(nbytes(o) for o in obj)
    return 0


# ---------------------------------------------------------------------------------------------
# output
# ---------------------------------------------------------------------------------------------


def fmt_time(s: float) -> str:
    if s != s:
        return "-"
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.3g} ms"
    return f"{s * 1e6:.3g} us"


def fmt_ratio(r: float, lo: float | None = None, hi: float | None = None) -> str:
    if r != r:
        return "-"
    s = f"{r:.3g}"
    if lo is not None and hi is not None and lo == lo:
        s += f" [{lo:.3g}-{hi:.3g}]"
    return s


def table(title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """An aligned text table: first column left-aligned, the others right-aligned."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(r: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))

    sep = "  ".join("-" * w for w in widths)
    out = [title, line(cells[0]), sep] + [line(r) for r in cells[1:]]
    return "\n".join(out)


def write_csv(path: Path, rows: list[dict[str, Any]], fields: Sequence[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(fields), extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in fields})


def write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, default=str)


# ---------------------------------------------------------------------------------------------
# correctness checks and the suite runner shared by run.py and the bench_<suite>.py modules
# (bench_exact.py has its own, older machinery and does not use what follows)
# ---------------------------------------------------------------------------------------------


@dataclass
class Check:
    """Verdict of one correctness check: ``ok``, the worst error and where it occurred.

    ``worst`` is the largest fraction of the tolerance used, ``max |got - ref| / (rtol |ref| +
    atol)`` over the elements (``inf`` for a NaN or a misplaced infinity): ``worst <= 1`` exactly
    when every element passes, whatever mix of checks was combined.
    """

    ok: bool
    worst: float
    where: str

    def __bool__(self) -> bool:
        return self.ok


def _as_tuple(x: Any) -> tuple:
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def check_close(got: Any, ref: Any, rtol: float, atol: float = 0.0, what: str = "output") -> Check:
    """Compare ``got`` with a float64 reference elementwise: ``|got - ref| <= rtol |ref| + atol``.

    ``got`` and ``ref`` are tensors or equally long tuples of tensors (or numbers). Shapes must
    match. Non-finite reference entries (``+-inf``) must be matched exactly; a NaN in ``got`` or
    a non-finite ``got`` where the reference is finite always fails. Returns a :class:`Check`.
    """
    import math

    import torch

    if not (rtol >= 0 and atol >= 0) or (rtol == 0 and atol == 0):
        raise ValueError(f"check_close: need rtol, atol >= 0, not both 0; got {rtol}, {atol}")
    gs, rs = _as_tuple(got), _as_tuple(ref)
    if len(gs) != len(rs):
        return Check(False, math.inf, f"{what}: {len(gs)} outputs, reference has {len(rs)}")
    worst, where, ok = 0.0, "", True
    for k, (g, r) in enumerate(zip(gs, rs)):
        name = what if len(gs) == 1 else f"{what}[{k}]"
        g = torch.as_tensor(g).detach().to("cpu", torch.float64)
        r = torch.as_tensor(r).detach().to("cpu", torch.float64)
        if g.shape != r.shape:
            return Check(False, math.inf,
                         f"{name}: shape {tuple(g.shape)}, reference {tuple(r.shape)}")
        g, r = g.reshape(-1), r.reshape(-1)
        fin = torch.isfinite(r)
        err = (g - r).abs()
        # entries where the reference is +-inf: got must be the same infinity (err is NaN there)
        bad = torch.where(fin, ~(err <= rtol * r.abs() + atol), g != r)
        inf_miss = torch.where(g == r, torch.zeros_like(err), torch.full_like(err, math.inf))
        scaled = torch.where(fin, err / (rtol * r.abs() + atol).clamp_min(1e-300), inf_miss)
        scaled = scaled.nan_to_num(nan=math.inf, posinf=math.inf)
        if scaled.numel():
            i = int(scaled.argmax())
            if float(scaled[i]) > worst or (not where and float(scaled[i]) >= worst):
                worst = float(scaled[i])
                where = f"{name} element {i}: got {float(g[i]):.9g}, reference {float(r[i]):.9g}"
        nbad = int(bad.sum())
        if nbad:
            ok = False
            where += (f"; {nbad} of {bad.numel()} elements of {name} outside "
                      f"rtol {rtol:g} atol {atol:g}")
    return Check(ok, worst, where)


def expm1mx(x: Any) -> Any:
    """``expm1(x) - x`` of a float64 tensor without cancellation: the Taylor series
    ``x^2/2 + x^3/6 + ... + x^6/720`` for ``|x| < 1e-3`` (the next term is below
    ``2e-19 x^2``), the direct form elsewhere (``expm1(x)`` errs by ``eps |x|``, relative to
    ``~ x^2 / 2`` that is ``2 eps / |x| <= 5e-13``). For the float64 references."""
    import torch

    series = x * x * (0.5 + x * (1 / 6 + x * (1 / 24 + x * (1 / 120 + x / 720))))
    return torch.where(x.abs() < 1e-3, series, torch.expm1(x) - x)


def check_all(*checks: Check) -> Check:
    """Combine checks: ok if all are; the worst error and the first failure's location."""
    ok = all(c.ok for c in checks)
    worst = max((c.worst for c in checks), default=0.0)
    bad = [c.where for c in checks if not c.ok]
    where = "; ".join(bad) if bad else max(checks, key=lambda c: c.worst).where if checks else ""
    return Check(ok, worst, where)


@dataclass
class Config:
    """What a suite is asked to do: ``mode`` (``tiny`` for the test suite, ``quick`` for CI,
    ``full`` for the report), whether to add ``torch.compile`` baselines, seed, reps cap."""

    mode: str = "quick"
    compile: bool = False
    seed: int = 0
    reps: int | None = None


class Suite:
    """Runs the comparisons of one benchmark suite and collects rows, bars and failures.

    :meth:`compare` is the one entry: every method is called once and its result checked
    against the float64 reference (a method whose check fails is recorded as a failure and not
    timed), then the checked methods are timed side by side (:func:`run_interleaved`), and the
    speed-up of each over the baseline is the median over rounds of the paired ratio.
    """

    fields = ("suite", "case", "pass", "shape", "method", "baseline", "median_s", "min_s", "max_s",
              "reps", "speedup", "speedup_min", "speedup_max", "check", "err_over_tol",
              "tolerance", "extra_mem_bytes", "note")
    bar_fields = ("suite", "case", "what", "ratio", "min", "max", "bar", "status")

    def __init__(self, name: str, cfg: Config, probe: MemProbe | None = None,
                 log: Callable[[str], None] | None = None):
        self.name, self.cfg = name, cfg
        self.rows: list[dict[str, Any]] = []
        self.bars: list[dict[str, Any]] = []
        self.problems: list[str] = []   # everything worth reading (compile failures, skips, ...)
        self.failures: list[str] = []   # correctness failures and crashes: the run fails
        self.skipped: list[str] = []
        self.probe = probe
        self._log = log or (lambda m: print(m, flush=True))
        self.max_reps = cfg.reps or {"tiny": 3, "quick": 5, "full": 9}[cfg.mode]
        self.min_reps = min(3, self.max_reps)
        self.budget_s = {"tiny": 0.02, "quick": 0.1, "full": 4.0}[cfg.mode]
        # a slow method (seconds per call) gets fewer rounds, down to 1, so that one method
        # never takes more than about this long to time
        self.max_method_s = {"tiny": 0.5, "quick": 3.0, "full": 60.0}[cfg.mode]
        self._compile_ready = False

    # -- bookkeeping ------------------------------------------------------------------------------
    def log(self, msg: str) -> None:
        self._log(f"[{self.name}] {msg}")

    def problem(self, msg: str) -> None:
        self.problems.append(msg)
        self.log(f"!! {msg}")

    def fail(self, msg: str) -> None:
        self.failures.append(msg)
        self.problem(msg)

    def skip(self, msg: str) -> None:
        self.skipped.append(msg)
        self.problem(f"skipped: {msg}")

    def guard(self, case: str, fn: Callable[[], Any]) -> None:
        """Run one case; a crash is a failure of the run (the case verified nothing)."""
        import traceback

        try:
            fn()
        except Exception as e:  # noqa: BLE001 - reported, the other cases go on
            traceback.print_exc()
            self.fail(f"{case} crashed: {type(e).__name__}: {e}")

    def compiled(self, fn: Callable[..., Any], what: str) -> Callable[..., Any] | None:
        """``torch.compile(fn)`` when the configuration asks for compiled baselines, else None.
        Compilation happens on the first call (inside :meth:`compare`, whose crash guard turns a
        compile error into a skipped method, see there)."""
        if not self.cfg.compile:
            return None
        import torch

        if not self._compile_ready:
            try:
                import torch._dynamo as dynamo

                for k in ("cache_size_limit", "recompile_limit"):
                    if hasattr(dynamo.config, k):
                        setattr(dynamo.config, k, 4096)
            except Exception as e:  # noqa: BLE001
                self.problem(f"torch._dynamo unavailable ({e}); no compiled baselines")
                self.cfg.compile = False
                return None
            self._compile_ready = True
        return torch.compile(fn, dynamic=False)

    def reps_for(self, one_s: float) -> int:
        one_s = max(one_s, 1e-9)
        reps = max(self.min_reps, min(self.max_reps, int(self.budget_s / one_s)))
        if reps * one_s > self.max_method_s:
            reps = max(1, int(self.max_method_s / one_s))
        return reps

    # -- the comparison ---------------------------------------------------------------------------
    def compare(self, case: str, pas: str, shape: str,
                methods: dict[str, tuple[Callable[[], Any], Callable[[Any], Check], str]],
                baseline: str, memory: bool = False, note: str = "") -> dict[str, list[float]]:
        """Check, then time, ``methods``: ``name -> (call, check, tolerance text)``.

        ``call()`` returns the result that ``check(result)`` verifies. A method whose name
        starts with ``compiled`` and whose first call raises is recorded as a problem (torch.compile
        is not the code under test); any other exception or a failed check is a failure.
        Returns the per-round times of the methods that were timed.
        """
        import time as _t

        import torch

        timed: dict[str, Callable[[], Any]] = {}
        reps: dict[str, int] = {}
        status: dict[str, tuple[str, float | None, str]] = {}
        key = f"{case} {pas} {shape}"
        for name, (fn, check, tol) in methods.items():
            try:
                t0 = _t.perf_counter()
                out = fn()
                first = _t.perf_counter() - t0
            except Exception as e:  # noqa: BLE001
                first_line = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
                msg = f"{key}: {name} raised {type(e).__name__}: {first_line}"
                if name.startswith("compiled"):
                    self.problem(msg + "; not timed")
                    status[name] = ("not timed: compile/run error", None, tol)
                else:
                    self.fail(msg)
                    status[name] = ("CRASHED", None, tol)
                continue
            c = check(out)
            del out
            if not c.ok:
                self.fail(f"{key}: {name} disagrees with the float64 reference: {c.where}; not timed")
                status[name] = ("CHECK FAILED", c.worst, tol)
                continue
            status[name] = ("ok", c.worst, tol)
            one = first
            if first < 1.0 or "compiled" in name:
                # one more call: warm (compiled graphs, caches) and size the reps on it; a call
                # of seconds has nothing to warm, and its checked call sizes the reps
                t0 = _t.perf_counter()
                out = fn()
                one = _t.perf_counter() - t0
                del out
            timed[name] = fn
            reps[name] = self.reps_for(one)
        times = run_interleaved(timed, reps, warmup=0) if timed else {}
        mem: dict[str, int] = {}
        if memory and self.probe is not None and self.probe.available:
            with torch.no_grad() if pas == "fwd" else contextlib.nullcontext():
                for name, fn in timed.items():
                    delta, out = self.probe.measure(fn)
                    mem[name] = max(0, delta - nbytes(out))
                    del out
        base = times.get(baseline)
        for name in methods:
            st, err, tol = status[name]
            ts = times.get(name, [])
            sp = paired_ratio(base, ts) if base and ts else (float("nan"),) * 3
            self.rows.append({
                "suite": self.name, "case": case, "pass": pas, "shape": shape, "method": name,
                "baseline": baseline, "median_s": median(ts) if ts else None,
                "min_s": min(ts) if ts else None, "max_s": max(ts) if ts else None,
                "reps": len(ts), "speedup": sp[0], "speedup_min": sp[1], "speedup_max": sp[2],
                "check": st, "err_over_tol": err, "tolerance": tol,
                "extra_mem_bytes": mem.get(name), "note": note,
            })
        return times

    def bar(self, case: str, what: str, times: dict[str, list[float]], num: str, den: str,
            bar: str = "", ok: Callable[[float], bool] | None = None) -> None:
        """Record the paired ratio ``num / den`` (times), with a PASS/MISS against ``bar``."""
        if times.get(num) and times.get(den):
            r, lo, hi = paired_ratio(times[num], times[den])
        else:
            r = lo = hi = float("nan")
        status = "" if ok is None or r != r else ("PASS" if ok(r) else "MISS")
        if r != r and ok is not None:
            status = "not measured"
        self.bars.append({"suite": self.name, "case": case, "what": what, "ratio": r, "min": lo,
                          "max": hi, "bar": bar, "status": status})

    # -- output -----------------------------------------------------------------------------------
    def table(self) -> str:
        rows = []
        for r in self.rows:
            mem = r["extra_mem_bytes"]
            rows.append([
                r["case"], r["pass"], r["shape"],
                r["method"] + (" *" if r["method"] == r["baseline"] else ""),
                fmt_time(r["median_s"]) if r["median_s"] is not None else "-",
                fmt_ratio(r["speedup"], r["speedup_min"], r["speedup_max"]),
                "-" if r["err_over_tol"] is None else f"{r['err_over_tol']:.2g}",
                r["tolerance"], r["check"],
                "-" if mem is None else f"{mem / 2**20:.2f} MiB",
            ])
        out = [table(f"## {self.name}  (speed-up = baseline time / method time, paired rounds, "
                     f"[min-max]; * = the baseline)",
                     ["case", "pass", "shape", "method", "median", "speed-up", "err/tol", "tolerance",
                      "check", "extra mem"], rows)]
        if self.bars:
            out.append("")
            out.append(table(f"## {self.name}: bars", ["case", "ratio", "measured", "bar", "status"],
                             [[b["case"], b["what"], fmt_ratio(b["ratio"], b["min"], b["max"]),
                               b["bar"], b["status"]] for b in self.bars]))
        return "\n".join(out)

    def write(self, outdir: Path) -> list[str]:
        """``timings.csv``, ``bars.csv`` and ``speedup.png`` (if matplotlib is there) in outdir."""
        outdir.mkdir(parents=True, exist_ok=True)
        write_csv(outdir / "timings.csv", self.rows, self.fields)
        write_csv(outdir / "bars.csv", self.bars, self.bar_fields)
        made = ["timings.csv", "bars.csv"]
        try:
            if plot_speedups(self.rows, outdir / "speedup.png", self.name):
                made.append("speedup.png")
        except Exception as e:  # noqa: BLE001 - the CSVs are written; a plot failure is reported
            self.problem(f"plot failed: {type(e).__name__}: {e}")
        return made


def plot_speedups(rows: list[dict[str, Any]], path: Path, title: str) -> bool:
    """Horizontal bars (log scale) of each non-baseline method's speed-up over its baseline.
    Returns False (and draws nothing) when matplotlib is missing or nothing was timed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    pts = [r for r in rows if r["method"] != r["baseline"] and r["speedup"] == r["speedup"]
           and r["speedup"] is not None]
    if not pts:
        return False
    labels = [f"{r['case']} {r['pass']}: {r['method']} vs {r['baseline']}" for r in pts]
    vals = [r["speedup"] for r in pts]
    lo = [max(0.0, r["speedup"] - r["speedup_min"]) for r in pts]
    hi = [max(0.0, r["speedup_max"] - r["speedup"]) for r in pts]
    h = 0.8 + 0.28 * len(pts)
    fig, ax = plt.subplots(figsize=(9, h))
    y = list(range(len(pts)))
    ax.barh(y, vals, xerr=[lo, hi], color=["tab:blue" if v >= 1 else "tab:red" for v in vals])
    ax.axvline(1.0, color="gray", lw=0.9, ls="--")
    ax.set_yticks(y)
    ax.set_yticklabels(labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("speed-up over the baseline (baseline time / method time; > 1 is faster)")
    ax.set_title(f"{title}: speed-ups (median of paired rounds, min-max)")
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
