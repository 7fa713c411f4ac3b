"""FID feature-extraction throughput: images/s through `dq.evaluation.inception.extract_features`.

uint8 images in, resize to 299 + InceptionV3 pool_3 (+ logits with --logits) out, all convs at
full float32 precision. Uses the real weights when installed, random ones otherwise (the timing
does not depend on the values).

  python benchmarks/fid_throughput.py [--batch 50] [--resolution 256] [--batches 5]
  JAX_PLATFORMS=cpu python benchmarks/fid_throughput.py        # the CPU reference number
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

from dq.evaluation import inception as inc
from dq.evaluation import inception_weights


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--batch", type=int, default=50)
  parser.add_argument("--resolution", type=int, default=256, help="input image size (px)")
  parser.add_argument("--batches", type=int, default=5, help="timed batches after compiling")
  parser.add_argument("--logits", action="store_true", help="add the 1008-way logits layer")
  args = parser.parse_args()
  try:
    params = inception_weights.load_inception_params()
    weights = "installed"
  except FileNotFoundError:
    params = inc.random_inception_params(0)
    weights = "random"
  if args.logits and "logits" not in params:
    params = dict(params, logits=inc.random_inception_params(0, include_logits=True)["logits"])
  params = jax.device_put(params)
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.integers(0, 256, (args.batch, args.resolution, args.resolution, 3),
                                    dtype=np.uint8))
  t0 = time.perf_counter()
  jax.block_until_ready(inc.extract_features(params, images))
  compile_s = time.perf_counter() - t0
  times = []
  for _ in range(args.batches):
    t0 = time.perf_counter()
    jax.block_until_ready(inc.extract_features(params, images))
    times.append(time.perf_counter() - t0)
  median = statistics.median(times)
  print(json.dumps({
      "benchmark": "fid_throughput",
      "images_per_s": round(args.batch / median, 2),
      "median_batch_s": round(median, 4),
      "first_batch_incl_compile_s": round(compile_s, 2),
      "batches_timed": args.batches,
      "device": jax.devices()[0].device_kind,
      "platform": jax.devices()[0].platform,
      "host": platform.machine(),
      "cpu_count": os.cpu_count(),
      "config": {"batch": args.batch, "resolution": args.resolution, "resized_to": inc.INPUT_SIZE,
                 "logits": args.logits, "weights": weights, "precision": "highest"},
  }))


if __name__ == "__main__":
  main()
