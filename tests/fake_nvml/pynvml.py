"""A stand-in for nvidia-ml-py's `pynvml`, for machines without a GPU (the only fake allowed).

Put this folder first on PYTHONPATH; FAKE_NVML_GPUS sets how many GPUs it reports.
"""

import os
from types import SimpleNamespace


class NVMLError(Exception):
    pass


def _count() -> int:
    return int(os.environ.get("FAKE_NVML_GPUS", "2"))


def _uuid(index: int) -> str:
    return f"GPU-fake0000-0000-0000-0000-00000000000{index}"


def nvmlInit():
    if _count() < 0:
        raise NVMLError("driver not loaded")


def nvmlShutdown():
    pass


def nvmlDeviceGetCount():
    return _count()


def nvmlDeviceGetHandleByIndex(index):
    if not 0 <= index < _count():
        raise NVMLError(f"invalid index {index}")
    return SimpleNamespace(index=index)


def nvmlDeviceGetHandleByUUID(uuid):
    for index in range(_count()):
        if _uuid(index) == (uuid.decode() if isinstance(uuid, bytes) else uuid):
            return SimpleNamespace(index=index)
    raise NVMLError(f"no device {uuid}")


def nvmlDeviceGetUUID(handle):
    return _uuid(handle.index)


def nvmlDeviceGetName(handle):
    return "Fake GPU 80GB"


def nvmlDeviceGetMemoryInfo(handle):
    total = 80 * 2**30
    return SimpleNamespace(total=total, used=(handle.index + 1) * 2**30, free=total)


def nvmlDeviceGetUtilizationRates(handle):
    return SimpleNamespace(gpu=42 + handle.index, memory=10)
