"""tasks.model.modeling batched generation: DecodeBatch / generate_batched / GenerationEngine give, under
greedy decoding, exactly what one-at-a-time ``generate_text`` (HF generate per prompt) gives."""
from __future__ import annotations

import threading

import pytest

torch = pytest.importorskip("torch")

from corpus2model.schemas.config import ModelConfig  # noqa: E402
from corpus2model.tasks.model import modeling  # noqa: E402
from corpus2model.tasks.tokenize import train_tokenizer  # noqa: E402

TEXTS = [f"What is {a} plus {b}? {a} plus {b} is {a + b}. #### {a + b}" for a in range(20) for b in range(0, 20, 3)]
TINY = dict(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64)
# Different lengths, so the shared cache is left-padded and rows start at different columns.
PROMPTS = [f"What is {a} plus {b}?" + " and more" * (a % 4) for a, b in zip(range(9), range(3, 30, 3))]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(TEXTS, vocab_size=300, min_frequency=1)


@pytest.fixture(scope="module", params=["float", "dynamic_int8"])
def model(request, tokenizer):
    m = modeling.build_model(ModelConfig(**TINY, seed=1), tokenizer, seq_len=64).eval()
    return m if request.param == "float" else modeling.quantize_dynamic_int8(m)


def _ids(tokenizer, prompt):
    return tokenizer(prompt, add_special_tokens=False)["input_ids"]


def reference(model, tokenizer, prompts, budgets):
    return [modeling.generate_text(model, tokenizer, [p], max_new_tokens=b)[0] for p, b in zip(prompts, budgets)]


def test_generate_batched_equals_one_at_a_time(model, tokenizer):
    budgets = [4 + i % 5 for i in range(len(PROMPTS))]  # rows leave the batch at different steps
    want = reference(model, tokenizer, PROMPTS, budgets)
    assert len(set(want)) > 1  # the prompts really get different answers
    assert modeling.generate_batched(model, tokenizer, PROMPTS, max_new_tokens=budgets, max_batch_size=4) == want
    # batch size 1 is the same loop without neighbours
    assert modeling.generate_batched(model, tokenizer, PROMPTS[:3], max_new_tokens=budgets[:3], max_batch_size=1) == want[:3]


def test_rows_join_and_leave_a_running_batch(model, tokenizer):
    """Two prompts of different lengths are prefilled together (left padding) and join a batch whose row
    has already decoded (the cache is re-padded on the left), a shorter one joins later, rows finish at
    their own budget; every answer is the reference one."""
    budgets = {0: 9, 1: 3, 2: 7, 3: 5}
    prompts = {0: PROMPTS[0], 1: PROMPTS[2], 2: PROMPTS[7], 3: PROMPTS[1]}
    assert len({len(_ids(tokenizer, p)) for p in prompts.values()}) == 4  # every join pads someone
    done = {}
    batch = modeling.DecodeBatch(model, tokenizer, finish=lambda r: done.__setitem__(r.done, batch.text(r)))

    def request(i):
        return modeling.GenRequest(_ids(tokenizer, prompts[i]), budgets[i], done=i)

    sizes = []
    with batch:
        batch.join(request(0))
        batch.step(), batch.step()
        batch.join([request(1), request(2)])  # both longer than row 0's cache so far
        sizes.append(len(batch))
        batch.step()
        batch.join(request(3))  # shorter: it gets the padding
        sizes.append(len(batch))
        while len(batch):
            batch.step()
            sizes.append(len(batch))
    assert sizes[:2] == [3, 4] and sizes[-1] == 0 and len(set(sizes)) > 3  # rows left one by one
    assert done == dict(enumerate(reference(model, tokenizer, [prompts[i] for i in range(4)],
                                            [budgets[i] for i in range(4)])))


def test_prefill_together_equals_alone(model, tokenizer):
    """The first token of each prompt from one padded prefill of all of them is the one it gets alone."""
    firsts = {}
    batch = modeling.DecodeBatch(model, tokenizer, finish=lambda r: firsts.__setitem__(r.done, r.out))
    with batch:
        batch.join([modeling.GenRequest(_ids(tokenizer, p), 1, done=i) for i, p in enumerate(PROMPTS)])
    alone = [_continuation(model, tokenizer, p, 1) for p in PROMPTS]
    assert [firsts[i] for i in range(len(PROMPTS))] == [a if a != [tokenizer.eos_token_id] else [] for a in alone]


