"""Resumable multipart uploads of large files to S3, every byte checked by the server.

Each part is sent with its SHA256 (`ChecksumSHA256`), which the server recomputes from the bytes
it received and refuses on a mismatch (BadDigest). The upload is created with
`ChecksumAlgorithm=SHA256`, so CompleteMultipartUpload lists every part's SHA256 again, the
server checks them against the parts it stored, and it returns the composite checksum
(SHA256 of the part digests, "-N"), which is compared with the one computed here.

A journal next to the source (`.<name>.upload-<hash of dest>.json`, written atomically) records
the upload id and the parts done. A process killed mid-upload resumes on the next call:
ListParts says which parts the server holds; a part is kept when its ETag is the one recorded
when it was sent, or the MD5 of the local bytes (a part that arrived just before the kill,
before the journal was written). ListParts returns no SHA256 on every server (SeaweedFS does
not), hence the ETag (the part's MD5 on S3 and SeaweedFS). Kept parts are re-read and re-hashed
locally: a source that changed since (even with the same size and mtime) is detected, its
upload aborted and started again. Uploads of the same key that nobody can resume any more (no
journal) are aborted before a new one starts; the journal goes when the object is complete.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import threading
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ecdit_dist.data.storage import S3Storage

MIN_PART = 5 * 2**20          # S3's smallest part (all but the last)
MAX_PARTS = 10_000            # S3's most parts per upload


@dataclass(frozen=True)
class PartDigest:
    sha256: bytes
    md5: bytes

    @property
    def sha256_b64(self) -> str:
        return base64.b64encode(self.sha256).decode()


def journal_path(local: Path, dest: str) -> Path:
    tag = hashlib.sha256(dest.encode()).hexdigest()[:12]
    return local.with_name(f".{local.name}.upload-{tag}.json")


def _write_journal(path: Path, journal: dict[str, Any]) -> bool:
    """Atomic write (tmp + rename); False when the folder is not writable (then no resume)."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    try:
        tmp.write_text(json.dumps(journal, sort_keys=True))
        os.replace(tmp, path)
        return True
    except OSError:
        tmp.unlink(missing_ok=True)
        return False


def _read_journal(path: Path) -> dict[str, Any] | None:
    try:
        journal = json.loads(path.read_text())
        assert isinstance(journal.get("upload_id"), str) and isinstance(journal.get("parts"), dict)
        return journal
    except (OSError, ValueError, AssertionError, AttributeError):
        return None


def composite_sha256(digests: list[PartDigest]) -> str:
    """The checksum S3 gives a multipart object uploaded with SHA256 part checksums."""
    return base64.b64encode(hashlib.sha256(b"".join(d.sha256 for d in digests)).digest()).decode() + \
        f"-{len(digests)}"


def composite_etag(digests: list[PartDigest]) -> str:
    """The ETag S3 (and SeaweedFS) gives a multipart object whose part ETags are MD5s."""
    return hashlib.md5(b"".join(d.md5 for d in digests)).hexdigest() + f"-{len(digests)}"


