"""Strict config loading: unknown keys, wrong types and impossible values name the key."""

from __future__ import annotations

import pytest

from unibct_ray.config import TrainConfig, apply_overrides, clamp_refine_epochs, from_dict, load_config, to_dict
from unibct_ray.errors import ConfigError


def write(tmp_path, text):
    p = tmp_path / "train.yaml"
    p.write_text(text)
    return p


def test_roundtrip_and_overrides(tmp_path):
    p = write(tmp_path, "name: x\noptim:\n  lr: 0.05\ncompat:\n  method: unibct\n  old_checkpoint: old.pt\n")
    cfg = load_config(p, ["optim.epochs=4", "compat.refine_epochs=[1, 2]", "global_batch=64"])
    assert cfg.optim.lr == 0.05 and cfg.optim.epochs == 4 and cfg.compat.refine_epochs == (1, 2)
    assert cfg.effective_lr == pytest.approx(0.05 * 64 / 1024)
    assert from_dict(to_dict(cfg)) == cfg
    assert from_dict({}) == TrainConfig()


def test_exponent_numbers_are_numbers(tmp_path):
    # YAML 1.1 (PyYAML's default) reads 5e-4 as a string; configs, --set and prepare files must not.
    from unibct_ray.jobs import load_prepare_config

    p = write(tmp_path, "optim:\n  weight_decay: 5e-4\n  lr: 1E-1\n")
    cfg = load_config(p, ["optim.momentum=9e-1", "head.margin=+3e-1"])
    assert (cfg.optim.weight_decay, cfg.optim.lr, cfg.optim.momentum, cfg.head.margin) == (5e-4, 0.1, 0.9, 0.3)
    assert load_config(p, ["name=1e3x"]).name == "1e3x"  # not a number: stays a string
    prep = tmp_path / "prepare.yaml"
    prep.write_text("rec: a.rec\nout: o\nratio: 3e-1\n")
    assert load_prepare_config(prep).ratio == 0.3


@pytest.mark.parametrize("text,needle", [
    ("optim:\n  lrr: 0.1\n", "optim.lrr: unknown key"),
    ("optim:\n  lr: fast\n", "optim.lr: expected a number, got 'fast'"),
    ("use_gpu: 1\n", "use_gpu: expected true/false"),
    ("optim:\n  lr: -1\n", "optim.lr: must be a finite number in (0, 1000]"),
    ("global_batch: 10\nnum_workers: 3\n", "global_batch: 10 is not divisible"),
    ("compat:\n  method: l2\n", "compat.old_checkpoint: required"),
    ("model:\n  backbone: r7\n", "model.backbone: must be one of"),
    ("optim:\n  epochs: 5\ncompat:\n  method: unibct\n  old_checkpoint: o.pt\n  refine_epochs: [0]\n",
     "compat.refine_epochs: every epoch must be in 1..4"),
    ("optim:\n  epochs: 5\ncompat:\n  method: unibct\n  old_checkpoint: o.pt\n  refine_epochs: []\n",
     "compat.refine_epochs: method 'unibct' needs at least one epoch"),
    ("optim:\n  epochs: 1\ncompat:\n  method: unibct\n  old_checkpoint: o.pt\n", "optim.epochs: method 'unibct' needs at least 2"),
    ("- a\n- b\n", "expected a mapping"),
    ("a: [\n", "not valid YAML"),
])
def test_errors_name_file_and_key(tmp_path, text, needle):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, text))
    assert "train.yaml" in str(e.value) and needle in str(e.value)


@pytest.mark.parametrize("text,needle", [
    ("optim:\n  lr: 1e999\n", "optim.lr: must be a finite number"),            # YAML reads 1e999 as inf
    ("optim:\n  lr: .nan\n", "optim.lr: must be a finite number"),
    ("max_failures: -1\n", "max_failures: must be an integer in 0..1000"),     # Ray: -1 = retry forever
    ("extract_actors: -3\n", "extract_actors: must be an integer in 1..100000"),
    ("data:\n  shuffle_buffer: -5\n", "data.shuffle_buffer: must be an integer in 0..1000000"),
    ("optim:\n  momentum: 1.5\n", "optim.momentum: must be a finite number in [0, 1)"),
    ("optim:\n  momentum: -0.1\n", "optim.momentum: must be a finite number in [0, 1)"),
    ("model:\n  embedding_size: 1000000000000\n", "model.embedding_size: must be an integer in 1..8192"),
    ("compat:\n  weight: .inf\n", "compat.weight: must be a finite number"),
    ("head:\n  margin: 2.0\n", "head.margin: must be a finite number in [0, 1.5708)"),
    ("seed: -1\n", "seed: must be an integer in 0.."),
    ("global_batch: 10000000\nnum_workers: 1\n", "global_batch: must be an integer in 1..1048576"),
])
def test_every_number_is_range_checked(tmp_path, text, needle):
    """Values that loaded before and failed later (a traceback, a retry loop, a huge allocation)."""
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, text))
    assert str(e.value).startswith("train.yaml: ") and needle in str(e.value), str(e.value)


