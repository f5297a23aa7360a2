"""Counterfactual proof on the target: do the influence stage's cluster scores predict real retraining?

    .venv/bin/python benchmarks/influence_counterfactual.py RUN_DIR [--seeds 5] [--loco 24] [--subsets 30]
                                                                  [--out runs/influence_counterfactual.json]
    .venv/bin/python benchmarks/influence_counterfactual.py RUN_DIR --reuse EARLIER.json --scores OTHER.parquet

The second form trains nothing: it scores another set of cluster scores (``--scores``: columns
``cluster``, ``influence``; say, another influence setting's ``cluster_scores.parquet``) against the
retrainings of an earlier result on the same run — the same left-out clusters and subsets, so every
predictor is compared on the very same measured changes.

``RUN_DIR`` is a finished run of the built-in benchmark; only its ``embed/`` (pool, validation),
``cluster/`` (assignments) and ``influence/`` (cluster_scores.parquet) outputs are read. The influence
stage scores clusters on a *proxy* (heads against a fixed negative bank, a few hundred Adam steps);
this benchmark retrains the *target* — the train stage's own model and recipe (``ClipHeads``,
``clip_loss``, ``recipe.train_run`` on a DeepSpeed engine over a one-rank gloo group, as
``runtime.runner: local`` runs it), with the demo preset's train settings (``load_config("demo").train``:
3 epochs, batch 128, AdamW lr 1e-3, head_dim 128, ``same_epochs``) — on the pool with clusters left out:

1. the full pool;
2. LOCO: ``--loco`` single clusters left out, at evenly spaced ranks of ``influence`` (so they span
   its range, the most helpful and the most harmful included);
3. group LDS: ``--subsets`` random halves of the clusters (seeded), each trained on the kept half;

each with training seeds 0 … ``--seeds``−1 (the seed sets the initialisation and the epochs' samples,
the same for every configuration, so differences are paired by seed). Rows the cluster stage left
unassigned (none in the benchmark) are always kept.

**The measured quantity.** The influence stage measures the mean over the validation rows
(``embed/validation``, all of them, not group-balanced) of the proxy's symmetric contrastive
cross-entropy. Its target-side counterpart is the trained heads' CLIP loss on the same rows:

    L_val(θ) = clip_loss(z_v, z_t, s)  over the whole validation set as ONE batch
             = (1/2N) Σ_j [CE(s·z_v,j Z_tᵀ, j) + CE(s·z_t,j Z_vᵀ, j)]

Why this choice: it is the objective the target trains on (``model.clip_loss``), evaluated on the
rows the influence is about, with every pair scored against the same fixed negatives (the other
N − 1 validation pairs). Fixed negatives are what the proxy's measurement uses too (its bank);
in-batch chunks of 128 would make the number depend on an arbitrary split of the validation set.

**Actual and predicted.** Sign convention of the influence stage: influence_c > 0 ⇔ cluster c lowers
the validation loss, so removing it raises the loss. With L(S, s) the validation loss after training
on the clusters S with seed s, and C all clusters:

    LOCO  actual_c  = mean_s [L(C∖{c}, s) − L(C, s)]           predicted_c = influence_c
    LDS   actual_S  = mean_s [L(S, s) − L(C, s)]                predicted_S = Σ_{c∉S} influence_c

(the per-seed subtraction of L(C, s) is a constant per seed; it does not change LDS's ranks and
removes the seeds' shared noise from LOCO). A perfect predictor gives Spearman +1 for both; the LDS is
Spearman(predicted_S, actual_S) across subsets, as in TRAK / Park et al. 2023, for groups.

**Intervals.** Percentile bootstrap, 95%, 2000 resamples of the clusters (LOCO) / subsets (LDS) with
replacement (the training seeds' noise is already in each item's mean; the bootstrap covers which
items were drawn).

**Noise ceiling.** How well the measurement agrees with itself across training seeds: the seeds are
split into two halves (every split into ⌊S/2⌋ and ⌈S/2⌉ seeds), r = mean over the splits of the
Spearman between the halves' mean actual values, and the ceiling is the Spearman–Brown corrected
r_SB = 2r / (1 + r): the expected agreement of two independent S-seed means (for odd S the halves are
unequal, so r_SB is slightly conservative). A predictor correlates with a *noisy* S-seed mean at most
about √r_SB (classical test theory: the noise-free value's correlation with it); √r_SB is in the JSON
as ``ceiling_sqrt``; the goals use r_SB, as the issue asks.

**Naive predictors** (sign fixed in advance: higher ⇒ removing the cluster raises the loss more):
``cosine`` — the cluster's mean image–text cosine (``embed/pool`` ``image_text_cosine``); ``size`` —
its rows; ``cosine_rows`` — the sum of its rows' cosines (= size × mean cosine: the row-additive form
influence itself has, influence_c = (1/n) Σ_{i∈c} t_i). For LDS each is summed over the removed
clusters, like influence. ``naive_best`` is the largest of their Spearman coefficients.

Goals (issue 15; reported, nothing here is tuned to meet them): lds ≥ 0.6 and ≥ naive_best_lds + 0.1;
loco_spearman ≥ 0.9 × loco_ceiling and ≥ naive_best_loco + 0.1.

Output: the JSON (``--out``) with every training's loss, and a table; the last line is
``loco_spearman=… loco_ceiling=… lds=… lds_ceiling=… naive_best_loco=… naive_best_lds=…``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

BOOTSTRAP_RESAMPLES = 2000
NAIVE = ("cosine", "size", "cosine_rows")
# What each input is and which stage writes it (for the error on a bad RUN_DIR).
REQUIRED = {
    "embed/pool": "embed",
    "embed/validation": "embed",
    "cluster/assignments": "cluster",
    "influence/cluster_scores.parquet": "influence",
}


# --------------------------------------------------------------------------------------------------
# Statistics (pure numpy)


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's ρ: Pearson's r of the average ranks (ties share their mean rank); NaN if either is constant."""
    from scipy.stats import rankdata

    rx, ry = rankdata(np.asarray(x, float)), rankdata(np.asarray(y, float))
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denominator = math.sqrt(float(rx @ rx) * float(ry @ ry))
    return float(rx @ ry / denominator) if denominator > 0 else float("nan")


