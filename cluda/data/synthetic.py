"""A procedural synthetic domain pair: street scenes with the 19 Cityscapes classes, rendered in a
flat, saturated "game" look (the source domain, like GTA5 / SYNTHIA) and in a muted, textured,
blurred and noisy "camera" look (the target domain, like Cityscapes). It is the embedded default
of the project: no data set can be downloaded where it is built, and a small model can learn it on
a CPU in minutes.

One scene is a layout, drawn once, and two renderings of it:

1. `generate_layout`: a pinhole camera (focal length 0.9 W, height 1.3-1.8 m, horizon at 36-48 %
   of the height) looks down a straight street. Sky above; road, sidewalks and terrain on the
   ground plane in perspective, with lane markings and curbs; building facades (with windows),
   walls, fences and hedges on vertical planes at the street sides, a distant skyline; then, far
   to near (painter's order, so nearer things occlude farther ones): trees, poles carrying traffic
   lights and signs, cars, trucks, buses and trams (seen from behind on the road, or from the
   side), pedestrians on the sidewalks, cyclists and motorcyclists (riders on their vehicles),
   parked bicycles. Sizes are metric (a car is 1.8 m wide) and projected with the camera, so
   classes keep their typical sizes, shapes and places. Each drawn part gets an instance (a random
   shade) and possibly a detail code (window, tyre, lamp, skin ...), which changes the colour but
   not the class.
2. `render(layout, domain)`: instance colours (several swatches per class and a random shade
   per instance, so colour alone is not a perfect cue in either domain; vehicles and clothes
   share one palette across classes), details; the target look moves the colours halfway from
   the game palette to a muted camera palette (`Look.palette` = 0.5) and adds per-class texture
   noise, a lighting gradient and vignetting, haze near the horizon, a colour cast, blur and
   sensor noise.

The size of the gap was set with a small CNN trained on 300 source scenes at 128 x 256 (400
iterations, batch 8, this 2-core CPU): 44 mIoU on source val, 39 / 28 / 24 / 21 / 9 on target val
for `Look.palette` 0 / 0.4 / 0.5 / 0.6 / 1; the effects other than colour cost only ~4 points, the
palette shift is the gap. At 0.5 a plain DACS-style self-training (ClassMix, confidence-weighted
pseudo-labels, colour jitter and blur) continued from that model reached 32 after 600 more
iterations, where source-only training reached 29.

The labels of the two renderings are the same array; only the appearance changes, so the
domain gap is an appearance gap that a model trained on the source look partly fails on and that
self-training on the target look can close.

Scenes are pure functions of (seed, split, index, size): the layout's generator is
`default_rng([seed, split id, index, 0])`, the rendering's `[..., 1]` (source) or `[..., 2]`
(target). Splits have different ids, so train and val scenes never coincide.

Commands:

    python -m cluda.data.synthetic write ROOT --domain target --train N --val M --size 256x512
    python -m cluda.data.synthetic grid OUT.png [--n 4] [--size 256x512] [--seed 0]
    python -m cluda.data.synthetic speed [--size 256x512] [--n 50]

`write` stores the scenes in the Cityscapes layout (`leftImg8bit/{split}/synthetic/...`,
`gtFine/{split}/synthetic/..._gtFine_labelIds.png` with Cityscapes label ids), so
`CityscapesDataset` and `python -m cluda.data.prepare cityscapes` read them.
"""
import argparse
import dataclasses
import os
import sys
import time
from typing import Tuple

import numpy as np
from PIL import Image, ImageFilter

from .datasets import CS_IMG_SUFFIX, CS_RAW_SUFFIX, SegmentationDataset
from .io import write_png_atomic
from .labels import IGNORE_INDEX, TRAINID_TO_CITYSCAPES_ID, colorize

SPLITS = {"train": 0, "val": 1, "test": 2}
DOMAINS = {"source": 1, "target": 2}

# Train ids, for readability.
ROAD, SIDEWALK, BUILDING, WALL, FENCE, POLE, LIGHT, SIGN, VEGETATION, TERRAIN, SKY = range(11)
PERSON, RIDER, CAR, TRUCK, BUS, TRAIN, MOTORCYCLE, BICYCLE = range(11, 19)
VOID = IGNORE_INDEX

# Detail codes: parts that look different from their class's colour but keep the class.
(NONE, WINDOW, LANE, TYRE, LAMP_RED, LAMP_AMBER, LAMP_GREEN, SIGN_FACE, SKIN, DARK, CURB,
 TRUNK, TAILLIGHT, SHADOW, SLAT) = range(15)

N_RAND = 5  # random numbers per instance (swatch, brightness, tint x 3)


class _Canvas:
    """Label, instance and detail maps with the drawing primitives (painter's algorithm: what is
    drawn later covers what was drawn before). Coordinates are floats in pixels, x to the right
    and y down; a pixel is covered when its centre is."""

    def __init__(self, height, width, rng):
        self.h, self.w, self.rng = height, width, rng
        self.label = np.full((height, width), SKY, np.uint8)
        self.inst = np.zeros((height, width), np.int32)
        self.detail = np.zeros((height, width), np.uint8)
        self.classes = [SKY]
        self.rands = [rng.random(N_RAND)]

    def new(self, cls):
        """A new instance of class `cls` with its own random shade; returns its id."""
        self.classes.append(cls)
        self.rands.append(self.rng.random(N_RAND))
        return len(self.classes) - 1

    def _box(self, y0, y1, x0, x1):
        """Slices of the pixels whose centres lie in [y0, y1) x [x0, x1), clipped, plus the
        pixel-centre coordinates (column and row vectors)."""
        iy0 = max(int(np.ceil(y0 - 0.5)), 0)
        iy1 = min(int(np.ceil(y1 - 0.5)), self.h)
        ix0 = max(int(np.ceil(x0 - 0.5)), 0)
        ix1 = min(int(np.ceil(x1 - 0.5)), self.w)
        if iy1 <= iy0 or ix1 <= ix0:
            return None
        ys = np.arange(iy0, iy1, dtype=np.float32)[:, None] + 0.5
        xs = np.arange(ix0, ix1, dtype=np.float32)[None, :] + 0.5
        return (slice(iy0, iy1), slice(ix0, ix1)), ys, xs

    def paint(self, region, mask, cls, inst, detail=NONE):
        """Set class, instance and detail where `mask` ((h, w) bool) is true inside `region`
        (a pair of slices)."""
        self.label[region][mask] = cls
        self.inst[region][mask] = inst
        self.detail[region][mask] = detail

    def rect(self, x0, x1, y0, y1, cls, inst, detail=NONE, min_px=1.0):
        """Axis-aligned rectangle, at least `min_px` wide and high (thin poles stay visible)."""
        if x1 - x0 < min_px:
            c = 0.5 * (x0 + x1)
            x0, x1 = c - 0.5 * min_px, c + 0.5 * min_px
        if y1 - y0 < min_px:
            c = 0.5 * (y0 + y1)
            y0, y1 = c - 0.5 * min_px, c + 0.5 * min_px
        box = self._box(y0, y1, x0, x1)
        if box is None:
            return None
        sl, ys, xs = box
        mask = np.ones((ys.shape[0], xs.shape[1]), bool)
        self.paint(sl, mask, cls, inst, detail)
        return sl, mask

    def ellipse(self, cx, cy, rx, ry, cls, inst, detail=NONE):
        rx, ry = max(rx, 0.5), max(ry, 0.5)
        box = self._box(cy - ry, cy + ry, cx - rx, cx + rx)
        if box is None:
            return None
        sl, ys, xs = box
        mask = ((ys - cy) / ry) ** 2 + ((xs - cx) / rx) ** 2 <= 1.0
        self.paint(sl, mask, cls, inst, detail)
        return sl, mask

    def polygon_mask(self, pts):
        """Even-odd fill of the polygon `pts` ((k, 2) x, y); returns (slices, mask, ys, xs)."""
        pts = np.asarray(pts, np.float32)
        box = self._box(pts[:, 1].min(), pts[:, 1].max(), pts[:, 0].min(), pts[:, 0].max())
        if box is None:
            return None
        sl, ys, xs = box
        inside = np.zeros((ys.shape[0], xs.shape[1]), bool)
        for (xa, ya), (xb, yb) in zip(pts, np.roll(pts, -1, axis=0)):
            if ya == yb:
                continue
            crosses = (ya > ys) != (yb > ys)  # (h, 1): the edge spans this row
            x_at = xa + (ys - ya) * (xb - xa) / (yb - ya)
            inside ^= crosses & (xs < x_at)
        return sl, inside, ys, xs

    def polygon(self, pts, cls, inst, detail=NONE):
        got = self.polygon_mask(pts)
        if got is None:
            return None
        sl, mask, _, _ = got
        self.paint(sl, mask, cls, inst, detail)
        return sl, mask

    def line(self, p, q, width, cls, inst, detail=NONE):
        """A thick segment from p to q (x, y), at least one pixel wide."""
        (xa, ya), (xb, yb) = p, q
        d = np.hypot(xb - xa, yb - ya)
        if d < 1e-6:
            return None
        half = 0.5 * max(width, 1.0)
        nx, ny = -(yb - ya) / d * half, (xb - xa) / d * half
        return self.polygon([(xa + nx, ya + ny), (xb + nx, yb + ny), (xb - nx, yb - ny),
                             (xa - nx, ya - ny)], cls, inst, detail)

    def set_detail(self, region, mask, code):
        self.detail[region][mask] = code


