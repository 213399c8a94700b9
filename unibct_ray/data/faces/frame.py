"""The render frame: output pixels mapped into canonical coordinates, colours and blending."""

from __future__ import annotations

import math

import numpy as np

from .geometry import _Geometry
from .records import DEBUG_DOT_COLOR, Identity, Nuisance, _FAR, _MID

__all__ = []

try:  # the clip ufunc itself: np.clip's Python wrapper costs more than the work on a window
    from numpy._core.umath import clip as _uclip  # numpy >= 2
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core.umath import clip as _uclip  # type: ignore[no-redef]

_NOISE_TABLE_LEN = 1 << 20
_noise_table: np.ndarray | None = None

__all__ = []


def _noise(seed: int, n: int) -> np.ndarray:
    """n standard-normal float32 values for ``seed`` (a window of a fixed table).

    Drawing fresh Gaussians costs more than rendering a 48 px face, so read a window of a
    fixed 4 MB table at a seed-dependent offset, with a seed-dependent sign.
    """
    global _noise_table
    if n > _NOISE_TABLE_LEN // 2:
        return np.random.default_rng(seed).standard_normal(n, dtype=np.float32)
    if _noise_table is None:
        _noise_table = np.random.default_rng(0x5EED).standard_normal(_NOISE_TABLE_LEN, dtype=np.float32)
    off = (seed >> 1) % (_NOISE_TABLE_LEN - n)
    win = _noise_table[off:off + n]
    return -win if seed & 1 else win


def _col(rgb) -> np.ndarray:
    """RGB triple -> float32 [3, 1, 1], ready to broadcast against channel-first images."""
    return np.asarray(rgb, dtype=np.float32).reshape(3, 1, 1)


_SCLERA = _col((228.0, 222.0, 216.0))
_PUPIL = _col((10.0, 8.0, 8.0))
_LASH = _col((30.0, 22.0, 20.0))
_BLUSH = _col((30.0, -14.0, -10.0))
_DOT = _col(DEBUG_DOT_COLOR)


def _blend(dst: np.ndarray, m: np.ndarray, color: np.ndarray) -> None:
    """In place ``dst += m * (color - dst)``: dst [3, h, w], m [h, w], color [3, 1, 1]/[3, h, w]."""
    t = color - dst
    t *= m
    dst += t


_Window = tuple[slice, slice]


