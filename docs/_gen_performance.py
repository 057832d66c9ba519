"""Generate ``docs/_generated/performance.rst`` from the benchmark output.

``benchmarks/run.py`` writes into ``bench-out/`` at the repository root (``--out``):

* ``machine.json`` (the machine record of the run), ``bars.csv`` and ``summary.md``;
* ``exact/``: what ``benchmarks/bench_exact.py`` writes -- ``ratios.csv`` (every ratio against
  read-once, eager and compiled, with its bar), ``timings.csv``, ``machine.json``,
  ``report.txt`` and PNG plots;
* ``coarse/``, ``estimators/``, ``objectives/``, ``projections/``: ``timings.csv`` (one row per
  method, with its speed-up over the suite's baseline), ``bars.csv`` and ``speedup.png``.

This script writes one section per suite: its ratios as a table, its bars, its plots (copied
into ``docs/_generated/``) and the problems the run reported for it; then the machine record.
A suite without output gets a short note saying how to produce it; without any output at all the
page is a single note. ``bench_exact.py`` run on its own with ``--out bench-out`` (its files at
the top level of the folder) is read as the exact suite.

``docs/conf.py`` runs it on every build (it is cheap). Set ``TRMATH_BENCH_OUT`` to read another
directory. Run it directly with ``python docs/_gen_performance.py``.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
OUT = DOCS / "_generated" / "performance.rst"
MAX_ROWS = 200  # a table longer than this is cut, with a note

#: The suites of ``benchmarks/run.py``: folder, title, what is compared.
SUITES = (
    ("exact", "Exact reductions",
     "Full-vocabulary reductions (``logsumexp``, ``entropy``, ``token_logprobs``, ``kl``, ``tv``, "
     "``js``) forward and ``kl`` backward, by ``benchmarks/bench_exact.py``. Each ratio compares "
     "trmath with a baseline timed in the same rounds: *read-once* (one ``x.sum()`` over every "
     "input, the bandwidth floor: ``trmath/read-once``), the textbook *eager* PyTorch formula "
     "(``eager/trmath``, a speed-up) and its ``torch.compile`` (``compiled/trmath``); the extra "
     "memory of a call is in % of its input."),
    ("coarse", "Coarse-grained divergences",
     "``binary_tv``, ``binary_kl``, ``topk_tv`` and ``topk_kl`` against the textbook float32 "
     "formulas, and ``topk_logprobs`` against ``torch.topk`` + ``log_softmax`` + ``gather``."),
    ("estimators", "Sampled estimators",
     "``k1``, ``k2``, ``k3`` (forward and forward+backward) and the importance-weighted ``k3`` "
     "against their torch one-liners; ``rb_kl`` against a torch reference."),
    ("objectives", "Policy objectives",
     "``policy_loss`` (PPO, CISPO, GSPO, DPPO with several divergences), loss and loss + "
     "gradient, against a plain torch PPO-clip loss: the ratio is the cost of what trmath adds."),
    ("projections", "Trust-region projections",
     "``project_kl`` (full vocabulary and sparse) and ``project_tv`` against ``trmath.kl``, a "
     "torch bisection and the textbook mixture."),
)

#: The exact suite's plots, in this order; any other PNG follows.
EXACT_PLOTS = ("ratio_read_once.png", "speedup.png", "memory.png", "scaling.png")
#: Keys of a row of the exact suite's ``ratios.csv``.
EXACT_KEYS = ("op", "pass", "dtype", "N", "V")
#: The timings columns that the per-method table of the other suites needs.
SUITE_COLUMNS = ("case", "pass", "shape", "method", "baseline", "median_s", "reps", "speedup",
                 "speedup_min", "speedup_max", "check", "err_over_tol", "extra_mem_bytes")


#: A full run of benchmarks/run.py kept with the documentation, shown when no newer results
#: exist (the machines that build the docs, CI included, do not run the full benchmarks).
RECORD = DOCS / "_static" / "bench-record"


def _bench_dir() -> Path:
    env = os.environ.get("TRMATH_BENCH_OUT")
    if env:
        return Path(env)
    local = ROOT / "bench-out"
    if local.is_dir() and (local / "machine.json").is_file():
        return local
    return RECORD


def _shown(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


# ---- rst helpers -------------------------------------------------------------------------------
def _cell(text: str) -> str:
    text = text.strip()
    try:
        value = float(text)
    except ValueError:
        value = None
    if value is not None and text.lower() not in ("nan", "inf", "-inf") and not text.isdigit():
        text = f"{value:.4g}"
    # list-table cells are rst: one line, with rst's inline markup characters escaped
    text = text.replace("\n", " ")
    text = re.sub(r"([\\`*_|<>\[\]])", r"\\\1", text)
    if not text:
        return ".."  # an empty comment keeps the cell well-formed
    if text[0] in "-+#:.=~^":
        text = "\\" + text  # not a bullet, enumerator, comment or section marker
    return text


def _list_table(title: str, header: list[str], body: list[list[str]]) -> list[str]:
    """A ``list-table`` of plain-text cells (escaped here); cut at :data:`MAX_ROWS` rows."""
    ncol = len(header)
    cut = len(body) > MAX_ROWS
    lines = [f".. list-table:: {title}", "   :header-rows: 1", ""]
    for row in [header] + body[:MAX_ROWS]:
        row = (list(row) + [""] * ncol)[:ncol]
        lines.append(f"   * - {_cell(row[0])}")
        lines += [f"     - {_cell(c)}" for c in row[1:]]
    lines.append("")
    if cut:
        lines += [f"(first {MAX_ROWS} of {len(body)} rows)", ""]
    return lines


def _note(*text: str) -> list[str]:
    return [".. note::", ""] + [f"   {t}" if t else "" for t in text] + [""]


def _heading(text: str, char: str = "~") -> list[str]:
    return [text, char * len(text), ""]


def _read_csv(path: Path) -> list[dict[str, str]] | None:
    """The rows of a CSV file with a header, or None if it cannot be read."""
    try:
        with path.open(newline="") as fh:
            return [r for r in csv.DictReader(fh) if any((v or "").strip() for v in r.values())]
    except (OSError, csv.Error, UnicodeDecodeError):
        return None


def _read_json(path: Path) -> dict | None:
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def _num(text: str | None) -> float:
    try:
        return float(text) if text not in (None, "") else math.nan
    except ValueError:
        return math.nan


def _fmt_ratio(r: str | None, lo: str | None, hi: str | None) -> str:
    """``1.83 [1.61-2.10]`` (median over paired rounds, min-max), ``-`` when not measured."""
    m = _num(r)
    if not math.isfinite(m):
        return "-"
    a, b = _num(lo), _num(hi)
    return f"{m:.3g} [{a:.3g}-{b:.3g}]" if math.isfinite(a) and math.isfinite(b) else f"{m:.3g}"


def _fmt_time(text: str | None) -> str:
    s = _num(text)
    if not math.isfinite(s):
        return "-"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if s >= scale:
            return f"{s / scale:.3g} {unit}"
    return f"{s / 1e-9:.3g} ns"


def _fmt_bytes(text: str | None) -> str:
    b = _num(text)
    return "-" if not math.isfinite(b) else f"{b / 2**20:.2f} MiB"


# ---- tables ------------------------------------------------------------------------------------
def _flatten(obj: object, prefix: str = "") -> list[tuple[str, str]]:
    if isinstance(obj, dict):
        out: list[tuple[str, str]] = []
        for k, v in obj.items():
            out += _flatten(v, f"{prefix}{k}." if isinstance(v, dict) else f"{prefix}{k}")
        return out
    return [(prefix.rstrip("."), json.dumps(obj) if isinstance(obj, (list, tuple)) else str(obj))]


def _machine_table(path: Path, title: str) -> list[str]:
    """A JSON object (a machine record) as a two-column table; nothing if it cannot be read."""
    obj = _read_json(path)
    if obj is None:
        return []
    return _list_table(f"{title} (``{_shown(path)}``)", ["key", "value"],
                       [[k, v] for k, v in _flatten(obj)])


def _generic_table(path: Path) -> list[str]:
    """Every column of a CSV file, in the file's order."""
    try:
        with path.open(newline="") as fh:
            rows = [r for r in csv.reader(fh) if r and any(c.strip() for c in r)]
    except (OSError, csv.Error, UnicodeDecodeError):
        rows = []
    if not rows:
        return [f"``{_shown(path)}`` is empty or unreadable.", ""]
    return _list_table(f"{path.stem.replace('_', ' ')} (``{_shown(path)}``)", rows[0], rows[1:])


