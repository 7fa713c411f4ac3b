"""A trained DQ-Transformer as an image generator: loading and the batched generation loop.

Loading: the transformer's params from a stage-2 workdir (its latest checkpoint, else its
`init_from`), one of its checkpoint folders or a folder converted from the official weights
(`python -m dq.tools.convert_official_transformer`), together with the stage-1 tokenizer that
decodes its tokens (`load_generator`; the sample mode builds the same pieces from its own
config: `load_stage1`, `make_layout`, `restore_params`).

Generation: labels (`sample_labels`: `config.sample.labels` cycled, or class-balanced) ->
packed tokens (the sampler of `config.sample`, on the first local device) -> images, in
batches of one shape (`generate_in_batches`; the last batch padded, then trimmed).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any, Callable, Iterator, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dq.data import pipeline
from dq.stage2 import sampler as sampling
from dq.stage2.sampler_checks import check_checkpoint_matches_layout
from dq import tokenizer as stage1_lib
from dq.run_files import WORKDIR_CONFIG
from dq.stage2.build import build_transformer, default_transformer_config
from dq.stage2.layout import TokenLayout
from dq.stage2.tokens import unpack_tokens_jax
from dq.stage2.progressive import PACKED_FIELDS as PACKED_KEYS
from dq.official import transformer as convert_transformer
STAGE1_RECORD = "stage1.json"  # the DQ-VAE a stage-2 run trains on: path and fingerprint


# --- the tokenizer of a run ----------------------------------------------------------------


def load_stage1(config: Any) -> stage1_lib.Stage1:
  """The frozen DQ-VAE at `config.stage1.path`, with clear errors when it is missing."""
  path = config.stage1.path
  if not path:
    raise ValueError(f"config.stage1.path is empty: stage 2 needs a trained DQ-VAE; "
                     f"{stage1_lib.STAGE1_HINT}, then pass --config.stage1.path=DIR (the demo "
                     "config takes it as configs/demo_transformer.py:stage1=DIR)")
  stage1 = stage1_lib.load_stage1(path)
  logging.info("Stage 1 from %s: %d px, coarse %s, fine %s, codebook %d", path,
               stage1.image_size, stage1.coarse_size, stage1.fine_size, stage1.codebook_size)
  return stage1


def _stage1_record_path(run_dir: str) -> Optional[str]:
  """WORKDIR/stage1.json of a stage-2 run given its workdir or one of its checkpoint folders."""
  for directory in (run_dir, os.path.dirname(os.path.dirname(os.path.abspath(run_dir)))):
    path = os.path.join(directory, STAGE1_RECORD)
    if os.path.isfile(path):
      return path
  return None


def check_stage1_of_run(run_dir: str, stage1: stage1_lib.Stage1) -> None:
  """ValueError when the stage-2 run in `run_dir` was trained on the tokens of another DQ-VAE
  than `stage1` (its recorded tokenizer fingerprint differs); runs without a record (converted
  official folders, older runs) pass."""
  path = _stage1_record_path(run_dir)
  if path is None:
    return
  with open(path) as f:
    record = json.load(f)
  trained = record.get("fingerprint")
  if trained and stage1.fingerprint and trained != stage1.fingerprint:
    raise ValueError(
        f"the transformer in {run_dir} was trained on tokens of the stage-1 model "
        f"{record.get('path')} (tokenizer fingerprint {trained}), but config.stage1.path="
        f"{stage1.source} gives fingerprint {stage1.fingerprint}: its encoder, router or codebook "
        "differ (another or a further-trained DQ-VAE), so its codes mean something else. Point "
        "config.stage1.path at the model the transformer was trained with (a stage-1 workdir's "
        "checkpoints/STEP folder pins one checkpoint)")


def resolve_data_config(config: Any, stage1: stage1_lib.Stage1) -> Any:
  """`config.data` with image_size taken from stage 1 (0) or checked against it."""
  data_cfg = config.data.copy_and_resolve_references()
  if data_cfg.image_size == 0:
    data_cfg.image_size = stage1.image_size
  elif data_cfg.image_size != stage1.image_size:
    raise ValueError(f"config.data.image_size={data_cfg.image_size} but the stage-1 model at "
                     f"{config.stage1.path} codes {stage1.image_size} px images; set it to "
                     f"{stage1.image_size} or 0")
  return data_cfg


def make_layout(config: Any, stage1: stage1_lib.Stage1, data_cfg: Any) -> TokenLayout:
  """Token layout of the stage-1 grids; classes from the data when class-conditional."""
  num_classes = pipeline.num_classes(data_cfg) if config.class_conditional else 0
  return stage1_lib.token_layout(stage1, num_classes=num_classes,
                                 max_len=config.tokens.max_len or None)


# --- transformer params --------------------------------------------------------------------


def abstract_params(model: Any, layout: TokenLayout) -> Any:
  """Shapes and dtypes of the transformer's params (from a dummy [1, max_len] batch)."""
  dummy = jnp.zeros((1, layout.max_len), jnp.int32)
  return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), dummy, dummy, dummy,
                                           method="forward_packed")["params"])


