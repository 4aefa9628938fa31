"""Codec throughput benchmark: encode/decode vectors per second, FLOPs and matmul peak.

Measures, in one run and on the default JAX device:
  * encode and decode throughput (vectors/s) of qinco2-S and qinco2-L at D=128, K=256,
    M=8, for the beam settings (A=16, B=32) and (A=32, B=64);
  * the FLOPs of one encoded / decoded vector, counted from the shapes
    (`encode_flops`, `decode_flops`), hence the achieved GFLOP/s;
  * the float32 matmul peak of the device (a large jitted `jnp.dot`), measured just
    before and just after each row so that both numbers see the same machine load;
  * what limits the encoder, at A=16, B=32: a per-step time breakdown (residual-block
    GEMMs, pre-selection, final selection, the rest) and the encode rate against the
    encoder chunk size;
  * faiss ResidualQuantizer (beam 32) encode throughput on the same vectors, for scale.

The networks are untrained (at initialisation): throughput does not depend on the
weights. Results are printed and written to docs/benchmarks.md, replacing only this
benchmark's section. Run by experiments/bench_codec.py (its docstring: usage).
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import math
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
from flax import nnx

import qinco_jax as qj
from qinco_jax import encode as enc
from qinco_jax.baselines import FaissQuantizer
from qinco_jax.bench.harness import (
  DOC,
  LONG_CALL,
  adaptive_rate,
  bracketed,
  decode_flops,
  encode_flops,
  interleaved_times,
  log,
  page_faults,
  tail_flops,
  timed,
  train_throughput,
  write_section,
)
from qinco_jax.config import flag

D = 128
MODELS = ("qinco2-S", "qinco2-L")
SETTINGS = ((16, 32), (32, 64))
BREAKDOWN_AB = (16, 32)
TRAIN_AB = (4, 4)  # the training beam of the CPU recipe
FAISS_BEAM = 32
PAGE = 4096  # bytes per page, for the page-fault column
DOC_START = "<!-- bench_codec:start -->"
DOC_END = "<!-- bench_codec:end -->"


def encode_rate(codec: qj.Codec, x: np.ndarray, A: int, B: int, chunk: int,
                target_s: float, repeats: int) -> tuple[float, int]:
  """Encode vectors/s of codec.encode at (A, B) with `chunk` vectors per call."""
  run = lambda n: codec.encode(x[:n], A=A, B=B, chunk_size=chunk, verbose=False)
  return adaptive_rate(run, chunk, target_s, len(x), repeats)


def decode_rate(codec: qj.Codec, codes: np.ndarray, chunk: int, target_s: float,
                repeats: int) -> tuple[float, int]:
  """Decode vectors/s of codec.decode with `chunk` vectors per call."""
  run = lambda n: codec.decode(codes[:n], chunk_size=chunk, verbose=False)
  return adaptive_rate(run, chunk, target_s, len(codes), repeats)


def faiss_rates(train: np.ndarray, x: np.ndarray, M: int, beam: int, target_s: float,
                repeats: int) -> dict[str, float]:
  """faiss ResidualQuantizer(D, M, 8) encode vectors/s with max_beam_size=beam.

  The codebooks are trained greedily (beam 1: training with a beam of 32 takes
  minutes on a small CPU) and the beam is set to `beam` for encoding; the encoding
  cost depends only on the shapes. Returns {"default": rate, "beam LUT": rate}, the
  second with `use_beam_LUT=1` (codeword inner-product tables).
  """
  rq = FaissQuantizer("RQ", x.shape[1], M, beam=1).train(train).faiss
  rq.max_beam_size = beam  # encode (faiss's own call, no packing) with the beam
  chunk = min(1024, len(x))
  run = lambda n: rq.compute_codes(np.ascontiguousarray(x[:n]))
  rates = {"default": adaptive_rate(run, chunk, target_s, len(x), repeats)[0]}
  rq.use_beam_LUT = 1
  rates["beam LUT"] = adaptive_rate(run, chunk, target_s, len(x), repeats)[0]
  return rates


# ------------------------------------------------------------------ breakdown
def xla_flops(jitted, *args) -> float:
  """XLA's own FLOP estimate of a jitted call (nan where the backend gives none)."""
  try:
    cost = jitted.lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"])
  except Exception:  # cost analysis is optional and backend-dependent
    return float("nan")


