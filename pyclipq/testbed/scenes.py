"""Procedural scenes for the test bed: one coloured shape on a noisy, tinted background.

Every scene is a pure function of its attributes and a torch.Generator, so a split is
reproducible bit for bit from its seed. Rendering uses signed distances in pixel units,
which gives anti-aliased edges for free (coverage = clamp(0.5 - distance, 0, 1)).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

IMAGE_SIZE = 32

SHAPES = ("circle", "triangle", "square", "diamond", "crescent", "star", "ring", "cross")

# Base RGB per colour name. Jitter (see render_scenes) is large enough that neighbours such as
# red/orange/yellow sometimes overlap, which is part of what keeps the task from being trivial.
COLORS = {
    "red": (0.88, 0.12, 0.12),
    "orange": (0.98, 0.55, 0.08),
    "yellow": (0.95, 0.90, 0.15),
    "green": (0.15, 0.72, 0.22),
    "blue": (0.15, 0.30, 0.92),
    "purple": (0.58, 0.20, 0.78),
}
COLOR_NAMES = tuple(COLORS)

# Radii in pixels. The gap between the two ranges keeps "small" and "large" captions truthful.
SIZES = {"small": (5.5, 7.5), "large": (9.0, 11.5)}
SIZE_NAMES = tuple(SIZES)

# Position words describe the shape's centre by thirds of the image.
HORIZONTAL = ("left", "middle", "right")
VERTICAL = ("top", "middle", "bottom")

NUM_CLASSES = len(SHAPES) * len(COLOR_NAMES)


def class_index(color: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
    """Class id of a (colour, shape) pair; classes are ordered colour-major."""
    return color * len(SHAPES) + shape


def class_names() -> list[str]:
    """Zero-shot class names, e.g. "red triangle", in class-id order."""
    return [f"{color} {shape}" for color in COLOR_NAMES for shape in SHAPES]


@dataclass
class SceneAttributes:
    """Per-scene attributes; every field is a tensor with one entry per scene."""

    color: torch.Tensor  # index into COLOR_NAMES
    shape: torch.Tensor  # index into SHAPES
    size: torch.Tensor  # index into SIZE_NAMES
    column: torch.Tensor  # index into HORIZONTAL, from the centre's x
    row: torch.Tensor  # index into VERTICAL, from the centre's y

    @property
    def label(self) -> torch.Tensor:
        return class_index(self.color, self.shape)


def sample_and_render(n: int, generator: torch.Generator) -> tuple[torch.Tensor, SceneAttributes]:
    """Draw n random scenes and render them: images (n, 3, IMAGE_SIZE, IMAGE_SIZE) in [0, 1]."""
    color = torch.randint(len(COLOR_NAMES), (n,), generator=generator)
    shape = torch.randint(len(SHAPES), (n,), generator=generator)
    size = torch.randint(len(SIZE_NAMES), (n,), generator=generator)
    bounds = torch.tensor([SIZES[name] for name in SIZE_NAMES])[size]
    radius = bounds[:, 0] + (bounds[:, 1] - bounds[:, 0]) * torch.rand(n, generator=generator)
    # The centre stays far enough inside that at least ~80% of the shape is visible.
    margin = 0.8 * radius
    centre = margin[:, None] + (IMAGE_SIZE - 2 * margin[:, None]) * torch.rand(n, 2, generator=generator)
    # Small rotations only: "square" and "diamond" differ by 45 degrees and must stay distinct.
    angle = (torch.rand(n, generator=generator) * 2 - 1) * math.radians(15)
    images = render_scenes(color, shape, radius, centre, angle, generator)
    thirds = (centre / (IMAGE_SIZE / 3)).floor().long().clamp(0, 2)
    attributes = SceneAttributes(color=color, shape=shape, size=size, column=thirds[:, 0], row=thirds[:, 1])
    return images, attributes


def render_scenes(
    color: torch.Tensor,
    shape: torch.Tensor,
    radius: torch.Tensor,
    centre: torch.Tensor,
    angle: torch.Tensor,
    generator: torch.Generator,
) -> torch.Tensor:
    n = color.shape[0]
    coords = torch.arange(IMAGE_SIZE, dtype=torch.float32) + 0.5
    ys, xs = torch.meshgrid(coords, coords, indexing="ij")
    dx = xs[None] - centre[:, 0, None, None]
    dy = centre[:, 1, None, None] - ys[None]  # y up, so "vertex up" means towards the top row
    cos, sin = angle.cos()[:, None, None], angle.sin()[:, None, None]
    x = cos * dx + sin * dy
    y = -sin * dx + cos * dy
    distance = torch.empty(n, IMAGE_SIZE, IMAGE_SIZE)
    for shape_id, name in enumerate(SHAPES):
        chosen = shape == shape_id
        if chosen.any():
            distance[chosen] = _signed_distance(name, x[chosen], y[chosen], radius[chosen, None, None])
    coverage = (0.5 - distance).clamp(0, 1)[:, None]

    base = torch.tensor([COLORS[name] for name in COLOR_NAMES])[color]
    brightness = 0.75 + 0.35 * torch.rand(n, 1, generator=generator)
    tint = 0.12 * (torch.rand(n, 3, generator=generator) * 2 - 1)
    foreground = (base * brightness + tint).clamp(0, 1)[:, :, None, None]

    background = _background(n, generator)
    images = background * (1 - coverage) + foreground * coverage
    images = images + 0.06 * torch.randn(images.shape, generator=generator)
    return images.clamp(0, 1)


def _background(n: int, generator: torch.Generator) -> torch.Tensor:
    """Greyish tinted background with low-frequency stripes, so the shape is not the only structure."""
    level = 0.25 + 0.35 * torch.rand(n, 1, 1, 1, generator=generator)
    tint = 0.08 * (torch.rand(n, 3, 1, 1, generator=generator) * 2 - 1)
    coords = torch.arange(IMAGE_SIZE, dtype=torch.float32)
    ys, xs = torch.meshgrid(coords, coords, indexing="ij")
    direction = torch.rand(n, 1, 1, generator=generator) * math.pi
    frequency = 0.15 + 0.35 * torch.rand(n, 1, 1, generator=generator)
    phase = torch.rand(n, 1, 1, generator=generator) * 2 * math.pi
    stripes = torch.sin(frequency * (xs * direction.cos() + ys * direction.sin()) + phase)
    amplitude = 0.08 * torch.rand(n, 1, 1, generator=generator)
    return (level + tint + (amplitude * stripes)[:, None]).clamp(0, 1).expand(n, 3, IMAGE_SIZE, IMAGE_SIZE)


def _signed_distance(name: str, x: torch.Tensor, y: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
    """Approximate signed distance in pixels (negative inside) of a shape centred at the origin."""
    rho = torch.sqrt(x * x + y * y)
    if name == "circle":
        return rho - radius
    if name == "ring":
        return (rho - 0.72 * radius).abs() - 0.28 * radius
    if name == "crescent":
        # A disc with an offset disc cut out; the offset is tilted so the horns are not symmetric about x.
        bite = torch.sqrt((x - 0.45 * radius) ** 2 + (y - 0.2 * radius) ** 2) - 0.8 * radius
        return torch.maximum(rho - radius, -bite)
    if name == "cross":
        arm = 0.32 * radius
        horizontal = torch.maximum(x.abs() - radius, y.abs() - arm)
        vertical = torch.maximum(x.abs() - arm, y.abs() - radius)
        return torch.minimum(horizontal, vertical)
    if name == "triangle":
        # A triangle covers less area than its circumcircle; enlarge it so sizes look comparable.
        return _star_polygon_distance(x, y, 1.15 * radius, points=3, inner_ratio=0.5, first_vertex=math.pi / 2)
    if name == "square":
        return _star_polygon_distance(x, y, radius, points=4, inner_ratio=math.cos(math.pi / 4), first_vertex=math.pi / 4)
    if name == "diamond":
        return _star_polygon_distance(x, y, radius, points=4, inner_ratio=math.cos(math.pi / 4), first_vertex=math.pi / 2)
    if name == "star":
        return _star_polygon_distance(x, y, 1.1 * radius, points=5, inner_ratio=0.45, first_vertex=math.pi / 2)
    raise ValueError(f"unknown shape {name!r}; expected one of {SHAPES}")


def _star_polygon_distance(x, y, radius, points: int, inner_ratio: float, first_vertex: float) -> torch.Tensor:
    """Distance to a regular star polygon: outer vertices at `radius`, inner ones at inner_ratio * radius.

    Folding the plane by the polygon's symmetry leaves one edge, from the outer vertex on the
    positive x axis to the inner vertex at half the sector angle; a regular n-gon is the case
    inner_ratio = cos(pi / n). The distance to that edge's line is exact inside and a close
    under-estimate outside, which is all anti-aliasing needs.
    """
    sector = 2 * math.pi / points
    theta = torch.atan2(y, x) - first_vertex
    folded = torch.remainder(theta + sector / 2, sector) - sector / 2
    folded = folded.abs()
    rho = torch.sqrt(x * x + y * y)
    px, py = rho * folded.cos(), rho * folded.sin()
    outer_x = radius
    inner_x = inner_ratio * radius * math.cos(sector / 2)
    inner_y = inner_ratio * radius * math.sin(sector / 2)
    edge_x, edge_y = inner_x - outer_x, inner_y
    length = torch.sqrt(edge_x * edge_x + edge_y * edge_y)
    # Outward normal of the edge (pointing away from the origin).
    normal_x, normal_y = edge_y / length, -edge_x / length
    return (px - outer_x) * normal_x + py * normal_y
