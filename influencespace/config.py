"""Typed, validated pipeline configuration.

One frozen pydantic model per stage, gathered in :class:`PipelineConfig`. A config is loaded from a
preset shipped with the package (``demo``, ``test``, ``cluster``) or from any YAML file (local or
``s3://``), then dotted overrides are applied (``--set cluster.k=4096``). Unknown keys are errors, and
every error names the key, the value given and what is allowed.

Fields marked ``execution_only`` (batch sizes, actor counts, ...) change how fast a stage runs, not
what it produces, so they are left out of the stage fingerprint: changing them does not invalidate
finished stages.
"""

from __future__ import annotations

import hashlib
import json
import os
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from influencespace.errors import ConfigError

PRESETS = ("demo", "test", "cluster", "pixels")


def _execution_only(**kwargs: Any) -> Any:
    """A field that does not change a stage's output (excluded from fingerprints)."""
    return Field(json_schema_extra={"execution_only": True}, **kwargs)


class Section(BaseModel):
    """Base for every config section: frozen, no unknown keys, defaults validated too."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    def fingerprint_payload(self) -> dict[str, Any]:
        """The section as plain data, without execution-only fields (recursively)."""
        out: dict[str, Any] = {}
        for name, field in type(self).model_fields.items():
            extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
            if extra.get("execution_only"):
                continue
            value = getattr(self, name)
            out[name] = value.fingerprint_payload() if isinstance(value, Section) else _plain(value)
        return out


def _absolute_local(value: str | None) -> str | None:
    """Relative local paths become absolute at load time: Ray workers run in other directories."""
    if value is None or "://" in value or os.path.isabs(value):
        return value
    return os.path.abspath(value)


def _plain(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


class RuntimeConfig(Section):
    """Where and how stages run."""

    runner: Literal["ray", "local"] = Field(
        "ray", description="'ray': stages run on a Ray cluster; 'local': in this process (tests, debugging)."
    )
    ray_address: str | None = Field(
        None, description="Ray cluster to join ('auto' inside `ray job submit`); None starts a local Ray on 127.0.0.1."
    )
    num_cpus: int | None = _execution_only(default=None, ge=1, description="CPUs for a local Ray (None: all).")
    use_gpu: bool = Field(False, description="Place GPU work (embed actors, training workers) on GPUs.")
    gpu_node_resource: str | None = _execution_only(
        default=None, description="Custom Ray resource marking GPU worker nodes (cluster_configs use 'gpu_node'): embed, influence and train work is pinned there."
    )
    cpu_node_resource: str | None = _execution_only(
        default=None, description="Custom Ray resource marking CPU worker nodes (cluster_configs use 'cpu_node'): k-means work is pinned there."
    )
    worker_restarts: int = _execution_only(
        default=3, ge=0, le=100,
        description="Times work lost with its node (spot reclaim, crash) is restarted: k-means actors (max_restarts, "
        "max_task_retries) and influence's Ray Train worker group (FailureConfig.max_failures).",
    )
    progress: bool = _execution_only(
        default=True,
        description="Show progress on the command line: live bars on a terminal, a plain line every 30 s otherwise.",
    )


class StorageConfig(Section):
    """Object-store settings; credentials come only from the environment or the instance role."""

    s3_endpoint_url: str | None = Field(
        None, description="S3-compatible endpoint (e.g. http://127.0.0.1:8333); default: $AWS_ENDPOINT_URL_S3 or $AWS_ENDPOINT_URL."
    )
    s3_region: str | None = Field(None, description="S3 region; default: $AWS_REGION / $AWS_DEFAULT_REGION.")
    retries: int = _execution_only(default=5, ge=0, le=50, description="Attempts per S3 request before failing.")


class BenchmarkDataConfig(Section):
    """The built-in benchmarks (see docs/benchmark-data.md): real or rendered images, planted defects."""

    name: Literal["fashion_captions", "shape_captions"] = Field(
        "fashion_captions",
        description="'fashion_captions': Fashion-MNIST images with WordNet captions; 'shape_captions': rendered colour "
        "shapes with templated captions and another defect mix (the benchmark the policy was not designed on).",
    )
    pool_size: int = Field(6000, ge=100, le=1_000_000, description="Rows in the pool to curate.")
    validation_size: int = Field(600, ge=20, description="Trusted, group-balanced validation rows (held-out train images).")
    test_size: int = Field(2000, ge=20, le=10_000, description="Test rows from the 10k test images, minority style on half.")
    duplicate_fraction: float = Field(0.2, ge=0.0, lt=0.9, description="Share of the pool that are near-duplicate copies.")
    duplicate_sources: int | None = Field(
        None, ge=1, description="Distinct source pairs the duplicates copy (None: about 0.6% of the pool, at least 2)."
    )
    random_caption_fraction: float = Field(0.05, ge=0.0, lt=0.5, description="Share with a caption of a random other class.")
    swap_caption_fraction: float = Field(
        0.05, ge=0.0, lt=0.3, description="Share with systematically swapped captions inside visual slices (harmful clusters)."
    )
    corrupted_image_fraction: float = Field(0.01, ge=0.0, lt=0.5, description="Share of images replaced by noise or blanks.")
    undecodable_count: int = Field(5, ge=0, description="Rows whose image bytes cannot be decoded.")
    minority_fraction: float = Field(0.05, gt=0.0, lt=0.5, description="Share of the pool in the minority style (inverted polarity).")
    seed: int = Field(0, description="Seed for every random choice of the builder.")
    shard_rows: int = _execution_only(default=2000, ge=10, description="Rows per Parquet shard.")
    fashion_mnist_dir: str = Field(
        "/usr/share/datasets/fashion-mnist", description="Directory with the four Fashion-MNIST IDX .gz files."
    )
    wordnet_dir: str = Field("/usr/share/wordnet", description="Directory with WordNet's index.noun and data.noun.")

    @model_validator(mode="after")
    def _fractions_fit(self) -> BenchmarkDataConfig:
        noise = self.random_caption_fraction + self.swap_caption_fraction + self.corrupted_image_fraction
        if self.duplicate_fraction + noise + self.minority_fraction >= 0.95:
            raise ValueError(
                "duplicate_fraction + random_caption_fraction + swap_caption_fraction + corrupted_image_fraction + "
                "minority_fraction must stay below 0.95 so that clean rows remain"
            )
        return self


class DataConfig(Section):
    """Input pairs: the built-in benchmark, or the user's Parquet / WebDataset (local or s3://)."""

    source: Literal["benchmark", "parquet", "webdataset", "embeddings"] = Field(
        "benchmark",
        description="'benchmark' builds the fashion-captions set into the run directory; 'embeddings' starts from "
        "precomputed embeddings (the embed stage converts instead of encoding).",
    )
    uri: str | None = Field(None, description="Input pairs (directory or file, local or s3://) when source is not 'benchmark'.")
    embeddings_format: Literal["parquet", "npz"] = Field(
        "parquet", description="source 'embeddings': Parquet with embedding column(s), or DataComp-style .npz + .parquet uid shards."
    )
    id_column: str = Field("id", description="source 'embeddings': column holding the sample id (DataComp: 'uid').")
    image_key: str = Field("image_embedding", description="source 'embeddings': image embedding column / .npz key (DataComp: 'b32_img').")
    text_key: str = Field("text_embedding", description="source 'embeddings': text embedding column / .npz key (DataComp: 'b32_txt').")
    fused_key: str | None = Field(
        None, description="source 'embeddings': column already holding x = f(v, t); when set, image/text keys are optional."
    )
    validation_uri: str | None = Field(None, description="Trusted validation pairs for user data (needed by influence).")
    test_uri: str | None = Field(None, description="Test pairs for user data (needed by evaluate).")
    benchmark: BenchmarkDataConfig = BenchmarkDataConfig()

    _absolute_uris = field_validator("uri", "validation_uri", "test_uri")(_absolute_local)

    @model_validator(mode="after")
    def _uri_given(self) -> DataConfig:
        if self.source != "benchmark" and not self.uri:
            raise ValueError(f"data.uri is required when data.source is '{self.source}' (where the input pairs are)")
        return self


