"""The arithmetic of ``evaluate/summary.json``: the benchmark's four metrics per policy, mean ± sd over seeds.

Per policy p and seed s (b = the baseline, trained with the same seed):

- volume_reduction_pct = (|pool| − |kept_p|) / |pool| × 100 (seed-independent)
- accuracy_ratio_pct[s] = acc_p[s] / acc_b[s] × 100 (zero-shot 10-class accuracy)
- dp_diff[s], eo_diff[s], worst_group_acc[s]: the policy's own values; bias_reduction = b − p
- time_ratio[s] = train_seconds_b[s] / train_seconds_p[s]
- deltas_vs_baseline[m] = mean_s (m_p[s] − m_b[s]), paired by seed

Means are over the seeds; ``sd`` holds the sample standard deviation (null with one seed).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np

SEED_METRICS = ("volume_reduction_pct", "accuracy_ratio_pct", "dp_diff", "eo_diff", "worst_group_acc", "time_ratio")
MODEL_METRICS = ("zero_shot_acc", "recall_at_1", "recall_at_5", "worst_group_acc", "binary_acc", "dp_diff", "eo_diff",
                 "train_seconds", "samples_per_second", "device_hours")


def throughput(record: dict) -> dict:
    """A training run's samples per second (optimizer steps × global batch over its epochs' seconds) and its
    device-hours (workers × those seconds / 3600: GPU-hours on GPU workers, CPU-worker-hours here)."""
    seconds, workers = record.get("train_seconds"), record.get("world_size")
    if not seconds or record.get("global_batch") is None:
        return {"samples_per_second": None, "device_hours": None}
    return {"samples_per_second": record["steps"] * record["global_batch"] / seconds,
            "device_hours": None if workers is None else workers * seconds / 3600.0}


def mean_sd(values: Iterable[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample sd of the values that are not None (sd None for fewer than two)."""
    present = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not present:
        return None, None
    mean = float(np.mean(present))
    return mean, (float(np.std(present, ddof=1)) if len(present) > 1 else None)


def _ratio(numerator: float | None, denominator: float | None, scale: float = 1.0) -> float | None:
    if numerator is None or denominator is None or denominator == 0:
        return None
    return scale * numerator / denominator


