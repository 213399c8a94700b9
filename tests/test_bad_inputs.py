"""Every user input, broken on purpose, through the real CLI: one line, exit 2, nothing written.

Each case builds a bad input under ``tmp_path/in``, runs ``unibct-ray`` in process and checks:
exit status 2; stderr is exactly one line ``unibct-ray: error: ...`` that names the file (or
config key) and the problem; no traceback; nothing appears besides ``in/`` (no output, no
hidden partial directory); every input file keeps its bytes and its mtime.

The table "Bad input" of docs/reliability.md is generated from ``CASES`` (``python
tests/test_bad_inputs.py`` prints it) and a test keeps the two in step.
"""

from __future__ import annotations

import hashlib
import io
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from unibct_ray.cli import main

ROOT = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- bad-inputs:begin -->", "<!-- bad-inputs:end -->"


# ----------------------------------------------------------------------------- input builders
def jpeg(seed: int, size: int = 32) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def make_rec(d: Path, images: list[tuple[int, bytes]] | None = None) -> Path:
    from unibct_ray.data.ms1m import write_ms1m

    images = images or [(c, jpeg(10 * c + j)) for c, n in enumerate([3, 2, 4]) for j in range(n)]
    write_ms1m(d / "train.rec", images)
    return d / "train.rec"


