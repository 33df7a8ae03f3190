"""Sharded pruning on 2 and 4 gloo processes (torchrun, CPU), compared with one process doing the same.

tests/distributed_worker.py runs on every rank: FSDP2 ``fully_shard`` parameters pruned per tensor,
iteratively and globally; DTensors placed by hand (Shard(1), Replicate) with many ties; Wanda calibrated
data-parallel; a DCP checkpoint written by 2 ranks loaded into 4 and into one process; the agreement
check of replicated models. Each launch has a timeout, so a hung collective fails instead of blocking.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import masksparse
from masksparse import prune

sys.path.insert(0, str(Path(__file__).parent))
import distributed_worker as worker  # noqa: E402

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="needs torch.distributed with the gloo backend",
)


def _launch(ranks: int, out: Path, checkpoint: Path | None = None) -> list[dict[str, Any]]:
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
        str(Path(worker.__file__)), str(out),
    ]  # fmt: skip
    if checkpoint is not None:
        command.append(str(checkpoint))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(ranks)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[int, list[dict[str, Any]]]:
    two, four = tmp_path_factory.mktemp("two_ranks"), tmp_path_factory.mktemp("four_ranks")
    return {2: _launch(2, two), 4: _launch(4, four, checkpoint=two / "checkpoint"), "dirs": (two, four)}  # type: ignore[dict-item]


@pytest.fixture(scope="module")
def single() -> nn.Sequential:
    model = worker.mlp()
    worker.prune_sharded(model)
    return model


@pytest.mark.parametrize("ranks", [2, 4])
def test_sharded_masks_equal_one_process(runs: Any, single: nn.Sequential, ranks: int) -> None:
    expected = worker.whole_masks(single)
    for found in runs[ranks]:
        assert set(found["masks"]) == set(expected)
        for name, mask in expected.items():
            assert torch.equal(found["masks"][name], mask), (ranks, found.get("world"), name)
        assert set(found["mask_types"].values()) == {"DTensor"}


@pytest.mark.parametrize("ranks", [2, 4])
def test_each_rank_holds_only_its_shard_of_the_masks(runs: Any, single: nn.Sequential, ranks: int) -> None:
    whole = sum(m.numel() for m in worker.whole_masks(single).values())
    local = [found["local_mask_numel"] for found in runs[ranks]]
    assert sum(local) == whole  # Shard(0) pieces: together exactly the whole masks, no copies
    assert max(local) < whole / ranks + 4 * 16  # at most one extra row per mask (uneven rows)


@pytest.mark.parametrize("ranks", [2, 4])
def test_sharded_forward_backward_and_report(runs: Any, single: nn.Sequential, ranks: int) -> None:
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(4))
    expected = [
        (r.name, r.nonzero, r.zero_slices_dim0, r.zero_slices_dim1)
        for r in masksparse.sparsity_report(single)
    ]
    for found in runs[ranks]:
        torch.testing.assert_close(found["output"], single(x))
        assert found["grad_type"] == "DTensor"
        assert found["report"] == expected
        assert found["traffic"] > 0


def test_remove_makes_the_sharded_pruning_permanent(runs: Any, single: nn.Sequential) -> None:
    expected = single[2].weight.detach()
    for found in runs[2] + runs[4]:
        assert torch.equal(found["removed"], expected)


@pytest.mark.parametrize("ranks", [2, 4])
def test_ties_break_as_in_one_process_over_shard1_and_replicate(runs: Any, ranks: int) -> None:
    a_whole, b_whole = worker.tied()
    a, b = nn.Linear(10, 6, bias=False), nn.Linear(9, 5, bias=False)
    with torch.no_grad():
        a.weight.copy_(a_whole)
        b.weight.copy_(b_whole)
    worker.prune_tied(a, b)
    assert int((a.weight_mask == 0).sum() + (b.weight_mask == 0).sum()) == 47
    for found in runs[ranks]:
        assert torch.equal(found["tied"][0], a.weight_mask)
        assert torch.equal(found["tied"][1], b.weight_mask)
        assert found["tied_placements"] == ["(Shard(dim=1),)", "(Replicate(),)"]


@pytest.mark.parametrize("ranks", [2, 4])
def test_data_parallel_calibration_equals_one_process_on_all_data(runs: Any, ranks: int) -> None:
    model = worker.mlp()
    worker.prune_calibrated(model, worker.calibration_data())
    expected = worker.whole_masks(model)
    for found in runs[ranks]:
        assert found["calibrated"].keys() == expected.keys()
        for name, mask in expected.items():
            assert torch.equal(found["calibrated"][name], mask), name
    alone = worker.mlp()  # rank 0's batches alone choose otherwise: the sums over ranks matter
    worker.prune_calibrated(alone, worker.calibration_data()[::ranks])
    assert any(not torch.equal(m, expected[n]) for n, m in worker.whole_masks(alone).items())


def test_ranks_that_prune_differently_are_caught(runs: Any) -> None:
    for found in runs[2] + runs[4]:
        assert found["disagreement"] is not None
        assert "'2.weight_mask' differs between rank 0 (" in found["disagreement"]
        assert "and rank 1 (" in found["disagreement"]


def test_checkpoint_from_two_ranks_loads_into_four(runs: Any, single: nn.Sequential) -> None:
    expected = single.state_dict()
    for found in runs[4]:
        assert found["loaded"].keys() == expected.keys()
        for key, value in expected.items():
            assert torch.equal(found["loaded"][key], value), key
    assert sorted(found["loaded_mask_local"] for found in runs[4]) == [
        (1, 16),
        (4, 16),
        (4, 16),
        (4, 16),
    ]  # torch.chunk: 4 rows a rank


def test_checkpoint_from_two_ranks_loads_into_one_process(runs: Any, single: nn.Sequential) -> None:
    checkpoint = runs["dirs"][0] / "checkpoint"
    fresh = worker.mlp()
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
    masksparse.load_state_dict(fresh, checkpoint)
    assert list(fresh.state_dict()) == list(single.state_dict())
    for key, value in single.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    assert fresh[0].weight_mask.dtype == torch.bool

    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    consolidated = runs["dirs"][0] / "consolidated.pt"
    dcp_to_torch_save(checkpoint, consolidated)
    again = worker.mlp()
    masksparse.load_state_dict(again, consolidated)
    for key, value in single.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key


def test_a_checkpoint_that_does_not_fit_names_the_tensor(runs: Any) -> None:
    checkpoint = runs["dirs"][0] / "checkpoint"
    wrong = nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 7), nn.ReLU(), nn.Linear(7, 3))
    before = {k: v.clone() for k, v in wrong.state_dict().items()}
    with pytest.raises(
        masksparse.StateDictError, match=r"size mismatch for '0.weight_orig'.*\(12, 16\).*\(13, 16\)"
    ):
        masksparse.load_state_dict(wrong, checkpoint)
    assert not prune.is_pruned(wrong)
    assert all(torch.equal(wrong.state_dict()[k], v) for k, v in before.items())


def test_sharded_models_are_refused_where_whole_tensors_are_needed(runs: Any) -> None:
    for found in runs[2]:
        channels, unstructured = found["refused"]
        assert "prune_channels on a sharded model (0.weight_orig is a DTensor (13, 16) placed as" in channels
        assert "not a data-driven importance" in channels
        assert "prune_unstructured runs the model on whole tensors, but 0.weight_orig is a sharded" in (
            unstructured
        )
        assert found["refused_left_unchanged"]


@pytest.mark.parametrize("ranks", [2, 4])
@pytest.mark.parametrize("make", [worker.mlp, worker.convnet])
def test_prune_channels_on_sharded_models_equals_one_process(runs: Any, ranks: int, make: Any) -> None:
    model = make()
    worker.prune_structured(model)
    expected = worker.whole_masks(model)
    output = model(worker.structured_inputs(model))
    assert any(not m.all() for m in expected.values())
    for found in runs[ranks]:
        masks = found[f"structured_{make.__name__}"]
        assert masks.keys() == expected.keys()
        for name, mask in expected.items():
            assert torch.equal(masks[name], mask), (ranks, name)
        torch.testing.assert_close(found[f"structured_{make.__name__}_output"], output)


@pytest.mark.parametrize("ranks", [2, 4])
def test_heads_and_ffn_units_of_a_sharded_bert_equal_one_process(runs: Any, ranks: int) -> None:
    model = worker.bert()
    masksparse.prune_channels(model, worker.bert_inputs(), 0.5, global_ranking=True)
    expected = worker.whole_masks(model)
    output = model(**worker.bert_inputs()).last_hidden_state
    assert any(name.endswith("attention.self.query.weight_mask") for name in expected)
    for found in runs[ranks]:
        masks = found["structured_bert"]
        assert masks.keys() == expected.keys()
        assert all(torch.equal(masks[n], m) for n, m in expected.items())
        torch.testing.assert_close(found["structured_bert_output"], output)


def test_random_channel_scores_are_rank_zeros_on_every_rank(runs: Any) -> None:
    for ranks in (2, 4):
        first = runs[ranks][0]["structured_random"]
        assert any(not m.all() for m in first.values())
        for found in runs[ranks][1:]:
            assert all(torch.equal(found["structured_random"][n], m) for n, m in first.items())


def test_the_documented_torchrun_example_runs(tmp_path: Path) -> None:
    script = Path(__file__).parents[1] / "docs" / "examples" / "prune_sharded.py"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    done = subprocess.run([*command, str(script), str(tmp_path / "ckpt")], env=env, capture_output=True,
                          text=True, timeout=240)  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert "rank 1: DTensor (256, 256), this rank holds (128, 256)" in done.stdout, done.stdout
    assert "total sparsity 20.5% kept" in done.stdout, done.stdout  # biases are not pruned
    fresh = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    masksparse.load_state_dict(fresh, tmp_path / "ckpt")
    report = masksparse.sparsity_report(fresh)
    weights = [row for row in report if row.name.endswith("weight")]
    assert sum(r.numel - r.nonzero for r in weights) == round(0.8 * sum(r.numel for r in weights))


def test_data_parallel_needs_an_initialised_process_group() -> None:
    if torch.distributed.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    with pytest.raises(masksparse.MaskSparseError, match="init_process_group"), masksparse.data_parallel():
        pass
