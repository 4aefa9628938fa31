"""The on-disk inverted lists: one file in faiss's own layout, written and merged with
bounded memory, and memory-mapped for search.

The layout is faiss's serialised `ArrayInvertedLists` (`faiss.write_InvertedLists`,
the "full" form), little-endian:

    "ilar"  nlist (u64)  code_size (u64)  "full"  nlist (u64)  sizes (nlist x u64)
    then for each list l with sizes[l] > 0: its codes (sizes[l] x code_size bytes),
    then its ids (sizes[l] x i64)

so `faiss.read_InvertedLists(FileIOReader(path), IO_FLAG_MMAP)` opens it as a
read-only `OnDiskInvertedLists` over the file itself (no copy, offsets computed in
C++: opening costs O(nlist), not O(rows)), and the codes and ids of any (list,
offset) pair are found by arithmetic on the sizes (`ListFile.rows_at`).

Files are written list by list in blocks of at most BLOCK_ROWS rows (`write_lists`
from rows in memory, `merge_lists` from other list files: faiss's billion-scale
recipe of one small index per shard merged into one on-disk index, with a
sequential read of each input and a sequential write of the output; `filter_lists`
from one list file without some ids: the offline compaction), so the memory a write
needs is O(BLOCK_ROWS + nlist), never O(rows).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

BLOCK_ROWS = 1 << 19  # rows assembled in memory at a time by the writers
_HEAD = 32  # bytes before the sizes: "ilar", nlist, code_size, "full", len(sizes)


def header(nlist: int, code_size: int, sizes: np.ndarray) -> bytes:
  """The bytes before the lists' data (see the module docstring)."""
  return (b"ilar" + np.array([nlist, code_size], "<u8").tobytes() + b"full"
          + np.array([nlist], "<u8").tobytes() + np.asarray(sizes, "<u8").tobytes())


def layout(sizes: np.ndarray, code_size: int):
  """Where each row of consecutive lists lies, relative to the first list's start.

  Args:
    sizes: (L,) rows per list.
  Returns:
    code_pos (n,), id_pos (n,) int64 byte offsets of each row's code and id (rows in
    list order), and the (L + 1,) byte offsets of the lists' blocks.
  """
  sizes = np.asarray(sizes, np.int64)
  starts = np.concatenate([[0], np.cumsum(sizes * (code_size + 8))])
  first = np.concatenate([[0], np.cumsum(sizes)])[:-1]
  n = int(sizes.sum())
  lst = np.repeat(np.arange(len(sizes)), sizes)
  rank = np.arange(n, dtype=np.int64) - first[lst]
  code_pos = starts[lst] + rank * code_size
  id_pos = starts[lst] + sizes[lst] * code_size + rank * 8
  return code_pos, id_pos, starts


def _gather(buf: np.ndarray, pos: np.ndarray, width: int) -> np.ndarray:
  return buf[pos[:, None] + np.arange(width)]


def block_bytes(sizes: np.ndarray, codes: np.ndarray, ids: np.ndarray) -> np.ndarray:
  """The file bytes of consecutive lists holding `sizes` rows each, from their rows
  in list order: codes (n, code_size) uint8, ids (n,) int64."""
  code_size = codes.shape[1]
  code_pos, id_pos, starts = layout(sizes, code_size)
  out = np.empty(int(starts[-1]), np.uint8)
  if len(ids):
    out[code_pos[:, None] + np.arange(code_size)] = codes
    out[id_pos[:, None] + np.arange(8)] = np.ascontiguousarray(ids, "<i8").view(
        np.uint8).reshape(-1, 8)
  return out


def parse_block(buf: np.ndarray, sizes: np.ndarray, code_size: int):
  """Inverse of `block_bytes`: (codes (n, code_size) uint8, ids (n,) int64)."""
  code_pos, id_pos, _ = layout(sizes, code_size)
  codes = _gather(buf, code_pos, code_size)
  ids = np.ascontiguousarray(_gather(buf, id_pos, 8)).view("<i8").reshape(-1)
  return codes, ids.astype(np.int64)


def _blocks(sizes: np.ndarray, block_rows: int) -> list[tuple[int, int]]:
  """Consecutive list ranges [a, b) of at most block_rows rows (or one list)."""
  ends = np.cumsum(np.asarray(sizes, np.int64))
  out, a = [], 0
  while a < len(sizes):
    base = ends[a - 1] if a else 0
    b = int(np.searchsorted(ends, base + block_rows, side="right"))
    b = max(b, a + 1)
    out.append((a, b))
    a = b
  return out


