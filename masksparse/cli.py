"""The ``python -m masksparse`` command line.

``report CHECKPOINT`` prints the sparsity report of a saved state_dict; ``demo`` prunes a small model end
to end. Every failure the user can cause (a missing file, a file that holds no state_dict) ends with one
line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import pickle
import sys
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor

from masksparse import __version__
from masksparse._errors import MaskSparseError, StateDictError
from masksparse.report import sparsity_report

__all__ = ["main"]

_USAGE_ERROR = 2
# Entries under which training checkpoints commonly keep the model's state_dict.
_NESTED_KEYS = ("state_dict", "model")


def _is_state_dict(obj: object) -> bool:
    return (
        isinstance(obj, Mapping)
        and all(isinstance(key, str) for key in obj)
        and any(isinstance(value, Tensor) for value in obj.values())
    )


def _describe(obj: object) -> str:
    if isinstance(obj, Mapping):
        keys = [repr(key) for key in list(obj)[:5]]
        listed = ", ".join(keys) + (", ..." if len(obj) > 5 else "")
        return f"a {type(obj).__name__} without tensors (keys: {listed or 'none'})"
    return f"a {type(obj).__name__}"


def _find_state_dict(obj: object, path: Path) -> Mapping[str, Tensor]:
    if isinstance(obj, Mapping):
        for key in _NESTED_KEYS:
            if _is_state_dict(obj.get(key)):
                nested: Mapping[str, Tensor] = obj[key]
                return nested
    if _is_state_dict(obj):
        return cast("Mapping[str, Tensor]", obj)
    raise StateDictError(
        f"{path} holds {_describe(obj)}, not a state_dict: expected a mapping from names to tensors, "
        f"or a dict with a {' or '.join(repr(k) for k in _NESTED_KEYS)} entry that is one"
    )


def _load_safetensors(path: Path) -> Any:
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise StateDictError(
            f"reading {path} needs the safetensors package: pip install safetensors"
        ) from None
    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:  # safetensors raises its own SafetensorError, not exported stably
        raise StateDictError(f"{path} is not a readable safetensors file ({exc})") from None


def _load_torch(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # torch.save writes a zip archive; an archive that weights_only refuses holds pickled objects.
        if not zipfile.is_zipfile(path):
            raise StateDictError(f"{path} is not a PyTorch checkpoint (torch.load cannot read it)") from None
        raise StateDictError(
            f"{path} holds Python objects besides tensors (a whole pickled model?), which are not loaded "
            "because unpickling them can run arbitrary code; save model.state_dict() instead"
        ) from None
    except Exception as exc:  # a corrupt file surfaces as KeyError, RuntimeError, EOFError, ...
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise StateDictError(f"{path} is not a PyTorch checkpoint ({type(exc).__name__}: {detail})") from None


def _load_checkpoint(path: Path) -> Mapping[str, Tensor]:
    """Read the state_dict saved in ``path``; ``.safetensors`` by name, anything else with torch.load."""
    if not path.exists():
        raise StateDictError(f"{path}: no such file")
    if not path.is_file():
        raise StateDictError(f"{path} is not a file")
    loaded = _load_safetensors(path) if path.suffix.lower() == ".safetensors" else _load_torch(path)
    return _find_state_dict(loaded, path)


def _run_report(args: argparse.Namespace) -> int:
    report = sparsity_report(_load_checkpoint(args.checkpoint))
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
