"""The ``data`` stage: builds the benchmark into the run directory, or checks and records user input."""

from __future__ import annotations

from influencespace import storage
from influencespace.datasets.benchmark import build_benchmark, write_splits
from influencespace.errors import InputDataError
from influencespace.stages import Stage, StageContext, StageResult

REQUIRED_COLUMNS = ("id", "text")
IMAGE_COLUMNS = ("image", "image_path")


def check_parquet_schema(uri: str) -> list[str]:
    """Fail fast, naming the file and column, when input Parquet lacks what the pipeline needs."""
    import pyarrow.parquet as pq

    files = [uri] if uri.endswith(".parquet") else storage.list_files(uri, ".parquet", recursive=True)
    if not files:
        raise InputDataError(f"no Parquet files at '{uri}': point data.uri at a directory of .parquet files")
    fs, path = storage.resolve(files[0])
    try:
        names = pq.read_schema(path, filesystem=fs).names
    except Exception as exc:  # pyarrow raises several types for a bad footer
        raise InputDataError(f"'{files[0]}' is not a readable Parquet file: {exc}") from None
    missing = [c for c in REQUIRED_COLUMNS if c not in names]
    if not any(c in names for c in IMAGE_COLUMNS):
        missing.append("image (encoded bytes) or image_path")
    if missing:
        raise InputDataError(f"'{files[0]}' lacks column(s) {', '.join(missing)}; it has: {', '.join(names)}")
    return files


class DataStage(Stage):
    name = "data"
    section = "data"

    def run(self, ctx: StageContext) -> StageResult:
        data = ctx.config.data
        if data.source == "benchmark":
            splits = build_benchmark(data.benchmark)
            outputs = write_splits(splits, ctx.stage_dir, data.benchmark.shard_rows)
            return StageResult(counts=splits.counts, outputs={**outputs, "format": "parquet"})
        if data.source == "parquet":
            files = check_parquet_schema(data.uri)
            counts = {"files": len(files)}
        elif data.source == "embeddings":
            from influencespace.datasets.precomputed import PrecomputedSpec, list_shards

            counts = {"files": len(list_shards(data.uri, PrecomputedSpec.from_config(data)))}
        else:
            files = storage.list_files(data.uri, ".tar") if not data.uri.endswith(".tar") else [data.uri]
            if not files:
                raise InputDataError(f"no WebDataset .tar shards at '{data.uri}'")
            counts = {"files": len(files)}
        outputs = {"pool": data.uri, "format": data.source}
        if data.validation_uri:
            outputs["validation"] = data.validation_uri
        if data.test_uri:
            outputs["test"] = data.test_uri
        return StageResult(counts=counts, outputs=outputs)
