"""Read Fashion-MNIST from its IDX files (Debian's ``dataset-fashion-mnist`` or the canonical release)."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np

from influencespace.errors import InputDataError, MissingDependencyError

CLASS_NAMES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
FOOTWEAR_CLASSES = (5, 7, 9)  # Sandal, Sneaker, Ankle boot: the binary fairness task is "footwear vs not"

_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
INSTALL_HINT = (
    "install Debian's package 'dataset-fashion-mnist' (apt-get install dataset-fashion-mnist) or put the four "
    "IDX files of the canonical release in a directory and set data.benchmark.fashion_mnist_dir"
)


def _open(directory: Path, stem: str) -> bytes:
    for candidate in (directory / f"{stem}.gz", directory / stem):
        if candidate.is_file():
            raw = candidate.read_bytes()
            return gzip.decompress(raw) if candidate.suffix == ".gz" else raw
    raise MissingDependencyError(f"Fashion-MNIST file '{stem}(.gz)' not found in {directory}: {INSTALL_HINT}")


def parse_idx(raw: bytes) -> np.ndarray:
    """Decode an IDX array (magic: two zero bytes, a type code, the number of dimensions)."""
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise InputDataError("not an IDX file (bad magic number)")
    type_code, ndim = raw[2], raw[3]
    if type_code != 0x08:
        raise InputDataError(f"IDX type 0x{type_code:02x} is not supported (Fashion-MNIST uses unsigned bytes, 0x08)")
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise InputDataError(f"IDX payload holds {data.size} bytes, header says {shape}")
    return data.reshape(shape)


def load_split(directory: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(images uint8 [n, 28, 28], labels int64 [n])`` for 'train' or 'test'."""
    directory = Path(directory)
    if not directory.is_dir():
        raise MissingDependencyError(f"Fashion-MNIST directory {directory} does not exist: {INSTALL_HINT}")
    image_stem, label_stem = _FILES[split]
    images = parse_idx(_open(directory, image_stem))
    labels = parse_idx(_open(directory, label_stem)).astype(np.int64)
    if len(images) != len(labels):
        raise InputDataError(f"{directory}: {len(images)} images but {len(labels)} labels in the {split} split")
    return images, labels
