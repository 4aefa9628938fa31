"""AQ decoder stage (spec 12.1 step 4): joint least-squares additive tables."""

import numpy as np
import pytest

from qinco_jax import aq


def _one_hot(codes, K):
  n, M = codes.shape
  A = np.zeros((n, M * K))
  A[np.arange(n)[:, None], codes + np.arange(M) * K] = 1.0
  return A


def _problem(n=500, M=3, K=5, D=4, seed=0, unused=None):
  rng = np.random.default_rng(seed)
  codes = rng.integers(0, K, (n, M))
  if unused is not None:  # (position, code) that never occurs
    m, k = unused
    codes[codes[:, m] == k, m] = (k + 1) % K
  r = rng.standard_normal((n, D)) + _one_hot(codes, K) @ rng.standard_normal((M * K, D))
  return codes, r.astype(np.float32)


def test_matches_dense_lstsq():
  K = 5
  codes, r = _problem(K=K)
  T = aq.fit_aq(codes, r, K, chunk=128)  # several chunks
  assert T.shape == (3, K, 4) and T.dtype == np.float32
  A = _one_hot(codes, K)
  T_ref = np.linalg.lstsq(A, r.astype(np.float64), rcond=None)[0]
  np.testing.assert_allclose(A @ T.reshape(-1, 4), A @ T_ref, atol=1e-4)
  np.testing.assert_allclose(aq.aq_decode(T, codes), A @ T_ref, atol=1e-4)
  # Both are the minimum-norm solution, so the tables agree too.
  np.testing.assert_allclose(T.reshape(-1, 4), T_ref, atol=1e-4)


def test_normal_equations_are_one_hot_products():
  K = 5
  codes, r = _problem(n=200, K=K, seed=1)
  G, ATR = aq.normal_equations(codes, r, K, chunk=64)
  A = _one_hot(codes, K)
  np.testing.assert_array_equal(G, A.T @ A)
  np.testing.assert_allclose(ATR, A.T @ r.astype(np.float64), rtol=1e-10, atol=1e-9)


def test_unused_code_gets_zero_row():
  K = 5
  codes, r = _problem(K=K, seed=2, unused=(1, 3))
  assert not (codes[:, 1] == 3).any()
  T = aq.fit_aq(codes, r, K)
  np.testing.assert_array_equal(T[1, 3], 0.0)
  A = _one_hot(codes, K)
  T_ref = np.linalg.lstsq(A, r.astype(np.float64), rcond=None)[0]
  np.testing.assert_allclose(A @ T.reshape(-1, 4), A @ T_ref, atol=1e-4)


def test_aq_decode_is_sum_of_lookups():
  T = np.arange(2 * 3 * 2, dtype=np.float32).reshape(2, 3, 2)
  codes = np.array([[0, 2], [1, 0]])
  np.testing.assert_array_equal(aq.aq_decode(T, codes),
                                [T[0, 0] + T[1, 2], T[0, 1] + T[1, 0]])


def test_errors():
  codes, r = _problem(n=20)
  with pytest.raises(ValueError, match="0..4"):
    aq.fit_aq(codes + 1, r, 5)
  with pytest.raises(ValueError, match="integer"):
    aq.fit_aq(codes.astype(np.float32), r, 5)
  with pytest.raises(ValueError, match="rows"):
    aq.fit_aq(codes[:10], r, 5)
  bad = r.copy()
  bad[7, 1] = np.nan
  with pytest.raises(ValueError, match="first bad row is 7"):
    aq.fit_aq(codes, bad, 5)
  with pytest.raises(ValueError, match="2-D"):
    aq.fit_aq(codes, r[:, 0], 5)
  with pytest.raises(ValueError, match="columns"):
    aq.aq_decode(np.zeros((2, 5, 4), np.float32), codes)
  with pytest.raises(ValueError, match="range"):
    aq.aq_decode(np.zeros((3, 4, 4), np.float32), codes)
