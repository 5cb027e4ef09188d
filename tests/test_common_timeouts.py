"""Under --simulate the default timeouts are simulated time; typed ones are kept."""

from __future__ import annotations

import click
from click.testing import CliRunner

from vllm_tuner.commands._common import SIM_MIN_TIMEOUT_S, RuntimeArgs, timeout_options


def _timeouts(args: list[str], *, simulate: str | None, scale: float = 200.0):
    seen = {}

    @click.command()
    @timeout_options
    def cmd(trial_timeout, stall_timeout):
        runtime = RuntimeArgs("vllm", None, None, False, simulate, scale)
        seen["t"] = runtime.timeouts(trial_timeout, stall_timeout)

    result = CliRunner().invoke(cmd, args)
    assert result.exit_code == 0, result.output
    return seen["t"]


def test_real_runs_keep_the_defaults():
    t = _timeouts([], simulate=None)
    assert (t.ready_s, t.stall_s) == (1800.0, 600.0)


def test_simulated_defaults_shrink_with_the_time_scale_but_not_below_the_floor():
    t = _timeouts([], simulate="hang", scale=20.0)
    assert (t.ready_s, t.stall_s) == (90.0, SIM_MIN_TIMEOUT_S)


def test_a_typed_timeout_is_kept_under_simulation():
    t = _timeouts(["--stall-timeout", "5s"], simulate="hang")
    assert t.stall_s == 5.0 and t.ready_s == SIM_MIN_TIMEOUT_S
