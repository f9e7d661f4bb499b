"""What this machine offers, for adverts and for sizing a model: an NVIDIA GPU, else the CPU.

GPUs are found through NVML (the ``nvidia-ml-py`` bindings, which load the driver's
``libnvidia-ml``); where the bindings or the library are missing, through ``nvidia-smi``. With
neither, the peer offers its CPU and RAM. ``--max-vram-mb`` caps what is offered: a donor
keeps the rest of the card for itself, and the advert never promises more.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import time
from dataclasses import dataclass

from msgspec.structs import replace

from ..dht.records import Device


@dataclass(frozen=True, slots=True)
class Gpu:
    name: str
    total_mb: int
    free_mb: int
    compute: str  # compute capability, "8.9"


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


def _gpus_nvml() -> list[Gpu] | None:
    """None where NVML cannot answer (no bindings, no driver); [] where it finds no GPU."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception:  # noqa: BLE001 (pynvml.NVMLError and OSError subclasses, by driver state)
        return None
    try:
        gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            name = pynvml.nvmlDeviceGetName(h)
            major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(h)
            gpus.append(Gpu(name.decode() if isinstance(name, bytes) else str(name),
                            int(mem.total) >> 20, int(mem.free) >> 20, f"{major}.{minor}"))
        return gpus
    except Exception:  # noqa: BLE001 (any NVML failure means: no GPU info)
        return None
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:  # noqa: BLE001, S110 (shutting NVML down is best effort)
            pass


def _gpus_smi() -> list[Gpu] | None:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "--query-gpu=name,memory.total,memory.free,compute_cap",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=10,
                             check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return parse_smi(out)


def parse_smi(out: str) -> list[Gpu] | None:
    gpus = []
    for line in out.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 4:
            return None
        try:
            gpus.append(Gpu(parts[0], int(float(parts[1])), int(float(parts[2])), parts[3]))
        except ValueError:
            return None
    return gpus


def detect_gpus() -> list[Gpu]:
    found = _gpus_nvml()
    if found is None:
        found = _gpus_smi()
    return found or []


def _capped(value: int, cap: int | None) -> int:
    return value if cap is None else min(value, cap)


def detect_device(max_vram_mb: int | None = None) -> Device:
    """The device to announce: the first GPU when there is one (llama.cpp splits a model over
    several, but one card's figures are what a requester can compare), else the CPU."""
    cores, ram = os.cpu_count() or 1, _meminfo_mb("MemTotal")
    gpus = detect_gpus()
    if gpus:
        g = gpus[0]
        name = g.name if len(gpus) == 1 else f"{g.name} (x{len(gpus)})"
        return Device(kind="gpu", name=name, cores=cores, ram_mb=ram,
                      vram_total_mb=_capped(sum(x.total_mb for x in gpus), max_vram_mb),
                      vram_free_mb=_capped(sum(x.free_mb for x in gpus), max_vram_mb), compute=g.compute)
    return Device(kind="cpu", name=_cpu_name(), cores=cores, ram_mb=ram)


def computing_device(device: Device, offloaded_layers: int) -> Device:
    """The device as the engine uses it: a GPU only when layers really run on it (a CPU-only
    llama.cpp build, or ``--n-gpu-layers 0``, computes on the CPU, and a requester must rank it
    as one), with how many; VRAM is offered only then."""
    if device.kind != "gpu":
        return device
    if offloaded_layers <= 0:
        return Device(kind="cpu", name=_cpu_name(), cores=device.cores, ram_mb=device.ram_mb)
    return replace(device, gpu_layers=offloaded_layers)


def offered_memory_mb(device: Device, max_vram_mb: int | None = None) -> int:
    """What a model may use here: free VRAM on a GPU, available RAM on a CPU, under the cap."""
    if device.kind == "gpu":
        return device.vram_free_mb
    return _capped(_meminfo_mb("MemAvailable"), max_vram_mb)


_last_gpus: tuple[float, list[Gpu]] = (-1e9, [])


def free_memory_mb(device: Device | None = None, max_vram_mb: int | None = None) -> int:
    """Memory available for more work now (live, for pongs): free VRAM, else free RAM.
    NVML is asked at most once a second, however often peers ping."""
    global _last_gpus
    if device is not None and device.kind == "gpu":
        now = time.monotonic()
        if now - _last_gpus[0] > 1.0:
            _last_gpus = (now, detect_gpus())
        if _last_gpus[1]:
            return _capped(sum(g.free_mb for g in _last_gpus[1]), max_vram_mb)
    return _capped(_meminfo_mb("MemAvailable"), max_vram_mb)