def _exact_ratio_tables(path: Path) -> list[str]:
    """``ratios.csv`` of the exact suite, one row per shape: the speed ratios (with their bars)
    in one table, the extra memory in another, the shape-free bars (scaling) in a third."""
    rows = _read_csv(path)
    if rows is None:
        return [f"``{_shown(path)}`` is unreadable.", ""]
    if not rows:
        return [f"``{_shown(path)}`` has no rows.", ""]
    needed = EXACT_KEYS + ("ratio", "median", "min", "max", "bar", "status")
    if not all(k in rows[0] for k in needed):
        return _generic_table(path)

    def cell(r: dict[str, str]) -> str:
        text = _fmt_ratio(r["median"], r["min"], r["max"])
        if r["bar"]:
            text += f" (bar {r['bar']}: {r['status'] or 'n/a'})"
        return text

    lines: list[str] = []
    shaped = [r for r in rows if r["N"] and r["V"]]
    groups = (("speed", "speed ratios (time of the first method over time of the second; "
                        "median [min-max] of paired rounds)",
               [r for r in shaped if not r["ratio"].startswith("extra memory")]),
              ("memory", "peak extra memory of one call, % of the input",
               [r for r in shaped if r["ratio"].startswith("extra memory")]))
    for _, title, group in groups:
        if not group:
            continue
        names: list[str] = []
        table: dict[tuple[str, ...], dict[str, str]] = {}
        for r in group:
            if r["ratio"] not in names:
                names.append(r["ratio"])
            table.setdefault(tuple(r[k] for k in EXACT_KEYS), {})[r["ratio"]] = cell(r)
        body = [list(key) + [cells.get(n, "-") for n in names] for key, cells in table.items()]
        lines += _list_table(f"exact suite: {title} (``{_shown(path)}``)",
                             list(EXACT_KEYS) + names, body)
    other = [r for r in rows if not (r["N"] and r["V"])]
    if other:
        lines += _list_table(f"exact suite: other bars (``{_shown(path)}``)",
                             ["op", "pass", "dtype", "what", "measured"],
                             [[r["op"], r["pass"], r["dtype"], r["ratio"], cell(r)] for r in other])
    return lines


