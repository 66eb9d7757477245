"""One writer for bench results in DESIGN.md's format: bench/results/<bench>.json + a short <bench>.md."""
from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"


def write_results(bench: str, rows: list[dict], notes: str = "", out_dir: Path = RESULTS, title: str = "") -> Path:
    """rows: {"system", "metric", "value", "unit", "config"}; returns the JSON path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = {"bench": bench, "date": time.strftime("%Y-%m-%d"), "machine": machine(), "rows": rows, "notes": notes}
    path = out_dir / f"{bench}.json"
    path.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    md = [f"# {title or bench + ' benchmark'}", "", f"{result['date']}, {result['machine']}", "",
          "| system | metric | value | unit | config |", "|---|---|---|---|---|"]
    md += [f"| {r['system']} | {r['metric']} | {r['value']} | {r.get('unit', '')} | {r.get('config', '')} |" for r in rows]
    if notes:
        md += ["", notes]
    (out_dir / f"{bench}.md").write_text("\n".join(md) + "\n", encoding="utf-8")
    return path