class _Street:
    """The camera and street geometry of one scene (metres; X to the right, Y up, Z forward)."""

    def __init__(self, h, w, rng):
        self.h, self.w = h, w
        self.f = 0.9 * w
        self.cam_h = rng.uniform(1.3, 1.8)
        self.yh = h * rng.uniform(0.36, 0.48)
        self.xv = w * rng.uniform(0.42, 0.58)
        self.x0 = rng.uniform(-2.0, 2.0)  # road centre relative to the camera
        self.road_hw = rng.uniform(3.5, 7.5)
        # per side (left = 0, right = 1): sidewalk width, setback behind it, what the ground is
        self.sidewalk = [rng.uniform(1.5, 4.5) if rng.random() < 0.9 else 0.0 for _ in range(2)]
        self.setback = [rng.uniform(0.0, 6.0) if rng.random() < 0.5 else 0.0 for _ in range(2)]
        self.side_ground = [TERRAIN if rng.random() < 0.6 else SIDEWALK for _ in range(2)]

    def edge(self, side):
        """X of the road edge on `side` (0 left, 1 right)."""
        return self.x0 + (self.road_hw if side else -self.road_hw)

    def sidewalk_out(self, side):
        s = 1 if side else -1
        return self.edge(side) + s * self.sidewalk[side]

    def facade(self, side):
        s = 1 if side else -1
        return self.sidewalk_out(side) + s * self.setback[side]

    def project(self, X, Y, Z):
        """World point -> screen (x, y); Z is clamped to 0.5 m in front of the camera."""
        Z = np.maximum(Z, 0.5)
        return self.xv + self.f * X / Z, self.yh + self.f * (self.cam_h - Y) / Z

    def scale(self, Z):
        """Pixels per metre at depth Z."""
        return self.f / max(Z, 0.5)

    def z_at_edge(self, X):
        """Depth at which the vertical plane at lateral position X leaves the image sideways."""
        edge_x = 0.0 if X < 0 else float(self.w)
        return max(self.f * abs(X) / max(abs(edge_x - self.xv), 1.0), 0.5)


def _ground(cv, st, rng):
    """Road, sidewalks, side ground, median, lane markings and curbs on the ground plane."""
    top = int(np.ceil(st.yh - 0.5))
    if top >= cv.h:
        return
    ys = np.arange(top, cv.h, dtype=np.float32)[:, None] + 0.5
    xs = np.arange(cv.w, dtype=np.float32)[None, :] + 0.5
    d = np.maximum(ys - st.yh, 1e-3) / st.cam_h  # pixels per metre on this row (h, 1)
    X = (xs - st.xv) / d  # lateral metres of each ground pixel (h, w)
    Z = st.f / d  # depth of each row (h, 1)
    rel = X - st.x0
    lab = np.empty(X.shape, np.uint8)
    det = np.zeros(X.shape, np.uint8)
    inst = np.empty(X.shape, np.int32)
    left, right = rel < 0, rel >= 0
    for side, half in ((0, left), (1, right)):
        a = np.abs(rel)
        ground = cv.new(st.side_ground[side])
        lab[half] = st.side_ground[side]
        inst[half] = ground
        walk = half & (a < st.road_hw + st.sidewalk[side])
        lab[walk] = SIDEWALK
        inst[walk] = cv.new(SIDEWALK)
        curb = walk & (a < st.road_hw + 0.25)
        det[curb] = CURB
    road = np.abs(rel) < st.road_hw
    lab[road] = ROAD
    inst[road] = cv.new(ROAD)
    det[road] = NONE
    # lane markings: dashed lines 3 m on, 6 m off, 0.15 m wide, between lanes of ~3.5 m
    n_lanes = max(int(round(2 * st.road_hw / 3.5)), 1)
    dash = (Z % 9.0) < 3.0
    for k in range(1, n_lanes):
        lx = -st.road_hw + k * 2 * st.road_hw / n_lanes
        solid = k == n_lanes // 2 and n_lanes > 2 and rng.random() < 0.5
        det[road & (np.abs(rel - lx) < 0.075) & (solid | dash)] = LANE
    if rng.random() < 0.5:  # edge lines
        det[road & (st.road_hw - np.abs(rel) < 0.15)] = LANE
    if rng.random() < 0.15:  # a planted median
        med = np.abs(rel) < rng.uniform(0.6, 1.2)
        lab[med] = TERRAIN
        inst[med] = cv.new(TERRAIN)
        det[med] = NONE
    if rng.random() < 0.3:  # a zebra crossing
        z0 = rng.uniform(8.0, 25.0)
        zebra = road & (np.abs(Z - z0) < 1.5) & ((rel % 1.0) < 0.5)
        det[zebra] = LANE
    cv.label[top:] = lab
    cv.inst[top:] = inst
    cv.detail[top:] = det


def _skyline(cv, st, rng):
    """Distant buildings and tree lines just above the horizon."""
    if rng.random() < 0.75:
        x = 0.0
        while x < cv.w:
            bw = cv.w * rng.uniform(0.03, 0.12)
            if rng.random() < 0.75:
                bh = cv.h * rng.uniform(0.01, 0.12)
                cv.rect(x, x + bw, st.yh - bh, st.yh + 1.0, BUILDING, cv.new(BUILDING))
            x += bw
    if rng.random() < 0.4:
        inst = cv.new(VEGETATION)
        for cx in np.sort(rng.uniform(0, cv.w, size=rng.integers(3, 9))):
            r = cv.h * rng.uniform(0.015, 0.05)
            cv.ellipse(cx, st.yh - 0.3 * r, r * rng.uniform(1.0, 2.5), r, VEGETATION, inst)


def _plane_quad(st, X, z0, z1, y0, y1):
    """Screen polygon of the rectangle [z0, z1] x [y0, y1] on the vertical plane at X."""
    pts = [st.project(X, y0, z0), st.project(X, y1, z0), st.project(X, y1, z1),
           st.project(X, y0, z1)]
    return [(float(a), float(b)) for a, b in pts]


def _plane_coords(st, X, ys, xs):
    """World (Z, Y) of the pixels of the vertical plane at X (for window or slat patterns)."""
    Z = st.f * X / np.where(np.abs(xs - st.xv) < 1e-3, 1e-3, xs - st.xv)
    Y = st.cam_h - (ys - st.yh) * Z / st.f
    return Z, Y


def _plane_part(cv, st, X, z0, z1, y0, y1, cls, inst, detail=NONE):
    got = cv.polygon_mask(_plane_quad(st, X, max(z0, 0.6), max(z1, 0.6), y0, y1))
    if got is None:
        return None
    sl, mask, ys, xs = got
    cv.paint(sl, mask, cls, inst, detail)
    return sl, mask, ys, xs


