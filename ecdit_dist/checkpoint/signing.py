"""Signed checkpoint manifests: HMAC-SHA256 with a key the user provides.

With `ECDIT_CHECKPOINT_KEY` set in the environment, every manifest written at commit carries
`"signature": {"alg": "hmac-sha256", "key_id": ..., "value": ...}` over the manifest's canonical
bytes (its JSON without the signature, keys sorted, no spaces), and every read of a checkpoint
refuses a manifest that is unsigned or whose signature does not match, before any file of the
checkpoint is used. Since the manifest holds every file's size and sha256, a signed manifest
vouches for every file checked against it. `key_id` names the key (an HMAC of a fixed label,
not the key); the key itself is never written or logged. Without the variable nothing changes.

Sign a checkpoint you trust that was written without a key (e.g. before signing was turned on):
    ECDIT_CHECKPOINT_KEY=... python -m ecdit_dist.checkpoint.signing sign <step folder>...
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import sys
from pathlib import Path
from typing import Any

from ecdit_dist.checkpoint.errors import CheckpointError

KEY_ENV = "ECDIT_CHECKPOINT_KEY"
ALG = "hmac-sha256"


class SignatureError(CheckpointError):
    """A manifest is unsigned, or signed with another key, or changed after it was signed."""


def key() -> bytes | None:
    value = os.environ.get(KEY_ENV, "")
    return value.encode() if value else None


def key_id(k: bytes) -> str:
    return hmac.new(k, b"ecdit-checkpoint-key-id", hashlib.sha256).hexdigest()[:16]


def canonical(manifest: dict[str, Any]) -> bytes:
    body = {k: v for k, v in manifest.items() if k != "signature"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def sign(manifest: dict[str, Any], k: bytes | None = None) -> dict[str, Any]:
    """`manifest` with a signature when a key is set (given, else from the environment), else unchanged."""
    k = k if k is not None else key()
    if k is None:
        return manifest
    value = hmac.new(k, canonical(manifest), hashlib.sha256).hexdigest()
    return {**manifest, "signature": {"alg": ALG, "key_id": key_id(k), "value": value}}


def check(manifest: dict[str, Any], where: str, k: bytes | None = None) -> None:
    """Refuse an unsigned or wrongly signed manifest when a key is set; `where` names the checkpoint."""
    k = k if k is not None else key()
    if k is None:
        return
    sig = manifest.get("signature")
    if not isinstance(sig, dict) or not isinstance(sig.get("value"), str):
        raise SignatureError(
            f"{where}: the manifest is not signed, and {KEY_ENV} is set, so only signed checkpoints are read. "
            f"If you trust this checkpoint, sign it with `python -m ecdit_dist.checkpoint.signing sign {where}`; "
            f"or unset {KEY_ENV} to read unsigned checkpoints")
    if sig.get("alg") != ALG:
        raise SignatureError(f"{where}: the manifest is signed with {sig.get('alg')!r}; only {ALG} is accepted")
    expected = hmac.new(k, canonical(manifest), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected, sig["value"]):
        other = sig.get("key_id") not in (None, key_id(k))
        why = (f"it was signed with another key (key id {sig.get('key_id')}, the key in {KEY_ENV} has id "
               f"{key_id(k)}); set the key it was signed with") if other else \
            "the manifest was changed after it was signed (tampered with); do not use this checkpoint"
        raise SignatureError(f"{where}: manifest signature does not match: {why}")


def sign_folder(folder: str | Path) -> None:
    """Add (or replace) the signature of a checkpoint folder's manifest, with the key from the environment,
    after checking every file against the manifest."""
    from ecdit_dist.checkpoint.manager import MANIFEST, atomic_write_text, verify_checkpoint

    k = key()
    if k is None:
        raise SignatureError(f"set {KEY_ENV} to the signing key first")
    folder = Path(folder)
    with_key = os.environ.pop(KEY_ENV)
    try:
        manifest = verify_checkpoint(folder, full=True)       # every file as the manifest says
    finally:
        os.environ[KEY_ENV] = with_key
    atomic_write_text(folder / MANIFEST, json.dumps(sign(manifest, k), indent=1, sort_keys=True))


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) < 2 or args[0] != "sign":
        print("usage: python -m ecdit_dist.checkpoint.signing sign <checkpoint step folder>...", file=sys.stderr)
        return 2
    try:
        for folder in args[1:]:
            sign_folder(folder)
            print(f"signed {folder}")
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
