"""The training loss and the packed-batch inputs, shared by finetune, DPO and bench/train_throughput.py.

One code path from the CPU tests to the GPU benchmark:

- ``forward_kwargs``: a packed batch (tasks/tokenize.py) as model inputs. Restarted ``position_ids``
  and no 2D mask when padding is only trailing: transformers then derives the block-diagonal causal
  mask (sdpa/eager) or the varlen boundaries (flash-attention) from the position restarts, so a
  document never attends to the one before it in its block.
- ``varlen_kwargs``: the same boundaries as ``cu_seq_lens`` for flash-attention's varlen kernel, for
  callers that pass them explicitly instead of letting transformers find them.
- ``chunked_cross_entropy``: cross-entropy through the output head ``chunk_tokens`` positions at a
  time, each chunk recomputed in backward (activation checkpointing) when there are several, so the
  [tokens, vocab] logits (152k columns for Qwen2) never exist whole: peak extra memory is one chunk's
  logits. Only target positions (label != -100) go through the head at all. With grad_accum > 1 the
  trainer holds every micro-batch's graph until it has all their target counts, so a single-chunk
  micro-batch keeps its log-probabilities (one chunk's worth) until then, like its activations.
- ``causal_lm_loss``: the model's decoder, then the chunked loss; it falls back to the model's own
  loss for methods that add inputs around the decoder (prefix tuning).
- ``PACKED_SDPA`` (``use_packed_attention``): sdpa run once per document of a packed row, each with
  ``is_causal=True``, where plain sdpa gets a dense [T, T] block-diagonal mask. With a mask sdpa
  computes every block of the row (T^2) and no kernel skips the masked ones; per document it computes
  the sum of l_i^2 / 2, 11-15x less attention work on the CPU bench's steps of 8 documents (a LoRA
  step of the CPU bench: 1.23 s against 1.66 s). What flash-attention's varlen kernel does on a GPU,
  for CPUs and GPUs without flash_attn.
"""
from __future__ import annotations

IGNORE_INDEX = -100


def forward_kwargs(batch: dict) -> dict:
    """Model inputs for one packed batch (int64), with the attention mask only where it is needed."""
    ids = batch["input_ids"].long()
    mask = batch["attention_mask"].long()
    kwargs = {"input_ids": ids, "labels": batch["labels"].long(), "position_ids": batch["position_ids"].long(),
              "use_cache": False}
    # Non-increasing along each row = all padding is at the end: no real token can see it (causal)
    # and padding carries no loss, so the mask adds nothing but forces the slow dense-mask path.
    trailing_only = bool((mask[:, 1:] <= mask[:, :-1]).all()) if mask.shape[1] > 1 else True
    if not trailing_only:
        kwargs["attention_mask"] = mask
    return kwargs


