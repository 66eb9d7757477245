"""Continual fine-tuning (finetune.init, replay, EWC, forgetting, lineage): tasks/model/continual.py,
tasks/model/ewc.py, tasks/model/forgetting.py, and the finetune/registry stages on two scheduled runs with
new data between them (stage run functions + registry.register, tiny full fine-tuning)."""
from __future__ import annotations

import json
import random
import types
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from corpus2model.flows.stages import STAGES
from corpus2model.schemas.config import FinetuneConfig, parse_config
from corpus2model.schemas.records import make_record, records_table
from corpus2model.tasks import finetune, registry
from corpus2model.tasks.model import continual, ewc, forgetting
from corpus2model.tasks.stage import FileEntry, Manifest, StageContext, Store, run_stage, sha256_file, stage_key

from helpers import BASE_ROWS, fake_evaluate

# ---------------------------------------------------------------------------------------------
# the parent rule
# ---------------------------------------------------------------------------------------------
LIN_V1 = {"lineage_key": "L1", "stages": {"tokenize": {"key": "T1"}}, "parent": None}
LIN_V2 = {"lineage_key": "L2", "stages": {"tokenize": {"key": "T2"}},
          "parent": {"model": "m", "version": "v1", "lineage_key": "L1"}}


def test_parent_rule():
    assert continual.choose_parent(None, "T1") is None  # no production yet: scratch
    # production trained on other data: continue from it
    assert continual.choose_parent(("v1", LIN_V1), "T2", "m") == {"model": "m", "version": "v1", "lineage_key": "L1"}
    # production trained on this very data: its own parent (a rerun must not train on top of itself)
    assert continual.choose_parent(("v1", LIN_V1), "T1") is None
    assert continual.choose_parent(("v2", LIN_V2), "T2") == LIN_V2["parent"]
    assert continual.choose_parent(("v2", LIN_V2), "T3", "m")["version"] == "v2"


def test_key_names_the_parent_and_stays_put_on_a_rerun(tmp_path):
    root = tmp_path / "registry"
    (root / "m" / "v1").mkdir(parents=True)
    (root / "m" / "v1" / "lineage.json").write_text(json.dumps(LIN_V1))
    cfg = types.SimpleNamespace(finetune=FinetuneConfig(init="production", registry_root=root, registry_model="m"))
    before = finetune.key_extra(cfg, ["tokenize:T1"])  # no alias file yet: scratch
    assert before["continual"] == {"parent": None}
    (root / "m" / "aliases.json").write_text(json.dumps({"production": "v1", "history": []}))
    assert finetune.key_extra(cfg, ["tokenize:T1"]) == before  # v1 was trained on T1: same key as its run
    assert finetune.key_extra(cfg, ["tokenize:T2"])["continual"] == {"parent": {"lineage_key": "L1"}}


def test_tune_trial_key_names_the_parent_too(tmp_path):
    """A cached `c2m tune` trial is replayed only when it would start from the same parent."""
    from corpus2model.flows.tune import trial_key

    root = tmp_path / "registry"
    (root / "m" / "v1").mkdir(parents=True)
    (root / "m" / "v1" / "lineage.json").write_text(json.dumps(LIN_V1))
    cfg = parse_config({"paths": {"registry": str(root)}, "registry": {"model_name": "m"},
                        "finetune": {"init": "production"}})
    tok = Manifest(stage="tokenize", key="T2")
    before = trial_key(tok, cfg)  # no production yet
    (root / "m" / "aliases.json").write_text(json.dumps({"production": "v1", "history": []}))
    assert trial_key(tok, cfg) != before


def test_config_switches_are_checked():
    with pytest.raises(ValueError, match="need a parent"):
        FinetuneConfig(ewc_lambda=1.0)
    with pytest.raises(ValueError, match="init_path"):
        FinetuneConfig(init="path")
    with pytest.raises(ValueError, match="supports methods"):
        FinetuneConfig(init="production", method="ia3", ewc_lambda=1.0)
    cfg = parse_config({"finetune": {"init": "production"}, "paths": {"registry": "/r"}, "registry": {"model_name": "x"}})
    assert (str(cfg.finetune.registry_root), cfg.finetune.registry_model) == ("/r", "x")
    assert "continual" not in parse_config({}).section("finetune")  # scratch configs keep their keys


