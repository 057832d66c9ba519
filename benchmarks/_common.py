"""Shared helpers of the trmath benchmarks: machine record, interleaved timing, peak-memory probe,
aligned tables and CSV output.

Nothing here imports trmath; the benchmark scripts do.
"""

from __future__ import annotations

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
    freed -- a reused, already-resident heap block cannot hide an allocation. The page
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
