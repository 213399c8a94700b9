"""Geometry: the canonical frame, the pseudo-3-D pose warp and the projected landmarks."""

from __future__ import annotations

import math

import numpy as np

from ..landmarks import ARCFACE_TEMPLATE_112
from .records import Identity, Nuisance, _CANON, _MID

__all__ = ["project_landmarks"]

def _canvas_px(nuisance: Nuisance, size: int) -> int:
    return max(1, int(round(nuisance.canvas_ratio * size)))


def _pose_matrix(yaw_deg: float, pitch_deg: float) -> tuple[tuple[float, float, float], ...]:
    """Rows of the 3x3 rotation taking frontal (u, v, z) head coordinates to the posed view.

    u points right, v down, z towards the viewer; pitch about u first, then yaw about v.
    """
    cy, sy = math.cos(math.radians(yaw_deg)), math.sin(math.radians(yaw_deg))
    cp, sp = math.cos(math.radians(pitch_deg)), math.sin(math.radians(pitch_deg))
    # Ry(yaw) @ Rx(pitch) written out.
    return ((cy, -sy * sp, sy * cp), (0.0, cp, sp), (-sy, -cy * sp, cy * cp))


def _jaw_factor(v: float, jaw: float) -> float:
    """Half-width of the head outline at normalised height v, relative to the ellipse.

    The lower half narrows towards the chin; pose is applied in coordinates divided by
    this, where the outline is the unit circle, so features can never leave the outline.
    """
    return max(0.05, 1.0 - jaw * max(v, 0.0) ** 2)


def _posed_point(x: float, y: float, hcx: float, hcy: float, ax: float, ay: float, jaw: float,
                 r: tuple[tuple[float, float, float], ...]) -> tuple[float, float]:
    """Frontal canonical point -> its posed position (canonical), see :class:`_Geometry`."""
    v = (y - hcy) / ay
    u = (x - hcx) / (ax * _jaw_factor(v, jaw))
    z = math.sqrt(max(0.0, 1.0 - u * u - v * v))
    r0, r1, _ = r
    u1 = r0[0] * u + r0[1] * v + r0[2] * z
    v1 = r1[0] * u + r1[1] * v + r1[2] * z
    return hcx + ax * _jaw_factor(v1, jaw) * u1, hcy + ay * v1


_MEAN_HEAD = (56.0, 58.0, 40.0, 52.0, 0.25)  # hcx, hcy, ax, ay, jaw of the average identity


def _pose_compensation(yaw: float, pitch: float) -> tuple[float, float, float, float]:
    """(scale, roll_deg, centre_x, centre_y) that an aligner would apply to a posed face.

    MS1M crops are aligned on detected landmarks, so under pose the landmarks stay near the
    template and the head outline moves. Fit the similarity taking the average head's posed
    template landmarks back onto the template (identity-independent, so it can live in
    the nuisance), expressed in the renderer's parametrisation (centre in 112-px units).
    """
    if yaw == 0.0 and pitch == 0.0:
        return 1.0, 0.0, _MID, _MID
    r = _pose_matrix(yaw, pitch)
    # Least-squares similarity posed -> template in closed form: with points as complex
    # numbers, tpl ~ a * posed + b, a = sum(conj(w - w_mean) (z - z_mean)) / sum|w - w_mean|^2
    # (Umeyama's solution in 2-D; never a reflection).
    w = [complex(*_posed_point(px, py, *_MEAN_HEAD, r)) for px, py in _TEMPLATE_PTS]
    z = [complex(px, py) for px, py in _TEMPLATE_PTS]
    wm, zm = sum(w) / len(w), sum(z) / len(z)
    a = sum((wi - wm).conjugate() * (zi - zm) for wi, zi in zip(w, z)) / sum(abs(wi - wm) ** 2 for wi in w)
    b = zm - a * wm
    c = a * complex(_MID, _MID) + b  # where canonical (56, 56) goes
    return abs(a), math.degrees(math.atan2(a.imag, a.real)), c.real, c.imag


_TEMPLATE_PTS = tuple((float(px), float(py)) for px, py in ARCFACE_TEMPLATE_112)


class _Geometry:
    """Scalar (per point) forward mapping canonical frontal -> output pixels.

    Pose model: in "jaw-normalised" coordinates u = (x - hcx) / (ax * jaw_factor(v)),
    v = (y - hcy) / ay the head outline is the unit circle; the face is the front of the
    unit sphere above it, rotated by yaw / pitch and projected orthographically. The outline
    stays put while the inner features slide and foreshorten towards it.
    """

    def __init__(self, identity: Identity, nuisance: Nuisance, size: int) -> None:
        self.w = w = _canvas_px(nuisance, size)
        self.k = nuisance.face_scale * w / _CANON  # output px per canonical unit
        th = math.radians(nuisance.roll_deg)
        self.c, self.s = math.cos(th), math.sin(th)
        # ArcFace convention: canonical (x, y) -> (x, y) * size / 112, so canonical 56 sits
        # at size / 2 (integer pixel centres).
        self.tx, self.ty = nuisance.centre[0] * w, nuisance.centre[1] * w
        self.hcx, self.hcy, self.ax, self.ay, self.jaw = identity.head
        self.r = _pose_matrix(nuisance.yaw_deg, nuisance.pitch_deg)

    def posed(self, x: float, y: float) -> tuple[float, float]:
        """A frontal-face canonical point -> where the posed head shows it (canonical)."""
        return _posed_point(x, y, self.hcx, self.hcy, self.ax, self.ay, self.jaw, self.r)

    def to_pixels(self, x: float, y: float) -> tuple[float, float]:
        """Canonical-frame point (already posed) -> output pixel coordinates."""
        dx, dy = x - _MID, y - _MID
        return (self.k * (self.c * dx - self.s * dy) + self.tx,
                self.k * (self.s * dx + self.c * dy) + self.ty)


def project_landmarks(identity: Identity, nuisance: Nuisance, size: int, *,
                      with_noise: bool = False) -> np.ndarray:
    """Where the identity's 5 landmarks land in the output image, float32 [5, 2] (x, y).

    ``with_noise`` adds the nuisance's detector noise (what loose crops report).
    """
    g = _Geometry(identity, nuisance, size)
    lm = identity.landmarks
    out = np.array([g.to_pixels(*g.posed(lm[2 * i], lm[2 * i + 1])) for i in range(5)])
    if with_noise:
        # Stored in 112-px units so the detector error scales with the face.
        out += np.asarray(nuisance.landmark_noise, dtype=np.float64).reshape(5, 2) * g.k
    return out.astype(np.float32)