class MultipartUpload:
    """One file to one object; `run()` uploads (or resumes) it and returns the parts sent this time."""

    def __init__(self, storage: "S3Storage", local: str | Path, dest: str, sha256: str | None,
                 part_size: int, workers: int) -> None:
        from ecdit_dist.data.storage import split_s3

        self.s3 = storage
        self.local = Path(local)
        self.dest = dest
        self.bucket, self.key = split_s3(dest)
        self.sha256 = sha256
        st = self.local.stat()
        self.size, self.mtime_ns = st.st_size, st.st_mtime_ns
        # grow the part size for huge files so that they fit in S3's 10,000 parts
        self.part_size = max(int(part_size), MIN_PART, -(-self.size // MAX_PARTS))
        self.nparts = max(1, -(-self.size // self.part_size))
        self.workers = max(1, int(workers))
        self.journal_file = journal_path(self.local, dest)
        self.journal: dict[str, Any] = {}
        self.digests: dict[int, PartDigest] = {}
        self.lock = threading.Lock()
        self.sent: list[int] = []

    # ------------------------------------------------------------------ parts
    def _bounds(self, n: int) -> tuple[int, int]:
        start = (n - 1) * self.part_size
        return start, min(self.size, start + self.part_size)

    def _read(self, n: int) -> bytes:
        start, end = self._bounds(n)
        with open(self.local, "rb") as f:
            f.seek(start)
            data = f.read(end - start)
        if len(data) != end - start:
            raise self._error(f"the file shrank while uploading (part {n})")
        return data

    def _digest(self, data: bytes) -> PartDigest:
        return PartDigest(hashlib.sha256(data).digest(), hashlib.md5(data).digest())

    def _error(self, what: str):
        from ecdit_dist.data.storage import DataError

        return DataError(f"{self.dest}: {what} (uploading {self.local})")

    def _send(self, n: int) -> None:
        data = self._read(n)
        digest = self._digest(data)
        response = self.s3._call(self.dest, self.s3.client.upload_part, Bucket=self.bucket, Key=self.key,
                                 UploadId=self.journal["upload_id"], PartNumber=n, Body=data,
                                 ChecksumSHA256=digest.sha256_b64)
        returned = response.get("ChecksumSHA256")
        if returned is not None and returned != digest.sha256_b64:
            raise self._error(f"the server stored part {n} with SHA256 {returned}, not {digest.sha256_b64}")
        with self.lock:
            self.digests[n] = digest
            self.journal["parts"][str(n)] = {"etag": response["ETag"], "sha256": digest.sha256_b64}
            self.sent.append(n)
            _write_journal(self.journal_file, self.journal)

    # ------------------------------------------------------------------ server-side state
    def _listed_parts(self) -> dict[int, list[dict[str, Any]]] | None:
        """The parts the server holds for the journal's upload, or None when the upload is gone. A
        part number may be listed more than once (SeaweedFS keeps every upload of a part until
        the upload completes, and completes with the one whose ETag is named)."""
        from ecdit_dist.data.storage import DataError

        parts: dict[int, list[dict[str, Any]]] = {}
        marker = 0
        while True:
            try:
                page = self.s3._call(self.dest, self.s3.client.list_parts, Bucket=self.bucket, Key=self.key,
                                     UploadId=self.journal["upload_id"], PartNumberMarker=marker)
            except DataError as e:
                if getattr(e, "code", None) in ("NoSuchUpload", "404", "NotFound"):
                    return None
                raise
            for p in page.get("Parts", []):
                parts.setdefault(int(p["PartNumber"]), []).append(p)
            if not page.get("IsTruncated"):
                return parts
            marker = int(page["NextPartNumberMarker"])

    def _abort(self, upload_id: str) -> None:
        from ecdit_dist.data.storage import DataError

        try:
            self.s3._call(self.dest, self.s3.client.abort_multipart_upload, Bucket=self.bucket, Key=self.key,
                          UploadId=upload_id)
        except DataError as e:
            if getattr(e, "code", None) not in ("NoSuchUpload", "404", "NotFound"):
                raise

    def _abort_orphans(self) -> None:
        """Abort unfinished uploads of this key that no journal can resume (their source went)."""
        page = self.s3._call(self.dest, self.s3.client.list_multipart_uploads, Bucket=self.bucket, Prefix=self.key)
        for upload in page.get("Uploads", []):
            if upload.get("Key") == self.key:
                self._abort(upload["UploadId"])

    def _source(self) -> dict[str, Any]:
        return {"dest": self.dest, "size": self.size, "mtime_ns": self.mtime_ns, "part_size": self.part_size}

    def _resume(self) -> bool:
        """Adopt the journal's upload when it is for this very source; keep the parts the server holds
        that match the local bytes. False: nothing to resume (an abandoned upload is aborted)."""
        journal = _read_journal(self.journal_file)
        if journal is None:
            return False
        same = all(journal.get(k) == v for k, v in self._source().items())
        if same:
            self.journal = journal
            listed = self._listed_parts()
            if listed is None:              # aborted or completed meanwhile: start again
                return False
            kept: dict[int, PartDigest] = {}
            for n, entries in sorted(listed.items()):
                if n > self.nparts:
                    continue
                start, end = self._bounds(n)
                digest = self._digest(self._read(n))
                record = journal["parts"].get(str(n))
                if record is not None and record.get("sha256") != digest.sha256_b64:
                    same = False            # the file changed under the same size and mtime
                    break
                for p in entries:
                    etag = str(p.get("ETag", ""))
                    if int(p.get("Size", -1)) == end - start and (
                            (record is not None and etag == record.get("etag")) or etag.strip('"') == digest.md5.hex()):
                        kept[n] = digest
                        journal["parts"][str(n)] = {"etag": etag, "sha256": digest.sha256_b64}
                        break
            if same:
                journal["parts"] = {k: v for k, v in journal["parts"].items() if int(k) in kept}
                self.digests = kept
                return True
        self._abort(journal["upload_id"])   # the source changed: that upload can never complete
        self.journal_file.unlink(missing_ok=True)
        self.digests = {}
        return False

    def _start(self) -> None:
        self._abort_orphans()
        extra: dict[str, Any] = {"ChecksumAlgorithm": "SHA256"}
        if self.sha256:
            extra["Metadata"] = {"sha256": self.sha256}
        created = self.s3._call(self.dest, self.s3.client.create_multipart_upload, Bucket=self.bucket,
                                Key=self.key, **extra)
        self.journal = {**self._source(), "version": 1, "upload_id": created["UploadId"], "parts": {}}
        _write_journal(self.journal_file, self.journal)

    # ------------------------------------------------------------------ run
    def run(self) -> list[int]:
        if not self._resume():
            self._start()
        missing = [n for n in range(1, self.nparts + 1) if n not in self.digests]
        with ThreadPoolExecutor(max_workers=min(self.workers, max(1, len(missing)))) as pool:
            futures = [pool.submit(self._send, n) for n in missing]
            done, pending = wait(futures, return_when=FIRST_EXCEPTION)
            for f in pending:
                f.cancel()
            for f in futures:
                if f.done() and not f.cancelled() and f.exception() is not None:
                    raise f.exception()     # the journal keeps the parts that made it
        self._complete()
        return sorted(self.sent)

    def _complete(self) -> None:
        from ecdit_dist.data.storage import DataError

        digests = [self.digests[n] for n in range(1, self.nparts + 1)]
        parts = [{"PartNumber": n, "ETag": self.journal["parts"][str(n)]["etag"],
                  "ChecksumSHA256": self.digests[n].sha256_b64} for n in range(1, self.nparts + 1)]
        try:
            response = self.s3._call(self.dest, self.s3.client.complete_multipart_upload, Bucket=self.bucket,
                                     Key=self.key, UploadId=self.journal["upload_id"],
                                     MultipartUpload={"Parts": parts})
        except DataError as e:
            if getattr(e, "code", None) in ("BadDigest", "InvalidPart", "InvalidPartOrder", "NoSuchUpload"):
                self._abort(self.journal["upload_id"])        # a part the server holds is not ours: start over
                self.journal_file.unlink(missing_ok=True)
            raise
        checksum, etag = response.get("ChecksumSHA256"), str(response.get("ETag", "")).strip('"')
        listed_md5 = all(self.journal["parts"][str(n)]["etag"].strip('"') == self.digests[n].md5.hex()
                         for n in range(1, self.nparts + 1))
        wrong = None
        if checksum is not None and checksum != composite_sha256(digests):
            wrong = f"composite SHA256 {checksum}, expected {composite_sha256(digests)}"
        elif checksum is None and listed_md5 and etag != composite_etag(digests):
            wrong = f"composite ETag {etag}, expected {composite_etag(digests)}"
        if wrong is None:
            size = self.s3.size(self.dest)
            if size != self.size:
                wrong = f"{size} bytes, expected {self.size}"
        if wrong is not None:
            self.s3.delete(self.dest)
            self.journal_file.unlink(missing_ok=True)
            raise self._error(f"the completed object has {wrong}; deleted it")
        self.journal_file.unlink(missing_ok=True)


def upload(storage: "S3Storage", local: str | Path, dest: str, sha256: str | None = None,
           part_size: int = 64 * 2**20, workers: int = 4) -> list[int]:
    """Upload `local` to `dest` in parts (resuming an interrupted upload of the same file); returns
    the part numbers sent by this call."""
    return MultipartUpload(storage, local, dest, sha256, part_size, workers).run()
