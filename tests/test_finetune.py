"""finetune: the schedule and batch helpers, and the stage on a small learnable dataset
(records -> shard -> tokenize -> finetune, the real upstream stages).

``learnable_records``, ``chain_config`` and ``run_chain`` live in tests/helpers.py (test_quantize.py,
test_evaluate.py and others use them too).
"""
from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pyarrow.parquet as pq
import pytest

torch = pytest.importorskip("torch")

from corpus2model.schemas.config import parse_config  # noqa: E402
from corpus2model.schemas.records import make_record, records_table  # noqa: E402
from corpus2model.flows.stages import STAGES  # noqa: E402
from corpus2model.tasks import finetune  # noqa: E402
from corpus2model.tasks.stage import FileEntry, Manifest, StageContext, Store, run_stage, sha256_file  # noqa: E402
from helpers import UPSTREAM, chain_config, learnable_records, run_chain, validated_manifest  # noqa: E402,F401

# ---------------------------------------------------------------------------------------------
# pure functions
# ---------------------------------------------------------------------------------------------
def test_lr_warms_up_linearly_then_decays_by_cosine():
    peak = 1e-3
    lrs = [finetune.lr_at(s, max_steps=110, warmup_steps=10, peak=peak) for s in range(110)]
    assert lrs[0] == pytest.approx(peak / 10) and lrs[9] == pytest.approx(peak)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:10]))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    # halfway through the decay: the midpoint between peak and the floor
    assert finetune.lr_at(60, 110, 10, peak) == pytest.approx(peak * (0.1 + 0.9 * 0.5))
    assert finetune.lr_at(110, 110, 10, peak) == pytest.approx(peak * 0.1)
    assert finetune.lr_at(0, 5, 0, peak) == pytest.approx(peak)


def test_forward_kwargs_drops_the_mask_only_for_trailing_padding():
    ids = torch.tensor([[5, 6, 7, 0], [5, 6, 7, 8]], dtype=torch.int32)
    batch = {"input_ids": ids, "labels": ids, "position_ids": torch.tensor([[0, 1, 0, 0], [0, 1, 2, 0]]),
             "attention_mask": torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])}
    kw = finetune.forward_kwargs(batch)
    assert "attention_mask" not in kw and kw["input_ids"].dtype == torch.int64 and kw["use_cache"] is False
    batch["attention_mask"] = torch.tensor([[1, 0, 1, 1], [1, 1, 1, 1]])
    assert torch.equal(finetune.forward_kwargs(batch)["attention_mask"], batch["attention_mask"].long())
    assert finetune.target_tokens(torch.tensor([[-100, 3, -100, 4], [1, 2, -100, -100]])) == 3


