"""Read a shard set through the training ingest on a Ray whose object store is smaller than the set.

Started by ``test_spilling.py`` in its own process with its own Ray (an object store of 75 MiB,
Ray's minimum, and spilling to a folder of the test's), so the test session's Ray is untouched:

    python spill_run.py SHARDS IMAGE_SIZE SPILL_DIR OUT.json

The set is cached in the object store (``training_dataset`` with a ``cache_bytes`` above its size)
and read back through the decode; OUT.json holds, per row index, the label and the SHA-1 of the
decoded uint8 image, and the largest number of files and bytes seen in Ray's spill folder while
the rows were read (``memory_summary`` would say it too, but needs ``ray[default]``'s grpc).
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import ray

STORE_BYTES = 75 << 20


def spilled_files(spill_dir: str) -> list[int]:
    """Sizes of the files in Ray's spill folder now (Ray deletes them as objects are freed)."""
    sizes = []
    for p in Path(spill_dir).rglob("*"):
        try:
            if p.is_file():
                sizes.append(p.stat().st_size)
        except FileNotFoundError:
            pass
    return sizes


def main(shards: str, image_size: str, spill_dir: str, out: str) -> int:
    spilling = {"type": "filesystem", "params": {"directory_path": spill_dir}}
    ray.init(num_cpus=4, object_store_memory=STORE_BYTES, include_dashboard=False, log_to_driver=False,
             _system_config={"object_spilling_config": json.dumps(spilling)})
    try:
        from unibct_ray.distributed.data import training_dataset

        ds = training_dataset(shards, int(image_size), flip=False, cache_bytes=1 << 30, shuffle_blocks=False)
        rows, files, spilled = {}, 0, 0
        for batch in ds.iter_batches(batch_size=256, batch_format="numpy"):
            for idx, label, img in zip(batch["index"], batch["label"], batch["image"]):
                rows[int(idx)] = [int(label), hashlib.sha1(img.tobytes()).hexdigest()]
            now = spilled_files(spill_dir)
            files, spilled = max(files, len(now)), max(spilled, sum(now))
    finally:
        ray.shutdown()
    Path(out).write_text(json.dumps({"rows": rows, "spill_files": files, "spilled_bytes": spilled}))
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
