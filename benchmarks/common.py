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
