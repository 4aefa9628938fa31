"""A slow, independent NumPy (float64) reference of QINCo2 decoding and encoding.

Written straight from the spec (sections 4.2, 5.1, 6.1, 7.1), one vector at a time with
Python lists, sharing no code with the JAX implementation. Only the parameter layout
(read from the codec's state as plain arrays) is shared.
"""

from __future__ import annotations

import itertools
import json

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
    step = _np_net(jax.tree.map(lambda a: a[m], sd["steps"]))
    step["C"] = sd["codebooks"][m]
    step["Cp"] = sd["pre_codebooks"][m] if sd.get("pre_codebooks") is not None else None
    # Pre-selection network g_m (Ls > 0, spec 5.2): the same architecture as f_m.
    step["g"] = (_np_net(jax.tree.map(lambda a: a[m], sd["pre_steps"]))
                 if sd.get("pre_steps") is not None else None)
    out["steps"].append(step)
  return out


def _np_net(st: dict) -> dict:
  return {"Pin": st["in_proj"]["kernel"] if st.get("in_proj") else None,
          "Pout": st["out_proj"]["kernel"] if st.get("out_proj") else None,
          "Wc": st["concat"]["kernel"], "bc": st["concat"]["bias"],
          "blocks": [(st["blocks"][l]["up_proj"]["kernel"],
                      st["blocks"][l]["down_proj"]["kernel"])
                     for l in range(len(st["blocks"]))]}


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
      if A_m > 0:
        s = np_pre_scores(step, x, x_hat, p["qinco1"])
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


def np_pre_scores(step: dict, x: np.ndarray, x_hat: np.ndarray, qinco1: bool) -> np.ndarray:
  """Pre-selection scores of all K codes for one beam (spec 5.1/5.2):
  ||x - x_hat - C'[k]||^2, or ||x - x_hat - g(C'[k], x_hat)||^2 with a network g."""
  r = x - x_hat
  if step.get("g") is None:
    return ((r - step["Cp"]) ** 2).sum(1)
  return np.array([((r - np_f(step["g"], c, x_hat, qinco1)) ** 2).sum()
                   for c in step["Cp"]])


def np_beam_trace(p: dict, x: np.ndarray, A: int, B: int) -> list[list[np.ndarray]]:
  """The reconstructions entering each step (step 0: [0]) during `np_beam`'s search:
  a list over the M_tot steps of lists of (D,) beams (spec 9.8's targets are x minus
  these)."""
  trace = [[np.zeros_like(x)]]
  d0 = ((x - p["C0"]) ** 2).sum(1)
  order = np.argsort(d0, kind="stable")[: 1 if p["ivf"] else min(B, len(p["C0"]))]
  beams = [([int(k)], p["C0"][k]) for k in order]
  for m, step in enumerate(p["steps"]):
    trace.append([x_hat for _, x_hat in beams])
    K = len(step["C"])
    A_m = min(max(A, B), K) if (p["ivf"] and m == 0 and A > 0) else A
    cands = []
    for codes, x_hat in beams:
      ks = (np.argsort(np_pre_scores(step, x, x_hat, p["qinco1"]), kind="stable")[:A_m]
            if A_m > 0 else range(K))
      for k in ks:
        y = x_hat + np_f(step, step["C"][k], x_hat, p["qinco1"])
        cands.append((float(((x - y) ** 2).sum()), codes + [int(k)], y))
    cands.sort(key=lambda t: t[0])
    beams = [(c, y) for _, c, y in cands[:B]]
  return trace


def np_partials(p: dict, codes) -> list[np.ndarray]:
  """x_hat_1 .. x_hat_{M_tot} of one code sequence (the reconstruction after each step)."""
  x_hat = p["C0"][codes[0]].copy()
  out = [x_hat]
  for m, k in enumerate(codes[1:]):
    step = p["steps"][m]
    x_hat = x_hat + np_f(step, step["C"][k], x_hat, p["qinco1"])
    out.append(x_hat)
  return out


def np_loss(p: dict, x: np.ndarray, codes: np.ndarray, entering=None) -> float:
  """Spec 9.1 for a batch x (N, D) normalised with its codes (N, M_tot): the sum over
  steps (the IVF step excluded) of mean_{n,d}(x_hat_{m+1} - x)^2, plus, with
  pre-selection codebooks, the sum over network steps of
  mean_{n,d}(sg(x_hat_m) + g(C'_m[i_m]) - x)^2. `entering` (N, M_tot, D): the x_hat_m
  to use inside the pre-selection term (the stop-gradient: pass the unperturbed ones
  when differentiating numerically); default: this model's own."""
  N, D = x.shape
  parts = np.array([np_partials(p, c) for c in codes])  # (N, M_tot, D)
  first = 1 if p["ivf"] else 0
  loss = sum(((parts[:, m] - x) ** 2).mean() for m in range(first, parts.shape[1]))
  if p["steps"] and p["steps"][0]["Cp"] is not None:
    ent = parts if entering is None else entering
    for m, step in enumerate(p["steps"]):
      xh = ent[:, m]  # entering network step m = x_hat after step m (0-based) of parts
      if step.get("g") is None:
        g = step["Cp"][codes[:, m + 1]]
      else:
        g = np.array([np_f(step["g"], step["Cp"][k], xh[n], p["qinco1"])
                      for n, k in enumerate(codes[:, m + 1])])
      loss += ((xh + g - x) ** 2).mean()
  return float(loss)


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


def normalised(codec, x):
  """(NumPy params of the codec, x in its normalised space as float64)."""
  p = np_params(codec)
  return p, (x.astype(np.float64) - p["mean"]) / p["std"]


def code_errors(p: dict, x: np.ndarray, codes) -> np.ndarray:
  """Squared error of each code sequence, decoded by the reference."""
  return np.array([((xi - np_decode(p, c)) ** 2).sum() for xi, c in zip(x, codes)])


def assert_same_codes(p: dict, z: np.ndarray, ours, ref, min_exact: float = 0.95):
  """Codes agree exactly, except where two paths tie within float32 rounding."""
  exact = np.all(ours == ref, axis=1)
  assert exact.mean() >= min_exact, f"only {exact.mean():.2%} identical code rows"
  np.testing.assert_allclose(code_errors(p, z, ours), code_errors(p, z, ref),
                             rtol=1e-4, atol=1e-5)


def nearest(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
  """Index (n,) of the nearest centroid of every row, exact float64 L2."""
  x, c = np.asarray(x, np.float64), np.asarray(centroids, np.float64)
  return (((x[:, None, :] - c[None]) ** 2).sum(-1)).argmin(1)


def read_jsonl(path) -> list[dict]:
  """The records of a JSON-lines file (metrics or sweep logs), the file closed after."""
  with open(path) as f:
    return [json.loads(line) for line in f]
