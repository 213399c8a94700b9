"""Gallery search sharded over Ray actors: one FAISS shard per actor, top-k merged exactly.

Each actor holds a contiguous slice of the gallery and its own index (one thread: on a
2-core box two single-threaded processes beat FAISS's own threading). Actors are placed with
the SPREAD strategy, so on a cluster the shards land on different nodes and memory per node
is gallery/shards. The merge (``unibct_ray.metrics.knn.merge_topk``) is exact, ties included,
so a flat index over K shards returns exactly what one flat index returns.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import ray

from unibct_ray.metrics.knn import FaissKNN, merge_topk

__all__ = ["FaissShardActor", "RayShardedKNN"]


@ray.remote(num_cpus=1, max_restarts=1, max_task_retries=2)
class FaissShardActor:
    """Holds one gallery shard; ``search`` runs the shard's index."""

    def __init__(self, threads: int = 1) -> None:
        import faiss

        faiss.omp_set_num_threads(threads)
        self.gallery: np.ndarray | None = None

    def load(self, gallery: np.ndarray) -> int:
        self.gallery = np.ascontiguousarray(gallery, np.float32)
        return len(self.gallery)

    def node_id(self) -> str:
        """The Ray node this shard lives on (placement checks)."""
        return ray.get_runtime_context().get_node_id()

    def search(self, queries: np.ndarray, k: int, index: str, nlist: int, nprobe: int, M: int):
        if self.gallery is None:
            raise RuntimeError("shard actor has no gallery loaded (it was restarted?)")
        return FaissKNN(index=index, nlist=nlist, nprobe=nprobe, M=M)(self.gallery, queries, k)


@dataclass
class RayShardedKNN:
    """A ``KNN`` callable whose gallery is split over ``shards`` Ray actors.

    After each call ``placement`` holds the Ray node id of each shard's actor, in shard order.
    """

    shards: int = 2
    index: str = "flat"
    nlist: int = 1024
    nprobe: int = 32
    M: int = 32
    placement: list[str] = field(default_factory=list, init=False, repr=False, compare=False)

    @property
    def description(self) -> str:
        return f"{FaissKNN(index=self.index, nlist=self.nlist, nprobe=self.nprobe, M=self.M).description} over {self.shards} Ray actor shards"

    def __call__(self, gallery: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        n = len(gallery)
        bounds = np.linspace(0, n, self.shards + 1).astype(int)
        actors = [FaissShardActor.options(scheduling_strategy="SPREAD").remote() for _ in range(self.shards)]
        try:
            ray.get([a.load.remote(gallery[a0:b0]) for a, a0, b0 in zip(actors, bounds[:-1], bounds[1:])])
            self.placement = ray.get([a.node_id.remote() for a in actors])
            q_ref = ray.put(np.ascontiguousarray(queries, np.float32))
            parts = ray.get([a.search.remote(q_ref, k, self.index, self.nlist, self.nprobe, self.M) for a in actors])
        except ray.exceptions.RayActorError as e:
            # Never a partial gallery: a lost shard fails the search loudly.
            raise RuntimeError(f"a gallery shard actor died during the search: {e}") from e
        finally:
            for a in actors:
                ray.kill(a)
        return merge_topk(parts, k, offsets=bounds[:-1].tolist())
