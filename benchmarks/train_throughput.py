"""Training throughput: stage-2 tokens/s and MFU, stage-1 examples/s, on whatever is present.

On an accelerator: the paper's base DQ-Transformer (d 1024, 8 heads, 6 position + 18 content
layers, bf16 compute, fp32 master weights) on 256 px tokens (coarse 16x16, fine 32x32, codebook
1024) with every sequence 644 tokens (fine ratio 0.5), and the paper DQ-VAE
(`configs/ffhq_vae.py`, 256 px, L1 + codebook + budget). On CPU: tiny sizes (d 128, 2+4 layers;
`configs/ffhq_vae.py:tiny`) so the script still runs. MFU uses the analytic model FLOPs of
`dq.train.throughput` and the device's dense bf16 peak (null when unknown, e.g. CPU).

  python benchmarks/train_throughput.py [--stage 2] [--batch 32] [--steps 10] [--dtype bfloat16]
  python benchmarks/train_throughput.py --stage 2 --size paper --batch 32 --compile_only  # CPU
`--compile_only` compiles the stage-2 step without running it and reports XLA's FLOP count next
to the analytic one (the MFU numerator) and the compiled per-device memory. Prints one JSON line.
"""
import argparse
import importlib.util
import json
import os
import statistics
import time

import jax
import numpy as np

from dq import sharding as sh
from dq.configs import transformer_base_config
from dq.stage2.build import build_transformer, default_transformer_config
from dq.stage2.layout import TokenLayout
from dq.stage2.tokens import pack_tokens
from dq.train import throughput
from dq.train import transformer_step as ts

REPO = os.path.join(os.path.dirname(__file__), "..")


def timed(step, state, batch, steps):
  """Median seconds per step after two warm-up (compile) steps; returns (seconds, state)."""
  for _ in range(2):
    state, metrics = step(state, batch)
  jax.block_until_ready(metrics)
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  return statistics.median(times), state


def packed_batch(layout: TokenLayout, batch: int, fine_regions: int) -> dict:
  """Random code maps with exactly `fine_regions` fine regions each."""
  rng = np.random.default_rng(0)
  hc, wc = layout.coarse_size
  grain = np.zeros((batch, hc * wc), np.int64)
  for row in grain:
    row[rng.choice(hc * wc, fine_regions, replace=False)] = 1
  grain = grain.reshape(batch, hc, wc)
  coarse = np.repeat(np.repeat(rng.integers(0, layout.codebook_size, (batch, hc, wc)), 2, 1),
                     2, 2)
  fine = rng.integers(0, layout.codebook_size, (batch,) + layout.fine_size)
  codes = np.where(np.repeat(np.repeat(grain, 2, 1), 2, 2) == 1, fine, coarse)
  return pack_tokens(codes, grain, layout)


def compiled_report(step, state, batch, analytic_flops: float) -> dict:
  """XLA's FLOP count and per-device memory of one compiled step, next to the analytic count."""
  compiled = step.lower(state, batch).compile()
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else {}
  xla_flops = float((analysis or {}).get("flops", 0.0))
  memory = compiled.memory_analysis()
  report = {"xla_tflops_per_step": xla_flops / 1e12,
            "analytic_over_xla_flops": analytic_flops / xla_flops if xla_flops else None}
  if memory is not None:
    report["memory_gib_per_device"] = {
        name: getattr(memory, f"{name}_size_in_bytes") / 2**30
        for name in ("argument", "output", "temp", "generated_code")}
  return report


