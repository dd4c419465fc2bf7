"""``aphrodite run`` options and ``aphrodite yaml``: both must hand the server the same Namespace,
every option must be reachable from both, and YAML mistakes must name their key and line.

Nothing here starts a server: the YAML -> Namespace step is pure and ``_start_server`` is replaced.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from aphrodite.endpoints import cli
from aphrodite.endpoints.yaml_config import YamlConfigError, run_options, yaml_to_argv
from aphrodite.engine_args import EngineArgs

REPO = Path(__file__).resolve().parents[2]
ENGINE_FLAGS = [f"--{f.name.replace('_', '-')}" for f in dataclasses.fields(EngineArgs)] + ["-tp", "-pp"]
SERVER_FLAGS = ["--host", "--port", "--api-keys", "--admin-key", "--served-model-name", "--chat-template",
                "--max-log-len", "--disable-log-requests", "--uvicorn-log-level", "--allowed-origins"]


def _stub_add_server_args(parser: argparse.ArgumentParser) -> None:
    """The server options the API server promises (used only while its module is missing)."""
    parser.add_argument("--host", default=None, help="Host name.")
    parser.add_argument("--port", type=int, default=2242, help="Port.")
    parser.add_argument("--api-keys", nargs="+", default=None, help="API keys.")
    parser.add_argument("--admin-key", default=None, help="Admin key.")
    parser.add_argument("--served-model-name", nargs="+", default=None, help="Served names.")
    parser.add_argument("--chat-template", default=None, help="Chat template.")
    parser.add_argument("--max-log-len", type=int, default=None, help="Log length.")
    parser.add_argument("--disable-log-requests", action="store_true", help="No request logs.")
    parser.add_argument("--uvicorn-log-level", default="info",
                        choices=["critical", "error", "warning", "info", "debug", "trace"], help="Log level.")
    parser.add_argument("--allowed-origins", type=json.loads, default=["*"], help="CORS origins.")
    parser.add_argument("--allow-credentials", action="store_true", help="CORS credentials.")
    parser.add_argument("--allowed-methods", type=json.loads, default=["*"], help="CORS methods.")
    parser.add_argument("--allowed-headers", type=json.loads, default=["*"], help="CORS headers.")


@pytest.fixture(autouse=True)
def server_args(monkeypatch: pytest.MonkeyPatch) -> None:
    """The real ``add_server_args`` once the server exists; until then a stub of its promised options."""
    if cli._server_args_adder()[0] is None:
        monkeypatch.setattr(cli, "_server_args_adder", lambda: (_stub_add_server_args, ""))


@pytest.fixture
def started(monkeypatch: pytest.MonkeyPatch) -> list[argparse.Namespace]:
    """Namespaces that would have reached ``run_server``."""
    calls: list[argparse.Namespace] = []
    monkeypatch.setattr(cli, "_start_server", lambda ns: calls.append(ns) or 0)
    return calls


def _yaml(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


def _errors(text: str) -> str:
    with pytest.raises(YamlConfigError) as e:
        yaml_to_argv(textwrap.dedent(text).lstrip("\n"), cli.build_run_parser(), source="c.yaml")
    return str(e.value)


def test_run_help_lists_every_option_in_groups(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        cli.main(["run", "-h"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ENGINE_FLAGS + SERVER_FLAGS:
        assert f"{flag} " in out or f"{flag}," in out, flag
    sections = ["basic_args:", "model_args:", "parallel_args:", "cache_args:", "scheduler_args:", "server_args:"]
    positions = [out.index(f"\n{s}\n") for s in sections]
    assert positions == sorted(positions), "groups out of order"
    assert out.index("--port") > positions[-1] and positions[2] < out.index("-tp") < positions[3]
    words = " ".join(out.split())
    assert "(default: 16)" in words and "(default: 2242)" in words
    assert "1024 on GPUs with 70 GiB or more" in words   # max_num_seqs: a device-dependent default, explained


def test_run_help_subprocess_is_light() -> None:
    """``aphrodite run -h`` from a fresh interpreter: engine flags listed, torch never imported."""
    code = ("import sys\nfrom aphrodite.endpoints.cli import main\ntry:\n    main(['run', '-h'])\n"
            "except SystemExit as e:\n    assert e.code == 0\nprint('TORCH', 'torch' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    for flag in ENGINE_FLAGS:
        assert flag in proc.stdout, flag
    assert "server_args:" in proc.stdout
    assert proc.stdout.rstrip().endswith("TORCH False"), "run -h imported torch"


def test_shipped_config_is_run_with_no_arguments() -> None:
    assert cli.yaml_namespace(REPO / "config.yaml") == cli.parse_run_args([])


def test_shipped_config_lists_every_option() -> None:
    doc = yaml.safe_load((REPO / "config.yaml").read_text())
    keys = [key for entries in doc.values() for entry in entries for key in entry]
    assert len(keys) == len(set(keys))
    options = run_options(cli.build_run_parser())
    assert set(keys) == {o.action.dest for o in options.values()}
    assert set(doc) == {f.metadata["section"] for f in dataclasses.fields(EngineArgs)} | {"server_args"}


def test_run_namespace_has_every_engine_field_at_its_default() -> None:
    ns = cli.parse_run_args([])
    for f in dataclasses.fields(EngineArgs):
        assert getattr(ns, f.name) == f.default, f.name
    assert ns.port == 2242 and not hasattr(ns, "model_tag")
    assert EngineArgs.from_dict({n: getattr(ns, n) for n in EngineArgs.field_names()}) == EngineArgs()


def test_yaml_and_run_start_the_server_alike(tmp_path: Path, started: list[argparse.Namespace]) -> None:
    path = _yaml(tmp_path, """
        basic_args:
          - model: some/model
        parallel_args:
          - tensor-parallel-size: 2
        """)
    assert cli.main(["run", "some/model", "-tp", "2"]) == 0
    assert cli.main(["yaml", str(path)]) == 0
    assert cli.main(["run", "--model", "some/model", "--tensor-parallel-size", "2"]) == 0
    assert started[0] == started[1] == started[2] == cli.parse_run_args(["some/model", "-tp", "2"])
    assert started[0].model == "some/model" and started[0].tensor_parallel_size == 2
    assert started[0].pipeline_parallel_size == 1


def test_seed_example_loads(tmp_path: Path) -> None:
    """The getting-started guide's config: options outside their help group, an empty model."""
    path = _yaml(tmp_path, """
        basic_args:
          # Your model name. Can be a local path or huggingface model ID
          - model:

          # The tensor parallelism degree.
          - tensor_parallel_size: 2
        """)
    assert cli.yaml_namespace(path) == cli.parse_run_args(["-tp", "2"])


