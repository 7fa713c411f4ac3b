"""Default data configuration (`config.data`)."""
import ml_collections


def default_data_config() -> ml_collections.ConfigDict:
  """Every data field with its default; see `dq.data.pipeline` for how each is used."""
  config = ml_collections.ConfigDict()
  config.name = "embedded"          # 'embedded' | 'folder' | 'tfds'
  config.image_size = 64
  config.random_crop = True         # Train only: random (not center) square crop.
  config.random_flip = True         # Train only: random horizontal flip.
  config.embedded = ml_collections.ConfigDict(dict(
      procedural_fraction=0.5, train_size=10_000, eval_size=256, photos=True))
  config.folder = ml_collections.ConfigDict(dict(
      train_path="", eval_path="", eval_fraction=0.02, labels_from_subfolders=False))
  config.tfds = ml_collections.ConfigDict(dict(
      name="", data_dir="", train_split="train", eval_split="validation", image_key="image",
      label_key="label"))
  config.max_bad_fraction = 0.5     # Skipped / seen records above this -> RuntimeError.
  config.worker_count = 0           # grain worker processes (0: read in this process).
  config.prefetch_buffer = 2        # Batches read ahead (per worker when worker_count > 0).
  return config
