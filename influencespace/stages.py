"""The stage contract, stage manifests, and the runner that executes stages in order.

A stage reads only the artifacts of the stages it names in ``inputs`` and writes into its own
directory ``<run_dir>/<name>/``. Its state is told by two small JSON files there:

- ``_STARTED.json``: written before any output, holds the fingerprint the outputs belong to;
- ``_SUCCESS.json``: written last (atomically), the stage manifest: fingerprint, config, counts,
  library versions, timings and the output locations.

Rules (what makes ``ray job submit`` safe to retry):

========================  ==========================  =============================================
state on disk             same fingerprint            different fingerprint
========================  ==========================  =============================================
``_SUCCESS.json``         skip                        refuse (StageStateError) unless ``overwrite``
``_STARTED.json`` only    resume from finished shards refuse unless ``overwrite``
nothing                   run                         run
========================  ==========================  =============================================

A stage's fingerprint hashes its own config section together with the fingerprints of its inputs, so
changing an upstream stage also invalidates everything downstream of it.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import logging
import platform
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, ClassVar

from influencespace import __version__, storage
from influencespace.config import PipelineConfig
from influencespace.errors import InfluenceSpaceError, StageStateError
from influencespace.faults import fault_point

log = logging.getLogger(__name__)

SUCCESS = "_SUCCESS.json"
STARTED = "_STARTED.json"

# The pipeline, in order. A stage is implemented once it is registered in STAGE_CLASSES.
PIPELINE = ("data", "embed", "cluster", "influence", "curate", "train", "evaluate", "report")

STAGE_CLASSES: dict[str, str] = {
    "data": "influencespace.datasets.stage:DataStage",
    "embed": "influencespace.embed.stage:EmbedStage",
    "cluster": "influencespace.cluster.stage:ClusterStage",
    "influence": "influencespace.influence.stage:InfluenceStage",
    "curate": "influencespace.curate.stage:CurateStage",
    "train": "influencespace.train.stage:TrainStage",
    "evaluate": "influencespace.evaluate.stage:EvaluateStage",
    "report": "influencespace.report.stage:ReportStage",
}


@dataclass
class StageResult:
    """What a stage reports: row counts and where its outputs are (relative to its directory)."""

    counts: dict[str, int] = field(default_factory=dict)
    outputs: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class StageContext:
    """Everything a stage may use: the config, its own directory and its inputs' manifests."""

    config: PipelineConfig
    stage_dir: str
    input_manifests: dict[str, dict[str, Any]]

    def path(self, *parts: str) -> str:
        return storage.join(self.stage_dir, *parts)

    def input_path(self, stage: str, output: str) -> str:
        """Absolute URI of an output an upstream stage recorded in its manifest."""
        manifest = self.input_manifests[stage]
        try:
            relative = manifest["outputs"][output]
        except KeyError:
            raise StageStateError(
                f"stage '{stage}' recorded no output '{output}' (it has: {', '.join(manifest.get('outputs', {}))})"
            ) from None
        if "://" in relative or relative.startswith("/"):
            return relative
        return storage.join(manifest["stage_dir"], relative)

    def shard_path(self, index: int, prefix: str = "part", suffix: str = ".parquet", subdir: str = "") -> str:
        name = f"{prefix}-{index:05d}{suffix}"
        return self.path(subdir, name) if subdir else self.path(name)

    def shard_done(self, index: int, **kwargs: Any) -> bool:
        """True when the shard exists; writes are atomic, so an existing shard is a complete one."""
        return storage.is_file(self.shard_path(index, **kwargs))


class Stage:
    """One pipeline stage. Subclasses set ``name``, ``inputs``, ``section`` and implement ``run``."""

    name: ClassVar[str]
    inputs: ClassVar[tuple[str, ...]] = ()
    section: ClassVar[str | None] = None  # config section that determines the output

    def run(self, ctx: StageContext) -> StageResult:  # pragma: no cover - interface
        raise NotImplementedError

    def other_settings(self, config: PipelineConfig) -> dict[str, Any]:
        """Settings outside ``section`` that this stage's output also depends on under ``config`` (hashed
        into its fingerprint; empty for most stages, so their fingerprints do not change)."""
        return {}


