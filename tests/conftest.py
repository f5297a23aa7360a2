"""Shared fixtures: a real S3 server and a real local Ray on 127.0.0.1, tiny benchmark data, configs."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from influencespace.runtime import use_venv_build_tools
from tests.s3server import start_s3_server

BUCKET = "influencespace-test"
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
# The venv's ninja first on PATH and its own DeepSpeed build cache for every process the tests start (CLI subprocesses, Ray workers,
# also those that never call ensure_ray): see runtime.use_venv_build_tools for why.
use_venv_build_tools()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """SeaweedFS on loopback with one bucket; AWS_* variables point at it for the whole session."""
    server = start_s3_server(tmp_path_factory.mktemp("seaweedfs"))
    saved = {k: os.environ.get(k) for k in server.env()}
    os.environ.update(server.env())
    import boto3

    boto3.client("s3").create_bucket(Bucket=BUCKET)
    from influencespace import storage

    storage.configure()
    yield server
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    storage.configure()


@pytest.fixture
def s3_prefix(s3_server, request):
    """A fresh s3:// prefix for one test."""
    name = request.node.name.replace("[", "-").replace("]", "").replace("/", "-")[:40]
    return f"s3://{BUCKET}/{name}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="session")
def ray_cluster(s3_server):
    """A local Ray (2 CPUs, 127.0.0.1), started after the S3 variables are set so workers inherit them."""
    import ray

    from influencespace.config import RuntimeConfig
    from influencespace.runtime import ensure_ray

    ensure_ray(RuntimeConfig(num_cpus=2, progress=False))
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_benchmark(tmp_path_factory) -> Path:
    """The tiny fashion-captions benchmark, built once per session (read-only for tests)."""
    from influencespace.config import benchmark_config
    from influencespace.datasets.benchmark import SIZES, build_fashion_captions, write_splits

    out = tmp_path_factory.mktemp("fashion-tiny")
    splits = build_fashion_captions(benchmark_config(SIZES["tiny"]))
    write_splits(splits, str(out), shard_rows=100)
    return out


@pytest.fixture(scope="session")
def offline_checkpoint(tmp_path_factory):
    """A tiny offline-default checkpoint (200 images, 20 steps, 32 px), built once per session."""
    from influencespace.embed.offline_default import AlignmentSettings, build_default_checkpoint

    path = tmp_path_factory.mktemp("is-cache") / "offline-default-tiny.pt"
    build_default_checkpoint(str(path), AlignmentSettings(images=200, steps=20, batch_size=64, dim=32, image_size=32))
    return path


@pytest.fixture
def make_config(tmp_path):
    """``make_config(*overrides)``: the test preset, writing into this test's tmp dir."""
    from influencespace.config import load_config

    def make(*overrides: str, run_dir: str | None = None):
        return load_config("test", [f"run_dir={run_dir or tmp_path / 'run'}", *overrides])

    return make


def pytest_collection_modifyitems(config, items):
    gpu_items = [item for item in items if "gpu" in item.keywords]
    if not gpu_items:
        return
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none on this machine); runs on GPU clusters")
    for item in gpu_items:
        item.add_marker(skip)
