"""Back-translation throughput: batched ``generate`` (this project) against a naive loop that
translates one sentence per ``generate`` call, on the same sentences and the same model.

    python bench/augment_bench.py                      # full run (lead, quiet machine): 512 sentences
    python bench/augment_bench.py --n 16 --no-write    # smoke test

No translation model is reachable offline, so the model is a randomly initialised MarianMT
(``tasks.text.backtranslate.build_tiny_marian``: ``--d-model``, ``--layers``, a Unigram tokenizer trained
on the NTREX parallel sentences). Random weights rarely emit end-of-sequence early, so every
sentence decodes ``--max-new-tokens`` tokens: the cost per sentence is close to a real model's
worst case for that length, and the comparison batched vs naive is like for like. The GPU is used
when ``torch.cuda.is_available()`` (``--device``).

Rows: ``sentences/s`` for ``corpus2model (batched)`` and ``naive loop`` (en->de, wall time, model
loaded and warmed up before timing), the speedup, the share of sentences whose batched output
equals the naive one, and the cache: ``sentences/s`` of a rerun that finds every sentence in the
translation cache (SQLite in a temp store) and the number of sentences it translated (0).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.results_io import write_results  # noqa: E402
from corpus2model.tasks.text.backtranslate import (  # noqa: E402
    TranslateStats,
    TranslationCache,
    Translator,
    build_tiny_marian,
    pick_device,
    read_parallel,
)

PARALLEL = ROOT.parent / "shared" / "datasets" / "parallel_sentences" / "ntrex_en_de_fr_zh.public.jsonl"


def timed(fn):
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - t0, time.process_time() - c0


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=512, help="sentences (NTREX English, file order)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=4000)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--num-beams", type=int, default=1)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    ap.add_argument("--parallel", type=Path, default=PARALLEL)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    ap.add_argument("--no-write", action="store_true", help="print only (smoke test)")
    args = ap.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    sentences = [r["en"] for r in read_parallel(args.parallel, ("en", "de"), args.n)]
    decoding = {"num_beams": args.num_beams, "max_new_tokens": args.max_new_tokens}
    with tempfile.TemporaryDirectory(prefix="augment-bench-") as tmp:
        model = build_tiny_marian(Path(tmp) / "model", args.parallel, "en", "de", vocab_size=args.vocab,
                                  d_model=args.d_model, layers=args.layers, max_sentences=1000)
        vocab = json.loads((model / "config.json").read_text(encoding="utf-8"))["vocab_size"]  # the trainer may stop short

        def translator(batch_size, cache=None):
            tr = Translator(models={"en-de": str(model)}, decoding=decoding, batch_size=batch_size, device=device, cache=cache)
            tr.translate(["Warm-up sentence one.", "Warm-up two."], "en", "de")  # load + warm up, not timed
            tr.stats = TranslateStats()
            return tr

        naive = translator(1)
        naive_out, naive_s, naive_cpu = timed(lambda: [naive.translate([s], "en", "de")[0] for s in sentences])
        batched = translator(args.batch_size)
        batched_out, batched_s, batched_cpu = timed(lambda: batched.translate(sentences, "en", "de"))
        same = sum(a == b for a, b in zip(naive_out, batched_out)) / len(sentences)

        db = Path(tmp) / "store" / "_cache" / "translations" / "translations.sqlite"
        cold = translator(args.batch_size, TranslationCache(db))
        _, cold_s, _ = timed(lambda: cold.translate(sentences, "en", "de"))
        warm = translator(args.batch_size, TranslationCache(db))
        _, warm_s, _ = timed(lambda: warm.translate(sentences, "en", "de"))
        distinct = len(set(sentences))

    gpu = torch.cuda.get_device_name(0) if device.startswith("cuda") else ""
    config = (f"{len(sentences)} NTREX en sentences, en->de, random MarianMT d_model {args.d_model} x {args.layers} layers, "
              f"vocab {vocab}, {args.max_new_tokens} new tokens, beams {args.num_beams}, device {device}"
              f"{' (' + gpu + ')' if gpu else ''}, torch threads {torch.get_num_threads()}")
    n = len(sentences)
    rows = [
        {"system": "corpus2model (batched)", "metric": "sentences/s", "value": round(n / batched_s, 2), "unit": "sentences/s",
         "config": f"{config}, batch {args.batch_size} sorted by length"},
        {"system": "naive loop", "metric": "sentences/s", "value": round(n / naive_s, 2), "unit": "sentences/s",
         "config": f"{config}, one generate call per sentence"},
        {"system": "corpus2model (batched)", "metric": "speedup vs naive loop", "value": round(naive_s / batched_s, 2), "unit": "x",
         "config": f"wall; CPU time ratio {naive_cpu / max(batched_cpu, 1e-9):.2f}"},
        {"system": "corpus2model (batched)", "metric": "outputs equal to naive", "value": round(same, 4), "unit": "share",
         "config": "exact string match; padding in a batch may move a near-tie argmax"},
        {"system": "corpus2model (cache hit rerun)", "metric": "sentences/s", "value": round(n / warm_s, 1), "unit": "sentences/s",
         "config": f"same sentences again, SQLite translation cache; cold run with cache {cold_s:.2f} s, rerun {warm_s:.3f} s"},
        {"system": "corpus2model (cache hit rerun)", "metric": "sentences translated", "value": warm.stats.translated, "unit": "sentences",
         "config": f"cold run translated {cold.stats.translated} of {distinct} distinct sentences"},
    ]
    notes = ("Wall time after model load and a 2-sentence warm-up. The model is random (no translation model is reachable "
             "offline), so each sentence decodes the full max-new-tokens; a trained model stops at end-of-sequence earlier, "
             "which favours batching less when lengths differ widely (sentences are sorted by length to limit that).")
    for r in rows:
        print(f"{r['system']:32s} {r['metric']:24s} {r['value']} {r['unit']}")
    if not args.no_write:
        write_results("augment_bench", rows, notes, out_dir=args.out, title="augment back-translation benchmark")
    return {"rows": rows}


if __name__ == "__main__":
    main()
