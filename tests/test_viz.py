"""Coding-map overlay borders, reconstruction grid layout, PNG writing."""
import numpy as np
import pytest
from PIL import Image

from dq import summaries as viz


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


# --- code statistics ------------------------------------------------------------------------


def _reference_code_counts(codes, grain, codebook_size, num_grains):
  """Loops region by region, token by token: the top-left fine cell of each token's block."""
  split = 2**(num_grains - 1)
  counts = np.zeros((len(grain), codebook_size), int)
  for b, image_grain in enumerate(grain):
    for i, j in np.ndindex(image_grain.shape):
      stride = split // 2**int(image_grain[i, j])
      for a in range(0, split, stride):
        for c in range(0, split, stride):
          counts[b, codes[b, i * split + a, j * split + c]] += 1
  return counts


@pytest.mark.parametrize("num_grains", [2, 3])
def test_code_statistics_match_loops(num_grains):
  rng = np.random.default_rng(num_grains)
  grain = rng.integers(0, num_grains, (3, 2, 3))
  split = 2**(num_grains - 1)
  codes = rng.integers(0, 10, (3, 2 * split, 3 * split))
  counts = viz.code_counts(codes, grain, 10, num_grains)
  np.testing.assert_array_equal(counts, _reference_code_counts(codes, grain, 10, num_grains))
  expected_lengths = [sum(4**int(g) for g in image.reshape(-1)) for image in grain]
  np.testing.assert_array_equal(viz.codes_per_image(grain, num_grains), expected_lengths)
  np.testing.assert_array_equal(counts.sum(1), expected_lengths)
  np.testing.assert_allclose(viz.fine_ratios(grain, num_grains),
                             [(image == num_grains - 1).mean() for image in grain])


def test_code_statistics_reject_bad_input():
  grain = np.zeros((1, 2, 2), int)
  with pytest.raises(ValueError, match="codes must be"):
    viz.code_counts(np.zeros((1, 2, 2), int), grain, 4, 2)
  with pytest.raises(ValueError, match=r"codes must lie in \[0, 4\)"):
    viz.code_counts(np.full((1, 4, 4), 4), grain, 4, 2)
  with pytest.raises(ValueError, match="grain values"):
    viz.codes_per_image(np.full((1, 2, 2), 2), 2)
  with pytest.raises(ValueError, match=r"grain must be a non-empty int array \[B, h, w\]"):
    viz.fine_ratios(np.zeros((2, 2)), 2)


def _colour_columns(image: np.ndarray, colour, tolerance: int = 3) -> np.ndarray:
  """Column indices of the pixels within `tolerance` of `colour`."""
  close = np.abs(image.astype(int) - np.asarray(colour)).max(-1) <= tolerance
  return np.nonzero(close)[1]


def test_code_histogram_size_and_bars():
  # Image 0 uses only code 0, image 1 only code 15: bars at the left / right of their panels.
  grain = np.zeros((2, 2, 2), int)
  codes = np.stack([np.zeros((4, 4), int), np.full((4, 4), 15)])
  out = viz.code_histogram(codes, grain, 16, 2, panel_inches=(4.0, 2.0), dpi=50)
  assert out.shape == (2 * 100, 200, 3) and out.dtype == np.uint8
  top, bottom = out[:100], out[100:]
  left_bar, right_bar = _colour_columns(top, viz.BLUE), _colour_columns(bottom, viz.BLUE)
  assert left_bar.size and right_bar.size
  assert left_bar.max() < 100 < right_bar.min()
  one = viz.code_histogram(codes, grain, 16, 2, max_images=1, dpi=50)
  assert one.shape == (100, 200, 3)