def _suite_timings_table(path: Path, name: str) -> list[str]:
    """A suite's ``timings.csv``: per method, its time and speed-up over the suite's baseline."""
    rows = _read_csv(path)
    if rows is None:
        return [f"``{_shown(path)}`` is unreadable.", ""]
    if not rows:
        return [f"``{_shown(path)}`` has no rows: nothing of this suite was timed (see its "
                "problems below, if any).", ""]
    if not all(k in rows[0] for k in SUITE_COLUMNS):
        return _generic_table(path)
    body = []
    for r in rows:
        base = r["method"] == r["baseline"]
        body.append([
            r["case"], r["pass"], r["shape"], r["method"] + (" (baseline)" if base else ""),
            _fmt_time(r["median_s"]), r["reps"] or "0",
            "1" if base else _fmt_ratio(r["speedup"], r["speedup_min"], r["speedup_max"]),
            r["check"], f"{_num(r['err_over_tol']):.2g}" if r["err_over_tol"] else "-",
            _fmt_bytes(r["extra_mem_bytes"]),
        ])
    return _list_table(
        f"{name} suite: speed-up over the baseline (baseline time / method time, median [min-max] "
        f"of paired rounds) (``{_shown(path)}``)",
        ["case", "pass", "shape", "method", "median time", "rounds", "speed-up", "check",
         "err/tol", "extra memory"], body)


def _suite_bars_table(path: Path, name: str) -> list[str]:
    rows = _read_csv(path)
    if not rows or not all(k in rows[0] for k in ("case", "what", "ratio", "min", "max", "bar",
                                                    "status")):
        return []
    return _list_table(f"{name} suite: bars (``{_shown(path)}``)",
                       ["case", "ratio", "measured", "bar", "status"],
                       [[r["case"], r["what"], _fmt_ratio(r["ratio"], r["min"], r["max"]),
                         r["bar"] or "-", r["status"] or "-"] for r in rows])


def _count_rows(path: Path) -> int:
    rows = _read_csv(path)
    return len(rows) if rows else 0


