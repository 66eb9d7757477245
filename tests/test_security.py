"""Security rules (issue 9): no unpickling by default, no secrets in logs or artifacts, loopback by default."""
from __future__ import annotations

import logging

import pytest

from corpus2model.tasks.common.security import MASK, RedactingFilter, SecurityError, check_weights, redact, redact_obj


def test_pickle_only_weights_are_refused_unless_allowed(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(SecurityError, match="only pickle checkpoints.*pytorch_model.bin.*model.allow_pickle"):
        check_weights(tmp_path)
    assert check_weights(tmp_path, allow_pickle=True) is False  # allowed: loader may use the .bin


def test_safetensors_win_over_pickle_files_beside_them(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    assert check_weights(tmp_path) is True


def test_secrets_are_masked_in_text_and_objects():
    env = {"HF_TOKEN": "abcDEF123456", "TOKENIZERS_PARALLELISM": "false"}
    text = "login with abcDEF123456; hf_token=zz99zz99 token_accuracy: 0.4321 max_new_tokens=64 hf_" + "a" * 30
    out = redact(text, env)
    assert "abcDEF123456" not in out and "zz99zz99" not in out and "hf_aaaa" not in out
    assert "token_accuracy: 0.4321" in out and "max_new_tokens=64" in out  # metrics are not secrets
    obj = redact_obj({"api_key": "k-123", "token_accuracy": 0.5, "rows": [{"note": "abcDEF123456"}]}, env)
    assert obj == {"api_key": MASK, "token_accuracy": 0.5, "rows": [{"note": MASK}]}


def test_log_records_are_redacted(monkeypatch):
    monkeypatch.setenv("MY_SERVICE_PASSWORD", "s3cr3t-value")
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(self.format(record))

    h = Keep()
    h.addFilter(RedactingFilter())
    log = logging.getLogger("c2m-test-redaction")
    log.addHandler(h)
    log.warning("connecting with %s", "s3cr3t-value")
    log.removeHandler(h)
    assert records == [f"connecting with {MASK}"]



def test_a_pretrained_model_with_only_pickle_weights_is_refused_by_the_loader(tmp_path, make_cfg):
    from corpus2model.tasks.model.modeling import build_model

    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04 would run code when unpickled")
    cfg = make_cfg({"model": {"pretrained": str(tmp_path)}})
    with pytest.raises(SecurityError, match="model.allow_pickle"):
        build_model(cfg.model, tokenizer=None, seq_len=16)
