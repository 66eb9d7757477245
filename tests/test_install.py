"""An installable package: `c2m init DIR` writes a starter config and the sample corpus that run from
DIR, and (slow) a non-editable wheel install passes .ci/wheel_check."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from corpus2model.flows.cli import main
from corpus2model.flows.scaffold import CONFIG_NAME, InitError, init, starter_config
from corpus2model.schemas.config import load_config
from corpus2model.tasks.common.resources import data_path
from corpus2model.tasks.validate import resolve_suite_path
from helpers import ROOT


def test_init_writes_config_and_sample_that_resolve_inside_the_folder(tmp_path, monkeypatch):
    target = tmp_path / "demo"
    made = init(target)
    assert (target / CONFIG_NAME).is_file() and (target / "SOURCE.md").is_file()
    assert (target / "licenses" / "raw_text_corpus-LICENSE.txt").is_file()
    shipped = sorted(p.relative_to(data_path("sample", "raw")) for p in data_path("sample", "raw").rglob("*") if p.is_file())
    written = sorted(p.relative_to(target / "raw") for p in (target / "raw").rglob("*") if p.is_file())
    assert written == shipped and made["files"] >= len(shipped)
    for p in shipped:  # byte for byte (the gzip files too)
        assert (target / "raw" / p).read_bytes() == data_path("sample", "raw", p).read_bytes()

    monkeypatch.chdir(target)  # paths are relative to the working folder
    cfg = load_config(CONFIG_NAME)
    assert (str(cfg.paths.raw), str(cfg.paths.store), str(cfg.paths.registry)) == ("raw", "store", "registry")
    assert cfg.paths.raw.resolve() == (target / "raw").resolve()
    assert resolve_suite_path(cfg.validate_.suite).is_file()  # shipped suites, not the checkout's
    demo = load_config(ROOT / "configs" / "demo.yaml")
    # Everything but the paths is the demo's: same stages, same keys for the same data.
    for section in ("ingest", "clean", "dedup", "augment", "shard", "tokenize", "model", "finetune", "quantize", "evaluate"):
        assert cfg.section(section) == demo.section(section), section


def test_init_refuses_a_non_empty_folder_unless_forced(tmp_path, capsys):
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(InitError, match="not empty"):
        init(tmp_path)
    assert main(["init", str(tmp_path)]) == 1 and "--force" in capsys.readouterr().err
    assert not (tmp_path / CONFIG_NAME).exists()
    assert main(["init", str(tmp_path), "--force"]) == 0
    assert (tmp_path / CONFIG_NAME).is_file() and (tmp_path / "mine.txt").read_text() == "keep me"


def test_starter_config_fails_loudly_when_demo_paths_move():
    with pytest.raises(InitError, match="paths.raw"):
        starter_config("paths:\n  raw: somewhere/else\n  store: data/store\n  registry: data/registry\n")


def test_cli_env_defaults_stay_in_the_working_folder(tmp_path, monkeypatch):
    """Prefect's and Hugging Face's state go under the folder c2m runs from, never beside the code."""
    from corpus2model.flows import cli

    monkeypatch.chdir(tmp_path)
    for k in ("PREFECT_HOME", "HF_HOME"):
        monkeypatch.delenv(k, raising=False)
    cli._project_env()
    for k in ("PREFECT_HOME", "HF_HOME"):
        assert os.environ[k].startswith(str(tmp_path)), k


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_wheel_install_runs_help_init_and_validate():
    """The same check as CI's extra step (.ci/wheel_check): ~1 minute on an idle 2-core machine."""
    p = subprocess.run(["bash", str(ROOT / ".ci" / "wheel_check"), sys.executable], capture_output=True, text=True,
                       timeout=900)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    assert "wheel check passed" in p.stdout