class EmbedConfig(Section):
    """Stage 1: x = f(v, t) into one cross-modal space."""

    model: Literal["offline-default", "open_clip"] = Field(
        "offline-default", description="'offline-default': EfficientNet-Lite0 + MiniLM with aligned heads; 'open_clip': by name."
    )
    open_clip_model: str = Field("ViT-B-32", description="open_clip architecture name (model='open_clip').")
    pretrained: str | None = Field(
        None,
        description="open_clip pretrained tag (needs hub access) or checkpoint path/URI; for offline-default a checkpoint "
        "(None: the cached default, built on first use).",
    )
    open_clip_config: str | None = Field(
        None, description="Custom open_clip model-config JSON (path or s3://), registered as open_clip_model."
    )
    alignment: Literal["auto", "fashion_captions", "shape_captions"] = Field(
        "auto",
        description="offline-default: the images its heads were aligned on ('auto': the built-in benchmark's own when "
        "data.source=benchmark, else fashion_captions); ignored when embed.pretrained names a checkpoint.",
    )
    fusion: Literal["concat", "sum"] = Field("concat", description="f(v,t): normalised concatenation or weighted sum.")
    image_weight: float = Field(0.5, ge=0.0, le=1.0, description="Weight of the image embedding in the fusion.")
    dtype: Literal["float16", "float32"] = Field("float16", description="Stored embedding dtype.")
    batch_size: int = _execution_only(default=128, ge=1, description="Pairs per encoder batch.")
    num_actors: int = _execution_only(default=1, ge=1, description="Encoder actors (one GPU each when use_gpu).")
    rows_per_shard: int = _execution_only(default=4096, ge=1, description="Rows per output shard.")
    threads_per_actor: int | None = _execution_only(
        default=None, ge=1, description="torch threads per encoder actor (None: CPUs / num_actors on CPU; torch's default on GPU)."
    )