def restore_params(config: Any, workdir: str, abstract: Any,
                   layout: Optional[TokenLayout] = None,
                   stage1: Optional[stage1_lib.Stage1] = None) -> tuple[Any, int, str]:
  """(params, step, source) from the latest checkpoint in the workdir, else `init_from`; with
  `layout`, a checkpoint trained for another stage 1 or token layout is named as such, and with
  `stage1`, a run trained on another DQ-VAE of the same shapes (`check_stage1_of_run`)."""
  from dq import checkpoint as ckpt  # Deferred: orbax is heavy.
  manager = ckpt.make_manager(workdir, keep=config.train.keep_checkpoints, async_save=False)
  source = workdir if manager.latest_step() is not None else config.get("init_from")
  if not source:
    raise FileNotFoundError(f"sample: no checkpoint in {workdir}/checkpoints and no "
                            "config.init_from; train first (mode 'train') or set "
                            "--config.init_from=DIR")
  restored = ckpt.restore_params_from(source)
  params = restored["params"]
  if layout is not None:
    check_checkpoint_matches_layout(params, layout, f"checkpoint {source}")
  if stage1 is not None:  # same shapes, other weights
    check_stage1_of_run(source, stage1)
  if not ckpt.matches_abstract(params, abstract):
    raise ValueError(f"checkpoint {source}: its parameters do not match config.model and the "
                     "token layout (different widths, depths, stage 1 or classes)")
  params = jax.tree.map(lambda a, b: np.asarray(a, b.dtype), params, abstract)
  return params, int(restored["step"]), source


# --- a generator from a workdir or a converted folder --------------------------------------


@dataclasses.dataclass
class Generator:
  """A trained DQ-Transformer ready to sample: module, layout, params, its stage 1."""
  model: Any
  layout: TokenLayout
  params: Any
  step: int
  source: str
  stage1: stage1_lib.Stage1
  fine_order: str


def _stage1_for(config: Any, run_stage1_path: str, where: str) -> stage1_lib.Stage1:
  path = config.stage1.path or run_stage1_path
  if not path:
    raise ValueError(f"{where} names no stage-1 model: set config.stage1.path to the DQ-VAE "
                     "(workdir or converted folder) the transformer was trained on")
  return stage1_lib.load_stage1(path)


def load_generator(config: Any) -> Generator:
  """The DQ-Transformer at `config.stage2.workdir`: a dq stage-2 workdir (its config.json
  gives model, classes, token layout and stage 1; params from its latest checkpoint, else
  its init_from) or a converted official folder (params.npz + transformer_config.json; stage 1
  from `config.stage1.path`)."""
  path = config.stage2.workdir
  if not path:
    raise ValueError("config.stage2.workdir is empty: set it to a stage-2 workdir (python -m "
                     "dq.main --config=configs/*_transformer.py) or a converted official "
                     "DQ-Transformer folder (python -m dq.tools.convert_official_transformer)")
  path = os.path.abspath(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"config.stage2.workdir={path} does not exist")
  if os.path.isfile(os.path.join(path, convert_transformer.CONFIG_FILE)):
    return _load_converted(config, path)
  return _load_workdir(config, path)


def _load_converted(config: Any, path: str) -> Generator:
  """A folder of python -m dq.tools.convert_official_transformer; stage 1 from the config."""
  params, converted = convert_transformer.load_converted_transformer(path)
  vae = _stage1_for(config, "", f"the converted DQ-Transformer {path}")
  layout = TokenLayout(**converted["layout"])
  expected = stage1_lib.token_layout(vae, layout.num_classes, layout.max_len)
  if expected != layout:
    raise ValueError(f"{path}: token layout {layout} does not match the stage-1 model "
                     f"{vae.source} ({expected})")
  model_cfg = default_transformer_config()
  model_cfg.update({k: v for k, v in converted["model"].items() if k in model_cfg})
  model = build_transformer(model_cfg, layout)
  abstract = abstract_params(model, layout)
  from dq import checkpoint as ckpt  # Deferred: orbax is heavy.
  if not ckpt.matches_abstract(params, abstract):
    raise ValueError(f"{path}: its parameters do not match the model its config describes")
  params = jax.tree.map(lambda a, b: np.asarray(a, b.dtype), params, abstract)
  return Generator(model, layout, params, 0, path, vae, "row")


