import gzip
import struct

import numpy as np
import pytest

from influencespace.datasets import captions
from influencespace.datasets.fashion_mnist import CLASS_NAMES, load_split, parse_idx
from influencespace.datasets.wordnet import WordNetNouns
from influencespace.errors import InputDataError, MissingDependencyError


def _idx(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def test_parse_idx_round_trip_and_errors():
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    assert np.array_equal(parse_idx(_idx(array)), array)
    with pytest.raises(InputDataError, match="bad magic"):
        parse_idx(b"\x01\x02\x08\x01")
    with pytest.raises(InputDataError, match="header says"):
        parse_idx(_idx(array)[:-1])


def test_load_split_from_a_given_directory(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (5, 28, 28))
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx(images)))
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(_idx(np.array([0, 1, 2, 3, 4])))
    got_images, got_labels = load_split(tmp_path, "test")
    assert got_images.shape == (5, 28, 28) and got_labels.tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(MissingDependencyError, match="dataset-fashion-mnist"):
        load_split(tmp_path, "train")
    with pytest.raises(MissingDependencyError, match="does not exist"):
        load_split(tmp_path / "absent", "train")


def test_real_fashion_mnist_is_readable():
    images, labels = load_split("/usr/share/datasets/fashion-mnist", "test")
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [1000] * 10


def test_wordnet_first_senses_are_the_garments():
    wordnet = WordNetNouns("/usr/share/wordnet")
    sneaker = wordnet.first_sense("sneaker")
    assert sneaker.words == ("gym shoe", "sneaker", "tennis shoe")
    assert sneaker.gloss.startswith("a canvas shoe with a pliable rubber sole")
    assert wordnet.first_sense("no_such_lemma_xyz") is None
    with pytest.raises(MissingDependencyError, match="wordnet-base"):
        WordNetNouns("/nonexistent")


def test_vocabulary_has_a_synonym_and_gloss_per_class():
    vocab = captions.build_vocabulary("/usr/share/wordnet")
    assert [v.name for v in vocab] == list(CLASS_NAMES)
    by_name = {v.name: v for v in vocab}
    assert "tennis shoe" in by_name["Sneaker"].synonyms
    assert by_name["Pullover"].gloss == "a sweater that is put on by pulling it over the head"
    assert captions.class_prompts(vocab)[9] == "a photo of an ankle boot."
    for v in vocab:
        texts = v.captions()
        assert len(texts) == len(set(texts)) >= 4
