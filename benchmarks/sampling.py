"""Seconds per image of the KV-cached sampler vs a naive full-recompute sampler.

Model (the issue's reference point): StackedTransformer n_embd 256, 8 heads, 2 position + 4
content layers, codebook 1024, coarse 16x16 / fine 32x32 (256 px DQ-VAE), random weights.
- `dq`: the jitted `lax.while_loop` sampler with KV caches. The position head is set to prefer
  the coarse EOS, and `max_len` 644 makes it legal only after 128 coarse regions, so every
  sequence has exactly 644 tokens (fine ratio 0.5, the paper's ~640 codes at 256 px).
- `fixed_grid`: the same weights and sampler with the worst-case `max_len` 1028: the coarse EOS
  comes first and fine positions are fixed (row order), i.e. a plain 32x32 grid of 1024 codes.
- `naive`: what the official sampler does, recomputing the whole prefix for every token (two
  forward passes per token: positions, then contents). Prefixes are padded to multiples of 64
  (one compilation per bucket); the per-step time of each bucket is measured (median of
  `--naive_repeats` calls after compilation) and summed over the steps of the sequences that
  `dq` sampled. `--naive_full` also runs the naive loop end to end at batch 1 as a check.

The official PyTorch sampler takes about 60 s per image at batch 1 for this model on this
machine's CPU (issue 4); `speedup_vs_official_60s` uses that figure.

  python benchmarks/sampling.py [--batches 1,8] [--naive_full]
Prints one JSON line.
"""
import argparse
import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from dq.stage2.sampler import SamplingConfig, make_sampler
from dq.stage2.layout import TokenLayout
from dq.stage2.transformer import StackedTransformer

OFFICIAL_SECONDS_PER_IMAGE = 60.0
BUCKET = 64


def build(n_embd: int, n_head: int, position_layers: int, content_layers: int):
  layout = TokenLayout(coarse_size=16, fine_size=32, codebook_size=1024)
  model = StackedTransformer(
      vocab_size=layout.content_vocab_size, coarse_position_size=layout.coarse_position_vocab_size,
      fine_position_size=layout.fine_position_vocab_size, segment_size=2,
      block_size=layout.max_len - 1, position_layers=position_layers,
      content_layers=content_layers, n_head=n_head, n_embd=n_embd)
  dummy = jnp.zeros((1, layout.max_len), jnp.int32)
  params = model.init(jax.random.PRNGKey(0), dummy, dummy, dummy,
                      method="forward_packed")["params"]
  return layout, model, params


def prefer_coarse_eos(params, layout: TokenLayout):
  """Params whose position head takes the coarse EOS as soon as it is legal (uniform otherwise)."""
  params = jax.tree.map(lambda x: x, params)
  head = dict(params["position_head"])
  head["ln"] = {"scale": jnp.zeros_like(head["ln"]["scale"]),
                "bias": jnp.ones_like(head["ln"]["bias"])}
  kernel = jnp.zeros_like(head["linear"]["kernel"]).at[:, layout.coarse_pos_eos].set(1.0)
  head["linear"] = {"kernel": kernel}
  params["position_head"] = head
  return params


def time_sampler(sampler, params, batch: int, repeats: int) -> tuple[float, np.ndarray]:
  """Median seconds per call after one compile call; also the lengths of the last call."""
  out = jax.block_until_ready(sampler(params, jax.random.PRNGKey(0), batch))
  times = []
  for i in range(repeats):
    start = time.perf_counter()
    out = jax.block_until_ready(sampler(params, jax.random.PRNGKey(i + 1), batch))
    times.append(time.perf_counter() - start)
  return statistics.median(times), np.asarray(out["length"])


def make_naive_step(model):
  """One naive token: full forward for the next position, then again for the next content."""

  @jax.jit
  def step(params, content, position, segment, t):
    variables = {"params": params}
    position_logits, _ = model.apply(variables, content, position, segment,
                                     method="forward_packed")
    next_position = jnp.argmax(position_logits[:, t], axis=-1)
    position = position.at[:, t + 1].set(next_position)
    _, content_logits = model.apply(variables, content, position, segment,
                                    method="forward_packed")
    content = content.at[:, t + 1].set(jnp.argmax(content_logits[:, t], axis=-1))
    return content, position

  return step


def naive_bucket_times(model, params, layout, batch: int, repeats: int) -> dict[int, float]:
  """Median seconds of one naive step at each prefix bucket length."""
  step = make_naive_step(model)
  times = {}
  for length in range(BUCKET, layout.max_len + BUCKET, BUCKET):
    length = min(length, layout.max_len)
    ids = jnp.zeros((batch, length), jnp.int32)
    jax.block_until_ready(step(params, ids, ids, ids, length - 2))
    samples = []
    for _ in range(repeats):
      start = time.perf_counter()
      jax.block_until_ready(step(params, ids, ids, ids, length - 2))
      samples.append(time.perf_counter() - start)
    times[length] = statistics.median(samples)
  return times


