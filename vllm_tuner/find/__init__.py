"""``vllm-tune find``: the search that returns the largest stable config and a ready serve command.

One module per job: :mod:`.request` (what is asked, and the checks before any launch), :mod:`.loop`
(:class:`Finder`: plan → launch → observe → decide → record → emit), :mod:`.result` (the result and
its explanation), :mod:`.words` (the live view's words for a trial). The names below are the ones the
CLI and the other commands use.
"""

from .loop import Finder
from .request import (
    LOSSY_FLAGS,
    REQUIRED_FLAGS,
    FindRequest,
    check_gpus_free,
    check_weights_fit,
    context_guess,
    validate_request,
)
from .result import FindResult, UtilizationStep, explain, trial_json

__all__ = [
    "LOSSY_FLAGS",
    "REQUIRED_FLAGS",
    "FindRequest",
    "FindResult",
    "Finder",
    "UtilizationStep",
    "check_gpus_free",
    "check_weights_fit",
    "context_guess",
    "explain",
    "trial_json",
    "validate_request",
]
