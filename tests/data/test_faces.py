"""Synthetic face renderer: determinism, landmark geometry, identity signal, scores, shapes."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import numpy as np
import pytest

from unibct_ray.data import faces as F
from unibct_ray.data.landmarks import ARCFACE_TEMPLATE_112, align_face, estimate_similarity, transform_points

# Geometry on (defaults, plus stronger pose and rotation), photometric nuisance off.
GEOMETRY_ONLY = F.FaceKnobs(
    illumination=0.0, blur_sigma=0.0, noise_std=0.0, occlusion_prob=0.0, hard_prob=0.0,
    landmark_noise=0.0, yaw=35.0, pitch=20.0, rotation_deg=15.0,
)


def _dot_centroids(image: np.ndarray, landmarks: np.ndarray, *, exact: bool = True,
                   radius: float = np.inf) -> tuple[np.ndarray, np.ndarray, int]:
    """Find the debug dots: centroids of dot-coloured pixels, each pixel assigned to its
    nearest returned landmark (ignoring pixels farther than ``radius``); also the pixel
    count per landmark and the number of dot pixels farther than 6 px from every landmark
    (dots no landmark accounts for; a dot near the head's rim is stretched by the pose,
    so allow 6 px).

    ``exact``: only pixels of exactly DEBUG_DOT_COLOR (the dot cores of a render without
    photometric nuisance; no background colour can match); otherwise a tolerant
    threshold, for resampled images.
    """
    img = image.astype(np.int32)
    if exact:
        mask = np.all(img == np.asarray(F.DEBUG_DOT_COLOR), axis=-1)
    else:
        mask = (img[..., 1] > 170) & (img[..., 0] < 110) & (img[..., 2] < 110)
    ys, xs = np.nonzero(mask)
    pix = np.stack([xs, ys], axis=1).astype(np.float64)
    dist = np.linalg.norm(pix[:, None, :] - landmarks[None, :, :].astype(np.float64), axis=2)
    owner = np.argmin(dist, axis=1)
    near = dist.min(axis=1)
    stray = int(np.sum(near > 6.0))
    cents = np.full((5, 2), np.nan)
    counts = np.zeros(5, dtype=int)
    for j in range(5):
        sel = pix[(owner == j) & (near <= radius)]
        counts[j] = len(sel)
        if len(sel):
            cents[j] = sel.mean(axis=0)
    return cents, counts, stray


# --------------------------------------------------------------------------------------
# 1. Determinism
# --------------------------------------------------------------------------------------


def test_identity_sampling_is_deterministic_and_id_dependent():
    assert F.sample_identity(3, 7) == F.sample_identity(3, 7)
    assert F.sample_identity(3, 7) != F.sample_identity(3, 8)
    assert F.sample_identity(3, 7) != F.sample_identity(4, 7)
    with pytest.raises(ValueError):
        F.sample_identity(-1, 0)


def test_rendering_is_deterministic():
    ident = F.sample_identity(0, 5)
    a = F.render_aligned(ident, np.random.default_rng(11), 64)
    b = F.render_aligned(ident, np.random.default_rng(11), 64)
    assert a.tobytes() == b.tobytes()
    la = F.render_loose(ident, np.random.default_rng(12), 64)
    lb = F.render_loose(ident, np.random.default_rng(12), 64)
    assert la.image.tobytes() == lb.image.tobytes()
    assert np.array_equal(la.landmarks, lb.landmarks) and la.score == lb.score
    # The same (identity, nuisance) pair renders identically, however often.
    n = F.sample_nuisance(np.random.default_rng(13), loose=False)
    assert F.render_face(ident, n, 48, loose=False).image.tobytes() == \
        F.render_face(ident, n, 48, loose=False).image.tobytes()


def test_different_identities_render_differently():
    n = F.sample_nuisance(np.random.default_rng(1), loose=False)
    imgs = [F.render_face(F.sample_identity(0, i), n, 64, loose=False).image.astype(np.float64)
            for i in range(6)]
    for i in range(6):
        for j in range(i + 1, 6):
            assert np.abs(imgs[i] - imgs[j]).mean() > 3.0, (i, j)


def test_sampling_uses_only_the_given_generator():
    np.random.seed(0)
    first = F.sample_nuisance(np.random.default_rng(5), loose=True)
    np.random.seed(1)  # the global state must not matter
    assert F.sample_nuisance(np.random.default_rng(5), loose=True) == first
    rng = np.random.default_rng(5)
    F.sample_nuisance(rng, loose=True)
    assert F.sample_nuisance(rng, loose=True) != first  # the generator advanced


# --------------------------------------------------------------------------------------
# 2. Landmarks agree with the rendered geometry
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("loose,size", [(False, 112), (False, 64), (True, 112), (True, 64)])
def test_returned_landmarks_match_warped_debug_dots(loose: bool, size: int):
    rng = np.random.default_rng(100 + size + loose)
    rotations = []
    for trial in range(6):
        ident = F.sample_identity(1, trial)
        n = F.sample_nuisance(rng, GEOMETRY_ONLY, loose=loose)
        rotations.append(abs(n.roll_deg))
        r = F.render_face(ident, n, size, loose=loose, debug_dots=True)
        cents, counts, stray = _dot_centroids(r.image, r.landmarks)
        # Every landmark owns a visible dot (one squeezed against the head's outline by
        # the pose may keep only a pixel or two of pure colour).
        assert np.all(counts >= 1) and np.median(counts) >= 3, (trial, counts)
        assert stray == 0, trial  # and every dot belongs to a landmark
        err = np.linalg.norm(cents - r.landmarks, axis=1)
        assert err.max() < 1.5, (trial, err, n.yaw_deg, n.pitch_deg, n.roll_deg)
    assert max(rotations) > 5.0  # the check really exercised in-plane rotation


def test_pose_moves_inner_features_and_dots_follow():
    ident = F.sample_identity(2, 0)
    base = F.sample_nuisance(np.random.default_rng(0), GEOMETRY_ONLY, loose=False)
    front = dataclasses.replace(base, yaw_deg=0.0, pitch_deg=0.0, roll_deg=0.0, centre=(0.5, 0.5),
                                face_scale=1.0)
    right = dataclasses.replace(front, yaw_deg=30.0)
    down = dataclasses.replace(front, pitch_deg=20.0)
    for n in (front, right, down):
        r = F.render_face(ident, n, 112, loose=False, debug_dots=True)
        cents, counts, _ = _dot_centroids(r.image, r.landmarks)
        assert np.all(counts >= 1) and np.median(counts) >= 3, counts
        assert np.abs(cents - r.landmarks).max() < 1.5, cents - r.landmarks
    lm0 = F.project_landmarks(ident, front, 112)
    assert (F.project_landmarks(ident, right, 112)[:, 0] - lm0[:, 0]).min() > 5.0  # yaw: right
    assert (F.project_landmarks(ident, down, 112)[:, 1] - lm0[:, 1]).min() > 3.0  # pitch: down


def test_frontal_aligned_landmarks_are_the_scaled_identity_geometry():
    ident = F.sample_identity(0, 9)
    n = F.sample_nuisance(np.random.default_rng(0), F.FaceKnobs(strength=0), loose=False)
    lm = np.asarray(ident.landmarks).reshape(5, 2)
    got = F.render_face(ident, n, 56, loose=False).landmarks
    np.testing.assert_allclose(got, lm * 0.5, atol=1e-4)
    # Identities are offset from the template by a few pixels, not more.
    offs = np.stack([np.asarray(F.sample_identity(0, i).landmarks).reshape(5, 2) - ARCFACE_TEMPLATE_112
                     for i in range(50)])
    assert 0.8 < np.abs(offs).mean() < 4.0 and np.abs(offs).max() < 12.0


def test_loose_landmark_noise_is_small_and_alignment_recovers_the_face():
    knobs = dataclasses.replace(GEOMETRY_ONLY, landmark_noise=0.4, yaw=0.0, pitch=0.0)
    rng = np.random.default_rng(3)
    for trial in range(5):
        ident = F.sample_identity(4, trial)
        n = F.sample_nuisance(rng, knobs, loose=True)
        r = F.render_face(ident, n, 112, loose=True, debug_dots=True)
        clean = F.project_landmarks(ident, n, 112)
        k = n.face_scale * r.image.shape[0] / 112.0  # output px per 112-px unit
        dev = np.linalg.norm(r.landmarks - clean, axis=1)
        assert 0.0 < dev.max() <= 1.0 * np.sqrt(2) * k + 1e-4
        # The landmarks use align_face's pixel convention: aligning the crop by them maps
        # the dots (drawn at the noise-free points) where the fitted similarity sends those.
        aligned = align_face(r.image, r.landmarks, 112)
        fit = estimate_similarity(r.landmarks, ARCFACE_TEMPLATE_112)
        expect = transform_points(fit, clean)
        cents, counts, _ = _dot_centroids(aligned, expect, exact=False, radius=6.0)
        assert np.all(counts >= 3)
        assert np.abs(cents - expect).max() < 1.0, (trial, cents - expect)
        # ... which is near the template (identities differ from it by a few px).
        assert np.abs(expect - ARCFACE_TEMPLATE_112).max() < 8.0


# --------------------------------------------------------------------------------------
# 3. Identity is the signal, nuisance is the noise
# --------------------------------------------------------------------------------------


def _render_set(knobs: F.FaceKnobs, n_id: int = 20, n_img: int = 12,
                size: int = 48) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for i in range(n_id):
        ident = F.sample_identity(7, i)
        rng = np.random.default_rng([7, i])
        for _ in range(n_img):
            xs.append(F.render_aligned(ident, rng, size, knobs).astype(np.float64).ravel())
            ys.append(i)
    return np.stack(xs), np.array(ys)


def test_identity_is_learnable_from_raw_pixels_but_nuisance_is_substantial():
    n_id, n_img = 20, 12
    x, y = _render_set(F.FaceKnobs(), n_id, n_img)
    # Leave-one-out nearest class mean on raw pixels.
    sums = np.zeros((n_id, x.shape[1]))
    np.add.at(sums, y, x)
    correct = 0
    for t in range(len(x)):
        means = sums.copy()
        means[y[t]] -= x[t]
        cnt = np.full(n_id, float(n_img))
        cnt[y[t]] -= 1.0
        means /= cnt[:, None]
        correct += int(np.argmin(((means - x[t]) ** 2).sum(axis=1)) == y[t])
    acc = correct / len(x)
    assert acc > 3.0 / n_id, acc  # measured 0.21-0.34 over world seeds 5-11; chance is 0.05
    # Nuisance is not negligible: within-identity distances are a large fraction of
    # between-identity ones (measured ~0.87), yet identities are still closer to themselves.
    sq = (x * x).sum(axis=1)
    d = np.sqrt(np.maximum(sq[:, None] + sq[None, :] - 2.0 * x @ x.T, 0.0))
    same = y[:, None] == y[None, :]
    off_diag = ~np.eye(len(x), dtype=bool)
    ratio = d[same & off_diag].mean() / d[~same].mean()
    assert 0.3 < ratio < 0.97, ratio


def test_without_nuisance_all_images_of_an_identity_are_identical():
    knobs = F.FaceKnobs(strength=0.0)
    for i in range(3):
        ident = F.sample_identity(0, i)
        rng = np.random.default_rng(i)
        imgs = [F.render_aligned(ident, rng, 48, knobs).astype(np.int16) for _ in range(4)]
        for im in imgs[1:]:
            assert np.abs(im - imgs[0]).max() <= 1
    other = F.render_aligned(F.sample_identity(0, 99), np.random.default_rng(0), 48, knobs)
    assert np.abs(other.astype(np.int16) - imgs[0]).mean() > 3.0


def test_identity_spread_controls_how_different_identities_are():
    def between(spread: float) -> float:
        knobs = F.FaceKnobs(strength=0.0, identity_spread=spread)
        n = F.sample_nuisance(np.random.default_rng(0), knobs, loose=False)
        imgs = [F.render_face(F.sample_identity(0, i, knobs), n, 48, loose=False).image.astype(np.float64)
                for i in range(8)]
        return float(np.mean([np.abs(a - b).mean() for a in imgs for b in imgs]))

    assert between(0.0) < 0.5
    assert between(0.3) < between(1.0)


def test_blur_and_noise_knobs_change_the_image_as_intended():
    ident = F.sample_identity(0, 4)
    base = F.sample_nuisance(np.random.default_rng(2), GEOMETRY_ONLY, loose=False)

    def grad_energy(n: F.Nuisance) -> float:
        # Squared differences: blurring an edge over w px cuts this by ~1/w (the total
        # variation, mean |diff|, would not change).
        img = F.render_face(ident, n, 112, loose=False).image.astype(np.float64)
        return float(np.square(np.diff(img, axis=0)).mean() + np.square(np.diff(img, axis=1)).mean())

    sharp = grad_energy(base)  # ratios measured over 4 identities: blur 0.12-0.16, noise 2.1-4.5
    assert grad_energy(dataclasses.replace(base, blur_sigma=2.5)) < 0.4 * sharp
    assert grad_energy(dataclasses.replace(base, noise_std=15.0)) > 1.5 * sharp


# --------------------------------------------------------------------------------------
# 4. Detector scores
# --------------------------------------------------------------------------------------


def test_hard_images_score_lower():
    rng = np.random.default_rng(0)
    knobs = F.FaceKnobs(hard_prob=0.5)
    ns = [F.sample_nuisance(rng, knobs, loose=bool(i % 2)) for i in range(600)]
    scores = np.array([n.score for n in ns])
    hard = np.array([n.hard for n in ns])
    assert np.all((scores > 0.0) & (scores <= 1.0))
    assert 0.3 < hard.mean() < 0.7
    # Measured: hard mean ~0.11, easy mean ~0.91.
    assert scores[hard].mean() < 0.35 < 0.75 < scores[~hard].mean()
    assert np.median(scores[~hard]) > 0.85
    # Rendering reports the nuisance's score; clean images score near 1.
    ident = F.sample_identity(0, 0)
    r = F.render_face(ident, ns[1], 48, loose=True)
    assert r.score == ns[1].score
    clean = F.sample_nuisance(rng, F.FaceKnobs(strength=0.0), loose=False)
    assert clean.score > 0.97 and not clean.hard


def test_jitter_nuisance_makes_nearby_frames():
    rng = np.random.default_rng(4)
    ident = F.sample_identity(0, 1)
    base = F.sample_nuisance(rng, F.FaceKnobs(hard_prob=0.0), loose=True)
    lm0 = F.project_landmarks(ident, base, 112)
    steps, fresh = [], []
    for _ in range(20):
        j = F.jitter_nuisance(base, rng)
        assert j.loose and j.background == base.background and j.occluder == base.occluder
        assert 0.0 < j.score <= 1.0
        steps.append(np.abs(F.project_landmarks(ident, j, 112) - lm0).mean())
        fresh.append(np.abs(F.project_landmarks(ident, F.sample_nuisance(rng, loose=True), 112) - lm0).mean())
    assert np.mean(steps) < 0.5 * np.mean(fresh)
    assert np.mean(steps) > 0.1
    # Chained frames (a long video) are a bounded walk: the face stays in the canvas.
    n, knobs = base, F.FaceKnobs()
    for _ in range(200):
        n = F.jitter_nuisance(n, rng, knobs)
        w = round(n.canvas_ratio * 112)
        lm = F.project_landmarks(ident, n, 112)
        assert lm.min() > 0.0 and lm.max() < w - 1
        assert abs(n.roll_deg) <= knobs.loose_rotation_deg + 1e-9
        assert knobs.loose_face_frac[0] - 1e-9 <= n.face_scale <= knobs.loose_face_frac[1] + 1e-9


# --------------------------------------------------------------------------------------
# 5. Shapes, dtypes, API contracts
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [32, 48, 112])
def test_shapes_and_dtypes(size: int):
    ident = F.sample_identity(0, 3)
    rng = np.random.default_rng(size)
    img = F.render_aligned(ident, rng, size)
    assert img.shape == (size, size, 3) and img.dtype == np.uint8 and img.flags.c_contiguous
    for _ in range(3):
        r = F.render_loose(ident, rng, size)
        h, w, c = r.image.shape
        assert h == w and c == 3 and r.image.dtype == np.uint8
        assert round(1.5 * size) <= w <= round(1.7 * size)
        assert r.landmarks.shape == (5, 2) and r.landmarks.dtype == np.float32
        assert np.all((r.landmarks > -1.0) & (r.landmarks < w))
        assert isinstance(r.score, float) and 0.0 < r.score <= 1.0
        a = F.render_face(ident, F.sample_nuisance(rng, loose=False), size, loose=False)
        assert a.image.shape == (size, size, 3) and a.landmarks.shape == (5, 2)


def test_mark_landmarks_paints_red_dots_at_the_landmarks():
    r = F.render_face(F.sample_identity(0, 2), F.sample_nuisance(np.random.default_rng(8), loose=True),
                      96, loose=True, mark_landmarks=True)
    for x, y in np.rint(r.landmarks).astype(int):
        assert tuple(r.image[y, x]) == F.LANDMARK_MARK_COLOR


def test_loose_flag_must_match_the_nuisance():
    n = F.sample_nuisance(np.random.default_rng(0), loose=True)
    with pytest.raises(ValueError):
        F.render_face(F.sample_identity(0, 0), n, 48, loose=False)


def test_knob_validation():
    with pytest.raises(ValueError):
        F.FaceKnobs(hard_prob=1.5)
    with pytest.raises(ValueError):
        F.FaceKnobs(strength=-1.0)


def test_module_imports_neither_torch_nor_ray():
    code = ("import sys; sys.modules['ray'] = None; sys.modules['torch'] = None\n"
            "import unibct_ray.data.faces as f\n"
            "f.render_aligned(f.sample_identity(0, 0), __import__('numpy').random.default_rng(0), 32)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
