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


def pip_installs() -> list[tuple[str, str, str]]:
    """(file, folder it runs in, command) for every ``pip install`` the image and the launcher run."""
    out = []
    dockerfile = (CLUSTER / "Dockerfile").read_text().replace("\\\n", " ")
    workdir = "/"
    for line in dockerfile.splitlines():
        if line.startswith("WORKDIR"):
            workdir = line.split()[1]
        if line.startswith("RUN"):
            out += [("Dockerfile", workdir, c) for c in line[3:].split("&&")]
    launcher = yaml.safe_load((CLUSTER / "ray-cluster.yaml").read_text())
    for key in ("setup_commands", "head_setup_commands", "worker_setup_commands", "initialization_commands"):
        for cmd in launcher.get(key) or []:
            cwd = "~"
            for c in cmd.split("&&"):
                if c.strip().startswith("cd "):
                    cwd = c.strip()[3:].strip()
                out.append(("ray-cluster.yaml", cwd, c))
    return [(f, cwd, c.strip()) for f, cwd, c in out if re.search(r"\bpip3? install\b", c)]


def test_the_image_and_the_launcher_install_with_the_pinned_constraints():
    """Every pip install of the image and of the cluster nodes takes constraints.txt, from the
    copy of the repository it runs in (the image copies the file; the launcher syncs the tree)."""
    installs = pip_installs()
    assert {f for f, _, _ in installs} == {"Dockerfile", "ray-cluster.yaml"}, installs
    copied = " ".join(ln for ln in (CLUSTER / "Dockerfile").read_text().splitlines() if ln.startswith("COPY"))
    for where, cwd, cmd in installs:
        words = shlex.split(cmd)
        flag = [words[i + 1] for i, w in enumerate(words[:-1]) if w in ("-c", "--constraint")]
        flag += [w.split("=", 1)[1] for w in words if w.startswith("--constraint=")]
        assert flag, f"{where}: `{cmd}` installs without the pinned constraints"
        path = flag[0] if flag[0].startswith("/") else f"{cwd.rstrip('/')}/{flag[0]}"
        assert path.endswith("/constraints.txt"), (where, cmd)
        if where == "Dockerfile":
            assert path == "/app/constraints.txt" and "constraints.txt" in copied, (cmd, copied)
        else:
            assert path == "/home/ubuntu/unibct-ray/constraints.txt", cmd  # file_mounts syncs the tree there
    pins = dict(ln.split("==") for ln in (ROOT / "constraints.txt").read_text().splitlines()
                if ln and not ln.startswith("#"))
    launcher = " ".join(c for _, _, c in installs if "ray[" in c)
    assert f"ray[default]=={pins['ray']}" in launcher  # the nodes' Ray is the pinned one
    assert f"rayproject/ray:{pins['ray']}-" in (CLUSTER / "Dockerfile").read_text()  # and the image's


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


# ------------------------------------------------------------------ every job starts on its cluster
def _cpu(v) -> float:
    s = str(v)
    return float(s[:-1]) / 1000 if s.endswith("m") else float(s)


def kuberay_nodes(cluster_spec: dict) -> list[dict]:
    """Node shapes a RayCluster spec declares: the head (its num-cpus, else its CPU limit) and
    each worker group's replicas (num-cpus/num-gpus, else the container limits)."""
    def shape(group: dict, name: str, head: bool) -> dict:
        params = group.get("rayStartParams") or {}
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        return {"name": name, "head": head, "CPU": _cpu(params.get("num-cpus", limits["cpu"])),
                "GPU": float(params.get("num-gpus", limits.get("nvidia.com/gpu", 0)))}

    nodes = [shape(cluster_spec["headGroupSpec"], "head", True)]
    for g in cluster_spec.get("workerGroupSpecs", []):
        nodes += [shape(g, f"{g['groupName']}-{i}", False) for i in range(int(g["replicas"]))]
    return nodes


