"""The run configuration: one YAML file, validated by pydantic, one section per stage.

Each stage hashes only its own section (plus the upstream keys), so changing
``finetune.learning_rate`` reruns finetune and what follows and no data stage.
Unknown keys are errors (``extra="forbid"``): a typo must not silently fall back to a default.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


# Fields that change how fast a stage runs, never what it produces: left out of cache keys.
NOT_HASHED = {"hashed": False}


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    def hashed(self) -> dict:
        """The canonical content a cache key is computed from (speed-only fields left out)."""
        skip = {n for n, f in type(self).model_fields.items() if (f.json_schema_extra or {}).get("hashed") is False}
        out = {}
        for name, value in self.model_dump(mode="json", exclude=skip).items():
            sub = getattr(self, name)
            out[name] = sub.hashed() if isinstance(sub, Section) else value
        return out


class Paths(Section):
    """Where things live. Not hashed: moving the store does not change what is in it."""

    raw: Path = Path("data/raw")
    store: Path = Path("data/store")
    registry: Path = Path("data/registry")


class IngestConfig(Section):
    include: list[str] = ["**/*.txt", "**/*.jsonl", "**/*.json", "**/*.html", "**/*.htm", "**/*.gz"]
    max_file_bytes: int = Field(200_000_000, gt=0)
    # Used when a text/html document carries no task_type of its own.
    default_task_type: str = "text"
    default_domain: str = "general"
    # Below this confidence the decoded text is rejected as "undecodable" rather than guessed.
    min_encoding_confidence: float = Field(0.5, ge=0.0, le=1.0)
    workers: int = Field(1, ge=1, description="process pool size for per-file work", json_schema_extra=NOT_HASHED)


class CleanConfig(Section):
    normalization: Literal["NFC", "NFKC", "none"] = "NFC"
    fix_mojibake: bool = True
    min_chars: int = Field(20, ge=0, description="shorter texts (input+target) are rejected as too_short")
    max_chars: int = Field(32_768, gt=0, description="longer fields are rejected as too_long")
    min_target_chars: int = Field(1, ge=0)
    # Off: every run of spaces/tabs becomes one space, leading ones too. On: a line's leading
    # indentation is left as it is (code in targets keeps its structure); inner runs still collapse.
    keep_indentation: bool = False
    # Gopher quality/repetition rules, C4 lorem-ipsum and language ID (tasks/text/filters.py) run on
    # records whose metadata.task_type is listed: documents, not short SFT pairs, which would all
    # fail the 50-word minimum.
    quality_filters: bool = True
    quality_task_types: list[str] = ["text"]
    # ISO 639-1 codes (py3langid); None keeps every language (language ID still fills metadata.lang).
    allowed_languages: list[str] | None = None
    # Project Gutenberg header/licence footer removal (a transform on every record; no-op without the markers).
    strip_gutenberg: bool = True
    # C4 rules next to Gopher's (tasks/text/filters.py c4_quality): lorem ipsum, curly bracket, and at
    # least this many sentences in lines ending in terminal punctuation (0 turns the count off).
    c4_filters: bool = True
    c4_min_sentences: int = Field(5, ge=0)
    # Gopher's ">= 80% of words contain a letter": over every token, punctuation included
    # ("tokens", datatrove/FineWeb), or over words only ("words", the paper's wording), which
    # keeps tokenised dumps such as WikiText whose " @-@ " and " ( " tokens sink the share.
    gopher_alpha_basis: Literal["tokens", "words"] = "tokens"
    # Word-trigram LM perplexity filter (tasks/text/lmscore.py, trained on data/reference/): English
    # quality-filtered documents above this perplexity are dropped as lm_perplexity. None: off.
    lm_max_perplexity: float | None = Field(None, gt=1.0)
    # PII masking on every record's input and target (tasks/text/pii.py): each listed kind is replaced
    # by a placeholder (<EMAIL>, <PHONE>, <IP>, <CARD>); [] turns masking off.
    pii_mask: list[Literal["email", "phone", "ip", "card"]] = ["email", "phone", "ip", "card"]
    workers: int = Field(1, ge=1, description="process pool size for per-part work", json_schema_extra=NOT_HASHED)

    @field_validator("allowed_languages")
    @classmethod
    def _lang_codes(cls, v):
        if v is not None:
            bad = [c for c in v if not re.fullmatch(r"[a-z]{2,3}", c)]
            if bad:
                raise ValueError(f"clean.allowed_languages: {bad} are not ISO 639-1 codes (e.g. en, de, zh)")
        return v


class DedupConfig(Section):
    # exact: normalised-text hash only. minhash: exact clusters plus near-duplicates (MinHash LSH
    # candidates verified by exact word n-gram Jaccard >= threshold), with a per-part sketch
    # index in the store so a rerun sketches only new parts.
    method: Literal["exact", "minhash"] = "exact"
    # Which text the exact hash is computed on: casefolded, whitespace-collapsed NFKC.
    normalize: bool = True
    ngram: int = Field(5, ge=1, le=13, description="words per shingle (near-duplicates)")
    threshold: float = Field(0.8, gt=0.0, le=1.0, description="exact shingle Jaccard that makes a near-duplicate")
    bands: int = Field(18, ge=1, le=64, description="LSH bands; more bands catch lower Jaccard (more candidates to verify)")
    rows: int = Field(5, ge=1, le=32, description="MinHash rows per band")
    seed: int = 1
    # Contamination: evaluation sets (JSONL with input/target or text) whose word n-grams must not
    # appear in training records. "report" counts them in stats; "remove" quarantines them.
    eval_files: list[Path] = []
    contamination_ngram: int = Field(13, ge=3, le=13)
    contamination_action: Literal["report", "remove"] = "report"
    workers: int = Field(1, ge=1, description="process pool size for per-part sketches", json_schema_extra=NOT_HASHED)
    # What dedup's partition phase may hold at once, all workers together: the number of LSH/digest
    # partitions is chosen from it and the corpus size (tasks/text/dedup_index.py choose_partitions).
    # The decisions do not depend on it, so it is not hashed.
    memory_mb: float = Field(1024.0, gt=0.0, description="memory budget (MB) of the partition phase; sets how many "
                             "partitions the index is cut into", json_schema_extra=NOT_HASHED)


class BacktranslateConfig(Section):
    """augment's back-translation: source -> pivot -> source with Hugging Face seq2seq models."""

    # One model per direction, "src-tgt": hub id or local folder, e.g. {"en-de": "Helsinki-NLP/opus-mt-en-de",
    # "de-en": "Helsinki-NLP/opus-mt-de-en"}; a multilingual model (NLLB, M2M100) may serve several keys.
    models: dict[str, str] = {}
    # Model-specific language codes for multilingual models ({"en": "eng_Latn", "de": "deu_Latn"}); empty for Marian.
    lang_codes: dict[str, str] = {}
    source_lang: str = "en"
    pivots: list[str] = Field(["de"], min_length=1)
    # Passed to model.generate ("seed" seeds sampling); part of the translation cache key.
    decoding: dict[str, int | float | bool] = {"num_beams": 4, "max_new_tokens": 256}
    max_input_tokens: int = Field(512, ge=8, description="longer sentences are truncated")
    # Weights are loaded as safetensors; a model that only ships pickle checkpoints (pytorch_model.bin, as
    # many opus-mt repos do) is refused with the fix unless this is set (unpickling runs arbitrary code).
    allow_pickle: bool = False
    batch_size: int = Field(32, ge=1, description="sentences per generate call", json_schema_extra=NOT_HASHED)
    device: str = Field("auto", description="auto = cuda when available, else cpu", json_schema_extra=NOT_HASHED)
    threads: int = Field(0, ge=0, description="torch CPU threads; 0 = torch default", json_schema_extra=NOT_HASHED)
    # Filters on each candidate (tasks/text/backtranslate.py); a rejected candidate is reported, never a record.
    min_length_ratio: float = Field(0.5, gt=0.0)
    max_length_ratio: float = Field(2.0, gt=0.0)
    check_language: bool = True
    language_min_chars: int = Field(20, ge=0, description="shorter texts skip the language check")
    too_close_chrf: float = Field(90.0, ge=0.0, le=100.0, description="round-trip chrF at or above: adds nothing")
    # 35: shuffled English sentence pairs pass 0.2 % (same-document neighbours 4 %), see tests/test_backtranslate.py.
    too_far_chrf: float = Field(35.0, ge=0.0, le=100.0, description="round-trip chrF below: meaning changed")

    @model_validator(mode="after")
    def _bands(self):
        if self.min_length_ratio >= self.max_length_ratio:
            raise ValueError("augment.backtranslate: min_length_ratio must be below max_length_ratio")
        if self.too_far_chrf >= self.too_close_chrf:
            raise ValueError("augment.backtranslate: too_far_chrf must be below too_close_chrf (the accepted band)")
        if self.source_lang in self.pivots:
            raise ValueError(f"augment.backtranslate: a pivot must differ from source_lang {self.source_lang!r}")
        return self


