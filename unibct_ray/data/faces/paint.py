"""The painters: background, body, head, ears, eyes, brows, nose, mouth, skin marks, occluders."""

from __future__ import annotations

import math

import numpy as np

from .frame import _BLUSH, _DOT, _Frame, _LASH, _PUPIL, _SCLERA, _Window, _blend, _col, _uclip
from .nuisance import _occluder_distance
from .records import _FAR

__all__ = []

def _paint_background(f: _Frame, img: np.ndarray) -> None:
    n = f.nuisance
    w = f.w
    bg = n.background
    a, b = _col(bg[0:3]), _col(bg[3:6])
    t1 = np.arange(w, dtype=np.float32) * (1.0 / max(w - 1, 1)) - 0.5
    t = (0.5 + math.cos(bg[6]) * t1)[None, :] + (math.sin(bg[6]) * t1)[:, None]
    np.multiply(t, b - a, out=img)
    img += a
    grid = np.arange(w, dtype=np.float32) * (1.0 / w)
    inv_ramp = w / (f.ramp * f.k)  # the edge ramp in canvas-fraction units
    for kind, cx, cy, rx, ry, ang, cr, cg, cb, alpha in n.clutter:
        r = max(rx, ry) * w + 2
        x0, x1 = max(0, int(cx * w - r)), min(w, int(cx * w + r) + 2)
        y0, y1 = max(0, int(cy * w - r)), min(w, int(cy * w + r) + 2)
        if x0 >= x1 or y0 >= y1:
            continue
        gx = grid[x0:x1] - cx
        gy = grid[y0:y1] - cy
        ca, sa = math.cos(ang), math.sin(ang)
        # Rotated local coordinates are affine in the grid: one broadcast add each.
        lx = (ca * gx)[None, :] + (sa * gy)[:, None]
        ly = (-sa * gx)[None, :] + (ca * gy)[:, None]
        if kind == 0:  # ellipse
            lx *= 1.0 / rx
            ly *= 1.0 / ry
            d = lx * lx
            d += ly * ly
            np.sqrt(d, out=d)
            d -= 1.0
            d *= min(rx, ry)
        elif kind == 1:  # rectangle
            d = np.maximum(np.abs(lx) - rx, np.abs(ly) - ry)
        else:  # blinds / shelves: stripes inside a rectangle
            stripes = np.cos(lx * (40.0 / max(rx, 0.05)))
            stripes -= 0.2
            stripes *= 0.2 * rx / 40.0
            d = np.maximum(np.maximum(np.abs(lx) - rx, np.abs(ly) - ry), stripes)
        d *= -inv_ramp
        d += 0.5
        _uclip(d, 0.0, alpha, out=d)
        _blend(img[:, y0:y1, x0:x1], d, _col((cr, cg, cb)))

__all__ = []


def _paint_body(f: _Frame, img: np.ndarray, skin: np.ndarray) -> None:
    """Shoulders, neck and the hair outside the head outline (canonical frame, no pose)."""
    i = f.identity
    hcx, hcy, ax, ay = f.hcx, f.hcy, f.ax, f.ay
    # Shoulders / clothing: a wide ellipse well below the chin.
    sh_cy, sh_rx, sh_ry = hcy + ay + 52.0, 2.3 * ax, 42.0
    win = f.window(hcx, sh_cy, sh_rx, posed=False)
    if win is not None:
        x = (f.X[win] - hcx) * (1.0 / sh_rx)
        y = (f.Y[win] - sh_cy) * (1.0 / sh_ry)
        d = x * x
        d += y * y
        np.sqrt(d, out=d)
        d -= 1.0
        d *= sh_ry
        _blend(img[:, win[0], win[1]], f.cover(d), _col(f.nuisance.clothing))
    # Neck: a band under the head, in the head's shadow, down into the shoulders.
    top, bot = hcy + 0.3 * ay, hcy + ay + 16.0
    win = f.window(hcx, 0.5 * (top + bot), max(i.neck_width, 0.5 * (bot - top)) + 1.0, posed=False)
    if win is not None:
        d = np.maximum(np.abs(f.X[win] - hcx) - i.neck_width, top - f.Y[win])
        _blend(img[:, win[0], win[1]], f.cover(d), skin * 0.72)
    # Hair volume around the head: an ellipse above the head centre, straight sides below.
    side, top_v, bottom = i.hair[6], i.hair[7], i.hair[8]
    if side > 0.0 or top_v > 0.0:
        hx, hy = ax + side, ay + top_v
        win = f.window(hcx, hcy, max(hx, hy, bottom - hcy) + 1.0, posed=False)
        if win is not None:
            X, Y = f.X[win], f.Y[win]
            x = (X - hcx) * (1.0 / hx)
            y = np.minimum(Y - hcy, 0.0)
            y *= 1.0 / hy
            d = x * x
            d += y * y
            np.sqrt(d, out=d)
            d -= 1.0
            d *= min(hx, hy)
            np.maximum(d, Y - bottom, out=d)
            _blend(img[:, win[0], win[1]], f.cover(d), _col(i.hair_color) * 0.85)