def _minus(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def summarize(
    runs: dict[str, dict[int, dict]],
    volume: dict[str, dict],
    curation: dict[str, dict | None],
    seeds: Iterable[int],
    baseline: str = "baseline",
) -> dict:
    """Build the summary from per-seed scores.

    ``runs[variant][seed]`` holds :func:`~influencespace.evaluate.zero_shot.score_features`' metrics plus
    ``train_seconds``; ``volume[variant]`` holds ``pool_rows`` and ``kept_rows``; ``curation[variant]``
    the ground-truth curation quality (None without ground truth).
    """
    seeds = list(seeds)
    if baseline not in runs:
        raise ValueError(f"no '{baseline}' runs to compare against; the train stage always trains it")
    base = runs[baseline]
    policies: dict[str, dict] = {}
    for variant, by_seed in runs.items():
        pool_rows, kept_rows = volume[variant]["pool_rows"], volume[variant]["kept_rows"]
        reduction = 100.0 * (pool_rows - kept_rows) / pool_rows
        per_seed: dict[str, dict] = {}
        for seed in seeds:
            mine, theirs = by_seed[seed], base[seed]
            row = {m: mine.get(m) for m in MODEL_METRICS}
            row["group_acc"] = mine.get("group_acc")
            row["volume_reduction_pct"] = reduction
            row["accuracy_ratio_pct"] = _ratio(mine["zero_shot_acc"], theirs["zero_shot_acc"], 100.0)
            row["time_ratio"] = _ratio(theirs.get("train_seconds"), mine.get("train_seconds"))
            row["deltas_vs_baseline"] = {m: _minus(mine.get(m), theirs.get(m)) for m in MODEL_METRICS}
            per_seed[str(seed)] = row

        entry: dict = {"pool_rows": pool_rows, "kept_rows": kept_rows}
        sd: dict = {}
        for metric in dict.fromkeys(SEED_METRICS + MODEL_METRICS):
            entry[metric], sd[metric] = mean_sd(per_seed[str(s)][metric] for s in seeds)
        entry["sd"] = sd
        deltas = {m: mean_sd(per_seed[str(s)]["deltas_vs_baseline"][m] for s in seeds) for m in MODEL_METRICS}
        entry["deltas_vs_baseline"] = {m: v[0] for m, v in deltas.items()}
        entry["deltas_vs_baseline_sd"] = {m: v[1] for m, v in deltas.items()}
        # BENCHMARK.md's bias metric: Bias_baseline − Bias_curated (positive: less bias than the baseline).
        entry["bias_reduction"] = {m: None if d[0] is None else 0.0 - d[0] for m, d in deltas.items() if m in ("dp_diff", "eo_diff")}
        groups = sorted({g for s in seeds for g in (per_seed[str(s)]["group_acc"] or {})})
        entry["group_acc"] = {g: mean_sd((per_seed[str(s)]["group_acc"] or {}).get(g) for s in seeds)[0] for g in groups}
        entry["curation"] = curation.get(variant)
        entry["per_seed"] = per_seed
        policies[variant] = entry
    return {"baseline": baseline, "seeds": seeds, "seed_metrics": list(SEED_METRICS), "policies": policies}


CURATION_STAGES = ("embed", "cluster", "influence", "curate")


def curation_cost(stage_seconds: dict[str, float | None], baseline_train_seconds: Iterable[float | None]) -> dict:
    """What curating cost, beside what training on the whole pool costs (issue: the time ratio alone
    leaves out the price of the curation it rewards).

    ``stage_seconds``: each curation stage's wall seconds (its manifest's ``seconds``; None when that
    stage did not run in this run directory). ``ratio`` = total curation seconds / the baseline's mean
    training seconds per run: curation pays for itself in time when the saved training time of the runs
    trained on the curated set exceeds it, i.e. when ratio < runs × (1 − 1/time_ratio)."""
    known = {k: v for k, v in stage_seconds.items() if v is not None}
    baseline, _ = mean_sd(baseline_train_seconds)
    total = float(sum(known.values())) if known else None
    return {
        "stage_seconds": dict(stage_seconds),
        "total_seconds": total,
        "baseline_train_seconds": baseline,
        "ratio": _ratio(total, baseline),
    }


def add_fairness_intervals(summary: dict, draws: dict[str, dict[str, np.ndarray]], confidence: float = 0.95) -> None:
    """Per policy, the test-set bootstrap intervals of its seed-mean DP and EO differences
    (``dp_diff_ci``, ``eo_diff_ci``), and of the paired statement the benchmark's goal makes:
    ``eo_vs_half_baseline`` = EO − EO_baseline / 2 on the same resampled test rows (the goal "EO ≤ half
    the baseline's" is shown when its upper bound is below 0). ``draws``: metrics.bootstrap_fairness."""
    from influencespace.evaluate.metrics import percentile_interval

    base = draws.get(summary["baseline"])
    for name, entry in summary["policies"].items():
        if name not in draws:
            continue
        entry["dp_diff_ci"] = list(percentile_interval(draws[name]["dp"], confidence))
        entry["eo_diff_ci"] = list(percentile_interval(draws[name]["eo"], confidence))
        if base is not None:
            entry["eo_vs_half_baseline"] = {
                "diff": float(np.mean(draws[name]["eo"] - base["eo"] / 2)),
                "ci": list(percentile_interval(draws[name]["eo"] - base["eo"] / 2, confidence)),
            }
    summary["fairness_resamples"] = int(len(next(iter(draws.values()))["eo"])) if draws else 0
