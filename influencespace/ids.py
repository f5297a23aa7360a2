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
# Repeated ids, found at any N: the ids' 64-bit hashes split into buckets (files), each bucket checked
# alone; a hash seen twice is then resolved to its ids by reading the few sources it is in again.

ID_BUCKET_ROWS = 4_000_000  # ids a bucket task holds (12 bytes each: hash and source, ≈ 48 MB)
REPEATS_SHOWN = 10
_CANDIDATES = 4 * REPEATS_SHOWN  # repeated hashes kept per bucket: room for the rare collision of distinct ids


def _present(ids) -> np.ndarray:
    return np.asarray([str(v) for v in ids if v is not None], dtype=object)


def split_ids(read, work: str, buckets: int, item: tuple[int, str]) -> tuple[int, object]:
    """Read one source's ids (``read(source) -> (ids, extra)``); write their :func:`id_hash` with the
    source's index to ``<work>/bucket-BBBBB/source-IIIIII.parquet``; return (ids written, extra). A
    missing id (None) is left out: it is rejected row by row later."""
    import pyarrow as pa

    from influencespace import storage

    index, source = item
    ids, extra = read(source)
    hashes = id_hash(_present(ids))
    table = pa.table({"hash": pa.array(hashes, pa.uint64()), "source": pa.array(np.full(len(hashes), index, np.int32))})
    storage.write_partitions(table, (hashes % np.uint64(buckets)).astype(np.int64), work, "bucket",
                             f"source-{index:06d}.parquet")
    return len(hashes), extra


def bucket_repeats(work: str, limit: int, bucket: int) -> list[tuple[int, list[int]]]:
    """Up to ``limit`` hashes of one bucket seen more than once, each with the sorted sources it is in."""
    from influencespace import storage

    directory = storage.join(work, f"bucket-{bucket:05d}")
    if not storage.exists(directory) or not storage.parquet_files(directory):
        return []
    table = storage.read_table(directory)
    hashes, sources = table.column("hash").to_numpy(), table.column("source").to_numpy()
    values, counts = np.unique(hashes, return_counts=True)
    repeated = values[counts > 1][:limit]
    if not len(repeated):
        return []
    chosen = np.isin(hashes, repeated)
    return [(int(h), sorted(sources[chosen][hashes[chosen] == h].tolist())) for h in repeated]


def source_ids_with(read, hashes: frozenset[int], item: tuple[int, str]) -> list[tuple[str, int]]:
    """(id, source index) of every id of one source whose hash is one of ``hashes``."""
    index, source = item
    ids = _present(read(source)[0])
    found = np.isin(id_hash(ids), np.fromiter(hashes, np.uint64, len(hashes)))
    return [(str(i), index) for i in ids[found]]


def find_repeated_ids(runtime, sources: list[str], read, work: str, rows: int) -> tuple[list[object], list]:
    """Every source's ids checked for repeats across all of them, in tasks (``runtime.map_tasks``).

    Pass one splits each source's id hashes into ⌈rows / ID_BUCKET_ROWS⌉ bucket files; pass two finds
    the hashes each bucket holds more than once; the sources those are in are read again and their
    ids compared as strings (so two distinct ids that share a hash are not a repeat). No process holds
    more than one source's ids or one bucket's hashes; each source is read once, and once more only if
    it holds a repeated hash. ``read(source)`` returns ``(ids, extra)`` and the extras come back in
    source order (e.g. a tar's sample count, which the same read gives). Returns (extras, up to
    :data:`REPEATS_SHOWN` repeated ids as ``(id, [source index, …])``, sorted); ``work`` is removed.
    """
    import collections
    import functools

    from influencespace import storage
    from influencespace.runtime import map_tasks

    buckets = max(1, -(-rows // ID_BUCKET_ROWS))
    storage.remove_tree(work)
    try:
        split = list(map_tasks(runtime, functools.partial(split_ids, read, work, buckets), list(enumerate(sources))))
        candidates = [c for found in map_tasks(runtime, functools.partial(bucket_repeats, work, _CANDIDATES),
                                               range(buckets)) for c in found]
    finally:
        storage.remove_tree(work)
    candidates = sorted(candidates)[:_CANDIDATES]
    holding = sorted({s for _, found in candidates for s in found})
    hashes = frozenset(h for h, _ in candidates)
    where: dict[str, list[int]] = collections.defaultdict(list)
    for found in map_tasks(runtime, functools.partial(source_ids_with, read, hashes), [(i, sources[i]) for i in holding]):
        for value, index in found:
            where[value].append(index)
    repeats = sorted((value, sorted(found)) for value, found in where.items() if len(found) > 1)
    return [extra for _, extra in split], repeats[:REPEATS_SHOWN]
