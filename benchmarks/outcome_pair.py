"""One policy of an outcome run against every policy of another, paired by (benchmark seed, training seed).

    .venv/bin/python benchmarks/outcome_pair.py runs/outcome-shapes-order tiers_influence_order runs/outcome-shapes \
        --benchmark-seeds 1,2,3 [--metric worst_group_acc]

For a policy curated in a second run over the same pools (say a re-curation with one more ablation,
the stages before curate resumed unchanged): training is deterministic given the manifest, so the
rows of the two runs pair exactly. Prints a markdown table: each policy of ``other_dir`` with its mean
± sd and Δ = ``policy`` (of ``dir``) − that policy, with the paired 95 % bootstrap interval of
benchmarks/outcome.py (bold where it excludes zero). The full policy of ``other_dir`` is labelled
``--full-label``.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np

try:  # imported as benchmarks.outcome_pair (the tests)
    from benchmarks import outcome
except ImportError:  # run as a script: benchmarks/ is on sys.path
    import outcome

NAMES = {"dedup": "SemDeDup", "clipscore": "CLIPScore", "clipscore_dedup": "CLIPScore + SemDeDup", outcome.BASELINE: "baseline (full pool)"}


def load(run_root: str, seeds: list[int]) -> dict[int, dict]:
    summaries = {}
    for b in seeds:
        with open(os.path.join(run_root, f"benchmark-seed-{b}", "evaluate", "summary.json")) as f:
            summaries[b] = json.load(f)
    return summaries


def table(mine: dict, policy: str, others: dict, metric: str, full_label: str, resamples: int = 10_000) -> str:
    keeps = sorted((outcome.MAIN_KEEP, *outcome.CURVE_KEEPS), reverse=True)
    ratio = metric == "accuracy_ratio_pct"

    def value(v: float) -> str:
        return f"{v:.1f}" if ratio else f"{v:.3f}"

    def delta(v: float) -> str:
        return (f"{v:+.2f}" if ratio else f"{v:+.3f}").replace("-", "−")

    lines = ["| policy | " + " | ".join(f"{round(100 * (1 - k))}% removed | Δ" for k in keeps) + " |",
             "|---|" + "---|---|" * len(keeps)]
    ours = {k: outcome.per_pair(mine, policy, k, metric) for k in keeps}
    cells = []
    for k in keeps:
        v = np.array(list(ours[k].values()))
        cells += [f"{value(v.mean())} ± {value(v.std(ddof=1))}", ""]
    lines.append(f"| **{policy}** | " + " | ".join(cells) + " |")
    for other in [outcome.FULL, *outcome.ABLATIONS, *outcome.COMPARISONS, outcome.BASELINE]:
        cells = []
        for k in keeps:
            theirs = outcome.per_pair(others, other, k, metric)
            if not theirs:
                cells += ["—", ""]
                continue
            v = np.array(list(theirs.values()))
            cells.append(value(v.mean()) if other == outcome.BASELINE and ratio else f"{value(v.mean())} ± {value(v.std(ddof=1))}")
            iv = outcome.paired_interval(ours[k], theirs, resamples)
            text = f"{delta(iv['diff'])} [{delta(iv['ci_low'])}, {delta(iv['ci_high'])}]"
            cells.append(f"**{text}**" if iv["ci_low"] > 0 or iv["ci_high"] < 0 else text)
        if any(c not in ("—", "") for c in cells):
            lines.append(f"| {full_label if other == outcome.FULL else NAMES.get(other, other)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("dir", help="the outcome run directory holding POLICY")
    parser.add_argument("policy", help="the policy to compare (a name in that run's evaluate summaries)")
    parser.add_argument("other_dir", help="the outcome run directory whose policies it is compared with")
    parser.add_argument("--benchmark-seeds", default="1,2,3")
    parser.add_argument("--metric", default="accuracy_ratio_pct", choices=outcome.METRICS)
    parser.add_argument("--full-label", default=outcome.FULL, help="how to name other_dir's full policy in the table")
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.benchmark_seeds.split(",") if s]
    print(table(load(args.dir, seeds), args.policy, load(args.other_dir, seeds), args.metric, args.full_label))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
