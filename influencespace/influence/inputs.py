"""The influence stage's inputs, read at any N: the sample plan in passes over the pool's shards.

No process holds a per-row table of the pool. Pool shard i and cluster assignment part i (the same
file name, layout.aligned_parts) are read together, by one task each (``runtime.map_tasks``: Ray tasks,
or a loop for ``runtime.runner: local``):

1. **count** — each shard's rows per (cluster, group) stratum and its label values; the driver adds
   them up: O(k · groups) rows, the :class:`~influencespace.influence.sampling.Strata`;
2. **collect** — each shard keeps the rows whose key is under their stratum's threshold (and the
   candidates for the proxy's warm-start rows and the negative bank, drawn by the same rule) and
   writes them, features included, to ``sample/_candidates/round-R/<shard>``, returning only their
   keys; the driver picks the exact bottom-m of every stratum among them (a stratum that fell short
   gets another round over the rows between its old and new threshold);
3. **split** — each shard's chosen candidates (only that shard's ids travel with its task) are written once more, with their plan columns
   (``cluster``, ``stratum``, ``weight``, ``stratum_size``), under the rank that owns their cluster:
   ``sample/rank-RRRRR/<shard>``; the proxy rows to ``sample/proxy/``, the bank to ``sample/bank/``.

Each worker then reads only ``sample/rank-<its rank>/`` and the validation set. The driver holds the
strata, the candidates' keys (≈ the sample plus O(√m) per stratum) and the chosen ids; what travels to
workers (:class:`Inputs`) is URIs and O(k) tables. The draw is the rule of :mod:`.sampling`, so the
plan equals :func:`~influencespace.influence.sampling.sample_clusters` on the same rows (tested).
"""

from __future__ import annotations

import dataclasses
import functools
import io
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from influencespace import layout, storage
from influencespace.errors import InputDataError, StageStateError
from influencespace.influence.errors import InfluenceError
from influencespace.influence.sampling import (
    BANK_SALT,
    NO_GROUP,
    PROXY_SALT,
    SAMPLE_SALT,
    Strata,
    cluster_owners,
    cluster_sizes,
    draw_keys,
    key_threshold,
    smallest_keys,
)
from influencespace.runtime import map_tasks

if TYPE_CHECKING:
    from influencespace.influence.tasks import DataSpec  # imports torch, which the plan's tasks do not need

log = logging.getLogger(__name__)

# Task feature name -> embed column.
COLUMNS = {"image": "image_embedding", "text": "text_embedding", "embedding": "embedding", "label": "label"}
SAMPLE_DIR = "sample"
CANDIDATES_DIR = "_candidates"
PROXY_DIR, BANK_DIR = "proxy", "bank"
PLAN_COLUMNS = ("cluster", "stratum", "weight", "stratum_size")
COUNTS_MERGED_EVERY = 32  # shards' strata counts the driver holds before adding them up
MAX_ROUNDS = 8  # thresholds grow 4× a round: a stratum still short after 8 rounds means the keys are not uniform


def rank_dir(rank: int) -> str:
    return f"rank-{rank:05d}"


# --------------------------------------------------------------------------------------------------
# Columns


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


def _strings(column: Any) -> np.ndarray:
    """A group/label column as strings, with None for nulls."""
    return np.array([None if v is None else str(v) for v in column.to_pylist()], dtype=object)


def _require(uri: str, columns: list[str], what: str) -> list[str]:
    if not storage.parquet_files(uri):
        raise InputDataError(f"no Parquet files at '{uri}'; rerun the upstream stage")
    names = storage.schema(uri).names
    missing = [c for c in columns if c not in names]
    if missing:
        raise InputDataError(f"{what} at '{uri}' lacks column(s) {', '.join(missing)} (it has: {', '.join(names)})")
    return names


def encode_labels(features: dict[str, np.ndarray], label_values: list[str] | None) -> dict[str, np.ndarray]:
    """The ``label`` feature as indices into ``label_values`` (the probe task's classes)."""
    if "label" not in features or label_values is None:
        return features
    index = {v: i for i, v in enumerate(label_values)}
    labels = [index.get(None if v is None else str(v)) for v in features["label"]]
    if any(v is None for v in labels):
        raise InputDataError("the probe task needs a label on every sampled row; some rows have a null label")
    return {**features, "label": np.asarray(labels, dtype=np.int64)}


