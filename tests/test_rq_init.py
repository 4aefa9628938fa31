"""The RQ initialisation (rq_init) against NumPy: Lloyd, progressive stages, cluster
splitting, beam RQ encoding, k-means++ seeding. (The joint refit is `aq.fit_aq`,
tested against lstsq in test_aq.py.)"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qinco_jax import data, rq_init


def _blobs(n=3000, d=6, k=12, seed=0):
  rng = np.random.default_rng(seed)
  centers = 4.0 * rng.standard_normal((k, d))
  return (centers[rng.integers(0, k, n)] + rng.standard_normal((n, d))).astype(np.float32)


def test_kmeans_without_splitting_is_lloyd():
  """split_iters=0 on data with no empty cluster: plain Lloyd from K random points,
  replayed in float64 NumPy from the same seeds."""
  x = _blobs()
  K, seed = 16, 3
  C = x[np.sort(np.random.default_rng(seed).choice(len(x), K, replace=False))].astype(np.float64)
  for _ in range(7):
    a = ((x[:, None, :] - C[None]) ** 2).sum(-1).argmin(1)
    assert np.bincount(a, minlength=K).min() > 0  # the test's premise
    C = np.stack([x[a == k].mean(0) for k in range(K)])
  ours = rq_init.kmeans(x, K, n_iter=7, seed=seed, split_iters=0)
  np.testing.assert_allclose(ours, C, atol=1e-4)


def test_split_moves_small_clusters_next_to_large_ones():
  """By hand, e = (+1, -1, +1) / 1024. Counts (0, 10, 1) with below=0: only cluster 1
  can give, so C0 = c1 (1 + e), C1 = c1 (1 - e), C2 untouched. Counts (1, 10, 0) with
  below=1: cluster 0 takes half of cluster 1 as before, then cluster 2 takes half of
  cluster 0 or 1 (5 points each): one of two outcomes."""
  c1, c2 = np.array([4.0, 5.0, 6.0]), np.array([1.0, 2.0, 3.0])
  e = np.array([1.0, -1.0, 1.0]) / 1024
  C = np.stack([np.zeros(3), c1, c2]).astype(np.float32)
  rq_init._split_empty(C, np.array([0.0, 10.0, 1.0]), np.random.default_rng(0))
  np.testing.assert_allclose(C, np.stack([c1 * (1 + e), c1 * (1 - e), c2]), rtol=1e-6)
  outcomes = [np.stack([c1 * (1 + e) * (1 - e), c1 * (1 - e), c1 * (1 + e) ** 2]),
              np.stack([c1 * (1 + e), c1 * (1 - e) ** 2, c1 * (1 - e) * (1 + e)])]
  for seed in range(6):
    C = np.stack([np.zeros(3), c1, c2]).astype(np.float32)
    rq_init._split_empty(C, np.array([1.0, 10.0, 0.0]), np.random.default_rng(seed), below=1)
    assert any(np.allclose(C, o, rtol=1e-6) for o in outcomes), C


def test_split_rescues_a_hub_seed():
  """Residual-like data: a shell of vectors of norm ~3 plus a few exact zeros (the
  residuals of singleton clusters). A zero seed is nearest to every vector of the
  shell, so Lloyd from random points keeps one giant cluster; splitting small
  clusters in the first iterations gives a lower objective and no giant cluster."""
  rng = np.random.default_rng(1)
  x = rng.standard_normal((4000, 16)).astype(np.float32)
  x[:40] = 0.0
  K = 64
  seed = next(s for s in range(100)  # a seed whose random init holds a zero vector
              if (np.random.default_rng(s).choice(len(x), K, replace=False) < 40).any())
  results = {}
  for split in (0, 3):
    C = rq_init.kmeans(x, K, n_iter=5, seed=seed, split_iters=split)
    ids, err = rq_init.assign(x, C)
    results[split] = (err / len(x), np.bincount(ids, minlength=K).max())
  assert results[3][0] < results[0][0]
  assert results[3][1] < results[0][1]


def _tables(M=3, K=16, d=8, seed=0):
  x = _blobs(2000, d, 20, seed)
  return x, np.stack(rq_init.train_rq(x, K, M, seed=seed)[0])


def test_rq_encode_greedy_equals_numpy_and_full_beam_is_exhaustive():
  x, T = _tables()
  M, K, _ = T.shape
  r, codes = x.astype(np.float64), np.zeros((len(x), M), np.int64)
  for m in range(M):
    codes[:, m] = ((r[:, None, :] - T[m][None]) ** 2).sum(-1).argmin(1)
    r -= T[m][codes[:, m]]
  np.testing.assert_array_equal(rq_init.rq_encode(x, T, B=1), codes)
  # A beam of K^(M-1) keeps every prefix: the exact optimum over all K^M codes.
  q = x[:100]
  combos = np.array(list(itertools.product(range(K), repeat=M)))
  rec = sum(T[m][combos[:, m]] for m in range(M))
  best = ((q[:, None, :].astype(np.float64) - rec[None]) ** 2).sum(-1).min(1)
  c = rq_init.rq_encode(q, T, B=K ** (M - 1))
  err = ((q - sum(T[m][c[:, m]] for m in range(M))) ** 2).sum(1)
  np.testing.assert_allclose(err, best, rtol=1e-4, atol=1e-4)


def test_kmeanspp_seeds_are_distinct_data_points():
  x = _blobs(500, 4, 8)
  C = np.asarray(rq_init._kmeanspp(x, jax.random.key(0), 8))
  assert len({tuple(c) for c in C}) == 8
  assert all((np.abs(x - c).sum(1) == 0).any() for c in C)
  with pytest.raises(ValueError, match="init must be 'random'"):
    rq_init.kmeans(x, 8, init="forgy")
  with pytest.raises(ValueError, match=r"expected shape \(8, 4\), got \(3, 4\)"):
    rq_init.kmeans(x, 8, init=np.zeros((3, 4), np.float32))


def test_embedding_mixture_is_unit_norm_and_reproducible():
  a = data.load_embedding_mixture(n_train=300, n_db=50, n_val=20, d=64)
  b = data.load_embedding_mixture(n_train=300, n_db=50, n_val=20, d=64)
  assert a.train.shape == (300, 64) and a.val.shape == (20, 64) and a.db.shape == (50, 64)
  np.testing.assert_allclose(np.linalg.norm(a.db, axis=1), 1.0, rtol=1e-5)
  np.testing.assert_array_equal(a.train, b.train)


@pytest.mark.parametrize("points", [None, 64])
def test_progressive_kmeans_replayed_in_numpy(monkeypatch, points):
  """init="progressive" without splitting: Lloyd in the first d^(i/10) principal axes
  (1-d first, from K random points), each stage started from the last one's centroids
  padded with zeros, PROGRESSIVE_ITERS iterations per stage and n_iter in the full
  space; the stages before the last on a random subset of PROGRESSIVE_POINTS * K rows
  when there are more (points=64: 512 of 2,000), the last on all. Replayed in float64
  NumPy (eigh of the covariance)."""
  if points:
    monkeypatch.setattr(rq_init, "PROGRESSIVE_POINTS", points)
  x = _blobs(2000, 8, 10, seed=2)
  K, n_iter, seed = 8, 6, 1
  xc = x - x.mean(0)
  w, V = np.linalg.eigh(xc.T.astype(np.float64) @ xc / len(x))
  y = xc @ V[:, ::-1]
  sub = y
  if rq_init.PROGRESSIVE_POINTS * K < len(y):
    rng = np.random.default_rng(seed)
    sub = y[np.sort(rng.choice(len(y), rq_init.PROGRESSIVE_POINTS * K, replace=False))]
  C = None
  for i in range(rq_init.PROGRESSIVE_STEPS):
    di = max(int(8 ** ((1 + i) / rq_init.PROGRESSIVE_STEPS)), 1)
    last = i == rq_init.PROGRESSIVE_STEPS - 1
    z = y if last else sub
    if C is None:
      rng = np.random.default_rng(seed)
      C = z[np.sort(rng.choice(len(z), K, replace=False)), :di]
    else:
      C = np.pad(C, ((0, 0), (0, di - C.shape[1])))
    for _ in range(n_iter if last else rq_init.PROGRESSIVE_ITERS):
      a = ((z[:, None, :di] - C[None]) ** 2).sum(-1).argmin(1)
      assert np.bincount(a, minlength=K).min() > 0  # the test's premise
      C = np.stack([z[a == k, :di].mean(0) for k in range(K)])
  expected = C @ V[:, ::-1].T + x.mean(0)
  ours = rq_init.kmeans(x, K, n_iter=n_iter, seed=seed, init="progressive", split_iters=0)
  np.testing.assert_allclose(ours, expected, atol=2e-3)


# --------------------------------------------------------------------------------------
# Weighted K-means and the residual K-means (also used by pairwise.ivf_extra_codes)


def _weighted_blobs(n=1500, d=5, k=10, seed=0):
  x = _blobs(n, d, k, seed)
  w = np.random.default_rng(seed + 1).integers(0, 30, n)  # some rows weigh 0
  return x, w


def test_weighted_kmeans_is_weighted_lloyd_and_stops_when_converged(monkeypatch):
  """split_iters=0, init="random" with weights: K distinct rows of positive weight drawn
  with probability proportional to the weight (`np.random.default_rng(seed).choice`
  among them, sorted), then weighted means, replayed in float64 NumPy for 60
  iterations; Lloyd converges well before, and kmeans stops there (fewer device
  iterations, the same centroids, on_iteration still called 60 times)."""
  x, w = _weighted_blobs()
  K, seed = 12, 4
  pos = np.flatnonzero(w > 0)
  rng = np.random.default_rng(seed)
  C = x[np.sort(rng.choice(pos, K, replace=False, p=w[pos] / w[pos].sum()))].astype(np.float64)
  for _ in range(60):
    a = ((x[:, None, :] - C[None]) ** 2).sum(-1).argmin(1)
    mass = np.bincount(a, weights=w, minlength=K)
    assert mass.min() > 0  # the test's premise
    C = np.stack([(w[a == k, None] * x[a == k]).sum(0) / mass[k] for k in range(K)])
  calls, ticks = [], []
  lloyd = rq_init._lloyd_sums
  monkeypatch.setattr(rq_init, "_lloyd_sums", lambda *a, **k: calls.append(1) or lloyd(*a, **k))
  ours = rq_init.kmeans(x, K, n_iter=60, seed=seed, split_iters=0, weights=w,
                        on_iteration=lambda: ticks.append(1))
  np.testing.assert_allclose(ours, C, atol=1e-4)
  assert len(calls) < 30 and len(ticks) == 60
  # Stopping early changes nothing: the same centroids as running exactly that long.
  np.testing.assert_array_equal(
      rq_init.kmeans(x, K, n_iter=len(calls), seed=seed, split_iters=0, weights=w), ours)


def test_integer_weights_count_as_repeated_rows():
  x, w = _weighted_blobs(600, seed=2)
  C0 = x[:8] + 0.5
  ours = rq_init.kmeans(x, 8, n_iter=6, init=C0, split_iters=0, weights=w)
  repeated = rq_init.kmeans(np.repeat(x, w, axis=0), 8, n_iter=6, init=C0, split_iters=0)
  np.testing.assert_allclose(ours, repeated, atol=1e-4)


def test_weighted_seeds_are_drawn_by_weight():
  weights = np.zeros(40)
  heavy = np.arange(0, 40, 4)  # 10 weighted rows
  weights[heavy] = np.arange(1, 11)
  for seed in range(20):
    idx = rq_init._weighted_sample(np.random.default_rng(seed), weights, 6)
    assert len(set(idx.tolist())) == 6 and (weights[idx] > 0).all()
  # Sampling is proportional to the weights.
  rng = np.random.default_rng(0)
  hits = np.bincount([rq_init._weighted_sample(rng, weights, 1)[0] for _ in range(2000)],
                     minlength=40)
  np.testing.assert_allclose(hits[heavy] / 2000, weights[heavy] / weights.sum(), atol=0.03)
  # Fewer weighted rows than K: all of them, topped up with distinct others.
  idx = rq_init._weighted_sample(np.random.default_rng(0), weights, 15)
  assert len(set(idx.tolist())) == 15 and set(heavy) <= set(idx.tolist())


@pytest.mark.parametrize("init", ["random", "kmeans++", "progressive"])
def test_rows_of_zero_weight_do_not_move_the_centroids(init):
  """Far-away rows of weight 0 (with splitting, the default): no centroid goes near
  them, and the weighted error is that of the same fit without them, give or take."""
  x, w = _weighted_blobs(1200, seed=3)
  w = np.maximum(w, 1)
  far = 100.0 + np.random.default_rng(0).standard_normal((60, x.shape[1])).astype(np.float32)
  C = rq_init.kmeans(np.concatenate([x, far]), 10, n_iter=8, init=init,
                     weights=np.concatenate([w, np.zeros(60, np.int64)]))
  assert np.abs(C).max() < 30
  alone = rq_init.kmeans(x, 10, n_iter=8, init=init, weights=w)
  err = [rq_init.assign(x, c, w.astype(np.float32))[1] for c in (C, alone)]
  assert err[0] < 1.2 * err[1], err


def test_weighted_split_never_splits_a_single_heavy_row():
  """By hand, e = (+1, -1, +1) / 1024: cluster weights (0, 10, 50) of (0, 5, 1) rows:
  cluster 2 is one row and cannot give, so cluster 1 does."""
  c1, c2 = np.array([4.0, 5.0, 6.0]), np.array([1.0, 2.0, 3.0])
  e = np.array([1.0, -1.0, 1.0]) / 1024
  for seed in range(5):
    C = np.stack([np.zeros(3), c1, c2]).astype(np.float32)
    rq_init._split_empty(C, np.array([0.0, 10.0, 50.0]), np.random.default_rng(seed),
                         points=np.array([0.0, 5.0, 1.0]))
    np.testing.assert_allclose(C, np.stack([c1 * (1 + e), c1 * (1 - e), c2]), rtol=1e-6)


def test_residual_kmeans_is_train_rqs_greedy_pass():
  x = _blobs(1500, 6, 10, seed=4)
  codes, cbs = rq_init.residual_kmeans(x, 16, 3, seed=5)
  tables, mses = rq_init.train_rq(x, 16, 3, seed=5)
  np.testing.assert_array_equal(cbs, np.stack(tables))
  assert codes.shape == (1500, 3) and codes.dtype == np.int32
  np.testing.assert_array_equal(codes, rq_init.rq_encode(x, cbs, B=1))
  rec = sum(cbs[m][codes[:, m]] for m in range(3))
  np.testing.assert_allclose(mses[-1], ((x - rec) ** 2).sum(1).mean(), rtol=1e-4)
  # K is capped at the number of rows.
  codes, cbs = rq_init.residual_kmeans(x[:5], 16, 2, weights=np.arange(5))
  assert cbs.shape == (2, 5, 6) and codes.max() < 5


def test_residual_kmeans_errors():
  x, w = _weighted_blobs(50)
  with pytest.raises(ValueError, match=r"weights: expected shape \(50,\) \(one per row\), "
                                       r"got \(49,\)"):
    rq_init.residual_kmeans(x, 4, 2, weights=w[:49])
  with pytest.raises(ValueError, match="weights: expected a real numeric array, got dtype bool"):
    rq_init.residual_kmeans(x, 4, 2, weights=w > 0)
  with pytest.raises(ValueError, match="weights: expected finite values"):
    rq_init.residual_kmeans(x, 4, 2, weights=np.where(w > 5, np.nan, 1.0))
  with pytest.raises(ValueError, match="weights: expected non-negative values, got minimum -1"):
    rq_init.residual_kmeans(x, 4, 2, weights=w - 1)
  with pytest.raises(ValueError, match="at least one positive weight, got all zeros"):
    rq_init.residual_kmeans(x, 4, 2, weights=np.zeros(50))
  with pytest.raises(ValueError, match="n_stages >= 1.*got n_stages=0, K=4"):
    rq_init.residual_kmeans(x, 4, 0)
  with pytest.raises(ValueError, match="K=0"):
    rq_init.residual_kmeans(x, 0, 2)
  with pytest.raises(ValueError, match="x: contains NaN"):
    rq_init.residual_kmeans(np.full((5, 2), np.nan), 2, 1)
  with pytest.raises(ValueError, match="weights: expected shape"):
    rq_init.kmeans(x, 4, weights=w[:3])


def test_progress_counts_every_lloyd_iteration_the_seeding_included():
  """The bar of a large K must move while the seeds are placed (9 progressive stages
  of 3 iterations each before the n_iter in the full space), not sit at 0."""
  x = _blobs(600, 8, 10, seed=3)
  ticks = []
  rq_init.kmeans(x, 8, n_iter=5, seed=0, init="progressive",
                 on_iteration=lambda: ticks.append(1))
  assert len(ticks) == rq_init.iterations(5, "progressive") == 5 + 9 * 3
  ticks.clear()
  rq_init.kmeans(x, 8, n_iter=5, seed=0, init="random", on_iteration=lambda: ticks.append(1))
  assert len(ticks) == rq_init.iterations(5, "random") == 5
  # Fewer than 2 rows per centroid: the seeds are random rows, no seeding stages.
  few = x[:30]
  ticks.clear()
  C = rq_init.kmeans(few, 20, n_iter=5, seed=0, init="progressive",
                     on_iteration=lambda: ticks.append(1))
  np.testing.assert_array_equal(C, rq_init.kmeans(few, 20, n_iter=5, seed=0, init="random"))
  assert len(ticks) == rq_init.iterations(5, "progressive", n=30, K=20) == 5


def test_large_K_bounds_its_distance_chunks_and_finds_the_same_nearest_centroids(
    monkeypatch):
  """Above LARGE_K a device chunk holds at most MAX_ENTRIES distances (K=65536: 256
  rows, 64 MB, instead of 16,384 rows, 4 GB), and the two-level argmin returns the
  one-level one's index: checked on K=300 (not a multiple of the block) with the
  threshold lowered, against jnp.argmin and a float64 NumPy search."""
  assert rq_init._chunk_rows(10**6, 65536) * 65536 <= rq_init.MAX_ENTRIES
  assert rq_init._chunk_rows(10**6, 256) == rq_init._CHUNK  # small K: as before
  rng = np.random.default_rng(0)
  x = rng.standard_normal((1000, 6)).astype(np.float32)
  C = rng.standard_normal((300, 6)).astype(np.float32)
  D = np.asarray(rq_init.sq_dists(jnp.asarray(x), jnp.asarray(C)))
  one_level = np.asarray(jnp.argmin(jnp.asarray(D), axis=1))
  monkeypatch.setattr(rq_init, "LARGE_K", 16)
  monkeypatch.setattr(rq_init, "MAX_ENTRIES", 64 * 300)
  rq_init._assign_accumulate.clear_cache()
  np.testing.assert_array_equal(np.asarray(rq_init._argmin(jnp.asarray(D))), one_level)
  ids, err = rq_init.assign(x, C)
  d64 = ((x[:, None, :].astype(np.float64) - C[None]) ** 2).sum(-1)
  np.testing.assert_array_equal(ids, one_level)
  np.testing.assert_allclose(d64[np.arange(len(x)), ids], d64.min(1), rtol=1e-5)
  assert err == pytest.approx(d64.min(1).sum(), rel=1e-5)
  rq_init._assign_accumulate.clear_cache()


def _split_by_hand(C, counts, rng, below=0, points=None):
  """_split_empty as first written: every draw rng.choice over all the sizes."""
  counts = counts.astype(np.float64).copy()
  points = None if points is None else points.astype(np.float64).copy()
  eps = np.where(np.arange(C.shape[1]) % 2 == 0, 1.0, -1.0) / 1024
  for i in np.flatnonzero(counts <= below):
    p = (np.maximum(counts - 1, 0) if points is None else
         counts * np.maximum(points - 1, 0) / np.maximum(points, 1))
    if p.sum() == 0:
      return
    j = rng.choice(len(C), p=p / p.sum())
    C[i], C[j] = C[j] * (1 + eps), C[j] * (1 - eps)
    counts[i] = counts[j] = counts[j] / 2
    if points is not None:
      points[i] = points[j] = points[j] / 2


@pytest.mark.parametrize("trial", range(12))
def test_split_draws_as_rng_choice_over_all_sizes(trial):
  """The sum tree finds the cluster rng.choice would draw: the same centroids as the
  loop over all sizes, weighted or not, few or many small clusters (K up to 600)."""
  r = np.random.default_rng(trial)
  K = int(r.integers(1, 600))
  C = r.standard_normal((K, 5)).astype(np.float32)
  counts = r.poisson(r.uniform(0.3, 5), K).astype(np.float64)
  below = [0, 0.25 * counts.mean(), 2.0][trial % 3]
  points = None
  if trial % 4 == 0:
    points = np.minimum(counts, r.integers(0, 4, K)).astype(np.float64)
    counts = counts * r.uniform(0.5, 3, K)
  ours, ref = C.copy(), C.copy()
  rq_init._split_empty(ours, counts, np.random.default_rng(trial), below, points)
  _split_by_hand(ref, counts, np.random.default_rng(trial), below, points)
  np.testing.assert_array_equal(ours, ref)
