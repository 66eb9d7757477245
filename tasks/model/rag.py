"""The retrieval baseline of the evaluation table (the seed's "RAG vs fine-tuning"): the untrained model
given the training data at inference time instead of in its weights.

* Index: BM25 (bm25s, Lucene variant, English stopwords) over the shard stage's train split, one passage
  per record, indexed on its input + target text. A train record whose ``metadata.content_hash`` equals
  a held-out record's is left out (dedup should have removed such copies; any found are counted).
* Query: a held-out record's input (its prompt). A record without an input (a plain document, all
  target) has no query and gets no passages: retrieving on its target would read the answer.
* Prompt: the top-k passages with a BM25 score above 0, best first, each rendered as training rendered
  records (the tokenize stage's template applied to its input, then its target), each followed by a
  blank line, then the held-out record rendered with the same template. Each passage is cut to
  ``max_passage_tokens``; then the passages are fitted into ``seq_len`` minus the record's prompt and
  its answer room (target + eos, at least ``max_new_tokens``) by cutting the lowest-ranked ones first.
  The record itself is never cut for a passage.
* Scoring: the augmented records go through the same functions as every other row
  (``tasks.evaluate.evaluate_variant``: perplexity and token accuracy of the target given the augmented
  prompt, exact match, ROUGE-L, classification); the latency columns time retrieval + prompt assembly +
  one forward pass of the augmented latency probe, and ``retrieval_p50_ms``/``retrieval_p95_ms`` time
  retrieval alone over every held-out query.

The index is built inside the evaluate stage: its key already chains the shard, tokenize and finetune
keys, and BM25 over the demo's train split takes well under a second.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from corpus2model.tasks.model.metrics import percentile
from corpus2model.tasks.stage import Manifest, StageError

PASSAGE_SEPARATOR = "\n\n"
STOPWORDS = "en"
ROW_PREFIX = "rag_"


# ---------------------------------------------------------------------------------------------
# index and retrieval (pure functions of texts)
# ---------------------------------------------------------------------------------------------
def index_text(record: dict) -> str:
    """What BM25 indexes for a train record: its input and target text."""
    return "\n".join(t for t in (record.get("input") or "", record.get("target") or "") if t)


def passage_text(record: dict, template: str) -> str:
    """A train record as it goes into the prompt: rendered the way training rendered it."""
    from corpus2model.tasks.tokenize import render

    prompt, target = render(record, template)
    return prompt + target


def build_index(texts: list[str]):
    """A bm25s BM25 index over ``texts`` (row i = passage i)."""
    try:
        import bm25s
    except ImportError:
        raise StageError("evaluate.rag needs bm25s: pip install 'corpus2model[train]' (or pip install bm25s), "
                         "or set evaluate.rag.enabled: false") from None
    if not texts:
        raise StageError("evaluate.rag: the train split has no records to index")
    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize(texts, stopwords=STOPWORDS, show_progress=False), show_progress=False)
    return retriever


def retrieve(index, query: str, k: int) -> list[int]:
    """Passage rows of the ``k`` best BM25 matches for ``query``, best first; rows scoring 0 (no query
    term in common) are left out, so a query with no match gets no passages."""
    import bm25s

    if not query.strip():
        return []
    tokens = bm25s.tokenize([query], stopwords=STOPWORDS, show_progress=False)
    k = min(k, int(index.scores["num_docs"]))
    docs, scores = index.retrieve(tokens, k=k, show_progress=False)
    return [int(d) for d, s in zip(docs[0], scores[0]) if s > 0]


# ---------------------------------------------------------------------------------------------
# prompt assembly
# ---------------------------------------------------------------------------------------------
def augment(record: dict, passages: list[str], template: str, tokenizer, seq_len: int,
            max_passage_tokens: int, answer_room: int = 0) -> tuple[dict, int, bool]:
    """(the record with the passages before its prompt, passages used, whether any passage was cut).

    The returned record's ``input`` is the whole augmented prompt: score it with the template
    ``"{input}"``. ``answer_room``: tokens kept free after the prompt besides target + eos (generation's
    ``max_new_tokens``)."""
    from corpus2model.tasks.tokenize import render

    prompt, target = render(record, template)
    if not prompt or not passages:
        return record, 0, False

    def n_tokens(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    reserve = max(n_tokens(target) + 1, answer_room)
    budget = seq_len - n_tokens(prompt) - reserve
    sep = n_tokens(PASSAGE_SEPARATOR)
    pieces = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in passages]
    while True:
        used, left, cut = [], budget, False
        for ids in pieces:
            room = min(max_passage_tokens, left - sep)
            if room <= 0:
                cut = True
                break
            cut = cut or len(ids) > room
            used.append(ids[:room])
            left -= len(used[-1]) + sep
        context = "".join(tokenizer.decode(ids) + PASSAGE_SEPARATOR for ids in used)
        # Decoding cut tokens and re-encoding them with the prompt can merge or split a few tokens
        # differently: measure the joined text and shrink the budget until it fits.
        over = n_tokens(context + prompt) + reserve - seq_len
        if over <= 0 or not used:
            break
        budget -= over
    if not used:
        return record, 0, cut
    return {**record, "input": context + prompt}, len(used), cut


# ---------------------------------------------------------------------------------------------
# the rows (called once from tasks.evaluate.run)
# ---------------------------------------------------------------------------------------------
def train_records(shard: Manifest) -> list[dict]:
    """The train split the finetune stage trained on, in shard order."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from corpus2model.tasks.tokenize import shard_files, verified_shard

    out = []
    for path in shard_files(shard).get("train") or []:
        try:
            out += pq.read_table(verified_shard(shard, Path(path)), columns=["id", "input", "target", "metadata"]).to_pylist()
        except (pa.ArrowInvalid, OSError, KeyError) as e:
            raise StageError(f"evaluate.rag: shard {path} could not be read ({e}); rerun `c2m run`") from None
    return out


