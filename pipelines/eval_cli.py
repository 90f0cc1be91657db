"""`rnc eval`: score a checkpoint on eval tasks x recurrences; write the table, the plot and the report card.

    rnc eval --checkpoint s3://bucket/run/sft --recurrences 1,2,4,8,16 --adaptive kl:5e-4 --baseline runs/d20/sft

This module parses arguments and resolves checkpoint URIs (a local directory, or s3://bucket/path downloaded and
verified against its manifest); recursive_model.evaluation does the work. Bad input prints one line
`rnc eval: error: ...` on stderr, never a traceback: exit 2 for bad arguments (argparse's convention), 1 when a
checkpoint or the storage cannot be read.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import torch

from checkpoints import INFERENCE_PARTS, LoadedCheckpoint, StorageConfig, fetch_checkpoint, load_checkpoint
from checkpoints.fetch import is_remote
from recursive_model.evaluation import (
    EVAL_TASKS,
    EvalReport,
    build_eval_tasks,
    check_recurrences,
    check_task_names,
    evaluate_model,
    write_outputs,
)
from recursive_model.recurrence import ExitRule, exit_help

PROG = "rnc eval"
DEFAULT_TASKS = "walk,walk_hard,arithmetic,spelling_bee"  # generated (nothing to download): the embedded default's
DEFAULT_OUT_ROOT = "rnc-eval"


class EvalCliError(Exception):
    """A failure reported as one line on stderr with an exit code (2: bad arguments, 1: unreadable input)."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def _one_line(exc: BaseException | str) -> str:
    return " ".join(str(exc).split())


# ----------------------------------------------------------------------------------------------- argument types
# argparse keeps the message of an ArgumentTypeError only; a ValueError would become "invalid <type> value".


