"""Seeded id hashes and the repeated-id check that runs at any N."""

from __future__ import annotations

import functools

import numpy as np
import pytest

from influencespace import ids
from influencespace.config import RuntimeConfig


def test_id_hash_is_stable_and_salted():
    values = ["a", "b", "sample-000001"]
    assert np.array_equal(ids.id_hash(values, 1), ids.id_hash(list(values), 1))
    assert not np.array_equal(ids.id_hash(values, 1), ids.id_hash(values, 2))
    draws = ids.unit_hash([f"r{i}" for i in range(10_000)], 3)
    assert 0.0 <= draws.min() and draws.max() < 1.0 and abs(draws.mean() - 0.5) < 0.02


def _from_table(tables: dict[str, list], source: str):
    return tables[source], len(tables[source])


@pytest.mark.ray
@pytest.mark.parametrize("runner", ["local", "ray"])
def test_repeated_ids_are_found_across_sources_and_buckets(tmp_path, monkeypatch, runner, request):
    """Five sources hashed into ~8 buckets: every repeat found (within a source and across two), with the
    sources it is in; None ids ignored; each source read once (its extra back in order); scratch removed."""
    if runner == "ray":
        request.getfixturevalue("ray_cluster")
    monkeypatch.setattr(ids, "ID_BUCKET_ROWS", 40)
    tables = {f"s{i}": [f"id-{i}-{j}" for j in range(60)] for i in range(5)}
    tables["s1"][7] = "id-0-3"  # across sources 0 and 1
    tables["s3"][9] = tables["s3"][10]  # twice within source 3
    tables["s4"][0] = None
    read = functools.partial(_from_table, tables)
    work = str(tmp_path / "work")
    extras, repeats = ids.find_repeated_ids(RuntimeConfig(runner=runner), list(tables), read, work, 300)
    assert extras == [60] * 5
    assert repeats == [("id-0-3", [0, 1]), ("id-3-10", [3, 3])]
    assert not (tmp_path / "work").exists()
    clean = {f"s{i}": [f"u-{i}-{j}" for j in range(50)] for i in range(3)}
    assert ids.find_repeated_ids(RuntimeConfig(runner=runner), list(clean), functools.partial(_from_table, clean),
                                 work, 150)[1] == []
