"""The optimisation step's non-finite guard: a NaN loss skips the update, a run of them stops."""

from __future__ import annotations

import pytest
import torch

from unibct_ray.compat.losses import CompatLoss
from unibct_ray.training import NonFiniteGuard, NonFiniteLoss, StepResult, train_step


class _Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 3)
        self.head = torch.nn.Linear(3, 5)

    def forward(self, x, labels):
        emb = self.lin(x)
        return emb, self.head(emb)


def _setup():
    torch.manual_seed(0)
    net = _Net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    return net, opt, torch.randn(8, 4), torch.arange(8) % 5


def test_a_finite_step_updates_and_a_nan_step_leaves_the_weights_alone():
    net, opt, x, y = _setup()
    before = [p.detach().clone() for p in net.parameters()]
    r = train_step(net, opt, x, y)
    assert r.applied and all(not torch.equal(a, b) for a, b in zip(before, net.parameters()))
    after_good = [p.detach().clone() for p in net.parameters()]
    bad_x = x.clone()
    bad_x[0, 0] = float("nan")
    r = train_step(net, opt, bad_x, y)
    assert not r.applied and r.bad_term == "head"
    assert all(torch.equal(a, b) for a, b in zip(after_good, net.parameters()))  # no NaN reached the weights
    assert all(torch.isfinite(p).all() for p in net.parameters())


def test_a_nan_compat_term_is_named_and_ranks_agree():
    net, opt, x, y = _setup()
    old = torch.randn(8, 3)
    old[2] = float("inf")
    r = train_step(net, opt, x, y, compat=CompatLoss("l2", weight=1.0), weight=1.0, old_features=old)
    assert not r.applied and r.bad_term == "compat"
    # another rank saw a NaN: this rank skips too, so every rank runs the same collectives
    r = train_step(net, opt, x, y, agree=lambda ok: False)
    assert not r.applied and r.bad_term == "peer"
    assert train_step(net, opt, x, y, agree=lambda ok: ok).applied


def test_the_guard_stops_after_the_configured_run_of_non_finite_steps():
    bad = StepResult(float("nan"), float("nan"), 0.0, applied=False, bad_term="head")
    good = StepResult(1.0, 1.0, 0.0)
    g = NonFiniteGuard(limit=2, name="r")
    g.update(bad, 10, 0)
    g.update(bad, 11, 0)
    g.update(good, 12, 0)  # a good step resets the count
    g.update(bad, 13, 0)
    g.update(bad, 14, 0)
    with pytest.raises(NonFiniteLoss, match=r"r: the head loss is nan at step 15 \(epoch 1\), 3 non-finite steps"):
        g.update(bad, 15, 0)
    with pytest.raises(NonFiniteLoss, match="compatibility loss"):
        NonFiniteGuard(0).update(StepResult(1.0, 1.0, float("inf"), applied=False, bad_term="compat"), 0, 0)


def test_device_images_equal_the_float32_decode():
    """uint8 decode + flip/normalise on the device == the float32 decode with the flip applied."""
    import io

    import numpy as np
    import torch
    from PIL import Image

    from unibct_ray.data.images import decode_images, decode_uint8
    from unibct_ray.training import device_images

    rng = np.random.default_rng(0)
    bufs = []
    for _ in range(5):
        b = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(b, format="PNG")
        bufs.append(b.getvalue())
    flip = np.array([True, False, True, True, False])
    raw = decode_uint8(bufs, 16)
    assert raw.dtype == np.uint8 and raw.shape == (5, 3, 16, 16)
    got = device_images(torch.from_numpy(raw), torch.from_numpy(flip)).numpy()
    np.testing.assert_allclose(got, decode_images(bufs, 16, flip), rtol=0, atol=1e-6)
    # by hand for one pixel of a flipped row: column 0 comes from column 15
    assert got[0, 1, 2, 0] == (float(raw[0, 1, 2, 15]) - 127.5) / 127.5