def looped(fn: Callable, n_iter: int) -> Callable:
  """jit of n_iter calls of fn(a, *rest) in a `lax.scan`, as the encoder runs its steps.

  Iteration i multiplies the float leaves of `a` (keep it small: weights, or the
  (N, D) targets) by one ** i, where `one` = 1.0 is a runtime argument: the values
  are unchanged but XLA cannot hoist the work out of the loop. fn's outputs are
  carried through the loop and returned, not reduced, so that no consumer fuses
  into fn's own kernels (XLA:CPU folds, e.g., a chain of GEMMs and its sum into one
  slow kernel). Buffers are allocated once per call and reused across iterations,
  as in the encoder.
  """
  def scale(v, f):
    return v * f.astype(v.dtype) if jnp.issubdtype(v.dtype, jnp.floating) else v

  @jax.jit
  def run(one, a, *rest):
    shapes = jax.eval_shape(fn, a, *rest)
    out = jax.tree.map(lambda t: jnp.zeros(t.shape, t.dtype), shapes)

    def body(_, i):
      f = one ** i
      return fn(jax.tree.map(lambda v: scale(v, f), a), *rest), None
    return jax.lax.scan(body, out, jnp.arange(n_iter, dtype=jnp.float32))[0]
  return functools.partial(run, jnp.float32(1.0))


def gemm_weights(net: enc.StepNet) -> list[jax.Array]:
  """The kernels `StepNet.tail` multiplies by: U_1, V_1, ..., U_L, V_L, P_out."""
  ws = [w for blk in net.blocks
        for w in (blk.up_proj.kernel[...], blk.down_proj.kernel[...])]
  return ws + ([net.out_proj.kernel[...]] if net.out_proj is not None else [])


def step_breakdown(codec: qj.Codec, A: int, B: int, chunk: int, n_iter: int,
                   repeats: int) -> dict[str, float]:
  """Seconds of one encoder network step on one chunk, and of its parts.

  Each part runs n_iter times in a scan (`looped`) at the shapes of
  `encode.network_step`; times are per iteration:
    step   the whole network_step (pre-selection, gathers, blocks, selection);
    gemms  only the matrix products of the residual blocks and P_out on the
           (chunk * B * A) candidate rows, chained, without relu or residual adds;
    pre    pre-selection distances (chunk, B, K) and their top-A;
    select the final scores over (chunk, B * A) and their top-B.
  Assumes a learned pre-selection codebook (A > 0, Ls = 0), as in the presets.
  """
  model = codec.model()
  if model.steps is None or model.codebooks is None or model.pre_codebooks is None:
    raise ValueError("step_breakdown needs network steps and a learned pre-selection "
                     f"codebook (M > 1, A > 0, Ls = 0); got {codec.cfg}")
  net_def, net_state = nnx.split(model.steps)
  st = jax.tree.map(lambda a: a[0], net_state)
  C, Cp = model.codebooks[...][0], model.pre_codebooks[...][0]
  E = codec.cfg.embed_dim(codec.d)
  keys = jax.random.split(jax.random.key(1), 4)
  x = jax.random.normal(keys[0], (chunk, codec.d))
  x_hat = 0.5 * jax.random.normal(keys[1], (chunk, B, codec.d))
  h0 = jax.random.normal(keys[2], (chunk * B * A, E))
  f = jax.random.normal(keys[3], (chunk, B, A, codec.d))
  valid = jnp.ones((chunk, B), bool)
  weights = gemm_weights(nnx.merge(net_def, st))

  def step(x, st, x_hat, valid, C, Cp):
    net = nnx.merge(net_def, st)
    return enc.network_step(x, x_hat, valid, C, Cp, net, None, A, B)

  def gemms(weights, h):
    for w in weights:
      h = h @ w
    return h

  def pre(x, x_hat, Cp):
    return jax.lax.top_k(-enc.sq_dists(x[:, None] - x_hat, Cp), A)

  def select(x, x_hat, f):
    dist = jnp.sum((x[:, None, None] - x_hat[:, :, None] - f) ** 2, -1)
    return jax.lax.top_k(-dist.reshape(chunk, -1), B)

  # weights are arguments, as in the encoder, never baked-in constants
  calls: dict[str, tuple[Callable, tuple]] = {
      "step": (step, (x, st, x_hat, valid, C, Cp)),
      "gemms": (gemms, (weights, h0)),
      "pre": (pre, (x, x_hat, Cp)),
      "select": (select, (x, x_hat, f)),
  }
  fns = {k: functools.partial(looped(fn, n_iter), *a) for k, (fn, a) in calls.items()}
  times = interleaved_times(fns, repeats)
  out = {k: t / n_iter for k, t in times.items()}
  out["xla_flops"] = xla_flops(jax.jit(step), *calls["step"][1])
  return out


