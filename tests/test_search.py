"""Search pipeline end to end on a tiny synthetic set: IVF-QINCo2 codes stored in the
IVF index (scanned by faiss), reloaded in a fresh process, searched with AQ, pairwise
and full re-rank."""

import dataclasses
import os

import numpy as np
import pytest

import qinco_jax as qj
from qinco_jax import aq, ivf, pairwise, train, trainer
from qinco_jax.search import SearchParams, decoders, query, shards, sweep
from qinco_jax.search import lists as index_lib
from tests import reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_stale_missing_and_mixed_shards_are_refused(tmp_path):
  """Shards record the database they came from: a shard of an older 2,000-row version
  of a 3,000-row database, a missing shard, shards of two splits, or a shard outside
  its split must not be joined into an index."""
  rng = np.random.default_rng(0)
  old_db = rng.standard_normal((2000, 4)).astype(np.float32)
  db = np.concatenate([old_db, rng.standard_normal((1000, 4)).astype(np.float32)])
  codec = qj.Codec.create(qj.QincoConfig(K=4, M=2, A=0, B=1), db, verbose=False)
  shards.encode_shard(codec, old_db, tmp_path, 0, 2)  # stale: the old version
  shards.encode_shard(codec, db, tmp_path, 1, 2)
  with pytest.raises(ValueError, match="encoded from another database \\(2000 rows"):
    shards.load_shards(tmp_path, db=db)
  shards.encode_shard(codec, db, tmp_path, 0, 2)
  assert shards.load_shards(tmp_path, db=db).shape == (3000, 2)
  # Another database of the same size: the fingerprint tells them apart.
  with pytest.raises(ValueError, match="another database"):
    shards.load_shards(tmp_path, db=db[::-1].copy())
  os.remove(tmp_path / "codes_db.0001of0002.npy")
  with pytest.raises(ValueError, match=r"shards \[1\] of 2 are missing"):
    shards.load_shards(tmp_path, db=db)
  shards.encode_shard(codec, db, tmp_path, 1, 2)
  shards.encode_shard(codec, db, tmp_path, 2, 3)
  with pytest.raises(ValueError, match="2 different splits \\(2 of 2, 1 of 3\\)"):
    shards.load_shards(tmp_path, db=db)
  os.remove(tmp_path / "codes_db.0002of0003.npy")
  np.save(tmp_path / "codes_db.0002of0002.npy", np.zeros((5, 2), np.int32))
  with pytest.raises(ValueError, match=r"shards \[2\] do not exist in a split of 2"):
    shards.load_shards(tmp_path, db=db)


def test_shards_hold_packed_codes_resume_and_name_their_codec(tmp_path, monkeypatch):
  """A shard holds the codes in their own width (2 bytes of list id for 300 lists, then
  one per code), written as encoded in chunks; a shard already written for the same
  database, codec and beam is not encoded again, a killed encode leaves nothing
  behind, and shards of another codec are refused."""
  rng = np.random.default_rng(1)
  db = rng.standard_normal((3000, 4)).astype(np.float32)
  cfg = qj.QincoConfig(K=256, M=2, L=1, de=None, dh=4, A=0, B=1, ivf_K=300)
  codec = qj.Codec.create(cfg, db, verbose=False, ivf_centroids=db[:300])
  monkeypatch.setattr(shards, "ENCODE_ROWS", 700)  # several chunks per shard
  for i in range(2):
    shards.encode_shard(codec, db, tmp_path, i, 2)
  raw = np.load(tmp_path / "codes_db.0000of0002.npy")
  assert raw.dtype == np.uint8 and raw.shape == (1500, 4)
  np.testing.assert_array_equal(shards.load_shards(tmp_path, db=db, codec=codec),
                                codec.encode(db, verbose=False))
  monkeypatch.setattr(codec, "encode", lambda *a, **k: 1 / 0)
  shards.encode_shard(codec, db, tmp_path, 1, 2)  # finished: not encoded again
  with pytest.raises(ZeroDivisionError):
    shards.encode_shard(codec, db, tmp_path, 1, 2, A=0)  # another beam: re-encoded
  assert sorted(p.name for p in tmp_path.iterdir()) == [
      "codes_db.0000of0002.json", "codes_db.0000of0002.npy", "codes_db.0001of0002.npy"]
  monkeypatch.undo()
  shards.encode_shard(codec, db, tmp_path, 1, 2)
  other = qj.Codec.create(cfg, db, seed=1, verbose=False, ivf_centroids=db[:300])
  with pytest.raises(ValueError, match="encoded by another codec"):
    shards.find_shards(tmp_path, db=db, codec=other)


