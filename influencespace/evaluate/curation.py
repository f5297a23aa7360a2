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

# Sums that make every figure below; partial sums over any split of the rows add up (Ray Data batches).
COUNT_FIELDS = ("rows", "noise", "caption", "image", "duplicate", "clean", "noise_removed", "caption_removed",
                "image_removed", "duplicate_removed", "clean_removed", "minority", "minority_kept",
                "minority_weight", "majority_kept", "majority_weight")
TRUTH_COLUMNS = ("id", "caption_corrupted", "image_corrupted", "duplicate_of", "group")


def curation_counts(keep: np.ndarray, weight: np.ndarray, caption: np.ndarray, image: np.ndarray,
                    duplicate: np.ndarray, minority: np.ndarray) -> dict[str, float]:
    """The :data:`COUNT_FIELDS` of some pool rows: boolean flags per row, ``weight`` 0 where not kept."""
    removed, noise = ~keep, caption | image
    clean = ~noise & ~duplicate
    majority = ~minority
    return {
        "rows": len(keep), "noise": int(noise.sum()), "caption": int(caption.sum()), "image": int(image.sum()),
        "duplicate": int(duplicate.sum()), "clean": int(clean.sum()),
        "noise_removed": int((removed & noise).sum()), "caption_removed": int((removed & caption).sum()),
        "image_removed": int((removed & image).sum()), "duplicate_removed": int((removed & duplicate).sum()),
        "clean_removed": int((removed & clean).sum()), "minority": int(minority.sum()),
        "minority_kept": int((keep & minority).sum()), "minority_weight": float(weight[keep & minority].sum()),
        "majority_kept": int((keep & majority).sum()), "majority_weight": float(weight[keep & majority].sum()),
    }


def batch_counts(batch: pd.DataFrame, minority: str | None) -> dict[str, float]:
    """:func:`curation_counts` of a joined batch: ``keep``, ``weight`` and the ground truth's columns,
    null where the ground truth has no row (no planted defect, not of the minority)."""
    keep = batch["keep"].fillna(False).to_numpy(bool)
    weight = np.where(keep, batch["weight"].fillna(0.0).to_numpy(float), 0.0)
    group = batch["group"] if "group" in batch else pd.Series([None] * len(batch), index=batch.index)
    return curation_counts(
        keep, weight, batch["caption_corrupted"].fillna(False).to_numpy(bool),
        batch["image_corrupted"].fillna(False).to_numpy(bool), batch["duplicate_of"].notna().to_numpy(bool),
        (group.astype(str) == minority).to_numpy(bool) if minority is not None else np.zeros(len(batch), bool))


def _pct(part: int, of: int) -> float | None:
    return None if of == 0 else float(100.0 * part / of)


def quality_from_counts(counts: dict[str, float], with_minority: bool) -> dict:
    """Shares (in %) of planted defects removed and of the minority kept, from summed :data:`COUNT_FIELDS`."""
    out = {
        "noise_rows": int(counts["noise"]),
        "duplicate_rows": int(counts["duplicate"]),
        "noise_removed_pct": _pct(counts["noise_removed"], counts["noise"]),
        "caption_noise_removed_pct": _pct(counts["caption_removed"], counts["caption"]),
        "image_noise_removed_pct": _pct(counts["image_removed"], counts["image"]),
        "duplicates_removed_pct": _pct(counts["duplicate_removed"], counts["duplicate"]),
        "clean_removed_pct": _pct(counts["clean_removed"], counts["clean"]),
        "minority_kept_pct": None,
        "minority_mean_weight": None,
        "majority_mean_weight": None,
    }
    if with_minority:
        out["minority_rows"] = int(counts["minority"])
        out["minority_kept_pct"] = _pct(counts["minority_kept"], counts["minority"])
        out["minority_mean_weight"] = (counts["minority_weight"] / counts["minority_kept"]
                                       if counts["minority_kept"] else None)
        out["majority_mean_weight"] = (counts["majority_weight"] / counts["majority_kept"]
                                       if counts["majority_kept"] else None)
    return out


def curation_quality(
    pool_ids: np.ndarray, manifest: pd.DataFrame | None, ground_truth: pd.DataFrame, minority: str | None
) -> dict:
    """Shares (in %) of planted defects removed and of the minority kept, for one manifest, in memory.

    ``manifest`` is None for the baseline (everything kept with weight 1). The reference the evaluate
    stage's distributed aggregates (Ray Data) are tested against.
    """
    truth = ground_truth.set_index("id").reindex(pool_ids)
    if manifest is None:
        rows = pd.DataFrame({"keep": np.ones(len(pool_ids), bool), "weight": np.ones(len(pool_ids))})
    else:
        decisions = manifest.set_index("id").reindex(pool_ids)
        rows = pd.DataFrame({"keep": decisions["keep"].to_numpy(object), "weight": decisions["weight"].to_numpy(float)})
    for column in TRUTH_COLUMNS[1:]:
        if column in truth:
            rows[column] = truth[column].to_numpy(object)
    with_minority = minority is not None and "group" in truth
    return quality_from_counts(batch_counts(rows, minority if with_minority else None), with_minority)
