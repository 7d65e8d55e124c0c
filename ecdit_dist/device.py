"""Device decisions of a rank, in one place: which device, which collective backend, which
precision, and how a batch reaches the device.

The same functions run on CUDA + NCCL clusters and on CPU + gloo here; everything that
differs between the two is decided by these few functions and nowhere else.

- device: `cuda:<local rank>` when every rank of the node sees all GPUs, `cuda:0` when the
  launcher gives each task one GPU (Slurm `--gpus-per-task=1`, CUDA_VISIBLE_DEVICES per
  rank); an error naming the variables when neither fits.
- backend: on CUDA the default process group gets gloo for CPU tensors beside NCCL for
  GPU tensors ("cpu:gloo,cuda:nccl"), so small CPU flags, barriers and checkpoint
  bookkeeping never reach an NCCL-only group. gloo alone with CUDA is refused.
- precision: "auto" = bf16 autocast with fp32 master weights on CUDA, fp32 on CPU; TF32
  is enabled on CUDA for the matmuls and convolutions that stay in fp32.
- batches: one pinned host buffer per micro-batch and one non-blocking copy to the GPU.
- host memory: on CPU ranks, large freed blocks stay in the process for the next step
  (`keep_host_memory`); CUDA ranks leave the host allocator as it is.
"""

from __future__ import annotations

import os
from typing import Sequence

import torch

from ecdit_dist.config import ConfigError


def select_device(local_rank: int) -> torch.device:
    """The device of this rank: CPU without CUDA; else the GPU of this local rank."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    count = torch.cuda.device_count()
    if count == 1:
        return torch.device("cuda", 0)          # one GPU per task (or one GPU in all)
    if local_rank < count:
        return torch.device("cuda", local_rank)
    raise ConfigError(
        f"LOCAL_RANK={local_rank} but this process sees {count} GPUs "
        f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); start at most {count} "
        f"ranks per node, or give every rank exactly one GPU (e.g. srun --gpus-per-task=1)")


def process_group_backend(configured: str, device_type: str) -> str:
    """The backend string for init_process_group.

    On CUDA: NCCL for device tensors and gloo beside it for CPU tensors. On CPU: gloo."""
    if device_type == "cuda":
        if configured == "gloo":
            raise ConfigError("parallel.backend=gloo with CUDA tensors: gloo's GPU collectives are slow "
                              "and incomplete; use parallel.backend=auto or nccl (CPU tensors go through "
                              "gloo anyway)")
        return "cpu:gloo,cuda:nccl"
    if configured == "nccl":
        raise ConfigError("parallel.backend=nccl needs CUDA, and no GPU is visible; use parallel.backend=auto")
    return "gloo"


def autocast_dtype(precision: str, device_type: str) -> torch.dtype | None:
    """Compute dtype of autocast (None = plain fp32). Master weights stay fp32 in every case."""
    if precision == "auto":
        precision = "bf16" if device_type == "cuda" else "fp32"
    return torch.bfloat16 if precision == "bf16" else None


def enable_tf32(device_type: str) -> None:
    """TF32 for the fp32 matmuls and convolutions that remain under bf16 autocast (and for fp32
    runs): about 8x the fp32 throughput of an H100 at a 10-bit mantissa, the precision the
    bf16 compute path already accepts. The router and the softmax of routing stay exact fp32
    elementwise; only their one small matmul is affected."""
    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_host_memory: str | None = None


def _glibc():
    """The C library as a ctypes handle when it is glibc (has mallopt and gnu_get_libc_version)."""
    import ctypes

    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
        return libc
    except (OSError, AttributeError):
        return None


def keep_host_memory(mode: str, device_type: str) -> str:
    """How this process's host allocator treats large freed blocks (train.host_memory).

    A CPU training step allocates and frees the same large tensors every step: activations and,
    for the experts, weight gradients of E x d x d_ff floats (268 MB per matrix at E=64, d=512,
    d_ff=2048). glibc serves every block above its mmap threshold (at most 32 MiB) with a fresh
    mmap and returns it at free, so each step faults in and zeroes those pages again: 65,536
    minor faults and about 0.1 s per 268 MB here, which made the expert weight gradients look
    1.4-1.5x slower than a dense GEMM of the same FLOPs (docs/PERFORMANCE.md). "reuse" serves
    large blocks from the heap and never trims it, so a freed block is reused by the next step
    without faults, the host-memory counterpart of PyTorch's CUDA caching allocator. The cost is
    memory: the heap keeps its peak resident, and glibc's heap packs aligned blocks less tightly
    (an E=64 layer's forward and backward: 0.72x the time, 1.38x the peak memory;
    benchmarks/host_memory.py). "release" keeps the C library's defaults. auto = reuse on CPU
    ranks, release on CUDA ranks (their large tensors live in device memory).

    Returns what is in effect: "reuse", "release", or "release (not glibc)" where the C library
    offers no mallopt. Process-wide and one-way: once "reuse" is set it stays for the process."""
    global _host_memory
    if mode not in ("auto", "reuse", "release"):
        raise ConfigError(f"train.host_memory={mode!r}; choose auto, reuse or release")
    want = ("reuse" if device_type == "cpu" else "release") if mode == "auto" else mode
    if want == "release" or _host_memory == "reuse":
        return _host_memory or "release"
    libc = _glibc()
    if libc is None:
        return "release (not glibc)"
    ok = libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
    _host_memory = "reuse" if ok else None
    return _host_memory or "release (mallopt refused)"


def _align(n: int, a: int = 16) -> int:
    return (n + a - 1) // a * a


def to_device(tensors: Sequence[torch.Tensor | None], device: torch.device) -> list[torch.Tensor | None]:
    """Move CPU tensors to `device` with a single host-to-device copy.

    The tensors are packed into one pinned byte buffer (16-byte aligned slots), copied with
    non_blocking=True (no host sync) and viewed back with their dtypes and shapes. On CPU
    they are returned as they are. None entries, and tensors already on the device, pass through."""
    if device.type == "cpu":
        return list(tensors)
    present = [t for t in tensors if t is not None and t.device.type == "cpu"]
    sizes = [_align(t.numel() * t.element_size()) for t in present]
    host = torch.empty(sum(sizes), dtype=torch.uint8, pin_memory=True)
    offset = 0
    for t, size in zip(present, sizes):
        n = t.numel() * t.element_size()
        host[offset:offset + n].copy_(t.contiguous().view(-1).view(torch.uint8))
        offset += size
    dev = host.to(device, non_blocking=True)
    out: list[torch.Tensor | None] = []
    offset = 0
    it = iter(zip(present, sizes))
    for t in tensors:
        if t is None or t.device.type != "cpu":
            out.append(t)
            continue
        src, size = next(it)
        n = src.numel() * src.element_size()
        out.append(dev[offset:offset + n].view(src.dtype).view(src.shape))
        offset += size
    return out
