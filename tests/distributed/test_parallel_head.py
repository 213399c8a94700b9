"""The model-parallel margin head on 2 and 3 gloo processes equals one process with the full head.

Processes are started with torch.multiprocessing (no Ray): each holds 1/world of the centres,
and the loss, the embeddings' gradient, the updated centres and the backbone after a training
step must equal a one-process full-head reference. A checkpoint written by 2 workers holds the
full head and resumes on 3.
"""

from __future__ import annotations

import math
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from unibct_ray.config import from_dict
from unibct_ray.models.heads import ParallelMarginHead, class_range, init_centres, margin_function

C, D, B, SIZE, SEED = 23, 32, 12, 32, 3  # 23 classes: 2 and 3 ranks hold unequal slices
LR, MOM, WD = 0.5, 0.9, 5e-4
# Full steps without clipping (clipping would hide a wrong gradient scale): a smaller lr keeps
# float32 summation-order noise in the updated weights below the tolerance.
STEP_LR = 0.05


def _cfg(world: int):
    return from_dict({"model": {"backbone": "tiny", "embedding_size": D}, "data": {"image_size": SIZE},
                      "num_workers": world, "global_batch": B, "seed": SEED, "head": {"scale": 16.0, "margin": 0.3}})


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(B, 3, SIZE, SIZE, generator=g), torch.randint(0, C, (B,), generator=g), torch.randn(B, D, generator=g)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: str, steps: int, resume: str | None) -> None:
    """One rank: a head-only step on fixed embeddings, then ``steps`` full training steps."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from unibct_ray.distributed.train import _build_parts, _full_state, _gather_rows, _load_optimizer
    from unibct_ray.training import train_step

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    per = B // world
    own = slice(rank * per, (rank + 1) * per)
    result: dict = {}

    # 1. the head alone, on fixed embeddings
    _, y, e = _batch(0)
    head = ParallelMarginHead(C, D, margin_function("arcface", 16.0, 0.3), rank, world, seed=SEED)
    emb = e[own].clone().requires_grad_(True)
    opt = torch.optim.SGD(head.parameters(), lr=LR, momentum=MOM, weight_decay=WD)
    loss = head(emb, y[own])
    loss.backward()
    opt.step()
    result["head_loss"] = float(loss)
    result["emb_grad"] = _gather_rows(emb.grad, B, world)  # rows are rank-ordered: the batch order
    result["head_after"] = _gather_rows(head.weight, C, world)

    # 2. full steps through the training code's own builders (DDP over the backbone only)
    cfg = _cfg(world)
    state = torch.load(resume, weights_only=False) if resume else None
    torch.manual_seed(SEED)
    parts = _build_parts(cfg, C, rank, world, torch.device("cpu"), state,
                         lambda m, parallel_strategy_kwargs: DistributedDataParallel(m, **parallel_strategy_kwargs))
    parts.model.eval()  # BN batch statistics per rank would legitimately differ from the whole batch's
    in_ddp = {id(p) for p in parts.model.parameters()}
    result["head_in_ddp"] = any(id(p) in in_ddp for p in parts.head.parameters())
    result["ddp_params"] = sum(p.numel() for p in parts.model.parameters())
    optimizer = torch.optim.SGD(parts.trainable(), lr=STEP_LR, momentum=MOM, weight_decay=WD)
    first = 0
    if state is not None:
        _load_optimizer(optimizer, state["optimizer"], parts)
        first = int(state["step"])
    losses = []
    for step in range(first, first + steps):
        x, y, _ = _batch(step)
        r = train_step(parts.model, optimizer, x[own], y[own], clip_params=list(parts.backbone.parameters()),
                       clip_norm=0.0, head=lambda emb, lab, s=step: parts.head(emb, lab, step=s))
        losses.append(r.head_loss)
    head_sd, opt_sd = _full_state(parts, optimizer, C, world)
    result["losses"] = losses
    if rank == 0:
        torch.save({"model": parts.backbone.state_dict(), "head": head_sd, "optimizer": opt_sd,
                    "step": first + steps, **result}, out)
    dist.destroy_process_group()


def _spawn(world: int, out: Path, steps: int, resume: Path | None = None) -> dict:
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(world, _free_port(), str(out), steps, str(resume) if resume else None), nprocs=world)
    return torch.load(out, weights_only=False)


def _reference(steps: int):
    """One process, the full replicated head (``_TrainModule``), the whole batch."""
    from unibct_ray.distributed.train import _build
    from unibct_ray.training import train_step

    torch.manual_seed(SEED)
    module = _build(_cfg(1), C).eval()
    opt = torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=STEP_LR, momentum=MOM,
                          weight_decay=WD)
    losses = []
    for step in range(steps):
        x, y, _ = _batch(step)
        losses.append(train_step(module, opt, x, y, clip_params=list(module.backbone.parameters()),
                                 clip_norm=0.0).head_loss)
    return module, losses


def _head_reference() -> tuple[float, torch.Tensor, torch.Tensor]:
    """Plain ArcFace cross-entropy on the full centres: loss, d loss / d emb, centres after SGD."""
    _, y, e = _batch(0)
    w = init_centres(0, C, D, SEED).requires_grad_(True)
    emb = e.clone().requires_grad_(True)
    cos = F.normalize(emb) @ F.normalize(w).T
    t = cos[torch.arange(B), y].clamp(-1 + 1e-6, 1 - 1e-6)
    phi = torch.where(t > math.cos(math.pi - 0.3), torch.cos(torch.acos(t) + 0.3), t - math.sin(math.pi - 0.3) * 0.3)
    logits = cos.clone()
    logits[torch.arange(B), y] = phi
    loss = F.cross_entropy(16.0 * logits, y)
    loss.backward()
    # first SGD step with momentum: buffer = grad + wd * w
    after = (w - LR * (w.grad + WD * w)).detach()
    return float(loss), emb.grad, after


@pytest.fixture(scope="module")
def reference_two_steps():
    return _reference(2)


@pytest.mark.parametrize("world", [2, 3])
def test_parallel_head_equals_one_process(world, tmp_path, torch_one_thread, reference_two_steps):
    got = _spawn(world, tmp_path / "out.pt", steps=2)
    loss, emb_grad, head_after = _head_reference()
    assert got["head_loss"] == pytest.approx(loss, abs=1e-5)
    torch.testing.assert_close(got["emb_grad"], emb_grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got["head_after"], head_after, rtol=1e-4, atol=1e-5)

    module, losses = reference_two_steps
    np.testing.assert_allclose(got["losses"], losses, rtol=1e-5, atol=1e-5)
    for k, v in module.backbone.state_dict().items():
        torch.testing.assert_close(got["model"][k], v, rtol=1e-4, atol=1e-5, msg=lambda m, k=k: f"backbone {k}: {m}")
    torch.testing.assert_close(got["head"]["weight"], module.head.weight.detach(), rtol=1e-4, atol=1e-5)
    assert got["head"]["weight"].shape == (C, D)  # the checkpoint holds the full head
    # the centres are not in DDP's buckets: DDP holds exactly the backbone
    assert not got["head_in_ddp"]
    assert got["ddp_params"] == sum(p.numel() for p in module.backbone.parameters())


def test_two_worker_checkpoint_resumes_on_three(tmp_path, torch_one_thread, reference_two_steps):
    _spawn(2, tmp_path / "two.pt", steps=1)
    got = _spawn(3, tmp_path / "three.pt", steps=1, resume=tmp_path / "two.pt")
    module, losses = reference_two_steps
    assert got["losses"][0] == pytest.approx(losses[1], abs=1e-5)
    torch.testing.assert_close(got["head"]["weight"], module.head.weight.detach(), rtol=1e-4, atol=1e-5)
    for k, v in module.backbone.state_dict().items():
        torch.testing.assert_close(got["model"][k], v, rtol=1e-4, atol=1e-5, msg=lambda m, k=k: f"backbone {k}: {m}")


def test_class_ranges_cover_the_classes_once():
    for c in (1, 7, 23, 93_431):
        for world in (1, 2, 3, 8):
            ranges = [class_range(c, r, world) for r in range(world)]
            assert ranges[0][0] == 0 and ranges[-1][1] == c
            assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
            assert max(e - s for s, e in ranges) - min(e - s for s, e in ranges) <= 1


def test_init_centres_do_not_depend_on_the_split():
    full = init_centres(0, 9000, 4, seed=5)
    assert full.std().item() == pytest.approx(0.01, rel=0.05)
    torch.testing.assert_close(torch.cat([init_centres(*class_range(9000, r, 3), 4, seed=5) for r in range(3)]), full,
                               rtol=0, atol=0)


def test_sampled_head_keeps_positives_and_is_seeded():
    """sample_rate < 1 on one process: the loss is the plain CE over the kept columns."""
    head = ParallelMarginHead(40, 8, margin_function("cosface", 10.0, 0.2), sample_rate=0.25, seed=1)
    g = torch.Generator().manual_seed(0)
    e, y = torch.randn(6, 8, generator=g), torch.tensor([3, 3, 17, 39, 0, 21])
    keep, local = head._sample(y, step=5)
    assert len(keep) == 10 and set(y.tolist()) <= set(keep.tolist())
    assert torch.equal(keep, head._sample(y, step=5)[0]) and not torch.equal(keep, head._sample(y, step=6)[0])
    assert torch.equal(keep[local], y)
    # independent reference: numpy cosface CE over the kept columns only
    w = head.weight.detach().numpy()[keep.numpy()]
    en = e.numpy() / np.linalg.norm(e.numpy(), axis=1, keepdims=True)
    wn = w / np.linalg.norm(w, axis=1, keepdims=True)
    z = en @ wn.T
    rows = np.arange(6)
    z[rows, local.numpy()] -= 0.2
    z *= 10.0
    ref = np.mean(np.log(np.exp(z).sum(1)) - z[rows, local.numpy()])
    assert float(head(e, y, step=5)) == pytest.approx(float(ref), rel=1e-5)
