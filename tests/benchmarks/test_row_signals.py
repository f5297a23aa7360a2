"""benchmarks/row_signals.py: its AUCs against hand-counted pairs."""

import numpy as np
import pytest

from benchmarks.row_signals import auc, within_cluster_auc


def test_auc_counts_pairs_where_the_defect_scores_lower():
    signal = np.array([0.1, 0.4, 0.35, 0.8])
    defect = np.array([True, False, True, False])
    # pairs (defect, clean): (0.1, 0.4) (0.1, 0.8) (0.35, 0.4) (0.35, 0.8): all four have the defect lower
    assert auc(signal, defect) == 1.0
    assert auc(-signal, defect) == 0.0
    assert np.isnan(auc(signal, np.zeros(4, bool)))


def test_within_cluster_auc_ignores_the_between_cluster_pairs():
    # cluster 0: defect 0.9 vs clean 0.1 (wrong way, 1 pair); cluster 1: defects 0.2, 0.3 vs clean 0.5 (right, 2 pairs)
    signal = np.array([0.9, 0.1, 0.2, 0.3, 0.5])
    defect = np.array([True, False, True, True, False])
    cluster = np.array([0, 0, 1, 1, 1])
    assert within_cluster_auc(signal, defect, cluster) == pytest.approx(2 / 3)
