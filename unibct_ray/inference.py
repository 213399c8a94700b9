"""Batched embedding on one device: the single code path of every inference pass (Ray-free).

Feature extraction (old features, refinement features), IJB-C extraction and distractor
embedding all run a backbone over batches of decoded images inside a Ray actor. They share
:class:`DeviceEmbedder`, which decides the device once per actor and keeps the model there:

- ``use_gpu=False``: CPU, float32, ``threads`` intra-op threads: the CPUs the actor was
  granted (1 by default; an actor that asks for more CPUs uses them, so the node is never
  oversubscribed). Features do not depend on the thread count beyond float rounding.
- Both devices run the backbone and its input in ``channels_last`` (NHWC) memory format:
  decoded images are already laid out that way (``decode_images`` normalises a transposed
  HWC array), and on the CPU oneDNN's NHWC convolutions ran r18 at 112 px 1.3-1.4x faster
  than forcing NCHW (2 threads, 64-image batches); on a GPU NHWC is the layout fp16 tensor-core
  convolutions prefer. Features differ from NCHW only by float rounding.
- The process keeps large freed blocks in its heap (:func:`unibct_ray.heap.keep_freed_memory`):
  every batch allocates the same activations again, and glibc would fault each of them in page
  by page (1.4-1.5x slower forward passes on the CPU).
- ``use_gpu=True``: the actor was given a GPU share, so ``cuda`` (the device Ray made
  visible to it). ``cudnn.benchmark`` picks the fastest kernels for the fixed batch shape,
  host batches are pinned and copied with ``non_blocking=True`` (the copy overlaps the
  previous kernels), and the forward pass runs under fp16 autocast. Features come back as
  float32 numpy either way.

Why the caller says ``use_gpu`` instead of this module looking at ``torch.cuda.is_available()``
alone: Ray 2.60 no longer clears ``CUDA_VISIBLE_DEVICES`` for an actor that asked for no GPU
(``RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO`` restores the old behaviour), so a CPU actor on a GPU
node sees every GPU of the node. It must not use one it was not given.
"""

from __future__ import annotations

import contextlib
import os

import numpy as np
import torch

__all__ = ["select_device", "DeviceEmbedder"]


def select_device(use_gpu: bool) -> torch.device:
    """``cuda`` when the caller was given a GPU share, else ``cpu``.

    Raises:
        RuntimeError: ``use_gpu`` but no CUDA device is visible (a GPU share on a node whose
            torch build or driver cannot reach it).
    """
    if not use_gpu:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("a GPU was requested for inference, but torch sees no CUDA device in this process "
                           f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}, torch "
                           f"{torch.__version__} built with CUDA {torch.version.cuda})")
    # Ray makes exactly the granted device visible; index 0 of what is visible is it.
    return torch.device("cuda", 0)


class DeviceEmbedder:
    """One or more backbones held on one device; ``embed`` runs a batch through one of them.

    Args:
        models: the backbones (moved to the device and put in eval mode here).
        use_gpu: the process was given a GPU share (see :func:`select_device`).
        threads: torch intra-op threads on CPU: the whole CPUs the actor was granted
            (``max(1, floor(num_cpus))``); ignored on a GPU.
        channels_last: hold the backbones and batches in NHWC memory format (the default;
            False: plain contiguous NCHW).
    """

    def __init__(self, models: list[torch.nn.Module], use_gpu: bool = False, threads: int = 1,
                 channels_last: bool = True):
        from unibct_ray.heap import keep_freed_memory

        self.device = select_device(use_gpu)
        keep_freed_memory()  # a process that embeds batch after batch: reuse the activations' pages
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # one batch shape per pass: tune its kernels once
        else:
            torch.set_num_threads(max(1, int(threads)))  # the CPUs granted: more would oversubscribe
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.models = [m.to(self.device, memory_format=self.memory_format).eval() for m in models]

    @property
    def on_gpu(self) -> bool:
        return self.device.type == "cuda"

    def to_device(self, x: np.ndarray) -> torch.Tensor:
        """Host float32 [b, 3, h, w] -> a tensor on the device in the embedder's memory format
        (pinned, asynchronous copy on CUDA). A batch from ``decode_images`` is already NHWC in
        memory, so on the CPU this copies nothing."""
        x = np.asarray(x, np.float32)
        if any(s < 0 for s in x.strides):  # a mirrored view: torch takes positive strides only
            x = np.ascontiguousarray(x)
        t = torch.from_numpy(x).contiguous(memory_format=self.memory_format)
        if self.on_gpu:
            return t.pin_memory().to(self.device, non_blocking=True)
        return t

    def embed(self, x: np.ndarray | torch.Tensor, model: int = 0, flip_sum: bool = False) -> np.ndarray:
        """Embeddings of a batch -> float32 numpy [b, d].

        Args:
            x: normalised images [b, 3, h, w] (host numpy, or a tensor already on the device,
                e.g. from :meth:`to_device`, to share one copy between several models).
            model: which backbone.
            flip_sum: return ``emb(x) + emb(mirror(x))`` (the IJB-C image feature) instead of
                ``emb(x)``.
        """
        t = x if isinstance(x, torch.Tensor) else self.to_device(x)
        net = self.models[model]
        amp = torch.autocast("cuda", dtype=torch.float16) if self.on_gpu else contextlib.nullcontext()
        with torch.inference_mode(), amp:
            f = net(t)
            if flip_sum:
                # Summed in float32: fp16 halves of a large embedding may not add exactly.
                f = f.float() + net(torch.flip(t, dims=[3])).float()
        return f.float().cpu().numpy()
