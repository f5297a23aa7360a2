"""The fashion-captions benchmark: real Fashion-MNIST images, WordNet captions, planted defects.

What is planted (fractions are of the pool; see docs/benchmark-data.md and ../shared/BENCHMARK.md):

- near-duplicates: a few source pairs copied many times with small pixel jitter, same caption;
- random caption noise: the caption of a uniformly drawn other class;
- systematic caption swaps: inside a visual slice (the brightest images of a source class), every
  caption names one fixed other class, so whole clusters are harmful;
- corrupted images (uniform noise or a blank frame) and a handful of undecodable byte strings;
- a minority style (inverted polarity) with the sensitive attribute in ``group``.

The ground truth (``duplicate_of``, ``caption_corrupted``, ``image_corrupted``, ``group``, ...) is
written to its own table; the pipeline never reads it, evaluation does. Everything is a pure function
of the config (seeded), so the same config gives byte-identical tables.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from influencespace.config import BenchmarkDataConfig
from influencespace.datasets import captions as caps
from influencespace.datasets.fashion_mnist import CLASS_NAMES, FOOTWEAR_CLASSES, load_split
from influencespace.errors import ConfigError

REGULAR, MINORITY = "regular", "inverted"
# (source class, caption class) pairs of the systematic swaps: Sneaker→Bag, Trouser→Dress.
SWAP_PAIRS = ((7, 8), (1, 3))

# Size presets for `influencespace data build --size`.
SIZES: dict[str, dict[str, Any]] = {
    "tiny": {"pool_size": 300, "validation_size": 60, "test_size": 100, "duplicate_sources": 3, "undecodable_count": 3,
             "shard_rows": 100},
    "small": {"pool_size": 6000, "validation_size": 600, "test_size": 2000},
    "full": {"pool_size": 50000, "validation_size": 2000, "test_size": 10000},
}


@dataclass
class BenchmarkSplits:
    pool: Any  # pyarrow.Table: id, image, text, group, label
    validation: Any  # pyarrow.Table: id, image, text, group, label
    test: Any  # pyarrow.Table: id, image, text, group, label
    ground_truth: Any  # pyarrow.Table, one row per pool id
    classes: dict[str, Any]
    counts: dict[str, int]


def encode_png(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image, mode="L").save(buf, format="PNG")
    return buf.getvalue()


def _stratified(labels: np.ndarray, candidates: np.ndarray, count: int) -> np.ndarray:
    """``count`` candidates, classes taken round-robin (candidates are already shuffled)."""
    by_class = [list(candidates[labels[candidates] == c]) for c in range(int(labels.max()) + 1)]
    out: list[int] = []
    while len(out) < count:
        for pool in by_class:
            if pool and len(out) < count:
                out.append(pool.pop())
    return np.array(out, dtype=np.int64)


def _labelled_table(prefix: str, images: np.ndarray, texts: list[str], labels: np.ndarray, groups: list[str]):
    import pyarrow as pa

    return pa.table(
        {
            "id": [f"{prefix}-{i:06d}" for i in range(len(images))],
            "image": pa.array([encode_png(img) for img in images], type=pa.binary()),
            "text": texts,
            "group": groups,
            "label": pa.array(labels, type=pa.int64()),
        }
    )


def _alternating_groups(n: int) -> list[str]:
    return [MINORITY if i % 2 else REGULAR for i in range(n)]


def _style(images: np.ndarray, groups: list[str]) -> np.ndarray:
    out = images.copy()
    minority = np.array([g == MINORITY for g in groups])
    out[minority] = 255 - out[minority]
    return out


@dataclass
class PlantedRows:
    """The unique pool rows of a benchmark after its defects were planted (row order = build order).

    ``caption_noise`` is 'none' or the kind of caption defect, ``corruption`` 'none' or the kind of
    image defect; ``encoded`` holds each row's image bytes as the pool will store them."""

    images: np.ndarray
    true_labels: np.ndarray
    caption_labels: np.ndarray
    caption_noise: np.ndarray
    corruption: np.ndarray
    groups: np.ndarray
    texts: list[str]
    encoded: list[bytes]

    def free_rows(self, mask: np.ndarray | None = None) -> np.ndarray:
        """Rows with neither a caption nor an image defect (and ``mask``, if given)."""
        ok = (self.caption_noise == "none") & (self.corruption == "none")
        return np.flatnonzero(ok if mask is None else ok & mask)


