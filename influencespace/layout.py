"""The run directory's names, in one place: stage adapters, export and the report all read them here.

Stages hand over through files, so the names of those files are a contract. Keeping them here (as
kronfluence keeps its ``utils/constants.py``) means no stage adapter imports another to learn them::

    <run_dir>/<stage>/_STARTED.json, _SUCCESS.json        the stage contract (influencespace.stages)
    <run_dir>/embed/_PLAN.json                             the raw rows of every embedded shard
    <run_dir>/logs/<stage>.log                             everything a stage printed (influencespace.console)
    <run_dir>/curate/manifest/                             the InfluenceSpace manifest
    <run_dir>/curate/policies/<policy>/                    a comparison policy's manifest
    <run_dir>/curate/curve/keep-0.40/<policy>/             a policy at another budget (the curve)
    <run_dir>/train/<variant>/metrics.json                 what training a variant gave

A manifest directory is **shard-aligned** with the embedded pool: ``part-NNNNN.parquet`` lists exactly
the ids of ``embed/pool/part-NNNNN.parquet`` (the same name; every row of that shard once, in any
order), and ``rejected-NNNNN.parquet`` the rows the embed stage rejected (``keep = false``; they have
no pool row). A reader therefore joins pool shard i with manifest part i (:func:`manifest_part`), one
shard at a time, in parallel, never holding the whole pool or manifest.

Variants (what train trains and evaluate compares): ``baseline`` (the whole pool),
``influencespace`` (curate's manifest), one per comparison policy (``random``, ``dedup``, …), and
``curve-keep-0.40-<policy>`` for each policy at each further budget of the reduction curve.
"""

from __future__ import annotations

import re
from typing import Any

BASELINE = "baseline"
CURATED = "influencespace"

LOGS_DIR = "logs"
MANIFEST_DIR = "manifest"
POLICIES_DIR = "policies"
CURVE_DIR = "curve"

# Output keys of the curate stage's _SUCCESS.json: "manifest", "policy_<p>", "curve_<label>_<p>".
MANIFEST_OUTPUT = "manifest"
POLICY_OUTPUT_PREFIX = "policy_"
CURVE_OUTPUT_PREFIX = "curve_"
CURVE_VARIANT_PREFIX = "curve-"


REJECTED_PART_PREFIX = "rejected-"

# The embed stage's shard plan (<run_dir>/embed/_PLAN.json): which raw rows each shard of each split
# holds. Embedded shard <split>/part-NNNNN is the embeddable rows of plan shard NNNNN, in order, so a
# stage that needs the raw pairs of a pool shard (the open_clip training target) reads them from here.
EMBED_PLAN_FILE = "_PLAN.json"

# Per validation group g the influence stage writes, beside the overall columns (influence, stderr,
# ci_low, ci_high), the same four for g's validation loss: "<stat>_group_<g>" (g made column-safe).
GROUP_STATS = ("influence", "stderr", "ci_low", "ci_high")


def group_column(name: str, stat: str = "influence") -> str:
    """The column of one validation group's ``stat`` (one of GROUP_STATS): ``<stat>_group_<name>``."""
    if stat not in GROUP_STATS:
        raise ValueError(f"unknown group statistic '{stat}' (allowed: {', '.join(GROUP_STATS)})")
    return f"{stat}_group_" + re.sub(r"[^0-9A-Za-z_]+", "_", str(name))


def manifest_part(manifest_directory: str, pool_shard_uri: str) -> str:
    """The manifest part that lists the rows of one embedded pool shard (same file name)."""
    return manifest_directory.rstrip("/") + "/" + pool_shard_uri.rsplit("/", 1)[-1]


def parts_by_name(files: list[str]) -> dict[str, str]:
    """Shard-aligned part files by their file name (``part-NNNNN.parquet``: the pool shard they belong to)."""
    return {uri.rsplit("/", 1)[-1]: uri for uri in files}