def group_codes(groups: np.ndarray, codes: dict[str, int]) -> np.ndarray:
    return np.array([NO_GROUP if g is None else codes[g] for g in groups], dtype=np.int64)


# --------------------------------------------------------------------------------------------------
# What every process of the stage shares


@dataclass(frozen=True)
class PoolShard:
    """One embedded pool shard and its cluster assignment part (URIs only)."""

    index: int
    name: str
    pool: str
    assignments: str
    rejects: str | None = None  # the cluster stage's rejects part of this shard, when it has one


@dataclass(frozen=True)
class Inputs:
    """Where the stage's data is, and the O(k) tables every process needs; never per-row data.

    ``group_names``: the validation groups (one score column each); ``strata_names``: those, then any
    group found only in the pool (it still stratifies the sample). ``sample_uri``: the plan's rows,
    split for ``world_size`` ranks."""

    pool_uri: str
    assign_uri: str  # the cluster stage's assignment parts (one per pool shard, layout.aligned_parts)
    rejects_uri: str | None  # … and its rejects parts (only shards with rejected rows have one)
    validation_uri: str
    sample_uri: str
    features: tuple[str, ...]
    columns: tuple[str, ...]
    group_names: tuple[str, ...]
    strata_names: tuple[str, ...]
    label_values: tuple[str, ...] | None
    spec: DataSpec
    sizes: np.ndarray  # (C,) |c| of every cluster id, empty ones included
    sampled: int  # rows in the plan
    world_size: int
    validation_rows: int

    @property
    def clusters(self) -> np.ndarray:
        return np.arange(len(self.sizes), dtype=np.int64)

    @property
    def num_examples(self) -> int:
        """n: the pool rows the clusters cover."""
        return int(self.sizes.sum())

    @property
    def labels(self) -> list[str] | None:
        return None if self.label_values is None else list(self.label_values)

    def decode(self, table: Any) -> dict[str, np.ndarray]:
        """The task's features of a table of embed columns."""
        raw = {f: column_to_numpy(table.column(c)) for f, c in zip(self.features, self.columns, strict=True)}
        return encode_labels(raw, self.labels)


def read_validation(inputs: Inputs) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The validation features and each row's group code (−1: no group). The trusted set is small."""
    names = storage.schema(inputs.validation_uri).names
    table = storage.read_table(inputs.validation_uri, columns=list(inputs.columns) + (["group"] if "group" in names else []))
    codes = {g: i for i, g in enumerate(inputs.group_names)}
    groups = _strings(table["group"]) if "group" in table.column_names else np.full(table.num_rows, None, dtype=object)
    return inputs.decode(table), group_codes(groups, codes)


def _no_features(inputs: Inputs) -> dict[str, np.ndarray]:
    """The task's features of zero rows (a rank that owns no cluster, an empty draw)."""
    return {f: (np.zeros(0, np.int64) if f == "label" else np.zeros((0, inputs.spec.dims[f]))) for f in inputs.features}


