import numpy as np
import pytest

from influencespace.curate import select
from influencespace.curate.select import Cut, Key


def _shards(n_shards=5, rows=400, seed=0, ties=False):
    rng = np.random.default_rng(seed)
    out = []
    for s in range(n_shards):
        tier = rng.integers(0, 4, rows).astype(np.uint64)
        value = rng.normal(size=rows)
        if ties:  # few distinct values: the order is decided by the hash, and equal hashes by the id
            value = np.round(value)
            hashes = rng.integers(0, 3, rows).astype(np.uint64)
        else:
            hashes = rng.integers(0, 2**63, rows, dtype=np.uint64)
        value[rng.random(rows) < 0.05] = np.nan
        out.append((Key([tier, select.sortable(value), hashes], [16, 64, 64]), np.array([f"s{s}-{i:04d}" for i in range(rows)], dtype=object)))
    return out


def _select(shards, ranks, limit):
    def count(prefixes):  # as the stage does: each shard sends its filled bins, the driver adds them
        total = np.zeros((len(prefixes), select.DIGITS), dtype=np.int64)
        for key, _ in shards:
            select.add_sparse(total, select.sparse_histogram(select.shard_histogram(key, prefixes)))
        return total

    def collect(prefixes):
        parts = [select.shard_collect(key, ids, prefixes) for key, ids in shards]
        return [(np.concatenate([p[i][0] for p in parts]), np.concatenate([p[i][1] for p in parts])) for i in range(len(prefixes))]

    total = sum(len(ids) for _, ids in shards)
    return select.select_ranks(ranks, total, [16, 64, 64], count, collect, collect_limit=limit)


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("limit", [10, 100_000])  # 10 forces every radix round; 100,000 collects at once
def test_radix_selection_equals_sorting_everything(ties, limit):
    shards = _shards(ties=ties)
    words = [np.concatenate([k.words[c] for k, _ in shards]) for c in range(3)]
    ids = np.concatenate([i for _, i in shards])
    order = select.lex_order(*words, ids=ids)
    ranks = [0, 1, 7, 999, 1000, 1999, 2000, 2001]
    cuts = _select(shards, ranks, limit)
    for rank, cut in zip(ranks, cuts, strict=True):
        inside = np.concatenate([cut.inside(key, i) for key, i in shards])
        expected = np.zeros(len(ids), dtype=bool)
        expected[order[:rank]] = True
        np.testing.assert_array_equal(inside, expected, err_msg=f"rank {rank}: {inside.sum()} inside, want {min(rank, len(ids))}")


def test_sortable_keeps_the_float_order():
    x = np.array([-np.inf, -2.5, -1e-300, -0.0, 0.0, 1e-300, 3.0, np.inf, np.nan])
    s = select.sortable(x)
    assert (np.diff(s[:4].astype(object)) > 0).all() and s[3] == s[4] and (np.diff(s[4:].astype(object)) > 0).all()
    assert select.sortable(np.array([np.nan]), nan_last=False)[0] == 0
    for v in x[:-1]:
        assert select.unsortable(int(select.sortable(np.array([v]))[0])) == v


def test_cut_none_and_all():
    key = Key([np.arange(3, dtype=np.uint64)], [64])
    ids = np.array(["a", "b", "c"], dtype=object)
    assert not Cut.none().inside(key, ids).any() and Cut.all().inside(key, ids).all()
    assert Cut((1,), "b").inside(key, ids).tolist() == [True, True, False]


def test_a_sparse_histogram_adds_up_to_the_dense_one_and_is_small():
    shards = _shards()
    prefixes = [[], [1], [7]]
    dense = sum(select.shard_histogram(key, prefixes) for key, _ in shards)
    total = np.zeros_like(dense)
    for key, _ in shards:
        sparse = select.sparse_histogram(select.shard_histogram(key, prefixes))
        assert sum(d.nbytes + c.nbytes for d, c in sparse) <= 6 * 400 * len(prefixes)  # ≤ 6 B a row, not 512 KiB a prefix
        select.add_sparse(total, sparse)
    np.testing.assert_array_equal(total, dense)
    assert dense[0].sum() == 5 * 400
