"""Similarity estimation and five-point face alignment."""

from __future__ import annotations

import numpy as np
import pytest

from unibct_ray.data.landmarks import (
    ARCFACE_TEMPLATE_112,
    align_face,
    align_faces,
    estimate_similarity,
    invert_affine,
    template_for_size,
    transform_points,
)


def _similarity(angle_deg: float, scale: float, tx: float, ty: float) -> np.ndarray:
    th = np.deg2rad(angle_deg)
    c, s = scale * np.cos(th), scale * np.sin(th)
    return np.array([[c, -s, tx], [s, c, ty]])


def _lstsq_similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Independent solve: unknowns (a, b, tx, ty) of [[a, -b, tx], [b, a, ty]]."""
    n = src.shape[0]
    design = np.zeros((2 * n, 4))
    design[0::2] = np.column_stack([src[:, 0], -src[:, 1], np.ones(n), np.zeros(n)])
    design[1::2] = np.column_stack([src[:, 1], src[:, 0], np.zeros(n), np.ones(n)])
    (a, b, tx, ty), *_ = np.linalg.lstsq(design, dst.reshape(-1), rcond=None)
    return np.array([[a, -b, tx], [b, a, ty]])


@pytest.mark.parametrize("n", [2, 5, 40])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_estimate_similarity_matches_independent_lstsq(n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    src = rng.uniform(-50, 150, size=(n, 2))
    true = _similarity(rng.uniform(-180, 180), rng.uniform(0.3, 3.0), *rng.uniform(-40, 40, 2))
    dst = transform_points(true, src) + rng.normal(scale=2.0, size=(n, 2))
    got = estimate_similarity(src, dst)
    np.testing.assert_allclose(got, _lstsq_similarity(src, dst), atol=1e-8)
    # The result is a proper similarity: [[a, -b], [b, a]], positive determinant.
    assert got[0, 0] == pytest.approx(got[1, 1]) and got[0, 1] == pytest.approx(-got[1, 0])
    assert np.linalg.det(got[:, :2]) > 0


def test_estimate_similarity_recovers_exact_transform() -> None:
    true = _similarity(25.0, 1.7, 13.25, -7.5)
    src = ARCFACE_TEMPLATE_112.astype(np.float64)
    got = estimate_similarity(src, transform_points(true, src))
    np.testing.assert_allclose(got, true, atol=1e-5)
    np.testing.assert_allclose(estimate_similarity(transform_points(true, src), src),
                               invert_affine(true), atol=1e-5)


def test_estimate_similarity_never_reflects() -> None:
    src = ARCFACE_TEMPLATE_112.astype(np.float64)
    mirrored = src * np.array([-1.0, 1.0])
    m = estimate_similarity(src, mirrored)
    assert np.linalg.det(m[:, :2]) > 0


@pytest.mark.parametrize(
    "src, dst",
    [
        (np.array([[1.0, 2.0]]), np.array([[3.0, 4.0]])),  # one point
        (np.full((5, 2), 7.0), ARCFACE_TEMPLATE_112),  # one distinct source point
        (ARCFACE_TEMPLATE_112, np.full((5, 2), 3.0)),  # collapses to a point
        (np.array([[0.0, 0.0], [np.nan, 1.0]]), np.array([[0.0, 0.0], [1.0, 1.0]])),
        (np.array([[0.0, 0.0], [1.0, 1.0]]), np.array([[0.0, 0.0], [np.inf, 1.0]])),
        (np.zeros((3, 2)), np.zeros((4, 2))),  # shape mismatch
        (np.zeros((3, 3)), np.zeros((3, 3))),  # not 2-D points
    ],
)
def test_estimate_similarity_degenerate_raises(src: np.ndarray, dst: np.ndarray) -> None:
    with pytest.raises(ValueError):
        estimate_similarity(src, dst)


# Colours are far apart in direction, so a blurred dot is still attributable by hue.
_DOT_COLOURS = np.array(
    [[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [0, 255, 255]], dtype=np.float64
)


def _draw_dots(h: int, w: int, points: np.ndarray, radius: float) -> np.ndarray:
    """Anti-aliased coloured discs centred on ``points`` (integer pixel-centre convention)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    img = np.zeros((h, w, 3))
    for (x, y), colour in zip(points, _DOT_COLOURS):
        cover = np.clip(radius + 0.5 - np.hypot(xx - x, yy - y), 0.0, 1.0)
        img += cover[..., None] * colour
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _dot_centroids(img: np.ndarray) -> np.ndarray:
    """Intensity-weighted centroid of each colour's pixels, [5, 2] (x, y)."""
    pix = img.astype(np.float64)
    norm = np.linalg.norm(pix, axis=-1)
    unit = _DOT_COLOURS / np.linalg.norm(_DOT_COLOURS, axis=1, keepdims=True)
    cos = np.einsum("hwc,kc->hwk", pix, unit) / np.maximum(norm, 1e-9)[..., None]
    yy, xx = np.mgrid[0 : img.shape[0], 0 : img.shape[1]].astype(np.float64)
    out = np.empty((5, 2))
    for k in range(5):
        weight = np.where((cos[..., k] > 0.97) & (norm > 10), norm, 0.0)
        assert weight.sum() > 0, f"dot {k} not found in the aligned crop"
        out[k] = [(weight * xx).sum() / weight.sum(), (weight * yy).sum() / weight.sum()]
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_align_face_puts_dots_on_template(seed: int) -> None:
    rng = np.random.default_rng(seed)
    h, w = 180, 160
    # A random similarity of the 112 template that keeps the face inside the image.
    centre = ARCFACE_TEMPLATE_112.mean(axis=0)
    place = _similarity(rng.uniform(-30, 30), rng.uniform(1.0, 1.3), 0.0, 0.0)
    pts = transform_points(place, ARCFACE_TEMPLATE_112 - centre) + [
        w / 2 + rng.uniform(-8, 8),
        h / 2 + rng.uniform(-8, 8),
    ]
    image = _draw_dots(h, w, pts, radius=3.0)
    # The rendering itself is centred where intended (sanity check of the test helper).
    np.testing.assert_allclose(_dot_centroids(image), pts, atol=0.05)

    for size in (112, 48):
        crop = align_face(image, pts, size)
        assert crop.shape == (size, size, 3) and crop.dtype == np.uint8
        err = np.linalg.norm(_dot_centroids(crop) - template_for_size(size), axis=1)
        # Measured <= 0.18 px; a half-pixel convention slip gives ~0.5 px at size 48.
        assert err.max() < 0.3, (size, err)


