"""The resource plan (Ray-free): hand-computed placements on the shipped cluster shape, a laptop,
fractional GPUs, and the architecture counts it builds on, checked against torch itself."""

from __future__ import annotations

from pathlib import Path

import pytest

from unibct_ray.errors import ConfigError
import torch

from unibct_ray.config import from_dict, load_config, to_dict
from unibct_ray.errors import UserError
from unibct_ray.plan import (activation_elements, backbone_parameters, check_plan, parse_nodes, plan_run)

ROOT = Path(__file__).resolve().parent.parent
MS1M = sorted((ROOT / "jobs/configs/ms1mv3").glob("*/*.yaml"))
TRAIN_CONFIGS = [p for p in MS1M if not p.name.startswith("tune")]
# cluster/kuberay-rayjob-train.yaml: a 0-CPU head and 2 worker pods of 32 CPUs and 4 GPUs.
SHIPPED = [{"name": "head", "CPU": 0, "head": True},
           {"name": "gpu-a", "CPU": 32, "GPU": 4}, {"name": "gpu-b", "CPU": 32, "GPU": 4}]


def cfg_with(path: Path, **top) -> "object":
    data = to_dict(load_config(path))
    data.update(top)
    return from_dict(data, path.name)


@pytest.mark.parametrize("name,size", [("r18", 112), ("r50", 112), ("tiny", 32), ("r34", 48)])
def test_parameter_count_matches_torch(name, size):
    from unibct_ray.models.iresnet import build_backbone

    model = build_backbone(name, 512 if name != "tiny" else 64, size)
    assert backbone_parameters(name, 512 if name != "tiny" else 64, size) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name,size", [("tiny", 32), ("r18", 32)])
