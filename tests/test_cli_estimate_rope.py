"""``vllm-tune estimate`` past a model's own length: the context table's YaRN rows, --allow rope-scaling,
--hf-overrides, and a remedy ladder that starts with the YaRN override (the memory rows below it are computed
at the length asked for, not capped at the model's)."""

from __future__ import annotations

import json
import math

import pytest

from vllm_tuner.cli import main
from vllm_tuner.models import find_profile
from vllm_tuner.rope import extension

GLM = ["--model", "glm-4-32b-awq", "--gpu", "rtx-5090"]  # guide 000: 32,768 tokens, no RoPE scaling
KV_BYTES_PER_TOKEN = 61 * 2 * 2 * 128 * 2  # layers × (K, V) × KV heads × head_dim × bf16: 62,464 B


def run_json(capsys, *args: str) -> dict:
    assert main(["estimate", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_the_context_table_has_the_guides_32k_64k_128k_rows_with_verdicts(capsys):
    data = run_json(capsys, *GLM)
    rows = {r["context"]: r for r in data["contexts"]}
    assert list(rows) == [8192, 32768, 65536, 131072]
    assert rows[32768]["rope"] is None
    assert rows[65536]["rope"]["factor"] == 2.0 and rows[131072]["rope"]["factor"] == 4.0
    for n, row in rows.items():  # vLLM's KV per request: whole blocks of 16 tokens
        assert row["kv_gib_per_seq"] == round(math.ceil(n / 16) * 16 * KV_BYTES_PER_TOKEN / (1 << 30), 3)
        assert row["verdict"] in ("fits with margin", "tight", "does not fit")
    # the guide's table: 32K safe, 64K comfortable, 128K tight on a 32 GB card
    assert rows[32768]["verdict"] == rows[65536]["verdict"] == "fits with margin"
    assert rows[131072]["verdict"] == "tight" and rows[131072]["max_concurrency"] == 1
    assert rows[131072]["rope"]["hf_overrides"] == extension(find_profile("glm-4-32b-awq"), 131072).flag_value


def test_the_text_table_names_the_positions_and_the_cost(capsys):
    assert main(["estimate", *GLM]) == 0
    out = capsys.readouterr().out
    table = out.split("Context table:", 1)[1]
    assert "positions" in table.splitlines()[1]
    assert any("65,536" in line and "YaRN ×2" in line for line in table.splitlines())
    assert "YaRN rows: vLLM takes them with --allow rope-scaling" in table and "short texts" in table


def test_a_model_whose_rope_takes_no_yarn_gets_no_rows_past_its_length(capsys):
    data = run_json(capsys, "--model", "gemma-3-12b", "--gpu", "h100")
    assert max(r["context"] for r in data["contexts"]) == 131072
    assert all(r["rope"] is None for r in data["contexts"])


def test_past_the_length_the_first_remedy_is_the_yarn_override(capsys):
    data = run_json(capsys, *GLM, "--max-model-len", "131072")
    assert not data["fits"]
    assert not any(
        "VLLM_ALLOW_LONG_MAX_MODEL_LEN=1 with" in n or "unless VLLM_ALLOW" in n for n in data["notes"]
    )
    rows = [r for r in data["remedies"] if r["step"] != "missing"]
    assert rows[0]["step"] == "YaRN ×4 (--allow rope-scaling)"
    assert rows[0]["changes"] == {
        "--hf-overrides": extension(find_profile("glm-4-32b-awq"), 131072).flag_value
    }
    assert rows[-1]["fits"] and rows[-1]["max_model_len_fit"] == 131072


def test_the_guides_utilization_needs_a_memory_row_on_top_of_yarn(capsys):
    # the guide's option 1 (--gpu-memory-utilization 0.85) shrinks the pool below one 128K request
    rows = run_json(capsys, *GLM, "--max-model-len", "131072", "--gpu-memory-utilization", "0.85")["remedies"]
    ladder = [r for r in rows if r["step"] != "missing" and not r["alternative"]]
    assert ladder[0]["step"].startswith("YaRN") and not ladder[0]["fits"]
    assert ladder[0]["max_model_len_fit"] > 32768  # computed at the YaRN length, not capped at the model's
    assert all(r["flags"]["--hf-overrides"] == ladder[0]["flags"]["--hf-overrides"] for r in ladder)
    assert ladder[-1]["fits"]


def test_allow_rope_scaling_estimates_the_extended_server(capsys):
    data = run_json(capsys, *GLM, "--max-model-len", "131072", "--allow", "rope-scaling")
    ext = extension(find_profile("glm-4-32b-awq"), 131072)
    assert data["hf_overrides"] == ext.flag_value
    assert data["derived_max_model_len"] == 131072 and data["fits"] and data["remedies"] == []
    assert main(["estimate", *GLM, "--max-model-len", "131072", "--allow", "rope-scaling"]) == 0
    out = capsys.readouterr().out
    assert "With --hf-overrides '" + ext.flag_value + "'" in out and "short texts" in out


def test_hf_overrides_are_read_as_vllm_reads_them(capsys):
    naive = json.dumps(
        {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}}
    )
    data = run_json(capsys, *GLM, "--max-model-len", "131072", "--hf-overrides", naive)
    assert data["derived_max_model_len"] == 32768 and not data["fits"]  # vLLM 0.3x does not multiply YaRN
    ext = extension(find_profile("glm-4-32b-awq"), 131072)
    assert run_json(capsys, *GLM, "--max-model-len", "131072", "--hf-overrides", ext.flag_value)["fits"]


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--hf-overrides", "{bad}"], "--hf-overrides is not valid JSON"),
        (["--allow", "rope-scaling", "--hf-overrides", "{}"], "pass one of --allow and --hf-overrides"),
        (["--model", "llama-3.1-8b", "--max-model-len", "262144", "--allow", "rope-scaling"], "llama3 ×8"),
    ],
)
def test_refusals_are_one_line(capsys, args, words):
    base = ["--gpu", "h100"] if "--model" in args else GLM
    assert main(["estimate", *base, *args]) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and "\n" not in err
