"""Tests for the evaluation metrics against hand-computed values."""
import math

import numpy as np
import pytest

from qinco_jax import metrics


def test_mse_hand_values():
  x = np.array([[0.0, 0.0], [1.0, 1.0]])
  x_hat = np.array([[1.0, 2.0], [1.0, 4.0]], np.float32)
  # per-vector squared errors: 1 + 4 = 5 and 0 + 9 = 9 -> mean 7
  assert metrics.mse(x, x_hat) == pytest.approx(7.0, rel=1e-12)
  assert metrics.mse(x, x_hat, mse_scale=1e-4) == pytest.approx(7e-4, rel=1e-12)
  x8 = np.array([[255, 0]], np.uint8)
  assert metrics.mse(x8, np.array([[0.0, 0.0]])) == pytest.approx(255.0 ** 2, rel=1e-12)


def test_mse_shape_errors():
  with pytest.raises(ValueError, match=r"expected shape \(2, 2\).*got \(2, 3\)"):
    metrics.mse(np.zeros((2, 2)), np.zeros((2, 3)))
  with pytest.raises(ValueError, match="2-D"):
    metrics.mse(np.zeros(3), np.zeros(3))
  with pytest.raises(ValueError, match="at least one"):
    metrics.mse(np.zeros((0, 2)), np.zeros((0, 2)))


def test_knn():
  db = np.array([[0.0], [10.0], [3.0], [7.0]], np.float32)
  q = np.array([[2.0], [9.0]], np.float32)
  I = metrics.knn(q, db, k=3)
  assert I.dtype == np.int64
  np.testing.assert_array_equal(I, [[2, 0, 3], [1, 3, 2]])
  np.testing.assert_array_equal(metrics.knn(q, db, k=3, db_chunk=1), I)
  with pytest.raises(ValueError, match="same d"):
    metrics.knn(q, np.zeros((4, 2), np.float32))


def test_recall_hand_example():
  I = np.array([[5, 1, 2],
                [0, 7, 3],
                [4, 6, 9],
                [8, 8, 8]])
  gt = np.array([[5, 0], [7, 1], [9, 2], [1, 3]])
  # true nearest found at ranks 0, 1, 2 and never
  r = metrics.recall_at(I, gt, ks=(1, 2, 3))
  assert r == {"R@1": 0.25, "R@2": 0.5, "R@3": 0.75}
  assert metrics.recall_at(I, gt[:, 0], ks=(3,)) == {"R@3": 0.75}
  with pytest.raises(ValueError, match="R@10 needs k in 1..3"):
    metrics.recall_at(I, gt)
  with pytest.raises(ValueError, match="expected 4 rows"):
    metrics.recall_at(I, gt[:3], ks=(1,))


def test_codebook_usage():
  K = 16
  codes = np.stack([np.arange(64) % K, np.zeros(64, int), np.arange(64) % 4], axis=1)
  u = metrics.codebook_usage(codes, K)
  assert u["entropy"] == pytest.approx([math.log2(K), 0.0, 2.0], abs=1e-12)
  assert u["unused_frac"] == pytest.approx([0.0, 15 / 16, 12 / 16])
  assert u["mean_entropy"] == pytest.approx((4.0 + 0.0 + 2.0) / 3)
  assert u["min_entropy"] == 0.0
  assert u["mean_unused_frac"] == pytest.approx((0 + 15 / 16 + 12 / 16) / 3)
  with pytest.raises(ValueError, match=r"0..15, got range 1..16"):
    metrics.codebook_usage(codes + 1, K)
  with pytest.raises(ValueError, match="integer"):
    metrics.codebook_usage(codes.astype(np.float32), K)