def test_shard_ranges_cover_everything_once():
  parts = [shards.shard_range(10, i, 3) for i in range(3)]
  assert parts == [(0, 3), (3, 6), (6, 10)]
  with pytest.raises(ValueError, match="shard"):
    shards.shard_range(10, 3, 3)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  out = tmp_path_factory.mktemp("search")
  ds = qj.data.load_synthetic(n_train=6000, n_db=3000, n_queries=100, d=16, n_val=500)
  cents = ivf.train_centroids(ds.train, 16, niter=10)
  cfg = qj.QincoConfig(K=256, M=4, L=1, de=16, dh=16, A=4, B=4, ivf_K=16)
  tc = train.TrainConfig(epochs=1, warmup_epochs=0, batch_per_device=256)
  codec = trainer.train_and_evaluate(cfg, tc, ds, out / "train", verbose=False,
                                     ivf_centroids=cents)
  for i in range(2):
    shards.encode_shard(codec, ds.db, out, i, 2)
  db_codes = shards.load_shards(out, db=ds.db)
  index = qj.Index(codec)
  index.train(ds.train)
  index.add_codes(db_codes)
  index.save(out / "index")
  return out / "index", ds, codec, db_codes, qj.load_index(out / "index").searcher()


def test_index_stores_the_injected_codes(built):
  _, ds, _, db_codes, searcher = built
  assert searcher.index.ntotal == len(ds.db)
  for l in (0, 7):
    ids, codes = _stored(searcher.index, l)
    assert len(ids) == (db_codes[:, 0] == l).sum()
    np.testing.assert_array_equal(codes, db_codes[ids, 1:])


def test_build_reuses_given_training_codes(built):
  out, ds, codec, db_codes, _ = built
  train_codes = codec.encode(ds.train, verbose=False)
  dec = decoders.fit_decoders(codec, ds.train, verbose=False, train_codes=train_codes)
  np.testing.assert_allclose(dec.tables, np.load(out / "lists" / "tables.npy"), rtol=1e-5,
                             atol=1e-6)
  with pytest.raises(ValueError, match="train_codes"):
    qj.Index(codec).train(ds.train, codes=train_codes[:, 1:])


def test_pairwise_decoder_approximates_the_qinco2_decoding(built):
  out, _, codec, db_codes, searcher = built
  codes = np.asarray(db_codes)
  full = codec.decode(codes, verbose=False)  # what the shortlist is re-ranked by
  base = searcher.centroids[codes[:, 0]]
  aq_only = base + aq.aq_decode(np.load(out / "lists" / "tables.npy"), codes[:, 1:])
  ext = pairwise.extended_codes(codes[:, 1:], codes[:, 0], searcher.extra_codes)
  pw = base + searcher.pairwise.decode(ext)
  err = {k: float(((v - full) ** 2).sum(1).mean()) for k, v in
         {"aq": aq_only, "pairwise": pw}.items()}
  assert len(searcher.pairwise.pairs) >= 1
  # Database codes (not seen in the fit); measured 0.28 vs 1.32.
  assert err["pairwise"] < 0.5 * err["aq"], err


def test_recall_well_above_chance_and_rerank_helps(built):
  _, ds, _, _, searcher = built
  nq = len(ds.queries)
  r = {}
  for name, p in {
      "aq": SearchParams(nprobe=16, nshort=100, use_pairwise=False, use_qinco=False),
      "full": SearchParams(nprobe=16, nshort=100, nmid_short=4)}.items():
    _, I, times = searcher.search(ds.queries, k=100, params=p)
    assert I.shape == (nq, 100)
    r[name] = qj.metrics.recall_at(I, ds.gt)
  assert r["aq"]["R@100"] > 0.5  # chance: 100 / 3000
  assert r["full"]["R@1"] >= r["aq"]["R@1"]


