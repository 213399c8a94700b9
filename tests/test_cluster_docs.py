"""Docs that run: cluster manifests and documented commands point at real job modules, flags and
configs; the launcher config satisfies Ray's own schema; nothing is exposed publicly."""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

from unibct_ray.cli import build_parser as cli_parser
from unibct_ray.config import load_config

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "cluster"
MANIFESTS = sorted(CLUSTER.glob("*.yaml"))
PUBLIC_KINDS = {"Ingress", "Route", "Gateway", "HTTPRoute", "IngressRoute"}


def docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def job_commands() -> list[tuple[str, str]]:
    """(where, command) for every RayJob entrypoint and every `python jobs/...` in the READMEs."""
    out = []
    for f in MANIFESTS:
        for d in docs(f):
            if d.get("kind") == "RayJob":
                out += [(f.name, c.strip()) for c in d["spec"]["entrypoint"].split("&&")]
    for f in [CLUSTER / "README.md", ROOT / "README.md"]:
        text = f.read_text().replace("\\\n", " ")
        out += [(str(f.relative_to(ROOT)), "python " + c) for c in re.findall(r"python (jobs/\S+\.py[^`\n|;&]*)", text)]
    return out


def load_job(path: Path):
    spec = importlib.util.spec_from_file_location(f"job_{path.stem}", path)
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    return job


def test_every_manifest_parses():
    assert {f.name for f in MANIFESTS} >= {"ray-cluster.yaml", "kuberay-raycluster.yaml", "kuberay-rayjob-train.yaml",
                                          "kuberay-rayjob-evaluate.yaml"}
    kinds = {d.get("kind") for f in MANIFESTS for d in docs(f)}
    assert {"RayCluster", "RayJob"} <= kinds


def test_job_commands_resolve_to_jobs_flags_and_configs():
    cmds = job_commands()
    where = {w for w, _ in cmds}
    assert {"kuberay-rayjob-train.yaml", "kuberay-rayjob-evaluate.yaml", "cluster/README.md", "README.md"} <= where, where
    for w, cmd in cmds:
        args = shlex.split(cmd, comments=True)
        assert args[0] == "python" and args[1].startswith("jobs/"), (w, cmd)
        module = ROOT / args[1]
        assert module.is_file(), (w, cmd)
        job = load_job(module)
        assert callable(job.main), (w, cmd)
        assert hasattr(job, "build_parser"), f"{module}: a job exposes build_parser() so documented commands are checked"
        parser = job.build_parser()
        ns, rest = parser.parse_known_args(args[2:])  # an unknown or malformed flag exits here
        if module.stem == "evaluate":  # passes the other `unibct-ray eval` flags on: they must exist there
            cli_parser().parse_args(["eval", "--ijbc", "i", "--out", "o", *rest])
        else:
            assert not rest, (w, cmd, rest)
        if ns.config is not None:  # a job whose --config is not a training config names its loader
            loader = getattr(job, "load_job_config", load_config)
            loader(ROOT / ns.config)


def test_launcher_config_satisfies_rays_schema():
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    cfg = yaml.safe_load((CLUSTER / "ray-cluster.yaml").read_text())
    jsonschema.validate(cfg, schema)
    assert cfg["provider"]["type"] == "aws" and cfg["provider"]["use_internal_ips"] is True
    gpu = cfg["available_node_types"]["gpu_worker"]["node_config"]["InstanceType"]
    assert gpu.startswith(("g5", "g6", "p3", "p4", "p5")), gpu  # GPU workers
    setup = " ".join(cfg["setup_commands"])
    assert "/data" in setup and "/shared" in setup  # shared storage on every node


def test_dockerfile_copies_what_exists():
    for line in (CLUSTER / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY"):
            for src in [w for w in line.split()[1:-1] if not w.startswith("--")]:
                assert (ROOT / src).exists(), line


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_no_public_exposure_and_no_secrets(path):
    raw = path.read_text()
    text = "\n".join(line.split("#", 1)[0] for line in raw.splitlines())  # settings, not comments
    assert "LoadBalancer" not in text and "NodePort" not in text and "hostNetwork" not in text, path
    assert not re.search(r"(?i)(aws_secret|secret_access|password|token|api_key)\s*:", text), path
    for doc in docs(path):
        assert doc.get("kind") not in PUBLIC_KINDS, path
        if doc.get("kind") == "Service":
            assert doc.get("spec", {}).get("type", "ClusterIP") == "ClusterIP", path
        spec = doc.get("spec", {}) if isinstance(doc, dict) else {}
        head = spec.get("headGroupSpec") or spec.get("rayClusterSpec", {}).get("headGroupSpec")
        if head is not None:
            assert head.get("serviceType", "ClusterIP") == "ClusterIP", path
            assert "enableIngress" not in head, path
            if doc["kind"] == "RayCluster":  # interactive: reached by port-forward only
                assert head["rayStartParams"].get("dashboard-host") == "127.0.0.1", path
    if "head_start_ray_commands" in text:
        assert "--dashboard-host=127.0.0.1" in text, path
