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


@pytest.mark.parametrize("chunk_tokens", [0, 16])
def test_a_batch_without_targets_is_zero_not_nan_on_both_loss_paths(chunk_tokens):
    """Best-fit packing groups the prompt-only chunks of long examples into blocks with no target;
    a batch of only those made the model's own (mean) loss 0/0 = NaN and stopped training."""
    model = tiny_lm.model()
    batch = {k: v[:2] for k, v in tiny_lm.packed_tensors(24).items()}
    batch["labels"] = torch.full_like(batch["labels"], -100)
    loss, n = losses.causal_lm_loss(model, batch, chunk_tokens=chunk_tokens)
    loss.backward()
    assert n == 0 and float(loss.detach()) == 0.0
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


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


def test_a_single_chunk_goes_through_the_head_once_and_equals_the_full_logits_loss():
    """One chunk is not recomputed in backward (it would save no memory); several chunks are."""
    torch.manual_seed(0)
    calls = []

    class Head(torch.nn.Linear):
        def forward(self, x):
            calls.append(x.shape[0])
            return super().forward(x)

    head = Head(16, 50, bias=False)
    hidden = torch.randn(1, 12, 16, requires_grad=True)
    labels = torch.randint(0, 50, (1, 12))
    want = torch.nn.functional.cross_entropy(torch.nn.functional.linear(hidden[:, :-1], head.weight).reshape(-1, 50),
                                             labels[:, 1:].reshape(-1))
    got, n = losses.chunked_cross_entropy(hidden, head, labels, chunk_tokens=64)
    got.backward()
    assert calls == [11] and float(got.detach()) == pytest.approx(float(want.detach()), rel=1e-6)
    calls.clear()
    losses.chunked_cross_entropy(hidden, head, labels, chunk_tokens=4)[0].backward()
    assert calls == [4, 4, 3, 3, 4, 4]  # forward, then each chunk again in backward (last first)


def test_document_spans_from_position_restarts_and_from_cu_seq_lens():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 1]])
    assert losses.document_spans(pos) == [[(0, 3), (3, 5), (5, 6)], [(0, 4), (4, 6)]]
    assert losses.document_spans(torch.tensor([[3, 4, 0, 1]])) == [[(0, 2), (2, 4)]]  # a row starting mid-document
    cu = torch.tensor([0, 3, 5, 6, 10, 12], dtype=torch.int32)
    assert losses.document_spans(None, cu, row_length=6) == [[(0, 3), (3, 5), (5, 6)], [(0, 4), (4, 6)]]
    with pytest.raises(ValueError, match="crosses a row"):
        losses.document_spans(None, torch.tensor([0, 4, 8]), row_length=6)


def _tiny_hf(kind: str, **extra):
    import transformers

    cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config,
           "mistral": transformers.MistralConfig}[kind]
    cfg = cls(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=8, max_position_embeddings=128, **extra)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg)


def _two_packed_rows():
    """Row 0: documents of 7, 5 and 8 tokens; row 1: one of 12, then 8 tokens of trailing padding
    (positions restart there, as tokenize pads)."""
    g = torch.Generator().manual_seed(1)
    pos = torch.tensor([list(range(7)) + list(range(5)) + list(range(8)), list(range(12)) + list(range(8))])
    ids = torch.randint(3, 97, (2, 20), generator=g)
    labels = ids.clone()
    labels[pos == 0] = -100
    labels[1, 12:] = -100
    mask = torch.ones_like(ids)
    mask[1, 12:] = 0
    return {"input_ids": ids, "labels": labels, "position_ids": pos, "attention_mask": mask}


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3"])
def test_packed_sdpa_gives_sdpas_loss_and_gradients_on_packed_rows(kind):
    """Per-document sdpa is the block-diagonal mask transformers derives from the position ids, for
    every architecture in PACKED_SDPA_MODEL_TYPES (each passes the position ids to its attention)."""
    model = _tiny_hf(kind)
    batch = _two_packed_rows()
    want, n = losses.causal_lm_loss(model, batch, chunk_tokens=0)
    want.backward()
    g_want = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    assert losses.use_packed_attention(model) and model.config._attn_implementation == losses.PACKED_SDPA
    got, n2 = losses.causal_lm_loss(model, batch, chunk_tokens=8)
    got.backward()
    assert n == n2 and float(got.detach()) == pytest.approx(float(want.detach()), rel=1e-5)
    assert all(torch.allclose(p.grad, g, atol=1e-6) for p, g in zip(model.parameters(), g_want))


def test_packed_sdpa_keeps_documents_apart():
    """Changing the first document of a row leaves the hidden states of the next one unchanged."""
    model = _tiny_hf("llama")
    losses.use_packed_attention(model)
    batch = _two_packed_rows()
    other = {k: v.clone() for k, v in batch.items()}
    other["input_ids"][0, :7] = (other["input_ids"][0, :7] + 1) % 97
    with torch.no_grad():
        a = model.model(**{k: v for k, v in losses.forward_kwargs(batch).items() if k != "labels"}).last_hidden_state
        b = model.model(**{k: v for k, v in losses.forward_kwargs(other).items() if k != "labels"}).last_hidden_state
    assert not torch.allclose(a[0, :7], b[0, :7])
    assert torch.equal(a[0, 7:], b[0, 7:]) and torch.equal(a[1], b[1])


def test_packed_sdpa_leaves_generation_and_saved_configs_as_sdpa(tmp_path):
    import transformers

    model = _tiny_hf("llama").eval()
    x = torch.randint(3, 97, (1, 6), generator=torch.Generator().manual_seed(2))
    want = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=6, do_sample=False)
    losses.use_packed_attention(model)
    got = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=6, do_sample=False)
    assert torch.equal(got, want)
    model.save_pretrained(tmp_path)
    assert losses.PACKED_SDPA not in (tmp_path / "config.json").read_text()
    assert transformers.AutoModelForCausalLM.from_pretrained(tmp_path).config._attn_implementation == "sdpa"


def test_packed_sdpa_is_not_used_where_it_would_be_wrong():
    # Mistral (and any sliding-window config) would lose its window; eager is the caller's choice.
    assert not losses.use_packed_attention(_tiny_hf("mistral"))
    assert not losses.use_packed_attention(_tiny_hf("qwen2", use_sliding_window=True, sliding_window=8))
    eager = _tiny_hf("llama")
    eager.set_attn_implementation("eager")
    assert not losses.use_packed_attention(eager) and eager.config._attn_implementation == "eager"
    # The tiny model of the other tests (modeling.build_model) uses it.
    assert tiny_lm.model().config._attn_implementation == losses.PACKED_SDPA
