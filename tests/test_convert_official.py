"""Torch-free checkpoint reader and the official DQ-VAE converter CLI.

Checkpoints come from three places: files written by real PyTorch (`tests/data`, made by
`tests/data/make_torch_samples.py`), zip/legacy files written here from hand-built pickle
opcodes (no torch), and the official fixture's state dict wrapped as a Lightning checkpoint.
"""
import collections
import functools
import json
import pathlib
import pickle
import struct
import subprocess
import sys
import zipfile
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from dq.models.build import build_dqvae, default_model_config
from dq.models.dqvae import code_weight_mask
from dq.tools import convert_official_dqvae as conv
from dq.official import dqvae as dqvae_conversion
from dq.official.torch_pickle import (OpaqueObject, TorchCheckpointError, load_torch_checkpoint,
                                   load_torch_state_dict)

DATA = pathlib.Path(__file__).resolve().parent / "data"
REPO = pathlib.Path(__file__).resolve().parents[1]
ATOL = 1e-4


def to_bfloat16(values) -> np.ndarray:
  """float32 values rounded to bfloat16 (round to nearest even), as float32."""
  bits = np.asarray(values, np.float32).view(np.uint32).astype(np.uint64)
  rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
  return rounded.astype(np.uint32).view(np.float32)


def sample_arrays() -> dict[str, np.ndarray]:
  """The tensors of `make_torch_samples.sample_state_dict`, rebuilt with numpy."""
  base = np.arange(12, dtype=np.float32).reshape(3, 4) * 0.5 - 1.0
  return {
      "contiguous": base, "transposed": base.T, "offset_view": base[1:, 2:],
      "channels_last": np.arange(24, dtype=np.float32).reshape(2, 3, 2, 2),
      "bf16": to_bfloat16([1.0, -2.5, 3.14159, 1e-3, 65504.0]),
      "half": np.array([0.5, -1.25, 1e-4], np.float16),
      "long_strided": np.arange(10, dtype=np.int64)[1::3],
      "flags": np.array([True, False, True]), "empty": np.zeros((0, 3), np.float32),
      "param": np.full((2, 2), 7.0, np.float32),
  }


def assert_same_arrays(got: dict, expected: dict) -> None:
  assert list(got) == list(expected)
  for key, value in expected.items():
    assert got[key].dtype == value.dtype, key
    np.testing.assert_array_equal(got[key], value, err_msg=key)
    assert got[key].flags.c_contiguous, key


# ---------------------------------------------------------------------------------------------
# A torch-free writer: protocol-2 pickle opcodes as torch.save emits them.


class StoredTensor(NamedTuple):
  """A tensor view of storage `key` (elements of `storage_class`), as torch pickles it."""
  key: str
  storage_class: str
  numel: int
  offset: int
  size: tuple
  stride: tuple
  parameter: bool = False


class Call(NamedTuple):
  """`module.name(*args)` as a pickled call (for refusal tests)."""
  module: str
  name: str
  args: tuple


def pickle_opcodes(obj: Any, legacy: bool = False) -> bytes:
  out = bytearray(b"\x80\x02")

  def global_(module: str, name: str) -> None:
    out.extend(b"c" + module.encode() + b"\n" + name.encode() + b"\n")

  def empty_ordered_dict() -> None:
    global_("collections", "OrderedDict")
    out.extend(b")R")

  def emit(o: Any) -> None:
    if o is None:
      out.extend(b"N")
    elif isinstance(o, bool):
      out.extend(b"\x88" if o else b"\x89")
    elif isinstance(o, int):
      out.extend(b"J" + struct.pack("<i", o))
    elif isinstance(o, float):
      out.extend(b"G" + struct.pack(">d", o))
    elif isinstance(o, str):
      data = o.encode()
      out.extend(b"X" + struct.pack("<I", len(data)) + data)
    elif isinstance(o, Call):
      global_(o.module, o.name)
      emit(o.args)
      out.extend(b"R")
    elif isinstance(o, StoredTensor):
      if o.parameter:
        global_("torch._utils", "_rebuild_parameter")
        out.extend(b"(")
      global_("torch._utils", "_rebuild_tensor_v2")
      out.extend(b"((")
      emit("storage")
      global_("torch", o.storage_class)
      for part in (o.key, "cpu", o.numel) + ((None,) if legacy else ()):
        emit(part)
      out.extend(b"tQ")
      for part in (o.offset, tuple(o.size), tuple(o.stride), False):
        emit(part)
      empty_ordered_dict()
      out.extend(b"tR")
      if o.parameter:
        emit(True)
        empty_ordered_dict()
        out.extend(b"tR")
    elif isinstance(o, tuple):
      out.extend(b"(")
      for item in o:
        emit(item)
      out.extend(b"t")
    elif isinstance(o, list):
      out.extend(b"](")
      for item in o:
        emit(item)
      out.extend(b"e")
    elif isinstance(o, dict):
      if isinstance(o, collections.OrderedDict):
        empty_ordered_dict()
      else:
        out.extend(b"}")
      out.extend(b"(")
      for key, value in o.items():
        emit(key)
        emit(value)
      out.extend(b"u")
    else:
      raise TypeError(f"cannot emit {type(o)}")

  emit(obj)
  return bytes(out + b".")


