"""serve: a registered model version behind a small HTTP API (FastAPI + uvicorn).

The app resolves ``ref`` (an alias such as ``production``, or a version) once, when it is
created, and loads that version's variant folder then: a server reports exactly the version it
answers with, and moving the alias takes effect on restart. Prompts are rendered with the
template the model was trained on (the version's ``serve.json``) before generation.

    GET  /health    -> {"status", "model", "version", "variant", "task"}
    GET  /metrics   -> Prometheus text: requests by endpoint and status, latency and batch-size histograms
    POST /generate  {"prompt", "max_new_tokens", "temperature"} -> {"text", ..., "latency_ms"}   (causal LMs)
    POST /classify  {"texts": [...]} -> {"results": [{"label", "score", "scores"}], ..., "batch_size"}  (classifiers)
    POST /score     {"pairs": [{"prompt", "response"}]} -> {"scores": [...], ..., "batch_size"}  (reward models)

Dynamic batching (classifiers): request threads put their texts on a queue; one worker thread takes
what is waiting, up to ``max_batch_size`` texts or ``max_batch_wait_ms`` after the first arrived, sorts
them by length into padded forward passes and hands each request its rows. ``max_batch_size`` 1 is
unbatched serving.
Continuous batching (causal LMs, tasks/model/modeling.py GenerationEngine): one worker thread keeps up
to ``max_batch_size`` prompts decoding together over one KV cache; a prompt joins between decode steps
(prefilled alone) and leaves when it hits eos or its own ``max_new_tokens``. Greedy answers are those of
one-at-a-time generation (row-wise attention over each row's real keys, own position ids, dynamic
INT8 layers quantizing each row alone), so an answer never depends on its batch neighbours.
``max_batch_size`` 1 runs one prompt at a time under a lock through HF ``generate`` (the reference).
Malformed requests get 422 with the field at fault; asking a classifier to generate (or the
reverse) gets 400 naming the endpoint to use.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import queue
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Annotated, Callable

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

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
# Below this, logits / temperature overflows to inf and sampling fails (1e-300 did); anything that small
# means greedy anyway, which is asked for with 0.
MIN_SAMPLING_TEMPERATURE = 0.01


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    max_new_tokens: int = Field(32, ge=1, le=512)
    temperature: float = Field(0.0, ge=0.0, le=2.0, allow_inf_nan=False, description="0 = greedy")
    # A per-task_type adapter (finetune.adapter_per_task_type) applied on the tuned variant; None = none.
    adapter: str | None = Field(None, min_length=1, max_length=100)

    @field_validator("temperature")
    @classmethod
    def _sampling_temperature(cls, t: float) -> float:
        if 0 < t < MIN_SAMPLING_TEMPERATURE:
            raise ValueError(f"temperature must be 0 (greedy) or between {MIN_SAMPLING_TEMPERATURE} and 2")
        return t


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


class ScorePair(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: Annotated[str, StringConstraints(max_length=MAX_PROMPT_CHARS)]
    response: Annotated[str, StringConstraints(min_length=1, max_length=MAX_PROMPT_CHARS)]


class ScoreRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    pairs: list[ScorePair] = Field(min_length=1, max_length=MAX_TEXTS)


class ScoreResponse(BaseModel):
    scores: list[float] = Field(description="r(prompt, response): higher = preferred (pairwise-trained, no fixed scale)")
    model: str
    version: str
    variant: str
    latency_ms: float
    batch_size: int = Field(description="pairs in the forward pass that answered this request")


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
        self.decode_rows = Histogram(BATCH_BUCKETS)

    def request(self, endpoint: str, status: int, seconds: float) -> None:
        endpoint = endpoint if endpoint in ENDPOINTS else "other"  # bounded label values
        with self.lock:
            self.requests[(endpoint, status)] = self.requests.get((endpoint, status), 0) + 1
            self.latency.setdefault(endpoint, Histogram(LATENCY_BUCKETS)).observe(seconds)

    def batch(self, size: int) -> None:
        with self.lock:
            self.batch_size.observe(size)

    def decode_step(self, rows: int) -> None:
        with self.lock:
            self.decode_rows.observe(rows)

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
                    "# HELP c2m_generate_batch_size Prompts in each decode step (continuous batching).",
                    "# TYPE c2m_generate_batch_size histogram", *self.decode_rows.lines("c2m_generate_batch_size"),
                    "# HELP c2m_max_batch_size Configured upper bound of a dynamic batch.",
                    "# TYPE c2m_max_batch_size gauge", f"c2m_max_batch_size {self.max_batch_size}"]
            return "\n".join(out) + "\n"


class CountRequests:
    """ASGI middleware: every HTTP request counted by path and status, with its latency. A plain ASGI
    wrapper because Starlette's ``@app.middleware("http")`` (BaseHTTPMiddleware) runs each request
    through an extra task and memory stream: per-request CPU that batching cannot amortise. An
    exception that escapes the app is counted as the 500 Starlette turns it into (outside this
    middleware)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        status = [500]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.request(scope["path"], status[0], time.perf_counter() - t0)


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
        return self.submit_future(items).result()

    def submit_future(self, items: list) -> Future:
        """A Future of ``submit``'s answer: an async endpoint awaits it without holding a thread."""
        fut: Future = Future()
        self.queue.put((items, fut))
        return fut

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
def _json_safe(error: dict) -> dict:
    """One validation error as strict JSON: loc, msg, type, and the input only where it is representable."""
    out = {k: error[k] for k in ("type", "loc", "msg") if k in error}
    try:
        json.dumps(error.get("input"), allow_nan=False, ensure_ascii=False).encode("utf-8")
        out["input"] = error.get("input")
    except (TypeError, ValueError):
        out["input"] = repr(error.get("input"))
    out["msg"] = out.get("msg", "").encode("utf-8", "backslashreplace").decode("utf-8")  # a msg may quote the input
    return out