def test_search_equals_exhaustive_search_over_the_full_decoding(built):
  """Every list probed and a shortlist as long as the database: the pipeline must return
  what an exact search among the QINCo2 decodings of all database codes returns, ids
  and distances. Without the re-rank (AQ distances) the answer is measurably worse."""
  _, ds, codec, db_codes, searcher = built
  full = codec.decode(np.asarray(db_codes), verbose=False).astype(np.float64)
  q = np.asarray(ds.queries, np.float64)
  dist = (q * q).sum(1)[:, None] - 2 * q @ full.T + (full * full).sum(1)[None]
  want_I = np.argsort(dist, axis=1, kind="stable")[:, :10]
  want_D = np.take_along_axis(dist, want_I, 1)
  n = len(ds.db)
  every = SearchParams(nprobe=16, ef_search=64, nshort=n, nmid_short=1)
  D, I, _ = searcher.search(ds.queries, k=10, params=every)
  np.testing.assert_allclose(D, want_D, rtol=1e-4, atol=1e-3)
  assert (I == want_I).mean() > 0.99  # the same ranking (float32 vs float64 near-ties)
  assert (I[:, 0] == want_I[:, 0]).all()
  # The same probe without the QINCo2 re-rank ranks by the AQ approximation.
  aq_only = dataclasses.replace(every, use_pairwise=False, use_qinco=False)
  D_aq, I_aq, _ = searcher.search(ds.queries, k=10, params=aq_only)
  top1_aq = (I_aq[:, 0] == want_I[:, 0]).mean()
  assert top1_aq < 0.95, top1_aq  # measured 0.71: the re-rank changes many answers
  assert not np.allclose(D_aq, want_D, rtol=1e-3)
  # A short pairwise shortlist then the re-rank: distances are still exact decodings.
  D_s, I_s, _ = searcher.search(ds.queries, k=10, params=SearchParams(
      nprobe=16, nshort=20, nmid_short=4))
  got = ((q[:, None, :] - full[I_s]) ** 2).sum(-1)
  np.testing.assert_allclose(D_s, got, rtol=1e-4, atol=1e-3)
  assert (I_s[:, 0] == want_I[:, 0]).mean() > top1_aq


def test_search_arguments_are_checked_and_k_results_come_back(built):
  _, ds, _, _, searcher = built
  q = ds.queries[:5]
  for bad, match in [(dict(k=0), "k must be"), (dict(k=2.5), "k must be"),
                     (dict(params=SearchParams(ef_search=0)), "ef_search must be"),
                     (dict(params=SearchParams(nprobe=0)), "nprobe must be"),
                     (dict(params=SearchParams(nshort=0)), "nshort must be"),
                     (dict(params=SearchParams(nmid_short=0)), "nmid_short must be"),
                     (dict(batch=0), "batch must be"), (dict(k=10**6), "k must be")]:
    with pytest.raises(ValueError, match=match):
      searcher.search(q, **{"k": 10, **bad})
  # k above the shortlist length: the shortlist grows to k (no -1 padding).
  D, I, _ = searcher.search(q, k=50, params=SearchParams(nprobe=16, nshort=10))
  assert (I >= 0).all() and np.isfinite(D).all()
  assert (np.diff(D, axis=1) >= 0).all()
  # Probing one list (~190 vectors on average) for k=500: fewer results for most
  # queries, and a warning says how many and why.
  n_short = None
  with pytest.warns(UserWarning, match="of 5 queries got fewer than min\\(k=500") as w:
    _, I, _ = searcher.search(q, k=500, params=SearchParams(nprobe=1, nshort=500))
  n_short = int(str(w[0].message).split()[0])
  assert n_short == (I[:, -1] == -1).sum() >= 1


