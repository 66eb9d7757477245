"""quantize: dynamic INT8 from the finetune output, stored without pickle, reloaded exactly."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from tasks import quantize  # noqa: E402
from tasks.modeling import load_causal_lm, quantize_dynamic_int8  # noqa: E402
from tasks.stage import StageContext, StageError, Store, run_stage  # noqa: E402
from test_finetune import chain_config, run_chain  # noqa: E402


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    root = tmp_path_factory.mktemp("quantize")
    # A short run is enough: quantization only needs trained-looking weights.
    cfg = chain_config(root, finetune={"max_steps": 15, "eval_every": 15})
    return cfg, run_chain(root, cfg, upto="quantize")


def test_int8_folder_is_safetensors_and_much_smaller(quantized):
    _, ms = quantized
    m = ms["quantize"]
    out = Path(m.path) / "dynamic_int8"
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "quant_config.json", "tokenizer.json"} <= names
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
    reloaded, tok2 = load_causal_lm(Path(ms["quantize"].path) / "dynamic_int8")
    assert tok2.get_vocab() == tok.get_vocab() and not reloaded.training
    x = tok(["What is 12 plus 30?", "The sum of 4 and 5 is"], add_special_tokens=False)["input_ids"]
    for ids in x:
        t = torch.tensor([ids])
        with torch.inference_mode():
            assert torch.equal(in_memory(input_ids=t).logits, reloaded(input_ids=t).logits)


def test_quantize_rerun_is_a_cache_hit(quantized):
    cfg, ms = quantized
    again = run_stage(quantize, [ms["finetune"]], cfg, StageContext(store=Store(cfg.paths.store)))
    assert again.stats["cache"] == "hit" and again.key == ms["quantize"].key


def test_quantize_names_a_missing_merged_model(quantized, tmp_path):
    import shutil
    import types

    from tasks.stage import Manifest

    cfg, ms = quantized
    broken = Manifest.from_dict(ms["finetune"].to_dict(), path=tmp_path / "ft")
    shutil.copytree(ms["finetune"].path, tmp_path / "ft")
    shutil.rmtree(tmp_path / "ft" / "merged")
    with pytest.raises(StageError, match="merged"):
        quantize.run([broken], types.SimpleNamespace(quantize=cfg.quantize), tmp_path / "out",
                     StageContext(store=Store(tmp_path / "store")))
