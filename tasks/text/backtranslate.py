"""Back-translation for augment: source -> pivot -> source with any Hugging Face seq2seq model.

* Models are given per direction (``"en-de": "Helsinki-NLP/opus-mt-en-de"`` or a local folder);
  one multilingual model (NLLB, M2M100) may serve several directions through ``lang_codes``.
  Loading goes through ``AutoTokenizer`` / ``AutoModelForSeq2SeqLM.from_pretrained`` on the local
  snapshot (``local_files_only`` when ``HF_HUB_OFFLINE`` is set).
* Texts are split into sentences (a rule splitter: sentence-final punctuation followed by space and
  an upper-case letter, digit or quote, not after a known abbreviation; line breaks always split),
  each distinct sentence is translated once, and the text is rejoined with its own separators.
* ``generate`` runs on batches of sentences sorted by length (less padding), with the configured
  decoding (``num_beams``, ``max_new_tokens``, ``do_sample`` ...), on the GPU when there is one.
* ``TranslationCache``: one SQLite file (WAL, busy timeout: safe with several processes) under the
  run store, content-addressed by sha256(model identity, decoding, source lang, target lang,
  sentence). The model identity is the sha256 of the model folder's files (weights, tokenizer,
  configs), so a rerun, or a run on a grown dataset, translates only sentences never translated by
  the same model with the same decoding; a retrained model at the same path misses.
* ``check_candidate``: filters with named reasons (bt_copy, bt_length_ratio, bt_language,
  bt_too_close, bt_too_far). The round-trip band uses sacrebleu chrF of the back-translation
  against the original: too close adds nothing, too far changed the meaning.

``build_tiny_marian`` is test and benchmark tooling (no translation model is reachable offline):
a randomly initialised MarianMT with a tokenizer trained on real parallel sentences, saved so the
production loading path reads it. It translates nothing meaningful.
"""
from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import re
import sqlite3
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from corpus2model.tasks.stage import StageError, canonical_json

CACHE_FILE = "translations.sqlite"

# ---------------------------------------------------------------------------------------------
# sentence splitting
# ---------------------------------------------------------------------------------------------
_ABBREV = {
    "mr", "mrs", "ms", "dr", "prof", "sr", "jr", "st", "vs", "etc", "e.g", "i.e", "inc", "ltd", "co",
    "corp", "gen", "gov", "sen", "rep", "rev", "fig", "no", "vol", "jan", "feb", "mar", "apr", "jun",
    "jul", "aug", "sep", "sept", "oct", "nov", "dec", "u.s", "u.k", "approx", "dept", "est", "mt",
}
# End punctuation, optional closing quotes/brackets, then whitespace; the next sentence starts with
# an upper-case letter, a digit or an opening quote/bracket.
_BOUNDARY = re.compile(r"([.!?\u2026]+[\"'\u201d\u2019)\]]*)(\s+)(?=[\"'\u201c\u2018(\[]?[A-Z0-9\u00C0-\u00DE])")
_NEWLINES = re.compile(r"(\s*\n\s*)")


def split_sentences(text: str) -> list[tuple[str, str]]:
    """``[(sentence, separator after it), ...]``; ``"".join(s + sep)`` gives ``text`` back exactly.
    Leading whitespace is returned as an empty sentence with that separator."""
    out: list[tuple[str, str]] = []
    body = text.lstrip()
    if len(body) < len(text):
        out.append(("", text[:len(text) - len(body)]))
    for block, nl in _pairs(_NEWLINES.split(body)):
        start = 0
        for m in _BOUNDARY.finditer(block):
            end = m.end(1)
            word = block[:m.start(1)].rsplit(None, 1)[-1] if block[:m.start(1)].strip() else ""
            # "Mr. Smith", "e.g. This", "J. Smith": the period belongs to a word, not a sentence end.
            if m.group(1) == "." and (word.lower().rstrip(".") in _ABBREV or (len(word) == 1 and word.isupper())):
                continue
            out.append((block[start:end], m.group(2)))
            start = m.end()
        out.append((block[start:], nl))
    # Merge empty pieces (blank text, leading separators) into the previous separator.
    merged: list[tuple[str, str]] = []
    for sent, sep in out:
        if not sent.strip() and merged:
            merged[-1] = (merged[-1][0], merged[-1][1] + sent + sep)
        else:
            merged.append((sent, sep))
    return merged


