"""Cluster configs are checked by Ray's own validation (its JSON schema and node-type rules), not by eye."""

import copy
from pathlib import Path

import pytest
import yaml

CONFIGS = Path(__file__).parents[1] / "cluster_configs"


def _ray_validate(config: dict) -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


@pytest.mark.parametrize("name", ["aws", "gcp", "local"])
def test_autoscaler_configs_pass_ray_validation(name):
    config = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
    prepared = _ray_validate(config)
    if name != "local":
        types = prepared["available_node_types"]
        assert types["gpu_worker"]["resources"] == {"gpu_node": 1000}
        assert types["cpu_worker"]["resources"] == {"cpu_node": 1000}
        assert types["head"]["resources"] == {"CPU": 0}  # the head runs only drivers


def test_validation_would_catch_a_broken_config():
    import jsonschema

    config = yaml.safe_load((CONFIGS / "aws.yaml").read_text())
    config["available_node_types"]["gpu_worker"]["min_workers"] = "two"
    with pytest.raises(jsonschema.ValidationError):
        _ray_validate(config)
    config = yaml.safe_load((CONFIGS / "aws.yaml").read_text())
    config["head_node_type"] = "nonexistent"
    with pytest.raises(ValueError, match="head_node_type"):
        _ray_validate(config)


def test_kuberay_rayjob_cluster_spec_derives_a_valid_autoscaling_config():
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr
    from ray.autoscaler._private.util import validate_config

    job = yaml.safe_load((CONFIGS / "kuberay-rayjob.yaml").read_text())
    assert job["kind"] == "RayJob" and "jobs/pipeline.py" in job["spec"]["entrypoint"]
    cluster = {"metadata": {"name": "influencespace", "namespace": "default"}, "spec": job["spec"]["rayClusterSpec"]}
    derived = _derive_autoscaling_config_from_ray_cr(cluster)
    validate_config(derived)
    types = derived["available_node_types"]
    assert types["gpu-workers"]["resources"]["GPU"] == 1 and types["gpu-workers"]["resources"]["gpu_node"] == 1000
    assert types["cpu-workers"]["resources"]["cpu_node"] == 1000
    assert types["headgroup"]["resources"]["CPU"] == 0
