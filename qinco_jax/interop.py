"""Interoperability: reference PyTorch checkpoints, faiss `QINCo`, and plain `.npz` files.

Reference checkpoints (spec section 15)
---------------------------------------
`from_torch(path)` / `from_state_dict(sd, parameters)` build a `Codec` from the
published PyTorch layout; `to_torch_state_dict(codec)` / `to_torch_checkpoint(codec)`
write it back. The state dict keys of a model with M_tot steps (M, plus one IVF step
when `ivf_in_use`), E = de (or D) and H = dh are (PyTorch `Linear` weights are
(out_features, in_features); an optional `module.` prefix is accepted on import)::

  data_mean                                 (D,)    raw units
  data_std                                  ()      raw units, one scalar
  steps.0.codebook.weight                   (K, D)  plain step 0 (no IVF)
  steps.0.ivf_centroids.weight              (K_IVF, D)  IVF step 0 (IVF only)
  steps.{i}.codebook.weight                 (K, D)       i = 1..M_tot-1
  steps.{i}.substep.codebook.weight         (K, D)       pre-selection, only A > 0
  steps.{i}.concat.mlp.weight               (E, E + D)   input order [embedding ; x_hat]
  steps.{i}.concat.mlp.bias                 (E,)
  steps.{i}.residual_blocks.{l}.up_proj.weight    (H, E)  l = 0..L-1
  steps.{i}.residual_blocks.{l}.down_proj.weight  (E, H)
  steps.{i}.in_proj.weight                  (E, D)  only when E != D
  steps.{i}.out_proj.weight                 (D, E)  only when E != D
  steps.{i}.xtarget_mean, steps.{i}.xtarget_var   (D,)  i = 0..M_tot-1; "var" is a std

Our own state (`nnx.to_pure_dict(codec.state)`) holds the same numbers with the
network steps stacked on a leading axis of size S = M_tot - 1 and Flax kernels stored
(in, out): `codebook0 (K, D)`, `codebooks (S, K, D)`, `pre_codebooks (S, K, D)`,
`steps/concat/kernel (S, E + D, E)`, `steps/blocks/{l}/up_proj/kernel (S, E, H)`, ...,
`xtarget_mean (M_tot, D)`, `xtarget_std (M_tot, D)`.

faiss
-----
`to_faiss_qinco(codec)` returns a `faiss.QINCo` (faiss's CPU implementation of the
QINCo1 architecture, greedy encoding) for a codec built with `qinco1_mode=True` and
de = None; `to_faiss_index(codec)` wraps it in a `faiss.IndexQINCo` for add/search.
`faiss_encode` / `faiss_decode` convert between NumPy arrays and faiss tensors.

NumPy archives
--------------
`export_npz(codec, path)` / `load_npz(path)`: see `export_npz` for the key layout,
readable with nothing but NumPy.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import zipfile
from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np
from flax import nnx

from qinco_jax import data
from qinco_jax.codec import Codec, check_state_values
from qinco_jax.config import QincoConfig
from qinco_jax.model import Qinco

NPZ_FORMAT = "qinco-jax-npz/1"

_TORCH_HINT = ("PyTorch is needed for this: pip install 'qinco-jax[torch]' "
               "(or pip install torch)")
_FAISS_HINT = "faiss is needed for this: pip install faiss-cpu"


# --------------------------------------------------------------------- helpers
def _n_ivf(cfg: QincoConfig) -> int:
  return 1 if getattr(cfg, "ivf_K", 0) else 0


def _to_numpy(value: Any, key: str) -> np.ndarray:
  """A float32 NumPy copy of an array-like (NumPy, JAX, or a torch tensor, duck-typed)."""
  if hasattr(value, "detach"):  # torch.Tensor, without importing torch
    value = value.detach().cpu()
    if hasattr(value, "float"):
      value = value.float()  # bfloat16/float16 tensors have no NumPy equivalent
  try:
    a = np.asarray(value)
  except Exception as e:  # noqa: BLE001 - report which entry could not be read
    raise ValueError(f"state dict entry {key!r} is not array-like: {e}") from None
  if a.dtype.kind not in "fiu":
    raise ValueError(f"state dict entry {key!r}: expected a real numeric array, got "
                     f"dtype {a.dtype}")
  return np.array(a, dtype=np.float32)


def _fresh_pure(cfg: QincoConfig, d: int) -> dict:
  """The pure-dict state of a freshly initialised model, as writable NumPy arrays."""
  model = Qinco(cfg, d, rngs=nnx.Rngs(0))
  return _np_tree(nnx.to_pure_dict(nnx.state(model)))


def _np_tree(tree):
  if isinstance(tree, Mapping):
    return {k: _np_tree(v) for k, v in tree.items()}
  return np.array(tree)


def _get(tree: dict, path: tuple):
  for p in path:
    tree = tree[p]
  return tree


def _flatten(tree: Mapping, prefix: tuple = ()) -> dict[tuple, np.ndarray]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(_flatten(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = v
  return out


def _unflatten(flat: Mapping[tuple, Any]) -> dict:
  out: dict = {}
  for path, v in flat.items():
    node = out
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = v
  return out


def _state_from_pure(cfg: QincoConfig, d: int, pure: dict) -> nnx.State:
  model = Qinco(cfg, d, rngs=nnx.Rngs(0))
  state = nnx.state(model)
  nnx.replace_by_pure_dict(state, pure)
  return state


# ------------------------------------------------------- reference layout table
class _Entry(NamedTuple):
  """One reference state dict entry and where it lives in our pure-dict state."""
  key: str  # reference key, without any `module.` prefix
  path: tuple  # path in our pure dict
  row: int | None  # row of a stacked array (None: the whole array)
  transpose: bool  # reference (out, in) <-> Flax (in, out)
  shape: tuple  # reference shape


def _layout(cfg: QincoConfig, d: int) -> list[_Entry]:
  """Every reference key of a codec with this config, in a fixed order."""
  if cfg.Ls > 0:
    raise ValueError(f"the reference checkpoint layout has no pre-selection networks; "
                     f"this codec has Ls={cfg.Ls} (only Ls=0 can be exported)")
  K, E, H, L = cfg.K, cfg.embed_dim(d), cfg.dh, cfg.L
  n_ivf = _n_ivf(cfg)
  M_tot = cfg.M + n_ivf
  out = [_Entry("data_mean", ("data_mean",), None, False, (d,)),
         _Entry("data_std", ("data_std",), None, False, ())]
  if n_ivf:
    out.append(_Entry("steps.0.ivf_centroids.weight", ("ivf_centroids",), None, False,
                      (cfg.ivf_K, d)))
  else:
    out.append(_Entry("steps.0.codebook.weight", ("codebook0",), None, False, (K, d)))
  for i in range(M_tot):
    p = f"steps.{i}."
    if i > 0:
      s = i - 1  # row of the stacked network-step arrays
      out.append(_Entry(p + "codebook.weight", ("codebooks",), s, False, (K, d)))
      if cfg.A > 0:
        out.append(_Entry(p + "substep.codebook.weight", ("pre_codebooks",), s, False,
                          (K, d)))
      out.append(_Entry(p + "concat.mlp.weight", ("steps", "concat", "kernel"), s, True,
                        (E, E + d)))
      out.append(_Entry(p + "concat.mlp.bias", ("steps", "concat", "bias"), s, False,
                        (E,)))
      for l in range(L):
        b = f"{p}residual_blocks.{l}."
        out.append(_Entry(b + "up_proj.weight", ("steps", "blocks", l, "up_proj", "kernel"),
                          s, True, (H, E)))
        out.append(_Entry(b + "down_proj.weight",
                          ("steps", "blocks", l, "down_proj", "kernel"), s, True, (E, H)))
      if E != d:
        out.append(_Entry(p + "in_proj.weight", ("steps", "in_proj", "kernel"), s, True,
                          (E, d)))
        out.append(_Entry(p + "out_proj.weight", ("steps", "out_proj", "kernel"), s, True,
                          (d, E)))
    if i >= n_ivf:  # the IVF step has no running statistics in the reference's files
      out.append(_Entry(p + "xtarget_mean", ("xtarget_mean",), i, False, (d,)))
      out.append(_Entry(p + "xtarget_var", ("xtarget_std",), i, False, (d,)))
  return out


_STEP_KEY = re.compile(r"^steps\.(\d+)\.(.+)$")
_BLOCK_KEY = re.compile(r"^residual_blocks\.(\d+)\.")


def _strip_prefix(sd: Mapping[str, Any]) -> dict[str, Any]:
  if not isinstance(sd, Mapping):
    raise ValueError(f"state dict must be a mapping of str -> array, got "
                     f"{type(sd).__name__}")
  out = {}
  for k, v in sd.items():
    if not isinstance(k, str):
      raise ValueError(f"state dict keys must be strings, got {k!r}")
    name = k[len("module."):] if k.startswith("module.") else k
    if name in out:
      raise ValueError(f"state dict has {name!r} both with and without 'module.' prefix")
    out[name] = v
  return out


def _as_int(name: str, v: Any) -> int:
  if isinstance(v, bool):
    raise ValueError(f"parameters[{name!r}] must be an int, got {v!r}")
  try:
    i = int(v)
  except (TypeError, ValueError):
    raise ValueError(f"parameters[{name!r}] must be an int, got {v!r}") from None
  if i != v:
    raise ValueError(f"parameters[{name!r}] must be an int, got {v!r}")
  return i


def _config_from_parameters(parameters: Mapping[str, Any], sd: Mapping[str, Any],
                            d: int) -> QincoConfig:
  """QincoConfig from the checkpoint's hyperparameters, missing ones read off the arrays."""
  if not isinstance(parameters, Mapping):
    raise ValueError(f"parameters must be a mapping (the checkpoint's 'parameters'), "
                     f"got {type(parameters).__name__}")
  p = {k: v for k, v in parameters.items() if v is not None}
  ivf = bool(p.get("ivf_in_use", False)) or "steps.0.ivf_centroids.weight" in sd
  qinco1 = bool(p.get("qinco1_mode", False))
  steps = {int(m.group(1)) for m in map(_STEP_KEY.match, sd) if m}
  n_steps = max(steps) + 1 if steps else 0

  def shape(key: str, axis: int) -> int | None:
    a = sd.get(key)
    s = getattr(a, "shape", None)
    return int(s[axis]) if s is not None and len(s) > axis else None

  first = 1  # first network step
  K = p.get("K", shape(f"steps.{first}.codebook.weight", 0)
            or shape("steps.0.codebook.weight", 0) or 256)
  M = p.get("M", n_steps - (1 if ivf else 0))
  blocks = {int(m.group(1)) for k in sd if k.startswith(f"steps.{first}.")
            for m in [_BLOCK_KEY.match(k[len(f"steps.{first}."):])] if m}
  L = p.get("L", max(blocks) + 1 if blocks else 0)
  dh = p.get("dh", shape(f"steps.{first}.residual_blocks.0.up_proj.weight", 0) or 256)
  de = p.get("de", shape(f"steps.{first}.in_proj.weight", 0))
  has_pre = any(k.endswith(".substep.codebook.weight") for k in sd)
  if qinco1:
    A, B = 0, 1
  else:
    A = p.get("A", min(16, int(K)) if has_pre else 0)
    B = p.get("B", 32 if A else 1)
  # The reference trains from its own initialisation; say so unless told otherwise (it
  # matters only for the dead-codeword resets of a continued training, when E = D).
  kw = dict(K=K, M=M, L=L, de=de, dh=dh, A=A, B=B, qinco1_mode=qinco1,
            init=str(p.get("init", "reference")))
  if qinco1:
    kw["codebook_noise_init"] = 1.0
  if ivf:
    kw["ivf_K"] = p.get("ivf_K", shape("steps.0.ivf_centroids.weight", 0))
  for name, v in kw.items():
    if name not in ("qinco1_mode", "codebook_noise_init", "init") and v is not None:
      kw[name] = _as_int(name, v)
  return QincoConfig(**kw)


