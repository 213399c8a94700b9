"""Five-point face geometry shared by the synthetic renderer and the IJB-C aligner.

Points are (x, y) in pixels, ordered: left eye, right eye, nose tip, left mouth corner,
right mouth corner (image left/right), as in the insightface 112x112 ArcFace crop.

Pixel-centre convention
-----------------------
All coordinates in this module (landmarks, templates, transform matrices) use the
*integer-centre* convention: the centre of the pixel in column ``i`` and row ``j`` is the
point ``(x, y) = (i, j)``. This is the convention of OpenCV's ``warpAffine`` and therefore
of the insightface detectors and of :data:`ARCFACE_TEMPLATE_112`, so landmarks from the
IJB-C meta files can be used unchanged. Pillow samples at *half-integer* centres
(pixel ``i`` covers ``[i, i + 1)``); :func:`align_face` converts between the two so a point
at ``(x, y)`` in the source appears at ``M @ (x, y, 1)`` in the aligned crop.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

__all__ = [
    "ARCFACE_TEMPLATE_112",
    "template_for_size",
    "estimate_similarity",
    "transform_points",
    "invert_affine",
    "align_face",
    "align_faces",
]

#: Landmark positions of the canonical 112x112 ArcFace crop, [5, 2] (x, y).
ARCFACE_TEMPLATE_112 = np.array(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ],
    dtype=np.float32,
)
ARCFACE_TEMPLATE_112.setflags(write=False)


def template_for_size(size: int) -> np.ndarray:
    """The ArcFace template scaled to a ``size`` x ``size`` crop, [5, 2] float32."""
    if size <= 0:
        raise ValueError(f"crop size must be positive, got {size}")
    return (ARCFACE_TEMPLATE_112 * (size / 112.0)).astype(np.float32)


def _as_points(name: str, pts: np.ndarray) -> np.ndarray:
    """Validate a point set and return it as float64 [n, 2]."""
    arr = np.asarray(pts, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise ValueError(f"{name} must have shape [n, 2], got {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or infinite coordinates")
    return arr


def estimate_similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity transform mapping ``src`` onto ``dst``.

    Closed form of Umeyama (1991), "Least-squares estimation of transformation parameters
    between two point patterns": minimises ``sum_i |s R src_i + t - dst_i|^2`` over a
    rotation ``R`` (det +1, i.e. no reflection), a scale ``s > 0`` and a translation ``t``.

    Args:
        src: [n, 2] source points (x, y), n >= 2.
        dst: [n, 2] destination points (x, y), same n.

    Returns:
        [2, 3] float64 matrix ``[[a, -b, tx], [b, a, ty]]`` with ``dst ~ M @ [x, y, 1]``.

    Raises:
        ValueError: shapes differ, fewer than 2 points, NaN/inf, or either point set has
            fewer than 2 distinct points (the transform would be undetermined/singular).
    """
    s = _as_points("src", src)
    d = _as_points("dst", dst)
    if s.shape != d.shape:
        raise ValueError(f"src and dst must have the same shape, got {s.shape} and {d.shape}")
    n = s.shape[0]
    if n < 2:
        raise ValueError(f"need at least 2 point pairs, got {n}")

    mu_s = s.mean(axis=0)
    mu_d = d.mean(axis=0)
    sc = s - mu_s
    dc = d - mu_d
    var_s = float(np.mean(np.sum(sc * sc, axis=1)))
    var_d = float(np.mean(np.sum(dc * dc, axis=1)))
    # Relative threshold: coincident points up to rounding must count as one point.
    scale_ref = max(1.0, float(np.abs(s).max()), float(np.abs(d).max()))
    eps = (1e-12 * scale_ref) ** 2
    if var_s <= eps:
        raise ValueError("src has fewer than 2 distinct points; similarity is undetermined")
    if var_d <= eps:
        raise ValueError("dst has fewer than 2 distinct points; similarity would be singular")

    cov = dc.T @ sc / n  # [2, 2], Umeyama's Sigma_xy
    u, sing, vt = np.linalg.svd(cov)
    # The sign fix forces det(R) = +1: the optimum over proper rotations, never a mirror.
    corr = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        corr[-1] = -1.0
    rot = (u * corr) @ vt
    scale = float(np.dot(sing, corr)) / var_s
    if not scale > 0.0:
        # Happens when dst is a mirror image of an isotropic src (e.g. a mirrored square):
        # every proper rotation fits equally badly and the optimum collapses to a point.
        raise ValueError("degenerate correspondence: best similarity has zero scale")
    t = mu_d - scale * rot @ mu_s
    m = np.empty((2, 3), dtype=np.float64)
    m[:, :2] = scale * rot
    m[:, 2] = t
    return m