def test_fine_ratio_distribution_size_and_placement():
  out = viz.fine_ratio_distribution({"low": np.full(20, 0.1), "high": np.full(5, 0.9)},
                                    inches=(5.0, 3.0), dpi=60)
  assert out.shape == (180, 300, 3) and out.dtype == np.uint8
  # Filled histograms: alpha 0.55 over the white axes.
  blend = lambda colour: np.round(0.55 * np.asarray(colour) + 0.45 * 255).astype(int)
  low, high = _colour_columns(out, blend(viz.BLUE)), _colour_columns(out, blend(viz.VERMILLION))
  # Medians: the legend's small colour patches sit elsewhere.
  assert low.size and high.size and np.median(low) < 150 < np.median(high)
  single = viz.fine_ratio_distribution(np.linspace(0, 1, 9), dpi=40)
  assert single.shape == (120, 200, 3)
  with pytest.raises(ValueError, match=r"fine ratios of 'x' must be a non-empty array in \[0, 1\]"):
    viz.fine_ratio_distribution({"x": [0.5, 1.5]})
  with pytest.raises(ValueError, match="at least one dataset"):
    viz.fine_ratio_distribution({})


# --- coarse-to-fine pictures ----------------------------------------------------------------


def _expected_fill(height: int, width: int) -> np.ndarray:
  rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
  return np.where((rows + cols) % viz.HATCH_PERIOD == 0, viz.HATCH_VALUE, viz.NEUTRAL_VALUE)


def test_mark_ungenerated_exact():
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (16, 24, 3), dtype=np.uint8)
  known = rng.random((4, 6)) < 0.5
  out = viz.mark_ungenerated(image, known)
  pixel_known = np.kron(known, np.ones((4, 4), bool))
  np.testing.assert_array_equal(out[pixel_known], image[pixel_known])
  fill = np.repeat(_expected_fill(16, 24)[..., None], 3, axis=-1)
  np.testing.assert_array_equal(out[~pixel_known], fill[~pixel_known])
  with pytest.raises(ValueError, match="known must be"):
    viz.mark_ungenerated(image, np.ones((5, 6), bool))


def test_generation_strip_layout_scale_and_captions():
  rng = np.random.default_rng(1)
  frames = rng.integers(0, 256, (2, 3, 8, 8, 3), dtype=np.uint8)
  known = rng.random((2, 3, 4, 4)) < 0.5
  strip = viz.generation_strip(frames, known)
  assert strip.shape == (2 * 10 - 2, 3 * 10 - 2, 3)
  np.testing.assert_array_equal(strip[10:18, 20:28], viz.mark_ungenerated(frames[1, 2],
                                                                          known[1, 2]))
  assert (strip[8:10] == viz.SEPARATOR_VALUE).all()
  big = viz.generation_strip(frames[0], known[0], scale=2)  # one sample: [S, H, W, 3]
  assert big.shape == (16, 3 * 18 - 2, 3)
  magnified = np.repeat(np.repeat(frames[0, 1], 2, axis=0), 2, axis=1)
  np.testing.assert_array_equal(big[:, 18:34], viz.mark_ungenerated(magnified, known[0, 1]))
  captioned = viz.generation_strip(frames, known, captions=["coarse", "fine 50%", "fine 100%"],
                                   scale=4)
  band = viz.CAPTION_HEIGHT + viz.SEPARATOR
  assert captioned.shape == (band + 2 * 34 - 2, 3 * 34 - 2, 3)
  np.testing.assert_array_equal(captioned[band:], viz.generation_strip(frames, known, scale=4))
  for column in range(3):  # dark caption text inside each column's band
    assert (captioned[:viz.CAPTION_HEIGHT, column * 34:column * 34 + 32] < 100).any()
  with pytest.raises(ValueError, match="one entry per stage"):
    viz.generation_strip(frames, known, captions=["coarse"])
  with pytest.raises(ValueError, match="known must be"):
    viz.generation_strip(frames, known[:, :2])


def test_strip_animation_gif(tmp_path):
  from PIL import Image

  rng = np.random.default_rng(2)
  frames = rng.integers(0, 256, (2, 4, 8, 8, 3), dtype=np.uint8)
  known = np.stack([np.arange(16).reshape(4, 4) < 4 * s for s in range(4)])  # [S, 4, 4]
  animation = viz.strip_animation(frames, np.broadcast_to(known, (2, 4, 4, 4)),
                                  ["a", "b", "c", "d"], scale=2.0)
  path = tmp_path / "anim.gif"
  animation.save(path, writer="pillow", fps=4)
  with Image.open(path) as gif:
    assert gif.n_frames == 4
    assert gif.size == (round((2 * 10 - 2) * 2), round((8 * 2 / 100 + 0.3) * 100))
  assert "<script" in animation.to_jshtml()


