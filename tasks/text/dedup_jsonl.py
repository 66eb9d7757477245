"""``c2m dedup`` straight from JSONL: one pass per file makes the records and their dedup sketch.

The standalone dedup of a folder of JSONL files (``.jsonl`` / ``.jsonl.gz``) does not need the
ingest stage's Parquet in between: a worker per file parses each line (orjson), builds the same
record ingest would (``tasks.ingest.json_to_record`` semantics, same ids, same rejects with the
same reasons), and computes what ``tasks.dedup`` needs in the same pass: the 128-bit exact digest
(``metadata.content_hash`` is its first 64 bits, so the normalised text is hashed once, a whole
file at a time) and, for ``dedup.method: minhash``, the MinHash sketch (``tasks.text.minhash.sketch``).
Decisions are made by ``tasks.text.dedup_index.run_index``, the out-of-core index the pipeline's
dedup stage uses too, so both keep the same representative (smallest source_path, source_line, id).

Per file, ``<store>/_units/dedup-jsonl/<key>/`` keeps the records (uncompressed Arrow IPC: a cache),
the index files and the input names; the key is (file sha256, ingest + sketch settings), so a
rerun on a grown folder parses and sketches only the new files and checks them against the stored
buckets of the old ones. Every input line ends up kept (``parts/``), removed (``removed.jsonl``)
or rejected with a reason (``quarantine/``).
"""
from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

UNIT_STAGE = "dedup-jsonl"
UNIT_VERSION = "4"  # 2: per-occurrence ids + metadata.content_hash, exact source ids, removed rows name the kept record
# 3: a cut .jsonl.gz keeps its complete lines (tasks.ingest.read_raw), an unreadable file is quarantined
# 4: the out-of-core index files (tasks.text.dedup_index), records cached as Arrow IPC
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")


def jsonl_only(source) -> bool:
    """Every input file is JSONL (the fast path applies)."""
    return all(f.path.lower().endswith(JSONL_SUFFIXES) for f in source.files)


def parse_jsonl(data: bytes, rel: str, sha: str, ingest_cfg):
    """Raw JSONL bytes -> (columns dict, 32-byte exact digests, quarantine rows, encoding).

    The common shape ``{"id"?, "text": str}`` is mapped inline; any other object goes through
    ``tasks.ingest.json_to_record`` so its checks and rejects stay the ingest stage's. The exact
    digests (sha256 of normalised input + US + target, ``tasks.text.dedup_index.normalized_digests``)
    are computed for the whole file at once after the line loop; ``metadata.content_hash`` is the
    hex of their first 8 bytes, as ``schemas.records.content_hash`` makes it."""
    import codecs

    import orjson

    from corpus2model.schemas.records import occurrence_ids, quarantine_row
    from corpus2model.tasks.ingest import json_to_record, load_json
    from corpus2model.tasks.text.dedup_index import normalized_digests

    stage = "ingest"  # the rejects are ingest's (same reasons as the pipeline's ingest stage)
    cols = _empty_columns()
    rejects = []
    encoding = "utf-8"
    if data.startswith(codecs.BOM_UTF8):
        data, encoding = data[3:], "utf-8-sig"
    physical = data.split(b"\n")
    if physical and physical[-1] == b"":
        physical.pop()
    default_type, default_domain = ingest_cfg.default_task_type, ingest_cfg.default_domain
    simple = {"text"}, {"id", "text"}
    loads = orjson.loads
    add_input, add_target, add_type, add_domain, add_source, add_source_id, add_line, add_lang = (
        cols[k].append for k in ("input", "target", "task_type", "domain", "source", "source_id", "source_line", "lang"))
    for i, raw in enumerate(physical, start=1):
        try:
            obj = loads(raw)
            # orjson reads a 20-digit id as a rounded double and accepts any nesting: the inline
            # path takes only a flat {"text"} / {"id": string, "text"}; the rest is read like ingest.
            fast = type(obj) is dict and obj.keys() in simple and type(obj["text"]) is str and type(obj.get("id", "")) is str
        except orjson.JSONDecodeError:  # NaN, lone surrogates, bad bytes: the stdlib reader decides, as in ingest
            if not raw.strip():
                rejects.append(quarantine_row(stage, "blank_line", source_path=rel, source_line=i))
                continue
            fast = False
        if fast:
            inp, tgt, task_type, domain, source, lang = "", obj["text"], default_type, default_domain, rel, None
            src_id = obj.get("id")
        else:
            obj, why = load_json(raw)  # exact number literals, depth and surrogates checked
            if why is None:
                rec, why = json_to_record(obj, rel=rel, sha=sha, line=i, encoding=encoding, cfg=ingest_cfg)
            if why is not None:
                rejects.append(quarantine_row(stage, why[0], detail=why[1], source_path=rel, source_line=i, record=raw))
                continue
            md = rec["metadata"]
            inp, tgt, task_type, domain, source, src_id, lang = (rec["input"], rec["target"], md["task_type"], md["domain"],
                                                                 md["source"], md["source_id"], md["lang"])
        add_input(inp)
        add_target(tgt)
        add_type(task_type)
        add_domain(domain)
        add_source(source)
        add_source_id(src_id)
        add_line(i)
        add_lang(lang)
    cols["id"] = occurrence_ids(rel, cols["source_line"])
    digests = normalized_digests(cols["input"], cols["target"])
    cols["content_hash"] = [d[:8].hex() for d in digests]
    return cols, digests, rejects, encoding


