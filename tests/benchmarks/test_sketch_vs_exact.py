"""benchmarks/sketch_vs_exact.py end to end on a tiny synthetic run: with k above the parameter count and
no damping the sketch is the exact influence, so the benchmark must report agreement; far below, it must not."""

import numpy as np
import pytest

from benchmarks import sketch_vs_exact
from influencespace import storage
from tests.influence.synthetic import make_data, write_upstream


@pytest.fixture
def run_dir(tmp_path):
    root = str(tmp_path / "run")
    for name, manifest in write_upstream(root, make_data(), num_clusters=8).items():
        storage.write_json(storage.join(root, name, "_SUCCESS.json"), manifest)
    return root


SETTINGS = ["influence.dtype=float64", "influence.negatives=8", "influence.head_dim=2", "influence.samples_per_cluster=12",
            "influence.ensemble=2", "influence.proxy_steps=30", "influence.damping=1e-9", "influence.damping_floor=1e-12",
            "influence.weight_decay=1e-2"]  # p = 2 · (2 · 6) = 24 tracked parameters


def test_above_the_parameter_count_the_sketch_is_exact_and_far_below_it_is_not(run_dir, tmp_path):
    out = str(tmp_path / "result.json")
    args = [run_dir, "--k", "40,3", "--preset", "test", "--tolerance", "1e-12", "--out", out]
    result = sketch_vs_exact.main(args + [arg for s in SETTINGS for arg in ("--set", s)])
    assert result["p"] == 24 and result["states"] == 2 and result["clusters"] == 8
    exact = result["k"]["40"]["vs_exact"]
    assert exact["max_relative_error"] < 1e-6 and exact["spearman"] == pytest.approx(1.0), exact
    # λ ≈ 0 here, so the damped reference is the exact one
    assert result["damping_effect"]["max_relative_error"] < 1e-6, result["damping_effect"]
    coarse = result["k"]["3"]["vs_exact"]
    assert coarse["max_relative_error"] > 1e-3, coarse  # a 3-d sketch of 24 parameters loses information
    assert max(max(r["cg_relative_residual"]) for r in result["exact"].values()) < 1e-10
    assert np.isfinite(result["scores"]["exact"]).all() and len(result["scores"]["sketch_k40"]) == 8
