"""Per-cluster influence, its standard error and confidence interval, from per-example terms.

Sign convention (used everywhere): influence > 0 means the cluster *lowers* the validation loss,
i.e. it helps. Derivation: the proxy minimises (1/n) Σ_i ℓ_i(θ) (+ its L2 term). Dropping cluster c
moves the optimum by Δθ ≈ (1/n) H⁻¹ Σ_{i∈c} ∇ℓ_i (one Newton step), which changes the validation
loss by ∇L_valᵀ Δθ. So

    influence(c) = (1/n) Σ_{i∈c} t_i,   t_i = φ_valᵀ (H + λI)⁻¹ φ_i,

is the *increase* of the validation loss caused by removing c, ≈ (|c|/n) · φ_valᵀ (F/n + λI)⁻¹ mean_{i∈c} φ_i
(H = F/n plus the sketched L2 term of the proxy).
Per group g, φ_val is replaced by the sketched gradient of that group's mean validation loss.

Estimator: t_i is known only for the sampled members, so the cluster total is estimated by the
stratified estimator T_c = Σ_g N_cg · mean_{S_cg} t (see :mod:`.sampling`), and

    Var(T_c) = Σ_g N_cg² (1 − m_cg/N_cg) s²_cg / m_cg       (finite-population correction)

with s²_cg the sample variance of t in stratum g (the cluster's pooled variance where a stratum has a
single draw). stderr = sqrt(Var)/n and the interval is influence ± t_{df}·stderr with df = m_c − 1
(Student t). A cluster sampled in full has stderr 0: the interval covers the sampling error only, not
the error of the influence approximation itself. Examples whose gradients were not finite are left
out; their stratum's share is spread over the cluster's other strata (ratio estimator). A cluster
with no usable example gets influence 0 and an infinite interval ("unknown"); an empty cluster
gets 0 with stderr 0 (removing nothing changes nothing).
"""

from __future__ import annotations

import numpy as np

from influencespace.layout import GROUP_STATS, group_column


def t_quantile(confidence: float, df: np.ndarray) -> np.ndarray:
    from scipy import stats

    return stats.t.ppf((1 + confidence) / 2, np.maximum(df, 1))


