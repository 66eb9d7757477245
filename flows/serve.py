"""serve: a registered model version behind a small HTTP API (FastAPI + uvicorn).

The app resolves ``ref`` (an alias such as ``production``, or a version) once, when it is
created, and loads that version's variant folder then: a server reports exactly the version it
answers with, and moving the alias takes effect on restart. Prompts are rendered with the
template the model was trained on (the version's ``serve.json``) before generation.

    GET  /health    -> {"status", "model", "version", "variant", "task"}
    GET  /metrics   -> Prometheus text: requests by endpoint and status, latency and batch-size histograms
    POST /generate  {"prompt", "max_new_tokens", "temperature"} -> {"text", ..., "latency_ms"}   (causal LMs)
    POST /classify  {"texts": [...]} -> {"results": [{"label", "score", "scores"}], ..., "batch_size"}  (classifiers)

Dynamic batching (classifiers): request threads put their texts on a queue; one worker thread takes
what is waiting, up to ``max_batch_size`` texts or ``max_batch_wait_ms`` after the first arrived, runs
one padded forward pass and hands each request its rows. ``max_batch_size`` 1 is unbatched serving.
Generation is not batched: it runs one prompt at a time under a lock (padding a causal batch changes
nothing here for a model this size, and answers must not depend on their batch neighbours).
Malformed requests get 422 with the field at fault; asking a classifier to generate (or the
reverse) gets 400 naming the endpoint to use.
"""
from __future__ import annotations

import contextlib
import json
import logging
import queue
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Annotated, Callable

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from corpus2model.tasks.registry import VARIANT_DIRS, resolve
from corpus2model.tasks.stage import StageError

log = logging.getLogger("corpus2model.serve")

# Bounds the work one request can ask for; the tiny demo model's context is far shorter anyway
# (generate_text keeps the end of an over-long prompt).
MAX_PROMPT_CHARS = 8192
MAX_TEXTS = 64  # texts per /classify request
ENDPOINTS = ("/health", "/metrics", "/generate", "/classify")
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    max_new_tokens: int = Field(32, ge=1, le=512)
    temperature: float = Field(0.0, ge=0.0, le=2.0, description="0 = greedy")
    # A per-task_type adapter (finetune.adapter_per_task_type) applied on the tuned variant; None = none.
    adapter: str | None = Field(None, min_length=1, max_length=100)


class GenerateResponse(BaseModel):
    text: str
    model: str
    version: str
    variant: str
    latency_ms: float


class ClassifyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    texts: list[Annotated[str, StringConstraints(min_length=1, max_length=MAX_PROMPT_CHARS)]] = Field(
        min_length=1, max_length=MAX_TEXTS)


class Prediction(BaseModel):
    label: str
    score: float
    scores: dict[str, float]


class ClassifyResponse(BaseModel):
    results: list[Prediction]
    model: str
    version: str
    variant: str
    latency_ms: float
    batch_size: int = Field(description="texts in the forward pass that answered this request")


class Health(BaseModel):
    status: str
    model: str
    version: str
    variant: str
    task: str = "causal_lm"


# ---------------------------------------------------------------------------------------------
# metrics (Prometheus text format, written by hand: a few counters need no client library)
# ---------------------------------------------------------------------------------------------
class Histogram:
    def __init__(self, buckets):
        self.buckets = tuple(buckets)
        self.counts = [0] * len(self.buckets)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        for i, b in enumerate(self.buckets):
            if value <= b:
                self.counts[i] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str, labels: str = "") -> list[str]:
        sep = "," if labels else ""
        out = [f'{name}_bucket{{{labels}{sep}le="{b}"}} {c}' for b, c in zip(self.buckets, self.counts)]
        out.append(f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.count}')
        lab = f"{{{labels}}}" if labels else ""
        return out + [f"{name}_sum{lab} {self.sum:.6f}", f"{name}_count{lab} {self.count}"]


