"""Improved ResNet ("iresnet") face backbones in the insightface convention.

Layout (input ``[b, 3, H, W]``, pixels already normalised by the caller):

* stem: conv3x3(3 -> w0, stride 1) -> BN -> PReLU
* four stages of :class:`IBasicBlock` with widths ``w1..w4`` (64/128/256/512 for the
  published models); the first block of every stage has stride 2, so ``H`` shrinks by 16
  (112 -> 7);
* head: BN2d -> flatten -> dropout -> Linear(w4 * h * w -> d) -> BatchNorm1d(d) whose scale
  is frozen at 1 (only its shift is learnt).

The embedding ``[b, d]`` is the BatchNorm1d output and is **not** L2-normalised: margin
heads, compatibility losses and IJB-C pooling normalise where their formulas say so
(IJB-C sums un-normalised flip features before normalising the template).

Depths: r18 [2,2,2,2], r34 [3,4,6,3], r50 [3,4,14,3], r100 [3,13,30,3]. ``tiny`` is a
width/depth-reduced variant (16/32/64/128 channels, one block per stage) for 32-56 px
synthetic images on CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["IBasicBlock", "IResNet", "BackboneSpec", "BACKBONE_SPECS", "build_backbone", "final_map_size"]


@dataclass(frozen=True)
class BackboneSpec:
    """Widths (stem + 4 stages) and blocks per stage of one named backbone."""

    stem_width: int
    widths: tuple[int, int, int, int]
    layers: tuple[int, int, int, int]


_PUBLISHED_WIDTHS = (64, 128, 256, 512)

BACKBONE_SPECS: dict[str, BackboneSpec] = {
    "r18": BackboneSpec(64, _PUBLISHED_WIDTHS, (2, 2, 2, 2)),
    "r34": BackboneSpec(64, _PUBLISHED_WIDTHS, (3, 4, 6, 3)),
    "r50": BackboneSpec(64, _PUBLISHED_WIDTHS, (3, 4, 14, 3)),
    "r100": BackboneSpec(64, _PUBLISHED_WIDTHS, (3, 13, 30, 3)),
    "tiny": BackboneSpec(16, (16, 32, 64, 128), (1, 1, 1, 1)),
    # Twice tiny's depth at its widths: the stronger "new" model of the synthetic science run
    # (as r18 -> r50 on MS1Mv3), about 2x tiny's cost on CPU.
    "small": BackboneSpec(16, (16, 32, 64, 128), (2, 2, 2, 2)),
}

# Spelled out rather than left to the torch default: checkpoints converted from other
# frameworks must use the same epsilon to reproduce their features.
_BN_EPS = 1e-5


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


def final_map_size(input_size: int, num_stages: int = 4) -> int:
    """Spatial side after ``num_stages`` stride-2 stages: ``ceil`` halving (3x3, pad 1).

    ``out = floor((in + 2 - 3) / 2) + 1 = ceil(in / 2)``; 112 -> 7, 48 -> 3, 32 -> 2.
    """
    size = int(input_size)
    for _ in range(num_stages):
        size = (size + 1) // 2
    return size


class IBasicBlock(nn.Module):
    """Pre-activation-style residual block: BN -> conv3x3 -> BN -> PReLU -> conv3x3(stride) -> BN.

    ``out = F(x) + shortcut(x)`` where ``shortcut`` is identity, or conv1x1(stride) + BN when
    the channel count or the resolution changes. No activation after the sum (insightface).
    """

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin, eps=_BN_EPS)
        self.conv1 = _conv3x3(cin, cout)
        self.bn2 = nn.BatchNorm2d(cout, eps=_BN_EPS)
        self.prelu = nn.PReLU(cout)
        self.conv2 = _conv3x3(cout, cout, stride)
        self.bn3 = nn.BatchNorm2d(cout, eps=_BN_EPS)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(cout, eps=_BN_EPS),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[b, cin, h, w] -> [b, cout, ceil(h/stride), ceil(w/stride)]``."""
        out = self.bn1(x)
        out = self.conv1(out)
        out = self.bn2(out)
        out = self.prelu(out)
        out = self.conv2(out)
        out = self.bn3(out)
        identity = x if self.downsample is None else self.downsample(x)
        return out + identity


class IResNet(nn.Module):
    """An iresnet backbone mapping ``[b, 3, S, S]`` images to ``[b, d]`` embeddings.

    Args:
        spec: widths and depths (see :data:`BACKBONE_SPECS`).
        embedding_size: ``d`` (128/256/512 in practice; any positive value works).
        input_size: side ``S`` of the square input; the Linear layer's fan-in is
            ``widths[-1] * final_map_size(S) ** 2`` (512 * 7 * 7 at 112).
        dropout: dropout probability before the Linear layer (0 in the paper's settings).
    """

    def __init__(self, spec: BackboneSpec, embedding_size: int = 512, input_size: int = 112,
                 dropout: float = 0.0) -> None:
        super().__init__()
        if embedding_size <= 0:
            raise ValueError(f"embedding_size must be positive, got {embedding_size}")
        if input_size < 16:
            raise ValueError(f"input_size must be >= 16 (four stride-2 stages), got {input_size}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.spec = spec
        self.input_size = int(input_size)
        self.embedding_size = int(embedding_size)

        self.conv1 = _conv3x3(3, spec.stem_width)
        self.bn1 = nn.BatchNorm2d(spec.stem_width, eps=_BN_EPS)
        self.prelu = nn.PReLU(spec.stem_width)
        stages = []
        cin = spec.stem_width
        for width, blocks in zip(spec.widths, spec.layers):
            layer = [IBasicBlock(cin, width, stride=2)]
            layer += [IBasicBlock(width, width) for _ in range(blocks - 1)]
            stages.append(nn.Sequential(*layer))
            cin = width
        self.layer1, self.layer2, self.layer3, self.layer4 = stages

        side = final_map_size(self.input_size)
        self.final_map = side
        self.bn2 = nn.BatchNorm2d(cin, eps=_BN_EPS)
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(cin * side * side, embedding_size)
        self.features = nn.BatchNorm1d(embedding_size, eps=_BN_EPS)
        # The embedding BN only re-centres: its scale stays 1 so that the head (which
        # normalises anyway) and the compatibility losses see the fc output's geometry.
        nn.init.constant_(self.features.weight, 1.0)
        self.features.weight.requires_grad_(False)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[b, 3, S, S] -> [b, d]`` (un-normalised embedding)."""
        if x.shape[-2:] != (self.input_size, self.input_size):
            raise ValueError(
                f"expected input [b, 3, {self.input_size}, {self.input_size}], got {list(x.shape)}"
            )
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.bn2(x)
        x = torch.flatten(x, 1)
        x = self.dropout(x)
        x = self.fc(x)
        return self.features(x)


def build_backbone(name: str, embedding_size: int = 512, input_size: int = 112,
                   dropout: float = 0.0) -> IResNet:
    """Build a named backbone: one of ``r18``, ``r34``, ``r50``, ``r100``, ``tiny``.

    ``input_size`` fixes the Linear fan-in (any side >= 16; 112 for the published models,
    32-56 for ``tiny`` on synthetic data). Raises ``ValueError`` naming the valid choices.
    """
    if name not in BACKBONE_SPECS:
        raise ValueError(f"unknown backbone {name!r}; valid choices: {', '.join(BACKBONE_SPECS)}")
    return IResNet(BACKBONE_SPECS[name], embedding_size=embedding_size, input_size=input_size,
                   dropout=dropout)
