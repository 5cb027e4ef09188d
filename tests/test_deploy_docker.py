"""``up --docker-image``: instances as containers, ``status`` and ``down`` of them, without docker.

A fake ``docker`` (a script first on PATH) records every argv. ``docker run`` is the attached client:
it starts the "container" in a session of its own (as a real container runs outside the client's
session), the simulated vLLM with the arguments after the image (the image's entrypoint is ``vllm
serve``) and GPUs from ``--gpus "device=..."``, registers its name, relays SIGTERM/SIGINT to it and exits
with it. ``stop``/``rm``/``inspect`` act on registered names only, as docker does.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from vllm_tuner.cli import main
from vllm_tuner.deploy.containers import DockerCli, container_name, instance_run_argv
from vllm_tuner.deploy.state import deployment_states
from vllm_tuner.launch import free_port

IMAGE = "vllm/vllm-openai:v0.33.0"

FAKE_DOCKER = r"""#!PYTHON
import json, os, signal, sys, time
from pathlib import Path

root = Path(os.environ["FAKE_DOCKER_DIR"])
names = root / "containers"
names.mkdir(parents=True, exist_ok=True)
args = sys.argv[1:]
with open(root / "calls.jsonl", "a") as f:
    f.write(json.dumps(args) + "\n")

def alive(pid):
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")

def running(name):
    try:
        pid = int((names / name).read_text())
    except (OSError, ValueError):
        return None
    return pid if alive(pid) else None

def missing(name):
    print(f"Error response from daemon: No such container: {name}", file=sys.stderr)
    sys.exit(1)

cmd = args[0]
if cmd == "run":
    takes_value = {"--name", "--label", "--gpus", "-p", "-e", "-v", "--entrypoint"}
    opts, i = {}, 1
    while args[i].startswith("-"):
        if args[i] in takes_value:
            opts.setdefault(args[i], []).append(args[i + 1])
            i += 2
        else:
            i += 1
    rest = args[i + 1:]
    if opts.get("--entrypoint") == ["vllm"]:  # the launcher asking the image's vLLM (--version, --help)
        os.execvp(sys.executable, [sys.executable, "-m", "vllm_tuner.simlite", *rest])
    name = opts["--name"][0]
    if running(name):
        print(f'docker: Error response from daemon: Conflict. The container name "/{name}" is already in use', file=sys.stderr)
        sys.exit(125)
    env = dict(os.environ)
    env["CUDA_VISIBLE_DEVICES"] = opts["--gpus"][0].strip('"').split("=", 1)[1]
    container = os.fork()
    if container == 0:
        os.setsid()
        os.execvpe(sys.executable, [sys.executable, "-m", "vllm_tuner.simlite", "serve", *rest], env)
    (names / name).write_text(str(container))

    def relay(sig, _frame):
        try:
            os.kill(container, sig)
        except ProcessLookupError:
            pass

    signal.signal(signal.SIGTERM, relay)
    signal.signal(signal.SIGINT, relay)
    _pid, status = os.waitpid(container, 0)
    sys.exit(os.waitstatus_to_exitcode(status) & 0xFF)
elif cmd == "stop":
    name = args[-1]
    pid = running(name)
    if pid is None:
        missing(name)
    os.kill(pid, signal.SIGTERM)
    deadline = time.time() + float(args[args.index("--time") + 1])
    while alive(pid) and time.time() < deadline:
        time.sleep(0.02)
    if alive(pid):
        os.kill(pid, signal.SIGKILL)
    (names / name).unlink()  # --rm
    print(name)
elif cmd == "rm":
    name = args[-1]
    if not (names / name).exists():
        missing(name)
    pid = running(name)
    if pid:
        os.kill(pid, signal.SIGKILL)
    (names / name).unlink()
    print(name)
elif cmd == "inspect":
    name = args[-1]
    if not (names / name).exists():
        missing(name)
    print(running(name) or 0)
else:
    print(f"fake docker: {cmd} not faked", file=sys.stderr)
    sys.exit(2)
