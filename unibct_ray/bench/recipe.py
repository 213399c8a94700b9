"""A fast in-process probe of the synthetic training recipe (no Ray, no files).

``python -m unibct_ray.bench.recipe --identities 1000 --images-per-identity 5 --methods independent unibct``
renders synthetic faces straight into memory, trains the old model and one new model per
method on the two sides of ``--scenario``'s split (default open-class: the old model on the
first ``round(ratio * identities)`` identities, the new ones on the others; the data splits
share out each identity's images by the rule of ``unibct-ray data split``), all in this
process with this package's backbone, margin head, compatibility losses and refinement, and
prints TAR@FAR=1e-3 for self_old, self_new and cross on held-out identities.

It answers "does this recipe make the new model compatible?" in about a minute per model
on 2 cores, where a demo run takes ten. It is a probe, not the benchmark: the test set is
every pair of ``--eval-identities x --eval-images`` aligned crops (no IJB-C templates, no
loose crops, no bootstrap), training is one process (no DDP), and the learning rate, decay
and warm-up mirror ``jobs/configs/synthetic``. The numbers in the README's calibration
section were printed by it.

Methods: ``independent``; ``bct`` (the prototype loss against the normalised old-feature
class means from the first step: what ``bct`` trains on in open-class, where the old model
knows none of the new classes); ``l2``; ``unibct`` (weight 0 until the first refinement
epoch, prototypes refined at the start of each refinement epoch with the model's current
features).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Sequence

import numpy as np

from unibct_ray.data.splits import SCENARIOS
from unibct_ray.metrics.verification import rate_key, tar_at_far

__all__ = ["render_set", "pair_tar", "train_model", "probe", "add_arguments", "run"]

METHODS = ("independent", "l2", "bct", "unibct")


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _render_identity(job: tuple[int, int, int, int, float, int]) -> np.ndarray:
    from unibct_ray.data.faces import FaceKnobs, render_face, sample_identity, sample_nuisance

    seed, ident_id, count, stream, strength, size = job
    knobs = FaceKnobs(strength=strength)
    ident = sample_identity(seed, ident_id, knobs)
    return np.stack([
        render_face(ident, sample_nuisance(np.random.default_rng([seed, stream, ident_id, j]), knobs, loose=False),
                    size, loose=False).image
        for j in range(count)
    ])


def render_set(seed: int, ids: Sequence[int], count: int, stream: int, strength: float = 1.0, size: int = 32,
               processes: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Aligned crops ``uint8 [len(ids) * count, size, size, 3]`` and labels ``0..len(ids)-1``."""
    jobs = [(seed, int(i), count, stream, strength, size) for i in ids]
    if processes > 1:
        with ProcessPoolExecutor(processes) as ex:
            parts = list(ex.map(_render_identity, jobs, chunksize=16))
    else:
        parts = [_render_identity(j) for j in jobs]
    return np.concatenate(parts), np.repeat(np.arange(len(jobs), dtype=np.int64), count)


def _tensor(x: np.ndarray) -> torch.Tensor:
    import torch

    from unibct_ray.data.images import to_tensor_layout

    return torch.from_numpy(to_tensor_layout(x))


def _embed(model: torch.nn.Module, x: np.ndarray) -> torch.Tensor:
    import torch
    import torch.nn.functional as F

    model.eval()
    with torch.no_grad():
        return torch.cat([F.normalize(model(_tensor(x[i:i + 256])), dim=1) for i in range(0, len(x), 256)])


def pair_tar(a: torch.Tensor, b: torch.Tensor, labels: np.ndarray, far: float = 1e-3) -> float:
    """TAR@FAR over every ordered image pair ``(i, j), i != j``, scored ``a_i . b_j``.

    Genuine = same label. The TAR rule is the evaluator's
    (:func:`unibct_ray.metrics.verification.tar_at_far`: the ROC point with FPR nearest to
    ``far``), so the probe and the demo's IJB-C figures read the ROC the same way.
    """
    import torch
    s = (a @ b.T).numpy().astype(np.float64)
    off = ~np.eye(len(labels), dtype=bool)
    same = (labels[:, None] == labels[None, :])[off]
    return float(tar_at_far(s[off], same.astype(np.int64), fars=(far,))[rate_key(far)])


