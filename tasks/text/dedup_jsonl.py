"""``c2m dedup`` straight from JSONL: one pass per file makes the records and their dedup sketch.

The standalone dedup of a folder of JSONL files (``.jsonl`` / ``.jsonl.gz``) does not need the
ingest stage's Parquet in between: a worker per file parses each line (orjson), builds the same
record ingest would (``tasks.ingest.json_to_record`` semantics, same ids, same rejects with the
same reasons), and computes what ``tasks.dedup`` needs in the same pass: the 128-bit exact digest
(the record id is its first 64 bits, so the normalised text is hashed once) and, for
``dedup.method: minhash``, the MinHash sketch (``tasks.text.minhash.sketch``). Decisions are made by
``tasks.dedup.decide_clusters`` on ``tasks.dedup.SketchIndex``, the same functions the pipeline's
dedup stage uses, so both keep the same representative (smallest source_path, source_line, id).

Per file, ``<store>/_units/dedup-jsonl/<key>/`` keeps the records (uncompressed Parquet: a cache),
the sketch arrays and the input names; the key is (file sha256, ingest + sketch settings), so a
rerun on a grown folder parses and sketches only the new files and compares them with the stored
sketches of the old ones. Every input line ends up kept (``parts/``), removed (``removed.jsonl``)
or rejected with a reason (``quarantine/``).
"""
from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

UNIT_STAGE = "dedup-jsonl"
UNIT_VERSION = "1"
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")


def jsonl_only(source) -> bool:
    """Every input file is JSONL (the fast path applies)."""
    return all(f.path.lower().endswith(JSONL_SUFFIXES) for f in source.files)


def exact_digest(input_text: str, target_text: str) -> bytes:
    """sha256 of normalised input + US + normalised target: ``schemas.records.record_id`` is its
    first 16 hex digits, ``tasks.dedup`` compares its first 16 bytes."""
    from corpus2model.schemas.records import normalize_for_hash

    h = hashlib.sha256(normalize_for_hash(input_text).encode("utf-8") if input_text else b"")
    h.update(b"\x1f")
    h.update(normalize_for_hash(target_text).encode("utf-8"))
    return h.digest()


def parse_jsonl(data: bytes, rel: str, sha: str, ingest_cfg):
    """Raw JSONL bytes -> (columns dict, 16-byte digests, quarantine rows, encoding).

    The common shape ``{"id"?, "text": str}`` is mapped inline; any other object goes through
    ``tasks.ingest.json_to_record`` so its checks and rejects stay the ingest stage's."""
    import codecs

    import orjson

    from corpus2model.schemas.records import quarantine_row
    from corpus2model.tasks.ingest import json_to_record

    stage = "ingest"  # the rejects are ingest's (same reasons as the pipeline's ingest stage)
    cols = _empty_columns()
    digests, rejects = [], []
    encoding = "utf-8"
    if data.startswith(codecs.BOM_UTF8):
        data, encoding = data[3:], "utf-8-sig"
    physical = data.split(b"\n")
    if physical and physical[-1] == b"":
        physical.pop()
    default_type, default_domain = ingest_cfg.default_task_type, ingest_cfg.default_domain
    simple = {"text"}, {"id", "text"}
    loads = orjson.loads
    add_digest, add_id, add_input, add_target, add_type, add_domain, add_source, add_source_id, add_line, add_lang = (
        digests.append, *(cols[k].append for k in ("id", "input", "target", "task_type", "domain", "source", "source_id",
                                                   "source_line", "lang")))
    for i, raw in enumerate(physical, start=1):
        try:
            obj = loads(raw)
        except orjson.JSONDecodeError:
            if not raw.strip():
                rejects.append(quarantine_row(stage, "blank_line", source_path=rel, source_line=i))
                continue
            try:  # the stdlib decides, as in ingest (it also accepts NaN / big ints that orjson refuses)
                obj = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                rejects.append(quarantine_row(stage, "invalid_utf8", detail=str(e), source_path=rel, source_line=i, record=raw))
                continue
            except json.JSONDecodeError as e:
                rejects.append(quarantine_row(stage, "invalid_json", detail=str(e), source_path=rel, source_line=i, record=raw))
                continue
        if type(obj) is dict and obj.keys() in simple and type(obj["text"]) is str:
            inp, tgt, task_type, domain, source, lang = "", obj["text"], default_type, default_domain, rel, None
            src_id = obj.get("id")
            src_id = None if src_id is None else str(src_id)
        else:
            rec, why = json_to_record(obj, rel=rel, sha=sha, line=i, encoding=encoding, cfg=ingest_cfg)
            if rec is None:
                rejects.append(quarantine_row(stage, why[0], detail=why[1], source_path=rel, source_line=i,
                                              record=obj if isinstance(obj, dict) else json.dumps(obj)))
                continue
            md = rec["metadata"]
            inp, tgt, task_type, domain, source, src_id, lang = (rec["input"], rec["target"], md["task_type"], md["domain"],
                                                                 md["source"], md["source_id"], md["lang"])
        d = exact_digest(inp, tgt)
        add_digest(d[:16])
        add_id(d.hex()[:16])
        add_input(inp)
        add_target(tgt)
        add_type(task_type)
        add_domain(domain)
        add_source(source)
        add_source_id(src_id)
        add_line(i)
        add_lang(lang)
    return cols, digests, rejects, encoding


