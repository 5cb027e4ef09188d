"""Issue 13, "Errors that mislead today": each one is one line on stderr naming the real cause and the
fix, exit 2, no traceback."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import types
from pathlib import Path

import pytest

from vllm_tuner.cli import main
from vllm_tuner.deploy.state import deployment_states
from vllm_tuner.errors import VllmError
from vllm_tuner.launch import DockerLauncher, LocalLauncher, detect_vllm, free_port

PREFIX = "vllm-tune: error: "
IMAGE = "vllm/vllm-openai:v0.33.0"


def one_line(capsys, code: int) -> str:
    """The single error line of a refused command, without its prefix."""
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2, captured
    assert len(lines) == 1 and lines[0].startswith(PREFIX), captured.err
    assert "Traceback" not in captured.err
    return lines[0][len(PREFIX) :]


# -- 1. plan without NVML ----------------------------------------------------------------------------


@pytest.fixture
def no_nvml(monkeypatch):
    """A ``pynvml`` that cannot find its library, as on a machine without the NVIDIA driver."""

    class NVMLError(Exception):
        pass

    def init():
        raise NVMLError("NVML Shared Library Not Found")

    module = types.SimpleNamespace(NVMLError=NVMLError, nvmlInit=init)
    monkeypatch.setitem(sys.modules, "pynvml", module)


def test_plan_without_nvml_says_how_plan_itself_plans_offline(tmp_path, capsys, no_nvml):
    path = tmp_path / "live.yaml"
    path.write_text(
        "name: live\ngpus: {count: 1}\nmodels:\n"
        "  - {name: a, model: qwen2.5-7b, port: 8001, needs: {min_context: 4096}}\n"
    )
    line = one_line(capsys, main(["plan", str(path)]))
    assert line.startswith("NVML is not available (NVML Shared Library Not Found)")
    assert "--simulate" not in line  # plan has no such option
    assert "gpus.profile" in line and "gpus.memory" in line and "--device cpu" in line
    assert str(path) in line

    # the same file planned offline, as the line says, works
    path.write_text(path.read_text().replace("{count: 1}", "{count: 1, profile: rtx-pro-6000}"))
    assert main(["plan", str(path)]) == 0


# -- 2. a --vllm-cmd that is not vLLM ----------------------------------------------------------------


def _script(tmp_path: Path, name: str, body: str) -> Path:
    path = tmp_path / name
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)
    return path


def _gnu_sleep() -> bool:
    try:
        done = subprocess.run(["sleep", "--version"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "coreutils" in done.stdout


@pytest.mark.skipif(
    not _gnu_sleep(), reason="needs GNU sleep (its --version prints 'sleep (GNU coreutils) N')"
)
def test_find_with_sleep_as_vllm_says_it_is_not_vllm(sim, capsys):
    sim("rtx-5090")
    line = one_line(
        capsys, main(["find", "--model", "qwen2.5-7b", "--gpus", "1", "--vllm-cmd", "sleep 1000"])
    )
    assert "is not vLLM" in line and "'sleep 1000'" in line
    assert "vLLM 9" not in line and "does not accept" not in line
    assert "--vllm-cmd" in line.split("; ", 1)[1]


def test_a_command_printing_a_version_but_none_of_vllms_flags_is_not_vllm(tmp_path):
    fake = _script(
        tmp_path, "tool", 'case "$1" in --version) echo 2.4.1;; *) echo "usage: tool [--verbose]";; esac'
    )
    with pytest.raises(VllmError) as err:
        detect_vllm(LocalLauncher(str(fake)), cache_dir=tmp_path)
    assert "is not vLLM" in err.value.problem and "--max-model-len" in err.value.problem
    assert not (tmp_path / "vllm-info.json").exists()  # nothing cached for it


def test_a_cached_answer_of_something_that_is_not_vllm_is_not_trusted(tmp_path):
    fake = _script(tmp_path, "tool", 'echo "tool (GNU coreutils) 9.1"')
    launcher = LocalLauncher(str(fake))
    key = f"{launcher.key}|{launcher.device.name}|{launcher.stamp()}"
    (tmp_path / "vllm-info.json").write_text(
        json.dumps({key: {"version": "9.1", "flags": [], "build": None}})
    )
    with pytest.raises(VllmError) as err:
        detect_vllm(launcher, cache_dir=tmp_path)
    assert "is not vLLM" in err.value.problem


def test_vllms_own_version_output_is_still_read(tmp_path):
    # log lines before the version (vLLM's platform detection) and a local build's suffix
    fake = _script(
        tmp_path,
        "vllm",
        'case "$1" in --version) echo "INFO 05-01 [__init__.py:43] Automatically detected platform cuda."; '
        'echo 0.11.1rc2.dev5+gabc123.cu129;; *) echo "--max-model-len --gpu-memory-utilization";; esac',
    )
    info = detect_vllm(LocalLauncher(str(fake)), cache_dir=tmp_path)
    assert info.version == "0.11.1rc2.dev5+gabc123.cu129"
    assert info.accepts("--max-model-len")


# -- 3. a --vllm-cmd that exists but is not executable -------------------------------------------------


def test_a_vllm_cmd_that_exists_but_is_not_executable_says_so(sim, capsys, tmp_path):
    sim("rtx-5090")
    plain = tmp_path / "vllm"
    plain.write_text("#!/bin/sh\necho 0.33.0\n")
    plain.chmod(0o644)
    line = one_line(capsys, main(["find", "--model", "qwen2.5-7b", "--gpus", "1", "--vllm-cmd", str(plain)]))
    assert "not found" not in line
    assert f"{plain} exists but is not executable" in line
    assert "chmod +x" in line and "--vllm-cmd" in line


@pytest.mark.skipif(not Path("/etc/passwd").is_file(), reason="no /etc/passwd")
def test_etc_passwd_as_vllm_cmd_is_not_executable_not_missing():
    with pytest.raises(VllmError) as err:
        LocalLauncher("/etc/passwd").check()
    assert "exists but is not executable" in err.value.problem


def test_a_folder_as_vllm_cmd_is_a_folder(tmp_path):
    with pytest.raises(VllmError) as err:
        LocalLauncher(str(tmp_path)).check()
    assert "is a folder" in err.value.problem
    assert f"{tmp_path}/vllm" in err.value.fix


def test_a_bare_name_on_path_without_the_execute_bit_says_where_it_is(tmp_path, monkeypatch):
    (tmp_path / "myvllm").write_text("#!/bin/sh\n")
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    with pytest.raises(VllmError) as err:
        LocalLauncher("myvllm").check()
    assert f"{tmp_path / 'myvllm'} exists but is not executable" in err.value.problem
    with pytest.raises(VllmError) as err:
        LocalLauncher("surely-no-such-vllm").check()
    assert "not found" in err.value.problem


# -- 4. --docker-image with the Docker daemon down -----------------------------------------------------

DAEMON_DOWN = (
    "Cannot connect to the Docker daemon at unix:///var/run/docker.sock. Is the docker daemon running?"
)
DENIED = (
    "permission denied while trying to connect to the Docker daemon socket at unix:///var/run/docker.sock: "
    'Get "http://%2Fvar%2Frun%2Fdocker.sock/v1.50/version": dial unix /var/run/docker.sock: connect: '
    "permission denied"
)


@pytest.fixture
def broken_docker(tmp_path, monkeypatch):
    """``broken_docker(message)``: a ``docker`` first on PATH whose every command fails as the real
    client does when it cannot reach the daemon (the message on stderr, then docker's usage hint)."""

    def make(message: str) -> Path:
        bin_dir = tmp_path / "docker-bin"
        bin_dir.mkdir(exist_ok=True)
        exe = _script(
            bin_dir,
            "docker",
            f"echo 'docker: {message}' >&2\necho >&2\necho \"Run 'docker run --help' for more information\" >&2\n"
            "exit 125",
        )
        monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
        return exe

    return make


def test_find_with_the_docker_daemon_down_says_so(sim, capsys, broken_docker):
    sim("rtx-5090")
    broken_docker(DAEMON_DOWN)
    line = one_line(capsys, main(["find", "--model", "qwen2.5-7b", "--gpus", "1", "--docker-image", IMAGE]))
    assert "Cannot connect to the Docker daemon" in line
    assert "docker run --help" not in line
    fix = line.split("; ", 1)[1]
    assert "start" in fix and "docker" in fix and "permission" in fix


def test_up_with_the_docker_daemon_down_says_so_before_anything_starts(sim, capsys, broken_docker, tmp_path):
    sim("rtx-5090")
    broken_docker(DAEMON_DOWN)
    path = tmp_path / "boxed.yaml"
    path.write_text(
        f"name: boxed\ngpus: {{count: 1}}\nmodels:\n"
        f"  - {{name: a, model: qwen2.5-7b, port: {free_port()}, needs: {{min_context: 4096}}}}\n"
    )
    line = one_line(capsys, main(["up", str(path), "--docker-image", IMAGE]))
    assert "Cannot connect to the Docker daemon" in line
    assert not deployment_states().path("boxed").exists()


def test_docker_without_permission_on_its_socket_says_so(broken_docker):
    broken_docker(DENIED)
    with pytest.raises(VllmError) as err:
        DockerLauncher(IMAGE).check()
    assert "permission denied" in err.value.problem
    assert "docker group" in err.value.fix


def test_a_docker_failure_while_reading_the_images_vllm_keeps_docker_s_reason(broken_docker, tmp_path):
    broken_docker(DAEMON_DOWN)

    class Unchecked(DockerLauncher):  # the daemon went away after the check
        def check(self):
            pass

    with pytest.raises(VllmError) as err:
        detect_vllm(Unchecked(IMAGE), cache_dir=tmp_path)
    assert "Cannot connect to the Docker daemon" in str(err.value)
    assert "start" in err.value.fix


# -- 5. emit NAME from another directory ---------------------------------------------------------------


def _write_deployment(folder: Path, name: str) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(
        f"name: {name}\ngpus: {{count: 1}}\nmodels:\n"
        f"  - {{name: a, model: qwen2.5-7b, port: {free_port()}, needs: {{min_context: 4096}}}}\n"
    )
    return path


def test_up_records_the_absolute_file_so_emit_by_name_works_from_anywhere(tmp_path, monkeypatch, capsys):
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    work.mkdir()
    elsewhere.mkdir()
    _write_deployment(work, "wherever")
    monkeypatch.chdir(work)
    try:
        sim = ["--simulate", "rtx-pro-6000", "--sim-time-scale", "1000"]
        assert main(["up", "wherever.yaml", "--no-verify", "--json", *sim]) == 0, capsys.readouterr()
        assert deployment_states().load("wherever").source == str(work / "wherever.yaml")
        monkeypatch.chdir(elsewhere)
        capsys.readouterr()
        assert main(["emit", "wherever"]) == 0, capsys.readouterr().err
        assert "vllm serve Qwen/Qwen2.5-7B-Instruct" in capsys.readouterr().out
    finally:
        main(["down", "wherever"])
        _kill_leftovers("wherever")


def _kill_leftovers(name: str) -> None:
    if deployment_states().path(name).exists():
        for inst in json.loads(deployment_states().path(name).read_text())["instances"]:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(inst["pgid"], signal.SIGKILL)


def _old_state(name: str, source: str, pid: int) -> None:
    """A state file as 'up' wrote it before it recorded an absolute path, with one instance ``pid``."""
    from vllm_tuner.deploy.state import proc_start_time

    instance = {
        "name": "a",
        "pid": pid,
        "pgid": pid,
        "port": 8001,
        "gpu_ids": [0],
        "argv": ["vllm", "serve", "Qwen/Qwen2.5-7B-Instruct", "--port", "8001"],
        "env": {},
        "log_path": "a.log",
        "proc_start": proc_start_time(pid) or "",
        "started_at": 0,
    }
    deployment_states().path(name).parent.mkdir(parents=True, exist_ok=True)
    deployment_states().path(name).write_text(
        json.dumps(
            {"name": name, "source": source, "started_at": 0, "baseline_used": {}, "instances": [instance]}
        )
    )


def test_an_old_relative_source_is_found_where_up_ran(tmp_path, monkeypatch):
    from vllm_tuner.commands.deploy import _deployment_file

    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    work.mkdir()
    elsewhere.mkdir()
    path = _write_deployment(work, "older")
    # an instance 'up' started: it runs in the folder 'up' ran in (and has 8001 on its command line)
    proc = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)", "--port", "8001"],
        cwd=work,
        start_new_session=True,
    )
    try:
        _old_state("older", "older.yaml", proc.pid)
        monkeypatch.chdir(elsewhere)
        assert _deployment_file("older") == path
        assert deployment_states().load("older").source_path() == path
    finally:
        proc.kill()
        proc.wait()


