"""Tests of masksparse.compact.saving and masksparse.compact.huggingface.

The invariant: a compacted model saved with ``save_compacted`` and rebuilt by ``load_compacted`` from a
freshly built model (other random weights) computes exactly what the compacted model computes; a file
that does not fit the fresh model raises, naming the first module that does not fit, and changes
nothing. A Hugging Face model's config describes the compacted sizes wherever one value does.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from masksparse import (
    KeptUnitsWarning,
    StateDictError,
    compact,
    compaction_plans,
    load_compacted,
    prune_channels,
    save_compacted,
    save_state_dict,
)
from masksparse.compact.modules import CompactMultiheadAttention
from tests import hf_models
from tests.models import randomise_bn

torchvision = pytest.importorskip("torchvision")
safetensors = pytest.importorskip("safetensors")
pytest.importorskip("safetensors.torch")  # safetensors.torch.save_file below


def _run(model: nn.Module, inputs: Any) -> Any:
    with torch.no_grad():
        out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
    if isinstance(out, torch.Tensor):
        return out
    return out[0]  # a ModelOutput's first tensor (last_hidden_state)


def _compacted(model: nn.Module, inputs: Any, amount: Any = 0.5, **options: Any) -> nn.Module:
    prune_channels(model, inputs, amount, **options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", KeptUnitsWarning)
        return compact(model, inputs)


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _resnet(seed: int = 0, depth: int = 18) -> nn.Module:
    torch.manual_seed(seed)
    builder = torchvision.models.resnet18 if depth == 18 else torchvision.models.resnet34
    return randomise_bn(builder(weights=None, num_classes=10), seed).eval()


def _vit(seed: int = 0, layers: int = 2) -> nn.Module:
    torch.manual_seed(seed)
    return torchvision.models.VisionTransformer(
        32, 16, num_layers=layers, num_heads=4, hidden_dim=32, mlp_dim=64, num_classes=10
    ).eval()


def _swin(seed: int = 0) -> nn.Module:
    """A small torchvision Swin (heads of 8, 4x4 windows): its attention is swapped to a compact class."""
    from torchvision.models.swin_transformer import SwinTransformer

    torch.manual_seed(seed)
    return SwinTransformer([4, 4], 16, [2, 2], [2, 4], [4, 4], num_classes=10).eval()


def _timm(name: str, **options: Any) -> Callable[[int], nn.Module]:
    def build(seed: int = 0) -> nn.Module:
        timm = pytest.importorskip("timm")
        torch.manual_seed(seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return timm.create_model(name, pretrained=False, num_classes=10, **options).eval()

    return build


def _hf(name: str) -> Callable[[int], nn.Module]:
    def build(seed: int = 0) -> nn.Module:
        pytest.importorskip("transformers")
        return hf_models.build(name, seed)

    return build


IMAGES = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
CASES: dict[str, tuple[Callable[..., nn.Module], Callable[[], Any]]] = {
    "resnet18": (_resnet, lambda: IMAGES),
    "vit": (_vit, lambda: IMAGES),
    "swin": (_swin, lambda: IMAGES),
    "timm_vit": (_timm("test_vit", img_size=32), lambda: IMAGES),
    "timm_resnet": (_timm("test_resnet"), lambda: IMAGES),
    "bert": (_hf("bert"), lambda: hf_models.inputs("bert")),
    "llama": (_hf("llama"), lambda: hf_models.inputs("llama")),
}


@pytest.mark.parametrize("name", list(CASES))
def test_rebuilt_model_computes_what_the_compacted_one_does(
    name: str, tmp_path: Path, one_thread: None
) -> None:
    """Save, rebuild from a fresh model of another seed: outputs and state_dict are identical."""
    build, make_inputs = CASES[name]
    inputs = make_inputs()
    small = _compacted(build(0), inputs)
    before = sum(p.numel() for p in build(0).parameters())
    assert sum(p.numel() for p in small.parameters()) < before  # something was removed
    path = tmp_path / "small.safetensors"
    save_compacted(small, path)
    fresh = build(1)
    rebuilt = load_compacted(fresh, path)
    assert rebuilt is fresh
    assert torch.equal(_run(rebuilt, inputs), _run(small, inputs))
    expected = small.state_dict()
    assert set(rebuilt.state_dict()) == set(expected)  # the order may differ: masks removal re-registers
    assert all(torch.equal(t, expected[k]) for k, t in rebuilt.state_dict().items())
    assert len(compaction_plans(rebuilt)) == 1
    assert [type(m) for m in rebuilt.modules()] == [type(m) for m in small.modules()]  # classes swapped too


def test_file_is_safetensors_with_json_metadata(tmp_path: Path) -> None:
    """The file opens with safe_open (no pickle can be in it) and its record is JSON naming the cuts."""
    small = _compacted(_vit(), IMAGES)
    path = tmp_path / "vit.safetensors"
    save_compacted(small, path)
    with safetensors.safe_open(str(path), framework="pt") as f:
        record = json.loads(f.metadata()["masksparse.compacted"])
        keys = set(f.keys())
    assert record["version"] == 1 and len(record["plans"]) == 1
    cut = record["plans"][0]["cuts"][0]
    plan = compaction_plans(small)[0]
    assert cut == [plan.cuts[0].module, plan.cuts[0].tensor, plan.cuts[0].dim, plan.cuts[0].size,
                   list(plan.cuts[0].keep)]  # fmt: skip
    swaps = [a for a in record["plans"][0]["attributes"] if a[1] == "__class__"]
    assert swaps and swaps[0][3] == {"class": "masksparse.compact.modules:CompactMultiheadAttention"}
    assert keys == set(small.state_dict())
    assert not path.read_bytes().startswith(b"PK")  # not a torch zip/pickle archive
    rebuilt = load_compacted(_vit(1), path)
    assert isinstance(rebuilt.encoder.layers[0].self_attention, CompactMultiheadAttention)


def test_tied_tensors_are_stored_once(tmp_path: Path) -> None:
    """A tensor under two names is written once; loading restores both names."""
    model = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 10, bias=False))
    model[3].weight = model[0].weight
    ids = torch.randint(0, 10, (2, 5))
    small = _compacted(model, ids)
    path = tmp_path / "tied.safetensors"
    save_compacted(small, path)
    with safetensors.safe_open(str(path), framework="pt") as f:
        assert set(f.keys()) == set(small.state_dict()) - {"3.weight"}
        assert json.loads(f.metadata()["masksparse.compacted"])["ties"] == {"3.weight": "0.weight"}
    fresh = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 10, bias=False))
    fresh[3].weight = fresh[0].weight
    rebuilt = load_compacted(fresh, path)
    assert rebuilt[3].weight is rebuilt[0].weight
    assert torch.equal(rebuilt(ids), small(ids))


@pytest.mark.parametrize("name", ["resnet18", "vit"])
def test_compacted_twice_replays_both(name: str, tmp_path: Path) -> None:
    """A model compacted, pruned and compacted again carries two plans; the file replays both (the
    second swaps a CompactMultiheadAttention to fewer heads again)."""
    build = CASES[name][0]
    small = _compacted(build(0), IMAGES, 0.25)
    smaller = _compacted(small, IMAGES, 0.5)
    assert len(compaction_plans(smaller)) == 2
    assert sum(p.numel() for p in smaller.parameters()) < sum(p.numel() for p in small.parameters())
    path = tmp_path / "twice.safetensors"
    save_compacted(smaller, path)
    rebuilt = load_compacted(build(1), path)
    assert torch.equal(_run(rebuilt, IMAGES), _run(smaller, IMAGES))
    assert [type(m) for m in rebuilt.modules()] == [type(m) for m in smaller.modules()]


def test_damaged_record_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    save_compacted(_compacted(_vit(), IMAGES), path)
    with safetensors.safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
    record = json.loads(metadata["masksparse.compacted"])
    del record["plans"][0]["cuts"]
    safetensors.torch.save_file(tensors, str(path), {**metadata, "masksparse.compacted": json.dumps(record)})
    fresh = _vit(1)
    with pytest.raises(StateDictError, match="compaction record is damaged"):
        load_compacted(fresh, path)
    assert fresh.encoder.layers[0].mlp[0].out_features == 64


def test_uncompacted_model_round_trips(tmp_path: Path) -> None:
    model = _vit()
    path = tmp_path / "plain.safetensors"
    save_compacted(model, path)
    assert torch.equal(load_compacted(_vit(1), path)(IMAGES), model(IMAGES))


@pytest.mark.parametrize(
    ("save", "load", "first", "why"),
    [
        (lambda: _resnet(0, 18), lambda: _resnet(1, 34), "layer1.2.conv1", "weight of shape (64, 64, 3, 3)"),
        (lambda: _vit(0, 2), lambda: _vit(1, 1), "encoder.layers.encoder_layer_1", "no such module"),
        (
            lambda: _vit(0, 2),
            lambda: _vit(1, 3),
            "encoder.layers.encoder_layer_2.ln_1",
            "the file does not have",
        ),
    ],
    ids=["resnet18-into-resnet34", "vit2-into-vit1", "vit2-into-vit3"],
)
def test_a_file_that_does_not_fit_names_the_first_module_and_changes_nothing(
    save: Callable[[], nn.Module], load: Callable[[], nn.Module], first: str, why: str, tmp_path: Path
) -> None:
    path = tmp_path / "model.safetensors"
    save_compacted(_compacted(save(), IMAGES), path)
    fresh = load()
    state, classes = _state(fresh), [type(m) for m in fresh.modules()]
    with pytest.raises(StateDictError, match="does not fit") as caught:
        load_compacted(fresh, path)
    headline = str(caught.value).splitlines()[0]
    assert f"first module that does not fit is '{first}" in headline
    assert why in headline
    assert [type(m) for m in fresh.modules()] == classes
    now = fresh.state_dict()
    assert list(now) == list(state) and all(torch.equal(now[k], v) for k, v in state.items())


def test_hf_file_into_fewer_layers(tmp_path: Path) -> None:
    """A BERT of two layers cannot take the file of a BERT of three: the first missing layer is named."""
    transformers = pytest.importorskip("transformers")
    inputs = hf_models.inputs("bert")
    config = hf_models.config("bert")
    config.num_hidden_layers = 3
    torch.manual_seed(0)
    path = tmp_path / "bert.safetensors"
    save_compacted(_compacted(transformers.BertModel(config).eval(), inputs), path)
    fresh = hf_models.build("bert", 1)
    state = _state(fresh)
    with pytest.raises(StateDictError, match="first module that does not fit is 'encoder.layer.2"):
        load_compacted(fresh, path)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in state.items())


def test_plain_safetensors_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "plain.safetensors"
    save_state_dict(nn.Linear(2, 2), path)
    with pytest.raises(StateDictError, match="holds no compaction record"):
        load_compacted(nn.Linear(2, 2), path)
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(StateDictError, match="not a readable safetensors file"):
        load_compacted(nn.Linear(2, 2), tmp_path / "junk.safetensors")


def test_a_file_cannot_name_another_class(tmp_path: Path) -> None:
    """A class swap resolves only among compaction's swap classes: a file naming another is refused."""
    small = _compacted(_vit(), IMAGES)
    path = tmp_path / "vit.safetensors"
    save_compacted(small, path)
    with safetensors.safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
    edited = metadata["masksparse.compacted"].replace("masksparse.compact.modules:", "os:")
    safetensors.torch.save_file(tensors, str(path), {**metadata, "masksparse.compacted": edited})
    with pytest.raises(StateDictError, match="not a class compaction swaps"):
        load_compacted(_vit(1), path)


