import pytest

from vllm_tuner.errors import UsageError
from vllm_tuner.units import GIB, MIB, format_duration, parse_duration, parse_size


@pytest.mark.parametrize(
    "text,seconds",
    [("90", 90), ("90s", 90), ("30m", 1800), ("1h", 3600), ("1h30m", 5400), ("250ms", 0.25), ("1.5h", 5400)],
)
def test_parse_duration(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "soon", "10 minutes", "-5s", "0"])
def test_parse_duration_rejects_with_the_option_name(text):
    with pytest.raises(UsageError, match="--soak"):
        parse_duration(text, option="--soak")


def test_format_duration():
    assert format_duration(12.34) == "12.3s"
    assert format_duration(600) == "10m00s"
    assert format_duration(7200) == "2h00m"


@pytest.mark.parametrize(
    "text,gib_bare,bytes_bare",
    [
        ("32GiB", 32 * GIB, 32 * GIB),
        ("32G", 32 * GIB, 32 * GIB),  # G alone is binary, as vLLM reads it
        ("32GB", 32 * 10**9, 32 * 10**9),
        ("24000MiB", 24000 * MIB, 24000 * MIB),
        ("1.5 GiB", int(1.5 * GIB), int(1.5 * GIB)),
        ("512k", 512 * 1024, 512 * 1024),
        ("80", 80 * GIB, 80),  # a bare number counts what the caller says
        (1024, 1024 * GIB, 1024),  # a number from a YAML file
    ],
)
def test_parse_size_reads_units_and_the_callers_bare_unit(text, gib_bare, bytes_bare):
    assert parse_size(text, bare=GIB) == gib_bare
    assert parse_size(text, bare=1) == bytes_bare


@pytest.mark.parametrize("value", ["big", "", "-1GiB", "1 PiB", True, -5])
def test_parse_size_refuses_what_is_no_size(value):
    with pytest.raises(ValueError):
        parse_size(value, bare=1)


def test_the_size_flags_keep_their_bare_units():
    """--gpu-memory and --headroom read a bare number as GiB; a deployment file's sizes as bytes."""
    from vllm_tuner.commands._common import _headroom_gib
    from vllm_tuner.deploy.spec import parse_size as deployment_size
    from vllm_tuner.gpus import parse_size as gpu_memory

    assert gpu_memory("80") == 80 * GIB
    assert _headroom_gib(None, None, "1.5") == 1.5
    assert _headroom_gib(None, None, "512MiB") == 0.5
    assert deployment_size("1024") == 1024
    with pytest.raises(UsageError, match="--gpu-memory"):
        gpu_memory("0")
