"""The real-vLLM tier: the installed tuner against the CPU build of vLLM 0.32, with a tiny model.

Each test runs ``vllm-tune`` as a user would (``--device cpu``, the module form of vLLM's server) and
checks what it claims against what real vLLM printed and served. Fractions stay small (the node's RAM is
shared with this test run) and one real server runs at a time, two only in the deployment test.
Where the tier cannot run (no CPU build installed, too little memory), every test is skipped with the
reason, printed in the summary (``-rs``): a skip is never a pass.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import httpx
import pytest
from real_vllm import (
    COTENANT_GIB,
    DUMMY,
    GIB,
    NON_KV_GIB,
    TUNER,
    RealVllm,
    free_port,
    node_total_bytes,
    small_fraction,
    start_command,
    stop_group,
    tiny_llama,
    wait_healthy,
    why_not_runnable,
)

_why = why_not_runnable()
pytestmark = [
    pytest.mark.real_vllm,
    pytest.mark.timeout(600),
    pytest.mark.skipif(_why is not None, reason=f"real vLLM tier not run: {_why}"),
]

CAPTURED: list[tuple[str, Path]] = []  # (test, log): every real log the tier wrote, for diagnose at the end


@pytest.fixture
def real(tmp_path, request):
    real = RealVllm(home=tmp_path / "home")
    yield real
    test = request.node.name.removeprefix("test_").replace("[", "-").replace("]", "")
    CAPTURED.extend((test, log) for log in real.captured)
    try:
        real.assert_nothing_left()
    finally:
        real.close()


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return str(tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny-llama"))


def _kv_tokens_in(log: Path) -> int:
    match = re.search(r"CPU KV cache size: ([\d,]+) tokens", log.read_text(errors="replace"))
    assert match, f"no KV cache size in {log}"
    return int(match.group(1).replace(",", ""))


def test_find_converges_and_its_command_serves_on_its_own(real, model, tmp_path):
    done = real.tune(
        "find", "--model", model, "--context", "2048", "--seqs", "4", "--util-ceiling", str(small_fraction()), "--json",
        "--", *DUMMY,
    )  # fmt: skip
    result = json.loads(done.stdout)
    assert result["stable"], result["explanation"]
    assert result["launches"] <= 2
    winner = [t for t in result["trials"] if t["verdict"] == "stable"][-1]
    # the KV pool the tuner reports is the one real vLLM printed
    assert winner["facts"]["kv_cache_tokens"] == _kv_tokens_in(Path(winner["log"]))
    assert winner["facts"]["available_kv_gib"] > 0
    command = result["command"]
    assert "VLLM_TARGET_DEVICE=cpu" in command and "-m vllm.entrypoints.openai.api_server --model" in command
    assert "--max-model-len 2048 --max-num-seqs 4" in command
    real.assert_nothing_left()

    # the printed command, pasted as it is, serves a real completion
    port = free_port()
    server = start_command(command, real, port, tmp_path / "pasted.log")
    try:
        wait_healthy(f"http://127.0.0.1:{port}", server)
        reply = httpx.post(
            f"http://127.0.0.1:{port}/v1/completions",
            json={"model": model, "prompt": [1, 2, 3, 4, 5], "max_tokens": 5},
            timeout=60,
        )
        assert reply.status_code == 200, reply.text
        assert reply.json()["usage"]["completion_tokens"] == 5
    finally:
        stop_group(server)
    real.captured.append(tmp_path / "pasted.log")


def _trial_log_number(trial: dict, pattern: str) -> float:
    match = re.search(pattern, Path(trial["log"]).read_text(errors="replace"))
    assert match, f"{pattern!r} not in {trial['log']}"
    return float(match.group(1).replace(",", ""))


def test_a_context_vllm_cannot_hold_is_cut_to_what_vllm_says_it_holds(real, tmp_path):
    # The estimate is right on this node, so the test makes it wrong the way a user's environment can:
    # the legacy VLLM_CPU_KVCACHE_SPACE=1 (vLLM's CPU docs teach it) fixes the pool at 1 GiB behind the
    # tuner's back, while the ceiling's fraction would give about 2 GiB. 128 KiB of KV a token (32
    # layers, 8 KV heads of 128) and a 1M native context: 1 GiB holds ~8K tokens, which real vLLM says in
    # "the estimated maximum model length is N" when the first launch asks for ~16K.
    model = str(tiny_llama(tmp_path / "long", max_len=1 << 20, layers=32, kv_heads=8, heads=8, head_dim=128))
    total_gib = node_total_bytes() / GIB
    ceiling = round((NON_KV_GIB + 2.0) / total_gib + 0.005, 2)
    done = real.tune(
        "find", "--model", model, "--objective", "context", "--min-seqs", "1",
        "--util-ceiling", str(ceiling), "--json", "--", *DUMMY,
        env={"VLLM_CPU_KVCACHE_SPACE": "1"},
    )  # fmt: skip
    result = json.loads(done.stdout)
    trials = result["trials"]
    refused = [i for i, t in enumerate(trials) if t["category"] == "kv_cache_insufficient_for_max_len"]
    assert refused, [t["category"] for t in trials]
    first = trials[refused[0]]
    printed = _trial_log_number(first, r"estimated maximum model length is ([\d,]+)")
    assert first["facts"]["estimated_max_model_len"] == printed
    after = trials[refused[0] + 1]
    assert after["flags"]["--max-model-len"] <= printed < first["flags"]["--max-model-len"]
    assert result["stable"]
    assert result["config"]["--max-model-len"] <= printed


def test_a_fraction_above_the_nodes_free_memory_is_refused_by_vllm_and_answered_with_a_pool_in_bytes(
    real, model, cotenant
):
    cotenant(COTENANT_GIB)  # another process holds memory, so the node's free memory is short of 0.9
    done = real.tune(
        "find", "--model", model, "--context", "2048", "--seqs", "2", "--util-ceiling", "0.9", "--json",
        "--", *DUMMY,
    )  # fmt: skip
    result = json.loads(done.stdout)
    trials = result["trials"]
    first = trials[0]
    # vLLM's processes take memory before its check, so the first fraction (capped at what was free) fails
    assert first["category"] == "startup_free_memory_below_utilization", first
    free, total = first["facts"]["free_gib"], first["facts"]["total_gib"]
    assert (free, total) == (
        _trial_log_number(first, r"Available memory on node \d+ \(([\d.]+)/"),
        _trial_log_number(first, r"Available memory on node \d+ \([\d.]+/([\d.]+) GiB\)"),
    )
    # the node is as busy as before; the next launch gives vLLM the pool the goal needs in bytes (no
    # fraction, so vLLM's default 0.92 of the node, more than is free: vLLM skips that check, as its source says)
    second = trials[1]
    pool = second["flags"]["--kv-cache-memory-bytes"]
    assert "--gpu-memory-utilization" not in second["flags"]
    log = Path(second["log"]).read_text(errors="replace")
    assert "on startup is less than" not in log
    assert _trial_log_number(second, r"Explicitly set \(([\d.]+)/[\d.]+\) GiB for KV cache on node") == round(
        pool / GIB, 2
    )
    tokens = _kv_tokens_in(Path(second["log"]))
    assert 2 * 2048 <= tokens < 4 * 2048  # the goal's pool, not the node's free memory
    assert result["stable"] and second["verdict"] == "stable", result["explanation"]
    assert f"--kv-cache-memory-bytes {pool}" in result["command"]
    assert "--gpu-memory-utilization" not in result["command"]
    (line,) = [x for x in result["explanation"] if x.startswith("--kv-cache-memory-bytes")]
    assert f"only {free} of {total} GiB free" in line and "0.00 GiB" not in line  # a tiny pool in MiB


def test_a_flag_the_installed_vllm_does_not_know_is_refused_before_any_launch(real, model):
    done = real.tune(
        "find", "--model", model, "--context", "2048", "--seqs", "1", "--", "--no-such-flag", ok=(2,)
    )
    assert "does not know --no-such-flag" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert not list((real.home / "logs").rglob("trial-*.log"))


def test_device_cpu_with_a_gpu_build_of_vllm_is_refused_in_one_line(real, model, tmp_path):
    fake = tmp_path / "python"  # a "vLLM" whose interpreter says it is the GPU build
    fake.write_text('#!/bin/sh\necho "vllm-about 0.33.0 vllm"\n')
    fake.chmod(0o755)
    done = real.tune(
        "find", "--model", model, "--vllm-cmd", f"{fake} -m vllm.entrypoints.openai.api_server", "--context", "2048", "--seqs", "1",
        ok=(2,),
    )  # fmt: skip
    assert "--device cpu needs a CPU build of vLLM" in done.stderr
    assert "Traceback" not in done.stderr


def test_the_tuner_stopped_mid_trial_leaves_no_vllm_and_the_next_run_works(real, model):
    # Ctrl-C, then SIGKILL of a second run, each mid-trial; one complete run after both
    args = ("find", "--model", model, "--context", "2048", "--seqs", "2", "--util-ceiling", str(small_fraction()),
            "--json", "--", *DUMMY)  # fmt: skip
    # the stopped runs keep their probe going long after the engine appears, so the signal lands mid-trial
    # however slowly a loaded machine lets this test see the engine (a one-wave probe of a tiny model can
    # end first, and the tuner then exits 0 before the signal)
    stopped = (*args[: args.index("--json")], "--probe-duration", "300s", *args[args.index("--json") :])
    for sig in (signal.SIGINT, signal.SIGKILL):
        tuner = real.start_tuner(*stopped)
        try:
            real.wait_for_process(r"VLLM::(EngineCore|Worker)", timeout_s=180)
            assert tuner.poll() is None, "the tuner ended before it could be stopped mid-trial"
            tuner.send_signal(sig)
            signalled = time.monotonic()
            try:
                _out, err = tuner.communicate(timeout=90)
            except subprocess.TimeoutExpired:
                tuner.send_signal(signal.SIGABRT)  # PYTHONFAULTHANDLER: every thread's stack on stderr
                try:
                    _out, err = tuner.communicate(timeout=20)
                except subprocess.TimeoutExpired:
                    tuner.kill()
                    _out, err = tuner.communicate()
                raise AssertionError(
                    f"the tuner did not end within 90 s of {sig.name}:\n{err[-8000:]}"
                ) from None
            print(f"{sig.name}: the tuner ended {time.monotonic() - signalled:.1f} s after the signal")
        finally:
            if tuner.poll() is None:
                tuner.kill()
                tuner.communicate()
        if sig == signal.SIGINT:
            assert tuner.returncode == 130
            if "so the tuner exits now" in err:  # its stop hung past the CLI's deadline: the reapers end vLLM
                stacks = Path(err.rsplit("(stacks in ", 1)[1].split(")")[0])
                warnings.warn(
                    f"the tuner's stop hung after SIGINT; its threads then:\n{stacks.read_text()}",
                    stacklevel=1,
                )
            else:
                assert "every vLLM it started has been stopped" in err
        else:
            assert tuner.returncode == -signal.SIGKILL
        real.assert_nothing_left(within_s=45)  # API server, engine core, worker: the whole tree
    result = json.loads(real.tune(*args).stdout)
    assert result["stable"]


def test_ramp_two_steps_reads_real_metrics(real, model):
    start = small_fraction()
    top = round(start + 0.01, 2)
    done = real.tune(
        "ramp", "--model", model, "--max-model-len", "2048", "--max-num-seqs", "4",
        "--start", str(start), "--step", "0.01", "--ceiling", str(top), "--soak", "10s", "--json",
        "--", *DUMMY,
    )  # fmt: skip
    result = json.loads(done.stdout)
    soaked = [s for s in result["steps"] if s["phase"] == "soak"]
    assert [s["utilization"] for s in soaked] == [start, top]
    for step in soaked:
        assert step["verdict"] == "pass", step
        assert step["kv_cache_tokens"] > 0
        assert step["max_kv_usage"] is not None and 0 < step["max_kv_usage"] <= 1  # vllm:kv_cache_usage_perc
        assert step["preemptions"] == 0  # vllm:num_preemptions_total
        assert step["requests"] > 0 and step["errors"] == 0
    assert "VLLM_TARGET_DEVICE=cpu" in result["command"]


def test_diagnose_reads_every_real_log_the_tier_captured(tmp_path):
    logs = [(test, p) for test, p in CAPTURED if p.exists()]
    if not logs:
        pytest.skip("no real log was captured (the tests above did not run)")
    capture = os.environ.get("VLLM_TUNE_CAPTURE_LOGS")  # a folder: keep them (tests/data/logs/real/)
    for test, log in logs:
        done = subprocess.run(
            [str(TUNER), "diagnose", str(log), "--json"], capture_output=True, text=True, timeout=60
        )
        assert done.returncode in (0, 1), done.stderr
        diagnosis = json.loads(done.stdout)
        text = log.read_text(errors="replace")
        if "Application startup complete" in text:
            # a server that served and was stopped by the tuner is a stop, not a death
            assert diagnosis["category"] == "success", (log, diagnosis)
            assert diagnosis["facts"]["kv_cache_tokens"] == _kv_tokens_in(log)
        if capture:
            target = Path(capture) / f"{test}--{log.parent.name[:24]}--{log.name}"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text)


@pytest.fixture
def cotenant():
    """``cotenant(gib)``: a process that holds ``gib`` of the node's memory until the test ends."""
    held: list[subprocess.Popen] = []

    def hold(gib: float) -> None:
        code = (
            "import sys, time\n"
            f"b = bytearray({int(gib * GIB)})\n"
            "for i in range(0, len(b), 4096): b[i] = 1\n"
            "print('held', flush=True)\n"
            "time.sleep(600)\n"
        )
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        held.append(proc)
        assert proc.stdout.readline().strip() == "held"

    yield hold
    for proc in held:
        proc.kill()
        proc.wait()
        proc.stdout.close()


