"""Issue 17, item 2: dedup out of core (tasks/text/dedup_index.py).

* the partitioned index (a tiny ``dedup.memory_mb`` forces K > 1) makes the decisions of one
  partition, and both are those of a brute-force in-memory reference (every pair's exact Jaccard);
* a ``kill -9`` in the middle of a phase loses nothing: the rerun reuses the units (sketches,
  partitions) that were finished and makes the same decisions;
* adding documents sketches only the new ones, checks them against the stored buckets, and ends
  with the decisions of a cold run.
"""
from __future__ import annotations

import json
import random
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow.parquet as pq

from corpus2model.schemas.records import make_record, normalize_for_hash
from corpus2model.tasks import dedup
from corpus2model.tasks.stage import StageContext, Store, run_stage
from corpus2model.tasks.text import dedup_index

VOCAB = [f"tok{i}" for i in range(3000)]
TINY_MB = 0.02  # ~20 KB: a few hundred index entries per partition


def _text(seed, n=120):
    rng = random.Random(seed)
    return " ".join(rng.choice(VOCAB) for _ in range(n))


def _near(text, k, seed):
    rng = random.Random(seed)
    toks = text.split()
    for _ in range(k):
        toks[rng.randrange(len(toks))] = rng.choice(VOCAB)
    return " ".join(toks)


