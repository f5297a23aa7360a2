"""Build ``report/index.html`` and ``report/report.md`` from a run's artifacts (no stage is re-run).

Reads ``evaluate/summary.json`` (required), and when present ``influence/cluster_scores.parquet``
(influence distribution, cluster size vs influence) and ``curate/cluster_decisions.parquet`` (what
curation did with each cluster). Figures are matplotlib PNGs under ``report/figures/``. The same
function backs the ``report`` stage and ``influencespace report RUN_DIR``.
"""

from __future__ import annotations

import html
import io
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from influencespace import storage
from influencespace.errors import StageStateError
from influencespace.layout import BASELINE, CURATED

log = logging.getLogger(__name__)

FIGURES = "figures"


@dataclass
class Table:
    title: str
    header: list[str]
    rows: list[list[str]]
    note: str = ""


@dataclass
class Report:
    title: str
    facts: list[str] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    figures: list[tuple[str, str]] = field(default_factory=list)  # (caption, relative path)
    goals: list[tuple[str, bool | None, str]] = field(default_factory=list)  # (goal, met, evidence)


# --------------------------------------------------------------------------------------------------
# Reading artifacts


def _output_uri(run_dir: str, stage: str, key: str, default: str) -> str | None:
    """An output a stage recorded in its manifest (or its default name when the manifest says nothing)."""
    stage_dir = storage.join(run_dir, stage)
    manifest_uri = storage.join(stage_dir, "_SUCCESS.json")
    relative = default
    if storage.exists(manifest_uri):
        manifest = storage.read_json(manifest_uri)
        relative = manifest.get("outputs", {}).get(key, default)
        stage_dir = manifest.get("stage_dir", stage_dir)
    uri = relative if ("://" in relative or relative.startswith("/")) else storage.join(stage_dir, relative)
    return uri if storage.exists(uri) else None


def read_summary(run_dir: str, summary_uri: str | None = None) -> dict:
    uri = summary_uri or _output_uri(run_dir, "evaluate", "summary", "summary.json")
    if uri is None:
        raise StageStateError(
            f"no evaluate/summary.json in {run_dir}; run the evaluate stage first (influencespace evaluate CONFIG)"
        )
    return storage.read_json(uri)


def _read_optional_table(run_dir: str, stage: str, key: str, default: str):
    uri = _output_uri(run_dir, stage, key, default)
    if uri is None:
        return None
    return storage.read_table(uri).to_pandas()


# --------------------------------------------------------------------------------------------------
# Formatting


def fmt(value: Any, digits: int = 3, sd: Any = None, pct: bool = False) -> str:
    if value is None:
        return "n/a"
    digits = 1 if pct else digits
    text = f"{value:.{digits}f}"
    if sd is not None:
        text += f" ± {sd:.{digits}f}"
    return text


def _policy_order(policies: dict) -> list[str]:
    first = [p for p in (BASELINE, CURATED) if p in policies]
    return first + sorted(p for p in policies if p not in first)


def seed_metrics_table(summary: dict) -> Table:
    policies = summary["policies"]
    rows = []
    for name in _policy_order(policies):
        e, sd = policies[name], policies[name].get("sd", {})
        rows.append([
            name,
            fmt(e["volume_reduction_pct"], pct=True),
            fmt(e["accuracy_ratio_pct"], sd=sd.get("accuracy_ratio_pct"), pct=True),
            fmt(e["dp_diff"], sd=sd.get("dp_diff")),
            fmt(e["eo_diff"], sd=sd.get("eo_diff")),
            fmt(e["worst_group_acc"], sd=sd.get("worst_group_acc")),
            fmt(e["time_ratio"], sd=sd.get("time_ratio"), digits=2),
        ])
    seeds = summary.get("seeds", [])
    return Table(
        "The four metrics per policy",
        ["policy", "volume reduction %", "accuracy ratio %", "DP difference", "EO difference", "worst-group accuracy",
         "time ratio"],
        rows,
        f"mean ± sd over seeds {seeds}" if len(seeds) > 1 else f"one seed ({seeds}); no spread",
    )


