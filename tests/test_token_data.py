"""Stage-1 loading for stage 2, token shards, the token dataset and on-the-fly tokens."""
import json
import logging
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dq.data import embedded, pipeline
from dq import tokenizer as stage1_lib
from dq.stage2 import token_data
from dq.stage2 import token_encoding
from dq.stage2.layout import TokenLayout
from dq.stage2.tokens import pack_tokens, unpack_tokens
from stage1_util import make_tiny_stage1, tiny_data_config, tiny_model_config

NUM_CLASSES = embedded.NUM_CLASSES


@pytest.fixture(scope="module")
def stage1_dir(tiny_stage1_dir):
  return tiny_stage1_dir


@pytest.fixture(scope="module")
def stage1(stage1_dir):
  return stage1_lib.load_stage1(stage1_dir)


@pytest.fixture(scope="module")
def data_cfg():
  return tiny_data_config(train_size=48, eval_size=16)


def eval_images(data_cfg, split="eval"):
  """The eval-mode images and labels of a split, in order."""
  batches = list(pipeline.make_dataset(data_cfg, split=split, batch_size=64, seed=0,
                                       train=False, num_epochs=1, drop_remainder=False))
  return (np.concatenate([b["image"] for b in batches]),
          np.concatenate([b["label"] for b in batches]))


def read_shards(tokens_dir, split):
  """Concatenated shard arrays of a split (from meta.json's shard list)."""
  meta = token_data.load_token_meta(tokens_dir)
  shards = [dict(np.load(os.path.join(tokens_dir, name)))
            for name in meta["splits"][split]["shards"]]
  return {k: np.concatenate([s[k] for s in shards]) for k in shards[0]}


@pytest.fixture(scope="module")
def tokens_dir(stage1, data_cfg, tmp_path_factory):
  """Class-conditional tokens of both splits; eval in 4 shards (5, 5, 5, 1), batches of 6."""
  out = str(tmp_path_factory.mktemp("tokens"))
  token_encoding.encode_dataset(stage1, data_cfg, out, split="eval", batch_size=6, shard_size=5,
                            num_classes=NUM_CLASSES)
  token_encoding.encode_dataset(stage1, data_cfg, out, split="train", batch_size=16,
                            shard_size=20, num_classes=NUM_CLASSES)
  return out


def take(iterator, count):
  return [next(iterator) for _ in range(count)]


def record_key(codes, grain, label):
  return (np.asarray(codes, np.int32).tobytes(), np.asarray(grain, np.int32).tobytes(),
          int(label))


# ---------------------------------------------------------------- load_stage1


def test_load_converted_folder(stage1, stage1_dir, data_cfg):
  assert stage1.image_size == 32 and stage1.codebook_size == 16
  assert stage1.coarse_size == (4, 4) and stage1.fine_size == (8, 8)
  assert stage1.source == os.path.abspath(stage1_dir)
  assert stage1.model_cfg.ch_mult == (1, 1, 2, 2)
  with np.load(os.path.join(stage1_dir, "params.npz")) as npz:
    np.testing.assert_array_equal(stage1.variables["params"]["router"]["gate_2"]["bias"],
                                  npz["params/router/gate_2/bias"])
    np.testing.assert_array_equal(stage1.variables["codebook"]["quantize"]["embedding"],
                                  npz["codebook/quantize/embedding"])
  images, _ = eval_images(data_cfg)
  codes, grain = stage1_lib.make_encode_fn(stage1)(images)
  assert codes.shape == (16, 8, 8) and grain.shape == (16, 4, 4)
  assert codes.dtype == jnp.int32 and grain.dtype == jnp.int32
  assert 0 < float(grain.mean()) < 1  # both grains occur on the data
  decoded = stage1_lib.make_decode_fn(stage1)(codes)
  assert decoded.shape == (16, 32, 32, 3) and decoded.dtype == jnp.float32
  assert float(decoded.min()) >= -1 and float(decoded.max()) <= 1
  assert np.any(np.abs(np.asarray(decoded)) == 1)  # clipped: the random decoder overshoots
  assert len(np.unique(np.asarray(decoded))) > 1000
  layout = stage1_lib.token_layout(stage1, num_classes=3, max_len=40)
  assert layout == TokenLayout((4, 4), (8, 8), 16, num_classes=3, max_len=40)


