"""Codec API: create, streaming encode/decode, dynamic rate, save/load, bad input."""

import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

import qinco_jax as qj
from qinco_jax import checkpoint, rq_init
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


@pytest.mark.parametrize("init", ["rq", "reference"])
def test_create_copies_noisy_codebook_into_preselection_codebook(init):
  rng = np.random.default_rng(1)
  train = rng.standard_normal((300, D)).astype(np.float32)
  codec = qj.Codec.create(qj.QincoConfig(K=4, M=3, A=2, B=2, de=None, dh=4, init=init),
                          train, verbose=False)
  m = codec.model()
  # "rq" with E = D stores C_m halved (f = 2c there); C'_m is compared with residuals.
  scale = 0.5 if init == "rq" else 1.0
  np.testing.assert_array_equal(m.codebooks[...], scale * m.pre_codebooks[...])


def _np_greedy_rq(z, tables):
  """Greedy residual quantisation of z (n, D) with the given (K, D) tables, float64."""
  r = np.asarray(z, np.float64).copy()
  codes = np.empty((len(z), len(tables)), np.int64)
  for m, C in enumerate(tables):
    codes[:, m] = np.argmin(((r[:, None, :] - C[None]) ** 2).sum(-1), axis=1)
    r -= C[codes[:, m]]
  return codes, z - r


@pytest.mark.parametrize("de,Ls,ivf", [(None, 0, False), (4, 0, False), (4, 1, False),
                                       (None, 1, False), (4, 0, True)])
def test_rq_init_starts_exactly_at_its_residual_quantiser(de, Ls, ivf):
  """init="rq": a new codec decodes like its RQ codebooks summed (NumPy) and greedy
  encoding (A=0, B=1) gives greedy RQ's codes, for every E and with an IVF step."""
  rng = np.random.default_rng(2)
  train = (rng.standard_normal((800, D)) * 2 + 1).astype(np.float32)
  x = (rng.standard_normal((200, D)) * 2 + 1).astype(np.float32)
  cfg = qj.QincoConfig(K=8, M=3, L=2, de=de, dh=8, A=3, B=2, Ls=Ls, init="rq",
                       codebook_noise_init=0.0, ivf_K=6 if ivf else 0)
  cents = train[:6] if ivf else None
  codec = qj.Codec.create(cfg, train, verbose=False, ivf_centroids=cents)
  p = reference.np_params(codec)
  mean, std = p["mean"], p["std"]
  # The RQ tables, read back without the network's storage convention: step 0 (or the
  # IVF centroids) as stored, the network steps' codewords as the RQ trained them.
  z = (train - mean.astype(np.float32)) / np.float32(std)  # as Codec.create computes it
  if ivf:
    C0 = p["C0"].astype(np.float32)
    z = z - C0[np.argmin(((z[:, None] - C0[None]) ** 2).sum(-1), 1)]
  tables, _ = rq_init.train_rq(z, cfg.K, cfg.M, seed=0)
  tables = [t.astype(np.float64) for t in tables]
  if ivf:
    tables = [p["C0"]] + tables
  codes = codec.encode(x, A=0, B=1, verbose=False)
  zx = (x - mean) / std
  want_codes, want_z = _np_greedy_rq(zx, tables)  # with IVF, step 0 = nearest centroid
  np.testing.assert_array_equal(codes, want_codes)
  np.testing.assert_allclose(codec.decode(codes, verbose=False), want_z * std + mean,
                             rtol=1e-5, atol=1e-5)


def test_reference_init_doubles_the_codeword_when_de_is_D():
  rng = np.random.default_rng(3)
  train = rng.standard_normal((300, D)).astype(np.float32)
  codec = qj.Codec.create(qj.QincoConfig(K=4, M=2, L=2, de=None, dh=4, A=0, B=1,
                                         init="reference"), train, verbose=False)
  p = reference.np_params(codec)
  step = p["steps"][0]
  c, x_hat = step["C"][1], rng.standard_normal(D)
  np.testing.assert_allclose(reference.np_f(step, c, x_hat, False), 2 * c, rtol=1e-6)
  assert codec.cfg.init == "reference"