def _building(cv, st, X, z0, z1, rng):
    height = rng.uniform(5.0, 28.0)
    inst = cv.new(BUILDING)
    got = _plane_part(cv, st, X, z0, z1, 0.0, height, BUILDING, inst)
    if got is None:
        return
    sl, mask, ys, xs = got
    Z, Y = _plane_coords(st, X, ys, xs)
    bay, floor = rng.uniform(2.0, 4.0), rng.uniform(2.8, 3.6)
    win_w, win_h = bay * rng.uniform(0.35, 0.7), floor * rng.uniform(0.35, 0.6)
    zz, yy = (Z - z0) % bay, Y % floor
    windows = mask & (zz > 0.5 * (bay - win_w)) & (zz < 0.5 * (bay + win_w)) & (
        yy > 0.5 * (floor - win_h)) & (yy < 0.5 * (floor + win_h)) & (Y > floor) & (
        Y < height - 0.8)
    if rng.random() < 0.5:  # shop windows on the ground floor
        windows |= mask & (Y > 0.4) & (Y < floor * 0.85) & ((Z - z0) % (2 * bay) > 0.6)
    cv.set_detail(sl, windows, WINDOW)


def _side(cv, st, side, rng, objects):
    """Facades, walls, fences, hedges and trees along one side of the street."""
    s = 1 if side else -1
    X = st.facade(side)
    z = st.z_at_edge(X) * rng.uniform(0.5, 0.9)
    z_end = rng.uniform(80.0, 160.0)
    segments = []
    while z < z_end:
        length = rng.uniform(8.0, 30.0)
        kind = rng.choice(["building", "gap", "green", "wall"], p=[0.6, 0.1, 0.2, 0.1])
        segments.append((kind, z, min(z + length, z_end)))
        z += length
    for kind, z0, z1 in reversed(segments):  # far to near
        if kind == "building":
            _building(cv, st, X, z0, z1, rng)
        elif kind == "wall":
            _plane_part(cv, st, X, z0, z1, 0.0, rng.uniform(1.0, 3.0), WALL, cv.new(WALL))
        elif kind == "green":
            _plane_part(cv, st, X, z0, z1, 0.0, rng.uniform(0.8, 2.0), VEGETATION,
                        cv.new(VEGETATION))
            for _ in range(rng.integers(1, 4)):
                objects.append((rng.uniform(z0, z1), "tree",
                                dict(X=X - s * rng.uniform(0.5, 2.0))))
    # low walls / fences at the outer edge of the sidewalk, in front of the facades
    X_out = st.sidewalk_out(side) + s * 0.1
    for _ in range(rng.poisson(0.8)):
        z0 = rng.uniform(st.z_at_edge(X_out) * 0.7, 60.0)
        z1 = z0 + rng.uniform(4.0, 25.0)
        if rng.random() < 0.65:
            got = _plane_part(cv, st, X_out, z0, z1, 0.0, rng.uniform(0.9, 2.0), FENCE,
                              cv.new(FENCE))
            if got is not None:
                sl, mask, ys, xs = got
                Z, Y = _plane_coords(st, X_out, ys, xs)
                cv.set_detail(sl, mask & ((Z % 0.3) < 0.12) & (Y > 0.1), SLAT)
        else:
            _plane_part(cv, st, X_out, z0, z1, 0.0, rng.uniform(0.6, 1.4), WALL, cv.new(WALL))
    if st.setback[side] > 1.0 or rng.random() < 0.4:
        for _ in range(rng.poisson(2.0)):
            objects.append((rng.uniform(6.0, 70.0), "tree",
                            dict(X=st.sidewalk_out(side) + s * rng.uniform(0.3, 1.0))))


def _tree(cv, st, X, Z, rng):
    k = st.scale(Z)
    x, y = st.project(X, 0.0, Z)
    trunk_h, r = rng.uniform(1.8, 3.5), rng.uniform(1.2, 3.0)
    inst = cv.new(VEGETATION)
    cv.rect(x - 0.15 * k, x + 0.15 * k, y - (trunk_h + 0.5 * r) * k, y, VEGETATION, inst,
            TRUNK)
    for _ in range(rng.integers(2, 5)):
        cx = x + rng.uniform(-0.6, 0.6) * r * k
        cy = y - (trunk_h + r * rng.uniform(0.6, 1.2)) * k
        rr = r * rng.uniform(0.6, 1.0) * k
        cv.ellipse(cx, cy, rr * rng.uniform(0.9, 1.3), rr, VEGETATION, inst)


def _pole(cv, st, X, Z, rng, towards_road):
    k = st.scale(Z)
    x, y = st.project(X, 0.0, Z)
    height = rng.uniform(3.5, 8.0)
    inst = cv.new(POLE)
    cv.rect(x - 0.09 * k, x + 0.09 * k, y - height * k, y, POLE, inst)
    top = y - height * k
    kind = rng.choice(["light", "arm_light", "sign", "lamp", "bare"],
                      p=[0.3, 0.15, 0.35, 0.1, 0.1])
    if kind in ("light", "arm_light"):
        lx, ly = x, top
        if kind == "arm_light":
            reach = rng.uniform(1.5, 4.0) * k * towards_road
            cv.line((x, top + 0.1 * k), (x + reach, top + 0.1 * k), 0.12 * k, POLE, inst)
            lx = x + reach
        box = cv.new(LIGHT)
        bw, bh = 0.35 * k, 1.0 * k
        cv.rect(lx - bw / 2, lx + bw / 2, ly + 0.1 * k, ly + 0.1 * k + bh, LIGHT, box)
        lit = rng.integers(3)
        for j, code in enumerate((LAMP_RED, LAMP_AMBER, LAMP_GREEN)):
            cy = ly + 0.1 * k + bh * (0.2 + 0.3 * j)
            cv.ellipse(lx, cy, 0.11 * k, 0.11 * k, LIGHT, box, code if j == lit else DARK)
        if rng.random() < 0.3:  # a second signal lower on the pole, facing the sidewalk
            cv.rect(x - bw / 2, x + bw / 2, y - 2.8 * k, y - 2.0 * k, LIGHT, cv.new(LIGHT))
    if kind == "sign" or rng.random() < 0.2:
        sy = y - rng.uniform(2.0, min(height, 3.2)) * k
        sign = cv.new(SIGN)
        shape = rng.integers(3)
        size = rng.uniform(0.5, 0.9) * k
        if shape == 0:
            cv.ellipse(x, sy, size / 2, size / 2, SIGN, sign)
            cv.ellipse(x, sy, size * 0.3, size * 0.3, SIGN, sign, SIGN_FACE)
        elif shape == 1:
            tri = [(x - size / 2, sy - size * 0.4), (x + size / 2, sy - size * 0.4),
                   (x, sy + size * 0.5)]
            cv.polygon(tri, SIGN, sign)
            inner = [(x - size * 0.25, sy - size * 0.25), (x + size * 0.25, sy - size * 0.25),
                     (x, sy + size * 0.2)]
            cv.polygon(inner, SIGN, sign, SIGN_FACE)
        else:
            cv.rect(x - size * 0.6, x + size * 0.6, sy - size * 0.4, sy + size * 0.4, SIGN, sign)
            cv.rect(x - size * 0.45, x + size * 0.45, sy - size * 0.05, sy + size * 0.05, SIGN,
                    sign, SIGN_FACE)
    if kind == "lamp":
        reach = rng.uniform(0.8, 2.0) * k * towards_road
        cv.line((x, top), (x + reach, top - 0.3 * k), 0.1 * k, POLE, inst)
        cv.ellipse(x + reach, top - 0.2 * k, 0.35 * k, 0.12 * k, POLE, inst, SIGN_FACE)


def _wheels_rear(cv, x, y, k, half_w, r, cls, inst):
    for sx in (-1, 1):
        cx = x + sx * (half_w - 0.2) * k
        cv.rect(cx - 0.15 * k, cx + 0.15 * k, y - 2 * r * k, y, cls, inst, TYRE)