def write_workdir(workdir, variables, model_cfg, stage="vae"):
  """A stage-1 workdir as vae_trainer leaves it: config.json + checkpoints/<step>/state."""
  from dq.configs import vae_base_config
  from dq import checkpoint as ckpt
  config = vae_base_config()
  config.stage = stage
  config.model = model_cfg
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=1))
  state = {"step": jnp.asarray(7, jnp.int32), "params": variables["params"],
           "codebook": variables["codebook"], "rng": jax.random.PRNGKey(0)}
  manager = ckpt.make_manager(workdir, keep=1, async_save=False)
  ckpt.save(manager, 7, state, None)
  manager.wait_until_finished()
  manager.close()


def test_load_workdir_matches_converted(stage1, tmp_path, data_cfg):
  workdir = str(tmp_path / "vae")
  write_workdir(workdir, stage1.variables, tiny_model_config())
  images, _ = eval_images(data_cfg)
  expected = stage1_lib.make_encode_fn(stage1)(images)
  for path in (workdir, os.path.join(workdir, "checkpoints"),
               os.path.join(workdir, "checkpoints", "7")):
    loaded = stage1_lib.load_stage1(path)
    assert loaded.model_cfg.ch_mult == (1, 1, 2, 2)  # JSON lists back to tuples
    assert (loaded.coarse_size, loaded.fine_size, loaded.codebook_size) == ((4, 4), (8, 8), 16)
    for a, b in zip(jax.tree.leaves(loaded.variables), jax.tree.leaves(stage1.variables)):
      np.testing.assert_array_equal(a, b)
    codes, grain = stage1_lib.make_encode_fn(loaded)(images)
    np.testing.assert_array_equal(codes, expected[0])
    np.testing.assert_array_equal(grain, expected[1])


def test_load_workdir_of_another_stage_is_refused(stage1, tmp_path):
  write_workdir(str(tmp_path / "t"), stage1.variables, tiny_model_config(), stage="transformer")
  with pytest.raises(ValueError, match="'transformer' run, not of a stage-1 DQ-VAE"):
    stage1_lib.load_stage1(str(tmp_path / "t"))


def test_load_errors(stage1_dir, tmp_path):
  with pytest.raises(FileNotFoundError, match=r"nowhere does not exist; train stage 1 first "
                     r"\(python -m dq.main --config=configs/demo_vae.py.*convert_official_dqvae"):
    stage1_lib.load_stage1(str(tmp_path / "nowhere"))
  os.makedirs(tmp_path / "empty")
  with pytest.raises(FileNotFoundError, match="no params.npz.*no config.json"):
    stage1_lib.load_stage1(str(tmp_path / "empty"))

  def edited_copy(name, **fields):
    folder = str(tmp_path / name)
    shutil.copytree(stage1_dir, folder)
    cfg = json.load(open(os.path.join(folder, "model_config.json")))
    cfg.update(fields)
    json.dump(cfg, open(os.path.join(folder, "model_config.json"), "w"))
    return folder

  with pytest.raises(ValueError, match="dual-grain.*model.num_grains=3"):
    stage1_lib.load_stage1(edited_copy("triple", num_grains=3))
  with pytest.raises(ValueError, match=r"codebook/quantize/embedding has shape \(16, 8\), the "
                     r"config builds \(32, 8\)"):
    stage1_lib.load_stage1(edited_copy("wider", codebook_size=32))


def test_entropy_router_thresholds(tmp_path, data_cfg):
  from dq.models import entropy
  folder = make_tiny_stage1(str(tmp_path / "entropy"), router="entropy")
  table_path = os.path.join(folder, "entropy_thresholds.json")
  loaded = stage1_lib.load_stage1(folder)
  expected = entropy.threshold_for_ratio(entropy.load_threshold_table(table_path), 0.5)
  assert loaded.model.entropy_thresholds == pytest.approx((expected,))
  grain = stage1_lib.make_encode_fn(loaded)(eval_images(data_cfg)[0])[1]
  assert 0 < float(grain.mean()) < 1
  # An explicit router.thresholds_path wins over the folder's file.
  moved = str(tmp_path / "table.json")
  os.rename(table_path, moved)
  with pytest.raises(FileNotFoundError, match="entropy_thresholds.json"):
    stage1_lib.load_stage1(folder)
  cfg = json.load(open(os.path.join(folder, "model_config.json")))
  cfg["router"]["thresholds_path"] = moved
  json.dump(cfg, open(os.path.join(folder, "model_config.json"), "w"))
  assert stage1_lib.load_stage1(folder).model.entropy_thresholds == pytest.approx((expected,))


# ---------------------------------------------------------------- encode_dataset


