"""``unibct-ray bench search``: FAISS gallery shards on Ray actors against one index."""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

__all__ = ["bench_search", "add_arguments", "run"]

#: One line for ``unibct-ray bench --help``.
HELP = "FAISS gallery shards on Ray actors vs one index"
#: The subcommand's description.
DESCRIPTION = (
    "Exact inner-product top-k of --queries against a random --gallery: one FAISS flat\n"
    "index with all cores vs --shards Ray actors holding a slice each (one thread each),\n"
    "merged exactly. Two timings: end to end (actors started and shards shipped inside\n"
    "the timed call, as `eval` does once per run) and search only (index built and shards\n"
    "loaded beforehand, as a long-lived gallery holds them). Prints JSON with QPS, the\n"
    "speed-ups and whether the top-k are identical."
)


def bench_search(gallery_size: int, queries: int, dim: int, k: int, shards: int, seed: int) -> dict:
    """One FAISS flat index using every core vs ``shards`` Ray actors (one thread each), same top-k.

    Two measurements: end to end (``RayShardedKNN`` as the evaluator calls it: actors started,
    shards shipped through the object store, searched, merged) and search only (shards already
    loaded in their actors, as a long-lived gallery service would hold them: the timed part is
    the parallel search and the exact merge; the one index is likewise already built).
    """
    import faiss
    import ray

    from unibct_ray.distributed.knn import FaissShardActor, RayShardedKNN
    from unibct_ray.distributed.runtime import ensure_ray, spread_placement
    from unibct_ray.metrics.knn import FaissKNN, merge_topk

    rng = np.random.default_rng(seed)
    gal = rng.standard_normal((gallery_size, dim), dtype=np.float32)
    gal /= np.linalg.norm(gal, axis=1, keepdims=True)
    q = gal[rng.integers(0, gallery_size, queries)] + 0.05 * rng.standard_normal((queries, dim), dtype=np.float32)
    ensure_ray()
    cores = os.cpu_count() or 1
    faiss.omp_set_num_threads(cores)
    # end to end
    t = time.perf_counter()
    s1, i1 = FaissKNN(index="flat")(gal, q, k)
    one = time.perf_counter() - t
    t = time.perf_counter()
    s2, i2 = RayShardedKNN(shards=shards, index="flat")(gal, q, k)
    sharded = time.perf_counter() - t
    # search only: the index built / the shards loaded beforehand
    knn = FaissKNN(index="flat")
    index = knn.build(gal)
    t = time.perf_counter()
    s3, i3 = knn.search_built(index, gal, q, k)
    one_search = time.perf_counter() - t
    del index
    bounds = np.linspace(0, gallery_size, shards + 1).astype(int)
    with spread_placement(shards) as strategies:
        actors = [FaissShardActor.options(scheduling_strategy=strategies[i]).remote() for i in range(shards)]
        ray.get([a.load.remote(gal[bounds[i]:bounds[i + 1]]) for i, a in enumerate(actors)])
        ray.get([a.build.remote("flat", 1024, 32, 32) for a in actors])
        q_ref = ray.put(q)
        t = time.perf_counter()
        parts = ray.get([a.search.remote(q_ref, k, "flat", 1024, 32, 32) for a in actors])
        s4, i4 = merge_topk(parts, k, offsets=bounds[:-1].tolist())
        sharded_search = time.perf_counter() - t
        for a in actors:
            ray.kill(a)
    return {
        "gallery": gallery_size, "queries": queries, "dim": dim, "k": k, "cores": cores,
        "one_index_threads": cores, "shards": shards, "ray_nodes": len(ray.nodes()),
        "end_to_end": {
            "one_index_s": round(one, 2), "one_index_qps": round(queries / one, 1),
            "sharded_s": round(sharded, 2), "sharded_qps": round(queries / sharded, 1),
            "speedup": round(one / sharded, 3), "identical_topk": bool(np.array_equal(i1, i2)),
            "max_score_diff": float(np.abs(s1 - s2).max()),
            "note": "index built in the call; sharded: actors started, shards shipped, searched, merged",
        },
        "search_only": {
            "one_index_s": round(one_search, 2), "one_index_qps": round(queries / one_search, 1),
            "sharded_s": round(sharded_search, 2), "sharded_qps": round(queries / sharded_search, 1),
            "speedup": round(one_search / sharded_search, 3),
            "identical_topk": bool(np.array_equal(i3, i4) and np.array_equal(i1, i4)),
            "note": "index built / shards loaded beforehand; timed: the searches and the exact merge",
        },
        "load_avg": [round(x, 2) for x in os.getloadavg()],
    }


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gallery", type=int, default=1_000_000, help="gallery rows")
    p.add_argument("--queries", type=int, default=10_000, help="query rows")
    p.add_argument("--dim", type=int, default=128, help="embedding size")
    p.add_argument("--k", type=int, default=10, help="neighbours per query")
    p.add_argument("--shards", type=int, default=2, help="Ray actors, one gallery slice each")
    p.add_argument("--seed", type=int, default=0, help="random data seed")


def run(a: argparse.Namespace) -> dict:
    return bench_search(a.gallery, a.queries, a.dim, a.k, a.shards, a.seed)


if __name__ == "__main__":
    from unibct_ray.bench.common import standalone

    standalone("search", __doc__, add_arguments, run)
