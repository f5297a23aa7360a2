"""Influence quality: leave-cluster-out retraining, sketch vs exact, planted harm, throughput, peer.

Usage (prints the figures, last line ``spearman_leave_cluster_out=<x> spearman_sketch_vs_exact=<y>``):

    .venv/bin/python benchmarks/influence_quality.py --quick
    .venv/bin/python benchmarks/influence_quality.py --quick --peer-site /tmp/kf-site   # + kronfluence
    .venv/bin/python benchmarks/influence_quality.py            # full: + group LDS, three pool sizes

Data: a documented **synthetic stand-in** for the embed + cluster outputs of the fashion-captions
benchmark (the embed stage was not available when this was written). Image-like embeddings around
10 class prototypes; each cluster is a slice of one class (own offset); a "minority" style shift on
~10% of rows (the ``group``); 10% of the clusters are *planted harmful*: their captions are
systematically swapped to another class, as in the benchmark's caption swaps. The proxy is the
``probe`` task (linear classifier on the embedding predicting the caption class), trained to
convergence with L-BFGS in float64 (weight decay ``--wd``); the validation set is clean and
group-balanced.

- leave-cluster-out: ≥ 20 clusters (top, bottom and random by predicted score) are each removed and
  the proxy retrained from the full-data optimum (same objective, 1/n kept); actual = change of the
  validation loss; Spearman against the predicted influence (sampled m per cluster, sketched k < p);
- sketch vs exact: the sketched estimate (k < p) over every example against exact influence with the
  full p × p Hessian (no projection); the last line reports this; the stage's full estimate (also
  sampled, m per cluster) against exact is printed beside it;
- planted harm: share of the planted-harmful clusters in the bottom decile, and how many have a
  confidence interval entirely below 0;
- throughput: sampled examples/s of the sketch path; the peer (kronfluence, EK-FAC, if
  ``--peer-site`` points at a directory where it is installed) on the same model and data.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import torch
from scipy.stats import spearmanr
from torch.func import functional_call, grad, hessian, vmap

from influencespace.influence import DataSpec, Shard, compute_influence, get_task, sample_clusters
from influencespace.influence.engine import to_tensors
from influencespace.influence.proxy import get_state, mean_loss, retrain, set_state


def make_pool(n: int, clusters: int, dim: int, classes: int, harmful_share: float, seed: int, n_val: int = 1000):
    rng = np.random.default_rng(seed)
    protos = rng.normal(size=(classes, dim)) * 1.2
    style = rng.normal(size=dim) * 1.0  # the minority group's shift ("inverted polarity")
    cluster_class = rng.integers(0, classes, clusters)
    offsets = rng.normal(size=(clusters, dim)) * 0.8
    sizes = np.maximum(5, rng.dirichlet(np.full(clusters, 2.0)) * n).astype(int)
    cluster = np.repeat(np.arange(clusters), sizes)
    n = len(cluster)
    harmful = np.sort(rng.choice(clusters, size=max(1, int(round(harmful_share * clusters))), replace=False))
    label = cluster_class[cluster]
    caption = label.copy()
    for c in harmful:
        caption[cluster == c] = (cluster_class[c] + 1 + rng.integers(0, classes - 1)) % classes
    minority = rng.random(n) < 0.1
    x = protos[label] + offsets[cluster] + rng.normal(size=(n, dim)) * 1.0 + minority[:, None] * style
    val_label = rng.integers(0, classes, n_val)
    val_minority = np.arange(n_val) % 2 == 0
    val_x = protos[val_label] + rng.normal(size=(n_val, dim)) * 1.3 + val_minority[:, None] * style
    return SimpleNamespace(
        ids=np.array([f"p{i:07d}" for i in range(n)]),
        x=x,
        caption=caption,
        cluster=cluster,
        group=minority.astype(np.int64),
        harmful=harmful,
        clusters=clusters,
        val_x=val_x,
        val_label=val_label,
        val_group=val_minority.astype(np.int64),
    )


def settings(args, k: int) -> SimpleNamespace:
    return SimpleNamespace(
        dtype="float64", projection_dim=k, seed=0, projection="gaussian", fisher="ggn", batch_size=256, rank=k,
        damping=args.damping, damping_floor=1e-12, weight_decay=args.wd, confidence=0.95, projector_cache_mib=256,
    )


def build_proxy(pool, args):
    task = get_task("probe")
    dim, classes = pool.x.shape[1], int(pool.caption.max()) + 1
    model = task.build_model(DataSpec({"embedding": dim}, classes), {}, torch.Generator().manual_seed(0)).double()
    feats = to_tensors({"embedding": pool.x, "label": pool.caption}, torch.float64, "cpu")
    names = task.tracked_parameters(model)
    state = retrain(task, model, feats, torch.ones(len(pool.x), dtype=torch.float64), args.wd, get_state(model, names), max_iter=2000)
    set_state(model, state)
    val = to_tensors({"embedding": pool.val_x, "label": pool.val_label}, torch.float64, "cpu")
    return task, model, state, feats, val


def sketched_scores(pool, task, model, state, args, k: int, m: int):
    plan = sample_clusters(pool.ids, pool.cluster, pool.group, m=m, seed=0)
    shard = Shard(
        {"embedding": pool.x[plan.rows], "label": pool.caption[plan.rows]}, plan.cluster, plan.stratum,
        plan.stratum_size, plan.weight, {"embedding": pool.val_x, "label": pool.val_label}, pool.val_group,
    )
    t0 = time.perf_counter()
    result = compute_influence(
        task, model, [state], shard, group_names=["majority", "minority"], cluster_ids=plan.clusters,
        cluster_sizes=plan.sizes, settings=settings(args, k),
    )
    return result.scores, len(plan.rows) / (time.perf_counter() - t0)


def exact_scores(pool, model, feats, val, wd):
    """(1/n) g_valᵀ (H + wd·I)⁻¹ Σ_{i∈c} ∇ℓ_i with the exact Hessian over every example."""
    t0 = time.perf_counter()
    names = ["weight", "bias"]
    params = dict(model.named_parameters())
    shapes = [(n, params[n].shape, params[n].numel()) for n in names]

    def unflat(theta):
        out, i = {}, 0
        for name, shape, size in shapes:
            out[name] = theta[i : i + size].reshape(shape)
            i += size
        return out

    def losses(theta, f):
        logits = vmap(lambda ex: functional_call(model, unflat(theta), (ex,)))(f)[:, 0]
        return torch.nn.functional.cross_entropy(logits, f["label"], reduction="none")

    theta0 = torch.cat([params[n].detach().reshape(-1) for n in names])
    h = hessian(lambda t: losses(t, feats).mean())(theta0)
    g_val = grad(lambda t: losses(t, val).mean())(theta0)
    u = torch.linalg.solve(h + wd * torch.eye(len(h), dtype=torch.float64), g_val)
    per_example = vmap(grad(lambda t, ex: losses(t, {k: v[None] for k, v in ex.items()}).sum()), in_dims=(None, 0))(theta0, feats)
    t_i = (per_example @ u).numpy()
    n = len(t_i)
    return np.bincount(pool.cluster, weights=t_i, minlength=pool.clusters) / n, n / (time.perf_counter() - t0), len(theta0)


def leave_cluster_out(pool, task, model, state, feats, val, chosen, wd):
    base = mean_loss(task, model, val, measurement=True)
    actual = []
    work = model
    for c in chosen:
        weights = torch.as_tensor((pool.cluster != c).astype(np.float64))
        new = retrain(task, work, feats, weights, wd, state, max_iter=2000)
        set_state(work, new)
        actual.append(mean_loss(task, work, val, measurement=True) - base)
        set_state(work, state)
    return np.array(actual)


def group_lds(pool, task, model, state, feats, val, scores, wd, subsets: int, seed: int = 0):
    """Linear datamodeling score per group over random half-subsets of clusters."""
    rng = np.random.default_rng(seed)
    out = {}
    base = {g: mean_loss(task, model, {k: v[pool.val_group == g] for k, v in val.items()}, measurement=True) for g in (0, 1)}
    actual = {0: [], 1: []}
    predicted = {0: [], 1: []}
    for _ in range(subsets):
        dropped = rng.random(pool.clusters) < 0.5
        weights = torch.as_tensor((~dropped[pool.cluster]).astype(np.float64))
        new = retrain(task, model, feats, weights, wd, state, max_iter=2000)
        set_state(model, new)
        for g, col in ((0, "influence_group_majority"), (1, "influence_group_minority")):
            part = {k: v[pool.val_group == g] for k, v in val.items()}
            actual[g].append(mean_loss(task, model, part, measurement=True) - base[g])
            predicted[g].append(scores[col][dropped].sum())
        set_state(model, state)
    for g, name in ((0, "majority"), (1, "minority")):
        out[name] = spearmanr(predicted[g], actual[g])[0]
    return out


def peer_kronfluence(site: str, pool, model, feats, val, chunks: int = 1):
    """kronfluence (EK-FAC) on an equivalent nn.Linear, same data; cluster sums of per-example scores."""
    sys.path.insert(0, site)
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments
    from kronfluence.task import Task as KTask

    class Probe(KTask):
        def compute_train_loss(self, batch, model, sample=False):
            x, y = batch
            logits = model(x)
            if sample:
                with torch.no_grad():
                    y = torch.multinomial(torch.softmax(logits, -1), 1).flatten()
            return torch.nn.functional.cross_entropy(logits, y, reduction="sum")

        def compute_measurement(self, batch, model):
            x, y = batch
            return torch.nn.functional.cross_entropy(model(x), y, reduction="sum")

    linear = torch.nn.Linear(model.weight.shape[1], model.weight.shape[0]).double()
    with torch.no_grad():
        linear.weight.copy_(model.weight)
        linear.bias.copy_(model.bias)
    net = prepare_model(torch.nn.Sequential(linear), Probe())
    train = torch.utils.data.TensorDataset(feats["embedding"], feats["label"])
    query = torch.utils.data.TensorDataset(val["embedding"], val["label"])
    import tempfile

    analyzer = Analyzer("bench", net, Probe(), cpu=True, output_dir=tempfile.mkdtemp(), disable_tqdm=True)
    t0 = time.perf_counter()
    factor_args = FactorArguments(strategy="ekfac", activation_covariance_dtype=torch.float64,
                                  gradient_covariance_dtype=torch.float64, lambda_dtype=torch.float64)
    analyzer.fit_all_factors("f", train, per_device_batch_size=512, factor_args=factor_args, overwrite_output_dir=True)
    analyzer.compute_pairwise_scores("s", "f", query, train, per_device_query_batch_size=len(query),
                                     per_device_train_batch_size=512, overwrite_output_dir=True)
    seconds = time.perf_counter() - t0
    scores = analyzer.load_pairwise_scores("s")["all_modules"].sum(0).double().numpy()
    return np.bincount(pool.cluster, weights=scores, minlength=pool.clusters), len(train) / seconds


def scale_point(n: int, args) -> None:
    """One pool size (run in a subprocess so ru_maxrss is this size's peak)."""
    pool = make_pool(n, args.clusters, args.dim, args.classes, 0.1, seed=1)
    task, model, state, _, _ = build_proxy(pool, args)
    t0 = time.perf_counter()
    _, rate = sketched_scores(pool, task, model, state, args, args.k, args.m)
    print(f"scale n={len(pool.x)} examples_per_s={rate:.0f} seconds={time.perf_counter() - t0:.2f} "
          f"peak_rss_mb={resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small pool, 24 left-out clusters, no LDS / scale")
    parser.add_argument("--peer-site", help="directory with kronfluence installed (benchmark-only environment)")
    parser.add_argument("--n", type=int, default=None)
    parser.add_argument("--clusters", type=int, default=60)
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--k", type=int, default=128, help="sketch dim (p = classes·dim + classes = 170 by default)")
    parser.add_argument("--m", type=int, default=32, help="samples per cluster")
    parser.add_argument("--damping", type=float, default=1e-3)
    parser.add_argument("--wd", type=float, default=1e-3)
    parser.add_argument("--scale-point", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if args.scale_point:
        scale_point(args.scale_point, args)
        return
    n = args.n or (4000 if args.quick else 12000)
    pool = make_pool(n, args.clusters, args.dim, args.classes, 0.1, seed=1)
    print(f"data: synthetic stand-in, n={len(pool.x)} clusters={pool.clusters} planted_harmful={len(pool.harmful)}")
    task, model, state, feats, val = build_proxy(pool, args)
    scores, rate = sketched_scores(pool, task, model, state, args, args.k, args.m)
    exact, exact_rate, p = exact_scores(pool, model, feats, val, args.wd)
    predicted = scores["influence"]
    # The sketch alone (every example, k < p) against exact: the projection's error, no sampling error.
    full, _ = sketched_scores(pool, task, model, state, args, args.k, m=len(pool.x))
    rho_sketch = spearmanr(full["influence"], exact)[0]
    rho_estimator = spearmanr(predicted, exact)[0]
    print(f"params p={p} sketch k={args.k} m={args.m} sampled={int(scores['n_sampled'].sum())}")
    print(f"vs exact (spearman): sketch alone={rho_sketch:.3f} sketch+sampling (the stage's estimate)={rho_estimator:.3f}")
    print(f"influence examples/s: sketch={rate:.0f} exact_full_hessian={exact_rate:.0f}")

    order = np.argsort(predicted)
    rng = np.random.default_rng(0)
    middle = order[8:-8]
    chosen = np.concatenate([order[:8], order[-8:], rng.choice(middle, 8, replace=False)])
    t0 = time.perf_counter()
    actual = leave_cluster_out(pool, task, model, state, feats, val, chosen, args.wd)
    rho_loo = spearmanr(predicted[chosen], actual)[0]
    rho_exact_loo = spearmanr(exact[chosen], actual)[0]
    print(f"leave-cluster-out: {len(chosen)} clusters retrained in {time.perf_counter() - t0:.1f}s; "
          f"spearman ours={rho_loo:.3f} exact={rho_exact_loo:.3f}")

    decile = max(1, pool.clusters // 10)
    bottom = set(order[:decile].tolist())
    share = len(bottom & set(pool.harmful.tolist())) / len(pool.harmful)
    confident = int((scores["ci_high"][pool.harmful] < 0).sum())
    print(f"planted harmful: {share:.2f} of {len(pool.harmful)} in the bottom decile; "
          f"{confident}/{len(pool.harmful)} with ci_high < 0")

    if args.peer_site:
        try:
            peer, peer_rate = peer_kronfluence(args.peer_site, pool, model, feats, val)
            rho_peer = spearmanr(peer[chosen], actual)[0]
            print(f"peer kronfluence (ekfac): spearman_leave_cluster_out={rho_peer:.3f} examples/s={peer_rate:.0f} "
                  f"(ours {rho_loo:.3f}, {rate:.0f}/s; ratio ours/peer throughput={rate / peer_rate:.2f})")
        except Exception as exc:  # the peer is optional; say why it did not run
            print(f"peer kronfluence: not run ({type(exc).__name__}: {exc})")
    else:
        print("peer kronfluence: not run (pass --peer-site DIR with kronfluence installed)")

    if not args.quick:
        lds = group_lds(pool, task, model, state, feats, val, scores, args.wd, subsets=50)
        print("group LDS (50 half-subsets): " + " ".join(f"{g}={v:.3f}" for g, v in lds.items()))
        for size in (n // 4, n, n * 4):
            out = subprocess.run([sys.executable, __file__, "--scale-point", str(size)], capture_output=True, text=True)
            print(out.stdout.strip() or out.stderr.strip()[-300:])

    print(f"spearman_leave_cluster_out={rho_loo:.4f} spearman_sketch_vs_exact={rho_sketch:.4f}")


if __name__ == "__main__":
    main()