def test_an_old_relative_source_without_a_live_instance_names_what_to_pass(tmp_path, monkeypatch, capsys):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    _old_state("gone", "gone.yaml", 2**22 + 12345)  # no such process
    line = one_line(capsys, main(["emit", "gone"]))
    assert "gone.yaml" in line and "relative" in line
    assert "vllm-tune emit" in line  # the fix: pass the file itself


# -- 6. a removed flag after -- ------------------------------------------------------------------------


def test_swap_space_after_the_dashes_names_its_replacement(sim, capsys):
    env = sim("rtx-5090")
    args = [
        "find",
        "--model",
        "qwen2.5-7b",
        "--gpus",
        "1",
        "--vllm-cmd",
        env.vllm_cmd,
        "--",
        "--swap-space",
        "16",
    ]
    line = one_line(capsys, main(args))
    assert "check its spelling" not in line
    assert "--swap-space" in line and "removed" in line
    fix = line.split("; ", 1)[1]
    # find sets --cpu-offload-gb itself: the replacement is its --allow offload, or the KV offload flag
    assert "--allow offload" in fix and "--kv-offloading-size" in fix


def test_a_misspelt_flag_after_the_dashes_still_asks_for_its_spelling(sim, capsys):
    env = sim("rtx-5090")
    args = [
        "find",
        "--model",
        "qwen2.5-7b",
        "--gpus",
        "1",
        "--vllm-cmd",
        env.vllm_cmd,
        "--",
        "--trust-remote-cod",
    ]
    assert "check its spelling" in one_line(capsys, main(args))


