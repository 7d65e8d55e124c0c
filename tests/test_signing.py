"""Signed manifests: with ECDIT_CHECKPOINT_KEY set, a checkpoint is read only when its manifest
carries a valid HMAC-SHA256 under that key; without the key nothing changes."""

import hashlib
import json
import pickle
from pathlib import Path

import pytest
import torch

from ecdit_dist import cli
from ecdit_dist.checkpoint import safe_load, signing
from ecdit_dist.checkpoint.manager import CheckpointManager, read_manifest, step_dir_name, verify_checkpoint
from ecdit_dist.checkpoint.signing import KEY_ENV, SignatureError
from ecdit_dist.checkpoint.tensors import DCPSource

KEY = "test-signing-key-4f1c9a"
OTHER = "another-signing-key-77d2e0"


def save(run: Path, step: int = 1) -> tuple[Path, torch.Tensor]:
    w = torch.randn(4, 3, dtype=torch.float64)
    CheckpointManager(run).save(step, {"model": {"w": w}, "trainer": {"step": torch.tensor(step)}},
                                {"config": {}, "contents": ["model", "trainer"]})
    return run / "checkpoints" / step_dir_name(step), w


def reads(folder: Path) -> torch.Tensor:
    """Every way a checkpoint is read: manifest, full verification, resume, tensor source (as convert
    inspect/export use it, with and without the sha256 check)."""
    read_manifest(folder)
    verify_checkpoint(folder)
    assert CheckpointManager(folder.parents[1]).latest_valid() == folder
    assert torch.equal(DCPSource(folder, verify=False).load("w"), DCPSource(folder).load("w"))
    return DCPSource(folder).load("w")


def refused_everywhere(folder: Path, match: str) -> None:
    for attempt in (lambda: read_manifest(folder), lambda: verify_checkpoint(folder, full=False),
                    lambda: CheckpointManager(folder.parents[1]).latest_valid(),
                    lambda: DCPSource(folder, verify=False),
                    lambda: safe_load.load({"model": {"w": torch.empty(4, 3, dtype=torch.float64)}}, folder)):
        with pytest.raises(SignatureError, match=match):
            attempt()


def test_signed_checkpoint_loads_and_a_tampered_one_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(KEY_ENV, KEY)
    folder, w = save(tmp_path / "run")
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["signature"]["alg"] == "hmac-sha256" and KEY not in (folder / "manifest.json").read_text()
    assert torch.equal(reads(folder), w)

    # a file replaced and the manifest re-written to match it, the signature kept
    meta = json.loads((folder / "meta.json").read_text())
    data = json.dumps({**meta, "step": 99}).encode()
    (folder / "meta.json").write_bytes(data)
    manifest["files"]["meta.json"] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    refused_everywhere(folder, "changed after it was signed")
    assert cli.main(["convert", "inspect", str(folder), "--no-verify"]) == 2
    err = capsys.readouterr().err
    assert "manifest signature does not match" in err and str(folder) in err and "Traceback" not in err


def test_metadata_swapped_under_a_signed_manifest_is_refused_without_verification(tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    folder, _ = save(tmp_path / "run")
    (folder / ".metadata").write_bytes(pickle.dumps({"not": "metadata"}))
    with pytest.raises(SignatureError, match="not the file the signed manifest names"):
        DCPSource(folder, verify=False)


def test_wrong_key_and_unsigned_checkpoints_are_refused_with_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    signed, w = save(tmp_path / "signed")
    monkeypatch.setenv(KEY_ENV, OTHER)
    refused_everywhere(signed, "signed with another key")
    with pytest.raises(SignatureError) as err:
        read_manifest(signed)
    assert KEY not in str(err.value) and OTHER not in str(err.value)     # a key is never shown

    monkeypatch.delenv(KEY_ENV)
    unsigned, w2 = save(tmp_path / "unsigned")
    assert "signature" not in json.loads((unsigned / "manifest.json").read_text())
    assert torch.equal(reads(unsigned), w2) and torch.equal(reads(signed), w)   # no key: unchanged behaviour

    monkeypatch.setenv(KEY_ENV, KEY)
    refused_everywhere(unsigned, "not signed, and ECDIT_CHECKPOINT_KEY is set")
    with pytest.raises(SignatureError) as err:
        read_manifest(unsigned)
    assert str(unsigned) in str(err.value) and "python -m ecdit_dist.checkpoint.signing sign" in str(err.value)
    assert signing.main(["sign", str(unsigned)]) == 0                  # the fix the error names
    assert torch.equal(reads(unsigned), w2)
