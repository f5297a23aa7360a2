"""Precomputed embeddings (``data.source: embeddings``) become the embed stage's output, shard by shard.

Each input shard (read and checked by :mod:`influencespace.datasets.precomputed`) becomes one output
shard in the embed stage's format (docs/architecture.md): tower embeddings are normalised and fused
with the configured f(v, t), the image–text cosine is kept, and rows with a non-finite value go to
``rejects`` with the reason. Conversion runs as a task per shard (:func:`write_precomputed`, on the
stage's runner); a shard whose outputs exist is not read again. Memory: one input shard per task; the
driver holds a few numbers per shard.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from influencespace import storage
from influencespace.datasets.precomputed import PrecomputedSpec, Shard, list_shards, read_shard
from influencespace.errors import InputDataError


def to_embed_table(shard: Shard, fusion: str, image_weight: float, dtype: str, split: str = "pool") -> tuple[Any, Any]:
    """(rows in the embed stage's format, rejects) for one shard."""
    import pyarrow as pa

    from influencespace.embed.fusion import fuse, image_text_cosine, normalise

    image = normalise(shard.image) if shard.image is not None else None
    text = normalise(shard.text) if shard.text is not None else None
    fused = shard.fused if shard.fused is not None else fuse(image, text, fusion, image_weight)
    finite = np.isfinite(fused).all(axis=1)
    for matrix in (shard.image, shard.text):
        if matrix is not None:
            finite &= np.isfinite(matrix).all(axis=1)
    ids = np.array(shard.ids, dtype=object)
    np_dtype = np.float16 if dtype == "float16" else np.float32

    def column(matrix: np.ndarray) -> pa.Array:
        kept = matrix[finite].astype(np_dtype)
        return pa.FixedSizeListArray.from_arrays(pa.array(kept.ravel()), kept.shape[1])

    columns: dict[str, Any] = {"id": ids[finite].tolist(), "embedding": column(fused)}
    if image is not None and text is not None:
        columns["image_embedding"] = column(image)
        columns["text_embedding"] = column(text)
        columns["image_text_cosine"] = pa.array(image_text_cosine(image, text)[finite], type=pa.float32())
    for name, values in shard.passthrough.items():
        if name not in columns:
            columns[name] = [v for v, ok in zip(values, finite, strict=True) if ok]
    # Typed explicitly: a shard with no rejects would otherwise write null-typed columns, and the rejects
    # directory would no longer read as one table.
    rejects = pa.table({
        "id": pa.array(ids[~finite].tolist(), type=pa.string()),
        "split": pa.array([split] * int((~finite).sum()), type=pa.string()),
        "reason": pa.array([f"non-finite embedding value in {shard.source}"] * int((~finite).sum()), type=pa.string()),
    })
    return pa.table(columns), rejects


def _list_size(schema: Any, name: str) -> int | None:
    return schema.field(name).type.list_size if name in schema.names else None


def convert_shard(spec: PrecomputedSpec, fusion: str, image_weight: float, dtype: str, out_dir: str, split: str,
                  item: tuple[int, str]) -> dict[str, Any]:
    """Convert input shard ``item = (index, uri)`` into ``out_dir/<split>/part-<index>.parquet`` (+ rejects),
    unless both are there already (then only their footers are read); return its counts and dimensions."""
    import pyarrow.parquet as pq

    index, file_uri = item
    out_uri = storage.join(out_dir, split, f"part-{index:05d}.parquet")
    rejects_uri = storage.join(out_dir, "rejects", f"{split}-{index:05d}.parquet")
    if storage.is_file(out_uri) and storage.is_file(rejects_uri):
        metas = [pq.read_metadata(path, filesystem=fs) for fs, path in map(storage.resolve, (out_uri, rejects_uri))]
        embedded, rejected = metas[0].num_rows, metas[1].num_rows
        schema = metas[0].schema.to_arrow_schema()
    else:
        table, rejects = to_embed_table(read_shard(file_uri, spec), fusion, image_weight, dtype, split)
        storage.write_table(rejects, rejects_uri)
        storage.write_table(table, out_uri)  # written last: its presence marks the shard done
        embedded, rejected, schema = table.num_rows, rejects.num_rows, table.schema
    return {"source": file_uri, "outputs": (out_uri, rejects_uri), "input": embedded + rejected,
            "embedded": embedded, "rejected": rejected,
            "dim": _list_size(schema, "embedding"), "tower_dim": _list_size(schema, "image_embedding")}


def write_precomputed(uri: str, spec: PrecomputedSpec, fusion: str, image_weight: float, dtype: str,
                      out_dir: str, split: str = "pool", runtime: Any = None) -> dict[str, Any]:
    """Convert every shard into ``out_dir/<split>/part-NNNNN.parquet`` (+ ``rejects/``), a task per shard on
    ``runtime`` (default: this process); resumable shard by shard: a finished shard is not read again.

    Every shard must give the same dimensions: a shard that differs from the first has its outputs
    removed and is named in the error.
    """
    import functools

    from influencespace.config import RuntimeConfig
    from influencespace.runtime import map_tasks

    convert = functools.partial(convert_shard, spec, fusion, image_weight, dtype, out_dir, split)
    done = list(map_tasks(runtime or RuntimeConfig(runner="local"), convert, list(enumerate(list_shards(uri, spec)))))
    first = done[0]
    for shard in done[1:]:
        if (shard["dim"], shard["tower_dim"]) != (first["dim"], first["tower_dim"]):
            for output in shard["outputs"]:
                storage.remove_tree(output)
            raise InputDataError(
                f"'{shard['source']}': embedding dimension {shard['tower_dim'] or shard['dim']} differs from "
                f"{first['tower_dim'] or first['dim']} in '{first['source']}'; every shard must come from one model"
            )
    counts = {key: sum(shard[key] for shard in done) for key in ("input", "embedded", "rejected")}
    return {"counts": counts, "dim": first["dim"], "tower_dim": first["tower_dim"]}
