"""Per-image nuisance: pose, crop, lighting, blur, noise, occluders, and the detector score."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np

from ..landmarks import ARCFACE_TEMPLATE_112
from .geometry import _pose_compensation
from .identity import _floats, _rgb
from .records import FaceKnobs, Nuisance, _CANON, _MID

__all__ = ["detector_score", "sample_nuisance", "jitter_nuisance"]

# Template points (and weights) used to measure how much of the face an occluder hides.
_COVER_PTS = np.concatenate(
    [ARCFACE_TEMPLATE_112, [[56.0, 40.0], [56.0, 56.0], [30.0, 75.0], [82.0, 75.0], [56.0, 103.0]]]
).astype(np.float64)
_COVER_W = np.array([0.18, 0.18, 0.14, 0.1, 0.1, 0.06, 0.08, 0.06, 0.06, 0.04])
_COVER_W = _COVER_W / _COVER_W.sum()

__all__ = ["detector_score", "sample_nuisance", "jitter_nuisance"]


def _occluder_distance(kind: int, params: tuple[float, ...], x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Signed distance (canonical units, < 0 inside) of the occluder at points (x, y)."""
    cx, cy, hw, hh, ang = params
    if kind == 3:  # sunglasses: two rounded lenses and a bridge
        dy = y - cy
        ex = np.abs(x - cx) - 17.5
        lens = (np.sqrt(np.square(ex * (1.0 / hw)) + np.square(dy * (1.0 / hh))) - 1.0) * min(hw, hh)
        bridge = np.maximum(np.abs(x - cx) - 6.0, np.abs(dy + 0.4 * hh) - 1.0)
        return np.minimum(lens, bridge)
    ca, sa = math.cos(ang), math.sin(ang)
    dx, dy = x - cx, y - cy
    lx = ca * dx + sa * dy
    ly = ca * dy - sa * dx
    if kind == 4:  # surgical mask: rectangle with a rounded bottom
        bottom = np.sqrt(np.square(lx * (1.0 / hw)) + np.square(np.maximum(ly, 0.0) * (1.0 / hh))) - 1.0
        return np.maximum(bottom * min(hw, hh), -ly)
    return np.maximum(np.abs(lx) - hw, np.abs(ly) - hh)  # bar and rectangle


def _occluder_coverage(kind: int, params: tuple[float, ...]) -> float:
    """Weighted fraction of key face points (template landmarks etc.) the occluder hides."""
    if kind == 0:
        return 0.0
    d = _occluder_distance(kind, params, _COVER_PTS[:, 0], _COVER_PTS[:, 1])
    return float(np.sum(_COVER_W * (d < 0)))


def detector_score(*, yaw: float = 0.0, pitch: float = 0.0, blur: float = 0.0,
                   coverage: float = 0.0, gain: float = 1.0, noise: float = 0.0,
                   logit_noise: float = 0.0) -> float:
    """Detector-like confidence in (0, 1] from how degraded an image is.

    A "badness" sums squared, normalised degradations (pose in degrees, blur sigma in
    112-px units, occluded fraction of the face, exposure gain, noise std); the score is a
    logistic of it. Calibrated so ordinary default-knob images score ~0.9-1.0 and hard ones
    mostly < 0.5.
    """
    bad = ((yaw / 42.0) ** 2 + (pitch / 32.0) ** 2 + (blur / 2.3) ** 2 + 2.6 * coverage
           + (math.log(max(gain, 1e-3)) / 0.75) ** 2 + (noise / 24.0) ** 2)
    logit = 4.2 - 3.4 * bad + logit_noise
    return float(min(1.0, max(1e-3, 1.0 / (1.0 + math.exp(-logit)))))


