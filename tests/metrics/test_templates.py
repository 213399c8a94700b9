"""Template pooling against a per-template loop (the protocol written out)."""

from __future__ import annotations

import numpy as np
import pytest

from unibct_ray.metrics import templates as tm
from unibct_ray.metrics.templates import image_features, pool_templates, template_rows


def loop_pool(feats, templates, medias):
    """Reference: for each template, np.where; for each media, mean; sum; L2-normalise."""
    ids = np.unique(templates)
    out = np.zeros((ids.size, feats.shape[1]))
    for i, t in enumerate(ids):
        rows = np.where(templates == t)[0]
        total = np.zeros(feats.shape[1])
        for m in np.unique(medias[rows]):
            sel = rows[medias[rows] == m]
            total += feats[sel].astype(np.float64).mean(0)
        norm = np.linalg.norm(total)
        out[i] = total / norm if norm > 0 else total
    return ids, out


@pytest.fixture()
def data():
    rng = np.random.default_rng(3)
    n, d = 300, 16
    templates = rng.choice([7, 19, 23, 1000, 4242, 90001, 5], size=n)  # non-contiguous ids
    medias = rng.integers(0, 12, size=n)  # shared media ids across templates on purpose
    # multi-frame media: many rows share (template, media)
    medias[:40] = 3
    templates[:40] = 19
    perm = rng.permutation(n)  # images not grouped by template
    templates, medias = templates[perm], medias[perm]
    emb = rng.standard_normal((n, d)).astype(np.float32) * 10
    flip = rng.standard_normal((n, d)).astype(np.float32) * 10
    scores = rng.uniform(0.0, 1.0, n).astype(np.float32)
    scores[::7] = 1e-3  # low detector scores
    return emb, flip, scores, templates, medias


def test_image_features_sum_flip_times_score(data):
    emb, flip, scores, _, _ = data
    emb0, flip0 = emb.copy(), flip.copy()
    out = image_features(emb, flip, scores)
    np.testing.assert_allclose(out, (emb + flip) * scores[:, None], rtol=1e-6)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(emb, emb0)  # inputs untouched
    np.testing.assert_array_equal(flip, flip0)
    np.testing.assert_allclose(image_features(emb, None, scores), emb * scores[:, None], rtol=1e-6)
    np.testing.assert_allclose(image_features(emb, flip, scores, use_flip=False),
                               emb * scores[:, None], rtol=1e-6)
    np.testing.assert_allclose(image_features(emb, flip, scores, use_score=False), emb + flip)
    with pytest.raises(ValueError, match="emb_flip shape"):
        image_features(emb, flip[:-1])
    with pytest.raises(ValueError, match="scores must be"):
        image_features(emb, flip, scores[:-1])


def test_pool_matches_loop(data):
    emb, flip, scores, templates, medias = data
    feats = image_features(emb, flip, scores)
    ids, pooled = pool_templates(feats, templates, medias)
    ref_ids, ref = loop_pool(feats, templates, medias)
    np.testing.assert_array_equal(ids, ref_ids)
    assert pooled.dtype == np.float32 and ids.dtype == np.int64
    np.testing.assert_allclose(pooled, ref, atol=2e-6)
    np.testing.assert_allclose(np.linalg.norm(pooled, axis=1), 1.0, atol=1e-5)


def test_pool_chunk_boundaries_and_grouped_order(data, monkeypatch):
    """float16 storage is widened chunk by chunk: templates straddling chunks, images in
    any order (gathered chunks) and grouped by template (sliced chunks)."""
    emb, flip, scores, templates, medias = data
    feats = image_features(emb, flip, scores).astype(np.float16)
    ref_ids, ref = loop_pool(feats, templates, medias)
    monkeypatch.setattr(tm, "_POOL_CHUNK_ROWS", 7)  # templates straddle many chunks
    ids, pooled = pool_templates(feats, templates, medias)
    assert pooled.dtype == np.float32
    np.testing.assert_allclose(pooled, ref, atol=2e-6)
    order = np.lexsort((medias, templates))  # grouped file order takes the slice path
    ids2, pooled2 = pool_templates(feats[order], templates[order], medias[order])
    np.testing.assert_array_equal(ids2, ref_ids)
    np.testing.assert_allclose(pooled2, ref, atol=2e-6)


