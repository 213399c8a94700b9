"""Identity sampling: a fixed random face per ``(seed, identity_id)``."""

from __future__ import annotations

import numpy as np

from ..landmarks import ARCFACE_TEMPLATE_112
from .records import FaceKnobs, Identity, _IDENTITY_TAG

__all__ = ["sample_identity"]

_SKIN_LIGHT = np.array([238.0, 204.0, 178.0])
_SKIN_DARK = np.array([86.0, 56.0, 40.0])
_HAIR_PALETTE = np.array(
    [
        [22, 18, 16],  # black
        [55, 38, 26],  # dark brown
        [98, 66, 42],  # brown
        [140, 72, 36],  # auburn / red
        [196, 160, 102],  # blond
        [150, 148, 145],  # grey
        [212, 206, 198],  # white
    ],
    dtype=np.float64,
)
_HAIR_PROBS = np.array([0.30, 0.24, 0.16, 0.07, 0.11, 0.08, 0.04])
_HAIR_MEAN = np.array([70.0, 52.0, 38.0])
_IRIS_PALETTE = np.array(
    [[52, 32, 20], [98, 60, 30], [118, 100, 52], [72, 116, 70], [66, 108, 160], [108, 126, 146]],
    dtype=np.float64,
)
_IRIS_PROBS = np.array([0.35, 0.25, 0.12, 0.08, 0.12, 0.08])

__all__ = ["sample_identity"]


def _rgb(v) -> tuple[float, float, float]:
    r, g, b = (min(255.0, max(0.0, float(c))) for c in v)
    return (r, g, b)


def _floats(v) -> tuple[float, ...]:
    return tuple(float(x) for x in v)


