"""The fast-scan first stage for 4-bit codes: faiss's IVF additive fast-scan loaded with
our AQ tables and our codes (qinco_jax/search/fastscan.py)."""

import faiss
import numpy as np
import pytest

from qinco_jax import aq
from qinco_jax.search import fastscan


def _data(seed=0, D=8, nlist=6, M=6, n=1500, noise=0.05):
  rs = np.random.RandomState(seed)
  cents = (rs.randn(nlist, D) * 2).astype(np.float32)
  codes = np.concatenate([rs.randint(nlist, size=(n, 1)), rs.randint(16, size=(n, M))], 1)
  true = (rs.randn(M, 16, D) * 0.5).astype(np.float32)
  r = aq.aq_decode(true, codes[:, 1:]) + noise * rs.randn(n, D).astype(np.float32)
  return rs, cents, codes, aq.fit_aq(codes[:, 1:], r, 16)


def _unpack_nibbles(b, n_nib):
  nib = np.stack([b & 15, b >> 4], 2).reshape(len(b), -1)
  return nib[:, :n_nib]


def test_flat_codes_and_norm_codes_match_faiss_own_encoder():
  # faiss encodes vectors itself; its sa_encode bytes (after the 1-byte list id) hold the
  # M codes and the 2 norm codes as nibbles, and its norm encoder is a 2-stage beam search.
  rs = np.random.RandomState(0)
  xt = rs.randn(300, 8).astype(np.float32)
  quantizer = faiss.IndexFlatL2(8)
  quantizer.add(rs.randn(4, 8).astype(np.float32))
  ivf = faiss.IndexIVFResidualQuantizerFastScan(
      quantizer, 8, 4, 5, 4, faiss.METRIC_L2, faiss.AdditiveQuantizer.ST_norm_rq2x4, 32)
  faiss.copy_array_to_vector((rs.randn(5 * 16 * 8) * 0.5).astype(np.float32),
                             ivf.rq.codebooks)
  ivf.rq.is_trained = True
  norms = (rs.randn(700) ** 2 * 5 + 10).astype(np.float32)
  ivf.rq.train_norm(len(norms), faiss.swig_ptr(norms))
  ivf.is_trained = True
  sa = ivf.sa_encode(xt)
  nib = _unpack_nibbles(sa[:, 1:], 7)
  np.testing.assert_array_equal(fastscan.flat_codes(nib[:, :5], nib[:, 5:]), sa[:, 1:])
  tabs = faiss.vector_to_array(ivf.rq.norm_tabs).reshape(2, 16).astype(np.float64)
  norms = rs.uniform(tabs.min(1).sum() - 1, tabs.max(1).sum() + 1, 400)
  ours = fastscan.norm_codes(norms, tabs.ravel()).astype(np.int64)
  theirs = np.array([ivf.rq.encode_norm(float(v)) for v in norms])
  err_ours = np.abs(norms - tabs[0][ours[:, 0]] - tabs[1][ours[:, 1]])
  err_theirs = np.abs(norms - tabs[0][theirs & 15] - tabs[1][theirs >> 4])
  assert (err_ours <= err_theirs + 1e-9).all()  # exhaustive: never worse than the beam
  assert (ours[:, 0] | (ours[:, 1] << 4) == theirs).mean() > 0.9  # same code almost always
  # and the exact optimum over the 256 pairs (slow reference)
  pair = tabs[0][:, None] + tabs[1][None, :]
  best = np.abs(norms[:, None, None] - pair[None]).reshape(len(norms), -1).min(1)
  np.testing.assert_allclose(err_ours, best, atol=1e-9)


