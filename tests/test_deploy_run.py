"""up / status / down against tiny real child processes standing in for vLLM, and a fake NVML that
counts what those processes claim. Every process started here is stopped before the test ends."""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
from pathlib import Path

import httpx
import pytest

from vllm_tuner.deploy.plan import GIB, GpuInfo, ModelCost, make_plan
from vllm_tuner.deploy.run import Runner, Settings, StopReport
from vllm_tuner.deploy.spec import parse_deployment
from vllm_tuner.deploy.state import StateFiles, proc_cmdline, session_pids
from vllm_tuner.deploy.status import alert_level
from vllm_tuner.errors import DeployError
from vllm_tuner.nvml import GpuMemory, GpuProcess
from vllm_tuner.probe import kv_usage_from_metrics
from vllm_tuner.procgroup import spawn_detached

FAKE_VLLM = r"""
import http.server, os, signal, sys, time
argv = sys.argv[1:]
port = int(argv[argv.index("--port") + 1])
kv = int(argv[argv.index("--kv-cache-memory-bytes") + 1])
gpu = os.environ["CUDA_VISIBLE_DEVICES"].split(",")[0]
claim = os.path.join(os.environ["FAKE_GPU_DIR"], str(os.getpid()))
print("started", time.time(), flush=True)
if str(port) in os.environ.get("FAKE_DIE_ON", "").split(","):
    print("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB", flush=True)
    sys.exit(1)
extra = dict(x.split("=") for x in os.environ.get("FAKE_EXTRA", "").split(",") if x)  # port=bytes beyond the plan
with open(claim, "w") as f:
    f.write(f"{gpu} {kv + 2 * 2**30 + int(extra.get(str(port), 0))}")
ready_at = time.time() + float(os.environ.get("FAKE_BOOT_S", "0.3"))
def bye(*_):
    os.unlink(claim)
    sys.exit(0)
signal.signal(signal.SIGTERM, bye)
class H(http.server.BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass
    def _send(self, code, body=b""):
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def do_GET(self):
        if self.path == "/health":
            ready = time.time() >= ready_at
            if ready and not getattr(H, "said", False):
                H.said = True
                print("ready", time.time(), flush=True)
            self._send(200 if ready else 503)
        elif self.path == "/metrics":
            self._send(200, b'vllm:kv_cache_usage_perc{model_name="m",engine="0"} 0.25\n')
        else:
            self._send(404)
    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if str(port) in os.environ.get("FAKE_POOLING", "").split(",") and self.path != "/v1/embeddings":
            self._send(404, b'{"detail": "Not Found"}')  # a pooling model: no completion routes
            return
        print("answered", self.path, flush=True)
        self._send(200, b'{"choices": [{"text": "hello"}]}')
http.server.ThreadingHTTPServer(("127.0.0.1", port), H).serve_forever()
"""

TOTAL = 24 * GIB


class FakeNvml:
    """Used memory = baseline + what every live fake vLLM wrote into ``claims``."""

    def __init__(self, claims: Path, baseline: int = GIB) -> None:
        self.claims, self.baseline = claims, baseline

    def _claims(self) -> list[tuple[int, int, int]]:
        out = []
        for f in self.claims.iterdir():
            pid = int(f.name)
            try:
                state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
                gpu, used = f.read_text().split()
            except (OSError, ValueError):
                continue
            if state not in ("Z", "X"):
                out.append((pid, int(gpu), int(used)))
        return out

    def memory(self, index: int) -> GpuMemory:
        used = self.baseline + sum(u for _p, g, u in self._claims() if g == index)
        return GpuMemory(index, TOTAL, used, TOTAL - used)

    def processes(self, index: int) -> list[GpuProcess]:
        return [GpuProcess(p, u) for p, g, u in self._claims() if g == index]

    def close(self) -> None:
        pass


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("VLLM_TUNE_HOME", str(tmp_path / "home"))
    claims = tmp_path / "claims"
    claims.mkdir()
    script = tmp_path / "fake_vllm.py"
    script.write_text(FAKE_VLLM)
    spawned: list[int] = []

    def spawn(argv, env_, log_path):
        pid = spawn_detached(argv, env_, log_path)
        spawned.append(pid)
        return pid

    extra = {"FAKE_GPU_DIR": str(claims)}
    settings = Settings(
        vllm_cmd=f"{sys.executable} {script}",
        env=extra,
        ready_timeout_s=15,
        poll_s=0.05,
        settle_timeout_s=5,
        release_timeout_s=5,
        stop_grace_s=5,
    )
    nvml = FakeNvml(claims)
    with httpx.Client() as http:
        runner = Runner(
            nvml=nvml, http=http, states=StateFiles(tmp_path / "deployments"), spawn=spawn, settings=settings
        )
        yield runner, nvml, extra
    for pid in spawned:  # never leave a process behind, whatever the test did
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass


