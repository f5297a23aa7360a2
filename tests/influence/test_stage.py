"""The influence stage on synthetic embed/cluster artifacts: in-process, on Ray Train, and bad input."""

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from influencespace import storage
from influencespace.errors import InfluenceSpaceError, InputDataError
from influencespace.influence.stage import InfluenceStage
from influencespace.stages import load_stage, run_stage

from .synthetic import make_data, write_upstream

BASE = ("influence.dtype=float64", "influence.negatives=8", "influence.head_dim=4", "influence.samples_per_cluster=8")


@pytest.fixture
def upstream(tmp_path):
    return write_upstream(str(tmp_path / "up"), make_data(), num_clusters=9)


def scores(config):
    return pq.read_table(storage.join(config.run_dir, "influence", "cluster_scores.parquet")).to_pydict()


@pytest.mark.parametrize("task", ["contrastive", "probe"])
def test_local_run_writes_scores_and_curvature(make_config, upstream, task):
    config = make_config("runtime.runner=local", f"influence.task={task}", *BASE)
    outcome = run_stage(config, load_stage("influence"), upstream=upstream)
    assert outcome.status == "ran"
    assert outcome.manifest["counts"]["clusters"] == 9 and outcome.manifest["counts"]["dropped_nonfinite"] == 0
    out = scores(config)
    assert {"cluster", "size", "n_sampled", "influence", "stderr", "ci_low", "ci_high"} <= set(out)
    assert {f"{stat}_group_{g}" for stat in ("influence", "stderr", "ci_low", "ci_high")
            for g in ("majority", "minority")} | {"p_value", "q_value"} <= set(out)
    assert all(p <= q <= 1 for p, q in zip(out["p_value"], out["q_value"], strict=True))
    losses = outcome.manifest["extra"]["group_validation_loss"]
    assert set(losses) == {"majority", "minority"} and all(v > 0 for v in losses.values())
    assert out["cluster"] == list(range(9)) and sum(out["size"]) == 240
    assert out["size"][8] == 0 and out["influence"][8] == 0 and out["stderr"][8] == 0  # empty cluster
    assert all(lo <= x <= hi for lo, x, hi in zip(out["ci_low"], out["influence"], out["ci_high"], strict=True))
    assert all(s <= 8 for s in out["n_sampled"])
    curvature_dir = storage.join(config.run_dir, "influence", "curvature")
    meta = storage.read_json(storage.join(curvature_dir, "curvature.json"))
    assert meta["projector"]["dim"] == config.influence.projection_dim and meta["projector"]["seed"] == 0
    eigvals = np.load(storage.join(curvature_dir, "checkpoint-0", "eigenvalues.npy"))
    eigvecs = np.load(storage.join(curvature_dir, "checkpoint-0", "eigenvectors.npy"))
    assert eigvals.shape == (64,) and eigvecs.shape == (64, 32) and meta["checkpoints"][0]["damping"] > 0
    assert run_stage(config, InfluenceStage(), upstream=upstream).status == "skipped"


def test_a_learned_temperature_reaches_the_proxy(make_config, upstream, tmp_path):
    """influence.logit_scale=learned from the configuration to the scores: another model, so other scores."""
    fixed = make_config("runtime.runner=local", *BASE, run_dir=str(tmp_path / "fixed"))
    learned = make_config("runtime.runner=local", *BASE, "influence.logit_scale=learned", run_dir=str(tmp_path / "learned"))
    for config in (fixed, learned):
        assert run_stage(config, InfluenceStage(), upstream=upstream).status == "ran"
    a, b = scores(fixed)["influence"], scores(learned)["influence"]
    assert np.isfinite(b).all() and not np.allclose(a, b), (a, b)


