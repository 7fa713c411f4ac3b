"""Summary pictures and statistics (numpy; PIL and matplotlib load on first use), by kind:

- `images`: grain colours, [-1, 1] -> uint8, adaptive coding maps (grain overlays), error
  heat maps, reconstruction grids;
- `stats`: codes per image, fine ratios, codebook use;
- `plots`: matplotlib figures as arrays (code histograms, fine-ratio distributions);
- `strips`: coarse-to-fine generation strips and animations;
- `png`: writing PNG files.

Every public name is importable from the package too (`from dq import summaries`).
"""
from dq.summaries.images import (BLUE, GRAIN_COLOURS, GREEN, SEPARATOR, SEPARATOR_VALUE,
                                 VERMILLION, as_uint8_images, error_heatmap, grain_overlay,
                                 reconstruction_grid, tile, to_uint8)
from dq.summaries.plots import (DATASET_COLOURS, code_histogram, figure_to_array,
                                fine_ratio_distribution, new_figure)
from dq.summaries.png import save_png
from dq.summaries.stats import check_grain, code_counts, codes_per_image, fine_ratios
from dq.summaries.strips import (CAPTION_HEIGHT, HATCH_PERIOD, HATCH_VALUE, NEUTRAL_VALUE,
                                 generation_strip, mark_ungenerated, strip_animation)

__all__ = [
    "BLUE", "CAPTION_HEIGHT", "DATASET_COLOURS", "GRAIN_COLOURS", "GREEN", "HATCH_PERIOD",
    "HATCH_VALUE", "NEUTRAL_VALUE", "SEPARATOR", "SEPARATOR_VALUE", "VERMILLION",
    "as_uint8_images", "check_grain", "code_counts", "code_histogram", "codes_per_image",
    "error_heatmap", "figure_to_array", "fine_ratio_distribution", "fine_ratios",
    "generation_strip", "grain_overlay", "mark_ungenerated", "new_figure",
    "reconstruction_grid", "save_png", "strip_animation", "tile", "to_uint8",
]
