"""The ``curate`` stage: cluster scores + assignments → manifests for InfluenceSpace and comparison policies.

Outputs (docs/architecture.md): ``manifest/`` (the InfluenceSpace policy), ``policies/<name>/`` for
each comparison policy, ``cluster_decisions.parquet`` and ``summary.json``. Every input id appears
exactly once in every manifest: rows the embed stage rejected are listed with ``keep = false`` and
reason ``rejected: <why>`` (cluster -1), so nothing is silently dropped.

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


def write_manifest(frame: pd.DataFrame, directory: str) -> None:
    """Write a manifest sorted by id as Parquet shards (atomic per shard)."""
    import pyarrow as pa

    frame = frame.sort_values("id", kind="stable").reset_index(drop=True)
    table = pa.Table.from_pandas(frame[policy.KEEP_COLUMNS], preserve_index=False)
    for shard, start in enumerate(range(0, max(1, table.num_rows), ROWS_PER_SHARD)):
        storage.write_table(table.slice(start, ROWS_PER_SHARD), storage.join(directory, f"part-{shard:05d}.parquet"))


def manifest_summary(frame: pd.DataFrame) -> dict:
    kept = frame[frame["keep"]]
    return {
        "rows": int(len(frame)),
        "kept": int(len(kept)),
        "removed": int(len(frame) - len(kept)),
        "keep_fraction": float(len(kept) / max(1, len(frame))),
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


def _rejected_rows(ctx: StageContext) -> pd.DataFrame:
    outputs = ctx.input_manifests["embed"].get("outputs", {})
    if "rejects" not in outputs:
        return pd.DataFrame(columns=policy.KEEP_COLUMNS)
    uri = ctx.input_path("embed", "rejects")
    if not storage.list_files(uri, ".parquet", recursive=True):
        return pd.DataFrame(columns=policy.KEEP_COLUMNS)
    rejects = _read(uri, ["id", "split", "reason"])
    rejects = rejects[rejects["split"] == "pool"]
    return pd.DataFrame({
        "id": rejects["id"].to_numpy(), "cluster": -1, "keep": False, "weight": 0.0,
        "reason": ("rejected: " + rejects["reason"].astype(str)).to_numpy(),
    })


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
                full = pd.concat([frame, rejected], ignore_index=True)
                write_manifest(full, directory_of(name))
                written[name] = manifest_summary(full)
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
                    "rejected": int(len(rejected)), "harmful_clusters": int((decisions["dropped_reason"] == policy.HARMFUL).sum())},
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
