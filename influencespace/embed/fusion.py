"""Fusion f(v, t): one vector per image–text pair from the two unit-norm tower embeddings.

Both modes take unit vectors v (image) and t (text) in the shared d-dimensional space and a weight
α = ``image_weight`` ∈ [0, 1]:

- ``concat`` (normalised concatenation): x = [√α · v, √(1−α) · t] ∈ R^{2d}. Since ‖v‖ = ‖t‖ = 1,
  ‖x‖ = 1 and the fused cosine is the weighted mean of the tower cosines:
  x·x' = α (v·v') + (1−α) (t·t'). Nothing is lost: both towers stay recoverable.
- ``sum`` (weighted sum): x = (α v + (1−α) t) / ‖α v + (1−α) t‖ ∈ R^d. Half the size; the image and
  text directions are mixed, so a mismatched pair lands between its image's and its caption's cluster.

The diagnostic kept beside every embedding is the image–text cosine v·t (CLIPScore without the
rescaling), which the similarity-filter comparison policy uses.
"""

from __future__ import annotations

import numpy as np

FUSIONS = ("concat", "sum")
_EPS = 1e-12


def normalise(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (rows of zeros stay zero)."""
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), _EPS)


def fused_dim(tower_dim: int, fusion: str) -> int:
    """Dimension of x = f(v, t) for towers of dimension ``tower_dim``."""
    _check(fusion, 0.5)
    return 2 * tower_dim if fusion == "concat" else tower_dim


def fuse(image: np.ndarray, text: np.ndarray, fusion: str = "concat", image_weight: float = 0.5) -> np.ndarray:
    """x = f(v, t) for a batch: ``image`` and ``text`` are [n, d] unit rows; returns [n, D] float32 unit rows."""
    _check(fusion, image_weight)
    v = np.asarray(image, dtype=np.float32)
    t = np.asarray(text, dtype=np.float32)
    if v.shape != t.shape or v.ndim != 2:
        raise ValueError(f"image and text embeddings must both be [n, d]; got {v.shape} and {t.shape}")
    if fusion == "concat":
        return np.concatenate([np.sqrt(image_weight) * v, np.sqrt(1.0 - image_weight) * t], axis=1)
    return normalise(image_weight * v + (1.0 - image_weight) * t)


def image_text_cosine(image: np.ndarray, text: np.ndarray) -> np.ndarray:
    """cos(v, t) per pair (the rows are unit vectors, so this is the row-wise dot product)."""
    return np.einsum("nd,nd->n", np.asarray(image, dtype=np.float32), np.asarray(text, dtype=np.float32))


def _check(fusion: str, image_weight: float) -> None:
    if fusion not in FUSIONS:
        raise ValueError(f"embed.fusion must be one of {', '.join(FUSIONS)}; got '{fusion}'")
    if not 0.0 <= image_weight <= 1.0:
        raise ValueError(f"embed.image_weight must lie in [0, 1]; got {image_weight}")
