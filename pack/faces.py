"""Procedural faces whose identity is learnable from shape, not from colour.

An identity is a fixed set of traits (head shape, feature geometry, hairstyle,
accessories); an image of it varies pose, scale, position, lighting, expression,
background and blur. Skin and hair colours come from small shared palettes, so
colour alone narrows an identity down to a crowd, never to one person.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter

CANVAS = 256
"""Faces are drawn on a square canvas of this side, then warped to the crop size."""

SKIN_TONES = [(241, 204, 178), (224, 172, 138), (198, 144, 104), (160, 110, 75), (118, 80, 56), (86, 58, 42)]
HAIR_COLOURS = [(25, 20, 18), (70, 45, 30), (120, 80, 45), (180, 140, 80), (150, 150, 150), (110, 40, 25)]
EYE_COLOURS = [(40, 30, 25), (60, 90, 120), (70, 100, 60), (90, 60, 35)]
ZOOM = 0.7
"""Share of the canvas a crop shows: the face fills about half the crop, as with the real 40% margin,
and rotated canvas corners stay outside it."""
HAIRSTYLES = ("bald", "short", "long", "bob", "fringe", "top", "side_part", "curly")


@dataclass(frozen=True)
class Traits:
    """What stays the same across every image of one identity (canvas units)."""

    skin: tuple[int, int, int]
    hair: tuple[int, int, int]
    eye_colour: tuple[int, int, int]
    head_w: float
    head_h: float
    jaw: float
    eye_y: float
    eye_dx: float
    eye_w: float
    eye_h: float
    brow_thick: float
    brow_tilt: float
    brow_gap: float
    nose_len: float
    nose_w: float
    nose_style: int
    mouth_y: float
    mouth_w: float
    mouth_thick: float
    mouth_curve: float
    ear_size: float
    hairstyle: str
    hairline: float
    glasses: int
    beard: bool
    moustache: bool
    earrings: bool
    hat: bool
    mole: tuple[float, float] | None


def make_traits(rng: np.random.Generator) -> Traits:
    """Draw one identity; shape parameters are wide, colours come from small palettes."""
    u = rng.uniform
    mole = (float(u(-0.6, 0.6)), float(u(-0.2, 0.5))) if rng.random() < 0.3 else None
    return Traits(
        skin=SKIN_TONES[rng.integers(len(SKIN_TONES))],
        hair=HAIR_COLOURS[rng.integers(len(HAIR_COLOURS))],
        eye_colour=EYE_COLOURS[rng.integers(len(EYE_COLOURS))],
        head_w=float(u(70, 104)),
        head_h=float(u(96, 128)),
        jaw=float(u(0.0, 1.0)),
        eye_y=float(u(-0.22, 0.02)),
        eye_dx=float(u(0.28, 0.48)),
        eye_w=float(u(9, 19)),
        eye_h=float(u(4, 10)),
        brow_thick=float(u(2, 8)),
        brow_tilt=float(u(-0.35, 0.35)),
        brow_gap=float(u(6, 16)),
        nose_len=float(u(14, 36)),
        nose_w=float(u(6, 18)),
        nose_style=int(rng.integers(3)),
        mouth_y=float(u(0.38, 0.62)),
        mouth_w=float(u(18, 50)),
        mouth_thick=float(u(2, 9)),
        mouth_curve=float(u(-6, 8)),
        ear_size=float(u(8, 20)),
        hairstyle=HAIRSTYLES[rng.integers(len(HAIRSTYLES))],
        hairline=float(u(0.45, 0.8)),
        glasses=int(rng.choice(3, p=[0.7, 0.15, 0.15])),
        beard=bool(rng.random() < 0.2),
        moustache=bool(rng.random() < 0.15),
        earrings=bool(rng.random() < 0.15),
        hat=bool(rng.random() < 0.08),
        mole=mole,
    )


def _shade(colour: tuple[int, int, int], factor: float) -> tuple[int, int, int]:
    return tuple(int(max(0, min(255, c * factor))) for c in colour)


def _face_layer(t: Traits, rng: np.random.Generator) -> Image.Image:
    """The face on a transparent canvas, with this image's expression and yaw."""
    img = Image.new("RGBA", (CANVAS, CANVAS), (0, 0, 0, 0))
    d = ImageDraw.Draw(img)
    cx, cy = CANVAS / 2, CANVAS / 2 + 6
    hw, hh = t.head_w / 2, t.head_h / 2
    yaw = float(rng.uniform(-0.28, 0.28))
    shift = yaw * hw * 0.45
    smile = float(rng.uniform(-3, 5))
    openness = float(rng.uniform(0.55, 1.15))
    brow_raise = float(rng.uniform(-2, 3))
    skin = _shade(t.skin, float(rng.uniform(0.94, 1.06)))
    hair = t.hair

    if t.hairstyle in ("long", "bob", "curly"):
        drop = {"long": 1.25, "bob": 0.7, "curly": 0.85}[t.hairstyle]
        d.ellipse([cx - hw - 14, cy - hh - 14, cx + hw + 14, cy + hh * drop], fill=hair)
        if t.hairstyle == "long":
            d.rectangle([cx - hw - 14, cy, cx + hw + 14, cy + hh * 1.45], fill=hair)
        if t.hairstyle == "curly":
            for k in range(14):
                a = math.pi * (1.05 + k / 13 * 0.9)
                r = 14
                d.ellipse([cx + (hw + 4) * math.cos(a) - r, cy + (hh + 2) * math.sin(a) - r,
                           cx + (hw + 4) * math.cos(a) + r, cy + (hh + 2) * math.sin(a) + r], fill=hair)

    ear_y = cy + t.eye_y * hh + 6
    for side in (-1, 1):
        ex = cx + side * (hw - 2) + shift * 0.3
        d.ellipse([ex - t.ear_size / 2, ear_y - t.ear_size, ex + t.ear_size / 2, ear_y + t.ear_size],
                  fill=_shade(skin, 0.92))
        if t.earrings:
            d.ellipse([ex - 3, ear_y + t.ear_size - 2, ex + 3, ear_y + t.ear_size + 4], fill=(230, 200, 60))

    jaw_pts = []
    for k in range(40):
        a = 2 * math.pi * k / 40
        x, y = math.cos(a), math.sin(a)
        if y > 0:
            x *= 1 - 0.35 * t.jaw * y
            y *= 1 + 0.08 * t.jaw
        jaw_pts.append((cx + hw * x, cy + hh * y))
    d.polygon(jaw_pts, fill=skin)

    if t.beard:
        beard = [(cx + hw * 0.95 * math.cos(a), cy + hh * 0.2 + hh * 0.85 * math.sin(a))
                 for a in np.linspace(0.05, math.pi - 0.05, 20)]
        d.polygon([(cx - hw * 0.95, cy + hh * 0.15), *beard[::-1], (cx + hw * 0.95, cy + hh * 0.15)],
                  fill=_shade(hair, 1.1))

    top = cy - hh
    if t.hairstyle != "bald":
        line = top + hh * (1 - t.hairline) * 0.6
        if t.hairstyle == "top":
            d.rectangle([cx - hw * 0.55, top - 22, cx + hw * 0.55, line + 4], fill=hair)
        else:
            d.chord([cx - hw - 3, top - 8, cx + hw + 3, line + hh * 0.9], 180, 360, fill=hair)
        if t.hairstyle == "fringe":
            d.rectangle([cx - hw * 0.8, line, cx + hw * 0.8, line + hh * 0.28], fill=hair)
        if t.hairstyle == "side_part":
            d.polygon([(cx - hw, line + 4), (cx - hw * 0.1, top - 6), (cx + hw * 0.6, line + hh * 0.3)], fill=hair)
    if t.hat:
        d.rectangle([cx - hw - 16, top + 4, cx + hw + 16, top + 14], fill=(40, 40, 60))
        d.rectangle([cx - hw * 0.8, top - 34, cx + hw * 0.8, top + 8], fill=(40, 40, 60))

    eye_cy = cy + t.eye_y * hh
    for side in (-1, 1):
        ex = cx + side * t.eye_dx * hw + shift
        eh = t.eye_h * openness
        d.ellipse([ex - t.eye_w / 2, eye_cy - eh / 2, ex + t.eye_w / 2, eye_cy + eh / 2], fill=(245, 245, 240))
        pr = min(t.eye_w, max(eh, 3)) * 0.35
        px = ex + yaw * t.eye_w * 0.3
        d.ellipse([px - pr, eye_cy - pr, px + pr, eye_cy + pr], fill=t.eye_colour)
        by = eye_cy - t.brow_gap - brow_raise
        tilt = side * t.brow_tilt * t.eye_w
        d.line([(ex - t.eye_w * 0.7, by + tilt), (ex + t.eye_w * 0.7, by - tilt)], fill=_shade(hair, 0.8),
               width=max(1, int(t.brow_thick)))
        if t.glasses:
            r = t.eye_w * 0.85
            box = [ex - r, eye_cy - r * 0.8, ex + r, eye_cy + r * 0.8]
            if t.glasses == 1:
                d.ellipse(box, outline=(20, 20, 20), width=3)
            else:
                d.rectangle(box, outline=(20, 20, 20), width=3)
    if t.glasses:
        d.line([(cx - t.eye_dx * hw + shift + t.eye_w * 0.85, eye_cy),
                (cx + t.eye_dx * hw + shift - t.eye_w * 0.85, eye_cy)], fill=(20, 20, 20), width=3)

    nx, ny = cx + shift * 1.2, eye_cy + 6
    nose_col = _shade(skin, 0.72)
    if t.nose_style == 0:
        d.line([(nx, ny), (nx - t.nose_w / 3, ny + t.nose_len), (nx + t.nose_w / 3, ny + t.nose_len)],
               fill=nose_col, width=3)
    elif t.nose_style == 1:
        d.polygon([(nx, ny), (nx - t.nose_w / 2, ny + t.nose_len), (nx + t.nose_w / 2, ny + t.nose_len)],
                  fill=_shade(skin, 0.85))
    else:
        d.ellipse([nx - t.nose_w / 2, ny + t.nose_len - 6, nx + t.nose_w / 2, ny + t.nose_len + 4], fill=nose_col)

    my = cy + t.mouth_y * hh
    mx = cx + shift
    curve = t.mouth_curve + smile
    if t.moustache:
        d.rectangle([mx - t.mouth_w * 0.55, my - 9, mx + t.mouth_w * 0.55, my - 4], fill=_shade(hair, 1.1))
    pts = [(mx + t.mouth_w / 2 * x, my - curve * (x * x - 0.5)) for x in np.linspace(-1, 1, 9)]
    d.line(pts, fill=(150, 60, 60), width=max(1, int(t.mouth_thick)))

    if t.mole:
        mx2, my2 = cx + t.mole[0] * hw + shift, cy + t.mole[1] * hh
        d.ellipse([mx2 - 3, my2 - 3, mx2 + 3, my2 + 3], fill=(60, 40, 30))
    return img


