"""The ``evaluate`` stage: score every trained variant and seed on the test split, check the curation
against the ground truth, and write ``evaluate/summary.json`` (schema in docs/evaluation.md).

Scoring runs in this process with numpy/torch: the test split is small (thousands of rows) and each
model is two projection heads over its tower embeddings — or, for ``train.target: open_clip``, a whole
open_clip model that encodes the test split's own pixels and captions (read once, through the embed
stage's plan, :func:`influencespace.train.pixels.split_pixels`). Nothing per pool row comes to the driver: the kept counts are the
curate summary's, and the ground-truth check (the built-in benchmark's planted defects) is one
distributed aggregate over every variant's manifest (:func:`curation_by_ray`: one Ray Data read of
the manifests, a hash join with the ground truth, partial sums per batch). Up to ``IN_MEMORY_ROWS``
manifest rows in all, and on ``runtime.runner: local``, it runs in memory instead
(:func:`~influencespace.evaluate.curation.curation_quality`, the reference it is tested against).
"""

from __future__ import annotations

import functools
import io
import logging
from dataclasses import replace
from typing import Any

import numpy as np

from influencespace import storage
from influencespace.errors import StageStateError
from influencespace.evaluate.curation import (
    COUNT_FIELDS,
    TRUTH_COLUMNS,
    batch_counts,
    curation_quality,
    quality_from_counts,
)
from influencespace.evaluate.metrics import bootstrap_fairness
from influencespace.evaluate.summary import (
    CURATION_STAGES,
    add_fairness_intervals,
    curation_cost,
    summarize,
    throughput,
)
from influencespace.evaluate.zero_shot import read_test, score_features, score_model
from influencespace.layout import (
    BASELINE,
    CURATED,
    REJECTED_PART_PREFIX,
    parse_curve_variant,
    summary_entry,
    variant_manifests,
)
from influencespace.stages import Stage, StageContext, StageResult, read_manifest
from influencespace.train.pixels import split_pixels
from influencespace.train.targets import target_from_record

log = logging.getLogger(__name__)

SUMMARY_FILE = "summary.json"
# Up to this many manifest rows in all (pool rows × variants) the ground-truth check runs in memory
# here (≈ 100 bytes a row: ≤ 200 MB): a Ray Data join costs minutes of start-up on a small machine
# (the demo's 13 variants × 6,000 rows: 165 s vs 1.6 s on 2 loaded cores). Above it, curation_by_ray.
IN_MEMORY_ROWS = 2_000_000


def load_state(uri: str) -> dict:
    """Trained weights; ``weights_only`` so a tampered checkpoint cannot run code."""
    import torch

    return torch.load(io.BytesIO(storage.read_bytes(uri)), map_location="cpu", weights_only=True)