# ---------------------------------------------------------------------------------------------
# EWC math
# ---------------------------------------------------------------------------------------------
def test_fisher_is_the_mean_squared_gradient_and_penalty_its_weighted_distance():
    import torch

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    xs = [torch.randn(1, 3) for _ in range(4)]
    loss_fn = lambda m, b: ((m(b["x"]) ** 2).mean(), 1)  # noqa: E731
    fisher, used = ewc.fisher_diagonal(model, [{"x": x} for x in xs], loss_fn, ["weight"])
    expect = torch.zeros(2, 3)
    for x in xs:
        g, = torch.autograd.grad((model(x) ** 2).mean(), [model.weight])
        expect += g ** 2 / len(xs)
    assert used == 4 and torch.allclose(fisher["weight"], expect)
    assert model.weight.requires_grad and model.bias.requires_grad  # restored

    anchor = {"weight": model.weight.detach().clone(), "bias": model.bias.detach().clone()}
    terms = ewc.terms(model, fisher, anchor)
    assert [t.name for t in terms] == ["weight"] and ewc.penalty(terms).item() == 0.0
    with torch.no_grad():
        model.weight += 0.5
    assert torch.isclose(ewc.penalty(terms), (fisher["weight"] * 0.25).sum())
    wrapped = ewc.penalized(loss_fn, terms, lam=4.0)
    value, _ = wrapped(model, {"x": xs[0]})
    assert torch.isclose(value, loss_fn(model, {"x": xs[0]})[0] + 2.0 * (fisher["weight"] * 0.25).sum())


def test_lora_deltas_are_anchored_at_zero_in_merged_weight_space():
    import torch
    from tiny_lm import ft_config, model as tiny_model

    from corpus2model.tasks.model import peft_methods

    base = tiny_model()
    parent = {k: v.detach().clone() for k, v in base.state_dict().items()}
    peft = peft_methods.prepare(base, ft_config(lora={"r": 2, "alpha": 4, "dropout": 0.0, "target_modules": ["q_proj"],
                                                      "modules_to_save": ["lm_head"]}))
    names = ewc.trainable_weight_names(peft)
    assert names == sorted(["lm_head.weight", *[f"model.layers.{i}.self_attn.q_proj.weight" for i in range(2)]])
    fisher = {n: torch.full_like(parent[n], 2.0) for n in names}
    terms = ewc.terms(peft, fisher, parent)
    assert sorted(t.name for t in terms) == names
    assert ewc.penalty(terms).item() == 0.0  # B = 0 and the head copy equals the parent's: no move yet
    layer = peft.base_model.model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        layer.lora_B["default"].weight.fill_(0.1)
    delta = layer.get_delta_weight("default")  # scaling * B @ A: theta - theta_parent of the merged weight
    assert delta.abs().sum() > 0 and torch.isclose(ewc.penalty(terms), (2.0 * delta ** 2).sum())


def test_forgetting_definition_and_gate_rule():
    assert forgetting.forgetting(12.0, 10.0) == pytest.approx(0.2)
    assert forgetting.forgetting(None, 10.0) is None
    rows = {"base": {"variant": "base", "old_test_perplexity": 10.0},
            "tuned": {"variant": "tuned", "old_test_perplexity": 12.0, "forgetting": 0.2}}
    assert registry.forgetting_check(rows, 0.25)["passed"]
    bad = registry.forgetting_check(rows, 0.1)
    assert not bad["passed"] and "0.2 > 0.1" in bad["reason"]
    assert registry.forgetting_check({"tuned": {"variant": "tuned"}}, 0.1)["passed"]  # no parent: nothing to forget
    rows["tuned"]["forgetting"] = None
    assert not registry.forgetting_check(rows, 0.1)["passed"]


# ---------------------------------------------------------------------------------------------
# two scheduled runs with new data between them
# ---------------------------------------------------------------------------------------------
TEMPLATE = "### Input:\n{input}\n### Response:\n"
SEQ_LEN = 48


