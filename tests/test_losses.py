"""tasks.model.losses: chunked cross-entropy equals the full-logits loss (value and gradients); the packed
varlen boundaries; the path bench/train_throughput.py runs on a GPU, here on the tiny model."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

import tiny_lm  # noqa: E402
from corpus2model.tasks.model import losses  # noqa: E402


def test_chunked_cross_entropy_matches_full_logits_in_value_and_gradient():
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False)
    hidden = torch.randn(2, 9, 16, requires_grad=True)
    labels = torch.randint(0, 50, (2, 9))
    labels[0, :3] = -100  # a prompt
    want = torch.nn.functional.cross_entropy(head(hidden[:, :-1]).reshape(-1, 50), labels[:, 1:].reshape(-1))
    want.backward()
    g_h, g_w = hidden.grad.clone(), head.weight.grad.clone()
    hidden.grad, head.weight.grad = None, None
    got, n = losses.chunked_cross_entropy(hidden, head, labels, chunk_tokens=5)
    got.backward()
    assert n == int((labels[:, 1:] != -100).sum()) == 14
    assert float(got.detach()) == pytest.approx(float(want.detach()), rel=1e-6)
    assert torch.allclose(hidden.grad, g_h, atol=1e-6) and torch.allclose(head.weight.grad, g_w, atol=1e-6)


def test_no_targets_gives_zero_loss_with_a_gradient_path():
    hidden = torch.randn(1, 4, 8, requires_grad=True)
    loss, n = losses.chunked_cross_entropy(hidden, torch.nn.Linear(8, 10), torch.full((1, 4), -100))
    loss.backward()
    assert n == 0 and float(loss.detach()) == 0.0 and hidden.grad is not None


def test_varlen_kwargs_cut_at_position_restarts():
    kw = losses.varlen_kwargs(torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]]))
    assert kw["cu_seq_lens_q"].tolist() == [0, 3, 5, 9] and kw["max_length_k"] == 4
    assert kw["cu_seq_lens_q"].dtype == torch.int32


def test_causal_lm_loss_chunked_equals_the_models_own_loss_on_packed_blocks():
    model = tiny_lm.model()
    batch = {k: v[:3] for k, v in tiny_lm.packed_tensors(24).items()}
    assert (batch["position_ids"][:, 1:] == 0).any()  # several documents per block
    full, n_full = losses.causal_lm_loss(model, batch, chunk_tokens=0)
    chunked, n = losses.causal_lm_loss(model, batch, chunk_tokens=16)
    assert n == n_full == losses.target_tokens(batch["labels"]) > 0
    assert float(chunked.detach()) == pytest.approx(float(full.detach()), rel=1e-5)
    chunked.backward()
    assert model.lm_head.weight.grad is not None
