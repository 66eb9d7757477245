"""The stage table: every DAG node declared once, in execution order.

Each entry is a ``tasks.stage.Stage`` (name, version, config sections, inputs, run, key_extra). Everything
that needs the graph derives it from here: the flow (flows/pipeline.py runs the table top-down), the
plan and its keys (flows/plan.py), ``c2m tune``'s data stages (flows/tune.py), the standalone commands
(flows/standalone.py) and the order of stages in a registered model's lineage (tasks/registry.py gets
the manifests in this order). A stage's VERSION stays beside the code it versions (``tasks/<stage>.py``);
the table reads it from there, so a bump is one edit next to the change.

The validation boundaries (check_raw, check_clean, check_augment) are stages of their own: one
implementation in tasks/validate/, one cached node per boundary, each keyed by its upstream and the
bytes of its suite file. They report only, and stop the flow on an error-severity failure.
"""
from __future__ import annotations

from corpus2model.tasks import augment, clean, dedup, evaluate, finetune, ingest, quantize, shard, tokenize, validate
from corpus2model.tasks.stage import Stage


def _module_stage(mod, inputs: tuple[str, ...], **extra) -> Stage:
    """A stage implemented by one module of tasks/ (its STAGE, VERSION, SECTIONS, run, key_extra)."""
    return Stage(name=mod.STAGE, version=mod.VERSION, sections=tuple(mod.SECTIONS), inputs=inputs, run=mod.run,
                 key_extra=getattr(mod, "key_extra", None), module=mod.__name__, **extra)


def _boundary_stage(boundary: str) -> Stage:
    """check_<boundary>: the validate stage's boundary check (tasks/validate/boundary.py CHECKS) on the
    records of its last input, keyed by the checks section and its suite file's bytes."""
    c = validate.CHECKS[boundary]
    return Stage(name=c.stage, version=c.version, sections=tuple(c.sections), inputs=tuple(c.upstream), run=c.run,
                 key_extra=c.key_extra, module=c.run.__module__, validation=True)


# Execution order; every stage's inputs come earlier ("source" is the raw-folder scan, tasks/ingest.scan_raw).
TABLE: tuple[Stage, ...] = (
    _module_stage(ingest, ("source",)),
    _boundary_stage("raw"),
    _module_stage(clean, ("ingest",)),
    _module_stage(dedup, ("clean",)),
    _boundary_stage("clean"),
    _module_stage(augment, ("dedup",)),
    _boundary_stage("augment"),
    _module_stage(validate, ("augment",), validation=True),
    _module_stage(shard, ("validate",)),
    _module_stage(tokenize, ("shard",)),
    # finetune reads the shard records itself (a classifier's labelled records, per-task adapters'
    # blocks); tokenize's key is made from shard's, so only tokenize enters the key.
    _module_stage(finetune, ("tokenize", "shard"), key_inputs=("tokenize",)),
    # quantize calibrates static INT8 on tokenize's packed train blocks; finetune's key chains tokenize's,
    # so only finetune enters the key (the key it had before it declared tokenize).
    _module_stage(quantize, ("finetune", "tokenize"), key_inputs=("finetune",)),
    _module_stage(evaluate, ("shard", "tokenize", "finetune", "quantize")),
)
STAGES: dict[str, Stage] = {s.name: s for s in TABLE}
# (stage, upstream stages) pairs, the shape the plan and the tests walk.
DAG: list[tuple[str, list[str]]] = [(s.name, list(s.inputs)) for s in TABLE]


def through(name: str) -> list[str]:
    """The stages that run up to and including ``name``, in table order: its inputs and the validation
    boundaries between them (a boundary is no input of anything, yet it must pass before training)."""
    names = [s.name for s in TABLE]
    return names[: names.index(name) + 1]


# The data half of the DAG: everything up to the training records (``c2m tune`` runs through tokenize).
DATA_STAGES: list[str] = through("shard")
