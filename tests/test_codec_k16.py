"""4-bit QINCo2 (K = 16): codecs with 16 codewords per step save, load, import/export
like K = 256 ones, store two codes per byte, and index with the fast-scan first stage."""

import json

import numpy as np
import pytest

import qinco_jax as qj
from qinco_jax import interop, packing
from qinco_jax.search import shards
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


def test_sa_codes_pack_two_codes_per_byte(k16):
  codec, x = k16
  codes = codec.encode(x, verbose=False)
  b = codec.sa_encode(x, verbose=False)
  assert codec.code_size == 1 + 8 and b.shape == (64, 9)  # 8 B for M = 16 4-bit codes
  np.testing.assert_array_equal(b[:, 0], codes[:, 0])  # the list id: one byte (8 lists)
  by_hand = codes[:, 1::2] | (codes[:, 2::2] << 4)  # low nibble first
  np.testing.assert_array_equal(b[:, 1:], by_hand)
  np.testing.assert_array_equal(codec.unpack_codes(b), codes)


def test_packed_fields_by_hand():
  # two bytes of list id, three 4-bit codes (the last high nibble left 0), one byte
  c = np.array([[0x1234, 1, 2, 3, 200], [0xFFFF, 15, 0, 15, 0]])
  b = packing.pack_fields(c, [16, 4, 4, 4, 8])
  assert b.tolist() == [[0x34, 0x12, 0x21, 0x03, 200], [0xFF, 0xFF, 0x0F, 0x0F, 0]]
  assert packing.packed_size([16, 4, 4, 4, 8]) == 5
  np.testing.assert_array_equal(packing.unpack_fields(b, [16, 4, 4, 4, 8]), c)
  with pytest.raises(ValueError, match="4 or whole bytes, got 6 bits"):
    packing.pack_fields(c, [16, 6, 4, 4, 8])


def test_shards_store_the_packed_4_bit_codes(k16, tmp_path):
  codec, x = k16
  shards.encode_shard(codec, x, tmp_path, 0, 1)
  raw = np.load(tmp_path / "codes_db.0000of0001.npy")
  assert raw.shape == (64, 9)
  np.testing.assert_array_equal(shards.load_shards(tmp_path, db=x, codec=codec),
                                codec.encode(x, verbose=False))


def test_index_refuses_other_K_and_inner_products_at_K16(k16):
  codec, _ = k16
  with pytest.raises(ValueError, match="metric='ip' needs a codec with K=256"):
    qj.Index(codec, metric="ip")
  cfg = qj.QincoConfig(K=64, M=2, L=1, de=8, dh=8, A=4, B=4, ivf_K=8)
  rng = np.random.default_rng(0)
  x = rng.normal(size=(300, D)).astype(np.float32)
  other = qj.Codec.create(cfg, x, verbose=False, ivf_centroids=x[:8])
  with pytest.raises(ValueError, match=r"8-bit codes \(K=256\) or 4-bit codes .*got a "
                     "codec with K=64"):
    qj.Index(other)


@pytest.fixture(scope="module")
def k16_index(k16):
  codec, _ = k16
  rng = np.random.default_rng(1)
  xt = rng.normal(size=(1500, D)).astype(np.float32)
  db = rng.normal(size=(1200, D)).astype(np.float32)
  index = qj.Index(codec)
  index.train(xt)
  codes = index.add(db)
  return index, db, codes, rng.normal(size=(30, D)).astype(np.float32)


def test_index_search_equals_exhaustive_search_over_the_full_decoding(k16_index):
  """Every list probed, the whole database re-ranked: the answer is the exact search
  among the QINCo2 decodings of all stored codes (fast-scan first stage, pairwise and
  re-rank stages of a K = 16 index)."""
  index, db, codes, q = k16_index
  full = index.codec.decode(codes, verbose=False).astype(np.float64)
  dist = ((q[:, None].astype(np.float64) - full[None]) ** 2).sum(2)
  want = np.argsort(dist, 1, kind="stable")[:, :5]
  D_, I = index.search(q, 5, nprobe=8, nshort=len(db), nmid_short=1)
  np.testing.assert_array_equal(I, want)
  np.testing.assert_allclose(D_, np.take_along_axis(dist, want, 1), rtol=1e-4, atol=1e-4)
  # the fast-scan stage alone returns every stored vector when every list is probed
  _, lists, got_codes, ids = index._ivf.search(q, len(db), 8, 64)
  assert (np.sort(ids, 1) == np.arange(len(db))).all()
  np.testing.assert_array_equal(got_codes[0], codes[ids[0], 1:])
  np.testing.assert_array_equal(lists[0], codes[ids[0], 0])


def test_index_saves_loads_removes_and_builds_from_shards(k16_index, tmp_path):
  index, db, codes, q = k16_index
  want = index.search(q, 5, nprobe=3, nshort=20)
  index.save(tmp_path / "i")
  meta = json.loads((tmp_path / "i" / "lists" / "lists.json").read_text())
  assert meta["kind"] == "fastscan" and meta["code_size"] == 9  # (16 + 2) nibbles
  back = qj.load_index(tmp_path / "i")
  assert back.ntotal == len(db) and back.codec.K == 16
  for a, b in zip(back.search(q, 5, nprobe=3, nshort=20), want):
    np.testing.assert_array_equal(a, b)
  # removal in memory and by the offline compaction agree
  drop = want[1][:, 0]
  n = back.remove_ids(drop)
  other = qj.load_index(tmp_path / "i")
  assert other.remove_ids(drop, path=tmp_path / "j") == n == len(np.unique(drop))
  for idx in (back, other, qj.load_index(tmp_path / "j")):
    assert idx.ntotal == len(db) - n
    I = idx.search(q, 5, nprobe=3, nshort=20)[1]
    assert not np.isin(I, drop).any()
    np.testing.assert_array_equal(I, back.search(q, 5, nprobe=3, nshort=20)[1])
  # the build stage: packed 4-bit shards streamed into the list file
  (tmp_path / "sh").mkdir()
  shards.encode_shard(index.codec, db, tmp_path / "sh", 0, 2)
  shards.encode_shard(index.codec, db, tmp_path / "sh", 1, 2)
  fresh = qj.Index(index.codec)
  fresh.train(np.random.default_rng(1).normal(size=(1500, D)).astype(np.float32))
  fresh.add_shards(shards.find_shards(tmp_path / "sh", db=db, codec=index.codec),
                   tmp_path / "k")
  for a, b in zip(qj.load_index(tmp_path / "k").search(q, 5, nprobe=3, nshort=20), want):
    np.testing.assert_array_equal(a, b)