class _Frame(_Geometry):
    """Per-render canonical coordinates of the output pixels (float32 arrays).

    Full canvas [w, w]: ``X, Y`` (the similarity transform undone: canonical frame, no
    pose) and ``Xw, Yw`` (also the pose undone: the frontal-face point a pixel shows;
    ``_FAR`` off the front of the head). Head window ``hwin`` only, in the jaw-normalised
    coordinates of :class:`_Geometry`: ``u0, v0, zp`` (the pixel lifted onto the unit
    sphere, view space), ``rr = u0^2 + v0^2`` (< 1 inside the head outline) and ``u, v, z``
    (the same sphere point with the pose undone; z < 0 on the back of the head).
    """

    def __init__(self, identity: Identity, nuisance: Nuisance, size: int) -> None:
        super().__init__(identity, nuisance, size)
        self.identity, self.nuisance = identity, nuisance
        w, k, c, s = self.w, self.k, self.c, self.s
        # Blur is rendered analytically by widening every edge ramp (module docstring).
        self.blur = nuisance.blur_sigma  # canonical units
        ramp_px = math.sqrt(1.0 + 2.0 * math.pi * (nuisance.blur_sigma * k) ** 2)
        self.ramp = ramp_px / k  # ramp width, canonical units
        self.inv_ramp = k / ramp_px
        # Inverse similarity p = R^T (q - t) / S + 56 is affine in the pixel grid: build it
        # from a row and a column with one broadcast add.
        px = np.arange(w, dtype=np.float64)
        dx, dy = (px - self.tx) / k, (px - self.ty) / k
        self.X = (c * dx + _MID).astype(np.float32)[None, :] + (s * dy).astype(np.float32)[:, None]
        self.Y = (-s * dx).astype(np.float32)[None, :] + (c * dy + _MID).astype(np.float32)[:, None]
        # Everything about the head is computed in its bounding window only (a loose crop's
        # head covers a third of the canvas).
        hwin = self.window(self.hcx, self.hcy, max(self.ax, self.ay) + 1.0, posed=False)
        self.hwin = hwin if hwin is not None else (slice(0, 1), slice(0, 1))
        Xh, Yh = self.X[self.hwin], self.Y[self.hwin]
        jaw = self.jaw
        v0 = (Yh - self.hcy) * (1.0 / self.ay)
        u0 = (Xh - self.hcx) * (1.0 / self.ax)
        xr = np.maximum(v0, 0.0)  # jaw factor 1 - jaw * max(v, 0)^2, see _jaw_factor
        xr *= xr
        xr *= -jaw
        xr += 1.0
        np.maximum(xr, 0.05, out=xr)
        u0 /= xr
        rr = u0 * u0
        rr += v0 * v0  # < 1 inside the head outline
        zp = 1.0 - rr
        np.maximum(zp, 0.0, out=zp)
        np.sqrt(zp, out=zp)
        self.u0, self.v0, self.zp, self.rr = u0, v0, zp, rr
        if abs(nuisance.yaw_deg) < 1e-9 and abs(nuisance.pitch_deg) < 1e-9:
            u, v, z = u0, v0, zp
            xr1 = xr
        else:  # frontal (u, v, z) = R^T (u0, v0, zp)
            (a0, a1, a2), (b0, b1, b2), (c0, c1, c2) = self.r
            u = a0 * u0 + b0 * v0
            u += c0 * zp
            v = a1 * u0 + b1 * v0
            v += c1 * zp
            z = a2 * u0 + b2 * v0
            z += c2 * zp
            xr1 = np.maximum(v, 0.0)
            xr1 *= xr1
            xr1 *= -jaw
            xr1 += 1.0
            np.maximum(xr1, 0.05, out=xr1)
        self.u, self.v, self.z = u, v, z
        # Off the silhouette, or on the back of the head, a pixel shows no front feature;
        # send those far away so feature painters leave them alone.
        off = rr >= 1.0
        off |= z < -0.02
        self.Xw = np.full((w, w), _FAR, dtype=np.float32)
        self.Yw = np.full((w, w), _FAR, dtype=np.float32)
        xf = u * xr1
        xf *= self.ax
        xf += self.hcx
        yf = v * self.ay
        yf += self.hcy
        # Unmasked frontal coordinates (head window): continuous across the outline, for
        # what must blend smoothly there (skin pattern, hair).
        self.xf, self.yf = xf, yf
        self.Xw[self.hwin] = xf
        self.Yw[self.hwin] = yf
        self.Xw[self.hwin][off] = _FAR
        self.Yw[self.hwin][off] = _FAR

    # -- coverage helpers ---------------------------------------------------------------

    def cover(self, d: np.ndarray, amp: float = 1.0) -> np.ndarray:
        """amp x coverage in [0, 1] of a shape with signed distance ``d`` (canonical, < 0 in)."""
        out = d * -self.inv_ramp
        out += 0.5
        _uclip(out, 0.0, 1.0, out=out)
        if amp != 1.0:
            out *= amp
        return out

    def thin(self, half: float) -> float:
        """Peak-contrast factor of a band of half-width ``half`` under the edge ramp.

        A band narrower than the ramp reaches 0.5 + half/ramp with :meth:`cover` but only
        2*half/ramp after a box filter of the ramp's width; rescale so thin lines fade (at
        small sizes or under blur) instead of staying half-strength.
        """
        return min(1.0, 4.0 * half / (self.ramp + 2.0 * half))

    def soft(self, sigma: float) -> tuple[float, float]:
        """(sigma', amplitude factor) of a 1-D Gaussian bump of std ``sigma`` after the blur."""
        s2 = math.sqrt(sigma * sigma + self.blur * self.blur)
        return s2, sigma / s2

    # -- windows -----------------------------------------------------------------------

    def window(self, x: float, y: float, radius: float, *, posed: bool = True) -> _Window | None:
        """Output-pixel window holding the canonical disc (x, y, radius); posed = on the face."""
        if posed:
            # The pose warp is smooth and (yaw acting on x, pitch on y) nearly axis-aligned:
            # bound the posed disc by the canonical box of its posed axis points, then take
            # that box's circumscribed disc. (Inlined _posed_point: this runs ~15x a render.)
            hcx, hcy, ax, ay, jaw = self.hcx, self.hcy, self.ax, self.ay, self.jaw
            (r00, r01, r02), (r10, r11, r12), _ = self.r
            x0 = y0 = math.inf
            x1 = y1 = -math.inf
            for px, py in ((x + radius, y), (x - radius, y), (x, y + radius), (x, y - radius)):
                v = (py - hcy) / ay
                u = (px - hcx) / (ax * max(0.05, 1.0 - jaw * max(v, 0.0) ** 2))
                z = math.sqrt(max(0.0, 1.0 - u * u - v * v))
                u1 = r00 * u + r01 * v + r02 * z
                v1 = r10 * u + r11 * v + r12 * z
                qx = hcx + ax * max(0.05, 1.0 - jaw * max(v1, 0.0) ** 2) * u1
                qy = hcy + ay * v1
                x0, x1, y0, y1 = min(x0, qx), max(x1, qx), min(y0, qy), max(y1, qy)
            x, y = 0.5 * (x0 + x1), 0.5 * (y0 + y1)
            radius = 0.5 * math.hypot(x1 - x0, y1 - y0) * 1.05
        dx, dy = x - _MID, y - _MID
        ox = self.k * (self.c * dx - self.s * dy) + self.tx
        oy = self.k * (self.s * dx + self.c * dy) + self.ty
        r = radius * self.k + 1.5 + self.ramp * self.k
        i0, i1 = max(0, int(ox - r)), min(self.w, int(ox + r) + 2)
        j0, j1 = max(0, int(oy - r)), min(self.w, int(oy + r) + 2)
        if i0 >= i1 or j0 >= j1:
            return None
        return slice(j0, j1), slice(i0, i1)

    def pair_window(self, lx: float, ly: float, rx: float, ry: float, radius: float) -> _Window | None:
        """One window holding two front-face discs (a left and a right feature)."""
        a = self.window(lx, ly, radius)
        b = self.window(rx, ry, radius)
        if a is None or b is None:
            return a or b
        return (slice(min(a[0].start, b[0].start), max(a[0].stop, b[0].stop)),
                slice(min(a[1].start, b[1].start), max(a[1].stop, b[1].stop)))
