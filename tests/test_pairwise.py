"""Pairwise decoder stage (spec 12.2): IVF extra codes, greedy pairwise tables, I/O."""

import itertools

import numpy as np
import pytest

from qinco_jax import pairwise, rq_init


def _data(n=300, K=4, P=3, D=2, seed=0):
  rng = np.random.default_rng(seed)
  codes = rng.integers(0, K, (n, P))
  # A target with a genuine pairwise interaction between positions 0 and 2.
  inter = rng.standard_normal((K, K, D))
  r = inter[codes[:, 0], codes[:, 2]] + 0.3 * rng.standard_normal((n, D))
  return codes, r.astype(np.float32)


def _dict_mean_table(codes, r, K, a, b):
  """Group-by mean with a plain dict, the obvious way."""
  groups = {}
  for row, vec in zip(codes, r.astype(np.float64)):
    groups.setdefault(int(row[a]) * K + int(row[b]), []).append(vec)
  table = np.zeros((K * K, r.shape[1]))
  for key, vecs in groups.items():
    table[key] = np.mean(vecs, axis=0)
  return table


def _eval_sse(codes, r, K, a, b, n_eval):
  table = _dict_mean_table(codes, r, K, a, b)
  err = r[:n_eval] - table[codes[:n_eval, a] * K + codes[:n_eval, b]]
  return float((err.astype(np.float64) ** 2).sum())


@pytest.mark.parametrize("n_eval", [200, 10_000])  # part of the rows / all of them
def test_first_table_is_group_mean_and_best_pair(n_eval):
  K, P = 4, 3
  codes, r = _data(K=K, P=P)
  dec = pairwise.fit_pairwise(codes, r, K, n_tables=1, n_eval=n_eval)
  sse = {(a, b): _eval_sse(codes, r, K, a, b, n_eval)
         for a, b in itertools.combinations(range(P), 2)}
  best = min(sse, key=sse.get)
  assert best == (0, 2)  # the planted interaction
  assert dec.pairs == [best]
  assert dec.tables.shape == (1, K * K, 2) and dec.tables.dtype == np.float32
  np.testing.assert_allclose(dec.tables[0], _dict_mean_table(codes, r, K, *best),
                             rtol=1e-5, atol=1e-6)


def test_greedy_second_step_fits_the_residual():
  K, P = 4, 3
  codes, r = _data(K=K, P=P, seed=1)
  dec = pairwise.fit_pairwise(codes, r, K, n_tables=2, n_eval=150)
  a0, b0 = dec.pairs[0]
  r1 = r - dec.tables[0][codes[:, a0] * K + codes[:, b0]]
  sse = {(a, b): _eval_sse(codes, r1, K, a, b, 150)
         for a, b in itertools.combinations(range(P), 2)}
  assert dec.pairs[1] == min(sse, key=sse.get)
  np.testing.assert_allclose(dec.tables[1], _dict_mean_table(codes, r1, K, *dec.pairs[1]),
                             rtol=1e-5, atol=1e-6)
  # Training error (all rows) never goes up as tables are added.
  errs = [((r - pairwise.PairwiseDecoder(K, dec.pairs[:t], dec.tables[:t]).decode(codes))
           ** 2).sum() for t in range(3)]
  assert errs[0] > errs[1] >= errs[2]


def test_decode_is_sum_of_lookups():
  K = 2
  tables = np.arange(2 * K * K * 3, dtype=np.float32).reshape(2, K * K, 3)
  dec = pairwise.PairwiseDecoder(K=K, pairs=[(0, 2), (1, 2)], tables=tables)
  codes = np.array([[1, 0, 1], [0, 1, 0]], np.uint8)
  expect = np.stack([tables[0][1 * 2 + 1] + tables[1][0 * 2 + 1],
                     tables[0][0 * 2 + 0] + tables[1][1 * 2 + 0]])
  np.testing.assert_array_equal(dec.decode(codes), expect)
  with pytest.raises(ValueError, match="columns"):
    dec.decode(codes[:, :2])
  with pytest.raises(ValueError, match="0..1"):
    dec.decode(codes + 1)


