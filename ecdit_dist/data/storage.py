"""Where shards and checkpoints live: a local folder or `s3://bucket/prefix`.

S3 goes through boto3 with its standard credential chain (environment, config files,
instance roles) and endpoint (`AWS_ENDPOINT_URL` / `AWS_ENDPOINT_URL_S3` for S3-compatible
stores); requests are retried with backoff. Objects are read with ranged GETs only, through
a seekable file object that pyarrow reads Parquet footers and row groups from. Errors name
the object and the cause and never contain credentials.
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable


class DataError(RuntimeError):
    """A data or storage problem, naming the object and the cause (`code`: the S3 error code, if any)."""

    code: str | None = None


@dataclass(frozen=True)
class ObjectInfo:
    path: str       # full path: local path or s3://bucket/key
    size: int


def is_s3(path: str) -> bool:
    return str(path).startswith("s3://")


def split_s3(url: str) -> tuple[str, str]:
    rest = url[len("s3://"):]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise DataError(f"{url!r} has no bucket; expected s3://bucket/prefix")
    return bucket, key


def folder_prefix(root: str) -> str:
    """The listing prefix of a dataset folder: on S3 with a trailing "/", so that s3://b/data does
    not also list s3://b/data-old/ or s3://b/data2/."""
    return root.rstrip("/") + "/" if is_s3(root) else root


def join(base: str, name: str) -> str:
    return f"{base.rstrip('/')}/{name}" if is_s3(base) else str(Path(base) / name)


class LocalStorage:
    def get(self, path: str) -> bytes | None:
        """The whole object, or None when it does not exist."""
        try:
            return Path(path).read_bytes()
        except FileNotFoundError:
            return None

    def put_bytes(self, dest: str, data: bytes) -> None:
        """Write under a temporary name, then rename: a reader sees the old object or the new one."""
        target = Path(dest)
        tmp = target.with_name(f".{target.name}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, target)

    def list(self, prefix: str, suffix: str = "") -> list[ObjectInfo]:
        root = Path(prefix)
        if not root.exists():
            raise DataError(f"{root}: no such folder")
        files = [root] if root.is_file() else sorted(p for p in root.rglob(f"*{suffix}") if p.is_file())
        return [ObjectInfo(str(p), p.stat().st_size) for p in files if not p.name.startswith(".")]

    def open(self, path: str, size: int | None = None) -> BinaryIO:
        try:
            return open(path, "rb")
        except FileNotFoundError:
            raise DataError(f"{path}: object not found") from None


def _client_error_code(e: Exception) -> str:
    return getattr(e, "response", {}).get("Error", {}).get("Code", type(e).__name__)


DENIED = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken", "403",
          "NoCredentialsError", "PartialCredentialsError", "UnauthorizedOperation", "AllAccessDisabled"}
MISSING = {"NoSuchKey", "404", "NotFound", "NoSuchBucket"}


def explain(url: str, e: Exception) -> DataError:
    """An exception from boto3 -> DataError naming the object and what to do (no secrets)."""
    code = _client_error_code(e)
    if code in DENIED or type(e).__name__ in DENIED:
        err = DataError(f"{url}: access denied ({code}); check the AWS credentials (environment, "
                        f"~/.aws or instance role) and the bucket permissions")
    elif code in MISSING:
        what = "bucket" if code == "NoSuchBucket" else "object"
        err = DataError(f"{url}: {what} not found ({code})")
    else:
        err = DataError(f"{url}: {code}: {redact(str(e))}")
    err.code = code
    return err


def redact(text: str) -> str:
    """Remove credentials embedded in URLs (e.g. an AWS_ENDPOINT_URL of http://key:secret@host)."""
    return re.sub(r"(\w+://)[^@\s\"'<>]+@", r"\1***@", text)


