"""The search job's inputs (`search.job`): the BigANN/Deep1B file layouts in both
distributions, and ground truth that does not fit the database."""

import dataclasses

import numpy as np
import pytest

from qinco_jax import data
from qinco_jax.search import job as search_job


def _write_layout(root, files, n_db=50, nq=5, d=8, dtype=np.float32, gt_max=None):
  rng = np.random.default_rng(0)
  learn, base, queries, gt = (root / f for f in files)
  gt.parent.mkdir(parents=True, exist_ok=True)
  x = rng.integers(0, 256, size=(200 + n_db + nq, d)).astype(dtype)
  data.write_vecs(learn, x[:200])
  data.write_vecs(base, x[200:200 + n_db])
  data.write_vecs(queries, x[200 + n_db:])
  ids = rng.integers(0, n_db if gt_max is None else gt_max + 1, size=(nq, 10))
  if gt_max is not None:
    ids[0, 0] = gt_max
  data.write_vecs(gt, ids.astype(np.int32))
  return x


@pytest.mark.parametrize("name, layout, dtype", [
    ("bigann", "bin", np.uint8), ("bigann", "vecs", np.uint8), ("deep1b", "bin", np.float32),
    ("bigann1b", "vecs", np.uint8)])
def test_data_sets_are_read_from_either_distribution(tmp_path, name, layout, dtype):
  files = search_job.FILES[search_job.ALIASES.get(name, name)][layout]
  x = _write_layout(tmp_path, files, dtype=dtype)
  job = search_job.SearchJob(data=name, root=str(tmp_path), workdir=str(tmp_path / "w"))
  train_x, val, db, queries, gt = search_job.load_data(job, need_gt=True)
  assert db.dtype == dtype and isinstance(db, np.memmap)
  np.testing.assert_array_equal(np.concatenate([train_x, val]), x[:200])
  np.testing.assert_array_equal(db, x[200:250])
  assert gt.shape == (5, 10) and gt.dtype == np.int64


def test_missing_files_and_ground_truth_beyond_the_database_are_refused(tmp_path):
  job = search_job.SearchJob(data="deep1b", root=str(tmp_path), workdir=str(tmp_path / "w"))
  with pytest.raises(FileNotFoundError, match="holds neither base file .*'base.fvecs' or "
                                              "'base.1B.fbin'"):
    search_job.load_data(job, need_gt=False)
  _write_layout(tmp_path, search_job.FILES["deep1b"]["bin"], gt_max=50)  # 50 rows: 0..49
  search_job.load_data(job, need_gt=False)  # only the search stage reads it
  with pytest.raises(ValueError, match=r"holds ids \d+..50, outside the database's 0..49"):
    search_job.load_data(job, need_gt=True)


@pytest.mark.parametrize("field, value, message", [
    ("ivf_K", 0, "ivf_K must be >= 1, got 0"), ("ivf_K", -5, "ivf_K must be >= 1, got -5"),
    ("B", 0, "B must be >= 1"), ("A", -1, "A must be >= 0"), ("enc_B", 0, "enc_B must be"),
    ("shard_rows", 0, "shard_rows must be >= 1")])
def test_bad_numbers_are_refused_naming_the_field(field, value, message):
  with pytest.raises(ValueError, match=message):
    search_job.SearchJob(**{field: value})


