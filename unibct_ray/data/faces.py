"""Deterministic synthetic face renderer (the stand-in for MS1Mv3 / IJB-C images).

Neither data set can be downloaded here, so the project trains and evaluates on synthetic
identities. The design goal is that *identity is the signal and everything else is noise*:

* An :class:`Identity` is a fixed random face: head and jaw shape, skin / hair / iris / lip
  colours, hair style, eye / brow / nose / mouth shape, landmark geometry (eye distance,
  nose and mouth position, mouth width), a low-frequency skin-tone pattern, moles, beard.
* A :class:`Nuisance` holds everything that changes from image to image: head pose
  (yaw / pitch move the inner features relative to the head outline), the similarity
  transform of the crop (scale, in-plane rotation, translation), lighting (3-D shading,
  gain, gamma, image gradient, colour cast), blur, sensor noise, background clutter,
  clothing, occluders (bar, rectangle, sunglasses, mask) and a "hard" flag. Hard images
  carry extreme pose, strong blur, heavy occlusion or darkness and get a low detector score.

Geometry
--------
Faces live in a *canonical frame*: a 112 x 112 coordinate system in which the landmarks of
the average identity are exactly :data:`ARCFACE_TEMPLATE_112`; each identity's own
landmarks are offset from it by a few pixels. Pose is a pseudo-3-D warp: in coordinates
where the head outline (an ellipse narrowing towards the chin) is the unit circle, the face
is the front of the unit sphere above it; yaw / pitch rotate the sphere, so the outline
stays put while eyes / nose / mouth slide and foreshorten towards it (they can never leave
it). The output image is the similarity transform
``p_out = S * R(roll) * (p_canonical - 56) + centre`` of that. For aligned crops the
sampled similarity includes what a landmark aligner would do to the posed face (the
average head's posed landmarks are fitted back onto the template), so, as in MS1M, the
landmarks stay near the template and the head outline moves. Everything is rendered by
*inverse mapping*: every output pixel is mapped into canonical coordinates and the face is
evaluated there as an analytic, vectorised function (ellipses, smooth blends, sinusoids).

Edges are anti-aliased with a linear ramp (a box-filtered edge). Blur is rendered the same
way, analytically: a Gaussian of std ``sigma`` widens every edge ramp to
``sqrt(1 + 2 pi sigma^2)`` pixels (the ramp with the same slope as the blurred edge), thin
lines lose contrast as they would under the filter, and sinusoidal texture is attenuated
by its exact Gaussian transfer factor. That costs nothing per pixel, whereas a real
filter pass costs more than the whole render; sensor noise is added afterwards.

All pixel coordinates, including the returned landmarks, use the integer-centre convention
of :mod:`unibct_ray.data.landmarks` (the centre of column ``i`` is ``x = i``), so
``landmarks.align_face(rendered.image, rendered.landmarks)`` undoes a loose crop.

Determinism: :func:`sample_identity` draws only from ``(seed, identity_id)``;
:func:`sample_nuisance` / :func:`jitter_nuisance` only from the generator they are given;
:func:`render_face` is a pure function of ``(identity, nuisance, size, loose)`` (the sensor
noise is read from a fixed noise table at an offset stored in the nuisance).

This module needs only numpy and Pillow; it must not import ray or torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from .landmarks import ARCFACE_TEMPLATE_112

__all__ = [
    "FaceKnobs",
    "Identity",
    "Nuisance",
    "RenderedFace",
    "OCCLUDER_KINDS",
    "DEBUG_DOT_COLOR",
    "LANDMARK_MARK_COLOR",
    "sample_identity",
    "sample_nuisance",
    "jitter_nuisance",
    "detector_score",
    "project_landmarks",
    "render_face",
    "render_aligned",
    "render_loose",
]

_CANON = 112.0
_MID = 56.0
_IDENTITY_TAG = 0xFACE  # separates identity streams from any other use of (seed, id)
_FAR = np.float32(1.0e4)  # canonical coordinate no feature is near: "not on the front face"

#: Occluder kinds stored in :attr:`Nuisance.occluder` (index = kind code).
OCCLUDER_KINDS = ("none", "bar", "rect", "sunglasses", "mask")
#: Colour of the ``debug_dots`` painted inside the canonical face (goes through the warp).
DEBUG_DOT_COLOR = (0, 255, 0)
#: Colour of the ``mark_landmarks`` dots painted on the final image.
LANDMARK_MARK_COLOR = (255, 0, 0)


# --------------------------------------------------------------------------------------
# Knobs and parameter records
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FaceKnobs:
    """All difficulty knobs in one place (defaults = the standard benchmark difficulty).

    Angles are in degrees, lengths in canonical 112-px units unless stated otherwise.
    ``strength`` multiplies every nuisance amplitude (and the occlusion / hard
    probabilities, capped at 1x): 0 gives clean, canonical, frontal images on a neutral
    background, i.e. all images of one identity are identical.
    """

    strength: float = 1.0  # global multiplier on every nuisance amplitude (0 = clean)
    rotation_deg: float = 6.0  # max in-plane rotation of aligned crops (residual misalignment)
    scale_jitter: float = 0.08  # aligned crops: scale in [1 - j, 1 + j]
    shift_px: float = 4.0  # aligned crops: max translation per axis, 112-px units
    yaw: float = 25.0  # max |yaw| of ordinary images
    pitch: float = 15.0  # max |pitch| of ordinary images
    illumination: float = 1.0  # multiplier on all photometric variation (0 = flat, neutral)
    blur_sigma: float = 1.2  # max Gaussian blur sigma, 112-px units (a third are sharp)
    noise_std: float = 6.0  # max sensor-noise std, 0..255 units
    occlusion_prob: float = 0.2  # probability of an occluder on an ordinary image
    hard_prob: float = 0.1  # probability that an image is "hard" (stronger nuisance, low score)
    identity_spread: float = 1.0  # how different identities are from each other (1 = default)
    # -- loose (IJB-C style) crops --
    loose_rotation_deg: float = 25.0  # max in-plane rotation of the face in loose crops
    loose_canvas: tuple[float, float] = (1.5, 1.7)  # canvas side / requested size, range
    loose_face_frac: tuple[float, float] = (0.5, 0.8)  # canonical 112 box / canvas, range
    landmark_noise: float = 0.4  # detector noise std (112-px units), clipped at 2.5 std
    # -- hard images --
    hard_yaw: float = 55.0  # |yaw| of extreme-pose hard images (sampled in [0.75, 1] x this)
    hard_blur_sigma: float = 3.2  # blur sigma of strongly blurred hard images (112-px units)
    # -- minor nuisance --
    gaze_px: float = 0.8  # max iris shift inside the eye (112-px units)
    clutter: float = 1.0  # amount of background clutter (0 = plain gradient background)

    def __post_init__(self) -> None:
        for name in ("strength", "illumination", "identity_spread", "clutter", "blur_sigma",
                     "noise_std", "landmark_noise"):
            if getattr(self, name) < 0:
                raise ValueError(f"FaceKnobs.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("occlusion_prob", "hard_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"FaceKnobs.{name} must be in [0, 1], got {getattr(self, name)}")
        lo, hi = self.loose_canvas
        if not 1.0 <= lo <= hi:
            raise ValueError(f"FaceKnobs.loose_canvas must satisfy 1 <= lo <= hi, got {(lo, hi)}")
        lo, hi = self.loose_face_frac
        if not 0.05 < lo <= hi <= 1.5:
            raise ValueError(f"FaceKnobs.loose_face_frac out of range: {(lo, hi)}")


@dataclass(frozen=True)
class Identity:
    """All per-identity parameters (plain floats / tuples, so it pickles and hashes).

    Positions are canonical 112-px coordinates (x, y), colours are RGB in 0..255.
    """

    seed: int
    identity_id: int
    landmarks: tuple[float, ...]  # 10 floats: [5, 2] (x, y) in ARCFACE_TEMPLATE_112 order
    head: tuple[float, float, float, float, float]  # centre x, centre y, semi-axes ax, ay, jaw
    skin: tuple[float, float, float]
    hair_color: tuple[float, float, float]
    # hairline y, temple drop, fringe depth, fringe freq, fringe phase, parting asymmetry,
    # side volume, top volume, bottom y of the hair outside the head
    hair: tuple[float, ...]
    eye: tuple[float, float, float, float]  # half width, half height, tilt (deg), iris radius
    iris_color: tuple[float, float, float]
    brow: tuple[float, ...]  # gap above eye, half length, arch, thickness, slope, darkness
    nose: tuple[float, float, float, float]  # half width, nostril size, bridge shade, tip light
    mouth: tuple[float, float, float]  # upper lip, lower lip thickness, cupid's-bow depth
    lip_color: tuple[float, float, float]
    texture: tuple[float, ...]  # k1x, k1y, phase1, k2x, k2y, phase2, amplitude
    texture_tint: tuple[float, float, float]
    blush: tuple[float, float]  # strength, radius
    moles: tuple[tuple[float, float, float], ...]  # (x, y, radius) each
    beard: tuple[float, float, float, float]  # density, moustache, chin, cheeks (0/1 flags)
    ears: tuple[float, float, float]  # ear centre height (normalised head v), half h, half w
    neck_width: float


@dataclass(frozen=True)
class Nuisance:
    """Per-image parameters; independent of the identity and of the output size.

    Geometry: the canonical point (56, 56) lands at ``centre * canvas_px`` and one canonical
    unit spans ``face_scale * canvas_px / 112`` output pixels, where
    ``canvas_px = round(canvas_ratio * size)``.
    """

    loose: bool
    canvas_ratio: float  # canvas side / requested size (1 for aligned crops)
    face_scale: float  # see class docstring
    centre: tuple[float, float]  # canvas fractions
    roll_deg: float  # in-plane rotation (positive = clockwise on screen, y points down)
    yaw_deg: float  # positive turns the face towards image right
    pitch_deg: float  # positive tilts the face down
    gaze: tuple[float, float]  # iris offset, canonical px
    light: tuple[float, float, float]  # unit light direction (x, y, towards viewer)
    shading: float  # 0 = flat, 1 = fully Lambertian head shading
    gradient: tuple[float, float]  # relative brightness change per half canvas, (x, y)
    gain: float
    gamma: float
    cast: tuple[float, float, float]  # per-channel colour multipliers
    blur_sigma: float  # Gaussian blur std, 112-px units
    noise_std: float  # 0..255 units
    noise_seed: int
    background: tuple[float, ...]  # colour a (3), colour b (3), gradient angle (rad)
    clutter: tuple[tuple[float, ...], ...]  # (kind, cx, cy, rx, ry, angle, r, g, b, alpha)
    clothing: tuple[float, float, float]
    occluder: int  # index into OCCLUDER_KINDS
    occluder_params: tuple[float, ...]  # (cx, cy, half_w, half_h, angle) canonical units
    occluder_color: tuple[float, float, float]
    landmark_noise: tuple[float, ...]  # 10 floats, [5, 2] detector noise, 112-px units
    hard: bool
    score: float  # detector-like confidence in (0, 1]


@dataclass(frozen=True)
class RenderedFace:
    """One rendered image.

    Attributes:
        image: uint8 [H, W, 3] RGB (H = W = size for aligned crops, about 1.6*size loose).
        landmarks: float32 [5, 2] (x, y) output-pixel coordinates (integer-centre
            convention) of the 5 points in ARCFACE_TEMPLATE_112 order; loose crops include
            detector noise, aligned crops are exact.
        score: detector-like confidence in (0, 1]: ~0.9-1.0 easy, < ~0.5 hard.
    """

    image: np.ndarray
    landmarks: np.ndarray
    score: float


# --------------------------------------------------------------------------------------
# Identity sampling
# --------------------------------------------------------------------------------------

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


# --------------------------------------------------------------------------------------
# Nuisance sampling and the detector score
# --------------------------------------------------------------------------------------

# Template points (and weights) used to measure how much of the face an occluder hides.
_COVER_PTS = np.concatenate(
    [ARCFACE_TEMPLATE_112, [[56.0, 40.0], [56.0, 56.0], [30.0, 75.0], [82.0, 75.0], [56.0, 103.0]]]
).astype(np.float64)
_COVER_W = np.array([0.18, 0.18, 0.14, 0.1, 0.1, 0.06, 0.08, 0.06, 0.06, 0.04])
_COVER_W = _COVER_W / _COVER_W.sum()


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


# --------------------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------

try:  # the clip ufunc itself: np.clip's Python wrapper costs more than the work on a window
    from numpy._core.umath import clip as _uclip  # numpy >= 2
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core.umath import clip as _uclip  # type: ignore[no-redef]

_NOISE_TABLE_LEN = 1 << 20
_noise_table: np.ndarray | None = None


def _noise(seed: int, n: int) -> np.ndarray:
    """n standard-normal float32 values for ``seed`` (a window of a fixed table).

    Drawing fresh Gaussians costs more than rendering a 48 px face, so read a window of a
    fixed 4 MB table at a seed-dependent offset, with a seed-dependent sign.
    """
    global _noise_table
    if n > _NOISE_TABLE_LEN // 2:
        return np.random.default_rng(seed).standard_normal(n, dtype=np.float32)
    if _noise_table is None:
        _noise_table = np.random.default_rng(0x5EED).standard_normal(_NOISE_TABLE_LEN, dtype=np.float32)
    off = (seed >> 1) % (_NOISE_TABLE_LEN - n)
    win = _noise_table[off:off + n]
    return -win if seed & 1 else win


def _col(rgb) -> np.ndarray:
    """RGB triple -> float32 [3, 1, 1], ready to broadcast against channel-first images."""
    return np.asarray(rgb, dtype=np.float32).reshape(3, 1, 1)


_SCLERA = _col((228.0, 222.0, 216.0))
_PUPIL = _col((10.0, 8.0, 8.0))
_LASH = _col((30.0, 22.0, 20.0))
_BLUSH = _col((30.0, -14.0, -10.0))
_DOT = _col(DEBUG_DOT_COLOR)


def _blend(dst: np.ndarray, m: np.ndarray, color: np.ndarray) -> None:
    """In place ``dst += m * (color - dst)``: dst [3, h, w], m [h, w], color [3, 1, 1]/[3, h, w]."""
    t = color - dst
    t *= m
    dst += t


_Window = tuple[slice, slice]


class _Frame(_Geometry):
    """Per-render canonical coordinates of the output pixels (float32 arrays).

    Full canvas [w, w]: ``X, Y`` (the similarity transform undone: canonical frame, no
    pose) and ``Xw, Yw`` (also the pose undone: the frontal-face point a pixel shows;
    ``_FAR`` off the front of the head). Head window ``hwin`` only, in the jaw-normalised
    coordinates of :class:`_Geometry`: ``u0, v0, zp`` (the pixel lifted onto the unit
    sphere, view space), ``rr = u0^2 + v0^2`` (< 1 inside the head outline) and ``u, v, z``
    (the same sphere point with the pose undone; z < 0 on the back of the head).
    """

    def __init__(self, identity: Identity, nuisance: Nuisance, size: int) -> None:
        super().__init__(identity, nuisance, size)
        self.identity, self.nuisance = identity, nuisance
        w, k, c, s = self.w, self.k, self.c, self.s
        # Blur is rendered analytically by widening every edge ramp (module docstring).
        self.blur = nuisance.blur_sigma  # canonical units
        ramp_px = math.sqrt(1.0 + 2.0 * math.pi * (nuisance.blur_sigma * k) ** 2)
        self.ramp = ramp_px / k  # ramp width, canonical units
        self.inv_ramp = k / ramp_px
        # Inverse similarity p = R^T (q - t) / S + 56 is affine in the pixel grid: build it
        # from a row and a column with one broadcast add.
        px = np.arange(w, dtype=np.float64)
        dx, dy = (px - self.tx) / k, (px - self.ty) / k
        self.X = (c * dx + _MID).astype(np.float32)[None, :] + (s * dy).astype(np.float32)[:, None]
        self.Y = (-s * dx).astype(np.float32)[None, :] + (c * dy + _MID).astype(np.float32)[:, None]
        # Everything about the head is computed in its bounding window only (a loose crop's
        # head covers a third of the canvas).
        hwin = self.window(self.hcx, self.hcy, max(self.ax, self.ay) + 1.0, posed=False)
        self.hwin = hwin if hwin is not None else (slice(0, 1), slice(0, 1))
        Xh, Yh = self.X[self.hwin], self.Y[self.hwin]
        jaw = self.jaw
        v0 = (Yh - self.hcy) * (1.0 / self.ay)
        u0 = (Xh - self.hcx) * (1.0 / self.ax)
        xr = np.maximum(v0, 0.0)  # jaw factor 1 - jaw * max(v, 0)^2, see _jaw_factor
        xr *= xr
        xr *= -jaw
        xr += 1.0
        np.maximum(xr, 0.05, out=xr)
        u0 /= xr
        rr = u0 * u0
        rr += v0 * v0  # < 1 inside the head outline
        zp = 1.0 - rr
        np.maximum(zp, 0.0, out=zp)
        np.sqrt(zp, out=zp)
        self.u0, self.v0, self.zp, self.rr = u0, v0, zp, rr
        if abs(nuisance.yaw_deg) < 1e-9 and abs(nuisance.pitch_deg) < 1e-9:
            u, v, z = u0, v0, zp
            xr1 = xr
        else:  # frontal (u, v, z) = R^T (u0, v0, zp)
            (a0, a1, a2), (b0, b1, b2), (c0, c1, c2) = self.r
            u = a0 * u0 + b0 * v0
            u += c0 * zp
            v = a1 * u0 + b1 * v0
            v += c1 * zp
            z = a2 * u0 + b2 * v0
            z += c2 * zp
            xr1 = np.maximum(v, 0.0)
            xr1 *= xr1
            xr1 *= -jaw
            xr1 += 1.0
            np.maximum(xr1, 0.05, out=xr1)
        self.u, self.v, self.z = u, v, z
        # Off the silhouette, or on the back of the head, a pixel shows no front feature;
        # send those far away so feature painters leave them alone.
        off = rr >= 1.0
        off |= z < -0.02
        self.Xw = np.full((w, w), _FAR, dtype=np.float32)
        self.Yw = np.full((w, w), _FAR, dtype=np.float32)
        xf = u * xr1
        xf *= self.ax
        xf += self.hcx
        yf = v * self.ay
        yf += self.hcy
        # Unmasked frontal coordinates (head window): continuous across the outline, for
        # what must blend smoothly there (skin pattern, hair).
        self.xf, self.yf = xf, yf
        self.Xw[self.hwin] = xf
        self.Yw[self.hwin] = yf
        self.Xw[self.hwin][off] = _FAR
        self.Yw[self.hwin][off] = _FAR

    # -- coverage helpers ---------------------------------------------------------------

    def cover(self, d: np.ndarray, amp: float = 1.0) -> np.ndarray:
        """amp x coverage in [0, 1] of a shape with signed distance ``d`` (canonical, < 0 in)."""
        out = d * -self.inv_ramp
        out += 0.5
        _uclip(out, 0.0, 1.0, out=out)
        if amp != 1.0:
            out *= amp
        return out

    def thin(self, half: float) -> float:
        """Peak-contrast factor of a band of half-width ``half`` under the edge ramp.

        A band narrower than the ramp reaches 0.5 + half/ramp with :meth:`cover` but only
        2*half/ramp after a box filter of the ramp's width; rescale so thin lines fade (at
        small sizes or under blur) instead of staying half-strength.
        """
        return min(1.0, 4.0 * half / (self.ramp + 2.0 * half))

    def soft(self, sigma: float) -> tuple[float, float]:
        """(sigma', amplitude factor) of a 1-D Gaussian bump of std ``sigma`` after the blur."""
        s2 = math.sqrt(sigma * sigma + self.blur * self.blur)
        return s2, sigma / s2

    # -- windows -----------------------------------------------------------------------

    def window(self, x: float, y: float, radius: float, *, posed: bool = True) -> _Window | None:
        """Output-pixel window holding the canonical disc (x, y, radius); posed = on the face."""
        if posed:
            # The pose warp is smooth and (yaw acting on x, pitch on y) nearly axis-aligned:
            # bound the posed disc by the canonical box of its posed axis points, then take
            # that box's circumscribed disc. (Inlined _posed_point: this runs ~15x a render.)
            hcx, hcy, ax, ay, jaw = self.hcx, self.hcy, self.ax, self.ay, self.jaw
            (r00, r01, r02), (r10, r11, r12), _ = self.r
            x0 = y0 = math.inf
            x1 = y1 = -math.inf
            for px, py in ((x + radius, y), (x - radius, y), (x, y + radius), (x, y - radius)):
                v = (py - hcy) / ay
                u = (px - hcx) / (ax * max(0.05, 1.0 - jaw * max(v, 0.0) ** 2))
                z = math.sqrt(max(0.0, 1.0 - u * u - v * v))
                u1 = r00 * u + r01 * v + r02 * z
                v1 = r10 * u + r11 * v + r12 * z
                qx = hcx + ax * max(0.05, 1.0 - jaw * max(v1, 0.0) ** 2) * u1
                qy = hcy + ay * v1
                x0, x1, y0, y1 = min(x0, qx), max(x1, qx), min(y0, qy), max(y1, qy)
            x, y = 0.5 * (x0 + x1), 0.5 * (y0 + y1)
            radius = 0.5 * math.hypot(x1 - x0, y1 - y0) * 1.05
        dx, dy = x - _MID, y - _MID
        ox = self.k * (self.c * dx - self.s * dy) + self.tx
        oy = self.k * (self.s * dx + self.c * dy) + self.ty
        r = radius * self.k + 1.5 + self.ramp * self.k
        i0, i1 = max(0, int(ox - r)), min(self.w, int(ox + r) + 2)
        j0, j1 = max(0, int(oy - r)), min(self.w, int(oy + r) + 2)
        if i0 >= i1 or j0 >= j1:
            return None
        return slice(j0, j1), slice(i0, i1)

    def pair_window(self, lx: float, ly: float, rx: float, ry: float, radius: float) -> _Window | None:
        """One window holding two front-face discs (a left and a right feature)."""
        a = self.window(lx, ly, radius)
        b = self.window(rx, ry, radius)
        if a is None or b is None:
            return a or b
        return (slice(min(a[0].start, b[0].start), max(a[0].stop, b[0].stop)),
                slice(min(a[1].start, b[1].start), max(a[1].stop, b[1].stop)))


def _paint_background(f: _Frame, img: np.ndarray) -> None:
    n = f.nuisance
    w = f.w
    bg = n.background
    a, b = _col(bg[0:3]), _col(bg[3:6])
    t1 = np.arange(w, dtype=np.float32) * (1.0 / max(w - 1, 1)) - 0.5
    t = (0.5 + math.cos(bg[6]) * t1)[None, :] + (math.sin(bg[6]) * t1)[:, None]
    np.multiply(t, b - a, out=img)
    img += a
    grid = np.arange(w, dtype=np.float32) * (1.0 / w)
    inv_ramp = w / (f.ramp * f.k)  # the edge ramp in canvas-fraction units
    for kind, cx, cy, rx, ry, ang, cr, cg, cb, alpha in n.clutter:
        r = max(rx, ry) * w + 2
        x0, x1 = max(0, int(cx * w - r)), min(w, int(cx * w + r) + 2)
        y0, y1 = max(0, int(cy * w - r)), min(w, int(cy * w + r) + 2)
        if x0 >= x1 or y0 >= y1:
            continue
        gx = grid[x0:x1] - cx
        gy = grid[y0:y1] - cy
        ca, sa = math.cos(ang), math.sin(ang)
        # Rotated local coordinates are affine in the grid: one broadcast add each.
        lx = (ca * gx)[None, :] + (sa * gy)[:, None]
        ly = (-sa * gx)[None, :] + (ca * gy)[:, None]
        if kind == 0:  # ellipse
            lx *= 1.0 / rx
            ly *= 1.0 / ry
            d = lx * lx
            d += ly * ly
            np.sqrt(d, out=d)
            d -= 1.0
            d *= min(rx, ry)
        elif kind == 1:  # rectangle
            d = np.maximum(np.abs(lx) - rx, np.abs(ly) - ry)
        else:  # blinds / shelves: stripes inside a rectangle
            stripes = np.cos(lx * (40.0 / max(rx, 0.05)))
            stripes -= 0.2
            stripes *= 0.2 * rx / 40.0
            d = np.maximum(np.maximum(np.abs(lx) - rx, np.abs(ly) - ry), stripes)
        d *= -inv_ramp
        d += 0.5
        _uclip(d, 0.0, alpha, out=d)
        _blend(img[:, y0:y1, x0:x1], d, _col((cr, cg, cb)))


def _paint_body(f: _Frame, img: np.ndarray, skin: np.ndarray) -> None:
    """Shoulders, neck and the hair outside the head outline (canonical frame, no pose)."""
    i = f.identity
    hcx, hcy, ax, ay = f.hcx, f.hcy, f.ax, f.ay
    # Shoulders / clothing: a wide ellipse well below the chin.
    sh_cy, sh_rx, sh_ry = hcy + ay + 52.0, 2.3 * ax, 42.0
    win = f.window(hcx, sh_cy, sh_rx, posed=False)
    if win is not None:
        x = (f.X[win] - hcx) * (1.0 / sh_rx)
        y = (f.Y[win] - sh_cy) * (1.0 / sh_ry)
        d = x * x
        d += y * y
        np.sqrt(d, out=d)
        d -= 1.0
        d *= sh_ry
        _blend(img[:, win[0], win[1]], f.cover(d), _col(f.nuisance.clothing))
    # Neck: a band under the head, in the head's shadow, down into the shoulders.
    top, bot = hcy + 0.3 * ay, hcy + ay + 16.0
    win = f.window(hcx, 0.5 * (top + bot), max(i.neck_width, 0.5 * (bot - top)) + 1.0, posed=False)
    if win is not None:
        d = np.maximum(np.abs(f.X[win] - hcx) - i.neck_width, top - f.Y[win])
        _blend(img[:, win[0], win[1]], f.cover(d), skin * 0.72)
    # Hair volume around the head: an ellipse above the head centre, straight sides below.
    side, top_v, bottom = i.hair[6], i.hair[7], i.hair[8]
    if side > 0.0 or top_v > 0.0:
        hx, hy = ax + side, ay + top_v
        win = f.window(hcx, hcy, max(hx, hy, bottom - hcy) + 1.0, posed=False)
        if win is not None:
            X, Y = f.X[win], f.Y[win]
            x = (X - hcx) * (1.0 / hx)
            y = np.minimum(Y - hcy, 0.0)
            y *= 1.0 / hy
            d = x * x
            d += y * y
            np.sqrt(d, out=d)
            d -= 1.0
            d *= min(hx, hy)
            np.maximum(d, Y - bottom, out=d)
            _blend(img[:, win[0], win[1]], f.cover(d), _col(i.hair_color) * 0.85)


def _paint_ears(f: _Frame, img: np.ndarray, skin: np.ndarray, front: bool) -> None:
    i = f.identity
    ev, ehh, ehw = i.ears
    (a0, a1, _), (b0, b1, _), (c0, c1, _) = f.r
    for side in (-1.0, 1.0):
        # Ear anchor on the rim of the head sphere (the outline), rotated with the head. A
        # far-side ear hides behind the head (painted before it), a near-side one sits on
        # the cheek (after).
        pu, pv, pz = a0 * side + a1 * ev, b0 * side + b1 * ev, c0 * side + c1 * ev
        if (pz > 0.05) != front or pz < -0.35:
            continue
        ex = f.hcx + f.ax * pu + side * ehw * 0.6 * (1.0 - max(0.0, pz))
        ey = f.hcy + f.ay * pv
        hw = ehw * (1.0 - 0.5 * abs(pz))
        win = f.window(ex, ey, ehh + 2.0, posed=False)
        if win is None:
            continue
        x = (f.X[win] - ex) * (1.0 / hw)
        y = (f.Y[win] - ey) * (1.0 / ehh)
        r = x * x
        r += y * y
        np.sqrt(r, out=r)
        r -= 1.0
        view = img[:, win[0], win[1]]
        _blend(view, f.cover(r * hw), skin * 0.88)
        _blend(view, f.cover((r - 0.45) * hw, 0.5), skin * 0.62)  # inner shadow


def _paint_head(f: _Frame, img: np.ndarray, skin: np.ndarray) -> np.ndarray:
    """Skin, skin pattern and hair of the head; returns the head coverage on ``f.hwin``."""
    i = f.identity
    view = img[:, f.hwin[0], f.hwin[1]]
    # rr is the jaw-normalised radius: the outline (narrowing towards the chin) is rr = 1.
    rh = np.sqrt(f.rr)
    rh -= 1.0
    rh *= min(f.ax, f.ay)
    head = f.cover(rh)
    # The identity's low-frequency skin-tone pattern, in frontal coordinates so it moves
    # with the face; blur attenuates it by the Gaussian transfer factor of its frequencies.
    t = i.texture
    Xw, Yw = f.xf, f.yf
    amp = t[6] * math.exp(-0.5 * (t[0] ** 2 + t[1] ** 2 + t[3] ** 2 + t[4] ** 2) * f.blur ** 2)
    pat = np.cos(t[0] * Xw + t[1] * Yw + t[2])
    pat *= np.cos(t[3] * Xw + t[4] * Yw + t[5])
    pat *= amp
    col = pat * _col(i.texture_tint)
    col += skin
    # Hair on the head: above the hairline (a frontal-frame curve) or on the back of the head.
    # Mixed into the head colour before the head is composited, so the outline has a single
    # anti-aliased edge.
    hairline, temple, fringe, ffreq, fphase, asym = i.hair[:6]
    au = np.abs(f.u)
    sidew = au - 0.45
    sidew *= 1.0 / 0.45
    _uclip(sidew, 0.0, 1.0, out=sidew)
    line = sidew * sidew
    line *= temple
    line += asym * f.u
    line += hairline
    if fringe > 0.0:
        fr = np.cos(ffreq * Xw + fphase)
        fr *= 0.25 * fringe
        fr += 0.75 * fringe
        fr *= np.maximum(1.0 - 1.4 * au, 0.0)
        line += fr
    # Back of the head: z < 0 above ear level shows hair.
    back = np.maximum((f.z + 0.03) * f.ax, (f.v - i.ears[0]) * f.ay)
    hair_m = f.cover(back)
    if hairline > -10.0:
        line -= Yw
        np.maximum(hair_m, f.cover(line * -1.0), out=hair_m)
    _blend(col, hair_m, _col(i.hair_color))
    _blend(view, head, col)
    return head


def _mirror_coords(f: _Frame, win: _Window, lx: float, ly: float, rx: float, ry: float
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Front-face coordinates relative to the left or right anchor, whichever side of the
    midline a pixel is on, plus the side sign (-1 left, +1 right); all [h, w]."""
    Xw, Yw = f.Xw[win], f.Yw[win]
    right = Xw > 0.5 * (lx + rx)
    x = Xw - np.where(right, np.float32(rx), np.float32(lx))
    y = Yw - np.where(right, np.float32(ry), np.float32(ly))
    sgn = np.where(right, np.float32(1.0), np.float32(-1.0))
    return x, y, sgn


def _paint_eyes(f: _Frame, img: np.ndarray, lm: tuple[float, ...]) -> None:
    i = f.identity
    ew, eh, tilt, ir = i.eye
    win = f.pair_window(lm[0], lm[1], lm[2], lm[3], ew + 5.0)
    if win is None:
        return
    x, y, sgn = _mirror_coords(f, win, lm[0], lm[1], lm[2], lm[3])
    # Positive tilt lifts the outer corners: rotate by -side * tilt.
    c, s = math.cos(math.radians(tilt)), math.sin(math.radians(tilt))
    ssg = sgn * -s
    lx = c * x + ssg * y
    ly = y * c
    ly -= ssg * x
    view = img[:, win[0], win[1]]
    # Socket shadow for depth.
    ss, sa = f.soft(ew * 1.4)
    q = lx * (1.0 / ss)
    q *= q
    r = ly + 1.0
    r *= 1.0 / (eh * 2.6)
    q += r * r
    np.exp(-q, out=q)
    q *= -0.2 * sa
    q += 1.0
    view *= q
    alx = np.abs(lx)
    t = lx * (1.0 / ew)
    half = t * t
    half *= -eh
    half += eh  # eh * (1 - t^2)
    d = np.abs(ly) - half
    np.maximum(d, alx - ew, out=d)
    sclera = f.cover(d, f.thin(eh))
    _blend(view, sclera, _SCLERA)
    gx, gy = f.nuisance.gaze
    ri = lx - gx
    ri *= ri
    q = ly - gy
    ri += q * q
    np.sqrt(ri, out=ri)
    m = f.cover(ri - ir, f.thin(ir))
    m *= sclera
    _blend(view, m, _col(i.iris_color))
    m = f.cover(ri - 0.42 * ir, f.thin(0.42 * ir))
    m *= sclera
    _blend(view, m, _PUPIL)
    # Upper lid / lashes: a dark band along the top of the opening.
    d = ly + half
    d += 0.35
    np.abs(d, out=d)
    d -= 0.7
    np.maximum(d, alx - 1.08 * ew, out=d)
    _blend(view, f.cover(d, 0.9 * f.thin(0.7)), _LASH)


def _paint_brows(f: _Frame, img: np.ndarray, lm: tuple[float, ...]) -> None:
    i = f.identity
    gap, hl, arch, thick, slope, dark = i.brow
    lx, ly, rx, ry = lm[0] - 1.0, lm[1] - gap, lm[2] + 1.0, lm[3] - gap
    win = f.pair_window(lx, ly, rx, ry, hl + 4.0)
    if win is None:
        return
    x, y, sgn = _mirror_coords(f, win, lx, ly, rx, ry)
    t = x * (1.0 / hl)
    tt = t * sgn  # +1 at the outer end
    yc = t * t
    yc -= 1.0
    yc *= arch
    yc += tt * (slope * hl)
    th = np.maximum(tt, 0.0)
    th *= -0.45 * 0.5 * thick
    th += 0.5 * thick  # thinner towards the outer end
    d = y - yc
    np.abs(d, out=d)
    d -= th
    np.maximum(d, np.abs(x) - hl, out=d)
    _blend(img[:, win[0], win[1]], f.cover(d, 0.9 * f.thin(0.5 * thick)),
           _col(i.hair_color) * dark)


def _paint_nose(f: _Frame, img: np.ndarray, skin: np.ndarray, lm: tuple[float, ...]) -> None:
    i = f.identity
    nw, nos, bridge, tip = i.nose
    nx, ny = lm[4], lm[5]
    length = ny - 0.5 * (lm[1] + lm[3])
    win = f.window(nx, ny - 0.4 * length, max(nw + 5.0, 0.6 * length + 5.0))
    if win is None:
        return
    x = f.Xw[win] - nx
    y = f.Yw[win] - ny
    view = img[:, win[0], win[1]]
    ax_ = np.abs(x)
    # One multiplicative relief map: bridge-side shadows (deeper away from the light),
    # wing and under-tip shadows, tip highlight.
    along = (y + (length - 3.0)) * (1.0 / 6.0)
    _uclip(along, 0.0, 1.0, out=along)
    q = 0.5 - 0.5 * y
    _uclip(q, 0.0, 1.0, out=q)
    along *= q
    sb, ab = f.soft(1.6)
    lx = f.nuisance.light[0]
    along *= np.where(x < 0.0, np.float32(-(1.0 + 0.8 * lx) * bridge * ab),
                      np.float32(-(1.0 - 0.8 * lx) * bridge * ab))
    q = (ax_ - 0.45 * nw) * (1.0 / sb)
    q *= q
    np.exp(-q, out=q)
    relief = along * q
    relief += 1.0
    sw, aw = f.soft(1.9)
    q = (ax_ - 0.8 * nw) * (1.0 / sw)
    q *= q
    r = (y - 0.5) * (1.0 / 2.8)
    q += r * r
    np.exp(-q, out=q)
    relief -= q * (0.22 * aw)
    su, au = f.soft(1.4)
    q = x * (1.0 / nw)
    q *= q
    r = (y - 3.4) * (1.0 / su)
    q += r * r
    np.exp(-q, out=q)
    relief -= q * (0.16 * au)
    q = x * (1.0 / 2.8)
    q *= q
    r = (y + 1.5) * (1.0 / 2.8)
    q += r * r
    np.exp(-q, out=q)
    relief += q * (0.5 * tip)
    view *= relief
    # Nostrils.
    q = (ax_ - 0.42 * nw) * (1.0 / nos)
    q *= q
    r = (y - 1.9) * (1.0 / (0.6 * nos))
    q += r * r
    np.sqrt(q, out=q)
    q -= 1.0
    q *= 0.6 * nos
    _blend(view, f.cover(q, 0.85 * f.thin(0.6 * nos)), skin * 0.3)


def _paint_mouth(f: _Frame, img: np.ndarray, lm: tuple[float, ...]) -> None:
    i = f.identity
    up, lo, bow = i.mouth
    lip = _col(i.lip_color)
    lmx, lmy, rmx, rmy = lm[6], lm[7], lm[8], lm[9]
    cx, cy = 0.5 * (lmx + rmx), 0.5 * (lmy + rmy)
    hw = 0.5 * math.hypot(rmx - lmx, rmy - lmy)
    c, s = (rmx - lmx) / (2 * hw), (rmy - lmy) / (2 * hw)
    win = f.window(cx, cy, hw + 6.0)
    if win is None:
        return
    x = f.Xw[win] - cx
    y = f.Yw[win] - cy
    mx = c * x + s * y
    my = y * c
    my -= s * x
    view = img[:, win[0], win[1]]
    t = mx * (1.0 / hw)
    t2 = t * t
    prof = 1.0 - t2
    np.maximum(prof, 0.0, out=prof)
    np.sqrt(prof, out=prof)
    # Shadow under the lower lip (chin crease) for a bit of relief.
    sc, ac = f.soft(1.6)
    q = (my - (lo + 2.2)) * (1.0 / sc)
    q *= q
    q += t2 * 0.81
    np.exp(-q, out=q)
    q *= -0.14 * ac
    q += 1.0
    view *= q
    up_edge = np.exp(t2 * (-1.0 / 0.0256))  # cupid's bow dip in the middle
    up_edge *= -bow
    up_edge += 1.0
    up_edge *= prof
    up_edge *= up
    d = np.where(my < 0.0, -my - up_edge, my - lo * prof)
    amx = np.abs(mx)
    np.maximum(d, amx - hw, out=d)
    _blend(view, f.cover(d, f.thin(0.5 * (up + lo))), lip)
    d = np.abs(my)
    d -= 0.5
    np.maximum(d, amx - (hw + 0.5), out=d)
    _blend(view, f.cover(d, 0.85 * f.thin(0.5)), lip * 0.35)


def _paint_skin_marks(f: _Frame, img: np.ndarray, skin: np.ndarray, lm: tuple[float, ...],
                      head: np.ndarray) -> None:
    """Blush, moles and beard (identity traits on the front of the face).

    ``head`` is the head coverage on the full canvas.
    """
    i = f.identity
    strength, rad = i.blush
    if strength > 0.02:
        cy = lm[5] + 2.0
        win = f.pair_window(lm[0], cy, lm[2], cy, 2.0 * rad)
        if win is not None:
            # Both cheeks at once: distance to the nearer of two mirrored centres.
            q = np.abs(f.Xw[win] - 0.5 * (lm[0] + lm[2]))
            q -= 0.5 * (lm[2] - lm[0])
            q *= q
            r = f.Yw[win] - cy
            q += r * r
            q *= -0.5 / (rad * rad)
            np.exp(q, out=q)
            img[:, win[0], win[1]] += q * (_BLUSH * strength)
    mole_col = skin * 0.42
    for mx, my, mr in i.moles:
        win = f.window(mx, my, mr + 2.0)
        if win is None:
            continue
        q = f.Xw[win] - mx
        q *= q
        r = f.Yw[win] - my
        q += r * r
        np.sqrt(q, out=q)
        q -= mr
        m = f.cover(q, 0.85 * f.thin(mr))
        m *= head[win]
        _blend(img[:, win[0], win[1]], m, mole_col)
    dens, moustache, chin, cheeks = i.beard
    if dens <= 0.0:
        return
    ny = lm[5]
    mcx, mcy = 0.5 * (lm[6] + lm[8]), 0.5 * (lm[7] + lm[9])
    hw = 0.5 * (lm[8] - lm[6])
    up, lo, _ = i.mouth
    chin_y = f.hcy + f.ay
    win = f.window(f.hcx, 0.5 * (ny + chin_y), 0.5 * (chin_y - ny) + 34.0)
    if win is None:
        return
    Xw = f.Xw[win]
    X, Y = Xw - mcx, f.Yw[win] - mcy
    m = np.zeros(X.shape, dtype=np.float32)
    ax_ = np.abs(X)
    if moustache:  # a band over the upper lip that droops at the ends
        yc = np.square(X * (1.0 / (hw + 2.0))) * 3.0 - (up + 2.4)
        d = np.maximum(np.abs(Y - yc) - 2.0, ax_ - (hw + 2.5))
        np.maximum(m, f.cover(d), out=m)
    if chin:  # goatee around and under the lower lip
        d = (np.sqrt(np.square(X * (1.0 / (hw + 1.5))) + np.square((Y - lo - 9.0) * 0.1)) - 1.0) * 8.0
        np.maximum(m, f.cover(d), out=m)
    if cheeks:  # full beard: the lower face below a line rising towards the ears
        u = np.abs(Xw - f.hcx) * (1.0 / f.ax)
        line = (ny - mcy + 6.0) - 22.0 * np.maximum(u - 0.5, 0.0)
        np.maximum(m, f.cover(line - Y), out=m)
    # Stubble texture so it reads as hair rather than a shadow.
    m *= head[win]
    m *= (0.85 + 0.15 * np.cos(2.1 * X) * np.cos(1.7 * Y)) * dens
    _blend(img[:, win[0], win[1]], m, _col(i.hair_color) * 0.85)


def _paint_debug_dots(f: _Frame, img: np.ndarray, lm: tuple[float, ...]) -> None:
    """Dots at the canonical landmarks, drawn *inside* the face so they follow the warp."""
    # At least ~2.3 output px radius so even small, foreshortened dots keep a few pixels
    # of pure colour (the anti-aliased rim is blended).
    r = max(1.6, 2.3 / f.k)
    for j in range(5):
        px, py = lm[2 * j], lm[2 * j + 1]
        win = f.window(px, py, r + 2.0)
        if win is None:
            continue
        d = np.sqrt(np.square(f.Xw[win] - px) + np.square(f.Yw[win] - py)) - r
        _blend(img[:, win[0], win[1]], f.cover(d), _DOT)


def _paint_occluder(f: _Frame, img: np.ndarray) -> None:
    n = f.nuisance
    if n.occluder == 0:
        return
    cx, cy = n.occluder_params[:2]
    X, Y = f.X, f.Y
    if n.occluder in (3, 4):
        # Sunglasses and masks sit on the face and follow the pose; bars / rectangles are
        # in front of the head and only follow the crop's similarity transform.
        on = f.Xw < 0.5 * _FAR
        X, Y = np.where(on, f.Xw, X), np.where(on, f.Yw, Y)
    m = f.cover(_occluder_distance(n.occluder, n.occluder_params, X, Y))
    if n.occluder == 4:  # a mask does not stick out beyond the cheeks
        lim = np.zeros_like(m)
        lim[f.hwin] = f.cover((np.sqrt(np.square(f.u0 * (1.0 / 1.06)) + np.square(f.v0)) - 1.0) * f.ax)
        m *= lim
    _blend(img, m, _col(n.occluder_color))
    if n.occluder == 3:  # a glint on each lens so they read as glasses
        sg, ag = f.soft(2.0)
        g = np.exp(-(np.square(np.abs(X - cx) - 14.0) + np.square(Y - (cy - 3.0))) * (1.0 / (2 * sg * sg)))
        g *= m
        g *= 70.0 * ag * ag
        img += g


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
