"""Stage-2 (DQ-Transformer) trainer: `train_and_evaluate` and `encode` (the `sample` mode is
`dq.train.transformer_sample.sample`).

Tokens come from a trained DQ-VAE (`config.stage1.path`): either read from token shards in
`config.tokens.dir` (written once by `encode`, or by training when the folder has no meta.json)
or encoded on the fly from the image pipeline with a jitted stage-1 encoder. Resume order: the
latest complete checkpoint in the workdir, then `config.init_from`, then scratch. The step is
jitted once with explicit shardings and the state donated, as in stage 1.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from dq import sharding as sh
from dq.data import pipeline
from dq.generator import (STAGE1_RECORD, check_stage1_of_run, load_stage1, make_generate_fn,
                          make_layout, resolve_data_config)
from dq.stage2 import progressive
from dq.stage2 import sampler as sampling
from dq import tokenizer as stage1_lib
from dq.stage2 import token_data
from dq.stage2 import token_encoding
from dq.stage2.build import build_transformer
from dq.stage2.layout import TokenLayout
from dq import checkpoint as ckpt
from dq.train import throughput
from dq.train import run_setup
from dq.train.loop import TrainLoop
from dq.train.transformer_sample import write_sample_grid
from dq.train.transformer_step import (PACKED_KEYS, TransformerState, make_init_fn,
                                       make_transformer_optimizer, make_update_fn)
from dq.train.workdir import TrainingRun
from dq.train.writers import create_writer


def record_stage1(workdir: str, stage1: stage1_lib.Stage1) -> None:
  """Writes WORKDIR/stage1.json {path, fingerprint} on a run's first start; on a resume,
  checks that config.stage1.path still gives the same tokenizer."""
  path = os.path.join(workdir, STAGE1_RECORD)
  if os.path.isfile(path):
    check_stage1_of_run(workdir, stage1)
    return
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    token_data.write_json_atomic(path, {"path": stage1.source,
                                        "fingerprint": stage1.fingerprint})


def tokens_dir(config: Any, workdir: str) -> str:
  return config.tokens.dir or os.path.join(workdir, "tokens")


def encode_split(config: Any, stage1: stage1_lib.Stage1, data_cfg: Any, layout: TokenLayout,
                 out_dir: str, split: str) -> dict:
  """Encodes one split of `data_cfg` into token shards under `out_dir`."""
  logging.info("Encoding the %s split into token shards under %s", split, out_dir)
  return token_encoding.encode_dataset(
      stage1, data_cfg, out_dir, split=split, batch_size=config.tokens.encode_batch_size,
      shard_size=config.tokens.shard_size, flips=config.tokens.flip,
      max_images=config.tokens.max_images, num_classes=layout.num_classes)


class TrainTokens:
  """Sharded packed token batches for training, from token shards or encoded on the fly.

  `iterator` is the grain iterator that checkpoints save and restore.
  """

  def __init__(self, config: Any, stage1: stage1_lib.Stage1, data_cfg: Any,
               layout: TokenLayout, mesh: Any, local_batch_size: int):
    self.mesh = mesh
    self.on_the_fly = not config.tokens.dir
    shard = dict(shard_index=jax.process_index(), shard_count=jax.process_count())
    if self.on_the_fly:
      dataset = pipeline.make_dataset(data_cfg, split="train", batch_size=local_batch_size,
                                      seed=config.seed, train=True, **shard)
      self._encode = _make_batch_encoder(stage1, layout, config.tokens.fine_order,
                                         config.tokens.flip, mesh, config.seed)
    else:
      directory = config.tokens.dir
      if not _has_train_tokens(directory):
        if jax.process_index() == 0:
          encode_split(config, stage1, data_cfg, layout, directory, "train")
        _sync("dq_token_encode")
      token_data.check_token_meta(token_data.load_token_meta(directory), layout, directory,
                                  stage1_fingerprint=stage1.fingerprint)
      dataset = token_data.make_token_dataset(
          directory, layout, split="train", batch_size=local_batch_size, seed=config.seed,
          train=True, flip=config.tokens.flip, fine_order=config.tokens.fine_order, **shard)
    self.iterator = iter(dataset)
    self.skipped_records = 0  # corrupt images skipped while reading the latest batch

  def next(self, step: int) -> dict:
    """The batch of `step`: packed content/position/segment/valid [B, L] sharded over data."""
    batch = next(self.iterator)
    self.skipped_records = int(batch.get("skipped_records", 0))
    if self.on_the_fly:
      return self._encode(batch, step)
    return sh.shard_batch({k: batch[k] for k in PACKED_KEYS}, self.mesh)


def _has_train_tokens(directory: str) -> bool:
  """True when `directory/meta.json` lists a train split (encoded before)."""
  try:
    meta = token_data.load_token_meta(directory)
  except FileNotFoundError:
    return False
  return "train" in meta.get("splits", {})


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def _make_batch_encoder(stage1: stage1_lib.Stage1, layout: TokenLayout, fine_order: str,
                        flip: bool, mesh: Any, seed: int) -> Callable[[dict, int], dict]:
  """(host image batch, step) -> packed tokens sharded over data; flips keyed on the step.

  The stage-1 variables are an argument of the jitted encoder (replicated), not constants
  folded into its program.
  """
  stage1_lib.make_image_token_fn(stage1, layout, fine_order)  # checks the layout up front
  conditional = layout.num_classes > 0
  flip_key = jax.random.fold_in(jax.random.PRNGKey(seed), 0x5EED)

  def encode(variables, images, labels, step):
    token_fn = stage1_lib.make_image_token_fn(dataclasses.replace(stage1, variables=variables),
                                              layout, fine_order)
    rng = jax.random.fold_in(flip_key, step) if flip else None
    return token_fn(images, labels if conditional else None, rng)

  batch_sharding, repl = sh.batch_sharding(mesh), sh.replicated(mesh)
  jitted = jax.jit(encode, in_shardings=(repl, batch_sharding, batch_sharding, repl),
                   out_shardings=batch_sharding)
  variables = jax.device_put(stage1.variables, repl)

  def encode_batch(batch: dict, step: int) -> dict:
    arrays = sh.shard_batch({"image": batch["image"], "label": batch["label"]}, mesh)
    return jitted(variables, arrays["image"], arrays["label"], jnp.asarray(step, jnp.int32))

  return encode_batch


def init_params_from(path: str, state: TransformerState, abstract: TransformerState
                     ) -> TransformerState:
  """Params of another stage-2 run (workdir or checkpoint folder) or of a folder written by
  `python -m dq.tools.convert_official_transformer`; step and optimizer fresh. A longer
  converted `pos_emb` (official block_size) is cut to this layout's length."""
  from dq.official import transformer as convert
  if os.path.isfile(os.path.join(path, convert.PARAMS_FILE)):
    params, _ = convert.load_converted_transformer(path)
    wanted = abstract.params["pos_emb"].shape[1]
    if params["pos_emb"].shape[1] > wanted:
      params["pos_emb"] = params["pos_emb"][:, :wanted]
  else:
    params = ckpt.restore_params_from(path)["params"]
  if not ckpt.matches_abstract(params, abstract.params):
    raise ValueError(f"config.init_from={path}: its parameters do not match config.model and "
                     "the token layout (different widths, depths, stage 1 or classes)")
  params = jax.tree.map(lambda a, b: jax.device_put(np.asarray(a, b.dtype), b.sharding),
                        params, abstract.params)
  logging.info("Initialised transformer params from %s", path)
  return state.replace(params=params)


