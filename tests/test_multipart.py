"""Resumable multipart uploads against a real S3 server (SeaweedFS): a process killed mid-upload
resumes with the missing parts only; a part or a source that changed is detected; the server
checks every part's SHA256."""

import base64
import json
import hashlib
import os
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ecdit_dist.data.multipart import MIN_PART, journal_path
from ecdit_dist.data.storage import DataError, S3Storage

ROOT = Path(__file__).resolve().parents[1]
PARTS = 5
SIZE = (PARTS - 1) * MIN_PART + 12_345          # four full parts and a short last one


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    import boto3

    from s3server import seaweed_server

    with seaweed_server(tmp_path_factory.mktemp("seaweed")) as server:
        boto3.client("s3").create_bucket(Bucket="uploads")
        yield server


def source(path: Path, seed: int) -> bytes:
    data = random.Random(seed).randbytes(SIZE)
    path.write_bytes(data)
    return data


def storage() -> S3Storage:
    return S3Storage(retries=2, backoff_s=0.01, part_size=MIN_PART, multipart_threshold=MIN_PART, workers=2)


def counting(st: S3Storage, fail_after: int | None = None, corrupt: int | None = None) -> list[int]:
    """Record the part numbers `st` sends; raise after `fail_after` parts; send part `corrupt` with
    other bytes than its checksum says."""
    real, sent = st.client.upload_part, []

    def upload_part(**kw):
        if fail_after is not None and len(sent) >= fail_after:
            raise RuntimeError("injected failure")
        if kw["PartNumber"] == corrupt:
            body = bytearray(kw["Body"])
            body[7] ^= 0xFF
            kw = {**kw, "Body": bytes(body)}
        out = real(**kw)
        sent.append(kw["PartNumber"])
        return out

    st.client.upload_part = upload_part
    return sent


def uploads_in_progress(st: S3Storage, key: str) -> list[str]:
    page = st.client.list_multipart_uploads(Bucket="uploads", Prefix=key)
    return [u["UploadId"] for u in page.get("Uploads", []) if u["Key"] == key]


def expected_composite(data: bytes) -> str:
    parts = [data[i:i + MIN_PART] for i in range(0, len(data), MIN_PART)]
    joined = b"".join(hashlib.sha256(p).digest() for p in parts)
    return base64.b64encode(hashlib.sha256(joined).digest()).decode() + f"-{len(parts)}"