def comparison_table(summary: dict) -> Table:
    policies = summary["policies"]
    rows = []
    for name in _policy_order(policies):
        e = policies[name]
        d, bias = e.get("deltas_vs_baseline", {}), e.get("bias_reduction", {})
        rows.append([
            name, str(e.get("kept_rows", "")), fmt(e.get("zero_shot_acc")), fmt(e.get("recall_at_1")),
            fmt(e.get("recall_at_5")), _signed(d.get("zero_shot_acc")), _signed(d.get("worst_group_acc")),
            _signed(bias.get("dp_diff")), _signed(bias.get("eo_diff")), fmt(e.get("train_seconds"), digits=1),
            fmt(e.get("samples_per_second"), digits=0), fmt(e.get("device_hours"), digits=4),
        ])
    return Table(
        "Comparison with the baseline",
        ["policy", "rows kept", "zero-shot acc", "recall@1", "recall@5", "Δ acc", "Δ worst-group acc",
         "DP reduction", "EO reduction", "train s", "samples/s", "device-hours"],
        rows,
        "Δ = policy − baseline (paired by seed); reductions = baseline − policy (positive: less bias). "
        "recall@k: image→text over distinct captions. samples/s: optimizer steps × global batch per second of "
        "training; device-hours: workers × training time (GPU-hours on GPU workers, CPU-worker-hours here).",
    )


def curation_table(summary: dict) -> Table | None:
    policies = summary["policies"]
    if not any(policies[p].get("curation") for p in policies):
        return None
    rows = []
    for name in _policy_order(policies):
        c = policies[name].get("curation") or {}
        rows.append([
            name, fmt(c.get("noise_removed_pct"), pct=True), fmt(c.get("caption_noise_removed_pct"), pct=True),
            fmt(c.get("image_noise_removed_pct"), pct=True), fmt(c.get("duplicates_removed_pct"), pct=True),
            fmt(c.get("clean_removed_pct"), pct=True), fmt(c.get("minority_kept_pct"), pct=True),
            fmt(c.get("minority_mean_weight"), digits=2), fmt(c.get("majority_mean_weight"), digits=2),
        ])
    return Table(
        "Curation quality against the ground truth",
        ["policy", "noise removed %", "caption noise removed %", "image noise removed %", "duplicates removed %",
         "clean removed %", "minority kept %", "minority mean weight", "majority mean weight"],
        rows,
        "Planted defects of the benchmark (the pipeline never reads the ground truth).",
    )


def cost_table(summary: dict) -> Table | None:
    """What curation cost (embed, cluster, influence, curate wall seconds) beside the baseline's training."""
    cost = summary.get("curation_cost")
    if not cost or cost.get("total_seconds") is None:
        return None
    rows = [[stage, fmt(seconds, digits=1)] for stage, seconds in cost["stage_seconds"].items()]
    rows.append(["curation in all", fmt(cost["total_seconds"], digits=1)])
    rows.append(["training the baseline once (mean over seeds)", fmt(cost.get("baseline_train_seconds"), digits=1)])
    rows.append(["curation / baseline training", fmt(cost.get("ratio"), digits=2)])
    return Table(
        "What curation cost",
        ["step", "seconds"],
        rows,
        "Wall seconds of each curation stage in this run; the time ratio of the metrics table counts training alone. "
        "Curation pays for itself in time once the training time it saves over the runs trained on the curated set exceeds it.",
    )


def curve_table(summary: dict) -> Table | None:
    curve = summary.get("budget_curve") or []
    if not curve:
        return None
    rows = [[p["policy"], fmt(p["keep_fraction"], digits=2), fmt(p["volume_reduction_pct"], pct=True),
             fmt(p["accuracy_ratio_pct"], sd=p.get("accuracy_ratio_pct_sd"), pct=True), fmt(p["worst_group_acc"]),
             fmt(p["eo_diff"])] for p in curve]
    return Table(
        "Reduction vs accuracy across budgets",
        ["policy", "keep fraction", "volume reduction %", "accuracy ratio %", "worst-group accuracy", "EO difference"],
        rows,
        "Every policy curated, trained and evaluated again at each budget (curate.curve_keep_fractions), same seeds.",
    )