def background(rng: np.random.Generator, size: int) -> Image.Image:
    """A backdrop unrelated to the identity: a two-colour gradient with a few blobs."""
    turns = (Image.Transpose.FLIP_LEFT_RIGHT, Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_180,
             Image.Transpose.ROTATE_270)
    mask = Image.linear_gradient("L").transpose(turns[int(rng.integers(len(turns)))])
    if mask.size[0] != size:
        mask = mask.resize((size, size))
    c0, c1 = (tuple(int(v) for v in rng.integers(0, 256, 3)) for _ in range(2))
    bg = Image.composite(Image.new("RGB", (size, size), c0), Image.new("RGB", (size, size), c1), mask)
    d = ImageDraw.Draw(bg)
    for _ in range(int(rng.integers(0, 5))):
        x, y, r = rng.uniform(0, size), rng.uniform(0, size), rng.uniform(size * 0.05, size * 0.3)
        d.ellipse([x - r, y - r, x + r, y + r], fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    return bg


_NOISE_SIGMAS = (0.0, 2.0, 4.0, 6.0)


@lru_cache(maxsize=1)
def _noise_bank() -> list[Image.Image]:
    """Sensor-noise tiles, centred on 128, drawn once per process from a fixed seed."""
    rng = np.random.default_rng(12345)
    return [Image.fromarray(np.clip(128 + rng.normal(0, s, (CANVAS, CANVAS, 3)), 0, 255).astype(np.uint8))
            for s in _NOISE_SIGMAS for _ in range(2)]


def _light(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Exposure, white balance, a directional light falloff and sensor noise, all in PIL's C loops."""
    falloff = float(rng.uniform(0, 0.35))
    gain = float(rng.uniform(0.7, 1.2)) / (1 - falloff / 2)
    white = rng.uniform(0.9, 1.1, 3)
    lut = np.concatenate([np.clip(np.arange(256) * gain * w, 0, 255) for w in white]).astype(np.uint8)
    img = img.point(lut.tolist())
    shade = Image.linear_gradient("L").rotate(float(rng.uniform(0, 360)), resample=Image.NEAREST, expand=False,
                                              fillcolor=128)
    shade = shade.point(lambda v: int(255 * (1 - falloff * v / 255)))
    img = ImageChops.multiply(img, Image.merge("RGB", (shade, shade, shade)))
    noise = _noise_bank()[int(rng.integers(len(_NOISE_SIGMAS) * 2))]
    return ImageChops.add(img, noise, scale=1.0, offset=-128)


def render(t: Traits, rng: np.random.Generator, width: int, height: int, second: Traits | None = None) -> Image.Image:
    """One photo of identity `t` as an RGB crop of the given size.

    `second` adds a smaller, partly cut-off face of another person at the edge, as
    the real set's multi-person crops have. A non-square size is a square crop cut
    by the photo's border.
    """
    face = _face_layer(t, rng)
    scale = float(rng.uniform(0.85, 1.15))
    angle = math.radians(float(rng.uniform(-12, 12)))
    tx, ty = rng.uniform(-0.05, 0.05, 2) * CANVAS
    img = background(rng, CANVAS).convert("RGBA")
    if second is not None:
        other = _face_layer(second, rng).resize((CANVAS * 3 // 5, CANVAS * 3 // 5), Image.BILINEAR)
        img.alpha_composite(other, (int(CANVAS * 0.62), int(rng.uniform(0, CANVAS * 0.3))))
    img.alpha_composite(face)
    img = img.convert("RGB")
    # Lighting, sensor noise and focus blur at canvas resolution: a fixed cost whatever the crop size.
    img = _light(img, rng)
    if rng.random() < 0.3:
        img = img.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.5, 2.0))))
    side = CANVAS
    while max(width, height) * 2 <= side:  # shrink first, so the warp below does not alias
        img, side, tx, ty = img.reduce(2), side // 2, tx / 2, ty / 2

    # One affine warp from output pixels to canvas pixels: rotation and scale about the
    # centre, a shift, and the change of size, so the image is resampled only once.
    s0 = ZOOM * side / max(width, height)
    cos, sin = math.cos(angle) / scale, math.sin(angle) / scale
    x0, y0 = s0 * (0.5 - width / 2) - tx, s0 * (0.5 - height / 2) - ty
    mid = side / 2
    matrix = (cos * s0, sin * s0, mid + cos * x0 + sin * y0, -sin * s0, cos * s0, mid - sin * x0 + cos * y0)
    img = img.transform((width, height), Image.AFFINE, matrix, resample=Image.BILINEAR,
                        fillcolor=tuple(int(v) for v in rng.integers(0, 60, 3)))

    return img


def add_streaks(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Bands of saturated colour across the image, like the real set's corrupted scans."""
    arr = np.asarray(img).copy()
    h, w = arr.shape[:2]
    horizontal = rng.random() < 0.7
    n = int(rng.integers(2, 6))
    length = h if horizontal else w
    for _ in range(n):
        band = max(2, int(length * rng.uniform(0.03, 0.12)))
        start = int(rng.integers(0, max(1, length - band)))
        colour = np.zeros(3, dtype=np.int16)
        colour[rng.integers(3)] = 255
        colour[rng.integers(3)] = int(rng.integers(0, 120))
        noise = rng.integers(-20, 20, (band, w if horizontal else h, 3))
        fill = np.clip(colour[None, None, :] + noise, 0, 255).astype(np.uint8)
        if horizontal:
            arr[start:start + band, :, :] = fill
        else:
            arr[:, start:start + band, :] = fill.transpose(1, 0, 2)
    return Image.fromarray(arr)
