"""What must never happen quietly: unpickling weights, running a model repo's code, leaking secrets.

* Weights are safetensors. A folder (or hub snapshot) that only has pickle checkpoints is refused
  with the fix, unless ``model.allow_pickle`` says otherwise: unpickling runs arbitrary code.
* ``trust_remote_code`` stays False unless ``model.trust_remote_code`` is set (tasks/model/modeling.py).
* Secrets: tokens and passwords from the environment or from any mapping key that names one are
  replaced by ``***`` in log records and in anything published (artifacts, summaries), so a run that
  had ``HF_TOKEN`` exported never writes it anywhere.
"""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
SAFE_SUFFIXES = (".safetensors",)

# Names whose values are secrets, in the environment or as keys of a mapping.
# Anchored at the end so "hf_token" is a secret and "token_accuracy" or "max_new_tokens" are not.
_SECRET_NAME = re.compile(
    r"(token|secret|password|passwd|api[_-]?key|access[_-]?key|credentials?|private[_-]?key)$", re.I)
# Shapes of well-known tokens, caught even where their name is not seen (a URL, a traceback).
_TOKEN_SHAPES = re.compile(
    r"\b(hf_[A-Za-z0-9]{20,}|sk-[A-Za-z0-9_-]{20,}|gh[pousr]_[A-Za-z0-9]{20,}|xox[abpr]-[A-Za-z0-9-]{10,}"
    r"|AKIA[0-9A-Z]{16})\b"
)
# "password=..." / "token: ..." inside free text (URLs, connection strings).
_ASSIGNED = re.compile(r"(?i)\b([\w-]*(?:token|secret|password|passwd|api[_-]?key))(\s*[=:]\s*)([^\s&,;'\"]{4,})")
MASK = "***"


class SecurityError(ValueError):
    pass


def weight_files(folder: Path) -> tuple[list[Path], list[Path]]:
    """(safetensors files, pickle checkpoint files) directly in ``folder`` and one level down."""
    folder = Path(folder)
    files = [p for p in list(folder.glob("*")) + list(folder.glob("*/*")) if p.is_file()]
    safe = [p for p in files if p.suffix in SAFE_SUFFIXES]
    pickled = [p for p in files if p.suffix in PICKLE_SUFFIXES and not p.name.startswith("training_args")]
    return safe, pickled


def check_weights(folder: str | Path, allow_pickle: bool = False) -> bool:
    """Raise unless ``folder`` can be loaded without unpickling. Returns whether safetensors must be used
    (True), or pickle is explicitly allowed and is all there is (False). A folder with both kinds loads the
    safetensors: pickle files beside them are ignored, never opened."""
    folder = Path(folder)
    if not folder.is_dir():
        return True  # a hub id: from_pretrained(use_safetensors=True) refuses pickle-only repos by itself
    safe, pickled = weight_files(folder)
    if safe:
        return True
    if pickled and not allow_pickle:
        names = ", ".join(sorted(p.name for p in pickled)[:5])
        raise SecurityError(
            f"{folder} holds only pickle checkpoints ({names}); loading them would run arbitrary code. "
            "Convert them to safetensors (e.g. load once in a trusted sandbox and save_pretrained(..., "
            "safe_serialization=True)), or set model.allow_pickle: true if you trust their origin"
        )
    return not pickled


def load_kwargs(ref: str | Path, allow_pickle: bool = False, trust_remote_code: bool = False) -> dict:
    """``from_pretrained`` keyword arguments for an external model (hub id or folder): safetensors unless
    pickle is explicitly allowed and is all the folder has; remote code only when asked for."""
    use_safetensors = check_weights(ref, allow_pickle)
    return {"use_safetensors": True if use_safetensors else None, "trust_remote_code": bool(trust_remote_code)}


def secret_values(environ: dict | None = None) -> list[str]:
    """Values of environment variables whose names say they are secrets (longest first)."""
    env = os.environ if environ is None else environ
    vals = {v for k, v in env.items() if _SECRET_NAME.search(k) and v and len(v) >= 6}
    return sorted(vals, key=len, reverse=True)


def redact(text: str, environ: dict | None = None) -> str:
    if not isinstance(text, str) or not text:
        return text
    for v in secret_values(environ):
        if v in text:
            text = text.replace(v, MASK)
    text = _TOKEN_SHAPES.sub(MASK, text)
    return _ASSIGNED.sub(lambda m: m.group(1) + m.group(2) + MASK, text)


def redact_obj(obj, environ: dict | None = None):
    """A copy of a JSON-like object with secret-named keys masked and secret values removed from strings."""
    if isinstance(obj, dict):
        return {k: (MASK if isinstance(k, str) and _SECRET_NAME.search(k) and v not in (None, "", False)
                    and not isinstance(v, (dict, list)) else redact_obj(v, environ))
                for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact_obj(v, environ) for v in obj)
    if isinstance(obj, str):
        return redact(obj, environ)
    return obj


class RedactingFilter(logging.Filter):
    """Masks secrets in every record passing a handler (message and args are rendered first)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            msg = record.getMessage()
        except Exception:
            return True
        clean = redact(msg)
        if clean != msg:
            record.msg, record.args = clean, ()
        return True


def install_log_redaction(names: tuple[str, ...] = ("", "prefect", "c2m")) -> None:
    """Attach the filter to every handler of these loggers (a filter on a logger does not see records
    propagated from children; one on the handler sees them all). Idempotent."""
    for name in names:
        for handler in logging.getLogger(name).handlers:
            if not any(isinstance(f, RedactingFilter) for f in handler.filters):
                handler.addFilter(RedactingFilter())
