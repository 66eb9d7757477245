"""Continual fine-tuning: which version a run continues from, and what a version keeps for the next one.

``finetune.init`` (schemas/config.py FinetuneConfig):

* ``scratch``: the model section's base (random init or ``model.pretrained``), as before.
* ``production``: the registry's production version of ``registry.model_name`` is the *parent*: training
  starts from its ``model/`` weights (merged HF weights). For ``full`` every weight trains on from there;
  for LoRA (and the other adapter methods) a *fresh* adapter trains on top of the parent's merged weights,
  which become this run's ``base/``. No production version yet: the run is a scratch run, and says so in
  its stats notes.
* ``path``: ``finetune.init_path`` is the parent: a registry version folder (``model/`` + ``lineage.json``)
  or a saved model folder.

**The parent rule** (``choose_parent``), what keeps scheduled reruns idempotent: the parent is the
production version, *unless* the production version was itself trained on this run's training data (its
lineage records the tokenize key, which chains every data stage's key): then the parent is that version's
own parent. A rerun on unchanged data therefore gets the same parent as the run that made production, so
the same finetune key and the cached output, instead of training production on its own data again; a run
whose data changed continues from production. (A config change on unchanged data retrains from the same
parent: the step that made production, redone with the new settings.)

The parent's identity (its lineage key, or the sha256 of a plain model folder's files) goes into the
finetune key through ``tasks.finetune.key_extra``; evaluate's key chains finetune's, and the registry's
lineage key chains evaluate's, so a new parent means a new finetune output, evaluation and version.

What a version keeps for the runs that continue from it (written by finetune when ``init`` is not scratch,
copied into the version folder by the registry):

* ``replay_blocks.parquet``: ``finetune.replay_buffer_blocks`` packed blocks drawn uniformly from what it
  trained on (its new blocks and the blocks it replayed), in tokenize's packed schema. A child with
  ``finetune.replay_ratio`` r mixes ``round(n_new * r / (1 - r))`` of them into its training blocks. Old data
  thins out geometrically down a chain (each buffer is a sample of a sample), recent data dominates.
* ``fisher.safetensors``: the diagonal Fisher of its trainable weights (tasks/model/ewc.py).
* ``test_records.jsonl`` (the registry writes it): its held-out test records, what forgetting is measured on.

Pure functions over the registry's on-disk contract (``aliases.json``, ``v<N>/lineage.json``): the registry
imports the finetune stage, so this module reads those files itself rather than importing it.
"""
from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from corpus2model.tasks.stage import StageError, sha256_file

FISHER = "fisher.safetensors"
REPLAY = "replay_blocks.parquet"
TEST_RECORDS = "test_records.jsonl"
LINEAGE = "lineage.json"
PARENT_DIR = "parent"  # inside a finetune output: the parent's lineage.json and test_records.jsonl


# ---------------------------------------------------------------------------------------------
# the parent rule
# ---------------------------------------------------------------------------------------------
def parent_ref(version: str, lineage: dict, model: str | None = None) -> dict:
    """How a version is named as a parent: its version (to find it), its lineage key (its identity)."""
    return {"model": model, "version": version, "lineage_key": lineage["lineage_key"]}


def choose_parent(production: tuple[str, dict] | None, tokenize_key: str | None, model: str | None = None) -> dict | None:
    """The parent a run continues from, given the production version ``(version, its lineage.json)`` (None:
    no production version) and this run's tokenize key (None: unknown). Returns a ``parent_ref`` or None
    (start from scratch). See the module docstring for why the production version's own parent is taken
    when it was trained on this very data."""
    if production is None:
        return None
    version, lineage = production
    trained_on = ((lineage.get("stages") or {}).get("tokenize") or {}).get("key")
    if tokenize_key is not None and trained_on == tokenize_key:
        return lineage.get("parent")  # its own parent (None: it was a scratch run), as recorded
    return parent_ref(version, lineage, model)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise StageError(f"{path} is missing: the registry version is incomplete; pick another parent") from None
    except json.JSONDecodeError as e:
        raise StageError(f"{path} is not valid JSON ({e}); restore it from a backup or pick another parent") from None


