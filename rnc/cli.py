"""`rnc`: the one command line of the project.

Each package registers its own subcommands; this module imports every registration function statically, so a
broken import fails `rnc` (and `rnc --help`) loudly instead of silently dropping a subcommand. Subcommand bodies stay
in their packages as importable functions: `pipeline` and `config` in pipelines/cli.py, `eval` in
pipelines/eval_cli.py, `tune` in pipelines/tune.py, `serve` and `chat` in serve/cli.py, `export` in export/hf.py.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

from checkpoints import CheckpointError, StorageError
from export.hf import add_export_subcommand
from pipelines.cli import CliError, add_pipeline_subcommands
from pipelines.config import ConfigError
from pipelines.eval_cli import add_eval_subcommand
from pipelines.tune import add_tune_subcommand
from serve.cli import add_serve_subcommands

# Registration functions in `rnc --help` order; each adds its subparsers and sets `func(args) -> exit code`.
REGISTRARS: tuple[Callable[[argparse._SubParsersAction], object], ...] = (
    add_pipeline_subcommands,  # pipeline, config
    add_eval_subcommand,  # eval
    add_tune_subcommand,  # tune
    add_serve_subcommands,  # serve, chat
    add_export_subcommand,  # export hf
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rnc", description="Train, evaluate and serve recursive GPTs on Ray.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in REGISTRARS:
        register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse `argv` (default sys.argv[1:]), run the subcommand, return its exit code. User errors are one line on
    stderr: 2 for a bad config or argument, 1 when storage or a checkpoint cannot be read, 130 on Ctrl-C."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # local clusters: no token file needed
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (CliError, ConfigError) as exc:
        print(f"rnc: error: {exc}", file=sys.stderr)
        return 2
    except StorageError as exc:
        print(f"rnc: storage error: {exc}", file=sys.stderr)
        return 1
    except CheckpointError as exc:
        print(f"rnc: checkpoint error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("rnc: interrupted; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
