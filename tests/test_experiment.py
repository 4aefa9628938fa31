"""End to end: the training entry point's body on the seconds-long synthetic config."""

import importlib
import json
import os
import sys

import pytest

import qinco_jax as qj
from qinco_jax import experiment, trainer
from qinco_jax.search.workdir import SearchWorkdir
from tests import reference

EXPERIMENTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "experiments")


def _config(name):
  return importlib.import_module(f"qinco_jax.configs.{name}").get_config()


def test_synthetic_run_trains_evaluates_and_beats_its_initialisation(tmp_path, capsys):
  c = _config("synthetic_tiny")
  summary = experiment.run(c, str(tmp_path / "run"))
  out = capsys.readouterr().out
  assert "faiss RQ" in out and "QINCo2" in out
  # The table explains itself and compares; each long step said what it was doing.
  assert "QINCo2 / faiss RQ: MSE" in out and "R@k: share of queries" in out
  assert "min in all" in out and "encoding the 1,000 database vectors at A=4, B=8" in out
  assert (tmp_path / "run" / "rate_distortion.png").stat().st_size > 1000
  q = summary["qinco"]
  assert len(q["per_step_mse"]) == 3 and q["per_step_mse"][-1] == q["mse"]
  assert 0 <= q["R@1"] <= q["R@10"] <= q["R@100"] <= 1
  log = trainer.read_metrics(tmp_path / "run" / "metrics.jsonl")
  val = [r["val_mse"] for r in log if "val_mse" in r]
  assert min(val[1:]) < val[0]  # training improved on the initial codec
  assert qj.load(tmp_path / "run").M == 3


