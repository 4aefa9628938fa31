"""Interop: reference PyTorch state dicts, faiss QINCo export, npz archives."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import qinco_jax as qj
from qinco_jax import interop
from qinco_jax.model import Qinco
from tests.reference import randomize


def make_codec(cfg, d, seed=0, scale=0.3, mean=None, std=1.0):
  """A codec with random parameters and statistics, every array float32."""
  model = Qinco(cfg, d, rngs=nnx.Rngs(seed))
  if mean is not None:
    model.data_mean[...] = jnp.asarray(mean, jnp.float32)
  model.data_std[...] = jnp.float32(std)
  rng = np.random.default_rng(seed + 100)
  model.xtarget_mean[...] = jnp.asarray(rng.standard_normal(model.xtarget_mean.shape),
                                        jnp.float32)
  model.xtarget_std[...] = jnp.asarray(rng.uniform(0.5, 2, model.xtarget_std.shape),
                                       jnp.float32)
  codec = randomize(qj.Codec(cfg, d, nnx.state(model)), scale=scale, seed=seed)
  return codec.replace_state(
      jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), codec.state))


def pure_np(codec):
  return jax.tree.map(np.asarray, nnx.to_pure_dict(codec.state))


def assert_same_state(a, b):
  pa, pb = pure_np(a), pure_np(b)
  assert jax.tree.structure(pa) == jax.tree.structure(pb)
  for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
    assert x.dtype == y.dtype == np.float32
    np.testing.assert_array_equal(x, y)


QINCO2 = qj.QincoConfig(K=8, M=3, L=2, de=6, dh=5, A=2, B=2)
D = 4


@pytest.fixture(scope="module")
def codec2():
  return make_codec(QINCO2, D, mean=np.arange(D) - 1.5, std=1.7)


# ------------------------------------------------------------ (a) round trip
def test_state_dict_keys_and_shapes(codec2):
  sd = interop.to_torch_state_dict(codec2)
  E, H, K = 6, 5, 8
  want = {"data_mean": (D,), "data_std": (), "steps.0.codebook.weight": (K, D),
          "steps.0.xtarget_mean": (D,), "steps.0.xtarget_var": (D,)}
  for i in (1, 2):
    p = f"steps.{i}."
    want.update({
        p + "codebook.weight": (K, D), p + "substep.codebook.weight": (K, D),
        p + "concat.mlp.weight": (E, E + D), p + "concat.mlp.bias": (E,),
        p + "in_proj.weight": (E, D), p + "out_proj.weight": (D, E),
        p + "xtarget_mean": (D,), p + "xtarget_var": (D,)})
    for l in (0, 1):
      want[f"{p}residual_blocks.{l}.up_proj.weight"] = (H, E)
      want[f"{p}residual_blocks.{l}.down_proj.weight"] = (E, H)
  assert {k: v.shape for k, v in sd.items()} == want
  assert all(v.dtype == np.float32 for v in sd.values())
  pure = pure_np(codec2)
  # (out, in) layout: the reference weight is our kernel transposed.
  np.testing.assert_array_equal(sd["steps.2.concat.mlp.weight"],
                                pure["steps"]["concat"]["kernel"][1].T)
  np.testing.assert_array_equal(sd["steps.1.residual_blocks.1.up_proj.weight"],
                                pure["steps"]["blocks"][1]["up_proj"]["kernel"][0].T)
  np.testing.assert_array_equal(sd["steps.2.xtarget_var"], pure["xtarget_std"][2])
  assert interop.torch_parameters(codec2) == {
      "K": 8, "M": 3, "de": 6, "dh": 5, "L": 2, "A": 2, "B": 2, "ivf_in_use": False,
      "qinco1_mode": False}


@pytest.mark.parametrize("prefix", ["", "module."])
def test_round_trip_identical(codec2, prefix):
  sd = {prefix + k: v for k, v in interop.to_torch_state_dict(codec2).items()}
  back = interop.from_state_dict(sd, interop.torch_parameters(codec2), D)
  assert back.cfg == codec2.cfg.replace(init="reference") and back.d == D
  # The reference layout carries no init: "reference" unless the parameters say.
  params = {**interop.torch_parameters(codec2), "init": "rq"}
  assert interop.from_state_dict(sd, params, D).cfg == codec2.cfg
  assert_same_state(back, codec2)
  x = np.random.default_rng(0).normal(size=(64, D)).astype(np.float32) * 2
  codes = codec2.encode(x, verbose=False)
  np.testing.assert_array_equal(back.encode(x, verbose=False), codes)
  np.testing.assert_array_equal(back.decode(codes, verbose=False),
                                codec2.decode(codes, verbose=False))


def test_missing_parameters_are_read_off_the_arrays(codec2):
  sd = interop.to_torch_state_dict(codec2)
  back = interop.from_state_dict(sd, {"A": 2, "B": 2})
  assert back.cfg == codec2.cfg.replace(init="reference")
  guessed = interop.from_state_dict(sd, {})  # no hyperparameters at all
  assert (guessed.cfg.K, guessed.cfg.M, guessed.cfg.L, guessed.cfg.de, guessed.cfg.dh,
          guessed.cfg.A) == (8, 3, 2, 6, 5, 8)


def test_round_trip_qinco1_no_projections():
  cfg = qj.QincoConfig(K=4, M=2, L=1, de=None, dh=3, A=0, B=1, qinco1_mode=True)
  codec = make_codec(cfg, 3)
  sd = interop.to_torch_state_dict(codec)
  assert not any("proj.weight" in k and "residual" not in k for k in sd)
  assert not any("substep" in k for k in sd)
  # The reference stores A/B of its training runs; qinco1 mode means greedy.
  back = interop.from_state_dict(sd, {"qinco1_mode": True, "A": 16, "B": 32}, 3)
  assert back.cfg == cfg.replace(codebook_noise_init=1.0)
  assert_same_state(back, codec)


# ------------------------------------------------- (b) hand-computed decode
def _hand_state_dict():
  f = lambda *rows: np.array(rows, np.float32)  # noqa: E731
  return {
      "data_mean": f(1.0, -1.0), "data_std": np.array(2.0, np.float32),
      "steps.0.codebook.weight": f([1.0, 0.0], [0.0, 1.0]),
      "steps.0.xtarget_mean": f(0.0, 0.0), "steps.0.xtarget_var": f(1.0, 1.0),
      "steps.1.codebook.weight": f([0.5, -0.5], [-1.0, 2.0]),
      # W_c (E, E + D): columns 0-1 act on the embedding, 2-3 on x_hat.
      "steps.1.concat.mlp.weight": f([0.1, 0.0, 0.2, 0.0], [0.0, -0.1, 0.0, 0.3]),
      "steps.1.concat.mlp.bias": f(0.05, -0.05),
      "steps.1.residual_blocks.0.up_proj.weight": f([1.0, 0.0], [1.0, -1.0]),  # U (H, E)
      "steps.1.residual_blocks.0.down_proj.weight": f([0.5, 0.0], [0.0, -0.5]),  # V (E, H)
      "steps.1.xtarget_mean": f(0.0, 0.0), "steps.1.xtarget_var": f(1.0, 1.0),
  }


@pytest.mark.parametrize("qinco1", [False, True])
def test_hand_built_state_dict_decodes_as_computed_by_hand(qinco1):
  sd = _hand_state_dict()
  params = {"K": 2, "M": 2, "L": 1, "dh": 2, "A": 0, "B": 1, "qinco1_mode": qinco1}
  codec = interop.from_state_dict(sd, params, 2)
  assert (codec.cfg.K, codec.cfg.M, codec.cfg.L, codec.cfg.embed_dim(2), codec.cfg.dh,
          codec.cfg.A, codec.cfg.B) == (2, 2, 1, 2, 2, 0, 1)
  C0, C1 = sd["steps.0.codebook.weight"], sd["steps.1.codebook.weight"]
  W, b = sd["steps.1.concat.mlp.weight"], sd["steps.1.concat.mlp.bias"]
  U = sd["steps.1.residual_blocks.0.up_proj.weight"]
  V = sd["steps.1.residual_blocks.0.down_proj.weight"]
  codes = np.array([[i, j] for i in range(2) for j in range(2)], np.int32)
  want = []
  for i, j in codes:
    x_hat = C0[i].astype(np.float64)
    c = C1[j].astype(np.float64)
    e = c  # de = None: no projection
    h0 = e + W @ np.concatenate([e, x_hat]) + b
    h1 = h0 + V @ np.maximum(U @ h0, 0.0)
    f = h1 if qinco1 else c + h1  # outer residual in QINCo2 mode only
    want.append(2.0 * (x_hat + f) + np.array([1.0, -1.0]))
  want = np.array(want)
  # One value written out: codes (1, 1) in QINCo2 mode.
  if not qinco1:
    # c = (-1, 2), x_hat = (0, 1): h0 = c + (0.1*-1 + 0.2*0, -0.1*2 + 0.3*1) + b
    #   = (-1.05, 2.05); U h0 = (-1.05, -3.1) -> relu 0 -> h1 = h0; f = c + h1.
    np.testing.assert_allclose(want[3], 2.0 * (np.array([0, 1]) + np.array([-2.05, 4.05]))
                               + np.array([1, -1]), atol=1e-12)
  np.testing.assert_allclose(codec.decode(codes, verbose=False), want, rtol=1e-6,
                             atol=1e-6)
  np.testing.assert_array_equal(codec.decode(codes[:, :1], verbose=False),
                                2.0 * C0[codes[:, 0]] + np.array([1.0, -1.0], np.float32))


# ------------------------------------------------------------- (c) errors
def test_shape_mismatch_names_key_and_shapes(codec2):
  sd = interop.to_torch_state_dict(codec2)
  sd["steps.1.concat.mlp.weight"] = sd["steps.1.concat.mlp.weight"].T
  with pytest.raises(ValueError, match=r"'steps\.1\.concat\.mlp\.weight'.*\(6, 10\).*"
                                       r"\(10, 6\)"):
    interop.from_state_dict(sd, interop.torch_parameters(codec2), D)
  sd = interop.to_torch_state_dict(codec2)
  with pytest.raises(ValueError, match=r"steps\.0\.codebook\.weight.*\(16, 4\).*\(8, 4\)"):
    interop.from_state_dict(sd, {**interop.torch_parameters(codec2), "K": 16}, D)


def test_missing_and_unexpected_keys(codec2):
  params = interop.torch_parameters(codec2)
  sd = interop.to_torch_state_dict(codec2)
  del sd["steps.2.residual_blocks.1.down_proj.weight"]
  with pytest.raises(ValueError, match=r"missing.*steps\.2\.residual_blocks\.1\.down_proj"):
    interop.from_state_dict(sd, params, D)
  sd = interop.to_torch_state_dict(codec2)
  sd["steps.1.residual_blocks.2.up_proj.weight"] = np.zeros((5, 6), np.float32)
  with pytest.raises(ValueError, match=r"unexpected.*steps\.1\.residual_blocks\.2"):
    interop.from_state_dict(sd, params, D)
  sd = interop.to_torch_state_dict(codec2)
  sd["steps.3.codebook.weight"] = np.zeros((8, 4), np.float32)
  with pytest.raises(ValueError, match=r"unexpected.*steps\.3\.codebook"):
    interop.from_state_dict(sd, params, D)
  with pytest.raises(ValueError, match="data_dim"):
    interop.from_state_dict(interop.to_torch_state_dict(codec2), params, 0)
  with pytest.raises(ValueError, match="mapping"):
    interop.from_state_dict([("data_mean", np.zeros(4))], params, D)


def test_ivf_checkpoints(codec2):
  sd = interop.to_torch_state_dict(codec2)
  params = {**interop.torch_parameters(codec2), "ivf_in_use": True, "ivf_K": 32}
  with pytest.raises(ValueError, match=r"missing.*ivf_centroids"):
    interop.from_state_dict(sd, params, D)


def test_ivf_round_trip():
  cfg = qj.QincoConfig(K=8, M=2, L=1, de=6, dh=5, A=2, B=2, ivf_K=16)
  codec = make_codec(cfg, D)
  sd = interop.to_torch_state_dict(codec)
  assert sd["steps.0.ivf_centroids.weight"].shape == (16, D)
  assert "steps.0.codebook.weight" not in sd
  assert sd["steps.2.codebook.weight"].shape == (8, D)
  assert sd["steps.2.xtarget_var"].shape == (D,)
  # The reference's IVF step holds its centroids and nothing else (spec 15).
  assert sorted(k for k in sd if k.startswith("steps.0.")) == ["steps.0.ivf_centroids.weight"]
  back = interop.from_state_dict(sd, interop.torch_parameters(codec), D)
  assert back.cfg == cfg.replace(init="reference")
  # Every array comes back, but the IVF step's (unused) running statistics, which
  # the reference does not store: they restart at mean 0, std 1.
  m = back.model()
  np.testing.assert_array_equal(m.xtarget_mean[...][0], 0)
  np.testing.assert_array_equal(m.xtarget_std[...][0], 1)
  ref = codec.model()
  np.testing.assert_array_equal(m.xtarget_mean[...][1:], ref.xtarget_mean[...][1:])
  np.testing.assert_array_equal(m.ivf_centroids[...], ref.ivf_centroids[...])
  x = np.random.default_rng(0).normal(size=(32, D)).astype(np.float32)
  np.testing.assert_array_equal(back.encode(x, verbose=False), codec.encode(x, verbose=False))


def test_hand_built_ivf_state_dict_in_the_reference_layout():
  """A reference IVF checkpoint (spec 15: step 0 = centroids only) with networks that
  compute f(c, x_hat) = 2c (E = D, zero concat and down projections): decoding is
  std * (centroid + 2 C_1[k1] + 2 C_2[k2]) + mean, computed here by hand."""
  rng = np.random.default_rng(4)
  Kv, K, d, H = 5, 4, 3, 2
  cents = rng.normal(size=(Kv, d)).astype(np.float32)
  C = rng.normal(size=(2, K, d)).astype(np.float32)
  mean, std = np.array([1.0, -2.0, 0.5], np.float32), np.float32(3.0)
  sd = {"data_mean": mean, "data_std": std, "steps.0.ivf_centroids.weight": cents}
  for i in (1, 2):
    p = f"steps.{i}."
    sd[p + "codebook.weight"] = C[i - 1]
    sd[p + "concat.mlp.weight"] = np.zeros((d, 2 * d), np.float32)
    sd[p + "concat.mlp.bias"] = np.zeros(d, np.float32)
    sd[p + "residual_blocks.0.up_proj.weight"] = rng.normal(size=(H, d)).astype(np.float32)
    sd[p + "residual_blocks.0.down_proj.weight"] = np.zeros((d, H), np.float32)
    sd[p + "xtarget_mean"] = np.zeros(d, np.float32)
    sd[p + "xtarget_var"] = np.ones(d, np.float32)
  params = {"K": K, "M": 2, "L": 1, "dh": H, "A": 0, "B": 1, "ivf_in_use": True,
            "ivf_K": Kv}
  codec = interop.from_state_dict(sd, params, d)
  assert (codec.cfg.ivf_K, codec.cfg.M, codec.cfg.de) == (Kv, 2, None)
  codes = np.array([[0, 1, 3], [4, 0, 0], [2, 3, 1]])
  want = std * (cents[codes[:, 0]] + 2 * C[0][codes[:, 1]] + 2 * C[1][codes[:, 2]]) + mean
  np.testing.assert_allclose(codec.decode(codes, verbose=False), want, rtol=1e-5, atol=1e-5)
  assert set(interop.to_torch_state_dict(codec)) == set(sd)  # written back the same way


# --------------------------------------------------------------- (d) faiss
@pytest.fixture(scope="module")
def qinco1_codec():
  cfg = qj.QincoConfig(K=16, M=4, L=2, de=None, dh=12, A=0, B=1, qinco1_mode=True)
  return make_codec(cfg, 8, scale=0.5, mean=np.linspace(-3, 5, 8), std=2.5)


@pytest.mark.parametrize("normalized", [False, True])
def test_faiss_qinco_matches_greedy_encode_and_decode(qinco1_codec, normalized):
  codec = qinco1_codec
  mean = np.linspace(-3, 5, 8).astype(np.float32)
  x = (np.random.default_rng(1).normal(size=(1000, 8)) * 3.75 + mean).astype(np.float32)
  codes = codec.encode(x, A=0, B=1, verbose=False)
  q = interop.to_faiss_qinco(codec, normalized=normalized)
  assert (q.d, q.K, q.L, q.M, q.h) == (8, 16, 2, 4, 12)
  z = (x - mean) / np.float32(2.5) if normalized else x
  fcodes = interop.faiss_encode(q, z)
  assert fcodes.shape == codes.shape
  assert (fcodes == codes).all(axis=1).mean() >= 0.99
  ours = codec.decode(codes, verbose=False)
  theirs = interop.faiss_decode(q, codes)
  if normalized:
    theirs = theirs * np.float32(2.5) + mean
  assert np.abs(theirs - ours).max() <= 1e-5 * np.abs(ours).max()


def test_faiss_index_search(qinco1_codec):
  codec = qinco1_codec
  x = np.random.default_rng(2).normal(size=(300, 8)).astype(np.float32) * 4
  index = interop.to_faiss_index(codec)
  assert index.code_size == 2  # 4 codes x 4 bits
  index.add(x)
  _, I = index.search(x[:20], 5)
  decoded = codec.decode(codec.encode(x, A=0, B=1, verbose=False), verbose=False)
  assert (I == qj.metrics.knn(x[:20], decoded, 5)).mean() >= 0.95


def test_faiss_refuses_what_it_cannot_represent(codec2):
  with pytest.raises(ValueError, match="qinco1_mode"):
    interop.to_faiss_qinco(codec2)
  cfg = qj.QincoConfig(K=4, M=2, L=1, de=6, dh=3, A=0, B=1, qinco1_mode=True)
  with pytest.raises(ValueError, match="de=None"):
    interop.to_faiss_qinco(make_codec(cfg, 3))
  cfg = qj.QincoConfig(K=6, M=2, L=1, de=None, dh=3, A=0, B=1, qinco1_mode=True)
  with pytest.raises(ValueError, match="power of two"):
    interop.to_faiss_index(make_codec(cfg, 3))


# ----------------------------------------------------------------- (e) npz
def test_npz_round_trip(codec2, tmp_path):
  path = tmp_path / "codec.npz"
  interop.export_npz(codec2, path)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["codec.npz"]  # no temp left
  with np.load(path) as z:  # readable with NumPy alone
    assert z["steps/concat/kernel"].shape == (2, 10, 6)
    assert z["steps/blocks/1/up_proj/kernel"].shape == (2, 6, 5)
    assert int(z["__d__"]) == D
  back = interop.load_npz(path)
  assert back.cfg == codec2.cfg and back.d == D
  assert_same_state(back, codec2)
  x = np.random.default_rng(3).normal(size=(32, D)).astype(np.float32)
  np.testing.assert_array_equal(back.encode(x, verbose=False),
                                codec2.encode(x, verbose=False))


def test_npz_errors(codec2, tmp_path):
  with pytest.raises(FileNotFoundError):
    interop.load_npz(tmp_path / "none.npz")
  np.savez(tmp_path / "other.npz", a=np.zeros(3))
  with pytest.raises(ValueError, match="not a qinco-jax npz"):
    interop.load_npz(tmp_path / "other.npz")
  interop.export_npz(codec2, tmp_path / "c.npz")
  with np.load(tmp_path / "c.npz") as z:
    arrays = {k: z[k] for k in z.files}
  arrays["codebooks"] = arrays["codebooks"][:, :4]
  np.savez(tmp_path / "bad.npz", **arrays)
  with pytest.raises(ValueError, match=r"'codebooks'.*\(2, 4, 4\).*\(2, 8, 4\)"):
    interop.load_npz(tmp_path / "bad.npz")
  del arrays["codebooks"]
  np.savez(tmp_path / "bad.npz", **arrays)
  with pytest.raises(ValueError, match=r"missing \['codebooks'\]"):
    interop.load_npz(tmp_path / "bad.npz")


# --------------------------------------------------------------- (f) torch
def test_torch_checkpoint_file(codec2, tmp_path):
  torch = pytest.importorskip("torch")
  path = tmp_path / "model.pt"
  interop.save_torch(codec2, path)
  raw = torch.load(path, map_location="cpu", weights_only=True)
  assert set(raw) == {"epoch", "model", "parameters", "data_dim"}
  assert raw["data_dim"] == D and raw["parameters"]["de"] == 6
  assert isinstance(raw["model"]["steps.1.concat.mlp.weight"], torch.Tensor)
  back = interop.from_torch(path)
  assert back.cfg == codec2.cfg.replace(init="reference")
  assert_same_state(back, codec2)
  # Tensors straight from a (data-parallel) torch state dict, half precision too.
  sd = {"module." + k: v.to(torch.bfloat16) if k == "data_mean" else v
        for k, v in raw["model"].items()}
  back = interop.from_state_dict(sd, raw["parameters"], raw["data_dim"])
  assert back.cfg == codec2.cfg.replace(init="reference")


def test_from_torch_without_torch_or_file(tmp_path, monkeypatch):
  import builtins
  real_import = builtins.__import__

  def no_torch(name, *args, **kwargs):
    if name == "torch":
      raise ImportError("no torch here")
    return real_import(name, *args, **kwargs)

  monkeypatch.setattr(builtins, "__import__", no_torch)
  with pytest.raises(ImportError, match=r"pip install"):
    interop.from_torch(tmp_path / "model.pt")


def test_npz_with_bad_values_or_bytes_is_refused(codec2, tmp_path):
  interop.export_npz(codec2, tmp_path / "c.npz")
  with np.load(tmp_path / "c.npz") as z:
    arrays = {k: z[k] for k in z.files}
  np.savez(tmp_path / "std0.npz", **{**arrays, "data_std": np.float32(0.0)})
  with pytest.raises(ValueError, match="data_std must be > 0"):
    interop.load_npz(tmp_path / "std0.npz")
  bad = arrays["codebooks"].copy()
  bad[0, 0, 0] = np.nan
  np.savez(tmp_path / "nan.npz", **{**arrays, "codebooks": bad})
  with pytest.raises(ValueError, match="'codebooks' holds NaN"):
    interop.load_npz(tmp_path / "nan.npz")
  raw = (tmp_path / "c.npz").read_bytes()
  (tmp_path / "cut.npz").write_bytes(raw[: len(raw) // 2])
  with pytest.raises(ValueError, match="not a readable .npz"):
    interop.load_npz(tmp_path / "cut.npz")
  (tmp_path / "junk.npz").write_bytes(b"not a zip at all")
  with pytest.raises(ValueError, match="not a readable .npz"):
    interop.load_npz(tmp_path / "junk.npz")