def _signed(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{round(value, 3) + 0.0:+.3f}"  # + 0.0 turns a rounded -0.0 into 0.0


def goals(summary: dict) -> list[tuple[str, bool | None, str]]:
    """The acceptance goals of the curation benchmark, checked against the numbers (not tuned to them)."""
    policies = summary["policies"]
    ours, base = policies.get(CURATED), policies.get(BASELINE)
    if ours is None or base is None:
        return []
    out: list[tuple[str, bool | None, str]] = []

    def check(goal: str, ok: bool | None, evidence: str) -> None:
        out.append((goal, ok, evidence))

    reduction = ours["volume_reduction_pct"]
    check("budget removes ≥ 30% of the pool", reduction >= 30.0, f"{reduction:.1f}%")
    ratio = ours["accuracy_ratio_pct"]
    check("accuracy ratio ≥ 100%", None if ratio is None else ratio >= 100.0, fmt(ratio, pct=True) + "%")
    eo, eo_base = ours["eo_diff"], base["eo_diff"]
    paired = ours.get("eo_vs_half_baseline")
    if paired:  # the test-set bootstrap: shown only when EO − EO_baseline/2 is below 0 with 95% confidence
        low, high = paired["ci"]
        check("EO difference ≤ half the baseline's", high < 0,
              f"{fmt(eo)} vs baseline {fmt(eo_base)}; EO − baseline/2 = {_signed(paired['diff'])} [{_signed(low)}, {_signed(high)}] "
              f"(test-set bootstrap, {summary.get('fairness_resamples', 0)} resamples)")
    else:
        check("EO difference ≤ half the baseline's", None if eo is None or eo_base is None else eo <= eo_base / 2,
              f"{fmt(eo)} vs baseline {fmt(eo_base)} (no interval)")
    others = [p for p in policies if p not in (BASELINE, CURATED)]
    for metric, label in (("accuracy_ratio_pct", "accuracy"), ("worst_group_acc", "worst-group accuracy")):
        goal = f"better than every other policy on {label}"
        if not others:
            check(goal, None, "no other policies (curate.comparison_policies, curate.ablations)")
            continue
        verdicts = {p: paired_verdict(ours, policies[p], metric) for p in others}
        if any(v is None for v in verdicts.values()):
            check(goal, None, "needs every policy's metric on ≥ 2 shared training seeds (evaluate.seeds) for a paired interval")
            continue
        ok = all(v[0] == "better" for v in verdicts.values())
        check(goal, ok, "; ".join(f"vs {p}: {_signed(d)} [{_signed(lo)}, {_signed(hi)}] {word}"
                                  for p, (word, d, lo, hi) in verdicts.items()))
    return out


def paired_verdict(ours: dict, theirs: dict, metric: str, confidence: float = 0.95) -> tuple[str, float, float, float] | None:
    """("better" | "tie" | "worse", mean difference, low, high) of ours − theirs on ``metric``, paired by seed.

    Both policies are trained with the same seeds, so the differences d_s = ours_s − theirs_s share the
    seed's noise and are what to test: the interval is mean(d) ± t_{n−1} · sd(d)/√n (with 3 to 5 seeds
    a bootstrap of the d_s would be too coarse). "better" only when the interval lies above 0, "worse"
    when below, "tie" otherwise. None when fewer than 2 seeds have the metric for both."""
    from scipy import stats

    mine, other = ours.get("per_seed") or {}, theirs.get("per_seed") or {}
    diffs = [mine[s][metric] - other[s][metric] for s in sorted(set(mine) & set(other))
             if mine[s].get(metric) is not None and other[s].get(metric) is not None]
    if len(diffs) < 2:
        return None
    d = np.asarray(diffs, dtype=np.float64)
    half = stats.t.ppf((1 + confidence) / 2, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))
    low, high = d.mean() - half, d.mean() + half
    word = "better" if low > 0 else ("worse" if high < 0 else "tie")
    return word, float(d.mean()), float(low), float(high)


