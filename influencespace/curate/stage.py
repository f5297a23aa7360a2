"""The ``curate`` stage: cluster scores + assignments → manifests for InfluenceSpace and comparison policies.

Outputs (docs/architecture.md): ``manifest/`` (the InfluenceSpace policy), ``policies/<name>/`` for
each comparison policy, ``cluster_decisions.parquet`` and ``summary.json`` (per policy: rows, kept,
weight sum, reasons — what train and evaluate count from). Every input id appears exactly once in
every manifest: rows the embed or cluster stage rejected are listed with ``keep = false`` and reason
``rejected: <why>`` (cluster -1), so nothing is silently dropped. Manifests are shard-aligned with the
embedded pool (layout.py): part ``part-NNNNN.parquet`` lists exactly the ids of pool shard
``part-NNNNN.parquet``, so a reader joins one pool shard with one manifest part, never the whole pool.

**How it streams.** The driver holds k-row tables and histograms, never a per-row table; per-row
work runs in tasks over shard i of each per-row input (assignments, pool signals, row scores),
through :func:`influencespace.runtime.map_tasks` (Ray tasks, or a loop for ``runtime.runner: local``):

1. *sizes*: each shard counts its rows per cluster → the k-row cluster table (policy.cluster_table);
2. *fence*: the mismatch fence — the validation pairs' cosine quantile (``mismatch_fence: fitted``,
   V rows in the driver), or Tukey's from the pool's exact quartiles (curate.select, radix
   selection: two or three passes over one column);
3. *order within clusters*: rows meet their cluster in a shuffle through files — each shard task
   writes its rows to the bucket of their cluster (whole clusters packed into buckets of ~8 MiB,
   at most 1,024 buckets; with ``duplicate_threshold: fitted`` each shard task also returns each
   validation row's highest cosine to its rows of that row's cluster, and the driver fits the
   threshold from their maxima), each bucket task scores its clusters (SemDeDup tile by tile; each row's
   place in the leaving order, policy.order_cluster) and writes them back per shard, and each shard
   task puts its rows back in assignment order as a scratch part aligned with assignment part i
   (``_work/rows/``);
4. per budget and policy: the *cut* (radix selection over the scratch's key columns), a *count* of
   the cut per cluster (the InfluenceSpace policy's whole-cluster fallback and weights are then
   decided on the k-row table), with ``group_balance: validation`` a *tally* of the kept rows per
   (cluster, group) (k × G: the group-balanced cell weights, policy.group_balanced_weights), and a
   *write* pass: manifest part i from scratch part i.

Ties are broken by a seeded hash of the id, then the id, so a manifest never depends on file order,
shard count or worker count; the result equals the in-memory reference (policy.influence_policy and
policy.comparison_policy) row for row (tests/curate/test_stage.py).

Memory: the driver O(k + 65,536 × quantiles) plus at most ``select.COLLECT_LIMIT`` keys, and with the
fitted thresholds the validation set's V × d embeddings and k × d centroids; a shard task one shard's
columns (~50 bytes per row, plus the embeddings when SemDeDup is on; plus V × d validation embeddings
and a V × (rows of one cluster) similarity block when the threshold is fitted); a bucket task one
bucket (max(8 MiB, the pool's bytes / 1,024), or one larger cluster) plus one similarity tile
(policy.TILE_ELEMENTS). The local runner runs the same tasks one after another in this process.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from influencespace import layout, progress, storage
from influencespace.curate import policy, select
from influencespace.errors import InputDataError, StageStateError
from influencespace.runtime import map_tasks
from influencespace.stages import Stage, StageContext, StageResult

log = logging.getLogger(__name__)

WORK_DIR = "_work"
ROWS_DIR = f"{WORK_DIR}/rows"
# Rows of whole clusters are brought together in buckets of about this many bytes (more when the pool
# would need over MAX_BUCKETS of them: the shuffle writes shards × buckets files each way).
BUCKET_BYTES = 8 << 20
MAX_BUCKETS = 1024
MANIFEST_SCHEMA_FIELDS = [("id", "string"), ("cluster", "int32"), ("keep", "bool"), ("weight", "float64"), ("reason", "string")]


@dataclass(frozen=True)
class Shard:
    """One pool shard and the per-row inputs aligned with it (URIs only: what a task needs to find them)."""

    index: int
    name: str
    assignments: str
    pool: str
    row_scores: str | None
    cluster_rejects: str | None
    scratch: str


@dataclass(frozen=True)
class Signals:
    """Which per-row signals the run uses, and how (broadcast to every task)."""

    value: str  # "influence" | "image_text" | "random"
    fair_column: str | None  # the worst-off group's row influence column, when the row pass wrote it
    fairness_weight: float
    cosine: bool  # read image_text_cosine from the pool
    duplicates: bool  # compute SemDeDup scores (needs the embeddings)
    use_duplicates: bool  # near-duplicates form a tier of the InfluenceSpace policy
    use_mismatch: bool  # rows below the mismatch fence form a tier
    seed: int
    groups: bool = False  # carry the pool's sensitive attribute (group) into the scratch: curate.group_balance


def _table(uri: str, columns: list[str]) -> Any:
    return storage.read_table(uri, columns=columns)


def _strings(column: Any) -> np.ndarray:
    return np.asarray(column.to_pylist(), dtype=object)


def _aligned(ids: np.ndarray, uri: str, columns: list[str], what: str) -> Any:
    """``columns`` of the Parquet file ``uri`` in the order of ``ids`` (every id must be there)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    table = _table(uri, ["id", *columns])
    position = pc.index_in(pa.array(ids, type=pa.string()), value_set=table.column("id").cast(pa.string()))
    if position.null_count:
        missing = ids[np.flatnonzero(position.is_null().to_numpy(zero_copy_only=False))[0]]
        raise StageStateError(f"assigned id '{missing}' has no row in {what} {uri}; rerun the stage that wrote it")
    return table.take(position)


# --------------------------------------------------------------------------------------------------
# Pass 1: cluster sizes


def count_shard(shard: Shard) -> np.ndarray:
    """Rows per cluster id in one assignment part."""
    clusters = _table(shard.assignments, ["cluster"]).column("cluster").to_numpy()
    if len(clusters) and clusters.min() < 0:
        raise StageStateError(f"{shard.assignments} has negative cluster ids; rerun the cluster stage")
    return np.bincount(clusters, minlength=1)