# ------------------------------------------------------------- torch: import
def from_state_dict(sd: Mapping[str, Any], parameters: Mapping[str, Any],
                    data_dim: int | None = None) -> Codec:
  """Builds a Codec from a reference PyTorch state dict (spec section 15).

  Args:
    sd: the checkpoint's `model` entry: str -> array (NumPy arrays, torch tensors or
      anything `np.asarray` accepts); an optional `module.` prefix is stripped.
    parameters: the checkpoint's hyperparameters {K, M, de, dh, L, A, B, ivf_in_use,
      ivf_K, qinco1_mode}. Missing (or None) values are read off the arrays: K, M, L,
      dh from the shapes and key counts, de = None unless projections exist, A = 16
      (capped at K) when pre-selection codebooks exist else 0, B = 32 when A > 0 else
      1. With `qinco1_mode` true, A = 0 and B = 1.
    data_dim: D (the checkpoint's `data_dim`); default: the length of `data_mean`.

  Returns:
    A Codec in float32 with the same parameters and statistics.

  Raises:
    ValueError: missing or unexpected keys, or an array whose shape does not match
      the configuration (the message names the key, the expected and the found shape).
    NotImplementedError: an IVF checkpoint when this library has no IVF step.
  """
  sd = _strip_prefix(sd)
  if data_dim is None:
    if "data_mean" not in sd:
      raise ValueError("state dict has no 'data_mean' entry and no data_dim was given")
    s = getattr(sd["data_mean"], "shape", None) or np.shape(sd["data_mean"])
    if len(s) != 1:
      raise ValueError(f"state dict entry 'data_mean': expected shape (D,), got {tuple(s)}")
    data_dim = int(s[0])
  if isinstance(data_dim, bool) or not isinstance(data_dim, (int, np.integer)) or (
      data_dim < 1):
    raise ValueError(f"data_dim must be a positive int, got {data_dim!r}")
  d = int(data_dim)
  cfg = _config_from_parameters(parameters, sd, d)
  layout = _layout(cfg, d)
  expected = {e.key for e in layout}
  missing = [e.key for e in layout if e.key not in sd]
  if missing:
    more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
    raise ValueError(f"state dict is missing {len(missing)} key(s) expected for {cfg} "
                     f"with D={d}: {missing[:5]}{more}")
  unexpected = sorted(set(sd) - expected)
  if unexpected:
    more = f" (and {len(unexpected) - 5} more)" if len(unexpected) > 5 else ""
    raise ValueError(f"state dict has {len(unexpected)} unexpected key(s) for {cfg} with "
                     f"D={d}: {unexpected[:5]}{more}")
  pure = _fresh_pure(cfg, d)
  for e in layout:
    a = _to_numpy(sd[e.key], e.key)
    if e.key == "data_std" and a.shape == (1,):
      a = a.reshape(())
    if a.shape != e.shape:
      raise ValueError(f"state dict entry {e.key!r}: expected shape {e.shape}, got "
                       f"{a.shape}")
    if e.transpose:
      a = a.T
    target = _get(pure, e.path[:-1])
    if e.row is None:
      target[e.path[-1]] = a
    else:
      target[e.path[-1]][e.row] = a
  std = float(pure["data_std"])
  if not (math.isfinite(std) and std > 0):
    raise ValueError(f"state dict entry 'data_std' must be a positive finite number, "
                     f"got {std}")
  state = _state_from_pure(cfg, d, pure)
  check_state_values(state, "state dict")
  return Codec(cfg, d, state, {"imported_from": "torch"})


