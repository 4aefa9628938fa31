"""`qj.Index` (faiss-style IVF-QINCo2 index) and `Codec.sa_encode/sa_decode`, against
the pipeline's own searcher, exhaustive search over the full decoding, exact cosine
search, and NumPy byte packing."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import qinco_jax as qj
from qinco_jax import ivf
from qinco_jax.search import Searcher, SearchParams, decoders
from qinco_jax.search import lists as index_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def setup():
  ds = qj.data.load_synthetic(n_train=4000, n_db=2000, n_queries=60, d=16, n_val=200)
  cents = ivf.train_centroids(ds.train, 8, niter=10)
  cfg = qj.QincoConfig(K=256, M=4, L=1, de=8, dh=16, A=4, B=4, ivf_K=8)
  codec = qj.Codec.create(cfg, ds.train, verbose=False, ivf_centroids=cents)
  index = qj.Index(codec)
  index.train(ds.train)
  index.add(ds.db)
  return ds, codec, index


def test_index_search_equals_the_pipeline_and_nears_exhaustive_search(setup):
  ds, codec, index = setup
  assert index.ntotal == 2000 and index.is_trained
  D, I = index.search(ds.queries, 10, nprobe=4, nshort=50)
  assert D.shape == I.shape == (60, 10) and D.dtype == np.float32 and I.dtype == np.int64
  # The pipeline's stages on the same codes, strung together by hand (the database
  # injected in one go at build time), give the same answer.
  db_codes = codec.encode(ds.db, verbose=False)
  dec = decoders.fit_decoders(codec, ds.train, verbose=False)
  ivf_index = index_lib.build_index(dec.centroids, dec.tables, dec.train_codes, db_codes)
  searcher = Searcher(codec, ivf_index, dec.centroids, dec.pairwise, dec.extra)
  D2, I2, _ = searcher.search(ds.queries, k=10, params=SearchParams(nprobe=4, nshort=50))
  np.testing.assert_array_equal(I, I2)
  np.testing.assert_allclose(D, D2, rtol=1e-6)
  # R@1 within a few points of an exact search among the full decodings.
  full = codec.decode(db_codes, verbose=False)
  exact = qj.metrics.knn(np.asarray(ds.queries, np.float32), full, k=1)[:, 0]
  truth = np.asarray(ds.gt)[:, :1]
  r_index = qj.metrics.recall_at(I, truth, ks=(1,))["R@1"]
  r_exact = qj.metrics.recall_at(exact[:, None], truth, ks=(1,))["R@1"]
  assert r_index >= r_exact - 0.05, (r_index, r_exact)


def test_incremental_adds_equal_one_add_and_ids_are_kept(setup):
  ds, codec, _ = setup
  a = qj.Index(codec)
  a.train(ds.train)
  ids = np.arange(2000, dtype=np.int64) * 10 + 7  # the caller's own ids
  a.add(ds.db[:700], ids=ids[:700])
  a.add(ds.db[700:], ids=ids[700:])
  b = qj.Index(codec)
  b.train(ds.train)
  b.add(ds.db, ids=ids)
  Da, Ia = a.search(ds.queries, 5, nprobe=8)
  Db, Ib = b.search(ds.queries, 5, nprobe=8)
  np.testing.assert_array_equal(Ia, Ib)
  np.testing.assert_array_equal(Da, Db)
  assert set(np.unique(Ia)) <= set(ids)


def test_remove_ids(setup):
  ds, codec, _ = setup
  index = qj.Index(codec)
  index.train(ds.train)
  index.add(ds.db)
  _, I = index.search(ds.queries, 3, nprobe=8)
  gone = np.unique(I[:, 0])
  assert index.remove_ids(gone) == len(gone)
  assert index.ntotal == 2000 - len(gone)
  _, I2 = index.search(ds.queries, 3, nprobe=8)
  assert not np.isin(I2, gone).any()


def test_save_and_load_in_a_new_process(setup, tmp_path):
  ds, _, index = setup
  index.save(tmp_path / "idx")
  D, I = index.search(ds.queries[:10], 5, nprobe=4)
  np.save(tmp_path / "q.npy", np.asarray(ds.queries[:10]))
  code = (f"import numpy as np, qinco_jax as qj; ix = qj.load_index({str(tmp_path / 'idx')!r}); "
          f"D, I = ix.search(np.load({str(tmp_path / 'q.npy')!r}), 5, nprobe=4); "
          f"np.save({str(tmp_path / 'I.npy')!r}, I); np.save({str(tmp_path / 'D.npy')!r}, D); "
          f"ix.add(np.load({str(tmp_path / 'q.npy')!r})); print(ix.ntotal)")
  r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                     env={**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"},
                     timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  np.testing.assert_array_equal(np.load(tmp_path / "I.npy"), I)
  np.testing.assert_allclose(np.load(tmp_path / "D.npy"), D, rtol=1e-6)
  assert r.stdout.strip().endswith(str(index.ntotal + 10))  # adds work after a reload
  mine = tmp_path / "mine"
  mine.mkdir()
  (mine / "notes.txt").write_text("x")
  with pytest.raises(ValueError, match="not a qinco-jax index"):
    index.save(mine)


def _as_an_earlier_save(path, ivf_):
  """Turns a saved index into what earlier versions wrote: no lists/, no checksums,
  the centroids and AQ tables at the top."""
  np.save(path / "centroids.npy", ivf_.centroids)
  np.save(path / "aq_tables.npy", ivf_.tables)
  shutil.rmtree(path / "lists")
  meta = json.loads((path / "qinco_jax_index.json").read_text())
  (path / "qinco_jax_index.json").write_text(json.dumps(
      {k: meta[k] for k in ("metric", "A", "B")}))


def test_an_index_saved_as_ivf_npz_is_read(setup, tmp_path):
  """The lists of indexes saved before the list file were one ivf.npz of row arrays:
  loading one reads it, with the same answers."""
  import faiss
  ds, _, index = setup
  index.save(tmp_path / "idx")
  D, I = index.search(ds.queries, 5, nprobe=4)
  ivf_ = index._ivf
  r = ivf_.rows()
  _as_an_earlier_save(tmp_path / "idx", ivf_)
  np.savez(tmp_path / "idx" / "ivf.npz", centroids=ivf_.centroids, tables=ivf_.tables,
           levels=ivf_.levels, lists=r["lists"], codes=r["codes"], ids=r["ids"],
           vcodes=r["vcodes"], metric=np.array(ivf_.metric),
           coarse=faiss.serialize_index(ivf_.coarse))
  loaded = qj.load_index(tmp_path / "idx")
  D2, I2 = loaded.search(ds.queries, 5, nprobe=4)
  np.testing.assert_array_equal(I2, I)
  np.testing.assert_array_equal(D2, D)


def test_an_index_saved_before_the_lookup_table_scan_is_converted(setup, tmp_path):
  """Earlier versions saved the lists as a faiss IVF-RQ file (index.faiss) instead of
  ivf.npz: loading one converts it, with the same codes, ids and answers."""
  import faiss
  ds, _, index = setup
  index.save(tmp_path / "idx")
  D, I = index.search(ds.queries, 5, nprobe=4)
  ivf_ = index._ivf
  _as_an_earlier_save(tmp_path / "idx", ivf_)
  old = faiss.index_factory(index.d, f"IVF{ivf_.nlist}_HNSW32,RQ{ivf_.M}x8_Nqint8")
  inner = faiss.downcast_index(faiss.extract_index_ivf(old))
  faiss.downcast_index(inner.quantizer).add(ivf_.centroids)
  faiss.copy_array_to_vector(ivf_.tables.ravel(), inner.rq.codebooks)
  norms = np.ones(10, np.float32)
  inner.rq.train_norm(len(norms), faiss.swig_ptr(norms))
  inner.rq.is_trained = inner.is_trained = old.is_trained = True
  for l in range(ivf_.nlist):
    rows = np.flatnonzero(ivf_.lists == l)
    packed = np.zeros((len(rows), inner.code_size), np.uint8)
    packed[:, :ivf_.M] = ivf_.codes[rows]  # the norm byte is not read by the conversion
    lab = np.ascontiguousarray(ivf_.ids[rows])
    inner.invlists.add_entries(l, len(rows), faiss.swig_ptr(lab), faiss.swig_ptr(packed))
  inner.ntotal = old.ntotal = ivf_.ntotal
  faiss.write_index(old, str(tmp_path / "idx" / "index.faiss"))
  loaded = qj.load_index(tmp_path / "idx")
  assert loaded.ntotal == index.ntotal
  D2, I2 = loaded.search(ds.queries, 5, nprobe=4)
  np.testing.assert_array_equal(I2, I)
  np.testing.assert_allclose(D2, D, rtol=1e-6)
  (tmp_path / "idx" / "index.faiss").unlink()
  with pytest.raises(FileNotFoundError, match="no inverted lists"):
    qj.load_index(tmp_path / "idx")


def test_cosine_metric_ranks_by_cosine_similarity(setup):
  ds, _, _ = setup
  unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
  # A cosine index's codec is built on unit vectors (the vectors it will code).
  xt = unit(np.asarray(ds.train, np.float32))
  cfg = qj.QincoConfig(K=256, M=4, L=1, de=8, dh=16, A=4, B=4, ivf_K=8)
  codec = qj.Codec.create(cfg, xt, verbose=False,
                          ivf_centroids=ivf.train_centroids(xt, 8, niter=10))
  index = qj.Index(codec, metric="cosine")
  index.train(ds.train)  # normalised by the index
  index.add(ds.db)
  D, I = index.search(ds.queries, 10, nprobe=8, nshort=200)
  q, x = unit(np.asarray(ds.queries, np.float64)), unit(np.asarray(ds.db, np.float64))
  true = np.argsort(-(q @ x.T), axis=1)[:, :10]  # exact cosine neighbours
  r10 = np.mean([true[i, 0] in I[i] for i in range(len(q))])
  assert r10 > 0.8, r10
  # D is the squared distance between the normalised query and the decoded vector.
  dec = codec.decode(codec.encode(x.astype(np.float32), verbose=False), verbose=False)
  got = ((q[:, None, :] - dec[I]) ** 2).sum(-1)
  np.testing.assert_allclose(D, got, rtol=1e-4, atol=1e-4)
  with pytest.raises(ValueError, match="all zeros"):
    index.search(np.zeros((1, 16)), 3)


def test_inner_product_metric_equals_exhaustive_search_over_the_decoding(setup, tmp_path):
  """With every list probed and a shortlist as long as the index, an "ip" index must
  return exactly the top-k of <q, decode(codes)> over the whole database, largest
  first; with the default settings it stays close to exact inner-product search."""
  ds, codec, _ = setup
  index = qj.Index(codec, metric="ip")
  index.train(ds.train)
  codes = index.add(ds.db)
  q = np.asarray(ds.queries, np.float32)
  dec = codec.decode(codes, verbose=False)
  ip = q.astype(np.float64) @ dec.T.astype(np.float64)
  D, I = index.search(q, 10, nprobe=8, nshort=2000)
  np.testing.assert_array_equal(I, np.argsort(-ip, axis=1, kind="stable")[:, :10])
  np.testing.assert_allclose(D, np.take_along_axis(ip, I, 1), rtol=1e-5, atol=1e-4)
  assert (np.diff(D, axis=1) <= 0).all()
  # Inner-product neighbours are not L2 neighbours here (so the metric matters).
  exact_l2 = qj.metrics.knn(q, dec, k=1)[:, 0]
  assert (exact_l2 != I[:, 0]).mean() > 0.2
  # Default settings against exact inner-product search on the raw vectors.
  D, I = index.search(q, 10, nprobe=4)
  true = np.argmax(q @ np.asarray(ds.db, np.float32).T, axis=1)
  assert np.mean([true[i] in I[i] for i in range(len(q))]) > 0.8
  index.save(tmp_path / "ip")
  D2, I2 = qj.load_index(tmp_path / "ip").search(q, 10, nprobe=4)
  np.testing.assert_array_equal(I2, I)
  np.testing.assert_array_equal(D2, D)
  # Padding for missing results is -inf (the worst inner product).
  small = qj.Index(codec, metric="ip")
  small.train(ds.train)
  small.add(ds.db[:3])
  D, I = small.search(q[:2], 5, nprobe=8)  # k > ntotal: padded, no warning
  assert (I[:, :3] >= 0).all() and (I[:, 3:] == -1).all() and np.isneginf(D[:, 3:]).all()


def test_an_empty_index_returns_no_results(setup):
  ds, codec, _ = setup
  index = qj.Index(codec)
  index.train(ds.train)
  D, I = index.search(ds.queries[:3], 5, nprobe=2)
  assert (I == -1).all() and np.isinf(D).all() and (D > 0).all()


def test_index_errors(setup):
  ds, codec, _ = setup
  with pytest.raises(ValueError, match="IVF-QINCo2 codec"):
    qj.Index(qj.Codec.create(qj.QincoConfig(K=4, M=2, A=0, B=1), ds.train, verbose=False))
  with pytest.raises(ValueError, match="metric"):
    qj.Index(codec, metric="hamming")
  with pytest.raises(RuntimeError, match="train"):
    qj.Index(codec).add(ds.db[:5])


@pytest.mark.parametrize("K, ivf_K", [(256, 0), (300, 0), (16, 1000)])
def test_sa_encode_packs_codes_into_bytes(K, ivf_K):
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2000, 6)).astype(np.float32)
  cfg = qj.QincoConfig(K=K, M=3, L=1, de=None, dh=4, A=0, B=1, ivf_K=ivf_K)
  codec = qj.Codec.create(cfg, x, verbose=False,
                          ivf_centroids=x[:ivf_K] if ivf_K else None)
  # 4-bit codes: two per byte, so 3 of them take 2 bytes
  want_size = (2 if ivf_K else 0) + (2 if K <= 16 else 3 * (1 if K <= 256 else 2))
  assert codec.code_size == want_size
  codes = codec.encode(x[:50], verbose=False)
  b = codec.sa_encode(x[:50])
  assert b.dtype == np.uint8 and b.shape == (50, want_size)
  # Little-endian fields, by hand.
  c = codes.astype(np.int64)
  if ivf_K:
    np.testing.assert_array_equal(b[:, 0] + 256 * b[:, 1].astype(np.int64), c[:, 0])
  if K > 256:
    np.testing.assert_array_equal(b[:, 0] + 256 * b[:, 1].astype(np.int64), c[:, 0])
  if K <= 16:  # low nibble first; the last high nibble is 0
    np.testing.assert_array_equal(b[:, 2], c[:, 1] | (c[:, 2] << 4))
    np.testing.assert_array_equal(b[:, 3], c[:, 3])
  np.testing.assert_array_equal(codec.unpack_codes(b), codes)
  np.testing.assert_array_equal(codec.sa_decode(b), codec.decode(codes, verbose=False))
  with pytest.raises(ValueError, match="uint8"):
    codec.sa_decode(b.astype(np.int32))


def test_an_interrupted_save_keeps_the_earlier_index(setup, tmp_path, monkeypatch):
  """Saving over an index writes a temporary sibling and swaps it in: a save that
  fails half way leaves the earlier index whole (and no temporary behind)."""
  import faiss
  ds, _, index = setup
  index.save(tmp_path / "idx")
  D, I = qj.load_index(tmp_path / "idx").search(ds.queries[:10], 5, nprobe=4)

  def broken(_):
    raise OSError("disk full")
  tables = np.load(tmp_path / "idx" / "lists" / "tables.npy")
  other = qj.Index(index.codec)  # other decoders (fitted on fewer vectors)
  other.train(ds.train[:1500])
  assert not np.allclose(other._dec.tables, tables)
  monkeypatch.setattr(faiss, "write_index", lambda *a: broken(a))
  with pytest.raises(OSError, match="disk full"):
    other.save(tmp_path / "idx")
  monkeypatch.undo()
  np.testing.assert_array_equal(np.load(tmp_path / "idx" / "lists" / "tables.npy"), tables)
  D2, I2 = qj.load_index(tmp_path / "idx").search(ds.queries[:10], 5, nprobe=4)
  np.testing.assert_array_equal(I2, I)
  np.testing.assert_array_equal(D2, D)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]


def test_a_loaded_index_maps_its_lists_and_answers_the_same(setup, tmp_path):
  ds, _, index = setup
  index.save(tmp_path / "idx")
  loaded = qj.load_index(tmp_path / "idx")
  assert loaded._ivf.disk is not None  # memory-mapped, read-only
  D, I = index.search(ds.queries, 10, nprobe=4)
  D2, I2 = loaded.search(ds.queries, 10, nprobe=4)
  np.testing.assert_array_equal(I2, I)
  np.testing.assert_array_equal(D2, D)
  assert qj.load_index(tmp_path / "idx", mmap=False)._ivf.disk is None


def test_a_damaged_or_edited_saved_index_is_refused(setup, tmp_path):
  """Every file of a saved index is checked on load (the list file by its size and
  header): flipped bytes, an edited metric, another codec of the same shape and a
  truncated list file each give one line naming the problem."""
  ds, codec, index = setup
  index.save(tmp_path / "idx")
  path = tmp_path / "idx"
  for rel in ("lists/centroids.npy", "pairwise.npz", "lists/invlists.faiss"):
    good = (path / rel).read_bytes()
    raw = bytearray(good)
    at = 300 if rel != "lists/invlists.faiss" else 40  # the list sizes
    raw[at:at + 8] = bytes(255 - b for b in raw[at:at + 8])
    (path / rel).write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=f"is corrupt: {rel} do not match"):
      qj.load_index(path)
    (path / rel).write_bytes(good[:-9] if rel.endswith("faiss") else good)
    if rel.endswith("faiss"):
      with pytest.raises(ValueError, match=f"is corrupt: {rel}"):
        qj.load_index(path)
      (path / rel).write_bytes(good)
  meta = json.loads((path / "qinco_jax_index.json").read_text())
  (path / "qinco_jax_index.json").write_text(json.dumps({**meta, "metric": "ip"}))
  with pytest.raises(ValueError, match="qinco_jax_index.json was changed after the save"):
    qj.load_index(path)
  (path / "qinco_jax_index.json").write_text(json.dumps(meta))
  other = qj.Codec.create(codec.cfg, ds.train[:3000], seed=1, verbose=False,
                          ivf_centroids=index._ivf.centroids)
  shutil.rmtree(path / "model")
  other.save(path / "model")
  with pytest.raises(ValueError, match="model/ holds another codec"):
    qj.load_index(path)


def test_a_save_never_deletes_files_it_did_not_write(setup, tmp_path):
  _, _, index = setup
  index.save(tmp_path / "idx")
  (tmp_path / "idx" / "notes.txt").write_text("mine")
  with pytest.raises(ValueError, match=r"holds files an index save did not write \(notes.txt\)"):
    index.save(tmp_path / "idx")
  assert (tmp_path / "idx" / "notes.txt").read_text() == "mine"
  qj.load_index(tmp_path / "idx")  # and the index is still whole


def test_ids_stay_unique_and_only_integer_ids_are_taken(setup):
  ds, codec, _ = setup
  index = qj.Index(codec)
  index.train(ds.train)
  codes = index.add(ds.db[:10])
  assert index.remove_ids(np.array([3])) == 1
  index.add_codes(codes[:1])  # the next default id is one past the largest: 10, not 9
  assert sorted(index._ivf.ids.tolist()) == [0, 1, 2, 4, 5, 6, 7, 8, 9, 10]
  with pytest.raises(ValueError, match=r"ids must lie in 0..2\*\*63-1.*got 18446744073709551615"):
    index.add(ds.db[:1], ids=np.array([2**64 - 1], np.uint64))
  for bad in (np.array([1.7]), np.array([True, False])):
    with pytest.raises(ValueError, match="remove_ids needs integer ids"):
      index.remove_ids(bad)
  assert index.ntotal == 10


def test_cosine_refuses_a_codec_trained_on_vectors_of_another_scale(setup):
  ds, codec, _ = setup  # trained on the raw (unnormalised) vectors
  with pytest.raises(ValueError, match="metric='cosine' codes unit vectors, but this codec"):
    qj.Index(codec, metric="cosine").train(ds.train)


def test_an_index_save_interrupted_between_its_renames_is_recovered(setup, tmp_path):
  """A save parks the earlier index as .NAME.old-* and moves the new one in; killed
  in between, nothing is at NAME: loading moves the complete copy back."""
  ds, _, index = setup
  index.save(tmp_path / "idx")
  D, I = index.search(ds.queries[:5], 5, nprobe=4)
  os.replace(tmp_path / "idx", tmp_path / ".idx.old-1234abcd")
  with pytest.warns(UserWarning, match="restored the complete copy '.idx.old-1234abcd'"):
    loaded = qj.load_index(tmp_path / "idx")
  np.testing.assert_array_equal(loaded.search(ds.queries[:5], 5, nprobe=4)[1], I)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]


def test_index_saves_from_threads_at_once_take_turns_and_succeed(setup, tmp_path,
                                                                 monkeypatch):
  """Two threads save the index to one path at once. Each save writes its codec with
  Orbax, whose writes from two threads at once fail (even at different paths): they
  take turns. Save A is held inside its array write until save B reaches its own or
  waits for its turn; no two writes overlap and both saves succeed."""
  import threading

  from qinco_jax import checkpoint
  ds, _, index = setup
  real_ckpt = checkpoint._ckpt
  a_in, b_there, count = threading.Event(), threading.Event(), threading.Lock()
  active, most = [0], [0]

  class Turn:  # the write lock, noting when B asks for it
    def __init__(self):
      self.lock = threading.Lock()

    def __enter__(self):
      if threading.current_thread().name == "B":
        b_there.set()
      self.lock.acquire()

    def __exit__(self, *exc):
      self.lock.release()

  class Held:
    def __init__(self):
      self.ck = real_ckpt()

    def save(self, *a, **k):
      with count:
        active[0] += 1
        most[0] = max(most[0], active[0])
      if threading.current_thread().name == "B":
        b_there.set()
      else:
        a_in.set()
        b_there.wait(60)  # a guard against a test bug, not a speed check
      return self.ck.save(*a, **k)

    def close(self):
      with count:
        active[0] -= 1
      self.ck.close()

    def __getattr__(self, name):
      return getattr(self.ck, name)

  monkeypatch.setattr(checkpoint, "_ckpt", Held)
  monkeypatch.setattr(checkpoint, "_WRITE_LOCK", Turn(), raising=False)
  errors = []

  def save():
    try:
      index.save(tmp_path / "idx")
    except Exception as e:  # reported below
      errors.append(e)

  ta = threading.Thread(target=save, name="A")
  ta.start()
  assert a_in.wait(60)
  tb = threading.Thread(target=save, name="B")
  tb.start()
  ta.join()
  tb.join()
  monkeypatch.undo()
  assert errors == [] and most[0] == 1
  D, I = index.search(ds.queries[:10], 5, nprobe=4)
  D2, I2 = qj.load_index(tmp_path / "idx").search(ds.queries[:10], 5, nprobe=4)
  np.testing.assert_array_equal(I2, I)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]
