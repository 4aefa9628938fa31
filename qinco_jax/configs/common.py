"""Shared config skeleton: every experiment config starts from `base()`.

Fields: `model` (QincoConfig fields; A and B are the *training* beam), `train`
(TrainConfig fields), `data` (files or the GloVe default), `ds` (size limits), `eval`
(evaluation beam and database size), `preset`, `resume`.
"""

import ml_collections
from ml_collections.config_dict import placeholder


def _int():
  return placeholder(int)  # None (= the preset's value) but overridable from flags


def _float():
  return placeholder(float)


def base(preset: str = "qinco2-S") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.preset = preset
  c.resume = False
  # Model overrides on top of the preset (None = the preset's value).
  c.model = ml_collections.ConfigDict(dict(
      K=_int(), M=_int(), L=_int(), de=_int(), dh=_int(), A=_int(), B=_int(), Ls=_int(),
      init=placeholder(str),  # "rq" (QINCo2 default: start at the RQ) or "reference"
      dtype=placeholder(str)))  # matmul dtype of the step networks: float32 | bfloat16
  c.model.de_is_D = False  # set True for de = data dimension (no projections)
  c.train = ml_collections.ConfigDict(dict(
      lr=_float(), epochs=_int(), warmup_epochs=_float(), stop_patience=_int(),
      cosine_epochs=_float(), batch_per_device=_int(), accumulate=_int(), seed=0, log_every=50,
      time_budget_s=_float()))  # seconds of wall time; the cosine ends with the budget
  # Data: "glove" (default), "synthetic", "bigann" (files under data.root), or files.
  c.data = ml_collections.ConfigDict(dict(
      name="glove", root="", trainset="", db="", queries="", gt="", mse_scale=1.0))
  c.ds = ml_collections.ConfigDict(dict(trainset=0, valset=10_000, db=0, loop=10_000_000))
  # Evaluation beam (None = training A/B) and the faiss RQ baseline printed beside it.
  c.eval = ml_collections.ConfigDict(dict(A=_int(), B=_int(), rq_baseline=True, rq_beam=32,
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