def test_encode_dataset_matches_direct_encoding(stage1, data_cfg, tokens_dir):
  meta = token_data.load_token_meta(tokens_dir)
  assert meta["coarse_size"] == [4, 4] and meta["fine_size"] == [8, 8]
  assert meta["codebook_size"] == 16 and meta["image_size"] == 32
  assert meta["num_classes"] == NUM_CLASSES and meta["flips"] is True
  assert meta["stage1"] == stage1.source
  entry = meta["splits"]["eval"]
  assert entry["num_images"] == 16
  assert entry["shards"] == [f"eval-{i:05d}.npz" for i in range(4)]
  sizes = [len(np.load(os.path.join(tokens_dir, n))["label"]) for n in entry["shards"]]
  assert sizes == [5, 5, 5, 1]
  assert meta["splits"]["train"]["num_images"] == 48
  assert not [n for n in os.listdir(tokens_dir) if n.startswith(".")]  # no temp files left

  stored = read_shards(tokens_dir, "eval")
  assert stored["codes"].dtype == np.int16 and stored["grain"].dtype == np.uint8
  assert stored["label"].dtype == np.int32
  images, labels = eval_images(data_cfg)
  encode = stage1_lib.make_encode_fn(stage1)
  codes, grain = encode(images)
  np.testing.assert_array_equal(stored["codes"], codes)
  np.testing.assert_array_equal(stored["grain"], grain)
  np.testing.assert_array_equal(stored["label"], labels)
  codes_flip, grain_flip = encode(images[:, :, ::-1])
  np.testing.assert_array_equal(stored["codes_flip"], codes_flip)
  np.testing.assert_array_equal(stored["grain_flip"], grain_flip)
  assert not np.array_equal(stored["codes_flip"], stored["codes"])
  assert entry["fine_ratio_mean"] == pytest.approx(float(np.mean(grain)))


def test_encode_dataset_is_idempotent(stage1, data_cfg, tokens_dir, caplog):
  before = {n: os.path.getmtime(os.path.join(tokens_dir, n)) for n in os.listdir(tokens_dir)}
  meta = token_data.load_token_meta(tokens_dir)
  with caplog.at_level(logging.INFO):
    entry = token_encoding.encode_dataset(stage1, data_cfg, tokens_dir, split="eval", batch_size=6,
                                      shard_size=5, num_classes=NUM_CLASSES)
  assert entry == meta["splits"]["eval"]
  assert "already in" in caplog.text and "skipping" in caplog.text
  assert {n: os.path.getmtime(os.path.join(tokens_dir, n))
          for n in os.listdir(tokens_dir)} == before
  with pytest.raises(ValueError, match="flips=True, not False"):
    token_encoding.encode_dataset(stage1, data_cfg, tokens_dir, split="eval", flips=False,
                              num_classes=NUM_CLASSES)


def test_encode_dataset_options(stage1, data_cfg, tokens_dir, tmp_path):
  out = str(tmp_path / "tokens")
  entry = token_encoding.encode_dataset(stage1, data_cfg, out, split="train", batch_size=8,
                                    shard_size=100, flips=False, max_images=11, num_classes=0)
  assert entry["num_images"] == 11 and entry["shards"] == ["train-00000.npz"]
  stored = read_shards(out, "train")
  assert set(stored) == {"codes", "grain", "label"} and len(stored["label"]) == 11
  np.testing.assert_array_equal(stored["codes"], read_shards(tokens_dir, "train")["codes"][:11])
  meta = token_data.load_token_meta(out)
  assert meta["num_classes"] == 0 and meta["flips"] is False
  wrong_size = tiny_data_config()
  wrong_size.image_size = 64
  with pytest.raises(ValueError, match="data.image_size=64.*32 px"):
    token_encoding.encode_dataset(stage1, wrong_size, str(tmp_path / "other"))
  with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
    token_encoding.encode_dataset(stage1, data_cfg, str(tmp_path / "few"), split="eval",
                              num_classes=3)