def read_jsonl_file(path: Path, rel: str, sha: str, ingest_cfg):
    """A JSONL(.gz) file -> ``parse_jsonl``'s (columns, digests, rejects, encoding), with ingest's
    file-level rejects (corrupt_gzip, file_too_large: ``tasks.ingest.read_raw_file``, which inflates
    with a bound). ``records_from_columns`` then gives the records table ingest would write for it."""
    from corpus2model.tasks.ingest import inflate_one_member, read_raw_file

    data, reject = None, None
    if rel.lower().endswith(".gz"):  # the common case in one inflate call (GzipFile's chunked reads cost a third more)
        try:
            data = inflate_one_member(Path(path).read_bytes(), ingest_cfg.max_file_bytes)
        except OSError:  # unreadable: read_raw_file quarantines it with the reason
            data = None
    if data is None:  # not the common case: ingest's reader decides (multi-member, cut, corrupt, too large)
        data, _, reject = read_raw_file(Path(path), rel, ingest_cfg.max_file_bytes)
    if data is None:
        return _empty_columns(), [], [reject], "utf-8"
    cols, digests, rejects, encoding = parse_jsonl(data, rel, sha, ingest_cfg)
    return cols, digests, rejects + ([reject] if reject is not None else []), encoding  # a cut .gz: its tail


def _empty_columns() -> dict:
    return {k: [] for k in ("id", "input", "target", "task_type", "domain", "source", "source_id", "source_line", "lang",
                            "content_hash")}


def _string_array(values: list[str]):
    """``pa.array(values, pa.string())`` for a list of str (no None) from their UTF-8 bytes joined
    once and offsets from the byte lengths: a third of the cost of converting each string. Each
    string is encoded alone: encoding the joined text would widen all of it to 4 bytes a character
    as soon as one text is not Latin-1 (3x slower on the anchor corpus, where 1 text in 9 is not ASCII)."""
    import numpy as np
    import pyarrow as pa

    n = len(values)
    encoded = [s.encode("utf-8") for s in values]
    lens = np.fromiter(map(len, encoded), dtype=np.int64, count=n)
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lens, out=offsets[1:])
    if offsets[-1] >= 2**31:  # beyond 32-bit offsets: Arrow splits it into chunks
        return pa.array(values, pa.string())
    return pa.Array.from_buffers(pa.string(), n, [None, pa.py_buffer(offsets.astype(np.int32)), pa.py_buffer(b"".join(encoded))])