def _docs(n_files=6, per_file=25, seed=0):
    """JSONL-like docs per file: unique texts, exact copies (differing in case and spacing), near
    copies (J ~ 0.84), chains, copies below the threshold, spread over the files."""
    rng = random.Random(seed)
    files = [[] for _ in range(n_files)]
    bases = [_text(seed * 1000 + i) for i in range(n_files * per_file // 2)]
    for i, b in enumerate(bases):
        files[rng.randrange(n_files)].append(b)
        r = rng.random()
        if r < 0.25:
            files[rng.randrange(n_files)].append("  " + b.upper() + " \n")  # exact after normalisation
        elif r < 0.5:  # J ~ 0.84
            files[rng.randrange(n_files)].append(_near(b, 2, i))
        elif r < 0.6:  # a chain: b ~ c ~ d
            c = _near(b, 1, i + 7)
            files[rng.randrange(n_files)].append(c)
            files[rng.randrange(n_files)].append(_near(c, 1, i + 9))
        elif r < 0.7:  # J ~ 0.7: a candidate now and then, never a duplicate
            files[rng.randrange(n_files)].append(_near(b, 4, i))
    return files


def _write_folder(folder: Path, files, start=0):
    folder.mkdir(parents=True, exist_ok=True)
    for f, docs in enumerate(files, start=start):
        (folder / f"shard_{f:03d}.jsonl").write_text(
            "".join(json.dumps({"id": f"d{f}_{i}", "text": t}) + "\n" for i, t in enumerate(docs)))


def _removed(out: Path):
    return sorted((r["id"], r["duplicate_of"], r["kind"], r["kept_source_path"], r["kept_source_line"])
                  for r in map(json.loads, (out / "removed.jsonl").read_text().splitlines()))


def _shingles(t, n=5):
    w = re.findall(r"\w+", t.lower())
    return set(zip(*[w[i:] for i in range(n)])) if len(w) >= n else {tuple(w)}


def _brute_force(files, threshold=0.8):
    """The in-memory reference: every pair, exact digest or exact shingle Jaccard >= threshold,
    union-find, each cluster keeps its smallest (source_path, source_line)."""
    docs = [(f"shard_{f:03d}.jsonl", i + 1, f"d{f}_{i}", t) for f, ds in enumerate(files) for i, t in enumerate(ds)]
    parent = list(range(len(docs)))

    def find(x):
        while parent[x] != x:
            x = parent[x]
        return x

    sh = [_shingles(d[3]) for d in docs]
    norm = [normalize_for_hash(d[3]) for d in docs]
    for i in range(len(docs)):
        for j in range(i + 1, len(docs)):
            if norm[i] == norm[j] or len(sh[i] & sh[j]) / len(sh[i] | sh[j]) >= threshold:
                parent[find(j)] = find(i)
    clusters = {}
    for i in range(len(docs)):
        clusters.setdefault(find(i), []).append(i)
    out = []
    for members in clusters.values():
        rep = min(members, key=lambda i: docs[i][:2])
        for i in members:
            if i != rep:
                kind = "exact" if norm[i] == norm[rep] else "near"
                out.append((docs[i][2], docs[rep][2], kind, docs[rep][0], docs[rep][1]))
    return sorted(out)


def _cfg(make_cfg, **dedup_overrides):
    return make_cfg({"dedup": {"method": "minhash", **dedup_overrides}})


def test_partitioned_index_matches_one_partition_and_the_in_memory_reference(make_cfg, tmp_path):
    from corpus2model.flows.standalone import dedup_folder

    files = _docs()
    _write_folder(tmp_path / "in", files)
    one = dedup_folder(tmp_path / "in", tmp_path / "one", _cfg(make_cfg), store=tmp_path / "s1")
    many = dedup_folder(tmp_path / "in", tmp_path / "many", _cfg(make_cfg, memory_mb=TINY_MB), store=tmp_path / "s2")
    assert one.stats["partitions"] == 1 and many.stats["partitions"] > 4
    assert _removed(tmp_path / "one") == _removed(tmp_path / "many") == _brute_force(files)
    assert many.stats["near_duplicates"] > 10 and many.stats["exact_duplicates"] > 5
    # a pair that shares several bands is compared once, whatever the number of partitions
    assert many.stats["verify_partitions"] > 1 and one.stats["candidate_pairs"] == many.stats["candidate_pairs"]
    # the kept parts are the same bytes
    for a, b in zip(one.files_with("data"), many.files_with("data")):
        assert a.read_bytes() == b.read_bytes()
    # exact dedup is hash-partitioned the same way
    ex1 = dedup_folder(tmp_path / "in", tmp_path / "ex1", make_cfg({"dedup": {"method": "exact"}}), store=tmp_path / "s3")
    exk = dedup_folder(tmp_path / "in", tmp_path / "exk", make_cfg({"dedup": {"method": "exact", "memory_mb": TINY_MB / 8}}),
                       store=tmp_path / "s4")
    assert exk.stats["partitions"] > 1 and _removed(tmp_path / "ex1") == _removed(tmp_path / "exk")
    assert _removed(tmp_path / "ex1") == [r for r in _brute_force(files, threshold=2.0)]


def test_every_index_entry_lands_in_exactly_one_partition(make_cfg, tmp_path):
    from corpus2model.flows.standalone import dedup_folder

    _write_folder(tmp_path / "in", _docs(seed=3))
    m = dedup_folder(tmp_path / "in", tmp_path / "out", _cfg(make_cfg, memory_mb=TINY_MB), store=tmp_path / "s")
    store = Store(tmp_path / "s")
    parts = [json.loads(p.read_text()) for p in (store.root / "_units" / dedup_index.PART_STAGE).glob("*/unit.json")]
    assert len(parts) == m.stats["partitions"]
    n_docs = sum(1 for line in (tmp_path / "in").glob("*.jsonl") for _ in line.read_text().splitlines())
    assert sum(p["stats"]["entries"] for p in parts) == n_docs * make_cfg().dedup.bands
    # K follows the budget: a smaller budget, more partitions; never by hand
    assert dedup_index.choose_partitions(10**6, 1024, 2) < dedup_index.choose_partitions(10**6, 64, 2)
    assert dedup_index.choose_partitions(10**6, 64, 2) < dedup_index.choose_partitions(10**6, 64, 4)


_KILLER = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    import corpus2model.tasks.text.dedup_index as di
    import corpus2model.tasks.text.dedup_jsonl as dj
    from corpus2model.flows.standalone import dedup_folder
    from corpus2model.schemas.config import parse_config

    phase, after, ind, out, store, memory_mb = sys.argv[1], int(sys.argv[2]), *sys.argv[3:7]
    done = [0]

    def killing(real):
        def worker(args):
            if done[0] == after:
                os.kill(os.getpid(), signal.SIGKILL)  # kill -9 in the middle of the phase
            info = real(args)
            done[0] += 1
            return info
        return worker

    module, name = {"sketch": (dj, "_file_unit"), "partition": (di, "_partition_unit"), "verify": (di, "_verify_unit")}[phase]
    setattr(module, name, killing(getattr(module, name)))
    cfg = parse_config({"paths": {"store": store}, "dedup": {"method": "minhash", "memory_mb": float(memory_mb), "workers": 1}})
    dedup_folder(Path(ind), Path(out), cfg, store=Path(store))
""")


def _killed_run(tmp_path, phase, after, ind, store):
    p = subprocess.run([sys.executable, "-c", _KILLER, phase, str(after), str(ind), str(tmp_path / f"killed-{phase}"), str(store),
                        str(TINY_MB)], capture_output=True, text=True, timeout=300)
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]


def test_kill_9_during_partitions_resumes_and_loses_no_pair(make_cfg, tmp_path):
    from corpus2model.flows.standalone import dedup_folder

    files = _docs(seed=1)
    _write_folder(tmp_path / "in", files)
    store = tmp_path / "store"
    _killed_run(tmp_path, "partition", 3, tmp_path / "in", store)
    done = list((store / "_units" / dedup_index.PART_STAGE).glob("*/unit.json"))
    assert len(done) == 3  # three partitions finished before the kill, none of the gen records
    assert not (store / "_units" / dedup_index.GEN_STAGE).exists()
    m = dedup_folder(tmp_path / "in", tmp_path / "out", _cfg(make_cfg, memory_mb=TINY_MB, workers=1), store=store)
    assert m.stats["files_reused"] == len(files) and m.stats["files_computed"] == 0
    assert m.stats["partitions_reused"] == 3 and m.stats["partitions_computed"] == m.stats["partitions"] - 3 > 0
    assert _removed(tmp_path / "out") == _brute_force(files)
    assert not any((store / "_tmp").iterdir())  # the killed run's temp folders are swept


def test_kill_9_during_verification_resumes_with_every_partition_reused(make_cfg, tmp_path):
    from corpus2model.flows.standalone import dedup_folder

    files = _docs(seed=6)
    _write_folder(tmp_path / "in", files)
    store = tmp_path / "store"
    _killed_run(tmp_path, "verify", 1, tmp_path / "in", store)
    m = dedup_folder(tmp_path / "in", tmp_path / "out", _cfg(make_cfg, memory_mb=TINY_MB, workers=1), store=store)
    assert m.stats["partitions_computed"] == 0 and m.stats["partitions_reused"] == m.stats["partitions"]
    assert m.stats["verify_partitions_reused"] == 1 and m.stats["verify_partitions_computed"] == m.stats["verify_partitions"] - 1 > 0
    assert _removed(tmp_path / "out") == _brute_force(files)


def test_kill_9_during_sketches_resumes_from_the_finished_files(make_cfg, tmp_path):
    from corpus2model.flows.standalone import dedup_folder

    files = _docs(seed=2)
    _write_folder(tmp_path / "in", files)
    store = tmp_path / "store"
    _killed_run(tmp_path, "sketch", 2, tmp_path / "in", store)
    m = dedup_folder(tmp_path / "in", tmp_path / "out", _cfg(make_cfg, memory_mb=TINY_MB, workers=1), store=store)
    assert m.stats["files_reused"] == 2 and m.stats["files_computed"] == len(files) - 2
    assert _removed(tmp_path / "out") == _brute_force(files)


def test_adding_documents_sketches_only_the_new_ones_and_matches_a_cold_run(make_cfg, tmp_path):
    from corpus2model.flows.standalone import dedup_folder

    files = _docs(n_files=8, seed=4)
    old, new = files[:6], files[6:]
    # the new files also near-copy old documents and repeat one exactly
    new[0].append(_near(old[0][0], 2, 99))
    new[1].append(old[1][0])
    _write_folder(tmp_path / "in", old)
    cfg = _cfg(make_cfg, memory_mb=TINY_MB)
    first = dedup_folder(tmp_path / "in", tmp_path / "out", cfg, store=tmp_path / "s")
    assert first.stats["generation"] == "cold" and first.stats["partitions"] > 1
    _write_folder(tmp_path / "in", new, start=6)
    grown = dedup_folder(tmp_path / "in", tmp_path / "out", cfg, store=tmp_path / "s")
    assert grown.stats["files_computed"] == 2 and grown.stats["files_reused"] == 6
    assert grown.stats["generation"] == "incremental" and grown.stats["new_units"] == 2 and grown.stats["base_units"] == 6
    cold = dedup_folder(tmp_path / "in", tmp_path / "cold", cfg, store=tmp_path / "s-cold")
    assert _removed(tmp_path / "out") == _removed(tmp_path / "cold") == _brute_force(old + new)
    assert grown.stats["candidate_pairs"] < cold.stats["candidate_pairs"]  # only pairs with a new row
    assert ("d6_%d" % (len(new[0]) - 1), "d0_0", "near", "shard_000.jsonl", 1) in _removed(tmp_path / "out")
    # the same folder again: the generation is reused whole
    again = dedup_folder(tmp_path / "in", tmp_path / "out", cfg, store=tmp_path / "s")
    assert again.stats["generation"] == "reused" and again.stats["partitions_computed"] == 0


def _doc_rec(text, rid, path, line):
    r = make_record("", text, task_type="text", source_path=path, source_line=line)
    r["id"] = rid
    return r


def test_stage_path_is_partitioned_and_incremental_too(make_cfg, tmp_path, records_manifest):
    files = _docs(n_files=4, seed=5)
    recs = [_doc_rec(t, f"d{f}_{i}", f"shard_{f:03d}.jsonl", i + 1) for f, ds in enumerate(files) for i, t in enumerate(ds)]
    up = records_manifest(recs, parts=4)
    one = run_stage(dedup, [up], make_cfg({"dedup": {"method": "minhash"}}), StageContext(Store(tmp_path / "a")))
    many = run_stage(dedup, [up], make_cfg({"dedup": {"method": "minhash", "memory_mb": TINY_MB}}), StageContext(Store(tmp_path / "b")))
    assert one.stats["partitions"] == 1 and many.stats["partitions"] > 1

    def rows(m):
        return sorted((r["id"], r["duplicate_of"], r["kind"], r["kept_source_path"], r["kept_source_line"])
                      for r in pq.read_table(m.file("removed.parquet")).to_pylist())

    assert rows(one) == rows(many) == _brute_force(files)


def test_two_parts_with_the_same_bytes_are_two_units_of_the_index(make_cfg, ctx, records_manifest):
    """Identical upstream parts share one sketch unit in the store, but their rows are other records:
    every row of the second copy is an exact duplicate of the first's."""
    import shutil

    from corpus2model.tasks.stage import FileEntry, sha256_file

    recs = [_doc_rec(_text(i), f"r{i}", "a.jsonl", i) for i in range(5)]
    up = records_manifest(recs)
    src = up.dir / up.files[0].path
    shutil.copy(src, up.dir / "parts" / "copy.parquet")
    up.files.append(FileEntry("parts/copy.parquet", src.stat().st_size, sha256_file(src), "data", 5))
    m = run_stage(dedup, [up], make_cfg({"dedup": {"method": "minhash"}}), ctx)
    assert m.counters == {"in": 10, "out": 5, "rejected": {}, "duplicates": 5}
    assert m.stats["sketch_units"] == 2 and m.stats["sketch_units_computed"] == 1


def test_every_dedup_phase_reports_its_name_and_input_megabytes(make_cfg, tmp_path, monkeypatch):
    """Progress of ``c2m dedup`` names the phase of each kind of unit and counts input bytes in all
    of them (partitions and verification count their share of the input), so each line has MB/s."""
    from corpus2model.flows.standalone import dedup_folder
    from corpus2model.tasks.common import progress as progress_mod

    seen = []

    class Recording(progress_mod.Progress):
        def close(self, ok=True):
            seen.append((self.label, self.total, self.total_bytes, self.line()))
            super().close(ok)

    monkeypatch.setattr(progress_mod, "Progress", Recording)
    _write_folder(tmp_path / "in", _docs(n_files=3, per_file=12, seed=3))
    dedup_folder(tmp_path / "in", tmp_path / "out", _cfg(make_cfg, memory_mb=TINY_MB, workers=1), store=tmp_path / "s")
    labels = [s[0] for s in seen]
    assert labels == ["dedup 1/4 parse+sketch", "dedup 2/4 partitions", "dedup 3/4 verify", "dedup 4/4 write kept"], seen
    in_bytes = sum(p.stat().st_size for p in (tmp_path / "in").iterdir())
    for label, total, total_bytes, line in seen:
        assert total >= 1 and 0 < total_bytes <= in_bytes and total_bytes >= in_bytes - total, (label, total_bytes)
        assert re.search(r" MB/s, took ", line), line
