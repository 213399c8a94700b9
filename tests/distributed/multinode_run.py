"""Run the distributed kNN and prototype refinement on a simulated 2-node Ray cluster.

Started by ``test_multinode.py`` in its own process (the test session's local Ray stays
untouched; ARCHITECTURE §8: ``Cluster(connect=True)`` would silently stay on an open session).

    python multinode_run.py INPUT.npz OUT_DIR

Reads gallery/queries/k and old/new/labels/num_classes from INPUT.npz, writes OUT_DIR/out.npz
(scores, indices, prototypes) and OUT_DIR/placement.json (the cluster's node ids and the node
of each shard / refinement actor).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import ray
from ray.cluster_utils import Cluster

# Small nodes: 2 logical CPUs each, so both 1-CPU shard actors would fit on one node and only the
# SPREAD strategy puts them on different nodes; no dashboard or log monitor (nothing reads them).
NODE = {"num_cpus": 2, "object_store_memory": 80 * 1024 * 1024, "include_log_monitor": False}


def main(inp: str, out_dir: str) -> int:
    from unibct_ray.distributed.knn import RayShardedKNN
    from unibct_ray.distributed.prototypes import RefineParams, refine_distributed

    t0 = time.perf_counter()
    cluster = Cluster(initialize_head=True, head_node_args={**NODE, "include_dashboard": False})
    try:
        cluster.add_node(**NODE)
        ray.init(address=cluster.address, log_to_driver=False)
        nodes = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])
        started = time.perf_counter() - t0

        d = np.load(inp)
        t1 = time.perf_counter()
        knn = RayShardedKNN(shards=2, index="flat")
        scores, indices = knn(d["gallery"], d["queries"], int(d["k"]))
        t2 = time.perf_counter()
        refine_nodes: list[str] = []
        params = RefineParams(lam=float(d["lam"]), temperature=float(d["tau"]))
        protos = refine_distributed(d["old"], d["new"], d["labels"], int(d["num_classes"]), params,
                                    workers=2, placement=refine_nodes)

        out = Path(out_dir)
        np.savez(out / "out.npz", scores=scores, indices=indices, prototypes=protos)
        (out / "placement.json").write_text(json.dumps({
            "nodes": nodes, "knn": knn.placement, "refine": refine_nodes,
            "startup_s": round(started, 2), "knn_s": round(t2 - t1, 2),
            "refine_s": round(time.perf_counter() - t2, 2)}))
    finally:
        t3 = time.perf_counter()
        ray.shutdown()
        cluster.shutdown()
        print(f"shutdown {time.perf_counter() - t3:.1f} s, total {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