def from_torch(path: str | os.PathLike) -> Codec:
  """Loads a reference PyTorch checkpoint file (`.pt`, spec section 15) as a Codec.

  Reads it with `torch.load(path, map_location="cpu", weights_only=True)` (no code in
  the file is executed) and calls `from_state_dict` on its `model`, `parameters` and
  `data_dim` entries.

  Raises:
    ImportError: PyTorch is not installed.
    FileNotFoundError: no such file.
    ValueError: the file is not a checkpoint of this layout.
  """
  try:
    import torch
  except ImportError:
    raise ImportError(_TORCH_HINT) from None
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no checkpoint file at {path!r}")
  ckpt = torch.load(path, map_location="cpu", weights_only=True)
  if not isinstance(ckpt, Mapping) or "model" not in ckpt:
    raise ValueError(f"{path!r} is not a QINCo checkpoint: expected a dict with a "
                     f"'model' entry, got "
                     f"{sorted(ckpt) if isinstance(ckpt, Mapping) else type(ckpt).__name__}")
  parameters = ckpt.get("parameters") or {}
  return from_state_dict(ckpt["model"], parameters, ckpt.get("data_dim"))


# ------------------------------------------------------------- torch: export
def to_torch_state_dict(codec: Codec, as_torch: bool = False) -> dict[str, Any]:
  """The inverse of `from_state_dict`: the codec in the reference layout.

  Args:
    codec: any codec with Ls = 0 (the reference has no pre-selection networks).
    as_torch: return torch tensors (imports torch) instead of NumPy arrays.

  Returns:
    {key: float32 array} with the keys and (out, in) shapes listed in this module's
    docstring; `xtarget_var` holds our running std (as in the reference).
  """
  pure = _np_tree(nnx.to_pure_dict(codec.state))
  out = {}
  for e in _layout(codec.cfg, codec.d):
    a = _get(pure, e.path)
    if e.row is not None:
      a = a[e.row]
    a = np.array(a.T if e.transpose else a, dtype=np.float32, order="C")
    if a.shape != e.shape:  # a state that does not match its own config
      raise ValueError(f"codec array {'/'.join(map(str, e.path))} gives {e.key!r} of "
                       f"shape {a.shape}, expected {e.shape}")
    out[e.key] = a
  if as_torch:
    try:
      import torch
    except ImportError:
      raise ImportError(_TORCH_HINT) from None
    out = {k: torch.from_numpy(v.copy()) for k, v in out.items()}
  return out