def train_model(x: np.ndarray, y: np.ndarray, *, embedding_size: int = 128, epochs: int = 12, seed: int = 0,
                method: str = "independent", weight: float = 1.0, scale: float = 30.0, margin: float = 0.0,
                refine_epochs: Sequence[int] = (), old_features: torch.Tensor | None = None,
                lr: float = 0.1, batch: int = 64, warmup_epochs: float = 1.0, poly_power: float = 2.0,
                head_scale: float = 32.0, head_margin: float = 0.3, name: str | None = None,
                log=_say) -> torch.nn.Module:
    """One model, one process: tiny iresnet + ArcFace, SGD, poly decay, random flips.

    ``old_features``: normalised old-model features of ``x`` (l2, bct, unibct).
    """
    import torch
    import torch.nn.functional as F
    from unibct_ray.compat.losses import l2_compat_loss, prototype_loss
    from unibct_ray.compat.prototypes import class_means, refine_prototypes
    from unibct_ray.distributed.train import poly_lr
    from unibct_ray.models.heads import NormalizedClassifier, arcface
    from unibct_ray.models.iresnet import build_backbone

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    num_classes = int(y.max()) + 1
    model = build_backbone("tiny", embedding_size, x.shape[1])
    head = NormalizedClassifier(num_classes, embedding_size, functools.partial(arcface, s=head_scale, m=head_margin))
    opt = torch.optim.SGD(list(model.parameters()) + list(head.parameters()), lr=lr, momentum=0.9, weight_decay=5e-4)
    batch = min(batch, len(x))
    per_epoch = len(x) // batch
    total, warm = epochs * per_epoch, int(warmup_epochs * per_epoch)
    protos = class_means(old_features, y, num_classes) if method == "bct" else None
    step = 0
    for epoch in range(1, epochs + 1):
        if method == "unibct" and epoch in refine_epochs:
            protos = refine_prototypes(old_features, _embed(model, x), y, num_classes)
        on = method in ("l2", "bct") or (method == "unibct" and epoch >= min(refine_epochs))
        model.train()
        perm = rng.permutation(len(x))
        sums = np.zeros(2)
        for i in range(per_epoch):
            idx = perm[i * batch:(i + 1) * batch]
            xb = x[idx].copy()
            flip = rng.random(batch) < 0.5
            xb[flip] = xb[flip, :, ::-1]
            yb = torch.from_numpy(y[idx])
            for g in opt.param_groups:
                g["lr"] = poly_lr(lr, step, total, poly_power, warm)
            emb = model(_tensor(xb))
            ce = F.cross_entropy(head(emb, yb), yb)
            comp = torch.zeros(())
            if on and method == "l2":
                comp = l2_compat_loss(emb, old_features[idx])
            elif on:
                comp = prototype_loss(emb, protos, yb, s=scale, m=margin)
            opt.zero_grad()
            (ce + weight * comp).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            opt.step()
            step += 1
            sums += (float(ce), float(comp))
        log(f"  [{name or method}] epoch {epoch}/{epochs}  head {sums[0] / per_epoch:.3f}  compat {sums[1] / per_epoch:.3f}")
    return model


