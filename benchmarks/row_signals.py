"""Which row signal separates planted noise where the row order decides? AUCs from a finished run.

    .venv/bin/python benchmarks/row_signals.py runs/demo            # a run of the built-in benchmark
    .venv/bin/python benchmarks/row_signals.py runs/demo --manifest curate/curve/keep-0.40/influencespace

Within a tier, curation removes rows lowest value first (``curate.row_order``): the row pass's own
influence (``influence``, + ``fairness_weight`` × the worst-off group's) or the image–text cosine.
Whether that order matters depends on what is left after the tiers before it: this reads the run's
manifest, the row scores, the pool's cosines, the cluster assignments and the benchmark's ground truth
(``data/ground_truth``: planted caption and image corruptions, which the pipeline never reads), and
prints, per defect and signal, the ROC AUC of "low signal ⇒ defect" (0.5 = no better than random):

- over the **rows the row order decides** (reason ``kept``, ``kept-upweighted``, ``negligible(-thinned)``,
  ``budget(-thinned)``: not removed as a mismatch, near-duplicate, harmful cluster or rejected), and
- **within clusters** there (pairs of a defective and a clean row of the same cluster; what the order
  decides when the budget thins a cluster), weighted by each cluster's number of such pairs,

with how many decided rows the policy removed by the row order (the rest of the budget went to the
tiers). Last line: ``decided_rows=… removed_by_order=… auc_influence=… auc_cosine=…
within_influence=… within_cosine=…`` (caption noise).
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import pandas as pd

from influencespace.curate.policy import BUDGET, BUDGET_THINNED, KEPT, NEGLIGIBLE, NEGLIGIBLE_THINNED, UPWEIGHTED

ORDER_DECIDES = (KEPT, UPWEIGHTED, NEGLIGIBLE, NEGLIGIBLE_THINNED, BUDGET, BUDGET_THINNED)


def auc(signal: np.ndarray, defect: np.ndarray) -> float:
    """P(signal of a defective row < signal of a clean one), ties counted half (Mann–Whitney)."""
    from sklearn.metrics import roc_auc_score

    defect = np.asarray(defect, dtype=bool)
    if defect.all() or not defect.any():
        return float("nan")
    return float(roc_auc_score(defect, -np.asarray(signal, dtype=np.float64)))


def within_cluster_auc(signal: np.ndarray, defect: np.ndarray, cluster: np.ndarray) -> float:
    """The AUC over pairs of a defective and a clean row of the same cluster (pair-weighted mean)."""
    total, weight = 0.0, 0
    for c in np.unique(cluster):
        rows = cluster == c
        pairs = int(defect[rows].sum() * (~defect[rows]).sum())
        if pairs:
            total += pairs * auc(signal[rows], defect[rows])
            weight += pairs
    return total / weight if weight else float("nan")


def load(run_dir: str, manifest: str) -> pd.DataFrame:
    from influencespace import storage

    def table(path: str, columns: list[str] | None = None) -> pd.DataFrame:
        return storage.read_table(os.path.join(run_dir, path), columns=columns).to_pandas()

    frame = table(manifest, ["id", "cluster", "keep", "reason"])
    frame = frame.merge(table("embed/pool", ["id", "image_text_cosine"]), on="id", how="left")
    frame = frame.merge(table("influence/row_scores"), on="id", how="left")
    truth = table("data/ground_truth", ["id", "caption_corrupted", "image_corrupted", "duplicate_of"])
    return frame.merge(truth, on="id", how="left")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="a finished run of the built-in benchmark (data/ground_truth, curate, influence)")
    parser.add_argument("--fairness-weight", type=float, default=1.0, help="as curate.fairness_weight")
    parser.add_argument("--manifest", default="curate/manifest", help="the manifest, relative to the run (a curve budget's too)")
    args = parser.parse_args(argv)
    if not os.path.isdir(os.path.join(args.run_dir, "data", "ground_truth")):
        parser.error(f"{args.run_dir}/data/ground_truth is missing: this needs a run of the built-in benchmark")
    frame = load(args.run_dir, args.manifest)
    decided = frame[frame["reason"].isin(ORDER_DECIDES)].reset_index(drop=True)
    removed_by_order = int((~decided["keep"]).sum())
    group_columns = [c for c in decided if c.startswith("influence_group_")]
    signals = {"influence": decided["influence"].to_numpy(), "cosine": decided["image_text_cosine"].to_numpy()}
    for column in group_columns:
        signals[f"influence + {args.fairness_weight:g} × {column.removeprefix('influence_group_')}"] = (
            decided["influence"].to_numpy() + args.fairness_weight * decided[column].to_numpy())
    rng = np.random.default_rng(0)
    signals["random"] = rng.random(len(decided))
    print(f"{args.run_dir} ({args.manifest}): {len(frame):,} rows; the row order decides among {len(decided):,} "
          f"(reasons {', '.join(ORDER_DECIDES)}), of which it removed {removed_by_order:,}")
    results: dict[tuple[str, str], tuple[float, float]] = {}
    for defect_name in ("caption_corrupted", "image_corrupted"):
        defect = decided[defect_name].fillna(False).to_numpy(dtype=bool)
        print(f"\n{defect_name}: {int(defect.sum()):,} of the decided rows")
        print(f"  {'signal':40s} {'AUC':>6s} {'within clusters':>16s}")
        for name, values in signals.items():
            ok = np.isfinite(values)
            overall = auc(values[ok], defect[ok])
            within = within_cluster_auc(values[ok], defect[ok], decided["cluster"].to_numpy()[ok])
            results[(defect_name, name)] = (overall, within)
            print(f"  {name:40s} {overall:6.3f} {within:16.3f}")
    caption = {name: results[("caption_corrupted", name)] for name in ("influence", "cosine")}
    print(f"decided_rows={len(decided)} removed_by_order={removed_by_order} "
          f"auc_influence={caption['influence'][0]:.3f} auc_cosine={caption['cosine'][0]:.3f} "
          f"within_influence={caption['influence'][1]:.3f} within_cosine={caption['cosine'][1]:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
