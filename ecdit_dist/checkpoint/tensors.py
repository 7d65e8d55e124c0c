"""Tensor-by-tensor access to checkpoints, so conversions never hold a whole model.

Sources: a committed training checkpoint (DCP; one tensor is read at a time, from any
layout it was saved on) or consolidated safetensors (one file, a folder of shards with
`model.safetensors.index.json`, or a folder of `*.safetensors`). The writer produces
consolidated safetensors shards by streaming: the header is known from the shapes up front,
then each tensor's bytes are appended, so peak memory is about one tensor.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch

from ecdit_dist.checkpoint import safe_load
from ecdit_dist.checkpoint.manager import verify_checkpoint

INDEX = "model.safetensors.index.json"
DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
FROM_ST = {v: k for k, v in DTYPES.items()}


class ConvertError(ValueError):
    """Input that a conversion cannot consume as it stands."""


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


class DCPSource:
    """The tensors under `prefix` ("model" or "ema") of a committed training checkpoint."""

    def __init__(self, folder: str | Path, prefix: str = "model", verify: bool = True) -> None:
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        self.folder = Path(folder)
        if verify:
            verify_checkpoint(self.folder)
        self.prefix = prefix
        md = safe_load.read_metadata(self.folder).state_dict_metadata
        self.infos: dict[str, TensorInfo] = {}
        for key, m in md.items():
            if key.startswith(prefix + ".") and isinstance(m, TensorStorageMetadata):
                self.infos[key[len(prefix) + 1:]] = TensorInfo(tuple(m.size), m.properties.dtype)
        if not self.infos:
            have = sorted({k.split(".")[0] for k in md})
            raise ConvertError(f"{self.folder} holds no '{prefix}' tensors (it has: {', '.join(have)})")

        self._raw = None

    @property
    def raw(self):
        if self._raw is None:
            from ecdit_dist.checkpoint.dcp_raw import RawDCP

            self._raw = RawDCP(self.folder, self.prefix)
        return self._raw

    def load(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """Read one tensor; into `out` (same shape and dtype) when given, e.g. a reused staging buffer."""
        info = self.infos[name]
        target = out if out is not None else torch.empty(info.shape, dtype=info.dtype)
        return self.raw.read_into(name, target)

    def read_into(self, name: str, out: torch.Tensor) -> torch.Tensor:
        return self.load(name, out)

    def extents(self, name: str):
        """Where the tensor's bytes lie in the `.distcp` files (see dcp_raw.RawDCP.extents)."""
        return self.raw.extents(name)

    def read_range(self, name: str, start: int, length: int) -> bytes:
        return _range_of(self, name, start, length)

    def describe(self) -> str:
        return f"{self.folder} ({self.prefix})"


