"""1:N at production gallery sizes: distractors appended to every gallery, and recall checks.

``DistractorKNN`` wraps any ``KNN``: it searches ``gallery + distractors`` and reports a
distractor hit as index -1 with its score, so the identification code sees a non-mated
neighbour that occupies its rank and, as the top-1 score, raises the FPIR threshold.
``RecallKNN`` runs an exact search beside an approximate one and keeps recall@k.

The distractors must live in the gallery's embedding space: a gallery of new-model templates
gets new-model embeddings of the distractor faces, an old-model gallery old-model ones (give
``evaluate_features`` one ``DistractorKNN`` per gallery model).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from unibct_ray.metrics.knn import KNN, brute_force_knn, knn_description, recall_at_k

__all__ = ["DistractorKNN", "RecallKNN"]


@dataclass
class DistractorKNN:
    """``knn`` over ``gallery + distractors``; ``distractors`` [n_d, d] L2-normalised, embedded by
    the same model as the galleries this backend searches (``embedded_by`` names it)."""

    knn: KNN
    distractors: np.ndarray
    embedded_by: str = ""

    @property
    def description(self) -> str:
        by = f" embedded by {self.embedded_by}" if self.embedded_by else ""
        return f"{knn_description(self.knn)} + {len(self.distractors)} distractors{by}"

    def __call__(self, gallery: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        g = len(gallery)
        scores, idx = self.knn(np.concatenate([gallery, self.distractors.astype(gallery.dtype)]), queries, k)
        return scores, np.where(idx >= g, -1, idx)


@dataclass
class RecallKNN:
    """Approximate search with its recall@k against exact search on the same inputs."""

    knn: KNN
    exact: KNN = brute_force_knn
    recalls: list[float] = field(default_factory=list)

    @property
    def description(self) -> str:
        return knn_description(self.knn)

    def __call__(self, gallery: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        scores, idx = self.knn(gallery, queries, k)
        _, exact_idx = self.exact(gallery, queries, k)
        self.recalls.append(recall_at_k(idx, exact_idx))
        return scores, idx
