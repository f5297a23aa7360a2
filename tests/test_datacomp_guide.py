"""docs/datacomp.md, run as written: its ```bash blocks in order, with DATA / RUN / OUT in a temp dir.

Slow (about five minutes on 2 CPU cores): a tiny DataComp-style pool is built and embedded, the
pipeline runs up to curate on local Ray, both exports run, and open_clip's trainer takes two steps.
The default embedder is the session's tiny checkpoint, placed where the cached default would be.
"""

import os
import re
import shutil
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest

from influencespace.export import read_kept, repeats

ROOT = Path(__file__).resolve().parents[1]
GUIDE = ROOT / "docs" / "datacomp.md"


def guide_script(directories: dict[str, Path]) -> str:
    blocks = re.findall(r"```bash\n(.*?)```", GUIDE.read_text(), flags=re.DOTALL)
    assert len(blocks) >= 5, "docs/datacomp.md lost its command blocks"
    script = "\n".join(blocks)
    for name, path in directories.items():
        script, found = re.subn(rf"^{name}=\S+", f"{name}={path}", script, flags=re.MULTILINE)
        assert found == 1, f"docs/datacomp.md must set {name}= once"
    return script


def test_guide_blocks_use_only_the_directory_variables():
    script = guide_script({"DATA": Path("/d"), "RUN": Path("/r"), "OUT": Path("/o")})
    assert "/tmp/" not in script
    for command in ("data build fashion-captions", "--format uids", "--format webdataset --pairs", "open_clip_train.main"):
        assert command in script


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_the_datacomp_guide_runs_as_written(tmp_path, offline_checkpoint):
    from influencespace.embed.offline_default import DEFAULT_FILE

    directories = {"DATA": tmp_path / "data", "RUN": tmp_path / "run", "OUT": tmp_path / "out"}
    cache = tmp_path / "cache"
    cache.mkdir()
    shutil.copy(offline_checkpoint, cache / DEFAULT_FILE)
    env = {**os.environ, "INFLUENCESPACE_CACHE": str(cache), "RAY_USAGE_STATS_ENABLED": "0"}
    assert (ROOT / ".venv" / "bin" / "influencespace").exists(), (
        f"docs/datacomp.md runs .venv/bin/influencespace from {ROOT}; create the checkout's venv first (make setup)"
    )
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", guide_script(directories)], cwd=ROOT, env=env,
        capture_output=True, text=True, timeout=1700,
    )
    log = (result.stdout + result.stderr)[-6000:]
    assert result.returncode == 0, log

    data, run, out = (directories[k] for k in ("DATA", "RUN", "OUT"))
    for split in ("pool", "validation", "test"):
        assert {p.suffix for p in (data / split).iterdir()} == {".tar", ".parquet", ".npz"}
    with np.load(data / "pool" / "00000000.npz") as npz:
        assert npz["b32_img"].dtype == npz["b32_txt"].dtype == np.float16

    kept = read_kept(str(run)).to_pydict()
    kept_ids = sorted(kept["id"])
    assert kept_ids and all(re.fullmatch(r"[0-9a-f]{32}", i) for i in kept_ids)

    uids = np.load(out / "submission" / "uids.npy", allow_pickle=False)
    assert uids.dtype == np.dtype("u8,u8")
    as_hex = [f"{int(a):016x}{int(b):016x}" for a, b in uids.tolist()]
    assert as_hex == sorted(as_hex) == kept_ids

    keys = []
    for shard in sorted((out / "shards").glob("*.tar")):
        with tarfile.open(shard) as tar:
            keys += [m.name.rsplit(".", 1)[0] for m in tar.getmembers() if m.name.endswith(".txt")]
    assert {k.split("_r")[0] for k in keys} == set(kept_ids)  # only kept samples, every one of them
    weights = dict(zip(kept["id"], kept["weight"], strict=True))
    assert len(keys) == int(repeats(np.array([weights[i] for i in kept_ids])).sum())

    trained = out / "open_clip" / "tiny"
    assert (trained / "checkpoints" / "epoch_1.pt").stat().st_size > 0
    assert "Train Epoch: 0" in (trained / "out.log").read_text()
