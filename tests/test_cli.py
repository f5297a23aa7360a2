import subprocess
import sys

from influencespace.cli import main


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "influencespace", *args], capture_output=True, text=True, timeout=120)


def test_import_and_help_load_no_heavy_library():
    code = (
        "import sys, influencespace, influencespace.cli as c\n"
        "try:\n    c.main(['--help'])\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('torch', 'ray', 'faiss', 'open_clip', 'deepspeed', 'pyarrow', 'pydantic') if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60).stdout
    assert "HEAVY []" in out
    assert "run" in out and "demo" in out and "config" in out


def test_config_show_and_validate(capsys):
    assert main(["config", "show", "test", "--set", "cluster.k=11"]) == 0
    assert "k: 11" in capsys.readouterr().out
    assert main(["config", "validate", "cluster"]) == 0


def test_user_errors_exit_2_with_one_message():
    result = _run("config", "validate", "test", "--set", "cluster.k=0")
    assert result.returncode == 2
    assert result.stderr.startswith("error: invalid configuration") and "Traceback" not in result.stderr
    result = _run("report", "/nonexistent/run")
    assert result.returncode == 2 and "Traceback" not in result.stderr


def test_data_build_tiny(tmp_path, capsys):
    assert main(["data", "build", "fashion-captions", "--size", "tiny", "--out", str(tmp_path), "--set", "seed=4"]) == 0
    out = capsys.readouterr().out
    assert "pool               300" in out
    assert (tmp_path / "ground_truth" / "ground_truth.parquet").is_file()


def test_data_build_shape_captions(tmp_path, capsys):
    from influencespace import storage

    assert main(["data", "build", "shape-captions", "--size", "tiny", "--out", str(tmp_path)]) == 0
    assert "building shape_captions" in capsys.readouterr().out
    assert storage.read_json(str(tmp_path / "classes.json"))["positive_classes"] == [0, 5, 7, 9]


def test_data_build_webdataset_pool(tmp_path):
    from influencespace.datasets import webdataset

    assert main(["data", "build", "fashion-captions", "--size", "tiny", "--format", "webdataset", "--out", str(tmp_path)]) == 0
    samples = list(webdataset.iter_samples(str(tmp_path / "pool")))
    assert len(samples) == 300 and {"id", "image", "text", "group", "label"} <= set(samples[0])


def test_stages_lists_the_pipeline(capsys):
    assert main(["stages"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["data", "implemented"]
