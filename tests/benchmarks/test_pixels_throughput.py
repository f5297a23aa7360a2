"""benchmarks/pixels_throughput.py: FLOPs per sample through open_clip's model and the stage's decoder."""

import pytest

from benchmarks.pixels_throughput import decode_rate, model_flops


def test_backward_costs_about_twice_the_forward_of_the_built_in_tiny_clip():
    m = model_flops("influencespace-pixels-tiny")
    assert m["image_size"] == 32
    assert m["params"] == pytest.approx(3.38e6, rel=0.01)  # the vocabulary's 49,408 × 64 embedding is most of it
    # Every matmul's backward is two matmuls of its size (input and weight gradients); the patch
    # convolution's input gradient is not needed, so the ratio is a little under 3.
    assert 2.8 < m["train_flops"] / m["forward_flops"] <= 3.0, m


def test_decode_rate_runs_the_stage_preprocess_on_a_jpeg():
    d = decode_rate(64, 48, 32, seconds=0.05)
    assert d["size"] == 32 and d["images_per_second_per_core"] > 0
