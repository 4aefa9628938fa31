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


def _ckpt():
  import orbax.checkpoint as ocp  # imported lazily: slow import, not needed to encode
  return ocp.StandardCheckpointer()


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
    ck.save(tmp / STATE_DIR, nnx.to_pure_dict(state))
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
  try:
    saved = _ckpt().restore(path / STATE_DIR)
  except Exception as e:  # orbax raises many types for missing/corrupt files
    raise ValueError(f"cannot read the arrays of checkpoint {str(path)!r}: {e}") from e
  flat_t = _flat(target)
  flat_s = _flat(saved)
  if set(flat_t) != set(flat_s):
    missing = sorted(set(flat_t) - set(flat_s))[:5]
    extra = sorted(set(flat_s) - set(flat_t))[:5]
    raise ValueError(f"checkpoint {str(path)!r} does not match this model: missing "
                     f"{missing}, unexpected {extra}")
  for k, t in flat_t.items():
    if tuple(t.shape) != tuple(np.shape(flat_s[k])):
      raise ValueError(f"checkpoint {str(path)!r} does not match this model: {k} has "
                       f"shape {np.shape(flat_s[k])}, expected {t.shape}")
  restored = _unflat(target, {k: jax.numpy.asarray(flat_s[k], t.dtype)
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