def _paint_ears(f: _Frame, img: np.ndarray, skin: np.ndarray, front: bool) -> None:
    i = f.identity
    ev, ehh, ehw = i.ears
    (a0, a1, _), (b0, b1, _), (c0, c1, _) = f.r
    for side in (-1.0, 1.0):
        # Ear anchor on the rim of the head sphere (the outline), rotated with the head. A
        # far-side ear hides behind the head (painted before it), a near-side one sits on
        # the cheek (after).
        pu, pv, pz = a0 * side + a1 * ev, b0 * side + b1 * ev, c0 * side + c1 * ev
        if (pz > 0.05) != front or pz < -0.35:
            continue
        ex = f.hcx + f.ax * pu + side * ehw * 0.6 * (1.0 - max(0.0, pz))
        ey = f.hcy + f.ay * pv
        hw = ehw * (1.0 - 0.5 * abs(pz))
        win = f.window(ex, ey, ehh + 2.0, posed=False)
        if win is None:
            continue
        x = (f.X[win] - ex) * (1.0 / hw)
        y = (f.Y[win] - ey) * (1.0 / ehh)
        r = x * x
        r += y * y
        np.sqrt(r, out=r)
        r -= 1.0
        view = img[:, win[0], win[1]]
        _blend(view, f.cover(r * hw), skin * 0.88)
        _blend(view, f.cover((r - 0.45) * hw, 0.5), skin * 0.62)  # inner shadow


def _paint_head(f: _Frame, img: np.ndarray, skin: np.ndarray) -> np.ndarray:
    """Skin, skin pattern and hair of the head; returns the head coverage on ``f.hwin``."""
    i = f.identity
    view = img[:, f.hwin[0], f.hwin[1]]
    # rr is the jaw-normalised radius: the outline (narrowing towards the chin) is rr = 1.
    rh = np.sqrt(f.rr)
    rh -= 1.0
    rh *= min(f.ax, f.ay)
    head = f.cover(rh)
    # The identity's low-frequency skin-tone pattern, in frontal coordinates so it moves
    # with the face; blur attenuates it by the Gaussian transfer factor of its frequencies.
    t = i.texture
    Xw, Yw = f.xf, f.yf
    amp = t[6] * math.exp(-0.5 * (t[0] ** 2 + t[1] ** 2 + t[3] ** 2 + t[4] ** 2) * f.blur ** 2)
    pat = np.cos(t[0] * Xw + t[1] * Yw + t[2])
    pat *= np.cos(t[3] * Xw + t[4] * Yw + t[5])
    pat *= amp
    col = pat * _col(i.texture_tint)
    col += skin
    # Hair on the head: above the hairline (a frontal-frame curve) or on the back of the head.
    # Mixed into the head colour before the head is composited, so the outline has a single
    # anti-aliased edge.
    hairline, temple, fringe, ffreq, fphase, asym = i.hair[:6]
    au = np.abs(f.u)
    sidew = au - 0.45
    sidew *= 1.0 / 0.45
    _uclip(sidew, 0.0, 1.0, out=sidew)
    line = sidew * sidew
    line *= temple
    line += asym * f.u
    line += hairline
    if fringe > 0.0:
        fr = np.cos(ffreq * Xw + fphase)
        fr *= 0.25 * fringe
        fr += 0.75 * fringe
        fr *= np.maximum(1.0 - 1.4 * au, 0.0)
        line += fr
    # Back of the head: z < 0 above ear level shows hair.
    back = np.maximum((f.z + 0.03) * f.ax, (f.v - i.ears[0]) * f.ay)
    hair_m = f.cover(back)
    if hairline > -10.0:
        line -= Yw
        np.maximum(hair_m, f.cover(line * -1.0), out=hair_m)
    _blend(col, hair_m, _col(i.hair_color))
    _blend(view, head, col)
    return head