STORAGE_CLASSES = {np.dtype(np.float32): "FloatStorage", np.dtype(np.int64): "LongStorage",
                   np.dtype(np.float16): "HalfStorage", np.dtype(np.bool_): "BoolStorage"}


class Storages:
  """Collects raw storages; `tensor(...)` returns the pickled view of one."""

  def __init__(self):
    self.raw: dict[str, bytes] = {}

  def add(self, flat: np.ndarray, storage_class: str | None = None,
          raw: bytes | None = None) -> tuple[str, str, int]:
    key = str(len(self.raw))
    self.raw[key] = flat.tobytes() if raw is None else raw
    return key, storage_class or STORAGE_CLASSES[flat.dtype], flat.size

  def tensor(self, array: np.ndarray, parameter: bool = False) -> StoredTensor:
    key, cls, numel = self.add(np.ascontiguousarray(array).reshape(-1))
    stride = tuple(int(np.prod(array.shape[i + 1:])) for i in range(array.ndim))
    return StoredTensor(key, cls, numel, 0, array.shape, stride, parameter)


def write_zip(path: pathlib.Path, obj: Any, storages: Storages, big_endian: bool = False,
              archive: str = "archive") -> pathlib.Path:
  with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
    zf.writestr(f"{archive}/data.pkl", pickle_opcodes(obj))
    zf.writestr(f"{archive}/byteorder", "big" if big_endian else "little")
    for key, raw in storages.raw.items():
      zf.writestr(f"{archive}/data/{key}", raw)
    zf.writestr(f"{archive}/version", "3\n")
  return path


