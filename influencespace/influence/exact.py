"""Exact influence of a proxy, without the sketch: matrix-free Gauss–Newton products and conjugate gradients.

The reference the sketched estimator approximates (``benchmarks/sketch_vs_exact.py``; the tests check
it against the dense p × p solve). For the proxy's tracked parameters θ (p of them, flattened), the
same sampled examples i with the same weights w_i, and the same validation rows as the stage:

    H = (1/Σw) Σ_i w_i G_i + wd·I,     G_i = (1/R) Σ_r J_rᵀ (diag p_r − p_r p_rᵀ) J_r,
    u_g = (H + λI)⁻¹ g_val,g           (λ = 0: the influence function itself; g = overall, then each group),
    t_i,g = ∇ℓ_iᵀ u_g.

These are the engine's per-example terms with P = I: its sketch replaces H by P H Pᵀ (k × k), g by
P g and adds λ = damping · mean eigenvalue (``engine.compute_influence``). Here H is never formed:
H v costs one Jacobian–vector and one vector–Jacobian product of the logits per chunk of examples
(``torch.func.jvp`` / ``vjp``), so memory is O(p + chunk · R · C), not p², and u comes from conjugate
gradients (H is symmetric positive definite when wd > 0 or λ > 0). t_i is the directional derivative
of ℓ_i along u (a ``jvp``): no per-example gradient is stored. Only the Gauss–Newton curvature of
the default cross-entropy loss is implemented (``influence.fisher: ggn``).
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch.func import functional_call, jacrev, jvp, vjp, vmap

from influencespace.influence.errors import InfluenceError
from influencespace.influence.gradients import fixed_inputs
from influencespace.influence.proxy import State
from influencespace.influence.tasks import Task

Features = dict[str, torch.Tensor]


class FlatProxy:
    """The proxy as functions of one flat float64 vector θ of its tracked parameters."""

    def __init__(self, task: Task, model: torch.nn.Module, state: State):
        self.task = task
        self.model = model.double()
        self.names = task.tracked_parameters(self.model)
        self.shapes = [(n, state[n].shape, state[n].numel()) for n in self.names]
        self.theta = torch.cat([state[n].detach().to(torch.float64).reshape(-1) for n in self.names])
        self.fixed = {k: v.to(torch.float64) if v.is_floating_point() else v
                      for k, v in fixed_inputs(self.model, self.names).items()}

    def _params(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        out, start = dict(self.fixed), 0
        for name, shape, size in self.shapes:
            out[name] = theta[start : start + size].reshape(shape)
            start += size
        return out

    def logits(self, theta: torch.Tensor, features: Features) -> torch.Tensor:
        params = self._params(theta)
        return vmap(lambda ex: functional_call(self.model, params, (ex,)))(features)

    def losses(self, theta: torch.Tensor, features: Features, measurement: bool = False) -> torch.Tensor:
        loss = self.task.measurement if measurement else self.task.train_loss
        params = self._params(theta)
        return vmap(lambda ex: loss(functional_call(self.model, params, (ex,)), ex))(features)


def _chunks(features: Features, size: int):
    n = next(iter(features.values())).shape[0]
    for start in range(0, n, size):
        yield start, min(n, start + size), {k: v[start : start + size] for k, v in features.items()}


def ggn_product(proxy: FlatProxy, features: Features, weights: torch.Tensor, v: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """(1/Σw) Σ_i w_i G_i v, chunk by chunk (weights already zero where an example is not finite)."""
    total = float(weights.sum())
    out = torch.zeros_like(v)
    for start, stop, part in _chunks(features, chunk):
        logits_of = functools.partial(proxy.logits, features=part)
        logits, jv = jvp(logits_of, (proxy.theta,), (v,))  # (b, R, C) twice
        probs = torch.softmax(logits, dim=-1)
        a_jv = probs * jv - probs * (probs * jv).sum(-1, keepdim=True)  # (diag p − p pᵀ) J v per row
        rows = logits.shape[1]
        scale = (weights[start:stop] / (total * rows))[:, None, None]
        _, pullback = vjp(logits_of, proxy.theta)
        out += pullback(a_jv * scale)[0]
    return out


@dataclass(frozen=True)
class Solve:
    iterations: int
    relative_residual: float


def conjugate_gradient(apply: Callable[[torch.Tensor], torch.Tensor], b: torch.Tensor, tolerance: float = 1e-10,
                       max_iter: int = 5000) -> tuple[torch.Tensor, Solve]:
    """x with apply(x) = b for a symmetric positive definite ``apply`` (Hestenes–Stiefel CG from x = 0)."""
    x = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    rr = float(r @ r)
    target = tolerance**2 * float(b @ b)
    iterations = 0
    while rr > target and iterations < max_iter:
        ap = apply(p)
        curvature = float(p @ ap)
        if curvature <= 0:
            raise InfluenceError("conjugate gradients met a direction of non-positive curvature; the matrix is not "
                                 "positive definite (set a weight decay or a damping > 0)")
        alpha = rr / curvature
        x += alpha * p
        r -= alpha * ap
        rr_next = float(r @ r)
        p = r + (rr_next / rr) * p
        rr = rr_next
        iterations += 1
    residual = float(torch.linalg.vector_norm(b - apply(x)) / max(float(torch.linalg.vector_norm(b)), 1e-300))
    return x, Solve(iterations, residual)


def validation_gradients(proxy: FlatProxy, val_features: Features, val_group: np.ndarray, groups: int,
                         chunk: int = 1024) -> torch.Tensor:
    """(1 + G) × p: the mean measurement gradient over every validation row, then over each group's."""
    codes = torch.as_tensor(np.asarray(val_group))
    n = len(codes)
    out = torch.zeros(1 + groups, len(proxy.theta), dtype=torch.float64)
    counts = torch.tensor([n] + [int((codes == g).sum()) for g in range(groups)], dtype=torch.float64)
    if (counts == 0).any():
        raise InfluenceError("the validation set is empty (or a group has no validation rows); the measurement needs it")
    for start, stop, part in _chunks(val_features, chunk):
        # rows: every example, then each group's — the (1 + G) sums of one forward pass, differentiated together
        rows = torch.cat([torch.ones(1, stop - start), codes[start:stop][None] == torch.arange(groups)[:, None]])
        selector = rows.to(torch.float64)
        losses = functools.partial(proxy.losses, features=part, measurement=True)
        out += jacrev(lambda t, f=losses, s=selector: s @ f(t))(proxy.theta)
    return out / counts[:, None]


