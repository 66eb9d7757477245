"""DPO: the loss, pair loading/encoding, and a short CPU run that widens the chosen-vs-rejected
margin on held-out pairs; one pass through the finetune stage with objective dpo."""
from __future__ import annotations

import json
import math
import random

import pytest

torch = pytest.importorskip("torch")

import tiny_lm  # noqa: E402
from corpus2model.tasks.model import dpo, peft_methods, trainer  # noqa: E402
from helpers import SHARED  # noqa: E402

KIND = ["I am glad to help with {x}, here is a kind answer.", "Happy to help with {x}: here is what I know."]
RUDE = ["No. Go away, I will not do {x}.", "No, {x} is not my problem, go away."]
TOPICS = ["adding 3 and 4", "the sum of 10 and 2", "what 7 plus 8 is", "the answer to 5 plus 6", "that", "this",
          "adding 1 and 9", "the sum of 20 and 3", "what 12 plus 1 is", "the answer to 9 plus 9"]


def synthetic_pairs(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        x = rng.choice(TOPICS)
        out.append({"id": str(i), "prompt": f"Human: can you help with {x}?\n\nAssistant:",
                    "chosen": " " + rng.choice(KIND).format(x=x), "rejected": " " + rng.choice(RUDE).format(x=x)})
    return out


def test_dpo_loss_is_log2_at_the_reference_and_falls_with_the_margin():
    z = torch.zeros(3)
    loss, margin = dpo.dpo_loss(z, z, z, z, beta=0.1)
    assert float(loss) == pytest.approx(math.log(2)) and torch.equal(margin, z)
    better, _ = dpo.dpo_loss(torch.full((3,), 2.0), z, z, z, beta=0.1)
    assert float(better) < math.log(2)


def test_encode_pairs_puts_loss_on_the_response_only():
    tok = tiny_lm.tokenizer()
    data = dpo.encode_pairs(synthetic_pairs(3, 0), tok, max_prompt=8, max_resp=6)
    for side in ("chosen", "rejected"):
        ids, labels, mask = (data[f"{side}_{k}"] for k in ("input_ids", "labels", "attention_mask"))
        assert ids.shape == labels.shape == mask.shape
        n_real = mask.sum(1)
        assert int(n_real.max()) <= 8 + 6
        for i in range(ids.shape[0]):
            lab = labels[i, :int(n_real[i])]
            assert lab[0] == -100 and lab[-1] == tok.eos_token_id  # prompt ignored; response ends in eos
            assert int((lab != -100).sum()) <= 6


def test_load_pairs_validates_and_reads_the_shared_preference_file(tmp_path):
    path = SHARED / "preference_pairs" / "harmless_base_test_public.jsonl"
    if not path.is_file():
        pytest.skip("shared preference pairs not present")
    pairs, dropped = dpo.load_pairs(path, tmp_path / "report", drop_invalid=True)
    assert (tmp_path / "report" / "failing_rows.parquet").is_file()
    assert len(dropped) == 2 and len(pairs) == 1798 and all(p["chosen"] for p in pairs) and all(p["rejected"] for p in pairs)
    by_split = dpo.split_pairs(pairs, {"train": 0.9, "validation": 0.05, "test": 0.05}, seed=0)
    assert sum(map(len, by_split.values())) == 1798 and 60 < len(by_split["validation"]) < 120
    assert not {p["id"] for p in by_split["train"]} & {p["id"] for p in by_split["validation"]}
    # the shard stage's rule: a pair's split is fixed by its content, whatever else is in the file
    again = dpo.split_pairs(pairs[::-1][:500], {"train": 0.9, "validation": 0.05, "test": 0.05}, seed=0)
    assert {p["id"] for p in again["validation"]} <= {p["id"] for p in by_split["validation"]}


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_short_dpo_run_widens_the_heldout_margin():
    tok = tiny_lm.tokenizer()
    ft = tiny_lm.ft_config(max_steps=10, batch_size=8, learning_rate=1.5e-2, eval_every=5, checkpoint_every=0,
                           lora={"r": 4, "alpha": 8, "dropout": 0.0, "modules_to_save": ["lm_head"]})
    model = peft_methods.prepare(tiny_lm.model(), ft)
    enc = lambda ps: dpo.encode_pairs(ps, tok, 24, 16)  # noqa: E731
    train_data, held = enc(synthetic_pairs(64, 1)), enc(synthetic_pairs(16, 2))
    train_data.update(dpo.reference_logps(model, train_data))
    held.update(dpo.reference_logps(model, held))
    before = dpo.evaluate(model, held, beta=0.1)
    margin_before = dpo.policy_margin(model, held)
    assert before["loss"] == pytest.approx(math.log(2), abs=1e-5)  # LoRA starts as the base = the reference
    res = trainer.train(model, trainer.Batches(64, tiny_lm.getter(train_data), 8, 0),
                        lambda: dpo.evaluate(model, held, 0.1)["loss"], ft, dpo.make_loss_fn(0.1), progress=False)
    after = dpo.evaluate(model, held, beta=0.1)
    assert after["loss"] < before["loss"] - 0.1 and after["accuracy"] > 0.9, (before, after)
    assert dpo.policy_margin(model, held) > margin_before + 1.0
    assert res["final_eval_loss"] == pytest.approx(after["loss"])


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_finetune_stage_runs_dpo_on_a_pairs_file(tmp_path):
    from helpers import chain_config, run_chain

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(p) + "\n" for p in synthetic_pairs(40, 3)), encoding="utf-8")
    cfg = chain_config(tmp_path, finetune={"objective": "dpo", "max_steps": 8, "eval_every": 4,
                                           "dpo": {"pairs_path": str(pairs), "max_prompt_tokens": 24,
                                                   "max_response_tokens": 16}})
    m = run_chain(tmp_path, cfg, upto="finetune")["finetune"]
    s = m.stats
    # split as the shard stage splits (chain_config: 0.8 / 0.1 / 0.1): train, and validation held out
    expect = dpo.split_pairs(synthetic_pairs(40, 3), cfg.shard.splits, cfg.shard.seed)
    assert s["objective"] == "dpo" and s["eval_blocks"] == len(expect["validation"]) > 0
    assert s["train_blocks"] == len(expect["train"])
    assert s["dpo_heldout_after"]["loss"] < s["dpo_heldout_before"]["loss"]
    assert s["merged_dir"] == "merged" and s["adapter_dir"] == "adapter"
    # The held-out pairs are written for the evaluate stage's preference accuracy, and none was trained on.
    from corpus2model.tasks.evaluate import heldout_pairs

    held = heldout_pairs(m, [])
    assert [p["id"] for p in held] == [p["id"] for p in expect["validation"]]
    # Editing the pairs file changes the key: the stage reruns.
    from corpus2model.tasks import finetune

    k1 = finetune.key_extra(type("C", (), {"finetune": cfg.finetune})())
    pairs.write_text("".join(json.dumps(p) + "\n" for p in synthetic_pairs(41, 3)), encoding="utf-8")
    assert finetune.key_extra(type("C", (), {"finetune": cfg.finetune})()) != k1
