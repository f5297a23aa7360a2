"""The ``evaluate`` stage: score every trained variant and seed on the test split, check the curation
against the ground truth, and write ``evaluate/summary.json`` (schema in docs/evaluation.md).

Evaluation runs in this process with numpy/torch: the test split is small (thousands of rows) and each
model is two projection heads, so Ray would only add start-up time.
"""

from __future__ import annotations

import io
import logging

import numpy as np

from influencespace import storage
from influencespace.errors import StageStateError
from influencespace.evaluate.curation import curation_quality
from influencespace.evaluate.summary import summarize
from influencespace.evaluate.zero_shot import read_test, score_features, score_model
from influencespace.layout import BASELINE, CURATED, parse_curve_variant, summary_entry, variant_manifests
from influencespace.stages import Stage, StageContext, StageResult

log = logging.getLogger(__name__)

SUMMARY_FILE = "summary.json"


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
        positive = tuple(cfg.positive_classes or classes.get("footwear_classes") or ()) or None
        minority = (classes.get("groups") or {}).get("minority")
        test = read_test(ctx.input_path("embed", "test"))
        pool_rows = sum(storage.parquet_rows(f) for f in storage.parquet_files(ctx.input_path("embed", "pool")))
        curate_summary = storage.read_json(ctx.input_path("curate", "summary"))
        ground_truth = pool_ids = None
        if "ground_truth" in data_outputs:
            # The built-in benchmark's planted defects (thousands of rows; user data has none).
            ground_truth = storage.read_table(ctx.input_path("data", "ground_truth")).to_pandas()
            pool_ids = np.asarray(storage.read_table(ctx.input_path("embed", "pool"), columns=["id"]).column("id")
                                  .to_pylist(), dtype=object)
        manifest_keys = variant_manifests(ctx.input_manifests["curate"])

        variants = [v for v in train.get("extra", {}).get("variants", []) if v in train.get("outputs", {})]
        if BASELINE not in variants:
            raise StageStateError("the train stage recorded no baseline run; rerun train")
        runs: dict[str, dict[int, dict]] = {}
        volume: dict[str, dict] = {}
        curation: dict[str, dict | None] = {}
        for variant in variants:
            metrics = storage.read_json(ctx.input_path("train", variant))
            train_dir = train["stage_dir"]
            runs[variant] = {}
            for seed in cfg.seeds:
                record = metrics["runs"][str(seed)]
                model_uri = record["model"] if "://" in record["model"] or record["model"].startswith("/") \
                    else storage.join(train_dir, record["model"])
                scores = score_model(load_state(model_uri), test, positive)
                scores.update(train_seconds=record["train_seconds"], wall_seconds=record["wall_seconds"],
                              final_loss=record["final_loss"], steps=record["steps"])
                runs[variant][seed] = scores
            key = manifest_keys.get(variant)
            # Counted by the curate stage (rows the embed stage rejected are never kept, so every kept row is a pool row).
            kept = pool_rows if key is None else int(summary_entry(curate_summary, key)["kept"])
            volume[variant] = {"pool_rows": pool_rows, "kept_rows": kept}
            curation[variant] = None
            if ground_truth is not None:
                manifest = None if key is None else storage.read_table(
                    ctx.input_path("curate", key), columns=["id", "keep", "weight"]).to_pandas()
                curation[variant] = curation_quality(pool_ids, manifest, ground_truth, minority)
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
    point = {"policy": policy, "keep_fraction": round(keep_fraction, 4), **{k: entry.get(k) for k in CURVE_FIELDS}}
    point["accuracy_ratio_pct_sd"] = entry.get("sd", {}).get("accuracy_ratio_pct")
    return point


def _loss_history(metrics: dict, seeds) -> list[float]:
    """Mean training loss per epoch over the seeds (for the report's curves)."""
    histories = [[h["loss"] for h in metrics["runs"][str(s)]["history"]] for s in seeds]
    return [float(np.mean(values)) for values in zip(*histories, strict=True)]
