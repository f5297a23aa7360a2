"""Influence for the ``open_clip`` training target: its own last layers, on a proxy trained as it is.

With ``train.target: open_clip`` the model that curation serves is a whole CLIP trained from pixels,
so the gradients that score the clusters should be that model's, not those of heads over another
model's embeddings. ``influence.task: open_clip`` does this in three steps, after the sample plan
(:func:`~influencespace.influence.inputs.plan_inputs`) has drawn its rows:

1. **The proxy is trained the way the train stage trains.** The target (same architecture, same
   preprocessing, same :class:`~influencespace.train.recipe.Hyperparameters`, ``train.epochs``) is
   trained by the train stage's own recipe (:func:`~influencespace.train.recipe.train_run`, DeepSpeed's
   engine on a one-rank group in this process) on the plan's ``proxy_rows`` (``sample/proxy``), read
   from the raw pairs as every training run reads them (:mod:`influencespace.train.pixels`).
2. **Every row the stage reads is encoded by the proxy's towers up to their last layer.** For the
   sampled rows of each rank, the proxy rows, the negative bank and the validation set, the raw
   pixels and captions pass through the trained towers *without* their final projections:
   f_v = the image tower's pooled token (width d_v), f_t = the text tower's pooled token (d_t). The
   files are rewritten with these in place of the embed columns (``sample_target/``), and the rest of
   the stage runs unchanged on them.
3. **The task is the target's own last layers.** :class:`~.tasks.TargetHeadsTask` is the contrastive task
   with its heads started at the proxy's: W_v = ``visual.proj``ᵀ, W_t = ``text_projection``ᵀ and
   τ = ``logit_scale`` (learned, capped at 100 as in training). Since open_clip computes
   normalize(f_v·proj), these heads *are* the last layers of the trained model, and a per-example
   gradient of the task is the gradient of the model's loss (against the fixed negative bank, see
   :mod:`.tasks`) with respect to its projections and temperature. ``influence.proxy_steps`` Adam
   steps then move them to the optimum of the bank objective the influence maths assumes.

What this leaves out, stated: the towers below the projections are held fixed (the curvature and
gradients are of the last layers only — what "last-layer influence" means); one proxy is trained
(``influence.ensemble`` must be 1, since each member would need its own encoded features); and the
row pass is refused (``influence.score_rows`` needs every pool row encoded, not only the sample).

Memory: the proxy trains as a training worker does (one shard's kept ids, one decoded chunk, one
shuffle window); each encoding task holds one sample file's rows and their pixels. Nothing holds
the pool.
"""

from __future__ import annotations

import functools
import io
import re
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from influencespace import storage
from influencespace.influence.errors import InfluenceError

TASK = "open_clip"
TARGET_DIR = "sample_target"  # the plan's files re-encoded by the proxy's towers
PROXY_RUN_DIR = "proxy_target"  # the proxy's training run (model.pt, run.json) and its manifest parts
VALIDATION_DIR = "validation"
_ROUND_PREFIX = re.compile(r"^r\d+-")


def check_settings(cfg: Any, train: Any) -> None:
    """What the task cannot do, as errors that say what to set."""
    if train.target != "open_clip":
        raise InfluenceError(f"influence.task=open_clip scores the open_clip target's own gradients, but train.target is "
                             f"'{train.target}'; set train.target=open_clip, or use influence.task=contrastive")
    if cfg.ensemble != 1 or cfg.checkpoints != 1:
        raise InfluenceError("influence.task=open_clip trains one proxy of the target (each ensemble member or checkpoint "
                             "would need the sample re-encoded by its own towers); set influence.ensemble=1 and "
                             "influence.checkpoints=1")
    if cfg.score_rows:
        raise InfluenceError("influence.task=open_clip encodes only the sampled rows with the proxy's towers, so it cannot "
                             "score every pool row; set influence.score_rows=false (and curate.row_order to random or "
                             "image_text)")


