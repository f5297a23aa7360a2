"""Sketched influence against exact influence computed with the full p × p Hessian (float64)."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from torch.func import functional_call, grad, hessian, jacrev, vmap

from influencespace.influence import DataSpec, Shard, compute_influence, get_task, sample_clusters
from influencespace.influence.engine import to_tensors
from influencespace.influence.proxy import get_state, retrain, set_state, warm_start

from .synthetic import make_data

WD = 1e-2


def settings(k: int, damping: float, **overrides) -> SimpleNamespace:
    base = dict(
        dtype="float64", projection_dim=k, seed=0, projection="gaussian", fisher="ggn", batch_size=64, rank=k,
        damping=damping, damping_floor=1e-300, weight_decay=WD, confidence=0.95, projector_cache_mib=256,
    )
    return SimpleNamespace(**{**base, **overrides})


def setup(task_name: str, dim: int, classes: int, clusters: int, n: int, options=None, converge: bool = True):
    """A proxy on synthetic data (converged by L-BFGS, or 30 Adam steps), and every example of every cluster.

    The contrastive heads are normalised, so their loss is scale-invariant and L2 shrinks them without
    end: no finite optimum to converge to. Exactness of the sketch does not need one.
    """
    data = make_data(n=n, n_val=80, dim=dim, classes=classes, clusters=clusters, harmful=(1, 4), seed=1)
    task = get_task(task_name)
    features = {"embedding": "embedding", "label": "label", "image": "image_embedding", "text": "text_embedding"}
    pool = {f: data.pool[features[f]] for f in task.features}
    val = {f: data.validation[features[f]] for f in task.features}
    bank = {}
    if task.bank_size(DataSpec({}, options=options or {})):
        b = task.bank_size(DataSpec({}, options=options))
        bank = {"image": torch.tensor(data.validation["image_embedding"][:b]), "text": torch.tensor(data.validation["text_embedding"][-b:])}
    dims = {f: pool[f].shape[1] for f in pool if f != "label"}
    model = task.build_model(DataSpec(dims, classes, options or {}), bank, torch.Generator().manual_seed(0)).double()
    names = task.tracked_parameters(model)
    tensors = to_tensors(pool, torch.float64, "cpu")
    if converge:
        state = retrain(task, model, tensors, torch.ones(n, dtype=torch.float64), WD, get_state(model, names))
    else:
        state = warm_start(task, model, tensors, steps=30, batch_size=32, lr=0.05, weight_decay=WD, seed=0)[-1]
    set_state(model, state)
    plan = sample_clusters(data.pool["id"], data.cluster, None, m=n, seed=0)  # every example: no sampling error
    shard = Shard(
        {f: v[plan.rows] for f, v in pool.items()}, plan.cluster, plan.stratum, plan.stratum_size, plan.weight,
        val, np.full(len(data.validation["id"]), -1),
    )
    return SimpleNamespace(task=task, model=model, state=state, names=names, pool=pool, val=val, plan=plan, shard=shard, data=data)


def flat_fn(env, per_example):
    """θ (flat vector) -> per-example function values over a batch, via functional_call."""
    params = dict(env.model.named_parameters())
    fixed = {k: v for k, v in env.model.named_buffers()}
    shapes = [(n, params[n].shape, params[n].numel()) for n in env.names]

    def unflat(theta):
        out, i = {}, 0
        for name, shape, size in shapes:
            out[name] = theta[i : i + size].reshape(shape)
            i += size
        return out

    def batch_values(theta, features):
        p = {**fixed, **unflat(theta)}
        return vmap(lambda ex: per_example(functional_call(env.model, p, (ex,)), ex))(features)

    theta0 = torch.cat([params[n].detach().reshape(-1) for n in env.names])
    return theta0, batch_values


def exact_influence(env, curvature: str, shift: float = 0.0) -> np.ndarray:
    """(1/n) g_valᵀ (H + (wd + shift)·I)⁻¹ Σ_{i∈c} ∇ℓ_i with the exact p × p curvature."""
    task = env.task
    theta0, values = flat_fn(env, task.train_loss)
    pool = to_tensors(env.pool, torch.float64, "cpu")
    val = to_tensors(env.val, torch.float64, "cpu")
    n = len(env.plan.rows)
    if curvature == "hessian":
        h = hessian(lambda t: values(t, pool).mean())(theta0)
    else:  # exact Gauss–Newton: mean_i (1/R) Σ_r J_rᵀ (diag p − p pᵀ) J_r
        _, logits_of = flat_fn(env, lambda logits, ex: logits)
        jac = jacrev(lambda t: logits_of(t, pool))(theta0)  # (n, R, C, p)
        probs = torch.softmax(logits_of(theta0, pool), dim=-1)
        rows = probs.shape[1]
        a = torch.diag_embed(probs) - probs[..., :, None] * probs[..., None, :]
        h = torch.einsum("nrcp,nrcd,nrdq->pq", jac, a, jac) / (n * rows)
    g_val = grad(lambda t: values(t, val).mean())(theta0)
    u = torch.linalg.solve(h + (WD + shift) * torch.eye(len(h), dtype=torch.float64), g_val)
    per_example = vmap(grad(lambda t, ex: values(t, {k: v[None] for k, v in ex.items()}).sum()), in_dims=(None, 0))(theta0, pool)
    cluster = env.data.cluster
    return np.array([float(per_example[cluster == c].sum(0) @ u) / n for c in env.plan.clusters])


def sketched(env, k, damping, **overrides):
    return compute_influence(
        env.task, env.model, [env.state], env.shard, group_names=[], cluster_ids=env.plan.clusters,
        cluster_sizes=env.plan.sizes, settings=settings(k, damping, **overrides),
    ).scores["influence"]


@pytest.fixture(scope="module")
def probe():
    env = setup("probe", dim=8, classes=4, clusters=16, n=480)  # p = 4·16 + 4 = 68 parameters
    env.exact = exact_influence(env, "hessian")
    return env


def test_probe_ggn_is_its_hessian(probe):
    assert len(probe.names) == 2 and sum(p.numel() for p in probe.model.parameters()) == 68
    assert np.allclose(exact_influence(probe, "ggn"), probe.exact, rtol=1e-9, atol=1e-14)


@pytest.mark.parametrize("k", [68, 80])
@pytest.mark.parametrize("kind", ["gaussian", "sparse"])
def test_sketch_with_k_at_least_params_equals_exact(probe, k, kind):
    ours = sketched(probe, k, damping=1e-12, projection=kind)
    rel = np.abs(ours - probe.exact).max() / np.abs(probe.exact).max()
    assert rel < 1e-6


def test_sketch_with_k_below_params_keeps_the_ranking(probe):
    ours = sketched(probe, 51, damping=1e-3)
    assert spearmanr(ours, probe.exact)[0] >= 0.95


def test_truncated_rank_with_complement_keeps_the_ranking(probe):
    # Dropped eigenvalues become 0, so those directions get weight 1/λ: λ must cover them (docs/influence.md).
    ours = sketched(probe, 68, damping=0.3, rank=40)
    assert spearmanr(ours, probe.exact)[0] >= 0.95


@pytest.mark.parametrize("scale", [5.0, "learned"])
def test_contrastive_sketch_equals_exact_gauss_newton(scale):
    options = {"negatives": 5, "head_dim": 2, "logit_scale": scale, "logit_scale_init": 5.0}
    env = setup("contrastive", dim=3, classes=3, clusters=8, n=120, options=options, converge=False)
    p = sum(env.state[n].numel() for n in env.names)
    assert p == (12 if scale == 5.0 else 13)  # 2·(2·3) head weights, and the temperature's τ when it is learned
    if scale == "learned":  # the warm start trained the temperature too
        assert float(env.state["log_scale"]) != pytest.approx(np.log(5.0), abs=1e-3), float(env.state["log_scale"])
    exact = exact_influence(env, "ggn")
    ours = sketched(env, p, damping=1e-12)
    assert np.abs(ours - exact).max() / np.abs(exact).max() < 1e-6


def test_empirical_fisher_option_matches_its_exact_reference():
    env = setup("probe", dim=3, classes=3, clusters=6, n=120)  # p = 3·6 + 3 = 21
    theta0, values = flat_fn(env, env.task.train_loss)
    pool = to_tensors(env.pool, torch.float64, "cpu")
    g = vmap(grad(lambda t, ex: values(t, {k: v[None] for k, v in ex.items()}).sum()), in_dims=(None, 0))(theta0, pool)
    h = g.T @ g / len(g)
    g_val = grad(lambda t: values(t, to_tensors(env.val, torch.float64, "cpu")).mean())(theta0)
    u = torch.linalg.solve(h + WD * torch.eye(21, dtype=torch.float64), g_val)
    exact = np.array([float(g[env.data.cluster == c].sum(0) @ u) / len(g) for c in env.plan.clusters])
    ours = sketched(env, 21, damping=1e-12, fisher="empirical")
    assert np.abs(ours - exact).max() / np.abs(exact).max() < 1e-6


@pytest.mark.parametrize("task_name,damping", [("probe", 0.0), ("contrastive", 0.0), ("contrastive", 0.05)])
def test_matrix_free_exact_reference_equals_the_dense_solve(task_name, damping):
    """influence.exact (CG on H v products, what benchmarks/sketch_vs_exact.py measures the sketch
    against at p where H cannot be formed) equals the dense p × p solve, with and without damping."""
    from influencespace.influence.exact import exact_terms

    options = {"negatives": 5, "head_dim": 2, "logit_scale": "learned", "logit_scale_init": 5.0}
    env = setup(task_name, dim=3, classes=3, clusters=8, n=120, options=options, converge=task_name == "probe")
    dense = exact_influence(env, "ggn" if task_name == "contrastive" else "hessian", shift=damping)
    terms, solves = exact_terms(env.task, env.model, env.state, env.shard.features, env.shard.weight, env.val,
                                env.shard.val_group, groups=0, weight_decay=WD, damping=damping, tolerance=1e-12)
    n = len(env.plan.rows)
    ours = np.array([terms[env.plan.cluster == c, 0].sum() / n for c in env.plan.clusters])
    assert solves[0].relative_residual < 1e-10, solves
    assert np.abs(ours - dense).max() / np.abs(dense).max() < 1e-8, (ours, dense)


def test_identity_curvature_is_the_sketched_gradient_similarity(probe):
    """fisher: identity (TracIn) — t_i = φ_valᵀ φ_i / (1 + λ): checked against gradients projected by hand."""
    from influencespace.influence.projector import RandomProjector

    k, damping = 40, 0.5
    ours = sketched(probe, k, damping=damping, fisher="identity")
    theta0, values = flat_fn(probe, probe.task.train_loss)
    pool = to_tensors(probe.pool, torch.float64, "cpu")
    val = to_tensors(probe.val, torch.float64, "cpu")
    g = vmap(grad(lambda t, ex: values(t, {key: v[None] for key, v in ex.items()}).sum()), in_dims=(None, 0))(theta0, pool)
    g_val = grad(lambda t: values(t, val).mean())(theta0)
    p_t = RandomProjector(len(theta0), k, 0, "gaussian", dtype=torch.float64).project(torch.eye(len(theta0), dtype=torch.float64))
    terms = (g @ p_t) @ (p_t.T @ g_val) / (1 + damping)  # (P g_i)ᵀ (P g_val) / (1 + λ), λ = damping · mean eigenvalue of I
    n = len(probe.plan.rows)
    expected = np.array([float(terms[probe.data.cluster == c].sum()) / n for c in probe.plan.clusters])
    assert np.abs(ours - expected).max() / np.abs(expected).max() < 1e-8, (ours, expected)
    assert spearmanr(ours, probe.exact)[0] < 0.999  # not the inverse-curvature scores: the test can tell them apart


def test_exact_validation_gradients_per_group_are_the_groups_own_mean_gradients():
    """influence.exact forms the overall and every group's validation gradient in one pass per chunk."""
    import copy

    from influencespace.influence.exact import FlatProxy, validation_gradients

    options = {"negatives": 5, "head_dim": 2, "logit_scale": "learned", "logit_scale_init": 5.0}
    env = setup("contrastive", dim=3, classes=3, clusters=8, n=120, options=options, converge=False)
    proxy = FlatProxy(env.task, copy.deepcopy(env.model), env.state)
    val = to_tensors(env.val, torch.float64, "cpu")
    codes = np.arange(len(env.data.validation["id"])) % 2
    got = validation_gradients(proxy, val, codes, groups=2, chunk=7)  # chunks that split the groups
    want = [grad(lambda t: proxy.losses(t, val, measurement=True).mean())(proxy.theta)]
    for g in range(2):
        rows = torch.as_tensor(codes == g)
        want.append(grad(lambda t, r=rows: proxy.losses(t, {k: v[r] for k, v in val.items()}, measurement=True).mean())(proxy.theta))
    torch.testing.assert_close(got, torch.stack(want), rtol=1e-10, atol=1e-14)
