"""finetune: packed token blocks (SFT) or preference pairs (DPO) -> a tuned model, the base beside it.

A recipe that reads top to bottom (torchtune's single-device recipes, nanoGPT's loop):
build the base model from ``model`` (seeded random init, or ``model.pretrained``), save it as
``base/`` so evaluation can compare against it, make the parameters of ``finetune.method`` trainable
(tasks/model/peft_methods.py: full, LoRA, QLoRA, prefix, IA3, bottleneck adapters), train with the shared
loop (tasks/model/trainer.py: warmup + cosine to a floor, clipping, mixed precision, accumulation,
evaluation, early stopping, resumable checkpoints), then save the adapter and, for mergeable
methods, the merged model. Everything is safetensors.

SFT reads the tokenize stage's packed blocks through Hugging Face ``datasets``; labels are -100
on prompt tokens (tasks/tokenize.py), so the loss is on target tokens only, and each block's
restarted ``position_ids`` keep its documents from attending to each other (tasks/model/losses.py).
DPO (``objective: dpo``) reads the shard stage's preference pairs (or ``finetune.dpo.pairs_path``
when set), trains on the train split, holds out validation, and tokenizes the pairs with the
tokenize stage's tokenizer (tasks/model/dpo.py explains the split and the reference model). ``objective: distill``
trains on the SFT blocks against a teacher's logits (tasks/model/distill.py); ``objective: grpo`` on
sampled completions of the shard's math prompts, scored by a verifiable reward (tasks/model/grpo.py).

Checkpoints go to ``<store>/_checkpoints/finetune/<key>/`` (outside the temp folder that a killed
run loses): running the same config again resumes from the newest one, and they are removed once
the stage output is complete.
"""
from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

from corpus2model.tasks.model import classify, reward
from corpus2model.tasks.model import continual, ewc
from corpus2model.tasks.model.losses import forward_kwargs, target_tokens  # noqa: F401  (re-exported: tests and evaluate use them)
from corpus2model.tasks.model.peft_methods import canonical_adapter_config
from corpus2model.tasks.model.plots import plot_losses
from corpus2model.tasks.model.trainer import lr_at  # noqa: F401
from corpus2model.tasks.stage import FileEntry, Manifest, StageContext, StageError, sha256_file

STAGE = "finetune"
VERSION = "3"  # 3: DPO runs write heldout_pairs.jsonl for evaluate
SECTIONS = ("finetune", "model")

COLUMNS = ("input_ids", "labels", "position_ids", "attention_mask")


def task_of(ft: Manifest) -> str:
    """What a finetune output is: ``causal_lm``, ``classification`` or ``reward``. Decided once, by config
    ``model.task``, and recorded in the output's stats["task"]; quantize, evaluate and the registry
    read this, nothing else. (Causal-LM outputs made before the field was written have none.)"""
    return ft.stats.get("task") or "causal_lm"


def key_extra(cfg, upstream: list[str] = ()) -> dict:
    """Content the config only points at: the objective's files (``objective_key_extra``) and, for
    ``finetune.init`` production/path, the parent version's identity. The parent depends on which training
    data this is (tasks/model/continual.py, the parent rule), so this takes the keyed inputs' keys
    (``["tokenize:<key>"]``, tasks/stage.py stage_sections)."""
    out = objective_key_extra(cfg)
    if cfg.finetune.init != "scratch":
        from corpus2model.tasks.model import continual

        tok_key = next((u.split(":", 1)[1] for u in upstream if u.startswith("tokenize:")), None)
        out = {**out, "continual": continual.key_identity(continual.parent_for(cfg.finetune, tok_key))}
    return out


def objective_key_extra(cfg) -> dict:
    """DPO from a file (finetune.dpo.pairs_path) trains on content the config only points at: its sha256
    is part of the key. ``dpo_split`` names the rule that splits the pairs (the shard stage's, both
    routes; it replaced a seeded shuffle by heldout_fraction, so older DPO outputs are not reused)."""
    ft = cfg.finetune
    if ft.objective == "dpo":
        if ft.dpo.pairs_path and Path(ft.dpo.pairs_path).is_file():
            return {"dpo_pairs_sha256": sha256_file(Path(ft.dpo.pairs_path)), "dpo_split": "shard-rule"}
        return {"dpo_split": "shard-rule"}
    if ft.objective == "distill":  # the teacher (a registry version or a folder) is content the key must name
        from corpus2model.tasks.model import distill

        return distill.key_extra(ft)
    return {}