def launcher_nodes(gpus_needed: float) -> list[dict]:
    """The launcher's head and as many GPU workers as a job's GPUs bring up (within max_workers)."""
    import math

    cfg = yaml.safe_load((CLUSTER / "ray-cluster.yaml").read_text())
    types = cfg["available_node_types"]
    nodes = [{"name": "head", "head": True, **types[cfg["head_node_type"]]["resources"]}]
    gpu = types["gpu_worker"]
    n = max(gpu["min_workers"], min(gpu["max_workers"], math.ceil(gpus_needed / gpu["resources"]["GPU"])))
    return nodes + [{"name": f"gpu-{i}", **gpu["resources"]} for i in range(n)]


def job_plan_input(cmd: str):
    """(train config, trials at once) of a train or tune job command; None for other jobs."""
    from unibct_ray.jobs import overrides
    from unibct_ray.tuning import load_tune_spec

    args = shlex.split(cmd, comments=True)
    module = ROOT / args[1]
    if module.stem not in ("train", "tune"):
        return None
    ns, _ = load_job(module).build_parser().parse_known_args(args[2:])
    if module.stem == "train":
        return load_config(ROOT / ns.config, overrides(ns)), 1
    spec = load_tune_spec(ROOT / ns.config, max_concurrent=ns.max_concurrent, sets=overrides(ns))
    return spec.train_config({}, name=spec.name), spec.max_concurrent


def readme_jobs() -> list[str]:
    return [c for w, c in job_commands() if w == "cluster/README.md"]


def test_every_rayjob_passes_the_plan_of_its_cluster():
    from unibct_ray.plan import plan_run

    checked = 0
    for f in MANIFESTS:
        for d in docs(f):
            if d.get("kind") != "RayJob":
                continue
            nodes = kuberay_nodes(d["spec"]["rayClusterSpec"])
            for cmd in d["spec"]["entrypoint"].split("&&"):
                got = job_plan_input(cmd.strip())
                if got is None:  # evaluate: its IJB-C extraction actors (1 CPU each) and a read task fit
                    args = shlex.split(cmd)
                    actors = int(args[args.index("--num-workers") + 1])
                    assert actors + 1 <= sum(n["CPU"] for n in nodes), (f.name, cmd)
                    continue
                cfg, trials = got
                plan = plan_run(cfg, nodes, trials=trials)
                assert plan.ok, (f.name, plan.shortfall)
                assert not plan.warnings, (f.name, plan.warnings)
                checked += 1
    assert checked >= 2  # the train and the tune jobs


def test_readme_jobs_pass_the_plan_on_the_raycluster_and_the_launcher():
    from unibct_ray.plan import plan_run

    raycluster = next(d for d in docs(CLUSTER / "kuberay-raycluster.yaml") if d["kind"] == "RayCluster")
    checked = 0
    for cmd in readme_jobs():
        got = job_plan_input(cmd)
        if got is None:
            continue
        cfg, trials = got
        for where, nodes in (("kuberay-raycluster.yaml", kuberay_nodes(raycluster["spec"])),
                             ("ray-cluster.yaml", launcher_nodes(trials * cfg.num_workers if cfg.use_gpu else 0))):
            if not cfg.use_gpu and where == "ray-cluster.yaml":
                nodes = launcher_nodes(0)
            plan = plan_run(cfg, nodes, trials=trials)
            assert plan.ok, (where, cmd, plan.shortfall)
            checked += 1
    assert checked >= 6


def test_the_old_shipped_train_job_is_refused():
    """The train RayJob as it shipped (8 workers x 8 CPUs on 2 x 32-CPU pods, a 0-CPU head) hung;
    the plan refuses it with the decode shortfall."""
    from unibct_ray.plan import plan_run

    job = next(d for d in docs(CLUSTER / "kuberay-rayjob-train.yaml") if d["kind"] == "RayJob")
    cfg, _ = job_plan_input(job["spec"]["entrypoint"] + " --set cpus_per_worker=8")
    plan = plan_run(cfg, kuberay_nodes(job["spec"]["rayClusterSpec"]))
    assert plan.shortfall is not None and plan.shortfall.startswith("plan: the training ingest needs 1 CPU for a decode")