def production_version(registry_root: Path, name: str) -> tuple[str, dict] | None:
    """(version, its lineage.json) of ``name``'s production version in ``registry_root``, or None."""
    aliases = Path(registry_root) / name / "aliases.json"
    if not aliases.is_file():
        return None
    version = _read_json(aliases).get("production")
    if not version:
        return None
    return version, _read_json(Path(registry_root) / name / version / LINEAGE)


def folder_identity(folder: Path) -> str:
    """sha256 over a plain model folder's config and safetensors files: a parent without a lineage."""
    names = ["config.json", *sorted(p.name for p in folder.glob("*.safetensors"))]
    if len(names) == 1 or not (folder / "config.json").is_file():
        raise StageError(f"finetune.init_path {folder}: no config.json and *.safetensors there; point it at a saved "
                         f"model folder or a registry version folder (holding model/)")
    h = hashlib.sha256()
    for n in names:
        h.update(f"{n}:{sha256_file(folder / n)}\n".encode())
    return h.hexdigest()


def is_version_folder(folder: Path) -> bool:
    return (folder / "model" / "config.json").is_file() and (folder / LINEAGE).is_file()


def parent_for(ft, tokenize_key: str | None) -> dict | None:
    """The parent of a run with finetune section ``ft`` on the training data ``tokenize_key``: a
    ``parent_ref`` (registry versions), ``{"path", "sha256"}`` (a plain model folder) or None (scratch)."""
    if ft.init == "scratch":
        return None
    if ft.init == "path":
        folder = Path(ft.init_path)
        if is_version_folder(folder):
            ref = parent_ref(folder.name, _read_json(folder / LINEAGE))
            return {**ref, "path": str(folder.resolve())}
        return {"path": str(folder.resolve()), "sha256": folder_identity(folder)}
    if ft.registry_root is None or not ft.registry_model:
        raise StageError("finetune.init: production needs the registry (paths.registry and registry.model_name); "
                         "load the config through corpus2model.schemas.config")
    return choose_parent(production_version(Path(ft.registry_root), ft.registry_model), tokenize_key, ft.registry_model)


def key_identity(parent: dict | None) -> dict:
    """What of a parent enters the finetune key: its content identity, never where it lies."""
    if parent is None:
        return {"parent": None}
    return {"parent": {k: parent[k] for k in ("lineage_key", "sha256") if parent.get(k)}}


@dataclass
class Parent:
    """A resolved parent: its reference (for stats and lineage) and the folders training reads."""

    ref: dict
    model_dir: Path  # merged HF weights + tokenizer
    version_dir: Path | None = None  # a registry version folder (replay blocks, Fisher, test records, lineage)
    notes: list[str] = field(default_factory=list)

    def file(self, name: str) -> Path | None:
        p = self.version_dir / name if self.version_dir is not None else None
        return p if p is not None and p.is_file() else None


def locate(ft, ref: dict | None) -> Parent | None:
    """The folders of ``parent_for``'s answer (a version is found by its lineage key, the identity the key
    was made from, so a renamed or renumbered version is still found, and a replaced one is refused)."""
    if ref is None:
        return None
    if ref.get("sha256"):
        return Parent(ref=ref, model_dir=Path(ref["path"]))
    if ref.get("path"):
        folder = Path(ref["path"])
    else:
        root = Path(ft.registry_root) / ft.registry_model
        folder = root / str(ref.get("version"))
        if not (folder / LINEAGE).is_file() or _read_json(folder / LINEAGE).get("lineage_key") != ref["lineage_key"]:
            found = [p for p in sorted(root.glob("v*")) if (p / LINEAGE).is_file()
                     and _read_json(p / LINEAGE).get("lineage_key") == ref["lineage_key"]]
            if not found:
                raise StageError(f"parent version {ref.get('version')} (lineage {ref['lineage_key']}) of "
                                 f"{ft.registry_model!r} is no longer in {root}; restore it, or set finetune.init: scratch")
            folder = found[0]
    if _read_json(folder / LINEAGE).get("lineage_key") != ref["lineage_key"]:
        raise StageError(f"{folder}/lineage.json does not name lineage {ref['lineage_key']}: the parent changed "
                         f"since the key was computed; rerun")
    return Parent(ref={**ref, "version": folder.name}, model_dir=folder / "model", version_dir=folder)


# ---------------------------------------------------------------------------------------------
# warm start
# ---------------------------------------------------------------------------------------------
def _tokenizer_model(folder: Path) -> dict:
    data = _read_json(folder / "tokenizer.json")
    return {"model": data.get("model"), "added": [(t.get("id"), t.get("content")) for t in data.get("added_tokens", [])]}