def _adapter_context(model, adapters: list[str]):
    """``context(adapter)`` for the generation engine: the named per-task adapter active, or with None the
    adapters disabled (the tuned weights alone), as the one-at-a-time path does."""
    active = [None]

    def context(adapter):
        if not adapters:
            return contextlib.nullcontext()
        if adapter is None:
            return model.disable_adapter()
        if active[0] != adapter:  # set_adapter walks every module: only when it changes
            model.set_adapter(adapter)
            active[0] = adapter
        return contextlib.nullcontext()

    return context


# What a request to the wrong endpoint is told to do instead, by the served model's task.
OTHER_ENDPOINT = {
    "causal_lm": 'POST /generate with {"prompt": ...} instead',
    "classification": 'POST /classify with {"texts": [...]} instead',
    "reward": 'POST /score with {"pairs": [{"prompt": ..., "response": ...}]} instead',
}


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
    if task in ("classification", "reward"):  # a reward model is an encoder with a one-output head
        from corpus2model.tasks.model.classify import load_classifier

        model, tokenizer = load_classifier(folder)
    else:
        from corpus2model.tasks.model.modeling import load_causal_lm

        model, tokenizer = load_causal_lm(folder)
    return {"model": model, "tokenizer": tokenizer, "version": version_dir.name, "variant": variant,
            "template": info.get("prompt_template"), "folder": str(folder), "task": task,
            "max_length": int(info.get("max_length") or 128), "min_prompt_tokens": int(info.get("min_prompt_tokens") or 0)}