def stage2(args, accelerator: bool) -> dict:
  layout = TokenLayout(coarse_size=16, fine_size=32, codebook_size=1024, max_len=644)
  model_cfg = default_transformer_config()
  if args.size == "paper" or (args.size == "auto" and accelerator):
    model_cfg.update(dict(n_embd=1024, n_head=8, position_layers=6, content_layers=18))
  else:
    model_cfg.update(dict(n_embd=128, n_head=4, position_layers=2, content_layers=4))
  model_cfg.update(dict(dtype=args.dtype, dropout=0.0, remat=args.remat))
  if args.attention:
    model_cfg.attention_impl = args.attention
  model = build_transformer(model_cfg, layout)
  optim = transformer_base_config().optim
  tx, schedule = ts.make_transformer_optimizer(optim, 1000)
  mesh = sh.make_mesh()
  init_fn = ts.make_init_fn(model, tx, layout)
  rng = jax.random.PRNGKey(0)
  shardings = sh.state_shardings_from_config(jax.eval_shape(init_fn, rng), mesh)
  state = jax.jit(init_fn, out_shardings=shardings)(rng)
  update_fn = ts.make_update_fn(model, tx, schedule, layout=layout, label_dropout=0.0,
                                class_conditional=False)
  step = jax.jit(update_fn, in_shardings=(shardings, sh.batch_sharding(mesh)),
                 out_shardings=(shardings, sh.replicated(mesh)), donate_argnums=0)
  batch = sh.shard_batch(packed_batch(layout, args.batch, 128), mesh)
  context = layout.max_len - 1
  step_flops = throughput.model_flops_per_token(model, context) * args.batch * context
  params = int(sum(np.size(p) for p in jax.tree.leaves(jax.eval_shape(init_fn, rng).params)))
  result = {"model": dict(model_cfg), "batch": args.batch, "tokens_per_sequence": layout.max_len,
            "model_tflops_per_step": step_flops / 1e12, "params": params}
  if args.compile_only:
    return {**result, **compiled_report(step, state, batch, step_flops)}
  seconds, _ = timed(step, state, batch, args.steps)
  return {**result, "step_seconds": seconds,
          "tokens_per_sec": args.batch * layout.max_len / seconds,
          "mfu": throughput.mfu(step_flops, 1.0 / seconds, jax.devices())}


def stage1(args, accelerator: bool) -> dict:
  from dq.models.build import build_dqvae
  from dq.train.optim import make_optimizer
  from dq.train.vae_step import make_update_fn
  from dq.train.vae_trainer import make_init_fn
  spec = importlib.util.spec_from_file_location("cfg", os.path.join(REPO, "configs",
                                                                      "ffhq_vae.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(None if accelerator else "tiny")
  config.loss.update(dict(perceptual_weight=0.0, disc_weight=0.0))
  config.model.dtype = args.dtype
  model = build_dqvae(config.model)
  tx, schedule = make_optimizer(config.optim, 1000)
  mesh = sh.make_mesh()
  size = config.data.image_size
  init_fn = make_init_fn(model, tx, size)
  rng = jax.random.PRNGKey(0)
  shardings = sh.state_shardings_from_config(jax.eval_shape(init_fn, rng), mesh)
  state = jax.jit(init_fn, out_shardings=shardings)(rng)
  update_fn = make_update_fn(model, tx, schedule, loss_cfg=config.loss,
                             router_cfg=config.model.router, num_grains=config.model.num_grains)
  repl = sh.replicated(mesh)
  step = jax.jit(lambda s, b: update_fn(s, b, {}),
                 in_shardings=(shardings, sh.batch_sharding(mesh)),
                 out_shardings=(shardings, repl), donate_argnums=0)
  images = np.random.default_rng(0).uniform(-1, 1, (args.batch, size, size, 3)).astype(np.float32)
  seconds, _ = timed(step, state, sh.shard_batch({"image": images}, mesh), args.steps)
  return {"config": "configs/ffhq_vae.py" + ("" if accelerator else ":tiny"),
          "image_size": size, "batch": args.batch, "step_seconds": seconds,
          "examples_per_sec": args.batch / seconds}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--stage", choices=["1", "2", "both"], default="both")
  parser.add_argument("--batch", type=int, default=None)
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
  parser.add_argument("--attention", default="", help="'' (plain XLA), 'xla' or 'cudnn'")
  parser.add_argument("--size", default="auto", choices=["auto", "paper", "tiny"],
                      help="stage 2: paper = d 1024, 6+18 layers (auto: paper on accelerators)")
  parser.add_argument("--remat", action="store_true",
                      help="stage 2: recompute block activations in the backward pass")
  parser.add_argument("--compile_only", action="store_true",
                      help="stage 2: compile the step and report XLA's FLOPs and memory, no run")
  args = parser.parse_args()
  accelerator = jax.default_backend() != "cpu"
  results = {}
  for stage in (("1", "2") if args.stage == "both" else (args.stage,)):
    batch = args.batch or ((32 if stage == "2" else 16) if accelerator else 2)
    run = stage2 if stage == "2" else stage1
    results[f"stage{stage}"] = run(argparse.Namespace(**{**vars(args), "batch": batch}),
                                   accelerator)
  print(json.dumps({"benchmark": "train_throughput", "results": results,
                    "backend": jax.default_backend(), "device": jax.devices()[0].device_kind,
                    "devices": jax.device_count(), "dtype": args.dtype, "jax": jax.__version__},
                   default=str))


if __name__ == "__main__":
  main()