def records_from_columns(cols: dict, rel: str, sha: str, encoding: str):
    """RECORD_SCHEMA table from column lists (no per-record dicts)."""
    import pyarrow as pa

    from corpus2model.schemas.records import METADATA_TYPE, RECORD_SCHEMA

    n = len(cols["id"])
    md_values = {"task_type": cols["task_type"], "domain": cols["domain"], "source": cols["source"],
                 "source_id": cols["source_id"], "source_path": [rel] * n, "source_sha256": [sha] * n,
                 "source_line": cols["source_line"], "encoding": [encoding] * n, "lang": cols["lang"],
                 "parent_id": [None] * n, "aug_method": [None] * n, "content_hash": cols["content_hash"],
                 "decode_repairs": [None] * n}
    md = pa.StructArray.from_arrays([pa.array(md_values[f.name], f.type) for f in METADATA_TYPE], fields=list(METADATA_TYPE))
    return pa.Table.from_arrays([pa.array(cols["id"], pa.string()), _string_array(cols["input"]),
                                 _string_array(cols["target"]), md], schema=RECORD_SCHEMA)


def _file_unit(args) -> dict:
    """Phase 1 for one JSONL file: records.arrow (the records, uncompressed Arrow IPC: a cache read
    back memory-mapped), quarantine.parquet, the index files (``dedup_index.write_index``) with
    the input names in meta.arrow."""
    store_root, key, path, rel, sha, ingest_cfg, dedup_cfg = args
    from corpus2model.tasks.stage import FileEntry, Store

    def write(tmp: Path) -> dict:
        import pyarrow as pa
        import pyarrow.parquet as pq

        from corpus2model.schemas.records import RECORD_SCHEMA, quarantine_table
        from corpus2model.tasks.dedup import sketch_params
        from corpus2model.tasks.text.dedup_index import digest_array, meta_table, write_index
        from corpus2model.tasks.text.minhash import sketch

        cols, digests, rejects, encoding = read_jsonl_file(Path(path), rel, sha, ingest_cfg)
        n = len(cols["id"])
        with pa.OSFile(str(tmp / "records.arrow"), "wb") as sink, pa.ipc.new_file(sink, RECORD_SCHEMA) as w:
            w.write_table(records_from_columns(cols, rel, sha, encoding))
        files = [FileEntry("records.arrow", role="data", records=n)]
        if rejects:
            pq.write_table(quarantine_table(rejects), tmp / "quarantine.parquet")
            files.append(FileEntry("quarantine.parquet", role="quarantine", records=len(rejects)))
        keys = sets = offs = None
        if dedup_cfg.method == "minhash":
            texts = [f"{i}\n{t}" if i else t for i, t in zip(cols["input"], cols["target"])]
            sk = sketch(texts, sketch_params(dedup_cfg))
            keys, sets, offs = sk["keys"], sk["sets"], sk["set_offsets"]
        # (source_path, source_line) is unique per line here, so the content tie-break of
        # tasks.dedup.representative_key never decides and is left empty.
        names = [s if s is not None else rid for s, rid in zip(cols["source_id"], cols["id"])]
        meta = meta_table(rel, cols["source_line"], cols["id"], None, names)
        files += write_index(tmp, digest_array(digests), keys, sets, offs, meta)
        reasons: dict[str, int] = {}
        for r in rejects:
            reasons[r["reason"]] = reasons.get(r["reason"], 0) + 1
        return {"files": files, "records": n, "rejected": reasons, "source_path": rel,
                "counters": {"in": n + len(rejects), "out": n, "rejected": reasons}}

    return Store(store_root).unit_write(UNIT_STAGE, key, write)


OUT_STAGE = "dedup-jsonl-out"


def _out_key(unit_key: str, keep) -> str:
    """A file's kept part depends on its records (the unit key) and on which of them are kept."""
    import numpy as np

    from corpus2model.tasks.stage import cache_key

    return cache_key(OUT_STAGE, UNIT_VERSION, {}, [unit_key, hashlib.sha256(np.packbits(keep).tobytes()).hexdigest(),
                                                   str(len(keep))])


