"""``vllm-tune ramp``: raise ``--gpu-memory-utilization`` step by step, soaking every step under load.

The guides' production practice, automated: start at a safe utilization, keep the server under load
for the soak, and only if it stayed healthy go up one step; stop at the first sign of trouble and fall
back to the last stable step.

One module per job: :mod:`.plan` (the request and the next step, pure), :mod:`.step` (one step's
verdict, pure), :mod:`.flags` (the ramped config from argv or a ``find --json`` file), :mod:`.loop`
(:class:`Ramp`: plan → launch → observe → decide → record → emit), :mod:`.record` (a step in the
store, both ways), :mod:`.report` (the result, the live view's line per step, the final table). The
names below are the ones the CLI and tests use.
"""

from .flags import FindFlags, config_from_args, parse_serve_command, read_find_result
from .loop import Ramp
from .plan import NextStep, RampPlan, RampRequest, Stop
from .report import RampResult, step_words, summary_table
from .step import POOL_TOO_SMALL, StepResult, judge_step, pool_shortfall

__all__ = [
    "POOL_TOO_SMALL",
    "FindFlags",
    "NextStep",
    "Ramp",
    "RampPlan",
    "RampRequest",
    "RampResult",
    "Stop",
    "StepResult",
    "config_from_args",
    "judge_step",
    "parse_serve_command",
    "pool_shortfall",
    "read_find_result",
    "step_words",
    "summary_table",
]
