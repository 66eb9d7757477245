"""bench/serve_bench.py's /classify profile: the useful-FLOP count and one profile per shipped variant,
each loaded the way `c2m serve` loads it (the ONNX Runtime INT8 variant included)."""
from __future__ import annotations

import json

import pytest

from helpers import load_bench, tiny_bert_classifier  # noqa: E402


@pytest.fixture(scope="module")
def bench():
    return load_bench("serve_bench")


def test_encoder_flops_counts_the_encoder_linears_on_real_tokens_only(tmp_path, bench):
    import torch

    model, _ = tiny_bert_classifier(tmp_path / "m")
    # Every Linear of the encoder layers, from the modules themselves (not the config the count reads).
    weights = sum(m.in_features * m.out_features for n, m in model.named_modules()
                  if isinstance(m, torch.nn.Linear) and ".encoder.layer." in f".{n}")
    c = model.config
    lengths = [3, 5, 5]
    want = 2.0 * sum(lengths) * weights + 4.0 * (9 + 25 + 25) * c.hidden_size * c.num_hidden_layers
    assert bench.encoder_flops(c, lengths) == want
    # Padding is not useful work: a batch of these lengths counts what the three texts count alone.
    assert bench.encoder_flops(c, lengths) == sum(bench.encoder_flops(c, [n]) for n in lengths)


def test_profile_covers_every_shipped_variant_through_the_serve_loader(tmp_path, bench, monkeypatch):
    from corpus2model.schemas.config import QuantizeConfig
    from corpus2model.tasks.model.classify import onnx_folder, quantize_folder
    from corpus2model.tasks.model.export import OnnxClassifier

    version = tmp_path / "v1"
    tiny_bert_classifier(version / "model")
    quantize_folder(version / "model", version / "dynamic_int8")
    onnx_folder(version / "model", version / "onnx_int8_dynamic", "onnx_int8_dynamic", QuantizeConfig())
    variants = {"onnx_int8_dynamic": "onnx_int8_dynamic", "tuned": "model", "dynamic_int8": "dynamic_int8"}
    (version / "serve.json").write_text(json.dumps({"variants": variants}), encoding="utf-8")
    texts = ["the cat", "der hund läuft und die katze", "the dog runs and the cat runs to the house", "das haus",
             "the house", "die", "the dog and the cat and the house", "der hund", "cat"]
    loaded = []  # the model classes profiled: the ONNX variant must be the ORT session the server runs
    orig = bench.profile_classifier
    monkeypatch.setattr(bench, "profile_classifier",
                        lambda model, *a, **k: loaded.append(type(model)) or orig(model, *a, **k))
    out = bench.profile_variants(version / "onnx_int8_dynamic", texts, max_length=16, repeats=1)
    assert list(out) == ["tuned", "dynamic_int8", "onnx_int8_dynamic"]  # float first, the served ORT one too
    assert loaded[-1] is OnnxClassifier
    for prof in out.values():
        b1, b8, b8a = prof["batch 1"], prof["batch 8 (length-sorted)"], prof["batch 8 (arrival order)"]
        assert prof["texts"] == len(texts) and prof["tokens"] > len(texts) and b1["padding"] == 0.0
        assert b8["padding"] < b8a["padding"]  # sorting by length leaves less padding in the batches of 8
        assert b1["ms_per_text"] > 0 and b8["ms_per_text"] > 0
        assert prof["batch1_share_of_batch8_flop_rate"] == pytest.approx(
            b8["ms_per_text"] / b1["ms_per_text"], rel=0.02, abs=1e-3)  # rounded to 3 places


def test_decode_bound_registry_serves_random_weights_quantized_by_the_quantize_stage_code(tmp_path, bench):
    """/generate's decode-bound part serves a copy of the production version whose weights are those the
    in-process decode-bound engine run uses (random init, seed 0; INT8 by quantize_folder), from a registry
    of its own: the real one is neither read for weights nor written."""
    from pathlib import Path

    import torch

    from corpus2model.flows.serve import load_version
    from corpus2model.schemas.config import parse_config
    from corpus2model.tasks import registry
    from corpus2model.tasks.model.modeling import quantize_dynamic_int8
    from helpers import fake_pipeline

    cfg = parse_config({"paths": {"registry": str(tmp_path / "registry"), "store": str(tmp_path / "store")}})
    registry.register(fake_pipeline(tmp_path), cfg)
    real = load_version(cfg.paths.registry, cfg.registry.model_name, variant="dynamic_int8")
    before = sorted(p.relative_to(tmp_path) for p in (tmp_path / "registry").rglob("*"))
    root = bench.decode_bound_registry(real, cfg, tmp_path / "bench")
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "registry").rglob("*")) == before
    got = load_version(root, cfg.registry.model_name, variant="dynamic_int8")  # production resolves there
    assert (got["version"], got["template"]) == (real["version"], real["template"])
    assert not (Path(got["folder"]).parent / "adapter").exists()  # adapters were trained on the real weights
    ids = torch.tensor([[5, 9, 17, 3, 40]])
    want = quantize_dynamic_int8(bench.random_init_model(real["folder"]))
    with torch.inference_mode():
        served = got["model"](input_ids=ids).logits
        assert torch.equal(served, want(input_ids=ids).logits)
        assert not torch.equal(served, real["model"](input_ids=ids).logits)
    tuned = load_version(root, cfg.registry.model_name, variant="tuned")["model"]
    assert all(torch.equal(a, b) for a, b in zip(tuned.state_dict().values(),
                                                 bench.random_init_model(real["folder"]).state_dict().values()))
    # Tokens/s counts the tokens generated (HF generate's, cut at eos), not the re-tokenized answer text.
    prompts = ["Q: what is two plus three?\nA:", "the cat", "the cat sat on the mat and the cat sat"]
    counted = bench.new_token_counts(got, prompts, 6, size=2)
    eos = got["tokenizer"].eos_token_id
    for prompt, (text, n) in zip(prompts, counted):
        ids = got["tokenizer"](prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.inference_mode():
            new = got["model"].generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                                        do_sample=False, eos_token_id=eos, pad_token_id=eos)[0, ids.shape[1]:].tolist()
        new = new[:new.index(eos)] if eos in new else new
        assert (text, n) == (got["tokenizer"].decode(new, skip_special_tokens=True), len(new))
