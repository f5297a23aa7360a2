"""The ``influence`` stage: cluster scores from sketched gradients, on Ray Train or in-process.

Reads (docs/architecture.md): ``embed`` ``pool`` / ``validation`` (``id``, ``embedding``,
``image_embedding``, ``text_embedding``, ``group``, ``label``) and ``cluster`` ``assignments``
(``id``, ``cluster``, ``distance``) plus ``centroids`` (for the number of clusters, empty ones included).

On the driver: the sample plan (m per cluster, stratified by group) and the proxy warm start (a short
run on ``proxy_rows`` random pool rows). Then ``runtime.runner: ray`` starts a ``TorchTrainer`` with
``num_workers`` workers: each owns a shard of clusters, reads only its sampled rows, and runs
:func:`~influencespace.influence.engine.compute_influence` over the process group (gloo on CPU, NCCL on
GPU); rank 0 writes the outputs. ``runtime.runner: local`` runs the same function in this process.

Writes ``cluster_scores.parquet`` (``cluster``, ``size``, ``n_sampled``, ``n_dropped``, ``influence``,
``stderr``, ``ci_low``, ``ci_high``, ``influence_group_<name>`` per validation group), ``curvature/``
(per checkpoint: ``eigenvalues.npy``, ``eigenvectors.npy``, ``validation_sketch.npy``; and
``curvature.json`` with damping, rank, projector kind/seed/dim/fingerprint) and ``summary.json``.
Positive influence = the cluster lowers the validation loss (helps).
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
from dataclasses import dataclass
from typing import Any

import numpy as np

from influencespace import storage
from influencespace.errors import InputDataError
from influencespace.influence.errors import InfluenceError
from influencespace.progress import NULL, Sink, Tracker, track
from influencespace.stages import Stage, StageContext, StageResult

log = logging.getLogger(__name__)

# Task feature name -> embed column.
COLUMNS = {"image": "image_embedding", "text": "text_embedding", "embedding": "embedding", "label": "label"}
SCORES_FILE = "cluster_scores.parquet"
CURVATURE_DIR = "curvature"
SUMMARY_FILE = "summary.json"
ROW_SCORES_DIR = "row_scores"
ROW_BATCH = 16_384  # rows read and scored at a time: bounds a worker's memory in the row pass


# --------------------------------------------------------------------------------------------------
# Reading the inputs


def column_to_numpy(column: Any) -> np.ndarray:
    """A (fixed-size) list column as an (n, d) array, or a scalar column as (n,)."""
    import pyarrow as pa

    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks else pa.array([], type=column.type)
    if pa.types.is_fixed_size_list(column.type) or pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
        if column.null_count:
            raise InputDataError(f"{column.null_count} embedding(s) are null; the embed stage must write every row")
        values = column.flatten().to_numpy(zero_copy_only=False)
        return values.reshape(len(column), -1) if len(column) else values.reshape(0, 0)
    return column.to_numpy(zero_copy_only=False)


def read_rows(uri: str, ids: np.ndarray, columns: list[str]) -> dict[str, np.ndarray]:
    """The given columns of the rows with these ids, in the order of ``ids``, reading file by file."""
    import pyarrow as pa
    import pyarrow.compute as pc

    wanted = pa.array(np.asarray(ids).astype(str))
    files = storage.parquet_files(uri)
    parts = []
    for file_uri in files:
        table = storage.read_table(file_uri, columns=["id", *columns])
        table = table.filter(pc.is_in(table["id"].cast(pa.string()), value_set=wanted))
        if table.num_rows:
            parts.append(table)
    if not parts:
        found = None
    else:
        found = pa.concat_tables(parts)
    position = pc.index_in(wanted, value_set=found["id"].cast(pa.string())) if found is not None else None
    if position is None or position.null_count:
        missing = len(wanted) if position is None else position.null_count
        raise InputDataError(f"{missing} id(s) of the cluster assignments are missing from '{uri}'; rerun the cluster stage")
    picked = found.take(position)
    return {c: column_to_numpy(picked[c]) for c in columns}


def _schema_names(uri: str) -> list[str]:
    if not storage.parquet_files(uri):
        raise InputDataError(f"no Parquet files at '{uri}'; rerun the upstream stage")
    return storage.schema(uri).names


def _require(uri: str, columns: list[str], what: str) -> list[str]:
    names = _schema_names(uri)
    missing = [c for c in columns if c not in names]
    if missing:
        raise InputDataError(f"{what} at '{uri}' lacks column(s) {', '.join(missing)} (it has: {', '.join(names)})")
    return names


def _strings(column: Any) -> np.ndarray:
    """A group/label column as strings, with None for nulls."""
    return np.array([None if v is None else str(v) for v in column.to_pylist()], dtype=object)


@dataclass
class Inputs:
    pool_uri: str
    validation_uri: str
    columns: list[str]  # embed columns the task reads (label included for the probe)
    ids: np.ndarray  # assignment ids
    plan: Any  # SamplePlan over the assignment rows
    group_names: list[str]
    label_values: list[str] | None
    spec: Any  # DataSpec
    val_features: dict[str, np.ndarray]
    val_group: np.ndarray


def _encode_labels(features: dict[str, np.ndarray], label_values: list[str] | None) -> dict[str, np.ndarray]:
    if "label" not in features or label_values is None:
        return features
    index = {v: i for i, v in enumerate(label_values)}
    labels = [index.get(None if v is None else str(v)) for v in features["label"]]
    if any(v is None for v in labels):
        raise InputDataError("the probe task needs a label on every sampled row; some rows have a null label")
    return {**features, "label": np.asarray(labels, dtype=np.int64)}


def load_inputs(ctx: StageContext, task: Any) -> Inputs:
    import pyarrow as pa
    import pyarrow.compute as pc

    from influencespace.influence.sampling import sample_clusters
    from influencespace.influence.tasks import DataSpec

    cfg = ctx.config.influence
    pool_uri, val_uri = ctx.input_path("embed", "pool"), ctx.input_path("embed", "validation")
    assign_uri = ctx.input_path("cluster", "assignments")
    columns = [COLUMNS[f] for f in task.features]
    pool_names = _require(pool_uri, ["id", *columns], "embed pool")
    val_names = _require(val_uri, ["id", *columns], "embed validation")
    _require(assign_uri, ["id", "cluster"], "cluster assignments")

    assign = storage.read_table(assign_uri, columns=["id", "cluster"])
    ids = assign["id"].cast(pa.string())
    if pc.count_distinct(ids).as_py() != len(ids):
        raise InputDataError(f"cluster assignments at '{assign_uri}' repeat ids; every pool id must be assigned once")
    meta_cols = ["id"] + [c for c in ("group", "label") if c in pool_names]
    pool_meta = storage.read_table(pool_uri, columns=meta_cols)
    position = pc.index_in(ids, value_set=pool_meta["id"].cast(pa.string()))
    if position.null_count:
        raise InputDataError(f"{position.null_count} assigned id(s) are not in the embed pool at '{pool_uri}'; rerun the cluster stage")
    val = storage.read_table(val_uri, columns=["id", *columns] + (["group"] if "group" in val_names else []))
    if val.num_rows == 0:
        raise InputDataError(f"the validation set at '{val_uri}' is empty; influence needs a trusted validation set")

    val_groups = _strings(val["group"]) if "group" in val.column_names else np.full(val.num_rows, None, dtype=object)
    group_names = sorted({g for g in val_groups if g is not None})
    codes = {g: i for i, g in enumerate(group_names)}
    pool_groups = _strings(pool_meta["group"].take(position)) if "group" in pool_meta.column_names else None
    if pool_groups is not None:
        for g in sorted({g for g in pool_groups if g is not None} - set(codes)):
            codes[g] = len(codes)  # pool-only groups still stratify the sample
        pool_codes = np.array([-1 if g is None else codes[g] for g in pool_groups], dtype=np.int64)
    else:
        pool_codes = None
    val_group = np.array([-1 if g is None else codes[g] for g in val_groups], dtype=np.int64)

    num_clusters = None
    try:
        num_clusters = _load_npy(ctx.input_path("cluster", "centroids")).shape[0]
    except Exception:  # centroids are optional here: without them empty trailing clusters are unknown
        log.info("influence: no readable cluster centroids; clusters are counted from the assignments")
    plan = sample_clusters(
        ids.to_numpy(zero_copy_only=False), assign["cluster"].to_numpy(), pool_codes, cfg.samples_per_cluster, cfg.seed, num_clusters
    )

    label_values = None
    if "label" in columns:
        labels = set(_strings(pool_meta["label"])) | set(_strings(val["label"]))
        label_values = sorted(v for v in labels if v is not None)
    dims = {}
    val_features = {}
    for feature, col in zip(task.features, columns, strict=True):
        values = column_to_numpy(val[col])
        val_features[feature] = values
        if col != "label":
            dims[feature] = values.shape[1]
    options = {"negatives": cfg.negatives, "head_dim": cfg.head_dim, "logit_scale": cfg.logit_scale}
    spec = DataSpec(dims=dims, num_classes=len(label_values) if label_values else None, options=options)
    return Inputs(
        pool_uri, val_uri, columns, ids.to_numpy(zero_copy_only=False), plan, group_names, label_values, spec,
        _encode_labels(val_features, label_values), val_group,
    )


def read_features(inputs: Inputs, task: Any, ids: np.ndarray) -> dict[str, np.ndarray]:
    raw = read_rows(inputs.pool_uri, ids, inputs.columns)
    return _encode_labels({f: raw[c] for f, c in zip(task.features, inputs.columns, strict=True)}, inputs.label_values)


def _load_npy(uri: str) -> np.ndarray:
    return np.load(io.BytesIO(storage.read_bytes(uri)), allow_pickle=False)


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.asarray(array), allow_pickle=False)
    return buf.getvalue()


# --------------------------------------------------------------------------------------------------
# Proxy model (driver side)


def build_proxy(inputs: Inputs, task: Any, cfg: Any) -> tuple[Any, list[dict]]:
    """Build the task's model (negative bank drawn from the pool) and warm-start it; returns (model, states)."""
    import torch

    from influencespace.influence.proxy import warm_start

    dtype = torch.float64 if cfg.dtype == "float64" else torch.float32
    order = np.sort(inputs.ids.astype(str))  # file order must not change the draw
    bank = {}
    size = task.bank_size(inputs.spec)
    if size:
        if size >= len(order):
            raise InfluenceError(f"influence.negatives={size} needs a pool larger than {len(order)} rows; lower it")
        chosen = np.random.default_rng([cfg.seed, 2]).choice(len(order), size=size, replace=False)
        raw = _finite_rows(read_features(inputs, task, order[np.sort(chosen)]))
        bank = {k: torch.as_tensor(v).to(dtype) for k, v in raw.items() if k != "label"}
    model = task.build_model(inputs.spec, bank, torch.Generator().manual_seed(cfg.seed)).to(dtype)
    rows = min(cfg.proxy_rows, len(order))
    chosen = np.random.default_rng([cfg.seed, 1]).choice(len(order), size=rows, replace=False)
    # Rows with NaN/inf embeddings would turn the whole proxy into NaN; they are scored (and reported) later.
    raw = _finite_rows(read_features(inputs, task, order[np.sort(chosen)]))
    from influencespace.influence.engine import to_tensors

    feats = to_tensors(raw, dtype, "cpu")
    states = warm_start(
        task, model, feats, cfg.proxy_steps, cfg.proxy_batch_size, cfg.proxy_lr, cfg.weight_decay, cfg.seed, cfg.checkpoints
    )
    return model, states