def create_app(registry_root: str | Path, name: str, ref: str = "production", variant: str | None = None,
               max_batch_size: int = 16, max_batch_wait_ms: float = 5.0):
    """A FastAPI app serving one resolved version; the model is loaded here, before the first request."""
    from fastapi import FastAPI, HTTPException, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, PlainTextResponse
    from starlette.concurrency import run_in_threadpool

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
    # The one-at-a-time path (max_batch_size 1) runs in the thread pool: one model must not run two generate
    # calls at once.
    lock = threading.Lock()
    batcher = engine = None
    if task == "classification":
        from corpus2model.tasks.model.classify import classify_texts

        batcher = Batcher(lambda texts: classify_texts(model, tokenizer, texts, loaded["max_length"]),
                          max_batch_size, max_batch_wait_ms, on_batch=metrics.batch)
    elif task == "reward":
        from corpus2model.tasks.model.reward import score_texts

        # The truncation the scores were trained with (serve.json): prompt cut from the left, response kept.
        batcher = Batcher(lambda pairs: score_texts(model, tokenizer, [p for p, _ in pairs], [r for _, r in pairs],
                                                    loaded["max_length"], loaded["min_prompt_tokens"]),
                          max_batch_size, max_batch_wait_ms, on_batch=metrics.batch)
    elif max_batch_size > 1:
        from corpus2model.tasks.model.modeling import GenerationEngine

        # One adapter setting per batch: requests naming another adapter wait until the batch drains.
        engine = GenerationEngine(model, tokenizer, max_batch_size, max_batch_wait_ms,
                                  context=_adapter_context(model, adapters), on_step=metrics.decode_step)
    log.info("serving %s %s (%s, %s) from %s", name, loaded["version"], loaded["variant"], task, loaded["folder"])

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        for worker in (engine, batcher):
            if worker is not None:
                worker.close()

    app = FastAPI(title=f"corpus2model: {name}", version=loaded["version"], lifespan=lifespan)
    app.state.batcher = batcher
    app.state.engine = engine

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError):
        # FastAPI's own handler echoes the bad input, and NaN or a lone surrogate cannot be written as
        # strict UTF-8 JSON: the 422 turned into a 500. Echo what serialises, repr() the rest.
        return JSONResponse(status_code=422, content={"detail": [_json_safe(e) for e in exc.errors()]})

    app.add_middleware(CountRequests, metrics=metrics)

    @app.get("/health", response_model=Health)
    def health() -> Health:
        return Health(status="ok", task=task, **ident)

    @app.get("/metrics", response_class=PlainTextResponse)
    def prometheus() -> str:
        return metrics.render()

    def generate_alone(prompt: str, req: GenerateRequest) -> str:
        with lock:
            if req.adapter is not None:
                model.set_adapter(req.adapter)
            with (model.disable_adapter() if adapters and req.adapter is None else contextlib.nullcontext()):
                return generate_text(model, tokenizer, [prompt], max_new_tokens=req.max_new_tokens,
                                     temperature=req.temperature)[0]

    # The model endpoints are async and await their worker's Future: a waiting request holds no pool
    # thread and pays no thread hand-off each way (per-request CPU that batching cannot amortise).
    @app.post("/generate", response_model=GenerateResponse)
    async def generate(req: GenerateRequest) -> GenerateResponse:
        if task != "causal_lm":
            raise HTTPException(400, f"{name} {loaded['version']} is a {task} model: " + OTHER_ENDPOINT[task])
        # Exactly how training text was rendered (tokenize); braces inside the prompt are not re-parsed.
        prompt = template.format(input=req.prompt)
        if req.adapter is not None and req.adapter not in adapters:
            raise HTTPException(400, f"no adapter {req.adapter!r}: {name} {loaded['version']} ({loaded['variant']}) "
                                     f"serves {adapters or 'no per-task adapters'}")
        t0 = time.perf_counter()
        if engine is not None:
            text = await asyncio.wrap_future(engine.submit(prompt, req.max_new_tokens, req.temperature,
                                                           group=req.adapter))
        else:
            text = await run_in_threadpool(generate_alone, prompt, req)
        return GenerateResponse(text=text, latency_ms=round((time.perf_counter() - t0) * 1000, 2), **ident)

    @app.post("/classify", response_model=ClassifyResponse)
    async def classify(req: ClassifyRequest) -> ClassifyResponse:
        if task != "classification":
            raise HTTPException(400, f"{name} {loaded['version']} is a {task} model: " + OTHER_ENDPOINT[task])
        t0 = time.perf_counter()
        results, n = await asyncio.wrap_future(batcher.submit_future(req.texts))
        return ClassifyResponse(results=results, batch_size=n, latency_ms=round((time.perf_counter() - t0) * 1000, 2),
                                **ident)

    @app.post("/score", response_model=ScoreResponse)
    async def score(req: ScoreRequest) -> ScoreResponse:
        if task != "reward":
            raise HTTPException(400, f"{name} {loaded['version']} is a {task} model: " + OTHER_ENDPOINT[task])
        t0 = time.perf_counter()
        scores, n = await asyncio.wrap_future(batcher.submit_future([(p.prompt, p.response) for p in req.pairs]))
        return ScoreResponse(scores=scores, batch_size=n, latency_ms=round((time.perf_counter() - t0) * 1000, 2),
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
    if cfg.serve.threads:  # before the model loads: serve.threads (schemas/config.py says when 1 is faster)
        import torch

        torch.set_num_threads(cfg.serve.threads)
    app = create_app(cfg.paths.registry, cfg.registry.model_name, ref=ref, variant=variant or cfg.serve.variant,
                     max_batch_size=cfg.serve.max_batch_size, max_batch_wait_ms=cfg.serve.max_batch_wait_ms)
    uvicorn.run(app, host=host, port=port, log_level="info")