def write_legacy(path: pathlib.Path, obj: Any, storages: Storages,
                 itemsizes: dict[str, int]) -> pathlib.Path:
  with open(path, "wb") as f:
    for header in (0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001,
                                                   "little_endian": True}):
      pickle.dump(header, f, protocol=2)
    f.write(pickle_opcodes(obj, legacy=True))
    pickle.dump(sorted(storages.raw), f, protocol=2)
    for key in sorted(storages.raw):
      raw = storages.raw[key]
      f.write(struct.pack("<q", len(raw) // itemsizes[key]) + raw)
  return path


def strided_sample(storages: Storages) -> tuple[dict, dict]:
  """Views with offsets, strides, a shared storage and bfloat16, plus their expected arrays."""
  flat = np.arange(30, dtype=np.float32) * 0.25 - 3.0
  key, cls, numel = storages.add(flat)
  grid = flat[2:26].reshape(4, 6)  # offset 2, strides (6, 1)
  bf16_values = np.array([1.0, 0.1, -7.3, 300.7, 1e-5, -0.0], np.float32)
  bf16_bits = (to_bfloat16(bf16_values).view(np.uint32) >> 16).astype("<u2")
  bf_key, _, bf_numel = storages.add(bf16_bits, "BFloat16Storage")
  tensors = {
      "grid": StoredTensor(key, cls, numel, 2, (4, 6), (6, 1)),
      "grid_t": StoredTensor(key, cls, numel, 2, (6, 4), (1, 6)),
      "every_other": StoredTensor(key, cls, numel, 3, (2, 3), (12, 2)),
      "broadcast": StoredTensor(key, cls, numel, 5, (3, 2), (0, 1)),
      "bf16_rev": StoredTensor(bf_key, "BFloat16Storage", bf_numel, 1, (2, 2), (1, 2)),
      "param": storages.tensor(np.eye(3, dtype=np.float32), parameter=True),
  }
  expected = {
      "grid": grid, "grid_t": grid.T, "every_other": flat[3:].reshape(-1)[[0, 2, 4, 12, 14, 16]]
      .reshape(2, 3), "broadcast": np.stack([flat[5:7]] * 3),
      "bf16_rev": to_bfloat16(bf16_values)[1:][[0, 2, 1, 3]].reshape(2, 2),
      "param": np.eye(3, dtype=np.float32),
  }
  return tensors, expected


# ---------------------------------------------------------------------------------------------
# Reader.


def test_reads_pytorch_written_lightning_checkpoint():
  path = DATA / "torch_lightning_sample.ckpt"
  obj = load_torch_checkpoint(path)
  assert_same_arrays(obj["state_dict"], sample_arrays())
  assert isinstance(obj["state_dict"], collections.OrderedDict)
  assert obj["epoch"] == 3 and obj["pytorch-lightning_version"] == "1.4.2"
  assert obj["misc"] == {"shape": (3, 4), "device": "cpu", "raw": b"\x00\xff", "set": {1, 2}}
  np.testing.assert_array_equal(obj["callbacks"]["ModelCheckpoint"]["best_model_score"],
                                np.float32(0.25))
  assert obj["optimizer_states"][0]["param_groups"][0]["betas"] == (0.5, 0.9)
  assert_same_arrays(load_torch_state_dict(path), sample_arrays())


def test_reads_pytorch_written_legacy_checkpoint():
  assert not zipfile.is_zipfile(DATA / "torch_legacy_sample.pt")
  assert_same_arrays(load_torch_state_dict(DATA / "torch_legacy_sample.pt"), sample_arrays())


@pytest.mark.parametrize("layout", ["zip", "zip_big_endian", "legacy"])
def test_strided_offset_and_bfloat16_views_round_trip(tmp_path, layout):
  storages = Storages()
  tensors, expected = strided_sample(storages)
  if layout == "legacy":
    itemsizes = {k: 2 if k == tensors["bf16_rev"].key else 4 for k in storages.raw}
    path = write_legacy(tmp_path / "legacy.pt", tensors, storages, itemsizes)
  elif layout == "zip_big_endian":
    for key, raw in storages.raw.items():
      width = 2 if key == tensors["bf16_rev"].key else 4
      storages.raw[key] = b"".join(raw[i:i + width][::-1] for i in range(0, len(raw), width))
    path = write_zip(tmp_path / "big.ckpt", tensors, storages, big_endian=True, archive="big")
  else:
    path = write_zip(tmp_path / "plain.pth", {"state_dict": tensors, "epoch": 1}, storages)
  assert_same_arrays(load_torch_state_dict(path), expected)


def test_refuses_unknown_globals_unless_allowed(tmp_path):
  storages = Storages()
  tensors = {"w": storages.tensor(np.ones((2, 2), np.float32))}
  marker = tmp_path / "ran"
  evil = {"state_dict": tensors, "hyper_parameters": Call("os", "system", (f"touch {marker}",))}
  path = write_zip(tmp_path / "evil.ckpt", evil, storages)
  with pytest.raises(TorchCheckpointError, match=r"refusing to unpickle os\.system"):
    load_torch_checkpoint(path)
  placeholder = load_torch_checkpoint(path, allow_unknown=True)["hyper_parameters"]
  assert isinstance(placeholder, OpaqueObject)
  assert placeholder.qualified_name == "os.system" and placeholder.args == (f"touch {marker}",)
  assert not marker.exists()
  np.testing.assert_array_equal(load_torch_state_dict(path, allow_unknown=True)["w"],
                                np.ones((2, 2)))


def test_clear_errors_for_bad_files(tmp_path):
  text = tmp_path / "notes.txt"
  text.write_text("not a checkpoint\n")
  with pytest.raises(TorchCheckpointError, match="not a PyTorch checkpoint"):
    load_torch_checkpoint(text)
  npz = tmp_path / "arrays.npz"
  np.savez(npz, a=np.zeros(2))
  with pytest.raises(TorchCheckpointError, match="data.pkl"):
    load_torch_checkpoint(npz)
  plain_pickle = tmp_path / "list.pkl"
  plain_pickle.write_bytes(pickle.dumps([1, 2], protocol=2))
  with pytest.raises(TorchCheckpointError, match="magic number"):
    load_torch_checkpoint(plain_pickle)
  with pytest.raises(FileNotFoundError, match="missing.ckpt"):
    load_torch_checkpoint(tmp_path / "missing.ckpt")

  storages = Storages()
  key, cls, numel = storages.add(np.zeros(6, np.float32))
  too_far = {"w": StoredTensor(key, cls, numel, 2, (2, 3), (3, 1))}
  with pytest.raises(TorchCheckpointError, match="reaches element 7"):
    load_torch_checkpoint(write_zip(tmp_path / "oob.ckpt", too_far, storages))
  not_tensors = {"state_dict": {"w": 3}}
  with pytest.raises(TorchCheckpointError, match="entry 'w'.*int, not a tensor"):
    load_torch_state_dict(write_zip(tmp_path / "int.ckpt", not_tensors, Storages()))


# ---------------------------------------------------------------------------------------------
# Official-shaped state dicts from our own models (the inverse of the converter's mapping).


def official_key(path: tuple[str, ...], position_type: str) -> str:
  """Official PyTorch module path of a Flax module path."""
  if path == ("decoder", "fourier_conv"):
    return ("decoder.position_bias.lff.ffm.conv" if position_type == "fourier"
            else "decoder.position_bias_fourier.lff.ffm.conv")
  if path[0] == "router":
    path = ("encoder",) + path
  parts = []
  for name in path:
    base, _, index = name.rpartition("_")
    inside_mid = any(p.startswith("mid") for p in parts)  # mid blocks keep `block_1`, `attn_1`
    parts += [base, index] if index.isdigit() and not inside_mid else [name]
  return ".".join(parts)


def official_state_dict(model_cfg, seed: int = 0) -> tuple[dict, dict]:
  """Random official-layout tensors for `model_cfg` and the Flax variables they should give."""
  thresholds = (0.3, 0.6)[:model_cfg.num_grains - 1] if model_cfg.router.kind == "entropy" else ()
  model = build_dqvae(model_cfg, entropy_thresholds=thresholds)
  images = jnp.zeros((1, model_cfg.resolution, model_cfg.resolution, 3))
  abstract = jax.eval_shape(functools.partial(model.init, train=False), jax.random.PRNGKey(0),
                            images)
  rng = np.random.default_rng(seed)
  params = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32),
                        abstract["params"])
  sd = {}
  for path, value in jax.tree_util.tree_leaves_with_path(params):
    names = tuple(p.key for p in path)
    if names[-1] in ("row_embed", "col_embed"):
      sd[f"decoder.position_bias_learned.{names[-1]}.weight"] = value
      continue
    module, leaf = official_key(names[:-1], model_cfg.position_type), names[-1]
    if leaf == "kernel":
      value = value.T if value.ndim == 2 else np.transpose(value, (3, 2, 0, 1))
    sd[f"{module}.{'bias' if leaf == 'bias' else 'weight'}"] = value
  codes, dim = model_cfg.codebook_size, model_cfg.embed_dim
  codebook = {"embedding": rng.standard_normal((codes, dim)).astype(np.float32),
              "cluster_size": rng.uniform(0.5, 4, codes).astype(np.float32)}
  codebook["embed_sum"] = codebook["embedding"] * codebook["cluster_size"][:, None]
  sd["quantize.codebook.weight"] = np.concatenate([codebook["embedding"], np.ones((1, dim))])
  sd["quantize.codebook.cluster_size_ema"] = codebook["cluster_size"]
  sd["quantize.codebook.embed_ema"] = codebook["embed_sum"]
  sd["loss.discriminator.main.0.weight"] = np.zeros((8, 3, 4, 4), np.float32)
  sd["loss.logvar"] = np.zeros((), np.float32)
  return sd, {"params": params, "codebook": {"quantize": codebook}}