def test_a_checkpoint_claiming_a_huge_embedding_is_refused_before_allocating(tmp_path):
    """The config inside a checkpoint goes through the same checks before any tensor is built."""
    import json

    import torch

    from unibct_ray.checkpoint import build_backbone_from_checkpoint, save_checkpoint
    from unibct_ray.config import TrainConfig, to_dict

    cfg = to_dict(TrainConfig())
    cfg["model"]["embedding_size"] = 10**12
    path = tmp_path / "big.pt"
    save_checkpoint(path, {"config": json.dumps(cfg), "model": {"w": torch.zeros(1)}, "epoch": 1})
    with pytest.raises(ConfigError, match="model.embedding_size: must be an integer in 1..8192"):
        build_backbone_from_checkpoint(path)


def test_bad_override_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        apply_overrides({}, ["optim.lr"])
    with pytest.raises(ConfigError, match="nope.yaml: config file not found"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize("refine,epochs,expected", [
    ((10, 20), 35, (10, 20)),   # in range: unchanged
    ((10, 20), 20, (10,)),      # 20 is the last epoch: nothing left to train on its prototypes
    ((10, 20), 15, (10,)),
    ((10, 20), 8, (4,)),        # none left: once, after 8 // 2
    ((3, 6, 9), 7, (3, 6)),
    ((2, 6), 3, (2,)),
    ((2, 6), 2, (1,)),          # 2 // 2
    ((6,), 3, (1,)),            # 3 // 2
    ((), 5, ()),                # nothing to clamp (validation refuses it for unibct)
])
def test_clamp_refine_epochs(refine, epochs, expected):
    assert clamp_refine_epochs(refine, epochs) == expected


UNIBCT = "name: x\noptim:\n  epochs: 12\ncompat:\n  method: unibct\n  old_checkpoint: o.pt\n  refine_epochs: [2, 6]\n"


def test_shorter_run_clamps_refine_epochs_with_one_note(tmp_path):
    p = write(tmp_path, UNIBCT)
    notes: list[str] = []
    cfg = load_config(p, ["optim.epochs=2"], note=notes.append)
    assert (cfg.optim.epochs, cfg.compat.refine_epochs) == (2, (1,))
    assert notes == ["train.yaml (with --set): compat.refine_epochs [2, 6] -> [1] (optim.epochs is 2; "
                     "a refinement must come before the last epoch)"]
    notes.clear()
    assert load_config(p, ["optim.epochs=5"], note=notes.append).compat.refine_epochs == (2,)
    assert len(notes) == 1 and "[2, 6] -> [2]" in notes[0]
    notes.clear()
    assert load_config(p, note=notes.append).compat.refine_epochs == (2, 6) and notes == []  # in range: silent
    # only unibct refines: another method keeps the key as written, without a note
    cfg = load_config(p, ["compat.method=l2", "optim.epochs=2"], note=notes.append)
    assert cfg.compat.refine_epochs == (2, 6) and notes == []
    # a run too short for any refinement is still refused, and nothing is clamped first
    with pytest.raises(ConfigError, match="optim.epochs: method 'unibct' needs at least 2 epochs"):
        load_config(p, ["optim.epochs=1"], note=notes.append)
    assert notes == []


def test_method_keys_have_the_published_defaults_and_are_checked():
    from unibct_ray.config import METHODS

    assert {"nccl", "advbct", "mixbct"} <= set(METHODS)
    c = TrainConfig().compat
    assert (c.nccl_alpha, c.nccl_beta, c.nccl_queue, c.nccl_temperature) == (1.0, 0.01, 8192, 1.0)
    assert (c.advbct_threshold, c.advbct_p2s_weight, c.advbct_adv_weight, c.advbct_hidden) == (0.4, 4.0, 4.0, 100)
    assert (c.mixbct_ratio, c.mixbct_credible) == (0.3, 0.9)
    base = {"num_workers": 2, "global_batch": 64}
    nccl = from_dict({**base, "compat": {"method": "nccl", "old_checkpoint": "o.pt", "nccl_queue": 64}})
    assert not nccl.head_parallel  # its logit term needs all C logits on every rank
    assert from_dict({**base, "compat": {"method": "mixbct", "old_checkpoint": "o.pt"}}).head_parallel
    for compat, needle in [
        ({"method": "nccl", "nccl_queue": 32}, "compat.nccl_queue: must hold at least one global batch (64)"),
        ({"method": "mixbct", "mixbct_credible": 0}, "compat.mixbct_credible: must be a finite number in (0, 1]"),
        ({"method": "mixbct", "mixbct_ratio": 1.5}, "compat.mixbct_ratio"),
        ({"method": "advbct", "advbct_hidden": 0}, "compat.advbct_hidden: must be an integer"),
        ({"method": "advbct", "advbct_p2s_weight": -1}, "compat.advbct_p2s_weight"),
        ({"method": "nccl", "nccl_temperature": 0}, "compat.nccl_temperature"),
    ]:
        with pytest.raises(ConfigError, match=None) as e:
            from_dict({**base, "compat": {"old_checkpoint": "o.pt", **compat}})
        assert needle in str(e.value), (compat, str(e.value))
    with pytest.raises(ConfigError, match="head.parallel: compat.method nccl needs"):
        from_dict({**base, "head": {"parallel": True}, "compat": {"method": "nccl", "old_checkpoint": "o.pt"}})