# ------------------------------------------------------------------ the run
@dataclasses.dataclass
class Row:
  model: str
  A: int
  B: int
  enc_rate: float
  n_enc: int
  gflop_vec: float
  peak: float
  dec_rate: float | None = None
  dec_gflop_vec: float | None = None
  dtype: str = "float32"

  @property
  def gflops(self) -> float:
    return self.enc_rate * self.gflop_vec

  @property
  def pct_peak(self) -> float:
    return 100.0 * self.gflops / self.peak


def make_data(n_train: int, n: int) -> tuple[np.ndarray, np.ndarray]:
  """Synthetic D=128 vectors: a Gaussian mixture with anisotropic noise."""
  ds = qj.data.load_synthetic(n_train=n_train, n_db=n, n_queries=0, d=D, n_val=0)
  return np.asarray(ds.train), np.asarray(ds.db)


@dataclasses.dataclass(frozen=True)
class CodecBench:
  """What `run` measures (flags of experiments/bench_codec.py). None: derived."""
  quick: bool = flag(False, "smoke test: tiny chunks and timings, doc not written")
  models: tuple[str, ...] = MODELS
  n_train: int = flag(4000, "training vectors for the RQ initialisation and faiss")
  n_max: int = flag(32768, "most vectors timed per encode setting")
  target_s: float = flag(4.0, "seconds of work per timed repeat (at least one chunk)")
  repeats: int = flag(2, "timed repeats (median)")
  chunk: int | None = flag(None, "encoder chunk (default: the codec's, from enc_max_bs)")
  decode_chunk: int | None = flag(None, "decoder chunk (default: the codec's, 8192)")
  peak_n: int | None = flag(None, "matmul size for the peak (default 2048 on CPU, 8192 "
                            "otherwise)")
  sweep_models: tuple[str, ...] = flag(("qinco2-S",), "models whose encode rate is also "
                                       "measured per chunk size (none: no sweep)",
                                       empty_ok=True)
  sweep_chunks: tuple[int, ...] = (8, 16, 32, 128)
  breakdown_iters: int | None = flag(None, "network steps per timed call in the breakdown "
                                     "(default: as many as fit in ~target-s/4, at most M-1)")
  dtypes: tuple[str, ...] = flag(("float32", "bfloat16"), "compute dtypes of the step "
                                 "networks (QincoConfig.dtype)")
  train_steps: int = flag(30, "timed training steps per dtype (0: no training rows; "
                          "10 steps gave 0.99x-1.21x for bfloat16 in two runs)")
  train_batch: int = 1024
  breakdown: bool = flag(True, "time the encoder step's parts")
  faiss: bool = flag(True, "time faiss RQ beam 32 for scale")
  doc: str | None = flag(None, "markdown file to update (default docs/benchmarks.md; "
                         "'' = none)")

  def __post_init__(self):
    bad = set(self.dtypes) - {"float32", "bfloat16"}
    if bad:
      raise ValueError(f"dtypes: expected float32 and/or bfloat16, got {sorted(bad)}")

  def resolved(self) -> CodecBench:
    """The derived defaults filled in, and --quick's small sizes applied."""
    c = self
    if c.quick:
      c = dataclasses.replace(
          c, n_train=1000, n_max=64, target_s=0.2, repeats=1, chunk=c.chunk or 4,
          decode_chunk=c.decode_chunk or 256, peak_n=c.peak_n or 1024,
          sweep_chunks=(2, 4), train_steps=min(c.train_steps, 2), train_batch=256)
    if c.doc is None:
      c = dataclasses.replace(c, doc="" if c.quick else DOC)
    if c.peak_n is None:
      c = dataclasses.replace(c, peak_n=2048 if jax.devices()[0].platform == "cpu" else 8192)
    return c


