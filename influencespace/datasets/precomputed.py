"""Bring your own embeddings: start the pipeline at ``cluster`` from vectors the user already has.

Two layouts, local or ``s3://``:

- **Parquet** files with an id column and either the fused embedding (``fused_key``) or an image and
  a text embedding column (``image_key``, ``text_key``); any other column (``group``, ``label``, …)
  passes through.
- **DataComp-style shards**: ``NAME.npz`` holding arrays (e.g. ``b32_img``, ``b32_txt``) beside
  ``NAME.parquet`` holding the row-aligned ids (``uid``) and metadata, as DataComp ships its
  precomputed CLIP features.

Reading and checking live here; turning a shard into the embed stage's output (towers normalised and
fused with f(v, t), the image–text cosine, non-finite rows to ``rejects``) lives in
:mod:`influencespace.embed.precomputed`, beside the embed stage it writes for. Checked, with errors
naming the file:
ids present, unique within a shard and aligned with the arrays (same row count); the image and text
dimensions equal; the dimension the same in every shard; a floating-point dtype. Across shards the
embed stage checks the converted ids in tasks (``influencespace.ids.find_repeated_ids``), so no
process holds every id.

Memory: one input shard at a time (``.npz`` members are read whole, as numpy loads them).
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