def naive_seconds(bucket_times: dict[int, float], steps: int, max_len: int) -> float:
  """Sum of per-step bucket times for a sequence of `steps` sampled tokens."""
  total = 0.0
  for t in range(steps):
    length = min(max_len, BUCKET * ((t + 2 + BUCKET - 1) // BUCKET))
    total += bucket_times[length]
  return total


def naive_full_run(model, params, layout, steps: int) -> float:
  """Wall time of a real naive loop (batch 1, bucketed prefixes, compiled beforehand)."""
  step = make_naive_step(model)
  content = np.zeros((1, layout.max_len), np.int32)
  position = np.zeros((1, layout.max_len), np.int32)
  segment = np.zeros((1, layout.max_len), np.int32)
  for length in range(BUCKET, layout.max_len + BUCKET, BUCKET):
    length = min(length, layout.max_len)
    jax.block_until_ready(step(params, content[:, :length], position[:, :length],
                               segment[:, :length], length - 2))
  start = time.perf_counter()
  for t in range(steps):
    length = min(layout.max_len, BUCKET * ((t + 2 + BUCKET - 1) // BUCKET))
    new_content, new_position = step(params, content[:, :length], position[:, :length],
                                     segment[:, :length], t)
    content[:, :length], position[:, :length] = np.asarray(new_content), np.asarray(new_position)
  return time.perf_counter() - start


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batches", default="1,8")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--naive_repeats", type=int, default=3)
  parser.add_argument("--naive_full", action="store_true")
  parser.add_argument("--n_embd", type=int, default=256)
  parser.add_argument("--n_head", type=int, default=8)
  parser.add_argument("--position_layers", type=int, default=2)
  parser.add_argument("--content_layers", type=int, default=4)
  parser.add_argument("--max_len", type=int, default=644)
  args = parser.parse_args()

  full_layout, model, params = build(args.n_embd, args.n_head, args.position_layers,
                                     args.content_layers)
  dq_layout = TokenLayout(coarse_size=16, fine_size=32, codebook_size=1024, max_len=args.max_len)
  dq_sampler = make_sampler(model, dq_layout)
  grid_sampler = make_sampler(model, full_layout, SamplingConfig(fixed_fine_positions=True))
  params = prefer_coarse_eos(params, full_layout)

  results = {}
  for batch in (int(b) for b in args.batches.split(",")):
    dq_time, dq_lengths = time_sampler(dq_sampler, params, batch, args.repeats)
    grid_time, grid_lengths = time_sampler(grid_sampler, params, batch, args.repeats)
    buckets = naive_bucket_times(model, params, full_layout, batch, args.naive_repeats)
    naive_time = naive_seconds(buckets, int(dq_lengths.max()) - 1, full_layout.max_len)
    row = {
        "dq_seconds_per_image": dq_time / batch,
        "dq_tokens_mean": float(dq_lengths.mean()),
        "fixed_grid_seconds_per_image": grid_time / batch,
        "fixed_grid_tokens_mean": float(grid_lengths.mean()),
        "fixed_grid_over_dq": grid_time / dq_time,
        "naive_seconds_per_image": naive_time / batch,
        "naive_over_dq": naive_time / dq_time,
        "speedup_vs_official_60s": OFFICIAL_SECONDS_PER_IMAGE / (dq_time / batch),
    }
    row["naive_method"] = "sum of measured per-bucket step times"
    if args.naive_full and batch == 1:
      naive_time = naive_full_run(model, params, full_layout, int(dq_lengths.max()) - 1)
      row.update(naive_seconds_per_image=naive_time, naive_over_dq=naive_time / dq_time,
                 naive_method="end-to-end naive loop", naive_bucket_model_seconds=row[
                     "naive_seconds_per_image"])
    results[f"batch_{batch}"] = row

  print(json.dumps({
      "benchmark": "sampling",
      "config": {"n_embd": args.n_embd, "n_head": args.n_head,
                 "position_layers": args.position_layers,
                 "content_layers": args.content_layers, "codebook_size": 1024,
                 "coarse": [16, 16], "fine": [32, 32], "dq_max_len": args.max_len,
                 "repeats": args.repeats},
      "results": results,
      "backend": jax.default_backend(), "device": str(jax.devices()[0]),
      "cpu_count": os.cpu_count(),
      "platform": platform.processor() or platform.machine(),
      "jax": jax.__version__,
  }))


if __name__ == "__main__":
  main()