def load_stage(name: str) -> Stage:
    if name not in PIPELINE:
        raise InfluenceSpaceError(f"unknown stage '{name}'; stages are: {', '.join(PIPELINE)}")
    target = STAGE_CLASSES.get(name)
    if target is None:
        raise InfluenceSpaceError(f"stage '{name}' is not implemented yet; implemented: {', '.join(implemented_stages())}")
    module_name, _, class_name = target.partition(":")
    return getattr(importlib.import_module(module_name), class_name)()


def implemented_stages() -> list[str]:
    return [name for name in PIPELINE if name in STAGE_CLASSES]


def missing_stages() -> list[str]:
    return [name for name in PIPELINE if name not in STAGE_CLASSES]


def stage_dir(config: PipelineConfig, name: str) -> str:
    return storage.join(config.run_dir, name)


def fingerprint(config: PipelineConfig, stage: Stage, input_fingerprints: dict[str, str]) -> str:
    parts = [stage.name, config.section_fingerprint(stage.section) if stage.section else ""]
    other = stage.other_settings(config)
    if other:
        parts.append(hashlib.sha256(json.dumps(other, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16])
    parts += [f"{k}={v}" for k, v in sorted(input_fingerprints.items())]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def read_manifest(config: PipelineConfig, name: str) -> dict[str, Any] | None:
    """The stage's ``_SUCCESS.json``, or None when the stage has not finished."""
    uri = storage.join(stage_dir(config, name), SUCCESS)
    if not storage.exists(uri):
        return None
    manifest = storage.read_json(uri)
    if not isinstance(manifest, dict) or "fingerprint" not in manifest:
        raise StageStateError(f"'{uri}' is not a stage manifest; delete it or rerun with --overwrite")
    return manifest


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version(), "influencespace": __version__}
    for pkg in ("ray", "torch", "pyarrow", "faiss-cpu", "open_clip_torch", "deepspeed", "numpy"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            continue
    return out


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _has_outputs(directory: str) -> bool:
    import pyarrow.fs as pafs

    fs, path = storage.resolve(directory)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=True))
    return any(info.type == pafs.FileType.File and info.base_name != STARTED for info in infos)


@dataclass
class StageOutcome:
    name: str
    status: str  # "ran", "resumed", "skipped"
    manifest: dict[str, Any]


