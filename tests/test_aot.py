"""Ahead-of-time compiles for TPU slices and GPU hosts (`qinco_jax.aot`, `qinco-compile`).

The compilers for hardware this machine lacks (libtpu, JAX's CUDA plugin) are installed
once into the cache folder (`plugins.install`), never into the test environment, and
used by `qinco-compile` in a child process. The compiled programs are the real training
step, encoder and decoder; their matmul FLOPs are checked against the FLOP model, and
the FLOP reader itself against hand counts and a CPU compile.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import qinco_jax as qj
from qinco_jax import flops, train, trainer
from qinco_jax.aot import compile as aot
from qinco_jax.aot import hlo, job, plugins, targets
from qinco_jax.model import abstract_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--config=synthetic_tiny", "--d=32", "--beams=4/4", "--no-max_batch",
        "--batch_per_chip=64"]


def _qinco_compile(tmp_path, *flags, ok=True):
  """Runs `python -m qinco_jax.aot FLAGS` (= qinco-compile); returns (result JSON or
  None, completed process)."""
  out = tmp_path / "out.json"
  env = {**os.environ, "PYTHONPATH": ROOT}
  r = subprocess.run([sys.executable, "-m", "qinco_jax.aot", *flags, f"--json={out}"],
                     cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1800)
  if ok:
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return json.loads(out.read_text()), r
  return None, r


@pytest.fixture(scope="module")
def tpu():
  return plugins.install("tpu", verbose=False)  # once per machine (cached)


@pytest.fixture(scope="module")
def gpu():
  return plugins.install("gpu", verbose=False)


def _check_data_parallel_step(r, prog):
  """The training step as a data-parallel step must be: it fits, its matmuls are the
  FLOP model's, and it moves the gradient (float32) and nothing that holds the batch."""
  assert prog["fits"] and 0 < prog["memory"]["total"] < r["chip"]["hbm_bytes"]
  assert abs(prog["hlo_flops"] / prog["analytic_flops"] - 1) < 0.10
  coll = prog["stats"]["collectives"]
  assert "all-reduce" in coll and prog["stats"]["batch_collectives"] == [], coll
  if r["slices"] == 1:
    assert set(coll) == {"all-reduce"}, coll
  else:  # across slices the gradient all-reduce is split: a part over the data-centre
    # network, in-slice gathers of the reduced parts
    assert "dcn-all-reduce" in coll, coll
    assert set(coll) <= {"all-reduce", "dcn-all-reduce", "all-gather", "reduce-scatter"}
    assert coll["dcn-all-reduce"][1] <= 2 * r["param_bytes"] + 4096
  dtypes = prog["stats"]["collective_dtypes"]
  # The gradient all-reduce, in float32: about the parameters' size (the compiler may
  # reduce a smaller gradient before a replicated matmul, e.g. a codeword table's of
  # width E < D, and adds the batch statistics).
  assert 0.5 * r["param_bytes"] <= dtypes["all-reduce f32"] <= 2 * r["param_bytes"] + 4096
  assert not any("bf16" in k for k in dtypes), dtypes
  assert not prog["stats"]["f64"] and not prog["stats"]["host_transfers"]
  assert prog["recompiles"] is False


def test_tpu_slice_compiles_the_train_step_encoder_and_decoder(tpu, tmp_path):
  r, _ = _qinco_compile(tmp_path, *TINY, "--target=v5e:2x2")
  assert r["chips"] == 4 and r["hosts"] == 1
  train_p, enc, dec = r["programs"]
  assert train_p["name"].startswith("train") and train_p["rows"] == 64
  _check_data_parallel_step(r, train_p)
  for p in (enc, dec):  # one host's chips split the chunk: no collective at all
    assert p["fits"] and p["memory"]["total"] < r["chip"]["hbm_bytes"]
    assert p["stats"]["collectives"] == {}
    assert abs(p["hlo_flops"] / p["analytic_flops"] - 1) < 0.10
  assert enc["prediction"]["rows_per_s_chip"] > 0


def test_multi_slice_and_multi_host_targets_build_the_run_mesh(tpu, gpu, tmp_path):
  r, _ = _qinco_compile(tmp_path, *TINY, "--target=v5e:2x2", "--slices=2",
                        "--what=train")
  assert r["chips"] == 8 and r["hosts"] == 2 and r["slices"] == 2
  # Slice by slice along "data" (a hybrid mesh): one crossing of the slow network.
  assert [s for _, s in r["train_mesh"]] == [0] * 4 + [1] * 4
  _check_data_parallel_step(r, r["programs"][0])
  g, _ = _qinco_compile(tmp_path, *TINY, "--target=h100x2", "--hosts=2", "--what=train")
  assert g["chips"] == 4 and g["hosts"] == 2
  p = g["programs"][0]
  _check_data_parallel_step(g, p)
  assert p["usable_bytes"] == int(0.75 * g["chip"]["hbm_bytes"])  # JAX's GPU default
  assert p["xla_flops"] is None  # no cost analysis on GPU: the HLO count stands alone