# --- coarse-to-fine states from packed sequences (dq.stage2.progressive) ---------------------


def _reference_known(packed, layout, prefix):
  """Known fine cells and codes from the first `prefix` tokens, token by token."""
  nc, hf, wf = layout.num_coarse_cells, *layout.fine_size
  wc = layout.coarse_size[1]
  codes, known = np.zeros((hf, wf), int), np.zeros((hf, wf), bool)
  for t in range(prefix):
    position, segment = packed["position"][t], packed["segment"][t]
    if not packed["valid"][t]:
      continue
    if segment == 0 and position < nc:
      r, c = divmod(int(position), wc)
      codes[2 * r:2 * r + 2, 2 * c:2 * c + 2] = packed["content"][t]
      known[2 * r:2 * r + 2, 2 * c:2 * c + 2] = True
    elif segment == 1 and position < hf * wf:
      codes.reshape(-1)[position] = packed["content"][t]
      known.reshape(-1)[position] = True
  return codes, known


def _packed_example(fine_order: str, shuffle: bool):
  from dq.stage2 import tokens as tok
  from dq.stage2.layout import TokenLayout

  layout = TokenLayout(3, 6, codebook_size=12)
  rng = np.random.default_rng(3)
  grain = rng.integers(0, 2, (3, 3, 3))
  grain[2] = 0  # an all-coarse image: no fine stage
  codes = rng.integers(0, 12, (3, 6, 6))
  blocks = codes.reshape(3, 3, 2, 3, 2)
  coarse = np.broadcast_to(blocks[:, :, :1, :, :1], blocks.shape).reshape(3, 6, 6)
  fine_cells = np.kron(grain, np.ones((2, 2), int)).astype(bool)
  codes = np.where(fine_cells, codes, coarse)
  packed = tok.pack_tokens(codes, grain, layout, fine_order=fine_order)
  if shuffle:  # sampler-like orders: coarse and fine tokens permuted within their stage
    for b in range(3):
      for segment, limit in ((0, layout.num_coarse_cells), (1, layout.num_fine_cells)):
        index = np.flatnonzero(packed["valid"][b] & (packed["segment"][b] == segment)
                               & (packed["position"][b] < limit))
        order = rng.permutation(index)
        for name in ("content", "position"):
          packed[name][b, index] = packed[name][b, order]
  return layout, packed, codes, grain


@pytest.mark.parametrize("fine_order,shuffle", [("row", False), ("region", False),
                                                ("row", True)])
def test_prefix_states_are_the_sequence_prefixes(fine_order, shuffle):
  from dq.stage2 import progressive

  layout, packed, codes, grain = _packed_example(fine_order, shuffle)
  fractions = (0.0, 0.3, 0.5, 1.0)
  states = progressive.prefix_states(packed, layout, fractions)
  assert states["codes"].shape == (3, 4, 6, 6) and states["known"].shape == (3, 4, 6, 6)
  for b in range(3):
    fine_tokens = 4 * int(grain[b].sum())
    coarse_tokens = int((grain[b] == 0).sum())
    one = {k: v[b] for k, v in packed.items()}
    for s, fraction in enumerate(fractions):
      expected_codes, expected_known = _reference_known(one, layout,
                                                        states["prefix_length"][b, s])
      np.testing.assert_array_equal(states["known"][b, s], expected_known)
      np.testing.assert_array_equal(states["codes"][b, s][expected_known],
                                    expected_codes[expected_known])
      assert states["known"][b, s].sum() == 4 * coarse_tokens + round(fraction * fine_tokens)
      assert states["num_codes"][b, s] == coarse_tokens + round(fraction * fine_tokens)
    # Coarse stage: exactly the coarse regions; last stage: the whole image.
    np.testing.assert_array_equal(states["known"][b, 0],
                                  np.kron(grain[b] == 0, np.ones((2, 2), bool)))
    assert states["known"][b, -1].all()
    np.testing.assert_array_equal(states["codes"][b, -1], codes[b])
    assert states["prefix_length"][b, -1] == packed["valid"][b].sum()
    assert (np.diff(states["prefix_length"][b]) >= 0).all()