def _finite_rows(features: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    ok = np.ones(len(next(iter(features.values()))), dtype=bool)
    for values in features.values():
        if values.dtype.kind == "f":
            ok &= np.isfinite(values.reshape(len(values), -1)).all(axis=1)
    return {k: v[ok] for k, v in features.items()}


# --------------------------------------------------------------------------------------------------
# One rank's shard and the outputs


def make_shard(inputs: Inputs, task: Any, positions: np.ndarray, rank: int, world_size: int):
    from influencespace.influence.engine import Shard

    plan = inputs.plan
    rows = plan.rows[positions]
    val = {k: v[rank::world_size] for k, v in inputs.val_features.items()}
    return Shard(
        features=read_features(inputs, task, inputs.ids[rows]) if len(rows) else _empty_features(inputs, task),
        cluster=plan.cluster[positions],
        stratum=plan.stratum[positions],
        stratum_size=plan.stratum_size[positions],
        weight=plan.weight[positions],
        val_features=val,
        val_group=inputs.val_group[rank::world_size],
    )


def _empty_features(inputs: Inputs, task: Any) -> dict[str, np.ndarray]:
    return {f: (np.zeros(0, np.int64) if f == "label" else np.zeros((0, inputs.spec.dims[f]))) for f in task.features}


def write_outputs(stage_dir: str, result: Any, inputs: Inputs, cfg: Any, task: Any, model: Any) -> dict[str, Any]:
    """Rank 0 / local: scores Parquet, curvature artifact, summary. Returns the summary."""
    import pyarrow as pa

    from influencespace.influence.gradients import flat_tracked
    from influencespace.influence.projector import RandomProjector

    storage.write_table(pa.table(result.scores), storage.join(stage_dir, SCORES_FILE))
    names = task.tracked_parameters(model)
    projector = RandomProjector(flat_tracked(model, names), cfg.projection_dim, cfg.seed, cfg.projection)
    checkpoints = []
    for j, (curvature, val_sketch) in enumerate(zip(result.curvatures, result.validation_sketches, strict=True)):
        sub = storage.join(stage_dir, CURVATURE_DIR, f"checkpoint-{j}")
        storage.write_bytes(storage.join(sub, "eigenvalues.npy"), _npy_bytes(curvature.eigenvalues))
        storage.write_bytes(storage.join(sub, "eigenvectors.npy"), _npy_bytes(curvature.eigenvectors))
        storage.write_bytes(storage.join(sub, "validation_sketch.npy"), _npy_bytes(val_sketch))
        checkpoints.append({"path": f"checkpoint-{j}", **curvature.metadata()})
    meta = {
        "task": task.name,
        "fisher": cfg.fisher,
        "weight_decay": cfg.weight_decay,
        "projector": {
            "kind": cfg.projection,
            "seed": cfg.seed,
            "dim": cfg.projection_dim,
            "num_params": projector.num_params,
            "block_size": projector.block_size,
            "fingerprint": result.summary["projector_fingerprints"][0],
        },
        "tracked_parameters": names,
        "validation_sketch_rows": ["overall", *inputs.group_names],
        "sign": "influence > 0: the cluster lowers the validation loss (helpful)",
        "checkpoints": checkpoints,
    }
    storage.write_json(storage.join(stage_dir, CURVATURE_DIR, "curvature.json"), meta)
    summary = {**result.summary, "group_names": inputs.group_names, "clusters": int(len(result.scores["cluster"]))}
    storage.write_json(storage.join(stage_dir, SUMMARY_FILE), summary)
    return summary


def write_row_scores(stage_dir: str, inputs: Inputs, task: Any, states: list, result: Any,
                     rank: int = 0, world_size: int = 1, progress: Sink = NULL) -> int:
    """The row pass: per-example influence of every pool row (``influence.score_rows``).

    Rank r scores pool files r, r + world, …, streaming each in batches of ``ROW_BATCH`` rows, and
    writes ``row_scores/<pool file name>`` (``id``, ``influence``, ``influence_group_<g>``) per
    file, atomically: shard-aligned with the pool (layout.py), so curate reads part i with pool shard i.
    ``influence`` is t_i / n (see :class:`~influencespace.influence.engine.RowScorer`). Returns the rows scored.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from influencespace.influence.engine import RowScorer
    from influencespace.influence.scores import group_column

    scorer = RowScorer(result.sketcher, states, result.directions)
    n_total = float(inputs.plan.num_examples)
    files = storage.parquet_files(inputs.pool_uri)
    scored = 0
    for index in range(rank, len(files), world_size):
        fs, path = storage.resolve(files[index])
        parts = []
        with fs.open_input_file(path) as handle:
            for batch in pq.ParquetFile(handle).iter_batches(batch_size=ROW_BATCH, columns=["id", *inputs.columns]):
                features = {f: column_to_numpy(batch.column(c)) for f, c in zip(task.features, inputs.columns, strict=True)}
                terms = scorer(_encode_labels(features, inputs.label_values)) / n_total
                columns = {"id": batch.column("id").cast(pa.string()), "influence": terms[:, 0]}
                columns.update({group_column(g): terms[:, 1 + i] for i, g in enumerate(inputs.group_names)})
                parts.append(pa.table(columns))
                scored += batch.num_rows
                progress.add(batch.num_rows)
        if parts:
            storage.write_table(pa.concat_tables(parts), storage.join(stage_dir, ROW_SCORES_DIR, files[index].rsplit("/", 1)[-1]))
    return scored


def group_validation_loss(inputs: Inputs, task: Any, model: Any, states: list, cfg: Any) -> dict[str, float]:
    """Mean validation measurement of the warm-started proxy per group (curation up-weights the worst)."""
    import torch

    from influencespace.influence.engine import to_tensors
    from influencespace.influence.proxy import mean_loss, set_state

    dtype = torch.float64 if cfg.dtype == "float64" else torch.float32
    finite = np.ones(len(inputs.val_group), dtype=bool)
    for name, values in inputs.val_features.items():
        if name != "label":
            finite &= np.isfinite(np.asarray(values, dtype=np.float64)).reshape(len(finite), -1).all(axis=1)
    set_state(model, states[-1])
    out = {}
    for g, name in enumerate(inputs.group_names):
        rows = finite & (inputs.val_group == g)
        if rows.any():
            feats = to_tensors({k: v[rows] for k, v in inputs.val_features.items()}, dtype, "cpu")
            out[name] = round(mean_loss(task, model, feats, measurement=True), 6)
    return out


# --------------------------------------------------------------------------------------------------
# Ray Train worker


def _train_loop(config: dict) -> None:
    """Runs in each Ray Train worker: its shard, the collectives, rank 0 writes the outputs."""
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    from influencespace.influence.engine import TorchComm, compute_influence
    from influencespace.influence.sampling import shard_clusters

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    inputs, task, cfg = config["inputs"], config["task"], config["settings"]
    positions = shard_clusters(inputs.plan, world)[rank]
    shard = make_shard(inputs, task, positions, rank, world)
    result = compute_influence(
        task,
        config["model"],
        config["states"],
        shard,
        group_names=inputs.group_names,
        cluster_ids=inputs.plan.clusters,
        cluster_sizes=inputs.plan.sizes,
        settings=cfg,
        comm=TorchComm(),
        device=ray.train.torch.get_device(),
        progress=config["progress"]["samples"],
    )
    if cfg.score_rows:
        write_row_scores(config["stage_dir"], inputs, task, config["states"], result, rank, world,
                         progress=config["progress"]["rows"])
    if rank == 0:
        write_outputs(config["stage_dir"], result, inputs, cfg, task, config["model"])
    # Without an explicit barrier + teardown, about one run in four aborted here (ENVIRONMENT.md).
    dist.barrier()
    dist.destroy_process_group()


def _run_on_ray(ctx: StageContext, inputs: Inputs, task: Any, model: Any, states: list,
                trackers: dict[str, Tracker]) -> None:
    import ray.train

    from influencespace.runtime import ensure_ray, run_torch_workers

    cfg, runtime = ctx.config.influence, ctx.config.runtime
    # Sinks made with Ray up: before it, a console bar's sink is the bar itself, which cannot travel.
    ensure_ray(runtime)
    progress = {name: tracker.sink() for name, tracker in trackers.items()}
    # A worker lost with its node restarts the whole group (the loop is deterministic; rank 0 writes last).
    failures = ray.train.FailureConfig(max_failures=runtime.worker_restarts)
    name = f"influence-{ctx.config.name}"
    if storage.is_s3(ctx.config.run_dir):
        fs, path = storage.resolve(storage.join(ctx.config.run_dir, "_ray_train"))
        run_config = ray.train.RunConfig(name=name, storage_path=path, storage_filesystem=fs, failure_config=failures)
    else:
        run_config = ray.train.RunConfig(
            name=name, storage_path=tempfile.mkdtemp(prefix="influence-train-"), failure_config=failures
        )
    config = {"inputs": inputs, "task": task, "settings": cfg, "model": model, "states": states,
              "stage_dir": ctx.stage_dir, "progress": progress}
    run_torch_workers(_train_loop, config, runtime=runtime, num_workers=cfg.num_workers, run_config=run_config)


# --------------------------------------------------------------------------------------------------


class InfluenceStage(Stage):
    name = "influence"
    inputs = ("embed", "cluster")
    section = "influence"

    def run(self, ctx: StageContext) -> StageResult:
        from influencespace.influence.engine import compute_influence
        from influencespace.influence.tasks import get_task

        cfg = ctx.config.influence
        task = get_task(cfg.task)
        inputs = load_inputs(ctx, task)
        model, states = build_proxy(inputs, task, cfg)
        with contextlib.ExitStack() as bars:
            samples = bars.enter_context(track("influence samples", len(inputs.plan.rows) * len(states), "gradients"))
            rows = bars.enter_context(track("influence rows", int(inputs.plan.num_examples), "rows")) if cfg.score_rows else NULL
            if ctx.config.runtime.runner == "local":
                shard = make_shard(inputs, task, np.arange(len(inputs.plan.rows)), 0, 1)
                result = compute_influence(
                    task,
                    model,
                    states,
                    shard,
                    group_names=inputs.group_names,
                    cluster_ids=inputs.plan.clusters,
                    cluster_sizes=inputs.plan.sizes,
                    settings=cfg,
                    progress=samples,
                )
                if cfg.score_rows:
                    write_row_scores(ctx.stage_dir, inputs, task, states, result, progress=rows)
                summary = write_outputs(ctx.stage_dir, result, inputs, cfg, task, model)
            else:
                _run_on_ray(ctx, inputs, task, model, states, {"samples": samples, "rows": rows})
                summary = storage.read_json(ctx.path(SUMMARY_FILE))
        counts = {
            "clusters": summary["clusters"],
            "pool": int(inputs.plan.num_examples),
            "sampled": int(summary["sampled"]),
            "dropped_nonfinite": int(summary["dropped_nonfinite"]),
            "validation": len(inputs.val_group),
        }
        extra = {
            "groups": inputs.group_names,
            "group_validation_loss": group_validation_loss(inputs, task, model, states, cfg),
            "examples_per_second": round(float(summary["examples_per_second"]), 2),
            "workers": 1 if ctx.config.runtime.runner == "local" else cfg.num_workers,
        }
        return StageResult(
            counts=counts,
            outputs={"scores": SCORES_FILE, "curvature": CURVATURE_DIR, "summary": SUMMARY_FILE,
                     **({"row_scores": ROW_SCORES_DIR} if cfg.score_rows else {})},
            extra=extra,
        )
