"""``up --tune``: the share each instance is tuned in, the winner carried into the plan, refusals;
then end to end through the CLI on the simulated vLLM (real ``find`` trials, real store)."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from vllm_tuner.cli import main
from vllm_tuner.deploy.plan import CUDA_CONTEXT_BYTES, GIB, MIB, GpuInfo, ModelCost, make_plan
from vllm_tuner.deploy.spec import parse_deployment
from vllm_tuner.deploy.state import deployment_states
from vllm_tuner.deploy.tune import Tuned, apply_tuning, check_fits, target_for, tune_plan, tuning_order
from vllm_tuner.errors import DeployError
from vllm_tuner.find import FindResult
from vllm_tuner.launch import free_port
from vllm_tuner.nvml import GpuMemory
from vllm_tuner.paths import default_db_path
from vllm_tuner.probe import LoadReport
from vllm_tuner.serveconfig import ServeConfig
from vllm_tuner.store import Store
from vllm_tuner.trial import TrialOutcome

TOTAL = 48 * GIB
COST = ModelCost(int(6 * GIB), GIB, 131072, 32768)  # footprint = 0.5 + 6 + 1 + KV


def deployment(models, *, phases=None, headroom="1GiB"):
    data = {"name": "pair", "gpus": {"count": 1}, "headroom": headroom, "models": models}
    if phases:
        data["phases"] = phases
    return parse_deployment(data)


def model(name, port, **extra):
    return {"name": name, "model": f"org/{name}", "port": port, **extra}


def plan_of(dep):
    return make_plan(dep, [GpuInfo(0, "card", TOTAL, used_bytes=GIB)], {m.name: COST for m in dep.models})


class Nvml:
    def __init__(self, used=GIB):
        self.used = used

    def memory(self, index):
        return GpuMemory(index, TOTAL, self.used, TOTAL - self.used)


def winner(target, *, seqs, util, kv_gib, peak_bytes, context=None, launches=2, run_id=7):
    cfg = ServeConfig(
        model=target.model,
        max_model_len=context or target.min_context,
        max_num_seqs=seqs,
        gpu_memory_utilization=util,
        extra_args=target.extra_args,
    )
    facts = {"available_kv_gib": kv_gib, "kv_cache_tokens": int(kv_gib * GIB) // 131072, "weights_gib": 6.0}
    outcome = TrialOutcome(
        cfg, "success", "stable", facts, LoadReport(ok=True, peak_used_bytes={0: peak_bytes})
    )
    return FindResult(
        target.request(),
        outcome,
        [outcome],
        launches,
        "the computed best config is proven stable",
        True,
        run_id=run_id,
    )


def nothing(target, trials=()):
    return FindResult(
        target.request(), None, list(trials), len(trials), "nothing meets the requested floor", True
    )


# ------------------------------------------------------------------------------------------ the share


def test_each_instance_is_tuned_within_its_planned_share_beside_its_neighbours():
    dep = deployment(
        [
            model(
                "coder",
                8001,
                served_model_name="coder",
                kv_cache_dtype="fp8",
                flags={"enable-prefix-caching": True},
                needs={"min_context": 16384, "min_seqs": 4},
            ),
            model("general", 8002, needs={"min_context": 8192, "min_seqs": 2, "objective": "fixed"}),
        ]
    )
    plan = plan_of(dep)
    first, second = tuning_order(plan)
    target = target_for(plan, first, {})
    assert target.util_ceiling == first.gpu_memory_utilization  # its own share of the card
    assert target.neighbours == (second.name,)
    assert target.headroom_bytes == dep.headroom_bytes + second.footprint_bytes
    request = target_for(plan, plan.instance("coder"), {}).request(max_launches=5)
    assert (request.objective, request.min_context, request.min_seqs) == ("concurrency", 16384, 4)
    assert request.extra_args == (
        "--served-model-name",
        "coder",
        "--kv-cache-dtype",
        "fp8",
        "--enable-prefix-caching",
    )
    assert request.max_launches == 5 and request.gpu_ids == (0,)
    fixed = target_for(plan, plan.instance("general"), {}).request()
    assert (fixed.objective, fixed.target_context, fixed.target_seqs) == ("targets", 8192, 2)
    # once the first is tuned, the second keeps room for what the first really holds
    tuned = {first.name: Tuned(8192, 4, 2 * GIB, 0.2, 9 * GIB, 6 * GIB)}
    assert target_for(plan, second, tuned).headroom_bytes == dep.headroom_bytes + 9 * GIB


def test_an_always_on_instance_keeps_room_for_its_largest_phase():
    dep = deployment(
        [
            model("gen", 8001, needs={"min_context": 4096, "min_seqs": 2, "objective": "fixed"}),
            model("embed", 8002, phase="a", needs={"min_context": 4096, "min_seqs": 1, "objective": "fixed"}),
            model(
                "rerank", 8003, phase="b", needs={"min_context": 8192, "min_seqs": 8, "objective": "fixed"}
            ),
        ],
        phases=["a", "b"],
    )
    plan = plan_of(dep)
    assert [i.name for i in tuning_order(plan)] == ["gen", "embed", "rerank"]  # every phase's too
    target = target_for(plan, plan.instance("gen"), {})
    assert target.neighbours == ("rerank",)
    assert target.neighbours_bytes == plan.instance("rerank").footprint_bytes
    assert target_for(plan, plan.instance("embed"), {}).neighbours == ("gen",)


# ---------------------------------------------------------------------------------- the winner carried


def test_the_winner_lands_in_the_plan_and_its_command_line():
    dep = deployment([model("coder", 8001, needs={"min_context": 8192}), model("general", 8002)])
    plan = plan_of(dep)
    nvml = Nvml()
    asked = []

    def find_one(target):
        asked.append(target)
        seqs = 9 if target.name == "coder" else 7
        return winner(target, seqs=seqs, util=0.4, kv_gib=9.5, peak_bytes=GIB + 17 * GIB)

    notes = []
    tuned = tune_plan(plan, find_one, nvml=nvml, note=notes.append)
    assert [t.name for t in asked] == [i.name for i in plan.start_order()]
    coder = tuned["coder"]
    assert (coder.max_model_len, coder.max_num_seqs, coder.gpu_memory_utilization) == (8192, 9, 0.4)
    assert coder.kv_bytes == int(9.5 * GIB) // MIB * MIB
    assert coder.footprint_bytes == 17 * GIB  # the peak under load less what the GPU held before
    assert coder.planned["max_num_seqs"] == plan.instance("coder").max_num_seqs
    assert any(n.startswith("tuning coder (1/2) alone: GPU 0") for n in notes)
    assert Tuned.from_dict(json.loads(json.dumps(coder.as_dict()))) == coder
    with pytest.raises(DeployError, match="state file is damaged"):
        Tuned.from_dict({"winner": {"max_model_len": 1}})

    after = apply_tuning(plan, tuned)
    inst = after.instance("coder")
    args = inst.serve_args()
    assert args[args.index("--max-num-seqs") + 1] == "9"
    assert args[args.index("--kv-cache-memory-bytes") + 1] == str(coder.kv_bytes)
    assert args[args.index("--gpu-memory-utilization") + 1] == "0.4"
    assert inst.footprint_bytes == 17 * GIB and inst.cost.source == "measured"
    second = after.start_order()[1]  # free at its start follows what the first really holds
    assert second.free_at_start_bytes == TOTAL - GIB - 17 * GIB - CUDA_CONTEXT_BYTES
    assert apply_tuning(plan, {k: v.as_dict() for k, v in tuned.items()}) == after  # as the state keeps it


def test_nothing_stable_is_one_line_naming_the_instance_and_what_would_help():
    dep = deployment([model("coder", 8001, needs={"min_context": 8192, "min_seqs": 8, "objective": "fixed"})])
    plan = plan_of(dep)
    calls = []

    def find_one(target):
        calls.append(target.name)
        booted = TrialOutcome(
            ServeConfig(model="m", max_model_len=8192, max_num_seqs=8, gpu_memory_utilization=0.3),
            "success",
            "unstable",
            {"kv_cache_tokens": 8 * 8192 + 16},  # vLLM counts its null block in the pool's tokens
            LoadReport(headroom_bytes={0: target.headroom_bytes - 2 * 8192 * 131072}),
        )
        return nothing(target, [booted])

    with pytest.raises(DeployError) as err:
        tune_plan(plan, find_one, nvml=Nvml())
    text = str(err.value)
    assert "nothing stable for coder within its share" in text and "\n" not in text
    assert "went 2.0 GiB past its share" in text
    assert "needs.min_seqs 6 (at 8192 tokens)" in text and "kv_cache_dtype: fp8" in text


def test_pipeline_parallel_instances_are_refused_before_any_search():
    dep = deployment([model("big", 8001)])
    plan = plan_of(dep)
    entry = plan.instances[0].entry
    pp = replace(
        plan, instances=(replace(plan.instances[0], entry=replace(entry, pipeline_parallel_size=2)),)
    )
    with pytest.raises(DeployError, match="pipeline_parallel_size 2"):
        tune_plan(pp, lambda _t: pytest.fail("find must not run"), nvml=Nvml())


def test_tuned_footprints_that_overflow_the_card_are_refused():
    plan = plan_of(deployment([model("a", 8001), model("b", 8002)]))
    big = {n: Tuned(8192, 1, GIB, 0.5, 24 * GIB, 6 * GIB) for n in ("a", "b")}
    with pytest.raises(DeployError, match="after tuning, .* hold 48.0 GiB on GPU 0"):
        check_fits(apply_tuning(plan, big))


# -------------------------------------------------------------------------------- end to end, simulated


def sim_file(tmp_path, models: str, name="sim-pair") -> str:
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"name: {name}\ngpus: {{count: 1}}\nheadroom: 1GiB\nmodels:\n{models}")
    return str(path)


def ports(n):
    out = []
    while len(out) < n:
        p = free_port()
        if p not in out:
            out.append(p)
    return out


def test_two_models_on_one_card_are_tuned_then_started_with_the_winners(sim, capsys):
    env = sim("rtx-pro-6000", time_scale=1000, gpus=[{"name": "NVIDIA RTX PRO 6000", "total_gib": 44}])
    a, b = ports(2)
    path = sim_file(
        _tmp(env),
        f"  - {{name: coder, model: qwen2.5-7b, served_model_name: coder, port: {a}, "
        f"needs: {{min_context: 8192, min_seqs: 2}}}}\n"
        f"  - {{name: general, model: qwen2.5-7b, served_model_name: general, port: {b}, "
        f"needs: {{min_context: 4096, min_seqs: 2}}}}\n",
    )
    assert main(["up", path, "--tune", "--json", "--vllm-cmd", env.vllm_cmd]) == 0
    up = json.loads(capsys.readouterr().out)
    try:
        assert set(up["tuned"]) == {"coder", "general"}
        for inst in up["instances"]:
            tuned = inst["tuned"]["winner"]
            argv = inst["command"]
            assert argv[argv.index("--max-num-seqs") + 1] == str(tuned["max_num_seqs"])
            assert argv[argv.index("--max-model-len") + 1] == str(tuned["max_model_len"])
            assert argv[argv.index("--kv-cache-memory-bytes") + 1] == str(tuned["kv_bytes"])
            assert inst["tuned"]["launches"] >= 1 and inst["tuned"]["run_id"] is not None
        held = 0
        for t in up["tuned"].values():
            planned, won = t["planned"], t["winner"]
            assert won["kv_bytes"] != planned["kv_bytes"]  # measured by vLLM, not estimated
            assert won["gpu_memory_utilization"] <= planned["gpu_memory_utilization"]  # within its share
            held += won["footprint_bytes"]
        assert held + GIB <= 44 * GIB  # both at their peaks under load, plus the headroom, fit the card
        with Store.open(default_db_path()) as store:  # every trial is in the usual store
            runs = store.runs(kind="find")
            assert len(runs) == 2 and all(r.status == "done" and r.trial_count >= 1 for r in runs)
        assert main(["status", "sim-pair", "--json"]) == 0
        status = json.loads(capsys.readouterr().out)
        planned = {i["name"]: i["tuned"]["winner"]["footprint_bytes"] for i in up["instances"]}
        for inst in status["instances"]:
            assert inst["state"] == "healthy" and inst["planned_bytes"] == planned[inst["name"]]
        assert main(["emit", path, "--tuned"]) == 0  # the script starts the winners, not the plan's guesses
        script = capsys.readouterr().out
        for inst in up["instances"]:
            won = inst["tuned"]["winner"]
            assert f"--kv-cache-memory-bytes {won['kv_bytes']}" in script
            assert f"--max-num-seqs {won['max_num_seqs']}" in script
        assert main(["emit", path]) == 0
        assert f"--kv-cache-memory-bytes {won['kv_bytes']}" not in capsys.readouterr().out
        assert main(["emit", "sim-pair", "--tuned"]) == 0  # by the running deployment's name
        assert capsys.readouterr().out == script
        assert main(["emit", "no-such-deployment"]) == 2
        assert "is neither a deployment file nor a running deployment" in capsys.readouterr().err
    finally:
        assert main(["down", "sim-pair", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["gpu_memory"] == "released"
    assert main(["emit", path, "--tuned"]) == 2  # 'down' took the tuned numbers with it
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "no running deployment named 'sim-pair'" in error
    assert f"vllm-tune up {path} --tune" in error


def test_an_instance_with_nothing_stable_in_its_share_is_refused_and_nothing_starts(sim, capsys):
    # the 8B model grows 6 GiB under full KV use: at its fixed share it would eat its neighbour's memory
    env = sim(
        "rtx-pro-6000", time_scale=1000, models={"meta-llama/Llama-3.1-8B-Instruct": {"runtime_spike_gib": 6}}
    )
    a, b = ports(2)
    path = sim_file(
        _tmp(env),
        f"  - {{name: big, model: llama-3.1-8b, port: {a}, "
        f"needs: {{min_context: 32768, min_seqs: 8, objective: fixed}}}}\n"
        f"  - {{name: small, model: qwen2.5-7b, port: {b}, needs: {{min_context: 8192, min_seqs: 2}}}}\n",
        name="spiky",
    )
    assert main(["up", path, "--tune", "--vllm-cmd", env.vllm_cmd]) == 2
    out = capsys.readouterr()
    error = out.err.strip().splitlines()[-1]
    assert error.startswith("vllm-tune: error: --tune found nothing stable for big within its share")
    assert "past its share" in error and "needs.min_seqs" in error
    assert "tuning big (1/2)" in out.err and "tuning small" not in out.err  # stopped at the first refusal
    assert "starting big on" not in out.err and "starting small on" not in out.err
    assert not deployment_states().path("spiky").exists()
    with Store.open(default_db_path()) as store:
        (run,) = store.runs(kind="find")
        assert run.status == "failed" and run.trial_count >= 1


def test_tune_refuses_a_running_deployment(sim, capsys, tmp_path):
    sim("rtx-pro-6000")
    path = sim_file(tmp_path, f"  - {{name: a, model: qwen2.5-7b, port: {ports(1)[0]}}}\n", name="running")
    deployment_states().path("running").parent.mkdir(parents=True)
    deployment_states().path("running").write_text(
        json.dumps({"name": "running", "source": path, "started_at": 0, "baseline_used": {}})
    )
    assert main(["up", path, "--tune"]) == 2
    assert "--tune needs the GPUs to itself" in capsys.readouterr().err
    assert main(["emit", path, "--tuned"]) == 2  # running, but started without --tune
    assert "was started without --tune" in capsys.readouterr().err


def _tmp(env):
    return env.state_dir.parent


def test_every_phase_is_tuned_up_front_and_a_phase_switch_starts_with_its_winner(sim, capsys):
    env = sim("rtx-pro-6000", time_scale=1000, gpus=[{"name": "NVIDIA RTX PRO 6000", "total_gib": 24}])
    a, b = ports(2)
    fixed = "needs: {min_context: 4096, min_seqs: 2, objective: fixed}"
    path = _tmp(env) / "phased.yaml"
    path.write_text(
        "name: phased\ngpus: {count: 1}\nphases: [embed, generate]\nmodels:\n"
        f"  - {{name: first, model: qwen2.5-7b, port: {a}, phase: embed, {fixed}}}\n"
        f"  - {{name: second, model: qwen2.5-7b, port: {b}, phase: generate, {fixed}}}\n"
    )
    assert main(["up", str(path), "--tune", "--no-verify", "--vllm-cmd", env.vllm_cmd]) == 0
    out = capsys.readouterr().out
    try:
        lines = out.splitlines()
        assert [ln.split(":")[0] for ln in lines if ln.startswith("tuned ")] == [
            "tuned first",
            "tuned second",
        ]
        assert any(ln.startswith("first ") and f":{a}" in ln for ln in lines)  # only its phase started
        assert not any(ln.startswith("second ") for ln in lines)
        assert main(["up", str(path), "--phase", "generate", "--json", "--vllm-cmd", env.vllm_cmd]) == 0
        switched = json.loads(capsys.readouterr().out)
        (inst,) = switched["instances"]
        winner = switched["tuned"]["second"]["winner"]
        assert inst["name"] == "second" and inst["tuned"]["winner"] == winner
        argv = inst["command"]
        assert argv[argv.index("--kv-cache-memory-bytes") + 1] == str(winner["kv_bytes"])
        assert argv[argv.index("--max-num-seqs") + 1] == str(winner["max_num_seqs"])
    finally:
        assert main(["down", "phased"]) == 0


def test_a_winner_whose_pool_prints_as_one_request_keeps_its_null_block():
    """vLLM prints the pool to 0.01 GiB: 4.00 GiB may have been up to 4.005 GiB. Rounded down it is
    exactly one 32768-token request of a 128 KiB/token model, which vLLM refuses (32752 fits)."""
    from vllm_tuner.deploy.tune import measured_pool_bytes

    cost = ModelCost(int(13.5 * GIB), GIB, 131072, 32768)
    kv = measured_pool_bytes(4.00, cost, 32768, 1)
    assert kv // (16 * 131072) - 1 >= 2048  # blocks besides the null block hold the request
    assert kv <= 4.005 * GIB + MIB  # never more than the printed value allows
    assert measured_pool_bytes(30.97, cost, 8192, 30) == int(30.97 * GIB) // MIB * MIB  # holds them already
