"""Curation quality against the benchmark's ground truth (the pipeline never reads it; evaluation does).

Measured over the embedded pool (rows the embed stage rejected were never a curation decision):

- ``noise_removed_pct``: planted noise (mismatched caption or corrupted image) the manifest dropped,
  with the caption and image parts separately;
- ``duplicates_removed_pct``: near-duplicate copies (``duplicate_of`` set) dropped;
- ``clean_removed_pct``: rows with no planted defect dropped (the collateral);
- ``minority_kept_pct`` and ``minority_mean_weight`` / ``majority_mean_weight``: how the
  under-represented group fared (weights average 1 over kept rows).
"""

from __future__ import annotations

import numpy as np
import pandas as pd


def _pct(mask: np.ndarray, of: np.ndarray) -> float | None:
    total = int(of.sum())
    return None if total == 0 else float(100.0 * (mask & of).sum() / total)


def curation_quality(
    pool_ids: np.ndarray, manifest: pd.DataFrame | None, ground_truth: pd.DataFrame, minority: str | None
) -> dict:
    """Shares (in %) of planted defects removed and of the minority kept, for one manifest.

    ``manifest`` is None for the baseline (everything kept with weight 1).
    """
    truth = ground_truth.set_index("id").reindex(pool_ids)
    if manifest is None:
        keep = np.ones(len(pool_ids), bool)
        weight = np.ones(len(pool_ids))
    else:
        decisions = manifest.set_index("id").reindex(pool_ids)
        keep = decisions["keep"].fillna(False).to_numpy(bool)
        weight = np.where(keep, decisions["weight"].fillna(0.0).to_numpy(float), 0.0)
    removed = ~keep
    caption = truth["caption_corrupted"].fillna(False).to_numpy(bool)
    image = truth["image_corrupted"].fillna(False).to_numpy(bool)
    duplicate = truth["duplicate_of"].notna().to_numpy(bool)
    noise = caption | image
    clean = ~noise & ~duplicate
    out = {
        "noise_rows": int(noise.sum()),
        "duplicate_rows": int(duplicate.sum()),
        "noise_removed_pct": _pct(removed, noise),
        "caption_noise_removed_pct": _pct(removed, caption),
        "image_noise_removed_pct": _pct(removed, image),
        "duplicates_removed_pct": _pct(removed, duplicate),
        "clean_removed_pct": _pct(removed, clean),
        "minority_kept_pct": None,
        "minority_mean_weight": None,
        "majority_mean_weight": None,
    }
    if minority is not None and "group" in truth:
        is_minority = (truth["group"].astype(str) == minority).to_numpy(bool)
        out["minority_rows"] = int(is_minority.sum())
        out["minority_kept_pct"] = _pct(keep, is_minority)
        kept_minority, kept_majority = keep & is_minority, keep & ~is_minority
        out["minority_mean_weight"] = float(weight[kept_minority].mean()) if kept_minority.any() else None
        out["majority_mean_weight"] = float(weight[kept_majority].mean()) if kept_majority.any() else None
    return out