# Task types whose records pair an input with a target: word-level noise makes the input
# ungrammatical while the answer stays, so noise methods need an explicit opt-in for them (issue 15).
TARGETED_TASK_TYPES = ("sft", "math_qa", "instruction")
# evaluate.ablate targets -> {section: values}: the section, rebuilt from these values and its defaults,
# under which that stage adds nothing (its input passes through under its own key). The rest of the
# section is reset too, so tuning augment (max_ratio, seed, ...) never retrains the model without it.
ABLATIONS: dict[str, dict[str, dict]] = {"augment": {"augment": {"methods": []}}}
NOISE_METHODS = ("word_swap", "word_dropout")


class AugmentConfig(Section):
    # word_swap / word_dropout: EDA noise (only for task types without a target, or those listed in
    # noise_task_types); synonym: WordNet thesaurus (data/thesaurus); backtranslate: needs
    # augment.backtranslate.models. Methods take turns over the parents (round robin).
    methods: list[Literal["word_dropout", "word_swap", "synonym", "backtranslate"]] = ["synonym"]
    # At most this many augmented records per original record of a task type (1:3 by default).
    max_ratio: float = Field(1 / 3, ge=0.0, le=10.0)
    max_ratio_by_task: dict[str, float] = Field({}, description="per task_type override of max_ratio")

    @field_validator("max_ratio_by_task")
    @classmethod
    def _ratios(cls, v: dict[str, float]) -> dict[str, float]:
        bad = {k: r for k, r in v.items() if not 0.0 <= r <= 10.0}
        if bad:
            raise ValueError(f"augment.max_ratio_by_task values must be in [0, 10], got {bad}")
        return v
    backtranslate: BacktranslateConfig = BacktranslateConfig()
    task_types: list[str] = ["instruction", "math_qa"]
    probability: float = Field(0.1, gt=0.0, lt=1.0, description="per-word edit probability")
    min_words: int = Field(8, ge=2, description="inputs with fewer words are not augmented")
    seed: int = 0
    # Targeted task types (TARGETED_TASK_TYPES) on which word_swap / word_dropout may run anyway.
    noise_task_types: list[str] = []
    # Quality gate: a word-level rewrite (synonym, word_swap, word_dropout) whose LM perplexity
    # (tasks/text/lmscore.py) exceeds its parent's by more than this factor is quarantined, not
    # added. Measured on the demo's math_qa/instruction parents (bench/augment_bench.py): 1.15 keeps
    # 94.5% of synonym rewrites (their ratio: median 1.02, p95 1.17) and rejects 68% of word_swap
    # rewrites at p=0.1 (median 1.24). None turns the gate off. Back-translation keeps its chrF band.
    max_perplexity_ratio: float | None = Field(1.15, gt=1.0)
    report_samples: int = Field(20, ge=0, description="parent -> rewrite pairs shown in the report")

    @model_validator(mode="after")
    def _noise_needs_opt_in(self) -> "AugmentConfig":
        noise = [m for m in self.methods if m in NOISE_METHODS]
        blocked = [t for t in self.task_types if t in TARGETED_TASK_TYPES and t not in self.noise_task_types]
        if noise and blocked:
            raise ValueError(
                f"augment.methods has {noise}, word-level noise that leaves an ungrammatical input paired with the "
                f"original target, and augment.task_types has targeted types {blocked}. Drop {noise} from "
                f"augment.methods, or opt in with augment.noise_task_types: {blocked}")
        return self


class ValidateConfig(Section):
    """The final boundary (training records, before shard), and the distribution checks of all."""

    suite: Path = Path("schemas/suites/training_records.yaml")
    max_failing_rows: int = Field(1000, ge=0, description="failing rows kept per expectation")
    # "<expectation>:<column>" -> error|warn: relax (or tighten) one expectation of the final suite
    # for this config without editing the reviewed suite ("pairs:<expectation>:<column>": the
    # preference_pairs suite the final node runs on preference records).
    severity_overrides: dict[str, Literal["error", "warn"]] = {}
    # Distribution checks against the last successful run of the same config name; computed by the
    # flow after each boundary, never part of a stage's output, so not hashed.
    drift_severity: Literal["error", "warn"] = Field("warn", json_schema_extra=NOT_HASHED)
    max_row_change: float = Field(0.5, ge=0.0, description="|rows - previous| / previous", json_schema_extra=NOT_HASHED)
    max_length_ks: float = Field(0.2, ge=0.0, le=1.0, description="KS statistic of the length distribution",
                                 json_schema_extra=NOT_HASHED)
    max_task_type_tvd: float = Field(0.2, ge=0.0, le=1.0, description="total variation distance of the task_type mix",
                                     json_schema_extra=NOT_HASHED)


