"""Reads PyTorch checkpoints (`torch.save` files) into numpy arrays without importing torch.

Both `torch.save` layouts are supported:
  zip (torch >= 1.6): `<dir>/data.pkl` holds the object, `<dir>/data/<key>` the raw storages;
  legacy stream: magic number, protocol, system info, object, storage keys, then each storage
    as an int64 element count followed by its bytes.
The pickle is read by a restricted unpickler: only tensor/parameter rebuild functions, storage
classes, `torch.Size`, `torch.device`, torch dtypes, `collections.OrderedDict`, sets and
protocol-2 bytes are accepted; any other global is refused with an error naming it (or, with
`allow_unknown=True`, replaced by an inert `OpaqueObject` that runs no code). Tensors become
numpy arrays (views honour offset and strides, copied to C order); bfloat16 becomes float32.
"""
from __future__ import annotations

import collections
import dataclasses
import os
import pickle
import tarfile
import zipfile
from typing import Any, BinaryIO, Callable

import numpy as np

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
BFLOAT16 = "bfloat16"
# Storage class name -> element dtype (BFLOAT16 is read as uint16 and widened to float32).
STORAGE_DTYPES = {
    "FloatStorage": "float32", "DoubleStorage": "float64", "HalfStorage": "float16",
    "BFloat16Storage": BFLOAT16, "LongStorage": "int64", "IntStorage": "int32",
    "ShortStorage": "int16", "CharStorage": "int8", "ByteStorage": "uint8",
    "BoolStorage": "bool", "ComplexFloatStorage": "complex64",
    "ComplexDoubleStorage": "complex128", "UntypedStorage": "uint8",
}
TORCH_DTYPES = {
    "float32": "float32", "float": "float32", "float64": "float64", "double": "float64",
    "float16": "float16", "half": "float16", "bfloat16": BFLOAT16, "int64": "int64",
    "long": "int64", "int32": "int32", "int": "int32", "int16": "int16", "short": "int16",
    "int8": "int8", "uint8": "uint8", "bool": "bool", "complex64": "complex64",
    "complex128": "complex128",
}


class TorchCheckpointError(ValueError):
  """The file is not a readable PyTorch checkpoint, or it holds something refused."""


@dataclasses.dataclass(frozen=True)
class TorchDtype:
  """A pickled `torch.<dtype>` global."""
  name: str

  @property
  def element(self) -> str:
    return TORCH_DTYPES[self.name]


@dataclasses.dataclass(frozen=True)
class _StorageType:
  """A pickled storage class (`torch.FloatStorage`, ...): its element dtype."""
  element: str


@dataclasses.dataclass
class _Storage:
  """A storage record; `data` (1-D raw elements) is filled when its bytes are read."""
  key: str
  element: str
  numel: int
  data: np.ndarray | None = None


@dataclasses.dataclass
class _PendingTensor:
  """A tensor view of a storage, turned into a numpy array once every storage is read."""
  storage: _Storage
  offset: int
  size: tuple[int, ...]
  stride: tuple[int, ...]
  element: str | None = None  # set for `_rebuild_tensor_v3` (a dtype over untyped bytes)


class OpaqueObject:
  """Stands in for a refused class under `allow_unknown=True`; keeps its arguments only."""
  qualified_name = "?"

  def __new__(cls, *args: Any, **kwargs: Any) -> "OpaqueObject":
    del kwargs
    instance = super().__new__(cls)
    instance.args = args
    instance.state = None
    return instance

  def __init__(self, *args: Any, **kwargs: Any):
    del args, kwargs

  def __setstate__(self, state: Any) -> None:
    self.state = state

  def __repr__(self) -> str:
    return f"OpaqueObject({self.qualified_name})"


def _raw_dtype(element: str) -> np.dtype:
  return np.dtype(np.uint16 if element == BFLOAT16 else element)