def test_gpu_worker_groups_select_and_tolerate_gpu_nodes():
    for f in MANIFESTS:
        for d in docs(f):
            spec = d.get("spec", {}) if isinstance(d, dict) else {}
            cluster = spec.get("rayClusterSpec", spec) if d.get("kind") in ("RayJob", "RayCluster") else None
            for g in (cluster or {}).get("workerGroupSpecs", []):
                pod = g["template"]["spec"]
                if "nvidia.com/gpu" in pod["containers"][0]["resources"]["limits"]:
                    assert any(t.get("key") == "nvidia.com/gpu" for t in pod.get("tolerations", [])), f.name
                    assert pod.get("nodeSelector"), f.name


def _ray_specs() -> list[tuple[str, dict]]:
    """(file, RayClusterSpec) of every RayCluster and RayJob manifest."""
    out = []
    for f in MANIFESTS:
        for d in docs(f):
            if d.get("kind") == "RayCluster":
                out.append((f.name, d["spec"]))
            elif d.get("kind") == "RayJob":
                out.append((f.name, d["spec"]["rayClusterSpec"]))
    return out


def test_every_kuberay_cluster_enables_ray_token_authentication():
    specs = _ray_specs()
    assert len(specs) >= 4
    for name, spec in specs:
        assert spec.get("authOptions", {}).get("mode") == "token", f"{name}: Ray token authentication is off"


def test_the_launcher_starts_every_node_with_token_authentication():
    cfg = yaml.safe_load((CLUSTER / "ray-cluster.yaml").read_text())
    token_path = "/home/ubuntu/.ray/auth-token.txt"
    assert token_path in cfg["file_mounts"], "the token file is not shipped to the nodes"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = [c for c in cfg[key] if "ray start" in c]
        assert start and all("RAY_AUTH_MODE=token" in c and f"RAY_AUTH_TOKEN_PATH={token_path}" in c
                             for c in start), key


def _matches(selector: dict, labels: dict) -> bool:
    """Kubernetes label-selector semantics (matchLabels and Exists/In expressions)."""
    for k, v in (selector.get("matchLabels") or {}).items():
        if labels.get(k) != v:
            return False
    for e in selector.get("matchExpressions") or []:
        if e["operator"] == "Exists" and e["key"] not in labels:
            return False
        if e["operator"] == "In" and labels.get(e["key"]) not in e["values"]:
            return False
    return True


def test_the_network_policy_fences_every_ray_pod_and_pins_outside_peers_to_a_namespace():
    (policy,) = [d for d in docs(CLUSTER / "kuberay-networkpolicy.yaml") if d.get("kind") == "NetworkPolicy"]
    spec = policy["spec"]
    # The labels KubeRay puts on a head and a worker pod of cluster unibct-ray.
    head = {"ray.io/cluster": "unibct-ray", "ray.io/node-type": "head", "ray.io/is-ray-node": "yes"}
    worker = {"ray.io/cluster": "unibct-ray", "ray.io/node-type": "worker", "ray.io/is-ray-node": "yes",
              "ray.io/group": "gpu"}
    assert _matches(spec["podSelector"], head) and _matches(spec["podSelector"], worker), \
        "the workers' dashboard agents (job API on the node IP) must be fenced too"
    assert "Ingress" in spec["policyTypes"]
    for rule in spec["ingress"]:
        for peer in rule["from"]:
            assert "ipBlock" not in peer, "no address ranges: peers by identity only"
            ns = peer.get("namespaceSelector")
            if ns is not None:
                # another namespace only by its immutable name, never 'any namespace' + a pod label
                assert set((ns.get("matchLabels") or {})) == {"kubernetes.io/metadata.name"}, peer
                assert "podSelector" in peer, peer
    # a pod elsewhere that copies the operator's label is not admitted
    impostor_ns = {"kubernetes.io/metadata.name": "attacker"}
    for rule in spec["ingress"]:
        for peer in rule["from"]:
            if "namespaceSelector" in peer:
                assert not _matches(peer["namespaceSelector"], impostor_ns)