# ---- Hugging Face configs


def _mlp_only(model: nn.Module) -> dict[nn.Module, float]:
    """Amounts pruning only the feed-forward layers of a BERT (its attention keeps its heads)."""
    return {layer.attention: 0.0 for layer in model.encoder.layer}


@pytest.mark.parametrize("name", ["bert", "llama"])
def test_uniform_config_round_trips_through_from_pretrained(name: str, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    model, inputs = hf_models.build(name), hf_models.inputs(name)
    amounts = _mlp_only(model) if name == "bert" else {}
    small = _compacted(model, inputs, 0.5, amounts=amounts)
    mlp = small.encoder.layer[0].intermediate.dense if name == "bert" else small.layers[0].mlp.up_proj
    assert small.config.intermediate_size == mlp.out_features == 64
    assert model.config.intermediate_size == 128  # the masked model's config is its own
    plan = compaction_plans(small)[0]
    assert "config: intermediate_size = 64 (was 128)" in str(plan)
    assert plan.config_mismatch == ""  # the updated config describes every tensor
    small.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = transformers.AutoModel.from_pretrained(tmp_path).eval()
    assert torch.equal(_run(loaded, inputs), _run(small, inputs))


@pytest.mark.parametrize("name", ["llama", "qwen2", "phi"])
def test_inferred_heads_round_trip_through_from_pretrained(name: str, tmp_path: Path) -> None:
    """Llama-style attention reshapes to ``(-1, head_dim)``, so no attribute holds its heads: grouped
    query heads go with their key/value head, and the config states both counts. Qwen2 and Phi
    derive the head size from the number of heads unless the config names it, so ``head_dim`` is set."""
    transformers = pytest.importorskip("transformers")
    model, inputs = hf_models.build(name), hf_models.inputs(name)
    kv_heads = model.config.num_key_value_heads
    small = _compacted(model, inputs, 0.5)
    attn = small.layers[0].self_attn
    assert attn.q_proj.out_features == 32 and attn.k_proj.out_features == 16 * kv_heads // 2
    assert (small.config.num_attention_heads, small.config.num_key_value_heads) == (2, kv_heads // 2)
    assert small.config.head_dim == 16
    plan = compaction_plans(small)[0]
    assert "heads: layers.0.self_attn keeps 2 of 4" in str(plan) and plan.config_mismatch == ""
    path = tmp_path / "small.safetensors"
    save_compacted(small, path)
    rebuilt = load_compacted(hf_models.build(name, 1), path)
    assert compaction_plans(rebuilt)[0].heads == plan.heads
    assert torch.equal(_run(rebuilt, inputs), _run(small, inputs))
    small.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = transformers.AutoModel.from_pretrained(tmp_path).eval()
    assert torch.equal(_run(loaded, inputs), _run(small, inputs))


def test_heads_the_config_cannot_express_are_stated_and_load_compacted_still_works(tmp_path: Path) -> None:
    """BERT derives its head size from hidden_size // num_attention_heads: fewer heads of the same size
    have no config value, so it stays, the plan says why, and save_compacted still rebuilds the model."""
    inputs = hf_models.inputs("bert")
    small = _compacted(hf_models.build("bert"), inputs)
    assert small.encoder.layer[0].attention.self.num_attention_heads == 2
    assert small.config.num_attention_heads == 4
    text = str(compaction_plans(small)[0])
    assert "config: num_attention_heads stays 4" in text and "derives" in text
    assert "from_pretrained would not rebuild" in text
    assert (
        "'encoder.layer.0.attention.self.query.weight' of shape (64, 64), the compacted one (32, 64)" in text
    )
    path = tmp_path / "bert.safetensors"
    save_compacted(small, path)
    rebuilt = load_compacted(hf_models.build("bert", 1), path)
    assert torch.equal(_run(rebuilt, inputs), _run(small, inputs))
    assert rebuilt.config.intermediate_size == small.config.intermediate_size == 64


def test_sizes_differing_over_layers_stay_and_are_stated(tmp_path: Path) -> None:
    """Per-layer amounts give the MLPs of two LLaMA layers two widths: intermediate_size stays, the plan
    says so, and load_compacted rebuilds the model from a fresh one."""
    model, inputs = hf_models.build("llama"), hf_models.inputs("llama")
    small = _compacted(model, inputs, 0.5, amounts={model.layers[1]: 0.25})
    widths = [layer.mlp.up_proj.out_features for layer in small.layers]
    assert widths == [64, 96]
    assert small.config.intermediate_size == 128
    text = str(compaction_plans(small)[0])
    assert "config: intermediate_size stays 128: modules that held 128 now hold 64, 96" in text
    assert "from_pretrained would not rebuild" in text
    path = tmp_path / "llama.safetensors"
    save_compacted(small, path)
    rebuilt = load_compacted(hf_models.build("llama", 1), path)
    assert [layer.mlp.up_proj.out_features for layer in rebuilt.layers] == widths
    assert torch.equal(_run(rebuilt, inputs), _run(small, inputs))
