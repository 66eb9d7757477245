"""quantize: each variant from the finetune output in its own cached unit; dynamic INT8 stored without
pickle and reloaded exactly; ONNX checked in ONNX Runtime; static INT8 calibrated on train blocks."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from corpus2model.flows.stages import STAGES  # noqa: E402
from corpus2model.schemas.config import ConfigError, parse_config  # noqa: E402
from corpus2model.tasks import quantize  # noqa: E402
from corpus2model.tasks.model.export import load_variant  # noqa: E402
from corpus2model.tasks.model.modeling import load_causal_lm, quantize_dynamic_int8  # noqa: E402
from corpus2model.tasks.stage import Manifest, StageContext, StageError, Store, run_stage, stage_key  # noqa: E402
from helpers import chain_config, run_chain  # noqa: E402

METHODS = ["dynamic_int8", "onnx_int8_static", "fp16"]
QUANTIZE = STAGES["quantize"]  # as the stage table declares it: finetune and tokenize in, keyed on finetune


def inputs(ms):
    """quantize's declared inputs, in the table's order."""
    return [ms[s] for s in QUANTIZE.inputs]


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    root = tmp_path_factory.mktemp("quantize")
    # A short run is enough: quantization only needs trained-looking weights.
    cfg = chain_config(root, finetune={"max_steps": 15, "eval_every": 15},
                       quantize={"methods": METHODS, "calibration_samples": 100})
    return cfg, run_chain(root, cfg, upto="quantize")


def test_int8_folder_is_safetensors_and_much_smaller(quantized):
    _, ms = quantized
    m = ms["quantize"]
    out = Path(m.path) / "dynamic_int8"
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "quant_config.json", "tokenizer.json", "variant.json"} <= names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl"))]
    qcfg = json.loads((out / "quant_config.json").read_text())
    assert qcfg["method"] == "dynamic_int8" and qcfg["scheme"] == "per_channel_symmetric"
    assert "lm_head" in qcfg["modules"] and "model.layers.1.mlp.down_proj" in qcfg["modules"]

    s = m.stats
    fp32 = (Path(ms["finetune"].path) / "merged" / "model.safetensors").stat().st_size
    int8 = (out / "model.safetensors").stat().st_size
    assert (s["fp32_bytes"], s["int8_bytes"]) == (fp32, int8)
    assert s["size_ratio"] == pytest.approx(int8 / fp32, abs=1e-4) and s["size_ratio"] < 0.6
    assert 0 < s["max_abs_logit_diff"] < 1.0
    assert {f.role for f in m.files} == {"model", "report"}


def test_reloaded_int8_model_gives_the_in_memory_quantized_logits_exactly(quantized):
    _, ms = quantized
    merged, tok = load_causal_lm(Path(ms["finetune"].path) / "merged")
    in_memory = quantize_dynamic_int8(merged)
    reloaded, tok2 = load_variant(Path(ms["quantize"].path) / "dynamic_int8")
    assert tok2.get_vocab() == tok.get_vocab() and not reloaded.training
    x = tok(["What is 12 plus 30?", "The sum of 4 and 5 is"], add_special_tokens=False)["input_ids"]
    for ids in x:
        t = torch.tensor([ids])
        with torch.inference_mode():
            assert torch.equal(in_memory(input_ids=t).logits, reloaded(input_ids=t).logits)


def test_static_int8_onnx_is_calibrated_on_train_blocks_and_close_to_fp32(quantized):
    _, ms = quantized
    s = ms["quantize"].stats["onnx_int8_static"]
    train_blocks = ms["tokenize"].stats["splits"]["train"]["blocks"] if "splits" in ms["tokenize"].stats else None
    assert s["kind"] == "onnx" and s["dtype"] == "int8"
    assert 0 < s["calibration_sequences"] <= 100
    if train_blocks is not None:
        assert s["calibration_sequences"] == min(100, train_blocks)
    assert s["top1_agreement"] > 0.5  # quantized, but still the same model
    folder = Path(ms["quantize"].path) / "onnx_int8_static"
    assert {"model.onnx", "config.json", "tokenizer.json", "variant.json"} <= {p.name for p in folder.iterdir()}
    import onnx

    ops = {n.op_type for n in onnx.load(str(folder / "model.onnx")).graph.node}
    assert "QLinearMatMul" in ops or "MatMulInteger" in ops  # the MatMuls really run in int8
    # The ONNX variant answers like a model: logits for a batch, of the merged model's shape.
    model, tok = load_variant(folder)
    merged, _ = load_causal_lm(Path(ms["finetune"].path) / "merged")
    ids = torch.tensor([tok("What is 2 plus 3?", add_special_tokens=False)["input_ids"]])
    with torch.inference_mode():
        ref = merged(input_ids=ids).logits
    got = model(input_ids=ids).logits
    assert got.shape == ref.shape and float((got - ref).abs().max()) < 2.0


def test_fp16_variant_is_half_size_and_agrees(quantized):
    _, ms = quantized
    s = ms["quantize"].stats["fp16"]
    assert s["dtype"] == "float16" and 0.45 < s["size_ratio"] < 0.55 and s["top1_agreement"] >= 0.95
    model, _ = load_variant(Path(ms["quantize"].path) / "fp16")
    assert next(model.parameters()).dtype == torch.float16


def test_quantize_rerun_is_a_cache_hit(quantized):
    cfg, ms = quantized
    again = run_stage(QUANTIZE, inputs(ms), cfg, StageContext(store=Store(cfg.paths.store)))
    assert again.stats["cache"] == "hit" and again.key == ms["quantize"].key
    assert again.upstream == {"finetune": ms["finetune"].key, "tokenize": ms["tokenize"].key}


def test_quantize_declares_tokenize_but_keys_on_finetune(make_cfg):
    """Declaring tokenize moved no key: finetune's key already chains tokenize's (tests/test_plan.py holds
    the demo's recorded quantize key); a different finetune output is a different key."""
    cfg = make_cfg()
    ft, tok = Manifest(stage="finetune", key="f1"), Manifest(stage="tokenize", key="t1")
    assert QUANTIZE.inputs == ("finetune", "tokenize") and QUANTIZE.key_inputs == ("finetune",)
    assert stage_key(QUANTIZE, cfg, [ft, tok]) == stage_key(QUANTIZE, cfg, [ft]) == stage_key(quantize, cfg, [ft])
    assert stage_key(QUANTIZE, cfg, [Manifest(stage="finetune", key="f2"), tok])[0] != stage_key(QUANTIZE, cfg, [ft])[0]


def test_quantize_inputs_must_be_finetune_and_the_tokenize_it_trained_on():
    ft = Manifest(stage="finetune", key="f1", upstream={"tokenize": "t1", "shard": "s1"}, path="/ft")
    tok = Manifest(stage="tokenize", key="t1")
    assert quantize.split_inputs([ft, tok]) == (ft, tok)
    assert quantize.split_inputs([tok, ft]) == (ft, tok)  # by stage name, not position
    assert quantize.split_inputs([ft]) == (ft, None)  # only static INT8 needs tokenize
    with pytest.raises(StageError, match="t2 is not the one /ft was trained on \\(t1\\)"):
        quantize.split_inputs([ft, Manifest(stage="tokenize", key="t2")])
    with pytest.raises(StageError, match="optionally, the tokenize"):
        quantize.split_inputs([tok])
    with pytest.raises(StageError, match=r"got \['finetune', 'shard'\]"):
        quantize.split_inputs([ft, Manifest(stage="shard", key="s1")])


def test_static_int8_calibrates_on_the_tokenize_manifest_passed_in(quantized, tmp_path):
    """The calibration blocks come from the tokenize input, not from a store lookup by key: a copy of the
    tokenize output holding 3 train blocks (same key, another folder) calibrates on exactly 3 sequences."""
    import shutil

    import pyarrow.parquet as pq

    cfg, ms = quantized
    tok = ms["tokenize"]
    shutil.copytree(tok.path, tmp_path / "tok")
    blocks = tmp_path / "tok" / "packed" / "train.parquet"
    pq.write_table(pq.read_table(blocks).slice(0, 3), blocks)
    copy = Manifest.from_dict(tok.to_dict(), path=tmp_path / "tok")
    # a calibration seed no other test uses: the static unit is computed here, the other variants reused
    recal = cfg.model_copy(update={"quantize": cfg.quantize.model_copy(update={"calibration_seed": 7})})
    m = run_stage(QUANTIZE, [ms["finetune"], copy], recal, StageContext(store=Store(cfg.paths.store)))
    assert m.stats["computed_files"] == ["onnx_int8_static"]
    assert m.stats["onnx_int8_static"]["calibration_sequences"] == 3


def test_static_int8_without_a_tokenize_input_names_the_declared_inputs(quantized):
    cfg, ms = quantized
    recal = cfg.model_copy(update={"quantize": cfg.quantize.model_copy(update={"calibration_seed": 8})})
    with pytest.raises(StageError, match=r"no tokenize manifest was passed in.*flows/stages.py: finetune, tokenize"):
        run_stage(QUANTIZE, [ms["finetune"]], recal, StageContext(store=Store(cfg.paths.store)))


def test_adding_a_variant_computes_only_that_variant(quantized):
    cfg, ms = quantized
    more = cfg.model_copy(update={"quantize": cfg.quantize.model_copy(update={"methods": METHODS + ["bf16"]})})
    m = run_stage(QUANTIZE, inputs(ms), more, StageContext(store=Store(cfg.paths.store)))
    assert m.stats["cache"] == "computed" and m.key != ms["quantize"].key
    assert m.stats["computed_files"] == ["bf16"] and m.stats["units_reused"] == len(METHODS)
    # the reused variants are the same bytes
    old = {f.path: f.sha256 for f in ms["quantize"].files if f.role == "model"}
    new = {f.path: f.sha256 for f in m.files if f.role == "model" and f.path in old}
    assert new == old
    # a calibration setting recomputes the static variant only
    recal = cfg.model_copy(update={"quantize": cfg.quantize.model_copy(update={"calibration_seed": 1})})
    m2 = run_stage(QUANTIZE, inputs(ms), recal, StageContext(store=Store(cfg.paths.store)))
    assert m2.stats["computed_files"] == ["onnx_int8_static"]


def test_plan_names_the_variants_a_run_would_make(quantized):
    cfg, ms = quantized
    store, ft = Store(cfg.paths.store), ms["finetune"]
    qc = cfg.quantize.model_copy(update={"methods": METHODS + ["onnx_int8_dynamic"]})
    assert quantize.plan_detail(qc, store, ft.key, ft.upstream["tokenize"]) == "1 of 4 variants to make: onnx_int8_dynamic"
    # onnx_fp32 was made once already, as the static variant's starting point
    qc = cfg.quantize.model_copy(update={"methods": ["onnx_fp32"]})
    assert quantize.plan_detail(qc, store, ft.key, ft.upstream["tokenize"]) == "0 of 1 variants to make"


def test_quantize_names_a_missing_merged_model(quantized, tmp_path):
    import shutil
    import types

    from corpus2model.tasks.stage import Manifest

    cfg, ms = quantized
    broken = Manifest.from_dict(ms["finetune"].to_dict(), path=tmp_path / "ft")
    shutil.copytree(ms["finetune"].path, tmp_path / "ft")
    shutil.rmtree(tmp_path / "ft" / "merged")
    with pytest.raises(StageError, match="merged"):
        quantize.run([broken], types.SimpleNamespace(quantize=cfg.quantize), tmp_path / "out",
                     StageContext(store=Store(tmp_path / "store")))


def test_gpu_only_variants_are_a_config_error_naming_the_field():
    with pytest.raises(ConfigError, match=r"quantize.*bnb_4bit.*quantize.device: cuda"):
        parse_config({"quantize": {"methods": ["dynamic_int8", "bnb_4bit"]}})
    with pytest.raises(ConfigError, match="twice"):
        parse_config({"quantize": {"methods": ["fp16", "fp16"]}})
    with pytest.raises(ConfigError, match="quantize.methods"):
        parse_config({"quantize": {"methods": ["int4_awq"]}})


def test_unavailable_gpu_fails_before_any_variant_is_made(quantized, tmp_path):
    import types

    if torch.cuda.is_available():
        pytest.skip("this check is about a machine without CUDA")
    cfg, ms = quantized
    qc = cfg.quantize.model_copy(update={"methods": ["dynamic_int8", "bnb_8bit"], "device": "cuda"})
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(StageError, match="bnb_.*CUDA"):
        quantize.run([ms["finetune"]], types.SimpleNamespace(quantize=qc), out,
                     StageContext(store=Store(tmp_path / "store")))
    assert not list(out.iterdir()) and not (tmp_path / "store" / "_units").exists()  # nothing was made
