"""Shard + tokenize benchmark: our shard stage vs pyarrow.dataset.write_dataset, our per-shard
tokenize/pack vs datasets.map with a fast tokenizer, in one run.

Run (full scale, a quiet machine; corpus generation ~7 min at 5 GB on 2 cores):
    python bench/shard_bench.py                       # 5 GB corpus, 1 GB target
    python bench/shard_bench.py --small               # 50 MB corpus, 10 MB target (a smoke run)
    python bench/shard_bench.py --mb 5000 --target-mb 1000 --work /tmp/c2m-shard-bench

What it does:
1. Generates the corpus with shared/bench/anchors/gen_corpus.py (seeded, realistic English prose)
   at ``mb * 21/20`` MB in 21 gzip JSONL files: the first 20 are the corpus, the 21st the 5 %
   appended later. Each file becomes one record Parquet part (RECORD_SCHEMA; a document is a
   record with empty input and the text as target), and a fake upstream ``validate`` Manifest
   lists them (as tests/conftest.py ``records_manifest`` does). Everything lives under --work
   (default /tmp/c2m-shard-bench), never in the repository.
2. Each system runs in its own subprocess, which reports its wall time and peak RSS (VmHWM):
   * ``c2m shard``: ``run_stage(tasks.shard, ...)`` cold on a fresh store, then the same store with
     the 21st part appended (``append % of cold`` = append wall / cold wall).
   * ``pyarrow write_dataset``: the same parts, zstd, ``max_rows_per_file`` set from the bytes per
     row our cold run measured (knowledge the peer does not have on its own: it favours the peer)
     and ``max_rows_per_group`` = that / 32; no splits. Its append writes the new part into new
     files beside the old ones (``existing_data_behavior="overwrite_or_ignore"``).
   * tokenize: our ``tokenize.pack_shard`` (datasets streaming + batched fast tokenizer + packing
     with per-document position ids) vs ``datasets.map`` (batched fast tokenizer) + the classic
     ``group_texts`` concatenate-and-chunk, both on the first ``--tokenize-mb`` MB of train records
     with the same tokenizer (trained once beforehand, not timed).
3. Writes bench/results/shard.json and shard.md (DESIGN.md's format).

``write MB/s`` = corpus text MB (10^6 bytes of UTF-8 text, as gen_corpus counts) / wall seconds.
``shard size spread %`` = largest |size - target| / target over every shard but the last of each
split (ours) or every file but the last (peer).
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
GEN = ROOT.parent / "shared" / "bench" / "anchors" / "gen_corpus.py"
PARTS = 21  # 20 for the corpus, 1 appended (5 %)


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------------------------------------
# corpus
# ---------------------------------------------------------------------------------------------
def make_corpus(work: Path, mb: float, seed: int) -> dict:
    """gen_corpus output -> record Parquet parts; cached in work/ by size and seed."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from corpus2model.schemas.records import RECORD_SCHEMA, make_record
    from corpus2model.tasks.stage import sha256_file

    corpus = work / f"corpus-{mb:g}-{seed}"
    info_path = corpus / "parts.json"
    if info_path.is_file():
        return json.loads(info_path.read_text())
    shutil.rmtree(corpus, ignore_errors=True)
    gen_dir = corpus / "gen"
    subprocess.run([sys.executable, str(GEN), "--mb", str(mb * PARTS / (PARTS - 1)), "--out-dir", str(gen_dir),
                    "--seed", str(seed), "--shards", str(PARTS), "--workers", "2"], check=True, stdout=subprocess.DEVNULL)
    parts = []
    (corpus / "parts").mkdir(parents=True)
    for i, src in enumerate(sorted((gen_dir / "docs").glob("shard_*.jsonl.gz"))):
        dst = corpus / "parts" / f"{i:06d}.parquet"
        n = text = 0
        with gzip.open(src, "rt", encoding="utf-8") as fh, pq.ParquetWriter(dst, RECORD_SCHEMA) as w:
            rows = []
            for line in fh:
                d = json.loads(line)
                rows.append(make_record("", d["text"], task_type="text", domain="bench", source="gen_corpus",
                                        source_id=d["id"]))
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
    shutil.rmtree(gen_dir)
    info = {"dir": str(corpus), "parts": parts}
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

    t0 = time.perf_counter()
    m = run_stage(shard, [upstream(info, n_parts)], cfg, ctx)
    secs = time.perf_counter() - t0
    return {"seconds": secs, "peak_rss_mb": peak_rss_mb(), "shards": m.stats["shards"], "path": m.path,
            "units_computed": m.stats["units_computed"], "units": m.stats["units"]}


