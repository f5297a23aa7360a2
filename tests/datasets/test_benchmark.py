import io

import numpy as np
import pyarrow.compute as pc
import pytest
from PIL import Image

from influencespace import storage
from influencespace.config import benchmark_config
from influencespace.datasets.benchmark import MINORITY, REGULAR, SIZES, SWAP_PAIRS, build_fashion_captions
from influencespace.errors import ConfigError


@pytest.fixture(scope="module")
def splits():
    return build_fashion_captions(benchmark_config(SIZES["tiny"]))


def _decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("L"))


def test_counts_match_the_configured_fractions(splits):
    counts = splits.counts
    assert splits.pool.num_rows == counts["pool"] == 300
    assert counts["duplicates"] == 60 and counts["duplicate_sources"] == 3
    assert counts["caption_swapped"] == 15 and counts["caption_random"] == 15
    assert counts["image_noise"] + counts["image_blank"] == 3
    assert counts["undecodable"] == 3 and counts["minority"] == 15
    assert splits.validation.num_rows == 60 and splits.test.num_rows == 100
    assert splits.pool.column_names == ["id", "image", "text", "group", "label"]


def test_ids_unique_and_ground_truth_aligned(splits):
    ids = splits.pool.column("id").to_pylist()
    assert len(set(ids)) == len(ids)
    assert splits.ground_truth.column("id").to_pylist() == ids


def test_same_seed_same_bytes_other_seed_differs():
    a = build_fashion_captions(benchmark_config(SIZES["tiny"]))
    b = build_fashion_captions(benchmark_config(SIZES["tiny"]))
    c = build_fashion_captions(benchmark_config(SIZES["tiny"], ["seed=1"]))
    assert a.pool.equals(b.pool) and a.ground_truth.equals(b.ground_truth) and a.test.equals(b.test)
    assert not a.pool.equals(c.pool)


def test_ground_truth_matches_planted_defects(splits):
    gt = splits.ground_truth.to_pylist()
    pool = {row["id"]: row for row in splits.pool.to_pylist()}
    for row in gt:
        sample = pool[row["id"]]
        assert sample["label"] == row["caption_label"]
        assert row["caption_corrupted"] == (row["caption_label"] != row["true_label"])
        if row["caption_noise"] == "swap":
            assert (row["true_label"], row["caption_label"]) in SWAP_PAIRS and row["group"] == REGULAR
        if row["image_corruption"] == "undecodable":
            with pytest.raises((OSError, SyntaxError, ValueError)):
                _decode(sample["image"])
        else:
            assert _decode(sample["image"]).shape == (28, 28)
        if row["image_corruption"] == "blank":
            assert np.ptp(_decode(sample["image"])) == 0
        if row["duplicate_of"] is not None:
            source = pool[row["duplicate_of"]]
            assert sample["text"] == source["text"]
            diff = np.abs(_decode(sample["image"]).astype(int) - _decode(source["image"]).astype(int))
            assert diff.max() <= 6 and diff.mean() > 0  # jittered, not identical


def test_swaps_are_the_brightest_of_their_class(splits):
    gt = splits.ground_truth.to_pandas()
    pool = splits.pool.to_pandas().set_index("id")
    clean = gt[(gt.caption_noise == "none") & (gt.image_corruption == "none") & (gt.group == REGULAR)]
    for source, _ in SWAP_PAIRS:
        swapped = gt[(gt.caption_noise == "swap") & (gt.true_label == source) & gt.duplicate_of.isna()]
        others = clean[(clean.true_label == source) & clean.duplicate_of.isna()]
        if len(swapped) and len(others):
            bright = lambda ids: np.mean([_decode(pool.loc[i, "image"]).mean() for i in ids])  # noqa: E731
            assert bright(swapped.id) > bright(others.id)


def test_validation_balanced_and_test_half_minority(splits):
    val = splits.validation.to_pandas()
    assert (val.group == MINORITY).sum() == (val.group == REGULAR).sum() == 30
    assert np.bincount(val.label, minlength=10).tolist() == [6] * 10
    test = splits.test.to_pandas()
    assert (test.group == MINORITY).sum() == 50
    assert set(test.text) <= set(splits.classes["prompts"])


def test_pool_too_large_is_a_config_error():
    with pytest.raises(ConfigError, match="pool_size"):
        build_fashion_captions(benchmark_config(SIZES["tiny"], ["pool_size=200000", "duplicate_fraction=0"]))


def test_fractions_that_leave_no_clean_rows_are_rejected():
    with pytest.raises(ConfigError, match="must stay below 0.95"):
        benchmark_config(SIZES["tiny"], ["duplicate_fraction=0.6", "minority_fraction=0.4"])


def test_written_splits_read_back(tiny_benchmark):
    pool = storage.read_table(str(tiny_benchmark / "pool"))
    assert pool.num_rows == 300 and len(storage.list_files(str(tiny_benchmark / "pool"), ".parquet")) == 3
    gt = storage.read_table(str(tiny_benchmark / "ground_truth" / "ground_truth.parquet"))
    assert pc.sum(gt.column("image_corrupted")).as_py() == 6
    classes = storage.read_json(str(tiny_benchmark / "classes.json"))
    assert classes["footwear_classes"] == classes["positive_classes"] == [5, 7, 9]