class Metrics:
    def __init__(self, ident: dict, max_batch_size: int):
        self.lock = threading.Lock()
        self.ident = ident
        self.max_batch_size = max_batch_size
        self.requests: dict[tuple[str, int], int] = {}
        self.latency: dict[str, Histogram] = {}
        self.batch_size = Histogram(BATCH_BUCKETS)

    def request(self, endpoint: str, status: int, seconds: float) -> None:
        endpoint = endpoint if endpoint in ENDPOINTS else "other"  # bounded label values
        with self.lock:
            self.requests[(endpoint, status)] = self.requests.get((endpoint, status), 0) + 1
            self.latency.setdefault(endpoint, Histogram(LATENCY_BUCKETS)).observe(seconds)

    def batch(self, size: int) -> None:
        with self.lock:
            self.batch_size.observe(size)

    def render(self) -> str:
        with self.lock:
            i = self.ident
            out = ["# HELP c2m_model_info The model version this server answers with.", "# TYPE c2m_model_info gauge",
                   f'c2m_model_info{{model="{i["model"]}",version="{i["version"]}",variant="{i["variant"]}"}} 1',
                   "# HELP c2m_requests_total HTTP requests by endpoint and status code.",
                   "# TYPE c2m_requests_total counter"]
            out += [f'c2m_requests_total{{endpoint="{e}",status="{s}"}} {n}' for (e, s), n in sorted(self.requests.items())]
            out += ["# HELP c2m_request_latency_seconds Request latency by endpoint.",
                    "# TYPE c2m_request_latency_seconds histogram"]
            for e, h in sorted(self.latency.items()):
                out += h.lines("c2m_request_latency_seconds", f'endpoint="{e}"')
            out += ["# HELP c2m_batch_size Texts per model forward pass (dynamic batching).",
                    "# TYPE c2m_batch_size histogram", *self.batch_size.lines("c2m_batch_size"),
                    "# HELP c2m_max_batch_size Configured upper bound of a dynamic batch.",
                    "# TYPE c2m_max_batch_size gauge", f"c2m_max_batch_size {self.max_batch_size}"]
            return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------------
# dynamic batching
# ---------------------------------------------------------------------------------------------
class Batcher:
    """Collects concurrent requests into one call of ``fn(items) -> results`` (same length, same order).

    A request is never split: one larger than ``max_batch_size`` runs alone, and a request that would
    overflow the current batch waits for the next. Results go back through futures, so the calling
    (request) thread blocks only on its own answer.
    """

    def __init__(self, fn: Callable[[list], list], max_batch_size: int, max_wait_ms: float,
                 on_batch: Callable[[int], None] | None = None):
        self.fn, self.max_batch_size, self.max_wait = fn, max_batch_size, max_wait_ms / 1000.0
        self.on_batch = on_batch
        self.queue: queue.Queue = queue.Queue()
        self._carry = None
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="c2m-batcher", daemon=True)
        self.thread.start()

    def submit(self, items: list) -> tuple[list, int]:
        """(results for ``items``, size of the batch they ran in)."""
        fut: Future = Future()
        self.queue.put((items, fut))
        return fut.result()

    def close(self) -> None:
        self._stop.set()
        self.queue.put(None)
        self.thread.join(timeout=5)

    def _next(self, timeout: float | None):
        if self._carry is not None:
            job, self._carry = self._carry, None
            return job
        return self.queue.get(timeout=timeout) if timeout is not None else self.queue.get()

    def _loop(self) -> None:
        while not self._stop.is_set():
            first = self._next(None)
            if first is None:
                return
            batch, n = [first], len(first[0])
            deadline = time.perf_counter() + self.max_wait
            while n < self.max_batch_size:
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    break
                try:
                    job = self._next(remaining)
                except queue.Empty:
                    break
                if job is None:
                    self._stop.set()
                    break
                if n + len(job[0]) > self.max_batch_size:
                    self._carry = job
                    break
                batch.append(job)
                n += len(job[0])
            self._run(batch, n)

    def _run(self, batch: list, n: int) -> None:
        items = [x for job, _ in batch for x in job]
        try:
            results = self.fn(items)
        except Exception as e:  # every waiting request gets the error, the worker lives on
            for _, fut in batch:
                fut.set_exception(e)
            return
        if self.on_batch:
            self.on_batch(n)
        i = 0
        for job, fut in batch:
            fut.set_result((results[i:i + len(job)], n))
            i += len(job)


# ---------------------------------------------------------------------------------------------
# loading and the app
# ---------------------------------------------------------------------------------------------
def load_version(registry_root: str | Path, name: str, ref: str = "production", variant: str | None = None) -> dict:
    """Resolve ``ref`` and load its variant: {"model", "tokenizer", "version", "variant", "template", "folder",
    "task", "max_length"}."""
    version_dir = resolve(registry_root, name, ref)
    serve_json = version_dir / "serve.json"
    if not serve_json.is_file():
        raise StageError(f"{version_dir} has no serve.json: it was not written by tasks.registry.register; re-register it")
    info = json.loads(serve_json.read_text(encoding="utf-8"))
    variant = variant or info["serve_variant"]
    if variant not in VARIANT_DIRS:
        raise StageError(f"unknown variant {variant!r}; choose one of {sorted(VARIANT_DIRS)}")
    if variant not in info["variants"]:
        raise StageError(f"{name} {version_dir.name} has no {variant!r} variant; it has {sorted(info['variants'])}")
    folder = version_dir / info["variants"][variant]
    task = info.get("task", "causal_lm")
    if task == "classification":
        from corpus2model.tasks.model.classify import load_classifier

        model, tokenizer = load_classifier(folder)
    else:
        from corpus2model.tasks.model.modeling import load_causal_lm

        model, tokenizer = load_causal_lm(folder)
    return {"model": model, "tokenizer": tokenizer, "version": version_dir.name, "variant": variant,
            "template": info.get("prompt_template"), "folder": str(folder), "task": task,
            "max_length": int(info.get("max_length") or 128)}


