"""Shared fixtures: configs pointing into tmp folders, and upstream manifests built from records."""
from __future__ import annotations

import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from corpus2model.schemas.config import parse_config  # noqa: E402
from corpus2model.schemas.records import records_table  # noqa: E402
from corpus2model.tasks.stage import FileEntry, Manifest, StageContext, Store, sha256_file  # noqa: E402

from helpers import ROOT, SHARED  # noqa: E402,F401  (re-exported for fixtures; tests import them from helpers)


@pytest.fixture
def make_cfg(tmp_path):
    """``make_cfg({"clean": {"min_chars": 5}})`` -> a PipelineConfig whose store/raw/registry live in tmp."""

    def _make(overrides: dict | None = None):
        data = {"paths": {"raw": str(tmp_path / "raw"), "store": str(tmp_path / "store"),
                          "registry": str(tmp_path / "registry")}}
        for k, v in (overrides or {}).items():
            if isinstance(v, dict):
                data.setdefault(k, {}).update(v)
            else:
                data[k] = v
        return parse_config(data)

    return _make


@pytest.fixture
def ctx(tmp_path):
    return StageContext(store=Store(tmp_path / "store"))


@pytest.fixture
def records_manifest(tmp_path):
    """Build a fake upstream manifest (role "data") holding ``records``; for stage tests."""
    counter = {"n": 0}

    def _make(records: list[dict], stage: str = "upstream", parts: int = 1) -> Manifest:
        counter["n"] += 1
        folder = tmp_path / f"{stage}-{counter['n']}"
        (folder / "parts").mkdir(parents=True)
        files = []
        step = max(1, -(-len(records) // parts))
        for i in range(parts):
            chunk = records[i * step:(i + 1) * step]
            p = folder / "parts" / f"{i:06d}.parquet"
            pq.write_table(records_table(chunk), p)
            files.append(FileEntry(f"parts/{i:06d}.parquet", p.stat().st_size, sha256_file(p), "data", len(chunk)))
        return Manifest(stage=stage, stage_version="1", key=f"{stage}{counter['n']:04d}", files=files,
                        counters={"in": len(records), "out": len(records), "rejected": {}, "duplicates": 0},
                        path=str(folder))

    return _make


@pytest.fixture(scope="session")
def prefect_harness(tmp_path_factory):
    """One Prefect test server for the whole session (it costs ~20 s to start)."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
