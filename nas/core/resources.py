"""What this host has and may give: its cores, its RAM (or a container's limit), what is
available now and the most a process has held, the memory a device may plan to use, and the
one guard every allocation that input sizes passes before it is made (`check_allocation`).
No torch (a torch.device is only read).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import psutil

from nas.core.errors import NasError

if TYPE_CHECKING:
    import torch


# Shares of the device's memory a candidate may plan to use by default: CUDA memory is the
# process's own; RAM is shared with the data loader, the cached dataset and other processes.
CUDA_SHARE = 0.9


HOST_SHARE = 0.5


GB = 1e9  # the unit of the messages (and of a max_memory_gb setting)


# A container's memory limit (cgroup v2, then v1) kills the process long before the RAM is full.
CGROUP_LIMIT_FILES = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")


CGROUP_USAGE_FILES = (
    "/sys/fs/cgroup/memory.current",
    "/sys/fs/cgroup/memory/memory.usage_in_bytes",
)


def default_memory_limit_bytes(device: torch.device) -> int:
    """How much memory a candidate may plan to use on `device` unless told otherwise: a share
    of the GPU's memory on CUDA, of the machine's RAM (or the container's limit) elsewhere."""
    if device.type == "cuda":
        import torch  # loaded already: the caller holds a torch.device

        index = device.index if device.index is not None else torch.cuda.current_device()
        return int(CUDA_SHARE * torch.cuda.get_device_properties(index).total_memory)
    return host_memory_limit_bytes()


def host_memory_limit_bytes() -> int:
    """`default_memory_limit_bytes` of the CPU, known without torch."""
    return int(HOST_SHARE * _host_memory_bytes())


def _host_memory_bytes() -> int:
    """Physical RAM, or the cgroup's memory limit where a container sets a smaller one."""
    total = psutil.virtual_memory().total  # os.sysconf has no RAM size on Windows
    for limit_file in CGROUP_LIMIT_FILES:
        try:
            text = Path(limit_file).read_text().strip()
        except OSError:
            continue
        if text.isdigit():  # "max" (cgroup v2) means no limit
            total = min(total, int(text))
    return total


def available_cores() -> int:
    """The cores this process may run on (its affinity where the OS says, else all)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def available_host_bytes() -> int:
    """RAM that can be taken now without swapping: what the system reports available, or
    what is left under the container's limit where that is less."""
    memory = psutil.virtual_memory()
    limit = _host_memory_bytes()
    if limit >= memory.total:  # no container limit below the RAM
        return memory.available
    for usage_file in CGROUP_USAGE_FILES:
        try:
            text = Path(usage_file).read_text().strip()
        except OSError:
            continue
        if text.isdigit():  # the cgroup's usage counts its page cache: on the safe side
            return min(memory.available, max(limit - int(text), 0))
    return min(memory.available, limit)


def check_allocation(n_bytes: int, what: str, source: str | Path) -> None:
    """Refuse, before it is made, an allocation whose size input decides (a resampled grid, a
    saved array): `n_bytes`, computed from a header or a plan, for `what`, named by `source`
    (the file that asks for it), when it is more than the memory available now
    (`available_host_bytes`). Where the allocation would fail or swap, the user gets one line
    naming the file and both sizes instead of a MemoryError (or the OOM killer) after trying."""
    limit = available_host_bytes()
    if n_bytes > limit:
        raise NasError(
            source,
            f"{what} would need {format_gb(n_bytes)}, more than the {format_gb(limit)} this "
            "machine has available",
        )


def peak_rss_bytes() -> int:
    """The most resident memory this process has held so far."""
    try:
        import resource
    except ImportError:  # Windows: the peak working set
        info = psutil.Process().memory_info()
        return int(getattr(info, "peak_wset", info.rss))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB elsewhere


def format_gb(n_bytes: int) -> str:
    """`n_bytes` in GB (10^9 bytes) with one decimal: "37.2 GB"."""
    return f"{n_bytes / GB:.1f} GB"
