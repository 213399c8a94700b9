"""Synthetic MS1M + IJB-C in the real file formats (Ray-free pieces; the parallel driver is
``unibct_ray.distributed.synth``).

Everything is a pure function of ``SynthSpec``: class sizes, each identity's face, each image's
nuisance and the IJB-C template/pair plan are drawn from generators seeded by
``(seed, stream, ids...)``, so the output is identical whichever worker renders which part.
Training identities are ids ``0..identities-1``; IJB-C subjects are ids ``identities..``, so the
two never share a face.

Controlled training noise (all off by default, all recorded in ``synth.json``):

* ``label_noise`` F: round(F * n) of each class's n images are rendered from another training
  identity (drawn per image) under the nuisance the image would have had, and keep the label;
* ``outliers`` F: round(F * n) further images of each class are "hard" by force (extreme pose,
  strong blur, heavy occlusion or darkness, at least one of them);
* ``long_tail`` alpha: class sizes follow a power law n_r ~ r^-alpha over a random ranking of
  the identities, with the same mean ``images_per_identity`` (replaces ``count_spread``).

:func:`training_truth` gives, per image, whether it is noisy or an outlier and whose face it
really shows; ``data synth`` writes it as ``train_truth.parquet``.
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image

from unibct_ray.data.faces import FaceKnobs, jitter_nuisance, render_face, sample_identity, sample_nuisance
from unibct_ray.data.ms1m import MS1MHeader, write_ms1m_trailer
from unibct_ray.data.recordio import RecordIOWriter, pack_irheader
from unibct_ray.errors import UserError

__all__ = ["SynthSpec", "IJBCPlan", "TrainTruth", "SCIENCE_IJBC", "class_sizes", "power_law_sizes",
           "training_truth", "encode_jpeg", "render_training_images", "render_training_face",
           "write_train_part", "train_identity_ranges", "plan_ijbc", "render_ijbc_rows"]

# Streams of the seed sequence, one per kind of draw.
_COUNTS, _TRAIN_IMG, _IJBC_PLAN, _IJBC_IMG, _NOISE = 11, 12, 13, 14, 15

# The evaluation set that resolves TAR@FAR=1e-4: 2,000 subjects, 10,000 genuine and 1,000,000
# impostor template pairs (1e-4 then rests on 100 impostor pairs), ~44k images (2 gallery
# stills, 5 probe templates of 1-3 media, videos of 3 frames per subject). ``data synth
# --subjects 2000 --gallery-images 2 --probes-per-subject 5 --video-frames 3
# --impostor-pairs 1000000`` renders it.
SCIENCE_IJBC: dict[str, int] = {"eval_identities": 2000, "gallery_images": 2, "probes_per_identity": 5,
                                "video_frames": 3, "impostor_pairs": 1_000_000}


@dataclass(frozen=True)
class SynthSpec:
    """Every knob of the synthetic benchmark (the difficulty knobs live in ``FaceKnobs``)."""

    identities: int = 200
    images_per_identity: int = 20
    size: int = 112
    seed: int = 0
    count_spread: float = 0.5
    eval_identities: int = 200
    gallery_images: int = 3
    probes_per_identity: int = 3
    impostor_pairs: int = 20_000
    strength: float = 1.0
    jpeg_quality: int = 90
    knobs: FaceKnobs = field(default_factory=FaceKnobs)
    video_frames: int = 6
    label_noise: float = 0.0
    outliers: float = 0.0
    long_tail: float = 0.0

    def face_knobs(self) -> FaceKnobs:
        return replace(self.knobs, strength=self.strength)

    def outlier_knobs(self) -> FaceKnobs:
        """Knobs of a forced outlier: always "hard", at least full-strength amplitudes."""
        return replace(self.knobs, strength=max(self.strength, 1.0), hard_prob=1.0)

    def noise_settings(self) -> dict:
        """The training-noise settings (what a converted shard set records as its origin)."""
        return {"label_noise": self.label_noise, "outliers": self.outliers, "long_tail": self.long_tail,
                "count_spread": self.count_spread, "identities": self.identities,
                "images_per_identity": self.images_per_identity, "seed": self.seed}

    def validate(self) -> None:
        checks = [
            (self.identities >= 1, f"--identities must be >= 1, got {self.identities}"),
            (self.images_per_identity >= 1, f"--images-per-identity must be >= 1, got {self.images_per_identity}"),
            (16 <= self.size <= 512, f"--size must be in 16..512 pixels, got {self.size}"),
            (0.0 <= self.count_spread < 1.0, f"--count-spread must be in [0, 1), got {self.count_spread}"),
            (self.eval_identities >= 0, f"--subjects must be >= 0, got {self.eval_identities}"),
            (self.eval_identities != 1, "--subjects must be 0 or at least 2 (G1 and G2 need one each)"),
            (self.probes_per_identity >= 1, f"--probes-per-subject must be >= 1, got {self.probes_per_identity}"),
            (self.gallery_images >= 1, f"--gallery-images must be >= 1, got {self.gallery_images}"),
            (self.video_frames >= 1, f"--video-frames must be >= 1, got {self.video_frames}"),
            (0.0 <= self.label_noise < 1.0, f"--label-noise must be in [0, 1), got {self.label_noise}"),
            (0.0 <= self.outliers < 1.0, f"--outliers must be in [0, 1), got {self.outliers}"),
            (self.label_noise + self.outliers < 1.0,
             f"--label-noise + --outliers must be < 1, got {self.label_noise} + {self.outliers}"),
            (self.label_noise == 0 or self.identities >= 2, "--label-noise needs at least 2 --identities"),
            (0.0 <= self.long_tail <= 4.0, f"--long-tail must be in [0, 4] (0: off), got {self.long_tail}"),
            (self.impostor_pairs >= 0, f"--impostor-pairs must be >= 0, got {self.impostor_pairs}"),
            (self.strength >= 0.0, f"--strength must be >= 0, got {self.strength}"),
            (1 <= self.jpeg_quality <= 100, f"jpeg quality must be in 1..100, got {self.jpeg_quality}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise UserError(msg)

    def to_json(self) -> dict:
        return asdict(self)


def power_law_sizes(classes: int, mean: int, alpha: float) -> np.ndarray:
    """Class sizes by rank, int64 [classes], descending: n_r ~ c * r^-alpha, >= 1, sum = classes * mean.

    ``c`` solves sum_r max(1, c r^-alpha) = classes * mean (bisection; the floor of one image
    per class is part of the law), then sizes are rounded by largest remainder so the total,
    hence the mean, is exact.
    """
    total = classes * mean
    shape = np.arange(1, classes + 1, dtype=np.float64) ** -alpha
    lo, hi = 0.0, float(total) / shape[-1] + 1.0
    for _ in range(200):
        c = 0.5 * (lo + hi)
        lo, hi = (c, hi) if np.maximum(1.0, c * shape).sum() < total else (lo, c)
    real = np.maximum(1.0, hi * shape)
    sizes = np.floor(real).astype(np.int64)
    short = int(total - sizes.sum())
    if short > 0:  # largest remainders first; ties go to the bigger class (lower rank)
        order = np.lexsort((np.arange(classes), -(real - sizes)))
        sizes[order[:short]] += 1
    elif short < 0:  # only from float rounding at the floor: take from the largest classes
        sizes[:(-short)] -= 1
    return sizes


def class_sizes(spec: SynthSpec) -> np.ndarray:
    """Images per training identity, int64 [identities].

    Uniform in K(1 +- spread) (>= 1), or, with ``long_tail`` alpha > 0, the power law of
    :func:`power_law_sizes` assigned to identities in a random order.
    """
    k = spec.images_per_identity
    if spec.long_tail > 0:
        ranked = power_law_sizes(spec.identities, k, spec.long_tail)
        perm = np.random.default_rng([spec.seed, _COUNTS, 1]).permutation(spec.identities)
        return ranked[perm]
    if spec.count_spread == 0:
        return np.full(spec.identities, k, np.int64)
    rng = np.random.default_rng([spec.seed, _COUNTS])
    lo, hi = max(1, round(k * (1 - spec.count_spread))), max(1, round(k * (1 + spec.count_spread)))
    return rng.integers(lo, hi + 1, spec.identities).astype(np.int64)


def encode_jpeg(image: np.ndarray, quality: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


@dataclass(frozen=True)
class TrainTruth:
    """What each training image really is; arrays [n_images] in record-key order (key = row + 1)."""

    label: np.ndarray          # int64: the identity the image is labelled with
    true_identity: np.ndarray  # int64: the identity whose face it shows
    noisy: np.ndarray          # bool: label noise (true_identity != label)
    outlier: np.ndarray        # bool: a forced hard image

    def columns(self) -> dict[str, np.ndarray]:
        keys = np.arange(1, len(self.label) + 1, dtype=np.int64)
        return {"index": keys, "label": self.label, "true_identity": self.true_identity,
                "noisy": self.noisy, "outlier": self.outlier}


def _class_noise(spec: SynthSpec, identity_id: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    """(true identity int64 [count], outlier bool [count]) of one class's images.

    Exactly round(label_noise * count) images show another identity (each drawn uniformly
    from the other training identities) and round(outliers * count) others are outliers,
    at positions drawn without replacement; a pure function of (seed, identity, count).
    """
    true_id = np.full(count, identity_id, np.int64)
    outlier = np.zeros(count, bool)
    n_noisy, n_out = round(spec.label_noise * count), round(spec.outliers * count)
    if n_noisy + n_out == 0:
        return true_id, outlier
    rng = np.random.default_rng([spec.seed, _NOISE, identity_id])
    pos = rng.permutation(count)
    noisy_pos, out_pos = pos[:n_noisy], pos[n_noisy:n_noisy + n_out]
    others = rng.integers(0, spec.identities - 1, n_noisy) if n_noisy else np.zeros(0, np.int64)
    true_id[noisy_pos] = others + (others >= identity_id)  # skip the class itself
    outlier[out_pos] = True
    return true_id, outlier


def training_truth(spec: SynthSpec) -> TrainTruth:
    """Per-image truth of the whole training set (no rendering; cheap)."""
    sizes = class_sizes(spec)
    label = np.repeat(np.arange(spec.identities, dtype=np.int64), sizes)
    parts = [_class_noise(spec, i, int(n)) for i, n in enumerate(sizes)]
    true_id = np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, np.int64)
    outlier = np.concatenate([p[1] for p in parts]) if parts else np.zeros(0, bool)
    return TrainTruth(label=label, true_identity=true_id, noisy=true_id != label, outlier=outlier)


def render_training_face(spec: SynthSpec, identity_id: int, j: int, *, shown_identity: int | None = None,
                         outlier: bool = False, cache: dict | None = None) -> np.ndarray:
    """uint8 [size, size, 3]: image ``j`` of class ``identity_id`` before JPEG encoding.

    The nuisance is drawn from (seed, class, j) whatever face is shown, so a label-noise
    image is exactly ``shown_identity`` under the nuisance image j of the class would have had.
    """
    knobs = spec.outlier_knobs() if outlier else spec.face_knobs()
    shown = identity_id if shown_identity is None else shown_identity
    cache = {} if cache is None else cache  # identities drawn once per class, not per image
    ident = cache.get(shown)
    if ident is None:
        ident = cache[shown] = sample_identity(spec.seed, shown, spec.face_knobs())
    rng = np.random.default_rng([spec.seed, _TRAIN_IMG, identity_id, j])
    return render_face(ident, sample_nuisance(rng, knobs, loose=False), spec.size, loose=False).image


def render_training_images(spec: SynthSpec, identity_id: int, count: int) -> list[bytes]:
    """JPEGs of ``count`` aligned training crops of one identity (with its label noise / outliers)."""
    true_id, outlier = _class_noise(spec, identity_id, count)
    cache: dict = {}
    return [encode_jpeg(render_training_face(spec, identity_id, j, shown_identity=int(true_id[j]),
                                             outlier=bool(outlier[j]), cache=cache), spec.jpeg_quality)
            for j in range(count)]


def train_identity_ranges(sizes: np.ndarray) -> np.ndarray:
    """First image key of each identity, int64 [identities + 1] (keys start at 1)."""
    return np.r_[0, np.cumsum(sizes)].astype(np.int64) + 1


def write_train_part(spec: SynthSpec, first_identity: int, end_identity: int, rec_path: Path) -> int:
    """Render identities ``[first, end)`` into a part ``.rec``/``.idx`` with their final keys."""
    sizes = class_sizes(spec)
    starts = train_identity_ranges(sizes)
    n = 0
    with RecordIOWriter(rec_path) as w:
        for ident in range(first_identity, end_identity):
            for j, jpeg in enumerate(render_training_images(spec, ident, int(sizes[ident]))):
                key = int(starts[ident]) + j
                w.write(key, pack_irheader([float(ident), 0.0], jpeg, id=key))
                n += 1
    return n


def write_train_trailer(spec: SynthSpec, writer: RecordIOWriter) -> MS1MHeader:
    starts = train_identity_ranges(class_sizes(spec))
    ranges = [(int(a), int(b)) for a, b in zip(starts[:-1], starts[1:])]
    return write_ms1m_trailer(writer, ranges, num_images=int(starts[-1] - 1))


@dataclass(frozen=True)
class IJBCPlan:
    """Every IJB-C image row and the protocol files' contents, before rendering.

    Row arrays are [n_img] in ``ijbc_face_tid_mid.txt`` order.
    """

    names: list[str]
    subjects: np.ndarray   # int64 subject id (= face identity id)
    templates: np.ndarray  # int64 template id (non-contiguous, like the real set)
    medias: np.ndarray     # int64 media id (a still or a video)
    frame: np.ndarray      # int64 frame number within its media (0 for stills)
    pairs: np.ndarray      # int64 [m, 2] (enrolment template, verification template)
    pair_labels: np.ndarray  # int8 [m]
    g1: tuple[np.ndarray, np.ndarray]     # gallery templates, their subjects
    g2: tuple[np.ndarray, np.ndarray]
    probes: tuple[np.ndarray, np.ndarray]


def plan_ijbc(spec: SynthSpec) -> IJBCPlan:
    """Templates, media, pairs and galleries of the synthetic IJB-C.

    Per subject: one gallery template of ``gallery_images`` stills and
    ``probes_per_identity`` probe templates of 1-3 media each, a media being a still or a
    "video" of min(3, video_frames)..video_frames frames (3-6 by default). G1/G2 split the subjects in halves; every probe template is in the
    mixed probe set. 1:1 pairs: each (gallery, probe) of one subject is genuine; impostor
    pairs are (gallery of one subject, probe of another), up to ``impostor_pairs``.
    """
    rng = np.random.default_rng([spec.seed, _IJBC_PLAN])
    m = spec.eval_identities
    subj_ids = spec.identities + np.arange(m)
    names, subjects, templates, medias, frames = [], [], [], [], []
    template_ids = rng.choice(np.arange(1, 50 * max(1, m * (1 + spec.probes_per_identity))),
                              size=m * (1 + spec.probes_per_identity), replace=False)
    template_ids.sort()
    next_t, next_media = 0, 10_000

    def add(subject: int, template: int, n_frames: int) -> None:
        nonlocal next_media
        for f in range(n_frames):
            names.append(f"{len(names) + 1}.jpg")
            subjects.append(subject)
            templates.append(template)
            medias.append(next_media)
            frames.append(f)
        next_media += 1

    gallery_t, probe_t, probe_s = [], [], []
    for s in subj_ids.tolist():
        t = int(template_ids[next_t]); next_t += 1
        gallery_t.append(t)
        for _ in range(spec.gallery_images):
            add(s, t, 1)
        for _ in range(spec.probes_per_identity):
            t = int(template_ids[next_t]); next_t += 1
            probe_t.append(t)
            probe_s.append(s)
            for _ in range(int(rng.integers(1, 4))):
                add(s, t, 1 if rng.random() < 0.5 else int(rng.integers(min(3, spec.video_frames), spec.video_frames + 1)))
    gallery_t_arr, probe_t_arr, probe_s_arr = np.array(gallery_t, np.int64), np.array(probe_t, np.int64), np.array(probe_s, np.int64)
    half = m // 2
    g1 = (gallery_t_arr[:half], subj_ids[:half].astype(np.int64))
    g2 = (gallery_t_arr[half:], subj_ids[half:].astype(np.int64))

    # pairs: all genuine (gallery, probe) + sampled impostors
    p = spec.probes_per_identity
    subj_index_of_probe = np.repeat(np.arange(m), p)
    genuine = np.stack([gallery_t_arr[subj_index_of_probe], probe_t_arr], 1)
    n_possible = m * (m - 1) * p
    n_imp = min(spec.impostor_pairs, n_possible)
    if n_imp:
        flat = rng.choice(m * m * p, size=min(m * m * p, int(n_imp * 1.2) + m * p + 16), replace=False)
        gi, rest = flat // (m * p), flat % (m * p)
        keep = gi != subj_index_of_probe[rest]
        gi, rest = gi[keep][:n_imp], rest[keep][:n_imp]
        impostor = np.stack([gallery_t_arr[gi], probe_t_arr[rest]], 1)
    else:
        impostor = np.zeros((0, 2), np.int64)
    pairs = np.concatenate([genuine, impostor]).astype(np.int64)
    labels = np.r_[np.ones(len(genuine), np.int8), np.zeros(len(impostor), np.int8)]
    order = rng.permutation(len(pairs))
    return IJBCPlan(
        names=names,
        subjects=np.array(subjects, np.int64),
        templates=np.array(templates, np.int64),
        medias=np.array(medias, np.int64),
        frame=np.array(frames, np.int64),
        pairs=pairs[order],
        pair_labels=labels[order],
        g1=g1,
        g2=g2,
        probes=(probe_t_arr, probe_s_arr),
    )


def render_ijbc_rows(spec: SynthSpec, plan: IJBCPlan, rows: range, image_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """Render rows of the plan into ``image_dir`` -> (landmarks float32 [k, 5, 2], scores [k]).

    Frames of one video share a base nuisance and drift from frame to frame.
    """
    knobs = spec.face_knobs()
    lms = np.zeros((len(rows), 5, 2), np.float32)
    scores = np.zeros(len(rows), np.float32)
    cache: dict[int, object] = {}
    for out_i, i in enumerate(rows):
        subject, media, frame = int(plan.subjects[i]), int(plan.medias[i]), int(plan.frame[i])
        ident = cache.get(subject)
        if ident is None:
            ident = cache[subject] = sample_identity(spec.seed, subject, knobs)
        base = sample_nuisance(np.random.default_rng([spec.seed, _IJBC_IMG, media]), knobs, loose=True)
        nuis = base
        for f in range(1, frame + 1):  # a random walk: frame f depends on frames before it
            nuis = jitter_nuisance(nuis, np.random.default_rng([spec.seed, _IJBC_IMG, media, f]), knobs)
        face = render_face(ident, nuis, spec.size, loose=True)
        tmp = image_dir / f".{plan.names[i]}.tmp"
        tmp.write_bytes(encode_jpeg(face.image, spec.jpeg_quality))
        tmp.replace(image_dir / plan.names[i])
        lms[out_i] = face.landmarks
        scores[out_i] = face.score
    return lms, scores