"""


@pytest.fixture
def docker(tmp_path, monkeypatch):
    """The fake docker on PATH; yields (calls(), register(name, pid)); kills what the test registered."""
    bin_dir, root = tmp_path / "bin", tmp_path / "docker"
    bin_dir.mkdir()
    exe = bin_dir / "docker"
    exe.write_text(FAKE_DOCKER.replace("PYTHON", sys.executable))
    exe.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_DOCKER_DIR", str(root))
    others: list[subprocess.Popen] = []

    def calls() -> list[list[str]]:
        path = root / "calls.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def other_container(name: str) -> subprocess.Popen:
        """Someone else's container: a process registered under ``name``."""
        proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        others.append(proc)
        (root / "containers").mkdir(parents=True, exist_ok=True)
        (root / "containers" / name).write_text(str(proc.pid))
        return proc

    yield calls, other_container
    for proc in others:
        proc.kill()
        proc.wait()


def deployment(tmp_path, names=("coder", "general")) -> Path:
    ports: list[int] = []
    while len(ports) < len(names):
        port = free_port()
        if port not in ports:
            ports.append(port)
    models = "".join(
        f"  - {{name: {n}, model: qwen2.5-7b, served_model_name: {n}, port: {p}, "
        f"env: {{VLLM_LOGGING_LEVEL: INFO}}, needs: {{min_context: 4096, min_seqs: 2}}}}\n"
        for n, p in zip(names, ports, strict=True)
    )
    path = tmp_path / "boxed.yaml"
    path.write_text(f"name: boxed\ngpus: {{count: 1}}\nmodels:\n{models}")
    return path


def test_docker_run_argv_follows_the_launcher_and_compose():
    argv = instance_run_argv(
        ["serve", "Qwen/Qwen2.5-7B-Instruct", "--max-num-seqs", "4", "--host", "0.0.0.0", "--port", "8001"],
        image=IMAGE,
        name="vllm-tune-pair-coder-0a1b2c3d",
        port=8001,
        gpu_ids=(0, 1),
        deployment="pair",
        instance="coder",
        hf_cache=Path("/home/u/.cache/huggingface/hub"),
        env_keys=["VLLM_LOGGING_LEVEL", "HF_TOKEN"],
    )
    assert argv[:5] == ["docker", "run", "--rm", "--name", "vllm-tune-pair-coder-0a1b2c3d"]
    assert argv[argv.index("--gpus") + 1] == '"device=0,1"'
    assert "--ipc=host" in argv and argv[argv.index("-p") + 1] == "8001:8001"
    assert [w for w in argv if w in ("-e", "HF_TOKEN", "VLLM_LOGGING_LEVEL")] == [
        "-e",
        "HF_TOKEN",
        "-e",
        "VLLM_LOGGING_LEVEL",
    ]
    assert (
        "-v" in argv
        and argv[argv.index("-v") + 1] == "/home/u/.cache/huggingface/hub:/root/.cache/huggingface/hub"
    )
    assert "vllm-tune.deployment=pair" in argv and "vllm-tune.instance=coder" in argv
    image_at = argv.index(IMAGE)  # the image's entrypoint is `vllm serve`: the model follows the image
    assert argv[image_at + 1 :] == [
        "Qwen/Qwen2.5-7B-Instruct",
        "--max-num-seqs",
        "4",
        "--host",
        "0.0.0.0",
        "--port",
        "8001",
    ]
    a, b = container_name("pair", "coder"), container_name("pair", "coder")
    assert a != b and a.startswith("vllm-tune-pair-coder-")


def test_docker_cli_acts_on_one_name_and_reads_its_pid():
    seen = []

    def run(argv):
        seen.append(argv)
        if argv[1] == "inspect":
            return (0, "4242\n") if argv[-1] == "ours" else (1, "No such container")
        return (0, "") if argv[-1] == "ours" else (1, "No such container")

    cli = DockerCli(run)
    assert cli.stop("ours", 30) and not cli.stop("gone", 30)
    cli.remove("ours")
    assert cli.pid("ours") == 4242 and cli.pid("gone") is None
    assert seen[0] == ["docker", "stop", "--time", "30", "ours"]
    assert ["docker", "rm", "-f", "ours"] in seen
    assert DockerCli(lambda _a: (0, "0\n")).pid("stopped") is None  # docker says 0 for a stopped one


