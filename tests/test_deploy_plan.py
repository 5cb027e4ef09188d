"""The deployment file, the packing plan and the plan's text (pure: plain data, no GPU)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from vllm_tuner.deploy.costs import estimated_cost, model_costs, plan_gpus
from vllm_tuner.deploy.plan import (
    CUDA_CONTEXT_BYTES,
    GIB,
    GpuInfo,
    ModelCost,
    make_plan,
    passes_startup_check,
    startup_utilization,
)
from vllm_tuner.deploy.report import plan_json, render_plan
from vllm_tuner.deploy.spec import load_deployment, parse_deployment, parse_size
from vllm_tuner.errors import DeployError
from vllm_tuner.paths import profiles_dir

CODER = ModelCost(18 * GIB, 3 * GIB, 262144, 32768)
GENERAL = ModelCost(15 * GIB, 2 * GIB, 57344, 32768)
CARD = GpuInfo(0, "RTX PRO 6000", int(95.6 * GIB))


def deployment(models, **top):
    return parse_deployment({"name": "t", "gpus": top.pop("gpus", {"count": 1}), "models": models, **top})


def model(name, port, **kw):
    return {"name": name, "model": f"org/{name}", "port": port, **kw}


def two_models(coder_seqs=4):
    return deployment(
        [
            model("coder", 8001, needs={"min_context": 32768, "min_seqs": coder_seqs}),
            model("general", 8002, needs={"min_context": 16384, "min_seqs": 4, "objective": "context"}),
        ]
    )


# ------------------------------------------------------------------------------------------------ spec


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (
            lambda d: d["models"][1].update(port=8001),
            "models[1] (general).port: 8001 is already used by 'coder'",
        ),
        (lambda d: d["models"][0].update(flags=["--gpu-memory-utilization", "0.5"]), "is set by the plan"),
        (lambda d: d["models"][0].update(flags={"max-model-len": 4096}), "use needs.min_context instead"),
        # planned flags in every shape vLLM reads
        (lambda d: d["models"][0].update(flags=["-tp", "2"]), "--tensor-parallel-size is set by the plan"),
        (lambda d: d["models"][0].update(flags=["--max_model_len=4096"]), "use needs.min_context instead"),
        (
            lambda d: d["models"][0].update(needs={"objective": "speed"}),
            "needs.objective: 'speed' is not an objective",
        ),
        (lambda d: d["models"][0].update(gpus=[3]), "GPU 3 is not among the deployment's GPUs"),
        (lambda d: d["models"][0].update(tensor_parallel_size=2), "is 2 but the deployment has 1 GPU(s)"),
        (lambda d: d.update(headroom="lots"), "headroom: 'lots' is not a size"),
        (lambda d: d.update(colour="red"), "colour: unknown key"),
        (lambda d: d["models"][0].pop("port"), "models[0].port: is missing"),
    ],
)
def test_invalid_files_name_the_key_and_the_fix(mutate, message):
    data = {"name": "t", "gpus": {"count": 1}, "models": [model("coder", 8001), model("general", 8002)]}
    mutate(data)
    with pytest.raises(DeployError) as err:
        parse_deployment(data, source="d.yaml")
    assert message in str(err.value)
    assert err.value.fix
    assert "\n" not in str(err.value)


def test_flags_mapping_becomes_argv_words():
    d = deployment(
        [
            model(
                "a",
                8001,
                flags={
                    "enable-prefix-caching": True,
                    "quantization": "awq",
                    "enforce_eager": False,
                    "hf-overrides": {"a": 1},
                    "compilation_config.cudagraph_mode": "PIECEWISE",
                },
            )
        ]
    )
    assert d.models[0].flags == (
        "--enable-prefix-caching",
        "--quantization",
        "awq",
        "--no-enforce-eager",
        "--hf-overrides",
        '{"a":1}',
        "--compilation-config.cudagraph_mode",  # vLLM keeps a dotted key's own spelling
        "PIECEWISE",
    )


@pytest.mark.parametrize(
    ("flags", "eager"),
    [
        (["--enforce-eager"], True),
        (["--enforce_eager"], True),
        (["--enforce-eager", "--no-enforce-eager"], False),
    ],
)
def test_the_estimate_of_a_model_sees_its_eager_flag_as_vllm_reads_it(flags, eager):
    seen = []

    def estimate_fn(spec, total, config, **_):
        seen.append(config.enforce_eager)
        return SimpleNamespace(
            non_torch_bytes=0,
            activation_bytes=0,
            cudagraph_bytes=0,
            weights_bytes=GIB,
            kv_bytes_per_token=1,
            derived_max_model_len=4096,
        )

    entry = deployment([model("b", 8001, flags=flags)]).models[0]
    spec = SimpleNamespace(derived_max_model_len=4096, serve_name="m")
    estimated_cost(entry, 80 * GIB, resolve=lambda _: spec, estimate_fn=estimate_fn)
    assert seen == [eager]


def test_sizes():
    assert parse_size("96GiB") == 96 * GIB
    assert parse_size("1.5 GiB") == int(1.5 * GIB)
    assert parse_size("24GB") == 24 * 10**9
    assert parse_size(1024) == 1024
    with pytest.raises(ValueError):
        parse_size("big")


@pytest.mark.parametrize(
    "name", ["coder-general-96gb", "rag-16gb-phased", "four-7b-on-2-gpus", "pair-7b-96gb"]
)
def test_bundled_examples_parse(name):
    d = load_deployment(profiles_dir() / "deployments" / f"{name}.yaml")
    assert d.name == name and d.models


# ------------------------------------------------------------------------------------------------ plan


def test_two_models_share_a_card_with_absolute_kv_and_startup_checked_utilization():
    plan = make_plan(two_models(), [CARD], {"coder": CODER, "general": GENERAL})
    assert plan.fits, plan.problems
    coder, general = plan.start_order()
    assert (coder.name, general.name) == ("coder", "general")  # largest first
    used = 0
    for inst in (coder, general):
        # vLLM's check at this instance's turn: free after everything before it and its own context
        free_at_check = CARD.total_bytes - used - CUDA_CONTEXT_BYTES
        assert inst.free_at_start_bytes == free_at_check
        assert passes_startup_check(inst.gpu_memory_utilization, CARD.total_bytes, free_at_check)
        # the utilization covers the instance's own share, so it can also be restarted alone
        assert inst.gpu_memory_utilization * CARD.total_bytes >= inst.footprint_bytes - CUDA_CONTEXT_BYTES
        used += inst.footprint_bytes
    assert general.gpu_memory_utilization < coder.gpu_memory_utilization
    assert CARD.total_bytes - used >= plan.deployment.headroom_bytes  # headroom kept
    assert coder.max_model_len == 32768 and coder.max_num_seqs >= 4
    assert general.max_num_seqs == 4 and general.max_model_len >= 16384  # context objective
    args = coder.serve_args()
    assert args[args.index("--kv-cache-memory-bytes") + 1] == str(coder.kv_bytes)
    assert args[-2:] == ["--port", "8001"]


def test_memory_table_matches_the_instances():
    plan = make_plan(two_models(), [CARD], {"coder": CODER, "general": GENERAL})
    (budget,) = plan.budgets()
    assert [r.name for r in budget.rows] == ["coder", "general"]
    assert budget.planned_bytes == sum(i.footprint_bytes for i in plan.instances)
    assert budget.free_bytes >= 0
    text = render_plan(plan)
    assert "GPU 0  RTX PRO 6000  95.6 GiB" in text
    assert "headroom" in text and "--kv-cache-memory-bytes" in text
    assert plan_json(plan)["fits"] is True


def test_a_plan_that_does_not_fit_is_refused_with_numbers_and_alternatives():
    plan = make_plan(two_models(coder_seqs=12), [CARD], {"coder": CODER, "general": GENERAL})
    assert not plan.fits
    assert plan.unplaced == ("coder",)
    problem = plan.problems[0]
    assert plan.refusal("coder").reason == problem.removeprefix("coder: ") and plan.refusal("general") is None
    assert problem.startswith("coder: needs") and "GiB per GPU" in problem and "12 x 32768 tokens" in problem
    joined = " | ".join(plan.suggestions)
    assert "needs.min_seqs" in joined and "kv_cache_dtype: fp8" in joined
    assert "What would fit" in render_plan(plan)


def test_first_fit_decreasing_spreads_models_over_gpus_and_respects_pins():
    cost = ModelCost(14 * GIB, GIB, 57344, 32768)
    gpus = [GpuInfo(0, "L40S", int(44.5 * GIB)), GpuInfo(1, "L40S", int(44.5 * GIB))]
    d = deployment(
        [
            model(n, 8001 + i, needs={"min_context": 8192, "min_seqs": 4})
            for i, n in enumerate(["a", "b", "c"])
        ]
        + [model("d", 8010, gpus=[1])],
        gpus={"count": 2},
    )
    plan = make_plan(d, gpus, dict.fromkeys("abcd", cost))
    assert plan.fits, plan.problems
    assert plan.instance("d").gpu_ids == (1,)
    per_gpu = {g: [i.name for i in plan.instances if g in i.gpu_ids] for g in (0, 1)}
    assert sorted(len(v) for v in per_gpu.values()) == [2, 2]


def test_tensor_parallel_instance_takes_a_gpu_group():
    d = deployment([model("big", 8001, tensor_parallel_size=2), model("small", 8002)], gpus={"count": 2})
    costs = {"big": ModelCost(30 * GIB, GIB, 65536, 32768), "small": ModelCost(5 * GIB, GIB, 32768, 32768)}
    plan = make_plan(d, [GpuInfo(0, "g", 48 * GIB), GpuInfo(1, "g", 48 * GIB)], costs)
    assert plan.fits
    assert plan.instance("big").gpu_ids == (0, 1)
    assert plan.instance("big").config.tensor_parallel_size == 2


def test_phases_never_co_reside_and_each_fits_with_the_always_on_models():
    d = load_deployment(profiles_dir() / "deployments" / "rag-16gb-phased.yaml")
    gpus, offline = plan_gpus(d.gpus)
    plan = make_plan(d, gpus, model_costs(d, gpus[0].total_bytes), offline=offline)
    assert plan.fits, plan.problems
    assert plan.phases == ("embed", "rerank", "generate")
    for phase in plan.phases:
        (budget,) = plan.budgets(phase)
        assert [r.name for r in budget.rows] == [m.name for m in d.models if m.phase == phase]
        assert budget.free_bytes >= 0
    assert [i.name for i in plan.start_order()] == ["embedder"]


def test_other_processes_on_the_card_lower_the_utilization():
    busy = GpuInfo(0, "RTX PRO 6000", CARD.total_bytes, used_bytes=10 * GIB)
    plan = make_plan(two_models(), [busy], {"coder": CODER, "general": GENERAL})
    assert plan.fits
    first = plan.start_order()[0]
    assert first.free_at_start_bytes == busy.total_bytes - 10 * GIB - CUDA_CONTEXT_BYTES


def test_startup_utilization_rounds_up_but_never_past_free_memory():
    total = 100 * GIB
    assert startup_utilization(int(40.2 * GIB), total, 90 * GIB) == 0.41
    assert startup_utilization(int(40.2 * GIB), total, int(40.5 * GIB)) == 0.40  # clamped to the free floor
    assert passes_startup_check(0.40, total, math.ceil(0.40 * total))
    assert not passes_startup_check(0.41, total, int(0.40 * total))


def test_estimator_costs_for_bundled_models():
    pytest.importorskip("vllm_tuner.estimate")
    d = load_deployment(profiles_dir() / "deployments" / "coder-general-96gb.yaml")
    gpus, offline = plan_gpus(d.gpus)
    costs = model_costs(d, gpus[0].total_bytes, gpu_name=gpus[0].name)
    assert costs["coder"].source == "estimate" and costs["coder"].weights_bytes > 10 * GIB
    plan = make_plan(d, gpus, costs, offline=offline)
    assert plan.fits, plan.problems
    assert plan.instance("coder").config.model == "Qwen/Qwen2.5-Coder-32B-Instruct-AWQ"


# ------------------------------------------------------------------------------------------ the null block

MISTRAL = ModelCost(int(13.5 * GIB), int(1.5 * GIB), 131072, 32768)  # 2 MiB per 16-token block


def usable_blocks(inst) -> int:
    """Blocks vLLM can give requests out of the planned pool: BlockPool keeps block 0 back (the null block)."""
    return inst.kv_bytes // (16 * inst.cost.kv_bytes_per_token) - 1


@pytest.mark.parametrize(
    ("objective", "min_context", "min_seqs"),
    [("context", 16384, 1), ("context", 8192, 3), ("concurrency", 32768, 1), ("fixed", 32768, 1)],
)
def test_every_planned_pool_holds_its_requests_besides_the_null_block(objective, min_context, min_seqs):
    """vLLM checks --max-model-len against the pool less one block (check_enough_kv_cache_memory), so a
    pool of exactly one request's blocks refuses: "the estimated maximum model length is 32752"."""
    d = deployment(
        [
            model("coder", 8001, needs={"min_context": 16384, "min_seqs": 8, "objective": "fixed"}),
            model(
                "general",
                8002,
                needs={"min_context": min_context, "min_seqs": min_seqs, "objective": objective},
            ),
        ]
    )
    plan = make_plan(d, [CARD], {"coder": CODER, "general": MISTRAL})
    assert plan.fits, plan.problems
    for inst in plan.instances:
        per_request = math.ceil(inst.max_model_len / 16)
        assert usable_blocks(inst) >= inst.max_num_seqs * per_request, inst.name
        assert inst.kv_bytes % (1 << 20) == 0  # whole MiB, rounded up, never cut into a block
    general = plan.instance("general")
    if (objective, min_seqs) == ("context", 1):
        assert general.max_model_len == 32768  # the spare took it to the model's maximum
        assert usable_blocks(general) == 2048  # one request of 32768 tokens, plus the null block


def test_what_would_fit_leaves_room_for_the_null_block():
    card = GpuInfo(0, "small", int(0.5 * GIB + 13.5 * GIB + 1.5 * GIB + 4 * GIB + GIB))  # 4 GiB of KV room
    d = deployment([model("general", 8002, needs={"min_context": 32768, "min_seqs": 1})])
    plan = make_plan(d, [card], {"general": MISTRAL})
    assert not plan.fits  # exactly one request's blocks: vLLM would refuse it
    joined = " | ".join(plan.suggestions)
    assert "needs.min_context 32512 at 1 seqs" in joined