# ---- plots and text ----------------------------------------------------------------------------
class _Plots:
    """Copies the benchmark's PNG plots next to the generated page (``bench_<suite>_<name>``)
    and removes the copies of plots that are gone."""

    def __init__(self) -> None:
        self.kept: set[str] = set()

    def figures(self, folder: Path, suite: str, order: tuple[str, ...] = ()) -> list[str]:
        pngs = sorted(folder.glob("*.png"), key=lambda p: (
            order.index(p.name) if p.name in order else len(order), p.name))
        lines: list[str] = []
        for png in pngs:
            dst = OUT.parent / f"bench_{suite}_{png.name}"
            try:
                data = png.read_bytes()
            except OSError:
                continue
            if not dst.exists() or dst.read_bytes() != data:
                dst.write_bytes(data)
            self.kept.add(dst.name)
            lines += [f".. figure:: _generated/{dst.name}", "   :width: 90%", "",
                      f"   ``{_shown(png)}``", ""]
        return lines

    def prune(self) -> None:
        for old in OUT.parent.glob("bench_*.png"):
            if old.name not in self.kept:
                old.unlink()


def _report(path: Path) -> list[str]:
    try:
        text = path.read_text(errors="replace").rstrip("\n")
    except OSError:
        return []
    if not text.strip():
        return []
    body = ["   " + line if line.strip() else "" for line in text.splitlines()]
    return ([f"The suite's own report (``{_shown(path)}``):", "", ".. code-block:: text", ""]
            + body + [""])


def _problems(machine: dict | None, suite: str) -> list[str]:
    """The problems the run's record lists for ``suite`` (``"<suite>: ..."``)."""
    if not machine:
        return []
    prefix = f"{suite}: "
    items = [p[len(prefix):] for p in machine.get("problems", []) if isinstance(p, str)
             and p.startswith(prefix)]
    if not items:
        return []
    return ["Problems reported by the run:", ""] + [f"* {_cell(p)}" for p in items] + [""]


# ---- the page ----------------------------------------------------------------------------------
def _exact_dir(bench: Path) -> Path | None:
    """``bench/exact`` (``run.py``), or ``bench`` itself when ``bench_exact.py`` wrote there."""
    if (bench / "exact").is_dir():
        return bench / "exact"
    if (bench / "ratios.csv").is_file():
        return bench
    return None


def _exact_section(folder: Path, plots: _Plots, own_record: bool) -> list[str]:
    lines = _exact_ratio_tables(folder / "ratios.csv")
    lines += plots.figures(folder, "exact", EXACT_PLOTS)
    if (folder / "report.txt").is_file():
        lines += _report(folder / "report.txt")
    if (folder / "timings.csv").is_file():
        lines += [f"Every individual measurement ({_count_rows(folder / 'timings.csv')} rows) is "
                  f"in ``{_shown(folder / 'timings.csv')}``.", ""]
    if own_record:
        lines += _machine_table(folder / "machine.json", "exact suite: its own machine record")
    return lines


def _suite_section(folder: Path, name: str, plots: _Plots) -> list[str]:
    lines = _suite_timings_table(folder / "timings.csv", name)
    lines += _suite_bars_table(folder / "bars.csv", name)
    lines += plots.figures(folder, name)
    return lines


def _missing(name: str, where: Path) -> list[str]:
    return _note(f"No results of the ``{name}`` suite in ``{_shown(where)}/``: run "
                 f"``python benchmarks/run.py --suites {name}`` and rebuild the documentation.")