class ClusterConfig(Section):
    """Stage 2: distributed k-means."""

    k: int = Field(64, ge=2, description="Number of clusters.")
    max_iter: int = Field(25, ge=1, description="Most Lloyd iterations.")
    tol: float = Field(1e-4, ge=0.0, description="Stop when the relative objective change is below this.")
    spherical: bool = Field(True, description="Cosine k-means on normalised embeddings.")
    seeding: Literal["kmeans++", "kmeans||", "random"] = Field("kmeans++", description="Initial centroids.")
    seeding_sample: int = Field(100_000, ge=100, description="Points sampled for seeding.")
    hierarchical: bool = Field(False, description="Two-level k-means: k_coarse clusters, then k/k_coarse inside each.")
    k_coarse: int | None = Field(None, ge=2, description="Coarse clusters for hierarchical k-means (None: sqrt(k)).")
    device: Literal["cpu", "gpu"] = Field("cpu", description="faiss index on CPU or GPU (no silent fallback).")
    seed: int = Field(0, description="Seed for sampling and seeding.")
    num_workers: int = _execution_only(default=2, ge=1, description="Assignment workers.")
    worker_cpus: float = _execution_only(default=1.0, gt=0.0, description="CPUs per assignment worker (Ray actor).")
    cache_shards: bool = _execution_only(
        default=True,
        description="Workers keep their shards in memory (rows×dim×4 B / num_workers each); false: re-read one shard at a time every pass.",
    )