def proxy_settings(cfg: Any, train: Any) -> dict[str, Any]:
    """The settings the proxy depends on beyond the influence section (for the stage's fingerprint)."""
    keys = ("target", "open_clip_model", "open_clip_config", "pretrained", "epochs", "batch_size", "lr", "optimizer",
            "weight_decay", "zero_stage", "precision", "gradient_clipping", "gradient_accumulation", "shuffle_window")
    return {key: getattr(train, key) for key in keys}


# --------------------------------------------------------------------------------------------------
# The proxy


def _pool_shard_name(file_name: str) -> str:
    """``part-NNNNN.parquet`` of a sample file ``r<round>-part-NNNNN.parquet``."""
    return _ROUND_PREFIX.sub("", file_name.rsplit("/", 1)[-1])


def train_proxy(target: Any, hp: Any, epochs: int, seed: int, proxy_uri: str, raw_pool: dict[int, str],
                work_uri: str, stage_dir: str, use_gpu: bool) -> dict:
    """Train the target on the proxy rows with the train stage's recipe; returns its state dict."""
    import pyarrow as pa
    import torch

    from influencespace.runtime import local_process_group
    from influencespace.train.data import VariantData, variant_rows
    from influencespace.train.pixels import shard_index
    from influencespace.train.recipe import MODEL_FILE, RunSpec, Session, steps_per_epoch, train_run

    files = storage.parquet_files(proxy_uri) if storage.exists(proxy_uri) else []
    pairs, raw, rows = [], [], 0
    for uri in files:
        ids = storage.read_table(uri, columns=["id"]).column("id")
        manifest = storage.join(work_uri, "manifests", uri.rsplit("/", 1)[-1])
        storage.write_table(pa.table({"id": ids, "keep": pa.array(np.ones(len(ids), bool)),
                                      "weight": pa.array(np.ones(len(ids)))}), manifest)
        pairs.append((uri, manifest))
        raw.append(raw_pool[shard_index(_pool_shard_name(uri))])
        rows += len(ids)
    if rows == 0:
        raise InfluenceError("influence.task=open_clip drew no proxy rows to train the target's proxy on; raise "
                             "influence.proxy_rows")
    data = VariantData(pairs=tuple(pairs), rows=rows, weight_sum=float(rows), raw=tuple(raw))
    spec = RunSpec(variant="proxy", seed=seed, manifest_uri=None, epochs=epochs,
                   steps_per_epoch=steps_per_epoch("same_epochs", rows, rows, hp.batch_size),
                   output_uri=work_uri, checkpoint_root=storage.join(work_uri, "_checkpoints"), stage_dir=stage_dir)
    with local_process_group(use_gpu) as device:
        # No epoch checkpoints are kept: a killed influence stage trains its proxy again (minutes, not hours).
        session = Session(rank=0, world_size=1, device=device, report=lambda metrics, directory, name: None)
        train_run(spec, hp, target, data, lambda: variant_rows(data, target.read), session)
    return torch.load(io.BytesIO(storage.read_bytes(storage.join(work_uri, MODEL_FILE))), weights_only=True)


def last_layers(model: Any) -> dict[str, Any]:
    """The heads of :class:`TargetHeadsTask` from an open_clip model: projectionsᵀ and log temperature."""
    proj, text_projection = getattr(model.visual, "proj", None), getattr(model, "text_projection", None)
    import torch

    if not isinstance(proj, torch.nn.Parameter) or not isinstance(text_projection, torch.nn.Parameter):
        raise InfluenceError(
            f"influence.task=open_clip needs open_clip's own towers, whose last layers are projection matrices "
            f"(visual.proj, text_projection); this model has {type(proj).__name__} and {type(text_projection).__name__} "
            "(timm or Hugging Face towers): use influence.task=contrastive"
        )
    return {"image_head": proj.detach().T.clone(), "text_head": text_projection.detach().T.clone(),
            "log_scale": model.logit_scale.detach().reshape(1).clone()}


