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
    manifest = lambda d, outputs, **extra: {"fingerprint": d[-6:], "stage_dir": d, "outputs": outputs, **extra}  # noqa: E731
    return {
        "embed": manifest(embed_dir, {"pool": "pool", "rejects": "rejects"}),
        "cluster": manifest(cluster_dir, {"assignments": "assignments"}),
        "influence": manifest(influence_dir, {"scores": "cluster_scores.parquet"},
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