def test_up_starts_containers_status_sees_them_and_down_stops_only_them(sim, docker, tmp_path, capsys):
    calls, other_container = docker
    sim("rtx-pro-6000", time_scale=1000)
    path = deployment(tmp_path)
    # someone else's container, and a container of another vllm-tune deployment with the same models
    stranger = other_container("web-frontend")
    neighbour = other_container(container_name("other", "coder"))

    assert main(["up", str(path), "--docker-image", IMAGE, "--json", "--no-verify"]) == 0
    up = json.loads(capsys.readouterr().out)
    ours = {i["name"]: i["container"] for i in up["instances"]}
    try:
        assert set(ours) == {"coder", "general"}
        runs = [c for c in calls() if c[0] == "run"]
        assert [r[r.index("--name") + 1] for r in runs] == [ours[i["name"]] for i in up["instances"]]
        for inst, argv in zip(up["instances"], runs, strict=True):
            assert argv == inst["command"][1:]  # what was run is what the state file records
            assert argv[argv.index("--gpus") + 1] == '"device=0"' and "--ipc=host" in argv
            assert argv[argv.index("-p") + 1] == f"{inst['port']}:{inst['port']}"
            assert argv[argv.index("-v") + 1] == f"{os.environ['HF_HOME']}/hub:/root/.cache/huggingface/hub"
            assert argv[argv.index("VLLM_LOGGING_LEVEL") - 1 : argv.index("VLLM_LOGGING_LEVEL") + 1] == [
                "-e",
                "VLLM_LOGGING_LEVEL",
            ]
            served = argv[argv.index(IMAGE) + 1 :]
            assert served[0] == "Qwen/Qwen2.5-7B-Instruct" and "--kv-cache-memory-bytes" in served
            assert served[-4:] == ["--host", "0.0.0.0", "--port", str(inst["port"])]
            assert Path(inst["log"]).read_text().count("Application startup complete") == 1

        assert main(["status", "boxed", "--json"]) == 0
        status = json.loads(capsys.readouterr().out)
        assert all(i["state"] == "healthy" for i in status["instances"])
        assert all(i["used_bytes"]["0"] > 0 for i in status["instances"])  # the container's processes
    finally:
        assert main(["down", "boxed", "--json"]) == 0
    down = json.loads(capsys.readouterr().out)
    assert down["instances"] == {"general": "stopped", "coder": "stopped"}
    assert down["gpu_memory"] == "released"
    touched = {c[-1] for c in calls() if c[0] in ("stop", "rm", "kill")}
    assert touched == set(ours.values())  # exactly the containers this deployment started
    assert stranger.poll() is None and neighbour.poll() is None
    assert not deployment_states().path("boxed").exists()


def test_status_and_down_follow_the_container_not_its_client(sim, docker, tmp_path, capsys):
    calls, _ = docker
    env = sim("rtx-pro-6000", time_scale=1000)
    path = deployment(tmp_path, names=("crashed", "orphan"))
    assert main(["up", str(path), "--docker-image", IMAGE, "--json", "--no-verify"]) == 0
    instances = {i["name"]: i for i in json.loads(capsys.readouterr().out)["instances"]}
    root = Path(os.environ["FAKE_DOCKER_DIR"]) / "containers"
    crashed = int((root / instances["crashed"]["container"]).read_text())
    orphan = int((root / instances["orphan"]["container"]).read_text())
    try:
        os.kill(crashed, signal.SIGKILL)  # this container died; its client exits with it
        os.kill(instances["orphan"]["pid"], signal.SIGKILL)  # this client died; its container runs on
        for pid in (instances["crashed"]["pid"], instances["orphan"]["pid"]):
            os.waitpid(pid, 0)
        assert main(["status", "boxed", "--json"]) == 2
        states = {i["name"]: i["state"] for i in json.loads(capsys.readouterr().out)["instances"]}
        assert states == {"crashed": "dead", "orphan": "healthy"}
        assert main(["down", "boxed", "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["instances"] == {
            "orphan": "stopped",
            "crashed": "already gone",
        }
        assert ["stop", "--time", "30", instances["crashed"]["container"]] in calls()
        assert not Path(f"/proc/{orphan}").exists() or _zombie(orphan)
    finally:
        for pid in (crashed, orphan):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert env.state_dir.is_dir()


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0] in ("Z", "X")
    except OSError:
        return True


