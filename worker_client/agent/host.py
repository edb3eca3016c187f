"""What the host has: GPU memory (through NVML when `nvidia-ml-py` is installed and a GPU answers) and RAM."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GpuMemory:
    """Total and free memory summed over the host's GPUs of one vendor."""

    vendor: str
    total: int
    free: int


def detect_gpu() -> GpuMemory | None:
    """NVIDIA GPUs' memory through NVML, or None when there is no NVML or no GPU."""
    try:
        import pynvml  # optional dependency: nvidia-ml-py
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        try:
            handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
            infos = [pynvml.nvmlDeviceGetMemoryInfo(handle) for handle in handles]
        finally:
            pynvml.nvmlShutdown()
    except pynvml.NVMLError as error:
        log.debug("NVML unavailable: %s", error)
        return None
    if not infos:
        return None
    return GpuMemory("nvidia", sum(int(info.total) for info in infos), sum(int(info.free) for info in infos))


def ram() -> tuple[int, int]:
    """(total, available) RAM in bytes."""
    try:
        fields = dict(
            line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line
        )
        return _kib(fields["MemTotal"]), _kib(fields["MemAvailable"])
    except (OSError, KeyError, ValueError):
        page = os.sysconf("SC_PAGE_SIZE")
        return os.sysconf("SC_PHYS_PAGES") * page, os.sysconf("SC_AVPHYS_PAGES") * page


def _kib(value: str) -> int:
    return int(value.split()[0]) * 1024
