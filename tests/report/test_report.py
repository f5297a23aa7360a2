"""The report renders from a run's artifacts, as a stage and through `influencespace report RUN_DIR`."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from influencespace.cli import main
from influencespace.evaluate.stage import EvaluateStage
from influencespace.report.build import goals
from influencespace.report.stage import ReportStage
from influencespace.stages import run_stage
from tests.train.synthetic import build_run, identity_state, random_state, write_train_outputs


def _evaluated_run(tmp_path, make_config):
    inputs = str(tmp_path / "inputs")
    run = build_run(inputs, pool=60, test=60, dim=10)
    states = {"baseline": random_state(10), "influencespace": identity_state(10), "random": random_state(10, seed=3)}
    upstream = dict(run["upstream"], train=write_train_outputs(inputs, states, {v: 3.0 for v in states}, seeds=(0, 1)))
    config = make_config("evaluate.seeds=[0, 1]")
    run_stage(config, EvaluateStage(), upstream=upstream)
    # Influence scores and curation decisions, as those stages write them.
    k = 12
    rng = np.random.default_rng(0)
    influence = rng.normal(0, 1, k)
    stderr = rng.uniform(0.1, 0.5, k)
    (tmp_path / "run" / "influence").mkdir(parents=True)
    pq.write_table(pa.table({"cluster": np.arange(k), "size": rng.integers(5, 200, k), "n_sampled": np.full(k, 8),
                             "influence": influence, "stderr": stderr, "ci_low": influence - 2 * stderr,
                             "ci_high": influence + 2 * stderr}),
                   str(tmp_path / "run" / "influence" / "cluster_scores.parquet"))
    (tmp_path / "run" / "curate").mkdir(parents=True)
    decisions = pd.DataFrame({"cluster": np.arange(k), "size": 10, "score": influence,
                              "keep_rows": np.where(influence < -0.5, 0, 10), "weight": 1.0,
                              "kept_reason": "kept", "dropped_reason": np.where(influence < -0.5, "harmful", "")})
    pq.write_table(pa.Table.from_pandas(decisions), str(tmp_path / "run" / "curate" / "cluster_decisions.parquet"))
    return config


def test_report_stage_writes_html_markdown_and_figures(tmp_path, make_config):
    config = _evaluated_run(tmp_path, make_config)
    outcome = run_stage(config, ReportStage())
    report_dir = tmp_path / "run" / "report"
    for name in ("influence_distribution", "size_vs_influence", "reduction_vs_accuracy", "group_metrics",
                 "training_loss"):
        figure = report_dir / "figures" / f"{name}.png"
        assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert outcome.manifest["outputs"][name] == f"figures/{name}.png"
    markdown = (report_dir / "report.md").read_text()
    page = (report_dir / "index.html").read_text()
    for text in ("The four metrics per policy", "Comparison with the baseline", "Curation quality", "Goals"):
        assert text in markdown and text in page
    for policy in ("baseline", "influencespace", "random"):
        assert f"| {policy} |" in markdown and f"<td>{policy}</td>" in page
    assert "mean ± sd over seeds [0, 1]" in markdown
    assert 'src="figures/group_metrics.png"' in page and "](figures/size_vs_influence.png)" in markdown


def test_cli_rebuilds_the_report_from_artifacts(tmp_path, make_config, capsys):
    _evaluated_run(tmp_path, make_config)
    assert main(["report", str(tmp_path / "run")]) == 0
    assert "index.html" in capsys.readouterr().out
    assert (tmp_path / "run" / "report" / "figures" / "influence_distribution.png").is_file()
    assert "InfluenceSpace report" in (tmp_path / "run" / "report" / "index.html").read_text()


def _entry(reduction, ratios, eo, worsts):
    """A summary entry whose means are those of its per-seed values (seeds 0, 1, 2)."""
    per_seed = {str(s): {"accuracy_ratio_pct": r, "worst_group_acc": w} for s, (r, w) in enumerate(zip(ratios, worsts, strict=True))}
    return {"volume_reduction_pct": reduction, "accuracy_ratio_pct": float(np.mean(ratios)), "eo_diff": eo,
            "worst_group_acc": float(np.mean(worsts)), "per_seed": per_seed}


def test_goals_are_checked_against_the_numbers():
    summary = {"policies": {"baseline": _entry(0, [100, 100, 100], 0.2, [0.5, 0.5, 0.5]),
                            "influencespace": _entry(40, [101, 102, 100], 0.08, [0.60, 0.62, 0.61]),
                            "random": _entry(40, [98, 98.5, 97], 0.2, [0.55, 0.56, 0.55]),
                            "dedup": _entry(40, [102, 103, 101], 0.1, [0.50, 0.51, 0.52])}}
    checked = {goal: (ok, evidence) for goal, ok, evidence in goals(summary)}
    assert checked["budget removes ≥ 30% of the pool"][0] is True
    assert checked["accuracy ratio ≥ 100%"][0] is True
    assert checked["EO difference ≤ half the baseline's"][0] is True
    ok, evidence = checked["better than every other policy on accuracy"]
    assert ok is False and "vs dedup: -1.000 [-1.000, -1.000] worse" in evidence and "vs random: +3.167" in evidence
    ok, evidence = checked["better than every other policy on worst-group accuracy"]
    assert ok is True and evidence.count("better") == 2, evidence


def test_a_margin_inside_the_seed_noise_is_a_tie_not_better():
    """0.5 points ahead on average but −1, +2, +0.5 by seed: the paired interval contains 0."""
    from influencespace.report.build import paired_verdict

    ours = _entry(40, [100, 103, 101.5], 0.1, [0.6, 0.6, 0.6])
    theirs = _entry(40, [101, 101, 101], 0.1, [0.6, 0.6, 0.6])
    word, diff, low, high = paired_verdict(ours, theirs, "accuracy_ratio_pct")
    assert word == "tie" and diff == pytest.approx(0.5) and low < 0 < high
    summary = {"policies": {"baseline": theirs, "influencespace": ours, "random": theirs}}
    assert dict((g, ok) for g, ok, _ in goals(summary))["better than every other policy on accuracy"] is False
    one_seed = {k: dict(v, per_seed={"0": v["per_seed"]["0"]}) for k, v in summary["policies"].items()}
    assert dict((g, ok) for g, ok, _ in goals({"policies": one_seed}))["better than every other policy on accuracy"] is None


def test_budget_curve_table_lists_every_point():
    from influencespace.report.build import curve_table

    assert curve_table({"budget_curve": []}) is None
    point = {"policy": "random", "keep_fraction": 0.4, "volume_reduction_pct": 60.0, "accuracy_ratio_pct": 97.5,
             "accuracy_ratio_pct_sd": 1.2, "worst_group_acc": 0.7, "eo_diff": 0.02}
    table = curve_table({"budget_curve": [point, dict(point, keep_fraction=0.8, volume_reduction_pct=20.0)]})
    assert len(table.rows) == 2 and table.rows[0][:4] == ["random", "0.40", "60.0", "97.5 ± 1.2"]


def test_cost_table_shows_each_curation_stage_and_the_ratio():
    from influencespace.report.build import cost_table

    assert cost_table({}) is None
    table = cost_table({"curation_cost": {"stage_seconds": {"embed": 40.0, "influence": 60.0}, "total_seconds": 100.0,
                                          "baseline_train_seconds": 20.0, "ratio": 5.0}})
    assert [row[0] for row in table.rows] == ["embed", "influence", "curation in all",
                                              "training the baseline once (mean over seeds)", "curation / baseline training"]
    assert table.rows[-1][1] == "5.00" and table.rows[2][1] == "100.0"


def test_the_eo_goal_needs_the_paired_bootstrap_interval_below_zero():
    summary = {"fairness_resamples": 1000, "policies": {
        "baseline": _entry(0, [100, 100, 100], 0.04, [0.5, 0.5, 0.5]),
        "influencespace": dict(_entry(40, [101, 102, 100], 0.015, [0.6, 0.6, 0.6]),
                               eo_vs_half_baseline={"diff": -0.005, "ci": [-0.03, 0.02]})}}
    checked = {goal: (ok, evidence) for goal, ok, evidence in goals(summary)}
    ok, evidence = checked["EO difference ≤ half the baseline's"]
    assert ok is False and "[-0.030, +0.020]" in evidence  # under half on the mean, not shown
    summary["policies"]["influencespace"]["eo_vs_half_baseline"] = {"diff": -0.02, "ci": [-0.03, -0.01]}
    assert {g: ok for g, ok, _ in goals(summary)}["EO difference ≤ half the baseline's"] is True
