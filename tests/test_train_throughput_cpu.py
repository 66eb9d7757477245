"""bench/train_throughput.py --cpu: the anchor's batches are read back exactly, ours trains on them through
the stage's packing, attention and loss, and the rows compare like with like (no timing here)."""
from __future__ import annotations

import importlib.util
import json
import math

import pytest

torch = pytest.importorskip("torch")

from helpers import load_bench  # noqa: E402


@pytest.fixture(scope="module")
def bench():
    return load_bench("train_throughput")


def test_anchor_batches_are_read_back_as_documents(bench):
    flat = {"input_ids": torch.tensor([[5, 6, 7, 8, 9, 4]]), "position_ids": torch.tensor([[0, 1, 2, 0, 1, 0]])}
    assert bench._batch_docs(flat) == [[5, 6, 7], [8, 9], [4]]
    padded = {"input_ids": torch.tensor([[5, 6, 7], [8, 0, 0]]), "attention_mask": torch.tensor([[1, 1, 1], [1, 0, 0]])}
    assert bench._batch_docs(padded) == [[5, 6, 7], [8]]


def test_cpu_anchor_docs_are_the_anchors_dataset(bench):
    """Ours re-draws the anchor's documents (its fallback when no batches were recorded, and the check
    that recorded batches come from the same data): they must equal the anchor's own ``ds``."""
    if not bench.CPU_ANCHOR.is_file():
        pytest.skip(f"no anchor at {bench.CPU_ANCHOR}")
    spec = importlib.util.spec_from_file_location("cpu_baseline", bench.CPU_ANCHOR)
    anchor = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(anchor)  # builds its dataset only; training runs under __main__
    assert bench.cpu_anchor_docs() == [d["input_ids"] for d in anchor.ds]
    assert bench.LLAMA_48M["vocab_size"] == anchor.VOCAB and bench.CPU_WARMUP == anchor.WARMUP


def test_pack_row_is_one_unpadded_row_through_the_tokenize_stage(bench):
    row = bench.pack_row([[11, 12, 13], [14, 15], [16, 17, 18, 19]])
    assert row["input_ids"].tolist() == [[11, 12, 13, 14, 15, 16, 17, 18, 19]]
    assert row["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3]]
    assert row["labels"].tolist() == [[-100, 12, 13, -100, 15, -100, 17, 18, 19]]
    assert row["attention_mask"].sum() == 9


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_ours_trains_on_the_given_batches_in_order_with_packed_attention_and_autocast(bench):
    shape = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, max_position_embeddings=128)
    g = torch.Generator().manual_seed(0)
    steps = [[torch.randint(0, 64, (n,), generator=g).tolist() for n in lens] for lens in ([9, 4], [12, 3, 5], [7, 7])]
    r = bench.run_ours("lora", shape, steps=2, warmup=1, chunk=4096, attn="c2m_packed_sdpa", device="cpu",
                       arch="llama", precision="bf16", step_docs=steps, min_lr_ratio=0.0)
    assert r["tokens_trained"] == 13 + 20 + 14 and r["timed_tokens"] == 20 + 14
    assert len(r["losses"]) == 3 and all(abs(x - math.log(64)) < 1.0 for x in r["losses"])
    assert r["precision"] == "bf16" and r["attn"] == "c2m_packed_sdpa"


def _run(system, method, tps, loss, same=None):
    r = {"system": system, "method": method, "tokens_per_s": tps, "loss_last5": loss, "peak_rss_mb": 1000.0}
    if same is not None:
        r["tokens_per_s_same_tokens"] = same
    return r


def test_cpu_rows_compare_against_the_best_anchor_figure_and_best_repeat(bench):
    runs = [_run("corpus2model", "lora", 700.0, 10.0), _run("corpus2model", "lora", 900.0, 10.05),
            _run("hf trainer + peft (packed)", "lora", 500.0, 10.0, same=560.0),
            _run("hf trainer + peft (padded)", "lora", 300.0, 9.9, same=310.0),
            _run("corpus2model", "full", 600.0, 9.5), _run("hf trainer + peft (packed)", "full", 400.0, 9.5, same=380.0)]
    rows, md = bench.cpu_rows(runs, repeats=2)
    value = {(r["system"], r["metric"]): r["value"] for r in rows}
    # the best repeat of ours over the higher of the packed anchor's two figures
    assert value[("corpus2model", "cpu lora tokens/s vs hf x")] == round(900 / 560, 2)
    assert value[("corpus2model", "cpu full tokens/s vs hf x")] == round(600 / 400, 2)
    assert value[("corpus2model", "cpu lora loss vs hf %")] == round(100 * (10.05 / 10.0 - 1), 2)
    assert value[("hf trainer + peft (padded)", "cpu lora tokens/s")] == 300.0
    assert "cpu lora tokens/s vs hf x" in md


def test_a_cpu_run_keeps_the_gpu_rows_and_the_reverse(bench, tmp_path):
    gpu = [{"system": "corpus2model", "metric": "lora tokens/s", "value": 1.0, "unit": "tokens/s", "config": ""}]
    cpu = [{"system": "corpus2model", "metric": "cpu lora tokens/s", "value": 2.0, "unit": "tokens/s", "config": ""}]
    bench.write_mode("gpu", gpu, "| gpu |", {"meta": {"device": "H100"}}, tmp_path)
    bench.write_mode("cpu", cpu, "| cpu |", {"meta": {"device": "cpu"}}, tmp_path)
    out = json.loads((tmp_path / "train_throughput.json").read_text())
    assert {r["metric"] for r in out["rows"]} == {"lora tokens/s", "cpu lora tokens/s"}
    assert out["gpu_meta"]["device"] == "H100" and out["cpu_meta"]["device"] == "cpu"
    bench.write_mode("cpu", [], "| cpu2 |", {"meta": {}}, tmp_path)
    out = json.loads((tmp_path / "train_throughput.json").read_text())
    assert [r["metric"] for r in out["rows"]] == ["lora tokens/s"] and "| gpu |" in out["notes"]
