"""Saving and loading a codec as an Orbax checkpoint directory.

Layout of a saved codec directory:
  qinco_jax.json   format marker, data dimension, QincoConfig fields, free-form extras
  state/           Orbax (StandardCheckpointer) tree of every array: parameters,
                   data_mean/data_std, running target statistics

Saving is atomic: the directory is written under a temporary sibling name and only
then swapped into place, so a failed or interrupted save never damages what was
there before.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
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


def atomic_replace_dir(tmp: Path, path: Path):
  """Moves directory tmp to path, replacing path if it exists, never losing both."""
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
  if old is not None:
    shutil.rmtree(old, ignore_errors=True)


def save_state(path: str | os.PathLike, state: nnx.State, meta: dict[str, Any]):
  """Writes meta (JSON-able) and every array of state to directory `path` atomically."""
  path = Path(path).absolute()
  if path.exists() and not path.is_dir():
    raise ValueError(f"cannot save codec to {str(path)!r}: it exists and is not a directory")
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
  try:
    tmp.mkdir()
    ck = _ckpt()
    # Host (NumPy) arrays: the checkpoint names no device, so any process can load it.
    ck.save(tmp / STATE_DIR, jax.tree.map(np.asarray, nnx.to_pure_dict(state)))
    ck.wait_until_finished()
    with open(tmp / META_FILE, "w") as f:
      json.dump({"format": FORMAT, "version": VERSION, **meta}, f, indent=2)
    atomic_replace_dir(tmp, path)
  finally:
    if tmp.exists():
      shutil.rmtree(tmp, ignore_errors=True)


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
  """Reads and checks the metadata of a saved codec directory."""
  path = Path(path)
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
  except json.JSONDecodeError as e:
    raise ValueError(f"{str(meta_path)!r} is not valid JSON: {e}") from None
  if meta.get("format") != FORMAT:
    raise ValueError(f"{str(path)!r} holds format {meta.get('format')!r}, expected "
                     f"{FORMAT!r}")
  if meta.get("version", 0) > VERSION:
    raise ValueError(f"{str(path)!r} was written by a newer qinco-jax (checkpoint "
                     f"version {meta['version']} > {VERSION}); upgrade qinco-jax")
  return meta


def load_state(path: str | os.PathLike, abstract: nnx.State) -> nnx.State:
  """Restores the arrays saved at `path` into a state shaped like `abstract`.

  Raises ValueError when the saved arrays do not match the expected model (another
  configuration or data dimension).
  """
  path = Path(path).absolute()  # Orbax wants absolute paths
  target = nnx.to_pure_dict(abstract)
  ck = _ckpt()
  try:
    meta = ck.metadata(path / STATE_DIR).item_metadata
  except Exception as e:  # orbax raises many types for missing/corrupt files
    raise ValueError(f"cannot read the arrays of checkpoint {str(path)!r}: {e}") from e
  stored = getattr(meta, "tree", meta)  # {key: ArrayMetadata(shape, dtype, ...)}
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
    saved = _flat(ck.restore(path / STATE_DIR, jax.tree.map(
        lambda m: np.empty(m.shape, m.dtype), stored)))
  except Exception as e:
    raise ValueError(f"cannot read the arrays of checkpoint {str(path)!r}: {e}") from e
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
    self._mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))
    self._mngr.wait_until_finished()

  def restore(self, like, step: int | None = None):
    """(state of host arrays shaped like the tree `like`, meta) of `step` (default:
    the latest)."""
    import orbax.checkpoint as ocp
    step = self._mngr.latest_step() if step is None else step
    target = jax.tree.map(lambda a: np.empty(np.shape(a), a.dtype), like)
    r = self._mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
    return r.state, r.meta

  def close(self):
    self._mngr.close()
