"""One writer for bench results in DESIGN.md's format: bench/results/<bench>.json + a short <bench>.md,
where <bench> is the bench script's name (dedup_bench.py -> dedup_bench.json). Every bench imports it
as ``from results_io import ...``: running ``python bench/x.py`` puts bench/ on sys.path, and the
project itself is imported from the installed package (``pip install -e .``), never by editing sys.path.

``SHARED`` is the project's read-only shared material (datasets, the anchor kit): ``../shared`` beside
the repository, or ``$C2M_SHARED``; no absolute machine paths.
"""
from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
RESULTS = BENCH / "results"
SHARED = Path(os.environ.get("C2M_SHARED") or ROOT.parent / "shared")


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"


def write_results(bench: str, rows: list[dict], notes: str = "", out_dir: Path = RESULTS, title: str = "",
                  extra: dict | None = None) -> Path:
    """rows: {"system", "metric", "value", "unit", "config"}; ``extra``: more top-level JSON keys (raw
    measurements, run metadata) that the markdown leaves out. Returns the JSON path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = {"bench": bench, "date": time.strftime("%Y-%m-%d"), "machine": machine(), "rows": rows, "notes": notes,
              **(extra or {})}
    path = out_dir / f"{bench}.json"
    path.write_text(json.dumps(result, indent=1, default=str, ensure_ascii=False) + "\n", encoding="utf-8")
    md = [f"# {title or bench + ' benchmark'}", "", f"{result['date']}, {result['machine']}", "",
          "| system | metric | value | unit | config |", "|---|---|---|---|---|"]
    md += [f"| {r['system']} | {r['metric']} | {r['value']} | {r.get('unit', '')} | {r.get('config', '')} |" for r in rows]
    if notes:
        md += ["", notes]
    (out_dir / f"{bench}.md").write_text("\n".join(md) + "\n", encoding="utf-8")
    return path
