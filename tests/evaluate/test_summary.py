"""The arithmetic of evaluate/summary.json and of the curation-quality shares, on hand-made numbers."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from influencespace.evaluate.curation import curation_quality
from influencespace.evaluate.summary import SEED_METRICS, mean_sd, summarize


def _scores(acc, worst, dp, eo, seconds):
    return {"zero_shot_acc": acc, "recall_at_1": acc, "recall_at_5": 1.0, "worst_group_acc": worst, "binary_acc": 0.9,
            "dp_diff": dp, "eo_diff": eo, "train_seconds": seconds, "group_acc": {"a": worst, "b": acc}}


def test_summary_ratios_deltas_and_spread_over_seeds():
    runs = {
        "baseline": {0: _scores(0.50, 0.40, 0.20, 0.30, 10.0), 1: _scores(0.60, 0.50, 0.10, 0.20, 12.0)},
        "influencespace": {0: _scores(0.55, 0.50, 0.10, 0.10, 5.0), 1: _scores(0.60, 0.56, 0.10, 0.10, 6.0)},
    }
    volume = {"baseline": {"pool_rows": 200, "kept_rows": 200}, "influencespace": {"pool_rows": 200, "kept_rows": 120}}
    summary = summarize(runs, volume, {"baseline": None, "influencespace": {"noise_removed_pct": 90.0}}, seeds=[0, 1])
    ours, base = summary["policies"]["influencespace"], summary["policies"]["baseline"]
    for metric in SEED_METRICS:
        assert metric in ours and metric in base
    assert base["volume_reduction_pct"] == 0.0 and base["accuracy_ratio_pct"] == 100.0 and base["time_ratio"] == 1.0
    assert ours["volume_reduction_pct"] == pytest.approx(40.0)
    assert ours["accuracy_ratio_pct"] == pytest.approx(105.0)  # (110 + 100) / 2
    assert ours["sd"]["accuracy_ratio_pct"] == pytest.approx(np.std([110.0, 100.0], ddof=1))
    assert ours["time_ratio"] == pytest.approx(2.0)
    assert ours["worst_group_acc"] == pytest.approx(0.53)
    assert ours["deltas_vs_baseline"]["worst_group_acc"] == pytest.approx(0.08)
    assert ours["deltas_vs_baseline"]["zero_shot_acc"] == pytest.approx(0.025)
    assert ours["bias_reduction"]["eo_diff"] == pytest.approx(0.15)  # baseline 0.25 − ours 0.10
    assert ours["bias_reduction"]["dp_diff"] == pytest.approx(0.05)
    assert ours["group_acc"] == {"a": pytest.approx(0.53), "b": pytest.approx(0.575)}
    assert ours["curation"] == {"noise_removed_pct": 90.0}
    assert set(ours["per_seed"]) == {"0", "1"}


def test_one_seed_has_no_spread_and_missing_metrics_stay_null():
    runs = {"baseline": {3: {**_scores(0.5, 0.4, None, None, 1.0), "group_acc": None}}}
    summary = summarize(runs, {"baseline": {"pool_rows": 10, "kept_rows": 10}}, {}, seeds=[3])
    entry = summary["policies"]["baseline"]
    assert entry["sd"]["accuracy_ratio_pct"] is None and entry["dp_diff"] is None
    assert entry["bias_reduction"]["dp_diff"] is None and entry["group_acc"] == {}
    assert mean_sd([None, 1.0, 3.0]) == (2.0, pytest.approx(np.sqrt(2.0)))


def test_curation_quality_counts_removed_defects_and_minority_weight():
    ids = np.array([f"r{i}" for i in range(8)], dtype=object)
    truth = pd.DataFrame({
        "id": list(ids) + ["rejected"],
        "caption_corrupted": [True, True, False, False, False, False, False, False, False],
        "image_corrupted": [False, False, True, False, False, False, False, False, True],
        "duplicate_of": [None, None, None, "r5", "r5", None, None, None, None],
        "group": ["regular"] * 6 + ["inverted", "inverted", "regular"],
    })
    manifest = pd.DataFrame({
        "id": list(ids) + ["rejected"],
        "keep": [False, True, False, False, True, True, True, False, False],
        "weight": [0.0, 0.5, 0.0, 0.0, 0.5, 0.5, 2.5, 0.0, 0.0],
    })
    quality = curation_quality(ids, manifest, truth, "inverted")
    assert quality["noise_rows"] == 3 and quality["duplicate_rows"] == 2  # the rejected row is not counted
    assert quality["noise_removed_pct"] == pytest.approx(200 / 3)
    assert quality["caption_noise_removed_pct"] == pytest.approx(50.0)
    assert quality["image_noise_removed_pct"] == pytest.approx(100.0)
    assert quality["duplicates_removed_pct"] == pytest.approx(50.0)
    assert quality["clean_removed_pct"] == pytest.approx(100 / 3)  # r7 of r5, r6, r7
    assert quality["minority_kept_pct"] == pytest.approx(50.0)
    assert quality["minority_mean_weight"] == pytest.approx(2.5)
    assert quality["majority_mean_weight"] == pytest.approx(0.5)
    baseline = curation_quality(ids, None, truth, "inverted")
    assert baseline["noise_removed_pct"] == 0.0 and baseline["minority_kept_pct"] == 100.0
    assert baseline["minority_mean_weight"] == 1.0


def test_budget_curve_moves_curve_variants_out_of_the_policy_table():
    from influencespace.evaluate.stage import budget_curve

    entry = lambda reduction, acc: {"volume_reduction_pct": reduction, "accuracy_ratio_pct": acc, "worst_group_acc": 0.7,  # noqa: E731
                                    "eo_diff": 0.01, "dp_diff": 0.0, "time_ratio": 1.0, "sd": {"accuracy_ratio_pct": 0.5},
                                    "per_seed": {"0": {"accuracy_ratio_pct": acc - 1, "eo_diff": 0.02, "steps": 9},
                                                 "1": {"accuracy_ratio_pct": acc + 1, "eo_diff": 0.0}}}
    policies = {"baseline": entry(0.0, 100.0), "influencespace": entry(40.0, 101.0), "random": entry(40.0, 98.0),
                "curve-keep-0.40-influencespace": entry(60.0, 97.0), "curve-keep-0.80-random": entry(20.0, 99.5)}
    curve = budget_curve(policies, keep_fraction=0.6)
    assert sorted(policies) == ["baseline", "influencespace", "random"]
    assert [(p["policy"], p["keep_fraction"], p["accuracy_ratio_pct"]) for p in curve] == [
        ("influencespace", 0.6, 101.0), ("influencespace", 0.4, 97.0), ("random", 0.8, 99.5), ("random", 0.6, 98.0)]
    assert curve[0]["accuracy_ratio_pct_sd"] == 0.5
    assert curve[1]["per_seed"]["0"]["accuracy_ratio_pct"] == 96.0 and curve[1]["per_seed"]["1"]["eo_diff"] == 0.0
    assert "steps" not in curve[1]["per_seed"]["0"]  # the curve's fields only
    assert budget_curve({"baseline": entry(0.0, 100.0), "random": entry(40.0, 98.0)}, 0.6) == []


def test_curation_cost_is_the_curation_stages_beside_one_baseline_training():
    from influencespace.evaluate.summary import curation_cost

    cost = curation_cost({"embed": 40.0, "cluster": 5.0, "influence": 50.0, "curate": 5.0}, [18.0, 22.0])
    assert cost["total_seconds"] == 100.0 and cost["baseline_train_seconds"] == 20.0 and cost["ratio"] == 5.0
    partial = curation_cost({"embed": None, "cluster": 5.0, "influence": None, "curate": 5.0}, [])
    assert partial["total_seconds"] == 10.0 and partial["ratio"] is None and partial["stage_seconds"]["embed"] is None


def test_throughput_is_steps_times_global_batch_per_training_second_and_workers_times_hours():
    from influencespace.evaluate.summary import throughput

    record = {"steps": 30, "global_batch": 128, "train_seconds": 60.0, "world_size": 2}
    assert throughput(record) == {"samples_per_second": pytest.approx(64.0), "device_hours": pytest.approx(2 * 60 / 3600)}
    assert throughput({"steps": 3, "global_batch": 8, "train_seconds": 0.0}) == {"samples_per_second": None,
                                                                                "device_hours": None}