def torch_parameters(codec: Codec) -> dict[str, Any]:
  """The reference's `parameters` entry for this codec (keys with None omitted)."""
  c = codec.cfg
  p = {"K": c.K, "M": c.M, "dh": c.dh, "L": c.L, "A": c.A, "B": c.B,
       "ivf_in_use": bool(_n_ivf(c)), "qinco1_mode": bool(c.qinco1_mode)}
  if c.de is not None:
    p["de"] = c.de
  if _n_ivf(c):
    p["ivf_K"] = c.ivf_K
  return p


def to_torch_checkpoint(codec: Codec, as_torch: bool = True) -> dict[str, Any]:
  """A reference-style checkpoint dict: {epoch, model, parameters, data_dim}.

  Save it with `torch.save(to_torch_checkpoint(codec), path)` (or `save_torch`);
  it loads with `torch.load(..., weights_only=True)` and with `from_torch`.

  Args:
    codec: the codec.
    as_torch: store torch tensors (default; imports torch) or NumPy arrays.
  """
  epoch = codec.info.get("epoch", 0) if isinstance(codec.info, Mapping) else 0
  return {"epoch": int(epoch) if isinstance(epoch, (int, np.integer)) else 0,
          "model": to_torch_state_dict(codec, as_torch=as_torch),
          "parameters": torch_parameters(codec),
          "data_dim": int(codec.d)}


