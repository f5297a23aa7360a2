"""Does every stage's memory stay flat in N? The whole pipeline from precomputed embeddings, three sizes.

    .venv/bin/python benchmarks/scale.py                                # 100k, 300k, 1M rows
    .venv/bin/python benchmarks/scale.py --quick                        # 50k, 150k, 500k rows
    .venv/bin/python benchmarks/scale.py --sizes 5000,10000 --shard-rows 2500   # a smoke run (minutes)
    .venv/bin/python benchmarks/scale.py --planted-cluster 150000 --planted-only   # the 150k-row cluster alone

**The pool.** For each size a synthetic DataComp-style pool is written once (cached under
``--workdir``), shard by shard, never N rows in memory: ``pool/NNNNNNNN.npz`` (``b32_img``,
``b32_txt``: float16 unit image and text tower embeddings, ``--tower-dim`` 32) beside
``pool/NNNNNNNN.parquet`` (``uid`` — 32 hex digits as in DataComp —, ``text``, ``group``, ``label``).
Rows come from ``--centres`` 1024 sub-cluster centres under 10 classes, with Zipf-like centre sizes,
and the defects curation has to find: 10% near-duplicates (a copy of another row of the shard plus
noise 0.005: fused cosine ≈ 0.999), 5% mismatched pairs (the caption of a centre of another class:
image–text cosine ≈ 0), 5% in a minority ``group`` (a fixed style shift of the image), and 0.01% rows
with a NaN (``--nonfinite``; the embed stage rejects them, so every manifest must list them as rejected). Validation
(2,000 clean rows, groups balanced) and test (5,000 rows, half minority; a test row's text is its
class prompt, one per class, which is what zero-shot evaluation expects) are the same for every size.
``--planted-cluster ROWS`` replaces ROWS evenly spread rows with one tight cluster (all rows within
noise 0.03 of one centre: pairwise tower cosine ≈ 0.97, so almost all are near-duplicates of each
other) — the worst case for per-cluster work such as SemDeDup — and runs the pipeline once more on it
(at ``--planted-size``, default the largest size); the acceptance bound is a worker peak ≤ 2 GiB.

**The pipeline** (one YAML per size, written to ``<workdir>/run-N/scale.yaml``; the run directory
is fresh for every size): ``data.source: embeddings`` (npz, ``uid``, ``b32_img`` / ``b32_txt``),
embed fusion ``concat`` → fused d = 64 stored as float16; cluster **k = 256 at every size** (so the
clusters grow 10× with N, which is the point: per-cluster work must not), 10 Lloyd iterations,
k-means++ on a 32,768-row sample, 2 workers re-reading one shard at a time (``cache_shards: false``:
with cached shards worker memory grows with N by design); influence: contrastive task, 8 samples per
cluster, sketch 128, rank 64, 50 proxy steps on 10,000 rows, one proxy (``ensemble: 1``; each further
member repeats the per-row work with the same memory, so it changes the CPU seconds, not a ratio), the
row pass on (every pool row scored);
curate: keep 0.6 with the three comparison policies (random, dedup, clipscore), no budget curve;
train: the heads over the frozen tower embeddings (the only target), 1 epoch, batch 1024, heads 32
wide, ``same_epochs``, 2 Ray Train workers, one seed; evaluate; report; and ``export --format uids``.
Local Ray with ``num_cpus: 2``. At 1M rows this is meant to take well under 30 min on 2 cores
(``--k`` and the other flags change it; they are recorded in the JSON).

**What is measured.** Every stage runs as its own CLI process (``influencespace <stage> scale.yaml``,
``run … --stages data|report``, ``export``), started through a tiny wrapper that records, at exit,
the driver's own ``VmHWM`` (exact peak RSS; not ``ru_maxrss``, which on Linux inherits the forking
parent's peak across exec) and ``getrusage(RUSAGE_SELF)`` CPU seconds. While it runs, ``/proc`` is
polled every ``--interval`` 0.2 s for every descendant of the driver (Ray's gcs_server, raylet, its
agents and workers; a process once seen is followed even if re-parented): a Ray worker (command line
with ``ray::`` or ``default_worker.py``) contributes its ``VmHWM`` (the kernel's peak RSS of the
process) to "worker peak"; every process's last-seen utime + stime is added to the stage's CPU time.
A worker's RSS includes the object-store pages it maps, as the kernel counts them; so does the
driver's, once it ``ray.get``s results that live in the object store (shared pages, which the object
store's own limit bounds), so the driver's sampled ``RssAnon`` (its private memory) is recorded and
its ratio printed beside the peak ("private"). An RSS also counts the file pages a process maps — for
a driver that imports torch and Ray, ≈ 330–440 MiB of shared-library text — and how many of those
are mapped depends on the page cache, not on the data: the kernel maps a whole large folio on a
fault, and which library pages sit in large folios changes over time (``FileHugePages`` in
/proc/meminfo). The same train driver at the same N = 300k peaked at 716 MiB in one run and 824 MiB in
the next, RssAnon 391 MiB both times, RssFile 328 vs 438 MiB. So the driver's RssFile and RssShmem
are sampled too, and the figure that says whether a driver's memory grows with N is its **private**
peak, max over samples of RssAnon + RssShmem (its own heap plus the object-store pages it maps: all
the memory the data can make it hold): ``scale_driver_private_ratio`` beside the VmHWM ratio. Per stage:
wall seconds, CPU seconds (driver + all Ray processes), driver peak, largest worker peak, the largest
other descendant's peak ("sys": raylet, gcs_server, Ray's agents, any other subprocess), and the number
of workers seen. A stage that fails is recorded
(its exit code, the last stderr line, its log under ``<run>/logs``) and the stages that need it are
skipped; the next size still runs.

**Manifests.** ``--check-manifests`` (on by default; ``--no-check-manifests``) streams the input uids
shard by shard into 64-bit hashes (8 bytes a row) and every manifest directory under ``<run>/curate``
(any directory holding ``part-*.parquet`` / ``rejected-*.parquet``) file by file, reading only the
``id`` column, and checks that the two sorted hash arrays are equal: every input id exactly once.

**Output.** A table per size, then per stage the ratios largest / smallest size, and the last line::

    scale_driver_rss_ratio=R1 scale_driver_private_ratio=P scale_worker_rss_ratio=R2 scale_cpu_slope=S influence_bytes_read_ratio=B loop_config_bytes=L

(``B``: the largest, over the sizes, of the bytes the influence stage's processes read from the embedded
pool, counted through the filesystem (``$INFLUENCESPACE_READ_LOG``, influencespace.read_log), over the
pool's size on disk; ``L``: the largest pickled size of its Ray Train loop config, from its manifest.)

R1 (R2): the largest over the stages of driver (worker) peak RSS at the largest size / at the
smallest size (stages that ran at both; the goal is flat, ≈ 1); P: the same for the driver's private
peak (RssAnon + RssShmem, without the library pages that move R1 by up to ±15% between identical
runs); S: the least-squares slope of
log(total CPU seconds over all stages) against log(N) (fixed costs pull it below 1 at small N).
Everything is written as JSON to ``--out`` (default ``runs/scale/scale.json``).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

DEFAULT_SIZES = "100000,300000,1000000"
QUICK_SIZES = "50000,150000,500000"
MIB = 2**20

# What each stage needs to have finished; a stage whose need failed is skipped.
STAGES = ("data", "embed", "cluster", "influence", "curate", "train", "evaluate", "report", "export")
# Stages whose reads of an input (relative to the run directory) are counted through the filesystem
# (influencespace.read_log): bytes read / the input's size on disk.
COUNTED_READS = {"influence": "embed/pool"}
NEEDS = {"embed": "data", "cluster": "embed", "influence": "cluster", "curate": "influence", "train": "curate",
         "evaluate": "train", "report": "evaluate", "export": "curate"}

CLASSES = 10
DUPLICATE_FRACTION = 0.10
MISMATCH_FRACTION = 0.05
MINORITY_FRACTION = 0.05
VALIDATION_ROWS = 2000
TEST_ROWS = 5000
ROW_NOISE = 0.1  # per component, tower dim 32: a row's cosine to its centre ≈ 0.87
DUPLICATE_NOISE = 0.005
PLANTED_NOISE = 0.03
STYLE_SHIFT = 0.5

# Runs the CLI in this process and records the driver's own peak RSS and CPU time at exit. The peak is
# VmHWM (this process image's high-water mark); getrusage's ru_maxrss is kept beside it but not used:
# Linux carries the pre-exec maxrss of the forked parent (this harness) into it.
WRAPPER = r"""
import json, resource, sys
out, argv = sys.argv[1], sys.argv[2:]
rc = 1
try:
    from influencespace.cli import main
    rc = main(argv)
