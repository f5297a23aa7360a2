import numpy as np
import pytest
import torch

from influencespace.influence import InfluenceError, RandomProjector


def full_matrix(proj: RandomProjector) -> torch.Tensor:
    return torch.cat([proj.block(b) for b in range(proj.num_blocks)], dim=1)


@pytest.mark.parametrize("kind", ["gaussian", "sparse"])
def test_same_seed_same_matrix_whatever_the_block_order_or_cache(kind):
    cached = RandomProjector(1000, 16, seed=7, kind=kind, block_size=128)
    uncached = RandomProjector(1000, 16, seed=7, kind=kind, block_size=128, max_cache_bytes=0)
    backwards = [uncached.block(b) for b in reversed(range(uncached.num_blocks))][::-1]
    assert torch.equal(full_matrix(cached), torch.cat(backwards, dim=1))
    assert cached.fingerprint() == uncached.fingerprint()


@pytest.mark.parametrize("kind", ["gaussian", "sparse"])
def test_different_seed_different_matrix(kind):
    a = RandomProjector(500, 8, seed=0, kind=kind, block_size=100)
    b = RandomProjector(500, 8, seed=1, kind=kind, block_size=100)
    assert not torch.equal(full_matrix(a), full_matrix(b))
    assert a.fingerprint() != b.fingerprint()


def test_dtype_does_not_change_the_matrix():
    p32 = RandomProjector(300, 8, seed=3, dtype=torch.float32, block_size=64)
    p64 = RandomProjector(300, 8, seed=3, dtype=torch.float64, block_size=64)
    assert torch.allclose(full_matrix(p32).double(), full_matrix(p64), atol=1e-7)


def test_project_is_blockwise_matrix_product_and_gram_matches():
    proj = RandomProjector(333, 12, seed=2, block_size=50, dtype=torch.float64)
    grads = torch.randn(5, 333, dtype=torch.float64)
    p = full_matrix(proj)
    assert torch.allclose(proj.project(grads), grads @ p.T, atol=1e-12)
    assert torch.allclose(proj.gram(), p @ p.T, atol=1e-12)


@pytest.mark.parametrize("kind, zero_share", [("gaussian", 0.0), ("sparse", 2 / 3)])
def test_entries_have_variance_one_over_k(kind, zero_share):
    k = 64
    p = full_matrix(RandomProjector(4000, k, seed=0, kind=kind, block_size=1000, dtype=torch.float64)).numpy()
    assert abs(p.var() * k - 1) < 0.02
    assert abs((p == 0).mean() - zero_share) < 0.01


def test_wrong_width_is_a_clear_error():
    with pytest.raises(InfluenceError, match="does not match"):
        RandomProjector(10, 4, seed=0).project(torch.zeros(2, 11))
    with pytest.raises(InfluenceError, match="unknown projector"):
        RandomProjector(10, 4, seed=0, kind="srht")


def test_large_matrix_is_not_cached():
    proj = RandomProjector(10_000, 64, seed=0, block_size=1000, max_cache_bytes=64 * 1000 * 4)
    assert proj._cache is None
    assert np.isfinite(proj.project(torch.ones(1, 10_000)).numpy()).all()