def test_the_answer_does_not_depend_on_the_batch(built, monkeypatch):
  """Queries go through the stages in batches (by default sized by the first stage's
  candidates per query): any batch gives the same answer, and the default grows as
  the shortlist shrinks."""
  _, ds, _, _, searcher = built
  p = SearchParams(nprobe=4, nshort=5, nmid_short=2)
  want = searcher.search(ds.queries, k=5, params=p)[:2]
  for batch in (1, 7, None):
    got = searcher.search(ds.queries, k=5, params=p, batch=batch)[:2]
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
  assert query.first_stage_size(5, p) == 10  # nmid_short x nshort
  assert query.first_stage_size(20, p) == 40  # nshort grows to k
  assert query.first_stage_size(1, SearchParams(nshort=1, nmid_short=1)) == 1
  assert query.first_stage_size(1, SearchParams(nshort=5000, nmid_short=4)) == (
      query.MAX_SHORTLIST)
  sizes = []
  real = type(searcher)._search_batch
  monkeypatch.setattr(type(searcher), "_search_batch",
                      lambda self, q, *a: sizes.append(len(q)) or real(self, q, *a))
  monkeypatch.setattr(query, "BATCH_ROWS", 40)
  monkeypatch.setattr(query, "MIN_BATCH", 3)
  searcher.search(ds.queries[:25], k=5, params=p)  # 10 candidates: 4 queries a batch
  assert sizes == [4] * 6 + [1]


def test_sweep_logs_and_resumes(built):
  out, ds, _, _, searcher = built
  ranges = {"nprobe": [1, 4], "ef_search": [16], "nshort": [10, 50], "nmid_short": [1, 4]}
  log = out.parent / "sweep.jsonl"
  front = sweep.run_sweep(searcher, ds.queries, ds.gt, log, ranges=ranges, verbose=False)
  n_lines = len(reference.read_jsonl(log))
  assert 1 <= n_lines <= 8 and front
  sweep.run_sweep(searcher, ds.queries, ds.gt, log, ranges=ranges, verbose=False)
  assert len(reference.read_jsonl(log)) == n_lines  # nothing re-measured


