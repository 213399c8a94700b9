"""`unibct-ray prototypes`: the offline tool, in process and spread over Ray actors."""

from __future__ import annotations

import numpy as np

from unibct_ray.cli import main


def make(tmp_path, seed=0):
    rng = np.random.default_rng(seed)
    sizes = [1, 2, 5, 9, 30, 4]
    labels = np.repeat(np.arange(len(sizes)), sizes)
    rng.shuffle(labels)
    old = rng.standard_normal((len(labels), 8)).astype(np.float32)
    new = old + 0.3 * rng.standard_normal(old.shape).astype(np.float32)
    for name, arr in (("o", old), ("n", new), ("l", labels)):
        np.save(tmp_path / f"{name}.npy", arr)
    return old, new, labels


def args(tmp_path, out, *extra):
    return ["prototypes", "--old-features", str(tmp_path / "o.npy"), "--new-features", str(tmp_path / "n.npy"),
            "--labels", str(tmp_path / "l.npy"), "--out", str(tmp_path / out), *extra]


def test_no_refine_is_normalised_mean(tmp_path):
    old, _, labels = make(tmp_path)
    assert main(args(tmp_path, "p.npy", "--no-refine")) == 0
    p = np.load(tmp_path / "p.npy")
    for c in range(6):
        m = old[labels == c].mean(0)
        np.testing.assert_allclose(p[c], m / np.linalg.norm(m), atol=1e-5)


def test_actors_equal_in_process(ray_session, tmp_path):
    make(tmp_path)
    assert main(args(tmp_path, "one.npy")) == 0
    assert main(args(tmp_path, "many.npy", "--workers", "3")) == 0
    np.testing.assert_allclose(np.load(tmp_path / "one.npy"), np.load(tmp_path / "many.npy"), atol=1e-5)
    # column normalisation reproduces the plain mean (the public re-implementation's no-op)
    assert main(args(tmp_path, "col.npy", "--axis", "column")) == 0
    assert main(args(tmp_path, "mean.npy", "--no-refine")) == 0
    np.testing.assert_allclose(np.load(tmp_path / "col.npy"), np.load(tmp_path / "mean.npy"), atol=1e-5)
    assert not np.allclose(np.load(tmp_path / "one.npy"), np.load(tmp_path / "mean.npy"), atol=1e-3)


def test_bad_inputs(tmp_path, capsys):
    old, new, labels = make(tmp_path)
    np.save(tmp_path / "l.npy", labels[:-1])
    assert main(args(tmp_path, "p.npy")) == 2
    err = capsys.readouterr().err
    assert "l.npy" in err and "labels for" in err and len(err.strip().splitlines()) == 1
    np.save(tmp_path / "l.npy", labels)
    bad = new.copy()
    bad[4, 2] = np.nan
    np.save(tmp_path / "n.npy", bad)
    assert main(args(tmp_path, "p.npy")) == 2
    assert "n.npy" in capsys.readouterr().err
    assert not (tmp_path / "p.npy").exists()
