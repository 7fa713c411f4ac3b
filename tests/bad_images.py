"""An image folder seeded with every kind of odd-but-valid and undecodable file (tests only).

`make_bad_folder(root)` writes it and returns (valid names, bad names): the valid files must
decode (converted to RGB), the bad ones must be skipped and counted by the folder source.
"""
from __future__ import annotations

import io
import os
import struct
import zlib

import numpy as np
from PIL import Image

RNG = np.random.default_rng(0)


def rgb(height: int, width: int) -> np.ndarray:
  """Random uint8 [height, width, 3]."""
  return RNG.integers(0, 256, (height, width, 3), dtype=np.uint8)


def write_png16_rgb(path: str, array: np.ndarray) -> None:
  """Minimal 16-bit RGB PNG writer (PIL cannot write this mode)."""
  height, width, _ = array.shape

  def chunk(tag: bytes, data: bytes) -> bytes:
    return (struct.pack(">I", len(data)) + tag + data +
            struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF))

  rows = b"".join(b"\x00" + array[y].astype(">u2").tobytes() for y in range(height))
  with open(path, "wb") as f:
    f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, 2,
                                                               0, 0, 0)) +
            chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def encoded(array: np.ndarray, image_format: str, **options) -> bytes:
  """`array` encoded as `image_format` ('PNG', 'JPEG', ...)."""
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format=image_format, **options)
  return buffer.getvalue()


def _write(path: str, data: bytes) -> None:
  with open(path, "wb") as f:
    f.write(data)


def _save_valid(root: str) -> set[str]:
  """Odd-but-valid images: formats, modes, sizes; returns their names."""
  os.makedirs(os.path.join(root, "sub"), exist_ok=True)
  Image.fromarray(rgb(20, 30)).save(os.path.join(root, "good.png"))
  Image.fromarray(rgb(24, 24)).save(os.path.join(root, "sub", "good.bmp"))
  Image.fromarray(rgb(24, 26)).save(os.path.join(root, "sub", "good.webp"))
  Image.fromarray(rgb(20, 22)).save(os.path.join(root, "good.TIFF"))
  Image.new("CMYK", (30, 20), (10, 200, 30, 0)).save(os.path.join(root, "cmyk.jpg"))
  Image.fromarray((np.arange(600).reshape(20, 30) * 100).astype(np.uint16)).save(
      os.path.join(root, "gray16.png"))
  write_png16_rgb(os.path.join(root, "rgb16.png"),
                  RNG.integers(0, 65536, (10, 12, 3)).astype(np.uint16))
  Image.fromarray(rgb(16, 16)[..., 0]).save(os.path.join(root, "gray.png"))
  Image.fromarray(np.dstack([rgb(16, 16), np.full((16, 16), 128, np.uint8)])).save(
      os.path.join(root, "rgba.png"))
  Image.fromarray(rgb(16, 16)).convert("P", palette=Image.Palette.ADAPTIVE).save(
      os.path.join(root, "palette.gif"))
  palette = Image.fromarray(rgb(12, 12)).convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
  palette.save(os.path.join(root, "palette_transparent.png"), transparency=0)
  Image.fromarray(rgb(1200, 1000)).save(os.path.join(root, "large.jpg"), quality=50)
  Image.fromarray(rgb(1, 1)).save(os.path.join(root, "tiny_1x1.png"))
  Image.fromarray(rgb(2, 3)).save(os.path.join(root, "tiny_2x3.png"))
  _write(os.path.join(root, "png_named.jpg"), encoded(rgb(18, 18), "PNG"))  # wrong extension
  return {"good.png", "good.bmp", "good.webp", "good.TIFF", "cmyk.jpg", "gray16.png",
          "rgb16.png", "gray.png", "rgba.png", "palette.gif", "palette_transparent.png",
          "large.jpg", "tiny_1x1.png", "tiny_2x3.png", "png_named.jpg"}


def _save_bad(root: str) -> set[str]:
  """Files that cannot be decoded; returns their names."""
  open(os.path.join(root, "zero.png"), "wb").close()
  jpeg = encoded(rgb(64, 64), "JPEG")
  _write(os.path.join(root, "sub", "truncated.jpg"), jpeg[:len(jpeg) // 2])
  png = encoded(rgb(32, 32), "PNG")
  _write(os.path.join(root, "truncated.png"), png[:len(png) // 2])
  corrupt = bytearray(png)
  corrupt[60:200] = RNG.integers(0, 256, 140, dtype=np.uint8).tobytes()  # inside the IDAT data
  _write(os.path.join(root, "corrupt.png"), bytes(corrupt))
  _write(os.path.join(root, "text.jpg"), b"this is text, not a JPEG")
  _write(os.path.join(root, "text_named.png"), b"this is text, not a PNG")  # wrong extension
  # 200M pixels: PIL refuses it as a decompression bomb (limit 2 * 89.5M), so it is skipped.
  Image.new("1", (20000, 10000)).save(os.path.join(root, "bomb.png"))
  os.symlink(os.path.join(root, "deleted.png"), os.path.join(root, "dangling_link.png"))
  return {"zero.png", "truncated.jpg", "truncated.png", "corrupt.png", "text.jpg",
          "text_named.png", "bomb.png", "dangling_link.png"}


def make_bad_folder(root: str) -> tuple[set[str], set[str]]:
  """A folder of odd-but-valid images and undecodable files; returns (valid names, bad names).

  A text file with a non-image extension (notes.txt) is there too and must not be listed.
  """
  valid = _save_valid(root)
  bad = _save_bad(root)
  with open(os.path.join(root, "notes.txt"), "w") as f:
    f.write("not an image and not an image extension")
  return valid, bad
