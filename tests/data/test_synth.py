"""`data synth` on local Ray: outputs parse with the same loaders real data goes through."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from unibct_ray.cli import main
from unibct_ray.data import ijbc, ms1m
from unibct_ray.data.landmarks import align_face
from unibct_ray.data.recordio import RecordIOReader
from unibct_ray.data.synth import SynthSpec, plan_ijbc

ARGS = ["--identities", "12", "--images-per-identity", "4", "--size", "32", "--eval-identities", "8",
        "--probes-per-identity", "2", "--impostor-pairs", "60", "--seed", "3", "--no-progress",
        "--label-noise", "0.25", "--outliers", "0.25"]


@pytest.fixture(scope="module")
def synth_dir(ray_session, tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "set"
    assert main(["data", "synth", "--out", str(out), *ARGS]) == 0
    return out


def test_training_rec_in_ms1m_layout(synth_dir):
    with RecordIOReader(synth_dir / "train.rec") as r:
        head = ms1m.read_ms1m_header(r)
        keys = ms1m.image_keys(r, head)
        labels = [ms1m.read_image(r, int(k))[0] for k in keys]
        assert labels == sorted(labels) and set(labels) == set(range(12))  # class order, all ids
        counts = np.bincount(labels)
        assert counts.min() >= 2 and counts.max() <= 6  # 4 * (1 +- 0.5)
        # identity records [first, end) agree with the image labels
        for c in range(12):
            rng = r.read_with_header(head.image_end + c)[0].label
            assert all(labels[k - 1] == c for k in range(int(rng[0]), int(rng[1])))
        assert head.second == head.image_end + 12
        img = Image.open(io.BytesIO(ms1m.read_image(r, 1)[1]))
        assert img.format == "JPEG" and img.size == (32, 32)


def test_ijbc_parses_and_follows_the_protocol(synth_dir):
    meta = ijbc.read_ijbc_meta(synth_dir)
    n = len(meta.image_names)
    assert n == len(list((synth_dir / "IJBC" / "loose_crop").glob("*.jpg")))
    g1, g2 = set(meta.gallery1.templates.tolist()), set(meta.gallery2.templates.tolist())
    assert g1 and g2 and not (g1 & g2)
    assert set(meta.gallery1.subjects.tolist()).isdisjoint(meta.gallery2.subjects.tolist())
    # every probe's subject is enrolled in exactly one gallery
    enrolled = set(meta.gallery1.subjects.tolist()) | set(meta.gallery2.subjects.tolist())
    assert set(meta.probes.subjects.tolist()) <= enrolled
    # evaluation identities are disjoint from the 12 training identities
    assert min(enrolled) >= 12
    # genuine and impostor pairs, impostors capped as asked
    assert (meta.pair_labels == 0).sum() == 60 and (meta.pair_labels == 1).sum() == 8 * 2
    # stills and multi-frame media both occur
    per_media = np.bincount(np.unique(meta.medias, return_inverse=True)[1])
    assert (per_media == 1).any() and (per_media >= 3).any()
    assert ((meta.scores > 0) & (meta.scores <= 1)).all()


def test_landmarks_align_loose_crops(synth_dir):
    meta = ijbc.read_ijbc_meta(synth_dir, with_1n=False)
    img = np.asarray(Image.open(synth_dir / "IJBC" / "loose_crop" / meta.image_names[0]).convert("RGB"))
    crop = align_face(img, meta.landmarks[0], 32)
    assert crop.shape == (32, 32, 3) and crop.std() > 5


def test_deterministic_whatever_the_chunking(synth_dir, tmp_path, monkeypatch):
    import unibct_ray.distributed.synth as dsynth

    monkeypatch.setattr(dsynth, "_TARGET_IMAGES_PER_TASK", 7)  # many more, smaller tasks
    out = tmp_path / "again"
    assert main(["data", "synth", "--out", str(out), *ARGS]) == 0
    assert (out / "train.rec").read_bytes() == (synth_dir / "train.rec").read_bytes()
    assert (out / "train.idx").read_bytes() == (synth_dir / "train.idx").read_bytes()
    assert (out / "train_truth.parquet").read_bytes() == (synth_dir / "train_truth.parquet").read_bytes()
    for f in sorted((synth_dir / "IJBC" / "meta").iterdir()):
        assert (out / "IJBC" / "meta" / f.name).read_bytes() == f.read_bytes(), f.name
    names = sorted(p.name for p in (synth_dir / "IJBC" / "loose_crop").iterdir())
    assert all((out / "IJBC/loose_crop" / n).read_bytes() == (synth_dir / "IJBC/loose_crop" / n).read_bytes()
               for n in names)
    doc = json.loads((out / "synth.json").read_text())
    assert doc["spec"]["seed"] == 3
    assert doc["spec"]["label_noise"] == 0.25 and doc["spec"]["outliers"] == 0.25


def test_default_plan_has_enough_impostors():
    plan = plan_ijbc(SynthSpec())  # the defaults a user gets
    assert (plan.pair_labels == 0).sum() >= 20_000
    assert len(set(map(tuple, plan.pairs.tolist()))) == len(plan.pairs)  # no duplicate pairs


def test_bad_flags_are_one_line(ray_session, tmp_path, capsys):
    code = main(["data", "synth", "--out", str(tmp_path / "o"), "--identities", "0"])
    err = capsys.readouterr().err
    assert code == 2 and "--identities must be >= 1" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()
