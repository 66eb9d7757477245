"""Knowledge distillation (``finetune.objective: distill``): a student learns a teacher's token distributions.

The student is the model the finetune stage builds from the ``model`` section (smaller, or the same
shape), trained with any ``finetune.method`` through the shared loop (tasks/model/trainer.py) on the
very packed SFT blocks SFT reads: ``setup`` takes the SFT setup's 7-tuple and changes only the loss.
Per target token (label != -100, the positions SFT's cross-entropy covers):

    loss = alpha * T^2 * KL(softmax(t / T) || softmax(s / T)) + (1 - alpha) * CE(s, label)

with ``t``/``s`` the teacher's/student's logits (Hinton et al. 2015; T^2 keeps the soft gradients'
scale independent of T). The teacher's logits are computed per batch under ``no_grad`` with the same
packed-attention inputs (``losses.forward_kwargs``: restarted position ids, documents do not see each
other). With ``finetune.loss_chunk_tokens`` > 0 both heads run ``chunk_tokens`` target positions at
a time and only on target positions (as ``losses.chunked_cross_entropy``), so the two [tokens, vocab]
logit matrices never exist whole; each chunk is recomputed in backward when there are several.

The held-out number the loop evaluates (early stopping, tune) is the student's plain cross-entropy
on the validation blocks, so an SFT run and a distill run of the same student compare directly.

Teacher: ``finetune.distill.teacher`` = ``production`` (the registry's production version of
``registry.model_name``: its ``model/`` folder) or a model folder path. It must share the tokenize
stage's vocabulary: the KL compares distributions over the same token ids.
"""
from __future__ import annotations

from pathlib import Path

from corpus2model.tasks.stage import StageError

IGNORE_INDEX = -100


# ---------------------------------------------------------------------------------------------
# the teacher
# ---------------------------------------------------------------------------------------------
def teacher_folder(ft) -> Path:
    """The teacher's model folder from ``finetune.distill`` (DistillConfig). "production" is found as
    ``finetune.init: production`` finds its parent (tasks/model/continual.py reads the registry's on-disk
    contract: the registry imports the finetune stage, so it cannot be imported from here)."""
    from corpus2model.tasks.model.continual import production_version

    spec = ft.distill.teacher
    if spec == "production":
        name = ft.distill.teacher_model or ft.registry_model
        if ft.registry_root is None or not name:
            raise StageError("finetune.distill.teacher 'production' needs the registry (paths.registry and "
                             "registry.model_name); load the config through corpus2model.schemas.config")
        found = production_version(Path(ft.registry_root), name)
        if found is None:
            raise StageError(f"finetune.distill.teacher 'production': model {name!r} in registry "
                             f"{ft.registry_root} has no production version; register one first, or set "
                             f"finetune.distill.teacher to a model folder")
        folder = Path(ft.registry_root) / name / found[0] / "model"
    else:
        folder = Path(spec)
        if (folder / "model" / "config.json").is_file() and not (folder / "config.json").is_file():
            folder = folder / "model"  # a registry version folder: its merged model
    if not (folder / "config.json").is_file() or not any(folder.glob("*.safetensors")):
        raise StageError(f"finetune.distill.teacher {spec!r}: {folder} holds no config.json and *.safetensors; "
                         f"point it at a saved model folder (config.json, *.safetensors, tokenizer files)")
    return folder


def teacher_identity(folder: Path) -> dict:
    """What makes the teacher this teacher: sha256 over its config and safetensors files."""
    from corpus2model.tasks.model.continual import folder_identity

    return {"distill_teacher_sha256": folder_identity(folder)}


def key_extra(ft) -> dict:
    """The finetune key's part for a distill run: the teacher's identity, or a marker the run turns into
    the teacher_folder error (a plan must not fail because the registry is still empty)."""
    try:
        return teacher_identity(teacher_folder(ft))
    except StageError as e:
        return {"distill_teacher_unresolved": str(e)}


def check_vocab(teacher_tokenizer, student_tokenizer, teacher_model, student_model, teacher_dir: Path,
                student_what: str) -> None:
    """Teacher and student must score the same token ids: same vocabulary and the same logit width."""
    tv, sv = teacher_tokenizer.get_vocab(), student_tokenizer.get_vocab()
    tw = teacher_model.get_output_embeddings().weight.shape[0]
    sw = student_model.get_output_embeddings().weight.shape[0]
    if tv != sv or tw != sw:
        diff = sorted(set(tv.items()) ^ set(sv.items()))[:3]
        raise StageError(f"distillation needs one vocabulary: teacher {teacher_dir} has {len(tv)} tokens "
                         f"({tw} logits), student ({student_what}) has {len(sv)} tokens ({sw} logits)"
                         + (f"; e.g. {diff} differ" if diff else "")
                         + ". Use a teacher trained on this tokenize output's tokenizer")


def load_teacher(folder: Path, device):
    """(teacher model in eval mode with frozen weights and packed attention, its tokenizer)."""
    from corpus2model.tasks.model.losses import use_packed_attention
    from corpus2model.tasks.model.modeling import load_causal_lm

    model, tok = load_causal_lm(folder)
    use_packed_attention(model)
    model.requires_grad_(False)
    return model.to(device).eval(), tok