def _add(total: np.ndarray | None, part: np.ndarray) -> np.ndarray:
    if total is None:
        return part.astype(np.int64)
    if len(part) > len(total):
        total = np.pad(total, (0, len(part) - len(total)))
    total[:len(part)] += part
    return total


# --------------------------------------------------------------------------------------------------
# Radix selection over shards (curate.select): the per-shard step and the driver's loop


def cosine_key(shard: Shard) -> tuple[select.Key, np.ndarray]:
    """The finite image–text cosines of the shard's assigned rows, as a key (for the quartiles)."""
    ids = _strings(_table(shard.assignments, ["id"]).column("id"))
    cos = _aligned(ids, shard.pool, ["image_text_cosine"], "the embedded pool").column("image_text_cosine")
    cos = cos.to_numpy(zero_copy_only=False).astype(np.float64)
    finite = np.isfinite(cos)
    return select.Key([select.sortable(cos[finite])], [64]), ids[finite]


CANDIDATE_COLUMNS = ["id", "tier", "value", "hash", "candidate"]


def _candidates(rows: pd.DataFrame) -> tuple[np.ndarray, select.Key]:
    """Which scratch rows are candidates, and the leaving-order key of those rows (policy.candidate_key)."""
    mask = rows["candidate"].to_numpy()
    key = policy.candidate_key(rows["tier"].to_numpy()[mask], rows["value"].to_numpy()[mask], rows["hash"].to_numpy()[mask])
    return mask, key


def _inside_cut(rows: pd.DataFrame, cut: select.Cut) -> np.ndarray:
    """Per scratch row: a candidate inside the budget cut."""
    mask, key = _candidates(rows)
    inside = np.zeros(len(rows), dtype=bool)
    inside[mask] = cut.inside(key, rows["id"].to_numpy()[mask])
    return inside


def candidate_key(shard: Shard) -> tuple[select.Key, np.ndarray]:
    """The InfluenceSpace policy's candidates (rows a cluster may give up) in their leaving order."""
    rows = _table(shard.scratch, CANDIDATE_COLUMNS).to_pandas()
    mask, key = _candidates(rows)
    return key, rows["id"].to_numpy()[mask]


# Scratch columns each comparison key needs.
COMPARISON_COLUMNS = {"random": [], "clipscore": ["cosine"], "dedup": ["duplicate"], "clipscore_dedup": ["cosine", "duplicate"]}


def _comparison_key(name: str, seed: int, duplicate_threshold: float | None, rows: pd.DataFrame) -> select.Key:
    return policy.comparison_key(name, rows["id"].to_numpy(), seed, rows.get("cosine"), rows.get("duplicate"), duplicate_threshold)


def comparison_key(name: str, seed: int, duplicate_threshold: float | None, shard: Shard) -> tuple[select.Key, np.ndarray]:
    rows = _table(shard.scratch, ["id", *COMPARISON_COLUMNS[name]]).to_pandas()
    return _comparison_key(name, seed, duplicate_threshold, rows), rows["id"].to_numpy()


def select_step(source: Callable[[Shard], tuple[select.Key, np.ndarray]], mode: str,
                prefixes: list[list[int]], shard: Shard) -> Any:
    key, ids = source(shard)
    if mode == "count":
        return select.sparse_histogram(select.shard_histogram(key, prefixes))
    return select.shard_collect(key, ids, prefixes)


class Passes:
    """The runner chosen once (runtime.map_tasks) and the shards every pass visits."""

    def __init__(self, runtime: Any, shards: list[Shard]):
        self.runtime = runtime
        self.shards = shards

    def map(self, fn: Callable[[Shard], Any], desc: str | None = None) -> Iterable[Any]:
        """``fn(shard)`` over every shard; with ``desc``, a progress bar counts the shards done."""
        yield from map_tasks(self.runtime, fn, self.shards, desc=None if desc is None else f"curate: {desc}")

    def select(self, source: Callable, ranks: list[int], total: int, bits: list[int]) -> list[select.Cut]:
        def count_digits(prefixes: list[list[int]]) -> np.ndarray:
            total_hist = np.zeros((len(prefixes), select.DIGITS), dtype=np.int64)
            for hist in self.map(functools.partial(select_step, source, "count", prefixes)):
                select.add_sparse(total_hist, hist)
            return total_hist

        def collect(prefixes: list[list[int]]) -> list[tuple[np.ndarray, np.ndarray]]:
            words: list[list[np.ndarray]] = [[] for _ in prefixes]
            ids: list[list[np.ndarray]] = [[] for _ in prefixes]
            for parts in self.map(functools.partial(select_step, source, "collect", prefixes)):
                for i, (w, d) in enumerate(parts):
                    words[i].append(w)
                    ids[i].append(d)
            return [(np.concatenate(w), np.concatenate(d)) for w, d in zip(words, ids, strict=True)]

        return select.select_ranks(ranks, total, bits, count_digits, collect)


# --------------------------------------------------------------------------------------------------
# Pass 3: each row's place in its cluster's leaving order (grouped by cluster, written back per shard)


def group_rows(signals: Signals, fence: float | None, shard: Shard) -> dict[str, np.ndarray]:
    """The columns the per-cluster step needs for the assigned rows of one shard, in assignment order."""
    import pyarrow as pa

    assign = _table(shard.assignments, ["id", "cluster", "distance"])
    ids = _strings(assign.column("id"))
    if len(set(ids)) != len(ids):
        dup = pd.Series(ids)[pd.Series(ids).duplicated()].iloc[0]
        raise InputDataError(f"cluster assignments list id '{dup}' more than once ({shard.assignments}); rerun the cluster stage")
    n = len(ids)
    out: dict[str, np.ndarray] = {
        "shard": np.full(n, shard.index, dtype=np.int64),
        "row": np.arange(n, dtype=np.int64),
        "id": ids,
        "cluster": assign.column("cluster").to_numpy().astype(np.int64),
        "distance": assign.column("distance").to_numpy().astype(np.float64),
        "hash": policy.tie_hash(ids, signals.seed),
    }
    pool_columns = ((["image_text_cosine"] if signals.cosine else []) + (["embedding"] if signals.duplicates else [])
                    + (["group"] if signals.groups else []))
    pool = _aligned(ids, shard.pool, pool_columns, "the embedded pool") if pool_columns else None
    if signals.groups:
        out["group"] = _strings(pool.column("group").cast(pa.string()))
    cos = None
    if signals.cosine:
        cos = pool.column("image_text_cosine").to_numpy(zero_copy_only=False).astype(np.float64)
        out["cosine"] = cos
    if signals.duplicates:
        column = pool.column("embedding").combine_chunks()
        if not pa.types.is_fixed_size_list(column.type):
            column = column.cast(pa.list_(column.type.value_type, len(column[0]) if len(column) else 1))
        out["embedding"] = column.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(n, column.type.list_size)
    value = np.zeros(n)
    if signals.value == "influence":
        scores = _aligned(ids, shard.row_scores, ["influence", *([signals.fair_column] if signals.fair_column else [])],
                          "the influence stage's row scores")
        value = scores.column("influence").to_numpy(zero_copy_only=False).astype(np.float64)
        if signals.fair_column:
            value = value + signals.fairness_weight * scores.column(signals.fair_column).to_numpy(zero_copy_only=False)
    elif signals.value == "image_text":
        value = cos
    out["value"] = policy.value_for_order(value, n)
    out["mismatch"] = ~(cos >= fence) if (fence is not None and cos is not None) else np.zeros(n, dtype=bool)
    return out


