"""Does the full policy beat its own ablations and the heuristics? Paired intervals over benchmark and training seeds.

    .venv/bin/python benchmarks/outcome.py --benchmark-seeds 1,2,3 --train-seeds 0,1,2,3,4
    .venv/bin/python benchmarks/outcome.py --benchmark-seeds 1 --train-seeds 0,1,2       # a smaller first look
    .venv/bin/python benchmarks/outcome.py --summarize-only                                # re-read finished runs

For each benchmark seed b (``data.benchmark.seed``: other images, captions and planted defects; seed 0
shaped the policy, so it is not evidence) it runs the demo pipeline once (``influencespace run demo``,
into ``<out>/benchmark-seed-<b>``; a rerun resumes where it stopped, and replaces the stages whose settings changed), with every policy curated at
keep fractions 0.8, 0.6 and 0.4 (20/40/60 % removed) and each trained with every training seed:

- ``influencespace``: the full policy, as configured;
- its ablations (``curate.ablations``: every entry of influencespace.curate.policy.ABLATIONS that changes the demo's settings — settings of the same
  policy, each also a plain configuration): ``tiers_random_order`` (the same tiers, a seeded random
  order inside them, where the default is the lowest own influence first), ``tiers_cosine_order`` (the
  lowest image–text cosine first), ``heuristics_only`` (no influence: nothing pruned or up-weighted, rows at random), ``placebo``
  (influence against a random validation direction), ``influence_only`` (no mismatch or
  near-duplicate tier, rows by their own influence), ``fixed_thresholds`` (the tiers' thresholds as
  fixed numbers, not fitted on the validation set), ``floors_protect_flagged`` (the clusters' thinning
  floors keep flagged mismatches and near-duplicates too, where by default they protect clean rows only),
  ``unbalanced`` (the same rows, the clusters' weights only: no balance toward the validation set's group
  shares; ``group_balanced`` adds that balance when ``group_balance: none`` is configured);
- the comparison policies (``curate.comparison_policies``): ``random``, ``dedup`` (SemDeDup),
  ``clipscore``, ``clipscore_dedup`` (both, as a practitioner runs them);
- ``baseline``: the full pool, the same training seeds.

It writes ``<out>/outcome.json``::

    {"budgets": {"<keep fraction>": {"<policy>": {"<metric>": {"mean", "sd", "n"},
                                                  "vs_full": {"<metric>": {"diff", "ci_low", "ci_high", "n"}}}}},
     "goals": {...}, "benchmark_seeds": [...], "train_seeds": [...], "runs": {...}}

with metrics ``accuracy_ratio_pct`` (zero-shot accuracy / the baseline's of the same seeds, %),
``worst_group_acc`` and ``eo_diff``; ``diff`` = influencespace − policy, paired by (benchmark seed,
training seed), with a 95 % bootstrap interval over those pairs (``--resamples``). For ``eo_diff``
lower is better, so ``diff`` < 0 favours influencespace there. ``goals`` says, per budget, whether
the full policy beats every other policy on accuracy ratio and worst-group accuracy with the paired
95 % lower bound above zero, and whether its EO difference is at most half the baseline's
(``eo_vs_half_baseline``: the same pairing). The last line: ``outcome_wins=W/T eo_goal=E/B`` (W of T
policy × budget × metric comparisons won by the interval, E of B budgets meeting the EO goal).

The runs are the demo's own configuration plus the overrides above (and ``--set`` ones); every
figure comes from each run's ``evaluate/summary.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

METRICS = ("accuracy_ratio_pct", "worst_group_acc", "eo_diff")
LOWER_IS_BETTER = {"eo_diff"}
FULL = "influencespace"
BASELINE = "baseline"


def measured_ablations() -> tuple[str, ...]:
    """Every ablation of the policy that changes the demo's curate settings, in the policy's order.

    Derived, not listed: an ablation that is the configured policy (``tiers_influence_order`` under
    the default ``row_order: influence``) is refused by the config, so a changed default changes the list.
    """
    from influencespace.config import load_config
    from influencespace.curate.policy import ABLATIONS as POLICY_ABLATIONS
    from influencespace.curate.policy import ablation_settings

    current = load_config("demo").curate.model_dump()
    return tuple(name for name in POLICY_ABLATIONS if ablation_settings(name, current))


ABLATIONS = measured_ablations()
COMPARISONS = ("random", "dedup", "clipscore", "clipscore_dedup")
MAIN_KEEP = 0.6
CURVE_KEEPS = (0.4, 0.8)


def run_dir_of(out: str, benchmark_seed: int) -> str:
    return os.path.join(out, f"benchmark-seed-{benchmark_seed}")


def overrides(out: str, benchmark_seed: int, train_seeds: list[int], extra: list[str]) -> list[str]:
    seeds = "[" + ",".join(str(s) for s in train_seeds) + "]"
    return [
        f"run_dir={os.path.abspath(run_dir_of(out, benchmark_seed))}",
        f"name=outcome-b{benchmark_seed}",
        f"data.benchmark.seed={benchmark_seed}",
        f"curate.keep_fraction={MAIN_KEEP}",
        "curate.curve_keep_fractions=[" + ",".join(str(k) for k in CURVE_KEEPS) + "]",
        "curate.comparison_policies=[" + ",".join(COMPARISONS) + "]",
        "curate.ablations=[" + ",".join(ABLATIONS) + "]",
        f"train.seeds={seeds}",
        f"evaluate.seeds={seeds}",
        *extra,
    ]


def run_pipeline(out: str, benchmark_seed: int, train_seeds: list[int], extra: list[str]) -> None:
    """One benchmark seed's pipeline through the CLI, exactly as a user runs it (resumes a finished stage)."""
    command = [sys.executable, "-m", "influencespace", "run", "demo", "--overwrite"]  # a changed policy replaces its stages
    for item in overrides(out, benchmark_seed, train_seeds, extra):
        command += ["--set", item]
    print(f"[outcome] benchmark seed {benchmark_seed}: {' '.join(command[1:])}", flush=True)
    started = time.perf_counter()
    subprocess.run(command, check=True)
    print(f"[outcome] benchmark seed {benchmark_seed} done in {time.perf_counter() - started:.0f} s", flush=True)


