"""Tokenize + pack benchmark: corpus2model's per-shard tokenize/pack (``tasks.tokenize.pack_shard``) vs
``datasets.map`` with the same fast tokenizer + the classic ``group_texts``, in one run.

Run (a quiet machine; corpus generation ~10 s per 20 MB on 2 cores, cached under --work):
    python bench/tokenize_bench.py                        # 20 MB of text, seq_len 1024, 3 rounds
    python bench/tokenize_bench.py --mb 5 --rounds 1      # a smoke run
    python bench/tokenize_bench.py --sft-share 0.5        # half the records with a prompt (SFT)

What it does:
1. Generates text with shared/bench/anchors/gen_corpus.py (through bench/shard_bench.py's
   ``make_corpus``: seeded English prose as record Parquet parts) and writes the first ``--mb`` MB of
   it as one shard-shaped Parquet file (RECORD_SCHEMA). By default every record is a plain document
   (empty input), as in the measurement issue 16 started from; ``--sft-share`` gives that share of the
   records an input (their first sentence), so prompts are encoded and masked too.
2. Trains one byte-level BPE tokenizer (8192) on the file's first 20,000 records; not timed.
3. Runs each system in its own subprocess, alternating, ``--rounds`` times; each child reports wall
   seconds of the tokenize + pack work and its peak RSS (VmHWM). Loading the tokenizer and importing
   libraries are not timed (``datasets`` loads torch on import: seconds that are not throughput).
   * ``corpus2model``: ``pack_shard`` -> an Arrow IPC file of packed blocks (best-fit decreasing,
     per-document position ids, the first label of every segment masked, padding).
   * ``datasets.map + group_texts``: ``load_dataset("parquet")``, a batched ``map`` with the tokenizer
     (text + eos), then transformers' run_clm ``group_texts`` (concatenate everything, cut into
     ``seq_len`` blocks, drop the tail), ``to_parquet``.
4. Writes bench/results/tokenize_bench.json and .md (bench/results_io.py).

``tokenize tokens/s`` = tokens of the file (text + one eos per record; the same count for both on plain
documents) / median wall seconds over the rounds. Both children inherit the same environment (tokenizers' Rust
thread pool on, as a plain Python process has it).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from results_io import RESULTS, write_results
from shard_bench import make_corpus, peak_rss_mb

TEMPLATE = "### Input:\n{input}\n### Response:\n"
OURS, PEER = "corpus2model", "datasets.map + group_texts"


# ---------------------------------------------------------------------------------------------
# the sample and the tokenizer (not timed)
# ---------------------------------------------------------------------------------------------
def make_sample(work: Path, mb: float, sft_share: float, seed: int) -> tuple[Path, float, int]:
    """The first ``mb`` MB of generated text as one record file; (path, text MB, records)."""
    import random

    import pyarrow as pa
    import pyarrow.parquet as pq

    info = make_corpus(work, max(mb, 1.0), seed)
    path = work / f"tokenize-sample-{mb:g}-{sft_share:g}.parquet"
    tables, text = [], 0
    for part in info["parts"]:
        for b in pq.ParquetFile(Path(info["dir"]) / part["path"]).iter_batches(batch_size=2000):
            tables.append(pa.Table.from_batches([b]))
            text += sum(len(t.encode("utf-8")) for t in b.column("target").to_pylist())
            if text >= mb * 1e6:
                break
        if text >= mb * 1e6:
            break
    table = pa.concat_tables(tables)
    if sft_share > 0:
        rng = random.Random(seed)
        targets = table.column("target").to_pylist()
        inputs = [t.split(". ")[0] if rng.random() < sft_share else "" for t in targets]
        table = table.set_column(table.schema.get_field_index("input"), "input", pa.array(inputs, pa.string()))
    pq.write_table(table, path, compression="zstd")
    return path, text / 1e6, table.num_rows


def make_tokenizer(sample: Path, out: Path) -> None:
    import pyarrow.parquet as pq

    from corpus2model.tasks.tokenize import render, train_tokenizer

    table = pq.read_table(sample, columns=["input", "target"]).slice(0, 20000)
    texts = ("".join(render(r, TEMPLATE)) for r in table.to_pylist())
    tok = train_tokenizer(texts, 8192, 2)
    tok.save_pretrained(str(out))


# ---------------------------------------------------------------------------------------------
# children: one system each, JSON on stdout
# ---------------------------------------------------------------------------------------------
def child(args) -> dict:
    from corpus2model.tasks.tokenize import load_tokenizer, render

    tok = load_tokenizer(args.tokenizer)
    sample, out = Path(args.sample), Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    if args.system == "ours":
        from corpus2model.tasks.tokenize import pack_shard

        t0 = time.perf_counter()
        counts = pack_shard(sample, tok, TEMPLATE, args.seq_len, out / "packed.arrow")
        secs = time.perf_counter() - t0
        return {"seconds": secs, "peak_rss_mb": peak_rss_mb(), "tokens": counts["tokens"], "blocks": counts["blocks"]}

    import datasets

    datasets.disable_progress_bars()
    eos = tok.eos_token_id
    seq_len = args.seq_len

    def tokenize_batch(b):
        texts = ["".join(render({"input": i, "target": t}, TEMPLATE)) for i, t in zip(b["input"], b["target"])]
        return {"input_ids": [x + [eos] for x in tok(texts, add_special_tokens=False)["input_ids"]]}

    def group_texts(b):  # transformers' examples/pytorch/language-modeling/run_clm.py
        flat = [t for x in b["input_ids"] for t in x]
        n = len(flat) // seq_len * seq_len
        blocks = [flat[i:i + seq_len] for i in range(0, n, seq_len)]
        return {"input_ids": blocks, "labels": [list(x) for x in blocks]}

    t0 = time.perf_counter()
    d = datasets.load_dataset("parquet", data_files=str(sample), split="train", cache_dir=str(out / "hf"))
    tokenized = d.map(tokenize_batch, batched=True, remove_columns=d.column_names)
    grouped = tokenized.map(group_texts, batched=True)
    grouped.to_parquet(str(out / "packed.parquet"))
    secs = time.perf_counter() - t0
    tokens = sum(len(x) for x in tokenized.with_format("arrow")["input_ids"].to_pylist())  # counted untimed
    return {"seconds": secs, "peak_rss_mb": peak_rss_mb(), "tokens": tokens, "blocks": grouped.num_rows}


def run_child(*argv: str) -> dict:
    p = subprocess.run([sys.executable, __file__, "--child", *argv], check=True, capture_output=True, text=True)
    return json.loads(p.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mb", type=float, default=20, help="text MB (10^6 bytes) tokenized by each system")
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--sft-share", type=float, default=0.0, help="share of records given an input (a prompt)")
    ap.add_argument("--rounds", type=int, default=3, help="runs of each system, alternating")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--work", default="/tmp/c2m-tokenize-bench")
    ap.add_argument("--results", default=str(RESULTS))
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--system", help=argparse.SUPPRESS)
    ap.add_argument("--tokenizer", help=argparse.SUPPRESS)
    ap.add_argument("--sample", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.child:
        print(json.dumps(child(args)))
        return

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    sample, text_mb, n_records = make_sample(work, args.mb, args.sft_share, args.seed)
    tok_dir = work / "tokenizer"
    make_tokenizer(sample, tok_dir)
    common = ["--tokenizer", str(tok_dir), "--sample", str(sample), "--seq-len", str(args.seq_len)]
    runs: dict[str, list[dict]] = {"ours": [], "peer": []}
    for _ in range(args.rounds):
        for system in ("ours", "peer"):
            runs[system].append(run_child("--system", system, "--out", str(work / f"out-{system}"), *common))
    shutil.rmtree(work / "out-ours", ignore_errors=True)
    shutil.rmtree(work / "out-peer", ignore_errors=True)

    tokens = {s: runs[s][0]["tokens"] for s in runs}
    # Plain documents are the same text for both, so the same tokens. With prompts the counts differ a
    # little: ours encodes prompt and target apart (the prompt is masked), the peer their concatenation.
    if args.sft_share == 0 and tokens["ours"] != tokens["peer"]:
        raise SystemExit(f"the systems tokenized different token counts: {tokens}")
    rate = {s: tokens[s] / statistics.median(r["seconds"] for r in runs[s]) for s in runs}
    rss = {s: max(r["peak_rss_mb"] for r in runs[s]) for s in runs}
    cfg = (f"{text_mb:.1f} MB text, {n_records} records ({args.sft_share:.0%} with a prompt), byte-level BPE 8192, "
           f"seq_len {args.seq_len}; median of {args.rounds} alternating rounds")
    rows = [
        {"system": OURS, "metric": "tokenize tokens/s", "value": round(rate["ours"]), "unit": "tokens/s", "config": cfg},
        {"system": PEER, "metric": "tokenize tokens/s", "value": round(rate["peer"]), "unit": "tokens/s", "config": cfg},
        {"system": OURS, "metric": f"tokenize tokens/s vs {PEER} x", "value": round(rate["ours"] / rate["peer"], 2),
         "unit": "x", "config": cfg},
        {"system": OURS, "metric": "peak RSS MB", "value": round(rss["ours"], 1), "unit": "MB", "config": cfg},
        {"system": PEER, "metric": "peak RSS MB", "value": round(rss["peer"], 1), "unit": "MB", "config": cfg},
    ]
    secs = {s: [round(r["seconds"], 2) for r in runs[s]] for s in runs}
    notes = (f"Wall seconds per round: {OURS} {secs['ours']}, {PEER} {secs['peer']} (tokens: {OURS} {tokens['ours']}, "
             f"{PEER} {tokens['peer']}). "
             f"Ours keeps document boundaries (best-fit decreasing packing, position ids restart per segment, "
             f"first label of each segment masked, padding: {runs['ours'][0]['blocks']} blocks); the peer "
             f"concatenates across documents and drops the tail ({runs['peer'][0]['blocks']} blocks). Peak RSS is "
             f"the whole child process: the peer's includes datasets' import (torch), ours never imports datasets.")
    path = write_results("tokenize_bench", rows, notes, Path(args.results), "tokenize + pack benchmark",
                         extra={"rounds": {OURS: runs["ours"], PEER: runs["peer"]}})
    print(path.with_suffix(".md").read_text(encoding="utf-8"))


if __name__ == "__main__":
    main()