def encode_rows(name: str, codec: qj.Codec, x: np.ndarray, args) -> list[Row]:
  """One table row per (dtype, A, B): encode rate, FLOPs and the matmul peak."""
  rows = []
  for dtype in args.dtypes:
    c = codec.with_dtype(dtype)
    for A, B in SETTINGS:
      chunk = args.chunk or c.chunk_size(A, B)
      (rate, n), peak = bracketed(
          lambda: encode_rate(c, x, A, B, chunk, args.target_s, args.repeats),
          args.peak_n)
      flops = encode_flops(c.cfg, c.d, A, B, chunk) / 1e9
      rows.append(Row(name, A, B, rate, n, flops, peak, dtype=dtype))
      log(f"{name} {dtype} A={A} B={B}: encode {rate:.1f} vec/s on {n} vectors, "
          f"{rows[-1].gflops:.1f} GFLOP/s = {rows[-1].pct_peak:.0f}% of {peak:.0f}")
  return rows


def decode_throughput(name: str, codec: qj.Codec, args) -> float:
  """Decode vectors/s on random codes (the cost does not depend on them)."""
  chunk = args.decode_chunk or qj.codec.DECODE_CHUNK
  n = max(4 * args.n_max, chunk)
  codes = np.random.default_rng(0).integers(0, codec.K, (n, codec.M), dtype=np.int32)
  rate, _ = decode_rate(codec, codes, chunk, args.target_s / 2, args.repeats)
  log(f"{name}: decode {rate:.0f} vec/s")
  return rate


def breakdown(name: str, codec: qj.Codec, enc_rate: float, args) -> dict[str, float]:
  """`step_breakdown` at BREAKDOWN_AB, plus GFLOP/s of the blocks and bare GEMMs.

  enc_rate (vectors/s at BREAKDOWN_AB) sizes the steps per timed call.
  """
  A, B = BREAKDOWN_AB
  chunk = args.chunk or codec.chunk_size(A, B)
  n_iter = args.breakdown_iters
  if n_iter is None:
    step_s = chunk / enc_rate / (codec.M - 1)
    n_iter = int(np.clip(round(args.target_s / 4 / step_s), 1, codec.M - 1))
  brk, peak = bracketed(lambda: step_breakdown(
      codec, A, B, chunk, n_iter, args.repeats), args.peak_n)
  ours = encode_flops(codec.cfg, codec.d, A, B, chunk) - 2 * codec.K * codec.d
  ours_step = ours * chunk / (codec.M - 1)
  gemm_flops = tail_flops(codec.cfg, codec.d, chunk * B * A)
  brk.update(peak=peak, chunk=chunk, n_iter=n_iter,
             xla_ratio=brk["xla_flops"] / ours_step,
             gemm_gflops=gemm_flops / brk["gemms"] / 1e9,
             step_gflops=ours_step / brk["step"] / 1e9)
  log(f"{name}: step breakdown " + ", ".join(
      f"{k} {brk[k] * 1e3:.1f} ms" for k in ("step", "gemms", "pre", "select")))
  return brk


