"""IJB-C metrics, Ray-free: template pooling, 1:1 TAR@FAR, 1:N top-k / TPIR@FPIR, kNN
backends, subject bootstrap and the report (ARCHITECTURE §6).

Modules are imported directly (``from unibct_ray.metrics.verification import ...``); this
package file imports nothing so that ``import unibct_ray.metrics.knn`` does not pull in
matplotlib or faiss.
"""

__all__: list[str] = []
