"""The in-process recipe probe: its TAR over image pairs against a plain loop and sklearn, and a tiny run end to end."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_curve

from unibct_ray.bench.recipe import pair_tar, probe


def _tar_by_loop(a: np.ndarray, b: np.ndarray, labels: np.ndarray, far: float) -> float:
    """Pairs by a plain loop, ROC by sklearn, the FPR nearest to ``far`` (ties: higher TPR)."""
    scores, genuine = [], []
    for i in range(len(labels)):
        for j in range(len(labels)):
            if i != j:
                scores.append(float(np.dot(a[i], b[j])))
                genuine.append(int(labels[i] == labels[j]))
    fpr, tpr, _ = roc_curve(genuine, scores)
    best = min(range(len(fpr)), key=lambda k: (abs(fpr[k] - far), -tpr[k]))
    return float(tpr[best])


def test_tar_matches_a_plain_pair_loop_and_sklearn():
    rng = np.random.default_rng(3)
    labels = np.repeat(np.arange(12), 4)
    centres = rng.normal(size=(12, 16))
    a = F.normalize(torch.from_numpy(centres[labels] + rng.normal(size=(48, 16))).float(), dim=1)
    b = F.normalize(torch.from_numpy(centres[labels] + rng.normal(size=(48, 16))).float(), dim=1)
    seen = set()
    for far in (1e-3, 1e-2, 0.1):
        for x, y in ((a, a), (a, b)):
            want = _tar_by_loop(x.numpy(), y.numpy(), labels, far)
            got = pair_tar(x, y, labels, far)
            assert abs(got - want) < 1e-12, far
            seen.add(round(got, 6))
    assert len(seen) > 2  # the FARs and sides give different answers: the check has teeth
    # a swap of the two sides changes the scores' pairing but not the pair set: same TAR
    assert pair_tar(a, b, labels, 0.1) == _tar_by_loop(b.numpy(), a.numpy(), labels, 0.1)


def test_tiny_probe_runs_every_method():
    res = probe(identities=10, images_per_identity=4, epochs=2, methods=("independent", "l2", "bct", "unibct"),
                refine_epochs=(2,), eval_identities=4, eval_images=3, processes=1, log=lambda _: None)
    assert res["settings"]["identities"] == 10 and res["settings"]["refine_epochs"] == [2]
    assert res["settings"]["scenario"] == "open-class"
    for m in ("independent", "l2", "bct", "unibct"):
        assert set(res[m]) == {"self_new", "cross"}
        assert all(0.0 <= v <= 1.0 for v in res[m].values())
    assert 0.0 <= res["self_old"] <= 1.0


def test_probe_splits_by_the_scenario():
    """open-data: old model on the first round(0.3 * 10) = 3 images of all 6 identities, new on the other 7."""
    said = []
    res = probe(scenario="open-data", identities=6, images_per_identity=10, epochs=1, methods=("unibct",),
                refine_epochs=(1,), eval_identities=3, eval_images=3, processes=1, log=said.append)
    assert res["settings"]["scenario"] == "open-data"
    assert "open-data: old model on 18 images of 6 identities, new models on 42 of 6" in said
    said.clear()
    probe(scenario="extended-class", identities=10, images_per_identity=2, epochs=1, methods=("independent",),
          eval_identities=3, eval_images=3, processes=1, log=said.append)
    assert "extended-class: old model on 6 images of 3 identities, new models on 20 of 10" in said