def _shadow(cv, x, y, k, half_w, depth):
    """Darken the ground (road, sidewalk) under a vehicle: a detail of the ground, not a class."""
    box = cv._box(y - 0.15 * k * depth, y + 0.1 * k * depth, x - half_w * 1.1 * k,
                  x + half_w * 1.1 * k)
    if box is None:
        return
    sl, _, _ = box
    ground = (cv.label[sl] == ROAD) | (cv.label[sl] == SIDEWALK)
    cv.set_detail(sl, ground, SHADOW)


def _vehicle_rear(cv, st, cls, X, Z, rng):
    """A car, truck or bus seen from behind (or from the front: same silhouette)."""
    k = st.scale(Z)
    x, y = st.project(X, 0.0, Z)
    inst = cv.new(cls)
    if cls == CAR:
        hw, body_top, roof = rng.uniform(0.85, 0.95), rng.uniform(0.9, 1.1), rng.uniform(1.4, 1.6)
        _shadow(cv, x, y, k, hw, 1.0)
        _wheels_rear(cv, x, y, k, hw, 0.33, cls, inst)
        cv.rect(x - hw * k, x + hw * k, y - body_top * k, y - 0.25 * k, cls, inst)
        cab = [(x - hw * 0.95 * k, y - body_top * k), (x - hw * 0.72 * k, y - roof * k),
               (x + hw * 0.72 * k, y - roof * k), (x + hw * 0.95 * k, y - body_top * k)]
        cv.polygon(cab, cls, inst)
        glass = [(x - hw * 0.82 * k, y - (body_top + 0.05) * k),
                 (x - hw * 0.66 * k, y - (roof - 0.06) * k),
                 (x + hw * 0.66 * k, y - (roof - 0.06) * k),
                 (x + hw * 0.82 * k, y - (body_top + 0.05) * k)]
        cv.polygon(glass, cls, inst, WINDOW)
        for sx in (-1, 1):
            cx = x + sx * (hw - 0.15) * k
            cv.rect(cx - 0.12 * k, cx + 0.12 * k, y - 0.85 * k, y - 0.7 * k, cls, inst, TAILLIGHT)
    elif cls == TRUCK:
        hw, top = 1.25, rng.uniform(3.0, 3.8)
        _shadow(cv, x, y, k, hw, 1.5)
        _wheels_rear(cv, x, y, k, hw, 0.45, cls, inst)
        cv.rect(x - hw * k, x + hw * k, y - top * k, y - 0.6 * k, cls, inst)
        cv.rect(x - 0.02 * k, x + 0.02 * k, y - (top - 0.1) * k, y - 0.7 * k, cls, inst, DARK)
        cv.rect(x - hw * k, x + hw * k, y - 0.75 * k, y - 0.6 * k, cls, inst, DARK)
    else:  # bus
        hw, top = 1.27, rng.uniform(3.0, 3.3)
        _shadow(cv, x, y, k, hw, 1.5)
        _wheels_rear(cv, x, y, k, hw, 0.45, cls, inst)
        cv.rect(x - hw * k, x + hw * k, y - top * k, y - 0.3 * k, cls, inst)
        cv.rect(x - (hw - 0.15) * k, x + (hw - 0.15) * k, y - (top - 0.25) * k, y - 2.0 * k, cls,
                inst, WINDOW)
        cv.rect(x - (hw - 0.1) * k, x + (hw - 0.1) * k, y - (top - 0.05) * k,
                y - (top - 0.2) * k, cls, inst, DARK)


def _vehicle_side(cv, st, cls, X, Z, rng):
    """A parked car, a bus or a tram seen from the side, on the vertical plane at X."""
    inst = cv.new(cls)
    if cls == CAR:
        length, y_top, y_roof, r = rng.uniform(3.8, 4.8), 1.0, rng.uniform(1.4, 1.55), 0.32
    elif cls == BUS:
        length, y_top, y_roof, r = rng.uniform(10.0, 13.0), rng.uniform(3.0, 3.3), None, 0.45
    elif cls == TRUCK:
        length, y_top, y_roof, r = rng.uniform(6.0, 10.0), rng.uniform(3.0, 3.8), None, 0.45
    else:  # tram
        length, y_top, y_roof, r = rng.uniform(18.0, 32.0), rng.uniform(3.3, 3.7), None, 0.35
    z0, z1 = Z, Z + length
    if z0 < 1.0:
        return
    y_body = 0.3 if cls != TRAIN else 0.4
    got = _plane_part(cv, st, X, z0, z1, y_body, y_top, cls, inst)
    if cls == CAR:
        _plane_part(cv, st, X, z0 + 0.9, z1 - 1.1, y_top - 0.05, y_roof, cls, inst)
        _plane_part(cv, st, X, z0 + 1.05, z1 - 1.25, y_top + 0.05, y_roof - 0.07, cls, inst,
                    WINDOW)
    elif got is not None:
        sl, mask, ys, xs = got
        Zp, Yp = _plane_coords(st, X, ys, xs)
        bay = 1.6 if cls != TRUCK else 1e9
        band = (Yp > y_top * 0.45) & (Yp < y_top * 0.85) & ((Zp - z0) % bay > 0.25) & (
            Zp > z0 + 0.3) & (Zp < z1 - 0.3)
        if cls == TRUCK:
            band = (Yp > y_top - 1.3) & (Yp < y_top - 0.4) & (Zp < z0 + 1.0) & (Zp > z0 + 0.2)
        cv.set_detail(sl, mask & band, WINDOW)
    for zc in (z0 + 0.4 + r * 2, z1 - 0.4 - r * 2):
        if cls == TRAIN:
            break
        k = st.scale(zc)
        cx, cy = st.project(X, r, zc)
        foreshorten = abs(X) / max(zc, 0.5)  # |dx/dZ| on the plane, relative to f / Z
        cv.ellipse(cx, cy, max(r * k * foreshorten, 0.6), r * k, cls, inst, TYRE)
    if cls == TRAIN:
        _plane_part(cv, st, X, z0, z1, 0.0, 0.4, TRAIN, inst, DARK)


def _person(cv, st, X, Z, rng):
    k = st.scale(Z)
    x, y = st.project(X, 0.0, Z)
    h = rng.uniform(1.55, 1.95)
    inst = cv.new(PERSON)
    stride = rng.uniform(-0.15, 0.15) * h
    leg_w = 0.13 * k
    for dx, sx in ((-0.09, -1), (0.09, 1)):
        foot = x + (dx * k + sx * stride * k * 0.5)
        cv.line((x + dx * k, y - 0.48 * h * k), (foot, y), leg_w, PERSON, inst, DARK)
    cv.rect(x - 0.21 * k, x + 0.21 * k, y - 0.83 * h * k, y - 0.45 * h * k, PERSON, inst)
    for sx in (-1, 1):
        cv.line((x + sx * 0.23 * k, y - 0.8 * h * k),
                (x + sx * (0.25 + rng.uniform(0, 0.1)) * k, y - 0.5 * h * k), 0.09 * k, PERSON,
                inst)
    cv.ellipse(x, y - 0.91 * h * k, 0.095 * h * k * 0.8, 0.095 * h * k, PERSON, inst, SKIN)
    if rng.random() < 0.5:  # hair
        cv.ellipse(x, y - 0.95 * h * k, 0.08 * h * k, 0.05 * h * k, PERSON, inst, DARK)


