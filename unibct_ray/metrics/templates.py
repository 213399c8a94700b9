"""Image features and IJB-C template pooling (ARCHITECTURE §6).

Image feature = emb(img) + emb(flipped img), not normalised, times the detector score.
Template feature = L2-normalise( sum over the template's media of (mean of that media's
image features) ): a video contributes one averaged vector however many frames it has, so
long videos do not outweigh stills. A media id is local to its template (the same media id
in two templates forms two groups).
"""

from __future__ import annotations

import numpy as np
from scipy import sparse

__all__ = ["image_features", "pool_templates", "template_rows"]

# Rows widened per pooling step for float16 storage: 32k x 512 x 4 B = 64 MiB.
_POOL_CHUNK_ROWS = 1 << 15


def image_features(
    emb: np.ndarray,
    emb_flip: np.ndarray | None = None,
    scores: np.ndarray | None = None,
    use_flip: bool = True,
    use_score: bool = True,
) -> np.ndarray:
    """Per-image features before pooling.

    Args:
        emb: [n, d] embeddings of the aligned crops (not normalised). Precomputed ``.npy``
            features are already ``emb + emb_flip``: pass them here with ``emb_flip=None``.
        emb_flip: [n, d] embeddings of the horizontally flipped crops, or None.
        scores: [n] detector scores, or None.
        use_flip: add ``emb_flip`` (ignored when it is None).
        use_score: multiply by ``scores`` (ignored when they are None).

    Returns:
        float32 [n, d] = (emb + emb_flip) * scores[:, None]; a new array (inputs untouched).
    """
    x = np.asarray(emb)
    if x.ndim != 2:
        raise ValueError(f"image_features: emb must be [n, d], got shape {x.shape}")
    out = x.astype(np.float32, copy=True)
    if use_flip and emb_flip is not None:
        f = np.asarray(emb_flip)
        if f.shape != x.shape:
            raise ValueError(
                f"image_features: emb_flip shape {f.shape} != emb shape {x.shape}"
            )
        out += f
    if use_score and scores is not None:
        s = np.asarray(scores)
        if s.shape != (x.shape[0],):
            raise ValueError(
                f"image_features: scores must be [{x.shape[0]}] (one per image), got {s.shape}"
            )
        out *= s.astype(np.float32)[:, None]
    return out


def _segment_matrix(seg_of_row: np.ndarray, weights: np.ndarray, cols: np.ndarray, n_seg: int,
                    n_cols: int) -> sparse.csr_matrix:
    """CSR [n_seg, n_cols] with ``weights[i]`` at (``seg_of_row[i]``, ``cols[i]``); the rows
    ``i`` are sorted by segment, so the matrix is built directly."""
    indptr = np.r_[0, np.cumsum(np.bincount(seg_of_row, minlength=n_seg))]
    return sparse.csr_matrix((weights, cols, indptr), shape=(n_seg, n_cols))


