"""Kept for `dq.tools.tokenize_image` until it imports `dq.summaries`: the summary pictures
moved to the `dq.summaries` package (images, stats, plots, strips, png)."""
from dq.summaries import *  # noqa: F401,F403
