"""Coding-map overlay borders, reconstruction grid layout, PNG writing."""
import numpy as np
import pytest
from PIL import Image

from dq import viz


def _reference_border(grain: np.ndarray, height: int, width: int) -> np.ndarray:
  """Marks the last row and column of every cell, region by region, cell by cell."""
  rows, cols = grain.shape
  region_h, region_w = height // rows, width // cols
  border = np.zeros((height, width), bool)
  for i in range(rows):
    for j in range(cols):
      split = 2**int(grain[i, j])
      cell_h, cell_w = region_h // split, region_w // split
      for a in range(split):
        for b in range(split):
          top, left = i * region_h + a * cell_h, j * region_w + b * cell_w
          border[top + cell_h - 1, left:left + cell_w] = True
          border[top:top + cell_h, left + cell_w - 1] = True
  return border


def test_to_uint8():
  np.testing.assert_array_equal(viz.to_uint8(np.array([-1.5, -1.0, 0.0, 1.0, 2.0])),
                                [0, 0, 128, 255, 255])


@pytest.mark.parametrize("num_grains,grid,size", [(2, (4, 4), 32), (3, (2, 3), (32, 48))])
def test_grain_overlay_borders_on_cell_boundaries(num_grains, grid, size):
  height, width = (size, size) if isinstance(size, int) else size
  rng = np.random.default_rng(num_grains)
  grain = rng.integers(0, num_grains, grid)
  image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
  colours = np.asarray(viz.GRAIN_COLOURS[num_grains])
  pixel_colour = colours[np.kron(grain, np.ones((height // grid[0], width // grid[1]), int))]
  border = _reference_border(grain, height, width)
  # alpha = 0: borders exactly where expected, every other pixel untouched.
  plain = viz.grain_overlay(image, grain, num_grains, alpha=0.0)
  assert plain.shape == (height, width, 3) and plain.dtype == np.uint8
  np.testing.assert_array_equal(plain, np.where(border[..., None], pixel_colour, image))
  tinted = viz.grain_overlay(image, grain, num_grains, alpha=0.35)
  np.testing.assert_array_equal(tinted[border], pixel_colour[border])
  blend = 0.65 * image[~border] + 0.35 * pixel_colour[~border]
  np.testing.assert_allclose(tinted[~border], blend, atol=0.5 + 1e-4)


def test_grain_overlay_coarse_borders_at_last_row_of_each_region():
  image = np.zeros((16, 16, 3), np.uint8)
  out = viz.grain_overlay(image, np.zeros((4, 4), int), 2, alpha=0.0)
  border_rows = np.where((out == viz.BLUE).all(-1).all(1))[0]
  assert border_rows.tolist() == [3, 7, 11, 15]  # k * H / h - 1
  assert (out[0, :3] == 0).all()  # first rows carry no border


def test_grain_overlay_rejects_bad_input():
  image = np.zeros((16, 16, 3), np.uint8)
  with pytest.raises(ValueError, match="grain values"):
    viz.grain_overlay(image, np.full((4, 4), 2), 2)
  with pytest.raises(ValueError, match="not divisible"):
    viz.grain_overlay(image, np.zeros((3, 3), int), 2)
  with pytest.raises(ValueError, match="uint8"):
    viz.grain_overlay(image.astype(np.float32), np.zeros((4, 4), int), 2)
  with pytest.raises(ValueError, match="num_grains"):
    viz.grain_overlay(image, np.zeros((4, 4), int), 5)


def test_reconstruction_grid_layout():
  rng = np.random.default_rng(0)
  inputs = rng.uniform(-1, 1, (5, 16, 16, 3)).astype(np.float32)
  recons = np.clip(inputs + 0.1 * rng.standard_normal(inputs.shape), -1, 1).astype(np.float32)
  grains = rng.integers(0, 2, (5, 2, 2))
  grid = viz.reconstruction_grid(inputs, recons, grains, num_grains=2, max_rows=3)
  assert grid.shape == (3 * 18 - 2, 4 * 18 - 2, 3) and grid.dtype == np.uint8
  assert (grid[16:18] == 255).all() and (grid[:, 16:18] == 255).all()
  row1 = slice(18, 34)
  np.testing.assert_array_equal(grid[row1, 0:16], viz.to_uint8(inputs[1]))
  np.testing.assert_array_equal(grid[row1, 18:34], viz.to_uint8(recons[1]))
  overlay = viz.grain_overlay(viz.to_uint8(inputs[1]), grains[1], 2)
  np.testing.assert_array_equal(grid[row1, 54:70], overlay)
  heat = viz.error_heatmap(inputs[:3], recons[:3])
  np.testing.assert_array_equal(grid[row1, 36:52], heat[1])
  # Brighter heat where the error is larger (inferno is monotone in luminance).
  error = np.abs(inputs[:3] - recons[:3]).mean(-1)
  lo = np.unravel_index(error.argmin(), error.shape)
  hi = np.unravel_index(error.argmax(), error.shape)
  assert heat[lo].astype(int).sum() < heat[hi].astype(int).sum()
  with pytest.raises(ValueError, match="grains must be"):
    viz.reconstruction_grid(inputs, recons, grains[:2], num_grains=2)


def test_save_png_round_trip(tmp_path):
  array = np.random.default_rng(0).integers(0, 256, (6, 10, 3), dtype=np.uint8)
  path = tmp_path / "a" / "b" / "grid.png"
  viz.save_png(path, array)
  np.testing.assert_array_equal(np.asarray(Image.open(path)), array)
  with pytest.raises(ValueError, match="uint8"):
    viz.save_png(tmp_path / "x.png", array.astype(np.float32))
