"""Every notebook in notebooks/ runs from top to bottom without an error, and what the tutorials say holds.

Notebooks are committed without outputs; this test executes them in a fresh kernel that runs the
interpreter running the tests, with this checkout's masksparse first on its path.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
from jupyter_client.kernelspec import KernelSpecManager  # noqa: E402  (after the skips above)
from jupyter_client.manager import KernelManager  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
KERNEL = "masksparse-tests"
# The values a notebook's checks read, printed as JSON by one cell the test appends, with the kernel's
# interpreter and masksparse's location.
READ_BACK = """\
import json as _json, sys as _sys, masksparse as _masksparse
_values = {{name: globals().get(name) for name in {names!r}}}
_values["__kernel__"] = [_sys.executable, _masksparse.__file__]
print(_json.dumps(_values))"""


def check_tutorial_1(values: dict[str, Any]) -> None:
    """The numbers 01_pruning_lenet.ipynb shows and its text describes (measured: 98.0%, 98.0%, 96.9%)."""
    assert values["dense_accuracy"] >= 0.96
    assert values["same"] is True  # global_unstructured picks the masks torch.nn.utils.prune picks
    assert values["same_outputs"] is True
    assert values["reloaded_accuracy"] == values["pruned_accuracy"] >= 0.95
    sweep = {row["sparsity"]: row for row in values["sweep"]}
    # "Magnitude pruning alone costs little up to about 80%; with a short fine-tune, about 90% can go
    # for a point or so; ... with 1% of the weights left the network is no better than a guess."
    assert sweep[0.8]["pruned"] >= values["dense_accuracy"] - 0.03
    assert sweep[0.9]["fine-tuned"] >= values["dense_accuracy"] - 0.03
    assert sweep[0.9]["fine-tuned"] > sweep[0.9]["pruned"]
    assert sweep[0.99]["fine-tuned"] < 0.3


def check_tutorial_2(values: dict[str, Any]) -> None:
    """The numbers 02_compaction.ipynb shows and its text describes (measured: LeNet 60,074 -> 27,992
    parameters, MACs 0.84x, accuracy 98.2% both; ResNet-18 11,689,512 -> 5,115,656, error 3e-7)."""
    assert values["dense_accuracy"] >= 0.96
    # "the compacted model computes what the masked one computes ... so its accuracy is the same"
    assert values["max_difference"] <= 1e-5
    assert values["compacted_accuracy"] == values["masked_accuracy"] >= 0.95
    # Half of fc1's and fc2's rows, their columns in the next layer, exactly: the plan keeps nothing extra.
    assert values["lenet_params"] == [60_074, 27_992]
    macs_before, macs_after = values["lenet_macs"]
    assert 0.8 * macs_before < macs_after < 0.9 * macs_before  # "went down by only 16%"
    # One residual stream per stage, each written by several convolutions.
    assert len(values["residual_groups"]) == 4
    assert values["residual_groups"][0] == ["conv1", "layer1.0.conv2", "layer1.1.conv2"]
    assert values["resnet_params_before"] == 11_689_512
    assert values["resnet_params_after"] <= 0.6 * values["resnet_params_before"]
    assert values["resnet_error"] <= 1e-4


def check_tutorial_3(values: dict[str, Any]) -> None:
    """What 03_choosing_and_training.ipynb says (measured: compacted l1 88.7%, activation 96.0%,
    l1 + reconstruct 94.2%; SparseGPT 96.7% vs magnitude 95.3% at 90%; gradual 98.0% vs one-shot 97.3%)."""
    assert values["dense_accuracy"] >= 0.96
    compacted = {name: row["compacted"] for name, row in values["criteria"].items()}
    # "the data-driven activation criterion keeps the network far more intact than the weight norms,
    # and reconstruction adds more"; "apoz is weak here"
    assert compacted["activation"] > compacted["l1"] + 0.03 > compacted["random"]
    assert compacted["l1 + reconstruct"] > compacted["l1"] + 0.02
    assert compacted["apoz"] < compacted["l1"]
    assert all(
        row["fine-tuned"] > row["compacted"] for name, row in values["criteria"].items() if name == "l1"
    )
    # "Up to about 90%, SparseGPT's reconstruction keeps LeNet's accuracy best"
    sparsegpt, magnitude, wanda = (values["unstructured"][k] for k in ("sparsegpt", "magnitude", "wanda"))
    assert all(s >= max(m, w) - 0.005 for s, m, w in zip(sparsegpt[:4], magnitude[:4], wanda[:4]))
    # "gradual pruning ends within a fraction of a point of the dense model"
    assert abs(values["gradual_sparsity"] - 0.9) < 1e-3
    assert values["gradual_accuracy"] >= values["dense_accuracy"] - 0.005
    assert values["gradual_accuracy"] >= values["oneshot_accuracy"]
    # "It keeps under a third of the parameters and ends within a point of the dense model"
    assert values["structured_params"] < 1 / 3 and values["params"] == sorted(values["params"], reverse=True)
    assert values["structured_accuracy"] >= values["dense_accuracy"] - 0.01
    # "at least as accurate as pruning the same half of the channels at once and then training"
    assert values["structured_accuracy"] >= values["oneshot_channels_accuracy"]


CHECKS: dict[str, tuple[list[str], Callable[[dict[str, Any]], None]]] = {
    "01_pruning_lenet.ipynb": (
        ["dense_accuracy", "same", "same_outputs", "pruned_accuracy", "reloaded_accuracy", "sweep"],
        check_tutorial_1,
    ),
    "02_compaction.ipynb": (
        [
            "dense_accuracy",
            "masked_accuracy",
            "compacted_accuracy",
            "max_difference",
            "lenet_params",
            "lenet_macs",
            "residual_groups",
            "resnet_params_before",
            "resnet_params_after",
            "resnet_error",
        ],
        check_tutorial_2,
    ),
    "03_choosing_and_training.ipynb": (
        [
            "dense_accuracy",
            "criteria",
            "unstructured",
            "gradual_accuracy",
            "gradual_sparsity",
            "oneshot_accuracy",
            "structured_accuracy",
            "structured_params",
            "params",
            "oneshot_channels_accuracy",
        ],
        check_tutorial_3,
    ),
}


@pytest.fixture(scope="module")
def kernel_specs(tmp_path_factory: pytest.TempPathFactory) -> KernelSpecManager:
    """A kernelspec running this interpreter, so the notebooks see the packages the tests see."""
    directory = tmp_path_factory.mktemp("kernels")
    (directory / KERNEL).mkdir()
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "masksparse tests",
        "language": "python",
        "env": {"PYTHONPATH": path},
    }
    (directory / KERNEL / "kernel.json").write_text(json.dumps(spec))
    return KernelSpecManager(kernel_dirs=[str(directory)])


def execute(notebook: Any, kernel_specs: KernelSpecManager) -> None:
    """Run every cell in a fresh kernel; nbclient raises CellExecutionError at the first failing cell."""
    manager = KernelManager(kernel_name=KERNEL, kernel_spec_manager=kernel_specs)
    client = nbclient.NotebookClient(
        notebook,
        km=manager,
        timeout=120,  # per cell; each tutorial takes about 30 s on 2 cores
        startup_timeout=120,
        coalesce_streams=True,  # one output per stream and cell, as Jupyter shows it
        resources={"metadata": {"path": str(ROOT / "notebooks")}},
    )
    client.execute()


def test_there_are_notebooks() -> None:
    assert [path.name for path in NOTEBOOKS if path.name in CHECKS] == sorted(CHECKS)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[path.name for path in NOTEBOOKS])
def test_notebook_is_committed_without_outputs(path: Path) -> None:
    """Outputs come from running the notebook, never from the file: diffs stay readable, nothing is stale."""
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    for index, cell in enumerate(notebook.cells):
        if cell.cell_type == "code":
            assert (cell.outputs, cell.execution_count) == ([], None), f"cell {index} has outputs"


@pytest.mark.timeout(600)
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[path.name for path in NOTEBOOKS])
def test_notebook_runs(path: Path, kernel_specs: KernelSpecManager) -> None:
    """No cell raises or writes to stderr (a warning in a tutorial is a bug), and the checked numbers hold."""
    notebook = nbformat.read(path, as_version=4)
    names, check = CHECKS.get(path.name, ([], None))
    notebook.cells.append(nbformat.v4.new_code_cell(READ_BACK.format(names=names)))
    execute(notebook, kernel_specs)
    stderr = [
        (index, output.text)
        for index, cell in enumerate(notebook.cells)
        for output in cell.get("outputs", [])
        if output.output_type == "stream" and output.name == "stderr"
    ]
    assert stderr == []
    # A long print can arrive in several stream messages.
    printed = "".join(o.text for o in notebook.cells[-1].outputs if o.output_type == "stream")
    values = json.loads(printed)
    assert values.pop("__kernel__") == [sys.executable, str(ROOT / "masksparse" / "__init__.py")]
    if check is not None:
        check(values)