# --------------------------------------------------------------------------------------------------
# Figures


def _save(fig, out_dir: str, name: str) -> str:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    relative = f"{FIGURES}/{name}"
    storage.write_bytes(storage.join(out_dir, relative), buffer.getvalue())
    return relative


def _finish(fig, ax, out_dir: str, name: str, caption: str, *, xlabel: str, ylabel: str, title: str,
            reference: tuple[float, str] | None = None, legend: bool = False) -> tuple[str, str]:
    """Label one single-axes figure (a grey reference line at y, with its line style, if given), save it,
    and return (caption, relative path) for the report."""
    if reference is not None:
        ax.axhline(reference[0], color="grey", lw=0.8, ls=reference[1])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if legend:
        ax.legend(fontsize=8)
    return caption, _save(fig, out_dir, name)


def _decision_labels(scores, decisions) -> np.ndarray | None:
    if decisions is None or not {"cluster", "keep_rows"} <= set(decisions.columns):
        return None
    by_cluster = decisions.set_index("cluster")
    labels = []
    for cluster in scores["cluster"]:
        if cluster not in by_cluster.index:
            labels.append("unknown")
            continue
        row = by_cluster.loc[cluster]
        if row["keep_rows"] == 0:
            labels.append(f"dropped: {row.get('dropped_reason', '') or 'pruned'}")
        else:
            labels.append(str(row.get("kept_reason", "kept") or "kept"))
    return np.asarray(labels, dtype=object)


def influence_figures(scores, decisions, out_dir: str) -> list[tuple[str, str]]:
    import matplotlib.pyplot as plt

    figures = []
    ordered = scores.sort_values("influence").reset_index(drop=True)
    fig, ax = plt.subplots(figsize=(8, 3.6))
    x = np.arange(len(ordered))
    influence = ordered["influence"].to_numpy(float)
    if {"ci_low", "ci_high"} <= set(ordered.columns):
        low = influence - ordered["ci_low"].to_numpy(float)
        high = ordered["ci_high"].to_numpy(float) - influence
        ax.errorbar(x, influence, yerr=np.vstack([low, high]), fmt="o", ms=3, lw=0.8, capsize=1.5)
    else:
        ax.plot(x, influence, "o", ms=3)
    figures.append(_finish(fig, ax, out_dir, "influence_distribution.png",
                           "Influence per cluster, sorted, with its confidence interval.",
                           xlabel="cluster (sorted by influence)", ylabel="influence (> 0: helpful)",
                           title="Per-cluster influence with confidence intervals", reference=(0.0, "-")))

    fig, ax = plt.subplots(figsize=(6, 4))
    labels = _decision_labels(scores, decisions)
    size = scores["size"].to_numpy(float)
    yerr = scores["stderr"].to_numpy(float) if "stderr" in scores else None
    if labels is None:
        ax.errorbar(size, scores["influence"], yerr=yerr, fmt="o", ms=4, lw=0.8)
    else:
        for label in sorted(set(labels)):
            mask = labels == label
            ax.errorbar(size[mask], scores["influence"].to_numpy(float)[mask],
                        yerr=None if yerr is None else yerr[mask], fmt="o", ms=4, lw=0.8, label=label)
        ax.legend(fontsize=7)
    ax.set_xscale("log")
    figures.append(_finish(fig, ax, out_dir, "size_vs_influence.png",
                           "Cluster size against influence (± standard error), coloured by the curation decision.",
                           xlabel="cluster size", ylabel="influence ± stderr", title="Cluster size vs influence",
                           reference=(0.0, "-")))
    return figures