class InfluenceConfig(Section):
    """Stage 3: per-cluster influence from sketched per-example gradients."""

    task: str = Field("contrastive", description="Registered task: 'contrastive', 'probe', 'open_clip' (the train.target=open_clip "
                      "model's own last layers, on a proxy trained as the target is; docs/influence.md) or a user task name.")
    samples_per_cluster: int = Field(32, ge=1, description="m: examples sampled per cluster (all if the cluster is smaller).")
    projection_dim: int = Field(512, ge=1, description="k: sketch dimension of the random projection.")
    projection: Literal["gaussian", "sparse"] = Field("gaussian", description="Dense Gaussian or sparse JL projector.")
    projector_cache_mib: int = Field(
        256, ge=1,
        description="P (k × tracked parameters) is kept on the worker's device once drawn when it fits in this many MiB; "
        "above, its blocks are drawn again for every chunk of gradients (chunks then hold this many MiB of gradients).",
    )
    rank: int | None = Field(
        None, ge=1,
        description="r: eigenpairs kept from the sketched curvature (None: all k, the exact damped inverse of the sketch). "
        "Never below the number of eigenvalues above the damping λ: a smaller r is raised to it (docs/influence.md).",
    )
    damping: float = Field(0.1, gt=0.0, description="λ = damping × mean eigenvalue.")
    proxy_steps: int = Field(200, ge=0, description="Warm-start steps of the proxy model on a random subset.")
    checkpoints: int = Field(1, ge=1, description="Proxy checkpoints averaged over, per ensemble member (snapshots of one run).")
    ensemble: int = Field(
        3, ge=1,
        description="Independently trained proxies (seed, seed+1, …: own init and minibatch order) whose scores are averaged; "
        "their disagreement joins the sampling error in every interval (1: sampling error only).",
    )
    confidence: float = Field(0.95, gt=0.5, lt=1.0, description="Confidence level of the per-cluster intervals.")
    score_rows: bool = Field(
        True,
        description="Row pass: also score every pool row's own influence (one proxy gradient per row and checkpoint); "
        "curation uses it to choose which rows a thinned cluster keeps.",
    )
    placebo: bool = Field(
        True,
        description="Also score every cluster against a random validation direction of the real one's norm "
        "(placebo_scores.parquet; the same sampled gradients, one more solve): the placebo ablation of curation "
        "(curate.influence_source=placebo) and a check that the real direction carries signal.",
    )
    seed: int = Field(0, description="Seed of the projector and the sampling.")
    dtype: Literal["float32", "float64"] = Field("float32", description="Gradient and sketch precision.")
    fisher: Literal["ggn", "empirical", "identity"] = Field(
        "ggn", description="Curvature: exact Gauss–Newton of the cross-entropy loss, the empirical Fisher (any loss), or "
        "identity — no curvature, TracIn's gradient similarity averaged over the proxy's checkpoints.",
    )
    damping_floor: float = Field(1e-8, gt=0.0, description="Smallest λ, so an all-zero or singular curvature stays invertible.")
    weight_decay: float = Field(1e-4, ge=0.0, description="L2 coefficient of the proxy; part of its Hessian: its sketch wd·P Pᵀ is added to H (not to λ).")
    proxy_rows: int = Field(10_000, ge=1, description="Random pool rows the proxy is warm-started on.")
    proxy_batch_size: int = Field(256, ge=1, description="Minibatch of the proxy warm start.")
    proxy_lr: float = Field(1e-2, gt=0.0, description="Adam learning rate of the proxy warm start.")
    negatives: int = Field(31, ge=1, description="contrastive task: size of the fixed negative bank drawn from the pool.")
    head_dim: int = Field(64, ge=1, description="contrastive task: width of the trainable projection heads.")
    logit_scale: float | Literal["learned"] = Field(
        10.0,
        description="contrastive task: inverse temperature of the logits, fixed (a number > 0) or 'learned' as the train "
        "stage's heads learn it (exp of a tracked parameter, capped at 100, from logit_scale_init).",
    )
    logit_scale_init: float = Field(
        1 / 0.07, gt=0.0, description="contrastive task, logit_scale 'learned': the initial inverse temperature (CLIP's)."
    )

    @field_validator("logit_scale")
    @classmethod
    def _positive_scale(cls, value: float | str) -> float | str:
        if not isinstance(value, str) and value <= 0:
            raise ValueError(f"influence.logit_scale must be a number > 0 or 'learned', got {value}")
        return value
    batch_size: int = _execution_only(default=32, ge=1, description="Examples per vmapped gradient chunk.")
    num_workers: int = _execution_only(default=2, ge=1, description="Ray Train workers.")


