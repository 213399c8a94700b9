"""Margin heads against explicit per-element formulas; sharded softmax == unsharded."""

from __future__ import annotations

import functools
import math
import os
import socket
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from unibct_ray.models.heads import (
    NormalizedClassifier,
    Reducer,
    arcface,
    cosface,
    margin_function,
    sharded_cross_entropy,
    softmax_logits,
)



pytestmark = pytest.mark.usefixtures("torch_one_thread")


def explicit_arcface(cos: np.ndarray, labels: np.ndarray, s: float, m: float) -> np.ndarray:
    out = np.empty_like(cos)
    for i in range(cos.shape[0]):
        for j in range(cos.shape[1]):
            t = float(cos[i, j])
            if labels[i] == j:
                # theta + m beyond pi: insightface's linear fallback t - m * sin(m)
                out[i, j] = s * (math.cos(math.acos(t) + m) if t > math.cos(math.pi - m) else t - m * math.sin(m))
            else:
                out[i, j] = s * t
    return out


def cos_batch(seed: int = 0, b: int = 8, c: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    cos = torch.rand(b, c, generator=g, dtype=torch.float64) * 2 - 1
    labels = torch.randint(0, c, (b,), generator=g)
    labels[1] = -1
    # targets in the fallback branch: cos(pi - 0.5) = -0.8776
    cos[0, labels[0]] = -0.95
    cos[2, labels[2]] = -0.999
    cos[3, labels[3]] = 0.3
    return cos, labels


def test_arcface_matches_explicit_formula_including_fallback():
    cos, labels = cos_batch()
    assert (cos[[0, 2], labels[[0, 2]]] < math.cos(math.pi - 0.5)).all()
    before = cos.clone()
    got = arcface(cos, labels, s=64.0, m=0.5)
    np.testing.assert_allclose(got.numpy(), explicit_arcface(cos.numpy(), labels.numpy(), 64.0, 0.5), rtol=1e-12, atol=1e-9)
    assert torch.equal(cos, before)  # never in place
    np.testing.assert_allclose(got[1].numpy(), 64.0 * cos[1].numpy())  # label -1: scale only


def test_arcface_float32_and_other_margin():
    cos, labels = cos_batch(seed=3)
    got = arcface(cos.float(), labels, s=30.0, m=0.3)
    np.testing.assert_allclose(got.numpy(), explicit_arcface(cos.numpy(), labels.numpy(), 30.0, 0.3), atol=2e-4)


def test_arcface_gradient_finite_at_cos_one():
    cos = torch.tensor([[1.0, 0.2], [-1.0, 0.1]], requires_grad=True)
    arcface(cos, torch.tensor([0, 0])).sum().backward()
    assert torch.isfinite(cos.grad).all()


def test_cosface_and_softmax():
    cos, labels = cos_batch(seed=1)
    expected = cos.clone()
    rows = labels != -1
    expected[rows, labels[rows]] -= 0.4
    torch.testing.assert_close(cosface(cos, labels, s=64.0, m=0.4), 64.0 * expected)
    torch.testing.assert_close(softmax_logits(cos, labels, s=10.0), 10.0 * cos)


def test_margin_function_by_name():
    cos, labels = cos_batch()
    torch.testing.assert_close(margin_function("arcface", s=64.0)(cos, labels), arcface(cos, labels))
    torch.testing.assert_close(margin_function("cosface", s=32.0, m=0.35)(cos, labels), cosface(cos, labels, 32.0, 0.35))
    torch.testing.assert_close(margin_function("softmax", s=8.0, m=0.5)(cos, labels), 8.0 * cos)  # m ignored
    with pytest.raises(ValueError, match="arcface, cosface, softmax"):
        margin_function("sphereface")


def test_classifier_is_a_normalised_cosine_with_margin():
    torch.manual_seed(0)
    clf = NormalizedClassifier(7, 16, functools.partial(arcface, s=64.0, m=0.5))
    assert clf.weight.shape == (7, 16) and 0.005 < clf.weight.std().item() < 0.015
    emb, labels = torch.randn(4, 16) * 5, torch.tensor([0, 6, 3, 3])
    cos = F.normalize(emb, dim=1) @ F.normalize(clf.weight, dim=1).T
    torch.testing.assert_close(clf(emb, labels), arcface(cos, labels))
    shard = NormalizedClassifier(7, 16, softmax_logits, class_start=2, class_end=5)
    assert shard.local_labels(labels).tolist() == [-1, -1, 1, 1]


class ThreadReducer:
    """All-reduce among ``k`` threads in one process (each thread plays one shard)."""

    def __init__(self, k: int) -> None:
        self.barrier = threading.Barrier(k, timeout=30)
        self.slots: list[torch.Tensor | None] = [None] * k

    def _reduce(self, rank: int, t: torch.Tensor, op: str) -> torch.Tensor:
        self.slots[rank] = t
        self.barrier.wait()
        stacked = torch.stack(self.slots)  # type: ignore[arg-type]
        out = stacked.amax(0) if op == "max" else stacked.sum(0)
        self.barrier.wait()  # every shard has read the slots before they are reused
        return out

    def for_rank(self, rank: int) -> Reducer:
        return Reducer(max_=lambda t: self._reduce(rank, t, "max"), sum_=lambda t: self._reduce(rank, t, "sum"))


def reference_and_shards(bounds: list[int], margin, d: int = 12, b: int = 10):
    # float64: with s = 64 and centres of norm ~0.03, float32 rounding in the W gradient is
    # ~1e-5 relative, which would hide a real mismatch in the comparison.
    torch.manual_seed(0)
    c = bounds[-1]
    full = NormalizedClassifier(c, d, margin).double()
    shards = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        s = NormalizedClassifier(c, d, margin, class_start=lo, class_end=hi).double()
        with torch.no_grad():
            s.weight.copy_(full.weight[lo:hi])
        shards.append(s)
    emb = torch.randn(b, d, dtype=torch.float64) * 3
    labels = torch.randint(0, c, (b,))
    labels[:3] = torch.tensor([0, c - 1, bounds[1]])
    return full, shards, emb, labels


@pytest.mark.parametrize("margin", [functools.partial(arcface, s=64.0, m=0.5), functools.partial(cosface, s=64.0, m=0.4)])
def test_sharded_cross_entropy_equals_unsharded(margin):
    full, shards, emb, labels = reference_and_shards([0, 2, 9, 13], margin)
    e_full = emb.clone().requires_grad_(True)
    loss_full = F.cross_entropy(full(e_full, labels), labels)
    loss_full.backward()

    e = emb.clone().requires_grad_(True)
    reducer = ThreadReducer(len(shards))
    losses: list[torch.Tensor | None] = [None] * len(shards)
    errors: list[BaseException] = []

    def run(rank: int) -> None:
        try:
            clf = shards[rank]
            losses[rank] = sharded_cross_entropy(clf(e, labels), clf.local_labels(labels), reducer=reducer.for_rank(rank))
        except BaseException as exc:  # surface thread failures in the test
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(r,)) for r in range(len(shards))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for loss in losses:
        torch.testing.assert_close(loss, loss_full)
        loss.backward()  # embedding gradient accumulates over shards = all-gather backward
    torch.testing.assert_close(e.grad, e_full.grad)
    torch.testing.assert_close(torch.cat([s.weight.grad for s in shards]), full.weight.grad)


