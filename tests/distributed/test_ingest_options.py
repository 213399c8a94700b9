"""The training ingest's Ray Data options: what a run asks for, without deprecated settings."""

from __future__ import annotations

import warnings

import pytest


@pytest.mark.parametrize("reproducible", [True, False])
def test_ingest_keeps_order_and_uses_no_deprecated_option(reproducible):
    import ray.data
    from ray.util.annotations import RayDeprecationWarning

    from unibct_ray.distributed.train import _ingest_config

    ctx = ray.data.DataContext.get_current().execution_options
    with warnings.catch_warnings():
        warnings.simplefilter("error", RayDeprecationWarning)  # Ray 2.60 warns on exclude_resources
        cfg = _ingest_config(reproducible)
    opts = cfg._get_user_execution_options("train")
    assert opts.preserve_order is True
    assert opts.resource_limits == ctx.resource_limits
    assert opts.exclude_resources.cpu == 0 and opts.exclude_resources.gpu == 0
    assert cfg._enable_shard_locality is (not reproducible)