# ---------------------------------------------------------------------------------------------
# pure functions
# ---------------------------------------------------------------------------------------------
def sft_loss_fn(chunk_tokens: int = 0, prefix: bool = False):
    """``loss_fn(model, batch)`` for packed SFT blocks (tasks/losses.causal_lm_loss).

    Prefix tuning prepends learned keys/values, which transformers cannot fold into a mask derived
    from position restarts; it gets the 2D padding mask (documents in a block then see each other)."""
    from corpus2model.tasks.model.losses import causal_lm_loss

    def loss_fn(model, batch):
        extra = {"attention_mask": batch["attention_mask"].long()} if prefix else None
        return causal_lm_loss(model, batch, chunk_tokens, extra)

    return loss_fn


def evaluate_loss(model, loader, loss_fn=None) -> float:
    """Mean cross-entropy per target token over the whole loader (not a mean of batch means)."""
    import torch

    loss_fn = loss_fn or sft_loss_fn()
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, n = 0.0, 0
    with torch.inference_mode():
        for batch in loader:
            batch = {k: v.to(device) for k, v in batch.items()}
            loss, k = loss_fn(model, batch)
            if k == 0:
                continue
            total += float(loss) * k
            n += k
    if was_training:
        model.train()
    return total / n if n else float("nan")


# ---------------------------------------------------------------------------------------------
# the stage
# ---------------------------------------------------------------------------------------------
def final_path(out_dir: Path, ctx: StageContext, rel: str) -> Path:
    """Where ``out_dir/rel`` will be once run_stage renames the temp folder into the store
    (artifacts link files for people to open after the run); a direct call keeps ``out_dir``."""
    return (ctx.final_dir or out_dir) / rel


def tokenizer_dir(tok: Manifest) -> Path:
    files = tok.files_with("tokenizer")
    if not files:
        raise StageError(f"{tok.path}: no files with role 'tokenizer'; finetune reads the tokenize stage's output")
    return files[0].parent


def packed_files(tok: Manifest) -> dict[str, Path]:
    """Split name -> packed Parquet file (``packed/<split>.parquet``)."""
    return {p.stem: p for p in tok.files_with("packed")}


def _datasets(files: dict[str, Path], cache_dir: Path, eval_blocks: int):
    """(train, validation) ``datasets`` over the packed Parquet files (memory-mapped Arrow, torch format)."""
    import datasets

    datasets.disable_progress_bars()
    if "train" not in files:
        raise StageError("the tokenize output has no packed/train.parquet: nothing to train on")
    data_files = {s: str(p) for s, p in files.items() if s in ("train", "validation")}
    ds = datasets.load_dataset("parquet", data_files=data_files, cache_dir=str(cache_dir))
    notes = []
    train = ds["train"].with_format("torch", columns=list(COLUMNS))
    if len(train) == 0:
        raise StageError(f"{files['train']} holds no blocks: the train split is empty")
    if "validation" in ds and len(ds["validation"]) > 0:
        val = ds["validation"]
    else:
        # Without held-out blocks the "eval" loss is a train loss; say so rather than fail.
        val = ds["train"]
        notes.append("no validation blocks: eval_loss is measured on the train blocks")
    # A fixed prefix: every evaluation scores the same blocks, and its cost does not grow with the data.
    val = val.select(range(min(eval_blocks, len(val)))).with_format("torch", columns=list(COLUMNS))
    return train, val, notes


def checkpoint_dir(ctx: StageContext) -> Path | None:
    """``<store>/_checkpoints/finetune/<key>``: keyed like the output, so only the same run resumes."""
    if ctx.final_dir is None:
        return None
    return ctx.store.root / "_checkpoints" / STAGE / Path(ctx.final_dir).name


def _sft_setup(tok: Manifest, ft, model, cache_dir: Path, parent: "continual.Parent | None" = None):
    from torch.utils.data import DataLoader

    from corpus2model.tasks.model.trainer import Batches

    if "train" not in packed_files(tok) and tok.stats.get("pairs_skipped") and not any(
            s.get("records") for s in (tok.stats.get("splits") or {}).values()):
        # tokenize packs no block for a corpus of preference pairs only (tasks/tokenize.py).
        raise StageError(f"{tok.path}: no packed train blocks: this corpus holds only preference pairs; set "
                         f"finetune.objective: dpo or model.task: reward")
    train, val, notes = _datasets(packed_files(tok), cache_dir, ft.eval_blocks)
    if parent is not None and ft.replay_ratio > 0:  # continual: new blocks + the parent's replayed ones
        train, replay_notes = _replay_mix(train, parent, ft, cache_dir)
        notes += replay_notes
    loss_fn = sft_loss_fn(ft.loss_chunk_tokens, prefix=ft.method == "prefix")
    eval_loader = DataLoader(val, batch_size=ft.batch_size, shuffle=False)
    batches = Batches(len(train), lambda idx: train[idx], ft.batch_size, ft.seed)
    return batches, (lambda: evaluate_loss(model, eval_loader, loss_fn)), loss_fn, len(train), len(val), notes, {}


