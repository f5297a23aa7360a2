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