def _load_workdir(config: Any, path: str) -> Generator:
  """A dq stage-2 workdir: its config.json and latest checkpoint (else its init_from)."""
  config_path = os.path.join(path, WORKDIR_CONFIG)
  if not os.path.isfile(config_path):
    raise FileNotFoundError(
        f"config.stage2.workdir={path} has neither {WORKDIR_CONFIG} (a stage-2 workdir) nor "
        f"{convert_transformer.CONFIG_FILE} (a converted official DQ-Transformer)")
  with open(config_path) as f:
    run = ml_collections.ConfigDict(json.load(f))
  if run.get("stage") != "transformer":
    raise ValueError(f"{config_path} is the config of a {run.get('stage')!r} run, not of a "
                     "stage-2 DQ-Transformer (config.stage='transformer')")
  vae = _stage1_for(config, run.stage1.path, config_path)
  layout = make_layout(run, vae, resolve_data_config(run, vae))
  model = build_transformer(run.model, layout)
  params, step, source = restore_params(run, path, abstract_params(model, layout), layout, vae)
  return Generator(model, layout, params, step, source, vae, run.tokens.fine_order)


def sampling_config(config: Any, generator: Generator) -> sampling.SamplingConfig:
  """`config.sample` as a SamplingConfig; fine_order '' -> the run's training order."""
  sample_cfg = config.sample.copy_and_resolve_references()
  if not sample_cfg.get("fine_order"):
    sample_cfg.fine_order = generator.fine_order
  return sampling.sampling_config_from(sample_cfg)


# --- labels -> tokens -> images, in batches ------------------------------------------------


def label_values(text: str) -> list[int]:
  """The ints of a comma-separated `sample.labels` (ValueError for anything else)."""
  return [int(v) for v in text.split(",") if v.strip()]


def sample_labels(config: Any, layout: TokenLayout, count: int) -> Optional[np.ndarray]:
  """Labels of `count` samples: `sample.labels` cycled, or a cycle over the classes when it is
  empty; None for an unconditional model."""
  text = str(config.sample.get("labels", "")).strip()
  if layout.num_classes == 0:
    if text:
      raise ValueError(f"config.sample.labels={text!r} but the model is unconditional "
                       "(config.class_conditional=False); leave it empty")
    return None
  if not text:
    return (np.arange(count) % layout.num_classes).astype(np.int32)
  try:
    values = label_values(text)
  except ValueError as e:
    raise ValueError(f"config.sample.labels={text!r}: expected comma-separated ints") from e
  bad = [v for v in values if not 0 <= v <= layout.num_classes]
  if not values or bad:
    raise ValueError(f"config.sample.labels={text!r}: labels must lie in [0, "
                     f"{layout.num_classes}] ({layout.num_classes} = null class)")
  return np.resize(np.asarray(values, np.int32), count)


def make_generate_fn(model: Any, layout: TokenLayout, stage1: stage1_lib.Stage1,
                     sampling_cfg: sampling.SamplingConfig
                     ) -> Callable[[Any, jax.Array, Any], dict]:
  """(params, rng, labels [B] or batch size) -> host dict codes, grain, images, length and the
  packed sequences as `packed_<field>` (content, position, segment, valid)."""
  sampler = sampling.make_sampler(model, layout, sampling_cfg)
  decode = stage1_lib.make_decode_fn(stage1)
  device = jax.local_devices()[0]

  def generate(params: Any, rng: jax.Array, labels_or_batch: Any) -> dict:
    # One device: a replicated sampling loop would repeat the same work on every device.
    params = jax.device_put(params, device)
    packed = sampler(params, jax.device_put(rng, device), labels_or_batch)
    codes, grain = unpack_tokens_jax(packed, layout)  # [B, hf, wf], [B, hc, wc]
    images = decode(codes)  # [B, H, W, 3] in [-1, 1]
    return jax.device_get({"codes": codes, "grain": grain, "images": images,
                           "length": packed["length"],
                           **{f"packed_{k}": packed[k] for k in PACKED_KEYS}})

  return generate


def count_batches(count: int, batch_size: int) -> int:
  return -(-count // batch_size)


def generate_in_batches(generate: Callable[[jax.Array, Any], Any], indices: range,
                        batch_size: int, labels: Optional[np.ndarray], base_rng: jax.Array,
                        progress: Optional[Callable[[int], Any]] = None
                        ) -> Iterator[tuple[int, Any]]:
  """Yields (take, generate(rng, request)) for the samples `indices` in batches of
  `batch_size`: batch i draws with fold_in(base_rng, i) and requests `batch_size` samples
  (unconditional) or its labels (`labels[indices]`, the last batch padded to one shape: one
  compilation), of which the first `take` are real. `progress(i + 1)` after batch i is used
  (e.g. a `dq.train.progress.Progress`).
  """
  num_batches = count_batches(len(indices), batch_size)
  for index in range(num_batches):
    lo = indices.start + index * batch_size
    take = min(batch_size, indices.stop - lo)
    if labels is None:
      request = batch_size
    else:  # the last batch padded to one shape (one compilation), then trimmed
      request = np.resize(labels[lo:lo + take], batch_size)
    yield take, generate(jax.random.fold_in(base_rng, index), request)
    if progress is not None:
      progress(index + 1)