def assemble_pool(rng: np.random.Generator, rows: PlantedRows, n_dup: int, duplicate_sources: int | None,
                  copy_image: Callable[[np.ndarray], bytes]):
    """Append ``n_dup`` near-duplicates of a few clean regular rows, shuffle, and build the pool table,
    its ground truth and the defect counts (shared by every built-in benchmark).

    ``copy_image(image)`` encodes one perturbed copy of a source image; the sources are
    ``duplicate_sources`` rows (None: about 0.6% of the pool, at least 2), copied round-robin."""
    import pyarrow as pa

    n_unique = len(rows.texts)
    n = n_unique + n_dup
    texts, encoded = list(rows.texts), list(rows.encoded)
    n_sources = duplicate_sources or max(2, round(0.006 * n))
    clean = rows.free_rows(rows.groups == REGULAR)
    sources = rng.choice(clean, min(n_sources, len(clean)), replace=False) if n_dup else np.array([], dtype=np.int64)
    dup_of_row = sources[np.arange(n_dup) % max(1, len(sources))] if n_dup else np.array([], dtype=np.int64)
    for source_row in dup_of_row:
        encoded.append(copy_image(rows.images[source_row]))
        texts.append(texts[source_row])

    all_true = np.concatenate([rows.true_labels, rows.true_labels[dup_of_row]])
    all_caption = np.concatenate([rows.caption_labels, rows.caption_labels[dup_of_row]])
    all_noise = np.concatenate([rows.caption_noise, rows.caption_noise[dup_of_row]])
    all_corruption = np.concatenate([rows.corruption, rows.corruption[dup_of_row]])
    all_groups = np.concatenate([rows.groups, rows.groups[dup_of_row]])
    order = rng.permutation(n)  # order[position] = row
    position = np.argsort(order)
    ids = np.array([f"pool-{p:07d}" for p in position], dtype=object)
    duplicate_of = [None] * n_unique + [ids[r] for r in dup_of_row]

    pool = pa.table(
        {
            "id": ids[order].tolist(),
            "image": pa.array([encoded[r] for r in order], type=pa.binary()),
            "text": [texts[r] for r in order],
            "group": all_groups[order].tolist(),
            # The label the annotation claims (the caption's class): noisy exactly where the caption is.
            "label": pa.array(all_caption[order], type=pa.int64()),
        }
    )
    ground_truth = pa.table(
        {
            "id": ids[order].tolist(),
            "true_label": pa.array(all_true[order], type=pa.int64()),
            "caption_label": pa.array(all_caption[order], type=pa.int64()),
            "caption_corrupted": pa.array(all_noise[order] != "none"),
            "caption_noise": all_noise[order].tolist(),
            "image_corrupted": pa.array(all_corruption[order] != "none"),
            "image_corruption": all_corruption[order].tolist(),
            "duplicate_of": pa.array([duplicate_of[r] for r in order], type=pa.string()),
            "group": all_groups[order].tolist(),
        }
    )
    counts = {
        "pool": n,
        "duplicates": int(n_dup),
        "duplicate_sources": int(len(sources)),
        "caption_swapped": int((all_noise == "swap").sum()),
        "caption_random": int((all_noise == "random").sum()),
        **{f"image_{kind}": int((all_corruption == kind).sum())
           for kind in sorted(set(all_corruption.tolist()) - {"none", "undecodable"})},
        "undecodable": int((all_corruption == "undecodable").sum()),
        "minority": int((all_groups != REGULAR).sum()),
    }
    return pool, ground_truth, counts


