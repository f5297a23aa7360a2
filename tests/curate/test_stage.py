import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from influencespace import storage
from influencespace.curate import policy
from influencespace.curate.stage import CurateStage
from influencespace.stages import run_stage


@pytest.fixture
def make_config(make_config):
    """The test preset on the local runner: the same passes in this process (the Ray runner is tested below)."""
    return lambda *overrides, **kw: make_config("runtime.runner=local", *overrides, **kw)


def _write_validation(embed_dir, cluster_dir, centres, rng, rows=40):
    """The trusted validation set the fitted thresholds are set on, and the centroids that place it in clusters."""
    k, dim = centres.shape
    val = (centres[rng.integers(0, k, rows)] + 0.3 * rng.normal(size=(rows, dim))).astype(np.float32)
    storage.write_table(pa.table({"id": [f"val-{i}" for i in range(rows)],
                                  "embedding": pa.FixedSizeListArray.from_arrays(pa.array(val.ravel()), dim),
                                  "image_text_cosine": rng.normal(0.3, 0.05, rows),
                                  "group": ["regular", "inverted"] * (rows // 2)}), f"{embed_dir}/validation/part-00000.parquet")
    unit_centres = centres / np.linalg.norm(centres, axis=1, keepdims=True)
    storage.write_bytes(f"{cluster_dir}/centroids.npy", _npy(unit_centres.astype(np.float32)))


def _upstream(root, n=60, k=4, dim=8, with_rejects=True):
    rng = np.random.default_rng(0)
    ids = [f"pool-{i:04d}" for i in range(n)]
    embed_dir, cluster_dir, influence_dir = (str(root / s) for s in ("embed", "cluster", "influence"))
    emb = rng.normal(size=(n, dim)).astype(np.float32)
    storage.write_table(pa.table({
        "id": ids,
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.ravel()), dim),
        "image_text_cosine": rng.random(n).astype(np.float32),
        "group": ["regular"] * n,
    }), f"{embed_dir}/pool/part-00000.parquet")
    if with_rejects:
        storage.write_table(pa.table({"id": ["pool-bad1", "val-bad"], "split": ["pool", "validation"],
                                      "reason": ["undecodable image", "empty caption"]}),
                            f"{embed_dir}/rejects/part-00000.parquet")
    clusters = np.arange(n) % k
    _write_validation(embed_dir, cluster_dir, rng.normal(size=(k, dim)), rng)
    storage.write_table(pa.table({"id": ids, "cluster": clusters.astype(np.int32),
                                  "distance": rng.random(n).astype(np.float32)}),
                        f"{cluster_dir}/assignments/part-00000.parquet")
    storage.write_table(pa.table({
        "cluster": list(range(k)), "size": [n // k] * k, "n_sampled": [5] * k,
        "influence": [-2.0, 0.1, 1.0, 3.0], "stderr": [0.5] * k,
        "ci_low": [-3.0, -0.9, 0.1, 2.0], "ci_high": [-1.0, 1.1, 1.9, 4.0],
    }), f"{influence_dir}/cluster_scores.parquet")
    row_influence = rng.normal(size=n)
    storage.write_table(pa.table({"id": ids, "influence": row_influence, "influence_group_inverted": np.zeros(n)}),
                        f"{influence_dir}/row_scores/part-00000.parquet")
    manifest = lambda d, outputs, **extra: {"fingerprint": d[-6:], "stage_dir": d, "outputs": outputs, **extra}  # noqa: E731
    return {
        "embed": manifest(embed_dir, {"pool": "pool", "rejects": "rejects", "validation": "validation"}),
        "cluster": manifest(cluster_dir, {"assignments": "assignments", "centroids": "centroids.npy"}),
        "influence": manifest(influence_dir, {"scores": "cluster_scores.parquet", "row_scores": "row_scores"},
                              extra={"group_validation_loss": {"regular": 0.4, "inverted": 0.9}}),
    }


def test_curate_stage_writes_every_manifest_with_every_id_once(make_config, tmp_path):
    config = make_config("curate.keep_fraction=0.5")
    outcome = run_stage(config, CurateStage(), upstream=_upstream(tmp_path))
    counts = outcome.manifest["counts"]
    assert counts == {"rows": 61, "kept": 30, "removed": 31, "rejected": 1, "harmful_clusters": 1}
    assert outcome.manifest["extra"]["worst_group"] == "inverted"
    run = config.run_dir
    for directory in ("manifest", "policies/random", "policies/dedup", "policies/clipscore"):
        table = storage.read_table(f"{run}/curate/{directory}").to_pandas()
        assert table.columns.tolist() == ["id", "cluster", "keep", "weight", "reason"]
        assert table["id"].is_unique and len(table) == 61
        assert table["keep"].sum() == 30
        bad = table.set_index("id").loc["pool-bad1"]
        assert not bad.keep and bad.reason == "rejected: undecodable image" and bad.cluster == -1
    summary = storage.read_json(f"{run}/curate/summary.json")
    assert summary["influencespace"]["reasons"]["harmful"] == 15
    assert summary["influencespace"]["mean_weight_kept"] == pytest.approx(1.0)


def test_only_requested_comparisons_and_no_rejects(make_config, tmp_path):
    config = make_config("curate.comparison_policies=[random]")
    outcome = run_stage(config, CurateStage(), upstream=_upstream(tmp_path, with_rejects=False))
    assert outcome.manifest["extra"]["policies"] == ["influencespace", "random"]
    assert not storage.exists(f"{config.run_dir}/curate/policies/dedup")


def test_scores_without_intervals_are_a_clear_error(make_config, tmp_path):
    upstream = _upstream(tmp_path)
    storage.write_table(pa.table({"cluster": [0], "influence": [1.0]}), str(tmp_path / "influence" / "cluster_scores.parquet"))
    with pytest.raises(Exception, match="lack column.*ci_high.*rerun the influence stage"):
        run_stage(make_config(), CurateStage(), upstream=upstream)


@pytest.mark.parametrize("order", ["influence", "image_text"])
def test_thinned_clusters_keep_the_rows_of_highest_value(make_config, tmp_path, order):
    """With row_order influence (the default) a thinned cluster keeps its rows of highest own influence;
    with image_text those of highest image–text cosine."""
    upstream = _upstream(tmp_path)
    run_stage(make_config("curate.keep_fraction=0.5", "curate.duplicate_threshold=1.0", f"curate.row_order={order}",
                          "curate.mismatch_fence=null"), CurateStage(), upstream=upstream)
    manifest = storage.read_table(str(tmp_path / "run" / "curate" / "manifest")).to_pandas()
    rows = storage.read_table(str(tmp_path / "influence" / "row_scores")).to_pandas()
    merged = manifest.merge(rows, on="id")
    thinned = merged[merged.cluster == 1]  # the negligible cluster: 15 rows, thinned to its floor of 4
    assert thinned["keep"].sum() == 4 and set(thinned.loc[~thinned.keep, "reason"]) == {"negligible-thinned"}
    if order == "image_text":
        pool = storage.read_table(str(tmp_path / "embed" / "pool")).to_pandas()[["id", "image_text_cosine"]]
        thinned = thinned.merge(pool, on="id")
    column = {"influence": "influence", "image_text": "image_text_cosine"}[order]
    assert thinned.loc[thinned.keep, column].min() > thinned.loc[~thinned.keep, column].max()


def test_influence_row_order_without_a_row_pass_is_a_clear_error(make_config, tmp_path):
    upstream = _upstream(tmp_path)
    upstream["influence"]["outputs"].pop("row_scores")
    with pytest.raises(Exception, match=r"influence.score_rows=true \(the open_clip task has none\), or set curate.row_order=random"):
        run_stage(make_config(), CurateStage(), upstream=upstream)  # the default order: influence
    outcome = run_stage(make_config("curate.row_order=random", run_dir=str(tmp_path / "run2")), CurateStage(), upstream=upstream)
    assert outcome.status == "ran"


@pytest.mark.parametrize("without", ["pool", "validation"])
def test_group_balance_without_a_group_column_warns_and_keeps_the_clusters_weights(make_config, tmp_path, caplog, without):
    upstream = _upstream(tmp_path)
    part = f"{tmp_path}/embed/{without}/part-00000.parquet"
    storage.write_table(storage.read_table(part).drop_columns(["group"]), part)  # no sensitive attribute there
    config = make_config("curate.group_balance=validation")
    with caplog.at_level("WARNING", logger="influencespace.curate.stage"):
        outcome = run_stage(config, CurateStage(), upstream=upstream)
    assert outcome.manifest["extra"]["thresholds"]["group_balance"] is False
    assert "no group balance" in caplog.text and "group column" in caplog.text
    summary = storage.read_json(f"{config.run_dir}/curate/summary.json")["influencespace"]
    assert "group_balance" not in summary
    plain = make_config("curate.group_balance=none", run_dir=str(tmp_path / "plain"))
    run_stage(plain, CurateStage(), upstream=upstream)
    read = lambda c: storage.read_table(f"{c.run_dir}/curate/manifest").to_pandas().sort_values("id").reset_index(drop=True)  # noqa: E731
    pd.testing.assert_frame_equal(read(config), read(plain))


def test_group_balance_records_the_shares_it_moved(make_config, tmp_path):
    upstream, _ = _sharded_upstream(tmp_path)
    config = make_config("curate.group_balance=validation", "curate.keep_fraction=0.6")
    run_stage(config, CurateStage(), upstream=upstream)
    summary = storage.read_json(f"{config.run_dir}/curate/summary.json")["influencespace"]["group_balance"]
    assert summary["target"] == {"inverted": 0.5, "regular": 0.5}
    before, after = summary["kept_share"], summary["balanced_share"]
    assert before["inverted"] < 0.2 < after["inverted"]  # the minority's share of the kept mass, toward half
    assert sum(after.values()) == pytest.approx(1.0)


def test_without_near_duplicate_step_the_embeddings_are_never_read(make_config, tmp_path):
    upstream = _upstream(tmp_path)
    pool_file = str(tmp_path / "embed" / "pool" / "part-00000.parquet")
    storage.write_table(storage.read_table(pool_file).drop_columns(["embedding"]), pool_file)
    config = make_config("curate.keep_fraction=0.5", "curate.duplicate_threshold=null", "curate.comparison_policies=[random,clipscore]")
    outcome = run_stage(config, CurateStage(), upstream=upstream)
    assert outcome.manifest["counts"]["kept"] == 30
    manifest = storage.read_table(f"{config.run_dir}/curate/manifest").to_pandas()
    assert "near-duplicate" not in set(manifest["reason"])


def test_curve_budgets_curate_every_policy_again(make_config, tmp_path):
    from influencespace.layout import variant_manifests

    config = make_config("curate.keep_fraction=0.5", "curate.curve_keep_fractions=[0.25,0.5,0.75]")
    outcome = run_stage(config, CurateStage(), upstream=_upstream(tmp_path))
    outputs = outcome.manifest["outputs"]
    assert outcome.manifest["extra"]["curve_keep_fractions"] == [0.25, 0.75]  # the main budget is not repeated
    for label, kept in (("keep-0.25", 15), ("keep-0.75", 45)):
        for name in ("influencespace", "random", "dedup", "clipscore"):
            table = storage.read_table(f"{config.run_dir}/curate/{outputs[f'curve_{label}_{name}']}").to_pandas()
            assert len(table) == 61 and table["id"].is_unique
            assert table["keep"].sum() == kept  # at 0.75 the harmful cluster (15 of 60) alone meets the budget
    variants = variant_manifests(outcome.manifest)
    assert variants["curve-keep-0.25-influencespace"] == "curve_keep-0.25_influencespace"
    assert list(variants)[:2] == ["baseline", "influencespace"] and len(variants) == 5 + 8


def test_manifests_are_shard_aligned_with_the_pool(make_config, tmp_path):
    """Manifest part i lists exactly pool shard i's ids (cluster rejects included); embed rejects apart."""
    import pyarrow.parquet as pq

    upstream = _upstream(tmp_path)
    pool, assignments = (pq.read_table(tmp_path / d / "part-00000.parquet")
                         for d in ("embed/pool", "cluster/assignments"))
    row_scores = pq.read_table(tmp_path / "influence" / "row_scores" / "part-00000.parquet")
    for name, start, stop in (("part-00000.parquet", 0, 25), ("part-00003.parquet", 25, 60)):
        storage.write_table(pool.slice(start, stop - start), str(tmp_path / "embed" / "pool" / name))
        storage.write_table(row_scores.slice(start, stop - start), str(tmp_path / "influence" / "row_scores" / name))
    # The second shard's last row had a zero embedding: the cluster stage rejected it, so no assignment.
    storage.write_table(assignments.slice(0, 25), str(tmp_path / "cluster" / "assignments" / "part-00000.parquet"))
    storage.write_table(assignments.slice(25, 34), str(tmp_path / "cluster" / "assignments" / "part-00003.parquet"))
    storage.write_table(pa.table({"id": ["pool-0059"], "reason": ["zero-norm embedding"]}),
                        str(tmp_path / "cluster" / "rejects" / "part-00003.parquet"))
    upstream["cluster"]["outputs"]["rejects"] = "rejects"
    config = make_config("curate.keep_fraction=0.5", "curate.curve_keep_fractions=[0.3]")
    outcome = run_stage(config, CurateStage(), upstream=upstream)
    assert outcome.manifest["counts"]["rows"] == 61 and outcome.manifest["counts"]["rejected"] == 2, outcome.manifest
    summary = storage.read_json(f"{config.run_dir}/curate/summary.json")
    for directory, entry in (("manifest", summary["influencespace"]), ("policies/random", summary["random"]),
                             ("curve/keep-0.30/dedup", summary["curve"]["keep-0.30"]["dedup"])):
        files = sorted(u.rsplit("/", 1)[-1] for u in storage.list_files(f"{config.run_dir}/curate/{directory}"))
        assert files == ["part-00000.parquet", "part-00003.parquet", "rejected-00000.parquet"], files
        for name in ("part-00000.parquet", "part-00003.parquet"):
            part = storage.read_table(f"{config.run_dir}/curate/{directory}/{name}").to_pandas()
            shard = storage.read_table(str(tmp_path / "embed" / "pool" / name)).column("id").to_pylist()
            assert sorted(part["id"]) == sorted(shard), (directory, name)
        rejected = storage.read_table(f"{config.run_dir}/curate/{directory}/rejected-00000.parquet").to_pandas()
        assert rejected["id"].tolist() == ["pool-bad1"] and not rejected["keep"].any()
        whole = storage.read_table(f"{config.run_dir}/curate/{directory}").to_pandas()
        zero = whole.set_index("id").loc["pool-0059"]
        assert not zero.keep and zero.reason == "rejected: zero-norm embedding" and zero.cluster == -1
        assert entry["kept"] == int(whole["keep"].sum()) and entry["rows"] == 61
        assert entry["weight_sum"] == pytest.approx(float(whole.loc[whole["keep"], "weight"].sum()))


def _sharded_upstream(root, shard_rows=(70, 0, 55, 95), k=7, dim=6):
    """Shards of uneven size (one empty), clusters from 3 to 60 rows, planted near-duplicates, mismatches (one
    cluster all of them), NaN cosines, a cluster reject, harmful / negligible / helpful clusters and row
    scores with a group column."""
    rng = np.random.default_rng(11)
    n = sum(shard_rows)
    ids = np.array([f"row-{i:05d}" for i in rng.permutation(n)], dtype=object)
    cluster = rng.choice(k, size=n, p=np.array([1, 2, 3, 4, 5, 6, 0.4]) / 21.4)
    centres = rng.normal(size=(k, dim))
    emb = (centres[cluster] + 0.3 * rng.normal(size=(n, dim))).astype(np.float32)
    twins = rng.choice(n, 20, replace=False)
    emb[twins[10:]] = emb[twins[:10]] + 1e-4  # near-duplicates (cluster may differ: then not compared)
    cluster[twins[10:]] = cluster[twins[:10]]
    cosine = rng.normal(0.3, 0.05, n)
    cosine[rng.choice(n, 6, replace=False)] = -0.4  # planted mismatches
    cosine[rng.choice(n, 3, replace=False)] = np.nan
    # and a small cluster of them (a systematic caption swap): flagged rows beyond its floor
    cosine[cluster == k - 1] = -0.4
    distance = np.round(rng.random(n), 2)  # ties in distance: the order must not depend on file order
    influence = np.round(rng.normal(size=n), 1)  # ties in value: decided by the seeded hash
    # the sensitive attribute: a minority the validation set has half of, a group it lacks, and rows without one
    group = rng.choice(np.array(["regular", "inverted", "other", None], dtype=object), size=n, p=[0.75, 0.12, 0.08, 0.05])
    dirs = {s: root / s for s in ("embed", "cluster", "influence")}
    start = 0
    rejected_id = None
    for index, rows in enumerate(shard_rows):
        name = f"part-{index:05d}.parquet"
        sl = slice(start, start + rows)
        storage.write_table(pa.table({
            "id": pa.array(ids[sl].tolist(), type=pa.string()),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb[sl].ravel()), dim),
            "image_text_cosine": cosine[sl],
            "group": pa.array(group[sl].tolist(), type=pa.string()),
        }), str(dirs["embed"] / "pool" / name))
        assigned = np.arange(start, start + rows)
        if index == 3:  # its last row: a zero embedding the cluster stage rejected
            rejected_id = ids[assigned[-1]]
            storage.write_table(pa.table({"id": [rejected_id], "reason": ["zero-norm embedding"]}), str(dirs["cluster"] / "rejects" / name))
            assigned = assigned[:-1]
        storage.write_table(pa.table({"id": pa.array(ids[assigned].tolist(), type=pa.string()),
                                      "cluster": cluster[assigned].astype(np.int32),
                                      "distance": distance[assigned].astype(np.float32)}), str(dirs["cluster"] / "assignments" / name))
        storage.write_table(pa.table({"id": pa.array(ids[sl].tolist(), type=pa.string()), "influence": influence[sl],
                                      "influence_group_inverted": np.round(rng.normal(size=rows), 1)}),
                            str(dirs["influence"] / "row_scores" / name))
        start += rows
    storage.write_table(pa.table({
        "cluster": list(range(k)), "size": [0] * k, "n_sampled": [3] * k,
        "influence": [-2.0, 0.1, 1.0, 3.0, 0.2, 2.0, 0.5], "stderr": [0.5] * k,
        "ci_low": [-3.0, -0.9, 0.1, 2.0, -0.5, 1.0, 0.1], "ci_high": [-1.0, 1.1, 1.9, 4.0, 0.9, 3.0, 0.9],
        "influence_group_inverted": [0.0, 0.0, 1.0, -1.0, 0.0, 0.5, 2.0], "ci_low_group_inverted": [0.0, 0.0, 0.2, -2.0, 0.0, 0.1, 1.0],
    }), str(dirs["influence"] / "cluster_scores.parquet"))
    storage.write_table(pa.table({  # the placebo: other calls (cluster 3 harmful, 0 helpful), other group terms
        "cluster": list(range(k)), "size": [0] * k, "n_sampled": [3] * k,
        "influence": [2.0, 0.1, -0.2, -3.0, 1.2, 0.3, 0.5], "stderr": [0.5] * k,
        "ci_low": [1.0, -0.9, -1.1, -4.0, 0.2, -0.6, -0.4], "ci_high": [3.0, 1.1, 0.7, -2.0, 2.2, 1.2, 1.4],
        "influence_group_inverted": [1.0, 0.0, 0.0, -1.0, 0.5, 0.0, 0.0], "ci_low_group_inverted": [0.5, 0.0, -1.0, -2.0, 0.1, 0.0, 0.0],
    }), str(dirs["influence"] / "placebo_scores.parquet"))
    _write_validation(str(dirs["embed"]), str(dirs["cluster"]), centres, rng)
    storage.write_table(pa.table({"id": ["pool-bad1"], "split": ["pool"], "reason": ["undecodable image"]}),
                        str(dirs["embed"] / "rejects" / "part-00000.parquet"))
    manifest = lambda d, outputs, **extra: {"fingerprint": str(d)[-6:], "stage_dir": str(d), "outputs": outputs, **extra}  # noqa: E731
    return {
        "embed": manifest(dirs["embed"], {"pool": "pool", "rejects": "rejects", "validation": "validation"}),
        "cluster": manifest(dirs["cluster"], {"assignments": "assignments", "rejects": "rejects", "centroids": "centroids.npy"}),
        "influence": manifest(dirs["influence"], {"scores": "cluster_scores.parquet", "row_scores": "row_scores",
                                                  "placebo_scores": "placebo_scores.parquet"},
                              extra={"group_validation_loss": {"regular": 0.4, "inverted": 0.9}}),
    }, rejected_id


def _npy(array):
    import io

    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def _fitted_thresholds(root, assignments, pool, cfg):
    """(mismatch fence, duplicate threshold) the fitted rules give, by brute force: every validation row against
    every pool row of its cluster (the nearest centroid by cosine), and the validation cosines' quantile."""
    val = storage.read_table(str(root / "embed" / "validation")).to_pandas()
    v = np.stack(val["embedding"].to_numpy()).astype(np.float64)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    centroids = np.load(str(root / "cluster" / "centroids.npy"))
    val_cluster = np.argmax(v @ centroids.T, axis=1)
    x = np.stack(pool["embedding"].to_numpy()).astype(np.float64)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    cluster = assignments["cluster"].to_numpy()
    nearest = [max((v[i] @ x[cluster == c].T), default=-np.inf) for i, c in enumerate(val_cluster)]
    fence = np.quantile(val["image_text_cosine"], cfg.mismatch_rate) if cfg.mismatch_fence == "fitted" else None
    threshold = cfg.duplicate_threshold
    if threshold == "fitted":
        threshold = np.quantile(np.array(nearest)[np.isfinite(nearest)], 1 - cfg.duplicate_rate)
    return fence, threshold


def _reference(root, cfg, keep_fraction):
    """Every policy in memory on the concatenated inputs (curate.policy): what the streaming stage must equal."""
    from influencespace.curate import policy

    assignments = storage.read_table(str(root / "cluster" / "assignments")).to_pandas()
    pool = storage.read_table(str(root / "embed" / "pool")).to_pandas().set_index("id").loc[assignments["id"]]
    rows = storage.read_table(str(root / "influence" / "row_scores")).to_pandas().set_index("id").loc[assignments["id"]]
    scores = storage.read_table(str(root / "influence" / "cluster_scores.parquet")).to_pandas()
    cosine = pool["image_text_cosine"].to_numpy()
    duplicate = np.zeros(len(assignments))
    for _, index in assignments.groupby("cluster").indices.items():
        duplicate[index] = policy.semdedup_scores(np.stack(pool["embedding"].to_numpy()[index]),
                                                  assignments["distance"].to_numpy()[index], ids=assignments["id"].to_numpy()[index])
    scores_of = {"validation": scores, "none": scores.iloc[:0],
                 "placebo": storage.read_table(str(root / "influence" / "placebo_scores.parquet")).to_pandas()}

    def influence_policy(c):  # c: the configured curate settings, or an ablation's
        fence, threshold = _fitted_thresholds(root, assignments, pool, c)
        params = policy.PolicyParams(keep_fraction=keep_fraction, min_weight=c.min_weight, max_weight=c.max_weight,
                                     fairness_weight=c.fairness_weight, upweight_power=c.upweight_power,
                                     min_cluster_keep=c.min_cluster_keep, seed=c.seed,
                                     duplicate_threshold=threshold, floor_protects_flagged=c.floor_protects_flagged)
        value = {"influence": rows["influence"].to_numpy() + c.fairness_weight * rows["influence_group_inverted"].to_numpy(),
                 "image_text": cosine, "random": None}[c.row_order]
        mismatch = policy.mismatch_outliers(cosine, c.mismatch_iqr) if c.mismatch_fence == "tukey" else None
        if fence is not None:
            mismatch = ~(cosine >= fence)
        balance = {}
        if c.group_balance == "validation":
            val_groups = storage.read_table(str(root / "embed" / "validation")).to_pandas()["group"]
            balance = {"groups": pool["group"].to_numpy(), "group_target": val_groups.value_counts(normalize=True).to_dict()}
        return policy.influence_policy(assignments, scores_of[c.influence_source], params, "inverted", row_value=value,
                                       duplicate_scores=duplicate, mismatch=mismatch, **balance)

    manifest, decisions = influence_policy(cfg)
    expected = {
        "influencespace": manifest,
        "random": policy.random_policy(assignments, keep_fraction, cfg.seed),
        "clipscore": policy.clipscore_policy(assignments, cosine, keep_fraction, cfg.seed),
        "dedup": policy.dedup_policy(assignments, duplicate, keep_fraction, cfg.seed),
        "clipscore_dedup": policy.comparison_policy("clipscore_dedup", assignments, keep_fraction, cfg.seed, cosine, duplicate,
                                                    _fitted_thresholds(root, assignments, pool, cfg)[1]),
    }
    for name in cfg.ablations:
        expected[name] = influence_policy(cfg.model_copy(update=policy.ablation_settings(name, cfg.model_dump())))[0]
    return expected, decisions


@pytest.mark.parametrize("runner,order,fitted", [("local", "influence", False), ("local", "image_text", False),
                                                 ("local", "random", True), ("local-one-cluster-a-bucket", "influence", True),
                                                 pytest.param("ray", "random", True, marks=pytest.mark.ray)])
def test_streaming_curate_equals_the_in_memory_reference_row_for_row(make_config, tmp_path, runner, order, fitted, request,
                                                                     monkeypatch):
    """Every policy and every ablation, at a budget the tiers meet and at one that needs the whole-cluster
    fallback, for every row order of the influence policy."""
    if runner == "ray":
        request.getfixturevalue("ray_cluster")
    if runner == "local-one-cluster-a-bucket":  # the shuffle with as many buckets as clusters
        from influencespace.curate import stage

        monkeypatch.setattr(stage, "BUCKET_BYTES", 1)
        runner = "local"
    upstream, rejected_id = _sharded_upstream(tmp_path)
    same_order = {"random": "tiers_random_order", "image_text": "tiers_cosine_order", "influence": "tiers_influence_order"}  # would change nothing (and group_balanced under the default group_balance)
    config = make_config(f"runtime.runner={runner}", "curate.keep_fraction=0.6", "curate.curve_keep_fractions=[0.12]",
                         "curate.seed=5", f"curate.row_order={order}",
                         "curate.comparison_policies=[random,dedup,clipscore,clipscore_dedup]",
                         "curate.ablations=[" + ",".join(n for n in policy.ABLATIONS if n not in (same_order[order], "group_balanced")) + "]",
                         *(["curate.duplicate_rate=0.2", "curate.mismatch_rate=0.1"] if fitted
                           else ["curate.duplicate_threshold=0.99", "curate.mismatch_fence=tukey"]))
    outcome = run_stage(config, CurateStage(), upstream=upstream)
    thresholds = outcome.manifest["extra"]["thresholds"]
    if fitted:  # the fitted values are the brute-force ones, and differ from the fixed settings
        assignments = storage.read_table(str(tmp_path / "cluster" / "assignments")).to_pandas()
        pool = storage.read_table(str(tmp_path / "embed" / "pool")).to_pandas().set_index("id").loc[assignments["id"]]
        fence, threshold = _fitted_thresholds(tmp_path, assignments, pool, config.curate)
        assert thresholds["mismatch_fence"] == pytest.approx(fence) and thresholds["duplicate_threshold"] == pytest.approx(threshold)
        assert threshold != pytest.approx(0.99) and fence != pytest.approx(-0.4), (threshold, fence)
    else:
        assert thresholds["duplicate_threshold"] == config.curate.duplicate_threshold
    outputs = outcome.manifest["outputs"]
    for fraction, key_of in ((0.6, layout_key_main), (0.12, lambda n: f"curve_keep-0.12_{n}")):
        expected, decisions = _reference(tmp_path, config.curate, fraction)
        if fraction == 0.6:
            got_decisions = storage.read_table(f"{config.run_dir}/curate/cluster_decisions.parquet").to_pandas()
            pd.testing.assert_frame_equal(got_decisions.reset_index(drop=True), decisions.reset_index(drop=True), check_dtype=False)
        reasons = set()
        def kept_weights(frame):
            kept = frame[frame["keep"]]
            return dict(zip(kept["id"], np.round(kept["weight"], 9), strict=True))

        full_kept = kept_weights(expected["influencespace"])
        for name in config.curate.ablations:  # each ablation changes the manifest here (its rows or, group_balanced, their weights)
            assert kept_weights(expected[name]) != full_kept, f"ablation {name} keeps exactly the full policy's rows and weights at keep {fraction}"
        for name, frame in expected.items():
            got = storage.read_table(f"{config.run_dir}/curate/{outputs[key_of(name)]}").to_pandas()
            extra = got[got["cluster"] == -1]
            assert sorted(extra["id"]) == sorted(["pool-bad1", rejected_id]), (name, extra)
            got = got[got["cluster"] != -1].sort_values("id").reset_index(drop=True)
            want = frame.sort_values("id").reset_index(drop=True)
            diff = got.compare(want.astype(got.dtypes.to_dict())) if got.shape == want.shape else None
            assert diff is not None and diff.empty, f"{name} at keep {fraction}: rows differ\n{diff if diff is not None else (got.shape, want.shape)}"
            reasons |= set(got["reason"])
        if fraction == 0.12:
            assert {"negligible", "budget-thinned"} & reasons, reasons  # the fallback was reached
        else:
            assert {"image-text-mismatch", "near-duplicate", "harmful"} <= reasons, reasons


def layout_key_main(name):
    from influencespace import layout

    return layout.policy_output(name)


def test_buckets_pack_whole_clusters_up_to_the_target():
    from influencespace.curate.stage import plan_buckets

    bucket = plan_buckets(np.array([3, 3, 10, 0, 2, 2, 2]), row_bytes=10, target_bytes=60)
    assert bucket.tolist() == [0, 0, 1, 2, 2, 2, 2]  # the 10-row cluster alone (100 B > 60 B), never split


def test_fairness_upweight_reads_the_influence_stages_own_group_intervals(make_config, tmp_path):
    """From the real influence stage's output: the worst group's intervals reach curation's up-weighting.

    A cluster is up-weighted for the worst-off group exactly when it is up-weighted at all (rare and
    helpful) and that group's own lower bound (``ci_low_group_<g>``, written by the influence stage) is
    above zero; such clusters weigh (1 + fairness_weight) times what they would without the term."""
    from influencespace.curate import policy
    from influencespace.influence.stage import InfluenceStage
    from influencespace.layout import group_column
    from tests.influence.synthetic import make_data, write_upstream

    upstream = write_upstream(str(tmp_path / "up"), make_data(), num_clusters=8)
    influence_config = make_config("influence.dtype=float64", "influence.negatives=8", "influence.head_dim=4",
                                   "influence.samples_per_cluster=40", run_dir=str(tmp_path / "run"))
    influence = run_stage(influence_config, InfluenceStage(), upstream=upstream)
    scores = storage.read_table(storage.join(influence_config.run_dir, "influence", "cluster_scores.parquet")).to_pandas()
    worst = max(influence.manifest["extra"]["group_validation_loss"].items(), key=lambda kv: kv[1])[0]
    for stat in ("influence", "stderr", "ci_low", "ci_high"):
        assert group_column(worst, stat) in scores, f"the influence stage wrote no {group_column(worst, stat)}"

    runs = {}
    for fairness in (1.0, 0.0):
        config = make_config("curate.keep_fraction=0.7", f"curate.fairness_weight={fairness}", "curate.comparison_policies=[]",
                             "curate.row_order=influence",  # the synthetic pool has no image–text cosine
                             run_dir=str(tmp_path / f"run-{fairness}"))
        outcome = run_stage(config, CurateStage(), upstream={**upstream, "influence": influence.manifest})
        assert outcome.manifest["extra"]["worst_group"] == worst
        runs[fairness] = storage.read_table(storage.join(config.run_dir, "curate", "cluster_decisions.parquet")).to_pandas()
    fair, plain = (runs[f].set_index("cluster").sort_index() for f in (1.0, 0.0))
    expected = (fair["kept_reason"] == policy.UPWEIGHTED) & (scores.set_index("cluster")[group_column(worst, "ci_low")]
                                                             .reindex(fair.index) > 0)
    assert fair["helps_worst_group"].tolist() == expected.tolist()
    assert fair["helps_worst_group"].any(), f"no cluster helps {worst} here: the test would not see the branch\n{scores}"
    assert plain["helps_worst_group"].tolist() == expected.tolist()  # the same clusters; only their weight differs
    helped = fair.index[fair["helps_worst_group"]]
    assert (fair.loc[helped, "weight"] > plain.loc[helped, "weight"]).all(), (fair.loc[helped], plain.loc[helped])