def create_app(registry_root: str | Path, name: str, ref: str = "production", variant: str | None = None,
               max_batch_size: int = 16, max_batch_wait_ms: float = 5.0):
    """A FastAPI app serving one resolved version; the model is loaded here, before the first request."""
    from fastapi import FastAPI, HTTPException, Request
    from fastapi.responses import PlainTextResponse

    from corpus2model.tasks.model.modeling import generate_text

    loaded = load_version(registry_root, name, ref, variant)
    model, tokenizer, template, task = loaded["model"], loaded["tokenizer"], loaded["template"], loaded["task"]
    ident = {"model": name, "version": loaded["version"], "variant": loaded["variant"]}
    adapters: list[str] = []
    if task == "causal_lm" and loaded["variant"] == "tuned":
        # Per-task adapters were trained on top of the tuned (merged) weights; they ship in adapter/<task_type>/.
        from corpus2model.tasks.model.peft_methods import load_multi_task, task_adapter_names

        adapter_root = Path(loaded["folder"]).parent / "adapter"
        if task_adapter_names(adapter_root):
            model, tokenizer, adapters = load_multi_task(loaded["folder"], adapter_root)
    metrics = Metrics(ident, max_batch_size)
    # Endpoints run in a thread pool; one model must not run two generate calls at once.
    lock = threading.Lock()
    batcher = None
    if task == "classification":
        from corpus2model.tasks.model.classify import classify_texts

        batcher = Batcher(lambda texts: classify_texts(model, tokenizer, texts, loaded["max_length"]),
                          max_batch_size, max_batch_wait_ms, on_batch=metrics.batch)
    log.info("serving %s %s (%s, %s) from %s", name, loaded["version"], loaded["variant"], task, loaded["folder"])

    app = FastAPI(title=f"corpus2model: {name}", version=loaded["version"])
    app.state.batcher = batcher

    @app.middleware("http")
    async def count(request: Request, call_next):
        t0 = time.perf_counter()
        response = await call_next(request)
        metrics.request(request.url.path, response.status_code, time.perf_counter() - t0)
        return response

    @app.get("/health", response_model=Health)
    def health() -> Health:
        return Health(status="ok", task=task, **ident)

    @app.get("/metrics", response_class=PlainTextResponse)
    def prometheus() -> str:
        return metrics.render()

    @app.post("/generate", response_model=GenerateResponse)
    def generate(req: GenerateRequest) -> GenerateResponse:
        if task != "causal_lm":
            raise HTTPException(400, f"{name} {loaded['version']} is a {task} model: POST /classify with "
                                     f'{{"texts": [...]}} instead')
        # Exactly how training text was rendered (tokenize); braces inside the prompt are not re-parsed.
        prompt = template.format(input=req.prompt)
        if req.adapter is not None and req.adapter not in adapters:
            raise HTTPException(400, f"no adapter {req.adapter!r}: {name} {loaded['version']} ({loaded['variant']}) "
                                     f"serves {adapters or 'no per-task adapters'}")
        with lock:
            t0 = time.perf_counter()
            if req.adapter is not None:
                model.set_adapter(req.adapter)
            with (model.disable_adapter() if adapters and req.adapter is None else contextlib.nullcontext()):
                text = generate_text(model, tokenizer, [prompt], max_new_tokens=req.max_new_tokens,
                                     temperature=req.temperature)[0]
            latency = (time.perf_counter() - t0) * 1000
        return GenerateResponse(text=text, latency_ms=round(latency, 2), **ident)

    @app.post("/classify", response_model=ClassifyResponse)
    def classify(req: ClassifyRequest) -> ClassifyResponse:
        if batcher is None:
            raise HTTPException(400, f"{name} {loaded['version']} is a {task} model: POST /generate with "
                                     f'{{"prompt": ...}} instead')
        t0 = time.perf_counter()
        results, n = batcher.submit(req.texts)
        return ClassifyResponse(results=results, batch_size=n, latency_ms=round((time.perf_counter() - t0) * 1000, 2),
                                **ident)

    return app


def serve(cfg, host: str | None = None, port: int | None = None, ref: str = "production",
          variant: str | None = None) -> None:
    """Run the server for ``cfg.registry.model_name`` on ``cfg.serve.host``:``cfg.serve.port`` (127.0.0.1 by
    default: listening on every interface must be asked for explicitly)."""
    import uvicorn

    host = host or cfg.serve.host
    port = port or cfg.serve.port
    if host in ("0.0.0.0", "::"):
        log.warning("listening on all interfaces (%s): the API has no authentication", host)
    app = create_app(cfg.paths.registry, cfg.registry.model_name, ref=ref, variant=variant or cfg.serve.variant,
                     max_batch_size=cfg.serve.max_batch_size, max_batch_wait_ms=cfg.serve.max_batch_wait_ms)
    uvicorn.run(app, host=host, port=port, log_level="info")