def seed_rows(summary: dict, policy: str, keep: float) -> dict[str, dict]:
    """Training seed → metrics of ``policy`` at ``keep`` in one evaluate summary: the main budget (and the
    baseline) from ``policies``, the other budgets from the ``budget_curve`` points."""
    if policy == BASELINE or keep == MAIN_KEEP:
        return (summary["policies"].get(policy) or {}).get("per_seed") or {}
    for point in summary.get("budget_curve") or []:
        if point["policy"] == policy and abs(point["keep_fraction"] - keep) < 1e-9:
            return point.get("per_seed") or {}
    return {}


def per_pair(summaries: dict[int, dict], policy: str, keep: float, metric: str) -> dict[tuple[int, int], float]:
    """(benchmark seed, training seed) → the metric of ``policy`` at ``keep`` (pairs where it was measured)."""
    values = {}
    for b, summary in summaries.items():
        for s, row in seed_rows(summary, policy, keep).items():
            value = row.get(metric)
            if value is not None and np.isfinite(value):
                values[(b, int(s))] = float(value)
    return values


def paired_interval(full: dict, other: dict, resamples: int, seed: int = 0, confidence: float = 0.95) -> dict:
    """mean(full − other) over the pairs both have, with a percentile bootstrap interval over the pairs."""
    pairs = sorted(set(full) & set(other))
    if not pairs:
        return {"diff": None, "ci_low": None, "ci_high": None, "n": 0}
    d = np.array([full[p] - other[p] for p in pairs])
    rng = np.random.default_rng(seed)
    draws = d[rng.integers(0, len(d), size=(resamples, len(d)))].mean(axis=1)
    alpha = (1 - confidence) / 2
    low, high = np.quantile(draws, [alpha, 1 - alpha])
    return {"diff": float(d.mean()), "ci_low": float(low), "ci_high": float(high), "n": len(pairs)}


def summarize(summaries: dict[int, dict], resamples: int = 10_000) -> dict:
    """The outcome layout (module docstring) from each benchmark seed's evaluate summary."""
    policies = [FULL, *ABLATIONS, *COMPARISONS, BASELINE]
    budgets: dict[str, dict] = {}
    goals: dict[str, dict] = {}
    for keep in sorted((MAIN_KEEP, *CURVE_KEEPS), reverse=True):
        table: dict[str, dict] = {}
        full = {m: per_pair(summaries, FULL, keep, m) for m in METRICS}
        for policy in policies:
            values = {m: per_pair(summaries, policy, keep, m) for m in METRICS}
            if not any(values.values()):
                continue
            entry: dict = {}
            for m, by_pair in values.items():
                v = np.array(list(by_pair.values()))
                entry[m] = {"mean": float(v.mean()) if len(v) else None,
                            "sd": float(v.std(ddof=1)) if len(v) > 1 else None, "n": int(len(v))}
            if policy != FULL:
                entry["vs_full"] = {m: paired_interval(full[m], values[m], resamples) for m in METRICS}
            table[policy] = entry
        budgets[f"{keep:.1f}"] = table
        wins = {}
        for policy, entry in table.items():
            if policy in (FULL, BASELINE):
                continue
            wins[policy] = {m: _won(entry["vs_full"][m], m) for m in ("accuracy_ratio_pct", "worst_group_acc")}
        base_eo = per_pair(summaries, BASELINE, keep, "eo_diff")
        half = {p: v / 2 for p, v in base_eo.items()}
        eo = paired_interval(full["eo_diff"], half, resamples)  # EO − EO_baseline/2: the goal holds when ci_high < 0
        goals[f"{keep:.1f}"] = {
            "beats": wins,
            "beats_all": bool(wins) and all(all(w.values()) for w in wins.values()),
            "eo_vs_half_baseline": eo,
            "eo_goal_met": eo["ci_high"] is not None and eo["ci_high"] < 0,
        }
    return {"budgets": budgets, "goals": goals, "metrics": list(METRICS),
            "lower_is_better": sorted(LOWER_IS_BETTER), "resamples": resamples}


