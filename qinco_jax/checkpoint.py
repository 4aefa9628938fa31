"""Saving and loading a codec as an Orbax checkpoint directory.

Layout of a saved codec directory:
  qinco_jax.json   format marker, data dimension, QincoConfig fields, free-form extras,
                   and a checksum of every array (verified on load)
  state/           Orbax (StandardCheckpointer) tree of every array: parameters,
                   data_mean/data_std, running target statistics

Saving never loses what was there: the directory is written complete under a
temporary sibling name (`.NAME.tmp-*`), then swapped in by two renames (the old copy
is parked as `.NAME.old-*` in between). A crash between the renames leaves complete
copies beside the path, and `load` restores the newest that verifies (saying so).
A save only ever replaces what a save wrote: a qinco-jax codec directory (or an empty
one) holding nothing else. Any other directory, or a codec directory into which
something else was put, is an error and is left untouched. The next save at a path
removes the temporary directories that interrupted saves left there.

Saves at one path are serialised (an exclusive lock on the parent directory, across
threads and processes of this machine): a second save waits for the first, then
replaces its result. Within a process, Orbax writes also take turns (at any paths).
A path that is a symbolic link is saved through: the link stays, its target is
replaced. A save into the current directory (or one above it) leaves the process in
the new directory.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import threading
import uuid
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

FORMAT = "qinco-jax/codec"
VERSION = 1
META_FILE = "qinco_jax.json"
STATE_DIR = "state"


def _local_options():
  """Orbax options for a save or restore done by this process alone.

  In a multi-process run Orbax's default is a collective save (every process calls it
  and they meet at barriers). qinco-jax writes host-local arrays from one process
  (process 0 in training; any process for `Codec.save`), so Orbax is told that this
  process is the only one taking part.
  """
  import orbax.checkpoint as ocp  # imported lazily: slow import, not needed to encode
  me = jax.process_index()
  return ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})


def _ckpt():
  import orbax.checkpoint as ocp
  return ocp.StandardCheckpointer(multiprocessing_options=_local_options())


def checksums(tree) -> dict[str, str]:
  """{array path: blake2b of its dtype, shape and bytes} for every leaf of a tree."""
  out = {}
  for k, v in _flat(tree).items():
    a = np.ascontiguousarray(np.asarray(v))
    h = hashlib.blake2b(f"{a.dtype.str}{a.shape}".encode(), digest_size=16)
    h.update(a.view(np.uint8).reshape(-1).data if a.size else b"")
    out[k] = h.hexdigest()
  return out


def verify_checksums(tree, expected: dict[str, str] | None, where: str):
  """Raises ValueError naming the arrays whose bytes differ from `expected` (the
  checksums saved with them); None (a checkpoint from before checksums) passes."""
  if expected is None:
    return
  got = checksums(tree)
  bad = sorted(k for k in expected if got.get(k) != expected[k])
  if bad or set(got) != set(expected):
    names = bad[:5] or sorted(set(got) ^ set(expected))[:5]
    raise ValueError(f"{where} is corrupt: the stored arrays {names} "
                     "do not match the checksums saved with them (a damaged or "
                     "partly overwritten file); restore it from a copy")


def _siblings(path: Path, kind: str) -> list[Path]:
  """Leftovers of earlier saves at `path`: `.NAME.tmp-*` or `.NAME.old-*`."""
  if not path.parent.is_dir():
    return []
  return sorted(path.parent.glob(f".{path.name}.{kind}-*"))


def _is_codec_dir(path: Path) -> bool:
  try:
    return json.loads((path / META_FILE).read_text()).get("format") == FORMAT
  except (OSError, ValueError, AttributeError):
    return False


def resolve(path: str | os.PathLike) -> Path:
  """The absolute path a save at `path` writes: a symbolic link's target (followed to
  the end), so that the link stays a link and the temporaries sit beside the target
  (on its file system)."""
  path = Path(path).absolute()
  return Path(os.path.realpath(path)) if path.is_symlink() else path


_locks = threading.local()  # {parent directory: depth} held by this thread
# Orbax writes of one process, one at a time: two at once from threads fail (its
# tensorstore writes interfere, even at different paths; an index save writes its
# codec outside the path lock), reads do not.
_WRITE_LOCK = threading.Lock()


@contextlib.contextmanager
def save_lock(path: str | os.PathLike) -> Iterator[None]:
  """Holds the lock of the saves at `path` (an exclusive `flock` on its parent
  directory): threads and processes of this machine that save there wait for each
  other. Re-entrant within a thread. Where the file system has no such locks, nothing
  is locked."""
  parent = str(resolve(path).parent)
  depth = getattr(_locks, "held", None)
  if depth is None:
    depth = _locks.held = {}
  if depth.get(parent):
    depth[parent] += 1
    try:
      yield
    finally:
      depth[parent] -= 1
    return
  fd = None
  try:
    import fcntl
    fd = os.open(parent, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
  except (ImportError, OSError):
    if fd is not None:
      os.close(fd)
    fd = None  # no lock where the file system has none (best effort)
  depth[parent] = 1
  try:
    yield
  finally:
    depth[parent] = 0
    if fd is not None:
      os.close(fd)  # releases the flock


def foreign_entries(path: Path, ours: set[str] | frozenset[str]) -> list[str]:
  """The names in directory `path` that are not among `ours` (what a save writes)."""
  try:
    return sorted(set(os.listdir(path)) - set(ours))
  except (FileNotFoundError, NotADirectoryError):
    return []


def _refuse_foreign(path: Path, foreign: list[str], what: str = ""):
  shown = ", ".join(map(repr, foreign[:5])) + (" ..." if len(foreign) > 5 else "")
  raise ValueError(
      f"cannot save {what}to {str(path)!r}: it holds {shown}, which no save wrote, and a "
      "save replaces the whole directory. Move that out of the directory (or save to "
      "another path); nothing was changed.")


def atomic_replace_dir(tmp: Path, path: Path, also_ours: frozenset[str] = frozenset()):
  """Moves directory tmp to path, replacing path if it exists, never losing both.

  An existing `path` may hold only names that `tmp` holds (what this save wrote, or
  `also_ours`): anything else is a ValueError and nothing is moved. A symbolic link at
  `path` stays, its target is replaced. When this process's current directory is
  `path` (or inside it), it follows the new directory.
  """
  tmp = Path(tmp).absolute()
  path = resolve(path)
  with save_lock(path):
    foreign = foreign_entries(path, set(os.listdir(tmp)) | set(also_ours))
    if foreign:
      _refuse_foreign(path, foreign)
    if tmp.parent != path.parent:  # a link's target: swap beside it (same file system)
      near = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
      try:
        os.replace(tmp, near)
      except OSError:  # another file system: copy
        shutil.copytree(tmp, near, symlinks=True)
        shutil.rmtree(tmp, ignore_errors=True)
      tmp = near
    try:
      cwd = os.getcwd()
    except OSError:
      cwd = None
    inside = cwd is not None and os.path.commonpath([cwd, str(path)]) == str(path)
    old = None
    if path.exists():
      old = path.with_name(f".{path.name}.old-{uuid.uuid4().hex[:8]}")
      os.replace(path, old)
    try:
      os.replace(tmp, path)
    except BaseException:
      if old is not None:
        os.replace(old, path)
      raise
    finally:
      if inside and cwd is not None:  # follow the new directory (the old goes away)
        target = path / os.path.relpath(cwd, path)
        os.chdir(target if target.is_dir() else path)
    if old is not None:
      shutil.rmtree(old, ignore_errors=True)


_CODEC_NAMES = frozenset({META_FILE, STATE_DIR})  # what a codec save writes


def save_state(path: str | os.PathLike, state: nnx.State, meta: dict[str, Any]):
  """Writes meta (JSON-able) and every array of state to directory `path` atomically.

  Raises ValueError, touching nothing, when `path` is a file, a non-empty directory
  that is not a qinco-jax codec checkpoint, or a codec checkpoint holding anything a
  save did not write (a save never deletes a user's files).
  """
  path = resolve(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  with save_lock(path):
    _check_codec_target(path)
    if not path.exists():
      recover(path)  # a complete copy parked by an interrupted save is the old state
      _check_codec_target(path)
    for leftover in _siblings(path, "tmp") + _siblings(path, "old"):
      shutil.rmtree(leftover, ignore_errors=True)  # interrupted saves' temporaries
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
      tmp.mkdir()
      # Host (NumPy) arrays: the checkpoint names no device, so any process can load it.
      arrays = jax.tree.map(np.asarray, nnx.to_pure_dict(state))
      with _WRITE_LOCK:
        ck = _ckpt()
        try:
          ck.save(tmp / STATE_DIR, arrays)
          ck.wait_until_finished()
        finally:
          ck.close()
      with open(tmp / META_FILE, "w") as f:
        json.dump({"format": FORMAT, "version": VERSION, **meta,
                   "checksums": checksums(arrays)}, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
      atomic_replace_dir(tmp, path)
    finally:
      if tmp.exists():
        shutil.rmtree(tmp, ignore_errors=True)


def _check_codec_target(path: Path):
  """Raises ValueError when a codec save may not replace what is at `path`."""
  if path.exists() and not path.is_dir():
    raise ValueError(f"cannot save codec to {str(path)!r}: it exists and is not a directory")
  if path.is_dir() and any(path.iterdir()):
    if not _is_codec_dir(path):
      raise ValueError(
          f"cannot save codec to {str(path)!r}: it is a directory that is not a qinco-jax "
          f"codec checkpoint (no {META_FILE} of format {FORMAT!r}), and a save would "
          "replace everything in it. Choose another path (e.g. a sub-directory).")
    foreign = foreign_entries(path, _CODEC_NAMES)
    if foreign:
      _refuse_foreign(path, foreign, "codec ")


def recover(path: str | os.PathLike, check: Callable[[Path], Any] | None = None,
            meta_file: str = META_FILE) -> bool:
  """When nothing is at `path` but an interrupted save left complete copies beside it
  (`.NAME.tmp-*` written in full, or `.NAME.old-*` parked), moves the newest one
  that passes `check` back to `path` and says so. Returns True if it restored one.

  check(copy) raises ValueError or OSError for a copy that is not complete (default:
  a codec whose arrays verify); the copies are those holding `meta_file`, newest by
  its time. Saves at `path` wait meanwhile (the save lock)."""
  path = resolve(path)
  if path.exists() or not path.parent.is_dir():
    return False
  with save_lock(path):  # not while a save is between its renames
    if path.exists():
      return False
    found = [((cand / meta_file).stat().st_mtime, cand)
             for cand in _siblings(path, "tmp") + _siblings(path, "old")
             if (cand / meta_file).is_file()]
    for _, cand in sorted(found, reverse=True):
      try:
        (check or _check_codec_copy)(cand)
      except (ValueError, OSError):
        continue
      os.replace(cand, path)
      warnings.warn(f"{str(path)!r} was missing after an interrupted save; restored the "
                    f"complete copy {cand.name!r}", stacklevel=2)
      return True
  return False


def _check_codec_copy(cand: Path):
  if not _is_codec_dir(cand):
    raise ValueError(f"{str(cand)!r} is not a codec")
  _check_arrays(cand, read_meta(cand, _recover=False))


def _check_arrays(path: Path, meta: dict[str, Any]):
  ck = _ckpt()
  try:
    stored = _stored_tree(ck, path)
    try:
      arrays = ck.restore(path / STATE_DIR, jax.tree.map(
          lambda m: np.empty(m.shape, m.dtype), stored))
    except Exception as e:
      raise ValueError(f"cannot read the arrays of {str(path)!r}: {e}") from e
  finally:
    ck.close()
  verify_checksums(arrays, meta.get("checksums"), f"checkpoint {str(path)!r}")


def _stored_tree(ck, path: Path) -> Any:
  """{key: ArrayMetadata(shape, dtype)} of the arrays saved in `path`/state, or a
  ValueError naming the checkpoint when Orbax's index of them cannot be read."""
  damaged = (f"checkpoint {str(path)!r} is damaged: the index of its arrays "
             f"({STATE_DIR}/_METADATA, {STATE_DIR}/manifest.ocdbt) cannot be read")
  try:
    meta = ck.metadata(path / STATE_DIR).item_metadata
  except Exception as e:  # orbax raises many types for missing/corrupt files
    raise ValueError(f"{damaged} ({type(e).__name__}: {str(e)[:200]}); restore it from "
                     "a copy") from e
  stored = getattr(meta, "tree", meta)
  if not isinstance(stored, dict) or not stored:  # Orbax logs the failure, returns None
    raise ValueError(f"{damaged}; restore it from a copy")
  return stored


def read_meta(path: str | os.PathLike, _recover: bool = True) -> dict[str, Any]:
  """Reads and checks the metadata of a saved codec directory (restoring it first from
  a complete copy an interrupted save left, see `recover`)."""
  path = Path(path)
  if not path.exists() and _recover:
    recover(path)
  if not path.exists():
    raise FileNotFoundError(f"no codec checkpoint at {str(path)!r}")
  if not path.is_dir():
    raise ValueError(f"{str(path)!r} is not a codec checkpoint directory (it is a file)")
  meta_path = path / META_FILE
  if not meta_path.exists():
    raise ValueError(
        f"{str(path)!r} is not a qinco-jax codec checkpoint: {META_FILE} is missing")
  try:
    meta = json.loads(meta_path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"{str(meta_path)!r} is not valid JSON: {e}") from None
  if not isinstance(meta, dict):
    raise ValueError(f"{str(meta_path)!r} must hold a JSON object (the codec's metadata), "
                     f"got a {type(meta).__name__}")
  if meta.get("format") != FORMAT:
    raise ValueError(f"{str(path)!r} holds format {meta.get('format')!r}, expected "
                     f"{FORMAT!r}")
  if meta.get("version", 0) > VERSION:
    raise ValueError(f"{str(path)!r} was written by a newer qinco-jax (checkpoint "
                     f"version {meta['version']} > {VERSION}); upgrade qinco-jax")
  return meta


def load_state(path: str | os.PathLike, abstract: nnx.State,
               expected_checksums: dict[str, str] | None = None) -> nnx.State:
  """Restores the arrays saved at `path` into a state shaped like `abstract`.

  Raises ValueError when the saved arrays do not match the expected model (another
  configuration or data dimension) or their checksums (a corrupt file).
  """
  path = Path(path).absolute()  # Orbax wants absolute paths
  target = nnx.to_pure_dict(abstract)
  ck = _ckpt()
  try:
    return _load_state(ck, path, abstract, target, expected_checksums)
  finally:
    ck.close()


def _load_state(ck, path: Path, abstract, target, expected_checksums):
  stored = _stored_tree(ck, path)  # {key: ArrayMetadata(shape, dtype, ...)}
  flat_t = _flat(target)
  flat_s = _flat(stored)
  if set(flat_t) != set(flat_s):
    missing = sorted(set(flat_t) - set(flat_s))[:5]
    extra = sorted(set(flat_s) - set(flat_t))[:5]
    raise ValueError(f"checkpoint {str(path)!r} does not match this model: missing "
                     f"{missing}, unexpected {extra}")
  for k, t in flat_t.items():
    if tuple(t.shape) != tuple(flat_s[k].shape):
      raise ValueError(f"checkpoint {str(path)!r} does not match this model: {k} has "
                       f"shape {tuple(flat_s[k].shape)}, expected {t.shape}")
  try:  # NumPy targets: host arrays, whatever devices the saving process had
    raw = ck.restore(path / STATE_DIR, jax.tree.map(
        lambda m: np.empty(m.shape, m.dtype), stored))
  except Exception as e:
    raise ValueError(f"cannot read the arrays of checkpoint {str(path)!r}: {e}") from e
  verify_checksums(raw, expected_checksums, f"checkpoint {str(path)!r}")
  saved = _flat(raw)
  restored = _unflat(target, {k: jax.numpy.asarray(saved[k], t.dtype)
                              for k, t in flat_t.items()})
  state = abstract
  nnx.replace_by_pure_dict(state, restored)
  return state


def _key(kp) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in kp)