def pooled_features(model: Any, pixels: Any, tokens: Any) -> tuple[Any, Any]:
    """(f_v, f_t): the towers' pooled tokens before their final projections (what ``last_layers`` multiplies)."""
    import torch

    proj, text_projection = model.visual.proj, model.text_projection
    model.visual.proj, model.text_projection = None, None
    try:
        with torch.no_grad():
            return model.encode_image(pixels), model.encode_text(tokens)
    finally:
        model.visual.proj, model.text_projection = proj, text_projection


# --------------------------------------------------------------------------------------------------
# Encoding the plan's files


@dataclass(frozen=True)
class Encoding:
    """What an encoding task needs (plain data): the target, where its weights are, the columns to replace."""

    target: Any
    model_uri: str
    columns: tuple[str, str]  # the image and text feature columns of the plan's files
    batch: int = 256


@functools.lru_cache(maxsize=2)
def _model(target: Any, model_uri: str) -> Any:
    import torch

    state = torch.load(io.BytesIO(storage.read_bytes(model_uri)), weights_only=True)
    return target.load(state)


def encode_file(encoding: Encoding, item: tuple[str, str, str]) -> int:
    """Rewrite one plan file (``source``) at ``dest`` with the proxy's pooled features of its rows' raw pairs."""
    import pyarrow as pa
    import torch

    from influencespace.embed.encoders import pixels_to_tensor
    from influencespace.train.pixels import shard_pixels

    source, dest, raw = item
    target = encoding.target
    table = storage.read_table(source)
    ids = np.asarray(table.column("id").to_pylist(), dtype=object)
    pixels, tokens = shard_pixels(raw, ids, target.image, target.text, target.chunk_rows)
    model = _model(target, encoding.model_uri)
    image, text = [], []
    for start in range(0, len(ids), encoding.batch):
        f_v, f_t = pooled_features(model, pixels_to_tensor(pixels[start:start + encoding.batch], target.image),
                                   torch.from_numpy(tokens[start:start + encoding.batch].astype(np.int64)))
        image.append(f_v.float().numpy())
        text.append(f_t.float().numpy())
    for column, values in zip(encoding.columns, (image, text), strict=True):
        matrix = np.concatenate(values) if values else np.zeros((0, 0), np.float32)
        width = matrix.shape[1] if matrix.ndim == 2 and len(matrix) else 0
        array = pa.FixedSizeListArray.from_arrays(pa.array(matrix.ravel(), pa.float32()), width)
        table = table.set_column(table.schema.get_field_index(column), column, array)
    storage.write_table(table, dest)
    return table.num_rows


def encode_plan(runtime: Any, inputs: Any, encoding: Encoding, raw_pool: dict[int, str],
                raw_validation: dict[int, str], out_uri: str) -> Any:
    """Re-encode every file the stage reads (each rank's sample, proxy, bank, validation) under ``out_uri``;
    returns the :class:`~influencespace.influence.inputs.Inputs` that point at them, with the towers' widths."""
    from influencespace.runtime import map_tasks
    from influencespace.train.pixels import shard_index

    items = []
    for uri in storage.parquet_files(inputs.sample_uri):
        relative = uri[len(inputs.sample_uri.rstrip("/")) + 1:]
        if relative.split("/", 1)[0].startswith("_"):  # the plan's work files (candidates)
            continue
        items.append((uri, storage.join(out_uri, relative), raw_pool[shard_index(_pool_shard_name(uri))]))
    validation = storage.parquet_files(inputs.validation_uri)
    for uri in validation:
        name = uri.rsplit("/", 1)[-1]
        items.append((uri, storage.join(out_uri, VALIDATION_DIR, name), raw_validation[shard_index(name)]))
    list(map_tasks(runtime, functools.partial(encode_file, encoding), items, desc="influence: encode sample",
                   unit="files"))
    model = _model(encoding.target, encoding.model_uri)
    dims = {"image": int(model.visual.proj.shape[0]), "text": int(model.text_projection.shape[0])}
    return replace(inputs, sample_uri=out_uri, validation_uri=storage.join(out_uri, VALIDATION_DIR),
                   spec=replace(inputs.spec, dims={**inputs.spec.dims, **dims}))