@pytest.mark.parametrize("lifted", [True, False])
def test_distances_equal_float_tables_up_to_lut_rounding(lifted):
  rs, cents, codes, tables = _data()
  fs = fastscan.FastScanLists(cents, tables, codes[:1000], lifted=lifted)
  fs.add(codes[:700], np.arange(700))  # two calls: the second appends to partly
  fs.add(codes[700:], np.arange(700, len(codes)))  # filled blocks
  assert fs.index.ntotal == len(codes)
  # Queries: half near stored reconstructions (a clear nearest neighbour), half anywhere.
  near = rs.randint(len(codes), size=20)
  x_hat = cents[codes[near, 0]] + aq.aq_decode(tables, codes[near, 1:])
  q = np.concatenate([x_hat + 0.01 * rs.randn(*x_hat.shape),
                      cents[rs.randint(len(cents), size=20)] + rs.randn(*x_hat.shape)])
  q = q.astype(np.float32)
  k = 50
  dist, _, _, ids = fs.search(q, k, nprobe=len(cents))
  # Float64 reference from the same tables (AQ tables + quantised norms), by hand.
  r = cents[codes[:, 0]].astype(np.float64)
  for m in range(tables.shape[0]):
    r += tables[m][codes[:, m + 1]]
  c2 = (cents[codes[:, 0]].astype(np.float64) ** 2).sum(1) if lifted else 0.0
  nc = fastscan.norm_codes((r * r).sum(1) - c2, fs.norm_tabs).astype(np.int64)
  t = fs.norm_tabs.astype(np.float64).reshape(2, 16)
  ref = ((q.astype(np.float64) ** 2).sum(1)[:, None] - 2 * q.astype(np.float64) @ r.T
         + (t[0][nc[:, 0]] + t[1][nc[:, 1]] + c2)[None])
  np.testing.assert_allclose(fs.float_distances(q, codes), ref, rtol=1e-5, atol=1e-3)
  bound = fs.lut_error_bound(q)
  err = np.abs(dist - np.take_along_axis(ref, ids, 1))
  assert (err <= bound[:, None] + 1e-3).all(), (err.max(1) / bound).max()
  assert err.max() > 0  # the table really is rounded (8 bits)
  # Every list probed: the shortlist is the exhaustive one, wherever the float gap at
  # rank j exceeds twice the rounding bound (j = 1 for the queries near a stored vector).
  srt = np.sort(ref, 1)
  n_clear = 0
  for j in (1, 5, k):
    clear = srt[:, j] - srt[:, j - 1] > 2 * bound
    n_clear += clear.sum()
    for i in np.flatnonzero(clear):
      assert set(ids[i, :j]) == set(np.argsort(ref[i])[:j])
  assert n_clear >= 10
  # Elsewhere it is consistent with the exhaustive ranking up to the bound.
  for i in range(len(q)):
    out = np.setdiff1d(np.arange(len(codes)), ids[i])
    assert ref[i, out].min() >= ref[i, ids[i]].max() - 2 * bound[i] - 1e-3


def test_partial_probe_scans_only_the_nearest_lists():
  rs, cents, codes, tables = _data(seed=1)
  fs = fastscan.FastScanLists(cents, tables, codes[:1000])
  fs.add(codes, np.arange(len(codes)) + 10)
  q = (cents[rs.randint(len(cents), size=10)] + 0.3 * rs.randn(10, cents.shape[1])).astype(
      np.float32)
  _, _, _, ids = fs.search(q, 20, nprobe=2)
  near = np.argsort(((q[:, None] - cents[None]) ** 2).sum(2), 1)[:, :2]
  for i in range(len(q)):
    assert set(codes[ids[i] - 10, 0]) <= set(near[i])


def test_bad_input_is_refused():
  _, cents, codes, tables = _data()
  with pytest.raises(ValueError, match=r"tables must be \(M, 16, 8\) \(4-bit codes\)"):
    fastscan.FastScanLists(cents, np.zeros((6, 256, 8), np.float32), codes)
  fs = fastscan.FastScanLists(cents, tables, codes[:1000])
  bad = codes.copy()
  bad[3, 2] = 16
  with pytest.raises(ValueError, match="codes in 0..15"):
    fs.add(bad, np.arange(len(bad)))
  with pytest.raises(ValueError, match=r"\(n, 7\)"):
    fs.add(codes[:, :5], np.arange(len(codes)))