def test_nan_embeddings_are_reported_not_propagated(make_config, tmp_path):
    data = make_data()
    data.pool["image_embedding"][[3, 100]] = np.nan
    data.pool["embedding"][[3, 100]] = np.nan
    upstream = write_upstream(str(tmp_path / "up"), data)
    config = make_config("runtime.runner=local", "influence.samples_per_cluster=1000", *BASE[:3])
    outcome = run_stage(config, InfluenceStage(), upstream=upstream)
    assert outcome.manifest["counts"]["dropped_nonfinite"] == 2
    out = scores(config)
    assert sum(out["n_dropped"]) == 2 and np.isfinite(out["influence"]).all()
    rows = row_scores(config).set_index("id")
    bad = {data.pool["id"][3], data.pool["id"][100]}
    assert set(rows.index[rows["influence"].isna()]) == bad and len(rows) == len(data.pool["id"])


def row_scores(config):
    return storage.read_table(storage.join(config.run_dir, "influence", "row_scores")).to_pandas().sort_values("id")


@pytest.mark.parametrize("checkpoints", [1, 2])
def test_row_scores_sum_to_the_cluster_influence_when_every_row_is_sampled(make_config, upstream, checkpoints):
    # With every row sampled the cluster estimate is exact: influence(c) = (|c|/n) · mean_{i∈c} t_i = Σ_{i∈c} t_i / n,
    # so the row pass (plain per-example gradients) must add up to it (the cluster pass uses Gauss–Newton factors).
    config = make_config("runtime.runner=local", f"influence.checkpoints={checkpoints}", *BASE[:3],
                         "influence.samples_per_cluster=1000")
    outcome = run_stage(config, InfluenceStage(), upstream=upstream)
    assert outcome.manifest["outputs"]["row_scores"] == "row_scores"
    rows = row_scores(config)
    assignments = storage.read_table(upstream["cluster"]["stage_dir"] + "/assignments").to_pandas()
    assert sorted(rows["id"]) == sorted(assignments["id"]) and np.isfinite(rows["influence"]).all()
    summed = rows.merge(assignments, on="id").groupby("cluster")[["influence", "influence_group_minority"]].sum()
    clusters = pd.DataFrame(scores(config)).set_index("cluster").loc[summed.index]
    np.testing.assert_allclose(summed["influence"], clusters["influence"], rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(summed["influence_group_minority"], clusters["influence_group_minority"], rtol=1e-6, atol=1e-12)


def test_an_ensemble_of_proxies_widens_the_intervals_by_their_disagreement(make_config, upstream):
    config = make_config("runtime.runner=local", "influence.ensemble=2", "influence.checkpoints=2", *BASE)
    outcome = run_stage(config, load_stage("influence"), upstream=upstream)
    assert outcome.status == "ran"
    meta = storage.read_json(storage.join(config.run_dir, "influence", "curvature", "curvature.json"))
    assert len(meta["checkpoints"]) == 4  # two proxies, two checkpoints each
    out = pd.DataFrame(scores(config))
    scored = out[out["size"] > 0]
    assert (scored["stderr_between_models"] > 0).all(), scored
    assert (scored["stderr"] >= scored["stderr_between_models"]).all()
    assert ((scored["ci_low"] <= scored["influence"]) & (scored["influence"] <= scored["ci_high"])).all()


def placebo_scores(config):
    return pq.read_table(storage.join(config.run_dir, "influence", "placebo_scores.parquet")).to_pandas()


def test_placebo_directions_keep_each_norm_and_are_one_draw_per_seed():
    from influencespace.influence.engine import placebo_directions

    sketches = np.random.default_rng(0).normal(size=(3, 256)) * np.array([[1.0], [5.0], [0.1]])
    r = placebo_directions(sketches, seed=7)
    np.testing.assert_allclose(np.linalg.norm(r, axis=1), np.linalg.norm(sketches, axis=1), rtol=1e-12)
    np.testing.assert_array_equal(r, placebo_directions(2 * sketches, seed=7) / 2)  # the draw depends on the seed only
    assert not np.allclose(r, placebo_directions(sketches, seed=8))
    cosine = np.sum(r * sketches, axis=1) / np.linalg.norm(r, axis=1) / np.linalg.norm(sketches, axis=1)
    assert (np.abs(cosine) < 4 / np.sqrt(256)).all(), cosine  # random directions: |cos| ~ 1/√k (4 sd bound)


def test_placebo_scores_are_the_same_estimator_on_another_direction(make_config, upstream, monkeypatch):
    """With the placebo direction replaced by the validation sketch itself, placebo_scores must equal
    cluster_scores column for column (the same solve, terms, ensemble and intervals); with the real
    draw, the calls differ and the real scores are unchanged by computing it."""
    from influencespace.influence import engine

    args = ("runtime.runner=local", "influence.ensemble=2", *BASE)
    real = make_config(*args, run_dir=None)
    outcome = run_stage(real, InfluenceStage(), upstream=upstream)
    assert outcome.manifest["outputs"]["placebo_scores"] == "placebo_scores.parquet"
    truth, placebo = pd.DataFrame(scores(real)), placebo_scores(real)
    assert list(placebo.columns) == list(truth.columns)
    assert not np.allclose(placebo["influence"], truth["influence"]), (placebo["influence"], truth["influence"])
    without = make_config(*args, "influence.placebo=false", run_dir=str(real.run_dir) + "-without")
    assert run_stage(without, InfluenceStage(), upstream=upstream).manifest["outputs"].get("placebo_scores") is None
    pd.testing.assert_frame_equal(pd.DataFrame(scores(without)), truth)

    monkeypatch.setattr(engine, "placebo_directions", lambda sketches, seed: sketches)
    same = make_config(*args, run_dir=str(real.run_dir) + "-identity")
    run_stage(same, InfluenceStage(), upstream=upstream)
    pd.testing.assert_frame_equal(placebo_scores(same), pd.DataFrame(scores(same)))


def test_checkpoint_averaging_runs(make_config, upstream):
    config = make_config("runtime.runner=local", "influence.checkpoints=2", *BASE)
    run_stage(config, InfluenceStage(), upstream=upstream)
    meta = storage.read_json(storage.join(config.run_dir, "influence", "curvature", "curvature.json"))
    assert len(meta["checkpoints"]) == 2


def test_missing_column_and_unknown_task_are_clear_errors(make_config, tmp_path, upstream):
    with pytest.raises(InfluenceSpaceError, match="unknown influence task 'nope'.*contrastive"):
        run_stage(make_config("runtime.runner=local", "influence.task=nope"), InfluenceStage(), upstream=upstream)
    data = make_data()
    del data.pool["label"]
    bad = write_upstream(str(tmp_path / "bad"), data)
    config = make_config("runtime.runner=local", "influence.task=probe", run_dir=str(tmp_path / "run2"))
    with pytest.raises(InputDataError, match="lacks column.*label"):
        run_stage(config, InfluenceStage(), upstream=bad)


@pytest.mark.ray
def test_two_ray_train_workers_equal_single_process(ray_cluster, make_config, tmp_path, upstream):
    local = make_config("runtime.runner=local", *BASE, run_dir=str(tmp_path / "local"))
    sharded = make_config("runtime.runner=ray", "influence.num_workers=2", *BASE, run_dir=str(tmp_path / "ray"))
    run_stage(local, InfluenceStage(), upstream=upstream)
    outcome = run_stage(sharded, InfluenceStage(), upstream=upstream)
    assert outcome.manifest["extra"]["workers"] == 2
    a, b = scores(local), scores(sharded)
    assert a.keys() == b.keys() and a["cluster"] == b["cluster"] and a["n_sampled"] == b["n_sampled"]
    for key in a:
        assert np.allclose(a[key], b[key], rtol=1e-6, atol=1e-9), key
    summary = storage.read_json(storage.join(sharded.run_dir, "influence", "summary.json"))
    fingerprints = summary["projector_fingerprints"]
    assert len(fingerprints) == 2 and len(set(fingerprints)) == 1  # the same projector on every worker
    pd.testing.assert_frame_equal(row_scores(local).reset_index(drop=True), row_scores(sharded).reset_index(drop=True),
                                  rtol=1e-6, atol=1e-12)
    ev_local = np.load(storage.join(local.run_dir, "influence", "curvature", "checkpoint-0", "eigenvalues.npy"))
    ev_ray = np.load(storage.join(sharded.run_dir, "influence", "curvature", "checkpoint-0", "eigenvalues.npy"))
    assert np.allclose(ev_local, ev_ray, rtol=1e-6, atol=1e-12)
