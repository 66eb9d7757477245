"""The training loss and the packed-batch inputs, shared by finetune, DPO and bench/train_throughput.py.

One code path from the CPU tests to the GPU benchmark:

- ``forward_kwargs``: a packed batch (tasks/tokenize.py) as model inputs. Restarted ``position_ids``
  and no 2D mask when padding is only trailing: transformers then derives the block-diagonal causal
  mask (sdpa/eager) or the varlen boundaries (flash-attention) from the position restarts, so a
  document never attends to the one before it in its block.
- ``varlen_kwargs``: the same boundaries as ``cu_seq_lens`` for flash-attention's varlen kernel, for
  callers that pass them explicitly instead of letting transformers find them.
- ``chunked_cross_entropy``: cross-entropy through the output head ``chunk_tokens`` positions at a
  time, each chunk recomputed in backward (activation checkpointing), so the [tokens, vocab] logits
  (152k columns for Qwen2) never exist whole: peak extra memory is one chunk's logits. Only target
  positions (label != -100) go through the head at all.
- ``causal_lm_loss``: the model's decoder, then the chunked loss; it falls back to the model's own
  loss for methods that add inputs around the decoder (prefix tuning).
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

    total = None
    step = max(1, int(chunk_tokens))
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
        return model(**kw, labels=labels).loss, n
    decoder, head = _decoder_and_head(model)
    hidden = decoder(**kw).last_hidden_state
    return chunked_cross_entropy(hidden, head, labels, chunk_tokens)
