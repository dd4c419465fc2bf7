"""The ``aphrodite`` command: ``aphrodite run|yaml|run-batch|chat|complete|bench`` (one
``_add_<command>_parser`` and one ``cmd_<command>`` each).

Parsing stays light: torch and the engine load only once a command runs, so ``aphrodite run -h``
is quick. ``run`` and ``yaml`` build their options in one place (``add_run_args``) and hand the
server the same Namespace (``run_namespace``): a YAML config is turned into ``run`` words.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from aphrodite.engine_args import EngineArgs

# Help-group blurbs; a section without one still gets its own group, titled by its name.
_SECTIONS = {
    "basic_args": "What to serve. Usually the only options you need.",
    "model_args": "How the model is loaded and run.",
    "parallel_args": "Splitting the model across GPUs.",
    "cache_args": "The KV cache: block size and how much memory it may take.",
    "scheduler_args": "How many sequences and tokens go into one step.",
    "lora_args": "LoRA adapters served over the base model.",
    "server_args": "The OpenAI-compatible HTTP server.",
}
_RUN_USAGE = "%(prog)s [MODEL] [engine options] [server options]"
_CLI_ONLY_FIELDS = ("command", "func", "model_tag")  # parsing artefacts the server never sees


class RunHelpFormatter(argparse.HelpFormatter):
    """Shows every option's default, unless its help already names it."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=36)

    def _get_help_string(self, action: argparse.Action) -> str:
        help = action.help or ""
        plain_switch = action.nargs == 0 and action.default is False  # store_true: off unless given
        if "default" in help.lower() or action.default is argparse.SUPPRESS or plain_switch:
            return help
        return f"{help} (default: %(default)s)"


class RaisingParser(argparse.ArgumentParser):
    """An argument parser that raises ``ValueError`` instead of exiting, for parsing YAML entries."""

    def error(self, message: str) -> NoReturn:
        raise ValueError(message)


class _SectionRouter:
    """Stands in for the parser in ``EngineArgs.add_cli_args`` and files each argument under the
    help group of its field's ``section``, so the grouping lives with the one list of arguments."""

    def __init__(self, parser: argparse.ArgumentParser) -> None:
        self._section = {f.name: f.metadata["section"] for f in dataclasses.fields(EngineArgs)}
        self._groups: dict[str, Any] = {}
        for section in dict.fromkeys(self._section.values()):
            self._groups[section] = parser.add_argument_group(section, _SECTIONS.get(section))

    def add_argument(self, *names: str, **kwargs: Any) -> argparse.Action:
        dest = kwargs.get("dest") or names[0].lstrip("-").replace("-", "_")
        section = self._section.get(dest, self._section["model"])  # MODEL goes with --model
        return self._groups[section].add_argument(*names, **kwargs)


SERVER_EXTRA_HINT = "the server needs its extra dependencies: pip install aphrodite[server]"


def _server_args_adder() -> tuple[Callable[[argparse.ArgumentParser], None] | None, str]:
    """The server's ``add_server_args``, or None and why (FastAPI or uvicorn missing, e.g. on a GPU box)."""
    try:
        import uvicorn  # noqa: F401  (only checked here; the server imports it when it starts)

        from aphrodite.endpoints.openai.api_server import add_server_args
    except ImportError as e:
        return None, str(e)
    return add_server_args, ""


def add_run_args(parser: argparse.ArgumentParser) -> None:
    """Every ``aphrodite run`` option: [MODEL], the engine arguments by section, then the server's."""
    EngineArgs.add_cli_args(_SectionRouter(parser), positional_model=True)  # type: ignore[arg-type]
    add_server_args, why = _server_args_adder()
    if add_server_args is None:
        parser.add_argument_group("server_args", f"Unavailable here ({why}): {SERVER_EXTRA_HINT}.")
        return
    add_server_args(parser.add_argument_group("server_args", _SECTIONS["server_args"]))  # type: ignore[arg-type]


def build_run_parser() -> argparse.ArgumentParser:
    """A stand-alone ``aphrodite run`` parser whose errors raise ``ValueError`` (used by ``yaml``)."""
    parser = RaisingParser(prog="aphrodite run", usage=_RUN_USAGE, formatter_class=RunHelpFormatter, add_help=False)
    add_run_args(parser)
    return parser