def _two_wheeler(cv, st, cls, X, Z, rng, ridden):
    """A bicycle or motorcycle seen from the side, with its rider on it when `ridden`."""
    k = st.scale(Z)
    x, y = st.project(X, 0.0, Z)
    d = 1 if rng.random() < 0.5 else -1  # facing right or left
    inst = cv.new(cls)
    if cls == BICYCLE:
        r, half_base, seat_y, bar_y = 0.34, 0.55, 0.95, 1.0
    else:
        r, half_base, seat_y, bar_y = 0.32, 0.7, 0.8, 1.05
    rear = (x - d * half_base * k, y - r * k)
    front = (x + d * half_base * k, y - r * k)
    for cx, cy in (rear, front):
        cv.ellipse(cx, cy, r * k, r * k, cls, inst, TYRE)
        cv.ellipse(cx, cy, r * 0.75 * k, r * 0.75 * k, cls, inst)
    seat = (x - d * 0.15 * k, y - seat_y * k)
    bar = (x + d * 0.4 * k, y - bar_y * k)
    if cls == BICYCLE:
        crank = (x, y - r * k)
        for p, q in ((rear, seat), (seat, crank), (crank, rear), (seat, bar), (bar, front),
                     (crank, bar)):
            cv.line(p, q, 0.05 * k, cls, inst)
    else:
        cv.ellipse(x, y - 0.6 * k, 0.65 * k, 0.25 * k, cls, inst)
        cv.ellipse(x + d * 0.15 * k, y - 0.82 * k, 0.3 * k, 0.14 * k, cls, inst)
        cv.line(bar, front, 0.08 * k, cls, inst)
        cv.ellipse(x - d * 0.25 * k, y - 0.45 * k, 0.3 * k, 0.1 * k, cls, inst, DARK)
    if not ridden:
        return
    rider = cv.new(RIDER)
    hip = (seat[0], seat[1] - 0.05 * k)
    shoulder = (hip[0] + d * 0.25 * k, hip[1] - 0.55 * k)
    cv.line(hip, (x + d * 0.05 * k, y - 0.25 * k), 0.14 * k, RIDER, rider, DARK)
    cv.line(hip, shoulder, 0.36 * k, RIDER, rider)
    cv.line(shoulder, bar, 0.09 * k, RIDER, rider)
    head_code = DARK if cls == MOTORCYCLE else SKIN  # helmet
    cv.ellipse(shoulder[0] + d * 0.06 * k, shoulder[1] - 0.17 * k, 0.11 * k, 0.13 * k, RIDER,
               rider, head_code)


def _objects(cv, st, rng, objects):
    """Populate the street: a list of (depth, kind, params), drawn far to near."""
    lanes_lo, lanes_hi = st.x0 - st.road_hw + 1.1, st.x0 + st.road_hw - 1.1
    for _ in range(rng.poisson(4.0)):
        objects.append((rng.uniform(5.0, 70.0), "rear", dict(cls=CAR,
                                                              X=rng.uniform(lanes_lo, lanes_hi))))
    for cls, p in ((TRUCK, 0.35), (BUS, 0.3)):
        if rng.random() < p:
            objects.append((rng.uniform(8.0, 60.0), "rear", dict(cls=cls, X=rng.uniform(
                lanes_lo + 0.3, lanes_hi - 0.3))))
    # side views: parked cars at the curb, buses / trucks / trams in the other lanes
    for _ in range(rng.poisson(1.5)):
        side = rng.integers(2)
        X = st.edge(side) - (1 if side else -1) * rng.uniform(0.9, 1.3)
        objects.append((rng.uniform(4.0, 50.0), "side", dict(cls=CAR, X=X)))
    for cls, p in ((BUS, 0.2), (TRUCK, 0.15), (TRAIN, 0.18)):
        if rng.random() < p:
            side = rng.integers(2)
            X = st.x0 + (1 if side else -1) * rng.uniform(1.5, max(st.road_hw - 1.3, 1.6))
            objects.append((rng.uniform(6.0, 40.0), "side", dict(cls=cls, X=X)))
    # pedestrians on the sidewalks, in groups
    for _ in range(rng.poisson(2.0)):
        side = rng.integers(2)
        s = 1 if side else -1
        if st.sidewalk[side] <= 0:
            continue
        z = rng.uniform(4.0, 45.0)
        for _ in range(rng.integers(1, 4)):
            X = st.edge(side) + s * rng.uniform(0.4, st.sidewalk[side] + st.setback[side] * 0.5)
            objects.append((z + rng.uniform(-2.0, 2.0), "person", dict(X=X)))
    if rng.random() < 0.3:  # someone crossing the road
        objects.append((rng.uniform(6.0, 30.0), "person", dict(X=rng.uniform(lanes_lo,
                                                                             lanes_hi))))
    # cyclists and motorcyclists near the road edges, parked bicycles on the sidewalk
    for cls, n in ((BICYCLE, rng.poisson(0.9)), (MOTORCYCLE, rng.poisson(0.4))):
        for _ in range(n):
            ridden = rng.random() < (0.75 if cls == BICYCLE else 0.85)
            side = rng.integers(2)
            s = 1 if side else -1
            if ridden:
                X = st.edge(side) - s * rng.uniform(0.6, 2.5)
            else:
                X = st.edge(side) + s * rng.uniform(0.3, max(st.sidewalk[side], 0.5))
            objects.append((rng.uniform(5.0, 35.0), "two", dict(cls=cls, X=X, ridden=ridden)))
    # poles with lights and signs near the curbs
    for _ in range(rng.poisson(3.5)):
        side = rng.integers(2)
        s = 1 if side else -1
        X = st.edge(side) + s * rng.uniform(0.3, 0.8)
        objects.append((rng.uniform(4.0, 60.0), "pole", dict(X=X, towards_road=-s)))
    objects.sort(key=lambda o: -o[0])
    for Z, kind, p in objects:
        if kind == "tree":
            _tree(cv, st, p["X"], Z, rng)
        elif kind == "rear":
            _vehicle_rear(cv, st, p["cls"], p["X"], Z, rng)
        elif kind == "side":
            _vehicle_side(cv, st, p["cls"], p["X"], Z, rng)
        elif kind == "person":
            _person(cv, st, p["X"], max(Z, 3.0), rng)
        elif kind == "two":
            _two_wheeler(cv, st, p["cls"], p["X"], Z, rng, p["ridden"])
        elif kind == "pole":
            _pole(cv, st, p["X"], Z, rng, p["towards_road"])


class Layout:
    """One scene's geometry.

    Attributes:
        label: (H, W) uint8 train ids (255: the ego vehicle's bonnet, ignored).
        instance: (H, W) int32 index into `classes` / `rands`.
        detail: (H, W) uint8 detail codes (window, tyre, lamp ...).
        classes: (I,) uint8 class of each instance.
        rands: (I, 5) float32 uniform numbers of each instance (its shade).
        horizon: row of the horizon (float).
    """

    def __init__(self, label, instance, detail, classes, rands, horizon):
        self.label, self.instance, self.detail = label, instance, detail
        self.classes, self.rands, self.horizon = classes, rands, horizon


def generate_layout(height, width, rng):
    """Draw one street scene layout.

    Args:
        height, width: size in pixels (at least 16 each).
        rng: numpy Generator (the whole layout is a function of its state).
    Returns:
        a `Layout`.
    """
    if height < 16 or width < 16:
        raise ValueError(f"synthetic scenes need at least 16 x 16 pixels, got {height} x {width}")
    cv = _Canvas(height, width, rng)
    st = _Street(height, width, rng)
    _skyline(cv, st, rng)
    _ground(cv, st, rng)
    objects = []
    for side in (0, 1):
        _side(cv, st, side, rng, objects)
    _objects(cv, st, rng, objects)
    if rng.random() < 0.2:  # the ego vehicle's bonnet, void as in Cityscapes
        cv.ellipse(width * rng.uniform(0.4, 0.6), height * rng.uniform(1.0, 1.06),
                   width * rng.uniform(0.6, 0.9), height * rng.uniform(0.08, 0.14), VOID,
                   cv.new(VOID))
    return Layout(cv.label, cv.inst, cv.detail, np.array(cv.classes, np.uint8),
                  np.array(cv.rands, np.float32), st.yh)


def _rgb(*cols):
    return np.array(cols, np.float32) / 255.0


_VEHICLE_GAME = _rgb((220, 20, 20), (20, 60, 220), (245, 245, 245), (25, 25, 25), (240, 200, 0),
                     (20, 160, 60), (160, 160, 175), (250, 110, 0))
_VEHICLE_CAMERA = _rgb((40, 40, 45), (175, 178, 182), (120, 124, 130), (95, 25, 30),
                       (30, 45, 80), (215, 215, 212), (70, 78, 70), (140, 120, 95))
