"""Scoring a trained model on the test split: zero-shot classes, retrieval, groups, fairness.

The test split's captions are the class prompts ("a photo of a sneaker."), so each class's prompt
embedding is the (normalised mean of the) projected text features of its test rows — for the
benchmark these rows share one caption, for user data with varied captions it is a prompt ensemble.
Predictions are argmax_c cos(image, prompt_c). The binary fairness task is "is the predicted class
positive" (footwear on the benchmark) against "is the true class positive", compared across ``group``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from influencespace import storage
from influencespace.errors import InputDataError
from influencespace.evaluate import metrics
from influencespace.train.data import fixed_size_matrix


@dataclass
class TestSet:
    ids: np.ndarray
    image: np.ndarray  # frozen tower embeddings
    text: np.ndarray
    label: np.ndarray
    group: np.ndarray | None
    pixels: np.ndarray | None = None  # [n, S, S, 3] uint8 and [n, L] int32 tokens: the raw test pairs, for a
    tokens: np.ndarray | None = None  # target that encodes them itself (train.target=open_clip)


def read_test(uri: str) -> TestSet:
    if not storage.parquet_files(uri):
        raise InputDataError(f"no Parquet files in the test split at {uri}")
    names = set(storage.schema(uri).names)
    if "label" not in names:
        raise InputDataError(
            f"the test split at {uri} has no 'label' column; zero-shot accuracy needs labelled test rows "
            "(data.test_uri with a label column)"
        )
    columns = ["id", "image_embedding", "text_embedding", "label"] + (["group"] if "group" in names else [])
    table = storage.read_table(uri, columns=columns)
    if table.num_rows == 0:
        raise InputDataError(f"the test split at {uri} is empty")
    group = np.asarray(table.column("group").to_pylist(), dtype=object).astype(str) if "group" in names else None
    return TestSet(
        ids=np.asarray(table.column("id").to_pylist(), dtype=object),
        image=fixed_size_matrix(table.column("image_embedding")),
        text=fixed_size_matrix(table.column("text_embedding")),
        label=np.asarray(table.column("label").to_pylist(), dtype=np.int64),
        group=group,
    )


def class_prompts(text_features: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(classes, prompt features): per label present, the normalised mean of its rows' text features."""
    classes = np.unique(labels)
    prompts = np.stack([text_features[labels == c].mean(axis=0) for c in classes])
    return classes, prompts / np.maximum(np.linalg.norm(prompts, axis=1, keepdims=True), 1e-12)


def zero_shot_classes(image_features: np.ndarray, text_features: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The class each test image is closest to among the class prompts (zero-shot prediction)."""
    classes, prompts = class_prompts(text_features, labels)
    return classes[metrics.zero_shot_predictions(image_features, prompts)]


def score_features(
    image_features: np.ndarray,
    text_features: np.ndarray,
    labels: np.ndarray,
    groups: np.ndarray | None,
    positive_classes: tuple[int, ...] | None,
    predicted: np.ndarray | None = None,
) -> dict:
    """Every model metric of docs/evaluation.md from projected test features (``predicted``: the
    zero-shot classes when the caller has them already)."""
    predicted = zero_shot_classes(image_features, text_features, labels) if predicted is None else predicted
    recall = metrics.recall_at_k_distinct(image_features, text_features, (1, 5))
    out: dict = {
        "zero_shot_acc": metrics.accuracy(labels, predicted),
        "recall_at_1": recall[1],
        "recall_at_5": recall[5],
        "group_acc": None,
        "worst_group_acc": None,
        "binary_acc": None,
        "dp_diff": None,
        "eo_diff": None,
        "group_rates": None,
    }
    if groups is not None:
        out["group_acc"] = metrics.group_accuracies(labels, predicted, groups)
        out["worst_group_acc"] = min(out["group_acc"].values())
    if positive_classes:
        positive = np.asarray(sorted(positive_classes))
        y_true = np.isin(labels, positive).astype(int)
        y_pred = np.isin(predicted, positive).astype(int)
        out["binary_acc"] = metrics.accuracy(y_true, y_pred)
        if groups is not None and len(np.unique(groups)) > 1:
            out["dp_diff"] = metrics.demographic_parity_difference(y_true, y_pred, groups)
            out["eo_diff"] = metrics.equal_opportunity_difference(y_true, y_pred, groups)
            out["group_rates"] = metrics.group_rates(y_true, y_pred, groups)
    return out


def score_model(state: dict, test: TestSet, positive_classes: tuple[int, ...] | None,
                target: Any = None) -> tuple[dict, np.ndarray | None]:
    """Load trained weights (a state dict) and score them on ``test``: (metrics, the binary task's
    predictions per test row, or None without positive classes — what the fairness bootstrap resamples).

    ``target`` (:mod:`influencespace.train.targets`) encodes the test split: heads project its tower
    embeddings, an open_clip model encodes its pixels and captions; None: heads.
    """
    from influencespace.train.targets import target_from_record

    target = target or target_from_record(None)
    image_features, text_features = target.encode(state, test)
    predicted = zero_shot_classes(image_features, text_features, test.label)
    scores = score_features(image_features, text_features, test.label, test.group, positive_classes, predicted)
    if not positive_classes:
        return scores, None
    return scores, np.isin(predicted, np.asarray(sorted(positive_classes))).astype(np.int8)
