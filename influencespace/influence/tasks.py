"""The model whose training the data feeds, as a kronfluence-style ``Task``, and a registry of tasks.

A task says four things (kronfluence's ``Task``, without its shared state):

- ``build_model``: the proxy model, an ``nn.Module`` whose ``forward`` takes **one** example (a dict of
  1-D tensors) and returns logits of shape ``(R, C)``: ``R`` classification problems of ``C`` classes.
  Per-example code runs it under ``torch.func.vmap``, so it must not depend on a batch dimension.
- ``targets``: the ``(R,)`` long tensor of correct classes of one example.
- ``train_loss`` (per example, so the training objective is additive over examples) and
  ``measurement`` (per validation example; its mean is the validation loss the influence is about).
  Both default to the mean cross-entropy over the ``R`` rows. With that default the Gauss–Newton
  curvature is exact (``influence.fisher: ggn``); a task that overrides ``train_loss`` must use
  ``influence.fisher: empirical``.
- ``tracked_parameters``: the parameter names whose gradients are sketched (default: all).

Built-in tasks:

``contrastive``
    CLIP-style heads ``h_v = normalize(W_v v)``, ``h_t = normalize(W_t t)`` on the frozen tower embeddings.
    CLIP's in-batch loss couples the examples of a batch; here the negatives come from a *fixed bank*
    of B pool pairs drawn once (a buffer, not trained data), so the loss of example i depends on i
    alone and the training objective is a sum over examples, which influence functions need.
    Row 0 scores the image against its caption and the B bank captions, row 1 the caption against
    its image and the B bank images; the target of both rows is 0 (the true partner). The logits'
    inverse temperature is fixed (``influence.logit_scale``: a number) or learned like the target's
    (``learned``, from ``influence.logit_scale_init``).
``open_clip``
    The ``open_clip`` training target's own last layers: ``contrastive`` over the pooled features of a
    proxy of the target trained as the train stage trains it, with heads started at its projections
    and temperature (:mod:`influencespace.influence.target`).
``probe``
    A linear classifier (weights and bias) over the fused embedding predicting ``label``. Linear in
    its parameters, so its Gauss–Newton matrix *is* its Hessian: the exact reference in the tests.

Register your own with :func:`register_task` (a ``Task`` subclass or a zero-argument factory).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from influencespace.influence.errors import InfluenceError

LEARNED = "learned"  # influence.logit_scale: the temperature is a trained parameter, as in the train stage's model
MAX_LOGIT_SCALE = 100.0  # the train stage's cap on exp(τ) (CLIP's); tests/influence/test_tasks.py keeps them equal


@dataclass(frozen=True)
class DataSpec:
    """What a task needs to know about the data to build its model."""

    dims: dict[str, int]  # feature name -> width, e.g. {"image": 512, "text": 512, "embedding": 1024}
    num_classes: int | None = None  # probe tasks: number of distinct labels
    options: dict[str, float] = field(default_factory=dict)  # task options from the config (head_dim, ...)


class Task:
    """Base class of influence tasks; see the module docstring for the contract."""

    name: str = "task"
    features: tuple[str, ...] = ()  # example fields the task reads ("image", "text", "embedding", "label")

    def build_model(self, spec: DataSpec, bank: dict[str, torch.Tensor], generator: torch.Generator) -> nn.Module:
        raise NotImplementedError

    def bank_size(self, spec: DataSpec) -> int:
        """Examples to draw from the pool for a fixed negative bank (0: none)."""
        return 0

    def targets(self, example: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def train_loss(self, logits: torch.Tensor, example: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per-example training loss; the default is the mean cross-entropy over the logit rows."""
        return F.cross_entropy(logits, self.targets(example))

    def measurement(self, logits: torch.Tensor, example: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per-example validation measurement (default: the training loss on that example)."""
        return self.train_loss(logits, example)

    def tracked_parameters(self, model: nn.Module) -> list[str]:
        return [name for name, p in model.named_parameters() if p.requires_grad]

    def uses_cross_entropy(self) -> bool:
        """True when ``train_loss`` is the default cross-entropy (the exact Gauss–Newton path applies)."""
        return type(self).train_loss is Task.train_loss


class ContrastiveHeads(nn.Module):
    """Trainable projection heads over frozen image/text embeddings, scored against a fixed bank.

    ``scale`` is the inverse temperature s of the logits: a fixed number, or ``learned`` — then, as in
    the train stage's ClipHeads, s = min(exp(τ), MAX_LOGIT_SCALE) with τ = log(``scale_init``) a
    tracked parameter, so the warm start learns the temperature and every per-example gradient,
    sketch and curvature term carries ∂ℓ/∂τ beside the heads'.
    """

    def __init__(self, image_dim: int, text_dim: int, head_dim: int, scale: float | str, bank_image, bank_text, generator,
                 scale_init: float = 1 / 0.07):
        super().__init__()
        self.image_head = nn.Parameter(torch.randn(head_dim, image_dim, generator=generator) / image_dim**0.5)
        self.text_head = nn.Parameter(torch.randn(head_dim, text_dim, generator=generator) / text_dim**0.5)
        self.register_buffer("bank_image", bank_image)
        self.register_buffer("bank_text", bank_text)
        if scale == LEARNED:
            self.log_scale = nn.Parameter(torch.full((1,), math.log(scale_init), dtype=self.image_head.dtype))
            self.scale = None
        else:
            self.scale = float(scale)

    def logit_scale(self) -> torch.Tensor | float:
        if self.scale is not None:
            return self.scale
        return self.log_scale.exp().clamp(max=MAX_LOGIT_SCALE)[0]

    def forward(self, example: dict[str, torch.Tensor]) -> torch.Tensor:
        z_img = F.normalize(self.image_head @ example["image"], dim=-1)
        z_txt = F.normalize(self.text_head @ example["text"], dim=-1)
        bank_img = F.normalize(self.bank_image @ self.image_head.T, dim=-1)
        bank_txt = F.normalize(self.bank_text @ self.text_head.T, dim=-1)
        pair = (z_img @ z_txt).reshape(1)
        image_row = torch.cat([pair, bank_txt @ z_img])
        text_row = torch.cat([pair, bank_img @ z_txt])
        return self.logit_scale() * torch.stack([image_row, text_row])


class ContrastiveTask(Task):
    name = "contrastive"
    features = ("image", "text")

    def bank_size(self, spec: DataSpec) -> int:
        return int(spec.options.get("negatives", 31))

    def build_model(self, spec, bank, generator):
        if bank.get("image") is None or len(bank["image"]) == 0:
            raise InfluenceError("the contrastive task needs a negative bank; set influence.negatives ≥ 1")
        return ContrastiveHeads(
            spec.dims["image"],
            spec.dims["text"],
            int(spec.options.get("head_dim", 64)),
            spec.options.get("logit_scale", 10.0),
            bank["image"],
            bank["text"],
            generator,
            scale_init=float(spec.options.get("logit_scale_init", 1 / 0.07)),
        )

    def targets(self, example):
        # The true partner is column 0 of both rows; built from the input so vmap sees no constant.
        return torch.zeros(2, dtype=torch.long, device=example["image"].device)


class LinearProbe(nn.Module):
    def __init__(self, dim: int, num_classes: int, generator):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_classes, dim, generator=generator) * 0.01)
        self.bias = nn.Parameter(torch.zeros(num_classes))

    def forward(self, example):
        return (self.weight @ example["embedding"] + self.bias).unsqueeze(0)


class ProbeTask(Task):
    name = "probe"
    features = ("embedding", "label")

    def build_model(self, spec, bank, generator):
        if not spec.num_classes or spec.num_classes < 2:
            raise InfluenceError(
                "the probe task needs a 'label' column with at least 2 classes in the embed outputs; "
                "use influence.task=contrastive for unlabelled data"
            )
        return LinearProbe(spec.dims["embedding"], spec.num_classes, generator)

    def targets(self, example):
        return example["label"].reshape(1).long()


class TargetHeadsTask(ContrastiveTask):
    """The contrastive task whose heads start at a trained open_clip model's projections and temperature."""

    name = "open_clip"  # influence.target.TASK

    def __init__(self) -> None:
        self.heads: dict[str, torch.Tensor] | None = None  # set by the stage: image_head, text_head, log_scale

    def build_model(self, spec: DataSpec, bank, generator):
        if self.heads is None:
            raise InfluenceError("the open_clip influence task has no trained proxy yet (the influence stage trains "
                                 "one before building the model)")
        if bank.get("image") is None or len(bank["image"]) == 0:
            raise InfluenceError("the open_clip influence task needs a negative bank; set influence.negatives ≥ 1")
        image_head, text_head = self.heads["image_head"], self.heads["text_head"]
        model = ContrastiveHeads(image_head.shape[1], text_head.shape[1], image_head.shape[0], LEARNED,
                                 bank["image"], bank["text"], generator)
        with torch.no_grad():
            model.image_head.copy_(image_head)
            model.text_head.copy_(text_head)
            model.log_scale.copy_(self.heads["log_scale"].reshape(1))
        return model


_REGISTRY: dict[str, Callable[[], Task]] = {"contrastive": ContrastiveTask, "probe": ProbeTask, "open_clip": TargetHeadsTask}


def register_task(name: str, factory: Callable[[], Task]) -> None:
    """Make a task available as ``influence.task: <name>`` (in every process that imports the caller)."""
    _REGISTRY[name] = factory


def get_task(name: str) -> Task:
    if name not in _REGISTRY:
        raise InfluenceError(
            f"unknown influence task '{name}'; registered: {', '.join(sorted(_REGISTRY))} "
            "(register your own with influencespace.influence.register_task)"
        )
    return _REGISTRY[name]()


def task_names() -> list[str]:
    return sorted(_REGISTRY)
