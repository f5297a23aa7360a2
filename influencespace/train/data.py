"""A variant's training set: the embedded pool joined with a curation manifest.

The baseline is the whole embedded pool with weight 1. A curated variant keeps the rows its manifest
marks ``keep`` with their ``weight``; rows the manifest keeps but the pool lacks are an error (the
manifest belongs to another run), rows the embed stage rejected are ``keep = false`` and ignored.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from influencespace import storage
from influencespace.errors import InputDataError

POOL_COLUMNS = ["id", "image_embedding", "text_embedding"]


@dataclass
class TrainingSet:
    """Row-aligned arrays: ids, frozen tower embeddings (float32) and sampling weights."""

    ids: np.ndarray
    image: np.ndarray
    text: np.ndarray
    weight: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)


def fixed_size_matrix(column) -> np.ndarray:
    """A (fixed-size) list column as an (n, d) float32 matrix, without a Python loop."""
    import pyarrow as pa

    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if len(array) == 0:
        return np.zeros((0, 0), np.float32)
    if pa.types.is_fixed_size_list(array.type):
        dim = array.type.list_size
        return array.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(array), dim)
    return np.stack(array.to_numpy(zero_copy_only=False)).astype(np.float32)


def read_pool(pool_uri: str) -> TrainingSet:
    """The embedded pool with weight 1 for every row (the baseline)."""
    table = storage.read_table(pool_uri, columns=POOL_COLUMNS)
    ids = np.asarray(table.column("id").to_pylist(), dtype=object)
    image = fixed_size_matrix(table.column("image_embedding"))
    text = fixed_size_matrix(table.column("text_embedding"))
    if len(ids) == 0:
        raise InputDataError(f"the embedded pool at {pool_uri} is empty; nothing to train on")
    return TrainingSet(ids, image, text, np.ones(len(ids)))


def apply_manifest(pool: TrainingSet, manifest_uri: str) -> TrainingSet:
    """The rows of ``pool`` a manifest keeps, with the manifest's weights."""
    table = storage.read_table(manifest_uri, columns=["id", "keep", "weight"])
    frame = table.to_pandas()
    kept = frame[frame["keep"].astype(bool) & (frame["weight"] > 0)]
    if kept["id"].duplicated().any():
        raise InputDataError(f"manifest {manifest_uri} lists id '{kept['id'][kept['id'].duplicated()].iloc[0]}' twice")
    position = {row_id: i for i, row_id in enumerate(pool.ids)}
    missing = [row_id for row_id in kept["id"] if row_id not in position]
    if missing:
        raise InputDataError(
            f"manifest {manifest_uri} keeps {len(missing)} id(s) the embedded pool lacks (e.g. '{missing[0]}'); "
            "was it made from another run's embeddings? Rerun curate"
        )
    if kept.empty:
        raise InputDataError(f"manifest {manifest_uri} keeps no rows; nothing to train on")
    rows = np.array([position[row_id] for row_id in kept["id"]], dtype=np.int64)
    order = np.argsort(rows, kind="stable")  # pool order: independent of how the manifest is sorted
    rows = rows[order]
    weight = kept["weight"].to_numpy(dtype=np.float64)[order]
    if not np.all(np.isfinite(weight)):
        raise InputDataError(f"manifest {manifest_uri} has non-finite weights")
    return TrainingSet(pool.ids[rows], pool.image[rows], pool.text[rows], weight)
