"""The training ingest on a Ray whose object store is smaller than the shard set: Ray spills
blocks to disk and restores them, and every row still arrives once, intact.

Runs ``spill_run.py`` in its own process with its own Ray (75 MiB object store, spilling to a
folder of this test). The set: 768 rows of 224 px noise BMPs (uncompressed: ~110 MiB of
Parquet) in 6 shards, cached in the object store by ``training_dataset`` and decoded to uint8.
Spilling is shown by Ray's spill folder (the ``object_spilling_config`` directory): the helper
records the most files and bytes it held while the rows were read.
The reference is the Parquet files read with pyarrow and decoded with PIL in this process.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from unibct_ray.data.shards import SHARD_SCHEMA, shard_name, write_manifest, write_shard

HELPER = Path(__file__).with_name("spill_run.py")
ROOT = Path(__file__).resolve().parents[2]
ROWS, SHARDS, SIZE, CLASSES = 768, 6, 224, 50


def noise_shards(out: Path) -> int:
    """-> total Parquet bytes."""
    rng = np.random.default_rng(0)
    out.mkdir()
    infos, per = [], ROWS // SHARDS
    for s in range(SHARDS):
        images = []
        for _ in range(per):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), np.uint8)).save(buf, format="BMP")
            images.append(buf.getvalue())
        index = np.arange(s * per, (s + 1) * per) + 1
        table = pa.table({"image": images, "label": (index - 1) % CLASSES, "index": index}, schema=SHARD_SCHEMA)
        infos.append(write_shard(out / shard_name(s), table))
    write_manifest(out, infos, rows=ROWS, classes=CLASSES, columns=list(SHARD_SCHEMA.names))
    return sum(i.bytes for i in infos)


@pytest.mark.slow
def test_ingest_through_a_spilling_object_store_delivers_every_row_intact(tmp_path):
    total = noise_shards(tmp_path / "shards")
    assert total > 1.4 * (75 << 20)  # the set cannot sit in the object store
    spill = tmp_path / "spill"
    ray_tmp = tempfile.mkdtemp(prefix="rsp", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_TMPDIR=ray_tmp, RAY_USAGE_STATS_ENABLED="0", RAY_DATA_DISABLE_PROGRESS_BARS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]))
    try:
        proc = subprocess.run([sys.executable, str(HELPER), str(tmp_path / "shards"), str(SIZE), str(spill),
                               str(tmp_path / "out.json")], env=env, capture_output=True, text=True, timeout=300)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = json.loads((tmp_path / "out.json").read_text())
    print(f"\nParquet {total / 2**20:.0f} MiB through a 75 MiB object store: up to {got['spill_files']} spilled "
          f"files, {got['spilled_bytes'] / 2**20:.0f} MiB")
    assert got["spill_files"] > 0 and got["spilled_bytes"] > 10 << 20, got

    want = {}
    for f in sorted((tmp_path / "shards").glob("*.parquet")):
        t = pq.read_table(f)
        for idx, label, buf in zip(t["index"].to_pylist(), t["label"].to_pylist(), t["image"].to_pylist()):
            img = np.asarray(Image.open(io.BytesIO(buf)).convert("RGB")).transpose(2, 0, 1)
            want[str(idx)] = [label, hashlib.sha1(np.ascontiguousarray(img).tobytes()).hexdigest()]
    assert len(want) == ROWS and got["rows"] == want
