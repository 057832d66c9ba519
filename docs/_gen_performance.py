"""Generate ``docs/_generated/performance.rst`` from the benchmark CSV files.

The benchmark scripts (``benchmarks/bench_exact.py`` and friends) write CSV files with a header
row into ``bench-out/`` at the repository root. This script turns each ``bench-out/*.csv`` into
a ``list-table`` (all columns, in the file's order; numbers shown with 4 significant digits),
titled by the file name -- ``ratios.csv`` first, the long ``timings.csv`` summarised in one line
-- and adds the PNG plots (copied into ``docs/_generated/``), ``report.txt`` and the machine
record ``machine.json``. Without CSV files it writes a note saying how to produce them.

``docs/conf.py`` runs it on every build (it is cheap). Set ``TRMATH_BENCH_OUT`` to read another
directory. Run it directly with ``python docs/_gen_performance.py``.
"""

from __future__ import annotations

import csv
import json
import re
import os
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
OUT = DOCS / "_generated" / "performance.rst"
MAX_ROWS = 200  # a table longer than this is cut, with a note


def _bench_dir() -> Path:
    env = os.environ.get("TRMATH_BENCH_OUT")
    return Path(env) if env else ROOT / "bench-out"


def _shown(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


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


def _table(path: Path) -> list[str]:
    with path.open(newline="") as fh:
        rows = [r for r in csv.reader(fh) if r and any(c.strip() for c in r)]
    if not rows:
        return [f"``{path.name}`` is empty.", ""]
    header, body = rows[0], rows[1:]
    ncol = len(header)
    cut = len(body) > MAX_ROWS
    body = body[:MAX_ROWS]
    title = path.stem.replace("_", " ")
    lines = [f".. list-table:: {title} (``{_shown(path)}``)", "   :header-rows: 1", ""]
    for row in [header] + body:
        row = (row + [""] * ncol)[:ncol]
        lines.append(f"   * - {_cell(row[0])}")
        lines += [f"     - {_cell(c)}" for c in row[1:]]
    lines.append("")
    if cut:
        lines += [f"(first {MAX_ROWS} rows of the file)", ""]
    return lines


def _flatten(obj: object, prefix: str = "") -> list[tuple[str, str]]:
    if isinstance(obj, dict):
        out: list[tuple[str, str]] = []
        for k, v in obj.items():
            out += _flatten(v, f"{prefix}{k}." if isinstance(v, dict) else f"{prefix}{k}")
        return out
    return [(prefix.rstrip("."), json.dumps(obj) if isinstance(obj, (list, tuple)) else str(obj))]


def _json_table(path: Path) -> list[str]:
    """A JSON object (the benchmark's machine record) as a two-column table."""
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    if not isinstance(obj, dict):
        return []
    items = _flatten(obj)[:MAX_ROWS]
    lines = [f".. list-table:: {path.stem.replace('_', ' ')} (``{_shown(path)}``)",
             "   :header-rows: 1", "", "   * - key", "     - value"]
    for k, v in items:
        lines += [f"   * - {_cell(k)}", f"     - {_cell(v)}"]
    return lines + [""]


#: Files of ``benchmarks/bench_exact.py`` shown in this order; any other CSV follows.
PREFERRED = ("ratios.csv",)
#: Long per-measurement files: summarised in one line rather than tabulated.
SUMMARISED = ("timings.csv",)


def _images(bench: Path) -> list[str]:
    """Copy the benchmark's PNG plots next to the generated page and show them."""
    lines: list[str] = []
    pngs = sorted(bench.glob("*.png")) if bench.is_dir() else []
    keep = {f"bench_{p.name}" for p in pngs}
    for old in OUT.parent.glob("bench_*.png"):  # plots of an earlier run that are gone now
        if old.name not in keep:
            old.unlink()
    for png in pngs:
        dst = OUT.parent / f"bench_{png.name}"
        data = png.read_bytes()
        if not dst.exists() or dst.read_bytes() != data:
            dst.write_bytes(data)
        lines += [f".. figure:: _generated/{dst.name}", "   :width: 90%", "",
                  f"   ``{_shown(png)}``", ""]
    return lines


def _report(path: Path) -> list[str]:
    text = path.read_text(errors="replace").rstrip("\n")
    if not text:
        return []
    body = ["   " + line if line.strip() else "" for line in text.splitlines()]
    return [f"The benchmark's own report (``{_shown(path)}``):", "", ".. code-block:: text", ""] + body + [""]


def render(bench: Path) -> str:
    csvs = sorted(bench.glob("*.csv")) if bench.is_dir() else []
    records = sorted(bench.glob("*.json")) if bench.is_dir() else []
    lines = [".. This file is generated by docs/_gen_performance.py; do not edit.", ""]
    if not csvs:
        _images(Path("/nonexistent"))  # drop stale copied plots
        lines += [
            ".. note::",
            "",
            "   No benchmark results were found when these pages were built. Run",
            "",
            "   .. code-block:: bash",
            "",
            "      python benchmarks/bench_exact.py",
            "",
            "   from the repository root (it writes CSV files into ``bench-out/``), then rebuild",
            "   the documentation.",
            "",
        ]
        return "\n".join(lines)
    lines += [
        f"Results read from ``{_shown(bench)}/``, as written by the benchmark scripts on the "
        "machine that ran them (its record is the last table). Ratios are medians of paired, "
        "interleaved rounds, with the range of the per-round ratios; ``bar`` is the target the "
        "ratio is compared with and ``status`` the verdict.",
        "",
    ]
    order = {name: i for i, name in enumerate(PREFERRED)}
    tables = sorted((f for f in csvs if f.name not in SUMMARISED),
                    key=lambda f: (order.get(f.name, len(order)), f.name))
    for f in tables:
        lines += _table(f)
    lines += _images(bench)
    report = bench / "report.txt"
    if report.is_file():
        lines += _report(report)
    for f in csvs:
        if f.name in SUMMARISED:
            with f.open(newline="") as fh:
                n = max(0, sum(1 for _ in csv.reader(fh)) - 1)
            lines += [f"Every individual measurement ({n} rows) is in ``{_shown(f)}``.", ""]
    for f in records:
        lines += _json_table(f)
    return "\n".join(lines)


def main() -> int:
    OUT.parent.mkdir(parents=True, exist_ok=True)
    text = render(_bench_dir())
    if not OUT.exists() or OUT.read_text() != text:  # keep the mtime: no needless rebuilds
        OUT.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