def run_namespace(args: argparse.Namespace) -> argparse.Namespace:
    """What the server gets from ``run`` and ``yaml`` alike: every engine field by its
    ``EngineArgs`` name (unset ones at their defaults) plus the server's options.

    MODEL and ``--model`` are one argument; giving both with different values is an error.
    """
    values = {k: v for k, v in vars(args).items() if k not in _CLI_ONLY_FIELDS}
    model_tag = getattr(args, "model_tag", None)
    if model_tag is not None:
        if values.get("model") not in (None, model_tag):
            raise ValueError(f"MODEL ({model_tag}) and --model ({values['model']}) disagree; give one.")
        values["model"] = model_tag
    for f in dataclasses.fields(EngineArgs):
        if f.name not in values:
            values[f.name] = f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]
    return argparse.Namespace(**values)


def parse_run_args(argv: Sequence[str]) -> argparse.Namespace:
    """``aphrodite run ARGV`` as the server sees it (``ValueError`` on a bad argument)."""
    return run_namespace(build_run_parser().parse_args(list(argv)))


def yaml_namespace(path: str | Path) -> argparse.Namespace:
    """``aphrodite yaml PATH`` as the server sees it; pure (no server), so tests use it directly."""
    from aphrodite.endpoints.yaml_config import YamlConfigError, load_yaml_argv
    parser = build_run_parser()
    try:
        argv = load_yaml_argv(path, parser)
    except YamlConfigError as e:
        add_server_args, why = _server_args_adder()
        if add_server_args is None:  # say why server keys read as unknown
            raise YamlConfigError([*e.problems, f"(server options are unavailable here: {why})"]) from e
        raise
    return run_namespace(parser.parse_args(argv))


def _start_server(args: argparse.Namespace) -> int:
    try:
        from aphrodite.endpoints.openai.api_server import run_server
    except ImportError as e:
        raise ValueError(f"{SERVER_EXTRA_HINT} ({e}).") from e
    run_server(args)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    return _start_server(run_namespace(args))


def cmd_yaml(args: argparse.Namespace) -> int:
    return _start_server(yaml_namespace(args.config))


def _add_run_parser(subparsers: Any, with_options: bool) -> None:
    """``with_options`` is off unless ``run`` is the command: the server's options import FastAPI."""
    run = subparsers.add_parser(
        "run", help="Serve a model with the OpenAI-compatible API (port 2242).", usage=_RUN_USAGE,
        formatter_class=RunHelpFormatter,
        description="Start the OpenAI-compatible API server. MODEL omitted: the default model "
        "(SmolLM2-135M-Instruct). Every option can also be given in a YAML config (aphrodite yaml).")
    if with_options:
        add_run_args(run)
    run.set_defaults(func=cmd_run)


def _add_yaml_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "yaml", help="Serve a model as a YAML config file says (see config.yaml).",
        description="Start the server with the options of a YAML config: sections such as basic_args: or "
        "server_args:, each a list of '- key: value' entries; any option of 'aphrodite run' may be given, "
        "with - or _ in its name; an empty value keeps the default.")
    p.add_argument("config", metavar="CONFIG", help="Path of the YAML config file, e.g. config.yaml.")
    p.set_defaults(func=cmd_yaml)


def cmd_run_batch(args: argparse.Namespace) -> int:
    from aphrodite.endpoints import run_batch
    return run_batch.main(args)


def _add_run_batch_parser(subparsers: Any, with_options: bool) -> None:
    """``with_options`` is off unless ``run-batch`` is the command (its help lists every engine option)."""
    p = subparsers.add_parser(
        "run-batch", help="Run an OpenAI Batch API file (JSONL) offline and write the results.",
        usage="%(prog)s -i INPUT.jsonl -o OUTPUT.jsonl [--model MODEL] [engine options]",
        formatter_class=RunHelpFormatter,
        description="Run every request of an OpenAI Batch API input file (one {custom_id, method, url, body} "
        "per line; url /v1/chat/completions or /v1/completions) through the server's handlers, batched by the "
        "engine, and write one output line per request in the Batch API's format, in input order.")
    if with_options:
        from aphrodite.endpoints.run_batch import add_cli_args
        add_cli_args(p.add_argument_group("batch_args", "Input, output and how requests are answered."))
        EngineArgs.add_cli_args(_SectionRouter(p))  # type: ignore[arg-type]
    p.set_defaults(func=cmd_run_batch)