def chunk_sweep(name: str, codec: qj.Codec, x: np.ndarray, args) -> dict:
  """Encode rate at BREAKDOWN_AB for each chunk size, interleaved over repeats."""
  A, B = BREAKDOWN_AB
  chunks = sorted(set(args.sweep_chunks))
  default = codec.chunk_size(A, B)
  big = max(chunks)
  run = lambda c, n: codec.encode(x[:n], A=A, B=B, chunk_size=c, verbose=False)

  def sweep():
    lcm = math.lcm(*chunks)
    t1 = timed(lambda: run(big, big))
    units = round(args.target_s * big / max(t1, 1e-9) / lcm)
    n = lcm * int(np.clip(units, 1, max(1, len(x) // lcm)))
    times = interleaved_times({c: functools.partial(run, c, n) for c in chunks},
                              args.repeats)
    faults = {c: page_faults(functools.partial(run, c, c)) for c in chunks}
    return {c: n / t for c, t in times.items()}, faults

  (rates, faults), peak = bracketed(sweep, args.peak_n)
  gflop = {c: encode_flops(codec.cfg, codec.d, A, B, c) / 1e9 for c in chunks}
  log(f"{name}: chunk sweep " + ", ".join(f"{c}: {r:.1f}" for c, r in rates.items()))
  return {"rates": rates, "gflop": gflop, "peak": peak, "default": default,
          "faults": faults}


def bench_model(name: str, train: np.ndarray, x: np.ndarray, args):
  """All measurements of one model: rows, step breakdown (or {}), chunk sweep (or {})."""
  codec = qj.Codec.create(qj.preset(name), train, verbose=False)
  log(f"{name}: created ({codec.num_params:,} parameters)")
  rows = encode_rows(name, codec, x, args)
  dec = {t: decode_throughput(f"{name} {t}", codec.with_dtype(t), args) for t in args.dtypes}
  for r in rows:
    r.dec_rate = dec[r.dtype]
    r.dec_gflop_vec = decode_flops(codec.cfg, codec.d) / 1e9
  rate = next((r.enc_rate for r in rows if (r.A, r.B) == BREAKDOWN_AB
               and r.dtype == codec.cfg.dtype), None)
  brk = {} if not args.breakdown or rate is None else breakdown(name, codec, rate, args)
  sweep = chunk_sweep(name, codec, x, args) if name in args.sweep_models else {}
  return rows, brk, sweep


# ------------------------------------------------------------------ report
def environment() -> dict[str, str]:
  dev = jax.devices()[0]
  return {
      "date": datetime.date.today().isoformat(),
      "jax": f"jax {jax.__version__}, jaxlib {jaxlib.__version__}",
      "device": f"{dev.device_kind} ({dev.platform}, {jax.device_count()} device(s))",
      "cpus": str(os.cpu_count()),
  }


def _fmt_rate(v: float | None) -> str:
  if v is None:
    return "-"
  return f"{v:,.0f}" if v >= 100 else f"{v:.2f}" if v < 10 else f"{v:.1f}"


def results_table(rows: list[Row], faiss: dict[str, float]) -> str:
  head = ("| model | dtype | A | B | encode vec/s | GFLOP/vec | GFLOP/s | matmul peak "
          "GFLOP/s | % of peak | decode vec/s | decode GFLOP/s | encode / faiss RQ |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|\n")
  lines = []
  for r in rows:
    ratio = f"{r.enc_rate / faiss['default']:.3g}x" if faiss else "-"
    lines.append(f"| {r.model} | {r.dtype} | {r.A} | {r.B} | {_fmt_rate(r.enc_rate)} | "
                 f"{r.gflop_vec:.3g} | {r.gflops:.0f} | {r.peak:.0f} | "
                 f"{r.pct_peak:.0f}% | {_fmt_rate(r.dec_rate)} | "
                 f"{(r.dec_rate or 0) * (r.dec_gflop_vec or 0):.0f} | {ratio} |")
  for label, rate in faiss.items():
    lines.append(f"| faiss RQ, {label} | float32 | - | {FAISS_BEAM} | {_fmt_rate(rate)} | "
                 f"- | - | - | - | - | - | {rate / faiss['default']:.3g}x |")
  return head + "\n".join(lines) + "\n"


def train_rows(train: np.ndarray, args) -> list[dict]:
  """Training-step throughput of a qinco2-S codec at A=4, B=4 (the CPU recipe), per
  compute dtype, on the same training vectors."""
  out = []
  for dtype in args.dtypes if args.train_steps else ():
    cfg = qj.preset("qinco2-S", A=TRAIN_AB[0], B=TRAIN_AB[1], dtype=dtype)
    out.append(train_throughput(cfg, train, args.train_batch, args.train_steps))
    log(f"qinco2-S {dtype}: training {out[-1]['samples_s']:.0f} samples/s")
  return out


def train_table(rows: list[dict]) -> str:
  if not rows:
    return "(not run)\n"
  head = ("| model | dtype | A | B | batch | samples/s | samples per CPU-second "
          "| GFLOP/s | vs float32 |\n|---|---|---|---|---|---|---|---|---|\n")
  f32 = next((r["samples_s"] for r in rows if r["dtype"] == "float32"), None)
  lines = [f"| qinco2-S ({r['model']}) | {r['dtype']} | {r['A']} | {r['B']} | "
           f"{r['batch']} | {r['samples_s']:,.0f} | {r['samples_per_cpu_s']:,.0f} | "
           f"{r['gflops']:.0f} | "
           + (f"{r['samples_s'] / f32:.2f}x |" if f32 else "- |") for r in rows]
  return head + "\n".join(lines) + "\n"


def breakdown_table(brks: dict[str, dict]) -> str:
  head = ("| model | chunk | steps per call | one step (ms) | GEMMs only | pre-selection "
          "(dists + top-A) | final scores + top-B | rest (relu, adds, gathers) "
          "| step: GFLOP/s (% of peak) | GEMMs only: GFLOP/s (% of peak) |\n"
          "|---|---|---|---|---|---|---|---|---|---|\n")
  lines = []
  for name, b in brks.items():
    pct = lambda v: f"{v * 1e3:.1f} ms ({100 * v / b['step']:.0f}%)"
    rest = max(b["step"] - b["gemms"] - b["pre"] - b["select"], 0.0)
    eff = lambda g: f"{g:.0f} ({100 * g / b['peak']:.0f}%)"
    lines.append(f"| {name} | {b['chunk']} | {b['n_iter']} | {b['step'] * 1e3:.1f} | "
                 f"{pct(b['gemms'])} | {pct(b['pre'])} | {pct(b['select'])} | "
                 f"{pct(rest)} | {eff(b['step_gflops'])} | {eff(b['gemm_gflops'])} |")
  return head + "\n".join(lines) + "\n"


def sweep_table(sweeps: dict[str, dict]) -> str:
  head = ("| model | chunk (vectors per call) | rows per GEMM | encode vec/s "
          "| % of peak | fresh memory per call (minor page faults) |\n"
          "|---|---|---|---|---|---|\n")
  lines = []
  A, B = BREAKDOWN_AB
  for name, sw in sweeps.items():
    for c, rate in sw["rates"].items():
      mark = " (default)" if c == sw["default"] else ""
      f = sw["faults"][c]
      mem = "-" if f is None else f"{f * PAGE / 2**20:,.0f} MiB ({f:,})"
      lines.append(f"| {name} | {c}{mark} | {c * A * B:,} | {_fmt_rate(rate)} | "
                   f"{100 * rate * sw['gflop'][c] / sw['peak']:.0f}% | {mem} |")
  return head + "\n".join(lines) + "\n"


def print_report(env, rows, faiss, brks, sweeps, trains, command):
  print(f"\n{command}\n{env['date']} | {env['jax']} | {env['device']} | "
        f"{env['cpus']} CPUs")
  print(results_table(rows, faiss))
  if brks:
    print(f"Encoder network step at A={BREAKDOWN_AB[0]}, B={BREAKDOWN_AB[1]}:")
    print(breakdown_table(brks))
  if sweeps:
    print(f"Encoder chunk size at A={BREAKDOWN_AB[0]}, B={BREAKDOWN_AB[1]}:")
    print(sweep_table(sweeps))
  print(f"Training step at A={TRAIN_AB[0]}, B={TRAIN_AB[1]}:")
  print(train_table(trains))
  print(analysis_text(rows, brks, sweeps))


DOC_TEXT = """\
Encode and decode throughput of untrained qinco2-S and qinco2-L codecs (networks at
initialisation: the work does not depend on the weights) on synthetic D=128 vectors
(a Gaussian mixture), K=256, M=8, with the codec's default chunking, for each compute
dtype of the step networks (`QincoConfig.dtype`; "bfloat16": bfloat16 matmul operands,
float32 accumulation, everything else float32, spec 9.9).

    {command}

{date} | {jax} | {device} | {cpus} CPUs.
Timings are medians of {repeats} repeats after a compile/warm-up call (one timing
where a single chunk takes over {long_s:.0f} s, as for qinco2-L on CPU). The machine
may be shared with other jobs, so absolute numbers are noisy: rely on the ratios.
The matmul peak (a jitted {peak_n}x{peak_n} float32 `jnp.dot`, same default
precision as the codec) is measured just before and just after each row and
averaged; "% of peak" compares the row's encode GFLOP/s with it. Decoding uses
random codes (its cost does not depend on them).

{table}
faiss: `faiss.ResidualQuantizer(128, 8, 8)` with `max_beam_size={beam}`, codebooks
trained on the same {n_train} training vectors (greedily: the encoding cost depends
only on the shapes), timing `rq.compute_codes` with faiss's own threads; "beam LUT"
sets `use_beam_LUT=1` (codeword inner-product tables, same codes, faster).

**FLOPs per vector** (`encode_flops`, `decode_flops`): with A_eff = A (or K when
A = 0), E the embedding width, H the hidden width, L blocks and n_c vectors per
encoder chunk, encoding costs

    2KD + (M-1) [ 2BKD                                   pre-selection (A > 0)
                + B A_eff (L 2(2EH) + [E!=D] 2ED + 3D)  candidates: blocks, P_out, score
                + 2BDE                                   x_hat half of the first layer
                + K([E!=D] 2DE + 2E^2) / n_c ]           codeword table, once per chunk

(the encoder always keeps B beam slots after step 0), and decoding
(M-1) ([E!=D] 2DE + 2(E+D)E + L 2(2EH) + [E!=D] 2ED). Only multiply-adds and the
score are counted; relu, residual adds and gathers are not.

**Where the encoder's time goes.** One network step on one chunk at A={bA}, B={bB}.
Each part is jitted alone at the encoder's shapes and run for a few dependent
iterations in a `lax.scan` (as the encoder runs its steps), timed per iteration.
"GEMMs only" chains just the matrix products of the residual blocks and P_out on the
chunk x B x A candidate rows (no relu, no residual adds); "rest" is the step minus
the measured parts. Parts are timed separately, so the shares are approximate:

{breakdown}
Encode rate against the encoder chunk (`codec.encode(..., chunk_size=c)`; the
default comes from `enc_max_bs` = 65,536 candidate rows per call, capped on CPU at
`CPU_ENC_ROWS` = 8,192):

{sweep}
Training-step throughput (`trainer.make_step`, jitted, {steps} steps after 3
warm-up steps) of a qinco2-S codec at A={tA}, B={tB}, batch {batch}, on the same
synthetic training vectors, per compute dtype:

{train}
{analysis}
"""


def _share(b: dict, key: str) -> float:
  """Percent of a network step spent in part `key` (parts are timed separately)."""
  return min(100.0, 100 * b[key] / b["step"])


def _goal_sentence(row: Row, b: dict) -> str:
  verdict = "meets" if row.pct_peak >= 40 else "misses"
  other = max(("pre", "select"), key=lambda k: b[k])
  what = {"pre": f"pre-selection (mostly its top-{row.A} of K)",
          "select": f"the final top-{row.B}"}[other]
  rest = 100 - min(100.0, _share(b, "gemms") + _share(b, "pre") + _share(b, "select"))
  return (f"- {row.model}, A={row.A}, B={row.B}: {row.pct_peak:.0f}% of the matmul "
          f"peak, so it {verdict} the 40% goal. Its GEMMs alone take "
          f"{_share(b, 'gemms'):.0f}% of a step and run at "
          f"{100 * b['gemm_gflops'] / b['peak']:.0f}% of the peak; {what} takes "
          f"{_share(b, other):.1f}%, and relu, residual adds, gathers and scores about "
          f"{rest:.0f}%.")


def _sweep_sentence(name: str, sw: dict) -> str | None:
  rates, default, faults = sw["rates"], sw["default"], sw["faults"]
  best = max(rates, key=rates.get)
  if default not in rates or best == default:
    return None
  rows = best * BREAKDOWN_AB[0] * BREAKDOWN_AB[1]
  why = ("the (rows x H) block activations stay nearer the cache, so the GEMMs and "
         "the relu/residual passes over their outputs wait less on memory")
  if faults.get(default) and faults.get(best) is not None:
    why = (f"a default call touches {faults[default] * PAGE / 2**20:,.0f} MiB of fresh "
           f"memory ({faults[default]:,} page faults) against "
           f"{faults[best] * PAGE / 2**20:,.0f} MiB, and " + why)
  return (f"- {name}: a chunk of {best} vectors ({rows:,} candidate rows per GEMM) "
          f"encodes {rates[best] / rates[default]:.2f}x as fast as the default "
          f"{default}, with the same FLOPs: {why}.")


def analysis_text(rows: list[Row], brks: dict[str, dict], sweeps: dict[str, dict]) -> str:
  """What limits the encoder, in sentences derived from this run's measurements."""
  out = []
  for name, b in brks.items():
    row = next((r for r in rows if r.model == name and (r.A, r.B) == BREAKDOWN_AB
                and r.dtype == "float32"), None)
    if row is not None:
      out.append(_goal_sentence(row, b))
  out += [t for t in (_sweep_sentence(n, sw) for n, sw in sweeps.items()) if t]
  by = {(r.model, r.A, r.B, r.dtype): r.enc_rate for r in rows}
  bf = [(m, A, B, by[(m, A, B, "bfloat16")] / v) for (m, A, B, t), v in by.items()
        if t == "float32" and (m, A, B, "bfloat16") in by]
  if bf:
    out.append("- bfloat16 against float32 encoding on this device: " + ", ".join(
        f"{m} A={A}, B={B} {r:.2f}x" for m, A, B, r in bf) + ".")
  ratios = [b["xla_ratio"] for b in brks.values() if math.isfinite(b["xla_ratio"])]
  if ratios:
    out.append(
        "- FLOP count check: XLA's cost analysis of one compiled network step gives "
        + (f"{min(ratios):.3f}x" if f"{min(ratios):.3f}" == f"{max(ratios):.3f}" else
           f"{min(ratios):.3f}x to {max(ratios):.3f}x")
        + " our count (it also counts the elementwise work).")
  if brks:
    share = [_share(b, "gemms") for b in brks.values()]
    eff = [100 * b["gemm_gflops"] / b["peak"] for b in brks.values()]
    rng = lambda v: f"{min(v):.0f}%" if round(min(v)) == round(max(v)) else \
        f"{min(v):.0f}-{max(v):.0f}%"
    out.append(
        f"- In short: the GEMMs of the residual blocks take {rng(share)} of the "
        "encoder's time, so they bound it. At these tall, skinny shapes (tens of "
        "thousands of candidate rows against inner widths E, H of 128 to 384) they "
        f"reach {rng(eff)} of the square-matmul peak, which is the ceiling for the "
        "whole encoder; relu and residual-add passes, gathers, scores and top-k share "
        "the rest.")
  return "\n".join(out)


def write_doc(args, env, rows, faiss, brks, sweeps, trains, command):
  section = "## Codec throughput (experiments/bench_codec.py)\n\n" + DOC_TEXT.format(
      command=command, repeats=args.repeats, long_s=LONG_CALL * args.target_s,
      peak_n=args.peak_n, beam=FAISS_BEAM,
      n_train=args.n_train, table=results_table(rows, faiss), bA=BREAKDOWN_AB[0],
      bB=BREAKDOWN_AB[1], breakdown=breakdown_table(brks) if brks else "(not run)\n",
      sweep=sweep_table(sweeps) if sweeps else "(not run)\n",
      train=train_table(trains), tA=TRAIN_AB[0], tB=TRAIN_AB[1], batch=args.train_batch,
      steps=args.train_steps, analysis=analysis_text(rows, brks, sweeps), **env)
  write_section(args.doc, f"{DOC_START}\n{section.rstrip()}\n{DOC_END}", DOC_START,
                DOC_END)
  log(f"wrote {os.path.relpath(args.doc)}")


def run(cfg: CodecBench, command: str) -> None:
  """Measures what `cfg` names, prints the report and writes the doc section."""
  args = cfg.resolved()
  env = environment()
  log(f"{env['device']}, {env['cpus']} CPUs, {env['jax']}")
  train, x = make_data(args.n_train, args.n_max)
  rows, brks, sweeps = [], {}, {}
  for name in args.models:
    r, b, sw = bench_model(name, train, x, args)
    rows += r
    if b:
      brks[name] = b
    if sw:
      sweeps[name] = sw
  faiss = {}
  if args.faiss:
    faiss = faiss_rates(train, x, 8, FAISS_BEAM, args.target_s, args.repeats)
    for k, v in faiss.items():
      log(f"faiss RQ beam {FAISS_BEAM} ({k}): {v:.0f} vec/s")
  trains = train_rows(train, args)
  print_report(env, rows, faiss, brks, sweeps, trains, command)
  if args.doc:
    write_doc(args, env, rows, faiss, brks, sweeps, trains, command)
