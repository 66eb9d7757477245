"""tasks.model.modeling: deterministic build, safetensors round trips (float and dynamic INT8), generation."""
from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")

from corpus2model.schemas.config import ModelConfig  # noqa: E402
from corpus2model.tasks.model import modeling  # noqa: E402
from corpus2model.tasks.tokenize import train_tokenizer  # noqa: E402

TEXTS = [f"What is {a} plus {b}? {a} plus {b} is {a + b}. #### {a + b}" for a in range(20) for b in range(0, 20, 3)]
TINY = dict(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64)


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(TEXTS, vocab_size=300, min_frequency=1)


def _ids(tokenizer, text="What is 3 plus 4?"):
    return tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]


def test_build_model_is_deterministic_per_seed(tokenizer):
    a = modeling.build_model(ModelConfig(**TINY, seed=1), tokenizer, seq_len=48)
    b = modeling.build_model(ModelConfig(**TINY, seed=1), tokenizer, seq_len=48)
    c = modeling.build_model(ModelConfig(**TINY, seed=2), tokenizer, seq_len=48)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["model.layers.0.self_attn.q_proj.weight"], sc["model.layers.0.self_attn.q_proj.weight"])
    cfg = a.config
    assert cfg.vocab_size == len(tokenizer)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.intermediate_size) == (32, 2, 4, 64)
    assert cfg.max_position_embeddings >= 48
    assert (cfg.pad_token_id, cfg.eos_token_id) == (tokenizer.pad_token_id, tokenizer.eos_token_id)


def test_float_round_trip_is_safetensors_and_exact(tokenizer, tmp_path):
    model = modeling.build_model(ModelConfig(**TINY), tokenizer, seq_len=48).eval()
    modeling.save_model(model, tokenizer, tmp_path / "m")
    names = {p.name for p in (tmp_path / "m").iterdir()}
    assert "model.safetensors" in names and "tokenizer.json" in names
    assert not any(n.endswith((".bin", ".pt", ".pth", ".pkl")) for n in names)
    loaded, tok = modeling.load_causal_lm(tmp_path / "m")
    assert not loaded.training
    x = _ids(tok)
    with torch.inference_mode():
        assert torch.equal(model(input_ids=x).logits, loaded(input_ids=x).logits)
    assert modeling.folder_size_bytes(tmp_path / "m") == sum(p.stat().st_size for p in (tmp_path / "m").iterdir())


def test_dynamic_int8_round_trip_is_exact_and_smaller(tokenizer, tmp_path):
    from safetensors import safe_open

    model = modeling.build_model(ModelConfig(**TINY), tokenizer, seq_len=48).eval()
    modeling.save_model(model, tokenizer, tmp_path / "fp32")
    q = modeling.quantize_dynamic_int8(model)
    modeling.save_dynamic_int8(q, tokenizer, tmp_path / "int8", model.config)
    qcfg = json.loads((tmp_path / "int8" / "quant_config.json").read_text())
    assert qcfg["method"] == "dynamic_int8" and qcfg["scheme"] == "per_channel_symmetric"
    # every Linear (7 per layer + lm_head) is quantized
    assert len(qcfg["modules"]) == 2 * 7 + 1 and "lm_head" in qcfg["modules"]
    with safe_open(str(tmp_path / "int8" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("lm_head.qweight").dtype == torch.int8
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.float32
        assert int(f.get_tensor("lm_head.zero_points").abs().sum()) == 0  # symmetric
    assert "model.norm.weight" in keys and "model.layers.0.mlp.down_proj.scales" in keys

    reloaded, _ = modeling.load_causal_lm(tmp_path / "int8")
    x = torch.randint(0, len(tokenizer), (3, 20), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        want, got = q(input_ids=x).logits, reloaded(input_ids=x).logits
        ref = model(input_ids=x).logits
    assert torch.equal(want, got)
    assert float((want - ref).abs().max()) < 0.5  # quantized, but still the same model
    size_fp32 = (tmp_path / "fp32" / "model.safetensors").stat().st_size
    size_int8 = (tmp_path / "int8" / "model.safetensors").stat().st_size
    assert size_int8 < 0.6 * size_fp32
    assert modeling.count_params(reloaded) == modeling.count_params(model)


def test_generate_text_greedy_returns_new_text_only_and_stops_at_eos(tokenizer):
    model = modeling.build_model(ModelConfig(**TINY), tokenizer, seq_len=48).eval()
    prompts = ["What is 3 plus 4?", "What is 10 plus 2?"]
    a = modeling.generate_text(model, tokenizer, prompts, max_new_tokens=8)
    b = modeling.generate_text(model, tokenizer, prompts, max_new_tokens=8)
    assert a == b and len(a) == 2 and all(isinstance(t, str) for t in a)
    # The new text is what the model's own greedy continuation decodes to (no prompt echo).
    with torch.inference_mode():
        seq = model.generate(input_ids=_ids(tokenizer, prompts[0]), max_new_tokens=8, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    new = seq[0, _ids(tokenizer, prompts[0]).shape[1]:].tolist()
    if tokenizer.eos_token_id in new:
        new = new[: new.index(tokenizer.eos_token_id)]
    assert a[0] == tokenizer.decode(new, skip_special_tokens=True)

    # A model that always predicts eos generates nothing: with the attention and MLP outputs zeroed,
    # the last hidden state is the (all-ones) embedding, so the eos row of lm_head scores highest.
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight.fill_(1.0)
        model.lm_head.weight.zero_()
        model.lm_head.weight[tokenizer.eos_token_id] = 1.0
    assert modeling.generate_text(model, tokenizer, prompts, max_new_tokens=8) == ["", ""]


def test_build_model_loads_model_pretrained_from_a_local_folder(tokenizer, tmp_path):
    src = modeling.build_model(ModelConfig(**TINY, seed=3), tokenizer, seq_len=48)
    modeling.save_model(src, tokenizer, tmp_path / "pre")
    # The size fields are ignored when a pretrained model is named: its own config wins.
    got = modeling.build_model(ModelConfig(hidden_size=16, num_layers=1, pretrained=str(tmp_path / "pre")),
                               tokenizer, seq_len=48)
    assert got.config.hidden_size == 32
    a, b = src.state_dict(), got.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