def _sample_occluder(rng: np.random.Generator, s: float,
                     heavy: bool) -> tuple[int, tuple[float, ...], tuple[float, float, float]]:
    """An occluder in canonical coordinates; ``heavy`` ones hide eyes, nose or mouth for sure."""
    kind = int(rng.choice([1, 2, 3, 4], p=[0.3, 0.3, 0.22, 0.18]))
    col = rng.uniform(20.0, 235.0, 3)
    if kind == 1:  # bar across the face
        if heavy:  # across the eyes, the nose or the mouth
            cy = float(rng.choice([51.6, 72.0, 92.0])) + rng.normal(0, 2)
            params = (56.0 + rng.normal(0, 4), cy, 90.0, rng.uniform(9.0, 14.0), rng.uniform(-0.3, 0.3))
        else:
            params = (56.0 + rng.normal(0, 14), 60.0 + rng.normal(0, 22), 90.0,
                      rng.uniform(3.0, 7.0), rng.uniform(0.0, np.pi))
    elif kind == 2:  # rectangle ("hand", paper, phone)
        if heavy:
            cx, cy = ARCFACE_TEMPLATE_112[int(rng.choice([0, 1, 2]))] + rng.normal(0, 3, 2)
            params = (cx, cy, rng.uniform(20.0, 30.0), rng.uniform(18.0, 28.0), rng.uniform(-0.4, 0.4))
        else:
            params = (rng.uniform(18, 94), rng.uniform(40, 110), rng.uniform(6.0, 15.0),
                      rng.uniform(6.0, 15.0), rng.uniform(-0.6, 0.6))
    elif kind == 3:  # sunglasses: heavy or not, they always hide both eyes
        col = rng.uniform(8.0, 60.0, 3)
        params = (56.0 + rng.normal(0, 1.0), 52.0 + rng.normal(0, 1.5), rng.uniform(10.0, 12.5),
                  rng.uniform(6.5, 9.0), 0.0)
    else:  # mask over mouth and nose (heavy) or the mouth only
        col = np.array([[120, 170, 215], [235, 235, 232], [30, 30, 34], [90, 140, 130]],
                       dtype=np.float64)[int(rng.integers(0, 4))] + rng.normal(0, 8, 3)
        top = rng.uniform(62.0, 68.0) if heavy else rng.uniform(74.0, 80.0)
        params = (56.0 + rng.normal(0, 1.0), top, rng.uniform(32.0, 38.0), 112.0 - top + 4.0,
                  rng.normal(0, 0.05))
    # Weaker overall nuisance shrinks ordinary bars / rectangles.
    if not heavy and s < 1.0 and kind in (1, 2):
        params = (params[0], params[1], params[2] * max(s, 0.2), params[3] * max(s, 0.2), params[4])
    return kind, _floats(params), _rgb(col)


