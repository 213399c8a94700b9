"""The shared inference helper: CPU keeps float32 on one thread; CUDA runs fp16 autocast."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from unibct_ray.inference import DeviceEmbedder, select_device
from unibct_ray.models.iresnet import build_backbone

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _model_and_batch(seed: int = 0) -> tuple[torch.nn.Module, np.ndarray]:
    torch.manual_seed(seed)
    model = build_backbone("tiny", 16, 32).eval()
    x = np.random.default_rng(seed).uniform(-1, 1, (6, 3, 32, 32)).astype(np.float32)
    return model, x


def _reference(model: torch.nn.Module, x: np.ndarray, flip: bool) -> np.ndarray:
    """Plain float32 forward on the CPU."""
    t = torch.from_numpy(x)
    with torch.no_grad():
        f = model(t)
        if flip:
            f = f + model(t.flip(3))
    return f.numpy()


@pytest.mark.usefixtures("torch_one_thread")
def test_cpu_path_is_plain_float32_forward():
    model, x = _model_and_batch()
    ref, ref_flip = _reference(model, x, False), _reference(model, x, True)
    before = torch.get_num_threads()
    emb = DeviceEmbedder([model], use_gpu=False, channels_last=False)
    try:
        assert emb.device.type == "cpu" and not emb.on_gpu
        assert torch.get_num_threads() == 1  # one actor per core
        got = emb.embed(x)
        assert got.dtype == np.float32 and got.shape == (6, 16)
        np.testing.assert_array_equal(got, ref)
        np.testing.assert_array_equal(emb.embed(x, flip_sum=True), ref_flip)
        # A tensor already on the device gives the same result as the host array.
        np.testing.assert_array_equal(emb.embed(emb.to_device(x), flip_sum=True), ref_flip)
    finally:
        torch.set_num_threads(before)


@pytest.mark.usefixtures("torch_one_thread")
def test_cpu_path_runs_nhwc_by_default_with_the_same_features():
    # The default layout is channels_last (NHWC): the conv weights and the batch on the device
    # are NHWC in memory; the features equal the plain NCHW forward up to float rounding, for a
    # contiguous NCHW array, the NHWC-strided array decode_images returns, and a mirrored view.
    from unibct_ray.data.images import decode_images

    model, x = _model_and_batch(2)
    ref, ref_flip = _reference(model, x, False), _reference(model, x, True)
    emb = DeviceEmbedder([model], use_gpu=False)
    conv = next(m for m in emb.models[0].modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert not conv.weight.is_contiguous()
    t = emb.to_device(x)
    assert t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()
    np.testing.assert_allclose(emb.embed(x), ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(emb.embed(x, flip_sum=True), ref_flip, rtol=1e-4, atol=1e-4)
    nhwc = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)  # decode_images' layout
    assert emb.to_device(nhwc).data_ptr() == torch.from_numpy(nhwc).data_ptr()  # no copy on the CPU
    np.testing.assert_allclose(emb.embed(nhwc), ref, rtol=1e-4, atol=1e-4)
    mirrored = x[:, :, :, ::-1]
    np.testing.assert_allclose(emb.embed(mirrored), _reference(model, np.ascontiguousarray(mirrored), False),
                               rtol=1e-4, atol=1e-4)
    # decode_images' own output is already NHWC in memory.
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(buf, format="PNG")
    dec = decode_images([buf.getvalue()] * 2, 32)
    assert torch.from_numpy(dec).is_contiguous(memory_format=torch.channels_last)


def test_cpu_path_uses_the_granted_cpus_as_threads():
    # An actor granted 2 CPUs runs two intra-op threads; a fractional grant still gets one.
    model, x = _model_and_batch(1)
    ref = _reference(model, x, False)
    before = torch.get_num_threads()
    try:
        emb = DeviceEmbedder([model], use_gpu=False, threads=2)
        assert torch.get_num_threads() == 2
        got = emb.embed(x)
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)  # only the summation order may differ
        DeviceEmbedder([model], use_gpu=False, threads=0)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
def test_gpu_requested_without_cuda_is_one_clear_error():
    with pytest.raises(RuntimeError, match="no CUDA device"):
        select_device(True)
    assert select_device(False).type == "cpu"


def _row_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    return (a64 * b64).sum(1) / np.linalg.norm(a64, axis=1) / np.linalg.norm(b64, axis=1)


@pytest.mark.gpu
@gpu
def test_cuda_path_matches_cpu_to_fp16_precision():
    model, x = _model_and_batch(1)
    ref = _reference(model, x, True)
    emb = DeviceEmbedder([model], use_gpu=True)
    assert emb.on_gpu and next(emb.models[0].parameters()).is_cuda
    assert emb.to_device(x).is_cuda
    assert emb.to_device(x).is_contiguous(memory_format=torch.channels_last)  # pinned copy keeps NHWC
    got = emb.embed(x, flip_sum=True)
    assert got.dtype == np.float32
    assert _row_cosine(got, ref).min() > 0.999
