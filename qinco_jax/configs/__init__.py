"""Experiment configs: one file per experiment, each with its command, run time and
result in its docstring. `qinco-train --config=NAME` takes a training config
(ml_collections) by name (glove_small, synthetic_tiny, qinco2_s, qinco2_m, qinco2_l,
qinco1) or any such file by path; `common.base()` is the skeleton every training config
starts from. `qinco-search --config=NAME` takes a search config (search_glove): a
`get_config()` returning `search.job.SearchJob` field values."""

from importlib import resources

CONFIG_NAMES = ("glove_small", "synthetic_tiny", "qinco2_s", "qinco2_m", "qinco2_l",
                "qinco1")
SEARCH_CONFIG_NAMES = ("search_glove",)  # field values of a `search.job.SearchJob`


def config_path(name_or_path: str, names: tuple[str, ...] = CONFIG_NAMES) -> str:
  """A packaged config's file by name ("glove_small"; one of `names`, the configs of
  one program), or a path as given."""
  if name_or_path in names:
    return str(resources.files("qinco_jax.configs").joinpath(f"{name_or_path}.py"))
  return name_or_path
