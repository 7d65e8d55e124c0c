"""Helpers shared by the benchmarks."""

from __future__ import annotations

import subprocess
from pathlib import Path


def cold_cache() -> None:
    """Flush dirty pages and, where permitted, drop the page cache, so a measurement starts cold."""
    subprocess.run(["sync"], check=True)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        pass


def machine_info() -> dict:
    """What a timing depends on: CPU model and flags that matter, cores, torch build and BLAS,
    threads, and the load average (a busy, shared machine shows up here)."""
    import os
    import platform
    import re

    import torch

    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model in ("", platform.machine(), platform.processor()):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    config = torch.__config__.show()
    blas = re.search(r"BLAS_INFO=(\w+)", config)
    mkl = re.search(r"Math Kernel Library Version ([\w.\-]+)", config)
    isa = re.search(r"CPU capability usage: (\w+)", config)
    native_bf16 = sorted(f for f in flags if f in ("avx512_bf16", "amx_bf16", "amx_tile"))
    try:
        load = os.getloadavg()
    except OSError:
        load = (float("nan"),) * 3
    return {
        "cpu": model, "cores": os.cpu_count(), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "blas": (blas.group(1) if blas else "unknown") + (f" {mkl.group(1)}" if mkl else ""),
        "isa": isa.group(1) if isa else "unknown", "native_bf16": native_bf16,
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "loadavg_1m": round(load[0], 2),
    }


def describe(info: dict) -> str:
    bf16 = ", ".join(info["native_bf16"]) or "none"
    gpu = f"; GPU {info['cuda']}" if info["cuda"] else ""
    return (f"{info['cpu']}, {info['cores']} cores ({info['threads']} torch threads), ISA {info['isa']}, native bf16: "
            f"{bf16}; torch {info['torch']}, BLAS {info['blas']}{gpu}; load average {info['loadavg_1m']}")
