"""Tests of the command line: run main() in-process on checkpoints written to tmp_path."""

from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.utils.prune as torch_prune
from torch import Tensor, nn

import masksparse
from masksparse import prune as ms_prune
from masksparse.cli import main
from masksparse.report import sparsity_report


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 3 * 3, 5))


def _pruned_state(prune: Any = torch_prune) -> dict[str, Tensor]:
    net = _net()
    prune.ln_structured(net[0], "weight", amount=1, n=2, dim=0)
    prune.l1_unstructured(net[3], "weight", amount=0.5)
    return dict(net.state_dict())


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _assert_one_line_error(code: int, out: str, err: str, *fragments: str) -> None:
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("masksparse: error: ")
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err


@pytest.mark.parametrize(
    "prune", [torch_prune, ms_prune, None], ids=["torch-pruned", "masksparse-pruned", "plain"]
)
def test_report_prints_the_table(prune: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pruned = prune is not None
    state = _pruned_state(prune) if pruned else dict(_net().state_dict())
    torch.save(state, tmp_path / "net.pt")
    code, out, err = _run(["report", str(tmp_path / "net.pt")], capsys)
    assert (code, err) == (0, "")
    report = sparsity_report(state)
    assert out == f"{report}\n"
    assert out.splitlines()[-1].split()[0] == "total"
    assert (report.total.sparsity > 0) == pruned


def test_report_markdown(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = _pruned_state()
    torch.save(state, tmp_path / "net.pth")
    code, out, _ = _run(["report", str(tmp_path / "net.pth"), "--format", "markdown"], capsys)
    assert code == 0
    assert out == sparsity_report(state).to_markdown() + "\n"
    assert "| 0.weight " in out


@pytest.mark.parametrize("key", ["state_dict", "model"])
def test_report_reads_a_nested_state_dict(
    key: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = _pruned_state()
    torch.save({key: state, "epoch": 3, "optimizer": {"state": {}}}, tmp_path / "checkpoint.pt")
    code, out, _ = _run(["report", str(tmp_path / "checkpoint.pt")], capsys)
    assert code == 0
    assert out == f"{sparsity_report(state)}\n"


@pytest.mark.parametrize("bool_masks", [False, True], ids=["float-masks", "bool-masks"])
def test_report_reads_safetensors(
    bool_masks: bool, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    save_file = pytest.importorskip("safetensors.torch").save_file
    state = _pruned_state()
    if bool_masks:
        state = {key: value.bool() if key.endswith("_mask") else value for key, value in state.items()}
    save_file(state, str(tmp_path / "net.safetensors"))
    code, out, _ = _run(["report", str(tmp_path / "net.safetensors")], capsys)
    assert code == 0
    # safetensors stores keys sorted, so compare rows by name, then the totals line.
    expected = sparsity_report(state)
    assert sorted(out.splitlines()[2:-2]) == sorted(str(expected).splitlines()[2:-2])
    assert out.splitlines()[-1] == str(expected).splitlines()[-1]


def test_safetensors_missing_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "net.safetensors").write_bytes(b"")
    monkeypatch.setitem(sys.modules, "safetensors", None)
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    result = _run(["report", str(tmp_path / "net.safetensors")], capsys)
    _assert_one_line_error(*result, "pip install safetensors")


def _write_bad_files(tmp_path: Path) -> dict[str, Path]:
    torch.save({"epoch": 3, "lr": 0.1}, tmp_path / "no_tensors.pt")
    torch.save(torch.ones(3), tmp_path / "tensor.pt")
    torch.save(_net(), tmp_path / "whole_model.pt")
    (tmp_path / "text.pt").write_text("not a checkpoint")
    (tmp_path / "text.safetensors").write_text("not a checkpoint")
    return {
        "missing": tmp_path / "missing.pt",
        "directory": tmp_path,
        "no_tensors": tmp_path / "no_tensors.pt",
        "tensor": tmp_path / "tensor.pt",
        "whole_model": tmp_path / "whole_model.pt",
        "text": tmp_path / "text.pt",
        "text_safetensors": tmp_path / "text.safetensors",
    }


@pytest.mark.parametrize(
    ("case", "fragment"),
    [
        ("missing", "no such file"),
        ("directory", "is not a file"),
        ("no_tensors", "not a state_dict"),
        ("tensor", "holds a Tensor, not a state_dict"),
        ("whole_model", "save model.state_dict() instead"),
        ("text", "not a PyTorch checkpoint"),
        ("text_safetensors", "not a readable safetensors file"),
    ],
)
def test_unreadable_checkpoints_exit_2_with_one_line(
    case: str, fragment: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _write_bad_files(tmp_path)[case]
    _assert_one_line_error(*_run(["report", str(path)], capsys), str(path), fragment)


def test_mask_shape_mismatch_is_a_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.save({"fc.weight_orig": torch.ones(2, 2), "fc.weight_mask": torch.ones(3)}, tmp_path / "bad.pt")
    _assert_one_line_error(*_run(["report", str(tmp_path / "bad.pt")], capsys), "fc.weight_mask")


@pytest.mark.parametrize(
    "argv", [[], ["report"], ["report", "x.pt", "--format", "html"], ["frobnicate"]], ids=str
)
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _run(argv, capsys)
    assert code == 2 and out == ""
    assert "usage: masksparse" in err and "Traceback" not in err


def test_version_and_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert _run(["--version"], capsys)[:2] == (0, f"masksparse {masksparse.__version__}\n")
    code, out, _ = _run(["report", "--help"], capsys)
    assert code == 0 and "CHECKPOINT" in out and "markdown" in out


def test_demo_calls_run_demo(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """The demo command delegates to masksparse.examples.run_demo (replaced here: the real one trains)."""
    calls: list[tuple[object, ...]] = []
    fake = types.ModuleType("masksparse.examples")
    fake.run_demo = lambda *args: calls.append(args)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "masksparse.examples", fake)
    assert main(["demo"]) == 0
    assert calls == [()]


def test_python_dash_m_version() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "masksparse", "--version"], capture_output=True, text=True, timeout=120
    )
    expected = (0, f"masksparse {masksparse.__version__}\n", "")
    assert (result.returncode, result.stdout, result.stderr) == expected
