"""The benchmark scripts' flags: generated from each benchmark's config dataclass
(`qinco_jax.bench.harness.parse_config`), and every command quoted in the docs still
parses into its config, so a reader can rerun what a table says it ran."""

import dataclasses
import os
import re
import shlex
import subprocess
import sys

import pytest

from qinco_jax.bench import (
    budget,
    codec,
    harness,
    list_search,
    multihost,
    pods,
    quantizers,
    rq_init,
    scale,
    search,
)
from qinco_jax.config import flag

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {"bench_codec": codec.CodecBench, "bench_quantizers": quantizers.QuantizerBench,
           "bench_search": search.SearchBench, "bench_budget": budget.BudgetBench,
           "bench_rq_init": rq_init.RQInitBench, "bench_multihost": multihost.MultihostBench,
           "bench_pods": pods.PodsBench, "bench_scale": scale.ScaleBench,
           "bench_list_search": list_search.ListSearchBench}


@dataclasses.dataclass(frozen=True)
class Toy:
  n: int = flag(3, "a count")
  rate: float = 0.5
  name: str | None = None
  sizes: tuple[int, ...] = (8,)
  words: tuple[str, ...] = ("a", "b")
  on: bool = True
  verbose: bool = False
  extra: tuple[int, ...] = ()

  def __post_init__(self):
    if self.n < 0:
      raise ValueError(f"n: expected >= 0, got {self.n}")


def test_defaults_come_from_the_dataclass():
  assert harness.parse_config(Toy, []) == Toy()


def test_each_spelling_sets_its_field():
  c = harness.parse_config(Toy, ["--n=7", "--rate", "2.5e-3", "--name=x", "--sizes", "4",
                                 "16", "--words=rq, reference", "--no-on", "--verbose",
                                 "--extra"])
  assert c == Toy(n=7, rate=2.5e-3, name="x", sizes=(4, 16), words=("rq", "reference"),
                  on=False, verbose=True, extra=())
  # '-' for '_' (the codec benchmark's historic spelling), and an empty tuple.
  @dataclasses.dataclass(frozen=True)
  class Hyphen:
    target_s: float = 4.0
    sweep_models: tuple[str, ...] = flag(("qinco2-S",), "none: no sweep", empty_ok=True)
  assert harness.parse_config(Hyphen, ["--target-s", "1.5", "--sweep-models"]) == \
      Hyphen(target_s=1.5, sweep_models=())


@pytest.mark.parametrize("argv, message", [
    (["--m=3"], "unrecognized arguments: --m=3"),
    (["--verb"], "unrecognized arguments: --verb"),  # no abbreviations
    (["--n=three"], "invalid int value: 'three'"),
    (["--sizes=4,x"], "--sizes: expected int values"),
    (["--sizes"], "--sizes: expected at least one argument"),  # its default is not empty
    (["--n=-1"], "n: expected >= 0, got -1"),  # the config's own check, in one line
])
def test_bad_flags_are_refused_naming_the_problem(argv, message, capsys):
  with pytest.raises(SystemExit) as e:
    harness.parse_config(Toy, argv)
  assert e.value.code == 2
  assert message in capsys.readouterr().err


def test_a_field_without_default_is_a_required_flag(capsys):
  @dataclasses.dataclass(frozen=True)
  class Needs:
    workdir: str
    runs: tuple[int, ...] = dataclasses.field(default_factory=lambda: (1, 2))
  assert harness.parse_config(Needs, ["--workdir=w"]) == Needs(workdir="w", runs=(1, 2))
  with pytest.raises(SystemExit):
    harness.parse_config(Needs, [])
  assert "the following arguments are required: --workdir" in capsys.readouterr().err


def test_command_line_is_the_users():
  assert harness.command_line("/x/experiments/bench_codec.py", ["--target-s", "1.5"]) == \
      "python experiments/bench_codec.py --target-s 1.5"
  assert harness.command_line("bench_search.py", []) == "python experiments/bench_search.py"


def _quoted_commands():
  """(script, argv) of every `python experiments/bench_*.py ...` in the docs."""
  out = []
  for doc in ("docs/benchmarks.md", "README.md", "docs/design.md", "docs/pods.md"):
    with open(os.path.join(ROOT, doc)) as f:
      text = f.read().replace("\\\n", " ")
    for m in re.finditer(r"python experiments/(bench_\w+)\.py([^`\n#]*)", text):
      args = m.group(2).strip()
      if "..." in args or "FLAGS" in args:
        continue  # a placeholder, not a command
      out.append((m.group(1), shlex.split(args)))
  return out