class EvaluateStage(Stage):
    name = "evaluate"
    inputs = ("data", "embed", "curate", "train")
    section = "evaluate"

    def run(self, ctx: StageContext) -> StageResult:
        cfg = ctx.config.evaluate
        train = ctx.input_manifests["train"]
        trained = set(train.get("extra", {}).get("seeds", []))
        missing = [s for s in cfg.seeds if s not in trained]
        if missing:
            raise StageStateError(
                f"evaluate.seeds {list(cfg.seeds)} include seed(s) {missing} the train stage did not train "
                f"(it trained {sorted(trained)}); set train.seeds to include them and rerun train"
            )
        data_outputs = ctx.input_manifests["data"].get("outputs", {})
        classes = storage.read_json(ctx.input_path("data", "classes")) if "classes" in data_outputs else {}
        positive = tuple(cfg.positive_classes or classes.get("positive_classes") or classes.get("footwear_classes") or ()) or None
        minority = (classes.get("groups") or {}).get("minority")
        test = read_test(ctx.input_path("embed", "test"))
        target = target_from_record(train.get("extra", {}).get("target"))
        if target.kind == "open_clip":  # the trained towers encode the test split's own pixels and captions
            pixels, tokens = split_pixels(ctx.input_manifests["embed"]["stage_dir"], "test", test.ids, target.image,
                                          target.text)
            test = replace(test, pixels=pixels, tokens=tokens)
        pool_rows = sum(storage.parquet_rows(f) for f in storage.parquet_files(ctx.input_path("embed", "pool")))
        curate_summary = storage.read_json(ctx.input_path("curate", "summary"))
        manifest_keys = variant_manifests(ctx.input_manifests["curate"])
        variants = [v for v in train.get("extra", {}).get("variants", []) if v in train.get("outputs", {})]
        if BASELINE not in variants:
            raise StageStateError("the train stage recorded no baseline run; rerun train")
        curation: dict[str, dict | None] = dict.fromkeys(variants)
        if "ground_truth" in data_outputs:  # the built-in benchmark's planted defects (user data has none)
            manifests = {v: None if manifest_keys.get(v) is None else ctx.input_path("curate", manifest_keys[v])
                         for v in variants}
            distributed = ctx.config.runtime.runner == "ray" and pool_rows * len(variants) > IN_MEMORY_ROWS
            check = curation_by_ray if distributed else curation_in_memory
            curation.update(check(ctx.config.runtime, ctx.input_path("embed", "pool"),
                                  ctx.input_path("data", "ground_truth"), manifests, minority))
        runs: dict[str, dict[int, dict]] = {}
        volume: dict[str, dict] = {}
        binary: dict[str, list] = {}  # per variant, each seed's binary predictions: the fairness bootstrap
        for variant in variants:
            metrics = storage.read_json(ctx.input_path("train", variant))
            train_dir = train["stage_dir"]
            runs[variant] = {}
            for seed in cfg.seeds:
                record = metrics["runs"][str(seed)]
                model_uri = record["model"] if "://" in record["model"] or record["model"].startswith("/") \
                    else storage.join(train_dir, record["model"])
                scores, predicted = score_model(load_state(model_uri), test, positive, target)
                if predicted is not None:
                    binary.setdefault(variant, []).append(predicted)
                scores.update(train_seconds=record["train_seconds"], wall_seconds=record["wall_seconds"],
                              final_loss=record["final_loss"], steps=record["steps"], **throughput(record))
                runs[variant][seed] = scores
            key = manifest_keys.get(variant)
            # Counted by the curate stage (rows the embed stage rejected are never kept, so every kept row is a pool row).
            kept = pool_rows if key is None else int(summary_entry(curate_summary, key)["kept"])
            volume[variant] = {"pool_rows": pool_rows, "kept_rows": kept}
            log.info("evaluate %s: zero-shot accuracy %s", variant,
                     ", ".join(f"{runs[variant][s]['zero_shot_acc']:.3f}" for s in cfg.seeds))

        summary = summarize(runs, volume, curation, cfg.seeds, baseline=BASELINE)
        # The towers before any training: where the trained heads start from, for scale.
        summary["reference"] = {"frozen_towers": score_features(test.image, test.text, test.label, test.group, positive)}
        summary["test_rows"] = len(test.ids)
        summary["positive_classes"] = list(positive) if positive else None
        summary["minority_group"] = minority
        summary["step_policy"] = train.get("extra", {}).get("step_policy")
        for variant in variants:
            summary["policies"][variant]["loss_history"] = _loss_history(storage.read_json(ctx.input_path("train", variant)),
                                                                         cfg.seeds)
            summary["policies"][variant]["steps"] = train.get("extra", {}).get("steps", {}).get(variant)
        summary["budget_curve"] = budget_curve(summary["policies"], ctx.config.curate.keep_fraction)
        if test.group is not None and len(binary) == len(variants) and len(np.unique(test.group)) > 1:
            add_fairness_intervals(summary, bootstrap_fairness(
                np.isin(test.label, np.asarray(sorted(positive))).astype(int), binary, test.group,
                resamples=cfg.fairness_resamples, seed=0))
        manifests = {stage: read_manifest(ctx.config, stage) for stage in CURATION_STAGES}
        summary["curation_cost"] = curation_cost(
            {stage: (m or {}).get("seconds") for stage, m in manifests.items()},
            [runs[BASELINE][seed].get("train_seconds") for seed in cfg.seeds] if BASELINE in runs else [],
        )
        storage.write_json(ctx.path(SUMMARY_FILE), summary)
        ours = summary["policies"].get(CURATED, summary["policies"][BASELINE])
        return StageResult(
            counts={"variants": len(variants), "seeds": len(cfg.seeds), "test": len(test.ids)},
            outputs={"summary": SUMMARY_FILE},
            extra={
                "accuracy_ratio_pct": ours["accuracy_ratio_pct"],
                "volume_reduction_pct": ours["volume_reduction_pct"],
                "variants": variants,
            },
        )


