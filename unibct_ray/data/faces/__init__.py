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

This package needs only numpy and Pillow; it must not import ray or torch. Its modules follow
the seams above: ``records`` (knobs and parameter records), ``identity`` (identity sampling),
``nuisance`` (per-image nuisance, detector score), ``geometry`` (canonical frame, pose,
landmarks), ``frame`` (the pixel grid and colours), ``paint`` (the layer painters) and
``render`` (one image).
"""

from __future__ import annotations

from .geometry import project_landmarks
from .identity import sample_identity
from .nuisance import detector_score, jitter_nuisance, sample_nuisance
from .records import DEBUG_DOT_COLOR, LANDMARK_MARK_COLOR, OCCLUDER_KINDS, FaceKnobs, Identity, Nuisance, RenderedFace
from .render import render_aligned, render_face, render_loose

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
