"""Per-example gradients with ``torch.func`` and their sketches φ_i = P ∇_θ ℓ_i.

Only the tracked parameters θ are differentiated (``functional_call`` with the others held fixed);
``vmap`` over a chunk of examples gives the per-example gradients (or logit Jacobians) in one call,
without a Python loop over examples.

Curvature (``fisher``):

``ggn`` (default)
    The Gauss–Newton matrix of the cross-entropy training loss, exact per example:
    ``G_i = (1/R) Σ_r J_rᵀ (diag p_r − p_r p_rᵀ) J_r`` with ``J_r = ∂ logits_r / ∂θ`` and
    ``p_r = softmax(logits_r)``. It equals the Fisher of the model's own predictive distribution and,
    for a model linear in θ (the probe), the Hessian itself. The sketch needs only ``P J_rᵀ``
    (``R·C`` projected vectors per example), and the gradient comes for free:
    ``∇ℓ_i = (1/R) Σ_r J_rᵀ (p_r − e_{y_r})``.
``empirical``
    The empirical Fisher ``G_i = ∇ℓ_i ∇ℓ_iᵀ``: one gradient per example, works for any
    ``train_loss``, but a poorer curvature model near a minimum.
``identity``
    No curvature: the engine uses H = I in the sketch space, so a term is φ_valᵀ φ_i / (1 + λ) — the
    gradient similarity of TracIn (Pruthi et al. 2020), averaged over the proxy's checkpoints. The
    sketches are the empirical path's; their outer products are accumulated but not used.

Non-finite results are never accumulated: an example whose gradient, Jacobian or probabilities
contain NaN/inf gets weight 0 and is reported through the returned mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.func import functional_call, grad, jacrev, vmap

from influencespace.influence.errors import InfluenceError
from influencespace.influence.projector import RandomProjector
from influencespace.influence.tasks import Task
from influencespace.progress import NULL, Sink

FISHERS = ("ggn", "empirical", "identity")


@dataclass
class TrainSketches:
    """Sketches of one rank's training examples under one proxy checkpoint."""

    phi: torch.Tensor  # (n, k) projected per-example training-loss gradients (zeros where not finite)
    curvature: torch.Tensor  # (k, k) float64: Σ_i w_i P G_i Pᵀ over finite examples
    finite: torch.Tensor  # (n,) bool


def flat_tracked(model: torch.nn.Module, names: list[str]) -> int:
    params = dict(model.named_parameters())
    return sum(params[n].numel() for n in names)