def _pairs(parts: list[str]) -> Iterable[tuple[str, str]]:
    # re.split with one group: [text, sep, text, sep, ..., text]
    for i in range(0, len(parts), 2):
        yield parts[i], parts[i + 1] if i + 1 < len(parts) else ""


# ---------------------------------------------------------------------------------------------
# model identity and loading
# ---------------------------------------------------------------------------------------------
_IDENTITY: dict[tuple, str] = {}
# What AutoTokenizer / AutoModelForSeq2SeqLM read (PyTorch weights, configs, tokenizer files);
# hub repos also hold TF/Flax/Rust weights, which are neither downloaded nor hashed.
MODEL_FILES = ["*.json", "*.safetensors", "pytorch_model*.bin", "*.spm", "*.model", "*.txt", "*.tiktoken"]


def resolve_model_dir(name_or_path: str) -> Path:
    """A local folder as is; a hub id through the local Hugging Face cache (downloading only when
    the hub is reachable and HF_HUB_OFFLINE is not set)."""
    p = Path(name_or_path).expanduser()
    if p.is_dir():
        return p.resolve()
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name_or_path, local_files_only=offline, allow_patterns=MODEL_FILES))
    except Exception as e:  # noqa: BLE001 - any hub/cache failure has the same fix
        raise StageError(
            f"translation model {name_or_path!r} is neither a local folder nor in the Hugging Face cache "
            f"({type(e).__name__}: {e}); download it once (huggingface-cli download {name_or_path}) or set "
            f"augment.backtranslate.models to a local folder, or drop 'backtranslate' from augment.methods"
        ) from e


def model_identity(name_or_path: str) -> str:
    """sha256 over the model folder's MODEL_FILES (names and contents): what the translation cache
    and the stage key depend on. Memoised per process by (path, size, mtime) of each file."""
    folder = resolve_model_dir(name_or_path)
    files = sorted(f for f in folder.rglob("*") if f.is_file() and any(fnmatch.fnmatch(f.name, p) for p in MODEL_FILES))
    if not files:
        raise StageError(f"translation model folder {folder} holds no files")
    stamp = tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    if stamp not in _IDENTITY:
        h = hashlib.sha256()
        for f in files:
            h.update(str(f.relative_to(folder)).encode("utf-8") + b"\0")
            with open(f, "rb") as fh:
                while block := fh.read(1 << 20):
                    h.update(block)
        _IDENTITY[stamp] = h.hexdigest()
    return _IDENTITY[stamp]


def pick_device(device: str = "auto") -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


# ---------------------------------------------------------------------------------------------
# the translation cache
# ---------------------------------------------------------------------------------------------
def cache_key(model_id: str, decoding: dict, src: str, tgt: str, sentence: str) -> str:
    payload = canonical_json({"model": model_id, "decoding": decoding, "src": src, "tgt": tgt, "text": sentence})
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