except SystemExit as exc:
    rc = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
finally:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    hwm = 0
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                hwm = int(line.split()[1]) * 1024
    with open("/proc/self/maps") as f:
        mapped = sorted({line.split(None, 5)[5].strip() for line in f if len(line.split(None, 5)) == 6})
    with open(out, "w") as f:
        json.dump({"hwm_bytes": hwm, "ru_maxrss_bytes": ru.ru_maxrss * 1024,
                   "cpu_seconds": ru.ru_utime + ru.ru_stime, "rc": rc, "mapped_files": mapped}, f)
sys.exit(rc)
"""


# --------------------------------------------------------------------------------------------------
# The synthetic pool


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """A bijection on uint64: distinct row indices give distinct uids."""
    with np.errstate(over="ignore"):
        z = x.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def _uids(index: np.ndarray) -> list[str]:
    hi = _splitmix64(index)
    lo = _splitmix64(index ^ np.uint64(0x5DEECE66D))
    return [f"{a:016x}{b:016x}" for a, b in zip(hi.tolist(), lo.tolist(), strict=True)]


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


@dataclass(frozen=True)
class World:
    """The fixed generative structure shared by every split and size."""

    class_dirs: np.ndarray  # (C, D)
    centres: np.ndarray  # (S, D)
    centre_class: np.ndarray  # (S,)
    centre_weights: np.ndarray  # (S,)
    style: np.ndarray  # (D,)
    planted: np.ndarray  # (D,)

    @classmethod
    def make(cls, centres: int, dim: int, seed: int) -> World:
        rng = np.random.default_rng([seed, 0])
        class_dirs = _unit(rng.standard_normal((CLASSES, dim)))
        centre_class = np.arange(centres) % CLASSES
        offsets = _unit(rng.standard_normal((centres, dim)))
        centre_vecs = _unit(class_dirs[centre_class] + 0.8 * offsets)
        weights = 1.0 / (np.arange(centres) + 10.0) ** 0.7
        weights = rng.permutation(weights)
        return cls(class_dirs, centre_vecs, centre_class, weights / weights.sum(),
                   _unit(rng.standard_normal(dim)), _unit(rng.standard_normal(dim)))


def _rows(world: World, rng: np.random.Generator, n: int, minority: float, mismatch: float) -> dict[str, np.ndarray]:
    dim = world.centres.shape[1]
    centre = rng.choice(len(world.centres), size=n, p=world.centre_weights)
    label = world.centre_class[centre]
    group_minority = rng.random(n) < minority
    image = world.centres[centre] + ROW_NOISE * rng.standard_normal((n, dim))
    image[group_minority] += STYLE_SHIFT * world.style
    text_centre = centre.copy()
    wrong = rng.random(n) < mismatch
    if wrong.any():  # the caption of a centre of another class
        shift = rng.integers(1, CLASSES, size=int(wrong.sum()))
        other = (world.centre_class[centre[wrong]] + shift) % CLASSES
        text_centre[wrong] = other + CLASSES * rng.integers(0, len(world.centres) // CLASSES, size=len(other))
    text = world.centres[text_centre] + ROW_NOISE * rng.standard_normal((n, dim))
    return {"image": _unit(image), "text": _unit(text), "label": label, "minority": group_minority,
            "centre": centre, "mismatch": wrong}


def _write_shard(directory: str, index: int, uids: list[str], rows: dict[str, np.ndarray]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    stem = os.path.join(directory, f"{index:08d}")
    captions = [f"class {c} centre {s}" for c, s in zip(rows["label"].tolist(), rows["centre"].tolist(), strict=True)]
    table = pa.table({
        "uid": uids,
        "text": captions,
        "group": np.where(rows["minority"], "minority", "regular").tolist(),
        "label": pa.array(rows["label"].astype(np.int64)),
    })
    pq.write_table(table, stem + ".parquet.tmp")
    os.replace(stem + ".parquet.tmp", stem + ".parquet")
    with open(stem + ".npz.tmp", "wb") as f:  # written last: its presence marks the shard complete
        np.savez(f, b32_img=rows["image"].astype(np.float16), b32_txt=rows["text"].astype(np.float16))
    os.replace(stem + ".npz.tmp", stem + ".npz")


def write_pool(directory: str, n: int, world: World, shard_rows: int, planted: int, nonfinite: float,
               seed: int) -> dict[str, int]:
    """The pool, shard by shard; resumable (a shard whose .npz exists is kept). Returns the planted counts."""
    os.makedirs(directory, exist_ok=True)
    marker = os.path.join(directory, "_DONE.json")
    if os.path.exists(marker):
        with open(marker) as f:
            return json.load(f)
    counts = {"rows": 0, "duplicates": 0, "mismatched": 0, "minority": 0, "nonfinite": 0, "planted": 0, "shards": 0}
    nonfinite_total = max(1, round(n * nonfinite)) if nonfinite > 0 else 0
    dim = world.centres.shape[1]
    for index, start in enumerate(range(0, n, shard_rows)):
        count = min(shard_rows, n - start)
        rng = np.random.default_rng([seed, 1, index])
        rows = _rows(world, rng, count, MINORITY_FRACTION, MISMATCH_FRACTION)
        positions = np.arange(start, start + count, dtype=np.int64)
        # Planted rows: exactly `planted` of the n, evenly spread (row i is planted when floor(i·R/n) steps).
        is_planted = (positions + 1) * planted // n > positions * planted // n if planted else np.zeros(count, bool)
        p = int(is_planted.sum())
        if p:
            rows["image"][is_planted] = _unit(world.planted + PLANTED_NOISE * rng.standard_normal((p, dim)))
            rows["text"][is_planted] = _unit(world.planted + PLANTED_NOISE * rng.standard_normal((p, dim)))
            rows["label"][is_planted] = 0
            rows["minority"][is_planted] = False
            rows["mismatch"][is_planted] = False
        # Near-duplicates: copies (plus a little noise) of another, non-planted row of the shard.
        free = np.flatnonzero(~is_planted)
        duplicates = 0
        if len(free) >= 4:
            dup = rng.choice(free, size=int(len(free) * DUPLICATE_FRACTION), replace=False)
            source = rng.choice(np.setdiff1d(free, dup), size=len(dup))
            for key in ("image", "text"):
                rows[key][dup] = _unit(rows[key][source] + DUPLICATE_NOISE * rng.standard_normal((len(dup), dim)))
            for key in ("label", "minority", "mismatch", "centre"):
                rows[key][dup] = rows[key][source]
            duplicates = len(dup)
        # Non-finite rows, evenly spread like the planted ones.
        bad = (positions + 1) * nonfinite_total // n > positions * nonfinite_total // n
        rows["image"][bad, 0] = np.nan
        _write_shard(directory, index, _uids(positions.astype(np.uint64)), rows)
        counts["rows"] += count
        counts["duplicates"] += duplicates
        counts["mismatched"] += int(rows["mismatch"].sum())
        counts["minority"] += int(rows["minority"].sum())
        counts["nonfinite"] += int(bad.sum())
        counts["planted"] += p
        counts["shards"] += 1
    with open(marker, "w") as f:
        json.dump(counts, f)
    return counts


def write_split(directory: str, kind: str, world: World, seed: int) -> None:
    """Validation (clean, groups balanced) or test (half minority; text = the class prompt)."""
    if os.path.exists(os.path.join(directory, "_DONE.json")):
        return
    os.makedirs(directory, exist_ok=True)
    n = VALIDATION_ROWS if kind == "validation" else TEST_ROWS
    rng = np.random.default_rng([seed, 2 if kind == "validation" else 3])
    rows = _rows(world, rng, n, 0.5, 0.0)
    if kind == "test":
        prompts = world.class_dirs + 0.02 * np.random.default_rng([seed, 4]).standard_normal(world.class_dirs.shape)
        rows["text"] = _unit(prompts)[rows["label"]]
    offset = (1 << 62) + (0 if kind == "validation" else 1 << 40)
    _write_shard(directory, 0, _uids(np.arange(n, dtype=np.uint64) + np.uint64(offset)), rows)
    with open(os.path.join(directory, "_DONE.json"), "w") as f:
        json.dump({"rows": n}, f)


# --------------------------------------------------------------------------------------------------
# The configuration


def pipeline_config(args: argparse.Namespace, run_dir: str, pool: str, validation: str, test: str) -> dict[str, Any]:
    return {
        "name": f"scale-{os.path.basename(run_dir)}",
        "run_dir": run_dir,
        "runtime": {"runner": "ray", "num_cpus": args.num_cpus, "use_gpu": False, "progress": False},
        "data": {
            "source": "embeddings", "uri": pool, "embeddings_format": "npz", "id_column": "uid",
            "image_key": "b32_img", "text_key": "b32_txt", "validation_uri": validation, "test_uri": test,
        },
        "embed": {"fusion": "concat", "dtype": "float16"},
        "cluster": {
            "k": args.k, "max_iter": args.iters, "seeding_sample": args.seeding_sample, "num_workers": 2,
            "cache_shards": False,
        },
        "influence": {
            "samples_per_cluster": args.samples_per_cluster, "projection_dim": 128, "rank": 64, "proxy_steps": 50,
            "ensemble": 1,
            "proxy_rows": 10_000, "head_dim": 32, "batch_size": 256, "num_workers": 2, "score_rows": True,
        },
        "curate": {"keep_fraction": 0.6, "comparison_policies": list(args.policies), "curve_keep_fractions": []},
        "train": {
            "epochs": 1, "batch_size": 1024, "num_workers": 2, "head_dim": 32, "step_policy": "same_epochs",
            "seed": 0,
        },
        "evaluate": {"seeds": [0], "positive_classes": [0, 1, 2]},
    }


def stage_command(stage: str, config_path: str, run_dir: str) -> list[str]:
    if stage in ("data", "report"):
        return ["run", config_path, "--stages", stage]
    if stage == "export":
        return ["export", run_dir, "--format", "uids", "--out", os.path.join(run_dir, "export", "uids")]
    return [stage, config_path]


# --------------------------------------------------------------------------------------------------
# Watching a stage's processes through /proc

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> tuple[int, int, float] | None:
    """(ppid, start time, CPU seconds) of a process, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    fields = text[text.rfind(")") + 2:].split()
    return int(fields[1]), int(fields[19]), (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def _status_kib(pid: int, keys: tuple[str, ...] = ("VmHWM", "RssAnon")) -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                name, _, rest = line.partition(":")
                if name in keys:
                    out[name] = int(rest.split()[0])
    except (OSError, ValueError, IndexError):
        pass
    return out


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def _kind(cmd: str) -> str:
    """'worker' (a Ray worker: ``default_worker.py``, or renamed ``ray::<task or actor>``), 'ray-system'
    (raylet, gcs_server, the dashboard and runtime-env agents, log monitor) or 'other'."""
    first = cmd.split(" ", 1)[0]
    if first.startswith("ray::"):
        return "ray-system" if first.endswith("Agent") else "worker"
    if "default_worker.py" in cmd:
        return "worker"
    if any(name in first for name in ("raylet", "gcs_server")) or "ray/" in cmd:
        return "ray-system"
    return "other"


@dataclass
class Seen:
    cmd: str
    kind: str
    peak_bytes: int = 0
    anon_peak_bytes: int = 0
    cpu_seconds: float = 0.0


class Watcher(threading.Thread):
    """Polls every descendant of ``root`` (followed by (pid, start time) once seen) until stopped."""

    def __init__(self, root: int, interval: float) -> None:
        super().__init__(daemon=True)
        self.root, self.interval = root, interval
        self.seen: dict[tuple[int, int], Seen] = {}
        self.root_peak_bytes = 0
        self.root_anon_peak_bytes = 0  # the driver's private memory (RssAnon), sampled: no object-store pages
        self.root_file_peak_bytes = 0  # … the file pages it maps (RssFile: shared libraries, mapped inputs)
        self.root_shmem_peak_bytes = 0  # … and the shared memory (RssShmem: Ray's object store)
        self.root_private_peak_bytes = 0  # … RssAnon + RssShmem at one sample: what data can make it hold
        self._halt = threading.Event()

    def stop(self) -> None:
        self._halt.set()
        self.join()

    def run(self) -> None:
        while not self._halt.is_set():
            self.sample()
            self._halt.wait(self.interval)
        self.sample()

    def sample(self) -> None:
        stats: dict[int, tuple[int, int, float]] = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                found = _stat(int(entry))
                if found is not None:
                    stats[int(entry)] = found
        children: dict[int, list[int]] = {}
        for pid, (ppid, _, _) in stats.items():
            children.setdefault(ppid, []).append(pid)
        tree, todo = set(), [self.root]
        while todo:
            pid = todo.pop()
            for child in children.get(pid, []):
                if child not in tree:
                    tree.add(child)
                    todo.append(child)
        root = _status_kib(self.root, ("VmHWM", "RssAnon", "RssFile", "RssShmem"))
        if root.get("VmHWM"):
            self.root_peak_bytes = max(self.root_peak_bytes, root["VmHWM"] * 1024)
        self.root_anon_peak_bytes = max(self.root_anon_peak_bytes, root.get("RssAnon", 0) * 1024)
        self.root_file_peak_bytes = max(self.root_file_peak_bytes, root.get("RssFile", 0) * 1024)
        self.root_shmem_peak_bytes = max(self.root_shmem_peak_bytes, root.get("RssShmem", 0) * 1024)
        self.root_private_peak_bytes = max(self.root_private_peak_bytes, (root.get("RssAnon", 0) + root.get("RssShmem", 0)) * 1024)
        for pid, (_, start, cpu) in stats.items():
            key = (pid, start)
            if pid not in tree and key not in self.seen:
                continue
            record = self.seen.get(key)
            if record is None:
                cmd = _cmdline(pid)
                record = self.seen[key] = Seen(cmd=cmd[:200], kind=_kind(cmd))
            elif record.kind != "worker":  # a worker renames itself (setproctitle) after it starts
                cmd = _cmdline(pid)
                if cmd and _kind(cmd) == "worker":
                    record.cmd, record.kind = cmd[:200], "worker"
            status = _status_kib(pid)
            record.peak_bytes = max(record.peak_bytes, status.get("VmHWM", 0) * 1024)
            record.anon_peak_bytes = max(record.anon_peak_bytes, status.get("RssAnon", 0) * 1024)
            record.cpu_seconds = max(record.cpu_seconds, cpu)


# --------------------------------------------------------------------------------------------------
# Running the stages


@dataclass
class StageRecord:
    stage: str
    status: str  # ok | failed (rc N) | skipped (...) | timeout
    wall_seconds: float = 0.0
    cpu_seconds: float = 0.0
    driver_cpu_seconds: float = 0.0
    driver_peak_bytes: int = 0
    driver_anon_peak_bytes: int = 0  # sampled RssAnon: the driver's own memory, without the Ray object-store pages it maps
    driver_file_peak_bytes: int = 0  # sampled RssFile
    driver_shmem_peak_bytes: int = 0  # sampled RssShmem
    driver_private_peak_bytes: int = 0  # sampled RssAnon + RssShmem (one sample): the driver's own memory
    worker_peak_bytes: int = 0
    worker_anon_peak_bytes: int = 0
    worker_peak_cmd: str = ""
    system_peak_bytes: int = 0
    system_peak_cmd: str = ""
    workers: int = 0
    processes: int = 0
    error: str = ""
    log: str = ""
    top_workers: list[dict[str, Any]] = field(default_factory=list)
    input_bytes: int = 0  # COUNTED_READS: the input's size on disk
    input_bytes_read: int = 0  # … and what the stage's processes read of it


def _stop_session(proc: subprocess.Popen) -> None:
    """Stop the stage and everything it started (its own session: the driver, its local Ray)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _terminate_as_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def run_stage(stage: str, config_path: str, run_dir: str, scratch: str, args: argparse.Namespace) -> StageRecord:
    os.makedirs(scratch, exist_ok=True)
    usage = os.path.join(scratch, f"{stage}.usage.json")
    stdout_path, stderr_path = os.path.join(scratch, f"{stage}.stdout"), os.path.join(scratch, f"{stage}.stderr")
    env = dict(os.environ, PYTHONUNBUFFERED="1", RAY_USAGE_STATS_ENABLED="0")
    read_log = os.path.join(scratch, f"{stage}.reads")
    if stage in COUNTED_READS:
        shutil.rmtree(read_log, ignore_errors=True)
        env["INFLUENCESPACE_READ_LOG"] = read_log
    command = [sys.executable, "-c", WRAPPER, usage, *stage_command(stage, config_path, run_dir)]
    t0 = time.perf_counter()
    with open(stdout_path, "w") as out, open(stderr_path, "w") as err:
        proc = subprocess.Popen(command, stdout=out, stderr=err, env=env, cwd=REPO, start_new_session=True)
        watcher = Watcher(proc.pid, args.interval)
        watcher.start()
        timed_out = False
        try:
            proc.wait(timeout=args.stage_timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            _stop_session(proc)
        except BaseException:  # interrupted (Ctrl-C, or SIGTERM via _terminate_as_interrupt): take the stage along
            _stop_session(proc)
            raise
        finally:
            watcher.stop()
    wall = time.perf_counter() - t0
    driver = {}
    if os.path.exists(usage):
        with open(usage) as f:
            driver = json.load(f)
    workers = [s for s in watcher.seen.values() if s.kind == "worker"]
    system = [s for s in watcher.seen.values() if s.kind != "worker"]
    top = max(workers, key=lambda s: s.peak_bytes, default=None)
    top_system = max(system, key=lambda s: s.peak_bytes, default=None)
    record = StageRecord(
        stage=stage,
        status="ok" if proc.returncode == 0 else ("timeout" if timed_out else f"failed (rc {proc.returncode})"),
        wall_seconds=round(wall, 2),
        driver_cpu_seconds=round(float(driver.get("cpu_seconds", 0.0)), 2),
        driver_peak_bytes=max(int(driver.get("hwm_bytes", 0)), watcher.root_peak_bytes),
        driver_anon_peak_bytes=watcher.root_anon_peak_bytes,
        driver_file_peak_bytes=watcher.root_file_peak_bytes,
        driver_shmem_peak_bytes=watcher.root_shmem_peak_bytes,
        driver_private_peak_bytes=watcher.root_private_peak_bytes,
        worker_peak_bytes=top.peak_bytes if top else 0,
        worker_anon_peak_bytes=max((s.anon_peak_bytes for s in workers), default=0),
        worker_peak_cmd=top.cmd if top else "",
        system_peak_bytes=top_system.peak_bytes if top_system else 0,
        system_peak_cmd=top_system.cmd if top_system else "",
        workers=len(workers),
        processes=len(watcher.seen),
        log=os.path.join(run_dir, "logs", f"{stage}.log"),
        top_workers=[{"cmd": s.cmd, "peak_mib": round(s.peak_bytes / MIB, 1), "cpu_s": round(s.cpu_seconds, 1)}
                     for s in sorted(workers, key=lambda s: -s.peak_bytes)[:5]],
    )
    record.cpu_seconds = round(record.driver_cpu_seconds + sum(s.cpu_seconds for s in watcher.seen.values()), 2)
    if stage in COUNTED_READS:
        from influencespace.read_log import read_bytes_under

        counted = os.path.join(run_dir, COUNTED_READS[stage])
        record.input_bytes = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(counted) for f in fs)
        record.input_bytes_read = read_bytes_under(read_log, counted)
    if record.status != "ok":
        with open(stderr_path, errors="replace") as f:
            lines = [line.rstrip() for line in f if line.strip()]
        record.error = next((line for line in reversed(lines) if line.startswith("error")), lines[-1] if lines else "")
    return record


# --------------------------------------------------------------------------------------------------
# The manifest check


def _hashes(values: list[Any]) -> np.ndarray:
    return np.fromiter(
        (int.from_bytes(hashlib.blake2b(str(v).encode(), digest_size=8).digest(), "little") for v in values),
        dtype=np.uint64, count=len(values),
    )


def _parquet_ids(path: str, column: str) -> np.ndarray:
    import pyarrow.parquet as pq

    parts = []
    with pq.ParquetFile(path) as reader:
        for batch in reader.iter_batches(batch_size=65536, columns=[column]):
            parts.append(_hashes(batch.column(0).to_pylist()))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint64)


def manifest_dirs(curate_dir: str) -> list[str]:
    found = []
    for root, _, files in os.walk(curate_dir):
        if any(f.endswith(".parquet") and f.startswith(("part-", "rejected-")) for f in files):
            found.append(root)
    return sorted(found)


def check_manifests(pool_dir: str, run_dir: str) -> dict[str, Any]:
    """Every input uid in every manifest directory under <run>/curate exactly once (streamed, 8 B a row)."""
    inputs = np.concatenate([_parquet_ids(os.path.join(pool_dir, f), "uid")
                             for f in sorted(os.listdir(pool_dir)) if f.endswith(".parquet")])
    inputs.sort()
    input_duplicates = int((inputs[1:] == inputs[:-1]).sum())
    directories = manifest_dirs(os.path.join(run_dir, "curate"))
    result: dict[str, Any] = {"input_rows": int(len(inputs)), "input_hash_collisions": input_duplicates,
                              "directories": {}, "ok": bool(directories) and input_duplicates == 0}
    for directory in directories:
        files = sorted(f for f in os.listdir(directory) if f.endswith(".parquet") and f.startswith(("part-", "rejected-")))
        ids = np.concatenate([_parquet_ids(os.path.join(directory, f), "id") for f in files])
        ids.sort()
        repeated = int((ids[1:] == ids[:-1]).sum())
        unique = np.unique(ids)
        missing = int(len(np.setdiff1d(inputs, unique, assume_unique=True)))
        extra = int(len(np.setdiff1d(unique, inputs, assume_unique=True)))
        ok = repeated == 0 and missing == 0 and extra == 0
        result["directories"][os.path.relpath(directory, run_dir)] = {
            "rows": int(len(ids)), "files": len(files), "repeated": repeated, "missing": missing, "extra": extra, "ok": ok,
        }
        result["ok"] = result["ok"] and ok
    return result


# --------------------------------------------------------------------------------------------------
# One size


def run_size(args: argparse.Namespace, n: int, planted: int, world: World, validation: str, test: str) -> dict[str, Any]:
    tag = f"{n}" + (f"-planted{planted}" if planted else "")
    pool = os.path.join(args.workdir, "data", f"pool-{tag}-d{args.tower_dim}-s{args.shard_rows}-c{args.centres}"
                        f"-nf{args.nonfinite:g}-seed{args.seed}")
    t0 = time.perf_counter()
    facts = write_pool(pool, n, world, args.shard_rows, planted, args.nonfinite, args.seed)
    data_seconds = time.perf_counter() - t0
    run_dir = os.path.join(args.workdir, f"run-{tag}")
    shutil.rmtree(run_dir, ignore_errors=True)
    os.makedirs(run_dir)
    config_path = os.path.join(run_dir, "scale.yaml")
    import yaml

    with open(config_path, "w") as f:
        yaml.safe_dump(pipeline_config(args, run_dir, pool, validation, test), f, sort_keys=False)
    print(f"\n== N={n:,}" + (f" with a planted {planted:,}-row cluster" if planted else "")
          + f": pool {pool} ({facts['shards']} shards, written in {data_seconds:.0f} s), run {run_dir}", flush=True)
    print("  " + HEADER, flush=True)
    records: list[StageRecord] = []
    status: dict[str, str] = {}
    for stage in args.stages:
        need = NEEDS.get(stage)
        if need is not None and need in status and status[need] != "ok":
            record = StageRecord(stage=stage, status=f"skipped ({need} {status[need].split()[0]})")
        else:
            record = run_stage(stage, config_path, run_dir, os.path.join(run_dir, "_scale"), args)
        status[stage] = record.status
        records.append(record)
        print("  " + _row(record), flush=True)
        if record.error:
            print(f"      error: {record.error}\n      log: {record.log}", flush=True)
    manifests = None
    if args.check_manifests and status.get("curate") == "ok":
        t1 = time.perf_counter()
        manifests = check_manifests(pool, run_dir)
        manifests["seconds"] = round(time.perf_counter() - t1, 1)
        bad = {k: v for k, v in manifests["directories"].items() if not v["ok"]}
        print(f"  manifests: {len(manifests['directories'])} directories, {manifests['input_rows']:,} input ids: "
              + ("every id exactly once in each" if manifests["ok"] else f"MISMATCH {json.dumps(bad)}")
              + f" ({manifests['seconds']} s)", flush=True)
    loop_config = None
    success = os.path.join(run_dir, "influence", "_SUCCESS.json")
    if status.get("influence") == "ok" and os.path.exists(success):
        with open(success) as f:
            loop_config = json.load(f).get("extra", {}).get("loop_config_bytes")
    for r in records:
        if r.input_bytes:
            print(f"  {r.stage} read {r.input_bytes_read / MIB:,.1f} MiB of its input ({r.input_bytes / MIB:,.1f} MiB): "
                  f"x{r.input_bytes_read / r.input_bytes:.2f}", flush=True)
    if loop_config is not None:
        print(f"  influence's Ray Train loop config: {loop_config:,} bytes pickled", flush=True)
    return {"n": n, "planted": planted, "pool": pool, "pool_facts": facts, "run_dir": run_dir,
            "stages": [asdict(r) for r in records], "manifests": manifests, "loop_config_bytes": loop_config}


HEADER = (f"{'stage':10s} {'status':22s} {'wall s':>8s} {'CPU s':>8s} {'driver MiB':>10s} {'worker MiB':>10s} "
          f"{'sys MiB':>8s} {'workers':>7s}")


def _row(r: StageRecord) -> str:
    def mib(b: int) -> str:
        return f"{b / MIB:.0f}" if b else "-"

    return (f"{r.stage:10s} {r.status[:22]:22s} {r.wall_seconds:8.1f} {r.cpu_seconds:8.1f} {mib(r.driver_peak_bytes):>10s} "
            f"{mib(r.worker_peak_bytes):>10s} {mib(r.system_peak_bytes):>8s} {r.workers:7d}")


# --------------------------------------------------------------------------------------------------
# Figures


def slope(ns: list[int], values: list[float]) -> float:
    """Least-squares slope of log(value) against log(N)."""
    return float(np.polyfit(np.log(ns), np.log(values), 1)[0])


def figures(results: list[dict[str, Any]]) -> dict[str, Any]:
    small, large = results[0], results[-1]
    by = {res["n"]: {s["stage"]: s for s in res["stages"]} for res in results}
    per_stage: dict[str, dict[str, Any]] = {}
    for stage in by[small["n"]]:
        a, b = by[small["n"]].get(stage), by[large["n"]].get(stage)
        if not a or not b or a["status"] != "ok" or b["status"] != "ok":
            continue
        entry: dict[str, Any] = {"driver_ratio": b["driver_peak_bytes"] / max(a["driver_peak_bytes"], 1)}
        if a.get("driver_anon_peak_bytes") and b.get("driver_anon_peak_bytes"):
            entry["driver_anon_ratio"] = b["driver_anon_peak_bytes"] / a["driver_anon_peak_bytes"]
        if a.get("driver_private_peak_bytes") and b.get("driver_private_peak_bytes"):
            entry["driver_private_ratio"] = b["driver_private_peak_bytes"] / a["driver_private_peak_bytes"]
        if a["worker_peak_bytes"] and b["worker_peak_bytes"]:
            entry["worker_ratio"] = b["worker_peak_bytes"] / a["worker_peak_bytes"]
        if a["cpu_seconds"] > 0:
            entry["cpu_ratio"] = b["cpu_seconds"] / a["cpu_seconds"]
        per_stage[stage] = entry
    complete = [s for s in per_stage if all(by[r["n"]].get(s, {}).get("status") == "ok" for r in results)]
    ns = [r["n"] for r in results]
    totals = [sum(by[n][s]["cpu_seconds"] for s in complete) for n in ns]
    worst_driver = max(per_stage.items(), key=lambda kv: kv[1]["driver_ratio"], default=(None, {}))
    with_private = [(k, v) for k, v in per_stage.items() if "driver_private_ratio" in v]
    worst_private = max(with_private, key=lambda kv: kv[1]["driver_private_ratio"], default=(None, {}))
    with_workers = [(k, v) for k, v in per_stage.items() if "worker_ratio" in v]
    worst_worker = max(with_workers, key=lambda kv: kv[1]["worker_ratio"], default=(None, {}))
    return {
        "per_stage": per_stage,
        "stages_in_cpu_total": complete,
        "cpu_totals": totals,
        "driver_rss_ratio": worst_driver[1].get("driver_ratio"),
        "driver_rss_ratio_stage": worst_driver[0],
        "driver_private_ratio": worst_private[1].get("driver_private_ratio"),
        "driver_private_ratio_stage": worst_private[0],
        "worker_rss_ratio": worst_worker[1].get("worker_ratio"),
        "worker_rss_ratio_stage": worst_worker[0],
        "cpu_slope": slope(ns, totals) if len(ns) > 1 and all(t > 0 for t in totals) else None,
        # The largest over the sizes: what the influence stage read of the embedded pool / its size.
        "influence_bytes_read_ratio": max((s["input_bytes_read"] / s["input_bytes"] for r in results for s in r["stages"]
                                           if s["stage"] == "influence" and s.get("input_bytes")), default=None),
        "loop_config_bytes": max((r["loop_config_bytes"] for r in results if r.get("loop_config_bytes") is not None),
                                 default=None),
        "all_ok": all(s["status"] == "ok" for r in results for s in r["stages"]),
    }


def _fmt(value: float | None, digits: int = 3) -> str:
    return "nan" if value is None else f"{value:.{digits}f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default=None, help=f"comma-separated pool sizes (default {DEFAULT_SIZES})")
    parser.add_argument("--quick", action="store_true", help=f"sizes {QUICK_SIZES}")
    parser.add_argument("--planted-cluster", type=int, default=0, metavar="ROWS",
                        help="also run once with one tight planted cluster of ROWS rows (e.g. 150000)")
    parser.add_argument("--planted-size", type=int, default=None, help="pool size of the planted run (default: the largest size)")
    parser.add_argument("--planted-only", action="store_true", help="run only the planted-cluster pool")
    parser.add_argument("--planted-limit-gib", type=float, default=2.0, help="acceptance bound on its worker peak (GiB)")
    parser.add_argument("--check-manifests", action=argparse.BooleanOptionalAction, default=True,
                        help="verify every input id is in every curate manifest exactly once (default: on)")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"stages to run (default: {','.join(STAGES)})")
    parser.add_argument("--k", type=int, default=256, help="clusters, the same at every size (default 256)")
    parser.add_argument("--iters", type=int, default=10, help="Lloyd iterations (default 10)")
    parser.add_argument("--seeding-sample", type=int, default=32768)
    parser.add_argument("--samples-per-cluster", type=int, default=8)
    parser.add_argument("--policies", default="random,dedup,clipscore", help="curate comparison policies ('' for none)")
    parser.add_argument("--tower-dim", type=int, default=32, help="image and text tower dim (fused concat: twice this)")
    parser.add_argument("--centres", type=int, default=1024, help="sub-cluster centres of the generator")
    parser.add_argument("--nonfinite", type=float, default=1e-4,
                        help="share of pool rows with a NaN, which embed rejects (default 0.0001, at least one row; 0: none)")
    parser.add_argument("--shard-rows", type=int, default=25_000, help="rows per pool shard (default 25000)")
    parser.add_argument("--num-cpus", type=int, default=2, help="CPUs of each stage's local Ray")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--interval", type=float, default=0.2, help="seconds between /proc samples")
    parser.add_argument("--stage-timeout", type=float, default=3600.0, help="seconds before a stage is stopped")
    parser.add_argument("--workdir", default="/tmp/influencespace-bench/scale", help="data and run directories")
    parser.add_argument("--out", default=os.path.join(REPO, "runs", "scale", "scale.json"), help="results JSON")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate_as_interrupt)  # a killed harness stops its running stage too

    sizes = [int(s) for s in (args.sizes or (QUICK_SIZES if args.quick else DEFAULT_SIZES)).split(",") if s.strip()]
    args.stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in args.stages if s not in STAGES]
    if unknown:
        parser.error(f"unknown stage(s) {unknown}; stages are {', '.join(STAGES)}")
    args.policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    planted_size = args.planted_size or max(sizes)
    if args.planted_cluster and args.planted_cluster >= planted_size:
        parser.error(f"--planted-cluster {args.planted_cluster} must be below the planted run's size {planted_size}")
    if args.planted_only and not args.planted_cluster:
        parser.error("--planted-only needs --planted-cluster ROWS")
    args.workdir = os.path.abspath(args.workdir)

    world = World.make(args.centres, args.tower_dim, args.seed)
    split_dir = os.path.join(args.workdir, "data", f"%s-d{args.tower_dim}-c{args.centres}-seed{args.seed}")
    validation, test = split_dir % "validation", split_dir % "test"
    write_split(validation, "validation", world, args.seed)
    write_split(test, "test", world, args.seed)
    print(f"scale: sizes {sizes if not args.planted_only else []}, k={args.k}, tower dim {args.tower_dim} "
          f"(fused {2 * args.tower_dim}), {args.shard_rows:,} rows per shard, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)
    results = [] if args.planted_only else [run_size(args, n, 0, world, validation, test) for n in sizes]
    planted = run_size(args, planted_size, args.planted_cluster, world, validation, test) if args.planted_cluster else None

    report: dict[str, Any] = {
        "settings": {k: v for k, v in vars(args).items()},
        "sizes": sizes,
        "machine": {"cpus": os.cpu_count(), "load_average_end": os.getloadavg()},
        "results": results,
        "planted": planted,
    }
    print()
    if results:
        print("per size (wall s / CPU s / driver MiB / worker MiB):")
        print(f"  {'stage':10s} " + " ".join(f"{r['n']:>28,}" for r in results))
        for stage in args.stages:
            cells = []
            for res in results:
                s = next(x for x in res["stages"] if x["stage"] == stage)
                cells.append(f"{s['wall_seconds']:6.0f} {s['cpu_seconds']:6.0f} {s['driver_peak_bytes'] / MIB:6.0f} "
                             f"{s['worker_peak_bytes'] / MIB:6.0f}" if s["status"] == "ok" else f"{s['status'][:28]:>28s}")
            print(f"  {stage:10s} " + " ".join(f"{c:>28s}" for c in cells))
    fig = figures(results) if len(results) >= 1 else {}
    report["figures"] = fig
    if fig.get("per_stage"):
        print(f"\nratios {results[0]['n']:,} -> {results[-1]['n']:,} (largest / smallest):")
        for stage, entry in fig["per_stage"].items():
            print(f"  {stage:10s} driver x{entry['driver_ratio']:.2f} (private x{entry.get('driver_private_ratio', float('nan')):.2f})  "
                  + (f"worker x{entry['worker_ratio']:.2f}  " if "worker_ratio" in entry else "worker -      ")
                  + (f"CPU x{entry['cpu_ratio']:.2f}" if "cpu_ratio" in entry else ""))
        print(f"  total CPU s over {', '.join(fig['stages_in_cpu_total'])}: "
              + ", ".join(f"{t:.0f}" for t in fig["cpu_totals"]))
    failures = [(r["n"], s["stage"], s["status"], s["error"]) for r in results + ([planted] if planted else [])
                for s in r["stages"] if s["status"] != "ok"]
    for n, stage, status, error in failures:
        print(f"  N={n:,} {stage}: {status}: {error}")
    bad_manifests = [r["n"] for r in results + ([planted] if planted else []) if r["manifests"] and not r["manifests"]["ok"]]
    if bad_manifests:
        print(f"  manifest check FAILED at N={bad_manifests}")
    if planted:
        ok_stages = [s for s in planted["stages"] if s["worker_peak_bytes"]]
        top = max(ok_stages, key=lambda s: s["worker_peak_bytes"], default=None)
        peak = top["worker_peak_bytes"] if top else 0
        limit = args.planted_limit_gib * 2**30
        report["planted_summary"] = {
            "rows": args.planted_cluster, "n": planted_size, "max_worker_peak_bytes": peak,
            "stage": top["stage"] if top else None, "limit_bytes": limit, "within_limit": bool(top) and peak <= limit,
            "max_driver_peak_bytes": max((s["driver_peak_bytes"] for s in planted["stages"]), default=0),
        }
        print(f"planted_cluster_rows={args.planted_cluster} planted_n={planted_size} "
              f"planted_max_worker_rss_mib={peak / MIB:.0f} (stage {top['stage'] if top else '-'}; "
              f"limit {limit / MIB:.0f} MiB: {'ok' if report['planted_summary']['within_limit'] else 'EXCEEDED'})")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1, default=str)
    print(f"results: {args.out}")
    print(f"scale_driver_rss_ratio={_fmt(fig.get('driver_rss_ratio'))} scale_driver_private_ratio={_fmt(fig.get('driver_private_ratio'))} "
          f"scale_worker_rss_ratio={_fmt(fig.get('worker_rss_ratio'))} "
          f"scale_cpu_slope={_fmt(fig.get('cpu_slope'))} "
          f"influence_bytes_read_ratio={_fmt(fig.get('influence_bytes_read_ratio'))} "
          f"loop_config_bytes={fig.get('loop_config_bytes') if fig.get('loop_config_bytes') is not None else 'nan'}")
    return 0 if not failures and not bad_manifests else 1


if __name__ == "__main__":
    sys.exit(main())