class CurateConfig(Section):
    """Stage 4: turn cluster scores into a per-sample keep/weight manifest."""

    keep_fraction: float = Field(0.6, gt=0.0, le=1.0, description="Data budget: share of the pool kept.")
    min_weight: float = Field(0.25, gt=0.0, description="Lowest sampling weight of a kept row.")
    max_weight: float = Field(4.0, ge=1.0, description="Highest sampling weight of a kept row.")
    fairness_weight: float = Field(1.0, ge=0.0, description="How much the worst-off group's influence counts.")
    fdr: float | None = Field(
        0.05, gt=0.0, lt=1.0,
        description="False-discovery rate of the harmful / helpful cluster calls across all clusters (Benjamini–Hochberg "
        "q-values from the influence stage). None: each cluster's own interval decides (no multiplicity correction).",
    )
    upweight_power: float = Field(
        0.5, ge=0.0, le=2.0, description="Helpful under-represented clusters get weight (median size / size)^power."
    )
    min_cluster_keep: float = Field(
        0.25, ge=0.0, le=1.0,
        description="Thinning floor: a negligible or helpful cluster keeps at least this share of its rows while the budget allows "
        "(of its clean rows: flagged image–text mismatches and near-duplicates may leave below it, unless "
        "floor_protects_flagged).",
    )
    floor_protects_flagged: bool = Field(
        False,
        description="Whether the thinning floor also keeps rows the mismatch or near-duplicate tier flags. False (default): "
        "they may leave below it, so a cluster of systematically wrong captions that influence did not call harmful does "
        "not keep min_cluster_keep of its wrong pairs; true: the behaviour before (the floors_protect_flagged ablation).",
    )
    row_order: Literal["influence", "image_text", "random"] = Field(
        "influence",
        description="Which rows of a tier a thinned cluster drops first: the lowest own influence (default; needs "
        "influence.score_rows and influence_source=validation: over benchmark seeds 1–3 it tied the random order on "
        "fashion-captions and beat it at every budget on shape-captions, benchmarks/outcome.py), a seeded random order "
        "(random: for a run without the row pass, such as the open_clip task), or the lowest image–text cosine "
        "(image_text; it separates planted caption noise best, AUC 0.94, benchmarks/row_signals.py, but also drops hard "
        "clean pairs). The mismatch and near-duplicate tiers still go first; set their keys to null to drop them.",
    )
    influence_source: Literal["validation", "placebo", "none"] = Field(
        "validation",
        description="Which cluster scores call clusters harmful / helpful: the influence stage's (validation), its "
        "placebo_scores (a random validation direction: an ablation), or none (no cluster is called: nothing pruned "
        "or up-weighted, the heuristics alone).",
    )
    ablations: tuple[Literal["tiers_random_order", "tiers_cosine_order", "tiers_influence_order", "heuristics_only", "placebo",
                             "influence_only", "fixed_thresholds", "floors_protect_flagged", "group_balanced",
                             "unbalanced"], ...] = Field(
        (),
        description="Ablations of the InfluenceSpace policy curated beside it at every budget, each under its own name "
        "(curate.policy.ABLATIONS: the settings each changes; docs/curation.md).",
    )
    duplicate_threshold: float | Literal["fitted"] | None = Field(
        "fitted",
        description="SemDeDup cosine at or above which a row counts as a near-duplicate of a row that stays. 'fitted': set "
        "on the trusted validation set, the (1 − duplicate_rate) quantile of each validation row's highest cosine to a "
        "pool row of its cluster (what distinct samples reach; docs/curation.md). null: no near-duplicate step (the "
        "pool's embeddings are then read only for the 'dedup' comparisons).",
    )
    duplicate_rate: float = Field(
        0.05, gt=0.0, lt=1.0,
        description="duplicate_threshold 'fitted': the share of distinct (validation) samples that would count as duplicates.",
    )
    mismatch_fence: Literal["fitted", "tukey"] | None = Field(
        "fitted",
        description="Image–text mismatch rule: a row whose image–text cosine is below the fence leaves first. 'fitted': the "
        "mismatch_rate-quantile of the trusted validation pairs' cosines; 'tukey': Q1 − mismatch_iqr·IQR of the pool's. "
        "null: no mismatch step.",
    )
    mismatch_rate: float = Field(
        0.05, gt=0.0, lt=1.0, description="mismatch_fence 'fitted': the share of clean (validation) pairs the rule flags."
    )
    mismatch_iqr: float = Field(1.5, gt=0.0, description="mismatch_fence 'tukey': Tukey's k.")
    group_balance: Literal["none", "validation"] = Field(
        "validation",
        description="'validation' (default; over benchmark seeds 1–3 it beat 'none' at every budget on shape-captions and "
        "tied it on fashion-captions, benchmarks/outcome.py): after selection, scale the kept rows' weights so the sensitive attribute's groups hold "
        "the trusted validation set's shares of the kept weight mass (importance weights toward the target mix; rows "
        "of a group the validation set lacks keep theirs), bounded by min_weight / max_weight; needs a group column in "
        "the pool and the validation set (without one: a warning, no balance). 'none': the clusters' weights only "
        "(the unbalanced ablation; docs/curation.md).",
    )
    worst_group: str | None = Field(
        None, description="Group whose validation loss counts extra (None: the highest-loss group the influence stage measured)."
    )
    comparison_policies: tuple[Literal["random", "dedup", "clipscore", "clipscore_dedup"], ...] = Field(
        ("random", "dedup", "clipscore"),
        description="Comparison policies curated at the same budget (clipscore_dedup: near-duplicates out first, then "
        "the lowest image–text cosine, at curate.duplicate_threshold).",
    )
    seed: int = Field(0, description="Seed for the random policy and tie-breaks.")
    curve_keep_fractions: tuple[float, ...] = Field(
        (),
        description="Further budgets for the reduction-vs-accuracy curve: every policy is also curated (and trained, "
        "evaluated) at each of these keep fractions.",
    )

    @field_validator("curve_keep_fractions")
    @classmethod
    def _fractions(cls, values: tuple[float, ...]) -> tuple[float, ...]:
        bad = [v for v in values if not 0.0 < v <= 1.0]
        if bad:
            raise ValueError(f"curate.curve_keep_fractions must lie in (0, 1], got {bad}")
        return tuple(sorted(set(values)))

    @model_validator(mode="after")
    def _weights_ordered(self) -> CurateConfig:
        if self.min_weight > 1.0 or self.min_weight > self.max_weight:
            raise ValueError("curate.min_weight must be ≤ 1 ≤ curate.max_weight")
        if "clipscore_dedup" in self.comparison_policies and self.duplicate_threshold is None:
            raise ValueError("curate.comparison_policies has clipscore_dedup, which needs curate.duplicate_threshold "
                             "(the near-duplicate cut); set one or remove clipscore_dedup")
        if self.ablations:
            self._check_ablations_change_something()
        return self

    def _check_ablations_change_something(self) -> None:
        from influencespace.curate.policy import ABLATIONS, ablation_settings  # pure logic; imports no config

        same = [name for name in self.ablations if not ablation_settings(name, self.model_dump())]
        if same:
            raise ValueError(f"curate.ablations {same} change only settings the configured policy already has "
                             f"({', '.join(f'{n}: {ABLATIONS[n]}' for n in same)}), so each would be the policy itself; "
                             "leave them out of curate.ablations")