def test_packed_documents_do_not_attend_to_each_other():
    """Without a 2D mask the position restarts keep documents apart: the second document's logits are
    the same whether or not the first one precedes it in the block."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    m = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=32)).eval()
    doc_a, doc_b = [3, 4, 5, 6], [7, 8, 9]
    packed = {"input_ids": torch.tensor([doc_a + doc_b]), "labels": torch.tensor([doc_a + doc_b]),
              "position_ids": torch.tensor([[0, 1, 2, 3, 0, 1, 2]]), "attention_mask": torch.ones(1, 7)}
    kw = finetune.forward_kwargs(packed)
    kw.pop("labels")
    with torch.inference_mode():
        both = m(**kw).logits[0, 4:]
        alone = m(input_ids=torch.tensor([doc_b])).logits[0]
    assert torch.allclose(both, alone, atol=1e-5)


def test_final_path_names_the_store_folder_run_stage_renames_into(tmp_path):
    store = Store(tmp_path / "store")
    final = store.stage_dir("finetune", "0123456789abcdef01234567")
    ctx = StageContext(store=store, final_dir=final)
    assert finetune.final_path(store.root / "_tmp" / "finetune-x", ctx, "loss.png") == final / "loss.png"
    assert finetune.final_path(tmp_path / "out", StageContext(store=store), "loss.png") == tmp_path / "out" / "loss.png"


# ---------------------------------------------------------------------------------------------
# the stage
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune")
    cfg = chain_config(root)
    return root, cfg, run_chain(root, cfg, upto="finetune")


def test_finetune_loss_goes_down_and_writes_safetensors_only(trained):
    root, cfg, ms = trained
    m = ms["finetune"]
    s = m.stats
    assert s["cache"] == "computed" and s["steps"] == 60
    assert s["final_eval_loss"] < s["initial_eval_loss"] - 0.5, s
    assert s["final_train_loss"] < s["initial_train_loss"] - 0.5, s
    assert 0 < s["trainable_params"] < s["total_params"] and s["tokens_seen"] > 0 and s["tokens_per_s"] > 0
    n_val = ms["tokenize"].stats["splits"]["validation"]["blocks"]
    assert s["eval_blocks"] == min(n_val, cfg.finetune.eval_blocks) > 0 and s["notes"] == []

    out = Path(m.path)
    written = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert not [p for p in written if p.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt"))]
    for f in ("base/model.safetensors", "merged/model.safetensors", "adapter/adapter_model.safetensors",
              "adapter/adapter_config.json", "merged/tokenizer.json", "base/tokenizer.json", "loss.json", "loss.png"):
        assert f in written, f
    roles = {f.path: f.role for f in m.files}
    assert roles["merged/model.safetensors"] == "model" and roles["loss.png"] == "report"
    assert written - {"manifest.json"} == set(roles)

    rows = json.loads((out / "loss.json").read_text())["rows"]
    assert [r["step"] for r in rows] == list(range(61))
    assert rows[0]["eval_loss"] == pytest.approx(s["initial_eval_loss"], abs=1e-5)
    assert [r["step"] for r in rows if r["eval_loss"] is not None] == [0, 20, 40, 60]
    assert all(math.isfinite(r["train_loss"]) and r["lr"] > 0 for r in rows[1:])
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.filterwarnings("ignore::FutureWarning")  # peft calls a renamed transformers method
def test_merged_model_equals_base_plus_adapter(trained):
    from peft import PeftModel

    from corpus2model.tasks.model.modeling import load_causal_lm

    out = Path(trained[2]["finetune"].path)
    merged, tok = load_causal_lm(out / "merged")
    base, _ = load_causal_lm(out / "base")
    with_adapter = PeftModel.from_pretrained(base, str(out / "adapter")).eval()
    x = tok("What is 3 plus 4?", add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        a, b = merged(input_ids=x).logits, with_adapter(input_ids=x).logits
    assert torch.allclose(a, b, atol=1e-4)
    with torch.inference_mode(), with_adapter.disable_adapter():
        c = with_adapter(input_ids=x).logits
    assert not torch.allclose(a, c, atol=1e-3)  # training changed the model


def test_finetune_rerun_is_a_cache_hit_and_a_new_store_reproduces_it(trained, tmp_path):
    root, cfg, ms = trained
    ctx = StageContext(store=Store(cfg.paths.store))
    again = run_stage(STAGES["finetune"], [ms["tokenize"], ms["shard"]], cfg, ctx)
    assert again.stats["cache"] == "hit" and again.key == ms["finetune"].key
    # threads only changes speed: same key
    faster = chain_config(root, finetune={"threads": 1})
    assert run_stage(STAGES["finetune"], [ms["tokenize"], ms["shard"]], faster, ctx).stats["cache"] == "hit"

    # Same inputs and seeds in a fresh store: the same weights, byte for byte.
    cfg2 = chain_config(tmp_path)
    fresh = run_stage(STAGES["finetune"], [ms["tokenize"], ms["shard"]], cfg2, StageContext(store=Store(cfg2.paths.store)))
    assert fresh.stats["cache"] == "computed"
    sha = {f.path: f.sha256 for f in ms["finetune"].files}
    for f in fresh.files:
        if f.path.endswith(".safetensors"):
            assert f.sha256 == sha[f.path], f.path
    assert fresh.stats["final_eval_loss"] == ms["finetune"].stats["final_eval_loss"]


def test_finetune_names_a_bad_target_module(trained, tmp_path):
    from corpus2model.tasks.stage import StageError

    root, _, ms = trained
    cfg = chain_config(tmp_path, finetune={"lora": {"target_modules": ["no_such_proj"]}})
    with pytest.raises(StageError, match="target_modules"):
        run_stage(STAGES["finetune"], [ms["tokenize"], ms["shard"]], cfg, StageContext(store=Store(cfg.paths.store)))