# -- 7. estimate: TP that cannot shard the heads; cumulative remedies ----------------------------------


def test_estimate_refuses_a_tp_size_that_does_not_divide_the_heads(capsys):
    # Qwen2.5-7B: 28 attention heads, 4 KV heads; find refuses -tp 3, so does estimate
    line = one_line(capsys, main(["estimate", "--model", "qwen2.5-7b", "--gpu", "rtx-4090", "-tp", "3"]))
    assert "tensor parallel size 3 cannot shard the 28 attention heads" in line
    assert "-tp 2" in line
    assert main(["estimate", "--model", "qwen2.5-7b", "--gpu", "rtx-4090", "-tp", "2"]) == 0


def test_estimate_refuses_a_tp_size_from_a_models_file(tmp_path, capsys):
    models = tmp_path / "models.yaml"
    models.write_text("- {model: qwen2.5-7b, tensor-parallel-size: 3}\n- {model: mistral-7b}\n")
    line = one_line(capsys, main(["estimate", "--models", str(models), "--gpu", "h100", "--gpus", "4"]))
    assert "tensor parallel size 3 cannot shard" in line


def _remedies(*args: str) -> list[dict]:
    from click.testing import CliRunner

    from vllm_tuner.commands.estimate import command

    result = CliRunner().invoke(command, [*args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)["remedies"]


def test_the_remedies_are_cumulative_in_the_knob_order():
    # the guide's GLM-4.7-Flash on 2 x RTX 5090 at its full length: no single knob is enough
    rows = _remedies(
        "--model",
        "glm-4.7-flash",
        "--gpu",
        "rtx-5090",
        "--gpus",
        "2",
        "--max-model-len",
        "131072",
        "--max-num-seqs",
        "4",
    )
    assert rows[0]["step"] == "missing"
    ladder = [r for r in rows[1:] if not r.get("alternative")]
    steps = [r["step"].split(" (")[0] for r in ladder]
    assert steps == sorted(
        steps,
        key=[
            "fewer sequences",
            "higher utilization",
            "eager mode",
            "fp8 KV cache",
            "CPU offload",
            "more GPUs",
        ].index,
    )
    seen: dict[str, object] = {}
    for row in ladder:  # each row keeps every change of the rows above and adds its own
        assert all(row["flags"].get(k) == v for k, v in seen.items()), row
        seen.update(row["changes"])
    fp8 = next(r for r in ladder if r["step"].startswith("fp8"))
    assert fp8["flags"]["--kv-cache-dtype"] == "fp8" and fp8["flags"]["--enforce-eager"] is True
    assert fp8["flags"]["--gpu-memory-utilization"] == 0.95
    assert fp8["gain_tokens"] > 0  # the pool is as large, it holds twice the tokens
    before = ladder[ladder.index(fp8) - 1]
    assert fp8["kv_cache_tokens"] > 1.9 * before["kv_cache_tokens"]
    # the ladder stops at the first row that fits: nothing after it is needed
    fitting = [r for r in ladder if r["fits"]]
    assert len(fitting) <= 1 and (not fitting or fitting[0] is ladder[-1])


def test_fp8_kv_is_what_makes_the_guides_flags_fit():
    # GLM-4.7-Flash at TP 2 with the guide's --max-model-len 8000 --max-num-seqs 1, utilization 0.96 and
    # eager, on a card where the bf16 KV of one request is 30% short: fp8 KV is the row that fits
    from vllm_tuner.estimate import GIB, estimate
    from vllm_tuner.models import resolve_model
    from vllm_tuner.serveconfig import ServeConfig

    spec = resolve_model("glm-4.7-flash")
    guide = ServeConfig(
        spec.serve_name,
        tensor_parallel_size=2,
        max_model_len=8000,
        max_num_seqs=1,
        gpu_memory_utilization=0.96,
        enforce_eager=True,
    )
    roomy = estimate(spec, 40 * GIB, guide)  # the same batch defaults (< 70 GiB) as the card
    need = roomy.kv_bytes_for(8000, 1)
    total = (roomy.non_kv_bytes + roomy.cudagraph_bytes + 0.7 * need) / 0.96
    flags = [
        "--max-model-len",
        "8000",
        "--max-num-seqs",
        "1",
        "--gpu-memory-utilization",
        "0.96",
        "--enforce-eager",
    ]
    rows = _remedies(
        "--model", "glm-4.7-flash", "--gpu-memory", f"{total / GIB:.4f}GiB", "--gpus", "2", *flags
    )
    ladder = [r for r in rows[1:] if not r.get("alternative")]
    assert [r["step"] for r in ladder] == ["fp8 KV cache (--kv-cache-dtype fp8)"], rows
    assert ladder[0]["fits"] and ladder[0]["flags"]["--enforce-eager"] is True
    assert ladder[0]["flags"]["--gpu-memory-utilization"] == 0.96


def test_the_text_ladder_shows_tokens_gained_and_the_shorter_context_as_an_alternative(capsys):
    args = [
        "estimate",
        "--model",
        "glm-4.7-flash",
        "--gpu",
        "rtx-5090",
        "--gpus",
        "2",
        "--max-model-len",
        "131072",
    ]
    assert main([*args, "--max-num-seqs", "4"]) == 0
    out = capsys.readouterr().out
    ladder = out.split("To make it fit", 1)[1]
    assert "each row on top of the rows above" in ladder.splitlines()[0]
    assert "or a shorter context" in ladder
    fp8 = next(line for line in ladder.splitlines() if "fp8 KV cache" in line)
    assert "+0.00 GiB" not in fp8