def bootstrap_spearman(x: np.ndarray, y: np.ndarray, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0,
                       confidence: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of Spearman's ρ, resampling the (x, y) pairs with replacement.

    Resamples where one side is constant (ρ undefined) are skipped.
    """
    x, y = np.asarray(x, float), np.asarray(y, float)
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(resamples):
        index = rng.integers(0, len(x), len(x))
        rho = spearman(x[index], y[index])
        if np.isfinite(rho):
            values.append(rho)
    if not values:
        return float("nan"), float("nan")
    tail = (1 - confidence) / 2
    low, high = np.quantile(values, [tail, 1 - tail])
    return float(low), float(high)


def split_half_ceiling(per_seed: np.ndarray) -> dict:
    """Split-half reliability of the item means over seeds; ``per_seed`` is (items, seeds).

    r = mean over every split of the seeds into ⌊S/2⌋ and the rest of Spearman(mean of half A, mean of
    half B); the ceiling is Spearman–Brown's r_SB = 2r / (1 + r). NaN with fewer than two seeds.
    """
    per_seed = np.asarray(per_seed, float)
    seeds = per_seed.shape[1]
    if seeds < 2:
        return {"split_half": float("nan"), "ceiling": float("nan"), "ceiling_sqrt": float("nan"), "splits": 0}
    rhos = []
    for half in itertools.combinations(range(seeds), seeds // 2):
        other = [s for s in range(seeds) if s not in half]
        rhos.append(spearman(per_seed[:, list(half)].mean(1), per_seed[:, other].mean(1)))
    r = float(np.mean(rhos))
    corrected = 2 * r / (1 + r) if r > -1 else float("nan")
    return {"split_half": r, "ceiling": corrected,
            "ceiling_sqrt": math.sqrt(corrected) if corrected >= 0 else float("nan"), "splits": len(rhos)}


def loco_clusters(clusters: np.ndarray, influence: np.ndarray, count: int) -> np.ndarray:
    """``count`` clusters at evenly spaced ranks of ``influence`` (lowest and highest included)."""
    order = np.asarray(clusters)[np.argsort(influence, kind="stable")]
    if count >= len(order):
        return np.sort(order)
    ranks = np.unique(np.round(np.linspace(0, len(order) - 1, count)).astype(int))
    return order[ranks]


def draw_subsets(clusters: np.ndarray, count: int, seed: int) -> list[np.ndarray]:
    """``count`` distinct random halves (⌊k/2⌋ clusters kept) of ``clusters``, each sorted; seeded."""
    clusters = np.asarray(clusters)
    rng = np.random.default_rng(seed)
    keep = len(clusters) // 2
    if count > math.comb(len(clusters), keep):
        raise ValueError(f"only {math.comb(len(clusters), keep)} distinct halves of {len(clusters)} clusters exist")
    subsets: list[np.ndarray] = []
    seen: set[tuple] = set()
    while len(subsets) < count:
        kept = np.sort(rng.choice(clusters, size=keep, replace=False))
        if tuple(kept) not in seen:  # a repeated subset would count one configuration twice
            seen.add(tuple(kept))
            subsets.append(kept)
    return subsets


def removed_sum(subsets: list[np.ndarray], clusters: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Σ_{c∉S} values_c for every subset S (the additive prediction of removing the other clusters)."""
    clusters, values = np.asarray(clusters), np.asarray(values, float)
    return np.array([values[~np.isin(clusters, s)].sum() for s in subsets])


def correlate(predicted: np.ndarray, actual: np.ndarray, seed: int = 0) -> dict:
    low, high = bootstrap_spearman(predicted, actual, seed=seed)
    return {"spearman": spearman(predicted, actual), "ci_low": low, "ci_high": high}


def summarize(predictors: dict[str, np.ndarray], per_seed: np.ndarray, seed: int = 0) -> dict:
    """Each predictor's Spearman (with CI) against the seed-mean of ``per_seed`` (items × seeds), and the ceiling."""
    actual = per_seed.mean(1)
    return {"correlations": {name: correlate(p, actual, seed) for name, p in predictors.items()},
            "noise": split_half_ceiling(per_seed)}


def goals(loco: dict, lds: dict) -> dict:
    """Issue 15's goals from the two summaries (``naive_best``: the best naive predictor's ρ)."""
    rho_loco = loco["correlations"]["influence"]["spearman"]
    rho_lds = lds["correlations"]["influence"]["spearman"]
    best_loco = max(loco["correlations"][n]["spearman"] for n in NAIVE)
    best_lds = max(lds["correlations"][n]["spearman"] for n in NAIVE)
    ceiling = loco["noise"]["ceiling"]
    return {
        "lds_at_least_0.6": bool(rho_lds >= 0.6),
        "lds_beats_naive_by_0.1": bool(rho_lds >= best_lds + 0.1),
        "loco_at_least_0.9_ceiling": bool(rho_loco >= 0.9 * ceiling),
        "loco_beats_naive_by_0.1": bool(rho_loco >= best_loco + 0.1),
        "naive_best_loco": best_loco,
        "naive_best_lds": best_lds,
    }


# --------------------------------------------------------------------------------------------------
# Inputs


@dataclass
class Bench:
    """What the benchmark reads from a run: the pool (in shard order), the validation set, the scores."""

    ids: np.ndarray  # object (str)
    shard: np.ndarray  # which pool shard each row came from (the recipe streams shard by shard)
    image: np.ndarray
    text: np.ndarray
    cosine: np.ndarray
    cluster: np.ndarray  # −1: unassigned (always kept)
    val_image: np.ndarray
    val_text: np.ndarray
    clusters: np.ndarray  # the scored clusters
    influence: np.ndarray
    size: np.ndarray  # pool rows per scored cluster


def check_run_dir(run_dir: str, stages: tuple[str, ...] = ("embed", "cluster", "influence")) -> None:
    """Fail with what is missing (of ``stages``' outputs) and which stage writes it."""
    if not os.path.isdir(run_dir):
        raise SystemExit(f"error: run directory {run_dir!r} does not exist; run the built-in benchmark first "
                         "(`.venv/bin/influencespace demo`, or `influencespace run demo --stages data,embed,cluster,influence`), "
                         "then pass its run directory")
    missing = [(p, stage) for p, stage in REQUIRED.items() if stage in stages and not os.path.exists(os.path.join(run_dir, p))]
    for stage in stages:
        if os.path.isdir(os.path.join(run_dir, stage)) and not os.path.exists(os.path.join(run_dir, stage, "_SUCCESS.json")):
            missing.append((f"{stage}/_SUCCESS.json (the stage did not finish)", stage))
    if missing:
        lines = "\n".join(f"  {p}  (written by the {stage} stage)" for p, stage in missing)
        stages = sorted({stage for _, stage in missing}, key=list(REQUIRED.values()).index)
        raise SystemExit(f"error: {run_dir} is not a finished run; missing:\n{lines}\n"
                         f"run the pipeline through the influence stage on it (stages: {', '.join(stages)}), "
                         "e.g. `.venv/bin/influencespace run demo --stages data,embed,cluster,influence` with run_dir set to it")


def load_bench(run_dir: str, scores_file: str | None = None) -> Bench:
    import pandas as pd
    import pyarrow.parquet as pq

    from influencespace.train.data import fixed_size_matrix

    check_run_dir(run_dir, ("embed", "cluster") if scores_file else ("embed", "cluster", "influence"))

    def files(path: str) -> list[str]:
        found = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".parquet"))
        if not found:
            raise SystemExit(f"error: {path} has no Parquet files; rerun its stage")
        return found

    columns = ["id", "image_embedding", "text_embedding", "image_text_cosine"]
    parts = []
    for number, path in enumerate(files(os.path.join(run_dir, "embed", "pool"))):
        table = pq.read_table(path, columns=columns)
        parts.append((number, table))
    ids = np.concatenate([np.asarray(t.column("id").to_pylist(), dtype=object) for _, t in parts])
    shard = np.concatenate([np.full(t.num_rows, n) for n, t in parts])
    image = np.concatenate([fixed_size_matrix(t.column("image_embedding")) for _, t in parts])
    text = np.concatenate([fixed_size_matrix(t.column("text_embedding")) for _, t in parts])
    cosine = np.concatenate([t.column("image_text_cosine").to_numpy().astype(float) for _, t in parts])

    assign = pd.concat([pq.read_table(f, columns=["id", "cluster"]).to_pandas()
                        for f in files(os.path.join(run_dir, "cluster", "assignments"))])
    cluster = pd.Series(ids).map(assign.set_index("id")["cluster"]).fillna(-1).to_numpy().astype(int)

    val = pq.read_table(files(os.path.join(run_dir, "embed", "validation")),
                        columns=["image_embedding", "text_embedding"])
    scores = pq.read_table(scores_file or os.path.join(run_dir, "influence", "cluster_scores.parquet"),
                           columns=["cluster", "influence"]).to_pandas().sort_values("cluster")
    clusters = scores["cluster"].to_numpy().astype(int)
    size = np.array([(cluster == c).sum() for c in clusters])
    if (size == 0).any():
        raise SystemExit(f"error: cluster(s) {clusters[size == 0].tolist()} of influence/cluster_scores.parquet have "
                         "no rows in cluster/assignments: the influence outputs belong to another clustering; "
                         "rerun the influence stage")
    return Bench(ids, shard, image, text, cosine, cluster, fixed_size_matrix(val.column("image_embedding")),
                 fixed_size_matrix(val.column("text_embedding")), clusters,
                 scores["influence"].to_numpy().astype(float), size)


