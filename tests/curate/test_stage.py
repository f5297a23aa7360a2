import numpy as np
import pyarrow as pa
import pytest

from influencespace import storage
from influencespace.curate.stage import CurateStage
from influencespace.stages import run_stage


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
        "embed": manifest(embed_dir, {"pool": "pool", "rejects": "rejects"}),
        "cluster": manifest(cluster_dir, {"assignments": "assignments"}),
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


def test_thinned_clusters_keep_the_rows_of_highest_own_influence(make_config, tmp_path):
    upstream = _upstream(tmp_path)
    run_stage(make_config("curate.keep_fraction=0.5", "curate.duplicate_threshold=1.0"), CurateStage(), upstream=upstream)
    manifest = storage.read_table(str(tmp_path / "run" / "curate" / "manifest")).to_pandas()
    rows = storage.read_table(str(tmp_path / "influence" / "row_scores")).to_pandas()
    merged = manifest.merge(rows, on="id")
    thinned = merged[merged.cluster == 1]  # the negligible cluster: 15 rows, thinned to its floor of 4
    assert thinned["keep"].sum() == 4 and set(thinned.loc[~thinned.keep, "reason"]) == {"negligible-thinned"}
    assert thinned.loc[thinned.keep, "influence"].min() > thinned.loc[~thinned.keep, "influence"].max()


def test_influence_row_order_without_a_row_pass_is_a_clear_error(make_config, tmp_path):
    upstream = _upstream(tmp_path)
    upstream["influence"]["outputs"].pop("row_scores")
    with pytest.raises(Exception, match="influence.score_rows=true, or set curate.row_order=image_text or random"):
        run_stage(make_config(), CurateStage(), upstream=upstream)
    outcome = run_stage(make_config("curate.row_order=image_text", run_dir=str(tmp_path / "run2")), CurateStage(), upstream=upstream)
    assert outcome.status == "ran"


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
    for name, start, stop in (("part-00000.parquet", 0, 25), ("part-00003.parquet", 25, 60)):
        storage.write_table(pool.slice(start, stop - start), str(tmp_path / "embed" / "pool" / name))
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