class TranslationCache:
    """sentence translations by content key, in one SQLite file. WAL mode lets readers run beside a
    writer; the busy timeout makes a second process wait for the write lock instead of failing;
    ``INSERT OR IGNORE`` makes two processes translating the same sentence harmless."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._conn: sqlite3.Connection | None = None
        self._pid = -1

    def _db(self) -> sqlite3.Connection:
        if self._conn is None or self._pid != os.getpid():  # a forked child opens its own
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, timeout=60.0)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("CREATE TABLE IF NOT EXISTS translations (key TEXT PRIMARY KEY, text TEXT NOT NULL)")
            conn.commit()
            self._conn, self._pid = conn, os.getpid()
        return self._conn

    def get_many(self, keys: list[str]) -> dict[str, str]:
        db = self._db()
        out: dict[str, str] = {}
        for i in range(0, len(keys), 500):  # under SQLite's bound-parameter limit
            chunk = keys[i:i + 500]
            q = f"SELECT key, text FROM translations WHERE key IN ({','.join('?' * len(chunk))})"
            out.update(db.execute(q, chunk).fetchall())
        return out

    def put_many(self, items: dict[str, str]) -> None:
        if not items:
            return
        db = self._db()
        with db:
            db.executemany("INSERT OR IGNORE INTO translations (key, text) VALUES (?, ?)", list(items.items()))

    def __len__(self) -> int:
        return self._db().execute("SELECT COUNT(*) FROM translations").fetchone()[0]

    def close(self) -> None:
        if self._conn is not None and self._pid == os.getpid():
            self._conn.close()
        self._conn = None


# ---------------------------------------------------------------------------------------------
# the translator
# ---------------------------------------------------------------------------------------------
@dataclass
class TranslateStats:
    requested: int = 0  # distinct sentences asked for
    cache_hits: int = 0
    translated: int = 0  # sentences that went through the model
    model_calls: int = 0  # generate() calls

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class Translator:
    """Translates sentences with one model per direction; ``cache`` is optional (None: always translate).

    ``models``: ``{"en-de": hub id or folder, "de-en": ...}``; ``lang_codes``: model-specific codes
    for multilingual models (``{"en": "eng_Latn", "de": "deu_Latn"}`` for NLLB); empty for Marian."""

    models: dict[str, str]
    decoding: dict = field(default_factory=lambda: {"num_beams": 4, "max_new_tokens": 256})
    batch_size: int = 32
    device: str = "auto"
    cache: TranslationCache | None = None
    lang_codes: dict[str, str] = field(default_factory=dict)
    max_input_tokens: int = 512
    threads: int = 0  # torch CPU threads (process-wide); 0 keeps torch's default
    allow_pickle: bool = False  # many opus-mt repos ship only pytorch_model.bin: refused unless allowed
    stats: TranslateStats = field(default_factory=TranslateStats)
    _loaded: dict = field(default_factory=dict, repr=False)

    def direction(self, src: str, tgt: str) -> str:
        name = self.models.get(f"{src}-{tgt}")
        if not name:
            raise StageError(
                f"no translation model for {src}->{tgt}: augment.backtranslate.models has {sorted(self.models)}; "
                f"add \"{src}-{tgt}\": <hub id or folder>"
            )
        return name

    def identity(self, src: str, tgt: str) -> str:
        return model_identity(self.direction(src, tgt))

    def _load(self, name: str):
        if name not in self._loaded:
            import torch
            from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

            from corpus2model.tasks.common.security import load_kwargs

            folder = resolve_model_dir(name)
            safe = load_kwargs(folder, self.allow_pickle)
            tok = AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
            model = AutoModelForSeq2SeqLM.from_pretrained(folder, local_files_only=True, **safe)
            dev = pick_device(self.device)
            if self.threads and dev == "cpu":
                torch.set_num_threads(self.threads)
            model.to(dev).eval()  # generate runs under inference_mode; no process-wide grad switch
            self._loaded[name] = (tok, model, dev)
        return self._loaded[name]

    def _generate(self, sentences: list[str], src: str, tgt: str) -> list[str]:
        """The model's translations of ``sentences`` (no cache), in batches sorted by length."""
        import torch

        tok, model, dev = self._load(self.direction(src, tgt))
        gen = dict(self.decoding)
        seed = gen.pop("seed", 0)
        if self.lang_codes:
            tok.src_lang = self.lang_codes.get(src, src)
            code = self.lang_codes.get(tgt, tgt)
            lang_id = tok.get_lang_id(code) if hasattr(tok, "get_lang_id") else tok.convert_tokens_to_ids(code)
            if lang_id is None or lang_id == tok.unk_token_id:
                raise StageError(
                    f"language code {code!r} (augment.backtranslate.lang_codes[{tgt!r}]) is not a token of the "
                    f"{src}->{tgt} model's tokenizer; use the model's codes (NLLB: eng_Latn, deu_Latn; M2M100: en, de)"
                )
            gen["forced_bos_token_id"] = lang_id
        order = sorted(range(len(sentences)), key=lambda i: len(sentences[i]))
        out: list[str] = [""] * len(sentences)
        for b in range(0, len(order), self.batch_size):
            idx = order[b:b + self.batch_size]
            enc = tok([sentences[i] for i in idx], return_tensors="pt", padding=True, truncation=True,
                      max_length=self.max_input_tokens).to(dev)
            if gen.get("do_sample"):
                torch.manual_seed(seed)  # sampled output is fixed by the seed, then kept by the cache
            with torch.inference_mode():
                ids = model.generate(**enc, **gen)
            self.stats.model_calls += 1
            for i, text in zip(idx, tok.batch_decode(ids, skip_special_tokens=True)):
                out[i] = text.strip()
        self.stats.translated += len(sentences)
        return out

    def translate(self, sentences: list[str], src: str, tgt: str) -> list[str]:
        """Translations of ``sentences`` (in order): cached ones from the cache, the others through
        the model once per distinct sentence, then stored."""
        distinct = [s for s in dict.fromkeys(sentences) if s.strip()]
        self.stats.requested += len(distinct)
        found: dict[str, str] = {}
        keys: dict[str, str] = {}
        if self.cache is not None and distinct:
            mid = self.identity(src, tgt)
            keys = {s: cache_key(mid, self.decoding, src, tgt, s) for s in distinct}
            hit = self.cache.get_many(list(keys.values()))
            found = {s: hit[k] for s, k in keys.items() if k in hit}
            self.stats.cache_hits += len(found)
        missing = [s for s in distinct if s not in found]
        if missing:
            new = dict(zip(missing, self._generate(missing, src, tgt)))
            if self.cache is not None:
                self.cache.put_many({keys[s]: t for s, t in new.items()})
            found.update(new)
        return [found.get(s, s) for s in sentences]  # blank pieces stay as they are

    def translate_texts(self, texts: list[str], src: str, tgt: str) -> list[str]:
        """Whole texts: split into sentences, translate all distinct sentences at once, rejoin."""
        return [t for t, _ in self._roundtrip_parts(texts, src, [tgt])]

    def roundtrip(self, texts: list[str], src: str, pivot: str) -> list[tuple[str, str]]:
        """``[(pivot text, back-translation), ...]``: each sentence goes src -> pivot -> src, and both
        texts are rejoined with the original's separators (sentence alignment is kept)."""
        return self._roundtrip_parts(texts, src, [pivot, src])

    def _roundtrip_parts(self, texts: list[str], src: str, hops: list[str]) -> list[tuple[str, str]]:
        split = [split_sentences(t) for t in texts]
        layers = [[[s for s, _ in parts] for parts in split]]
        lang = src
        for hop in hops:
            flat = [s for doc in layers[-1] for s in doc]
            done = dict(zip(flat, self.translate(flat, lang, hop)))
            layers.append([[done[s] for s in doc] for doc in layers[-1]])
            lang = hop
        joined = [["".join(s + sep for s, (_, sep) in zip(doc, split[i])) for i, doc in enumerate(layer)]
                  for layer in layers[1:]]
        return [(joined[0][i], joined[-1][i]) for i in range(len(texts))]