class TrainConfig(Section):
    """Stage 5: DeepSpeed training inside Ray Train."""

    epochs: int = Field(3, ge=1, description="Epochs over the full-data baseline; others get the same step count.")
    batch_size: int = Field(128, ge=1, description="Global batch size.")
    lr: float = Field(1e-3, gt=0.0, description="Learning rate.")
    zero_stage: Literal[0, 1, 2, 3] = Field(1, description="DeepSpeed ZeRO stage.")
    precision: Literal["fp32", "bf16", "fp16"] = Field("fp32", description="Training precision (fp32 on CPU).")
    num_workers: int = _execution_only(default=2, ge=1, description="Ray Train workers.")
    stream_object_store_mib: int = _execution_only(
        default=256, ge=16,
        description="Ray Data's object-store budget for a variant's training stream (MiB): the blocks read ahead of "
        "the workers. Bounds what the stream holds in the object store (and what the workers map of it) at any pool size.",
    )
    seed: int = Field(0, description="Seed of the model init and of each epoch's repeat counts and shuffle.")
    seeds: tuple[int, ...] | None = Field(
        None, min_length=1, description="Train every variant once per seed (None: train.seed only); evaluate.seeds must be among them."
    )
    optimizer: Literal["adamw", "adam", "sgd"] = Field("adamw", description="DeepSpeed optimizer (torch implementation).")
    weight_decay: float = Field(1e-4, ge=0.0, description="Weight decay of the optimizer.")
    gradient_clipping: float = Field(
        1.0, ge=0.0,
        description="Clip the global gradient norm at this value each step (DeepSpeed's gradient_clipping; its own "
        "default, written out). The heads' first steps have norms near 15, so it is active early; 0 turns it off.",
    )
    target: Literal["heads", "open_clip"] = Field(
        "heads",
        description="What trains: 'heads': CLIP projection heads + temperature over the frozen tower embeddings (fast); "
        "'open_clip': a whole open_clip model (both towers) from the pool's raw pixels and captions (docs/training.md).",
    )
    open_clip_model: str = Field(
        "influencespace-pixels-tiny",
        description="open_clip architecture of target=open_clip: a built-in small CLIP for CPUs (32 px, 2+2 layers of "
        "width 64), any open_clip name (e.g. ViT-B-32), or a custom one with train.open_clip_config.",
    )
    open_clip_config: str | None = Field(
        None, description="Custom open_clip model-config JSON (path or s3://) for target=open_clip, registered as open_clip_model."
    )
    pretrained: str | None = Field(
        None, description="target=open_clip starts from these weights: an open_clip pretrained tag or a weights-only "
        "checkpoint path/URI (None: open_clip's random init, seeded by train.seed).",
    )
    gradient_accumulation: int = Field(
        1, ge=1, description="Micro-steps per optimizer step (DeepSpeed's gradient_accumulation_steps); in-batch "
        "negatives then come from batch_size / gradient_accumulation samples.",
    )
    shuffle_window: int = Field(
        16384, ge=1,
        description="Samples per shuffle window of each worker's stream; a worker holds one window (samples × bytes per "
        "sample: 4 KiB for heads at d=512, 3·S² bytes of pixels for open_clip).",
    )
    head_dim: int = Field(128, ge=1, description="Width of the trainable image and text projection heads.")
    logit_scale_init: float = Field(14.285714, gt=0.0, le=100.0, description="Initial inverse temperature (CLIP: 1/0.07); learned, capped at 100.")
    step_policy: Literal["same_steps", "same_epochs"] = Field(
        "same_steps",
        description="'same_steps': every variant trains the baseline's epochs × ceil(pool/batch) steps (equal compute); "
        "'same_epochs': each variant trains epochs × ceil(kept/batch) steps (smaller sets train faster).",
    )


