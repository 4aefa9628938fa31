"""Packed code bytes: integer code columns of given bit widths <-> uint8 rows.

The layout of `Codec.sa_encode` and of the search's shard files: fields of whole bytes
are little-endian; consecutive 4-bit fields (K = 16 codes) share bytes, two per byte,
low nibble first, and a run of odd length leaves its last high nibble 0 (faiss's
4-bit codes are packed the same way).
"""

from __future__ import annotations

import numpy as np


def packed_size(bits: list[int]) -> int:
  """Bytes per row of `pack_fields` for fields of these widths."""
  return sum(_field_runs(bits)[1])


def _field_runs(bits: list[int]) -> tuple[list[tuple[int, int, int]], list[int]]:
  """The layout of `pack_fields`: per field (byte offset, shift, width in bits), and
  the bytes of each run of fields (a run of 4-bit fields shares bytes)."""
  where, sizes, pos, nib = [], [], 0, 0
  for w in bits:
    if w == 4:
      where.append((pos, 4 * nib, 4))
      nib ^= 1
      if nib == 0:
        pos += 1
        sizes.append(1)
      continue
    if w % 8:
      raise ValueError(f"field widths must be 4 or whole bytes, got {w} bits")
    if nib:  # a run of 4-bit fields ends half way through a byte
      pos, nib = pos + 1, 0
      sizes.append(1)
    where.append((pos, 0, w))
    pos += w // 8
    sizes.append(w // 8)
  if nib:
    sizes.append(1)
  return where, sizes


def pack_fields(codes: np.ndarray, bits: list[int]) -> np.ndarray:
  """(n, len(bits)) non-negative integers -> (n, packed_size(bits)) uint8: fields of
  whole bytes little-endian, consecutive 4-bit fields two per byte (low nibble first;
  an odd run leaves the last high nibble 0)."""
  c = np.asarray(codes).astype(np.int64)
  where, _ = _field_runs(bits)
  out = np.zeros((len(c), packed_size(bits)), np.uint8)
  for j, (pos, shift, w) in enumerate(where):
    if w == 4:
      out[:, pos] |= ((c[:, j] & 0xF) << shift).astype(np.uint8)
    else:
      nb = w // 8
      out[:, pos:pos + nb] = ((c[:, j:j + 1] >> (8 * np.arange(nb))) & 0xFF).astype(np.uint8)
  return out


def unpack_fields(b: np.ndarray, bits: list[int]) -> np.ndarray:
  """Inverse of `pack_fields`: (n, packed_size(bits)) uint8 -> (n, len(bits)) int64."""
  b = np.asarray(b)
  where, _ = _field_runs(bits)
  out = np.empty((len(b), len(bits)), np.int64)
  for j, (pos, shift, w) in enumerate(where):
    if w == 4:
      out[:, j] = (b[:, pos] >> shift) & 0xF
    else:
      nb = w // 8
      out[:, j] = (b[:, pos:pos + nb].astype(np.int64) << (8 * np.arange(nb))).sum(1)
  return out


__all__ = ["packed_size", "pack_fields", "unpack_fields"]