# ---------------------------------------------------------------------------------------------
# the loss
# ---------------------------------------------------------------------------------------------
def kd_terms(student_logits, teacher_logits, labels, temperature: float):
    """(sum over rows of T^2 * KL(teacher_T || student_T), sum of CE(student, labels)); rows = target positions."""
    import torch.nn.functional as F

    s, t = student_logits.float(), teacher_logits.float()
    log_s = F.log_softmax(s / temperature, -1)
    log_t = F.log_softmax(t / temperature, -1)
    kl = (log_t.exp() * (log_t - log_s)).sum() * temperature ** 2
    return kl, F.cross_entropy(s, labels, reduction="sum")


def _targets(model, kw: dict, keep, chunked: bool):
    """(per-target-position hidden states and the head, or logits and None) for ``model``."""
    from corpus2model.tasks.model.losses import _decoder_and_head, uses_decoder_directly

    if chunked and uses_decoder_directly(model):
        decoder, head = _decoder_and_head(model)
        return decoder(**kw).last_hidden_state[:, :-1][keep], head
    return model(**kw).logits[:, :-1][keep], None


def distill_loss(student, teacher, batch: dict, alpha: float, temperature: float, chunk_tokens: int = 0,
                 extra: dict | None = None):
    """(mean loss per target token, n target tokens) of one packed batch; ``extra``: student-only inputs
    (prefix tuning's 2D mask)."""
    import torch
    from torch.utils.checkpoint import checkpoint

    from corpus2model.tasks.model.losses import forward_kwargs

    kw = forward_kwargs(batch)
    labels = kw.pop("labels")
    y = labels[:, 1:]
    keep = y != IGNORE_INDEX
    n = int(keep.sum())
    chunked = chunk_tokens > 0
    with torch.no_grad():
        t_x, t_head = _targets(teacher, kw, keep, chunked)
    s_x, s_head = _targets(student, {**kw, **(extra or {})}, keep, chunked)
    if n == 0:
        return s_x.sum() * 0.0, 0
    y = y[keep]

    def part(sx, tx, yc):
        with torch.no_grad():
            tl = t_head(tx) if t_head is not None else tx
        kl, ce = kd_terms(s_head(sx) if s_head is not None else sx, tl, yc, temperature)
        return alpha * kl + (1.0 - alpha) * ce

    step = max(1, chunk_tokens) if chunked else n
    if n <= step:
        return part(s_x, t_x, y) / n, n
    total = None
    for i in range(0, n, step):
        args = (s_x[i:i + step], t_x[i:i + step], y[i:i + step])
        p = checkpoint(part, *args, use_reentrant=False) if torch.is_grad_enabled() else part(*args)
        total = p if total is None else total + p
    return total / n, n


def make_loss_fn(teacher, dc, chunk_tokens: int = 0, prefix: bool = False):
    """``loss_fn(model, batch) -> (loss, target tokens)`` for tasks/model/trainer.train."""

    def loss_fn(model, batch):
        extra = {"attention_mask": batch["attention_mask"].long()} if prefix else None
        return distill_loss(model, teacher, batch, dc.alpha, dc.temperature, chunk_tokens, extra)

    return loss_fn


# ---------------------------------------------------------------------------------------------
# the finetune objective
# ---------------------------------------------------------------------------------------------
def setup(sft: tuple, ft, model, tokenizer, student_what: str = "model section"):
    """The finetune 7-tuple for ``objective: distill`` from SFT's (``finetune._sft_setup``): the same
    batches and held-out cross-entropy, the distillation loss. ``extra`` carries the teacher's folder
    and identity (the finetune output records them; evaluate adds the teacher's row)."""
    batches, evaluate, _, n_train, n_val, notes, extra = sft
    folder = teacher_folder(ft)
    device = next(model.parameters()).device
    teacher, teacher_tok = load_teacher(folder, device)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    check_vocab(teacher_tok, tokenizer, teacher, base, folder, student_what)
    loss_fn = make_loss_fn(teacher, ft.distill, ft.loss_chunk_tokens, prefix=ft.method == "prefix")
    from corpus2model.tasks.model.modeling import count_params

    stats = {"teacher_dir": str(folder.resolve()), **teacher_identity(folder), "teacher_params": count_params(teacher),
             "alpha": ft.distill.alpha, "temperature": ft.distill.temperature}
    return batches, evaluate, loss_fn, n_train, n_val, notes, {**extra, "distill": stats, "teacher": teacher}


def teacher_rows(finetune_stats: dict, evaluate_variant, notes: list[str] | None = None) -> list[tuple[dict, list]]:
    """The evaluation table's ``teacher`` row [(row, argmax predictions)] beside the student's rows when the
    finetune output is a distill run, else []. ``evaluate_variant(folder) -> (row, preds)`` is evaluate's
    own scoring (same records, latency probe and columns), so teacher and student compare like for like."""
    d = finetune_stats.get("distill") if finetune_stats.get("objective") == "distill" else None
    if not d:
        return []
    folder = Path(d["teacher_dir"])
    if not (folder / "config.json").is_file():
        if notes is not None:
            notes.append(f"the distillation teacher {folder} is gone: no teacher row")
        return []
    row, preds = evaluate_variant(folder)
    return [({"variant": "teacher", **row, "format": "hf"}, preds)]