def test_bad_targets_and_batches_fail_in_one_line(tmp_path, monkeypatch, capsys):
  for flags, expect in (
      (["--target=v7x-8"], "unknown target"),
      (["--target=v5p-12"], "no such v5p slice"),
      (["--target=h100x8", "--slices=2"], "--slices is for TPU"),
      (["--target=v5e:2x2", "--global_batch=10"], "does not divide over the 4 chips"),
      (["--config=qinco9"], "no such config"),
      (["--beams=16-32"], "A/B pairs"),
      (["--batch_per_chip=0"], "batch_per_chip must be >= 1"),
      (["--enc_max_bs=-4"], "enc_max_bs must be >= 0")):
    with pytest.raises(SystemExit) as e:
      job.main(flags)
    said = (str(e.value.code) if isinstance(e.value.code, str) else "") + capsys.readouterr().err
    lines = [x for x in said.strip().splitlines() if x.strip()]
    assert e.value.code != 0 and len(lines) == 1 and expect in lines[0], said
  # A target whose compiler is not installed: one line saying how to install it.
  monkeypatch.setenv("QINCO_JAX_CACHE", str(tmp_path / "empty-cache"))
  monkeypatch.setattr(plugins, "importable", lambda kind: False)
  with pytest.raises(SystemExit) as e:
    job.main(["--target=v6e-256"])
  assert "--install_plugin=tpu" in str(e.value) and "\n" not in str(e.value)


def test_target_names():
  t = targets.parse("v5p-128")
  assert (t.chip.name, t.topology, t.n_chips, t.chips_per_host) == ("v5p", "4x4x4", 64, 4)
  assert targets.parse("v5p:4x4x4") == t
  assert targets.parse("v5e-16").topology == "4x4" and targets.parse("v6e-256").n_chips == 256
  g = targets.parse("h200x8", hosts=4)
  assert (g.n_chips, g.chips_per_host, g.chip.hbm_bytes) == (32, 8, 141 * 10**9)
  assert targets.parse("v5p-128", slices=2).n_chips == 128


# ------------------------------------------------------------------ the FLOP reader
def test_hlo_flops_count_loop_bodies_by_their_trip_count():
  """A scan of 7 matmuls: XLA's cost analysis counts its body once; ours counts it 7
  times, as the hand count does."""
  w = jnp.ones((7, 48, 40), jnp.float32)

  def f(x, w):
    def body(h, wi):
      return jnp.tanh(h @ wi @ wi.T), None
    return jax.lax.scan(body, x, w)[0]

  x = jnp.ones((32, 48), jnp.float32)
  compiled = jax.jit(f).lower(x, w).compile()
  s = hlo.analyse(compiled.as_text())
  hand = 7 * (2 * 32 * 48 * 40 + 2 * 32 * 40 * 48)
  assert s.matmul_flops == hand
  assert [t for _, t, _ in s.loops] == [7]
  assert compiled.cost_analysis()["flops"] < 0.3 * hand  # the body once (+ tanh)


def test_hlo_convolution_flops_skip_padding_taps():
  """TPU writes a batched dot (batch dims 4 x 4) as a convolution with a 4 x 4 window
  and padding 3: each output reads one tap, so the FLOPs are those of the dot."""
  text = """HloModule m, entry_computation_layout={()->f32[512,4,4,16]}

ENTRY %main (a: bf16[16,16,1,1], b: bf16[512,4,4,16]) -> f32[512,4,4,16] {
  %a = bf16[16,16,1,1]{0,1,3,2} parameter(0)
  %b = bf16[512,4,4,16]{0,3,2,1} parameter(1)
  ROOT %c = f32[512,4,4,16]{0,3,2,1} convolution(%a, %b), WINDOW, dim_labels=fb01_o01i->f01b
}
""".replace("WINDOW", "window={size=4x4 pad=3_3x3_3 rhs_reversal=1x1}")
  s = hlo.analyse(text)
  # the dot: out (512 x 4 x 4 x 16) elements, each a sum over f = 16 products
  assert s.matmul_flops == 2 * 512 * 4 * 4 * 16 * 16
  assert s.matmul_dtypes == {"bf16": s.matmul_flops}


