"""Distribution checks against the last successful run: each boundary keeps a small profile (row
count, task_type mix, a log2 length histogram and quantiles) in its manifest; the flow compares it
with the profile saved by the last successful run of the same config name (``<store>/_stats/``) and
saves the new one once the whole run succeeds. numpy is imported inside profile() (only validation
runs need it)."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from corpus2model.tasks.common.artifacts import publish_markdown
from corpus2model.tasks.stage import write_json_atomic
from corpus2model.tasks.validate.report import ValidationFailed, md_cell


def profile(df) -> dict:
    """What a boundary's data looks like, small enough to keep per run: row count, task_type mix and
    the length distribution (characters of input+target, or prompt+chosen for pairs) as a histogram
    over power-of-two bins plus quantiles. Bins make a KS statistic possible without the rows."""
    import numpy as np

    if "target" in df.columns:
        lengths = df["input"].fillna("").str.len() + df["target"].fillna("").str.len()
    elif "prompt" in df.columns:
        lengths = df["prompt"].fillna("").str.len() + df["chosen"].fillna("").str.len()
    else:
        lengths = df.iloc[:0, 0]
    lengths = np.asarray(lengths, dtype=np.int64)
    bins = np.floor(np.log2(lengths + 1)).astype(int) if len(lengths) else np.array([], dtype=int)
    hist = {str(b): int(n) for b, n in zip(*np.unique(bins, return_counts=True))}
    q = {f"p{int(p * 100)}": float(np.quantile(lengths, p)) for p in (0.1, 0.5, 0.9)} if len(lengths) else {}
    tt = df["metadata_task_type"].fillna("(none)").value_counts() if "metadata_task_type" in df.columns else {}
    return {"rows": int(len(df)), "task_types": {str(k): int(v) for k, v in dict(tt).items()},
            "length_hist": hist, "length_quantiles": q}


@dataclass
class DriftResult:
    check: str  # rows | length | task_type
    value: float
    threshold: float
    detail: str

    @property
    def ok(self) -> bool:
        return self.value <= self.threshold


def _ks(a: dict, b: dict) -> float:
    """Two-sample KS statistic on the binned length distributions (max CDF gap over the bins)."""
    na, nb = sum(a.values()), sum(b.values())
    if not na or not nb:
        return 0.0 if na == nb else 1.0
    ca = cb = 0.0
    worst = 0.0
    for k in sorted({int(x) for x in (*a, *b)}):
        ca += a.get(str(k), 0) / na
        cb += b.get(str(k), 0) / nb
        worst = max(worst, abs(ca - cb))
    return worst


def _tvd(a: dict, b: dict) -> float:
    na, nb = sum(a.values()), sum(b.values())
    if not na or not nb:
        return 0.0 if na == nb else 1.0
    return 0.5 * sum(abs(a.get(k, 0) / na - b.get(k, 0) / nb) for k in set(a) | set(b))


def compare_profiles(prev: dict, cur: dict, vcfg) -> list[DriftResult]:
    """Row count change (fraction of the previous count), length-distribution KS statistic and
    task_type total variation distance, each against its validate.max_* threshold."""
    n0, n1 = prev.get("rows", 0), cur.get("rows", 0)
    change = abs(n1 - n0) / max(n0, 1)
    q0, q1 = prev.get("length_quantiles", {}), cur.get("length_quantiles", {})
    medians = f"median {q0.get('p50', 0):.0f} → {q1.get('p50', 0):.0f} chars, p90 {q0.get('p90', 0):.0f} → {q1.get('p90', 0):.0f}"
    t0, t1 = prev.get("task_types", {}), cur.get("task_types", {})
    shift = sorted(set(t0) | set(t1), key=lambda k: -abs(t1.get(k, 0) / max(n1, 1) - t0.get(k, 0) / max(n0, 1)))[:3]
    mix = ", ".join(f"{k} {t0.get(k, 0) / max(n0, 1):.0%} → {t1.get(k, 0) / max(n1, 1):.0%}" for k in shift)
    return [
        DriftResult("rows", round(change, 4), vcfg.max_row_change, f"{n0} → {n1} rows ({(n1 - n0) / max(n0, 1):+.1%})"),
        DriftResult("length", round(_ks(prev.get("length_hist", {}), cur.get("length_hist", {})), 4), vcfg.max_length_ks,
                    f"KS statistic over log2 length bins; {medians}"),
        DriftResult("task_type", round(_tvd(t0, t1), 4), vcfg.max_task_type_tvd, f"total variation distance; {mix}"),
    ]


def stats_path(store_root: Path, name: str, boundary: str) -> Path:
    return Path(store_root) / "_stats" / name / f"{boundary}.json"


def drift_markdown(boundary: str, results: list[DriftResult], prev_at: str | None, severity: str) -> str:
    if prev_at is None:
        return f"### Distribution checks ({boundary})\n\nno previous run: these statistics become the baseline once this run succeeds.\n"
    lines = [f"### Distribution checks ({boundary}) against the last successful run ({prev_at})", "",
             f"Severity `{severity}`.", "", "| check | value | threshold | result | detail |", "|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r.check} | {r.value:.3f} | {r.threshold:.3f} | {'pass' if r.ok else 'DRIFT'} | {md_cell(r.detail)} |")
    return "\n".join(lines) + "\n"


def check_drift(store_root: Path, name: str, boundary: str, manifest, vcfg) -> tuple[list[DriftResult], str]:
    """Compare a boundary's profile with the last successful run of config ``name``; publish the
    result as a markdown artifact; raise ValidationFailed when validate.drift_severity is error and a
    threshold is exceeded. Returns (results, a one-line note for the run summary)."""
    cur = (manifest.stats or {}).get("profile")
    if not cur:
        return [], ""
    path = stats_path(store_root, name, boundary)
    try:
        prev = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        prev = None
    results = compare_profiles(prev["profile"], cur, vcfg) if prev else []
    md = drift_markdown(boundary, results, prev.get("at") if prev else None, vcfg.drift_severity)
    drifted = [r for r in results if not r.ok]
    publish_markdown(f"drift-{boundary}", md, description=f"{len(drifted)} distribution check(s) exceeded" if drifted else "")
    if prev is None:
        note = "drift: no previous run"
    else:
        note = "drift: " + ", ".join(f"{r.check} {r.value:.2f}{'!' if not r.ok else ''}" for r in results)
    if drifted and vcfg.drift_severity == "error":
        raise ValidationFailed(
            f"distribution drift at the {boundary} boundary against the last successful run of {name!r}: "
            + "; ".join(f"{r.check} {r.value:.3f} > {r.threshold} ({r.detail})" for r in drifted)
            + ". If the change is intended, run once with validate.drift_severity=warn to make this the new baseline."
        )
    return results, note


def save_stats(store_root: Path, name: str, manifests: dict) -> list[Path]:
    """After a successful run: each boundary's profile becomes the baseline the next run compares with."""
    written = []
    at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    for stage, m in manifests.items():
        prof = (getattr(m, "stats", None) or {}).get("profile")
        boundary = (m.stats or {}).get("boundary")
        if prof and boundary:
            path = stats_path(store_root, name, boundary)
            write_json_atomic(path, {"at": at, "stage": stage, "key": m.key, "profile": prof})
            written.append(path)
    return written
