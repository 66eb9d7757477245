"""serve: the FastAPI app on a registered tiny model (TestClient), and one real socket through uvicorn."""
from __future__ import annotations

import socket
import threading
import time

import pytest

from schemas.config import parse_config
from tasks import registry, serve
from tasks.stage import StageError
from test_registry import TEMPLATE, fake_pipeline  # the same fake store outputs the registry tests use


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    cfg = parse_config({"paths": {"registry": str(root / "registry"), "store": str(root / "store")}})
    res = registry.register(fake_pipeline(root), cfg)
    assert res["production"] == "v1"
    return cfg


@pytest.fixture(scope="module")
def client(registered):
    from fastapi.testclient import TestClient

    app = serve.create_app(registered.paths.registry, registered.registry.model_name)
    with TestClient(app) as c:
        yield c


def test_health_reports_the_resolved_version(client, registered):
    r = client.get("/health")
    assert r.status_code == 200
    assert r.json() == {"status": "ok", "model": registered.registry.model_name, "version": "v1",
                        "variant": "dynamic_int8"}


def test_generate_returns_text_and_version(client):
    r = client.post("/generate", json={"prompt": "what is two plus three?", "max_new_tokens": 5})
    assert r.status_code == 200, r.text
    body = r.json()
    assert isinstance(body["text"], str) and body["version"] == "v1" and body["variant"] == "dynamic_int8"
    assert body["latency_ms"] > 0
    # Greedy decoding is deterministic: the same request gives the same text.
    assert client.post("/generate", json={"prompt": "what is two plus three?", "max_new_tokens": 5}).json()["text"] == body["text"]


@pytest.mark.parametrize("payload", [
    {"prompt": "hi", "max_new_tokens": 0},
    {"max_new_tokens": 4},
    {"prompt": "hi", "max_new_tokens": 513},
    {"prompt": "hi", "temperature": -0.1},
    {"prompt": "hi", "temperature": 2.5},
    {"prompt": ""},
    {"prompt": "hi", "unknown": 1},
])
def test_generate_rejects_bad_requests(client, payload):
    assert client.post("/generate", json=payload).status_code == 422


def test_prompt_is_rendered_with_the_version_template(registered, monkeypatch):
    from fastapi.testclient import TestClient

    import tasks.modeling

    seen = []

    def fake_generate(model, tokenizer, prompts, max_new_tokens=32, temperature=0.0):
        seen.append((prompts, max_new_tokens, temperature))
        return ["ok"]

    # create_app binds generate_text when it is called, so patch the module it imports from first.
    monkeypatch.setattr(tasks.modeling, "generate_text", fake_generate)
    app = serve.create_app(registered.paths.registry, registered.registry.model_name, ref="v1", variant="tuned")
    with TestClient(app) as c:
        body = c.post("/generate", json={"prompt": "a {brace}", "max_new_tokens": 3, "temperature": 0.5}).json()
        assert c.get("/health").json()["variant"] == "tuned"
    assert body["text"] == "ok" and body["variant"] == "tuned"
    assert seen == [([TEMPLATE.format(input="a {brace}")], 3, 0.5)]


def test_create_app_errors_are_clear(registered):
    with pytest.raises(StageError, match="no model named 'missing'"):
        serve.create_app(registered.paths.registry, "missing")
    with pytest.raises(StageError, match="no version v9"):
        serve.create_app(registered.paths.registry, registered.registry.model_name, ref="v9")
    with pytest.raises(StageError, match="unknown variant"):
        serve.create_app(registered.paths.registry, registered.registry.model_name, variant="onnx")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_real_socket_roundtrip(registered):
    import httpx
    import uvicorn

    app = serve.create_app(registered.paths.registry, registered.registry.model_name)
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 15
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.05)
        r = httpx.post(f"http://127.0.0.1:{port}/generate", json={"prompt": "the cat", "max_new_tokens": 3}, timeout=30)
        assert r.status_code == 200 and r.json()["version"] == "v1"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    assert not thread.is_alive()


def test_serve_binds_loopback_by_default(registered, monkeypatch):
    import uvicorn

    calls = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.update(kw))
    serve.serve(registered)
    assert (calls["host"], calls["port"]) == ("127.0.0.1", 8000)
    serve.serve(registered, host="127.0.0.2", port=9001, ref="v1")
    assert (calls["host"], calls["port"]) == ("127.0.0.2", 9001)