def sample_nuisance(rng: np.random.Generator, knobs: FaceKnobs = FaceKnobs(), *, loose: bool) -> Nuisance:
    """Draw the per-image nuisance of one aligned (``loose=False``) or loose crop.

    Args:
        rng: the only source of randomness.
        knobs: difficulty.
        loose: False = MS1M-style aligned crop (small residual misalignment), True =
            IJB-C-style loose crop (face at a random place / scale / rotation in a bigger
            canvas with background clutter, landmarks with detector noise).
    """
    k = knobs
    s = float(k.strength)
    il = float(k.illumination) * s
    hard = bool(rng.random() < k.hard_prob * min(s, 1.0))
    # Hard images get one or more strong degradations, always at least one.
    hard_pose = hard_blur = hard_occ = hard_dark = False
    if hard:
        picks = rng.random(4) < np.array([0.4, 0.35, 0.35, 0.25])
        if not picks.any():
            picks[int(rng.integers(0, 4))] = True
        hard_pose, hard_blur, hard_occ, hard_dark = (bool(p) for p in picks)

    yaw = float(rng.uniform(-1, 1)) * k.yaw * s
    pitch = float(rng.uniform(-1, 1)) * k.pitch * s
    if hard_pose:
        yaw = float(np.sign(rng.uniform(-1, 1)) * rng.uniform(0.75, 1.0)) * k.hard_yaw * s
        pitch = float(rng.uniform(-1, 1)) * max(k.pitch, 25.0) * s
    # Beyond ~60 degrees the far eye would turn behind the head.
    yaw = float(np.clip(yaw, -60.0, 60.0))
    pitch = float(np.clip(pitch, -40.0, 40.0))
    gaze = _floats(rng.uniform(-1, 1, 2) * k.gaze_px * s)

    if loose:
        canvas = float(rng.uniform(*k.loose_canvas))
        f_lo, f_hi = k.loose_face_frac
        f_mid = 0.5 * (f_lo + f_hi)
        face_scale = f_mid + min(s, 1.0) * (float(rng.uniform(f_lo, f_hi)) - f_mid)
        roll = float(rng.uniform(-1, 1)) * k.loose_rotation_deg * s
        # Keep the canonical box (mostly) inside the canvas.
        margin = max(0.0, 0.5 * (1.0 - face_scale) - 0.02) * min(s, 1.0)
        centre = _floats(0.5 + rng.uniform(-1, 1, 2) * margin)
    else:
        canvas = 1.0
        # Residual misalignment (scale j, rotation phi, shift d about the crop centre)
        # composed after the aligner's pose compensation (scale c_s, rotation c_r, centre c).
        j = float(1.0 + rng.uniform(-1, 1) * k.scale_jitter * s)
        phi = float(rng.uniform(-1, 1)) * k.rotation_deg * s
        d = rng.uniform(-1, 1, 2) * k.shift_px * s
        c_s, c_r, c_x, c_y = _pose_compensation(yaw, pitch)
        cp, sp = math.cos(math.radians(phi)), math.sin(math.radians(phi))
        ox, oy = c_x - _MID, c_y - _MID
        face_scale = j * c_s
        roll = phi + c_r
        centre = ((j * (cp * ox - sp * oy) + _MID + float(d[0])) / _CANON,
                  (j * (sp * ox + cp * oy) + _MID + float(d[1])) / _CANON)

    # Lighting.
    az = float(rng.uniform(0, 2 * np.pi))
    elev = float(rng.uniform(0.2, 1.1)) * min(il, 1.0)  # frontal light when photometry is off
    light = (math.sin(elev) * math.cos(az), math.sin(elev) * math.sin(az), math.cos(elev))
    shading = float(rng.uniform(0.15, 0.6)) * min(il, 1.5)
    gradient = _floats(rng.uniform(-0.25, 0.25, 2) * il)
    gain = float(math.exp(rng.uniform(-0.35, 0.25) * il))
    if hard_dark:
        gain = float(math.exp(-rng.uniform(0.9, 1.3) * s))
    gamma = float(math.exp(np.clip(rng.normal(0, 0.15), -0.4, 0.4) * il))
    cast = _floats(np.exp(np.clip(rng.normal(0, 0.07, 3), -0.2, 0.2) * il))

    blur = max(0.0, float(rng.uniform(-0.5, 1.0))) * k.blur_sigma * s
    if hard_blur:
        blur = float(rng.uniform(0.8, 1.0)) * k.hard_blur_sigma * s
    noise = float(rng.uniform(0.2, 1.0)) * k.noise_std * s
    if hard_dark:
        noise = max(noise, 2.5 * k.noise_std * s)
    noise_seed = int(rng.integers(0, 2**62))

    # Background: neutral grey at strength 0, random colours / clutter otherwise.
    s1 = min(s, 1.0)
    bg_a = 128.0 + s1 * (rng.uniform(25.0, 230.0, 3) - 128.0)
    bg_b = np.clip(bg_a + s1 * rng.normal(0.0, 45.0, 3), 0.0, 255.0)
    background = (*_rgb(bg_a), *_rgb(bg_b), float(rng.uniform(0, 2 * np.pi)))
    # Aligned crops show little background, so they get fewer (cheaper) clutter shapes.
    n_clutter = int(rng.integers(2, 7) if loose else rng.integers(1, 4)) if s > 0 and k.clutter > 0 else 0
    # One draw for all shapes: (kind, cx, cy, rx, ry, angle, r, g, b, alpha) per row.
    lo = np.array([0.0, -0.1, -0.1, 0.04, 0.02, 0.0, 0.0, 0.0, 0.0, 0.5])
    hi = np.array([3.0, 1.1, 1.1, 0.35, 0.3, np.pi, 255.0, 255.0, 255.0, 1.0])
    cl = lo + (hi - lo) * rng.random((n_clutter, 10))
    cl[:, 0] = np.floor(cl[:, 0])
    cl[:, 9] *= min(1.0, k.clutter * s)
    clutter = tuple(tuple(float(v) for v in row) for row in cl)
    clothing = _rgb(110.0 + s1 * (rng.uniform(10.0, 240.0, 3) - 110.0))

    occ_kind, occ_params, occ_color = 0, (0.0, 0.0, 0.0, 0.0, 0.0), (0.0, 0.0, 0.0)
    if hard_occ:
        occ_kind, occ_params, occ_color = _sample_occluder(rng, s, heavy=True)
    elif rng.random() < k.occlusion_prob * s1:
        occ_kind, occ_params, occ_color = _sample_occluder(rng, s, heavy=False)

    lm_std = k.landmark_noise * s * (3.0 if hard else 1.0)
    lm_noise = np.clip(rng.standard_normal(10), -2.5, 2.5) * lm_std
    logit_noise = float(rng.normal(0.0, 0.3)) * s1
    score = detector_score(yaw=yaw, pitch=pitch, blur=blur,
                           coverage=_occluder_coverage(occ_kind, occ_params), gain=gain,
                           noise=noise, logit_noise=logit_noise)
    return Nuisance(
        loose=bool(loose), canvas_ratio=canvas, face_scale=float(face_scale),
        centre=centre, roll_deg=roll, yaw_deg=yaw, pitch_deg=pitch,  # type: ignore[arg-type]
        gaze=gaze, light=light, shading=shading, gradient=gradient,  # type: ignore[arg-type]
        gain=gain, gamma=gamma, cast=cast,  # type: ignore[arg-type]
        blur_sigma=float(blur), noise_std=noise, noise_seed=noise_seed,
        background=background, clutter=clutter, clothing=clothing,
        occluder=occ_kind, occluder_params=occ_params, occluder_color=occ_color,
        landmark_noise=_floats(lm_noise), hard=hard, score=score,
    )