def aligned_parts(pool_files: list[str], assignment_files: list[str]) -> list[tuple[str, str, str]]:
    """(name, pool shard, assignment part) for every embedded pool shard, in pool order.

    The cluster stage writes one assignment part per pool shard under the same name; a missing or an
    extra part means the two stages' outputs do not belong together."""
    from influencespace.errors import StageStateError

    by_name = parts_by_name(assignment_files)
    unknown = set(by_name) - {uri.rsplit("/", 1)[-1] for uri in pool_files}
    if unknown:
        raise StageStateError(f"cluster assignments {sorted(unknown)[0]} matches no embedded pool shard; rerun the cluster stage")
    parts = []
    for pool in pool_files:
        name = pool.rsplit("/", 1)[-1]
        if name not in by_name:
            raise StageStateError(f"the embedded pool shard {name} has no cluster assignments part; rerun the cluster stage")
        parts.append((name, pool, by_name[name]))
    return parts


def rejected_part(index: int) -> str:
    return f"{REJECTED_PART_PREFIX}{index:05d}.parquet"


def summary_entry(summary: dict[str, Any], output_key: str) -> dict[str, Any]:
    """What the curate stage's ``summary.json`` says of the manifest under ``output_key`` (rows, kept, weight_sum, …)."""
    if output_key.startswith(CURVE_OUTPUT_PREFIX):
        label, policy_name = output_key.removeprefix(CURVE_OUTPUT_PREFIX).split("_", 1)
        return summary["curve"][label][policy_name]
    if output_key == MANIFEST_OUTPUT:
        return summary[CURATED]
    return summary[output_key.removeprefix(POLICY_OUTPUT_PREFIX)]


def manifest_dir(policy: str) -> str:
    """Where, inside the curate stage's directory, ``policy``'s manifest is."""
    return MANIFEST_DIR if policy == CURATED else f"{POLICIES_DIR}/{policy}"


def policy_output(policy: str) -> str:
    return MANIFEST_OUTPUT if policy == CURATED else f"{POLICY_OUTPUT_PREFIX}{policy}"


def curve_label(keep_fraction: float) -> str:
    """Directory label of one curve budget: ``keep-0.40``."""
    return f"keep-{keep_fraction:.2f}"


def curve_dir(label: str, policy: str) -> str:
    return f"{CURVE_DIR}/{label}/{policy}"


def curve_output(label: str, policy: str) -> str:
    return f"{CURVE_OUTPUT_PREFIX}{label}_{policy}"


def curve_variant(output_key: str) -> str:
    """Train variant of a curve output key: ``curve_keep-0.40_random`` → ``curve-keep-0.40-random``."""
    label, policy_name = output_key.removeprefix(CURVE_OUTPUT_PREFIX).split("_", 1)
    return f"{CURVE_VARIANT_PREFIX}{label}-{policy_name}"


def parse_curve_variant(variant: str) -> tuple[float, str] | None:
    """(keep fraction, policy) of a curve variant; None for any other variant."""
    if not variant.startswith(CURVE_VARIANT_PREFIX):
        return None
    label, policy_name = variant.removeprefix(CURVE_VARIANT_PREFIX).rsplit("-", 1)
    return float(label.removeprefix("keep-")), policy_name


def variant_manifests(curate_manifest: dict[str, Any]) -> dict[str, str | None]:
    """Variant name → manifest output key of the curate stage (None for the baseline), in report order."""
    outputs = curate_manifest.get("outputs", {})
    variants: dict[str, str | None] = {BASELINE: None}
    if MANIFEST_OUTPUT in outputs:
        variants[CURATED] = MANIFEST_OUTPUT
    for key in sorted(outputs):
        if key.startswith(POLICY_OUTPUT_PREFIX):
            variants[key.removeprefix(POLICY_OUTPUT_PREFIX)] = key
    for key in sorted(outputs):  # the reduction-vs-accuracy curve
        if key.startswith(CURVE_OUTPUT_PREFIX):
            variants[curve_variant(key)] = key
    return variants