class S3Storage:
    """boto3-backed storage. `retries` attempts with exponential backoff on transient errors.
    `put_file` sends files of `multipart_threshold` bytes or more in parts of `part_size` bytes,
    `workers` at a time, resumably (see multipart.py)."""

    page_size: int | None = None
    """Keys per listing page (MaxKeys); None = the server's default (1000 on AWS)."""

    def __init__(self, retries: int = 5, backoff_s: float = 0.2, read_ahead: int = 256 << 10,
                 page_size: int | None = None, part_size: int = 64 * 2**20,
                 multipart_threshold: int = 64 * 2**20, workers: int = 4) -> None:
        import boto3
        from botocore.config import Config

        from ecdit_dist.data.multipart import MIN_PART

        if part_size < MIN_PART:
            raise DataError(f"part_size={part_size}: S3 parts are at least {MIN_PART} bytes (5 MiB)")
        if workers < 1:
            raise DataError(f"workers={workers}: must be at least 1")
        self.part_size, self.multipart_threshold, self.workers = part_size, max(multipart_threshold, 1), workers
        self.read_ahead = read_ahead
        self.retries = retries
        self.backoff_s = backoff_s
        if page_size is not None:
            self.page_size = page_size
        # one retry loop (ours, below): botocore's own retries would multiply with it
        self.client = boto3.client("s3", config=Config(retries={"total_max_attempts": 1},
                                                       connect_timeout=10, read_timeout=60))

    def _call(self, url: str, fn: Callable, *args, **kwargs):
        for attempt in range(self.retries):
            try:
                return fn(*args, **kwargs)
            except Exception as e:  # boto raises many types; classify by code
                code = _client_error_code(e)
                transient = code in {"SlowDown", "InternalError", "ServiceUnavailable", "RequestTimeout", "500",
                                     "502", "503", "504"} or type(e).__name__ in {
                    "EndpointConnectionError", "ConnectionClosedError", "ReadTimeoutError", "ConnectTimeoutError",
                    "IncompleteReadError", "ResponseStreamingError"}
                if not transient or attempt == self.retries - 1:
                    raise explain(url, e) from None
                time.sleep(self.backoff_s * 2 ** attempt * (1 + random.random()))

    def list(self, prefix: str, suffix: str = "") -> list[ObjectInfo]:
        bucket, key = split_s3(prefix)
        out = []
        token = None
        while True:
            kw = {"Bucket": bucket, "Prefix": key}
            if self.page_size:
                kw["MaxKeys"] = int(self.page_size)
            if token:
                kw["ContinuationToken"] = token
            page = self._call(prefix.rstrip("/"), self.client.list_objects_v2, **kw)    # errors name the folder
            for obj in page.get("Contents", []):
                name = obj["Key"].rsplit("/", 1)[-1]
                if obj["Key"].endswith(suffix) and not name.startswith("."):
                    out.append(ObjectInfo(f"s3://{bucket}/{obj['Key']}", obj["Size"]))
            if not page.get("IsTruncated"):
                break
            token = page["NextContinuationToken"]
        return sorted(out, key=lambda o: o.path)

    def size(self, url: str) -> int:
        bucket, key = split_s3(url)
        return self._call(url, self.client.head_object, Bucket=bucket, Key=key)["ContentLength"]

    def head(self, url: str) -> dict:
        bucket, key = split_s3(url)
        return self._call(url, self.client.head_object, Bucket=bucket, Key=key)

    def get(self, url: str) -> bytes | None:
        """The whole object in one GET, or None when it does not exist."""
        bucket, key = split_s3(url)

        def get():
            try:
                return self.client.get_object(Bucket=bucket, Key=key)["Body"].read()
            except Exception as e:
                if _client_error_code(e) in {"NoSuchKey", "404", "NotFound"}:
                    return None
                raise

        return self._call(url, get)

    def read_range(self, url: str, start: int, end: int) -> bytes:
        """Bytes [start, end) of an object."""
        bucket, key = split_s3(url)

        def get():
            body = self.client.get_object(Bucket=bucket, Key=key, Range=f"bytes={start}-{end - 1}")["Body"]
            data = body.read()
            if len(data) != end - start:
                raise DataError(f"{url}: short read {len(data)} of {end - start} bytes")
            return data

        return self._call(url, get)

    def open(self, url: str, size: int | None = None) -> BinaryIO:
        return S3RangeFile(self, url, size if size is not None else self.size(url), self.read_ahead)

    def read_bytes(self, url: str) -> bytes:
        size = self.size(url)
        return self.read_range(url, 0, size) if size else b""

    def put_file(self, local: str | Path, dest: str, sha256: str | None = None) -> None:
        """Upload with an S3 SHA256 checksum per request that the server verifies against the bytes
        it received (a mismatch is refused with BadDigest), and the file's sha256 (`sha256`, else
        computed) recorded in the object metadata. Files of `multipart_threshold` bytes or more go
        in parts, resumably: a call after an interrupted one sends only the missing parts."""
        from ecdit_dist.data import multipart

        if not Path(local).is_file():
            raise DataError(f"{local}: no such file to upload to {dest}")
        if Path(local).stat().st_size >= self.multipart_threshold:
            multipart.upload(self, local, dest, sha256 or sha256_of(local), self.part_size, self.workers)
            return
        bucket, key = split_s3(dest)
        digest = hashlib.sha256()
        with open(local, "rb") as f:
            while block := f.read(1 << 22):
                digest.update(block)
        if sha256 is not None and sha256 != digest.hexdigest():
            raise DataError(f"{local}: its sha256 is {digest.hexdigest()}, not the expected {sha256} (the file "
                            f"changed after it was hashed); not uploaded to {dest}")

        def put():
            with open(local, "rb") as body:
                return self.client.put_object(Bucket=bucket, Key=key, Body=body,
                                              Metadata={"sha256": sha256 or digest.hexdigest()},
                                              ChecksumSHA256=base64.b64encode(digest.digest()).decode())

        self._call(dest, put)

    def put_bytes(self, dest: str, data: bytes) -> None:
        bucket, key = split_s3(dest)
        digest = hashlib.sha256(data)
        self._call(dest, self.client.put_object, Bucket=bucket, Key=key, Body=data,
                   Metadata={"sha256": digest.hexdigest()},
                   ChecksumSHA256=base64.b64encode(digest.digest()).decode())

    def get_file(self, url: str, local: str | Path) -> None:
        bucket, key = split_s3(url)
        tmp = Path(local).with_name(f".{Path(local).name}.tmp")
        self._call(url, self.client.download_file, bucket, key, str(tmp))
        os.replace(tmp, local)

    def delete(self, url: str) -> None:
        bucket, key = split_s3(url)
        self._call(url, self.client.delete_object, Bucket=bucket, Key=key)


