"""Docs that run: cluster manifests point at real job modules and configs, expose nothing."""

from __future__ import annotations

import importlib.util
import re
import shlex
from pathlib import Path

import yaml

from unibct_ray.config import load_config

ROOT = Path(__file__).resolve().parent.parent


def entrypoints() -> list[str]:
    out = []
    for f in sorted((ROOT / "cluster").glob("*.yaml")):
        doc = yaml.safe_load(f.read_text())
        if doc.get("kind") == "RayJob":
            out.append(doc["spec"]["entrypoint"])
    for f in [ROOT / "cluster" / "README.md", ROOT / "README.md"]:
        text = f.read_text().replace("\\\n", " ")
        out += re.findall(r"python (jobs/\S+\.py[^`\n]*)", text)
    return out


def test_entrypoints_resolve_to_jobs_and_configs():
    eps = entrypoints()
    assert eps, "no job entrypoints found in cluster/ or the README"
    for ep in eps:
        args = shlex.split(ep.replace("python ", "", 1) if ep.startswith("python ") else ep)
        module = ROOT / args[0]
        assert module.is_file(), ep
        spec = importlib.util.spec_from_file_location("job", module)
        job = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(job)
        assert callable(job.main), ep
        if "--config" in args:
            cfg = load_config(ROOT / args[args.index("--config") + 1])
            assert cfg.name


def test_no_public_exposure_and_no_secrets():
    for f in sorted((ROOT / "cluster").glob("*.yaml")):
        raw = f.read_text()
        text = "\n".join(line.split("#", 1)[0] for line in raw.splitlines())  # settings, not comments
        for doc in yaml.safe_load_all(raw):
            spec = doc.get("spec", {}) if isinstance(doc, dict) else {}
            head = spec.get("headGroupSpec") or spec.get("rayClusterSpec", {}).get("headGroupSpec")
            if head is not None:
                assert head.get("serviceType", "ClusterIP") == "ClusterIP", f
        assert "LoadBalancer" not in text and "NodePort" not in text, f
        assert not re.search(r"(?i)(aws_secret|password|token)\s*:", text), f
        if "head_start_ray_commands" in text:
            assert "--dashboard-host=127.0.0.1" in text, f
