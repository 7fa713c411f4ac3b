"""Procedural images with a ground-truth detail mask (pure numpy, deterministic).

Each image: a smooth two-colour gradient background with a gentle low-frequency wave, then
1-3 objects drawn back to front; the last one (largest) is the *main* object and its kind is
the label. Flat kinds are single-colour shapes; textured kinds fill a disk or a rotated box with
fine two-colour texture (a few pixels per cell). `detail_mask` is 1 on the visible pixels of
textured objects and 0 elsewhere (background, flat objects).
"""
from __future__ import annotations

import numpy as np

KINDS = ("flat_disk", "flat_box", "flat_triangle", "checkerboard", "stripes", "noise", "rings",
         "dots")
TEXTURED_KINDS = frozenset(range(3, len(KINDS)))


def _background(rng: np.random.Generator, x: np.ndarray, y: np.ndarray) -> np.ndarray:
  """Smooth gradient [S, S, 3] in [0, 1]; x is [1, S], y is [S, 1]."""
  start, end = rng.uniform(0.05, 0.95, (2, 3))
  angle = rng.uniform(0, 2 * np.pi)
  ramp = np.clip(0.5 + (x - 0.5) * np.cos(angle) + (y - 0.5) * np.sin(angle), 0, 1)  # [S, S]
  freq_x, freq_y = rng.uniform(0.3, 1.5, 2)
  wave = 0.06 * np.sin(2 * np.pi * (freq_x * x + freq_y * y) + rng.uniform(0, 2 * np.pi))
  return start + (end - start) * ramp[..., None] + wave[..., None]


def _rotated(x: np.ndarray, y: np.ndarray, cx: float, cy: float,
             angle: float) -> tuple[np.ndarray, np.ndarray]:
  """Object-local coordinates (u along `angle`, v across), each [h, w]."""
  dx, dy = x - cx, y - cy
  cos, sin = np.cos(angle), np.sin(angle)
  return dx * cos + dy * sin, -dx * sin + dy * cos


def _shape(name: str, u: np.ndarray, v: np.ndarray, radius: float,
           rng: np.random.Generator) -> np.ndarray:
  """Bool [h, w] region of a disk / box / triangle of about `radius` around (0, 0)."""
  if name == "disk":
    return u * u + v * v < radius * radius
  if name == "box":
    half_u, half_v = radius * rng.uniform(0.6, 1.0, 2)
    return (np.abs(u) < half_u) & (np.abs(v) < half_v)
  if name != "triangle":
    raise ValueError(f"unknown shape {name!r}; expected disk, box or triangle")
  # Vertices on the circle of `radius`; inside = on the left of all three edges.
  corners = [(radius * np.cos(a), radius * np.sin(a)) for a in np.pi / 2 + np.arange(3) * 2 *
             np.pi / 3]
  inside = np.ones(u.shape, bool)
  for (ax, ay), (bx, by) in zip(corners, corners[1:] + corners[:1]):
    inside &= (bx - ax) * (v - ay) - (by - ay) * (u - ax) >= 0
  return inside


def _texture(kind: int, rng: np.random.Generator, u: np.ndarray, v: np.ndarray,
             size: int) -> np.ndarray:
  """Mix t between the two texture colours, {0, 1} or [0, 1], [h, w]."""
  cell = max(2.0, size * rng.uniform(0.02, 0.05)) / size  # Cell size in image units.
  name = KINDS[kind]
  if name == "checkerboard":
    return ((np.floor(u / cell) + np.floor(v / cell)) % 2).astype(np.float64)
  if name == "stripes":
    return (np.floor(u / cell) % 2).astype(np.float64)
  if name == "noise":
    return rng.random(u.shape)
  if name == "rings":
    return (np.floor(np.sqrt(u * u + v * v) / cell) % 2).astype(np.float64)
  period = 2 * cell  # dots
  du, dv = (u % period) - period / 2, (v % period) - period / 2
  return (du * du + dv * dv < (0.35 * period) ** 2).astype(np.float64)


def _window(center: float, extent: float, size: int) -> slice:
  """Pixel slice covering [center - extent, center + extent] in image units."""
  start = max(0, int(np.floor((center - extent) * size)))
  return slice(start, min(size, int(np.ceil((center + extent) * size)) + 1))


def make_example(seed: int, index: int, image_size: int,
                 stream: int = 0) -> dict[str, np.ndarray]:
  """Image `index` of stream `stream` (0 train, 1 eval) for `seed`.

  Returns {'image': uint8 [S, S, 3], 'detail_mask': float32 [S, S] in {0, 1},
  'label': int32 kind of the main object}.
  """
  if image_size < 8:
    raise ValueError(f"procedural images need image_size >= 8, got {image_size}")
  rng = np.random.default_rng([seed, stream, index])
  coords = (np.arange(image_size) + 0.5) / image_size
  x, y = coords[None, :], coords[:, None]  # [1, S], [S, 1]
  image = _background(rng, x, y)  # [S, S, 3]
  detail = np.zeros((image_size, image_size), np.float32)
  num_objects = int(rng.integers(1, 4))
  kinds = rng.integers(0, len(KINDS), num_objects)  # Last one is the main object.
  for i, kind in enumerate(kinds):
    is_main = i == num_objects - 1
    radius = rng.uniform(0.22, 0.34) if is_main else rng.uniform(0.08, 0.18)
    cx, cy = rng.uniform(radius * 0.7, 1 - radius * 0.7, 2)
    # Work inside the object's bounding window (every shape fits in 1.5 * radius).
    rows = _window(cy, 1.5 * radius, image_size)
    cols = _window(cx, 1.5 * radius, image_size)
    u, v = _rotated(x[:, cols], y[rows], cx, cy, rng.uniform(0, 2 * np.pi))
    if kind in TEXTURED_KINDS:
      region = _shape(("disk", "box")[int(rng.integers(2))], u, v, radius, rng)
      color_a = rng.uniform(0, 1, 3)
      color_b = (color_a + rng.uniform(0.35, 0.65, 3)) % 1.0
      t = _texture(int(kind), rng, u, v, image_size)[..., None]
      fill = color_a + (color_b - color_a) * t  # [h, w, 3] over the window
    else:
      region = _shape(KINDS[kind].removeprefix("flat_"), u, v, radius, rng)
      fill = rng.uniform(0, 1, 3)
    window = image[rows, cols]
    image[rows, cols] = np.where(region[..., None], fill, window)
    detail[rows, cols][region] = 1.0 if kind in TEXTURED_KINDS else 0.0
  pixels = np.clip(np.round(image * 255), 0, 255).astype(np.uint8)
  return {"image": pixels, "detail_mask": detail, "label": np.int32(kinds[-1])}