def _records(op: str, n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(1, 30), rng.randint(1, 30)
        out.append(make_record(f"What is {a} {op} {b}?", f"{a} {op} {b} is {a + b if op == 'plus' else a * b}.",
                               task_type="math_qa", domain="math"))
    return out


def _data(root: Path, name: str, splits: dict[str, list[dict]], tokenizer):
    """Shard-, tokenize- and source-like manifests of ``splits`` with one fixed tokenizer: the tokenize stage
    keeps its tokenizer across appends (tokenizer_sample_bytes), which a warm start needs."""
    from corpus2model.tasks.tokenize import PACKED_COLUMNS, PACKED_SCHEMA, encode_records, pack

    folder = root / name
    tokenizer.save_pretrained(str(folder / "tokenizer"))
    files = [FileEntry(p.relative_to(folder).as_posix(), role="tokenizer") for p in sorted((folder / "tokenizer").iterdir())]
    (folder / "packed").mkdir()
    (folder / "shards").mkdir()
    shards = {}
    for split, recs in splits.items():
        blocks = pack(encode_records({"input": [r["input"] for r in recs], "target": [r["target"] for r in recs]},
                                     tokenizer, TEMPLATE), SEQ_LEN, tokenizer.pad_token_id)
        pq.write_table(pa.table({c: [b[c] for b in blocks] for c in PACKED_COLUMNS}, schema=PACKED_SCHEMA),
                       folder / "packed" / f"{split}.parquet")
        files.append(FileEntry(f"packed/{split}.parquet", role="packed", records=len(blocks)))
        pq.write_table(records_table(recs), folder / "shards" / f"{split}.parquet")
        shards[split] = [{"path": f"shards/{split}.parquet"}]
    h = sha256_file(folder / "packed" / "train.parquet")[:16]
    n = sum(len(v) for v in splits.values())
    return {
        "source": Manifest(stage="source", key="src" + h, files=[FileEntry(f"{name}.jsonl", 100, h * 4, "raw")], path=str(folder)),
        "shard": Manifest(stage="shard", key="sh" + h, stats={"shards": shards},
                          counters={"in": n, "out": n, "rejected": {}, "duplicates": 0}, path=str(folder)),
        "tokenize": Manifest(stage="tokenize", key="tok" + h, files=files,
                             stats={"seq_len": SEQ_LEN, "prompt_template": TEMPLATE}, path=str(folder)),
    }


def _old_test_loss(ft: Manifest, old: dict) -> float:
    import datasets
    from torch.utils.data import DataLoader

    from corpus2model.tasks.model.modeling import load_causal_lm

    model, _ = load_causal_lm(ft.dir / "merged")
    ds = datasets.load_dataset("parquet", data_files={"t": str(old["tokenize"].dir / "packed" / "test.parquet")},
                               cache_dir=str(ft.dir.parent.parent / "hf"))["t"].with_format("torch")
    return finetune.evaluate_loss(model, DataLoader(ds, batch_size=8))


def test_two_runs_with_new_data_ewc_forgets_less(tmp_path):
    from corpus2model.tasks.evaluate import load_row_model, score_tokens, variant_folders
    from corpus2model.tasks.tokenize import train_tokenizer

    plus = {"train": _records("plus", 160, 0), "validation": _records("plus", 16, 4), "test": _records("plus", 24, 1)}
    times = {"train": _records("times", 160, 2), "validation": _records("times", 16, 5), "test": _records("times", 24, 3)}
    tokenizer = train_tokenizer([TEMPLATE.format(input=r["input"]) + r["target"] for d in (plus, times)
                                 for s in d.values() for r in s], vocab_size=300, min_frequency=1)
    old, new = _data(tmp_path, "plus", plus, tokenizer), _data(tmp_path, "times", times, tokenizer)

    def cfg(**ft):
        return parse_config({
            "paths": {"store": str(tmp_path / "store"), "registry": str(tmp_path / "registry")},
            "model": {"hidden_size": 32, "num_layers": 2, "num_heads": 4, "intermediate_size": 64},
            "finetune": {"method": "full", "init": "production", "max_steps": 40, "batch_size": 8, "eval_every": 20,
                         "warmup_steps": 2, "learning_rate": 3e-3, "threads": 1, "ewc_fisher_blocks": 32,
                         "replay_buffer_blocks": 32, **ft},
            "evaluate": {"max_records": 24}, "registry": {"serve_variant": "tuned"}})

    ctx = StageContext(store=Store(tmp_path / "store"))
    ft_stage = STAGES["finetune"]
    inputs = lambda d: [d["tokenize"], d["shard"]]  # noqa: E731

    # run 1: no production version yet -> from the base model; it keeps replay blocks and its Fisher
    c1 = cfg(max_steps=120, learning_rate=5e-3)
    key1 = stage_key(ft_stage, c1, inputs(old))[0]
    ft1 = run_stage(ft_stage, inputs(old), c1, ctx)
    assert ft1.stats["parent"] is None and "no production version yet" in ft1.stats["notes"][0]
    reg1 = registry.register({**old, "finetune": ft1, "evaluate": fake_evaluate(tmp_path, "ev1", BASE_ROWS)}, c1)
    v1 = Path(reg1["path"])
    assert reg1["production"] == "v1"
    assert {continual.FISHER, continual.REPLAY, continual.TEST_RECORDS} <= {p.name for p in v1.iterdir()}
    assert len((v1 / continual.TEST_RECORDS).read_text().splitlines()) == 24

    # the scheduled rerun on unchanged data: v1 was trained on it, so its parent is v1's (none): same key, a hit
    assert stage_key(ft_stage, c1, inputs(old))[0] == key1
    assert run_stage(ft_stage, inputs(old), c1, ctx).stats["cache"] == "hit"

    # run 2 on new data, without and with EWC: continues from v1
    parent_loss = _old_test_loss(ft1, old)
    rise, forgot = {}, {}
    for lam in (0.0, 3e4):
        ft2 = run_stage(ft_stage, inputs(new), cfg(ewc_lambda=lam), ctx)
        assert ft2.stats["parent"]["version"] == "v1" and ft2.stats["continual"]["replay_ratio"] == 0.0
        assert (ft2.stats["continual"]["ewc"] or {}).get("applied", False) == (lam > 0)
        rise[lam] = _old_test_loss(ft2, old) - parent_loss
        folders = variant_folders(ft2, Manifest(stage="quantize"))
        rows = [{"variant": "base"}, {"variant": "tuned"}]
        notes = forgetting.add_rows(rows, ft2, 24, lambda v, recs: score_tokens(
            *load_row_model(folders[v])[:2], recs, TEMPLATE)[0])
        assert "base is the parent v1" in notes[0]
        forgot[lam] = rows[1]["forgetting"]
    msg = (f"old (plus) test loss: parent {parent_loss:.4f}, rise without EWC {rise[0.0]:+.4f}, with EWC lambda 3e4 "
           f"{rise[3e4]:+.4f}; forgetting (ppl ratio - 1) without {forgot[0.0]}, with {forgot[3e4]}")
    print(msg)
    assert rise[0.0] > 0 and forgot[0.0] > 0, msg  # training on the new task alone forgets the old one
    assert rise[3e4] < rise[0.0], msg

    # a `c2m tune` trial (finetune.train_only) starts where the stage did: v1's weights and its EWC penalty,
    # so its losses are the stage's step for step
    trial = finetune.train_only(new["tokenize"], cfg(ewc_lambda=3e4).finetune, cfg().model, work_dir=tmp_path)
    stage_hist = json.loads((ft2.dir / "loss.json").read_text())["rows"]
    evals = [r.get("eval_loss") for r in stage_hist]
    assert len([e for e in evals if e is not None]) >= 2
    assert [r.get("eval_loss") for r in trial["history"]] == evals
    scratch = finetune.train_only(new["tokenize"], cfg(init="scratch").finetune, cfg().model, work_dir=tmp_path)
    assert [r.get("eval_loss") for r in scratch["history"]] != [r.get("eval_loss") for r in stage_hist]

    # the version made by run 2 names its parent and the data added
    reg2 = registry.register({**new, "finetune": ft2, "evaluate": fake_evaluate(tmp_path, "ev2", BASE_ROWS)},
                             cfg(ewc_lambda=3e4))
    lineage = json.loads((Path(reg2["path"]) / "lineage.json").read_text())
    assert lineage["parent"]["version"] == "v1" and lineage["data_added"]["raw_files_added"] == ["times.jsonl"]
    assert lineage["data_added"]["raw_files_removed"] == ["plus.jsonl"]
    assert "continued from **v1**" in (Path(reg2["path"]) / "README.md").read_text()