def naive_scores(bench: Bench) -> dict[str, np.ndarray]:
    mean_cosine = np.array([bench.cosine[bench.cluster == c].mean() for c in bench.clusters])
    return {"cosine": mean_cosine, "size": bench.size.astype(float), "cosine_rows": mean_cosine * bench.size}


# --------------------------------------------------------------------------------------------------
# Training the target (the train stage's recipe, in this process)


def validation_loss(state: dict, val_image: np.ndarray, val_text: np.ndarray) -> float:
    """The trained heads' CLIP loss with the whole validation set as one batch (see the module docstring)."""
    import torch

    from influencespace.train.model import clip_loss, load_model

    model = load_model(state)
    model.eval()
    with torch.no_grad():
        image, text, scale = model(torch.from_numpy(val_image), torch.from_numpy(val_text))
        return float(clip_loss(image, text, scale))


def make_trainer(bench: Bench, train_cfg) -> Callable[[np.ndarray, int], float]:
    """``train(keep, seed)`` → validation loss of the target trained on the rows ``keep`` (a bool mask).

    It runs ``recipe.train_run`` exactly as the local runner does for a curated variant of those rows
    with weight 1 (same hyperparameters, step policy and seeded epochs); the rows are streamed from
    memory shard by shard in pool order, chunked as ``data.read_pair`` chunks them.
    """
    import torch

    from influencespace.runtime import local_process_group
    from influencespace.train.data import CHUNK_ROWS, VariantData
    from influencespace.train.recipe import Hyperparameters, RunSpec, Session, steps_per_epoch, train_run
    from influencespace.train.targets import HeadsTarget

    hp = Hyperparameters.from_config(train_cfg)
    target = HeadsTarget(bench.image.shape[1], bench.text.shape[1], hp.head_dim, hp.logit_scale_init)
    pool_rows = len(bench.ids)

    def chunks(keep: np.ndarray) -> Iterator[dict]:
        for number in np.unique(bench.shard):
            rows = np.flatnonzero(keep & (bench.shard == number))
            for start in range(0, len(rows), CHUNK_ROWS):
                part = rows[start:start + CHUNK_ROWS]
                yield {"id": bench.ids[part], "image": bench.image[part], "text": bench.text[part],
                       "weight": np.ones(len(part))}

    def train(keep: np.ndarray, seed: int) -> float:
        kept = int(keep.sum())
        data = VariantData(pairs=(), rows=kept, weight_sum=float(kept))
        with tempfile.TemporaryDirectory(prefix="counterfactual-") as tmp, local_process_group(use_gpu=False) as device:
            spec = RunSpec(variant="counterfactual", seed=seed, manifest_uri=None, epochs=train_cfg.epochs,
                           steps_per_epoch=steps_per_epoch(train_cfg.step_policy, pool_rows, kept, hp.batch_size),
                           output_uri=os.path.join(tmp, "out"), checkpoint_root=os.path.join(tmp, "ckpt"))
            # The epoch checkpoints are not needed: nothing resumes, only the final weights are read.
            session = Session(rank=0, world_size=1, device=device, report=lambda metrics, directory, name: None)
            train_run(spec, hp, target, data, lambda: chunks(keep), session)
            state = torch.load(os.path.join(tmp, "out", "model.pt"), weights_only=True)
        return validation_loss(state, bench.val_image, bench.val_text)

    return train