class _FakeSearcher:
  """Accuracy grows with nprobe only; time (a scripted clock, no sleeping) grows with
  nprobe and nshort."""

  def __init__(self, n):
    self.n = n
    self.now = 0.0
    self.asked = []  # (nshort, k) of each search

  def clock(self):
    return self.now

  def search(self, queries, k, params):
    self.asked.append((params.nshort, k))
    self.now += 2e-3 * params.nprobe * params.nshort
    n_hit = min(self.n, self.n * params.nprobe // 8)  # R@1 = nprobe / 8, capped at 1
    I = np.full((len(queries), k), -1, np.int64)
    I[:n_hit, 0] = np.arange(n_hit)
    return None, I, {"ivf_aq": 0.0, "pairwise": 0.0, "decode": 0.0}


def test_sweep_prunes_dominated_settings(tmp_path):
  n = 40
  gt = np.arange(n)[:, None]
  ranges = {"nprobe": [1, 2, 4, 8, 16], "nshort": [1, 2, 4, 8]}
  fake = _FakeSearcher(n)
  front = sweep.run_sweep(fake, np.zeros((n, 2), np.float32), gt, tmp_path / "s.jsonl",
                          ranges=ranges, verbose=False, warmup=0, clock=fake.clock)
  log = reference.read_jsonl(tmp_path / "s.jsonl")
  # nshort > 1 only costs time, and nprobe 16 is no better than 8: the true front is
  # nshort = 1 with nprobe 1, 2, 4, 8.
  assert sorted(r["params"]["nprobe"] for r in front) == [1, 2, 4, 8]
  assert all(r["params"]["nshort"] == 1 for r in front)
  assert len(log) < 20  # of 20 settings: dominated ones were skipped
  # Each setting asks for its re-ranked shortlist's length: asking for 100 results
  # would re-rank 100 candidates whatever nshort says.
  assert fake.asked and all(k == nshort for nshort, k in fake.asked)
  for r in log:  # each setting's time is exactly what the clock was advanced by
    p = r["params"]
    assert r["ms_per_query"]["total"] == pytest.approx(2 * p["nprobe"] * p["nshort"] / n)


def test_sweep_holds_ef_search_when_the_list_search_is_exact(tmp_path):
  fake = _FakeSearcher(8)
  fake.index = type("Exact", (), {"exact_coarse": True})()
  ranges = {"nprobe": [1, 8], "ef_search": [16, 32, 64], "nshort": [1]}
  sweep.run_sweep(fake, np.zeros((8, 2), np.float32), np.arange(8)[:, None],
                  tmp_path / "s.jsonl", ranges=ranges, verbose=False, warmup=0,
                  clock=fake.clock, base=SearchParams(ef_search=48))
  assert {r["params"]["ef_search"] for r in reference.read_jsonl(tmp_path / "s.jsonl")} == {48}


def _aq_reference(index, q, nprobe, metric):
  """Per query, the exact (float64) AQ scores of every vector in the nprobe lists
  nearest it, with the stored byte of the norm term: (scores sorted best first, ids)."""
  c = index.centroids.astype(np.float64)
  x_hat = c[index.lists] + aq.aq_decode(index.tables, index.codes).astype(np.float64)
  out = []
  for qi in q.astype(np.float64):
    if metric == "ip":
      probed = np.argsort(-(c @ qi), kind="stable")[:nprobe]
    else:
      probed = np.argsort(((c - qi) ** 2).sum(1), kind="stable")[:nprobe]
    rows = np.flatnonzero(np.isin(index.lists, probed))
    if metric == "ip":
      s = x_hat[rows] @ qi
      order = np.argsort(-s, kind="stable")
    else:
      # ||q - x_hat||^2 with v = -(||x_hat||^2 - ||c||^2) / 2 replaced by its level.
      v = -0.5 * ((x_hat[rows] ** 2).sum(1) - (c[index.lists[rows]] ** 2).sum(1))
      lv = index.levels.astype(np.float64)
      v_hat = lv[np.abs(v[:, None] - lv[None, :]).argmin(1)]
      s = ((x_hat[rows] - qi) ** 2).sum(1) - 2 * (v_hat - v)
      order = np.argsort(s, kind="stable")
    out.append((s[order], index.ids[rows[order]]))
  return out


def _stored(index, list_no):
  """(ids (n,), codes (n, M)) that faiss's own inverted list holds (its labels: row
  numbers in memory, ids on disk)."""
  import faiss
  inv, size = index.scanner.invlists, index.scanner.code_size
  n = inv.list_size(list_no)
  labels = faiss.rev_swig_ptr(inv.get_ids(list_no), n).copy()
  raw = faiss.rev_swig_ptr(inv.get_codes(list_no), n * size).copy()
  ids = labels if index.disk is not None else index.ids[labels]
  return ids, raw.reshape(n, size)[:, :index.M].astype(np.int32)


def _random_index_inputs(rng, K_ivf, M, D, n):
  """Random centroids (K_IVF, D), AQ tables (M, 256, D) and codes (n, M + 1)."""
  cents = rng.normal(size=(K_ivf, D)).astype(np.float32)
  tables = 0.3 * rng.normal(size=(M, 256, D)).astype(np.float32)
  codes = np.concatenate([rng.integers(0, K_ivf, (n, 1)), rng.integers(0, 256, (n, M))], 1)
  return cents, tables, codes


@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_aq_stage_scores_exact_distances_with_one_table_per_query(metric):
  """The AQ stage (one look-up table per query, faiss's PQ scanner in a lifted space)
  returns the exact AQ distances of the vectors in the nprobe nearest lists, against
  a float64 NumPy computation, with an exact or an HNSW coarse search (whose
  efSearch is the one asked for)."""
  from qinco_jax.search import Searcher

  rng = np.random.default_rng(0)
  K_ivf, M, D, n = 1024, 4, 16, 20_000
  cents, tables, codes = _random_index_inputs(rng, K_ivf, M, D, n)
  ids = rng.permutation(10 * n)[:n]  # the caller's ids, not row numbers
  index = index_lib.build_index(cents, tables, codes[:5000], codes, ids, metric=metric)
  searcher = Searcher(codec=None, index=index, centroids=cents)
  q = rng.normal(size=(50, D)).astype(np.float32)
  p = SearchParams(nprobe=4, ef_search=256, nshort=30, use_pairwise=False, use_qinco=False)
  Dq, I, _ = searcher.search(q, k=30, params=p)
  for i, (s, ref_ids) in enumerate(_aq_reference(index, q, 4, metric)):
    np.testing.assert_array_equal(I[i], ref_ids[:30])
    np.testing.assert_allclose(Dq[i], s[:30], rtol=1e-4, atol=1e-4)
  if metric == "l2":  # the norm byte: a 256-level k-means of v, error << its spread
    c = cents.astype(np.float64)[codes[:, 0]]
    x_hat = c + aq.aq_decode(tables, codes[:, 1:]).astype(np.float64)
    v = -0.5 * ((x_hat ** 2).sum(1) - (c ** 2).sum(1))  # from ||c + x_hat||^2, by hand
    lv = index.levels.astype(np.float64)
    v_hat = lv[np.abs(v[:, None] - lv[None, :]).argmin(1)]  # nearest level, brute force
    assert np.abs(v_hat - v).mean() < 0.01 * v.std()
  # An HNSW coarse search (what "auto" picks above 4096 lists): a wide beam finds the
  # same lists as the exact search; efSearch reaches it (a one-node beam misses some).
  graph = index_lib.build_index(cents, tables, codes[:5000], codes, ids, metric=metric,
                                coarse="hnsw")
  searcher = Searcher(codec=None, index=graph, centroids=cents)
  np.testing.assert_array_equal(searcher.search(q, k=30, params=p)[1], I)
  poor = searcher.search(q, k=30, params=dataclasses.replace(p, ef_search=1))[1]
  assert (poor != I).any()


def test_index_remove_and_reload_keep_what_was_stored(tmp_path):
  rng = np.random.default_rng(1)
  K_ivf, M, D, n = 32, 3, 8, 3000
  cents, tables, codes = _random_index_inputs(rng, K_ivf, M, D, n)
  full = index_lib.build_index(cents, tables, codes, codes)
  drop = rng.choice(n, 700, replace=False)
  assert full.remove_ids(np.concatenate([drop, [10 * n]])) == 700
  keep = np.setdiff1d(np.arange(n), drop)
  fresh = index_lib.build_index(cents, tables, codes, codes[keep], keep)
  full.save(tmp_path / "lists")
  reloaded = index_lib.IVFIndex.open(tmp_path / "lists")
  q = rng.normal(size=(40, D)).astype(np.float32)
  want = fresh.search(q, 20, nprobe=3, ef_search=64)
  for index in (full, reloaded):
    assert index.ntotal == n - 700
    got = index.search(q, 20, nprobe=3, ef_search=64)
    np.testing.assert_array_equal(got[3], want[3])
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
  ids7, codes7 = _stored(reloaded, 7)
  np.testing.assert_array_equal(codes7, codes[ids7, 1:])
  assert set(ids7) == set(keep[codes[keep, 0] == 7])
  with pytest.raises(ValueError, match=r"ids must lie in 0..2\*\*63-1.*got -1"):
    full.add(codes[:2], np.array([-1, 3]))


def test_removing_ids_from_a_loaded_index_on_disk_equals_removing_them_in_memory(built,
                                                                               tmp_path):
  """Index.remove_ids(ids, path=...) (the offline compaction) saves an index that
  answers as the same removal in memory, leaves the loaded index's own files intact,
  and works in place (its checksums then verify on loading)."""
  import shutil
  path, ds, _, _, _ = built
  drop = np.arange(0, 3000, 7)
  mem = qj.load_index(path, mmap=False)
  assert mem.remove_ids(drop) == len(drop)
  want = mem.search(ds.queries, 10, nprobe=8, nshort=50)
  disk = qj.load_index(path)
  assert disk.remove_ids(drop, path=tmp_path / "compact") == len(drop)
  assert disk._ivf.disk is not None  # still memory-mapped
  copy = tmp_path / "copy"
  shutil.copytree(path, copy)
  in_place = qj.load_index(copy)
  assert in_place.remove_ids(drop, path=copy) == len(drop)
  for index in (disk, qj.load_index(tmp_path / "compact"), in_place, qj.load_index(copy)):
    assert index.ntotal == 3000 - len(drop)
    got = index.search(ds.queries, 10, nprobe=8, nshort=50)
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_array_equal(got[0], want[0])
  assert qj.load_index(path).ntotal == 3000


def test_list_ids_and_codes_outside_their_ranges_are_refused():
  """A list id >= nlist, or a code >= 256 in any of the M columns (stored in one
  byte, it would wrap to another codeword), is refused naming both ranges, and
  nothing is added; the largest valid values are stored as they are."""
  rng = np.random.default_rng(3)
  K_ivf, M, D, n = 8, 3, 4, 50
  cents, tables, codes = _random_index_inputs(rng, K_ivf, M, D, n)
  index = index_lib.build_index(cents, tables, codes, codes)
  top = np.array([[K_ivf - 1] + [255] * M])
  for col in range(M + 1):
    wrong = np.concatenate([codes[:3], top])
    wrong[3, col] += 1
    with pytest.raises(ValueError, match=r"list ids must lie in 0\.\.7 and codes in "
                                         r"0\.\.255"):
      index.add(wrong)
    assert index.ntotal == n
  index.add(top, np.array([10 * n]))
  assert index.ntotal == n + 1
  np.testing.assert_array_equal(_stored(index, K_ivf - 1)[1][-1], [255] * M)


def test_lists_whose_arrays_hold_pickled_objects_are_refused_unread(tmp_path):
  """Saved lists are plain arrays: an array file holding a pickle (which loading
  would run) is refused as unreadable, naming the directory."""
  rng = np.random.default_rng(4)
  cents, tables, codes = _random_index_inputs(rng, 8, 2, 4, 40)
  index_lib.build_index(cents, tables, codes, codes).save(tmp_path / "lists")
  np.save(tmp_path / "lists" / "centroids.npy", np.array([{"a": 1}], dtype=object),
          allow_pickle=True)
  with pytest.raises(ValueError, match=r"inverted lists '.*lists' cannot be read: .*"
                                       r"allow_pickle=False"):
    index_lib.IVFIndex.open(tmp_path / "lists")

@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_many_small_adds_store_what_one_add_stores_with_few_copies(metric, tmp_path):
  """Adding rows in 300 calls gives the rows, faiss lists and search results of one
  call, and the row arrays are reallocated O(log n) times, not once per call; so do
  removing rows then adding them back, and reloading in several chunks."""
  rng = np.random.default_rng(2)
  K_ivf, M, D, n = 16, 3, 8, 3000
  cents, tables, codes = _random_index_inputs(rng, K_ivf, M, D, n)
  ids = rng.permutation(5 * n)[:n]
  once = index_lib.build_index(cents, tables, codes, codes, ids, metric=metric)
  parts = index_lib.build_index(cents, tables, codes, codes[:0], ids[:0], metric=metric)
  buffers = []  # held, so that no two distinct buffers share an id()
  for s in range(0, n, 10):
    parts.add(codes[s:s + 10], ids[s:s + 10])
    buffers.append(parts._rows.buf["codes"])
  assert len({id(b) for b in buffers}) == 3  # 1024 rows, then doubled: 2048, 4096
  # The rows are the inputs, in order (and the norm bytes those of one add).
  rows, rows_once = parts.rows(), once.rows()
  np.testing.assert_array_equal(rows["lists"], codes[:, 0])
  np.testing.assert_array_equal(rows["codes"], codes[:, 1:])
  np.testing.assert_array_equal(rows["ids"], ids)
  assert ("vcodes" in rows) == (metric == "l2")
  if metric == "l2":
    np.testing.assert_array_equal(rows["vcodes"], rows_once["vcodes"])
  for l in (0, 5, 15):
    for a, b in zip(_stored(parts, l), _stored(once, l)):
      np.testing.assert_array_equal(np.sort(a, axis=0), np.sort(b, axis=0))
  q = rng.normal(size=(30, D)).astype(np.float32)
  want = once.search(q, 15, 3, 64)
  back = index_lib.build_index(cents, tables, codes, codes, ids, metric=metric)
  assert back.remove_ids(ids[:1000]) == 1000
  back.add(codes[:1000], ids[:1000])  # the same rows, now stored last
  parts.save(tmp_path / "parts")
  for index in (parts, back, index_lib.IVFIndex.open(tmp_path / "parts"),
                index_lib.IVFIndex.open(tmp_path / "parts", mmap=False)):
    assert index.ntotal == n
    got = index.search(q, 15, 3, 64)
    np.testing.assert_array_equal(got[3], want[3])
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6)