def fixed_inputs(model: torch.nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """What ``functional_call`` holds fixed: the parameters not in ``names`` (detached) and the buffers."""
    fixed = {n: p.detach() for n, p in model.named_parameters() if n not in names}
    fixed.update(dict(model.named_buffers()))
    return fixed


def per_example_gradients(model: torch.nn.Module, names: list[str], tracked: dict[str, torch.Tensor],
                          fixed: dict[str, torch.Tensor], chunk: dict[str, torch.Tensor], loss) -> tuple[torch.Tensor, torch.Tensor]:
    """∇_θ loss_i of each example of ``chunk`` flattened over the tracked parameters ``names`` (b × p,
    zeros where not finite), and which are finite."""

    def example_loss(params, example):
        return loss(functional_call(model, {**fixed, **params}, (example,)), example)

    grads = vmap(grad(example_loss), in_dims=(None, 0))(tracked, chunk)
    flat = torch.cat([grads[n].reshape(grads[n].shape[0], -1) for n in names], dim=-1)
    ok = torch.isfinite(flat).all(dim=1)
    return torch.where(ok[:, None], flat, torch.zeros_like(flat)), ok


class GradientSketcher:
    """Sketches per-example gradients and curvature of a task's model under a given parameter state."""

    def __init__(
        self,
        task: Task,
        model: torch.nn.Module,
        projector: RandomProjector,
        fisher: str = "ggn",
        chunk_size: int = 32,
    ):
        if fisher not in FISHERS:
            raise InfluenceError(f"unknown influence.fisher '{fisher}'; use one of: {', '.join(FISHERS)}")
        if fisher == "ggn" and not task.uses_cross_entropy():
            raise InfluenceError(
                f"task '{task.name}' defines its own train_loss, so the exact Gauss–Newton curvature does not apply; "
                "set influence.fisher=empirical"
            )
        self.task, self.model, self.projector = task, model, projector
        self.fisher, self.chunk_size = fisher, max(1, chunk_size)
        self.names = task.tracked_parameters(model)
        if not self.names:
            raise InfluenceError(f"task '{task.name}' tracks no parameters; tracked_parameters must name at least one")
        self.num_params = flat_tracked(model, self.names)
        if self.num_params != projector.num_params:
            raise InfluenceError(f"projector built for {projector.num_params} parameters, the model tracks {self.num_params}")
        self.dtype, self.device = projector.dtype, projector.device

    # -- parameters -------------------------------------------------------------------------------

    def tracked(self) -> dict[str, torch.Tensor]:
        params = dict(self.model.named_parameters())
        return {n: params[n].detach().to(self.dtype) for n in self.names}

    def _fixed(self) -> dict[str, torch.Tensor]:
        return fixed_inputs(self.model, self.names)

    def _logits_fn(self):
        fixed = self._fixed()

        def logits(tracked, example):
            return functional_call(self.model, {**fixed, **tracked}, (example,))

        return logits

    def _flatten(self, per_param: dict[str, torch.Tensor], lead: int) -> torch.Tensor:
        return torch.cat([per_param[n].reshape(*per_param[n].shape[:lead], -1) for n in self.names], dim=-1)

    @staticmethod
    def _chunk(features: dict[str, torch.Tensor], start: int, stop: int) -> dict[str, torch.Tensor]:
        return {k: v[start:stop] for k, v in features.items()}

    def _examples_per_chunk(self, features: dict[str, torch.Tensor], curvature_rows: bool) -> int:
        """``chunk_size``, or more when P is too large to cache: then every chunk draws P afresh, so a chunk
        holds as many examples as the projector's budget of gradient rows allows
        (:meth:`RandomProjector.rows_per_pass`; an example is one row, or R·C logit rows for ``ggn``)."""
        if self.projector.cached:
            return self.chunk_size
        rows_per_example = 1
        if curvature_rows:  # the logits' shape (R, C) of one example
            first = self._chunk(features, 0, 1)
            rows_per_example = int(vmap(self._logits_fn(), in_dims=(None, 0))(self.tracked(), first)[0].numel())
        return max(self.chunk_size, self.projector.rows_per_pass() // rows_per_example)

    # -- training examples --------------------------------------------------------------------------

    def train_sketches(self, features: dict[str, torch.Tensor], weights: torch.Tensor,
                       progress: Sink = NULL) -> TrainSketches:
        """φ_i for every example and ``Σ_i w_i P G_i Pᵀ`` (float64), skipping non-finite examples.

        ``progress`` counts the examples sketched, chunk by chunk.
        """
        n = next(iter(features.values())).shape[0]
        k = self.projector.dim
        phi = torch.zeros(n, k, dtype=self.dtype, device=self.device)
        curvature = torch.zeros(k, k, dtype=torch.float64, device=self.device)
        finite = torch.zeros(n, dtype=torch.bool, device=self.device)
        weights = weights.to(device=self.device, dtype=torch.float64)
        tracked = self.tracked()
        step = self._examples_per_chunk(features, self.fisher == "ggn") if n else self.chunk_size
        for start in range(0, n, step):
            stop = min(n, start + step)
            chunk = self._chunk(features, start, stop)
            if self.fisher == "ggn":
                phi_c, curv_factors, ok = self._ggn_chunk(tracked, chunk)
            else:
                phi_c, ok = self._gradient_chunk(tracked, chunk, self.task.train_loss)
                curv_factors = None
            w = torch.where(ok, weights[start:stop], torch.zeros_like(weights[start:stop]))
            phi_c = torch.where(ok[:, None], phi_c, torch.zeros_like(phi_c))
            phi[start:stop] = phi_c
            finite[start:stop] = ok
            if curv_factors is None:
                p64 = phi_c.to(torch.float64)
                curvature += (p64 * w[:, None]).T @ p64
            else:
                curvature += curv_factors(w)
            progress.add(stop - start)
        return TrainSketches(phi, curvature, finite)

    def _gradient_chunk(self, tracked, chunk, loss):
        flat, ok = per_example_gradients(self.model, self.names, tracked, self._fixed(), chunk, loss)
        return self.projector.project(flat), ok

    def _ggn_chunk(self, tracked, chunk):
        logits_fn = self._logits_fn()

        def with_aux(params, example):
            out = logits_fn(params, example)
            return out, out.detach()

        jac, logits = vmap(jacrev(with_aux, has_aux=True), in_dims=(None, 0))(tracked, chunk)
        b, rows, classes = logits.shape
        flat = self._flatten(jac, lead=3)  # (b, R, C, p)
        targets = vmap(self.task.targets)(chunk).reshape(b, rows)
        probs = torch.softmax(logits.to(torch.float64), dim=-1)
        ok = torch.isfinite(flat).flatten(1).all(dim=1) & torch.isfinite(probs).flatten(1).all(dim=1)
        flat = torch.where(ok[:, None, None, None], flat, torch.zeros_like(flat))
        probs = torch.where(ok[:, None, None], probs, torch.zeros_like(probs))
        proj = self.projector.project(flat.reshape(b * rows * classes, -1)).reshape(b, rows, classes, -1)
        residual = probs - torch.nn.functional.one_hot(targets, classes).to(probs.dtype)
        phi = torch.einsum("brck,brc->bk", proj.to(torch.float64), residual) / rows

        def curvature(w: torch.Tensor) -> torch.Tensor:
            # Σ_i w_i (1/R) Σ_r [Σ_c p_rc Φ_rc Φ_rcᵀ − (Φᵀp)(Φᵀp)ᵀ]: the sketched Gauss–Newton matrix.
            p64 = proj.to(torch.float64)
            scaled = p64 * (probs * w[:, None, None])[..., None]
            first = torch.einsum("brck,brcl->kl", scaled, p64)
            mean = torch.einsum("brck,brc->brk", p64, probs)
            second = torch.einsum("brk,brl->kl", mean * w[:, None, None], mean)
            return (first - second) / rows

        return phi.to(self.dtype), curvature, ok

    def gradient_sketches(self, features: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """φ_i = P ∇ℓ_i of the training loss for every example, and their finiteness (no curvature)."""
        return self._sketch_all(features, self.task.train_loss)

    # -- validation ---------------------------------------------------------------------------------

    def measurement_sketches(self, features: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Projected per-example gradients of the validation measurement, and their finiteness."""
        return self._sketch_all(features, self.task.measurement)

    def _sketch_all(self, features: dict[str, torch.Tensor], loss) -> tuple[torch.Tensor, torch.Tensor]:
        n = next(iter(features.values())).shape[0]
        out = torch.zeros(n, self.projector.dim, dtype=self.dtype, device=self.device)
        finite = torch.zeros(n, dtype=torch.bool, device=self.device)
        tracked = self.tracked()
        step = self._examples_per_chunk(features, False) if n else self.chunk_size
        for start in range(0, n, step):
            stop = min(n, start + step)
            phi, ok = self._gradient_chunk(tracked, self._chunk(features, start, stop), loss)
            out[start:stop], finite[start:stop] = phi, ok
        return out, finite
