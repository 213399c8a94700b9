"""Rendering one image: paint the layers, then lighting, noise and gamma."""

from __future__ import annotations

import numpy as np

from .frame import _Frame, _col, _noise, _uclip
from .geometry import project_landmarks
from .nuisance import sample_nuisance
from .paint import _paint_background, _paint_body, _paint_brows, _paint_debug_dots, _paint_ears, _paint_eyes, _paint_head, _paint_mouth, _paint_nose, _paint_occluder, _paint_skin_marks
from .records import FaceKnobs, Identity, LANDMARK_MARK_COLOR, Nuisance, RenderedFace

__all__ = ["render_face", "render_aligned", "render_loose"]

def _photometric(f: _Frame, img: np.ndarray) -> np.ndarray:
    """Lighting, gain / cast, noise and gamma: float32 [3, w, w] -> uint8 [w, w, 3]."""
    n = f.nuisance
    w = f.w
    if n.shading > 0.0:
        # Lambert on the head ellipsoid's normal, faded out at the silhouette.
        lx, ly, lz = n.light
        lam = f.u0 * lx
        lam += f.v0 * ly
        lam += f.zp * lz
        _uclip(lam, 0.0, 1.0, out=lam)
        lam -= 1.0
        edge = np.sqrt(f.rr)
        edge -= 1.0
        edge *= min(f.ax, f.ay)
        lam *= f.cover(edge, n.shading)
        lam += 1.0
        img[:, f.hwin[0], f.hwin[1]] *= lam
    gxs, gys = n.gradient
    if gxs != 0.0 or gys != 0.0:
        t = np.linspace(-1.0, 1.0, w, dtype=np.float32)
        g = (1.0 + gxs * t)[None, :] + (gys * t)[:, None]
        img *= g
    img *= _col(n.cast) * n.gain
    if n.noise_std > 0.0:
        # Sensor noise before the tone curve, as in a camera.
        noise = _noise(n.noise_seed, 3 * w * w).reshape(3, w, w) * n.noise_std
        img += noise
    _uclip(img, 0.0, 255.0, out=img)
    img += 0.5
    chw = img.astype(np.uint8)
    if abs(n.gamma - 1.0) > 1e-4:
        lut = (255.0 * (np.arange(256) / 255.0) ** n.gamma + 0.5).astype(np.uint8)
        chw = np.take(lut, chw)
    out = np.empty((w, w, 3), dtype=np.uint8)
    for ch in range(3):  # per-channel copies beat a strided [3,w,w]->[w,w,3] transpose
        out[:, :, ch] = chw[ch]
    return out

__all__ = ["render_face", "render_aligned", "render_loose"]


def render_face(identity: Identity, nuisance: Nuisance, size: int, *, loose: bool,
                mark_landmarks: bool = False, debug_dots: bool = False) -> RenderedFace:
    """Render one image of ``identity`` under ``nuisance``.

    Args:
        identity: from :func:`sample_identity`.
        nuisance: from :func:`sample_nuisance` / :func:`jitter_nuisance` with the same
            ``loose``.
        size: aligned crops are ``size`` x ``size``; loose canvases are
            ``round(nuisance.canvas_ratio * size)`` square (about 1.6 * size).
        loose: must equal ``nuisance.loose``; loose crops report landmarks with detector
            noise, aligned crops exact ones.
        mark_landmarks: paint 3x3 pure-red dots (:data:`LANDMARK_MARK_COLOR`) at the
            returned landmarks after all processing (tests / visual checks only).
        debug_dots: paint pure-green dots (:data:`DEBUG_DOT_COLOR`) at the identity's
            landmarks inside the canonical face, i.e. *before* the pose warp, the crop
            transform and the photometric chain, to check the landmark geometry (tests only).

    Returns:
        :class:`RenderedFace`: image uint8 [H, W, 3], landmarks float32 [5, 2], score.
    """
    if size < 8:
        raise ValueError(f"size must be >= 8, got {size}")
    if bool(loose) != nuisance.loose:
        raise ValueError(f"nuisance was sampled with loose={nuisance.loose}, render_face got loose={loose}")
    f = _Frame(identity, nuisance, size)
    lm = identity.landmarks
    skin = _col(identity.skin)
    img = np.empty((3, f.w, f.w), dtype=np.float32)  # channel-first: fast broadcasting
    _paint_background(f, img)
    _paint_body(f, img, skin)
    _paint_ears(f, img, skin, front=False)
    head = np.zeros((f.w, f.w), dtype=np.float32)
    head[f.hwin] = _paint_head(f, img, skin)
    _paint_ears(f, img, skin, front=True)
    _paint_skin_marks(f, img, skin, lm, head)
    _paint_nose(f, img, skin, lm)
    _paint_eyes(f, img, lm)
    _paint_mouth(f, img, lm)
    _paint_brows(f, img, lm)
    if debug_dots:
        _paint_debug_dots(f, img, lm)
    _paint_occluder(f, img)
    out = _photometric(f, img)

    pts = project_landmarks(identity, nuisance, size, with_noise=bool(loose))
    if mark_landmarks:
        for x, y in np.rint(pts).astype(int):
            out[max(0, y - 1):max(0, y + 2), max(0, x - 1):max(0, x + 2)] = LANDMARK_MARK_COLOR
    return RenderedFace(image=out, landmarks=pts, score=float(nuisance.score))


def render_aligned(identity: Identity, rng: np.random.Generator, size: int,
                   knobs: FaceKnobs = FaceKnobs()) -> np.ndarray:
    """One MS1M-style aligned crop, uint8 [size, size, 3] (nuisance drawn from ``rng``)."""
    n = sample_nuisance(rng, knobs, loose=False)
    return render_face(identity, n, size, loose=False).image


def render_loose(identity: Identity, rng: np.random.Generator, size: int,
                 knobs: FaceKnobs = FaceKnobs()) -> RenderedFace:
    """One IJB-C-style loose crop (canvas about 1.6 * size) with noisy landmarks and a score."""
    n = sample_nuisance(rng, knobs, loose=True)
    return render_face(identity, n, size, loose=True)