def holders(nvml, state) -> list[str]:
    """The instances whose processes hold GPU 0 (vLLM runs under its reaper, in the instance's session)."""
    return [i.name for p in nvml.processes(0) for i in state.instances if p.pid in session_pids(i.pgid)]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def plan_for(names, *, total=TOTAL, phases=None, cooldown=0):
    models = [
        {
            "name": n,
            "model": f"org/{n}",
            "port": free_port(),
            "phase": (phases or {}).get(n),
            "needs": {"min_context": 4096, "min_seqs": 2, "objective": "fixed"},
        }
        for n in names
    ]
    d = parse_deployment({"name": "pair", "gpus": {"count": 1}, "cooldown": cooldown, "models": models})
    cost = ModelCost(
        int(1.5 * GIB), 0, 131072, 32768
    )  # footprint = 0.5 context + 1.5 + KV = what the fake claims
    return make_plan(d, [GpuInfo(0, "fake", total, used_bytes=GIB)], dict.fromkeys(names, cost))


def log_times(path: str) -> dict[str, float]:
    out = {}
    for line in Path(path).read_text().splitlines():
        word, _, value = line.partition(" ")
        if word in ("started", "ready"):
            out[word] = float(value)
    return out


@pytest.mark.parametrize("names", [["coder", "general"], ["embed", "rerank", "gen"]])
def test_up_starts_in_order_status_is_healthy_and_down_restores_the_gpu(env, names):
    runner, nvml, _ = env
    plan = plan_for(names)
    assert plan.fits
    report = runner.up(plan)
    assert report.started == [i.name for i in plan.start_order()]
    assert set(report.verified) == set(names)
    state = runner.states.load("pair")  # the state file and the logs are where the runner was told
    assert [i.name for i in state.instances] == report.started
    assert all(Path(i.log_path).parent == runner.states.log_dir("pair") for i in state.instances)
    times = [log_times(i.log_path) for i in state.instances]
    for before, after in zip(times, times[1:], strict=False):
        assert after["started"] >= before["ready"]  # each starts only once the one before is healthy

    status = runner.status(state)
    assert status.healthy
    assert all(i.kv_usage == 0.25 for i in status.instances)
    planned = {i.name: i.footprint_bytes for i in plan.instances}
    for inst in status.instances:  # NVML per-process usage of each instance's own session
        assert inst.used_bytes[0] == planned[inst.name]
    assert "healthy" in status.render()
    (card,) = status.gpus
    assert card.as_planned  # exactly what the plan puts there: any alert says so
    assert status.as_dict()["gpus"][0]["as_planned"] is True
    nvml.baseline += 1 << 30  # another process takes a GiB: beyond the plan
    assert not runner.status(state).gpus[0].as_planned
    nvml.baseline -= 1 << 30

    stopped = runner.stop_all(state)
    assert stopped.released == "released" and stopped.proxy is None
    assert nvml.memory(0).used == nvml.baseline  # back to what it was before up


def test_verify_loads_a_pooling_model_with_embeddings_whatever_its_flags(env):
    """An embedding model (a BERT needs no --runner flag) has no completion route: 'up' used to fail it
    with HTTP 404, or only asked /health when its flags said pooling."""
    runner, _, extra = env
    plan = plan_for(["embed", "gen"])
    extra["FAKE_POOLING"] = str(plan.instance("embed").port)
    report = runner.up(plan)
    assert report.verified == {"embed": "", "gen": ""}
    logs = {i.name: Path(i.log_path).read_text() for i in report.state.instances}
    assert "answered /v1/embeddings" in logs["embed"] and "answered /v1/completions" in logs["gen"]
    runner.stop_all(report.state)


def test_an_instance_that_dies_is_reported_by_status(env):
    runner, _, _ = env
    runner.settings.verify = False
    report = runner.up(plan_for(["coder", "general"]))
    victim = report.state.instances[1]
    os.killpg(victim.pgid, signal.SIGKILL)
    os.waitpid(victim.pid, 0)
    status = runner.status(report.state)
    assert not status.healthy
    assert {i.name: i.state for i in status.instances} == {"coder": "healthy", "general": "dead"}
    assert runner.stop_all(report.state).instances["general"] == "already gone"


def test_down_never_signals_a_process_whose_identity_changed(env):
    runner, _, _ = env
    runner.settings.verify = False
    report = runner.up(plan_for(["coder"]))
    inst = report.state.instances[0]
    real_start = inst.proc_start
    inst.proc_start = "1"  # as if the pid had been recycled by another program
    assert runner.stop_all(report.state).instances["coder"] == "already gone"
    assert Path(f"/proc/{inst.pid}").exists()
    inst.proc_start = real_start
    assert runner.stop_all(report.state).instances["coder"] == "stopped"


