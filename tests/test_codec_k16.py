"""4-bit QINCo2 (K = 16): codecs with 16 codewords per step save, load, import/export and
pack like K = 256 ones (the fast-scan first stage stores their codes two per byte)."""

import numpy as np
import pytest

import qinco_jax as qj
from qinco_jax import interop
from tests.reference import randomize

D = 8


@pytest.fixture(scope="module")
def k16():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(600, D)).astype(np.float32)
  cfg = qj.QincoConfig(K=16, M=16, L=1, de=8, dh=8, A=4, B=4, ivf_K=8)
  codec = qj.Codec.create(cfg, x, verbose=False, ivf_centroids=x[:8] * 1.1)
  return randomize(codec), x[:64]


def test_encode_decode(k16):
  codec, x = k16
  codes = codec.encode(x, verbose=False)
  assert codes.shape == (64, 17) and codes[:, 1:].max() <= 15 and codes[:, 1:].min() >= 0
  assert codes[:, 1:].max() == 15  # all 16 codewords are in use somewhere
  x_hat = codec.decode(codes, verbose=False)
  assert x_hat.shape == (64, D) and np.isfinite(x_hat).all()
  # a wide beam over all 16 candidates (A = 0) reconstructs better than greedy (B = 1)
  greedy = codec.decode(codec.encode(x, A=0, B=1, verbose=False), verbose=False)
  wide = codec.decode(codec.encode(x, A=0, B=16, verbose=False), verbose=False)
  e_g, e_w = ((greedy - x) ** 2).sum(1), ((wide - x) ** 2).sum(1)
  assert e_w.mean() < e_g.mean(), (e_w.mean(), e_g.mean())


def test_save_load_state_dict_and_npz_round_trips(k16, tmp_path):
  codec, x = k16
  codes = codec.encode(x, verbose=False)
  x_hat = codec.decode(codes, verbose=False)
  codec.save(tmp_path / "c")
  back = [qj.load(tmp_path / "c"),
          interop.from_state_dict(interop.to_torch_state_dict(codec),
                                  interop.torch_parameters(codec), D)]
  interop.export_npz(codec, tmp_path / "c.npz")
  back.append(interop.load_npz(tmp_path / "c.npz"))
  assert interop.torch_parameters(codec)["K"] == 16
  for b in back:
    assert b.K == 16 and b.M == 16
    np.testing.assert_array_equal(b.encode(x, verbose=False), codes)
    np.testing.assert_allclose(b.decode(codes, verbose=False), x_hat, rtol=1e-6, atol=1e-6)


def test_sa_codes_one_byte_per_code_and_index_refusal(k16):
  codec, x = k16
  codes = codec.encode(x, verbose=False)
  b = codec.sa_encode(x, verbose=False)
  assert codec.code_size == 1 + 16 and b.shape == (64, 17)
  np.testing.assert_array_equal(b[:, 1:], codes[:, 1:])  # by hand: one byte per code
  np.testing.assert_array_equal(codec.unpack_codes(b), codes)
  with pytest.raises(ValueError, match="needs a codec with K=256, got K=16"):
    qj.Index(codec)