def _recurrences_arg(text: str) -> list[int]:
    values = []
    for item in text.split(","):
        try:
            values.append(int(item))
        except ValueError:
            raise argparse.ArgumentTypeError(f"r={item.strip()!r} is not an integer (expected e.g. 1,2,4,8)") from None
    try:
        return check_recurrences(values)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _tasks_arg(text: str) -> list[str]:
    try:
        return check_task_names([t.strip() for t in text.split(",") if t.strip()])
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _adaptive_arg(text: str) -> ExitRule:
    try:
        return ExitRule.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _source_arg(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=PATH (e.g. arc_easy=data/arc_easy.jsonl)")
    return name, path


def _positive_arg(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be an integer >= 1")
    return value


def _one_line_error(parser: argparse.ArgumentParser, message: str) -> NoReturn:
    """argparse's error() without the usage block: the contract is one line on stderr, exit code 2."""
    print(f"{parser.prog}: error: {_one_line(message)}", file=sys.stderr)
    raise SystemExit(2)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `rnc eval` options (shared by the `rnc` subcommand and `main`)."""
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory or s3://bucket/path")
    parser.add_argument(
        "--recurrences", required=True, type=_recurrences_arg, help="comma-separated r values, e.g. 1,2,4,8,16"
    )
    parser.add_argument(
        "--adaptive",
        type=_adaptive_arg,
        metavar="CRITERION:THRESHOLD[:MIN_R]",
        help=f"also decode at max r with this adaptive exit rule, e.g. kl:5e-4 ({exit_help()})",
    )
    parser.add_argument(
        "--tasks",
        type=_tasks_arg,
        default=DEFAULT_TASKS,
        help=f"comma-separated, from: {', '.join(EVAL_TASKS)} (default {DEFAULT_TASKS})",
    )
    parser.add_argument(
        "--task-source",
        type=_source_arg,
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="read a hub task from a local file in the hub format (repeatable), e.g. gsm8k=data/gsm8k_test.jsonl",
    )
    parser.add_argument("--baseline", help="iso-FLOP baseline checkpoint (a plain GPT), drawn as a line per task")
    parser.add_argument("--max-problems", type=_positive_arg, help="first N problems per task (default: all)")
    parser.add_argument("--max-tokens", type=_positive_arg, default=256, help="generation budget per answer")
    parser.add_argument("--batch-size", type=_positive_arg, default=8, help="problems per forward / decode batch")
    parser.add_argument("--out", help=f"output directory or s3:// prefix (default {DEFAULT_OUT_ROOT}/<checkpoint>)")
    parser.add_argument("--storage-endpoint", help="S3 endpoint URL for s3:// URIs (MinIO, moto), e.g. http://h:9000")
    parser.add_argument("--device", default="auto", help="torch device; auto = cuda when available, else cpu")
    parser.add_argument("--title", help="report card title (default: the checkpoint URI)")


def add_eval_subcommand(subparsers: Any) -> argparse.ArgumentParser:
    """Register `eval` on the `rnc` subparsers; `args.func(args)` runs it and returns the exit code."""
    parser = subparsers.add_parser("eval", help="score a checkpoint on tasks x recurrences, write the report card")
    parser.error = lambda message: _one_line_error(parser, message)  # type: ignore[method-assign]
    add_arguments(parser)
    parser.set_defaults(func=run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """`rnc eval` on its own: `argv` holds the options after `eval`. Returns the exit code."""
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.error = lambda message: _one_line_error(parser, message)  # type: ignore[method-assign]
    add_arguments(parser)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a bad argument (2, already reported on one line)
        return int(exc.code or 0)
    return run(args)


# --------------------------------------------------------------------------------------------------- checkpoints


def _checkpoint_name(uri: str) -> str:
    return uri.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1] or "checkpoint"


def load_checkpoint_uri(uri: str, endpoint_url: str | None = None, device: str = "cpu") -> LoadedCheckpoint:
    """Load a checkpoint from a local directory or s3://bucket/path (downloaded, then verified against its manifest).

    Raises EvalCliError (code 1) with one line naming the URI and the problem: missing, incomplete, corrupt,
    unreachable storage, or no tokenizer.
    """
    try:
        storage = None
        if is_remote(uri):
            from checkpoints import Storage  # imported here: local evaluation needs no boto3/pyarrow

            storage = Storage(StorageConfig(uri=uri, endpoint_url=endpoint_url))
        with tempfile.TemporaryDirectory(prefix="rnc-eval-") as tmp:  # a remote copy lives until the weights load
            ckpt = fetch_checkpoint(storage.root if storage else uri, INFERENCE_PARTS, storage=storage, cache_dir=tmp)
            loaded = load_checkpoint(ckpt, device=device)
    except Exception as exc:  # any failure to read a checkpoint is the same answer for the user: unreadable
        raise EvalCliError(f"checkpoint {uri} is unreadable: {_one_line(exc)}") from exc
    if loaded.tokenizer is None:
        raise EvalCliError(f"checkpoint {uri} has no tokenizer/ directory; evaluation needs the model's tokenizer")
    loaded.path = uri
    return loaded


def _write(
    report: EvalReport, baseline: EvalReport | None, out: str, endpoint_url: str | None, title: str
) -> dict[str, str]:
    """write_outputs into a local directory, or into a temp dir uploaded to an s3:// prefix; returns {kind: where}."""
    if not out.startswith("s3://"):
        return {kind: str(path) for kind, path in write_outputs(report, out, baseline=baseline, title=title).items()}
    from checkpoints import Storage

    storage = Storage(StorageConfig(uri=out, endpoint_url=endpoint_url))
    with tempfile.TemporaryDirectory(prefix="rnc-eval-out-") as tmp:
        paths = write_outputs(report, tmp, baseline=baseline, title=title)
        storage.upload_dir(tmp, storage.root)
    return {kind: storage.uri_for(storage.join(path.name)) for kind, path in paths.items()}


# ----------------------------------------------------------------------------------------------------------- run


def run(args: argparse.Namespace) -> int:
    """Evaluate `args.checkpoint` (and `args.baseline`) and write the outputs; returns the exit code."""
    try:
        _run(args)
    except EvalCliError as exc:
        print(f"{PROG}: error: {_one_line(exc)}", file=sys.stderr)
        return exc.code
    return 0


def _run(args: argparse.Namespace) -> None:
    # Tasks first: a bad task source fails in a second, before any checkpoint download.
    try:
        tasks = build_eval_tasks(args.tasks, dict(args.task_source))
    except (ValueError, FileNotFoundError) as exc:
        raise EvalCliError(_one_line(exc), code=2) from exc
    except OSError as exc:  # e.g. a hub data set without network access
        raise EvalCliError(f"cannot load the eval tasks: {_one_line(exc)}") from exc
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    loaded = load_checkpoint_uri(args.checkpoint, args.storage_endpoint, device)
    baseline_ckpt = load_checkpoint_uri(args.baseline, args.storage_endpoint, device) if args.baseline else None
    common = dict(max_problems=args.max_problems, max_tokens=args.max_tokens, batch_size=args.batch_size)
    try:
        report = evaluate_model(
            loaded.model,
            loaded.tokenizer,
            tasks,
            args.recurrences,
            adaptive=args.adaptive,
            checkpoint=args.checkpoint,
            meta=loaded.meta,
            **common,
        )
        baseline = None
        if baseline_ckpt is not None:
            cfg = baseline_ckpt.config
            # One score per task: a plain GPT ignores r; a recursive baseline is scored at its own default r.
            r = cfg.decode.num_recur if cfg.is_recursive else 1
            print(
                f"[eval] baseline {args.baseline} at r={r}" if cfg.is_recursive else f"[eval] baseline {args.baseline}"
            )
            baseline = evaluate_model(
                baseline_ckpt.model,
                baseline_ckpt.tokenizer,
                tasks,
                [r],
                checkpoint=args.baseline,
                meta=baseline_ckpt.meta,
                **common,
            )
    except ValueError as exc:  # e.g. --adaptive on a plain GPT
        raise EvalCliError(_one_line(exc), code=2) from exc
    out = args.out or str(Path(DEFAULT_OUT_ROOT) / _checkpoint_name(args.checkpoint))
    title = args.title or f"Report card: {args.checkpoint}"
    try:
        written = _write(report, baseline, out, args.storage_endpoint, title)
    except Exception as exc:  # disk full, unwritable directory, storage down: one line, the eval numbers are printed
        raise EvalCliError(f"cannot write the outputs to {out}: {_one_line(exc)}") from exc
    print(f"{PROG}: wrote")
    for kind, where in written.items():
        print(f"  {kind:<12} {where}")


if __name__ == "__main__":
    sys.exit(main())
