"""Codec API: create, streaming encode/decode, dynamic rate, save/load, bad input."""

import json
import os

import numpy as np
import pytest

import qinco_jax as qj
from qinco_jax import encode as encode_mod
from tests import reference

D = 6


@pytest.fixture(scope="module")
def trained():
  rng = np.random.default_rng(0)
  train = (rng.standard_normal((600, D)) * 3 + 2).astype(np.float32)
  cfg = qj.QincoConfig(K=8, M=3, L=1, de=None, dh=8, A=3, B=2)
  codec = reference.randomize(qj.Codec.create(cfg, train, verbose=False), scale=0.2)
  return codec, train


def test_create_normalisation_and_rq_init(trained):
  codec, train = trained
  p = reference.np_params(codec)
  np.testing.assert_allclose(p["mean"], train.mean(0), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(p["std"], train.astype(np.float64).std(), rtol=1e-5)
  rq = codec.info["rq_init_train_mse"]
  assert len(rq) == 3 and rq[0] > rq[1] > rq[2] > 0
  assert rq[0] < qj.metrics.mse(train, np.broadcast_to(train.mean(0), train.shape))


def test_create_copies_noisy_codebook_into_preselection_codebook():
  rng = np.random.default_rng(1)
  train = rng.standard_normal((300, D)).astype(np.float32)
  codec = qj.Codec.create(qj.QincoConfig(K=4, M=3, A=2, B=2, de=None, dh=4), train,
                          verbose=False)
  m = codec.model()
  np.testing.assert_array_equal(m.codebooks[...], m.pre_codebooks[...])


def test_codes_dtype_and_decode_matches_encoder(trained):
  codec, train = trained
  codes, x_hat = codec.encode(train[:50], verbose=False, return_x_hat=True)
  assert codes.dtype == np.uint8 and codes.shape == (50, 3)
  np.testing.assert_allclose(codec.decode(codes, verbose=False), x_hat, rtol=1e-5,
                             atol=1e-4)


def test_uint16_codes_when_K_above_256():
  rng = np.random.default_rng(0)
  codec = qj.Codec.create(qj.QincoConfig(K=300, M=1, A=0, B=1), rng.standard_normal(
      (400, 2)).astype(np.float32), verbose=False)
  assert codec.encode(rng.standard_normal((3, 2)), verbose=False).dtype == np.uint16


def test_prefix_decoding_matches_reference(trained):
  codec, train = trained
  codes = codec.encode(train[:20], verbose=False)
  p = reference.np_params(codec)
  for m in (1, 2, 3):
    ref = np.stack([reference.np_decode(p, c[:m]) for c in codes]) * p["std"] + p["mean"]
    np.testing.assert_allclose(codec.decode(codes[:, :m], verbose=False), ref,
                               rtol=1e-4, atol=1e-4)


def test_streaming_compiles_once_and_matches_one_shot(trained, tmp_path):
  codec, train = trained
  big = np.concatenate([train] * 3)  # 1800 rows
  path = tmp_path / "x.npy"
  np.save(path, big)
  mm = np.load(path, mmap_mode="r")
  before = encode_mod.TRACE_COUNTS["beam_search"]
  chunked = codec.encode(mm, A=2, B=3, chunk_size=64, verbose=False)  # 29 chunks
  assert encode_mod.TRACE_COUNTS["beam_search"] == before + 1
  whole = codec.encode(big, A=2, B=3, chunk_size=2048, verbose=False)
  np.testing.assert_array_equal(chunked, whole)


def test_save_load_round_trip(trained, tmp_path):
  codec, train = trained
  codec.save(tmp_path / "c")
  loaded = qj.load(tmp_path / "c")
  assert loaded.cfg == codec.cfg and loaded.d == codec.d
  assert loaded.num_params == codec.num_params
  codes = codec.encode(train[:30], verbose=False)
  np.testing.assert_array_equal(loaded.encode(train[:30], verbose=False), codes)
  np.testing.assert_array_equal(loaded.decode(codes, verbose=False),
                                codec.decode(codes, verbose=False))


def test_save_load_with_relative_path(trained, tmp_path, monkeypatch):
  codec, train = trained
  monkeypatch.chdir(tmp_path)
  codec.save("rel/codec")
  np.testing.assert_array_equal(qj.load("rel/codec").encode(train[:5], verbose=False),
                                codec.encode(train[:5], verbose=False))


def test_failed_save_keeps_existing_checkpoint(trained, tmp_path, monkeypatch):
  codec, train = trained
  codec.save(tmp_path / "c")
  from qinco_jax import checkpoint

  def boom(*a, **k):
    raise RuntimeError("disk full")

  monkeypatch.setattr(checkpoint.json, "dump", boom)
  with pytest.raises(RuntimeError):
    codec.save(tmp_path / "c")
  assert sorted(os.listdir(tmp_path)) == ["c"]  # no temporary left behind
  qj.load(tmp_path / "c")  # the old one is intact


@pytest.mark.parametrize("bad,match", [
    (np.zeros((4, D + 1), np.float32), "dimension"),
    (np.zeros((D,), np.float32), "2-D"),
    (np.array([[np.nan] * D], np.float32), "NaN|finite"),
    (np.array([[0.0] * (D - 1) + [np.inf]], np.float32), "NaN|finite|inf"),
])
def test_encode_rejects_bad_vectors(trained, bad, match):
  with pytest.raises(ValueError, match=match):
    trained[0].encode(bad, verbose=False)


@pytest.mark.parametrize("A,B,match", [(9, 2, "A"), (-1, 2, "A"), (2, 0, "B"),
                                       (2, 1.5, "B")])
def test_encode_rejects_bad_A_B(trained, A, B, match):
  with pytest.raises(ValueError, match=match):
    trained[0].encode(np.zeros((2, D), np.float32), A=A, B=B, verbose=False)


def test_model_without_preselection_refuses_A():
  rng = np.random.default_rng(0)
  codec = qj.Codec.create(qj.QincoConfig(K=4, M=2, A=0, B=2, de=None, dh=4),
                          rng.standard_normal((100, 3)).astype(np.float32), verbose=False)
  with pytest.raises(ValueError, match="A=0"):
    codec.encode(np.zeros((2, 3), np.float32), A=2, verbose=False)


@pytest.mark.parametrize("codes,match", [
    (np.full((2, 3), 8), r"\[0, K=8\)"), (np.full((2, 3), -1), r"\[0, K=8\)"),
    (np.zeros((2, 4), np.int64), "columns"), (np.zeros((2, 0), np.int64), "columns"),
    (np.zeros((2, 3), np.float32), "integer"), (np.zeros(3, np.int64), "2-D")])
def test_decode_rejects_bad_codes(trained, codes, match):
  with pytest.raises(ValueError, match=match):
    trained[0].decode(codes, verbose=False)


def test_config_errors():
  with pytest.raises(ValueError, match="unknown preset"):
    qj.preset("qinco3")
  with pytest.raises(ValueError, match="unknown QincoConfig field"):
    qj.preset("qinco2-S", beam=4)
  with pytest.raises(ValueError, match="K must be"):
    qj.preset("qinco2-S", K=1)
  with pytest.raises(ValueError, match="M must be"):
    qj.preset("qinco2-S", M=0)
  with pytest.raises(ValueError, match="A "):
    qj.preset("qinco2-S", K=16, A=17)
  with pytest.raises(ValueError, match="B "):
    qj.preset("qinco2-S", B=0)
  cfg = qj.preset("qinco2-L", M=16, A=4)
  assert (cfg.M, cfg.A, cfg.L, cfg.de) == (16, 4, 16, 384)


def test_create_rejects_too_few_vectors():
  with pytest.raises(ValueError, match="at least K=8"):
    qj.Codec.create(qj.QincoConfig(K=8, M=2, A=2, B=2),
                    np.zeros((5, 3), np.float32), verbose=False)


def test_load_errors(tmp_path, trained):
  with pytest.raises(FileNotFoundError):
    qj.load(tmp_path / "missing")
  (tmp_path / "foreign").mkdir()
  (tmp_path / "foreign" / "other.json").write_text("{}")
  with pytest.raises(ValueError, match="not a qinco-jax codec"):
    qj.load(tmp_path / "foreign")
  codec = trained[0]
  codec.save(tmp_path / "c")
  meta = json.loads((tmp_path / "c" / "qinco_jax.json").read_text())
  meta["config"]["L"] = 3  # a checkpoint whose arrays belong to another model
  (tmp_path / "c" / "qinco_jax.json").write_text(json.dumps(meta))
  with pytest.raises(ValueError, match="does not match"):
    qj.load(tmp_path / "c")
  (tmp_path / "c" / "qinco_jax.json").write_text('{"format": "qinco-jax/codec", "ver')
  with pytest.raises(ValueError, match="JSON"):
    qj.load(tmp_path / "c")
