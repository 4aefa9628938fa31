"""Command-line programs: `qinco-train`, `qinco-search`, `qinco-eval`, `qinco-compile`
(installed with the package; `experiments/train_bigann.py`, `search_bigann.py`,
`eval.py` and `compile_pods.py` call the same functions). Each is flags -> a config ->
one library call:

  qinco-train --config=glove_small --workdir=runs/glove        # experiment.run
  qinco-search --workdir=runs/search_glove --stage=all         # search.job.run
  qinco-eval --model=runs/glove --A=16 --B=32                  # evaluate.evaluate
  qinco-compile --config=qinco2_l --target=v5p-128             # aot.job.run

`--config` takes a config by name (the files in `qinco_jax/configs/`) or any config
file by path. For `qinco-train`, `--config.train.lr=...` and the like override its
fields; for `qinco-search`, the config's values become the defaults of the flags of
the same names (`--help` lists them with their defaults).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shlex
import sys
from collections.abc import Iterator
from typing import Any

from qinco_jax.configs import CONFIG_NAMES, SEARCH_CONFIG_NAMES, config_path  # noqa: F401


def _argv(argv, names: tuple[str, ...] = CONFIG_NAMES) -> list[str]:
  """argv with `--config NAME` written `--config=FILE` (ml_collections wants a path).
  A value that is neither a config name nor a file exits with one line listing the
  names."""
  argv = list(sys.argv if argv is None else argv)
  out: list[str] = []
  i = 0
  while i < len(argv):
    a = argv[i]
    if a == "--config" and i + 1 < len(argv):
      a, i = "--config=" + argv[i + 1], i + 1
    if a.startswith("--config="):
      value = a[len("--config="):]
      a = "--config=" + config_path(value, names)
      if value not in names and value and not os.path.isfile(value.split(":")[0]):
        import difflib
        near = difflib.get_close_matches(value, names, n=1)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        print(f"error: --config={value}: no config of that name and no such file{hint} "
              f"(names: {', '.join(names)}; or the path of a config file)", file=sys.stderr)
        raise SystemExit(2)
    out.append(a)
    i += 1
  return out


def _key_flags(argv: list[str]):
  """Lists this module's flags in the program's `--help` (absl shows the flags of the
  main module, i.e. of argv[0], only)."""
  from absl import flags
  sys.argv[0] = argv[0]
  for module, fl in flags.FLAGS.flags_by_module_dict().items():
    if module.endswith(("qinco_jax.cli", "qinco_jax.distributed", "qinco_jax.experiment",
                        "cli.py", "distributed.py", "experiment.py")):
      for f in fl:
        flags.FLAGS.register_key_flag_for_module(argv[0], f)


def _run(main, argv: list[str], **kw):
  """absl's app.run, but `--help` exits with status 0 (absl uses 1), and a usage
  error (a bad flag value found by the program) is one line, not the whole help."""
  from absl import app

  def one_line_usage_errors(args):
    try:
      return main(args)
    except app.UsageError as e:
      print(f"error: {e}", file=sys.stderr)
      raise SystemExit(e.exitcode) from None

  try:
    app.run(one_line_usage_errors, argv=argv, **kw)
  except SystemExit as e:
    if e.code == 1 and any(a in ("--help", "-h", "--helpshort", "--helpfull", "-?")
                           for a in argv[1:]):
      raise SystemExit(0) from None
    raise


def _command(prog: str, argv: list[str]) -> str:
  return " ".join([prog] + [shlex.quote(a) for a in argv[1:]])


# ----------------------------------------------------------------------- train
def train(argv: list[str] | None = None):
  """`qinco-train`: trains a codec on a config, evaluates it, prints the table."""
  from absl import flags, logging

  from qinco_jax import distributed, experiment
  argv = _argv(argv)
  sys.argv = argv  # ml_collections applies --config.* overrides when the flag is defined
  default = config_path("glove_small")
  experiment.define_config_flag(default)
  flags.DEFINE_string("workdir", "runs/glove", "checkpoints, metrics and eval output")
  flags.DEFINE_bool("print_config", False,
                    "print the model and training configs the flags resolve to, and exit")
  distributed.define_flags()
  chosen = next((a.split("=", 1)[1] for a in argv[1:] if a.startswith("--config=")),
                default)
  flags.FLAGS["config"].help = ("experiment config: a name (" + ", ".join(CONFIG_NAMES)
                                + ") or a file. Its fields, overridable as "
                                "--config.FIELD=VALUE, with the values of "
                                f"{os.path.basename(chosen)}:\n" + _config_help(chosen))
  _key_flags(argv)

  def main(args):
    del args
    logging.set_verbosity(logging.WARNING)  # keep Orbax's per-save info lines out
    c = flags.FLAGS.config
    try:  # a bad value in the config or the flags: one line
      description = experiment.describe(c)
    except (ValueError, TypeError) as e:
      print(f"error: {e}", file=sys.stderr)
      raise SystemExit(2) from None
    if flags.FLAGS.print_config:
      print(description)
      return
    try:
      distributed.initialize_from_flags()
    except (distributed.StartupError, ValueError) as e:
      print(f"error: {e}", file=sys.stderr)
      raise SystemExit(1) from None
    with _stop_at_once_on_ctrl_c(), distributed.exit_on_error():
      experiment.run(c, flags.FLAGS.workdir)

  _run(main, argv, flags_parser=experiment.parse_flags)


def _config_help(path: str) -> str:
  """The fields of the config file `path`, with the values it resolves to (the
  dataclass defaults where it cannot be read)."""
  import dataclasses

  from qinco_jax.config import QincoConfig
  from qinco_jax.train import TrainConfig
  try:
    from ml_collections.config_flags import config_flags

    from qinco_jax import experiment
    c = config_flags._ConfigFileParser(name="config").parse(path)
    resolved = {"model": experiment.model_config(c, 0).to_dict(),
                "train": dataclasses.asdict(experiment.train_config(c))}
    note = f"the values of {os.path.basename(path)} (de=None: E = D)"
  except Exception:  # ml_collections missing, a broken file: --help still works
    try:
      from qinco_jax.configs import common
      c = common.base()
    except Exception:
      return ""
    resolved = {name: {f.name: f.default for f in dataclasses.fields(cls)}
                for name, cls in (("model", QincoConfig), ("train", TrainConfig))}
    note = "the dataclass defaults (the config's preset may set others)"
  lines = []
  for section in ("model", "train", "data", "ds", "eval"):
    d = resolved.get(section, {})
    fields = ", ".join(f"{k}={d.get(k, v)!r}" for k, v in c[section].items())
    lines.append(f"  {section}: {fields}")
  lines.append(f"  model, train: {note}; train: every TrainConfig field but loop "
               "(= ds.loop). Meanings: help(qinco_jax.config.QincoConfig), "
               "help(qinco_jax.train.TrainConfig)")
  return "\n".join(lines)


@contextlib.contextmanager
def _stop_at_once_on_ctrl_c() -> Iterator[None]:
  """Ctrl-C (SIGINT) ends the training at once, even inside a long compilation (where
  Python's KeyboardInterrupt waits for it to end, and the interpreter's shutdown then
  could crash): a watcher thread, woken through `signal.set_wakeup_fd`, releases the
  workdir lock, says how to resume and exits with status 130. What was saved stays
  intact (every checkpoint and codec save is atomic)."""
  import signal
  import threading

  from qinco_jax import checkpoint
  if threading.current_thread() is not threading.main_thread():
    yield
    return
  r, w = os.pipe()
  os.set_blocking(w, False)

  def watch():
    while True:
      try:
        got = os.read(r, 64)
      except OSError:
        return
      if not got:
        return
      if signal.SIGINT in got:
        checkpoint.release_workdir_locks()
        sys.stdout.flush()
        print("\ninterrupted: stopped at once; the last checkpoint is intact (continue "
              "with --config.resume=True)", file=sys.stderr, flush=True)
        os._exit(130)

  old_fd = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
  old_handler = signal.signal(signal.SIGINT, lambda *_: None)  # the watcher acts
  threading.Thread(target=watch, daemon=True, name="ctrl-c").start()
  try:
    yield
  finally:
    signal.signal(signal.SIGINT, old_handler)
    signal.set_wakeup_fd(old_fd)
    os.close(w)
    os.close(r)


# ----------------------------------------------------------------------- search
def search(argv: list[str] | None = None):
  """`qinco-search`: the large-scale IVF-QINCo2 job, one stage or all (`search.job.run`)."""
  from absl import app, flags, logging

  from qinco_jax import distributed
  from qinco_jax.search import job as search_job
  given = list(sys.argv if argv is None else argv)  # recorded as typed (config names)
  argv = _argv(argv, SEARCH_CONFIG_NAMES)
  F = flags.FLAGS
  # One schema: a flag per SearchJob field that has a help text, typed after its
  # default; --shard is written i/n. A --config file sets the flags' defaults.
  define: dict[type, Any] = {int: flags.DEFINE_integer, float: flags.DEFINE_float,
                             str: flags.DEFINE_string}
  configs = [a.split("=", 1)[1] for a in argv[1:] if a.startswith("--config=")]
  config = configs[-1] if configs else ""  # the last one counts, as for any flag
  defaults = _search_defaults(config)
  flags.DEFINE_string("config", config, "search config: a name (" +
                      ", ".join(SEARCH_CONFIG_NAMES) + ") or a file whose get_config() "
                      "returns SearchJob field values; they become the flags' defaults")
  job_flags = [f for f in dataclasses.fields(search_job.SearchJob) if "help" in f.metadata]
  for f in job_flags:  # each flag's type is its dataclass default's
    value = defaults[f.name]
    if f.name == "shard":
      shown = value if isinstance(value, str) else "/".join(map(str, value))
      flags.DEFINE_string("shard", shown, f.metadata["help"])
    else:
      kind: Any = type(f.default)
      ok = (int, float) if kind is float else (kind,)
      if not isinstance(value, ok) or isinstance(value, bool):
        raise SystemExit(f"--config={config}: {f.name} must be {kind.__name__}, got "
                         f"{value!r}")
      define[kind](f.name, kind(value), f.metadata["help"])
  distributed.define_flags()
  _key_flags(argv)

  def main(args):
    del args
    logging.set_verbosity(logging.WARNING)
    try:
      i, n = (int(v) for v in F.shard.split("/"))
    except ValueError:
      raise app.UsageError(f"--shard must be i/n (e.g. 0/4), got {F.shard!r}") from None
    env = os.environ.get("QINCO_GLOVE_NPY")
    command = (f"QINCO_GLOVE_NPY={env} " if env and F.data == "glove" else "") + \
        _command("python experiments/search_bigann.py", given)
    # Set on purpose: the flags given and the values a --config file sets (the others
    # take what the workdir's earlier stages used: search.job.reconcile).
    fields = {f.name: f.default for f in job_flags}
    on_purpose = frozenset(f.name for f in job_flags
                           if F[f.name].present or defaults[f.name] != fields[f.name])
    try:
      job = search_job.SearchJob(
          **{f.name: F[f.name].value for f in job_flags if f.name != "shard"},
          shard=(i, n), command=command, given=on_purpose)
    except ValueError as e:
      raise app.UsageError(str(e)) from None
    try:
      distributed.initialize_from_flags()
    except (distributed.StartupError, ValueError) as e:
      print(f"error: {e}", file=sys.stderr)
      raise SystemExit(1) from None
    with distributed.exit_on_error():
      try:
        search_job.run(job)
      except (search_job.JobError, FileNotFoundError) as e:  # the user's to fix: one line
        raise SystemExit(f"qinco-search: {e}") from None
      distributed.barrier("search done")  # the others wait for process 0's stages

  _run(main, argv)


def _search_defaults(config: str) -> dict[str, Any]:
  """The flag defaults a search config file sets: SearchJob's field defaults updated
  with the file's get_config() values (the job itself is checked once the flags are
  applied). A file that cannot be read or run, or a field SearchJob lacks, exits with
  a one-line error."""
  import runpy

  from qinco_jax.search import job as search_job
  fields = {f.name: f.default for f in dataclasses.fields(search_job.SearchJob)
            if "help" in f.metadata}
  if not config:
    return fields
  try:
    values = dict(runpy.run_path(config)["get_config"]())
  except Exception as e:  # any failure of the user's file: one line, no traceback
    raise SystemExit(f"--config={config}: not a search config (a file whose get_config() "
                     f"returns SearchJob field values; names: "
                     f"{', '.join(SEARCH_CONFIG_NAMES)}): {e!r}") from None
  unknown = sorted(set(values) - set(fields))
  if unknown:
    raise SystemExit(f"--config={config}: SearchJob has no field {unknown[0]!r} (its "
                     f"fields: {', '.join(fields)})")
  return {**fields, **values}


# ----------------------------------------------------------------------- eval
def evaluate(argv: list[str] | None = None):
  """`qinco-eval`: MSE, per-step MSE, R@1/10/100 and code usage of a trained codec."""
  from absl import app, flags, logging

  argv = _argv(argv)
  F = flags.FLAGS
  flags.DEFINE_string("model", None, "codec directory (or a training workdir)",
                      required=True)
  flags.DEFINE_integer("A", None, "candidates per beam (default: the model's)")
  flags.DEFINE_integer("B", None, "beam size (default: the model's)")
  flags.DEFINE_string("data", "glove", "glove | synthetic | files (--db, --queries, --gt)")
  flags.DEFINE_string("db", None, "database file (.fvecs/.bvecs/.npy): evaluate on it")
  flags.DEFINE_string("queries", None, "query file (with --db; for recall)")
  flags.DEFINE_string("gt", None, "ground-truth ids of the queries in --db (.ivecs/.npy)")
  flags.DEFINE_float("mse_scale", 1.0, "factor of the reported MSE (1e-4 for BigANN)")
  flags.DEFINE_integer("n_db", None, "evaluate on the first n_db database vectors only "
                       "(MSE and usage; recall needs the whole database)")
  _key_flags(argv)

  def main(args):
    del args
    logging.set_verbosity(logging.WARNING)
    import qinco_jax as qj
    from qinco_jax.evaluate import evaluate as run_eval
    codec = qj.load(F.model)
    if F.db:
      ds = qj.data.load_files(None, F.db, F.queries, F.gt, mse_scale=F.mse_scale)
    elif F.data == "glove":
      ds = qj.data.load_glove()
    elif F.data == "synthetic":
      ds = qj.data.load_synthetic()
    else:
      raise app.UsageError(f"--data={F.data!r}: use glove, synthetic, or give --db")
    n = min(F.n_db or len(ds.db), len(ds.db))
    print(f"evaluating {F.model} on {n:,} database vectors of {ds.name}", file=sys.stderr,
          flush=True)
    out = run_eval(codec, ds, A=F.A, B=F.B, n_db=F.n_db, verbose=True)
    print(json.dumps(out, indent=2))

  _run(main, argv)


# ----------------------------------------------------------------------- compile
def compile_pods(argv: list[str] | None = None):
  """`qinco-compile`: compiles the training step, encoder and decoder for a TPU slice or
  GPU host ahead of time and reports memory, FLOPs, collectives and a roofline
  prediction per chip (`qinco_jax.aot`; docs/pods.md)."""
  from qinco_jax.aot import job
  argv = list(sys.argv if argv is None else argv)
  sys.exit(job.main(argv[1:]))
