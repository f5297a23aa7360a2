"""The proxy model: a short warm-start run on a random subset, and full-batch retraining.

``warm_start`` trains the tracked parameters with Adam on minibatches of the per-example training
loss plus the L2 term (weight_decay/2)·‖θ‖², and returns ``checkpoints`` parameter states taken evenly
over the second half of the run (the last one is the final state). Scores are computed under each
and averaged (TRAK's finding: averaging over a few checkpoints or models makes the estimate less
noisy).

``retrain`` minimises the weighted full-batch objective (1/n) Σ_i w_i ℓ_i + (weight_decay/2)·‖θ‖² with
L-BFGS from a given state: what leave-cluster-out validation uses (w_i = 0 for the left-out cluster,
keeping the 1/n of the full objective so that the result matches the influence linearisation).
"""

from __future__ import annotations

import copy

import torch
from torch.func import functional_call, vmap

from influencespace.influence.tasks import Task

State = dict[str, torch.Tensor]


def get_state(model: torch.nn.Module, names: list[str]) -> State:
    params = dict(model.named_parameters())
    return {n: params[n].detach().clone() for n in names}


def set_state(model: torch.nn.Module, state: State) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, value in state.items():
            params[n].copy_(value.to(dtype=params[n].dtype, device=params[n].device))


def per_example_losses(task: Task, model: torch.nn.Module, features: dict[str, torch.Tensor], measurement: bool = False):
    """ℓ_i for a batch of examples (vmap over the one-example forward)."""
    loss = task.measurement if measurement else task.train_loss

    def one(example):
        return loss(functional_call(model, {}, (example,)), example)

    return vmap(one)(features)


def mean_loss(task, model, features, measurement: bool = False, chunk: int = 4096) -> float:
    n = next(iter(features.values())).shape[0]
    total = 0.0
    with torch.no_grad():
        for start in range(0, n, chunk):
            part = {k: v[start : start + chunk] for k, v in features.items()}
            total += float(per_example_losses(task, model, part, measurement).sum())
    return total / max(n, 1)


def _l2(model, names):
    params = dict(model.named_parameters())
    return sum((params[n] ** 2).sum() for n in names)


def warm_start(
    task: Task,
    model: torch.nn.Module,
    features: dict[str, torch.Tensor],
    steps: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    seed: int,
    checkpoints: int = 1,
) -> list[State]:
    """Train the proxy for ``steps`` Adam steps on minibatches of ``features``; return the checkpoints."""
    names = task.tracked_parameters(model)
    n = next(iter(features.values())).shape[0]
    if steps == 0 or n == 0:
        return [get_state(model, names)] * checkpoints
    params = dict(model.named_parameters())
    opt = torch.optim.Adam([params[name] for name in names], lr=lr)
    gen = torch.Generator().manual_seed(seed)
    keep = {max(1, round(steps * (checkpoints + j + 1) / (2 * checkpoints))) for j in range(checkpoints)}
    keep.add(steps)
    states: list[State] = []
    for step in range(1, steps + 1):
        idx = torch.randint(0, n, (min(batch_size, n),), generator=gen)
        batch = {k: v[idx.to(v.device)] for k, v in features.items()}
        opt.zero_grad()
        loss = per_example_losses(task, model, batch).mean() + weight_decay / 2 * _l2(model, names)
        loss.backward()
        opt.step()
        if step in keep:
            states.append(get_state(model, names))
    return states[-checkpoints:]


def retrain(
    task: Task,
    model: torch.nn.Module,
    features: dict[str, torch.Tensor],
    weights: torch.Tensor,
    weight_decay: float,
    init: State,
    max_iter: int = 500,
    tolerance: float = 1e-12,
) -> State:
    """Full-batch L-BFGS on (1/n) Σ w_i ℓ_i + (wd/2)‖θ‖² from ``init``; returns the new state (model untouched)."""
    work = copy.deepcopy(model)
    set_state(work, init)
    names = list(init)
    params = dict(work.named_parameters())
    n = weights.shape[0]
    opt = torch.optim.LBFGS(
        [params[name] for name in names],
        lr=1.0,
        max_iter=max_iter,
        tolerance_grad=tolerance,
        tolerance_change=tolerance,
        history_size=50,
        line_search_fn="strong_wolfe",
    )

    def closure():
        opt.zero_grad()
        loss = (per_example_losses(task, work, features) * weights).sum() / n + weight_decay / 2 * _l2(work, names)
        loss.backward()
        return loss

    opt.step(closure)
    return get_state(work, names)