def test_kept_activations_match_what_autograd_saves(name, size):
    """Every tensor autograd saves in a training forward pass, weights taken out, per image."""
    from unibct_ray.models.iresnet import build_backbone

    model = build_backbone(name, 64, size).train()
    params = {p.data_ptr() for p in model.parameters()}
    saved: dict[tuple[int, int], int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.data_ptr() not in params and t.dim() >= 2:  # BN's per-channel statistics are 1-d
            saved[(t.data_ptr(), t.numel())] = t.numel()
        return t

    b = 3
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(torch.randn(b, 3, size, size))
    kept, largest = activation_elements(name, 64, size)
    assert kept * b == sum(saved.values())
    assert largest == max(v for v in saved.values()) // b


def test_shipped_cluster_refuses_all_cpus_to_the_workers():
    """8 workers x 8 CPUs take the 64 CPUs of the two pods; the head has none: no decode task
    can run. The largest whole cpus_per_worker that leaves 2 CPUs per GPU is 6 (64 - 48 = 16)."""
    cfg = cfg_with(ROOT / "jobs/configs/ms1mv3/open-class/new-unibct.yaml", cpus_per_worker=8.0)
    plan = plan_run(cfg, SHIPPED)
    assert not plan.ok
    expected = ("plan: the training ingest needs 1 CPU for a decode task beside 8 workers x 8 CPUs + 0.75 GPU, "
                "but the 2 worker nodes have 64 CPUs and the head 0: lower cpus_per_worker (e.g. 6) or "
                "decode_cpus, or add CPUs")
    assert plan.shortfall == expected
    with pytest.raises(UserError) as e:
        check_plan(plan)
    assert str(e.value) == expected and "\n" not in str(e.value)


@pytest.mark.parametrize("path", TRAIN_CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_ms1mv3_config_runs_on_the_shipped_cluster(path):
    plan = plan_run(load_config(path), SHIPPED)
    assert plan.ok, plan.shortfall
    assert not plan.warnings, plan.warnings
    train = next(p for p in plan.phases if p.name == "training")
    # 4 workers per pod, each on its own GPU, 6 CPUs each; 8 CPUs per pod left, one decode task on one.
    workers = [p for p in train.placements if p.what == "train worker"]
    assert sorted((p.node, p.count, p.devices) for p in workers) == [("gpu-a", 4, (0, 1, 2, 3)),
                                                                      ("gpu-b", 4, (0, 1, 2, 3))]
    assert sum(c for c, _ in train.left.values()) == 64 - 48 - 1


def test_fractional_gpus_share_a_device_only_when_they_fit():
    base = {"use_gpu": True, "num_workers": 2, "global_batch": 8, "cpus_per_worker": 1.0, "extract_actors": 2,
            "refine_actors": 2, "compat": {"method": "unibct", "old_checkpoint": "old.pt", "refine_epochs": [1]},
            "optim": {"epochs": 2}}
    cfg = from_dict(base)
    one_gpu = [{"CPU": 8, "GPU": 1}]
    plan = plan_run(cfg, one_gpu)  # two 0.75 shares on one device: no
    assert plan.shortfall is not None and "2 workers x 1 CPU + 0.75 GPU" in plan.shortfall
    assert "the node has 1 GPUs" in plan.shortfall
    two = [{"CPU": 8, "GPU": 2}]
    plan = plan_run(cfg, two, in_loop=True)
    assert plan.ok, plan.shortfall
    ex = next(p for p in plan.phases if p.name == "refine: extract (in loop)")
    workers = [p for p in ex.placements if p.what == "train worker"]
    actors = [p for p in ex.placements if p.what == "extraction actor"]
    assert workers[0].devices == (0, 1) and actors[0].devices == (0, 1)  # a 0.25 beside each 0.75
    assert ex.left["node-0"][1] == pytest.approx(0.0)
    # A third 0.25 share inside the loop finds no device with room: 2 x 0.25 are all that is free.
    plan = plan_run(from_dict({**base, "extract_actors": 3}), two, in_loop=True)
    assert plan.phases[-2].shortfall is not None and "3 extraction actors" in plan.phases[-2].shortfall
    # Between fits (train) the workers are gone: 3 actors x 0.25 share the free GPUs.
    assert plan_run(from_dict({**base, "extract_actors": 3}), two).ok
    # At extract_gpus 0.5 a worker would ask 1 - 0.5 = 0.5 and two workers would share one device
    # (as Ray places them): the config refuses it, so a worker's share is always above a half.
    with pytest.raises(ConfigError, match="extract_gpus: must be a finite number in \\(0, 0.5\\)"):
        from_dict({**base, "extract_gpus": 0.5})
    almost = plan_run(from_dict({**base, "extract_gpus": 0.45, "compat": {"method": "independent"}}), one_gpu)
    assert not almost.ok  # two 0.55 shares cannot share the one device


def test_a_laptop_with_two_workers_of_two_cpus_is_refused():
    cfg = from_dict({"num_workers": 2, "cpus_per_worker": 2.0, "global_batch": 8})
    plan = plan_run(cfg, [{"CPU": 4, "memory": 8 << 30}])
    assert plan.shortfall == ("plan: the training ingest needs 1 CPU for a decode task beside 2 workers x 2 CPUs, "
                              "but the node has 4 CPUs: lower cpus_per_worker (e.g. 1) or decode_cpus, or add CPUs")
    assert plan_run(from_dict({"num_workers": 2, "cpus_per_worker": 1.0, "global_batch": 8}), [{"CPU": 4}]).ok
    # Fractional decode CPUs fit beside: 0.5 each of the 0 left is still nothing.
    assert not plan_run(from_dict({"num_workers": 2, "cpus_per_worker": 2.0, "global_batch": 8, "decode_cpus": 0.5}),
                        [{"CPU": 4}]).ok


def test_tune_trials_at_once():
    cfg = cfg_with(ROOT / "jobs/configs/ms1mv3/open-class/new-unibct.yaml", num_workers=4)
    plan = plan_run(cfg, SHIPPED, trials=2)
    assert plan.ok, plan.shortfall  # 2 x 4 x 6 = 48 CPUs, 2 decode tasks, 2 trial drivers
    assert not plan.warnings
    # One trial refines while the other trains: its 4 workers keep their GPUs.
    solve = next(p for p in plan.phases if p.name == "refine: solve")
    assert sum(p.count for p in solve.placements if p.what == "train worker") == 4
    greedy = cfg_with(ROOT / "jobs/configs/ms1mv3/open-class/new-unibct.yaml", num_workers=4, cpus_per_worker=8.0)
    plan = plan_run(greedy, SHIPPED, trials=2)
    # Each trial's driver takes 0.01 CPU, on a pod (the head has none): 4 x 8 CPUs no longer fit there.
    assert plan.shortfall == ("plan: the trials' training needs 4 workers x 8 CPUs + 0.75 GPU beside 4 workers x "
                              "8 CPUs + 0.75 GPU, but the 2 worker nodes have 64 CPUs and the head 0: lower "
                              "num_workers or cpus_per_worker, or add CPUs")


def test_too_few_decode_cpus_warn():
    cfg = cfg_with(ROOT / "jobs/configs/ms1mv3/open-class/new-unibct.yaml", cpus_per_worker=7.0)
    plan = plan_run(cfg, SHIPPED)
    assert plan.ok
    assert len(plan.warnings) == 1 and "8 CPUs are left for decoding beside 8 GPU workers" in plan.warnings[0]


def test_parse_nodes():
    nodes = parse_nodes("0,32:4x2")
    assert [(n.cpu, n.gpu, n.head) for n in nodes] == [(0, 0, True), (32, 4, False), (32, 4, False)]
    with pytest.raises(UserError, match="expected CPU"):
        parse_nodes("0,lots")


def test_plan_table_names_every_phase():
    cfg = load_config(ROOT / "jobs/configs/ms1mv3/open-class/new-unibct.yaml")
    text = plan_run(cfg, SHIPPED, num_classes=65_402).table()
    for phase in ("old features", "training", "refine: extract", "refine: solve"):
        assert phase in text
    assert "memory of one train worker" in text and "verdict: the run can start" in text


def test_cli_plan_offline_for_train_and_tune(capsys):
    """``--plan --plan-nodes``: the plan of a shape, no Ray; exit 0 when it can start, 2 when not."""
    from unibct_ray.cli import main

    tune = str(ROOT / "jobs/configs/ms1mv3/open-class/tune-unibct.yaml")
    assert main(["tune", "--config", tune, "--plan", "--plan-nodes", "0,32:4x2", "--set", "num_workers=4",
                 "--max-concurrent", "2"]) == 0
    out = capsys.readouterr().out
    assert "(2 trials at once)" in out and "verdict: the run can start" in out
    assert main(["tune", "--config", tune, "--plan", "--plan-nodes", "0,32:4x2", "--set", "num_workers=4",
                 "--set", "cpus_per_worker=8", "--max-concurrent", "2"]) == 2
    assert "plan: the trials' training needs" in capsys.readouterr().err
    train = str(ROOT / "jobs/configs/ms1mv3/open-class/new-unibct.yaml")
    assert main(["train", "--config", train, "--plan", "--plan-nodes", "0,32:4x2"]) == 0
    assert main(["train", "--config", train, "--plan", "--plan-nodes", "0,32:4x2", "--set", "cpus_per_worker=8"]) == 2


def test_jobs_pass_plan_on():
    import importlib.util

    for name in ("train", "tune"):
        spec = importlib.util.spec_from_file_location(f"job_{name}", ROOT / "jobs" / f"{name}.py")
        job = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(job)
        a = job.build_parser().parse_args(["--config", "x.yaml", "--plan"])
        assert job.cli_argv(a)[-1] == "--plan"