def small_config(**fields) -> ml_collections.ConfigDict:
  cfg = default_model_config()
  cfg.update(dict(resolution=32, ch=32, ch_mult=(1, 2, 2), num_res_blocks=2,
                  attn_resolutions=(8,), z_channels=32, codebook_size=16, embed_dim=8,
                  dec_ch=32, dec_ch_mult=(1, 2), dec_num_res_blocks=1, dec_attn_resolutions=(16,)))
  router_kind = fields.pop("router_kind", "feature")
  cfg.update(fields)
  cfg.router.kind = router_kind
  return cfg


VARIANTS = {
    "dual_feature": dict(),
    "triple_feature": dict(num_grains=3, ch_mult=(1, 1, 2, 2), num_res_blocks=1,
                           attn_resolutions=(16, 4), codebook_size=8, embed_dim=32,
                           dec_ch=64, dec_ch_mult=(1, 1), dec_attn_resolutions=()),
    "dual_entropy_fourier": dict(router_kind="entropy", resolution=48, position_type="fourier",
                                 attn_resolutions=(12,), dec_num_res_blocks=2,
                                 dec_attn_resolutions=(24,)),
    "triple_entropy_none": dict(router_kind="entropy", num_grains=3, resolution=64,
                                ch_mult=(1, 2, 2, 4), attn_resolutions=(), position_type="none",
                                dec_attn_resolutions=(32,)),
}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_infers_architecture_and_converts_variants(name):
  fields = dict(VARIANTS[name])
  cfg = small_config(**fields)
  sd, expected = official_state_dict(cfg)
  if cfg.router.kind == "entropy":
    assert not any(k.startswith("encoder.router.") for k in sd)
  else:
    assert sd["encoder.router.gate.0.weight"].shape == (32 * cfg.num_grains,) * 2
  if cfg.num_grains == 3:
    assert "encoder.mid_median.attn_1.q.weight" in sd and "encoder.conv_out_median.bias" in sd
  needs_resolution = cfg.position_type != "fourier+learned"
  if needs_resolution:
    with pytest.raises(ValueError, match="--resolution"):
      dqvae_conversion.infer_model_config(sd)
  inferred = dqvae_conversion.infer_model_config(sd, cfg.resolution if needs_resolution else None)
  assert inferred == cfg.to_dict()
  params, codebook = dqvae_conversion.convert_state_dict(sd)
  variables = {"params": params, "codebook": codebook}
  dqvae_conversion.check_converted(sd, variables, inferred)
  jax.tree.map(np.testing.assert_array_equal, variables, expected)