def summary_figures(summary: dict, out_dir: str) -> list[tuple[str, str]]:
    import matplotlib.pyplot as plt

    policies = summary["policies"]
    names = _policy_order(policies)
    figures = []

    fig, ax = plt.subplots(figsize=(6, 4))
    curve = summary.get("budget_curve")
    if curve:  # several budgets: one line per policy
        for name in sorted({p["policy"] for p in curve}):
            points = sorted((p for p in curve if p["policy"] == name), key=lambda p: p["volume_reduction_pct"])
            ax.errorbar([p["volume_reduction_pct"] for p in points], [p["accuracy_ratio_pct"] for p in points],
                        yerr=[p.get("accuracy_ratio_pct_sd") or 0.0 for p in points], marker="o", label=name)
    else:
        for name in names:
            e = policies[name]
            if e["accuracy_ratio_pct"] is None:
                continue
            ax.errorbar([e["volume_reduction_pct"]], [e["accuracy_ratio_pct"]],
                        yerr=[e.get("sd", {}).get("accuracy_ratio_pct") or 0.0], fmt="o", capsize=3, label=name)
    figures.append(_finish(fig, ax, out_dir, "reduction_vs_accuracy.png",
                           "Data removed against accuracy kept (mean ± sd over seeds).",
                           xlabel="data volume reduction (%)", ylabel="accuracy relative to baseline (%)",
                           title="Reduction vs accuracy" + (" across budgets" if curve else " at the configured budget"),
                           reference=(100.0, "--"), legend=True))

    groups = sorted({g for n in names for g in (policies[n].get("group_acc") or {})})
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    width = 0.8 / max(1, len(groups))
    x = np.arange(len(names))
    for i, group in enumerate(groups):
        values = [(policies[n].get("group_acc") or {}).get(group) or 0.0 for n in names]
        left.bar(x + i * width - 0.4 + width / 2, values, width, label=group)
    left.set_xticks(x, names, rotation=20, fontsize=8)
    left.set_ylabel("zero-shot accuracy")
    left.set_title("Accuracy per group")
    if groups:
        left.legend(fontsize=8)
    for i, (metric, label) in enumerate((("dp_diff", "DP difference"), ("eo_diff", "EO difference"))):
        values = [policies[n].get(metric) or 0.0 for n in names]
        errors = [policies[n].get("sd", {}).get(metric) or 0.0 for n in names]
        right.bar(x + i * 0.4 - 0.2, values, 0.4, yerr=errors, label=label)
    right.set_xticks(x, names, rotation=20, fontsize=8)
    right.set_title("Fairness gaps (binary task, lower is fairer)")
    right.legend(fontsize=8)
    figures.append(("Per-group accuracy, and demographic-parity / equal-opportunity differences.",
                    _save(fig, out_dir, "group_metrics.png")))

    if any(policies[n].get("loss_history") for n in names):
        fig, ax = plt.subplots(figsize=(6, 3.6))
        for name in names:
            history = policies[name].get("loss_history") or []
            ax.plot(np.arange(1, len(history) + 1), history, marker="o", label=name)
        figures.append(_finish(fig, ax, out_dir, "training_loss.png", "Contrastive training loss per epoch.",
                               xlabel="epoch", ylabel="training loss (mean over seeds)", title="Training loss",
                               legend=True))
    return figures


# --------------------------------------------------------------------------------------------------
# Rendering


def render_markdown(report: Report) -> str:
    lines = [f"# {report.title}", ""]
    lines += [f"- {fact}" for fact in report.facts] + [""]
    if report.goals:
        lines += ["## Goals of the benchmark", "", "| goal | met | evidence |", "|---|---|---|"]
        lines += [f"| {g} | {_met(ok)} | {ev} |" for g, ok, ev in report.goals] + [""]
    for table in report.tables:
        lines += [f"## {table.title}", "", "| " + " | ".join(table.header) + " |",
                  "|" + "---|" * len(table.header)]
        lines += ["| " + " | ".join(row) + " |" for row in table.rows]
        lines += ["", f"*{table.note}*" if table.note else "", ""]
    if report.figures:
        lines += ["## Figures", ""]
        for caption, path in report.figures:
            lines += [f"![{caption}]({path})", "", caption, ""]
    return "\n".join(lines).rstrip() + "\n"


def _met(ok: bool | None) -> str:
    return "n/a" if ok is None else ("yes" if ok else "no")


