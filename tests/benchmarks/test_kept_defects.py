"""benchmarks/kept_defects.py: weighted shares of the planted defects in every manifest of a run."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from benchmarks.kept_defects import kept_defects


def _write(path, table):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(table), path)


def test_shares_are_of_the_kept_weight_in_every_manifest(tmp_path):
    ids = ["a", "b", "c", "d"]
    _write(tmp_path / "data" / "ground_truth" / "ground_truth.parquet", {
        "id": ids, "caption_noise": ["swap", "none", "random", "none"], "image_corrupted": [False, False, False, True],
        "duplicate_of": [None, "a", None, None], "group": ["regular", "inverted", "regular", "regular"]})
    manifest = {"id": ids, "keep": [True, True, False, True], "weight": [2.0, 1.0, 0.0, 1.0]}
    _write(tmp_path / "curate" / "manifest" / "part-00000.parquet", manifest)
    _write(tmp_path / "curate" / "policies" / "random" / "part-00000.parquet", {**manifest, "keep": [False, True, True, True],
                                                                               "weight": [0.0, 1.0, 1.0, 1.0]})
    _write(tmp_path / "curate" / "curve" / "keep-0.40" / "influencespace" / "part-00000.parquet",
           {**manifest, "keep": [False, True, False, False], "weight": [0.0, 1.0, 0.0, 0.0]})
    table = kept_defects(str(tmp_path)).set_index(["budget", "policy"])
    ours = table.loc[("main", "influencespace")]
    assert ours["kept"] == 3
    assert ours["swap"] == pytest.approx(2 / 4)  # row a, weight 2, of Σ weight 4
    assert ours["random_caption"] == 0 and ours["corrupted_image"] == pytest.approx(1 / 4)
    assert ours["duplicate_copy"] == pytest.approx(1 / 4) and ours["minority"] == pytest.approx(1 / 4)
    assert table.loc[("main", "random"), "random_caption"] == pytest.approx(1 / 3)
    assert table.loc[("keep-0.40", "influencespace"), "minority"] == 1.0
    assert table.loc[("", "pool"), "swap"] == pytest.approx(1 / 4)