def exact_terms(task: Task, model: torch.nn.Module, state: State, features: dict[str, np.ndarray], weights: np.ndarray,
                val_features: dict[str, np.ndarray], val_group: np.ndarray, groups: int, weight_decay: float,
                damping: float = 0.0, chunk: int = 256, tolerance: float = 1e-10,
                max_iter: int = 5000) -> tuple[np.ndarray, list[Solve]]:
    """t_i,g = ∇ℓ_iᵀ (H + λI)⁻¹ g_val,g for every example (rows) and objective (columns: overall, then groups)."""
    from influencespace.influence.engine import to_tensors  # the engine's own conversion of the features

    if not task.uses_cross_entropy():
        raise InfluenceError(f"task {task.name!r} overrides train_loss: the exact Gauss–Newton reference needs the "
                             "default cross-entropy")
    proxy = FlatProxy(task, copy.deepcopy(model), state)
    feats = to_tensors(features, torch.float64, "cpu")
    vfeats = to_tensors(val_features, torch.float64, "cpu")
    finite = np.all([np.isfinite(np.asarray(v, dtype=np.float64)).reshape(len(weights), -1).all(1)
                     for k, v in features.items() if k != "label"], axis=0)
    w = torch.as_tensor(np.where(finite, weights, 0.0), dtype=torch.float64)
    shift = weight_decay + damping

    def apply(v: torch.Tensor) -> torch.Tensor:
        return ggn_product(proxy, feats, w, v, chunk) + shift * v

    targets = validation_gradients(proxy, vfeats, val_group, groups)
    solved = [conjugate_gradient(apply, g_val, tolerance, max_iter) for g_val in targets]
    directions = torch.stack([u for u, _ in solved])  # (1 + G, p)
    terms = np.zeros((len(weights), len(targets)))
    for start, stop, part in _chunks(feats, chunk):  # ∇ℓ_iᵀ u_g for every direction at once: one jvp, vmapped over them
        losses = functools.partial(proxy.losses, features=part)
        along = vmap(lambda u, f=losses: jvp(f, (proxy.theta,), (u,))[1])(directions)  # (1 + G, b)
        terms[start:stop] = along.T.numpy()
    terms[~finite] = 0.0
    solves = [solve for _, solve in solved]
    return terms, solves
