"""CUDA training: DDP over nccl on Ray Train and an AMP step (marked ``gpu``).

They skip without a CUDA device (CI has none); ``make bench-gpu`` runs them on a GPU machine
(``pytest -m gpu``), beside the device inference tests in test_inference_device.py. Each
reference is computed independently in this process: one process on the whole batch for DDP,
an fp32 step for AMP.
"""

from __future__ import annotations

import copy
import sys
import tempfile
from pathlib import Path

import cloudpickle
import numpy as np
import pytest
import torch

from unibct_ray.distributed.train import _TrainModule
from unibct_ray.models.heads import NormalizedClassifier, margin_function
from unibct_ray.models.iresnet import build_backbone
from unibct_ray.training import train_step

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import test modules

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]

BATCH, CLASSES, STEPS = 16, 10, 3


def exact_cuda_math() -> None:
    """TF32 convolutions (cuDNN's default) round to 10 mantissa bits: with them, splitting a
    batch over workers alone moves the weights by ~1e-3. Off, the comparison is float32."""
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def make_module() -> _TrainModule:
    torch.manual_seed(0)
    m = _TrainModule(build_backbone("tiny", 32, 32), NormalizedClassifier(CLASSES, 32, margin_function("arcface", 16.0, 0.3)))
    # BatchNorm in eval mode: per-worker batch statistics would legitimately differ from the
    # whole batch's (as in test_ddp_equivalence).
    return m.eval()


def make_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(BATCH, 3, 32, 32, generator=g), torch.randint(0, CLASSES, (BATCH,), generator=g)


def run_steps(module, x, y) -> None:
    inner = getattr(module, "module", module)
    opt = torch.optim.SGD(module.parameters(), lr=0.5, momentum=0.9, weight_decay=5e-4)
    for _ in range(STEPS):
        train_step(module, opt, x, y, clip_params=list(inner.backbone.parameters()), clip_norm=5.0)


def worker_loop(config: dict) -> None:
    import ray.train
    import ray.train.torch

    exact_cuda_math()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    module = ray.train.torch.prepare_model(make_module())  # moves to ``device``; DDP when world > 1
    x, y = make_batch()
    per = BATCH // world
    run_steps(module, x[rank * per:(rank + 1) * per].to(device), y[rank * per:(rank + 1) * per].to(device))
    info = {"backend": torch.distributed.get_backend() if torch.distributed.is_initialized() else "none",
            "device": str(device), "param_device": str(next(module.parameters()).device)}
    if rank == 0:
        with tempfile.TemporaryDirectory() as d:
            state = {k: v.cpu() for k, v in getattr(module, "module", module).state_dict().items()}
            torch.save(state, Path(d) / "params.pt")
            ray.train.report(info, checkpoint=ray.train.Checkpoint.from_directory(d))
    else:
        ray.train.report(info)


@pytest.mark.parametrize("workers", [1, 2])
def test_nccl_ddp_equals_one_process(ray_session, tmp_path, workers):
    if torch.cuda.device_count() < workers:
        pytest.skip(f"{workers} workers need {workers} GPUs, found {torch.cuda.device_count()}")
    import ray.train
    from ray.train.torch import TorchTrainer

    from unibct_ray.config import from_dict
    from unibct_ray.resources import train_worker_resources

    # The resources a training run asks for (a GPU share per worker, the rest for extraction).
    cfg = from_dict({"num_workers": workers, "global_batch": BATCH, "use_gpu": True, "cpus_per_worker": 1})
    trainer = TorchTrainer(
        worker_loop,
        scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=True,
                                               resources_per_worker=train_worker_resources(cfg)),
        run_config=ray.train.RunConfig(name=f"ddp-nccl-{workers}", storage_path=str(tmp_path)),
    )
    result = trainer.fit()
    assert result.metrics["backend"] == "nccl"
    assert result.metrics["device"].startswith("cuda") and result.metrics["param_device"].startswith("cuda")
    with result.checkpoint.as_directory() as d:
        dist = torch.load(Path(d) / "params.pt", weights_only=True)

    exact_cuda_math()
    single = make_module().cuda()
    x, y = make_batch()
    before = {k: v.clone() for k, v in single.state_dict().items()}
    run_steps(single, x.cuda(), y.cuda())
    moved = 0
    for k, v in single.state_dict().items():
        # Looser than the CPU test: GPU reductions sum in another order than the halves do.
        torch.testing.assert_close(dist[k], v.cpu(), rtol=5e-4, atol=5e-5, msg=lambda m, k=k: f"parameter {k}: {m}")
        moved += int(not torch.equal(before[k], v))
    assert moved > 10  # the steps really changed the weights


def test_amp_step_finite_and_close_to_fp32():
    torch.backends.cudnn.allow_tf32 = False
    dev = torch.device("cuda", 0)
    ref = make_module().train().to(dev)
    amp = copy.deepcopy(ref)
    x, y = (t.to(dev) for t in make_batch())
    with torch.autocast("cuda", dtype=torch.float16):
        emb, _ = amp(x, y)
    assert emb.dtype == torch.float16  # autocast really runs the backbone in half precision

    clip = dict(clip_norm=5.0)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    opt_amp = torch.optim.SGD(amp.parameters(), lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cuda")
    r32 = train_step(ref, opt_ref, x, y, clip_params=list(ref.backbone.parameters()), **clip)
    r16 = train_step(amp, opt_amp, x, y, clip_params=list(amp.backbone.parameters()), scaler=scaler,
                     autocast_device="cuda", **clip)
    assert np.isfinite(r16.loss) and np.isfinite(r32.loss)
    assert abs(r16.loss - r32.loss) <= 2e-2 * abs(r32.loss) + 1e-2, (r16.loss, r32.loss)

    start = {k: v.detach().clone() for k, v in amp.state_dict().items()}
    losses = [r16.loss]
    for _ in range(8):  # the scaler skips steps whose scaled gradients overflow, then backs off
        losses.append(train_step(amp, opt_amp, x, y, clip_params=list(amp.backbone.parameters()), scaler=scaler,
                                 autocast_device="cuda", **clip).loss)
    assert all(np.isfinite(losses))
    changed = [k for k, v in amp.state_dict().items() if v.is_floating_point() and not torch.equal(start[k], v)]
    assert len(changed) > 10
    assert all(torch.isfinite(v).all() for v in amp.state_dict().values() if v.is_floating_point())
    assert losses[-1] < losses[0]  # eight steps on one batch fit it