def transform_points(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Apply a [2, 3] affine ``matrix`` to [..., 2] ``points``; returns float64 [..., 2]."""
    m = np.asarray(matrix, dtype=np.float64)
    if m.shape != (2, 3):
        raise ValueError(f"matrix must have shape [2, 3], got {m.shape}")
    p = np.asarray(points, dtype=np.float64)
    if p.shape[-1:] != (2,):
        raise ValueError(f"points must have shape [..., 2], got {p.shape}")
    return p @ m[:, :2].T + m[:, 2]


def invert_affine(matrix: np.ndarray) -> np.ndarray:
    """Inverse of a [2, 3] affine ``matrix`` (as a [2, 3] float64); ValueError if singular."""
    m = np.asarray(matrix, dtype=np.float64)
    if m.shape != (2, 3):
        raise ValueError(f"matrix must have shape [2, 3], got {m.shape}")
    a = m[:, :2]
    det = float(np.linalg.det(a))
    if not np.isfinite(det) or abs(det) < 1e-12:
        raise ValueError(f"affine matrix is singular (det={det})")
    a_inv = np.linalg.inv(a)
    out = np.empty((2, 3), dtype=np.float64)
    out[:, :2] = a_inv
    out[:, 2] = -a_inv @ m[:, 2]
    return out


def _check_image(image: np.ndarray) -> np.ndarray:
    img = np.asarray(image)
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"image must be uint8 [H, W, 3], got {img.dtype} {img.shape}")
    if img.shape[0] == 0 or img.shape[1] == 0:
        raise ValueError(f"image is empty: {img.shape}")
    return np.ascontiguousarray(img)


def align_face(image: np.ndarray, landmarks: np.ndarray, size: int = 112) -> np.ndarray:
    """Warp ``image`` so its five ``landmarks`` land on ``template_for_size(size)``.

    Args:
        image: uint8 [H, W, 3] (RGB or BGR; channels are passed through unchanged).
        landmarks: [5, 2] (x, y) in the integer-centre convention (module docstring).
        size: side of the square output crop.

    Returns:
        uint8 [size, size, 3]. Bilinear interpolation; output pixels whose sample point
        lies outside the source image are 0.

    Raises:
        ValueError: bad image/landmark shapes, NaN landmarks, or degenerate landmarks.
    """
    img = _check_image(image)
    lm = _as_points("landmarks", landmarks)
    if lm.shape != (5, 2):
        raise ValueError(f"landmarks must have shape [5, 2], got {lm.shape}")
    if size <= 0:
        raise ValueError(f"crop size must be positive, got {size}")
    fwd = estimate_similarity(lm, template_for_size(size))  # source -> crop
    inv = invert_affine(fwd)  # crop -> source, what PIL asks for
    # PIL evaluates the mapping at half-integer output coordinates (u + 0.5) and reads the
    # source with centres at half-integers too; conjugating by a 0.5 shift keeps the
    # integer-centre convention: src_pil = inv(out_pil - 0.5) + 0.5.
    a = inv[:, :2]
    t = inv[:, 2] - a @ np.array([0.5, 0.5]) + 0.5
    coeffs = (a[0, 0], a[0, 1], t[0], a[1, 0], a[1, 1], t[1])
    warped = Image.fromarray(img).transform(
        (size, size),
        Image.Transform.AFFINE,
        data=tuple(float(c) for c in coeffs),
        resample=Image.Resampling.BILINEAR,
        fillcolor=(0, 0, 0),
    )
    return np.asarray(warped, dtype=np.uint8).reshape(size, size, 3)


def align_faces(
    images: Sequence[np.ndarray] | np.ndarray, landmarks: np.ndarray, size: int = 112
) -> np.ndarray:
    """Batch :func:`align_face`.

    Args:
        images: N uint8 [H_i, W_i, 3] images (a sequence, or one [N, H, W, 3] array).
        landmarks: [N, 5, 2].
        size: output side.

    Returns:
        uint8 [N, size, size, 3].
    """
    lms = np.asarray(landmarks, dtype=np.float64)
    if lms.ndim != 3 or lms.shape[1:] != (5, 2):
        raise ValueError(f"landmarks must have shape [N, 5, 2], got {lms.shape}")
    if len(images) != lms.shape[0]:
        raise ValueError(f"{len(images)} images but {lms.shape[0]} landmark sets")
    out = np.empty((lms.shape[0], size, size, 3), dtype=np.uint8)
    for i, (img, lm) in enumerate(zip(images, lms)):
        out[i] = align_face(img, lm, size)
    return out
