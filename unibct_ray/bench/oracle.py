"""A refinement oracle: how close do the plain mean, row and column refinement get to the truth?

``unibct-ray bench prototypes-oracle`` renders a training set with controlled noise (the
``data synth`` renderer: per class round(r/2 * n) label-noise images, i.e. another identity's
face under this class's label, and round(r/2 * n) forced outliers: extreme pose, strong blur,
heavy occlusion or darkness), with power-law class sizes, at each noise rate r (default 0,
10%, 20%). Every identity also gets its *clean template*: its face rendered at nuisance
strength 0 (frontal, canonical crop, neutral light, no occluder). The **true centre** of a
class is the old model's normalised feature of that template: what an old-feature prototype
should point at if noise and outliers did not pull it away.

Per class it scores three prototypes by cosine to the true centre:

* ``mean``: normalise(mean of the old features) (BCT's synthesised centre);
* ``row``: :func:`~unibct_ray.compat.prototypes.refine_prototypes` with the row softmax
  (ARCHITECTURE §5), the neighbourhood graph from a *new* model's features of the same
  images, as in training;
* ``column``: the same with the column softmax (the public re-implementation).

The template is one picture; as a second reference, the *population centre* is the normalised
mean old feature of ``--population-images`` fresh renders of the identity under the ordinary
nuisance, with no label noise and no outliers (``vs_population_centre`` in the result): the
centre the clean images of the class scatter around.

It also reports the effective sample size ESS = 1 / sum_i w_i^2 of each, where ``w`` are the
weights the prototype puts on the samples (p = normalise(sum_i w_i o_i), sum_i w_i = 1):
``w = 1/n`` for the mean; ``w = (1 - lam) / n * (I - lam P)^-T 1`` for a refinement (computed
here by its own float64 solve, independent of the batched one in ``compat.prototypes``), and
the share of weight on the noisy / outlier samples against their share of the class.

The old and the new model are trained in this process (:func:`unibct_ray.bench.recipe.train_model`;
the old one on disjoint identities, the new one on the noisy set of each rate; both with the
same embedding size, as compatible models have) or loaded with ``--old-checkpoint`` /
``--new-checkpoint`` (then used for every rate). Old features are L2-normalised before pooling, as the training loop pools them.

Output: the JSON result (per noise rate, per class-size bin) and ``--plot`` (PNG: cosine to the
true centre against class size, one panel per noise rate, one line per method; below, ESS / n).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np

__all__ = ["sample_weights", "class_scores", "size_bins", "summarise", "oracle", "add_arguments", "run", "DESCRIPTION"]

DESCRIPTION = __doc__
METHODS = ("mean", "row", "column")
# Class-size bin edges [lo, hi): a class of 1 keeps its one old feature in every method.
BIN_EDGES = (1, 2, 3, 5, 9, 17, 33, 65, 10 ** 9)


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def sample_weights(new: np.ndarray, lam: float = 0.9, tau: float = 0.05, axis: str = "row") -> np.ndarray:
    """Weights ``w float64 [n]`` of one class's prototype on its samples (sum 1).

    ``new [n, d]``: the new model's features of the class's images (any scale). With
    ``P = softmax(N_hat N_hat^T / tau)`` (diagonal masked) over rows or columns, the refined
    rows are ``O' = (1 - lam)(I - lam P)^-1 O`` and the prototype is their mean, so
    ``p = normalise(w^T O)`` with ``w^T = (1 - lam) / n * 1^T (I - lam P)^-1``, i.e.
    ``(I - lam P)^T w = (1 - lam) / n * 1``. n = 1 gives ``[1]``.
    """
    n = len(new)
    if n == 1:
        return np.ones(1)
    nh = new.astype(np.float64)
    nh = nh / np.linalg.norm(nh, axis=1, keepdims=True)
    s = nh @ nh.T / tau
    np.fill_diagonal(s, -np.inf)
    ax = 1 if axis == "row" else 0
    e = np.exp(s - s.max(axis=ax, keepdims=True))
    p = e / e.sum(axis=ax, keepdims=True)
    return np.linalg.solve((np.eye(n) - lam * p).T, np.full(n, (1 - lam) / n))


def class_scores(old: np.ndarray, new: np.ndarray, labels: np.ndarray, centres: np.ndarray,
                 dirty: np.ndarray | None = None, lam: float = 0.9, tau: float = 0.05) -> dict[str, np.ndarray]:
    """Per-class oracle scores; arrays ``[C]`` keyed ``n``, ``cos_<m>``, ``ess_<m>``, ``dirty_share``,
    ``dirty_weight_<m>`` for ``m`` in mean / row / column.

    ``old [N, d]`` normalised old features, ``new [N, d]`` new-model features of the same
    images, ``labels int [N]`` in ``[0, C)``, ``centres [C, d]`` normalised true centres,
    ``dirty bool [N]`` the noisy-or-outlier images (None: none). The prototypes come from
    :func:`~unibct_ray.compat.prototypes.refine_prototypes`; the weights from
    :func:`sample_weights`.
    """
    import torch

    from unibct_ray.compat.prototypes import refine_prototypes

    num_classes = len(centres)
    dirty = np.zeros(len(labels), bool) if dirty is None else np.asarray(dirty, bool)
    protos = {
        "mean": refine_prototypes(torch.from_numpy(old), None, labels, num_classes, refine=False),
        "row": refine_prototypes(torch.from_numpy(old), torch.from_numpy(new), labels, num_classes, axis="row",
                                 lam=lam, tau=tau),
        "column": refine_prototypes(torch.from_numpy(old), torch.from_numpy(new), labels, num_classes,
                                    axis="column", lam=lam, tau=tau),
    }
    out: dict[str, np.ndarray] = {"n": np.bincount(labels, minlength=num_classes).astype(np.int64)}
    for m, p in protos.items():
        out[f"cos_{m}"] = (p.double().numpy() * centres).sum(1)
    order = np.argsort(labels, kind="stable")
    bounds = np.searchsorted(labels[order], np.arange(num_classes + 1))
    share = np.full(num_classes, np.nan)
    ess = {m: np.full(num_classes, np.nan) for m in METHODS}
    dw = {m: np.full(num_classes, np.nan) for m in METHODS}
    for c in range(num_classes):
        rows = order[bounds[c]:bounds[c + 1]]
        if len(rows) == 0:
            continue
        d = dirty[rows]
        share[c] = d.mean()
        for m in METHODS:
            w = np.full(len(rows), 1.0 / len(rows)) if m == "mean" else sample_weights(new[rows], lam, tau, m)
            ess[m][c] = 1.0 / np.sum(w ** 2)
            dw[m][c] = w[d].sum()
    out["dirty_share"] = share
    for m in METHODS:
        out[f"ess_{m}"] = ess[m]
        out[f"dirty_weight_{m}"] = dw[m]
    return out


def size_bins(n: np.ndarray, edges: Sequence[int] = BIN_EDGES) -> list[tuple[int, int, np.ndarray]]:
    """``[(lo, hi, class mask)]`` for each non-empty bin ``lo <= n < hi``."""
    out = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        mask = (n >= lo) & (n < hi)
        if mask.any():
            out.append((int(lo), int(hi), mask))
    return out


def _r(x: float) -> float | None:
    return None if not np.isfinite(x) else round(float(x), 4)


def summarise(scores: dict[str, np.ndarray]) -> dict:
    """Per size bin and overall: classes, mean cosine (and sd) per method, mean ESS / n, weight on
    dirty samples per method against their share."""
    def block(mask: np.ndarray) -> dict:
        b: dict = {"classes": int(mask.sum()), "mean_size": _r(scores["n"][mask].mean())}
        for m in METHODS:
            cos = scores[f"cos_{m}"][mask]
            b[f"cos_{m}"] = _r(cos.mean())
            b[f"cos_{m}_sd"] = _r(cos.std())
        b["row_minus_mean"] = _r((scores["cos_row"] - scores["cos_mean"])[mask].mean())
        b["row_better_frac"] = _r((scores["cos_row"] > scores["cos_mean"] + 1e-6)[mask].mean())
        for m in ("row", "column"):
            b[f"ess_over_n_{m}"] = _r((scores[f"ess_{m}"] / scores["n"])[mask].mean())
        b["dirty_share"] = _r(scores["dirty_share"][mask].mean())
        b["dirty_weight_row"] = _r(scores["dirty_weight_row"][mask].mean())
        return b

    n = scores["n"]
    present = n > 0
    return {"overall": block(present),
            "by_size": {(f"{lo}" if hi == lo + 1 else f"{lo}-{hi - 1}" if hi < 10 ** 9 else f">={lo}"): block(m & present)
                        for lo, hi, m in size_bins(n)}}


def _plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = list(result["rates"])
    fig, axes = plt.subplots(2, len(rates), figsize=(4.6 * len(rates), 6.4), squeeze=False, sharex=True,
                             gridspec_kw={"height_ratios": [2, 1]})
    styles = {"mean": dict(color="#8c8c8c", marker="o"), "row": dict(color="#4c72b0", marker="s"),
              "column": dict(color="#dd8452", marker="^", ls="--", mfc="none")}
    for j, rate in enumerate(rates):
        bins = result["rates"][rate]["by_size"]
        x = [b["mean_size"] for b in bins.values()]
        ax = axes[0][j]
        for m in METHODS:
            ax.plot(x, [b[f"cos_{m}"] for b in bins.values()], label=m, **styles[m])
        ax.set_xscale("log")
        ax.set_title(f"noise rate {float(rate):.0%}")
        ax.grid(alpha=0.3)
        axes[0][0].set_ylabel("cos(prototype, true centre)")
        ax2 = axes[1][j]
        for m in ("row", "column"):
            ax2.plot(x, [b[f"ess_over_n_{m}"] for b in bins.values()], label=f"ESS/n {m}", **styles[m])
        ax2.set_xlabel("class size (images)")
        ax2.set_ylim(0, 1.05)
        ax2.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    axes[1][0].set_ylabel("ESS / n")
    axes[1][0].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def _render_class(job: tuple) -> np.ndarray:
    from unibct_ray.data.synth import render_training_face

    spec, ident, count, true_ids, outliers = job
    cache: dict = {}
    return np.stack([render_training_face(spec, ident, j, shown_identity=int(true_ids[j]), outlier=bool(outliers[j]),
                                          cache=cache) for j in range(count)])


def _render_templates(job: tuple) -> np.ndarray:
    from dataclasses import replace

    from unibct_ray.data.faces import render_face, sample_identity, sample_nuisance

    spec, ids = job
    clean = replace(spec.face_knobs(), strength=0.0)
    return np.stack([render_face(sample_identity(spec.seed, int(i), spec.face_knobs()),
                                 sample_nuisance(np.random.default_rng(0), clean, loose=False), spec.size,
                                 loose=False).image for i in ids])


def _map(fn, jobs: list, processes: int) -> list:
    if processes > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(processes) as ex:
            return list(ex.map(fn, jobs, chunksize=8))
    return [fn(j) for j in jobs]


def _load(path: str) -> "torch.nn.Module":
    from unibct_ray.checkpoint import build_backbone_from_checkpoint

    return build_backbone_from_checkpoint(path)[0]


def oracle(*, identities: int = 300, images_per_identity: int = 10, long_tail: float = 1.0,
           rates: Sequence[float] = (0.0, 0.1, 0.2), size: int = 32, seed: int = 0, epochs: int = 10,
           old_identities: int = 300, old_images: int = 8, embedding: int = 128,
           old_checkpoint: str | None = None, new_checkpoint: str | None = None, lam: float = 0.9,
           tau: float = 0.05, population_images: int = 16, processes: int = 2, log=_say) -> dict:
    """Run the oracle (see the module docstring) -> the JSON result."""
    from unibct_ray.bench.recipe import _embed, render_set, train_model
    from unibct_ray.data.synth import SynthSpec, class_sizes, training_truth

    t0 = time.perf_counter()
    if old_checkpoint:
        old = _load(old_checkpoint)
        size = _checkpoint_size(old_checkpoint)  # the images must match what the model saw
    else:
        # Identities 10^6.. are disjoint from the oracle's classes 0..identities-1.
        xo, yo = render_set(seed, range(10 ** 6, 10 ** 6 + old_identities), old_images, 7, size=size,
                            processes=processes)
        old = train_model(xo, yo, embedding_size=embedding, epochs=epochs, seed=seed, name="old", log=log)
    result: dict = {"settings": dict(identities=identities, images_per_identity=images_per_identity,
                                     long_tail=long_tail, rates=list(rates), size=size, seed=seed, epochs=epochs,
                                     old_identities=old_identities, old_images=old_images,
                                     embedding=embedding,
                                     old_checkpoint=old_checkpoint, new_checkpoint=new_checkpoint, lam=lam, tau=tau,
                                     population_images=population_images,
                                     noise="per class round(r/2 n) label-noise + round(r/2 n) outlier images"),
                    "rates": {}}
    new_fixed = _load(new_checkpoint) if new_checkpoint else None
    for rate in rates:
        spec = SynthSpec(identities=identities, images_per_identity=images_per_identity, long_tail=long_tail,
                         label_noise=rate / 2, outliers=rate / 2, size=size, seed=seed, eval_identities=0)
        spec.validate()
        sizes, truth = class_sizes(spec), training_truth(spec)
        starts = np.r_[0, np.cumsum(sizes)]
        x = np.concatenate(_map(_render_class, [
            (spec, c, int(sizes[c]), truth.true_identity[starts[c]:starts[c + 1]], truth.outlier[starts[c]:starts[c + 1]])
            for c in range(identities)], processes))
        templates = np.concatenate(_map(_render_templates, [(spec, ids) for ids in np.array_split(
            np.arange(identities), max(1, processes * 4))], processes))
        y = truth.label
        new = new_fixed if new_fixed is not None else train_model(
            x, y, embedding_size=embedding, epochs=epochs, seed=seed + 1, name=f"new r={rate:g}", log=log)
        o = _embed(old, x).numpy().astype(np.float64)
        f = _embed(new, x).numpy().astype(np.float64)
        centres = _embed(old, templates).numpy().astype(np.float64)
        scores = class_scores(o, f, y, centres, truth.noisy | truth.outlier, lam=lam, tau=tau)
        summary = summarise(scores)
        if population_images:
            # Stream 9: renders of the same identities that are not in the training set.
            xp, yp = render_set(seed, range(identities), population_images, 9, size=size, processes=processes)
            pop = _embed(old, xp).numpy().astype(np.float64).reshape(identities, population_images, -1).mean(1)
            pop /= np.linalg.norm(pop, axis=1, keepdims=True)
            summary["vs_population_centre"] = summarise(
                class_scores(o, f, y, pop, truth.noisy | truth.outlier, lam=lam, tau=tau))
            summary["template_vs_population_cos"] = _r(float((pop * centres).sum(1).mean()))
        summary["images"] = int(len(y))
        summary["size_max"] = int(sizes.max())
        result["rates"][f"{rate:g}"] = summary
        ov = summary["overall"]
        log(f"rate {rate:g}: cos mean {ov['cos_mean']}  row {ov['cos_row']}  column {ov['cos_column']}  "
            f"ESS/n row {ov['ess_over_n_row']}")
        if population_images:
            pv = summary["vs_population_centre"]["overall"]
            log(f"  vs population centre: cos mean {pv['cos_mean']}  row {pv['cos_row']}")
    result["seconds"] = round(time.perf_counter() - t0, 1)
    return result


def _checkpoint_size(path: str) -> int:
    from unibct_ray.checkpoint import checkpoint_config, load_checkpoint

    return int(checkpoint_config(load_checkpoint(path), path).data.image_size)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--identities", type=int, default=300, help="classes scored (default 300)")
    p.add_argument("--images-per-identity", type=int, default=10, help="mean class size (default 10)")
    p.add_argument("--long-tail", type=float, default=1.0, metavar="ALPHA",
                   help="power-law class sizes n_r ~ r^-ALPHA (default 1; 0 = uniform +-50%%)")
    p.add_argument("--rates", type=float, nargs="+", default=[0.0, 0.1, 0.2],
                   help="noise rates: half label noise, half outliers (default 0 0.1 0.2)")
    p.add_argument("--size", type=int, default=32, help="image side in pixels (default 32)")
    p.add_argument("--epochs", type=int, default=10, help="epochs of the in-process models (default 10)")
    p.add_argument("--old-identities", type=int, default=300, help="identities of the old model's training set")
    p.add_argument("--old-images", type=int, default=8, help="images per identity of the old model's training set")
    p.add_argument("--embedding", type=int, default=128, help="embedding size of both models (compatible spaces)")
    p.add_argument("--old-checkpoint", default=None, help="old-model checkpoint instead of training one")
    p.add_argument("--new-checkpoint", default=None, help="new-model checkpoint instead of training one per rate")
    p.add_argument("--lam", type=float, default=0.9)
    p.add_argument("--tau", type=float, default=0.05)
    p.add_argument("--population-images", type=int, default=16,
                   help="clean renders per identity for the population centre (0: skip)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plot", type=Path, default=Path("prototypes-oracle.png"), help="PNG to write")


def run(a: argparse.Namespace) -> dict:
    import torch

    from unibct_ray.errors import UserError

    torch.set_num_threads(2)
    for r in a.rates:
        if not 0.0 <= r < 1.0:
            raise UserError(f"--rates: each rate must be in [0, 1), got {r}")
    res = oracle(identities=a.identities, images_per_identity=a.images_per_identity, long_tail=a.long_tail,
                 rates=a.rates, size=a.size, seed=a.seed, epochs=a.epochs, old_identities=a.old_identities,
                 old_images=a.old_images, embedding=a.embedding,
                 old_checkpoint=a.old_checkpoint, new_checkpoint=a.new_checkpoint, lam=a.lam, tau=a.tau,
                 population_images=a.population_images)
    _plot(res, a.plot)
    res["plot"] = str(a.plot)
    return res


if __name__ == "__main__":
    from unibct_ray.bench.common import standalone

    standalone("prototypes-oracle", __doc__, add_arguments, run)
