"""`evaluate()` and the faiss RQ baseline against metrics computed independently
(NumPy float64 decoding from tests/reference.py, faiss exact kNN, hand-written recall)."""

import numpy as np
import pytest

import qinco_jax as qj
from qinco_jax.evaluate import evaluate, faiss_rq_baseline
from tests import reference


def _recall(I, gt, k):
  return float(np.mean([gt[i, 0] in I[i, :k] for i in range(len(gt))]))


def test_evaluate_matches_independent_metrics():
  import faiss
  ds = qj.data.load_synthetic(n_train=2_000, n_db=600, n_queries=50, d=8, n_val=200)
  cfg = qj.QincoConfig(K=8, M=3, L=1, de=4, dh=8, A=2, B=2)
  codec = reference.randomize(qj.Codec.create(cfg, ds.train, verbose=False), scale=0.2)
  out = evaluate(codec, ds, A=2, B=4, verbose=False)
  codes = codec.encode(ds.db, A=2, B=4, verbose=False)  # the encoder has its own tests
  p = reference.np_params(codec)
  parts = np.array([reference.np_partials(p, c) for c in codes]) * p["std"] + p["mean"]
  db = np.asarray(ds.db, np.float64)
  per_step = [((db - parts[:, m]) ** 2).sum(1).mean() for m in range(3)]
  np.testing.assert_allclose(out["per_step_mse"], per_step, rtol=1e-4)
  assert out["mse"] == pytest.approx(per_step[-1], rel=1e-4)
  index = faiss.IndexFlatL2(8)
  index.add(parts[:, -1].astype(np.float32))
  _, I = index.search(np.asarray(ds.queries, np.float32), 100)
  for k in (1, 10, 100):
    assert out[f"R@{k}"] == pytest.approx(_recall(I, ds.gt, k), abs=1e-9)
  assert (out["A"], out["B"], out["n"]) == (2, 4, 600)
  # A database prefix: MSE on those rows only, and no recall (the ground truth is for
  # the whole database).
  part = evaluate(codec, ds, A=2, B=4, n_db=100, verbose=False)
  assert part["mse"] == pytest.approx(((db[:100] - parts[:100, -1]) ** 2).sum(1).mean(),
                                      rel=1e-4)
  assert "R@1" not in part


def test_faiss_rq_baseline_matches_its_own_codebooks():
  import faiss
  ds = qj.data.load_synthetic(n_train=3_000, n_db=500, n_queries=40, d=8, n_val=200)
  out = faiss_rq_baseline(ds, M=2, nbits=4, beam=2, n_train=2_000)
  rq = faiss.ResidualQuantizer(8, 2, 4)
  rq.max_beam_size = 2
  rq.train(np.asarray(ds.train[:2_000], np.float32))
  codes = rq.compute_codes(np.asarray(ds.db, np.float32))
  books = faiss.vector_to_array(rq.codebooks).reshape(2, 16, 8).astype(np.float64)
  x_hat = books[0][codes_unpacked(codes, 4, 2)[:, 0]] + books[1][
      codes_unpacked(codes, 4, 2)[:, 1]]
  mse = ((np.asarray(ds.db, np.float64) - x_hat) ** 2).sum(1).mean()
  assert out["mse"] == pytest.approx(mse, rel=1e-4)
  first = books[0][codes_unpacked(codes, 4, 2)[:, 0]]  # the 1-code prefix, by hand
  assert out["per_step_mse"] == pytest.approx(
      [((np.asarray(ds.db, np.float64) - first) ** 2).sum(1).mean(), mse], rel=1e-4)
  assert out["n_train"] == 2_000 and out["method"] == "faiss RQ 2x4 beam 2"


def codes_unpacked(codes: np.ndarray, nbits: int, M: int) -> np.ndarray:
  """faiss packs M codes of nbits little-endian bit by bit into bytes."""
  bits = np.unpackbits(codes, axis=1, bitorder="little")[:, :M * nbits]
  return (bits.reshape(len(codes), M, nbits) << np.arange(nbits)).sum(-1)


