"""The metrics the evaluate stage reports, as plain functions of predictions and references: no model,
no tokenizer, no files (tasks/evaluate.py runs the models and fills its table with these numbers;
tasks/model/classify.py does the same for classifiers; bench/ reads percentiles the same way).
"""
from __future__ import annotations

import math
import re

# A number: optional sign, digits with optional thousands commas ("1,234"), optional decimals; or ".5".
_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\.\d+")


def extract_final_number(text: str | None) -> float | None:
    """GSM8K-style final answer: the first number after the last "####", else the last number in the text."""
    if not text:
        return None
    if "####" in text:
        found = _NUMBER.findall(text.rsplit("####", 1)[1])
        if found:
            return _to_float(found[0])
    found = _NUMBER.findall(text)
    return _to_float(found[-1]) if found else None


def _to_float(s: str) -> float | None:
    try:
        return float(s.replace(",", ""))
    except ValueError:
        return None


def answers_match(predicted: str, reference: str, tol: float = 1e-6) -> bool:
    want, got = extract_final_number(reference), extract_final_number(predicted)
    return want is not None and got is not None and math.isclose(got, want, rel_tol=0.0, abs_tol=tol)


def agreement(preds: list[int], reference: list[int]) -> float | None:
    """Share of positions where two models' argmax agree (the same records, so the same positions)."""
    if not preds or len(preds) != len(reference):
        return None
    return sum(a == b for a, b in zip(preds, reference)) / len(preds)


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 (longest common subsequence of words, Porter-stemmed), rouge-score's implementation."""
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True).score(reference, prediction)["rougeL"].fmeasure


def macro_f1(truth: list[str], predicted: list[str]) -> float | None:
    """Unweighted mean over the labels in ``truth`` of per-label F1 (a label never predicted scores 0)."""
    if not truth:
        return None
    scores = []
    for label in sorted(set(truth)):
        tp = sum(t == label and p == label for t, p in zip(truth, predicted))
        fp = sum(t != label and p == label for t, p in zip(truth, predicted))
        fn = sum(t == label and p != label for t, p in zip(truth, predicted))
        scores.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return sum(scores) / len(scores)


def accuracy_f1(y_true: list[int], y_pred: list[int], n_labels: int) -> tuple[float, float]:
    """Accuracy and macro-F1 (mean over labels present in y_true or y_pred; F1 of a label = 0 when
    it is never predicted correctly)."""
    if not y_true:
        return float("nan"), float("nan")
    acc = sum(int(a == b) for a, b in zip(y_true, y_pred)) / len(y_true)
    f1s = []
    for k in range(n_labels):
        tp = sum(1 for a, b in zip(y_true, y_pred) if a == k and b == k)
        fp = sum(1 for a, b in zip(y_true, y_pred) if a != k and b == k)
        fn = sum(1 for a, b in zip(y_true, y_pred) if a == k and b != k)
        if tp + fp + fn == 0:
            continue
        f1s.append(2 * tp / (2 * tp + fp + fn))
    return acc, sum(f1s) / len(f1s)


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default), without numpy."""
    s = sorted(values)
    pos = (len(s) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)