def test_docker_image_without_docker_is_one_line(sim, tmp_path, monkeypatch, capsys):
    sim("rtx-pro-6000")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert main(["up", str(deployment(tmp_path)), "--docker-image", IMAGE]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "vllm-tune: error: docker not found; install docker, or run vLLM locally with --vllm-cmd"
    assert not deployment_states().path("boxed").exists()


def test_tune_with_docker_runs_every_trial_and_instance_as_a_container(sim, docker, tmp_path, capsys):
    calls, _ = docker
    sim("rtx-pro-6000", time_scale=1000, gpus=[{"name": "NVIDIA RTX PRO 6000", "total_gib": 22}])
    path = deployment(tmp_path, names=("solo",))
    assert main(["up", str(path), "--tune", "--docker-image", IMAGE, "--json", "--no-verify"]) == 0
    up = json.loads(capsys.readouterr().out)
    try:
        (inst,) = up["instances"]
        runs = [c for c in calls() if c[0] == "run" and "--entrypoint" not in c]
        trials, started = runs[:-1], runs[-1]
        assert len(trials) == up["tuned"]["solo"]["launches"] >= 1
        for argv in trials:  # find's trials: launch.DockerLauncher, port on loopback, removed after
            name = argv[argv.index("--name") + 1]
            assert argv[argv.index("-p") + 1].startswith("127.0.0.1:") and IMAGE in argv
            assert ["rm", "-f", name] in calls()
        assert started == inst["command"][1:] and inst["container"] in started
        served = started[started.index(IMAGE) + 1 :]
        winner = up["tuned"]["solo"]["winner"]
        assert served[served.index("--max-num-seqs") + 1] == str(winner["max_num_seqs"])
        assert served[served.index("--kv-cache-memory-bytes") + 1] == str(winner["kv_bytes"])
    finally:
        assert main(["down", "boxed", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["instances"] == {"solo": "stopped"}


def test_a_phase_switch_starts_containers_of_the_recorded_image(sim, docker, tmp_path, capsys):
    calls, _ = docker
    sim("rtx-pro-6000", time_scale=1000)
    a, b = free_port(), free_port()
    path = tmp_path / "phased.yaml"
    path.write_text(
        "name: phased\ngpus: {count: 1}\nphases: [first, second]\nmodels:\n"
        f"  - {{name: one, model: qwen2.5-7b, port: {a}, phase: first, needs: {{min_context: 4096}}}}\n"
        f"  - {{name: two, model: qwen2.5-7b, port: {b}, phase: second, needs: {{min_context: 4096}}}}\n"
    )
    assert main(["up", str(path), "--docker-image", IMAGE, "--json", "--no-verify"]) == 0
    capsys.readouterr()
    try:
        # no --docker-image: the deployment's own image, as its first phase was started
        assert main(["up", str(path), "--phase", "second", "--json", "--no-verify"]) == 0
        switched = json.loads(capsys.readouterr().out)
        (two,) = [i for i in switched["instances"] if i["name"] == "two"]
        assert two["container"].startswith("vllm-tune-phased-two-")
        runs = [c for c in calls() if c[0] == "run"]
        assert [r[r.index("--name") + 1].rsplit("-", 1)[0] for r in runs] == [
            "vllm-tune-phased-one",
            "vllm-tune-phased-two",
        ]
        assert all(IMAGE in r for r in runs)
    finally:
        assert main(["down", "phased", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["gpu_memory"] == "released"