def test_meta_errors(stage1, tokens_dir, tmp_path):
  with pytest.raises(FileNotFoundError, match="no meta.json; create it with the encode job"):
    token_data.load_token_meta(str(tmp_path))
  meta = token_data.load_token_meta(tokens_dir)
  token_data.check_token_meta(meta, stage1_lib.token_layout(stage1, NUM_CLASSES), tokens_dir,
                              stage1_source=stage1.source)
  cases = [(TokenLayout(4, 8, 32, NUM_CLASSES), r"codebook_size=16 but the token layout needs "
            r"codebook_size=32"),
           (TokenLayout(2, 4, 16, NUM_CLASSES), r"coarse_size=\[4, 4\] .* coarse_size=\[2, 2\]"),
           (TokenLayout(4, 8, 16, 0), "num_classes=9 .* num_classes=0")]
  for layout, message in cases:
    with pytest.raises(ValueError, match=message):
      token_data.check_token_meta(meta, layout, tokens_dir)
  with pytest.raises(ValueError, match="fine_size=\\[8, 8\\] .* fine_size=\\[6, 6\\]"):
    token_data.check_token_meta({**meta, "coarse_size": [3, 3]}, TokenLayout(3, 6, 16, 9),
                                tokens_dir)
  with pytest.raises(ValueError, match="stage1="):
    token_data.check_token_meta(meta, TokenLayout(4, 8, 16, 9), tokens_dir,
                                stage1_source="/other/vae")
  with pytest.raises(ValueError, match="codebook_size"):
    token_data.make_token_dataset(tokens_dir, TokenLayout(4, 8, 32, 9), split="eval",
                                  batch_size=2, seed=0, train=False)
  with pytest.raises(ValueError, match="no 'test' split"):
    token_data.TokenSource(tokens_dir, "test")


# ---------------------------------------------------------------- TokenSource / dataset


def test_token_source(tokens_dir):
  stored = read_shards(tokens_dir, "eval")
  source = token_data.TokenSource(tokens_dir, "eval", max_cached_shards=2)
  assert len(source) == 16
  for index in (15, 0, 7, 5, 4, 10):  # across shard edges, cache evictions
    record = source[index]
    assert set(record) == {"codes", "grain", "label", "codes_flip", "grain_flip"}
    for name in record:
      np.testing.assert_array_equal(record[name], stored[name][index])
  assert len(source._cache) == 2
  with pytest.raises(IndexError):
    source[16]


def test_token_dataset_round_trip_in_order(stage1, tokens_dir):
  layout = stage1_lib.token_layout(stage1, num_classes=NUM_CLASSES)
  stored = read_shards(tokens_dir, "eval")
  batches = list(token_data.make_token_dataset(tokens_dir, layout, split="eval", batch_size=6,
                                               seed=0, train=False, drop_remainder=False))
  assert [len(b["label"]) for b in batches] == [6, 6, 4]
  batch = batches[0]
  assert set(batch) == {"content", "position", "segment", "valid", "label"}
  for name in ("content", "position", "segment"):
    assert batch[name].dtype == np.int32 and batch[name].shape == (6, layout.max_len)
  assert batch["valid"].dtype == bool
  packed = {k: np.concatenate([b[k] for b in batches]) for k in batch}
  codes, grain = unpack_tokens(packed, layout)
  np.testing.assert_array_equal(codes, stored["codes"])  # eval: no flips, no shuffle
  np.testing.assert_array_equal(grain, stored["grain"])
  np.testing.assert_array_equal(packed["label"], stored["label"])
  # Class-conditional: the SOS content is the class SOS of the label.
  np.testing.assert_array_equal(packed["content"][:, 0],
                                [layout.class_sos(int(l)) for l in stored["label"]])
  expected = pack_tokens(stored["codes"], stored["grain"], layout, stored["label"])
  for name in expected:
    np.testing.assert_array_equal(packed[name], expected[name])


def test_token_dataset_unconditional_region_order(stage1, data_cfg, tmp_path):
  out = str(tmp_path / "tokens")
  token_encoding.encode_dataset(stage1, data_cfg, out, split="eval", batch_size=16, num_classes=0)
  layout = stage1_lib.token_layout(stage1)
  batch = next(iter(token_data.make_token_dataset(out, layout, split="eval", batch_size=16,
                                                  seed=0, train=False, fine_order="region")))
  stored = read_shards(out, "eval")
  expected = pack_tokens(stored["codes"], stored["grain"], layout, fine_order="region")
  for name in expected:
    np.testing.assert_array_equal(batch[name], expected[name])
  assert np.all(batch["content"][:, 0] == layout.content_sos)
  np.testing.assert_array_equal(batch["label"], stored["label"])