def sample_identity(seed: int, identity_id: int, knobs: FaceKnobs = FaceKnobs()) -> Identity:
    """Draw identity ``identity_id`` of world ``seed`` (deterministic, depends on nothing else).

    Only ``knobs.identity_spread`` is used: every continuous parameter is
    ``mean + spread * (random - mean)``, so spread 0 makes all identities the average face.
    """
    if seed < 0 or identity_id < 0:
        raise ValueError(f"seed and identity_id must be >= 0, got {seed}, {identity_id}")
    rng = np.random.default_rng([int(seed), int(identity_id), _IDENTITY_TAG])
    sp = float(knobs.identity_spread)

    def nrm(std: float) -> float:
        return sp * std * float(np.clip(rng.standard_normal(), -2.5, 2.5))

    def uni(lo: float, hi: float) -> float:
        mid = 0.5 * (lo + hi)
        return mid + sp * (float(rng.uniform(lo, hi)) - mid)

    def mix(mean: np.ndarray, raw: np.ndarray) -> np.ndarray:
        return mean + sp * (raw - mean)

    # Landmark geometry: structured offsets (what a recogniser can measure) plus a little
    # independent jitter per point.
    eye_sep, eye_y = nrm(2.6), nrm(1.8)
    nose_x, nose_y = nrm(0.7), nrm(2.2)
    mouth_x, mouth_y, mouth_w = nrm(0.6), nrm(2.4), nrm(2.4)
    lm = ARCFACE_TEMPLATE_112.astype(np.float64).copy()
    lm[0] += (-eye_sep / 2, eye_y)
    lm[1] += (eye_sep / 2, eye_y)
    lm[2] += (nose_x, nose_y)
    lm[3] += (mouth_x - mouth_w / 2, mouth_y)
    lm[4] += (mouth_x + mouth_w / 2, mouth_y)
    lm += sp * 0.5 * np.clip(rng.standard_normal((5, 2)), -2.5, 2.5)

    hcx, hcy, ax, ay = 56.0 + nrm(0.8), 58.0 + nrm(1.6), 40.0 + nrm(2.4), 52.0 + nrm(2.4)
    jaw = uni(0.08, 0.42)

    t_skin = uni(0.0, 1.0)
    skin = _SKIN_LIGHT + (_SKIN_DARK - _SKIN_LIGHT) * t_skin
    skin = skin + sp * np.array([9.0, 7.0, 7.0]) * np.clip(rng.standard_normal(3), -2.5, 2.5)

    # Darker skin makes dark hair / iris more likely, as in real populations.
    hp = _HAIR_PROBS * np.array([1 + 2 * t_skin, 1 + t_skin, 1, 1 - 0.7 * t_skin,
                                 1 - 0.9 * t_skin, 1, 1 - 0.8 * t_skin])
    hair_raw = _HAIR_PALETTE[rng.choice(len(hp), p=hp / hp.sum())] + 8.0 * rng.standard_normal(3)
    hair_color = mix(_HAIR_MEAN, hair_raw)
    ip = _IRIS_PROBS * np.array([1 + 2 * t_skin, 1 + t_skin, 1, 1 - 0.8 * t_skin,
                                 1 - 0.9 * t_skin, 1 - 0.9 * t_skin])
    iris_raw = _IRIS_PALETTE[rng.choice(len(ip), p=ip / ip.sum())] + 6.0 * rng.standard_normal(3)
    iris_color = mix(_IRIS_PALETTE[1], iris_raw)

    bald = rng.random() < 0.06 * min(sp, 1.0)
    long_hair = rng.random() < 0.35 * min(sp, 1.0)
    hairline = uni(13.0, 30.0) if not bald else -12.0
    fringe = max(0.0, uni(-12.0, 16.0)) if not bald else 0.0
    side_vol = uni(0.5, 9.0) if not bald else 0.0
    top_vol = uni(2.0, 14.0) if not bald else 0.0
    hair_bottom = hcy + ay + uni(-12.0, 40.0) if long_hair else hcy + uni(-8.0, 14.0)
    hair = (hairline, uni(4.0, 22.0), fringe, uni(0.15, 0.45), uni(0.0, 2 * np.pi),
            nrm(4.0), side_vol, top_vol, hair_bottom)

    eye = (uni(5.6, 7.6), uni(2.3, 3.4), nrm(4.0), uni(2.4, 3.1))
    brow = (uni(7.0, 11.0), uni(7.5, 11.0), uni(0.5, 3.5), uni(1.6, 3.6), nrm(0.1), uni(0.5, 0.9))
    nose = (uni(4.8, 7.8), uni(1.2, 2.0), uni(0.1, 0.28), uni(0.03, 0.12))
    mouth = (uni(1.6, 3.4), uni(2.2, 4.6), uni(0.0, 0.5))
    lip_raw = skin * np.array([0.86, 0.56, 0.56]) + rng.uniform(10.0, 60.0) * np.array([1.0, 0.12, 0.2])
    lip_color = mix(_SKIN_LIGHT * np.array([0.86, 0.56, 0.56]) + np.array([35.0, 4.0, 7.0]), lip_raw)

    ang1, ang2 = rng.uniform(0, np.pi, 2)
    f1, f2 = 2 * np.pi / rng.uniform(16.0, 40.0, 2)
    texture = (f1 * np.cos(ang1), f1 * np.sin(ang1), rng.uniform(0, 2 * np.pi),
               f2 * np.cos(ang2), f2 * np.sin(ang2), rng.uniform(0, 2 * np.pi),
               sp * rng.uniform(5.0, 14.0))
    tint = rng.standard_normal(3) * 0.4 + np.array([1.0, 0.7, 0.6])
    tint = tint / max(float(np.linalg.norm(tint)), 1e-6)

    n_moles = int(round(float(rng.integers(0, 4)) * min(sp, 1.0)))
    moles = tuple(
        (float(hcx + rng.uniform(-26, 26)), float(rng.uniform(38, 104)), float(rng.uniform(0.8, 1.7)))
        for _ in range(n_moles)
    )
    has_beard = rng.random() < 0.27 * min(sp, 1.0)
    beard = (
        float(rng.uniform(0.45, 0.9)) if has_beard else 0.0,
        float(has_beard and rng.random() < 0.8),
        float(has_beard and rng.random() < 0.7),
        float(has_beard and rng.random() < 0.45),
    )
    if has_beard and not any(beard[1:]):
        beard = (beard[0], 1.0, beard[2], beard[3])
    ears = (uni(0.0, 0.22), uni(7.0, 10.5), uni(3.5, 5.5))
    return Identity(
        seed=int(seed),
        identity_id=int(identity_id),
        landmarks=_floats(lm.reshape(-1)),
        head=(hcx, hcy, ax, ay, jaw),
        skin=_rgb(skin),
        hair_color=_rgb(hair_color),
        hair=_floats(hair),
        eye=_floats(eye),  # type: ignore[arg-type]
        iris_color=_rgb(iris_color),
        brow=_floats(brow),
        nose=_floats(nose),  # type: ignore[arg-type]
        mouth=_floats(mouth),  # type: ignore[arg-type]
        lip_color=_rgb(lip_color),
        texture=_floats(texture),
        texture_tint=_rgb(tint),
        blush=(uni(0.0, 0.5), uni(7.0, 12.0)),
        moles=moles,
        beard=beard,
        ears=ears,
        neck_width=uni(0.45, 0.62) * ax,
    )
