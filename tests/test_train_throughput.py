"""bench/train_throughput.py stays runnable without a GPU: it refuses (exit 2) without CUDA, and
its packed + chunked-loss step (the finetune stage's code) runs on a tiny shape on CPU."""
from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

from helpers import load_bench  # noqa: E402


@pytest.fixture(scope="module")
def bench():
    return load_bench("train_throughput")


def test_refuses_without_cuda(bench, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench.main([]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_lengths_and_packed_rows_match_the_anchor_data(bench):
    lengths = bench.doc_lengths(4000)
    assert min(lengths) >= 16 and max(lengths) <= 1024 and 270 < sum(lengths) / len(lengths) < 310
    row = next(bench.packed_steps([5, 3, 4], vocab=50, docs_per_step=3))
    assert row["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3]]
    assert [i for i, y in enumerate(row["labels"][0].tolist()) if y == -100] == [0, 5, 8]


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_our_step_runs_on_a_tiny_shape_on_cpu(bench):
    r = bench.run_ours("lora", bench.TINY, steps=2, chunk=64, attn="sdpa", device="cpu", n_docs=12, warmup=1,
                       docs_per_step=2)
    assert r["tokens_per_s"] > 0 and math.isfinite(r["loss_last"]) and r["tokens_trained"] > 0
    # random tokens over a 512 vocabulary: the loss starts near log(512)
    assert abs(r["loss_last"] - math.log(512)) < 1.0
