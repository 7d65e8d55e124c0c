"""train.host_memory: on CPU ranks large freed blocks are reused by the next allocation instead of
being faulted in afresh (ecdit_dist.device.keep_host_memory). Counted in page faults, not time."""

import subprocess
import sys

import pytest

from ecdit_dist.config import ConfigError, load_config
from ecdit_dist.device import keep_host_memory

# In a fresh process: set the mode, then allocate, fill and free a 256 MiB tensor eight times (as
# training steps do with an expert weight gradient) and count the minor page faults of the last
# three rounds (the heap settles within the first few), and check that the values written are read.
PROBE = r"""
import resource, sys, torch
from ecdit_dist.device import keep_host_memory
mode = keep_host_memory(sys.argv[1], "cpu")
faults = 0
for i in range(8):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t = torch.empty(64, 1024, 1024)
    t.fill_(float(i))
    assert float(t[-1, -1, -1]) == float(i) and float(t.sum()) == float(i) * t.numel()
    del t
    if i >= 5:
        faults += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(mode, faults)
"""


def _probe(mode: str) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    effect, faults = out.stdout.split()
    return effect, int(faults)


def test_reuse_spares_the_page_faults_of_every_step():
    effect, reused = _probe("reuse")
    if effect.startswith("release"):
        pytest.skip(f"host allocator offers no mallopt here ({effect}); train.host_memory=reuse falls back")
    assert effect == "reuse"
    released_effect, released = _probe("release")
    assert released_effect == "release"
    # 3 x 256 MiB: 196,608 faults with 4 KiB pages (384 with transparent huge pages "always")
    assert released > 0
    assert reused * 20 <= released, (reused, released)


def test_auto_reuses_on_cpu_and_leaves_cuda_ranks_alone():
    # in a fresh process (this one may already be in reuse from a training test): a CUDA rank changes
    # nothing, a CPU rank then switches to reuse, and a later request for release reports what holds
    code = ("from ecdit_dist.device import keep_host_memory as k; "
            "print(k('auto', 'cuda'), k('auto', 'cpu'), k('release', 'cpu'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    cuda, cpu, later = out.stdout.split(maxsplit=2)
    assert cuda == "release"
    if not cpu.startswith("release"):          # glibc
        assert cpu == later.strip() == "reuse"
    with pytest.raises(ConfigError, match="train.host_memory"):
        keep_host_memory("cache", "cpu")
    with pytest.raises(ConfigError, match="host_memory"):
        load_config(None, ["train.host_memory=cache"])
