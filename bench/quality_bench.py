"""Quality-filter benchmark: this project's Gopher + C4 filters against datatrove's, one corpus.

    python bench/quality_bench.py --corpus /tmp/anchorkit-data/c200_s1234 --workers 2   # lead, quiet machine
    python bench/quality_bench.py --corpus /tmp/q5 --workers 2                          # smoke test (5 MB)

Corpus: a directory written by ../shared/bench/anchors/gen_corpus.py (docs/*.jsonl.gz with
id/text, quality_truth.jsonl with the planted low-quality documents).

Ours: ``tasks.text.filters.quality_filters`` (the pure function the clean stage calls after language
ID; here with lang="en", as datatrove is configured for English) over the corpus shards in a
pool of ``--workers`` processes; wall time includes reading and decompressing the shards, as
datatrove's does. Theirs: the anchor kit's datatrove_quality.py (GopherRepetition ->
GopherQuality -> C4Quality, datatrove defaults) in the kit's venv, with its exclusion files kept
so every dropped document has datatrove's filter and reason.

Rows: ``quality MB/s`` for both systems (corpus text bytes / wall seconds), ``agreement %``
(documents with the same keep/drop decision), ``planted recall`` for both. The JSON also lists
every kind of disagreement (our reason vs datatrove's) with a count and an example document.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from datetime import date
from pathlib import Path

from results_io import RESULTS, SHARED, write_results

KIT = Path(os.environ.get("ANCHOR_KIT") or SHARED / "bench" / "anchors")
VENV_PY = Path(os.environ.get("ANCHOR_PY", "/tmp/anchorkit-venv/bin/python"))


def _shards(corpus: Path) -> list[Path]:
    d = corpus / "docs" if (corpus / "docs").is_dir() else corpus
    files = sorted(d.glob("*.jsonl.gz")) + sorted(d.glob("*.jsonl"))
    if not files:
        raise SystemExit(f"no *.jsonl(.gz) under {d}: generate one with {KIT}/gen_corpus.py")
    return files


def _read(path: Path):
    op = gzip.open if path.suffix == ".gz" else open
    with op(path, "rt", encoding="utf-8") as f:
        for line in f:
            o = json.loads(line)
            yield str(o["id"]), o["text"]


def _filter_shard(path: str) -> list[tuple[str, str | None, int]]:
    """(id, drop reason or None, text bytes) for every document of one shard."""
    from corpus2model.schemas.config import CleanConfig
    from corpus2model.tasks.text.filters import quality_filters

    cfg = CleanConfig()
    out = []
    for doc_id, text in _read(Path(path)):
        keep, reason, _ = quality_filters(text, cfg, "en")
        out.append((doc_id, None if keep else reason, len(text.encode("utf-8"))))
    return out


def run_ours(corpus: Path, workers: int) -> tuple[dict[str, str | None], float, int]:
    shards = [str(p) for p in _shards(corpus)]
    t0 = time.perf_counter()
    with ProcessPoolExecutor(workers) as pool:
        results = list(pool.map(_filter_shard, shards))
    wall = time.perf_counter() - t0
    decisions, nbytes = {}, 0
    for rows in results:
        for doc_id, reason, b in rows:
            decisions[doc_id] = reason
            nbytes += b
    return decisions, wall, nbytes


def run_datatrove(corpus: Path, workers: int, work: Path) -> tuple[dict[str, str], dict]:
    """datatrove_quality.py in the kit venv; returns ({dropped id: "filter:reason"}, its result)."""
    if not VENV_PY.is_file():
        raise SystemExit(f"{VENV_PY} not found: create the anchor venv with {KIT}/run_anchor.sh (or set ANCHOR_PY)")
    out_json = work / "datatrove.json"
    cmd = [str(VENV_PY), str(KIT / "datatrove_quality.py"), "--in", str(corpus), "--workers", str(workers),
           "--work", str(work / "dt"), "--keep-work", "--out", str(out_json)]
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{p.stderr[-3000:]}")
    res = json.loads(out_json.read_text())
    dropped: dict[str, str] = {}
    for name in res["filters"]:
        for f in sorted((work / "dt" / "excluded" / name).rglob("*.jsonl.gz")):
            for line in gzip.open(f, "rt", encoding="utf-8"):
                o = json.loads(line)
                dropped[str(o["id"])] = f"{name}:{o.get('metadata', {}).get('filter_reason', '?')}"
    return dropped, res


def compare(ours: dict[str, str | None], theirs: dict[str, str], texts: dict[str, str]) -> tuple[float, list[dict]]:
    kinds: Counter = Counter()
    examples: dict[tuple, dict] = {}
    for doc_id, reason in ours.items():
        dt = theirs.get(doc_id)
        if (reason is None) == (dt is None):
            continue
        kind = (reason or "kept", dt or "kept")
        kinds[kind] += 1
        if kind not in examples:
            examples[kind] = {"id": doc_id, "text_head": texts.get(doc_id, "")[:300]}
    same = len(ours) - sum(kinds.values())
    rows = [{"ours": k[0], "datatrove": k[1], "count": n, "example": examples[k]} for k, n in kinds.most_common()]
    return 100.0 * same / max(len(ours), 1), rows


def planted_recall(corpus: Path, dropped: set[str]) -> float | None:
    truth = corpus / "quality_truth.jsonl"
    if not truth.is_file():
        return None
    ids = [json.loads(line)["id"] for line in truth.open()]
    return round(sum(i in dropped for i in ids) / max(len(ids), 1), 4)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--corpus", type=Path, required=True, help="gen_corpus.py output directory")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", type=Path, default=RESULTS, help="results folder (writes quality_bench.json and .md)")
    ap.add_argument("--no-datatrove", action="store_true", help="ours only (no agreement rows)")
    args = ap.parse_args(argv)

    ours, wall, nbytes = run_ours(args.corpus, args.workers)
    mb = nbytes / 1e6
    config = f"{mb:.3f} MB, {len(ours)} docs, {args.workers} workers; Gopher repetition + Gopher quality + C4 (datatrove defaults, English)"
    rows = [{"system": "corpus2model", "metric": "quality MB/s", "value": round(mb / wall, 3), "unit": "MB/s", "config": config}]
    our_drop = {i for i, r in ours.items() if r is not None}
    rec = planted_recall(args.corpus, our_drop)
    if rec is not None:
        rows.append({"system": "corpus2model", "metric": "planted recall", "value": rec, "unit": "", "config": config})
    result = {"corpus": str(args.corpus), "platform": platform.platform(),
              "ours": {"dropped": len(our_drop), "wall_s": round(wall, 3),
                                     "per_reason": dict(Counter(r for r in ours.values() if r).most_common())}}
    if not args.no_datatrove:
        with tempfile.TemporaryDirectory(prefix="quality_bench_") as tmp:
            theirs, dt = run_datatrove(args.corpus, args.workers, Path(tmp))
        # Texts only of the documents the two disagree on (the corpus may be 200 MB).
        differ = {i for i, r in ours.items() if (r is None) != (theirs.get(i) is None)}
        texts = {i: t for shard in _shards(args.corpus) for i, t in _read(shard) if i in differ}
        agreement, disagreements = compare(ours, theirs, texts)
        dt_config = f"{dt['mb']:.3f} MB, {dt['docs']} docs, {args.workers} workers; datatrove {dt['datatrove']} {'+'.join(dt['filters'])}"
        rows += [
            {"system": "datatrove", "metric": "quality MB/s", "value": dt["mb_per_s"], "unit": "MB/s", "config": dt_config},
            {"system": "corpus2model", "metric": "agreement %", "value": round(agreement, 3), "unit": "%",
             "config": config + "; same keep/drop as datatrove per document"},
        ]
        rec = planted_recall(args.corpus, set(theirs))
        if rec is not None:
            rows.append({"system": "datatrove", "metric": "planted recall", "value": rec, "unit": "", "config": dt_config})
        result["datatrove"] = {"dropped": len(theirs), "wall_s": dt["total_wall_s"], "per_reason": dt["dropped_per_reason"]}
        result["speedup"] = round(rows[0]["value"] / max(dt["mb_per_s"], 1e-9), 2)
        result["disagreements"] = disagreements
    md = []
    if "disagreements" in result and not result["disagreements"]:
        md += ["", "Disagreements (ours vs datatrove): none, every document got the same keep/drop decision."]
    if result.get("disagreements"):
        md += ["", "Disagreements (ours vs datatrove):", "", "| ours | datatrove | docs | example |", "|---|---|---|---|"]
        md += [f"| {d['ours']} | {d['datatrove']} | {d['count']} | {d['example']['id']} |" for d in result["disagreements"]]
    path = write_results("quality_bench", rows, "\n".join(md).strip(), args.out,
                         f"quality bench ({mb:.3f} MB, {len(ours)} docs, {args.workers} workers)", extra=result)
    print(path.read_text(encoding="utf-8"))


if __name__ == "__main__":
    main()