def setup(config: Any, workdir: str):
  """Stage 1, layout, mesh, model, optimizer, state (resumed or fresh) and the token batches."""
  stage1 = load_stage1(config)
  record_stage1(workdir, stage1)
  data_cfg = resolve_data_config(config, stage1)
  layout = make_layout(config, stage1, data_cfg)
  mesh, local_bs = run_setup.mesh_and_local_batch(config.get("mesh"), config.train.batch_size)
  model = build_transformer(config.model, layout)
  tx, schedule = make_transformer_optimizer(config.optim, config.train.num_steps)
  init_fn = make_init_fn(model, tx, layout)
  rng = jax.random.PRNGKey(config.seed)
  state_shardings = run_setup.state_shardings(init_fn, rng, mesh, config.get("sharding"))
  tokens = TrainTokens(config, stage1, data_cfg, layout, mesh, local_bs)
  run_state = run_setup.init_or_restore(
      init_fn, rng, state_shardings, workdir, keep=config.train.keep_checkpoints,
      async_save=config.train.get("async_checkpointing", True), data_iterator=tokens.iterator,
      allow_data_restart=config.train.get("allow_data_restart", False),
      init_from=(functools.partial(init_params_from, config.init_from) if config.get("init_from")
                 else None))
  return dict(stage1=stage1, layout=layout, mesh=mesh, model=model, tx=tx, schedule=schedule,
              state=run_state.state, state_shardings=state_shardings, tokens=tokens,
              manager=run_state.manager)


