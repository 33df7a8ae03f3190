"""One timm model per family (timm's model modules), the smallest of each by parameters, built with
``pretrained=False`` (nothing is downloaded). Shared by the tests and ``benchmarks/timm_zoo.py``.

The table was made with timm 1.0.31 by building every registered model on the meta device and keeping
the one with the fewest parameters in each module (``timm.list_modules()``); the figure is millions of
parameters.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

FAMILIES: dict[str, tuple[str, float]] = {
    "beit": ("beit_base_patch16_224", 86.5),
    "byoanet": ("halonet_h1", 8.1),
    "byobnet": ("test_byobnet", 0.5),
    "cait": ("cait_xxs24_224", 12.0),
    "coat": ("coat_tiny", 5.5),
    "convit": ("convit_tiny", 5.7),
    "convmixer": ("convmixer_768_32", 21.1),
    "convnext": ("test_convnext", 0.3),
    "cpubone": ("cpubone_nano", 6.5),
    "crossvit": ("crossvit_tiny_240", 7.0),
    "csatv2": ("csatv2", 11.1),
    "cspnet": ("cs3darknet_focus_s", 3.3),
    "cspnext": ("cspnext_tiny", 2.7),
    "davit": ("davit_tiny", 28.4),
    "deepseek_vit": ("deepseek_vit_412m", 411.8),
    "deit": ("deit_tiny_patch16_224", 5.7),
    "densenet": ("densenet121", 8.0),
    "dla": ("dla46x_c", 1.1),
    "dpn": ("dpn48b", 9.1),
    "edgenext": ("edgenext_xx_small", 1.3),
    "efficientformer": ("efficientformer_l1", 12.3),
    "efficientformer_v2": ("efficientformerv2_s0", 3.6),
    "efficientnet": ("test_efficientnet", 0.4),
    "efficientvim": ("efficientvim_m1", 6.7),
    "efficientvit_mit": ("efficientvit_b0", 3.4),
    "efficientvit_msra": ("efficientvit_m0", 2.3),
    "eva": ("vit_tiny_patch16_dinov3_qkvb", 5.5),
    "fasternet": ("fasternet_t0", 3.9),
    "fastvit": ("fastvit_t8", 4.0),
    "focalnet": ("focalnet_tiny_srf", 28.4),
    "gcvit": ("gcvit_xxtiny", 12.0),
    "gemma4_vit": ("gemma4_vit_167m", 167.4),
    "ghostnet": ("ghostnet_050", 2.6),
    "hardcorenas": ("hardcorenas_b", 5.2),
    "hgnet": ("hgnetv2_b0", 6.0),
    "hiera": ("hiera_tiny_224", 27.9),
    "hieradet_sam2": ("sam2_hiera_tiny", 26.9),
    "hrnet": ("hrnet_w18_small", 13.2),
    "iformer": ("iformer_t", 2.9),
    "inception_next": ("inception_next_atto", 4.2),
    "inception_resnet_v2": ("inception_resnet_v2", 55.8),
    "inception_v3": ("inception_v3", 23.8),
    "inception_v4": ("inception_v4", 42.7),
    "lcnetv2": ("lcnetv2_small", 4.1),
    "levit": ("levit_128s", 7.8),
    "lowformer": ("lowformer_b0", 14.1),
    "mambaout": ("test_mambaout", 0.4),
    "maxxvit": ("test_coatnet", 0.6),
    "metaformer": ("poolformerv2_s12", 11.9),
    "mlp_mixer": ("gmlp_ti16_224", 5.9),
    "mobilenetv3": ("mobilenetv3_small_050", 1.6),
    "mobilenetv5": ("mobilenetv5_base", 82.6),
    "mobilevit": ("mobilevit_xxs", 1.3),
    "mvitv2": ("mvitv2_tiny", 24.2),
    "naflexvit": ("naflexvit_base_patch16_parfac_gap", 86.5),
    "nasnet": ("nasnetalarge", 88.8),
    "nest": ("nest_tiny", 17.1),
    "nextvit": ("nextvit_small", 31.8),
    "nfnet": ("test_nfnet", 0.4),
    "pit": ("pit_ti_224", 4.8),
    "pnasnet": ("pnasnet5large", 86.1),
    "pvt_v2": ("pvt_v2_b0", 3.7),
    "qwen3_vit": ("qwen3_vit_88m", 87.4),
    "rdnet": ("rdnet_tiny", 23.9),
    "regnet": ("regnetx_002", 2.7),
    "repghost": ("repghostnet_050", 2.3),
    "repvit": ("repvit_m1", 5.5),
    "res2net": ("res2next50", 24.7),
    "resnest": ("resnest14d", 10.6),
    "resnet": ("test_resnet", 0.5),
    "resnetv2": ("resnetv2_18", 11.7),
    "rexnet": ("rexnet_100", 4.8),
    "selecsls": ("selecsls42", 30.4),
    "senet": ("legacy_seresnet18", 11.8),
    "sequencer": ("sequencer2d_s", 27.7),
    "shvit": ("shvit_s1", 6.3),
    "sknet": ("skresnet18", 12.0),
    "starnet": ("starnet_s050", 0.5),
    "swiftformer": ("swiftformer_xs", 3.5),
    "swin_transformer": ("swin_tiny_patch4_window7_224", 28.3),
    "swin_transformer_v2": ("swinv2_tiny_window8_256", 28.3),
    "swin_transformer_v2_cr": ("swinv2_cr_tiny_224", 28.3),
    "tiny_vit": ("tiny_vit_5m_224", 12.1),
    "tnt": ("tnt_s_legacy_patch16_224", 23.8),
    "tresnet": ("tresnet_m", 31.4),
    "twins": ("twins_svt_small", 24.1),
    "vgg": ("vgg11", 132.9),
    "visformer": ("visformer_tiny", 10.3),
    "vision_transformer": ("test_vit", 0.4),
    "vision_transformer_hybrid": ("vit_tiny_r_s16_p8_224", 6.3),
    "vision_transformer_relpos": ("test_vit_relpos", 0.9),
    "vision_transformer_sam": ("samvit_base_patch16_224", 86.5),
    "vitamin": ("vitamin_small_224", 22.2),
    "volo": ("volo_d1_224", 26.6),
    "vovnet": ("ese_vovnet19b_slim_dw", 1.9),
    "xception": ("legacy_xception", 22.9),
    "xception_aligned": ("xception41p", 26.9),
    "xcit": ("xcit_nano_12_p8_224", 3.0),
}


def build(name: str, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    """timm model ``name`` with random weights in eval mode, and one input of its default size."""
    import timm

    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = timm.create_model(name, pretrained=False).eval()
    size = model.pretrained_cfg.get("input_size", (3, 224, 224))
    return model, torch.randn(1, *size, generator=torch.Generator().manual_seed(seed))
