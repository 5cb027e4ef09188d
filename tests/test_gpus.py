"""GPU targets: NVML (a fake Nvml object), profiles, explicit sizes."""

from __future__ import annotations

import pytest

from vllm_tuner.errors import GpuError, UsageError
from vllm_tuner.gpus import find_gpu_profile, parse_size, resolve_gpus
from vllm_tuner.nvml import GpuDevice, GpuMemory
from vllm_tuner.units import GIB


class FakeNvml:
    def __init__(self, totals, free):
        self.totals, self.free, self.closed = totals, free, False

    def device_count(self):
        return len(self.totals)

    def device(self, i):
        return GpuDevice(i, "NVIDIA GeForce RTX 4090", f"GPU-{i}", self.totals[i])

    def memory(self, i):
        return GpuMemory(i, self.totals[i], self.totals[i] - self.free[i], self.free[i])

    def close(self):
        self.closed = True


def test_parse_size():
    assert parse_size("32GiB") == 32 * GIB
    assert parse_size("32G") == 32 * GIB
    assert parse_size("32GB") == 32 * 10**9
    assert parse_size("24000MiB") == 24000 << 20
    assert parse_size("80") == 80 * GIB
    for bad in ("", "-1G", "lots", "12XB"):
        with pytest.raises(UsageError):
            parse_size(bad)


def test_profiles_and_close_matches():
    assert find_gpu_profile("RTX 4090").name == "rtx-4090"
    assert round(find_gpu_profile("h100").total_bytes / GIB, 2) == 79.19
    with pytest.raises(GpuError) as err:
        find_gpu_profile("rtx-4909")
    assert "rtx-4090" in str(err.value) and "\n" not in str(err.value)


def test_nvml_first_n_and_ids():
    nv = FakeNvml([24 * GIB, 24 * GIB, 23 * GIB], [20 * GIB, 22 * GIB, 1 * GIB])
    t = resolve_gpus(gpus=2, gpu_ids=None, gpu_name=None, gpu_memory=None, nvml_opener=lambda: nv)
    assert t.ids == (0, 1) and t.source == "nvml" and t.free_bytes == (20 * GIB, 22 * GIB)
    assert not nv.closed  # a session passed in stays the caller's
    t = resolve_gpus(gpus=None, gpu_ids=[0, 2], gpu_name=None, gpu_memory=None, nvml_opener=lambda: nv)
    assert t.total_bytes == 23 * GIB


def test_more_gpus_than_present():
    nv = FakeNvml([24 * GIB], [20 * GIB])
    with pytest.raises(GpuError, match="has 1 GPU"):
        resolve_gpus(gpus=2, gpu_ids=None, gpu_name=None, gpu_memory=None, nvml_opener=lambda: nv)


def test_explicit_wins_and_no_nvml_needed():
    def broken():
        raise GpuError("NVML is not available")

    t = resolve_gpus(gpus=None, gpu_ids=None, gpu_name="rtx-5090", gpu_memory=None, nvml_opener=broken)
    assert t.source == "profile" and t.name == "rtx-5090"
    t = resolve_gpus(gpus=2, gpu_ids=None, gpu_name=None, gpu_memory="32GiB", nvml_opener=broken)
    assert t.source == "explicit" and t.total_bytes == 32 * GIB and t.ids == (0, 1)
    with pytest.raises(GpuError, match="--gpu-memory"):
        resolve_gpus(gpus=None, gpu_ids=None, gpu_name=None, gpu_memory=None, nvml_opener=broken)