def _write_part(args) -> dict:
    """Pass two for one file: its kept records (``keep`` mask) as a zstd part, stored as a unit so
    that a rerun in which this file's decisions did not change links it instead of rewriting."""
    store_root, key, unit_dir, keep = args
    import pyarrow as pa
    import pyarrow.parquet as pq

    from corpus2model.schemas.records import RECORD_SCHEMA
    from corpus2model.tasks.dedup import dictionary_columns
    from corpus2model.tasks.stage import FileEntry, Store

    def write(tmp: Path) -> dict:
        with pa.memory_map(str(Path(unit_dir) / "records.arrow")) as src:
            table = pa.ipc.open_file(src).read_all().filter(pa.array(keep))
            pq.write_table(table, tmp / "part.parquet", compression="zstd", use_dictionary=dictionary_columns(RECORD_SCHEMA))
        return {"files": [FileEntry("part.parquet", role="data", records=table.num_rows)], "records": table.num_rows,
                "counters": {"in": len(keep), "out": table.num_rows, "rejected": {}}}

    return Store(store_root).unit_write(OUT_STAGE, key, write)


def _preload() -> None:
    """Import what the workers need before they fork: each would pay ~0.5 s CPU for it."""
    import orjson  # noqa: F401
    import pyarrow
    import pyarrow.parquet  # noqa: F401

    import corpus2model.tasks.ingest  # noqa: F401
    import corpus2model.tasks.text.minhash  # noqa: F401

    # pyarrow imports pandas on the first pa.array() of a process (~0.5 s CPU): once, here.
    pyarrow.array([], pyarrow.bool_())


