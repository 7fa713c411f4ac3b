"""matplotlib figures as uint8 arrays (pyplot-free, headless): code histograms and fine-ratio
distributions."""
from __future__ import annotations

from typing import Mapping

import numpy as np

from dq.summaries.images import BLUE, GREEN, VERMILLION
from dq.summaries.stats import code_counts


def new_figure(width_in: float, height_in: float, dpi: int):
  """A pyplot-free Agg figure (no global state, works headless)."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # Deferred: only figures need it.
  from matplotlib.figure import Figure

  figure = Figure(figsize=(width_in, height_in), dpi=dpi)
  FigureCanvasAgg(figure)
  return figure


def figure_to_array(figure) -> np.ndarray:
  """Renders a matplotlib figure to uint8 [H, W, 3] (H, W = size in inches x dpi)."""
  figure.canvas.draw()
  return np.array(figure.canvas.buffer_rgba())[..., :3]


def _hex(colour: tuple[int, int, int]) -> str:
  return "#{:02x}{:02x}{:02x}".format(*colour)


def code_histogram(codes: np.ndarray, grain: np.ndarray, codebook_size: int, num_grains: int,
                   max_images: int = 4, panel_inches: tuple[float, float] = (4.0, 2.0),
                   dpi: int = 100) -> np.ndarray:
  """Histogram of the codes of each image (one panel per image, stacked vertically).

  Bars (blue, `BLUE`) over codebook index 0..K-1, height = tokens using that entry
  (`code_counts`); panel titles give the image's token count and distinct entries.

  Returns:
    uint8 [n * panel_h * dpi, panel_w * dpi, 3] for n = min(B, max_images) panels.
  """
  counts = code_counts(codes, grain, codebook_size, num_grains)  # [B, K]
  if max_images < 1:
    raise ValueError(f"max_images must be >= 1; got {max_images}")
  count = min(len(counts), max_images)
  width_in, height_in = panel_inches
  figure = new_figure(width_in, height_in * count, dpi)
  axes = figure.subplots(count, 1, squeeze=False)[:, 0]
  for i, ax in enumerate(axes):
    ax.bar(np.arange(codebook_size), counts[i], width=1.0, color=_hex(BLUE), linewidth=0)
    ax.set_xlim(-0.5, codebook_size - 0.5)
    ax.set_ylim(0, max(1, counts[i].max()) * 1.05)
    ax.set_title(f"image {i}: {counts[i].sum()} codes, {np.count_nonzero(counts[i])} distinct "
                 f"of {codebook_size}", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.set_ylabel("tokens", fontsize=7)
  axes[-1].set_xlabel("codebook index", fontsize=7)
  figure.tight_layout()
  return figure_to_array(figure)


DATASET_COLOURS = (BLUE, VERMILLION, GREEN, (230, 159, 0), (204, 121, 167), (86, 180, 233))


def fine_ratio_distribution(ratios: Mapping[str, np.ndarray] | np.ndarray, bins: int = 20,
                            inches: tuple[float, float] = (5.0, 3.0), dpi: int = 100,
                            title: str = "fine-grain ratio per image") -> np.ndarray:
  """Distribution of the per-image fine ratio, one filled histogram per dataset.

  Args:
    ratios: float [N] in [0, 1] (one dataset) or a mapping name -> float [N]; dataset i is
      drawn in `DATASET_COLOURS[i % 6]` with its mean as a dashed line.
    bins: equal-width bins over [0, 1].

  Returns:
    uint8 [inches[1] * dpi, inches[0] * dpi, 3].
  """
  series = dict(ratios) if hasattr(ratios, "items") else {"images": ratios}
  if not series:
    raise ValueError("fine_ratio_distribution needs at least one dataset")
  if bins < 1:
    raise ValueError(f"bins must be >= 1; got {bins}")
  figure = new_figure(*inches, dpi)
  ax = figure.subplots()
  edges = np.linspace(0.0, 1.0, bins + 1)
  for i, (name, values) in enumerate(series.items()):
    values = np.asarray(values, np.float64).reshape(-1)
    if values.size == 0 or values.min() < 0 or values.max() > 1:
      raise ValueError(f"fine ratios of {name!r} must be a non-empty array in [0, 1]; got "
                       f"{values.size} values" + (f" in {values.min()}..{values.max()}"
                                                  if values.size else ""))
    colour = _hex(DATASET_COLOURS[i % len(DATASET_COLOURS)])
    ax.hist(values, bins=edges, color=colour, alpha=0.55, histtype="stepfilled",
            label=f"{name} (n={values.size}, mean {values.mean():.2f})")
    ax.axvline(values.mean(), color=colour, linestyle="--", linewidth=1)
  ax.set_xlim(0.0, 1.0)
  ax.set_xlabel("fraction of regions coded fine", fontsize=8)
  ax.set_ylabel("images", fontsize=8)
  ax.set_title(title, fontsize=9)
  ax.tick_params(labelsize=7)
  ax.legend(fontsize=7)
  figure.tight_layout()
  return figure_to_array(figure)