class SafetensorsSource:
    def __init__(self, path: str | Path) -> None:
        from safetensors import safe_open

        self.path = Path(path)
        files = safetensors_files(self.path)
        self.file_of: dict[str, Path] = {}
        self.infos: dict[str, TensorInfo] = {}
        self._open = safe_open
        for f in files:
            try:
                with safe_open(str(f), framework="pt") as st:
                    for name in st.keys():
                        if name in self.file_of:
                            raise ConvertError(f"tensor {name} appears in both {self.file_of[name].name} and {f.name}")
                        sl = st.get_slice(name)
                        self.file_of[name] = f
                        self.infos[name] = TensorInfo(tuple(sl.get_shape()), FROM_ST[sl.get_dtype()])
            except ConvertError:
                raise
            except Exception as e:  # the safetensors parser rejects truncated or corrupt headers
                raise ConvertError(f"{f} is not a readable safetensors file: {e}") from None
        index = self.path / INDEX if self.path.is_dir() else None
        if index is not None and index.exists():
            weight_map = json.loads(index.read_text()).get("weight_map", {})
            missing = sorted(set(weight_map) - set(self.infos))
            if missing:
                raise ConvertError(f"{index} lists tensors no shard holds: {', '.join(missing[:5])}")

        self._offsets: dict[str, int] = {}

    def load(self, name: str) -> torch.Tensor:
        info = self.infos[name]
        return self.read_into(name, torch.empty(info.shape, dtype=info.dtype))

    def _offset(self, name: str) -> int:
        """Absolute offset of the tensor's bytes in its file (from the safetensors header)."""
        if name not in self._offsets:
            f = self.file_of[name]
            with open(f, "rb") as fh:
                n = struct.unpack("<Q", fh.read(8))[0]
                header = json.loads(fh.read(n))
            for k, v in header.items():
                if k != "__metadata__" and self.file_of.get(k) == f:
                    self._offsets[k] = 8 + n + int(v["data_offsets"][0])
        return self._offsets[name]

    def extents(self, name: str):
        from ecdit_dist.checkpoint.dcp_raw import Extent

        return [Extent(self.file_of[name], self._offset(name), self.infos[name].nbytes, 0)]

    def read_into(self, name: str, out: torch.Tensor) -> torch.Tensor:
        from ecdit_dist.checkpoint.dcp_raw import _pread_into

        info = self.infos[name]
        if tuple(out.shape) != info.shape or out.dtype != info.dtype or not out.is_contiguous():
            raise ValueError(f"{name}: buffer {tuple(out.shape)} {out.dtype} for {info.shape} {info.dtype}")
        if info.nbytes:
            _pread_into(self.file_of[name], out.view(-1).view(torch.uint8), self._offset(name))
        return out

    def read_range(self, name: str, start: int, length: int) -> bytes:
        return _range_of(self, name, start, length)

    def describe(self) -> str:
        return str(self.path)


def _range_of(src, name: str, start: int, length: int) -> bytes:
    """Bytes [start, start + length) of a tensor's row-major bytes, read from its file extents."""
    out = bytearray()
    for e in src.extents(name) or []:
        lo, hi = max(start, e.dest), min(start + length, e.dest + e.length)
        if lo < hi:
            with open(e.path, "rb") as f:
                f.seek(e.offset + lo - e.dest)
                out += f.read(hi - lo)
    if len(out) != length:      # not plain bytes on disk: read the tensor and cut the range out
        info = src.infos[name]
        t = src.read_into(name, torch.empty(info.shape, dtype=info.dtype))
        return bytes(t.view(-1).view(torch.uint8)[start: start + length].numpy())
    return bytes(out)


def safetensors_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise ConvertError(f"{path} does not exist")
    index = path / INDEX
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except Exception:
            raise ConvertError(f"{index} is not a valid index (expected a 'weight_map')") from None
        names = sorted(set(weight_map.values()))
        for n in names:
            if "/" in n or "\\" in n or n.startswith("."):
                raise ConvertError(f"{index} names a shard outside the folder: {n!r}")
        files = [path / n for n in names]
        for f in files:
            if not f.exists():
                raise ConvertError(f"{index} lists {f.name}, which is missing")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ConvertError(f"{path} holds no *.safetensors files")
    return files


def open_source(path: str | Path, ema: bool = False, verify: bool = True):
    """A training checkpoint (run folder or step folder) or consolidated safetensors. `verify`:
    check every file's sha256 against the manifest (else sizes only, for a run folder's choice)."""
    path = Path(path)
    if path.is_dir() and ((path / ".metadata").exists() or (path / "checkpoints").is_dir()):
        from ecdit_dist.inference import resolve_checkpoint

        return DCPSource(resolve_checkpoint(path, verify), "ema" if ema else "model", verify=False)
    if ema:
        raise ConvertError(f"{path} is consolidated safetensors; --ema needs a training checkpoint")
    return SafetensorsSource(path)