def save_torch(codec: Codec, path: str | os.PathLike) -> None:
  """Writes `to_torch_checkpoint(codec)` with `torch.save`, atomically."""
  try:
    import torch
  except ImportError:
    raise ImportError(_TORCH_HINT) from None
  ckpt = to_torch_checkpoint(codec, as_torch=True)
  data.atomic_write(os.fspath(path), lambda f: torch.save(ckpt, f))


# ------------------------------------------------------------------- faiss
def _import_faiss():
  try:
    import faiss
  except ImportError:
    raise ImportError(_FAISS_HINT) from None
  if not hasattr(faiss, "QINCo"):
    raise ImportError(f"this faiss ({getattr(faiss, '__version__', '?')}) has no QINCo; "
                      "faiss >= 1.9 is needed")
  return faiss


def _check_faiss_compatible(codec: Codec):
  c = codec.cfg
  if not c.qinco1_mode:
    raise ValueError(
        "faiss.QINCo implements the QINCo1 step network (f = h_L, no outer residual "
        "c + ...), which cannot represent a QINCo2 codec; only codecs built with "
        "qinco1_mode=True can be exported to faiss")
  if c.embed_dim(codec.d) != codec.d:
    raise ValueError(f"faiss.QINCo has no input/output projections: the codec needs "
                     f"de=None (= D = {codec.d}), got de={c.de}")
  if _n_ivf(c):
    raise ValueError("faiss.QINCo has no IVF step: codecs with ivf_K > 0 cannot be "
                     "exported")


def _fill_faiss_qinco(q, codec: Codec, normalized: bool):
  """Copies the codec's weights into an existing faiss.QINCo `q` (same d, K, L, M, h)."""
  pure = _np_tree(nnx.to_pure_dict(codec.state))
  d = codec.d
  mean = pure["data_mean"].astype(np.float64)
  std = float(pure["data_std"])
  if normalized:
    mean, std = np.zeros(d), 1.0
  f32 = lambda a: np.ascontiguousarray(a, dtype=np.float32)  # noqa: E731
  q.codebook0.from_array(f32(std * pure["codebook0"] + mean))
  for s in range(codec.M - 1):
    step = q.get_step(s)
    step.codebook.from_array(f32(std * pure["codebooks"][s]))
    W = pure["steps"]["concat"]["kernel"][s].T.astype(np.float64)  # (D, 2D), (out, in)
    b = pure["steps"]["concat"]["bias"][s].astype(np.float64)
    # Raw units: c' = std c and x' = std z + mean, so h0' = std h0 when
    # b' = std b - W_x mean; the bias-free ReLU blocks are positively homogeneous.
    step.MLPconcat.from_array(f32(W), f32(std * b - W[:, d:] @ mean))
    for l in range(codec.cfg.L):
      blk = pure["steps"]["blocks"][l]
      rb = step.get_residual_block(l)
      rb.linear1.from_array(f32(blk["up_proj"]["kernel"][s].T))
      rb.linear2.from_array(f32(blk["down_proj"]["kernel"][s].T))