def render(bench: Path) -> tuple[str, _Plots]:
    plots = _Plots()
    lines = [".. This file is generated by docs/_gen_performance.py; do not edit.", ""]
    found = {name: (bench / name) if name != "exact" else _exact_dir(bench)
             for name, _, _ in SUITES} if bench.is_dir() else {}
    found = {k: v for k, v in found.items() if v is not None and v.is_dir()}
    if not found:
        lines += _note(
            "No benchmark results were found when these pages were built. Run",
            "",
            ".. code-block:: bash",
            "",
            "   python benchmarks/run.py",
            "",
            "from the repository root (it writes its CSV files, plots and machine record into",
            "``bench-out/``; ``--quick`` for a short run), then rebuild the documentation.",
        )
        return "\n".join(lines), plots
    machine_path = bench / "machine.json"
    machine = _read_json(machine_path)
    exact_alone = found.get("exact") == bench  # bench_exact.py's files at the top level
    lines += [
        f"Results read from ``{_shown(bench)}/``, as written by the benchmarks on the machine "
        "that ran them (its record is the last table). Ratios are medians over paired, "
        "interleaved rounds, with the range of the per-round ratios in brackets; a *bar* is "
        "the target a ratio is compared with, and its status the verdict (measured, not "
        "asserted). Every timed result was first checked against a float64 reference.",
        "",
    ]
    if machine is not None and not exact_alone:
        mode = machine.get("mode")
        lines += [f"Mode of the run: ``{mode}``"
                  + (" (its timings only show that everything runs; they mean nothing)."
                     if mode == "tiny" else "."), ""]
    if (bench / "summary.md").is_file():
        lines += [f"The run's summary, with every table as printed, is "
                  f"``{_shown(bench / 'summary.md')}``.", ""]
    for name, title, what in SUITES:
        lines += _heading(f"{title} (``{name}``)")
        lines += [what, ""]
        folder = found.get(name)
        if folder is None:
            lines += _missing(name, bench / name)
            continue
        if name == "exact":
            lines += _exact_section(folder, plots, own_record=not exact_alone)
        else:
            lines += _suite_section(folder, name, plots)
        lines += _problems(machine, name)
    lines += _heading("Machine record")
    if machine is None:
        lines += _note(f"No readable machine record (``{_shown(machine_path)}``).")
    else:
        lines += _machine_table(machine_path, "machine record of the run")
    return "\n".join(lines), plots


# The GPU record: benchmarks/bench_cuda.py run on a GPU machine (.ci/gpu.sh), kept with the docs
# because the machines that build them have no GPU.
GPU_CSV = ROOT / "docs" / "_static" / "gpu_h200_cuda.csv"
GPU_MACHINE = ROOT / "docs" / "_static" / "gpu_h200_machine.json"
GPU_OUT = OUT.parent / "performance_gpu.rst"


def render_gpu(csv_path: Path = GPU_CSV, machine_path: Path = GPU_MACHINE) -> str:
    """The GPU table: every timed method per shape, with bandwidth and ratios."""
    lines = [".. This file is generated by docs/_gen_performance.py; do not edit.", ""]
    rows = _read_csv(csv_path)
    machine = _read_json(machine_path)
    if not rows:
        return "\n".join(lines + _note(f"No GPU record (``{_shown(csv_path)}``)."))
    if machine:
        lines += [
            f"Device: {_cell(str(machine.get('device', '?')))}; kernels built for "
            f"{_cell(str(machine.get('kernels', '?')))}; torch {_cell(str(machine.get('torch', '?')))}; "
            f"Liger-Kernel {_cell(str(machine.get('liger_kernel', '?')))}. Copy bandwidth (bytes read "
            f"+ written per second by a 1 GiB device-to-device copy): "
            f"{_num(str(machine.get('copy_bandwidth_GBps'))):.0f} GB/s, the ceiling the "
            "percentages below refer to.",
            "",
        ]
    def row(r: dict[str, str]) -> list[str]:
        return [r["op"], r["method"], f"{r['N']} x {r['V']}", r["dtype"], f"{_num(r['time_us']):.0f}",
                f"{_num(r['GBps']):.0f}", f"{100 * _num(r['frac_copy_peak']):.1f}",
                f"{_num(r['ratio_vs_read_once']):.2f}", r["check"]]

    header = ["op", "method", "N x V", "dtype", "time (us)", "GB/s", "% of copy", "x read-once", "check"]
    main_v = [r for r in rows if r["V"] == "151936"]
    inner = (machine or {}).get("calls_per_sample")
    how = (f"medians of {(machine or {}).get('samples', '?')} samples, each the mean of {inner} "
           "back-to-back calls" if inner else "medians of 20 timed calls")
    lines += _list_table(f"Every method at V = 151936 ({how})", header,
                         [row(r) for r in main_v])
    lines += _list_table("trmath at every vocabulary size", header,
                         [row(r) for r in rows if r["method"] in ("trmath", "kernels", "read_once") and r["V"] != "151936"])
    return "\n".join(lines)


def main() -> int:
    OUT.parent.mkdir(parents=True, exist_ok=True)
    text, plots = render(_bench_dir())
    plots.prune()
    for path, new in ((OUT, text), (GPU_OUT, render_gpu())):
        if not path.exists() or path.read_text() != new:  # keep the mtime: no needless rebuilds
            path.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
