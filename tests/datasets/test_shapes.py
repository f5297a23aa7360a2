"""The shape-captions benchmark: rendered shapes, templated captions, its own defect mix."""

import io

import numpy as np
import pytest
from PIL import Image

from influencespace.config import benchmark_config
from influencespace.datasets.benchmark import REGULAR, SIZES, build_benchmark
from influencespace.datasets.shapes import (
    CLASS_NAMES,
    COLOURS,
    GLOSSES,
    OUTLINE,
    SWAP_SLICES,
    SYNONYMS,
    alignment_set,
    render,
)


@pytest.fixture(scope="module")
def splits():
    return build_benchmark(benchmark_config(SIZES["tiny"], ["name=shape_captions", "corrupted_image_fraction=0.03", "swap_caption_fraction=0.02"]))


def _decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(int)


def test_counts_match_the_configured_fractions(splits):
    counts = splits.counts
    assert splits.pool.num_rows == counts["pool"] == 300
    assert counts["duplicates"] == 60 and counts["duplicate_sources"] == 3
    assert counts["caption_swapped"] == 6 and counts["caption_random"] == 15
    assert counts["image_noise"] == counts["image_blank"] == counts["image_occluded"] == 3
    assert counts["undecodable"] == 3 and counts["minority"] == 15
    assert splits.pool.column_names == ["id", "image", "text", "group", "label"]
    assert splits.classes["benchmark"] == "shape_captions" and splits.classes["groups"]["minority"] == OUTLINE


def test_same_seed_same_bytes_other_seed_differs():
    cfg = benchmark_config(SIZES["tiny"], ["name=shape_captions"])
    a, b = build_benchmark(cfg), build_benchmark(cfg)
    c = build_benchmark(benchmark_config(SIZES["tiny"], ["name=shape_captions", "seed=1"]))
    assert a.pool.equals(b.pool) and a.ground_truth.equals(b.ground_truth) and a.test.equals(b.test)
    assert not a.pool.equals(c.pool)


def test_ground_truth_matches_planted_defects(splits):
    pool = {row["id"]: row for row in splits.pool.to_pylist()}
    swaps = {(s, t): colours for s, t, colours in SWAP_SLICES}
    for row in splits.ground_truth.to_pylist():
        sample = pool[row["id"]]
        assert sample["label"] == row["caption_label"]
        assert row["caption_corrupted"] == (row["caption_label"] != row["true_label"])
        named = [n for n in CLASS_NAMES if any(syn in sample["text"] for syn in SYNONYMS[n])]
        claimed = CLASS_NAMES[row["caption_label"]]
        assert claimed in named or sample["text"] == GLOSSES[claimed] + "."  # the caption names the claimed shape
        if row["caption_noise"] == "swap":
            assert (row["true_label"], row["caption_label"]) in swaps and row["group"] == REGULAR
        if row["image_corruption"] == "undecodable":
            with pytest.raises((OSError, SyntaxError, ValueError)):
                _decode(sample["image"])
            continue
        image = _decode(sample["image"])
        assert image.shape == (32, 32, 3)
        if row["image_corruption"] == "blank":
            assert np.ptp(image) == 0
        if row["duplicate_of"] is not None:
            source = pool[row["duplicate_of"]]
            assert sample["text"] == source["text"] and not np.array_equal(image, _decode(source["image"]))


def test_swapped_slices_are_one_colour_family(splits):
    gt = splits.ground_truth.to_pandas()
    pool = splits.pool.to_pandas().set_index("id")
    for source, _, colours in SWAP_SLICES:
        swapped = gt[(gt.caption_noise == "swap") & (gt.true_label == source) & gt.duplicate_of.isna()]
        assert len(swapped)
        for image_bytes in pool.loc[swapped.id, "image"]:
            image = _decode(image_bytes).reshape(-1, 3)
            pixels, counts = np.unique(image, axis=0, return_counts=True)
            ranked = pixels[np.argsort(-counts)]
            fill = next(p for p in ranked if np.ptp(p) > 30)  # the most common non-grey pixel is the fill
            nearest = min(COLOURS, key=lambda name: np.abs(np.array(COLOURS[name]) - fill).sum())
            assert nearest in colours


def test_validation_balanced_and_test_half_minority(splits):
    val = splits.validation.to_pandas()
    assert (val.group == OUTLINE).sum() == (val.group == REGULAR).sum() == 30
    assert np.bincount(val.label, minlength=10).tolist() == [6] * 10
    test = splits.test.to_pandas()
    assert (test.group == OUTLINE).sum() == 50 and set(test.text) <= set(splits.classes["prompts"])


def test_outline_style_leaves_the_inside_background():
    filled = render(0, "red", 30, 12.0, 16, 16, 0.0, outline=False)
    outline = render(0, "red", 30, 12.0, 16, 16, 0.0, outline=True)
    assert filled[16, 16].tolist() == list(COLOURS["red"]) and outline[16, 16].tolist() == [30, 30, 30]


def test_alignment_renders_are_not_benchmark_rows():
    images, labels = alignment_set(50)
    splits = build_benchmark(benchmark_config(SIZES["tiny"], ["name=shape_captions"]))
    decodable = splits.ground_truth.column("image_corruption").to_pylist()
    rows = {_decode(b).astype(np.uint8).tobytes()
            for b, kind in zip(splits.pool.column("image").to_pylist(), decodable, strict=True) if kind != "undecodable"}
    assert len(set(labels.tolist())) == 10 and not any(img.tobytes() in rows for img in images)