_CLOTHES_GAME = _rgb((230, 40, 40), (40, 40, 230), (250, 200, 30), (30, 180, 160),
                     (200, 60, 200), (240, 120, 20), (20, 20, 20))
_CLOTHES_CAMERA = _rgb((40, 40, 50), (95, 95, 105), (65, 52, 45), (125, 45, 45), (45, 62, 100),
                       (180, 178, 172), (110, 100, 70))

# Per class: swatches (one is drawn per instance) and the +- brightness / tint amplitudes.
# The game look is flat and saturated, the camera look muted; sky, vegetation and terrain change
# most between the two, road and vehicles least.
PALETTES = {
    "source": {
        ROAD: (_rgb((92, 72, 112), (80, 80, 104)), 0.12, 0.03),
        SIDEWALK: (_rgb((232, 150, 200), (210, 176, 214)), 0.10, 0.04),
        BUILDING: (_rgb((200, 90, 60), (230, 200, 120), (150, 150, 162), (236, 226, 210),
                        (222, 140, 90)), 0.2, 0.05),
        WALL: (_rgb((170, 170, 212), (192, 160, 192)), 0.12, 0.04),
        FENCE: (_rgb((222, 150, 70), (200, 120, 60)), 0.12, 0.04),
        POLE: (_rgb((172, 172, 172), (150, 160, 175)), 0.12, 0.03),
        LIGHT: (_rgb((62, 62, 22), (40, 40, 40)), 0.15, 0.03),
        SIGN: (_rgb((242, 222, 0), (222, 30, 30), (30, 90, 232)), 0.1, 0.03),
        VEGETATION: (_rgb((40, 200, 40), (72, 182, 22)), 0.15, 0.04),
        TERRAIN: (_rgb((182, 232, 80), (160, 220, 110)), 0.1, 0.04),
        SKY: (_rgb((60, 150, 255), (90, 170, 250)), 0.08, 0.03),
        PERSON: (_CLOTHES_GAME, 0.15, 0.05),
        RIDER: (_CLOTHES_GAME, 0.15, 0.05),
        CAR: (_VEHICLE_GAME, 0.15, 0.04),
        TRUCK: (_VEHICLE_GAME, 0.15, 0.04),
        BUS: (_rgb((232, 172, 0), (202, 30, 30), (30, 122, 202), (40, 170, 90)), 0.12, 0.04),
        TRAIN: (_rgb((240, 240, 240), (202, 40, 40), (250, 190, 20)), 0.1, 0.04),
        MOTORCYCLE: (_rgb((20, 20, 20), (202, 20, 20), (30, 30, 202), (240, 120, 0)), 0.15, 0.04),
        BICYCLE: (_rgb((30, 30, 30), (232, 80, 20), (30, 130, 232), (20, 190, 120)), 0.15, 0.04),
        VOID: (_rgb((40, 40, 40)), 0.1, 0.02),
    },
    "target": {
        ROAD: (_rgb((96, 96, 100), (112, 106, 100), (84, 86, 90)), 0.18, 0.03),
        SIDEWALK: (_rgb((180, 158, 168), (168, 160, 158), (150, 140, 132)), 0.15, 0.03),
        BUILDING: (_rgb((122, 100, 90), (150, 140, 125), (100, 100, 106), (172, 162, 150),
                        (110, 85, 70)), 0.3, 0.04),
        WALL: (_rgb((150, 150, 140), (130, 125, 115)), 0.2, 0.03),
        FENCE: (_rgb((110, 110, 105), (135, 120, 100)), 0.2, 0.03),
        POLE: (_rgb((76, 76, 82), (100, 98, 92)), 0.2, 0.03),
        LIGHT: (_rgb((30, 30, 30), (45, 42, 35)), 0.2, 0.02),
        SIGN: (_rgb((215, 195, 45), (185, 45, 42), (42, 80, 165)), 0.15, 0.03),
        VEGETATION: (_rgb((70, 125, 45), (55, 105, 50), (95, 125, 55)), 0.25, 0.04),
        TERRAIN: (_rgb((140, 160, 80), (150, 145, 90)), 0.2, 0.04),
        SKY: (_rgb((140, 180, 225), (165, 195, 230), (195, 205, 220)), 0.08, 0.02),
        PERSON: (_CLOTHES_CAMERA, 0.25, 0.04),
        RIDER: (_CLOTHES_CAMERA, 0.25, 0.04),
        CAR: (_VEHICLE_CAMERA, 0.2, 0.03),
        TRUCK: (_VEHICLE_CAMERA, 0.2, 0.03),
        BUS: (_rgb((202, 202, 192), (182, 150, 60), (60, 90, 140)), 0.15, 0.03),
        TRAIN: (_rgb((212, 212, 202), (152, 60, 50), (180, 170, 90)), 0.15, 0.03),
        MOTORCYCLE: (_rgb((30, 30, 30), (82, 82, 88), (122, 30, 30)), 0.2, 0.03),
        BICYCLE: (_rgb((30, 30, 30), (82, 82, 88), (122, 30, 30)), 0.2, 0.03),
        VOID: (_rgb((30, 30, 32)), 0.1, 0.02),
    },
}
# Detail colours per domain (SHADOW and SLAT darken what is under them instead).
DETAILS = {
    "source": {WINDOW: _rgb((60, 200, 240))[0], LANE: _rgb((255, 255, 255))[0],
               TYRE: _rgb((18, 18, 18))[0], LAMP_RED: _rgb((255, 0, 0))[0],
               LAMP_AMBER: _rgb((255, 200, 0))[0], LAMP_GREEN: _rgb((0, 255, 60))[0],
               SIGN_FACE: _rgb((255, 255, 255))[0], SKIN: _rgb((255, 200, 160))[0],
               DARK: _rgb((30, 30, 80))[0], CURB: _rgb((250, 250, 250))[0],
               TRUNK: _rgb((122, 70, 20))[0], TAILLIGHT: _rgb((255, 30, 30))[0]},
    "target": {WINDOW: _rgb((52, 60, 70))[0], LANE: _rgb((200, 200, 190))[0],
               TYRE: _rgb((25, 25, 27))[0], LAMP_RED: _rgb((200, 70, 55))[0],
               LAMP_AMBER: _rgb((200, 160, 60))[0], LAMP_GREEN: _rgb((80, 190, 120))[0],
               SIGN_FACE: _rgb((228, 228, 222))[0], SKIN: _rgb((196, 158, 130))[0],
               DARK: _rgb((36, 36, 40))[0], CURB: _rgb((180, 176, 170))[0],
               TRUNK: _rgb((70, 56, 42))[0], TAILLIGHT: _rgb((150, 35, 35))[0]},
}
DARKEN = {"source": {SHADOW: 0.8, SLAT: 0.65}, "target": {SHADOW: 0.45, SLAT: 0.5}}
# Target texture amplitudes per class: (coarse blotches, fine grain).
TEXTURE = {ROAD: (0.10, 0.08), SIDEWALK: (0.08, 0.08), BUILDING: (0.12, 0.07), WALL: (0.1, 0.07),
           FENCE: (0.06, 0.1), POLE: (0.04, 0.04), LIGHT: (0.02, 0.03), SIGN: (0.03, 0.03),
           VEGETATION: (0.25, 0.3), TERRAIN: (0.2, 0.2), SKY: (0.05, 0.01), PERSON: (0.05, 0.06),
           RIDER: (0.05, 0.06), CAR: (0.05, 0.04), TRUCK: (0.06, 0.05), BUS: (0.05, 0.04),
           TRAIN: (0.05, 0.04), MOTORCYCLE: (0.05, 0.05), BICYCLE: (0.05, 0.05),
           VOID: (0.02, 0.02)}


def _instance_colours(layout, domain):
    """(I, 3) float32 RGB in [0, 1]: a swatch of the instance's class and a random shade."""
    palette = PALETTES[domain]
    out = np.zeros((len(layout.classes), 3), np.float32)
    for cls in np.unique(layout.classes):
        idx = np.flatnonzero(layout.classes == cls)
        swatches, bright, tint = palette[int(cls)]
        r = layout.rands[idx]
        base = swatches[np.minimum((r[:, 0] * len(swatches)).astype(np.int64), len(swatches) - 1)]
        gain = 1.0 + bright * (2 * r[:, 1:2] - 1)
        out[idx] = base * gain + tint * (2 * r[:, 2:5] - 1)
    return np.clip(out, 0.0, 1.0)


