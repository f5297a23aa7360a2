"""Fixtures of the cluster tests."""

from __future__ import annotations

import numpy as np
import pytest

from tests.cluster.synthetic import gaussian_blobs


@pytest.fixture
def blobs() -> np.ndarray:
    """1200 × 16 rows around 12 overlapping centres (k-means needs more than 8 iterations)."""
    return gaussian_blobs(1200, 16, 12, seed=3, spread=1.0)