def _tmp(path: Path) -> Path:
  return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def _commit(tmp: Path, path: Path, nlist: int, code_size: int, sizes: np.ndarray):
  """Moves a written temporary list file into place once its size is the one its
  header's list sizes imply (a writer bug, never a silent short file)."""
  want = _HEAD + 8 * nlist + int(np.asarray(sizes, np.int64).sum()) * (code_size + 8)
  if os.path.getsize(tmp) != want:
    raise RuntimeError(f"list file {str(path)!r}: wrote {os.path.getsize(tmp)} bytes, "
                       f"expected {want}")
  os.replace(tmp, path)


def write_blocks(path: str | os.PathLike, nlist: int, code_size: int, sizes: np.ndarray,
                 blocks: Iterable[np.ndarray], on_rows: Callable[[int], None] | None = None):
  """Writes a list file (atomically: a temporary sibling, then renamed) from the data
  bytes of consecutive blocks of lists, in order (`block_bytes`)."""
  path = Path(path)
  tmp = _tmp(path)
  try:
    with open(tmp, "wb") as f:
      f.write(header(nlist, code_size, sizes))
      for b in blocks:
        f.write(b.tobytes())
        if on_rows is not None:
          on_rows(len(b) // (code_size + 8))
      f.flush()
      os.fsync(f.fileno())
    _commit(tmp, path, nlist, code_size, sizes)
  finally:
    if tmp.exists():
      tmp.unlink()


def write_lists(path: str | os.PathLike, nlist: int, lists: np.ndarray, codes: np.ndarray,
                ids: np.ndarray, block_rows: int | None = None,
                on_rows: Callable[[int], None] | None = None) -> np.ndarray:
  """Writes rows held in memory (any order; stable within a list) as a list file.

  Args:
    lists: (n,) list of each row. codes: (n, code_size) uint8. ids: (n,) int64.
  Returns:
    (nlist,) int64 sizes.
  """
  block_rows = block_rows or BLOCK_ROWS
  order = np.argsort(lists, kind="stable")
  sizes = np.bincount(lists, minlength=nlist).astype(np.int64)
  first = np.concatenate([[0], np.cumsum(sizes)])

  def blocks():
    for a, b in _blocks(sizes, block_rows):
      rows = order[first[a]:first[b]]
      yield block_bytes(sizes[a:b], codes[rows], ids[rows])

  write_blocks(path, nlist, codes.shape[1], sizes, blocks(), on_rows)
  return sizes


class ListFile:
  """A list file opened for reading: its sizes, and the rows at (list, offset) pairs
  read from a read-only memory map (the pages the queries touch stay in the page
  cache, shared with faiss's map of the same file)."""

  def __init__(self, path: str | os.PathLike, nlist: int | None = None,
               code_size: int | None = None):
    self.path = Path(path)
    where = f"inverted lists {str(self.path)!r}"
    if not self.path.is_file():
      raise FileNotFoundError(f"{where}: no such file")
    size = self.path.stat().st_size
    head = self.path.read_bytes()[:_HEAD] if size < _HEAD else _read(self.path, 0, _HEAD)
    if len(head) < _HEAD or head[:4] != b"ilar" or head[20:24] != b"full":
      raise ValueError(f"{where} is not a faiss inverted-lists file (its first bytes are "
                       f"{head[:24]!r})")
    self.nlist, self.code_size, n_sizes = (int(v) for v in np.frombuffer(
        head[4:20] + head[24:32], "<u8"))
    if n_sizes != self.nlist or (nlist is not None and self.nlist != nlist) or (
        code_size is not None and self.code_size != code_size):
      raise ValueError(f"{where} holds {self.nlist} lists of {self.code_size}-byte codes, "
                       f"expected {nlist} lists of {code_size}-byte codes")
    if size < _HEAD + 8 * self.nlist:
      raise ValueError(f"{where} is truncated ({size} bytes)")
    self.sizes = np.fromfile(self.path, "<u8", count=self.nlist, offset=_HEAD).astype(
        np.int64)
    self.data_start = _HEAD + 8 * self.nlist
    self.starts = self.data_start + np.concatenate(
        [[0], np.cumsum(self.sizes * (self.code_size + 8))])
    if int(self.starts[-1]) != size:
      raise ValueError(f"{where} has {size} bytes where its list sizes need "
                       f"{int(self.starts[-1])}: it is truncated or damaged")
    self.ntotal = int(self.sizes.sum())
    self.raw = np.memmap(self.path, np.uint8, mode="r") if size else np.zeros(0, np.uint8)

  def rows_at(self, lists: np.ndarray, offsets: np.ndarray):
    """Codes (n, code_size) uint8 and ids (n,) int64 of the rows at (list, offset)."""
    lists = np.asarray(lists, np.int64)
    offsets = np.asarray(offsets, np.int64)
    base = self.starts[lists]
    codes = _gather(self.raw, base + offsets * self.code_size, self.code_size)
    id_pos = base + self.sizes[lists] * self.code_size + offsets * 8
    ids = np.ascontiguousarray(_gather(self.raw, id_pos, 8)).view("<i8").reshape(-1)
    return codes, ids.astype(np.int64)

  def read_lists(self, a: int, b: int):
    """Codes and ids of every row of lists [a, b), in list order (one sequential read)."""
    buf = np.frombuffer(_read(self.path, int(self.starts[a]),
                              int(self.starts[b] - self.starts[a])), np.uint8)
    return parse_block(buf, self.sizes[a:b], self.code_size)

  def faiss_lists(self):
    """The file as faiss's read-only `OnDiskInvertedLists` (memory-mapped)."""
    import faiss
    reader = faiss.FileIOReader(str(self.path))
    il = faiss.read_InvertedLists(reader, faiss.IO_FLAG_MMAP)
    del reader  # closes the file; the map stays
    return il


def head_size(path: str | os.PathLike) -> int:
  """Bytes of a list file's header and list sizes (by its nlist field only)."""
  nlist = np.frombuffer(_read(Path(path), 4, 8).ljust(8, b"\0"), "<u8")[0]
  return int(_HEAD + 8 * min(int(nlist), 1 << 40))


def _read(path: Path, offset: int, n: int) -> bytes:
  with open(path, "rb") as f:
    f.seek(offset)
    return f.read(n)


def merge_lists(path: str | os.PathLike, inputs: list[str | os.PathLike],
                block_rows: int | None = None,
                on_rows: Callable[[int], None] | None = None) -> np.ndarray:
  """Writes one list file holding the rows of several (same nlist and code size), each
  list's rows in input order: one sequential pass over each input, O(block_rows +
  nlist * len(inputs)) memory. Returns the (nlist,) sizes."""
  files = [ListFile(p) for p in inputs]
  nlist, code_size = files[0].nlist, files[0].code_size
  for f in files[1:]:
    if (f.nlist, f.code_size) != (nlist, code_size):
      raise ValueError(f"cannot merge {str(f.path)!r} ({f.nlist} lists of "
                       f"{f.code_size}-byte codes) with {str(files[0].path)!r} ({nlist} "
                       f"lists of {code_size}-byte codes)")
  sizes = np.sum([f.sizes for f in files], axis=0).astype(np.int64)
  block_rows = block_rows or BLOCK_ROWS

  def blocks():
    for a, b in _blocks(sizes, block_rows):
      parts = [f.read_lists(a, b) for f in files]
      lst = np.concatenate([np.repeat(np.arange(a, b), f.sizes[a:b]) for f in files])
      order = np.argsort(lst, kind="stable")  # within a list: input order
      codes = np.concatenate([p[0] for p in parts])[order]
      ids = np.concatenate([p[1] for p in parts])[order]
      yield block_bytes(sizes[a:b], codes, ids)

  write_blocks(path, nlist, code_size, sizes, blocks(), on_rows)
  return sizes


def filter_lists(path: str | os.PathLike, src: str | os.PathLike, drop_ids: np.ndarray,
                 block_rows: int | None = None,
                 on_rows: Callable[[int], None] | None = None) -> np.ndarray:
  """Writes list file `src` without the rows whose ids are in drop_ids ((n,) int64), to
  `path` (atomically; `path` may be `src`): one sequential pass, O(block_rows + nlist +
  n) memory, the list sizes written last. Returns the (nlist,) sizes kept."""
  f = ListFile(src)
  drop = np.unique(np.asarray(drop_ids, np.int64))
  sizes = np.zeros(f.nlist, np.int64)
  path = Path(path)
  tmp = _tmp(path)
  try:
    with open(tmp, "wb") as out:
      out.write(header(f.nlist, f.code_size, f.sizes))  # the sizes: rewritten below
      for a, b in _blocks(f.sizes, block_rows or BLOCK_ROWS):
        codes, ids = f.read_lists(a, b)
        # drop is sorted and unique: a binary search per id, not a sort of drop per
        # block (np.isin)
        at = np.minimum(np.searchsorted(drop, ids), max(len(drop) - 1, 0))
        keep = drop[at] != ids if len(drop) else np.ones(len(ids), bool)
        lst = np.repeat(np.arange(a, b), f.sizes[a:b])[keep]
        sizes[a:b] = np.bincount(lst - a, minlength=b - a)
        out.write(block_bytes(sizes[a:b], codes[keep], ids[keep]).tobytes())
        if on_rows is not None:
          on_rows(len(ids))
      out.seek(0)
      out.write(header(f.nlist, f.code_size, sizes))
      out.flush()
      os.fsync(out.fileno())
    _commit(tmp, path, f.nlist, f.code_size, sizes)
  finally:
    if tmp.exists():
      tmp.unlink()
  return sizes