def probe(*, scenario: str = "open-class", identities: int = 1000, images_per_identity: int = 5, ratio: float = 0.3,
          strength: float = 1.0, embedding_size: int = 128, epochs: int = 12, methods: Sequence[str] = ("independent", "unibct"),
          weight: float = 3.0, scale: float = 30.0, margin: float = 0.2, refine_epochs: Sequence[int] = (2, 6),
          warmup_epochs: float = 1.0, eval_identities: int = 60, eval_images: int = 8, seed: int = 0,
          processes: int = 2, log=_say) -> dict:
    """Old model + one new model per method (``scenario``'s split) -> TAR@FAR=1e-3 per test."""
    from unibct_ray.data.splits import contiguous_labels, scenario_masks

    for m in methods:
        if m not in METHODS:
            raise ValueError(f"unknown method {m!r}; valid choices: {', '.join(METHODS)}")
    t0 = time.perf_counter()
    x, y = render_set(seed, range(identities), images_per_identity, 1, strength, processes=processes)
    xe, ye = render_set(seed, range(10 ** 6, 10 ** 6 + eval_identities), eval_images, 2, strength,
                        processes=processes)
    # the package's split rule, as `unibct-ray data split` applies it (records in class order)
    masks = scenario_masks(scenario, y, np.arange(len(y)), ratio)
    yo, _ = contiguous_labels(y[masks.old])
    common = dict(embedding_size=embedding_size, epochs=epochs, warmup_epochs=warmup_epochs, log=log)
    old = train_model(x[masks.old], yo, seed=seed, name="old", **common)
    e_old = _embed(old, xe)
    xn, (yn, _) = x[masks.new], contiguous_labels(y[masks.new])
    log(f"{scenario}: old model on {int(masks.old.sum())} images of {int(yo.max()) + 1} identities, "
        f"new models on {len(xn)} of {int(yn.max()) + 1}")
    of = _embed(old, xn)
    out: dict = {"settings": dict(scenario=scenario, identities=identities, images_per_identity=images_per_identity,
                                  ratio=ratio, strength=strength, embedding_size=embedding_size, epochs=epochs,
                                  weight=weight, scale=scale, margin=margin, refine_epochs=list(refine_epochs),
                                  warmup_epochs=warmup_epochs, eval_identities=eval_identities,
                                  eval_images=eval_images, seed=seed),
                 "self_old": pair_tar(e_old, e_old, ye)}
    for m in methods:
        new = train_model(xn, yn, seed=seed + 1, method=m, weight=weight, scale=scale, margin=margin,
                          refine_epochs=refine_epochs, old_features=of, **common)
        e_new = _embed(new, xe)
        out[m] = {"self_new": pair_tar(e_new, e_new, ye), "cross": pair_tar(e_new, e_old, ye)}
        log(f"{m}: self_old {out['self_old']:.3f}  self_new {out[m]['self_new']:.3f}  cross {out[m]['cross']:.3f}")
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--scenario", default="open-class", choices=SCENARIOS,
                    help="upgrade scenario: which images the old and the new models train on (default open-class)")
    p.add_argument("--identities", type=int, default=1000, help="training identities (default 1000)")
    p.add_argument("--images-per-identity", type=int, default=5, help="images of each (default 5)")
    p.add_argument("--ratio", type=float, default=0.3,
                    help="split ratio r: the old model's share of identities (class split) or of each identity's images (data split)")
    p.add_argument("--strength", type=float, default=1.0, help="nuisance strength of the faces (default 1)")
    p.add_argument("--embedding-size", type=int, default=128)
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--warmup-epochs", type=float, default=1.0, help="linear lr warm-up (0 = none)")
    p.add_argument("--methods", nargs="+", default=["independent", "unibct"], choices=METHODS)
    p.add_argument("--weight", type=float, default=3.0, help="compatibility loss weight")
    p.add_argument("--scale", type=float, default=30.0, help="prototype logit scale s")
    p.add_argument("--margin", type=float, default=0.2, help="angular margin on the prototype target")
    p.add_argument("--refine-epochs", type=int, nargs="+", default=[2, 6], help="unibct refinement epochs (1-based)")
    p.add_argument("--eval-identities", type=int, default=60)
    p.add_argument("--eval-images", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)


def run(a: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(2)
    return probe(scenario=a.scenario, identities=a.identities, images_per_identity=a.images_per_identity,
                 ratio=a.ratio, strength=a.strength, embedding_size=a.embedding_size, epochs=a.epochs,
                 methods=a.methods, weight=a.weight, scale=a.scale, margin=a.margin,
                 refine_epochs=a.refine_epochs, warmup_epochs=a.warmup_epochs,
                 eval_identities=a.eval_identities, eval_images=a.eval_images, seed=a.seed)


if __name__ == "__main__":
    from unibct_ray.bench.common import standalone

    standalone("recipe", __doc__, add_arguments, run)
