"""Where each class's old features lie: the centre of its normalised old features and every
sample's distance to it. MixBCT's credible mask (:func:`unibct_ray.compat.mixbct.credible_mask`)
and AdvBCT's class radii (:func:`unibct_ray.compat.advbct.inlier_radius`) both start here.

With ``o_hat_i = o_i / ||o_i||`` and class ``c`` of ``n_c`` samples::

    c_c = (1 / n_c) sum_{y_i = c} o_hat_i          (not re-normalised)
    r_i = ||o_hat_i - c_{y_i}||_2

Both are computed in two passes over any partition of the rows: :func:`partial_class_sums` of
the normalised rows (summed over parts), then :func:`distances_to_centres` part by part, so a
training set too large for one process is streamed
(``unibct_ray.distributed.method_inputs``). The public MixBCT code also normalises every
feature column over the whole data set before this; that step is not taken here.
"""

from __future__ import annotations

import numpy as np
import torch

from unibct_ray.compat.prototypes import means_from_sums, partial_class_sums

__all__ = ["normalize_rows", "class_centres", "centres_from_sums", "distances_to_centres"]


def normalize_rows(features: np.ndarray) -> np.ndarray:
    """``[n, d]`` -> float64 rows of unit L2 norm (an all-zero row stays zero)."""
    x = np.asarray(features, np.float64)
    if x.ndim != 2:
        raise ValueError(f"features must be [n, d], got shape {x.shape}")
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norm > 0, norm, 1.0)


def centres_from_sums(sums: torch.Tensor, counts: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Summed normalised rows ``[C, d]`` and counts ``[C]`` -> (centres float64 ``[C, d]``,
    counts int64 ``[C]``); an absent class has a zero centre."""
    centres = means_from_sums(sums, counts, normalize=False, dtype=torch.float64)
    return centres.numpy(), counts.numpy().astype(np.int64)


def class_centres(features: np.ndarray, labels: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """``features [n, d]``, ``labels [n]`` -> (``c [C, d]`` mean of the normalised rows of each
    class, float64; ``n_c [C]`` int64)."""
    sums, counts = partial_class_sums(normalize_rows(features), np.asarray(labels, np.int64), num_classes)
    return centres_from_sums(sums, counts)


def distances_to_centres(features: np.ndarray, labels: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """``r_i = ||o_hat_i - c_{y_i}||_2`` -> float64 ``[n]``."""
    labels = np.asarray(labels, np.int64)
    x = normalize_rows(features)
    if labels.shape != (x.shape[0],):
        raise ValueError(f"labels must be [{x.shape[0]}], got shape {labels.shape}")
    return np.linalg.norm(x - np.asarray(centres, np.float64)[labels], axis=1)
