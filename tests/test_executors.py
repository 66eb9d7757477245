"""Unit work on a real engine (issue 17): the same units on a local process pool and on a Dask
LocalCluster write byte-identical outputs, and a stage that runs on a Dask worker spreads its units
over every worker of the cluster instead of keeping them on its own."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from corpus2model.flows.stages import STAGES
from corpus2model.schemas.config import load_config
from corpus2model.tasks.common.executor import DaskUnits, LocalUnits, on_dask_worker, unit_executor
from corpus2model.tasks.ingest import scan_raw
from corpus2model.tasks.stage import Manifest, StageContext, Store, run_stage

from helpers import ROOT

distributed = pytest.importorskip("distributed")

SAMPLE = ROOT / "data" / "sample" / "raw"
CHAIN = ("ingest", "clean", "shard", "tokenize")


@pytest.fixture(scope="module")
def cluster():
    """Two single-thread worker processes: units cross a process boundary (pickled arguments, modules
    imported afresh), as on a real cluster, and each worker holds one unit at a time."""
    import cloudpickle

    # This module's helpers (_fail_on, _ingest_on_a_worker) travel by value: tests/ is not importable on
    # the workers, whereas the project's unit functions travel by name, as in production.
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address="127.0.0.1:0",
                                  host="127.0.0.1") as lc, distributed.Client(lc) as client:
        yield client


def _raw(tmp_path: Path, n: int = 12) -> Path:
    """A slice of the bundled sample corpus: the GSM8K-style SFT file (most of the records) and ``n - 1``
    text, wiki, news and HTML files; one unit each in ingest and clean."""
    raw = tmp_path / "raw"
    files = sorted(p for p in (SAMPLE / "corpus").rglob("*") if p.is_file() and "snippets" not in p.parts)
    picked = [SAMPLE / "sft" / "gsm8k_selfinstruct_600.jsonl.gz"] + files[::max(1, len(files) // (n - 1))][:n - 1]
    for p in picked:
        dst = raw / p.relative_to(SAMPLE)
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(p, dst)
    return raw


def _cfg(raw: Path, store: Path, **sections):
    """The demo recipe's ingest and clean settings (what the bundled corpus is written for)."""
    overrides = {"paths.raw": str(raw), "paths.store": str(store), "paths.registry": str(store.parent / "registry")}
    overrides.update({f"{s}.{k}": v for s, values in sections.items() for k, v in values.items()})
    return load_config(ROOT / "configs" / "demo.yaml", overrides)


def _chain(cfg, executor) -> dict[str, Manifest]:
    """ingest -> clean -> shard -> tokenize, every unit on ``executor``."""
    store = Store(cfg.paths.store)
    ctx = StageContext(store=store, executor=executor)
    done = {"source": scan_raw(cfg.paths.raw, cfg.ingest.include, store)}
    for name, upstream in zip(CHAIN, ("source",) + CHAIN[:-1]):
        done[name] = run_stage(STAGES[name], [done[upstream]], cfg, ctx)
        assert done[name].stats["cache"] == "computed", name
    return done


def _files(m: Manifest) -> list[tuple[str, str, int]]:
    return sorted((f.path, f.sha256, f.bytes) for f in m.files)


def test_pool_and_dask_cluster_write_identical_outputs(tmp_path, cluster):
    raw = _raw(tmp_path, n=8)
    # small shards: several per split, so shard's index and tokenize have several units too
    settings = {"shard": {"target_bytes": 40_000, "row_groups_per_shard": 2, "splits": {"train": 0.8, "validation": 0.2}},
                "tokenize": {"vocab_size": 300, "seq_len": 64}}
    pool_cfg = _cfg(raw, tmp_path / "store-pool", **settings)
    dask_cfg = _cfg(raw, tmp_path / "store-dask", **settings)

    pool = _chain(pool_cfg, LocalUnits(2))
    with distributed.get_task_stream(cluster) as stream:
        dask = _chain(dask_cfg, DaskUnits(cluster))

    for name in CHAIN:
        assert pool[name].key == dask[name].key, name
        assert _files(pool[name]) == _files(dask[name]), f"{name}: outputs differ between the pool and Dask"
        assert pool[name].counters == dask[name].counters, name
        assert dask[name].stats["units_computed"] == dask[name].stats["units"] > 1, name
    assert len(pool["shard"].entries("data")) > 2  # the shard and tokenize units really were several
    # Every unit stage's units ran as Dask tasks, and on both workers.
    ran = {}
    for t in stream.data:
        ran.setdefault(t["key"].rsplit("-", 2)[0], set()).add(t["worker"])
    assert {"ingest", "clean", "shard-index", "tokenize"} <= set(ran)
    assert len(ran["ingest"]) == len(ran["clean"]) == 2


def _ingest_on_a_worker(raw: str, store: str) -> dict:
    """What a stage task does when prefect-dask ships it to a worker: run_stage with no executor given."""
    cfg = _cfg(Path(raw), Path(store))
    st = Store(store)
    m = run_stage(STAGES["ingest"], [scan_raw(raw, cfg.ingest.include, st)], cfg, StageContext(store=st))
    return {"files": sorted((f.path, f.sha256) for f in m.files), "executor": repr(unit_executor(1)),
            "on_worker": on_dask_worker()}


def test_a_stage_on_a_dask_worker_sends_its_units_to_every_worker(tmp_path, cluster):
    raw = _raw(tmp_path, n=8)
    with distributed.get_task_stream(cluster) as stream:
        out = cluster.submit(_ingest_on_a_worker, str(raw), str(tmp_path / "store-worker"), pure=False).result()
    assert out["on_worker"] and out["executor"].startswith("DaskUnits")
    units = [t for t in stream.data if t["key"].startswith("ingest-")]
    assert len(units) == 8
    # The stage's own worker left its thread for units (secede), so units ran on both workers.
    assert len({t["worker"] for t in units}) == 2
    # The same files as in this process, with a local pool.
    cfg = _cfg(raw, tmp_path / "store-local")
    st = Store(cfg.paths.store)
    local = run_stage(STAGES["ingest"], [scan_raw(cfg.paths.raw, cfg.ingest.include, st)], cfg,
                      StageContext(store=st, executor=LocalUnits(2)))
    assert out["files"] == sorted((f.path, f.sha256) for f in local.files)
    assert not on_dask_worker() and repr(unit_executor(3)) == "LocalUnits(workers=3)"


def _fail_on(args):
    if args == "bad":
        raise ValueError("unit bad failed")
    return args


def test_a_failing_unit_stops_the_stage_with_its_own_error(cluster):
    for executor in (LocalUnits(2), DaskUnits(cluster)):
        with pytest.raises(ValueError, match="unit bad failed"):
            list(executor.map(_fail_on, ["a", "bad", "c", "d"], name="fail"))
        assert sorted(r for _, r in executor.map(_fail_on, ["a", "b", "c"], name="ok")) == ["a", "b", "c"]