def test_init_defaults_and_old_checkpoints():
  assert qj.QincoConfig().init == "rq"
  assert qj.preset("qinco1").init == "reference"
  with pytest.raises(ValueError, match="init"):
    qj.QincoConfig(init="zeros")
  with pytest.raises(ValueError, match="qinco1_mode"):
    qj.preset("qinco1", init="rq")
  # A config saved before `init` existed was created with the reference init.
  old = qj.QincoConfig().to_dict()
  del old["init"]
  assert qj.QincoConfig.from_dict(old).init == "reference"
  assert qj.QincoConfig.from_dict(qj.QincoConfig().to_dict()).init == "rq"


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
  codec.save("rel/sub/codec")  # missing parent directories are created
  np.testing.assert_array_equal(qj.load("rel/sub/codec").encode(train[:5], verbose=False),
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


@pytest.mark.parametrize("fault", [OSError(5, "I/O error (injected)"),
                                   KeyboardInterrupt("injected")])
def test_a_save_failing_between_its_renames_keeps_the_earlier_checkpoint(trained, tmp_path,
                                                                      monkeypatch, fault):
  """A failure injected between the two steps of the swap (the old copy moved out of
  the way, the new one not yet moved in) must leave the earlier checkpoint at the path,
  bit for bit, and nothing beside it."""
  codec = trained[0]
  path = tmp_path / "c"
  codec.save(path)
  real_replace = os.replace
  failed = []

  def replace(src, dst):
    if os.fspath(dst) == str(path) and not failed:
      failed.append(src)
      raise fault  # the first move into the path (the new copy's) fails
    return real_replace(src, dst)

  monkeypatch.setattr(os, "replace", replace)
  with pytest.raises(type(fault), match="injected"):
    reference.randomize(codec, scale=0.5, seed=9).save(path)
  monkeypatch.setattr(os, "replace", real_replace)
  assert sorted(os.listdir(tmp_path)) == ["c"]
  back = qj.load(path)
  for a, b in zip(jax.tree.leaves(back.state), jax.tree.leaves(codec.state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


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
    (np.full((2, 3), 8), r"0\.\.7, got range 8\.\.8"),
    (np.full((2, 3), -1), "non-negative, got range -1"),
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
  (tmp_path / "c" / "qinco_jax.json").write_text('["a", "list"]')
  with pytest.raises(ValueError, match="must hold a JSON object.*got a list"):
    qj.load(tmp_path / "c")


def test_save_refuses_a_directory_that_is_not_a_codec(trained, tmp_path):
  codec = trained[0]
  mine = tmp_path / "my_files"
  mine.mkdir()
  (mine / "thesis.tex").write_text("years of work")
  with pytest.raises(ValueError, match="not a qinco-jax codec checkpoint") as e:
    codec.save(mine)
  assert str(mine) in str(e.value)
  assert sorted(os.listdir(mine)) == ["thesis.tex"]  # nothing touched
  assert sorted(os.listdir(tmp_path)) == ["my_files"]  # no temporary left either
  empty = tmp_path / "empty"
  empty.mkdir()
  codec.save(empty)  # an empty directory holds nothing to lose
  codec.save(empty)  # and a codec checkpoint is replaced
  assert qj.load(empty).d == codec.d


def _parked_copies(tmp_path):
  return sorted(n for n in os.listdir(tmp_path) if n.startswith("."))


def test_load_restores_a_copy_left_by_a_save_killed_between_its_renames(trained, tmp_path):
  """A save killed after parking the old copy and before moving the new one in leaves
  nothing at the path: load must restore the newest complete copy, and the next save
  must clear the leftovers."""
  codec, train = trained
  path = tmp_path / "c"
  codec.save(path)
  other = reference.randomize(codec, scale=0.5, seed=9)
  other.save(tmp_path / "new")
  os.replace(tmp_path / "new", tmp_path / ".c.tmp-0000dead")  # written in full...
  os.replace(path, tmp_path / ".c.old-0000beef")  # ...and the old one parked: killed here
  with pytest.warns(UserWarning, match="restored the complete copy '.c.tmp-0000dead'"):
    back = qj.load(path)
  np.testing.assert_array_equal(back.encode(train[:20], verbose=False),
                                other.encode(train[:20], verbose=False))
  assert _parked_copies(tmp_path) == [".c.old-0000beef"]
  (tmp_path / ".c.tmp-1111dead").mkdir()  # a save killed while writing: incomplete
  codec.save(path)
  assert _parked_copies(tmp_path) == []  # leftovers removed by the next save


def test_recovery_skips_a_left_copy_whose_arrays_do_not_verify(trained, tmp_path):
  """Of the copies an interrupted save left, the newest whose checksums verify is
  restored: here the newer one has a flipped bit, so the older one comes back."""
  codec, train = trained
  path = tmp_path / "c"
  codec.save(tmp_path / "good")
  other = reference.randomize(codec, scale=0.5, seed=9)
  other.save(tmp_path / "bad")
  _flip_one_weight_bit(other, tmp_path / "bad")
  os.replace(tmp_path / "good", tmp_path / ".c.old-0000beef")
  os.replace(tmp_path / "bad", tmp_path / ".c.tmp-0000dead")
  t = os.stat(tmp_path / ".c.old-0000beef" / "qinco_jax.json").st_mtime
  os.utime(tmp_path / ".c.tmp-0000dead" / "qinco_jax.json", (t + 60, t + 60))  # newer
  with pytest.warns(UserWarning, match="restored the complete copy '.c.old-0000beef'"):
    assert checkpoint.recover(path) is True
  np.testing.assert_array_equal(qj.load(path).encode(train[:20], verbose=False),
                                codec.encode(train[:20], verbose=False))
  assert checkpoint.recover(path) is False  # something is at the path


def test_a_failed_save_after_an_interrupted_one_keeps_the_left_copy(trained, tmp_path,
                                                                   monkeypatch):
  """A save at a path that an interrupted save left empty (its old copy parked beside
  it) first restores that copy, so a second failure cannot lose it."""
  codec, train = trained
  path = tmp_path / "c"
  codec.save(path)
  os.replace(path, tmp_path / ".c.old-0000beef")  # killed between the renames

  def boom(*a, **k):
    raise OSError(28, "No space left on device")

  monkeypatch.setattr(checkpoint.json, "dump", boom)
  with pytest.warns(UserWarning, match="restored the complete copy"):
    with pytest.raises(OSError, match="No space"):
      reference.randomize(codec, scale=0.5, seed=9).save(path)
  monkeypatch.undo()
  assert sorted(os.listdir(tmp_path)) == ["c"]
  np.testing.assert_array_equal(qj.load(path).encode(train[:20], verbose=False),
                                codec.encode(train[:20], verbose=False))


def test_load_detects_corrupted_array_bytes(tmp_path):
  rng = np.random.default_rng(0)  # tables large enough that the data files hold them
  codec = qj.Codec.create(qj.QincoConfig(K=256, M=3, L=1, de=None, dh=8, A=3, B=2),
                          rng.standard_normal((3000, 32)).astype(np.float32),
                          verbose=False)
  codec.save(tmp_path / "c")
  files = [p for p in (tmp_path / "c" / "state").rglob("*")
           if p.is_file() and p.parent.name == "d" and "ocdbt" in p.parent.parent.name]
  data_file = max(files, key=lambda p: p.stat().st_size)  # the array bytes
  raw = bytearray(data_file.read_bytes())
  mid = len(raw) // 2
  raw[mid:mid + 16] = bytes(255 - b for b in raw[mid:mid + 16])
  data_file.write_bytes(bytes(raw))
  with pytest.raises(ValueError, match="corrupt|cannot read"):
    qj.load(tmp_path / "c")


def _flip_one_weight_bit(codec, path):
  """Rewrites the arrays of the codec saved at `path` through Orbax with the lowest
  mantissa bit of one weight flipped (finite, same shape and dtype); checks that Orbax
  reads the damaged value back."""
  import orbax.checkpoint as ocp
  arrays = jax.tree.map(np.array, nnx.to_pure_dict(codec.state))
  damaged = arrays["codebooks"]
  damaged.view(np.uint8).reshape(-1)[4 * 7] ^= 1
  assert np.isfinite(damaged).all() and not np.array_equal(
      damaged, np.asarray(codec.state["codebooks"][...]))
  ck = ocp.StandardCheckpointer()
  try:
    ck.save(path / "state", arrays, force=True)
    ck.wait_until_finished()
    stored = ck.restore(path / "state", jax.tree.map(np.zeros_like, arrays))
  finally:
    ck.close()
  np.testing.assert_array_equal(stored["codebooks"], damaged)  # the storage layer reads it


def test_load_verifies_checksums_of_arrays_the_storage_layer_reads(trained, tmp_path):
  """One bit of a stored weight flipped by hand and written back through Orbax (Orbax
  reads it without complaint) must be refused by our own checksums, with an error
  naming the checkpoint and the array."""
  codec = trained[0]
  path = tmp_path / "c"
  codec.save(path)
  _flip_one_weight_bit(codec, path)
  with pytest.raises(ValueError, match="corrupt") as e:
    qj.load(path)
  assert str(path) in str(e.value) and "'codebooks'" in str(e.value), e.value


def test_create_accepts_a_list_of_vectors():
  rng = np.random.default_rng(0)
  rows = rng.standard_normal((200, D)).tolist()
  codec = qj.Codec.create(qj.QincoConfig(K=4, M=2, A=0, B=1), rows, verbose=False)
  assert codec.d == D


def test_rq_initialisation_reports_progress_per_kmeans_iteration(capsys):
  rng = np.random.default_rng(0)
  qj.Codec.create(qj.QincoConfig(K=4, M=3, A=0, B=1), rng.standard_normal((300, D)),
                  verbose=True)
  err = capsys.readouterr().err
  # 3 stages x (10 iterations + 27 that place the seeds: 9 progressive stages x 3)
  assert "RQ init (K=4, M=3)" in err and "/111 [" in err


def _same_codes(a, b, x):
  np.testing.assert_array_equal(a.encode(x, verbose=False), b.encode(x, verbose=False))


def test_save_refuses_to_replace_files_it_did_not_write(trained, tmp_path):
  codec, train = trained
  path = tmp_path / "c"
  codec.save(path)
  (path / "notes.txt").write_text("mine")
  other = reference.randomize(codec, scale=0.5, seed=3)
  with pytest.raises(ValueError, match=r"holds 'notes.txt', which no save wrote"):
    other.save(path)
  assert (path / "notes.txt").read_text() == "mine"
  assert sorted(os.listdir(path)) == ["notes.txt", "qinco_jax.json", "state"]
  _same_codes(qj.load(path), codec, train[:20])  # the saved codec is intact too
  assert sorted(os.listdir(tmp_path)) == ["c"]  # no temporary left


def test_concurrent_saves_to_one_path_wait_for_each_other(trained, tmp_path, monkeypatch):
  """Save A is held after writing its arrays into its temporary directory until save
  B reaches either the lock or its own array write. Without the lock, B has by then
  removed A's temporary directory as a leftover, and A fails writing its metadata
  there; with it, B waits at the lock for A, and both succeed. (No timer: the verdict
  does not depend on how fast either thread runs.)"""
  import fcntl
  import threading

  from qinco_jax import checkpoint
  codec, train = trained
  real_ckpt = checkpoint._ckpt
  a_written, b_arrived = threading.Event(), threading.Event()
  real_flock = fcntl.flock

  def flock(fd, op):
    if threading.current_thread().name == "B" and op == fcntl.LOCK_EX:
      b_arrived.set()  # B is at the lock A holds
    return real_flock(fd, op)

  class Held:
    def __init__(self):
      self.ck = real_ckpt()

    def save(self, *a, **k):
      if threading.current_thread().name == "B":
        b_arrived.set()
      return self.ck.save(*a, **k)

    def wait_until_finished(self):
      self.ck.wait_until_finished()
      if threading.current_thread().name == "A":
        a_written.set()
        assert b_arrived.wait(120)  # a guard against a hang only

    def __getattr__(self, name):
      return getattr(self.ck, name)

  monkeypatch.setattr(checkpoint, "_ckpt", Held)
  monkeypatch.setattr(fcntl, "flock", flock)

  class WriteLock:  # the process's Orbax write lock, which A holds while held here
    def __init__(self, lock):
      self.lock = lock

    def __enter__(self):
      if threading.current_thread().name == "B":
        b_arrived.set()  # B is past the save lock (if any) and about to write
      return self.lock.__enter__()

    def __exit__(self, *exc):
      return self.lock.__exit__(*exc)

  monkeypatch.setattr(checkpoint, "_WRITE_LOCK", WriteLock(checkpoint._WRITE_LOCK))
  other = reference.randomize(codec, scale=0.5, seed=4)
  errors = []

  def save(c):
    try:
      c.save(tmp_path / "c")
    except Exception as e:  # reported below
      errors.append(e)

  ta = threading.Thread(target=save, args=(codec,), name="A")
  ta.start()
  assert a_written.wait(60)
  tb = threading.Thread(target=save, args=(other,), name="B")
  tb.start()
  ta.join()
  tb.join()
  monkeypatch.setattr(checkpoint, "_ckpt", real_ckpt)
  assert errors == []
  _same_codes(qj.load(tmp_path / "c"), other, train[:20])  # B saved last
  assert sorted(os.listdir(tmp_path)) == ["c"]


_SAVER = """
import os, sys, time
import qinco_jax as qj
codec = qj.load(sys.argv[1])
codec.save(sys.argv[3])  # warm-up (compiles nothing, imports Orbax), then start together
open(sys.argv[3] + ".ready", "w").close()
while not os.path.exists(os.path.join(os.path.dirname(sys.argv[2]), "go")):
  time.sleep(0.01)
for _ in range(10):
  codec.save(sys.argv[2])
"""


def test_two_processes_saving_one_path_both_succeed(trained, tmp_path):
  import subprocess
  import sys
  codec, train = trained
  codec.save(tmp_path / "src")
  env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(
      os.path.abspath(__file__))), "JAX_PLATFORMS": "cpu"}
  (tmp_path / "shared").mkdir()
  procs = [subprocess.Popen([sys.executable, "-c", _SAVER, str(tmp_path / "src"),
                             str(tmp_path / "shared" / "c"), str(tmp_path / f"own{i}")],
                            env=env, stderr=subprocess.PIPE, text=True) for i in range(2)]
  import time
  while not all((tmp_path / f"own{i}.ready").exists() or procs[i].poll() is not None
                for i in range(2)):
    time.sleep(0.01)
  (tmp_path / "shared" / "go").touch()  # both save 10 times at once
  for p in procs:
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-2000:]
  _same_codes(qj.load(tmp_path / "shared" / "c"), codec, train[:20])
  assert sorted(os.listdir(tmp_path / "shared")) == ["c", "go"]