# ---------------------------------------------------------------------------------------------
# filters
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FilterConfig:
    min_length_ratio: float = 0.5
    max_length_ratio: float = 2.0
    check_language: bool = True
    language_min_chars: int = 20
    too_close_chrf: float = 90.0
    too_far_chrf: float = 35.0


_WS = re.compile(r"\s+")


def _norm(text: str) -> str:
    return _WS.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()


def detect_language(text: str) -> str:
    import py3langid

    return py3langid.classify(text)[0]


def chrf(hypothesis: str, reference: str) -> float:
    """sacrebleu sentence chrF (0-100)."""
    return float(_chrf_metric().sentence_score(hypothesis, [reference]).score) if hypothesis.strip() else 0.0


_CHRF = None


def _chrf_metric():
    global _CHRF
    if _CHRF is None:
        from sacrebleu.metrics import CHRF

        _CHRF = CHRF()
    return _CHRF


def length_ratio(a: str, b: str) -> float:
    """len(a) / len(b) in characters without whitespace (German compounds and French spacing
    make word counts a poorer measure across languages)."""
    na, nb = len(_WS.sub("", a)), len(_WS.sub("", b))
    return na / nb if nb else (0.0 if na == 0 else float("inf"))


# Scripts written without spaces: a character count says little next to an alphabetic source
# (NTREX Chinese references are ~0.3x the English length), so their hop skips the length ratio.
NO_CHAR_RATIO = {"zh", "ja", "ko", "th", "lo", "km", "my"}
# py3langid labels that count as the configured language (it tells Wu Chinese from Mandarin).
LANG_ALIASES = {"zh": {"zh", "wuu", "yue"}}


