"""Hugging Face models built from small configs (no weights are downloaded), with inputs for
``model(**inputs)``. Shared by the tests and ``benchmarks/hf_zoo.py``.

Every architecture has two layers (or stages), a hidden width of 64 and four heads, so the whole zoo
builds in seconds; grouped-query models have fewer key/value heads than query heads.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

# Token ids inside the small vocabulary: the configs' defaults (50256, 32000, ...) are not.
_TOKENS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
_TEXT = dict(
    vocab_size=128,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=128,
    max_position_embeddings=64,
    **_TOKENS,
)
_SEQ2SEQ = dict(
    vocab_size=128,
    d_model=64,
    encoder_layers=2,
    decoder_layers=2,
    encoder_attention_heads=4,
    decoder_attention_heads=4,
    encoder_ffn_dim=128,
    decoder_ffn_dim=128,
    decoder_start_token_id=1,
    **_TOKENS,
)
_VISION = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 128,
    "image_size": 32,
    "patch_size": 8,
}


def _configs(tf: Any) -> dict[str, Callable[[], Any]]:
    """Architecture name -> a function making its small config."""
    return {
        "bert": lambda: tf.BertConfig(**_TEXT),
        "roberta": lambda: tf.RobertaConfig(**_TEXT),
        "albert": lambda: tf.AlbertConfig(**_TEXT, embedding_size=32),
        "electra": lambda: tf.ElectraConfig(**_TEXT, embedding_size=32),
        "deberta-v2": lambda: tf.DebertaV2Config(**_TEXT),
        "distilbert": lambda: tf.DistilBertConfig(
            vocab_size=128,
            dim=64,
            n_layers=2,
            n_heads=4,
            hidden_dim=128,
            max_position_embeddings=64,
            pad_token_id=0,
        ),
        "gpt2": lambda: tf.GPT2Config(
            vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64, **_TOKENS
        ),
        "gpt_neox": lambda: tf.GPTNeoXConfig(**_TEXT),
        "opt": lambda: tf.OPTConfig(
            vocab_size=128,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            ffn_dim=128,
            max_position_embeddings=64,
            word_embed_proj_dim=64,
            **_TOKENS,
        ),
        "llama": lambda: tf.LlamaConfig(**_TEXT, num_key_value_heads=2),
        "mistral": lambda: tf.MistralConfig(**_TEXT, num_key_value_heads=2),
        "qwen2": lambda: tf.Qwen2Config(**_TEXT, num_key_value_heads=2),
        "qwen3": lambda: tf.Qwen3Config(**_TEXT, num_key_value_heads=2, head_dim=16),
        "gemma": lambda: tf.GemmaConfig(**_TEXT, num_key_value_heads=1, head_dim=16),
        "phi": lambda: tf.PhiConfig(**_TEXT),
        "phi3": lambda: tf.Phi3Config(**_TEXT, num_key_value_heads=2),
        "falcon": lambda: tf.FalconConfig(
            vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, **_TOKENS
        ),
        "bloom": lambda: tf.BloomConfig(vocab_size=128, hidden_size=64, n_layer=2, n_head=4, **_TOKENS),
        "t5": lambda: tf.T5Config(
            vocab_size=128,
            d_model=64,
            d_kv=16,
            d_ff=128,
            num_layers=2,
            num_heads=4,
            decoder_start_token_id=1,
            **_TOKENS,
        ),  # fmt: skip
        "bart": lambda: tf.BartConfig(**_SEQ2SEQ, max_position_embeddings=64),
        "whisper": lambda: tf.WhisperConfig(
            **_SEQ2SEQ,
            num_mel_bins=16,
            max_source_positions=32,
            max_target_positions=32,
            suppress_tokens=[],
            begin_suppress_tokens=[],
        ),
        "vit": lambda: tf.ViTConfig(**_VISION),
        "deit": lambda: tf.DeiTConfig(**_VISION),
        "beit": lambda: tf.BeitConfig(**_VISION, vocab_size=128),
        "dinov2": lambda: tf.Dinov2Config(**_VISION),
        "swin": lambda: tf.SwinConfig(
            image_size=32, patch_size=4, embed_dim=32, depths=[2, 2], num_heads=[2, 4], window_size=4
        ),
        "convnext": lambda: tf.ConvNextConfig(
            hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 2, 1], image_size=32
        ),
        "resnet": lambda: tf.ResNetConfig(
            embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1]
        ),
        "mobilevit": lambda: tf.MobileViTConfig(
            image_size=64,
            hidden_sizes=[48, 64, 80],
            neck_hidden_sizes=[16, 16, 24, 48, 64, 80, 160],
            num_attention_heads=4,
        ),
        "segformer": lambda: tf.SegformerConfig(
            num_encoder_blocks=2,
            depths=[1, 1],
            sr_ratios=[2, 1],
            hidden_sizes=[16, 32],
            num_attention_heads=[1, 2],
            patch_sizes=[7, 3],
            strides=[4, 2],
            decoder_hidden_size=32,
        ),
        "clip": lambda: tf.CLIPConfig(
            text_config=dict(
                vocab_size=128,
                hidden_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                intermediate_size=128,
                max_position_embeddings=32,
                **_TOKENS,
            ),
            vision_config=dict(**_VISION),
            projection_dim=32,
        ),
    }


NAMES = (
    "bert", "roberta", "albert", "electra", "deberta-v2", "distilbert", "gpt2", "gpt_neox", "opt", "llama",
    "mistral", "qwen2", "qwen3", "gemma", "phi", "phi3", "falcon", "bloom", "t5", "bart", "whisper", "vit",
    "deit", "beit", "dinov2", "swin", "convnext", "resnet", "mobilevit", "segformer", "clip",
)  # fmt: skip
_IMAGES = {"vit": 32, "deit": 32, "beit": 32, "dinov2": 32, "swin": 32, "convnext": 32, "resnet": 32,
           "segformer": 32, "mobilevit": 64}  # fmt: skip


def config(name: str) -> Any:
    """The small config of architecture ``name`` (one of :data:`NAMES`)."""
    import transformers

    return _configs(transformers)[name]()


def inputs(name: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Keyword inputs for ``model(**inputs)``: a batch of two, the second text padded."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 120, (2, 8), generator=g)
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 6:] = 0
    if name in _IMAGES:
        size = _IMAGES[name]
        return {"pixel_values": torch.randn(2, 3, size, size, generator=g)}
    if name == "whisper":
        return {"input_features": torch.randn(2, 16, 64, generator=g), "decoder_input_ids": ids[:, :4]}
    if name in ("t5", "bart"):
        return {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": ids[:, :5]}
    if name == "clip":
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "pixel_values": torch.randn(2, 3, 32, 32, generator=g),
        }
    return {"input_ids": ids, "attention_mask": mask}


def build(name: str, seed: int = 0) -> nn.Module:
    """The base model (``AutoModel``) of architecture ``name``, random weights, eval mode."""
    import transformers

    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModel.from_config(config(name))
    return model.eval()
