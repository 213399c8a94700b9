"""Backbones (insightface iresnet) and margin heads. No Ray here."""

from unibct_ray.models.heads import (
    NormalizedClassifier,
    Reducer,
    arcface,
    cosface,
    margin_function,
    sharded_cross_entropy,
    softmax_logits,
)
from unibct_ray.models.iresnet import BACKBONE_SPECS, IResNet, build_backbone

__all__ = [
    "BACKBONE_SPECS",
    "IResNet",
    "build_backbone",
    "NormalizedClassifier",
    "Reducer",
    "arcface",
    "cosface",
    "softmax_logits",
    "margin_function",
    "sharded_cross_entropy",
]