def _pool_parts(manifest_uri: str) -> list[str]:
    """A manifest's parts that list pool rows (not the embed stage's rejects, which have no pool row)."""
    return [u for u in storage.list_files(manifest_uri, ".parquet")
            if not u.rsplit("/", 1)[-1].startswith(REJECTED_PART_PREFIX)]


def curation_in_memory(runtime: Any, pool_uri: str, truth_uri: str, manifests: dict[str, str | None],
                       minority: str | None) -> dict[str, dict]:
    """:func:`curation_quality` of every variant, reading the pool's ids and each manifest here (small runs)."""
    truth = storage.read_table(truth_uri).to_pandas()
    pool_ids = np.asarray(storage.read_table(pool_uri, columns=["id"]).column("id").to_pylist(), dtype=object)
    out = {}
    for variant, uri in manifests.items():
        manifest = None if uri is None else storage.read_table(uri, columns=["id", "keep", "weight"]).to_pandas()
        out[variant] = curation_quality(pool_ids, manifest, truth, minority)
    return out


def _tagged(variant_of_dir: dict[str, int], baseline: int | None, batch):
    """Pool rows of a batch of manifest rows: ``id`` (string), ``keep``, ``weight`` and the variant's
    index (from the file's directory); rows of the first manifest once more as the baseline's (``baseline``:
    its index; every row kept at weight 1)."""
    import numpy as np
    import pyarrow as pa

    directories = [p.rsplit("/", 1)[0] for p in batch.column("path").to_pylist()]
    variant = np.array([variant_of_dir[d] for d in directories], np.int32)
    out = pa.table({"id": batch.column("id").cast(pa.string()), "keep": batch.column("keep"),
                    "weight": batch.column("weight").cast(pa.float64()), "variant": variant})
    if baseline is not None:
        first = out.filter(pa.array(variant == min(variant_of_dir.values())))
        out = pa.concat_tables([out, _all_kept(first.column("id"), np.full(first.num_rows, baseline, np.int32))])
    return out


def _all_kept(ids, variant):
    """The baseline's view of some pool rows: every one kept at weight 1, tagged with its variant index."""
    import pyarrow as pa

    n = len(ids)
    return pa.table({"id": ids, "keep": pa.array([True] * n), "weight": pa.array([1.0] * n, pa.float64()),
                     "variant": pa.array(variant, pa.int32())})


def _variant_counts(minority: str | None, batch):
    """Partial :data:`COUNT_FIELDS` per variant of one joined batch (a row per variant present)."""
    import pandas as pd

    rows = [{"variant": int(v), **batch_counts(group, minority)} for v, group in batch.groupby("variant")]
    return pd.DataFrame(rows, columns=["variant", *COUNT_FIELDS])