def child_arrow(args) -> dict:
    import pyarrow.dataset as ds

    info = json.loads(Path(args.info).read_text())
    out = Path(args.store)
    parts = info["parts"][:PARTS - 1] if args.phase == "cold" else info["parts"][PARTS - 1:]
    rows = args.rows_per_file
    t0 = time.perf_counter()
    data = ds.dataset([str(Path(info["dir"]) / p["path"]) for p in parts], format="parquet")
    ds.write_dataset(data, out, format="parquet", basename_template=f"{args.phase}-{{i}}.parquet",
                     max_rows_per_file=rows, max_rows_per_group=max(1, rows // 32), min_rows_per_group=max(1, rows // 32),
                     file_options=ds.ParquetFileFormat().make_write_options(compression="zstd"),
                     existing_data_behavior="overwrite_or_ignore", use_threads=True)
    secs = time.perf_counter() - t0
    files = sorted(out.glob(f"{args.phase}-*.parquet"), key=lambda p: int(p.stem.split("-")[1]))
    return {"seconds": secs, "peak_rss_mb": peak_rss_mb(), "sizes": [p.stat().st_size for p in files]}


def child_tokenize(args) -> dict:
    from corpus2model.tasks.tokenize import load_tokenizer, pack_shard, render

    tok = load_tokenizer(args.tokenizer)
    sample = Path(args.sample)
    out = Path(args.store)
    out.mkdir(parents=True, exist_ok=True)
    template = "### Input:\n{input}\n### Response:\n"
    t0 = time.perf_counter()
    if args.system == "c2m":
        counts = pack_shard(sample, tok, template, args.seq_len, out / "packed.arrow", cache_dir=out / "hf")
        tokens = counts["tokens"]
    else:
        import datasets

        datasets.disable_progress_bars()
        d = datasets.load_dataset("parquet", data_files=str(sample), split="train", cache_dir=str(out / "hf"))

        def tokenize_batch(b):
            texts = ["".join(render({"input": i, "target": t}, template)) for i, t in zip(b["input"], b["target"])]
            ids = tok(texts, add_special_tokens=False)["input_ids"]
            return {"input_ids": [x + [tok.eos_token_id] for x in ids]}

        def group_texts(b):  # transformers' run_clm.py: concatenate everything, cut into blocks
            flat = [t for x in b["input_ids"] for t in x]
            n = len(flat) // args.seq_len * args.seq_len
            blocks = [flat[i:i + args.seq_len] for i in range(0, n, args.seq_len)]
            return {"input_ids": blocks, "labels": [list(x) for x in blocks]}

        d = d.map(tokenize_batch, batched=True, remove_columns=d.column_names)
        tokens = sum(len(x) for x in d["input_ids"])
        d = d.map(group_texts, batched=True)
        d.to_parquet(str(out / "packed.parquet"))
    secs = time.perf_counter() - t0
    return {"seconds": secs, "peak_rss_mb": peak_rss_mb(), "tokens": tokens}


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
    ap.add_argument("--tokenize-mb", type=float, default=20, help="text MB tokenized by each system")
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--work", default="/tmp/c2m-shard-bench")
    ap.add_argument("--results", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--system", help=argparse.SUPPRESS)
    ap.add_argument("--phase", help=argparse.SUPPRESS)
    ap.add_argument("--info", help=argparse.SUPPRESS)
    ap.add_argument("--store", help=argparse.SUPPRESS)
    ap.add_argument("--target", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--rows-per-file", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--tokenizer", help=argparse.SUPPRESS)
    ap.add_argument("--sample", help=argparse.SUPPRESS)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.child:
        fn = {"c2m": child_c2m, "arrow": child_arrow, "c2m-tok": child_tokenize, "hf-tok": child_tokenize}[args.system]
        if args.system.endswith("-tok"):
            args.system = args.system[:-4]
        print(json.dumps(fn(args)))
        return
    if args.small:
        args.mb, args.target_mb, args.tokenize_mb = 50, 10, 5
    target = int(args.target_mb * 1e6)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    info = make_corpus(work, args.mb, args.seed)
    gen_s = time.perf_counter() - t0
    info_path = work / "info.json"
    info_path.write_text(json.dumps(info))
    base_mb = sum(p["text_bytes"] for p in info["parts"][:PARTS - 1]) / 1e6
    add_mb = info["parts"][PARTS - 1]["text_bytes"] / 1e6
    common = ["--info", str(info_path), "--target", str(target)]

    # ours: cold, then append into the same store
    store = work / "store-c2m"
    shutil.rmtree(store, ignore_errors=True)
    cold = run_child("--system", "c2m", "--phase", "cold", "--store", str(store), *common)
    app = run_child("--system", "c2m", "--phase", "append", "--store", str(store), *common)
    ours_sizes = [e["bytes"] for entries in cold["shards"].values() for e in entries[:-1]]
    out_bytes = sum(e["bytes"] for entries in cold["shards"].values() for e in entries)
    out_records = sum(e["records"] for entries in cold["shards"].values() for e in entries)

    # peer: same parts, rows per file from our measured bytes per row
    rows_per_file = max(1, int(target / (out_bytes / out_records)))
    peer_dir = work / "arrow-out"
    shutil.rmtree(peer_dir, ignore_errors=True)
    pcold = run_child("--system", "arrow", "--phase", "cold", "--store", str(peer_dir),
                      "--rows-per-file", str(rows_per_file), *common)
    papp = run_child("--system", "arrow", "--phase", "append", "--store", str(peer_dir),
                     "--rows-per-file", str(rows_per_file), *common)

    # tokenize: the first --tokenize-mb of train records, one tokenizer for both systems
    import pyarrow as pa
    import pyarrow.parquet as pq

    from corpus2model.tasks.tokenize import render, train_tokenizer

    sample = work / "tokenize-sample.parquet"
    first_train = Path(cold["path"]) / cold["shards"]["train"][0]["path"]
    pf = pq.ParquetFile(first_train)
    taken, batches = 0, []
    for b in pf.iter_batches(batch_size=2000):
        batches.append(b)
        taken += sum(len((t or "").encode()) for t in b.column("target").to_pylist())
        if taken >= args.tokenize_mb * 1e6:
            break
    table = pa.Table.from_batches(batches)
    pq.write_table(table, sample)
    tok_dir = work / "tokenizer"
    tok = train_tokenizer((["".join(render(r, "{input}")) for r in table.slice(i, 2000).to_pylist()]
                           for i in range(0, min(table.num_rows, 20000), 2000)), 8192, 2)
    tok.save_pretrained(str(tok_dir))
    tok_common = ["--tokenizer", str(tok_dir), "--sample", str(sample), "--seq-len", str(args.seq_len)]
    ours_tok = run_child("--system", "c2m-tok", "--store", str(work / "tok-c2m"), *tok_common)
    hf_tok = run_child("--system", "hf-tok", "--store", str(work / "tok-hf"), *tok_common)
    shutil.rmtree(work / "tok-c2m", ignore_errors=True)
    shutil.rmtree(work / "tok-hf", ignore_errors=True)

    cfg = f"{args.mb:g} MB text corpus (+{add_mb:.0f} MB append), target {args.target_mb:g} MB, zstd"
    tcfg = f"{taken / 1e6:.1f} MB text, byte-level BPE 8192, seq_len {args.seq_len}"
    ours, peer = "c2m shard", "pyarrow write_dataset"
    rows = [
        {"system": ours, "metric": "write MB/s", "value": round(base_mb / cold["seconds"], 2), "unit": "MB/s", "config": cfg},
        {"system": peer, "metric": "write MB/s", "value": round(base_mb / pcold["seconds"], 2), "unit": "MB/s", "config": cfg},
        {"system": ours, "metric": "shard size spread %", "value": round(spread(ours_sizes, target), 2), "unit": "%",
         "config": cfg + f"; {len(ours_sizes)} full shards"},
        {"system": peer, "metric": "shard size spread %", "value": round(spread(pcold["sizes"][:-1], target), 2),
         "unit": "%", "config": cfg + f"; {len(pcold['sizes']) - 1} full files, max_rows_per_file {rows_per_file}"},
        {"system": ours, "metric": "peak RSS MB", "value": round(max(cold["peak_rss_mb"], app["peak_rss_mb"]), 1),
         "unit": "MB", "config": cfg},
        {"system": peer, "metric": "peak RSS MB", "value": round(max(pcold["peak_rss_mb"], papp["peak_rss_mb"]), 1),
         "unit": "MB", "config": cfg},
        {"system": ours, "metric": "append % of cold", "value": round(100 * app["seconds"] / cold["seconds"], 2),
         "unit": "%", "config": cfg + f"; {app['units_computed']}/{app['units']} shards written"},
        {"system": peer, "metric": "append % of cold", "value": round(100 * papp["seconds"] / pcold["seconds"], 2),
         "unit": "%", "config": cfg + "; new part written into new files"},
        {"system": "c2m tokenize/pack", "metric": "tokenize tokens/s", "value": round(ours_tok["tokens"] / ours_tok["seconds"]),
         "unit": "tokens/s", "config": tcfg},
        {"system": "datasets.map + group_texts", "metric": "tokenize tokens/s",
         "value": round(hf_tok["tokens"] / hf_tok["seconds"]), "unit": "tokens/s", "config": tcfg},
        {"system": "c2m tokenize/pack", "metric": "peak RSS MB", "value": round(ours_tok["peak_rss_mb"], 1), "unit": "MB",
         "config": tcfg},
        {"system": "datasets.map + group_texts", "metric": "peak RSS MB", "value": round(hf_tok["peak_rss_mb"], 1),
         "unit": "MB", "config": tcfg},
    ]
    notes = (f"Corpus: gen_corpus.py seed {args.seed}, generated + converted in {gen_s:.0f} s (not timed). "
             f"Cold: ours {cold['seconds']:.1f} s (3 splits, {len(ours_sizes) + len(cold['shards'])} shards, "
             f"{out_bytes / 1e6:.0f} MB written), peer {pcold['seconds']:.1f} s (no split logic). "
             f"Append of {add_mb:.0f} MB: ours {app['seconds']:.2f} s, peer {papp['seconds']:.2f} s. "
             "The peer's rows-per-file comes from our measured bytes per row (it has no byte target). "
             "Tokenize: ours keeps document boundaries (position ids restart per document, first label "
             "of each document masked, padding); the peer concatenates across documents and drops the tail.")
    result = {"bench": "shard", "date": time.strftime("%Y-%m-%d"), "machine":
              f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
              "rows": rows, "notes": notes}
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    (out / "shard.json").write_text(json.dumps(result, indent=1) + "\n")
    md = ["# shard benchmark", "", f"{result['date']}, {result['machine']}", "",
          "| system | metric | value | unit | config |", "|---|---|---|---|---|"]
    md += [f"| {r['system']} | {r['metric']} | {r['value']} | {r['unit']} | {r['config']} |" for r in rows]
    md += ["", notes, ""]
    (out / "shard.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