def render_html(report: Report) -> str:
    e = html.escape
    parts = [
        "<!DOCTYPE html>", "<html lang=\"en\"><head><meta charset=\"utf-8\">", f"<title>{e(report.title)}</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse;margin:1em 0}th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}"
        "th:first-child,td:first-child{text-align:left}.note{color:#555;font-size:90%}"
        "figure{margin:1.5em 0}img{max-width:100%}</style>",
        "</head><body>", f"<h1>{e(report.title)}</h1>", "<ul>",
    ]
    parts += [f"<li>{e(fact)}</li>" for fact in report.facts]
    parts.append("</ul>")
    if report.goals:
        parts += ["<h2>Goals of the benchmark</h2>", "<table><tr><th>goal</th><th>met</th><th>evidence</th></tr>"]
        parts += [f"<tr><td>{e(g)}</td><td>{_met(ok)}</td><td>{e(ev)}</td></tr>" for g, ok, ev in report.goals]
        parts.append("</table>")
    for table in report.tables:
        parts += [f"<h2>{e(table.title)}</h2>", "<table>",
                  "<tr>" + "".join(f"<th>{e(h)}</th>" for h in table.header) + "</tr>"]
        parts += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in table.rows]
        parts.append("</table>")
        if table.note:
            parts.append(f"<p class=\"note\">{e(table.note)}</p>")
    if report.figures:
        parts.append("<h2>Figures</h2>")
        for caption, path in report.figures:
            parts.append(f"<figure><img src=\"{e(path)}\" alt=\"{e(caption)}\"><figcaption>{e(caption)}</figcaption></figure>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def build_report(run_dir: str, out_dir: str | None = None, summary_uri: str | None = None) -> dict[str, str]:
    """Write the report of ``run_dir`` into ``out_dir`` (default ``<run_dir>/report``); return its files.

    ``summary_uri`` overrides where ``evaluate/summary.json`` is read from (default: what the evaluate
    stage's manifest in ``run_dir`` records).
    """
    import matplotlib

    matplotlib.use("Agg")  # files only; never a display
    out_dir = out_dir or storage.join(run_dir, "report")
    summary = read_summary(run_dir, summary_uri)
    scores = _read_optional_table(run_dir, "influence", "scores", "cluster_scores.parquet")
    decisions = _read_optional_table(run_dir, "curate", "decisions", "cluster_decisions.parquet")

    policies = summary["policies"]
    report = Report(title="InfluenceSpace report")
    report.facts = [
        f"run directory: {run_dir}",
        f"policies: {', '.join(_policy_order(policies))}",
        f"seeds: {summary.get('seeds')}; step policy: {summary.get('step_policy') or 'n/a'}",
        f"test rows: {summary.get('test_rows', 'n/a')}; binary task positives: {summary.get('positive_classes')}; "
        f"minority group: {summary.get('minority_group')}",
    ]
    frozen = (summary.get("reference") or {}).get("frozen_towers")
    if frozen:
        report.facts.append(f"frozen towers before any training: zero-shot accuracy {fmt(frozen.get('zero_shot_acc'))}")
    if scores is not None:
        report.facts.append(f"clusters scored by the influence stage: {len(scores)}")
    report.goals = goals(summary)
    report.tables = [seed_metrics_table(summary), comparison_table(summary)]
    for extra in (cost_table(summary), curation_table(summary), curve_table(summary)):
        if extra is not None:
            report.tables.append(extra)
    if scores is not None and {"cluster", "size", "influence"} <= set(scores.columns) and len(scores):
        report.figures += influence_figures(scores, decisions, out_dir)
    report.figures += summary_figures(summary, out_dir)

    files = {"index": storage.join(out_dir, "index.html"), "markdown": storage.join(out_dir, "report.md")}
    storage.write_bytes(files["markdown"], render_markdown(report).encode())
    storage.write_bytes(files["index"], render_html(report).encode())
    files.update({path.rsplit("/", 1)[-1].removesuffix(".png"): storage.join(out_dir, path) for _, path in report.figures})
    log.info("report written to %s", files["index"])
    return files