def _rebuild_tensor_v2(storage: Any, storage_offset: int, size: tuple, stride: tuple,
                       requires_grad: bool = False, backward_hooks: Any = None,
                       metadata: Any = None) -> _PendingTensor:
  del requires_grad, backward_hooks, metadata
  if not isinstance(storage, _Storage):
    raise TorchCheckpointError(f"tensor rebuilt from {type(storage).__name__}, not a storage")
  return _PendingTensor(storage, int(storage_offset), tuple(size), tuple(stride))


def _rebuild_tensor_v3(storage: Any, storage_offset: int, size: tuple, stride: tuple,
                       requires_grad: bool, backward_hooks: Any, dtype: Any,
                       metadata: Any = None) -> _PendingTensor:
  tensor = _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad,
                              backward_hooks, metadata)
  if not isinstance(dtype, TorchDtype):
    raise TorchCheckpointError(f"_rebuild_tensor_v3 got dtype {dtype!r}, not a torch dtype")
  tensor.element = dtype.element
  return tensor


def _rebuild_parameter(data: Any, requires_grad: bool = False, backward_hooks: Any = None,
                       state: Any = None) -> Any:
  del requires_grad, backward_hooks, state
  return data


def _bytes_from_latin1(text: str, encoding: str = "latin1") -> bytes:
  if not isinstance(text, str) or encoding != "latin1":
    raise TorchCheckpointError(f"_codecs.encode({text!r:.40}, {encoding!r}) is not a pickled "
                               "bytes object")
  return text.encode("latin1")


def _device(kind: str, index: int | None = None) -> str:
  return str(kind) if index is None else f"{kind}:{index}"


ALLOWED_GLOBALS = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch", "Size"): tuple,
    ("torch", "device"): _device,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("__builtin__", "set"): set,  # Protocol-2 pickles written by Python 3 use the Python 2 name.
    ("__builtin__", "frozenset"): frozenset,
    ("_codecs", "encode"): _bytes_from_latin1,
}


class _RestrictedUnpickler(pickle.Unpickler):
  """Unpickler that only builds tensors and plain containers; storages come from `load_storage`."""

  def __init__(self, file: BinaryIO, source: str, load_storage: Callable[[_Storage], _Storage],
               allow_unknown: bool):
    super().__init__(file)
    self._source = source
    self._load_storage = load_storage
    self._allow_unknown = allow_unknown
    self._storages: dict[str, _Storage] = {}

  def find_class(self, module: str, name: str) -> Any:
    if (module, name) in ALLOWED_GLOBALS:
      return ALLOWED_GLOBALS[(module, name)]
    if module in ("torch", "torch.storage") and name in STORAGE_DTYPES:
      return _StorageType(STORAGE_DTYPES[name])
    if module == "torch" and name in TORCH_DTYPES:
      return TorchDtype(name)
    if self._allow_unknown:
      return type(name, (OpaqueObject,), {"qualified_name": f"{module}.{name}"})
    raise TorchCheckpointError(
        f"{self._source}: refusing to unpickle {module}.{name}; a checkpoint may only hold "
        "tensors, storages, torch.Size/device/dtypes, OrderedDict and plain Python values "
        "(pass allow_unknown=True to replace other objects by inert placeholders)")

  def persistent_load(self, pid: Any) -> _Storage:
    if not isinstance(pid, tuple) or len(pid) < 5 or pid[0] != "storage":
      raise TorchCheckpointError(f"{self._source}: unsupported persistent id {pid!r:.80}")
    storage_type, key, _, numel = pid[1:5]
    if not isinstance(storage_type, _StorageType):
      raise TorchCheckpointError(f"{self._source}: storage {key!r} has type {storage_type!r}")
    if len(pid) > 5 and pid[5] is not None:
      raise TorchCheckpointError(f"{self._source}: storage {key!r} is a legacy storage view "
                                 f"{pid[5]!r}; storage views are not supported")
    key = str(key)
    if key not in self._storages:
      self._storages[key] = self._load_storage(_Storage(key, storage_type.element, int(numel)))
    return self._storages[key]