def test_single_process_is_plain_cross_entropy():
    torch.manual_seed(1)
    logits = (torch.randn(6, 9) * 10).requires_grad_(True)
    labels = torch.randint(0, 9, (6,))
    ref = logits.detach().clone().requires_grad_(True)
    loss = sharded_cross_entropy(logits, labels)
    loss.backward()
    expected = F.cross_entropy(ref, labels)
    expected.backward()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(logits.grad, ref.grad)


def test_label_in_no_shard_is_an_error():
    with pytest.raises(ValueError, match="row 1"):
        sharded_cross_entropy(torch.randn(3, 4), torch.tensor([0, -1, 2]))


WORKER = textwrap.dedent(
    """
    import sys, torch, torch.distributed as dist, functools
    from unibct_ray.models.heads import NormalizedClassifier, arcface, sharded_cross_entropy
    rank, world, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    state = torch.load(out + "/input.pt")
    lo, hi = state["bounds"][rank], state["bounds"][rank + 1]
    clf = NormalizedClassifier(state["c"], state["w"].shape[1], functools.partial(arcface, s=64.0, m=0.5), lo, hi).double()
    with torch.no_grad():
        clf.weight.copy_(state["w"][lo:hi])
    e = state["emb"].clone().requires_grad_(True)
    loss = sharded_cross_entropy(clf(e, state["labels"]), clf.local_labels(state["labels"]))
    loss.backward()
    torch.save({"loss": loss.detach(), "emb_grad": e.grad, "w_grad": clf.weight.grad}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()
    """
)


@pytest.mark.slow
def test_sharded_cross_entropy_over_two_gloo_processes(tmp_path: Path):
    """The default Reducer (torch.distributed all_reduce) in two real processes (slow: two
    interpreters import torch)."""
    full, _, emb, labels = reference_and_shards([0, 5, 13], functools.partial(arcface, s=64.0, m=0.5))
    e_full = emb.clone().requires_grad_(True)
    loss_full = F.cross_entropy(full(e_full, labels), labels)
    loss_full.backward()
    torch.save({"bounds": [0, 5, 13], "c": 13, "w": full.weight.detach(), "emb": emb, "labels": labels},
               tmp_path / "input.pt")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(r), "2", str(port), str(tmp_path)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for r in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err.decode()[-2000:]
    res = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for r in res:
        torch.testing.assert_close(r["loss"], loss_full.detach())
    # the all-gather backward sums the embedding gradient over ranks
    torch.testing.assert_close(res[0]["emb_grad"] + res[1]["emb_grad"], e_full.grad)
    torch.testing.assert_close(torch.cat([res[0]["w_grad"], res[1]["w_grad"]]), full.weight.grad)
