"""Messages that count or name devices use the reader's unit: a NUMA node on ``--device cpu``."""

from __future__ import annotations

import io

import pytest

from vllm_tuner.errors import GpuError
from vllm_tuner.gpus import resolve_gpus
from vllm_tuner.hostmem import HostNodes
from vllm_tuner.nvml import GpuDevice, GpuMemory, Nvml
from vllm_tuner.progress import TerminalProgress
from vllm_tuner.units import GIB

KB = 1024


class Nodes(HostNodes):
    """The NUMA nodes' reader as it names its unit (``unit`` is a class attribute, as on ``Nvml``)."""

    unit = "NUMA node"


def _node(root, index: int, total_gib: float, free_gib: float) -> None:
    folder = root / f"sys/devices/system/node/node{index}"
    folder.mkdir(parents=True)
    (folder / "meminfo").write_text(
        f"Node {index} MemTotal: {int(total_gib * GIB) // KB} kB\nNode {index} MemFree: {int(free_gib * GIB) // KB} kB\n"
    )


def _resolve(reader, *, gpus=None, gpu_ids=None):
    return resolve_gpus(
        gpus=gpus, gpu_ids=gpu_ids, gpu_name=None, gpu_memory=None, nvml_opener=lambda: reader
    )


class OneGpu:
    """A reader with no ``unit``: a GPU, as every reader was before the CPU backend."""

    def device_count(self):
        return 1

    def device(self, i):
        return GpuDevice(i, "NVIDIA GeForce RTX 4090", f"GPU-{i}", 24 * GIB)

    def memory(self, i):
        return GpuMemory(i, 24 * GIB, 4 * GIB, 20 * GIB)


def test_nvml_names_its_unit():
    assert Nvml.unit == "GPU"


def test_too_many_nodes_are_counted_as_numa_nodes(tmp_path):
    _node(tmp_path, 0, 16, 12)
    with pytest.raises(GpuError) as err:
        _resolve(Nodes(tmp_path), gpus=2)
    assert err.value.problem == "asked for NUMA node(s) [0, 1] but this machine has 1 NUMA node(s)"
    assert "GPU" not in str(err.value)
    assert "--gpus 1 or fewer" in str(err.value)


def test_node_ids_with_a_gap_are_named_and_accepted(tmp_path):
    _node(tmp_path, 0, 16, 12)
    _node(tmp_path, 2, 16, 10)
    target = _resolve(Nodes(tmp_path), gpu_ids=[0, 2])
    assert target.ids == (0, 2) and target.free_bytes == (12 * GIB, 10 * GIB)
    with pytest.raises(GpuError) as err:
        _resolve(Nodes(tmp_path), gpu_ids=[1])
    assert err.value.problem == "asked for NUMA node(s) [1] but this machine has 2 NUMA node(s) (0, 2)"
    assert "--gpu-ids from 0, 2" in str(err.value)


def test_nodes_are_not_mixed_gpus(tmp_path):
    _node(tmp_path, 0, 16, 12)
    _node(tmp_path, 1, 15.9, 12)  # a few MiB apart, as nodes always are
    assert _resolve(Nodes(tmp_path), gpus=2).notes == ()
    _node(tmp_path, 2, 8, 6)
    notes = _resolve(Nodes(tmp_path), gpu_ids=[0, 2]).notes
    assert notes == (
        "NUMA nodes of different sizes (NUMA node 0 16.0 GiB, NUMA node 2 8.0 GiB): using the smallest memory",
    )


def test_a_reader_without_a_unit_still_counts_gpus():
    with pytest.raises(GpuError) as err:
        _resolve(OneGpu(), gpus=2)
    assert err.value.problem == "asked for GPU(s) [0, 1] but this machine has 1 GPU(s)"
    assert "--gpus 1 or fewer, or --gpu-ids below 1" in str(err.value)


def _phase_line(**kw) -> str:
    out = io.StringIO()
    TerminalProgress(out, **kw).phase("loading", 3.0, {0: int(3.6 * GIB), 1: GIB})
    return out.getvalue()


def test_progress_names_devices_gpu_by_default_and_node_when_told():
    assert "GPU0   3.6 GiB GPU1   1.0 GiB" in _phase_line()
    line = _phase_line(device_label="node")
    assert "node0   3.6 GiB node1   1.0 GiB" in line and "GPU" not in line