def test_flop_model_matches_the_compiled_cpu_training_step():
  """The FLOP model (`flops.train_flops`) against the matmuls of the real training
  step compiled for this machine's two CPU devices, loops counted by trip count."""
  cfg = qj.preset("qinco2-S", K=32, M=4, L=2, de=24, dh=40, A=4, B=3)
  d, per_device = 20, 64
  mesh = trainer.data_mesh()
  replicated, batch_sharding = trainer.shardings(mesh)
  graphdef, state = nnx.split(abstract_model(cfg, d))
  tx = train.make_optimizer(train.TrainConfig(batch_per_device=per_device), 100)
  st = jax.eval_shape(lambda s: train.init_state(graphdef, s, tx), state)
  st = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated),
                    st)
  batch = jax.ShapeDtypeStruct((per_device * mesh.size, d), jnp.float32,
                               sharding=batch_sharding)
  compiled = train.make_train_step(graphdef, tx, cfg.A, cfg.B).lower(st, batch).compile()
  s = hlo.analyse(compiled.as_text())
  ratio = s.matmul_flops / (flops.train_flops(cfg, d, per_device) * per_device)
  assert abs(ratio - 1) < 0.02, ratio
  assert sorted(t for _, t, _ in s.loops) == [3, 3, 3]  # M - 1 network steps, 3 scans


def test_largest_batch_search_finds_the_memory_limit():
  """`max_batch` against a known linear memory model: the answer is the largest
  multiple of 8 whose memory fits (closed form), within the search's tolerance."""
  def program(usable, fixed, per_row):
    def at(b):
      total = fixed + per_row * b
      return aot.Program("train", b, total <= usable, {"total": int(total)}, usable,
                         0.0, None, None, None, 0.0)
    return at

  for usable, fixed, per_row in ((16e9, 1e8, 1.3e6), (95e9, 2e9, 7e6), (4e9, 3e8, 9e5)):
    exact = int((usable - fixed) // per_row) // 8 * 8
    best, seen = aot.max_batch(program(usable, fixed, per_row), 1024)
    assert 0.90 * exact <= best <= exact and best % 8 == 0, (best, exact)
    assert len({p.rows for p in seen}) == len(seen) <= 6  # no batch compiled twice
  best, _ = aot.max_batch(program(1e9, 2e9, 1.0), 1024)  # nothing fits
  assert best == 0

  def flat(usable, at_most):  # memory that does not grow with the batch (first points)
    def at(b):
      total = 6e8 - 1e4 * min(b, 2048) + (0 if b <= at_most else 2 * usable)
      return aot.Program("train", b, total <= usable, {"total": int(total)}, usable,
                         0.0, None, None, None, 0.0)
    return at

  best, seen = aot.max_batch(flat(56e9, 10**9), 1024)  # everything fits: the cap
  assert best == 64 * 1024 and len(seen) <= 8
  best, _ = aot.max_batch(flat(56e9, 20_000), 1024)  # fits up to 20,000 rows
  assert 0.90 * 20_000 <= best <= 20_000 and best % 8 == 0, best


def test_param_bytes_counts_the_trainable_arrays():
  cfg = qj.preset("qinco2-S", K=32, M=3, L=1, de=8, dh=16, A=4, B=2)
  d, E, H = 12, 8, 16
  net = d * E + E * d + (E + d) * E + E + cfg.L * 2 * E * H  # P_in, P_out, concat, blocks
  codebooks = cfg.K * d * (1 + 2 * (cfg.M - 1))  # C_0, C_1..C_{M-1}, C'_1..C'_{M-1}
  assert aot.param_bytes(cfg, d) == 4 * ((cfg.M - 1) * net + codebooks)


def test_roofline_prediction_by_hand():
  """`report.predict` against the formula worked by hand from the chip table: compute
  and memory time, the all-reduce over the chip links, and on several GPU hosts over
  each GPU's 400 Gbit/s port (50 GB/s), which then bounds it."""
  from qinco_jax.aot import report
  stats = hlo.HloStats(matmul_flops=2e12, hbm_bytes=1e9,
                       collectives={"all-reduce": (17, 1e8)}, f64=False, host_transfers=[],
                       loops=[], matmul_dtypes={"bf16": 2e12}, collective_dtypes={},
                       batch_collectives=[])
  prog = aot.Program("train", 1024, True, {"total": 1}, 1, 2e12, stats, None, None, 0.0)
  one = report.predict(prog, targets.parse("h100x8"))
  t_compute, t_memory = 2e12 / 989.4e12, 1e9 / 3.35e12
  t_links = 4 * 1e8 / 900e9
  assert one.t_compute == pytest.approx(t_compute) and one.t_memory == pytest.approx(t_memory)
  assert one.t_collective == pytest.approx(t_links)
  assert one.rows_per_s_chip == pytest.approx(1024 / (t_compute + t_links))
  four = report.predict(prog, targets.parse("h100x8", hosts=4))
  assert four.t_collective == pytest.approx(2 * 1e8 / 50e9)  # the port, not NVLink
  assert four.rows_per_s_target == pytest.approx(32 * 1024 / (t_compute + 2 * 1e8 / 50e9))
