"""What does each policy keep of the planted defects? Shares of the kept training mass, per policy and budget.

    .venv/bin/python benchmarks/kept_defects.py runs/pixels [more run dirs …]

Reads a finished run of the built-in benchmark: every manifest the curate stage wrote (the configured
policy, the comparison policies and ablations, every budget of the curve) and ``data/ground_truth``,
which the pipeline never reads. For each manifest it prints the kept rows and, as shares of the kept
training mass Σ weight (what training sees: a row of weight 2 counts twice), the rows with a
systematically swapped caption, a random caption, a corrupted image, a near-duplicate copy, and the
minority style. The pool's own shares are the ``pool`` row.

Last line per run: ``swap_kept_<policy>=…`` for the configured policy and ``clipscore_dedup`` at the
main budget (when curated).
"""

from __future__ import annotations

import argparse
import glob
import os

import pandas as pd

from influencespace import layout, storage

MAIN = "main"


def manifests(run_dir: str) -> dict[tuple[str, str], str]:
    """(budget label, policy) → manifest directory, for every manifest the curate stage wrote."""
    curate = os.path.join(run_dir, "curate")
    found = {(MAIN, layout.CURATED): os.path.join(curate, layout.manifest_dir(layout.CURATED))}
    for path in sorted(glob.glob(os.path.join(curate, layout.POLICIES_DIR, "*"))):
        found[(MAIN, os.path.basename(path))] = path
    for path in sorted(glob.glob(os.path.join(curate, layout.CURVE_DIR, "*", "*"))):
        found[(os.path.basename(os.path.dirname(path)), os.path.basename(path))] = path
    return found


def defect_shares(rows: pd.DataFrame) -> dict[str, float]:
    """Weighted shares of each planted defect among ``rows`` (ground-truth columns and ``weight``)."""
    w = rows["weight"].astype(float)
    total = float(w.sum())
    flags = {
        "swap": rows["caption_noise"] == "swap",
        "random_caption": rows["caption_noise"] == "random",
        "corrupted_image": rows["image_corrupted"].astype(bool),
        "duplicate_copy": rows["duplicate_of"].fillna("").astype(str) != "",
        "minority": rows["group"] == "inverted",
    }
    return {name: float((w * flag).sum() / total) if total else float("nan") for name, flag in flags.items()}


def kept_defects(run_dir: str) -> pd.DataFrame:
    truth = storage.read_table(os.path.join(run_dir, "data", "ground_truth")).to_pandas().set_index("id")
    pool = truth.assign(weight=1.0)
    table = [{"budget": "", "policy": "pool", "kept": len(pool), **defect_shares(pool)}]
    for (budget, name), directory in manifests(run_dir).items():
        # the curate stage's manifest files (kept rows and the embed stage's rejects, which are never kept)
        manifest = storage.read_table(directory, ["id", "keep", "weight"]).to_pandas().set_index("id").join(truth, how="inner")
        kept = manifest[manifest["keep"]]
        table.append({"budget": budget, "policy": name, "kept": len(kept), **defect_shares(kept)})
    return pd.DataFrame(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("run_dirs", nargs="+", help="finished runs of the built-in benchmark")
    args = parser.parse_args(argv)
    for run_dir in args.run_dirs:
        table = kept_defects(run_dir)
        print(f"\n# {run_dir}: shares of the kept training mass (Σ weight)")
        print(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
        main_rows = table[table["budget"] == MAIN].set_index("policy")
        last = [f"swap_kept_{p}={main_rows.loc[p, 'swap']:.4f}" for p in (layout.CURATED, "clipscore_dedup") if p in main_rows.index]
        print(" ".join(last), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
