"""A tiny Llama, its tokenizer and packed SFT blocks, built in-process (no stages), for the trainer,
loss, method and DPO tests. Imported by test_trainer.py, test_losses.py, test_peft_methods.py, test_dpo.py."""
from __future__ import annotations

import random

from corpus2model.schemas.config import FinetuneConfig, ModelConfig
from corpus2model.tasks.model.modeling import build_model
from corpus2model.tasks.tokenize import encode_records, pack, train_tokenizer

SEQ_LEN = 48
TINY = dict(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64)
TEMPLATE = "### Input:\n{input}\n### Response:\n"


def sft_pairs(n: int = 96, seed: int = 0) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(1, 30), rng.randint(1, 30)
        out.append((f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."))
    return out


_TOK = None


def tokenizer():
    global _TOK
    if _TOK is None:
        texts = [TEMPLATE.format(input=i) + t for i, t in sft_pairs(200, seed=1)]
        texts += ["I am glad to help with that, here is a kind answer.", "No. Go away, I will not do that."] * 20
        _TOK = train_tokenizer(texts, vocab_size=300, min_frequency=1)
    return _TOK


def model(seed: int = 0):
    return build_model(ModelConfig(**TINY, seed=seed), tokenizer(), SEQ_LEN)


def packed_tensors(n: int = 96, seed: int = 0) -> dict:
    """Packed blocks (tokenize's pack) as int64 tensors keyed like the packed Parquet columns."""
    import torch

    pairs = sft_pairs(n, seed)
    docs = encode_records({"input": [p for p, _ in pairs], "target": [t for _, t in pairs]}, tokenizer(), TEMPLATE)
    blocks = pack(docs, SEQ_LEN, tokenizer().pad_token_id)
    return {k: torch.tensor([b[k] for b in blocks], dtype=torch.long) for k in blocks[0]}


def ft_config(**kw) -> FinetuneConfig:
    base = dict(learning_rate=1e-2, max_steps=12, batch_size=4, warmup_steps=2, eval_every=4, checkpoint_every=4,
                lora={"r": 4, "alpha": 8, "dropout": 0.1, "modules_to_save": ["lm_head"]})
    base.update(kw)
    return FinetuneConfig(**base)


def getter(data: dict):
    return lambda idx: {k: v[idx] for k, v in data.items()}