# Every experiment config resolved to (model fields, recipe fields, data and eval), as
# each config file's docstring and the paper's presets (spec section 10) state them.
EXPECTED = {
    "glove_small": (dict(K=256, M=8, L=2, de=64, dh=128, A=4, B=4, init="rq"),
                    dict(lr=4e-3, epochs=6, warmup_epochs=1.0, cosine_epochs=None,
                         stop_patience=3, batch_per_device=1024, loop=290_000),
                    dict(name="glove", eval_AB=(8, 16), rq_beam=8, db=0)),
    "synthetic_tiny": (dict(K=16, M=3, L=1, de=16, dh=16, A=4, B=4, init="rq"),
                       dict(epochs=3, warmup_epochs=1.0, stop_patience=2,
                            batch_per_device=128, loop=1_000),
                       dict(name="synthetic", eval_AB=(4, 8), rq_beam=32, db=1_000)),
    "qinco2_s": (dict(K=256, M=8, L=2, de=128, dh=256, A=16, B=32, init="rq"),
                 dict(lr=8e-4, epochs=71, warmup_epochs=3.0, cosine_epochs=60.0,
                      stop_patience=10, batch_per_device=1024, loop=10_000_000,
                      weight_decay=0.1, grad_clip=0.1, schedule="cosine"),
                 dict(name="bigann", eval_AB=(32, 64), rq_beam=32, db=1_000_000)),
    "qinco2_m": (dict(K=256, M=8, L=4, de=384, dh=384, A=16, B=32),
                 dict(lr=8e-4, epochs=71, cosine_epochs=60.0),
                 dict(name="bigann", eval_AB=(32, 64))),
    "qinco2_l": (dict(K=256, M=8, L=16, de=384, dh=384, A=16, B=32),
                 dict(lr=8e-4, epochs=71, cosine_epochs=60.0),
                 dict(name="bigann", eval_AB=(32, 64))),
    "qinco1": (dict(K=256, M=8, L=16, de=None, dh=256, A=0, B=1, qinco1_mode=True,
                    init="reference", codebook_noise_init=1.0),
               dict(lr=1e-4, optimizer="adam", schedule="plateau", plateau_patience=10,
                    weight_decay=0.0, grad_clip=None, stop_patience=20,
                    reset_dead_codes=False, epochs=71),
               dict(name="bigann", eval_AB=(0, 1), db=1_000_000)),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_config_resolves_to_its_documented_values(name):
  c = _config(name)
  m = experiment.model_config(c, 128)
  t = experiment.train_config(c)
  want_m, want_t, want_rest = EXPECTED[name]
  assert {k: getattr(m, k) for k in want_m} == want_m
  assert {k: getattr(t, k) for k in want_t} == want_t
  assert c.data.name == want_rest["name"]
  assert (c.eval.A, c.eval.B) == want_rest["eval_AB"]
  for k in ("rq_beam",):
    if k in want_rest:
      assert c.eval[k] == want_rest[k]
  if "db" in want_rest:
    assert c.ds.db == want_rest["db"]
  if want_rest["name"] == "bigann":
    assert c.data.mse_scale == 1e-4
    with pytest.raises(ValueError, match="data.root"):
      experiment.dataset(c)


def test_config_override_applies(tmp_path):
  c = _config("qinco2_s")
  c.model.M = 16
  c.model.A = 4
  m = experiment.model_config(c, 128)
  assert (m.M, m.A, m.B) == (16, 4, 32)


@pytest.mark.parametrize("name", ["glove_small", "qinco2_s"])
def test_command_line_overrides_parse_and_apply(name):
  # Fields left at "the preset's value" must still take --config.x.y=value flags
  # (through the real entry point; --print_config resolves them and exits).
  import subprocess
  r = subprocess.run(
      [sys.executable, os.path.join(EXPERIMENTS, "train_bigann.py"),
       f"--config={name}",
       "--config.model.M=16", "--config.model.A=4", "--config.model.de=32",
       "--config.train.lr=0.002", "--config.train.time_budget_s=90",
       "--config.train.epochs=7", "--config.eval.B=64", "--config.ds.loop=5000",
       "--print_config"], capture_output=True, text=True, timeout=120,
      env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert r.returncode == 0, r.stderr[-2000:]
  c = json.loads(r.stdout)
  assert (c["model"]["M"], c["model"]["A"], c["model"]["de"]) == (16, 4, 32)
  t = c["train"]
  assert (t["lr"], t["time_budget_s"], t["epochs"], t["loop"]) == (0.002, 90.0, 7, 5000)
  assert c["eval"]["B"] == 64


def test_search_script_stages_on_a_deep1b_layout(tmp_path):
  """experiments/search_bigann.py, one stage per process on a tiny Deep1B-style folder:
  ivf/train/encode/build run before the ground-truth file exists (only search reads
  it), each stage records its command and where it ran, and the search finds the
  true neighbours far above chance."""
  import subprocess

  import numpy as np

  ds = qj.data.load_synthetic(n_train=21_500, n_db=2_000, n_queries=100, d=8, n_val=0)
  root, work = tmp_path / "deep", tmp_path / "work"
  root.mkdir()
  qj.data.write_vecs(str(root / "learn.fvecs"), np.asarray(ds.train))
  qj.data.write_vecs(str(root / "base.fvecs"), np.asarray(ds.db))
  qj.data.write_vecs(str(root / "deep1B_queries.fvecs"), np.asarray(ds.queries))
  script = os.path.join(EXPERIMENTS, "search_bigann.py")
  common = [f"--workdir={work}", "--data=deep1b", f"--root={root}", "--ivf_K=16",
            "--M=2", "--A=2", "--B=2", "--epochs=1", "--max_experiments=3"]

  def stage(name):
    r = subprocess.run([sys.executable, script, f"--stage={name}", *common],
                       capture_output=True, text=True, timeout=300,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert r.returncode == 0, r.stderr[-3000:]
    cmd = (work / f"command.{name}.txt").read_text()
    assert f"--stage={name}" in cmd and "# on CPU x1" in cmd
    return r.stdout

  for name in ("ivf", "train", "encode", "build"):
    stage(name)
  # The learn file's last rows are the validation set, held out once (10k of a large
  # file, a tenth of this one): 19,350 training vectors remain of 21,500.
  assert json.loads((work / "train" / "ckpt_meta.json").read_text())["n_train"] == 19_350
  qj.data.write_vecs(str(root / "deep1B_groundtruth.ivecs"), ds.gt.astype(np.int32))
  out = stage("search")
  assert "Pareto front of" in out and (work / "sweep.png").exists()
  best = max(r["R@10"] for r in reference.read_jsonl(work / "sweep.jsonl"))
  assert best > 0.3  # chance is 10 / 2000
  # Every file the stages wrote is where the layout type says (and nothing else).
  wd = SearchWorkdir(work)
  named = {wd.centroids, wd.coarse, wd.model, wd.index, wd.sweep_log, wd.sweep_plot,
           wd.record_file,
           *(wd.command(s) for s in ("ivf", "train", "encode", "build", "search"))}
  shards = set(work.glob(f"{wd.codes}.*of*.*"))
  assert set(work.iterdir()) == named | shards and len(shards) == 2
  assert qj.load_index(wd.index).ntotal == 2000
  # The workdir remembers its stages' settings: a new ivf stage with other lists under
  # the trained model is refused in one line, the centroids untouched.
  cents = wd.centroids.read_bytes()
  r = subprocess.run([sys.executable, script, "--stage=ivf", *common, "--ivf_K=32"],
                     capture_output=True, text=True, timeout=300,
                     env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
  assert ("--ivf_K=32: the ivf stage (and then train, encode, build, search) of "
          f"{work} used ivf_K=16") in r.stderr
  assert wd.centroids.read_bytes() == cents


@pytest.mark.parametrize("flag, message", [
    ("--config.model.Q=3", "config.model has no field 'Q' (its fields: A, B, K"),
    ("--config.trian.lr=3", "config has no field 'trian'; did you mean 'train'?")])
def test_unknown_config_field_is_one_line(flag, message):
  import subprocess
  for config in ([], ["--config=synthetic_tiny"]):
    r = subprocess.run([sys.executable, os.path.join(EXPERIMENTS, "train_bigann.py"),
                        *config, flag, "--print_config"], capture_output=True, text=True,
                       timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert r.returncode == 2 and message in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and not r.stdout


def test_search_program_flags_are_the_search_job_fields():
  """One schema: every SearchJob field with a help text is a qinco-search flag with
  the field's default, and a bad value is refused in one line naming the field."""
  import dataclasses
  import subprocess

  from qinco_jax.search import job as search_job
  script = os.path.join(EXPERIMENTS, "search_bigann.py")
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  r = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True,
                     timeout=120, env=env)
  assert r.returncode == 0, r.stderr[-2000:]
  job = search_job.SearchJob()
  for f in dataclasses.fields(job):
    if "help" not in f.metadata:
      continue
    value = getattr(job, f.name)
    shown = "/".join(map(str, value)) if f.name == "shard" else str(value)
    assert f"--{f.name}: " in r.stdout and f"(default: '{shown}')" in r.stdout.split(
        f"--{f.name}: ")[1][:400], f.name
  r = subprocess.run([sys.executable, script, "--stage=bogus", "--workdir=unused"],
                     capture_output=True, text=True, timeout=120, env=env)
  assert r.returncode == 1 and "stage must be one of" in r.stderr, r.stderr[-2000:]
  assert "Traceback" not in r.stderr


def test_search_config_file_sets_the_flag_defaults(tmp_path):
  """`--config=search_glove` makes the packaged file's values the flags' defaults (a
  flag still overrides them); a config naming a field SearchJob lacks, a value of the
  wrong type or a file without get_config() is refused in one line."""
  import runpy
  import subprocess

  from qinco_jax import cli
  script = os.path.join(EXPERIMENTS, "search_bigann.py")
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  values = runpy.run_path(cli.config_path("search_glove", cli.SEARCH_CONFIG_NAMES))[
      "get_config"]()
  assert values["time_budget_s"] == 1500 and (values["enc_A"], values["enc_B"]) == (16, 32)
  r = subprocess.run([sys.executable, script, "--config=search_glove",
                      "--help"], capture_output=True, text=True, timeout=120, env=env)
  assert r.returncode == 0, r.stderr[-2000:]

  def default(name):
    return r.stdout.split(f"--{name}: ")[1][:400].split("(default: '")[1].split("'")[0]

  assert float(default("time_budget_s")) == 1500.0
  assert default("enc_A") == "16" and default("stop_patience") == "1000"
  # A config file's value is used unless its flag is given ("--config FILE" form too):
  # this one's stage is refused by SearchJob, so a run that gets to reading the data
  # took --stage from the flag.
  cfg = tmp_path / "job.py"
  root = tmp_path / "missing"
  cfg.write_text("def get_config():\n  return dict(stage='bogus', data='deep1b', "
                 f"root={str(root)!r}, workdir={str(tmp_path / 'w')!r})\n")
  r = subprocess.run([sys.executable, script, f"--config={cfg}"], capture_output=True,
                     text=True, timeout=120, env=env)
  assert r.returncode == 1 and "stage must be one of" in r.stderr, r.stderr[-2000:]
  r = subprocess.run([sys.executable, script, "--config", str(cfg), "--stage=ivf"],
                     capture_output=True, text=True, timeout=120, env=env)
  assert r.returncode != 0 and "stage must be one of" not in r.stderr
  assert f"{str(root)!r} holds neither base file" in r.stderr, r.stderr[-2000:]
  for body, message in (("dict(ivf_k=16)", "SearchJob has no field 'ivf_k'"),
                        ("dict(ivf_K=16.5)", "ivf_K must be int, got 16.5"),
                        ("None", "not a search config")):
    bad = tmp_path / "bad.py"
    bad.write_text(f"def get_config():\n  return {body}\n")
    r = subprocess.run([sys.executable, script, f"--config={bad}", "--stage=ivf"],
                       capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 1 and message in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_eval_program_reads_any_data_files(tmp_path):
  import subprocess

  import numpy as np
  ds = qj.data.load_synthetic(n_train=1_000, n_db=300, n_queries=20, d=8, n_val=200)
  codec = qj.Codec.create(qj.QincoConfig(K=8, M=2, A=0, B=1), ds.train, verbose=False)
  codec.save(tmp_path / "codec")
  qj.data.write_vecs(str(tmp_path / "db.fvecs"), np.asarray(ds.db))
  qj.data.write_vecs(str(tmp_path / "q.fvecs"), np.asarray(ds.queries))
  qj.data.write_vecs(str(tmp_path / "gt.ivecs"), ds.gt.astype(np.int32))
  r = subprocess.run([sys.executable, os.path.join(EXPERIMENTS, "eval.py"),
                      f"--model={tmp_path / 'codec'}", f"--db={tmp_path / 'db.fvecs'}",
                      f"--queries={tmp_path / 'q.fvecs'}", f"--gt={tmp_path / 'gt.ivecs'}"],
                     capture_output=True, text=True, timeout=300,
                     env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert r.returncode == 0, r.stderr[-2000:]
  out = json.loads(r.stdout)
  want = qj.metrics.mse(ds.db, codec.decode(codec.encode(ds.db, verbose=False),
                                            verbose=False))
  assert out["n"] == 300 and out["mse"] == pytest.approx(want, rel=1e-5)
  assert 0 < out["R@100"] <= 1 and "evaluating" in r.stderr
  assert "INFO" not in r.stderr  # no Orbax chatter


def _program(*args, prog="train_bigann.py", driver=None, timeout=300):
  import subprocess
  root = os.path.dirname(EXPERIMENTS)
  cmd = [sys.executable] + (["-c", driver] if driver else []) + [
      os.path.join(EXPERIMENTS, prog), *args]
  return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                        env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": root})


@pytest.mark.parametrize("args, message", [
    (["--workdr=x"], "Unknown command line flag 'workdr'. Did you mean: workdir ?"),
    (["--config.train.lr=abc"], "--config.train.lr=abc: could not convert string to float"),
    (["--config=glove_smal"], "error: --config=glove_smal: no config of that name and no "
                              "such file; did you mean 'glove_small'? (names: glove_small, "
                              "synthetic_tiny"),
    (["--config.train.stop_patience=-1"], "error: stop_patience must be >= 0"),
    (["--config=synthetic_tiny", "--config.train.lr=nan"], "error: lr must be > 0, got nan")])
def test_training_program_errors_are_one_line(args, message, tmp_path):
  r = _program(*args, f"--workdir={tmp_path / 'w'}")
  assert r.returncode != 0 and message in r.stderr, r.stderr[-3000:]
  assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) <= 2, r.stderr
  assert not (tmp_path / "w").exists()


def test_training_help_shows_the_values_of_the_chosen_config():
  r = _program("--config=glove_small", "--help")
  assert r.returncode == 0, r.stderr[-2000:]
  text = " ".join(r.stdout.split())  # absl wraps the help text
  assert "with the values of glove_small.py" in text
  for field in ("A=4", "B=4", "de=64", "epochs=6", "lr=0.004", "stop_patience=3"):
    assert f" {field}," in text, field
  tiny = " ".join(_program("--config=synthetic_tiny", "--help").stdout.split())
  assert " K=16," in tiny and " epochs=3," in tiny


def test_search_program_bad_value_is_one_line():
  r = _program("--stage=bogus", prog="search_bigann.py")
  assert r.returncode == 1 and r.stderr.strip() == (
      "error: stage must be one of ('ivf', 'train', 'encode', 'build', 'search', 'all'), "
      "got 'bogus'"), r.stderr[-2000:]


# The first training step sends this process Ctrl-C, then blocks as a long compilation
# does (a KeyboardInterrupt would wait for it to end).
_CTRL_C_IN_COMPILATION = """
import os, runpy, signal, sys, time
from qinco_jax import train
make = train.make_train_step
def make_then_interrupt(*a, **k):
  step = make(*a, **k)
  def first_call(*args, **kw):
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(300)
    return step(*args, **kw)
  return first_call
train.make_train_step = make_then_interrupt
script, sys.argv = sys.argv[1], sys.argv[1:]
runpy.run_path(script, run_name="__main__")
"""


def test_ctrl_c_during_compilation_stops_at_once_and_cleanly(tmp_path):
  work = tmp_path / "w"
  r = _program("--config=synthetic_tiny", f"--workdir={work}",
               driver=_CTRL_C_IN_COMPILATION)
  assert r.returncode == 130, r.stderr[-3000:]
  assert "interrupted: stopped at once; the last checkpoint is intact" in r.stderr
  assert "Traceback" not in r.stderr and "Fatal Python error" not in r.stderr
  assert not (work / ".lock").exists()  # the workdir is free for the next run
