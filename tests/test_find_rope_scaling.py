"""find's rope-scaling knob: a --context or --min-context past the model's own length is served with the YaRN
override (rope.extension) when --allow rope-scaling says so, and refused in one line otherwise; the policy uses
the rung only where the floor needs it, with the other lossy knobs where memory needs them too."""

from __future__ import annotations

import json

import pytest

from vllm_tuner.cli import main
from vllm_tuner.estimate import GIB, Calibration, estimate
from vllm_tuner.models import find_profile
from vllm_tuner.ramp import config_from_args
from vllm_tuner.rope import extension
from vllm_tuner.search import LOSSY_ORDER, Finish, Launch, Policy, Request
from vllm_tuner.serveconfig import ServeConfig
from vllm_tuner.trialrecord import config_from_record as _config_from_record
from vllm_tuner.trialrecord import config_record as _config_record

SPEC = find_profile("glm-4-32b-awq")
RTX_5090 = int(31.36 * GIB)


def policy(total: int = RTX_5090, *, allow=("rope-scaling",), context=131072, **request) -> Policy:
    ext = extension(SPEC, context)
    req = Request(
        allow=frozenset(allow),
        native_max_len=SPEC.derived_max_model_len,
        rope_overrides=ext.flag_value,
        rope_max_len=ext.length,
        **request,
    )
    return Policy(
        req,
        ServeConfig(SPEC.serve_name),
        estimate=lambda cfg, cal: estimate(SPEC, total, cfg, calibration=cal),
        calibrate=Calibration.from_facts,
    )


def test_rope_scaling_comes_last_in_the_knob_order():
    assert LOSSY_ORDER[-1] == "rope-scaling"


def test_a_target_past_the_length_launches_with_the_yarn_override():
    first = policy(objective="targets", target_context=131072, target_seqs=1).next([])
    assert isinstance(first, Launch)
    assert first.config.max_model_len == 131072
    assert first.config.hf_overrides == extension(SPEC, 131072).flag_value
    assert "rope-scaling" in first.reason


def test_without_the_rung_allowed_nothing_reaches_a_target_past_the_length():
    done = policy(allow=(), objective="targets", target_context=131072, target_seqs=1).next([])
    assert isinstance(done, Finish) and done.winner is None


def test_memory_knobs_come_on_top_of_yarn_where_memory_needs_them():
    # a 24 GiB card: one 131,072-token request of bf16 KV (7.6 GiB) does not fit beside 18 GiB of weights
    small = policy(
        24 * GIB, allow=("fp8-kv", "rope-scaling"), objective="targets", target_context=131072, target_seqs=1
    )
    first = small.next([])
    assert isinstance(first, Launch)
    assert first.config.kv_cache_dtype == "fp8" and first.config.hf_overrides
    assert "fp8-kv, rope-scaling" in first.reason


def test_a_min_context_past_the_length_searches_up_to_the_yarn_length():
    first = policy(context=65536, objective="context", min_context=65536).next([])
    assert isinstance(first, Launch)
    assert first.config.max_model_len == 65536 and first.config.hf_overrides
    assert "(65536 with rope-scaling)" in policy(context=65536, min_context=65536).ladder()[1]


def test_concurrency_at_a_min_context_past_the_length_keeps_that_context():
    first = policy(context=65536, objective="concurrency", min_context=65536).next([])
    assert isinstance(first, Launch)
    assert first.config.max_model_len == 65536 and first.config.max_num_seqs >= 2


def test_the_rung_is_not_used_where_the_floor_is_within_the_length():
    req = Request(allow=frozenset({"rope-scaling"}), native_max_len=SPEC.derived_max_model_len)
    plain = Policy(
        req,
        ServeConfig(SPEC.serve_name),
        estimate=lambda cfg, cal: estimate(SPEC, RTX_5090, cfg, calibration=cal),
        calibrate=Calibration.from_facts,
    )
    first = plain.next([])
    assert isinstance(first, Launch) and first.config.hf_overrides is None
    assert first.config.max_model_len == 32768 and "rope-scaling" not in first.reason


def test_a_stored_trial_keeps_its_override_and_ramp_reads_it_back():
    ext = extension(SPEC, 131072)
    cfg = ServeConfig(SPEC.serve_name, max_model_len=131072, hf_overrides=ext.flag_value)
    assert _config_from_record(ServeConfig(SPEC.serve_name), _record(cfg)) == cfg
    assert "hf_overrides" not in _config_record(ServeConfig(SPEC.serve_name))  # old records unchanged
    read = config_from_args(SPEC.serve_name, cfg.serve_args()[2:])
    assert read.hf_overrides == ext.flag_value and read.key() == cfg.key()


