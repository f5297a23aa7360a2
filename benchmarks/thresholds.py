"""How well do the tiers' thresholds find the planted defects? Fixed cuts against cuts fitted on the validation set.

    .venv/bin/python benchmarks/thresholds.py runs/outcome/benchmark-seed-1 [more run dirs …]

Reads a finished run of the built-in benchmark (its embed and cluster outputs and ``data/ground_truth``,
which the pipeline never reads) and, for each rule, prints the cut it gives on that pool, how many
assigned rows it flags, and the precision and recall of the flags against the planted defects:

- near-duplicates (the SemDeDup score, curate.policy.semdedup_scores, per cluster) ≥ a fixed 0.95,
  or the threshold fitted at rate 0.05 / 0.02 / 0.01 (curate.policy.fitted_duplicate_threshold);
  truth: the row is in a planted duplicate group (a copy or its source);
- image–text mismatches: cosine below Tukey's fence at k = 1.0 / 1.5 / 2.0 on the pool, or below the
  fence fitted at rate 0.01 / 0.02 / 0.05 / 0.10 (curate.policy.validation_fence); truth: the caption
  or the image was corrupted.

The functions are the curate stage's own; only the loop over a whole (small) pool in memory is this
script's. Last line per run: ``dup_fixed_precision=… dup_fitted_precision=… mismatch_tukey_precision=…
mismatch_fitted_precision=…`` (the defaults: 0.95 and Tukey 1.5 before, rate 0.05 now).
"""

from __future__ import annotations

import argparse
import glob
import os

import numpy as np
import pandas as pd


def _read(run_dir: str, sub: str) -> pd.DataFrame:
    import pyarrow.parquet as pq

    files = sorted(glob.glob(os.path.join(run_dir, sub, "*.parquet")))
    if not files:
        raise SystemExit(f"{run_dir}: no {sub}/*.parquet (a finished run of the built-in benchmark is needed)")
    return pq.ParquetDataset(files).read().to_pandas()


def flags_quality(flag: np.ndarray, truth: np.ndarray) -> dict:
    flagged = int(flag.sum())
    return {"flagged": flagged, "precision": float(truth[flag].mean()) if flagged else float("nan"),
            "recall": float(flag[truth].mean()) if truth.any() else float("nan")}


def measure(run_dir: str, spherical: bool = True) -> list[dict]:
    from influencespace.cluster.assign import FlatSearcher, prepare_rows
    from influencespace.curate import policy

    assignments = _read(run_dir, "cluster/assignments")
    pool = _read(run_dir, "embed/pool").set_index("id").loc[assignments["id"]].reset_index()
    validation = _read(run_dir, "embed/validation")
    truth = _read(run_dir, "data/ground_truth").set_index("id").loc[pool["id"]]
    sources = set(truth["duplicate_of"].dropna())
    in_duplicate_group = (truth["duplicate_of"].notna() | truth.index.isin(sources)).to_numpy()
    corrupted = (truth["caption_corrupted"] | truth["image_corrupted"]).to_numpy()

    embedding = np.stack(pool["embedding"].to_numpy()).astype(np.float32)
    cluster = assignments["cluster"].to_numpy()
    distance = assignments["distance"].to_numpy()
    ids = assignments["id"].to_numpy()
    scores = np.zeros(len(pool))
    for _, rows in assignments.groupby("cluster").indices.items():
        scores[rows] = policy.semdedup_scores(embedding[rows], distance[rows], ids=ids[rows])
    centroids = np.load(os.path.join(run_dir, "cluster", "centroids.npy"), allow_pickle=False)
    val_rows, keep, _ = prepare_rows(np.stack(validation["embedding"].to_numpy()).astype(np.float32), spherical)
    val_cluster, _ = FlatSearcher(spherical).search(val_rows, centroids)
    neighbours = policy.validation_neighbour_cosines(val_rows, val_cluster, embedding, cluster)

    out = [{"rule": "duplicate, fixed", "setting": 0.95, "cut": 0.95, **flags_quality(scores >= 0.95, in_duplicate_group)}]
    for rate in (0.05, 0.02, 0.01):
        cut = policy.fitted_duplicate_threshold(neighbours, rate)
        out.append({"rule": "duplicate, fitted", "setting": rate, "cut": cut, **flags_quality(scores >= cut, in_duplicate_group)})
    cosine = pool["image_text_cosine"].to_numpy(dtype=np.float64)
    finite = np.sort(cosine[np.isfinite(cosine)])
    for k in (1.0, 1.5, 2.0):
        cut = policy.tukey_fence(lambda rank: float(finite[rank]), len(finite), k)
        out.append({"rule": "mismatch, Tukey", "setting": k, "cut": cut, **flags_quality(~(cosine >= cut), corrupted)})
    for rate in (0.01, 0.02, 0.05, 0.10):
        cut = policy.validation_fence(validation["image_text_cosine"].to_numpy(), rate)
        out.append({"rule": "mismatch, fitted", "setting": rate, "cut": cut, **flags_quality(~(cosine >= cut), corrupted)})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("run_dirs", nargs="+", help="finished runs of the built-in benchmark")
    args = parser.parse_args(argv)
    for run_dir in args.run_dirs:
        rows = measure(run_dir)
        print(f"\n## {run_dir}")
        print(f"{'rule':<20} {'setting':>8} {'cut':>8} {'flagged':>8} {'precision':>10} {'recall':>8}")
        for r in rows:
            print(f"{r['rule']:<20} {r['setting']:>8} {r['cut']:>8.4f} {r['flagged']:>8d} {r['precision']:>10.3f} {r['recall']:>8.3f}")
        pick = {(r["rule"], r["setting"]): r for r in rows}
        print(f"dup_fixed_precision={pick[('duplicate, fixed', 0.95)]['precision']:.3f} "
              f"dup_fitted_precision={pick[('duplicate, fitted', 0.05)]['precision']:.3f} "
              f"mismatch_tukey_precision={pick[('mismatch, Tukey', 1.5)]['precision']:.3f} "
              f"mismatch_fitted_precision={pick[('mismatch, fitted', 0.05)]['precision']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
