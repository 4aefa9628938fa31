"""The coarse quantiser (`search.coarse`): the encoder's IVF step from coarse-index
candidates against the exhaustive step, the two-level K-means against NumPy Lloyd and
faiss's exact K-means, and the list search's recall against exact search."""

import numpy as np
import pytest

import qinco_jax as qj
from qinco_jax.search import coarse
from qinco_jax.search import lists as lists_lib
from tests import reference


@pytest.fixture(scope="module")
def codec_300():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((4000, 8)).astype(np.float32)
  cfg = qj.QincoConfig(K=16, M=2, L=1, de=8, dh=8, A=4, B=4, ivf_K=300)
  codec = qj.Codec.create(cfg, x, verbose=False, ivf_centroids=x[:300] * 1.3)
  return reference.randomize(codec, seed=0), rng.standard_normal((700, 8)).astype(np.float32)


@pytest.mark.parametrize("kind, ef", [("flat", 0), ("hnsw", 400)])
def test_ivf_candidates_from_an_exact_list_search_give_the_exhaustive_codes(codec_300, kind,
                                                                            ef):
  """The IVF step choosing among the B nearest lists of a flat search (or of an HNSW
  search wide enough to be exact here) gives the codes of the step scoring all 300
  centroids, for several beams; candidates missing the nearest list change them."""
  codec, x = codec_300
  cents = np.asarray(codec.model().ivf_centroids[...]) * float(
      codec.model().data_std[...]) + np.asarray(codec.model().data_mean[...])
  index = coarse.build_coarse(cents, kind)
  assert coarse.list_search_recall(index, cents, x, 4, [max(ef, 1)])[max(ef, 1)] == 1.0
  for A, B in ((4, 4), (0, 1), (2, 3)):
    want = codec.encode(x, A=A, B=B, verbose=False)
    got = codec.encode(x, A=A, B=B, verbose=False,
                       ivf_candidates=coarse.candidates(index, B, ef))
    np.testing.assert_array_equal(got, want)
  # Candidates without the nearest list: the step takes the best of those offered.
  second = lambda q: coarse.search_lists(index, q, 3, ef)[1][:, 1:]
  got = codec.encode(x, verbose=False, ivf_candidates=second)
  assert (got[:, 0] != want[:, 0]).all()
  with pytest.raises(ValueError, match=r"found no list for row 0 \(and 511 more of rows 0..511"):
    codec.encode(x, verbose=False, chunk_size=512,
                 ivf_candidates=lambda q: -np.ones((len(q), 2), int))


def test_the_list_search_recall_grows_with_ef_search():
  rng = np.random.default_rng(1)
  cents = rng.standard_normal((5000, 16)).astype(np.float32)
  q = rng.standard_normal((200, 16)).astype(np.float32)
  graph = coarse.build_coarse(cents, "auto", ef_construction=40)
  assert not coarse.is_exact(graph)
  r = coarse.list_search_recall(graph, cents, q, 16, [16, 256])
  exact = [len(np.intersect1d(a, b)) for a, b in zip(
      coarse.search_lists(graph, q, 16, 256)[1],
      np.argsort(((q[:, None] - cents[None]) ** 2).sum(-1), 1)[:, :16])]
  assert r[256] == pytest.approx(np.mean(exact) / 16)  # against NumPy's exact search
  assert r[16] < r[256] and r[256] > 0.95


def test_the_hnsw_list_search_has_the_asked_neighbours_per_node():
  """hnsw_M is faiss's M (2M links per node on the base level, M above), the default
  is HNSW_M, and a graph without neighbours is refused with one line."""
  import faiss
  cents = np.random.default_rng(4).standard_normal((600, 8)).astype(np.float32)
  for M, kw in ((coarse.HNSW_M, {}), (12, {"hnsw_M": 12})):
    graph = coarse.build_coarse(cents, "hnsw", **kw)
    per_level = np.diff(faiss.vector_to_array(graph.hnsw.cum_nneighbor_per_level))
    assert per_level[0] == 2 * M and (per_level[1:] == M).all()
    assert graph.hnsw.efConstruction == coarse.EF_CONSTRUCTION
  with pytest.raises(ValueError, match="hnsw_M must be >= 2, got 1"):
    coarse.build_coarse(cents, "hnsw", hnsw_M=1)


def test_the_hnsw_list_search_is_built_in_blocks_with_a_progress_bar(monkeypatch, capsys):
  """Added in blocks, the graph holds every centroid once (an exact search through it at
  a large efSearch finds each centroid itself) and the bar counts them with a rate."""
  rng = np.random.default_rng(2)
  cents = rng.standard_normal((5000, 16)).astype(np.float32)
  monkeypatch.setattr(coarse, "HNSW_ADD_ROWS", 1200)
  graph = coarse.build_coarse(cents, "hnsw", verbose=True)
  assert graph.ntotal == 5000
  _, nearest = coarse.search_lists(graph, cents, 1, 256)
  np.testing.assert_array_equal(nearest[:, 0], np.arange(5000))
  err = capsys.readouterr().err
  assert "ivf: list search (HNSW)" in err and "5.00k/5.00k" in err and "list/s" in err
  coarse.build_coarse(cents, "hnsw")  # quiet unless verbose
  assert "list search" not in capsys.readouterr().err


