import pytest


@pytest.mark.ray
def test_local_ray_is_bound_to_loopback(ray_cluster):
    nodes = ray_cluster.nodes()
    assert nodes and all(node["NodeManagerAddress"] == "127.0.0.1" for node in nodes)
    assert ray_cluster.cluster_resources()["CPU"] == 2


@pytest.mark.ray
def test_workers_inherit_s3_settings(ray_cluster, s3_prefix):
    from influencespace import storage

    @ray_cluster.remote
    def write(uri):
        storage.write_bytes(uri, b"from a worker")
        return True

    assert ray_cluster.get(write.remote(f"{s3_prefix}/w.bin"))
    assert storage.read_bytes(f"{s3_prefix}/w.bin") == b"from a worker"


def test_placement_maps_stage_kinds_to_node_resources():
    from influencespace.config import RuntimeConfig
    from influencespace.runtime import placement

    assert placement(RuntimeConfig(), "gpu") == {}
    cluster = RuntimeConfig(use_gpu=True, gpu_node_resource="gpu_node", cpu_node_resource="cpu_node")
    assert placement(cluster, "gpu") == {"resources": {"gpu_node": 0.001}, "num_gpus": 1}
    assert placement(cluster, "cpu") == {"resources": {"cpu_node": 0.001}}
    with pytest.raises(ValueError):
        placement(cluster, "tpu")


def _fail_on_rank_1(config):
    import ray.train

    from influencespace import storage
    from influencespace.errors import InputDataError

    if ray.train.get_context().get_world_rank() == 1:
        raise InputDataError(f"row 7 of {config['uri']} is bad")
    return storage.current_settings()  # what the driver shipped


def _settings(config):
    from influencespace import storage

    return storage.current_settings()


@pytest.mark.ray
def test_worker_groups_get_the_driver_storage_settings_and_reraise_user_errors_by_class(ray_cluster, tmp_path):
    import ray.train

    from influencespace import storage
    from influencespace.config import RuntimeConfig
    from influencespace.errors import InputDataError
    from influencespace.runtime import run_torch_workers

    def run_config(name):
        return ray.train.RunConfig(name=name, storage_path=str(tmp_path / "ray"))

    runtime = RuntimeConfig(num_cpus=2)
    storage.configure("http://127.0.0.1:1", "eu-test-1", 2)  # distinct from anything a worker would default to
    try:
        result = run_torch_workers(_settings, {}, runtime=runtime, num_workers=2, run_config=run_config("ok"))
        assert result.return_value == storage.current_settings()
        with pytest.raises(InputDataError, match=r"^row 7 of s3://b/x is bad$"):
            run_torch_workers(_fail_on_rank_1, {"uri": "s3://b/x"}, runtime=runtime, num_workers=2,
                              run_config=run_config("fails"))
    finally:
        storage.configure()