def jitter_nuisance(base: Nuisance, rng: np.random.Generator, knobs: FaceKnobs = FaceKnobs(),
                    amount: float = 0.25) -> Nuisance:
    """A nearby nuisance: the next frame of the same "video".

    Pose, position, scale, gaze and lighting take a random step whose std is ``amount / 2``
    of the corresponding knob range; background, clutter, clothing, occluder type, blur /
    noise level and the hard flag stay; sensor noise and landmark noise are redrawn and the
    score is recomputed. Chaining calls gives a *bounded* random walk: every quantity stays
    inside its sampling range (or, if ``base`` lies outside it, e.g. a hard image's pose,
    between ``base`` and that range), so long videos do not drift off the canvas.
    """
    k = knobs
    s = float(k.strength)
    il = float(k.illumination) * s
    st = 0.5 * float(amount)

    def walk(value: float, width: float, lo: float, hi: float) -> float:
        new = value + float(rng.standard_normal()) * st * width
        return float(min(max(new, min(lo, value)), max(hi, value)))

    yaw = walk(base.yaw_deg, k.yaw * s, -k.yaw * s, k.yaw * s)
    pitch = walk(base.pitch_deg, k.pitch * s, -k.pitch * s, k.pitch * s)
    if base.loose:
        rot = k.loose_rotation_deg * s
        roll = walk(base.roll_deg, rot, -rot, rot)
        scale = walk(base.face_scale, 0.1 * s, *k.loose_face_frac)
        margin = max(0.0, 0.5 * (1.0 - scale) - 0.02)
        move = 0.05 * s
    else:
        # Aligned crops also carry the pose compensation (a few degrees / pixels).
        rot = k.rotation_deg * s
        roll = walk(base.roll_deg, rot, -rot - 10.0, rot + 10.0)
        j = k.scale_jitter * s
        scale = walk(base.face_scale, j, 1.0 - j - 0.15, 1.0 + j + 0.15)
        margin = (k.shift_px * s + 12.0) / _CANON
        move = k.shift_px * s / _CANON
    centre = (walk(base.centre[0], move, 0.5 - margin, 0.5 + margin),
              walk(base.centre[1], move, 0.5 - margin, 0.5 + margin))
    g_lim = k.gaze_px * s
    gaze = (walk(base.gaze[0], g_lim, -g_lim, g_lim), walk(base.gaze[1], g_lim, -g_lim, g_lim))
    lv = np.asarray(base.light) + st * 0.3 * il * rng.standard_normal(3)
    lv[2] = abs(lv[2])
    lv = lv / max(float(np.linalg.norm(lv)), 1e-6)
    gain = math.exp(walk(math.log(base.gain), 0.2 * il, -0.35 * il, 0.25 * il))
    grad = (walk(base.gradient[0], 0.2 * il, -0.25 * il, 0.25 * il),
            walk(base.gradient[1], 0.2 * il, -0.25 * il, 0.25 * il))
    op = base.occluder_params
    if base.occluder in (1, 2):  # bars / rectangles move in front of the face
        occ = (walk(op[0], 4.0 * s, 10.0, 102.0), walk(op[1], 4.0 * s, 20.0, 110.0), op[2], op[3], op[4])
    else:  # nothing, or sunglasses / masks, which stay where they sit on the face
        occ = op
    lm_std = k.landmark_noise * s * (3.0 if base.hard else 1.0)
    lm_noise = np.clip(rng.standard_normal(10), -2.5, 2.5) * lm_std
    noise_seed = int(rng.integers(0, 2**62))
    logit_noise = float(rng.normal(0.0, 0.3)) * min(s, 1.0)
    score = detector_score(yaw=yaw, pitch=pitch, blur=base.blur_sigma,
                           coverage=_occluder_coverage(base.occluder, occ), gain=gain,
                           noise=base.noise_std, logit_noise=logit_noise)
    return replace(
        base, yaw_deg=yaw, pitch_deg=pitch, roll_deg=roll, face_scale=scale, centre=centre,
        gaze=gaze, light=_floats(lv), gain=float(gain), gradient=grad,  # type: ignore[arg-type]
        occluder_params=_floats(occ), landmark_noise=_floats(lm_noise),
        noise_seed=noise_seed, score=score,
    )