def _record(cfg: ServeConfig):
    class Record:
        config = _config_record(cfg)

    return Record()


# -- the command line ------------------------------------------------------------------------------------
FIND = ["find", "--model", "glm-4-32b-awq", "--gpu-ids", "0", "--simulate", "rtx-5090"]


def one_line(capsys, code: int) -> str:
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    return err


def test_a_context_past_the_length_says_rope_scaling_and_its_cost(capsys):
    line = one_line(capsys, main([*FIND, "--context", "131072", "--seqs", "1"]))
    assert (
        "use --context 32768 or less, or --allow rope-scaling for YaRN ×4 (32,768 → 131,072 tokens)" in line
    )
    assert "short texts" in line and "VLLM_ALLOW_LONG_MAX_MODEL_LEN" not in line


def test_a_model_whose_rope_takes_no_yarn_is_refused_with_the_allow_too(capsys):
    args = [
        "find",
        "--model",
        "llama-3.1-8b",
        "--gpu-ids",
        "0",
        "--simulate",
        "h100",
        "--allow",
        "rope-scaling",
    ]
    line = one_line(capsys, main([*args, "--min-context", "262144"]))
    assert "already scaled (llama3 ×8)" in line and "use --min-context 131072 or less" in line


@pytest.mark.parametrize(
    ("context", "extra", "words"),
    [
        ("32768", '{"max_position_embeddings": 65536}', "sets max_position_embeddings"),
        ("32768", '{"text_config": {"rope_scaling": {"rope_type": "yarn"}}}', "sets rope_scaling"),
        ("131072", '{"architectures": ["Glm4ForCausalLM"]}', "would replace the YaRN override"),
    ],
)
def test_an_hf_overrides_after_the_dashes_that_would_fight_the_rung_is_refused(capsys, context, extra, words):
    args = [*FIND, "--context", context, "--seqs", "1", "--allow", "rope-scaling", "--dry-run"]
    line = one_line(capsys, main([*args, "--", "--hf-overrides", extra]))
    assert words in line


@pytest.mark.parametrize(
    "words",
    [
        ["--hf-overrides.max_position_embeddings", "65536"],
        ["--hf_overrides.text_config.rope_scaling.rope_type=yarn"],
        ['--hf-overrides={"max_position_embeddings": 65536}'],
    ],
)
def test_an_hf_overrides_in_any_shape_is_read(capsys, words):
    # vLLM merges dotted keys into one --hf-overrides JSON, and reads --hf_overrides as --hf-overrides
    args = [*FIND, "--context", "32768", "--seqs", "1", "--allow", "rope-scaling", "--dry-run"]
    line = one_line(capsys, main([*args, "--", *words]))
    assert "--hf-overrides after -- sets" in line


def test_other_hf_overrides_pass_through(capsys):
    args = [*FIND, "--context", "32768", "--seqs", "1", "--dry-run", "--"]
    assert main([*args, "--hf-overrides", '{"architectures": ["Glm4ForCausalLM"]}']) == 0


def test_dry_run_shows_the_override_in_the_first_candidate(capsys):
    args = [*FIND, "--context", "131072", "--seqs", "1", "--allow", "rope-scaling", "--dry-run", "--json"]
    assert main(args) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["first_candidate"]["--hf-overrides"] == extension(SPEC, 131072).flag_value
    assert "rope-scaling: allowed, used only if needed" in plan["ladder"]


def test_knob_order_and_allow_name_rope_scaling(capsys):
    args = [*FIND, "--context", "131072", "--seqs", "1", "--dry-run"]
    assert main([*args, "--allow", "rope-scaling", "--knob-order", "rope-scaling,offload"]) == 0
    capsys.readouterr()
    args[args.index("131072")] = "32768"
    line = one_line(capsys, main([*args, "--allow", "yarn"]))
    assert "choose from eager, fp8-kv, offload, rope-scaling" in line


def test_diagnose_of_vllms_refusal_past_the_length_points_at_yarn_not_the_env_var():
    from vllm_tuner.advice import advise
    from vllm_tuner.logparse import classify

    line = (
        "ValueError: User-specified max_model_len (131072) is greater than the derived max_model_len "
        "(max_position_embeddings=32768 or model_max_length=None in model's config.json). To allow overriding "
        "this maximum, set the env var VLLM_ALLOW_LONG_MAX_MODEL_LEN=1."
    )
    advice = advise(classify(line))
    text = next(a.text for a in advice if a.changes == {"--max-model-len": 32768})
    assert "--allow rope-scaling" in text and "short texts" in text
    assert "at your own risk" not in text and "only lifts the check" in text