def test_train_epoch_shuffles_and_flips(stage1, tokens_dir):
  layout = stage1_lib.token_layout(stage1, num_classes=NUM_CLASSES)
  stored = read_shards(tokens_dir, "train")
  originals = [record_key(c, g, l) for c, g, l in zip(stored["codes"], stored["grain"],
                                                     stored["label"])]
  flipped = [record_key(c, g, l) for c, g, l in zip(stored["codes_flip"], stored["grain_flip"],
                                                   stored["label"])]
  owner = {key: (i, False) for i, key in enumerate(originals)}
  owner.update({key: (i, True) for i, key in enumerate(flipped)})
  assert len(owner) == 2 * len(originals)  # every record and flip is distinct here

  def epoch(seed, flip=True):
    batches = list(token_data.make_token_dataset(
        tokens_dir, layout, split="train", batch_size=8, seed=seed, train=True, num_epochs=1,
        flip=flip))
    packed = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
    codes, grain = unpack_tokens(packed, layout)
    return [owner[record_key(c, g, l)] for c, g, l in zip(codes, grain, packed["label"])]

  seen = epoch(seed=1)
  assert sorted(i for i, _ in seen) == list(range(48))  # each record once, either version
  assert [i for i, _ in seen] != list(range(48))  # shuffled
  assert 10 < sum(f for _, f in seen) < 38  # both versions, about half flipped
  assert seen == epoch(seed=1) and seen != epoch(seed=2)  # deterministic in the seed
  assert not any(f for _, f in epoch(seed=1, flip=False))


def test_shards_are_disjoint_and_cover(stage1, tokens_dir):
  layout = stage1_lib.token_layout(stage1, num_classes=NUM_CLASSES)
  stored = read_shards(tokens_dir, "train")
  parts = []
  for index in range(3):
    batches = list(token_data.make_token_dataset(
        tokens_dir, layout, split="train", batch_size=4, seed=0, train=False,
        shard_index=index, shard_count=3))
    codes, grain = unpack_tokens({k: np.concatenate([b[k] for b in batches])
                                  for k in batches[0]}, layout)
    np.testing.assert_array_equal(codes, stored["codes"][index::3])
    np.testing.assert_array_equal(grain, stored["grain"][index::3])
    parts.append(len(codes))
  assert parts == [16, 16, 16]
  with pytest.raises(ValueError, match=r"shard_index=3 must be in \[0, shard_count=3\)"):
    token_data.make_token_dataset(tokens_dir, layout, split="train", batch_size=4, seed=0,
                                  train=True, shard_index=3, shard_count=3)


def test_iterator_state_round_trip(stage1, tokens_dir):
  layout = stage1_lib.token_layout(stage1, num_classes=NUM_CLASSES)

  def make():
    return token_data.make_token_dataset(tokens_dir, layout, split="train", batch_size=5,
                                         seed=3, train=True)

  iterator = iter(make())
  take(iterator, 11)  # past the first epoch of 48 records
  state = iterator.get_state()
  expected = take(iterator, 4)
  fresh = iter(make())
  fresh.set_state(state)
  for got, want in zip(take(fresh, 4), expected):
    assert set(got) == set(want)
    for name in want:
      np.testing.assert_array_equal(got[name], want[name])


# ---------------------------------------------------------------- on-the-fly tokens


def assert_packed_equal(packed, expected):
  for name in expected:
    np.testing.assert_array_equal(np.asarray(packed[name]), expected[name])


def test_image_token_fn_matches_encode_then_pack(stage1, data_cfg):
  images, labels = eval_images(data_cfg)
  encode = stage1_lib.make_encode_fn(stage1)
  codes, grain = (np.asarray(a) for a in encode(images))
  codes_flip, grain_flip = (np.asarray(a) for a in encode(images[:, :, ::-1]))

  # Unconditional, no flips, weights closed over.
  layout = stage1_lib.token_layout(stage1)
  token_fn = jax.jit(stage1_lib.make_image_token_fn(stage1, layout, fine_order="region"))
  assert_packed_equal(token_fn(images), pack_tokens(codes, grain, layout, fine_order="region"))

  # Class-conditional with flips, weights as a jit argument (not baked in as constants).
  layout = stage1_lib.token_layout(stage1, num_classes=NUM_CLASSES)
  token_fn = jax.jit(stage1_lib.make_image_token_fn(stage1, layout, fine_order="region"))
  rng = jax.random.PRNGKey(5)
  flip = np.asarray(jax.random.bernoulli(rng, 0.5, (len(images),)))
  assert 0 < flip.sum() < len(flip)
  expected = pack_tokens(np.where(flip[:, None, None], codes_flip, codes),
                         np.where(flip[:, None, None], grain_flip, grain), layout, labels,
                         fine_order="region")
  assert_packed_equal(token_fn(images, labels, rng, stage1.variables), expected)

  with pytest.raises(ValueError, match="labels must be given exactly when"):
    stage1_lib.make_image_token_fn(stage1, layout)(images)
  with pytest.raises(ValueError, match=r"codebook_size=32 does not match.*codebook_size=16"):
    stage1_lib.make_image_token_fn(stage1, TokenLayout(4, 8, 32))