def test_a_failing_start_is_diagnosed_and_rolls_back(env, monkeypatch):
    runner, nvml, extra = env
    plan = plan_for(["coder", "general"])
    extra["FAKE_DIE_ON"] = str(plan.instance("general").port)
    with pytest.raises(DeployError, match="general exited while starting"):
        runner.up(plan)
    assert not runner.states.path("pair").exists()
    deadline = time.monotonic() + 5
    while nvml.memory(0).used != nvml.baseline and time.monotonic() < deadline:
        time.sleep(0.05)
    assert nvml.memory(0).used == nvml.baseline  # the healthy first one was stopped too


def test_up_refuses_when_the_card_is_busier_than_planned(env):
    runner, nvml, _ = env
    plan = plan_for(["coder", "general"])
    nvml.baseline = 22 * GIB  # someone else took the card after planning
    with pytest.raises(DeployError, match="GiB free before starting coder"):
        runner.up(plan)
    assert not runner.states.path("pair").exists()


def test_an_instance_holding_more_than_planned_is_named_as_the_cause_and_tune_suggested(env):
    runner, nvml, extra = env
    runner.settings.verify = False
    plan = plan_for(["coder", "general"])
    first = plan.start_order()[0]
    extra["FAKE_EXTRA"] = f"{first.port}={18 * GIB}"  # the estimate was 18 GiB short for the first one
    with pytest.raises(DeployError) as err:
        runner.up(plan)
    text = str(err.value)
    assert f"before starting {plan.start_order()[1].name}" in text
    assert f"{first.name} took 18.0 GiB more than the plan" in text
    assert "other processes" not in text and "nvidia-smi" not in text
    assert "--tune" in err.value.fix
    assert not runner.states.path("pair").exists()


def test_a_plan_for_a_larger_card_is_named_as_the_cause(env):
    runner, nvml, _ = env
    runner.settings.verify = False
    names = [f"m{i}" for i in range(8)]  # 3 GiB each: 24 GiB with the 1 GiB baseline
    plan = plan_for(names, total=TOTAL + 8 * GIB)  # planned for a 32 GiB card
    with pytest.raises(DeployError) as err:
        runner.up(plan)
    assert "the plan is for a 32.0 GiB GPU (fake) but GPU 0 has 24.0 GiB" in str(err.value)
    assert "more than the plan" not in str(err.value)
    assert "vllm-tune plan" in err.value.fix and "--tune" not in err.value.fix


def test_other_processes_that_grew_during_up_are_named_as_the_cause(env):
    runner, nvml, _ = env
    runner.settings.verify = False
    plan = plan_for(["coder", "general"])
    spawn = runner.spawn

    def spawn_then_a_stranger_grows(argv, env_, log_path):
        pid = spawn(argv, env_, log_path)
        nvml.baseline = 20 * GIB  # someone else took 19 GiB while the first instance started
        return pid

    runner.spawn = spawn_then_a_stranger_grows
    with pytest.raises(DeployError) as err:
        runner.up(plan)
    text = str(err.value)
    assert "other processes took 19.0 GiB since 'up' began" in text
    assert "more than the plan" not in text and "--tune" not in (err.value.fix or "")


def test_phases_switch_with_cooldown_and_report_the_switch_time(env):
    runner, nvml, _ = env
    runner.settings.verify = False
    plan = plan_for(["embed", "gen"], phases={"embed": "embed", "gen": "generate"}, cooldown=0.1)
    report = runner.up(plan)
    assert [i.name for i in report.state.instances] == ["embed"]
    switched = runner.switch_phase(plan, report.state, "generate")
    assert switched.started == ["gen"] and switched.switch_s >= 0.1
    assert [i.name for i in switched.state.instances] == ["gen"]
    assert holders(nvml, switched.state) == ["gen"]
    runner.stop_all(switched.state)


def test_a_phase_that_does_not_start_brings_the_previous_phase_back(env):
    """The switch used to leave nothing running while the state kept saying the phase was up."""
    runner, nvml, extra = env
    runner.settings.verify = False
    plan = plan_for(["embed", "gen"], phases={"embed": "embed", "gen": "generate"}, cooldown=0.05)
    report = runner.up(plan)
    first_pid = report.state.instances[0].pid
    extra["FAKE_DIE_ON"] = str(plan.instance("gen").port)
    with pytest.raises(DeployError) as err:
        runner.switch_phase(plan, report.state, "generate")
    assert "phase generate did not start: gen exited while starting" in err.value.problem
    assert err.value.problem.endswith("phase embed runs again (embed)")
    state = runner.states.load("pair")  # what the next 'status' reads
    assert state.phase == "embed" and state.planned == ["embed"]
    assert [i.name for i in state.instances] == ["embed"] and state.instances[0].pid != first_pid
    status = runner.status(state)
    assert status.healthy and status.phase == "embed"
    assert holders(nvml, state) == ["embed"]  # gen is gone, embed is back
    runner.stop_all(state)


