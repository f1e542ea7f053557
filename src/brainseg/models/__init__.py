"""The networks, registered by name (as segmentation_models.pytorch does)."""

from __future__ import annotations

from torch import nn

from ..config import DISPLAY_NAMES, ModelConfig  # noqa: F401  (re-exported)
from .attention_unet import AttentionUNet
from .unetpp import UNetPlusPlus

MODELS: dict[str, type[nn.Module]] = {
    "unetpp": UNetPlusPlus,
    "attention_unet": AttentionUNet,
}


def build_model(cfg: ModelConfig) -> nn.Module:
    if cfg.name not in MODELS:
        raise ValueError(f"unknown model {cfg.name!r}; choose one of {sorted(MODELS)}")
    return MODELS[cfg.name](cfg.in_channels, cfg.out_channels, tuple(cfg.features), cfg.deep_supervision, spatial_dims=cfg.spatial_dims)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
