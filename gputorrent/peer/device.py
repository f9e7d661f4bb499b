"""What this machine offers, for adverts: the CPU and RAM (GPU detection is added with the
serving-at-capacity work; until then a GPU host announces itself as CPU)."""

from __future__ import annotations

import os
import platform

from ..dht.records import Device


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _meminfo_mb(field: str) -> int:
    """A field of /proc/meminfo (``MemTotal``, ``MemAvailable``) in MB; 0 where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) // 1024
    except (OSError, ValueError):
        pass
    return 0


def free_memory_mb() -> int:
    """Memory available for more work: free RAM here (free VRAM once GPUs are detected)."""
    return _meminfo_mb("MemAvailable")


def detect_device() -> Device:
    return Device(kind="cpu", name=_cpu_name(), cores=os.cpu_count() or 1, ram_mb=_meminfo_mb("MemTotal"))
