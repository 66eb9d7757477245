"""`c2m deploy` against a real Prefect server (not the test harness): the deployment exists with
its cron schedule and the config path as its parameter. ~30 s: the server takes ~20 s to start."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import httpx
import pytest

from helpers import ROOT

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(tmp_path):
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    proc = subprocess.Popen([sys.executable, "-m", "corpus2model.flows.cli", "server", "--port", str(port)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    api = f"http://127.0.0.1:{port}/api"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        else:
            pytest.fail("prefect server did not become healthy in 120 s")
        ui = httpx.get(f"http://127.0.0.1:{port}/ui-settings", timeout=5).json()
        assert ui["api_url"] == api  # the UI talks to this server, not the default port
        yield api, env
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)


def test_deploy_creates_a_cron_deployment(server, tmp_path):
    api, env = server
    env = {**env, "PREFECT_API_URL": api}
    config = ROOT / "configs" / "demo.yaml"
    bad = subprocess.run([sys.executable, "-m", "corpus2model.flows.cli", "deploy", str(config), "--cron", "every day", "--no-serve"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "not a valid cron expression" in bad.stderr
    ok = subprocess.run([sys.executable, "-m", "corpus2model.flows.cli", "deploy", str(config), "--cron", "0 3 * * *", "--no-serve"],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr[-2000:]
    (dep,) = httpx.post(f"{api}/deployments/filter", json={}, timeout=10).json()
    assert dep["name"] == "demo" and dep["entrypoint"] == "flows/pipeline.py:pipeline"
    assert dep["parameters"] == {"config_path": str(config.resolve())}
    assert [s["schedule"]["cron"] for s in dep["schedules"]] == ["0 3 * * *"]
    # Accelerator stages share one slot on the real server (runtime.gpu_tag / gpu_concurrency).
    limit = httpx.get(f"{api}/concurrency_limits/tag/c2m-gpu", timeout=10).json()
    assert limit["concurrency_limit"] == 1 and "concurrency limit 'c2m-gpu': 1" in ok.stdout


def test_deploy_without_a_server_says_how_to_start_one():
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    r = subprocess.run([sys.executable, "-m", "corpus2model.flows.cli", "deploy", "configs/demo.yaml", "--cron", "0 3 * * *"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "c2m server" in r.stderr
