import pytest

from vllm_tuner.errors import UsageError
from vllm_tuner.units import format_duration, parse_duration


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
