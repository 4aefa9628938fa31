"""A slow, independent NumPy (float64) reference of QINCo2 decoding and encoding.

Written straight from the spec (sections 4.2, 5.1, 6.1, 7.1), one vector at a time with
Python lists, sharing no code with the JAX implementation. Only the parameter layout
(read from the codec's state as plain arrays) is shared.
"""

from __future__ import annotations

import itertools

import jax
import numpy as np
from flax import nnx


def randomize(codec, scale: float = 0.3, seed: int = 0):
  """Returns a codec whose every parameter is random (so f is far from 2c)."""
  state = codec.state
  params = state.filter(nnx.Param)
  leaves, tdef = jax.tree.flatten(params)
  rng = np.random.default_rng(seed)
  new = []
  for leaf in leaves:
    fan_in = leaf.shape[-2] if leaf.ndim >= 3 else 1
    s = scale / np.sqrt(fan_in) if leaf.ndim >= 3 else scale
    new.append((np.asarray(leaf) + s * rng.standard_normal(leaf.shape)).astype(np.float32))
  params = jax.tree.unflatten(tdef, new)
  rest = state.filter(lambda path, v: not isinstance(v, nnx.Param))
  return codec.replace_state(nnx.merge_state(params, rest))


def np_params(codec) -> dict:
  """Plain float64 arrays: C0, and per network step m a dict of its weights."""
  sd = jax.tree.map(lambda a: np.asarray(a, np.float64), nnx.to_pure_dict(codec.state))
  ivf = codec.cfg.ivf_K > 0
  out = {"C0": sd["ivf_centroids"] if ivf else sd["codebook0"], "ivf": ivf,
         "mean": sd["data_mean"], "std": float(sd["data_std"]),
         "qinco1": codec.cfg.qinco1_mode, "steps": []}
  for m in range(codec.cfg.n_net):
    st = jax.tree.map(lambda a: a[m], sd["steps"])
    out["steps"].append({
        "C": sd["codebooks"][m],
        "Cp": sd["pre_codebooks"][m] if sd.get("pre_codebooks") is not None else None,
        "Pin": st["in_proj"]["kernel"] if st.get("in_proj") else None,
        "Pout": st["out_proj"]["kernel"] if st.get("out_proj") else None,
        "Wc": st["concat"]["kernel"], "bc": st["concat"]["bias"],
        "blocks": [(st["blocks"][l]["up_proj"]["kernel"],
                    st["blocks"][l]["down_proj"]["kernel"])
                   for l in range(len(st["blocks"]))],
    })
  return out


def np_f(step: dict, c: np.ndarray, x_hat: np.ndarray, qinco1: bool) -> np.ndarray:
  """f(c, x_hat) for one codeword c (D,) and reconstruction x_hat (D,)."""
  e = c if step["Pin"] is None else c @ step["Pin"]
  h = e + np.concatenate([e, x_hat]) @ step["Wc"] + step["bc"]
  for U, V in step["blocks"]:
    h = h + np.maximum(h @ U, 0.0) @ V
  out = h if step["Pout"] is None else h @ step["Pout"]
  return out if qinco1 else c + out


def np_decode(p: dict, codes) -> np.ndarray:
  """Normalised reconstruction of one code sequence."""
  x_hat = p["C0"][codes[0]].copy()
  for m, k in enumerate(codes[1:]):
    step = p["steps"][m]
    x_hat = x_hat + np_f(step, step["C"][k], x_hat, p["qinco1"])
  return x_hat


def np_beam(p: dict, x: np.ndarray, A: int, B: int):
  """Beam search for one normalised vector x (D,). Returns (codes list, x_hat)."""
  d0 = ((x - p["C0"]) ** 2).sum(1)
  # IVF: a single beam, the nearest centroid; else the min(B, K) best codewords.
  order = np.argsort(d0, kind="stable")[: 1 if p["ivf"] else min(B, len(p["C0"]))]
  beams = [([int(k)], p["C0"][k]) for k in order]
  M = 1 + len(p["steps"])
  for m, step in enumerate(p["steps"]):
    K = len(step["C"])
    A_m = min(max(A, B), K) if (p["ivf"] and m == 0 and A > 0) else A
    cands = []
    for codes, x_hat in beams:
      r = x - x_hat
      if A_m > 0:
        s = ((r - step["Cp"]) ** 2).sum(1)
        ks = np.argsort(s, kind="stable")[:A_m]
      else:
        ks = range(K)
      for k in ks:
        y = x_hat + np_f(step, step["C"][k], x_hat, p["qinco1"])
        cands.append((float(((x - y) ** 2).sum()), codes + [int(k)], y))
    cands.sort(key=lambda t: t[0])
    keep = 1 if m == M - 2 else B
    beams = [(c, y) for _, c, y in cands[:keep]]
  return beams[0]


def np_greedy(p: dict, x: np.ndarray):
  """Step-by-step greedy: at each step the single best of all K codes."""
  x_hat = np.zeros_like(x)
  codes = []
  k = int(np.argmin(((x - p["C0"]) ** 2).sum(1)))
  codes.append(k)
  x_hat = p["C0"][k].copy()
  for step in p["steps"]:
    ys = [x_hat + np_f(step, step["C"][k], x_hat, p["qinco1"]) for k in range(len(step["C"]))]
    k = int(np.argmin([((x - y) ** 2).sum() for y in ys]))
    codes.append(k)
    x_hat = ys[k]
  return codes, x_hat


def np_exhaustive(p: dict, x: np.ndarray):
  """The optimum over all K^M code sequences."""
  K, M = len(p["C0"]), 1 + len(p["steps"])
  best = None
  for codes in itertools.product(range(K), repeat=M):
    err = float(((x - np_decode(p, codes)) ** 2).sum())
    if best is None or err < best[0]:
      best = (err, list(codes))
  return best[1], np_decode(p, best[1])