def dedup_jsonl_folder(source, out_dir: Path, cfg, store, executor=None) -> dict:
    """Dedup the JSONL files of ``source`` (a ``tasks.ingest.scan_raw`` manifest) into ``out_dir``:
    ``parts/part-NNNNN.parquet`` (kept records, one part per input file, input order),
    ``quarantine/*.parquet`` (unreadable lines, with reasons), ``removed.jsonl``. Returns the
    Manifest (also written to ``manifest.json``; counters and stats to ``stats.json``).

    Phase 1 (records + sketch per file), phase 2 (partitions) and the kept parts are units in the
    store, computed through ``tasks.stage.compute_units``; a killed run resumes from them. ``executor``
    (``tasks.common.executor``: e.g. ``DaskUnits(client)``) runs them; None: a process pool of
    ``dedup.workers`` (or the Dask cluster this runs on)."""
    import numpy as np

    from corpus2model.tasks.dedup import sketch_key
    import logging

    from corpus2model.tasks.stage import FileEntry, Manifest, StageContext, cache_key, link_or_copy, write_json_atomic
    from corpus2model.tasks.text.dedup_index import SketchUnit, fan_out, run_index

    t0 = time.perf_counter()
    c, out_dir = cfg.dedup, Path(out_dir)
    store.sweep_tmp()  # the temp folders of a killed run (its units are found and reused below)
    settings = {"ingest": cfg.ingest.hashed(), "sketch": sketch_key(c, "") if c.method == "minhash" else "exact"}
    raw_dir = Path(source.path)
    keys = [cache_key(UNIT_STAGE, UNIT_VERSION, settings, [f.path, f.sha256]) for f in source.files]
    _preload()
    ctx = StageContext(store=store, log=logging.getLogger("corpus2model"), executor=executor)
    infos, gstats = fan_out(UNIT_STAGE, [(k, f.path, (str(store.root), k, str(raw_dir / f.path), f.path, f.sha256, cfg.ingest, c),
                                          f.bytes or 0) for k, f in zip(keys, source.files)], _file_unit, ctx, c.workers)
    units = [SketchUnit(k, Path(infos[k]["dir"]), infos[k]["records"], f.bytes or 0) for k, f in zip(keys, source.files)]
    t1 = time.perf_counter()
    dec = run_index(units, c, ctx)
    t2 = time.perf_counter()

    for sub in ("parts", "quarantine"):  # an earlier result in out_dir is replaced, not merged
        shutil.rmtree(out_dir / sub, ignore_errors=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    masks = [dec.keep_mask(u) for u in range(len(units))]
    out_keys = [_out_key(u.key, m) for u, m in zip(units, masks)]
    parts, pstats = fan_out(OUT_STAGE, [(k, u.dir.name, (str(store.root), k, str(u.dir), m), u.bytes)
                                        for k, u, m in zip(out_keys, units, masks)], _write_part, ctx, c.workers)
    files = []
    for u, k in enumerate(out_keys):
        rel = f"parts/part-{u:05d}.parquet"
        link_or_copy(Path(parts[k]["dir"]) / "part.parquet", out_dir / rel)
        # the unit hashed the bytes it wrote (a link or copy of them): not read again for the manifest
        files.append(FileEntry(rel, role="data", records=parts[k]["records"], sha256=_unit_sha(parts[k], "part.parquet")))
    n_out = sum(f.records for f in files)
    rejected: dict[str, int] = {}
    n_rej = 0
    for u, unit in enumerate(units):
        info = infos[unit.key]
        for reason, k in info.get("rejected", {}).items():
            rejected[reason] = rejected.get(reason, 0) + k
            n_rej += k
        if (unit.dir / "quarantine.parquet").is_file():
            link_or_copy(unit.dir / "quarantine.parquet", out_dir / "quarantine" / f"part-{u:05d}.parquet")
            files.append(FileEntry(f"quarantine/part-{u:05d}.parquet", role="quarantine", records=sum(info["rejected"].values()),
                                   sha256=_unit_sha(info, "quarantine.parquet")))
    n_removed = write_removed_jsonl(dec.removed, out_dir / "removed.jsonl")
    files.append(FileEntry("removed.jsonl", role="removed", records=n_removed))
    t3 = time.perf_counter()
    n_in = sum(u.records for u in units)
    counters = {"in": n_in + n_rej, "out": n_out, "rejected": rejected, "duplicates": n_removed}
    if counters["in"] != n_out + n_rej + n_removed:
        from corpus2model.tasks.stage import CounterMismatch

        raise CounterMismatch(f"dedup {out_dir}: in {counters['in']} != out {n_out} + rejected {n_rej} + removed {n_removed}")
    stats = {"method": c.method, "path": "jsonl-direct", "threshold": c.threshold, "ngram": c.ngram, "bands": c.bands,
             "rows": c.rows, **dec.stats, "files": len(units), "files_computed": gstats["units_computed"],
             "files_reused": gstats["units_reused"], "parts_written": pstats["units_computed"],
             "parts_reused": pstats["units_reused"], "seconds_parse_sketch": round(t1 - t0, 3),
             "seconds_decide": round(t2 - t1, 3), "seconds_write": round(t3 - t2, 3)}
    stats["cache"] = "computed" if gstats["units_computed"] else "hit"
    m = Manifest(stage="dedup", stage_version=UNIT_VERSION, files=files, counters=counters, stats=stats,
                 seconds=round(t3 - t0, 3), path=str(out_dir.resolve()))
    write_json_atomic(out_dir / "stats.json", {"dedup": {"cache": stats["cache"], "seconds": m.seconds, "counters": counters,
                                                         "stats": stats}})
    write_json_atomic(out_dir / "manifest.json", m.to_dict())
    return m


def _unit_sha(info: dict, name: str) -> str:
    """The sha256 a unit recorded for its file ``name`` ("": hashed when the output is finalized)."""
    return next((f.get("sha256") or "" for f in info.get("files", []) if f["path"] == name), "")


def write_removed_jsonl(removed, path: Path) -> int:
    """One JSON line per removed record, in input order: its input name and the kept record's, the
    kind, where both were read, and both record ids. Streamed batch by batch."""
    tmp = path.with_name(path.name + ".tmp")
    n = 0
    with open(tmp, "w", encoding="utf-8") as fh:
        for batch in removed.to_batches(max_chunksize=65536):
            for r in batch.to_pylist():
                fh.write(json.dumps({"id": r["name"], "duplicate_of": r["kept_name"], "kind": r["kind"], "source_path": r["path"],
                                     "source_line": r["line"], "record_id": r["id"], "kept_record_id": r["kept_id"],
                                     "kept_source_path": r["kept_path"], "kept_source_line": r["kept_line"]},
                                    ensure_ascii=False) + "\n")
                n += 1
    tmp.replace(path)
    return n
