"""Plan the shipped MS1Mv3 configs on a local Ray whose nodes declare the shipped cluster's shape.

Started by ``test_plan_ray.py`` in its own process (the session's Ray stays untouched): a head
with 0 CPUs and two nodes declaring 32 logical CPUs and 4 logical GPUs each (nothing runs on
them). Writes OUT.json: the nodes ``cluster_nodes()`` read and each config's shortfall.

    python plan_cluster_run.py CONFIG OUT.json
"""

from __future__ import annotations

import json
import sys

import ray
from ray.cluster_utils import Cluster

SMALL = {"object_store_memory": 80 * 1024 * 1024, "include_log_monitor": False}


def main(config: str, out: str) -> int:
    from unibct_ray.config import load_config
    from unibct_ray.distributed.plan import cluster_nodes
    from unibct_ray.plan import plan_run

    cluster = Cluster(initialize_head=True, head_node_args={**SMALL, "num_cpus": 0, "include_dashboard": False})
    try:
        for _ in range(2):
            cluster.add_node(**SMALL, num_cpus=32, num_gpus=4)
        ray.init(address=cluster.address, log_to_driver=False)
        cluster.wait_for_nodes()
        nodes = cluster_nodes()
        result = {"nodes": [{k: n[k] for k in ("CPU", "GPU", "head") if k in n} for n in nodes], "plans": {}}
        for cpus in (8, 6):
            cfg = load_config(config, [f"cpus_per_worker={cpus}"])
            result["plans"][str(cpus)] = plan_run(cfg, nodes).shortfall
        with open(out, "w") as f:
            json.dump(result, f)
    finally:
        ray.shutdown()
        cluster.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