def to_faiss_qinco(codec: Codec, normalized: bool = False):
  """Exports a QINCo1-mode codec to `faiss.QINCo` (faiss's CPU QINCo1 codec).

  faiss computes, per step, h_0 = c + W_c [c ; x_hat] + b_c, then the residual blocks
  h += W_2 relu(W_1 h), and f = h_L: exactly our `qinco1_mode` step network with
  E = D. faiss encodes greedily over all K codes, i.e. like `codec.encode(x, A=0, B=1)`.

  Args:
    codec: a codec with `qinco1_mode=True`, de None (= D), no IVF. Pre-selection
      codebooks, if any, are not exported (faiss scores all K codes).
    normalized: False (default): the normalisation is folded into the weights so
      the faiss object encodes raw vectors and decodes to raw units (codebooks scaled
      by data_std, step 0 shifted by data_mean, concat bias adjusted; exact up to
      float rounding). True: the weights are copied as they are and the faiss object
      works in normalised space, (x - data_mean) / data_std.

  Returns:
    faiss.QINCo with d = D, K, L, M and h = dh. Use `faiss_encode` / `faiss_decode`
    for NumPy in and out.
  """
  faiss = _import_faiss()
  _check_faiss_compatible(codec)
  c = codec.cfg
  q = faiss.QINCo(codec.d, c.K, c.L, c.M, c.dh)
  _fill_faiss_qinco(q, codec, normalized)
  return q


def to_faiss_index(codec: Codec):
  """A `faiss.IndexQINCo` (trained, empty) holding the codec, in raw units.

  `index.add(x)` encodes greedily (A=0, B=1) and stores ceil(M log2 K / 8) bytes per
  vector; `index.search(queries, k)` is an exhaustive search over the decoded vectors;
  `index.sa_encode` / `sa_decode` give packed codes. Needs K a power of two.
  """
  faiss = _import_faiss()
  _check_faiss_compatible(codec)
  c = codec.cfg
  nbits = int(round(math.log2(c.K)))
  if 2 ** nbits != c.K:
    raise ValueError(f"faiss.IndexQINCo needs K a power of two, got K={c.K}")
  index = faiss.IndexQINCo(codec.d, c.M, nbits, c.L, c.dh)
  _fill_faiss_qinco(index.qinco, codec, normalized=False)
  index.is_trained = True
  return index


def faiss_encode(q, x) -> np.ndarray:
  """Encodes (n, d) vectors with a faiss.QINCo: returns (n, M) int32 codes."""
  faiss = _import_faiss()
  x = data.as_float32(x, d=q.d, name="x")
  if len(x) == 0:
    return np.zeros((0, q.M), np.int32)
  return q.encode(faiss.Tensor2D(np.ascontiguousarray(x))).numpy()


def faiss_decode(q, codes) -> np.ndarray:
  """Decodes (n, M) integer codes with a faiss.QINCo: returns (n, d) float32."""
  faiss = _import_faiss()
  codes = data.check_int_matrix(codes, "codes", q.K)
  if codes.shape[1] != q.M:
    raise ValueError(f"codes must be an (n, M={q.M}) array, got shape {codes.shape}")
  if len(codes) == 0:
    return np.zeros((0, q.d), np.float32)
  return q.decode(faiss.Int32Tensor2D(np.ascontiguousarray(codes, np.int32))).numpy()


