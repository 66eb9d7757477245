"""Every fine-tuning method trains the tiny model on CPU (loss goes down), saves safetensors, reloads
to the same outputs, and generates; QLoRA refuses CPU with a clear error."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

import tiny_lm  # noqa: E402
from corpus2model.tasks.model import peft_methods, trainer  # noqa: E402
from corpus2model.tasks.finetune import evaluate_loss, sft_loss_fn  # noqa: E402
from corpus2model.tasks.model.modeling import generate_text, save_model  # noqa: E402
from corpus2model.tasks.stage import StageError  # noqa: E402

# Learning rate and the eval-loss drop each method reaches in 16 steps on the tiny model; the
# random-init lm_head trains beside every adapter (see LoraConfig.modules_to_save).
METHODS = {"full": (3e-3, 0.2), "lora": (1e-2, 0.2), "prefix": (1e-2, 0.2), "ia3": (1e-2, 0.2),
           "bottleneck": (1e-2, 0.2)}


@pytest.fixture(scope="module")
def data():
    return tiny_lm.packed_tensors(64)


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("method", list(METHODS))
def test_method_trains_saves_reloads_and_generates(method, data, tmp_path):
    tok = tiny_lm.tokenizer()
    ft = tiny_lm.ft_config(method=method, learning_rate=METHODS[method][0], max_steps=16, eval_every=16,
                           checkpoint_every=0, lora={"r": 4, "alpha": 8, "dropout": 0.0, "modules_to_save": ["lm_head"]},
                           prefix={"num_virtual_tokens": 4, "modules_to_save": ["lm_head"]},
                           ia3={"modules_to_save": ["lm_head"]}, bottleneck={"size": 8, "modules_to_save": ["lm_head"]})
    base = tiny_lm.model()
    save_model(base, tok, tmp_path / "base")
    model = peft_methods.prepare(base, ft, tmp_path / "base")
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    assert (n_train == n_all) if method == "full" else (0 < n_train < n_all)
    loss_fn = sft_loss_fn(prefix=method == "prefix")
    val = [{k: v[:4] for k, v in data.items()}]
    train = {k: v[4:] for k, v in data.items()}
    res = trainer.train(model, trainer.Batches(len(train["input_ids"]), tiny_lm.getter(train), 4, 0),
                        lambda: evaluate_loss(model, val, loss_fn), ft, loss_fn, progress=False)
    assert res["final_eval_loss"] < res["initial_eval_loss"] - METHODS[method][1], res["history"]

    x = tok("What is 3 plus 4?", add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        want = model(input_ids=x).logits
    if method == "full":
        save_model(model, tok, tmp_path / "merged")
        from corpus2model.tasks.model.modeling import load_causal_lm

        again, _ = load_causal_lm(tmp_path / "merged")
    else:
        assert peft_methods.save_adapter(model, method, tmp_path / "adapter")
        files = {p.name for p in (tmp_path / "adapter").iterdir()}
        assert any(f.endswith(".safetensors") for f in files) and not any(f.endswith((".bin", ".pt")) for f in files)
        again, _ = peft_methods.load_tuned(tmp_path / "base", tmp_path / "adapter")
        if peft_methods.mergeable(method):
            merged, _ = peft_methods.merge_saved(tmp_path / "base", tmp_path / "adapter")
            with torch.inference_mode():
                assert torch.allclose(merged(input_ids=x).logits, want, atol=1e-4)
    with torch.inference_mode():
        got = again(input_ids=x).logits
    assert torch.allclose(got[:, -x.shape[1]:], want[:, -x.shape[1]:], atol=1e-5)
    out = generate_text(again, tok, ["What is 3 plus 4?"], max_new_tokens=6)
    assert len(out) == 1 and isinstance(out[0], str)


def test_qlora_refuses_cpu_with_a_clear_error():
    ft = tiny_lm.ft_config(method="qlora")
    with pytest.raises(StageError, match="qlora needs a CUDA GPU"):
        peft_methods.prepare(tiny_lm.model(), ft, None)


def test_bottleneck_starts_as_the_identity():
    base = tiny_lm.model()
    x = torch.tensor([[5, 6, 7, 8]])
    with torch.inference_mode():
        before = base(input_ids=x).logits.clone()
    adapted = peft_methods.add_bottleneck_adapters(base, size=4)
    with torch.inference_mode():
        assert torch.equal(adapted(input_ids=x).logits, before)
    names = [n for n, p in adapted.named_parameters() if p.requires_grad]
    assert names and all(".mlp.bottleneck." in n for n in names) and len(names) == 2 * 2 * 2  # 2 layers x down/up x w/b


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_one_run_trains_an_adapter_per_task_type_selectable_at_inference(tmp_path):
    from helpers import chain_config, run_chain

    from corpus2model.tasks.model.modeling import load_causal_lm

    cfg = chain_config(tmp_path, finetune={"adapter_per_task_type": True, "max_steps": 10, "eval_every": 10})
    m = run_chain(tmp_path, cfg, upto="finetune")["finetune"]
    s = m.stats
    assert sorted(s["task_adapters"]) == ["math_qa", "text"]
    for tt, row in s["task_adapters"].items():
        assert row["final_eval_loss"] < row["initial_eval_loss"] and row["steps"] == 10, (tt, row)
    out = m.dir
    assert {f.path for f in m.files} >= {"adapter/adapter_model.safetensors", "adapter/math_qa/adapter_model.safetensors",
                                         "adapter/text/adapter_model.safetensors"}
    model, tok, names = peft_methods.load_multi_task(out / "merged", out / "adapter")
    assert names == ["math_qa", "text"]
    x = tok("What is 3 plus 4?", add_special_tokens=False, return_tensors="pt")["input_ids"]
    logits = {}
    for name in names:
        model.set_adapter(name)
        with torch.inference_mode():
            logits[name] = model(input_ids=x).logits
        assert isinstance(generate_text(model, tok, ["What is 3 plus 4?"], max_new_tokens=4)[0], str)
    assert not torch.allclose(logits["math_qa"], logits["text"], atol=1e-3)
    with torch.inference_mode(), model.disable_adapter():
        shared = model(input_ids=x).logits
    merged, _ = load_causal_lm(out / "merged")
    with torch.inference_mode():
        assert torch.allclose(shared, merged(input_ids=x).logits, atol=1e-5)

    # Serving: a version folder as the registry lays it out (model/ = merged, adapter/ with the task
    # subfolders); /generate picks the adapter per request and names the choices on a bad one.
    import json
    import shutil

    from fastapi.testclient import TestClient

    from corpus2model.flows.serve import create_app

    vdir = tmp_path / "registry" / "m" / "v1"
    shutil.copytree(out / "merged", vdir / "model")
    shutil.copytree(out / "adapter", vdir / "adapter")
    (vdir / "serve.json").write_text(json.dumps({"serve_variant": "tuned", "variants": {"tuned": "model"},
                                                "prompt_template": "{input}", "task": "causal_lm"}))
    client = TestClient(create_app(tmp_path / "registry", "m", ref="v1"))
    texts = {}
    for adapter in (None, "math_qa", "text"):
        body = {"prompt": "What is 3 plus 4?", "max_new_tokens": 6, **({"adapter": adapter} if adapter else {})}
        r = client.post("/generate", json=body)
        assert r.status_code == 200, r.text
        texts[adapter] = r.json()["text"]
    model.set_adapter("math_qa")
    assert texts["math_qa"] == generate_text(model, tok, ["What is 3 plus 4?"], max_new_tokens=6)[0]
    bad = client.post("/generate", json={"prompt": "hi", "adapter": "nope"})
    assert bad.status_code == 400 and "math_qa" in bad.text
