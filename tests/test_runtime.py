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
