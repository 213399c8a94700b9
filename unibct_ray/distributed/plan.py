"""The resource plan against the connected Ray cluster (the adapter of :mod:`unibct_ray.plan`)."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import ray

from unibct_ray.plan import ResourcePlan, check_plan, plan_run

__all__ = ["cluster_nodes", "cluster_plan", "check_cluster", "PLAN_WAIT_S"]

#: How long a failing plan is re-checked on a cluster reached by address, whose workers may
#: still be joining (a RayJob is submitted once its head is ready); a local Ray never waits.
PLAN_WAIT_S = float(os.environ.get("UNIBCT_PLAN_WAIT_S", "300"))

# The Ray cluster launcher leaves its config here on the head: the node types it may still start.
_BOOTSTRAP = Path("~/ray_bootstrap_config.yaml")


def _autoscaled(present: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Nodes a launcher cluster's autoscaler can still add (``max_workers`` of each worker type
    less those up), read from its bootstrap config on the head; [] elsewhere."""
    path = _BOOTSTRAP.expanduser()
    if not path.is_file():
        return []
    import yaml

    try:
        conf = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return []
    out: list[dict[str, Any]] = []
    budget = int(conf.get("max_workers", 0)) - sum(1 for n in present if not n["head"])
    for name, t in (conf.get("available_node_types") or {}).items():
        if name == conf.get("head_node_type"):
            continue
        res = t.get("resources") or {}
        up = sum(1 for n in present if not n["head"] and n.get("CPU") == res.get("CPU") and n.get("GPU", 0) == res.get("GPU", 0))
        for i in range(max(0, min(int(t.get("max_workers", 0)) - up, budget))):
            out.append({**res, "name": f"{name} (to start)", "head": False})
            budget -= 1
    return out


def cluster_nodes() -> list[dict[str, Any]]:
    """The alive nodes of the connected cluster as resource dicts (``ray.nodes()``'s ``Resources``:
    totals, not what is free now) with a ``name`` (``head`` or the node's address)."""
    out = []
    for n in ray.nodes():
        if not n.get("Alive"):
            continue
        r = dict(n.get("Resources") or {})
        head = "node:__internal_head__" in r
        out.append({**r, "name": "head" if head else str(n.get("NodeManagerAddress") or n.get("NodeID", "")[:8]),
                    "head": head})
    return out + _autoscaled(out)


def cluster_plan(cfg: Any, **kwargs: Any) -> ResourcePlan:
    """:func:`unibct_ray.plan.plan_run` of ``cfg`` on the connected cluster."""
    return plan_run(cfg, cluster_nodes(), **kwargs)


def check_cluster(cfg: Any, *, wait_s: float | None = None, **kwargs: Any) -> ResourcePlan:
    """Refuse (``UserError``, one line) a run the connected cluster cannot hold; print the plan's
    warnings as one line each. Called before any ``fit()`` and before any extraction.

    ``wait_s`` (default: :data:`PLAN_WAIT_S` when ``RAY_ADDRESS`` names a cluster, else 0):
    a failing plan is checked again every 5 s while nodes may still join."""
    if wait_s is None:
        wait_s = PLAN_WAIT_S if os.environ.get("RAY_ADDRESS") else 0.0
    plan = cluster_plan(cfg, **kwargs)
    deadline = time.monotonic() + wait_s
    if not plan.ok and wait_s > 0:
        print(f"[{plan.config}] {plan.shortfall}; waiting up to {wait_s:g} s for nodes to join", file=sys.stderr,
              flush=True)
        while not plan.ok and time.monotonic() < deadline:
            time.sleep(5)
            plan = cluster_plan(cfg, **kwargs)
    check_plan(plan)
    for w in plan.warnings:
        print(f"[{plan.config}] warning: {w}", file=sys.stderr, flush=True)
    return plan
