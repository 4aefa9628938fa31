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
  keep = ("JAX_NUMPY_RANK_PROMOTION", "JAX_COMPILATION_CACHE_DIR",
          "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS")  # tests/conftest.py
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_") or k in keep}
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


def test_initialize_checks_its_arguments_before_joining(monkeypatch):
  """Inconsistent process arguments (flags or environment) are refused, naming the
  problem, before anything is started; one process joins nothing."""
  for k in distributed.ENV + distributed._AUTO_ENV:
    monkeypatch.delenv(k, raising=False)
  init = distributed.initialize
  assert init() is False
  assert init(num_processes=1, process_id=0) is False
  assert init("127.0.0.1:1", 1, 0) is False  # one process: nothing to join
  with pytest.raises(ValueError, match=r"num_processes=2, process_id=1 need a coordinator"):
    init(num_processes=2, process_id=1)
  with pytest.raises(ValueError, match=r"num_processes=2, process_id=None need a coordin"):
    init(num_processes=2)
  with pytest.raises(ValueError, match="given without the number of processes"):
    init("127.0.0.1:1")
  with pytest.raises(ValueError, match="given without the number of processes"):
    init("127.0.0.1:1", 2, -1)  # -1: the flags' "unset"
  with pytest.raises(ValueError, match="num_processes must be >= 1, got 0"):
    init("127.0.0.1:1", 0, 0)
  with pytest.raises(ValueError, match=r"process_id must be in \[0, 2\) \(num_processes=2\), "
                                       r"got 2"):
    init("127.0.0.1:1", 2, 2)
  monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1")
  monkeypatch.setenv("JAX_NUM_PROCESSES", "3")
  monkeypatch.setenv("JAX_PROCESS_ID", "5")
  with pytest.raises(ValueError, match=r"process_id must be in \[0, 3\)"):
    init()
  monkeypatch.setenv("JAX_NUM_PROCESSES", "two")
  with pytest.raises(ValueError, match="num_processes must be an integer, got 'two'"):
    init()
  assert not jax.distributed.is_initialized()


def test_one_process_passes_errors_through_unchanged():
  """With one process no error is a lost peer: the guards re-raise what came."""
  with pytest.raises(RuntimeError, match="gloo: connection reset"):
    with distributed.peer_guard("a step"):
      raise RuntimeError("gloo: connection reset")
  with pytest.raises(KeyError):
    with distributed.exit_on_error():
      raise KeyError("k")
  assert distributed.lost_processes() == []
  # What counts as a peer's failure (with several processes): runtime errors that speak
  # of the link, or anything from gloo or the coordination service.
  looks = distributed._looks_like_peer_failure
  assert looks(RuntimeError("UNAVAILABLE: Connection reset by peer"))
  assert looks(ValueError("gloo: read failed"))
  assert not looks(RuntimeError("shapes (3,) and (4,) differ"))
  assert not looks(ValueError("connection string is empty"))


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


def _start(args_per_process, timeout=300):
  """Starts the training script once per entry of args_per_process (each a list of
  flags after the common ones), on one coordinator port; returns [(rc, stderr)]."""
  port = distributed.free_port()
  env = {k: v for k, v in os.environ.items()
         if not k.startswith("JAX_") or k == "JAX_NUMPY_RANK_PROMOTION"}
  env.update(JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, JAX_NUM_CPU_DEVICES="1")
  procs = [subprocess.Popen(
      [sys.executable, "-c", _DRIVER, TRAIN, TINY, f"--coordinator_address=127.0.0.1:{port}",
       *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for args in args_per_process]
  out = []
  for p in procs:
    _, err = p.communicate(timeout=timeout)  # a guard against a hang, not a speed check
    out.append((p.returncode, err))
  return out


def _one_line(err):
  """The error line of a process's stderr, checked to come without a traceback or a
  C++ stack."""
  assert "Traceback" not in err and "Check failure" not in err, err[-3000:]
  (line,) = [ln for ln in err.splitlines() if ln.startswith("error: ")]
  return line


def test_a_process_that_never_starts_is_named_within_the_startup_timeout(tmp_path):
  (rc, err), = _start([[f"--workdir={tmp_path / 'w'}", "--num_processes=2",
                        "--process_id=0", "--startup_timeout_s=2"]])
  assert rc != 0
  assert "process 1 of 2 did not start within 2 s (--startup_timeout_s)" in _one_line(err)


def test_two_processes_with_one_process_id_are_named(tmp_path):
  res = _start([[f"--workdir={tmp_path / 'w'}", "--num_processes=3", f"--process_id={i}"]
                for i in (0, 1, 1)])
  for rc, err in res:
    assert rc != 0
    assert "two processes were started with --process_id=1" in _one_line(err)


def test_different_numbers_of_processes_are_named(tmp_path):
  res = _start([[f"--workdir={tmp_path / 'w'}", f"--num_processes={n}", f"--process_id={i}"]
                for i, n in ((0, 2), (1, 3))])
  for rc, err in res:
    assert rc != 0
    assert ("process 1 was started with --num_processes=3, process 0 with "
            "--num_processes=2") in _one_line(err)


def test_processes_compare_their_settings_and_name_the_differences(tmp_path):
  res = _start([[f"--workdir={tmp_path / 'w'}", "--num_processes=2", "--process_id=0"],
                [f"--workdir={tmp_path / 'w'}", "--num_processes=2", "--process_id=1",
                 "--config.train.lr=0.001", "--config.model.L=2"]])
  for rc, err in res:
    assert rc != 0
    line = _one_line(err)
    assert "the processes disagree on the training settings" in line
    assert "model.L: process 0 has 1, process 1 has 2" in line
    assert "train.lr: process 0 has 0.0008, process 1 has 0.001" in line
  assert not (tmp_path / "w" / "ckpt").exists()  # stopped before touching the workdir