def test_every_kind_of_value_matches_the_command_line(tmp_path: Path) -> None:
    path = _yaml(tmp_path, """
        basic_args:
          - model: -odd/name
        model_args:
          - dtype: float16
          - max_model_len:
          - max-model-len: 512
          - enforce_eager: true
        cache_args:
          - enable_prefix_caching: false
          - gpu_memory_utilization: .5
          - cpu_kvcache_space: 1e-2
        empty_section:
        server_args:
          - port: 8000
          - api_keys: [k1, k2]
          - served_model_name: one
          - disable_log_requests: true
          - allowed_origins: ["http://a", "http://b"]
          - uvicorn_log_level: debug
        """)
    argv = ["--model=-odd/name", "--dtype", "float16", "--max-model-len", "512", "--enforce-eager",
            "--no-enable-prefix-caching", "--gpu-memory-utilization", "0.5", "--cpu-kvcache-space", "0.01",
            "--port", "8000", "--api-keys", "k1", "k2", "--served-model-name", "one", "--disable-log-requests",
            "--allowed-origins", '["http://a", "http://b"]', "--uvicorn-log-level", "debug"]
    ns = cli.yaml_namespace(path)
    assert ns == cli.parse_run_args(argv)
    assert (ns.enable_prefix_caching, ns.enforce_eager, ns.cpu_kvcache_space) == (False, True, 0.01)


def test_unknown_key_names_key_and_line() -> None:
    message = _errors("""
        basic_args:
          - model: x

          - tensor_paralel_size: 2
        """)
    assert "c.yaml, line 4" in message and "tensor_paralel_size" in message
    assert "did you mean 'tensor_parallel_size'" in message


@pytest.mark.parametrize(("entry", "expected"), [
    ("tensor_parallel_size: two", "invalid int value: 'two'"),
    ("tensor_parallel_size: true", "invalid int value"),
    ("enforce_eager: sometimes", "expected true or false"),
    ("enable_prefix_caching: 1", "expected true or false"),
    ("dtype: float8", "invalid choice"),
    ("gpu_memory_utilization: [0.5]", "expected a single value"),
    ("max_model_len: {a: 1}", "expected a value"),
])
def test_type_error_names_key_and_line(entry: str, expected: str) -> None:
    message = _errors(f"basic_args:\n  - model: x\nmodel_args:\n  - {entry}\n")
    key = entry.split(":")[0]
    assert f"c.yaml, line 4: '{key}'" in message and expected in message, message


def test_all_problems_reported_together() -> None:
    message = _errors("""
        model: x
        basic_args:
          - seed: 1
          - seed: 2
          - just_a_word
        cache_args:
          - block_size: 0.5
        """)
    assert "line 1: section 'model' must be a list" in message and "is 'model' an option?" in message
    assert "line 4: 'seed' is already set on line 3" in message
    assert "line 5: in section 'basic_args'" in message
    assert "line 7: 'block_size'" in message


def test_broken_yaml_and_missing_file(tmp_path: Path) -> None:
    assert "c.yaml, line 2: not valid YAML" in _errors("basic_args:\n  - model: a: b\n")
    with pytest.raises(YamlConfigError, match="cannot read"):
        cli.yaml_namespace(tmp_path / "missing.yaml")


def test_model_given_twice_must_agree() -> None:
    with pytest.raises(ValueError, match="disagree"):
        cli.parse_run_args(["a/model", "--model", "b/model"])
    assert cli.parse_run_args(["a/model", "--model", "a/model"]).model == "a/model"


def test_bad_yaml_exits_without_starting(tmp_path: Path) -> None:
    path = _yaml(tmp_path, """
        basic_args:
          - model:
          - max_num_seqs: many
          - not_an_option: 1
        """, name="bad.yaml")
    proc = subprocess.run([sys.executable, "-m", "aphrodite.endpoints.cli", "yaml", str(path)],
                          capture_output=True, text=True, timeout=60, cwd=REPO)
    assert proc.returncode != 0
    assert "bad.yaml, line 3: 'max_num_seqs': invalid int value: 'many'" in proc.stderr, proc.stderr
    assert "bad.yaml, line 4: unknown argument 'not_an_option'" in proc.stderr, proc.stderr
    assert proc.stdout == ""