def _mirror_coords(f: _Frame, win: _Window, lx: float, ly: float, rx: float, ry: float
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Front-face coordinates relative to the left or right anchor, whichever side of the
    midline a pixel is on, plus the side sign (-1 left, +1 right); all [h, w]."""
    Xw, Yw = f.Xw[win], f.Yw[win]
    right = Xw > 0.5 * (lx + rx)
    x = Xw - np.where(right, np.float32(rx), np.float32(lx))
    y = Yw - np.where(right, np.float32(ry), np.float32(ly))
    sgn = np.where(right, np.float32(1.0), np.float32(-1.0))
    return x, y, sgn


def _paint_eyes(f: _Frame, img: np.ndarray, lm: tuple[float, ...]) -> None:
    i = f.identity
    ew, eh, tilt, ir = i.eye
    win = f.pair_window(lm[0], lm[1], lm[2], lm[3], ew + 5.0)
    if win is None:
        return
    x, y, sgn = _mirror_coords(f, win, lm[0], lm[1], lm[2], lm[3])
    # Positive tilt lifts the outer corners: rotate by -side * tilt.
    c, s = math.cos(math.radians(tilt)), math.sin(math.radians(tilt))
    ssg = sgn * -s
    lx = c * x + ssg * y
    ly = y * c
    ly -= ssg * x
    view = img[:, win[0], win[1]]
    # Socket shadow for depth.
    ss, sa = f.soft(ew * 1.4)
    q = lx * (1.0 / ss)
    q *= q
    r = ly + 1.0
    r *= 1.0 / (eh * 2.6)
    q += r * r
    np.exp(-q, out=q)
    q *= -0.2 * sa
    q += 1.0
    view *= q
    alx = np.abs(lx)
    t = lx * (1.0 / ew)
    half = t * t
    half *= -eh
    half += eh  # eh * (1 - t^2)
    d = np.abs(ly) - half
    np.maximum(d, alx - ew, out=d)
    sclera = f.cover(d, f.thin(eh))
    _blend(view, sclera, _SCLERA)
    gx, gy = f.nuisance.gaze
    ri = lx - gx
    ri *= ri
    q = ly - gy
    ri += q * q
    np.sqrt(ri, out=ri)
    m = f.cover(ri - ir, f.thin(ir))
    m *= sclera
    _blend(view, m, _col(i.iris_color))
    m = f.cover(ri - 0.42 * ir, f.thin(0.42 * ir))
    m *= sclera
    _blend(view, m, _PUPIL)
    # Upper lid / lashes: a dark band along the top of the opening.
    d = ly + half
    d += 0.35
    np.abs(d, out=d)
    d -= 0.7
    np.maximum(d, alx - 1.08 * ew, out=d)
    _blend(view, f.cover(d, 0.9 * f.thin(0.7)), _LASH)


def _paint_brows(f: _Frame, img: np.ndarray, lm: tuple[float, ...]) -> None:
    i = f.identity
    gap, hl, arch, thick, slope, dark = i.brow
    lx, ly, rx, ry = lm[0] - 1.0, lm[1] - gap, lm[2] + 1.0, lm[3] - gap
    win = f.pair_window(lx, ly, rx, ry, hl + 4.0)
    if win is None:
        return
    x, y, sgn = _mirror_coords(f, win, lx, ly, rx, ry)
    t = x * (1.0 / hl)
    tt = t * sgn  # +1 at the outer end
    yc = t * t
    yc -= 1.0
    yc *= arch
    yc += tt * (slope * hl)
    th = np.maximum(tt, 0.0)
    th *= -0.45 * 0.5 * thick
    th += 0.5 * thick  # thinner towards the outer end
    d = y - yc
    np.abs(d, out=d)
    d -= th
    np.maximum(d, np.abs(x) - hl, out=d)
    _blend(img[:, win[0], win[1]], f.cover(d, 0.9 * f.thin(0.5 * thick)),
           _col(i.hair_color) * dark)


def _paint_nose(f: _Frame, img: np.ndarray, skin: np.ndarray, lm: tuple[float, ...]) -> None:
    i = f.identity
    nw, nos, bridge, tip = i.nose
    nx, ny = lm[4], lm[5]
    length = ny - 0.5 * (lm[1] + lm[3])
    win = f.window(nx, ny - 0.4 * length, max(nw + 5.0, 0.6 * length + 5.0))
    if win is None:
        return
    x = f.Xw[win] - nx
    y = f.Yw[win] - ny
    view = img[:, win[0], win[1]]
    ax_ = np.abs(x)
    # One multiplicative relief map: bridge-side shadows (deeper away from the light),
    # wing and under-tip shadows, tip highlight.
    along = (y + (length - 3.0)) * (1.0 / 6.0)
    _uclip(along, 0.0, 1.0, out=along)
    q = 0.5 - 0.5 * y
    _uclip(q, 0.0, 1.0, out=q)
    along *= q
    sb, ab = f.soft(1.6)
    lx = f.nuisance.light[0]
    along *= np.where(x < 0.0, np.float32(-(1.0 + 0.8 * lx) * bridge * ab),
                      np.float32(-(1.0 - 0.8 * lx) * bridge * ab))
    q = (ax_ - 0.45 * nw) * (1.0 / sb)
    q *= q
    np.exp(-q, out=q)
    relief = along * q
    relief += 1.0
    sw, aw = f.soft(1.9)
    q = (ax_ - 0.8 * nw) * (1.0 / sw)
    q *= q
    r = (y - 0.5) * (1.0 / 2.8)
    q += r * r
    np.exp(-q, out=q)
    relief -= q * (0.22 * aw)
    su, au = f.soft(1.4)
    q = x * (1.0 / nw)
    q *= q
    r = (y - 3.4) * (1.0 / su)
    q += r * r
    np.exp(-q, out=q)
    relief -= q * (0.16 * au)
    q = x * (1.0 / 2.8)
    q *= q
    r = (y + 1.5) * (1.0 / 2.8)
    q += r * r
    np.exp(-q, out=q)
    relief += q * (0.5 * tip)
    view *= relief
    # Nostrils.
    q = (ax_ - 0.42 * nw) * (1.0 / nos)
    q *= q
    r = (y - 1.9) * (1.0 / (0.6 * nos))
    q += r * r
    np.sqrt(q, out=q)
    q -= 1.0
    q *= 0.6 * nos
    _blend(view, f.cover(q, 0.85 * f.thin(0.6 * nos)), skin * 0.3)


def _paint_mouth(f: _Frame, img: np.ndarray, lm: tuple[float, ...]) -> None:
    i = f.identity
    up, lo, bow = i.mouth
    lip = _col(i.lip_color)
    lmx, lmy, rmx, rmy = lm[6], lm[7], lm[8], lm[9]
    cx, cy = 0.5 * (lmx + rmx), 0.5 * (lmy + rmy)
    hw = 0.5 * math.hypot(rmx - lmx, rmy - lmy)
    c, s = (rmx - lmx) / (2 * hw), (rmy - lmy) / (2 * hw)
    win = f.window(cx, cy, hw + 6.0)
    if win is None:
        return
    x = f.Xw[win] - cx
    y = f.Yw[win] - cy
    mx = c * x + s * y
    my = y * c
    my -= s * x
    view = img[:, win[0], win[1]]
    t = mx * (1.0 / hw)
    t2 = t * t
    prof = 1.0 - t2
    np.maximum(prof, 0.0, out=prof)
    np.sqrt(prof, out=prof)
    # Shadow under the lower lip (chin crease) for a bit of relief.
    sc, ac = f.soft(1.6)
    q = (my - (lo + 2.2)) * (1.0 / sc)
    q *= q
    q += t2 * 0.81
    np.exp(-q, out=q)
    q *= -0.14 * ac
    q += 1.0
    view *= q
    up_edge = np.exp(t2 * (-1.0 / 0.0256))  # cupid's bow dip in the middle
    up_edge *= -bow
    up_edge += 1.0
    up_edge *= prof
    up_edge *= up
    d = np.where(my < 0.0, -my - up_edge, my - lo * prof)
    amx = np.abs(mx)
    np.maximum(d, amx - hw, out=d)
    _blend(view, f.cover(d, f.thin(0.5 * (up + lo))), lip)
    d = np.abs(my)
    d -= 0.5
    np.maximum(d, amx - (hw + 0.5), out=d)
    _blend(view, f.cover(d, 0.85 * f.thin(0.5)), lip * 0.35)


def _paint_skin_marks(f: _Frame, img: np.ndarray, skin: np.ndarray, lm: tuple[float, ...],
                      head: np.ndarray) -> None:
    """Blush, moles and beard (identity traits on the front of the face).

    ``head`` is the head coverage on the full canvas.
    """
    i = f.identity
    strength, rad = i.blush
    if strength > 0.02:
        cy = lm[5] + 2.0
        win = f.pair_window(lm[0], cy, lm[2], cy, 2.0 * rad)
        if win is not None:
            # Both cheeks at once: distance to the nearer of two mirrored centres.
            q = np.abs(f.Xw[win] - 0.5 * (lm[0] + lm[2]))
            q -= 0.5 * (lm[2] - lm[0])
            q *= q
            r = f.Yw[win] - cy
            q += r * r
            q *= -0.5 / (rad * rad)
            np.exp(q, out=q)
            img[:, win[0], win[1]] += q * (_BLUSH * strength)
    mole_col = skin * 0.42
    for mx, my, mr in i.moles:
        win = f.window(mx, my, mr + 2.0)
        if win is None:
            continue
        q = f.Xw[win] - mx
        q *= q
        r = f.Yw[win] - my
        q += r * r
        np.sqrt(q, out=q)
        q -= mr
        m = f.cover(q, 0.85 * f.thin(mr))
        m *= head[win]
        _blend(img[:, win[0], win[1]], m, mole_col)
    dens, moustache, chin, cheeks = i.beard
    if dens <= 0.0:
        return
    ny = lm[5]
    mcx, mcy = 0.5 * (lm[6] + lm[8]), 0.5 * (lm[7] + lm[9])
    hw = 0.5 * (lm[8] - lm[6])
    up, lo, _ = i.mouth
    chin_y = f.hcy + f.ay
    win = f.window(f.hcx, 0.5 * (ny + chin_y), 0.5 * (chin_y - ny) + 34.0)
    if win is None:
        return
    Xw = f.Xw[win]
    X, Y = Xw - mcx, f.Yw[win] - mcy
    m = np.zeros(X.shape, dtype=np.float32)
    ax_ = np.abs(X)
    if moustache:  # a band over the upper lip that droops at the ends
        yc = np.square(X * (1.0 / (hw + 2.0))) * 3.0 - (up + 2.4)
        d = np.maximum(np.abs(Y - yc) - 2.0, ax_ - (hw + 2.5))
        np.maximum(m, f.cover(d), out=m)
    if chin:  # goatee around and under the lower lip
        d = (np.sqrt(np.square(X * (1.0 / (hw + 1.5))) + np.square((Y - lo - 9.0) * 0.1)) - 1.0) * 8.0
        np.maximum(m, f.cover(d), out=m)
    if cheeks:  # full beard: the lower face below a line rising towards the ears
        u = np.abs(Xw - f.hcx) * (1.0 / f.ax)
        line = (ny - mcy + 6.0) - 22.0 * np.maximum(u - 0.5, 0.0)
        np.maximum(m, f.cover(line - Y), out=m)
    # Stubble texture so it reads as hair rather than a shadow.
    m *= head[win]
    m *= (0.85 + 0.15 * np.cos(2.1 * X) * np.cos(1.7 * Y)) * dens
    _blend(img[:, win[0], win[1]], m, _col(i.hair_color) * 0.85)


def _paint_debug_dots(f: _Frame, img: np.ndarray, lm: tuple[float, ...]) -> None:
    """Dots at the canonical landmarks, drawn *inside* the face so they follow the warp."""
    # At least ~2.3 output px radius so even small, foreshortened dots keep a few pixels
    # of pure colour (the anti-aliased rim is blended).
    r = max(1.6, 2.3 / f.k)
    for j in range(5):
        px, py = lm[2 * j], lm[2 * j + 1]
        win = f.window(px, py, r + 2.0)
        if win is None:
            continue
        d = np.sqrt(np.square(f.Xw[win] - px) + np.square(f.Yw[win] - py)) - r
        _blend(img[:, win[0], win[1]], f.cover(d), _DOT)


def _paint_occluder(f: _Frame, img: np.ndarray) -> None:
    n = f.nuisance
    if n.occluder == 0:
        return
    cx, cy = n.occluder_params[:2]
    X, Y = f.X, f.Y
    if n.occluder in (3, 4):
        # Sunglasses and masks sit on the face and follow the pose; bars / rectangles are
        # in front of the head and only follow the crop's similarity transform.
        on = f.Xw < 0.5 * _FAR
        X, Y = np.where(on, f.Xw, X), np.where(on, f.Yw, Y)
    m = f.cover(_occluder_distance(n.occluder, n.occluder_params, X, Y))
    if n.occluder == 4:  # a mask does not stick out beyond the cheeks
        lim = np.zeros_like(m)
        lim[f.hwin] = f.cover((np.sqrt(np.square(f.u0 * (1.0 / 1.06)) + np.square(f.v0)) - 1.0) * f.ax)
        m *= lim
    _blend(img, m, _col(n.occluder_color))
    if n.occluder == 3:  # a glint on each lens so they read as glasses
        sg, ag = f.soft(2.0)
        g = np.exp(-(np.square(np.abs(X - cx) - 14.0) + np.square(Y - (cy - 3.0))) * (1.0 / (2 * sg * sg)))
        g *= m
        g *= 70.0 * ag * ag
        img += g
