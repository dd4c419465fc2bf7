"""``aphrodite yaml config.yaml``: the YAML config turned into ``aphrodite run`` arguments.

The file holds sections (``basic_args:``, ``server_args:`` ...), each a list of one-key
mappings (``- model: x``). Section names only organise the file: any ``run`` option may
appear in any section, spelled with ``-`` or ``_``; an empty value means "not set". Switches
take true/false, list options a YAML list or one value, JSON options (``type=json.loads``)
YAML lists and mappings.

Each entry becomes the command-line words of its option and is checked by the ``run`` parser
itself, so the YAML path shares every type, choice and default with the command line and the
only thing added here is where a mistake is (key name and line).
"""
from __future__ import annotations

import argparse
import difflib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

_NULL = "tag:yaml.org,2002:null"
_BOOL = "tag:yaml.org,2002:bool"
_ARGPARSE_PREFIX = re.compile(r"^argument [^:]+: ")


class YamlConfigError(ValueError):
    """Every problem found in a config file, each naming its line (the server does not start)."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid config:\n  " + "\n  ".join(problems))


@dataclass
class _Option:
    """A ``run`` option as the YAML sees it: the parser's action and its canonical key."""

    key: str
    action: argparse.Action

    @property
    def flag(self) -> str:
        return next(s for s in self.action.option_strings if s.startswith("--") and not self._negative(s))

    def _negative(self, option: str) -> bool:
        return isinstance(self.action, argparse.BooleanOptionalAction) and option.startswith("--no-")


def run_options(parser: argparse.ArgumentParser) -> dict[str, _Option]:
    """Every YAML key the ``run`` parser accepts, ``_``-spelled, mapped to its option.

    A key is an option's destination or any of its long spellings (``--tensor-parallel-size``
    gives ``tensor_parallel_size``); ``--no-X`` forms are left out: ``X: false`` says that.
    """
    options: dict[str, _Option] = {}
    for action in parser._actions:  # argparse has no public way to list its options
        if not action.option_strings or isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            continue
        option = _Option(action.dest, action)
        options[action.dest] = option
        for spelling in action.option_strings:
            if spelling.startswith("--") and not option._negative(spelling):
                options.setdefault(_normalize(spelling[2:]), option)
    return options


def yaml_to_argv(text: str, parser: argparse.ArgumentParser, source: str = "<config>") -> list[str]:
    """The ``aphrodite run`` words that ``text`` (a YAML config) stands for.

    A pure function: nothing starts. ``parser`` must raise ``ValueError`` from ``error()``
    (``aphrodite.endpoints.cli.build_run_parser()`` does) so each entry can be checked alone.
    Raises ``YamlConfigError`` listing every unknown key, type error and misplaced entry.
    """
    problems: list[str] = []

    def problem(node: Node, message: str) -> None:
        problems.append(f"{source}, line {node.start_mark.line + 1}: {message}")

    try:
        root = yaml.compose(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f", line {mark.line + 1}" if mark is not None else ""
        raise YamlConfigError([f"{source}{where}: not valid YAML: {getattr(e, 'problem', None) or e}"]) from e
    if root is None:  # an empty file: every option at its default
        return []
    if not isinstance(root, MappingNode):
        raise YamlConfigError([f"{source}, line {root.start_mark.line + 1}: expected sections such as "
                               "'basic_args:' at the top level, each a list of '- key: value' entries"])

    options = run_options(parser)
    argv: list[str] = []
    seen: dict[str, int] = {}  # option dest -> line where it was set
    for section_node, entries in root.value:
        section = section_node.value
        if isinstance(entries, ScalarNode) and entries.tag == _NULL:
            continue  # an empty section
        if not isinstance(entries, SequenceNode):
            hint = f" (is '{section}' an option? put it in a section as '- {section}: ...')" \
                if _normalize(str(section)) in options else ""
            problem(section_node, f"section '{section}' must be a list of '- key: value' entries{hint}")
            continue
        for entry in entries.value:
            if not isinstance(entry, MappingNode):
                problem(entry, f"in section '{section}': expected a '- key: value' entry")
                continue
            for key_node, value_node in entry.value:
                key = str(key_node.value)
                option = options.get(_normalize(key))
                if option is None:
                    close = difflib.get_close_matches(_normalize(key), list(options), n=1)
                    hint = f" (did you mean '{close[0]}'?)" if close else ""
                    problem(key_node, f"unknown argument '{key}'{hint}")
                    continue
                dest = option.action.dest
                if dest in seen:
                    problem(key_node, f"'{key}' is already set on line {seen[dest]}")
                    continue
                if not _is_null(value_node):  # an empty entry sets nothing, so it may repeat
                    seen[dest] = key_node.start_mark.line + 1
                try:
                    words = _words(option, value_node)
                    if words:
                        parser.parse_args(words)  # the run parser checks type and choices
                except ValueError as e:
                    problem(key_node, f"'{key}': {_ARGPARSE_PREFIX.sub('', str(e))}")
                    continue
                argv += words
    if problems:
        raise YamlConfigError(problems)
    return argv


def load_yaml_argv(path: str | Path, parser: argparse.ArgumentParser) -> list[str]:
    """``yaml_to_argv`` of a file, with unreadable files reported like any other problem."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise YamlConfigError([f"{path}: cannot read the config file: {e.strerror or e}"]) from e
    return yaml_to_argv(text, parser, source=str(path))


def _normalize(key: str) -> str:
    return key.replace("-", "_")


def _is_null(node: Node) -> bool:
    return isinstance(node, ScalarNode) and node.tag == _NULL


def _bool(node: Node) -> bool:
    if not (isinstance(node, ScalarNode) and node.tag == _BOOL):
        raise ValueError(f"expected true or false, got {_show(node)}")
    return yaml.constructor.SafeConstructor.bool_values[node.value.lower()]


def _show(node: Node) -> str:
    if isinstance(node, ScalarNode):
        return repr(node.value)
    return "a list" if isinstance(node, SequenceNode) else "a mapping"


def _words(option: _Option, node: Node) -> list[str]:
    """Command-line words for one entry; [] for an empty value (the option keeps its default)."""
    action, flag = option.action, option.flag
    if _is_null(node):
        return []
    if isinstance(action, argparse.BooleanOptionalAction):
        return [flag] if _bool(node) else ["--no-" + flag[2:]]
    if action.nargs == 0:  # store_true / store_false: the flag either appears or not
        on = _bool(node)
        return [flag] if on == (action.const is not False) else []
    if action.type is json.loads and not isinstance(node, ScalarNode):  # vLLM's JSON options
        return [f"{flag}={json.dumps(yaml.constructor.SafeConstructor().construct_document(node))}"]
    if isinstance(node, MappingNode):
        raise ValueError(f"expected a value, got {_show(node)}")
    if action.nargs in ("+", "*") or isinstance(action.nargs, int):
        items = node.value if isinstance(node, SequenceNode) else [node]
        if any(not isinstance(item, ScalarNode) or item.tag == _NULL for item in items):
            raise ValueError("expected a list of values (no empty or nested items)")
        return [flag, *(item.value for item in items)] if items else []
    if isinstance(node, SequenceNode):
        raise ValueError(f"expected a single value, got {_show(node)}")
    return [f"{flag}={node.value}"]  # '=' keeps a value that starts with '-' from reading as a flag
