"""A variant's training data: embedded pool shards joined with their manifest parts, one shard at a time.

The baseline is the whole embedded pool with weight 1. A curated variant keeps the rows its manifest
marks ``keep`` with their ``weight``. Manifests are shard-aligned with the pool (``layout.py``), so
pool shard ``part-NNNNN.parquet`` is joined with manifest part ``part-NNNNN.parquet`` alone: a reader
holds one manifest part (about 30 bytes per row of one shard) and one chunk of pool rows, never the
whole pool or manifest. A manifest part that keeps an id its pool shard lacks is an error (the
manifest belongs to another run).

The ``open_clip`` target reads the same pairs' raw pixels and captions instead of their embeddings
(:mod:`influencespace.train.pixels`, joined with :func:`match_kept` as here); :func:`variant_rows` and
:func:`variant_dataset` take the target's reader.

On Ray the pairs become a Ray Data dataset (:func:`variant_dataset`) that Ray Train splits between its
workers (``get_dataset_shard``); the local runner reads the same pairs with the same function in
order. Either way each input file is read once per epoch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from influencespace import layout, storage
from influencespace.errors import InputDataError

POOL_COLUMNS = ["id", "image_embedding", "text_embedding"]
CHUNK_ROWS = 8192  # pool rows per chunk read from a shard (a few MiB at d = 512)


@dataclass(frozen=True)
class VariantData:
    """What a worker needs to stream one variant (plain data, small: URIs and counts, no rows)."""

    pairs: tuple[tuple[str, str], ...]  # (pool shard, manifest part); "" for the baseline (weight 1)
    rows: int  # rows with keep and weight > 0
    weight_sum: float  # Σ weight over those rows
    raw: tuple[str, ...] = ()  # the open_clip target: each pool shard's raw shard (embed plan JSON); heads: none


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


def pool_shards(pool_uri: str) -> list[str]:
    shards = storage.parquet_files(pool_uri)
    if not shards:
        raise InputDataError(f"the embedded pool at {pool_uri} has no Parquet shards; nothing to train on")
    return shards


def embedding_dims(pool_uri: str) -> tuple[int, int]:
    """(image, text) embedding widths from the pool's schema (one footer read)."""
    import pyarrow as pa

    schema = storage.schema(pool_uri)
    dims = []
    for name in ("image_embedding", "text_embedding"):
        if name not in schema.names:
            raise InputDataError(f"the embedded pool at {pool_uri} has no '{name}' column; rerun the embed stage")
        kind = schema.field(name).type
        if not pa.types.is_fixed_size_list(kind):
            first = storage.read_table(pool_shards(pool_uri)[0], columns=[name]).column(name)
            dims.append(fixed_size_matrix(first.slice(0, 1)).shape[1])
        else:
            dims.append(kind.list_size)
    return dims[0], dims[1]


def plan_variant(pool_uri: str, manifest_uri: str | None, rows: int, weight_sum: float,
                 shards: Sequence[str] | None = None, raw: Sequence[str] = ()) -> VariantData:
    """The shard pairs of one variant (O(number of shards) on the driver; no data read).

    ``shards`` (the pool's shard list) may be passed when planning several variants of one pool, so
    that the pool is listed once; ``raw`` (one per shard) when the target trains from the raw pairs.
    """
    shards = pool_shards(pool_uri) if shards is None else shards
    pairs = tuple((shard, layout.manifest_part(manifest_uri, shard) if manifest_uri else "") for shard in shards)
    if raw and len(raw) != len(pairs):
        raise ValueError(f"{len(raw)} raw shards for {len(pairs)} pool shards")
    if manifest_uri:
        missing = [m for _, m in pairs if not storage.is_file(m)]
        if missing:
            raise InputDataError(
                f"manifest {manifest_uri} has no part for {len(missing)} pool shard(s) (e.g. {missing[0]}); it was "
                "written before manifests were shard-aligned, or for another run: rerun curate"
            )
    if rows <= 0 or not weight_sum > 0:
        where = f"manifest {manifest_uri}" if manifest_uri else f"the embedded pool at {pool_uri}"
        raise InputDataError(f"{where} keeps no rows with a positive weight; nothing to train on")
    return VariantData(pairs, int(rows), float(weight_sum), tuple(raw))


def kept_rows(manifest_part: str):
    """(ids, weights) a manifest part keeps (keep and weight > 0), checked."""
    import pyarrow.compute as pc

    table = storage.read_table(manifest_part, columns=["id", "keep", "weight"])
    table = table.filter((pc.field("keep")) & (pc.field("weight") > 0.0))
    ids = table.column("id").combine_chunks()
    if pc.count_distinct(ids).as_py() != len(ids):
        counts = pc.value_counts(ids)
        twice = counts.filter(pc.greater(counts.field("counts"), 1))[0]["values"].as_py()
        raise InputDataError(f"manifest part {manifest_part} lists id '{twice}' twice")
    weight = table.column("weight").to_numpy().astype(np.float64)
    if not np.all(np.isfinite(weight)):
        raise InputDataError(f"manifest part {manifest_part} has non-finite weights")
    return ids, weight