def read_jsonl_file(path: Path, rel: str, sha: str, ingest_cfg):
    """A JSONL(.gz) file -> ``parse_jsonl``'s (columns, digests, rejects, encoding), with ingest's
    file-level rejects (corrupt_gzip, file_too_large). ``records_from_columns`` then gives the
    records table ingest would write for it."""
    import gzip
    import zlib

    from corpus2model.schemas.records import quarantine_row

    data = Path(path).read_bytes()
    if rel.lower().endswith(".gz"):
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as e:
            return _empty_columns(), [], [quarantine_row("ingest", "corrupt_gzip", detail=str(e), source_path=rel)], "utf-8"
    if len(data) > ingest_cfg.max_file_bytes:
        return _empty_columns(), [], [quarantine_row("ingest", "file_too_large", detail=f"{len(data)} bytes > ingest.max_file_bytes",
                                                     source_path=rel)], "utf-8"
    return parse_jsonl(data, rel, sha, ingest_cfg)


def _empty_columns() -> dict:
    return {k: [] for k in ("id", "input", "target", "task_type", "domain", "source", "source_id", "source_line", "lang")}


def records_from_columns(cols: dict, rel: str, sha: str, encoding: str):
    """RECORD_SCHEMA table from column lists (no per-record dicts)."""
    import pyarrow as pa

    from corpus2model.schemas.records import METADATA_TYPE, RECORD_SCHEMA

    n = len(cols["id"])
    md_values = {"task_type": cols["task_type"], "domain": cols["domain"], "source": cols["source"],
                 "source_id": cols["source_id"], "source_path": [rel] * n, "source_sha256": [sha] * n,
                 "source_line": cols["source_line"], "encoding": [encoding] * n, "lang": cols["lang"],
                 "parent_id": [None] * n, "aug_method": [None] * n}
    md = pa.StructArray.from_arrays([pa.array(md_values[f.name], f.type) for f in METADATA_TYPE], fields=list(METADATA_TYPE))
    return pa.Table.from_arrays([pa.array(cols["id"], pa.string()), pa.array(cols["input"], pa.string()),
                                 pa.array(cols["target"], pa.string()), md], schema=RECORD_SCHEMA)


