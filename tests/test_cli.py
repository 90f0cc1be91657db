"""The `rnc` entry point: every subcommand is registered by a static import, and a broken import fails loudly."""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from rnc import cli

ROOT = Path(__file__).resolve().parents[1]
SUBCOMMANDS = ["pipeline", "config", "eval", "tune", "serve", "chat", "export"]


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def _run(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def test_help_lists_every_subcommand_and_each_one_runs_a_function(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    assert exc.value.code == 0
    listed = capsys.readouterr().out
    for name in SUBCOMMANDS:
        assert f"\n    {name} " in listed, listed
    subs = _subcommands(cli.build_parser())
    assert list(subs) == SUBCOMMANDS
    parsed = {
        "pipeline": ["pipeline", "run", "--preset", "tiny"],
        "config": ["config", "show", "--preset", "tiny"],
        "eval": ["eval", "--checkpoint", "c", "--recurrences", "1,2"],
        "tune": ["tune", "--config", "s.yaml"],
        "serve": ["serve", "status"],
        "chat": ["chat", "--checkpoint", "c"],
        "export": ["export", "hf", "--checkpoint", "c", "--out", "o"],
    }
    for name, argv in parsed.items():
        assert callable(cli.build_parser().parse_args(argv).func), name


@pytest.mark.parametrize("broken", ["serve.cli", "pipelines.tune", "pipelines.eval_cli"])
def test_a_subcommand_whose_module_cannot_be_imported_fails_rnc_instead_of_vanishing(broken):
    # sys.modules[name] = None makes `import name` raise ImportError, as a missing dependency or a syntax error would.
    proc = _run(f"import sys; sys.modules[{broken!r}] = None\nfrom rnc.cli import main\nmain(['--help'])")
    assert proc.returncode != 0
    assert f"ModuleNotFoundError: import of {broken} halted" in proc.stderr, proc.stderr
    assert "usage: rnc" not in proc.stdout


def test_python_dash_m_rnc_is_the_same_command():
    proc = subprocess.run([sys.executable, "-m", "rnc", "config", "show", "--preset", "tiny", "--run-name", "m1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("run_name: m1\n")


def test_console_script_points_at_rnc_cli_main():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"rnc": "rnc.cli:main"}
    installed = [ep for ep in importlib.metadata.entry_points(group="console_scripts") if ep.name == "rnc"]
    if installed:  # an editable install made before the entry point moved would still point elsewhere
        assert installed[0].value == "rnc.cli:main" and installed[0].load() is cli.main


def test_user_errors_are_one_line_with_the_documented_exit_code(capsys):
    assert cli.main(["config", "show", "--preset", "d99"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("rnc: error: unknown pipeline preset 'd99'")
    assert cli.main(["pipeline", "status", "--preset", "tiny", "--config", "x.yaml"]) == 2
    assert capsys.readouterr().err == "rnc: error: give --preset or --config, not both\n"
