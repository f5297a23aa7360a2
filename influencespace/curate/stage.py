"""The ``curate`` stage: cluster scores + assignments → manifests for InfluenceSpace and comparison policies.

Outputs (docs/architecture.md): ``manifest/`` (the InfluenceSpace policy), ``policies/<name>/`` for
each comparison policy, ``cluster_decisions.parquet`` and ``summary.json`` (per policy: rows, kept,
weight sum, reasons — what train and evaluate count from). Every input id appears exactly once in
every manifest: rows the embed or cluster stage rejected are listed with ``keep = false`` and reason
``rejected: <why>`` (cluster -1), so nothing is silently dropped. Manifests are shard-aligned with the
embedded pool (layout.py): part ``part-NNNNN.parquet`` lists exactly the ids of pool shard
``part-NNNNN.parquet``, so a reader joins one pool shard with one manifest part, never the whole pool.

Memory: the stage holds the per-sample columns it needs (id, cluster, distance, image–text cosine,
duplicate score; the fused embeddings one cluster at a time for the SemDeDup scores) — about 40 bytes per row plus one
cluster's embeddings, so 1B rows need a ~40 GB driver. Cluster decisions themselves are k rows.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from influencespace import layout, storage
from influencespace.curate import policy
from influencespace.errors import InputDataError, StageStateError
from influencespace.stages import Stage, StageContext, StageResult

log = logging.getLogger(__name__)

ROWS_PER_SHARD = 1_000_000


def _read(uri: str, columns: list[str]) -> pd.DataFrame:
    return storage.read_table(uri, columns=columns).to_pandas()


def shard_parts(assignments_uri: str) -> list[tuple[str, int]]:
    """(file name, rows) of each assignment part, in the order the stage reads them (Parquet footers only)."""
    return [(uri.rsplit("/", 1)[-1], storage.parquet_rows(uri)) for uri in storage.parquet_files(assignments_uri)]


def write_manifest(frame: pd.DataFrame, directory: str, parts: list[tuple[str, int]],
                   part_rejects: dict[str, pd.DataFrame], rejected: pd.DataFrame) -> None:
    """Write a manifest shard-aligned with the pool (layout.py, "the manifest's parts").

    ``frame`` is aligned with the assignments read part by part (``parts``: name, rows); manifest part
    ``name`` holds those rows in pool order plus the rows of that pool shard the cluster stage rejected
    (``part_rejects``), so it lists exactly the ids of pool shard ``name``. Rows the embed stage rejected
    (never in the pool) go to ``rejected-NNNNN.parquet``. Each file is written atomically.
    """
    import pyarrow as pa

    schema = pa.schema([("id", pa.string()), ("cluster", pa.int32()), ("keep", pa.bool_()), ("weight", pa.float64()),
                        ("reason", pa.string())])  # one schema for every part, so the directory reads as one table

    def write(rows: pd.DataFrame, name: str) -> None:
        table = pa.Table.from_pandas(rows[policy.KEEP_COLUMNS].reset_index(drop=True), schema=schema, preserve_index=False)
        storage.write_table(table, storage.join(directory, name))

    start = 0
    for name, rows in parts:
        part = frame.iloc[start:start + rows]
        if name in part_rejects:
            part = pd.concat([part, part_rejects[name]], ignore_index=True)
        write(part, name)
        start += rows
    if start != len(frame):
        raise StageStateError(f"the manifest has {len(frame)} rows but the assignment parts {start}; rerun the cluster stage")
    for shard, begin in enumerate(range(0, len(rejected), ROWS_PER_SHARD)):
        write(rejected.iloc[begin:begin + ROWS_PER_SHARD], layout.rejected_part(shard))


def manifest_summary(frame: pd.DataFrame) -> dict:
    kept = frame[frame["keep"]]
    return {
        "rows": int(len(frame)),
        "kept": int(len(kept)),
        "removed": int(len(frame) - len(kept)),
        "keep_fraction": float(len(kept) / max(1, len(frame))),
        "weight_sum": float(kept["weight"].sum()),
        "mean_weight_kept": float(kept["weight"].mean()) if len(kept) else 0.0,
        "max_weight": float(kept["weight"].max()) if len(kept) else 0.0,
        "reasons": {str(k): int(v) for k, v in frame["reason"].value_counts().sort_index().items()},
    }


def _worst_group(ctx: StageContext) -> str | None:
    configured = ctx.config.curate.worst_group
    if configured:
        return configured
    losses = ctx.input_manifests["influence"].get("extra", {}).get("group_validation_loss") or {}
    return max(losses, key=losses.get) if losses else None


def _as_rejected(ids, reasons) -> pd.DataFrame:
    return pd.DataFrame({"id": np.asarray(ids, dtype=object), "cluster": -1, "keep": False, "weight": 0.0,
                         "reason": ("rejected: " + pd.Series(reasons, dtype=str)).to_numpy()})


def _rejected_rows(ctx: StageContext) -> pd.DataFrame:
    """Pool rows the embed stage rejected (undecodable images, …): never part of the embedded pool."""
    outputs = ctx.input_manifests["embed"].get("outputs", {})
    if "rejects" not in outputs:
        return _as_rejected([], [])
    uri = ctx.input_path("embed", "rejects")
    if not storage.list_files(uri, ".parquet", recursive=True):
        return _as_rejected([], [])
    rejects = _read(uri, ["id", "split", "reason"])
    rejects = rejects[rejects["split"] == "pool"]
    return _as_rejected(rejects["id"].to_numpy(), rejects["reason"].to_numpy())


def _cluster_rejects(ctx: StageContext) -> dict[str, pd.DataFrame]:
    """Embedded rows the cluster stage could not assign (non-finite or zero embeddings), per pool shard."""
    if "rejects" not in ctx.input_manifests["cluster"].get("outputs", {}):
        return {}
    out = {}
    for uri in storage.parquet_files(ctx.input_path("cluster", "rejects")):
        rejects = _read(uri, ["id", "reason"])
        out[uri.rsplit("/", 1)[-1]] = _as_rejected(rejects["id"].to_numpy(), rejects["reason"].to_numpy())
    return out


class CurateStage(Stage):
    name = "curate"
    inputs = ("embed", "cluster", "influence")
    section = "curate"

    def run(self, ctx: StageContext) -> StageResult:
        import pyarrow as pa

        cfg = ctx.config.curate
        assignments = _read(ctx.input_path("cluster", "assignments"), ["id", "cluster", "distance"])
        scores = storage.read_table(ctx.input_path("influence", "scores")).to_pandas()
        if assignments["id"].duplicated().any():
            dup = assignments.loc[assignments["id"].duplicated(), "id"].iloc[0]
            raise InputDataError(f"cluster assignments list id '{dup}' more than once; rerun the cluster stage")
        missing = {"cluster", "influence", "ci_low", "ci_high"} - set(scores.columns)
        if missing:
            raise StageStateError(f"influence scores lack column(s) {', '.join(sorted(missing))}; rerun the influence stage")
        rejected = _rejected_rows(ctx)
        parts = shard_parts(ctx.input_path("cluster", "assignments"))
        part_rejects = _cluster_rejects(ctx)
        unassigned = pd.concat([rejected, *part_rejects.values()], ignore_index=True)
        worst_group = _worst_group(ctx)
        log.info("curate: worst-off group for fairness: %s", worst_group or "none measured")

        signals = self._row_signals(ctx, assignments)
        row_value = None
        if cfg.row_order == "influence":
            row_value = self._row_influence(ctx, assignments, worst_group)
        elif cfg.row_order == "image_text":
            row_value = signals.get("image_text_cosine")
            if row_value is None:
                raise InputDataError("curate.row_order=image_text needs an image_text_cosine column in the embedded pool; "
                                     "use curate.row_order=influence or random")

        mismatch = None
        if cfg.mismatch_iqr is not None and cfg.row_order != "random":
            if "image_text_cosine" in signals:
                mismatch = policy.mismatch_outliers(signals["image_text_cosine"], cfg.mismatch_iqr)
            else:
                log.warning("curate: the pool has no image_text_cosine column; no image–text mismatch step")

        def curate_at(keep_fraction: float) -> tuple[dict[str, pd.DataFrame], pd.DataFrame]:
            params = policy.PolicyParams(
                keep_fraction=keep_fraction, min_weight=cfg.min_weight, max_weight=cfg.max_weight,
                fairness_weight=cfg.fairness_weight, upweight_power=cfg.upweight_power,
                min_cluster_keep=cfg.min_cluster_keep, duplicate_threshold=cfg.duplicate_threshold, seed=cfg.seed,
            )
            manifest, decisions = policy.influence_policy(
                assignments, scores, params, worst_group, row_value=row_value,
                duplicate_scores=signals.get("duplicate_scores") if cfg.row_order != "random" else None,
                mismatch=mismatch,
            )
            return {layout.CURATED: manifest, **self._comparisons(cfg, keep_fraction, assignments, signals)}, decisions

        def write_all(frames: dict[str, pd.DataFrame], directory_of) -> dict[str, dict]:
            written = {}
            for name, frame in frames.items():
                write_manifest(frame, directory_of(name), parts, part_rejects, rejected)
                written[name] = manifest_summary(pd.concat([frame, unassigned], ignore_index=True))
            return written

        manifests, decisions = curate_at(cfg.keep_fraction)
        summary: dict = {"worst_group": worst_group, "budget_rows": policy.budget_rows(len(assignments), cfg.keep_fraction)}
        summary.update(write_all(manifests, lambda n: ctx.path(layout.manifest_dir(n))))
        outputs = {layout.policy_output(n): layout.manifest_dir(n) for n in manifests}
        outputs.update({"decisions": "cluster_decisions.parquet", "summary": "summary.json"})
        # The reduction-vs-accuracy curve: the same policies at further budgets (outputs curve_<fraction>_<policy>).
        summary["curve"] = {}
        curve_fractions = [f for f in cfg.curve_keep_fractions if f != cfg.keep_fraction]
        for fraction in curve_fractions:
            label = layout.curve_label(fraction)
            frames, _ = curate_at(fraction)
            summary["curve"][label] = write_all(frames, lambda n, label=label: ctx.path(layout.curve_dir(label, n)))
            outputs.update({layout.curve_output(label, n): layout.curve_dir(label, n) for n in frames})
        storage.write_table(pa.Table.from_pandas(decisions, preserve_index=False), ctx.path("cluster_decisions.parquet"))
        storage.write_json(ctx.path("summary.json"), summary)
        ours = summary[layout.CURATED]
        return StageResult(
            counts={"rows": ours["rows"], "kept": ours["kept"], "removed": ours["removed"],
                    "rejected": int(len(unassigned)), "harmful_clusters": int((decisions["dropped_reason"] == policy.HARMFUL).sum())},
            outputs=outputs,
            extra={"worst_group": worst_group, "policies": sorted(manifests),
                   "curve_keep_fractions": curve_fractions},
        )

    def _row_influence(self, ctx: StageContext, assignments: pd.DataFrame, worst_group: str | None) -> np.ndarray:
        """Each row's own influence (+ fairness_weight × the worst-off group's), aligned with ``assignments``."""
        from influencespace.influence.scores import group_column

        if "row_scores" not in ctx.input_manifests["influence"].get("outputs", {}):
            raise StageStateError("curate.row_order=influence needs the influence stage's row pass: rerun influence with "
                                  "influence.score_rows=true, or set curate.row_order=image_text or random")
        uri = ctx.input_path("influence", "row_scores")
        available = set(storage.schema(uri).names)
        fair = group_column(worst_group) if worst_group else None
        columns = ["id", "influence"] + ([fair] if fair in available else [])
        rows = _read(uri, columns).set_index("id")
        missing = ~assignments["id"].isin(rows.index)
        if missing.any():
            raise StageStateError(f"{int(missing.sum())} assigned id(s) have no row score under {uri} "
                                  f"(first: {assignments['id'][missing].iloc[0]}); rerun the influence stage")
        rows = rows.loc[assignments["id"].to_numpy()]
        value = rows["influence"].to_numpy(dtype=np.float64)
        if fair in rows:
            value = value + ctx.config.curate.fairness_weight * rows[fair].to_numpy(dtype=np.float64)
        return value

    def _row_signals(self, ctx: StageContext, assignments: pd.DataFrame) -> dict[str, np.ndarray]:
        """Per-row signals aligned with ``assignments``: ``image_text_cosine`` (from embed, when the
        pool has it) and SemDeDup ``duplicate_scores`` (computed one cluster at a time)."""
        cfg = ctx.config.curate
        wanted = set(cfg.comparison_policies)
        need_cosine = "clipscore" in wanted or cfg.row_order == "image_text" or cfg.mismatch_iqr is not None
        use_duplicates = cfg.row_order != "random" and cfg.duplicate_threshold is not None
        need_duplicates = "dedup" in wanted or use_duplicates
        available = set(storage.schema(ctx.input_path("embed", "pool")).names)
        if "clipscore" in wanted and "image_text_cosine" not in available:
            raise InputDataError(
                "curate.comparison_policies has 'clipscore' but the embedded pool has no image_text_cosine column "
                "(embeddings brought without separate image and text vectors); remove 'clipscore' from the list"
            )
        columns = ["id"] + (["image_text_cosine"] if need_cosine and "image_text_cosine" in available else [])
        columns += ["embedding"] if need_duplicates else []
        if columns == ["id"]:
            return {}
        pool = _read(ctx.input_path("embed", "pool"), columns).set_index("id")
        pool = pool.loc[assignments["id"].to_numpy()]  # align with assignments' row order
        signals: dict[str, np.ndarray] = {}
        if "image_text_cosine" in pool:
            signals["image_text_cosine"] = pool["image_text_cosine"].to_numpy(dtype=np.float64)
        if need_duplicates:
            scores = np.zeros(len(assignments))
            embeddings = pool["embedding"].to_numpy()
            for _, index in assignments.groupby("cluster").indices.items():
                matrix = np.stack(embeddings[index]).astype(np.float32)
                scores[index] = policy.semdedup_scores(matrix, assignments["distance"].to_numpy()[index])
            signals["duplicate_scores"] = scores
        return signals

    @staticmethod
    def _comparisons(cfg, keep_fraction: float, assignments: pd.DataFrame, signals: dict[str, np.ndarray]) -> dict[str, pd.DataFrame]:
        wanted = set(cfg.comparison_policies)
        out: dict[str, pd.DataFrame] = {}
        if "random" in wanted:
            out["random"] = policy.random_policy(assignments, keep_fraction, cfg.seed)
        if "clipscore" in wanted:
            out["clipscore"] = policy.clipscore_policy(assignments, signals["image_text_cosine"], keep_fraction)
        if "dedup" in wanted:
            out["dedup"] = policy.dedup_policy(assignments, signals["duplicate_scores"], keep_fraction)
        return out
