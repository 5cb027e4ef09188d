"""The ``vllm-tune`` command line: a thin click layer and the one error boundary.

Each subcommand lives in ``vllm_tuner/commands/<module>.py`` as a click command named ``command``;
this module loads it only when that subcommand runs, so ``vllm-tune diagnose`` never imports httpx.
"""

from __future__ import annotations

import datetime as _dt
import faulthandler
import importlib
import os
import platform
import signal
import sys
import threading
import traceback
from pathlib import Path

import click

from . import __version__
from .errors import TunerError
from .paths import data_dir

# name -> (module under vllm_tuner.commands, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "estimate": ("estimate", "Estimate per-GPU memory and what context x concurrency fits."),
    "find": ("find", "Launch vLLM with candidate flags and return the largest stable config."),
    "ramp": ("ramp", "Raise --gpu-memory-utilization by 0.01 per step, soaking each step under load."),
    "diagnose": ("diagnose", "Explain a vLLM crash log and say which flag to change."),
    "history": ("history", "Show past searches, ramps and their winners."),
    "plan": ("deploy", "Plan several models on shared GPUs from a deployment file."),
    "up": ("deploy", "Start a deployment's models one after another and verify them."),
    "status": ("deploy", "Health and memory of a running deployment."),
    "down": ("deploy", "Stop what 'vllm-tune up' started."),
    "emit": (
        "deploy",
        "Write a deployment as shell, compose, systemd, Kubernetes, Helm, LiteLLM, router or Ray files.",
    ),
    "proxy": ("proxy", "One OpenAI endpoint for vLLM servers: route by model, keep chats in context."),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module_name, _help = COMMANDS[name]
        module = importlib.import_module(f"vllm_tuner.commands.{module_name}")
        attr = "command" if module_name == name else f"{name}_command"
        return getattr(module, attr)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, help_) for name, (_m, help_) in COMMANDS.items()]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="vllm-tune")
def cli() -> None:
    """Find the largest vLLM configuration that is stable on your GPUs.

    \b
    Examples:
      vllm-tune estimate --model qwen2.5-7b --gpu rtx-4090
      vllm-tune find --model qwen2.5-7b --gpus 2 --simulate rtx-5090
      vllm-tune diagnose vllm.log
    """


class Terminated(BaseException):
    """SIGTERM or SIGHUP reached the tuner: unwind like Ctrl-C so every child is stopped."""


# Ctrl-C or SIGTERM of these commands ends within INTERRUPT_DEADLINE_S. Every vLLM they start hangs off a
# reaper that ends its group when the tuner dies, and a trial's own stop takes at most ~55 s (the SIGTERM
# grace, the SIGKILL wait, a short wait for the memory): past the deadline the tuner exits and the reapers
# finish the stop. `up` is not among them: the servers it starts outlive it by design.
BOUNDED_STOP_COMMANDS = frozenset({"find", "ramp"})
INTERRUPT_DEADLINE_S = 75.0
_deadline_armed = threading.Event()


def _exit_at_deadline() -> None:
    """Past the deadline: every thread's stack into a crash log, one line, exit 130."""
    if _deadline_armed.is_set():
        return
    _deadline_armed.set()

    def expire() -> None:
        where = _NO_CRASH_LOG
        try:
            path = _crash_log_path("stop")
            with path.open("w") as out:
                out.write(
                    f"vllm-tune {__version__}: still stopping {INTERRUPT_DEADLINE_S:g}s after the signal\n"
                )
                faulthandler.dump_traceback(file=out, all_threads=True)
            where = str(path)
        except OSError:
            pass
        sys.stderr.write(
            f"vllm-tune: interrupted; stopping took over {INTERRUPT_DEADLINE_S:g}s, so the tuner exits now and "
            f"the reaper of each vLLM it started ends it (stacks in {where})\n"
        )
        sys.stderr.flush()
        os._exit(130)

    timer = threading.Timer(INTERRUPT_DEADLINE_S, expire)
    timer.daemon = True
    timer.start()


def install_interrupt_handlers(*, bounded: bool) -> None:
    """Ctrl-C raises KeyboardInterrupt and SIGTERM/SIGHUP raise :class:`Terminated`, so every ``with``
    that owns a process unwinds; ``bounded``: the unwinding gets :data:`INTERRUPT_DEADLINE_S`."""

    def interrupted(signum: int, _frame: object) -> None:
        if bounded:
            _exit_at_deadline()
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise Terminated(signum)

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, interrupted)


def _command_of(argv: list[str]) -> str | None:
    return next((word for word in argv if not word.startswith("-")), None)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; every way out goes through here. Returns the process exit code."""
    words = sys.argv[1:] if argv is None else argv
    if threading.current_thread() is threading.main_thread():
        install_interrupt_handlers(bounded=_command_of(words) in BOUNDED_STOP_COMMANDS)
    try:
        # outside standalone mode click hands back a command's ``click.exceptions.Exit`` as its code
        code = cli.main(args=argv, prog_name="vllm-tune", standalone_mode=False)
        return code if isinstance(code, int) and not isinstance(code, bool) else 0
    except TunerError as exc:
        click.echo(f"vllm-tune: error: {exc}", err=True)
        return exc.exit_code
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.ClickException as exc:  # click's own usage errors, in the same one-line form
        ctx = getattr(exc, "ctx", None)
        where = ctx.command_path if ctx is not None else "vllm-tune"
        message = exc.format_message().rstrip(".")
        click.echo(f"vllm-tune: error: {message}; see '{where} --help'", err=True)
        return 2
    except (click.Abort, KeyboardInterrupt, Terminated):  # click turns Ctrl-C into Abort
        click.echo("vllm-tune: interrupted; every vLLM it started has been stopped", err=True)
        return 130
    except Exception as exc:  # a bug: one line for the user, the traceback in a crash log
        path = _write_crash_log(exc)
        click.echo(f"vllm-tune: internal error: {exc!r}; details in {path}", err=True)
        return 3


_NO_CRASH_LOG = "<crash log could not be written>"


def _crash_log_path(kind: str) -> Path:
    """A new file under the data directory's ``crashes/``: ``crash-…`` for a bug, ``stop-…`` for a stop
    that hung past its deadline."""
    folder = data_dir() / "crashes"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{kind}-{_dt.datetime.now():%Y%m%d-%H%M%S}.log"


def _write_crash_log(exc: BaseException) -> str:
    try:
        path = _crash_log_path("crash")
        path.write_text(
            f"vllm-tune {__version__} python {platform.python_version()} {platform.platform()}\n"
            f"argv: {sys.argv}\n\n" + "".join(traceback.format_exception(exc))
        )
        return str(path)
    except OSError:
        return _NO_CRASH_LOG


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())