def pool_templates(
    features: np.ndarray,
    templates: np.ndarray,
    medias: np.ndarray,
    image_weights: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Pool image features into L2-normalised template features.

    template_feat[t] = normalise( sum_{media m of t} mean_{i in (t, m)} w_i * features[i] )

    Vectorised: one lexsort by (template, media); the media mean is folded into a per-row
    weight 1 / |media|, and per-template sums are one sparse [templates, images] product
    (float16 storage: over chunks of the sorted rows), accumulated in float32 (float64 for
    float64 features).

    Args:
        features: [n, d] image features (finite; see :func:`image_features`).
        templates: int [n] template id of each image (any ids, non-contiguous is fine).
        medias: int [n] media id of each image.
        image_weights: optional [n] per-image factor applied before pooling; passing the
            detector scores here equals ``image_features(..., scores)`` without an [n, d]
            copy of the features.

    Returns:
        (template_ids int64 [t] sorted unique, template_feats float32 [t, d]). A template
        whose pooled vector is exactly zero (e.g. all detector scores 0) stays zero instead
        of becoming NaN, as ``sklearn.preprocessing.normalize`` does.
    """
    feats = np.asarray(features)
    t_arr = np.asarray(templates)
    m_arr = np.asarray(medias)
    if feats.ndim != 2:
        raise ValueError(f"pool_templates: features must be [n, d], got shape {feats.shape}")
    n, d = feats.shape
    for name, arr in (("templates", t_arr), ("medias", m_arr)):
        if arr.shape != (n,):
            raise ValueError(
                f"pool_templates: {name} must be [{n}] (one per feature row), got {arr.shape}"
            )
    w_img = None
    if image_weights is not None:
        w_img = np.asarray(image_weights, np.float64)
        if w_img.shape != (n,):
            raise ValueError(
                f"pool_templates: image_weights must be [{n}], got {w_img.shape}"
            )
    if n == 0:
        return np.zeros(0, np.int64), np.zeros((0, d), np.float32)

    order = np.lexsort((m_arr, t_arr))
    t_s, m_s = t_arr[order], m_arr[order]
    new_t = np.empty(n, bool)
    new_t[0] = True
    np.not_equal(t_s[1:], t_s[:-1], out=new_t[1:])
    new_m = new_t.copy()
    new_m[1:] |= m_s[1:] != m_s[:-1]
    media_of_row = np.cumsum(new_m) - 1
    row_w = 1.0 / np.bincount(media_of_row)[media_of_row]  # mean within the media
    if w_img is not None:
        row_w *= w_img[order]
    tpl_of_row = np.cumsum(new_t) - 1
    template_ids = t_s[new_t].astype(np.int64)

    # float32 features sum in float32 (a template's few hundred rows lose ~1e-7 relative),
    # float64 ones in float64; other storage (float16) is widened chunk by chunk.
    ct = np.float64 if feats.dtype == np.float64 else np.float32
    w_row = row_w.astype(ct)
    if feats.dtype == ct:
        # Segment sums as one sparse [templates, images] x dense [images, d] product. The CSR
        # columns are the sorted order, so the rows are read in place (no gathered copy).
        # (np.add.reduceat over axis 0 was ~10x slower here.)
        acc = np.ascontiguousarray(_segment_matrix(tpl_of_row, w_row, order, template_ids.size, n) @ feats)
    else:
        acc = np.zeros((template_ids.size, d), ct)
        contiguous = bool(np.all(order[1:] > order[:-1]))  # file grouped by template: slices
        for lo in range(0, n, _POOL_CHUNK_ROWS):
            hi = min(lo + _POOL_CHUNK_ROWS, n)
            rows = feats[lo:hi] if contiguous else feats[order[lo:hi]]
            tpl = tpl_of_row[lo:hi]
            first, n_t = int(tpl[0]), int(tpl[-1] - tpl[0]) + 1
            seg = _segment_matrix(tpl - first, w_row[lo:hi], np.arange(hi - lo), n_t, hi - lo)
            acc[first : first + n_t] += seg @ rows.astype(ct)
    with np.errstate(invalid="ignore", over="ignore"):  # NaN/inf inputs: caller checks
        norms = np.sqrt(np.einsum("ij,ij->i", acc, acc))
        np.divide(acc, norms[:, None], out=acc, where=norms[:, None] > 0)
    return template_ids, acc.astype(np.float32, copy=False)


def template_rows(
    template_ids: np.ndarray, wanted: np.ndarray, what: str = "templates"
) -> np.ndarray:
    """Row of each wanted template id in the sorted unique ``template_ids``.

    Args:
        template_ids: int [t] sorted unique (as :func:`pool_templates` returns).
        wanted: int array of any shape.
        what: names ``wanted`` in the error message (e.g. "pairs[:, 0]").

    Returns:
        integer array (int32 when it fits) shaped like ``wanted``.

    Raises:
        ValueError: a wanted template has no images; the message names the first one.
    """
    ids = np.asarray(template_ids, np.int64)
    w = np.asarray(wanted)
    if w.dtype.kind != "i" or w.dtype.itemsize < 4:  # int32 (the meta cache's pairs) stays int32
        w = w.astype(np.int64)
    if ids.size == 0:
        if w.size:
            raise ValueError(f"{what}: template {int(w.flat[0])} has no images (no templates)")
        return np.zeros(w.shape, np.int64)
    lo, hi = int(ids[0]), int(ids[-1])
    if lo >= 0 and hi <= max(1 << 24, 8 * w.size):
        # Dense lookup table: O(1) per query; 15.7M pairs resolve in ~0.1 s instead of a
        # binary search each. int32 rows halve the memory traffic.
        lut = np.full(hi + 2, -1, np.int32 if ids.size < (1 << 31) else np.int64)
        lut[ids] = np.arange(ids.size)
        in_range = w.size == 0 or (int(w.min()) >= 0 and int(w.max()) <= hi)
        rows = lut[w] if in_range else lut[np.clip(w, -1, hi + 1)]
        bad = rows < 0
    else:
        rows = np.searchsorted(ids, w)
        rows_c = np.minimum(rows, ids.size - 1)
        bad = ids[rows_c] != w
        rows = rows_c
    if bad.any():
        pos = int(np.flatnonzero(bad.ravel())[0])
        n_bad = int(bad.sum())
        raise ValueError(
            f"{what}: template {int(w.flat[pos])} (entry {pos}) has no images in the "
            f"template/media list ({n_bad} entries refer to unknown templates)"
        )
    return rows
