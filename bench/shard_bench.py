"""Shard benchmark: corpus2model's shard stage vs pyarrow.dataset.write_dataset, in one run.

Run (full scale, a quiet machine; corpus generation ~1.5 h at 5 GB on 2 cores, cached under --work):
    python bench/shard_bench.py                       # 5 GB corpus, 1 GB target
    python bench/shard_bench.py --from-corpus /tmp/anchorkit-data/c2000_s1234   # 5 GB from a 2 GB corpus, cycled
    python bench/shard_bench.py --small               # 50 MB corpus, 10 MB target (a smoke run)
    python bench/shard_bench.py --mb 1000 --target-mb 200 --rounds 2 --work /tmp/c2m-shard-bench

What it does:
1. Generates the corpus with shared/bench/anchors/gen_corpus.py (seeded, realistic English prose)
   at ``mb * 21/20`` MB in 21 gzip JSONL files: the first 20 are the corpus, the 21st the 5 %
   appended later. Each file becomes one record Parquet part (RECORD_SCHEMA; a document is a
   record with empty input and the text as target), and a fake upstream ``validate`` Manifest
   lists them (as tests/conftest.py ``records_manifest`` does). Everything lives under --work
   (default /tmp/c2m-shard-bench), never in the repository.
2. Each system runs in its own subprocess, which reports its wall time and peak RSS (VmHWM); cold runs
   alternate, ``--rounds`` times each, and the median is reported:
   * ``corpus2model``: ``run_stage(tasks.shard, ...)`` cold on a fresh store (three splits, shards of
     ``target`` bytes); after the last round, the same store with the 21st part appended
     (``append % of cold`` = append wall / median cold wall).
   * ``pyarrow write_dataset``: the same parts, zstd, ``max_rows_per_file`` set from the bytes per
     row our cold run measured (knowledge the peer does not have on its own: it favours the peer)
     and ``max_rows_per_group`` = that / 32; no splits. Its append writes the new part into new
     files beside the old ones (``existing_data_behavior="overwrite_or_ignore"``).
3. Writes bench/results/shard_bench.json and shard_bench.md (DESIGN.md's format, bench/results_io.py).
   The tokenize row lives in bench/tokenize_bench.py.

``write MB/s`` = corpus text MB (10^6 bytes of UTF-8 text, as gen_corpus counts) / wall seconds.
``shard size spread %`` = largest |size - target| / target over every shard but the last of each
split (ours) or every file but the last (peer).
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from results_io import RESULTS, SHARED, write_results

GEN = SHARED / "bench" / "anchors" / "gen_corpus.py"
PARTS = 21  # 20 for the corpus, 1 appended (5 %)


def cpu_seconds() -> float:
    """User + system CPU seconds of this process so far, all threads: on a shared machine the wall
    clock moves with other people's load, the CPU a run spent much less."""
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------------------------------------
# corpus
# ---------------------------------------------------------------------------------------------
def _docs(files: list[Path]):
    for src in files:
        with gzip.open(src, "rt", encoding="utf-8") as fh:
            for line in fh:
                yield src.name, json.loads(line)


