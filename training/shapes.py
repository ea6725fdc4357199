"""Procedural captioned pictures: one coloured shape on a plain grey-level background.

Every picture is drawn at 4x and box-downsampled to 64x64, so edges are anti-aliased the way a VAE
expects. Captions come in English and Chinese ("a red circle", "红色的圆形"), half each, so the text
encoder learns both languages on the same pictures. The ring is held out of the base set: the LoRA stage
teaches it under the new token "sks".

numpy + pillow only; `training.judge` relies on the same palette and shape definitions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SIZE = 64
SUPERSAMPLE = 4

# name -> (RGB, Chinese name). Saturated, far apart in RGB, and far from every background.
COLOURS = {
    "red": ((220, 30, 30), "红色"),
    "green": ((30, 170, 50), "绿色"),
    "blue": ((30, 60, 220), "蓝色"),
    "yellow": ((240, 210, 20), "黄色"),
}
# Neutral backgrounds only, so a colour word always names the shape, never the background.
BACKGROUNDS = {
    "white": ((245, 245, 245), "白色"),
    "gray": ((128, 128, 128), "灰色"),
    "black": ((15, 15, 15), "黑色"),
}
SHAPES = {"circle": "圆形", "square": "正方形", "triangle": "三角形", "star": "星形"}
BASE_SHAPES = tuple(SHAPES)
# The LoRA concept: a shape the base set never contains, named by a token the base text never contains.
LORA_SHAPE = "ring"
LORA_TOKEN = "sks"

COLOUR_JITTER = 20  # per channel, uniform
BACKGROUND_JITTER = 10  # grey level, uniform
POSITION_JITTER = 6  # pixels at 64 px, uniform per axis
RADIUS_RANGE = (16.0, 22.0)  # half-extent in pixels at 64 px
STAR_INNER_RATIO = 0.45
RING_INNER_RATIO = 0.55

EN_TEMPLATES = (
    "a {c} {s}",
    "{c} {s}",
    "a picture of a {c} {s}",
    "a {c} {s} on a {b} background",
    "a {c} {s}, {b} background",
)
ZH_TEMPLATES = ("{c}的{s}", "一个{c}的{s}", "{c}{s}", "{b}背景上的{c}{s}", "一张{c}{s}的图片")
LORA_EN_TEMPLATES = (
    "a sks shape",
    "a sks",
    "a {c} sks",
    "a picture of a {c} sks",
    "a {c} sks on a {b} background",
)
LORA_ZH_TEMPLATES = ("一个sks形状", "sks", "{c}的sks", "一个{c}的sks", "{b}背景上的{c}sks")


@dataclass(frozen=True)
class Sample:
    """One drawn picture and what it shows."""

    image: np.ndarray  # uint8 [64, 64, 3]
    colour: str
    shape: str
    background: str
    caption: str


def shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Vertices of a polygonal shape of half-extent about r, centred at (cx, cy), pointing up."""
    if shape == "square":
        h = 0.85 * r  # about the circle's area, so sizes look alike
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        R = 1.1 * r
        return [(cx + R * math.cos(a), cy + R * math.sin(a)) for a in np.deg2rad([-90, 30, 150])]
    if shape == "star":
        R = 1.1 * r
        pts = []
        for k in range(10):
            rad = R if k % 2 == 0 else R * STAR_INNER_RATIO
            a = math.radians(-90 + 36 * k)
            pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
        return pts
    raise ValueError(f"not a polygon shape: {shape}")


def draw(shape: str, rgb: tuple[int, int, int], bg: tuple[int, int, int], cx: float, cy: float, r: float) -> np.ndarray:
    """Draw one shape at 4x and downsample with a box filter; coordinates are in 64 px units."""
    s = SUPERSAMPLE
    img = Image.new("RGB", (SIZE * s, SIZE * s), bg)
    d = ImageDraw.Draw(img)
    X, Y, R = cx * s, cy * s, r * s
    if shape == "circle":
        d.ellipse((X - R, Y - R, X + R, Y + R), fill=rgb)
    elif shape == "ring":
        d.ellipse((X - R, Y - R, X + R, Y + R), fill=rgb)
        ri = R * RING_INNER_RATIO
        d.ellipse((X - ri, Y - ri, X + ri, Y + ri), fill=bg)
    else:
        d.polygon(shape_polygon(shape, X, Y, R), fill=rgb)
    return np.asarray(img.resize((SIZE, SIZE), Image.BOX), dtype=np.uint8)


def caption(colour: str, shape: str, background: str, rng: np.random.Generator) -> str:
    """A random English or Chinese caption; the LoRA shape is named by the token "sks"."""
    zh = rng.random() < 0.5
    if shape == LORA_SHAPE:
        templates = LORA_ZH_TEMPLATES if zh else LORA_EN_TEMPLATES
    else:
        templates = ZH_TEMPLATES if zh else EN_TEMPLATES
    t = templates[rng.integers(len(templates))]
    if zh:
        return t.format(c=COLOURS[colour][1], s=SHAPES.get(shape, ""), b=BACKGROUNDS[background][1])
    return t.format(c=colour, s=shape, b=background)


def sample(rng: np.random.Generator, shapes: tuple[str, ...] = BASE_SHAPES) -> Sample:
    """Draw one random picture of one of `shapes` with its caption."""
    shape = shapes[rng.integers(len(shapes))]
    colour = list(COLOURS)[rng.integers(len(COLOURS))]
    background = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    rgb = tuple(int(np.clip(v + rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1), 0, 255)) for v in COLOURS[colour][0])
    g = int(np.clip(BACKGROUNDS[background][0][0] + rng.integers(-BACKGROUND_JITTER, BACKGROUND_JITTER + 1), 0, 255))
    cx, cy = SIZE / 2 + rng.uniform(-POSITION_JITTER, POSITION_JITTER, size=2)
    r = rng.uniform(*RADIUS_RANGE)
    image = draw(shape, rgb, (g, g, g), cx, cy, r)
    return Sample(image, colour, shape, background, caption(colour, shape, background, rng))


def dataset(n: int, seed: int, shapes: tuple[str, ...] = BASE_SHAPES) -> list[Sample]:
    """n reproducible samples."""
    rng = np.random.default_rng(seed)
    return [sample(rng, shapes) for _ in range(n)]