class ChecksConfig(Section):
    """The check_raw / check_clean / check_augment boundary nodes (tasks/validate.py BOUNDARIES).
    A section of its own: relaxing a raw check reruns the report-only check nodes, not the final
    validate node, shard and training."""

    raw_suite: Path = Path("schemas/suites/raw_documents.yaml")
    clean_suite: Path = Path("schemas/suites/cleaned_records.yaml")
    augment_suite: Path = Path("schemas/suites/augmented_records.yaml")
    max_failing_rows: int = Field(1000, ge=0, description="failing rows kept per expectation")
    # "<boundary>:<expectation>:<column>" (boundary raw, clean or augment) or "<expectation>:<column>"
    # (every boundary) -> error|warn. "pairs:<expectation>:<column>" tunes the preference_pairs suite that
    # check_clean and check_augment run on preference records.
    severity_overrides: dict[str, Literal["error", "warn"]] = {}


def listed_once(v: list[str], message: str) -> list[str]:
    """``v`` when no value repeats, else a config error ``"<message>: <v>"`` (list-valued switches)."""
    if len(set(v)) != len(v):
        raise ValueError(f"{message}: {v}")
    return v


class ShardConfig(Section):
    # Bytes per Parquet shard as written (compressed, footer included); every shard of a split but
    # the last is within +-10 % of it (tasks/shard.py explains how).
    target_bytes: int = Field(1_000_000_000, gt=0)
    compression: Literal["zstd", "snappy", "none"] = "zstd"
    # Row groups are sized in bytes: about target_bytes / row_groups_per_shard each, so a shard
    # overshoots its target by a few % at most and a streaming reader holds one group at a time.
    row_groups_per_shard: int = Field(32, ge=1, le=4096)
    # Upper bound on the uncompressed text of one row group (and on its row count): what a writer
    # and a streaming reader hold in memory per split, whatever target_bytes is.
    row_group_max_bytes: int = Field(64_000_000, ge=1024)
    row_group_rows: int = Field(100_000, gt=0, description="at most this many rows per row group")
    splits: dict[str, float] = {"train": 0.9, "validation": 0.05, "test": 0.05}
    seed: int = 0
    # parquet is always written (the shard index and tokenize read it); webdataset adds one tar per
    # Parquet shard holding the same records in the same order.
    formats: list[Literal["parquet", "webdataset"]] = ["parquet"]
    # WebDataset samples batch documents as JSON lines up to this many bytes, so the 512-byte tar
    # header per sample stays under 1 % of the tar.
    webdataset_sample_bytes: int = Field(65_536, ge=1)

    @field_validator("formats")
    @classmethod
    def _parquet_always(cls, v: list[str]) -> list[str]:
        if "parquet" not in v:
            raise ValueError("formats must include 'parquet' (the shard index and tokenize read it)")
        return listed_once(v, "formats lists a format twice")

    @field_validator("splits")
    @classmethod
    def _splits_sum_to_one(cls, v: dict[str, float]) -> dict[str, float]:
        if abs(sum(v.values()) - 1.0) > 1e-6 or any(x < 0 for x in v.values()):
            raise ValueError(f"split fractions must be >= 0 and sum to 1, got {v}")
        if "train" not in v:
            raise ValueError("splits must contain 'train'")
        import re

        bad = [k for k in v if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", k)]
        if bad:
            # Split names become folder names and Hugging Face datasets split names.
            raise ValueError(f"split names must be letters, digits or '_' (not starting with a digit), got {bad}")
        return v


class TokenizeConfig(Section):
    vocab_size: int = Field(2048, ge=260)
    seq_len: int = Field(256, ge=16)
    min_frequency: int = Field(2, ge=1)
    # How a record becomes text. Loss is computed on the target tokens only.
    prompt_template: str = "### Input:\n{input}\n### Response:\n"
    # The tokenizer is trained on the first train shards, up to this many bytes of their files:
    # records appended later (new shards) do not retrain it, so their token ids and every cached
    # per-shard packing stay valid. A demo-sized corpus is covered whole.
    tokenizer_sample_bytes: int = Field(256_000_000, gt=0)
    # A fixed tokenizer instead of training one: a folder with tokenizer.json (a registry version's model/,
    # or any saved Hugging Face tokenizer). Continual runs (finetune.init: production) need it: a parent's
    # embeddings index its own token ids, and a tokenizer retrained on grown data gives ids other meanings.
    # Not hashed as a path: the tokenizer files' sha256 is (tasks/tokenize.py key_extra).
    tokenizer_path: Path | None = Field(None, json_schema_extra=NOT_HASHED)

    @field_validator("prompt_template")
    @classmethod
    def _template_takes_input(cls, v: str) -> str:
        # Checked here so a bad template fails at config load, not after the tokenizer is trained.
        try:
            rendered = v.format(input="\x00")
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(f"prompt_template must use only the field {{input}} (write literal braces as "
                             f"{{{{ and }}}}): {e!r}") from None
        if "\x00" not in rendered:
            raise ValueError("prompt_template must contain {input}")
        return v


class ClassifierConfig(Section):
    """Labels and head training for ``model.task: classification`` (tasks/model/classify.py)."""

    # Where a record's class label is: metadata.<label_field> (or a top-level field of that name).
    label_field: str = "lang"
    # Class names in label-id order; empty = the sorted labels found in the train split.
    labels: list[str] = []
    max_length: int = Field(128, ge=8, le=512, description="tokens per input (longer inputs are truncated)")
    # The base variant: the pretrained encoder frozen, pooler + classifier trained on cached features.
    head_epochs: int = Field(20, ge=1)
    head_learning_rate: float = Field(1e-3, gt=0)


class RewardConfig(Section):
    """Inputs and data for ``model.task: reward`` (tasks/model/reward.py): prompt+response -> one score."""

    # Each side of a pair is encoded as [CLS] prompt [SEP] response [SEP] in at most max_length tokens.
    # The prompt is cut from the left (a dialogue's last turn is what the response answers), the response
    # from its end only where it alone would leave the prompt fewer than min_prompt_tokens.
    max_length: int = Field(256, ge=16, le=512, description="tokens per prompt+response sequence, special tokens included")
    min_prompt_tokens: int = Field(32, ge=0, description="prompt tokens kept even when the response is longer")
    max_train_pairs: int = Field(0, ge=0, description="train pairs used (the first N by id); 0 = all")


class ModelConfig(Section):
    """A tiny causal LM built from a config (no hub download), or a pretrained encoder classifier."""

    # causal_lm: the tiny Llama above (or `pretrained`), trained on the tokenize stage's packed blocks.
    # classification: `pretrained` (a folder or pkg:<package>) with a sequence-classification head,
    # trained on the shard records' labels (tasks/model/classify.py); finetune/quantize/evaluate dispatch on it.
    # reward: `pretrained` with a one-output head, trained on the shard's preference pairs with the
    # pairwise loss -log sigmoid(r(prompt, chosen) - r(prompt, rejected)) (tasks/model/reward.py).
    task: Literal["causal_lm", "classification", "reward"] = "causal_lm"
    classifier: ClassifierConfig = ClassifierConfig()
    # Hashed only for task reward (see hashed()): other tasks never read it, so their keys stay put.
    reward: RewardConfig = Field(RewardConfig(), json_schema_extra=NOT_HASHED)
    arch: Literal["llama"] = "llama"
    hidden_size: int = Field(128, ge=8)
    num_layers: int = Field(2, ge=1)
    num_heads: int = Field(4, ge=1)
    intermediate_size: int = Field(256, ge=8)
    seed: int = 0
    # A hub id or local path instead of building from the fields above.
    pretrained: str | None = None
    # Security (issue 9): weights load as safetensors only; a folder holding only pickle checkpoints
    # (.bin/.pt/.pth/.ckpt/.pkl) is refused unless this is set, because unpickling runs arbitrary code.
    allow_pickle: bool = False
    # Code shipped inside a model repo never runs unless the user says so.
    trust_remote_code: bool = False

    def hashed(self) -> dict:
        out = super().hashed()
        if self.task == "reward":
            out["reward"] = self.reward.hashed()
        return out


class LoraConfig(Section):
    r: int = Field(8, ge=1)
    alpha: int = Field(16, ge=1)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    # Modules trained in full beside the adapter (peft modules_to_save), e.g. ["lm_head"]. A randomly
    # initialised model needs it: with the final norm and lm_head frozen at init scale (std 0.02) no
    # logit can exceed 0.02 * hidden_size, so no adapter can make a prediction confident. Demo data,
    # 300 steps: validation loss 7.64 -> 7.01 without it, -> 4.70 with ["lm_head"].
    modules_to_save: list[str] = []


class PrefixConfig(Section):
    num_virtual_tokens: int = Field(16, ge=1, description="learned key/value prefix length per layer")
    # Trained in full beside the prefix, as LoraConfig.modules_to_save (a random-init model needs lm_head).
    modules_to_save: list[str] = []


class IA3Config(Section):
    # IA3 rescales the keys, values and the MLP input of down_proj (the paper's choice for decoders).
    target_modules: list[str] = ["k_proj", "v_proj", "down_proj"]
    feedforward_modules: list[str] = ["down_proj"]
    modules_to_save: list[str] = []


class BottleneckConfig(Section):
    """Houlsby-style bottleneck adapters (tasks/model/peft_methods.py), one after each decoder layer's MLP."""

    size: int = Field(16, ge=1, description="bottleneck width")
    activation: Literal["gelu", "relu", "silu"] = "gelu"
    # Trained in full beside the adapters and saved with them (a random-init model needs lm_head).
    modules_to_save: list[str] = []


class DpoConfig(Section):
    """DPO on preference pairs (finetune.objective: dpo), tasks/model/dpo.py."""

    # None: the shard stage's pairs (preference records that went through ingest, clean, dedup and
    # validation): train split to train, validation split held out. A path: a JSONL file with
    # prompt/chosen/rejected (../shared/datasets/preference_pairs format), validated but not cleaned, split
    # by the shard stage's split rule so the same pairs are held out either way.
    pairs_path: Path | None = None
    beta: float = Field(0.1, gt=0)
    max_pairs: int = Field(0, ge=0, description="training pairs used (the first N); 0 = all; held-out pairs are not capped")
    max_prompt_tokens: int = Field(96, ge=1)
    max_response_tokens: int = Field(64, ge=1)
    # Pairs failing an error-severity expectation of the preference_pairs suite are left out (and
    # listed in the stage's pairs_validation/failing_rows.parquet) instead of failing the stage.
    drop_invalid_pairs: bool = True


class DistillConfig(Section):
    """Knowledge distillation (finetune.objective: distill), tasks/model/distill.py: the model built from the
    ``model`` section (the student) learns the teacher's token distributions on the packed SFT blocks."""

    # "production": the registry's production version of registry.model_name (its model/ folder); else a
    # path to a saved model folder (config.json + safetensors + the tokenizer). The teacher must share the
    # tokenize stage's vocabulary. Its files' hashes are part of the finetune key: a new production
    # version (or new files at the path) means a new student. Pin a path for a student that stays put.
    teacher: str = "production"
    # loss = alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * cross-entropy with the labels, per
    # target token; T^2 keeps the soft term's gradient scale independent of T (Hinton et al. 2015).
    alpha: float = Field(0.5, ge=0.0, le=1.0, description="weight of the distillation (KL) term")
    temperature: float = Field(2.0, gt=0.0, description="softmax temperature of both distributions in the KL")
    # The registry model whose production version teaches (teacher: production). It must differ from
    # registry.model_name, under which the student registers: were they one name, a student that passed
    # the gate would become production and the next scheduled run would distil from the student.
    # Not hashed: the teacher's file hashes are.
    teacher_model: str | None = Field(None, json_schema_extra=NOT_HASHED)


class GrpoConfig(Section):
    """Group Relative Policy Optimisation (finetune.objective: grpo), tasks/model/grpo.py, on the shard
    stage's math_qa records with a rule-based reward: ``format_weight`` when the completion contains
    ``#### <number>``, plus ``correct_weight`` when that number equals the reference's."""

    num_generations: int = Field(4, ge=2, description="completions sampled per prompt (the group)")
    temperature: float = Field(1.0, gt=0.0, description="sampling temperature of the completions")
    max_new_tokens: int = Field(32, ge=1, description="completion length cap")
    format_weight: float = Field(0.5, ge=0.0)
    correct_weight: float = Field(1.0, ge=0.0)
    # PPO-style clip of the policy ratio to [1 - clip_eps, 1 + clip_eps]; it acts when num_iterations > 1.
    clip_eps: float = Field(0.2, gt=0.0, lt=1.0)
    # Optimizer steps per sampled group batch (GRPO's mu); 1 = fully on-policy (TRL's default).
    num_iterations: int = Field(1, ge=1)
    # Weight of the k3 KL estimate to the reference (the model before training); 0 = no reference pass.
    # 0.2 by default: measured on the tiny model (README "GRPO"), beta 0 learnt the format (reward 0 -> 0.44)
    # but drifted off language (perplexity 4.0 -> 67); beta 0.2 learnt it as well (0 -> 0.5) at 4.0 -> 5.5.
    beta: float = Field(0.2, ge=0.0)
    max_prompts: int = Field(0, ge=0, description="train prompts used (the first N by id); 0 = all")
    heldout_prompts: int = Field(16, ge=1, description="validation/test math prompts scored at each evaluation")


class TuneConfig(Section):
    """``c2m tune``: an Optuna search over finetune settings (flows/tune.py). Read by no stage."""

    trials: int = Field(8, ge=1)
    seed: int = 0
    max_steps: int | None = Field(None, ge=1, description="steps per trial; None = finetune.max_steps")
    learning_rate: tuple[float, float] = (1e-4, 1e-2)  # log-uniform range
    lora_r: list[int] = [4, 8, 16]  # lora.alpha follows as 2 r
    warmup_steps: list[int] = [0, 10, 20]
    # MedianPruner: a trial whose eval loss is worse than the median of earlier trials at the same
    # step stops there, once this many trials have finished and after its first evaluation.
    pruner_startup_trials: int = Field(2, ge=0)


class FinetuneConfig(Section):
    method: Literal["lora", "full", "qlora", "prefix", "ia3", "bottleneck"] = "lora"
    # sft: packed blocks; dpo: preference pairs; distill: packed blocks + a teacher's logits (distill);
    # grpo: sampled completions of math_qa prompts scored by a verifiable reward (grpo).
    objective: Literal["sft", "dpo", "distill", "grpo"] = "sft"
    lora: LoraConfig = LoraConfig()
    prefix: PrefixConfig = PrefixConfig()
    ia3: IA3Config = IA3Config()
    bottleneck: BottleneckConfig = BottleneckConfig()
    dpo: DpoConfig = DpoConfig()
    distill: DistillConfig = DistillConfig()
    grpo: GrpoConfig = GrpoConfig()
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0, description="cosine decays to this fraction of the peak")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    early_stopping_patience: int = Field(0, ge=0, description="evaluations without improvement before stopping; 0 = off")
    early_stopping_min_delta: float = Field(0.0, ge=0.0)
    # Tokens per chunk of the output-head cross-entropy (tasks/model/losses.py); 0 = the model's own loss.
    loss_chunk_tokens: int = Field(0, ge=0)
    merge: bool = Field(True, description="also write merged/ (base + adapter folded in) for mergeable methods")
    # Multi-task (lora): after the shared adapter, one more LoRA adapter per task_type on top of merged/
    # (each trained on that task's records only, max_steps each), saved as adapter/<task_type>/ and
    # picked per request at serve time (/generate "adapter").
    adapter_per_task_type: bool = False
    task_types: list[str] = Field([], description="task types that get an adapter; empty = every one in train")
    checkpoint_every: int = Field(100, ge=0, description="steps between resumable checkpoints; 0 = none",
                                  json_schema_extra=NOT_HASHED)
    keep_checkpoints: int = Field(2, ge=1, json_schema_extra=NOT_HASHED)
    learning_rate: float = Field(2e-3, gt=0)
    max_steps: int = Field(200, ge=1)
    batch_size: int = Field(8, ge=1)
    warmup_steps: int = Field(10, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    eval_every: int = Field(50, ge=1)
    eval_blocks: int = Field(256, ge=1, description="validation blocks (the first N) scored at each evaluation")
    seed: int = 0
    threads: int = Field(0, ge=0, description="torch CPU threads; 0 = torch default", json_schema_extra=NOT_HASHED)
    # Continual fine-tuning (tasks/model/continual.py, README "Continual fine-tuning"). scratch: start from the
    # model section's base. production: warm-start from the registry's production version of
    # registry.model_name (its model/ weights; LoRA trains a fresh adapter on those merged weights), or from
    # scratch while there is none; a rerun on the data that version was trained on keeps that version's own
    # parent, so it hits the cache instead of training on top of itself. path: warm-start from init_path.
    init: Literal["scratch", "production", "path"] = Field("scratch", json_schema_extra=NOT_HASHED)
    init_path: Path | None = Field(None, description="parent for init: path: a registry version folder or a saved "
                                   "model folder (config.json + safetensors + tokenizer)", json_schema_extra=NOT_HASHED)
    # Share of the training blocks drawn from the parent version's stored train blocks (its replay_blocks.parquet)
    # instead of the new data: 0.3 = 3 replayed blocks per 7 new ones. Needs a parent and objective sft.
    replay_ratio: float = Field(0.0, ge=0.0, le=0.9, json_schema_extra=NOT_HASHED)
    # What a version keeps for the versions that continue from it (only when init is not scratch): a uniform
    # sample of the blocks it trained on (replay), and the diagonal Fisher of its trainable weights on that many
    # of its training blocks (EWC). 0 turns either off.
    replay_buffer_blocks: int = Field(256, ge=0, json_schema_extra=NOT_HASHED)
    ewc_fisher_blocks: int = Field(64, ge=0, json_schema_extra=NOT_HASHED)
    # EWC: loss + ewc_lambda/2 * sum_i F_i (theta_i - theta_parent_i)^2 with the parent's Fisher (tasks/model/ewc.py);
    # 0 = off. F is a mean squared per-block gradient of the mean token loss, so lambda scales with 1/F.
    ewc_lambda: float = Field(0.0, ge=0.0, json_schema_extra=NOT_HASHED)
    # Where "production" is looked up (init: production, distill.teacher: production): filled from paths.registry
    # and registry.model_name when the config is read, since the stage sees only its own sections. Not hashed:
    # the production version's identity is (finetune.key_extra).
    registry_root: Path | None = Field(None, json_schema_extra=NOT_HASHED)
    registry_model: str | None = Field(None, json_schema_extra=NOT_HASHED)

    def hashed(self) -> dict:
        out = super().hashed()
        # An objective's own settings count only when it is the objective: an SFT run's key does not move
        # when a DPO or GRPO setting changes.
        for name in ("dpo", "distill", "grpo"):
            if self.objective != name:
                out.pop(name, None)
        if self.init != "scratch":  # hashed only when on, so scratch configs keep their keys
            out["continual"] = {"init": self.init, "init_path": str(self.init_path) if self.init_path else None,
                                "replay_ratio": self.replay_ratio, "replay_buffer_blocks": self.replay_buffer_blocks,
                                "ewc_fisher_blocks": self.ewc_fisher_blocks, "ewc_lambda": self.ewc_lambda}
        return out

    @model_validator(mode="after")
    def _continual(self) -> "FinetuneConfig":
        if (self.init == "path") != (self.init_path is not None):
            raise ValueError("finetune.init: path goes with finetune.init_path (the parent model folder), and "
                             "init_path only with init: path")
        if self.init == "scratch" and (self.replay_ratio > 0 or self.ewc_lambda > 0):
            raise ValueError("finetune.replay_ratio and finetune.ewc_lambda need a parent: set finetune.init: "
                             "production (or path)")
        if self.replay_ratio > 0 and self.objective != "sft":
            raise ValueError(f"finetune.replay_ratio replays packed SFT blocks; objective {self.objective} has none")
        if self.ewc_lambda > 0 and self.method not in ("full", "lora", "qlora"):
            raise ValueError(f"finetune.ewc_lambda supports methods full, lora and qlora (got {self.method})")
        return self


# Variants quantize/export can make from the merged model (tasks/quantize.py, tasks/model/export.py).
QUANT_VARIANTS = ("dynamic_int8", "onnx_fp32", "onnx_int8_dynamic", "onnx_int8_static", "fp16", "bf16",
                  "bnb_8bit", "bnb_4bit")
GPU_ONLY_VARIANTS = ("bnb_8bit", "bnb_4bit")


class QuantizeConfig(Section):
    # Each listed variant is its own cached unit keyed by (finetune output, variant, the options it
    # reads): adding one computes only that one. bnb_* need device: cuda (checked at config load).
    methods: list[Literal["dynamic_int8", "onnx_fp32", "onnx_int8_dynamic", "onnx_int8_static", "fp16", "bf16",
                          "bnb_8bit", "bnb_4bit"]] = ["dynamic_int8"]
    # Linear layers kept in float (names or name suffixes), e.g. [lm_head] as many LLM quantizers
    # do. On the demo model it bought nothing (INT8 perplexity 127.36 with or without) for +39 % size.
    skip_modules: list[str] = []
    device: Literal["cpu", "cuda"] = "cpu"
    # onnx_int8_static: activation ranges calibrated on this many packed train blocks (tokenize's
    # output), drawn with calibration_seed; fewer if the train split has fewer.
    calibration_samples: int = Field(256, ge=1, le=1000)
    calibration_seed: int = 0
    calibration_len: int = Field(128, ge=8, description="tokens per calibration sequence (a block's first N)")
    onnx_opset: int = Field(18, ge=17, le=21)
    # An exported ONNX fp32 model must match PyTorch on the probe inputs within this max |logit diff|.
    onnx_tolerance: float = Field(1e-3, gt=0.0)

    @field_validator("methods")
    @classmethod
    def _no_repeats(cls, v: list[str]) -> list[str]:
        return listed_once(v, "quantize.methods lists a variant twice")

    @model_validator(mode="after")
    def _gpu_variants_need_cuda(self) -> "QuantizeConfig":
        gpu = [m for m in self.methods if m in GPU_ONLY_VARIANTS]
        if gpu and self.device != "cuda":
            raise ValueError(f"quantize.methods {gpu} run on a GPU only (bitsandbytes): set quantize.device: cuda "
                             f"on a CUDA machine, or remove them")
        return self


class RagConfig(Section):
    """The retrieval baseline row (tasks/model/rag.py, README "RAG baseline"): BM25 (bm25s) over the shard
    stage's train split, the top-k passages put before each held-out record's prompt, scored like every row."""

    enabled: bool = Field(False, description="add the rag_<model> rows to the evaluation table")
    k: int = Field(3, ge=1, le=64, description="passages retrieved per held-out record (query = its input)")
    # Each passage is cut to this many tokens before they are fitted into tokenize.seq_len (the record
    # itself is never cut for a passage: passages go first, lowest-ranked first).
    max_passage_tokens: int = Field(128, ge=1, description="token cap of one retrieved passage")
    # base: the untrained model with retrieval (the seed's "RAG vs fine-tuning" baseline); tuned: the
    # fine-tuned model with retrieval as well (both: does retrieval still help after training?).
    models: list[Literal["base", "tuned"]] = Field(["base"], min_length=1, description="models given retrieval")

    @field_validator("models")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        return listed_once(v, "evaluate.rag.models lists a model twice")


class EvaluateConfig(Section):
    max_records: int = Field(256, ge=1, description="held-out records scored for perplexity")
    generate_records: int = Field(16, ge=0, description="held-out records answered by greedy generation")
    max_new_tokens: int = Field(32, ge=1)
    latency_runs: int = Field(20, ge=1)
    # Throughput (requests/s, tokens/s) is measured on forward passes over this many sequences at once.
    batch_size: int = Field(8, ge=1, description="batch size of the throughput measurement")
    throughput_runs: int = Field(5, ge=1)
    split: str = "test"
    threads: int = Field(0, ge=0, description="torch CPU threads for scoring and latency; 0 = torch default",
                         json_schema_extra=NOT_HASHED)
    # Off by default. Hashed only when enabled (see hashed()), so configs without RAG keep their keys.
    rag: RagConfig = Field(RagConfig(), description="the BM25 retrieval baseline rows", json_schema_extra=NOT_HASHED)
    # Stages to ablate (ABLATIONS): [augment] trains the same model a second time on the data without
    # augmentation (flows/stages.py ablation_nodes: augment .. finetune rerun with augment.methods: [],
    # each cached under its own key) and adds the row tuned_no_augment, scored on the same held-out
    # records as tuned. Hashed only when set: the ablated finetune's key is then an input of evaluate too.
    ablate: list[str] = Field([], description="stages whose contribution is measured by training without them",
                              json_schema_extra=NOT_HASHED)

    @field_validator("ablate")
    @classmethod
    def _known_ablations(cls, v: list[str]) -> list[str]:
        unknown = [t for t in v if t not in ABLATIONS]
        if unknown:
            raise ValueError(f"evaluate.ablate: unknown ablation target(s) {unknown}; supported: {sorted(ABLATIONS)} "
                             f"(e.g. evaluate.ablate: [augment] adds the row tuned_no_augment)")
        return listed_once(v, "evaluate.ablate lists a target twice")

    def hashed(self) -> dict:
        out = super().hashed()
        if self.rag.enabled:  # a disabled baseline computes nothing, so it must not move the evaluate key
            out["rag"] = self.rag.hashed()
        if self.ablate:  # likewise: no ablation, no extra rows, the key stays where it was
            out["ablate"] = list(self.ablate)
        return out


class Gate(Section):
    """Deploy gate: `production` moves only when every condition holds."""

    # perplexity (causal LMs) is lower-is-better and the two bounds below are relative fractions;
    # accuracy / macro_f1 (classifiers) are higher-is-better and the bounds are absolute (0.01 = 1 point);
    # so are the other [0, 1] task metrics of the evaluation table (exact_match: math, rouge_l: open
    # generation, preference_accuracy: DPO, token_accuracy).
    metric: Literal["perplexity", "accuracy", "macro_f1", "exact_match", "rouge_l", "preference_accuracy",
                    "token_accuracy"] = "perplexity"
    # tuned must improve the base perplexity by at least this fraction (0.1 = 10 % lower)
    min_improvement_over_base: float = Field(0.1, ge=0.0)
    # the served variant may be at most this fraction worse than tuned
    max_quantized_degradation: float = Field(0.05, ge=0.0)
    # "Augmentation must not hurt": tuned (trained with augmentation) may be at most this much worse than
    # tuned_no_augment (the evaluate.ablate: [augment] row), relative for perplexity, absolute points for
    # the higher-is-better metrics (0 = no worse at all). Needs evaluate.ablate: [augment]; None = off.
    # Hashed only when set, so a registry made before this rule still finds its versions.
    max_augment_regression: float | None = Field(None, ge=0.0, json_schema_extra=NOT_HASHED)
    # Continual fine-tuning: tuned's forgetting (its perplexity on the parent version's test records over the
    # parent's, minus 1; tasks/model/forgetting.py) may be at most this. None = off; passes when there is no
    # parent. Hashed only when set, like max_augment_regression.
    max_forgetting: float | None = Field(None, ge=0.0, json_schema_extra=NOT_HASHED)

    def hashed(self) -> dict:
        out = super().hashed()
        if self.max_augment_regression is not None:
            out["max_augment_regression"] = self.max_augment_regression
        if self.max_forgetting is not None:
            out["max_forgetting"] = self.max_forgetting
        return out


class RegistryConfig(Section):
    model_name: str = "demo-tiny-lm"
    gate: Gate = Gate()
    # onnx_int8_dynamic (ONNX Runtime INT8, fused encoder kernels): encoder classifiers/reward models only.
    serve_variant: Literal["tuned", "dynamic_int8", "onnx_int8_dynamic"] = "dynamic_int8"

    @field_validator("model_name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        import re

        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", v):
            raise ValueError("model_name must be letters, digits, '.', '_' or '-' (it becomes a folder name)")
        return v


class ServeConfig(Section):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    # Dynamic batching (/classify): concurrent requests are collected for up to max_batch_wait_ms and
    # run as one padded forward pass of at most max_batch_size texts; 1 = unbatched.
    max_batch_size: int = Field(16, ge=1, le=256)
    max_batch_wait_ms: float = Field(5.0, ge=0.0, le=1000.0)
    # Variant to serve instead of registry.serve_variant (tuned, dynamic_int8); None = the registered one.
    variant: str | None = None
    # torch intra-op threads of the server; 0 = torch's default (one per core). The server's event loop,
    # tokenizer and batching thread need CPU too: on 2 cores the demo's 1M-parameter LM served /generate at
    # 515 tokens/s batched with 2 threads and 1679 with 1 (bench/serve_bench.py --threads, 8 concurrent,
    # same answers). A compute-bound model (MiniLM /classify) gains from the cores instead: measure both.
    threads: int = Field(0, ge=0, le=256)


class RuntimeConfig(Section):
    """How the flow runs, never what it computes: no stage hashes this section, so switching the task
    runner, a timeout or a retry policy recomputes nothing."""

    # "default": Prefect's thread pool in the flow process; a stage's units (files, parts, shards) go to a
    # process pool of its own `workers`. "dask": prefect-dask's DaskTaskRunner, on a local cluster
    # (dask_workers processes) or on an existing scheduler (dask_address: dask-jobqueue, dask-kubernetes);
    # a stage's units are then spread over every worker of that cluster (tasks/common/executor.py).
    task_runner: Literal["default", "dask"] = "default"
    dask_address: str | None = None
    dask_workers: int = Field(2, ge=1)
    dask_threads_per_worker: int = Field(1, ge=1)
    # Transient failures only (OSError, TimeoutError): bad data fails the same way every time.
    retries: int = Field(2, ge=0, le=10)
    retry_delays_s: list[float] = [5.0, 30.0]
    # Per-stage wall-clock limits in seconds; a stage not named gets default_timeout_s (None: no limit).
    stage_timeout_s: dict[str, float] = {}
    default_timeout_s: float | None = Field(None, gt=0)
    # Stages that hold the accelerator carry this tag; the flow makes sure a Prefect tag concurrency
    # limit of gpu_concurrency exists, so two runs (or two fan-out variants) never share one GPU.
    gpu_stages: list[str] = ["finetune", "quantize", "evaluate"]
    gpu_tag: str = "c2m-gpu"
    gpu_concurrency: int = Field(1, ge=1)
    # A cached entry whose code changed since it was made (tasks/common/fingerprint.py) without a VERSION
    # bump: "warn" keeps it and names the stage in `c2m status`/`c2m run`; "rerun" recomputes it in place.
    on_code_change: Literal["warn", "rerun"] = "warn"

    @field_validator("stage_timeout_s")
    @classmethod
    def _positive_timeouts(cls, v: dict[str, float]) -> dict[str, float]:
        bad = {k: t for k, t in v.items() if t <= 0}
        if bad:
            raise ValueError(f"timeouts must be > 0 seconds, got {bad}")
        return v


class PipelineConfig(Section):
    name: str = "corpus2model"
    paths: Paths = Paths()
    ingest: IngestConfig = IngestConfig()
    clean: CleanConfig = CleanConfig()
    dedup: DedupConfig = DedupConfig()
    augment: AugmentConfig = AugmentConfig()
    validate_: ValidateConfig = Field(ValidateConfig(), alias="validate")
    checks: ChecksConfig = ChecksConfig()
    shard: ShardConfig = ShardConfig()
    tokenize: TokenizeConfig = TokenizeConfig()
    model: ModelConfig = ModelConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    quantize: QuantizeConfig = QuantizeConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    registry: RegistryConfig = RegistryConfig()
    serve: ServeConfig = ServeConfig()
    runtime: RuntimeConfig = RuntimeConfig()
    tune: TuneConfig = TuneConfig()

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @model_validator(mode="before")
    @classmethod
    def _finetune_registry(cls, data):
        """finetune hashes and sees only its own sections; "production" (finetune.init, a distill teacher) is
        looked up in paths.registry under registry.model_name, so those two are handed to it (unhashed) here."""
        if not isinstance(data, dict) or not isinstance(data.get("finetune"), dict):
            return data
        ft = data["finetune"]
        paths = data.get("paths") if isinstance(data.get("paths"), dict) else {}
        reg = data.get("registry") if isinstance(data.get("registry"), dict) else {}
        ft = {"registry_root": paths.get("registry", Paths.model_fields["registry"].default),
              "registry_model": reg.get("model_name", RegistryConfig.model_fields["model_name"].default), **ft}
        return {**data, "finetune": ft}

    @model_validator(mode="after")
    def _onnx_serving_is_for_encoders(self) -> "PipelineConfig":
        if self.registry.serve_variant == "onnx_int8_dynamic":
            if self.model.task == "causal_lm":
                raise ValueError("registry.serve_variant onnx_int8_dynamic serves encoder models (model.task "
                                 "classification or reward); a causal LM serves tuned or dynamic_int8")
            if "onnx_int8_dynamic" not in self.quantize.methods:
                raise ValueError("registry.serve_variant onnx_int8_dynamic needs onnx_int8_dynamic in quantize.methods")
        return self

    @model_validator(mode="after")
    def _student_registers_apart(self) -> "PipelineConfig":
        d = self.finetune.distill
        if self.finetune.objective == "distill" and d.teacher == "production" and \
                (d.teacher_model or self.registry.model_name) == self.registry.model_name:
            raise ValueError(f"finetune.distill.teacher: production needs finetune.distill.teacher_model, the registry "
                             f"name of the teacher, different from registry.model_name ({self.registry.model_name!r}) "
                             f"under which the student registers; e.g. teacher_model: {self.registry.model_name}, "
                             f"registry.model_name: {self.registry.model_name}-student")
        return self

    @model_validator(mode="after")
    def _ablation_needs_causal_lm(self) -> "PipelineConfig":
        # The ablated rows are scored by the causal-LM evaluation; a classifier or reward model's evaluation
        # has no such rows, and an ablation it would ignore must not cost a second training run.
        if self.evaluate.ablate and self.model.task != "causal_lm":
            raise ValueError(f"evaluate.ablate {self.evaluate.ablate} needs model.task: causal_lm (got {self.model.task!r}); "
                             f"drop evaluate.ablate")
        return self

    @model_validator(mode="after")
    def _heads_divide_hidden(self) -> "PipelineConfig":
        if self.model.hidden_size % self.model.num_heads:
            raise ValueError(
                f"model.hidden_size ({self.model.hidden_size}) must be divisible by model.num_heads ({self.model.num_heads})"
            )
        return self

    def section(self, name: str) -> dict:
        """The canonical, JSON-able content of one section (what a stage hashes)."""
        attr = "validate_" if name == "validate" else name
        return getattr(self, attr).hashed()


class ConfigError(ValueError):
    """A config that cannot be used; the message names the file and the field."""


# A config is a page of settings. Bounds checked before any Python object is built: YAML aliases
# let 1 KB name a billion values ("billion laughs"), which validation and error messages would expand.
MAX_CONFIG_BYTES = 1 << 20
MAX_CONFIG_VALUES = 100_000


def _expanded_values(node, memo: dict) -> int:
    """How many YAML values ``node`` stands for with every alias expanded (an alias is the same
    node object again; memoised per node, so this costs the size of the file, not of the expansion)."""
    key = id(node)
    if key in memo:
        return memo[key]
    memo[key] = MAX_CONFIG_VALUES + 1  # a node reached again while it is counted: a recursive alias
    if isinstance(node, yaml.MappingNode):
        n = 1 + sum(_expanded_values(k, memo) + _expanded_values(v, memo) for k, v in node.value)
    elif isinstance(node, yaml.SequenceNode):
        n = 1 + sum(_expanded_values(v, memo) for v in node.value)
    else:
        n = 1
    memo[key] = n = min(n, MAX_CONFIG_VALUES + 1)
    return n


def _read_yaml(path: Path):
    """Parse a config file within MAX_CONFIG_BYTES and MAX_CONFIG_VALUES (aliases expanded)."""
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: {size} bytes is not a config (limit {MAX_CONFIG_BYTES}); point to the YAML recipe")
    text = path.read_text(encoding="utf-8")
    node = yaml.compose(text, Loader=yaml.SafeLoader)
    if node is not None and _expanded_values(node, {}) > MAX_CONFIG_VALUES:
        raise ConfigError(f"{path}: YAML aliases expand to more than {MAX_CONFIG_VALUES} values; write the settings out "
                          f"instead of nesting anchors (&name / *name)")
    return yaml.safe_load(text)


def load_config(path: str | Path, overrides: dict | None = None) -> PipelineConfig:
    """Read and validate a YAML config. ``overrides`` maps dotted keys to values (``finetune.learning_rate``)."""
    path = Path(path)
    try:
        data = _read_yaml(path) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); save the config as UTF-8") from None
    except RecursionError:
        raise ConfigError(f"{path}: YAML nested too deeply to be a config") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    return parse_config(apply_overrides(data, overrides), source=str(path))


def apply_overrides(data: dict, overrides: dict | None) -> dict:
    """Set dotted keys (``finetune.learning_rate``) in a raw config mapping, creating sections as needed."""
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, leaf = dotted.split(".")
        for i, p in enumerate(parents):
            node = node.setdefault(p, {})
            if not isinstance(node, dict):  # `--set name.x=1`: name is a value, not a section
                where = ".".join(parents[: i + 1])
                raise ConfigError(f"--set {dotted}: {where} is a value ({type(node).__name__}), not a section; "
                                  f"set it as --set {where}=VALUE")
        node[leaf] = value
    return data


def parse_overrides(values: list[str] | None) -> dict:
    """``--set finetune.learning_rate=1e-4`` -> {"finetune.learning_rate": 0.0001} (YAML scalars);
    every command that takes ``--set`` (c2m run/status/tune, the standalone stages) parses it here."""
    out = {}
    for item in values or []:
        if "=" not in item:
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        try:
            out[k.strip()] = yaml.safe_load(v)
        except yaml.YAMLError as e:  # `--set 'clean.min_chars=[1'`
            raise ConfigError(f"--set {item}: the value is not valid YAML ({getattr(e, 'problem', None) or e}); "
                              f"quote it, e.g. --set '{k.strip()}=\"...\"'") from None
    return out


def parse_config(data: dict, source: str = "<config>") -> PipelineConfig:
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            field = ".".join(str(p) for p in err["loc"]).replace("validate_", "validate")
            lines.append(f"  {field}: {err['msg']} (got {err.get('input')!r:.80})")
        raise ConfigError(f"{source}: invalid config\n" + "\n".join(lines)) from None