def make_corpus(work: Path, mb: float, seed: int, from_corpus: Path | None = None) -> dict:
    """gen_corpus output -> PARTS record Parquet parts; cached in work/ by size and seed.

    ``from_corpus``: the docs of an existing gen_corpus folder, read in order and cycled until the
    size is reached, instead of generating one (5 GB takes ~1.5 h on 2 cores). Each pass gives its
    records their own source paths, so ids stay unique. The shard stage neither deduplicates nor reads
    content beyond compressing it page by page (1 MB Parquet pages, compressed one by one), so a text
    seen again 2 GB later writes like a new one."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from corpus2model.schemas.records import RECORD_SCHEMA, make_record
    from corpus2model.tasks.stage import sha256_file

    corpus = work / (f"corpus-{mb:g}-{seed}" + (f"-from-{from_corpus.name}" if from_corpus else ""))
    info_path = corpus / "parts.json"
    if info_path.is_file():
        return json.loads(info_path.read_text())
    shutil.rmtree(corpus, ignore_errors=True)
    gen_dir = corpus / "gen"
    if from_corpus is None:
        subprocess.run([sys.executable, str(GEN), "--mb", str(mb * PARTS / (PARTS - 1)), "--out-dir", str(gen_dir),
                        "--seed", str(seed), "--shards", str(PARTS), "--workers", "2"], check=True, stdout=subprocess.DEVNULL)
        groups = [(f"{i:06d}", _docs([src])) for i, src in enumerate(sorted((gen_dir / "docs").glob("shard_*.jsonl.gz")))]
    else:
        files = sorted((from_corpus / "docs").glob("shard_*.jsonl.gz"))
        if not files:
            raise SystemExit(f"--from-corpus {from_corpus}: no docs/shard_*.jsonl.gz (a gen_corpus.py output folder)")
        per_part = mb * 1e6 / (PARTS - 1)

        def cycled():
            k = 0
            while True:
                for name, d in _docs(files):
                    yield f"pass{k}/{name}", d
                k += 1

        stream = cycled()

        def part_docs():  # one part's share of text bytes
            got = 0
            while got < per_part:
                name, d = next(stream)
                got += len(d["text"].encode("utf-8"))
                yield name, d

        groups = [(f"{i:06d}", part_docs()) for i in range(PARTS)]
    parts = []
    (corpus / "parts").mkdir(parents=True)
    for stem, docs in groups:
        dst = corpus / "parts" / f"{stem}.parquet"
        n = text = 0
        with pq.ParquetWriter(dst, RECORD_SCHEMA) as w:
            rows = []
            for line_no, (name, d) in enumerate(docs, start=1):
                md = {"source_path": name, "source_line": line_no} if from_corpus else {}
                rows.append(make_record("", d["text"], task_type="text", domain="bench", source="gen_corpus",
                                        source_id=d["id"], **md))
                text += len(d["text"].encode("utf-8"))
                if len(rows) == 5000:
                    w.write_table(pa.Table.from_pylist(rows, schema=RECORD_SCHEMA))
                    n += len(rows)
                    rows = []
            if rows:
                w.write_table(pa.Table.from_pylist(rows, schema=RECORD_SCHEMA))
                n += len(rows)
        parts.append({"path": f"parts/{dst.name}", "records": n, "text_bytes": text, "bytes": dst.stat().st_size,
                      "sha256": sha256_file(dst)})
    shutil.rmtree(gen_dir, ignore_errors=True)
    info = {"dir": str(corpus), "parts": parts, "from_corpus": str(from_corpus) if from_corpus else None}
    info_path.write_text(json.dumps(info, indent=1))
    return info


def upstream(info: dict, n_parts: int):
    from corpus2model.tasks.stage import FileEntry, Manifest

    parts = info["parts"][:n_parts]
    n = sum(p["records"] for p in parts)
    return Manifest(stage="validate", stage_version="1", key=f"bench-{n_parts}",
                    files=[FileEntry(p["path"], p["bytes"], p["sha256"], "data", p["records"]) for p in parts],
                    counters={"in": n, "out": n, "rejected": {}, "duplicates": 0}, path=info["dir"])


# ---------------------------------------------------------------------------------------------
# children: one system each, JSON on stdout
# ---------------------------------------------------------------------------------------------
def child_c2m(args) -> dict:
    from corpus2model.schemas.config import parse_config
    from corpus2model.tasks import shard
    from corpus2model.tasks.stage import StageContext, Store, run_stage

    info = json.loads(Path(args.info).read_text())
    store = Path(args.store)
    cfg = parse_config({"paths": {"store": str(store)}, "shard": {"target_bytes": args.target}})
    ctx = StageContext(store=Store(store))
    n_parts = PARTS - 1 if args.phase == "cold" else PARTS
    # The stage publishes a Prefect artifact when inside a flow run, and checking costs a 2.6 s
    # import of prefect the first time: in the pipeline it is already loaded, so load it untimed.
    import prefect  # noqa: F401

    t0, c0 = time.perf_counter(), cpu_seconds()
    m = run_stage(shard, [upstream(info, n_parts)], cfg, ctx)
    secs = time.perf_counter() - t0
    return {"seconds": secs, "cpu_seconds": cpu_seconds() - c0, "peak_rss_mb": peak_rss_mb(), "shards": m.stats["shards"], "path": m.path,
            "units_computed": m.stats["units_computed"], "units": m.stats["units"]}


def child_arrow(args) -> dict:
    import pyarrow.dataset as ds

    info = json.loads(Path(args.info).read_text())
    out = Path(args.store)
    parts = info["parts"][:PARTS - 1] if args.phase == "cold" else info["parts"][PARTS - 1:]
    rows = args.rows_per_file
    t0, c0 = time.perf_counter(), cpu_seconds()
    data = ds.dataset([str(Path(info["dir"]) / p["path"]) for p in parts], format="parquet")
    ds.write_dataset(data, out, format="parquet", basename_template=f"{args.phase}-{{i}}.parquet",
                     max_rows_per_file=rows, max_rows_per_group=max(1, rows // 32), min_rows_per_group=max(1, rows // 32),
                     file_options=ds.ParquetFileFormat().make_write_options(compression="zstd"),
                     existing_data_behavior="overwrite_or_ignore", use_threads=True)
    secs = time.perf_counter() - t0
    files = sorted(out.glob(f"{args.phase}-*.parquet"), key=lambda p: int(p.stem.split("-")[1]))
    return {"seconds": secs, "cpu_seconds": cpu_seconds() - c0, "peak_rss_mb": peak_rss_mb(),
            "sizes": [p.stat().st_size for p in files]}


def run_child(*argv: str) -> dict:
    p = subprocess.run([sys.executable, __file__, "--child", *argv], check=True, capture_output=True, text=True)
    return json.loads(p.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------
def spread(sizes: list[int], target: int) -> float:
    return max((abs(s - target) / target * 100 for s in sizes), default=0.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mb", type=float, default=5000, help="corpus MB of text (10^6 bytes)")
    ap.add_argument("--target-mb", type=float, default=1000, help="shard target, MB (10^6 bytes)")
    ap.add_argument("--small", action="store_true", help="50 MB corpus, 10 MB target")
    ap.add_argument("--rounds", type=int, default=1, help="cold runs of each system, alternating")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--work", default="/tmp/c2m-shard-bench")
    ap.add_argument("--from-corpus", type=Path, default=None,
                    help="build the corpus from this gen_corpus folder's docs (cycled) instead of generating one")
    ap.add_argument("--results", default=str(RESULTS))
    ap.add_argument("--name", default="shard_bench", help="results file name (<results>/<name>.json and .md)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--system", help=argparse.SUPPRESS)
    ap.add_argument("--phase", help=argparse.SUPPRESS)
    ap.add_argument("--info", help=argparse.SUPPRESS)
    ap.add_argument("--store", help=argparse.SUPPRESS)
    ap.add_argument("--target", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--rows-per-file", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.child:
        print(json.dumps({"c2m": child_c2m, "arrow": child_arrow}[args.system](args)))
        return
    if args.small:
        args.mb, args.target_mb = 50, 10
    target = int(args.target_mb * 1e6)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    info = make_corpus(work, args.mb, args.seed, args.from_corpus)
    gen_s = time.perf_counter() - t0
    info_path = work / "info.json"
    info_path.write_text(json.dumps(info))
    base_mb = sum(p["text_bytes"] for p in info["parts"][:PARTS - 1]) / 1e6
    add_mb = info["parts"][PARTS - 1]["text_bytes"] / 1e6
    common = ["--info", str(info_path), "--target", str(target)]
    store, peer_dir = work / "store-c2m", work / "arrow-out"

    colds, pcolds = [], []
    rows_per_file = None
    # Untimed: read every part once, so the first system timed does not pay for the disk and the second for
    # nothing (a first round had ours at 23.5 s reading from disk and the peer at 17.8 s right after).
    for part in info["parts"]:
        with open(Path(info["dir"]) / part["path"], "rb") as f:
            while f.read(1 << 24):
                pass
    for _ in range(args.rounds):
        shutil.rmtree(store, ignore_errors=True)
        os.sync()  # the previous child's output is on disk, not written back during the next child's timing
        colds.append(run_child("--system", "c2m", "--phase", "cold", "--store", str(store), *common))
        if rows_per_file is None:  # the peer's rows per file: from the bytes per row our first cold run wrote
            shards = [e for entries in colds[0]["shards"].values() for e in entries]
            rows_per_file = max(1, int(target / (sum(e["bytes"] for e in shards) / sum(e["records"] for e in shards))))
        shutil.rmtree(peer_dir, ignore_errors=True)
        os.sync()
        pcolds.append(run_child("--system", "arrow", "--phase", "cold", "--store", str(peer_dir),
                                "--rows-per-file", str(rows_per_file), *common))
    # appends into the last round's outputs
    os.sync()
    app = run_child("--system", "c2m", "--phase", "append", "--store", str(store), *common)
    os.sync()
    papp = run_child("--system", "arrow", "--phase", "append", "--store", str(peer_dir),
                     "--rows-per-file", str(rows_per_file), *common)

    cold = colds[-1]
    ours_sizes = [e["bytes"] for entries in cold["shards"].values() for e in entries[:-1]]
    out_bytes = sum(e["bytes"] for entries in cold["shards"].values() for e in entries)
    secs = statistics.median(r["seconds"] for r in colds)
    psecs = statistics.median(r["seconds"] for r in pcolds)
    cfg = (f"{args.mb:g} MB text corpus (+{add_mb:.0f} MB append), target {args.target_mb:g} MB, zstd; "
           f"median of {args.rounds} alternating cold run(s)")
    ours, peer = "corpus2model", "pyarrow write_dataset"
    rows = [
        {"system": ours, "metric": "write MB/s", "value": round(base_mb / secs, 2), "unit": "MB/s", "config": cfg},
        {"system": peer, "metric": "write MB/s", "value": round(base_mb / psecs, 2), "unit": "MB/s", "config": cfg},
        {"system": ours, "metric": f"write MB/s vs {peer} x", "value": round(psecs / secs, 2), "unit": "x",
         "config": cfg},
        {"system": ours, "metric": "shard size spread %", "value": round(spread(ours_sizes, target), 2), "unit": "%",
         "config": cfg + f"; {len(ours_sizes)} full shards"},
        {"system": peer, "metric": "shard size spread %", "value": round(spread(pcolds[-1]["sizes"][:-1], target), 2),
         "unit": "%", "config": cfg + f"; {len(pcolds[-1]['sizes']) - 1} full files, max_rows_per_file {rows_per_file}"},
        {"system": ours, "metric": "peak RSS MB", "value": round(max(r["peak_rss_mb"] for r in colds + [app]), 1),
         "unit": "MB", "config": cfg},
        {"system": peer, "metric": "peak RSS MB", "value": round(max(r["peak_rss_mb"] for r in pcolds + [papp]), 1),
         "unit": "MB", "config": cfg},
        {"system": ours, "metric": "append % of cold", "value": round(100 * app["seconds"] / secs, 2),
         "unit": "%", "config": cfg + f"; {app['units_computed']}/{app['units']} shards written"},
        {"system": peer, "metric": "append % of cold", "value": round(100 * papp["seconds"] / psecs, 2),
         "unit": "%", "config": cfg + "; new part written into new files"},
    ]
    origin = (f"the docs of {args.from_corpus.name} (gen_corpus.py) cycled to size, each pass under its own source "
              f"paths (shard compresses 1 MB pages one by one, so a text repeated GBs later writes like a new one)"
              if args.from_corpus else f"gen_corpus.py seed {args.seed}")
    notes = (f"Corpus: {origin}, generated + converted in {gen_s:.0f} s (not timed). "
             f"Cold runs: ours {[round(r['seconds'], 1) for r in colds]} s (3 splits, "
             f"{len(ours_sizes) + len(cold['shards'])} shards, {out_bytes / 1e6:.0f} MB written), peer "
             f"{[round(r['seconds'], 1) for r in pcolds]} s (no split logic); CPU seconds (all threads) ours "
             f"{[round(r['cpu_seconds'], 1) for r in colds]}, peer {[round(r['cpu_seconds'], 1) for r in pcolds]}. Append of {add_mb:.0f} MB: ours "
             f"{app['seconds']:.2f} s, peer {papp['seconds']:.2f} s. The peer's rows-per-file comes from our "
             "measured bytes per row (it has no byte target). Ours compresses the largest split in the stage's "
             "thread while a second thread reads ahead (up to two row groups), indexes each part's splits as it "
             "reaches it and writes the small splits, and a third hashes each shard as it grows; it "
             "dictionary-encodes only the columns whose values repeat (tasks/shard.py DICTIONARY_COLUMNS). "
             "Peak RSS is VmHWM in MiB (2^20 bytes).")
    path = write_results(args.name, rows, notes, Path(args.results), "shard benchmark",
                         extra={"cold_seconds": {ours: [r["seconds"] for r in colds],
                                                 peer: [r["seconds"] for r in pcolds]}})
    print(path.with_suffix(".md").read_text(encoding="utf-8"))


if __name__ == "__main__":
    main()