def train_and_evaluate(config: Any, workdir: str) -> Optional[TransformerState]:
  """Trains the DQ-Transformer for `config.train.num_steps` with logs, sample grids and
  checkpoints; returns the final state (None when a stop signal ended the setup)."""
  with TrainingRun(config, workdir) as run:
    with run.phase("setup", skipped="nothing was trained or saved"):
      env = setup(config, workdir)
      run.record_config(int(jax.device_get(env["state"].step)))
      env["train_step"] = run_setup.jit_train_step(
          make_update_fn(env["model"], env["tx"], env["schedule"], layout=env["layout"],
                         label_dropout=config.label_dropout,
                         class_conditional=config.class_conditional,
                         microbatches=config.train.get("microbatches", 1),
                         activation_sharding=sh.batch_sharding(env["mesh"])),
          env["mesh"], env["state_shardings"])
    return _train(config, workdir, run, env)
  return None


def _train(config: Any, workdir: str, run: TrainingRun, env: dict) -> TransformerState:
  layout, state, tokens, manager, train_step = (
      env["layout"], env["state"], env["tokens"], env["manager"], env["train_step"])
  writer = create_writer(workdir, tensorboard=config.train.get("tensorboard", True))
  sample_every = config.train.get("sample_every", 0)
  generate = decode_partial = None
  if sample_every and config.train.sample_images:
    generate = make_generate_fn(env["model"], layout, env["stage1"],
                                sampling.sampling_config_from(config.sample))
    decode_partial = progressive.make_partial_decode_fn(env["stage1"])

  start = int(jax.device_get(state.step))
  total = config.train.num_steps
  logging.info("Training the transformer from step %d to %d (batch %d on %d devices, tokens %s, "
               "max_len %d, %d classes)", start, total, config.train.batch_size,
               jax.device_count(), config.tokens.dir or "encoded on the fly", layout.max_len,
               layout.num_classes)
  # Model FLOPs of one step over the static [B, max_len] batch (for the logged MFU).
  step_flops = (throughput.model_flops_per_token(env["model"], layout.max_len - 1)
                * config.train.batch_size * (layout.max_len - 1))
  token_count = jnp.zeros((), jnp.float32)
  with TrainLoop(config.train, manager, start, watch=run.watch) as loop:
    for step in loop.steps():
      batch = tokens.next(step)
      state, metrics = train_step(state, batch)
      token_count = token_count + metrics["tokens"]  # stays on device until the next log
      loop.stepped(step, metrics, tokens.skipped_records)
      if loop.log_due(step):
        scalars = loop.log_scalars(step, metrics, config.train.batch_size)
        scalars["tokens_per_sec"] = (float(jax.device_get(token_count))
                                     / scalars["elapsed_since_log"])
        utilisation = throughput.mfu(step_flops, scalars["steps_per_sec"], jax.devices())
        if utilisation is not None:
          scalars["mfu"] = utilisation
        token_count = jnp.zeros((), jnp.float32)
        writer.write_scalars(step, scalars)
      if generate is not None and (step % sample_every == 0 or step == total):
        write_sample_grid(writer, generate, decode_partial, state.params, config, layout, step)
      if loop.save_due(step):
        loop.save(step, state, tokens.iterator)
  loop.finish()
  writer.flush()
  return state


def encode(config: Any, workdir: str) -> dict:
  """Encode mode: token shards of the train and eval splits under `tokens.dir`
  (default WORKDIR/tokens). Returns {split: encode_dataset's result}."""
  stage1 = load_stage1(config)
  data_cfg = resolve_data_config(config, stage1)
  layout = make_layout(config, stage1, data_cfg)
  out_dir = tokens_dir(config, workdir)
  results = {}
  for split in ("train", "eval"):
    results[split] = encode_split(config, stage1, data_cfg, layout, out_dir, split)
  return results
