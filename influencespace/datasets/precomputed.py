"""Bring your own embeddings: start the pipeline at ``cluster`` from vectors the user already has.

Two layouts, local or ``s3://``:

- **Parquet** files with an id column and either the fused embedding (``fused_key``) or an image and
  a text embedding column (``image_key``, ``text_key``); any other column (``group``, ``label``, …)
  passes through.
- **DataComp-style shards**: ``NAME.npz`` holding arrays (e.g. ``b32_img``, ``b32_txt``) beside
  ``NAME.parquet`` holding the row-aligned ids (``uid``) and metadata, as DataComp ships its
  precomputed CLIP features.

Each input shard becomes one output shard in the embed stage's format (docs/architecture.md): tower
embeddings are normalised and fused with the configured f(v, t), the image–text cosine is kept, and
rows with a non-finite value go to ``rejects`` with the reason. Checked, with errors naming the file:
ids present, unique within a shard and aligned with the arrays (same row count); the image and text
dimensions equal; the dimension the same in every shard; a floating-point dtype. Across shards the
embed stage checks the converted ids in tasks (``influencespace.ids.find_repeated_ids``), so no
process holds every id.

Conversion runs as a task per shard (:func:`write_precomputed`, on the stage's runner); a shard whose
outputs exist is not read again. Memory: one input shard per task (``.npz`` members are read whole, as
numpy loads them); the driver holds a few numbers per shard.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from influencespace import storage
from influencespace.errors import InputDataError

FLOAT_KINDS = "f"


@dataclass(frozen=True)
class PrecomputedSpec:
    format: str  # "parquet" | "npz"
    id_column: str = "id"
    image_key: str = "image_embedding"
    text_key: str = "text_embedding"
    fused_key: str | None = None

    @classmethod
    def from_config(cls, data: Any) -> PrecomputedSpec:
        return cls(data.embeddings_format, data.id_column, data.image_key, data.text_key, data.fused_key)


@dataclass
class Shard:
    source: str
    ids: list[str]
    image: np.ndarray | None
    text: np.ndarray | None
    fused: np.ndarray | None
    passthrough: dict[str, list]


def list_shards(uri: str, spec: PrecomputedSpec) -> list[str]:
    suffix = ".npz" if spec.format == "npz" else ".parquet"
    files = [uri] if uri.endswith(suffix) else storage.list_files(uri, suffix, recursive=True)
    if not files:
        raise InputDataError(f"no {suffix} files at '{uri}' (data.embeddings_format is '{spec.format}')")
    return files


def _matrix(values: Any, source: str, key: str) -> np.ndarray:
    array = np.asarray(values)
    if array.dtype == object:  # a list column of Python lists
        try:
            array = np.stack([np.asarray(v) for v in values])
        except ValueError:
            raise InputDataError(f"'{source}': column '{key}' holds vectors of different lengths") from None
    if array.ndim != 2:
        raise InputDataError(f"'{source}': '{key}' must be a [rows, dim] array, got shape {array.shape}")
    if array.dtype.kind not in FLOAT_KINDS:
        raise InputDataError(f"'{source}': '{key}' has dtype {array.dtype}; embeddings must be float16, float32 or float64")
    return array.astype(np.float32)


def _read_parquet_shard(uri: str, spec: PrecomputedSpec) -> Shard:
    table = storage.read_table(uri)
    names = table.column_names
    if spec.id_column not in names:
        raise InputDataError(f"'{uri}' has no id column '{spec.id_column}' (data.id_column); it has: {', '.join(names)}")
    vector_keys = [spec.fused_key] if spec.fused_key else [spec.image_key, spec.text_key]
    if spec.fused_key and spec.image_key in names and spec.text_key in names:
        vector_keys = [spec.fused_key, spec.image_key, spec.text_key]
    missing = [k for k in vector_keys if k not in names]
    if missing:
        raise InputDataError(
            f"'{uri}' lacks embedding column(s) {', '.join(missing)} (data.image_key / data.text_key / data.fused_key); "
            f"it has: {', '.join(names)}"
        )
    vectors = {k: _matrix(table.column(k).to_numpy(zero_copy_only=False), uri, k) for k in vector_keys}
    passthrough = {c: table.column(c).to_pylist() for c in names if c not in vector_keys and c != spec.id_column}
    return Shard(
        source=uri,
        ids=[str(i) for i in table.column(spec.id_column).to_pylist()],
        image=vectors.get(spec.image_key),
        text=vectors.get(spec.text_key),
        fused=vectors.get(spec.fused_key) if spec.fused_key else None,
        passthrough=passthrough,
    )


def _read_npz_shard(uri: str, spec: PrecomputedSpec) -> Shard:
    ids_uri = uri[: -len(".npz")] + ".parquet"
    if not storage.is_file(ids_uri):
        raise InputDataError(f"'{uri}' has no id file beside it: expected '{ids_uri}' with column '{spec.id_column}'")
    try:
        arrays = np.load(io.BytesIO(storage.read_bytes(uri)), allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise InputDataError(f"'{uri}' is not a readable .npz file: {exc}") from None
    keys = [spec.fused_key] if spec.fused_key else [spec.image_key, spec.text_key]
    missing = [k for k in keys if k not in arrays.files]
    if missing:
        raise InputDataError(f"'{uri}' lacks array(s) {', '.join(missing)}; it holds: {', '.join(arrays.files)}")
    meta = _read_parquet_ids(ids_uri, spec)
    vectors = {k: _matrix(arrays[k], uri, k) for k in keys}
    return Shard(
        source=uri,
        ids=meta.pop(spec.id_column),
        image=vectors.get(spec.image_key),
        text=vectors.get(spec.text_key),
        fused=vectors.get(spec.fused_key) if spec.fused_key else None,
        passthrough=meta,
    )


def _read_parquet_ids(uri: str, spec: PrecomputedSpec) -> dict[str, list]:
    table = storage.read_table(uri)
    if spec.id_column not in table.column_names:
        raise InputDataError(f"'{uri}' has no id column '{spec.id_column}'; it has: {', '.join(table.column_names)}")
    keep = [c for c in table.column_names if c in (spec.id_column, "group", "label", "text")]
    out = {c: table.column(c).to_pylist() for c in keep}
    out[spec.id_column] = [str(i) for i in out[spec.id_column]]
    return out


def read_shard(file_uri: str, spec: PrecomputedSpec) -> Shard:
    """One input shard, read and checked on its own (ids present, unique and aligned; towers agree)."""
    shard = _read_npz_shard(file_uri, spec) if spec.format == "npz" else _read_parquet_shard(file_uri, spec)
    rows = len(shard.ids)
    for name, matrix in (("image", shard.image), ("text", shard.text), ("fused", shard.fused)):
        if matrix is not None and len(matrix) != rows:
            raise InputDataError(f"'{file_uri}': {rows} ids but {len(matrix)} {name} embeddings; ids and arrays must align")
    if shard.image is not None and shard.text is not None and shard.image.shape[1] != shard.text.shape[1]:
        raise InputDataError(
            f"'{file_uri}': image embeddings have dimension {shard.image.shape[1]} but text embeddings {shard.text.shape[1]}; "
            "fusion needs both in one space"
        )
    if len(set(shard.ids)) != rows:
        raise InputDataError(f"'{file_uri}': ids are not unique")
    return shard


def read_shards(uri: str, spec: PrecomputedSpec) -> Iterator[Shard]:
    """Yield validated shards one at a time (the dimension the same in every one)."""
    dim: int | None = None
    for file_uri in list_shards(uri, spec):
        shard = read_shard(file_uri, spec)
        shard_dim = (shard.fused if shard.fused is not None else shard.image).shape[1]
        if dim is not None and shard_dim != dim:
            raise InputDataError(f"'{file_uri}': embedding dimension {shard_dim} differs from {dim} in earlier shards")
        dim = shard_dim
        yield shard


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