def _file_unit(args) -> dict:
    """One JSONL file -> records.parquet, quarantine.parquet, digests/keys/sets, meta, names."""
    store_root, key, path, rel, sha, ingest_cfg, dedup_cfg = args
    from corpus2model.tasks.stage import FileEntry, Store

    def write(tmp: Path) -> dict:
        import numpy as np
        import pyarrow.parquet as pq

        from corpus2model.schemas.records import RECORD_SCHEMA, quarantine_table
        from corpus2model.tasks.dedup import dictionary_columns, sketch_params
        from corpus2model.tasks.text.minhash import sketch

        cols, digests, rejects, encoding = read_jsonl_file(Path(path), rel, sha, ingest_cfg)
        n = len(cols["id"])
        pq.write_table(records_from_columns(cols, rel, sha, encoding), tmp / "records.parquet", compression="none",
                       use_dictionary=dictionary_columns(RECORD_SCHEMA))
        files = [FileEntry("records.parquet", role="data", records=n)]
        if rejects:
            pq.write_table(quarantine_table(rejects), tmp / "quarantine.parquet")
            files.append(FileEntry("quarantine.parquet", role="quarantine", records=len(rejects)))
        np.save(tmp / "digests.npy", np.frombuffer(b"".join(digests), dtype=np.uint64).reshape(-1, 2) if n
                else np.zeros((0, 2), np.uint64))
        if dedup_cfg.method == "minhash":
            texts = [f"{i}\n{t}" if i else t for i, t in zip(cols["input"], cols["target"])]
            sk = sketch(texts, sketch_params(dedup_cfg))
            keys, sets, offs = sk["keys"], sk["sets"], sk["set_offsets"]
        else:  # exact only: an index with zero LSH bands has no near candidates
            keys, sets, offs = np.zeros((n, 0), np.uint64), np.zeros(0, np.uint32), np.zeros(n + 1, np.int64)
        np.save(tmp / "keys.npy", keys)
        np.save(tmp / "sets.npy", sets)
        np.save(tmp / "set_offsets.npy", offs)
        # (source_path, source_line) is unique per line here, so the content tie-break of
        # tasks.dedup.representative_key never decides and is left empty.
        meta = [[rel, line, rid, ""] for line, rid in zip(cols["source_line"], cols["id"])]
        (tmp / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
        names = [s if s is not None else rid for s, rid in zip(cols["source_id"], cols["id"])]
        (tmp / "names.json").write_text(json.dumps(names, ensure_ascii=False), encoding="utf-8")
        for f in ("digests.npy", "keys.npy", "sets.npy", "set_offsets.npy", "meta.json", "names.json"):
            files.append(FileEntry(f, role="index", records=n))
        reasons: dict[str, int] = {}
        for r in rejects:
            reasons[r["reason"]] = reasons.get(r["reason"], 0) + 1
        return {"files": files, "records": n, "rejected": reasons, "source_path": rel}

    return Store(store_root).unit_write(UNIT_STAGE, key, write)


OUT_STAGE = "dedup-jsonl-out"


def _out_key(unit_dir: Path, keep) -> str:
    """A file's kept part depends on its records (the unit key) and on which of them are kept."""
    import numpy as np

    from corpus2model.tasks.stage import cache_key

    return cache_key(OUT_STAGE, UNIT_VERSION, {}, [Path(unit_dir).name, hashlib.sha256(np.packbits(keep).tobytes()).hexdigest(),
                                                   str(len(keep))])


def _write_part(args) -> dict:
    """Pass two for one file: its kept records (``keep`` mask) as a zstd part, stored as a unit so
    that a rerun in which this file's decisions did not change links it instead of rewriting."""
    store_root, unit_dir, keep = args
    import pyarrow as pa
    import pyarrow.parquet as pq

    from corpus2model.schemas.records import RECORD_SCHEMA
    from corpus2model.tasks.dedup import dictionary_columns
    from corpus2model.tasks.stage import FileEntry, Store

    def write(tmp: Path) -> dict:
        table = pq.read_table(Path(unit_dir) / "records.parquet").filter(pa.array(keep))
        pq.write_table(table, tmp / "part.parquet", compression="zstd", use_dictionary=dictionary_columns(RECORD_SCHEMA))
        return {"files": [FileEntry("part.parquet", role="data", records=table.num_rows)], "records": table.num_rows}

    return Store(store_root).unit_write(OUT_STAGE, _out_key(unit_dir, keep), write)


def _pool_map(fn, items: list, workers: int) -> list:
    if workers > 1 and len(items) > 1:
        from concurrent.futures import ProcessPoolExecutor

        # Import what the workers need before they fork: each would pay ~0.5 s CPU for it.
        import orjson  # noqa: F401
        import pyarrow.parquet  # noqa: F401

        import corpus2model.tasks.ingest  # noqa: F401
        import corpus2model.tasks.text.minhash  # noqa: F401

        # pyarrow imports pandas on the first pa.array() of a process (~0.5 s CPU): once, here.
        pyarrow.array([], pyarrow.bool_())


        with ProcessPoolExecutor(min(workers, len(items))) as pool:
            return list(pool.map(fn, items))
    return list(map(fn, items))


def dedup_jsonl_folder(source, out_dir: Path, cfg, store) -> dict:
    """Dedup the JSONL files of ``source`` (a ``tasks.ingest.scan_raw`` manifest) into ``out_dir``:
    ``parts/part-NNNNN.parquet`` (kept records, one part per input file, input order),
    ``quarantine/*.parquet`` (unreadable lines, with reasons), ``removed.jsonl``. Returns the
    Manifest (also written to ``manifest.json``; counters and stats to ``stats.json``)."""
    import numpy as np

    from corpus2model.tasks.dedup import SketchIndex, decide_clusters, sketch_key
    from corpus2model.tasks.stage import FileEntry, Manifest, cache_key, link_or_copy, write_json_atomic

    t0 = time.perf_counter()
    c, out_dir = cfg.dedup, Path(out_dir)
    settings = {"ingest": cfg.ingest.hashed(), "sketch": sketch_key(c, "") if c.method == "minhash" else "exact"}
    raw_dir = Path(source.path)
    todo, dirs = [], []
    for f in source.files:
        key = cache_key(UNIT_STAGE, UNIT_VERSION, settings, [f.path, f.sha256])
        found = store.unit_lookup(UNIT_STAGE, key)
        dirs.append(found["dir"] if found else key)
        if not found:
            todo.append((str(store.root), key, str(raw_dir / f.path), f.path, f.sha256, cfg.ingest, c))
    done = {info["key"]: info["dir"] for info in _pool_map(_file_unit, todo, c.workers)}
    unit_dirs = [Path(done.get(d, d)) for d in dirs]
    t1 = time.perf_counter()
    index = SketchIndex(unit_dirs)
    decisions, dstats = decide_clusters(index, c.threshold)
    t2 = time.perf_counter()

    for sub in ("parts", "quarantine"):  # an earlier result in out_dir is replaced, not merged
        shutil.rmtree(out_dir / sub, ignore_errors=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    keep_all = np.fromiter((d is None for d in decisions), dtype=bool, count=index.n)
    masks = [keep_all[index.starts[u]:index.starts[u + 1]] for u in range(len(unit_dirs))]
    parts = [store.unit_lookup(OUT_STAGE, _out_key(d, k)) for d, k in zip(unit_dirs, masks)]
    missing = [u for u, p in enumerate(parts) if p is None]
    for u, info in zip(missing, _pool_map(_write_part, [(str(store.root), str(unit_dirs[u]), masks[u]) for u in missing], c.workers)):
        parts[u] = info
    files = []
    for u, info in enumerate(parts):
        rel = f"parts/part-{u:05d}.parquet"
        link_or_copy(Path(info["dir"]) / "part.parquet", out_dir / rel)
        files.append(FileEntry(rel, role="data", records=info["records"]))
    n_out = sum(f.records for f in files)
    rejected: dict[str, int] = {}
    n_rej = 0
    for u, d in enumerate(unit_dirs):
        info = json.loads((d / "unit.json").read_text(encoding="utf-8"))
        for reason, k in info.get("rejected", {}).items():
            rejected[reason] = rejected.get(reason, 0) + k
            n_rej += k
        if (d / "quarantine.parquet").is_file():
            link_or_copy(d / "quarantine.parquet", out_dir / "quarantine" / f"part-{u:05d}.parquet")
            files.append(FileEntry(f"quarantine/part-{u:05d}.parquet", role="quarantine", records=sum(info["rejected"].values())))
    names = [n for d in unit_dirs for n in json.loads((d / "names.json").read_text(encoding="utf-8"))]
    n_removed = 0
    tmp = out_dir / "removed.jsonl.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        for i, dec in enumerate(decisions):
            if dec is not None:
                rep, kind = dec
                fh.write(json.dumps({"id": names[i], "duplicate_of": names[rep], "kind": kind, "source_path": index.meta[i][0],
                                     "record_id": index.meta[i][2]}, ensure_ascii=False) + "\n")
                n_removed += 1
    tmp.replace(out_dir / "removed.jsonl")
    files.append(FileEntry("removed.jsonl", role="removed", records=n_removed))
    t3 = time.perf_counter()
    counters = {"in": index.n + n_rej, "out": n_out, "rejected": rejected, "duplicates": n_removed}
    if counters["in"] != n_out + n_rej + n_removed:
        from corpus2model.tasks.stage import CounterMismatch

        raise CounterMismatch(f"dedup {out_dir}: in {counters['in']} != out {n_out} + rejected {n_rej} + removed {n_removed}")
    stats = {"method": c.method, "path": "jsonl-direct", "threshold": c.threshold, "ngram": c.ngram, "bands": c.bands,
             "rows": c.rows, **dstats, "files": len(unit_dirs), "files_computed": len(todo),
             "files_reused": len(unit_dirs) - len(todo), "parts_written": len(missing),
             "parts_reused": len(unit_dirs) - len(missing), "seconds_parse_sketch": round(t1 - t0, 3),
             "seconds_decide": round(t2 - t1, 3), "seconds_write": round(t3 - t2, 3)}
    stats["cache"] = "computed" if todo else "hit"
    m = Manifest(stage="dedup", stage_version=UNIT_VERSION, files=files, counters=counters, stats=stats,
                 seconds=round(t3 - t0, 3), path=str(out_dir.resolve()))
    write_json_atomic(out_dir / "stats.json", {"dedup": {"cache": stats["cache"], "seconds": m.seconds, "counters": counters,
                                                         "stats": stats}})
    write_json_atomic(out_dir / "manifest.json", m.to_dict())
    return m
