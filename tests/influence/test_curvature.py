import numpy as np
import pytest

from influencespace.influence import InfluenceError, fit_curvature


def random_psd(k: int, rank: int, seed: int = 0) -> np.ndarray:
    a = np.random.default_rng(seed).normal(size=(k, rank))
    return a @ a.T / rank


def test_full_rank_inverse_is_exact():
    h = random_psd(12, 30)
    curv = fit_curvature(h, rank=12, damping=0.1)
    x = np.random.default_rng(1).normal(size=(12, 3))
    expected = np.linalg.solve(h + curv.damping * np.eye(12), x)
    assert np.allclose(curv.inverse_apply(x), expected, rtol=1e-10)
    assert curv.damping == pytest.approx(0.1 * np.linalg.eigvalsh(h).mean())


def test_truncated_inverse_matches_the_complement_formula():
    h = random_psd(10, 4) + 1e-3 * np.eye(10)  # six eigenvalues of 1e-3, below λ: rank 4 may drop them
    curv = fit_curvature(h, rank=4, damping=0.05)
    v, s, lam = curv.eigenvectors, curv.eigenvalues[:4], curv.damping
    formula = (np.eye(10) - v @ np.diag(s / (s + lam)) @ v.T) / lam
    direct = np.linalg.inv(v @ np.diag(s) @ v.T + lam * np.eye(10))
    x = np.random.default_rng(2).normal(size=10)
    assert np.allclose(formula, direct, rtol=1e-10)
    assert np.allclose(curv.inverse_apply(x), formula @ x, rtol=1e-10)
    assert curv.eigenvalues.shape == (10,) and curv.eigenvectors.shape == (10, 4)
    assert 0 < curv.metadata()["kept_mass"] < 1
    assert curv.rank_configured == 4 and 0 < curv.discarded_over_damping <= 1


def test_rank_never_drops_an_eigenvalue_above_the_damping():
    """The truncation rule: a configured rank that would drop eigenvalues above λ is raised to keep them."""
    h = random_psd(10, 10)
    s = np.sort(np.linalg.eigvalsh(h))[::-1]
    curv = fit_curvature(h, rank=2, damping=0.05)
    above = int((s > curv.damping).sum())
    assert above > 2, "the spectrum must make rank 2 violate the rule, or the test checks nothing"
    assert curv.rank == above and curv.rank_configured == 2
    assert curv.discarded_over_damping <= 1.0 and curv.metadata()["discarded_over_damping"] == curv.discarded_over_damping
    everything = fit_curvature(h, rank=None, damping=0.05)
    assert everything.rank == 10 == everything.rank_configured and everything.discarded_over_damping == 0.0
    x = np.ones(10)
    assert np.allclose(everything.inverse_apply(x), np.linalg.solve(h + everything.damping * np.eye(10), x), rtol=1e-10)


def test_zero_curvature_uses_the_floor():
    curv = fit_curvature(np.zeros((5, 5)), rank=3, damping=0.1, damping_floor=1e-6)
    assert curv.damping == 1e-6 and curv.floor_applied
    assert np.allclose(curv.inverse_apply(np.ones(5)), 1e6)


def test_ill_conditioned_curvature_stays_finite():
    h = np.diag([1e8, 1.0, 1e-12, 0.0])
    x = np.ones(4)
    out = fit_curvature(h, rank=4, damping=1e-3).inverse_apply(x)
    assert np.isfinite(out).all()


def test_non_finite_curvature_says_what_to_change():
    h = np.eye(3)
    h[0, 1] = np.nan
    with pytest.raises(InfluenceError, match="float64"):
        fit_curvature(h, rank=2, damping=0.1)


def test_eigendecomposition_failure_is_a_clear_error(monkeypatch):
    def fail(_):
        raise np.linalg.LinAlgError("Eigenvalues did not converge")

    monkeypatch.setattr(np.linalg, "eigh", fail)
    with pytest.raises(InfluenceError, match="raise influence.damping, or lower influence.projection_dim"):
        fit_curvature(np.eye(3), rank=2, damping=0.1)