# --------------------------------------------------------------------------------------------------
# The benchmark


def run_benchmark(bench: Bench, train: Callable[[np.ndarray, int], float], seeds: int, loco: int, subsets: int,
                  subset_seed: int = 0, log_every: int = 5) -> dict:
    """Train every configuration with every seed; return the losses and the statistics."""
    left_out = loco_clusters(bench.clusters, bench.influence, loco)
    halves = draw_subsets(bench.clusters, subsets, subset_seed)
    configs: list[tuple[str, np.ndarray]] = [("full", np.ones(len(bench.ids), bool))]
    configs += [(f"loco-{c}", bench.cluster != c) for c in left_out]
    configs += [(f"lds-{i}", np.isin(bench.cluster, s) | (bench.cluster < 0)) for i, s in enumerate(halves)]

    losses = np.full((len(configs), seeds), np.nan)
    total, done, started = len(configs) * seeds, 0, time.perf_counter()
    # Seed-major, as the train stage orders its runs: one seed's configurations run back to back.
    for seed in range(seeds):
        for index, (name, keep) in enumerate(configs):
            losses[index, seed] = train(keep, seed)
            done += 1
            if done % log_every == 0 or done == total:
                elapsed = time.perf_counter() - started
                print(f"[{done}/{total}] {elapsed:.0f}s elapsed, ~{elapsed / done * (total - done):.0f}s left "
                      f"(last: {name} seed {seed}: loss {losses[index, seed]:.4f})", flush=True)
    train_seconds = time.perf_counter() - started

    full = losses[0]
    loco_change = losses[1:1 + len(left_out)] - full  # paired by seed
    lds_change = losses[1 + len(left_out):] - full
    kept = [int(keep.sum()) for _, keep in configs[1:]]
    return {
        "seeds": list(range(seeds)),
        "train_seconds": train_seconds,
        "seconds_per_training": train_seconds / total,
        "full_loss": full.tolist(),
        **evaluate(bench, left_out, halves, loco_change, lds_change, kept[:len(left_out)], kept[len(left_out):], subset_seed),
    }