def _noise(h, w, cell, rng):
    """Smooth noise in about [-1, 1]: a Gaussian grid of `cell` pixels, bilinearly upsampled."""
    gh, gw = max(int(np.ceil(h / cell)) + 1, 2), max(int(np.ceil(w / cell)) + 1, 2)
    grid = rng.standard_normal((gh, gw)).astype(np.float32)
    up = Image.fromarray(grid, mode="F").resize((w, h), Image.BILINEAR)
    return np.asarray(up)


@dataclasses.dataclass(frozen=True)
class Look:
    """How a domain renders a layout (ranges are drawn uniformly per image).

    Args:
        palette: where the colours lie between the game palette (0) and the camera palette
            (1): each instance's colour, detail colour and darkening factor is
            (1 - palette) * game + palette * camera (`PALETTES`, `DETAILS`, `DARKEN`), both
            drawn with the instance's same random numbers. The main knob of the domain gap.
        gain: brightness factor range.
        cast: per-channel colour cast amplitude (factor 1 +- cast).
        texture: multiplies the per-class texture amplitudes of `TEXTURE` (0: flat colours).
        light: strength of the lighting gradient and vignetting (0: none, 1: default).
        haze: range of the haze strength at the horizon (fades into the sky colour).
        blur: range of the Gaussian blur sigma, in pixels of a 256-row image.
        noise: range of the sensor noise standard deviation, in 0..255 units.
        sky_gradient: the game's stylised sky, lighter towards the horizon.
    """
    palette: float = 0.0
    gain: Tuple[float, float] = (1.0, 1.0)
    cast: float = 0.0
    texture: float = 0.0
    light: float = 0.0
    haze: Tuple[float, float] = (0.0, 0.0)
    blur: Tuple[float, float] = (0.0, 0.0)
    noise: Tuple[float, float] = (0.0, 0.0)
    sky_gradient: bool = False


LOOKS = {
    # flat, saturated, sharp; one brightness / tint per image (the game's time of day)
    "source": Look(palette=0.0, gain=(0.85, 1.15), cast=0.05, sky_gradient=True),
    # muted palette, texture, lighting, haze, colour cast, blur, sensor noise
    "target": Look(palette=0.5, gain=(0.75, 1.15), cast=0.08, texture=1.0, light=1.0,
                   haze=(0.1, 0.35), blur=(0.6, 1.2), noise=(2.0, 6.0)),
}


def render(layout, domain, rng, *, look=None):
    """Render a layout in one domain's look.

    Args:
        layout: from `generate_layout`.
        domain: "source" (flat, saturated, sharp) or "target" (muted, textured, lit, hazy,
            blurred, noisy); names the default look.
        rng: numpy Generator for the rendering's own randomness (lighting, noise). The
            numbers of each effect are drawn whatever the look's settings, so changing one
            effect leaves the others as they were.
        look: a `Look` overriding `LOOKS[domain]` (e.g. a weaker or stronger domain gap).
    Returns:
        (H, W, 3) uint8 RGB.
    """
    if domain not in DOMAINS:
        raise ValueError(f"domain must be one of {sorted(DOMAINS)}, got {domain!r}")
    look = LOOKS[domain] if look is None else look
    m = float(look.palette)
    if not 0.0 <= m <= 1.0:
        raise ValueError(f"look.palette must be in [0, 1], got {look.palette}")
    h, w = layout.label.shape
    colours = (1 - m) * _instance_colours(layout, "source") + m * _instance_colours(layout,
                                                                                   "target")
    img = colours[layout.instance]  # (H, W, 3)
    det = layout.detail
    for code, colour in DETAILS["source"].items():
        img[det == code] = (1 - m) * colour + m * DETAILS["target"][code]
    for code, factor in DARKEN["source"].items():
        img[det == code] *= (1 - m) * factor + m * DARKEN["target"][code]
    ys = (np.arange(h, dtype=np.float32)[:, None] + 0.5) / h  # (H, 1) in [0, 1]
    xs = (np.arange(w, dtype=np.float32)[None, :] + 0.5) / w  # (1, W)
    sky = layout.label == SKY
    scale = h / 256.0  # effects are sized for a 256-row image and scale with it
    # every random draw happens whatever the settings (stable streams)
    gain = rng.uniform(*look.gain)
    cast = 1 + look.cast * rng.uniform(-1.0, 1.0, size=3)
    coarse = _noise(h, w, 24 * scale, rng)
    fine = _noise(h, w, max(1.5 * scale, 1.0), rng)
    gx, gy, vig = rng.uniform(-0.35, 0.35), rng.uniform(-0.25, 0.1), rng.uniform(0.1, 0.35)
    haze_gain, haze = rng.uniform(0.9, 1.05), rng.uniform(*look.haze)
    sigma = rng.uniform(*look.blur) * scale
    noise_std = rng.uniform(*look.noise)
    if look.sky_gradient:
        rows = np.broadcast_to(ys * (h / max(layout.horizon, 1.0)), (h, w))
        img[sky] *= (0.85 + 0.3 * np.minimum(rows[sky], 1.0))[:, None]
    if look.texture > 0:
        coarse_amp = np.zeros(256, np.float32)
        fine_amp = np.zeros(256, np.float32)
        for cls, (a, b) in TEXTURE.items():
            coarse_amp[cls], fine_amp[cls] = look.texture * a, look.texture * b
        img *= (1.0 + coarse_amp[layout.label] * coarse + fine_amp[layout.label] * fine)[..., None]
    if look.light > 0:
        # sun from one side, darker towards the bottom, vignetting
        light = 1 + look.light * (gx * (xs - 0.5) + gy * (ys - 0.5))
        light = light * (1 - look.light * vig * ((xs - 0.5) ** 2 + (ys - 0.5) ** 2) * 2)
        img *= light[..., None]
    if haze > 0:
        # distant things (near the horizon row) fade into the sky colour
        sky_col = (1 - m) * PALETTES["source"][SKY][0][0] + m * PALETTES["target"][SKY][0][0]
        haze_col = sky_col * haze_gain
        amount = haze * np.exp(-np.abs(ys * h - layout.horizon) / (0.07 * h))  # (H, 1)
        amount = np.where(sky, 0.0, amount)[..., None]
        img = img * (1 - amount) + haze_col * amount
    img *= (gain * cast).astype(np.float32)
    out = (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)
    if sigma > 0:
        out = np.asarray(Image.fromarray(out).filter(ImageFilter.GaussianBlur(radius=sigma)))
    if noise_std > 0:
        noisy = out.astype(np.float32) + rng.normal(0, noise_std, size=(h, w, 3)).astype(
            np.float32)
        out = np.clip(noisy + 0.5, 0, 255).astype(np.uint8)
    return out


def scene_rng(seed, split, index, stream):
    """The generator of one part of one scene: stream 0 the layout, 1 / 2 the source / target
    rendering."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    if index < 0 or seed < 0:
        raise ValueError(f"seed and index must be >= 0, got {seed}, {index}")
    return np.random.default_rng([int(seed), SPLITS[split], int(index), int(stream)])


def make_layout(index, *, split="train", seed=0, height=256, width=512):
    """The layout of scene (seed, split, index)."""
    return generate_layout(height, width, scene_rng(seed, split, index, 0))


def make_scene(index, *, split="train", seed=0, height=256, width=512, domain="source",
               look=None):
    """Scene (seed, split, index) in one domain: ((H, W, 3) uint8 RGB, (H, W) uint8 train ids).
    The label does not depend on the domain. `look` overrides the domain's `Look`."""
    layout = make_layout(index, split=split, seed=seed, height=height, width=width)
    if domain not in DOMAINS:
        raise ValueError(f"domain must be one of {sorted(DOMAINS)}, got {domain!r}")
    img = render(layout, domain, scene_rng(seed, split, index, DOMAINS[domain]), look=look)
    return img, layout.label