def test_up_status_down_of_two_models_on_the_cpu(real, tmp_path):
    dummy = "{load-format: dummy, skip-tokenizer-init: true, optimization-level: '0'}"
    models = []
    for name in ("coder", "general"):
        path = tiny_llama(tmp_path / name)
        models.append(
            f"  - name: {name}\n    model: {path}\n    port: {free_port()}\n"
            f"    needs: {{min_context: 2048, min_seqs: 2, objective: context}}\n    flags: {dummy}\n"
        )
    deployment = tmp_path / "two-on-cpu.yaml"
    deployment.write_text(
        "name: two-on-cpu\ngpus: {count: 1, device: cpu}\nheadroom: 1GiB\nmodels:\n" + "".join(models)
    )

    real.tune("up", str(deployment), "--json", timeout_s=420)
    try:
        status = json.loads(real.tune("status", "two-on-cpu", "--json").stdout)
        assert status["healthy"]
        assert [i["state"] for i in status["instances"]] == ["healthy", "healthy"]
        for inst in status["instances"]:  # real numbers: the resident memory of each server on node 0
            assert inst["used_bytes"]["0"] > 256 << 20
            assert inst["kv_usage"] is not None
        node = status["gpus"][0]
        assert node["total_bytes"] == pytest.approx(node_total_bytes(), rel=0.25)
        for inst in status["instances"]:
            reply = httpx.post(
                f"http://127.0.0.1:{inst['port']}/v1/completions",
                json={"model": str(tmp_path / inst["name"]), "prompt": [5, 6, 7], "max_tokens": 3},
                timeout=60,
            )
            assert reply.status_code == 200, reply.text
    finally:
        real.tune("down", "two-on-cpu", "--json")
    real.assert_nothing_left()
