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