def parse_size(text: str) -> int:
    """'5GB', '500MiB', '0' (no limit) -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", str(text), flags=re.IGNORECASE)
    if not m:
        raise ConvertError(f"cannot read size {text!r}; use e.g. 5GB, 500MB or 0 for one file")
    value, unit, binary = float(m.group(1)), m.group(2).upper(), m.group(3)
    base = 1024 if binary else 1000
    return int(value * base ** "_KMGT".index(unit or "_")) if unit else int(value)


@dataclass
class Shard:
    file: str
    names: list[str]
    nbytes: int


def plan_shards(infos: dict[str, TensorInfo], max_bytes: int) -> list[Shard]:
    groups: list[list[str]] = [[]]
    size = 0
    for name, info in infos.items():
        if groups[-1] and max_bytes and size + info.nbytes > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += info.nbytes
    n = len(groups)
    if n == 1:
        return [Shard("model.safetensors", groups[0], sum(infos[k].nbytes for k in groups[0]))]
    return [Shard(f"model-{i + 1:05d}-of-{n:05d}.safetensors", g, sum(infos[k].nbytes for k in g))
            for i, g in enumerate(groups)]


def _header(infos: dict[str, TensorInfo], names: list[str], metadata: dict[str, str]) -> bytes:
    header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name in names:
        info = infos[name]
        header[name] = {"dtype": DTYPES[info.dtype], "shape": list(info.shape), "data_offsets": [offset, offset + info.nbytes]}
        offset += info.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def write_safetensors(out_dir: str | Path, infos: dict[str, TensorInfo], produce: Callable[[str], torch.Tensor],
                      max_bytes: int = 0, metadata: dict[str, str] | None = None,
                      progress: Callable[[int], None] | None = None) -> list[Shard]:
    """Stream tensors into consolidated safetensors shards (+ index when sharded).

    `produce(name)` must return a tensor of exactly infos[name]; every file is written under
    a temporary name and renamed when complete.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shards = plan_shards(infos, max_bytes)
    for shard in shards:
        tmp = out / f".{shard.file}.tmp"
        with open(tmp, "wb") as f:
            f.write(_header(infos, shard.names, metadata or {"format": "pt"}))
            for name in shard.names:
                t = produce(name)
                info = infos[name]
                if tuple(t.shape) != info.shape or t.dtype != info.dtype:
                    raise ConvertError(f"{name}: produced {tuple(t.shape)} {t.dtype}, planned {info.shape} {info.dtype}")
                f.write(t.detach().contiguous().cpu().view(torch.uint8).numpy().data)
                if progress:
                    progress(info.nbytes)
                del t
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out / shard.file)
    write_index(out, shards)
    return shards


def write_index(out: Path, shards: list[Shard]) -> None:
    """The safetensors index (name -> shard file) when there are several shards; none for one."""
    index = out / INDEX
    if len(shards) > 1:
        body = {"metadata": {"total_size": sum(s.nbytes for s in shards)},
                "weight_map": {n: s.file for s in shards for n in s.names}}
        tmp = out / f".{INDEX}.tmp"
        tmp.write_text(json.dumps(body, indent=1))
        os.replace(tmp, index)
    elif index.exists():
        index.unlink()


def check_keys(found: dict[str, TensorInfo] | dict[str, tuple], expected: dict[str, tuple[int, ...]],
               what: str) -> None:
    """Fail naming missing, leftover and mis-shaped tensors."""
    shapes = {k: (v.shape if isinstance(v, TensorInfo) else tuple(v)) for k, v in found.items()}
    missing = [k for k in expected if k not in shapes]
    leftover = [k for k in shapes if k not in expected]
    wrong = [f"{k}: {shapes[k]} (expected {tuple(expected[k])})" for k in expected
             if k in shapes and tuple(shapes[k]) != tuple(expected[k])]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing: {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
    if leftover:
        problems.append(f"{len(leftover)} unexpected: {', '.join(leftover[:8])}{' ...' if len(leftover) > 8 else ''}")
    if wrong:
        problems.append(f"{len(wrong)} with the wrong shape: {'; '.join(wrong[:8])}")
    if problems:
        raise ConvertError(f"{what} does not match the model: " + "; ".join(problems))


def expected_tensors(model_cfg: dict, moe_cfg: dict) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the consolidated state of a model config (built on the meta device)."""
    from ecdit_dist.config import config_from_dict
    from ecdit_dist.model import ECDiT

    cfg = config_from_dict({"model": model_cfg, "moe": moe_cfg}, validate=False)
    with torch.device("meta"):
        model = ECDiT(cfg.model, cfg.moe)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def total_bytes(infos: Iterable[TensorInfo]) -> int:
    return sum(i.nbytes for i in infos)
