"""Rendering scene graphs with Pillow: filled shapes on a plain grey background, anti-aliased by
drawing at `SUPERSAMPLE`× and box-filtering down."""
from __future__ import annotations

import math

from .scene_graph import BACKGROUND, PALETTE, SHAPES, Scene

SUPERSAMPLE = 4


def _regular_polygon(cx, cy, r, n, start_deg=-90.0, radii=None):
    radii = radii or [r]
    return [(cx + radii[k % len(radii)] * math.cos(math.radians(start_deg + 360.0 * k / n)),
             cy + radii[k % len(radii)] * math.sin(math.radians(start_deg + 360.0 * k / n))) for k in range(n)]


def _heart(cx, cy, r, steps=48):
    # x = 16 sin³t, y = 13 cos t − 5 cos 2t − 2 cos 3t − cos 4t spans about ±17 units.
    scale = r / 17.0
    points = []
    for k in range(steps):
        t = 2 * math.pi * k / steps
        x = 16 * math.sin(t) ** 3
        y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
        points.append((cx + scale * x, cy - scale * (y + 2.5)))
    return points


def draw_shape(draw, shape: str, cx: float, cy: float, r: float, fill, background=BACKGROUND) -> None:
    """Draw one filled shape of radius r centred at (cx, cy) on a PIL ImageDraw."""
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "ring":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        inner = 0.55 * r
        draw.ellipse((cx - inner, cy - inner, cx + inner, cy + inner), fill=background)
    elif shape == "square":
        half = 0.82 * r  # equal-ish area to the circle without leaving the cell
        draw.rectangle((cx - half, cy - half, cx + half, cy + half), fill=fill)
    elif shape == "triangle":
        draw.polygon(_regular_polygon(cx, cy + 0.15 * r, 1.1 * r, 3), fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + 0.75 * r, cy), (cx, cy + r), (cx - 0.75 * r, cy)], fill=fill)
    elif shape == "star":
        draw.polygon(_regular_polygon(cx, cy + 0.08 * r, 1.05 * r, 10, radii=[1.05 * r, 0.45 * r]), fill=fill)
    elif shape == "cross":
        t = 0.34 * r
        draw.rectangle((cx - r, cy - t, cx + r, cy + t), fill=fill)
        draw.rectangle((cx - t, cy - r, cx + t, cy + r), fill=fill)
    elif shape == "hexagon":
        draw.polygon(_regular_polygon(cx, cy, r, 6, start_deg=0.0), fill=fill)
    elif shape == "heart":
        draw.polygon(_heart(cx, cy, 1.1 * r), fill=fill)
    else:
        raise ValueError(f"shape: expected one of {SHAPES}, got {shape!r}")


def render(scene: Scene):
    """The scene as a PIL RGB image (image_size × image_size): filled shapes on a plain grey background."""
    from PIL import Image, ImageDraw

    size = scene.image_size * SUPERSAMPLE
    image = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        x, y, r = (v * SUPERSAMPLE for v in scene.geometry(obj))
        draw_shape(draw, obj.shape, x, y, r, PALETTE[obj.color])
    return image.reduce(SUPERSAMPLE)