def _read_storage_bytes(storage: _Storage, raw: bytes, source: str, big_endian: bool) -> None:
  dtype = _raw_dtype(storage.element)
  needed = storage.numel * dtype.itemsize
  if len(raw) < needed:
    raise TorchCheckpointError(f"{source}: storage {storage.key!r} has {len(raw)} bytes; "
                               f"{storage.numel} x {storage.element} need {needed}")
  data = np.frombuffer(raw, dtype.newbyteorder(">" if big_endian else "<"), storage.numel)
  storage.data = data.astype(dtype.newbyteorder("="))


def _tensor_to_numpy(tensor: _PendingTensor, source: str) -> np.ndarray:
  storage = tensor.storage
  if storage.data is None:
    raise TorchCheckpointError(f"{source}: storage {storage.key!r} was never read")
  element = tensor.element or storage.element
  flat = storage.data
  if tensor.element is not None:
    raw = _raw_dtype(element)
    if flat.nbytes % raw.itemsize:
      raise TorchCheckpointError(f"{source}: storage {storage.key!r} ({flat.nbytes} bytes) is "
                                 f"not a whole number of {element} elements")
    flat = flat.view(raw)
  size, stride, offset = tensor.size, tensor.stride, tensor.offset
  if len(size) != len(stride) or min(stride, default=0) < 0 or offset < 0:
    raise TorchCheckpointError(f"{source}: tensor on storage {storage.key!r} has size {size}, "
                               f"stride {stride}, offset {offset}")
  if 0 in size:
    array = np.zeros(size, flat.dtype)
  else:
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= flat.size:
      raise TorchCheckpointError(
          f"{source}: tensor (size {size}, stride {stride}, offset {offset}) reaches element "
          f"{last} of storage {storage.key!r}, which holds {flat.size}")
    view = np.lib.stride_tricks.as_strided(
        flat[offset:], shape=size, strides=[s * flat.itemsize for s in stride], writeable=False)
    array = np.array(view, order="C")
  if element == BFLOAT16:
    array = (array.astype(np.uint32) << 16).view(np.float32)
  return array


def _materialize(obj: Any, source: str) -> Any:
  """Replaces every pending tensor in nested containers by its numpy array."""
  if isinstance(obj, _PendingTensor):
    return _tensor_to_numpy(obj, source)
  if isinstance(obj, dict):
    result = type(obj)() if isinstance(obj, collections.OrderedDict) else {}
    for key, value in obj.items():
      result[key] = _materialize(value, source)
    return result
  if isinstance(obj, (list, tuple, set, frozenset)):
    return type(obj)(_materialize(value, source) for value in obj)
  return obj


def _load_zip(path: str, allow_unknown: bool) -> Any:
  with zipfile.ZipFile(path) as archive:
    names = archive.namelist()
    pickles = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pickles) != 1:
      raise TorchCheckpointError(f"{path}: zip archive is not a torch.save file (expected one "
                                 f"'<dir>/data.pkl', found {pickles or 'none'})")
    prefix = pickles[0][:-len("data.pkl")]
    big_endian = False
    if prefix + "byteorder" in names:
      big_endian = archive.read(prefix + "byteorder").decode().strip() == "big"

    def load_storage(storage: _Storage) -> _Storage:
      name = f"{prefix}data/{storage.key}"
      if name not in names:
        raise TorchCheckpointError(f"{path}: storage record {name!r} is missing")
      _read_storage_bytes(storage, archive.read(name), path, big_endian)
      return storage

    with archive.open(pickles[0]) as stream:
      try:
        obj = _RestrictedUnpickler(stream, path, load_storage, allow_unknown).load()
      except TorchCheckpointError:
        raise
      except Exception as error:
        raise TorchCheckpointError(f"{path}: {pickles[0]} does not unpickle: {error}") from error
  return _materialize(obj, path)


