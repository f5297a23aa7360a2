"""The row pass (``influence.score_rows``): every pool row's influence, in tasks over the pool's shards.

For row i the term the cluster estimate averages is t_i = mean_j u_jᵀ P ∇ℓ_i(θ_j) over the proxy
checkpoints j (u_j: the influence directions in sketch space, one row overall and one per group).
Since uᵀ P g = (Pᵀu)ᵀ g, rank 0 turns the directions into parameter space once,
v_j = Pᵀ u_j (:meth:`~influencespace.influence.projector.RandomProjector.transpose_apply`, a single pass
over P's blocks), and writes them to ``curvature/row_directions.npy``. The row pass then needs no
projector, and no per-example gradient either: v_jᵀ ∇ℓ_i(θ_j) is the directional derivative of ℓ_i
along v_j, so one forward-mode pass (``torch.func.jvp``) of the whole batch's losses gives it for every
row at once. t_i = mean_j v_jᵀ ∇ℓ_i(θ_j); ``t_i / n`` is reported (the units of the cluster influence; removing row i alone
raises the validation loss by about t_i / n, so a negative score marks a row whose removal helps). Rows whose gradient is not finite get NaN.

Each pool shard is one task (``runtime.map_tasks``; a GPU each when ``runtime.use_gpu``), which
streams the shard ``ROW_BATCH`` rows at a time (its features only: the ids come from the cluster
stage's assignment and rejects parts, which say where each row is) and writes ``row_scores/<pool shard name>`` atomically,
shard-aligned with the pool (layout.py). A worker process builds its scorer once (the proxy, its
checkpoints and v: p × J·(1+G) floats) and keeps it for the next shard. A shard already written under the
same directions (``row_scores/_directions.json`` holds their digest) is skipped, so a restarted
stage does not score it again.

Memory per task: the proxy, v, and one batch of rows with its forward activations (and tangents).
"""

from __future__ import annotations

import functools
import hashlib
import io
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.func import functional_call, jvp, vmap

from influencespace import storage
from influencespace.influence.errors import InfluenceError
from influencespace.influence.gradients import fixed_inputs
from influencespace.influence.inputs import Inputs, PoolShard, assigned_positions, pool_ids, pool_shards
from influencespace.influence.proxy import State, set_state
from influencespace.influence.tasks import Task
from influencespace.runtime import map_tasks

ROW_SCORES_DIR = "row_scores"
ROW_DIRECTIONS_FILE = "row_directions.npy"  # under curvature/: (J, 1+G, p) float64, v_j = Pᵀ u_j
DIRECTIONS_STAMP = "_directions.json"
ROW_BATCH = 16_384  # rows read and scored at a time: bounds a task's memory


def parameter_directions(projector: Any, directions: list[np.ndarray]) -> np.ndarray:
    """(J, 1+G, p) v_j = Pᵀ u_j for the (1+G) × k directions u_j of each checkpoint, in one pass over P."""
    stacked = torch.as_tensor(np.concatenate(directions, axis=0), dtype=torch.float64)
    flat = projector.transpose_apply(stacked).cpu().numpy()
    return flat.reshape(len(directions), directions[0].shape[0], -1)


