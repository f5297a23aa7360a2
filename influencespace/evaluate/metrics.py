"""Metrics of the benchmark (../shared/BENCHMARK.md), as pure numpy functions.

Fairness metrics come from fairlearn, the library the field uses, so their definitions are the
standard ones:

- demographic-parity difference = max_g P(ŷ=1 | g) − min_g P(ŷ=1 | g)
- equal-opportunity difference  = max_g P(ŷ=1 | y=1, g) − min_g P(ŷ=1 | y=1, g)   (TPR gap)

Both are tested against published values on Adult and COMPAS (tests/evaluate/test_metrics.py).
"""

from __future__ import annotations

import numpy as np


def demographic_parity_difference(y_true: np.ndarray, y_pred: np.ndarray, groups: np.ndarray) -> float:
    from fairlearn.metrics import demographic_parity_difference as dpd

    return float(dpd(y_true, y_pred, sensitive_features=groups))


def equal_opportunity_difference(y_true: np.ndarray, y_pred: np.ndarray, groups: np.ndarray) -> float:
    from fairlearn.metrics import equal_opportunity_difference as eod

    return float(eod(y_true, y_pred, sensitive_features=groups))


def group_rates(y_true: np.ndarray, y_pred: np.ndarray, groups: np.ndarray) -> dict[str, dict[str, float]]:
    """Per group: selection rate, TPR, FPR and accuracy (fairlearn's MetricFrame)."""
    from fairlearn.metrics import MetricFrame, false_positive_rate, selection_rate, true_positive_rate

    frame = MetricFrame(
        metrics={
            "selection_rate": selection_rate,
            "tpr": true_positive_rate,
            "fpr": false_positive_rate,
            "accuracy": lambda t, p: float(np.mean(np.asarray(t) == np.asarray(p))),
        },
        y_true=y_true,
        y_pred=y_pred,
        sensitive_features=groups,
    )
    return {str(g): {k: float(v) for k, v in row.items()} for g, row in frame.by_group.iterrows()}


def accuracy(labels: np.ndarray, predictions: np.ndarray) -> float:
    return float(np.mean(np.asarray(labels) == np.asarray(predictions)))


def group_accuracies(labels: np.ndarray, predictions: np.ndarray, groups: np.ndarray) -> dict[str, float]:
    groups = np.asarray(groups)
    return {str(g): accuracy(labels[groups == g], predictions[groups == g]) for g in np.unique(groups)}


def worst_group_accuracy(labels: np.ndarray, predictions: np.ndarray, groups: np.ndarray) -> float:
    return min(group_accuracies(labels, predictions, groups).values())


def zero_shot_predictions(image_embeddings: np.ndarray, prompt_embeddings: np.ndarray) -> np.ndarray:
    """Class = argmax_c cos(image, prompt_c)."""
    return np.argmax(_normalise(image_embeddings) @ _normalise(prompt_embeddings).T, axis=1)


def recall_at_k(image_embeddings: np.ndarray, text_embeddings: np.ndarray, ks: tuple[int, ...] = (1, 5)) -> dict[int, float]:
    """Image→text retrieval: share of images whose own caption (same row) is among the k nearest texts."""
    sims = _normalise(image_embeddings) @ _normalise(text_embeddings).T
    own = np.diag(sims)
    # Rank of the own caption = number of texts scoring strictly higher.
    rank = (sims > own[:, None]).sum(axis=1)
    return {k: float(np.mean(rank < k)) for k in ks}


def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def recall_at_k_distinct(
    image_embeddings: np.ndarray, text_embeddings: np.ndarray, ks: tuple[int, ...] = (1, 5), decimals: int = 5
) -> dict[int, float]:
    """Image→text recall@k over the *distinct* captions of the set.

    Rows that share a caption (the benchmark's test captions are the ten class prompts) would otherwise
    tie with each other and turn recall@k into a count of duplicates. Captions are grouped by their
    embedding (rounded to ``decimals``); an image scores a hit when its own caption is among the k
    distinct captions most similar to it. With all captions distinct this is :func:`recall_at_k`.
    """
    texts = np.asarray(text_embeddings, dtype=np.float64)
    _, first, owner = np.unique(np.round(texts, decimals), axis=0, return_index=True, return_inverse=True)
    sims = _normalise(image_embeddings) @ _normalise(texts[first]).T
    own = sims[np.arange(len(sims)), owner.reshape(-1)]
    rank = (sims > own[:, None]).sum(axis=1)
    return {k: float(np.mean(rank < k)) for k in ks}


def bootstrap_fairness(y_true: np.ndarray, predictions: dict[str, list[np.ndarray]], groups: np.ndarray,
                       resamples: int = 1000, seed: int = 0, chunk: int = 250) -> dict[str, dict[str, np.ndarray]]:
    """Test-set bootstrap of the DP and EO differences, paired across policies and seeds.

    ``predictions[key]`` holds one binary prediction vector per training seed. Every resample b draws
    the test rows once (multinomial counts w_b, Σ w_b = n) and re-evaluates every key and seed on that
    same draw, so differences between keys are paired. Per key, ``{"dp": (B,), "eo": (B,)}`` of the
    seed-mean differences: DP = max_g − min_g of Σ w ŷ [g] / Σ w [g], EO the same of the TPR
    Σ w ŷ y [g] / Σ w y [g] (fairlearn's definitions: with w = 1 they equal
    :func:`demographic_parity_difference` and :func:`equal_opportunity_difference`). Why it is needed:
    with ≈ 300 positives per group a TPR gap has a standard error near 0.024, as large as the gaps the
    benchmark compares."""
    y = np.asarray(y_true).astype(bool)
    _, codes = np.unique(np.asarray(groups), return_inverse=True)
    onehot = np.eye(codes.max() + 1)[codes]  # (n, G)
    n = len(y)
    rng = np.random.default_rng(seed)
    out: dict[str, dict[str, list]] = {k: {"dp": [], "eo": []} for k in predictions}
    for start in range(0, resamples, chunk):
        w = rng.multinomial(n, np.full(n, 1.0 / n), size=min(chunk, resamples - start)).astype(np.float64)
        members, positives = w @ onehot, w @ (onehot * y[:, None])
        for key, per_seed in predictions.items():
            dp, eo = [], []
            for pred in per_seed:
                pred = np.asarray(pred).astype(bool)
                with np.errstate(invalid="ignore", divide="ignore"):
                    rate = (w @ (onehot * pred[:, None])) / members
                    tpr = (w @ (onehot * (pred & y)[:, None])) / positives
                dp.append(np.nanmax(rate, axis=1) - np.nanmin(rate, axis=1))
                eo.append(np.nanmax(tpr, axis=1) - np.nanmin(tpr, axis=1))
            out[key]["dp"].append(np.mean(dp, axis=0))
            out[key]["eo"].append(np.mean(eo, axis=0))
    return {k: {m: np.concatenate(v[m]) for m in ("dp", "eo")} for k, v in out.items()}


def percentile_interval(values: np.ndarray, confidence: float = 0.95) -> tuple[float, float]:
    tail = (1 - confidence) / 2 * 100
    low, high = np.nanpercentile(np.asarray(values, dtype=np.float64), [tail, 100 - tail])
    return float(low), float(high)