def test_save_load_round_trip(tmp_path):
  codes, r = _data()
  dec = pairwise.fit_pairwise(codes, r, 4, n_tables=3)
  path = tmp_path / "pairwise.npz"
  dec.save(path)
  back = pairwise.PairwiseDecoder.load(path)
  assert back.K == dec.K and back.pairs == dec.pairs
  np.testing.assert_array_equal(back.tables, dec.tables)
  np.testing.assert_array_equal(back.decode(codes), dec.decode(codes))
  assert [p.name for p in tmp_path.iterdir()] == ["pairwise.npz"]  # no temp leftovers
  np.savez(tmp_path / "other.npz", x=np.zeros(3))
  with pytest.raises(ValueError, match="not a pairwise decoder"):
    pairwise.PairwiseDecoder.load(tmp_path / "other.npz")


def _weighted_sse(x, w, codes, codebooks, stages):
  rec = sum(codebooks[s][codes[:, s]] for s in range(stages)) if stages else 0.0
  return float((w * ((x - rec) ** 2).sum(1)).sum())


# ivf_extra_codes' K-means options (weighted random seeds, no splitting of small clusters)
IVF_KMEANS = dict(init="random", split_iters=0)


def test_ivf_extra_codes():
  rng = np.random.default_rng(0)
  n, D, K, S = 60, 3, 8, 3
  cents = rng.standard_normal((n, D)).astype(np.float32)
  sizes = rng.integers(1, 20, n)
  sizes[::3] = 0
  extra = pairwise.ivf_extra_codes(cents, sizes, n_stages=S, K=K, niter=10)
  assert extra.shape == (n, S) and extra.dtype == np.uint8
  assert extra.max() < K
  codes, cbs = rq_init.residual_kmeans(cents, K, S, n_iter=10, weights=sizes, **IVF_KMEANS)
  np.testing.assert_array_equal(codes, extra)
  assert codes.dtype == np.int32 and cbs.shape == (S, K, D) and cbs.dtype == np.float32
  errs = [_weighted_sse(cents, sizes, codes, cbs, s) for s in range(S + 1)]
  assert all(e1 < e0 for e0, e1 in zip(errs, errs[1:])), errs
  # Codes are the nearest codewords of each stage's residual.
  res = cents - cbs[0][codes[:, 0]]
  d2 = ((res[:, None] - cbs[1][None]) ** 2).sum(-1)
  np.testing.assert_allclose(d2[np.arange(n), codes[:, 1]], d2.min(1), rtol=1e-5)
  # K is capped at the number of centroids.
  small = pairwise.ivf_extra_codes(cents[:5], sizes[:5] + 1, n_stages=2, K=256)
  assert small.shape == (5, 2) and small.max() < 5
  # Fewer lists of positive size than K: the empty lists complete the seeds.
  few = np.zeros(n, np.int64)
  few[:3] = [5, 1, 9]
  extra = pairwise.ivf_extra_codes(cents, few, n_stages=2, K=K, niter=5)
  assert extra.shape == (n, 2) and extra.max() < K


def _np_weighted_residual_kmeans(x, w, n_stages, K, n_iter, seed):
  """Weighted residual k-means in float64 NumPy, the plain way: stage s draws K distinct
  rows of positive weight with probability proportional to the weight
  (`np.random.default_rng(seed + s)`, the draw rq_init's weighted random seeding
  makes), then n_iter weighted Lloyd iterations (a codeword without weight stays);
  returns the weighted squared error left after each stage."""
  r, objective = np.asarray(x, np.float64).copy(), []
  positive = np.flatnonzero(w > 0)
  for s in range(n_stages):
    rng = np.random.default_rng(seed + s)
    C = r[np.sort(rng.choice(positive, K, replace=False, p=w[positive] / w[positive].sum()))]
    for _ in range(n_iter):
      a = ((r[:, None, :] - C[None]) ** 2).sum(-1).argmin(1)
      for k in range(K):
        if w[a == k].sum() > 0:
          C[k] = (w[a == k, None] * r[a == k]).sum(0) / w[a == k].sum()
    r -= C[((r[:, None, :] - C[None]) ** 2).sum(-1).argmin(1)]
    objective.append(float((w * (r ** 2).sum(1)).sum()))
  return np.array(objective)


