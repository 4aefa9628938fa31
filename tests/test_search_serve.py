"""Search across processes (`search.serve`): two index parts served on 127.0.0.1 by
two processes answer exactly as one process holding every row, and a lost part is an
error naming it or an explicitly partial answer."""

import os
import subprocess
import sys
import time

import numpy as np
import pytest

import qinco_jax as qj
from qinco_jax.search import serve

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _wait_ready(path, procs, limit=300):
  """host:port from the ready file (generous limit: starting a process imports jax)."""
  t0 = time.monotonic()
  while not os.path.exists(path):
    for p in procs:
      if p.poll() is not None:
        raise AssertionError(p.stderr.read().decode()[-2000:])
    if time.monotonic() - t0 > limit:
      raise AssertionError(f"no server came up in {limit} s")
    time.sleep(0.2)
  host, port = path.read_text().split(":")
  return host, int(port)


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("serve")
  ds = qj.data.load_synthetic(n_train=3000, n_db=4000, n_queries=50, d=16, n_val=200)
  cfg = qj.QincoConfig(K=256, M=4, L=1, de=8, dh=16, A=4, B=4, ivf_K=32)
  codec = qj.Codec.create(cfg, ds.train, verbose=False,
                          ivf_centroids=qj.ivf.train_centroids(ds.train, 32, niter=10))
  empty = qj.Index(codec)
  empty.train(ds.train)
  empty.save(tmp / "empty")
  codes = codec.encode(ds.db, verbose=False)
  ids = np.arange(len(codes)) * 3 + 1
  dirs = {}
  for name, rows in (("full", slice(None)), ("p0", slice(0, 2500)), ("p1", slice(2500, None))):
    part = qj.load_index(tmp / "empty", mmap=False)
    part.add_codes(codes[rows], ids[rows])
    part.save(tmp / name)
    dirs[name] = tmp / name
  env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
  procs, addresses = [], []
  for p in ("p0", "p1"):
    ready = tmp / f"{p}.ready"
    procs.append(subprocess.Popen(
        [sys.executable, "-m", "qinco_jax.search.serve", str(dirs[p]), "--ready_file",
         str(ready)], env=env, stderr=subprocess.PIPE))
  try:
    addresses = [_wait_ready(tmp / f"{p}.ready", procs) for p in ("p0", "p1")]
    yield ds, dirs, procs, addresses
  finally:
    for p in procs:
      p.kill()
      p.wait()
      p.stderr.close()


def test_two_served_parts_answer_as_one_process(parts):
  ds, dirs, _, addresses = parts
  one = qj.load_index(dirs["full"])
  remote = serve.connect(dirs["p0"], addresses)
  assert remote.ntotal == one.ntotal == 4000
  for kw in (dict(nprobe=4, nshort=20), dict(nprobe=32, nshort=200, nmid_short=2)):
    D1, I1 = one.search(ds.queries, 10, **kw)
    D2, I2 = remote.search(ds.queries, 10, **kw)
    np.testing.assert_array_equal(I2, I1)
    np.testing.assert_array_equal(D2, D1)
  assert len(set(np.unique(I2[I2 >= 0]) % 3)) == 1  # the callers' ids (3 i + 1)


def test_a_lost_part_is_an_error_or_an_explicit_partial_answer(parts):
  ds, dirs, procs, addresses = parts
  strict = serve.connect(dirs["p0"], addresses)
  partial = serve.connect(dirs["p0"], addresses, allow_partial=True)
  procs[1].kill()
  procs[1].wait()
  with pytest.raises(serve.PartLostError, match=r"index part\(s\) 1 \(127.0.0.1:\d+\) did "
                                                "not answer"):
    strict.search(ds.queries, 10, nprobe=8)
  with pytest.warns(serve.PartialResultsWarning, match=r"without index part\(s\) 1"):
    D, I = partial.search(ds.queries, 10, nprobe=8)
  assert partial._ivf.missing_parts == [f"1 (127.0.0.1:{addresses[1][1]})"]
  D0, I0 = qj.load_index(dirs["p0"]).search(ds.queries, 10, nprobe=8)
  np.testing.assert_array_equal(I, I0)  # exactly part 0's answer
  np.testing.assert_array_equal(D, D0)
  with pytest.raises(serve.PartLostError, match="cannot be reached"):
    serve.connect(dirs["p0"], addresses)