def digest(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()[:16]


class RowScorer:
    """t_i (module docstring) of any rows, from the proxy's checkpoints and the parameter-space directions."""

    def __init__(self, task: Any, model: torch.nn.Module, states: list[State], directions: np.ndarray,
                 dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu", chunk_size: int = 4096):
        if len(directions) != len(states):
            raise InfluenceError(f"{len(states)} proxy checkpoint(s) but {len(directions)} influence direction(s)")
        self.task, self.states, self.dtype, self.device = task, states, dtype, torch.device(device)
        self.model = model.to(device=self.device, dtype=dtype)
        self.names = task.tracked_parameters(self.model)
        params = dict(self.model.named_parameters())
        shapes = [params[name].shape for name in self.names]
        sizes = [int(np.prod(shape)) for shape in shapes]
        if sum(sizes) != np.shape(directions)[-1]:
            raise InfluenceError(f"directions over {np.shape(directions)[-1]} parameters, the model tracks {sum(sizes)}")
        # v_j per direction as parameter-shaped tangents: {name: (1+G, *shape)} per checkpoint.
        self.tangents = []
        for v in torch.as_tensor(np.asarray(directions), dtype=dtype, device=self.device):
            pieces = torch.split(v, sizes, dim=-1)
            self.tangents.append({n: p.reshape(len(v), *s) for n, p, s in zip(self.names, pieces, shapes, strict=True)})
        self.chunk_size = max(1, chunk_size)

    def _losses(self, fixed: dict[str, torch.Tensor], chunk: dict[str, torch.Tensor]):
        model, loss = self.model, self.task.train_loss

        def losses(tracked: dict[str, torch.Tensor]) -> torch.Tensor:
            def one(example):
                return loss(functional_call(model, {**fixed, **tracked}, (example,)), example)

            return vmap(one)(chunk)

        return losses

    def __call__(self, features: dict[str, np.ndarray]) -> np.ndarray:
        from influencespace.influence.engine import to_tensors

        n = len(next(iter(features.values())))
        feats = to_tensors(features, self.dtype, self.device)
        groups = next(iter(self.tangents[0].values())).shape[0]
        terms = torch.zeros(n, groups, dtype=torch.float64, device=self.device)
        for state, tangent in zip(self.states, self.tangents, strict=True):
            set_state(self.model, state)
            params = dict(self.model.named_parameters())
            tracked = {name: params[name].detach() for name in self.names}
            fixed = fixed_inputs(self.model, self.names)
            for start in range(0, n, self.chunk_size):
                chunk = {k: t[start : start + self.chunk_size] for k, t in feats.items()}
                losses = self._losses(fixed, chunk)
                for g in range(groups):
                    _, derivative = jvp(losses, (tracked,), ({name: t[g] for name, t in tangent.items()},))
                    terms[start : start + self.chunk_size, g] += derivative.to(torch.float64)
        terms /= len(self.states)
        terms[~torch.isfinite(terms).all(dim=1)] = float("nan")
        return terms.cpu().numpy()


@dataclass(frozen=True)
class RowJob:
    """What every row task needs (pickled once): the inputs' URIs, the proxy and where v is."""

    inputs: Inputs
    task: Task
    model: torch.nn.Module
    states: list[State]
    dtype: str
    chunk_size: int
    directions_uri: str
    stamp: str  # digest of the directions
    out: str  # the row_scores directory
    use_gpu: bool = False  # runtime.use_gpu: score on the task's GPU


_SCORER: dict[tuple[str, str, str], RowScorer] = {}  # this process's scorer, kept for the job's next shard


def _scorer(job: RowJob, device: str) -> RowScorer:
    key = (job.out, job.stamp, device)
    if key not in _SCORER:
        directions = np.load(io.BytesIO(storage.read_bytes(job.directions_uri)), allow_pickle=False)
        dtype = torch.float64 if job.dtype == "float64" else torch.float32
        _SCORER.clear()
        _SCORER[key] = RowScorer(job.task, job.model, job.states, directions, dtype, device, job.chunk_size)
    return _SCORER[key]


def _pool_batches(shard: PoolShard, columns: list[str]) -> Iterator[tuple[Any, Any]]:
    """(ids, features table) of one pool shard in batches of ``ROW_BATCH`` rows.

    Where the cluster stage's parts say where every row is (inputs.assigned_positions; the count pass
    checked them), the ids come from its assignment and rejects parts and the pool is read for its
    features alone; otherwise from the pool."""
    import pyarrow as pa

    start = 0
    with storage.open_parquet(shard.pool) as pool_file:
        pool_rows = pool_file.metadata.num_rows
        positions = assigned_positions(shard, pool_rows)
        ids = pool_ids(shard, positions, pool_rows) if positions is not None else None
        for batch in pool_file.iter_batches(batch_size=ROW_BATCH, columns=columns if ids is not None else ["id", *columns]):
            if ids is not None:
                yield ids.slice(start, batch.num_rows), batch
            else:
                yield batch.column("id").cast(pa.string()), batch
            start += batch.num_rows


def score_shard(job: RowJob, shard: PoolShard) -> int:
    """Score one pool shard into ``row_scores/<its name>``; returns its rows (a finished shard is not redone)."""
    import pyarrow as pa

    from influencespace.layout import group_column

    out = storage.join(job.out, shard.name)
    if storage.exists(out):
        return storage.parquet_rows(out)
    scorer = _scorer(job, "cuda" if job.use_gpu else "cpu")
    inputs, n_total = job.inputs, float(job.inputs.num_examples)
    parts = []
    for ids, batch in _pool_batches(shard, list(inputs.columns)):
        terms = scorer(inputs.decode(batch)) / n_total
        columns = {"id": ids, "influence": terms[:, 0]}
        columns.update({group_column(g): terms[:, 1 + i] for i, g in enumerate(inputs.group_names)})
        parts.append(pa.table(columns))
    if parts:
        storage.write_table(pa.concat_tables(parts), out)
    return sum(p.num_rows for p in parts)


def score_rows(runtime: Any, job: RowJob) -> int:
    """The row pass over every pool shard (module docstring); returns the rows scored."""
    stamp_uri = storage.join(job.out, DIRECTIONS_STAMP)
    if storage.exists(job.out):
        stamp = storage.read_json(stamp_uri) if storage.exists(stamp_uri) else None
        if stamp != {"directions": job.stamp}:
            storage.remove_tree(job.out)  # scores of other directions (or of unknown ones): score again
    storage.write_json(stamp_uri, {"directions": job.stamp})
    shards = pool_shards(job.inputs.pool_uri, job.inputs.assign_uri, job.inputs.rejects_uri)
    return sum(map_tasks(runtime, functools.partial(score_shard, job), shards, kind="gpu",
                         desc="influence: scoring every pool row"))