def test_official_learned_only_decoder_converts_to_no_position_terms():
  """Official 'learned' builds `position_bias.{row,col}_embed` but its forward never adds them."""
  cfg = small_config(position_type="none")
  sd, expected = official_state_dict(cfg)
  sd["decoder.position_bias.row_embed.weight"] = np.ones((16, 32), np.float32)
  sd["decoder.position_bias.col_embed.weight"] = np.ones((16, 32), np.float32)
  inferred = dqvae_conversion.infer_model_config(sd, resolution=32)
  assert inferred["position_type"] == "none"
  params, _ = dqvae_conversion.convert_state_dict(sd)
  jax.tree.map(np.testing.assert_array_equal, params, expected["params"])


def test_inference_and_check_errors_name_the_problem():
  cfg = small_config()
  sd, _ = official_state_dict(cfg)
  with pytest.raises(ValueError, match="resolution 64 disagrees.*give 32"):
    dqvae_conversion.infer_model_config(sd, resolution=64)
  one_layer = {k: v for k, v in sd.items() if not k.startswith("encoder.router.gate")}
  one_layer["encoder.router.gate.weight"] = np.zeros((2, 64), np.float32)
  with pytest.raises(ValueError, match="encoder.router.gate.0.weight.*2layer-fc"):
    dqvae_conversion.infer_model_config(one_layer)
  without_codebook = {k: v for k, v in sd.items() if not k.startswith("quantize.")}
  with pytest.raises(ValueError, match="quantize.codebook.weight"):
    dqvae_conversion.infer_model_config(without_codebook)

  inferred = dqvae_conversion.infer_model_config(sd)
  extra = dict(sd, **{"encoder.extra_head.weight": np.zeros((4, 4), np.float32)})
  params, codebook = dqvae_conversion.convert_state_dict(extra)
  with pytest.raises(ValueError, match=r"unexpected 'encoder.extra_head.weight'"):
    dqvae_conversion.check_converted(extra, {"params": params, "codebook": codebook}, inferred)
  missing = {k: v for k, v in sd.items() if k != "decoder.mid.attn_1.q.bias"}
  params, codebook = dqvae_conversion.convert_state_dict(missing)
  with pytest.raises(ValueError, match="missing params/decoder/mid/attn_1/q/bias"):
    dqvae_conversion.check_converted(missing, {"params": params, "codebook": codebook}, inferred)


# ---------------------------------------------------------------------------------------------
# CLI on the official fixture.


