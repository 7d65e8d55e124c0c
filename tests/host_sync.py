"""Count the operations that make the host wait for the device, on any device (CPU included).

On CUDA, `torch.cuda.set_sync_debug_mode` reports synchronisations as they happen. On the CPU
nothing waits, so this module counts the operations that *would* block the host on a GPU:

* reading a value: `item()`, `bool()`, `float()`, `int()` of a tensor (aten._local_scalar_dense),
  `tolist()`, `numpy()`, `cpu()`;
* operations whose output shape depends on the values: `nonzero`, `masked_select`, indexing
  with a boolean mask, `bincount`, `unique`, `repeat_interleave` without `output_size`.

Reads of torch.optim's step counters are not counted: with `capturable=False` (the default)
they live on the host on every device, so reading them never waits for a GPU.

    from host_sync import count_host_syncs

    with count_host_syncs() as syncs:
        trainer.train_step(1)
    assert syncs.count == 1, syncs.ops       # e.g. ['tolist'] or ['aten.nonzero.default', ...]

Only the thread that entered the block is watched (a data-loading thread is not).
"""

from __future__ import annotations

import contextlib
import sys
import threading
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# aten overload packets whose result needs a value (or a value-dependent shape) on the host
_SYNC_PACKETS = {
    "_local_scalar_dense", "nonzero", "nonzero_static_", "masked_select", "bincount", "unique", "_unique",
    "_unique2", "unique_consecutive", "unique_dim", "unique_dim_consecutive", "argwhere",
}
_PATCHED = ("tolist", "numpy", "cpu")
_HOST_STATE = ("/torch/optim/",)          # code whose scalar reads are of host-side tensors


@dataclass
class HostSyncs:
    """What a `count_host_syncs` block saw: `ops` in order, `count` = len(ops)."""

    ops: list[str] = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.ops)


def _from_host_state() -> bool:
    frame = sys._getframe(2)
    while frame is not None:
        if any(part in frame.f_code.co_filename.replace("\\", "/") for part in _HOST_STATE):
            return True
        frame = frame.f_back
    return False


def _syncs(func, args, kwargs) -> bool:
    name = func.overloadpacket.__name__
    if name in _SYNC_PACKETS:
        return True
    if name in ("index", "index_put", "index_put_", "_index_put_impl_"):
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        return any(i is not None and i.dtype in (torch.bool, torch.uint8) for i in indices)
    if name == "repeat_interleave":      # the Tensor-repeats forms size their output from the values
        return func._overloadname in ("Tensor", "self_Tensor") and kwargs.get("output_size") is None \
            and not (len(args) > 2 and args[2] is not None)
    return False


class _Mode(TorchDispatchMode):
    def __init__(self, record) -> None:
        super().__init__()
        self.record = record

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _syncs(func, args, kwargs):
            self.record(str(func))
        return func(*args, **kwargs)


@contextlib.contextmanager
def count_host_syncs() -> Iterator[HostSyncs]:
    """Count host-device synchronisations of this thread inside the block (see the module doc)."""
    seen = HostSyncs()
    me = threading.get_ident()
    inside = threading.local()       # a patched method's own dispatches are not counted again

    def record(op: str) -> None:
        if threading.get_ident() == me and not getattr(inside, "depth", 0) and not _from_host_state():
            seen.ops.append(op)

    originals = {name: getattr(torch.Tensor, name) for name in _PATCHED}

    def patch(name, fn):
        def counted(self, *args, **kwargs):
            record(name)
            inside.depth = getattr(inside, "depth", 0) + 1
            try:
                return fn(self, *args, **kwargs)
            finally:
                inside.depth -= 1
        return counted

    for name, fn in originals.items():
        setattr(torch.Tensor, name, patch(name, fn))
    try:
        with _Mode(record):
            yield seen
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)