def make_shards(d: Path, rows: int = 12, classes: int = 3) -> Path:
    """A valid shard set ``d/shards`` written with the project's own writer."""
    from unibct_ray.data.shards import SHARD_SCHEMA, write_manifest, write_shard

    out = d / "shards"
    out.mkdir(parents=True)
    labels = np.repeat(np.arange(classes), rows // classes)
    table = pa.table({"image": [jpeg(i) for i in range(len(labels))], "label": labels,
                      "index": np.arange(1, len(labels) + 1)}, schema=SHARD_SCHEMA)
    info = write_shard(out / "part-00000.parquet", table)
    write_manifest(out, [info], rows=len(labels), classes=classes, columns=["image", "label", "index"])
    return out


# Tiny IJB-C: 6 subjects, G1 = subjects 0-2 (templates 1-3), G2 = 3-5 (templates 4-6), one probe
# template per subject (11-16); one image per template, media = template.
N_IJBC = 12


def make_ijbc(d: Path, images: bool = True) -> Path:
    from unibct_ray.data import ijbc, ijbc_writers

    root = d / "ijbc"
    meta = root / "IJBC" / "meta"
    templates = np.r_[np.arange(1, 7), np.arange(11, 17)]
    names = [f"{t}.jpg" for t in templates]
    ref = np.array([[38.29, 51.70], [73.53, 51.50], [56.03, 71.74], [41.55, 92.37], [70.73, 92.20]]) * 32 / 112
    ijbc_writers.write_tid_mid(meta / ijbc.TID_MID_FILE, names, templates, templates)
    ijbc_writers.write_5pts_score(meta / ijbc.NAME_5PTS_FILE, names, np.repeat(ref[None], N_IJBC, 0).astype(np.float32),
                          np.ones(N_IJBC, np.float32))
    pairs = np.array([[t, t + 10] for t in range(1, 7)] + [[1, 12], [2, 13], [3, 14], [4, 15]])
    ijbc_writers.write_pair_label(meta / ijbc.PAIR_LABEL_FILE, pairs, np.r_[np.ones(6), np.zeros(4)].astype(int))
    ijbc_writers.write_1n_csv(meta / ijbc.GALLERY1_FILE, np.arange(1, 4), np.arange(3), names[:3])
    ijbc_writers.write_1n_csv(meta / ijbc.GALLERY2_FILE, np.arange(4, 7), np.arange(3, 6), names[3:6])
    ijbc_writers.write_1n_csv(meta / ijbc.PROBE_FILE, np.arange(11, 17), np.arange(6), names[6:])
    crops = root / "IJBC" / "loose_crop"
    crops.mkdir(parents=True)
    if images:
        for i, n in enumerate(names):
            (crops / n).write_bytes(jpeg(100 + i))
    return root


def features(d: Path, name: str, arr: np.ndarray | None = None, dim: int = 8, seed: int = 0) -> Path:
    arr = np.random.default_rng(seed).standard_normal((N_IJBC, dim)).astype(np.float32) if arr is None else arr
    np.save(d / name, arr, allow_pickle=True)
    return d / name


def make_checkpoint(d: Path, name: str, *, dim: int = 16, backbone: str = "tiny", claim: str | None = None) -> Path:
    """A real (untrained) checkpoint; ``claim`` stores another backbone name in its config."""
    import torch

    from unibct_ray.checkpoint import save_checkpoint
    from unibct_ray.config import from_dict, to_dict
    from unibct_ray.models.iresnet import build_backbone

    torch.manual_seed(0)
    model = build_backbone(backbone, dim, 32)
    cfg = from_dict({"model": {"backbone": claim or backbone, "embedding_size": dim}, "data": {"image_size": 32}})
    return save_checkpoint(d / name, {"config": json.dumps(to_dict(cfg)), "epoch": 1, "step": 1,
                                      "model": model.state_dict()})


class Hostile:
    """Unpickling this runs ``open(MARKER, 'w')``: a stand-in for arbitrary code."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def write_config(d: Path, text: str, name: str = "train.yaml") -> Path:
    (d / name).write_text(text)
    return d / name


# ----------------------------------------------------------------------------- the cases
@dataclass(frozen=True)
class Case:
    id: str
    input: str                      # README column "input"
    tried: str                      # README column "what was tried"
    build: Callable[[Path], list[str]]   # (input dir) -> CLI argv; outputs go to OUT
    says: str                       # README column "what happens" (a real message, paths shortened)
    needles: tuple[str, ...]        # must appear in the printed line (all are in `says` too)

    @property
    def command(self) -> str:
        """The subcommand, from the id's prefix."""
        prefix = self.id.split("-")[0]
        return {"rec": "data convert", "idx": "data convert", "shards": "data split", "proto": "prototypes",
                "ijbc": "eval", "feat": "eval", "ckpt": "eval"}.get(prefix, "train")


OUT = "__OUT__"


def convert(rec: Path, *extra: str) -> list[str]:
    return ["data", "convert", "--rec", str(rec), "--out", OUT, "--no-progress", *extra]


def split(src: Path) -> list[str]:
    return ["data", "split", "--src", str(src), "--scenario", "open-class", "--out", OUT, "--no-progress"]


def train(cfg: Path, *extra: str) -> list[str]:
    return ["train", "--config", str(cfg), *extra]


def ev(root: Path, *extra: str) -> list[str]:
    return ["eval", "--ijbc", str(root), "--out", OUT, "--bootstrap", "0", "--shards", "1", "--actors", "1", *extra]


def protos(d: Path, *extra: str) -> list[str]:
    return ["prototypes", "--old-features", str(d / "o.npy"), "--new-features", str(d / "n.npy"),
            "--labels", str(d / "l.npy"), "--out", OUT, *extra]


def _garbage_rec(d):
    rec = make_rec(d)
    rec.write_bytes(np.random.default_rng(1).integers(0, 256, rec.stat().st_size, dtype=np.uint8).tobytes())
    return convert(rec)


def _truncated_rec(d):
    rec = make_rec(d)
    rec.write_bytes(rec.read_bytes()[: rec.stat().st_size // 2])
    return convert(rec)


def _idx_past_end(d):
    rec = make_rec(d)
    idx = rec.with_suffix(".idx")
    lines = idx.read_text().splitlines()
    lines[3] = lines[3].split("\t")[0] + "\t999999999"
    idx.write_text("\n".join(lines) + "\n")
    return convert(rec)


def _idx_garbage(d):
    rec = make_rec(d)
    rec.with_suffix(".idx").write_text("0\t0\n1\tabc\n")
    return convert(rec)


def _idx_missing(d):
    rec = make_rec(d)
    rec.with_suffix(".idx").unlink()
    return convert(rec)


def _record_too_long(d):
    from unibct_ray.data.recordio import read_idx

    rec = make_rec(d)
    data = bytearray(rec.read_bytes())
    keys, offsets = read_idx(rec.with_suffix(".idx"))
    off = int(offsets[keys == 5][0])
    data[off + 4: off + 8] = len(data).to_bytes(4, "little")  # a chunk longer than the file
    rec.write_bytes(bytes(data))
    return convert(rec)


def _undecodable_image(d):
    rec = make_rec(d, [(0, jpeg(1)), (0, b"\xff\xd8\xff\xe0" + b"\x00" * 40), (1, jpeg(2))])
    return convert(rec, "--verify", "header")


def _shards_labels(values):
    """A shard set whose Parquet label column is replaced by ``values`` (same row count)."""
    def build(d):
        import pyarrow.parquet as pq

        src = make_shards(d)
        f = src / "part-00000.parquet"
        t = pq.read_table(f)
        col = pa.array(values(t.num_rows))
        pq.write_table(t.set_column(t.schema.get_field_index("label"), "label", col), f)
        return split(src)
    return build


def _shards_empty(d):
    (d / "shards").mkdir()
    return split(d / "shards")


def _shards_no_label_column(d):
    src = make_shards(d)
    m = json.loads((src / "manifest.json").read_text())
    m["columns"] = ["image", "index"]
    (src / "manifest.json").write_text(json.dumps(m))
    return split(src)


def _shard_file_lacks_column(d):
    src = make_shards(d)
    f = src / "part-00000.parquet"
    pq.write_table(pq.read_table(f).drop(["label"]), f)
    return split(src)


def _shard_file_missing(d):
    src = make_shards(d)
    (src / "part-00000.parquet").unlink()
    return split(src)


def _manifest_not_json(d):
    src = make_shards(d)
    (src / "manifest.json").write_text("{rows: 12")
    return split(src)


def _train_shards_empty(d):
    (d / "shards").mkdir()
    return train(write_config(d, f"data:\n  train: {d / 'shards'}\nstorage: {d.parent / 'out'}\n"))


def _config(text: str) -> Callable[[Path], list[str]]:
    def build(d: Path) -> list[str]:
        return train(write_config(d, text))
    return build


def _config_missing(d):
    return train(d / "nope.yaml")


def _bad_override(d):
    return train(write_config(d, "name: x\n"), "--set", "optim.lr")


def _ijbc_meta_missing(d):
    from unibct_ray.data import ijbc, ijbc_writers

    root = make_ijbc(d, images=False)
    (root / "IJBC" / "meta" / ijbc.PAIR_LABEL_FILE).unlink()
    return ev(root, "--old-features", str(features(d, "old.npy")))


def _ijbc_rows_mismatch(d):
    from unibct_ray.data import ijbc, ijbc_writers

    root = make_ijbc(d, images=False)
    p = root / "IJBC" / "meta" / ijbc.NAME_5PTS_FILE
    p.write_text("".join(p.read_text().splitlines(keepends=True)[:-1]))
    return ev(root, "--old-features", str(features(d, "old.npy")))


def _ijbc_not_a_root(d):
    (d / "photos").mkdir()
    return ev(d / "photos", "--old-features", str(features(d, "old.npy")))


def _ijbc_image_missing(d):
    root = make_ijbc(d)
    (root / "IJBC" / "loose_crop" / "13.jpg").unlink()
    return ev(root, "--old-checkpoint", str(make_checkpoint(d, "old.pt")))


def _ijbc_image_undecodable(d):
    root = make_ijbc(d)
    (root / "IJBC" / "loose_crop" / "13.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return ev(root, "--old-checkpoint", str(make_checkpoint(d, "old.pt")))


def _feat(mutate: Callable[[np.ndarray], np.ndarray]) -> Callable[[Path], list[str]]:
    def build(d: Path) -> list[str]:
        root = make_ijbc(d, images=False)
        good = np.random.default_rng(0).standard_normal((N_IJBC, 8)).astype(np.float32)
        return ev(root, "--old-features", str(features(d, "old.npy", good)),
                  "--new-features", str(features(d, "new.npy", mutate(good))))
    return build


def _feat_text(d):
    root = make_ijbc(d, images=False)
    (d / "new.npy").write_text("0.1 0.2 0.3\n")
    return ev(root, "--old-features", str(features(d, "old.npy")), "--new-features", str(d / "new.npy"))


def _feat_pickled(d):
    root = make_ijbc(d, images=False)
    arr = np.empty(N_IJBC, dtype=object)
    arr[:] = [Hostile(d / "pwned") for _ in range(N_IJBC)]
    return ev(root, "--old-features", str(features(d, "old.npy")), "--new-features", str(features(d, "new.npy", arr)))


def _distractors_short(d):
    root = make_ijbc(d, images=False)
    return ev(root, "--old-features", str(features(d, "old.npy")), "--distractors", "50",
              "--distractor-features", str(features(d, "dis.npy")))


def _eval_flag(*flag: str):
    def build(d):
        root = make_ijbc(d, images=False)
        argv = ev(root, "--old-features", str(features(d, "old.npy")))
        for name, value in zip(flag[::2], flag[1::2]):  # the flag given last wins in argparse
            argv += [name, value]
        return argv
    return build


def _proto_inputs(d: Path, *, old=None, new=None, labels=None) -> None:
    rng = np.random.default_rng(0)
    o = rng.standard_normal((20, 8)).astype(np.float32)
    np.save(d / "o.npy", o if old is None else old)
    np.save(d / "n.npy", o + 0.1 if new is None else new)
    np.save(d / "l.npy", np.repeat(np.arange(4), 5) if labels is None else labels)


def _proto_labels_short(d):
    _proto_inputs(d, labels=np.repeat(np.arange(4), 5)[:-1])
    return protos(d)


def _proto_inf(d):
    new = np.ones((20, 8), np.float32)
    new[7, 3] = np.inf
    _proto_inputs(d, new=new)
    return protos(d)


def _proto_float_labels(d):
    _proto_inputs(d, labels=np.repeat(np.arange(4), 5).astype(np.float32))
    return protos(d)


def _ckpt_wrong_arch(d):
    root = make_ijbc(d)
    return ev(root, "--old-checkpoint", str(make_checkpoint(d, "old.pt", backbone="tiny", claim="r18")))


def _ckpt_dim_mismatch(d):
    root = make_ijbc(d)
    return ev(root, "--old-checkpoint", str(make_checkpoint(d, "old.pt", dim=16)),
              "--new-checkpoint", str(make_checkpoint(d, "new.pt", dim=32)))


def _ckpt_garbage(d):
    root = make_ijbc(d)
    (d / "old.pt").write_bytes(np.random.default_rng(0).bytes(4096))
    return ev(root, "--old-checkpoint", str(d / "old.pt"))


def _ckpt_truncated(d):
    root = make_ijbc(d)
    p = make_checkpoint(d, "old.pt")
    p.write_bytes(p.read_bytes()[:2000])
    return ev(root, "--old-checkpoint", str(p))


def _ckpt_foreign(d):
    import torch

    from unibct_ray.models.iresnet import build_backbone

    root = make_ijbc(d)
    torch.save(build_backbone("tiny", 16, 32).state_dict(), d / "old.pt")  # weights only, no config
    return ev(root, "--old-checkpoint", str(d / "old.pt"))


def _ckpt_hostile(d):
    import torch

    root = make_ijbc(d)
    torch.save({"format": "unibct-ray/checkpoint", "model": Hostile(d / "pwned")}, d / "old.pt")
    return ev(root, "--old-checkpoint", str(d / "old.pt"))


def _train_old(d: Path, old: Path | None) -> list[str]:
    """A unibct config (32-d tiny model) on a valid shard set, old model ``old``."""
    src = make_shards(d)
    old_path = old or d / "old.pt"
    return train(write_config(d, f"data:\n  train: {src}\n  image_size: 32\nmodel:\n  backbone: tiny\n"
                                 f"  embedding_size: 32\nglobal_batch: 4\nnum_workers: 1\n"
                                 f"storage: {d.parent / 'out'}\ncompat:\n  method: unibct\n"
                                 f"  old_checkpoint: {old_path}\n  refine_epochs: [1]\noptim:\n  epochs: 2\n"))


def _train_old_dim(d):
    return _train_old(d, make_checkpoint(d, "old.pt", dim=16))


def _train_old_missing(d):
    return _train_old(d, None)


def _train_old_hostile(d):
    import torch

    torch.save({"format": "unibct-ray/checkpoint", "model": Hostile(d / "pwned")}, d / "old.pt")
    return _train_old(d, d / "old.pt")


def _resume_nothing(d):
    (d / "run").mkdir()
    return train(write_config(d, "name: x\n"), "--resume", str(d / "run"))


CASES = [
    Case("rec-garbage", "`.rec`", "random bytes in place of the records", _garbage_rec,
         "`train.rec: record at offset 11676 (key 0): no RecordIO magic at byte 11676 (found 0x...); not a .rec file or a wrong offset`", ("train.rec", "key 0", "no RecordIO magic")),
    Case("rec-truncated", "`.rec`", "file cut in half", _truncated_rec,
         "`train.idx:6: key 6 has offset 6424 past the end of .../train.rec (5858 bytes)`",
         ("train.idx:6", "past the end of", "train.rec (5858 bytes)")),
    Case("rec-record-too-long", "`.rec`", "a record header claims more bytes than the file has", _record_too_long,
         "`train.rec: record at offset 5144 (key 5): file truncated (chunk of 11716 bytes at 5144 ends past 11716)`",
         ("train.rec", "key 5", "truncated")),
    Case("rec-undecodable", "`.rec`", "an image record with a JPEG signature and garbage after it (`--verify header`)",
         _undecodable_image, "`train.rec key 2: image does not decode (not a recognised image format)`", ("train.rec", "key 2", "does not decode")),
    Case("idx-past-end", "`.idx`", "an offset past the end of the `.rec`", _idx_past_end,
         "`train.idx:4: key 4 has offset 999999999 past the end of .../train.rec (11716 bytes)`",
         ("train.idx:4", "past the end of", "train.rec (11716 bytes)")),
    Case("idx-garbage", "`.idx`", "a line that is not `key<TAB>offset`", _idx_garbage,
         "`train.idx:2: key and offset must be integers, got b'1\\tabc'`", ("train.idx:2", "must be integers")),
    Case("idx-missing", "`.idx`", "no `.idx` beside the `.rec`", _idx_missing,
         "`train.idx: index file not found`", ("train.idx", "not found")),
    Case("shards-string-labels", "shard folder", "a Parquet `label` column of strings", _shards_labels(lambda n: [f"id{i}" for i in range(n)]),
         "`shards/part-00000.parquet: column 'label' holds string, expected integers`", ("part-00000.parquet", "'label'", "expected integers")),
    Case("shards-huge-label", "shard folder", "a label of 2**40 (per-class arrays would take terabytes)", _shards_labels(lambda n: [0] * (n - 1) + [2**40]),
         "`shards/part-00000.parquet: row 11 has label 1099511627776, outside 0..1048576 (12 rows)`", ("part-00000.parquet", "row 11", "outside 0..1048576")),
    Case("shards-negative-label", "shard folder", "a label of -5", _shards_labels(lambda n: [-5] + [0] * (n - 1)),
         "`shards/part-00000.parquet: row 0 has label -5, outside 0..1048576 (12 rows)`", ("part-00000.parquet", "row 0", "label -5")),
    Case("shards-empty", "shard folder", "an empty folder", _shards_empty,
         "`shards/manifest.json: not found (empty directory?)`", ("manifest.json", "not found")),
    Case("shards-no-label", "shard folder", "manifest without the `label` column", _shards_no_label_column,
         "`shards/manifest.json: shard columns lack ['label'] (have ['image', 'index'])`", ("manifest.json", "lack ['label']")),
    Case("shards-file-lacks-column", "shard folder", "a Parquet file without the `label` column",
         _shard_file_lacks_column, "`shards/part-00000.parquet: missing column(s) ['label'] (has ['image', 'index'])`",
         ("part-00000.parquet", "missing column(s) ['label']")),
    Case("shards-file-missing", "shard folder", "a shard listed in the manifest is gone", _shard_file_missing,
         "`shards/part-00000.parquet: shard listed in manifest.json is missing`",
         ("part-00000.parquet", "is missing")),
    Case("shards-manifest-garbage", "shard folder", "`manifest.json` is not JSON", _manifest_not_json,
         "`shards/manifest.json: not a valid shard manifest (JSONDecodeError: Expecting property name ...)`",
         ("manifest.json", "not a valid shard manifest")),
    Case("train-shards-empty", "shard folder", "`train` on an empty `data.train` folder", _train_shards_empty,
         "`shards/manifest.json: not found (empty directory?)`", ("manifest.json", "not found")),
    Case("config-unknown-key", "config", "a misspelt key (`optim.lrr`)", _config("optim:\n  lrr: 0.1\n"),
         "`train.yaml: optim.lrr: unknown key (valid here: base_batch, clip_grad_norm, epochs, lr, ...)`", ("train.yaml", "optim.lrr: unknown key")),
    Case("config-wrong-type", "config", "`optim.lr: fast`", _config("optim:\n  lr: fast\n"),
         "`train.yaml: optim.lr: expected a number, got 'fast'`", ("train.yaml", "optim.lr: expected a number")),
    Case("config-impossible", "config", "`global_batch: 10` with `num_workers: 3`",
         _config("global_batch: 10\nnum_workers: 3\n"),
         "`train.yaml: global_batch: 10 is not divisible by num_workers=3`",
         ("train.yaml", "global_batch: 10 is not divisible")),
    Case("config-refine-epoch", "config", "a UniBCT refinement epoch 0 (before any training)",
         _config("optim:\n  epochs: 5\ncompat:\n  method: unibct\n  old_checkpoint: o.pt\n  refine_epochs: [0]\n"),
         "`train.yaml: compat.refine_epochs: every epoch must be in 1..4 (refinement needs a trained new model)`",
         ("train.yaml", "compat.refine_epochs")),
    Case("config-not-yaml", "config", "unbalanced YAML", _config("a: [\n"),
         "`train.yaml: not valid YAML (while parsing a flow node)`", ("train.yaml", "not valid YAML")),
    Case("config-missing", "config", "a config path that does not exist", _config_missing,
         "`nope.yaml: config file not found`", ("nope.yaml", "not found")),
    Case("config-bad-override", "config", "`--set optim.lr` without a value", _bad_override,
         "`--set: 'optim.lr': expected KEY=VALUE, e.g. optim.lr=0.05`", ("--set", "expected KEY=VALUE")),
    Case("ijbc-meta-missing", "IJB-C folder", "`ijbc_template_pair_label.txt` deleted", _ijbc_meta_missing,
         "`ijbc/IJBC/meta/ijbc_template_pair_label.txt: IJB-C meta file not found`",
         ("ijbc_template_pair_label.txt", "not found")),
    Case("ijbc-rows-mismatch", "IJB-C folder", "`ijbc_name_5pts_score.txt` one row short of `ijbc_face_tid_mid.txt`",
         _ijbc_rows_mismatch, "`row count mismatch: .../ijbc_name_5pts_score.txt has 11 rows but .../ijbc_face_tid_mid.txt has 12 (first differing line 12; ...)`",
         ("ijbc_name_5pts_score.txt", "ijbc_face_tid_mid.txt")),
    Case("ijbc-not-root", "IJB-C folder", "a folder without `IJBC/meta`", _ijbc_not_a_root,
         "`photos is not an IJB-C root: expected the directory photos/IJBC/meta (...) or photos/meta (...)`",
         ("photos", "not an IJB-C root")),
    Case("ijbc-image-missing", "IJB-C folder", "an image listed in the meta is gone", _ijbc_image_missing,
         "`ijbc/IJBC/loose_crop/13.jpg: image listed in ijbc_name_5pts_score.txt is missing`",
         ("13.jpg", "is missing")),
    Case("ijbc-image-undecodable", "IJB-C folder", "an image that does not decode (found by the extraction actors)",
         _ijbc_image_undecodable, "`ijbc/IJBC/loose_crop/13.jpg: image does not decode (Truncated File Read)`",
         ("13.jpg", "does not decode")),
    Case("feat-rows", "feature file", "one row short", _feat(lambda a: a[:-1]),
         "`new.npy: 11 rows, but the IJB-C meta lists 12 images (rows must follow ijbc_name_5pts_score.txt)`", ("new.npy", "11 rows, but")),
    Case("feat-dim", "feature file", "dimension 4 against 8 for the old model", _feat(lambda a: a[:, :4]),
         "`new.npy: embedding size 4 differs from old.npy (8); a cross-model test needs one embedding space`", ("new.npy", "embedding size 4 differs")),
    Case("feat-nan", "feature file", "a NaN in row 3", _feat(lambda a: np.where(np.arange(len(a))[:, None] == 3, np.nan, a).astype(np.float32)),
         "`new.npy: new features row 3 holds NaN/inf`", ("new.npy", "row 3 holds NaN/inf")),
    Case("feat-inf", "feature file", "an inf in row 5", _feat(lambda a: np.where(np.arange(len(a))[:, None] == 5, np.inf, a).astype(np.float32)),
         "`new.npy: new features row 5 holds NaN/inf`", ("new.npy", "row 5 holds NaN/inf")),
    Case("feat-dtype", "feature file", "float64", _feat(lambda a: a.astype(np.float64)),
         "`new.npy: new features must be float32 or float16, got float64`", ("new.npy", "float32 or float16")),
    Case("feat-text", "feature file", "a text file named `.npy`", _feat_text,
         "`new.npy: not a .npy array (no .npy header; the file is refused, not unpickled)`", ("new.npy", "not a .npy array")),
    Case("feat-pickle", "feature file", "an object array whose unpickling would write a file", _feat_pickled,
         "`new.npy: refused to load: the array holds Python objects (a pickle, which could run code); only numeric .npy arrays are read`",
         ("new.npy", "refused to load", "Python objects")),
    Case("feat-distractors", "feature file", "`--distractors 50` with 12 distractor rows", _distractors_short,
         "`dis.npy: distractor features has 12 rows, at least 50 are needed`", ("dis.npy", "at least 50")),
    Case("flag-far-high", "flag", "`--criterion-far 7` (a FAR is a rate)", _eval_flag("--criterion-far", "7"),
         "`--criterion-far: must be in (0, 1), got 7.0`", ("--criterion-far", "(0, 1)")),
    Case("flag-far-negative", "flag", "`--criterion-far -1`", _eval_flag("--criterion-far", "-1"),
         "`--criterion-far: must be in (0, 1), got -1.0`", ("--criterion-far", "got -1.0")),
    Case("flag-bootstrap", "flag", "`--bootstrap -5`", _eval_flag("--bootstrap", "-5"),
         "`--bootstrap: must be in [0, 1e+06], got -5`", ("--bootstrap", "got -5")),
    Case("flag-distractors", "flag", "`--distractors -10`", _eval_flag("--distractors", "-10"),
         "`--distractors: must be >= 0, got -10`", ("--distractors", "got -10")),
    Case("flag-actors", "flag", "`--actors -4`", _eval_flag("--actors", "-4"),
         "`--actors: must be in [1, 100000], got -4`", ("--actors", "got -4")),
    Case("proto-labels", "feature file", "`prototypes`: one label fewer than feature rows", _proto_labels_short,
         "`l.npy: 19 labels for 20 feature rows in o.npy`", ("l.npy", "19 labels for 20")),
    Case("proto-inf", "feature file", "`prototypes`: an inf in the new features", _proto_inf,
         "`n.npy: new features holds NaN/inf (first at row 7)`", ("n.npy", "NaN/inf")),
    Case("proto-label-dtype", "feature file", "`prototypes`: float labels", _proto_float_labels,
         "`l.npy: labels must be integers, got float32`", ("l.npy", "must be integers")),
    Case("ckpt-arch", "checkpoint", "weights of a `tiny` net whose config says `r18`", _ckpt_wrong_arch,
         '`old.pt: weights do not fit a r18 backbone (Missing key(s) in state_dict: "layer1.1.bn1.weight", ...)`', ("old.pt", "do not fit a r18 backbone")),
    Case("ckpt-dim", "checkpoint", "cross test of a 16-d old and a 32-d new model", _ckpt_dim_mismatch,
         "`new.pt: embedding size 32 differs from old.pt (16); a cross-model test needs one embedding space`",
         ("new.pt", "embedding size 32 differs", "old.pt")),
    Case("ckpt-garbage", "checkpoint", "random bytes", _ckpt_garbage,
         "`old.pt: not a readable PyTorch checkpoint (WeightsUnpickler error: Unsupported operand ...)`", ("old.pt", "not a readable PyTorch checkpoint")),
    Case("ckpt-truncated", "checkpoint", "cut after 2,000 bytes", _ckpt_truncated,
         "`old.pt: not a readable PyTorch checkpoint (PytorchStreamReader failed reading zip archive: failed finding central directory)`", ("old.pt", "not a readable PyTorch checkpoint")),
    Case("ckpt-foreign", "checkpoint", "a plain PyTorch `state_dict`", _ckpt_foreign,
         "`old.pt: not a unibct-ray checkpoint (no 'unibct-ray/checkpoint' format tag)`",
         ("old.pt", "not a unibct-ray checkpoint")),
    Case("ckpt-hostile", "checkpoint", "a pickle whose loading would write a file", _ckpt_hostile,
         "`old.pt: refused to load: the file holds objects other than tensors and plain data, which could run code (GLOBAL io.open)`",
         ("old.pt", "refused to load")),
    Case("train-old-dim", "checkpoint", "`train` (unibct, 32-d) with a 16-d `compat.old_checkpoint`", _train_old_dim,
         "`old.pt: embedding size 16 differs from model.embedding_size 32; compat.method 'unibct' needs one embedding space`",
         ("old.pt", "embedding size 16 differs from model.embedding_size 32")),
    Case("train-old-missing", "checkpoint", "`train` with a `compat.old_checkpoint` that does not exist",
         _train_old_missing, "`old.pt: checkpoint not found`", ("old.pt", "checkpoint not found")),
    Case("train-old-hostile", "checkpoint", "`train` with a hostile pickle as `compat.old_checkpoint`",
         _train_old_hostile,
         "`old.pt: refused to load: the file holds objects other than tensors and plain data, which could run code (GLOBAL io.open)`",
         ("old.pt", "refused to load")),
    Case("resume-empty", "checkpoint", "`train --resume` on a run folder without checkpoints", _resume_nothing,
         "`run: no checkpoint to resume from`", ("run", "no checkpoint to resume from")),
]


# ----------------------------------------------------------------------------- checks
def snapshot(d: Path) -> dict[str, tuple[str, int]]:
    """{relative path: (sha256, mtime_ns)} of every file under ``d``."""
    out = {}
    for p in sorted(d.rglob("*")):
        if p.is_file():
            out[str(p.relative_to(d))] = (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
    return out


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, tmp_path, capsys, ray_session):
    assert all(n in case.says for n in case.needles), "the README text must show what the test checks"
    inputs = tmp_path / "in"
    inputs.mkdir()
    out = tmp_path / "out"
    argv = [str(out) if a == OUT else a.replace(OUT, str(out)) for a in case.build(inputs)]
    before = snapshot(inputs)
    capsys.readouterr()
    code = main(argv)
    stdout, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2, (code, err)
    assert len(lines) == 1 and lines[0].startswith("unibct-ray: error: "), err
    assert "Traceback" not in err + stdout
    for needle in case.needles:
        assert needle in lines[0], (needle, lines[0])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"], "no output, no partial directory"
    assert snapshot(inputs) == before, "inputs must stay untouched"
    assert not (inputs / "pwned").exists()


def test_debug_shows_the_traceback(tmp_path, ray_session):
    (tmp_path / "train.yaml").write_text("optim:\n  lrr: 0.1\n")
    from unibct_ray.errors import ConfigError

    with pytest.raises(ConfigError, match="optim.lrr"):
        main(["--debug", "train", "--config", str(tmp_path / "train.yaml")])


# ----------------------------------------------------------------------------- the docs' table
def readme_table() -> str:
    rows = ["| input | what was tried | command | what happens: exit 2, stderr is `unibct-ray: error: ` and |",
            "|---|---|---|---|"]
    rows += [f"| {c.input} | {c.tried} | `{c.command}` | {c.says} |" for c in CASES]
    return "\n".join(rows)


def test_readme_table_is_current():
    text = (ROOT / "docs" / "reliability.md").read_text()
    assert BEGIN in text and END in text, "docs/reliability.md lacks the bad-input table markers"
    current = text.split(BEGIN, 1)[1].split(END, 1)[0].strip()
    assert current == readme_table(), "docs/reliability.md table is stale: run `python tests/test_bad_inputs.py`"


if __name__ == "__main__":
    sys.stdout.write(readme_table() + "\n")