def check_tokenizer(parent: Parent, tokenizer_dir: Path) -> None:
    """The parent's embeddings index its tokenizer's ids: training it on another tokenizer's ids would
    silently scramble every token. Compares vocabulary, merges and special tokens."""
    if _tokenizer_model(parent.model_dir) != _tokenizer_model(tokenizer_dir):
        raise StageError(
            f"the parent {parent.ref.get('version') or parent.model_dir}'s tokenizer ({parent.model_dir}/tokenizer.json) "
            f"differs from this run's ({tokenizer_dir}/tokenizer.json): the tokenize stage retrained it on the new data, "
            f"so the parent's token ids mean other text. Keep the tokenizer fixed: set tokenize.tokenizer_path to the "
            f"parent's tokenizer (e.g. {parent.model_dir}), or start this run from scratch (finetune.init: scratch)")


def parent_state(parent: Parent) -> dict:
    """The parent's weights by merged-model name (its model/*.safetensors)."""
    from safetensors.torch import load_file

    files = sorted(parent.model_dir.glob("*.safetensors"))
    if not files:
        raise StageError(f"parent {parent.model_dir} holds no *.safetensors weights")
    state = {}
    for f in files:
        state.update(load_file(str(f)))
    return state


def load_weights(model, parent: Parent) -> None:
    """Load the parent's weights into ``model`` (built from the model section): every tensor must match."""
    state = parent_state(parent)
    own = model.state_dict()
    tied = bool(getattr(model.config, "tie_word_embeddings", False))  # a tied head is saved once, as the embedding
    missing = [k for k in own if k not in state and not (tied and k == "lm_head.weight")]
    shapes = [k for k, v in state.items() if k in own and tuple(own[k].shape) != tuple(v.shape)]
    if missing or shapes:
        raise StageError(f"parent {parent.model_dir} does not fit the model section: missing {missing[:5]}, other "
                         f"shapes {shapes[:5]}; a warm start keeps the architecture (model.*) of its parent")
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)


# ---------------------------------------------------------------------------------------------
# replay
# ---------------------------------------------------------------------------------------------
def replay_count(n_new: int, ratio: float) -> int:
    """Replayed blocks so that they are ``ratio`` of all training blocks: n_new * r / (1 - r), rounded."""
    if ratio <= 0 or n_new <= 0:
        return 0
    return int(round(n_new * ratio / (1.0 - ratio)))


def pick(n_available: int, n: int, seed: int) -> list[int]:
    """``n`` indices into ``n_available`` items: a seeded sample without replacement, the whole set again
    (in a new order) as often as ``n`` exceeds it. Sorted: a Parquet read in order."""
    rng = random.Random(seed)
    out: list[int] = []
    while n > 0 and n_available > 0:
        take = min(n, n_available)
        out += rng.sample(range(n_available), take)
        n -= take
    return sorted(out)


# ---------------------------------------------------------------------------------------------
# lineage: what was added since the parent
# ---------------------------------------------------------------------------------------------
def data_added(parent_lineage: dict | None, lineage: dict) -> dict | None:
    """Raw files added, changed and removed since the parent (by path and sha256), and the records each
    version's shard stage wrote; None without a parent lineage (a plain model folder, or scratch)."""
    if not parent_lineage:
        return None
    old = {f["path"]: f["sha256"] for f in parent_lineage.get("raw_files", [])}
    new = {f["path"]: f["sha256"] for f in lineage.get("raw_files", [])}

    def records(lin: dict) -> int | None:
        c = ((lin.get("stages") or {}).get("shard") or {}).get("counters") or {}
        return c.get("out")

    r_old, r_new = records(parent_lineage), records(lineage)
    return {
        "raw_files_added": sorted(p for p in new if p not in old),
        "raw_files_changed": sorted(p for p in new if p in old and old[p] != new[p]),
        "raw_files_removed": sorted(p for p in old if p not in new),
        "records_parent": r_old,
        "records": r_new,
        "records_added": (r_new - r_old) if r_old is not None and r_new is not None else None,
        "same_training_data": ((parent_lineage.get("stages") or {}).get("tokenize") or {}).get("key")
        == ((lineage.get("stages") or {}).get("tokenize") or {}).get("key"),
    }