def run_stage(
    config: PipelineConfig,
    stage: Stage,
    overwrite: bool = False,
    upstream: dict[str, dict[str, Any]] | None = None,
) -> StageOutcome:
    """Run one stage under the skip / refuse / resume rules in the module docstring."""
    upstream = dict(upstream or {})
    for name in stage.inputs:
        if name not in upstream:
            manifest = read_manifest(config, name)
            if manifest is None:
                raise StageStateError(
                    f"stage '{stage.name}' needs stage '{name}' to have finished in {config.run_dir}; run it first "
                    f"({stage_command(name)}) or run the whole pipeline (influencespace run CONFIG)"
                )
            upstream[name] = manifest
    fp = fingerprint(config, stage, {n: upstream[n]["fingerprint"] for n in stage.inputs})
    directory = stage_dir(config, stage.name)
    success_uri = storage.join(directory, SUCCESS)
    started_uri = storage.join(directory, STARTED)

    status = "ran"
    existing = read_manifest(config, stage.name)
    if existing is not None:
        if existing["fingerprint"] == fp:
            log.info("%s: already complete (fingerprint %s), skipping", stage.name, fp)
            return StageOutcome(stage.name, "skipped", existing)
        if not overwrite:
            raise StageStateError(
                f"stage '{stage.name}' in {directory} finished with a different configuration "
                f"(fingerprint {existing['fingerprint']}, now {fp}); rerun with --overwrite to replace it, "
                f"or choose another run_dir"
            )
        storage.remove_tree(directory)
    elif storage.exists(started_uri):
        started = storage.read_json(started_uri)
        previous = started.get("fingerprint") if isinstance(started, dict) else None
        if previous == fp:
            status = "resumed"
            log.info("%s: resuming an interrupted run (fingerprint %s)", stage.name, fp)
        elif overwrite or not _has_outputs(directory):
            # Nothing was produced under the old config (e.g. it failed validating its input): start clean.
            storage.remove_tree(directory)
        else:
            raise StageStateError(
                f"stage '{stage.name}' in {directory} holds partial results of a different configuration "
                f"(fingerprint {previous}, now {fp}); rerun with --overwrite to discard them"
            )

    storage.make_dirs(directory)
    if status != "resumed":
        storage.write_json(started_uri, {"stage": stage.name, "fingerprint": fp, "started_at": _now()})
    ctx = StageContext(config=config, stage_dir=directory, input_manifests=upstream)
    t0 = time.perf_counter()
    started_at = _now()
    fault_point(f"stage.{stage.name}")  # tests: a stage that fails (raise) or dies (kill) as it starts
    result = stage.run(ctx)
    manifest = {
        "stage": stage.name,
        "fingerprint": fp,
        "stage_dir": directory,
        "inputs": {n: upstream[n]["fingerprint"] for n in stage.inputs},
        "config": getattr(config, stage.section).model_dump(mode="json") if stage.section else {},
        "counts": result.counts,
        "outputs": result.outputs,
        "extra": result.extra,
        "versions": _versions(),
        "started_at": started_at,
        "finished_at": _now(),
        "seconds": round(time.perf_counter() - t0, 3),
        "resumed": status == "resumed",
    }
    storage.write_json(success_uri, manifest)
    log.debug("%s: %s in %.1fs, counts %s", stage.name, status, manifest["seconds"], result.counts)
    return StageOutcome(stage.name, status, manifest)


def stage_command(name: str) -> str:
    """The command that runs stage ``name`` alone (every stage runs with ``run --stages``)."""
    return f"influencespace run CONFIG --stages {name}"


def summary_line(outcome: StageOutcome) -> str:
    """``[embed] ran (41.2s) pool=297, ...``: what a stage did, in one line."""
    counts = ", ".join(f"{k}={v}" for k, v in outcome.manifest.get("counts", {}).items())
    return f"[{outcome.name}] {outcome.status} ({outcome.manifest.get('seconds', 0):.1f}s) {counts}".rstrip()


@contextlib.contextmanager
def _announce(report: Callable[[str], None], name: str) -> Iterator[None]:
    report(f"[{name}] starting")
    yield


def run_pipeline(
    config: PipelineConfig,
    names: Iterable[str] | None = None,
    overwrite: bool = False,
    report: Callable[[str], None] = print,
    console: Any = None,
) -> list[StageOutcome]:
    """Run stages in pipeline order (all implemented ones by default); return what each did.

    ``console`` (an :class:`~influencespace.console.Console`) gives each stage its log file and
    progress display; without one, ``report`` gets a start and a summary line per stage.
    """
    storage.configure_from(config.storage)
    wanted = list(names) if names is not None else implemented_stages()
    unknown = [n for n in wanted if n not in PIPELINE]
    if unknown:
        raise InfluenceSpaceError(f"unknown stage(s) {', '.join(unknown)}; stages are: {', '.join(PIPELINE)}")
    ordered = [n for n in PIPELINE if n in wanted]
    outcomes: list[StageOutcome] = []
    manifests: dict[str, dict[str, Any]] = {}
    for name in ordered:
        stage = load_stage(name)
        with console.stage(name) if console is not None else _announce(report, name):
            outcome = run_stage(config, stage, overwrite=overwrite, upstream=manifests)
        manifests[name] = outcome.manifest
        outcomes.append(outcome)
        (console.summary if console is not None else report)(summary_line(outcome))
    return outcomes