def test_lifted_norm_term_is_finer_than_faiss_full_norm_far_from_the_origin():
  rs, cents, codes, tables = _data(seed=2)
  cents = cents + 20.0  # ||c_l||^2 dominates ||c_l + x_hat||^2
  q = (cents[rs.randint(len(cents), size=20)] + rs.randn(20, cents.shape[1])).astype(
      np.float32)
  err = {}
  for lifted in (True, False):
    fs = fastscan.FastScanLists(cents, tables, codes[:1000], lifted=lifted)
    fs.add(codes, np.arange(len(codes)))
    dist, _, _, ids = fs.search(q, 20, nprobe=len(cents))
    # against the unquantised AQ distances ||q - c_l - x_hat||^2
    x = cents[codes[:, 0]].astype(np.float64) + aq.aq_decode(tables, codes[:, 1:])
    exact = ((q[:, None].astype(np.float64) - x[ids]) ** 2).sum(2)
    err[lifted] = np.abs(dist - exact).mean()
  assert err[True] * 1.5 < err[False], err  # measured 1.87 vs 3.88


def test_lists_a_list_search_did_not_find_are_skipped_the_same_way_every_time():
  """An HNSW list search marks lists it did not find with -1; faiss's fast-scan reads a
  list -1 as a real one (results varied from run to run), so they are sent to an
  always-empty list: the scan equals the scan of the found lists alone."""
  rs, cents, codes, tables = _data(seed=3)
  fs = fastscan.FastScanLists(cents, tables, codes[:1000])
  fs.add(codes, np.arange(len(codes)))
  q = (cents[rs.randint(len(cents), size=40)] + rs.randn(40, cents.shape[1])).astype(
      np.float32)
  Dc, Ic = fs.assign(q, 4, 16)
  holes = Ic.copy()
  holes[:, 2:] = -1
  want = fs.scan(q, Dc[:, :2], Ic[:, :2], 30)
  for _ in range(3):
    got = fs.scan(q, Dc, holes, 30)
    np.testing.assert_array_equal(got[3], want[3])
    np.testing.assert_array_equal(got[0], want[0])
  assert (want[3] >= 0).all() and np.isin(want[1], Ic[:, :2]).all()


@pytest.mark.parametrize("M", [5, 32])
def test_odd_and_long_codes_scan_within_the_bound_and_round_trip_through_the_list_file(
    M, tmp_path):
  """M = 5 leaves a padding nibble in faiss's flat code, M = 32 (16 bytes) is the long
  4-bit setting: both scan within the rounding bound of float64 distances from the
  same tables, and save/open keeps every row and answer."""
  rs, cents, codes, tables = _data(seed=4, M=M)
  fs = fastscan.FastScanLists(cents, tables, codes[:1000])
  fs.add(codes, np.arange(len(codes)) * 3)
  q = (cents[rs.randint(len(cents), size=15)] + rs.randn(15, cents.shape[1])).astype(
      np.float32)
  dist, _, got, ids = fs.search(q, 40, nprobe=len(cents))
  ref = fs.float_distances(q, codes)
  err = np.abs(dist - np.take_along_axis(ref, ids // 3, 1))
  assert (err <= fs.lut_error_bound(q)[:, None] + 1e-3).all()
  np.testing.assert_array_equal(got, codes[ids // 3, 1:])
  fs.save(tmp_path)
  assert fs.code_size == (M + 3) // 2
  back = fastscan.open_lists(tmp_path)
  assert isinstance(back, fastscan.FastScanLists) and back.ntotal == len(codes)
  for a, b in zip(back.search(q, 40, nprobe=len(cents)), (dist, None, got, ids)):
    if b is not None:
      np.testing.assert_array_equal(a, b)
  a, b = back.rows(), fs.rows()  # rows come back in list order
  oa, ob = np.argsort(a["ids"]), np.argsort(b["ids"])
  for k in ("lists", "codes", "ncodes", "ids"):
    np.testing.assert_array_equal(a[k][oa], b[k][ob])