def test_logits_equal_one_at_a_time(model, tokenizer):
    """Stronger than equal greedy tokens (which survive small errors): every step's logits for every row
    are HF generate's for that prompt alone; bitwise for the dynamic INT8 model (each row quantized
    alone, integer matmuls), to float rounding for the float one (a batched matmul rounds differently)."""
    import copy

    budgets = {0: 6, 1: 3, 2: 5, 3: 4}
    prompts = {0: PROMPTS[0], 1: PROMPTS[2], 2: PROMPTS[7], 3: PROMPTS[1]}
    assert len({len(_ids(tokenizer, p)) for p in prompts.values()}) == 4  # every join pads someone
    seen = {i: [] for i in prompts}
    exact = bool(modeling._quantized_linears(model))
    if exact:
        # A spiky pad embedding: were padded positions inside an INT8 layer's activation range, its scale
        # (so every real row's answer) would change. No prompt alone contains the pad token.
        model = copy.deepcopy(model)
        with torch.no_grad():
            emb = model.get_input_embeddings().weight
            emb[tokenizer.pad_token_id] = 0.0
            emb[tokenizer.pad_token_id, 0] = 50.0

    class Recording(modeling.DecodeBatch):
        def _pick(self, logits, rows):
            for row, r in zip(logits, rows):
                seen[r.done].append(row.clone())
            return super()._pick(logits, rows)

    batch = Recording(model, tokenizer, finish=lambda r: None)
    with batch:
        batch.join(modeling.GenRequest(_ids(tokenizer, prompts[0]), budgets[0], done=0))
        batch.step()
        batch.join([modeling.GenRequest(_ids(tokenizer, prompts[i]), budgets[i], done=i) for i in (1, 2)])
        batch.step()
        batch.join(modeling.GenRequest(_ids(tokenizer, prompts[3]), budgets[3], done=3))
        while len(batch):
            batch.step()
    for i, p in prompts.items():
        ids = torch.tensor([_ids(tokenizer, p)])
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=budgets[i],
                                 do_sample=False, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id, output_logits=True, return_dict_in_generate=True)
        want = [x[0].float() for x in out.logits]
        assert len(seen[i]) == len(want)
        for got, ref in zip(seen[i], want):
            if exact:
                assert torch.equal(got, ref)
            else:
                torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)


def test_stops_at_eos_per_row(tokenizer, model):
    """With eos set to a token the greedy continuation of one prompt emits mid-way, that row stops
    there (the reference stops too) while its neighbours keep decoding."""
    import copy

    full = [_continuation(model, tokenizer, p, 10) for p in PROMPTS[:4]]
    token = next(t for seq in full for t in seq[2:8] if any(t not in other for other in full))
    tok = copy.deepcopy(tokenizer)
    tok.eos_token = tok.convert_ids_to_tokens(token)
    assert tok.eos_token_id == token
    want = reference(model, tok, PROMPTS[:4], [10] * 4)
    got = modeling.generate_batched(model, tok, PROMPTS[:4], max_new_tokens=10, max_batch_size=4)
    assert got == want
    cut = [seq.index(token) if token in seq else None for seq in full]
    assert any(c is not None for c in cut) and any(c is None for c in cut)  # some rows stopped, others ran on
    for seq, c, text in zip(full, cut, got):
        assert text == tok.decode(seq[:c] if c is not None else seq, skip_special_tokens=True)


def _continuation(model, tokenizer, prompt, n):
    ids = torch.tensor([_ids(tokenizer, prompt)])
    with torch.inference_mode():
        seq = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=None)
    return seq[0, ids.shape[1]:].tolist()


def test_over_long_prompts_and_zero_budget_match(model, tokenizer):
    long_prompt = " ".join(PROMPTS) * 3  # longer than the 64 positions: its end is kept
    assert len(_ids(tokenizer, long_prompt)) > model.config.max_position_embeddings
    prompts, budgets = [long_prompt, PROMPTS[0], long_prompt], [5, 4, 70]
    want = reference(model, tokenizer, prompts, budgets)
    assert modeling.generate_batched(model, tokenizer, prompts, max_new_tokens=budgets, max_batch_size=3) == want