def check_pair(source: str, translation: str, target_lang: str, f: FilterConfig,
               source_lang: str | None = None) -> tuple[str | None, float | None, str]:
    """One translation hop: copy, length ratio, language. (reason or None, score, detail)."""
    if _norm(translation) == _norm(source):
        return "bt_copy", None, f"{target_lang} output equals its input"
    r = length_ratio(translation, source)
    if not ({target_lang, source_lang} & NO_CHAR_RATIO) and not f.min_length_ratio <= r <= f.max_length_ratio:
        return "bt_length_ratio", r, f"{target_lang} length ratio {r:.2f} outside [{f.min_length_ratio}, {f.max_length_ratio}]"
    if f.check_language and len(translation) >= f.language_min_chars:
        got = detect_language(translation)
        if got not in LANG_ALIASES.get(target_lang, {target_lang}):
            return "bt_language", None, f"expected {target_lang}, detected {got}"
    return None, r, ""


def roundtrip_band(original: str, back: str, f: FilterConfig) -> tuple[str | None, float, str]:
    """chrF of the back-translation against the original: >= too_close adds nothing new,
    < too_far no longer says the same thing."""
    score = chrf(back, original)
    if score >= f.too_close_chrf:
        return "bt_too_close", score, f"chrF {score:.1f} >= {f.too_close_chrf}"
    if score < f.too_far_chrf:
        return "bt_too_far", score, f"chrF {score:.1f} < {f.too_far_chrf}"
    return None, score, ""


def check_candidate(original: str, pivot_text: str, back: str, src: str, pivot: str,
                    f: FilterConfig) -> tuple[str | None, float | None, str]:
    """All filters on one back-translation, first failure wins: the pivot hop (copy, length ratio,
    language), the return hop (same), then the round-trip chrF band."""
    reason, score, detail = check_pair(original, pivot_text, pivot, f, src)
    if reason:
        return reason, score, "pivot: " + detail
    reason, score, detail = check_pair(original, back, src, f, src)
    if reason:
        return reason, score, "back: " + detail
    return roundtrip_band(original, back, f)


# ---------------------------------------------------------------------------------------------
# test / benchmark tooling: a tiny random Marian model with a real tokenizer
# ---------------------------------------------------------------------------------------------
def read_parallel(path: str | Path, langs: Iterable[str], limit: int | None = None) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            if all(row.get(l) for l in langs):
                rows.append(row)
                if limit and len(rows) >= limit:
                    break
    return rows


def build_tiny_marian(out_dir: str | Path, parallel_jsonl: str | Path, src: str = "en", tgt: str = "de",
                      vocab_size: int = 800, d_model: int = 32, layers: int = 1, seed: int = 0,
                      max_sentences: int = 600) -> Path:
    """TEST/BENCH TOOLING, not a translator: a randomly initialised MarianMT (``d_model``, ``layers``)
    with a Unigram tokenizer trained on ``src`` and ``tgt`` sentences of ``parallel_jsonl``, saved
    with ``save_pretrained`` so AutoTokenizer / AutoModelForSeq2SeqLM load it like a hub model."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import MarianConfig, MarianMTModel, PreTrainedTokenizerFast

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = read_parallel(parallel_jsonl, (src, tgt), max_sentences)
    specials = ["<pad>", "</s>", "<unk>"]
    tk = Tokenizer(models.Unigram())
    tk.pre_tokenizer = pre_tokenizers.Metaspace()
    tk.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=specials, unk_token="<unk>", show_progress=False)
    tk.train_from_iterator([r[l] for r in rows for l in (src, tgt)], trainer)
    eos = tk.token_to_id("</s>")
    tk.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A $B </s>", special_tokens=[("</s>", eos)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                  model_max_length=256)
    tok.save_pretrained(out)
    v = tk.get_vocab_size()
    pad = tk.token_to_id("<pad>")
    cfg = MarianConfig(
        vocab_size=v, decoder_vocab_size=v, d_model=d_model, encoder_layers=layers, decoder_layers=layers,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=2 * d_model, decoder_ffn_dim=2 * d_model,
        max_position_embeddings=256, pad_token_id=pad, eos_token_id=eos, decoder_start_token_id=pad,
        forced_eos_token_id=eos, scale_embedding=True,
    )
    torch.manual_seed(seed)
    model = MarianMTModel(cfg)
    model.save_pretrained(out)
    return out
