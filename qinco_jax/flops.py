"""Analytic FLOP model of the step networks: encoding (beam search with
pre-selection), decoding and a training step, per vector.

Counted: the matmuls and the candidate scores (multiply-adds count 2). Left out:
element-wise work (ReLU, residual adds, normalisation), top-k selection and gathers,
which are a few percent at the presets' sizes. The benchmarks turn these counts into
achieved FLOP/s (`qinco_jax.bench`), and the ahead-of-time compile report compares
them with the compiled program's own matmul count (`qinco_jax.aot`).
"""

from __future__ import annotations

from qinco_jax.config import QincoConfig


def _dims(cfg: QincoConfig, d: int) -> tuple[int, int, bool]:
  """(E, H, has_proj) of the step networks for data dimension d."""
  E = cfg.embed_dim(d)
  return E, cfg.dh, E != d


def candidate_flops(cfg: QincoConfig, d: int) -> int:
  """FLOPs to evaluate and score one candidate: L blocks, P_out, ||r - f||^2."""
  E, H, proj = _dims(cfg, d)
  return cfg.L * 2 * (2 * E * H) + proj * 2 * E * d + 3 * d


def encode_flops(cfg: QincoConfig, d: int, A: int, B: int, chunk: int) -> float:
  """FLOPs per encoded vector of the beam search in `qinco_jax.encode`.

  step 0: 2KD (distances to the K codewords). Each of the M-1 network steps keeps B
  beam slots and evaluates A_eff = (A or K) candidates per slot:
    pre-selection (A > 0, Ls = 0)  2BKD
    per candidate (B * A_eff)      L * 2(2EH) + [E != D] 2ED + 3D
    per beam slot (B)              2DE (the x_hat half of the first layer)
    codeword table, per chunk      K([E != D] 2DE + 2E^2), divided by the chunk size
  With a pre-selection network (Ls > 0) the 2BKD distances become B*K evaluations
  of its tail (Ls blocks of width dh_pre, P_out, score) plus its own beam term and
  codeword table.
  """
  K, M = cfg.K, cfg.M
  E, H, proj = _dims(cfg, d)
  a_eff = A if A > 0 else K
  table = K * (proj * 2 * d * E + 2 * E * E) / chunk
  step = B * a_eff * candidate_flops(cfg, d) + B * 2 * d * E + table
  if A > 0 and cfg.Ls == 0:
    step += B * K * 2 * d
  elif A > 0:
    pre = cfg.Ls * 4 * E * cfg.dh_pre + proj * 2 * E * d + 3 * d
    step += B * K * pre + B * 2 * d * E + table
  return 2 * K * d + (M - 1) * step


def decode_flops(cfg: QincoConfig, d: int, chunk: int | None = None) -> float:
  """FLOPs per decoded vector over the M - 1 network steps.

  chunk=None: the plain composition f(c, x_hat) per vector (P_in, concat layer, L
  blocks, P_out). With `chunk` (vectors per call), as `decode.decode_steps` runs it:
  per vector the x_hat half of the concat layer (2DE), the L blocks and P_out; per
  call the codeword half of every one of the K codewords ([E != D] 2DE + 2E^2 per
  codeword), divided by the chunk size.
  """
  E, H, proj = _dims(cfg, d)
  step: float
  if chunk is None:
    step = proj * 2 * d * E + 2 * (E + d) * E + cfg.L * 2 * (2 * E * H) + proj * 2 * E * d
  else:
    table = cfg.K * (proj * 2 * d * E + 2 * E * E) / chunk
    step = 2 * d * E + cfg.L * 2 * (2 * E * H) + proj * 2 * E * d + table
  return (cfg.M - 1) * step


def tail_flops(cfg: QincoConfig, d: int, rows: int) -> float:
  """FLOPs of `StepNet.tail` (L blocks + P_out) on `rows` candidates."""
  E, H, proj = _dims(cfg, d)
  return rows * (cfg.L * 4 * E * H + proj * 2 * E * d)



def train_flops(cfg: QincoConfig, d: int, batch: int, chunk: int | None = None) -> float:
  """Per training sample, with `batch` samples per device: the beam search at the
  training (A, B), in calls of `chunk` vectors (default: the whole batch), plus 3x the
  decoder (forward, and a backward of twice its cost), each with its per-call codeword
  table. The pre-selection loss has no matmul when Ls = 0 (the presets); with Ls > 0
  its network is left out."""
  return (encode_flops(cfg, d, cfg.A, cfg.B, min(chunk or batch, batch))
          + 3 * decode_flops(cfg, d, batch))