def test_align_face_pixel_centre_convention() -> None:
    """Integer-centre convention: with a 2x zoom, source pixel (i, j) lands exactly on
    output pixel (2i, 2j); a half-pixel mistake would blend neighbours there."""
    rng = np.random.default_rng(3)
    src = rng.integers(0, 256, size=(56, 56, 3), dtype=np.uint8)
    out = align_face(src, ARCFACE_TEMPLATE_112 / 2.0, 112)
    even = out[0:110:2, 0:110:2].astype(int)
    np.testing.assert_allclose(even, src[:55, :55].astype(int), atol=1)
    # Odd output pixels lie halfway between two source pixels.
    mid = (src[:55, :54].astype(float) + src[:55, 1:55]) / 2
    np.testing.assert_allclose(out[0:110:2, 1:108:2].astype(float), mid, atol=1.01)


def test_align_face_fills_outside_with_zero() -> None:
    src = np.full((112, 112, 3), 200, dtype=np.uint8)
    # Face shifted up-left by 40 px: crop pixel (u, v) samples source (u - 40, v - 40).
    out = align_face(src, ARCFACE_TEMPLATE_112 - 40.0, 112)
    assert (out[:, :40] == 0).all() and (out[:40, :] == 0).all()
    assert (out[40:, 40:] == 200).all()


def test_align_faces_batch_and_validation() -> None:
    rng = np.random.default_rng(4)
    imgs = rng.integers(0, 256, size=(3, 120, 100, 3), dtype=np.uint8)
    lms = np.stack([ARCFACE_TEMPLATE_112 + rng.uniform(-3, 3, (5, 2)) for _ in range(3)])
    out = align_faces(imgs, lms, 64)
    assert out.shape == (3, 64, 64, 3)
    np.testing.assert_array_equal(out[1], align_face(imgs[1], lms[1], 64))
    with pytest.raises(ValueError):
        align_face(imgs[0].astype(np.float32), lms[0])
    with pytest.raises(ValueError):
        align_face(imgs[0], lms[0, :4])
    with pytest.raises(ValueError):
        align_face(imgs[0], np.full((5, 2), np.nan))
    with pytest.raises(ValueError):
        align_faces(imgs, lms[:2])