def truncate_or_garble(rng: np.random.Generator, png: bytes, row: int) -> bytes:
    """Undecodable image bytes: a truncated PNG (odd rows) or 64 random bytes (even rows)."""
    return png[: len(png) // 3] if row % 2 else rng.bytes(64)


def build_fashion_captions(cfg: BenchmarkDataConfig) -> BenchmarkSplits:
    """Build pool, validation, test and ground truth in memory (deterministic in ``cfg``)."""

    rng = np.random.default_rng(cfg.seed)
    train_images, train_labels = load_split(cfg.fashion_mnist_dir, "train")
    test_images, test_labels = load_split(cfg.fashion_mnist_dir, "test")
    vocab = caps.build_vocabulary(cfg.wordnet_dir)
    prompts = caps.class_prompts(vocab)

    # Trusted validation set: held-out train images, balanced over classes and groups.
    shuffled = rng.permutation(len(train_images))
    val_idx = _stratified(train_labels, shuffled, cfg.validation_size)
    val_groups = _alternating_groups(len(val_idx))
    validation = _labelled_table(
        "val", _style(train_images[val_idx], val_groups),
        caps.sample_captions(vocab, train_labels[val_idx], rng), train_labels[val_idx], val_groups,
    )
    available = np.setdiff1d(shuffled, val_idx, assume_unique=True)

    # Pool: unique rows first, duplicates appended, then everything shuffled.
    n = cfg.pool_size
    n_dup = round(cfg.duplicate_fraction * n)
    n_unique = n - n_dup
    if n_unique > len(available):
        raise ConfigError(
            f"data.benchmark.pool_size={n} needs {n_unique} distinct train images but only {len(available)} remain "
            f"after the validation set; lower pool_size or raise duplicate_fraction"
        )
    src = rng.choice(available, n_unique, replace=False)
    images = train_images[src].copy()
    true_labels = train_labels[src].copy()
    caption_labels = true_labels.copy()
    caption_noise = np.array(["none"] * n_unique, dtype=object)
    corruption = np.array(["none"] * n_unique, dtype=object)
    groups = np.array([REGULAR] * n_unique, dtype=object)
    planted = PlantedRows(images, true_labels, caption_labels, caption_noise, corruption, groups, [], [])
    free_rows = planted.free_rows

    # Minority style on a random subset of unique rows.
    n_minority = round(cfg.minority_fraction * n)
    minority_rows = rng.choice(n_unique, min(n_minority, n_unique), replace=False)
    groups[minority_rows] = MINORITY

    # Systematic swaps: the brightest images of each source class (regular group) get the other caption.
    n_swap = round(cfg.swap_caption_fraction * n)
    brightness = images.reshape(n_unique, -1).mean(axis=1)
    for pair_index, (source, target) in enumerate(SWAP_PAIRS):
        want = n_swap // len(SWAP_PAIRS) + (1 if pair_index < n_swap % len(SWAP_PAIRS) else 0)
        rows = free_rows((true_labels == source) & (groups == REGULAR))
        chosen = rows[np.argsort(-brightness[rows], kind="stable")][:want]
        caption_labels[chosen] = target
        caption_noise[chosen] = "swap"

    # Uniform caption noise: a caption of a random other class.
    rows = free_rows()
    chosen = rng.choice(rows, min(round(cfg.random_caption_fraction * n), len(rows)), replace=False)
    caption_labels[chosen] = (true_labels[chosen] + rng.integers(1, len(CLASS_NAMES), len(chosen))) % len(CLASS_NAMES)
    caption_noise[chosen] = "random"

    # Corrupted images: half uniform noise, half blank frames.
    rows = free_rows()
    chosen = rng.choice(rows, min(round(cfg.corrupted_image_fraction * n), len(rows)), replace=False)
    for i, row in enumerate(chosen):
        if i % 2 == 0:
            images[row] = rng.integers(0, 256, images[row].shape, dtype=np.uint8)
            corruption[row] = "noise"
        else:
            images[row] = np.uint8(rng.integers(0, 256))
            corruption[row] = "blank"

    # Undecodable bytes: garbage or a truncated PNG.
    rows = free_rows()
    undecodable = rng.choice(rows, min(cfg.undecodable_count, len(rows)), replace=False)
    corruption[undecodable] = "undecodable"

    # Invert minority images after the slices were chosen on the original polarity.
    images[groups == MINORITY] = 255 - images[groups == MINORITY]

    planted.texts = caps.sample_captions(vocab, caption_labels, rng)
    for row in range(n_unique):
        png = encode_png(images[row])
        planted.encoded.append(truncate_or_garble(rng, png, row) if corruption[row] == "undecodable" else png)

    # Near-duplicates of a few clean regular sources, copied many times with pixel jitter.
    def jittered(image: np.ndarray) -> bytes:
        jitter = rng.integers(-6, 7, image.shape)
        return encode_png(np.clip(image.astype(np.int64) + jitter, 0, 255).astype(np.uint8))

    pool, ground_truth, counts = assemble_pool(rng, planted, n_dup, cfg.duplicate_sources, jittered)

    # Test set: test images with the minority style on half, captioned by the class prompt.
    test_idx = np.sort(rng.choice(len(test_images), cfg.test_size, replace=False))
    test_groups = [MINORITY if flip else REGULAR for flip in rng.permutation(cfg.test_size) % 2]
    test = _labelled_table(
        "test", _style(test_images[test_idx], test_groups), [prompts[c] for c in test_labels[test_idx]],
        test_labels[test_idx], test_groups,
    )

    classes = {
        "names": list(CLASS_NAMES),
        "prompts": prompts,
        "benchmark": "fashion_captions",
        "footwear_classes": list(FOOTWEAR_CLASSES),
        "positive_classes": list(FOOTWEAR_CLASSES),  # the binary fairness task: footwear vs not
        "groups": {"majority": REGULAR, "minority": MINORITY},
        "vocabulary": [{"name": v.name, "synonyms": list(v.synonyms), "gloss": v.gloss} for v in vocab],
        "swap_pairs": [[CLASS_NAMES[s], CLASS_NAMES[t]] for s, t in SWAP_PAIRS],
    }
    counts = {**counts, "validation": validation.num_rows, "test": test.num_rows}
    return BenchmarkSplits(pool, validation, test, ground_truth, classes, counts)


def build_benchmark(cfg: BenchmarkDataConfig) -> BenchmarkSplits:
    """The built-in benchmark ``cfg.name`` names, built in memory."""
    if cfg.name == "shape_captions":
        from influencespace.datasets.shapes import build_shape_captions

        return build_shape_captions(cfg)
    return build_fashion_captions(cfg)


def write_splits(splits: BenchmarkSplits, out_uri: str, shard_rows: int, fmt: str = "parquet") -> dict[str, str]:
    """Write the splits under ``out_uri``; return the relative location of each output.

    Shards are written atomically and existing ones are kept, so an interrupted write resumes.
    """
    from influencespace import storage
    from influencespace.datasets import webdataset

    outputs = {}
    for name in ("pool", "validation", "test"):
        table = getattr(splits, name)
        if fmt == "webdataset" and name == "pool":
            webdataset.write_table(table, storage.join(out_uri, "pool"), shard_rows)
        else:
            for shard, start in enumerate(range(0, table.num_rows, shard_rows)):
                uri = storage.join(out_uri, name, f"part-{shard:05d}.parquet")
                if not storage.is_file(uri):
                    storage.write_table(table.slice(start, shard_rows), uri)
        outputs[name] = name
    storage.write_table(splits.ground_truth, storage.join(out_uri, "ground_truth", "ground_truth.parquet"))
    storage.write_json(storage.join(out_uri, "classes.json"), splits.classes)
    outputs["ground_truth"] = "ground_truth/ground_truth.parquet"
    outputs["classes"] = "classes.json"
    return outputs