def test_killed_upload_resumes_with_the_missing_parts_only(s3, tmp_path):
    src = tmp_path / "big.bin"
    data = source(src, 0)
    dest = "s3://uploads/ckpt/big.bin"
    killed = textwrap.dedent(f"""
        import os, signal
        from ecdit_dist.data.storage import S3Storage
        st = S3Storage(part_size={MIN_PART}, multipart_threshold={MIN_PART}, workers=1)
        real, sent = st.client.upload_part, []
        def upload_part(**kw):
            out = real(**kw)
            sent.append(kw["PartNumber"])
            if len(sent) == 3:                  # the server has part 3; the journal does not yet
                os.kill(os.getpid(), signal.SIGKILL)
            return out
        st.client.upload_part = upload_part
        st.put_file({str(src)!r}, {dest!r})
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", killed], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == -signal.SIGKILL, out.stderr[-2000:]
    journal = journal_path(src, dest)
    assert journal.is_file()
    st = storage()
    assert len(uploads_in_progress(st, "ckpt/big.bin")) == 1
    sent = counting(st)
    st.put_file(src, dest)
    assert sorted(sent) == [4, 5]                                   # parts 1-3 were kept
    assert st.get(dest) == data                                     # byte for byte
    head = st.client.head_object(Bucket="uploads", Key="ckpt/big.bin", ChecksumMode="ENABLED")
    assert head["ChecksumSHA256"] == expected_composite(data)
    assert head["Metadata"]["sha256"] == hashlib.sha256(data).hexdigest()
    assert not journal.exists() and uploads_in_progress(st, "ckpt/big.bin") == []


def test_a_foreign_part_a_changed_source_and_a_corrupted_part_are_detected(s3, tmp_path):
    src = tmp_path / "big.bin"
    data = source(src, 1)
    dest, key = "s3://uploads/ckpt/other.bin", "ckpt/other.bin"
    st = storage()
    st.workers = 1
    counting(st, fail_after=1)
    with pytest.raises(DataError, match="injected failure"):
        st.put_file(src, dest)
    journal = journal_path(src, dest)
    (upload_id,) = uploads_in_progress(st, key)

    # a part 2 on the server that this file never sent (same size, other bytes): not taken for ours
    import boto3

    foreign = random.Random(9).randbytes(MIN_PART)
    boto3.client("s3").upload_part(Bucket="uploads", Key=key, UploadId=upload_id, PartNumber=2, Body=foreign,
                                   ChecksumSHA256=base64.b64encode(hashlib.sha256(foreign).digest()).decode())
    st = storage()
    sent = counting(st)
    st.put_file(src, dest)
    assert sorted(sent) == [2, 3, 4, 5] and st.get(dest) == data
    assert not journal.exists()

    # the source changes between the interrupted upload and the next one, keeping size and mtime
    st = storage()
    st.workers = 1
    counting(st, fail_after=2)
    with pytest.raises(DataError, match="injected failure"):
        st.put_file(src, dest)
    (stale,) = uploads_in_progress(st, key)
    stat = src.stat()
    changed = bytearray(data)
    changed[10] ^= 0xFF                                             # in part 1, which the server already has
    src.write_bytes(bytes(changed))
    os.utime(src, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    st = storage()
    sent = counting(st)
    st.put_file(src, dest)
    assert sorted(sent) == [1, 2, 3, 4, 5] and st.get(dest) == bytes(changed)
    assert stale not in uploads_in_progress(st, key) and not journal.exists()   # the stale upload was aborted

    # a part damaged on the way: the server checks its SHA256 and refuses it
    src.write_bytes(data)
    st = storage()
    counting(st, corrupt=3)
    with pytest.raises(DataError, match="BadDigest"):
        st.put_file(src, dest)
    assert st.get(dest) == bytes(changed)                           # the object was not replaced
    st = storage()
    sent = counting(st)
    st.put_file(src, dest)
    assert 3 in sent and st.get(dest) == data and not journal.exists()


def test_small_files_go_in_one_checked_request(s3, tmp_path):
    small = tmp_path / "meta.json"
    small.write_bytes(b'{"step": 1}')
    st = storage()
    st.put_file(small, "s3://uploads/ckpt/meta.json")
    head = st.client.head_object(Bucket="uploads", Key="ckpt/meta.json", ChecksumMode="ENABLED")
    assert head["ChecksumSHA256"] == base64.b64encode(hashlib.sha256(b'{"step": 1}').digest()).decode()
    with pytest.raises(DataError, match="changed after it was hashed"):
        st.put_file(small, "s3://uploads/ckpt/meta2.json", sha256="0" * 64)
    with pytest.raises(DataError, match="at least 5242880 bytes"):
        S3Storage(part_size=1 << 20)


# ----------------------------------------------------------------------------- the checkpoint mirror
def small_parts(manager, sent: list[int] | None = None, kill_after: int | None = None) -> None:
    """Mirror uploads of `manager` in 5 MiB parts, one at a time; record the parts sent; SIGKILL this
    process once `kill_after` parts have reached the server."""
    def s3():
        st = S3Storage(retries=2, backoff_s=0.01, page_size=manager.s3_page_size, part_size=MIN_PART,
                       multipart_threshold=MIN_PART, workers=1)
        real = st.client.upload_part

        def upload_part(**kw):
            out = real(**kw)
            if sent is not None:
                sent.append(kw["PartNumber"])
            if kill_after is not None and sent is not None and len(sent) == kill_after:
                os.kill(os.getpid(), signal.SIGKILL)
            return out

        st.client.upload_part = upload_part
        return st

    manager._s3 = s3


def test_a_mirror_upload_killed_mid_file_is_finished_by_the_next_process(s3, tmp_path):
    import torch

    from ecdit_dist.checkpoint.manager import MIRROR_PENDING, CheckpointManager, read_meta
    from ecdit_dist.checkpoint.tensors import DCPSource

    run, prefix = tmp_path / "run", "s3://uploads/mirrored"
    killed = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_multipart import small_parts
        from ecdit_dist.checkpoint.manager import CheckpointManager
        m = CheckpointManager({str(run)!r}, mirror={prefix!r})
        small_parts(m, [], kill_after=2)
        w = torch.arange(5 * {MIN_PART} // 16, dtype=torch.float64)     # one 12.5 MiB file: 3 parts
        m.save(1, {{"model": {{"w": w}}, "trainer": {{"step": torch.tensor(1)}}}},
               {{"config": {{}}, "contents": ["model", "trainer"]}})
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", killed], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == -signal.SIGKILL, out.stderr[-2000:]
    folder = run / "checkpoints" / "step-00000001"
    assert json.loads((run / "checkpoints" / MIRROR_PENDING).read_text()) == [folder.name]
    st = storage()
    assert st.list(prefix + "/checkpoints/step-00000001/", "manifest.json") == []      # not published

    manager = CheckpointManager(run, mirror=prefix)                  # the next process of the same run
    manager.run_id = read_meta(folder)["run_id"]
    sent: list[int] = []
    small_parts(manager, sent)
    manager.check_mirror_owner()                                     # called on every resume
    assert sent == [3]                                               # only the part the server lacked
    assert not (run / "checkpoints" / MIRROR_PENDING).exists()
    fetched = CheckpointManager(tmp_path / "elsewhere", mirror=prefix).fetch_from_mirror()
    assert fetched is not None and fetched.name == folder.name
    assert sorted(p.name for p in fetched.iterdir()) == sorted(p.name for p in folder.iterdir())
    for p in folder.iterdir():                                       # the same files (the manifest re-serialised)
        same = json.loads((fetched / p.name).read_text()) == json.loads(p.read_text()) if p.name == "manifest.json" \
            else (fetched / p.name).read_bytes() == p.read_bytes()
        assert same, p.name
    assert not list(folder.glob(".*.upload-*.json"))                  # no journal left behind
    assert torch.equal(DCPSource(fetched).load("w"), torch.arange(5 * MIN_PART // 16, dtype=torch.float64))


def test_a_tampered_manifest_on_the_mirror_is_refused_with_a_key(s3, tmp_path, monkeypatch):
    import torch

    from ecdit_dist.checkpoint.manager import CheckpointManager
    from ecdit_dist.checkpoint.signing import KEY_ENV, SignatureError

    monkeypatch.setenv(KEY_ENV, "mirror-signing-key-0b7e")
    prefix = "s3://uploads/signed"
    manager = CheckpointManager(tmp_path / "run", mirror=prefix)
    manager.save(1, {"model": {"w": torch.randn(3)}, "trainer": {"step": torch.tensor(1)}},
                 {"config": {}, "contents": ["model", "trainer"]})
    st = storage()
    url = prefix + "/checkpoints/step-00000001/manifest.json"
    manifest = json.loads(st.get(url))
    assert "signature" in manifest
    manifest["files"]["meta.json"]["size"] += 1
    st.put_bytes(url, json.dumps(manifest).encode())
    with pytest.raises(SignatureError, match="changed after it was signed"):
        CheckpointManager(tmp_path / "elsewhere", mirror=prefix).fetch_from_mirror()
    assert not (tmp_path / "elsewhere" / "checkpoints" / "step-00000001").exists()