def test_every_quoted_benchmark_command_parses():
  cmds = _quoted_commands()
  assert {s for s, _ in cmds} >= {"bench_codec", "bench_quantizers", "bench_search",
                                   "bench_budget", "bench_rq_init", "bench_multihost"}
  for script, argv in cmds:
    harness.parse_config(CONFIGS[script], argv)  # exits with status 2 on a stale flag


def test_the_budget_tables_flag_lists_parse():
  """bench_budget's section lists each group's flags as `--...` strings."""
  with open(os.path.join(ROOT, "docs", "benchmarks.md")) as f:
    text = f.read()
  section = text[text.index("<!-- bench_budget:start -->"):
                 text.index("<!-- bench_budget:end -->")]
  flags = re.findall(r"`(--[^`]+)`", section)
  assert len(flags) >= 5
  for f in flags:
    harness.parse_config(budget.BudgetBench, shlex.split(f))


def test_scripts_are_wired_to_their_benchmark():
  """Each script answers --help with its config's flags (imports and wiring work)."""
  for script, cls in CONFIGS.items():
    r = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", f"{script}.py"),
                        "--help"], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert r.returncode == 0, r.stderr[-2000:]
    for f in dataclasses.fields(cls):
      assert f"--{f.name}" in r.stdout, (script, f.name)


@pytest.mark.parametrize("minutes, lr, init, dtype, L", [(60.0, 4e-3, "rq", "float32", 2),
                                                          (3.0, 1.6e-2, "reference",
                                                           "bfloat16", 4)])
def test_budget_recipes_are_glove_small_plus_what_the_benchmarks_vary(minutes, lr, init,
                                                                      dtype, L):
  """The benchmarks that train for a budget resolve their recipe from the glove_small
  config file plus overrides. The oracle is the recipe each benchmark wrote out field by
  field when its published rows were measured: the same configs, the same figures."""
  import qinco_jax as qj
  from qinco_jax import train

  b = budget.BudgetBench(L=L, train_A=2, train_B=8, dtype=dtype)
  assert budget.recipe(b, init, lr, minutes, 290_000) == (
      qj.preset("qinco2-S", M=8, L=L, de=64, dh=128, A=2, B=8, init=init, dtype=dtype),
      train.TrainConfig(lr=lr, warmup_epochs=1, stop_patience=1000, batch_per_device=1024,
                        loop=290_000, time_budget_s=minutes * 60))
  r = rq_init.RQInitBench(lr=lr)
  assert rq_init.recipe(r, minutes, 0.1, 290_000) == (
      qj.preset("qinco2-S", M=8, L=2, de=64, dh=128, A=4, B=4, init="rq",
                codebook_noise_init=0.1),
      train.TrainConfig(lr=lr, warmup_epochs=1, stop_patience=1000, batch_per_device=1024,
                        loop=290_000, time_budget_s=minutes * 60))
  q = quantizers.QuantizerBench(batch=512, train_A=8)
  assert quantizers.recipe(q, 16, minutes * 60, 100_000) == (
      qj.preset("qinco2-S", M=16, L=2, de=64, dh=128, A=8, B=4),
      train.TrainConfig(warmup_epochs=1, stop_patience=5, batch_per_device=512,
                        loop=100_000, time_budget_s=minutes * 60))


def test_a_run_folder_is_cleared_only_when_a_training_run_wrote_it(tmp_path):
  """A benchmark starts a run afresh by removing its earlier attempt; a folder holding
  anything else (the user's) is refused and left byte for byte as it was."""
  earlier = tmp_path / "earlier"
  (earlier / "ckpt" / "3").mkdir(parents=True)
  for name in ("metrics.jsonl", "ckpt_meta.json", ".lock", ".ckpt_meta.json.tmp"):
    (earlier / name).write_text("{}")
  harness.clear_run_dir(str(earlier))
  assert not earlier.exists()
  users = tmp_path / "users"
  (users / "best").mkdir(parents=True)
  (users / "metrics.jsonl").write_text("{}")
  (users / "thesis.tex").write_text("mine")
  with pytest.raises(ValueError, match=r"training run does not write \(\['thesis.tex'\]\)"):
    harness.clear_run_dir(str(users))
  assert (users / "thesis.tex").read_text() == "mine" and (users / "best").is_dir()
  harness.clear_run_dir(str(tmp_path / "absent"))  # nothing to clear