def order_group(clusters: dict[str, np.ndarray], signals: Signals, duplicate_threshold: float | None,
                floor_protects_flagged: bool, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The per-cluster step: SemDeDup scores, evidence tier, candidate flag and fallback rank of one cluster's rows."""
    ids = np.asarray(rows["id"], dtype=object)
    n = len(ids)
    cluster = int(rows["cluster"][0])
    position = int(np.searchsorted(clusters["cluster"], cluster))
    duplicate = np.full(n, -1.0)
    if signals.duplicates:
        duplicate = policy.semdedup_scores(rows["embedding"], rows["distance"], ids=ids)
    flags = duplicate >= duplicate_threshold if (signals.use_duplicates and duplicate_threshold is not None) else None
    tier = policy.row_tiers(np.full(n, clusters["helpful"][position]), rows["mismatch"] if signals.use_mismatch else None, flags)
    hashes = np.asarray(rows["hash"], dtype=np.uint64)
    value = np.asarray(rows["value"], dtype=np.float64)
    if clusters["harmful"][position]:
        candidate, fallback_rank = np.zeros(n, dtype=bool), np.full(n, -1, dtype=np.int64)
    else:
        candidate, fallback_rank = policy.order_cluster(ids, hashes, tier, value, int(clusters["room"][position]),
                                                        floor_protects_flagged)
    out = {"shard": rows["shard"], "row": rows["row"], "id": ids, "cluster": rows["cluster"], "tier": tier,
           "value": value, "hash": hashes, "duplicate": duplicate, "candidate": candidate, "fallback_rank": fallback_rank}
    for optional in ("cosine", "group"):
        if optional in rows:
            out[optional] = rows[optional]
    return out


SCRATCH_COLUMNS = {"id": "string", "cluster": "int64", "tier": "int8", "value": "float64", "hash": "uint64",
                   "duplicate": "float64", "candidate": "bool", "fallback_rank": "int64", "cosine": "float64",
                   "group": "string"}
STRING_COLUMNS = ("id", "group")


def _scratch_table(columns: dict[str, np.ndarray]) -> Any:
    import pyarrow as pa

    types = {name: (pa.bool_() if kind == "bool" else getattr(pa, kind)()) for name, kind in SCRATCH_COLUMNS.items()}
    return pa.table({c: pa.array(np.asarray(v).tolist() if c in STRING_COLUMNS else np.asarray(v), type=types[c])
                     for c, v in columns.items() if c in types})


def write_empty_rows(signals: Signals, uri: str) -> None:
    """The scratch part of a shard with no assigned rows (every later pass reads one per shard)."""
    columns = {c: np.zeros(0) for c in SCRATCH_COLUMNS if (c != "cosine" or signals.cosine) and (c != "group" or signals.groups)}
    storage.write_table(_scratch_table(columns), uri)


def _groups(rows: dict[str, np.ndarray], key: str) -> Iterable[dict[str, np.ndarray]]:
    order = np.argsort(rows[key], kind="stable")
    values = rows[key][order]
    bounds = np.flatnonzero(np.diff(values)) + 1
    for chunk in np.split(order, bounds):
        if len(chunk):
            yield {c: np.asarray(v)[chunk] for c, v in rows.items()}


def plan_buckets(sizes: np.ndarray, row_bytes: int, target_bytes: int) -> np.ndarray:
    """Bucket of each cluster id: consecutive clusters packed until a bucket holds ``target_bytes``.

    A cluster is never split (its rows must meet in one task); one larger than the target is a bucket
    of its own.
    """
    bucket = np.zeros(len(sizes), dtype=np.int64)
    current, filled = 0, 0
    for cluster, size in enumerate(sizes):
        need = int(size) * row_bytes
        if filled and filled + need > target_bytes:
            current, filled = current + 1, 0
        bucket[cluster] = current
        filled += need
    return bucket


def _rows_table(rows: dict[str, np.ndarray]) -> Any:
    import pyarrow as pa

    columns = {}
    for name, values in rows.items():
        if name in STRING_COLUMNS:
            columns[name] = pa.array(np.asarray(values).tolist(), type=pa.string())
        elif name == "embedding":
            matrix = np.asarray(values, dtype=np.float32)
            columns[name] = pa.FixedSizeListArray.from_arrays(pa.array(matrix.ravel()), matrix.shape[1])
        else:
            columns[name] = np.asarray(values)
    return pa.table(columns)


def _read_rows(uris: list[str]) -> dict[str, np.ndarray]:
    import pyarrow as pa

    table = pa.concat_tables([storage.read_table(u) for u in uris])
    out = {}
    for name in table.column_names:
        column = table.column(name)
        if name in STRING_COLUMNS:
            out[name] = _strings(column)
        elif name == "embedding":
            array = column.combine_chunks()
            out[name] = array.flatten().to_numpy(zero_copy_only=False).reshape(len(array), array.type.list_size)
        else:
            out[name] = column.to_numpy()
    return out


@dataclass(frozen=True)
class Validation:
    """The trusted validation rows the fitted thresholds are set on (V rows: bounded, broadcast to tasks)."""

    embedding: np.ndarray  # V × d
    cluster: np.ndarray  # each row's nearest centroid (the cluster stage's assignment rule)
    cosine: np.ndarray | None  # image–text cosine


def split_shard(signals: Signals, fence: float | None, bucket_of: np.ndarray, work: str, validation: Validation | None,
                shard: Shard) -> tuple[int, np.ndarray | None]:
    """Map step: one shard's rows, written to the bucket of their cluster (``<work>/buckets/bucket-B/<shard>``);
    with ``validation``, also each validation row's highest cosine to this shard's rows of its cluster."""
    rows = group_rows(signals, fence, shard)
    bucket = bucket_of[rows["cluster"]]
    storage.write_partitions(_rows_table(rows), bucket, storage.join(work, "buckets"), "bucket", shard.name)
    neighbours = None
    if validation is not None and "embedding" in rows:
        neighbours = policy.validation_neighbour_cosines(validation.embedding, validation.cluster, rows["embedding"], rows["cluster"])
    return len(bucket), neighbours


def order_bucket(clusters: dict[str, np.ndarray], signals: Signals, duplicate_threshold: float | None,
                 floor_protects_flagged: bool, work: str, shard_names: list[str], bucket: int) -> tuple[int, int]:
    """Reduce step: every cluster of one bucket ordered (policy.order_cluster), written back per shard;
    (rows, candidates) of the bucket."""
    uris = storage.list_files(storage.join(work, "buckets", f"bucket-{bucket:05d}"), ".parquet")
    if not uris:
        return 0, 0
    rows = _read_rows(uris)
    ordered = [order_group(clusters, signals, duplicate_threshold, floor_protects_flagged, group)
               for group in _groups(rows, "cluster")]
    merged = {c: np.concatenate([o[c] for o in ordered]) for c in ordered[0]}
    for part in _groups(merged, "shard"):
        name = shard_names[int(part["shard"][0])]
        storage.write_table(_rows_table(part), storage.join(work, "ordered", name, f"bucket-{bucket:05d}.parquet"))
    return len(merged["row"]), int(np.count_nonzero(merged["candidate"]))


def realign_shard(signals: Signals, work: str, shard: Shard) -> int:
    """One shard's ordered rows, from every bucket, back in assignment order: the scratch part aligned with part i."""
    uris = storage.list_files(storage.join(work, "ordered", shard.name), ".parquet")
    if not uris:
        write_empty_rows(signals, shard.scratch)
        return 0
    rows = _read_rows(uris)
    order = np.argsort(rows["row"], kind="stable")
    storage.write_table(_scratch_table({c: np.asarray(v)[order] for c, v in rows.items()}), shard.scratch)
    return len(order)


# --------------------------------------------------------------------------------------------------
# Per budget: count the cut, then write the manifests


def count_cut(cut: select.Cut, shard: Shard) -> np.ndarray:
    """(max cluster + 1, 4): candidates inside the cut per cluster and tier."""
    rows = _table(shard.scratch, [*CANDIDATE_COLUMNS, "cluster"]).to_pandas()
    inside = _inside_cut(rows, cut)
    cluster = rows["cluster"].to_numpy()[inside].astype(np.int64)
    tier = rows["tier"].to_numpy()[inside].astype(np.int64)
    out = np.zeros((int(cluster.max()) + 1 if len(cluster) else 1, 4), dtype=np.int64)
    np.add.at(out, (cluster, tier), 1)
    return out


def _manifest_schema() -> Any:
    import pyarrow as pa

    return pa.schema([(name, getattr(pa, kind if kind != "bool" else "bool_")()) for name, kind in MANIFEST_SCHEMA_FIELDS])


def _as_rejected(ids: np.ndarray, reasons: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame({"id": np.asarray(ids, dtype=object), "cluster": -1, "keep": False, "weight": 0.0,
                         "reason": ("rejected: " + pd.Series(reasons, dtype=str)).to_numpy()})


def part_summary(frame: pd.DataFrame) -> dict[str, Any]:
    kept = frame["keep"].to_numpy()
    weight = frame["weight"].to_numpy()[kept]
    return {"rows": int(len(frame)), "kept": int(kept.sum()), "weight_sum": float(weight.sum()),
            "max_weight": float(weight.max()) if len(weight) else 0.0,
            "reasons": {str(k): int(v) for k, v in frame["reason"].value_counts().items()}}


def _write_part(frame: pd.DataFrame, shard: Shard, directory: str) -> dict[str, Any]:
    import pyarrow as pa

    if shard.cluster_rejects:
        rejects = _table(shard.cluster_rejects, ["id", "reason"]).to_pandas()
        frame = pd.concat([frame, _as_rejected(rejects["id"].to_numpy(), rejects["reason"].to_numpy())], ignore_index=True)
    table = pa.Table.from_pandas(frame[policy.KEEP_COLUMNS].reset_index(drop=True), schema=_manifest_schema(), preserve_index=False)
    storage.write_table(table, storage.join(directory, shard.name))
    return part_summary(frame)


def _decide_shard(selection: policy.Selection, cut: select.Cut, shard: Shard,
                  extra: tuple[str, ...] = ()) -> tuple[pd.DataFrame, np.ndarray, np.ndarray, np.ndarray]:
    """One scratch part's rows, each one's (keep, drop reason) at this budget and its cluster's position."""
    rows = _table(shard.scratch, [*CANDIDATE_COLUMNS, "cluster", "fallback_rank", *extra]).to_pandas()
    inside = _inside_cut(rows, cut)
    position = policy.cluster_positions(selection.clusters, rows["cluster"].to_numpy())
    keep, reason = policy.decide_rows(selection, position, rows["tier"].to_numpy(), inside, rows["fallback_rank"].to_numpy())
    return rows, keep, reason, position


def count_kept_groups(selection: policy.Selection, cut: select.Cut, shard: Shard) -> dict[tuple[int, Any], int]:
    """Kept rows of one shard per (cluster position, group): what the group balance is computed from (k × G)."""
    rows, keep, _, position = _decide_shard(selection, cut, shard, ("group",))
    return policy.count_groups(position[keep], rows["group"].to_numpy()[keep])


@dataclass(frozen=True)
class GroupBalance:
    """The balanced weight of a kept row by (cluster position, group) (policy.group_balanced_weights): k × G."""

    names: list[Any]  # the group axis (None: the attribute unknown)
    cells: np.ndarray  # (k, G)


def write_curated(selection: policy.Selection, decisions: pd.DataFrame, cut: select.Cut, directory: str,
                  balance: GroupBalance | None, shard: Shard) -> dict[str, Any]:
    rows, keep, reason, position = _decide_shard(selection, cut, shard, ("group",) if balance else ())
    weight = None
    if balance is not None:
        # the group axis holds the groups of kept rows (count_kept_groups); a dropped row's weight is 0 anyway
        weight = np.zeros(len(rows))
        weight[keep] = balance.cells[position[keep], policy.group_codes(balance.names, rows["group"].to_numpy()[keep])]
    frame = policy.manifest_rows(rows["id"].to_numpy(), rows["cluster"].to_numpy(), keep, reason, decisions, position, weight)
    return _write_part(frame, shard, directory)


def write_comparison(name: str, seed: int, duplicate_threshold: float | None, cut: select.Cut, directory: str,
                     shard: Shard) -> dict[str, Any]:
    rows = _table(shard.scratch, ["id", "cluster", *COMPARISON_COLUMNS[name]]).to_pandas()
    ids = rows["id"].to_numpy()
    key = _comparison_key(name, seed, duplicate_threshold, rows)
    frame = policy.comparison_rows(name, ids, rows["cluster"].to_numpy(), cut.inside(key, ids), key)
    return _write_part(frame, shard, directory)


def write_rejected(directory: str, item: tuple[int, str]) -> dict[str, Any]:
    """Rows of one embed-rejects file that belong to the pool → manifest ``rejected-NNNNN.parquet``."""
    import pyarrow as pa

    index, uri = item
    rejects = _table(uri, ["id", "split", "reason"]).to_pandas()
    rejects = rejects[rejects["split"] == "pool"]
    frame = _as_rejected(rejects["id"].to_numpy(), rejects["reason"].to_numpy())
    table = pa.Table.from_pandas(frame[policy.KEEP_COLUMNS], schema=_manifest_schema(), preserve_index=False)
    storage.write_table(table, storage.join(directory, layout.rejected_part(index)))
    return part_summary(frame)


def combine(parts: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """The manifest's summary from its parts' (rows, kept, weight sum, reasons)."""
    rows = kept = 0
    weight_sum = max_weight = 0.0
    reasons: dict[str, int] = {}
    for part in parts:
        rows += part["rows"]
        kept += part["kept"]
        weight_sum += part["weight_sum"]
        max_weight = max(max_weight, part["max_weight"])
        for reason, count in part["reasons"].items():
            reasons[reason] = reasons.get(reason, 0) + count
    return {"rows": rows, "kept": kept, "removed": rows - kept, "keep_fraction": kept / max(1, rows),
            "weight_sum": weight_sum, "mean_weight_kept": weight_sum / kept if kept else 0.0,
            "max_weight": max_weight, "reasons": dict(sorted(reasons.items()))}


# --------------------------------------------------------------------------------------------------
# The stage


def _worst_group(ctx: StageContext) -> str | None:
    configured = ctx.config.curate.worst_group
    if configured:
        return configured
    losses = ctx.input_manifests["influence"].get("extra", {}).get("group_validation_loss") or {}
    return max(losses, key=losses.get) if losses else None


class CurateStage(Stage):
    name = "curate"
    inputs = ("embed", "cluster", "influence")
    section = "curate"

    def run(self, ctx: StageContext) -> StageResult:
        import pyarrow as pa

        cfg = ctx.config.curate
        worst_group = _worst_group(ctx)
        log.info("curate: worst-off group for fairness: %s", worst_group or "none measured")
        summary: dict[str, Any] = {"worst_group": worst_group, "curve": {}}
        outputs: dict[str, str] = {}
        curve_fractions = [f for f in cfg.curve_keep_fractions if f != cfg.keep_fraction]
        # The policy as configured, then each ablation: the same policy with the settings it changes.
        variants = [(layout.CURATED, cfg, self._comparisons(cfg))]
        # (config validation refuses an ablation that changes nothing)
        variants += [(name, cfg.model_copy(update=policy.ablation_settings(name, cfg.model_dump())), []) for name in cfg.ablations]
        decisions = None
        n_rows = 0
        thresholds: dict[str, dict[str, Any]] = {}  # per policy: the fence and near-duplicate cut it used, whether it balanced groups
        for name, variant_cfg, comparisons in variants:
            if len(variants) > 1:
                log.info("curate: policy %s", name)
            entries, variant_decisions, n_rows, thresholds[name] = self._curate(ctx, variant_cfg, name, comparisons, worst_group)
            decisions = variant_decisions if decisions is None else decisions  # the configured policy's
            for fraction, entry in entries.items():
                if fraction == cfg.keep_fraction:
                    summary.update(entry)
                    outputs.update({layout.policy_output(n): layout.manifest_dir(n) for n in entry})
                else:
                    label = layout.curve_label(fraction)
                    summary["curve"].setdefault(label, {}).update(entry)
                    outputs.update({layout.curve_output(label, n): layout.curve_dir(label, n) for n in entry})
        summary["budget_rows"] = policy.budget_rows(n_rows, cfg.keep_fraction)
        summary["thresholds"] = thresholds
        storage.write_table(pa.Table.from_pandas(decisions, preserve_index=False), ctx.path("cluster_decisions.parquet"))
        storage.write_json(ctx.path("summary.json"), summary)
        outputs.update({"decisions": "cluster_decisions.parquet", "summary": "summary.json"})
        ours = summary[layout.CURATED]
        unassigned = ours["rows"] - n_rows
        return StageResult(
            counts={"rows": ours["rows"], "kept": ours["kept"], "removed": ours["removed"], "rejected": int(unassigned),
                    "harmful_clusters": int((decisions["dropped_reason"] == policy.HARMFUL).sum())},
            outputs=outputs,
            extra={"worst_group": worst_group, "worst_group_upweighted_clusters": int(decisions["helps_worst_group"].sum()),
                   "policies": sorted(k for k in summary if k not in ("worst_group", "budget_rows", "curve", "thresholds")),
                   "thresholds": thresholds[layout.CURATED],
                   "ablations": list(cfg.ablations), "curve_keep_fractions": curve_fractions},
        )

    def _curate(self, ctx: StageContext, cfg: Any, name: str, comparisons: list[str],
                worst_group: str | None) -> tuple[dict[float, dict[str, Any]], pd.DataFrame, int, dict[str, float | None]]:
        """One InfluenceSpace policy (``cfg``: the configured one or an ablation) written under ``name``, and the
        ``comparisons`` on the same scratch, at every budget: ({keep fraction: {policy: summary}}, decisions, rows,
        the thresholds it used)."""
        scores = self._scores(ctx, cfg)
        signals = self._signals(ctx, cfg, worst_group, comparisons)
        group_target = self._group_target(ctx) if signals.groups else None
        if group_target is None:
            signals = dataclasses.replace(signals, groups=False)
        shards = self._shards(ctx, signals)
        storage.remove_tree(ctx.path(WORK_DIR))  # what an earlier policy or an interrupted attempt left
        passes = Passes(ctx.config.runtime, shards)

        sizes = None
        for part in passes.map(count_shard):
            sizes = _add(sizes, part)
        if sizes is None or not sizes.any():
            raise InputDataError("the cluster stage assigned no rows (every pool row was rejected, or the pool is empty); "
                                 "see the embed and cluster stages' rejects")
        present = np.flatnonzero(sizes)
        n_rows = int(sizes.sum())
        params = self._params(cfg, cfg.keep_fraction)
        clusters = policy.cluster_table(pd.Series(sizes[present], index=present), scores, params, worst_group)

        fit_fence = signals.use_mismatch and cfg.mismatch_fence == "fitted"
        fit_duplicates = signals.use_duplicates and cfg.duplicate_threshold == "fitted"
        validation = self._validation(ctx, cfg, fit_fence) if (fit_fence or fit_duplicates) else None
        fence = None
        if fit_fence:
            fence = policy.validation_fence(validation.cosine, cfg.mismatch_rate)
            log.info("curate: image–text mismatch fence %.4f (the %s-quantile of %d validation pairs)", fence,
                     cfg.mismatch_rate, len(validation.cosine))
        elif signals.use_mismatch:
            fence = self._fence(passes, signals, cfg)
        broadcast = {c: clusters[c].to_numpy() for c in ("cluster", "helpful", "harmful", "room")}
        row_bytes = 96 + (4 * self._dim(ctx) if signals.duplicates else 0)
        work = ctx.path(WORK_DIR)
        bucket_of = plan_buckets(sizes, row_bytes, max(BUCKET_BYTES, math.ceil(n_rows * row_bytes / MAX_BUCKETS)))
        split = functools.partial(split_shard, signals, fence, bucket_of, work, validation if fit_duplicates else None)
        split_rows, neighbours = 0, None
        for rows, found in passes.map(split, "grouping rows by cluster"):
            split_rows += rows
            if found is not None:
                neighbours = found if neighbours is None else np.maximum(neighbours, found)
        if split_rows != n_rows:
            raise StageStateError("curate split a different number of rows than the assignments hold; rerun the stage")
        threshold = None if cfg.duplicate_threshold == "fitted" else cfg.duplicate_threshold
        if fit_duplicates:
            threshold = policy.fitted_duplicate_threshold(neighbours, cfg.duplicate_rate)
            log.info("curate: near-duplicate threshold %.4f (the %s-quantile of %d validation rows' nearest pool "
                     "neighbour in their cluster)", threshold, 1 - cfg.duplicate_rate, int(np.isfinite(neighbours).sum()))
        order = functools.partial(order_bucket, broadcast, signals, threshold, cfg.floor_protects_flagged, work,
                                  [s.name for s in shards])
        buckets = int(bucket_of.max()) + 1
        ordered = candidates = 0  # candidates: rows that may leave before the floors (policy.order_cluster)
        with progress.track("curate: ordering clusters (SemDeDup)", total=buckets, unit="buckets") as bar:
            for rows, bucket_candidates in map_tasks(ctx.config.runtime, order, range(buckets)):
                ordered += rows
                candidates += bucket_candidates
                bar.add(1)
        written = sum(passes.map(functools.partial(realign_shard, signals, work), "back in shard order"))
        if not ordered == written == n_rows:
            raise StageStateError(f"curate ordered {ordered} and wrote back {written} rows, but the assignments hold "
                                  f"{n_rows}; rerun the stage")

        rejected = self._write_rejected(ctx, passes)
        entries: dict[float, dict[str, Any]] = {}
        decisions = None
        for fraction in dict.fromkeys([cfg.keep_fraction, *cfg.curve_keep_fractions]):
            label = layout.curve_label(fraction)
            main = fraction == cfg.keep_fraction

            def directory(policy_name: str, main: bool = main, label: str = label) -> str:
                return layout.manifest_dir(policy_name) if main else layout.curve_dir(label, policy_name)

            entry: dict[str, Any] = {}
            params = self._params(cfg, fraction)
            selection, fraction_decisions, cut = self._select(passes, clusters, n_rows, candidates, params, worst_group)
            balance, balance_summary = None, None
            if group_target is not None:
                balance, balance_summary = self._balance(passes, selection, cut, fraction_decisions, params, group_target)
            write = functools.partial(write_curated, selection, fraction_decisions, cut, ctx.path(directory(name)), balance)
            entry[name] = combine([*passes.map(write, f"writing {label} {name}"), *rejected(ctx.path(directory(name)))])
            if balance_summary is not None:
                entry[name]["group_balance"] = balance_summary
            for comparison in comparisons:
                budget = policy.budget_rows(n_rows, fraction)
                source = functools.partial(comparison_key, comparison, cfg.seed, threshold)
                (kept,) = passes.select(source, [budget], n_rows, policy.comparison_bits(comparison))
                write = functools.partial(write_comparison, comparison, cfg.seed, threshold, kept,
                                          ctx.path(directory(comparison)))
                entry[comparison] = combine([*passes.map(write, f"writing {label} {comparison}"),
                                             *rejected(ctx.path(directory(comparison)))])
            if main:
                decisions = fraction_decisions
            entries[fraction] = entry
        storage.remove_tree(ctx.path(WORK_DIR))
        return entries, decisions, n_rows, {"mismatch_fence": fence, "duplicate_threshold": threshold,
                                            "group_balance": group_target is not None}

    # -- the pieces ---------------------------------------------------------------------------------

    @staticmethod
    def _params(cfg: Any, keep_fraction: float) -> policy.PolicyParams:
        """The k-row decisions' settings (the near-duplicate threshold is the stage's own: fixed or fitted)."""
        return policy.PolicyParams(
            keep_fraction=keep_fraction, min_weight=cfg.min_weight, max_weight=cfg.max_weight,
            fairness_weight=cfg.fairness_weight, upweight_power=cfg.upweight_power,
            min_cluster_keep=cfg.min_cluster_keep, duplicate_threshold=None, seed=cfg.seed, fdr=cfg.fdr,
            floor_protects_flagged=cfg.floor_protects_flagged,
        )

    @staticmethod
    def _comparisons(cfg: Any) -> list[str]:
        return [name for name in ("random", "clipscore", "dedup", "clipscore_dedup") if name in set(cfg.comparison_policies)]

    @staticmethod
    def _scores(ctx: StageContext, cfg: Any) -> pd.DataFrame:
        """The k-row cluster scores the policy calls clusters on (curate.influence_source)."""
        columns = ["cluster", "influence", "ci_low", "ci_high"]
        if cfg.influence_source == "none":  # no cluster is called: every one negligible (policy.cluster_table)
            return pd.DataFrame({c: pd.Series(dtype=np.int64 if c == "cluster" else np.float64) for c in columns})
        key = "scores" if cfg.influence_source == "validation" else "placebo_scores"
        if key not in ctx.input_manifests["influence"].get("outputs", {}):
            raise StageStateError("curate.influence_source=placebo needs the influence stage's placebo scores: rerun "
                                  "influence with influence.placebo=true")
        scores = storage.read_table(ctx.input_path("influence", key)).to_pandas()  # k rows
        missing = set(columns) - set(scores.columns)
        if missing:
            raise StageStateError(f"influence {key} lack column(s) {', '.join(sorted(missing))}; rerun the influence stage")
        return scores

    def _signals(self, ctx: StageContext, cfg: Any, worst_group: str | None, comparisons: list[str]) -> Signals:
        from influencespace.layout import group_column

        wanted = set(comparisons)
        available = set(storage.schema(ctx.input_path("embed", "pool")).names)
        has_cosine = "image_text_cosine" in available
        needs_cosine = sorted(wanted & {"clipscore", "clipscore_dedup"})
        if needs_cosine and not has_cosine:
            raise InputDataError(
                f"curate.comparison_policies has {', '.join(needs_cosine)} but the embedded pool has no image_text_cosine "
                "column (embeddings brought without separate image and text vectors); remove it from the list"
            )
        if cfg.row_order == "image_text" and not has_cosine:
            raise InputDataError("curate.row_order=image_text needs an image_text_cosine column in the embedded pool; "
                                 "use curate.row_order=influence or random")
        fair = None
        if cfg.row_order == "influence":
            if cfg.influence_source != "validation":
                raise InputDataError(f"curate.row_order=influence orders rows by their influence on the validation objective, "
                                     f"which curate.influence_source={cfg.influence_source} leaves out; use image_text or random")
            if "row_scores" not in ctx.input_manifests["influence"].get("outputs", {}):
                raise StageStateError("curate.row_order=influence needs the influence stage's row pass: rerun influence with "
                                      "influence.score_rows=true (the open_clip task has none), or set curate.row_order=random "
                                      "or image_text")
            row_files = storage.parquet_files(ctx.input_path("influence", "row_scores"))
            names = set(storage.schema(row_files[0]).names) if row_files else set()
            fair = group_column(worst_group) if worst_group and group_column(worst_group) in names else None
        use_mismatch = cfg.mismatch_fence is not None
        if use_mismatch and not has_cosine:
            log.warning("curate: the pool has no image_text_cosine column; no image–text mismatch step")
            use_mismatch = False
        use_duplicates = cfg.duplicate_threshold is not None
        groups = cfg.group_balance == "validation" and "group" in available
        if cfg.group_balance == "validation" and not groups:
            log.warning("curate: the embedded pool has no group column (the sensitive attribute, a passthrough column of "
                        "the input); no group balance (curate.group_balance=none silences this)")
        return Signals(
            value=cfg.row_order, fair_column=fair, fairness_weight=cfg.fairness_weight,
            cosine=has_cosine and (bool(needs_cosine) or cfg.row_order == "image_text" or use_mismatch),
            duplicates=bool(wanted & {"dedup", "clipscore_dedup"}) or use_duplicates, use_duplicates=use_duplicates,
            use_mismatch=use_mismatch, seed=cfg.seed, groups=groups,
        )

    @staticmethod
    def _shards(ctx: StageContext, signals: Signals) -> list[Shard]:
        parts = layout.aligned_parts(storage.parquet_files(ctx.input_path("embed", "pool")),
                                     storage.parquet_files(ctx.input_path("cluster", "assignments")))
        reject_files = {}
        if "rejects" in ctx.input_manifests["cluster"].get("outputs", {}):
            reject_files = layout.parts_by_name(storage.parquet_files(ctx.input_path("cluster", "rejects")))
        row_scores = ctx.input_path("influence", "row_scores") if signals.value == "influence" else None
        return [
            Shard(index=index, name=name, assignments=assignments, pool=pool,
                  row_scores=storage.join(row_scores, name) if row_scores else None,
                  cluster_rejects=reject_files.get(name), scratch=ctx.path(ROWS_DIR, name))
            for index, (name, pool, assignments) in enumerate(parts)
        ]

    @staticmethod
    def _validation(ctx: StageContext, cfg: Any, with_cosine: bool) -> Validation:
        """The trusted validation rows (embed stage) and each one's cluster under the cluster stage's rule."""
        from influencespace.cluster.assign import FlatSearcher, prepare_rows

        columns = ["embedding"] + (["image_text_cosine"] if with_cosine else [])
        missing = [f"{stage}/{output}" for stage, output in (("embed", "validation"), ("cluster", "centroids"))
                   if output not in ctx.input_manifests[stage].get("outputs", {})]
        if missing:
            raise StageStateError(f"curate.duplicate_threshold / curate.mismatch_fence 'fitted' set the tiers' thresholds on "
                                  f"the trusted validation set, but {' and '.join(missing)} is not recorded; rerun those "
                                  "stages, or set a number for duplicate_threshold and mismatch_fence=tukey")
        available = set(storage.schema(ctx.input_path("embed", "validation")).names)
        if with_cosine and "image_text_cosine" not in available:
            raise InputDataError("curate.mismatch_fence=fitted sets the fence on the validation set's image_text_cosine, "
                                 "which the embedded validation set lacks; set curate.mismatch_fence=tukey")
        table = storage.read_table(ctx.input_path("embed", "validation"), columns=columns)
        column = table.column("embedding").combine_chunks()
        width = column.type.list_size if hasattr(column.type, "list_size") else len(column[0])
        embedding = column.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(column), width)
        rows, keep, _ = prepare_rows(embedding, ctx.config.cluster.spherical)
        centroids = np.load(io.BytesIO(storage.read_bytes(ctx.input_path("cluster", "centroids"))), allow_pickle=False)
        cluster, _ = FlatSearcher(ctx.config.cluster.spherical).search(rows, centroids)
        cosine = None
        if "image_text_cosine" in columns:
            cosine = table.column("image_text_cosine").to_numpy(zero_copy_only=False).astype(np.float64)
        return Validation(embedding=embedding[keep], cluster=cluster, cosine=cosine)

    @staticmethod
    def _dim(ctx: StageContext) -> int:
        field = storage.schema(ctx.input_path("embed", "pool")).field("embedding")
        return int(getattr(field.type, "list_size", 0) or 1024)  # variable-size lists: assume d = 1024 for bucket sizing

    @staticmethod
    def _fence(passes: Passes, signals: Signals, cfg: Any) -> float:
        """The Tukey fence Q1 − k·IQR of the assigned rows' image–text cosines, from exact quartiles."""
        n_finite = sum(passes.map(_finite_cosines))
        at = [q * (n_finite - 1) for q in (0.25, 0.75)] if n_finite else []
        ranks = sorted({int(r) for a in at for r in (math.floor(a), math.ceil(a))})
        cuts = passes.select(cosine_key, [r + 1 for r in ranks], n_finite, [64]) if ranks else []
        values = {r: select.unsortable(c.words[0]) for r, c in zip(ranks, cuts, strict=True)}
        fence = policy.tukey_fence(lambda rank: values[rank], n_finite, cfg.mismatch_iqr)
        log.info("curate: image–text mismatch fence %.4f (Tukey, k = %s, over %d cosines)", fence, cfg.mismatch_iqr, n_finite)
        return fence

    def _select(self, passes: Passes, clusters: pd.DataFrame, n_rows: int, candidates: int, params: policy.PolicyParams,
                worst_group: str | None) -> tuple[policy.Selection, pd.DataFrame, select.Cut]:
        """The InfluenceSpace cut at one budget: the candidates' boundary, the cut per cluster, the fallback.

        ``candidates``: the rows the ordering pass marked as free to leave before the floors, all clusters."""
        budget = policy.budget_rows(n_rows, params.keep_fraction)
        harmful_rows = int(clusters.loc[clusters["harmful"], "size"].sum())
        excess = n_rows - harmful_rows - budget
        cut = select.Cut.none()
        if excess >= candidates:
            cut = select.Cut.all()  # every candidate goes (and the floors too, if excess is left)
        elif excess > 0:
            (cut,) = passes.select(candidate_key, [excess], candidates, [16, 64, 64])
        cut_by_tier = np.zeros((int(clusters["cluster"].max()) + 1 if len(clusters) else 1, 4), dtype=np.int64)
        if excess > 0:
            for part in passes.map(functools.partial(count_cut, cut)):
                cut_by_tier[:len(part)] += part
        cut_by_tier = cut_by_tier[clusters["cluster"].to_numpy()]
        selection = policy.finish_selection(clusters, cut_by_tier, max(0, excess) - int(cut_by_tier.sum()))
        return selection, policy.decisions_of(selection, params, worst_group), cut

    @staticmethod
    def _group_target(ctx: StageContext) -> dict[str, float] | None:
        """π_g: each group's share of the trusted validation set (V rows, read once in the driver); None (with a
        warning: the kept rows keep their clusters' weights) when the validation set has no groups to balance to."""
        validation = ctx.input_manifests["embed"].get("outputs", {}).get("validation")
        names = set(storage.schema(ctx.input_path("embed", "validation")).names) if validation else set()
        groups = []
        if "group" in names:
            groups = _strings(storage.read_table(ctx.input_path("embed", "validation"), columns=["group"]).column("group"))
        known = pd.Series([g for g in groups if g is not None], dtype=object)
        if known.empty:
            log.warning("curate: the trusted validation set has no group column, or every row's group is empty: no "
                        "target mix to balance the kept rows to, so no group balance (add the sensitive attribute to "
                        "the validation data; curate.group_balance=none silences this)")
            return None
        shares = known.value_counts(normalize=True).sort_index()
        log.info("curate: group balance toward the validation shares %s",
                 ", ".join(f"{g} {share:.3f}" for g, share in shares.items()))
        return {str(g): float(share) for g, share in shares.items()}

    @staticmethod
    def _balance(passes: Passes, selection: policy.Selection, cut: select.Cut, decisions: pd.DataFrame,
                 params: policy.PolicyParams, target: dict[str, float]) -> tuple[GroupBalance, dict[str, Any]]:
        """The group-balanced cell weights at one budget, from a count of the kept rows per (cluster, group)."""
        counts: dict[tuple[int, Any], int] = {}
        for part in passes.map(functools.partial(count_kept_groups, selection, cut), "counting kept rows per group"):
            for key, n in part.items():
                counts[key] = counts.get(key, 0) + n
        cluster_weight = decisions["weight"].to_numpy()
        names, cells, kept = policy.balance_cells(cluster_weight, counts, target, params.min_weight, params.max_weight)

        def shares(mass: np.ndarray) -> dict[str, float]:
            return {str(g): float(m / max(mass.sum(), 1e-300)) for g, m in zip(names, mass, strict=True)}

        summary = {"target": target, "kept_share": shares(cluster_weight @ kept),
                   "balanced_share": shares((cells * kept).sum(axis=0))}
        log.info("curate: group balance at keep %.2f: kept weight shares %s → %s", params.keep_fraction,
                 summary["kept_share"], summary["balanced_share"])
        return GroupBalance(names, cells), summary

    def _write_rejected(self, ctx: StageContext, passes: Passes) -> Callable[[str], list[dict[str, Any]]]:
        """A function that writes the embed stage's pool rejects into one manifest directory (their summaries)."""
        outputs = ctx.input_manifests["embed"].get("outputs", {})
        files = []
        if "rejects" in outputs:
            files = [u for u in storage.list_files(ctx.input_path("embed", "rejects"), ".parquet", recursive=True)]
        items = list(enumerate(sorted(files)))

        def write(directory: str) -> list[dict[str, Any]]:
            return list(map_tasks(passes.runtime, functools.partial(write_rejected, directory), items))

        return write


def _finite_cosines(shard: Shard) -> int:
    return len(cosine_key(shard)[1])