def evaluate(bench: Bench, left_out: np.ndarray, halves: list[np.ndarray], loco_change: np.ndarray, lds_change: np.ndarray,
             loco_kept: list[int], lds_kept: list[int], subset_seed: int) -> dict:
    """The statistics of the influence scores and the naive predictors against the measured changes."""
    position = {c: i for i, c in enumerate(bench.clusters)}
    picked = np.array([position[c] for c in left_out])
    naive = naive_scores(bench)
    loco_predictors = {"influence": bench.influence[picked], **{n: v[picked] for n, v in naive.items()}}
    lds_predictors = {"influence": removed_sum(halves, bench.clusters, bench.influence),
                      **{n: removed_sum(halves, bench.clusters, v) for n, v in naive.items()}}
    loco_summary = summarize(loco_predictors, loco_change, seed=1)
    lds_summary = summarize(lds_predictors, lds_change, seed=2)
    return {
        "loco": {**loco_summary, "clusters": np.asarray(left_out).tolist(),
                 "predicted": {k: v.tolist() for k, v in loco_predictors.items()},
                 "actual": loco_change.mean(1).tolist(), "per_seed_change": loco_change.tolist(), "kept_rows": loco_kept},
        "lds": {**lds_summary, "subsets": [np.asarray(s).tolist() for s in halves], "subset_seed": subset_seed,
                "predicted": {k: v.tolist() for k, v in lds_predictors.items()},
                "actual": lds_change.mean(1).tolist(), "per_seed_change": lds_change.tolist(), "kept_rows": lds_kept},
        "goals": goals(loco_summary, lds_summary),
    }