def test_concurrent_searches_with_different_nprobe_match_sequential_ones():
  """nprobe goes to faiss per call: two threads searching the same index with
  different nprobe get what each gets alone."""
  from concurrent.futures import ThreadPoolExecutor

  rng = np.random.default_rng(2)
  K_ivf, M, D, n = 64, 3, 8, 20_000
  cents, tables, codes = _random_index_inputs(rng, K_ivf, M, D, n)
  index = index_lib.build_index(cents, tables, codes, codes)
  q = rng.normal(size=(2000, D)).astype(np.float32)
  alone = {p: index.search(q, 10, nprobe=p, ef_search=16)[3] for p in (1, 16)}
  with ThreadPoolExecutor(2) as pool:
    for _ in range(3):
      futures = {p: pool.submit(index.search, q, 10, p, 16) for p in (1, 16)}
      for p, f in futures.items():
        np.testing.assert_array_equal(f.result()[3], alone[p])


def test_a_sweep_log_of_another_index_is_not_reused(tmp_path):
  """Records carry the label they were measured under (the index's fingerprint in the
  search job): a log kept from an earlier index is measured again, not reprinted."""
  ranges = {"nprobe": [1, 2, 4], "nshort": [1, 2]}
  log = tmp_path / "s.jsonl"
  runs = {}
  for name in ("old", "new", "new"):
    fake = _FakeSearcher(16)
    sweep.run_sweep(fake, np.zeros((16, 2), np.float32), np.arange(16)[:, None], log,
                    ranges=ranges, verbose=False, warmup=0, clock=fake.clock,
                    label={"index": name})
    runs.setdefault(name, []).append(len(fake.asked))
  assert runs["new"][0] == runs["old"][0] > 0  # measured again for the new index
  assert runs["new"][1] == 0  # then reused
  assert len(sweep.read_log(log, {"index": "new"})) == len(sweep.read_log(log, {"index": "old"}))
  assert {r["index"] for r in reference.read_jsonl(log)} == {"old", "new"}


def test_sweep_announces_each_setting_before_it_runs(tmp_path, capsys):
  """A setting can search for minutes: its line is printed before its searches (the
  warm-up's and the timed one) start, its result after."""
  fake = _FakeSearcher(8)
  seen = []
  search = fake.search

  def announced_search(queries, k, params):
    seen.append((params.nprobe, capsys.readouterr().out))
    return search(queries, k, params)

  fake.search = announced_search
  sweep.run_sweep(fake, np.zeros((8, 2), np.float32), np.arange(8)[:, None],
                  tmp_path / "s.jsonl", ranges={"nprobe": [1, 8], "nshort": [1]},
                  warmup=8, clock=fake.clock, max_experiments=5)
  assert [p for p, _ in seen] == [1, 1, 8, 8]  # warm-up and timed search of each
  assert seen[0][1] == "setting 1 of at most 5: {'nprobe': 1, 'nshort': 1} on 8 queries ...\n"
  assert seen[1][1] == ""  # the timed search follows at once
  assert seen[2][1] == ("{'nprobe': 1, 'nshort': 1}: R@1 0.1250 0.250 ms/q\n"
                        "setting 2 of at most 5: {'nprobe': 8, 'nshort': 1} on 8 queries ...\n")