def _flat(tree) -> dict[str, Any]:
  return {_key(kp): v for kp, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _unflat(target, flat: dict[str, Any]):
  paths = jax.tree_util.tree_flatten_with_path(target)[0]
  return jax.tree.unflatten(jax.tree.structure(target), [flat[_key(kp)] for kp, _ in paths])


class TrainCheckpoints:
  """The training state's checkpoints in one directory (Orbax `CheckpointManager`,
  the last `max_to_keep` steps, each atomic), written and read by this process alone.

  Each checkpoint holds `state` (a pytree of host arrays: parameters, optimiser state,
  code usage, step) and `meta` (JSON: epoch, best validation MSE, plans).
  """

  def __init__(self, directory: str | os.PathLike, max_to_keep: int = 2):
    import orbax.checkpoint as ocp
    self.directory = Path(directory).absolute()
    self.directory.mkdir(parents=True, exist_ok=True)
    self._mngr = ocp.CheckpointManager(self.directory, options=ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=False, multiprocessing_options=_local_options()))

  def latest_step(self) -> int | None:
    return self._mngr.latest_step()

  def save(self, step: int, state, meta: dict[str, Any]):
    import orbax.checkpoint as ocp
    meta = {**meta, "checksums": checksums(state)}
    with _WRITE_LOCK:
      self._mngr.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))
      self._mngr.wait_until_finished()

  def restore(self, like, step: int | None = None):
    """(state of host arrays shaped like the tree `like`, meta) of `step` (default:
    the latest)."""
    import orbax.checkpoint as ocp
    step = self._mngr.latest_step() if step is None else step
    where = f"training checkpoint {str(self.directory / str(step))!r}"
    target = jax.tree.map(lambda a: np.empty(np.shape(a), a.dtype), like)
    try:
      r = self._mngr.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
      meta = dict(r.meta)
    except Exception as e:  # a damaged file: Orbax raises many types
      raise ValueError(f"cannot read {where} ({type(e).__name__}: {str(e)[:300]}): the "
                       "checkpoint is damaged; delete that step's directory to resume "
                       "from the one before, or restore it from a copy") from e
    verify_checksums(r.state, meta.pop("checksums", None), where)
    return r.state, meta

  def close(self):
    self._mngr.close()