def record_hash(record: dict) -> str:
    from corpus2model.schemas.records import content_hash

    return (record.get("metadata") or {}).get("content_hash") or content_hash(record.get("input") or "",
                                                                              record.get("target") or "")


def rows(shard: Manifest, records: list[dict], groups: dict[str, list[dict]], folders: dict, template: str,
         seq_len: int, ec, score: Callable, notes: list[str], log=None) -> list[tuple[dict, list[int]]]:
    """The ``rag_<model>`` rows for ``ec.rag.models``, each with its argmax predictions (top-1 agreement);
    notes for the table are appended to ``notes``. Nothing when ``ec.rag.enabled`` is off.

    ``score`` is ``tasks.evaluate.evaluate_variant`` (passed in: this library does not import the stage);
    ``groups`` are the held-out task groups the other rows were scored on; the latency probe is
    ``records[0]``, the record the other rows' latency is measured on."""
    import torch

    from corpus2model.tasks.tokenize import load_tokenizer

    rc = ec.rag
    if not rc.enabled:
        return []
    latency_record = records[0]
    t0 = time.perf_counter()
    held = {record_hash(r) for r in records}
    train = train_records(shard)
    kept = [r for r in train if record_hash(r) not in held]
    index = build_index([index_text(r) for r in kept])
    index_s = time.perf_counter() - t0
    passages = [passage_text(r, template) for r in kept]

    tokenizer = load_tokenizer(folders["base"])  # every variant shares the tokenizer tokenize trained
    query = lambda r: r.get("input") or ""  # noqa: E731  (the record's prompt text, before the template)

    # records that are also answered by generation keep max_new_tokens free after their prompt
    generated = {r["id"] for g in ("math", "generation") for r in groups.get(g, [])}

    def assemble(r: dict, hits: list[int]) -> tuple[dict, int, bool]:
        return augment(r, [passages[i] for i in hits], template, tokenizer, seq_len, rc.max_passage_tokens,
                       ec.max_new_tokens if r["id"] in generated else 0)

    retrieval_ms, augmented, used, cut = [], {}, 0, 0
    for r in records:
        t = time.perf_counter()
        hits = retrieve(index, query(r), rc.k)
        retrieval_ms.append((time.perf_counter() - t) * 1000.0)
        augmented[r["id"]], n, c = assemble(r, hits)
        used, cut = used + n, cut + c
    aug_records = [augmented[r["id"]] for r in records]
    aug_groups = {g: [augmented.get(r["id"], r) for r in rs] for g, rs in groups.items() if g != "preference"}
    aug_groups["preference"] = []  # pairs are scored on their chosen/rejected text: no retrieval row for them
    no_query = sum(1 for r in records if not query(r).strip())
    if no_query:
        notes.append(f"rag: {no_query} held-out record(s) have no input to query with (plain documents): "
                     f"scored without passages")

    def latency(model) -> tuple[float, float]:
        """p50/p95 ms of retrieval + assembly + one forward pass of the augmented probe record."""
        device = getattr(model, "device", "cpu")
        times = []
        with torch.inference_mode():
            for i in range(3 + ec.latency_runs):
                t = time.perf_counter()
                rec, _, _ = assemble(latency_record, retrieve(index, query(latency_record), rc.k))
                ids = _encode(rec, tokenizer, seq_len)
                model(input_ids=torch.tensor([ids], device=device), use_cache=False)
                if str(device).startswith("cuda"):
                    torch.cuda.synchronize()
                if i >= 3:
                    times.append((time.perf_counter() - t) * 1000.0)
        return percentile(times, 50), percentile(times, 95)

    probe_rec, _, _ = assemble(latency_record, retrieve(index, query(latency_record), rc.k))
    probe_ids = _encode(probe_rec, tokenizer, seq_len)
    out = []
    for model_name in rc.models:
        row, preds = score(folders[model_name], aug_records, aug_groups, "{input}", ec, probe_ids, latency=latency)
        row = {"variant": ROW_PREFIX + model_name, **row,
               "retrieval_p50_ms": round(percentile(retrieval_ms, 50), 3),
               "retrieval_p95_ms": round(percentile(retrieval_ms, 95), 3),
               "format": ("peft" if isinstance(folders[model_name], tuple) else "hf") + "+bm25",
               "rag_k": rc.k, "rag_passages": round(used / max(1, len(records)), 2), "rag_index_passages": len(kept),
               "rag_index_s": round(index_s, 3), "latency_tokens": len(probe_ids)}
        if log is not None:
            log("evaluate %s: %s", row["variant"], row)
        out.append((row, preds))
    notes.append(f"rag rows: BM25 (bm25s) over {len(kept)} train passages ({len(train) - len(kept)} train record(s) "
                 f"with a held-out record's content_hash left out: dedup should leave 0), k={rc.k}, "
                 f"{used / max(1, len(records)):.2f} passages per held-out record on average ({cut} record(s) with a "
                 f"passage cut or dropped to fit {seq_len} tokens); latency = retrieval + assembly + forward of "
                 f"{len(probe_ids)} tokens")
    return out


def _encode(record: dict, tokenizer, seq_len: int) -> list[int]:
    """The augmented probe's prompt + target ids, as scoring encodes them (end kept past seq_len)."""
    from corpus2model.tasks.tokenize import render

    prompt, target = render(record, "{input}")
    ids = tokenizer(prompt + target, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return ids[-seq_len:]