def cmd_chat(args: argparse.Namespace) -> int:
    from aphrodite.endpoints.cli_clients import cmd_chat
    return cmd_chat(args)


def cmd_complete(args: argparse.Namespace) -> int:
    from aphrodite.endpoints.cli_clients import cmd_complete
    return cmd_complete(args)


def _add_client_parsers(subparsers: Any) -> None:
    from aphrodite.endpoints.cli_clients import add_chat_args, add_complete_args
    p = subparsers.add_parser("chat", help="Chat with a running server (streams the replies).",
                              usage="%(prog)s [options]",
                              description="Chat with a running OpenAI-compatible server: type a message after "
                              "'> ', the reply streams back; Ctrl-D or Ctrl-C ends. -q sends one message and exits.")
    add_chat_args(p)
    p.set_defaults(func=cmd_chat)
    p = subparsers.add_parser("complete", help="Complete prompts with a running server (streams the text).",
                              usage="%(prog)s [options]",
                              description="Complete prompts with a running OpenAI-compatible server: each line "
                              "typed after '> ' is a prompt; Ctrl-D or Ctrl-C ends. -q completes one and exits.")
    add_complete_args(p)
    p.set_defaults(func=cmd_complete)


def cmd_bench_throughput(args: argparse.Namespace) -> int:
    from aphrodite.benchmarks import throughput
    throughput.main(args)
    return 0


def cmd_bench_latency(args: argparse.Namespace) -> int:
    from aphrodite.benchmarks import latency
    latency.main(args)
    return 0


def cmd_bench_serve(args: argparse.Namespace) -> int:
    from aphrodite.benchmarks import serve
    serve.main(args)
    return 0


def _add_bench_parser(subparsers: Any) -> None:
    from aphrodite.benchmarks import latency, serve, throughput
    bench = subparsers.add_parser("bench", help="Benchmark the engine (vLLM's `vllm bench` flags and metrics).",
                                  description="Benchmark the engine.")
    kinds = bench.add_subparsers(dest="bench_command", metavar="{throughput,latency,serve}", required=True)
    p = kinds.add_parser("throughput", help="Offline throughput of many random prompts.",
                         description=throughput.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    throughput.add_cli_args(p)
    p.set_defaults(func=cmd_bench_throughput)
    p = kinds.add_parser("latency", help="Latency of one batch, repeated.",
                         description=latency.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    latency.add_cli_args(p)
    p.set_defaults(func=cmd_bench_latency)
    p = kinds.add_parser("serve", help="Online serving metrics (TTFT, TPOT, ITL) against a running server.",
                         description=serve.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    serve.add_cli_args(p)
    p.set_defaults(func=cmd_bench_serve)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The ``aphrodite`` parser; ``command`` (the subcommand about to run) decides which
    subcommands get their full option lists, so other commands never import the server."""
    parser = argparse.ArgumentParser(prog="aphrodite", description="Aphrodite: an LLM inference and serving engine.")
    from aphrodite import __version__
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_run_parser(subparsers, with_options=command == "run")
    _add_yaml_parser(subparsers)
    _add_run_batch_parser(subparsers, with_options=command == "run-batch")
    _add_client_parsers(subparsers)
    _add_bench_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``aphrodite`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # The top-level options take no value, so the first word that is not one is the command.
    command = next((a for a in argv if not a.startswith("-")), None)
    if command == "run" and not {"-h", "--help"} & set(argv):
        add_server_args, why = _server_args_adder()
        if add_server_args is None:  # say so, rather than "unrecognized arguments: --host --port"
            print(f"aphrodite: error: `aphrodite run` serves over HTTP, and {SERVER_EXTRA_HINT} ({why}).",
                  file=sys.stderr)
            return 1
    parser = build_parser(command)
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(asctime)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except ValueError as e:  # bad input: a message, not a traceback
        print(f"aphrodite: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
