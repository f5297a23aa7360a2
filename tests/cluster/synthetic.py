"""Synthetic embeddings and a fake embed-stage output (the embed stage itself is not needed here)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from influencespace import storage


def gaussian_blobs(n: int, dim: int, centres: int, seed: int = 0, spread: float = 4.0) -> np.ndarray:
    """``n`` rows around ``centres`` random centres (unit-variance noise), float32."""
    rng = np.random.default_rng(seed)
    means = rng.standard_normal((centres, dim)) * spread
    return (means[rng.integers(centres, size=n)] + rng.standard_normal((n, dim))).astype(np.float32)


def write_embed_output(
    directory: str, x: np.ndarray, shard_rows: int, dtype: str = "float16", ids: list[str] | None = None
) -> dict:
    """Write ``x`` as the embed stage's ``pool`` (``id``, ``embedding`` fixed-size list) and return the
    upstream manifest a finished embed stage would have recorded."""
    ids = ids if ids is not None else [f"row-{i:06d}" for i in range(len(x))]
    values = np.asarray(x, dtype=dtype)
    for shard, start in enumerate(range(0, len(x), shard_rows)):
        block = values[start : start + shard_rows]
        embedding = pa.FixedSizeListArray.from_arrays(pa.array(block.ravel()), block.shape[1])
        table = pa.table({"id": ids[start : start + shard_rows], "embedding": embedding})
        storage.write_table(table, storage.join(directory, "pool", f"part-{shard:05d}.parquet"))
    return {"fingerprint": f"embed-{len(x)}-{x.shape[1]}", "stage_dir": directory, "outputs": {"pool": "pool"}}
