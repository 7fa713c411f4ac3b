"""Median stage-1 train-step time (forward + backward + Adam) after compilation.

Config (the issue's reference point; the official PyTorch code takes ~2.0 s for the
forward+backward on a 2-core CPU): batch 2, 256 px, encoder ch 32, ch_mult (1,1,2,2,4), 1 res
block, attention at 16 and 32, z 64, feature router with Gumbel, codebook 1024x64, decoder ch 32,
ch_mult (1,1,2,2), attention at 32, Fourier+learned positions; loss L1 + codebook + budget
(`--full_loss`: + LPIPS + PatchGAN with the adaptive weight, discriminator step included).

  python benchmarks/vae_step.py [--steps 10] [--batch 2] [--resolution 256]
  python benchmarks/vae_step.py --config=configs/ffhq_vae.py --batch 32   # a config's model
Prints one JSON line (with peak device memory where the backend reports it). The batch is
split over the largest number of devices it divides (`bench_devices`; batch 2 on 8 devices
runs on 2 of them).
"""
import argparse
import json
import math
import platform
import sys
import statistics
import time

import jax
import numpy as np

from dq import sharding as sh
from dq.configs import vae_base_config
from dq.models.build import build_dqvae
from dq.train.optim import make_optimizer
from dq.train.vae_step import make_update_fn
from dq.train.vae_trainer import make_discriminator, make_init_fn


def bench_config(batch: int, resolution: int):
  config = vae_base_config()
  config.data.image_size = resolution
  config.model.update(dict(
      resolution=resolution, ch=32, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=1,
      attn_resolutions=(16, 32), z_channels=64, codebook_size=1024, embed_dim=64, dec_ch=32,
      dec_ch_mult=(1, 1, 2, 2), dec_num_res_blocks=1, dec_attn_resolutions=(32,),
      position_type="fourier+learned", num_grains=2))
  config.model.router.kind = "feature"
  config.train.batch_size = batch
  config.train.num_steps = 1000
  return config


def load_config(spec: str):
  import importlib.util
  path, _, arg = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("bench_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg or None)


def bench_devices(batch: int, devices=None) -> list:
  """The first gcd(batch, #devices) devices: the batch splits evenly over them."""
  devices = list(jax.devices() if devices is None else devices)
  return devices[:math.gcd(batch, len(devices))]


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--resolution", type=int, default=256)
  parser.add_argument("--config", default="", help="config file[:arg] whose model to time")
  parser.add_argument("--precision", default="", help="jax_default_matmul_precision")
  parser.add_argument("--full_loss", action="store_true",
                      help="add LPIPS + PatchGAN (adaptive weight) from step 0; random LPIPS "
                           "weights when none are installed (timing does not depend on them)")
  args = parser.parse_args()
  if args.precision:
    jax.config.update("jax_default_matmul_precision", args.precision)
  if args.config:
    config = load_config(args.config)
    config.train.batch_size = args.batch
    args.resolution = config.data.image_size
  else:
    config = bench_config(args.batch, args.resolution)
  devices = bench_devices(args.batch)
  if len(devices) < jax.device_count():
    print(f"vae_step: batch {args.batch} on {len(devices)} of the {jax.device_count()} devices "
          "(the batch must split evenly)", file=sys.stderr)
  mesh = sh.make_mesh({"data": -1}, devices=devices)
  model = build_dqvae(config.model, entropy_thresholds=(
      (0.5,) * (config.model.num_grains - 1) if config.model.router.kind == "entropy" else ()))
  tx, schedule = make_optimizer(config.optim, config.train.num_steps)
  perceptual, frozen = None, {}
  if args.full_loss:
    from dq.losses import lpips
    config.loss.update(dict(perceptual_weight=1.0, disc_weight=0.75, disc_start=0))
    net = lpips.LPIPS()
    perceptual = lambda fr, a, b: net.apply({"params": fr["lpips"]}, a, b)  # noqa: E731
    try:
      frozen = {"lpips": lpips.load_lpips_params()}
    except FileNotFoundError:
      frozen = {"lpips": lpips.random_lpips_params(jax.random.PRNGKey(1))}
  else:
    config.loss.update(dict(perceptual_weight=0.0, disc_weight=0.0))
  discriminator, disc_tx = make_discriminator(config)
  init_fn = make_init_fn(model, tx, args.resolution, discriminator, disc_tx)
  repl = sh.replicated(mesh)
  state = jax.jit(init_fn, out_shardings=repl)(jax.random.PRNGKey(0))
  update_fn = make_update_fn(model, tx, schedule, loss_cfg=config.loss,
                             router_cfg=config.model.router,
                             num_grains=config.model.num_grains, discriminator=discriminator,
                             disc_tx=disc_tx, perceptual=perceptual)
  step = jax.jit(update_fn, in_shardings=(repl, sh.batch_sharding(mesh), repl),
                 out_shardings=(repl, repl), donate_argnums=0)
  rng = np.random.default_rng(0)
  x = rng.uniform(-1, 1, (args.batch, args.resolution, args.resolution, 3)).astype(np.float32)
  batch = sh.shard_batch({"image": x}, mesh)
  t0 = time.perf_counter()
  state, metrics = step(state, batch, frozen)
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - t0
  times = []
  for _ in range(args.steps):
    t0 = time.perf_counter()
    state, metrics = step(state, batch, frozen)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - t0)
  print(json.dumps(result_row(args, config, state, metrics, times, compile_s, devices)))


def result_row(args, config, state, metrics, times, compile_s, devices) -> dict:
  """The benchmark's JSON line."""
  n_params = sum(p.size for p in jax.tree.leaves(state.params))
  mem = jax.devices()[0].memory_stats() or {}
  m = config.model
  return {
      "benchmark": "vae_step",
      "median_step_s": round(statistics.median(times), 4),
      "min_step_s": round(min(times), 4),
      "first_step_incl_compile_s": round(compile_s, 2),
      "steps_timed": args.steps,
      "loss": float(metrics["loss"]),
      "params": int(n_params),
      "device": jax.devices()[0].device_kind,
      "num_devices": len(devices),
      "devices_available": jax.device_count(),
      "host": platform.machine(),
      "images_per_s": round(args.batch / statistics.median(times), 2),
      "peak_device_bytes": mem.get("peak_bytes_in_use"),
      "config": {"source": args.config or "issue reference", "batch": args.batch,
                 "resolution": args.resolution, "ch": m.ch, "ch_mult": list(m.ch_mult),
                 "num_res_blocks": m.num_res_blocks, "attn": list(m.attn_resolutions),
                 "z": m.z_channels, "codebook": [m.codebook_size, m.embed_dim],
                 "dec_ch": m.dec_ch, "dec_ch_mult": list(m.dec_ch_mult),
                 "dec_attn": list(m.dec_attn_resolutions), "router": m.router.kind,
                 "num_grains": m.num_grains,
                 "loss": "l1+lpips+codebook+budget+gan" if args.full_loss
                         else "l1+codebook+budget",
                 "optimizer": config.optim.name,
                 "matmul_precision": args.precision or "default"},
  }


if __name__ == "__main__":
  main()
