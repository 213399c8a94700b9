"""Controlled training noise of `data synth` (label noise, outliers, long-tailed class sizes)
and the evaluation set that resolves TAR@FAR=1e-4."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from scipy.optimize import brentq

from unibct_ray.cli import main
from unibct_ray.data import ms1m
from unibct_ray.data.faces import render_face, sample_identity, sample_nuisance
from unibct_ray.data.recordio import RecordIOReader
from unibct_ray.data.synth import SCIENCE_IJBC, SynthSpec, class_sizes, plan_ijbc, power_law_sizes, training_truth
from unibct_ray.errors import UserError

ARGS = ["--identities", "6", "--images-per-identity", "10", "--count-spread", "0.5", "--size", "32",
        "--subjects", "0", "--seed", "5", "--no-progress", "--label-noise", "0.2", "--outliers", "0.1"]


@pytest.fixture(scope="module")
def noisy_dir(ray_session, tmp_path_factory):
    out = tmp_path_factory.mktemp("noisy") / "set"
    assert main(["data", "synth", "--out", str(out), *ARGS]) == 0
    return out


def _jpeg(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=90)  # the synth default quality
    return buf.getvalue()


def test_realised_noise_per_class_matches_the_flags():
    spec = SynthSpec(identities=40, images_per_identity=9, count_spread=0.8, label_noise=0.2, outliers=0.1, seed=2)
    truth = training_truth(spec)
    sizes = class_sizes(spec)
    assert len(truth.label) == sizes.sum()
    for c in range(spec.identities):
        rows = [i for i in range(len(truth.label)) if truth.label[i] == c]
        noisy = sum(1 for i in rows if truth.true_identity[i] != c)
        outl = sum(1 for i in rows if truth.outlier[i])
        assert noisy == round(0.2 * len(rows)) and outl == round(0.1 * len(rows)), c
        assert not any(truth.outlier[i] and truth.noisy[i] for i in rows)
    assert set(truth.true_identity.tolist()) <= set(range(40))
    assert ((truth.true_identity != truth.label) == truth.noisy).all()
    # no noise asked -> none
    clean = training_truth(SynthSpec(identities=5, images_per_identity=4))
    assert not clean.noisy.any() and not clean.outlier.any()


def test_long_tail_follows_the_power_law():
    classes, mean, alpha = 500, 6, 1.1
    ranked = power_law_sizes(classes, mean, alpha)
    r = np.arange(1, classes + 1, dtype=float)
    c = brentq(lambda c: np.maximum(1.0, c * r ** -alpha).sum() - classes * mean, 1e-9, 1e9)
    assert ranked.sum() == classes * mean and ranked.min() >= 1
    assert abs(int(ranked.max()) - c) <= 1  # the head of the law
    assert np.abs(ranked - np.maximum(1.0, c * r ** -alpha)).max() <= 1.0
    assert (np.diff(ranked) <= 0).all()
    sizes = class_sizes(SynthSpec(identities=classes, images_per_identity=mean, long_tail=alpha, seed=4))
    assert sorted(sizes.tolist(), reverse=True) == ranked.tolist()  # the same law, a random order
    assert sizes[0] != ranked[0] or sizes[1] != ranked[1]


def test_noisy_rec_images_are_another_identitys_face(noisy_dir):
    spec = SynthSpec(**{k: v for k, v in json.loads((noisy_dir / "synth.json").read_text())["spec"].items()
                        if k != "knobs"})
    truth = pq.read_table(noisy_dir / "train_truth.parquet").to_pydict()
    sizes = class_sizes(spec)
    starts = np.r_[0, np.cumsum(sizes)] + 1
    checked_noisy = checked_outlier = 0
    with RecordIOReader(noisy_dir / "train.rec") as rd:
        for row, key in enumerate(truth["index"]):
            label, jpeg = ms1m.read_image(rd, int(key))
            assert int(label) == truth["label"][row]
            j = int(key - starts[int(label)])
            if truth["noisy"][row]:
                shown = truth["true_identity"][row]
                assert shown != label
                # image j of class `label` uses nuisance stream 12 of (seed, class, j)
                nuis = sample_nuisance(np.random.default_rng([spec.seed, 12, int(label), j]), spec.face_knobs(), loose=False)
                other = render_face(sample_identity(spec.seed, shown, spec.face_knobs()), nuis, spec.size, loose=False)
                own = render_face(sample_identity(spec.seed, int(label), spec.face_knobs()), nuis, spec.size, loose=False)
                assert jpeg == _jpeg(other.image) and jpeg != _jpeg(own.image)
                checked_noisy += 1
            elif truth["outlier"][row]:
                nuis = sample_nuisance(np.random.default_rng([spec.seed, 12, int(label), j]), spec.outlier_knobs(), loose=False)
                assert nuis.hard  # forced hard: extreme pose, strong blur, heavy occlusion or darkness
                checked_outlier += 1
    assert checked_noisy == sum(round(0.2 * n) for n in sizes) > 0
    assert checked_outlier == sum(round(0.1 * n) for n in sizes) > 0


def test_converted_manifest_records_the_synth_settings(noisy_dir, tmp_path):
    out = tmp_path / "shards"
    assert main(["data", "convert", "--rec", str(noisy_dir / "train.rec"), "--out", str(out), "--no-progress"]) == 0
    synth = json.loads((out / "manifest.json").read_text())["source"]["synth"]
    assert synth["label_noise"] == 0.2 and synth["outliers"] == 0.1 and synth["long_tail"] == 0.0
    assert synth["seed"] == 5 and synth["identities"] == 6


def test_science_evaluation_set_resolves_1e4():
    plan = plan_ijbc(SynthSpec(identities=10, **SCIENCE_IJBC))
    genuine, impostor = int(plan.pair_labels.sum()), int((plan.pair_labels == 0).sum())
    subjects = len(np.unique(plan.subjects))
    assert subjects >= 2000 and genuine >= 10_000 and impostor >= 1_000_000
    assert impostor * 1e-4 >= 100  # TAR@FAR=1e-4 rests on >= 100 impostor pairs
    assert len(np.unique(plan.pairs[:, 0] * (plan.pairs.max() + 1) + plan.pairs[:, 1])) == len(plan.pairs)
    per_media = np.bincount(np.unique(plan.medias, return_inverse=True)[1])
    assert per_media.max() == 3 and set(per_media.tolist()) == {1, 3}


@pytest.mark.parametrize("kw, text", [({"label_noise": 1.0}, "--label-noise"), ({"outliers": -0.1}, "--outliers"),
                                      ({"label_noise": 0.6, "outliers": 0.5}, "--label-noise + --outliers"),
                                      ({"long_tail": 9.0}, "--long-tail"), ({"video_frames": 0}, "--video-frames")])
def test_bad_noise_flags(kw, text):
    with pytest.raises(UserError, match=text.replace("+", r"\+")):
        SynthSpec(**kw).validate()