def cluster_statistics(
    cluster: np.ndarray,
    stratum: np.ndarray,
    stratum_size: np.ndarray,
    finite: np.ndarray,
    terms: np.ndarray,
    cluster_sizes: np.ndarray,
    n: int,
    confidence: float,
    group_names: list[str],
) -> dict[str, np.ndarray]:
    """Score columns for the clusters that appear in ``cluster`` (rows of one worker's shard).

    ``terms`` is (s, 1 + G): column 0 uses the overall validation gradient, column 1 + g group g's.
    Every column gets the same estimator: group g's influence, standard error and interval
    (``influence_group_<g>``, ``stderr_group_<g>``, ``ci_low_group_<g>``, ``ci_high_group_<g>``) come
    from its own terms' stratum variances, so a call made for one group carries that group's noise.
    """
    terms = np.asarray(terms, dtype=np.float64)
    out: dict[str, list] = {"cluster": [], "size": [], "n_sampled": [], "n_dropped": []}
    estimates: list[np.ndarray] = []  # per cluster: (1 + G) totals / n
    errors: list[np.ndarray] = []  # … and their standard errors
    if len(cluster) == 0:
        return _finish(out, group_names, np.zeros((0, 1 + len(group_names))), np.zeros((0, 1 + len(group_names))), confidence)
    keys, inverse = np.unique(np.stack([cluster, stratum], axis=1), axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    valid = np.asarray(finite, dtype=bool)
    m = np.bincount(inverse, weights=valid, minlength=len(keys))
    big_n = np.zeros(len(keys))
    big_n[inverse] = stratum_size
    sums = np.stack([np.bincount(inverse, weights=terms[:, j] * valid, minlength=len(keys)) for j in range(terms.shape[1])], 1)
    means = np.divide(sums, m[:, None], out=np.zeros_like(sums), where=m[:, None] > 0)
    dev = (terms - means[inverse]) * valid[:, None]
    ss = np.stack([np.bincount(inverse, weights=dev[:, j] ** 2, minlength=len(keys)) for j in range(terms.shape[1])], 1)
    key_cluster = keys[:, 0]
    for c in np.unique(key_cluster):
        ks = np.flatnonzero(key_cluster == c)
        rows = (cluster == c) & valid
        size = int(cluster_sizes[c])
        m_c = int(m[ks].sum())
        out["cluster"].append(int(c))
        out["size"].append(size)
        out["n_sampled"].append(m_c)
        out["n_dropped"].append(int(((cluster == c) & ~valid).sum()))
        seen = ks[m[ks] > 0]
        if m_c == 0:
            estimates.append(np.zeros(terms.shape[1]))
            errors.append(np.full(terms.shape[1], np.inf))
            continue
        scale = size / big_n[seen].sum()  # spreads strata with no usable draw over the others
        total = scale * (big_n[seen, None] * means[seen]).sum(axis=0)
        pooled = terms[rows].var(axis=0, ddof=1) if m_c > 1 else np.full(terms.shape[1], np.inf)
        var = np.zeros(terms.shape[1])
        for kk in seen:
            if m[kk] >= big_n[kk]:
                continue  # stratum taken in full: no sampling error
            s2 = ss[kk] / (m[kk] - 1) if m[kk] > 1 else pooled
            var += big_n[kk] ** 2 * (1 - m[kk] / big_n[kk]) * s2 / m[kk]
        estimates.append(total / n)
        errors.append(scale * np.sqrt(var) / n)
    width = terms.shape[1]
    return _finish(out, group_names, np.array(estimates).reshape(-1, width), np.array(errors).reshape(-1, width), confidence)


def _finish(out: dict[str, list], group_names: list[str], estimates: np.ndarray, errors: np.ndarray,
            confidence: float) -> dict[str, np.ndarray]:
    cols = {
        "cluster": np.asarray(out["cluster"], dtype=np.int64),
        "size": np.asarray(out["size"], dtype=np.int64),
        "n_sampled": np.asarray(out["n_sampled"], dtype=np.int64),
        "n_dropped": np.asarray(out["n_dropped"], dtype=np.int64),
    }
    cols["df"] = np.maximum(cols["n_sampled"] - 1, 1).astype(np.float64)  # of the t statistic (Student)
    for j, (value, stderr, low, high) in enumerate(_quartets(group_names)):
        cols[value] = estimates[:, j].astype(np.float64)
        cols[stderr] = errors[:, j].astype(np.float64)
        cols[low], cols[high] = _interval(cols[value], cols[stderr], cols["df"], confidence)
    return cols


def _quartets(group_names: list[str]) -> list[tuple[str, ...]]:
    """(value, stderr, ci_low, ci_high) column names: the overall ones, then each group's."""
    return [("influence", "stderr", "ci_low", "ci_high")] + [
        tuple(group_column(g, stat) for stat in GROUP_STATS) for g in group_names]


def _interval(value: np.ndarray, stderr: np.ndarray, df: np.ndarray, confidence: float) -> tuple[np.ndarray, np.ndarray]:
    half = np.where(stderr == 0, 0.0, t_quantile(confidence, df) * stderr)  # keep exact zeros exact
    return value - half, value + half


def with_model_variance(pooled: dict[str, np.ndarray], members: list[dict[str, np.ndarray]], confidence: float,
                        group_names: list[str]) -> dict[str, np.ndarray]:
    """Add the between-model variance of an ensemble of E independently trained proxies to the intervals.

    ``pooled`` are the statistics of the terms averaged over the E members, ``members`` each member's own
    (the same rows and strata; the estimator is linear in the terms, so ``pooled``'s value is the members'
    mean). The ensemble mean's error has two parts, the sampling error of the rows (``pooled``'s
    stderr², df = m − 1) and the spread between models, s²_between / E (df = E − 1):

        stderr² = stderr²_sampling + s²_between / E,
        df = stderr⁴ / (stderr⁴_sampling / (m − 1) + (s²_between / E)² / (E − 1))   (Welch–Satterthwaite)

    so a cluster sampled whole (no sampling error) still gets an interval as wide as the models disagree.
    With E = 1 nothing can be said about the models and ``pooled`` is returned unchanged."""
    if len(members) < 2:
        return pooled
    e = len(members)
    out = dict(pooled)
    for value, stderr, low, high in _quartets(group_names):
        between = np.stack([m[value] for m in members]).var(axis=0, ddof=1) / e
        within = pooled[stderr] ** 2
        total = within + between
        with np.errstate(divide="ignore", invalid="ignore"):
            df = total**2 / (within**2 / pooled["df"] + between**2 / (e - 1))
        df = np.where(np.isfinite(df) & (total > 0), df, pooled["df"])
        out[stderr] = np.sqrt(total)
        out[low], out[high] = _interval(out[value], out[stderr], df, confidence)
        if value == "influence":
            out["df"] = df
            out["stderr_between_models"] = np.sqrt(between)
    return out


def call_p_values(influence: np.ndarray, stderr: np.ndarray, df: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(p, q) per cluster: the two-sided p-value of influence ≠ 0 and its Benjamini–Hochberg q-value.

    p = 2·P(T_df > |influence| / stderr), with the interval's own df (the interval's t statistic, so p < α
    exactly when the 1 − α interval excludes 0). A cluster whose total is known without sampling error
    (stderr 0) has p = 0 if its influence is non-zero and 1 if it is zero; one with no usable example
    (stderr inf) has p = 1. q is scipy's ``false_discovery_control`` (BH) over every cluster: calling
    the clusters with q ≤ α harmful or helpful keeps the expected share of false calls among them ≤ α,
    whereas k separate 95% intervals call about 5% of the truly negligible clusters by chance."""
    from scipy import stats

    influence, stderr = np.asarray(influence, dtype=np.float64), np.asarray(stderr, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.abs(influence) / stderr
    p = 2 * stats.t.sf(np.nan_to_num(t, nan=0.0, posinf=np.inf), np.maximum(np.asarray(df, dtype=np.float64), 1))
    p = np.where(stderr == 0, np.where(influence != 0, 0.0, 1.0), p)
    p = np.where(np.isfinite(stderr), p, 1.0)
    q = stats.false_discovery_control(p, method="bh") if len(p) else p
    return p, np.asarray(q, dtype=np.float64)


def merge_scores(parts: list[dict[str, np.ndarray]], clusters: np.ndarray, sizes: np.ndarray, group_names: list[str]) -> dict[str, np.ndarray]:
    """Concatenate the workers' score columns and add empty clusters, sorted by cluster; add the calls'
    ``p_value`` and ``q_value`` (:func:`call_p_values`: they need every cluster, so they are formed here)."""
    cols = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    missing = np.setdiff1d(clusters, cols["cluster"])
    if len(missing):
        if sizes[missing].any():
            raise AssertionError("a non-empty cluster has no sampled rows; the sample plan is inconsistent")
        for key in cols:
            fill = missing if key == "cluster" else np.zeros(len(missing), dtype=cols[key].dtype)
            cols[key] = np.concatenate([cols[key], fill])
    order = np.argsort(cols["cluster"], kind="stable")
    merged = {k: v[order] for k, v in cols.items()}
    merged["p_value"], merged["q_value"] = call_p_values(merged["influence"], merged["stderr"], merged["df"])
    return merged
