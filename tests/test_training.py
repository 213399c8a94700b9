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