def rescore(bench: Bench, earlier: dict) -> dict:
    """``bench``'s scores against the retrainings of an ``earlier`` result on the same pool: the same
    left-out clusters and half-subsets, so predictors are compared on the very same measured changes
    (paired). The left-out clusters were picked at ranks of the earlier scores, not of these."""
    loco, lds = earlier["loco"], earlier["lds"]
    unknown = sorted(set(loco["clusters"]) - set(bench.clusters.tolist()))
    if unknown:
        raise SystemExit(f"error: the earlier result left out cluster(s) {unknown}, which these scores do not have: "
                         "it belongs to another run")
    return {key: earlier[key] for key in ("seeds", "train_seconds", "seconds_per_training", "full_loss")} | evaluate(
        bench, np.array(loco["clusters"]), [np.array(s) for s in lds["subsets"]], np.array(loco["per_seed_change"]),
        np.array(lds["per_seed_change"]), loco["kept_rows"], lds["kept_rows"], lds["subset_seed"])


def report_lines(result: dict) -> list[str]:
    lines = [f"{'measure':<6} {'predictor':<12} {'spearman':>9}  {'95% CI':<17} ceiling (r_SB; split-half r; sqrt r_SB)"]
    for measure in ("loco", "lds"):
        noise = result[measure]["noise"]
        for name, c in result[measure]["correlations"].items():
            ceiling = (f"{noise['ceiling']:.3f}; {noise['split_half']:.3f}; {noise['ceiling_sqrt']:.3f}"
                       if name == "influence" else "")
            lines.append(f"{measure:<6} {name:<12} {c['spearman']:>9.3f}  [{c['ci_low']:6.3f}, {c['ci_high']:6.3f}]  {ceiling}")
    g = result["goals"]
    rho_loco = result["loco"]["correlations"]["influence"]["spearman"]
    rho_lds = result["lds"]["correlations"]["influence"]["spearman"]
    ceiling = result["loco"]["noise"]["ceiling"]
    met = {True: "met", False: "NOT met"}
    lines += [
        f"goal lds >= 0.6: {rho_lds:.3f} -> {met[g['lds_at_least_0.6']]}",
        f"goal lds >= naive_best_lds + 0.1: {rho_lds:.3f} vs {g['naive_best_lds'] + 0.1:.3f} -> {met[g['lds_beats_naive_by_0.1']]}",
        f"goal loco >= 0.9 x ceiling: {rho_loco:.3f} vs {0.9 * ceiling:.3f} -> {met[g['loco_at_least_0.9_ceiling']]}",
        f"goal loco >= naive_best_loco + 0.1: {rho_loco:.3f} vs {g['naive_best_loco'] + 0.1:.3f} -> {met[g['loco_beats_naive_by_0.1']]}",
        f"loco_spearman={rho_loco:.3f} loco_ceiling={ceiling:.3f} lds={rho_lds:.3f} "
        f"lds_ceiling={result['lds']['noise']['ceiling']:.3f} naive_best_loco={g['naive_best_loco']:.3f} "
        f"naive_best_lds={g['naive_best_lds']:.3f}",
    ]
    return lines


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("run_dir", help="a finished run of the built-in benchmark (embed/, cluster/, influence/)")
    parser.add_argument("--seeds", type=int, default=5, help="training seeds per configuration (0 … seeds−1)")
    parser.add_argument("--loco", type=int, default=24, help="single clusters left out (evenly spaced ranks of influence)")
    parser.add_argument("--subsets", type=int, default=30, help="random half-subsets of the clusters (group LDS)")
    parser.add_argument("--subset-seed", type=int, default=0)
    parser.add_argument("--preset", default="demo", help="config preset whose train settings are used")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    parser.add_argument("--out", default="runs/influence_counterfactual.json")
    parser.add_argument("--scores", help="a Parquet file (columns cluster, influence) to evaluate instead of the run's "
                        "influence/cluster_scores.parquet (say, the scores of another influence setting)")
    parser.add_argument("--reuse", metavar="RESULT_JSON", help="an earlier result on the same run: no training; these "
                        "scores against its retrainings (the same left-out clusters and subsets, so paired)")
    args = parser.parse_args(argv)
    if args.seeds < 1 or args.loco < 3 or args.subsets < 3:
        parser.error("need --seeds >= 1, --loco >= 3 and --subsets >= 3 for a rank correlation")

    import torch

    from influencespace.config import load_config

    torch.set_num_threads(args.threads)
    logging.getLogger("influencespace").setLevel(logging.WARNING)  # the recipe logs every epoch at INFO
    bench = load_bench(args.run_dir, args.scores)
    train_cfg = load_config(args.preset).train
    if args.reuse:
        with open(args.reuse) as f:
            earlier = json.load(f)
        result = rescore(bench, earlier) | {"run_dir": os.path.abspath(args.run_dir), "reused": os.path.abspath(args.reuse),
                                            "scores": os.path.abspath(args.scores) if args.scores else None}
        return write_result(result, args.out, f"the retrainings of {args.reuse}")
    print(f"{args.run_dir}: pool {len(bench.ids)} rows, {len(bench.clusters)} clusters, validation "
          f"{len(bench.val_image)} rows; train: {train_cfg.epochs} epochs, batch {train_cfg.batch_size}, "
          f"lr {train_cfg.lr}, {train_cfg.optimizer}, head_dim {train_cfg.head_dim}, {train_cfg.step_policy}; "
          f"{1 + args.loco + args.subsets} configurations x {args.seeds} seeds", flush=True)
    started = time.perf_counter()
    result = run_benchmark(bench, make_trainer(bench, train_cfg), args.seeds, args.loco, args.subsets, args.subset_seed)
    result.update({
        "run_dir": os.path.abspath(args.run_dir), "preset": args.preset,
        "train": {k: getattr(train_cfg, k) for k in ("epochs", "batch_size", "lr", "optimizer", "weight_decay",
                                                     "head_dim", "step_policy", "gradient_clipping", "zero_stage")},
        "measure": "clip_loss of the trained heads on embed/validation as one batch",
        "wall_seconds": time.perf_counter() - started, "torch_threads": args.threads,
    })
    return write_result(result, args.out, f"{result['wall_seconds']:.0f}s, {result['seconds_per_training']:.2f}s per training")


def write_result(result: dict, out: str, what: str) -> dict:
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {out} ({what})")
    for line in report_lines(result):
        print(line)
    return result


if __name__ == "__main__":
    main()
