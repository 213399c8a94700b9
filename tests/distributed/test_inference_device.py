"""Inference passes on their device: the CPU path gives the plain float32 forward pass, and on
a GPU share (``@pytest.mark.gpu``) the same UDFs agree with it to fp16 precision."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from unibct_ray.data import ijbc
from unibct_ray.data.shards import read_columns, read_manifest, shard_name, write_manifest, write_shard

SIZE, DIM, N = 32, 16, 40
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _checkpoint(d: Path) -> Path:
    from unibct_ray.checkpoint import save_checkpoint
    from unibct_ray.config import from_dict, to_dict
    from unibct_ray.models.iresnet import build_backbone

    torch.manual_seed(3)
    model = build_backbone("tiny", DIM, SIZE)
    cfg = from_dict({"model": {"backbone": "tiny", "embedding_size": DIM}, "data": {"image_size": SIZE}})
    return save_checkpoint(d / "model.pt", {"config": json.dumps(to_dict(cfg)), "epoch": 1, "step": 1,
                                            "model": model.state_dict()})


def _model(ckpt: Path) -> torch.nn.Module:
    from unibct_ray.checkpoint import build_backbone_from_checkpoint

    return build_backbone_from_checkpoint(ckpt)[0].eval()


def _pixels(i: int) -> np.ndarray:
    return np.random.default_rng(100 + i).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)


def _png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("infer")
    table = pa.table({"image": [_png(_pixels(i)) for i in range(N)],
                      "label": np.arange(N, dtype=np.int64) // 4, "index": np.arange(N, dtype=np.int64) + 500})
    (d / "shards").mkdir()
    infos = [write_shard(d / "shards" / shard_name(i), table.slice(s, 16)) for i, s in enumerate(range(0, N, 16))]
    write_manifest(d / "shards", infos, rows=N, classes=N // 4, columns=table.column_names)
    return d, _checkpoint(d)


def _reference_features(ckpt: Path) -> np.ndarray:
    """Plain float32 forward of every image (PIL pixels, (x - 127.5) / 127.5), row i = index 500 + i."""
    x = np.stack([_pixels(i) for i in range(N)]).astype(np.float32).transpose(0, 3, 1, 2)
    with torch.no_grad():
        return _model(ckpt)(torch.from_numpy((x - 127.5) / 127.5)).numpy()


def _extracted(out: Path) -> np.ndarray:
    from unibct_ray.distributed.data import FEATURE_COLUMN

    cols = read_columns(read_manifest(out), ["index", FEATURE_COLUMN])
    feats = np.stack(cols[FEATURE_COLUMN]).astype(np.float32) if cols[FEATURE_COLUMN].dtype == object \
        else cols[FEATURE_COLUMN]
    return feats[np.argsort(cols["index"])]


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    return (a64 * b64).sum(1) / np.linalg.norm(a64, axis=1) / np.linalg.norm(b64, axis=1)


def _extract(d: Path, ckpt: Path, name: str, gpus: float) -> np.ndarray:
    from unibct_ray.distributed.extract import extract_features

    extract_features(d / "shards", d / name, checkpoint=ckpt, actors=1, batch_size=16, gpus_per_actor=gpus,
                     cpus_per_actor=1.0, overwrite=True)
    return _extracted(d / name)


def test_extract_features_cpu_is_the_plain_forward(ray_session, inputs):
    d, ckpt = inputs
    np.testing.assert_allclose(_extract(d, ckpt, "cpu", 0.0), _reference_features(ckpt), rtol=1e-5, atol=1e-5)


def test_plan_pieces_cuts_files_into_about_four_pieces_per_actor():
    from unibct_ray.distributed.extract import PIECE_ROWS, plan_pieces

    # 17 rows, one actor: pieces of at most ceil(17 / 4) = 5 rows; an empty file gives none
    got = [(p.n, p.file, p.start, p.stop) for p in plan_pieces([Path("a"), Path("b"), Path("c")], [5, 0, 12], 1)]
    assert got == [(0, "a", 0, 5), (1, "c", 0, 4), (2, "c", 4, 8), (3, "c", 8, 12)]
    # a large set: pieces of at most PIECE_ROWS rows however few actors there are
    big = plan_pieces([Path("x")], [4 * PIECE_ROWS + 1], 1)
    assert len(big) == 5 and max(p.stop - p.start for p in big) <= PIECE_ROWS
    assert [(p.start, p.stop) for p in big][0][0] == 0 and big[-1].stop == 4 * PIECE_ROWS + 1
    assert all(a.stop == b.start for a, b in zip(big, big[1:]))


def test_extract_features_keeps_the_source_order_on_two_actors(ray_session, inputs, tmp_path):
    import pyarrow.parquet as pq

    from unibct_ray.distributed.extract import extract_features

    d, ckpt = inputs
    out = extract_features(d / "shards", tmp_path / "feats", checkpoint=ckpt, actors=2, batch_size=3,
                           keep_images=True)
    m = read_manifest(out, check_files=True)
    assert m.rows == N and len(m.files) > 2  # several pieces, so both actors had work
    order = np.concatenate([pq.read_table(f, columns=["index"]).column("index").to_numpy() for f in m.files])
    np.testing.assert_array_equal(order, np.arange(N) + 500)  # the source's row order
    images = np.concatenate([pq.read_table(f, columns=["image"]).column("image").to_numpy(zero_copy_only=False)
                             for f in m.files])
    assert [bytes(b) for b in images] == [_png(_pixels(i)) for i in range(N)]  # keep_images carries them
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []  # no temp files
    np.testing.assert_allclose(_extracted(out), _reference_features(ckpt), rtol=1e-5, atol=1e-5)


def test_extract_features_names_an_image_that_does_not_decode(ray_session, inputs, tmp_path):
    from unibct_ray.distributed.extract import extract_features
    from unibct_ray.errors import DataFormatError

    d, ckpt = inputs
    table = pa.table({"image": [_png(_pixels(0)), b"\x89PNG\r\n\x1a\n garbage", _png(_pixels(2))],
                      "label": np.array([0, 0, 1], np.int64), "index": np.array([7, 8, 9], np.int64)})
    (tmp_path / "bad").mkdir()
    write_manifest(tmp_path / "bad", [write_shard(tmp_path / "bad" / shard_name(0), table)], rows=3, classes=2,
                   columns=table.column_names)
    with pytest.raises(DataFormatError, match="image with index 8 does not decode") as err:
        extract_features(tmp_path / "bad", tmp_path / "feats", checkpoint=ckpt, actors=1, batch_size=2)
    assert type(err.value) is DataFormatError  # the user's error, not Ray's wrapper around it
    assert not (tmp_path / "feats").exists()  # nothing half-written


@pytest.mark.usefixtures("torch_one_thread")
def test_piece_embedder_with_and_without_prefetch_writes_the_same_file(inputs, tmp_path):
    """The GPU actors' read-ahead thread, run here on the CPU: the same rows, features and order."""
    import pyarrow.parquet as pq

    from unibct_ray.distributed.extract import Piece, PieceEmbedder

    d, ckpt = inputs
    src = str(read_manifest(d / "shards").files[0])  # 16 rows in one row group
    piece = Piece(7, src, 3, 14)
    tables = {}
    for prefetch in (False, True):
        actor = PieceEmbedder(4, prefetch=prefetch, checkpoint=str(ckpt), column="feature", keep_images=False)
        (tmp_path / str(prefetch)).mkdir()
        assert actor.run(piece, str(tmp_path / str(prefetch))) == (7, "part-00007.parquet", 11)
        tables[prefetch] = pq.read_table(tmp_path / str(prefetch) / "part-00007.parquet")
    assert tables[True].equals(tables[False])
    np.testing.assert_array_equal(tables[True].column("index").to_numpy(), np.arange(3, 14) + 500)
    feats = np.stack(tables[True].column("feature").to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(feats, _reference_features(ckpt)[3:14], rtol=1e-5, atol=1e-5)


def test_piece_batches_are_equal_cuts_across_row_groups(tmp_path):
    """A piece is cut into ceil(rows / batch) batches of nearly one size, read across row-group
    boundaries, in order, with nothing outside the piece."""
    import pyarrow.parquet as pq

    from unibct_ray.distributed.extract import Piece, PieceEmbedder

    path = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"index": np.arange(100, 150, dtype=np.int64)}), path, row_group_size=7)
    assert pq.ParquetFile(path).metadata.num_row_groups == 8
    actor = PieceEmbedder.__new__(PieceEmbedder)  # only the reader; no model
    for start, stop, batch in [(3, 40, 8), (0, 50, 64), (7, 14, 7), (5, 6, 4), (13, 45, 16), (0, 49, 10)]:
        actor.batch_size = batch
        got = [t.column("index").to_numpy() for t in actor._batches(Piece(0, str(path), start, stop))]
        rows = stop - start
        k = -(-rows // batch)  # as few batches as the batch size allows ...
        assert len(got) == k, (start, stop, batch)
        sizes = [len(g) for g in got]
        assert max(sizes) <= batch and max(sizes) - min(sizes) <= 1, sizes  # ... of one size, +-1
        np.testing.assert_array_equal(np.concatenate(got), np.arange(100 + start, 100 + stop))


def _ijbc_batch(d: Path) -> tuple[dict[str, np.ndarray], list[np.ndarray]]:
    """A few 64 px faces on disk with 5 points near the template (x2), and the images."""
    from unibct_ray.data.landmarks import template_for_size

    rng = np.random.default_rng(9)
    paths, lms, imgs = [], [], []
    for i in range(6):
        img = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
        Image.fromarray(img).save(d / f"face{i}.png")
        paths.append(str(d / f"face{i}.png"))
        lms.append((template_for_size(SIZE) * 2 + rng.normal(0, 1.5, (5, 2))).reshape(-1).astype(np.float32))
        imgs.append(img)
    return {"row": np.arange(6), "path": np.asarray(paths, dtype=object), "landmarks": np.stack(lms)}, imgs


def _align_reference(ckpt: Path, batch: dict, imgs: list[np.ndarray]) -> np.ndarray:
    from unibct_ray.data.landmarks import align_face

    crops = np.stack([align_face(im, lm.reshape(5, 2), SIZE) for im, lm in zip(imgs, batch["landmarks"])])
    x = torch.from_numpy((crops.astype(np.float32).transpose(0, 3, 1, 2) - 127.5) / 127.5)
    model = _model(ckpt)
    with torch.no_grad():
        return (model(x) + model(x.flip(3))).numpy()


@pytest.mark.usefixtures("torch_one_thread")
def test_align_embed_cpu_is_emb_plus_flip(inputs, tmp_path):
    from unibct_ray.distributed.evaluate import _AlignEmbed

    _, ckpt = inputs
    batch, imgs = _ijbc_batch(tmp_path)
    out = _AlignEmbed([str(ckpt), str(ckpt)], use_gpu=False)(batch)
    ref = _align_reference(ckpt, batch, imgs)
    assert out["error"].tolist() == [""] * 6
    for k in (0, 1):
        np.testing.assert_allclose(out[f"feature_{k}"], ref, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@gpu
def test_extract_features_on_a_gpu_share_matches_cpu(ray_session, inputs):
    d, ckpt = inputs
    got = _extract(d, ckpt, "gpu", 0.25)
    assert _cosine(got, _reference_features(ckpt)).min() > 0.999


@pytest.mark.gpu
@gpu
def test_align_embed_on_gpu_matches_cpu(inputs, tmp_path):
    from unibct_ray.distributed.evaluate import _AlignEmbed

    _, ckpt = inputs
    batch, imgs = _ijbc_batch(tmp_path)
    udf = _AlignEmbed([str(ckpt)], use_gpu=True)
    assert udf.embedder.on_gpu
    out = udf(batch)
    assert _cosine(out["feature_0"], _align_reference(ckpt, batch, imgs)).min() > 0.999


def _checkpoint_seeded(d: Path, name: str, seed: int) -> Path:
    from unibct_ray.checkpoint import save_checkpoint
    from unibct_ray.config import from_dict, to_dict
    from unibct_ray.models.iresnet import build_backbone

    torch.manual_seed(seed)
    model = build_backbone("tiny", DIM, SIZE)
    cfg = from_dict({"model": {"backbone": "tiny", "embedding_size": DIM}, "data": {"image_size": SIZE}})
    return save_checkpoint(d / name, {"config": json.dumps(to_dict(cfg)), "epoch": 1, "step": 1,
                                      "model": model.state_dict()})


@pytest.mark.slow
def test_checkpoint_distractors_embedded_by_each_model(ray_session, tmp_path, capsys):
    """Two checkpoints: the distractor faces are rendered once and each model embeds them; the
    old galleries get the old model's embeddings, self_new the new model's."""
    from unibct_ray.cli import main
    from unibct_ray.data.faces import render_aligned, sample_identity
    from unibct_ray.distributed.evaluate import _file_hash

    assert main(["data", "synth", "--out", str(tmp_path / "ijb"), "--identities", "1", "--images-per-identity", "1",
                 "--size", "32", "--eval-identities", "4", "--probes-per-identity", "1", "--impostor-pairs", "20",
                 "--no-progress"]) == 0
    old, new = _checkpoint_seeded(tmp_path, "old.pt", 1), _checkpoint_seeded(tmp_path, "new.pt", 2)
    out, n_d, seed = tmp_path / "r", 6, 3
    assert main(["eval", "--ijbc", str(tmp_path / "ijb"), "--old-checkpoint", str(old), "--new-checkpoint", str(new),
                 "--distractors", str(n_d), "--seed", str(seed), "--bootstrap", "0", "--shards", "1",
                 "--actors", "1", "--batch-size", "4", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    n_img = len(ijbc.read_ijbc_meta(tmp_path / "ijb").image_names)
    assert f"[eval] embedding {n_img} images with 2 checkpoints (aligned, emb + flip; one pass) on 1 actor (CPU)" \
        in printed
    assert f"[eval] embedded {n_img} images in " in printed and "[eval] distractors ready in " in printed
    faces = np.stack([render_aligned(sample_identity(seed, 2_000_000_000 + i), np.random.default_rng([seed, 99, i]),
                                     SIZE) for i in range(n_d)])
    x = torch.from_numpy((faces.astype(np.float32).transpose(0, 3, 1, 2) - 127.5) / 127.5)
    embedded = {}
    for ckpt in (old, new):
        model = _model(ckpt)
        with torch.no_grad():
            ref = (model(x) + model(x.flip(3))).numpy()
        embedded[ckpt] = np.load(out / "cache" / f"distractors-{_file_hash(ckpt)}-{seed}-{n_d}.npy")
        np.testing.assert_allclose(embedded[ckpt], ref, rtol=1e-5, atol=1e-5)
    assert not np.allclose(embedded[old], embedded[new], atol=1e-2)  # two spaces, two embeddings
    emb = json.loads((out / "report.json").read_text())["protocol"]["distractor_embeddings"]
    assert emb == {"self_old": f"old model ({old})", "cross": f"old model ({old})", "self_new": f"new model ({new})"}
    md = (out / "report.md").read_text()
    assert "- flip: emb(img) + emb(flipped img), embedded here from the checkpoint" in md and "precomputed" not in md


@pytest.mark.gpu
@gpu
def test_faiss_shards_on_gpu_shares_equal_brute_force(ray_session):
    from unibct_ray.distributed.knn import RayShardedKNN
    from unibct_ray.metrics.knn import brute_force_knn

    rng = np.random.default_rng(2)
    gal = rng.standard_normal((2000, 32)).astype(np.float32)
    qry = rng.standard_normal((50, 32)).astype(np.float32)
    knn = RayShardedKNN(shards=2, index="flat", gpus_per_shard=0.25)
    s, i = knn(gal, qry, 10)
    ref_s, ref_i = brute_force_knn(gal, qry, 10)
    np.testing.assert_array_equal(i, ref_i)
    np.testing.assert_allclose(s, ref_s, atol=1e-3)
    assert len(knn.devices) == 2 and "GPU each" in knn.description


def test_bench_extract_with_one_2_cpu_actor_gives_the_plain_loops_features(ray_session, tmp_path):
    # The actor path with one actor holding 2 CPUs (two torch threads in the actor) embeds every
    # row, and its features equal the plain one-process loop's (an independent reading of the
    # same Parquet files) by record index.
    from unibct_ray.bench.extract import bench_extract

    res = bench_extract(tmp_path, images=24, small_images=0, size=32, backbone="tiny", embedding_size=16,
                        batch=8, actors=1, cores=2, rows_per_shard=10, distinct=12, rounds=1, actor_cpus=2.0)
    assert res["actor_cpus"] == 2.0 and res["actors"] == 1
    assert res["same_features"], res["max_abs_diff"]