class SyntheticDataset(SegmentationDataset):
    """Synthetic scenes generated on the fly, with the same sample dict and transforms as the
    real data sets.

    Args:
        domain: "source" (game look) or "target" (camera look).
        split: "train", "val" or "test"; the splits never share a scene.
        num_samples: number of scenes (indices 0 .. num_samples - 1).
        size: (height, width) of the generated scenes.
        seed: scene seed; the same (seed, split, index) is the same layout in both domains, so
            give the source and target training sets different seeds.
        transform: a `SegTransform` (None: normalise only).
        sample_seed: seeds `__getitem__`'s generator of the transform's random choices.
        look: a `Look` overriding the domain's default appearance.
    """

    def __init__(self, *, domain="source", split="train", num_samples=1000, size=(256, 512),
                 seed=0, transform=None, sample_seed=0, look=None):
        if domain not in DOMAINS:
            raise ValueError(f"domain must be one of {sorted(DOMAINS)}, got {domain!r}")
        if split not in SPLITS:
            raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if len(size) != 2 or min(size) < 16:
            raise ValueError(f"size must be (height, width) of at least 16, got {size}")
        super().__init__(transform=transform, seed=sample_seed)
        self.domain, self.split = domain, split
        self.num_samples, self.size, self.scene_seed = int(num_samples), tuple(size), int(seed)
        self.look = look

    def __len__(self):
        return self.num_samples

    def name(self, index):
        return f"{self.split}/{self.scene_seed}/{index:06d}"

    def path(self, index):
        return f"synthetic://{self.domain}/{self.name(index)}"

    def load(self, index):
        self._check_index(index)
        return make_scene(index, split=self.split, seed=self.scene_seed, height=self.size[0],
                          width=self.size[1], domain=self.domain, look=self.look)

    def load_label(self, index):
        self._check_index(index)
        return make_layout(index, split=self.split, seed=self.scene_seed, height=self.size[0],
                           width=self.size[1]).label


def to_cityscapes_ids(label):
    """(H, W) train ids -> (H, W) uint8 Cityscapes label ids (255 and unknown -> 0, unlabelled)."""
    table = np.zeros(256, np.uint8)
    for train_id, label_id in TRAINID_TO_CITYSCAPES_ID.items():
        table[train_id] = label_id
    return table[np.asarray(label)]


def write_cityscapes(root, *, domain, splits, size=(256, 512), seed=0, progress=True):
    """Write scenes in the Cityscapes layout, city "synthetic":
    `leftImg8bit/{split}/synthetic/synthetic_{seed:06d}_{index:06d}_leftImg8bit.png` and
    `gtFine/{split}/synthetic/..._gtFine_labelIds.png` (Cityscapes label ids). Existing files
    are kept (an interrupted run can be rerun); every file is written atomically.

    Args:
        root: output folder.
        domain: "source" or "target".
        splits: mapping split -> number of scenes, e.g. {"train": 500, "val": 100}.
        size: (height, width).
        seed: scene seed.
        progress: show a tqdm bar.
    Returns:
        number of scenes written (not counting those already there).
    """
    if domain not in DOMAINS:
        raise ValueError(f"domain must be one of {sorted(DOMAINS)}, got {domain!r}")
    jobs = []
    for split, n in splits.items():
        if split not in SPLITS or n < 0:
            raise ValueError(f"bad split / count {split!r}: {n}")
        img_dir = os.path.join(root, "leftImg8bit", split, "synthetic")
        gt_dir = os.path.join(root, "gtFine", split, "synthetic")
        os.makedirs(img_dir, exist_ok=True)
        os.makedirs(gt_dir, exist_ok=True)
        for i in range(n):
            base = f"synthetic_{seed:06d}_{i:06d}"
            jobs.append((split, i, os.path.join(img_dir, base + CS_IMG_SUFFIX),
                         os.path.join(gt_dir, base + CS_RAW_SUFFIX)))
    if progress:
        from tqdm import tqdm
        jobs = tqdm(jobs, desc=f"synthetic {domain}", unit="scene")
    written = 0
    for split, i, img_path, gt_path in jobs:
        if os.path.isfile(img_path) and os.path.isfile(gt_path):
            continue
        img, label = make_scene(i, split=split, seed=seed, height=size[0], width=size[1],
                                domain=domain)
        write_png_atomic(gt_path, to_cityscapes_ids(label))
        write_png_atomic(img_path, img)  # the image last: both present means the pair is whole
        written += 1
    return written


def grid(n=4, *, size=(256, 512), seed=0, split="train"):
    """(n * H, 3 * W, 3) uint8: rows of source image, target image, colourised label."""
    rows = []
    for i in range(n):
        layout = make_layout(i, split=split, seed=seed, height=size[0], width=size[1])
        src = render(layout, "source", scene_rng(seed, split, i, DOMAINS["source"]))
        tgt = render(layout, "target", scene_rng(seed, split, i, DOMAINS["target"]))
        rows.append(np.concatenate([src, tgt, colorize(layout.label)], axis=1))
    return np.concatenate(rows, axis=0)


def measure_speed(*, n=50, size=(256, 512), seed=0):
    """Milliseconds per scene: (layout, source rendering, target rendering), medians over n."""
    times = {"layout": [], "source": [], "target": []}
    for i in range(n):
        t0 = time.perf_counter()
        layout = make_layout(i, seed=seed, height=size[0], width=size[1])
        t1 = time.perf_counter()
        render(layout, "source", scene_rng(seed, "train", i, 1))
        t2 = time.perf_counter()
        render(layout, "target", scene_rng(seed, "train", i, 2))
        t3 = time.perf_counter()
        times["layout"].append(t1 - t0)
        times["source"].append(t2 - t1)
        times["target"].append(t3 - t2)
    return {k: 1000 * float(np.median(v)) for k, v in times.items()}


def _size(text):
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must be HxW, e.g. 256x512, got {text!r}")
    if h < 16 or w < 16:
        raise argparse.ArgumentTypeError(f"size must be at least 16x16, got {text!r}")
    return h, w


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m cluda.data.synthetic",
                                     description="The synthetic source / target street scenes.")
    sub = parser.add_subparsers(dest="command", required=True)
    w = sub.add_parser("write", help="cache scenes to disk in the Cityscapes layout")
    w.add_argument("root")
    w.add_argument("--domain", choices=sorted(DOMAINS), required=True)
    w.add_argument("--train", type=int, default=500, help="number of train scenes")
    w.add_argument("--val", type=int, default=100, help="number of val scenes")
    w.add_argument("--size", type=_size, default=(256, 512), help="HxW")
    w.add_argument("--seed", type=int, default=0)
    g = sub.add_parser("grid", help="PNG grid: source image | target image | label")
    g.add_argument("out")
    g.add_argument("--n", type=int, default=4)
    g.add_argument("--size", type=_size, default=(256, 512), help="HxW")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--split", choices=sorted(SPLITS), default="train")
    s = sub.add_parser("speed", help="time the generator")
    s.add_argument("--n", type=int, default=50)
    s.add_argument("--size", type=_size, default=(256, 512), help="HxW")
    args = parser.parse_args(argv)
    if args.command == "write":
        n = write_cityscapes(args.root, domain=args.domain,
                             splits={"train": args.train, "val": args.val}, size=args.size,
                             seed=args.seed)
        print(f"{n} scenes written under {args.root}")
    elif args.command == "grid":
        if args.n < 1:
            parser.error("--n must be >= 1")
        folder = os.path.dirname(os.path.abspath(args.out))
        os.makedirs(folder, exist_ok=True)
        write_png_atomic(args.out, grid(args.n, size=args.size, seed=args.seed, split=args.split))
        print(f"wrote {args.out}")
    else:
        ms = measure_speed(n=args.n, size=args.size)
        print(f"{args.size[0]}x{args.size[1]}: layout {ms['layout']:.1f} ms, source "
              f"{ms['source']:.1f} ms, target {ms['target']:.1f} ms per scene (median of "
              f"{args.n})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