def test_lloyd_groups_equal_numpy_lloyd():
  """Each group's batched Lloyd iterations are plain Lloyd on its own rows and lists
  (padding rows and lists ignored), against NumPy in float64."""
  rng = np.random.default_rng(2)
  G, R, Kg, D = 3, 64, 8, 4
  x = rng.standard_normal((G, R, D)).astype(np.float32)
  w = np.ones((G, R), np.float32)
  w[1, 40:] = 0  # group 1 holds 40 rows
  mask = np.ones((G, Kg), bool)
  mask[2, 5:] = False  # group 2 has 5 lists
  C0 = x[:, :Kg].copy()
  got = np.asarray(coarse._lloyd_groups(x, w, C0, mask, n_iter=5))
  for g in range(G):
    rows = x[g][w[g] > 0].astype(np.float64)
    C = C0[g][mask[g]].astype(np.float64)
    for _ in range(5):
      a = ((rows[:, None] - C[None]) ** 2).sum(-1).argmin(1)
      C = np.stack([rows[a == k].mean(0) if (a == k).any() else C[k] for k in range(len(C))])
    np.testing.assert_allclose(got[g][mask[g]], C, rtol=1e-4, atol=1e-5)


def test_two_level_kmeans_nears_exact_kmeans():
  """At 256 lists the two-level K-means leaves within 10% of the squared error of
  faiss's exact K-means (100 iterations) on the same rows, with every list used."""
  import faiss
  ds = qj.data.load_synthetic(n_train=256 * 64, n_db=10, n_queries=0, d=16, n_val=10)
  x = np.asarray(ds.train, np.float32)
  two = coarse.two_level_kmeans(x, 256, seed=0)
  km = faiss.Kmeans(16, 256, niter=100, seed=0)
  km.train(x)
  err = {}
  for name, c in (("two", two), ("faiss", km.centroids)):
    d, a = faiss.knn(x, np.ascontiguousarray(c, np.float32), 1)
    err[name] = float(d.mean())
    if name == "two":
      assert len(np.unique(a)) == 256
  assert err["two"] < 1.1 * err["faiss"], err
  sizes = np.array([5, 100, 1, 300])
  k = coarse.allocate(sizes, 40)
  assert k.sum() == 40 and (k >= 1).all() and (k <= sizes).all()
  # Shares 40 * sizes / 406 = 0.49, 9.85, 0.10, 29.56: floors 0, 9, 0, 29, raised to 1.
  np.testing.assert_array_equal(k, [1, 9, 1, 29])
  # Shares 1.43, 4.29, 14.29 (sum of floors 19): the largest remainder, 0.43, gets +1.
  np.testing.assert_array_equal(coarse.allocate(np.array([10, 30, 100]), 20), [2, 4, 14])


def test_an_index_with_a_graph_encodes_through_it(monkeypatch):
  """`Index.add` takes the IVF step's candidates from an HNSW list search (here wide
  enough to be exact): the codes equal those of the exhaustive step; with an exact
  list search the encoder keeps its own exhaustive step."""
  rng = np.random.default_rng(3)
  x = rng.standard_normal((3000, 8)).astype(np.float32)
  cfg = qj.QincoConfig(K=256, M=2, L=1, de=8, dh=8, A=4, B=4, ivf_K=300)
  codec = qj.Codec.create(cfg, x, verbose=False, ivf_centroids=x[:300] * 1.3)
  monkeypatch.setattr(coarse, "ENCODE_EF_SEARCH", 400)
  index = qj.Index(codec, coarse="hnsw")
  index.train(x)
  assert "ivf_candidates" in index.encode_kw()
  np.testing.assert_array_equal(index.add(x[:500]), codec.encode(x[:500], verbose=False))
  flat = qj.Index(codec, coarse="flat")
  flat.train(x)
  assert flat.encode_kw() == {} and isinstance(flat._ivf, lists_lib.IVFIndex)
  # 4-bit codes: the fast-scan lists take the same graph, and the encoder goes through it
  k16 = qj.Codec.create(qj.QincoConfig(K=16, M=2, L=1, de=8, dh=8, A=4, B=4, ivf_K=300),
                        x, verbose=False, ivf_centroids=x[:300] * 1.3)
  index = qj.Index(k16, coarse="hnsw")
  index.train(x)
  assert "ivf_candidates" in index.encode_kw() and index._ivf.K == 16
  np.testing.assert_array_equal(index.add(x[:500]), k16.encode(x[:500], verbose=False))