@pytest.mark.parametrize("data_seed", [0, 1])
def test_ivf_extra_codes_are_as_good_as_weighted_lloyd(data_seed):
  """The weighted objective sum_i size_i ||residual_i||^2 after each stage is within 1%
  of a float64 NumPy weighted Lloyd from the same seeds (same draws: the comparison
  measures the implementation, not the luck of the draw), on clustered IVF-like
  centroids with integer list sizes, some 0."""
  rng = np.random.default_rng(data_seed)
  n, D, K, S, n_iter = 300, 6, 12, 3, 15
  centers = 3.0 * rng.standard_normal((20, D))
  cents = (centers[rng.integers(0, 20, n)] + rng.standard_normal((n, D))).astype(np.float32)
  sizes = rng.integers(0, 40, n)
  for seed in (0, 7):
    extra = pairwise.ivf_extra_codes(cents, sizes, n_stages=S, K=K, niter=n_iter, seed=seed)
    codes, cbs = rq_init.residual_kmeans(cents, K, S, n_iter=n_iter, seed=seed, weights=sizes,
                                         **IVF_KMEANS)
    np.testing.assert_array_equal(codes, extra)
    ours = np.array([_weighted_sse(cents, sizes, codes, cbs, s) for s in range(1, S + 1)])
    ref = _np_weighted_residual_kmeans(cents, sizes, S, K, n_iter, seed)
    assert (ours <= 1.01 * ref).all(), (ours / ref, data_seed, seed)


def test_a_heavy_list_is_reconstructed_by_the_first_stage():
  """Weights matter: a centroid weighing 10^6 times the others is (nearly) its own
  stage-1 codeword; with unit weights it is not."""
  rng = np.random.default_rng(3)
  cents = rng.standard_normal((80, 4)).astype(np.float32)
  heavy = 17
  sizes = np.ones(80, np.int64)
  sizes[heavy] = 10**6
  for w, close in ((sizes, True), (np.ones(80, np.int64), False)):
    codes, cbs = rq_init.residual_kmeans(cents, 4, 1, n_iter=10, weights=w, **IVF_KMEANS)
    err = float(((cents[heavy] - cbs[0][codes[heavy, 0]]) ** 2).sum())
    assert (err < 1e-6) if close else (err > 0.01), (err, close)


def test_extended_codes_and_errors():
  q = np.array([[1, 2], [3, 0]], np.uint8)
  extra = np.array([[5, 6, 7], [8, 9, 10]], np.uint8)
  out = pairwise.extended_codes(q, np.array([1, 0]), extra)
  np.testing.assert_array_equal(out, [[1, 2, 8, 9, 10], [3, 0, 5, 6, 7]])
  with pytest.raises(ValueError, match="list ids"):
    pairwise.extended_codes(q, np.array([1, 2]), extra)
  codes, r = _data(n=20)
  with pytest.raises(ValueError, match="0..3"):
    pairwise.fit_pairwise(codes + 1, r, 4, n_tables=1)
  bad = r.copy()
  bad[4] = np.nan
  with pytest.raises(ValueError, match="NaN"):
    pairwise.fit_pairwise(codes, bad, 4, n_tables=1)
  with pytest.raises(ValueError, match="rows"):
    pairwise.fit_pairwise(codes[:5], r, 4, n_tables=1)
  with pytest.raises(ValueError, match="2 code positions"):
    pairwise.fit_pairwise(codes[:, :1], r, 4, n_tables=1)
  with pytest.raises(ValueError, match="shape"):
    pairwise.PairwiseDecoder(K=4, pairs=[(0, 1)], tables=np.zeros((1, 15, 2)))
  with pytest.raises(ValueError, match="non-negative"):
    pairwise.ivf_extra_codes(np.zeros((4, 2)), np.array([1, -1, 2, 2]))
  with pytest.raises(ValueError, match="not all zero"):
    pairwise.ivf_extra_codes(np.zeros((4, 2)), np.zeros(4, np.int64))
  with pytest.raises(ValueError, match=r"one per centroid \(4\), got 3"):
    pairwise.ivf_extra_codes(np.zeros((4, 2)), np.ones(3, np.int64))
  with pytest.raises(ValueError, match="1-D integer"):
    pairwise.ivf_extra_codes(np.zeros((4, 2)), np.ones(4))
  with pytest.raises(ValueError, match="niter"):
    pairwise.ivf_extra_codes(np.zeros((4, 2)), np.ones(4, np.int64), niter=0)
  with pytest.raises(ValueError, match="centroids.*NaN"):
    pairwise.ivf_extra_codes(np.full((4, 2), np.nan), np.ones(4, np.int64))


