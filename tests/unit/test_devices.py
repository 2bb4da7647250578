"""Device identities: NVML through the fake (no GPU here), and the CPU fallback."""

from __future__ import annotations

import socket
import sys

import pytest
from conftest import FAKE_NVML

from loomrun.devices import Devices, cpu_device


@pytest.fixture
def fake_nvml(monkeypatch):
    monkeypatch.syspath_prepend(str(FAKE_NVML))
    monkeypatch.delitem(sys.modules, "pynvml", raising=False)
    monkeypatch.setenv("FAKE_NVML_GPUS", "4")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    yield
    sys.modules.pop("pynvml", None)


def uuid(index: int) -> str:
    return f"GPU-fake0000-0000-0000-0000-00000000000{index}"


def test_local_rank_picks_the_gpu(fake_nvml):
    devices = Devices()
    device = devices.for_replica(2)
    assert (device.uuid, device.name, device.gpu) == (uuid(2), "Fake GPU 80GB", True)
    assert device.memory == 80 * 2**30
    sample = devices.telemetry(device)
    assert (sample.util, sample.mem_used) == (44.0, 3 * 2**30)


@pytest.mark.parametrize("visible", ["3,1", f"{uuid(3)},{uuid(1)}"])
def test_cuda_visible_devices_by_index_or_uuid(fake_nvml, monkeypatch, visible):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    devices = Devices()
    assert devices.for_replica(0).uuid == uuid(3)
    assert devices.for_replica(1).uuid == uuid(1)
    beyond = devices.for_replica(2)  # no GPU left for it: a CPU identity
    assert not beyond.gpu and beyond.uuid == f"cpu-{socket.gethostname()}-2"


def test_without_nvml_every_replica_gets_a_stable_cpu_identity(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # importing it fails
    devices = Devices()
    assert devices.for_replica(1) == cpu_device(1)
    assert devices.telemetry(devices.for_replica(1)) is None


@pytest.mark.parametrize(
    "visible, count",
    [(None, 4), ("2,0", 2), ("-1", 0), ("0,1,7,2", 2), ("3,4,5,6", 1), (f"{uuid(1)},nope,0", 1)],
)
def test_the_gpu_count_stops_where_cuda_would(fake_nvml, monkeypatch, visible, count):
    if visible is not None:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    devices = Devices()
    assert devices.count() == count
    devices.close()
