"""Which device each replica uses, and its telemetry: NVML (nvidia-ml-py), or a CPU identity.

A replica's GPU is the one at its LOCAL_RANK among the visible devices (CUDA_VISIBLE_DEVICES,
by index or UUID, as CUDA counts them). Without NVML or a GPU for it, a replica gets a stable
CPU identity from the host and its local rank. Only the supervisor calls NVML: workers
never pay for it.
"""

from __future__ import annotations

import contextlib
import os
import socket
from dataclasses import dataclass


@dataclass(frozen=True)
class DeviceInfo:
    uuid: str
    name: str
    memory: int
    gpu: bool
    handle: object = None


@dataclass(frozen=True)
class Telemetry:
    util: float
    mem_used: float
    mem_total: float


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def cpu_device(local_rank: int, host: str | None = None) -> DeviceInfo:
    host = host or socket.gethostname()
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        memory = 0
    return DeviceInfo(f"cpu-{host}-{local_rank}", "CPU", memory, gpu=False)


class Devices:
    """NVML when it works, else CPU identities; never raises for a missing driver."""

    def __init__(self):
        self.nvml = None
        try:
            import pynvml

            pynvml.nvmlInit()
            if pynvml.nvmlDeviceGetCount() > 0:
                self.nvml = pynvml
        except Exception:  # noqa: BLE001 - no library, no driver, no GPU: the CPU fallback
            self.nvml = None

    def _visible(self) -> list[str]:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible is None:
            return [str(i) for i in range(self.nvml.nvmlDeviceGetCount())]
        return [v.strip() for v in visible.split(",") if v.strip()]

    def count(self) -> int:
        """The GPUs a worker here can use, as CUDA counts them: CUDA_VISIBLE_DEVICES up to
        its first entry that names no device (`-1` hides them all); 0 without NVML."""
        if self.nvml is None:
            return 0
        usable = 0
        try:
            present = self.nvml.nvmlDeviceGetCount()
            for entry in self._visible():
                if entry.isdigit():
                    if int(entry) >= present:
                        break
                else:
                    self.nvml.nvmlDeviceGetHandleByUUID(entry)
                usable += 1
        except Exception:  # noqa: BLE001 - an entry NVML does not know ends the list
            pass
        return usable

    def for_replica(self, local_rank: int) -> DeviceInfo:
        if self.nvml is None:
            return cpu_device(local_rank)
        nvml = self.nvml
        try:
            visible = self._visible()
            if local_rank >= len(visible):
                return cpu_device(local_rank)
            entry = visible[local_rank]
            if entry.isdigit():
                handle = nvml.nvmlDeviceGetHandleByIndex(int(entry))
            else:
                handle = nvml.nvmlDeviceGetHandleByUUID(entry)
            memory = nvml.nvmlDeviceGetMemoryInfo(handle).total
            uuid = _text(nvml.nvmlDeviceGetUUID(handle))
            return DeviceInfo(uuid, _text(nvml.nvmlDeviceGetName(handle)), memory, True, handle)
        except Exception:  # noqa: BLE001 - a device NVML cannot describe: the CPU fallback
            return cpu_device(local_rank)

    def telemetry(self, device: DeviceInfo) -> Telemetry | None:
        if not device.gpu or self.nvml is None:
            return None
        try:
            util = self.nvml.nvmlDeviceGetUtilizationRates(device.handle).gpu
            memory = self.nvml.nvmlDeviceGetMemoryInfo(device.handle)
            return Telemetry(float(util), float(memory.used), float(memory.total))
        except Exception:  # noqa: BLE001 - a sample missed is left out, not fatal
            return None

    def close(self) -> None:
        if self.nvml is not None:
            with contextlib.suppress(Exception):
                self.nvml.nvmlShutdown()
            self.nvml = None