def shard_of(tok: Manifest) -> Manifest:
    """The shard output a tokenize output was made from (its upstream key, beside it in the store), for
    callers that get only the tokenize manifest (``train_only``, tune trials)."""
    key = (tok.upstream or {}).get("shard")
    folder = tok.dir.parent.parent / "shard" / str(key)
    if not key or not (folder / "manifest.json").is_file():
        raise StageError(f"{tok.path}: the shard output this tokenize output was made from ({folder}) is not in the "
                         f"store; run the shard stage")
    return Manifest.load(folder)


def _dpo_setup(ft, model, tokenizer, out_dir: Path, shard: Manifest):
    """DPO's pairs split by the shard stage's rule (tasks/model/dpo.py): train on ``train``, hold out
    ``validation``. From the shard output's pairs (the data stages' preference records), or from
    finetune.dpo.pairs_path (validated here, split with the shard output's ``stats.split_rule``)."""
    from corpus2model.tasks.model import dpo
    from corpus2model.tasks.model.trainer import Batches

    dropped: list[str] = []
    if ft.dpo.pairs_path is not None:
        rule = shard.stats.get("split_rule")
        if not rule:
            raise StageError(f"{shard.path}: the shard output has no stats.split_rule (made by an older version); "
                             f"rerun the shard stage")
        pairs, dropped = dpo.load_pairs(Path(ft.dpo.pairs_path), out_dir / "pairs_validation", ft.dpo.drop_invalid_pairs)
        by_split, source = dpo.split_pairs(pairs, rule["splits"], rule["seed"]), str(ft.dpo.pairs_path)
    else:
        by_split, source = dpo.shard_pairs(shard), f"the shard output {shard.path}"
        if not any(by_split.values()):
            raise StageError(f"finetune.objective dpo reads preference pairs from the shard stage (pairs/<split>-*.parquet), "
                             f"and {shard.path} holds none: put JSONL lines with prompt/chosen/rejected under paths.raw, "
                             f"or set finetune.dpo.pairs_path to a pairs file")
    train_pairs, held = by_split.get("train") or [], by_split.get(dpo.HELDOUT_SPLIT) or []
    if not train_pairs or not held:
        raise StageError(f"DPO needs pairs in the train and {dpo.HELDOUT_SPLIT} splits (shard.splits); {source} gives "
                         f"{ {k: len(v) for k, v in by_split.items()} }: add pairs or raise shard.splits.{dpo.HELDOUT_SPLIT}")
    if ft.dpo.max_pairs:  # a cap on the training pairs; the held-out pairs stay the whole split
        train_pairs = train_pairs[:ft.dpo.max_pairs]
    # The evaluate stage scores preference accuracy on exactly these pairs (never trained on).
    with open(out_dir / "heldout_pairs.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(p, ensure_ascii=False, sort_keys=True) + "\n" for p in held)
    enc = lambda ps: dpo.encode_pairs(ps, tokenizer, ft.dpo.max_prompt_tokens, ft.dpo.max_response_tokens)  # noqa: E731
    device = next(model.parameters()).device
    train_data = {k: v.to(device) for k, v in enc(train_pairs).items()}
    held_data = {k: v.to(device) for k, v in enc(held).items()}
    train_data.update(dpo.reference_logps(model, train_data, ft.batch_size))
    held_data.update(dpo.reference_logps(model, held_data, ft.batch_size))
    before = dpo.evaluate(model, held_data, ft.dpo.beta, ft.batch_size)
    batches = Batches(len(train_pairs), lambda idx: {k: v[idx] for k, v in train_data.items()}, ft.batch_size, ft.seed)
    evaluate = lambda: dpo.evaluate(model, held_data, ft.dpo.beta, ft.batch_size)["loss"]  # noqa: E731
    extra = {"held_data": held_data, "before": before}
    notes = [f"{len(dropped)} pairs failed validation and were left out (pairs_validation/failing_rows.parquet)"] \
        if dropped else []
    return batches, evaluate, dpo.make_loss_fn(ft.dpo.beta), len(train_pairs), len(held), notes, extra


# ---------------------------------------------------------------------------------------------
# continual fine-tuning (finetune.init, replay_ratio, EWC): tasks/model/continual.py, tasks/model/ewc.py
# ---------------------------------------------------------------------------------------------
def _continual_parent(ft, tok: Manifest) -> tuple["continual.Parent | None", list[str]]:
    """(the version this run continues from, or None for a scratch start; notes saying which and why)."""
    if ft.init == "scratch":
        return None, []
    parent = continual.locate(ft, continual.parent_for(ft, tok.key))
    if parent is None:
        prod = continual.production_version(ft.registry_root, ft.registry_model)
        why = (f"production {prod[0]} was trained from scratch on this very data, so this run is that run again"
               if prod else f"model {ft.registry_model!r} has no production version yet")
        return None, [f"finetune.init production: {why}: trained from the base model (no parent)"]
    continual.check_tokenizer(parent, tokenizer_dir(tok))
    name = parent.ref.get("version") or str(parent.model_dir)
    return parent, [f"continued from {name}: base/ holds its weights (evaluate's base row is the parent)"
                    + ("" if ft.method == "full" else f"; a fresh {ft.method} adapter trained on top of them")]


def _replay_mix(train, parent: "continual.Parent", ft, cache_dir: Path):
    """(the new train blocks plus ``replay_count`` of the parent's stored blocks, notes)."""
    import datasets

    want = continual.replay_count(len(train), ft.replay_ratio)
    path = parent.file(continual.REPLAY)
    if path is None:
        return train, [f"finetune.replay_ratio {ft.replay_ratio}: parent {parent.ref.get('version') or parent.model_dir} "
                       f"stores no {continual.REPLAY} (a plain model folder, or trained with replay_buffer_blocks 0): "
                       f"trained on the new data only"]
    buf = datasets.load_dataset("parquet", data_files={"replay": str(path)}, cache_dir=str(cache_dir))["replay"]
    if len(buf) == 0 or len(buf[0]["input_ids"]) != len(train[0]["input_ids"]):
        raise StageError(f"{path}: its blocks are not {len(train[0]['input_ids'])} tokens long like this run's "
                         f"(tokenize.seq_len changed since the parent); replay needs the same seq_len, or set "
                         f"finetune.replay_ratio: 0")
    idx = continual.pick(len(buf), want, ft.seed)
    mixed = datasets.concatenate_datasets([train.with_format(None).select_columns(list(COLUMNS)),
                                           buf.select(idx).select_columns(list(COLUMNS))])
    note = (f"replay: {len(idx)} of the parent's {len(buf)} stored blocks mixed into {len(train)} new ones "
            f"(replay_ratio {ft.replay_ratio})" + (" (the buffer repeated: it holds fewer)" if want > len(buf) else ""))
    return mixed.with_format("torch", columns=list(COLUMNS)), [note]


def _with_ewc(model, loss_fn, ft, parent: "continual.Parent | None", notes: list[str]):
    """(the loss with the EWC penalty toward the parent when finetune.ewc_lambda > 0, what was applied)."""
    if ft.ewc_lambda <= 0 or parent is None:
        return loss_fn, None
    path = parent.file(continual.FISHER)
    if path is None:
        notes.append(f"finetune.ewc_lambda {ft.ewc_lambda}: parent {parent.ref.get('version') or parent.model_dir} "
                     f"stores no {continual.FISHER} (it was trained with finetune.init: scratch or ewc_fisher_blocks 0, "
                     f"or is a plain model folder): no EWC penalty in this run; this run's version stores one, so "
                     f"the next continuation has it")
        return loss_fn, {"lambda": ft.ewc_lambda, "applied": False}
    terms = ewc.terms(model, ewc.load(path), continual.parent_state(parent))
    if not terms:
        notes.append("finetune.ewc_lambda: no weight this run trains has a Fisher entry in the parent: no EWC penalty")
    return ewc.penalized(loss_fn, terms, ft.ewc_lambda), {"lambda": ft.ewc_lambda, "applied": bool(terms),
                                                         "weights": len(terms)}


def _continual_outputs(model, batches, ft, out_dir: Path, parent: "continual.Parent | None", merged_dir: str | None,
                       notes: list[str]) -> tuple[list[FileEntry], dict]:
    """What this version keeps for the runs that continue from it (replay blocks, Fisher), and the parent's
    lineage and test records for evaluate's forgetting rows and the registry (files, stats)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from corpus2model.tasks.tokenize import PACKED_SCHEMA

    files: list[FileEntry] = []
    info: dict = {}
    if parent is not None and parent.version_dir is not None:
        (out_dir / continual.PARENT_DIR).mkdir(exist_ok=True)
        for name in (continual.LINEAGE, continual.TEST_RECORDS):
            if parent.file(name) is not None:
                shutil.copyfile(parent.file(name), out_dir / continual.PARENT_DIR / name)
                files.append(FileEntry(f"{continual.PARENT_DIR}/{name}", role="continual"))
    packed = all(c in batches.get([0]) for c in COLUMNS)
    if not packed:
        notes.append(f"objective {ft.objective} trains on no packed blocks: no replay blocks or Fisher are stored")
        return files, info
    if ft.replay_buffer_blocks:
        idx = continual.pick(batches.n, min(ft.replay_buffer_blocks, batches.n), ft.seed)
        rows = batches.get(idx)
        table = pa.table({c: [r.tolist() for r in rows[c].to(dtype=torch.int32)] for c in COLUMNS},
                         schema=PACKED_SCHEMA)
        pq.write_table(table, out_dir / continual.REPLAY)
        files.append(FileEntry(continual.REPLAY, role="continual", records=len(idx)))
        info["replay_buffer_blocks"] = len(idx)
    if ft.ewc_fisher_blocks and ft.method in ("full", "lora", "qlora"):
        from corpus2model.tasks.model import peft_methods
        from corpus2model.tasks.model.losses import use_packed_attention
        from corpus2model.tasks.model.modeling import load_causal_lm

        names = ewc.trainable_weight_names(model)
        if ft.method == "full":
            weights = model
        elif merged_dir is not None:
            weights, _ = load_causal_lm(out_dir / merged_dir)
        else:
            weights, _ = peft_methods.merge_saved(out_dir / "base", out_dir / "adapter")
        use_packed_attention(weights)  # the attention training used: documents of a block apart
        idx = continual.pick(batches.n, min(ft.ewc_fisher_blocks, batches.n), ft.seed + 1)
        fisher, used = ewc.fisher_diagonal(weights, (batches.get([i]) for i in idx), sft_loss_fn(ft.loss_chunk_tokens),
                                           names)
        ewc.save(fisher, out_dir / continual.FISHER, {"blocks": used, "method": ft.method})
        files.append(FileEntry(continual.FISHER, role="continual"))
        info["fisher_blocks"] = used
        info["fisher_weights"] = len(names)
        info["fisher_mean"] = float(sum(float(f.sum()) for f in fisher.values())
                                    / max(1, sum(f.numel() for f in fisher.values())))
    elif ft.ewc_fisher_blocks:
        notes.append(f"method {ft.method} has no merged-weight form: no Fisher stored (EWC needs full, lora or qlora)")
    return files, info


def task_type_blocks(tok: Manifest, shard: Manifest, tokenizer, split: str, task_types: list[str]) -> dict[str, dict]:
    """task_type -> packed blocks (tensors) of ``split``'s records of that type, packed as the
    tokenize stage packs (same template, seq_len and tokenizer). Reads the shard stage's Parquet
    (through ``datasets``): the shard input, the one the tokenize output was made from."""
    import datasets
    import torch

    from corpus2model.tasks.tokenize import encode_records, pack

    paths = [str(shard.dir / e["path"]) for e in shard.stats.get("shards", {}).get(split, [])]
    if not paths:
        return {}
    template, seq_len = tok.stats["prompt_template"], int(tok.stats["seq_len"])
    datasets.disable_progress_bars()
    ds = datasets.load_dataset("parquet", data_files={split: paths}, split=split, streaming=True)
    by_type: dict[str, dict[str, list]] = {}
    for batch in ds.select_columns(["input", "target", "metadata"]).iter(batch_size=1000):
        for i, t, m in zip(batch["input"], batch["target"], batch["metadata"]):
            tt = (m or {}).get("task_type") or "unknown"
            if task_types and tt not in task_types:
                continue
            d = by_type.setdefault(tt, {"input": [], "target": []})
            d["input"].append(i)
            d["target"].append(t)
    out = {}
    for tt, recs in sorted(by_type.items()):
        blocks = pack(encode_records(recs, tokenizer, template), seq_len, tokenizer.pad_token_id)
        if blocks:
            out[tt] = {k: torch.tensor([b[k] for b in blocks], dtype=torch.long) for k in COLUMNS}
    return out


def train_task_adapters(merged, tok: Manifest, shard: Manifest, tokenizer, ft, ckpt: Path | None, save_dir: Path,
                        log=None) -> dict:
    """One LoRA adapter per task_type on ``merged`` (base + shared adapter), each trained on its own
    task's blocks and saved to ``save_dir/<task_type>/``; returns task_type -> summary."""
    import warnings

    import torch
    from peft import get_peft_model
    from torch.utils.data import DataLoader

    from corpus2model.tasks.model import peft_methods, trainer

    if ft.method != "lora":
        raise StageError(f"finetune.adapter_per_task_type needs method lora (got {ft.method})")
    train = task_type_blocks(tok, shard, tokenizer, "train", list(ft.task_types))
    val = task_type_blocks(tok, shard, tokenizer, "validation", list(ft.task_types))
    missing = [t for t in ft.task_types if t not in train]
    if missing:
        raise StageError(f"finetune.task_types {missing} have no train records (found {sorted(train)})")
    loss_fn = sft_loss_fn(ft.loss_chunk_tokens)
    out = {}
    model = None
    for tt, data in train.items():
        torch.manual_seed(ft.seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            if model is None:
                model = get_peft_model(merged, peft_methods.peft_config(ft), adapter_name=tt)
            else:
                model.add_adapter(tt, peft_methods.peft_config(ft))
        model.set_adapter(tt)  # only this adapter trains
        v = val.get(tt) or data
        v = {k: x[:ft.eval_blocks] for k, x in v.items()}
        loader = DataLoader([{k: x[i] for k, x in v.items()} for i in range(v["input_ids"].shape[0])],
                            batch_size=ft.batch_size)
        batches = trainer.Batches(data["input_ids"].shape[0], lambda idx, d=data: {k: x[idx] for k, x in d.items()},
                                  ft.batch_size, ft.seed)
        res = trainer.train(model, batches, lambda: evaluate_loss(model, loader, loss_fn), ft, loss_fn,
                            ckpt_dir=(ckpt / f"task-{tt}") if ckpt else None, log=log)
        out[tt] = {"train_blocks": int(data["input_ids"].shape[0]), "initial_eval_loss": round(res["initial_eval_loss"], 6),
                   "final_eval_loss": round(res["final_eval_loss"], 6), "steps": res["steps"]}
    if model is not None:
        model.save_pretrained(str(save_dir), safe_serialization=True)  # named adapters -> save_dir/<name>/
        for cfg_file in sorted(Path(save_dir).rglob("adapter_config.json")):
            canonical_adapter_config(cfg_file)
    return out


def train_only(tok: Manifest, ft, mc, on_eval=None, work_dir: Path | None = None) -> dict:
    """Train exactly as the stage does and keep no files: one hyperparameter-search trial
    (flows/tune.py), from the same start (``finetune.init``: the parent's weights, its replay blocks and
    EWC penalty). Returns tasks.model.trainer.train's result; ``on_eval(step, loss) -> True`` prunes."""
    import torch

    from corpus2model.tasks.model import peft_methods, trainer
    from corpus2model.tasks.model.modeling import build_model, save_model
    from corpus2model.tasks.tokenize import load_tokenizer

    seq_len = int(tok.stats.get("seq_len") or 0)
    tokenizer = load_tokenizer(tokenizer_dir(tok))
    parent, _ = _continual_parent(ft, tok)  # finetune.init: a trial starts where the stage would
    threads_before = torch.get_num_threads()
    if ft.threads > 0:
        torch.set_num_threads(ft.threads)
    try:
        with tempfile.TemporaryDirectory(prefix="c2m-trial-", dir=work_dir) as tmp:
            tmp = Path(tmp)
            model = build_model(mc, tokenizer, seq_len)
            if parent is not None:
                continual.load_weights(model, parent)
            if ft.method == "qlora":
                save_model(model, tokenizer, tmp / "base")
            if torch.cuda.is_available() and ft.method != "qlora":
                model = model.to("cuda")
            model = peft_methods.prepare(model, ft, tmp / "base")
            if ft.objective == "dpo":
                batches, evaluate, loss_fn, *_ = _dpo_setup(ft, model, tokenizer, tmp, shard_of(tok))
            elif ft.objective == "distill":
                from corpus2model.tasks.model import distill

                batches, evaluate, loss_fn, *_ = distill.setup(_sft_setup(tok, ft, model, tmp / "hf-cache", parent), ft,
                                                               model, tokenizer)
            elif ft.objective == "grpo":
                from corpus2model.tasks.model import grpo

                batches, evaluate, loss_fn, *_ = grpo.setup(tok, shard_of(tok), ft, model, tokenizer)
            else:
                batches, evaluate, loss_fn, *_ = _sft_setup(tok, ft, model, tmp / "hf-cache", parent)
            loss_fn, _ = _with_ewc(model, loss_fn, ft, parent, [])
            return trainer.train(model, batches, evaluate, ft, loss_fn, on_eval=on_eval, progress=False)
    finally:
        torch.set_num_threads(threads_before)


def run(inputs: list[Manifest], cfg, out_dir: Path, ctx: StageContext) -> Manifest:
    if len(inputs) != 2:
        raise StageError(f"finetune takes the tokenize and shard outputs, got {[u.stage for u in inputs]}")
    if cfg.model.task == "classification":  # encoder classifiers (model.task): tasks/model/classify.py
        return classify.finetune_run(inputs, cfg, out_dir, ctx)
    if cfg.model.task == "reward":  # a reward model on the shard's preference pairs: tasks/model/reward.py
        return reward.finetune_run(inputs, cfg, out_dir, ctx, checkpoint_dir(ctx))
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from corpus2model.tasks.model import peft_methods, trainer
    from corpus2model.tasks.common.artifacts import publish_image, publish_markdown
    from corpus2model.tasks.model.modeling import build_model, save_model
    from corpus2model.tasks.tokenize import load_tokenizer

    tok, shard = inputs
    ft, mc = cfg.finetune, cfg.model
    seq_len = int(tok.stats.get("seq_len") or 0)
    if seq_len <= 0:
        raise StageError(f"{tok.path}: the tokenize manifest has no stats.seq_len")
    if ft.method == "qlora":
        peft_methods.check_qlora_available()  # before any work: it can only fail on CPU
    tokenizer = load_tokenizer(tokenizer_dir(tok))
    ckpt = checkpoint_dir(ctx)
    parent, continual_notes = _continual_parent(ft, tok)  # finetune.init: tasks/model/continual.py

    threads_before = torch.get_num_threads()
    if ft.threads > 0:
        torch.set_num_threads(ft.threads)
    t_start = time.perf_counter()
    extra = {}
    try:
        model = build_model(mc, tokenizer, seq_len)
        if parent is not None:  # warm start: base/ is the parent, what evaluate's base row and a merge start from
            continual.load_weights(model, parent)
        save_model(model, tokenizer, out_dir / "base")
        if torch.cuda.is_available() and ft.method != "qlora":
            model = model.to("cuda")
        model = peft_methods.prepare(model, ft, out_dir / "base")
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())

        with tempfile.TemporaryDirectory(prefix="hf-datasets-", dir=out_dir.parent) as cache_dir:
            if ft.objective == "dpo":
                batches, evaluate, loss_fn, n_train, n_val, notes, extra = _dpo_setup(ft, model, tokenizer, out_dir, shard)
            elif ft.objective == "distill":
                from corpus2model.tasks.model import distill

                batches, evaluate, loss_fn, n_train, n_val, notes, extra = distill.setup(
                    _sft_setup(tok, ft, model, Path(cache_dir), parent), ft, model, tokenizer)
            elif ft.objective == "grpo":
                from corpus2model.tasks.model import grpo

                batches, evaluate, loss_fn, n_train, n_val, notes, extra = grpo.setup(tok, shard, ft, model, tokenizer)
            else:
                batches, evaluate, loss_fn, n_train, n_val, notes, extra = _sft_setup(tok, ft, model, Path(cache_dir), parent)
            loss_fn, ewc_info = _with_ewc(model, loss_fn, ft, parent, notes)  # eval loss stays the plain loss
            result = trainer.train(model, batches, evaluate, ft, loss_fn, ckpt_dir=ckpt, log=ctx.info)
            if ft.objective == "dpo":
                from corpus2model.tasks.model import dpo

                extra["after"] = dpo.evaluate(model, extra["held_data"], ft.dpo.beta, ft.batch_size)

        model = model.to("cpu") if ft.method != "qlora" else model
        merged_dir = None
        if ft.method == "full":
            model.eval()
            save_model(model, tokenizer, out_dir / "merged")
            merged_dir = "merged"
        adapter_dir = "adapter" if peft_methods.save_adapter(model, ft.method, out_dir / "adapter") else None
        multi = ft.adapter_per_task_type and ft.objective == "sft"
        if adapter_dir and (ft.merge or multi) and peft_methods.mergeable(ft.method):
            merged, _ = peft_methods.merge_saved(out_dir / "base", out_dir / "adapter")
            save_model(merged, tokenizer, out_dir / "merged")
            merged_dir = "merged"
        task_adapters = {}
        if multi:
            # Task adapters sit on top of merged/ (base + shared adapter): what the registry ships as the
            # tuned model, so serving applies a task adapter to the very weights it was trained on.
            if merged_dir is None:
                raise StageError("finetune.adapter_per_task_type needs method lora (a mergeable shared adapter)")
            task_adapters = train_task_adapters(merged, tok, shard, tokenizer, ft, ckpt, out_dir / "adapter",
                                                log=ctx.info)
        continual_files, continual_info = ([], {}) if ft.init == "scratch" else \
            _continual_outputs(model, batches, ft, out_dir, parent, merged_dir, notes)
    finally:
        torch.set_num_threads(threads_before)
    seconds = time.perf_counter() - t_start

    history = result["history"]
    (out_dir / "loss.json").write_text(json.dumps({"rows": history}, indent=1), encoding="utf-8")
    plot_losses(history, out_dir / "loss.png",
                {"dpo": "DPO loss per pair", "grpo": "GRPO loss per completion token (eval: -mean held-out reward)",
                 "distill": "distillation loss (eval: cross-entropy) per target token"}.get(
                    ft.objective, "cross-entropy per target token"))

    files = []
    for folder in ("base", "adapter", "merged"):
        for p in sorted((out_dir / folder).rglob("*")):
            if p.is_file():
                files.append(FileEntry(p.relative_to(out_dir).as_posix(), role="model"))
    for p in sorted((out_dir / "pairs_validation").rglob("*")) if (out_dir / "pairs_validation").is_dir() else []:
        if p.is_file():
            files.append(FileEntry(p.relative_to(out_dir).as_posix(), role="report"))
    files += [FileEntry("loss.json", role="report"), FileEntry("loss.png", role="report")]
    if (out_dir / "heldout_pairs.jsonl").is_file():
        files.append(FileEntry("heldout_pairs.jsonl", role="report"))
    files += continual_files
    bad = [f.path for f in files if f.path.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt"))]
    if bad:
        raise StageError(f"finetune wrote pickled weights {bad}: only safetensors may leave this stage")

    tokens_per_s = result["tokens_seen"] / result["train_seconds"] if result["train_seconds"] > 0 else None
    stats = {
        "task": mc.task,  # causal_lm (task_of)
        "method": ft.method,
        "objective": ft.objective,
        "initial_train_loss": round(result["initial_train_loss"], 6),
        "final_train_loss": round(result["final_train_loss"], 6),
        "initial_eval_loss": round(result["initial_eval_loss"], 6),
        "final_eval_loss": round(result["final_eval_loss"], 6),
        "best_eval_loss": round(result["best_eval_loss"], 6),
        "steps": result["steps"],
        "stopped_early": result["stopped_early"],
        "resumed_from_step": result["resumed_from"],
        "tokens_seen": result["tokens_seen"],
        "tokens_per_s": round(tokens_per_s, 1) if tokens_per_s else None,
        "steps_per_s": round(result["steps"] / result["train_seconds"], 3) if result["train_seconds"] > 0 else None,
        "trainable_params": trainable,
        "total_params": total,
        "train_blocks": n_train,
        "eval_blocks": n_val,
        "seq_len": seq_len,
        "seconds": round(seconds, 2),
        "threads": torch.get_num_threads() if ft.threads == 0 else ft.threads,
        "notes": notes,
        "base_dir": "base",
        "adapter_dir": adapter_dir,
        "merged_dir": merged_dir,
    }
    if ft.init != "scratch":  # the registry's lineage and card, evaluate's forgetting rows read these
        notes[:0] = continual_notes
        stats.update(init=ft.init, parent=parent.ref if parent else None,
                     continual={**continual_info, "replay_ratio": ft.replay_ratio, "ewc": ewc_info})
    if task_adapters:
        # peft writes each named adapter to adapter/<name>/ beside the shared one at adapter/.
        stats["task_adapters"] = task_adapters
    if ft.objective == "dpo":
        stats["dpo_heldout_before"] = {k: round(v, 6) for k, v in extra["before"].items()}
        stats["dpo_heldout_after"] = {k: round(v, 6) for k, v in extra["after"].items()}
    for name in ("distill", "grpo"):  # evaluate reads these: the teacher's row, the reward column's weights
        if name in extra:
            stats[name] = extra[name]
    if merged_dir is None:
        notes.append(f"method {ft.method} cannot be merged into the base: load base/ + adapter/ with "
                     "corpus2model.tasks.model.peft_methods.load_tuned")
    if ckpt is not None:
        # The output is complete and cached: the checkpoints have nothing left to resume.
        shutil.rmtree(ckpt, ignore_errors=True)
    publish_image("finetune-loss", str(final_path(out_dir, ctx, "loss.png")),
                  "train/validation loss and learning rate per step")
    publish_markdown("finetune-summary", _summary_md(stats), f"{ft.method} {ft.objective} fine-tuning summary")
    return Manifest(stage=STAGE, files=files, counters={}, stats=stats)


def _summary_md(s: dict) -> str:
    lines = [f"# Fine-tuning ({s['method']}, {s['objective']})", "", "| metric | value |", "|---|---|"]
    for k in ("initial_eval_loss", "final_eval_loss", "best_eval_loss", "initial_train_loss", "final_train_loss",
              "steps", "stopped_early", "tokens_seen", "tokens_per_s", "steps_per_s", "trainable_params",
              "total_params", "seconds"):
        lines.append(f"| {k} | {s[k]} |")
    for n in s.get("notes", []):
        lines.append(f"\n> {n}")
    return "\n".join(lines) + "\n"