def test_holdout_fit_stops_on_noise_and_base_tables_round_trip(tmp_path):
  rng = np.random.default_rng(0)
  codes = rng.integers(0, 4, size=(2000, 3))
  noise = rng.standard_normal((2000, 2)).astype(np.float32)  # unrelated to the codes
  pw = pairwise.fit_pairwise(codes, noise, 4, 5, shrink=4.0, holdout=500)
  assert len(pw.pairs) <= 1  # held-out rows reject tables that only fit noise
  signal = np.zeros((4 * 4, 2), np.float32)
  signal[:, 0] = np.arange(16)
  r = signal[codes[:, 0] * 4 + codes[:, 2]] + 0.01 * noise
  pw = pairwise.fit_pairwise(codes, r, 4, 3, shrink=0.0, holdout=500)
  assert pw.pairs[0] == (0, 2)
  pw.base_tables = rng.standard_normal((3, 4, 2)).astype(np.float32)
  pw.save(tmp_path / "pw.npz")
  back = pairwise.PairwiseDecoder.load(tmp_path / "pw.npz")
  np.testing.assert_allclose(back.decode(codes), pw.decode(codes), rtol=1e-6)
  expected = sum(pw.base_tables[m][codes[:, m]] for m in range(3)) + sum(
      t[codes[:, a] * 4 + codes[:, b]] for (a, b), t in zip(pw.pairs, pw.tables))
  np.testing.assert_allclose(pw.decode(codes), expected, rtol=1e-5, atol=1e-6)


def test_holdout_picks_the_shrink_with_the_lowest_heldout_error():
  rng = np.random.default_rng(1)
  K, n, hold = 8, 3000, 1000
  codes = rng.integers(0, K, size=(n, 3))
  signal = 0.3 * rng.standard_normal((K * K, 2)).astype(np.float32)
  r = signal[codes[:, 0] * K + codes[:, 1]] + rng.standard_normal((n, 2)).astype(np.float32)

  def heldout_sse(pw):  # NumPy: error left on the held-out rows by the first table
    (a, b), t = pw.pairs[0], pw.tables[0]
    return float(((r[:hold] - t[codes[:hold, a] * K + codes[:hold, b]]) ** 2).sum())

  def group_mean_table(lam):  # NumPy group-by of the fitted rows, shrunk by lam
    idx = codes[hold:, 0] * K + codes[hold:, 1]
    s = np.zeros((K * K, 2))
    np.add.at(s, idx, r[hold:])
    c = np.bincount(idx, minlength=K * K)
    return s / np.where(c > 0, c + lam, np.inf)[:, None]

  single = {lam: pairwise.fit_pairwise(codes, r, K, 1, shrink=lam, holdout=hold)
            for lam in (0.0, 10.0, 1e4)}
  both = pairwise.fit_pairwise(codes, r, K, 1, shrink=(0.0, 10.0, 1e4), holdout=hold)
  best = min(single, key=lambda lam: heldout_sse(single[lam]))
  # Signal variance 0.09, noise variance 1, ~31 rows per cell: lambda near 11 is best.
  assert best == 10.0
  assert both.pairs == [(0, 1)]
  np.testing.assert_allclose(both.tables[0], group_mean_table(best), rtol=1e-4, atol=1e-6)
  with pytest.raises(ValueError, match="holdout"):
    pairwise.fit_pairwise(codes, r, K, 1, shrink=(1.0, 2.0))
  with pytest.raises(ValueError, match="shrink"):
    pairwise.fit_pairwise(codes, r, K, 1, shrink=-1.0)
