import pytest
from pydantic import ValidationError

from influencespace.config import PRESETS, load_config
from influencespace.errors import ConfigError


@pytest.mark.parametrize("preset", PRESETS)
def test_presets_load_and_validate(preset):
    config = load_config(preset)
    assert config.name == preset


def test_dotted_override_sets_nested_value_with_yaml_types():
    config = load_config("test", ["cluster.k=16", "cluster.spherical=false", "evaluate.seeds=[1, 2]"])
    assert config.cluster.k == 16
    assert config.cluster.spherical is False
    assert config.evaluate.seeds == (1, 2)


def test_errors_name_key_value_and_what_is_allowed():
    with pytest.raises(ConfigError) as info:
        load_config("test", ["cluster.k=1", "embed.fusion=max", "runtime.runner=slurm"])
    message = str(info.value)
    assert "cluster.k: Input should be greater than or equal to 2 (got 1)" in message
    assert "embed.fusion: Input should be 'concat' or 'sum' (got 'max')" in message
    assert "runtime.runner" in message and "'slurm'" in message


def test_unknown_key_is_an_error_listing_allowed_keys():
    with pytest.raises(ConfigError) as info:
        load_config("test", ["cluster.kk=3"])
    assert "cluster.kk: unknown key; allowed here: k, " in str(info.value)


def test_unknown_section_is_an_error():
    with pytest.raises(ConfigError, match="clusters: unknown key; allowed here: name, run_dir"):
        load_config("test", ["clusters.k=3"])


def test_cross_field_rules():
    with pytest.raises(ConfigError, match="data.uri is required"):
        load_config("test", ["data.source=parquet"])
    with pytest.raises(ConfigError, match="min_weight"):
        load_config("test", ["curate.min_weight=2.0"])
    # an ablation that changes nothing would curate a copy of the policy under another name
    with pytest.raises(ConfigError, match=r"\['tiers_random_order'\] change only settings .*row_order': 'random'"):
        load_config("test", ["curate.row_order=random", "curate.ablations=[tiers_random_order,heuristics_only]"])
    assert load_config("test", ["curate.row_order=image_text", "curate.ablations=[tiers_random_order]"]).curate.ablations


def test_malformed_override_and_missing_file():
    with pytest.raises(ConfigError, match="key.path=value"):
        load_config("test", ["cluster.k"])
    with pytest.raises(ConfigError, match="neither a preset"):
        load_config("/nonexistent/config.yaml")
    with pytest.raises(ConfigError, match="is a value, not a section"):
        load_config("test", ["name.x=1"])


def test_yaml_file_and_invalid_yaml(tmp_path):
    good = tmp_path / "c.yaml"
    good.write_text("name: mine\ncluster:\n  k: 5\n")
    assert load_config(str(good)).cluster.k == 5
    bad = tmp_path / "bad.yaml"
    bad.write_text("cluster: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(bad))
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(str(listy))


def test_config_is_frozen():
    config = load_config("test")
    with pytest.raises(ValidationError, match="frozen"):
        config.cluster.k = 3  # type: ignore[misc]


def test_fingerprint_ignores_execution_only_fields_but_not_results():
    base = load_config("test")
    faster = load_config("test", ["embed.batch_size=7", "embed.num_actors=3"])
    different = load_config("test", ["embed.fusion=sum"])
    assert base.section_fingerprint("embed") == faster.section_fingerprint("embed")
    assert base.section_fingerprint("embed") != different.section_fingerprint("embed")


def test_config_from_s3(s3_prefix):
    from influencespace import storage

    uri = f"{s3_prefix}/config.yaml"
    storage.write_bytes(uri, b"name: remote\ncluster:\n  k: 9\n")
    config = load_config(uri)
    assert (config.name, config.cluster.k) == ("remote", 9)


def test_configuration_doc_lists_every_key_as_the_code_does():
    from pathlib import Path

    from influencespace.config import keys_markdown

    doc = (Path(__file__).parents[1] / "docs" / "configuration.md").read_text()
    assert keys_markdown() in doc, "docs/configuration.md is stale: regenerate it with `influencespace config keys`"


def test_relative_local_paths_become_absolute_for_ray_workers(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = load_config("test", ["run_dir=runs/x", "data.source=parquet", "data.uri=pairs"])
    assert config.run_dir == str(tmp_path / "runs" / "x")
    assert config.data.uri == str(tmp_path / "pairs")
    assert load_config("test", ["run_dir=s3://bucket/runs/x"]).run_dir == "s3://bucket/runs/x"


def test_open_clip_target_is_refused_on_embeddings_before_any_work():
    with pytest.raises(ConfigError, match="train.target=open_clip trains from the pool's raw pixels"):
        load_config("test", ["data.source=embeddings", "data.uri=/tmp/embeddings", "train.target=open_clip"])
    assert load_config("test", ["train.target=open_clip"]).train.target == "open_clip"