def test_the_scale_extrapolation_by_hand():
  """bench_scale's table at 10^9 vectors on 4 hosts, from made-up measurements whose
  extrapolation is easy to do by hand."""
  usage = {"cpu_s": 0.0, "wall_s": 1.0, "peak_rss": 10 ** 9, "base_rss": 0}
  lists = {str(n): {"build": {**usage, "file_bytes": 16 * n, "cpu_s": 5e-6 * n},
                    "mmap": {**usage, "load_s": 0.5, "rss_after_load": 0, "rssanon": 10 ** 9,
                             "qps": {"64": 100.0}, "cpu_ms_per_query": {"64": ms}}}
           for n, ms in ((1 << 16, 1.0), (1 << 26, 2.0))}  # 1 and 1,024 rows per list
  res = {"nlist": 1 << 16, "lists": lists,
         "coarse": {"K": 1 << 16, "rows": 1 << 22, "two_level": {"cpu_s": 3600.0},
                    "faiss_1iter": {"rows": 1 << 20, "cpu_s": 36.0},
                    "recall_at_64": {"16": 0.5, "256": 0.9}},
         "encode": {str(1 << 20): {"exhaustive": {"vec_per_cpu_s": 1e9 / 3600 / 1000},
                                   "candidates": {"vec_per_cpu_s": 1e9 / 3600 / 100,
                                                  "same_codes": 1.0},
                                   "hnsw_build": {"cpu_s": 360.0}}}}
  rows = {r.split(" | ")[0]: r.split(" | ")[1:] for r in scale.extrapolate(res)
          if r.startswith("| ") and "---" not in r}
  cell = lambda start: next(v for k, v in rows.items() if k.startswith("| " + start))
  cent = 3 * 2 ** 20 * 128 * 4 / 1e9  # 1.61 GB of centroids (D = 128)
  assert cell("list file per host")[0] == "4.0"  # 2.5e8 x 16 bytes
  assert cell("build: peak RSS")[0] == f"{1 + cent:.1f}"  # flat: no growth
  assert cell("search: RSS")[0] == f"{1 + cent + 4:.1f}"
  # 3600 CPU s x 16 (2^26 rows: 64 per list at 2^20) x 4 (sqrt(2^20 / 2^16) distances)
  assert cell("ivf: two-level")[0] == "64.0"
  # 36 CPU s x 256 (2^28 rows / 2^20) x 16 (lists) x 100 iterations
  assert cell("ivf: faiss exact")[0] == f"{36 * 256 * 16 * 100 / 3600:,.0f}"
  assert cell("encode")[0] == "100 / 25"
  assert cell("build, CPU h")[0] == f"{5e-6 * 1e9 / 3600:.1f} / {5e-6 * 1e9 / 3600 / 4:.1f}"
  # 1 ms at 1 row per list, 2 at 1,024: at 2.5e8 / 2^20 = 238.4 rows per list
  assert cell("search, AQ stage")[0] == f"{1 + (238.4186 - 1) / 1023:.1f}"
  text = "\n".join(scale.extrapolate(res))
  assert f"RAM: met by extrapolation ({1 + cent + 4:.1f} GB" in text
  assert "finds 0.90 of the 64 nearest lists at efSearch 256" in text


def test_search_pareto_front_and_equal_speed_table_by_hand():
  rows = [{"qps": 100.0, "R@1": 0.5}, {"qps": 50.0, "R@1": 0.4},  # dominated
          {"qps": 10.0, "R@1": 0.6}, {"qps": 200.0, "R@1": 0.2}]
  assert [(r["qps"], r["R@1"]) for r in search.pareto(rows)] == [
      (200.0, 0.2), (100.0, 0.5), (10.0, 0.6)]
  curves = {"faiss A": [{"qps": 20.0, "qps_k1": 300.0, "R@1": 0.3},
                        {"qps": 80.0, "R@1": 0.45}],
            "faiss B": [{"qps": 40.0, "R@1": 0.5}],
            "ours x": rows}
  table = search.equal_speed_table(curves, ["faiss A", "faiss B"], speeds=[30, 90, 250, 400])
  # at 30/s: A's 0.45 (80/s) and B's 0.5 (40/s) qualify -> B; ours: 0.5 (100/s)
  assert table[0] == {"qps": 30, "ours": 0.5, "anchor": 0.5, "anchor_name": "faiss B",
                      "ratio": 1.0}
  assert (table[1]["anchor"], table[1]["ours"]) == (0.3, 0.5)  # A's k=1 timing: 300/s
  assert table[1]["ratio"] == pytest.approx(0.5 / 0.3)
  assert (table[2]["anchor"], table[2]["ours"], table[2]["ratio"]) == (0.3, None, None)
  assert (table[3]["anchor"], table[3]["ours"]) == (None, None)