def test_pool_float64_features(data):
    emb, flip, scores, templates, medias = data
    feats = image_features(emb, flip, scores).astype(np.float64)
    ref_ids, ref = loop_pool(feats, templates, medias)
    ids, pooled = pool_templates(feats, templates, medias)
    np.testing.assert_array_equal(ids, ref_ids)
    assert pooled.dtype == np.float32
    np.testing.assert_allclose(pooled, ref, atol=2e-7)


def test_image_weights_equal_scaled_features(data):
    emb, flip, scores, templates, medias = data
    a = pool_templates(image_features(emb, flip, scores), templates, medias)[1]
    b = pool_templates(image_features(emb, flip, None), templates, medias, image_weights=scores)[1]
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_media_mean_not_frame_sum():
    # one template: a 4-frame video along e0 and a still along e1 -> equal weight
    feats = np.array([[1, 0], [1, 0], [1, 0], [1, 0], [0, 1]], np.float32)
    ids, pooled = pool_templates(feats, np.full(5, 9), np.array([1, 1, 1, 1, 2]))
    np.testing.assert_allclose(pooled[0], [2 ** -0.5, 2 ** -0.5], rtol=1e-6)
    # the same media id in another template is another group
    ids, pooled = pool_templates(feats, np.array([9, 9, 9, 8, 8]), np.array([1, 1, 1, 1, 2]))
    np.testing.assert_array_equal(ids, [8, 9])
    np.testing.assert_allclose(pooled[1], [1, 0])


def test_zero_template_stays_zero_and_single_image():
    feats = np.array([[1.0, 2.0], [3.0, 4.0]], np.float32)
    ids, pooled = pool_templates(feats, np.array([1, 2]), np.array([1, 1]), np.array([0.0, 1.0]))
    np.testing.assert_array_equal(pooled[0], [0, 0])
    np.testing.assert_allclose(pooled[1], [0.6, 0.8], rtol=1e-6)
    ids, pooled = pool_templates(np.zeros((0, 3), np.float32), np.zeros(0, int), np.zeros(0, int))
    assert ids.shape == (0,) and pooled.shape == (0, 3)


def test_shape_errors():
    with pytest.raises(ValueError, match="templates must be"):
        pool_templates(np.zeros((3, 2)), np.zeros(2), np.zeros(3))
    with pytest.raises(ValueError, match="features must be"):
        pool_templates(np.zeros(3), np.zeros(3), np.zeros(3))


def test_template_rows_lookup_and_error():
    ids = np.array([5, 7, 19, 90001])
    np.testing.assert_array_equal(template_rows(ids, np.array([[19, 5], [90001, 7]])), [[2, 0], [3, 1]])
    big = np.array([5, 7, 10**12])  # sparse huge ids take the binary-search path
    np.testing.assert_array_equal(template_rows(big, np.array([10**12, 5])), [2, 0])
    for table in (ids, big):
        with pytest.raises(ValueError, match=r"pairs\[:, 1\]: template 6 .*no images"):
            template_rows(table, np.array([5, 6, 7]), "pairs[:, 1]")
    with pytest.raises(ValueError, match="template -3"):
        template_rows(ids, np.array([-3]))
    # int32 ids (the meta cache's pairs) resolve as they are, to the same rows and errors
    wanted = np.array([[19, 5], [90001, 7]])
    for table in (ids, big[:2]):
        w = wanted if table is ids else np.array([[7, 5]])
        np.testing.assert_array_equal(template_rows(table, w.astype(np.int32)), template_rows(table, w))
    with pytest.raises(ValueError, match="template -3"):
        template_rows(ids, np.array([5, -3], np.int32))
    with pytest.raises(ValueError, match="template 6 "):
        template_rows(big, np.array([5, 6], np.int32))