def _won(interval: dict, metric: str) -> bool:
    """The full policy is better by the paired 95 % interval (above zero; below it for lower-is-better metrics)."""
    if interval["diff"] is None:
        return False
    return interval["ci_high"] < 0 if metric in LOWER_IS_BETTER else interval["ci_low"] > 0


def _fmt(interval: dict) -> str:
    if interval["diff"] is None:
        return "—"
    return f"{interval['diff']:+.2f} [{interval['ci_low']:+.2f},{interval['ci_high']:+.2f}]"


def print_table(outcome: dict) -> None:
    for keep, table in outcome["budgets"].items():
        removed = round(100 * (1 - float(keep)))
        print(f"\n## keep {keep} ({removed}% removed): mean ± sd over (benchmark seed, training seed) pairs; "
              "vs_full = influencespace − policy, paired, 95% bootstrap")
        print(f"{'policy':<20} {'acc ratio %':>14} {'worst group':>14} {'EO diff':>14}   "
              f"{'Δ acc ratio':>22} {'Δ worst group':>22} {'Δ EO':>22}")
        for policy, entry in table.items():
            cells = []
            for m in METRICS:
                mean, sd = entry[m]["mean"], entry[m]["sd"]
                cells.append("—" if mean is None else f"{mean:.3f} ± {sd:.3f}" if sd is not None else f"{mean:.3f}")
            deltas = [_fmt(entry["vs_full"][m]) if "vs_full" in entry else "" for m in METRICS]
            print(f"{policy:<20} {cells[0]:>14} {cells[1]:>14} {cells[2]:>14}   {deltas[0]:>22} {deltas[1]:>22} {deltas[2]:>22}")
        goal = outcome["goals"][keep]
        lost = [f"{p}:{m}" for p, w in goal["beats"].items() for m, ok in w.items() if not ok]
        print(f"beats every policy on accuracy ratio and worst group: {goal['beats_all']}"
              + (f" (not: {', '.join(lost)})" if lost else ""))
        print(f"EO ≤ half the baseline's: {goal['eo_goal_met']} (EO − baseline/2 = {_fmt(goal['eo_vs_half_baseline'])})")


def final_line(outcome: dict) -> str:
    wins = [ok for g in outcome["goals"].values() for w in g["beats"].values() for ok in w.values()]
    eo = [g["eo_goal_met"] for g in outcome["goals"].values()]
    return f"outcome_wins={sum(wins)}/{len(wins)} eo_goal={sum(eo)}/{len(eo)}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--benchmark-seeds", default="1,2,3", help="data.benchmark.seed values (default 1,2,3; not 0)")
    parser.add_argument("--train-seeds", default="0,1,2,3,4", help="train.seeds of every run (default 0,1,2,3,4)")
    parser.add_argument("--out", default="runs/outcome", help="where the runs and outcome.json go (default runs/outcome)")
    parser.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE",
                        help="a further config override for every run (repeatable)")
    parser.add_argument("--resamples", type=int, default=10_000, help="bootstrap resamples of the paired intervals")
    parser.add_argument("--summarize-only", action="store_true", help="read the finished runs under --out; run nothing")
    args = parser.parse_args(argv)
    benchmark_seeds = [int(s) for s in args.benchmark_seeds.split(",") if s != ""]
    train_seeds = [int(s) for s in args.train_seeds.split(",") if s != ""]
    if 0 in benchmark_seeds:
        print("[outcome] note: benchmark seed 0 shaped the policy; its figures are not evidence", flush=True)
    summaries = {}
    for b in benchmark_seeds:
        path = os.path.join(run_dir_of(args.out, b), "evaluate", "summary.json")
        if not args.summarize_only:
            run_pipeline(args.out, b, train_seeds, args.extra)
        if not os.path.exists(path):
            print(f"[outcome] benchmark seed {b}: no {path} yet (run without --summarize-only)", flush=True)
            continue
        with open(path) as f:
            summaries[b] = json.load(f)
    if not summaries:
        print("[outcome] no finished runs to summarize", flush=True)
        return 1
    outcome = summarize(summaries, args.resamples)
    outcome["benchmark_seeds"] = sorted(summaries)
    outcome["train_seeds"] = train_seeds
    outcome["runs"] = {str(b): run_dir_of(args.out, b) for b in summaries}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "outcome.json"), "w") as f:
        json.dump(outcome, f, indent=2)
    print_table(outcome)
    print(final_line(outcome), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
