"""Host memory per NUMA node, read from a fake /sys and /proc the way vLLM's CPU backend reads them."""

from __future__ import annotations

import pytest

from vllm_tuner.devices import CPU, CUDA, device_kind
from vllm_tuner.errors import GpuError, UsageError
from vllm_tuner.hostmem import HostNodes
from vllm_tuner.serveconfig import ServeConfig

KB = 1024
GIB = 1 << 30


def _node(
    root, index: int, *, total_kb: int, free_kb: int, active_file_kb=0, inactive_file_kb=0, reclaim_kb=0
):
    folder = root / f"sys/devices/system/node/node{index}"
    folder.mkdir(parents=True)
    (folder / "meminfo").write_text(
        f"Node {index} MemTotal:       {total_kb} kB\n"
        f"Node {index} MemFree:        {free_kb} kB\n"
        f"Node {index} MemUsed:        {total_kb - free_kb} kB\n"
        f"Node {index} Active(file):   {active_file_kb} kB\n"
        f"Node {index} Inactive(file): {inactive_file_kb} kB\n"
        f"Node {index} SReclaimable:   {reclaim_kb} kB\n"
    )


def _proc(root, pid: int, rss_kb: int, numa_maps: str = ""):
    folder = root / f"proc/{pid}"
    folder.mkdir(parents=True)
    (folder / "status").write_text(f"Name:\tpython\nVmRSS:\t{rss_kb} kB\n")
    (folder / "numa_maps").write_text(numa_maps)


def test_available_is_free_plus_file_pages_plus_reclaimable_as_vllm_computes_it(tmp_path):
    _node(tmp_path, 0, total_kb=16 * GIB // KB, free_kb=4 * GIB // KB, active_file_kb=GIB // KB,
          inactive_file_kb=GIB // KB, reclaim_kb=GIB // KB)  # fmt: skip
    nodes = HostNodes(tmp_path)
    mem = nodes.memory(0)
    assert (mem.total, mem.free, mem.used) == (16 * GIB, 7 * GIB, 9 * GIB)
    assert nodes.device_count() == 1
    assert nodes.device(0).total == 16 * GIB
    assert "NUMA node 0" in nodes.device(0).name


def test_a_cgroup_limit_clamps_total_and_available(tmp_path):
    _node(tmp_path, 0, total_kb=64 * GIB // KB, free_kb=60 * GIB // KB)
    cgroup = tmp_path / "sys/fs/cgroup"
    cgroup.mkdir(parents=True)
    (cgroup / "memory.max").write_text(str(8 * GIB))
    (cgroup / "memory.current").write_text(str(3 * GIB))
    mem = HostNodes(tmp_path).memory(0)
    assert (mem.total, mem.free) == (8 * GIB, 5 * GIB)


def test_an_unlimited_cgroup_changes_nothing(tmp_path):
    _node(tmp_path, 0, total_kb=8 * GIB // KB, free_kb=6 * GIB // KB)
    cgroup = tmp_path / "sys/fs/cgroup"
    cgroup.mkdir(parents=True)
    (cgroup / "memory.max").write_text("max\n")
    assert HostNodes(tmp_path).memory(0).total == 8 * GIB


def test_without_numa_in_sysfs_the_machine_is_one_node(tmp_path):
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc/meminfo").write_text(
        f"MemTotal:       {24 * GIB // KB} kB\nMemFree:        {20 * GIB // KB} kB\n"
        "Active(file):     0 kB\nInactive(file):   0 kB\nSReclaimable:     0 kB\n"
    )
    nodes = HostNodes(tmp_path)
    assert nodes.node_ids() == [0]
    assert nodes.memory(0).free == 20 * GIB


def test_an_unknown_node_is_one_line_naming_the_nodes(tmp_path):
    _node(tmp_path, 0, total_kb=GIB // KB, free_kb=GIB // KB)
    _node(tmp_path, 1, total_kb=GIB // KB, free_kb=GIB // KB)
    with pytest.raises(GpuError) as err:
        HostNodes(tmp_path).memory(2)
    assert "NUMA node 2 does not exist" in err.value.problem
    assert "0, 1" in err.value.fix


def test_processes_on_one_node_are_every_large_process(tmp_path):
    _node(tmp_path, 0, total_kb=8 * GIB // KB, free_kb=4 * GIB // KB)
    _proc(tmp_path, 101, 2 * GIB // KB)
    _proc(tmp_path, 102, 1024)  # 1 MiB: too small to list
    assert [(p.pid, p.used) for p in HostNodes(tmp_path).processes(0)] == [(101, 2 * GIB)]


def test_processes_on_several_nodes_count_their_pages_on_each(tmp_path):
    _node(tmp_path, 0, total_kb=8 * GIB // KB, free_kb=4 * GIB // KB)
    _node(tmp_path, 1, total_kb=8 * GIB // KB, free_kb=4 * GIB // KB)
    maps = "7f00 default anon=300 dirty=300 N0=100 N1=200 kernelpagesize_kB=4\n"
    _proc(tmp_path, 201, 512 * 1024, maps)
    nodes = HostNodes(tmp_path)
    assert [(p.pid, p.used) for p in nodes.processes(1)] == [(201, 200 * 4096)]
    assert [(p.pid, p.used) for p in nodes.processes(0)] == [(201, 100 * 4096)]


def test_the_device_kinds_set_their_own_environment():
    cfg = ServeConfig("m")
    assert CPU.serve_env([0], cfg) == {"VLLM_TARGET_DEVICE": "cpu", "CPU_VISIBLE_MEMORY_NODES": "0"}
    assert CUDA.serve_env([0, 1], cfg) == {
        "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True",
        "CUDA_VISIBLE_DEVICES": "0,1",
    }
    # vLLM refuses expandable segments with a KV connector, in any flag shape (dotted keys are merged into it)
    for extra in (
        ("--kv-transfer-config", "{}"),
        ("--kv-transfer-config={}",),
        ("--kv_transfer_config", "{}"),
        ("--kv-transfer-config.kv_connector", "OffloadingConnector"),
        ("--kv-transfer-config.kv_role=kv_both",),
    ):
        assert "PYTORCH_CUDA_ALLOC_CONF" not in CUDA.serve_env([0], ServeConfig("m", extra_args=extra))
    assert CPU.util_floor < 0.1 < CUDA.util_floor
    assert set(CPU.missing_knobs) == {"eager", "offload"}


def test_an_unknown_device_is_one_line():
    with pytest.raises(UsageError):
        device_kind("tpu")


def test_a_node_without_room_for_vllms_processes_is_refused_saying_how_much_is_free_and_needed():
    from vllm_tuner.find import check_gpus_free
    from vllm_tuner.gpus import GpuTarget

    node = GpuTarget(ids=(0,), name="node", total_bytes=14 * GIB, free_bytes=(GIB,))
    with pytest.raises(GpuError) as err:
        check_gpus_free(node, GIB // 4, gpu_ids=(0,), kind=CPU)
    assert "NUMA node 0 has only 1.0 GiB available of 14.0 GiB" in err.value.problem
    assert "vLLM needs 1.8 GiB there before any KV cache" in err.value.problem
    check_gpus_free(node, GIB // 4, gpu_ids=(0,), kind=CUDA)  # a GPU's free memory is not for processes
    roomy = GpuTarget(ids=(0,), name="node", total_bytes=14 * GIB, free_bytes=(12 * GIB,))
    check_gpus_free(roomy, GIB // 4, gpu_ids=(0,), kind=CPU)