def curation_by_ray(runtime: Any, pool_uri: str, truth_uri: str, manifests: dict[str, str | None],
                    minority: str | None) -> dict[str, dict]:
    """:func:`curation_quality` of every variant as one distributed aggregate (Ray Data).

    One read of every manifest's pool parts (``include_paths``: a row's variant is its file's
    directory); the rows of the first manifest come out once more as the baseline's, kept at weight 1
    (a manifest lists every pool row); joined with the ground truth by id (``left_outer``, a hash join
    of one partition per 1M rows); each batch sums :data:`COUNT_FIELDS` per variant, and the driver adds
    the partial sums (one row per batch and variant). Memory: one join partition per task. One read
    operator, not one per variant: Ray Data splits its resource budget between operators, and thirteen
    variants as thirteen reads took minutes on two CPUs.
    """
    import ray.data

    from influencespace.runtime import ensure_ray

    ensure_ray(runtime)
    truth_columns = [c for c in TRUTH_COLUMNS if c in storage.schema(truth_uri).names]
    with_minority = minority is not None and "group" in truth_columns
    names = list(manifests)
    parts: list[str] = []
    variant_of_dir: dict[str, int] = {}
    for index, uri in enumerate(manifests.values()):
        if uri is not None and _pool_parts(uri):
            parts += _pool_parts(uri)
            variant_of_dir[storage.resolve(uri)[1].rstrip("/")] = index
    baseline = next((i for i, uri in enumerate(manifests.values()) if uri is None), None)
    if not parts:  # only the baseline: its rows are the pool's
        parts, baseline_only = storage.parquet_files(pool_uri), True
    else:
        baseline_only = False
    sums = {variant: dict.fromkeys(COUNT_FIELDS, 0) for variant in manifests}
    if parts:
        fs, _ = storage.resolve(parts[0])
        rows = sum(storage.parquet_rows(p) for p in parts)
        if baseline is not None and not baseline_only:  # the baseline's copy of one manifest's rows
            rows += rows // len(variant_of_dir)
        paths = [storage.resolve(u)[1] for u in parts]
        if baseline_only:
            variant_of_dir = {p.rsplit("/", 1)[0]: baseline for p in paths}
            tagged = ray.data.read_parquet(paths, filesystem=fs, include_paths=True).select_columns(["id", "path"]) \
                .map_batches(functools.partial(_as_baseline, variant_of_dir), batch_format="pyarrow")
        else:
            tagged = ray.data.read_parquet(paths, filesystem=fs, include_paths=True) \
                .select_columns(["id", "keep", "weight", "path"]) \
                .map_batches(functools.partial(_tagged, variant_of_dir, baseline), batch_format="pyarrow")
        truth_fs, _ = storage.resolve(truth_uri)
        truth = ray.data.read_parquet([storage.resolve(u)[1] for u in storage.parquet_files(truth_uri)],
                                      filesystem=truth_fs).select_columns(truth_columns).map_batches(
            lambda b: b.set_column(0, "id", b.column("id").cast("string")), batch_format="pyarrow")
        joined = tagged.join(truth, join_type="left_outer", on=("id",), num_partitions=max(1, -(-rows // 1_000_000)))
        counted = joined.map_batches(functools.partial(_variant_counts, minority if with_minority else None),
                                     batch_format="pandas")
        for row in counted.iter_rows():
            total = sums[names[int(row["variant"])]]
            for field in COUNT_FIELDS:
                total[field] += row[field]
    return {variant: quality_from_counts(counts, with_minority) for variant, counts in sums.items()}


def _as_baseline(variant_of_dir: dict[str, int], batch):
    """Pool rows read as the baseline's (no manifest but the pool itself)."""
    import pyarrow as pa

    variant = [variant_of_dir[p.rsplit("/", 1)[0]] for p in batch.column("path").to_pylist()]
    return _all_kept(batch.column("id").cast(pa.string()), variant)


CURVE_FIELDS = ("volume_reduction_pct", "accuracy_ratio_pct", "worst_group_acc", "eo_diff", "dp_diff", "time_ratio")


def budget_curve(policies: dict[str, dict], keep_fraction: float) -> list[dict]:
    """Move the curve variants (``curve-keep-0.40-<policy>``) out of ``policies`` into curve points.

    One point per policy and budget, the configured ``keep_fraction`` included: ``policy``, ``keep_fraction``,
    the :data:`CURVE_FIELDS` and ``accuracy_ratio_pct_sd``; empty when no curve budgets were curated.
    """
    points = []
    for variant in list(policies):
        parsed = parse_curve_variant(variant)
        if parsed is not None:
            fraction, name = parsed
            points.append(_curve_point(name, fraction, policies.pop(variant)))
    if not points:
        return []
    for name, entry in policies.items():
        if name != BASELINE:
            points.append(_curve_point(name, keep_fraction, entry))
    return sorted(points, key=lambda p: (p["policy"], -p["keep_fraction"]))


def _curve_point(policy: str, keep_fraction: float, entry: dict) -> dict:
    """One curve point: the means, the accuracy ratio's sd and each seed's values of the same fields (what a
    paired comparison across budgets needs, benchmarks/outcome.py)."""
    point = {"policy": policy, "keep_fraction": round(keep_fraction, 4), **{k: entry.get(k) for k in CURVE_FIELDS}}
    point["accuracy_ratio_pct_sd"] = entry.get("sd", {}).get("accuracy_ratio_pct")
    point["per_seed"] = {seed: {k: row.get(k) for k in CURVE_FIELDS} for seed, row in (entry.get("per_seed") or {}).items()}
    return point


def _loss_history(metrics: dict, seeds) -> list[float]:
    """Mean training loss per epoch over the seeds (for the report's curves)."""
    histories = [[h["loss"] for h in metrics["runs"][str(s)]["history"]] for s in seeds]
    return [float(np.mean(values)) for values in zip(*histories, strict=True)]