def nhwc(a: np.ndarray) -> np.ndarray:
  return np.transpose(a, (0, 2, 3, 1))


def lightning_checkpoint(path: pathlib.Path, sd: dict) -> pathlib.Path:
  storages = Storages()
  state_dict = collections.OrderedDict((k, storages.tensor(np.asarray(v))) for k, v in sd.items())
  obj = {"epoch": 12, "global_step": 3400, "state_dict": state_dict,
         "lr_schedulers": [{"base_lrs": [4.5e-6], "last_epoch": 12}]}
  return write_zip(path, obj, storages, archive="last")


def test_cli_on_fixture_matches_official_outputs(tmp_path, official_dqvae):
  sd = {k[len("sd/"):]: v for k, v in official_dqvae.items() if k.startswith("sd/")}
  sd["loss.discriminator.main.0.weight"] = np.ones((64, 3, 4, 4), np.float32)
  sd["loss.perceptual_loss.net.slice1.0.weight"] = np.ones((64, 3, 3, 3), np.float32)
  ckpt = lightning_checkpoint(tmp_path / "last.ckpt", sd)
  out = tmp_path / "converted"
  assert conv.main([str(ckpt), str(out), "--config-out", str(tmp_path / "config.json")]) == 0
  assert (out / "params.npz").is_file() and not (out / "model_config.json").exists()
  keys = set(np.load(out / "params.npz").files)
  assert "params/encoder/conv_in/kernel" in keys and "codebook/quantize/embedding" in keys
  assert not any("loss" in k for k in keys)

  variables, model_cfg = dqvae_conversion.load_converted(str(out), str(tmp_path / "config.json"))
  official = json.loads(str(official_dqvae["config_json"]))
  assert model_cfg["ch_mult"] == tuple(official["encoder"]["ch_mult"])
  assert model_cfg["attn_resolutions"] == tuple(official["encoder"]["attn_resolutions"])
  assert model_cfg["dec_attn_resolutions"] == tuple(official["decoder"]["attn_resolutions"])
  assert (model_cfg["resolution"], model_cfg["codebook_size"], model_cfg["embed_dim"]) == (
      64, 64, 32)
  assert model_cfg["router"]["kind"] == "feature"
  assert model_cfg["position_type"] == "fourier+learned"
  direct = dqvae_conversion.convert_state_dict(sd)
  jax.tree.map(np.testing.assert_array_equal, variables,
               {"params": direct[0], "codebook": direct[1]})

  model = build_dqvae(ml_collections.ConfigDict(model_cfg))
  x = nhwc(official_dqvae["x"])
  with jax.default_matmul_precision("highest"):
    out_ = jax.jit(functools.partial(model.apply, train=False))(variables, x)
    quant = jax.jit(lambda v, c: model.apply(v, c, method=lambda m, c: m.quantize.lookup(c)))(
        variables, out_["codes"])
  np.testing.assert_allclose(out_["gate_logits"], official_dqvae["gate_logits"], atol=ATOL,
                             rtol=0)
  np.testing.assert_array_equal(out_["grain"], official_dqvae["grain"])
  np.testing.assert_array_equal(out_["codes"], official_dqvae["codes"])
  np.testing.assert_array_equal(code_weight_mask(out_["grain"], 2, 8),
                                official_dqvae["codebook_mask"][:, 0])
  np.testing.assert_allclose(quant, nhwc(official_dqvae["quant"]), atol=ATOL, rtol=0)
  np.testing.assert_allclose(out_["codebook_loss"], official_dqvae["vq_loss"], atol=ATOL,
                             rtol=1e-5)
  np.testing.assert_allclose(out_["xrec"], nhwc(official_dqvae["xrec"]), atol=ATOL, rtol=0)


def test_cli_reports_bad_input_and_exit_code(tmp_path):
  text = tmp_path / "readme.ckpt"
  text.write_text("hello")
  result = subprocess.run(
      [sys.executable, "-m", "dq.tools.convert_official_dqvae", str(text), str(tmp_path / "o")],
      cwd=REPO, capture_output=True, text=True, timeout=120)
  assert result.returncode == 1
  assert "not a PyTorch checkpoint" in result.stderr and str(text) in result.stderr
  assert not (tmp_path / "o").exists()
  with pytest.raises(FileNotFoundError, match="no params.npz"):
    dqvae_conversion.load_converted(str(tmp_path))
