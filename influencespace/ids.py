"""Seeded hashes of row ids: per-row randomness that depends on the id alone.

A draw keyed by the id (and a salt such as (seed, epoch)) is the same whichever worker holds the row,
in whatever order the rows arrive and however the pool is split into shards, so no process needs a
global index of the rows to agree on it.
"""

from __future__ import annotations

import numpy as np


def _key(salt: tuple[int, ...]) -> str:
    """A 16-character SipHash key (what ``pandas.util.hash_array`` takes) from integer salts."""
    digest = 0
    for value in salt:  # FNV-1a over the salts' 64-bit values: distinct salts, distinct keys
        for byte in int(value).to_bytes(8, "little", signed=True):
            digest = ((digest ^ byte) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return f"{digest:016x}"


def id_hash(ids, *salt: int) -> np.ndarray:
    """A uint64 SipHash-2-4 of each id (as text) keyed by ``salt``; stable across processes and machines."""
    import pandas as pd

    values = pd.Series(np.asarray(ids, dtype=object)).astype(str).to_numpy(dtype=object)
    return pd.util.hash_array(values, hash_key=_key(salt), categorize=False)


def unit_hash(ids, *salt: int) -> np.ndarray:
    """A uniform draw in [0, 1) per id from :func:`id_hash` (its top 53 bits, the float64 mantissa)."""
    return (id_hash(ids, *salt) >> np.uint64(11)).astype(np.float64) * 2.0**-53


# --------------------------------------------------------------------------------------------------
# Repeated ids, found at any N: ids hashed into buckets (files), each bucket checked alone.

ID_BUCKET_ROWS = 4_000_000  # ids a bucket task holds (≈ 100 bytes each with its source: ≈ 400 MB)
REPEATS_SHOWN = 10


def split_ids(read, work: str, buckets: int, item: tuple[int, str]) -> tuple[int, object]:
    """Read one source's ids (``read(source) -> (ids, extra)``); write them, with the source's index, to
    ``<work>/bucket-BBBBB/source-IIIIII.parquet`` by :func:`id_hash`; return (ids written, extra). A
    missing id (None) is left out: it is rejected row by row later."""
    import pyarrow as pa

    from influencespace import storage

    index, source = item
    ids, extra = read(source)
    values = np.asarray([str(v) for v in ids if v is not None], dtype=object)
    bucket = id_hash(values) % np.uint64(buckets) if len(values) else np.zeros(0, np.uint64)
    for b in np.unique(bucket):
        chosen = values[bucket == b]
        storage.write_table(pa.table({"id": pa.array(chosen.tolist(), pa.string()),
                                      "source": pa.array(np.full(len(chosen), index, np.int32))}),
                            storage.join(work, f"bucket-{int(b):05d}", f"source-{index:06d}.parquet"))
    return len(values), extra


def bucket_repeats(work: str, limit: int, bucket: int) -> list[tuple[str, list[int]]]:
    """Up to ``limit`` ids of one bucket that occur more than once, each with the sorted sources it is in."""
    import pyarrow.compute as pc

    from influencespace import storage

    directory = storage.join(work, f"bucket-{bucket:05d}")
    if not storage.exists(directory) or not storage.parquet_files(directory):
        return []
    table = storage.read_table(directory)
    # Counting first and grouping only the repeated ids: a hash of counts, not a list per id (a bucket
    # holds up to ID_BUCKET_ROWS ids; almost none repeat).
    counts = pc.value_counts(table.column("id"))
    repeated = counts.filter(pc.greater(counts.field("counts"), 1)).field("values")
    if not len(repeated):
        return []
    rows = table.filter(pc.is_in(table.column("id"), value_set=repeated))
    grouped = rows.group_by("id").aggregate([("source", "list")])
    return sorted((i, sorted(s)) for i, s in zip(grouped["id"].to_pylist(), grouped["source_list"].to_pylist(),
                                                 strict=True))[:limit]


def find_repeated_ids(runtime, sources: list[str], read, work: str, rows: int) -> tuple[list[object], list]:
    """Every source's ids checked for repeats across all of them, in tasks (``runtime.map_tasks``).

    Pass one splits each source's ids by hash into ⌈rows / ID_BUCKET_ROWS⌉ bucket files; pass two
    groups each bucket by id. No process holds more than one source's or one bucket's ids, and
    each source is read once: ``read(source)`` returns ``(ids, extra)`` and the extras come back in
    source order (e.g. a tar's sample count, which the same read gives). Returns (extras, up to
    :data:`REPEATS_SHOWN` repeated ids as ``(id, [source index, …])``, sorted); ``work`` is removed.
    """
    import functools

    from influencespace import storage
    from influencespace.runtime import map_tasks

    buckets = max(1, -(-rows // ID_BUCKET_ROWS))
    storage.remove_tree(work)
    try:
        split = list(map_tasks(runtime, functools.partial(split_ids, read, work, buckets), list(enumerate(sources))))
        repeats = [r for found in map_tasks(runtime, functools.partial(bucket_repeats, work, REPEATS_SHOWN),
                                            range(buckets)) for r in found]
    finally:
        storage.remove_tree(work)
    return [extra for _, extra in split], sorted(repeats)[:REPEATS_SHOWN]