def read_rank_sample(inputs: Inputs, rank: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(features, plan columns) of the sampled rows rank ``rank`` owns, ordered by (cluster, id)."""
    import pyarrow as pa

    directory = storage.join(inputs.sample_uri, rank_dir(rank))
    files = storage.parquet_files(directory) if storage.exists(directory) else []
    if not files:
        return _no_features(inputs), {c: np.zeros(0, np.float64 if c == "weight" else np.int64) for c in PLAN_COLUMNS}
    table = pa.concat_tables([storage.read_table(f) for f in files])
    table = table.sort_by([("cluster", "ascending"), ("id", "ascending")])
    plan = {c: np.array(table.column(c).to_numpy()) for c in PLAN_COLUMNS}  # writable: torch takes them
    return inputs.decode(table), plan


def read_drawn(inputs: Inputs, which: str) -> dict[str, np.ndarray]:
    """The features of the proxy's warm-start rows (``PROXY_DIR``) or the negative bank (``BANK_DIR``), by id."""
    import pyarrow as pa

    directory = storage.join(inputs.sample_uri, which)
    files = storage.parquet_files(directory) if storage.exists(directory) else []
    if not files:
        return _no_features(inputs)
    table = pa.concat_tables([storage.read_table(f) for f in files]).sort_by("id")
    return inputs.decode(table)


# --------------------------------------------------------------------------------------------------
# Pass 1: strata counts


def _rejects(shard: PoolShard, columns: list[str]) -> Any:
    """The shard's rejects part with ``columns``, or None (no part, or one written before rejects had a ``row``)."""
    if shard.rejects is None or not storage.exists(shard.rejects) or "row" not in storage.schema(shard.rejects).names:
        return None
    return storage.read_table(shard.rejects, columns=columns)


def assigned_positions(shard: PoolShard, pool_rows: int) -> np.ndarray | None:
    """Where the assignment part's rows sit in the pool shard, or None: find them by id.

    The cluster stage writes a shard's assigned rows in pool order and its rejected rows, with their
    positions (``row``), to the rejects part, so the assigned rows are the others. From the footers and
    the (small) rejects part: nothing of the pool is read. The count pass checks the ids once
    (:func:`_shard_rows` with ``check_order``); the later passes then read no ids from the pool.
    ``pool_rows``: the pool shard's row count (from the caller's open file: a footer is read once)."""
    n_pool, n_assigned = pool_rows, storage.parquet_rows(shard.assignments)
    if n_assigned == n_pool:
        return np.arange(n_pool)
    rejects = _rejects(shard, ["row"])
    if rejects is None or n_assigned + rejects.num_rows != n_pool:
        return None
    assigned = np.ones(n_pool, bool)
    assigned[rejects.column("row").to_numpy()] = False
    return np.flatnonzero(assigned)


def pool_ids(shard: PoolShard, positions: np.ndarray, pool_rows: int) -> Any:
    """Every pool row's id, in pool order, from the assignment and rejects parts (``positions``: of the assigned rows)."""
    import pyarrow as pa

    assigned = storage.read_table(shard.assignments, columns=["id"]).column("id").cast(pa.string())
    if len(positions) == pool_rows:
        return assigned
    rejects = _rejects(shard, ["id", "row"])
    ids = pa.chunked_array([*assigned.chunks, *rejects.column("id").cast(pa.string()).chunks], type=pa.string())
    return ids.take(pa.array(np.argsort(np.concatenate([positions, rejects.column("row").to_numpy()]), kind="stable")))


def _missing_ids_error(shard: PoolShard, ids: Any, pool_ids: Any, position: Any = None) -> None:
    """Raise if some assigned ids are not rows of the pool shard (their positions in it: ``position``)."""
    import pyarrow.compute as pc

    position = pc.index_in(ids, value_set=pool_ids) if position is None else position
    if position.null_count:
        raise InputDataError(f"{position.null_count} assigned id(s) of '{shard.assignments}' are not in the embed pool "
                             f"shard '{shard.pool}'; rerun the cluster stage")


def _shard_rows(shard: PoolShard, columns: list[str], check_order: bool = False) -> Any:
    """The assigned rows of one shard: ``id``, ``cluster`` and the pool's ``columns``, in assignment order."""
    import pyarrow as pa
    import pyarrow.compute as pc

    assign = storage.read_table(shard.assignments, columns=["id", "cluster"])
    ids = assign.column("id").cast(pa.string())
    if pc.count_distinct(ids).as_py() != len(ids):
        raise InputDataError(f"cluster assignments at '{shard.assignments}' repeat ids; every pool id must be assigned once")
    with storage.open_parquet(shard.pool) as pool_file:
        pool_rows = pool_file.metadata.num_rows
        positions = assigned_positions(shard, pool_rows)
        if positions is not None:
            everything = len(positions) == pool_rows
            if check_order:
                in_pool = pool_file.read(columns=["id"]).column("id").cast(pa.string())
                at = in_pool if everything else in_pool.take(pa.array(positions))
                if not pc.all(pc.equal(ids, at)).as_py():
                    _missing_ids_error(shard, ids, in_pool)
                    raise StageStateError(f"cluster assignments '{shard.assignments}' do not list the rows of pool shard "
                                          f"'{shard.pool}' in pool order; rerun the cluster stage")
            rows = pool_file.read(columns=columns) if columns else pa.table({})
            if not everything and columns:
                rows = rows.take(pa.array(positions))
        else:  # rejects without their positions (an older cluster stage): find the assigned rows by id
            pool = pool_file.read(columns=["id", *columns])
            position = pc.index_in(ids, value_set=pool.column("id").cast(pa.string()))
            _missing_ids_error(shard, ids, pool.column("id").cast(pa.string()), position)
            rows = pool.select(columns).take(position)
    if not columns:
        return pa.table({"cluster": assign.column("cluster").cast(pa.int64()), "id": ids})
    return rows.append_column("cluster", assign.column("cluster").cast(pa.int64())).append_column("id", ids)


@dataclass(frozen=True)
class Counting:
    group: bool  # the pool has a group column
    label: bool  # the task needs the label values


def count_shard(how: Counting, shard: PoolShard) -> tuple[Any, list[str]]:
    """(cluster, group, rows) per stratum of one shard, and the distinct labels it has."""
    import pyarrow as pa

    rows = _shard_rows(shard, (["group"] if how.group else []) + (["label"] if how.label else []), check_order=True)
    group = rows.column("group").cast(pa.string()) if how.group else pa.nulls(rows.num_rows, pa.string())
    table = pa.table({"cluster": rows.column("cluster"), "group": group})
    counts = table.group_by(["cluster", "group"]).aggregate([([], "count_all")])
    labels = sorted({str(v) for v in rows.column("label").to_pylist() if v is not None}) if how.label else []
    return counts, labels


# --------------------------------------------------------------------------------------------------
# Pass 2: candidates under the thresholds


@dataclass(frozen=True)
class Draws:
    """What the collect pass keeps: per round, a threshold per stratum and one for each global draw."""

    seed: int
    strata: Strata
    codes: dict[str, int]
    group: bool  # the pool has a group column
    columns: tuple[str, ...]
    work: str
    # One entry per round: keep a row of stratum s if u_sample < τ[s] (or its proxy / bank key is under
    # that round's threshold) and no earlier round kept it.
    stratum_tau: tuple[np.ndarray, ...] = ()
    proxy_tau: tuple[float, ...] = ()
    bank_tau: tuple[float, ...] = ()

    def next_round(self, stratum_tau: np.ndarray, proxy_tau: float, bank_tau: float) -> Draws:
        return dataclasses.replace(self, stratum_tau=(*self.stratum_tau, stratum_tau), proxy_tau=(*self.proxy_tau, proxy_tau),
                                   bank_tau=(*self.bank_tau, bank_tau))


def collect_shard(draws: Draws, shard: PoolShard) -> Any:
    """Write the last round's candidates of one shard (features included); return their keys (no features)."""
    import pyarrow as pa

    rows = _shard_rows(shard, [*draws.columns, *(["group"] if draws.group else [])])
    ids = rows.column("id").to_numpy(zero_copy_only=False)
    groups = _strings(rows.column("group")) if draws.group else np.full(rows.num_rows, None, dtype=object)
    stratum = draws.strata.index(rows.column("cluster").to_numpy(), group_codes(groups, draws.codes))
    keys = {"u_sample": draw_keys(ids, draws.seed, SAMPLE_SALT), "u_proxy": draw_keys(ids, draws.seed, PROXY_SALT),
            "u_bank": draw_keys(ids, draws.seed, BANK_SALT)}

    def kept(round_: int) -> np.ndarray:
        return ((keys["u_sample"] < draws.stratum_tau[round_][stratum]) | (keys["u_proxy"] < draws.proxy_tau[round_])
                | (keys["u_bank"] < draws.bank_tau[round_]))

    last = len(draws.stratum_tau) - 1
    chosen = kept(last)
    for earlier in range(last):
        chosen &= ~kept(earlier)  # a row is a candidate of one round only
    where = pa.array(np.flatnonzero(chosen))
    key_table = pa.table({"id": rows.column("id").take(where), "stratum": pa.array(stratum).take(where),
                          **{name: pa.array(values).take(where) for name, values in keys.items()}})
    candidates = key_table.select(["id"])
    for name in draws.columns:
        candidates = candidates.append_column(name, rows.column(name).take(where))
    storage.write_table(candidates, storage.join(draws.work, f"round-{last}", shard.name))
    return key_table


# --------------------------------------------------------------------------------------------------
# Pass 3: the chosen rows, split by owner


@dataclass(frozen=True)
class Chosen:
    """Where the split pass reads and writes (every task's ``ShardChoice`` travels with its shard)."""

    rounds: int
    columns: tuple[str, ...]
    work: str
    out: str


@dataclass(frozen=True)
class ShardChoice:
    """One shard's chosen rows: the plan's (id and plan columns, with their owner rank), the proxy's and the bank's ids."""

    shard: PoolShard
    sample: Any  # pyarrow table: id, cluster, stratum, weight, stratum_size, rank
    proxy: Any  # pyarrow string array
    bank: Any


def split_shard(chosen: Chosen, choice: ShardChoice) -> int:
    """Write one shard's chosen candidates under their owner's directory (and its proxy / bank rows)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    shard = choice.shard
    written = 0
    for round_ in range(chosen.rounds):
        uri = storage.join(chosen.work, f"round-{round_}", shard.name)
        if not storage.exists(uri):
            continue
        table = storage.read_table(uri)
        ids = table.column("id")
        features = table.select(["id", *chosen.columns])
        position = pc.index_in(ids, value_set=choice.sample.column("id"))
        mine = pc.is_valid(position)
        if pc.any(mine).as_py():
            rows = features.filter(mine)
            plan = choice.sample.take(pc.drop_null(position))
            for name in PLAN_COLUMNS:
                rows = rows.append_column(name, plan.column(name))
            ranks = plan.column("rank").to_numpy()
            for rank in np.unique(ranks):
                part = rows.filter(pa.array(ranks == rank))
                storage.write_table(part, storage.join(chosen.out, rank_dir(int(rank)), f"r{round_}-{shard.name}"))
                written += part.num_rows
        for which, wanted in ((PROXY_DIR, choice.proxy), (BANK_DIR, choice.bank)):
            drawn = features.filter(pc.is_in(ids, value_set=wanted))
            if drawn.num_rows:
                storage.write_table(drawn, storage.join(chosen.out, which, f"r{round_}-{shard.name}"))
    return written


# --------------------------------------------------------------------------------------------------
# The driver's side


def npy_shape(uri: str) -> tuple[int, ...]:
    """The shape of a ``.npy`` file from its header (the first bytes), not the array."""
    fs, path = storage.resolve(uri)
    with fs.open_input_stream(path) as stream:
        head = io.BytesIO(stream.read(1 << 16))
    version = np.lib.format.read_magic(head)
    header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    return tuple(header(head)[0])


def _sum_counts(tables: list[Any]) -> Any:
    """Strata counts of several shards as one table (one row per (cluster, group): O(k · groups))."""
    import pyarrow as pa

    merged = pa.concat_tables(tables).group_by(["cluster", "group"]).aggregate([("count_all", "sum")])
    return merged.rename_columns({"count_all_sum": "count_all"})


def pool_shards(pool_uri: str, assign_uri: str, rejects_uri: str | None = None) -> list[PoolShard]:
    parts = layout.aligned_parts(storage.parquet_files(pool_uri), storage.parquet_files(assign_uri))
    rejects = {}
    if rejects_uri is not None and storage.exists(rejects_uri):
        rejects = layout.parts_by_name(storage.parquet_files(rejects_uri))
    return [PoolShard(index, name, pool, assignments, rejects.get(name))
            for index, (name, pool, assignments) in enumerate(parts)]


def plan_inputs(runtime: Any, cfg: Any, task: Any, *, pool_uri: str, validation_uri: str, assign_uri: str,
                centroids_uri: str | None, stage_dir: str, rejects_uri: str | None = None) -> Inputs:
    """Check the inputs, draw the sample plan in passes (module docstring) and write its rows; return :class:`Inputs`."""
    from influencespace.influence.tasks import DataSpec

    columns = [COLUMNS[f] for f in task.features]
    pool_names = _require(pool_uri, ["id", *columns], "embed pool")
    val_names = _require(validation_uri, ["id", *columns], "embed validation")
    _require(assign_uri, ["id", "cluster"], "cluster assignments")
    shards = pool_shards(pool_uri, assign_uri, rejects_uri)
    sample_uri = storage.join(stage_dir, SAMPLE_DIR)
    if storage.exists(sample_uri):
        storage.remove_tree(sample_uri)  # a previous attempt's plan: drawn again (the same rows)

    # Validation: small and trusted, read whole.
    val = storage.read_table(validation_uri, columns=["id", *columns] + (["group"] if "group" in val_names else []))
    if val.num_rows == 0:
        raise InputDataError(f"the validation set at '{validation_uri}' is empty; influence needs a trusted validation set")
    val_groups = _strings(val["group"]) if "group" in val.column_names else np.full(val.num_rows, None, dtype=object)
    group_names = sorted({g for g in val_groups if g is not None})

    # Pass 1.
    import pyarrow as pa

    counting = Counting(group="group" in pool_names, label="label" in columns)
    tables, labels = [], set()
    for counts, shard_labels in map_tasks(runtime, functools.partial(count_shard, counting), shards,
                                          desc="influence: counting strata"):
        tables.append(counts)
        labels.update(shard_labels)
        if len(tables) >= COUNTS_MERGED_EVERY:  # added up as they come: O(k · groups) rows, not a table a shard
            tables = [_sum_counts(tables)]
    counts = _sum_counts(tables)
    pool_groups = [g for g in counts.column("group").to_pylist()]
    codes = {g: i for i, g in enumerate(group_names)}
    for g in sorted({g for g in pool_groups if g is not None} - set(codes)):
        codes[g] = len(codes)  # pool-only groups still stratify the sample
    strata = Strata.allocate(counts.column("cluster").to_numpy(), group_codes(np.array(pool_groups, dtype=object), codes),
                             counts.column("count_all").to_numpy(), cfg.samples_per_cluster)
    num_clusters = None
    if centroids_uri is not None:
        try:
            num_clusters = npy_shape(centroids_uri)[0]
        except Exception:  # centroids are optional here: without them empty trailing clusters are unknown
            log.info("influence: no readable cluster centroids; clusters are counted from the assignments")
    sizes = cluster_sizes(strata, num_clusters)
    n = int(sizes.sum())

    label_values = None
    if "label" in columns:
        label_values = tuple(sorted(labels | {str(v) for v in val["label"].to_pylist() if v is not None}))
    dims = {f: column_to_numpy(val[c]).shape[1] for f, c in zip(task.features, columns, strict=True) if c != "label"}
    options = {"negatives": cfg.negatives, "head_dim": cfg.head_dim, "logit_scale": cfg.logit_scale,
               "logit_scale_init": cfg.logit_scale_init}
    spec = DataSpec(dims=dims, num_classes=len(label_values) if label_values else None, options=options)
    bank_size = task.bank_size(spec)
    if bank_size and bank_size >= n:
        raise InfluenceError(f"influence.negatives={bank_size} needs a pool larger than {n} rows; lower it")
    proxy_rows = min(cfg.proxy_rows, n)

    # Pass 2, in rounds until every stratum and draw has its rows. T: a draw's threshold so far (every
    # row under it is a candidate); a round raises the T of the draws still short by 4×.
    draws = Draws(cfg.seed, strata, codes, counting.group, tuple(columns), storage.join(sample_uri, CANDIDATES_DIR))
    strata_t = key_threshold(strata.take, strata.size)
    proxy_t, bank_t = float(key_threshold(proxy_rows, n)), float(key_threshold(bank_size, n))
    draws = draws.next_round(strata_t, proxy_t, bank_t)
    keys: list[Any] = []
    for round_ in range(1, MAX_ROUNDS + 1):
        found = map_tasks(runtime, functools.partial(collect_shard, draws), shards,
                          desc=f"influence: drawing the sample (round {round_})")
        keys.extend(t.append_column("shard", pa.array(np.full(t.num_rows, i, np.int32))) for i, t in enumerate(found))
        candidates = pa.concat_tables(keys)
        stratum, u = candidates.column("stratum").to_numpy(), candidates.column("u_sample").to_numpy()
        short = np.bincount(stratum[u < strata_t[stratum]], minlength=len(strata.size)) < np.minimum(strata.take, strata.size)
        proxy_short = int((candidates.column("u_proxy").to_numpy() < proxy_t).sum()) < proxy_rows
        bank_short = int((candidates.column("u_bank").to_numpy() < bank_t).sum()) < bank_size
        if not (short.any() or proxy_short or bank_short):
            break
        log.info("influence: %d strata short of their sample after round %d; drawing again", int(short.sum()), round_)
        raised = np.where(short, np.minimum(strata_t * 4, 1.0), -np.inf)
        raised_proxy = min(proxy_t * 4, 1.0) if proxy_short else -np.inf
        raised_bank = min(bank_t * 4, 1.0) if bank_short else -np.inf
        draws = draws.next_round(raised, raised_proxy, raised_bank)
        strata_t, proxy_t, bank_t = np.maximum(strata_t, raised), max(proxy_t, raised_proxy), max(bank_t, raised_bank)
    else:
        raise StageStateError(f"the sample could not be drawn in {MAX_ROUNDS} rounds; the id hashes are not uniform")
    ids = candidates.column("id").to_numpy(zero_copy_only=False)
    picked = smallest_keys(stratum, u, ids, strata.take)
    everyone = np.zeros(len(ids), np.int64)
    proxy = smallest_keys(everyone, candidates.column("u_proxy").to_numpy(), ids, np.array([proxy_rows]))
    bank = smallest_keys(everyone, candidates.column("u_bank").to_numpy(), ids, np.array([bank_size]))

    # Pass 3: the plan's rows under their owner's directory.
    world = max(1, int(cfg.num_workers) if runtime.runner == "ray" else 1)
    chosen_stratum = stratum[picked]
    owner = cluster_owners(np.bincount(strata.cluster[chosen_stratum], minlength=len(sizes)), world)
    sample = pa.table({
        "id": candidates.column("id").take(pa.array(picked)),
        "cluster": pa.array(strata.cluster[chosen_stratum]),
        "stratum": pa.array(strata.code[chosen_stratum]),
        "weight": pa.array(strata.weight[chosen_stratum].astype(np.float64)),
        "stratum_size": pa.array(strata.size[chosen_stratum]),
        "rank": pa.array(owner[strata.cluster[chosen_stratum]]),
    })
    # Each split task gets only its own shard's chosen rows (a candidate's key came back with its shard).
    of_shard = candidates.column("shard").to_numpy()

    def per_shard(shard_of: np.ndarray) -> list[np.ndarray]:
        """Positions of the rows of each shard, for rows whose shards are ``shard_of``."""
        order = np.argsort(shard_of, kind="stable")
        return np.split(order, np.searchsorted(shard_of[order], np.arange(1, len(shards))))

    id_column = candidates.column("id")
    sample_parts, proxy_parts, bank_parts = per_shard(of_shard[picked]), per_shard(of_shard[proxy]), per_shard(of_shard[bank])
    choices = [ShardChoice(shard, sample.take(pa.array(sample_parts[i])), id_column.take(pa.array(proxy[proxy_parts[i]])),
                           id_column.take(pa.array(bank[bank_parts[i]])))
               for i, shard in enumerate(shards)]
    chosen = Chosen(len(draws.stratum_tau), tuple(columns), draws.work, sample_uri)
    written = sum(map_tasks(runtime, functools.partial(split_shard, chosen), choices, desc="influence: writing the sample"))
    if written != sample.num_rows:
        raise StageStateError(f"the sample has {sample.num_rows} rows but {written} were written; rerun the stage")
    storage.remove_tree(draws.work)
    return Inputs(
        pool_uri=pool_uri, assign_uri=assign_uri, rejects_uri=rejects_uri, validation_uri=validation_uri, sample_uri=sample_uri, features=tuple(task.features),
        columns=tuple(columns), group_names=tuple(group_names), strata_names=tuple(codes), label_values=label_values,
        spec=spec, sizes=sizes, sampled=sample.num_rows, world_size=world, validation_rows=val.num_rows,
    )
