"""k-means state on storage (local or s3://), one file per phase, each written atomically.

``<stage_dir>/checkpoint/<phase>.npz`` holds the centroids after the last finished iteration and, as
JSON, the iteration number, the objective history and whether the phase converged. A phase is saved
whole or not at all, so a job killed at any moment resumes from a consistent state.
"""

from __future__ import annotations

import io
import json
import zipfile
from typing import Any

import numpy as np

from influencespace import storage
from influencespace.errors import StageStateError


class StorageCheckpoint:
    """:class:`~influencespace.cluster.kmeans.Checkpoint` in a directory URI."""

    def __init__(self, directory: str):
        self.directory = directory

    def _uri(self, phase: str) -> str:
        return storage.join(self.directory, f"{phase}.npz")

    def load(self, phase: str) -> dict[str, Any] | None:
        uri = self._uri(phase)
        if not storage.is_file(uri):
            return None
        try:
            with np.load(io.BytesIO(storage.read_bytes(uri)), allow_pickle=False) as data:
                meta = json.loads(data["meta"].tobytes().decode())
                return {**meta, "centroids": data["centroids"].copy()}
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:  # written atomically: damaged since
            raise StageStateError(
                f"'{uri}' is not a readable k-means checkpoint ({type(exc).__name__}: {exc}); delete it to restart "
                "k-means from seeding, or rerun with --overwrite"
            ) from None

    def save(self, phase: str, state: dict[str, Any]) -> None:
        meta = {key: value for key, value in state.items() if key != "centroids"}
        buffer = io.BytesIO()
        np.savez(
            buffer,
            centroids=np.asarray(state["centroids"], np.float32),
            meta=np.frombuffer(json.dumps(meta).encode(), np.uint8),
        )
        storage.write_bytes(self._uri(phase), buffer.getvalue())
