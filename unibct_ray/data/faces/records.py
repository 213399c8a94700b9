"""Knobs and parameter records of the synthetic faces: what an identity and an image are."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["FaceKnobs", "Identity", "Nuisance", "RenderedFace", "OCCLUDER_KINDS", "DEBUG_DOT_COLOR", "LANDMARK_MARK_COLOR"]

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