def target_tokens(labels) -> int:
    """Tokens that carry loss: the model predicts labels[:, 1:] from positions [:, :-1]."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def varlen_kwargs(position_ids) -> dict:
    """flash-attention varlen arguments for a batch flattened to one row: every position reset to 0
    starts a sequence. ``cu_seq_lens`` are the cumulative boundaries [0, l1, l1+l2, ..., total]."""
    import torch

    flat = position_ids.reshape(-1)
    starts = torch.nonzero(flat == 0, as_tuple=False).reshape(-1)
    if starts.numel() == 0 or int(starts[0]) != 0:
        starts = torch.cat([torch.zeros(1, dtype=starts.dtype, device=starts.device), starts])
    cu = torch.cat([starts, torch.tensor([flat.numel()], dtype=starts.dtype, device=starts.device)]).to(torch.int32)
    max_len = int((cu[1:] - cu[:-1]).max())
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": max_len, "max_length_k": max_len}


def chunked_cross_entropy(hidden, head, labels, chunk_tokens: int = 4096):
    """Mean cross-entropy per target token of ``head(hidden)`` against ``labels`` shifted by one.

    ``hidden`` [B, T, H], ``labels`` [B, T] (-100 = no loss), ``head`` the output projection (any
    module: a peft wrapper around lm_head works). Returns (loss, n_target_tokens); loss is 0 with
    a gradient path when there are no targets (a fully masked micro-batch must not crash a step).
    Chunks are recomputed in backward only when there are several (see below).
    """
    import torch
    import torch.nn.functional as F
    from torch.utils.checkpoint import checkpoint

    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    y = labels[:, 1:].reshape(-1).to(h.device)
    keep = y != IGNORE_INDEX
    n = int(keep.sum())
    if n == 0:
        return hidden.sum() * 0.0, 0
    h, y = h[keep], y[keep]

    def chunk_loss(hc, yc):
        # float32 for the log-softmax: bf16 logits over a 152k vocabulary lose the target's share.
        return F.cross_entropy(head(hc).float(), yc, reduction="sum")

    step = max(1, int(chunk_tokens))
    if n <= step:
        # One chunk holds every target: recomputing it in backward would save no memory (its logits
        # exist whole during the forward either way) and costs one more pass through the head (about
        # a tenth of a LoRA step's FLOPs on the 46M CPU bench model; under the timing noise there).
        return chunk_loss(h, y) / n, n
    total = None
    for i in range(0, n, step):
        hc, yc = h[i:i + step], y[i:i + step]
        part = checkpoint(chunk_loss, hc, yc, use_reentrant=False) if torch.is_grad_enabled() else chunk_loss(hc, yc)
        total = part if total is None else total + part
    return total / n, n


def uses_decoder_directly(model) -> bool:
    """False for peft prompt-learning models (prefix tuning): they build past key/values in their
    own forward, which calling the decoder directly would skip."""
    return not bool(getattr(model, "peft_config", None) and getattr(model, "active_peft_config", None)
                    and model.active_peft_config.is_prompt_learning)


def _decoder_and_head(model):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = getattr(base, "model", None)
    head = base.get_output_embeddings()
    if decoder is None or head is None:
        raise ValueError(f"{type(base).__name__} has no .model decoder and output head: set "
                         "finetune.loss_chunk_tokens: 0 to use the model's own loss")
    return decoder, head


def causal_lm_loss(model, batch: dict, chunk_tokens: int = 0, extra: dict | None = None):
    """(mean loss per target token, n target tokens) for one packed batch.

    ``chunk_tokens`` > 0: decoder + chunked cross-entropy (no full logits); 0: the model's own
    loss (full logits). Both are the same number (tests/test_losses.py)."""
    kw = forward_kwargs(batch)
    labels = kw.pop("labels")
    kw.update(extra or {})
    if chunk_tokens <= 0 or not uses_decoder_directly(model):
        n = target_tokens(labels)
        if n == 0:
            # The model's own loss is a mean over target tokens: 0/0 = NaN (and NaN gradients) for a
            # batch with none, e.g. blocks holding only prompt chunks of a long example. Zero with a
            # gradient path instead, as the chunked loss does.
            return model(**kw).logits.sum() * 0.0, 0
        return model(**kw, labels=labels).loss, n
    decoder, head = _decoder_and_head(model)
    hidden = decoder(**kw).last_hidden_state
    return chunked_cross_entropy(hidden, head, labels, chunk_tokens)


# ---------------------------------------------------------------------------------------------
# packed attention: sdpa once per document
# ---------------------------------------------------------------------------------------------
PACKED_SDPA = "c2m_packed_sdpa"
# Architectures whose attention modules receive the forward's ``position_ids`` (and extra kwargs) as
# flash-attention's varlen path needs them; checked for these by tests/test_losses.py. Any other
# model, and any with sliding-window layers (the per-document path has no window), keeps
# transformers' sdpa and its dense block-diagonal mask.
PACKED_SDPA_MODEL_TYPES = ("llama", "qwen2", "qwen3")


def document_spans(position_ids, cu_seq_lens=None, row_length: int | None = None) -> list[list[tuple[int, int]]]:
    """Per row, the (start, end) of every segment: a segment starts where the position id is 0.

    ``cu_seq_lens`` (flash-attention's cumulative boundaries over the flattened batch) win when given;
    a boundary must then fall on every row start (packed rows always begin a segment)."""
    if cu_seq_lens is not None:
        cu = [int(c) for c in cu_seq_lens.tolist()]
        rows: list[list[tuple[int, int]]] = [[] for _ in range(cu[-1] // row_length)]
        for s, e in zip(cu[:-1], cu[1:]):
            r = s // row_length
            if (e - 1) // row_length != r:
                raise ValueError(f"cu_seq_lens segment [{s}, {e}) crosses a row boundary (row length {row_length})")
            rows[r].append((s - r * row_length, e - r * row_length))
        return rows
    spans = []
    for row in position_ids.tolist():
        starts = [i for i, p in enumerate(row) if p == 0]
        if not starts or starts[0] != 0:
            starts.insert(0, 0)
        spans.append(list(zip(starts, starts[1:] + [len(row)])))
    return spans


def _packed_sdpa(module, query, key, value, attention_mask, **kwargs):
    """transformers attention function: sdpa per document when the row is packed, else plain sdpa.

    The per-document path runs only where transformers' own sdpa would use the causal + same-document
    mask it derives from position restarts: no 2D mask was given and queries and keys are the same
    positions (training, or a prefill without cache). Anything else (padding masks, decoding with a
    cache, prefix tuning's virtual keys) goes to sdpa with the mask ``_packed_sdpa_mask`` built as
    sdpa's, so generation is unchanged."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    q_len, batch = query.shape[2], query.shape[0]
    kwargs.pop("is_causal", None)  # decided here: causal within each document
    cu = kwargs.pop("cu_seq_lens_q", None)
    for k in ("cu_seq_lens_k", "max_length_q", "max_length_k"):
        kwargs.pop(k, None)
    pos = kwargs.get("position_ids")
    if attention_mask is not None or q_len != key.shape[2] or q_len == 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if pos is None and cu is None:
        # The mask function returned None trusting that the position ids would get here; without them
        # a packed row would silently attend across documents.
        raise ValueError(f"{PACKED_SDPA}: the attention got no position_ids; this architecture does not pass "
                         f"them on, so it must use attn_implementation 'sdpa'")
    spans = document_spans(pos.expand(batch, -1) if pos is not None else None, cu, q_len)
    if all(len(r) == 1 for r in spans):
        return sdpa_attention_forward(module, query, key, value, None, is_causal=True, **kwargs)
    outs = []
    for r, row in enumerate(spans):
        for s, e in row:
            o, _ = sdpa_attention_forward(module, query[r:r + 1, :, s:e], key[r:r + 1, :, s:e],
                                          value[r:r + 1, :, s:e], None, is_causal=True, **kwargs)
            outs.append(o)  # [1, e - s, heads, head_dim]
    return torch.cat(outs, dim=1).reshape(batch, q_len, *outs[0].shape[2:]), None


def _packed_sdpa_mask(**kw):
    """No mask when transformers would build the causal (+ same-document) one from position ids:
    ``_packed_sdpa`` reads the documents from the position ids itself. Otherwise sdpa's mask."""
    from transformers.masking_utils import sdpa_mask

    if (kw.get("attention_mask") is None and kw.get("q_length") == kw.get("kv_length")
            and not kw.get("q_offset") and not kw.get("kv_offset")):
        return None
    return sdpa_mask(**kw)


def use_packed_attention(model) -> bool:
    """Switch ``model`` (a transformers or peft model) to PACKED_SDPA when its architecture is one that
    passes position ids to its attention; returns whether it did. Not saved with the model:
    transformers leaves the attention implementation out of config.json."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = base.config
    current = getattr(cfg, "_attn_implementation", None)
    if (getattr(cfg, "model_type", None) not in PACKED_SDPA_MODEL_TYPES or getattr(cfg, "use_sliding_window", False)
            or current not in (None, "sdpa", PACKED_SDPA)):
        return current == PACKED_SDPA
    AttentionInterface.register(PACKED_SDPA, _packed_sdpa)
    AttentionMaskInterface.register(PACKED_SDPA, _packed_sdpa_mask)
    base.set_attn_implementation(PACKED_SDPA)
    return True
