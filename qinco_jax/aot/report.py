"""Roofline predictions from a compiled program and its chip's public figures.

A program's time per call on one chip is predicted as

  t = max(t_compute, t_memory) + t_collective
  t_compute = matmul FLOPs by operand dtype / the chip's peak for that dtype
  t_memory  = estimated HBM bytes / the chip's HBM bandwidth
  t_collective = 4 x (all-reduce bytes) / the chip's bidirectional link bandwidth
                 (a ring all-reduce sends and receives twice the buffer) + 2 x (bytes
                 crossing slices) / the chip's share of the data-centre network;
                 on several GPU hosts at least 2 x (all-reduce bytes) / the GPU's own
                 network port (the ring crosses the hosts); no overlap with compute
                 assumed

and the share of the chip's bfloat16 peak it reaches is FLOPs / (t x peak_bf16).
These are predictions, not measurements: a roofline ignores kernel launch and loop
overheads, the efficiency of small matmuls (E=128 fills a 128-wide MXU row but not a
256-wide one) and top-k; it is an upper bound on the speed.
"""

from __future__ import annotations

import dataclasses

from qinco_jax.aot.compile import Program
from qinco_jax.aot.targets import Target

RECIPE_SAMPLES = 71 * 10_000_000  # the paper's recipe: 71 epochs of 10M samples
ENCODE_VECTORS = 1_000_000_000  # a billion-vector database


@dataclasses.dataclass
class Prediction:
  t_compute: float
  t_memory: float
  t_collective: float
  rows_per_s_chip: float  # samples/s (training) or vectors/s (encode, decode) per chip
  rows_per_s_target: float  # all chips of the target
  frac_bf16_peak: float
  bound: str  # "compute", "memory" or "collective"

  @property
  def t(self) -> float:
    return max(self.t_compute, self.t_memory) + self.t_collective


def predict(p: Program, target: Target) -> Prediction | None:
  if p.stats is None:
    return None
  chip = target.chip
  t_compute = 0.0
  for dtype, f in p.stats.matmul_dtypes.items():
    t_compute += f / (chip.peak_bf16 if dtype in ("bf16", "f16", "f8e4m3fn", "f8e5m2")
                      else chip.peak_f32)
  t_memory = p.stats.hbm_bytes / chip.hbm_bw
  allreduce = p.stats.collectives.get("all-reduce", (0, 0.0))[1]
  t_coll = 4 * allreduce / chip.link_bw if (chip.link_bw and allreduce) else 0.0
  if target.hosts > 1 and chip.dcn_bw and allreduce:
    # GPU hosts: one all-reduce over every GPU, its ring crossing the hosts' network
    # (each GPU sends and receives about 2x the bytes through its own port).
    t_coll = max(t_coll, 2 * allreduce / chip.dcn_bw)
  dcn = p.stats.collectives.get("dcn-all-reduce", (0, 0.0))[1]
  if dcn and chip.dcn_bw:
    t_coll += 2 * dcn / chip.dcn_bw
  t = max(t_compute, t_memory) + t_coll
  parts = {"compute": t_compute, "memory": t_memory, "collective": t_coll}
  bound = max(parts, key=lambda k: parts[k])
  per_chip = p.rows / t if t > 0 else float("inf")
  return Prediction(t_compute, t_memory, t_coll, per_chip, per_chip * target.n_chips,
                    p.stats.matmul_flops / (t * chip.peak_bf16) if t > 0 else 0.0, bound)


def hours(rows: float, rate: float) -> float:
  return rows / rate / 3600 if rate > 0 else float("inf")


def mib(b: float) -> str:
  return f"{b / 2**20:,.1f} MiB" if b < 2**30 else f"{b / 2**30:,.2f} GiB"


def flops_agreement(p: Program) -> str:
  """The compiled program's matmul FLOPs against the FLOP model, as a ratio and a
  verdict (the two agree within 10%, or why not)."""
  if p.hlo_flops is None or not p.analytic_flops:
    return "n/a"
  r = p.hlo_flops / p.analytic_flops
  return f"{r:.3f}x" + ("" if abs(r - 1) <= 0.10 else " (outside 10%: see the report)")


def describe(p: Program, target: Target, param_bytes: int) -> list[str]:
  """A program's report lines."""
  out = [f"{p.name}: {p.rows:,} per chip per call, compiled in {p.compile_s:.1f} s"]
  if not p.memory:
    out.append(f"  does NOT fit: {p.error}")
    return out
  m = p.memory
  out.append(f"  memory per chip: arguments {mib(m['argument'])}, outputs {mib(m['output'])}"
             f" ({mib(m['alias'])} aliased), temporaries {mib(m['temp'])}, code "
             f"{mib(m['code'])}; total {mib(m['total'])} of {mib(p.usable_bytes)} usable"
             f" -> {'fits' if p.fits else 'does NOT fit'}")
  s = p.stats
  assert s is not None
  xla = (f"; XLA cost analysis {p.xla_flops / p.rows / 1e9:.3f} (loop bodies once)"
         if p.xla_flops else "; XLA cost analysis: none on this platform")
  out.append(f"  GFLOP per row: compiled matmuls {s.matmul_flops / p.rows / 1e9:.3f}, "
             f"FLOP model {p.analytic_flops / p.rows / 1e9:.3f} "
             f"({flops_agreement(p)}){xla}")
  coll = ", ".join(f"{k} x{c} ({mib(b)})" for k, (c, b) in sorted(s.collectives.items()))
  out.append(f"  collectives per call: {coll or 'none'}"
             + (f"; trainable parameters {mib(param_bytes)}" if p.name.startswith("train")
                else ""))
  flags = []
  if s.f64:
    flags.append("64-bit floats")
  if s.host_transfers:
    flags.append("host transfers: " + ", ".join(s.host_transfers))
  if s.batch_collectives:
    flags.append("collectives that move the batch: " + ", ".join(s.batch_collectives[:4]))
  if p.recompiles:
    flags.append("the step's output state differs from its input: it recompiles")
  inferred = [f"{n}={t}" for n, t, inf in s.loops if inf]
  out.append("  checks: " + ("; ".join(flags) if flags else "no f64, no host transfer"
                             + (", no collective moves the batch, no recompilation per "
                                "step" if p.recompiles is False else "")))
  if inferred:
    out.append("  loop trip counts read from loop conditions: " + ", ".join(inferred))
  pr = predict(p, target)
  if pr is not None:
    unit = "samples" if p.name.startswith("train") else "vectors"
    out.append(f"  roofline (prediction): {pr.t * 1e3:.3f} ms per call (compute "
               f"{pr.t_compute * 1e3:.3f}, memory {pr.t_memory * 1e3:.3f}, all-reduce "
               f"{pr.t_collective * 1e3:.3f}; {pr.bound}-bound), {pr.rows_per_s_chip:,.0f}"
               f" {unit}/s per chip, {pr.rows_per_s_target:,.0f} on {target.n_chips} chips,"
               f" {100 * pr.frac_bf16_peak:.0f}% of the bf16 peak")
    if p.name.startswith("train"):
      h = hours(RECIPE_SAMPLES, pr.rows_per_s_target)
      out.append(f"  the paper's recipe (71 x 10M samples): {h:.2f} h predicted")
    elif p.name.startswith("encode"):
      out.append(f"  1e9 vectors: {hours(ENCODE_VECTORS, pr.rows_per_s_target):.2f} h "
                 "predicted")
  return out
