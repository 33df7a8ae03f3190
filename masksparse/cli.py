"""The ``python -m masksparse`` command line.

``report CHECKPOINT`` prints the sparsity report of a saved state_dict; ``demo`` prunes a small model end
to end. Every failure the user can cause (a missing file, a file that holds no state_dict) ends with one
line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from masksparse import __version__
from masksparse._errors import MaskSparseError
from masksparse.report import sparsity_report
from masksparse.serialization import read_state_dict

__all__ = ["main"]

_USAGE_ERROR = 2


def _run_report(args: argparse.Namespace) -> int:
    report = sparsity_report(read_state_dict(args.checkpoint))
    print(report.to_markdown() if args.format == "markdown" else str(report))
    return 0


def _run_demo(args: argparse.Namespace) -> int:
    try:
        from masksparse.examples import run_demo
    except ModuleNotFoundError as exc:
        raise MaskSparseError(f"the demo needs the module {exc.name!r}, which is not installed") from None
    run_demo()
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="masksparse", description="Sparsity tools for PyTorch models pruned with masks."
    )
    parser.add_argument("--version", action="version", version=f"masksparse {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    report = commands.add_parser(
        "report",
        help="print the sparsity of every weight and bias in a saved state_dict",
        description="Print the sparsity of every weight and bias tensor in a saved state_dict, "
        "pruned (name_orig and name_mask entries) or not.",
    )
    report.add_argument(
        "checkpoint",
        type=Path,
        metavar="CHECKPOINT",
        help="a .safetensors file, or a torch.save'd state_dict (or a dict with a 'state_dict' or "
        "'model' entry)",
    )
    report.add_argument("--format", choices=("table", "markdown"), default="table", help="output format")
    report.set_defaults(run=_run_report)

    demo = commands.add_parser("demo", help="prune a small model end to end and show its reports")
    demo.set_defaults(run=_run_demo)
    return parser


def _exit_code(code: object) -> int:
    if code is None:
        return 0
    return code if isinstance(code, int) else _USAGE_ERROR


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default: ``sys.argv[1:]``) and return the exit code.

    Example:
        >>> from masksparse.cli import main
        >>> main(["--version"])
        masksparse ...
        0

    Args:
        argv: the arguments after the program name.

    Returns:
        0 on success; 2 for a usage error or a checkpoint that cannot be read.
    """
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version and usage errors: hand back the code instead of exiting
        return _exit_code(exc.code)
    try:
        code: int = args.run(args)
    except MaskSparseError as exc:
        message = " ".join(str(exc).splitlines())  # one line, as a shell user expects
        print(f"{parser.prog}: error: {message}", file=sys.stderr)
        return _USAGE_ERROR
    return code
