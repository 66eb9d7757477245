"""export: ONNX export checked in ONNX Runtime, the greedy loop over ORT logits, deterministic
calibration samples, and the registry's gated evaluation report."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

from corpus2model.tasks.model import export  # noqa: E402


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("onnx")
    cfg = LlamaConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=64, max_position_embeddings=64, eos_token_id=1, pad_token_id=0)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    export.export_onnx(model, folder / export.ONNX_FILE, opset=18, example_len=8)
    model.config.to_json_file(folder / "config.json")
    export.write_variant_info(folder, {"variant": "onnx_fp32", "kind": "onnx", "dtype": "float32"})
    return model, folder


def test_onnx_matches_pytorch_at_other_shapes_than_the_export_example(exported):
    model, folder = exported
    ids = torch.randint(0, 120, (3, 21), generator=torch.Generator().manual_seed(1))  # batch 3, seq 21 (export: 2x8)
    with torch.inference_mode():
        ref = model(input_ids=ids, use_cache=False).logits
    out = export.onnx_check(folder / export.ONNX_FILE, ref, ids.numpy(), tolerance=1e-4)
    assert out["max_abs_logit_diff"] <= 1e-4 and out["top1_agreement"] == 1.0
    # a wrong reference is caught, and the message names the tolerance setting
    with pytest.raises(export.ExportError, match="onnx_tolerance"):
        export.onnx_check(folder / export.ONNX_FILE, ref + 0.5, ids.numpy(), tolerance=1e-3)
    # the stack-trace metadata the exporter attaches is gone
    import onnx

    assert not any(n.metadata_props for n in onnx.load(str(folder / export.ONNX_FILE)).graph.node)


def test_greedy_loop_over_ort_logits_equals_hf_greedy_generate(exported):
    model, folder = exported
    onnx_model = export.OnnxCausalLM(folder)
    prompt = torch.tensor([[5, 17, 33, 8]])
    with torch.inference_mode():
        want = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=10,
                              do_sample=False, eos_token_id=1, pad_token_id=0)
    got = onnx_model.generate(input_ids=prompt, max_new_tokens=10, eos_token_id=1)
    assert got.tolist() == want.tolist()
    with pytest.raises(export.ExportError, match="greedy"):
        onnx_model.generate(input_ids=prompt, max_new_tokens=2, do_sample=True)


def test_calibration_sample_is_deterministic_and_strips_padding(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    blocks = [[i + 3] * 10 + [0] * 6 for i in range(50)]  # 10 real tokens, 6 pad
    pq.write_table(pa.table({"input_ids": blocks}), tmp_path / "train.parquet")
    a = export.calibration_sequences(tmp_path / "train.parquet", 20, 12, seed=0)
    b = export.calibration_sequences(tmp_path / "train.parquet", 20, 12, seed=0)
    c = export.calibration_sequences(tmp_path / "train.parquet", 20, 12, seed=1)
    assert [x.tolist() for x in a] == [x.tolist() for x in b] != [x.tolist() for x in c]
    assert len(a) == 20 and len({int(x[0, 0]) for x in a}) == 20  # without replacement
    assert all(x.shape == (1, 10) and x.dtype.name == "int64" for x in a)  # trailing pad removed
    assert len(export.calibration_sequences(tmp_path / "train.parquet", 500, 12)) == 50  # capped at what exists


def test_calibration_merge_interval_is_never_a_divisor_of_the_sample_count():
    assert export.calibration_merge_option(20) == {}  # no merging at all
    for n in (33, 64, 100, 256, 999, 1000):
        every = export.calibration_merge_option(n)["CalibMaxIntermediateOutputs"]
        assert n % every != 0 and every >= export.CALIB_MAX_INTERMEDIATE


def test_check_supported_names_the_missing_pieces():
    if torch.cuda.is_available():
        pytest.skip("about a machine without CUDA")
    with pytest.raises(export.ExportError, match="bnb_4bit.*CUDA"):
        export.check_supported(["dynamic_int8", "bnb_4bit"], "cuda")
    export.check_supported(["dynamic_int8", "onnx_int8_static", "fp16"], "cpu")  # all available here


def test_registry_renders_the_gated_table_and_chart(tmp_path):
    from corpus2model.tasks.registry import gated_report

    report = {"split": "test", "notes": ["a note"],
              "rows": [{"variant": "base", "perplexity": 300.0, "latency_p50_ms": 3.0, "latency_p95_ms": 4.0},
                       {"variant": "tuned", "perplexity": 100.0, "latency_p50_ms": 3.0, "latency_p95_ms": 4.0},
                       {"variant": "dynamic_int8", "perplexity": 103.0, "latency_p50_ms": 1.0, "latency_p95_ms": 2.0},
                       {"variant": "onnx_int8_static", "perplexity": 140.0, "latency_p50_ms": 1.0, "latency_p95_ms": 2.0}]}
    gate = {"passed": True, "metric": "perplexity", "serve_variant": "dynamic_int8", "reason": "all gate checks passed",
            "checks": [{"name": "tuned_vs_base", "value": 100.0, "threshold": 270.0, "passed": True},
                       {"name": "dynamic_int8_vs_tuned", "value": 103.0, "threshold": 110.0, "passed": True}]}
    gated_report(tmp_path, report, gate)
    md = (tmp_path / "eval.md").read_text()
    assert "**PASSED**" in md and "| dynamic_int8 | pass |" in md and "| onnx_int8_static | outside |" in md
    assert "> a note" in md
    assert (tmp_path / "eval.png").read_bytes()[:4] == b"\x89PNG"
    json.dumps(gate)  # the gate stays plain JSON
    assert Path(tmp_path / "eval.png").stat().st_size > 5000