# --------------------------------------------------------------------- npz
def export_npz(codec: Codec, path: str | os.PathLike) -> None:
  """Writes every array of the codec and its hyperparameters to one `.npz` file.

  The file is written to a temporary sibling and renamed, so an interrupted export
  never leaves a partial file; `path` is used as given (no extension is appended).
  It needs nothing but NumPy to read (`np.load(path)`; no pickles):

    __format__   str, "qinco-jax-npz/1"
    __config__   str, JSON of the QincoConfig fields (K, M, L, de, dh, A, B, ...)
    __d__        int64 scalar, data dimension D
    __info__     str, JSON of the codec's free-form info
    codebook0    (K, D) float32, step 0 (normalised space)
    codebooks    (M-1, K, D) float32, steps 1..M-1
    pre_codebooks                (M-1, K, D)  only when A > 0
    steps/concat/kernel          (M-1, E+D, E), input order [embedding ; x_hat]
    steps/concat/bias            (M-1, E)
    steps/blocks/{l}/up_proj/kernel    (M-1, E, H)
    steps/blocks/{l}/down_proj/kernel  (M-1, H, E)
    steps/in_proj/kernel         (M-1, D, E)  only when E != D
    steps/out_proj/kernel        (M-1, E, D)  only when E != D
    data_mean (D,), data_std (), raw units; xtarget_mean, xtarget_std (M, D)

  Kernels are (in, out): a step computes e = c @ in_proj, h = e + [e, x_hat] @
  concat/kernel + bias, h += relu(h @ up) @ down per block, f = h @ out_proj
  (+ c unless `qinco1_mode`), x_hat += f; raw x = data_std * x_hat + data_mean.
  Models with an IVF step or Ls > 0 add their own arrays under the same naming.
  """
  flat = _flatten(_np_tree(nnx.to_pure_dict(codec.state)))
  arrays = {"/".join(map(str, k)): np.array(v, order="C") for k, v in flat.items()}
  try:
    info = json.dumps(codec.info)
  except TypeError:
    info = json.dumps({})
  meta = {"__format__": np.array(NPZ_FORMAT),
          "__config__": np.array(json.dumps(codec.cfg.to_dict())),
          "__d__": np.array(codec.d, np.int64),
          "__info__": np.array(info)}
  clash = sorted(set(meta) & set(arrays))
  if clash:
    raise ValueError(f"codec state has reserved array names {clash}")
  buf = io.BytesIO()
  # The names (metadata "__x__" and state paths) are never savez's allow_pickle keyword.
  np.savez(buf, **meta, **arrays)  # type: ignore[arg-type]
  data.atomic_write(os.fspath(path), lambda f: f.write(buf.getvalue()))


def load_npz(path: str | os.PathLike) -> Codec:
  """Loads a codec written by `export_npz`.

  Raises:
    FileNotFoundError: no such file.
    ValueError: not a qinco-jax npz, or arrays missing, unexpected or of the wrong
      shape for the stored config.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no npz file at {path!r}")
  try:
    # Our own handle, so that it is closed even when np.load refuses the bytes.
    with open(path, "rb") as f, np.load(f, allow_pickle=False) as z:
      files = {k: z[k] for k in z.files}
  except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
    raise ValueError(f"{path!r} is not a readable .npz file (garbage or truncated: "
                     f"{e.__class__.__name__}: {str(e).splitlines()[0][:120]})") from None
  if str(files.get("__format__", "")) != NPZ_FORMAT:
    raise ValueError(f"{path!r} is not a qinco-jax npz (no '__format__' = "
                     f"{NPZ_FORMAT!r} entry)")
  try:
    cfg = QincoConfig.from_dict(json.loads(str(files["__config__"])))
    d = int(files["__d__"])
    info = json.loads(str(files["__info__"])) if "__info__" in files else {}
  except (KeyError, TypeError, ValueError) as e:
    raise ValueError(f"{path!r} has invalid metadata: {e}") from None
  arrays = {k: v for k, v in files.items() if not k.startswith("__")}
  fresh = _flatten(_fresh_pure(cfg, d))
  by_name = {"/".join(map(str, k)): k for k in fresh}
  missing = sorted(set(by_name) - set(arrays))
  unexpected = sorted(set(arrays) - set(by_name))
  if missing or unexpected:
    raise ValueError(f"{path!r} does not match its config {cfg} (D={d}): missing "
                     f"{missing}, unexpected {unexpected}")
  flat = {}
  for name, key in by_name.items():
    a = arrays[name]
    if a.shape != fresh[key].shape:
      raise ValueError(f"{path!r}: array {name!r} has shape {a.shape}, expected "
                       f"{fresh[key].shape}")
    flat[key] = a.astype(fresh[key].dtype)
  state = _state_from_pure(cfg, d, _unflatten(flat))
  check_state_values(state, f"npz file {path!r}")
  return Codec(cfg, d, state, info if isinstance(info, dict) else {})
