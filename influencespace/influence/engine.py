"""One worker's part of the influence computation, and the collectives that join the workers.

The same function runs single-process (``LocalComm``, ``runtime.runner: local``) and inside each Ray
Train worker (``TorchComm`` over the process group Ray Train set up: gloo on CPU, NCCL on GPU). Per
proxy checkpoint:

1. sketch this rank's sampled training examples: φ_i and F_s = Σ_i w_i P G_i Pᵀ (k × k, float64);
2. sketch this rank's share of the validation set: Σ_j φ_val,j overall and per group;
3. one ``all_reduce(SUM)`` of [F_s, Σ w, dropped, validation sums, counts] (a single flat buffer);
4. rank 0 eigendecomposes H = F / Σw + wd·PPᵀ (:func:`fit_curvature`), computes u = (H + λI)⁻¹ φ_val for the
   overall and each group's validation gradient; one ``broadcast`` sends the (1+G) × k matrix u;
5. each rank forms the per-example terms t_i = uᵀ φ_i of its examples.

With ``settings.placebo``, rank 0 also solves for ũ = (H + λI)⁻¹ r, r a seeded random direction of the
same norm as each validation sketch (:func:`placebo_directions`), sent in the same broadcast; the
terms ũᵀ φ_i become ``InfluenceResult.placebo_scores`` — what the real estimator reports for a
validation objective that carries no information about the data (the placebo ablation of curation).

Terms are averaged over checkpoints, each rank turns its clusters' terms into score columns
(:func:`cluster_statistics`; a cluster never straddles ranks), and rank 0 gathers them. With an
ensemble (``settings.ensemble`` E independently trained proxies, their states member after member),
each member's terms are kept apart as well, and the spread of the members' cluster estimates joins
the sampling error in the intervals (:func:`~influencespace.influence.scores.with_model_variance`).

Memory per worker: k² for F, (1+G)·k for u, and the rank's sampled sketches (m·k per cluster) — none
of it grows with the pool size n. A failure on one rank is turned into a flag in the next collective
so that the other ranks stop with the same error instead of waiting forever.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from influencespace.faults import fault_point
from influencespace.influence.curvature import Curvature, fit_curvature
from influencespace.influence.errors import InfluenceError
from influencespace.influence.gradients import GradientSketcher, flat_tracked
from influencespace.influence.projector import RandomProjector
from influencespace.influence.proxy import State, set_state
from influencespace.influence.scores import cluster_statistics, merge_scores, with_model_variance
from influencespace.influence.tasks import Task
from influencespace.progress import NULL, Sink

log = logging.getLogger(__name__)


class LocalComm:
    """Collectives for a single process: every operation is the identity."""

    rank, world_size = 0, 1

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def broadcast(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def gather(self, obj: Any) -> list[Any]:
        return [obj]

    def all_gather(self, obj: Any) -> list[Any]:
        return [obj]


class TorchComm:
    """Collectives over an initialised ``torch.distributed`` process group."""

    def __init__(self):
        import torch.distributed as dist

        if not dist.is_initialized():
            raise InfluenceError("TorchComm needs an initialised torch.distributed process group")
        self.dist = dist
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        self.dist.all_reduce(tensor, op=self.dist.ReduceOp.SUM)
        return tensor

    def broadcast(self, tensor: torch.Tensor) -> torch.Tensor:
        self.dist.broadcast(tensor, src=0)
        return tensor

    def gather(self, obj: Any) -> list[Any]:
        out = [None] * self.world_size if self.rank == 0 else None
        self.dist.gather_object(obj, out, dst=0)
        return out or []

    def all_gather(self, obj: Any) -> list[Any]:
        out = [None] * self.world_size
        self.dist.all_gather_object(out, obj)
        return out


@dataclass
class Shard:
    """One rank's inputs: its clusters' sampled training rows and its share of the validation rows."""

    features: dict[str, np.ndarray]
    cluster: np.ndarray
    stratum: np.ndarray
    stratum_size: np.ndarray
    weight: np.ndarray
    val_features: dict[str, np.ndarray]
    val_group: np.ndarray  # codes into group_names, −1 for rows without a group


@dataclass
class InfluenceResult:
    scores: dict[str, np.ndarray] | None  # rank 0 only: the score columns of every cluster
    curvatures: list[Curvature] = field(default_factory=list)  # rank 0 only, one per checkpoint
    validation_sketches: list[np.ndarray] = field(default_factory=list)  # rank 0: (1+G) × k mean φ_val
    directions: list[np.ndarray] = field(default_factory=list)  # every rank: u = (H + λI)⁻¹ φ_val per checkpoint
    placebo_scores: dict[str, np.ndarray] | None = None  # rank 0, with settings.placebo: the same columns for ũ
    sketcher: GradientSketcher | None = None  # every rank: the one projector and sketcher (rows.parameter_directions)
    summary: dict[str, Any] = field(default_factory=dict)


def to_tensors(features: dict[str, np.ndarray], dtype: torch.dtype, device) -> dict[str, torch.Tensor]:
    out = {}
    for name, values in features.items():
        if name == "label":
            out[name] = torch.as_tensor(np.asarray(values), dtype=torch.long, device=device)
        else:
            out[name] = torch.as_tensor(np.array(values, dtype=np.float64), device=device).to(dtype)
    return out


PLACEBO_SALT = 0x706C6163  # "plac": the placebo direction's own random stream


def placebo_directions(validation_sketches: np.ndarray, seed: int) -> np.ndarray:
    """Random stand-ins r_g for the validation sketches φ_val,g (rows: overall, then each group).

    r_g is Gaussian in the sketch space, scaled to ‖φ_val,g‖: a Gaussian direction in parameter space
    projects to a Gaussian one under P, so this is a random validation gradient of the real one's
    size. The draw depends only on ``seed`` and the shape, so every checkpoint and ensemble member
    measures the same random objective.
    """
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, PLACEBO_SALT])
    r = rng.standard_normal(validation_sketches.shape)
    scale = np.linalg.norm(validation_sketches, axis=1, keepdims=True) / np.maximum(np.linalg.norm(r, axis=1, keepdims=True), 1e-300)
    return r * scale


def compute_influence(
    task: Task,
    model: torch.nn.Module,
    states: list[State],
    shard: Shard,
    *,
    group_names: list[str],
    cluster_ids: np.ndarray,
    cluster_sizes: np.ndarray,
    settings: Any,
    comm: Any = None,
    device: torch.device | str = "cpu",
    progress: Sink = NULL,
) -> InfluenceResult:
    """This rank's part of the influence computation (see the module docstring).

    ``settings`` is an :class:`~influencespace.config.InfluenceConfig` (or anything with its fields).
    ``progress`` counts the sampled examples sketched, once per checkpoint.
    """
    comm = comm or LocalComm()
    t0 = time.perf_counter()
    dtype = torch.float64 if settings.dtype == "float64" else torch.float32
    model = model.to(device=device, dtype=dtype)
    names = task.tracked_parameters(model)
    projector = RandomProjector(
        flat_tracked(model, names), settings.projection_dim, settings.seed, settings.projection, dtype=dtype, device=device,
        max_cache_bytes=settings.projector_cache_mib * 2**20,
    )
    sketcher = GradientSketcher(task, model, projector, settings.fisher, settings.batch_size)
    feats = to_tensors(shard.features, dtype, device)
    vfeats = to_tensors(shard.val_features, dtype, device)
    weights = torch.as_tensor(shard.weight, dtype=torch.float64)
    n_total = int(cluster_sizes.sum())
    k, groups = settings.projection_dim, len(group_names)
    n_rows = len(shard.cluster)
    members = int(getattr(settings, "ensemble", 1))
    if len(states) % members:
        raise InfluenceError(f"{len(states)} proxy states do not split into {members} ensemble members evenly")
    placebo = bool(getattr(settings, "placebo", False))
    objectives = 2 if placebo else 1  # the validation direction, and the placebo's
    member_terms = np.zeros((objectives, members, n_rows, 1 + groups))  # [objective, member e]: its checkpoints' mean terms
    finite_all = np.ones(n_rows, dtype=bool)
    result = InfluenceResult(scores=None, sketcher=sketcher)
    fingerprints = comm.all_gather(projector.fingerprint())

    for j, state in enumerate(states):
        set_state(model, state)
        train = sketcher.train_sketches(feats, weights, progress) if n_rows else None
        finite = train.finite.cpu().numpy() if train else np.zeros(0, dtype=bool)
        finite_all &= finite
        vphi, vok = sketcher.measurement_sketches(vfeats) if len(shard.val_group) else (torch.zeros(0, k), torch.ones(0, dtype=torch.bool))
        vphi = vphi.to(torch.float64).cpu()
        codes = torch.from_numpy(np.array(shard.val_group))  # a copy: the shard's arrays may be read-only
        val_sums = torch.zeros(1 + groups, k, dtype=torch.float64)
        val_counts = torch.zeros(1 + groups, dtype=torch.float64)
        val_sums[0], val_counts[0] = vphi.sum(0), len(codes)
        for g in range(groups):
            sel = codes == g
            val_sums[1 + g], val_counts[1 + g] = vphi[sel].sum(0), sel.sum()
        curv = train.curvature.cpu() if train else torch.zeros(k, k, dtype=torch.float64)
        kept_weight = float((shard.weight * finite).sum())
        head = torch.tensor([kept_weight, float((~finite).sum()), float((~vok).sum())], dtype=torch.float64)
        buffer = torch.cat([curv.reshape(-1), head, val_sums.reshape(-1), val_counts]).to(device)
        fault_point("influence.accumulate", j)  # this rank's sketches are summed, the all-reduce comes next
        buffer = comm.all_reduce_sum(buffer).cpu()
        curv = buffer[: k * k].reshape(k, k)
        total_weight, dropped, val_bad = buffer[k * k : k * k + 3].tolist()
        val_sums = buffer[k * k + 3 : k * k + 3 + (1 + groups) * k].reshape(1 + groups, k)
        val_counts = buffer[k * k + 3 + (1 + groups) * k :]
        if val_bad:
            raise InfluenceError(
                f"{int(val_bad)} validation example(s) have non-finite measurement gradients; check the validation "
                "embeddings for NaN/inf, or lower influence.proxy_lr"
            )
        if total_weight <= 0:
            raise InfluenceError(
                "no training example has a finite gradient (or the pool is empty); check the embeddings for NaN/inf "
                "and the proxy settings (influence.proxy_lr, influence.proxy_steps)"
            )
        if (val_counts == 0).any():
            raise InfluenceError("the validation set is empty (or a group has no validation rows); the measurement needs it")
        val_means = (val_sums / val_counts[:, None]).numpy()

        # Rank 0 decomposes; a failure there is broadcast as a NaN flag so every rank stops.
        status = torch.zeros(1 + objectives * (1 + groups) * k, dtype=torch.float64)
        error: InfluenceError | None = None
        if comm.rank == 0:
            try:
                # H = F/n + wd·PPᵀ: the sketched Hessian of the proxy's objective, L2 term included
                # (fisher: identity — TracIn's gradient similarity — takes H = I in the sketch space instead).
                if settings.fisher == "identity":
                    mean_curvature = np.eye(k)
                else:
                    mean_curvature = curv.numpy() / total_weight
                    if settings.weight_decay:
                        mean_curvature = mean_curvature + settings.weight_decay * projector.gram().cpu().numpy()
                curvature = fit_curvature(mean_curvature, settings.rank, settings.damping, settings.damping_floor)
                if curvature.rank > curvature.rank_configured:
                    log.warning("influence: influence.rank %d would drop eigenvalues above the damping λ = %.3g; "
                                "kept %d of %d eigenpairs instead (the truncation rule, docs/influence.md)",
                                curvature.rank_configured, curvature.damping, curvature.rank, k)
                targets = np.concatenate([val_means, placebo_directions(val_means, settings.seed)]) if placebo else val_means
                u = curvature.inverse_apply(targets.T).T
                status[1:] = torch.as_tensor(u.reshape(-1))
                result.curvatures.append(curvature)
                result.validation_sketches.append(val_means)
            except InfluenceError as exc:
                error, status[0] = exc, 1.0
        status = comm.broadcast(status.to(device)).cpu()
        if status[0] != 0:
            raise error or InfluenceError("the curvature eigendecomposition failed on rank 0; see its log for the reason")
        u = status[1:].reshape(objectives, 1 + groups, k)
        result.directions.append(u[0].numpy().copy())
        if n_rows:
            phi = train.phi.to(torch.float64).cpu()
            for o in range(objectives):
                member_terms[o, j * members // len(states)] += (phi @ u[o].T).numpy()
        result.summary.setdefault("checkpoints", []).append(
            {"checkpoint": j, "total_weight": total_weight, "dropped_nonfinite": int(dropped)}
        )

    member_terms /= max(len(states) // members, 1)
    statistics = functools.partial(cluster_statistics, shard.cluster, shard.stratum, shard.stratum_size, finite_all)

    def columns(terms: np.ndarray) -> dict[str, np.ndarray]:
        cols = statistics(terms.mean(axis=0), cluster_sizes, n_total, settings.confidence, group_names)
        if members > 1:
            each = [statistics(t, cluster_sizes, n_total, settings.confidence, group_names) for t in terms]
            cols = with_model_variance(cols, each, settings.confidence, group_names)
        return cols

    cols = [columns(member_terms[o]) for o in range(objectives)]
    seconds = time.perf_counter() - t0
    parts = comm.gather((cols, n_rows, seconds))
    if comm.rank == 0:
        merged = [merge_scores([p[0][o] for p in parts], cluster_ids, cluster_sizes, group_names) for o in range(objectives)]
        result.scores = merged[0]
        result.placebo_scores = merged[1] if placebo else None
        sampled = sum(p[1] for p in parts)
        result.summary.update(
            n=n_total,
            sampled=sampled,
            dropped_nonfinite=int(result.scores["n_dropped"].sum()),
            projector_fingerprints=fingerprints,
            worker_seconds=[round(p[2], 3) for p in parts],
            examples_per_second=sampled * len(states) / max(max(p[2] for p in parts), 1e-9),
        )
    return result