def test_stages_take_over_the_settings_earlier_ones_used(tmp_path):
  """A stage takes the settings the workdir's finished stages recorded unless given;
  given against them it is refused, except for a stage being rerun before any later
  one used it."""
  from qinco_jax.search.workdir import SearchWorkdir
  wd = SearchWorkdir(tmp_path)
  wd.record("ivf", {"data": "glove", "root": "", "ivf_K": 16, "ef_construction": 40})
  job = search_job.SearchJob(workdir=str(tmp_path), stage="train", given=frozenset())
  assert search_job.reconcile(job).ivf_K == 16
  rerun = search_job.SearchJob(workdir=str(tmp_path), stage="ivf", ivf_K=32)
  assert search_job.reconcile(rerun).ivf_K == 32  # nothing used the centroids yet
  wd.record("train", {"M": 2, "L": 1, "de": 8, "dh": 8, "A": 2, "B": 2})
  job = search_job.SearchJob(workdir=str(tmp_path), stage="encode", given=frozenset())
  got = search_job.reconcile(job)
  assert (got.ivf_K, got.M, got.A, got.B) == (16, 2, 2, 2)
  with pytest.raises(search_job.JobError, match=r"--ivf_K=32: the ivf stage \(and then "
                                                r"train\) of .* used ivf_K=16"):
    search_job.reconcile(rerun)
  with pytest.raises(search_job.JobError, match="--M=8: the train stage of .* used M=2"):
    search_job.reconcile(search_job.SearchJob(workdir=str(tmp_path), stage="build", M=8,
                                              given=frozenset({"M"})))


def test_a_stage_run_before_its_inputs_exist_says_which_to_run(tmp_path):
  for stage, before in (("train", "ivf"), ("build", "train"), ("search", "build")):
    with pytest.raises(search_job.JobError, match=f"run --stage={before} first"):
      search_job.run(search_job.SearchJob(workdir=str(tmp_path), stage=stage))
    assert not (tmp_path / f"command.{stage}.txt").exists()  # nothing left behind


def test_the_ivf_stage_shows_its_progress(tmp_path, capfd):
  """The ivf stage's K-means prints each iteration (it ran 99 s without a line)."""
  _write_layout(tmp_path, search_job.FILES["deep1b"]["vecs"])
  search_job.run(search_job.SearchJob(workdir=str(tmp_path / "w"), stage="ivf",
                                      data="deep1b", root=str(tmp_path), ivf_K=4))
  out = capfd.readouterr().out.replace("\r", "\n")
  assert "Clustering 180 points in 8D to 4 clusters" in out  # 200 learn rows, 20 held out
  assert "  Iteration 0 (" in out and "  Iteration 1 (" in out
  assert (tmp_path / "w" / "command.ivf.txt").exists()


def test_a_rerun_of_all_stages_goes_on_from_the_first_unfinished_one(tmp_path, monkeypatch,
                                                                    capsys):
  """--stage=all skips the stages job.json records as finished with the same settings
  (encode only when every shard of its split is written), runs the first other one and
  every later one; a stage named on its own always runs."""
  ran = []
  monkeypatch.setattr(search_job, "_run_stages",
                      lambda job, wd, main, stages: ran.extend(stages))
  from qinco_jax.search.workdir import SearchWorkdir
  wd = SearchWorkdir(tmp_path)
  job = search_job.SearchJob(workdir=str(tmp_path), ivf_K=16, M=2, given=frozenset())
  settings = lambda stage: {f: getattr(job, f) for f in search_job.STAGE_FIELDS[stage]}
  for stage in ("ivf", "train"):
    wd.record(stage, settings(stage))

  def run(**kw):
    ran.clear()
    search_job.run(dataclasses.replace(job, **kw))
    return list(ran)

  assert run() == ["encode", "build", "search"]  # ivf and train finished
  assert "ivf: finished earlier" in capsys.readouterr().out
  # Every stage is recorded now, but the encode stage's shards are not all there (as
  # when the first of several --shard jobs records it): encode and what follows run.
  (tmp_path / "codes_db.0001of0002.npy").write_bytes(b"")
  assert run() == ["encode", "build", "search"]
  (tmp_path / "codes_db.0000of0002.npy").write_bytes(b"")
  assert run() == []
  assert run(stage="ivf") == ["ivf"]  # named on its own: runs
  assert run(stage="build") == ["build"]
  # A finished stage given other settings (allowed: nothing later used them) runs
  # again, and so does every later stage.
  wd.record_file.unlink()
  wd.record("ivf", settings("ivf"))
  assert run(ivf_K=32, given=frozenset({"ivf_K"})) == list(search_job.STAGES)
