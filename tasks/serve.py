"""serve: a registered model version behind a small HTTP API (FastAPI + uvicorn).

The app resolves ``ref`` (an alias such as ``production``, or a version) once, when it is
created, and loads that version's variant folder then: a server reports exactly the version it
answers with, and moving the alias takes effect on restart. Prompts are rendered with the
template the model was trained on (the version's ``serve.json``) before generation.

    GET  /health    -> {"status", "model", "version", "variant"}
    POST /generate  {"prompt", "max_new_tokens", "temperature"} -> {"text", "model", "version", "variant", "latency_ms"}
"""
from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from tasks.registry import VARIANT_DIRS, resolve
from tasks.stage import StageError

log = logging.getLogger("corpus2model.serve")

# Bounds the work one request can ask for; the tiny demo model's context is far shorter anyway
# (generate_text keeps the end of an over-long prompt).
MAX_PROMPT_CHARS = 8192


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    max_new_tokens: int = Field(32, ge=1, le=512)
    temperature: float = Field(0.0, ge=0.0, le=2.0, description="0 = greedy")


class GenerateResponse(BaseModel):
    text: str
    model: str
    version: str
    variant: str
    latency_ms: float


class Health(BaseModel):
    status: str
    model: str
    version: str
    variant: str


def load_version(registry_root: str | Path, name: str, ref: str = "production", variant: str | None = None) -> dict:
    """Resolve ``ref`` and load its variant: {"model", "tokenizer", "version", "variant", "template", "folder"}."""
    from tasks.modeling import load_causal_lm

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
    model, tokenizer = load_causal_lm(folder)
    return {"model": model, "tokenizer": tokenizer, "version": version_dir.name, "variant": variant,
            "template": info["prompt_template"], "folder": str(folder)}


def create_app(registry_root: str | Path, name: str, ref: str = "production", variant: str | None = None):
    """A FastAPI app serving one resolved version; the model is loaded here, before the first request."""
    from fastapi import FastAPI

    from tasks.modeling import generate_text

    loaded = load_version(registry_root, name, ref, variant)
    model, tokenizer, template = loaded["model"], loaded["tokenizer"], loaded["template"]
    ident = {"model": name, "version": loaded["version"], "variant": loaded["variant"]}
    # Endpoints run in a thread pool; one model must not run two generate calls at once.
    lock = threading.Lock()
    log.info("serving %s %s (%s) from %s", name, loaded["version"], loaded["variant"], loaded["folder"])

    app = FastAPI(title=f"corpus2model: {name}", version=loaded["version"])

    @app.get("/health", response_model=Health)
    def health() -> Health:
        return Health(status="ok", **ident)

    @app.post("/generate", response_model=GenerateResponse)
    def generate(req: GenerateRequest) -> GenerateResponse:
        # Exactly how training text was rendered (tokenize); braces inside the prompt are not re-parsed.
        prompt = template.format(input=req.prompt)
        with lock:
            t0 = time.perf_counter()
            text = generate_text(model, tokenizer, [prompt], max_new_tokens=req.max_new_tokens,
                                 temperature=req.temperature)[0]
            latency = (time.perf_counter() - t0) * 1000
        return GenerateResponse(text=text, latency_ms=round(latency, 2), **ident)

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
    app = create_app(cfg.paths.registry, cfg.registry.model_name, ref=ref, variant=variant)
    uvicorn.run(app, host=host, port=port, log_level="info")