def test_sampling_rows_do_not_change_greedy_neighbours(model, tokenizer):
    budgets = [6] * 4
    temps = [0.0, 1.5, 0.0, 1.0]
    want = reference(model, tokenizer, PROMPTS[:4], budgets)
    torch.manual_seed(0)
    got = modeling.generate_batched(model, tokenizer, PROMPTS[:4], max_new_tokens=budgets, temperature=temps,
                                    max_batch_size=4)
    assert [got[0], got[2]] == [want[0], want[2]]
    assert all(isinstance(t, str) for t in got)


def test_batched_mode_is_undone(model, tokenizer):
    """The row-wise attention and per-row INT8 calls exist only while a batch runs."""
    impl = model.config._attn_implementation
    with modeling._BatchedMode(model):
        assert model.config._attn_implementation.startswith("c2m_rowwise_")
    assert model.config._attn_implementation == impl
    assert not any("forward" in m.__dict__ for m in model.modules())


@pytest.mark.parametrize("in_features,bias", [(32, True), (96, False), (600, True)])
def test_row_int8_is_linear_dynamic_row_by_row(in_features, bias):
    """_RowInt8 (a decode step's INT8 Linears for all rows at once) gives, bitwise, what the op gives each
    row alone: rows of many ranges, an all-zero row, a row whose range is below ATen's smallest scale,
    one all-negative, values a hair off a rounding tie; 600 inputs take the float64 GEMM path."""
    torch.manual_seed(0)
    mod = modeling.quantize_dynamic_int8(torch.nn.Sequential(torch.nn.Linear(in_features, 48, bias=bias)))[0]
    emu = modeling._RowInt8(mod, reduce_range=True)
    assert emu.acc_dtype == (torch.float64 if in_features > 514 else torch.float32)
    assert emu.exact(mod, in_features)
    x = torch.randn(9, in_features) * torch.logspace(-3, 2, 9)[:, None]
    x[0] = 0.0
    x[1] = 1e-5 * torch.rand(in_features)  # scale below 6.1e-5: ATen stretches the range
    x[2] = -x[2].abs()
    x[3, :] = (torch.arange(in_features) % 7 - 3 + 0.5) * (x[3].abs().max() / 63.5)  # near ties
    with torch.inference_mode():
        want = torch.cat([mod(x[i:i + 1]) for i in range(len(x))])
        assert torch.equal(emu.linear(*emu.quantize(x)), want)
        x[4, 0] = float("nan")
        assert emu.quantize(x) is None  # not finite: the caller runs the op row by row


def test_decode_steps_quantize_rows_together_or_fall_back(tokenizer, monkeypatch):
    """A dynamic INT8 batch decodes through _RowInt8 (no per-row op call in a decode step, one
    quantization for q/k/v); where its self-check fails the per-row calls run, with the same answers."""
    import copy

    float_model = modeling.build_model(ModelConfig(**TINY, seed=1), tokenizer, seq_len=64).eval()
    qmodel = modeling.quantize_dynamic_int8(float_model)
    budgets = [6, 3, 5, 4]
    want = reference(qmodel, tokenizer, PROMPTS[:4], budgets)
    calls = {"row": 0, "quantize": 0}
    row_op, quantize = modeling._BatchedMode._row_op, modeling._RowInt8.quantize

    def counting_row_op(mod):
        fn = row_op(mod)
        return lambda x: (calls.__setitem__("row", calls["row"] + 1), fn(x))[1]

    def counting_quantize(self, x):
        calls["quantize"] += 1
        return quantize(self, x)

    monkeypatch.setattr(modeling._BatchedMode, "_row_op", staticmethod(counting_row_op))
    monkeypatch.setattr(modeling._RowInt8, "quantize", counting_quantize)
    batch = modeling.DecodeBatch(qmodel, tokenizer, finish=lambda r: None)
    with batch:
        assert all(batch.mode._emulator(m) is not None for m in batch.mode.quantized)
        batch.join([modeling.GenRequest(_ids(tokenizer, p), 5) for p in PROMPTS[:3]])
        calls.update(row=0, quantize=0)
        batch.step()
    layers = qmodel.config.num_hidden_layers
    assert calls == {"row": 0, "quantize": 4 * layers + 1}  # q/k/v, o, gate/up, down per layer; lm_head
    assert modeling.generate_batched(qmodel, tokenizer, PROMPTS[:4], max_new_tokens=budgets, max_batch_size=4) == want

    monkeypatch.setattr(modeling._RowInt8, "exact", lambda self, mod, n: False)
    fallback = copy.deepcopy(qmodel)  # new modules: their self-check runs again (and fails)
    calls.update(row=0, quantize=0)
    got = modeling.generate_batched(fallback, tokenizer, PROMPTS[:4], max_new_tokens=budgets, max_batch_size=4)
    assert got == want and calls["row"] > 0 and calls["quantize"] == 0


