"""The row pass scores rows through v = Pᵀu: the same terms as the sketch, and P drawn once, not per chunk."""

import numpy as np
import pytest
import torch

from influencespace.influence import DataSpec, RandomProjector, get_task
from influencespace.influence.engine import to_tensors
from influencespace.influence.gradients import GradientSketcher
from influencespace.influence.proxy import get_state
from influencespace.influence.rows import RowScorer, parameter_directions


def contrastive(dim: int, head_dim: int, checkpoints: int, seed: int = 0):
    """The contrastive proxy with ``checkpoints`` distinct parameter states (perturbations of its init)."""
    task = get_task("contrastive")
    gen = torch.Generator().manual_seed(seed)
    spec = DataSpec(dims={"image": dim, "text": dim}, num_classes=None, options={"negatives": 7, "head_dim": head_dim})
    bank = {"image": torch.randn(7, dim, generator=gen), "text": torch.randn(7, dim, generator=gen)}
    model = task.build_model(spec, bank, gen)
    names = task.tracked_parameters(model)
    states = []
    for _ in range(checkpoints):
        state = get_state(model, names)
        states.append({n: v + 0.1 * torch.randn(v.shape, generator=gen) for n, v in state.items()})
    return task, model, states


def rows(n: int, dim: int, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"image": rng.normal(size=(n, dim)), "text": rng.normal(size=(n, dim))}


def test_row_terms_equal_the_sketched_terms_u_dot_p_g(monkeypatch):
    task, model, states = contrastive(dim=6, head_dim=4, checkpoints=2)
    model = model.double()
    projector = RandomProjector(48, 32, seed=3, dtype=torch.float64)
    u = [np.random.default_rng(j).normal(size=(3, 32)) for j in range(2)]  # overall + two groups, per checkpoint
    features = rows(40, 6)
    sketcher = GradientSketcher(task, model, projector, "empirical", chunk_size=8)
    expected = np.zeros((40, 3))
    for state, direction in zip(states, u, strict=True):
        from influencespace.influence.proxy import set_state

        set_state(model, state)
        phi, ok = sketcher.gradient_sketches(to_tensors(features, torch.float64, "cpu"))
        assert ok.all()
        expected += phi.numpy() @ direction.T
    expected /= 2
    scorer = RowScorer(task, model, states, parameter_directions(projector, u), torch.float64, chunk_size=7)
    np.testing.assert_allclose(scorer(features), expected, rtol=1e-10, atol=1e-12)
    features["image"][5, 0] = np.nan
    scored = scorer(features)
    assert np.isnan(scored[5]).all() and np.isfinite(np.delete(scored, 5, axis=0)).all()


@pytest.mark.parametrize("fisher", ["empirical", "ggn"])
def test_a_projector_too_large_to_cache_is_drawn_once_per_budget_of_rows_not_per_chunk(fisher):
    # P uncached: each chunk draws every block afresh, so the sketcher makes its chunks as large as the
    # projector's budget of gradient rows; the sketches are those of the cached matrix (same seed).
    task, model, states = contrastive(dim=6, head_dim=4, checkpoints=1)
    model = model.double()
    p = sum(v.numel() for v in states[0].values())
    features = to_tensors(rows(200, 6), torch.float64, "cpu")
    weights = torch.ones(200, dtype=torch.float64)
    budget_rows = 64 if fisher == "empirical" else 16 * 64  # ggn: 2 × 8 logit rows an example (both ways, 1 + 7 negatives)
    dim = 2 * budget_rows  # P (dim × p) is larger than the budget
    cached = RandomProjector(p, dim, seed=3, block_size=8, dtype=torch.float64)
    uncached = RandomProjector(p, dim, seed=3, block_size=8, dtype=torch.float64, max_cache_bytes=budget_rows * p * 8)
    assert cached.cached and not uncached.cached and uncached.rows_per_pass() == budget_rows
    got = GradientSketcher(task, model, uncached, fisher, chunk_size=8).train_sketches(features, weights)
    want = GradientSketcher(task, model, cached, fisher, chunk_size=8).train_sketches(features, weights)
    np.testing.assert_allclose(got.phi.numpy(), want.phi.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(got.curvature.numpy(), want.curvature.numpy(), rtol=1e-10, atol=1e-12)
    chunks = -(-200 // 64)  # 64 examples a chunk, not chunk_size = 8
    assert uncached.blocks_drawn == chunks * uncached.num_blocks, (uncached.blocks_drawn, uncached.num_blocks)


@pytest.mark.slow  # ≈ 1–2 min on 2 cores: 16,384 rows × 3 checkpoints × 3 directions at 65,536 parameters
def test_at_the_preset_shape_the_projector_is_drawn_once_for_every_checkpoint_and_row(monkeypatch):
    # The cluster preset: 512-d towers, 64-d heads (65,536 tracked parameters), sketch 4096, 3 checkpoints.
    # P (4096 × 65,536 float32 = 1 GiB) is over the projector's cache, so every use of it redraws its blocks.
    task, model, states = contrastive(dim=512, head_dim=64, checkpoints=3)
    projector = RandomProjector(65_536, 4096, seed=0)
    assert projector.num_params == sum(p.numel() for p in model.parameters()) and projector._cache is None
    draws = []
    original = RandomProjector.block
    monkeypatch.setattr(RandomProjector, "block", lambda self, index: draws.append(index) or original(self, index))
    u = [np.random.default_rng(j).normal(size=(3, 4096)) for j in range(3)]
    directions = parameter_directions(projector, u)
    assert sorted(draws) == list(range(projector.num_blocks))  # one construction of P for all three checkpoints
    scorer = RowScorer(task, model, states, directions, torch.float32, chunk_size=256)
    scored = scorer(rows(16_384, 512))
    assert scored.shape == (16_384, 3) and np.isfinite(scored).all()
    assert len(draws) == projector.num_blocks  # scoring the rows drew no block of P
