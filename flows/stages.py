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

from dataclasses import dataclass

from corpus2model.tasks import augment, clean, dedup, evaluate, finetune, ingest, quantize, shard, tokenize, validate
from corpus2model.tasks.model.ablation import ablated_name
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


# ---------------------------------------------------------------------------------------------
# evaluate.ablate: the same model trained without one stage's contribution
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Node:
    """One node a run executes: a stage of the table, or a stage of an ablation branch. A branch node
    (``finetune_no_augment``) is its table stage run under the ablated config (``ablated_config``): the
    label names it in the plan, the run summary and the run record, while its output is cached in the
    stage's own store folder under its own key, like any other output. ``inputs`` are labels."""

    label: str
    stage: Stage
    inputs: tuple[str, ...]
    ablation: str | None = None  # the evaluate.ablate target whose branch this node belongs to


def ablation_label(stage: str, target: str) -> str:
    """``finetune_no_augment``: named like the evaluation row of its model, ``tuned_no_augment``."""
    return ablated_name(stage, target)


def ablation_branch(target: str) -> list[str]:
    """The stages an ablation reruns under its config: from the target stage through finetune, in table
    order, less the boundaries no stage reads (check_augment: report-only, and the branch's records are
    originals that check_clean already checked). validate stays: shard reads it, and it still stops on an error."""
    names = through("finetune")
    read = {u for s in TABLE for u in s.inputs}
    return [n for n in names[names.index(target):] if not STAGES[n].validation or n in read]


def ablated_config(cfg, target: str):
    """``cfg`` with the target stage's section replaced by its pass-through (schemas.config.ABLATIONS), every
    other section as it was: the branch differs from the main run in that stage's contribution only, and
    its keys do not move when a setting of the switched-off stage does."""
    from corpus2model.schemas.config import ABLATIONS

    for section, values in ABLATIONS[target].items():
        attr = "validate_" if section == "validate" else section
        cfg = cfg.model_copy(update={attr: type(getattr(cfg, attr))(**values)})
    return cfg


def nodes(ablate: list[str] | tuple[str, ...] = ()) -> list[Node]:
    """What a run executes, in order: the table, and for each ``evaluate.ablate`` target its branch
    (``ablation_branch``) just before evaluate, whose inputs then end with each branch's finetune output
    (the row ``tuned_no_<target>``, scored on the main run's held-out records)."""
    out: list[Node] = []
    for st in TABLE:
        st = STAGES[st.name]  # looked up by name: a caller that swaps a stage in STAGES (a test) is obeyed
        if st.name == "evaluate":
            for target in ablate:
                branch = ablation_branch(target)
                out += [Node(ablation_label(n, target), STAGES[n],
                             tuple(ablation_label(u, target) if u in branch else u for u in STAGES[n].inputs), target)
                        for n in branch]
            out.append(Node(st.name, st, st.inputs + tuple(ablation_label("finetune", t) for t in ablate)))
        else:
            out.append(Node(st.name, st, st.inputs))
    return out