def test_prefix_states_reject_bad_input():
  from dq.stage2 import progressive

  layout, packed, _, _ = _packed_example("row", False)
  with pytest.raises(ValueError, match=r"fractions must be a non-empty list of values in \[0, 1\]"):
    progressive.prefix_states(packed, layout, (0.0, 1.5))
  with pytest.raises(ValueError, match="lack fields"):
    progressive.prefix_states({"content": packed["content"]}, layout)
  broken = {k: v.copy() for k, v in packed.items()}
  broken["valid"][0, 1] = False  # drops a coarse token: a region is left uncoded
  with pytest.raises(ValueError, match="region"):
    progressive.prefix_states(broken, layout)


@pytest.fixture(scope="module")
def tiny_vae(tiny_stage1_dir):
  from dq import tokenizer as stage1_lib

  return stage1_lib.load_stage1(tiny_stage1_dir)


def test_partial_decode_ignores_unknown_cells(tiny_vae):
  from dq.stage2 import progressive
  from dq import tokenizer as stage1_lib

  rng = np.random.default_rng(4)
  codes = rng.integers(0, tiny_vae.codebook_size, (2, 8, 8))
  decode_partial = progressive.make_partial_decode_fn(tiny_vae)
  full = decode_partial(codes, np.ones((2, 8, 8), bool))
  np.testing.assert_allclose(full, np.asarray(stage1_lib.make_decode_fn(tiny_vae)(codes)),
                             atol=1e-5)
  known = rng.random((2, 8, 8)) < 0.5
  other = np.where(known, codes, (codes + 1) % tiny_vae.codebook_size)
  partial = decode_partial(codes, known)
  np.testing.assert_allclose(decode_partial(other, known), partial, atol=1e-6)
  assert np.abs(partial - full).max() > 1e-3  # the unknown cells do change the picture


def test_generation_strip_from_packed(tiny_vae):
  from dq.stage2 import progressive
  from dq import tokenizer as stage1_lib
  from dq.stage2 import tokens as tok

  rng = np.random.default_rng(5)
  images = rng.uniform(-1, 1, (3, 32, 32, 3)).astype(np.float32)
  codes, grain = (np.asarray(a) for a in stage1_lib.make_encode_fn(tiny_vae)(images))
  layout = stage1_lib.token_layout(tiny_vae)
  packed = tok.pack_tokens(codes, grain, layout)
  decode_partial = progressive.make_partial_decode_fn(tiny_vae)
  strip = progressive.generation_strip(packed, layout, decode_partial, max_images=2)
  band = viz.CAPTION_HEIGHT + viz.SEPARATOR
  assert strip.shape == (band + 2 * 34 - 2, 5 * 34 - 2, 3)
  final = viz.to_uint8(np.asarray(stage1_lib.make_decode_fn(tiny_vae)(codes)))
  for b in range(2):
    top = band + b * 34
    last = strip[top:top + 32, 4 * 34:4 * 34 + 32].astype(int)
    assert np.abs(last - final[b]).max() <= 1  # the finished sample
    coarse_stage = strip[top:top + 32, 0:32]
    fine_pixels = np.kron(grain[b] == 1, np.ones((8, 8), bool))  # not generated yet
    fill = _expected_fill(32, 32)
    np.testing.assert_array_equal(coarse_stage[fine_pixels],
                                  np.repeat(fill[fine_pixels][:, None], 3, axis=1))
  frames = progressive.progressive_frames(packed, layout, decode_partial, (0.0, 1.0))
  assert frames["images"].shape == (3, 2, 32, 32, 3) and frames["captions"] == ["coarse",
                                                                                 "fine 100%"]