@pytest.mark.parametrize("kind", ["PQ", "OPQ", "RQ", "LSQ"])
@pytest.mark.parametrize("nbits", [4, 8])
def test_faiss_quantizers_share_the_codec_verbs(kind, nbits):
  """decode(encode(x)) equals faiss's own round trip on packed codes; codes are one
  integer per step; an additive quantizer's prefix is the sum of its first codewords;
  `evaluate` reports the MSE and exhaustive-search recall of the reconstruction."""
  import faiss

  from qinco_jax import baselines
  ds = qj.data.load_synthetic(n_train=3_000, n_db=400, n_queries=30, d=6, n_val=200)
  q = baselines.FaissQuantizer(kind, 6, 4, nbits=nbits, lsq_iters=2, opq_iters=2)
  q.train(ds.train[:2_000])
  db = np.asarray(ds.db, np.float32)
  codes = q.encode(db)
  assert codes.shape == (400, 4) and codes.dtype == np.int32
  assert codes.min() >= 0 and codes.max() < 2 ** nbits
  f = q.faiss
  if kind in ("PQ", "OPQ"):  # zero-padded to 8 dimensions
    padded = np.pad(db, ((0, 0), (0, 2)))
    packed = f.sa_encode(padded)
    own = f.sa_decode(packed)[:, :6]
  else:
    packed = f.compute_codes(db)
    own = f.decode(packed)
  np.testing.assert_array_equal(codes, codes_unpacked(packed, nbits, 4))
  np.testing.assert_array_equal(baselines.pack_codes(codes, nbits, packed.shape[1]), packed)
  x_hat = q.decode(codes)
  np.testing.assert_allclose(x_hat, own, rtol=1e-6, atol=1e-6)
  out = evaluate(q, ds, verbose=False)
  err = ((np.asarray(ds.db, np.float64) - x_hat) ** 2).sum(1).mean()
  assert out["mse"] == pytest.approx(err, rel=1e-5)
  index = faiss.IndexFlatL2(6)
  index.add(x_hat)
  _, I = index.search(np.asarray(ds.queries, np.float32), 100)
  assert out["R@10"] == pytest.approx(_recall(I, ds.gt, 10), abs=1e-9)
  if q.additive:
    books = q.codebooks().astype(np.float64)
    first2 = books[0][codes[:, 0]] + books[1][codes[:, 1]]
    np.testing.assert_allclose(q.prefix_decode(codes, 2), first2, rtol=1e-5, atol=1e-5)
    assert len(out["per_step_mse"]) == 4 and out["per_step_mse"][-1] == out["mse"]
  else:
    assert out["per_step_mse"] == []
    with pytest.raises(ValueError, match="additive"):
      q.codebooks()
  with pytest.raises(ValueError, match="codes"):
    q.decode(codes[:, :3])


def test_evaluate_without_a_database_names_it():
  x = np.random.default_rng(0).standard_normal((300, 4)).astype(np.float32)
  q = qj.baselines.FaissQuantizer("RQ", 4, 2, nbits=4)
  q.train(x)
  ds = qj.data.Dataset("no-db", x, x[:10], None, None, None)
  with pytest.raises(ValueError, match="no database vectors"):
    evaluate(q, ds, verbose=False)


def test_faiss_rq_baseline_says_what_it_does_and_encodes_in_chunks(capsys, monkeypatch):
  from qinco_jax import evaluate as evaluate_mod
  ds = qj.data.load_synthetic(n_train=3_000, n_db=500, n_queries=40, d=8, n_val=200)
  quiet = faiss_rq_baseline(ds, M=2, nbits=4, beam=2, n_train=2_000)
  capsys.readouterr()
  calls = []
  real = evaluate_mod._encode_chunks
  monkeypatch.setattr(evaluate_mod, "_encode_chunks",
                      lambda q, x, verbose, chunk=8192: calls.append(len(x)) or real(
                          q, x, verbose, chunk=128))  # 4 chunks of the 500 vectors
  loud = faiss_rq_baseline(ds, M=2, nbits=4, beam=2, n_train=2_000, verbose=True)
  err = capsys.readouterr().err
  assert "faiss RQ 2x4 beam 2: training on 2,000 vectors" in err
  assert "faiss RQ 2x4 beam 2: encode" in err and "/4 [" in err  # a bar of 4 chunks
  assert calls == [500]
  for k in ("mse", "per_step_mse", "R@1", "R@10", "R@100"):
    assert loud[k] == quiet[k], k  # the same codes, chunked