def test_save_through_a_symbolic_link_keeps_the_link(trained, tmp_path):
  codec, train = trained
  codec.save(tmp_path / "real")
  (tmp_path / "link").symlink_to(tmp_path / "real")
  other = reference.randomize(codec, scale=0.5, seed=5)
  other.save(tmp_path / "link")
  assert (tmp_path / "link").is_symlink()
  _same_codes(qj.load(tmp_path / "real"), other, train[:20])
  _same_codes(qj.load(tmp_path / "link"), other, train[:20])
  assert sorted(os.listdir(tmp_path)) == ["link", "real"]  # no parked copy left


def test_save_into_the_current_directory_stays_in_it(trained, tmp_path, monkeypatch):
  codec, train = trained
  here = tmp_path / "here"
  here.mkdir()
  monkeypatch.chdir(here)
  codec.save(".")
  assert os.getcwd() == str(here)  # the process is not left in a deleted directory
  assert sorted(os.listdir(".")) == ["qinco_jax.json", "state"]
  codec.save(".")  # replacing the codec it is in
  assert sorted(os.listdir(".")) == ["qinco_jax.json", "state"]
  _same_codes(qj.load("."), codec, train[:20])


@pytest.mark.parametrize("size", [0, -1, 2.5])
def test_encode_and_decode_refuse_a_chunk_size_below_one(trained, size):
  codec, train = trained
  with pytest.raises(ValueError, match=r"chunk_size .* must be an int >= 1"):
    codec.encode(train[:10], chunk_size=size, verbose=False)
  codes = codec.encode(train[:10], verbose=False)
  with pytest.raises(ValueError, match=r"chunk_size .* must be an int >= 1"):
    codec.decode(codes, chunk_size=size, verbose=False)


@pytest.mark.parametrize("name", ["_METADATA", "manifest.ocdbt"])
def test_load_names_a_damaged_array_index(trained, tmp_path, name):
  codec = trained[0]
  codec.save(tmp_path / "c")
  f = tmp_path / "c" / "state" / name
  f.write_bytes(bytes(255 - b for b in f.read_bytes()))
  with pytest.raises(ValueError, match=f"checkpoint '{tmp_path / 'c'}' is damaged: the "
                                       "index of its arrays"):
    qj.load(tmp_path / "c")


def test_load_of_a_workdir_restores_its_interrupted_best_save(trained, tmp_path):
  codec, train = trained
  work = tmp_path / "work"
  codec.save(work / "best")
  (work / "ckpt").mkdir()
  os.replace(work / "best", work / ".best.tmp-0000dead")  # killed between the renames
  with pytest.warns(UserWarning, match="restored the complete copy '.best.tmp-0000dead'"):
    back = qj.load(work)
  _same_codes(back, codec, train[:20])
