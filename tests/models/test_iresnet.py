"""iresnet backbones: shapes, parameter counts, the frozen embedding BN, no normalisation."""

from __future__ import annotations

import pytest
import torch

from unibct_ray.models.iresnet import BACKBONE_SPECS, build_backbone, final_map_size

# insightface's published sizes (512-d embedding, 112 px): pins widths, depths and the head.
PARAM_COUNTS = {"r18": 24_025_600, "r34": 34_139_328, "r50": 43_590_848, "r100": 65_156_160}


pytestmark = pytest.mark.usefixtures("torch_one_thread")


def test_r18_batch_of_two_at_112():
    torch.manual_seed(0)
    model = build_backbone("r18", embedding_size=512, input_size=112)
    assert model.final_map == 7 and model.fc.in_features == 512 * 7 * 7
    out = model(torch.randn(2, 3, 112, 112))
    assert out.shape == (2, 512)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["r18", "r34", "r50", "r100"])
def test_parameter_counts(name):
    model = build_backbone(name)
    assert sum(p.numel() for p in model.parameters()) == PARAM_COUNTS[name]
    assert [len(getattr(model, f"layer{i}")) for i in range(1, 5)] == list(BACKBONE_SPECS[name].layers)


def test_r100_forward_one_image():
    model = build_backbone("r100", embedding_size=256).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 112, 112))
    assert out.shape == (1, 256)


@pytest.mark.parametrize("size,side,dim", [(32, 2, 128), (48, 3, 256), (56, 4, 512), (112, 7, 128)])
def test_tiny_variant_sizes(size, side, dim):
    model = build_backbone("tiny", embedding_size=dim, input_size=size)
    assert model.final_map == side == final_map_size(size)
    assert model.fc.in_features == 128 * side * side
    assert model(torch.randn(3, 3, size, size)).shape == (3, dim)


def test_embedding_bn_scale_frozen_at_one():
    torch.manual_seed(0)
    model = build_backbone("tiny", embedding_size=64, input_size=32)
    w = model.features.weight
    assert not w.requires_grad and torch.equal(w, torch.ones(64))
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert all(p is not w for p in trainable)
    assert model.features.bias.requires_grad  # the shift is learnt
    opt = torch.optim.SGD(trainable, lr=0.1, momentum=0.9, weight_decay=5e-4)
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(4, 3, 32, 32)).pow(2).sum().backward()
        opt.step()
    assert torch.equal(model.features.weight, torch.ones(64))


def test_embedding_is_not_normalised():
    torch.manual_seed(0)
    model = build_backbone("tiny", embedding_size=128, input_size=48)
    norms = model(torch.randn(4, 3, 48, 48)).norm(dim=1)
    assert not torch.allclose(norms, torch.ones(4), atol=1e-2)


def test_unknown_backbone_names_the_choices():
    with pytest.raises(ValueError, match="r18, r34, r50, r100, tiny"):
        build_backbone("r200")


def test_wrong_input_size_is_an_error():
    model = build_backbone("tiny", input_size=32)
    with pytest.raises(ValueError, match=r"\[b, 3, 32, 32\]"):
        model(torch.randn(1, 3, 48, 48))
