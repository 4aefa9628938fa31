"""Several real processes on 127.0.0.1 (jax.distributed + gloo CPU collectives).

Each test starts the command-line scripts as 2 processes x 1 CPU device and compares
them with 1 process x 2 devices (the same global batch), which the rest of the suite
already checks against the single-device step.
"""

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import jax
import numpy as np
import pytest

import qinco_jax as qj
from qinco_jax import distributed, trainer
from qinco_jax.search import shards

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENTS = os.path.join(ROOT, "experiments")
TRAIN = os.path.join(EXPERIMENTS, "train_bigann.py")
TINY = "--config=synthetic_tiny"

# Runs a script; with QINCO_TEST_DIE_AFTER=i:name, process i kills itself (SIGKILL)
# right after passing barrier `name`: a kill -9 at a known point of the run.
_DRIVER = textwrap.dedent("""
    import os, runpy, signal, sys
    from qinco_jax import distributed
    who, _, die = os.environ.get("QINCO_TEST_DIE_AFTER", "").partition(":")
    if f"--process_id={who}" in sys.argv:
      barrier = distributed.barrier
      def barrier_then_die(name, *a, **k):
        barrier(name, *a, **k)
        if name == die:
          os.kill(os.getpid(), signal.SIGKILL)
      distributed.barrier = barrier_then_die
    script, sys.argv = sys.argv[1], sys.argv[1:]
    runpy.run_path(script, run_name="__main__")
""")


def _launch(script, args, n_procs, *, die="", timeout=900):
  """Runs `script args` as n_procs processes x 1 CPU device of one job (1 process: 2
  devices). Returns [(rc, stdout, stderr, seconds until it exited)] per process.
  die: "i:barrier" for QINCO_TEST_DIE_AFTER. timeout: a guard against a hung job (a
  deadlock fails the test instead of blocking the suite), not a speed check."""
  env = {k: v for k, v in os.environ.items()
         if not k.startswith("JAX_") or k == "JAX_NUMPY_RANK_PROMOTION"}
  env.update(JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, QINCO_TEST_DIE_AFTER=die)
  t0 = time.monotonic()
  procs = distributed.launch_local(
      [sys.executable, "-c", _DRIVER, script, *args], n_procs,
      devices_per_process=1 if n_procs > 1 else 2, env=env, stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True)
  results = [None] * n_procs

  def wait(i):
    out, err = procs[i].communicate()
    results[i] = (procs[i].returncode, out, err, time.monotonic() - t0)

  threads = [threading.Thread(target=wait, args=(i,)) for i in range(n_procs)]
  for t in threads:
    t.start()
  for t in threads:
    t.join(max(1.0, timeout - (time.monotonic() - t0)))
  if any(r is None for r in results):
    for p in procs:
      p.kill()
    raise AssertionError(f"the processes did not finish within {timeout} s")
  return results


def _leaves(codec):
  return jax.tree.leaves(jax.tree.map(np.asarray, codec.state))


def _assert_same_codec(a, b, rtol=1e-5):
  for x, y in zip(_leaves(a), _leaves(b)):
    np.testing.assert_allclose(x, y, rtol=rtol, atol=1e-7)
  held_out = qj.data.load_synthetic(n_train=10, n_db=500, n_queries=0, d=32, seed=7,
                                    n_val=0).db
  np.testing.assert_array_equal(a.encode(held_out, A=4, B=8, verbose=False),
                                b.encode(held_out, A=4, B=8, verbose=False))


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
  """The tiny synthetic config trained by 2 processes x 1 device, uninterrupted."""
  work = tmp_path_factory.mktemp("mp") / "two"
  res = _launch(TRAIN, [TINY, f"--workdir={work}"], 2)
  for rc, _, err, _ in res:
    assert rc == 0, err[-3000:]
    # A clean exit: no tracebacks from checkpointers closed too late.
    assert "Traceback" not in err and "Event loop is closed" not in err, err[-3000:]
  return work, res


def test_two_processes_train_like_one_process_with_two_devices(two_process_run, tmp_path):
  work2, res = two_process_run
  (rc, out1, err1, _), = _launch(TRAIN, [TINY, f"--workdir={tmp_path / 'one'}"], 1)
  assert rc == 0, err1[-3000:]
  _assert_same_codec(qj.load(work2), qj.load(tmp_path / "one"))
  # Process 0 alone logs and prints: the log has each record once, as with 1 process.
  log2 = trainer.read_metrics(work2 / "metrics.jsonl")
  log1 = trainer.read_metrics(tmp_path / "one" / "metrics.jsonl")
  assert [(r["epoch"], r["step"]) for r in log2] == [(r["epoch"], r["step"]) for r in log1]
  np.testing.assert_allclose([r.get("val_mse", 0) for r in log2],
                             [r.get("val_mse", 0) for r in log1], rtol=1e-5)
  assert "faiss RQ" in res[0][1] and "faiss RQ" not in res[1][1]
  assert "epoch 0:" not in res[1][1] + res[1][2]  # no progress output from process 1


def test_killed_process_stops_the_other_and_resume_matches(two_process_run, tmp_path):
  work = tmp_path / "killed"
  args = [TINY, f"--workdir={work}"]
  # Process 1 is killed (SIGKILL) after the first epoch's checkpoint, mid-training.
  res = _launch(TRAIN, args, 2, die="1:epoch-0")
  (rc0, _, err0, t0), (rc1, _, _, t1) = res
  assert rc1 == -signal.SIGKILL
  assert rc0 != 0 and "lost process 1" in err0, err0[-3000:]
  assert t0 < t1 + 60  # process 0 stopped within a minute of losing its peer
  assert (work / "ckpt").exists() and not (work / "eval.json").exists()
  # Both restarted with resume=True: the run ends where the uninterrupted one ends.
  res = _launch(TRAIN, args + ["--config.resume=True"], 2)
  for rc, _, err, _ in res:
    assert rc == 0, err[-3000:]
  _assert_same_codec(qj.load(work), qj.load(two_process_run[0]), rtol=1e-6)


def test_two_process_encode_writes_the_codes_of_one_process(tmp_path):
  ds = qj.data.load_synthetic(n_train=3_000, n_db=1_001, n_queries=10, d=8, n_val=0)
  root = tmp_path / "deep"
  root.mkdir()
  qj.data.write_vecs(str(root / "learn.fvecs"), np.asarray(ds.train))
  qj.data.write_vecs(str(root / "base.fvecs"), np.asarray(ds.db))
  qj.data.write_vecs(str(root / "deep1B_queries.fvecs"), np.asarray(ds.queries))
  cents = np.asarray(ds.train[:16])
  cfg = qj.QincoConfig(K=8, M=2, L=1, de=None, dh=8, A=2, B=2, ivf_K=16)
  codec = qj.Codec.create(cfg, ds.train, verbose=False, ivf_centroids=cents)
  script = os.path.join(EXPERIMENTS, "search_bigann.py")
  codes = {}
  for n in (1, 2):
    work = tmp_path / f"work{n}"
    codec.save(work / "train")
    res = _launch(script, [f"--workdir={work}", "--data=deep1b", f"--root={root}",
                           "--stage=encode", "--A=2", "--B=4"], n)
    for rc, _, err, _ in res:
      assert rc == 0, err[-3000:]
    assert len(list(work.glob("codes_db.*of*.npy"))) == n
    codes[n] = np.asarray(shards.load_shards(work))
  assert codes[1].shape == (1_001, 3)
  np.testing.assert_array_equal(codes[1], codes[2])
  np.testing.assert_array_equal(codes[1], codec.encode(ds.db, A=2, B=4, verbose=False))