def _load_legacy(path: str, allow_unknown: bool) -> Any:
  with open(path, "rb") as stream:

    def unpickle(what: str, storages: list[_Storage] | None = None) -> Any:
      def keep(storage: _Storage) -> _Storage:
        if storages is None:
          raise TorchCheckpointError(f"{path}: unexpected storage in the {what}")
        storages.append(storage)
        return storage

      try:
        return _RestrictedUnpickler(stream, path, keep, allow_unknown).load()
      except TorchCheckpointError:
        raise
      except Exception as error:
        raise TorchCheckpointError(f"{path}: not a PyTorch checkpoint (no zip archive with "
                                   f"data.pkl, and the {what} of a legacy torch.save stream "
                                   f"does not unpickle: {error})") from error

    magic = unpickle("magic number")
    if magic != LEGACY_MAGIC:
      raise TorchCheckpointError(f"{path}: not a PyTorch checkpoint (a pickle, but it starts "
                                 f"with {magic!r:.60} instead of the torch.save magic number)")
    unpickle("protocol version")
    sys_info = unpickle("system info")
    if isinstance(sys_info, dict) and sys_info.get("little_endian") is False:
      raise TorchCheckpointError(f"{path}: big-endian legacy checkpoints are not supported")
    storages: list[_Storage] = []
    obj = unpickle("object", storages)
    keys = unpickle("storage key list")
    by_key = {s.key: s for s in storages}
    for key in keys:
      if str(key) not in by_key:
        raise TorchCheckpointError(f"{path}: storage key {key!r} is listed but never used")
      storage = by_key[str(key)]
      header = stream.read(8)
      count = int(np.frombuffer(header, "<i8")[0]) if len(header) == 8 else -1
      if count != storage.numel:
        raise TorchCheckpointError(f"{path}: storage {key!r} header says {count} elements; the "
                                   f"object expects {storage.numel}")
      raw = stream.read(count * _raw_dtype(storage.element).itemsize)
      _read_storage_bytes(storage, raw, path, big_endian=False)
  return _materialize(obj, path)


def load_torch_checkpoint(path: str | os.PathLike, *, allow_unknown: bool = False) -> Any:
  """Loads a `torch.save` file; every tensor becomes a numpy array (bfloat16 -> float32).

  Raises:
    FileNotFoundError: `path` does not exist.
    TorchCheckpointError: not a PyTorch checkpoint, or it holds a refused object.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"checkpoint {path} does not exist or is not a file")
  if zipfile.is_zipfile(path):
    return _load_zip(path, allow_unknown)
  if tarfile.is_tarfile(path):
    raise TorchCheckpointError(f"{path}: the tar-based torch.save format (PyTorch < 0.4) is "
                               "not supported; re-save it with a recent PyTorch")
  return _load_legacy(path, allow_unknown)


def load_torch_state_dict(path: str | os.PathLike, *,
                          allow_unknown: bool = False) -> dict[str, np.ndarray]:
  """The state dict of a checkpoint: its `state_dict` entry (PyTorch Lightning), or the file's
  top-level dict itself when that maps names to tensors."""
  obj = load_torch_checkpoint(path, allow_unknown=allow_unknown)
  if not isinstance(obj, dict):
    raise TorchCheckpointError(f"{path}: holds a {type(obj).__name__}, not a dict with "
                               "'state_dict' or a state dict")
  state_dict = obj.get("state_dict", obj)
  if not isinstance(state_dict, dict):
    raise TorchCheckpointError(f"{path}: 'state_dict' is a {type(state_dict).__name__}")
  for key, value in state_dict.items():
    if not isinstance(value, np.ndarray):
      where = "'state_dict'" if "state_dict" in obj else "the top-level dict (no 'state_dict')"
      raise TorchCheckpointError(f"{path}: entry {key!r} of {where} is a "
                                 f"{type(value).__name__}, not a tensor; top-level keys: "
                                 f"{sorted(map(str, obj))[:10]}")
  return dict(state_dict)