class S3RangeFile(io.RawIOBase):
    """A read-only, seekable view of an S3 object; every read is a ranged GET (at least
    `min_request` bytes, kept as a small read-ahead buffer). A read near the end of the object
    extends backwards instead, so the Parquet trailer and footer come in one request."""

    def __init__(self, storage: S3Storage, url: str, size: int, min_request: int = 256 << 10) -> None:
        super().__init__()
        self.storage, self.url, self.length = storage, url, size
        self.pos = 0
        self.min_request = min_request
        self.buf_start, self.buf = 0, b""
        self.requests = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self.pos, 2: self.length}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def size(self) -> int:
        return self.length

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            n = self.length - self.pos
        n = min(n, self.length - self.pos)
        if n <= 0:
            return b""
        lo, hi = self.pos, self.pos + n
        if not (self.buf_start <= lo and hi <= self.buf_start + len(self.buf)):
            end = min(self.length, max(hi, lo + self.min_request))
            start = max(0, min(lo, end - self.min_request))
            self.buf = self.storage.read_range(self.url, start, end)
            self.buf_start = start
            self.requests += 1
        out = self.buf[lo - self.buf_start: hi - self.buf_start]
        self.pos = hi
        return out

    def readinto(self, b) -> int:
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)


def storage_for(path: str, retries: int = 5) -> LocalStorage | S3Storage:
    return S3Storage(retries=retries) if is_s3(path) else LocalStorage()


def sha256_of(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()