class EvaluateConfig(Section):
    """Evaluation and report."""

    seeds: tuple[int, ...] = Field((0,), min_length=1, description="Training seeds; metrics are mean ± sd over them.")
    positive_classes: tuple[int, ...] | None = Field(
        None, description="Labels that are positive in the binary fairness task (None: positive_classes from classes.json: footwear on fashion_captions, curved shapes on shape_captions)."
    )
    fairness_resamples: int = Field(
        1000, ge=1, description="Test-set bootstrap resamples for the DP / EO intervals (paired across policies and seeds)."
    )


class PipelineConfig(Section):
    """The whole pipeline. ``run_dir`` is where every stage writes (local path or s3://)."""

    name: str = Field("run", description="A label for this run.")
    run_dir: str = Field("runs/demo", description="Run directory (local path, file:// or s3://).")
    runtime: RuntimeConfig = RuntimeConfig()
    storage: StorageConfig = StorageConfig()
    data: DataConfig = DataConfig()
    embed: EmbedConfig = EmbedConfig()
    cluster: ClusterConfig = ClusterConfig()
    influence: InfluenceConfig = InfluenceConfig()
    curate: CurateConfig = CurateConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()

    _absolute_run_dir = field_validator("run_dir")(_absolute_local)

    @model_validator(mode="after")
    def _open_clip_target_needs_raw_pairs(self) -> PipelineConfig:
        # Refused here, before hours of embedding: the open_clip target trains from the raw pairs.
        if self.train.target == "open_clip" and self.data.source == "embeddings":
            raise ValueError(
                "train.target=open_clip trains from the pool's raw pixels and captions, but data.source=embeddings "
                "gives embeddings only; use train.target=heads, or give the raw pairs (data.source=parquet/webdataset)"
            )
        return self

    def section_fingerprint(self, section: str) -> str:
        """Stable hash of one section's output-relevant settings."""
        payload = getattr(self, section).fingerprint_payload()
        blob = json.dumps(payload, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def to_yaml(self) -> str:
        return yaml.safe_dump(_plain(self.model_dump(mode="json")), sort_keys=False)


def keys_markdown() -> str:
    """Every config key as a Markdown table (docs/configuration.md is generated from this)."""
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            annotation = field.annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                walk(annotation, f"{prefix}{name}.")
                continue
            kind = str(annotation).replace("typing.", "").replace("<class '", "").replace("'>", "")
            extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
            note = " *(execution only: not part of the fingerprint)*" if extra.get("execution_only") else ""
            meaning = (field.description or "") + note
            cells = [f"`{prefix}{name}`", f"`{kind}`", f"`{_plain(field.default)!r}`", meaning]
            rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")

    walk(PipelineConfig, "")
    return "\n".join(rows) + "\n"


# --------------------------------------------------------------------------------------------------
# Loading


def load_config(source: str = "demo", overrides: list[str] | tuple[str, ...] = (), **storage: Any) -> PipelineConfig:
    """Load a preset name or YAML file (local or s3://), apply ``key.path=value`` overrides, validate."""
    raw = _read_source(source)
    for override in overrides:
        apply_override(raw, override)
    return validate_config(raw, origin=source)


def benchmark_config(base: dict[str, Any], overrides: list[str] | tuple[str, ...] = (), origin: str = "<dict>") -> BenchmarkDataConfig:
    """A benchmark-builder config from a size preset plus ``key=value`` overrides."""
    raw = dict(base)
    for override in overrides:
        apply_override(raw, override)
    try:
        return BenchmarkDataConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, origin, BenchmarkDataConfig)) from None


