"""Compatibility losses and class prototypes (plain means and structural refinement). No Ray here."""

from unibct_ray.compat.losses import (
    COMPAT_METHODS,
    CompatLoss,
    bct_prototypes,
    l2_compat_loss,
    prototype_logits,
    prototype_loss,
)
from unibct_ray.compat.prototypes import (
    balanced_class_ranges,
    class_counts,
    class_means,
    class_offsets,
    means_from_sums,
    partial_class_sums,
    refine_batch,
    refine_class_range,
    refine_prototypes,
)

__all__ = [
    "COMPAT_METHODS",
    "CompatLoss",
    "bct_prototypes",
    "l2_compat_loss",
    "prototype_logits",
    "prototype_loss",
    "balanced_class_ranges",
    "class_counts",
    "class_means",
    "class_offsets",
    "means_from_sums",
    "partial_class_sums",
    "refine_batch",
    "refine_class_range",
    "refine_prototypes",
]