def test_engine_batches_concurrent_requests_and_keeps_groups_apart(tokenizer):
    """Requests submitted together decode together; a request for another group (adapter) waits for
    the batch to drain instead of mixing; the worker survives a failing prefill; close fails the rest."""
    model = modeling.build_model(ModelConfig(**TINY, seed=1), tokenizer, seq_len=64).eval()
    impl = model.config._attn_implementation
    steps, lock = [], threading.Lock()
    entered = []

    def context(group):
        import contextlib

        entered.append(group)
        if group == "boom":
            raise ValueError("no such adapter")
        return contextlib.nullcontext()

    engine = None

    def on_step(n):
        with lock:
            steps.append((n, {r.group for r in engine.batch.rows}))

    engine = modeling.GenerationEngine(model, tokenizer, max_batch_size=4, max_wait_ms=300, context=context,
                                       on_step=on_step)
    try:
        groups = ["a", "a", "b", "a", "b"]
        futures = [engine.submit(p, max_new_tokens=5, group=g) for p, g in zip(PROMPTS, groups)]
        got = [f.result(timeout=120) for f in futures]
        assert got == reference(model, tokenizer, PROMPTS[:5], [5] * 5)
        assert max(n for n, _ in steps) > 1  # decoded together
        assert all(len(gs) <= 1 for _, gs in steps)  # never two groups in one step
        assert set(entered) == {"a", "b"}
        with pytest.raises(ValueError, match="no such adapter"):
            engine.generate(PROMPTS[0], max_new_tokens=3, group="boom")  # its prefill fails, alone
        assert engine.generate(PROMPTS[1], max_new_tokens=3) == reference(model, tokenizer, PROMPTS[1:2], [3])[0]
    finally:
        engine.close()
    with pytest.raises(RuntimeError, match="closed"):
        engine.submit(PROMPTS[0], max_new_tokens=3)
    assert model.config._attn_implementation == impl  # the engine left the model as it found it


def test_engine_switches_peft_adapters_per_batch(tokenizer):
    """The server's adapter context through the engine: requests naming adapter "a", "b" or none (the
    adapters disabled) get what one-at-a-time generation with that adapter set gives."""
    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model

    from corpus2model.flows.serve import _adapter_context

    base = modeling.build_model(ModelConfig(**TINY, seed=1), tokenizer, seq_len=64).eval()
    # init_lora_weights=False: random B matrices, so each adapter really changes the answers
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "lm_head"], init_lora_weights=False)
    torch.manual_seed(3)
    model = get_peft_model(base, cfg, adapter_name="a")
    model.add_adapter("b", cfg)
    model.eval()

    def alone(prompt, adapter):
        if adapter is None:
            with model.disable_adapter():
                return modeling.generate_text(model, tokenizer, [prompt], max_new_tokens=5)[0]
        model.set_adapter(adapter)
        return modeling.generate_text(model, tokenizer, [prompt], max_new_tokens=5)[0]

    groups = ["a", None, "b", "a", None, "b"]
    want = [alone(p, g) for p, g in zip(PROMPTS, groups)]
    assert len({alone(PROMPTS[0], g) for g in ("a", "b", None)}) == 3  # the adapters matter
    engine = modeling.GenerationEngine(model, tokenizer, max_batch_size=4, max_wait_ms=100,
                                       context=_adapter_context(model, ["a", "b"]))
    try:
        futures = [engine.submit(p, 5, group=g) for p, g in zip(PROMPTS, groups)]
        assert [f.result(timeout=300) for f in futures] == want
    finally:
        engine.close()