def test_status_names_the_phase_that_runs_nothing_when_the_rollback_fails_too(env):
    runner, nvml, extra = env
    runner.settings.verify = False
    plan = plan_for(["embed", "gen"], phases={"embed": "embed", "gen": "generate"})
    report = runner.up(plan)
    extra["FAKE_DIE_ON"] = f"{plan.instance('gen').port},{plan.instance('embed').port}"
    with pytest.raises(DeployError, match="and phase embed did not start again") as err:
        runner.switch_phase(plan, report.state, "generate")
    assert "'vllm-tune status pair'" in err.value.fix and "--phase embed" in err.value.fix
    state = runner.states.load("pair")
    assert (state.phase, state.planned, state.instances) == ("embed", ["embed"], [])
    status = runner.status(state)
    assert not status.healthy
    assert [(i.name, i.state) for i in status.instances] == [("embed", "not running")]
    text = status.render()
    assert "phase embed: NOT healthy" in text and "not running" in text
    assert status.as_dict()["instances"][0]["state"] == "not running"
    assert nvml.processes(0) == []


def test_a_deployment_that_runs_nothing_is_not_healthy(env):
    runner, _, _ = env
    runner.settings.verify = False
    report = runner.up(plan_for(["coder"]))
    runner.stop_all(report.state)
    report.state.instances, report.state.planned = [], []  # a state file written before 'planned'
    assert not runner.status(report.state).healthy


def test_alert_levels_and_metrics_parsing():
    assert [alert_level(x) for x in (0.5, 0.8, 0.91, 0.97)] == ["", "warning", "major", "critical"]
    assert kv_usage_from_metrics('vllm:kv_cache_usage_perc{engine="0"} 0.5\nother 1\n') == 0.5
    assert kv_usage_from_metrics("nothing here") is None


def test_a_phase_whose_port_is_held_is_refused_before_the_running_phase_is_unloaded(env):
    runner, _, _ = env
    runner.settings.verify = False
    plan = plan_for(["embed", "gen"], phases={"embed": "embed", "gen": "generate"})
    report = runner.up(plan)
    try:
        with socket.socket() as holder:
            holder.bind(("127.0.0.1", plan.instance("gen").port))
            holder.listen()
            with pytest.raises(DeployError, match=f"port {plan.instance('gen').port} of gen cannot be bound"):
                runner.switch_phase(plan, report.state, "generate")
        assert runner.status(report.state).healthy  # embed was left running
    finally:
        runner.stop_all(report.state)


def test_down_reports_an_instance_that_died_unreaped_as_already_gone(env):
    runner, _, _ = env
    runner.settings.verify = False
    report = runner.up(plan_for(["coder", "general"]))
    victim = report.state.instances[1]
    os.killpg(
        victim.pgid, signal.SIGKILL
    )  # dead, but a zombie until its parent reaps it (as after 'up' exits)
    deadline = time.monotonic() + 5
    while Path(f"/proc/{victim.pid}/stat").read_text().rsplit(")", 1)[-1].split()[0] != "Z":
        assert time.monotonic() < deadline
        time.sleep(0.02)
    stopped = runner.stop_all(report.state)
    assert stopped == StopReport({"general": "already gone", "coder": "stopped"}, "released")
    assert list(stopped.instances) == ["general", "coder"]  # the last started stops first


def test_an_instance_runs_under_a_detached_reaper_and_down_ends_its_whole_group(env):
    runner, nvml, _ = env
    runner.settings.verify = False
    report = runner.up(plan_for(["coder"]))
    inst = report.state.instances[0]
    assert proc_cmdline(inst.pid)[1:4] == ["-m", "vllm_tuner._reaper", "detached"]
    assert (
        proc_cmdline(inst.pid)[proc_cmdline(inst.pid).index("--") + 1 :] == inst.argv
    )  # what the state records
    session = session_pids(inst.pgid)
    assert len(session) == 2 and holders(nvml, report.state) == ["coder"]  # the reaper and the vLLM it runs
    assert runner.stop_all(report.state) == StopReport({"coder": "stopped"}, "released")
    assert not session_pids(inst.pgid) and nvml.memory(0).used == nvml.baseline
