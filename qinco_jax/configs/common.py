"""Shared config skeleton: every experiment config starts from `base()`.

Fields: `model` (every QincoConfig field; A and B are the *training* beam), `train`
(every TrainConfig field but `loop`, which is `ds.loop`), `data` (files or the GloVe
default), `ds` (size limits), `eval` (evaluation beam and database size), `preset`,
`resume`. The model and train sections are generated from the dataclasses, so a new
field is settable from the command line without being listed here; their values are
None (= the preset's or the dataclass's default) until a config or a flag sets them.
"""

import dataclasses
import re

import ml_collections
from ml_collections.config_dict import placeholder

from qinco_jax.config import QincoConfig
from qinco_jax.train import TrainConfig

_TYPES = {"int": int, "float": float, "str": str, "bool": bool}


def _field_type(f: dataclasses.Field) -> type:
  """The scalar type of a dataclass field ("int | None" -> int), for the placeholder."""
  text = f.type if isinstance(f.type, str) else f.type.__name__
  if "Literal[" in text:  # a choice among quoted strings
    return str
  names = re.findall(r"[A-Za-z_]+", text)
  found = [_TYPES[n] for n in names if n in _TYPES]
  if not found:
    raise TypeError(f"{f.name}: no command-line type for annotation {f.type!r}")
  return found[0]


def section(cls, skip=()) -> ml_collections.ConfigDict:
  """One None placeholder per field of dataclass `cls` (but `skip`), typed after it."""
  return ml_collections.ConfigDict({
      f.name: placeholder(_field_type(f)) for f in dataclasses.fields(cls)
      if f.name not in skip})


def base(preset: str = "qinco2-S") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.preset = preset
  c.resume = False
  # Model overrides on top of the preset (None = the preset's value).
  c.model = section(QincoConfig)
  c.model.de_is_D = False  # set True for de = data dimension (no projections)
  # Training recipe overrides (None = the dataclass default or the preset's recipe).
  c.train = section(TrainConfig, skip=("loop",))
  # Data: "glove" (default), "synthetic", "bigann" (files under data.root), or files.
  c.data = ml_collections.ConfigDict(dict(
      name="glove", root="", trainset="", db="", queries="", gt="", mse_scale=1.0))
  c.ds = ml_collections.ConfigDict(dict(trainset=0, valset=10_000, db=0, loop=10_000_000))
  # Evaluation beam (None = training A/B) and the faiss RQ baseline printed beside it.
  c.eval = ml_collections.ConfigDict(dict(A=placeholder(int), B=placeholder(int),
                                          rq_baseline=True, rq_beam=32,
                                          rq_train=100_000))
  return c


def paper(preset: str) -> ml_collections.ConfigDict:
  """The paper's recipe for a model preset on BigANN1M (spec section 10): 10M-sample
  epochs, 71 epochs (qinco2: 3 warm-up + a 60-epoch quarter cosine, then 8 at lr ~ 0,
  spec 9.6; qinco1: its plateau schedule), evaluated on 1M database vectors."""
  c = base(preset)
  c.data.name = "bigann"
  c.data.mse_scale = 1e-4
  c.ds.db = 1_000_000
  if preset == "qinco1":
    c.eval.update(A=0, B=1)  # QINCo1: greedy exhaustive
    c.train.epochs = 71
  else:
    c.eval.update(A=32, B=64)
    c.train.update(epochs=71, cosine_epochs=60.0)
  return c