def validate_config(raw: dict[str, Any], origin: str = "<dict>") -> PipelineConfig:
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, origin)) from None


def _read_source(source: str) -> dict[str, Any]:
    if source in PRESETS:
        text = resources.files("influencespace.presets").joinpath(f"{source}.yaml").read_text()
        origin = f"preset '{source}'"
    elif source.startswith("s3://"):
        from influencespace import storage

        text = storage.read_bytes(source).decode()
        origin = source
    else:
        path = Path(source.removeprefix("file://"))
        if not path.is_file():
            raise ConfigError(
                f"config '{source}' is neither a preset ({', '.join(PRESETS)}) nor an existing YAML file"
            )
        text = path.read_text()
        origin = str(path)
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{origin} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{origin} must hold a mapping of sections (runtime:, data:, embed:, ...), got {type(data).__name__}")
    return data


def apply_override(raw: dict[str, Any], override: str) -> None:
    if "=" not in override:
        raise ConfigError(f"override '{override}' must look like key.path=value, e.g. cluster.k=4096")
    key, _, text = override.partition("=")
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"override '{override}' has an empty key")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override '{override}': '{'.'.join(parts[: i + 1])}' is a value, not a section")
        node = child
    node[parts[-1]] = value


def _allowed_keys(loc: tuple[Any, ...], model: type[BaseModel]) -> list[str]:
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return []
        model = field.annotation
    return list(model.model_fields)


def format_validation_error(exc: ValidationError, origin: str, model: type[BaseModel] = PipelineConfig) -> str:
    lines = [f"invalid configuration ({origin}):"]
    for err in exc.errors():
        loc = tuple(err["loc"])
        key = ".".join(str(p) for p in loc) or "<root>"
        if err["type"] == "extra_forbidden":
            allowed = _allowed_keys(loc, model)
            lines.append(f"  {key}: unknown key; allowed here: {', '.join(allowed)}")
            continue
        message = err["msg"].removeprefix("Value error, ")
        given = err.get("input")
        shown = "" if isinstance(given, dict) else f" (got {given!r})"
        lines.append(f"  {key}: {message}{shown}")
    return "\n".join(lines)