class WorkdirLock:
  """An exclusive lock on a training workdir: the file `.lock` holding the holder's
  host, pid and start time. A second run on the same workdir is refused while the
  holder lives; a lock left by a process that no longer exists on this host (killed)
  is taken over. `release()` removes it."""

  NAME = ".lock"

  def __init__(self, workdir: str | os.PathLike):
    import socket
    import time
    self.path = Path(workdir) / self.NAME
    me = {"host": socket.gethostname(), "pid": os.getpid(),
          "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    for _ in range(2):
      try:
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
      except FileExistsError:
        holder = self._holder()
        if holder.get("host") == me["host"] and not _alive(holder.get("pid")):
          warnings.warn(f"{str(self.path)!r}: taking over the lock of process "
                        f"{holder.get('pid')}, which no longer runs (killed?)",
                        stacklevel=2)
          self.path.unlink(missing_ok=True)
          continue
        raise RuntimeError(
            f"{str(self.path.parent)!r} is in use by another training (process "
            f"{holder.get('pid')} on host {holder.get('host')!r}, since "
            f"{holder.get('since')}); wait for it, use another workdir, or delete "
            f"{str(self.path)!r} if that run is gone") from None
      with os.fdopen(fd, "w") as f:
        json.dump(me, f)
      self.held = True
      _held_workdir_locks.add(self)
      return
    raise RuntimeError(f"could not take the lock {str(self.path)!r}")

  def _holder(self) -> dict[str, Any]:
    try:
      h = json.loads(self.path.read_text())
      return h if isinstance(h, dict) else {}
    except (OSError, ValueError):
      return {}

  def release(self):
    if getattr(self, "held", False):
      if self._holder().get("pid") == os.getpid():
        self.path.unlink(missing_ok=True)
      self.held = False
      _held_workdir_locks.discard(self)


_held_workdir_locks: set[WorkdirLock] = set()  # held by this process


def release_workdir_locks():
  """Releases every workdir lock this process holds (a process that stops at once,
  on Ctrl-C, leaves no lock behind)."""
  for lock in list(_held_workdir_locks):
    lock.release()


def _alive(pid) -> bool:
  try:
    os.kill(int(pid), 0)
  except (ProcessLookupError, ValueError, TypeError):
    return False
  except PermissionError:
    return True  # exists, owned by someone else
  return True
