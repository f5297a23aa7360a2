"""benchmarks/outcome.py: its paired intervals, goals and layout against hand-made evaluate summaries."""

import numpy as np
import pytest

from benchmarks import outcome


def _summaries(effect: dict[str, float], benchmark_seeds=(1, 2), train_seeds=(0, 1, 2, 3), noise=0.1):
    """evaluate/summary.json-shaped dicts: every policy at every budget, metric = base + effect[policy] + noise."""
    rng = np.random.default_rng(0)
    out = {}
    for b in benchmark_seeds:
        policies, curve = {}, []
        for policy in [outcome.FULL, *outcome.ABLATIONS, *outcome.COMPARISONS, outcome.BASELINE]:
            for keep in (outcome.MAIN_KEEP, *outcome.CURVE_KEEPS):
                per_seed = {}
                for s in train_seeds:
                    shift = effect.get(policy, 0.0)
                    per_seed[str(s)] = {"accuracy_ratio_pct": 100 + shift + noise * rng.normal(),
                                        "worst_group_acc": 0.8 + shift / 100 + noise / 100 * rng.normal(),
                                        "eo_diff": 0.02 if policy == outcome.BASELINE else 0.005 + abs(noise / 100 * rng.normal())}
                if policy == outcome.BASELINE or keep == outcome.MAIN_KEEP:
                    policies[policy] = {"per_seed": per_seed}
                if policy != outcome.BASELINE:  # evaluate's curve points: every budget, the main one too
                    curve.append({"policy": policy, "keep_fraction": keep, "per_seed": per_seed})
        out[b] = {"policies": policies, "budget_curve": curve}
    return out


def test_paired_interval_of_a_constant_difference_is_that_difference():
    full = {(1, s): 10.0 + s for s in range(5)}
    other = {(1, s): 8.0 + s for s in range(5)}
    got = outcome.paired_interval(full, other, resamples=500)
    assert got == {"diff": 2.0, "ci_low": 2.0, "ci_high": 2.0, "n": 5}  # pairing removes the seed effect entirely
    assert outcome.paired_interval(full, {(2, 0): 1.0}, resamples=10)["n"] == 0  # no common pair: nothing claimed


def test_the_full_policy_wins_only_where_the_paired_interval_excludes_zero():
    effect = {outcome.FULL: 1.0, "random": -2.0}  # full +1 over everyone; random a further 2 behind
    result = outcome.summarize(_summaries(effect), resamples=2000)
    assert set(result["budgets"]) == {"0.8", "0.6", "0.4"}
    table = result["budgets"]["0.6"]
    assert set(table) == {outcome.FULL, *outcome.ABLATIONS, *outcome.COMPARISONS, outcome.BASELINE}
    versus_random = table["random"]["vs_full"]["accuracy_ratio_pct"]
    assert versus_random["n"] == 8 and versus_random["diff"] == pytest.approx(3.0, abs=0.15)
    assert versus_random["ci_low"] < versus_random["diff"] < versus_random["ci_high"]
    assert "vs_full" not in table[outcome.FULL] and table[outcome.FULL]["accuracy_ratio_pct"]["n"] == 8
    goal = result["goals"]["0.6"]
    assert goal["beats_all"], goal["beats"]
    assert goal["eo_goal_met"]  # 0.005 + |noise| vs half of 0.02
    comparisons = len(outcome.ABLATIONS + outcome.COMPARISONS) * 2 * 3  # policies × (accuracy, worst group) × budgets
    assert outcome.final_line(result) == f"outcome_wins={comparisons}/{comparisons} eo_goal=3/3"


def test_a_tie_is_not_a_win():
    result = outcome.summarize(_summaries({}), resamples=2000)  # every policy the same in distribution
    for keep, goal in result["goals"].items():
        assert not goal["beats_all"], (keep, goal["beats"])
        tie = result["budgets"][keep]["dedup"]["vs_full"]["accuracy_ratio_pct"]
        assert tie["ci_low"] < 0 < tie["ci_high"], tie


def test_the_runs_are_the_demo_with_every_policy_and_ablation_at_three_budgets():
    from influencespace.config import load_config

    config = load_config("demo", outcome.overrides("/tmp/outcome-test", 2, [0, 1], ["train.epochs=1"]))
    assert config.data.benchmark.seed == 2 and config.train.epochs == 1
    assert set(config.curate.ablations) == set(outcome.ABLATIONS)
    assert set(config.curate.comparison_policies) == set(outcome.COMPARISONS)
    assert sorted([config.curate.keep_fraction, *config.curate.curve_keep_fractions]) == [0.4, 0.6, 0.8]
    assert config.train.seeds == (0, 1) and config.evaluate.seeds == (0, 1)


def test_outcome_pair_compares_a_policy_of_one_run_with_every_policy_of_another():
    from benchmarks import outcome_pair

    others = _summaries({outcome.FULL: 0.0})
    mine = _summaries({outcome.FULL: 2.0})  # the same pools re-curated: its full policy 2 points up
    text = outcome_pair.table(mine, outcome.FULL, others, "accuracy_ratio_pct", "before")
    rows = {line.split(" | ")[0].strip("| *"): line for line in text.splitlines()[2:]}
    assert set(rows) == {outcome.FULL, "before", *outcome.ABLATIONS, "random", "SemDeDup", "CLIPScore",
                         "CLIPScore + SemDeDup", "baseline (full pool)"}
    assert "**+2.0" in rows["before"] and "**+2.0" in rows["random"]  # every other policy is 2 behind, by the interval
