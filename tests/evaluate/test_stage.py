"""The evaluate stage on synthetic artifacts: summary keys, per-variant scores, ground-truth quality."""

from __future__ import annotations

import pytest

from influencespace import storage
from influencespace.errors import StageStateError
from influencespace.evaluate.stage import EvaluateStage
from influencespace.evaluate.summary import SEED_METRICS
from influencespace.stages import run_stage
from tests.train.synthetic import build_run, identity_state, random_state, write_train_outputs


def _upstream(root, seeds=(0,)):
    run = build_run(root, pool=80, test=100, dim=12)
    states = {"baseline": random_state(12), "influencespace": identity_state(12), "random": random_state(12, seed=1)}
    seconds = {"baseline": 8.0, "influencespace": 4.0, "random": 5.0}
    upstream = dict(run["upstream"], train=write_train_outputs(root, states, seconds, seeds))
    return run, upstream


def test_evaluate_writes_the_benchmark_summary(tmp_path, make_config):
    run, upstream = _upstream(str(tmp_path / "inputs"))
    outcome = run_stage(make_config(), EvaluateStage(), upstream=upstream)
    summary = storage.read_json(storage.join(outcome.manifest["stage_dir"], "summary.json"))
    assert set(summary["policies"]) == {"baseline", "influencespace", "random"}
    assert summary["positive_classes"] == [5, 7, 9] and summary["minority_group"] == "inverted"
    cost = summary["curation_cost"]  # the curation stages ran elsewhere here: unknown, not zero
    assert cost["stage_seconds"] == dict.fromkeys(("embed", "cluster", "influence", "curate")) and cost["total_seconds"] is None
    assert cost["baseline_train_seconds"] == 8.0
    assert summary["fairness_resamples"] == 1000
    for name, entry in summary["policies"].items():  # test-set bootstrap intervals, paired with the baseline
        low, high = entry["eo_diff_ci"]
        assert 0 <= low <= high <= 1 and entry["dp_diff_ci"][0] <= entry["dp_diff_ci"][1], (name, entry["eo_diff_ci"])
        assert entry["eo_vs_half_baseline"]["ci"][0] <= entry["eo_vs_half_baseline"]["diff"] <= entry["eo_vs_half_baseline"]["ci"][1]
    base = summary["policies"]["baseline"]["eo_vs_half_baseline"]  # EO − EO/2 on the same draws: EO/2 ≥ 0
    assert base["ci"][0] >= 0
    for entry in summary["policies"].values():
        for key in (*SEED_METRICS, "deltas_vs_baseline", "bias_reduction", "recall_at_1", "recall_at_5", "group_acc"):
            assert key in entry
        assert set(entry["group_acc"]) == {"regular", "inverted"}
        assert entry["worst_group_acc"] == pytest.approx(min(entry["group_acc"].values()))
        assert 0.0 <= entry["dp_diff"] <= 1.0 and 0.0 <= entry["eo_diff"] <= 1.0

    ours, base = summary["policies"]["influencespace"], summary["policies"]["baseline"]
    kept = int(run["keep"].sum())
    assert ours["volume_reduction_pct"] == pytest.approx(100.0 * (80 - kept) / 80)
    assert base["volume_reduction_pct"] == 0.0 and base["accuracy_ratio_pct"] == 100.0
    # Identity heads on this synthetic space are far better than random narrow heads.
    assert ours["zero_shot_acc"] > 0.5 and ours["accuracy_ratio_pct"] > 150.0
    assert ours["accuracy_ratio_pct"] == pytest.approx(100 * ours["zero_shot_acc"] / base["zero_shot_acc"])
    assert ours["time_ratio"] == pytest.approx(2.0)
    assert ours["deltas_vs_baseline"]["eo_diff"] == pytest.approx(ours["eo_diff"] - base["eo_diff"])
    assert ours["bias_reduction"]["eo_diff"] == pytest.approx(base["eo_diff"] - ours["eo_diff"])
    # The synthetic InfluenceSpace manifest drops every noisy caption and doubles minority weights.
    assert ours["curation"]["noise_removed_pct"] == 100.0
    assert ours["curation"]["minority_mean_weight"] > ours["curation"]["majority_mean_weight"]
    assert base["curation"]["noise_removed_pct"] == 0.0
    # Identity heads score exactly what the frozen towers score.
    assert summary["reference"]["frozen_towers"]["zero_shot_acc"] == pytest.approx(ours["zero_shot_acc"])
    assert ours["loss_history"] == [2.0, 1.5]


def test_evaluate_refuses_seeds_that_were_not_trained(tmp_path, make_config):
    _, upstream = _upstream(str(tmp_path / "inputs"), seeds=(0,))
    with pytest.raises(StageStateError, match="train.seeds"):
        run_stage(make_config("evaluate.seeds=[0, 1]"), EvaluateStage(), upstream=upstream)


def _split_parts(directory: str, pieces: int) -> None:
    """Rewrite ``part-00000.parquet`` of ``directory`` as ``pieces`` parts (uneven, one of them empty)."""
    import pyarrow.parquet as pq

    path = f"{directory}/part-00000.parquet"
    table = pq.read_table(path)
    cuts = [0, table.num_rows // 5, table.num_rows // 5, table.num_rows]
    for index in range(pieces):
        pq.write_table(table.slice(cuts[index], cuts[index + 1] - cuts[index]), f"{directory}/part-{index:05d}.parquet")


@pytest.mark.ray
def test_ground_truth_check_by_ray_equals_the_in_memory_reference(tmp_path, ray_cluster):
    """Every variant's curation quality, as one distributed aggregate (Ray Data union, join, partial sums),
    equals the in-memory reference: pool and manifests in three parts, rejects in their own part, pool
    rows the ground truth lacks, the baseline."""
    import pyarrow.parquet as pq

    from influencespace.config import RuntimeConfig
    from influencespace.evaluate.stage import curation_by_ray, curation_in_memory

    run = build_run(str(tmp_path), pool=300, policies=("random", "dedup"))
    root = str(tmp_path)
    for directory in ("embed/pool", "curate/manifest", "curate/policies/random", "curate/policies/dedup"):
        _split_parts(f"{root}/{directory}", 3)
    truth_uri = f"{root}/data/ground_truth/ground_truth.parquet"
    truth = pq.read_table(truth_uri)
    pq.write_table(truth.slice(7), truth_uri)  # 7 pool rows without ground truth: clean, not of the minority
    manifests = {"baseline": None, "influencespace": f"{root}/curate/manifest",
                 "random": f"{root}/curate/policies/random", "dedup": f"{root}/curate/policies/dedup"}
    args = (f"{root}/embed/pool", truth_uri, manifests, "inverted")
    by_ray, reference = curation_by_ray(RuntimeConfig(), *args), curation_in_memory(RuntimeConfig(), *args)
    assert reference["influencespace"]["noise_removed_pct"] == 100.0 and reference["baseline"]["minority_kept_pct"] == 100.0
    assert reference["random"]["minority_rows"] == int(run["minority"][7:].sum())
    for variant in manifests:
        assert by_ray[variant].keys() == reference[variant].keys()
        for key, value in reference[variant].items():
            assert by_ray[variant][key] == pytest.approx(value), (variant, key)