def match_kept(ids, kept_ids) -> tuple[np.ndarray, np.ndarray]:
    """(position in ``kept_ids`` or -1, found) for each of ``ids`` (Arrow arrays; a hash lookup, no loop)."""
    import pyarrow.compute as pc

    position = pc.index_in(ids, value_set=kept_ids)
    found = np.asarray(pc.is_valid(position).to_numpy(zero_copy_only=False), dtype=bool)
    return np.asarray(pc.fill_null(position, -1).to_numpy(zero_copy_only=False), dtype=np.int64), found


def read_pair(pool_shard: str, manifest_part: str, chunk_rows: int = CHUNK_ROWS) -> Iterator[dict[str, np.ndarray]]:
    """The rows of one pool shard its manifest part keeps, chunk by chunk, in pool order.

    Yields ``{"id", "image", "text", "weight"}`` numpy arrays. Memory: the manifest part's kept ids and
    weights plus one chunk of ``chunk_rows`` pool rows.
    """
    import pyarrow.parquet as pq

    kept_ids, kept_weight = kept_rows(manifest_part) if manifest_part else (None, None)
    if kept_ids is not None and len(kept_ids) == 0:
        return
    counted = [0]
    fs, path = storage.resolve(pool_shard)
    try:
        with fs.open_input_file(path) as source:
            yield from _join_chunks(pq.ParquetFile(source).iter_batches(batch_size=chunk_rows, columns=POOL_COLUMNS),
                                    kept_ids, kept_weight, counted)
    except OSError as exc:
        raise InputDataError(f"could not read pool shard {pool_shard}: {exc}") from exc
    if kept_ids is not None and counted[0] != len(kept_ids):
        raise InputDataError(
            f"manifest part {manifest_part} keeps {len(kept_ids) - counted[0]} id(s) that pool shard {pool_shard} lacks; "
            "was it made from another run's embeddings? Rerun curate"
        )


def _join_chunks(batches, kept_ids, kept_weight, counted: list[int]) -> Iterator[dict[str, np.ndarray]]:
    """Pool chunks restricted to the kept ids, with their weights (``counted[0]``: kept rows matched)."""
    for batch in batches:
        if kept_ids is None:
            weight = np.ones(batch.num_rows)
        else:
            position, found = match_kept(batch.column("id"), kept_ids)
            batch = batch.filter(found)
            weight = kept_weight[position[found]]
            counted[0] += batch.num_rows
        if batch.num_rows == 0:
            continue
        yield {
            "id": np.asarray(batch.column("id").to_pylist(), dtype=object),
            "image": fixed_size_matrix(batch.column("image_embedding")),
            "text": fixed_size_matrix(batch.column("text_embedding")),
            "weight": weight,
        }


def read_pairs(pairs: Sequence[tuple[str, str]], chunk_rows: int = CHUNK_ROWS) -> Iterator[dict[str, np.ndarray]]:
    """Every pair's kept embeddings in order (one pair open at a time)."""
    for pool_shard, manifest_part in pairs:
        yield from read_pair(pool_shard, manifest_part, chunk_rows)


def variant_rows(data: VariantData, read) -> Iterator[dict[str, np.ndarray]]:
    """Every pair's kept rows in pool order, read by the target's ``read(pool shard, manifest part, raw
    shard)`` (what the local runner streams, as a one-worker Ray Train run reads them; one pair open at a time)."""
    raw = data.raw or ("",) * len(data.pairs)
    for (pool_shard, manifest_part), raw_shard in zip(data.pairs, raw, strict=True):
        yield from read(pool_shard, manifest_part, raw_shard)


def _read_pair_batch(batch: dict[str, np.ndarray], read) -> Iterator[dict[str, np.ndarray]]:
    """Ray Data UDF: one row per pair in, that pair's kept rows out (chunk by chunk)."""
    for pool_shard, manifest_part, raw_shard in zip(batch["pool"], batch["manifest"], batch["raw"], strict=True):
        yield from read(str(pool_shard), str(manifest_part), str(raw_shard))


def variant_dataset(data: VariantData, read, num_cpus: float = 0.0, concurrency: int = 2):
    """A Ray Data dataset of one variant's kept rows: one read task per shard pair, in pool order.

    ``read``: the target's reader (``targets.*.read``; a plain function of the three strings). With
    Ray Data's ``preserve_order`` (set by the train stage for Ray Train's split) the rows arrive
    in pair order, so a one-worker run sees exactly what the local runner reads. The read tasks ask for
    no CPU (``num_cpus=0``; at most ``concurrency`` at a time): Ray Train's workers hold the CPUs they
    reserved, and a read task that waited for one of them would wait for ever on a cluster the
    workers fill. Reading a shard of embeddings is I/O and Arrow decoding, light beside a training
    step; decoding pixels for the open_clip target is heavier, and a node with spare CPUs runs up to
    ``concurrency`` of them at once.
    """
    import ray.data

    raw = data.raw or ("",) * len(data.pairs)
    items = [{"pool": p, "manifest": m, "raw": r} for (p, m), r in zip(data.pairs, raw, strict=True)]
    return ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        _read_pair_batch, fn_kwargs={"read": read}, batch_size=1, batch_format="numpy", num_cpus=num_cpus,
        compute=ray.data.TaskPoolStrategy(size=concurrency),  # Ray ≥ 2.51: ``concurrency=`` is deprecated
    )
